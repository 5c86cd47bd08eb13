"""VAE benchmark: compiled peak memory of the full-size decoder, and CPU speed vs diffusers' VAE.

Usage:
  .venv/bin/python benchmarks/bench_vae.py                 # ~6-8 min on 2 cores
  .venv/bin/python benchmarks/bench_vae.py --quick         # ~2-3 min (smoke test)
  .venv/bin/python benchmarks/bench_vae.py --json out.json --repeats 5

Part 1, memory (nothing is executed). The full-size released VAE (``VAEConfig()`` defaults) decoding
the released clip, 13 latent frames at 60x90 (49 x 480 x 720 video), is lowered from abstract shapes
(``jax.ShapeDtypeStruct`` params and latents) and compiled; ``compiled.memory_analysis()`` gives
  temp    XLA's scratch buffers (activations) at the heap simulator's peak,
  args    inputs held by the caller (params, latents, and for a streamed chunk the incoming cache),
  output  results (video, and for a streamed chunk the outgoing conv cache),
  peak    temp + args + output (alias is reported in the JSON and is 0 here: nothing is donated),
and, from the optimized HLO text, ``largest``: the largest single array of the program, a
schedule-independent measure of its activation scale.
Programs:
  whole          ``decode(chunking='whole')``: the 13 latent frames in one pass.
  released       ``decode(chunking='released')``: chunks [0:3], [3:5], ... in ONE jitted program (first
                 chunk, then a ``lax.scan`` over the 2-frame chunks), so its number is the total.
  released+tile  the same with diffusers-style spatial tiles (``TilingConfig()``; 30x45-latent tiles),
                 all tiles in ONE jitted program (first dtype only: its compile is the slow one).
  chunk[0:3]     one ``decode_chunk`` step, the first chunk (3 latent frames -> 9 video frames, no cache).
  chunk[3:5]     one ``decode_chunk`` step, a later chunk (2 latent frames -> 8 frames) with the cache.
                 Streaming chunk by chunk from the host runs only these programs, so their peak bounds
                 the device memory of a streamed decode (plus the host-side output video).
  tile chunk     the two chunk steps at the largest tile size: the bound of streaming tile by tile and
                 chunk by chunk.
``--conv3d`` picks the causal 3D conv form (``VAEConfig.conv3d``) for both parts: 'auto' (the default)
is 'taps', a sum of per-frame 2D convs, on this CPU backend, and 'native', one 3D conv, on GPU/TPU.
Each program is compiled in a child process with a time limit (--compile-timeout, default 180 s); on a
timeout the latent height and width are halved and the program is retried (the table says which size
was used). On the CPU backend, XLA runs bfloat16 convolutions and matmuls in float32 (it upcasts ops
the CPU has no bfloat16 kernels for), so the bfloat16 rows are close to float32 here and are not what a
GPU/TPU would use; the float32 rows are the meaningful ones on this backend.
temp depends heavily on XLA's instruction schedule: the float32 programs are compiled a second time
with XLA:CPU's memory-oriented list scheduler (sched 'mem', ``MEM_SCHED_FLAG``) instead of its default
concurrency-optimized one (sched 'conc'), and the two disagree by up to 3x in opposite directions. With
the default scheduler, most of a chunk program's peak is full-resolution SpatialNorm3D terms
(``conv_y`` / ``conv_b`` of the resized latents, which depend only on z) computed up front and kept
alive (from a --xla_dump_to live-range dump), so these numbers are upper bounds of what this backend's
schedules need, not the model's minimum; the ``largest`` column is the scale-free comparison.

Part 2, CPU speed vs diffusers (same weights). A small ``AutoencoderKLCogVideoX`` (default
block_out_channels=(32, 64, 64, 64), latent_channels=16, layers_per_block=1, norm_num_groups=8) with
PyTorch's default init, converted with ``vae_weights.from_diffusers``. Decode 7 latent frames at 12x12
(-> 25 x 96 x 96 video); diffusers' ``decode`` runs the released chunks ([0:3], [3:5], [5:7]) for odd
frame counts, so it is compared with ours ``decode(chunking='released')`` (one jitted program), our
host loop over ``decode_chunk`` (streaming, 3 jitted calls) and single chunk steps against diffusers'
``decoder`` called on the same chunk. Encode 25 frames at 96x96: diffusers' ``encode`` (framewise,
8 pixel frames per chunk) vs ours 'framewise', and diffusers' ``encoder`` on the whole clip vs ours
'whole'. Timings are wall-clock medians of --repeats runs after one untimed first call (for ours: the
compile, whose time is reported separately) and --warmup more untimed runs. The machine may be
shared: the ``other`` column is the share of all CPUs that other processes used while a row was
timed. ``max|diff|`` is against the matching diffusers output (the streamed decode: against ours
'released').
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

from benchutil import host_memory_setup, log, time_it, wait_idle

GIB = 2**30
MEM_SCHED_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
ITEMSIZE = {
  "f64": 8,
  "s64": 8,
  "u64": 8,
  "c64": 8,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "s8": 1,
  "u8": 1,
  "pred": 1,
}


def parse_args(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  ap.add_argument(
    "--quick",
    action="store_true",
    help="smoke test: float32 memory only, no all-tiles program, smaller speed config",
  )
  ap.add_argument("--json", metavar="PATH", help="write all results as JSON here")
  # Part 1.
  ap.add_argument("--skip-memory", action="store_true")
  ap.add_argument("--mem-frames", type=int, default=13, help="latent frames (odd)")
  ap.add_argument("--mem-height", type=int, default=60, help="latent height")
  ap.add_argument("--mem-width", type=int, default=90, help="latent width")
  ap.add_argument("--mem-dtypes", default="float32,bfloat16", help="params + compute dtypes")
  ap.add_argument(
    "--skip-tiled-program",
    action="store_true",
    help="skip the all-tiles released+tile program (~1-1.5 min compile; compiled for the "
    "first --mem-dtypes entry only)",
  )
  ap.add_argument(
    "--skip-mem-scheduler",
    action="store_true",
    help=f"skip the float32 rows compiled with XLA:CPU's memory-oriented scheduler ({MEM_SCHED_FLAG})",
  )
  ap.add_argument(
    "--compile-timeout",
    type=float,
    default=180.0,
    help="seconds per lower+compile before falling back to a smaller size",
  )
  # Part 2.
  ap.add_argument("--skip-speed", action="store_true")
  ap.add_argument("--blocks", default="32,64,64,64", help="block_out_channels of the small VAE")
  ap.add_argument("--layers-per-block", type=int, default=1)
  ap.add_argument("--groups", type=int, default=8, help="norm_num_groups")
  ap.add_argument("--latent-channels", type=int, default=16)
  ap.add_argument("--frames", type=int, default=7, help="latent frames (odd)")
  ap.add_argument("--height", type=int, default=12, help="latent height")
  ap.add_argument("--width", type=int, default=12, help="latent width")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument(
    "--warmup",
    type=int,
    default=0,
    help="extra untimed runs; every row already makes one untimed first call (ours: the compile)",
  )
  ap.add_argument(
    "--wait-idle",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="before the speed part, wait up to this long for other processes to use < 10%% of the CPUs",
  )
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  ap.add_argument(
    "--omp-wait-policy",
    default="PASSIVE",
    help="OMP_WAIT_POLICY for torch's OpenMP pool unless already set ('' leaves it alone)",
  )
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--conv3d",
    choices=("auto", "native", "taps"),
    default="auto",
    help="VAEConfig.conv3d for both parts ('auto' is 'taps' on CPU, 'native' on GPU/TPU)",
  )
  ap.add_argument("--mem-worker", help=argparse.SUPPRESS)  # internal: one compile, JSON on stdout
  args = ap.parse_args(argv)
  if args.quick:
    args.mem_dtypes = "float32"
    args.skip_tiled_program = args.skip_mem_scheduler = True
    args.frames, args.height, args.width = 5, 8, 8
    args.repeats = min(args.repeats, 3)
  if args.frames % 2 == 0 or args.mem_frames % 2 == 0:
    ap.error("--frames and --mem-frames must be odd (the released chunking [0:3], [3:5], ...)")
  return args


# ----------------------------------------------------------------------------------------------
# Part 1: compiled memory (each program compiled in a child process, with a time limit).


def _mem_worker(spec: dict) -> dict:
  """Lowers and compiles one full-size program from abstract shapes; returns its memory stats."""
  import resource

  import jax
  import jax.numpy as jnp

  from repvideo_jax import vae as V

  cfg = V.VAEConfig(dtype=spec["dtype"], param_dtype=spec["dtype"], conv3d=spec["conv3d"])
  params = V.abstract_params(cfg)
  b, t, h, w, c = 1, spec["frames"], spec["height"], spec["width"], cfg.latent_channels
  kind = spec["kind"]

  def latents(frames):
    return jax.ShapeDtypeStruct((b, frames, h, w, c), jnp.float32)

  if kind in ("whole", "released", "released_tiled"):
    tiling = V.TilingConfig() if kind == "released_tiled" else None
    chunking = "whole" if kind == "whole" else "released"
    fn = lambda p, z: V.decode(p, z, config=cfg, chunking=chunking, tiling=tiling)  # noqa: E731
    args = (params, latents(t))
  elif kind == "chunk_first":
    fn = lambda p, z: V.decode_chunk(p, z, None, config=cfg)  # noqa: E731
    args = (params, latents(3))
  elif kind == "chunk_next":
    first = lambda p, z: V.decode_chunk(p, z, None, config=cfg)  # noqa: E731
    cache = jax.eval_shape(first, params, latents(3))[1]
    fn = lambda p, z, cc: V.decode_chunk(p, z, cc, config=cfg)  # noqa: E731
    args = (params, latents(2), cache)
  else:
    raise ValueError(kind)

  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  hlo = compiled.as_text() or ""
  largest = 0
  for m_ in re.finditer(r"= ([a-z]+[0-9]*)\[([0-9,]*)\]", hlo):
    n = ITEMSIZE.get(m_.group(1))
    if n:
      largest = max(largest, n * math.prod(int(d) for d in m_.group(2).split(",") if d))
  out = jax.eval_shape(fn, *args)
  out_video = out[0] if isinstance(out, tuple) else out
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  return dict(
    lower_s=t1 - t0,
    compile_s=t2 - t1,
    temp_bytes=int(m.temp_size_in_bytes),
    argument_bytes=int(m.argument_size_in_bytes),
    output_bytes=int(m.output_size_in_bytes),
    alias_bytes=int(m.alias_size_in_bytes),
    peak_bytes=int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes),
    param_bytes=int(nbytes(params)),
    cache_bytes=int(nbytes(out[1])) if isinstance(out, tuple) else 0,
    video_shape=list(out_video.shape),
    has_while_loop=" while(" in hlo,
    largest_array_bytes=int(largest),
    compile_max_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  )


def run_mem_program(spec: dict, timeout: float) -> dict:
  """Compiles ``spec`` in a child process; halves the latent height/width on a timeout."""
  h, w = spec["height"], spec["width"]
  tried = []
  while True:
    s = dict(spec, height=h, width=w)
    t0 = time.perf_counter()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if spec.get("xla_flags"):
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + spec["xla_flags"]).strip()
    try:
      proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--mem-worker", json.dumps(s)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
      )
    except subprocess.TimeoutExpired:  # subprocess.run kills its own child on the timeout
      tried.append(f"{h}x{w}: compile > {timeout:.0f} s")
      log(f"  {spec['kind']} {spec['dtype']} at {h}x{w}: timed out after {timeout:.0f} s")
      if h < 4 or w < 4:
        return dict(s, error="timed out at every size", fallbacks=tried)
      h, w = (h // 2) // 2 * 2 or 2, (w // 2) // 2 * 2 or 2
      continue
    if proc.returncode != 0:
      err = proc.stderr.strip().splitlines()[-1:] or ["?"]
      log(f"  {spec['kind']} {spec['dtype']} at {h}x{w}: failed: {err[0]}")
      return dict(s, error=err[0], fallbacks=tried)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(
      s,
      wall_s=time.perf_counter() - t0,
      fallbacks=tried,
      reduced_size=(h, w) != (spec["height"], spec["width"]),
    )
    return res


def memory_section(a) -> list[dict]:
  from repvideo_jax import vae as V

  cfg = V.VAEConfig()
  _, _, tile_h, tile_w, _, _ = V.TilingConfig().resolve(cfg)
  base = dict(frames=a.mem_frames, height=a.mem_height, width=a.mem_width)
  tile = dict(base, height=min(tile_h, a.mem_height), width=min(tile_w, a.mem_width))
  programs = [
    ("whole", "whole", base),
    ("released", "released", base),
    ("released+tile", "released_tiled", base),
    ("chunk[0:3]", "chunk_first", base),
    ("chunk[3:5]+cache", "chunk_next", base),
    ("tile chunk[0:3]", "chunk_first", tile),
    ("tile chunk[3:5]+cache", "chunk_next", tile),
  ]
  variants = [(d.strip(), "conc") for d in a.mem_dtypes.split(",") if d.strip()]
  if not a.skip_mem_scheduler:
    variants.append(("float32", "mem"))
  rows = []
  for dtype, sched in variants:
    for name, kind, size in programs:
      if kind == "released_tiled" and (a.skip_tiled_program or (dtype, sched) != variants[0]):
        continue
      log(
        f"memory: compiling {name} ({dtype}, {sched} scheduler, latents {size['frames']}x"
        f"{size['height']}x{size['width']}) ..."
      )
      res = run_mem_program(
        dict(
          size,
          kind=kind,
          dtype=dtype,
          sched=sched,
          conv3d=a.conv3d,
          xla_flags=MEM_SCHED_FLAG if sched == "mem" else "",
        ),
        a.compile_timeout,
      )
      res["program"] = name
      rows.append(res)
  return rows


def print_memory(rows: list[dict], a):
  print(
    "\n== 1. Compiled memory, full-size VAE decoder (VAEConfig() defaults), XLA:CPU "
    "memory_analysis, no execution =="
  )
  print(
    f"   clip: {a.mem_frames} latent frames at {a.mem_height}x{a.mem_width} -> "
    f"{4 * (a.mem_frames - 1) + 1}x{8 * a.mem_height}x{8 * a.mem_width} video; GiB; "
    f"peak = temp + args + output"
  )
  hdr = (
    f"{'program':<22} {'dtype':<8} {'sched':<5} {'latents':<9} {'video out':<11} {'temp':>7} "
    f"{'args':>5} {'output':>6} {'peak':>7} {'cache':>5} {'largest':>7} {'scan':>4} {'compile':>7}"
  )
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    t = {"chunk_first": 3, "chunk_next": 2}.get(r["kind"], r["frames"])
    lat = f"{t}x{r['height']}x{r['width']}"
    if "error" in r:
      print(f"{r['program']:<22} {r['dtype']:<8} {r['sched']:<5} {lat:<9} ERROR: {r['error']}")
      continue
    vid = "x".join(map(str, r["video_shape"][1:4]))
    print(
      f"{r['program']:<22} {r['dtype']:<8} {r['sched']:<5} {lat:<9} {vid:<11} "
      f"{r['temp_bytes'] / GIB:7.2f} {r['argument_bytes'] / GIB:5.2f} {r['output_bytes'] / GIB:6.2f} "
      f"{r['peak_bytes'] / GIB:7.2f} {r['cache_bytes'] / GIB:5.2f} {r['largest_array_bytes'] / GIB:7.2f} "
      f"{'yes' if r['has_while_loop'] else 'no':>4} {r['lower_s'] + r['compile_s']:6.1f}s"
    )
    if r.get("fallbacks"):
      print(f"{'':<22} ^ reduced size; tried: {'; '.join(r['fallbacks'])}")
  print(
    "   args = params (+ latents; + incoming conv cache for chunk[3:5]); output = video (+ outgoing "
    "cache for\n   chunk steps); cache = conv-cache size; largest = largest single array in the "
    "optimized HLO;\n   scan = program has a while loop (lax.scan); sched conc = XLA:CPU default "
    "(concurrency-optimized),\n   mem = " + MEM_SCHED_FLAG
  )
  keys = sorted({(r["dtype"], r["sched"]) for r in rows}, key=lambda k: (k[1] != "conc", k[0] != "float32"))
  for dtype, sched in keys:
    by = {r["program"]: r for r in rows if (r["dtype"], r["sched"]) == (dtype, sched) and "error" not in r}
    if "whole" not in by:
      continue
    whole = by["whole"]["peak_bytes"]
    parts = [
      f"{name} program {by[name]['peak_bytes'] / GIB:.1f} ({whole / by[name]['peak_bytes']:.1f}x)"
      for name in ("released", "released+tile")
      if name in by
    ]
    for label, names in (
      ("streamed chunks", ("chunk[0:3]", "chunk[3:5]+cache")),
      ("streamed tiles x chunks", ("tile chunk[0:3]", "tile chunk[3:5]+cache")),
    ):
      peak = max((by[n]["peak_bytes"] for n in names if n in by), default=0)
      if peak:
        parts.append(f"{label} {peak / GIB:.1f} ({whole / peak:.1f}x)")
    print(f"   {dtype}/{sched}: peak GiB (whole/this): whole {whole / GIB:.1f}; " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# Part 2: CPU speed vs diffusers.


def speed_section(a) -> dict:
  import diffusers
  import jax
  import numpy as np
  import torch

  from repvideo_jax import vae as V
  from repvideo_jax import vae_weights as W

  if a.wait_idle > 0:
    log(f"speed: waiting up to {a.wait_idle:.0f} s for an idle machine ...")
    wait_idle(a.wait_idle)
  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  blocks = tuple(int(x) for x in a.blocks.split(","))
  model = diffusers.AutoencoderKLCogVideoX(
    block_out_channels=blocks,
    latent_channels=a.latent_channels,
    layers_per_block=a.layers_per_block,
    norm_num_groups=a.groups,
    temporal_compression_ratio=4,
    sample_height=8 * a.height,
    sample_width=8 * a.width,
  ).eval()
  cfg = W.config_from_diffusers(dict(model.config), conv3d=a.conv3d)
  params = jax.device_put(
    W.from_diffusers({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, cfg)
  )
  n_params = sum(p.numel() for p in model.parameters())

  rng = np.random.default_rng(a.seed)
  b, t, h, w = a.batch, a.frames, a.height, a.width
  frames, hh, ww = 4 * (t - 1) + 1, 8 * h, 8 * w
  lat = rng.standard_normal((b, t, h, w, a.latent_channels)).astype(np.float32)  # scaled latents
  video = rng.uniform(-1, 1, (b, frames, hh, ww, 3)).astype(np.float32)
  sf = cfg.scaling_factor
  z_t = torch.from_numpy(lat / sf).permute(0, 4, 1, 2, 3).contiguous()  # diffusers takes unscaled z
  x_t = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()
  lat_j, video_j = jax.device_put(lat), jax.device_put(video)
  cl = lambda tt: tt.permute(0, 2, 3, 4, 1).numpy()  # noqa: E731  torch (B,C,T,H,W) -> channels last
  bounds = V.chunk_bounds(t, "released", 2)
  rows = []

  def maxdiff(x, y):
    return float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))

  def torch_row(name, group, chunks, fn):
    log(f"speed: {name} ...")
    with torch.inference_mode():
      out = fn()
      tm = time_it(fn, a.repeats, a.warmup)
    rows.append(dict(name=name, group=group, impl="diffusers", chunks=chunks, compile_s=None, **tm))
    return out

  def jax_row(name, group, chunks, fn, ref=None, ref_name=None):
    log(f"speed: {name} ...")
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    tm = time_it(lambda: jax.block_until_ready(fn()), a.repeats, a.warmup)
    rows.append(
      dict(
        name=name,
        group=group,
        impl="ours",
        chunks=chunks,
        compile_s=compile_s,
        **tm,
        max_abs_diff=None if ref is None else maxdiff(out, ref),
        diff_vs=ref_name,
      )
    )
    return out

  # Decode, whole clip through the released chunks.
  ref_dec = cl(
    torch_row("diffusers decode (chunks 3+2+2..)", "decode", len(bounds), lambda: model.decode(z_t).sample)
  )
  dec_rel = jax.jit(functools.partial(V.decode, config=cfg, chunking="released"))
  out_rel = jax_row(
    "ours decode released (1 jit)",
    "decode",
    len(bounds),
    lambda: dec_rel(params, lat_j),
    ref_dec,
    "diffusers decode",
  )

  def stream():
    cache, outs = None, []
    for s, e in bounds:
      y, cache = V.decode_chunk(params, lat_j[:, s:e], cache, config=cfg)
      outs.append(y)
    return jax.numpy.concatenate(outs, axis=1)

  jax_row("ours decode_chunk loop (stream)", "decode", len(bounds), stream, out_rel, "ours released")
  ref_whole = cl(torch_row("diffusers decoder whole clip", "decode", 1, lambda: model.decoder(z_t)[0]))
  dec_whole = jax.jit(functools.partial(V.decode, config=cfg, chunking="whole"))
  jax_row(
    "ours decode whole", "decode", 1, lambda: dec_whole(params, lat_j), ref_whole, "diffusers decoder whole"
  )

  # Single chunk steps.
  (s0, e0), (s1, e1) = bounds[0], bounds[1] if len(bounds) > 1 else bounds[0]
  with torch.inference_mode():
    _, cache_t = model.decoder(z_t[:, :, s0:e0])
  ref_c0 = cl(
    torch_row(f"diffusers decoder chunk[{s0}:{e0}]", "chunk", 1, lambda: model.decoder(z_t[:, :, s0:e0])[0])
  )
  jax_row(
    f"ours decode_chunk [{s0}:{e0}]",
    "chunk",
    1,
    lambda: V.decode_chunk(params, lat_j[:, s0:e0], None, config=cfg)[0],
    ref_c0,
    "diffusers chunk",
  )
  cache_j = V.decode_chunk(params, lat_j[:, s0:e0], None, config=cfg)[1]
  if len(bounds) > 1:
    ref_c1 = cl(
      torch_row(
        f"diffusers decoder chunk[{s1}:{e1}]+cache",
        "chunk",
        1,
        lambda: model.decoder(z_t[:, :, s1:e1], conv_cache=cache_t)[0],
      )
    )
    jax_row(
      f"ours decode_chunk [{s1}:{e1}]+cache",
      "chunk",
      1,
      lambda: V.decode_chunk(params, lat_j[:, s1:e1], cache_j, config=cfg)[0],
      ref_c1,
      "diffusers chunk",
    )

  # Encode (posterior mean, unscaled).
  n_enc_chunks = max(frames // 8, 1)
  ref_enc = cl(
    torch_row(
      "diffusers encode (8-frame chunks)", "encode", n_enc_chunks, lambda: model.encode(x_t).latent_dist.mean
    )
  )
  enc_fw = jax.jit(lambda p, x: V.encode_posterior(p, x, config=cfg, chunking="framewise").mean)
  jax_row(
    "ours encode framewise",
    "encode",
    n_enc_chunks,
    lambda: enc_fw(params, video_j),
    ref_enc,
    "diffusers encode",
  )
  ref_encw = cl(
    torch_row(
      "diffusers encoder whole clip", "encode", 1, lambda: model.encoder(x_t)[0][:, : a.latent_channels]
    )
  )
  enc_whole = jax.jit(lambda p, x: V.encode_posterior(p, x, config=cfg, chunking="whole").mean)
  jax_row(
    "ours encode whole", "encode", 1, lambda: enc_whole(params, video_j), ref_encw, "diffusers encoder whole"
  )

  return dict(
    config=dict(
      block_out_channels=blocks,
      layers_per_block=a.layers_per_block,
      norm_num_groups=a.groups,
      latent_channels=a.latent_channels,
      n_params=n_params,
    ),
    latents=[b, t, h, w, a.latent_channels],
    video=[b, frames, hh, ww, 3],
    decode_chunks=bounds,
    rows=rows,
  )


def print_speed(sp: dict, a):
  c = sp["config"]
  print(
    f"\n== 2. CPU speed vs diffusers, small VAE {c['block_out_channels']}, layers_per_block="
    f"{c['layers_per_block']}, groups={c['norm_num_groups']}, latent={c['latent_channels']} "
    f"({c['n_params'] / 1e6:.2f} M params), float32 =="
  )
  print(
    f"   decode latents {'x'.join(map(str, sp['latents'][1:4]))} -> video "
    f"{'x'.join(map(str, sp['video'][1:4]))}; released chunks {sp['decode_chunks']}; "
    f"median of {a.repeats} (+{a.warmup} warm-up), wall-clock, {a.threads} threads"
  )
  hdr = (
    f"{'':<38} {'chunks':>6} {'median ms':>10} {'ms/chunk':>9} {'cpu ms':>8} {'vs diffusers':>12} "
    f"{'compile s':>9} {'max|diff|':>9} {'other':>5}"
  )
  print(hdr)
  print("-" * len(hdr))
  ref = None
  for r in sp["rows"]:
    if r["impl"] == "diffusers":
      ref = r
    speed = f"{ref['median_s'] / r['median_s']:.2f}x" if r["impl"] == "ours" and ref else "1.00x"
    comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
    diff = f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "-"
    other = f"{100 * r['other_load']:4.0f}%" if r.get("other_load") is not None else "-"
    print(
      f"{r['name']:<38} {r['chunks']:>6} {1e3 * r['median_s']:10.1f} "
      f"{1e3 * r['median_s'] / r['chunks']:9.1f} {1e3 * r['cpu_median_s']:8.0f} {speed:>12} {comp:>9} "
      f"{diff:>9} {other:>5}"
    )
  print(
    "   'vs diffusers' = diffusers median / ours (>1: ours faster), against the diffusers row above "
    "it;\n   max|diff| vs the matching diffusers output (the stream row: vs ours 'released'); "
    "cpu ms = process CPU time (all threads);\n   other = share of all CPUs used by other "
    "processes while the row was timed (the machine is shared; > ~10% makes that row unreliable)"
  )


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
  a = parse_args(argv)
  if a.mem_worker:
    print(json.dumps(_mem_worker(json.loads(a.mem_worker))))
    return {}
  if a.omp_wait_policy and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy  # before torch is imported
  t_start = time.perf_counter()
  import jax
  import torch

  from repvideo_jax import vae as V

  results = dict(
    args={k: v for k, v in vars(a).items() if k != "mem_worker"},
    env=dict(
      python=platform.python_version(),
      jax=jax.__version__,
      torch=torch.__version__,
      diffusers=__import__("diffusers").__version__,
      cpus=os.cpu_count(),
      jax_devices=[str(d) for d in jax.devices()],
      omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    ),
  )
  if not a.skip_memory:
    results["memory"] = memory_section(a)
  if not a.skip_speed:
    results["speed"] = speed_section(a)
  results["total_s"] = time.perf_counter() - t_start
  e = results["env"]
  print(
    f"bench_vae: jax {e['jax']}, torch {e['torch']}, diffusers {e['diffusers']}, {e['cpus']} CPUs, "
    f"{'quick' if a.quick else 'default'} flags, conv3d={a.conv3d} "
    f"({V.VAEConfig(conv3d=a.conv3d).conv3d_impl()})"
  )
  if "memory" in results:
    print_memory(results["memory"], a)
  if "speed" in results:
    print_speed(results["speed"], a)
  print(f"\ntotal {results['total_s']:.0f} s")
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(results, fh, indent=2)
    log(f"wrote {a.json}")
  return results


if __name__ == "__main__":
  host_memory_setup()  # ours and torch alike, before JAX starts
  main()
