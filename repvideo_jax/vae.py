"""The CogVideoX 3D causal VAE: encoder, decoder, posterior, chunked and tiled runs.

Reading order: config -> primitive ops (causal conv, group norm, resizes) -> layers (ResnetBlock3D,
Downsample3D, Upsample3D, SpatialNorm3D) -> ``Encoder`` / ``Decoder`` -> temporal chunking with a
carried conv cache -> spatial tiling -> the pure functional API (``init`` / ``encode`` / ``decode``).

Layout conventions (channels last, as everywhere in this package):
  video    (B, T, H, W, 3)       T = 1 + 4k pixel frames, values in [-1, 1], H and W divisible by 8
  latents  (B, t, h, w, 16)      t = 1 + k latent frames, h = H/8, w = W/8
``encode`` returns *scaled* latents ``z * scaling_factor`` (what the transformer sees); ``decode``
takes scaled latents and divides by ``scaling_factor`` itself. ``encode_posterior`` exposes the
unscaled posterior (mean, logvar).

Temporal chunking (the conv cache). Every k=3 causal conv pads time at the front with k-1 = 2
frames: copies of the first frame, or the last 2 frames of its (padded) input in the previous chunk.
The per-conv caches form a plain pytree (nested dict of (B, 2, H, W, C) arrays) carried from chunk to
chunk, so a chunked run is ``first chunk`` followed by a ``lax.scan`` over equal-size chunks and
jits as one program. GroupNorm statistics are per chunk, so the chunking changes the numbers.
Chunkings (``chunk_bounds``):
  'released'  decode only: SAT ``sample_video.py`` -- latent frames [0:3], [3:5], [5:7], ...
              (odd frame counts only, as produced by the pipeline). This is what produced the
              reference videos (docs/sampling.md, 'VAE decode to frames').
  'framewise' diffusers' ``AutoencoderKLCogVideoX._decode`` / ``_encode`` -- batches of
              ``frame_batch`` frames (2 latent frames for decode, 8 pixel frames for encode), the
              first batch taking the remainder (``frame_batch + T % frame_batch`` frames). For odd
              latent frame counts its decode chunks are exactly the 'released' ones.
  'whole'     one pass over the whole clip (how the SAT engine encodes).
Public API: ``VAEConfig``, ``init`` / ``abstract_params`` / ``merge`` / ``create``, ``encode`` (scaled
latents), ``encode_posterior`` (unscaled ``Posterior(mean, logvar)``), ``decode``, ``decode_chunk``
(streaming, explicit cache), ``postprocess``, ``chunk_bounds``, ``TilingConfig``, ``make_encode`` /
``make_decode``. Weights: ``repvideo_jax.vae_weights.load`` / ``save``.

Spatial tiling (``TilingConfig``) follows diffusers' ``tiled_decode`` / ``tiled_encode``: overlapping
tiles, each run with the chosen temporal chunking, linearly blended with the tile above and the tile
to the left, then cropped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repvideo_jax import sharding
from repvideo_jax.functional import DTYPES, Functional, annotate

Cache = dict[str, Any]  # nested dict of per-conv (B, k-1, H, W, C) arrays
CHUNKINGS = ("released", "framewise", "whole")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of the VAE. Defaults are the released CogVideoX (2B) VAE, ``3d-vae.pt``."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
  layers_per_block: int = 3  # encoder; decoder levels have layers_per_block + 1 resnets
  latent_channels: int = 16
  norm_num_groups: int = 32
  norm_eps: float = 1e-6  # resnet GroupNorms; norm_out and SpatialNorm use 1e-6 as in the reference
  temporal_compression_ratio: int = 4
  scaling_factor: float = 1.15258426  # latent scale (docs/sampling.md): z_model = z_vae * scaling_factor
  sample_height: int = 480  # only used for the default tile size (half of it), like diffusers
  sample_width: int = 720
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  # How causal 3D convs are computed (same numbers): 'native' = one 3D convolution, 'taps' = a sum of
  # k per-frame 2D convolutions (about 3x faster forward and backward on XLA:CPU, whose 3D convolution
  # is slow; more live temporaries), 'auto' = 'taps' on CPU, 'native' on GPU/TPU.
  conv3d: Literal["auto", "native", "taps"] = "auto"

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def time_levels(self) -> int:
    """Number of levels that compress (encoder) / expand (decoder) time by 2."""
    return int(math.log2(self.temporal_compression_ratio))

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name} must be one of {list(DTYPES)}, got {getattr(self, name)!r}")
    if self.conv3d not in ("auto", "native", "taps"):
      raise ValueError(f"conv3d must be 'auto', 'native' or 'taps', got {self.conv3d!r}")
    tcr = self.temporal_compression_ratio
    if tcr < 1 or 2**self.time_levels != tcr or self.time_levels > len(self.block_out_channels) - 1:
      raise ValueError(
        f"temporal_compression_ratio must be a power of 2 up to {self.spatial_compression}, got {tcr}"
      )
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"block_out_channels {self.block_out_channels} must all be divisible by "
          f"norm_num_groups={self.norm_num_groups}"
        )

  def latent_frames(self, frames: int) -> int:
    """Latent frames for ``frames`` video frames (1 + 4k -> 1 + k)."""
    return (frames - 1) // self.temporal_compression_ratio + 1

  def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a ``frames x height x width`` video: the one
    place the VAE's compression turns video sizes into latent sizes."""
    s = self.spatial_compression
    return self.latent_frames(frames), height // s, width // s

  def conv3d_impl(self) -> str:
    """The causal 3D conv implementation in effect: ``conv3d``, with 'auto' resolved for the platform
    the computation is placed on (``sharding.target_platform``, read at trace time)."""
    if self.conv3d != "auto":
      return self.conv3d
    return "taps" if sharding.target_platform() == "cpu" else "native"


# ----------------------------------------------------------------------------------------------
# Primitive ops (channels last).


def _causal_pad(x: jax.Array, k: int, cache: jax.Array | None) -> jax.Array:
  """Front time padding of k-1 frames: the cache (previous chunk) or copies of the first frame."""
  if cache is None:
    front = jnp.repeat(x[:, :1], k - 1, axis=1)
  else:
    front = cache.astype(x.dtype)
  return jnp.concatenate([front, x], axis=1)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
  """GroupNorm of (B, T, H, W, C) over (C/groups, T, H, W) per sample; float32 two-pass statistics."""
  b, t, h, w, c = x.shape
  xf = x.astype(jnp.float32).reshape(b, t * h * w, groups, c // groups)
  mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
  y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, t, h, w, c)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch 'nearest' source indices: floor(i * n_in / n_out)."""
  return (np.arange(n_out) * n_in) // n_out


def nearest_resize(x: jax.Array, size: tuple[int, int, int]) -> jax.Array:
  """Nearest-neighbour resize of (B, T, H, W, C) to (T', H', W') (PyTorch ``interpolate`` rule)."""
  for axis, n_out in zip((1, 2, 3), size):
    n_in = x.shape[axis]
    if n_in == n_out:
      continue
    if n_out % n_in == 0:  # integer upscale: a repeat (its gradient is a reshape-sum, not a scatter)
      x = jnp.repeat(x, n_out // n_in, axis=axis)
    else:
      x = jnp.take(x, jnp.asarray(_nearest_indices(n_in, n_out)), axis=axis)
  return x


def _upsample2x(x: jax.Array, time: bool) -> jax.Array:
  x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
  return jnp.repeat(x, 2, axis=1) if time else x


def _lecun(in_axis, out_axis):
  return nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=in_axis, out_axis=out_axis)


# ----------------------------------------------------------------------------------------------
# Layers.


class CausalConv3d(nnx.Module):
  """Conv3d (k, k, k), time padded causally (replicated first frame or cache), space zero padded.

  Kernel layout [kt, kh, kw, in, out]. ``__call__(x, cache) -> (y, new_cache)``; ``new_cache`` is the
  last k-1 frames of the time-padded input (None for k = 1).
  """

  def __init__(self, cfg: VAEConfig, cin: int, cout: int, k: int, *, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    self.k = k
    self.dtype = DTYPES[cfg.dtype]
    self.impl = cfg.conv3d_impl()
    self.kernel = nnx.Param(
      annotate(_lecun(in_axis=(0, 1, 2, 3), out_axis=4), (None, None, None, "conv_in", "conv_out"))(
        rngs.params(), (k, k, k, cin, cout), pdt
      )
    )
    self.bias = nnx.Param(jnp.zeros((cout,), pdt), logical_axes=("conv_out",))

  def __call__(self, x: jax.Array, cache: jax.Array | None = None):
    k = self.k
    x = x.astype(self.dtype)
    new_cache = None
    if k > 1:
      x = _causal_pad(x, k, cache)
      new_cache = x[:, -(k - 1) :]
    p = (k - 1) // 2
    kernel = self.kernel[...].astype(self.dtype)
    if self.impl == "native":
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1, 1),
        padding=((0, 0), (p, p), (p, p)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      )
    else:  # 'taps': output frame t = sum over taps i of conv2d(input frame t + i, kernel[i])
      b, t_in, h, w, c = x.shape
      t_out = t_in - (k - 1)
      y = 0
      for i in range(k):
        frames = x[:, i : i + t_out].reshape(b * t_out, h, w, c)
        y = y + jax.lax.conv_general_dilated(
          frames,
          kernel[i],
          window_strides=(1, 1),
          padding=((p, p), (p, p)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
      y = y.reshape(b, t_out, h, w, -1)
    return y + self.bias[...].astype(self.dtype), new_cache


class PointConv(nnx.Module):
  """1x1x1 Conv3d (kernel [1, 1, 1, in, out]); no time context, so no cache."""

  def __init__(self, cfg: VAEConfig, cin: int, cout: int, *, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    self.dtype = DTYPES[cfg.dtype]
    self.kernel = nnx.Param(
      annotate(_lecun(in_axis=(0, 1, 2, 3), out_axis=4), (None, None, None, "conv_in", "conv_out"))(
        rngs.params(), (1, 1, 1, cin, cout), pdt
      )
    )
    self.bias = nnx.Param(jnp.zeros((cout,), pdt), logical_axes=("conv_out",))

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...].astype(self.dtype)[0, 0, 0]
    return jnp.einsum("bthwi,io->bthwo", x.astype(self.dtype), w) + self.bias[...].astype(self.dtype)


class Conv2d(nnx.Module):
  """Per-frame Conv2d, kernel HWIO [kh, kw, in, out], explicit spatial padding and stride."""

  def __init__(self, cfg: VAEConfig, cin: int, cout: int, *, stride: int, padding, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    self.dtype = DTYPES[cfg.dtype]
    self.stride = stride
    self.padding = padding
    self.kernel = nnx.Param(
      annotate(_lecun(in_axis=(0, 1, 2), out_axis=3), (None, None, "conv_in", "conv_out"))(
        rngs.params(), (3, 3, cin, cout), pdt
      )
    )
    self.bias = nnx.Param(jnp.zeros((cout,), pdt), logical_axes=("conv_out",))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype).reshape(b * t, h, w, c),
      self.kernel[...].astype(self.dtype),
      window_strides=(self.stride, self.stride),
      padding=self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(b, t, *y.shape[1:])


class GroupNorm(nnx.Module):
  def __init__(self, cfg: VAEConfig, channels: int, eps: float, *, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    self.groups = cfg.norm_num_groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,), pdt), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((channels,), pdt), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return group_norm(x, self.scale[...], self.bias[...], self.groups, self.eps)


class SpatialNorm3D(nnx.Module):
  """Decoder norm: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest) to f's grid (the 1x1
  convs are applied on zq's own grid, then resized: the same numbers).

  When f has an odd number of frames above 1, zq's first frame maps to f's first frame alone and the
  remaining latent frames are resized to the remaining T - 1 frames.
  """

  def __init__(self, cfg: VAEConfig, channels: int, zq_channels: int, *, rngs: nnx.Rngs):
    self.norm = GroupNorm(cfg, channels, 1e-6, rngs=rngs)
    self.conv_y = PointConv(cfg, zq_channels, channels, rngs=rngs)
    self.conv_b = PointConv(cfg, zq_channels, channels, rngs=rngs)

  def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
    # The 1x1 convs act on each latent pixel alone and nearest resizing only copies pixels, so the
    # convs run on the latent grid and their outputs are resized: the same numbers as resizing zq
    # first (the reference's order), for 1/(upscale factor) of the conv work and memory.
    t, h, w = f.shape[1:4]
    scale, shift = self.conv_y(zq), self.conv_b(zq)

    def resize(x):
      if t > 1 and t % 2 == 1:
        return jnp.concatenate(
          [nearest_resize(x[:, :1], (1, h, w)), nearest_resize(x[:, 1:], (t - 1, h, w))], axis=1
        )
      return nearest_resize(x, (t, h, w))

    return self.norm(f) * resize(scale) + resize(shift)


class ResnetBlock3D(nnx.Module):
  """norm1, swish, conv1, norm2, swish, conv2, + shortcut (1x1x1 conv when channels change).

  Norms are GroupNorm (encoder) or SpatialNorm3D (decoder, when ``zq_channels`` is given).
  """

  def __init__(self, cfg: VAEConfig, cin: int, cout: int, *, zq_channels: int | None = None, rngs: nnx.Rngs):
    if zq_channels is None:
      self.norm1 = GroupNorm(cfg, cin, cfg.norm_eps, rngs=rngs)
      self.norm2 = GroupNorm(cfg, cout, cfg.norm_eps, rngs=rngs)
    else:
      self.norm1 = SpatialNorm3D(cfg, cin, zq_channels, rngs=rngs)
      self.norm2 = SpatialNorm3D(cfg, cout, zq_channels, rngs=rngs)
    self.spatial = zq_channels is not None
    self.conv1 = CausalConv3d(cfg, cin, cout, 3, rngs=rngs)
    self.conv2 = CausalConv3d(cfg, cout, cout, 3, rngs=rngs)
    self.conv_shortcut = PointConv(cfg, cin, cout, rngs=rngs) if cin != cout else None

  def _norm(self, norm, x, zq):
    return norm(x, zq) if self.spatial else norm(x)

  def __call__(self, x: jax.Array, zq: jax.Array | None, cache: Cache | None):
    cache = cache or {}
    h = jax.nn.silu(self._norm(self.norm1, x, zq))
    h, c1 = self.conv1(h, cache.get("conv1"))
    h = jax.nn.silu(self._norm(self.norm2, h, zq))
    h, c2 = self.conv2(h, cache.get("conv2"))  # dropout 0
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return h + x.astype(h.dtype), {"conv1": c1, "conv2": c2}


class Downsample3D(nnx.Module):
  """Optional time average-pool by 2 (frame 0 kept alone when T is odd), then a stride-2 Conv2d
  after zero-padding right and bottom by 1."""

  def __init__(self, cfg: VAEConfig, channels: int, compress_time: bool, *, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = Conv2d(cfg, channels, channels, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.compress_time:
      t = x.shape[1]
      first, rest = (x[:, :1], x[:, 1:]) if t % 2 == 1 else (None, x)
      if rest.shape[1]:
        rest = ((rest[:, 0::2].astype(jnp.float32) + rest[:, 1::2].astype(jnp.float32)) / 2).astype(x.dtype)
      x = rest if first is None else jnp.concatenate([first, rest], axis=1)
    return self.conv(x)


class Upsample3D(nnx.Module):
  """Nearest x2 upsampling then a Conv2d(k3, pad 1) per frame.

  With compress_time: T odd > 1 -> frame 0 x2 in space only, frames 1.. x2 in time and space
  (T -> 1 + 2(T-1)); T even -> all x2 in time and space; T = 1 -> space only.
  """

  def __init__(self, cfg: VAEConfig, channels: int, compress_time: bool, *, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = Conv2d(cfg, channels, channels, stride=1, padding=((1, 1), (1, 1)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    t = x.shape[1]
    if self.compress_time and t > 1 and t % 2 == 1:
      x = jnp.concatenate([_upsample2x(x[:, :1], time=False), _upsample2x(x[:, 1:], time=True)], axis=1)
    else:
      x = _upsample2x(x, time=self.compress_time and t > 1)
    return self.conv(x)


def _resnets(cfg, cin, cout, n, zq_channels, rngs):
  return nnx.Dict(
    {
      str(i): ResnetBlock3D(cfg, cin if i == 0 else cout, cout, zq_channels=zq_channels, rngs=rngs)
      for i in range(n)
    }
  )


def _run_resnets(resnets, x, zq, cache):
  new = {}
  for name, block in resnets.items():
    x, new[name] = block(x, zq, cache.get(name) if cache else None)
  return x, new


class DownBlock(nnx.Module):
  def __init__(
    self, cfg: VAEConfig, cin: int, cout: int, add_downsample: bool, compress_time: bool, *, rngs: nnx.Rngs
  ):
    self.resnets = _resnets(cfg, cin, cout, cfg.layers_per_block, None, rngs)
    self.downsample = Downsample3D(cfg, cout, compress_time, rngs=rngs) if add_downsample else None

  def __call__(self, x, cache):
    x, new = _run_resnets(self.resnets, x, None, cache)
    if self.downsample is not None:
      x = self.downsample(x)
    return x, new


class UpBlock(nnx.Module):
  def __init__(
    self, cfg: VAEConfig, cin: int, cout: int, add_upsample: bool, compress_time: bool, *, rngs: nnx.Rngs
  ):
    self.resnets = _resnets(cfg, cin, cout, cfg.layers_per_block + 1, cfg.latent_channels, rngs)
    self.upsample = Upsample3D(cfg, cout, compress_time, rngs=rngs) if add_upsample else None

  def __call__(self, x, zq, cache):
    x, new = _run_resnets(self.resnets, x, zq, cache)
    if self.upsample is not None:
      x = self.upsample(x)
    return x, new


class MidBlock(nnx.Module):
  def __init__(self, cfg: VAEConfig, channels: int, zq_channels: int | None, *, rngs: nnx.Rngs):
    self.resnets = _resnets(cfg, channels, channels, 2, zq_channels, rngs)

  def __call__(self, x, zq, cache):
    return _run_resnets(self.resnets, x, zq, cache)


class Encoder(nnx.Module):
  """video (B, T, H, W, 3) -> moments (B, t, h, w, 2 * latent) = [mean | logvar]."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    boc = cfg.block_out_channels
    self.conv_in = CausalConv3d(cfg, cfg.in_channels, boc[0], 3, rngs=rngs)
    self.down_blocks = nnx.Dict(
      {
        str(i): DownBlock(
          cfg,
          boc[max(i - 1, 0)],
          boc[i],
          add_downsample=i < len(boc) - 1,
          compress_time=i < cfg.time_levels,
          rngs=rngs,
        )
        for i in range(len(boc))
      }
    )
    self.mid_block = MidBlock(cfg, boc[-1], None, rngs=rngs)
    self.norm_out = GroupNorm(cfg, boc[-1], 1e-6, rngs=rngs)
    self.conv_out = CausalConv3d(cfg, boc[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

  def __call__(self, x: jax.Array, cache: Cache | None = None):
    cache = cache or {}
    new: Cache = {}
    h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
    new["down_blocks"] = {}
    for name, block in self.down_blocks.items():
      h, new["down_blocks"][name] = block(h, cache.get("down_blocks", {}).get(name))
    h, new["mid_block"] = self.mid_block(h, None, cache.get("mid_block"))
    h = jax.nn.silu(self.norm_out(h))
    h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
    return h, new


class Decoder(nnx.Module):
  """latents z (unscaled, B, t, h, w, latent) -> video (B, T, H, W, 3); z also conditions every norm."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    rev = tuple(reversed(cfg.block_out_channels))
    z = cfg.latent_channels
    self.conv_in = CausalConv3d(cfg, z, rev[0], 3, rngs=rngs)
    self.mid_block = MidBlock(cfg, rev[0], z, rngs=rngs)
    self.up_blocks = nnx.Dict(
      {
        str(i): UpBlock(
          cfg,
          rev[max(i - 1, 0)],
          rev[i],
          add_upsample=i < len(rev) - 1,
          compress_time=i < cfg.time_levels,
          rngs=rngs,
        )
        for i in range(len(rev))
      }
    )
    self.norm_out = SpatialNorm3D(cfg, rev[-1], z, rngs=rngs)
    self.conv_out = CausalConv3d(cfg, rev[-1], cfg.out_channels, 3, rngs=rngs)

  def __call__(self, z: jax.Array, cache: Cache | None = None):
    cache = cache or {}
    new: Cache = {}
    h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
    h, new["mid_block"] = self.mid_block(h, z, cache.get("mid_block"))
    new["up_blocks"] = {}
    for name, block in self.up_blocks.items():
      h, new["up_blocks"][name] = block(h, z, cache.get("up_blocks", {}).get(name))
    h = jax.nn.silu(self.norm_out(h, z))
    h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
    return h, new


class VAE(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)


# ----------------------------------------------------------------------------------------------
# Functional form: params are a plain nested dict of arrays.


_FUNCTIONAL = Functional(VAE, stacked=())
create = _FUNCTIONAL.create  # (config, rng) -> NNX module (slow for the VAE: prefer init)
abstract_params = _FUNCTIONAL.abstract_params  # config -> ShapeDtypeStruct tree
split_params = _FUNCTIONAL.split_params  # NNX module -> plain param dict
merge = _FUNCTIONAL.merge  # (config, params) -> NNX module; cheap, usable inside jit


@functools.partial(jax.jit, static_argnames=("config",))
def _init(key: jax.Array, config: VAEConfig) -> dict[str, Any]:
  abstract = abstract_params(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  sizes = [int(np.prod(leaf.shape)) for path, leaf in leaves if path[-1].key == "kernel"]
  noise = jax.random.normal(key, (sum(sizes),), jnp.float32)  # one draw: compiles in a second
  out, offset = [], 0
  for path, leaf in leaves:
    name = path[-1].key
    if name == "kernel":  # lecun normal: N(0, 1 / fan_in), fan_in = all axes but the output one
      n = int(np.prod(leaf.shape))
      w = noise[offset : offset + n].reshape(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
      out.append(w.astype(leaf.dtype))
      offset += n
    else:  # norm scale 1, biases 0
      out.append(jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def init(config: VAEConfig, rng: int | jax.Array = 0) -> dict[str, Any]:
  """Fresh params for ``config`` as a plain nested dict of arrays.

  Same distributions as ``create`` (kernels N(0, 1/fan_in), norm scales 1, biases 0), drawn as one
  random vector so it compiles fast (per-layer draws take ~20 s to compile even for a tiny VAE).
  """
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  return _init(key, config)


# ----------------------------------------------------------------------------------------------
# Temporal chunking with the carried conv cache.


def chunk_bounds(num_frames: int, chunking: str, frame_batch: int) -> list[tuple[int, int]]:
  """[(start, end)] frame ranges of each chunk (see the module docstring)."""
  if chunking not in CHUNKINGS:
    raise ValueError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
  if num_frames < 1:
    raise ValueError(f"need at least one frame, got {num_frames}")
  if chunking == "whole":
    return [(0, num_frames)]
  if chunking == "released":
    if num_frames % 2 == 0:
      raise ValueError(
        f"'released' chunking ([0:3], [3:5], ...) needs an odd number of latent frames "
        f"(1 + 4k video frames), got {num_frames}; use chunking='framewise' or 'whole'"
      )
    frame_batch = 2
  if frame_batch < 1:
    raise ValueError(f"frame_batch must be >= 1, got {frame_batch}")
  n, rem = max(num_frames // frame_batch, 1), num_frames % frame_batch
  return [
    (0 if i == 0 else frame_batch * i + rem, min(frame_batch * (i + 1) + rem, num_frames)) for i in range(n)
  ]


def run_chunked(fn, x: jax.Array, bounds: list[tuple[int, int]], *, scan: bool = True) -> jax.Array:
  """Runs ``fn(x_chunk, cache) -> (y_chunk, cache)`` over time chunks, carrying the cache.

  The first chunk starts without a cache (replicated first frames); the remaining chunks, which must
  all have the same length, run under ``lax.scan`` with the cache pytree as the carry, or, with
  ``scan=False``, in an unrolled Python loop: the same numbers, and the choice when differentiating
  (XLA CPU runs the backward pass of the scanned convolutions 7-14x slower than unrolled ones, 31 s
  vs 2.3 s for 13 latent frames of the demo VAE; forward speed is the same).
  """
  (s0, e0), rest = bounds[0], bounds[1:]
  y0, cache = fn(x[:, s0:e0], None)
  if not rest:
    return y0
  if not scan:
    ys = [y0]
    for s, e in rest:
      y, cache = fn(x[:, s:e], cache)
      ys.append(y.astype(y0.dtype))
    return jnp.concatenate(ys, axis=1)
  size = rest[0][1] - rest[0][0]
  if any(e - s != size for s, e in rest) or rest[0][0] != e0 or rest[-1][1] != x.shape[1]:
    raise ValueError(f"chunks after the first must be contiguous and equal-size, got {bounds}")
  b = x.shape[0]
  xs = jnp.moveaxis(x[:, e0:].reshape(b, len(rest), size, *x.shape[2:]), 1, 0)

  def body(carry, xc):
    y, carry = fn(xc, carry)
    return carry, y

  _, ys = jax.lax.scan(body, cache, xs)
  ys = jnp.moveaxis(ys, 0, 1)
  ys = ys.reshape(b, -1, *ys.shape[3:])
  return jnp.concatenate([y0, ys.astype(y0.dtype)], axis=1)


def _check_video(video, config: VAEConfig):
  if video.ndim != 5 or video.shape[-1] != config.in_channels:
    raise ValueError(
      f"video must be (batch, frames, height, width, {config.in_channels}) channels-last, "
      f"got shape {video.shape}"
    )
  s = config.spatial_compression
  if video.shape[2] % s or video.shape[3] % s:
    raise ValueError(f"video height/width {video.shape[2]}x{video.shape[3]} must be divisible by {s}")


def _check_latents(latents, config: VAEConfig):
  if latents.ndim != 5 or latents.shape[-1] != config.latent_channels:
    raise ValueError(
      f"latents must be (batch, frames, height, width, {config.latent_channels}) "
      f"channels-last, got shape {latents.shape} (transpose PyTorch (B, C, T, H, W) "
      f"latents with .permute(0, 2, 3, 4, 1))"
    )


@functools.partial(jax.jit, static_argnames=("config", "chunking", "frame_batch"))
def _encode_moments(params, video, *, config: VAEConfig, chunking: str, frame_batch: int):
  enc = merge(config, params).encoder
  bounds = chunk_bounds(video.shape[1], chunking, frame_batch)
  return run_chunked(enc, video, bounds).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "chunking", "frame_batch", "scan"))
def _decode_frames(params, z, *, config: VAEConfig, chunking: str, frame_batch: int, scan: bool = True):
  dec = merge(config, params).decoder
  bounds = chunk_bounds(z.shape[1], chunking, frame_batch)
  return run_chunked(dec, z, bounds, scan=scan).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _decode_chunk(params, z, cache, *, config: VAEConfig):
  video, cache = merge(config, params).decoder(z, cache)
  return video.astype(jnp.float32), cache


# ----------------------------------------------------------------------------------------------
# Spatial tiling (diffusers' tiled_encode / tiled_decode).


@dataclasses.dataclass(frozen=True)
class TilingConfig:
  """Tile size in *pixels* and overlap factors; None = diffusers defaults (half the sample size,
  overlap 1/6 of the height and 1/5 of the width)."""

  tile_sample_height: int | None = None
  tile_sample_width: int | None = None
  overlap_factor_height: float = 1 / 6
  overlap_factor_width: float = 1 / 5

  def resolve(self, config: VAEConfig) -> tuple[int, int, int, int, float, float]:
    """(sample_h, sample_w, latent_h, latent_w, overlap_h, overlap_w)."""
    sh = self.tile_sample_height or config.sample_height // 2
    sw = self.tile_sample_width or config.sample_width // 2
    s = config.spatial_compression
    return sh, sw, int(sh / s), int(sw / s), self.overlap_factor_height, self.overlap_factor_width


def _blend(prev: jax.Array, cur: jax.Array, extent: int, axis: int) -> jax.Array:
  """cur[:e] = prev[-e:] * (1 - y/e) + cur[:e] * y/e along ``axis`` (diffusers blend_v / blend_h)."""
  extent = min(prev.shape[axis], cur.shape[axis], extent)
  if extent <= 0:
    return cur
  w = np.arange(extent, dtype=np.float64) / extent
  shape = [1] * cur.ndim
  shape[axis] = extent
  w = jnp.asarray(w.reshape(shape), cur.dtype)
  a = jax.lax.slice_in_dim(prev, prev.shape[axis] - extent, prev.shape[axis], axis=axis)
  b = jax.lax.slice_in_dim(cur, 0, extent, axis=axis)
  mixed = a * (1 - w) + b * w
  return jnp.concatenate([mixed, jax.lax.slice_in_dim(cur, extent, cur.shape[axis], axis=axis)], axis=axis)


def _tiled(
  run,
  x,
  *,
  tile_in: tuple[int, int],
  stride: tuple[int, int],
  extent: tuple[int, int],
  limit: tuple[int, int],
) -> jax.Array:
  """Runs ``run`` on overlapping (tile_in) tiles at ``stride``, blends and crops to ``limit``."""
  h, w = x.shape[2], x.shape[3]
  rows = []
  for i in range(0, h, stride[0]):
    row = []
    for j in range(0, w, stride[1]):
      tile = run(x[:, :, i : i + tile_in[0], j : j + tile_in[1]])
      if rows:
        tile = _blend(rows[-1][len(row)], tile, extent[0], axis=2)
      if row:
        tile = _blend(row[-1], tile, extent[1], axis=3)
      row.append(tile)
    rows.append(row)
  return jnp.concatenate(
    [jnp.concatenate([t[:, :, : limit[0], : limit[1]] for t in row], axis=3) for row in rows], axis=2
  )


# ----------------------------------------------------------------------------------------------
# Public API.


class Posterior(NamedTuple):
  """Diagonal Gaussian posterior of the *unscaled* latents, (B, t, h, w, latent) each."""

  mean: jax.Array
  logvar: jax.Array  # clamped to [-30, 20]

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


def _default_batch(frame_batch, default):
  return default if frame_batch is None else int(frame_batch)


def encode_posterior(
  params: dict[str, Any],
  video: jax.Array,
  *,
  config: VAEConfig,
  chunking: Literal["whole", "framewise"] = "whole",
  frame_batch: int | None = None,
  tiling: TilingConfig | None = None,
) -> Posterior:
  """video (B, T, H, W, 3) in [-1, 1] -> unscaled posterior (mean, logvar).

  ``chunking``: 'whole' (default; the SAT engine) or 'framewise' (diffusers, ``frame_batch`` pixel
  frames per chunk, default 8). ``tiling``: diffusers-style spatial tiles (None = off).
  """
  video = jnp.asarray(video)
  _check_video(video, config)
  if chunking not in ("whole", "framewise"):
    raise ValueError(f"encode chunking must be 'whole' or 'framewise', got {chunking!r}")
  fb = _default_batch(frame_batch, 8)
  run = functools.partial(_encode_moments, params, config=config, chunking=chunking, frame_batch=fb)
  h, w = video.shape[2], video.shape[3]
  if tiling is not None:
    sh, sw, lh, lw, fh, fw = tiling.resolve(config)
  if tiling is not None and (w > sw or h > sh):
    ext = (int(lh * fh), int(lw * fw))
    moments = _tiled(
      run,
      video,
      tile_in=(sh, sw),
      stride=(int(sh * (1 - fh)), int(sw * (1 - fw))),
      extent=ext,
      limit=(lh - ext[0], lw - ext[1]),
    )
  else:
    moments = run(video)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))


def encode(
  params: dict[str, Any],
  video: jax.Array,
  *,
  config: VAEConfig,
  key: jax.Array | None = None,
  sample: bool = False,
  chunking: Literal["whole", "framewise"] = "whole",
  frame_batch: int | None = None,
  tiling: TilingConfig | None = None,
) -> jax.Array:
  """video (B, T, H, W, 3) in [-1, 1] -> scaled latents z * scaling_factor, (B, t, h, w, latent).

  ``sample=False`` uses the posterior mean; ``sample=True`` draws mean + std * N(0, 1) with ``key``
  (what the SAT training engine does).
  """
  post = encode_posterior(
    params, video, config=config, chunking=chunking, frame_batch=frame_batch, tiling=tiling
  )
  if sample:
    if key is None:
      raise ValueError("encode(sample=True) needs a JAX PRNG key: key=jax.random.key(seed)")
    z = post.sample(key)
  else:
    z = post.mean
  return z * config.scaling_factor


def decode(
  params: dict[str, Any],
  latents_scaled: jax.Array,
  *,
  config: VAEConfig,
  chunking: Literal["released", "framewise", "whole"] = "released",
  frame_batch: int | None = None,
  tiling: TilingConfig | None = None,
  scan_chunks: bool = True,
) -> jax.Array:
  """Scaled latents (B, t, h, w, latent) -> video (B, T, H, W, 3), float32, roughly in [-1, 1].

  ``chunking``: 'released' (default; SAT sample_video.py: [0:3], [3:5], ...), 'framewise'
  (diffusers, ``frame_batch`` latent frames per chunk, default 2) or 'whole'.
  ``tiling``: diffusers-style spatial tiles (None = off). Use ``postprocess`` for [0, 1] frames.
  ``scan_chunks=False`` unrolls the chunk loop: same numbers, use it when differentiating
  (``run_chunked``).
  """
  latents_scaled = jnp.asarray(latents_scaled)
  _check_latents(latents_scaled, config)
  z = latents_scaled.astype(jnp.float32) / config.scaling_factor
  fb = _default_batch(frame_batch, 2)
  chunk_bounds(z.shape[1], chunking, fb)  # validate early, outside jit

  def run(zz):
    if len(chunk_bounds(zz.shape[1], chunking, fb)) == 1:  # shares its compilation with decode_chunk
      return _decode_chunk(params, zz, None, config=config)[0]
    return _decode_frames(params, zz, config=config, chunking=chunking, frame_batch=fb, scan=scan_chunks)

  plan = _tile_plan(tiling, config, z.shape[2], z.shape[3])
  return _tiled(run, z, **plan) if plan else run(z)


def _tile_plan(tiling: TilingConfig | None, config: VAEConfig, h: int, w: int) -> dict | None:
  """``_tiled`` arguments for latents of h x w, or None when they fit one tile (or tiling is off)."""
  if tiling is None:
    return None
  sh, sw, lh, lw, fh, fw = tiling.resolve(config)
  if w <= lw and h <= lh:
    return None
  ext = (int(sh * fh), int(sw * fw))
  stride = (int(lh * (1 - fh)), int(lw * (1 - fw)))
  limit = (sh - ext[0], sw - ext[1])
  s = config.spatial_compression
  if stride[0] * s != limit[0] or stride[1] * s != limit[1]:
    # Tiles so small that integer rounding breaks diffusers' plan (the crops would not meet the
    # strides and the video would come out the wrong size): decode untiled instead.
    return None
  return dict(tile_in=(lh, lw), stride=stride, extent=ext, limit=limit)


def decode_streamed(
  params: dict[str, Any], latents_scaled: jax.Array, *, config: VAEConfig, tiling: TilingConfig | None = None
) -> jax.Array:
  """``decode(..., chunking='released', tiling=tiling)`` computed one video, one tile and one
  temporal chunk at a time, each a separate compiled call of ``decode_chunk`` with the conv cache
  carried between chunks: device memory is bounded by the largest tile-chunk step, not the video
  (what a 16 GB accelerator needs at 49 x 480 x 720). Same numbers as ``decode``; not jittable as a
  whole (a host loop)."""
  z = jnp.asarray(latents_scaled)
  _check_latents(z, config)
  chunking = "released" if z.shape[1] % 2 == 1 else "framewise"
  bounds = chunk_bounds(z.shape[1], chunking, 2)

  def run(zz):  # one video's tile through every chunk
    ys, cache = [], None
    for s, e in bounds:
      y, cache = decode_chunk(params, zz[:, s:e], cache, config=config)
      ys.append(y)
    return jnp.concatenate(ys, axis=1)

  plan = _tile_plan(tiling, config, z.shape[2], z.shape[3])
  videos = [_tiled(run, z[i : i + 1], **plan) if plan else run(z[i : i + 1]) for i in range(z.shape[0])]
  return jnp.concatenate(videos, axis=0)


def streamed_steps(config: VAEConfig, latent_shape: tuple[int, ...], tiling: TilingConfig | None = None):
  """The distinct compiled steps of ``decode_streamed`` for one video of ``latent_shape`` (t, h, w, c):
  [(latents chunk shape, with_cache)], the largest tile first. For memory checks (``aot``)."""
  t, h, w, c = latent_shape
  plan = _tile_plan(tiling, config, h, w)
  th, tw = (min(plan["tile_in"][0], h), min(plan["tile_in"][1], w)) if plan else (h, w)
  bounds = chunk_bounds(t, "released" if t % 2 == 1 else "framewise", 2)
  sizes = sorted({e - s for s, e in bounds[1:]})
  return [((1, bounds[0][1] - bounds[0][0], th, tw, c), False)] + [((1, n, th, tw, c), True) for n in sizes]


def decode_chunk(
  params: dict[str, Any], latents_scaled: jax.Array, cache: Cache | None = None, *, config: VAEConfig
) -> tuple[jax.Array, Cache]:
  """One temporal chunk through the decoder, for streaming: returns (video chunk, new cache).

  Pass ``cache=None`` for the first chunk (replicated first frames) and the returned cache (a pytree
  of per-conv (B, 2, H, W, C) arrays) with the next chunk. Chunks [0:3], [3:5], ... reproduce
  ``decode(..., chunking='released')``.
  """
  latents_scaled = jnp.asarray(latents_scaled)
  _check_latents(latents_scaled, config)
  return _decode_chunk(
    params, latents_scaled.astype(jnp.float32) / config.scaling_factor, cache, config=config
  )


def postprocess(video: jax.Array) -> jax.Array:
  """Decoder output in [-1, 1] -> frames in [0, 1]: clamp((x + 1) / 2, 0, 1), as the release does."""
  return jnp.clip((video + 1.0) / 2.0, 0.0, 1.0)


def make_encode(config: VAEConfig, **kwargs):
  """``encode`` with the config (and options) bound: ``fn(params, video, key=None)``."""
  return functools.partial(encode, config=config, **kwargs)


def make_decode(config: VAEConfig, **kwargs):
  """``decode`` with the config (and options) bound: ``fn(params, latents_scaled)``."""
  return functools.partial(decode, config=config, **kwargs)
