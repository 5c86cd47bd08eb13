"""Noise schedules and guidance weights of the released RepVideo / CogVideoX-2B sampler (docs/sampling.md).

Everything here runs on the host in NumPy (float64 unless a step is documented as float32, to match the
reference's float32 tensors). "a" always means sqrt(alpha_bar), the quantity the SGM code calls "sigma".

Discretisation, ``ZeroSNRDDPMDiscretization(shift_scale=3)`` (docs/sampling.md, 'Noise schedule'):
  beta_t      = linspace(sqrt(0.00085), sqrt(0.012), 1000)_t ** 2                          float64
  abar_t      = prod_{s <= t} (1 - beta_s)                                                  float64
  abar'_t     = abar_t / (3 + (1 - 3) abar_t)        SNR shift: SNR'_t = SNR_t / 3           float64
  a_t         = sqrt(float32(abar'_t)) over a *selected subset* of timesteps                 float32
  a          <- (a - a_last) * (a_first / (a_first - a_last))   zero-terminal-SNR rescale      float32
The rescale is anchored at the first and last entries of the subset it is applied to, so:
  * the 1000-entry table (denoiser and training) is anchored at t=0 and t=999;
  * the 50-step sampling sequence is re-anchored at t=19 and t=999 and is *not* a subset of the table.

Sampling order: timesteps t_i = 999 - 20 i for 50 steps (i = 0..49, large t first), the
a-sequence a_0 = 0 ... a_49, then an appended a_50 = 1.0. The denoiser quantises the incoming a to the
nearest entry of the 1000-table, so c_skip / c_out use a_q = table[j] while the timestep
embedding still sees the raw t_i; for the 50-step schedule j = t_i - 1 on steps 42..49.

Guidance (docs/sampling.md, 'Guidance'): the released ``DynamicCFG`` evaluates
  w = 1 + scale (1 - cos(pi ((N - t) / N) ** exp)) / 2
with the *raw timestep* t (not the loop index), which scatters w over [1, 1 + scale]. ``smooth_guidance_weights``
is the presumably intended loop-index version, a documented deviation from the release.

diffusers-compatible variants (``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` with
``rescale_betas_zero_snr=True``) apply the same shift, then rescale *once* over all 1000 steps in float64
and subsample afterwards, so their sampling a-values differ from the released ones by up to ~1e-3 at small t.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012
SHIFT_SCALE = 3.0
TIMESTEP_SPACINGS = ("trailing", "linspace", "leading")


# ----------------------------------------------------------------------------------------------
# The released (SGM) discretisation.


def zero_snr_alphas_cumprod(
  num_train: int = NUM_TRAIN_TIMESTEPS,
  linear_start: float = LINEAR_START,
  linear_end: float = LINEAR_END,
  shift_scale: float = SHIFT_SCALE,
) -> np.ndarray:
  """The shifted abar'_t, t = 0..num_train-1, float64 (before any rescale)."""
  betas = np.linspace(linear_start**0.5, linear_end**0.5, num_train, dtype=np.float64) ** 2
  alphas_cumprod = np.cumprod(1.0 - betas)
  return alphas_cumprod / (shift_scale + (1.0 - shift_scale) * alphas_cumprod)


def _rescale_zero_terminal(a: np.ndarray) -> np.ndarray:
  """(a - a_last) * (a_first / (a_first - a_last)) in the dtype of ``a`` (the ratio is formed first)."""
  first, last = a[0], a[-1]
  return (a - last) * (first / (first - last))


def released_timesteps(num_steps: int, num_train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """The selected timesteps in *ascending* order: int(linspace(T-1, 0, n, endpoint=False)) reversed.

  For n = 50 this is 999 - 20 k for k = 49..0, i.e. [19, 39, ..., 999]. n = T selects all timesteps.
  """
  if not 1 <= num_steps <= num_train:
    raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
  if num_steps == num_train:
    return np.arange(num_train, dtype=np.int64)
  return np.linspace(num_train - 1, 0, num_steps, endpoint=False).astype(np.int64)[::-1].copy()


def rescaled_sqrt_alphas(timesteps: np.ndarray, **discretisation) -> np.ndarray:
  """a over ascending ``timesteps``: float32 sqrt of abar', rescaled over this subset."""
  alphas_cumprod = zero_snr_alphas_cumprod(**discretisation)[np.asarray(timesteps)]
  return _rescale_zero_terminal(np.sqrt(alphas_cumprod.astype(np.float32)))


def sqrt_alpha_table(
  num_train: int = NUM_TRAIN_TIMESTEPS,
  linear_start: float = LINEAR_START,
  linear_end: float = LINEAR_END,
  shift_scale: float = SHIFT_SCALE,
) -> np.ndarray:
  """The 1000-entry table a_i (float32) used by the denoiser and training: table[i] = a at timestep i.

  a_0 = 0.998726 ... a_999 = 0 exactly (docs/sampling.md, 'The 1000-entry table').
  """
  return rescaled_sqrt_alphas(
    np.arange(num_train),
    num_train=num_train,
    linear_start=linear_start,
    linear_end=linear_end,
    shift_scale=shift_scale,
  )


def quantize_to_table(a, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Nearest table entry to each a (the release's ``possibly_quantize_sigma``) -> (a_q, index).

  Computed in the table's dtype (float32 for the released table) as |a - table| argmin; ties go to the
  lower index, as torch's argmin does.
  """
  table = np.asarray(table)
  a = np.asarray(a, dtype=table.dtype)
  index = np.abs(a.reshape(-1)[:, None] - table[None, :]).argmin(axis=1).reshape(a.shape)
  return table[index], index.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Per-step sampling schedules.


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingSchedule:
  """Everything a sampler needs per step i = 0..n-1, in sampling order (large t first).

  timesteps:    (n,) int64   raw DDPM timestep fed to the timestep embedding
  alphas:       (n,)         a_i, the noise level of the current iterate x_i
  alphas_next:  (n,)         a of the step's target level (a_{i+1}; 1.0 after the last step)
  model_alphas: (n,)         a used for c_skip / c_out in the denoiser (the table-quantised a_i for the
                             released model; equal to ``alphas`` for the diffusers schedules)
  table_index:  (n,) int64   index of ``model_alphas`` in the 1000-table
  ``num_steps`` is the number of network evaluations (each on a 2B batch with CFG); the compiled samplers
  run all of them inside one ``lax.scan`` and report each finished step through a host callback
  (``samplers.progress_hook``).
  """

  timesteps: np.ndarray
  alphas: np.ndarray
  alphas_next: np.ndarray
  model_alphas: np.ndarray
  table_index: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  @property
  def idx(self) -> np.ndarray:
    """The SGM loop counter idx_i = n - i (idx == 1 marks the last step)."""
    return self.num_steps - np.arange(self.num_steps, dtype=np.int64)

  @property
  def alpha_sequence(self) -> np.ndarray:
    """(n+1,) a_0..a_{n-1} followed by the final target (1.0): 51 values for n = 50 (listed in
    docs/sampling.md, 'The 50-step sampling sequence')."""
    return np.concatenate([self.alphas, self.alphas_next[-1:]])


def sampling_schedule(num_steps: int = 50, *, quantize: bool = True, **discretisation) -> SamplingSchedule:
  """The released ``VPSDEDPMPP2MSampler`` schedule (docs/sampling.md, 'The 50-step sampling sequence').

  The a-sequence is the subset rescale (float32) flipped to sampling order with 1.0 appended. With
  ``quantize`` (released behaviour) the denoiser's a is the nearest entry of the 1000-table.
  """
  if num_steps < 2:
    raise ValueError(f"the subset rescale needs num_steps >= 2, got {num_steps}")
  ascending = released_timesteps(num_steps, discretisation.get("num_train", NUM_TRAIN_TIMESTEPS))
  alphas = rescaled_sqrt_alphas(ascending, **discretisation)[::-1].copy()
  timesteps = ascending[::-1].copy()
  alphas_next = np.concatenate([alphas[1:], np.ones(1, alphas.dtype)])
  if quantize:
    model_alphas, table_index = quantize_to_table(alphas, sqrt_alpha_table(**discretisation))
  else:
    model_alphas, table_index = alphas.copy(), timesteps.copy()
  return SamplingSchedule(timesteps, alphas, alphas_next, model_alphas, table_index)


# ----------------------------------------------------------------------------------------------
# diffusers-compatible schedules (CogVideoXDDIMScheduler / CogVideoXDPMScheduler).


def diffusers_alphas_cumprod(
  num_train: int = NUM_TRAIN_TIMESTEPS,
  beta_start: float = LINEAR_START,
  beta_end: float = LINEAR_END,
  snr_shift_scale: float = SHIFT_SCALE,
  rescale_betas_zero_snr: bool = True,
) -> np.ndarray:
  """``scheduler.alphas_cumprod`` (float64) for beta_schedule="scaled_linear".

  Shift as above, then (optionally) the zero-terminal-SNR rescale of sqrt(abar') over *all* steps in
  float64 and square back.
  """
  alphas_cumprod = zero_snr_alphas_cumprod(num_train, beta_start, beta_end, snr_shift_scale)
  if rescale_betas_zero_snr:
    alphas_cumprod = _rescale_zero_terminal(np.sqrt(alphas_cumprod)) ** 2
  return alphas_cumprod


def diffusers_timesteps(
  num_steps: int,
  timestep_spacing: str = "trailing",
  num_train: int = NUM_TRAIN_TIMESTEPS,
  steps_offset: int = 0,
) -> np.ndarray:
  """``scheduler.set_timesteps(n)`` timesteps, descending. "trailing" with n = 50 gives 999, 979, ..., 19."""
  if not 1 <= num_steps <= num_train:
    raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
  if timestep_spacing == "linspace":
    return np.linspace(0, num_train - 1, num_steps).round()[::-1].astype(np.int64)
  if timestep_spacing == "leading":
    ratio = num_train // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
  if timestep_spacing == "trailing":
    return np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1
  raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")


def diffusers_sampling_schedule(
  num_steps: int = 50,
  timestep_spacing: str = "trailing",
  *,
  num_train: int = NUM_TRAIN_TIMESTEPS,
  steps_offset: int = 0,
  set_alpha_to_one: bool = True,
  **table_kwargs,
) -> SamplingSchedule:
  """Per-step levels as diffusers' CogVideoX schedulers use them in ``step`` (float64).

  The target of step t is ``prev_t = t - num_train // n`` (not necessarily the next listed timestep),
  with abar = 1 (``set_alpha_to_one``) or abar_0 when prev_t < 0. No table quantisation.
  """
  alphas_cumprod = diffusers_alphas_cumprod(num_train, **table_kwargs)
  timesteps = diffusers_timesteps(num_steps, timestep_spacing, num_train, steps_offset)
  prev = timesteps - num_train // num_steps
  final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
  prev_cumprod = np.where(prev >= 0, alphas_cumprod[np.clip(prev, 0, None)], final)
  alphas = np.sqrt(alphas_cumprod[timesteps])
  return SamplingSchedule(timesteps, alphas, np.sqrt(prev_cumprod), alphas.copy(), timesteps.copy())


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance weights (docs/sampling.md, 'Guidance'). One float64 weight per sampling step.


def dynamic_guidance_weights(
  timesteps, scale: float = 6.0, exp: float = 5.0, num_steps: int = 50, sampler_steps: int | None = None
) -> np.ndarray:
  """The released ``DynamicCFG`` weights: w_i = 1 + scale (1 - cos(pi (s_i / N) ** exp)) / 2.

  s_i = sampler_steps - t_i uses the raw timestep t_i (the release's behaviour), N =
  ``num_steps`` of the guider; ``sampler_steps`` defaults to N (both 50 in the released config). With
  s_i < 0 the power needs an integer ``exp``. Evaluated in Python float64 like ``step_index.item()``.
  """
  steps = num_steps if sampler_steps is None else sampler_steps
  return np.array(
    [
      1.0 + scale * (1.0 - math.cos(math.pi * ((steps - int(t)) / num_steps) ** exp)) / 2.0
      for t in np.asarray(timesteps).reshape(-1)
    ],
    dtype=np.float64,
  )


def constant_guidance_weights(num_steps: int, scale: float = 6.0) -> np.ndarray:
  """Plain CFG (``VanillaCFG``): w_i = scale for every step."""
  return np.full((num_steps,), float(scale), dtype=np.float64)


def smooth_guidance_weights(num_steps: int = 50, scale: float = 6.0, exp: float = 5.0) -> np.ndarray:
  """Deviation from the release: the dynamic formula with s = loop index i, rising smoothly from 1.

  For 50 steps, w goes 1.0 -> 6.864 at i = 49.
  """
  s = np.arange(num_steps, dtype=np.float64)
  return 1.0 + scale * (1.0 - np.cos(np.pi * (s / num_steps) ** exp)) / 2.0
