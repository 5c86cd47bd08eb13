"""Parity of our transformer against diffusers' CogVideoXTransformer3DModel and a RepVideo reference.

Tolerance: float32 on CPU, max |ours - reference| <= 2e-5 on outputs of unit scale (the difference is
summation order in matmuls/attention; a wrong layout, epsilon or formula shows up at 1e-2 or more).
"""

import jax
import jax.numpy as jnp
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

from repvideo_jax import transformer as T
from repvideo_jax import transformer_weights as W

ATOL = 2e-5


def _inputs(model, batch, frames, seed=0, timesteps=None):
  cfg = model.config
  g = torch.Generator().manual_seed(seed)
  lat = torch.randn(batch, frames, cfg.in_channels, cfg.sample_height, cfg.sample_width, generator=g)
  text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
  if timesteps is None:
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
  return lat, torch.as_tensor(timesteps), text


def _ours(cfg, params, lat, ts, text):
  fn = jax.jit(T.make_apply(cfg))
  return np.asarray(fn(params, to_channels_last(lat), ts.numpy(), text.numpy()))


def _convert(model, **overrides):
  cfg = W.config_from_diffusers(dict(model.config), **overrides)
  return cfg, W.from_diffusers(state_dict_numpy(model), cfg)


@pytest.mark.parametrize("rope", [False, True], ids=["sincos", "rope"])
@pytest.mark.parametrize("batch,frames,timesteps", [(1, 3, [999]), (2, 1, [0, 500]), (3, 2, [1, 250, 998])])
def test_matches_diffusers_cache_off(rope, batch, frames, timesteps):
  model = tiny_diffusers_transformer(seed=batch, use_rotary_positional_embeddings=rope)
  cfg, params = _convert(model)
  assert not cfg.feature_cache and cfg.positional_embedding == ("rope" if rope else "sincos")
  lat, ts, text = _inputs(model, batch, frames, seed=frames, timesteps=timesteps)
  ref = to_channels_last(diffusers_forward(model, lat, ts, text))
  out = _ours(cfg, params, lat, ts, text)
  assert np.abs(ref).mean() > 0.1  # unit-scale outputs, so the tolerance is meaningful
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("height,width", [(8, 4), (4, 8)])
def test_smaller_grids_match_diffusers(height, width):
  """Other resolutions: diffusers recomputes sin-cos / crops rotary grids; so must we."""
  for rope in (False, True):
    model = tiny_diffusers_transformer(seed=3, use_rotary_positional_embeddings=rope)
    cfg, params = _convert(model)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 2, 4, height, width, generator=g)
    text = torch.randn(2, 8, 32, generator=g)
    ts = torch.tensor([10, 700])
    ref = to_channels_last(diffusers_forward(model, lat, ts, text))
    np.testing.assert_allclose(_ours(cfg, params, lat, ts, text), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope", [False, True], ids=["sincos", "rope"])
def test_cache_on_matches_section_2_2_reference(rope):
  """30 layers so every window (0-5, 6-11, ..., 24-29) and reset is exercised; gates leave [0, 1]."""
  model = tiny_diffusers_transformer(seed=7, num_layers=30, use_rotary_positional_embeddings=rope)
  gates = np.random.default_rng(0).uniform(-0.5, 1.5, 30).astype(np.float32)
  cfg = W.config_from_diffusers(dict(model.config), feature_cache=True)
  state = state_dict_numpy(model)
  state["learnable_gating"] = gates
  params = W.from_diffusers(state, cfg, allow_missing_gates=False)
  lat, ts, text = _inputs(model, 2, 2, seed=1)
  ref = to_channels_last(repvideo_reference_forward(model, lat, ts, text, torch.from_numpy(gates)))
  plain = to_channels_last(diffusers_forward(model, lat, ts, text))
  out = _ours(cfg, params, lat, ts, text)
  assert np.abs(ref - plain).max() > 1e-2  # the cache really changes the output
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_window_length_is_configurable():
  model = tiny_diffusers_transformer(seed=8, num_layers=7)
  gates = np.random.default_rng(1).uniform(0, 1, 7).astype(np.float32)
  for window in (1, 2, 4):
    cfg = W.config_from_diffusers(dict(model.config), feature_cache=True, cache_window=window)
    state = {**state_dict_numpy(model), "learnable_gating": gates}
    params = W.from_diffusers(state, cfg, allow_missing_gates=False)
    lat, ts, text = _inputs(model, 1, 2, seed=2)
    ref = repvideo_reference_forward(model, lat, ts, text, torch.from_numpy(gates), window=window)
    np.testing.assert_allclose(_ours(cfg, params, lat, ts, text), to_channels_last(ref), atol=ATOL)


def test_identity_and_active_gates():
  """Gates 0, 1, 7, 13, 19, 25 cannot act (their cache holds only h); all 24 others can (docs/model.md)."""
  model = tiny_diffusers_transformer(seed=9, num_layers=30)
  cfg = W.config_from_diffusers(dict(model.config), feature_cache=True)
  params = W.from_diffusers(state_dict_numpy(model), cfg)  # gates start at 0.5
  lat, ts, text = _inputs(model, 1, 2, seed=3)
  args = (to_channels_last(lat), ts.numpy(), text.numpy())
  grad = jax.grad(lambda g: jnp.sum(T.apply({**params, "gates": g}, *args, config=cfg) ** 2))(
    jnp.asarray(params["gates"])
  )
  identity = [0, 1, 7, 13, 19, 25]
  assert np.all(np.asarray(grad)[identity] == 0.0)
  active = [i for i in range(30) if i not in identity]
  assert np.all(np.abs(np.asarray(grad)[active]) > 0)
  # Moving an identity gate to any value leaves the output unchanged (up to rounding).
  base = T.apply(params, *args, config=cfg)
  moved = T.apply(
    {**params, "gates": params["gates"].copy() + np.isin(np.arange(30), identity) * 3.0}, *args, config=cfg
  )
  np.testing.assert_allclose(np.asarray(moved), np.asarray(base), atol=1e-5)


def test_reset_layer_averages_previous_window_then_starts_new_one():
  """Layer 6 sees mean(out_0..out_5) and then the cache restarts from out_6 (docs/model.md).

  Checked by perturbing gate 6 alone: the output must equal the reference with the same gates, and
  gate 7 stays an identity even after the reset.
  """
  model = tiny_diffusers_transformer(seed=10, num_layers=8)
  cfg = W.config_from_diffusers(dict(model.config), feature_cache=True)
  lat, ts, text = _inputs(model, 1, 1, seed=4)
  for g6 in (0.0, 1.0, 2.0):
    gates = np.full(8, 0.5, np.float32)
    gates[6] = g6
    params = W.from_diffusers({**state_dict_numpy(model), "learnable_gating": gates}, cfg)
    ref = repvideo_reference_forward(model, lat, ts, text, torch.from_numpy(gates))
    np.testing.assert_allclose(_ours(cfg, params, lat, ts, text), to_channels_last(ref), atol=ATOL)


def test_sat_checkpoint_round_trip(tmp_path):
  """An official-layout SAT checkpoint (latest + <iter>/mp_rank_00_model_states.pt) loads and matches."""
  model = tiny_diffusers_transformer(seed=11, num_layers=8)
  model.norm_out.norm.eps = 1e-6  # SAT's output-head LayerNorm epsilon (docs/model.md, 'Output head')
  gates = np.random.default_rng(2).uniform(-0.2, 1.2, 8).astype(np.float32)
  sd = sat_state_dict(model, gates)
  (tmp_path / "1000").mkdir()
  (tmp_path / "latest").write_text("1000\n")
  torch.save({"module": sd, "global_steps": 1000}, tmp_path / "1000" / "mp_rank_00_model_states.pt")
  cfg, params = W.load(tmp_path, sample_frames=3, sample_height=8, sample_width=8, text_length=8)
  assert cfg.feature_cache and cfg.num_layers == 8 and cfg.out_norm_eps == 1e-6
  lat, ts, text = _inputs(model, 2, 3, seed=5)
  ref = repvideo_reference_forward(model, lat, ts, text, torch.from_numpy(gates))
  np.testing.assert_allclose(_ours(cfg, params, lat, ts, text), to_channels_last(ref), atol=ATOL)


def test_sat_without_gates_is_cogvideox(tmp_path):
  model = tiny_diffusers_transformer(seed=12)
  model.norm_out.norm.eps = 1e-6
  torch.save({"module": sat_state_dict(model)}, tmp_path / "model.pt")
  cfg, params = W.load(tmp_path / "model.pt", sample_frames=3, sample_height=8, sample_width=8, text_length=8)
  assert not cfg.feature_cache
  lat, ts, text = _inputs(model, 1, 2, seed=6)
  ref = to_channels_last(diffusers_forward(model, lat, ts, text))
  np.testing.assert_allclose(_ours(cfg, params, lat, ts, text), ref, atol=ATOL)
