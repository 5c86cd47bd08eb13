"""Builds the demo model from nothing: data, tokenizer, T5, VAE, transformer (the recipe is one config).

    python -m repvideo_jax.demo.build                     # configs/demo.yaml -> runs/demo/model
    python -m repvideo_jax.demo.build --out runs/demo --install       # ... and replace the bundled model
    python -m repvideo_jax.demo.build --name nocache train.transformer.feature_cache=false --install
        # the cache-off ablation on the same data and encoders -> bundled as ablations/nocache
    python -m repvideo_jax.demo.build --base repvideo_jax/demo/model --out runs/tuned \
        'transformer_tuning.mix=[0.5,0.75]' 'transformer_tuning.mix_min_t=[200,50]' 'decoder_fitting.rounds=[600]'
        # the shape tuning stages on a finished model folder, without its training stages

Stages, run in this order by ``build`` (one function each, in ``STAGES``), each in its own folder
under ``--out`` and skipped when already complete (so a killed build resumes; the transformer resumes
from its last checkpoint):
  data          ``demo.write_dataset``: ``dataset.per_spec`` clips of every train-split combination
  tokenizer     a sentencepiece model trained on the train captions (``text_training.train_tokenizer``)
  text_encoder  the T5 encoder pretrained on the train captions (``text_training.pretrain_encoder``)
  vae           the VAE trained on freshly rendered train-split clips (``vae_training.train``)
  vae_tuning    with ``vae_tuning.standardize``: its latents standardized per channel
                (``vae_training.standardize_latents``); with ``vae_tuning.joint_steps``, then the
                whole VAE tuned on noisy latents (``vae_training.tune_vae``) and standardized again
  encoders      a model folder of the three plus an untrained transformer (what data.prepare reads)
  records       ``data.prepare`` on the dataset with those encoders
  decoder       with ``vae_tuning.steps``: the decoder alone tuned on noisy latents
                (``vae_training.tune_decoder``); the records, and so the transformer, do not depend on it
  <name>/run    ``training.trainer.train`` in this process on ``<name>/train.yaml`` (the recipe's
                ``train`` section; the same run as ``train.py --config <name>/train.yaml --resume``),
                its output appended to ``<name>/train.log``
  <name>/tuning with ``transformer_tuning.mix``: the transformer's training continued with the paired
                square/partner loss (``pair_tuning.tune``), from the run's EMA
  <name>/decoder_fitting  with ``decoder_fitting.rounds``: samples of the train captions from that
                transformer, and the decoder tuned in rounds to turn them into clean shapes
                (``sample_fitting``)
  <name>/model  the finished model folder (pipeline.json with the ``generation`` defaults)
  (install)     with ``--install``: the model, or a variant's transformer, copied into the package
Every stage records the part of the config it was built from; re-running with a different one is
refused (use a new ``--out``, or ``--name`` for a different transformer on the same data).

With ``--base DIR`` (a model folder this command wrote, such as the bundled one) the training stages
are not run: ``base`` copies that folder's tokenizer, T5, VAE and transformer into the build, and
the data, records, tuning, decoder_fitting and model stages continue from them. The recipe's
sections of those training stages (``BASE_SECTIONS``) must be the ones the folder was built with.

Overrides: ``section.key=value`` on the recipe, e.g. ``train.run.steps=100 vae_training.steps=50``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import pathlib
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
import yaml

from repvideo_jax import (
  checkpoint_io,
  outputs,
  pipeline,
  text_encoder_weights,
  transformer_weights,
  vae_weights,
)
from repvideo_jax import config as config_lib
from repvideo_jax import text_encoder as TE
from repvideo_jax import transformer as T
from repvideo_jax import vae as V
from repvideo_jax.data import prepare
from repvideo_jax.demo import MODEL_DIR, pair_tuning, sample_fitting, text_training, vae_training
from repvideo_jax.demo import domain as D
from repvideo_jax.training import trainer
from repvideo_jax.training.checkpoints import Checkpointer

log = logging.getLogger(__name__)
SECTIONS = (
  "dataset",
  "tokenizer",
  "text_encoder",
  "text_training",
  "vae",
  "vae_training",
  "train",
  "generation",
)
# Sections a recipe may leave out (their configs' defaults: the tuning stages then do nothing).
OPTIONAL = {"vae_tuning": {}, "transformer_tuning": {}, "decoder_fitting": {}}
SCALARS = {"storage_dtype": "float32"}  # top-level recipe settings besides the sections
# What the stages a ``--base`` folder stands in for were built from: it must match the recipe's.
BASE_SECTIONS = (*(s for s in SECTIONS if s != "generation"), "vae_tuning")
BASE_PARTS = ("tokenizer", "text_encoder", "vae", "transformer")


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
  given = config_lib.load_yaml(name_or_path, overrides)
  # Optional sections default key by key, so one override does not switch a tuning stage on.
  optional = {k: {**v, **(given.get(k) or {})} for k, v in OPTIONAL.items()}
  tree = {**SCALARS, **given, **optional}
  unknown = sorted(set(tree) - set(SECTIONS) - set(OPTIONAL) - set(SCALARS))
  if unknown:
    raise ValueError(
      f"{name_or_path}: unknown section(s) {unknown}; a recipe has {list(SECTIONS)}, "
      f"optionally {list(OPTIONAL)}, and {list(SCALARS)}"
    )
  missing = [s for s in SECTIONS if s not in tree]
  if missing:
    raise ValueError(f"{name_or_path}: missing section(s) {missing}")
  _validate(tree, str(name_or_path))
  return tree


def _validate(tree: dict[str, Any], where: str) -> None:
  """Builds every section's typed config once, so a typo fails now, not an hour into the build."""
  for section, cls in (
    ("dataset", DatasetConfig),
    ("tokenizer", TokenizerConfig),
    ("text_encoder", TE.T5Config),
    ("text_training", text_training.TextTrainConfig),
    ("vae", V.VAEConfig),
    ("vae_training", vae_training.VAETrainConfig),
    ("vae_tuning", vae_training.VAETuneConfig),
    ("transformer_tuning", pair_tuning.PairTuneConfig),
    ("decoder_fitting", sample_fitting.DecoderFitConfig),
  ):
    config_lib.from_dict(cls, tree[section] or {}, f"{where}:{section}")
  trainer.config_from_dict(tree["train"] or {}, f"{where}:train")
  generation = dict(tree["generation"] or {})
  fps = generation.pop("fps", 8.0)
  config_lib.from_dict(pipeline.GenerationSettings, generation, f"{where}:generation")
  if not fps > 0:
    raise ValueError(f"{where}:generation.fps must be positive, got {fps}")
  if tree["storage_dtype"] not in ("float32", "float16", "bfloat16"):
    raise ValueError(
      f"{where}: storage_dtype must be float32, float16 or bfloat16, got {tree['storage_dtype']!r}"
    )


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
      raise ValueError(
        f"{self.path} was built from a different {self.name} config:\n  built: {built}\n"
        f"  now:   {self.config}\nuse a new --out (or --name for another transformer)"
      )
    return True

  def begin(self) -> None:
    """Records the config a stage starts from (``started.json``), or refuses a different one: a
    killed stage then resumes only from work of the same config."""
    marker = self.path / "started.json"
    if marker.is_file():
      started = json.loads(marker.read_text())["config"]
      if started != self.config:
        raise ValueError(
          f"{self.path} was started from a different {self.name} config:\n  started: {started}\n"
          f"  now:     {self.config}\nuse a new --out (or --name for another transformer)"
        )
      return
    self.path.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write(marker, json.dumps({"config": self.config}, indent=2))

  def finish(self, **info) -> None:
    outputs.atomic_write(
      self.path / "stage.json",
      json.dumps({"config": self.config, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}, indent=2),
    )


def _say(msg: str) -> None:
  print(f"[demo.build] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Build:
  """One build's inputs, and what each stage leaves for the later ones (None until it has run)."""

  recipe: dict[str, Any]
  out: pathlib.Path
  name: str = "model"
  install: bool = False
  progress: bool = True
  recipe_name: str = "demo"
  base: str | pathlib.Path | None = None  # --base: a model folder standing in for the training stages
  dataset: DatasetConfig = dataclasses.field(init=False)
  train_specs: list = dataclasses.field(init=False)
  heldout: list = dataclasses.field(init=False)
  captions: list[str] = dataclasses.field(init=False)
  text_length: int = dataclasses.field(init=False)  # the transformer's, which T5 pretrains for
  data_dir: pathlib.Path | None = None
  tokenizer_dir: pathlib.Path | None = None
  tokenizer: Any = None
  text_dir: pathlib.Path | None = None
  vae_dir: pathlib.Path | None = None  # the VAE whose encoder makes the records
  model_vae_dir: pathlib.Path | None = None  # the VAE the model folder gets (its decoder tuned)
  encoders: Stage | None = None
  records_dir: pathlib.Path | None = None
  train_yaml: pathlib.Path | None = None
  transformer_dir: pathlib.Path | None = None  # set by the tuning stage: the model gets this transformer
  model: pathlib.Path | None = None

  def __post_init__(self):
    self.out = pathlib.Path(self.out).absolute()
    self.base = pathlib.Path(self.base).absolute() if self.base is not None else None
    self.dataset = config_lib.from_dict(DatasetConfig, self.recipe["dataset"], "dataset")
    self.train_specs, self.heldout = D.split_specs(self.dataset.split_seed, self.dataset.holdout_fraction)
    self.captions = sorted({D.caption(s) for s in self.train_specs})
    self.text_length = int(self.recipe["train"]["transformer"]["text_length"])

  @property
  def variant(self) -> pathlib.Path:
    """The folder of this transformer variant (``--name``): its run, train.yaml, log and model."""
    return self.out / self.name

  def sections(self, *names: str) -> dict[str, Any]:
    """The named sections of the recipe: the config a stage records."""
    return {k: self.recipe[k] for k in names}


def stage_data(b: Build) -> None:
  """The rendered training clips of the train split, with captions.csv."""
  ds = b.dataset
  stage = Stage(b.out, "data", b.recipe["dataset"])
  if not stage.done:
    _say(
      f"data: rendering {ds.per_spec} clips x {len(b.train_specs)} train combinations "
      f"({len(b.heldout)} held out)"
    )
    D.write_dataset(
      stage.path,
      b.train_specs,
      per_spec=ds.per_spec,
      num_frames=ds.frames,
      height=ds.height,
      width=ds.width,
      fps=ds.fps,
      seed=ds.seed,
    )
    stage.finish(train=[D.caption(s) for s in b.train_specs], heldout=[D.caption(s) for s in b.heldout])
  b.data_dir = stage.path


def _digest(folder: pathlib.Path, parts: tuple[str, ...]) -> str:
  """sha256 of the files (names and bytes) under ``folder/part`` for each part."""
  h = hashlib.sha256()
  for part in parts:
    for f in sorted(p for p in (folder / part).rglob("*") if p.is_file()):
      h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
  return h.hexdigest()


def _base_source(b: Build) -> dict[str, Any]:
  """The build record (pipeline.json ``source``) of the ``--base`` folder, refused with a clear error
  when it is missing, not a folder this command wrote, or built with other ``BASE_SECTIONS``."""
  base = b.base
  if not base.is_dir():
    raise FileNotFoundError(f"--base: model folder {base} not found")
  missing = [p for p in (*BASE_PARTS, "pipeline.json") if not (base / p).exists()]
  if missing:
    raise FileNotFoundError(
      f"--base: {base} has no {', '.join(missing)}; give a model folder this command wrote"
    )
  source = json.loads((base / "pipeline.json").read_text()).get("source", {})
  if not isinstance(source.get("config"), dict):
    raise ValueError(
      f"--base: {base}/pipeline.json records no build recipe (source.config); give a model folder "
      "python -m repvideo_jax.demo.build wrote"
    )
  built = _leaves({k: source["config"].get(k) for k in BASE_SECTIONS})
  asked = _leaves(b.sections(*BASE_SECTIONS))
  differ = sorted(k for k in built.keys() | asked.keys() if built.get(k) != asked.get(k))
  if differ:
    shown = "; ".join(f"{k}: built {built.get(k)!r}, asked {asked.get(k)!r}" for k in differ[:4])
    raise ValueError(
      f"--base: {base} was built with another recipe ({shown}{'; ...' if len(differ) > 4 else ''}); "
      "give the overrides it was built with"
    )
  return source


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"a.b": value}`` for every leaf of nested dicts, in plain JSON types."""
  tree = json.loads(json.dumps(tree))
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
  return out


def stage_base(b: Build) -> None:
  """With ``--base``: the folder's tokenizer, T5, VAE and transformer, copied into ``base``, stand in
  for the training stages (the records are encoded with its VAE, the tuning starts from its
  transformer, the fitting from its decoder). Refused when the recipe's ``BASE_SECTIONS`` differ
  from the folder's."""
  source = _base_source(b)
  stage = Stage(b.out, "base", {"from": str(b.base), "sha256": _digest(b.base, BASE_PARTS)})
  if not stage.done:
    _say(f"base: copying {', '.join(BASE_PARTS)} from {b.base}")
    shutil.rmtree(stage.path, ignore_errors=True)
    stage.path.mkdir(parents=True)
    for part in BASE_PARTS:
      shutil.copytree(b.base / part, stage.path / part)
    shutil.copy(b.base / "pipeline.json", stage.path / "pipeline.json")
    stage.finish(source=source)
  b.encoders = stage  # what data.prepare reads: a model folder
  b.transformer_dir = stage.path / "transformer"
  b.model_vae_dir = stage.path / "vae"


def stage_tokenizer(b: Build) -> None:
  """A sentencepiece tokenizer of the train captions (loaded for the next stage)."""
  tok_cfg = config_lib.from_dict(TokenizerConfig, b.recipe["tokenizer"], "tokenizer")
  stage = Stage(b.out, "tokenizer", b.sections("tokenizer", "dataset"))
  if not stage.done:
    _say("tokenizer: training sentencepiece on the train captions")
    text_training.train_tokenizer(
      b.captions, stage.path, vocab_size=tok_cfg.vocab_size, model_type=tok_cfg.model_type
    )
    stage.finish()
  b.tokenizer = TE.load_tokenizer(stage.path)
  b.tokenizer_dir = stage.path


def stage_text_encoder(b: Build) -> None:
  """The T5 encoder, pretrained on the train captions, saved as converted weights."""
  t5_cfg = config_lib.from_dict(
    TE.T5Config, {**b.recipe["text_encoder"], "vocab_size": len(b.tokenizer)}, "text_encoder"
  )
  stage = Stage(b.out, "text_encoder", b.sections("text_encoder", "text_training", "tokenizer", "dataset"))
  if not stage.done:
    _say(f"text encoder: pretraining T5 ({t5_cfg.num_layers} layers, width {t5_cfg.d_model})")
    tc = config_lib.from_dict(text_training.TextTrainConfig, b.recipe["text_training"], "text_training")
    params, rows = text_training.pretrain_encoder(
      t5_cfg, b.tokenizer, b.captions, tc, stage.path / "run", max_length=b.text_length, progress=b.progress
    )
    text_encoder_weights.save(stage.path / "weights", t5_cfg, params, source="demo.build", overwrite=True)
    stage.finish(first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"], last_accuracy=rows[-1]["accuracy"])
  b.text_dir = stage.path / "weights"


def _random_clip(b: Build, rng: np.random.Generator, frames: int) -> np.ndarray:
  """A fresh render of a random train-split combination (the VAE's and the decoder's training data)."""
  ds, specs = b.dataset, b.train_specs
  return D.render(
    specs[rng.integers(len(specs))],
    num_frames=frames,
    height=ds.height,
    width=ds.width,
    seed=int(rng.integers(1 << 31)),
  )


def stage_vae(b: Build) -> None:
  """The VAE, trained on fresh renders, with the latent scale measured on a probe batch."""
  ds = b.dataset
  vae_cfg = config_lib.from_dict(V.VAEConfig, {**b.recipe["vae"], "scaling_factor": 1.0}, "vae")
  stage = Stage(b.out, "vae", b.sections("vae", "vae_training", "dataset"))
  if not stage.done:
    vt = config_lib.from_dict(vae_training.VAETrainConfig, b.recipe["vae_training"], "vae_training")
    _say(f"vae: training {vae_cfg.block_out_channels} on {vt.frames}-frame clips, {vt.steps} steps")

    def clips(step):
      rng = np.random.default_rng([ds.seed, 7, step])
      return np.stack([_random_clip(b, rng, vt.frames) for _ in range(vt.batch_size)])

    def images(step):  # one random frame of each of image_batch_size clips
      rng = np.random.default_rng([ds.seed, 8, step])
      return np.stack(
        [_random_clip(b, rng, vt.frames)[rng.integers(vt.frames)][None] for _ in range(vt.image_batch_size)]
      )

    params, rows = vae_training.train(
      vae_cfg, vt, clips, stage.path / "run", images=images, progress=b.progress
    )
    scale = vae_training.latent_scale(params, vae_cfg, _probe_clips(b))
    final_cfg = dataclasses.replace(vae_cfg, scaling_factor=scale)
    vae_weights.save(stage.path / "weights", final_cfg, params, source="demo.build", overwrite=True)
    stage.finish(scaling_factor=scale, first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"])
  b.vae_dir = stage.path / "weights"


def stage_vae_tuning(b: Build) -> None:
  """With ``vae_tuning.standardize``: the trained VAE's latents standardized per channel
  (``vae_training.standardize_latents``), its latent scale measured again; with
  ``vae_tuning.joint_steps`` > 0, then the whole VAE tuned on noisy latents
  (``vae_training.tune_vae``) and standardized once more. Only this part of the tuning changes the
  encoder, so only it comes before the records; the decoder's own tuning is ``stage_decoder``, after
  them."""
  tc = _tuning(b)
  if not tc.standardize:
    return
  stage = Stage(b.out, "vae_tuning", b.sections("vae", "vae_training", "dataset") | _standardize_section(b))
  if not stage.done:
    vae_cfg, params = vae_weights.load(b.vae_dir)
    probe = _probe_clips(b)
    params, vae_cfg, mean, std = _standardized(params, vae_cfg, probe)
    extra = {}
    if tc.joint_steps > 0:
      _say(
        f"vae tuning: the whole VAE on latents with noise up to {tc.joint_noise} of each channel's spread, {tc.joint_steps} steps"
      )
      kl_weight = config_lib.from_dict(
        vae_training.VAETrainConfig, b.recipe["vae_training"], "vae_training"
      ).kl_weight

      def clips(step):  # fresh renders, a stream apart from the VAE's and the decoder's
        rng = np.random.default_rng([b.dataset.seed, 10, step])
        return np.stack([_random_clip(b, rng, tc.frames) for _ in range(tc.batch_size)])

      params, rows = vae_training.tune_vae(
        params, vae_cfg, tc, clips, stage.path / "run", kl_weight=kl_weight, progress=b.progress
      )
      params, vae_cfg, _, _ = _standardized(params, vae_cfg, probe)
      extra = {"joint_first_loss": rows[0]["loss"], "joint_last_loss": rows[-1]["loss"]}
    vae_weights.save(stage.path / "weights", vae_cfg, params, source="demo.build", overwrite=True)
    stage.finish(
      scaling_factor=vae_cfg.scaling_factor, channel_mean=mean.tolist(), channel_std=std.tolist(), **extra
    )
  b.vae_dir = stage.path / "weights"


def _standardized(params, vae_cfg: V.VAEConfig, probe: np.ndarray):
  """(params, config, mean, std): ``params`` with the latents of ``probe`` standardized per channel
  (their measured mean and std) and the latent scale measured again."""
  mean, std = vae_training.latent_statistics(params, dataclasses.replace(vae_cfg, scaling_factor=1.0), probe)
  _say(
    "vae tuning: standardizing the latent channels (means "
    + " ".join(f"{v:.2f}" for v in mean)
    + ", stds "
    + " ".join(f"{v:.2f}" for v in std)
    + ")"
  )
  params, vae_cfg = vae_training.standardize_latents(params, vae_cfg, mean, std)
  scale = vae_training.latent_scale(params, vae_cfg, probe)
  return params, dataclasses.replace(vae_cfg, scaling_factor=scale), mean, std


def _tuning(b: Build) -> vae_training.VAETuneConfig:
  return config_lib.from_dict(vae_training.VAETuneConfig, b.recipe["vae_tuning"], "vae_tuning")


def _standardize_section(b: Build) -> dict[str, Any]:
  """What of ``vae_tuning`` the encoder depends on (so the records, and the transformer trained on
  them, do not depend on the decoder's own tuning); empty when the recipe does not standardize, so
  builds without it keep their stage configs. The joint tuning shares the optimizer settings and
  the silhouette weight with the decoder's tuning, so with it those are part of the encoder's."""
  tc = _tuning(b)
  if not tc.standardize:
    return {}
  if tc.joint_steps <= 0:
    return {"vae_tuning": {"standardize": True}}
  decoder_only = {"steps", "latent_noise", "crisp_weight", "log_every", "save_every"}
  return {"vae_tuning": {k: v for k, v in dataclasses.asdict(tc).items() if k not in decoder_only}}


def stage_decoder(b: Build) -> None:
  """With ``vae_tuning.steps`` > 0: the decoder alone tuned on noisy latents
  (``vae_training.tune_decoder``), the encoder frozen. The transformer never sees the decoder, so
  this comes after the records, and a recipe that changes only the decoder's tuning keeps them and
  the transformer; the model folder gets this VAE."""
  tc = _tuning(b)
  b.model_vae_dir = b.vae_dir
  if tc.steps <= 0:
    return
  stage = Stage(b.out, "decoder", b.sections("vae", "vae_training", "vae_tuning", "dataset"))
  if not stage.done:
    vae_cfg, params = vae_weights.load(b.vae_dir)
    _say(f"decoder: tuning on latents with noise up to {tc.latent_noise}, {tc.steps} steps")

    def clips(step):  # fresh renders, a stream apart from the VAE's
      rng = np.random.default_rng([b.dataset.seed, 9, step])
      return np.stack([_random_clip(b, rng, tc.frames) for _ in range(tc.batch_size)])

    params, rows = vae_training.tune_decoder(
      params, vae_cfg, tc, clips, stage.path / "run", progress=b.progress
    )
    vae_weights.save(stage.path / "weights", vae_cfg, params, source="demo.build", overwrite=True)
    stage.finish(first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"])
  b.model_vae_dir = stage.path / "weights"


def _probe_clips(b: Build) -> np.ndarray:
  """One render of every train combination (seeds 5000 + i): where latent statistics are measured."""
  ds = b.dataset
  return np.stack(
    [
      D.render(s, num_frames=ds.frames, height=ds.height, width=ds.width, seed=5000 + i)
      for i, s in enumerate(b.train_specs)
    ]
  )


def stage_encoders(b: Build) -> None:
  """A model folder of tokenizer, T5 and VAE plus an untrained transformer: data.prepare's input."""
  t_cfg = config_lib.from_dict(T.TransformerConfig, b.recipe["train"]["transformer"], "train.transformer")
  stage = Stage(
    b.out,
    "encoders",
    b.sections("dataset", "tokenizer", "text_encoder", "text_training", "vae", "vae_training")
    | _standardize_section(b)
    | {"text_length": b.text_length},
  )
  if not stage.done:
    _say("encoders: assembling the VAE, T5 and tokenizer into a model folder for data.prepare")
    shutil.rmtree(stage.path, ignore_errors=True)
    stage.path.mkdir(parents=True)
    shutil.copytree(b.tokenizer_dir, stage.path / "tokenizer", ignore=shutil.ignore_patterns("stage.json"))
    shutil.copytree(b.text_dir, stage.path / "text_encoder")
    shutil.copytree(b.vae_dir, stage.path / "vae")
    transformer_weights.save(
      stage.path / "transformer",
      t_cfg,
      T.init(t_cfg, jax.random.key(0)),
      source="untrained (only its config is read by data.prepare)",
    )
    pipeline.write_manifest(stage.path, source={"recipe": b.recipe_name, "note": "encoders only"})
    stage.finish()
  b.encoders = stage


def stage_records(b: Build) -> None:
  """The dataset encoded to latent and text records by data.prepare."""
  ds = b.dataset
  data_cfg = b.recipe["train"].get("data") or {}
  sizes = {k: data_cfg.get(k) for k in ("frames", "height", "width", "fps")}
  stage = Stage(b.out, "records", {"encoders": b.encoders.config, "data": sizes})
  if not stage.done:
    _say("records: encoding the dataset with data.prepare")
    prep = prepare.PrepareConfig(frames=ds.frames, height=ds.height, width=ds.width, fps=ds.fps, batch_size=8)
    prepare.prepare(
      b.data_dir,
      b.data_dir / "captions.csv",
      b.encoders.path,
      stage.path,
      prep,
      progress=b.progress,
      verbose=False,
    )
    stage.finish()
  b.records_dir = stage.path


def stage_transformer(b: Build) -> None:
  """The recipe's ``train`` section, pointed at the records and ``<name>/run``, trained (or resumed)
  by the trainer in this process; what it prints goes to ``<name>/train.log``."""
  variant = b.variant
  variant.mkdir(exist_ok=True)
  train_tree = json.loads(json.dumps(b.recipe["train"]))
  train_tree.setdefault("data", {})["records"] = str(b.records_dir)
  train_tree.setdefault("run", {})["output_dir"] = str(variant / "run")
  b.train_yaml = variant / "train.yaml"
  previous = yaml.safe_load(b.train_yaml.read_text()) if b.train_yaml.exists() else None
  if previous is not None and previous != train_tree and (variant / "run").exists():
    raise ValueError(
      f"{variant} holds a transformer run with a different train config; use another --name (or a new --out)"
    )
  outputs.atomic_write(b.train_yaml, yaml.safe_dump(train_tree, sort_keys=False))
  cfg = trainer.config_from_dict(train_tree, str(b.train_yaml))
  done = finished_step(variant / "run")
  if done is not None and done >= cfg.run.steps:
    return
  _say(f"transformer: training {b.train_yaml} from step {done or 0} (log: {variant / 'train.log'})")
  with train_log(variant / "train.log", echo=b.progress):
    result = trainer.train(cfg, resume=True)
  if result["final_step"] < cfg.run.steps:
    raise RuntimeError(
      f"the transformer run stopped at step {result['final_step']} of {cfg.run.steps} "
      f"({result['stopped']}); run the build again to resume it"
    )


def _trained_transformer(b: Build) -> tuple[T.TransformerConfig, Any]:
  """(config, params) of the transformer so far: the tuning stage's, else the run's EMA (its params
  when it kept none), as ``stage_model`` exports it."""
  if b.transformer_dir is not None:
    return transformer_weights.load(b.transformer_dir)
  run_cfg, state, _ = trainer.load_run(b.variant / "run")
  return run_cfg.transformer, trainer.trained_params(state, use_ema=state.get("ema") is not None)


def _transformer_tuning(b: Build) -> pair_tuning.PairTuneConfig:
  return config_lib.from_dict(
    pair_tuning.PairTuneConfig, b.recipe["transformer_tuning"] or {}, "transformer_tuning"
  )


def stage_tuning(b: Build) -> None:
  """With ``transformer_tuning.mix`` (one phase each): the trained transformer continued with the
  paired square/partner loss on the records' encoders (``pair_tuning``); the model gets it."""
  tc = _transformer_tuning(b)
  if tc.phases == 0:
    return
  stage = Stage(
    b.variant, "tuning", b.sections("transformer_tuning", "train") | {"encoders": b.encoders.config}
  )
  if not stage.done:
    stage.begin()
    _say(f"tuning: the transformer with the paired shape loss, {tc.phases} x {tc.steps} steps")
    t_cfg, params = _trained_transformer(b)
    encoders = prepare.load_encoders(b.encoders.path)
    ds = b.dataset
    params, logs = pair_tuning.tune(
      params,
      T.make_apply(t_cfg),
      encoders,
      b.records_dir,
      b.train_specs,
      tc,
      stage.path,
      num_frames=ds.frames,
      height=ds.height,
      width=ds.width,
      progress=b.progress,
    )
    transformer_weights.save(
      stage.path / "transformer", t_cfg, params, source="demo.build tuning", overwrite=True
    )
    stage.finish(first_loss=logs[0][0]["loss"], last_loss=logs[-1][-1]["loss"])
  b.transformer_dir = stage.path / "transformer"


def _decoder_fitting(b: Build) -> sample_fitting.DecoderFitConfig:
  return config_lib.from_dict(
    sample_fitting.DecoderFitConfig, b.recipe["decoder_fitting"] or {}, "decoder_fitting"
  )


def stage_decoder_fitting(b: Build) -> None:
  """With ``decoder_fitting.rounds``: the model's decoder tuned on the (tuned) transformer's samples
  of the train captions (``sample_fitting``); the model gets this VAE."""
  fc = _decoder_fitting(b)
  if not fc.rounds:
    return
  stage = Stage(
    b.variant,
    "decoder_fitting",
    b.sections("decoder_fitting", "train", "generation", "vae_tuning")
    | ({"transformer_tuning": b.recipe["transformer_tuning"]} if b.transformer_dir is not None else {})
    | {"encoders": b.encoders.config},
  )
  if not stage.done:
    stage.begin()
    pipe = pipeline.load_pipeline(b.encoders.path, load_transformer=False)
    t_cfg, t_params = _trained_transformer(b)
    vae_cfg, vae_params = vae_weights.load(b.model_vae_dir)
    pipe = dataclasses.replace(
      pipe,
      transformer_config=t_cfg,
      transformer_params=t_params,
      vae_config=vae_cfg,
      vae_params=vae_params,
      _residency=None,
    )
    generation = {k: v for k, v in b.recipe["generation"].items() if k != "fps"}
    settings = pipeline.settings_for(pipe, **{**generation, "seed": fc.sample_seed})
    specs = sample_fitting.caption_cycle(b.train_specs, fc.samples)
    samples = stage.path / "samples.npy"
    if not samples.is_file():
      _say(f"decoder_fitting: sampling {fc.samples} videos of the train captions")
      parts = stage.path / "samples.parts"  # each batch as it is sampled: a killed sampling resumes
      z = sample_fitting.sample_latents(
        pipe, specs, settings, batch=fc.sample_batch, progress=b.progress, parts_dir=parts
      )
      with outputs.atomic_path(samples) as tmp, open(tmp, "wb") as f:
        np.save(f, z)
      shutil.rmtree(parts)
    z = np.load(samples)
    if len(z) != fc.samples:
      raise ValueError(f"{samples} holds {len(z)} samples, the config asks for {fc.samples}; use a new --out")
    _say(f"decoder_fitting: {len(fc.rounds)} rounds of {list(fc.rounds)} steps")
    ds = b.dataset

    def real_clips(step):  # fresh renders, a stream apart from the other stages'
      rng = np.random.default_rng([b.dataset.seed, 17, step])
      return np.stack([_random_clip(b, rng, ds.frames) for _ in range(fc.real_batch)])

    params, logs = sample_fitting.fit_decoder(
      vae_params, vae_cfg, z, specs, real_clips, fc, stage.path, progress=b.progress
    )
    vae_weights.save(
      stage.path / "weights", vae_cfg, params, source="demo.build decoder_fitting", overwrite=True
    )
    stage.finish(first_loss=logs[0][0]["loss"], last_loss=logs[-1][-1]["loss"])
  b.model_vae_dir = stage.path / "weights"


def stage_model(b: Build) -> None:
  """Assembles ``<name>/model`` next to its final place, then swaps it in."""
  encoders, recipe = b.encoders.path, b.recipe
  b.model = b.variant / "model"
  with outputs.staged_dir(b.model) as tmp:
    for part in ("tokenizer", "text_encoder"):
      shutil.copytree(encoders / part, tmp / part)
    _check_same_encoder(b.model_vae_dir, encoders / "vae")
    shutil.copytree(b.model_vae_dir, tmp / "vae")
    if b.transformer_dir is not None:
      shutil.copytree(b.transformer_dir, tmp / "transformer")
      tcfg = transformer_weights.load(b.transformer_dir)[0]
    else:
      tcfg = trainer.export_transformer(b.variant / "run", tmp / "transformer")
    if recipe["storage_dtype"] != "float32":
      for part in ("transformer", "text_encoder", "vae"):
        _store_as(tmp / part, recipe["storage_dtype"])
    pipeline.write_manifest(
      tmp,
      **{
        "defaults": dict(recipe["generation"]),
        "source": {
          "recipe": b.recipe_name,
          "config": recipe,
          **_command_source(b),
          "feature_cache": tcfg.feature_cache,
          "heldout": [D.caption(s) for s in b.heldout],
        },
      },
    )
  _say(f"wrote {b.model}")


def _command_source(b: Build) -> dict[str, Any]:
  """How the model was made: the build command, and its transformer's train.py run or ``--base`` folder."""
  if b.base is None:
    return {
      "command": "python -m repvideo_jax.demo.build",
      "train_command": f"train.py --config {b.train_yaml.name}",
    }
  base_manifest = json.loads((b.out / "base" / "pipeline.json").read_text())
  return {"command": f"python -m repvideo_jax.demo.build --base {b.base}", "base": base_manifest["source"]}


def _check_same_encoder(vae_dir: pathlib.Path, records_vae_dir: pathlib.Path) -> None:
  """The model's VAE must encode exactly as the one that made the records (the transformer's data)."""
  (cfg, params), (ref_cfg, ref) = vae_weights.load(vae_dir), vae_weights.load(records_vae_dir)
  same = cfg.scaling_factor == ref_cfg.scaling_factor and all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(ref["encoder"]))
  )
  if not same:
    raise ValueError(
      f"the VAE in {vae_dir} does not encode as the one in {records_vae_dir} that made the records; "
      "rebuild with a new --out"
    )


def stage_install(b: Build) -> None:
  """With ``install``: the model over the bundled one, or a variant's model folder as an ablation."""
  if not b.install:
    return
  if b.name == "model":
    _install(b.model, MODEL_DIR)
    _say(f"installed {b.model} as {MODEL_DIR}")
    return
  # A variant's whole model folder: its transformer, and its VAE (its own when decoder_fitting
  # ran), so that `--model ablations/<name>` evaluates it as it was built.
  target = MODEL_DIR / "ablations" / b.name
  with outputs.staged_dir(target) as tmp:
    shutil.copytree(b.model, tmp, dirs_exist_ok=True)
  _say(f"installed the {b.name} model folder as {target}")


# With --base: the folder stands in for every stage from the tokenizer to the transformer.
BASE_STAGES: tuple[Callable[[Build], None], ...] = (
  stage_data,
  stage_base,
  stage_records,
  stage_tuning,
  stage_decoder_fitting,
  stage_model,
  stage_install,
)
STAGES: tuple[Callable[[Build], None], ...] = (
  stage_data,
  stage_tokenizer,
  stage_text_encoder,
  stage_vae,
  stage_vae_tuning,
  stage_encoders,
  stage_records,
  stage_decoder,
  stage_transformer,
  stage_tuning,
  stage_decoder_fitting,
  stage_model,
  stage_install,
)


def build(
  recipe: dict[str, Any],
  out: str | pathlib.Path,
  *,
  name: str = "model",
  install: bool = False,
  progress: bool = True,
  recipe_name: str = "demo",
  base: str | pathlib.Path | None = None,
) -> pathlib.Path:
  """Runs (or resumes) every stage (``BASE_STAGES`` with ``base``); returns the finished model folder
  ``out/name/model``.
  Each stage's time in this sitting is appended to ``out/timings.jsonl`` (``stage_times`` sums the
  sittings of a resumed build)."""
  b = Build(recipe, out, name=name, install=install, progress=progress, recipe_name=recipe_name, base=base)
  if b.base is not None:
    _base_source(b)  # a missing, foreign or differently built folder is refused before anything is written
  b.out.mkdir(parents=True, exist_ok=True)
  sitting = time.strftime("%Y-%m-%dT%H:%M:%S")
  for stage in STAGES if b.base is None else BASE_STAGES:
    t0, completed = time.perf_counter(), False
    try:
      stage(b)
      completed = True
    finally:  # an interrupted stage's time counts too (Ctrl-C, an error; not a SIGKILL)
      row = {
        "stage": _stage_label(stage, b),
        "seconds": round(time.perf_counter() - t0, 2),
        "completed": completed,
        "sitting": sitting,
      }
      with open(b.out / TIMINGS, "a") as f:
        f.write(json.dumps(row) + "\n")
  _say(
    "time per stage, all sittings: "
    + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage_times(b.out).items())
  )
  return b.model


TIMINGS = "timings.jsonl"


def _stage_label(stage: Callable, b: Build) -> str:
  """``vae``, ``records``, ...; the transformer variant's stages carry its name (``nocache/transformer``)."""
  label = stage.__name__.removeprefix("stage_")
  variant = ("transformer", "tuning", "decoder_fitting", "model", "install")
  return f"{b.name}/{label}" if label in variant else label


def stage_times(out: str | pathlib.Path) -> dict[str, float]:
  """Seconds per stage of the build in ``out``, summed over its sittings: a resumed stage counts the
  time of the sitting that was interrupted (unless it was killed outright) and of the one that
  finished it; a stage that was already complete adds only its check."""
  path = pathlib.Path(out) / TIMINGS
  totals: dict[str, float] = {}
  if path.is_file():
    for line in path.read_text().splitlines():
      row = json.loads(line)
      totals[row["stage"]] = totals.get(row["stage"], 0.0) + row["seconds"]
  return totals


class _LogTee(io.TextIOBase):
  """A text stream into the run's log file that also echoes its ``step ...`` lines to stderr."""

  def __init__(self, file, echo: bool):
    self.file, self.echo, self.pending = file, echo, ""

  def writable(self) -> bool:
    return True

  def write(self, text: str) -> int:
    self.file.write(text)
    self.file.flush()  # so that `tail -f train.log` follows the run
    if self.echo:
      self.pending += text
      *lines, self.pending = self.pending.split("\n")
      for line in lines:
        if line.startswith("step "):
          print(f"  {line}", file=sys.stderr, flush=True)
    return len(text)


@contextlib.contextmanager
def train_log(path: pathlib.Path, echo: bool):
  """While open, the trainer's output goes to ``path`` as ``train.py``'s did: its step lines
  (standard output), its INFO log (resolved config, mesh, resume) and, if it fails, the traceback."""
  with open(path, "a") as file:
    file.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} training.trainer.train, resume=True\n")
    handler = logging.StreamHandler(file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    package_log = logging.getLogger("repvideo_jax")
    level, propagate = package_log.level, package_log.propagate
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False  # to the file only, as when train.py ran as a subprocess
    try:
      with contextlib.redirect_stdout(_LogTee(file, echo)):
        yield
    except BaseException:
      file.write(traceback.format_exc())
      raise
    finally:
      package_log.removeHandler(handler)
      package_log.setLevel(level)
      package_log.propagate = propagate


def _store_as(folder: pathlib.Path, dtype: str) -> None:
  """Rewrites a converted component's float arrays in ``dtype`` (half the bytes for float16); the
  loaders cast them back to the config's param_dtype, so only the stored precision changes."""
  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  params, meta = checkpoint_io.load_params(folder)
  params = jax.tree.map(lambda a: a.astype(target) if np.issubdtype(a.dtype, np.floating) else a, params)
  checkpoint_io.save_params(folder, params, metadata={**meta, "storage_dtype": dtype}, overwrite=True)


def finished_step(run_dir: pathlib.Path) -> int | None:
  """The step of the run's last complete checkpoint (None before the first)."""
  if not (run_dir / "checkpoints").is_dir():
    return None
  ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _install(model: pathlib.Path, target: pathlib.Path) -> None:
  """Copies a model folder over ``target`` (the bundled location), keeping ``target/ablations``."""
  with outputs.staged_dir(target) as tmp:
    shutil.copytree(model, tmp, dirs_exist_ok=True)
    if (target / "ablations").is_dir():
      shutil.copytree(target / "ablations", tmp / "ablations")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m repvideo_jax.demo.build",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--config", default="demo", help="recipe preset in configs/ or a YAML file")
  parser.add_argument("--out", default="runs/demo", help="build folder (default runs/demo)")
  parser.add_argument("--name", default="model", help="name of the transformer variant (ablations)")
  parser.add_argument(
    "--install",
    action="store_true",
    help="copy the result into the package: the bundled demo model, or for another "
    "--name its transformer as ablations/<name>/transformer",
  )
  parser.add_argument(
    "--base",
    metavar="DIR",
    help="a model folder this command wrote (e.g. repvideo_jax/demo/model): skip the training stages "
    "and run the data, records, tuning and decoder_fitting stages on its weights",
  )
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  try:
    recipe = load_recipe(args.config, args.overrides)
    build(
      recipe,
      args.out,
      name=args.name,
      install=args.install,
      progress=not args.no_progress,
      recipe_name=str(args.config),
      base=args.base,
    )
  except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from repvideo_jax import host_memory  # noqa: PLC0415

  host_memory.setup_cli()  # before JAX starts: see repvideo_jax/host_memory.py
  sys.exit(main())
