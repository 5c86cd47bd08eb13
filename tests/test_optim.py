"""Optimizer, masks, schedule, accumulation, non-finite guard, EMA and the train step."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repvideo_jax import schedule
from repvideo_jax import transformer as T
from repvideo_jax.config import load_section
from repvideo_jax.training import optim


def tiny_config(num_layers=3):
  # 3 layers: gates 0 and 1 are no-ops (docs/model.md), gate 2 is the first active one.
  cfg = load_section(T.TransformerConfig, "transformer", "tiny", [f"num_layers={num_layers}"])
  return dataclasses.replace(cfg, zero_init_modulation=False)


def flat_names(tree):
  return {
    jax.tree_util.keystr(p, simple=True, separator="/"): v
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


# ----------------------------------------------------------------------------------------------
# Masks.

DECAYED = {
  "blocks/ff_in/kernel",
  "blocks/ff_out/kernel",
  "blocks/norm1_mod/kernel",
  "blocks/norm2_mod/kernel",
  "blocks/to_k/kernel",
  "blocks/to_out/kernel",
  "blocks/to_q/kernel",
  "blocks/to_v/kernel",
  "norm_out_mod/kernel",
  "patch_kernel",
  "proj_out/kernel",
  "text_proj/kernel",
  "time_linear_1/kernel",
  "time_linear_2/kernel",
}
NOT_DECAYED = {
  "blocks/ff_in/bias",
  "blocks/ff_out/bias",
  "blocks/norm1/bias",
  "blocks/norm1/scale",
  "blocks/norm1_mod/bias",
  "blocks/norm2/bias",
  "blocks/norm2/scale",
  "blocks/norm2_mod/bias",
  "blocks/norm_k/bias",
  "blocks/norm_k/scale",
  "blocks/norm_q/bias",
  "blocks/norm_q/scale",
  "blocks/to_k/bias",
  "blocks/to_out/bias",
  "blocks/to_q/bias",
  "blocks/to_v/bias",
  "gates",
  "norm_final/bias",
  "norm_final/scale",
  "norm_out/bias",
  "norm_out/scale",
  "norm_out_mod/bias",
  "patch_bias",
  "proj_out/bias",
  "text_proj/bias",
  "time_linear_1/bias",
  "time_linear_2/bias",
}


def test_decay_mask():
  params = T.abstract_params(tiny_config())
  mask = flat_names(optim.decay_mask(params))
  assert set(mask) == DECAYED | NOT_DECAYED
  assert {k for k, v in mask.items() if v} == DECAYED
  labels = flat_names(optim.param_labels(params, "all"))
  assert labels["gates"] == "gates" and labels["patch_kernel"] == "decay"
  assert labels["blocks/norm1/scale"] == "no_decay"


def test_trainable_mask():
  params = T.abstract_params(tiny_config())
  assert all(flat_names(optim.trainable_mask(params, "all")).values())
  gates_only = flat_names(optim.trainable_mask(params, "gates"))
  assert {k for k, v in gates_only.items() if v} == {"gates"}
  labels = flat_names(optim.param_labels(params, "gates"))
  assert labels["gates"] == "gates" and set(labels.values()) == {"gates", "frozen"}
  no_cache = T.abstract_params(dataclasses.replace(tiny_config(), feature_cache=False))
  with pytest.raises(ValueError, match="no 'gates'"):
    optim.trainable_mask(no_cache, "gates")
  with pytest.raises(ValueError):
    optim.OptimConfig(train="bias")


# ----------------------------------------------------------------------------------------------
# Schedule.


def test_schedule_values():
  cfg = optim.OptimConfig(lr=1e-3, warmup_steps=4, schedule="constant")
  sched = optim.make_schedule(cfg)
  np.testing.assert_allclose(
    [float(sched(n)) for n in range(7)], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6
  )
  cos = optim.make_schedule(dataclasses.replace(cfg, schedule="cosine", total_steps=14, end_lr_ratio=0.1))
  assert math.isclose(float(cos(0)), 2.5e-4, rel_tol=1e-6)
  assert math.isclose(float(cos(4)), 1e-3, rel_tol=1e-6)  # cosine starts after warmup
  assert math.isclose(float(cos(9)), 1e-3 * (0.1 + 0.9 * 0.5), rel_tol=1e-5)  # halfway
  assert math.isclose(float(cos(14)), 1e-4, rel_tol=1e-5)
  assert math.isclose(float(cos(100)), 1e-4, rel_tol=1e-5)
  no_warmup = optim.make_schedule(dataclasses.replace(cfg, warmup_steps=0))
  assert float(no_warmup(0)) == pytest.approx(1e-3)
  gate = optim.make_schedule(cfg, peak=0.1)
  assert float(gate(1)) == pytest.approx(0.05)


# ----------------------------------------------------------------------------------------------
# A toy least-squares problem with the same kinds of params (kernels, biases, norms, gates).


def toy_params():
  rng = np.random.default_rng(0)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
      "bias": jnp.asarray(rng.standard_normal(2), jnp.float32),
    },
    "norm": {"scale": jnp.ones(2, jnp.float32), "bias": jnp.zeros(2, jnp.float32)},
    "gates": jnp.full((2,), 0.5, jnp.float32),
  }


def toy_loss(params, x, y):
  h = x @ params["dense"]["kernel"] + params["dense"]["bias"]
  h = h * params["norm"]["scale"] + params["norm"]["bias"]
  h = h * params["gates"][0] + jnp.tanh(h) * params["gates"][1]
  return jnp.mean(jnp.square(h - y))


def toy_data(n=8, seed=1):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.standard_normal((n, 3)), jnp.float32),
    jnp.asarray(rng.standard_normal((n, 2)), jnp.float32),
  )


def run_updates(tx, params, grads_list, state=None):
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update)
  for g in grads_list:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_lr_in_state_follows_schedule_with_accumulation():
  cfg = optim.OptimConfig(lr=1e-2, gate_lr=1e-1, warmup_steps=3, grad_accum_steps=2)
  params = toy_params()
  tx = optim.make_optimizer(cfg, params)
  x, y = toy_data()
  g = jax.grad(toy_loss)(params, x, y)
  state = tx.init(params)
  sched, gate_sched = optim.make_schedule(cfg), optim.make_schedule(cfg, cfg.gate_lr)
  for micro in range(6):
    params, state = run_updates(tx, params, [g], state)
    n = micro // 2  # updates so far = completed accumulation cycles (the last applied one: n)
    assert bool(optim.params_updated(state)) == (micro % 2 == 1)
    assert int(optim.optimizer_updates(state)) == (micro + 1) // 2
    lrs = optim.learning_rates(state)
    assert set(lrs) == {"decay", "no_decay", "gates"}
    if micro % 2 == 1:
      np.testing.assert_allclose(float(lrs["decay"]), float(sched(n)), rtol=1e-6)
      np.testing.assert_allclose(float(lrs["gates"]), float(gate_sched(n)), rtol=1e-6)


def test_gate_lr_sets_first_adam_step():
  """First Adam step moves each param by ~lr * sign(grad): gates by gate_lr, everything else by lr."""
  params = toy_params()
  grads = jax.tree.map(lambda p: jnp.where(jnp.arange(p.size).reshape(p.shape) % 2, 0.7, -1.3), params)
  for gate_lr in (None, 1e-1, 1e-2):
    cfg = optim.OptimConfig(lr=1e-3, gate_lr=gate_lr, warmup_steps=0, weight_decay=0.0, clip_norm=None)
    new, _ = run_updates(optim.make_optimizer(cfg, params), params, [grads])
    delta = flat_names(
      jax.tree.map(lambda a, b: np.abs(np.asarray(a, np.float64) - np.asarray(b)), new, params)
    )
    np.testing.assert_allclose(delta.pop("gates"), cfg.peak_gate_lr, rtol=1e-4)
    for name, d in delta.items():
      np.testing.assert_allclose(d, 1e-3, rtol=1e-3, err_msg=name)


def test_weight_decay_only_on_kernels():
  params = toy_params()
  cfg = optim.OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=None)
  zeros = jax.tree.map(jnp.zeros_like, params)
  new, _ = run_updates(optim.make_optimizer(cfg, params), params, [zeros])
  # Zero grads: the Adam part is 0, so only decoupled decay moves params: p <- p (1 - lr wd).
  np.testing.assert_allclose(new["dense"]["kernel"], params["dense"]["kernel"] * (1 - 0.05), rtol=1e-6)
  for path in (("dense", "bias"), ("norm", "scale"), ("norm", "bias")):
    np.testing.assert_array_equal(new[path[0]][path[1]], params[path[0]][path[1]])
  np.testing.assert_array_equal(new["gates"], params["gates"])


def test_grad_accumulation_equals_full_batch():
  params = toy_params()
  x, y = toy_data(8)
  base = optim.OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1, clip_norm=0.5, gate_lr=3e-2)
  full_grads = [jax.grad(toy_loss)(params, x, y)]
  one, _ = run_updates(optim.make_optimizer(base, params), params, full_grads)
  acc_tx = optim.make_optimizer(dataclasses.replace(base, grad_accum_steps=2), params)
  half_grads = [jax.grad(toy_loss)(params, x[:4], y[:4]), jax.grad(toy_loss)(params, x[4:], y[4:])]
  mid, mid_state = run_updates(acc_tx, params, half_grads[:1])
  jax.tree.map(np.testing.assert_array_equal, mid, params)  # no change mid-accumulation
  assert not bool(optim.params_updated(mid_state))
  two, state = run_updates(acc_tx, params, half_grads[1:], mid_state)
  assert bool(optim.params_updated(state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), two, one)
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), two, params))


@pytest.mark.parametrize("accum", [1, 2])
def test_nonfinite_guard(accum):
  params = toy_params()
  cfg = optim.OptimConfig(lr=1e-2, warmup_steps=0, grad_accum_steps=accum, max_nonfinite_in_a_row=3)
  tx = optim.make_optimizer(cfg, params)
  x, y = toy_data()
  good = jax.grad(toy_loss)(params, x, y)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), good)
  inf = jax.tree.map(lambda g: g.at[0].set(jnp.inf), good)
  state = tx.init(params)
  p = params
  for i, g in enumerate([bad, inf]):
    p, state = run_updates(tx, p, [g], state)
    jax.tree.map(np.testing.assert_array_equal, p, params)  # skipped
    assert int(optim.nonfinite_count(state)) == i + 1 and bool(optim.step_skipped(state))
    assert optim.check_nonfinite(state, cfg.max_nonfinite_in_a_row) == i + 1
  p, state = run_updates(tx, p, [bad], state)
  with pytest.raises(RuntimeError, match="3 non-finite gradient steps in a row; lower the learning rate"):
    optim.check_nonfinite(state, cfg.max_nonfinite_in_a_row)
  assert optim.check_nonfinite(state, None) == 3  # disabled
  jax.tree.map(np.testing.assert_array_equal, p, params)
  # Finite steps reset the counter; the skipped micro-steps did not enter the accumulator.
  p, state = run_updates(tx, p, [good] * accum, state)
  assert int(optim.nonfinite_count(state)) == 0 and not bool(optim.step_skipped(state))
  assert int(optim.total_nonfinite(state)) == 3
  clean, _ = run_updates(tx, params, [good] * accum)
  jax.tree.map(np.testing.assert_array_equal, p, clean)


def test_ema_math():
  params = {"a": jnp.asarray([1.0, 2.0], jnp.bfloat16), "b": {"c": jnp.asarray(3.0)}}
  ema = optim.ema_init(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(ema))
  np.testing.assert_array_equal(ema["a"], [1.0, 2.0])
  new = {"a": jnp.asarray([3.0, -2.0], jnp.bfloat16), "b": {"c": jnp.asarray(5.0)}}
  out = optim.ema_update(ema, new, 0.9)
  np.testing.assert_allclose(out["a"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
  np.testing.assert_allclose(out["b"]["c"], 0.9 * 3 + 0.1 * 5, rtol=1e-6)
  out = optim.ema_update(out, new, 0.0)
  np.testing.assert_allclose(out["a"], [3.0, -2.0])


# ----------------------------------------------------------------------------------------------
# The train step on the tiny RepVideo.


def random_params(cfg, seed=0):
  """Random weights for the tiny model's param tree (faster than T.init): kernels N(0, 1/fan_in),
  norm scales 1 + noise, biases small, gates at their 0.5 init."""
  rng = np.random.default_rng(seed)

  def one(path, s):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if name == "gates":
      return jnp.full(s.shape, 0.5, s.dtype)
    if name.endswith("scale"):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    if name.endswith("bias"):
      return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if name == "patch_kernel" else s.shape[-2]
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(one, T.abstract_params(cfg))


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  params = random_params(cfg)
  rng = np.random.default_rng(0)
  batch = {
    "latents": jnp.asarray(rng.standard_normal((2, 1, 4, 4, 4)), jnp.float32),
    "text": jnp.asarray(rng.standard_normal((2, cfg.text_length, cfg.text_embed_dim)), jnp.float32),
  }
  return cfg, params, batch, jnp.asarray(schedule.sqrt_alpha_table())


def make_step(cfg, params, table, **optim_kwargs):
  ocfg = optim.OptimConfig(warmup_steps=0, **optim_kwargs)
  tx = optim.make_optimizer(ocfg, params)
  step = jax.jit(
    lambda s, b: optim.train_step(
      s,
      b,
      apply_fn=T.make_apply(cfg),
      optimizer=tx,
      table=table,
      world_size=2,
      ucg_rate=0.1,
      ema_decay=ocfg.ema_decay,
    )
  )
  return ocfg, tx, step


def test_train_step_learns_skips_nonfinite_and_tracks_ema(tiny):
  cfg, params, batch, table = tiny
  ocfg, tx, step = make_step(cfg, params, table, lr=3e-3, ema_decay=0.5)
  state = optim.init_train_state(params, tx, jax.random.key(0), ema=True)
  assert state["rng"].dtype == jnp.uint32

  # Evaluation reuses the compiled step: with a fixed rng the reported loss (computed before the
  # update) is the same draw of timesteps, noise and dropout, so it is comparable across params.
  def eval_loss(s):
    return float(step(dict(s, rng=jax.random.key_data(jax.random.key(123))), batch)[1]["loss"])

  losses = [eval_loss(state)]

  # A NaN batch: skipped, params / EMA unchanged, counted; the rng still advances.
  nan_batch = dict(batch, latents=batch["latents"].at[0, 0, 0, 0, 0].set(jnp.nan))
  skipped, m = step(state, nan_batch)
  assert bool(m["skipped"]) and not bool(m["updated"]) and int(m["nonfinite_count"]) == 1
  jax.tree.map(np.testing.assert_array_equal, skipped["params"], params)
  jax.tree.map(np.testing.assert_array_equal, skipped["ema"], state["ema"])
  assert int(skipped["step"]) == 1 and not np.array_equal(skipped["rng"], state["rng"])
  skipped, _ = step(skipped, nan_batch)
  with pytest.raises(RuntimeError, match="2 non-finite gradient steps in a row"):
    optim.check_nonfinite(skipped["opt_state"], 2)

  # Finite steps: counter resets, params move, EMA = 0.5 ema + 0.5 params.
  state, m = step(skipped, batch)
  assert not bool(m["skipped"]) and bool(m["updated"]) and int(m["nonfinite_count"]) == 0
  assert float(m["lr"]) == pytest.approx(3e-3) and float(m["gate_lr"]) == pytest.approx(3e-3)
  assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  expected_ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, skipped["ema"], state["params"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state["ema"], expected_ema
  )
  for _ in range(10):
    state, m = step(state, batch)
    assert not bool(m["skipped"])
  losses.append(eval_loss(state))
  assert losses[1] < 0.8 * losses[0], losses


def test_train_step_gates_only(tiny):
  cfg, params, batch, table = tiny
  ocfg, tx, step = make_step(cfg, params, table, lr=1e-2, train="gates", clip_norm=None)
  state = optim.init_train_state(params, tx, 1)
  for _ in range(3):
    state, m = step(state, batch)
    assert bool(m["updated"])
  new = flat_names(state["params"])
  old = flat_names(params)
  gates = np.asarray(new.pop("gates"))
  for name, value in new.items():
    np.testing.assert_array_equal(value, old[name], err_msg=name)
  # Gates 0 and 1 never affect the output (docs/model.md) so get zero grads; gate 2 moves ~3 lr.
  np.testing.assert_array_equal(gates[:2], [0.5, 0.5])
  assert 1e-2 < abs(gates[2] - 0.5) <= 3e-2 + 1e-6, gates
  assert state["ema"] is None
