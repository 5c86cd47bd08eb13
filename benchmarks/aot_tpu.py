"""Compiler figures of every TPU preset: per-chip memory, headroom, compile time, FLOPs per step.

    .venv/bin/python benchmarks/aot_tpu.py                       # every configs/train-tpu-* and sample-*
    .venv/bin/python benchmarks/aot_tpu.py --only train-tpu-v5p-16 sample-2b-v5e-b1

Each preset is compiled by ``python -m repvideo_jax.aot`` in its own process for the topology it
names (libtpu, deviceless: no TPU, no weights, nothing executed) and the JSON reports are gathered into
``benchmarks/results_aot_tpu.json`` and a Markdown table (``--markdown``). These are compiler figures:
memory from XLA's buffer assignment for the chip, FLOPs from the model (the MFU numerator), and the step
time at which MFU would be 40% / 60%. They are not measured step times.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIB = 1 << 30
sys.path.insert(0, str(ROOT))
from repvideo_jax.pipeline import load_sampling_preset  # noqa: E402


def presets(only=None) -> list[tuple[str, str]]:
  found = [("train", p.stem) for p in sorted((ROOT / "configs").glob("train-tpu-*.yaml"))]
  found += [("sample", p.stem) for p in sorted((ROOT / "configs").glob("sample-*.yaml"))]
  return [(kind, name) for kind, name in found if not only or name in only]


def run_one(kind: str, name: str, timeout: float, extra=()) -> tuple[list[dict], int, str]:
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "report.json"
    flag = "--config" if kind == "train" else "--preset"
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(
        [sys.executable, "-m", "repvideo_jax.aot", kind, flag, name, "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
      )
    except subprocess.TimeoutExpired:
      return [], 3, f"no result within --timeout {timeout:.0f} s"
    wall = time.perf_counter() - t0
    rows = json.loads(out.read_text()) if out.exists() else []
  for row in rows:
    row.update(preset=name, kind=kind, process_wall_s=round(wall, 1))
  error = "" if rows else (proc.stderr.strip().splitlines() or ["no output"])[-1]
  return rows, proc.returncode, error


def markdown(rows: list[dict]) -> str:
  head = (
    "| preset | program | topology | mesh | per-chip total (GiB) | HBM (GiB) | headroom | "
    "compile (s) | model TFLOPs/step | XLA GFLOPs/chip | s/step at 40% / 60% MFU |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
  )
  lines = []
  for r in rows:
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v != 1) or "1 chip"
    program = r["name"].split(": ", 1)[-1].split(" (")[0] if r["kind"] == "sample" else "train step"
    program += f" (batch {r['name'].split('global batch ')[1].split(',')[0]})" if r["kind"] == "train" else ""
    mfu = f"{r['step_s_at_mfu_40']:.2f} / {r['step_s_at_mfu_60']:.2f}" if r.get("step_s_at_mfu_40") else "-"
    flops = f"{r['model_flops'] / 1e12:.1f}" if r.get("model_flops") else "-"
    xla = f"{r['compiler_flops_per_chip'] / 1e9:.0f}" if r.get("compiler_flops_per_chip") else "-"
    compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s_clean", True) else "n/a (load)"
    lines.append(
      f"| {r['preset']} | {program} | {r['topology']} | {mesh} | {r['total_bytes'] / GIB:.2f} | "
      f"{r['hbm_bytes'] / GIB:.2f} | {100 * r['headroom']:.0f}%{'' if r['fits'] else ' (no fit)'} | "
      f"{compile_s} | {flops} | {xla} | {mfu} |"
    )
  return head + "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", nargs="*", help="preset names (default: every TPU preset)")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_aot_tpu.json"))
  ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
  ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per preset")
  ap.add_argument("--min-headroom", type=float, default=0.10, help="a preset must leave this HBM share free")
  ap.add_argument(
    "--update", action="store_true", help="replace only the rows of the presets run here in an existing --out"
  )
  ap.add_argument(
    "--under-load",
    action="store_true",
    help="other jobs share the CPU: keep the memory figures, withhold the compile times",
  )
  args = ap.parse_args(argv)
  rows, failed, decoded = [], [], set()
  for kind, name in presets(args.only):
    extra = ()
    if kind == "sample":  # the VAE decode (one video, streamed) is the same program for every batch size
      p = load_sampling_preset(name)
      key = (p.topology.split(":")[0], p.vae_tiling, p.frames, p.height, p.width, json.dumps(p.vae))
      if key in decoded:
        extra = ("--stages", "text_encoder,denoise")
      decoded.add(key)
    got, code, error = run_one(kind, name, args.timeout, extra)
    rows += got
    low = [r for r in got if r["headroom"] < args.min_headroom]
    status = (
      "DOES NOT FIT"
      if code == 1
      else f"error: {error}"
      if code
      else f"fits, but headroom under {args.min_headroom:.0%}"
      if low
      else "fits"
    )
    print(f"{name}: {status}", flush=True)
    if code != 0 or low:
      failed.append(name)
  for r in rows:
    r["compile_s_clean"] = not args.under_load
  if args.update and pathlib.Path(args.out).exists():
    ran = {r["preset"] for r in rows}
    kept = [r for r in json.loads(pathlib.Path(args.out).read_text())["rows"] if r["preset"] not in ran]
    order = [name for _, name in presets()]
    rows = sorted(kept + rows, key=lambda r: order.index(r["preset"]) if r["preset"] in order else 1e9)
  cpu = next(
    (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
    platform.processor(),
  )
  result = {
    "date": time.strftime("%Y-%m-%d"),
    "host_cpu": cpu,
    "note": "compiler figures (libtpu, deviceless AOT); not measured step times",
    "rows": rows,
  }
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
  if args.markdown:
    print(markdown(rows))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
