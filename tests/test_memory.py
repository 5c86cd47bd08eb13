"""Memory plan of generation (repvideo_jax.memory): weights placed once and moved out by the offload
mode, the VAE tiled when the untiled decode would not fit, and the same frames whatever the plan.

Frames are compared exactly (uint8, equal) across offload modes: residency changes where the weights
are, never the numbers. The auto-tiled decode is compared with ``vae.decode_streamed``, which
test_vae checks against diffusers' tiled decode.
"""

import dataclasses
import types

import jax
import numpy as np
import pytest
from reference_models import tiny_cogvideox_folder

from repvideo_jax import memory, pipeline
from repvideo_jax import vae as V

SETTINGS = pipeline.GenerationSettings(num_frames=9, height=64, width=64, steps=2, guidance=6.0)
PROMPTS = ["a red circle moving left", "blue ocean waves at night"]
GIB = 1 << 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root, _ = tiny_cogvideox_folder(tmp_path_factory.mktemp("cog"), seed=3)
  return root


@pytest.mark.parametrize(
  "weights, capacity, expected",
  [  # usable = 0.75 * capacity; resident at most: none = all, text = max(T5, transformer + VAE)
    ({"text_encoder": 9, "transformer": 3, "vae": 1}, 24, "none"),  # 13 <= 18
    ({"text_encoder": 9, "transformer": 3, "vae": 1}, 16, "text"),  # 13 > 12; max(9, 4) <= 12
    ({"text_encoder": 9, "transformer": 3, "vae": 1}, 12, "text"),  # max(9, 4) <= 9, at the edge
    ({"text_encoder": 10, "transformer": 3, "vae": 1}, 12, "stage"),  # max(10, 4) > 9
    ({"text_encoder": 1, "transformer": 8, "vae": 2}, 12, "stage"),  # max(1, 10) > 9
    ({"text_encoder": 30, "transformer": 8, "vae": 2}, 12, "stage"),  # nothing fits: the lightest
  ],
)
def test_choose_offload(weights, capacity, expected):
  assert memory.choose_offload(weights, capacity) == expected


def test_auto_keeps_everything_on_cpu():
  """On a CPU backend the device is host memory: auto keeps every model whatever their size, and
  make_room moves nothing (a move would copy within the same RAM)."""
  huge = {"w": jax.ShapeDtypeStruct((1 << 40,), np.float32)}  # 4 TiB of weights, never allocated
  pipe = types.SimpleNamespace(text_encoder_params=huge, transformer_params=huge, vae_params=huge)
  res = memory.Residency(pipe, "auto")
  assert res.device.platform == "cpu" and res.mode == "none"
  assert memory.choose_offload(res.weights, res.capacity) == "stage"  # what a device that size gets
  assert res.make_room("vae", need=1 << 60) == []


def test_resident_sets():
  assert memory.resident_during("stage") == {c: (c,) for c in memory.COMPONENTS}
  assert "text_encoder" not in memory.resident_during("text")["transformer"]
  assert set(memory.resident_during("none")["vae"]) == set(memory.COMPONENTS)
  with pytest.raises(ValueError, match="offload must be one of"):
    memory.resident_during("auto")
  with pytest.raises(ValueError, match="offload must be one of"):
    memory.Residency(object(), "sometimes")


def test_weights_copied_once_and_frames_equal_across_offload_modes(folder):
  frames, copies = {}, {}
  for mode in ("none", "text", "stage"):
    pipe = pipeline.load_pipeline(folder)
    batches, per_batch = [], []
    for i, prompt in enumerate(PROMPTS):  # two batches of one prompt each, as sample.py runs them
      timings = {}
      batches.append(
        pipeline.generate(pipe, [prompt], SETTINGS, offload=mode, timings=timings, first_index=i)
      )
      per_batch.append(timings["memory"])
    frames[mode] = np.concatenate(batches)
    copies[mode] = per_batch
    res = pipe.residency()
    assert res.mode == mode and timings["memory"]["offload"] == mode
    # what is on the device now is a jax.Array; what was moved out is numpy again
    for name in memory.COMPONENTS:
      leaf = jax.tree.leaves(getattr(pipe, f"{name}_params"))[0]
      assert isinstance(leaf, jax.Array) == (name in res.placed), (mode, name)
  for mode in ("text", "stage"):
    np.testing.assert_array_equal(frames[mode], frames["none"])
  ins = lambda m, b: sorted(c["component"] for c in copies[m][b]["copies"] if c["direction"] == "in")
  outs = lambda m, b: sorted(c["component"] for c in copies[m][b]["copies"] if c["direction"] == "out")
  every = sorted(memory.COMPONENTS)
  # none: each model copied in once, in the first batch; nothing in the second, nothing out
  assert ins("none", 0) == every and ins("none", 1) == [] and outs("none", 0) == outs("none", 1) == []
  # text: T5 is alone on the device; called batch by batch, generate swaps it with the transformer
  # and VAE in every batch (sample.py encodes every prompt first: tested in test_sample_cli)
  assert outs("text", 0) == ["text_encoder"] and ins("text", 1) == every and outs("text", 1) == every
  # stage: every stage swaps its model in; the transformer and VAE take turns in every batch
  assert ins("stage", 1) == every and sorted(outs("stage", 1)) == every
  assert copies["none"][1]["copied_in_gib"] == 0
  assert copies["stage"][1]["copied_in_gib"] == pytest.approx(
    sum(copies["stage"][1]["weights_gib"].values()), abs=2e-3
  )


def test_release_frees_device_buffers(folder):
  pipe = pipeline.load_pipeline(folder)
  res = pipe.residency("none")
  placed = res.place("transformer")
  leaves = jax.tree.leaves(placed)
  assert all(isinstance(x, jax.Array) for x in leaves)
  before = [np.asarray(x).copy() for x in leaves]
  res.release("transformer")
  assert all(x.is_deleted() for x in leaves)
  host = jax.tree.leaves(pipe.transformer_params)
  assert all(type(x) is np.ndarray for x in host)
  for a, b in zip(before, host, strict=True):
    np.testing.assert_array_equal(a, b)
  assert res.place("transformer") is pipe.transformer_params and "transformer" in res.placed
  # A copy of the pipeline (dataclasses.replace, as evaluate and the trainer make) shares the placed
  # arrays; moving its transformer out must not free the buffers the original still uses.
  copy = dataclasses.replace(pipe)
  assert copy.residency("stage") is not res
  copy.residency().stage("transformer")
  copy.residency().stage("vae")  # the copy's transformer leaves
  assert type(jax.tree.leaves(copy.transformer_params)[0]) is np.ndarray
  assert not any(x.is_deleted() for x in jax.tree.leaves(pipe.transformer_params))


def test_vae_tiling_auto_follows_free_memory(folder, monkeypatch):
  pipe = pipeline.load_pipeline(folder)
  z = np.random.default_rng(0).normal(size=(1, 3, 8, 8, pipe.vae_config.latent_channels)).astype(np.float32)
  need = pipeline.untiled_decode_bytes(pipe, z)
  # the compiler's figure grows with the video: 5 latent frames need more than 3
  z5 = np.concatenate([z, z[:, :2]], axis=1)
  assert pipeline.untiled_decode_bytes(pipe, z5) > need > 0
  tile = V.TilingConfig(32, 32, 0.25, 0.25)  # 2 x 2 tiles of 4 latents, stride 3, blend 8 pixels
  untiled = np.asarray(V.decode(pipe.vae_params, z, config=pipe.vae_config, chunking="released"))
  tiled = np.asarray(V.decode_streamed(pipe.vae_params, z, config=pipe.vae_config, tiling=tile))
  assert np.abs(tiled - untiled).max() > 1e-4  # the two decodes differ, so the choice is visible
  # on CPU nothing is moved to make room (host memory is the device); pretend an accelerator here
  monkeypatch.setattr(memory.Residency, "moves_free_memory", lambda self: True)
  step = pipeline.tiled_step_bytes(pipe, z, tile)
  assert 0 < step < need  # one tile's first chunk needs less than the whole decode
  res = pipe.residency("none")
  cases = (  # free memory -> tiling, models moved out for the decode (the transformer is placed)
    (need * 10.0, "off", [], untiled),
    (need * 1.2, "on", [], tiled),  # 0.9 * need < need, and the tile step fits
    (step, "on", ["transformer"], tiled),  # even the tile step needs more than 3/4 of what is free
  )
  for free, expected, moved, ref in cases:
    res.place("transformer")
    monkeypatch.setattr(memory, "free_bytes", lambda device=None, free=free: free)
    info = {}
    out = np.asarray(pipeline.decode_latents(pipe, z, tiling="auto", tile=tile, info=info))
    assert info["vae_tiling"] == expected and info["vae_tiling_requested"] == "auto"
    assert info["untiled_decode_gib"] == pytest.approx(need / GIB, abs=1e-3)
    assert info["moved_out_for_decode"] == moved
    assert ("transformer" in res.placed) == (not moved)
    np.testing.assert_allclose(out, ref, atol=1e-5)
  with pytest.raises(ValueError, match="vae_tiling must be one of"):
    pipeline.decode_latents(pipe, z, tiling="sometimes")
  # tiles whose strides do not meet the crops would silently decode untiled: refused instead
  with pytest.raises(ValueError, match="do not meet evenly"):
    pipeline.decode_latents(pipe, z, tiling="on", tile=V.TilingConfig(32, 32))
