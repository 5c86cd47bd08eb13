"""Params sharded by the logical-axis rules on an 8-device CPU mesh give the single-device result."""

import subprocess
import sys
import textwrap

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
