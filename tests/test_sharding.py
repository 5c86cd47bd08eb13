"""Params sharded by the logical-axis rules on an 8-device CPU mesh give the single-device result."""

import json
import subprocess
import sys
import textwrap

import pytest

from repvideo_jax import sharding
from repvideo_jax.training import trainer

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import dataclasses, jax, jax.numpy as jnp, numpy as np
    from repvideo_jax import sharding, transformer as T
    from repvideo_jax.config import load_section
    cfg = dataclasses.replace(load_section(T.TransformerConfig, "transformer", "tiny"),
                              zero_init_modulation=False, num_layers=3, num_heads=4)
    params = T.init(cfg, 0)
    lat = jax.random.normal(jax.random.key(1), (8, 2, 8, 8, 4))
    text = jax.random.normal(jax.random.key(2), (8, 8, 32))
    ts = jnp.linspace(0.0, 999.0, 8)
    ref = np.asarray(jax.jit(T.make_apply(cfg))(params, lat, ts, text))
    for layout in [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2),
                   dict(data=2, tensor=2, context=2)]:
        mesh = sharding.make_mesh(**layout)
        shardings = sharding.tree_shardings(T.logical_axes(cfg), mesh)
        sharded = jax.device_put(params, shardings)
        batch = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("activation_batch",)))
        with jax.set_mesh(mesh):
            out = jax.jit(T.make_apply(cfg))(sharded, jax.device_put(lat, batch),
                                             jax.device_put(ts, batch), jax.device_put(text, batch))
        kernel = sharded["blocks"]["ff_in"]["kernel"]
        assert len(kernel.sharding.device_set) == 8
        err = float(np.abs(np.asarray(out) - ref).max())
        assert err < 1e-5, (layout, err)
        print(layout, "ok", err)
""")


def test_sharded_forward_matches_single_device():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("ok") == 4


RULES_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from repvideo_jax import sharding
    from repvideo_jax.training import trainer
    mesh = sharding.make_mesh(data=2, fsdp=2, context=2)
    axes = ("activation_batch", "activation_length", "activation_embed")
    custom = {"activation_batch": "data", "activation_embed": "fsdp", "embed": None, "mlp": ["tensor", "fsdp"]}
    x = jnp.ones((8, 16, 4))

    def constrained(rules):  # a new function per table: jax reuses a trace of a function it has seen
        with sharding.activate(mesh, rules):
            return jax.jit(lambda x: sharding.constrain(x * 2, axes))(x).sharding

    def same(a, spec):
        return a.is_equivalent_to(NamedSharding(mesh, spec), 3)

    assert same(constrained(None), P(("data", "fsdp"), "context", None))
    assert same(constrained(custom), P("data", "context", "fsdp"))
    with sharding.logical_rules(custom):  # the table is active only inside its block
        assert sharding.logical_to_spec(axes) == P("data", "context", "fsdp")
    assert sharding.logical_to_spec(axes) == P(("data", "fsdp"), "context", None)
    print("constrain ok")

    # The same table as config: param shardings and the train step's constraints follow it.
    def step(rules):
        overrides = ["transformer.num_heads=4", "transformer.num_layers=2", "run.global_batch=8",
                     "mesh.data=2", "mesh.fsdp=2", "mesh.context=2"]
        overrides += [f"mesh.logical_axis_rules.{k}={v}" for k, v in rules.items()]
        cfg = trainer.load_config("train-tiny-cpu", overrides)
        with jax.set_mesh(mesh):  # the mesh only: the step makes its config's rules active itself
            built = trainer.build_train_step(cfg, mesh)
            text = built.fn.lower(*trainer.abstract_inputs(built, cfg)).as_text()
        return built, [l for l in text.splitlines() if "sdy.sharding_constraint" in l]

    default, default_hints = step({})
    changed, changed_hints = step({"activation_batch": "data", "activation_embed": "fsdp",
                                   "embed": "null", "mlp": "[tensor, fsdp]"})
    kernel = lambda tree: tree["blocks"]["ff_in"]["kernel"]
    assert kernel(default.param_shardings).spec == P(None, "fsdp", "tensor"), kernel(default.param_shardings)
    assert kernel(changed.param_shardings).spec == P(None, None, ("tensor", "fsdp")), kernel(changed.param_shardings)
    mu = [s for p, s in jax.tree_util.tree_flatten_with_path(changed.state_shardings)[0]
          if "opt_state" in jax.tree_util.keystr(p) and jax.tree_util.keystr(p).endswith("['ff_in']['kernel']")]
    assert mu and all(s.spec == P(None, None, ("tensor", "fsdp")) for s in mu), mu
    assert changed.batch_sharding.spec == P("data")
    assert any('[{"data", "fsdp"}, {"context"}, {}]' in l for l in default_hints)
    assert any('[{"data"}, {"context"}, {"fsdp"}]' in l for l in changed_hints)
    assert not any('{"data", "fsdp"}' in l for l in changed_hints)
    print("config ok")
""")


def test_logical_axis_rules_change_constraints_and_param_shardings():
  proc = subprocess.run([sys.executable, "-c", RULES_SCRIPT], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "constrain ok" in proc.stdout and "config ok" in proc.stdout


def test_logical_axis_rules_are_a_mesh_config_field():
  """Presets give some entries (lists for several mesh axes); the rest keep the defaults; the full
  table round-trips through config.resolved.json; typos are errors."""
  assert trainer.load_config("train-tiny-cpu").mesh.logical_axis_rules == dict(sharding.DEFAULT_LOGICAL_RULES)
  cfg = trainer.load_config(
    "train-tiny-cpu", ["mesh.logical_axis_rules.embed=null", "mesh.logical_axis_rules.mlp=[tensor, fsdp]"]
  )
  rules = cfg.mesh.logical_axis_rules
  assert rules["embed"] is None and rules["mlp"] == ("tensor", "fsdp")
  assert {k: v for k, v in rules.items() if k not in ("embed", "mlp")} == {
    k: v for k, v in sharding.DEFAULT_LOGICAL_RULES.items() if k not in ("embed", "mlp")
  }
  again = trainer.config_from_dict(json.loads(json.dumps(trainer.config_to_dict(cfg))))
  assert again.mesh == cfg.mesh
  assert hash(again) == hash(cfg)  # configs stay hashable (static arguments, caches)
  for bad, words in [
    ("embd=fsdp", "unknown logical axis 'embd'"),
    ("embed=fsd", "unknown mesh axis 'fsd'"),
    ("embed=[fsdp, fsdp]", "named twice"),
    ("embed=3", "expected a mesh axis"),
    ("activation_heads=context", "'context' is in both activation_length and activation_heads"),
  ]:
    with pytest.raises(ValueError, match=words):
      trainer.load_config("train-tiny-cpu", [f"mesh.logical_axis_rules.{bad}"])


CHECKS_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from repvideo_jax import sharding
    from repvideo_jax.training import trainer
    base = ["mesh.data=2", "mesh.fsdp=4", "run.global_batch=2"]
    cfg = trainer.load_config("train-tiny-cpu", base)
    mesh = sharding.build_mesh(cfg.mesh, jax.devices())
    try:
        trainer.build_train_step(cfg, mesh)
        raise SystemExit("a batch of 2 over data x fsdp = 8 was accepted")
    except ValueError as e:
        assert "global_batch 2 must be a multiple of the data-parallel size 8" in str(e), e
    cfg = trainer.load_config("train-tiny-cpu", base + ["mesh.logical_axis_rules.activation_batch=data"])
    assert sharding.logical_size(mesh, "activation_batch", cfg.mesh.logical_axis_rules) == 2
    trainer.build_train_step(cfg, mesh)  # accepted: the batch is split over data only
    print("OK")
""")


def test_batch_and_head_checks_follow_the_rule_table():
  """The trainer's batch-divisibility check reads the rules, not the axis names: with the batch over
  data only, fsdp no longer counts towards the data-parallel size (8 CPU devices, a subprocess)."""
  proc = subprocess.run([sys.executable, "-c", CHECKS_SCRIPT], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
