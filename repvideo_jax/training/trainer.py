"""The training loop behind ``train.py``: config, mesh, sharded state, data, checkpoints, logging.

One code path for 2 CPU cores, one GPU and a multi-host pod:
  * ``jax.distributed.initialize`` (automatic on TPU pods / SLURM, explicit coordinator flags
    elsewhere); only process 0 writes logs and metadata.
  * one mesh ``(data, fsdp, tensor, context)`` from the ``mesh:`` section (``sharding.MeshConfig``;
    ``dcn_data`` multiplies the data axis across slices); params and optimizer state are sharded by
    the models' logical axes under ``mesh.logical_axis_rules`` (by default embed -> fsdp,
    heads/mlp -> tensor), activations by batch over (data, fsdp) and by sequence over context;
  * the train step is one ``jax.jit`` with explicit in/out shardings and the state buffers donated;
  * orbax checkpoints (``training.checkpoints``) hold state, data-iterator state and the resolved
    config; ``--resume`` continues exactly; SIGTERM saves and exits.

FLOPs (for MFU), per training sample, with S tokens (text + video), L layers, width D, MLP F:
    forward  = 2 S L (4 D^2 + 2 D F)      # q, k, v, out projections and the MLP
             + 4 L S^2 D                  # attention scores and weighted sum
             + 2 S_video (p^2 C D + D p^2 C) + 2 S_text T D   # patch in/out, text projection
    training = 3 x forward                # backward ~ 2 x forward
(AdaLN modulation matmuls act once per sample, not per token, and are ignored.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import signal
import socket
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from repvideo_jax import config as config_lib
from repvideo_jax import lora as lora_lib
from repvideo_jax import outputs, pipeline, schedule, sharding, transformer_weights, video_io
from repvideo_jax import transformer as T
from repvideo_jax.attention import check_head_split
from repvideo_jax.data.online import OnlineIterator
from repvideo_jax.data.pipeline import make_train_iterator
from repvideo_jax.training import optim
from repvideo_jax.training.checkpoints import Checkpointer
from repvideo_jax.training.optim import OptimConfig
from repvideo_jax.vae import VAEConfig

log = logging.getLogger("repvideo_jax.train")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  records: str | None = None  # folder written by `python -m repvideo_jax.data.prepare`
  videos: str | None = None  # online mode: video folder + captions file + model folder
  captions: str | None = None
  model: str | None = None
  frames: int = 49
  height: int = 480
  width: int = 720
  fps: float = 8.0
  num_workers: int = 0
  shuffle_seed: int = 0
  synthetic: bool = False  # random latents/text of the right shapes (smoke tests, benchmarks)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  output_dir: str = "runs/default"
  init_from: str | None = None  # converted model folder (or its transformer/) to fine-tune from
  steps: int = 1000
  global_batch: int = 8
  seed: int = 0
  ucg_rate: float = 0.1
  log_every: int = 10
  save_every: int = 500
  keep: int = 3
  async_checkpoint: bool = True
  sample_every: int = 0  # 0: never; needs data.model (a full pipeline folder) for VAE and T5
  sample_prompts: tuple[str, ...] = ()
  sample_steps: int = 20
  timestep_strata: int | None = None  # stratify timesteps over this many ranks; None = data-parallel size
  max_wall_seconds: float | None = None  # stop (and save) after this long
  peak_tflops_per_device: float = 0.17  # for MFU; CPU practical peak here, set yours (e.g. 459 v5p)
  wandb_project: str | None = None
  tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
  """The LoRA a run with ``optim.train: lora`` trains (``repvideo_jax.lora``); ignored otherwise.
  The base params are frozen; the factors train at ``optim.lr`` with ``optim.weight_decay``, the
  RepVideo gates (``train_gates``) at ``optim.gate_lr``."""

  rank: int = 64
  alpha: float | None = None  # None: alpha = rank (scaling 1)
  targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")  # lora.LORA_TARGETS names
  dropout: float = 0.0  # peft's: dropout on the LoRA branch's input while training (0: none)
  train_gates: bool = True
  base_dtype: str = "float32"  # the frozen base params' storage dtype: float32 or bfloat16
  seed: int | None = None  # the factors' init key; None = run.seed

  def __post_init__(self):
    if isinstance(self.targets, list):
      object.__setattr__(self, "targets", tuple(self.targets))
    self.lora_config()  # validates rank, alpha, targets, dropout
    if self.base_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"lora.base_dtype must be 'float32' or 'bfloat16', got {self.base_dtype!r}")

  def lora_config(self) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets, dropout=self.dropout)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  transformer: T.TransformerConfig
  optim: OptimConfig
  mesh: sharding.MeshConfig
  data: DataConfig
  run: RunConfig
  lora: LoraTrainConfig = LoraTrainConfig()

  @property
  def trains_lora(self) -> bool:
    return self.optim.train == "lora"


def load_config(preset: str, overrides=()) -> TrainConfig:
  """A training preset (YAML with transformer/optim/mesh/data/run sections) plus overrides."""
  return config_from_dict(config_lib.load_yaml(preset, overrides), str(preset))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
  return {
    k: config_lib.to_dict(getattr(cfg, k)) for k in ("transformer", "optim", "mesh", "data", "run", "lora")
  }


# ----------------------------------------------------------------------------------------------
# Distributed set-up and shardings (the mesh itself: ``sharding.build_mesh``).


def maybe_initialize_distributed(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
  """Explicit coordinator flags, or automatic detection on TPU pods / SLURM / Open MPI."""
  if coordinator:
    jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
  elif (
    any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    and os.environ.get("REPVIDEO_NO_AUTO_DISTRIBUTED") is None
  ):
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:  # single-host TPU VM etc.
      log.info("jax.distributed.initialize skipped: %s", e)


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def state_shardings(abstract_state, param_shardings, mesh):
  """Shardings for the whole train state: any leaf whose key path ends with a param's key path and
  has the param's shape (Adam moments, EMA, the params themselves) shares that param's sharding;
  everything else (step counters, RNG, scalars) is replicated."""
  by_suffix = {}
  for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    by_suffix[_keys(path)] = s
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def pick(path, leaf):
    keys = _keys(path)
    for n in range(len(keys), 0, -1):
      s = by_suffix.get(keys[-n:])
      if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def model_flops_per_sample(cfg: T.TransformerConfig, latent_shape, text_length: int) -> float:
  """Training FLOPs per sample (3 x forward), as in the module docstring."""
  t, h, w, c = latent_shape
  p, d, f, layers = cfg.patch_size, cfg.hidden_size, cfg.ff_dim, cfg.num_layers
  video = t * (h // p) * (w // p)
  s = video + text_length
  forward = (
    2 * s * layers * (4 * d * d + 2 * d * f)
    + 4 * layers * s * s * d
    + 2 * video * 2 * p * p * c * d
    + 2 * text_length * cfg.text_embed_dim * d
  )
  return 3.0 * forward


# ----------------------------------------------------------------------------------------------
# Logging (process 0 only).


class Logger:
  def __init__(self, run: RunConfig, out: pathlib.Path, config_dict: dict):
    self.enabled = jax.process_index() == 0
    self.tb = self.wandb = None
    if not self.enabled:
      return
    out.mkdir(parents=True, exist_ok=True)
    if run.tensorboard:
      # Imported here, not at the top: tensorboardX takes ~1.5 s to import (measured on this
      # project's venv), paid only by runs that write TensorBoard logs.
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      self.tb = SummaryWriter(str(out / "tensorboard"))
    if run.wandb_project:
      import wandb  # noqa: PLC0415 -- optional dependency (not in requirements.txt): imported only when asked for

      self.wandb = wandb.init(project=run.wandb_project, config=config_dict, dir=str(out))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)
      self.tb.flush()
    if self.wandb is not None:
      self.wandb.log(values, step=step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


# ----------------------------------------------------------------------------------------------
# The loop.


def _base_cast(cfg: TrainConfig, params):
  """A LoRA run's frozen base in ``lora.base_dtype`` (the trained gates stay in their dtype)."""
  if not cfg.trains_lora or cfg.lora.base_dtype == "float32":
    return params
  dtype = jnp.dtype(cfg.lora.base_dtype)
  cast = {k: v if k == "gates" else jax.tree.map(lambda x: x.astype(dtype), v) for k, v in params.items()}
  return cast


def optimizer_and_abstract_state(cfg: TrainConfig):
  """(optimizer, train state as ShapeDtypeStructs) for a config: what a checkpoint holds."""
  abstract_params = jax.eval_shape(lambda p: _base_cast(cfg, p), T.abstract_params(cfg.transformer))
  ema = bool(cfg.optim.ema_decay)
  if cfg.trains_lora:
    abstract_lora = jax.eval_shape(lambda: lora_lib.init(cfg.transformer, cfg.lora.lora_config(), 0))
    trainable = optim.lora_trainable(abstract_params, abstract_lora)
    optimizer = optim.make_optimizer(cfg.optim, trainable, cfg.lora.train_gates)
    return optimizer, jax.eval_shape(
      lambda p, lo: optim.init_train_state(p, optimizer, 0, ema, lora=lo), abstract_params, abstract_lora
    )
  optimizer = optim.make_optimizer(cfg.optim, abstract_params)
  return optimizer, jax.eval_shape(lambda p: optim.init_train_state(p, optimizer, 0, ema), abstract_params)


def config_from_dict(tree: dict[str, Any], where: str = "config") -> TrainConfig:
  """A ``TrainConfig`` from ``config_to_dict``'s output (e.g. a run's config.resolved.json)."""
  sections = {
    "transformer": T.TransformerConfig,
    "optim": OptimConfig,
    "mesh": sharding.MeshConfig,
    "data": DataConfig,
    "run": RunConfig,
    "lora": LoraTrainConfig,
  }
  unknown = set(tree) - set(sections)
  if unknown:
    raise ValueError(f"{where}: unknown section(s) {sorted(unknown)}")
  return TrainConfig(
    **{k: config_lib.from_dict(cls, tree.get(k) or {}, f"{where}:{k}") for k, cls in sections.items()}
  )


def load_run(run_dir: str | pathlib.Path, step: int | None = None) -> tuple[TrainConfig, dict, int]:
  """(config, train state as host arrays, step) of a ``train.py`` run folder's last (or ``step``)
  checkpoint, restored on one device whatever mesh it was trained on."""
  run_dir = pathlib.Path(run_dir)
  resolved = run_dir / "config.resolved.json"
  if not resolved.is_file() or not (run_dir / "checkpoints").is_dir():
    raise FileNotFoundError(
      f"{run_dir} is not a train.py run folder (needs config.resolved.json and "
      "checkpoints/); pass the run.output_dir of a training run"
    )
  cfg = config_from_dict(json.loads(resolved.read_text()), str(resolved))
  _, abstract = optimizer_and_abstract_state(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"{run_dir}/checkpoints holds no complete checkpoint yet")
    step = ckpt.latest_step() if step is None else step
    state, _, _ = ckpt.restore(target, step)
  finally:
    ckpt.close()
  return cfg, jax.device_get(state), step


def export_transformer(
  run_dir: str | pathlib.Path,
  dst: str | pathlib.Path,
  *,
  step: int | None = None,
  use_ema: bool | None = None,
  overwrite: bool = False,
) -> T.TransformerConfig:
  """Writes a run's trained transformer (its EMA when the run kept one, unless ``use_ema=False``) as
  a converted transformer folder that ``transformer_weights.load`` and model folders use."""
  cfg, state, step = load_run(run_dir, step)
  if use_ema and state.get("ema") is None:
    raise ValueError(f"{run_dir} kept no EMA (optim.ema_decay unset); export without use_ema")
  ema = state.get("ema") is not None and use_ema is not False
  params = trained_params(state, use_ema=ema)
  transformer_weights.save(
    dst,
    cfg.transformer,
    params,
    overwrite=overwrite,
    source=f"train.py run {pathlib.Path(run_dir).resolve()} step {step}{' (EMA)' if ema else ''}",
  )
  return cfg.transformer


def trained_params(state: dict, use_ema: bool = False) -> dict:
  """The model a train state holds as plain params: its params (or EMA), and for a LoRA run the
  base with the trained gates and the LoRA merged in (scale 1)."""
  if "lora" not in state:
    return state["ema"] if use_ema else state["params"]
  trained = state["ema"] if use_ema else optim.lora_trainable(state["params"], state["lora"])
  base = {**state["params"], **{k: v for k, v in trained.items() if k == "gates"}}
  return lora_lib.merge(base, trained["lora"])


def export_lora(
  run_dir: str | pathlib.Path,
  dst: str | pathlib.Path,
  *,
  fmt: str = "ours",
  step: int | None = None,
  use_ema: bool | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes the LoRA a ``optim.train: lora`` run trained (its EMA when kept, unless ``use_ema=False``)
  as ``lora.save`` does (``fmt`` "ours" or "peft"), for ``sample.py --lora``. Returns what was
  written. When the run also trained the gates, the LoRA holds them as offsets from the base
  model's (our format; diffusers' has no place for them and is written without, with a warning)."""
  cfg, state, step = load_run(run_dir, step)
  if "lora" not in state:
    raise ValueError(
      f"{run_dir} did not train a LoRA (optim.train={cfg.optim.train!r}); use export_transformer"
    )
  if use_ema and state.get("ema") is None:
    raise ValueError(f"{run_dir} kept no EMA (optim.ema_decay unset); export without use_ema")
  ema = state.get("ema") is not None and use_ema is not False
  trained = state["ema"] if ema else optim.lora_trainable(state["params"], state["lora"])
  tree = dict(trained["lora"])
  if cfg.lora.train_gates and "gates" in trained:
    base_gates = np.asarray(initial_params(cfg)["gates"], np.float32)
    tree["gates"] = np.asarray(trained["gates"], np.float32) - base_gates
  return lora_lib.save(
    dst,
    jax.tree.map(np.asarray, tree),
    cfg.lora.lora_config(),
    fmt=fmt,
    base=lora_lib.base_description(cfg.transformer, cfg.run.init_from),
    overwrite=overwrite,
  )


def _transformer_source(path: str) -> pathlib.Path:
  p = pathlib.Path(path)
  return p / "transformer" if (p / "transformer").is_dir() else p


class SyntheticBatches:
  """Random (latents, text) batches with the config's shapes; state = position (deterministic)."""

  def __init__(self, cfg: TrainConfig):
    shapes = batch_shapes(cfg)
    self.batch = cfg.run.global_batch // jax.process_count()
    self.latent_shape, self.text_shape = shapes["latents"][1:], shapes["text"][1:]
    self.seed, self.position = cfg.data.shuffle_seed + 1000 * jax.process_index(), 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.position])
    self.position += 1
    return {
      "latents": rng.standard_normal((self.batch, *self.latent_shape), np.float32),
      "text": rng.standard_normal((self.batch, *self.text_shape), np.float32),
    }

  def get_state(self) -> bytes:
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state) -> None:
    self.position = json.loads(state)["position"]


def make_data_iterator(cfg: TrainConfig):
  """Records (grain) when ``data.records`` is set, else the online mode over videos + captions."""
  d, r = cfg.data, cfg.run
  if d.synthetic:
    return SyntheticBatches(cfg)
  if d.records:
    return make_train_iterator(
      d.records, global_batch=r.global_batch, seed=d.shuffle_seed, num_workers=d.num_workers
    )
  if d.videos and d.captions and d.model:
    if r.global_batch % jax.process_count():
      raise ValueError(f"global_batch {r.global_batch} must divide by {jax.process_count()} processes")
    return OnlineIterator(
      d.captions,
      d.videos,
      d.model,
      batch_size=r.global_batch // jax.process_count(),
      seed=d.shuffle_seed,
      frames=d.frames,
      height=d.height,
      width=d.width,
      fps=d.fps,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
    )
  raise ValueError(
    "no training data: set data.records (a prepared dataset) or data.videos + "
    "data.captions + data.model (online mode)"
  )


def initial_params(cfg: TrainConfig):
  if cfg.run.init_from:
    tcfg, params = transformer_weights.load(_transformer_source(cfg.run.init_from), config=cfg.transformer)
    log.info("initialised from %s", cfg.run.init_from)
    return params
  return T.init(cfg.transformer, jax.random.key(cfg.run.seed))


class TrainStep(NamedTuple):
  """The compiled-to-be train step of a config on a mesh, with everything needed to feed it."""

  fn: Any  # jax.jit(train_step) with in/out shardings, state donated: fn(state, batch) -> (state, metrics)
  optimizer: Any
  abstract_state: Any  # the train state as ShapeDtypeStructs (no sharding)
  param_shardings: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding


def batch_shapes(cfg: TrainConfig) -> dict[str, tuple[int, ...]]:
  """Global shapes of one training batch: latents (B, T, h, w, C) and text (B, L, D). A training
  config holds no VAE section, so the latent size is the default (released) VAE's compression."""
  d, t = cfg.data, cfg.transformer
  latent = (*VAEConfig().latent_size(d.frames, d.height, d.width), t.in_channels)
  return {
    "latents": (cfg.run.global_batch, *latent),
    "text": (cfg.run.global_batch, t.text_length, t.text_embed_dim),
  }


def build_train_step(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> TrainStep:
  """The train step jitted with the mesh's shardings (params by ``transformer.logical_axes`` and
  ``sharding.tree_shardings``; optimizer state and EMA like their params; batch over data x fsdp),
  all under ``cfg.mesh.logical_axis_rules`` -- which the step also makes the active table while it
  is traced, so the models' ``sharding.constrain`` calls follow it whoever calls or lowers the step.
  ``train`` runs it; ``aot`` and ``train.py --compile-only`` only compile it."""
  run, tcfg, rules = cfg.run, cfg.transformer, cfg.mesh.logical_axis_rules
  dp = sharding.logical_size(mesh, "activation_batch", rules)  # data x fsdp under the default rules
  if run.global_batch % dp:
    raise ValueError(
      f"global_batch {run.global_batch} must be a multiple of the data-parallel size {dp} (the mesh "
      f"axes of logical_axis_rules.activation_batch: {rules['activation_batch']})"
    )
  check_head_split(
    tcfg.num_heads,
    sharding.logical_size(mesh, "activation_heads", rules),
    sharding.logical_size(mesh, "activation_length", rules),
  )
  param_sh = sharding.tree_shardings(T.logical_axes(tcfg), mesh, rules)
  optimizer, abstract_state = optimizer_and_abstract_state(cfg)
  by_path = param_sh
  if cfg.trains_lora:  # the factors (and their moments / EMA) by lora.logical_axes under the same rules
    lora_axes = lora_lib.logical_axes(tcfg, cfg.lora.lora_config())
    by_path = {**param_sh, "lora": sharding.tree_shardings(lora_axes, mesh, rules)}
  state_sh = state_shardings(abstract_state, by_path, mesh)
  batch_sh = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("activation_batch",), rules))
  table = jnp.asarray(schedule.sqrt_alpha_table(), jnp.float32)

  def step(state, batch):  # a new function per call: jax keeps no trace made under other rules
    with sharding.logical_rules(rules):
      return optim.train_step(
        state,
        batch,
        apply_fn=T.make_apply(tcfg),
        optimizer=optimizer,
        table=table,
        world_size=run.timestep_strata or dp,
        ucg_rate=run.ucg_rate,
        ema_decay=cfg.optim.ema_decay,
        lora_dropout=cfg.lora.dropout if cfg.trains_lora else 0.0,
      )

  fn = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
  return TrainStep(fn, optimizer, abstract_state, param_sh, state_sh, batch_sh)


def abstract_inputs(step: TrainStep, cfg: TrainConfig):
  """(state, batch) as ShapeDtypeStructs carrying the step's shardings: ``step.fn.lower(*these)``."""
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), step.abstract_state, step.state_shardings
  )
  batch = {
    k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=step.batch_sharding)
    for k, shape in batch_shapes(cfg).items()
  }
  return state, batch


@contextlib.contextmanager
def claim_run_folder(out: pathlib.Path, *, resume: bool, overwrite: bool = False):
  """Process 0 holds an exclusive lock on ``out/.lock`` while the run lives (released on exit, also
  on a crash: it is a kernel lock, so a leftover file is never a stale lock). A folder that holds an
  earlier run is refused unless ``resume`` (continue it) or ``overwrite`` (move it aside first)."""
  if jax.process_index() != 0:
    yield
    return
  out.mkdir(parents=True, exist_ok=True)
  handle = open(out / ".lock", "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    raise FileExistsError(
      f"{out} is in use by another training run ({holder}); wait for it to end or "
      "set a different run.output_dir"
    ) from None
  try:
    handle.seek(0)
    handle.truncate()
    handle.write(f"train.py pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    earlier = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    if earlier and not resume:
      if not overwrite:
        raise FileExistsError(
          f"{out} already holds a training run ({', '.join(earlier)}): pass --resume to continue it, "
          f"--overwrite to move it aside, or set a different run.output_dir"
        )
      aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
      aside.mkdir()
      for name in earlier:
        os.replace(out / name, aside / name)
      log.warning("--overwrite: moved the earlier run in %s to %s", out, aside)
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def train(
  cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, data_iterator=None, on_step=None
) -> dict[str, Any]:
  """Runs (or resumes) training; returns {'losses': [(step, loss) of each logged step], 'final_step':
  n, 'state': the train state (params, optimizer state, EMA, step, RNG), 'stopped': None | 'sigterm' |
  'max_wall_seconds', 'skipped_steps': consecutive non-finite steps at the end (always 0: a run that
  ends on skipped steps raises RuntimeError instead, as does one that reaches
  ``optim.max_nonfinite_in_a_row`` of them in a row)}.

  ``resume`` continues the run in ``run.output_dir``; a folder holding an earlier run is refused
  without it, unless ``overwrite`` moves that run aside. ``data_iterator``: any iterator of
  {'latents', 'text'} per-process batches with get_state/set_state (default from ``cfg.data``).
  ``on_step(step, metrics)`` is called after each logged step (tests).
  """
  with claim_run_folder(pathlib.Path(cfg.run.output_dir), resume=resume, overwrite=overwrite):
    return _train(set_up(cfg, resume=resume, data_iterator=data_iterator), on_step)


@dataclasses.dataclass
class Session:
  """Everything the training loop works with; ``set_up`` builds it."""

  cfg: TrainConfig
  out: pathlib.Path  # run.output_dir
  mesh: jax.sharding.Mesh
  train_step: TrainStep
  data: Any  # iterator of per-process {'latents', 'text'} batches with get_state / set_state
  ckpt: Checkpointer
  meta: dict  # the ``meta`` item of every checkpoint: {'config': the resolved config}
  logger: Logger
  state: Any  # the train state (sharded), replaced by every step
  start: int  # the step the state is at when the loop starts

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def placed(self):
    """The block in which the run's programs are traced and run: its mesh and logical-axis rules."""
    return sharding.activate(self.mesh, self.cfg.mesh.logical_axis_rules)

  def next_batch(self) -> dict[str, jax.Array]:
    """The next per-process batch of the iterator as global arrays, split over the batch axes."""
    local = next(self.data)
    return {
      k: jax.make_array_from_process_local_data(
        self.train_step.batch_sharding, np.asarray(local[k], np.float32)
      )
      for k in ("latents", "text")
    }

  def save(self, step: int, force: bool = False) -> None:
    self.ckpt.save(step, self.state, _data_state(self.data), self.meta, force=force)


def set_up(cfg: TrainConfig, *, resume: bool = False, data_iterator=None) -> Session:
  """Builds a run: the mesh and jitted step, the resolved config in the run folder (process 0), the
  data iterator, the checkpointer, the train state -- restored with the iterator's position from the
  last checkpoint when ``resume`` finds one, else initialised -- and the logger. The caller holds the
  run folder (``claim_run_folder``)."""
  run = cfg.run
  out = pathlib.Path(run.output_dir)
  mesh = sharding.build_mesh(cfg.mesh)
  built = build_train_step(cfg, mesh)
  config_dict = config_to_dict(cfg)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write(out / "config.resolved.json", json.dumps(config_dict, indent=2))
    log.info("resolved config:\n%s", json.dumps(config_dict, indent=2))
    log.info(
      "mesh %s over %d devices, %d process(es)", dict(mesh.shape), jax.device_count(), jax.process_count()
    )
  data = data_iterator if data_iterator is not None else make_data_iterator(cfg)
  ckpt = Checkpointer(
    out / "checkpoints", save_every=run.save_every, keep=run.keep, async_save=run.async_checkpoint
  )
  with sharding.activate(mesh, cfg.mesh.logical_axis_rules):
    state = _restore_or_init_state(cfg, built, ckpt, data, resume)
  return Session(
    cfg,
    out,
    mesh,
    built,
    data,
    ckpt,
    {"config": config_dict},
    Logger(run, out, config_dict),
    state,
    int(state["step"]),
  )


def _restore_or_init_state(cfg: TrainConfig, built: TrainStep, ckpt: Checkpointer, data, resume: bool):
  """The last checkpoint's state (and the iterator moved to its position) when resuming, else a new
  state from ``initial_params``; laid out by the step's shardings. Runs under the run's mesh."""
  if resume and ckpt.latest_step() is not None:
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      built.abstract_state,
      built.state_shardings,
    )
    state, data_state, _ = ckpt.restore(target)
    data.set_state(data_state.encode() if isinstance(data_state, str) else json.dumps(data_state).encode())
    log.info("resumed from step %d", int(state["step"]))
    return state
  if resume:
    log.info("--resume: no checkpoint in %s yet, starting fresh", ckpt.directory)
  params = jax.device_put(initial_params(cfg), built.param_shardings)
  ema = bool(cfg.optim.ema_decay)
  if cfg.trains_lora:
    lcfg = cfg.lora
    seed = cfg.run.seed if lcfg.seed is None else lcfg.seed
    init = jax.jit(
      lambda p: optim.init_train_state(
        _base_cast(cfg, p),
        built.optimizer,
        jax.random.key(cfg.run.seed),
        ema,
        lora=lora_lib.init(cfg.transformer, lcfg.lora_config(), jax.random.key(seed + 1)),
      ),
      out_shardings=built.state_shardings,
    )
    return init(params)
  init = jax.jit(
    lambda p: optim.init_train_state(p, built.optimizer, jax.random.key(cfg.run.seed), ema),
    out_shardings=built.state_shardings,
  )
  return init(params)


def _train(s: Session, on_step) -> dict[str, Any]:
  """The loop of ``train``: step, log, sample, checkpoint; stop on SIGTERM or max_wall_seconds."""
  run = s.cfg.run
  stop = {"why": None}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(why="sigterm"))
  meter, losses, sampler_cache = _Meter(s.cfg), [], {}
  try:
    with s.placed():
      for done in range(s.start + 1, run.steps + 1):  # done: the step count after this step
        batch = s.next_batch()
        s.state, metrics = s.train_step.fn(s.state, batch)
        if done % run.log_every == 0 or done == run.steps or done == s.start + 1:
          m = meter.measure(done, metrics, batch)
          losses.append((done, m["loss"]))
          _log_step(s, done, m, on_step)
        if run.sample_every and done % run.sample_every == 0:
          _write_samples(s.cfg, s.state, done, s.out, sampler_cache)
        if s.ckpt.should_save(done):  # the iterator state is serialised only when a save is due
          s.save(done)
        if run.max_wall_seconds and time.time() - meter.t_start > run.max_wall_seconds:
          log.info("max_wall_seconds reached at step %d", done)
          stop["why"] = "max_wall_seconds"
        if stop["why"]:
          log.info("stopping at step %d: saving a checkpoint", done)
          break
      final = int(s.state["step"])
      if s.ckpt.latest_step() != final:
        s.save(final, force=True)
      s.ckpt.close()
  finally:
    signal.signal(signal.SIGTERM, previous)
    s.logger.close()
  skipped = int(jax.device_get(optim.nonfinite_count(s.state["opt_state"])))
  if skipped:  # the guard was still dropping updates when the run ended: the result is not trained
    raise RuntimeError(
      f"training ended on {skipped} non-finite step(s) in a row (updates skipped; checkpoint {final} "
      f"saved in {s.out / 'checkpoints'}): lower the learning rate or warmup, tighten clip_norm, or "
      "check the data for NaN/inf"
    )
  return {
    "losses": losses,
    "final_step": final,
    "state": s.state,
    "stopped": stop["why"],
    "skipped_steps": skipped,
  }


class _Meter:
  """Step time, throughput and MFU of the steps since the last logged one."""

  def __init__(self, cfg: TrainConfig):
    self.cfg, self.flops = cfg, None
    self.t_start = self.t_last = time.time()

  def measure(self, done: int, metrics, batch) -> dict[str, float]:
    """The step's metrics as floats, with step_time_s, samples_per_s, tokens_per_s and mfu added."""
    run, tcfg = self.cfg.run, self.cfg.transformer
    latents, text = batch["latents"].shape, batch["text"].shape
    if self.flops is None:
      self.flops = model_flops_per_sample(tcfg, latents[1:], text[1])
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.time()
    n_steps = run.log_every if done % run.log_every == 0 else 1
    dt = (now - self.t_last) / max(1, n_steps)
    self.t_last = now
    tokens = run.global_batch * (text[1] + int(np.prod(latents[1:4])) // tcfg.patch_size**2)
    m.update(
      step_time_s=dt,
      samples_per_s=run.global_batch / dt,
      tokens_per_s=tokens / dt,
      mfu=self.flops * run.global_batch / dt / (run.peak_tflops_per_device * 1e12 * jax.device_count()),
    )
    return m


def _log_step(s: Session, done: int, m: dict[str, float], on_step) -> None:
  """Prints a logged step (process 0), writes its scalars, stops on too many non-finite steps."""
  run = s.cfg.run
  if s.is_main:
    print(
      f"step {done}/{run.steps} loss {m['loss']:.5f} lr {m.get('lr', 0):.2e} "
      f"gnorm {m.get('grad_norm', 0):.3f} {m['step_time_s']:.3f}s/step {m['samples_per_s']:.2f} samples/s "
      f"{m['tokens_per_s']:.0f} tok/s mfu {100 * m['mfu']:.1f}%"
      f"{' SKIPPED (non-finite)' if m.get('skipped') else ''}",
      flush=True,
    )
  s.logger.scalars(done, m)
  optim.check_nonfinite(s.state["opt_state"], s.cfg.optim.max_nonfinite_in_a_row)
  if on_step is not None:
    on_step(done, m)


def _write_samples(cfg: TrainConfig, state, step: int, out: pathlib.Path, cache: dict) -> None:
  """Sample videos from ``run.sample_prompts`` with the current (EMA if kept) weights -> mp4s."""
  run, d = cfg.run, cfg.data
  if not run.sample_prompts or not d.model:
    if not cache.get("warned"):
      log.warning(
        "run.sample_every is set but run.sample_prompts or data.model (a model folder with "
        "vae/, text_encoder/, tokenizer/) is missing: no sample videos"
      )
      cache["warned"] = True
    return
  if jax.process_count() > 1:
    if not cache.get("warned"):
      log.warning("sample videos during training are written by single-process runs only")
      cache["warned"] = True
    return
  if "pipe" not in cache:
    cache["pipe"] = pipeline.load_pipeline(d.model)
  weights = trained_params(state, use_ema=state.get("ema") is not None)
  pipe = dataclasses.replace(
    cache["pipe"], transformer_config=cfg.transformer, transformer_params=jax.device_get(weights)
  )
  settings = pipeline.GenerationSettings(
    num_frames=d.frames, height=d.height, width=d.width, steps=run.sample_steps, seed=run.seed
  )
  frames = pipeline.generate(pipe, list(run.sample_prompts), settings)
  folder = out / "samples"
  folder.mkdir(parents=True, exist_ok=True)
  for i, video in enumerate(frames):
    video_io.write_mp4(folder / f"step{step:07d}_{i}.mp4", video, fps=d.fps)
  log.info("wrote %d sample video(s) to %s", len(frames), folder)


def _data_state(data) -> Any:
  state = data.get_state()
  if isinstance(state, bytes):
    state = state.decode()
  return json.loads(state) if isinstance(state, str) else state
