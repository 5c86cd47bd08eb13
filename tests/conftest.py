"""Shared test fixtures: tiny diffusers reference models with random weights, and converters."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile the same small programs many times (and in subprocesses, which inherit this):
# a persistent compilation cache makes the repeats cheap. Keyed by jax version and program.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "repvideo-jax-tests-xla")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
  """Fills every parameter with random values so no test passes through zeros or ones by luck.

  Norm weights get 1 + noise; matrices get N(0, scale^2 / fan_in) so activations stay unit-scale.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / np.sqrt(fan_in)))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + scale * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(scale * torch.randn(p.shape, generator=gen))
  return module.eval()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


@pytest.fixture(autouse=True)
def _no_grad():
  with torch.no_grad():
    yield


@pytest.fixture(scope="session")
def tpu_devices():
  """``tpu_devices('v5p:2x2x2')``: abstract devices of a TPU topology from libtpu (no TPU needed).
  libtpu is a test requirement (requirements-tpu.txt): without it these tests fail, not skip."""
  from repvideo_jax import aot

  return aot.topology_devices
