"""Int8 weight-only layer kernels (repvideo_jax.quantize, stored as qwix QArrays).

Checked against an independent numpy statement of the scheme (symmetric absmax per layer and output
channel, the int8 range read as [-127.5, 127.5] as qwix does): the scales to 1e-6, every value within
half a step of the kernel. The models run with int8 kernels equal the same models run with the
numpy-dequantized float32 kernels (max abs 1e-5: the dequantization inside the layer scan slices
each layer's scales correctly), and differ from the float32 model by a bounded, nonzero amount.
"""

import dataclasses

import jax
import numpy as np
import pytest

from repvideo_jax import config as config_lib
from repvideo_jax import memory, pipeline, quantize
from repvideo_jax import text_encoder as TE
from repvideo_jax import transformer as T


def _random_params(params, seed, scale=0.1):
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.normal(0, scale, np.shape(x)).astype(np.float32) for x in leaves])


def _numpy_dequantized(params):
  """Every QArray replaced by qvalue * scale computed in numpy (broadcast over the input axis)."""
  return jax.tree.map(
    lambda x: (
      np.asarray(x.qvalue, np.float32) * np.asarray(x.scale, np.float32) if quantize.is_quantized(x) else x
    ),
    params,
    is_leaf=quantize.is_quantized,
  )


def test_kernels_match_an_independent_statement_of_the_scheme():
  k = np.random.default_rng(0).normal(size=(3, 64, 24)).astype(np.float32)
  k[1, :, 5] *= 100.0  # one loud channel must not coarsen the others' steps
  q = quantize.quantize_params({"blocks": {"attn": {"kernel": k, "bias": np.zeros((3, 24))}}})
  qk = q["blocks"]["attn"]["kernel"]
  assert quantize.is_quantized(qk) and np.asarray(qk.qvalue).dtype == np.int8
  assert q["blocks"]["attn"]["bias"] is not None and not quantize.is_quantized(q["blocks"]["attn"]["bias"])
  scale = np.abs(k).max(axis=1, keepdims=True) / 127.5  # per (layer, output channel)
  np.testing.assert_allclose(np.asarray(qk.scale), scale, rtol=1e-6)
  deq = _numpy_dequantized(q)["blocks"]["attn"]["kernel"]
  assert np.all(np.abs(deq - k) <= 0.5 * scale * (1 + 1e-5))
  ref = np.clip(np.rint(k / scale), -128, 127)
  same = np.mean(np.asarray(qk.qvalue) == ref)
  assert same > 0.99 and np.abs(np.asarray(qk.qvalue) - ref).max() <= 1
  # the quantized layer's own dequantization agrees with numpy's
  np.testing.assert_allclose(np.asarray(quantize.dequantize_layer(qk)), deq, rtol=1e-6)
  assert memory.tree_bytes(q) < 0.3 * memory.tree_bytes({"k": k})
  assert quantize.dequantize_layer(k) is k  # nothing to do without a QArray
  with pytest.raises(ValueError, match="quantize must be one of"):
    quantize.quantize_params({"blocks": {}}, "int4")


def test_transformer_with_int8_kernels():
  cfg = config_lib.load_section(T.TransformerConfig, "transformer", "tiny")
  params = _random_params(T.init(cfg, 0), seed=1)
  q = quantize.quantize_params(params)
  assert quantize.count_quantized(q) >= cfg.num_layers and quantize.count_quantized(params) == 0
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 3, cfg.sample_height, cfg.sample_width, cfg.in_channels)).astype(np.float32)
  text = rng.normal(size=(1, cfg.text_length, cfg.text_embed_dim)).astype(np.float32)
  t = np.array([400.0], np.float32)
  fn = jax.jit(T.make_apply(cfg))
  full, int8, ref = (np.asarray(fn(p, x, t, text)) for p in (params, q, _numpy_dequantized(q)))
  np.testing.assert_allclose(int8, ref, atol=1e-5)
  rel = np.linalg.norm(int8 - full) / np.linalg.norm(full)
  assert 1e-6 < rel < 2e-2, rel


def test_text_encoder_with_int8_kernels():
  cfg = TE.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, max_length=12)
  params = _random_params(TE.init(cfg, 0), seed=3, scale=0.3)
  q = quantize.quantize_params(params)
  ids = np.random.default_rng(4).integers(0, 64, (2, 12))
  fn = jax.jit(TE.make_apply(cfg))
  full, int8, ref = (np.asarray(fn(p, ids)) for p in (params, q, _numpy_dequantized(q)))
  np.testing.assert_allclose(int8, ref, atol=1e-5)
  rel = np.linalg.norm(int8 - full) / np.linalg.norm(full)
  assert 1e-6 < rel < 2e-2, rel


def test_pipeline_loads_int8_weights():
  from repvideo_jax.demo import demo_model_dir  # noqa: PLC0415 (the bundled model)

  base = pipeline.load_pipeline(demo_model_dir())
  pipe = pipeline.load_pipeline(demo_model_dir(), quantize_weights=("text_encoder", "transformer"))
  assert pipe.quantized == ("text_encoder", "transformer")
  for name in pipe.quantized:
    before, after = getattr(base, f"{name}_params"), getattr(pipe, f"{name}_params")
    assert quantize.count_quantized(after) > 0
    assert memory.tree_bytes(after) < 0.6 * memory.tree_bytes(before)
  settings = dataclasses.replace(pipeline.settings_for(base), steps=2)
  a = pipeline.generate(base, ["a red circle moving left on a black background"], settings, output="float")
  b = pipeline.generate(pipe, ["a red circle moving left on a black background"], settings, output="float")
  psnr = 10 * np.log10(1.0 / np.mean((a - b) ** 2))
  assert 25 < psnr < 200, psnr  # close, and not the same numbers (the weights did change)
  with pytest.raises(ValueError, match="unknown component"):
    pipeline.load_pipeline(demo_model_dir(), quantize_weights=("vae",))
