"""Step caching, measured side by side in one run: transformer calls, time per video, and quality.

    python benchmarks/bench_step_cache.py [--settings none,residual:0.2,...] [--seeds 2] [--json out.json]

Part 1, the bundled demo model (real trained weights, its calibration in the model folder): for each
``--step-cache`` setting, on the 18 held-out captions x ``--seeds`` starting noises (the model folder's
defaults: 50 steps, CFG 8 on the smooth schedule, its sampler unless ``--sampler`` names one):
  calls      transformer layer-stack work per video, in B-batch calls (uncached: 2 per step)
  s/video    wall time of sampling + VAE decode per video, batches of 8, compiled (second run)
  PSNR, SSIM the frames against the uncached video of the same prompt, seed and noise
  held-out   colour / shape / motion / all-three accuracy read by the domain's detectors, with the
             binomial standard error of the uncached row, and temporal consistency (adjacent-frame
             pixel cosine, ``evaluate.pixel_similarity``)
Part 2, a random-weight small CogVideoX (8 layers, width 256, 25 x 128 x 128): seconds per video of
the sampler alone (DPM++, 50 steps, CFG 6) for the same settings with the demo model's calibration
(random weights change their residual too much to skip anything), where the transformer dominates.

Every timing row records the other processes' share of the CPU while it ran (``benchutil``); rows
above ``--max-load`` are flagged and the run exits non-zero, so a busy machine gives no figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
from bench_sampling import CONFIGS  # noqa: E402
from benchutil import OtherLoad, host_memory_setup, log  # noqa: E402

SMALL_CONFIG = CONFIGS["small"]  # (transformer overrides, frames, height, width)

DEFAULT_SETTINGS = (
  "none,residual:0.1,residual:0.2,residual:0.3,residual:0.5,cfg:2,cfg:3,residual:0.2+cfg:2,residual:0.5+cfg:3"
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Peak signal-to-noise ratio (dB) of uint8 frames."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
  """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03) over frames and
  channels of uint8 frames (..., H, W, 3)."""
  from scipy.ndimage import gaussian_filter

  x = a.astype(np.float64).reshape(-1, *a.shape[-3:])
  y = b.astype(np.float64).reshape(-1, *b.shape[-3:])
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

  def blur(z):
    return gaussian_filter(z, 1.5, truncate=3.5)

  values = []
  for f in range(x.shape[0]):
    for c in range(3):
      p, q = x[f, ..., c], y[f, ..., c]
      mp, mq = blur(p), blur(q)
      vp, vq, cov = blur(p * p) - mp * mp, blur(q * q) - mq * mq, blur(p * q) - mp * mq
      s = ((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp * mp + mq * mq + c1) * (vp + vq + c2))
      values.append(s.mean())
  return float(np.mean(values))


def picture(path, rows, prompt, frame_ids=(0, 4, 8, 12, 16)):
  """A PNG of the first video under each setting (rows), some of its frames side by side."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(rows), len(frame_ids), figsize=(1.3 * len(frame_ids), 1.35 * len(rows)))
  for r, (name, frames) in enumerate(rows):
    for c, f in enumerate(frame_ids):
      ax = axes[r, c]
      ax.imshow(frames[f], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
      if r == 0:
        ax.set_title(f"frame {f}", fontsize=7)
  fig.suptitle(prompt, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def demo_part(settings_list, seeds, batch_size, picture_path=None, sampler=None):
  import jax

  from repvideo_jax import evaluate, pipeline, step_cache, video_io
  from repvideo_jax.demo import demo_model_dir
  from repvideo_jax.demo import domain as D

  pipe = pipeline.load_pipeline(demo_model_dir())
  specs = D.split_specs()[1]
  jobs = [(spec, r) for r in range(seeds) for spec in specs]
  prompts = [D.caption(spec) for spec, _ in jobs]
  rows, reference, firsts = [], None, []
  for name in settings_list:
    settings = pipeline.settings_for(pipe, step_cache=None if name == "none" else name, sampler=sampler)
    plan = pipeline.step_cache_plan(pipe, settings)
    codes = np.zeros(settings.steps, np.int32) if plan is None else plan

    def run(settings=settings):
      out = []
      for start in range(0, len(prompts), batch_size):
        text = pipe.encode_prompts(prompts[start : start + batch_size])
        latents = pipeline.sample_latents(pipe, text, settings, first_index=start)
        out.append(video_io.to_uint8(np.asarray(pipeline.decode_latents(pipe, latents))))
      return np.concatenate(out)

    run()  # compile every batch shape (the last batch may be smaller) outside the timing
    load = OtherLoad()
    t0 = time.perf_counter()
    frames = jax.block_until_ready(run())
    seconds = (time.perf_counter() - t0) / len(prompts)
    other = load.value()
    if reference is None:
      reference = frames
    firsts.append((name, frames[0]))
    scores = [D.score(spec, D.detect(f)) for (spec, _), f in zip(jobs, frames)]
    acc = evaluate.accuracy(scores)
    row = {
      "setting": name,
      "calls": step_cache.transformer_calls(codes, settings.uses_guidance),
      "reused_steps": int(np.sum(codes == step_cache.REUSE)),
      "cond_only_steps": int(np.sum(codes == step_cache.COND_ONLY)),
      "seconds_per_video": seconds,
      "other_load": other,
      "psnr": float(np.mean([psnr(f, r) for f, r in zip(frames, reference)])),
      "ssim": float(np.mean([ssim(f, r) for f, r in zip(frames, reference)])),
      "accuracy": acc,
      "pixel_similarity": float(np.mean([evaluate.pixel_similarity(f).mean() for f in frames])),
      "videos": len(jobs),
    }
    rows.append(row)
    log(
      f"demo {name:<22} calls {row['calls']:5.0f}  {seconds:6.3f} s/video  PSNR {row['psnr']:6.2f}  "
      f"SSIM {row['ssim']:.4f}  colour {acc['color']:.2f} shape {acc['shape']:.2f} motion {acc['motion']:.2f} "
      f"all {acc['all']:.2f}  adj. frames {row['pixel_similarity']:.4f}  other load {other:.1%}"
    )
  if picture_path:
    picture(picture_path, firsts, prompts[0])
  base = rows[0]
  for row in rows:
    row["speedup"] = base["seconds_per_video"] / row["seconds_per_video"]
    n = row["videos"]
    row["within_one_se"] = {
      k: bool(
        abs(row["accuracy"][k] - base["accuracy"][k])
        <= np.sqrt(base["accuracy"][k] * (1 - base["accuracy"][k]) / n) + 1e-12
      )
      for k in ("color", "shape", "motion", "all")
    }
  return rows


def small_part(settings_list, steps):
  import jax
  from reference_models import tiny_cogvideox_folder

  from repvideo_jax import pipeline, step_cache
  from repvideo_jax.demo import demo_model_dir

  overrides = SMALL_CONFIG[0]  # bench_sampling's "small" CogVideoX: 8 layers, width 256
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root, _ = tiny_cogvideox_folder(pathlib.Path(tmp), seed=0, **overrides)
    pipe = pipeline.load_pipeline(root)
    _, frames, height, width = SMALL_CONFIG
    plain = pipeline.GenerationSettings(
      num_frames=frames, height=height, width=width, steps=steps, guidance=6.0
    )
    # Random weights change their residual by 50-100% per step, so their own calibration would skip
    # nothing: use the demo model's (trained weights), so the plans, and hence the work skipped, are
    # the demo model's. The quality column means little here; time and calls are the point.
    changes = step_cache.calibration_for(demo_model_dir(), plain.sampler, steps)
    step_cache.write_calibration(
      root, plain.sampler, steps, {"changes": changes.tolist(), "from": "demo model"}
    )
    text = pipe.encode_prompts(["a cat"])
    reference = None
    for name in settings_list:
      settings = dataclasses.replace(plain, step_cache=None if name == "none" else name)
      plan = pipeline.step_cache_plan(pipe, settings)
      codes = np.zeros(steps, np.int32) if plan is None else plan
      pipeline.sample_latents(pipe, text, settings)  # compile
      load = OtherLoad()
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        latents = jax.block_until_ready(pipeline.sample_latents(pipe, text, settings))
        times.append(time.perf_counter() - t0)
      other = load.value()
      if reference is None:
        reference = np.asarray(latents)
      err = float(np.sqrt(np.mean((np.asarray(latents) - reference) ** 2)) / np.sqrt(np.mean(reference**2)))
      row = {
        "setting": name,
        "calls": step_cache.transformer_calls(codes, True),
        "seconds": float(np.median(times)),
        "latent_rel_rmse": err,
        "other_load": other,
      }
      rows.append(row)
      log(
        f"small {name:<22} calls {row['calls']:5.0f}  {row['seconds']:6.3f} s  latent rel. RMSE {err:.4f}  other load {other:.1%}"
      )
  for row in rows:
    row["speedup"] = rows[0]["seconds"] / row["seconds"]
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--settings", default=DEFAULT_SETTINGS, help="comma-separated --step-cache settings; first = reference"
  )
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--sampler", choices=["dpmpp2m", "ddim"], default=None, help="default: the demo model's")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--small-steps", type=int, default=50)
  p.add_argument("--skip-small", action="store_true")
  p.add_argument("--skip-demo", action="store_true")
  p.add_argument("--max-load", type=float, default=0.05)
  p.add_argument("--json", default=None)
  p.add_argument("--picture", default=None, help="PNG of the first video's frames under each setting")
  args = p.parse_args(argv)
  settings_list = args.settings.split(",")
  if settings_list[0] != "none":
    settings_list = ["none", *settings_list]
  result = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine()}
  if not args.skip_demo:
    result["demo"] = demo_part(settings_list, args.seeds, args.batch_size, args.picture, args.sampler)
  try:
    with open("/proc/cpuinfo") as f:
      result["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  if not args.skip_small:
    result["small"] = small_part(settings_list, args.small_steps)
  loads = [r["other_load"] for part in ("demo", "small") for r in result.get(part, [])]
  result["max_other_load"] = max(loads)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  if max(loads) > args.max_load:
    log(
      f"other processes used up to {max(loads):.1%} of the CPU (> {args.max_load:.0%}): not a result, rerun idle"
    )
    return 1
  return 0


if __name__ == "__main__":
  host_memory_setup()  # ours and torch alike, before JAX starts
  sys.exit(main())
