"""CPU benchmark: our JAX transformer vs diffusers' CogVideoXTransformer3DModel (PyTorch), same weights.

Usage:
  .venv/bin/python benchmarks/bench_transformer.py            # default config, ~3-5 min on 2 idle cores
  .venv/bin/python benchmarks/bench_transformer.py --quick    # tiny config, < 1 min (smoke test)
  .venv/bin/python benchmarks/bench_transformer.py --json out.json --repeats 3
  .venv/bin/python benchmarks/bench_transformer.py --xla-flags=--xla_cpu_experimental_ynn_fusion_type=
  (the last disables XLA:CPU's YNNPACK dot fusions; it made our forward ~10 % slower here)

What is measured (each timing is the median of --repeats runs after warm-up runs):
  * forward:   diffusers under torch.no_grad vs ours under jax.jit (cache off = plain CogVideoX, and
               the RepVideo feature cache on as an extra row; scan vs unrolled layers).
  * fwd + bwd: loss = mean(output ** 2), gradients w.r.t. all params. diffusers: loss.backward();
               ours: jax.jit(jax.value_and_grad(loss)), with remat none / full / save_dots.
  * compile:   lower + compile wall time of ours at depth 2 and depth --deep-layers (same width),
               with the layers scanned (lax.scan) vs unrolled (Python loop), forward and fwd+bwd.

FLOP model (``forward_flops``), one forward, multiply-adds counted as 2 FLOPs, matmuls only
(LayerNorm, softmax, GELU, residual adds, modulation broadcasts are elementwise and left out; on this
config they are < 2 % of the total). Symbols: B batch, L text tokens, N = T * (H/p) * (W/p) video
tokens, S = L + N, D = heads * head_dim, F = MLP width (4 D), E = time_embed_dim, Dt = text_embed_dim,
C = in/out channels, p = patch size, n = layers:

  patch embedding     2 * B * N * (p*p*C) * D
  text projection     2 * B * L * Dt * D
  time embedding      2 * B * (D * E + E * E)                  (sinusoid of width D -> E -> E)
  per layer:
    AdaLN modulation  2 * B * 2 * (E * 6D)                     (norm1 and norm2 linears; per sample)
    Q, K, V, out      2 * B * S * 4 * D^2
    attention         4 * B * S^2 * D                          (QK^T: 2 S^2 D, PV: 2 S^2 D)
    MLP               2 * B * S * 2 * D * F
  output head         2 * B * E * 2D + 2 * B * N * D * (p*p*C)

fwd+bwd "useful" FLOPs = 3 x forward (the backward costs two matmuls per forward matmul); remat's
recomputation is deliberately not counted, so GFLOP/s of remat rows is model-FLOPs throughput.
XLA's own count (``compiled.cost_analysis()['flops']``) is printed next to it; XLA counts one
iteration of a while loop (lax.scan) body only, so it is read from the unrolled (scan_layers=False)
program as well.

GFLOP/s is also given as a fraction of the matmul peak measured in the same run (``benchutil.matmul_peak``:
the best of torch and XLA on a float32 matmul of the MLP's shape and a 2048^3 one), or of --peak-gflops.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from benchutil import OtherLoad, cpu_model, host_memory_setup, log, matmul_peak, time_it, wait_idle


def parse_args(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  ap.add_argument("--quick", action="store_true", help="tiny config (< 1 min); overrides size flags")
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--frames", type=int, default=13, help="latent frames")
  ap.add_argument("--height", type=int, default=16, help="latent height")
  ap.add_argument("--width", type=int, default=16, help="latent width")
  ap.add_argument("--channels", type=int, default=16)
  ap.add_argument("--text-embed-dim", type=int, default=512)
  ap.add_argument("--text-len", type=int, default=64, help="max_text_seq_length")
  ap.add_argument("--time-embed-dim", type=int, default=512)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (after compile)")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  ap.add_argument(
    "--peak-gflops",
    type=float,
    default=None,
    help="GFLOP/s that '%% peak' is relative to (default: measured in this run, benchutil.matmul_peak)",
  )
  ap.add_argument("--shallow-layers", type=int, default=2, help="compile-time benchmark: shallow depth")
  ap.add_argument("--deep-layers", type=int, default=30, help="compile-time benchmark: deep depth")
  ap.add_argument(
    "--skip-unrolled-deep-grad",
    action="store_true",
    help="skip compiling fwd+bwd of the unrolled deep model (the slowest compile)",
  )
  ap.add_argument("--skip-compile", action="store_true", help="skip the compile-time section")
  ap.add_argument("--skip-remat", action="store_true", help="skip the remat fwd+bwd rows")
  ap.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
  ap.add_argument(
    "--omp-wait-policy",
    default="PASSIVE",
    help="OMP_WAIT_POLICY for torch's OpenMP pool unless already set in the environment "
    "('' leaves it alone). ACTIVE (libgomp's spinning default) made diffusers 3-6x "
    "slower on a 2-vCPU VM; PASSIVE is torch's best setting there",
  )
  ap.add_argument(
    "--wait-idle",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="wait up to this long for other processes to leave the CPUs idle before starting",
  )
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", metavar="PATH", help="write all results as JSON here")
  args = ap.parse_args(argv)
  if args.quick:
    args.heads, args.head_dim, args.layers = 2, 64, 2
    args.frames, args.height, args.width = 3, 8, 8
    args.text_embed_dim, args.text_len, args.time_embed_dim = 64, 16, 128
    args.repeats, args.shallow_layers, args.deep_layers = min(args.repeats, 3), 2, 6
  return args


# ----------------------------------------------------------------------------------------------
# FLOPs.


def forward_flops(a) -> dict[str, float]:
  """Analytic matmul FLOPs of one forward pass (see the module docstring for the formula)."""
  d, f, e, p, c = a.heads * a.head_dim, 4 * a.heads * a.head_dim, a.time_embed_dim, 2, a.channels
  b, l = a.batch, a.text_len
  n = a.frames * (a.height // p) * (a.width // p)
  s = l + n
  parts = {
    "embed": 2 * b * n * (p * p * c) * d + 2 * b * l * a.text_embed_dim * d + 2 * b * (d * e + e * e),
    "modulation": a.layers * 2 * b * 2 * e * 6 * d + 2 * b * e * 2 * d,
    "qkv_out": a.layers * 2 * b * s * 4 * d * d,
    "attention": a.layers * 4 * b * s * s * d,
    "mlp": a.layers * 2 * b * s * 2 * d * f,
    "proj_out": 2 * b * n * d * (p * p * c),
  }
  parts["total"] = float(sum(parts.values()))
  parts["tokens"] = s
  return parts


def xla_flops(compiled) -> float | None:
  """compiled.cost_analysis() is a dict in new JAX, a list with one dict per program in old JAX."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


# ----------------------------------------------------------------------------------------------
# Timing helpers.


# ----------------------------------------------------------------------------------------------
# Models.


def build_diffusers(a, torch):
  from diffusers import CogVideoXTransformer3DModel

  torch.manual_seed(a.seed)
  model = CogVideoXTransformer3DModel(
    num_attention_heads=a.heads,
    attention_head_dim=a.head_dim,
    in_channels=a.channels,
    out_channels=a.channels,
    time_embed_dim=a.time_embed_dim,
    text_embed_dim=a.text_embed_dim,
    num_layers=a.layers,
    sample_frames=4 * (a.frames - 1) + 1,
    sample_height=a.height,
    sample_width=a.width,
    patch_size=2,
    max_text_seq_length=a.text_len,
    use_rotary_positional_embeddings=False,
    temporal_compression_ratio=4,
  ).float()
  # Random, unit-scale weights everywhere (diffusers' init leaves some biases at 0 / norms at 1,
  # which would let a layout bug hide in the parity check).
  gen = torch.Generator().manual_seed(a.seed)
  with torch.no_grad():
    for name, prm in model.named_parameters():
      if prm.ndim >= 2:
        fan_in = prm[0].numel()
        prm.copy_(torch.randn(prm.shape, generator=gen) / fan_in**0.5)
      elif name.endswith("weight") and "norm" in name:
        prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=gen))
      else:
        prm.copy_(0.1 * torch.randn(prm.shape, generator=gen))
  return model.eval()


def make_inputs(a, torch):
  gen = torch.Generator().manual_seed(a.seed + 1)
  lat = torch.randn(a.batch, a.frames, a.channels, a.height, a.width, generator=gen)
  text = torch.randn(a.batch, a.text_len, a.text_embed_dim, generator=gen)
  ts = torch.randint(0, 1000, (a.batch,), generator=gen)
  return lat, ts, text


# ----------------------------------------------------------------------------------------------
# Main.


def main(argv=None) -> dict:
  a = parse_args(argv)
  if a.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + a.xla_flags).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if a.omp_wait_policy:
    os.environ.setdefault("OMP_WAIT_POLICY", a.omp_wait_policy)  # read when torch loads libgomp
  t_start = time.perf_counter()
  busy_before = wait_idle(a.wait_idle)
  if busy_before > 0.1:
    log(f"WARNING: CPUs are {100 * busy_before:.0f}% busy with other processes; timings will be noisy")
  t_start = time.perf_counter()
  run_load = OtherLoad()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from repvideo_jax import transformer as T
  from repvideo_jax import transformer_weights as W

  torch.set_num_threads(a.threads)
  peak = None
  if a.peak_gflops is None:
    peak = matmul_peak(a.threads)
    a.peak_gflops = peak["peak_gflops_per_s"]
    log(f"measured float32 matmul peak: {a.peak_gflops:.0f} GFLOP/s")
  flops = forward_flops(a)
  fwd_gflop = flops["total"] / 1e9
  log(
    f"config: D={a.heads * a.head_dim} ({a.heads}x{a.head_dim}) layers={a.layers} "
    f"latents {a.frames}x{a.height}x{a.width}x{a.channels} text {a.text_len}x{a.text_embed_dim} "
    f"batch={a.batch} tokens={flops['tokens']} fwd={fwd_gflop:.2f} GFLOP"
  )

  # ---- models and weights ------------------------------------------------------------------
  model = build_diffusers(a, torch)
  lat, ts, text = make_inputs(a, torch)
  state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  cfg = W.config_from_diffusers(
    dict(model.config), feature_cache=False, scan_layers=True, remat="none", dtype="float32"
  )
  params = jax.device_put(W.from_diffusers(state, cfg))
  cfg_cache = dataclasses.replace(cfg, feature_cache=True)
  params_cache = jax.device_put(W.from_diffusers(state, cfg_cache, allow_missing_gates=True))
  lat_cl = jnp.asarray(lat.permute(0, 1, 3, 4, 2).numpy())
  ts_j, text_j = jnp.asarray(ts.numpy()), jnp.asarray(text.numpy())
  inputs = (lat_cl, ts_j, text_j)

  rows: list[dict] = []
  diff_fwd_ms = diff_bwd_ms = None

  def add_row(name, kind, timing, gflop, extra=None):
    ms = 1e3 * timing["median_s"]
    ref = diff_fwd_ms if kind == "fwd" else diff_bwd_ms
    row = dict(
      name=name,
      kind=kind,
      **timing,
      gflop=gflop,
      gflops_per_s=gflop / (ms / 1e3),
      speedup_vs_diffusers=(ref / ms) if ref else None,
      **(extra or {}),
    )
    row["peak_fraction"] = row["gflops_per_s"] / a.peak_gflops
    rows.append(row)
    log(f"  {name}: {ms:.1f} ms")
    return row

  # ---- forward -----------------------------------------------------------------------------
  log("forward: diffusers")
  with torch.no_grad():
    ref_out = model(lat, text, ts, return_dict=False)[0]

    def torch_fwd():
      model(lat, text, ts, return_dict=False)

    t = time_it(torch_fwd, a.repeats, a.warmup)
  diff_fwd_ms = 1e3 * t["median_s"]
  add_row("diffusers fwd (torch.no_grad)", "fwd", t, fwd_gflop)

  def jax_fwd_variant(name, c, prm, scan=True):
    c = dataclasses.replace(c, scan_layers=scan)
    t0 = time.perf_counter()
    compiled = jax.jit(T.make_apply(c)).lower(prm, *inputs).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(prm, *inputs)
    out.block_until_ready()
    t = time_it(lambda: compiled(prm, *inputs).block_until_ready(), a.repeats, a.warmup)
    return add_row(
      name,
      "fwd",
      t,
      fwd_gflop,
      dict(compile_s=compile_s, xla_gflop=((xla_flops(compiled) or float("nan")) / 1e9)),
    ), np.asarray(out)

  log("forward: ours")
  row, ours_out = jax_fwd_variant("ours fwd (jit, scan)", cfg, params)
  xla_fwd_gflop_scan = row["xla_gflop"]
  ref_cl = ref_out.permute(0, 1, 3, 4, 2).numpy()
  max_diff = float(np.abs(ours_out - ref_cl).max())
  ref_scale = float(np.abs(ref_cl).mean())
  row_unrolled, _ = jax_fwd_variant("ours fwd (jit, unrolled)", cfg, params, scan=False)
  xla_fwd_gflop_unrolled = row_unrolled["xla_gflop"]
  jax_fwd_variant("ours fwd (jit, scan, feature cache)", cfg_cache, params_cache)

  # ---- forward + backward ------------------------------------------------------------------
  log("fwd+bwd: diffusers")
  for prm in model.parameters():
    prm.requires_grad_(True)

  def torch_fwd_bwd():
    for prm in model.parameters():
      prm.grad = None
    out = model(lat, text, ts, return_dict=False)[0]
    loss = out.square().mean()
    loss.backward()
    return loss

  t = time_it(torch_fwd_bwd, a.repeats, a.warmup)
  diff_bwd_ms = 1e3 * t["median_s"]
  add_row("diffusers fwd+bwd", "fwd+bwd", t, 3 * fwd_gflop)
  torch_loss = torch_fwd_bwd().item()
  torch_grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))

  def jax_grad_variant(name, c, prm):
    fn = T.make_apply(c)

    def loss(p, *xs):
      return jnp.mean(jnp.square(fn(p, *xs)))

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(prm, *inputs).compile()
    compile_s = time.perf_counter() - t0
    res = compiled(prm, *inputs)
    jax.block_until_ready(res)
    t = time_it(lambda: jax.block_until_ready(compiled(prm, *inputs)), a.repeats, a.warmup)
    row = add_row(
      name,
      "fwd+bwd",
      t,
      3 * fwd_gflop,
      dict(compile_s=compile_s, xla_gflop=(xla_flops(compiled) or float("nan")) / 1e9),
    )
    return row, res

  log("fwd+bwd: ours")
  policies = ["none"] if a.skip_remat else ["none", "full", "save_dots"]
  grad_check = None
  for pol in policies:
    _, (l_val, grads) = jax_grad_variant(
      f"ours fwd+bwd (remat={pol})", dataclasses.replace(cfg, remat=pol), params
    )
    if grad_check is None:
      gnorm = float(np.sqrt(sum((np.asarray(g, np.float64) ** 2).sum() for g in jax.tree.leaves(grads))))
      grad_check = dict(
        loss_ours=float(l_val),
        loss_diffusers=torch_loss,
        grad_norm_ours=gnorm,
        grad_norm_diffusers=torch_grad_norm,
      )
  jax_grad_variant("ours fwd+bwd (remat=none, unrolled)", dataclasses.replace(cfg, scan_layers=False), params)
  jax_grad_variant("ours fwd+bwd (remat=none, feature cache)", cfg_cache, params_cache)
  model = None  # frees the reference model (the closures above no longer run)

  # ---- compile times -----------------------------------------------------------------------
  compile_rows: list[dict] = []
  if not a.skip_compile:
    log("compile times")
    for layers in (a.shallow_layers, a.deep_layers):
      for scan in (True, False):
        for kind in ("fwd", "fwd+bwd"):
          if kind == "fwd+bwd" and not scan and layers == a.deep_layers and a.skip_unrolled_deep_grad:
            continue
          c = dataclasses.replace(cfg, num_layers=layers, scan_layers=scan)
          prm = T.abstract_params(c)
          fn = T.make_apply(c)
          if kind == "fwd+bwd":
            fn = jax.value_and_grad(lambda p, *xs, fn=fn: jnp.mean(jnp.square(fn(p, *xs))))
          abstract_inputs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs)
          t0 = time.perf_counter()
          lowered = jax.jit(fn).lower(prm, *abstract_inputs)
          t1 = time.perf_counter()
          compiled = lowered.compile()
          t2 = time.perf_counter()
          r = dict(
            layers=layers,
            scan=scan,
            kind=kind,
            lower_s=t1 - t0,
            compile_s=t2 - t1,
            total_s=t2 - t0,
            xla_gflop=(xla_flops(compiled) or float("nan")) / 1e9,
          )
          compile_rows.append(r)
          log(f"  layers={layers} scan={scan} {kind}: {r['total_s']:.1f} s")
          del compiled, lowered

  # ---- report ------------------------------------------------------------------------------
  lines = []
  p = lambda s="": lines.append(s)
  busy_run = run_load.value()
  p(
    f"RepVideo transformer CPU benchmark  (jax {jax.__version__}, torch {torch.__version__}, "
    f"{os.cpu_count()} CPUs, torch threads {a.threads}, {cpu_model()}, {time.strftime('%Y-%m-%d')})"
  )
  p(
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  OMP_WAIT_POLICY="
    f"{os.environ.get('OMP_WAIT_POLICY', '')!r}  other processes' CPU share: {100 * busy_before:.0f}% "
    f"before, {100 * busy_run:.0f}% during the run"
    + ("  (WARNING: timings disturbed)" if max(busy_before, busy_run) > 0.05 else "")
  )
  p(
    f"config: hidden {a.heads * a.head_dim} ({a.heads} heads x {a.head_dim}), {a.layers} layers, "
    f"latents {a.frames}x{a.height}x{a.width}x{a.channels}, text {a.text_len}x{a.text_embed_dim}, "
    f"batch {a.batch}, sequence {flops['tokens']} tokens, float32"
  )
  p(
    f"analytic forward FLOPs: {fwd_gflop:.2f} GFLOP (attention {flops['attention'] / 1e9:.2f}, "
    f"qkv+out {flops['qkv_out'] / 1e9:.2f}, mlp {flops['mlp'] / 1e9:.2f}, other "
    f"{(flops['embed'] + flops['modulation'] + flops['proj_out']) / 1e9:.2f});  XLA cost_analysis: "
    f"{xla_fwd_gflop_scan:.2f} GFLOP (scan: loop body counted once), "
    f"{xla_fwd_gflop_unrolled:.2f} GFLOP (unrolled)"
  )
  p(
    f"parity (forward, cache off): max |ours - diffusers| = {max_diff:.2e} "
    f"(mean |output| = {ref_scale:.3f});  loss ours {grad_check['loss_ours']:.6f} vs diffusers "
    f"{grad_check['loss_diffusers']:.6f};  |grad| ours {grad_check['grad_norm_ours']:.5f} vs "
    f"diffusers {grad_check['grad_norm_diffusers']:.5f}"
  )
  p(
    f"timings: median of {a.repeats} after {a.warmup} warm-up; fwd+bwd GFLOP = 3 x forward "
    f"(remat recompute not counted); peak = {a.peak_gflops:.0f} GFLOP/s"
    + (" (measured float32 matmul peak, best of torch and XLA)" if peak else " (--peak-gflops)")
  )
  p()
  hdr = (
    f"{'name':<42} {'median ms':>9} {'min ms':>8} {'GFLOP/s':>7} {'% peak':>6} {'vs diffusers':>12}"
    f" {'other load':>10}"
  )
  p(hdr)
  p("-" * len(hdr))
  for r in rows:
    sp = f"{r['speedup_vs_diffusers']:.2f}x" if r["speedup_vs_diffusers"] else "1.00x"
    p(
      f"{r['name']:<42} {1e3 * r['median_s']:>9.1f} {1e3 * r['min_s']:>8.1f} {r['gflops_per_s']:>7.1f} "
      f"{100 * r['peak_fraction']:>5.1f}% {sp:>12} {100 * r['other_load']:>9.0f}%"
    )
  p(
    "('vs diffusers' = diffusers median / ours median of the same kind, > 1 means ours is faster; "
    "'other load' = share of\n CPU time taken by other processes while that row was timed: rows "
    "with more than a few % are unreliable)"
  )
  if compile_rows:
    p()
    p(f"compile time of ours (lower + compile, seconds; hidden {a.heads * a.head_dim}, same shapes):")
    hdr = f"{'layers':>6} {'layers as':>10} {'program':>8} {'lower s':>8} {'compile s':>10} {'total s':>8}"
    p(hdr)
    p("-" * len(hdr))
    for r in compile_rows:
      p(
        f"{r['layers']:>6} {'lax.scan' if r['scan'] else 'unrolled':>10} {r['kind']:>8} "
        f"{r['lower_s']:>8.2f} {r['compile_s']:>10.2f} {r['total_s']:>8.2f}"
      )
  p()
  p(f"total benchmark wall time: {time.perf_counter() - t_start:.0f} s")
  print("\n".join(lines), flush=True)

  results = dict(
    args=vars(a),
    flops=flops,
    xla_fwd_gflop_unrolled=xla_fwd_gflop_unrolled,
    parity=dict(max_abs_diff=max_diff, mean_abs_output=ref_scale, **grad_check),
    rows=rows,
    compile=compile_rows,
    jax=jax.__version__,
    torch=torch.__version__,
    cpus=os.cpu_count(),
    cpu_model=cpu_model(),
    date=time.strftime("%Y-%m-%d"),
    matmul_peak=peak,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
    other_load_before=busy_before,
    other_load_run=busy_run,
  )
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(results, fh, indent=2)
    log(f"wrote {a.json}")
  return results


if __name__ == "__main__":
  host_memory_setup()  # ours and torch alike, before JAX starts
  main()
