"""Peak device memory of each generation stage of the 2B model, per memory setting: compiler figures.

    .venv/bin/python benchmarks/memory_plan.py --json benchmarks/results_memory_plan.json
    .venv/bin/python benchmarks/memory_plan.py --targets v5e:1x1 --settings default   # one column

For 49 x 480 x 720, batch 1, CFG, RepVideo-2B (`configs/sample-2b-v5e-b1.yaml`: bfloat16 weights and
compute), each stage is compiled on its own by ``repvideo_jax.aot.compile_sample`` -- for one TPU v5e
chip (libtpu, deviceless) and for XLA:CPU -- and nothing is run: these are compiler estimates. A
stage's peak is its program (its own weights, activations, outputs) plus the weights of the models
the setting's offload mode keeps on the device during that stage (``memory.resident_during``):

- ``default``: what sample.py does on a 16 GB device with no memory flags: offload auto (chosen by
  ``memory.choose_offload`` from the weights and the device size), VAE tiling auto (the untiled
  decode is compiled too: when it does not fit, auto tiles; when even the tile step does not fit
  beside the models kept on the device, they move out first, as ``Residency.make_room`` does);
- ``low-memory``: ``--low-memory`` (offload stage, VAE tiles, T5 in bfloat16);
- ``low-memory-int8``: ``--low-memory --quantize text-encoder``;
- ``int8-all``: offload auto with ``--quantize all``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys

import benchutil
import jax

from repvideo_jax import aot, memory, pipeline, quantize
from repvideo_jax import text_encoder as TE
from repvideo_jax import transformer as T
from repvideo_jax import vae as V

GIB = 1 << 30
SETTINGS = {
  "default": dict(offload="auto", tiling="auto", quantize="none"),
  "low-memory": dict(offload="stage", tiling="on", quantize="none"),
  "low-memory-int8": dict(offload="stage", tiling="on", quantize="text-encoder"),
  "int8-all": dict(offload="auto", tiling="auto", quantize="all"),
}
CAPACITY_16GB = 15.75 * GIB  # a v5e chip as its compiler reports it; a 16 GB GPU holds about as much


def weights_bytes(spec) -> dict[str, int]:
  """Bytes of each model's weights under ``spec`` (int8 layer kernels as stored)."""
  tcfg, t5, vcfg = aot._sample_configs(spec)
  int8 = quantize.CHOICES[spec.quantize]
  out = {}
  for name, abstract in (
    ("text_encoder", TE.abstract_params(t5)),
    ("transformer", T.abstract_params(tcfg)),
    ("vae", V.abstract_params(vcfg)),
  ):
    if name in int8:
      abstract = jax.eval_shape(lambda p: quantize.quantize_params(p, to_host=False), abstract)
    out[name] = memory.tree_bytes(abstract)
  return out


_COMPILED: dict = {}


def compiled(spec, stage: str):
  """The report of one stage's program (the largest step for the streamed VAE decode), compiled once
  per distinct program: settings that share a program share its compilation."""
  int8 = quantize.CHOICES[spec.quantize]
  key = (spec.topology, stage, spec.vae_tiling if stage == "vae_decode" else None)
  key += (("text_encoder" in int8) if stage == "text_encoder" else ("transformer" in int8),)
  if key not in _COMPILED:
    reports = aot.compile_sample(spec, (stage,), name=spec.topology)
    _COMPILED[key] = max(reports, key=lambda r: r.total_bytes)
  return _COMPILED[key]


def plan(target: str, setting: str, base: str) -> dict:
  cfg = SETTINGS[setting]
  spec = pipeline.load_sampling_preset(base)
  spec = dataclasses.replace(spec, topology=target, quantize=cfg["quantize"], vae_tiling=False)
  weights = weights_bytes(spec)
  offload = cfg["offload"]
  if offload == "auto":
    offload = memory.choose_offload(weights, CAPACITY_16GB)
  resident = memory.resident_during(offload)
  rows = []
  reports = [compiled(spec, stage) for stage in ("text_encoder", "denoise", "vae_decode")]
  untiled = reports[-1]
  tiling = cfg["tiling"]
  if tiling == "auto":  # as pipeline.decode_latents: untiled when it fits the free memory
    free = CAPACITY_16GB - sum(weights[c] for c in resident["vae"] if c != "vae")
    tiling = "off" if untiled.total_bytes <= (1 - memory.RESERVE) * free else "on"
  if tiling == "on":
    decode = compiled(dataclasses.replace(spec, vae_tiling=True), "vae_decode")
  else:
    decode = untiled
  moved = []
  for stage, report in zip(("text_encoder", "transformer", "vae"), (reports[0], reports[1], decode)):
    others = sum(weights[c] for c in resident[stage] if c != stage)
    if stage == "vae" and cfg["tiling"] == "auto":  # as decode_latents: Residency.make_room
      need = report.total_bytes - weights["vae"]
      if need > (1 - memory.RESERVE) * (CAPACITY_16GB - weights["vae"] - others):
        moved, others = [c for c in resident["vae"] if c != "vae"], 0
    rows.append(
      dict(
        stage={"text_encoder": "text encoding", "transformer": "sampling (one CFG step)", "vae": "decoding"}[
          stage
        ],
        program=report.name,
        program_gib=round(report.total_bytes / GIB, 2),
        temp_gib=round(report.temp_bytes / GIB, 2),
        other_weights_gib=round(others / GIB, 2),
        peak_gib=round((report.total_bytes + others) / GIB, 2),
        compile_s=report.compile_s,
      )
    )
  return dict(
    target=target,
    setting=setting,
    offload=offload,
    vae_tiling=tiling,
    untiled_decode_gib=round(untiled.total_bytes / GIB, 2),
    moved_out_for_decode=moved,
    quantize=cfg["quantize"],
    weights_gib={k: round(v / GIB, 2) for k, v in weights.items()},
    stages=rows,
    peak_gib=max(r["peak_gib"] for r in rows),
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--targets", default="v5e:1x1,cpu", help="comma list: libtpu topologies and/or cpu")
  p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {list(SETTINGS)}")
  p.add_argument("--preset", default="sample-2b-v5e-b1", help="the sampling preset the settings start from")
  p.add_argument("--json", help="write the results here")
  args = p.parse_args(argv)
  results = []
  for target in args.targets.split(","):
    for setting in args.settings.split(","):
      r = plan(target.strip(), setting.strip(), args.preset)
      results.append(r)
      print(
        f"{r['target']:8} {r['setting']:16} offload {r['offload']:5} tiles {r['vae_tiling']:3} "
        f"peak {r['peak_gib']:6.2f} GiB | "
        + " | ".join(
          f"{s['stage']} {s['peak_gib']:.2f} ({s['program_gib']:.2f} + {s['other_weights_gib']:.2f})"
          for s in r["stages"]
        ),
        flush=True,
      )
  if args.json:
    out = dict(
      date=datetime.date.today().isoformat(),
      host_cpu=benchutil.cpu_model(),
      note="compiler estimates (libtpu deviceless for TPU targets, XLA:CPU for cpu); nothing was run. "
      "peak = the stage's program (its own weights, activations, outputs) + the other models' weights "
      "the offload mode keeps on the device during that stage",
      jax=jax.__version__,
      results=results,
    )
    pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
