"""Attention on a mesh: every backend runs in a shard_map (Ulysses all-to-all over the context axis).

Checked on 8 CPU devices against an independent softmax attention in NumPy (float64), forward and
gradient, for the xla backend and for splash run by the Pallas interpreter, in every layout, with a
sequence the context axis does not divide (padded and masked). Tolerances: 2e-5 absolute (float32).
The backend follows the devices the computation is placed on, not the host.
"""

import subprocess
import sys
import textwrap

import jax
import pytest

from repvideo_jax import attention as A
from repvideo_jax import sharding

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from repvideo_jax import attention as A, sharding

    B, S, H, D = 4, 37, 4, 16   # S = 37: not divisible by context 2 or 4
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(4))

    def reference(q, k, v, w):
        # softmax attention and its gradients of sum(out * w), in float64 NumPy
        q, k, v, w = (x.astype(np.float64) for x in (q, k, v, w))
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", p, v)
        dp = np.einsum("bqhd,bkhd->bhqk", w, v)
        ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(D)
        return out, (np.einsum("bhqk,bkhd->bqhd", ds, k), np.einsum("bhqk,bqhd->bkhd", ds, q),
                     np.einsum("bhqk,bqhd->bkhd", p, w))

    ref_out, ref_grads = reference(q, k, v, w)
    layouts = [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=2, context=4),
               dict(data=2, tensor=2, context=2), dict(data=2, fsdp=1, context=4)]
    for backend, interpret in [("xla", False), ("splash", True)]:
        f = lambda q, k, v: A.attention(q, k, v, backend=backend, interpret=interpret)
        loss = lambda q, k, v: jnp.sum(f(q, k, v) * w)
        for layout in layouts:
            mesh = sharding.make_mesh(**layout)
            with jax.set_mesh(mesh):
                lowered = jax.jit(f).lower(q, k, v)
                out = jax.jit(f)(q, k, v)
                grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
            assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
            err = float(np.abs(np.asarray(out) - ref_out).max())
            gerr = max(float(np.abs(np.asarray(g) - r).max()) for g, r in zip(grads, ref_grads))
            assert err < 2e-5 and gerr < 2e-5, (backend, layout, err, gerr)
            print(backend, layout, "ok", err, gerr)
""")


def test_sharded_attention_matches_numpy_reference_in_every_layout():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count(" ok ") == 10, proc.stdout


def test_head_split_error_names_the_valid_degrees():
  with pytest.raises(
    ValueError,
    match=r"30 attention heads .* tensor=4 x context=1 .* "
    r"\[1, 2, 3, 5, 6, 10, 15, 30\]",
  ):
    A.check_head_split(30, 4, 1)
  A.check_head_split(30, 3, 2)  # 6 divides 30


@pytest.mark.parametrize("block", [None, 5])
def test_padded_keys_are_masked_in_the_xla_kernel(block):
  """kv_len masks trailing keys exactly: equal to attention over the unpadded keys, grads included,
  all query rows at once or in blocks of 5."""
  import jax.numpy as jnp
  import numpy as np

  q, k, v = (jax.random.normal(jax.random.key(i), (2, 1, 12, 8)) for i in range(3))  # (B, H, S, D)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 5), (0, 0)))
  full = A._attention_hm(q, k, v, None, None)
  padded = A._attention_hm(pad(q), pad(k), pad(v), 12, block)[:, :, :12]
  np.testing.assert_allclose(padded, full, atol=1e-5)  # float32, different summation length
  g_full = jax.grad(lambda k: A._attention_hm(q, k, v, None, None).sum())(k)
  g_pad = jax.grad(lambda k: A._attention_hm(pad(q), k, pad(v), 12, block)[:, :, :12].sum())(pad(k))
  np.testing.assert_allclose(g_pad[:, :, :12], g_full, atol=1e-5)
  assert float(jnp.abs(g_pad[:, :, 12:]).max()) == 0.0


def test_backend_follows_the_mesh_devices_not_the_host(tpu_devices):
  """On this CPU host, with a TPU topology's mesh set, 'auto' is splash and splash is allowed; the
  VAE's 'auto' conv form is the accelerator one. Without the mesh the host's CPU decides."""
  from repvideo_jax.vae import VAEConfig

  assert A.resolve_backend("auto") == "xla"
  with pytest.raises(ValueError, match="needs a TPU"):
    A.resolve_backend("splash")
  assert VAEConfig().conv3d_impl() == "taps"
  mesh = sharding.make_mesh(data=-1, devices=tpu_devices("v5e:2x2"))
  with jax.set_mesh(mesh):
    assert sharding.target_platform() == "tpu"
    assert A.resolve_backend("auto") == "splash"
    assert A.resolve_backend("splash") == "splash"
    assert VAEConfig().conv3d_impl() == "native"
    with pytest.raises(ValueError, match="needs a GPU"):
      A.resolve_backend("cudnn")
