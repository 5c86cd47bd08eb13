"""Loading the transformer from diffusers folders, SAT checkpoints and our converted format; the CLI."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import state_dict_numpy
from reference_models import (
  diffusers_forward,
  repvideo_reference_forward,
  sat_state_dict,
  tiny_diffusers_transformer,
  to_channels_last,
)

from repvideo_jax import convert
from repvideo_jax import transformer as T
from repvideo_jax import transformer_weights as W

ATOL = 2e-5


def _inputs(seed=0, batch=2, frames=2):
  g = torch.Generator().manual_seed(seed)
  return (
    torch.randn(batch, frames, 4, 8, 8, generator=g),
    torch.tensor([3, 640][:batch]),
    torch.randn(batch, 8, 32, generator=g),
  )


def _ours(cfg, params, lat, ts, text):
  return np.asarray(jax.jit(T.make_apply(cfg))(params, to_channels_last(lat), ts.numpy(), text.numpy()))


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single-file", "sharded-index"])
def test_diffusers_folder_and_cli_round_trip(tmp_path, shard, capsys):
  model = tiny_diffusers_transformer(seed=1)
  src = tmp_path / "cogvideox" / "transformer"
  model.save_pretrained(src, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
  if shard:
    assert (src / "diffusion_pytorch_model.safetensors.index.json").exists()
  lat, ts, text = _inputs()
  ref = to_channels_last(diffusers_forward(model, lat, ts, text))
  cfg, params = W.load(src)  # the folder itself
  np.testing.assert_allclose(_ours(cfg, params, lat, ts, text), ref, atol=ATOL)
  cfg2, params2 = W.load(tmp_path / "cogvideox")  # a pipeline folder with transformer/
  np.testing.assert_allclose(_ours(cfg2, params2, lat, ts, text), ref, atol=ATOL)
  # Convert once with the CLI, load our format back.
  dst = tmp_path / "converted"
  assert convert.main(["transformer", "--src", str(src), "--dst", str(dst)]) == 0
  meta = json.loads((dst / "metadata.json").read_text())
  assert meta["config"]["num_layers"] == 2 and meta["source"].startswith("diffusers:")
  cfg3, params3 = W.load(dst)
  assert cfg3 == cfg
  np.testing.assert_allclose(_ours(cfg3, params3, lat, ts, text), ref, atol=ATOL)


def test_diffusers_into_cache_on_config_starts_gates_at_half(tmp_path, caplog):
  model = tiny_diffusers_transformer(seed=2, num_layers=4)
  model.save_pretrained(tmp_path / "t")
  with caplog.at_level("WARNING"):
    cfg, params = W.load(tmp_path / "t", feature_cache=True)
  assert "no RepVideo gates" in caplog.text and "0.5" in caplog.text
  np.testing.assert_array_equal(params["gates"], np.full(4, 0.5, np.float32))
  lat, ts, text = _inputs(1)
  ref = repvideo_reference_forward(model, lat, ts, text, torch.full((4,), 0.5))
  np.testing.assert_allclose(_ours(cfg, params, lat, ts, text), to_channels_last(ref), atol=ATOL)
  with pytest.raises(W.CheckpointKeyError, match="no RepVideo gates"):
    W.from_diffusers(state_dict_numpy(model), cfg, allow_missing_gates=False)


def test_cli_sat_to_ours_keeps_gates(tmp_path):
  model = tiny_diffusers_transformer(seed=3, num_layers=7)
  model.norm_out.norm.eps = 1e-6
  gates = np.linspace(-0.3, 1.3, 7).astype(np.float32)
  (tmp_path / "sat" / "42").mkdir(parents=True)
  (tmp_path / "sat" / "latest").write_text("42")
  torch.save({"module": sat_state_dict(model, gates)}, tmp_path / "sat" / "42" / "mp_rank_00_model_states.pt")
  dst = tmp_path / "ours"
  code = convert.main(
    [
      "transformer",
      "--src",
      str(tmp_path / "sat"),
      "--dst",
      str(dst),
      "--set",
      "text_length=8",
      "--set",
      "sample_height=8",
      "--set",
      "sample_width=8",
    ]
  )
  assert code == 0
  cfg, params = W.load(dst)
  np.testing.assert_array_equal(params["gates"], gates)
  lat, ts, text = _inputs(2, batch=1, frames=3)
  ref = repvideo_reference_forward(model, lat, ts, text, torch.from_numpy(gates))
  np.testing.assert_allclose(_ours(cfg, params, lat, ts, text), to_channels_last(ref), atol=ATOL)
  # Converting again onto the same folder refuses without --overwrite.
  assert convert.main(["transformer", "--src", str(tmp_path / "sat"), "--dst", str(dst)]) == 2


def test_missing_and_unexpected_keys_are_listed():
  model = tiny_diffusers_transformer(seed=4)
  cfg = W.config_from_diffusers(dict(model.config))
  state = state_dict_numpy(model)
  broken = {k: v for k, v in state.items() if "ff.net.2" not in k}
  broken["transformer_blocks.0.attn1.to_q.lora_A.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(W.CheckpointKeyError) as err:
    W.from_diffusers(broken, cfg)
  text = str(err.value)
  assert "transformer_blocks.1.ff.net.2.weight" in text and "lora_A" in text
  assert "missing from checkpoint (4)" in text and "unexpected in checkpoint (1)" in text


def test_layer_count_and_shape_mismatches():
  model = tiny_diffusers_transformer(seed=5)
  state = state_dict_numpy(model)
  cfg = W.config_from_diffusers(dict(model.config), num_layers=3)
  with pytest.raises(W.CheckpointKeyError, match="transformer_blocks.2"):
    W.from_diffusers(state, cfg)
  cfg = W.config_from_diffusers(dict(model.config), time_embed_dim=24)
  with pytest.raises(W.CheckpointKeyError, match="shape mismatch"):
    W.from_diffusers(state, cfg)


def test_sat_checkpoint_with_unknown_keys_fails(tmp_path):
  model = tiny_diffusers_transformer(seed=6)
  sd = sat_state_dict(model, np.full(2, 0.5))
  sd["model.diffusion_model.mixins.lora.extra.weight"] = torch.zeros(3)
  torch.save({"module": sd}, tmp_path / "m.pt")
  with pytest.raises(W.CheckpointKeyError, match="mixins.lora.extra.weight"):
    W.load(tmp_path / "m.pt", text_length=8)


def test_gates_in_checkpoint_but_cache_off_is_an_error(tmp_path):
  model = tiny_diffusers_transformer(seed=7)
  torch.save({"module": sat_state_dict(model, np.full(2, 0.5))}, tmp_path / "m.pt")
  with pytest.raises(W.CheckpointKeyError, match="learnable_gating"):
    W.load(tmp_path / "m.pt", feature_cache=False, text_length=8)


def test_unsupported_and_missing_sources(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    W.load(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="not a transformer checkpoint"):
    W.load(tmp_path / "empty")
  with pytest.raises(ValueError, match="CogVideoX 1.5"):
    W.config_from_diffusers({"patch_size_t": 2})


def test_cli_reports_errors_without_traceback(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "repvideo_jax.convert",
      "transformer",
      "--src",
      str(tmp_path / "missing"),
      "--dst",
      str(tmp_path / "out"),
    ],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 2
  assert "error: no checkpoint" in proc.stderr and "Traceback" not in proc.stderr
