"""The T5 v1.1 encoder that conditions CogVideoX-2B / RepVideo, and prompt encoding.

Reading order: config -> relative position buckets -> ``RMSNorm`` -> ``T5Block`` (self-attention +
feed-forward, pre-norm, residual) -> ``T5Encoder`` (embedding, shared position bias, scanned layer
stack, final norm) -> the pure functional form (``init`` / ``apply``) -> tokenisation and
``encode_prompts``.

Layouts (channels last):
  input_ids       (B, L)           int token ids (pad 0, EOS 1 for the T5 tokenizer)
  attention_mask  (B, L)           optional 1 = real token, 0 = padding (the release passes none)
  output          (B, L, d_model)  last hidden state, pad positions included

T5 conventions kept exactly: no 1/sqrt(d) scaling of q.k (it is folded into the weights), no biases
anywhere, RMSNorm without mean subtraction or bias, a bucketed relative position bias that only layer
0 owns and every layer adds, masked keys get ``finfo(float32).min`` added to their scores (as
transformers does, so masked outputs match it position for position). Norm statistics, attention
scores and softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import T5Tokenizer

from repvideo_jax import quantize, sharding
from repvideo_jax.functional import DTYPES, REMAT_POLICIES, Functional, annotate, remat

T5_DTYPES = ("float32", "bfloat16")  # float16 overflows in T5 v1.1 activations
FEED_FORWARD = ("gated-gelu", "gated-silu", "relu")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of the T5 encoder. Defaults are the T5 v1.1 XXL encoder CogVideoX-2B uses."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  num_heads: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # "gated-gelu": gelu_tanh(x W0) * (x W1) (T5 v1.1); "gated-silu": the same with SiLU;
  # "relu": relu(x Wi) (original T5).
  feed_forward_proj: Literal["gated-gelu", "gated-silu", "relu"] = "gated-gelu"
  max_length: int = 226  # prompt tokens (incl. EOS) fed to the DiT
  # Execution.
  scan_layers: bool = True
  remat: Literal["none", "full", "save_dots"] = "none"
  dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
  param_dtype: Literal["float32", "bfloat16"] = "float32"

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  def __post_init__(self):
    if self.feed_forward_proj not in FEED_FORWARD:
      raise ValueError(f"feed_forward_proj must be one of {FEED_FORWARD}, got {self.feed_forward_proj!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in T5_DTYPES:
        extra = (
          " (T5 v1.1 activations overflow float16; use bfloat16)" if getattr(self, name) == "float16" else ""
        )
        raise ValueError(f"{name} must be one of {list(T5_DTYPES)}, got {getattr(self, name)!r}{extra}")
    nb = self.relative_attention_num_buckets
    if nb < 4 or nb % 2:
      raise ValueError(f"relative_attention_num_buckets must be even and >= 4, got {nb}")
    if self.relative_attention_max_distance <= nb // 4:
      raise ValueError(
        f"relative_attention_max_distance ({self.relative_attention_max_distance}) must "
        f"exceed num_buckets/4 = {nb // 4} (the exact-position buckets)"
      )
    if self.max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {self.max_length}")


# ----------------------------------------------------------------------------------------------
# Relative positions (host-side NumPy: they depend only on the sequence length).


def relative_position_buckets(
  query_length: int, key_length: int, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
  """Bidirectional T5 buckets (query_length, key_length) int32 of ``key_pos - query_pos``.

  Half the buckets are for keys after the query. Within a half, distances below num_buckets/4 get
  their own bucket, larger ones share logarithmically wider buckets up to ``max_distance``; anything
  farther lands in the last bucket. The logarithm is evaluated in float32 like the PyTorch reference,
  so boundary distances fall into the same bucket.
  """
  rel = np.arange(key_length, dtype=np.int64)[None, :] - np.arange(query_length, dtype=np.int64)[:, None]
  half = num_buckets // 2
  exact = half // 2
  dist = np.abs(rel)
  scaled = (
    np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
    / np.float32(math.log(max_distance / exact))
    * np.float32(half - exact)
  )
  large = np.minimum(exact + scaled.astype(np.int64), half - 1)
  buckets = (rel > 0) * half + np.where(dist < exact, dist, large)
  return buckets.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Layers.


def _linear(
  cfg: T5Config, din: int, dout: int, axes: tuple, rngs: nnx.Rngs, scale: float = 1.0
) -> nnx.Linear:
  init = nnx.initializers.variance_scaling(scale, "fan_in", "normal")
  return nnx.Linear(
    din,
    dout,
    use_bias=False,
    dtype=DTYPES[cfg.dtype],
    param_dtype=DTYPES[cfg.param_dtype],
    kernel_init=annotate(init, axes),
    rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale; no mean subtraction, no bias; float32 statistics."""

  def __init__(self, cfg: T5Config, dim: int, *, rngs: nnx.Rngs):
    del rngs  # deterministic init (ones)
    self.eps = cfg.layer_norm_epsilon
    self.out_dtype = DTYPES[cfg.dtype]
    self.scale = nnx.Param(jnp.ones((dim,), DTYPES[cfg.param_dtype]), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    return y.astype(self.out_dtype)


_ACTIVATIONS = {
  "gated-gelu": functools.partial(jax.nn.gelu, approximate=True),
  "gated-silu": jax.nn.silu,
  "relu": jax.nn.relu,
}


class T5Block(nnx.Module):
  """One encoder layer: x + SelfAttn(RMSNorm(x)), then x + FFN(RMSNorm(x))."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    d, inner = cfg.d_model, cfg.inner_dim
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg, d, rngs=rngs)
    # T5 init: q carries the 1/sqrt(d_kv) that the attention does not apply.
    self.q = _linear(cfg, d, inner, ("embed", "heads"), rngs, scale=1.0 / cfg.d_kv)
    self.k = _linear(cfg, d, inner, ("embed", "heads"), rngs)
    self.v = _linear(cfg, d, inner, ("embed", "heads"), rngs)
    self.o = _linear(cfg, inner, d, ("heads", "embed"), rngs)
    self.ffn_norm = RMSNorm(cfg, d, rngs=rngs)
    if cfg.gated:
      self.wi_0 = _linear(cfg, d, cfg.d_ff, ("embed", "mlp"), rngs)
      self.wi_1 = _linear(cfg, d, cfg.d_ff, ("embed", "mlp"), rngs)
    else:
      self.wi = _linear(cfg, d, cfg.d_ff, ("embed", "mlp"), rngs)
    self.wo = _linear(cfg, cfg.d_ff, d, ("mlp", "embed"), rngs)

  def attention(self, x: jax.Array, bias: jax.Array, mask_bias: jax.Array | None) -> jax.Array:
    """x: (B, L, D); bias: (1, H, L, L) float32; mask_bias: (B, 1, 1, L) float32 or None."""
    cfg = self.cfg
    b, l, _ = x.shape
    split = lambda t: sharding.constrain(
      t.reshape(b, l, cfg.num_heads, cfg.d_kv),
      ("activation_batch", "activation_length", "activation_heads", None),
    )
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    if mask_bias is not None:
      scores = scores + mask_bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, cfg.inner_dim)
    return self.o(out)

  def feed_forward(self, x: jax.Array) -> jax.Array:
    act = _ACTIVATIONS[self.cfg.feed_forward_proj]
    if self.cfg.gated:
      h = act(self.wi_0(x)) * self.wi_1(x)
    else:
      h = act(self.wi(x))
    return self.wo(h)

  def __call__(self, x: jax.Array, bias: jax.Array, mask_bias: jax.Array | None) -> jax.Array:
    x = x + self.attention(self.attn_norm(x), bias, mask_bias)
    return x + self.feed_forward(self.ffn_norm(x))


class T5Encoder(nnx.Module):
  """T5 encoder stack. Call with (input_ids (B, L), attention_mask (B, L) or None) -> (B, L, d_model)."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = DTYPES[cfg.param_dtype]
    self.embedding = nnx.Param(
      annotate(nnx.initializers.normal(1.0), (None, "embed"))(
        rngs.params(), (cfg.vocab_size, cfg.d_model), pdt
      )
    )
    # Owned by layer 0 in the checkpoint, shared by all layers: (buckets, heads), tiny, replicated.
    self.relative_attention_bias = nnx.Param(
      annotate(nnx.initializers.normal(1.0), (None, None))(
        rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), pdt
      )
    )

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)  # stacked: every block param gains a leading "layers" axis
    def make_blocks(rngs):
      return T5Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg, cfg.d_model, rngs=rngs)

  def check_inputs(self, input_ids, attention_mask) -> None:
    """Raises ValueError with the problem and the fix for inputs this model cannot take."""
    cfg = self.cfg
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length) token ids, got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integers, got {input_ids.dtype}; pass token ids, not embeddings")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(
        f"attention_mask shape {attention_mask.shape} must equal input_ids shape {input_ids.shape}"
      )
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
      lo, hi = int(input_ids.min()), int(input_ids.max())
      if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(
          f"token ids must lie in [0, {cfg.vocab_size}), got range [{lo}, {hi}]; the "
          "tokenizer does not match this text encoder's vocabulary"
        )

  def position_bias(self, length: int) -> jax.Array:
    """(1, H, L, L) float32 relative position bias, computed once and added in every layer."""
    cfg = self.cfg
    buckets = relative_position_buckets(
      length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )
    table = self.relative_attention_bias[...].astype(jnp.float32)
    return jnp.take(table, jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None]

  def run_layers(self, x: jax.Array, bias: jax.Array, mask_bias: jax.Array | None) -> jax.Array:
    """The layer stack: a scan over stacked layer params (or a Python loop)."""
    cfg = self.cfg
    graphdef, layer_state = nnx.split(self.blocks)

    def step(h, params):
      h = sharding.constrain(h, ("activation_batch", "activation_length", "activation_embed"))
      block = nnx.merge(graphdef, quantize.dequantize_layer(params))  # int8 kernels: this layer only
      return block(h, bias, mask_bias), None

    step = remat(step, cfg.remat)
    if cfg.scan_layers:
      x, _ = jax.lax.scan(step, x, layer_state)
    else:
      for i in range(cfg.num_layers):
        x, _ = step(x, jax.tree.map(lambda a, i=i: a[i], layer_state))
    return x

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    input_ids = input_ids if isinstance(input_ids, jax.Array) else np.asarray(input_ids)
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
    self.check_inputs(input_ids, attention_mask)
    input_ids = jnp.asarray(input_ids)
    length = input_ids.shape[1]
    x = jnp.take(self.embedding[...], input_ids, axis=0).astype(DTYPES[cfg.dtype])
    bias = self.position_bias(length)
    mask_bias = None
    if attention_mask is not None:  # additive key mask (B, 1, 1, L)
      mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(
        jnp.float32
      )
    x = self.run_layers(x, bias, mask_bias)
    return self.final_norm(x)


# ----------------------------------------------------------------------------------------------
# Pure functional form: params are a plain nested dict of arrays.


_FUNCTIONAL = Functional(T5Encoder)
create = _FUNCTIONAL.create  # (config, rng) -> NNX module with fresh weights
abstract_params = _FUNCTIONAL.abstract_params  # config -> ShapeDtypeStruct tree
logical_axes = _FUNCTIONAL.logical_axes  # config -> logical axis names per param
split_params = _FUNCTIONAL.split_params  # NNX module -> plain param dict
merge = _FUNCTIONAL.merge  # (config, params) -> NNX module; cheap, usable inside jit
init = _FUNCTIONAL.init  # (config, rng) -> fresh plain param dict


def apply(
  params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None, *, config: T5Config
) -> jax.Array:
  """Pure forward: last hidden state (B, L, d_model) in the compute dtype. jit/grad/vmap friendly."""
  return merge(config, params)(input_ids, attention_mask)


def make_apply(config: T5Config):
  """``apply`` with the config bound: ``fn(params, input_ids, attention_mask=None)``."""
  return functools.partial(apply, config=config)


@functools.lru_cache(maxsize=8)
def _jitted_apply(config: T5Config):
  return jax.jit(make_apply(config))


# ----------------------------------------------------------------------------------------------
# Prompts -> token ids -> embeddings.


def load_tokenizer(path, **kwargs):
  """``T5Tokenizer`` from a tokenizer folder (holding ``spiece.model``) or a pipeline folder with
  ``tokenizer/``; ``kwargs`` go to ``T5Tokenizer.from_pretrained`` (e.g. ``extra_ids=0``)."""

  path = pathlib.Path(path)
  if (path / "tokenizer").is_dir() and not (path / "spiece.model").exists():
    path = path / "tokenizer"
  if not (path / "spiece.model").exists():
    raise FileNotFoundError(
      f"{path} holds no spiece.model: pass the CogVideoX tokenizer/ folder or the "
      "pipeline folder that contains it"
    )
  return T5Tokenizer.from_pretrained(path, **kwargs)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 226) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (ids, mask), both (B, max_length) int32, as the release tokenises them.

  ``padding="max_length"``, ``truncation=True``; the tokenizer appends EOS and pads with its pad id
  (0 for T5). A prompt longer than ``max_length`` tokens (EOS included) is cut to its first
  ``max_length - 1`` tokens + EOS, with a warning naming the prompt and how many tokens were cut.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts given")
  full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
  for i, ids in enumerate(full):
    if len(ids) > max_length:
      cut = len(ids) - max_length
      removed = tokenizer.decode(ids[max_length - 1 : -1]) if cut else ""
      warnings.warn(
        f"prompt {i} ({prompts[i][:60]!r}{'...' if len(prompts[i]) > 60 else ''}) has "
        f"{len(ids)} tokens incl. EOS, more than max_length={max_length}: {cut} tokens cut "
        f"from the end (removed text: {removed!r})",
        stacklevel=2,
      )
  out = tokenizer(
    prompts, padding="max_length", max_length=max_length, truncation=True, return_attention_mask=True
  )
  ids = np.asarray(out["input_ids"], np.int32)
  mask = np.asarray(out["attention_mask"], np.int32)
  if ids.shape != (len(prompts), max_length):
    raise ValueError(f"tokenizer returned shape {ids.shape}, expected {(len(prompts), max_length)}")
  return ids, mask


def encode_prompts(
  params: dict[str, Any],
  config: T5Config,
  tokenizer,
  prompts: str | Sequence[str],
  use_mask: bool = False,
  max_length: int | None = None,
) -> jax.Array:
  """Prompts -> T5 last hidden state (B, max_length, d_model), pad positions included.

  As released (docs/sampling.md, 'Text conditioning') no mask is passed to T5 (pad tokens take part in
  attention); ``use_mask=True`` masks pad keys instead. ``max_length`` defaults to ``config.max_length``.
  """
  ids, mask = tokenize(tokenizer, prompts, max_length or config.max_length)
  return _jitted_apply(config)(params, ids, mask if use_mask else None)
