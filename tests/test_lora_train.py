"""LoRA training (optim.train: lora): starts as the base model, learns, leaves the base untouched,
keeps optimizer state for the factors (and gates) only, resumes exactly, exports a usable LoRA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import FixedBatches, tiny_config

from repvideo_jax import convert, schedule, transformer_weights
from repvideo_jax import lora as lora_lib
from repvideo_jax import transformer as T
from repvideo_jax.training import objective, optim, trainer


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def lora_config(tmp_path, train_gates=True, base_dtype="float32", **run):
  cfg = tiny_config(tmp_path, **run)
  o = dataclasses.replace(cfg.optim, train="lora", lr=2e-2, warmup_steps=0, gate_lr=2e-2)
  lo = trainer.LoraTrainConfig(rank=4, alpha=8.0, train_gates=train_gates, base_dtype=base_dtype)
  return dataclasses.replace(cfg, optim=o, lora=lo)


def _eval_loss(cfg, params, lora_tree):
  """The v-MSE on one fixed batch with fixed timesteps and noise (no sampling noise)."""
  batch = FixedBatches(distinct=1).__next__()
  latents, text = jnp.asarray(batch["latents"]), jnp.asarray(batch["text"])
  timesteps = jnp.asarray([100, 400, 700, 950])
  noise = jax.random.normal(jax.random.key(7), latents.shape)

  def apply_fn(p, x, t, c):
    return T.apply(p, x, t, c, config=cfg.transformer, lora=None if lora_tree is None else [(lora_tree, 1.0)])

  table = jnp.asarray(schedule.sqrt_alpha_table(), jnp.float32)
  return float(objective.v_mse(params, apply_fn, latents, text, timesteps, noise, table=table)[0])


def test_lora_training(tmp_path):
  steps = 16
  cfg = lora_config(tmp_path / "a", steps=steps, save_every=100)
  base = jax.device_get(trainer.initial_params(cfg))
  run = trainer.train(cfg, data_iterator=FixedBatches(distinct=1))
  state = jax.device_get(run["state"])
  assert set(state) == {"step", "params", "lora", "opt_state", "ema", "rng"}

  # Step 1 is the base model's: the same first loss as full fine-tuning (B starts at zero).
  full_cfg = dataclasses.replace(
    tiny_config(tmp_path / "full", steps=1), optim=dataclasses.replace(cfg.optim, train="all")
  )
  full = trainer.train(full_cfg, data_iterator=FixedBatches(distinct=1))
  np.testing.assert_allclose(run["losses"][0][1], full["losses"][0][1], rtol=1e-6)

  # The base params are bit-identical; only the gates (train_gates) moved.
  before, after = _flat(base), _flat(state["params"])
  assert before.keys() == after.keys()
  for k in before:
    if "gates" in k:
      assert not np.array_equal(before[k], after[k]), "the gates should train"
    else:
      np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  assert all(np.any(ab["b"] != 0) for ab in state["lora"]["blocks"].values())
  assert float(state["lora"]["alpha"]) == 8.0

  # The optimizer holds Adam moments (mu, nu) for the factors and gates only: no base-param state.
  trainable = optim.lora_trainable(state["params"], state["lora"])
  trained_size = sum(x.size for x in jax.tree.leaves(trainable["lora"]["blocks"])) + trainable["gates"].size
  arrays = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) >= 1]
  assert sum(x.size for x in arrays) == 2 * trained_size
  base_size = sum(x.size for x in jax.tree.leaves(base))
  assert trained_size < base_size / 5

  # It learns: the loss on a fixed batch with fixed noise falls.
  start = _eval_loss(cfg, base, None)
  np.testing.assert_allclose(
    _eval_loss(cfg, base, lora_lib.init(cfg.transformer, cfg.lora.lora_config())), start
  )
  end = _eval_loss(cfg, state["params"], state["lora"])
  assert end < 0.9 * start, (start, end)

  # Exported, the LoRA loads with lora.load and changes the model's output.
  out = trainer.export_lora(tmp_path / "a" / "run", tmp_path / "exported")
  loaded = lora_lib.load(out, cfg.transformer)
  assert loaded.config == cfg.lora.lora_config()
  for k, v in _flat(state["lora"]).items():
    np.testing.assert_array_equal(_flat(loaded.lora)[k], v, err_msg=k)
  # The gates trained too: the file holds them as offsets from the base model's.
  np.testing.assert_array_equal(loaded.lora["gates"], state["params"]["gates"] - base["gates"])
  assert np.any(loaded.lora["gates"] != 0)
  peft = tmp_path / "peft"  # through the CLI: convert run --lora peft
  assert (
    convert.main(["run", "--src", str(tmp_path / "a" / "run"), "--dst", str(peft), "--lora", "peft"]) == 0
  )
  from_peft = lora_lib.load(peft, cfg.transformer).lora
  np.testing.assert_array_equal(from_peft["blocks"]["to_q"]["b"], state["lora"]["blocks"]["to_q"]["b"])
  assert "gates" not in from_peft  # diffusers' format has no place for them (a warning says so)
  x = jax.random.normal(jax.random.key(1), (1, 2, 8, 8, 4))
  t, c = jnp.asarray([500]), jax.random.normal(jax.random.key(2), (1, 8, 32))
  plain = T.apply(base, x, t, c, config=cfg.transformer)
  adapted = T.apply(base, x, t, c, config=cfg.transformer, lora=[(loaded.lora, 1.0)])
  assert float(jnp.max(jnp.abs(adapted - plain))) > 1e-4
  # The merged export is the base with the trained gates and the LoRA folded in: the same model as
  # the base with the LoRA file applied, unmerged (scan hook) or merged (lora.merge).
  trainer.export_transformer(tmp_path / "a" / "run", tmp_path / "merged")
  _, merged = transformer_weights.load(tmp_path / "merged")
  np.testing.assert_array_equal(merged["gates"], state["params"]["gates"])
  exported = T.apply(merged, x, t, c, config=cfg.transformer)
  np.testing.assert_allclose(adapted, exported, rtol=1e-5, atol=1e-6)
  via_merge = T.apply(lora_lib.merge(base, loaded.lora, 1.0), x, t, c, config=cfg.transformer)
  np.testing.assert_allclose(via_merge, exported, rtol=1e-5, atol=1e-6)
  half = T.apply(base, x, t, c, config=cfg.transformer, lora=[(loaded.lora, 0.5)])
  half_merged = T.apply(lora_lib.merge(base, loaded.lora, 0.5), x, t, c, config=cfg.transformer)
  np.testing.assert_allclose(half, half_merged, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="did not train a LoRA"):
    trainer.export_lora(tmp_path / "full" / "run", tmp_path / "nope")


def test_lora_resume_is_exact(tmp_path):
  straight = trainer.train(lora_config(tmp_path / "a", save_every=100), data_iterator=FixedBatches())
  trainer.train(lora_config(tmp_path / "b", steps=3, save_every=3), data_iterator=FixedBatches())
  resumed = trainer.train(
    lora_config(tmp_path / "b", save_every=3), data_iterator=FixedBatches(), resume=True
  )
  assert [l for _, l in straight["losses"][3:]] == [l for _, l in resumed["losses"]]
  for part in ("lora", "params"):
    a, b = _flat(jax.device_get(straight["state"][part])), _flat(jax.device_get(resumed["state"][part]))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part}{k}")


def test_lora_frozen_gates_and_bf16_base(tmp_path):
  cfg = lora_config(tmp_path, train_gates=False, base_dtype="bfloat16", steps=2, save_every=100)
  base = jax.device_get(trainer.initial_params(cfg))
  state = jax.device_get(trainer.train(cfg, data_iterator=FixedBatches())["state"])
  after = _flat(state["params"])
  for k, v in _flat(base).items():
    if "gates" in k:
      np.testing.assert_array_equal(after[k], v)
    else:
      assert after[k].dtype == jnp.bfloat16, k
      np.testing.assert_array_equal(after[k], v.astype(jnp.bfloat16), err_msg=k)
  lora_size = sum(x.size for x in jax.tree.leaves(state["lora"]["blocks"]))
  assert sum(x.size for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) >= 1) == 2 * lora_size
  assert all(np.any(ab["b"] != 0) for ab in state["lora"]["blocks"].values())


def test_lora_dropout_branch_math(tmp_path):
  """One adapted linear under dropout: base(x) + m * ((x * mask / keep) @ A) @ B, written out in
  numpy with the mask the layer drew; a tiny rate keeps every input and equals the plain LoRA."""
  cfg = tiny_config(tmp_path).transformer
  params = T.init(cfg, jax.random.key(0))
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("to_q", "ff_in"))
  tree = lora_lib.init(cfg, lcfg, 1)
  tree["blocks"] = jax.tree.map(lambda b: b + 0.05, tree["blocks"])  # B != 0: the branch matters
  x = jax.random.normal(jax.random.key(1), (2, 2, 8, 8, 4))
  t, c = jnp.asarray([300, 700]), jax.random.normal(jax.random.key(2), (2, 8, 32))
  plain = T.apply(params, x, t, c, config=cfg, lora=[(tree, 0.7)])
  kept = T.apply(
    params, x, t, c, config=cfg, lora=[(tree, 0.7)], lora_dropout=T.LoraDropout(1e-9, jax.random.key(3))
  )
  np.testing.assert_allclose(kept, plain, rtol=1e-5, atol=1e-6)
  dropped = T.apply(
    params, x, t, c, config=cfg, lora=[(tree, 0.7)], lora_dropout=T.LoraDropout(0.5, jax.random.key(3))
  )
  assert float(jnp.max(jnp.abs(dropped - plain))) > 1e-4
  again = T.apply(
    params, x, t, c, config=cfg, lora=[(tree, 0.7)], lora_dropout=T.LoraDropout(0.5, jax.random.key(3))
  )
  np.testing.assert_array_equal(dropped, again)  # the key decides the masks

  # One linear (layer 0's to_q) with its branch, against the formula written out in numpy.
  block_q = jax.tree.map(lambda a: a[0], params["blocks"]["to_q"])
  a, b = np.asarray(tree["blocks"]["to_q"]["a"][0]), np.asarray(tree["blocks"]["to_q"]["b"][0])
  m = 0.7 * 8.0 / 4
  xin = np.asarray(jax.random.normal(jax.random.key(4), (3, 5, a.shape[0])), np.float32)
  key = jax.random.key(5)
  branch = T._LoraBranches(lambda v: v @ block_q["kernel"] + block_q["bias"], [(a, b, m)], 0.25, key)
  got = np.asarray(branch(jnp.asarray(xin)))
  mask = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.75, xin.shape))
  assert 0.6 < mask.mean() < 0.9
  expected = xin @ np.asarray(block_q["kernel"]) + np.asarray(block_q["bias"])
  expected = expected + m * ((np.where(mask, xin / 0.75, 0.0) @ a) @ b)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_training_with_dropout(tmp_path):
  cfg = lora_config(tmp_path / "d", steps=6, save_every=100)
  cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.3))
  base = jax.device_get(trainer.initial_params(cfg))
  run = trainer.train(cfg, data_iterator=FixedBatches(distinct=1))
  plain = trainer.train(
    lora_config(tmp_path / "p", steps=6, save_every=100), data_iterator=FixedBatches(distinct=1)
  )
  # Step 1 is the base model's either way (B = 0, so the dropped branch adds nothing) ...
  np.testing.assert_allclose(run["losses"][0][1], plain["losses"][0][1], rtol=1e-6)
  # ... but the factors learn from dropped inputs: a different LoRA, which still learns.
  d, p = jax.device_get(run["state"]["lora"]), jax.device_get(plain["state"]["lora"])
  assert not np.allclose(d["blocks"]["to_q"]["b"], p["blocks"]["to_q"]["b"])
  start = _eval_loss(cfg, base, None)
  assert _eval_loss(cfg, jax.device_get(run["state"]["params"]), d) < 0.95 * start
  for k, v in _flat(base).items():
    if "gates" not in k:
      np.testing.assert_array_equal(_flat(jax.device_get(run["state"]["params"]))[k], v, err_msg=k)


def test_lora_config_checks():
  with pytest.raises(ValueError, match="dropout must be in"):
    trainer.LoraTrainConfig(dropout=1.0)
  with pytest.raises(ValueError, match="base_dtype"):
    trainer.LoraTrainConfig(base_dtype="float16")
  with pytest.raises(ValueError, match="targets"):
    trainer.LoraTrainConfig(targets=("nope",))
