"""The RepVideo / CogVideoX training objective: v-prediction MSE (docs/sampling.md, 'Training objective').

For a clean latent x0 (the VAE latent times the latent scale factor, channels-last (B, T, H, W, C)):
  idx   ~ U{lo .. hi-1}                 integer timestep, stratified over data-parallel ranks (below)
  a     = table[idx]                    table = schedule.sqrt_alpha_table(): a = sqrt(abar'), a_999 = 0
  s     = sqrt(1 - a^2)
  eps   ~ N(0, I)
  x_t   = a x0 + s eps
  v     = a eps - s x0                  the target; the transformer predicts v_hat = F(x_t, idx, text)
  loss  = mean_{batch, elements} (v_hat - v)^2                 accumulated in float32

This is exactly the reference's weighted x0 loss: with x0_hat = a x_t - s v_hat (the ``DiscreteDenoiser``
with c_skip = a, c_out = -s),
  x0_hat - x0 = a^2 x0 + a s eps - s v_hat - x0 = s (a eps - s x0 - v_hat) = s (v - v_hat),
so with w = 1 / (1 - a^2) = 1 / s^2:   w (x0_hat - x0)^2 = (v_hat - v)^2   (``weighted_x0_loss``).
The configured ``EpsWeighting`` of the reference is not used by this loss.

Stratified timesteps (``DiscreteSampling(uniform_sampling=True)``): with W data-parallel ranks let
G = gcd(W, 1000), the largest divisor of W that also divides 1000. [0, 1000) is cut into G intervals of
1000 / G; rank r draws from interval r // (W / G), i.e. each run of W / G consecutive ranks shares one.
  W = 1 -> [0, 1000);  W = 8 -> rank r: [125 r, 125 r + 125);  W = 16 -> ranks 2k, 2k+1: [125 k, ...);
  W = 3 -> G = 1, every rank draws from [0, 1000).
In a single SPMD program the global batch is sharded over the data axis in contiguous blocks, so
example j of a global batch of B lives on rank j // (B / W); ``sample_timesteps_stratified`` draws it
from that rank's interval, which reproduces the per-rank behaviour.

Text dropout (``ucg_rate`` = 0.1): per sample, the T5 embedding is multiplied by 0 (not replaced by
T5("")), which is also what the sampler's unconditional branch uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Timestep sampling.


def stratified_timestep_range(
  rank: int, world_size: int, num_train: int = NUM_TRAIN_TIMESTEPS
) -> tuple[int, int]:
  """[lo, hi) of the timesteps data-parallel ``rank`` of ``world_size`` draws from (module docstring)."""
  if world_size < 1:
    raise ValueError(f"world_size must be >= 1, got {world_size}")
  if not 0 <= rank < world_size:
    raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
  groups = math.gcd(world_size, num_train)  # largest divisor of W that divides num_train
  width = num_train // groups
  group = rank // (world_size // groups)
  return group * width, (group + 1) * width


def rank_timestep_ranges(world_size: int, num_train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """(world_size, 2) int32 array of every rank's [lo, hi)."""
  return np.asarray(
    [stratified_timestep_range(r, world_size, num_train) for r in range(world_size)], np.int32
  )


def sample_timesteps(
  key: jax.Array, batch: int, lo: int | jax.Array = 0, hi: int | jax.Array = NUM_TRAIN_TIMESTEPS
) -> jax.Array:
  """(batch,) int32 timesteps uniform on {lo, ..., hi - 1}."""
  return jax.random.randint(key, (batch,), lo, hi, dtype=jnp.int32)


def sample_timesteps_stratified(
  key: jax.Array, global_batch: int, world_size: int, num_train: int = NUM_TRAIN_TIMESTEPS
) -> jax.Array:
  """(global_batch,) int32 timesteps; example j draws from the range of rank j // (global_batch / W).

  The batch axis is assumed sharded over the W data-parallel ranks in contiguous blocks (the default for
  a NamedSharding on the data axis), so this is the reference's per-rank sampling in one program.
  """
  if global_batch % world_size:
    raise ValueError(
      f"global batch {global_batch} must be divisible by the data-parallel world size "
      f"{world_size} (each rank gets an equal block of examples)"
    )
  if world_size == 1:
    return sample_timesteps(key, global_batch, 0, num_train)
  ranks = np.arange(global_batch) // (global_batch // world_size)
  ranges = rank_timestep_ranges(world_size, num_train)[ranks]  # host-side: shapes are static
  return sample_timesteps(key, global_batch, jnp.asarray(ranges[:, 0]), jnp.asarray(ranges[:, 1]))


# ----------------------------------------------------------------------------------------------
# Conditioning dropout.


def text_dropout(key: jax.Array, text: jax.Array, rate: float = 0.1) -> jax.Array:
  """Zeroes each sample's text embedding (B, L, D) with probability ``rate``; others are unchanged."""
  if rate <= 0.0:
    return text
  keep = jax.random.bernoulli(key, 1.0 - rate, (text.shape[0],))
  return jnp.where(keep.reshape((-1,) + (1,) * (text.ndim - 1)), text, jnp.zeros((), text.dtype))


# ----------------------------------------------------------------------------------------------
# The loss.


def _per_sample(a: jax.Array, ndim: int) -> jax.Array:
  return a.reshape((-1,) + (1,) * (ndim - 1))


def noise_latents(x0: jax.Array, noise: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x_t, v) in float32 for per-sample a (B,): x_t = a x0 + s eps, v = a eps - s x0, s = sqrt(1-a^2)."""
  x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
  a = _per_sample(a.astype(jnp.float32), x0.ndim)
  s = jnp.sqrt(1.0 - a * a)
  return a * x0 + s * noise, a * noise - s * x0


def v_mse(
  params: Any,
  apply_fn: ApplyFn,
  latents: jax.Array,
  text: jax.Array,
  timesteps: jax.Array,
  noise: jax.Array,
  *,
  table: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Deterministic part of the loss for given timesteps and noise -> (loss, per-sample loss (B,))."""
  a = jnp.asarray(table, jnp.float32)[timesteps]
  x_t, v = noise_latents(latents, noise, a)
  v_hat = apply_fn(params, x_t, timesteps, text).astype(jnp.float32)
  per_sample = jnp.mean(jnp.square(v_hat - v), axis=tuple(range(1, v.ndim)))
  return jnp.mean(per_sample), per_sample


def weighted_x0_loss(x_t: jax.Array, v_hat: jax.Array, x0: jax.Array, a: jax.Array) -> jax.Array:
  """The reference's form: mean of w (x0_hat - x0)^2, x0_hat = a x_t - s v_hat, w = 1/(1-a^2) (a < 1).

  Equal to the v-MSE (module docstring); kept to document and test the equivalence.
  """
  a = _per_sample(a.astype(jnp.float32), x_t.ndim)
  s2 = 1.0 - a * a
  x0_hat = a * x_t.astype(jnp.float32) - jnp.sqrt(s2) * v_hat.astype(jnp.float32)
  return jnp.mean(jnp.square(x0_hat - x0.astype(jnp.float32)) / s2)


def diffusion_loss(
  params: Any,
  apply_fn: ApplyFn,
  latents: jax.Array,
  text: jax.Array,
  key: jax.Array,
  *,
  table: jax.Array,
  world_size: int = 1,
  ucg_rate: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """v-MSE training loss on a (global) batch -> (loss, metrics). Pure; jit / grad friendly.

  params, apply_fn: the transformer, ``apply_fn(params, x_t, timesteps, text) -> v_hat``.
  latents: x0, (B, T, H, W, C), already multiplied by the latent scale factor.
  text: T5 embeddings (B, L, D).
  key: split as ``k_time, k_noise, k_drop = jax.random.split(key, 3)`` for the timesteps
    (``sample_timesteps_stratified``), the noise (``jax.random.normal``, float32) and ``text_dropout``.
  table: the 1000-entry a table (``schedule.sqrt_alpha_table()``).
  world_size: data-parallel ranks the batch is sharded over (timestep stratification).
  metrics: ``loss`` and ``timestep`` (the batch-mean timestep).
  """
  k_time, k_noise, k_drop = jax.random.split(key, 3)
  num_train = int(np.shape(table)[0])
  timesteps = sample_timesteps_stratified(k_time, latents.shape[0], world_size, num_train)
  noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
  text = text_dropout(k_drop, text, ucg_rate)
  loss, _ = v_mse(params, apply_fn, latents, text, timesteps, noise, table=table)
  return loss, {"loss": loss, "timestep": jnp.mean(timesteps.astype(jnp.float32))}
