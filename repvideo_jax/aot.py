"""Ahead-of-time compilation for TPU topologies: does a run fit, before it starts? No TPU, no weights.

    python -m repvideo_jax.aot train --config train-tpu-v5p-64 [--topology v5p:4x4x2] [key=value ...]
    python -m repvideo_jax.aot sample --preset sample-2b-v5e-b1
    python -m repvideo_jax.aot sample --model-config repvideo-2b --topology v5e:2x2 \\
        [--frames 49 --height 480 --width 720 --batch 1 --mesh data=2,context=2]

libtpu compiles for a named topology on any machine (deviceless): the program is lowered with
``jax.ShapeDtypeStruct`` inputs that carry the run's shardings, compiled by the real TPU compiler and
never executed. Printed per chip: arguments, temporaries, output, aliased bytes, their total, the
chip's HBM as the compiler reports it, fits yes/no and headroom, compile time, the model FLOPs of one
step, and the step time at which MFU would be 40% and 60%. These are compiler figures, not measured
step times. ``--json FILE`` writes the same. Exit status: 0 every program fits, 1 one does not, 2 bad
arguments (an unknown topology lists the valid forms).

``train`` compiles the training step of a preset (``trainer.build_train_step``: the same jit,
shardings and donation that ``train.py`` runs). ``sample`` compiles the three stages of generation
separately -- T5 prompt encoding, one denoising step with CFG (the body of the sampler's loop), and
the VAE decode of one video -- each with the mesh the sampling preset names.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from repvideo_jax import config as config_lib
from repvideo_jax import memory, outputs, pipeline, quantize, samplers, sharding
from repvideo_jax import text_encoder as TE
from repvideo_jax import transformer as T
from repvideo_jax import vae as V
from repvideo_jax.attention import check_head_split
from repvideo_jax.pipeline import SamplingPreset
from repvideo_jax.training import trainer
from repvideo_jax.training.trainer import model_flops_per_sample

# Dense bf16 peak per chip (TFLOP/s), from the TPU product pages; the MFU denominators.
PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
# Chips per topology axis: 3D tori for v4/v5p, 2D for v5e/v6e.
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
TOPOLOGY_FORMS = (
  "v5p:2x2x1",
  "v5p:2x2x2",
  "v5p:4x4x2",
  "v5p:4x4x4",
  "v4:2x2x2",
  "v5e:1x1",
  "v5e:2x2",
  "v5e:4x4",
  "v6e:1x1",
  "v6e:2x2",
  "v6e:4x4",
)
_GIB = 1 << 30


# ----------------------------------------------------------------------------------------------
# Topologies.


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """``'v5p:4x4x2'`` -> ('v5p', (4, 4, 2)); anything else is a ValueError listing the valid forms."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", name or "")
  dims = tuple(int(d) for d in m.group(2).split("x")) if m else ()
  if not m or len(dims) != _DIMS[m.group(1)] or min(dims) < 1:
    raise ValueError(
      f"unknown TPU topology {name!r}: use <generation>:<chips per axis>, AxBxC for v4/v5p and AxB "
      f"for v5e/v6e, as libtpu names them, e.g. {', '.join(TOPOLOGY_FORMS)}"
    )
  return m.group(1), dims


@functools.lru_cache(maxsize=16)
def topology_devices(name: str) -> tuple:
  """The abstract TPU devices of a topology (libtpu, no TPU needed). One chip (``v5e:1x1``, which
  libtpu's default host bounds refuse) is the first chip of the smallest multi-chip topology."""
  generation, dims = parse_topology(name)
  # A deviceless compile touches no chip, so several processes may load libtpu at once (tests, CI,
  # a benchmark beside a shell); libtpu's single-process lock is for real chips.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  count = int(np.prod(dims))
  libtpu_name = name if count > 1 else f"{generation}:" + "x".join(["2", "2"] + ["1"] * (len(dims) - 2))
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name)
  except Exception as e:  # libtpu missing, or a shape it does not build
    hint = (
      "install libtpu: pip install -r requirements-tpu.txt"
      if "libtpu" in str(e).lower() or "tpu" not in str(e).lower()
      else f"valid forms: {', '.join(TOPOLOGY_FORMS)}"
    )
    raise ValueError(f"cannot build TPU topology {name!r}: {str(e).splitlines()[0]} ({hint})") from None
  devices = tuple(topo.devices)[:count]
  if len(devices) != count:
    raise ValueError(f"TPU topology {name!r} gave {len(devices)} devices, expected {count}")
  return devices


def device_memory_bytes(device) -> float:
  """Memory one device can hold: the compiler's HBM figure for TPUs (real or abstract), the runtime's
  limit where it reports one (GPUs), the host's RAM for CPU devices."""
  if device.platform == "tpu":
    return memory._compiler_hbm_bytes(device.device_kind, device)
  return memory.device_memory_bytes(device)


def generation_of(device) -> str | None:
  """'v5p', 'v5e', 'v6e', 'v4' from a TPU device kind ('TPU v5', 'TPU v5 lite', 'TPU v6 lite', ...)."""
  kind = device.device_kind.lower()
  if device.platform != "tpu":
    return None
  if "v6" in kind:
    return "v6e"
  if "v5" in kind:
    return "v5e" if "lite" in kind or "v5e" in kind else "v5p"
  return "v4" if "v4" in kind else None


# ----------------------------------------------------------------------------------------------
# One compiled program -> one report row.


@dataclasses.dataclass
class Report:
  """Compiler figures of one program on one topology; bytes are per chip."""

  name: str
  topology: str
  chips: int
  mesh: dict[str, int]
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int  # arguments + outputs - aliased + temporaries + generated code
  hbm_bytes: float
  fits: bool
  headroom: float  # 1 - total / HBM
  compile_s: float
  model_flops: float | None  # per step, all chips together (analytic, as the MFU numerator)
  compiler_flops_per_chip: float | None  # XLA's cost analysis; Pallas kernels are not counted
  peak_tflops_per_chip: float | None
  step_s_at_mfu_40: float | None
  step_s_at_mfu_60: float | None
  mosaic_kernels: int = 0  # Pallas/Mosaic custom calls in the compiled program (splash attention)
  notes: str = ""

  def lines(self) -> list[str]:
    g = lambda b: f"{b / _GIB:.2f} GiB"
    out = [
      f"{self.name} on {self.topology} ({self.chips} chip{'s' if self.chips > 1 else ''}), mesh {self.mesh}",
      f"  per chip: arguments {g(self.argument_bytes)}, temporaries {g(self.temp_bytes)}, "
      f"output {g(self.output_bytes)}, aliased {g(self.alias_bytes)}, code {g(self.code_bytes)}",
      f"  total {g(self.total_bytes)} of {g(self.hbm_bytes)} HBM: "
      f"{'fits' if self.fits else 'DOES NOT FIT'}, headroom {100 * self.headroom:.1f}%",
      f"  compile {self.compile_s:.1f} s; Mosaic kernel calls in the program: {self.mosaic_kernels}",
    ]
    if self.model_flops:
      out.append(
        f"  model FLOPs per step {self.model_flops:.3e}; 40% MFU = {self.step_s_at_mfu_40:.3f} s/step, "
        f"60% MFU = {self.step_s_at_mfu_60:.3f} s/step (at {self.peak_tflops_per_chip:g} "
        "TFLOP/s per chip; compiler estimate, not a measured time)"
      )
    if self.notes:
      out.append(f"  {self.notes}")
    return out


def compile_report(
  name: str,
  topology: str,
  mesh,
  lower: Callable[[], Any],
  *,
  model_flops: float | None = None,
  peak_tflops: float | None = None,
  notes: str = "",
) -> Report:
  """Lowers (under ``jax.set_mesh(mesh)``) and compiles; reads the compiler's memory analysis.
  A program too large for the chip is a report with ``fits=False``, not an exception. ``topology``
  names where it compiles for (a libtpu topology, or a description of real devices)."""
  device = np.asarray(mesh.devices).flat[0]
  hbm = device_memory_bytes(device)
  peak = peak_tflops or PEAK_TFLOPS.get(generation_of(device))
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = lower().compile()
  except Exception as e:
    m = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\) exceeds available HBM", str(e), re.S)
    if not m:
      raise
    need = float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)
    return _report(
      name,
      topology,
      mesh,
      dict(temp=int(need)),
      hbm,
      time.perf_counter() - t0,
      model_flops,
      None,
      peak,
      notes or "temporaries alone exceed HBM (compiler)",
    )
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  sizes = dict(
    argument=mem.argument_size_in_bytes,
    output=mem.output_size_in_bytes,
    alias=mem.alias_size_in_bytes,
    temp=mem.temp_size_in_bytes,
    code=mem.generated_code_size_in_bytes,
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else None
  report = _report(name, topology, mesh, sizes, hbm, seconds, model_flops, flops, peak, notes)
  report.mosaic_kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  return report


def _report(name, topology, mesh, sizes, hbm, seconds, model_flops, compiler_flops, peak, notes):
  s = {k: int(sizes.get(k, 0)) for k in ("argument", "output", "alias", "temp", "code")}
  total = s["argument"] + s["output"] - s["alias"] + s["temp"] + s["code"]
  chips = int(mesh.devices.size)
  at = lambda mfu: model_flops / (chips * peak * 1e12 * mfu) if model_flops and peak else None
  return Report(
    name=name,
    topology=topology,
    chips=chips,
    mesh=dict(mesh.shape),
    argument_bytes=s["argument"],
    output_bytes=s["output"],
    alias_bytes=s["alias"],
    temp_bytes=s["temp"],
    code_bytes=s["code"],
    total_bytes=total,
    hbm_bytes=hbm,
    fits=total <= hbm,
    headroom=1.0 - total / hbm,
    compile_s=round(seconds, 2),
    model_flops=model_flops,
    compiler_flops_per_chip=compiler_flops,
    peak_tflops_per_chip=peak,
    step_s_at_mfu_40=at(0.4),
    step_s_at_mfu_60=at(0.6),
    notes=notes,
  )


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------
# Training.


def compile_train(preset: str, overrides=(), topology: str | None = None) -> Report:
  """Compiles a training preset's step for its topology (``mesh.topology`` unless ``topology``)."""
  cfg = trainer.load_config(preset, overrides)
  topology = topology or cfg.mesh.topology
  if not topology:
    raise ValueError(f"preset {preset!r} names no mesh.topology: pass --topology (e.g. v5p:4x4x2)")
  return compile_train_config(cfg, topology_devices(topology), topology, name=f"train {preset}")


def compile_train_config(cfg, devices, where: str, name: str = "train") -> Report:
  """Compiles the train step of a ``TrainConfig`` on ``devices`` (abstract or real); runs nothing."""
  mesh = sharding.build_mesh(cfg.mesh, devices)
  with sharding.activate(mesh, cfg.mesh.logical_axis_rules):
    step = trainer.build_train_step(cfg, mesh)  # its step traces under these rules wherever lowered
  shapes = trainer.batch_shapes(cfg)
  flops = (
    trainer.model_flops_per_sample(cfg.transformer, shapes["latents"][1:], shapes["text"][1])
    * cfg.run.global_batch
  )
  peak = None if devices[0].platform == "tpu" else cfg.run.peak_tflops_per_device
  return compile_report(
    f"{name} (global batch {cfg.run.global_batch}, remat {cfg.transformer.remat})",
    where,
    mesh,
    lambda: step.fn.lower(*trainer.abstract_inputs(step, cfg)),
    model_flops=flops,
    peak_tflops=peak,
  )


# ----------------------------------------------------------------------------------------------
# Sampling: T5 encoding, one denoising step with CFG, VAE decode of one video.


def _sample_configs(spec: SamplingPreset):
  tcfg = config_lib.load_section(T.TransformerConfig, "transformer", spec.model_config)
  tcfg = dataclasses.replace(tcfg, **(spec.transformer or {}))
  if spec.topology == "cpu" and tcfg.attention_backend == "splash":  # a TPU kernel: XLA's on CPU
    tcfg = dataclasses.replace(tcfg, attention_backend="xla")
  t5 = dataclasses.replace(TE.T5Config(max_length=tcfg.text_length), **(spec.text_encoder or {}))
  vcfg = dataclasses.replace(V.VAEConfig(), **(spec.vae or {}))
  return tcfg, t5, vcfg


def compile_sample(
  spec: SamplingPreset, stages=("text_encoder", "denoise", "vae_decode"), name: str = "sample"
) -> list[Report]:
  """Compiles the sampling stages of ``spec`` for its topology; one report per stage."""
  if not spec.topology:
    raise ValueError("no topology: pass --topology (e.g. v5e:2x2) or a preset that names one")
  tcfg, t5, vcfg = _sample_configs(spec)
  # "cpu": XLA:CPU's figures for the same programs (this machine's first CPU device)
  devices = tuple(jax.devices("cpu")[:1]) if spec.topology == "cpu" else topology_devices(spec.topology)
  layout = spec.mesh or pipeline.default_sample_mesh(len(devices), spec.batch, spec.use_guidance)
  mesh = sharding.make_mesh(devices=devices, **layout)
  check_head_split(
    tcfg.num_heads,
    sharding.logical_size(mesh, "activation_heads"),
    sharding.logical_size(mesh, "activation_length"),
  )
  replicated = NamedSharding(mesh, PartitionSpec())
  b = spec.batch
  batch_sh = sharding.batch_sharding(mesh, b)
  latent = (b, *vcfg.latent_size(spec.frames, spec.height, spec.width), tcfg.in_channels)
  sizes = f"{spec.frames}x{spec.height}x{spec.width}, batch {b}"
  reports = []
  int8 = quantize.CHOICES[spec.quantize]

  def weights(abstract, axes, name):  # int8 layer kernels are replicated (their scales lack axes)
    if name in int8:
      q = jax.eval_shape(lambda p: quantize.quantize_params(p, to_host=False), abstract)
      return _abstract(q, jax.tree.map(lambda _: replicated, q))
    return _abstract(abstract, sharding.tree_shardings(axes, mesh))

  if "text_encoder" in stages:
    params = weights(TE.abstract_params(t5), TE.logical_axes(t5), "text_encoder")
    ids = jax.ShapeDtypeStruct((b, tcfg.text_length), jnp.int32, sharding=batch_sh)
    flops = 2.0 * b * tcfg.text_length * _param_count(TE.abstract_params(t5))
    reports.append(
      compile_report(
        f"{name}: T5 encode ({t5.dtype}, params {t5.param_dtype}"
        f"{', int8 layers' if 'text_encoder' in int8 else ''}; batch {b})",
        spec.topology,
        mesh,
        lambda: jax.jit(TE.make_apply(t5)).lower(params, ids),
        model_flops=flops,
      )
    )
  if "denoise" in stages:
    params = weights(T.abstract_params(tcfg), T.logical_axes(tcfg), "transformer")
    x = jax.ShapeDtypeStruct(latent, jnp.float32, sharding=batch_sh)
    text = jax.ShapeDtypeStruct((b, tcfg.text_length, tcfg.text_embed_dim), jnp.float32, sharding=batch_sh)
    apply = T.make_apply(tcfg)
    uncond = samplers.unconditional_text if spec.use_guidance else (lambda tx: None)

    def step(params, x, text):  # the sampler's loop body: one network call on [uncond | cond]
      return samplers.guided_denoise(apply, x, 0.5, 0.8, 500.0, text, uncond(text), 6.0, params=params)

    calls = b * (2 if spec.use_guidance else 1)
    flops = model_flops_per_sample(tcfg, latent[1:], tcfg.text_length) / 3.0 * calls
    reports.append(
      compile_report(
        f"{name}: denoising step with{'' if spec.use_guidance else 'out'} CFG ({tcfg.dtype}, params "
        f"{tcfg.param_dtype}{', int8 layers' if 'transformer' in int8 else ''}, attention "
        f"{tcfg.attention_backend}; {sizes})",
        spec.topology,
        mesh,
        lambda: jax.jit(step).lower(params, x, text),
        model_flops=flops,
      )
    )
  if "vae_decode" in stages:
    params = _abstract(V.abstract_params(vcfg), jax.tree.map(lambda _: replicated, V.abstract_params(vcfg)))
    what = f"{vcfg.dtype}; {spec.frames}x{spec.height}x{spec.width}"
    if spec.vae_tiling:  # streamed (vae.decode_streamed): the largest tile-chunk step bounds the memory
      steps = V.streamed_steps(vcfg, latent[1:], V.TilingConfig())
      cache = jax.eval_shape(
        lambda p, z: V.decode_chunk(p, z, None, config=vcfg)[1],
        V.abstract_params(vcfg),
        jax.ShapeDtypeStruct(steps[0][0], jnp.float32),
      )
      for shape, with_cache in steps:
        z = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated)
        c = _abstract(cache, jax.tree.map(lambda _: replicated, cache)) if with_cache else None
        reports.append(
          compile_report(
            f"{name}: VAE decode step, tile {shape[2]}x{shape[3]} latents x {shape[1]} frames"
            f"{' + cache' if with_cache else ''} (streamed, tiled; {what})",
            spec.topology,
            mesh,
            functools.partial(
              lambda z, c: jax.jit(functools.partial(V.decode_chunk, config=vcfg)).lower(params, z, c), z, c
            ),
          )
        )
    else:
      z = jax.ShapeDtypeStruct((1,) + latent[1:], jnp.float32, sharding=replicated)
      decode = functools.partial(V.decode, config=vcfg, chunking="released")
      reports.append(
        compile_report(
          f"{name}: VAE decode of one video (released chunks, one program; {what})",
          spec.topology,
          mesh,
          lambda: jax.jit(decode).lower(params, z),
        )
      )
  return reports


def _param_count(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m repvideo_jax.aot",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  tr = sub.add_parser("train", help="compile a training preset's step")
  tr.add_argument("--config", required=True, help="training preset (configs/train-*.yaml) or YAML path")
  tr.add_argument("--topology", help="TPU topology, e.g. v5p:4x4x2 (default: the preset's mesh.topology)")
  tr.add_argument("overrides", nargs="*", metavar="section.key=value")
  sa = sub.add_parser("sample", help="compile the sampling stages (T5, denoising step, VAE decode)")
  sa.add_argument("--preset", help="sampling preset (configs/sample-*.yaml)")
  sa.add_argument("--model-config", help="transformer preset (default repvideo-2b)")
  sa.add_argument(
    "--topology", help="TPU topology, e.g. v5e:2x2 or v5e:1x1; cpu: XLA:CPU's figures for one CPU device"
  )
  sa.add_argument("--frames", type=int)
  sa.add_argument("--height", type=int)
  sa.add_argument("--width", type=int)
  sa.add_argument("--batch", type=int, help="videos per call")
  sa.add_argument(
    "--mesh", help="data=,fsdp=,tensor=,context= (default: CFG pair x batch over data, the rest over context)"
  )
  sa.add_argument("--vae-tiling", choices=("on", "off"))
  sa.add_argument("--quantize", choices=list(quantize.CHOICES), help="int8 layer kernels (as sample.py)")
  sa.add_argument(
    "--stages",
    default="text_encoder,denoise,vae_decode",
    help="comma-separated subset of text_encoder,denoise,vae_decode",
  )
  for p in (tr, sa):
    p.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
  args = parser.parse_args(argv)
  try:
    if args.json and pathlib.Path(args.json).is_dir():
      raise ValueError(f"--json {args.json} is a folder; give a file path")
    if args.command == "train":
      reports = [compile_train(args.config, args.overrides, args.topology)]
    else:
      stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
      bad = set(stages) - {"text_encoder", "denoise", "vae_decode"}
      if bad or not stages:
        raise ValueError(f"--stages: unknown {sorted(bad)}; use text_encoder, denoise, vae_decode")
      spec = pipeline.load_sampling_preset(args.preset) if args.preset else SamplingPreset()
      given = {
        k: getattr(args, k)
        for k in ("topology", "frames", "height", "width", "batch")
        if getattr(args, k) is not None
      }
      if args.model_config:
        given["model_config"] = args.model_config
      if args.mesh:
        given["mesh"] = sharding.parse_mesh(args.mesh)
      if args.vae_tiling:
        given["vae_tiling"] = args.vae_tiling == "on"
      if args.quantize:
        given["quantize"] = args.quantize
      spec = dataclasses.replace(spec, **given)
      if min(spec.batch, spec.frames, spec.height, spec.width) < 1:
        raise ValueError("--batch, --frames, --height and --width must be positive")
      reports = compile_sample(spec, stages, name=args.preset or "sample")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for r in reports:
    print("\n".join(r.lines()))
  if args.json:
    outputs.atomic_write(args.json, json.dumps([dataclasses.asdict(r) for r in reports], indent=2))
  return 0 if all(r.fits for r in reports) else 1


if __name__ == "__main__":
  sys.exit(main())
