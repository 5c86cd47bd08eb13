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
