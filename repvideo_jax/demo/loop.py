"""The small single-host training loop shared by the demo's VAE, text-encoder and shape-tuning trainers.

The RepVideo transformer trains with ``train.py`` (sharded, multi-host). The demo's other two parts are
small enough for one process: this loop gives them the same optimizer (``training.optim``:
AdamW, warmup, clipping, the non-finite guard), orbax checkpoints that a killed run resumes from
exactly (``training.checkpoints``), a progress bar and a loss log.

Exact resume needs the batches to be a pure function of the step: ``batches(step)`` returns the
batch of that step (the demo renders its clips from seeds derived from the step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from repvideo_jax.training import optim
from repvideo_jax.training.checkpoints import Checkpointer, abstract_like

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The loop's settings: AdamW (no weight decay) with linear warmup then cosine decay to 10%,
  global-norm clipping, and the logging / checkpoint cadence. The trainers' configs extend it."""

  steps: int = 300
  batch_size: int = 32
  lr: float = 1e-3
  warmup_steps: int = 20
  clip_norm: float | None = 1.0
  seed: int = 0
  log_every: int = 25
  save_every: int = 200
  ema_decay: float | None = None  # if set, train returns this exponential moving average of the params

  def optim_config(self) -> optim.OptimConfig:
    return optim.OptimConfig(
      lr=self.lr,
      warmup_steps=self.warmup_steps,
      schedule="cosine",
      total_steps=max(self.steps, self.warmup_steps + 1),
      weight_decay=0.0,
      clip_norm=self.clip_norm,
    )


def train(
  loss_fn: LossFn,
  params: Any,
  batches: Callable[[int], Any],
  config: LoopConfig,
  out_dir: str | pathlib.Path,
  *,
  desc: str = "train",
  progress: bool = True,
  stop_at: int | None = None,
) -> tuple[Any, list]:
  """Minimises ``loss_fn(params, batch, key) -> (loss, metrics)`` for ``config.steps`` steps.

  Resumes from the last checkpoint in ``out_dir/checkpoints`` if there is one. ``stop_at`` ends the
  run early at that step with a checkpoint, as a preempted run would (the next call resumes).
  Returns (params as numpy, or their moving average with ``config.ema_decay``; log): the run's
  whole history of {"step", "loss", ...metrics, "seconds" (since this start)} rows, earlier starts
  included. Rows are appended to
  ``out_dir/log.jsonl`` as they come; after a resume, a re-run step's new row replaces the old one.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  steps, optim_config = config.steps, config.optim_config()
  optimizer = optim.make_optimizer(optim_config, params)
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": optimizer.init(params),
    "key": jax.random.key_data(jax.random.key(config.seed)),
  }
  if config.ema_decay is not None:
    if not 0.0 <= config.ema_decay < 1.0:
      raise ValueError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    state["ema"] = jax.tree.map(jnp.asarray, params)
  ckpt = Checkpointer(out / "checkpoints", save_every=config.save_every, keep=2, async_save=False)
  if ckpt.latest_step() is not None:
    state, _, _ = ckpt.restore(abstract_like(state))
    log.info("%s: resumed from step %d", desc, int(state["step"]))

  @jax.jit
  def step_fn(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optim.grad_norm(opt_state)}
    new = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if "ema" in state:
      d = config.ema_decay
      new["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
    return new, metrics

  start = int(state["step"])
  t0 = time.perf_counter()
  log_path = out / "log.jsonl"
  bar = None
  if progress and start < steps:
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", leave=False)
  with open(log_path, "a") as log_file:
    for step in range(start, steps if stop_at is None else min(steps, stop_at)):
      state, metrics = step_fn(state, batches(step))
      done = step + 1
      if done % config.log_every == 0 or done == steps or done == start + 1:
        row = {
          "step": done,
          **{k: float(v) for k, v in jax.device_get(metrics).items()},
          "seconds": round(time.perf_counter() - t0, 2),
        }
        if not np.isfinite(row["loss"]):
          raise RuntimeError(f"{desc}: loss is {row['loss']} at step {done}; lower the learning rate")
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
        if bar is not None:
          bar.set_postfix(loss=f"{row['loss']:.4f}")
      optim.check_nonfinite(state["opt_state"], optim_config.max_nonfinite_in_a_row)
      if bar is not None:
        bar.update(1)
      if ckpt.should_save(done) and done < steps and done != stop_at:
        ckpt.save(done, state, {}, {"desc": desc})
  if bar is not None:
    bar.close()
  if ckpt.latest_step() != int(state["step"]):
    ckpt.save(int(state["step"]), state, {}, {"desc": desc}, force=True)
  ckpt.close()
  final = state["ema"] if "ema" in state else state["params"]
  return jax.tree.map(np.asarray, jax.device_get(final)), history(log_path)


def history(log_path: str | pathlib.Path) -> list[dict]:
  """The rows of a ``log.jsonl``, one per step (the last written wins), in step order."""
  by_step = {}
  for line in pathlib.Path(log_path).read_text().splitlines():
    row = json.loads(line)
    by_step[row["step"]] = row
  return [by_step[k] for k in sorted(by_step)]
