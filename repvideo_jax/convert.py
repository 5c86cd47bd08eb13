"""Convert checkpoints into our format once, so later loads are fast and torch-free.

    python -m repvideo_jax.convert transformer  --src PATH --dst DIR [--feature-cache] [--set key=value]
    python -m repvideo_jax.convert text_encoder --src PATH --dst DIR
    python -m repvideo_jax.convert vae          --src PATH --dst DIR
    python -m repvideo_jax.convert pipeline     --src COGVIDEOX_DIR [--repvideo SAT_CKPT] --dst DIR
    python -m repvideo_jax.convert run          --src RUN_DIR --dst DIR [--step N] [--no-ema]
    python -m repvideo_jax.convert lora         --src LORA --dst PATH [--to peft|ours] [--base MODEL]

transformer: a diffusers folder (``config.json`` + safetensors, single or sharded, or a pipeline
folder with ``transformer/``), an official SAT checkpoint (folder with ``latest`` or
``<iter>/mp_rank_00_model_states.pt``, or the ``.pt`` file), or a folder we converted earlier.
text_encoder: a Hugging Face T5 folder (CogVideoX-2b's ``text_encoder/``). vae: a diffusers
``vae/`` folder or the SAT ``3d-vae.pt``. pipeline: a whole diffusers CogVideoX-2b folder
(``transformer/ vae/ text_encoder/ tokenizer/ scheduler/``), optionally with the RepVideo SAT
transformer replacing the CogVideoX one; writes one folder that ``repvideo_jax`` loads in one call.
run: the transformer trained by ``train.py`` (its ``run.output_dir``), from the last checkpoint (or
``--step``), its EMA weights when the run kept them (``--no-ema`` for the raw ones).
lora: a LoRA between our folder format and diffusers' ``pytorch_lora_weights.safetensors`` (default:
to the other format); ``--base`` (a model or transformer folder) checks it against that transformer
and records it in our ``adapter.json``.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import sys
import time

import jax

from repvideo_jax import lora, pipeline, text_encoder_weights, transformer_weights, vae_weights
from repvideo_jax.config import load_section, parse_override
from repvideo_jax.outputs import staged_dir
from repvideo_jax.training import trainer
from repvideo_jax.weights_common import nonfinite

COMPONENT_MODULES = {  # each weights module's COMPONENT names its config class
  "transformer": transformer_weights,
  "text_encoder": text_encoder_weights,
  "vae": vae_weights,
}


def _overrides(items) -> dict:
  out = {}
  for text in items or ():
    path, value = parse_override(text)
    out[".".join(path)] = value
  return out


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def convert_component(
  component: str, src, dst, *, overrides=None, overwrite=False, config_preset: str | None = None
):
  """Loads ``component`` from any supported source and writes it in our format. Returns its config."""
  weights = COMPONENT_MODULES[component]
  overrides = dict(overrides or {})
  config = None
  if config_preset:
    config = load_section(
      weights.COMPONENT.config_cls, component, config_preset, [f"{k}={v}" for k, v in overrides.items()]
    )
    overrides = {}
  start = time.time()
  fmt = weights.detect_format(src)
  _say(f"{component}: reading {fmt} checkpoint from {src}")
  kwargs = {"progress": True} if component == "transformer" else {}
  cfg, params = weights.load(src, config, **kwargs, **overrides)
  bad = nonfinite(params)
  if bad:
    _say(
      f"{component}: WARNING: {len(bad)} tensor(s) hold NaN or inf values: {', '.join(bad[:8])}"
      f"{' ...' if len(bad) > 8 else ''}; the source checkpoint is probably damaged"
    )
  weights.save(dst, cfg, params, source=f"{fmt}:{src}", overwrite=overwrite)
  n = sum(a.size for a in jax.tree.leaves(params))
  _say(f"{component}: wrote {dst}: {n / 1e6:.1f}M params ({time.time() - start:.1f}s)")
  return cfg


def convert_pipeline(src, dst, *, repvideo=None, overwrite=False, transformer_overrides=None):
  """A whole diffusers CogVideoX folder (+ optional RepVideo SAT transformer) -> one folder of ours."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  for sub in ("vae", "text_encoder", "tokenizer") + (() if repvideo else ("transformer",)):
    if not (src / sub).is_dir():
      raise FileNotFoundError(
        f"{src} is not a CogVideoX pipeline folder: missing {sub}/ "
        f"(found {sorted(p.name for p in src.iterdir()) if src.is_dir() else 'nothing'})"
      )
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
  # The new folder is built beside the old one and swapped in only when complete: a bad source
  # fails before anything at --dst is touched.
  t_src = repvideo or src / "transformer"
  with staged_dir(dst) as tmp:  # dst appears (or is replaced) only when complete
    convert_component("transformer", t_src, tmp / "transformer", overrides=transformer_overrides)
    convert_component("text_encoder", src / "text_encoder", tmp / "text_encoder")
    convert_component("vae", src / "vae", tmp / "vae")
    shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    if (src / "scheduler").is_dir():
      shutil.copytree(src / "scheduler", tmp / "scheduler")
    pipeline.write_manifest(tmp, source={"pipeline": str(src), "transformer": str(t_src)})
  _say(f"pipeline: wrote {dst}")


def convert_lora(src, dst, *, to: str | None = None, base=None, overwrite: bool = False) -> pathlib.Path:
  """A LoRA from either format to ``to`` (default: the other one). Returns what was written."""
  fmt, _ = lora.detect_format(src)
  to = to or ("ours" if fmt == "peft" else "peft")
  tcfg = None
  if base is not None:
    tcfg = transformer_weights.read_config(base)
    if tcfg is None:  # a SAT checkpoint: its config comes from the weights
      tcfg, _ = transformer_weights.load(base)
  loaded = lora.load(src, tcfg)
  described = loaded.base
  if tcfg is not None:
    described = lora.base_description(tcfg, base)
  out = lora.save(dst, loaded.lora, loaded.config, fmt=to, base=described, overwrite=overwrite)
  _say(
    f"lora: wrote {out} ({to}; rank {loaded.config.rank}, alpha {loaded.config.lora_alpha:g}, "
    f"targets {', '.join(loaded.config.targets)})"
  )
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m repvideo_jax.convert",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="component", required=True)
  for name, help_text in (
    ("transformer", "the diffusion transformer (diffusers, SAT or ours)"),
    ("text_encoder", "the T5 encoder (Hugging Face folder)"),
    ("vae", "the 3D causal VAE (diffusers folder or SAT 3d-vae.pt)"),
  ):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--src", required=True, help="checkpoint folder or file")
    p.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--config", help="preset name or YAML file to use instead of the checkpoint's config")
    p.add_argument(
      "--set",
      action="append",
      metavar="KEY=VALUE",
      help="override a config field, e.g. --set param_dtype=bfloat16",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    if name == "transformer":
      p.add_argument(
        "--feature-cache",
        dest="feature_cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force the RepVideo cache on/off (on for a diffusers "
        "CogVideoX-2B checkpoint adds gates initialised to 0.5)",
      )
  p = sub.add_parser("pipeline", help="a whole CogVideoX folder (+ RepVideo SAT transformer)")
  p.add_argument("--src", required=True, help="diffusers CogVideoX-2b folder")
  p.add_argument("--repvideo", help="RepVideo SAT checkpoint to use as the transformer")
  p.add_argument("--dst", required=True)
  p.add_argument(
    "--feature-cache",
    dest="feature_cache",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="force the transformer's RepVideo cache on/off",
  )
  p.add_argument("--overwrite", action="store_true")
  p = sub.add_parser("run", help="the transformer of a train.py run (its last checkpoint)")
  p.add_argument("--src", required=True, help="the run's output_dir (config.resolved.json + checkpoints/)")
  p.add_argument("--dst", required=True)
  p.add_argument("--step", type=int, help="checkpoint step (default: the last)")
  p.add_argument("--no-ema", dest="ema", action="store_false", help="the raw params, not the EMA")
  p.add_argument(
    "--lora",
    choices=["ours", "peft"],
    help="an optim.train=lora run: write its LoRA in this format (for sample.py --lora) instead of "
    "the transformer with the LoRA merged in",
  )
  p.add_argument("--overwrite", action="store_true")
  p = sub.add_parser("lora", help="a LoRA between our format and diffusers' (peft) safetensors")
  p.add_argument(
    "--src", required=True, help="our LoRA folder, or pytorch_lora_weights.safetensors (or its folder)"
  )
  p.add_argument("--dst", required=True, help="output folder (or a .safetensors path with --to peft)")
  p.add_argument(
    "--to", choices=["peft", "ours"], default=None, help="target format (default: the other one)"
  )
  p.add_argument("--base", help="model or transformer folder the LoRA is for: checked and recorded")
  p.add_argument("--overwrite", action="store_true")
  return parser


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
  args = build_parser().parse_args(argv)
  try:
    if args.component == "run" and args.lora:
      written = trainer.export_lora(
        args.src,
        args.dst,
        fmt=args.lora,
        step=args.step,
        use_ema=None if args.ema else False,
        overwrite=args.overwrite,
      )
      _say(f"run: wrote the LoRA {written}")
    elif args.component == "run":
      trainer.export_transformer(
        args.src, args.dst, step=args.step, use_ema=None if args.ema else False, overwrite=args.overwrite
      )
      _say(f"run: wrote {args.dst}")
    elif args.component == "lora":
      convert_lora(args.src, args.dst, to=args.to, base=args.base, overwrite=args.overwrite)
    elif args.component == "pipeline":
      t_over = {} if args.feature_cache is None else {"feature_cache": args.feature_cache}
      convert_pipeline(
        args.src, args.dst, repvideo=args.repvideo, overwrite=args.overwrite, transformer_overrides=t_over
      )
    else:
      overrides = _overrides(args.set)
      if getattr(args, "feature_cache", None) is not None:
        overrides["feature_cache"] = args.feature_cache
      convert_component(
        args.component,
        args.src,
        args.dst,
        overrides=overrides,
        overwrite=args.overwrite,
        config_preset=args.config,
      )
  except (FileNotFoundError, FileExistsError, ValueError, KeyError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
