"""Samplers for the v-prediction RepVideo / CogVideoX-2B denoiser, in JAX (maths: docs/sampling.md).

Denoiser. The network F predicts v = a eps - sqrt(1 - a^2) x0 and the x0 estimate is
    D(x; a, t) = a_q x - sqrt(1 - a_q^2) F(x, t, text)
where a_q is a quantised to the nearest entry of the 1000-table (c_skip = a_q, c_out = -sqrt(1 - a_q^2))
while the timestep embedding receives the raw timestep t.

Guidance. Network calls use a doubled batch [uncond | cond] and are combined on x0:
    D = D_u + w (D_c - D_u)
(equivalent to CFG on v, D being affine in v with shared coefficients). The released uncond text is an
all-zero embedding; an encoded negative prompt may be passed instead.

DPM-Solver++(2M) SDE, VP form (the release's ``VPSDEDPMPP2MSampler``). With sigma = sqrt(1 - a^2),
lambda = log(a / sigma), h_i = lambda_{i+1} - lambda_i and r_i = h_{i-1} / h_i, for i = 0..n-1:
    D_i = D(x_i; a_i, t_i)                          (CFG-combined)
    i == n-1:  return D_i                           (the update toward a = 1 is skipped)
    x_{i+1} = (sigma_{i+1} / sigma_i) e^{-h_i} x_i + a_{i+1} (1 - e^{-2 h_i}) Dhat_i
              + sigma_{i+1} sqrt(1 - e^{-2 h_i}) z_i
    Dhat_i  = D_i for i = 0, else (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}
Written as x_{i+1} = c_x x_i + c_d D_i + c_prev D_{i-1} + c_z z_i, the four coefficients are computed on
the host in float64 (``dpmpp2m_sde_coefficients``) where the infinite lambdas are harmless: a_0 = 0 gives
lambda_0 = -inf, h_0 = +inf, so c_x = 0 and c_d = a_1 at i = 0 (DDPM-style re-noising); at i = 1 the
infinite h_0 makes 1/(2r) = 0 (first order again). The device never sees an inf, so there is no 0 * inf.

Noise (same seed -> same video). The initial x_0 is the ``noise`` argument (N(0, I), no scaling), drawn by
the caller. The step-i noise z_i (i = 0..n-2) is ``jax.random.normal(jax.random.fold_in(key, i), x.shape,
float32)``. The release draws a normal for the first-order candidate on every step and discards it on
steps i >= 1 in favour of a fresh draw (z1 / z2); with counter-based keys nothing needs to be discarded,
so z_i is used directly on every step. For parity tests ``step_noise`` (n-1, *x.shape) injects z_i.

DDIM (eta = 0) reproduces diffusers' ``CogVideoXDDIMScheduler.step`` with ``v_prediction``:
    x0 = sqrt(abar_t) x - sqrt(1 - abar_t) v
    x <- sqrt((1 - abar_prev) / (1 - abar_t)) x + (sqrt(abar_prev) - sqrt(abar_t) sqrt(...)) x0
on the diffusers tables (``schedule.diffusers_sampling_schedule``); the last step lands on x0.

Compilation. Each sampler runs all steps in one ``jax.lax.scan`` over per-step float32 arrays inside
one ``jax.jit``; it recompiles only when shapes (including num_steps), ``model_fn`` or ``use_guidance`` change.
Pass the *same* ``model_fn`` object each call (e.g. a module-level function or ``transformer.apply``) and
pass large weights through ``params`` (``model_fn(params, x, t, text)``): arrays captured by a closure are
baked into the program as constants. Per-step progress: with ``progress=True`` the loop reports each
finished step to the function set with ``progress_hook`` (an unordered ``jax.debug.callback`` carrying
one scalar; see "Compiled loops" below). ``SamplingSchedule.num_steps`` (each step = one network call
on a 2B batch with CFG) gives the total for progress/ETA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from repvideo_jax import schedule as schedules

ModelFn = Callable[..., jax.Array]


class CachedModel(NamedTuple):
  """A model as the step cache calls it (``repvideo_jax.step_cache``; pass it as ``model_fn`` with a
  ``step_cache_plan``): ``with_residual(params, x, t, text) -> (v, residual)`` runs the layer stack and
  returns its residual (``transformer.apply_with_residual``); ``from_residual(params, x, t, text,
  residual) -> v`` reuses one instead (``transformer.apply_from_residual``). Use the same object every
  call (it is a static argument of the compiled loop)."""

  with_residual: Callable[..., tuple[jax.Array, jax.Array]]
  from_residual: Callable[..., jax.Array]


# Step-cache plan codes, one per step (``step_cache.plan``): what the step runs.
FULL = 0  # the layer stack on the whole batch ([uncond | cond] with guidance)
COND_ONLY = 1  # the layer stack on the conditional half; D_c - D_u of the last FULL step reused
REUSE = 2  # no layer stack: the residuals of the last computed step reused (embeddings + head only)


# ----------------------------------------------------------------------------------------------
# Denoiser and guidance.


def _call_model(model_fn: ModelFn, params: Any, x, timesteps, text) -> jax.Array:
  out = model_fn(x, timesteps, text) if params is None else model_fn(params, x, timesteps, text)
  return out.astype(jnp.float32)


def quantize_to_table(a: jax.Array, table: jax.Array) -> jax.Array:
  """Nearest entry of ``table`` to each a (ties to the lower index), elementwise; JAX twin of
  ``schedule.quantize_to_table`` for a computed on device."""
  table = jnp.asarray(table)
  a = jnp.asarray(a, table.dtype)
  return table[jnp.argmin(jnp.abs(a[..., None] - table), axis=-1)]


def v_to_x0(x: jax.Array, v: jax.Array, c_skip, c_out) -> jax.Array:
  """x0 = c_skip x - c_out v with c_skip = a, c_out = sqrt(1 - a^2)."""
  return c_skip * x - c_out * v


def denoise(
  model_fn: ModelFn, x: jax.Array, a, timesteps, text: jax.Array, *, table=None, params: Any = None
) -> jax.Array:
  """x0 estimate D(x; a, t) for one batch; a is scalar or (B,), timesteps raw (B,) or scalar.

  With ``table`` (the 1000-table, ``schedule.sqrt_alpha_table()``) a is first quantised to its nearest
  entry; the timestep embedding always receives the raw ``timesteps``.
  """
  x = x.astype(jnp.float32)
  a = jnp.asarray(a, jnp.float32)
  if table is not None:
    a = quantize_to_table(a, table)
  a = jnp.broadcast_to(a, x.shape[:1]).reshape((-1,) + (1,) * (x.ndim - 1))
  t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), x.shape[:1])
  v = _call_model(model_fn, params, x, t, text)
  return v_to_x0(x, v, a, jnp.sqrt(1.0 - a * a))


def guidance_combine(x0_uncond: jax.Array, x0_cond: jax.Array, w) -> jax.Array:
  """Classifier-free guidance on x0 estimates: D_u + w (D_c - D_u)."""
  return x0_uncond + w * (x0_cond - x0_uncond)


def unconditional_text(text_cond: jax.Array, text_uncond: jax.Array | None = None) -> jax.Array:
  """The uncond branch's text: zeros (released, ``force_uc_zero_embeddings``) or the given embedding."""
  if text_uncond is None:
    return jnp.zeros_like(text_cond)
  return jnp.broadcast_to(jnp.asarray(text_uncond, text_cond.dtype), text_cond.shape)


def guided_denoise(
  model_fn: ModelFn,
  x: jax.Array,
  c_skip,
  c_out,
  timestep,
  text_cond: jax.Array,
  text_uncond: jax.Array | None,
  w,
  *,
  params: Any = None,
) -> jax.Array:
  """CFG-combined x0 at one level. One network call on [uncond | cond] (2B); scalar c_skip/c_out/t/w.

  ``text_uncond=None`` disables guidance (a single B-batch call, w unused).
  """
  x = x.astype(jnp.float32)
  if text_uncond is None:
    t = jnp.full(x.shape[:1], timestep, jnp.float32)
    return v_to_x0(x, _call_model(model_fn, params, x, t, text_cond), c_skip, c_out)
  xx = jnp.concatenate([x, x], axis=0)
  t = jnp.full(xx.shape[:1], timestep, jnp.float32)
  text = jnp.concatenate([text_uncond.astype(text_cond.dtype), text_cond], axis=0)
  x0 = v_to_x0(xx, _call_model(model_fn, params, xx, t, text), c_skip, c_out)
  x0_uncond, x0_cond = jnp.split(x0, 2, axis=0)
  return guidance_combine(x0_uncond, x0_cond, w)


def _relative_change(new: jax.Array, old: jax.Array) -> jax.Array:
  """mean |new - old| / mean |old| (0 when old is all zeros: the first computed step)."""
  new, old = new.astype(jnp.float32), old.astype(jnp.float32)
  den = jnp.mean(jnp.abs(old))
  return jnp.where(den > 0, jnp.mean(jnp.abs(new - old)) / jnp.maximum(den, 1e-30), 0.0)


def _denoiser(model_fn, params, x, text_cond: jax.Array, uncond: jax.Array | None):
  """(initial cache, ``fn(x, s, cache) -> (x0, cache, residual_change)``) for a loop body: plain
  ``guided_denoise`` (cache None), or for a ``CachedModel`` the step cache following ``s["plan"]``.
  The cache holds the last computed residual of the (2B or B) batch and D_c - D_u of the last FULL
  step; ``residual_change`` is the relative change of the residual on a FULL step (0 otherwise), what
  ``step_cache.calibrate`` measures."""
  if not isinstance(model_fn, CachedModel):

    def plain(x, s, cache):
      d = guided_denoise(
        model_fn, x, s["c_skip"], s["c_out"], s["t"], text_cond, uncond, s["w"], params=params
      )
      return d, cache, jnp.float32(0)

    return None, plain

  b = x.shape[0]
  if uncond is None:
    batch_x, text = (lambda x: x), text_cond
  else:
    batch_x = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
    text = jnp.concatenate([uncond.astype(text_cond.dtype), text_cond], axis=0)

  def times(n, s):
    return jnp.full((n,), s["t"], jnp.float32)

  probe = batch_x(x.astype(jnp.float32))
  residual = jax.eval_shape(
    lambda: model_fn.with_residual(params, probe, times(probe.shape[0], {"t": 0.0}), text)
  )[1]
  cache0 = (jnp.zeros(residual.shape, residual.dtype), jnp.zeros(x.shape, jnp.float32))

  def x0_of(xx, v, s):
    return v_to_x0(xx, v.astype(jnp.float32), s["c_skip"], s["c_out"])

  def combine(x0, s):
    if uncond is None:
      return x0
    x0_uncond, x0_cond = jnp.split(x0, 2, axis=0)
    return guidance_combine(x0_uncond, x0_cond, s["w"]), x0_cond - x0_uncond

  def denoise(x, s, cache):
    x = x.astype(jnp.float32)
    xx = batch_x(x)
    residual, delta = cache

    def full(_):
      v, r = model_fn.with_residual(params, xx, times(xx.shape[0], s), text)
      out = combine(x0_of(xx, v, s), s)
      d, new_delta = (out, delta) if uncond is None else out
      return d, (r.astype(residual.dtype), new_delta), _relative_change(r, residual)

    def reuse(_):
      v = model_fn.from_residual(params, xx, times(xx.shape[0], s), text, residual)
      out = combine(x0_of(xx, v, s), s)
      return (out if uncond is None else out[0]), cache, jnp.float32(0)

    if uncond is None:
      return jax.lax.cond(s["plan"] == REUSE, reuse, full, None)

    def cond_only(_):
      v, r_cond = model_fn.with_residual(params, x, times(b, s), text_cond)
      x0_cond = x0_of(x, v, s)
      r = residual.at[b:].set(r_cond.astype(residual.dtype))
      return x0_cond + (s["w"] - 1.0) * delta, (r, delta), jnp.float32(0)

    return jax.lax.switch(s["plan"], [full, cond_only, reuse], None)

  return cache0, denoise


# ----------------------------------------------------------------------------------------------
# Host-side per-step arrays (float64, then float32 for the device).


def _log_snr(a: np.ndarray) -> np.ndarray:
  """lambda = log(a / sqrt(1 - a^2)); -inf at a = 0, +inf at a = 1."""
  a = np.asarray(a, np.float64)
  with np.errstate(divide="ignore"):
    return np.log(a) - 0.5 * np.log1p(-a * a)


def dpmpp2m_sde_coefficients(sched: schedules.SamplingSchedule) -> dict[str, np.ndarray]:
  """Per-step (c_x, c_d, c_prev, c_z), float64, for x_{i+1} = c_x x_i + c_d D_i + c_prev D_{i-1} + c_z z_i.

  The last step's coefficients are 0 (the sampler returns D_{n-1}). All entries are finite.
  """
  a = np.asarray(sched.alphas, np.float64)
  a_next = np.asarray(sched.alphas_next, np.float64)
  n = len(a)
  sigma, sigma_next = np.sqrt(1.0 - a * a), np.sqrt(1.0 - a_next * a_next)
  lam, lam_next = _log_snr(a), _log_snr(a_next)
  with np.errstate(invalid="ignore"):
    h = lam_next - lam  # +inf when a_i = 0 or a_{i+1} = 1
    decay = np.exp(-h)  # e^{-h}: 0 for infinite h
    one_minus = -np.expm1(-2.0 * h)  # 1 - e^{-2h}
    # 1/(2r) = h_i / (2 h_last), h_last = lambda_i - lambda_{i-1}; 0 on the first step and whenever
    # h_last is infinite (a_{i-1} = 0).
    h_last = np.concatenate([[np.inf], lam[1:] - lam[:-1]])
    half_inv_r = np.where(np.isinf(h_last), 0.0, 0.5 * h / np.where(np.isinf(h_last), 1.0, h_last))
  c_x = np.where(decay == 0.0, 0.0, sigma_next / sigma * decay)
  c_z = sigma_next * np.sqrt(one_minus)
  c_d = a_next * one_minus * (1.0 + half_inv_r)
  c_prev = -a_next * one_minus * half_inv_r
  coefs = {"c_x": c_x, "c_d": c_d, "c_prev": c_prev, "c_z": c_z}
  for v in coefs.values():
    v[n - 1] = 0.0
  if not all(np.all(np.isfinite(v)) for v in coefs.values()):
    raise ValueError("non-finite DPM++(2M) SDE coefficients; check the schedule")
  return coefs


def ddim_coefficients(sched: schedules.SamplingSchedule) -> dict[str, np.ndarray]:
  """Per-step (c_x, c_d), float64, for the eta = 0 DDIM update x <- c_x x + c_d x0 (diffusers formula)."""
  abar = np.asarray(sched.alphas, np.float64) ** 2
  abar_prev = np.asarray(sched.alphas_next, np.float64) ** 2
  c_x = np.sqrt((1.0 - abar_prev) / (1.0 - abar))
  return {"c_x": c_x, "c_d": np.sqrt(abar_prev) - np.sqrt(abar) * c_x}


def _step_arrays(
  sched: schedules.SamplingSchedule, guidance_weights, coefs: dict[str, np.ndarray], plan=None
):
  n = sched.num_steps
  weights = np.asarray(guidance_weights, np.float64).reshape(-1)
  if weights.shape != (n,):
    raise ValueError(f"guidance_weights must have one weight per step ({n}), got shape {weights.shape}")
  a_q = np.asarray(sched.model_alphas, np.float64)
  steps = {
    "i": np.arange(n, dtype=np.int32),
    "t": np.asarray(sched.timesteps, np.float32),
    "c_skip": a_q,
    "c_out": np.sqrt(1.0 - a_q * a_q),
    "w": weights,
    **coefs,
  }
  if plan is not None:
    plan = np.asarray(plan)
    if plan.shape != (n,) or not np.isin(plan, (FULL, COND_ONLY, REUSE)).all():
      raise ValueError(f"a step-cache plan is one code in (0, 1, 2) per step ({n}), got {plan!r}")
    steps["plan"] = plan.astype(np.int32)
  return {k: jnp.asarray(v if v.dtype == np.int32 else v.astype(np.float32)) for k, v in steps.items()}


# ----------------------------------------------------------------------------------------------
# Compiled loops.


# Progress reporting: the compiled loop calls ``_report_step`` once per step through an unordered
# ``jax.debug.callback`` carrying one scalar of the step's x0 estimate (so it fires when the step is
# done; nothing else is copied to the host and the loop stays one compiled program). The
# active callback lives in this module-level slot, so changing the progress bar never recompiles.
_PROGRESS_SLOT: dict[str, Any] = {"fn": None}


def _report_step(i, _done) -> None:
  fn = _PROGRESS_SLOT["fn"]
  if fn is not None:
    fn(int(i))


class progress_hook:
  """``with progress_hook(lambda step: bar.update(1)): sample_...(..., progress=True)``."""

  def __init__(self, fn: Callable[[int], None] | None):
    self.fn = fn

  def __enter__(self):
    self.prev, _PROGRESS_SLOT["fn"] = _PROGRESS_SLOT["fn"], self.fn
    return self

  def __exit__(self, *exc):
    _PROGRESS_SLOT["fn"] = self.prev


def _maybe_report(progress: bool, i, x) -> None:
  # One element of the new latents ties the callback to the end of the step (4 bytes to host).
  if progress:
    jax.debug.callback(_report_step, i, x.reshape(-1)[0])


def _step_noise_fn(key, step_noise, shape):
  if step_noise is not None:
    last = step_noise.shape[0] - 1
    if last < 0:
      return lambda i: jnp.zeros(shape, jnp.float32)
    return lambda i: jax.lax.dynamic_index_in_dim(step_noise, jnp.minimum(i, last), keepdims=False)
  return lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("model_fn", "use_guidance", "progress"))
def _dpmpp2m_sde_loop(
  model_fn, params, noise, text_cond, text_uncond, steps, key, step_noise, use_guidance, progress=False
):
  x = noise.astype(jnp.float32)
  uncond = text_uncond if use_guidance else None
  draw = _step_noise_fn(key, step_noise, x.shape)
  cache, denoise = _denoiser(model_fn, params, x, text_cond, uncond)

  def body(carry, s):
    x, d_prev, cache = carry
    d, cache, change = denoise(x, s, cache)
    x = s["c_x"] * x + s["c_d"] * d + s["c_prev"] * d_prev + s["c_z"] * draw(s["i"])
    _maybe_report(progress, s["i"], d)
    return (x, d, cache), change

  (_, d_last, _), changes = jax.lax.scan(body, (x, jnp.zeros_like(x), cache), steps)
  return d_last, changes


@functools.partial(jax.jit, static_argnames=("model_fn", "use_guidance", "progress"))
def _ddim_loop(model_fn, params, noise, text_cond, text_uncond, steps, use_guidance, progress=False):
  uncond = text_uncond if use_guidance else None
  x = noise.astype(jnp.float32)
  cache, denoise = _denoiser(model_fn, params, x, text_cond, uncond)

  def body(carry, s):
    x, cache = carry
    d, cache, change = denoise(x, s, cache)
    _maybe_report(progress, s["i"], d)
    return (s["c_x"] * x + s["c_d"] * d, cache), change

  (x, _), changes = jax.lax.scan(body, (x, cache), steps)
  return x, changes


def sample_dpmpp2m_sde(
  model_fn: ModelFn,
  noise: jax.Array,
  text_cond: jax.Array,
  text_uncond: jax.Array | None = None,
  *,
  num_steps: int = 50,
  guidance_weights=None,
  key: jax.Array | None = None,
  step_noise: jax.Array | None = None,
  schedule: schedules.SamplingSchedule | None = None,
  params: Any = None,
  use_guidance: bool = True,
  progress: bool = False,
  step_cache_plan=None,
  return_changes: bool = False,
) -> jax.Array:
  """The released DPM-Solver++(2M) SDE sampler; returns D_{n-1}, the x0 estimate at t_{n-1}.

  model_fn:     ``model_fn(x, t, text) -> v`` (or ``model_fn(params, x, t, text)`` when ``params`` is
                given); x (N, T, H, W, C) float32, t (N,) float32 raw timesteps, text (N, L, D).
  noise:        x_0 ~ N(0, I), (B, T, H, W, C), used as is.
  text_cond:    (B, L, D) prompt embeddings; text_uncond: None -> zeros (released), or e.g. (B|1, L, D)
                negative-prompt embeddings.
  guidance_weights:  (n,) per-step w; default the released DynamicCFG(scale 6, exp 5, N 50) with the raw-t
                step index s = n - t (``schedule.dynamic_guidance_weights``; docs/sampling.md, 'Guidance',
                lists the n = 50 values).
  key:          PRNG key for the per-step noise z_i = normal(fold_in(key, i)), i = 0..n-2.
  step_noise:   instead of ``key``, the z_i as an array (n-1, B, T, H, W, C) (parity tests).
  schedule:     default ``schedule.sampling_schedule(num_steps)`` (released, table-quantised a_q);
                ``schedule.diffusers_sampling_schedule(n)`` reproduces diffusers' CogVideoXDPMScheduler.
  use_guidance:      False -> a single conditional call per step (w ignored).
  progress:     report each finished step to the callback set with ``progress_hook``.
  step_cache_plan:  with a ``CachedModel`` as ``model_fn``: one code per step (FULL, COND_ONLY, REUSE;
                ``step_cache.plan``), data to the compiled loop (no recompilation per plan).
  return_changes:   also return the per-step relative change of the residual on FULL steps, (n,)
                (``step_cache.calibrate``): ``(out, changes)``.
  """
  sched = schedule if schedule is not None else schedules.sampling_schedule(num_steps)
  if guidance_weights is None:
    # As the release: DynamicCFG(scale 6, exp 5, N = 50) with s = (sampler's num_steps) - t.
    guidance_weights = schedules.dynamic_guidance_weights(sched.timesteps, sampler_steps=sched.num_steps)
  if (key is None) == (step_noise is None):
    raise ValueError("pass exactly one of key (draw the step noise) or step_noise (inject it)")
  if step_noise is not None:
    expected = (sched.num_steps - 1,) + tuple(noise.shape)
    if tuple(step_noise.shape) != expected:
      raise ValueError(f"step_noise must have shape {expected}, got {tuple(step_noise.shape)}")
    step_noise = jnp.asarray(step_noise, jnp.float32)
  _check_cache_args(model_fn, step_cache_plan)
  steps = _step_arrays(sched, guidance_weights, dpmpp2m_sde_coefficients(sched), step_cache_plan)
  uncond = unconditional_text(text_cond, text_uncond) if use_guidance else None
  out, changes = _dpmpp2m_sde_loop(
    model_fn,
    params,
    noise,
    text_cond,
    uncond,
    steps,
    key,
    step_noise,
    use_guidance=use_guidance,
    progress=progress,
  )
  return (out, changes) if return_changes else out


def _check_cache_args(model_fn, plan) -> None:
  if isinstance(model_fn, CachedModel) != (plan is not None):
    raise ValueError("a step cache needs both a CachedModel as model_fn and a step_cache_plan (or neither)")


def sample_ddim(
  model_fn: ModelFn,
  noise: jax.Array,
  text_cond: jax.Array,
  text_uncond: jax.Array | None = None,
  *,
  num_steps: int = 50,
  guidance_weights=None,
  timestep_spacing: str = "trailing",
  schedule: schedules.SamplingSchedule | None = None,
  params: Any = None,
  use_guidance: bool = True,
  progress: bool = False,
  step_cache_plan=None,
  return_changes: bool = False,
) -> jax.Array:
  """Deterministic DDIM (eta = 0) as diffusers' CogVideoXDDIMScheduler + CogVideoXPipeline run it.

  Defaults follow the diffusers pipeline: ``diffusers_sampling_schedule(num_steps, timestep_spacing)``
  (rescale over all 1000 steps, then subsample; no table quantisation) and constant guidance 6.0
  (pass ``schedule.dynamic_guidance_weights(timesteps)`` for ``use_dynamic_cfg=True``). Arguments as in
  ``sample_dpmpp2m_sde``. Returns the final latents (the last step's x0 estimate).
  """
  sched = (
    schedule if schedule is not None else schedules.diffusers_sampling_schedule(num_steps, timestep_spacing)
  )
  if guidance_weights is None:
    guidance_weights = schedules.constant_guidance_weights(sched.num_steps, 6.0)
  _check_cache_args(model_fn, step_cache_plan)
  steps = _step_arrays(sched, guidance_weights, ddim_coefficients(sched), step_cache_plan)
  uncond = unconditional_text(text_cond, text_uncond) if use_guidance else None
  out, changes = _ddim_loop(
    model_fn, params, noise, text_cond, uncond, steps, use_guidance=use_guidance, progress=progress
  )
  return (out, changes) if return_changes else out
