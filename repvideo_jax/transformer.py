"""RepVideo: the CogVideoX diffusion transformer with a cross-layer feature cache and per-layer cache gates.

Reading order: config -> small helpers (positions, time embedding) -> ``Block`` (one expert-AdaLN
layer) -> ``RepVideoTransformer`` (embeddings, the scanned layer stack with the feature cache, output
head) -> the pure functional form (``init`` / ``apply``).

Layout conventions (channels last, as everywhere in this package):
  latents         (B, T, H, W, C)     T latent frames, H x W latent pixels
  text embeddings (B, L, text_dim)    L must equal ``config.text_length``
  timesteps       (B,)                integer DDPM timesteps 0..999 (floats allowed)
  output          (B, T, H, W, C_out) the v-prediction
The joint token sequence is [text (L) | video (T * H/p * W/p)], video index t*h*w + y*w + x.

Two kinds of "gate" appear below and are kept apart by name:
  adaln_gate   per-token AdaLN gate of a block's attention / MLP branch (from the time embedding)
  cache_gate   RepVideo's learnable scalar per layer that mixes the feature-cache mean into the
               block input (param key ``gates``); ``FeatureCache`` documents the loop (docs/model.md).
With ``feature_cache=False`` the model is plain CogVideoX (each block's input is the previous output).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from repvideo_jax import quantize, sharding
from repvideo_jax.attention import QKV_AXES, attention, resolve_backend
from repvideo_jax.functional import DTYPES, REMAT_POLICIES, Functional, annotate, remat


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the denoiser. Defaults are the released RepVideo-2B model."""

  num_layers: int = 30
  num_heads: int = 30
  head_dim: int = 64
  in_channels: int = 16
  out_channels: int = 16
  patch_size: int = 2
  text_embed_dim: int = 4096
  text_length: int = 226
  time_embed_dim: int = 512
  mlp_dim: int | None = None  # default 4 * hidden
  norm_eps: float = 1e-5  # block LayerNorms and the final LayerNorm
  qk_norm_eps: float = 1e-6
  out_norm_eps: float = 1e-6  # output-head LayerNorm: 1e-6 in SAT, diffusers uses norm_eps
  # Positions: "sincos" (CogVideoX-2B, additive 3D sin-cos) or "rope" (CogVideoX-5B, 3D rotary).
  positional_embedding: Literal["sincos", "rope"] = "sincos"
  sample_frames: int = 13  # latent frames covered by the positional table
  sample_height: int = 60  # latent height of the positional table
  sample_width: int = 90  # latent width of the positional table
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  rope_theta: float = 10000.0
  # RepVideo feature cache and its per-layer cache gates.
  feature_cache: bool = True
  cache_window: int = 6
  gate_init: float = 0.5  # initial value of every cache gate
  # Initialisation (only matters when not loading weights).
  zero_init_modulation: bool = True  # DiT convention: AdaLN modulation and output projection start at 0
  # Execution.
  scan_layers: bool = True
  remat: Literal["none", "full", "save_dots"] = "none"
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  attention_backend: Literal["auto", "xla", "cudnn", "splash"] = "xla"

  @property
  def hidden_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def ff_dim(self) -> int:
    return self.mlp_dim or 4 * self.hidden_size

  def __post_init__(self):
    if self.positional_embedding not in ("sincos", "rope"):
      raise ValueError(f"positional_embedding must be 'sincos' or 'rope', got {self.positional_embedding!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name} must be one of {list(DTYPES)}, got {getattr(self, name)!r}")
    if self.cache_window < 1:
      raise ValueError(f"cache_window must be >= 1, got {self.cache_window}")
    if self.positional_embedding == "sincos" and self.hidden_size % 16:
      raise ValueError(f"sin-cos positions need hidden size divisible by 16, got {self.hidden_size}")
    if self.positional_embedding == "rope" and self.head_dim % 16:
      raise ValueError(f"3D rotary positions need head_dim divisible by 16, got {self.head_dim}")


# ----------------------------------------------------------------------------------------------
# Positions and timestep features (computed on the host in NumPy: they depend only on shapes).


def check_positional_table(cfg: TransformerConfig, frames: int, height: int, width: int) -> None:
  """Raises ValueError when latents of ``frames x height x width`` exceed the sin-cos positional table
  (``sample_frames x sample_height x sample_width``); rotary positions have no table. The one
  definition of that limit: the model's input check and the pipeline's settings check both call it."""
  if cfg.positional_embedding == "sincos" and (
    frames > cfg.sample_frames or height > cfg.sample_height or width > cfg.sample_width
  ):
    raise ValueError(
      f"latents {frames}x{height}x{width} (frames x height x width) exceed the positional table "
      f"{cfg.sample_frames}x{cfg.sample_height}x{cfg.sample_width}; use at most that many latent "
      "frames and pixels, or raise sample_frames/sample_height/sample_width in the config"
    )


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[sin(p w_k) for k < dim/2] ++ [cos(p w_k)], w_k = 10000^(-k/(dim/2)); float64 frequencies."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(positions.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(config: TransformerConfig, frames: int, height: int, width: int) -> np.ndarray:
  """3D sin-cos table (frames*height*width, D) for a token grid: [time D/4 | width 3D/8 | height 3D/8]."""
  dim = config.hidden_size
  s, ts = np.float32(config.spatial_interpolation_scale), np.float32(config.temporal_interpolation_scale)
  pos_t = np.arange(frames, dtype=np.float32) / ts
  pos_y = np.arange(height, dtype=np.float32) / s
  pos_x = np.arange(width, dtype=np.float32) / s
  yy, xx = np.meshgrid(pos_y, pos_x, indexing="ij")  # (height, width), width fastest
  spatial = np.concatenate(
    [_sincos_1d(3 * dim // 8, xx.reshape(-1)), _sincos_1d(3 * dim // 8, yy.reshape(-1))], axis=1
  )
  temporal = _sincos_1d(dim // 4, pos_t)
  table = np.concatenate(
    [
      np.repeat(temporal[:, None], height * width, axis=1),
      np.broadcast_to(spatial[None], (frames, height * width, 3 * dim // 4)),
    ],
    axis=-1,
  )
  return table.reshape(frames * height * width, dim).astype(np.float32)


def _crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int):
  """Where a (grid_h, grid_w) token grid sits inside the base grid after aspect-preserving resize."""
  if grid_h / grid_w > base_h / base_w:
    rh, rw = base_h, int(round(base_h / grid_h * grid_w))
  else:
    rw, rh = base_w, int(round(base_w / grid_w * grid_h))
  top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
  return (top, left), (top + rh, left + rw)


def rope_3d(config: TransformerConfig, frames: int, height: int, width: int):
  """Rotary (cos, sin), each (frames*height*width, head_dim), as the CogVideoX-5B pipeline builds them."""
  p = config.patch_size
  (top, left), (bottom, right) = _crop_region(
    height, width, config.sample_height // p, config.sample_width // p
  )
  f32 = np.float32
  grid_y = np.linspace(top, bottom * (height - 1) / height, height).astype(f32)
  grid_x = np.linspace(left, right * (width - 1) / width, width).astype(f32)
  grid_t = np.linspace(0, frames * (frames - 1) / frames, frames).astype(f32)
  dim_t, dim_s = config.head_dim // 4, config.head_dim // 8 * 3

  def one_axis(dim, pos):
    freqs = f32(1.0) / (f32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    angles = np.outer(pos, freqs).astype(f32)
    return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)

  parts = [one_axis(dim_t, grid_t), one_axis(dim_s, grid_y), one_axis(dim_s, grid_x)]
  shape = (frames, height, width)

  def combine(idx):
    t, y, x = (a[idx] for a in parts)
    return np.concatenate(
      [
        np.broadcast_to(t[:, None, None], shape + t.shape[-1:]),
        np.broadcast_to(y[None, :, None], shape + y.shape[-1:]),
        np.broadcast_to(x[None, None, :], shape + x.shape[-1:]),
      ],
      -1,
    ).reshape(frames * height * width, config.head_dim)

  return combine(0), combine(1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s). x: (B, S, H, D), cos/sin: (S, D)."""
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def timestep_features(timesteps: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal timestep features [cos ++ sin], frequencies exp(-ln(1e4) k / (dim/2)); float32."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------------------------
# Layers.


def _linear(
  cfg: TransformerConfig, din: int, dout: int, axes: tuple, rngs: nnx.Rngs, zero: bool = False
) -> nnx.Linear:
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  return nnx.Linear(
    din,
    dout,
    dtype=DTYPES[cfg.dtype],
    param_dtype=DTYPES[cfg.param_dtype],
    kernel_init=annotate(init, axes),
    bias_init=annotate(nnx.initializers.zeros_init(), (axes[1],)),
    rngs=rngs,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis in float32 with the two-pass variance, the values of
  ``nnx.LayerNorm(use_fast_variance=False)`` (and torch's): (x - mean) * (rsqrt(var + eps) * scale)
  + bias. Its gradient keeps x, the mean and 1/std and is computed in one closed form, where
  autodiff would save and reduce several (tokens, width) intermediates per layer."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  centred = x32 - mean
  inv_std = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
  y = centred * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return y, (x, mean, inv_std, scale, bias)


def _layer_norm_bwd(eps, res, dy):
  x, mean, inv_std, scale, bias = res
  dy = dy.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * inv_std
  g = dy * scale.astype(jnp.float32)
  dx = inv_std * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return dx.astype(x.dtype), (dy * xhat).sum(rows).astype(scale.dtype), dy.sum(rows).astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with a (dim,) ``scale`` and ``bias`` (the param names of
  ``nnx.LayerNorm``); float32 output, statistics as ``layer_norm``."""

  def __init__(self, dim: int, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)


def _layer_norm(cfg: TransformerConfig, dim: int, eps: float) -> LayerNorm:
  return LayerNorm(dim, eps, DTYPES[cfg.param_dtype])


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation (``jax.nn.gelu(x, approximate=True)``, same values), whose
  gradient keeps only ``x`` for the backward and recomputes the rest: plain autodiff saves several
  (tokens, mlp_dim) intermediates per layer, which the layer scan stacks over layers."""
  return jax.nn.gelu(x, approximate=True)


_GELU_C = float(np.sqrt(2.0 / np.pi))


def _gelu_tanh_fwd(x):
  return jax.nn.gelu(x, approximate=True), x


def _gelu_tanh_bwd(x, dy):
  # d/dx [x/2 (1 + tanh(u))], u = c (x + 0.044715 x^3): (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 * 0.044715 x^2)
  xf = x.astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (xf + 0.044715 * xf**3))
  grad = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * xf * xf)
  return ((dy.astype(jnp.float32) * grad).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def _per_token(text_val: jax.Array, video_val: jax.Array, text_len: int, seq_len: int) -> jax.Array:
  """Broadcasts per-sample (B, D) text/video values over the [text | video] token axis -> (B, S, D)."""
  b, d = text_val.shape
  return jnp.concatenate(
    [
      jnp.broadcast_to(text_val[:, None], (b, text_len, d)),
      jnp.broadcast_to(video_val[:, None], (b, seq_len - text_len, d)),
    ],
    axis=1,
  )


class Block(nnx.Module):
  """One expert-AdaLN transformer layer: separate text/video modulation, shared weights."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, e = cfg.hidden_size, cfg.time_embed_dim
    zero = cfg.zero_init_modulation
    self.cfg = cfg
    self.norm1 = _layer_norm(cfg, d, cfg.norm_eps)
    # 6 chunks: shift, scale, AdaLN gate (video), then the text ones -- diffusers' LayerNormZero order.
    self.norm1_mod = _linear(cfg, e, 6 * d, (None, "modulation"), rngs, zero=zero)
    self.to_q = _linear(cfg, d, d, ("embed", "heads"), rngs)
    self.to_k = _linear(cfg, d, d, ("embed", "heads"), rngs)
    self.to_v = _linear(cfg, d, d, ("embed", "heads"), rngs)
    self.norm_q = _layer_norm(cfg, cfg.head_dim, cfg.qk_norm_eps)
    self.norm_k = _layer_norm(cfg, cfg.head_dim, cfg.qk_norm_eps)
    self.to_out = _linear(cfg, d, d, ("heads", "embed"), rngs)
    self.norm2 = _layer_norm(cfg, d, cfg.norm_eps)
    self.norm2_mod = _linear(cfg, e, 6 * d, (None, "modulation"), rngs, zero=zero)
    self.ff_in = _linear(cfg, d, cfg.ff_dim, ("embed", "mlp"), rngs)
    self.ff_out = _linear(cfg, cfg.ff_dim, d, ("mlp", "embed"), rngs)

  def _modulated(self, norm, mod, x, text_len):
    """LN(x) * (1 + scale) + shift with per-modality (shift, scale); also returns the per-token
    AdaLN gate that scales the branch output before it joins the residual stream."""
    shift, scale, adaln_gate, t_shift, t_scale, t_adaln_gate = jnp.split(mod, 6, axis=-1)
    seq = x.shape[1]
    y = norm(x).astype(x.dtype)
    y = y * (1 + _per_token(t_scale, scale, text_len, seq)) + _per_token(t_shift, shift, text_len, seq)
    return y, _per_token(t_adaln_gate, adaln_gate, text_len, seq)

  def attention_inputs(self, x: jax.Array, temb: jax.Array, text_len: int, rope=None):
    """(q, k, v, adaln_gate): q, k, v (B, S, heads, head_dim) as attention sees them (QK-LayerNorm
    and rotary applied) and the per-token AdaLN gate (B, S, D) of the attention branch."""
    cfg = self.cfg
    b, s, _ = x.shape
    h, hd = cfg.num_heads, cfg.head_dim
    a, adaln_gate = self._modulated(self.norm1, self.norm1_mod(temb), x, text_len)
    q = self.norm_q(self.to_q(a).reshape(b, s, h, hd)).astype(x.dtype)
    k = self.norm_k(self.to_k(a).reshape(b, s, h, hd)).astype(x.dtype)
    v = self.to_v(a).reshape(b, s, h, hd)
    if rope is not None:  # rotary positions on the video tokens only
      cos, sin = rope
      q = jnp.concatenate([q[:, :text_len], apply_rope(q[:, text_len:], cos, sin)], axis=1)
      k = jnp.concatenate([k[:, :text_len], apply_rope(k[:, text_len:], cos, sin)], axis=1)
    return q, k, v, adaln_gate

  def __call__(self, x: jax.Array, temb: jax.Array, text_len: int, rope=None) -> jax.Array:
    """x: (B, S, D) joint [text | video] tokens; temb: (B, E) SiLU-activated time embedding."""
    cfg = self.cfg
    b, s, d = x.shape
    q, k, v, adaln_gate = self.attention_inputs(x, temb, text_len, rope)
    q, k, v = (sharding.constrain(t, QKV_AXES) for t in (q, k, v))
    o = attention(q, k, v, backend=cfg.attention_backend).reshape(b, s, d)
    x = x + adaln_gate * self.to_out(o)
    f, adaln_gate = self._modulated(self.norm2, self.norm2_mod(temb), x, text_len)
    f = self.ff_out(gelu_tanh(self.ff_in(f)))
    return x + adaln_gate * f


# ----------------------------------------------------------------------------------------------
# The feature cache.


@struct.dataclass
class FeatureCache:
  """RepVideo's cross-layer feature cache (docs/model.md) as a running float32 sum and count, so it rides
  in the layer scan's carry. With e the embedding output and g_i layer i's cache gate, the loop is

      cache = FeatureCache.start(e);  h = e
      for layer i:
        x = cache.mix(h, g_i)                   # g_i * mean(cached outputs) + (1 - g_i) * h
        h = Block_i(x)
        cache = cache.push(h, reset=resets[i])  # resets[i] = (i % window == 0): cache := [h],
                                                # otherwise h is appended to the cache
  so a reset layer is the last reader of the old window and the first member of the new one.
  """

  total: jax.Array  # (B, S, D) float32 sum of the cached block outputs
  count: jax.Array  # () float32 number of cached block outputs

  @staticmethod
  def reset_flags(num_layers: int, window: int) -> jax.Array:
    """(num_layers,) bool, True where the layer's output restarts the cache. Built on the host and
    scanned alongside the layers (an in-graph ``i % window`` shifts XLA's rounding by an ulp)."""
    return jnp.asarray(np.arange(num_layers) % window == 0)

  @classmethod
  def start(cls, e: jax.Array) -> FeatureCache:
    return cls(e.astype(jnp.float32), jnp.ones((), jnp.float32))

  def mix(self, h: jax.Array, cache_gate: jax.Array) -> jax.Array:
    mixed = cache_gate * (self.total / self.count) + (1.0 - cache_gate) * h.astype(jnp.float32)
    return mixed.astype(h.dtype)

  def push(self, out: jax.Array, reset: jax.Array) -> FeatureCache:
    out32 = out.astype(jnp.float32)
    return FeatureCache(jnp.where(reset, out32, self.total + out32), jnp.where(reset, 1.0, self.count + 1.0))


@struct.dataclass
class NoCache:
  """The cache with ``feature_cache=False``: holds nothing, so every block reads the previous output."""

  def mix(self, h: jax.Array, cache_gate: jax.Array) -> jax.Array:
    return h

  def push(self, out: jax.Array, reset: jax.Array) -> NoCache:
    return self


# ----------------------------------------------------------------------------------------------
# The LoRA hook (repvideo_jax/lora.py owns the files and the training-side helpers). A LoRA is a
# plain dict {"alpha": () array, "blocks": {name: {"a": (L, in, r), "b": (L, r, out)}}} over the
# Block linears named in LORA_TARGETS; ``lora`` arguments below are a list of (lora, scale) pairs.
# Unmerged, the factors ride in the layer scan's inputs and adapt one layer's kernels inside the
# scan body, so the stacked base params stay shared and unmodified. A LoRA trained together with the
# RepVideo gates also holds "gates": (L,) offsets (trained gates minus the base model's), added to
# the cache gates times the LoRA's scale.

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "ff_in", "ff_out", "norm1_mod", "norm2_mod")


def lora_multiplier(lora: dict[str, Any], name: str, scale: Any) -> jax.Array:
  """scale * alpha / rank (peft's rule) of one adapted kernel; alpha is a constant, never trained."""
  rank = lora["blocks"][name]["a"].shape[-1]
  return scale * jax.lax.stop_gradient(jnp.asarray(lora["alpha"], jnp.float32)) / rank


def lora_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, multiplier: jax.Array) -> jax.Array:
  """kernel + multiplier * a @ b, summed in float32 and returned in the kernel's dtype. Works on one
  layer (kernel (in, out), a (in, r), b (r, out)) or stacked layers (a leading layer axis)."""
  if kernel.shape != a.shape[:-1] + b.shape[-1:] or a.shape[-1] != b.shape[-2]:
    raise ValueError(
      f"LoRA factors {a.shape} @ {b.shape} do not fit the kernel {kernel.shape}: the LoRA was made "
      "for another model"
    )
  delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
  return (kernel.astype(jnp.float32) + multiplier * delta).astype(kernel.dtype)


def _lora_scan_inputs(lora) -> tuple[Any, Any]:
  """(factors scanned with the layers, multipliers closed over) of (lora, scale) pairs; (None, None)
  without LoRA, so the layer scan is the plain model's."""
  if not lora:
    return None, None
  for tree, _ in lora:
    unknown = sorted(set(tree["blocks"]) - set(LORA_TARGETS))
    if unknown:
      raise ValueError(f"LoRA adapts {unknown}, which are not Block linears {LORA_TARGETS}")
  factors = [tree["blocks"] for tree, _ in lora]
  multipliers = [
    {name: lora_multiplier(tree, name, scale) for name in tree["blocks"]} for tree, scale in lora
  ]
  return factors, multipliers


def lora_gate_offsets(lora, config: TransformerConfig) -> jax.Array | None:
  """The sum of scale * "gates" over the (lora, scale) pairs that hold gate offsets (float32,
  (num_layers,)), or None when none does."""
  offsets = [(tree["gates"], scale) for tree, scale in lora or () if "gates" in tree]
  if not offsets:
    return None
  if not config.feature_cache:
    raise ValueError(
      "the LoRA holds RepVideo gate offsets but this transformer has the feature cache off (no gates)"
    )
  total = jnp.zeros((config.num_layers,), jnp.float32)
  for gates, scale in offsets:
    if jnp.shape(gates) != (config.num_layers,):
      raise ValueError(
        f"LoRA gate offsets have shape {jnp.shape(gates)}, the model has {config.num_layers} gates"
      )
    total = total + scale * jnp.asarray(gates, jnp.float32)
  return total


class LoraDropout(NamedTuple):
  """Training-time LoRA dropout (peft's): each adapted linear computes base(x) + multiplier *
  (dropout(x) @ A) @ B, with dropout at ``rate`` (kept inputs scaled by 1 / (1 - rate)) drawn from
  ``key`` (one mask per layer, target and LoRA). Inference and ``lora.merge`` have no dropout."""

  rate: float
  key: jax.Array


class _LoraBranches:
  """A Block linear with LoRA branches beside it (the unmerged form that dropout needs; the
  kernel-adapting hook cannot drop the branch's input alone)."""

  def __init__(self, base: nnx.Linear, branches: list[tuple[jax.Array, jax.Array, jax.Array]], rate, key):
    self.base, self.branches, self.rate, self.key = base, branches, rate, key

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    keep = 1.0 - self.rate
    x32 = x.astype(jnp.float32)
    for i, (a, b, multiplier) in enumerate(self.branches):
      mask = jax.random.bernoulli(jax.random.fold_in(self.key, i), keep, x.shape)
      dropped = jnp.where(mask, x32 / keep, 0.0)
      delta = jnp.matmul(jnp.matmul(dropped, a.astype(jnp.float32)), b.astype(jnp.float32))
      y = (y.astype(jnp.float32) + multiplier * delta).astype(y.dtype)
    return y


def _branch_block(block: Block, factors: list[dict], multipliers: list[dict], dropout: LoraDropout) -> None:
  """``_adapt_block`` with LoRA dropout: each adapted linear is wrapped in ``_LoraBranches`` (its
  own dropout key per target); this block object is thrown away after the layer."""
  names = [name for name in LORA_TARGETS if any(name in f for f in factors)]
  for index, name in enumerate(names):
    branches = [(f[name]["a"], f[name]["b"], m[name]) for f, m in zip(factors, multipliers) if name in f]
    key = jax.random.fold_in(dropout.key, index)
    setattr(block, name, _LoraBranches(getattr(block, name), branches, dropout.rate, key))


def _adapt_block(block: Block, factors: list[dict], multipliers: list[dict]) -> None:
  """Adds each LoRA's delta to this layer's kernels, in order (as ``lora.merge`` does, LoRA by LoRA)."""
  for layer_factors, layer_multipliers in zip(factors, multipliers):
    for name, ab in layer_factors.items():
      kernel = getattr(block, name).kernel
      kernel[...] = lora_kernel(kernel[...], ab["a"], ab["b"], layer_multipliers[name])


# ----------------------------------------------------------------------------------------------
# The model.


class LayerView(NamedTuple):
  """What ``RepVideoTransformer.intermediates`` shows a capture function in each layer."""

  block: Block  # the layer (call ``block.attention_inputs(inputs, temb, text_len, rope)`` for q, k)
  inputs: jax.Array  # (B, S, D) the block's input: ``FeatureCache.mix`` of the cache and ``previous``
  outputs: jax.Array  # (B, S, D) the block's output
  previous: jax.Array  # (B, S, D) the previous block's output (the embedding for layer 0)
  temb: jax.Array  # (B, E) the SiLU-activated time embedding
  text_len: int
  rope: Any  # (cos, sin) rotary tables or None
  cache_gate: jax.Array  # () this layer's RepVideo cache gate (0 with the cache off)


class RepVideoTransformer(nnx.Module):
  """CogVideoX DiT with RepVideo's feature cache. Call with (latents, timesteps, text_embeddings)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, p = cfg.hidden_size, cfg.patch_size
    self.cfg = cfg
    pdt = DTYPES[cfg.param_dtype]
    # Patch embedding: a stride-p conv, stored as an HWIO kernel (p, p, C_in, D).
    self.patch_kernel = nnx.Param(
      annotate(
        nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3), ("patch", "patch", None, "embed")
      )(rngs.params(), (p, p, cfg.in_channels, d), pdt)
    )
    self.patch_bias = nnx.Param(jnp.zeros((d,), pdt), logical_axes=("embed",))
    self.text_proj = _linear(cfg, cfg.text_embed_dim, d, ("text_embed", "embed"), rngs)
    self.time_linear_1 = _linear(cfg, d, cfg.time_embed_dim, (None, "time_embed"), rngs)
    self.time_linear_2 = _linear(cfg, cfg.time_embed_dim, cfg.time_embed_dim, (None, "time_embed"), rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)  # stacked: every block param gains a leading "layers" axis
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    if cfg.feature_cache:  # the cache gates; key "gates" is what converted checkpoints and the converter use
      self.gates = nnx.Param(jnp.full((cfg.num_layers,), cfg.gate_init, pdt), logical_axes=("layers",))
    self.norm_final = _layer_norm(cfg, d, cfg.norm_eps)
    self.norm_out = _layer_norm(cfg, d, cfg.out_norm_eps)
    self.norm_out_mod = _linear(
      cfg, cfg.time_embed_dim, 2 * d, (None, "modulation"), rngs, zero=cfg.zero_init_modulation
    )  # (shift, scale)
    # Output features ordered (py, px, c) so unpatchify is a plain channels-last reshape.
    self.proj_out = _linear(
      cfg, d, p * p * cfg.out_channels, ("embed", None), rngs, zero=cfg.zero_init_modulation
    )

  # -- input checks ----------------------------------------------------------------------------

  def check_inputs(self, latents, timesteps, text) -> None:
    """Raises ValueError with the problem and the fix for inputs this model cannot take."""
    cfg = self.cfg
    if latents.ndim != 5:
      raise ValueError(
        f"latents must be (batch, frames, height, width, channels) channels-last, got shape {latents.shape}"
      )
    b, t, h, w, c = latents.shape
    if c != cfg.in_channels:
      raise ValueError(
        f"latents have {c} channels, the model takes {cfg.in_channels} (channels-last "
        f"layout (B, T, H, W, C); transpose PyTorch (B, T, C, H, W) latents first)"
      )
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(
        f"latent height/width {h}x{w} must be divisible by the patch size {p} "
        f"(video height/width divisible by the VAE's spatial compression x {p})"
      )
    check_positional_table(cfg, t, h, w)
    if text.ndim != 3 or text.shape[-1] != cfg.text_embed_dim:
      raise ValueError(
        f"text embeddings must be (batch, {cfg.text_length}, {cfg.text_embed_dim}), got {text.shape}"
      )
    if text.shape[1] != cfg.text_length:
      raise ValueError(
        f"text embeddings have {text.shape[1]} tokens, the model takes exactly "
        f"{cfg.text_length}: pad or truncate the prompt tokens to {cfg.text_length}"
      )
    if text.shape[0] != b:
      raise ValueError(f"batch mismatch: {b} latents but {text.shape[0]} text embeddings")
    if timesteps.ndim != 1 or timesteps.shape[0] != b:
      raise ValueError(f"timesteps must be shape ({b},), one per sample, got {timesteps.shape}")

  # -- forward ---------------------------------------------------------------------------------

  def embed(self, latents, text):
    """Patch + text embedding and positions -> (B, L + T*h*w, D) joint sequence."""
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    b, t, h, w, c = latents.shape
    p = cfg.patch_size
    x = latents.astype(dt).reshape(b, t, h // p, p, w // p, p, c)
    video = jnp.einsum("btypxqc,pqcd->btyxd", x, self.patch_kernel[...].astype(dt))
    video = video.reshape(b, -1, cfg.hidden_size) + self.patch_bias[...].astype(dt)
    if cfg.positional_embedding == "sincos":
      video = video + jnp.asarray(sincos_3d(cfg, t, h // p, w // p), dt)
    text = self.text_proj(text.astype(dt))
    return jnp.concatenate([text, video], axis=1)

  def time_embedding(self, timesteps):
    feats = timestep_features(timesteps, self.cfg.hidden_size).astype(DTYPES[self.cfg.dtype])
    return self.time_linear_2(jax.nn.silu(self.time_linear_1(feats)))

  def start_cache(self, e: jax.Array) -> tuple[FeatureCache | NoCache, jax.Array, jax.Array]:
    """The one place the config switches RepVideo on or off: the cache started from the embedding
    output ``e``, the per-layer cache gates (float32; zeros with the cache off) and reset flags."""
    cfg = self.cfg
    resets = FeatureCache.reset_flags(cfg.num_layers, cfg.cache_window)
    if cfg.feature_cache:
      return FeatureCache.start(e), self.gates[...].astype(jnp.float32), resets
    return NoCache(), jnp.zeros((cfg.num_layers,), jnp.float32), resets

  def run_layers(
    self,
    x: jax.Array,
    temb_act: jax.Array,
    text_len: int,
    rope: Any,
    capture: Callable[[LayerView], Any] | None = None,
    lora: Any = None,
    lora_dropout: LoraDropout | None = None,
  ) -> tuple[jax.Array, Any]:
    """The layer stack: a scan over the stacked layer params (or a Python loop), with the feature
    cache in the carry. Returns ``(h, captured)``: the last block's output and, when
    ``capture(LayerView) -> pytree`` is given, its per-layer results stacked over layers (else None).
    ``lora``: (lora, scale) pairs whose factors are scanned with the layers (the LoRA hook above),
    with ``lora_dropout`` (training) as branches beside the linears instead of adapted kernels.
    """
    cfg = self.cfg
    graphdef, layer_state = nnx.split(self.blocks)
    cache, cache_gates, resets = self.start_cache(x)
    lora_factors, lora_multipliers = _lora_scan_inputs(lora)
    gate_offsets = lora_gate_offsets(lora, cfg)
    if gate_offsets is not None:
      cache_gates = cache_gates + gate_offsets
    drop_keys = None
    if lora_factors is not None and lora_dropout is not None and lora_dropout.rate > 0:
      drop_keys = jax.random.split(lora_dropout.key, cfg.num_layers)

    def step(carry, xs):
      h, cache = carry
      params, cache_gate, reset, layer_lora, drop_key = xs
      inp = cache.mix(h, cache_gate)
      inp = sharding.constrain(inp, ("activation_batch", "activation_length", "activation_embed"))
      block = nnx.merge(graphdef, quantize.dequantize_layer(params))  # int8 kernels: this layer only
      if drop_key is not None:
        _branch_block(block, layer_lora, lora_multipliers, LoraDropout(lora_dropout.rate, drop_key))
      elif layer_lora is not None:
        _adapt_block(block, layer_lora, lora_multipliers)
      out = block(inp, temb_act, text_len, rope)
      captured = None
      if capture is not None:
        captured = capture(LayerView(block, inp, out, h, temb_act, text_len, rope, cache_gate))
      return (out, cache.push(out, reset)), captured

    step = remat(step, cfg.remat)
    carry, xs = (x, cache), (layer_state, cache_gates, resets, lora_factors, drop_keys)
    if cfg.scan_layers:
      carry, captured = jax.lax.scan(step, carry, xs)
    else:
      per_layer = []
      for i in range(cfg.num_layers):
        carry, c = step(carry, jax.tree.map(lambda a, i=i: a[i], xs))
        per_layer.append(c)
      captured = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)  # None without capture
    return carry[0], captured

  def __call__(
    self,
    latents: jax.Array,
    timesteps: jax.Array,
    text_embeddings: jax.Array,
    lora: Any = None,
    lora_dropout: LoraDropout | None = None,
  ) -> jax.Array:
    """``lora``: None, or (lora, scale) pairs applied unmerged (the LoRA hook above);
    ``lora_dropout``: a ``LoraDropout`` while training them."""
    return self._forward(latents, timesteps, text_embeddings, None, lora, lora_dropout)[0]

  def intermediates(
    self,
    latents: jax.Array,
    timesteps: jax.Array,
    text_embeddings: jax.Array,
    capture: Callable[[LayerView], Any],
  ):
    """The forward pass, also returning ``capture(view)`` of every layer stacked on a leading
    layer axis: ``(v_prediction, captured)``. ``view`` is a ``LayerView`` (the block, its mixed
    input, its output, its cache gate, ...); keep what ``capture`` returns small (reduce inside it)."""
    return self._forward(latents, timesteps, text_embeddings, capture)

  def with_residual(
    self, latents: jax.Array, timesteps: jax.Array, text_embeddings: jax.Array, lora: Any = None
  ) -> tuple[jax.Array, jax.Array]:
    """The forward pass, also returning the layer stack's residual: ``(v_prediction, h_out - h_in)``,
    the residual on the joint text + video sequence (B, L + N, D). What a step cache keeps
    (``repvideo_jax.step_cache``)."""
    x, temb_act, text_len, rope = self._prologue(latents, timesteps, text_embeddings)
    h, _ = self.run_layers(x, temb_act, text_len, rope, None, lora)
    return self._head(h, temb_act, text_len, latents.shape), h - x

  def from_residual(
    self, latents: jax.Array, timesteps: jax.Array, text_embeddings: jax.Array, residual: jax.Array
  ) -> jax.Array:
    """The forward pass with the layer stack replaced by a residual kept from an earlier call
    (``with_residual``): embeddings + residual -> output head. Costs the embeddings and the head."""
    x, temb_act, text_len, _ = self._prologue(latents, timesteps, text_embeddings)
    if residual.shape != x.shape:
      raise ValueError(f"a cached residual of shape {residual.shape} does not fit this call's {x.shape}")
    return self._head(x + residual.astype(x.dtype), temb_act, text_len, latents.shape)

  def _forward(
    self,
    latents: jax.Array,
    timesteps: jax.Array,
    text_embeddings: jax.Array,
    capture: Callable[[LayerView], Any] | None,
    lora: Any = None,
    lora_dropout: LoraDropout | None = None,
  ) -> tuple[jax.Array, Any]:
    """Embeddings, layers and output head -> ``(v_prediction, captured or None)``."""
    x, temb_act, text_len, rope = self._prologue(latents, timesteps, text_embeddings)
    x, captured = self.run_layers(x, temb_act, text_len, rope, capture, lora, lora_dropout)
    return self._head(x, temb_act, text_len, jnp.shape(latents)), captured

  def _prologue(self, latents: jax.Array, timesteps: jax.Array, text_embeddings: jax.Array):
    """Checked inputs -> (joint sequence (B, L + N, D), activated timestep embedding, text length,
    rotary tables or None): everything before the layer stack."""
    cfg = self.cfg
    latents, timesteps = jnp.asarray(latents), jnp.asarray(timesteps)
    text_embeddings = jnp.asarray(text_embeddings)
    if timesteps.ndim == 0:
      timesteps = jnp.broadcast_to(timesteps, (latents.shape[0],))
    self.check_inputs(latents, timesteps, text_embeddings)
    resolve_backend(cfg.attention_backend)
    _, t, h, w, _ = latents.shape
    p = cfg.patch_size
    temb_act = jax.nn.silu(self.time_embedding(timesteps))
    x = self.embed(latents, text_embeddings)
    rope = None
    if cfg.positional_embedding == "rope":
      rope = tuple(jnp.asarray(a) for a in rope_3d(cfg, t, h // p, w // p))
    return x, temb_act, text_embeddings.shape[1], rope

  def _head(self, x: jax.Array, temb_act: jax.Array, text_len: int, latent_shape) -> jax.Array:
    """The layer stack's output (B, L + N, D) -> v-prediction (B, T, H, W, C)."""
    cfg = self.cfg
    b, t, h, w, _ = latent_shape
    p = cfg.patch_size
    video = self.norm_final(x[:, text_len:]).astype(x.dtype)
    shift, scale = jnp.split(self.norm_out_mod(temb_act), 2, axis=-1)
    video = self.norm_out(video).astype(x.dtype) * (1 + scale[:, None]) + shift[:, None]
    out = self.proj_out(video)  # (B, T*h*w, p*p*C), features ordered (py, px, c)
    out = out.reshape(b, t, h // p, w // p, p, p, cfg.out_channels)
    return out.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h, w, cfg.out_channels)


# ----------------------------------------------------------------------------------------------
# Pure functional form: params are a plain nested dict of arrays.


_FUNCTIONAL = Functional(RepVideoTransformer)
create = _FUNCTIONAL.create  # (config, rng) -> NNX module with fresh weights
abstract_params = _FUNCTIONAL.abstract_params  # config -> ShapeDtypeStruct tree
logical_axes = _FUNCTIONAL.logical_axes  # config -> logical axis names per param
split_params = _FUNCTIONAL.split_params  # NNX module -> plain param dict
merge = _FUNCTIONAL.merge  # (config, params) -> NNX module; cheap, usable inside jit
init = _FUNCTIONAL.init  # (config, rng) -> fresh plain param dict


def apply(
  params: dict[str, Any],
  latents: jax.Array,
  timesteps: jax.Array,
  text_embeddings: jax.Array,
  *,
  config: TransformerConfig,
  lora: Sequence[tuple[dict[str, Any], Any]] | None = None,
  lora_dropout: LoraDropout | None = None,
) -> jax.Array:
  """Pure forward: v-prediction (B, T, H, W, C) for channels-last latents. jit/grad/vmap friendly.
  ``lora``: None, or a list of (lora, scale) pairs (``repvideo_jax.lora``) applied unmerged, layer
  by layer inside the scan; ``params`` stay the base model's. ``lora_dropout``: ``LoraDropout(rate,
  key)`` while training a LoRA (peft's dropout of the LoRA branch's input)."""
  return merge(config, params)(latents, timesteps, text_embeddings, lora, lora_dropout)


def make_apply(config: TransformerConfig):
  """``apply`` with the config bound: ``fn(params, latents, timesteps, text_embeddings, lora=None)``."""
  return functools.partial(apply, config=config)


def apply_with_residual(
  params: dict[str, Any],
  latents: jax.Array,
  timesteps: jax.Array,
  text_embeddings: jax.Array,
  *,
  config: TransformerConfig,
  lora: Sequence[tuple[dict[str, Any], Any]] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``apply`` that also returns the layer stack's residual (B, L + N, D) for a step cache."""
  return merge(config, params).with_residual(latents, timesteps, text_embeddings, lora)


def apply_from_residual(
  params: dict[str, Any],
  latents: jax.Array,
  timesteps: jax.Array,
  text_embeddings: jax.Array,
  residual: jax.Array,
  *,
  config: TransformerConfig,
) -> jax.Array:
  """``apply`` with the layer stack replaced by a residual from ``apply_with_residual`` (a step cache's
  skipped step: the embeddings and the output head only)."""
  return merge(config, params).from_residual(latents, timesteps, text_embeddings, residual)


def apply_with_intermediates(
  params: dict[str, Any],
  latents: jax.Array,
  timesteps: jax.Array,
  text_embeddings: jax.Array,
  *,
  config: TransformerConfig,
  capture: Callable[[LayerView], Any],
):
  """``apply`` that also returns ``capture(view)`` of every layer, stacked over layers (analysis)."""
  return merge(config, params).intermediates(latents, timesteps, text_embeddings, capture)
