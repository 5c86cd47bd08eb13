"""What int8 weight-only layer kernels (sample.py --quantize) cost in output quality.

    .venv/bin/python benchmarks/quality_int8.py --json benchmarks/results_quality_int8.json

1. 2B-shaped models with random weights: the RepVideo-2B transformer's widths (1920 wide, 30 heads,
   text 4096) and the T5-XXL encoder's (4096 wide, 64 heads, d_ff 10240), each with ``--layers``
   layers, weights drawn at the scale of their initialisers. Relative L2 error of the output, float32
   compute, int8 kernels vs float32 kernels, beside what bfloat16 weights cost on the same model.
2. The bundled demo model: frames of the held-out captions (the same seeds) with int8 kernels in the
   T5 encoder and the transformer vs without: PSNR per video (peak 1.0, frames in [0, 1]).
3. The bundled demo model's held-out evaluation (``repvideo_jax.evaluate``) with and without int8.
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
import jax.numpy as jnp
import numpy as np

from repvideo_jax import config as config_lib
from repvideo_jax import evaluate, pipeline, quantize
from repvideo_jax import text_encoder as TE
from repvideo_jax import transformer as T
from repvideo_jax.demo import demo_model_dir
from repvideo_jax.demo import domain as D


def _random_like(abstract, seed: int):
  """Weights at their initialisers' scale: 1/sqrt(fan_in) for matrices, 1 + small noise for norm
  scales, small values for biases and gates."""
  rng = np.random.default_rng(seed)

  def one(path, a):
    name = jax.tree_util.keystr(path)
    shape = a.shape
    if len(shape) >= 2:
      fan_in = shape[-2]
      return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    if "scale" in name:
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, abstract)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def shaped_2b(layers: int) -> dict:
  out = {}
  tcfg = config_lib.load_section(T.TransformerConfig, "transformer", "repvideo-2b")
  tcfg = dataclasses.replace(tcfg, num_layers=layers, dtype="float32", param_dtype="float32")
  params = _random_like(T.abstract_params(tcfg), 0)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 3, 16, 16, tcfg.in_channels)).astype(np.float32)  # 3 x 32 x 32 latents
  text = rng.standard_normal((1, tcfg.text_length, tcfg.text_embed_dim)).astype(np.float32)
  t = np.array([500.0], np.float32)
  fn = jax.jit(T.make_apply(tcfg))
  ref = fn(params, x, t, text)
  bf16 = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)), params)
  out["transformer"] = dict(
    layers=layers,
    int8_rel_l2=_rel(fn(quantize.quantize_params(params), x, t, text), ref),
    bf16_weights_rel_l2=_rel(fn(bf16, x, t, text), ref),
  )
  t5 = TE.T5Config(num_layers=layers, max_length=226)
  params = _random_like(TE.abstract_params(t5), 2)
  ids = rng.integers(0, 32000, (1, 226))
  fn = jax.jit(TE.make_apply(t5))
  ref = fn(params, ids)
  bf16 = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)), params)
  out["text_encoder"] = dict(
    layers=layers,
    int8_rel_l2=_rel(fn(quantize.quantize_params(params), ids), ref),
    bf16_weights_rel_l2=_rel(fn(bf16, ids), ref),
  )
  return out


def demo_frames(limit: int | None) -> dict:
  base = pipeline.load_pipeline(demo_model_dir())
  int8 = pipeline.load_pipeline(demo_model_dir(), quantize_weights=quantize.COMPONENTS)
  settings = pipeline.settings_for(base)
  specs = evaluate.split_prompts("heldout")[:limit]
  prompts = [D.caption(s) for s in specs]
  psnr = []
  for start in range(0, len(prompts), 8):
    batch = prompts[start : start + 8]
    a = pipeline.generate(base, batch, settings, output="float", first_index=start)
    b = pipeline.generate(int8, batch, settings, output="float", first_index=start)
    mse = ((a - b) ** 2).reshape(len(batch), -1).mean(axis=1)
    psnr += [float(10 * np.log10(1.0 / max(m, 1e-12))) for m in mse]
  return dict(
    videos=len(psnr),
    psnr_mean=float(np.mean(psnr)),
    psnr_min=float(np.min(psnr)),
    psnr_median=float(np.median(psnr)),
  )


def demo_eval(seeds: int) -> dict:
  rows = {}
  for name, q in (("float32", ()), ("int8", quantize.COMPONENTS)):
    pipe = pipeline.load_pipeline(demo_model_dir(), quantize_weights=q)
    r = evaluate.evaluate(
      pipe,
      evaluate.split_prompts("heldout"),
      settings=pipeline.settings_for(pipe),
      seeds=seeds,
      progress=False,
    )
    rows[name] = {k: r[k] for k in ("accuracy", "balanced_accuracy", "pixel_similarity")}
    rows[name]["feature_similarity"] = r["feature_similarity"]["mean"]
    print(name, evaluate.format_table(r), flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=2, help="layers of the 2B-shaped models")
  p.add_argument("--limit", type=int, default=None, help="held-out captions for the PSNR part (default all)")
  p.add_argument("--seeds", type=int, default=2, help="videos per caption in the evaluation")
  p.add_argument("--parts", default="shaped,frames,eval")
  p.add_argument("--json")
  args = p.parse_args(argv)
  parts = set(args.parts.split(","))
  result = dict(date=datetime.date.today().isoformat(), host_cpu=benchutil.cpu_model())
  if "shaped" in parts:
    result["shaped_2b"] = shaped_2b(args.layers)
    print(json.dumps(result["shaped_2b"], indent=1), flush=True)
  if "frames" in parts:
    result["demo_frames"] = demo_frames(args.limit)
    print(json.dumps(result["demo_frames"], indent=1), flush=True)
  if "eval" in parts:
    result["demo_eval"] = demo_eval(args.seeds)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
