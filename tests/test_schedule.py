"""Noise schedules and CFG weights vs the release's reference values and diffusers' CogVideoX schedulers.

The reference table is recomputed here in torch, step by step as the SGM ``ZeroSNRDDPMDiscretization``
does it (float64 betas / cumprod / shift, then float32 sqrt and subset rescale), independently of the
module's NumPy implementation.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from repvideo_jax import schedule

# Reference: the 50-step sequence in sampling order, then the appended 1.0 (51 values; docs/sampling.md).
SPEC_SEQUENCE_50 = [
  0,
  0.005220,
  0.010925,
  0.017135,
  0.023873,
  0.031158,
  0.039008,
  0.047441,
  0.056471,
  0.066112,
  0.076376,
  0.087274,
  0.098814,
  0.111005,
  0.123855,
  0.137369,
  0.151552,
  0.166410,
  0.181947,
  0.198168,
  0.215077,
  0.232679,
  0.250979,
  0.269982,
  0.289692,
  0.310114,
  0.331255,
  0.353117,
  0.375706,
  0.399024,
  0.423072,
  0.447849,
  0.473349,
  0.499566,
  0.526485,
  0.554085,
  0.582341,
  0.611214,
  0.640657,
  0.670610,
  0.701001,
  0.731739,
  0.762720,
  0.793822,
  0.824902,
  0.855804,
  0.886352,
  0.916359,
  0.945623,
  0.973940,
  1.0,
]

# Reference: spot values of the 1000-table (docs/sampling.md, 'The 1000-entry table').
SPEC_TABLE = {
  0: 0.998726,
  1: 0.997397,
  10: 0.985285,
  100: 0.853371,
  250: 0.623742,
  500: 0.308752,
  750: 0.104110,
  900: 0.030748,
  990: 0.002288,
  998: 0.000250,
  999: 0.0,
}

# Reference: released DynamicCFG weights, i = 0..49 (docs/sampling.md, 'Guidance').
SPEC_CFG_50 = [
  2.291,
  2.544,
  6.974,
  6.420,
  2.788,
  4.272,
  1.038,
  4.170,
  1.618,
  6.983,
  1.005,
  2.872,
  6.977,
  1.633,
  4.330,
  2.437,
  6.377,
  6.007,
  3.448,
  3.198,
  1.655,
  6.610,
  1.195,
  4.295,
  6.985,
  1.521,
  1.762,
  1.058,
  4.128,
  1.482,
  2.003,
  5.948,
  4.143,
  6.531,
  6.140,
  7.000,
  6.168,
  1.120,
  2.098,
  6.685,
  6.999,
  2.343,
  6.213,
  1.251,
  7.000,
  6.864,
  1.064,
  1.000,
  1.000,
  1.123,
]

# The released CogVideoX-2b scheduler_config.json (diffusers format).
COGVIDEOX_2B_SCHEDULER = dict(
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


def ref_shifted_alphas_cumprod():
  betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
  alphas_cumprod = np.cumprod(1.0 - betas.numpy(), axis=0)
  return alphas_cumprod / (3.0 + (1 - 3.0) * alphas_cumprod)


def ref_sgm_sigmas(n, torch_sqrt=False):
  """SGM get_sigmas(n) followed by the flip back to ascending t: returns (a ascending, timesteps).

  The float32 sqrt is taken correctly rounded (IEEE sqrtf, as on CUDA and in NumPy) via float64;
  ``torch_sqrt`` uses this torch build's CPU float32 sqrt instead, which is not always correctly rounded.
  """
  ac = ref_shifted_alphas_cumprod()
  if n < 1000:
    timesteps = np.linspace(999, 0, n, endpoint=False).astype(int)[::-1]
    ac = ac[timesteps]
  else:
    timesteps = np.arange(1000)
  if torch_sqrt:
    s = torch.tensor(ac, dtype=torch.float32).sqrt()
  else:
    s = torch.tensor(ac, dtype=torch.float32).double().sqrt().float()
  s0, sT = s[0].clone(), s[-1].clone()
  s -= sT
  s *= s0 / (s0 - sT)
  return s.numpy(), timesteps


def test_shifted_alphas_cumprod():
  ours = schedule.zero_snr_alphas_cumprod()
  np.testing.assert_allclose(ours, ref_shifted_alphas_cumprod(), rtol=1e-13, atol=0)
  assert round(ours[0], 7) == 0.9974543 and round(ours[999], 7) == 0.0015582  # docs/sampling.md


def test_table_all_1000_entries():
  table = schedule.sqrt_alpha_table()
  ref, _ = ref_sgm_sigmas(1000)
  assert table.dtype == np.float32 and table.shape == (1000,)
  # np.linspace and torch.linspace differ in the last float64 bit of some betas; after the float32
  # cast that no longer shows: bit-exact.
  np.testing.assert_array_equal(table, ref)
  # torch's CPU float32 sqrt (this build, AVX512) is off by one ulp on some entries; the release built
  # the table with torch on CPU, so bit-level parity with it is platform dependent. Within 1 ulp:
  np.testing.assert_allclose(table, ref_sgm_sigmas(1000, torch_sqrt=True)[0], rtol=0, atol=1.2e-7)
  assert table[999] == 0.0 and np.all(np.diff(table) < 0)
  # Independent float64 formula, for scale: float32 rounding is the only difference.
  a64 = np.sqrt(ref_shifted_alphas_cumprod())
  a64 = (a64 - a64[-1]) * a64[0] / (a64[0] - a64[-1])
  np.testing.assert_allclose(table, a64, rtol=0, atol=3e-7)


def test_table_spot_values_from_spec():
  table = schedule.sqrt_alpha_table()
  for i, value in SPEC_TABLE.items():
    assert abs(float(table[i]) - value) <= 5e-7 + 1e-9, (i, float(table[i]), value)


def test_released_timesteps():
  t50 = schedule.released_timesteps(50)
  np.testing.assert_array_equal(t50, 999 - 20 * np.arange(50)[::-1])
  for n in (1, 7, 25, 50, 100, 333, 999):
    np.testing.assert_array_equal(schedule.released_timesteps(n), ref_sgm_sigmas(n)[1])
  np.testing.assert_array_equal(schedule.released_timesteps(1000), np.arange(1000))
  with pytest.raises(ValueError):
    schedule.released_timesteps(1001)


def test_sampling_schedule_50_matches_reference_and_spec():
  s = schedule.sampling_schedule(50)
  np.testing.assert_array_equal(s.timesteps, 999 - 20 * np.arange(50))
  np.testing.assert_array_equal(s.idx, 50 - np.arange(50))
  ref, _ = ref_sgm_sigmas(50)
  np.testing.assert_array_equal(s.alphas, ref[::-1])  # identical float32 ops -> bit-exact
  np.testing.assert_allclose(s.alphas, ref_sgm_sigmas(50, torch_sqrt=True)[0][::-1], rtol=0, atol=1.2e-7)
  seq = s.alpha_sequence
  assert seq.shape == (51,) and seq[0] == 0.0 and seq[50] == 1.0
  np.testing.assert_array_equal(s.alphas_next, seq[1:])
  spec = np.array(SPEC_SEQUENCE_50)
  diffs = np.abs(seq.astype(np.float64) - spec)
  # The reference list has 6 decimals. Every entry matches to that precision except i = 37 (t = 259):
  # the float32 value 0.61121345 rounds to .611213, the list has .611214, which is the float64
  # computation (0.61121353) rounded. A rounding difference, not a schedule difference.
  off = [i for i in range(51) if diffs[i] > 5e-7]
  assert off == [37], off
  assert diffs[37] < 6e-7
  a64 = np.sqrt(ref_shifted_alphas_cumprod()[s.timesteps[::-1]])
  a64 = ((a64 - a64[-1]) * a64[0] / (a64[0] - a64[-1]))[::-1]
  assert round(a64[37], 6) == 0.611214 and round(float(seq[37]), 6) == 0.611213
  # Re-anchored subset: a(t=19) is the un-rescaled sqrt(abar'_19) (up to float32 rounding of the
  # rescale), not table[19].
  np.testing.assert_allclose(
    s.alphas[49], np.sqrt(np.float32(schedule.zero_snr_alphas_cumprod()[19])), rtol=0, atol=1.2e-7
  )
  assert s.alphas[49] != schedule.sqrt_alpha_table()[19]


def test_sampling_schedule_1000_is_the_table():
  s = schedule.sampling_schedule(1000)
  np.testing.assert_array_equal(s.alphas, schedule.sqrt_alpha_table()[::-1])
  np.testing.assert_array_equal(s.table_index, s.timesteps)


def test_quantisation_quirk():
  s = schedule.sampling_schedule(50)
  table = schedule.sqrt_alpha_table()
  # torch reference of possibly_quantize_sigma: |sigma - table[:, None]|.argmin(dim=0), float32.
  ref_idx = (torch.from_numpy(s.alphas)[None] - torch.from_numpy(table)[:, None]).abs().argmin(dim=0)
  np.testing.assert_array_equal(s.table_index, ref_idx.numpy())
  np.testing.assert_array_equal(s.model_alphas, table[s.table_index])
  shift = s.timesteps - s.table_index
  # Steps 42..49 (t = 159..19) map to index t-1, steps 0..41 to index t (docs/sampling.md,
  # 'Quantization to the table'). This computation (float32, as torch does it) agrees.
  np.testing.assert_array_equal(shift[:42], 0)
  np.testing.assert_array_equal(shift[42:], 1)
  # Boundary caveat: position of the 50-step value within [a_t, a_{t-1}] (0.497 at step 41,
  # 0.515 at step 42), close enough to 0.5 that other rounding could move the boundary by one step.
  frac = lambda i: (s.alphas[i] - table[s.timesteps[i]]) / (table[s.timesteps[i] - 1] - table[s.timesteps[i]])
  assert round(float(frac(41)), 3) == 0.497 and round(float(frac(42)), 3) == 0.515
  # Step 0 (a = 0) quantises to table[999] = 0; a_q never differs from a by more than half a gap.
  assert s.table_index[0] == 999 and s.model_alphas[0] == 0.0
  q, idx = schedule.quantize_to_table([0.5, 1.0, 0.0], table)
  assert idx.tolist() == [int(np.abs(table - np.float32(0.5)).argmin()), 0, 999]
  np.testing.assert_array_equal(q, table[idx])


def test_dynamic_guidance_weights_match_the_release():
  s = schedule.sampling_schedule(50)
  w = schedule.dynamic_guidance_weights(s.timesteps)
  assert w.dtype == np.float64 and w.shape == (50,)
  np.testing.assert_array_equal(np.round(w, 3), np.array(SPEC_CFG_50))
  # Same expression as the diffusers CogVideoX pipeline's use_dynamic_cfg branch, with t.item().
  diffusers = [1 + 6.0 * (1 - math.cos(math.pi * ((50 - t) / 50) ** 5.0)) / 2 for t in s.timesteps.tolist()]
  np.testing.assert_array_equal(w, np.array(diffusers))
  assert np.all((w >= 1.0) & (w <= 7.0))


def test_constant_and_smooth_guidance_weights():
  np.testing.assert_array_equal(schedule.constant_guidance_weights(50, 6.0), np.full(50, 6.0))
  smooth = schedule.smooth_guidance_weights(50)
  assert smooth[0] == 1.0 and round(smooth[-1], 2) == 6.86 and np.all(np.diff(smooth) >= 0)


def _diffusers_scheduler(cls, **overrides):
  return cls(**{**COGVIDEOX_2B_SCHEDULER, **overrides})


@pytest.mark.parametrize("cls", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_diffusers_alphas_cumprod(cls):
  sched = _diffusers_scheduler(cls)
  ours = schedule.diffusers_alphas_cumprod()
  ref = sched.alphas_cumprod.numpy()
  assert ref.dtype == np.float64
  np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
  assert ours[999] == 0.0
  no_rescale = schedule.diffusers_alphas_cumprod(rescale_betas_zero_snr=False)
  np.testing.assert_allclose(
    no_rescale, _diffusers_scheduler(cls, rescale_betas_zero_snr=False).alphas_cumprod.numpy(), rtol=1e-12
  )


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
@pytest.mark.parametrize("n", [50, 30, 7, 1000])
def test_diffusers_timesteps(spacing, n):
  sched = _diffusers_scheduler(CogVideoXDDIMScheduler, timestep_spacing=spacing)
  sched.set_timesteps(n)
  np.testing.assert_array_equal(schedule.diffusers_timesteps(n, spacing), sched.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_diffusers_sampling_schedule_levels(spacing):
  n = 30
  sched = _diffusers_scheduler(CogVideoXDDIMScheduler, timestep_spacing=spacing)
  sched.set_timesteps(n)
  ours = schedule.diffusers_sampling_schedule(n, spacing)
  ac = sched.alphas_cumprod
  for i, t in enumerate(sched.timesteps.tolist()):
    prev = t - 1000 // n
    prev_ac = ac[prev] if prev >= 0 else sched.final_alpha_cumprod
    assert ours.timesteps[i] == t
    np.testing.assert_allclose(ours.alphas[i], float(ac[t]) ** 0.5, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(ours.alphas_next[i], float(prev_ac) ** 0.5, rtol=1e-14)
  np.testing.assert_array_equal(ours.model_alphas, ours.alphas)


def test_released_vs_diffusers_sampling_levels():
  """diffusers rescales over 1000 steps then subsamples; the release rescales the 50-subset."""
  released = schedule.sampling_schedule(50)
  diff = schedule.diffusers_sampling_schedule(50, "trailing")
  np.testing.assert_array_equal(released.timesteps, diff.timesteps)
  gap = np.abs(released.alphas.astype(np.float64) - diff.alphas)
  assert gap[0] == 0.0 and 5e-4 < gap.max() < 2e-3 and gap.argmax() >= 40  # largest at small t
