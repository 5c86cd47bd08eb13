"""The paper's analysis as a tool: per-layer attention and feature statistics of a model.

    python -m repvideo_jax.analysis --prompt "a red circle moving left on a black background" --out analysis/
    python -m repvideo_jax.analysis --model DIR --prompt TEXT --out DIR [--frame 1] [--timestep 500]
        [--video clip.mp4] [--compare cache-off=off] [--compare other=TRANSFORMER_DIR]

What is measured. The prompt's video is generated (or ``--video`` is read and VAE-encoded), giving
clean latents z0. They are noised to the timestep t with seeded noise eps:
x_t = a_t z0 + sqrt(1 - a_t^2) eps (the training noising, docs/sampling.md). One forward pass of the
transformer on (x_t, t, prompt embedding) is then recorded layer by layer, on the conditional branch.
For layer l (0-based, as everywhere in this package) and video frame f (a latent frame) with n
tokens per frame:
  token attention  A_l[f, j]   attention weight from the queries of frame f to key token j, averaged
                               over heads and over those n queries (a row sums to 1). Keys are
                               [text | video frame 0 | frame 1 | ...], as in the paper's figure of
                               attention against token index.
  attention mass   text, same_frame, other_frames: A_l[f] summed over the text keys, over frame f's
                               own keys and over every other frame's keys (they sum to 1), averaged
                               over f (per-frame values are in the JSON too).
  attention map    A_l[f*, frame f* keys] as an (h, w) grid: where the chosen frame f* (``--frame``)
                               looks inside itself.
  adjacent-frame   cos(F_l[f], F_l[f+1]) for f = 0..T-2, where F_l[f] is layer l's output (the block
  similarity                   output, as cached by RepVideo) on frame f's video tokens, flattened.
Attention weights are recomputed from the block's own q and k (QK-LayerNorm and rotary applied)
with a float32 softmax, one query frame at a time.

Variants (``--compare LABEL=off`` runs the same weights with the feature cache off;
``--compare LABEL=DIR`` swaps in another transformer, e.g. the cache-off ablation) are analysed on
the same x_t, text and timestep, so their differences come from the model alone.

Outputs in ``--out``: ``analysis.json`` (every number above per variant), ``analysis.npz`` (the full
token-attention arrays), ``inputs.npz`` (x_t, z0, the text embedding, t: enough to recompute
everything), ``video.mp4`` (the analysed clip) and the plots ``attention_maps_<label>.png``,
``token_attention_<label>.png``, ``attention_mass.png`` and ``frame_similarity.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import pathlib
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repvideo_jax import config as config_lib
from repvideo_jax import pipeline, schedule, transformer_weights, video_io
from repvideo_jax import transformer as T
from repvideo_jax import vae as V
from repvideo_jax.demo import demo_model_dir
from repvideo_jax.outputs import atomic_write, check_output

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Recording one forward pass.


def identity_layers(config: T.TransformerConfig) -> list[int]:
  """Layers whose gate has no effect (the cache holds exactly the previous output; docs/model.md)."""
  if not config.feature_cache:
    return []
  w = config.cache_window
  return [i for i in range(config.num_layers) if i == 0 or (i - 1) % w == 0]


def _capture(view: T.LayerView, *, frames: int) -> dict[str, jax.Array]:
  """Per layer: token attention (B, frames, S) and adjacent-frame feature cosines (B, frames-1)."""
  q, k, _, _ = view.block.attention_inputs(view.inputs, view.temb, view.text_len, view.rope)
  b, s, heads, d = q.shape
  n = (s - view.text_len) // frames
  q_frames = q[:, view.text_len :].reshape(b, frames, n, heads, d).transpose(1, 0, 2, 3, 4)
  kf = k.astype(jnp.float32)

  def one_frame(qf):  # (B, n, heads, d) -> (B, S)
    scores = jnp.einsum("bnhd,bshd->bhns", qf.astype(jnp.float32), kf) / np.sqrt(d)
    return jnp.mean(jax.nn.softmax(scores, axis=-1), axis=(1, 2))

  attention = jax.lax.map(one_frame, q_frames).transpose(1, 0, 2)
  feats = view.outputs[:, view.text_len :].astype(jnp.float32).reshape(b, frames, -1)
  a, c = feats[:, :-1], feats[:, 1:]
  cosine = jnp.sum(a * c, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(c, axis=-1))
  return {"token_attention": attention, "adjacent_similarity": cosine}


@functools.lru_cache(maxsize=8)
def _recorder(config: T.TransformerConfig, frames: int):
  """One compiled recording forward per (config, frame count), reused across calls."""

  @jax.jit
  def run(params, x, t, text):
    _, captured = T.apply_with_intermediates(
      params, x, t, text, config=config, capture=lambda v: _capture(v, frames=frames)
    )
    return captured

  return run


def record(params, config: T.TransformerConfig, noisy_latents, timestep: int, text) -> dict[str, np.ndarray]:
  """Runs the transformer once and returns, for batch element 0, ``token_attention``
  (layers, T, S) and ``adjacent_similarity`` (layers, T - 1) as numpy (module docstring)."""
  run = _recorder(config, noisy_latents.shape[1])
  t = jnp.full((noisy_latents.shape[0],), timestep, jnp.int32)
  captured = jax.device_get(run(params, jnp.asarray(noisy_latents), t, jnp.asarray(text)))
  return {k: np.asarray(v[:, 0], np.float64) for k, v in captured.items()}


def summarize(
  recorded: dict[str, np.ndarray],
  config: T.TransformerConfig,
  *,
  text_len: int,
  grid: tuple[int, int, int],
  frame: int,
  gates=None,
) -> list[dict[str, Any]]:
  """Per-layer JSON rows from ``record``'s arrays (module docstring for the definitions)."""
  frames, gh, gw = grid
  n = gh * gw
  attn, sims = recorded["token_attention"], recorded["adjacent_similarity"]
  identity = set(identity_layers(config))
  rows = []
  for layer in range(attn.shape[0]):
    a = attn[layer]  # (T, S)
    text_mass = a[:, :text_len].sum(-1)
    per_key_frame = a[:, text_len:].reshape(frames, frames, n).sum(-1)  # (query frame, key frame)
    same = np.diag(per_key_frame)
    other = per_key_frame.sum(-1) - same
    own = text_len + frame * n
    rows.append(
      {
        "layer": layer,
        "gate": None if gates is None else float(gates[layer]),
        "gate_has_effect": bool(config.feature_cache and layer not in identity),
        "attention_mass": {
          "text": float(text_mass.mean()),
          "same_frame": float(same.mean()),
          "other_frames": float(other.mean()),
        },
        "attention_mass_by_frame": [
          {
            "frame": f,
            "text": float(text_mass[f]),
            "same_frame": float(same[f]),
            "other_frames": float(other[f]),
          }
          for f in range(frames)
        ],
        "attention_to_frames": per_key_frame.tolist(),
        "attention_map": a[frame, own : own + n].reshape(gh, gw).tolist(),
        "adjacent_frame_similarity": sims[layer].tolist(),
      }
    )
  return rows


# ----------------------------------------------------------------------------------------------
# Inputs: the analysed clip, noised.


def noisy_latents(clean: np.ndarray, timestep: int, seed: int) -> np.ndarray:
  """x_t = a_t z0 + sqrt(1 - a_t^2) eps with eps from ``seed`` (the training noising)."""
  if not 0 <= timestep < schedule.NUM_TRAIN_TIMESTEPS:
    raise ValueError(f"timestep must be in [0, {schedule.NUM_TRAIN_TIMESTEPS}), got {timestep}")
  a = float(schedule.sqrt_alpha_table()[timestep])
  eps = np.asarray(jax.random.normal(jax.random.key(seed), clean.shape, jnp.float32))
  return (a * clean + np.sqrt(1.0 - a * a) * eps).astype(np.float32)


def clean_latents(pipe, prompt: str, settings, video: str | None = None, fps: float = 8.0):
  """(z0 (1, T, h, w, C), frames uint8 (F, H, W, 3)): the prompt's generated video, or ``video``."""
  if video is not None:
    clip = video_io.load_clip(
      video, num_frames=settings.num_frames, height=settings.height, width=settings.width, fps=fps
    )
    z0 = V.encode(pipe.vae_params, jnp.asarray(clip[None]), config=pipe.vae_config)
    return np.asarray(z0), video_io.to_uint8(clip)
  text = pipe.encode_prompts([prompt])
  z0 = pipeline.sample_latents(pipe, text, settings)
  frames = video_io.to_uint8(np.asarray(pipeline.decode_latents(pipe, z0)))[0]
  return np.asarray(z0), frames


def variant(pipe, spec: str) -> tuple[str, T.TransformerConfig, dict]:
  """``LABEL=off`` (the same weights, cache off), ``LABEL=on`` or ``LABEL=DIR`` (another transformer)."""
  if "=" not in spec:
    raise ValueError(f"--compare {spec!r} must look like LABEL=off, LABEL=on or LABEL=TRANSFORMER_DIR")
  label, what = spec.split("=", 1)
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
    raise ValueError(f"--compare label {label!r} may only use letters, digits, '_', '.' and '-'")
  cfg, params = pipe.transformer_config, pipe.merged_transformer_params()
  if what in ("off", "on"):
    on = what == "on"
    if on and not cfg.feature_cache:
      raise ValueError(f"--compare {spec}: the model has no gates to switch the cache on with")
    return (
      label,
      dataclasses.replace(cfg, feature_cache=on),
      (params if on else {k: v for k, v in params.items() if k != "gates"}),
    )
  cfg2, params2 = transformer_weights.load(what, dtype=cfg.dtype)
  for field in ("in_channels", "text_embed_dim", "text_length", "patch_size"):
    if getattr(cfg2, field) != getattr(cfg, field):
      raise ValueError(
        f"--compare {spec}: {field} {getattr(cfg2, field)} differs from the model's "
        f"{getattr(cfg, field)}; the transformer must fit this folder's VAE and T5"
      )
  return label, cfg2, params2


def analyse(
  pipe,
  prompt: str,
  *,
  settings,
  timestep: int = 500,
  frame: int = 1,
  seed: int = 0,
  video: str | None = None,
  fps: float = 8.0,
  variants=(),
  out=None,
) -> dict[str, Any]:
  """Runs the analysis for the model (label "model") and each ``variants`` entry; returns the JSON
  dict and, with ``out``, writes every output file (module docstring)."""
  z0, frames = clean_latents(pipe, prompt, settings, video, fps)
  xt = noisy_latents(z0, timestep, seed)
  text = np.asarray(pipe.encode_prompts([prompt]))
  cfg = pipe.transformer_config
  grid = (xt.shape[1], xt.shape[2] // cfg.patch_size, xt.shape[3] // cfg.patch_size)
  if not 0 <= frame < grid[0]:
    raise ValueError(
      f"--frame {frame} is out of range: the clip has {grid[0]} latent frames (0..{grid[0] - 1})"
    )
  runs = [("model", cfg, pipe.merged_transformer_params())] + [variant(pipe, v) for v in variants]
  labels = [r[0] for r in runs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--compare labels must be distinct and not 'model', got {labels[1:]}")
  result = {
    "prompt": prompt,
    "model": str(pipe.path),
    "loras": pipe.loras,
    "source": video or "generated",
    "timestep": timestep,
    "seed": seed,
    "frame": frame,
    "token_grid": list(grid),
    "text_length": int(text.shape[1]),
    "settings": dataclasses.asdict(settings),
    "variants": {},
  }
  arrays = {}
  for label, vcfg, params in runs:
    rec = record(params, vcfg, xt, timestep, text)
    gates = np.asarray(params["gates"]) if vcfg.feature_cache else None
    result["variants"][label] = {
      "feature_cache": vcfg.feature_cache,
      "num_layers": vcfg.num_layers,
      "layers": summarize(rec, vcfg, text_len=text.shape[1], grid=grid, frame=frame, gates=gates),
    }
    arrays.update({f"{label}/{k}": v for k, v in rec.items()})
  if out is not None:
    _write(
      pathlib.Path(out),
      result,
      arrays,
      dict(noisy_latents=xt, clean_latents=z0, text_embeddings=text, timestep=np.int32(timestep)),
      frames,
      fps,
    )
  return result


# ----------------------------------------------------------------------------------------------
# Files and plots.


def _write(out: pathlib.Path, result, arrays, inputs, frames, fps) -> None:
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / "inputs.npz", **inputs)
  np.savez(out / "analysis.npz", **arrays)
  video_io.write_mp4(out / "video.mp4", frames, fps=fps)
  plot(result, arrays, out)
  atomic_write(out / "analysis.json", json.dumps(result, indent=1))


def _pick_layers(n: int, most: int = 12) -> list[int]:
  return list(range(n)) if n <= most else sorted({int(round(x)) for x in np.linspace(0, n - 1, 6)})


def plot(result: dict, arrays: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Writes the PNG figures for an ``analyse`` result; returns their paths."""
  # Imported here: matplotlib costs ~0.6 s to import (measured), which evaluate.py, importing this
  # module for its metrics only, should not pay.
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  written = []
  frames = result["token_grid"][0]
  text_len = result["text_length"]
  for label, v in result["variants"].items():
    layers = v["layers"]
    cols = min(6, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
      ax.axis("off")
    for row, ax in zip(layers, axes.flat):
      ax.imshow(np.asarray(row["attention_map"]), cmap="viridis")
      ax.set_title(f"layer {row['layer']}", fontsize=9)
    fig.suptitle(f"{label}: attention of frame {result['frame']} within itself")
    fig.tight_layout()
    written.append(out / f"attention_maps_{label}.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    attn = arrays[f"{label}/token_attention"]
    show = list(range(min(3, frames)))
    fig, axes = plt.subplots(1, len(show), figsize=(5 * len(show), 3.2), squeeze=False)
    pick = _pick_layers(attn.shape[0], most=6)
    for f, ax in zip(show, axes[0]):
      for layer in pick:
        ax.plot(attn[layer, f], label=f"layer {layer}", lw=1)
      n = (attn.shape[-1] - text_len) // frames
      ax.axvspan(text_len + f * n, text_len + (f + 1) * n, color="red", alpha=0.08)
      ax.set_title(f"frame {f}")
      ax.set_xlabel("key token ([text | frame 0 | frame 1 | ...])")
      ax.set_ylabel("attention")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"{label}: mean attention of each frame's queries over the tokens")
    fig.tight_layout()
    written.append(out / f"token_attention_{label}.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

  variants = list(result["variants"].items())
  fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 3.2), squeeze=False)
  for (label, v), ax in zip(variants, axes[0]):
    idx = [r["layer"] for r in v["layers"]]
    bottom = np.zeros(len(idx))
    for part, color in (("same_frame", "tab:orange"), ("other_frames", "tab:blue"), ("text", "tab:gray")):
      vals = np.asarray([r["attention_mass"][part] for r in v["layers"]])
      ax.bar(idx, vals, bottom=bottom, color=color, label=part.replace("_", " "))
      bottom += vals
    ax.set_title(f"{label}: where video queries attend")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1)
  axes[0, -1].legend(fontsize=8)
  fig.tight_layout()
  written.append(out / "attention_mass.png")
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)

  num_layers = variants[0][1]["num_layers"]
  pick = _pick_layers(num_layers)
  cols = min(6, len(pick))
  rows = -(-len(pick) // cols) + 1
  fig = plt.figure(figsize=(2.6 * cols, 2.3 * rows))
  grid = fig.add_gridspec(rows, cols)
  ax = fig.add_subplot(grid[0, :])
  for label, v in variants:
    ax.plot(
      [r["layer"] for r in v["layers"]],
      [np.mean(r["adjacent_frame_similarity"]) for r in v["layers"]],
      marker="o",
      label=label,
    )
  ax.set_xlabel("layer")
  ax.set_ylabel("mean adjacent-frame cosine")
  ax.legend(fontsize=8)
  for i, layer in enumerate(pick):
    ax = fig.add_subplot(grid[1 + i // cols, i % cols])
    for label, v in variants:
      if layer < len(v["layers"]):
        sims = v["layers"][layer]["adjacent_frame_similarity"]
        ax.plot(range(1, len(sims) + 1), sims, marker=".", label=label)
    ax.set_title(f"layer {layer}", fontsize=9)
    ax.set_xlabel("frame pair (f-1, f)", fontsize=8)
  fig.tight_layout()
  written.append(out / "frame_similarity.png")
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)
  return written


# ----------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m repvideo_jax.analysis",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--model", help="model folder (default: the bundled demo model)")
  p.add_argument("--prompt", required=True)
  p.add_argument(
    "--lora",
    action="append",
    default=[],
    metavar="PATH[:SCALE]",
    help="a LoRA for the model's transformer, with its scale (default 1.0); repeatable, as in sample.py",
  )
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--frame", type=int, default=1, help="latent frame of the attention maps (default 1)")
  p.add_argument("--timestep", type=int, default=500, help="DDPM timestep of the analysed pass (0..999)")
  p.add_argument("--seed", type=int, default=0, help="seed of the generated video and of the noise")
  p.add_argument("--steps", type=int, default=None, help="sampler steps of the generated video")
  p.add_argument("--video", help="analyse this video (VAE-encoded) instead of generating one")
  p.add_argument(
    "--compare",
    action="append",
    default=[],
    metavar="LABEL=off|on|TRANSFORMER_DIR",
    help="also analyse a variant on the same inputs (repeatable)",
  )
  return p


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  args = build_parser().parse_args(argv)
  try:
    check_output(args.out, "--out", folder=True)
    if not 0 <= args.timestep < 1000:  # the cheap checks, before the model is loaded
      raise ValueError(f"--timestep must be in [0, 1000) (a DDPM timestep), got {args.timestep}")
    if args.frame < 0 or not 0 <= args.seed < 2**32:
      raise ValueError(f"--frame must be >= 0 and --seed in [0, 2^32 - 1], got {args.frame} and {args.seed}")
    for spec in args.compare:
      if "=" not in spec:
        raise ValueError(f"--compare {spec!r} must look like LABEL=off, LABEL=on or LABEL=TRANSFORMER_DIR")
    loras = [config_lib.parse_lora_arg(text) for text in args.lora]
    pipe = pipeline.load_pipeline(args.model or demo_model_dir(), loras=loras)
    settings = pipeline.settings_for(pipe, steps=args.steps, seed=args.seed)
    fps = pipeline.model_defaults(pipe).get("fps", 8.0)
    result = analyse(
      pipe,
      args.prompt,
      settings=settings,
      timestep=args.timestep,
      frame=args.frame,
      seed=args.seed,
      video=args.video,
      fps=fps,
      variants=args.compare,
      out=args.out,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for label, v in result["variants"].items():
    print(f"{label}: layer | same-frame / other-frame / text attention | adjacent-frame cosine")
    for r in v["layers"]:
      m = r["attention_mass"]
      print(
        f"  {r['layer']:3d} | {m['same_frame']:.3f} / {m['other_frames']:.3f} / {m['text']:.3f} | "
        f"{np.mean(r['adjacent_frame_similarity']):.4f}"
      )
  print(f"wrote {args.out}/analysis.json and plots", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from repvideo_jax import host_memory  # noqa: PLC0415

  host_memory.setup_cli()  # before JAX starts: see repvideo_jax/host_memory.py
  sys.exit(main())
