"""The demo model's retraining recipe: its first steps run end to end and every part's loss falls.

``python -m repvideo_jax.demo.build`` with configs/demo.yaml, shortened by overrides (one clip per
combination, a few dozen steps per part): data -> tokenizer -> T5 -> VAE -> data.prepare ->
train.py -> the shape tuning of transformer and decoder -> a model folder that sample.py can use. Also: a killed build resumes, and a changed
config is refused rather than mixed with the old stages.
"""

import json
import re

import jax
import numpy as np
import pytest

from repvideo_jax import pipeline, transformer_weights, vae_weights
from repvideo_jax.demo import build
from repvideo_jax.training import trainer

FIRST_STEPS = [
  "dataset.per_spec=1",
  "text_training.steps=30",
  "text_training.log_every=1",
  "vae_training.steps=24",
  "vae_training.image_steps=12",
  "vae_training.log_every=1",
  "vae_training.warmup_steps=2",
  "vae_tuning.standardize=true",
  "vae_tuning.joint_steps=4",
  "vae_tuning.steps=6",
  "vae_tuning.log_every=1",
  "vae_tuning.warmup_steps=2",
  "vae_tuning.crisp_weight=1",
  "train.run.steps=30",
  "train.run.log_every=1",
  "train.run.save_every=15",
  "train.optim.warmup_steps=5",
  "train.optim.total_steps=30",
  # The recipe's shape stages, shortened: two phases and two rounds.
  "transformer_tuning.mix=[0.5,0.75]",
  "transformer_tuning.mix_min_t=[200,50]",
  "transformer_tuning.steps=4",
  "transformer_tuning.warmup_steps=1",
  "transformer_tuning.pairs=2",
  "transformer_tuning.records_batch=2",
  "transformer_tuning.paths=1",
  "transformer_tuning.log_every=1",
  "decoder_fitting.rounds=[3,2]",
  "decoder_fitting.per_frame=[false,true]",
  "decoder_fitting.square_weight=[1,3]",
  "decoder_fitting.samples=4",
  "decoder_fitting.sample_batch=4",
  "decoder_fitting.batch_size=2",
  "decoder_fitting.real_batch=1",
  "decoder_fitting.warmup_steps=1",
  "decoder_fitting.log_every=1",
  "generation.steps=10",
]


def _losses(path):
  return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _falls(losses, n=5, factor=0.8):
  return np.mean(losses[-n:]) < factor * np.mean(losses[:n])


@pytest.mark.slow
def test_first_steps_of_the_recipe_lower_every_loss(tmp_path):
  out = tmp_path / "demo"
  recipe = build.load_recipe("demo", FIRST_STEPS)
  model = build.build(recipe, out, progress=False)
  text = _losses(out / "text_encoder" / "run" / "log.jsonl")
  vae_rows = [json.loads(line) for line in (out / "vae" / "run" / "log.jsonl").read_text().splitlines()]
  images = [r["loss"] for r in vae_rows if r["step"] <= 12]
  train_log = (out / "model" / "train.log").read_text()
  transformer = [float(x) for x in re.findall(r"^step \d+/30 loss ([0-9.]+)", train_log, flags=re.M)]
  assert len(transformer) == 30, train_log[-2000:]
  assert _falls(text), text
  assert _falls(images, n=3), images
  assert _falls(transformer), transformer

  # The result is a model folder with the recipe's generation defaults and the held-out split.
  pipe = pipeline.load_pipeline(model)
  defaults = pipeline.model_defaults(pipe)
  assert (defaults["num_frames"], defaults["height"], defaults["width"]) == (17, 64, 64)
  assert pipe.transformer_config.feature_cache and pipe.transformer_config.num_layers == 12
  from repvideo_jax.demo import domain as D

  assert pipe.manifest["source"]["heldout"] == [D.caption(s) for s in D.split_specs(0)[1]]
  held = set(pipe.manifest["source"]["heldout"])
  with open(out / "data" / "captions.csv") as f:
    trained = {line.split(",", 1)[1].strip() for line in f.read().splitlines()[1:]}
  assert trained and not trained & held  # no held-out caption was trained on
  # The model's VAE is the tuned one: its latents standardized, the whole VAE tuned on noisy latents
  # and standardized again (scale measured again) before the records, its decoder tuned after
  # them; the encoder that made the records is the model's.
  tuning = json.loads((out / "vae_tuning" / "stage.json").read_text())
  assert pipe.vae_config.scaling_factor == pytest.approx(tuning["scaling_factor"])
  assert len(tuning["channel_std"]) == pipe.vae_config.latent_channels
  assert [r["step"] for r in _rows(out / "vae_tuning" / "run" / "log.jsonl")] == [1, 2, 3, 4]
  assert tuning["joint_last_loss"] > 0
  rows = _rows(out / "decoder" / "run" / "log.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["crisp"] > 0 for r in rows)
  trained_vae = vae_weights.load(out / "vae" / "weights")[1]
  standardized = vae_weights.load(out / "vae_tuning" / "weights")[1]
  tuned = vae_weights.load(out / "decoder" / "weights")[1]
  records_vae = vae_weights.load(out / "encoders" / "vae")[1]

  def same(x, y):
    return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))

  assert not same(trained_vae["encoder"], standardized["encoder"])  # rewritten by the standardization
  assert same(standardized["encoder"], records_vae["encoder"]) and same(
    tuned["encoder"], records_vae["encoder"]
  )
  assert not same(standardized["decoder"], tuned["decoder"])  # tuned
  # The shape tuning: the model's transformer is the paired-loss continuation (two phases, from the
  # run's EMA), its decoder the one fitted to that transformer's samples (two rounds, from the tuned
  # decoder); the encoder is still the records'.
  tuning = out / "model" / "tuning"
  assert [[r["step"] for r in _rows(tuning / f"phase{i}" / "log.jsonl")] for i in (0, 1)] == [
    [1, 2, 3, 4]
  ] * 2
  assert all(r["pair"] > 0 and r["mse"] > 0 for r in _rows(tuning / "phase0" / "log.jsonl"))
  tuned_t = transformer_weights.load(tuning / "transformer")[1]
  run_cfg, state, _ = trainer.load_run(out / "model" / "run")
  assert not same(tuned_t, state["ema"])
  for a, b in zip(jax.tree.leaves(pipe.transformer_params), jax.tree.leaves(tuned_t)):
    np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32))
  fitting = out / "model" / "decoder_fitting"
  assert np.load(fitting / "samples.npy").shape == (4, 5, 8, 8, 8)
  assert [[r["step"] for r in _rows(fitting / f"round{i}" / "log.jsonl")] for i in (0, 1)] == [
    [1, 2, 3],
    [1, 2],
  ]
  fitted = vae_weights.load(fitting / "weights")[1]
  assert same(fitted["encoder"], records_vae["encoder"]) and not same(fitted["decoder"], tuned["decoder"])
  for a, b in zip(jax.tree.leaves(pipe.vae_params), jax.tree.leaves(fitted)):  # stored as float16
    np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32))

  # Every stage's time is recorded; a re-run finds every stage complete and rebuilds the same model
  # (adding only its checks to the times); a changed stage config is refused.
  first = build.stage_times(out)
  assert list(first) == [
    "data",
    "tokenizer",
    "text_encoder",
    "vae",
    "vae_tuning",
    "encoders",
    "records",
    "decoder",
  ] + [f"model/{s}" for s in ("transformer", "tuning", "decoder_fitting", "model", "install")]
  assert first["vae"] > 1 and first["model/transformer"] > 1 and first["model/decoder_fitting"] > 1
  again = build.build(recipe, out, progress=False)
  assert again == model
  second = build.stage_times(out)
  assert all(0 <= second[k] - first[k] < 5 for k in first)
  rows = [json.loads(line) for line in (out / build.TIMINGS).read_text().splitlines()]
  assert len(rows) == 2 * len(first) and all(r["completed"] for r in rows)
  # A changed stage config is refused by the first stage that depends on it. The joint tuning
  # changes the encoder, so vae_tuning refuses a change to it; only the decoder stage depends on the
  # decoder's own tuning (the records and the transformer do not); the shape tuning stages refuse
  # their own sections; a changed train section asks for another --name.
  for override, refusal in [
    ("vae_training.lr=1e-3", "was built from a different vae config"),
    ("vae_tuning.joint_noise=0.3", "vae_tuning was built from a different vae_tuning config"),
    ("vae_tuning.crisp_weight=2", "decoder was built from a different decoder config"),
    ("transformer_tuning.pair_weight=2", "tuning was built from a different tuning config"),
    ("decoder_fitting.crisp_weight=2", "decoder_fitting was built from a different decoder_fitting config"),
    ("train.run.steps=31", "different train config; use another --name"),
  ]:
    with pytest.raises(ValueError, match=refusal):
      build.build(build.load_recipe("demo", FIRST_STEPS + [override]), out, progress=False)

  # --base: that model folder stands in for the training stages; the shape stages continue its
  # transformer and decoder on records its own VAE encodes. Another recipe for those stages is
  # refused before anything is written.
  based = tmp_path / "based"
  again_steps = FIRST_STEPS + [
    "transformer_tuning.steps=2",
    "decoder_fitting.rounds=[2]",
    "decoder_fitting.per_frame=false",
    "decoder_fitting.square_weight=1",
  ]
  with pytest.raises(ValueError, match=r"built with another recipe \(vae_training.lr: built 0.004"):
    build.build(build.load_recipe("demo", again_steps + ["vae_training.lr=1e-3"]), based, base=model)
  assert not based.exists()
  tuned_model = build.build(build.load_recipe("demo", again_steps), based, progress=False, base=model)
  assert list(build.stage_times(based)) == ["data", "base", "records"] + [
    f"model/{s}" for s in ("tuning", "decoder_fitting", "model", "install")
  ]
  assert [
    [r["step"] for r in _rows(based / "model" / "tuning" / f"phase{i}" / "log.jsonl")] for i in (0, 1)
  ] == [[1, 2]] * 2
  again_pipe = pipeline.load_pipeline(tuned_model)
  assert same(again_pipe.vae_params["encoder"], pipe.vae_params["encoder"])
  assert not same(again_pipe.vae_params["decoder"], pipe.vae_params["decoder"])
  assert not same(again_pipe.transformer_params, pipe.transformer_params)
  source = again_pipe.manifest["source"]
  assert source["base"] == pipe.manifest["source"] and "--base" in source["command"]


def test_recipe_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown section"):
    build.load_recipe("demo", ["bogus.key=1"])
  with pytest.raises(FileNotFoundError, match="not found"):
    build.load_recipe("no-such-recipe")
  assert build.main(["--out", str(tmp_path), "vae.unknown_field=3"]) == 2
  # --base: a missing folder, or one without a build record, is refused before anything is written.
  assert build.main(["--out", str(tmp_path / "a"), "--base", str(tmp_path / "none")]) == 2
  (tmp_path / "foreign").mkdir()
  assert build.main(["--out", str(tmp_path / "b"), "--base", str(tmp_path / "foreign")]) == 2
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bundled_model_is_a_base_for_the_recipe():
  """The bundled model was built with configs/demo.yaml's training sections: --base accepts it."""
  b = build.Build(build.load_recipe("demo"), "unused", base=build.MODEL_DIR)
  assert build._base_source(b)["config"]["dataset"] == b.recipe["dataset"]
  b = build.Build(build.load_recipe("demo", ["train.run.steps=7"]), "unused", base=build.MODEL_DIR)
  with pytest.raises(ValueError, match="train.run.steps: built 2400, asked 7"):
    build._base_source(b)


def test_install_puts_the_model_in_place_and_a_variant_as_a_whole_model_folder(tmp_path, monkeypatch):
  """--install: the model replaces the bundled folder and keeps its ablations; a variant's folder,
  its own VAE included, becomes ablations/<name>."""
  bundled = tmp_path / "bundled"
  (bundled / "ablations" / "older").mkdir(parents=True)
  (bundled / "ablations" / "older" / "x").write_text("kept")
  (bundled / "stale").write_text("gone")
  monkeypatch.setattr(build, "MODEL_DIR", bundled)

  def folder(name, vae):
    model = tmp_path / name
    for part, text in [("tokenizer", "tok"), ("text_encoder", "t5"), ("vae", vae), ("transformer", name)]:
      (model / part).mkdir(parents=True)
      (model / part / "w").write_text(text)
    (model / "pipeline.json").write_text("{}")
    return model

  b = build.Build(build.load_recipe("demo"), tmp_path / "out", name="nocache", install=True)
  b.model = folder("nocache", "its own vae")
  build.stage_install(b)
  ablation = bundled / "ablations" / "nocache"
  assert sorted(p.name for p in ablation.iterdir()) == sorted(p.name for p in b.model.iterdir())
  assert (ablation / "vae" / "w").read_text() == "its own vae" and (bundled / "stale").exists()
  b = build.Build(build.load_recipe("demo"), tmp_path / "out", install=True)
  b.model = folder("model", "vae")
  build.stage_install(b)
  assert (bundled / "transformer" / "w").read_text() == "model" and not (bundled / "stale").exists()
  assert (bundled / "ablations" / "older" / "x").read_text() == "kept"
  assert (bundled / "ablations" / "nocache" / "vae" / "w").read_text() == "its own vae"
