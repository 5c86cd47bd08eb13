"""Optimizer, EMA and the pure train step for fine-tuning RepVideo.

The release publishes no training recipe, so what is trained is configurable: the whole
DiT including the gates (``train='all'``, what SAT's default freezing implies) or only the
per-layer gates (``train='gates'``), or a LoRA (``train='lora'``, ``repvideo_jax.lora``) on the frozen
base with, optionally, the gates. Gates start at 0.5, so fine-tuning is needed either way.

Learning-rate schedule, for the n-th optimizer update (n = 0, 1, ...; W = warmup_steps, N = total_steps):
  warmup(n) = min(1, (n + 1) / W)                           (1 if W = 0; the first update is not wasted)
  constant:  lr(n) = peak warmup(n)
  cosine:    lr(n) = peak warmup(n) (r + (1 - r) (1 + cos(pi p)) / 2),  p = clip((n - W) / (N - W), 0, 1)
with r = end_lr_ratio. The gates use the same shape with peak ``gate_lr`` (default: ``lr``).

The gradient transformation, outermost first (labels from ``param_labels``):
  partition  'frozen' -> set_to_zero (no optimizer state)
             'train'  -> record the global grad norm (trainable params, pre-clip; for metrics)
                      -> apply_if_finite: a micro-step whose grads hold NaN/inf is dropped (zero update,
                         inner state untouched) and counted; it never gives up on its own -- the host
                         calls ``check_nonfinite`` to stop after ``max_nonfinite_in_a_row``
                      -> MultiSteps(k = grad_accum_steps): mean of k micro-batch grads (k > 1 only)
                      -> clip_by_global_norm(clip_norm)
                      -> partition  'decay'    -> AdamW(lr, weight_decay)   kernels, patch_kernel
                                    'no_decay' -> AdamW(lr, 0)              norms, biases, patch_bias
                                    'gates'    -> AdamW(gate_lr, 0)         the RepVideo gates
Adam is elementwise, so separate AdamW instances per partition equal one AdamW with a decay mask.
Frozen params get no Adam moments and no accumulator (gates-only training keeps ~no optimizer state).

LoRA training (``train='lora'``): the state also holds ``lora`` (the LoRA tree, float32); the optimizer and
the EMA cover only the trainable tree ``{"lora": state["lora"], "gates": state["params"]["gates"]}``
(``lora_trainable``): the factors are labelled 'decay', alpha 'frozen', the gates 'gates' (or 'frozen'
with ``train_gates=False``). The base params are never differentiated nor updated (only the gates are
written back), and the loss runs ``apply_fn(base, ..., lora=[(lora, 1.0)])`` (unmerged, in the scan).

EMA (float32):  ema <- decay ema + (1 - decay) params, applied only on steps that changed the params
(not on accumulation micro-steps nor on skipped non-finite steps).

``TrainState`` is a plain dict {step, params, opt_state, ema, rng} (+ lora) of arrays (rng as raw uint32 key
data), so orbax can save it; ``train_step`` is pure and jittable (the caller jits with shardings).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from repvideo_jax import transformer as T
from repvideo_jax.training import objective

LABELS = ("frozen", "decay", "no_decay", "gates")
_NEVER_GIVE_UP = 2**31 - 2  # apply_if_finite must never accept a non-finite update by itself
_NO_DECAY_NAMES = ("bias", "scale", "patch_bias", "gates")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer hyper-parameters (RepVideo's are unpublished; defaults follow CogVideoX SAT fine-tuning)."""

  lr: float = 1e-5
  warmup_steps: int = 100  # optimizer updates (after gradient accumulation), not micro-steps
  schedule: Literal["constant", "cosine"] = "constant"
  total_steps: int = 10000  # cosine horizon in optimizer updates
  end_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 1e-4  # decoupled (AdamW), kernels only
  clip_norm: float | None = 1.0  # global grad-norm clip; None / 0 = off
  gate_lr: float | None = None  # None = lr
  train: Literal["all", "gates", "lora"] = "all"  # lora: the TrainConfig's lora section
  grad_accum_steps: int = 1
  ema_decay: float | None = None  # None / 0 = no EMA
  max_nonfinite_in_a_row: int | None = 5  # check_nonfinite raises at this many; None / 0 = never

  def __post_init__(self):
    for name in (
      "lr",
      "gate_lr",
      "b1",
      "b2",
      "eps",
      "weight_decay",
      "clip_norm",
      "ema_decay",
      "end_lr_ratio",
    ):
      value = getattr(self, name)
      if value is not None and not math.isfinite(value):
        raise ValueError(f"optim.{name} must be a finite number, got {value}")
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
    if self.train not in ("all", "gates", "lora"):
      raise ValueError(f"train must be 'all', 'gates' or 'lora', got {self.train!r}")
    if self.lr < 0 or (self.gate_lr is not None and self.gate_lr < 0):
      raise ValueError(f"learning rates must be >= 0, got lr={self.lr}, gate_lr={self.gate_lr}")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
      raise ValueError(
        f"cosine schedule needs total_steps ({self.total_steps}) > warmup_steps ({self.warmup_steps})"
      )
    if self.grad_accum_steps < 1:
      raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
    if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay must be in [0, 1) (or None), got {self.ema_decay}")

  @property
  def peak_gate_lr(self) -> float:
    return self.lr if self.gate_lr is None else self.gate_lr


# ----------------------------------------------------------------------------------------------
# Schedules.


def make_schedule(config: OptimConfig, peak: float | None = None) -> Callable[[jax.Array], jax.Array]:
  """The learning rate as a function of the optimizer update count n (module docstring)."""
  peak = config.lr if peak is None else peak
  warmup, total, end = config.warmup_steps, config.total_steps, config.end_lr_ratio

  def schedule(count):
    n = jnp.asarray(count, jnp.float32)
    factor = jnp.minimum(1.0, (n + 1.0) / warmup) if warmup > 0 else jnp.ones((), jnp.float32)
    if config.schedule == "cosine":
      progress = jnp.clip((n - warmup) / (total - warmup), 0.0, 1.0)
      factor = factor * (end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return peak * factor

  return schedule


# ----------------------------------------------------------------------------------------------
# Parameter masks and labels.


def _key_name(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def _is_norm_module(name: str) -> bool:
  """LayerNorm modules are named norm*, except the AdaLN modulation Linears (*_mod)."""
  return name.startswith("norm") and not name.endswith("_mod")


def _is_lora_factor(names: list[str]) -> bool:
  return len(names) > 1 and names[0] == "lora" and names[-1] in ("a", "b")


def _decays(path) -> bool:
  names = [_key_name(e) for e in path]
  if _is_lora_factor(names):
    return True
  if names[-1] in _NO_DECAY_NAMES or any(_is_norm_module(n) for n in names[:-1]):
    return False
  return names[-1].endswith("kernel")


def _is_gate(path) -> bool:
  return bool(path) and _key_name(path[0]) == "gates"


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: linear kernels and patch_kernel. Not norms, biases or gates."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _decays(path), params)


def lora_trainable(params: Any, lora: Any) -> dict[str, Any]:
  """The tree a LoRA run differentiates and optimizes: {"lora": the LoRA tree, "gates": the model's
  gates (when it has them)}."""
  out = {"lora": lora}
  if "gates" in params:
    out["gates"] = params["gates"]
  return out


def trainable_mask(params: Any, train: str = "all", train_gates: bool = True) -> Any:
  """True for trained params: everything (``'all'``), only the RepVideo gates (``'gates'``), or, for
  ``'lora'`` (``params`` is then ``lora_trainable``'s tree), the LoRA factors and the gates when
  ``train_gates`` (never the LoRA's constant alpha)."""
  if train == "lora":
    if set(params) - {"lora", "gates"} or "lora" not in params:
      raise ValueError(f"train='lora' expects the tree of lora_trainable, got keys {sorted(params)}")
    return jax.tree_util.tree_map_with_path(
      lambda path, _: _is_lora_factor([_key_name(e) for e in path]) or (train_gates and _is_gate(path)),
      params,
    )
  if train == "all":
    return jax.tree.map(lambda _: True, params)
  if train == "gates":
    if "gates" not in params:
      raise ValueError("train='gates' but the params have no 'gates' (a model with feature_cache=False)")
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_gate(path), params)
  raise ValueError(f"train must be 'all', 'gates' or 'lora', got {train!r}")


def _trained_label(path, _) -> str:
  if _is_gate(path):
    return "gates"
  return "decay" if _decays(path) else "no_decay"


def param_labels(params: Any, train: str = "all", train_gates: bool = True) -> Any:
  """Each leaf's partition: 'frozen', 'decay', 'no_decay' or 'gates'."""
  return jax.tree.map(
    lambda trained, label: label if trained else "frozen",
    trainable_mask(params, train, train_gates),
    jax.tree_util.tree_map_with_path(_trained_label, params),
  )


# ----------------------------------------------------------------------------------------------
# The optimizer.


class GradNormState(NamedTuple):
  grad_norm: jax.Array  # global norm of the last micro-step's trainable grads (before clipping)


def _tree_norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _record_grad_norm() -> optax.GradientTransformation:
  def init(params):
    del params
    return GradNormState(jnp.zeros((), jnp.float32))

  def update(updates, state, params=None):
    del state, params
    return updates, GradNormState(_tree_norm(updates))

  return optax.GradientTransformation(init, update)


def _adamw(config: OptimConfig, peak: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
    learning_rate=make_schedule(config, peak),
    b1=config.b1,
    b2=config.b2,
    eps=config.eps,
    weight_decay=weight_decay,
  )


def make_optimizer(
  config: OptimConfig, params: Any, train_gates: bool = True
) -> optax.GradientTransformation:
  """The full gradient transformation (module docstring). ``params`` may be abstract (shapes only);
  for ``train='lora'`` it is ``lora_trainable``'s tree, whose gates train when ``train_gates``."""
  labels = param_labels(params, config.train, train_gates)
  present = set(jax.tree.leaves(labels))
  inner = {
    "decay": _adamw(config, config.lr, config.weight_decay),
    "no_decay": _adamw(config, config.lr, 0.0),
    "gates": _adamw(config, config.peak_gate_lr, 0.0),
  }
  inner = {k: v for k, v in inner.items() if k in present}
  # Labels from paths, so they also apply to the 'train' partition's trees (frozen leaves masked out).
  tx = optax.partition(inner, lambda tree: jax.tree_util.tree_map_with_path(_trained_label, tree))
  if config.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps).gradient_transformation()
  tx = optax.chain(_record_grad_norm(), optax.apply_if_finite(tx, _NEVER_GIVE_UP))
  outer = {"train": tx}
  if "frozen" in present:
    outer["frozen"] = optax.set_to_zero()
  outer_labels = jax.tree.map(lambda label: "frozen" if label == "frozen" else "train", labels)
  return optax.partition(outer, outer_labels)


# ----------------------------------------------------------------------------------------------
# Reading the optimizer state.


def _find(opt_state: Any, cls: type) -> list:
  return [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]


def _one(opt_state: Any, cls: type):
  found = _find(opt_state, cls)
  if len(found) != 1:
    raise ValueError(
      f"expected one {cls.__name__} in the optimizer state, found {len(found)}; "
      f"was it built by make_optimizer?"
    )
  return found[0]


def nonfinite_count(opt_state: Any) -> jax.Array:
  """Consecutive micro-steps skipped for non-finite grads (0 after any finite step)."""
  return _one(opt_state, optax.ApplyIfFiniteState).notfinite_count


def total_nonfinite(opt_state: Any) -> jax.Array:
  """All micro-steps skipped for non-finite grads since the start."""
  return _one(opt_state, optax.ApplyIfFiniteState).total_notfinite


def step_skipped(opt_state: Any) -> jax.Array:
  """Whether the last micro-step was dropped for non-finite grads."""
  return jnp.logical_not(_one(opt_state, optax.ApplyIfFiniteState).last_finite)


def grad_norm(opt_state: Any) -> jax.Array:
  """Global norm of the last micro-step's trainable grads, before clipping."""
  return _one(opt_state, GradNormState).grad_norm


def params_updated(opt_state: Any) -> jax.Array:
  """Whether the last micro-step changed the params (finite, and the last of an accumulation cycle)."""
  finite = _one(opt_state, optax.ApplyIfFiniteState).last_finite
  multi = _find(opt_state, optax.MultiStepsState)
  if multi:
    finite = jnp.logical_and(finite, multi[0].mini_step == 0)
  return finite


def optimizer_updates(opt_state: Any) -> jax.Array:
  """Number of optimizer updates applied so far (the schedule's n)."""
  return _find(opt_state, optax.InjectStatefulHyperparamsState)[0].count


def learning_rates(opt_state: Any) -> dict[str, jax.Array]:
  """Learning rate of the last applied update per trained partition ('decay', 'no_decay', 'gates')."""
  flat = jax.tree_util.tree_flatten_with_path(
    opt_state, is_leaf=lambda x: isinstance(x, optax.InjectStatefulHyperparamsState)
  )[0]
  out = {}
  for path, x in flat:
    if isinstance(x, optax.InjectStatefulHyperparamsState):
      label = [n for n in (_key_name(e) for e in path) if n in LABELS][-1]
      out[label] = x.hyperparams["learning_rate"]
  return out


def check_nonfinite(opt_state: Any, max_in_a_row: int | None) -> int:
  """Host-side guard: raises RuntimeError once ``max_in_a_row`` consecutive steps were non-finite.

  Returns the current consecutive count. ``max_in_a_row`` None / 0 disables the check.
  """
  count = int(jax.device_get(nonfinite_count(opt_state)))
  if max_in_a_row and count >= max_in_a_row:
    raise RuntimeError(
      f"{count} non-finite gradient steps in a row; lower the learning rate (lr / gate_lr, or use a "
      f"longer warmup_steps), enable or tighten clip_norm, or check the data for NaN/inf latents or "
      f"text embeddings (limit max_nonfinite_in_a_row={max_in_a_row}; the skipped steps left the "
      f"params unchanged)."
    )
  return count


# ----------------------------------------------------------------------------------------------
# EMA.


def ema_init(params: Any) -> Any:
  """Float32 copy of the params."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
  """ema <- decay ema + (1 - decay) params, in float32."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)


# ----------------------------------------------------------------------------------------------
# Train state and step.


def _key_data(key: int | jax.Array) -> jax.Array:
  if isinstance(key, int):
    key = jax.random.key(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32)


def init_train_state(
  params: Any,
  optimizer: optax.GradientTransformation,
  key: int | jax.Array,
  ema: bool | float | None = None,
  lora: Any = None,
) -> dict[str, Any]:
  """{step, params, opt_state, ema, rng}; ``ema`` truthy (True or a decay) allocates a float32 EMA.
  With ``lora`` (a LoRA tree) also {lora}; the optimizer state and EMA then cover ``lora_trainable``."""
  trained = params if lora is None else lora_trainable(params, lora)
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": optimizer.init(trained),
    "ema": ema_init(trained) if ema else None,
    "rng": _key_data(key),
  }
  if lora is not None:
    state["lora"] = lora
  return state


def train_step(
  state: dict[str, Any],
  batch: dict[str, jax.Array],
  *,
  apply_fn: objective.ApplyFn,
  optimizer: optax.GradientTransformation,
  table: jax.Array,
  world_size: int = 1,
  ucg_rate: float = 0.1,
  ema_decay: float | None = None,
  lora_dropout: float = 0.0,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One micro-step on ``batch`` = {'latents': (B,T,H,W,C) x0, 'text': (B,L,D)}. Pure, jittable.
  ``lora_dropout`` (LoRA runs): the rate of peft's dropout on the LoRA branch's input, passed to
  ``apply_fn`` as ``lora_dropout=transformer.LoraDropout(rate, key)`` with a key of this step's.

  metrics: loss, timestep (batch mean), grad_norm (trainable params, pre-clip), lr and gate_lr (of the
  last applied update; lr is the gate lr when only the gates train), skipped (non-finite grads: the
  update was dropped), nonfinite_count (consecutive; feed the opt_state to ``check_nonfinite`` on the
  host), updated (the params changed on this micro-step).
  """
  rng, step_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
  lora_run = "lora" in state
  base = state["params"]
  if lora_run:  # differentiate the LoRA (and gates) only; the base rides along as a constant
    params = lora_trainable(base, state["lora"])

    dropout = {}
    if lora_dropout > 0:  # a key of its own; timesteps and noise stay those of a run without dropout
      dropout = {"lora_dropout": T.LoraDropout(lora_dropout, jax.random.fold_in(step_key, 0x10DA))}

    def loss_apply(trained, x_t, timesteps, text):
      lora = [(trained["lora"], 1.0)]
      return apply_fn(_with_gates(base, trained), x_t, timesteps, text, lora=lora, **dropout)

  else:
    params, loss_apply = base, apply_fn
  grad_fn = jax.value_and_grad(objective.diffusion_loss, has_aux=True)
  (_, metrics), grads = grad_fn(
    params,
    loss_apply,
    batch["latents"],
    batch["text"],
    step_key,
    table=table,
    world_size=world_size,
    ucg_rate=ucg_rate,
  )
  updates, opt_state = optimizer.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  updated = params_updated(opt_state)
  ema = state["ema"]
  if ema_decay:
    if ema is None:
      raise ValueError("ema_decay is set but the train state has no EMA: init_train_state(..., ema=True)")
    ema = jax.tree.map(
      lambda new, old: jnp.where(updated, new, old), ema_update(ema, new_params, ema_decay), ema
    )
  lrs = learning_rates(opt_state)
  metrics = dict(metrics)
  metrics["lr"] = lrs.get("decay", lrs.get("no_decay", lrs.get("gates")))
  if "gates" in lrs:
    metrics["gate_lr"] = lrs["gates"]
  metrics.update(
    grad_norm=grad_norm(opt_state),
    skipped=step_skipped(opt_state),
    nonfinite_count=nonfinite_count(opt_state),
    updated=updated,
  )
  if lora_run:
    new_lora, new_params = new_params["lora"], _with_gates(base, new_params)
  new_state = {
    "step": state["step"] + 1,
    "params": new_params,
    "opt_state": opt_state,
    "ema": ema,
    "rng": jax.random.key_data(rng),
  }
  if lora_run:
    new_state["lora"] = new_lora
  return new_state, metrics


def _with_gates(base: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
  """The base params with the trained gates (when the LoRA run has gates)."""
  return {**base, "gates": trained["gates"]} if "gates" in trained else base
