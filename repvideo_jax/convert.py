"""Convert checkpoints into our format once, so later loads are fast and torch-free.

    python -m repvideo_jax.convert transformer --src PATH --dst DIR [--feature-cache] [--set key=value]

PATH may be a diffusers folder (``config.json`` + safetensors, single or sharded, or a pipeline
folder with ``transformer/``), an official SAT checkpoint (folder with ``latest`` or
``<iter>/mp_rank_00_model_states.pt``, or the ``.pt`` file), or a folder we converted earlier.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from repvideo_jax.config import parse_override


def _overrides(items):
  out = {}
  for text in items or ():
    path, value = parse_override(text)
    out[".".join(path)] = value
  return out


def convert_transformer(args) -> None:
  from repvideo_jax import transformer_weights as W
  overrides = _overrides(args.set)
  if args.feature_cache is not None:
    overrides["feature_cache"] = args.feature_cache
  if args.param_dtype:
    overrides["param_dtype"] = args.param_dtype
  config = None
  if args.config:
    from repvideo_jax.config import load_section
    from repvideo_jax.transformer import TransformerConfig
    config = load_section(TransformerConfig, "transformer", args.config,
                          [f"{k}={v}" for k, v in overrides.items()])
    overrides = {}
  start = time.time()
  fmt = W.detect_format(args.src)
  print(f"reading {fmt} checkpoint from {args.src}", file=sys.stderr)
  cfg, params = W.load(args.src, config, progress=True, **overrides)
  W.save(args.dst, cfg, params, source=f"{fmt}:{args.src}", overwrite=args.overwrite)
  n = sum(a.size for a in __import__("jax").tree.leaves(params))
  print(f"wrote {args.dst}: {n / 1e6:.1f}M params, {cfg.num_layers} layers, "
        f"feature_cache={cfg.feature_cache} ({time.time() - start:.1f}s)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m repvideo_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="component", required=True)
  t = sub.add_parser("transformer", help="the diffusion transformer (diffusers, SAT or ours)")
  t.add_argument("--src", required=True, help="checkpoint folder or SAT .pt file")
  t.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
  t.add_argument("--config", help="preset name or YAML file to use instead of the checkpoint's config")
  t.add_argument("--feature-cache", dest="feature_cache", action=argparse.BooleanOptionalAction,
                 default=None, help="force the RepVideo cache on/off (on for a diffusers CogVideoX-2B "
                 "checkpoint adds gates initialised to 0.5)")
  t.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"],
                 help="storage dtype of the converted weights (default float32)")
  t.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="override a TransformerConfig field, e.g. --set dtype=bfloat16")
  t.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  t.set_defaults(func=convert_transformer)
  return parser


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (FileNotFoundError, FileExistsError, ValueError, KeyError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
