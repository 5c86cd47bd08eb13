"""The functional form under jit/grad/vmap, scan vs unrolled, remat policies, dtypes, input checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repvideo_jax import attention as A
from repvideo_jax import transformer as T
from repvideo_jax.config import load_section

CFG = dataclasses.replace(
  load_section(T.TransformerConfig, "transformer", "tiny"), zero_init_modulation=False, num_layers=8
)


def _inputs(cfg=CFG, batch=2, frames=3, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  lat = jax.random.normal(k1, (batch, frames, cfg.sample_height, cfg.sample_width, cfg.in_channels))
  text = jax.random.normal(k2, (batch, cfg.text_length, cfg.text_embed_dim))
  return lat, jnp.arange(batch) * 333.0 + 7, text


def _loss(cfg):
  def loss(params, lat, ts, text):
    return jnp.mean(T.apply(params, lat, ts, text, config=cfg) ** 2)

  return loss


@pytest.mark.parametrize("positions", ["sincos", "rope"])
def test_scan_equals_unrolled_forward_and_grad(positions):
  cfg = dataclasses.replace(CFG, positional_embedding=positions, num_layers=3, cache_window=2)
  params = T.init(cfg, 1)
  args = _inputs(cfg)
  out_scan, g_scan = jax.jit(jax.value_and_grad(_loss(cfg)))(params, *args)
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  out_loop, g_loop = jax.jit(jax.value_and_grad(_loss(unrolled)))(params, *args)
  np.testing.assert_allclose(out_scan, out_loop, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_give_the_same_gradients(policy):
  params = T.init(CFG, 2)
  args = _inputs()
  ref = jax.jit(jax.grad(_loss(CFG)))(params, *args)
  got = jax.jit(jax.grad(_loss(dataclasses.replace(CFG, remat=policy))))(params, *args)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Gradients reach every param family, gates included (layers 2-5 and 6-7 are active).
  assert np.abs(np.asarray(got["gates"])[[2, 3, 4, 5, 6]]).min() > 0


def test_vmap_over_batch_matches_batched_call():
  params = T.init(CFG, 3)
  lat, ts, text = _inputs(batch=3)
  batched = jax.jit(T.make_apply(CFG))(params, lat, ts, text)
  one = lambda l, t, x: T.apply(params, l[None], t[None], x[None], config=CFG)[0]
  per_example = jax.jit(jax.vmap(one))(lat, ts, text)
  np.testing.assert_allclose(per_example, batched, atol=1e-5)


def test_vmap_over_params_ensembles():
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), T.init(CFG, 4), T.init(CFG, 5))
  lat, ts, text = _inputs(batch=1)
  outs = jax.jit(jax.vmap(lambda p: T.apply(p, lat, ts, text, config=CFG)))(stacked)
  single = jax.jit(T.make_apply(CFG))(T.init(CFG, 5), lat, ts, text)
  np.testing.assert_allclose(outs[1], single, atol=1e-5)
  assert np.abs(outs[0] - outs[1]).max() > 1e-3


def test_nnx_module_and_functional_form_agree():
  model = T.create(CFG, 6)
  lat, ts, text = _inputs()
  np.testing.assert_allclose(
    model(lat, ts, text), T.apply(T.split_params(model), lat, ts, text, config=CFG), atol=1e-6
  )


def test_bfloat16_compute_tracks_float32():
  params = T.init(CFG, 7)
  lat, ts, text = _inputs()
  ref = jax.jit(T.make_apply(CFG))(params, lat, ts, text)
  bf = jax.jit(T.make_apply(dataclasses.replace(CFG, dtype="bfloat16")))(params, lat, ts, text)
  assert bf.dtype == jnp.bfloat16
  err = np.abs(np.asarray(bf, np.float32) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
  assert err < 0.05
  bf_params = T.init(dataclasses.replace(CFG, param_dtype="bfloat16"), 7)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf_params))


def test_zero_init_modulation_makes_fresh_model_output_zero():
  cfg = dataclasses.replace(CFG, zero_init_modulation=True)
  out = T.apply(T.init(cfg, 0), *_inputs(cfg), config=cfg)
  assert np.all(np.asarray(out) == 0)


def test_logical_axes_cover_every_param_and_map_to_specs():
  from repvideo_jax import sharding

  axes = T.logical_axes(CFG)
  shapes = T.abstract_params(CFG)
  for names, shape in zip(
    jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes)
  ):
    assert len(names) == len(shape.shape)
    sharding.logical_to_spec(names)
  assert axes["blocks"]["to_q"]["kernel"] == ("layers", "embed", "heads")
  assert sharding.logical_to_spec(("layers", "embed", "mlp")) == jax.sharding.PartitionSpec(
    None, "fsdp", "tensor"
  )


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(channels=5), "channels"),
    (dict(height=7), "divisible by the patch size"),
    (dict(frames=14), "exceed the positional table"),
    (dict(height=10), "exceed the positional table"),
    (dict(text_len=9), "exactly 8"),
    (dict(text_dim=31), "text embeddings must be"),
    (dict(ts_shape=(3,)), "timesteps must be shape"),
    (dict(rank4=True), "channels-last"),
  ],
)
def test_bad_inputs_raise_clear_errors(bad, match):
  p = dict(channels=4, height=8, frames=2, text_len=8, text_dim=32, ts_shape=(2,), rank4=False)
  p.update(bad)
  lat = jnp.zeros((2, p["frames"], p["height"], 8, p["channels"]))
  if p["rank4"]:
    lat = lat[:, 0]
  text = jnp.zeros((2, p["text_len"], p["text_dim"]))
  with pytest.raises(ValueError, match=match):
    T.apply(T.init(CFG), lat, jnp.zeros(p["ts_shape"]), text, config=CFG)


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="remat"):
    dataclasses.replace(CFG, remat="sometimes")
  with pytest.raises(ValueError, match="cache_window"):
    dataclasses.replace(CFG, cache_window=0)
  with pytest.raises(ValueError, match="unknown key"):
    load_section(T.TransformerConfig, "transformer", "tiny", ["num_layer=3"])


# -- attention dispatch ---------------------------------------------------------------------------


def test_attention_backend_resolution():
  assert A.resolve_backend("auto", "cpu") == "xla"
  assert A.resolve_backend("auto", "gpu") == "cudnn"
  assert A.resolve_backend("auto", "tpu") == "splash"
  assert A.resolve_backend("cudnn", "gpu") == "cudnn"
  with pytest.raises(ValueError, match="needs a GPU"):
    A.resolve_backend("cudnn", "cpu")
  with pytest.raises(ValueError, match="needs a TPU"):
    A.resolve_backend("splash", "gpu")
  with pytest.raises(ValueError, match="unknown attention backend"):
    A.resolve_backend("flash", "cpu")


def test_model_refuses_backend_missing_on_this_platform():
  cfg = dataclasses.replace(CFG, attention_backend="cudnn")
  with pytest.raises(ValueError, match="needs a GPU"):
    T.apply(T.init(CFG), *_inputs(), config=cfg)


def test_xla_attention_matches_naive_softmax():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 37, 3, 16)) for i in range(3))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
  ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
  np.testing.assert_allclose(A.attention(q, k, v, backend="xla"), ref, atol=1e-5)


def test_xla_attention_runs_in_query_blocks_on_cpu_only():
  """On CPU the xla backend computes at most CPU_QUERY_BLOCK query rows at a time, in even blocks
  (one lax.map over them; the scores are never (S, S)); on GPU/TPU, all rows at once as before."""
  assert A.query_block_for("cpu") == A.CPU_QUERY_BLOCK
  assert A.query_block_for("gpu") is None and A.query_block_for("tpu") is None
  assert (
    A._even_block(456, 448) == 228 and A._even_block(896, 448) == 448 and A._even_block(17776, 448) == 445
  )
  seq = A.CPU_QUERY_BLOCK + 5  # two even blocks of (seq + 1) // 2 rows, one of them padded by a row
  q, k, v = (jax.random.normal(jax.random.key(i), (1, seq, 1, 8)) for i in range(3))
  hlo = jax.jit(lambda q, k, v: A.attention(q, k, v, backend="xla")).lower(q, k, v).as_text()
  assert f"x{(seq + 1) // 2}x{seq}xf32>" in hlo  # one block's scores
  assert f"x{seq}x{seq}xf32>" not in hlo
  np.testing.assert_allclose(
    A.attention(q, k, v, backend="xla"), A._xla_attention(q, k, v, block=None), atol=1e-6
  )


def test_splash_kernel_in_interpret_mode_matches_xla():
  """The TPU kernel path (padding + segment ids) run by the Pallas interpreter on CPU."""
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 200, 2, 128)) for i in range(3))
  got = A.attention(q, k, v, backend="splash", interpret=True)
  np.testing.assert_allclose(got, A.attention(q, k, v, backend="xla"), atol=2e-5)


@pytest.mark.parametrize("block", [None, 8, 29])
def test_xla_attention_gradient_matches_autodiff_of_naive_softmax(block):
  """The recompute-in-backward custom VJP equals autodiff through a plain softmax attention, computed
  all at once (block None, as on GPU/TPU) or in query blocks (8 rows: the last block padded; 29: one)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 29, 3, 8)) for i in range(3))
  w = jax.random.normal(jax.random.key(9), (2, 29, 3, 8))

  def naive(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8.0), axis=-1)
    return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", p, v) * w)

  ours = lambda q, k, v: jnp.sum(A._xla_attention(q, k, v, block=block) * w)
  np.testing.assert_allclose(ours(q, k, v), naive(q, k, v), rtol=1e-5)
  for a, b in zip(jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(naive, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  bf = [t.astype(jnp.bfloat16) for t in (q, k, v)]
  assert A.attention(*bf, backend="xla").dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax_and_its_gradient_matches_autodiff(dtype):
  """T.layer_norm (custom VJP, closed-form backward) gives nnx.LayerNorm(use_fast_variance=False)'s
  values to the bit in float32, and the gradients of autodiff through the same formula (1e-5); in
  bfloat16 the gradients come back in the inputs' dtypes."""
  from flax import nnx

  x = (3.0 * jax.random.normal(jax.random.key(0), (2, 37, 48)) + 1.0).astype(dtype)
  scale = (1.0 + 0.3 * jax.random.normal(jax.random.key(1), (48,))).astype(dtype)
  bias = (0.3 * jax.random.normal(jax.random.key(2), (48,))).astype(dtype)
  w = jax.random.normal(jax.random.key(3), x.shape)
  ref = nnx.LayerNorm(
    48, epsilon=1e-5, dtype=jnp.float32, param_dtype=dtype, use_fast_variance=False, rngs=nnx.Rngs(0)
  )
  ref.scale[...], ref.bias[...] = scale, bias
  ours = T.layer_norm(x, scale, bias, 1e-5)
  assert ours.dtype == jnp.float32
  np.testing.assert_array_equal(ours, ref(x))

  def autodiff(x, s, b):
    x = x.astype(jnp.float32)
    c = x - x.mean(-1, keepdims=True)
    y = c * (jax.lax.rsqrt(jnp.square(c).mean(-1, keepdims=True) + 1e-5) * s.astype(jnp.float32))
    return jnp.sum((y + b.astype(jnp.float32)) * w)

  got = jax.grad(lambda *a: jnp.sum(T.layer_norm(*a, 1e-5) * w), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(autodiff, argnums=(0, 1, 2))(x, scale, bias)
  for g, r, primal in zip(got, want, (x, scale, bias)):
    assert g.dtype == primal.dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol * 10)


def test_gelu_tanh_matches_jax_and_its_gradient_matches_autodiff():
  x = 4.0 * jax.random.normal(jax.random.key(0), (1000,))
  np.testing.assert_array_equal(T.gelu_tanh(x), jax.nn.gelu(x, approximate=True))
  got = jax.grad(lambda x: jnp.sum(T.gelu_tanh(x) * jnp.cos(x)))(x)
  want = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True) * jnp.cos(x)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
