"""The analysis tool against an independent PyTorch recomputation on a tiny random model.

The reference runs diffusers' own CogVideoX blocks in the released list-cache loop
(``reference_models.repvideo_reference_forward``) with an attention processor that forms the
softmax probabilities explicitly and records them; every statistic of ``analysis.json`` is then
recomputed from those probabilities and block outputs in NumPy, from the definitions in the
analysis module's docstring, and compared (float32, atol 2e-5 on probabilities and cosines).
"""

import json

import numpy as np
import pytest
import torch
from reference_models import repvideo_reference_forward, tiny_cogvideox_folder

from repvideo_jax import analysis, convert, transformer_weights

WINDOW = 2
LAYERS = 5
GATES = np.array([0.3, -0.4, 0.9, 1.3, 0.6], np.float32)
ATOL = 2e-5


class RecordingProcessor:
  """diffusers' CogVideoX attention with the softmax written out, keeping the probabilities."""

  def __init__(self):
    self.probs = []

  def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
    assert attention_mask is None and image_rotary_emb is None
    text_len = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    b, s, _ = x.shape

    def heads(t):
      return t.view(b, s, attn.heads, -1).transpose(1, 2)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
    q, k = attn.norm_q(q), attn.norm_k(k)
    probs = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]), dim=-1)
    self.probs.append(probs.numpy().astype(np.float64))
    out = (probs @ v).transpose(1, 2).reshape(b, s, -1)
    out = attn.to_out[1](attn.to_out[0](out))
    return out[:, text_len:], out[:, :text_len]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """A converted tiny folder (5 layers, cache window 2, random gates) + its diffusers transformer."""
  root = tmp_path_factory.mktemp("analysis")
  src, refs = tiny_cogvideox_folder(root / "diffusers", seed=3, num_layers=LAYERS)
  dst = root / "model"
  convert.convert_pipeline(src, dst, transformer_overrides={"feature_cache": True, "cache_window": WINDOW})
  cfg, params = transformer_weights.load(dst / "transformer")
  transformer_weights.save(dst / "transformer", cfg, {**params, "gates": GATES}, overwrite=True)
  manifest = json.loads((dst / "pipeline.json").read_text())
  manifest["defaults"] = {"num_frames": 9, "height": 64, "width": 64, "steps": 2, "fps": 8}
  (dst / "pipeline.json").write_text(json.dumps(manifest))
  return dst, refs["transformer"]


def reference(model, inputs, gates, frames, text_len):
  """(token attention (layers, T, S), adjacent cosines (layers, T-1)) recomputed in PyTorch/NumPy."""
  proc = RecordingProcessor()
  for block in model.transformer_blocks:
    block.attn1.set_processor(proc)
  outputs = []
  xt = torch.from_numpy(inputs["noisy_latents"]).permute(0, 1, 4, 2, 3)  # -> (B, T, C, H, W)
  t = torch.tensor([int(inputs["timestep"])])
  text = torch.from_numpy(inputs["text_embeddings"])
  repvideo_reference_forward(model, xt, t, text, torch.from_numpy(gates), window=WINDOW, record=outputs)
  n = (proc.probs[0].shape[-1] - text_len) // frames
  attention = np.stack(
    [
      [p[0, :, text_len + f * n : text_len + (f + 1) * n].mean(axis=(0, 1)) for f in range(frames)]
      for p in proc.probs
    ]
  )
  sims = []
  for h in outputs:
    feats = h[0, text_len:].numpy().astype(np.float64).reshape(frames, -1)
    sims.append(
      [
        feats[f] @ feats[f + 1] / np.linalg.norm(feats[f]) / np.linalg.norm(feats[f + 1])
        for f in range(frames - 1)
      ]
    )
  return attention, np.asarray(sims)


def test_analysis_json_matches_an_independent_recomputation(tiny_model, tmp_path):
  model_dir, torch_model = tiny_model
  out = tmp_path / "out"
  assert (
    analysis.main(
      [
        "--model",
        str(model_dir),
        "--prompt",
        "a red circle moving left",
        "--out",
        str(out),
        "--frame",
        "2",
        "--timestep",
        "321",
        "--seed",
        "4",
        "--compare",
        "cache-off=off",
      ]
    )
    == 0
  )
  for name in (
    "analysis.json",
    "analysis.npz",
    "inputs.npz",
    "video.mp4",
    "attention_mass.png",
    "frame_similarity.png",
    "attention_maps_model.png",
    "token_attention_model.png",
    "attention_maps_cache-off.png",
    "token_attention_cache-off.png",
  ):
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name
  result = json.loads((out / "analysis.json").read_text())
  inputs = dict(np.load(out / "inputs.npz"))
  arrays = dict(np.load(out / "analysis.npz"))
  frames, gh, gw = result["token_grid"]
  text_len = result["text_length"]
  assert (frames, gh, gw) == (3, 4, 4) and text_len == 8 and result["timestep"] == 321
  n = gh * gw

  for label, gates in (("model", GATES), ("cache-off", np.zeros(LAYERS, np.float32))):
    attention, sims = reference(torch_model, inputs, gates, frames, text_len)
    np.testing.assert_allclose(arrays[f"{label}/token_attention"], attention, atol=ATOL, rtol=0)
    layers = result["variants"][label]["layers"]
    assert len(layers) == LAYERS
    for i, row in enumerate(layers):
      a = attention[i]
      same = np.array([a[f, text_len + f * n : text_len + (f + 1) * n].sum() for f in range(frames)])
      video = a[:, text_len:].sum(-1)
      expect = {
        "text": a[:, :text_len].sum(-1).mean(),
        "same_frame": same.mean(),
        "other_frames": (video - same).mean(),
      }
      for key, value in expect.items():
        assert row["attention_mass"][key] == pytest.approx(value, abs=ATOL), (label, i, key)
      assert sum(row["attention_mass"].values()) == pytest.approx(1.0, abs=1e-5)
      own = a[2, text_len + 2 * n : text_len + 3 * n].reshape(gh, gw)
      np.testing.assert_allclose(row["attention_map"], own, atol=ATOL, rtol=0)
      np.testing.assert_allclose(row["adjacent_frame_similarity"], sims[i], atol=ATOL, rtol=0)
  # The gates: reported as stored; with window 2 the cache holds one element before layers 0, 1, 3.
  model_rows = result["variants"]["model"]["layers"]
  assert [r["gate"] for r in model_rows] == pytest.approx(GATES.tolist())
  assert [r["gate_has_effect"] for r in model_rows] == [False, False, True, False, True]
  assert result["variants"]["cache-off"]["feature_cache"] is False


def test_identity_layers_of_the_released_model():
  from repvideo_jax.transformer import TransformerConfig

  assert analysis.identity_layers(TransformerConfig()) == [0, 1, 7, 13, 19, 25]  # docs/model.md
  assert analysis.identity_layers(TransformerConfig(feature_cache=False)) == []


def test_analysis_bad_arguments(tiny_model, tmp_path, capsys):
  model_dir, _ = tiny_model
  base = ["--model", str(model_dir), "--prompt", "a cat", "--out", str(tmp_path / "x")]
  assert analysis.main(base + ["--frame", "3"]) == 2
  assert "--frame 3 is out of range: the clip has 3 latent frames" in capsys.readouterr().err
  assert analysis.main(base + ["--timestep", "1000"]) == 2
  assert "timestep must be in [0, 1000)" in capsys.readouterr().err
  assert analysis.main(base + ["--compare", "nolabel"]) == 2
  assert "must look like LABEL=off" in capsys.readouterr().err
  assert analysis.main(base + ["--compare", "x=" + str(tmp_path / "missing")]) == 2
  assert "missing" in capsys.readouterr().err
