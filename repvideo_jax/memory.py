"""Device memory during generation: where each model's weights live, and whether the VAE decodes in tiles.

Generation has three stages, each with one model: T5 encodes the prompts, the transformer samples the
latents, the VAE decodes them. ``Residency`` moves a model's weights to the device when its stage
starts and keeps them there across batches (no copy per call), and moves them back to host memory
when the offload mode says the next stage needs the room:

- ``none``: every model stays on the device once placed (fastest; needs all weights to fit at once);
- ``text``: the text encoder is on the device alone, and leaves once the prompts are encoded; the
  transformer and the VAE then stay together. sample.py encodes every prompt of the run first, so
  the text encoder comes and goes once per run (``generate`` called batch by batch without
  ``embeddings`` swaps it in and out every batch);
- ``stage``: as ``text``, and the transformer and the VAE also take turns: only the model of the
  running stage is on the device (the transformer is copied in again for each batch);
- ``auto`` (default): the first of none, text, stage whose resident weights fit in
  ``1 - RESERVE`` of the device, leaving the rest for the stage's activations.

The VAE question (``pipeline.decode_latents`` with ``vae_tiling="auto"``) is answered with the
compiler's own memory analysis of the decode programs against ``free_bytes``. On CPU the "device" is
host memory: ``auto`` keeps everything there and nothing is moved to make room (a move would copy
within the same RAM). docs/memory.md has the measured figures per stage.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

OFFLOAD_MODES = ("auto", "none", "text", "stage")
TILING_MODES = ("auto", "on", "off")
COMPONENTS = ("text_encoder", "transformer", "vae")
# Share of the device kept free of resident weights for a stage's activations by offload "auto": the
# 2B denoising step with CFG at 49x480x720 needs 2.9 GiB of temporaries on a v5e chip (16 GB), 18%.
RESERVE = 0.25
_GIB = 1 << 30


# ----------------------------------------------------------------------------------------------
# How much a device holds.


@functools.lru_cache(maxsize=8)
def _compiler_hbm_bytes(device_kind: str, device: Any) -> float:
  """The HBM per chip as the TPU compiler reports it: the figure in its out-of-memory message when it
  is asked to compile a program that cannot fit (a 1 TiB argument). Cached per chip kind."""
  mesh = jax.sharding.Mesh(np.asarray([device]), ("x",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  huge = jax.ShapeDtypeStruct((1 << 38,), jnp.float32, sharding=sh)
  try:
    jax.jit(lambda a: a + 1).lower(huge).compile()
  except Exception as e:  # RESOURCE_EXHAUSTED: ... exceeds available HBM (95.74G)
    m = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(e))
    if m:
      return float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)
  raise RuntimeError(f"the TPU compiler did not report the HBM of a {device_kind} chip")


def device_memory_bytes(device=None) -> float:
  """Memory one device can hold: the runtime's limit where it reports one (GPUs, TPUs), the compiler's
  HBM figure for abstract TPUs (AOT), the host's RAM for CPU devices."""
  device = device or jax.devices()[0]
  stats = _memory_stats(device)
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  if device.platform == "tpu":
    return _compiler_hbm_bytes(device.device_kind, device)
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def free_bytes(device=None) -> float:
  """Memory the device has free now: its limit less what is in use (GPUs, TPUs), the host's available
  RAM for CPU devices."""
  device = device or jax.devices()[0]
  stats = _memory_stats(device)
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return _host_available_bytes()


def _host_available_bytes() -> float:
  """The kernel's MemAvailable (free memory plus the page cache it can reclaim), else free pages."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _memory_stats(device) -> dict | None:
  try:
    return device.memory_stats()
  except Exception:  # abstract (AOT) devices and some CPU clients have none
    return None


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays in a pytree, as stored (int8 weights and their scales included)."""
  return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Which models stay on the device.


def resident_during(mode: str) -> dict[str, tuple[str, ...]]:
  """The models whose weights are on the device during each stage under an offload mode (not auto)."""
  if mode == "none":
    every = COMPONENTS
    return {"text_encoder": every, "transformer": every, "vae": every}
  if mode == "text":
    return {
      "text_encoder": ("text_encoder",),
      "transformer": ("transformer", "vae"),
      "vae": ("transformer", "vae"),
    }
  if mode == "stage":
    return {c: (c,) for c in COMPONENTS}
  raise ValueError(f"offload must be one of {OFFLOAD_MODES[1:]} here, got {mode!r}")


def choose_offload(weights: dict[str, int], capacity: float, reserve: float = RESERVE) -> str:
  """The lightest offload under which the weights resident at any stage fit in ``(1 - reserve) *
  capacity``: none, then text, then stage (stage when even that does not fit: the best there is)."""
  usable = (1.0 - reserve) * capacity
  for mode in ("none", "text"):
    if max(sum(weights[c] for c in on) for on in resident_during(mode).values()) <= usable:
      return mode
  return "stage"


@dataclasses.dataclass
class Copy:
  """One move of a model's weights: to the device ("in") or back to host memory ("out")."""

  component: str
  direction: str
  bytes: int
  seconds: float


class Residency:
  """Moves a pipeline's weights between host memory and the device by the offload mode, and records
  every move (``copies``), so a run can report what it copied per batch.

  ``place(name)`` puts a model's params on the device (with ``sharding`` when given, e.g. replicated
  over a mesh) and leaves them there; ``stage(name)`` does that and first moves out the models the
  mode does not keep during that stage. Params live in the ``Pipeline`` fields themselves
  (``text_encoder_params`` ...): numpy arrays when on the host, ``jax.Array`` when placed, so there is
  one copy of each model at a time."""

  def __init__(self, pipe, mode: str = "auto", device=None):
    if mode not in OFFLOAD_MODES:
      raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {mode!r}")
    self.pipe = pipe
    self.device = device or jax.devices()[0]
    self.requested = mode
    self.capacity = device_memory_bytes(self.device)
    self.weights = {c: tree_bytes(self._params(c)) for c in COMPONENTS}
    if mode != "auto":
      self.mode = mode
    elif self.device.platform == "cpu":  # host memory is the device: moving out frees nothing
      self.mode = "none"
    else:
      self.mode = choose_offload(self.weights, self.capacity)
    self.copies: list[Copy] = []
    self.placed: dict[str, Any] = {}  # component -> the sharding it was placed with
    # which leaves (by position) this object copied to the device: release frees only those; arrays
    # that were on the device already may be shared with another pipeline object (a
    # dataclasses.replace copy), and device_put hands them back without a copy
    self._owned: dict[str, list[bool]] = {}

  def _params(self, name: str):
    return getattr(self.pipe, f"{name}_params")

  def _set(self, name: str, params) -> None:
    setattr(self.pipe, f"{name}_params", params)

  def stage(self, name: str, sharding=None):
    """Moves out what the mode does not keep during stage ``name``, then places ``name``; returns
    its params (on the device)."""
    keep = resident_during(self.mode)[name]
    for other in list(self.placed):
      if other not in keep:
        self.release(other)
    return self.place(name, sharding)

  def place(self, name: str, sharding=None):
    """``name``'s params on the device (copied once; placed again only for a different sharding)."""
    params = self._params(name)
    if params is None:
      return None
    target = sharding if sharding is not None else self.device
    if name in self.placed and self.placed[name] == target:
      return params
    t0 = time.perf_counter()
    owned = [not _already_on(x, target) for x in jax.tree.leaves(params)]
    params = jax.block_until_ready(jax.device_put(params, target))
    self.copies.append(Copy(name, "in", tree_bytes(params), time.perf_counter() - t0))
    self._owned[name] = owned
    self._set(name, params)
    self.placed[name] = target
    return params

  def release(self, name: str) -> None:
    """Moves ``name``'s params back to host memory (numpy) and frees their device buffers."""
    if name not in self.placed:
      return
    params = self._params(name)
    t0 = time.perf_counter()
    host = jax.device_get(params)
    host = jax.tree.map(np.array, host)  # own the memory: on CPU, device_get can return views
    owned = self._owned.pop(name, [])
    for x, mine in zip(jax.tree.leaves(params), owned):
      if mine and isinstance(x, jax.Array) and not x.is_deleted():
        x.delete()
    self.copies.append(Copy(name, "out", tree_bytes(host), time.perf_counter() - t0))
    self._set(name, host)
    del self.placed[name]

  def make_room(self, keep: str, need: int) -> list[str]:
    """Before a program that needs ``need`` device bytes beyond what is placed: when that is more
    than ``1 - RESERVE`` of the free memory, moves every placed model except ``keep`` back to the
    host. Returns the models it moved (the next stage places them again)."""
    if not self.moves_free_memory() or need <= (1.0 - RESERVE) * free_bytes(self.device):
      return []
    moved = [name for name in list(self.placed) if name != keep]
    for name in moved:
      self.release(name)
    return moved

  def moves_free_memory(self) -> bool:
    """Whether moving a model to the host frees device memory: not on CPU, where both are RAM."""
    return self.device.platform != "cpu"

  def release_all(self) -> None:
    for name in list(self.placed):
      self.release(name)

  def summary(self, since: int = 0) -> dict[str, Any]:
    """Bytes and seconds copied per direction since copy number ``since``; for the sidecar."""
    rows = self.copies[since:]
    return {
      "offload": self.mode,
      "offload_requested": self.requested,
      "device_memory_gib": round(self.capacity / _GIB, 2),
      "weights_gib": {c: round(b / _GIB, 3) for c, b in self.weights.items()},
      "weights_bytes": dict(self.weights),
      "copied_in_gib": round(sum(c.bytes for c in rows if c.direction == "in") / _GIB, 3),
      "copied_out_gib": round(sum(c.bytes for c in rows if c.direction == "out") / _GIB, 3),
      "copy_s": round(sum(c.seconds for c in rows), 3),
      "copies": [dataclasses.asdict(c) for c in rows],
    }


def _already_on(x, target) -> bool:
  """Whether ``jax.device_put(x, target)`` would hand back x's own buffers (no copy)."""
  if not isinstance(x, jax.Array):
    return False
  if isinstance(target, jax.sharding.Sharding):
    return x.sharding.is_equivalent_to(target, x.ndim)
  return x.sharding.device_set == {target}


# ----------------------------------------------------------------------------------------------
# Does the untiled VAE decode fit?


def compiled_bytes(compiled) -> int:
  """Peak bytes of one compiled program from the compiler's memory analysis: arguments + outputs -
  aliased + temporaries."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
