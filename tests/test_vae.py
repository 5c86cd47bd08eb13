"""The CogVideoX VAE in JAX against diffusers' ``AutoencoderKLCogVideoX`` (tiny config, random weights).

Tolerances (float32 on both sides, max abs error): encoder moments ``ATOL_ENC`` = 5e-5 and decoded
video ``ATOL_DEC`` = 1e-4, for outputs of magnitude ~1-8; the observed errors are ~2e-6 and ~1e-5
(conv summation order; GroupNorm statistics in float32). Weight loading is compared exactly.

What is checked and against what:
* whole-clip encode (posterior mean and logvar) and decode: diffusers' encoder / decoder called on the
  whole clip.
* 'released' chunked decode (SAT sample_video.py, latent frames [0:3], [3:5], [5:7]): an explicit
  loop in this file over diffusers' ``decoder`` with those chunks and its ``conv_cache`` (the SAT
  fake-context-parallel cache: the last 2 frames of every causal conv's padded input). Two
  independent sanity checks: the first chunk's 9 frames equal a whole decode of latent frames [0:3]
  alone (causality: later chunks cannot change earlier output), and the chunked decode differs from
  the whole decode (per-chunk GroupNorm statistics), so the chunking is really exercised.
* 'framewise': diffusers 0.42's ``decode`` / ``encode`` always run framewise (2 latent / 8 pixel
  frames per chunk, no switch exists); even latent frame count for decode, 17 frames for encode.
* tiling: diffusers' ``tiled_decode`` / ``tiled_encode`` (via ``enable_tiling``) with the same tile
  sizes and overlaps. (A tiled-vs-untiled "agree away from seams" check is not sound for this VAE:
  GroupNorm statistics are per tile, so every pixel of a tile changes, not just those near seams.)
* weights: diffusers folder / pipeline folder / our converted folder / a SAT ``3d-vae.pt`` built from
  the diffusers weights with the SAT renames undone (plus ``loss.*`` keys) all give the same params;
  wrong keys raise ``CheckpointKeyError`` naming them.
"""

import dataclasses
import json
import re

import diffusers
import jax
import numpy as np
import pytest
import torch
from conftest import randomize_, state_dict_numpy

from repvideo_jax import vae as V
from repvideo_jax import vae_weights as W

ATOL_ENC = 5e-5
ATOL_DEC = 1e-4
TINY = dict(
  block_out_channels=(16, 32, 32, 32),
  latent_channels=4,
  layers_per_block=1,
  norm_num_groups=8,
  temporal_compression_ratio=4,
  sample_height=32,
  sample_width=32,
)


def _cl(t: torch.Tensor) -> np.ndarray:
  """torch (B, C, T, H, W) -> numpy channels-last (B, T, H, W, C)."""
  return t.permute(0, 2, 3, 4, 1).numpy()


def _randn(*shape, seed):
  return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
  torch.manual_seed(0)
  model = randomize_(diffusers.AutoencoderKLCogVideoX(**TINY), seed=0)
  cfg = W.config_from_diffusers(dict(model.config))
  params = W.from_diffusers(state_dict_numpy(model), cfg)
  return model, cfg, params


def test_config_and_param_tree(tiny):
  model, cfg, params = tiny
  assert cfg == V.VAEConfig(**{**TINY, "block_out_channels": (16, 32, 32, 32)})
  assert V.VAEConfig().scaling_factor == 1.15258426 and V.VAEConfig().block_out_channels == (
    128,
    256,
    256,
    512,
  )
  n_ours = sum(np.size(a) for a in jax.tree.leaves(params))
  assert n_ours == sum(p.numel() for p in model.parameters())
  assert params["decoder"]["up_blocks"]["3"]["resnets"]["0"]["conv1"]["kernel"].shape == (3, 3, 3, 32, 16)
  assert params["encoder"]["down_blocks"]["0"]["downsample"]["conv"]["kernel"].shape == (3, 3, 16, 16)
  fresh = V.init(cfg, 1)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, params)
  k = np.asarray(fresh["decoder"]["mid_block"]["resnets"]["0"]["conv1"]["kernel"])  # fan_in 27 * 32
  assert abs(k.std() * np.sqrt(27 * 32) - 1) < 0.05 and not np.allclose(
    k, fresh["encoder"]["mid_block"]["resnets"]["0"]["conv1"]["kernel"]
  )
  assert np.all(np.asarray(fresh["encoder"]["norm_out"]["scale"]) == 1)
  with pytest.raises(ValueError, match="divisible by norm_num_groups"):
    V.VAEConfig(block_out_channels=(12, 32), norm_num_groups=8, temporal_compression_ratio=2)


def test_whole_clip_encode_matches_diffusers(tiny):
  model, cfg, params = tiny
  x = _randn(2, 3, 9, 32, 32, seed=1)
  moments, _ = model.encoder(x)
  post = model.encode(x).latent_dist  # 9 frames: diffusers' framewise encode is one chunk
  post_ours = V.encode_posterior(params, _cl(x), config=cfg)
  assert post_ours.mean.shape == (2, 3, 4, 4, 4)
  np.testing.assert_allclose(post_ours.mean, _cl(moments)[..., :4], atol=ATOL_ENC)
  np.testing.assert_allclose(post_ours.mean, _cl(post.mean), atol=ATOL_ENC)
  np.testing.assert_allclose(post_ours.logvar, _cl(post.logvar), atol=ATOL_ENC)
  # Scaled latents: the mean times the scaling factor; sampling needs a key and follows the posterior.
  z = V.encode(params, _cl(x), config=cfg)
  np.testing.assert_allclose(z, np.asarray(post_ours.mean) * cfg.scaling_factor, rtol=1e-6)
  with pytest.raises(ValueError, match="PRNG key"):
    V.encode(params, _cl(x), config=cfg, sample=True)
  zs = V.encode(params, _cl(x), config=cfg, sample=True, key=jax.random.key(0))
  eps = (np.asarray(zs) / cfg.scaling_factor - post_ours.mean) / post_ours.std
  assert abs(eps.mean()) < 0.2 and 0.8 < eps.std() < 1.2


def test_whole_clip_decode_matches_diffusers(tiny):
  model, cfg, params = tiny
  z = _randn(2, 4, 3, 4, 4, seed=2)
  ref, _ = model.decoder(z)
  out = V.decode(params, _cl(z) * cfg.scaling_factor, config=cfg, chunking="whole")
  assert out.shape == (2, 9, 32, 32, 3)
  np.testing.assert_allclose(out, _cl(ref), atol=ATOL_DEC)
  np.testing.assert_allclose(V.postprocess(out), np.clip((_cl(ref) + 1) / 2, 0, 1), atol=ATOL_DEC)


@pytest.mark.parametrize("impl", ["native", "taps"])
def test_conv3d_implementations_match_diffusers(tiny, impl):
  """Both causal 3D conv forms (one 3D conv; a sum of per-tap 2D convs) against diffusers, encode and
  decode, with the cache of a later chunk; 'auto' resolves by backend."""
  model, cfg, params = tiny
  cfg_i = dataclasses.replace(cfg, conv3d=impl)
  assert cfg_i.conv3d_impl() == impl
  x = _randn(1, 3, 9, 32, 32, seed=11)
  post = V.encode_posterior(params, _cl(x), config=cfg_i)
  np.testing.assert_allclose(post.mean, _cl(model.encode(x).latent_dist.mean), atol=ATOL_ENC)
  z = _randn(1, 4, 5, 4, 4, seed=12)
  ref0, cache = model.decoder(z[:, :, :3])
  ref1, _ = model.decoder(z[:, :, 3:5], conv_cache=cache)
  ours = V.decode(params, _cl(z) * cfg.scaling_factor, config=cfg_i, chunking="released")
  np.testing.assert_allclose(ours, _cl(torch.cat([ref0, ref1], dim=2)), atol=ATOL_DEC)


def test_conv3d_auto_dispatch(monkeypatch):
  cfg = V.VAEConfig(**TINY)
  assert cfg.conv3d == "auto" and cfg.conv3d_impl() == "taps"  # this test machine is CPU-only
  for backend, want in (("gpu", "native"), ("tpu", "native"), ("cpu", "taps")):
    monkeypatch.setattr(V.jax, "default_backend", lambda b=backend: b)
    assert cfg.conv3d_impl() == want
  with pytest.raises(ValueError, match="conv3d must be"):
    V.VAEConfig(conv3d="fft")


def test_released_chunked_decode(tiny):
  model, cfg, params = tiny
  z = _randn(2, 4, 7, 4, 4, seed=3)
  cache, outs = None, []
  for start, end in [(0, 3), (3, 5), (5, 7)]:  # SAT sample_video.py for 7 latent frames
    out, cache = model.decoder(z[:, :, start:end], conv_cache=cache)
    outs.append(out)
  ref = _cl(torch.cat(outs, dim=2))
  assert V.chunk_bounds(7, "released", 2) == [(0, 3), (3, 5), (5, 7)]
  assert V.chunk_bounds(13, "released", 2) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
  # decode runs the chunks as one jitted program: first chunk, then lax.scan carrying the conv caches.
  ours = np.asarray(V.make_decode(cfg, chunking="released")(params, _cl(z) * cfg.scaling_factor))
  assert ours.shape == (2, 25, 32, 32, 3)
  np.testing.assert_allclose(ours, ref, atol=ATOL_DEC)
  np.testing.assert_allclose(ours, _cl(model.decode(z).sample), atol=ATOL_DEC)  # same chunks for odd T
  # The unrolled chunk loop (what training differentiates through) is the same computation.
  unrolled = V.decode(params, _cl(z) * cfg.scaling_factor, config=cfg, chunking="released", scan_chunks=False)
  np.testing.assert_allclose(unrolled, ref, atol=ATOL_DEC)
  # Independent checks: causality, and per-chunk GroupNorm makes chunking matter.
  first = V.decode(params, _cl(z[:, :, :3]) * cfg.scaling_factor, config=cfg, chunking="whole")
  np.testing.assert_allclose(ours[:, :9], first, atol=ATOL_DEC)
  whole, _ = model.decoder(z)
  assert np.abs(ours - _cl(whole)).max() > 1e-2
  # The streaming form: one chunk at a time with the returned cache pytree.
  cache, outs = None, []
  for start, end in [(0, 3), (3, 5), (5, 7)]:
    out, cache = V.decode_chunk(params, _cl(z[:, :, start:end]) * cfg.scaling_factor, cache, config=cfg)
    outs.append(out)
  assert cache["up_blocks"]["1"]["1"]["conv2"].shape == (2, 2, 8, 8, 32)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), ref, atol=ATOL_DEC)
  with pytest.raises(ValueError, match="odd number of latent frames"):
    V.decode(params, np.zeros((1, 4, 4, 4, 4), np.float32), config=cfg)


def test_framewise_decode_even_frames_matches_diffusers(tiny):
  model, cfg, params = tiny
  z = _randn(2, 4, 4, 4, 4, seed=4)
  assert V.chunk_bounds(4, "framewise", 2) == [(0, 2), (2, 4)]
  ref = _cl(model.decode(z).sample)
  out = V.decode(params, _cl(z) * cfg.scaling_factor, config=cfg, chunking="framewise")
  assert out.shape == (2, 16, 32, 32, 3)
  np.testing.assert_allclose(out, ref, atol=ATOL_DEC)


def test_framewise_encode_matches_diffusers(tiny):
  model, cfg, params = tiny
  x = _randn(1, 3, 17, 32, 32, seed=5)
  assert V.chunk_bounds(17, "framewise", 8) == [(0, 9), (9, 17)]
  assert V.chunk_bounds(49, "framewise", 8)[:2] == [(0, 9), (9, 17)]
  post = model.encode(x).latent_dist
  ours = V.encode_posterior(params, _cl(x), config=cfg, chunking="framewise")
  assert ours.mean.shape == (1, 5, 4, 4, 4)
  np.testing.assert_allclose(ours.mean, _cl(post.mean), atol=ATOL_ENC)
  np.testing.assert_allclose(ours.logvar, _cl(post.logvar), atol=ATOL_ENC)


def test_tiled_decode_and_encode_match_diffusers(tiny):
  model, cfg, params = tiny
  tiling = V.TilingConfig(
    tile_sample_height=32, tile_sample_width=32, overlap_factor_height=0.25, overlap_factor_width=0.25
  )
  model.enable_tiling(
    tile_sample_min_height=32,
    tile_sample_min_width=32,
    tile_overlap_factor_height=0.25,
    tile_overlap_factor_width=0.25,
  )
  try:
    # Latent 3x8: one row, tiles at latent x = 0, 3, 6 (widths 4, 4, 2), blended over 8 pixels.
    z = _randn(1, 4, 3, 3, 8, seed=6)
    ref = _cl(model.decode(z).sample)
    out = V.decode(params, _cl(z) * cfg.scaling_factor, config=cfg, chunking="framewise", tiling=tiling)
    assert out.shape == ref.shape == (1, 9, 24, 64, 3)
    np.testing.assert_allclose(out, ref, atol=ATOL_DEC)
    # Pixels 24x64: tiles at x = 0, 24, 48 (widths 32, 32, 16), blended over 1 latent pixel.
    x = _randn(1, 3, 9, 24, 64, seed=7)
    post = model.encode(x).latent_dist
    ours = V.encode_posterior(params, _cl(x), config=cfg, chunking="framewise", tiling=tiling)
    assert ours.mean.shape == (1, 3, 3, 8, 4)
    np.testing.assert_allclose(ours.mean, _cl(post.mean), atol=ATOL_ENC)
    np.testing.assert_allclose(ours.logvar, _cl(post.logvar), atol=ATOL_ENC)
  finally:
    model.disable_tiling()


def test_streamed_tiled_decode_matches_diffusers_tiled_decode(tiny):
  """decode_streamed: one compiled decode_chunk call per video x tile x chunk (the bounded-memory
  path sample presets use) equals diffusers' tiled decode; 7 latent frames -> chunks [0:3] [3:5]
  [5:7] in both (diffusers decodes each tile 2 latent frames at a time, the first with 3)."""
  model, cfg, params = tiny
  tiling = V.TilingConfig(
    tile_sample_height=32, tile_sample_width=32, overlap_factor_height=0.25, overlap_factor_width=0.25
  )
  z = _randn(2, 4, 7, 3, 8, seed=8)
  model.enable_tiling(
    tile_sample_min_height=32,
    tile_sample_min_width=32,
    tile_overlap_factor_height=0.25,
    tile_overlap_factor_width=0.25,
  )
  try:
    ref = _cl(model.decode(z).sample)
  finally:
    model.disable_tiling()
  out = V.decode_streamed(params, _cl(z) * cfg.scaling_factor, config=cfg, tiling=tiling)
  assert out.shape == ref.shape == (2, 25, 24, 64, 3)
  np.testing.assert_allclose(out, ref, atol=ATOL_DEC)
  # Untiled, it is the released chunked decode.
  np.testing.assert_allclose(
    V.decode_streamed(params, _cl(z) * cfg.scaling_factor, config=cfg),
    V.decode(params, _cl(z) * cfg.scaling_factor, config=cfg),
    atol=1e-5,
  )
  # The distinct compiled steps (for memory checks): first chunk, then chunks with a cache.
  assert V.streamed_steps(cfg, (7, 3, 8, 4), tiling) == [((1, 3, 3, 4, 4), False), ((1, 2, 3, 4, 4), True)]
  assert V.streamed_steps(cfg, (13, 60, 90, 16)) == [((1, 3, 60, 90, 16), False), ((1, 2, 60, 90, 16), True)]


def _assert_same_params(a, b):
  fa, fb = dict(W.flatten(a)), dict(W.flatten(b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=".".join(k))


def test_diffusers_folder_and_converted_round_trip(tiny, tmp_path):
  model, cfg, params = tiny
  model.save_pretrained(tmp_path / "pipe" / "vae")
  cfg1, p1 = W.load(tmp_path / "pipe" / "vae")
  assert cfg1 == cfg
  _assert_same_params(p1, params)
  cfg2, p2 = W.load(tmp_path / "pipe")  # a pipeline folder holding vae/
  assert cfg2 == cfg
  W.save(tmp_path / "ours", cfg, p1, source="diffusers:test")
  meta = json.loads((tmp_path / "ours" / "metadata.json").read_text())
  assert meta["component"] == "vae" and meta["config"]["block_out_channels"] == [16, 32, 32, 32]
  cfg3, p3 = W.load(tmp_path / "ours")
  assert cfg3 == cfg
  _assert_same_params(p3, params)


def _to_sat_key(key: str) -> str:
  """diffusers -> SAT: the SAT renames undone (written independently of vae_weights.sat_key)."""
  m = re.match(r"decoder\.up_blocks\.(\d+)\.(.*)", key)
  if m:
    key = f"decoder.up.{3 - int(m.group(1))}.{m.group(2)}"
  for stage in ("encoder", "decoder"):
    for i in (0, 1):
      key = key.replace(f"{stage}.mid_block.resnets.{i}.", f"{stage}.mid.block_{i + 1}.")
  for new, old in (
    ("resnets.", "block."),
    ("down_blocks.", "down."),
    ("downsamplers.0", "downsample"),
    ("upsamplers.0", "upsample"),
    ("conv_shortcut", "nin_shortcut"),
  ):
    key = key.replace(new, old)
  return key


def _spec_sat_to_diffusers(key: str) -> str | None:
  """The SAT -> diffusers renames (docs/checkpoints.md, 'VAE keys') in order, drop 'loss' keys, then
  decoder.up.{k} -> up_blocks.{3-k}."""
  for old, new in (
    ("block.", "resnets."),
    ("down.", "down_blocks."),
    ("downsample", "downsamplers.0"),
    ("upsample", "upsamplers.0"),
    ("nin_shortcut", "conv_shortcut"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
  ):
    key = key.replace(old, new)
  if "loss" in key:
    return None
  m = re.match(r"decoder\.up\.(\d+)\.(.*)", key)
  return f"decoder.up_blocks.{3 - int(m.group(1))}.{m.group(2)}" if m else key


def test_sat_checkpoint_loads_and_matches(tiny, tmp_path):
  model, cfg, params = tiny
  sd = model.state_dict()
  sat = {_to_sat_key(k): v.clone() for k, v in sd.items()}
  assert {_spec_sat_to_diffusers(k) for k in sat} == set(sd)  # the test's SAT names obey the renames
  assert "decoder.up.0.block.0.nin_shortcut.weight" in sat and "encoder.mid.block_2.conv1.conv.weight" in sat
  assert all(W.sat_key(k, 4) == _to_sat_key(k) for k in sd)
  sat["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
  sat["loss.logvar"] = torch.zeros(())
  torch.save({"state_dict": sat, "global_step": 10}, tmp_path / "3d-vae.pt")
  cfg_sat, p_sat = W.load(tmp_path / "3d-vae.pt", norm_num_groups=8, sample_height=32, sample_width=32)
  assert cfg_sat == cfg
  _assert_same_params(p_sat, params)
  _, p_dir = W.load(tmp_path, config=cfg)  # a folder holding 3d-vae.pt
  _assert_same_params(p_dir, params)


def test_bad_keys_are_listed(tiny):
  model, cfg, _ = tiny
  sd = state_dict_numpy(model)
  sd.pop("decoder.up_blocks.1.upsamplers.0.conv.weight")
  sd["decoder.extra_layer.weight"] = np.zeros(3, np.float32)
  with pytest.raises(W.CheckpointKeyError) as err:
    W.from_diffusers(sd, cfg)
  msg = str(err.value)
  assert "decoder.up_blocks.1.upsamplers.0.conv.weight" in msg and "decoder.extra_layer.weight" in msg
  bad_shape = state_dict_numpy(model)
  bad_shape["encoder.conv_in.conv.bias"] = np.zeros(5, np.float32)
  with pytest.raises(W.CheckpointKeyError, match="encoder.conv_in.bias"):
    W.from_diffusers(bad_shape, cfg)
  sat = {W.sat_key(k, 4): v for k, v in state_dict_numpy(model).items()}
  sat["encoder.down.0.block.0.temb_proj.weight"] = np.zeros((16, 8), np.float32)
  with pytest.raises(W.CheckpointKeyError, match="temb_proj"):
    W.from_sat(sat, cfg)
  with pytest.raises(ValueError, match="use_quant_conv"):
    W.config_from_diffusers({**dict(model.config), "use_quant_conv": True})
