"""Builds the demo model from nothing: data, tokenizer, T5, VAE, transformer (the recipe is one config).

    python -m repvideo_jax.demo.build                     # configs/demo.yaml -> runs/demo/model
    python -m repvideo_jax.demo.build --out runs/demo --install       # ... and replace the bundled model
    python -m repvideo_jax.demo.build --name nocache train.transformer.feature_cache=false --install
        # the cache-off ablation on the same data and encoders -> bundled as ablations/nocache/transformer

Stages, each in its own folder under ``--out`` and skipped when already complete (so a killed build
resumes; the transformer resumes from its last checkpoint):
  data          ``demo.write_dataset``: ``dataset.per_spec`` clips of every train-split combination
  tokenizer     a sentencepiece model trained on the train captions (``text_training.train_tokenizer``)
  text_encoder  the T5 encoder pretrained on the train captions (``text_training.pretrain_encoder``)
  vae           the VAE trained on freshly rendered train-split clips (``vae_training.train``)
  encoders      a model folder of the three plus an untrained transformer (what data.prepare reads)
  records       ``python -m repvideo_jax.data.prepare`` on the dataset with those encoders
  <name>/run    ``train.py --config <name>/train.yaml``: the ``train`` section of the recipe
  <name>/model  the finished model folder (pipeline.json with the ``generation`` defaults)
Every stage records the part of the config it was built from; re-running with a different one is
refused (use a new ``--out``, or ``--name`` for a different transformer on the same data).

Overrides: ``section.key=value`` on the recipe, e.g. ``train.run.steps=100 vae_training.steps=50``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
import yaml

from repvideo_jax import config as config_lib
from repvideo_jax.demo import domain as D

log = logging.getLogger(__name__)
REPO = pathlib.Path(__file__).resolve().parents[2]
SECTIONS = ("dataset", "tokenizer", "text_encoder", "text_training", "vae", "vae_training", "train",
            "generation")
SCALARS = {"storage_dtype": "float32"}  # top-level recipe settings besides the sections


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  frames: int = 17
  height: int = 64
  width: int = 64
  fps: float = 8.0
  per_spec: int = 40  # training clips per train-split (shape, colour, motion) combination
  seed: int = 0
  split_seed: int = 0
  holdout_fraction: float = 0.2


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  vocab_size: int = 64  # an upper bound
  model_type: str = "word"  # sentencepiece model type: word, unigram, bpe or char


def load_recipe(name_or_path: str = "demo", overrides=()) -> dict[str, Any]:
  """The recipe as a nested dict (every section present), with ``section.key=value`` overrides."""
  tree = {**SCALARS, **config_lib.load_yaml(name_or_path, overrides)}
  unknown = sorted(set(tree) - set(SECTIONS) - set(SCALARS))
  if unknown:
    raise ValueError(f"{name_or_path}: unknown section(s) {unknown}; a recipe has {list(SECTIONS)} "
                     f"and {list(SCALARS)}")
  missing = [s for s in SECTIONS if s not in tree]
  if missing:
    raise ValueError(f"{name_or_path}: missing section(s) {missing}")
  _validate(tree, str(name_or_path))
  return tree


def _validate(tree: dict[str, Any], where: str) -> None:
  """Builds every section's typed config once, so a typo fails now, not an hour into the build."""
  from repvideo_jax import pipeline as P
  from repvideo_jax import text_encoder as TE
  from repvideo_jax import vae as V
  from repvideo_jax.demo import text_training, vae_training
  from repvideo_jax.training import trainer
  for section, cls in (("dataset", DatasetConfig), ("tokenizer", TokenizerConfig),
                       ("text_encoder", TE.T5Config), ("text_training", text_training.TextTrainConfig),
                       ("vae", V.VAEConfig), ("vae_training", vae_training.VAETrainConfig)):
    config_lib.from_dict(cls, tree[section] or {}, f"{where}:{section}")
  trainer.config_from_dict(tree["train"] or {}, f"{where}:train")
  generation = dict(tree["generation"] or {})
  fps = generation.pop("fps", 8.0)
  config_lib.from_dict(P.GenerationSettings, generation, f"{where}:generation")
  if not fps > 0:
    raise ValueError(f"{where}:generation.fps must be positive, got {fps}")
  if tree["storage_dtype"] not in ("float32", "float16", "bfloat16"):
    raise ValueError(f"{where}: storage_dtype must be float32, float16 or bfloat16, got "
                     f"{tree['storage_dtype']!r}")


class Stage:
  """A folder that is complete when its ``stage.json`` exists; records the config it was built from."""

  def __init__(self, root: pathlib.Path, name: str, config: Any):
    self.name, self.path = name, root / name
    self.config = json.loads(json.dumps(config))  # plain JSON types, for comparison

  @property
  def done(self) -> bool:
    marker = self.path / "stage.json"
    if not marker.is_file():
      return False
    built = json.loads(marker.read_text())["config"]
    if built != self.config:
      raise ValueError(f"{self.path} was built from a different {self.name} config:\n  built: {built}\n"
                       f"  now:   {self.config}\nuse a new --out (or --name for another transformer)")
    return True

  def finish(self, **info) -> None:
    tmp = self.path / "stage.json.tmp"
    tmp.write_text(json.dumps({"config": self.config, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               **info}, indent=2))
    os.replace(tmp, self.path / "stage.json")


def _say(msg: str) -> None:
  print(f"[demo.build] {msg}", file=sys.stderr, flush=True)


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Moves ``src`` to ``dst`` (replacing it) as atomically as the filesystem allows."""
  old = dst.with_name(dst.name + ".old")
  shutil.rmtree(old, ignore_errors=True)
  if dst.exists():
    os.replace(dst, old)
  os.replace(src, dst)
  shutil.rmtree(old, ignore_errors=True)


def _write_pipeline(folder: pathlib.Path, manifest: dict) -> None:
  (folder / "pipeline.json").write_text(json.dumps(
      {"format": "repvideo-jax-pipeline", "version": 1,
       "components": ["transformer", "text_encoder", "vae", "tokenizer"], **manifest}, indent=2))


def build(recipe: dict[str, Any], out: str | pathlib.Path, *, name: str = "model", install: bool = False,
          progress: bool = True, recipe_name: str = "demo") -> pathlib.Path:
  """Runs (or resumes) every stage; returns the finished model folder ``out/name/model``."""
  import jax

  from repvideo_jax import text_encoder as TE
  from repvideo_jax import text_encoder_weights, transformer_weights, vae_weights
  from repvideo_jax import transformer as T
  from repvideo_jax import vae as V
  from repvideo_jax.demo import text_training, vae_training
  from repvideo_jax.training import trainer

  out = pathlib.Path(out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  ds = config_lib.from_dict(DatasetConfig, recipe["dataset"], "dataset")
  train_specs, heldout = D.split_specs(ds.split_seed, ds.holdout_fraction)
  captions = sorted({D.caption(s) for s in train_specs})

  stage = Stage(out, "data", recipe["dataset"])
  if not stage.done:
    _say(f"data: rendering {ds.per_spec} clips x {len(train_specs)} train combinations "
         f"({len(heldout)} held out)")
    D.write_dataset(stage.path, train_specs, per_spec=ds.per_spec, num_frames=ds.frames,
                    height=ds.height, width=ds.width, fps=ds.fps, seed=ds.seed)
    stage.finish(train=[D.caption(s) for s in train_specs], heldout=[D.caption(s) for s in heldout])
  data_dir = stage.path

  tok_cfg = config_lib.from_dict(TokenizerConfig, recipe["tokenizer"], "tokenizer")
  stage = Stage(out, "tokenizer", {"tokenizer": recipe["tokenizer"], "dataset": recipe["dataset"]})
  if not stage.done:
    _say("tokenizer: training sentencepiece on the train captions")
    text_training.train_tokenizer(captions, stage.path, vocab_size=tok_cfg.vocab_size,
                                  model_type=tok_cfg.model_type)
    stage.finish()
  tokenizer = TE.load_tokenizer(stage.path)
  tokenizer_dir = stage.path

  t5_cfg = config_lib.from_dict(TE.T5Config, {**recipe["text_encoder"], "vocab_size": len(tokenizer)},
                                "text_encoder")
  text_length = int(recipe["train"]["transformer"]["text_length"])
  stage = Stage(out, "text_encoder", {k: recipe[k] for k in ("text_encoder", "text_training", "tokenizer",
                                                             "dataset")})
  if not stage.done:
    _say(f"text encoder: pretraining T5 ({t5_cfg.num_layers} layers, width {t5_cfg.d_model})")
    tc = config_lib.from_dict(text_training.TextTrainConfig, recipe["text_training"], "text_training")
    params, rows = text_training.pretrain_encoder(t5_cfg, tokenizer, captions, tc, stage.path / "run",
                                                  max_length=text_length, progress=progress)
    text_encoder_weights.save(stage.path / "weights", t5_cfg, params, source="demo.build", overwrite=True)
    stage.finish(first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"], last_accuracy=rows[-1]["accuracy"])
  text_dir = stage.path / "weights"

  vae_cfg = config_lib.from_dict(V.VAEConfig, {**recipe["vae"], "scaling_factor": 1.0}, "vae")
  stage = Stage(out, "vae", {k: recipe[k] for k in ("vae", "vae_training", "dataset")})
  if not stage.done:
    vt = config_lib.from_dict(vae_training.VAETrainConfig, recipe["vae_training"], "vae_training")
    _say(f"vae: training {vae_cfg.block_out_channels} on {vt.frames}-frame clips, {vt.steps} steps")

    def random_clip(rng):  # a fresh render of a random train-split combination
      return D.render(train_specs[rng.integers(len(train_specs))], num_frames=vt.frames,
                      height=ds.height, width=ds.width, seed=int(rng.integers(1 << 31)))

    def clips(step):
      rng = np.random.default_rng([ds.seed, 7, step])
      return np.stack([random_clip(rng) for _ in range(vt.batch_size)])

    def images(step):  # one random frame of each of image_batch_size clips
      rng = np.random.default_rng([ds.seed, 8, step])
      return np.stack([random_clip(rng)[rng.integers(vt.frames)][None] for _ in range(vt.image_batch_size)])

    params, rows = vae_training.train(vae_cfg, vt, clips, stage.path / "run", images=images,
                                      progress=progress)
    probe = np.stack([D.render(s, num_frames=ds.frames, height=ds.height, width=ds.width, seed=5000 + i)
                      for i, s in enumerate(train_specs)])
    scale = vae_training.latent_scale(params, vae_cfg, probe)
    final_cfg = dataclasses.replace(vae_cfg, scaling_factor=scale)
    vae_weights.save(stage.path / "weights", final_cfg, params, source="demo.build", overwrite=True)
    stage.finish(scaling_factor=scale, first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"])
  vae_dir = stage.path / "weights"

  train_tree = recipe["train"]
  t_cfg = config_lib.from_dict(T.TransformerConfig, train_tree["transformer"], "train.transformer")
  stage = Stage(out, "encoders", {k: recipe[k] for k in ("dataset", "tokenizer", "text_encoder",
                                                         "text_training", "vae", "vae_training")}
                | {"text_length": text_length})
  if not stage.done:
    _say("encoders: assembling the VAE, T5 and tokenizer into a model folder for data.prepare")
    shutil.rmtree(stage.path, ignore_errors=True)
    stage.path.mkdir(parents=True)
    shutil.copytree(tokenizer_dir, stage.path / "tokenizer", ignore=shutil.ignore_patterns("stage.json"))
    shutil.copytree(text_dir, stage.path / "text_encoder")
    shutil.copytree(vae_dir, stage.path / "vae")
    transformer_weights.save(stage.path / "transformer", t_cfg, T.init(t_cfg, jax.random.key(0)),
                             source="untrained (only its config is read by data.prepare)")
    _write_pipeline(stage.path, {"source": {"recipe": recipe_name, "note": "encoders only"}})
    stage.finish()
  encoders_dir = stage.path

  data_cfg = train_tree.get("data") or {}
  stage = Stage(out, "records", {"encoders": stage.config, "data": {k: data_cfg.get(k) for k in
                                                                     ("frames", "height", "width", "fps")}})
  if not stage.done:
    from repvideo_jax.data import prepare
    _say("records: encoding the dataset with data.prepare")
    prep = prepare.PrepareConfig(frames=ds.frames, height=ds.height, width=ds.width, fps=ds.fps,
                                 batch_size=8)
    prepare.prepare(data_dir, data_dir / "captions.csv", encoders_dir, stage.path, prep,
                    progress=progress, verbose=False)
    stage.finish()
  records_dir = stage.path

  # The transformer: train.py on the recipe's train section, into <name>/run.
  variant = out / name
  variant.mkdir(exist_ok=True)
  train_tree = json.loads(json.dumps(train_tree))
  train_tree.setdefault("data", {})["records"] = str(records_dir)
  train_tree.setdefault("run", {})["output_dir"] = str(variant / "run")
  train_yaml = variant / "train.yaml"
  previous = yaml.safe_load(train_yaml.read_text()) if train_yaml.exists() else None
  if previous is not None and previous != train_tree and (variant / "run").exists():
    raise ValueError(f"{variant} holds a transformer run with a different train config; use another "
                     "--name (or a new --out)")
  train_yaml.write_text(yaml.safe_dump(train_tree, sort_keys=False))
  command = [sys.executable, str(REPO / "train.py"), "--config", str(train_yaml), "--resume"]
  steps = int(train_tree["run"].get("steps", 0))
  done = _finished_step(variant / "run")
  if done is None or done < steps:
    _say(f"transformer: {' '.join(command[1:])}")
    with open(variant / "train.log", "a") as log_file:
      proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
      for line in proc.stdout:
        log_file.write(line)
        log_file.flush()  # so that `tail -f train.log` follows the run
        if progress and line.startswith("step "):
          print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
      if proc.wait() != 0:
        raise RuntimeError(f"train.py failed (exit {proc.returncode}); see {variant / 'train.log'}")

  model = variant / "model"
  tmp = variant / "model.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  for part in ("tokenizer", "text_encoder", "vae"):
    shutil.copytree(encoders_dir / part, tmp / part)
  tcfg = trainer.export_transformer(variant / "run", tmp / "transformer")
  if recipe["storage_dtype"] != "float32":
    for part in ("transformer", "text_encoder", "vae"):
      _store_as(tmp / part, recipe["storage_dtype"])
  defaults = dict(recipe["generation"])
  _write_pipeline(tmp, {"defaults": defaults, "source": {
      "recipe": recipe_name, "config": recipe, "command": "python -m repvideo_jax.demo.build",
      "train_command": f"train.py --config {train_yaml.name}", "feature_cache": tcfg.feature_cache,
      "heldout": [D.caption(s) for s in heldout]}})
  _replace_dir(tmp, model)
  _say(f"wrote {model}")
  if install:
    from repvideo_jax.demo import MODEL_DIR
    if name == "model":
      _install(model, MODEL_DIR)
      _say(f"installed {model} as {MODEL_DIR}")
    else:  # a variant shares the bundled encoders: only its transformer and recipe are kept
      target = MODEL_DIR / "ablations" / name
      tmp = target.with_name(target.name + ".partial")
      shutil.rmtree(tmp, ignore_errors=True)
      tmp.mkdir(parents=True)
      shutil.copytree(model / "transformer", tmp / "transformer")
      manifest = json.loads((model / "pipeline.json").read_text())
      (tmp / "recipe.json").write_text(json.dumps(manifest["source"], indent=2))
      _replace_dir(tmp, target)
      _say(f"installed the {name} transformer as {target / 'transformer'}")
  return model


def _store_as(folder: pathlib.Path, dtype: str) -> None:
  """Rewrites a converted component's float arrays in ``dtype`` (half the bytes for float16); the
  loaders cast them back to the config's param_dtype, so only the stored precision changes."""
  import jax
  import ml_dtypes

  from repvideo_jax import checkpoint_io
  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  params, meta = checkpoint_io.load_params(folder)
  params = jax.tree.map(lambda a: a.astype(target) if np.issubdtype(a.dtype, np.floating) else a, params)
  checkpoint_io.save_params(folder, params, metadata={**meta, "storage_dtype": dtype}, overwrite=True)


def _finished_step(run_dir: pathlib.Path) -> int | None:
  """The step of the run's last complete checkpoint (None before the first)."""
  from repvideo_jax.training.checkpoints import Checkpointer
  if not (run_dir / "checkpoints").is_dir():
    return None
  ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _install(model: pathlib.Path, target: pathlib.Path) -> None:
  """Copies a model folder over ``target`` (the bundled location), keeping ``target/ablations``."""
  tmp = target.with_name(target.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(model, tmp)
  if (target / "ablations").is_dir():
    shutil.copytree(target / "ablations", tmp / "ablations")
  target.parent.mkdir(parents=True, exist_ok=True)
  _replace_dir(tmp, target)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m repvideo_jax.demo.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="demo", help="recipe preset in configs/ or a YAML file")
  parser.add_argument("--out", default="runs/demo", help="build folder (default runs/demo)")
  parser.add_argument("--name", default="model", help="name of the transformer variant (ablations)")
  parser.add_argument("--install", action="store_true",
                      help="copy the result into the package: the bundled demo model, or for another "
                      "--name its transformer as ablations/<name>/transformer")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  try:
    recipe = load_recipe(args.config, args.overrides)
    build(recipe, args.out, name=args.name, install=args.install, progress=not args.no_progress,
          recipe_name=str(args.config))
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
