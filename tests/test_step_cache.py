"""Step caching (repvideo_jax.step_cache): the residual path is the model, the compiled cached loops
follow their plan exactly (against an eager reference written out here), plans respect their rules,
one compilation serves every plan, and the pipeline, calibration and sample.py use it.

Tolerances (float32): the residual split reproduces the plain forward to 1e-5 relative; the compiled
cached samplers match the eager reference to 1e-5 after a few steps.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import tiny_cogvideox_folder

from repvideo_jax import pipeline, samplers, schedule, step_cache
from repvideo_jax import transformer as T
from repvideo_jax.step_cache import COND_ONLY, FULL, REUSE, StepCache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root, _ = tiny_cogvideox_folder(tmp_path_factory.mktemp("cog"), seed=1)
  return root, pipeline.load_pipeline(root)


def _inputs(pipe, b=2, seed=0):
  cfg = pipe.transformer_config
  x = jax.random.normal(jax.random.key(seed), (b, 3, 8, 8, cfg.in_channels))
  text = jax.random.normal(jax.random.key(seed + 1), (b, cfg.text_length, cfg.text_embed_dim))
  return x, text


def test_residual_split_is_the_model(tiny):
  _, pipe = tiny
  cfg, params = pipe.transformer_config, pipe.transformer_params
  x, text = _inputs(pipe)
  t = jnp.asarray([300.0, 800.0])
  v = T.apply(params, x, t, text, config=cfg)
  v2, residual = T.apply_with_residual(params, x, t, text, config=cfg)
  np.testing.assert_array_equal(v, v2)
  assert residual.shape == (2, cfg.text_length + 3 * 4 * 4, cfg.hidden_size)
  v3 = T.apply_from_residual(params, x, t, text, residual, config=cfg)
  np.testing.assert_allclose(v3, v, rtol=1e-5, atol=1e-5)
  # A residual from other inputs gives another output (the head runs on this call's embeddings).
  _, other = T.apply_with_residual(params, x * 0.5, t, text, config=cfg)
  assert float(jnp.max(jnp.abs(T.apply_from_residual(params, x, t, text, other, config=cfg) - v))) > 1e-3
  with pytest.raises(ValueError, match="does not fit"):
    T.apply_from_residual(params, x, t, text, residual[:, 1:], config=cfg)


def _reference_ddim(pipe, noise, text, codes, w, steps):
  """An eager DDIM loop with the step cache written out (the documented rules, not samplers' code)."""
  cfg, params = pipe.transformer_config, pipe.transformer_params
  sched = schedule.diffusers_sampling_schedule(steps, "trailing")
  coefs = samplers.ddim_coefficients(sched)
  a_all = np.asarray(sched.model_alphas, np.float64)
  x = np.asarray(noise, np.float64)
  b = x.shape[0]
  uncond = np.zeros_like(np.asarray(text))
  text2 = np.concatenate([uncond, np.asarray(text)])
  res_u = res_c = None
  delta = None
  for i in range(steps):
    a, t = a_all[i], float(sched.timesteps[i])
    c_skip, c_out = a, np.sqrt(1 - a * a)
    xx = np.concatenate([x, x]).astype(np.float32)
    tt = np.full((2 * b,), t, np.float32)
    if codes[i] == FULL:
      v, r = T.apply_with_residual(params, xx, tt, text2, config=cfg)
      res_u, res_c = np.asarray(r[:b]), np.asarray(r[b:])
      x0 = c_skip * xx - c_out * np.asarray(v, np.float64)
      delta = x0[b:] - x0[:b]
      d = x0[:b] + w * delta
    elif codes[i] == COND_ONLY:
      v, r = T.apply_with_residual(params, xx[b:], tt[b:], np.asarray(text), config=cfg)
      res_c = np.asarray(r)
      x0c = c_skip * xx[b:] - c_out * np.asarray(v, np.float64)
      d = x0c + (w - 1) * delta
    else:
      r = np.concatenate([res_u, res_c])
      v = T.apply_from_residual(params, xx, tt, text2, r, config=cfg)
      x0 = c_skip * xx - c_out * np.asarray(v, np.float64)
      d = x0[:b] + w * (x0[b:] - x0[:b])
    x = coefs["c_x"][i] * x + coefs["c_d"][i] * d
  return x


def _cached(pipe):
  cfg = pipe.transformer_config
  return pipeline._cached_model(cfg, False)


@pytest.mark.parametrize(
  "codes",
  [[FULL] * 5, [FULL, FULL, REUSE, REUSE, FULL], [FULL, FULL, COND_ONLY, COND_ONLY, FULL], [0, 0, 1, 2, 0]],
  ids=["all-full", "residual", "cfg", "both"],
)
def test_cached_ddim_follows_its_plan(tiny, codes):
  _, pipe = tiny
  noise, text = _inputs(pipe, seed=3)
  w, steps = 4.0, 5
  weights = np.full(steps, w)
  got = samplers.sample_ddim(
    _cached(pipe),
    noise,
    text,
    num_steps=steps,
    guidance_weights=weights,
    params=pipe.transformer_params,
    step_cache_plan=np.asarray(codes),
  )
  want = _reference_ddim(pipe, noise, text, codes, w, steps)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)
  if codes == [FULL] * 5:  # all in full: the plain sampler's result
    plain = samplers.sample_ddim(
      pipeline._model_fn(pipe.transformer_config),
      noise,
      text,
      num_steps=steps,
      guidance_weights=weights,
      params=pipe.transformer_params,
    )
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)


def test_cached_dpm_all_full_is_the_plain_sampler_and_reports_changes(tiny):
  _, pipe = tiny
  noise, text = _inputs(pipe, seed=4)
  kw = dict(num_steps=6, params=pipe.transformer_params, key=jax.random.key(0))
  plain = samplers.sample_dpmpp2m_sde(pipeline._model_fn(pipe.transformer_config), noise, text, **kw)
  cached, changes = samplers.sample_dpmpp2m_sde(
    _cached(pipe), noise, text, step_cache_plan=np.zeros(6, np.int32), return_changes=True, **kw
  )
  np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-5)
  changes = np.asarray(changes)
  assert changes.shape == (6,) and changes[0] == 0 and np.all(changes[1:] > 0)
  # Reusing residuals changes the result, a little.
  skipped = samplers.sample_dpmpp2m_sde(
    _cached(pipe), noise, text, step_cache_plan=np.asarray([0, 0, 2, 0, 2, 0]), **kw
  )
  err = float(jnp.max(jnp.abs(skipped - plain)))
  assert 0 < err < 0.5 * float(jnp.max(jnp.abs(plain)))


def test_one_compilation_serves_every_plan(tiny):
  _, pipe = tiny
  noise, text = _inputs(pipe, seed=5)
  run = lambda codes: samplers.sample_ddim(  # noqa: E731
    _cached(pipe), noise, text, num_steps=5, params=pipe.transformer_params, step_cache_plan=np.asarray(codes)
  )
  run([0, 0, 2, 2, 0])
  size = samplers._ddim_loop._cache_size()
  run([0, 0, 1, 2, 0])
  run([0, 0, 0, 0, 0])
  assert samplers._ddim_loop._cache_size() == size


def test_plans_follow_their_rules():
  n = 20
  changes = np.full(n, 0.1)
  changes[:3] = 1.0  # early steps change a lot
  none = step_cache.plan(StepCache(residual=0.05), n, use_guidance=True, changes=changes)
  assert np.all(none == FULL)  # every change is above the threshold
  low = step_cache.plan(StepCache(residual=0.15), n, use_guidance=True, changes=changes)
  high = step_cache.plan(StepCache(residual=0.35), n, use_guidance=True, changes=changes)
  for codes in (low, high):
    assert step_cache.warmup_steps(n) == 4 and np.all(codes[:4] == FULL) and codes[-1] == FULL
    assert np.all(codes[:3] == FULL)  # the big early changes always run
    runs = "".join("r" if c == REUSE else "." for c in codes).split(".")
    assert max(len(r) for r in runs) <= step_cache.MAX_SKIP
  assert np.sum(high == REUSE) > np.sum(low == REUSE) > 0
  # low: 0.1 fits once under 0.15, so every other step is reused after the warm-up.
  assert "".join(str(c) for c in low[4:12]) == "20202020"
  cfg = step_cache.plan(StepCache(cfg=3), n, use_guidance=True)
  assert "".join(str(c) for c in cfg[:10]) == "0000110110" and cfg[-1] == FULL
  assert np.all(step_cache.plan(StepCache(cfg=3), n, use_guidance=False) == FULL)
  both = step_cache.plan(StepCache(residual=0.15, cfg=2), n, use_guidance=True, changes=changes)
  assert {COND_ONLY, REUSE} <= set(both.tolist())
  assert step_cache.transformer_calls(both, True) < step_cache.transformer_calls(low, True) < 2 * n
  with pytest.raises(ValueError, match="calibration"):
    step_cache.plan(StepCache(residual=0.1), n, use_guidance=True)


@pytest.mark.parametrize(
  "text,match",
  [
    ("teacache", "expected residual"),
    ("residual:abc", "not a number"),
    ("residual:-1", "> 0"),
    ("cfg:1", "integer >= 2"),
    ("cfg:2.5", "integer >= 2"),
    ("cfg+cfg:3", "twice"),
  ],
)
def test_bad_step_cache_settings_are_clear_errors(text, match):
  with pytest.raises(ValueError, match=match):
    step_cache.parse(text)
  with pytest.raises(ValueError, match=match):
    pipeline.GenerationSettings(step_cache=text)


def test_parse():
  assert step_cache.parse(None) is None and step_cache.parse("none") is None
  assert step_cache.parse("residual") == StepCache(residual=step_cache.DEFAULT_THRESHOLD)
  assert step_cache.parse("cfg") == StepCache(cfg=step_cache.DEFAULT_CFG_INTERVAL)
  assert step_cache.parse("residual:0.2+cfg:4") == StepCache(residual=0.2, cfg=4)
  assert str(step_cache.parse("cfg:4+residual:0.2")) == "residual:0.2+cfg:4"


def test_calibrate_then_sample_with_the_pipeline(tiny, tmp_path):
  root, pipe = tiny
  settings = pipeline.GenerationSettings(num_frames=9, height=64, width=64, steps=8, seed=2, guidance=5.0)
  # Random weights change their residual by 50-100% per step: a large threshold to skip at all.
  cached = pipeline.GenerationSettings(**{**settings.__dict__, "step_cache": "residual:2"})
  with pytest.raises(FileNotFoundError, match="python -m repvideo_jax.step_cache calibrate --model"):
    pipeline.generate(pipe, ["a cat"], cached)
  entry = step_cache.calibrate(pipe, ["a cat", "a dog"], settings, progress=False)
  assert len(entry["changes"]) == 8 and entry["changes"][0] == 0
  step_cache.write_calibration(root, "dpmpp2m", 8, entry)
  try:
    plain = pipeline.generate(pipe, ["a cat"], settings, output="float")
    plan = pipeline.step_cache_plan(pipe, cached)
    assert np.sum(plan == REUSE) > 0
    fast = pipeline.generate(pipe, ["a cat"], cached, output="float")
    assert 0 < np.abs(fast - plain).mean() < 0.1
    with pytest.raises(FileNotFoundError, match="no calibration for dpmpp2m at 6 steps"):
      pipeline.generate(pipe, ["a cat"], pipeline.GenerationSettings(**{**cached.__dict__, "steps": 6}))
    cfg_only = pipeline.GenerationSettings(**{**settings.__dict__, "step_cache": "cfg:2"})
    assert 0 < np.abs(pipeline.generate(pipe, ["a cat"], cfg_only, output="float") - plain).mean() < 0.1
  finally:
    (root / step_cache.FILE).unlink()


def test_calibrate_cli_and_sample_py(tmp_path):
  root, _ = tiny_cogvideox_folder(tmp_path / "cog", seed=2)
  base = [sys.executable, "sample.py", "--model", str(root), "--prompt", "a cat", "--frames", "9"]
  base += ["--height", "64", "--width", "64", "--steps", "6", "--out", str(tmp_path / "out"), "--no-progress"]
  r = subprocess.run([*base, "--step-cache", "residual"], capture_output=True, text=True)
  assert r.returncode == 2 and "step_cache calibrate --model" in r.stderr, r.stderr
  cal = [sys.executable, "-m", "repvideo_jax.step_cache", "calibrate", "--model", str(root), "--steps", "6"]
  cal += ["--num-frames", "9", "--height", "64", "--width", "64", "--no-progress"]
  r = subprocess.run(cal, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  data = json.loads((root / step_cache.FILE).read_text())
  assert len(data["calibrations"]["dpmpp2m/6"]["changes"]) == 6
  r = subprocess.run([*base, "--step-cache", "residual:1+cfg:2"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
  assert sidecar["settings"]["step_cache"] == "residual:1+cfg:2"
  sc = sidecar["step_cache"]
  assert len(sc["plan"]) == 6 and sc["transformer_calls"] < sc["uncached_calls"] == 12


SHARDED = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from repvideo_jax import pipeline, sharding, step_cache
root = sys.argv[1]
step_cache.write_calibration(root, "dpmpp2m", 6, {"changes": [0, 1, 0.05, 0.05, 0.05, 0.05]})
pipe = pipeline.load_pipeline(root)
s = pipeline.GenerationSettings(num_frames=9, height=64, width=64, steps=6, seed=3, step_cache="residual:0.1+cfg:2")
assert list(pipeline.step_cache_plan(pipe, s)) == [0, 0, 2, 2, 1, 0], pipeline.step_cache_plan(pipe, s)
prompts = ["a red cat", "a blue dog", "a green bird", "a white car"]
single = pipeline.generate(pipe, prompts, s, output="float")
batch = pipeline.generate(pipe, prompts, s, mesh=sharding.make_mesh(data=4, devices=jax.devices()[:4]), output="float")
# one video: its CFG pair over data=2, its sequence over context=2
one = pipeline.generate(pipe, prompts[:1], s, mesh=sharding.make_mesh(data=2, context=2, devices=jax.devices()[:4]), output="float")
err = max(float(np.abs(batch - single).max()), float(np.abs(one - single[:1]).max()))
assert err < 1e-4, err
print("ok", err)
"""


def test_step_cache_sharded_equals_single_device(tmp_path):
  root, _ = tiny_cogvideox_folder(tmp_path / "cog", seed=3)
  proc = subprocess.run(
    [sys.executable, "-c", SHARDED, str(root)], capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("ok")
