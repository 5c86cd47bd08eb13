"""Tests for the procedural demo domain (repvideo_jax.demo.domain)."""

import numpy as np
import pytest

from repvideo_jax.data.prepare import read_captions
from repvideo_jax.demo import domain
from repvideo_jax.demo.domain import (
  COLORS,
  MOTIONS,
  PALETTE,
  SHAPES,
  Spec,
  all_specs,
  caption,
  detect,
  render,
  score,
  split_specs,
  write_dataset,
)
from repvideo_jax.video_io import probe, read_video


def _centroids(frames):
  fg = frames.max(axis=-1) > 0
  out = []
  for m in fg:
    ys, xs = np.nonzero(m)
    out.append((xs.mean(), ys.mean(), len(xs)))
  return np.array(out)


def test_caption_templates():
  assert caption(Spec("circle", "red", "moving left")) == "a red circle moving left on a black background"
  assert caption(Spec("triangle", "white", "growing")) == "a white triangle growing on a black background"
  caps = {caption(s) for s in all_specs()}
  assert len(caps) == len(SHAPES) * len(COLORS) * len(MOTIONS) == len(all_specs())


def test_spec_validates():
  with pytest.raises(ValueError):
    Spec("hexagon", "red", "growing")
  with pytest.raises(ValueError):
    Spec("circle", "purple", "growing")
  with pytest.raises(ValueError):
    Spec("circle", "red", "spinning")


def test_render_deterministic_and_exact_colours():
  spec = Spec("square", "yellow", "moving right")
  a = render(spec, num_frames=6, height=48, width=64, seed=3)
  b = render(spec, num_frames=6, height=48, width=64, seed=3)
  c = render(spec, num_frames=6, height=48, width=64, seed=4)
  assert a.shape == (6, 48, 64, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for color in COLORS:
    f = render(Spec("circle", color, "growing"), seed=1)
    pixels = {tuple(p) for p in f.reshape(-1, 3)}
    assert pixels == {(0, 0, 0), PALETTE[color]}
  assert PALETTE["red"] == (255, 0, 0) and PALETTE["white"] == (255, 255, 255)


@pytest.mark.parametrize("motion", MOTIONS)
def test_motion_direction_from_centroid(motion):
  for shape in SHAPES:
    for seed in range(3):
      f = render(Spec(shape, "green", motion), num_frames=9, height=64, width=64, seed=seed)
      c = _centroids(f)
      assert (c[:, 2] > 0).all(), "object must be visible in every frame"
      # never touching the border, so the whole object stays in frame
      fg = f.max(axis=-1) > 0
      assert not fg[:, 0].any() and not fg[:, -1].any()
      assert not fg[:, :, 0].any() and not fg[:, :, -1].any()
      dx, dy = c[-1, 0] - c[0, 0], c[-1, 1] - c[0, 1]
      area = c[:, 2]
      if motion == "moving left":
        assert dx < -10 and abs(dy) < 1 and np.all(np.diff(c[:, 0]) < 0)
      elif motion == "moving right":
        assert dx > 10 and abs(dy) < 1 and np.all(np.diff(c[:, 0]) > 0)
      elif motion == "moving up":
        assert dy < -10 and abs(dx) < 1 and np.all(np.diff(c[:, 1]) < 0)
      elif motion == "moving down":
        assert dy > 10 and abs(dx) < 1 and np.all(np.diff(c[:, 1]) > 0)
      elif motion == "growing":
        assert np.all(np.diff(area) >= 0) and area[-1] > 3 * area[0]
      else:
        assert np.all(np.diff(area) <= 0) and area[0] > 3 * area[-1]


def test_split_property():
  train, held = split_specs(seed=0, holdout_fraction=0.2)
  assert len(held) == round(0.2 * len(all_specs()))
  assert set(train).isdisjoint(held)
  assert set(train) | set(held) == set(all_specs())
  assert set(s.shape for s in train) == set(SHAPES)
  assert set(s.color for s in train) == set(COLORS)
  assert set(s.motion for s in train) == set(MOTIONS)
  train_caps = {caption(s) for s in train}
  assert not any(caption(s) in train_caps for s in held)
  assert split_specs(seed=0) == (train, held)
  other = split_specs(seed=1)[1]
  assert set(other) != set(held)
  for frac in (0.0, 0.5):
    tr, ho = split_specs(seed=2, holdout_fraction=frac)
    assert set(tr).isdisjoint(ho)
    for attr, values in (("shape", SHAPES), ("color", COLORS), ("motion", MOTIONS)):
      assert {getattr(s, attr) for s in tr} == set(values)


@pytest.mark.parametrize("size", [(64, 64), (32, 32), (48, 64)])
def test_detectors_recover_all_specs(size):
  h, w = size
  for spec in all_specs():
    for seed in range(3):
      d = detect(render(spec, num_frames=5, height=h, width=w, seed=seed))
      assert score(spec, d) == {"color": 1, "shape": 1, "motion": 1}, (spec, seed, d)


def test_detect_empty_and_score():
  d = detect(np.zeros((4, 32, 32, 3), np.uint8))
  assert d == {"color": None, "shape": None, "motion": None}
  assert score(Spec("circle", "red", "growing"), d) == {"color": 0, "shape": 0, "motion": 0}
  s = Spec("circle", "red", "growing")
  assert score(s, {"color": "red", "shape": "square", "motion": "growing"}) == {
    "color": 1,
    "shape": 0,
    "motion": 1,
  }


def test_write_dataset(tmp_path):
  specs = [Spec("circle", "red", "moving left"), Spec("triangle", "blue", "shrinking")]
  csv_path = write_dataset(tmp_path, specs, per_spec=2, num_frames=7, height=64, width=64, fps=8, seed=5)
  entries = read_captions(csv_path)
  assert len(entries) == 4
  assert [e.caption for e in entries] == [caption(s) for s in specs for _ in range(2)]
  for e, spec in zip(entries, [s for s in specs for _ in range(2)]):
    path = tmp_path / e.path
    info = probe(path)
    assert (info.frames, info.height, info.width) == (7, 64, 64)
    frames, fps = read_video(path)
    assert frames.shape == (7, 64, 64, 3) and fps == pytest.approx(8)
    # the detectors survive H.264 compression
    assert score(spec, detect(frames)) == {"color": 1, "shape": 1, "motion": 1}
  # two clips of one spec differ (different seeds)
  a, _ = read_video(tmp_path / entries[0].path)
  b, _ = read_video(tmp_path / entries[1].path)
  assert not np.array_equal(a, b)


def test_render_rejects_bad_sizes():
  with pytest.raises(ValueError):
    render(Spec("circle", "red", "growing"), num_frames=1)
  with pytest.raises(ValueError):
    render(Spec("circle", "red", "growing"), height=16, width=16)
  assert domain.BACKGROUND == "black"
