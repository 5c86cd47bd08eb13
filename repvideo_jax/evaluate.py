"""Evaluate a model on the demo domain: prompt following and temporal consistency.

    python -m repvideo_jax.evaluate                               # the bundled demo model, held-out prompts
    python -m repvideo_jax.evaluate --model DIR [--transformer DIR | --lora PATH[:SCALE]]
        [--split heldout|train|all] [--seeds 2] [--steps N] [--guidance G] [--out eval.json]

For every prompt of the split (the demo captions, ``demo.split_specs``) and each of ``--seeds``
starting noises, a video is generated and scored:
  prompt following       colour, shape and motion read off the frames by the demo domain's
                         detectors (``demo.detect``), compared with the caption. Reported as
                         accuracy and as balanced accuracy (the mean over the attribute's values of
                         the fraction of prompts with that value read back right), with two
                         baselines: uniform chance (colour 1/5, shape 1/3, motion 1/6, all three
                         1/90) and the majority baseline (always answering the split's most common
                         value; a split can be lopsided: the held-out one has 11 circles out of 18).
                         Any constant answer has balanced accuracy exactly 1/K, so that is the
                         figure to compare with chance. Confusion counts are in the JSON.
  temporal consistency   adjacent-frame cosine similarity of the pixels (frames in [0, 1],
                         flattened), and of the transformer's features: each layer's block output
                         on the video tokens of adjacent latent frames (``analysis.record``, the
                         generated latents noised to ``--feature-timestep``), averaged over layers.
Two references are measured the same way: the real renders of the same captions (pixels), and those
renders passed through the VAE alone (``vae_roundtrip``: the detector scores and pixel similarity a
perfect transformer would get with this VAE).

Prints a table and writes the JSON (``--out``, default ``eval.json``): settings, per-attribute
accuracies with their chance levels, the consistency figures (per layer too) and every video's
detections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from repvideo_jax import analysis, pipeline, quantize, transformer_weights, video_io
from repvideo_jax import config as config_lib
from repvideo_jax import vae as V
from repvideo_jax.demo import demo_model_dir
from repvideo_jax.demo import domain as D
from repvideo_jax.outputs import atomic_write, check_output

ATTRIBUTES = ("color", "shape", "motion")
CHANCE = {
  "color": 1 / len(D.COLORS),
  "shape": 1 / len(D.SHAPES),
  "motion": 1 / len(D.MOTIONS),
  "all": 1 / (len(D.COLORS) * len(D.SHAPES) * len(D.MOTIONS)),
}


def split_prompts(split: str, seed: int = 0) -> list[D.Spec]:
  train, heldout = D.split_specs(seed)
  if split == "heldout":
    return heldout
  if split == "train":
    return train
  if split == "all":
    return D.all_specs()
  raise ValueError(f"split must be 'heldout', 'train' or 'all', got {split!r}")


def pixel_similarity(frames: np.ndarray) -> np.ndarray:
  """Adjacent-frame cosine similarities (F - 1,) of uint8 frames (F, H, W, 3)."""
  x = frames.reshape(frames.shape[0], -1).astype(np.float64) / 255.0
  a, b = x[:-1], x[1:]
  den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  return np.sum(a * b, axis=1) / np.maximum(den, 1e-12)


def accuracy(scores: Sequence[dict]) -> dict[str, float]:
  """Mean per-attribute 0/1 scores, plus 'all' (every attribute right) and 'mean' (of the three)."""
  out = {k: float(np.mean([s[k] for s in scores])) for k in ATTRIBUTES}
  out["all"] = float(np.mean([all(s[k] for k in ATTRIBUTES) for s in scores]))
  out["mean"] = float(np.mean([out[k] for k in ATTRIBUTES]))
  return out


def balanced_accuracy(specs: Sequence[D.Spec], detections: Sequence[dict]) -> dict[str, float]:
  """Per attribute: the mean over the values present in ``specs`` of the fraction read back right."""
  out = {}
  for k in ATTRIBUTES:
    truth = [getattr(s, k) for s in specs]
    recalls = [
      np.mean([d[k] == value for t, d in zip(truth, detections) if t == value])
      for value in sorted(set(truth))
    ]
    out[k] = float(np.mean(recalls))
  return out


def majority_baseline(specs: Sequence[D.Spec]) -> dict[str, float]:
  """Accuracy of always answering the most common value of each attribute in ``specs``."""
  out = {}
  for k in ATTRIBUTES:
    values = [getattr(s, k) for s in specs]
    out[k] = max(values.count(v) for v in set(values)) / len(values)
  return out


def confusion(specs: Sequence[D.Spec], detections: Sequence[dict]) -> dict[str, dict[str, dict]]:
  """{attribute: {true value: {detected value (or "none"): count}}}."""
  out = {k: {} for k in ATTRIBUTES}
  for spec, d in zip(specs, detections):
    for k in ATTRIBUTES:
      row = out[k].setdefault(getattr(spec, k), {})
      got = d[k] or "none"
      row[got] = row.get(got, 0) + 1
  return out


def evaluate(
  pipe,
  specs: Sequence[D.Spec],
  *,
  settings,
  seeds: int = 1,
  batch_size: int = 8,
  feature_timestep: int = 500,
  features: bool = True,
  progress: bool = True,
  palette: dict[str, tuple[int, int, int]] | None = None,
) -> dict[str, Any]:
  """Generates ``seeds`` videos per spec and scores them (module docstring). Returns the JSON dict.
  ``palette``: the colours the detector chooses from (default ``demo.PALETTE``, the base domain's)."""

  settings.validate(pipe.transformer_config, pipe.vae_config)
  jobs = [(spec, r) for r in range(seeds) for spec in specs]
  if not jobs:
    raise ValueError("nothing to evaluate: no prompts")
  bar = None
  if progress:
    bar = tqdm(total=len(jobs), desc="evaluate", unit="video", leave=False)
  videos, feature_sims = [], []
  feature_params = pipe.merged_transformer_params() if features else None
  t0 = time.perf_counter()
  for start in range(0, len(jobs), batch_size):
    batch = jobs[start : start + batch_size]
    prompts = [D.caption(spec) for spec, _ in batch]
    text = pipe.encode_prompts(prompts)
    latents = pipeline.sample_latents(pipe, text, settings, first_index=start)
    frames = video_io.to_uint8(np.asarray(pipeline.decode_latents(pipe, latents)))
    for k, ((spec, rep), clip) in enumerate(zip(batch, frames)):
      detected = D.detect(clip, palette)
      row = {
        "prompt": D.caption(spec),
        "repeat": rep,
        "index": start + k,
        "detected": detected,
        "score": D.score(spec, detected),
        "pixel_similarity": float(pixel_similarity(clip).mean()),
      }
      if features:
        xt = analysis.noisy_latents(
          np.asarray(latents[k : k + 1]), feature_timestep, settings.seed + start + k
        )
        rec = analysis.record(
          feature_params, pipe.transformer_config, xt, feature_timestep, np.asarray(text[k : k + 1])
        )
        sims = rec["adjacent_similarity"].mean(axis=1)  # per layer
        feature_sims.append(sims)
        row["feature_similarity"] = float(sims.mean())
        row["feature_similarity_per_layer"] = sims.tolist()
      videos.append(row)
    if bar is not None:
      bar.update(len(batch))
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - t0

  # References: real renders of the same captions, and their VAE round trip.
  renders = [
    D.render(
      spec, num_frames=settings.num_frames, height=settings.height, width=settings.width, seed=10_000 + rep
    )
    for spec, rep in jobs
  ]
  encode = jax.jit(lambda p, x: V.encode(p, x, config=pipe.vae_config))
  roundtrip_scores, roundtrip_similarity = [], []
  for i in range(0, len(renders), batch_size):
    chunk = np.stack(renders[i : i + batch_size])
    z = encode(pipe.vae_params, jnp.asarray(video_io.from_uint8(chunk)))
    recon = video_io.to_uint8(np.asarray(pipeline.decode_latents(pipe, z)))
    roundtrip_scores += [
      D.score(spec, D.detect(r, palette)) for (spec, _), r in zip(jobs[i : i + batch_size], recon)
    ]
    roundtrip_similarity += [float(pixel_similarity(r).mean()) for r in recon]

  job_specs = [spec for spec, _ in jobs]
  detections = [v["detected"] for v in videos]
  result = {
    "model": str(pipe.path),
    "num_prompts": len(specs),
    "seeds": seeds,
    "num_videos": len(jobs),
    "settings": dataclasses.asdict(settings),
    "feature_timestep": feature_timestep,
    "feature_cache": pipe.transformer_config.feature_cache,
    "accuracy": accuracy([v["score"] for v in videos]),
    "balanced_accuracy": balanced_accuracy(job_specs, detections),
    "chance": CHANCE,
    "majority_baseline": majority_baseline(job_specs),
    "confusion": confusion(job_specs, detections),
    "vae_roundtrip_accuracy": accuracy(roundtrip_scores),
    "pixel_similarity": {
      "generated": float(np.mean([v["pixel_similarity"] for v in videos])),
      "real_renders": float(np.mean([pixel_similarity(r).mean() for r in renders])),
      "vae_roundtrip": float(np.mean(roundtrip_similarity)),
    },
    "seconds": seconds,
    "videos": videos,
  }
  if features:
    per_layer = np.mean(feature_sims, axis=0)
    result["feature_similarity"] = {"mean": float(per_layer.mean()), "per_layer": per_layer.tolist()}
  return result


def format_table(result: dict[str, Any]) -> str:
  acc, chance, vae = result["accuracy"], result["chance"], result["vae_roundtrip_accuracy"]
  bal, major = result["balanced_accuracy"], result["majority_baseline"]
  lines = [
    f"{result['num_prompts']} prompts x {result['seeds']} seed(s) = {result['num_videos']} videos "
    f"({result['seconds']:.0f}s), feature cache {'on' if result['feature_cache'] else 'off'}",
    f"{'prompt following':<18}{'accuracy':>10}{'balanced':>10}{'chance':>10}{'majority':>10}{'VAE only':>10}",
  ]
  for k in ATTRIBUTES:
    lines.append(f"{k:<18}{acc[k]:>10.3f}{bal[k]:>10.3f}{chance[k]:>10.3f}{major[k]:>10.3f}{vae[k]:>10.3f}")
  lines.append(
    f"{'all three':<18}{acc['all']:>10.3f}{'':>10}{chance['all']:>10.3f}{'':>10}{vae['all']:>10.3f}"
  )
  px = result["pixel_similarity"]
  lines.append(f"{'adjacent-frame cosine':<28}{'generated':>10}{'real':>10}{'VAE only':>10}")
  lines.append(
    f"{'  pixels':<28}{px['generated']:>10.4f}{px['real_renders']:>10.4f}{px['vae_roundtrip']:>10.4f}"
  )
  if "feature_similarity" in result:
    lines.append(f"{'  transformer features':<28}{result['feature_similarity']['mean']:>10.4f}{'':>10}")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m repvideo_jax.evaluate",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--model", help="model folder (default: the bundled demo model)")
  p.add_argument("--transformer", help="use this transformer instead of the folder's (e.g. an ablation)")
  p.add_argument(
    "--lora",
    action="append",
    default=[],
    metavar="PATH[:SCALE]",
    help="a LoRA for the folder's transformer, with its scale (default 1.0); repeatable, as in sample.py",
  )
  p.add_argument(
    "--split",
    default="heldout",
    choices=["heldout", "train", "all"],
    help="which demo captions to prompt with (default: the held-out combinations)",
  )
  p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (default 0)")
  p.add_argument("--limit", type=int, default=None, help="only the first N prompts of the split")
  p.add_argument("--seeds", type=int, default=2, help="videos per prompt (default 2)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--cfg-schedule", choices=["released", "constant", "smooth"], default=None)
  p.add_argument("--sampler", choices=["dpmpp2m", "ddim"], default=None)
  p.add_argument("--step-cache", default=None, help="as sample.py --step-cache (default none)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--feature-timestep", type=int, default=500)
  p.add_argument("--no-features", action="store_true", help="skip the transformer-feature similarity")
  p.add_argument(
    "--quantize",
    choices=list(quantize.CHOICES),
    default="none",
    help="int8 weight-only layer kernels for these models, as sample.py --quantize (default none)",
  )
  p.add_argument("--out", default="eval.json", help="JSON output (default eval.json)")
  p.add_argument("--no-progress", action="store_true")
  return p


def load(model: str | None, transformer: str | None, loras=(), quantize_weights=()):
  """The model folder (default: bundled demo), optionally with another transformer swapped in, or
  with LoRAs ((path, scale) pairs) on its own transformer; ``quantize_weights`` as in
  ``pipeline.load_pipeline`` (applied to the swapped-in transformer too)."""
  if transformer and loras:
    raise ValueError("--lora adapts the folder's transformer: it cannot be combined with --transformer")
  pipe = pipeline.load_pipeline(
    model or demo_model_dir(),
    loras=loras,
    lora_merge=bool(loras and quantize_weights),
    quantize_weights=quantize_weights,
  )
  if transformer:
    cfg, params = transformer_weights.load(transformer)
    if (cfg.text_embed_dim, cfg.in_channels) != (
      pipe.transformer_config.text_embed_dim,
      pipe.transformer_config.in_channels,
    ):
      raise ValueError(
        f"--transformer {transformer} does not fit {pipe.path}: text width / latent "
        f"channels {cfg.text_embed_dim}/{cfg.in_channels} vs "
        f"{pipe.transformer_config.text_embed_dim}/{pipe.transformer_config.in_channels}"
      )
    if "transformer" in quantize_weights:
      params = quantize.quantize_params(params)
    pipe = dataclasses.replace(pipe, transformer_config=cfg, transformer_params=params)
  return pipe


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.seeds < 1 or args.batch_size < 1:
      raise ValueError("--seeds and --batch-size must be >= 1")
    check_output(args.out, "--out", folder=False)  # before the work, not after it
    loras = [config_lib.parse_lora_arg(text) for text in args.lora]
    pipe = load(args.model, args.transformer, loras, quantize.CHOICES[args.quantize])
    settings = pipeline.settings_for(
      pipe,
      steps=args.steps,
      guidance=args.guidance,
      seed=args.seed,
      cfg_schedule=args.cfg_schedule,
      sampler=args.sampler,
      step_cache=args.step_cache,
    )
    specs = split_prompts(args.split, args.split_seed)[: args.limit]
    result = evaluate(
      pipe,
      specs,
      settings=settings,
      seeds=args.seeds,
      batch_size=args.batch_size,
      feature_timestep=args.feature_timestep,
      features=not args.no_features,
      progress=not args.no_progress,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result.update(
    split=args.split,
    split_seed=args.split_seed,
    transformer=args.transformer,
    loras=pipe.loras,
    quantized=list(pipe.quantized),
  )
  out = pathlib.Path(args.out)
  atomic_write(out, json.dumps(result, indent=1))
  print(format_table(result))
  print(f"wrote {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from repvideo_jax import host_memory  # noqa: PLC0415

  host_memory.setup_cli()  # before JAX starts: see repvideo_jax/host_memory.py
  sys.exit(main())
