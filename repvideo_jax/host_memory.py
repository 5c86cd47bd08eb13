"""Host (CPU) memory reuse between calls of a compiled program.

On a CPU backend every call of a compiled XLA program allocates its temporaries afresh and frees
them at the end. glibc hands large blocks (> 32 MB at most) and blocks of non-main arenas (XLA's
worker threads) to ``mmap``/``munmap``, so each call faults in its temporaries again page by page:
about 156,000 minor page faults and 0.5 s of kernel time per forward+backward call of
``benchmarks/bench_transformer.py``'s model (measured 2026-12-02, Intel Xeon, 2 vCPUs).

``reuse_freed_memory()`` asks glibc to keep freed memory for the next call instead: one arena, no
``mmap`` for large blocks, and no trimming of the heap's top below 2 GiB. The page faults per call
drop to zero. The cost: the process keeps its peak host memory until it exits, instead of returning
it to the OS between calls.

It must run before JAX starts its CPU client: a thread that already has its own arena keeps it.
The command-line tools (``sample.py``, ``train.py``, ``python -m repvideo_jax.evaluate``, the demo
build) call ``configure_from_env()`` first thing. It applies the setting on a machine without an
accelerator and ``REPVIDEO_HOST_MEMORY`` overrides that: ``reuse`` forces it, ``system`` leaves
glibc's defaults. Library users call ``reuse_freed_memory()`` themselves, before their first JAX
computation, if they want it. Nothing happens on a C library other than glibc.

Reused memory holds whatever was freed into it, where fresh ``mmap`` pages are zeros. libx264 (through
libavcodec) reads some bytes of its buffers that it never writes, so under reuse the same frames
encoded to different MP4 bytes run to run (2026-12-03: 3 different files from 4 encodes of one clip).
``zeroed_allocations()`` makes glibc zero every ``malloc`` for the span of such a call; ``write_mp4``
encodes inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import sys

ENV = "REPVIDEO_HOST_MEMORY"
MODES = ("auto", "reuse", "system")

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_M_PERTURB = -6
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest it accepts, 2 GiB

_applied = False

# Installed PJRT plugins for GPUs (jax[cuda12], jax[cuda13], jax[rocm]).
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm6_plugin", "jax_rocm7_plugin")


@functools.cache
def _glibc():
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return None
  if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: leave them alone
    return None
  return libc


def reuse_freed_memory() -> bool:
  """Make glibc keep freed host memory for reuse (see the module docstring). Returns whether the
  setting is in effect (False on a C library other than glibc). Idempotent."""
  global _applied
  if _applied:
    return True
  libc = _glibc()
  if libc is None:
    return False
  ok = all(
    libc.mallopt(param, value) == 1
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
  )
  _applied = ok
  return ok


@contextlib.contextmanager
def zeroed_allocations():
  """Within the block, glibc fills each new ``malloc`` block with zeros (``calloc`` and fresh
  ``mmap`` pages already are), so a library that reads bytes it never wrote sees zeros, as it would
  in a fresh process, and not the last user's data. Freed blocks are overwritten too (with 0xFF) and
  that costs a ``memset`` per call, so keep the block short. The setting is process-wide: other
  threads' allocations in the span are zeroed as well. Does nothing on a C library other than
  glibc."""
  libc = _glibc()
  # glibc's M_PERTURB: new blocks get the complement of the value's low byte, freed blocks the byte.
  on = libc is not None and libc.mallopt(_M_PERTURB, 0xFF) == 1
  try:
    yield
  finally:
    if on:
      libc.mallopt(_M_PERTURB, 0)


def accelerator_likely() -> bool:
  """Whether this machine probably runs JAX on a GPU or TPU, decided without starting JAX:
  ``JAX_PLATFORMS`` when it is set, else an installed GPU plugin with a GPU device node, or a TPU
  device node."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
  gpu_plugin = any(importlib.util.find_spec(m) is not None for m in _GPU_PLUGINS)
  if gpu_plugin and (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
    return True
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def configure_from_env() -> str:
  """Apply ``REPVIDEO_HOST_MEMORY`` (``auto``, the default: reuse when no accelerator is likely;
  ``reuse``; ``system``). Returns the mode in effect, ``reuse`` or ``system``."""
  mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
  if mode not in MODES:
    raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
  if mode == "auto":
    mode = "system" if accelerator_likely() else "reuse"
  if mode == "reuse" and not reuse_freed_memory():
    mode = "system"
  return mode


def setup_cli() -> str:
  """``configure_from_env()`` for a command-line entry point: a bad ``REPVIDEO_HOST_MEMORY`` prints
  the problem and exits with status 2."""
  try:
    return configure_from_env()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
