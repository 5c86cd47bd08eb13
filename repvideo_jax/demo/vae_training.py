"""Trains a (small) CogVideoX 3D causal VAE from scratch: reconstruction + a light KL term.

    loss = mean |x_hat - x| + mean (x_hat - x)^2 + kl_weight * KL(q(z|x) || N(0, I)) / elements
           + edge_weight * mean over edge pixels |x_hat - x|
           + gradient_weight * (mean |d_x x_hat - d_x x| + mean |d_y x_hat - d_y x|)
           + silhouette_weight * (mean over shape pixels relu(0.2 - b_hat)
                                  + mean over background pixels relu(b_hat + 0.7))
           + crisp_weight * mean over edge pixels of (relu(0.9 - b_hat) on the shape's side,
                                                      relu(b_hat + 0.9) on the background's)
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

The crisp-edge term (decoder tuning only, ``VAETuneConfig.crisp_weight``) is the same hinge with
margins near the ends of the range, 0.9 and -0.9, averaged over the edge pixels alone. The
silhouette term averages its background side over the whole background, so a one-pixel halo
around a shape costs almost nothing there, and a decoder tuned on noisy latents (below) hedges
its outlines into ramps two pixels wide. Soft outlines overlap more from frame to frame than hard
ones: on 12 held-out clips the tuned decoder's round trips had an adjacent-frame pixel cosine of
0.981 against the renders' 0.943, and the same frames made binary (full colour inside, black
outside) scored 0.944. Measured on the demo recipe, 2026-12-04: 300 decoder steps with the crisp
term at weight 15 brought the held-out evaluation's generated videos from 0.980 to 0.953 (real
renders 0.935), and the same 36 generated latents decoded by either decoder scored the same.

Clips are encoded whole (as ``data.prepare`` encodes them) and decoded with the chunking sampling
uses (``decode_chunking``, default the released [0:3], [3:5], ... with the conv cache carried), so
the decoder learns the path it runs at inference. The VAE trains with ``scaling_factor = 1``;
afterwards ``latent_scale`` measures the standard deviation of the posterior means over a sample of
clips and the saved config gets ``scaling_factor = 1 / std``, so the transformer sees unit-variance
latents (what the released factor 1.15258426 does for CogVideoX; docs/sampling.md, 'Latent scaling factor').

Optional steps after training make the VAE easier for a transformer to generate for:
``standardize_latents`` (the demo build's ``vae_tuning`` stage) rewrites the weights so that every
latent channel has mean 0 and standard deviation 1 (one scaling factor cannot undo per-channel
offsets), and ``tune_decoder`` (its ``decoder`` stage) trains the decoder alone on noisy latents, so
that small errors in generated latents decode to small errors in the frames. ``tune_vae`` (in the
``vae_tuning`` stage too, off in the demo recipe) trains the encoder as well on noisy latents, so
that the latents keep what tells shapes apart with a margin.
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
    _check_nonnegative(
      self, "vae_training", ("kl_weight", "edge_weight", "gradient_weight", "silhouette_weight")
    )


def _check_nonnegative(config, section: str, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(config, name)
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"{section}.{name} must be a finite number >= 0, got {value}")


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
  crisp_weight: float = 0.0,
  latent_noise: float = 0.0,
  relative_noise: float = 0.0,
):
  """(loss, {l1, mse, kl, edge, gradient, silhouette, crisp}) for a batch of videos (B, T, H, W, 3) in [-1, 1].
  ``latent_noise``: Gaussian noise of standard deviation ``latent_noise * u`` (u ~ U(0, 1), one per
  video) is added to the scaled latents before they are decoded (``VAETuneConfig``).
  ``relative_noise``: the same, of standard deviation ``relative_noise * u`` times each latent
  channel's standard deviation over the batch's posterior means (a constant to the gradient), so an
  encoder that is trained too cannot shrink the noise by scaling its latents up (``tune_vae``)."""
  post = V.encode_posterior(params, video, config=config)
  z = post.sample(key) * config.scaling_factor
  if latent_noise or relative_noise:
    noise_key, level_key = jax.random.split(jax.random.fold_in(key, 1))
    largest = latent_noise
    if relative_noise:  # per channel, over the batch and every latent position
      spread = jnp.std(post.mean * config.scaling_factor, axis=tuple(range(z.ndim - 1)))
      largest = largest + relative_noise * jax.lax.stop_gradient(spread)
    u = jax.random.uniform(level_key, (z.shape[0],) + (1,) * (z.ndim - 1))
    z = z + u * largest * jax.random.normal(noise_key, z.shape, z.dtype)
  recon = V.decode(params, z, config=config, chunking=chunking, scan_chunks=False).astype(
    jnp.float32
  )  # unrolled: its gradient is far faster on CPU
  target = video.astype(jnp.float32)
  err = recon - target
  l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
  kl = 0.5 * jnp.mean(jnp.square(post.mean) + jnp.exp(post.logvar) - 1.0 - post.logvar)
  band = edge_band(target)
  edge = jnp.sum(band * jnp.abs(err)) / (3.0 * jnp.sum(band) + 1.0)
  gradient = sum(jnp.mean(jnp.abs(jnp.diff(recon, axis=a) - jnp.diff(target, axis=a))) for a in (2, 3))
  sil = silhouette(recon, target)
  crisp = crisp_edges(recon, target, band)
  loss = (
    l1
    + mse
    + kl_weight * kl
    + edge_weight * edge
    + gradient_weight * gradient
    + silhouette_weight * sil
    + crisp_weight * crisp
  )
  metrics = {
    "l1": l1,
    "mse": mse,
    "kl": kl,
    "edge": edge,
    "gradient": gradient,
    "silhouette": sil,
    "crisp": crisp,
  }
  return loss, metrics


SILHOUETTE_INSIDE = 0.2  # a shape pixel's brightest channel should be at least this
SILHOUETTE_OUTSIDE = -0.7  # a background pixel's brightest channel should be at most this


CRISP_MARGIN = 0.9  # on an edge, shape pixels' brightest channel >= 0.9, background's <= -0.9


def _misses(recon: jax.Array, target: jax.Array, inside_at: float, outside_at: float):
  """Per pixel (B, T, H, W): how far the reconstruction's brightest channel is on the wrong side of
  ``inside_at`` (shape pixels) or ``outside_at`` (background pixels), and the shape mask."""
  bright = jnp.max(recon, axis=-1)
  inside = (jnp.max(target, axis=-1) > 0).astype(jnp.float32)
  return inside * jax.nn.relu(inside_at - bright), (1.0 - inside) * jax.nn.relu(bright - outside_at), inside


def silhouette(recon: jax.Array, target: jax.Array) -> jax.Array:
  """The silhouette hinge (module docstring) of ``recon`` against ``target``, (B, T, H, W, 3) in [-1, 1]."""
  miss_in, miss_out, inside = _misses(recon, target, SILHOUETTE_INSIDE, SILHOUETTE_OUTSIDE)
  return jnp.sum(miss_in) / (jnp.sum(inside) + 1.0) + jnp.sum(miss_out) / (jnp.sum(1.0 - inside) + 1.0)


def crisp_edges(recon: jax.Array, target: jax.Array, band: jax.Array | None = None) -> jax.Array:
  """The crisp-edge hinge (module docstring): margins +-``CRISP_MARGIN``, averaged over ``band``
  (``edge_band(target)``, computed here unless the caller already has it)."""
  miss_in, miss_out, _ = _misses(recon, target, CRISP_MARGIN, -CRISP_MARGIN)
  band = (edge_band(target) if band is None else band)[..., 0]
  return jnp.sum(band * (miss_in + miss_out)) / (jnp.sum(band) + 1.0)


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
    return _videos(images if step < tc.image_steps else clips)(step)

  return loop.train(loss_fn, params, batches, tc, out_dir, desc="vae", progress=progress, stop_at=stop_at)


def _videos(batch: Callable[[int], np.ndarray]) -> Callable[[int], jax.Array]:
  """``batch(step)``'s uint8 videos as the [-1, 1] arrays the losses take."""
  return lambda step: jnp.asarray(video_io.from_uint8(batch(step)))


def posterior_means(params, config: V.VAEConfig, videos: np.ndarray, batch_size: int = 8) -> np.ndarray:
  """The unscaled posterior means of ``videos`` (uint8, (N, T, H, W, 3)), (N, t, h, w, latent)."""
  encode = jax.jit(lambda p, x: V.encode_posterior(p, x, config=config).mean)
  return np.concatenate(
    [
      np.asarray(encode(params, jnp.asarray(video_io.from_uint8(videos[i : i + batch_size]))))
      for i in range(0, len(videos), batch_size)
    ]
  )


def latent_statistics(params, config: V.VAEConfig, videos: np.ndarray, batch_size: int = 8):
  """(mean, std) per latent channel of the unscaled posterior means of ``videos`` (uint8)."""
  means = posterior_means(params, config, videos, batch_size).reshape(-1, config.latent_channels)
  return means.mean(axis=0), means.std(axis=0)


def standardize_latents(params, config: V.VAEConfig, mean: np.ndarray, std: np.ndarray):
  """Rewrites a trained VAE's weights so that its latents become (z - mean) / std per channel.

  A VAE trained at a small KL weight gives latents whose channels have offsets of several of their
  own standard deviations (the demo's: offsets up to 1.6, spreads 0.06-0.7). One scaling factor
  cannot make those unit-variance: it divides by the spread of everything, offsets included, so the
  part that carries the picture is left at a third of the noise schedule's scale, and the transformer
  meets every noise level at a lower signal-to-noise ratio than the schedule intends. Standardizing
  per channel fixes that inside the CogVideoX format (one ``scaling_factor``, no shift):

  - the encoder's output conv makes the new posterior directly: its mean channels' kernel and bias
    are divided by ``std`` after the bias loses ``mean``, and its log-variance bias loses
    ``2 log std`` (exact);
  - the decoder's convs that read the latent undo it: the 1x1x1 ``conv_y`` / ``conv_b`` of every
    spatial norm (exact), and ``conv_in`` (exact except where its 3x3 window overlaps the zero
    padding of the frame's border, which now stands for ``mean`` instead of 0; ``tune_decoder``
    trains that away).

  Returns (params, config with ``scaling_factor`` 1, for ``latent_scale`` to measure again)."""
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  c = config.latent_channels
  if mean.shape != (c,) or std.shape != (c,) or not (std > 0).all():
    raise ValueError(f"expected {c} channel means and positive stds, got {mean.shape} and {std}")
  params = jax.tree.map(lambda x: np.array(x, np.float32), params)
  conv = params["encoder"]["conv_out"]
  kernel, bias = conv["kernel"].astype(np.float64), conv["bias"].astype(np.float64)
  kernel[..., :c] /= std
  bias[:c] = (bias[:c] - mean) / std
  bias[c:] -= 2.0 * np.log(std)
  conv["kernel"], conv["bias"] = kernel.astype(np.float32), bias.astype(np.float32)

  def unstandardize(conv):  # conv(std * z' + mean) as a conv of z'
    kernel = conv["kernel"].astype(np.float64)  # (t, h, w, latent, out)
    conv["bias"] = (conv["bias"] + np.einsum("thwio,i->o", kernel, mean)).astype(np.float32)
    conv["kernel"] = (kernel * std[:, None]).astype(np.float32)

  unstandardize(params["decoder"]["conv_in"])

  def visit(tree):
    for name, sub in tree.items():
      if name in ("conv_y", "conv_b"):
        unstandardize(sub)
      elif isinstance(sub, dict):
        visit(sub)

  visit(params["decoder"])
  return params, dataclasses.replace(config, scaling_factor=1.0)


@dataclasses.dataclass(frozen=True)
class VAETuneConfig(loop.LoopConfig):
  """After training: ``standardize`` the latents per channel (``standardize_latents``), tune the whole
  VAE on noisy latents for ``joint_steps`` steps (``tune_vae``; 0 skips it) and standardize again,
  then, after the records, tune the decoder alone on noisy latents for ``steps`` steps
  (``tune_decoder``; 0 skips it). Both tunings share the optimizer settings and the silhouette term."""

  standardize: bool = False
  joint_steps: int = 0
  joint_noise: float = 0.5  # the largest noise std, in units of each channel's spread (tune_vae)
  steps: int = 0
  batch_size: int = 4
  lr: float = 1e-3
  warmup_steps: int = 20
  frames: int = 17
  decode_chunking: str = "released"
  latent_noise: float = 0.2  # the largest noise standard deviation, in scaled-latent units
  silhouette_weight: float = 0.0
  crisp_weight: float = 0.0  # hinge towards hard outlines on the edge pixels (module docstring)

  def __post_init__(self):
    _check_nonnegative(
      self, "vae_tuning", ("latent_noise", "joint_noise", "silhouette_weight", "crisp_weight")
    )
    if self.joint_steps < 0:
      raise ValueError(f"vae_tuning.joint_steps must be >= 0, got {self.joint_steps}")


def tune_decoder(
  params,
  config: V.VAEConfig,
  tune_config: VAETuneConfig,
  clips: Callable[[int], np.ndarray],
  out_dir: str | pathlib.Path,
  *,
  progress: bool = True,
  stop_at: int | None = None,
):
  """Trains the decoder of a trained VAE to map noisy latents to the clean clip; the encoder is
  frozen, so latents already encoded with it (the transformer's training records) stay valid.

  A diffusion model's latents are never exactly on the encoder's manifold. A decoder trained only on
  the encoder's own posterior samples (whose spread is tiny at a small KL weight) turns small latent
  errors into holes, specks and wrong colours, and a square's corners are the first thing lost. Here
  each clip's scaled latents get Gaussian noise of standard deviation ``latent_noise * u``, u ~ U(0, 1)
  per clip, so the decoder also sees the clean case. ``config`` must carry the VAE's measured
  ``scaling_factor``: the noise is in the units the transformer works in. Resumes in ``out_dir``.
  Returns (params with the tuned decoder, log rows)."""
  tc = tune_config
  encoder = jax.tree.map(jnp.asarray, params["encoder"])

  def loss_fn(decoder, video, key):
    return loss_terms(
      {"encoder": encoder, "decoder": decoder},
      video,
      key,
      config=config,
      kl_weight=0.0,
      chunking=tc.decode_chunking,
      silhouette_weight=tc.silhouette_weight,
      crisp_weight=tc.crisp_weight,
      latent_noise=tc.latent_noise,
    )

  decoder, rows = loop.train(
    loss_fn,
    params["decoder"],
    _videos(clips),
    tc,
    out_dir,
    desc="decoder",
    progress=progress,
    stop_at=stop_at,
  )
  return {"encoder": jax.tree.map(np.asarray, params["encoder"]), "decoder": decoder}, rows


def tune_vae(
  params,
  config: V.VAEConfig,
  tune_config: VAETuneConfig,
  clips: Callable[[int], np.ndarray],
  out_dir: str | pathlib.Path,
  *,
  kl_weight: float,
  progress: bool = True,
  stop_at: int | None = None,
):
  """Trains the whole VAE, encoder included, for ``joint_steps`` steps on latents with noise relative
  to each channel's spread (``loss_terms``' ``relative_noise`` up to ``joint_noise``), so that what
  tells shapes apart is encoded with a margin that small latent errors do not cross.

  ``tune_decoder`` makes the decoder tolerate noise, but with the encoder frozen it can only hedge:
  on the demo VAE a square's corners were lost once its latents had noise of std 0.2-0.3, and a
  transformer's one-step estimates are off by about that much. Training the encoder too spreads
  the difference between shapes over more of the latent. Measured on the demo recipe (2026-12-04),
  300 steps at ``joint_noise`` 0.5, standardized again: the latent distance from 8 squares to the
  circles on the same paths grew from 10.5 to 14.9, and with the decoder stage after it, 4 of the 8
  kept their corners under latent noise of std 0.3, against 0 of 8 without this step. The
  transformer trained on those latents still drew no square (0 of 28 training captions), so the
  demo recipe leaves it off (``vae_tuning.joint_steps`` 0). The latents change, so they are
  standardized again afterwards. Resumes in ``out_dir``. Returns (params, log rows)."""
  tc = tune_config

  def loss_fn(p, video, key):
    return loss_terms(
      p,
      video,
      key,
      config=config,
      kl_weight=kl_weight,
      chunking=tc.decode_chunking,
      silhouette_weight=tc.silhouette_weight,
      relative_noise=tc.joint_noise,
    )

  loop_config = dataclasses.replace(tc, steps=tc.joint_steps)
  return loop.train(
    loss_fn,
    params,
    _videos(clips),
    loop_config,
    out_dir,
    desc="vae tuning",
    progress=progress,
    stop_at=stop_at,
  )


def latent_scale(params, config: V.VAEConfig, videos: np.ndarray, batch_size: int = 8) -> float:
  """1 / std of the unscaled posterior means of ``videos`` (uint8, (N, T, H, W, 3))."""
  return float(1.0 / np.std(posterior_means(params, config, videos, batch_size)))
