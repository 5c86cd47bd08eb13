"""The demo's README figures (repvideo_jax.demo.figures): frame strips and per-layer similarity."""

import json
import math
import statistics

import numpy as np
import pytest
from PIL import Image

from repvideo_jax import pipeline
from repvideo_jax.demo import demo_model_dir, figures
from repvideo_jax.demo import domain as D


def test_default_prompts_are_held_out_one_per_shape():
  prompts = figures.default_prompts()
  specs = [D.parse_caption(p) for p in prompts]
  _, held = D.split_specs(0)
  assert all(s in held for s in specs)
  assert [s.shape for s in specs] == list(D.SHAPES)


def _eval(per_video):
  return {"videos": [{"feature_similarity_per_layer": list(r)} for r in per_video]}


def test_layer_curves_mean_and_standard_error():
  rows = [[0.5, 0.9, 0.7], [0.7, 0.8, 0.1], [0.6, 1.0, 0.4]]
  curves = figures.layer_curves({"on": _eval(rows)})
  for layer in range(3):
    column = [r[layer] for r in rows]
    assert curves["on"]["mean"][layer] == pytest.approx(statistics.fmean(column), abs=1e-12)
    assert curves["on"]["stderr"][layer] == pytest.approx(statistics.stdev(column) / math.sqrt(3), abs=1e-12)
  assert curves["on"]["videos"] == 3
  with pytest.raises(ValueError, match="rerun python -m repvideo_jax.evaluate"):
    figures.layer_curves({"old": {"videos": [{"feature_similarity": 0.5}]}})


def test_layers_command_writes_a_png(tmp_path, capsys):
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(_eval([[0.5, 0.6], [0.7, 0.8]])))
  b.write_text(json.dumps(_eval([[0.4, 0.5], [0.6, 0.6]])))
  out = tmp_path / "layers.png"
  assert figures.main(["layers", f"cache-on={a}", f"cache-off={b}", "--out", str(out)]) == 0
  assert Image.open(out).size[0] > 100
  printed = capsys.readouterr().out.splitlines()
  assert printed == ["cache-on 0.600 0.700", "cache-off 0.500 0.550"]
  assert figures.main(["layers", str(a), "--out", str(out)]) == 2
  assert "expected LABEL=EVAL.json" in capsys.readouterr().err


def test_strip_shows_the_generated_video_and_the_real_render(tmp_path):
  pipe = pipeline.load_pipeline(demo_model_dir())
  settings = pipeline.settings_for(pipe, seed=3, steps=2)
  prompts = figures.default_prompts()[:2]
  frames = figures.strip_frames(pipe, prompts, settings, every=4)
  video = pipeline.generate(pipe, prompts, settings)
  np.testing.assert_array_equal(frames["generated"], video[:, ::4])
  for i, text in enumerate(prompts):
    real = D.render(D.parse_caption(text), num_frames=17, height=64, width=64, seed=figures.REAL_SEED)
    np.testing.assert_array_equal(frames["real"][i], real[::4])
  assert frames["real"].shape == (2, 5, 64, 64, 3)
  out = tmp_path / "strip.png"
  figures.save_strip(frames, prompts, out, every=4)
  assert Image.open(out).size[1] > 200
  with pytest.raises(ValueError, match="not a demo caption"):
    figures.strip_frames(pipe, ["a cat"], settings)
