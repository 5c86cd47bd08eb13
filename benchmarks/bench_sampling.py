"""Seconds per denoising step: our compiled sampler vs diffusers' CogVideoXPipeline, same weights.

    python benchmarks/bench_sampling.py [--steps 10] [--configs tiny,small] [--json out.json]

Both run classifier-free guidance (a doubled batch per step) on the CPU in float32 with the same
random tiny/small CogVideoX weights (diffusers layout -> converted once). Ours is timed on a second
call (compiled), with the per-step progress callback on and off, for the released DPM++(2M) SDE
sampler and DDIM; diffusers runs its DDIM scheduler with ``output_type="latent"`` (no VAE decode).
Every row records the share of CPU time other processes took while it was timed ("other load");
rows above --max-load are flagged and the run exits non-zero, so a busy machine gives no figures.
torch's OpenMP pool is set to OMP_WAIT_POLICY=PASSIVE unless set (as in bench_transformer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp

from benchutil import OtherLoad, cpu_model, host_memory_setup  # noqa: E402

CONFIGS = {
  # name: (transformer overrides, frames, height, width)
  "tiny": (dict(), 9, 64, 64),
  "small": (
    dict(
      num_layers=8,
      num_attention_heads=4,
      attention_head_dim=64,
      sample_frames=49,
      sample_height=16,
      sample_width=16,
    ),
    25,
    128,
    128,
  ),
}


def _median(fn, repeats):
  """(median wall seconds of ``repeats`` calls, other processes' CPU share meanwhile)."""
  times, load = [], OtherLoad()
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2], load.value()


def bench(name, steps, repeats):
  import torch
  from diffusers import CogVideoXPipeline
  from reference_models import tiny_cogvideox_folder

  from repvideo_jax import pipeline

  overrides, frames, height, width = CONFIGS[name]
  torch.set_num_threads(max(1, torch.get_num_threads()))
  with tempfile.TemporaryDirectory() as tmp:
    root, refs = tiny_cogvideox_folder(pathlib.Path(tmp) / name, seed=0, **overrides)
    pipe = pipeline.load_pipeline(root)
  ref = CogVideoXPipeline(
    tokenizer=refs["tokenizer"],
    text_encoder=refs["text_encoder"],
    vae=refs["vae"],
    transformer=refs["transformer"],
    scheduler=refs["scheduler"],
  )
  prompts = ["a red cat playing guitar"]
  text = pipe.encode_prompts(prompts)
  rows = {}
  for sampler in ("dpmpp2m", "ddim"):
    s = pipeline.GenerationSettings(
      num_frames=frames,
      height=height,
      width=width,
      steps=steps,
      sampler=sampler,
      cfg_schedule="constant",
      guidance=6.0,
    )
    for progress in (False, True):
      hook = (lambda i: None) if progress else None
      t = time.perf_counter()
      pipeline.sample_latents(pipe, text, s, progress=hook)  # compile + first run
      first = time.perf_counter() - t
      sec, other = _median(
        lambda s=s, hook=hook: pipeline.sample_latents(pipe, text, s, progress=hook), repeats
      )
      rows[f"ours {sampler}{' +progress' if progress else ''}"] = (sec / steps, first, other)

  def run_ref():
    with torch.no_grad():
      ref(
        prompt=prompts,
        negative_prompt="",
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=6.0,
        max_sequence_length=8,
        output_type="latent",
      )

  run_ref()
  sec, other = _median(run_ref, repeats)
  rows["diffusers ddim"] = (sec / steps, None, other)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--configs", default="tiny,small")
  parser.add_argument("--json")
  parser.add_argument("--max-load", type=float, default=0.05, help="flag rows timed above this other load")
  args = parser.parse_args(argv)
  results = {"cpu_model": cpu_model(), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
  busy = False
  print(
    f"{cpu_model()}, {os.cpu_count()} CPUs, {results['date']}; float32; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
  )
  for name in args.configs.split(","):
    rows = bench(name, args.steps, args.repeats)
    results[name] = {
      k: {"s_per_step": v[0], "first_call_s": v[1], "other_load": v[2]} for k, v in rows.items()
    }
    base = rows["diffusers ddim"][0]
    print(
      f"\n[{name}] {CONFIGS[name][1]} frames {CONFIGS[name][2]}x{CONFIGS[name][3]}, "
      f"{args.steps} steps, CFG batch 2"
    )
    print(f"{'run':<26}{'ms/step':>10}{'vs diffusers':>14}{'first call (s)':>16}{'other load':>12}")
    for k, (sec, first, other) in rows.items():
      flag = "  (busy: not a result)" if other > args.max_load else ""
      busy |= bool(flag)
      first_s = "" if first is None else f"{first:.2f}"
      print(f"{k:<26}{sec * 1e3:>10.2f}{base / sec:>13.2f}x{first_s:>16}{100 * other:>11.0f}%{flag}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
  if busy:
    sys.exit(
      f"rows were timed with more than {100 * args.max_load:.0f}% other load; rerun on an idle machine"
    )


if __name__ == "__main__":
  host_memory_setup()  # ours and torch alike, before JAX starts
  main()
