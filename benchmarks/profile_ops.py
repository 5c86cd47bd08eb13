"""Where the CPU time goes: our transformer (XLA profile) next to diffusers' (torch profiler), per op kind.

Usage:
  .venv/bin/python benchmarks/profile_ops.py                 # bench_transformer.py's default config
  .venv/bin/python benchmarks/profile_ops.py --remat save_dots --json out.json
  (every bench_transformer.py size flag works here too; --quick for a smoke run)

Both sides run the same weights and inputs (built by bench_transformer.py's helpers), forward and
forward+backward (loss = mean(output ** 2)), after a warm-up run, ``--repeats`` times under the profiler.

Ours: ``jax.profiler.trace`` (perfetto JSON); XLA:CPU records one event per executed thunk, named after
the HLO instruction of the optimised program (``compiled.as_text()``). Each instruction is classified
by what it (or the fused computation it calls) contains:
  matmul       a dot or convolution without an S x S operand (the linears, patch embedding)
  attention    anything holding a (..., query rows, S) array: scores, softmax, probabilities, their
               gradients, and the matmuls that make or read them
  layernorm    a reduction over the hidden or head dimension (LayerNorm statistics and their grads)
  transpose    only transposes / copies / reshapes / broadcasts (layout changes)
  copy         scan bookkeeping: dynamic-slice / dynamic-update-slice / concatenates / pads
  elementwise  everything else (residual adds, modulation, GELU, the optimiser)
diffusers: ``torch.profiler``, self CPU time per aten op, classified by op name (mm/addmm/bmm/linear:
matmul; scaled-dot-product / flash attention: attention; layer_norm: layernorm; transpose/permute/
contiguous/clone/copy_: transpose; the rest: elementwise).

Per-kind times are per iteration (total over the profiled runs / --repeats). Profiled wall time is a
little above an unprofiled run's; the shares are what this is for.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_transformer as BT  # noqa: E402
from benchutil import OtherLoad, host_memory_setup, log  # noqa: E402

KINDS = ("matmul", "attention", "layernorm", "elementwise", "transpose", "copy")


# ----------------------------------------------------------------------------------------------
# XLA side: the optimised HLO, read just enough to classify each instruction.

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_LAYOUT_OPS = {"transpose", "copy", "reshape", "bitcast", "broadcast", "parameter", "constant", "tuple"}
_SLICE_OPS = {"dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "slice", "get-tuple-element"}


def parse_hlo(text: str) -> tuple[dict, dict]:
  """{computation: [(name, shape, opcode, line)]} and {instruction: computation it lives in}."""
  comps: dict[str, list] = {}
  where: dict[str, str] = {}
  current = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      comps[current].append((m.group(1), m.group(2), m.group(3), line))
      where[m.group(1)] = current
  return comps, where


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def classify_instruction(name: str, comps: dict, where: dict, seq: int, widths: set[int]) -> str:
  """The op kind (see the module docstring) of one executed HLO instruction."""
  comp = where.get(name)
  if comp is None:
    return "elementwise"
  line = next((ins for ins in comps[comp] if ins[0] == name), None)
  if line is None:
    return "elementwise"
  body = [line]
  seen = set()
  stack = _CALLS.findall(line[3]) if line[2] in ("fusion", "call", "custom-call") else []
  while stack:
    c = stack.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    body.extend(comps[c])
    for ins in comps[c]:
      stack.extend(_CALLS.findall(ins[3]))
  ops = {ins[2] for ins in body} - {"fusion"}

  def scores(shape):  # a (..., heads, query rows, S) array: attention scores, probabilities or grads
    d = _dims(shape)
    return len(d) >= 3 and d[-1] == seq

  def operand_shapes(ins):  # the shapes of an instruction's operands (HLO text names them only)
    args = ins[3].split("(", 1)[1].split(")", 1)[0]
    peers = {i[0]: i[1] for i in comps[where[ins[0]]]} if ins[0] in where else {}
    return [peers[n] for n in re.findall(r"%([\w.\-]+)", args) if n in peers]

  if any(scores(ins[1]) or any(scores(o) for o in operand_shapes(ins)) for ins in body):
    return "attention"
  if ops & {"dot", "convolution"}:
    return "matmul"
  if line[2] in ("while", "conditional", "call"):
    return "copy"
  if "reduce" in ops:
    reduces = [ins for ins in body if ins[2] == "reduce"]
    if any(re.search(r"dimensions=\{[\d,]+\}", r[3]) for r in reduces):
      return "layernorm" if any(w in _dims(o[1]) for o in body for w in widths) else "elementwise"
  if ops <= _LAYOUT_OPS:
    return "transpose"
  if ops <= _LAYOUT_OPS | _SLICE_OPS:
    return "copy"
  return "elementwise"


def perfetto_durations(trace_dir: str) -> dict[str, float]:
  """Total microseconds per event name in the newest perfetto trace under ``trace_dir``."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  data = json.load(gzip.open(paths[-1]))
  events = data["traceEvents"] if isinstance(data, dict) else data
  total: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      total[e["name"]] += float(e["dur"])
  return total


def profile_jax(compiled, args, repeats: int, seq: int, widths: set[int]) -> dict:
  import jax

  comps, where = parse_hlo(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(repeats):
        jax.block_until_ready(compiled(*args))
    wall = (time.perf_counter() - t0) / repeats
    durations = perfetto_durations(tmp)
  kinds = dict.fromkeys(KINDS, 0.0)
  top = []
  for name, us in durations.items():
    if name not in where or name.startswith("$"):
      continue
    comp = where[name]
    # Thunks inside a while body run per iteration and are timed on their own; the while thunk
    # itself spans its body, so it is left out to avoid counting the body twice.
    opcode = next(ins[2] for ins in comps[comp] if ins[0] == name)
    if opcode in ("while", "conditional", "call"):
      continue
    kind = classify_instruction(name, comps, where, seq, widths)
    kinds[kind] += us / repeats / 1e3
    top.append((us / repeats / 1e3, name, kind))
  top.sort(reverse=True)
  return dict(wall_ms=1e3 * wall, kinds_ms=kinds, top=[dict(ms=t, name=n, kind=k) for t, n, k in top[:60]])


# ----------------------------------------------------------------------------------------------
# torch side.


def classify_aten(name: str) -> str:
  n = name.lower()
  if "attention" in n or "softmax" in n or "baddbmm" in n:
    return "attention"
  if any(k in n for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "conv")):
    return "matmul"
  if "layer_norm" in n:
    return "layernorm"
  if any(
    k in n for k in ("transpose", "permute", "contiguous", "clone", "copy_", "aten::t", "view", "reshape")
  ):
    return "transpose"
  if any(k in n for k in ("cat", "slice", "pad", "index", "select", "stack")):
    return "copy"
  return "elementwise"


def profile_torch(fn, repeats: int) -> dict:
  import torch

  fn()
  t0 = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(repeats):
      fn()
  wall = (time.perf_counter() - t0) / repeats
  kinds = dict.fromkeys(KINDS, 0.0)
  top = []
  for ev in prof.key_averages():
    ms = ev.self_cpu_time_total / repeats / 1e3
    if ms <= 0:
      continue
    kind = classify_aten(ev.key)
    kinds[kind] += ms
    top.append((ms, ev.key, kind))
  top.sort(reverse=True)
  return dict(wall_ms=1e3 * wall, kinds_ms=kinds, top=[dict(ms=t, name=n, kind=k) for t, n, k in top[:25]])


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
  ap.add_argument("--feature-cache", action="store_true", help="profile ours with the RepVideo cache on")
  ap.add_argument("--top", type=int, default=12, help="slowest ops listed per run")
  own, rest = ap.parse_known_args(argv)
  a = BT.parse_args(rest)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if a.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + a.xla_flags).strip()
  if a.omp_wait_policy:
    os.environ.setdefault("OMP_WAIT_POLICY", a.omp_wait_policy)
  load = OtherLoad()
  import jax
  import jax.numpy as jnp
  import torch

  from repvideo_jax import transformer as T
  from repvideo_jax import transformer_weights as W

  torch.set_num_threads(a.threads)
  model = BT.build_diffusers(a, torch)
  lat, ts, text = BT.make_inputs(a, torch)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = W.config_from_diffusers(
    dict(model.config), feature_cache=own.feature_cache, scan_layers=True, remat=own.remat, dtype="float32"
  )
  params = jax.device_put(W.from_diffusers(state, cfg, allow_missing_gates=True))
  inputs = (
    jnp.asarray(lat.permute(0, 1, 3, 4, 2).numpy()),
    jnp.asarray(ts.numpy()),
    jnp.asarray(text.numpy()),
  )
  seq = BT.forward_flops(a)["tokens"]
  widths = {cfg.hidden_size, cfg.head_dim}
  apply = T.make_apply(cfg)
  fwd = jax.jit(apply).lower(params, *inputs).compile()
  grad = (
    jax.jit(jax.value_and_grad(lambda p, *xs: jnp.mean(jnp.square(apply(p, *xs)))))
    .lower(params, *inputs)
    .compile()
  )

  def torch_fwd():
    with torch.no_grad():
      model(lat, text, ts, return_dict=False)

  def torch_fwd_bwd():
    for prm in model.parameters():
      prm.grad = None
    model(lat, text, ts, return_dict=False)[0].square().mean().backward()

  results = {}
  log("profiling forward")
  results["forward"] = dict(
    ours=profile_jax(fwd, (params, *inputs), a.repeats, seq, widths),
    diffusers=profile_torch(torch_fwd, a.repeats),
  )
  log("profiling forward+backward")
  for prm in model.parameters():
    prm.requires_grad_(True)
  results["fwd+bwd"] = dict(
    ours=profile_jax(grad, (params, *inputs), a.repeats, seq, widths),
    diffusers=profile_torch(torch_fwd_bwd, a.repeats),
  )
  other = load.value()

  print(
    f"per-op-kind CPU time, ms per iteration (jax {jax.__version__}, torch {torch.__version__}, "
    f"{os.cpu_count()} CPUs; hidden {cfg.hidden_size}, {cfg.num_layers} layers, {seq} tokens, float32, "
    f"remat {own.remat}, feature cache {'on' if own.feature_cache else 'off'}; other load {100 * other:.0f}%)"
  )
  print("thread time: 'ours' sums executed XLA thunks, 'diffusers' sums aten self time (one thread's view)")
  for run, res in results.items():
    print(
      f"\n{run}: wall ms per iteration under the profiler: ours {res['ours']['wall_ms']:.0f}, "
      f"diffusers {res['diffusers']['wall_ms']:.0f}"
    )
    print(f"{'kind':<12} {'ours ms':>9} {'diffusers ms':>13} {'ours - diffusers':>17}")
    for k in KINDS:
      o, d = res["ours"]["kinds_ms"][k], res["diffusers"]["kinds_ms"][k]
      print(f"{k:<12} {o:>9.1f} {d:>13.1f} {o - d:>+17.1f}")
    o, d = sum(res["ours"]["kinds_ms"].values()), sum(res["diffusers"]["kinds_ms"].values())
    print(f"{'total':<12} {o:>9.1f} {d:>13.1f} {o - d:>+17.1f}")
    for side in ("ours", "diffusers"):
      print(
        f"  slowest {side}: "
        + "; ".join(f"{t['name']} ({t['kind']}) {t['ms']:.1f}" for t in res[side]["top"][: own.top])
      )
  results["other_load"] = other
  results["args"] = dict(vars(a), **vars(own))
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(results, fh, indent=2)
  return results


if __name__ == "__main__":
  host_memory_setup()  # ours and torch alike, before JAX starts
  main()
