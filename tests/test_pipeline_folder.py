"""Whole-folder conversion: a tiny diffusers-layout CogVideoX folder -> our folder -> one-call load.

Every component is compared with its PyTorch reference (tolerances as in the component tests).
"""

import json

import jax
import numpy as np
import pytest
import torch
from reference_models import (
  diffusers_forward,
  repvideo_reference_forward,
  sat_state_dict,
  tiny_cogvideox_folder,
  to_channels_last,
)

from repvideo_jax import convert
from repvideo_jax import transformer as T
from repvideo_jax import vae as V
from repvideo_jax.pipeline import load_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny_cogvideox_folder(tmp_path_factory.mktemp("cogvideox"), seed=0)


def _check_components(pipe, refs, *, gates=None):
  g = torch.Generator().manual_seed(0)
  # transformer
  lat, ts, text = (
    torch.randn(1, 2, 4, 8, 8, generator=g),
    torch.tensor([321]),
    torch.randn(1, 8, 32, generator=g),
  )
  model = refs["transformer"]
  ref = (
    repvideo_reference_forward(model, lat, ts, text, torch.as_tensor(gates))
    if gates is not None
    else diffusers_forward(model, lat, ts, text)
  )
  out = jax.jit(T.make_apply(pipe.transformer_config))(
    pipe.transformer_params, to_channels_last(lat), ts.numpy(), text.numpy()
  )
  np.testing.assert_allclose(np.asarray(out), to_channels_last(ref), atol=2e-5)
  # text encoder + tokenizer, as released: no mask, pads kept
  prompts = ["a red cat playing guitar", "ocean waves"]
  ids = refs["tokenizer"](
    prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt"
  ).input_ids
  ref = refs["text_encoder"](ids).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(pipe.encode_prompts(prompts)), ref, atol=2e-5)
  # VAE decode of 3 latent frames (released chunking [0:3]) and encoder mean
  z = torch.randn(1, 4, 3, 8, 8, generator=g)
  ref = refs["vae"].decode(z).sample.permute(0, 2, 3, 4, 1).numpy()
  out = V.decode(
    pipe.vae_params,
    z.permute(0, 2, 3, 4, 1).numpy() * pipe.vae_config.scaling_factor,
    config=pipe.vae_config,
    chunking="released",
  )
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


def test_convert_pipeline_and_load_in_one_call(folder, tmp_path):
  src, refs = folder
  dst = tmp_path / "ours"
  assert convert.main(["pipeline", "--src", str(src), "--dst", str(dst)]) == 0
  manifest = json.loads((dst / "pipeline.json").read_text())
  assert manifest["components"] == ["transformer", "text_encoder", "vae", "tokenizer"]
  for comp in ("transformer", "text_encoder", "vae"):
    meta = json.loads((dst / comp / "metadata.json").read_text())
    assert meta["component"] == comp and meta["source"] and meta["config"]
  pipe = load_pipeline(dst)
  assert not pipe.transformer_config.feature_cache
  _check_components(pipe, refs)
  # The diffusers layout also loads directly, without converting first.
  _check_components(load_pipeline(src), refs)


def test_pipeline_with_repvideo_sat_transformer(folder, tmp_path):
  src, refs = folder
  model = refs["transformer"]
  gates = np.linspace(-0.2, 1.1, model.config.num_layers).astype(np.float32)
  sat = tmp_path / "sat"
  (sat / "5").mkdir(parents=True)
  (sat / "latest").write_text("5")
  torch.save({"module": sat_state_dict(model, gates)}, sat / "5" / "mp_rank_00_model_states.pt")
  eps = model.norm_out.norm.eps
  model.norm_out.norm.eps = 1e-6  # SAT's output-head epsilon
  try:
    dst = tmp_path / "rep"
    code = convert.main(["pipeline", "--src", str(src), "--repvideo", str(sat), "--dst", str(dst)])
    assert code == 0
    pipe = load_pipeline(dst, transformer_overrides=dict(text_length=8, sample_height=8, sample_width=8))
    assert pipe.transformer_config.feature_cache
    np.testing.assert_array_equal(pipe.transformer_params["gates"], gates)
    _check_components(pipe, refs, gates=gates)
  finally:
    model.norm_out.norm.eps = eps


def test_incomplete_folders_are_refused(folder, tmp_path):
  src, _ = folder
  with pytest.raises(FileNotFoundError, match="missing"):
    load_pipeline(src / "transformer")
  assert convert.main(["pipeline", "--src", str(src / "vae"), "--dst", str(tmp_path / "x")]) == 2
  assert not (tmp_path / "x").exists()


def test_component_cli_commands(folder, tmp_path):
  from repvideo_jax import text_encoder_weights, vae_weights

  src, _ = folder
  assert convert.main(["vae", "--src", str(src / "vae"), "--dst", str(tmp_path / "vae")]) == 0
  assert (
    convert.main(
      [
        "text_encoder",
        "--src",
        str(src / "text_encoder"),
        "--dst",
        str(tmp_path / "te"),
        "--set",
        "param_dtype=bfloat16",
      ]
    )
    == 0
  )
  v_cfg, v_params = vae_weights.load(tmp_path / "vae")
  v_ref_cfg, v_ref = vae_weights.load(src / "vae")
  assert v_cfg == v_ref_cfg
  for a, b in zip(jax.tree.leaves(v_params), jax.tree.leaves(v_ref)):
    np.testing.assert_array_equal(a, b)
  t_cfg, t_params = text_encoder_weights.load(tmp_path / "te")
  assert t_cfg.param_dtype == "bfloat16"
  assert str(jax.tree.leaves(t_params)[0].dtype) == "bfloat16"
  meta = json.loads((tmp_path / "te" / "metadata.json").read_text())
  assert meta["component"] == "text_encoder" and meta["source"].startswith("hf:")
  assert convert.main(["vae", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "v2")]) == 2
