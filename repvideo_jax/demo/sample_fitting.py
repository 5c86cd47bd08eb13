"""The demo decoder fitted to the transformer's own samples.

The decoder is trained on the VAE's latents of real renders (``vae_training``), but it decodes the
transformer's samples, which are never exact: a square's corners come out a little round and its
sides a little wavy, and the detector's fill test (``domain.detect``: above 0.92 of the bounding
box) reads it as a circle. This stage tunes the decoder alone (the encoder, and so the records, stay
as they are) to turn such samples into clean shapes:

- ``samples`` latents of the train-split captions (caption i of the train split at sample i, cycling)
  are sampled once with the tuned transformer and the recipe's ``generation`` settings, seeds from
  ``sample_seed``;
- each of the ``rounds`` decodes them with the decoder so far and pairs every sample with the
  clean render of its caption's shape on the path the decoded clip shows (``domain.fit_render``), then
  trains the decoder towards those for that round's steps;
- every step takes ``batch_size`` such pairs (l1 + MSE + silhouette + ``crisp_weight`` x crisp-edge
  terms of ``vae_training``), a square caption's ``square_weight`` times as likely as another's
  (squares are what the detector reads wrong most), plus the decoder tuning's own loss on
  ``real_batch`` fresh renders with latent noise, so the decoder keeps decoding real latents.

Only captions of the train split are sampled: the held-out ones stay unseen.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from repvideo_jax import outputs, pipeline, video_io
from repvideo_jax import vae as V
from repvideo_jax.demo import domain as D
from repvideo_jax.demo import loop, vae_training


@dataclasses.dataclass(frozen=True)
class DecoderFitConfig(loop.LoopConfig):
  """The recipe's ``decoder_fitting`` section; no ``rounds`` skips the stage."""

  samples: int = 720
  sample_seed: int = 1000
  sample_batch: int = 24
  rounds: tuple[int, ...] = ()  # steps of each round (none: no fitting)
  # per_frame and square_weight take one value for every round, or a list of one per round:
  per_frame: bool | tuple[bool, ...] = True  # fitted centre and size of each frame (else a line in time)
  square_weight: float | tuple[float, ...] = 1.0  # how much likelier a square caption's sample is drawn
  batch_size: int = 4  # sample / fitted-render pairs per step
  real_batch: int = 2  # fresh renders per step
  lr: float = 1e-3
  warmup_steps: int = 20
  latent_noise: float = 0.3
  silhouette_weight: float = 1.0
  crisp_weight: float = 15.0
  save_every: int = 100

  def __post_init__(self):
    for name in ("per_frame", "square_weight"):  # one value, or one per round (a list becomes a tuple)
      value = getattr(self, name)
      if isinstance(value, (list, tuple)):
        if len(value) != len(self.rounds):
          raise ValueError(
            f"decoder_fitting: {name} takes one value for every round or one per round; got "
            f"{len(value)} values for {len(self.rounds)} rounds"
          )
        object.__setattr__(self, name, tuple(value))
    weights = self.square_weight if isinstance(self.square_weight, tuple) else (self.square_weight,)
    if not all(w > 0 for w in weights):
      raise ValueError(f"decoder_fitting: square_weight must be > 0, got {self.square_weight!r}")
    if self.samples < self.batch_size or any(s < 1 for s in self.rounds):
      raise ValueError(
        f"decoder_fitting: need samples >= batch_size and every round >= 1 step, got samples "
        f"{self.samples}, batch_size {self.batch_size}, rounds {self.rounds}"
      )

  def for_round(self, r: int) -> tuple[bool, float]:
    """(per_frame, square_weight) of round ``r``."""
    pick = lambda v: v[r] if isinstance(v, tuple) else v  # noqa: E731
    return pick(self.per_frame), pick(self.square_weight)


def caption_cycle(train_specs: Sequence[D.Spec], n: int) -> list[D.Spec]:
  """The spec of each of ``n`` samples: the train split's combinations in order, cycling."""
  return [train_specs[i % len(train_specs)] for i in range(n)]


def sample_latents(
  pipe: pipeline.Pipeline,
  specs: Sequence[D.Spec],
  settings: pipeline.GenerationSettings,
  *,
  batch: int = 24,
  progress: bool = True,
  parts_dir: str | pathlib.Path | None = None,
) -> np.ndarray:
  """Scaled latents (N, t, h, w, C) sampled for the captions of ``specs`` (sample i with the
  settings' seed and index i, as ``sample.py`` numbers a batch's videos).

  With ``parts_dir``, each batch is saved there once sampled and a batch found there is read back
  instead of sampled again: a killed sampling resumes at its first missing batch, with the same
  result, since sample i's noise depends only on the seed and i."""
  parts = pathlib.Path(parts_dir) if parts_dir is not None else None
  if parts is not None:
    parts.mkdir(parents=True, exist_ok=True)
  out = []
  bar = tqdm(total=len(specs), desc="sampling", unit="video", leave=False, disable=not progress)
  for i in range(0, len(specs), batch):
    prompts = [D.caption(s) for s in specs[i : i + batch]]
    part = parts / f"{i:06d}+{len(prompts)}.npy" if parts is not None else None
    if part is not None and part.is_file():
      z = np.load(part)
    else:
      text, unc = pipeline.encode_for_sampling(pipe, prompts, settings)
      z = pipeline._sample(pipe, text, unc, settings, noise=None, mesh=None, progress=None, first_index=i)
      z = np.asarray(z, np.float32)
      if part is not None:
        with outputs.atomic_path(part) as tmp, open(tmp, "wb") as f:
          np.save(f, z)
    out.append(z)
    bar.update(len(prompts))
  bar.close()
  return np.concatenate(out)


def fitted_targets(
  decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, specs: Sequence[D.Spec], *, per_frame: bool
) -> tuple[np.ndarray, np.ndarray]:
  """(indices, targets): the samples whose decoded clip shows a shape in at least half of its frames
  (``domain.fit_render``),
  and for each the clean render (uint8) of its spec on the fitted path. ``decode`` maps a batch of
  latents to uint8 frames."""
  keep, targets = [], []
  for i in range(0, len(latents), 16):
    for j, frames in enumerate(decode(latents[i : i + 16])):
      fitted = D.fit_render(frames, specs[i + j], per_frame=per_frame)
      if fitted is not None:
        keep.append(i + j)
        targets.append(fitted)
  if not keep:
    raise RuntimeError("decoder_fitting: no decoded sample shows a shape; is the transformer trained?")
  return np.array(keep), np.stack(targets)


def fit_loss(
  decoder: Any,
  batch: tuple[jax.Array, jax.Array, jax.Array],
  key: jax.Array,
  *,
  encoder: Any,
  vae_config: V.VAEConfig,
  config: DecoderFitConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, {"fit", "real"}) of the decoder params on (sample latents, fitted renders, real clips),
  videos in [-1, 1]. Pure."""
  latents, target, real = batch
  params = {"encoder": encoder, "decoder": decoder}
  recon = V.decode(params, latents, config=vae_config, chunking="released", scan_chunks=False)
  recon = recon.astype(jnp.float32)
  err = recon - target
  fit = (
    jnp.mean(jnp.abs(err))
    + jnp.mean(jnp.square(err))
    + config.silhouette_weight * vae_training.silhouette(recon, target)
    + config.crisp_weight * vae_training.crisp_edges(recon, target)
  )
  real_loss, _ = vae_training.loss_terms(
    params,
    real,
    key,
    config=vae_config,
    kl_weight=0.0,
    silhouette_weight=config.silhouette_weight,
    crisp_weight=config.crisp_weight,
    latent_noise=config.latent_noise,
  )
  return fit + real_loss, {"fit": fit, "real": real_loss}


def draw_batch(
  rng: np.random.Generator, specs: Sequence[D.Spec], size: int, square_weight: float
) -> np.ndarray:
  """``size`` distinct indices into ``specs`` (the fitted samples' captions), a square's
  ``square_weight`` times as likely as another shape's."""
  if square_weight == 1.0:
    return rng.choice(len(specs), size, replace=False)
  w = np.array([square_weight if s.shape == "square" else 1.0 for s in specs])
  return rng.choice(len(specs), size, replace=False, p=w / w.sum())


def fit_decoder(
  vae_params: Any,
  vae_config: V.VAEConfig,
  latents: np.ndarray,
  specs: Sequence[D.Spec],
  real_clips: Callable[[int], np.ndarray],
  config: DecoderFitConfig,
  out_dir: str | pathlib.Path,
  *,
  progress: bool = True,
) -> tuple[Any, list[list[dict]]]:
  """Runs the rounds (module docstring); round r resumes from ``out_dir/round<r>``.

  real_clips(step): uint8 renders (real_batch, T, H, W, 3) of that step.
  Returns (the VAE params with the fitted decoder, as numpy; each round's loss log).
  """
  encoder = jax.tree.map(jnp.asarray, vae_params["encoder"])
  decoder = vae_params["decoder"]
  program = jax.jit(lambda p, z: V.decode(p, z, config=vae_config, chunking="released"))

  def loss_fn(dec, batch, key):
    return fit_loss(dec, batch, key, encoder=encoder, vae_config=vae_config, config=config)

  logs = []
  for r, steps in enumerate(config.rounds):
    per_frame, square_weight = config.for_round(r)

    def decode(z, dec=decoder):
      return video_io.to_uint8(np.asarray(program({"encoder": encoder, "decoder": dec}, jnp.asarray(z))))

    fitted = {}  # the round's targets, fitted on its first step (a finished round never needs them)

    def batches(step, decode=decode, fitted=fitted, r=r, per_frame=per_frame, square_weight=square_weight):
      if not fitted:
        fitted["keep"], fitted["targets"] = fitted_targets(decode, latents, specs, per_frame=per_frame)
        if len(fitted["keep"]) < config.batch_size:
          raise RuntimeError(
            f"decoder_fitting: only {len(fitted['keep'])} of {len(latents)} decoded samples show a shape, "
            f"fewer than batch_size {config.batch_size}; is the transformer trained?"
          )
        fitted["specs"] = [specs[k] for k in fitted["keep"]]
      keep, targets = fitted["keep"], fitted["targets"]
      rng = np.random.default_rng([config.seed, r, step])
      idx = draw_batch(rng, fitted["specs"], config.batch_size, square_weight)
      real = video_io.from_uint8(real_clips(step + 100_000 * r))
      return latents[keep[idx]], video_io.from_uint8(targets[idx]), real

    decoder, rows = loop.train(
      loss_fn,
      decoder,
      batches,
      dataclasses.replace(config, steps=steps, seed=config.seed + r),
      pathlib.Path(out_dir) / f"round{r}",
      desc=f"decoder fitting {r + 1}/{len(config.rounds)}",
      progress=progress,
    )
    logs.append(rows)
  return {"encoder": jax.tree.map(np.asarray, vae_params["encoder"]), "decoder": decoder}, logs
