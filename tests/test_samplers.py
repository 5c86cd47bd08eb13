"""Samplers vs independent references: the released sampler (docs/sampling.md) in float64 NumPy, and diffusers'
CogVideoXDDIMScheduler / CogVideoXDPMScheduler driving a torch twin of the same stand-in model.

The stand-in "network" is a fixed random map v = tanh((x W)(1 + t/1000) + mean_L(text) P + sin(t/100) b)
over channels-last latents: it depends on x, the raw timestep and the text, so CFG and the
timestep/quantisation split both matter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from repvideo_jax import samplers, schedule

B, T, H, W, C, L, D = 2, 2, 3, 4, 4, 3, 5
SHAPE = (B, T, H, W, C)
DPM_TOL = 1e-5  # max |ours (float32) - reference (float64)| relative to max |reference|
DDIM_TOL = 1e-5  # same, JAX float32 vs diffusers + torch float32

_rng = np.random.default_rng(0)
WEIGHTS = {
  "W": (_rng.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32),
  "P": (_rng.standard_normal((D, C)) * 0.7).astype(np.float32),
  "b": (_rng.standard_normal((C,)) * 0.5).astype(np.float32),
}
NOISE = _rng.standard_normal(SHAPE).astype(np.float32)
TEXT = _rng.standard_normal((B, L, D)).astype(np.float32)
NEG_TEXT = _rng.standard_normal((B, L, D)).astype(np.float32)

SCHEDULER_CONFIG = dict(
  num_train_timesteps=1000,
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  clip_sample=False,
  set_alpha_to_one=True,
  steps_offset=0,
  prediction_type="v_prediction",
  rescale_betas_zero_snr=True,
  snr_shift_scale=3.0,
  timestep_spacing="trailing",
)

TRACES = {"count": 0}


def stand_in(params, x, t, text):
  """JAX stand-in; counts its traces."""
  TRACES["count"] += 1
  t = t.reshape((-1,) + (1,) * (x.ndim - 1))
  cond = (text.mean(axis=1) @ params["P"]).reshape(text.shape[0], 1, 1, 1, -1)
  return jnp.tanh((x @ params["W"]) * (1 + t / 1000) + cond + jnp.sin(t / 100) * params["b"])


def stand_in_np(x, t, text):
  p = {k: v.astype(np.float64) for k, v in WEIGHTS.items()}
  t = np.asarray(t, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
  cond = (text.mean(axis=1) @ p["P"]).reshape(text.shape[0], 1, 1, 1, -1)
  return np.tanh((x @ p["W"]) * (1 + t / 1000) + cond + np.sin(t / 100) * p["b"])


def stand_in_torch(x, t, text):
  p = {k: torch.from_numpy(v) for k, v in WEIGHTS.items()}
  t = t.float().reshape((-1,) + (1,) * (x.ndim - 1))
  cond = (text.mean(dim=1) @ p["P"]).reshape(text.shape[0], 1, 1, 1, -1)
  return torch.tanh((x @ p["W"]) * (1 + t / 1000) + cond + torch.sin(t / 100) * p["b"])


def jparams():
  return {k: jnp.asarray(v) for k, v in WEIGHTS.items()}


# ----------------------------------------------------------------------------------------------
# The released DPM-Solver++(2M) SDE (docs/sampling.md), literally, in float64.


def reference_dpmpp2m_sde(x, text_c, text_u, seq, timesteps, table, weights, z1, z2):
  """seq: the 51 a-values; z1[i], z2[i]: the two normal draws of step i (z1 discarded for i >= 1)."""
  n = len(timesteps)
  a = np.asarray(seq, np.float64)
  sigma = np.sqrt(1 - a**2)
  with np.errstate(divide="ignore"):
    lam = np.log(a / sigma)  # lam[0] = -inf, lam[n] = +inf
  x = x.astype(np.float64)
  old, trace = None, []
  for i in range(n):
    idx = n - i
    # D_i: denoiser at a_i quantised to the nearest table entry, timestep embedding at raw t_i, CFG.
    a_q = float(table[np.abs(np.float32(a[i]) - table).argmin()])
    tt = np.full(2 * len(x), timesteps[i])
    v = stand_in_np(np.concatenate([x, x]), tt, np.concatenate([text_u, text_c]))
    d_u, d_c = np.split(a_q * np.concatenate([x, x]) - np.sqrt(1 - a_q**2) * v, 2)
    d = d_u + weights[i] * (d_c - d_u)
    if idx == 1:
      return d, trace
    h = lam[i + 1] - lam[i]
    with np.errstate(divide="ignore", invalid="raise", over="raise"):
      x_std = (
        (sigma[i + 1] / sigma[i]) * np.exp(-h) * x
        + a[i + 1] * (1 - np.exp(-2 * h)) * d
        + sigma[i + 1] * np.sqrt(1 - np.exp(-2 * h)) * z1[i]
      )
      if i == 0:
        x = x_std
      else:
        r = (lam[i] - lam[i - 1]) / h
        d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        x = (
          (sigma[i + 1] / sigma[i]) * np.exp(-h) * x
          + a[i + 1] * (1 - np.exp(-2 * h)) * d_hat
          + sigma[i + 1] * np.sqrt(1 - np.exp(-2 * h)) * z2[i]
        )
    old = d
    trace.append(x)
  raise AssertionError("unreachable")


def test_dpmpp2m_sde_matches_spec_reference():
  n = 50
  sched = schedule.sampling_schedule(n)
  weights = schedule.dynamic_guidance_weights(sched.timesteps)
  rng = np.random.default_rng(1)
  z1 = rng.standard_normal((n,) + SHAPE).astype(np.float32)
  z2 = rng.standard_normal((n,) + SHAPE).astype(np.float32)
  ref, trace = reference_dpmpp2m_sde(
    NOISE,
    TEXT,
    np.zeros_like(TEXT),
    sched.alpha_sequence,
    sched.timesteps,
    schedule.sqrt_alpha_table(),
    weights,
    z1,
    z2,
  )
  assert len(trace) == n - 1 and all(np.all(np.isfinite(x)) for x in trace)
  step_noise = np.concatenate([z1[:1], z2[1 : n - 1]])  # what the release actually uses per step
  ours = samplers.sample_dpmpp2m_sde(
    stand_in, jnp.asarray(NOISE), jnp.asarray(TEXT), params=jparams(), step_noise=jnp.asarray(step_noise)
  )
  ours = np.asarray(ours)
  assert ours.dtype == np.float32 and ours.shape == SHAPE and np.all(np.isfinite(ours))
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"relative max error {err:.2e}")
  assert err < DPM_TOL, err
  # The quantisation quirk is visible at this tolerance: without it the result moves much further.
  unquantised = samplers.sample_dpmpp2m_sde(
    stand_in,
    jnp.asarray(NOISE),
    jnp.asarray(TEXT),
    params=jparams(),
    step_noise=step_noise,
    schedule=schedule.sampling_schedule(n, quantize=False),
  )
  moved = np.abs(np.asarray(unquantised) - ref).max() / np.abs(ref).max()
  print(f"without quantisation: {moved:.2e}")
  assert moved > 10 * DPM_TOL


def test_no_nan_and_infinite_first_steps():
  sched = schedule.sampling_schedule(50)
  coefs = samplers.dpmpp2m_sde_coefficients(sched)
  for name, c in coefs.items():
    assert np.all(np.isfinite(c)), name
  a1 = float(sched.alphas[1])
  # Step 0: a_0 = 0 -> h = inf -> x_1 = a_1 D_0 + sigma_1 z (no x term, first order).
  assert coefs["c_x"][0] == 0 and coefs["c_prev"][0] == 0
  np.testing.assert_allclose([coefs["c_d"][0], coefs["c_z"][0]], [a1, np.sqrt(1 - a1**2)], rtol=1e-12)
  # Step 1: h_0 = inf -> r = inf -> first order again; second order from step 2 on; last step unused.
  assert coefs["c_prev"][1] == 0 and np.all(coefs["c_prev"][2:49] < 0)
  assert all(c[49] == 0 for c in coefs.values())
  # Every iterate the network sees is finite (recorded from inside the compiled scan).
  seen = []

  def recording(params, x, t, text):
    jax.debug.callback(lambda t, ok: seen.append((float(t[0]), bool(ok))), t, jnp.all(jnp.isfinite(x)))
    return stand_in(params, x, t, text)

  out = samplers.sample_dpmpp2m_sde(
    recording, jnp.asarray(NOISE), jnp.asarray(TEXT), params=jparams(), key=jax.random.key(0)
  )
  jax.block_until_ready(out)
  assert [t for t, _ in seen] == [float(t) for t in sched.timesteps] and all(ok for _, ok in seen)
  assert np.all(np.isfinite(np.asarray(out)))


def test_seeding_and_single_compile():
  noise, text = jnp.asarray(NOISE), jnp.asarray(TEXT)
  run = lambda key, noise=noise, w=None: np.asarray(
    samplers.sample_dpmpp2m_sde(stand_in, noise, text, params=jparams(), key=key, guidance_weights=w)
  )
  first = run(jax.random.key(7))
  traces = TRACES["count"]
  np.testing.assert_array_equal(run(jax.random.key(7)), first)  # same key -> identical
  assert not np.allclose(run(jax.random.key(8)), first)  # different key -> different
  assert not np.allclose(run(jax.random.key(7), noise=noise + 1.0), first)
  run(jax.random.key(9), w=schedule.smooth_guidance_weights(50))  # new weights, same shapes
  assert TRACES["count"] == traces  # one compile per shape: no retrace for keys, noise or weights
  # Per-step noise is fold_in(key, i): injecting exactly those draws reproduces the keyed run.
  key = jax.random.key(7)
  draws = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32) for i in range(49)])
  injected = samplers.sample_dpmpp2m_sde(stand_in, noise, text, params=jparams(), step_noise=draws)
  np.testing.assert_allclose(np.asarray(injected), first, rtol=0, atol=1e-5)  # XLA fusion order
  with pytest.raises(ValueError):
    samplers.sample_dpmpp2m_sde(stand_in, noise, text, params=jparams())  # neither key nor step_noise


def test_guidance_options():
  noise, text = jnp.asarray(NOISE), jnp.asarray(TEXT)
  kw = dict(params=jparams(), key=jax.random.key(3))
  zeros = samplers.sample_dpmpp2m_sde(stand_in, noise, text, **kw)
  explicit = samplers.sample_dpmpp2m_sde(stand_in, noise, text, jnp.zeros_like(text), **kw)
  np.testing.assert_array_equal(np.asarray(zeros), np.asarray(explicit))  # default uncond = zeros
  negative = samplers.sample_dpmpp2m_sde(stand_in, noise, text, jnp.asarray(NEG_TEXT), **kw)
  assert not np.allclose(np.asarray(negative), np.asarray(zeros))
  w1 = samplers.sample_dpmpp2m_sde(stand_in, noise, text, guidance_weights=np.ones(50), **kw)
  no_cfg = samplers.sample_dpmpp2m_sde(stand_in, noise, text, use_guidance=False, **kw)
  np.testing.assert_allclose(np.asarray(w1), np.asarray(no_cfg), rtol=0, atol=1e-5)


def test_denoise_quantises_a_but_not_the_timestep():
  table = schedule.sqrt_alpha_table()
  sched = schedule.sampling_schedule(50)
  seen = []
  model = lambda x, t, text: (seen.append(t), stand_in(jparams(), x, t, text))[1]
  x = jnp.asarray(NOISE)
  i = 45  # t = 99, quantised to table[98]
  out = samplers.denoise(
    model, x, float(sched.alphas[i]), int(sched.timesteps[i]), jnp.asarray(TEXT), table=jnp.asarray(table)
  )
  np.testing.assert_array_equal(np.asarray(seen[0]), [99.0, 99.0])
  a_q = float(table[98])
  expect = a_q * NOISE - np.sqrt(1 - a_q**2) * stand_in_np(NOISE, np.full(B, 99.0), TEXT)
  np.testing.assert_allclose(np.asarray(out), expect, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# diffusers.


def diffusers_loop(scheduler, n, weights, generator=None):
  """CogVideoXPipeline's denoising loop (CFG on v, uncond = zero text), on the torch stand-in."""
  scheduler.set_timesteps(n)
  latents = torch.from_numpy(NOISE.copy())
  text = torch.cat([torch.zeros(B, L, D), torch.from_numpy(TEXT)])
  old_x0 = None
  for i, t in enumerate(scheduler.timesteps):
    v = stand_in_torch(torch.cat([latents] * 2), t.expand(2 * B), text).float()
    v_u, v_c = v.chunk(2)
    v = v_u + float(weights[i]) * (v_c - v_u)
    if isinstance(scheduler, CogVideoXDPMScheduler):
      latents, old_x0 = scheduler.step(
        v,
        old_x0,
        t,
        scheduler.timesteps[i - 1] if i > 0 else None,
        latents,
        generator=generator,
        return_dict=False,
      )
    else:
      latents = scheduler.step(v, t, latents, return_dict=False)[0]
  return latents.numpy()


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_matches_diffusers(spacing):
  n = 50
  sched = schedule.diffusers_sampling_schedule(n, spacing)
  weights = schedule.dynamic_guidance_weights(sched.timesteps)
  ref = diffusers_loop(
    CogVideoXDDIMScheduler(**{**SCHEDULER_CONFIG, "timestep_spacing": spacing}), n, weights
  )
  ours = np.asarray(
    samplers.sample_ddim(
      stand_in,
      jnp.asarray(NOISE),
      jnp.asarray(TEXT),
      params=jparams(),
      guidance_weights=weights,
      timestep_spacing=spacing,
    )
  )
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"relative max error {err:.2e}")
  assert err < DDIM_TOL, err


def test_dpm_with_diffusers_schedule_matches_diffusers():
  """The DPM sampler on the diffusers tables equals CogVideoXDPMScheduler given the same draws."""
  n, seed = 50, 123
  sched = schedule.diffusers_sampling_schedule(n)
  weights = schedule.dynamic_guidance_weights(sched.timesteps)
  ref = diffusers_loop(
    CogVideoXDPMScheduler(**SCHEDULER_CONFIG), n, weights, generator=torch.Generator().manual_seed(seed)
  )
  # Replay diffusers' draws: z1 every step, plus z2 on second-order steps (i >= 1 and prev_t >= 0).
  gen = torch.Generator().manual_seed(seed)
  draws = []
  for i, t in enumerate(sched.timesteps):
    z = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    if i > 0 and t - 1000 // n >= 0:
      z = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    draws.append(z.numpy())
  ours = samplers.sample_dpmpp2m_sde(
    stand_in,
    jnp.asarray(NOISE),
    jnp.asarray(TEXT),
    params=jparams(),
    schedule=sched,
    guidance_weights=weights,
    step_noise=jnp.asarray(np.stack(draws[: n - 1])),
  )
  err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
  print(f"relative max error {err:.2e}")
  assert err < DPM_TOL, err
