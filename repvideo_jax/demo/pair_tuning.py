"""The demo transformer's shape tuning: its training continued with a paired shape loss.

Trained on the records alone, the demo transformer draws squares whose corners come out round:
its samples of square captions read as circles. This continuation shows it the two shapes side by
side. A *pair* is a square and another shape (a circle; with ``partners``, also a triangle)
drawn on one path (same colour, motion, centre and half-size in every frame) for a colour and
motion whose two shapes are both train-split combinations, so no held-out caption is seen. Each step takes ``pairs`` pairs and
``records_batch`` clips of the ordinary records:

- both members of a pair are noised with one timestep and one noise draw, and with probability
  ``mix`` (at timesteps >= ``mix_min_t``) both start from the same blend of the two latents (a
  uniform weight), so only the caption can say which shape to denoise towards;
- the loss is the v-MSE over all clips plus ``pair_weight`` times the mean square of the
  *difference* of the two members' errors: where the shapes differ (the corners), the model must
  get each right rather than drawing their average.

The continuation runs in ``phases`` (one per entry of ``mix`` and ``mix_min_t``), each from the
previous one's moving average of the parameters, with ``demo.loop`` (AdamW, warmup then cosine,
resumable checkpoints). The build's ``tuning`` stage runs it (``demo.build``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repvideo_jax import schedule, video_io
from repvideo_jax.data import records
from repvideo_jax.demo import domain as D
from repvideo_jax.demo import loop


@dataclasses.dataclass(frozen=True)
class PairTuneConfig(loop.LoopConfig):
  """The recipe's ``transformer_tuning`` section. ``steps`` is per phase; ``phases = 0`` (an empty
  ``mix``) skips the stage."""

  steps: int = 600
  lr: float = 3e-4
  warmup_steps: int = 50
  ema_decay: float | None = 0.99
  pairs: int = 8  # pairs per step
  records_batch: int = 16  # ordinary clips of the records per step
  paths: int = 24  # pairs drawn per colour/motion combination and partner
  partners: tuple[str, ...] = ("circle",)  # the shapes paired with the square
  pair_weight: float = 1.0
  ucg_rate: float = 0.1  # captions dropped (zero embedding), as in training
  mix: tuple[float, ...] = ()  # per phase: the chance a pair starts from a blend (none: no tuning)
  mix_min_t: tuple[int, ...] = ()  # per phase: the smallest timestep that is blended

  def __post_init__(self):
    if len(self.mix) != len(self.mix_min_t):
      raise ValueError(
        f"transformer_tuning: mix and mix_min_t give one value per phase; got {len(self.mix)} and "
        f"{len(self.mix_min_t)}"
      )
    if any(not 0.0 <= m <= 1.0 for m in self.mix):
      raise ValueError(f"transformer_tuning: every mix must be in [0, 1], got {self.mix}")
    if not self.partners or any(p not in ("circle", "triangle") for p in self.partners):
      raise ValueError(f"transformer_tuning: partners must be circle and/or triangle, got {self.partners}")
    if self.pairs < 1 or self.records_batch < 0 or self.paths < 1:
      raise ValueError(
        "transformer_tuning: pairs and paths must be >= 1 and records_batch >= 0, got "
        f"{self.pairs}, {self.paths}, {self.records_batch}"
      )

  @property
  def phases(self) -> int:
    return len(self.mix)


def paired_combinations(train_specs: Sequence[D.Spec], partner: str = "circle") -> list[tuple[str, str]]:
  """The (colour, motion) pairs whose square and ``partner`` are both in ``train_specs``."""
  train = {(s.shape, s.color, s.motion) for s in train_specs}
  return [
    (c, m) for c in D.COLORS for m in D.MOTIONS if ("square", c, m) in train and (partner, c, m) in train
  ]


def draw_pairs(
  combos: Sequence[tuple[str, str]],
  paths: int,
  *,
  num_frames: int,
  height: int,
  width: int,
  seed: int,
  partner: str = "circle",
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
  """(squares, others, captions): uint8 clips (N, T, H, W, 3), N = len(combos) * paths; the square and
  the ``partner`` of pair i on one path (drawn from seed, partner, combination and path index);
  captions[i] = (the square's, the partner's)."""
  squares, others, captions = [], [], []
  for j, (color, motion) in enumerate(combos):
    for k in range(paths):
      rng = np.random.default_rng([seed, D.SHAPES.index(partner), j, k])
      cx, cy, r = D.trajectory(motion, num_frames, height, width, rng)
      squares.append(D.draw("square", color, cx, cy, r, height=height, width=width))
      others.append(D.draw(partner, color, cx, cy, r, height=height, width=width))
      captions.append(tuple(D.caption(D.Spec(s, color, motion)) for s in ("square", partner)))
  return np.stack(squares), np.stack(others), captions


def _per_sample(x: jax.Array, ndim: int) -> jax.Array:
  return x.reshape((-1,) + (1,) * (ndim - 1))


def pair_loss(
  params: Any,
  apply_fn: Callable,
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  table: jax.Array,
  pair_weight: float,
  mix: float,
  mix_min_t: int,
  ucg_rate: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The paired loss (module docstring) -> (loss, {"mse", "pair"}). Pure.

  batch: "square", "other" latents (P, t, h, w, C) and their captions' embeddings "square_text",
  "other_text" (P, L, D); "latents" (R, ...) and "text" (R, ...) of the records (R may be 0).
  """
  zs, zc, zr = batch["square"], batch["other"], batch["latents"]
  P, R = zs.shape[0], zr.shape[0]
  num_t = int(np.shape(table)[0])
  k_t, k_eps, k_drop, k_mix, k_w, k_rt, k_reps, k_rdrop = jax.random.split(key, 8)
  t = jax.random.randint(k_t, (P,), 0, num_t)
  eps = jax.random.normal(k_eps, zs.shape, jnp.float32)
  keep = _per_sample(jax.random.bernoulli(k_drop, 1.0 - ucg_rate, (P,)), 3)
  blended = jax.random.bernoulli(k_mix, mix, (P,)) & (t >= mix_min_t)
  w = jax.random.uniform(k_w, (P,))
  w_sq = _per_sample(jnp.where(blended, w, 1.0), zs.ndim)  # weight of the square in each input
  w_ci = _per_sample(jnp.where(blended, w, 0.0), zs.ndim)
  t_r = jax.random.randint(k_rt, (R,), 0, num_t)
  keep_r = _per_sample(jax.random.bernoulli(k_rdrop, 1.0 - ucg_rate, (R,)), 3)

  start = jnp.concatenate([w_sq * zs + (1 - w_sq) * zc, w_ci * zs + (1 - w_ci) * zc, zr])
  x0 = jnp.concatenate([zs, zc, zr])
  noise = jnp.concatenate([eps, eps, jax.random.normal(k_reps, zr.shape, jnp.float32)])
  timesteps = jnp.concatenate([t, t, t_r])
  text = jnp.concatenate([batch["square_text"] * keep, batch["other_text"] * keep, batch["text"] * keep_r])
  a = _per_sample(table[timesteps], x0.ndim)
  s = jnp.sqrt(1.0 - a * a)
  x_t = a * start + s * noise
  v = (a * x_t - x0) / s
  err = apply_fn(params, x_t, timesteps, text).astype(jnp.float32) - v
  mse = jnp.mean(jnp.square(err))
  pair = jnp.mean(jnp.square(err[:P] - err[P : 2 * P]))
  return mse + pair_weight * pair, {"mse": mse, "pair": pair}


def tune(
  params: Any,
  apply_fn: Callable,
  encoders,
  records_dir: str | pathlib.Path,
  train_specs: Sequence[D.Spec],
  config: PairTuneConfig,
  out_dir: str | pathlib.Path,
  *,
  num_frames: int,
  height: int,
  width: int,
  progress: bool = True,
) -> tuple[Any, list[list[dict]]]:
  """Runs the phases (module docstring) from ``params``; each resumes from ``out_dir/phase<i>``.

  encoders: ``data.prepare.Encoders`` of the records (they encode the pairs and their captions).
  Returns (the last phase's averaged params as numpy, each phase's loss log).
  """
  squares, others, captions = [], [], []
  for partner in config.partners:
    combos = paired_combinations(train_specs, partner)
    if not combos:
      raise ValueError(
        f"transformer_tuning: no colour and motion has both its square and {partner} in the train split"
      )
    drawn = draw_pairs(
      combos,
      config.paths,
      num_frames=num_frames,
      height=height,
      width=width,
      seed=config.seed,
      partner=partner,
    )
    squares.append(drawn[0])
    others.append(drawn[1])
    captions += drawn[2]
  squares, others = np.concatenate(squares), np.concatenate(others)

  def encode(clips):
    return np.concatenate(
      [encoders.encode_video(video_io.from_uint8(clips[i : i + 16])) for i in range(0, len(clips), 16)]
    )

  z_sq, z_ot = encode(squares), encode(others)
  texts = sorted({c for pair in captions for c in pair})
  emb = dict(zip(texts, encoders.encode_text(texts)))
  t_sq = np.stack([emb[a] for a, _ in captions])
  t_ot = np.stack([emb[b] for _, b in captions])
  source = records.ExampleSource(records_dir) if config.records_batch else None
  table = jnp.asarray(schedule.sqrt_alpha_table(), jnp.float32)

  def batches(phase):
    def batch(step):
      rng = np.random.default_rng([config.seed, phase, step])
      idx = rng.choice(len(z_sq), config.pairs, replace=False)
      out = {"square": z_sq[idx], "other": z_ot[idx], "square_text": t_sq[idx], "other_text": t_ot[idx]}
      rows = [source[int(i)] for i in rng.integers(len(source), size=config.records_batch)] if source else []
      out["latents"] = np.stack([np.asarray(r["latents"], np.float32) for r in rows]) if rows else z_sq[:0]
      out["text"] = np.stack([np.asarray(r["text_emb"], np.float32) for r in rows]) if rows else t_sq[:0]
      return out

    return batch

  logs = []
  for phase, (mix, mix_min_t) in enumerate(zip(config.mix, config.mix_min_t)):

    def loss_fn(p, batch, key, mix=mix, mix_min_t=mix_min_t):
      return pair_loss(
        p,
        apply_fn,
        batch,
        key,
        table=table,
        pair_weight=config.pair_weight,
        mix=mix,
        mix_min_t=mix_min_t,
        ucg_rate=config.ucg_rate,
      )

    params, rows = loop.train(
      loss_fn,
      params,
      batches(phase),
      dataclasses.replace(config, seed=config.seed + phase),
      pathlib.Path(out_dir) / f"phase{phase}",
      desc=f"transformer tuning {phase + 1}/{config.phases}",
      progress=progress,
    )
    logs.append(rows)
  return params, logs
