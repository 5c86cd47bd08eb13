"""Timing helpers shared by the benchmark scripts: wall/CPU medians and how busy the machine was.

On a shared machine a timing is only meaningful if nothing else ran meanwhile, so every timing
records ``other_load``: the share of all CPU time that *other* processes used (from /proc/stat
minus this process's own and its children's CPU time); 0 on an idle machine, ~0.5 when another
process keeps one of two cores busy, nan where /proc is missing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _snapshot():
  try:
    with open("/proc/stat") as fh:
      v = [int(x) for x in fh.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  t = os.times()
  own = (t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")
  return sum(v) - v[3] - v[4], sum(v), own


class OtherLoad:
  """Share of all CPU time other processes used between construction and ``value()``."""

  def __init__(self):
    self.start = _snapshot()

  def value(self) -> float:
    end = _snapshot()
    if self.start is None or end is None:
      return float("nan")
    busy, total, own = (e - s for e, s in zip(end, self.start))
    return min(1.0, max(0.0, (busy - own) / max(1, total)))


def busy_fraction(seconds: float = 1.0) -> float:
  """Other processes' share of the CPUs over the next ``seconds``."""
  load = OtherLoad()
  time.sleep(seconds)
  return load.value()


def wait_idle(max_seconds: float, threshold: float = 0.10) -> float:
  """Waits (1 s windows, up to ``max_seconds``) until other processes use < ``threshold``; returns
  the last measured load."""
  deadline = time.perf_counter() + max_seconds
  load = busy_fraction()
  while load >= threshold and time.perf_counter() < deadline:
    log(f"CPUs {100 * load:.0f}% busy with other work; waiting")
    load = busy_fraction()
  return load


def time_it(fn, repeats: int, warmup: int) -> dict:
  """Runs ``fn`` warmup + repeats times; median/min/max wall seconds, median CPU seconds of this
  process, and the other processes' load during the timed runs."""
  for _ in range(warmup):
    fn()
  load, wall, cpu = OtherLoad(), [], []
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return dict(
    median_s=statistics.median(wall),
    min_s=min(wall),
    max_s=max(wall),
    runs_s=wall,
    cpu_median_s=statistics.median(cpu),
    repeats=repeats,
    other_load=load.value(),
  )


# The matmul shapes of the peak measurement: the benchmark transformer's MLP (tokens x hidden @
# hidden x 4 hidden) and one large square product.
PEAK_SHAPES = ((896, 512, 2048), (2048, 2048, 2048))


def matmul_peak(threads: int, repeats: int = 7) -> dict:
  """The measured float32 matmul peak of this machine: GFLOP/s of torch (MKL/oneDNN) and of XLA:CPU
  on ``PEAK_SHAPES``, best of the two per shape; ``peak_gflops_per_s`` is the best overall. Taken in
  the benchmark's own run, so "% of peak" compares against the same machine state."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  torch.set_num_threads(threads)
  rows = []
  for m, k, n in PEAK_SHAPES:
    flop = 2.0 * m * k * n
    a, b = np.random.default_rng(0).standard_normal((2, max(m, k), max(k, n)), dtype=np.float32)
    ta, tb = torch.from_numpy(a[:m, :k].copy()), torch.from_numpy(b[:k, :n].copy())
    ja, jb = jnp.asarray(a[:m, :k]), jnp.asarray(b[:k, :n])
    dot = jax.jit(jnp.matmul)
    t_torch = time_it(lambda x=ta, y=tb: torch.mm(x, y), repeats, 2)
    t_xla = time_it(lambda x=ja, y=jb, f=dot: f(x, y).block_until_ready(), repeats, 2)
    rows.append(
      dict(
        shape=(m, k, n),
        torch_gflops_per_s=flop / t_torch["median_s"] / 1e9,
        xla_gflops_per_s=flop / t_xla["median_s"] / 1e9,
        other_load=max(t_torch["other_load"], t_xla["other_load"]),
      )
    )
  best = max(max(r["torch_gflops_per_s"], r["xla_gflops_per_s"]) for r in rows)
  return dict(peak_gflops_per_s=best, shapes=rows)


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform

  return platform.processor() or platform.machine()


def host_memory_setup() -> str:
  """Apply ``REPVIDEO_HOST_MEMORY`` (repvideo_jax/host_memory.py) when it is set; unset, the
  benchmarks keep glibc's defaults, unlike the project's command-line tools. It is one setting of
  the process's C library, so ours and torch run under the same allocator: with ``reuse`` torch's
  own fwd+bwd was no faster and sometimes slower here, so a ratio measured that way is not quoted."""
  from repvideo_jax import host_memory  # noqa: PLC0415

  mode = host_memory.setup_cli() if os.environ.get(host_memory.ENV) else "system"
  log(f"host memory: {mode} (REPVIDEO_HOST_MEMORY={os.environ.get(host_memory.ENV, 'unset')})")
  return mode
