"""Full (non-causal) multi-head attention behind one function with selectable backends.

Backends:
  * ``xla``    -- plain XLA: heads-major einsums with a float32 softmax; runs everywhere. (On CPU
                  this fuses into one attention loop and measured ~2.5x faster per layer than
                  ``jax.nn.dot_product_attention(implementation="xla")``; see benchmarks/README.md.)
  * ``cudnn``  -- cuDNN flash attention through ``jax.nn.dot_product_attention``; NVIDIA GPUs only,
                  bfloat16/float16 inputs.
  * ``splash`` -- the Pallas splash-attention kernel; TPUs only (or ``interpret=True`` anywhere, slowly,
                  which is how the CPU tests exercise it).
  * ``auto``   -- ``cudnn`` on GPU, ``splash`` on TPU, ``xla`` elsewhere.

All take q, k, v laid out (batch, seq, heads, head_dim) and return the same layout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("auto", "xla", "cudnn", "splash")
_PLATFORM_OF = {"cudnn": "gpu", "splash": "tpu"}


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Maps ``auto`` to a concrete backend and checks the platform supports the requested one."""
  platform = platform or jax.default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
  if backend == "auto":
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
  needed = _PLATFORM_OF.get(backend)
  if needed is not None and platform != needed:
    raise ValueError(
        f"attention backend {backend!r} needs a {needed.upper()} but JAX is running on {platform!r}; "
        f"set attention_backend='xla' (works everywhere) or 'auto'")
  return backend


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "xla",
              interpret: bool = False) -> jax.Array:
  """Softmax(q k^T / sqrt(d)) v over the full sequence, no mask. Shapes (B, S, H, D) -> (B, S, H, D)."""
  if interpret and backend == "splash":
    return _splash(q, k, v, interpret=True)
  backend = resolve_backend(backend)
  if backend == "xla":
    return _xla_attention(q, k, v)
  if backend == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"cudnn attention needs bfloat16/float16 inputs, got {q.dtype}; "
                       "set dtype='bfloat16' or attention_backend='xla'")
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  return _splash(q, k, v, interpret=False)


def _xla_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v in (B, H, S, D) layout; see ``_attention_hm`` for the gradient."""
  qh = (q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)).transpose(0, 2, 1, 3)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return _attention_hm(qh, kh, vh).transpose(0, 2, 1, 3)


def _attention_fwd(q, k, v):
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  peak = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
  e = jnp.exp(scores - peak)
  total = e.sum(-1, keepdims=True)
  out = (jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
         / total).astype(v.dtype)
  return out, (q, k, v, out, peak + jnp.log(total))


def _attention_bwd(res, d_out):
  # The S x S probabilities are recomputed from q, k and the log-sum-exp instead of being saved:
  # the backward keeps O(S) per head, like a flash kernel's (and is faster on CPU than saving them).
  q, k, v, out, lse = res
  probs = jnp.exp(jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) - lse)
  d_out32 = d_out.astype(jnp.float32)
  dv = jnp.einsum("bhqk,bhqd->bhkd", probs, d_out32)
  dp = jnp.einsum("bhqd,bhkd->bhqk", d_out32, v.astype(jnp.float32))
  delta = (d_out32 * out.astype(jnp.float32)).sum(-1, keepdims=True)
  ds = probs * (dp - delta)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k.astype(jnp.float32))
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q.astype(jnp.float32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@jax.custom_vjp
def _attention_hm(q, k, v):
  """Heads-major attention on pre-scaled q: (B, H, S, D) -> (B, H, S, D), float32 softmax."""
  return _attention_fwd(q, k, v)[0]


_attention_hm.defvjp(_attention_fwd, _attention_bwd)


@functools.lru_cache(maxsize=16)
def _splash_kernel(num_heads: int, padded_len: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.FullMask((padded_len, padded_len)) for _ in range(num_heads)])
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _splash(q, k, v, *, interpret: bool, block: int = 128):
  """Splash attention; pads the sequence to a block multiple and masks the padding with segment ids."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  batch, seq, heads, dim = q.shape
  block = min(block, 128 if seq >= 128 else max(8, 1 << (seq - 1).bit_length()))
  padded = -(-seq // block) * block
  pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
  # The kernel takes (heads, seq, dim) per example and does not scale q itself.
  to_kernel = lambda x: jnp.pad(x, pad).transpose(0, 2, 1, 3)
  qh = to_kernel(q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype))
  kh, vh = to_kernel(k), to_kernel(v)
  ids = jnp.asarray(np.arange(padded) >= seq, jnp.int32)  # padding is its own segment
  segment_ids = sk.SegmentIds(q=ids, kv=ids)
  kernel = _splash_kernel(heads, padded, block, interpret)
  out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segment_ids))(qh, kh, vh)
  return out.transpose(0, 2, 1, 3)[:, :seq]
