"""Training objective: stratified timesteps, text dropout, v-MSE == weighted x0 MSE (docs/sampling.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repvideo_jax import schedule
from repvideo_jax.training import objective


def brute_force_range(rank, world_size, num_idx=1000):
  """SGM ``DiscreteSampling(uniform_sampling=True)``: search i with W % i == 0 and 1000 % (W/i) == 0."""
  i = 1
  while world_size % i != 0 or num_idx % (world_size // i) != 0:
    i += 1
  group_num = world_size // i
  group_width = world_size // group_num
  interval = num_idx // group_num
  group = rank // group_width
  return group * interval, (group + 1) * interval


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 8, 16, 24, 1000])
def test_stratified_range_matches_brute_force(world_size):
  ranges = [objective.stratified_timestep_range(r, world_size) for r in range(world_size)]
  assert ranges == [brute_force_range(r, world_size) for r in range(world_size)]
  # Every interval is used by the same number of ranks and they tile [0, 1000).
  distinct = sorted(set(ranges))
  assert distinct[0][0] == 0 and distinct[-1][1] == 1000
  assert all(a[1] == b[0] for a, b in zip(distinct, distinct[1:]))
  assert len({ranges.count(r) for r in distinct}) == 1


def test_stratified_range_examples():
  assert objective.stratified_timestep_range(0, 1) == (0, 1000)
  assert [objective.stratified_timestep_range(r, 8) for r in range(8)] == [
    (125 * r, 125 * r + 125) for r in range(8)
  ]
  assert [objective.stratified_timestep_range(r, 16) for r in range(16)] == [
    (125 * (r // 2), 125 * (r // 2) + 125) for r in range(16)
  ]
  assert {objective.stratified_timestep_range(r, 3) for r in range(3)} == {(0, 1000)}
  assert objective.stratified_timestep_range(5, 24) == (125, 250)  # G = 8, runs of 3 ranks
  with pytest.raises(ValueError):
    objective.stratified_timestep_range(8, 8)


@pytest.mark.parametrize("world_size", [1, 3, 8, 16])
def test_stratified_samples_per_rank(world_size):
  per_rank = 3000
  batch = world_size * per_rank
  t = np.asarray(objective.sample_timesteps_stratified(jax.random.key(world_size), batch, world_size))
  assert t.shape == (batch,) and t.dtype == np.int32
  for r in range(world_size):
    lo, hi = objective.stratified_timestep_range(r, world_size)
    mine = t[r * per_rank : (r + 1) * per_rank]  # example j belongs to rank j // (batch / W)
    assert mine.min() >= lo and mine.max() < hi
    if hi - lo <= 250:  # enough draws to see every value of a narrow interval
      assert len(np.unique(mine)) == hi - lo
    else:
      assert mine.min() < lo + 10 and mine.max() > hi - 11
  # The single-rank sampler draws uniformly from [lo, hi).
  s = np.asarray(objective.sample_timesteps(jax.random.key(0), 5000, 250, 375))
  assert s.min() == 250 and s.max() == 374
  with pytest.raises(ValueError, match="divisible"):
    objective.sample_timesteps_stratified(jax.random.key(0), 10, 4)


def test_text_dropout():
  n, rate = 20000, 0.1
  text = jax.random.normal(jax.random.key(0), (n, 2, 3)) + 5.0  # no accidental zeros
  out = np.asarray(objective.text_dropout(jax.random.key(1), text, rate))
  text = np.asarray(text)
  dropped = np.all(out == 0.0, axis=(1, 2))
  kept = np.all(out == text, axis=(1, 2))
  assert np.all(dropped ^ kept)  # each sample is either exactly zero or bit-identical
  frac = dropped.mean()
  assert abs(frac - rate) < 5 * np.sqrt(rate * (1 - rate) / n), frac
  np.testing.assert_array_equal(
    np.asarray(objective.text_dropout(jax.random.key(1), jnp.asarray(text), 0.0)), text
  )


def toy_apply(params, x_t, timesteps, text):
  """A stand-in denoiser the test can mirror in NumPy: depends on x_t, the timestep and the text."""
  t = timesteps.astype(jnp.float32)[:, None, None, None, None] / 1000.0
  cond = jnp.mean(text, axis=(1, 2))[:, None, None, None, None]
  return params["w"] * x_t + params["b"] * t + cond


def toy_apply_numpy(params, x_t, timesteps, text):
  t = timesteps.astype(np.float64)[:, None, None, None, None] / 1000.0
  return params["w"] * x_t + params["b"] * t + text.mean(axis=(1, 2))[:, None, None, None, None]


def test_loss_matches_numpy_and_weighted_x0_form():
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((4, 2, 4, 4, 3)).astype(np.float32)
  text = (rng.standard_normal((4, 5, 6)) + 1.0).astype(np.float32)
  params = {"w": np.float32(0.3), "b": np.float32(-0.7)}
  table = schedule.sqrt_alpha_table()
  key = jax.random.key(42)
  world_size, ucg = 2, 0.5
  loss_fn = jax.jit(
    lambda p, x, c, k: objective.diffusion_loss(
      p, toy_apply, x, c, k, table=table, world_size=world_size, ucg_rate=ucg
    )
  )
  loss, metrics = loss_fn(params, latents, text, key)

  # The draws, from the documented key split (timesteps, noise, text dropout).
  k_time, k_noise, k_drop = jax.random.split(key, 3)
  t = np.asarray(objective.sample_timesteps_stratified(k_time, 4, world_size))
  assert t[:2].max() < 500 <= t[2:].min()
  eps = np.asarray(jax.random.normal(k_noise, latents.shape, jnp.float32)).astype(np.float64)
  keep = np.asarray(jax.random.bernoulli(k_drop, 1 - ucg, (4,)))
  assert keep.any() and not keep.all()  # this key exercises both branches
  cond = text.astype(np.float64) * keep[:, None, None]

  a = table[t].astype(np.float64)[:, None, None, None, None]
  s = np.sqrt(1 - a * a)
  x0 = latents.astype(np.float64)
  x_t = a * x0 + s * eps
  v = a * eps - s * x0
  v_hat = toy_apply_numpy({k: np.float64(p) for k, p in params.items()}, x_t, t, cond)
  expected = np.mean((v_hat - v) ** 2)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["timestep"]), t.mean(), rtol=1e-6)

  # Reference form: x0_hat = a x_t - s v_hat, w = 1 / (1 - a^2).
  x0_hat = a * x_t - s * v_hat
  np.testing.assert_allclose(np.mean((x0_hat - x0) ** 2 / (1 - a * a)), expected, rtol=1e-6)
  got = objective.weighted_x0_loss(
    jnp.asarray(x_t, jnp.float32),
    jnp.asarray(v_hat, jnp.float32),
    jnp.asarray(x0, jnp.float32),
    jnp.asarray(table[t]),
  )
  np.testing.assert_allclose(float(got), expected, rtol=1e-4)

  # The gradient flows to the model params.
  grads = jax.grad(lambda p: loss_fn(p, latents, text, key)[0])(params)
  assert all(np.isfinite(float(g)) and float(g) != 0.0 for g in grads.values())


def test_weighted_x0_equals_v_mse_over_all_timesteps():
  """Exact identity for random v_hat at every noise level, including a_999 = 0."""
  table = schedule.sqrt_alpha_table()
  t = np.array([0, 1, 10, 250, 500, 900, 998, 999])
  rng = np.random.default_rng(1)
  x0, eps, v_hat = (rng.standard_normal((len(t), 2, 2, 2, 3)).astype(np.float32) for _ in range(3))
  x_t, v = objective.noise_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(table[t]))
  per_sample_v = np.mean((v_hat - np.asarray(v)) ** 2, axis=(1, 2, 3, 4))
  for i in range(len(t)):
    w_form = objective.weighted_x0_loss(x_t[i : i + 1], v_hat[i : i + 1], x0[i : i + 1], table[t[i : i + 1]])
    np.testing.assert_allclose(float(w_form), per_sample_v[i], rtol=2e-3)
