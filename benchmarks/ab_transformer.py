"""Two checkouts of this repository against each other, each against diffusers: the ratio that survives drift.

    git worktree add /tmp/old 11bde0a
    .venv/bin/python benchmarks/ab_transformer.py /tmp/old . --rounds 2 --json ab.json
    .venv/bin/python benchmarks/ab_transformer.py . --host-memory system,reuse   # one checkout, two settings

A machine's speed drifts between runs by more than the changes worth measuring. So each round starts
one process per checkout in turn (A B A B ...); each process imports ``repvideo_jax`` from its checkout,
builds diffusers' transformer and ours with the same weights (``bench_transformer.py``'s default config
and helpers) and times ours and diffusers' forward and forward+backward (remat none, scan) interleaved,
median of --repeats. The quoted figure is each process's diffusers/ours ratio, with the other processes'
CPU share while it ran; rows above --max-load are flagged and the run exits non-zero.

``--host-memory`` runs every checkout under each listed ``REPVIDEO_HOST_MEMORY`` setting
(repvideo_jax/host_memory.py; a checkout without that module runs as ``system``). It is set for the
whole process, so ours and diffusers share it. Each row also gives the minor page faults and the
kernel CPU time per call.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def measure(checkout: str, repeats: int, host_memory_mode: str) -> dict:
  """In the child: medians (ms) of ours and diffusers, forward and forward+backward."""
  root = str(pathlib.Path(checkout).resolve())
  sys.path[:0] = [root, str(HERE)]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  if (pathlib.Path(root) / "repvideo_jax" / "host_memory.py").exists():
    os.environ["REPVIDEO_HOST_MEMORY"] = host_memory_mode
    from repvideo_jax import host_memory

    host_memory_mode = host_memory.setup_cli()  # before JAX starts
  else:
    host_memory_mode = "system"
  import resource

  import bench_transformer as BT
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from benchutil import OtherLoad

  from repvideo_jax import transformer as T
  from repvideo_jax import transformer_weights as W

  if not T.__file__.startswith(root):
    raise SystemExit(f"repvideo_jax came from {T.__file__}, not from {root}")
  a = BT.parse_args([])
  torch.set_num_threads(a.threads)
  model = BT.build_diffusers(a, torch)
  lat, ts, text = BT.make_inputs(a, torch)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = W.config_from_diffusers(
    dict(model.config), feature_cache=False, scan_layers=True, remat="none", dtype="float32"
  )
  params = jax.device_put(W.from_diffusers(state, cfg))
  inputs = (
    jnp.asarray(lat.permute(0, 1, 3, 4, 2).numpy()),
    jnp.asarray(ts.numpy()),
    jnp.asarray(text.numpy()),
  )
  apply = T.make_apply(cfg)
  fwd = jax.jit(apply)
  grad = jax.jit(jax.value_and_grad(lambda p, *xs: jnp.mean(jnp.square(apply(p, *xs)))))

  def torch_fwd():
    with torch.no_grad():
      model(lat, text, ts, return_dict=False)

  def torch_fwd_bwd():
    for prm in model.parameters():
      prm.grad = None
    model(lat, text, ts, return_dict=False)[0].square().mean().backward()

  for prm in model.parameters():
    prm.requires_grad_(True)
  fns = {
    "ours_fwd": lambda: jax.block_until_ready(fwd(params, *inputs)),
    "ours_fwd_bwd": lambda: jax.block_until_ready(grad(params, *inputs)),
    "diffusers_fwd": torch_fwd,
    "diffusers_fwd_bwd": torch_fwd_bwd,
  }
  for fn in fns.values():  # compile and warm up
    fn()
    fn()
  load, times = OtherLoad(), {k: [] for k in fns}
  faults, sys_s = dict.fromkeys(fns, 0), dict.fromkeys(fns, 0.0)
  for _ in range(repeats):
    for name, fn in fns.items():
      r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
      r1 = resource.getrusage(resource.RUSAGE_SELF)
      faults[name] += r1.ru_minflt - r0.ru_minflt
      sys_s[name] += r1.ru_stime - r0.ru_stime
  ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
  return dict(
    checkout=root,
    host_memory=host_memory_mode,
    ms=ms,
    minor_faults_per_call={k: v / repeats for k, v in faults.items()},
    kernel_ms_per_call={k: 1e3 * v / repeats for k, v in sys_s.items()},
    forward_vs_diffusers=ms["diffusers_fwd"] / ms["ours_fwd"],
    fwd_bwd_vs_diffusers=ms["diffusers_fwd_bwd"] / ms["ours_fwd_bwd"],
    other_load=load.value(),
  )


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("checkouts", nargs="+", help="repository checkouts to compare (e.g. a git worktree and .)")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--max-load", type=float, default=0.05)
  ap.add_argument(
    "--host-memory",
    default="system",
    help="comma-separated REPVIDEO_HOST_MEMORY settings to run each checkout under (auto, reuse, system)",
  )
  ap.add_argument("--json")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.child:
    print(json.dumps(measure(a.checkouts[0], a.repeats, a.host_memory)))
    return
  modes = [m.strip() for m in a.host_memory.split(",") if m.strip()]
  rows = []
  for _ in range(a.rounds):
    for checkout, mode in [(c, m) for c in a.checkouts for m in modes]:
      out = subprocess.run(
        [sys.executable, __file__, "--child", "--repeats", str(a.repeats), "--host-memory", mode, checkout],
        capture_output=True,
        text=True,
        check=True,
      ).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
      r = rows[-1]
      flag = "  (busy: not a result)" if r["other_load"] > a.max_load else ""
      print(
        f"{r['checkout']} [{r['host_memory']}]: forward {r['forward_vs_diffusers']:.3f}x, fwd+bwd "
        f"{r['fwd_bwd_vs_diffusers']:.3f}x diffusers (ours {r['ms']['ours_fwd']:.0f} / {r['ms']['ours_fwd_bwd']:.0f} "
        f"ms, diffusers {r['ms']['diffusers_fwd']:.0f} / {r['ms']['diffusers_fwd_bwd']:.0f} ms; fwd+bwd page "
        f"faults ours {r['minor_faults_per_call']['ours_fwd_bwd']:.0f}, diffusers "
        f"{r['minor_faults_per_call']['diffusers_fwd_bwd']:.0f}), other load "
        f"{100 * r['other_load']:.0f}%{flag}",
        flush=True,
      )
  if a.json:
    from benchutil import cpu_model

    result = dict(date=time.strftime("%Y-%m-%d"), cpu_model=cpu_model(), cpus=os.cpu_count(), rows=rows)
    pathlib.Path(a.json).write_text(json.dumps(result, indent=2))
  if any(r["other_load"] > a.max_load for r in rows):
    sys.exit(f"rows were timed with more than {100 * a.max_load:.0f}% other load; rerun on an idle machine")


if __name__ == "__main__":
  main()
