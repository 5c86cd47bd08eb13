"""Full (non-causal) multi-head attention behind one function with selectable backends.

Backends:
  * ``xla``    -- plain XLA: heads-major einsums with a float32 softmax; runs everywhere. Its custom
                  backward recomputes the probabilities from the saved log-sum-exp; on CPU both
                  directions work through the query rows in blocks (``CPU_QUERY_BLOCK``), so the
                  S x S scores are never held whole (docs/model.md#attention).
  * ``cudnn``  -- cuDNN flash attention through ``jax.nn.dot_product_attention``; NVIDIA GPUs only,
                  bfloat16/float16 inputs.
  * ``splash`` -- the Pallas splash-attention kernel; TPUs only (or ``interpret=True`` anywhere, slowly,
                  which is how the CPU tests exercise it).
  * ``auto``   -- ``cudnn`` on GPU, ``splash`` on TPU, ``xla`` elsewhere.

The platform is the one the computation is placed on (``sharding.target_platform``: the active mesh's
devices), not the host's, so a CPU machine can compile for a TPU topology.

On a mesh (``jax.set_mesh``) every backend runs inside ``jax.shard_map`` -- Pallas kernels cannot be
partitioned by XLA, and the exchange is explicit for the others too. q, k and v enter as
(batch over data x fsdp, sequence over context, heads over tensor); inside, one all-to-all over the
context axis trades the sequence split for a heads split, so each device holds the whole sequence for
``num_heads / (tensor * context)`` heads (Ulysses-style context parallelism); the output goes back
the same way. A sequence the context axis does not divide is zero-padded and the padded keys masked;
a batch the data axes do not divide is computed whole on each of them.

All take q, k, v laid out (batch, seq, heads, head_dim) and return the same layout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

from repvideo_jax import sharding

BACKENDS = ("auto", "xla", "cudnn", "splash")
_PLATFORM_OF = {"cudnn": "gpu", "splash": "tpu"}
# The logical layout of q, k, v (and the output) at the shard_map boundary.
QKV_AXES = ("activation_batch", "activation_length", "activation_heads", None)


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Maps ``auto`` to a concrete backend and checks the platform supports the requested one.

  ``platform`` defaults to where the computation is placed (``sharding.target_platform``)."""
  platform = platform or sharding.target_platform()
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
  if backend == "auto":
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
  needed = _PLATFORM_OF.get(backend)
  if needed is not None and platform != needed:
    raise ValueError(
      f"attention backend {backend!r} needs a {needed.upper()} but the computation is placed on "
      f"{platform!r}; set attention_backend='xla' (works everywhere) or 'auto'"
    )
  return backend


def valid_parallel_degrees(num_heads: int) -> list[int]:
  """The tensor x context degrees that split ``num_heads`` evenly (its divisors)."""
  return [d for d in range(1, num_heads + 1) if num_heads % d == 0]


def check_head_split(num_heads: int, tensor: int, context: int) -> None:
  """Raises a ValueError naming the valid degrees when tensor x context does not divide the heads.
  ``tensor`` and ``context`` are the split degrees of the ``activation_heads`` and
  ``activation_length`` rules (the mesh axes of those names under the default rules)."""
  if num_heads % (tensor * context):
    raise ValueError(
      f"{num_heads} attention heads cannot be split over mesh tensor={tensor} x context={context} "
      f"= {tensor * context}: tensor x context must divide the heads, one of "
      f"{valid_parallel_degrees(num_heads)}"
    )


def attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "xla", interpret: bool = False
) -> jax.Array:
  """Softmax(q k^T / sqrt(d)) v over the full sequence, no mask. Shapes (B, S, H, D) -> (B, S, H, D)."""
  platform = sharding.target_platform(q)
  if not (interpret and backend == "splash"):
    backend = resolve_backend(backend, platform)
  local = functools.partial(
    _local_attention, backend=backend, interpret=interpret, block=query_block_for(platform)
  )
  mesh = sharding.active_mesh()
  if mesh is None:
    return local(q, k, v, kv_len=q.shape[1])
  return _sharded(local, q, k, v, mesh)


def _local_attention(q, k, v, *, kv_len: int, backend: str, interpret: bool, block: int | None = None):
  """One device's attention over the whole sequence; keys at positions >= kv_len are masked."""
  if backend == "splash":
    return _splash(q, k, v, interpret=interpret, kv_len=kv_len)
  if backend == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(
        f"cudnn attention needs bfloat16/float16 inputs, got {q.dtype}; "
        "set dtype='bfloat16' or attention_backend='xla'"
      )
    lengths = None
    if kv_len < k.shape[1]:
      lengths = jnp.full((q.shape[0],), kv_len, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
  return _xla_attention(q, k, v, kv_len, block)


def _mesh_axes(mesh, logical: str) -> tuple[str, ...]:
  spec = sharding.logical_to_spec((logical,))[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return tuple(a for a in axes if a in mesh.shape)


def _sharded(local, q, k, v, mesh):
  """``local`` attention in a shard_map over the active mesh (see the module docstring)."""
  batch, seq, heads, _ = q.shape
  batch_axes = _mesh_axes(mesh, "activation_batch")
  while batch_axes and batch % sharding.mesh_size(mesh, batch_axes):
    batch_axes = batch_axes[:-1]  # e.g. one video on a data=2 mesh: computed whole on both
  seq_axes = _mesh_axes(mesh, "activation_length")
  head_axes = _mesh_axes(mesh, "activation_heads")
  n_seq, n_head = sharding.mesh_size(mesh, seq_axes), sharding.mesh_size(mesh, head_axes)
  check_head_split(heads, n_head, n_seq)
  padded = -(-seq // n_seq) * n_seq
  if padded != seq:
    q, k, v = (jnp.pad(t, ((0, 0), (0, padded - seq), (0, 0), (0, 0))) for t in (q, k, v))
  spec = PartitionSpec(batch_axes or None, seq_axes or None, head_axes or None, None)

  def body(q, k, v):
    if seq_axes:  # sequence-split -> heads-split: the whole sequence, fewer heads
      q, k, v = (jax.lax.all_to_all(t, seq_axes, 2, 1, tiled=True) for t in (q, k, v))
    out = local(q, k, v, kv_len=seq)
    if seq_axes:
      out = jax.lax.all_to_all(out, seq_axes, 1, 2, tiled=True)
    return out

  out = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
  return out[:, :seq] if padded != seq else out


# ----------------------------------------------------------------------------------------------
# XLA backend.

# Query rows per block on CPU (docs/model.md#attention): the scores are never held whole, forward or
# backward, only one block's (block x S per head). That is what lets a long video's attention run on
# a CPU at all: the 2B model's 17,776 tokens x 30 heads would need 38 GB of float32 scores per layer
# and sample, a 448-row block 1 GB. Speed is unchanged: at S = 896 on 2 cores the benchmark
# transformer's forward and forward+backward took the same time (within 2%) with blocks of 224 or 448
# rows as in one piece (benchmarks/README.md).
CPU_QUERY_BLOCK = 448


def query_block_for(platform: str) -> int | None:
  """Query rows per block of the xla backend on ``platform`` (None: one block, as on GPU/TPU, where
  XLA's own fusions schedule the whole attention better than a sequential loop)."""
  return CPU_QUERY_BLOCK if platform == "cpu" else None


def _xla_attention(q, k, v, kv_len: int | None = None, block: int | None = None):
  """softmax(q k^T / sqrt(d)) v for (B, S, H, D) inputs, computed heads-major; see ``_attention_hm``
  for ``block`` and the gradient."""
  kv_len = None if kv_len is None or kv_len >= k.shape[1] else int(kv_len)
  qh = (q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)).transpose(0, 2, 1, 3)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return _attention_hm(qh, kh, vh, kv_len, block).transpose(0, 2, 1, 3)


def _scores(q, k, kv_len):
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if kv_len is not None:  # padded keys get no weight
    keep = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, k.shape[2]), 3) < kv_len
    scores = jnp.where(keep, scores, jnp.float32(-1e30))
  return scores


def _even_block(seq: int, block: int) -> int:
  """The block size that splits ``seq`` rows into as few blocks of at most ``block`` rows as possible,
  evenly, so less than one row per block is padding (456 rows at most 448 a block: 2 x 228, not
  2 x 448 with 440 padding rows)."""
  count = -(-seq // block)
  return -(-seq // count)


def _split_rows(x, block):
  """(B, H, S, ...) -> (S_padded / block, B, H, block, ...): query rows in blocks, the last padded
  with zeros (padded query rows are computed and dropped; they touch no key's gradient)."""
  seq = x.shape[2]
  padded = -(-seq // block) * block
  if padded != seq:
    x = jnp.pad(x, [(0, 0), (0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 3))
  x = x.reshape(*x.shape[:2], padded // block, block, *x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def _join_rows(x, seq):
  """Inverse of ``_split_rows``."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :seq]


def _rows_fwd(q, k, v, kv_len):
  """Attention of some query rows over all keys: (output, log-sum-exp of each row's scores)."""
  scores = _scores(q, k, kv_len)
  peak = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
  e = jnp.exp(scores - peak)
  total = e.sum(-1, keepdims=True)
  out = (
    jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
  ).astype(v.dtype)
  return out, peak + jnp.log(total)


def _rows_bwd(q, k, v, out, lse, d_out, kv_len):
  """The gradients from some query rows: (dq of those rows, their dk and dv contributions), float32.
  The rows' probabilities are recomputed from q, k and the log-sum-exp instead of being saved."""
  probs = jnp.exp(_scores(q, k, kv_len) - lse)
  d_out32 = d_out.astype(jnp.float32)
  dv = jnp.einsum("bhqk,bhqd->bhkd", probs, d_out32)
  dp = jnp.einsum("bhqd,bhkd->bhqk", d_out32, v.astype(jnp.float32))
  delta = (d_out32 * out.astype(jnp.float32)).sum(-1, keepdims=True)
  ds = probs * (dp - delta)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k.astype(jnp.float32))
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q.astype(jnp.float32))
  return dq, dk, dv


def _attention_fwd(q, k, v, kv_len, block):
  seq = q.shape[2]
  block = None if block is None else _even_block(seq, block)
  if block is None or block >= seq:
    out, lse = _rows_fwd(q, k, v, kv_len)
  else:
    out, lse = jax.lax.map(lambda rows: _rows_fwd(rows, k, v, kv_len), _split_rows(q, block))
    out, lse = _join_rows(out, seq), _join_rows(lse, seq)
  return out, (q, k, v, out, lse)


def _attention_bwd(kv_len, block, res, d_out):
  # Like a flash kernel's backward, it keeps O(S) per head besides one block's scores (and is faster
  # on CPU than saving the probabilities).
  q, k, v, out, lse = res
  seq = q.shape[2]
  block = None if block is None else _even_block(seq, block)
  if block is None or block >= seq:
    dq, dk, dv = _rows_bwd(q, k, v, out, lse, d_out, kv_len)
  else:

    def step(acc, rows):
      dq, dk, dv = _rows_bwd(rows[0], k, v, rows[1], rows[2], rows[3], kv_len)
      return (acc[0] + dk, acc[1] + dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    blocks = tuple(_split_rows(x, block) for x in (q, out, lse, d_out))
    (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), blocks)
    dq = _join_rows(dq, seq)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_hm(q, k, v, kv_len=None, block=None):
  """Heads-major attention on pre-scaled q: (B, H, S, D) -> (B, H, S, D), float32 softmax; keys at
  positions >= kv_len (a static int, or None for none) are masked; the query rows are computed in
  blocks of at most ``block`` (static; None: all at once), split evenly (``_even_block``)."""
  return _attention_fwd(q, k, v, kv_len, block)[0]


_attention_hm.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------
# Splash (Pallas, TPU).


def _splash_kernel(num_heads: int, padded_len: int, block: int, interpret: bool):
  """The kernel for one shape. Built afresh in each trace, not cached: its mask tables are arrays that
  belong to the trace (and to the mesh context) they are made in; building them is cheap host work."""
  mask = sm.MultiHeadMask([sm.FullMask((padded_len, padded_len)) for _ in range(num_heads)])
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, *, interpret: bool, kv_len: int | None = None, block: int = 128):
  """Splash attention; pads the sequence to a block multiple (the kernel's blocks are multiples of
  128 lanes) and masks everything from ``kv_len`` on (block padding and any padding of the caller)
  with segment ids."""
  batch, seq, heads, dim = q.shape
  kv_len = seq if kv_len is None else kv_len
  padded = -(-seq // block) * block
  pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
  # The kernel takes (heads, seq, dim) per example and does not scale q itself.
  to_kernel = lambda x: jnp.pad(x, pad).transpose(0, 2, 1, 3)
  qh = to_kernel(q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype))
  kh, vh = to_kernel(k), to_kernel(v)
  ids = jnp.asarray(np.arange(padded) >= kv_len, jnp.int32)  # padding is its own segment
  segment_ids = sk.SegmentIds(q=ids, kv=ids)
  kernel = _splash_kernel(heads, padded, block, interpret)
  out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segment_ids))(qh, kh, vh)
  return out.transpose(0, 2, 1, 3)[:, :seq]
