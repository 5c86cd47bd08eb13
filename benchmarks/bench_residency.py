"""Weight copies to the device per batch, before and after the residency plan (repvideo_jax.memory).

    .venv/bin/python benchmarks/bench_residency.py --json benchmarks/results_residency.json

Random bfloat16 weights with the 2B's shapes: the RepVideo-2B transformer (30 layers), the full VAE,
and the T5-XXL encoder with ``--t5-layers`` of its 24 layers (default 8, so the whole run fits this
machine's RAM twice over; the full encoder's cost is this one's scaled by its bytes, stated as such).

Before (commit a0deb14 and earlier) the weights were host numpy arrays handed to every compiled call,
so each batch copied the T5 encoder and the transformer to the device again (and the VAE at least
once; its eager decode passed them to each chunk's call). That copy is timed here as such a call
makes it: ``jax.device_put`` of the numpy tree, finished. After, ``memory.Residency`` moves them as
sample.py does -- every prompt encoded first, then batch by batch -- under each offload mode, and its
own record of what it copied (bytes and seconds) is summed per batch.

On this CPU "the device" is host memory, so a copy is a memcpy into fresh pages: the seconds are
this machine's; the bytes are what any device would move (over PCIe on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import time
import types

import benchutil
import jax
import jax.numpy as jnp
import numpy as np

from repvideo_jax import config as config_lib
from repvideo_jax import memory
from repvideo_jax import text_encoder as TE
from repvideo_jax import transformer as T
from repvideo_jax import vae as V

GIB = 1 << 30


def random_params(abstract, seed: int):
  """Host numpy arrays of the abstract tree's shapes, bfloat16, filled cheaply (values do not matter)."""
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal(1 << 20).astype(jnp.bfloat16)

  def one(a):
    n = int(np.prod(a.shape))
    return np.resize(noise, n).reshape(a.shape)

  return jax.tree.map(one, abstract)


def timed_put(tree) -> float:
  t0 = time.perf_counter()
  out = jax.block_until_ready(jax.device_put(tree))
  seconds = time.perf_counter() - t0
  for x in jax.tree.leaves(out):
    x.delete()
  return seconds


def measure(part: str, t5_layers: int, batches: int, repeats: int) -> dict:
  """One part ("before", or an offload mode) in this process."""
  tcfg = config_lib.load_section(T.TransformerConfig, "transformer", "repvideo-2b")
  tcfg = dataclasses.replace(tcfg, dtype="bfloat16", param_dtype="bfloat16")
  t5 = TE.T5Config(num_layers=t5_layers, dtype="bfloat16", param_dtype="bfloat16")
  vcfg = V.VAEConfig(dtype="bfloat16", param_dtype="bfloat16")
  abstract = {
    "text_encoder": TE.abstract_params(t5),
    "transformer": T.abstract_params(tcfg),
    "vae": V.abstract_params(vcfg),
  }
  host = {name: random_params(a, i) for i, (name, a) in enumerate(abstract.items())}
  sizes = {name: memory.tree_bytes(t) for name, t in host.items()}
  load = benchutil.OtherLoad()  # other processes' share of the CPUs while this part runs
  if part == "before":
    out = {"other_load": None}
    for name, tree in host.items():
      runs = [timed_put(tree) for _ in range(repeats)]
      out[name] = dict(gib=round(sizes[name] / GIB, 3), copy_s=round(statistics.median(runs), 3), runs=runs)
    out["other_load"] = round(load.value(), 3)
    return out
  pipe = types.SimpleNamespace(**{f"{k}_params": v for k, v in host.items()})
  del host
  res = memory.Residency(pipe, part)
  res.stage("text_encoder")  # sample.py: every prompt encoded first
  if part != "none":
    res.release("text_encoder")
  per_batch, seen = [], 0
  for _ in range(batches):
    res.stage("transformer")
    res.stage("vae")
    b = res.summary(seen)
    per_batch.append(
      dict(copied_in_gib=b["copied_in_gib"], copied_out_gib=b["copied_out_gib"], copy_s=b["copy_s"])
    )
    seen = len(res.copies)
  return dict(
    per_batch=per_batch,
    weights_gib={k: round(v / GIB, 3) for k, v in sizes.items()},
    other_load=round(load.value(), 3),
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--t5-layers", type=int, default=8, help="T5-XXL layers to build (of 24)")
  p.add_argument("--batches", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3, help="timings of each 'before' copy (median)")
  p.add_argument("--part", help=argparse.SUPPRESS)  # one part, in a fresh process (set by main)
  p.add_argument("--json")
  args = p.parse_args(argv)
  if args.part:
    print("RESULT " + json.dumps(measure(args.part, args.t5_layers, args.batches, args.repeats)))
    return 0
  parts = {}
  for part in ("before", "none", "text", "stage"):  # each in its own process: host memory starts clean
    proc = subprocess.run(
      [
        sys.executable,
        __file__,
        "--part",
        part,
        "--t5-layers",
        str(args.t5_layers),
        "--batches",
        str(args.batches),
        "--repeats",
        str(args.repeats),
      ],
      capture_output=True,
      text=True,
      check=True,
    )
    parts[part] = json.loads(proc.stdout.split("RESULT ", 1)[1])
    print(part, json.dumps(parts[part]), flush=True)
  before = parts.pop("before")
  full_t5 = memory.tree_bytes(TE.abstract_params(TE.T5Config(dtype="bfloat16", param_dtype="bfloat16")))
  per_gib = before["text_encoder"]["copy_s"] / before["text_encoder"]["gib"]
  result = dict(
    date=datetime.date.today().isoformat(),
    host_cpu=benchutil.cpu_model(),
    jax=jax.__version__,
    t5_layers=args.t5_layers,
    full_t5_gib=round(full_t5 / GIB, 3),
    before=dict(
      before, total_copy_s=round(sum(v["copy_s"] for k, v in before.items() if k != "other_load"), 3)
    ),
    before_full_t5_estimate_s=round(per_gib * full_t5 / GIB, 2),
    after=parts,
  )
  print(json.dumps(result, indent=1))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
