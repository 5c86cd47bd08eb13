"""Small pieces shared by the training tests."""

import dataclasses
import json

import numpy as np

from repvideo_jax.training import trainer


class FixedBatches:
  """Deterministic per-process batches; position-based get_state/set_state like the real pipelines."""

  def __init__(self, batch=4, shape=(2, 8, 8, 4), text=(8, 32), seed=0, distinct=4):
    self.batch, self.shape, self.text, self.seed, self.distinct = batch, shape, text, seed, distinct
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.position % self.distinct])
    self.position += 1
    return {
      "latents": rng.standard_normal((self.batch, *self.shape)).astype(np.float32),
      "text": rng.standard_normal((self.batch, *self.text)).astype(np.float32),
    }

  def get_state(self):
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state):
    self.position = json.loads(state)["position"]


def tiny_config(tmp_path, **run):
  cfg = trainer.load_config(
    "train-tiny-cpu",
    [
      "transformer.num_layers=3",
      "transformer.num_heads=4",
      "transformer.head_dim=8",
      "transformer.cache_window=2",
    ],
  )
  run = {
    "output_dir": str(tmp_path / "run"),
    "steps": 6,
    "log_every": 1,
    "save_every": 2,
    "timestep_strata": 1,
    "tensorboard": True,
    **run,
  }
  r = dataclasses.replace(cfg.run, **run)
  t = dataclasses.replace(cfg.transformer, zero_init_modulation=False)
  return dataclasses.replace(cfg, run=r, transformer=t)
