"""Trains a (small) CogVideoX 3D causal VAE from scratch: reconstruction + a light KL term.

    loss = mean |x_hat - x| + mean (x_hat - x)^2 + kl_weight * KL(q(z|x) || N(0, I)) / elements
           + edge_weight * mean over edge pixels |x_hat - x|
           + gradient_weight * (mean |d_x x_hat - d_x x| + mean |d_y x_hat - d_y x|)
           + silhouette_weight * (mean over shape pixels relu(0.2 - b_hat)
                                  + mean over background pixels relu(b_hat + 0.7))
    z ~ q(z|x) (reparameterised), x_hat = decode(z), video x in [-1, 1]

Edge pixels are those within 2 pixels of an edge of the target: where the brightest channel's
maximum and minimum over a 5 x 5 window differ by more than 0.5 (a quarter of the [-1, 1] range).
The demo's shapes are flat colours on black, so the plain terms are dominated by the background and
the shape interiors, and the corners that tell a square from a circle, or a triangle's apex and base
corners, are what a small VAE loses first; the two extra terms weigh those pixels (off by default).

The silhouette term asks for a crisp outline instead: ``b_hat`` is the reconstruction's brightest
channel, shape pixels are those where the target's brightest channel is above 0 (the middle of the
range), and every reconstructed pixel should be clearly on its own side: at least 0.2 inside the
shape, at most -0.7 outside it (hinge margins either side of the detectors' foreground threshold,
96/255, i.e. -0.25). Each side is averaged over its own pixels, so the shape weighs as much, in
all, as the far larger background. A blurred edge or a rounded corner costs nothing in
plain L1 terms once it is a pixel wide, but every pixel of it on the wrong side costs here.
Measured on the demo recipe's VAE trained 400 steps on single frames of shapes 1.4x the domain's
size (2026-12-04): the detectors read the shape of reconstructed train-caption frames right 0.86
of the time without the term and 0.97 with it at weight 1 (held-out captions: 0.93 and 1.00).

Clips are encoded whole (as ``data.prepare`` encodes them) and decoded with the chunking sampling
uses (``decode_chunking``, default the released [0:3], [3:5], ... with the conv cache carried), so
the decoder learns the path it runs at inference. The VAE trains with ``scaling_factor = 1``;
afterwards ``latent_scale`` measures the standard deviation of the posterior means over a sample of
clips and the saved config gets ``scaling_factor = 1 / std``, so the transformer sees unit-variance
latents (what the released factor 1.15258426 does for CogVideoX; docs/sampling.md, 'Latent scaling factor').
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from repvideo_jax import vae as V
from repvideo_jax import video_io
from repvideo_jax.demo import loop


@dataclasses.dataclass(frozen=True)
class VAETrainConfig(loop.LoopConfig):
  steps: int = 1000  # in all, image steps included
  batch_size: int = 4
  lr: float = 1e-3
  warmup_steps: int = 50
  frames: int = 17  # clip length the VAE trains on (8k + 1: an odd number of latent frames)
  image_steps: int = 0  # first steps on single frames
  image_batch_size: int = 32
  decode_chunking: str = "released"  # as pipeline.decode_latents decodes an odd latent count
  kl_weight: float = 1e-4
  edge_weight: float = 0.0  # L1 on the pixels near the target's edges (module docstring)
  gradient_weight: float = 0.0  # L1 on the spatial finite differences
  silhouette_weight: float = 0.0  # hinge on the brightest channel either side of the outline

  def __post_init__(self):
    for name in ("kl_weight", "edge_weight", "gradient_weight", "silhouette_weight"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"vae_training.{name} must be a finite number >= 0, got {value}")


def loss_terms(
  params,
  video: jax.Array,
  key: jax.Array,
  *,
  config: V.VAEConfig,
  kl_weight: float,
  chunking: str = "released",
  edge_weight: float = 0.0,
  gradient_weight: float = 0.0,
  silhouette_weight: float = 0.0,
):
  """(loss, {l1, mse, kl, edge, gradient, silhouette}) for a batch of videos (B, T, H, W, 3) in [-1, 1]."""
  post = V.encode_posterior(params, video, config=config)
  z = post.sample(key)
  recon = V.decode(
    params, z * config.scaling_factor, config=config, chunking=chunking, scan_chunks=False
  ).astype(jnp.float32)  # unrolled: its gradient is far faster on CPU
  target = video.astype(jnp.float32)
  err = recon - target
  l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
  kl = 0.5 * jnp.mean(jnp.square(post.mean) + jnp.exp(post.logvar) - 1.0 - post.logvar)
  band = edge_band(target)
  edge = jnp.sum(band * jnp.abs(err)) / (3.0 * jnp.sum(band) + 1.0)
  gradient = sum(jnp.mean(jnp.abs(jnp.diff(recon, axis=a) - jnp.diff(target, axis=a))) for a in (2, 3))
  sil = silhouette(recon, target)
  loss = l1 + mse + kl_weight * kl + edge_weight * edge + gradient_weight * gradient + silhouette_weight * sil
  return loss, {"l1": l1, "mse": mse, "kl": kl, "edge": edge, "gradient": gradient, "silhouette": sil}


SILHOUETTE_INSIDE = 0.2  # a shape pixel's brightest channel should be at least this
SILHOUETTE_OUTSIDE = -0.7  # a background pixel's brightest channel should be at most this


def silhouette(recon: jax.Array, target: jax.Array) -> jax.Array:
  """The silhouette hinge (module docstring) of ``recon`` against ``target``, (B, T, H, W, 3) in [-1, 1]."""
  bright = jnp.max(recon, axis=-1)
  inside = (jnp.max(target, axis=-1) > 0).astype(jnp.float32)
  outside = 1.0 - inside
  miss_in = jnp.sum(inside * jax.nn.relu(SILHOUETTE_INSIDE - bright)) / (jnp.sum(inside) + 1.0)
  miss_out = jnp.sum(outside * jax.nn.relu(bright - SILHOUETTE_OUTSIDE)) / (jnp.sum(outside) + 1.0)
  return miss_in + miss_out


def edge_band(video: jax.Array) -> jax.Array:
  """(B, T, H, W, 1) float mask of the pixels within 2 pixels of an edge of ``video`` (in [-1, 1]):
  the brightest channel's max and min over a 5 x 5 window differ by more than 0.5."""
  lum = jnp.max(video, axis=-1, keepdims=True)
  window, strides = (1, 1, 5, 5, 1), (1, 1, 1, 1, 1)
  hi = jax.lax.reduce_window(lum, -jnp.inf, jax.lax.max, window, strides, "SAME")
  lo = -jax.lax.reduce_window(-lum, -jnp.inf, jax.lax.max, window, strides, "SAME")
  return (hi - lo > 0.5).astype(jnp.float32)


def train(
  config: V.VAEConfig,
  train_config: VAETrainConfig,
  clips: Callable[[int], np.ndarray],
  out_dir: str | pathlib.Path,
  *,
  images: Callable[[int], np.ndarray] | None = None,
  progress: bool = True,
  stop_at: int | None = None,
):
  """Trains from scratch (or resumes in ``out_dir``). ``clips(step)`` gives that step's batch of
  uint8 (B, frames, H, W, 3) videos, ``images(step)`` (needed when ``image_steps`` > 0) a batch of
  single frames (B, 1, H, W, 3): the VAE is causal, so a frame alone is a 1-frame clip and teaches
  the spatial part at a ninth of a 9-frame clip's cost. Returns (params, log rows); the params go
  with ``config`` (whose ``scaling_factor`` should be 1 while training: see ``latent_scale``).
  ``stop_at``: end early with a checkpoint, as a preempted run would (see ``loop.train``)."""
  tc = train_config
  r = config.temporal_compression_ratio
  if (tc.frames - 1) % (2 * r):
    # An even latent count decodes to r frames per latent (no lone first frame): no round trip.
    raise ValueError(
      f"vae_training.frames={tc.frames} must be {2 * r}k+1 (1, {2 * r + 1}, "
      f"{4 * r + 1}, ...) so that the clip has an odd number of latent frames and "
      f"decodes back to {tc.frames} frames"
    )
  if tc.image_steps and images is None:
    raise ValueError("vae_training.image_steps > 0 needs an images(step) batch function")
  params = V.init(config, jax.random.key(tc.seed))

  def loss_fn(p, video, key):
    return loss_terms(
      p,
      video,
      key,
      config=config,
      kl_weight=tc.kl_weight,
      chunking=tc.decode_chunking,
      edge_weight=tc.edge_weight,
      gradient_weight=tc.gradient_weight,
      silhouette_weight=tc.silhouette_weight,
    )

  def batches(step):
    if step < tc.image_steps:
      return jnp.asarray(video_io.from_uint8(images(step)))
    return jnp.asarray(video_io.from_uint8(clips(step)))

  return loop.train(loss_fn, params, batches, tc, out_dir, desc="vae", progress=progress, stop_at=stop_at)


def latent_scale(params, config: V.VAEConfig, videos: np.ndarray, batch_size: int = 8) -> float:
  """1 / std of the unscaled posterior means of ``videos`` (uint8, (N, T, H, W, 3))."""
  encode = jax.jit(lambda p, x: V.encode_posterior(p, x, config=config).mean)
  means = [
    np.asarray(encode(params, jnp.asarray(video_io.from_uint8(videos[i : i + batch_size]))))
    for i in range(0, len(videos), batch_size)
  ]
  return float(1.0 / np.std(np.concatenate(means)))
