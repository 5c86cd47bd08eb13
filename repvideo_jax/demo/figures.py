"""The demo model's README figures: frames next to real renders, and feature similarity per layer.

    python -m repvideo_jax.demo.figures strip --out docs/images/demo_strip.png
        [--model DIR] [--prompt TEXT ...] [--seed 0] [--steps N] [--every 2]
    python -m repvideo_jax.demo.figures layers cache-on=eval.json cache-off=eval_nocache.json
        --out docs/images/demo_layer_similarity.png

``strip``: for each prompt (default: one held-out caption per shape, ``default_prompts``), a row of
generated frames above a row of the real render of the same caption (``demo.render``, seed 10000:
the first render ``evaluate`` compares against). The videos are generated in one batch with the
model folder's defaults and ``--seed``, as ``sample.py --seed`` would generate them.

``layers``: the adjacent-frame cosine similarity of each layer's block output (the
``feature_similarity_per_layer`` that ``python -m repvideo_jax.evaluate`` stores per video), as a
mean over the videos with one standard error either side, one line per evaluation file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from repvideo_jax.demo import domain as D
from repvideo_jax.outputs import atomic_path, atomic_write, check_output

REAL_SEED = 10_000  # the seed of evaluate's first real render of a caption


def default_prompts(split_seed: int = 0) -> list[str]:
  """One held-out caption per shape: the first of each shape in the held-out split's order."""
  _, held = D.split_specs(split_seed)
  chosen = {}
  for spec in held:
    chosen.setdefault(spec.shape, spec)
  return [D.caption(chosen[s]) for s in D.SHAPES if s in chosen]


def strip_frames(pipe, prompts: Sequence[str], settings, every: int = 2) -> dict[str, np.ndarray]:
  """{"generated", "real"}: uint8 (P, T', H, W, 3) frames 0, every, 2*every, ... of each prompt's
  generated video and of its real render."""
  from repvideo_jax import pipeline  # noqa: PLC0415  (JAX: only when generating)

  specs = []
  for text in prompts:
    spec = D.parse_caption(text)
    if spec is None:
      raise ValueError(f"{text!r} is not a demo caption (e.g. {D.caption(D.all_specs()[0])!r})")
    specs.append(spec)
  if every < 1:
    raise ValueError(f"--every must be >= 1, got {every}")
  generated = pipeline.generate(pipe, list(prompts), settings)
  real = np.stack(
    [
      D.render(
        s, num_frames=settings.num_frames, height=settings.height, width=settings.width, seed=REAL_SEED
      )
      for s in specs
    ]
  )
  return {"generated": np.asarray(generated)[:, ::every], "real": real[:, ::every]}


def save_strip(
  frames: Mapping[str, np.ndarray], prompts: Sequence[str], out, every: int, scale: int = 2
) -> None:
  """Draws ``strip_frames``' output: per prompt, its caption, the generated row and the real row."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  gen, real = frames["generated"], frames["real"]
  n, t = gen.shape[:2]
  fig, axes = plt.subplots(2 * n, 1, figsize=(1.0 * t * scale * 0.6, 2 * n * scale * 0.62), squeeze=False)
  for i, text in enumerate(prompts):
    for j, (label, row) in enumerate((("generated", gen[i]), ("real render", real[i]))):
      ax = axes[2 * i + j, 0]
      sep = np.full((row.shape[1], 2, 3), 80, np.uint8)  # a grey line between frames
      ax.imshow(np.concatenate([c for f in row for c in (f, sep)][:-1], axis=1), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_ylabel(label, fontsize=8)
      if j == 0:
        ax.set_title(f'"{text}"  (frames 0, {every}, {2 * every}, ...)', fontsize=9)
  fig.tight_layout()
  with atomic_path(out) as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  plt.close(fig)


def layer_curves(results: Mapping[str, Mapping]) -> dict[str, dict[str, list[float]]]:
  """{label: {"mean", "stderr"}}: per layer, over the videos of each ``evaluate`` result."""
  curves = {}
  for label, result in results.items():
    rows = [v.get("feature_similarity_per_layer") for v in result.get("videos", [])]
    if not rows or any(r is None for r in rows):
      raise ValueError(
        f"{label}: the evaluation has no per-layer feature similarity per video; rerun "
        "python -m repvideo_jax.evaluate without --no-features (this version stores it)"
      )
    sims = np.asarray(rows, np.float64)  # (videos, layers)
    stderr = sims.std(axis=0, ddof=1) / np.sqrt(len(sims)) if len(sims) > 1 else np.zeros(sims.shape[1])
    curves[label] = {"mean": sims.mean(axis=0).tolist(), "stderr": stderr.tolist(), "videos": len(sims)}
  return curves


def save_layers(curves: Mapping[str, Mapping], out) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 3.6))
  for label, c in curves.items():
    mean, err = np.asarray(c["mean"]), np.asarray(c["stderr"])
    layers = np.arange(len(mean))
    ax.plot(layers, mean, marker="o", label=f"{label} ({c['videos']} videos)")
    ax.fill_between(layers, mean - err, mean + err, alpha=0.25)
  ax.set_xlabel("layer")
  ax.set_ylabel("adjacent-frame cosine of block output")
  ax.set_title("Transformer features: similarity of adjacent latent frames (mean ± 1 s.e.)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with atomic_path(out) as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m repvideo_jax.demo.figures",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser("strip", help="generated frames next to real renders")
  s.add_argument("--model", help="model folder (default: the bundled demo model)")
  s.add_argument("--prompt", action="append", default=None, help="a demo caption; repeatable")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the folder's)")
  s.add_argument("--every", type=int, default=2, help="show every k-th frame (default 2)")
  s.add_argument("--out", required=True, help="PNG to write")
  s.add_argument("--json", help="also write the prompts and settings here")
  lay = sub.add_parser("layers", help="per-layer feature similarity of evaluation files")
  lay.add_argument("evals", nargs="+", metavar="LABEL=EVAL.json")
  lay.add_argument("--out", required=True, help="PNG to write")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    check_output(args.out, "--out", folder=False)
    if args.command == "strip":
      from repvideo_jax import pipeline  # noqa: PLC0415
      from repvideo_jax.demo import demo_model_dir  # noqa: PLC0415

      prompts = args.prompt or default_prompts()
      pipe = pipeline.load_pipeline(args.model or demo_model_dir())
      settings = pipeline.settings_for(pipe, seed=args.seed, steps=args.steps)
      frames = strip_frames(pipe, prompts, settings, every=args.every)
      save_strip(frames, prompts, args.out, args.every)
      if args.json:
        info = {"prompts": prompts, "seed": args.seed, "every": args.every, "model": str(pipe.path)}
        atomic_write(pathlib.Path(args.json), json.dumps(info, indent=1))
    else:
      results = {}
      for item in args.evals:
        label, sep, path = item.partition("=")
        if not sep or not label:
          raise ValueError(f"{item!r}: expected LABEL=EVAL.json")
        results[label] = json.loads(pathlib.Path(path).read_text())
      curves = layer_curves(results)
      save_layers(curves, args.out)
      for label, c in curves.items():
        print(label, " ".join(f"{m:.3f}" for m in c["mean"]))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from repvideo_jax import host_memory  # noqa: PLC0415

  host_memory.setup_cli()  # before JAX starts: see repvideo_jax/host_memory.py
  sys.exit(main())
