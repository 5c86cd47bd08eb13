"""CPU training-step benchmark (ours vs diffusers + torch AdamW) and compiled memory of a 2B train step.

Usage:
  .venv/bin/python benchmarks/bench_train.py            # default, ~6-12 min on 2 busy cores
  .venv/bin/python benchmarks/bench_train.py --quick    # tiny timing config + one 2B compile, ~2 min
  .venv/bin/python benchmarks/bench_train.py --json out.json --repeats 7

Part 1, step time (median of --repeats steps after --warmup untimed steps, compile excluded):
  * diffusers: ``CogVideoXTransformer3DModel`` (float32, train mode), torch AdamW, one full step:
      t ~ U{0..999}, eps ~ N(0, I), a = sqrt_alpha_table()[t], s = sqrt(1 - a^2),
      x_t = a x0 + s eps, v = a eps - s x0, text zeroed per sample with p = ucg_rate,
      loss = mean((model(x_t, text, t) - v)^2); backward; clip_grad_norm(1.0); AdamW step
    (weight decay on >= 2-D weights only, like ours). Also with diffusers' gradient checkpointing, and
    loss + backward only (no clip / AdamW) to show the optimizer's share of the step.
  * ours: ``jax.jit(training.optim.train_step)`` with ``make_optimizer(OptimConfig())`` (the same
    v-MSE loss, clip 1.0, AdamW with the same hyper-parameters), float32 compute and params, the state
    donated, remat none / full / save_dots; cache off (= the diffusers model) and feature cache on;
    and ``jax.jit(jax.value_and_grad(objective.diffusion_loss))`` alone (no optimizer).
  Both start from the same weights (``transformer_weights.from_diffusers``); a loss parity check with
  fixed timesteps and noise is printed.
  GFLOP/s = model_flops_per_sample(cfg, latent_shape, text_len) x batch / step time, the analytic
  training FLOPs of ``training.trainer`` (3 x forward matmuls; remat recomputation and the optimizer
  are not counted). "% peak" is relative to the float32 matmul peak measured in the same run
  (``benchutil.matmul_peak``), or to --peak-gflops.

Part 2, compiled memory of one released-size (2B) training step: ``TransformerConfig()`` (30 layers,
hidden 1920, feature cache on, scanned layers) with bf16 compute and f32 params, AdamW state, no EMA,
latents (1, 13, 60, 90, 16), text (1, 226, 4096). The step is lowered from abstract shapes only
(jax.ShapeDtypeStruct; the state via jax.eval_shape), compiled, and XLA's ``memory_analysis()`` is read;
nothing is executed. Each remat policy compiles in a child process with a --compile-timeout limit.
  peak estimate = argument + temp + output - alias   (alias: the donated state reused for the output)
CPU XLA's buffer assignment only approximates what a GPU/TPU compile would need (different fusion,
layouts, scheduling). On CPU attention_backend='xla' holds one query block's scores at a time
(attention.CPU_QUERY_BLOCK rows x S per head), never the S x S matrix; on GPU/TPU 'auto' picks the
flash kernels (cudnn / splash), which hold no scores either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

from benchutil import OtherLoad, busy_fraction, cpu_model, host_memory_setup, log, matmul_peak, time_it

GIB = 1024**3
REMATS = ("none", "full", "save_dots")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  ap.add_argument(
    "--quick", action="store_true", help="tiny timing config and only remat=full for the 2B memory compile"
  )
  ap.add_argument("--json", metavar="PATH", help="write all results as JSON here")
  ap.add_argument("--repeats", type=int, default=5, help="timed training steps per row")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (after compile)")
  # Part 1: the small model.
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--frames", type=int, default=13, help="latent frames")
  ap.add_argument("--height", type=int, default=16, help="latent height")
  ap.add_argument("--width", type=int, default=16, help="latent width")
  ap.add_argument("--channels", type=int, default=16)
  ap.add_argument("--text-embed-dim", type=int, default=256)
  ap.add_argument("--text-len", type=int, default=32, help="max_text_seq_length")
  ap.add_argument("--time-embed-dim", type=int, default=256)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--ucg-rate", type=float, default=0.1)
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  ap.add_argument(
    "--peak-gflops", type=float, default=None, help="GFLOP/s of '%% peak' (default: measured in this run)"
  )
  ap.add_argument(
    "--skip-torch-checkpointing",
    action="store_true",
    help="skip the diffusers row with gradient checkpointing",
  )
  ap.add_argument(
    "--skip-grad-only",
    action="store_true",
    help="skip the loss+grad-only rows (no optimizer update; shows the optimizer's share)",
  )
  ap.add_argument(
    "--omp-wait-policy",
    default="PASSIVE",
    help="OMP_WAIT_POLICY for torch's OpenMP pool unless already set ('' leaves it alone)",
  )
  ap.add_argument("--seed", type=int, default=0)
  # Part 2: the 2B memory analysis.
  ap.add_argument("--skip-timing", action="store_true", help="skip part 1")
  ap.add_argument("--skip-memory", action="store_true", help="skip part 2")
  ap.add_argument("--mem-policies", default=",".join(REMATS), help="comma-separated remat policies")
  ap.add_argument(
    "--mem-shallow-layers",
    type=int,
    default=2,
    help="also compile the 2B step (remat none) at this depth to show compile time does "
    "not grow with depth under lax.scan; 0 = skip",
  )
  ap.add_argument("--compile-timeout", type=float, default=300.0, help="seconds per 2B compile")
  ap.add_argument(
    "--lora-rank",
    type=int,
    default=64,
    help="also time (part 1) and compile (part 2, remat full) LoRA training of this rank on the "
    "attention projections, gates trained (optim.train=lora); 0 = skip",
  )
  ap.add_argument("--mem-child", metavar="JSON", help=argparse.SUPPRESS)  # internal: one compile
  args = ap.parse_args(argv)
  if args.quick:
    args.heads, args.head_dim, args.layers = 2, 64, 2
    args.frames, args.height, args.width = 3, 8, 8
    args.text_embed_dim, args.text_len, args.time_embed_dim = 64, 16, 128
    args.repeats = min(args.repeats, 3)
    args.mem_policies, args.mem_shallow_layers = "full", 0
  return args


# ----------------------------------------------------------------------------------------------
# Part 1: step time of the small model.


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
  )
  return model.float().train()


def torch_optimizer(model, torch, ocfg):
  """torch AdamW with ours' hyper-parameters; weight decay on >= 2-D weights (kernels) only."""
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  return torch.optim.AdamW(
    [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
    lr=ocfg.lr,
    betas=(ocfg.b1, ocfg.b2),
    eps=ocfg.eps,
  )


def run_timing(a, results: dict) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from repvideo_jax import lora as L
  from repvideo_jax import schedule
  from repvideo_jax import transformer as T
  from repvideo_jax import transformer_weights as W
  from repvideo_jax.training import objective, optim
  from repvideo_jax.training.trainer import model_flops_per_sample

  torch.set_num_threads(a.threads)
  ocfg = optim.OptimConfig(warmup_steps=0)  # constant lr; hyper-parameters as the trainer's defaults
  table_np = schedule.sqrt_alpha_table().astype(np.float32)
  table = jnp.asarray(table_np)

  model = build_diffusers(a, torch)
  n_params = sum(p.numel() for p in model.parameters())
  state_dict = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  cfg = W.config_from_diffusers(
    dict(model.config),
    feature_cache=False,
    scan_layers=True,
    remat="none",
    dtype="float32",
    param_dtype="float32",
  )
  latent_shape = (a.frames, a.height, a.width, a.channels)
  flops = model_flops_per_sample(cfg, latent_shape, a.text_len) * a.batch
  gflop = flops / 1e9
  tokens = a.text_len + a.frames * (a.height // 2) * (a.width // 2)
  log(
    f"timing config: D={cfg.hidden_size} ({a.heads}x{a.head_dim}) layers={a.layers} latents "
    f"{a.frames}x{a.height}x{a.width}x{a.channels} text {a.text_len}x{a.text_embed_dim} batch {a.batch} "
    f"tokens/sample {tokens} params {n_params / 1e6:.2f} M, {gflop:.1f} GFLOP/step (analytic)"
  )

  rng = np.random.default_rng(a.seed)
  x0 = rng.standard_normal((a.batch, a.frames, a.height, a.width, a.channels), np.float32)
  text = rng.standard_normal((a.batch, a.text_len, a.text_embed_dim), np.float32)
  x0_t = torch.from_numpy(x0).permute(0, 1, 4, 2, 3).contiguous()  # diffusers: (B, T, C, H, W)
  text_t = torch.from_numpy(text)
  table_t = torch.from_numpy(table_np)
  batch = {"latents": jnp.asarray(x0), "text": jnp.asarray(text)}

  # -- loss parity at the initial weights (fixed timesteps and noise, no text dropout) ------------
  t_fix = np.linspace(0, 999, a.batch).astype(np.int32)
  noise_fix = rng.standard_normal(x0.shape, np.float32)

  def torch_v_loss(t, noise):
    av = table_t[t].view(-1, 1, 1, 1, 1)
    sv = torch.sqrt(1.0 - av * av)
    x_t, v = av * x0_t + sv * noise, av * noise - sv * x0_t
    v_hat = model(x_t, text_t, t, return_dict=False)[0]
    return torch.mean(torch.square(v_hat - v))

  with torch.no_grad():
    loss_torch = float(
      torch_v_loss(
        torch.from_numpy(t_fix).long(), torch.from_numpy(noise_fix).permute(0, 1, 4, 2, 3).contiguous()
      )
    )
  params = W.from_diffusers(state_dict, cfg)
  loss_ours = float(
    jax.jit(
      lambda p: objective.v_mse(
        p,
        T.make_apply(cfg),
        batch["latents"],
        batch["text"],
        jnp.asarray(t_fix),
        jnp.asarray(noise_fix),
        table=table,
      )[0]
    )(params)
  )
  results["parity"] = dict(
    loss_diffusers=loss_torch,
    loss_ours=loss_ours,
    rel_diff=abs(loss_ours - loss_torch) / max(abs(loss_torch), 1e-12),
  )
  log(f"loss parity: diffusers {loss_torch:.6f} ours {loss_ours:.6f}")

  rows = results["rows"] = []

  def add_row(name, remat, cache, timing, compile_s=None, final_loss=None, kind="step"):
    row = dict(
      name=name,
      kind=kind,
      remat=remat,
      feature_cache=cache,
      **timing,
      gflop_per_step=gflop,
      gflops_per_s=gflop / timing["median_s"],
      compile_s=compile_s,
      final_loss=final_loss,
    )
    row["peak_fraction"] = row["gflops_per_s"] / a.peak_gflops
    rows.append(row)
    log(f"  {name}: {1e3 * timing['median_s']:.0f} ms/step")

  # -- diffusers + torch AdamW -------------------------------------------------------------------
  gen = torch.Generator().manual_seed(a.seed + 1)

  def torch_train(checkpointing: bool, optimizer_step: bool = True):
    torch.manual_seed(a.seed)
    m = build_diffusers(a, torch)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    if checkpointing:
      m.enable_gradient_checkpointing()
    opt = torch_optimizer(m, torch, ocfg)
    last = {}

    def step():
      opt.zero_grad(set_to_none=True)
      t = torch.randint(0, len(table_np), (a.batch,), generator=gen)
      noise = torch.randn(x0_t.shape, generator=gen)
      keep = (torch.rand(a.batch, generator=gen) >= a.ucg_rate).float().view(-1, 1, 1)
      av = table_t[t].view(-1, 1, 1, 1, 1)
      sv = torch.sqrt(1.0 - av * av)
      x_t, v = av * x0_t + sv * noise, av * noise - sv * x0_t
      v_hat = m(x_t, text_t * keep, t, return_dict=False)[0]
      loss = torch.mean(torch.square(v_hat - v))
      loss.backward()
      if optimizer_step:
        torch.nn.utils.clip_grad_norm_(m.parameters(), ocfg.clip_norm)
        opt.step()
      last["loss"] = float(loss.detach())

    timing = time_it(step, a.repeats, a.warmup)
    return timing, last["loss"]

  log("diffusers + torch AdamW")
  timing, loss = torch_train(False)
  add_row("diffusers + torch AdamW", "-", False, timing, final_loss=loss)
  if not a.skip_torch_checkpointing:
    timing, loss = torch_train(True)
    add_row("diffusers + torch AdamW (grad ckpt)", "full", False, timing, final_loss=loss)
  if not a.skip_grad_only:
    timing, loss = torch_train(False, optimizer_step=False)
    add_row("diffusers loss+grad only (no optimizer)", "-", False, timing, final_loss=loss, kind="grad")
  model = None  # frees the reference model (the closures above no longer run)

  # -- ours ----------------------------------------------------------------------------------------
  def ours(remat: str, cache: bool, lora_rank: int = 0):
    c = dataclasses.replace(cfg, remat=remat, feature_cache=cache)
    prm = W.from_diffusers(state_dict, c, allow_missing_gates=True)
    adapter = None
    if lora_rank:  # the frozen base; optimizer state for the factors and gates only
      adapter = L.init(c, L.LoraConfig(rank=lora_rank), a.seed)
      optimizer = optim.make_optimizer(
        dataclasses.replace(ocfg, train="lora"), optim.lora_trainable(prm, adapter)
      )
    else:
      optimizer = optim.make_optimizer(ocfg, prm)
    state = optim.init_train_state(jax.device_put(prm), optimizer, jax.random.key(a.seed), lora=adapter)
    fn = jax.jit(
      lambda s, b: optim.train_step(
        s, b, apply_fn=T.make_apply(c), optimizer=optimizer, table=table, ucg_rate=a.ucg_rate
      ),
      donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def step():
      s, m = compiled(holder["state"], batch)
      jax.block_until_ready((s, m))
      holder["state"], holder["metrics"] = s, m

    timing = time_it(step, a.repeats, a.warmup)
    return timing, compile_s, float(holder["metrics"]["loss"])

  log("ours (jax.jit train_step)")
  for remat in REMATS:
    timing, compile_s, loss = ours(remat, False)
    add_row(f"ours train_step (remat={remat})", remat, False, timing, compile_s, loss)
  timing, compile_s, loss = ours("none", True)
  add_row("ours train_step (remat=none, feature cache)", "none", True, timing, compile_s, loss)
  if a.lora_rank:
    timing, compile_s, loss = ours("none", True, a.lora_rank)
    add_row(
      f"ours LoRA r={a.lora_rank} train_step (remat=none, cache)", "none", True, timing, compile_s, loss
    )
  if not a.skip_grad_only:  # the same loss and gradients without the optimizer update
    prm = jax.device_put(params)
    grad_fn = jax.jit(
      lambda p, b, k: jax.value_and_grad(objective.diffusion_loss, has_aux=True)(
        p, T.make_apply(cfg), b["latents"], b["text"], k, table=table, ucg_rate=a.ucg_rate
      )
    )
    key = jax.random.key(a.seed)
    t0 = time.perf_counter()
    compiled = grad_fn.lower(prm, batch, key).compile()
    compile_s = time.perf_counter() - t0
    out = {}

    def grad_step():
      out["res"] = jax.block_until_ready(compiled(prm, batch, key))

    timing = time_it(grad_step, a.repeats, a.warmup)
    add_row(
      "ours loss+grad only (remat=none, no optimizer)",
      "none",
      False,
      timing,
      compile_s,
      float(out["res"][0][0]),
      kind="grad",
    )

  for r in rows:  # against the plain diffusers row of the same kind (full step / loss+grad only)
    ref = next(x for x in rows if x["kind"] == r["kind"])
    r["speedup_vs_diffusers"] = ref["median_s"] / r["median_s"]
  results["timing_config"] = dict(
    hidden=cfg.hidden_size,
    heads=a.heads,
    head_dim=a.head_dim,
    layers=a.layers,
    latent_shape=[a.batch, *latent_shape],
    text_shape=[a.batch, a.text_len, a.text_embed_dim],
    tokens_per_sample=tokens,
    params=n_params,
    gflop_per_step=gflop,
  )


# ----------------------------------------------------------------------------------------------
# Part 2: compiled memory of the 2B step (one child process per compile).


def mem_child(spec: dict) -> dict:
  """Lower + compile the 2B train step from abstract shapes; returns XLA's memory analysis."""
  import jax
  import jax.numpy as jnp

  from repvideo_jax import lora as L
  from repvideo_jax import schedule
  from repvideo_jax import transformer as T
  from repvideo_jax.training import optim

  cfg = T.TransformerConfig(
    dtype="bfloat16",
    param_dtype="float32",
    remat=spec["remat"],
    scan_layers=True,
    feature_cache=True,
    num_layers=spec.get("layers") or T.TransformerConfig.num_layers,
  )
  ocfg = optim.OptimConfig()
  abstract_params = T.abstract_params(cfg)
  adapter = None
  if spec.get("lora_rank"):  # LoRA training: the optimizer sees only the factors and gates
    adapter = jax.eval_shape(lambda: L.init(cfg, L.LoraConfig(rank=spec["lora_rank"]), 0))
    optimizer = optim.make_optimizer(
      dataclasses.replace(ocfg, train="lora"), optim.lora_trainable(abstract_params, adapter)
    )
  else:
    optimizer = optim.make_optimizer(ocfg, abstract_params)
  state = jax.eval_shape(
    lambda p, lo: optim.init_train_state(p, optimizer, 0, ema=False, lora=lo), abstract_params, adapter
  )
  batch = {
    "latents": jax.ShapeDtypeStruct(tuple(spec["latents"]), jnp.float32),
    "text": jax.ShapeDtypeStruct(tuple(spec["text"]), jnp.float32),
  }
  table = jnp.asarray(schedule.sqrt_alpha_table(), jnp.float32)
  fn = jax.jit(
    lambda s, b: optim.train_step(s, b, apply_fn=T.make_apply(cfg), optimizer=optimizer, table=table),
    donate_argnums=0,
  )
  t0 = time.perf_counter()
  lowered = fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
    "peak_memory_in_bytes",
    "host_temp_size_in_bytes",
  )
  mem = {f: getattr(m, f, None) for f in fields} if m is not None else {}
  n_params = sum(int(x.size) for x in jax.tree.leaves(abstract_params))
  state_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state))
  return dict(
    remat=spec["remat"],
    lora_rank=spec.get("lora_rank") or 0,
    layers=cfg.num_layers,
    lower_s=t1 - t0,
    compile_s=t2 - t1,
    params=n_params,
    state_bytes=state_bytes,
    memory=mem,
    status="ok",
  )


def run_memory(a, results: dict) -> None:
  from repvideo_jax import transformer as T
  from repvideo_jax.training.trainer import model_flops_per_sample

  latents, text = (1, 13, 60, 90, 16), (1, 226, 4096)
  cfg = T.TransformerConfig(dtype="bfloat16")
  seq = text[1] + latents[1] * (latents[2] // cfg.patch_size) * (latents[3] // cfg.patch_size)
  results["memory_config"] = dict(
    layers=cfg.num_layers,
    hidden=cfg.hidden_size,
    heads=cfg.num_heads,
    latents=list(latents),
    text=list(text),
    dtype="bfloat16",
    param_dtype="float32",
    feature_cache=True,
    sequence=seq,
    train_tflop_per_sample=model_flops_per_sample(cfg, latents[1:], text[1]) / 1e12,
    attention_scores_gib_per_layer=cfg.num_heads * seq * seq * 2 / GIB,
  )
  jobs = [dict(remat=p.strip(), layers=None) for p in a.mem_policies.split(",") if p.strip()]
  if a.mem_shallow_layers:
    jobs.append(dict(remat="none", layers=a.mem_shallow_layers))
  if a.lora_rank:
    jobs.append(dict(remat="full", layers=None, lora_rank=a.lora_rank))
  rows = results["memory"] = []
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for job in jobs:
    spec = dict(job, latents=latents, text=text)
    label = (
      f"remat={job['remat']}"
      + (f" layers={job['layers']}" if job["layers"] else "")
      + (f" LoRA r={job['lora_rank']}" if job.get("lora_rank") else "")
    )
    log(f"2B train step memory analysis: {label} (compiling, limit {a.compile_timeout:.0f} s)")
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--mem-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=a.compile_timeout,
        env=env,
      )
      wall = time.perf_counter() - t0
      if proc.returncode == 0:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
      else:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        row = dict(
          remat=job["remat"],
          layers=job["layers"] or cfg.num_layers,
          status=f"error (exit {proc.returncode}): {' | '.join(tail)[-300:]}",
        )
    except subprocess.TimeoutExpired:
      wall = time.perf_counter() - t0
      row = dict(
        remat=job["remat"],
        layers=job["layers"] or cfg.num_layers,
        status=f"compile > {a.compile_timeout:.0f} s (stopped)",
      )
    row["wall_s"] = wall
    rows.append(row)
    log(f"  {label}: {row['status']} ({wall:.0f} s wall)")


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt_gib(x) -> str:
  return "n/a" if x is None else f"{x / GIB:.2f}"


def report(a, results: dict, busy_before: float, t_start: float) -> str:
  lines = []
  p = lines.append
  busy_run = results["other_load_run"]
  p(
    f"RepVideo training-step benchmark  (jax {results['jax']}, torch {results.get('torch', '-')}, "
    f"{os.cpu_count()} CPUs, torch threads {a.threads}, {platform.machine()})"
  )
  p(
    f"other processes' CPU share: {100 * busy_before:.0f}% before, {100 * busy_run:.0f}% during the run"
    + ("  (WARNING: shared machine, timings are noisy)" if max(busy_before, busy_run) > 0.05 else "")
  )
  if "rows" in results:
    tc, par = results["timing_config"], results["parity"]
    p("")
    p(
      f"1) training step on CPU, float32: hidden {tc['hidden']} ({tc['heads']} heads x {tc['head_dim']}), "
      f"{tc['layers']} layers, latents {'x'.join(map(str, tc['latent_shape']))}, text "
      f"{'x'.join(map(str, tc['text_shape']))}, {tc['tokens_per_sample']} tokens/sample, "
      f"{tc['params'] / 1e6:.2f} M params"
    )
    p(
      f"   analytic training FLOPs {tc['gflop_per_step']:.1f} GFLOP/step (model_flops_per_sample x batch; "
      f"remat recompute and optimizer not counted); peak = {a.peak_gflops:.0f} GFLOP/s"
    )
    p(
      f"   AdamW (lr 1e-5, b 0.9/0.95, wd 1e-4 on kernels), clip 1.0, v-MSE, ucg {a.ucg_rate}; "
      f"median of {a.repeats} steps after {a.warmup} warm-up"
    )
    p(
      f"   loss parity at init (same t, noise; no dropout): diffusers {par['loss_diffusers']:.6f}, ours "
      f"{par['loss_ours']:.6f} (rel diff {par['rel_diff']:.1e})"
    )
    p("")
    w = max(len(r["name"]) for r in results["rows"])
    hdr = (
      f"{'step':<{w}} {'median s':>8} {'min s':>6} {'GFLOP/s':>7} {'% peak':>6} {'vs diffusers':>12} "
      f"{'compile s':>9} {'other load':>10}"
    )
    p(hdr)
    p("-" * len(hdr))
    for r in results["rows"]:
      comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
      p(
        f"{r['name']:<{w}} {r['median_s']:>8.3f} {r['min_s']:>6.3f} {r['gflops_per_s']:>7.1f} "
        f"{100 * r['peak_fraction']:>5.1f}% {r['speedup_vs_diffusers']:>11.2f}x {comp:>9} "
        f"{100 * r['other_load']:>9.0f}%"
      )
    p(
      "('vs diffusers' = the diffusers row's time / this row's, full steps vs full steps and loss+grad vs "
      "loss+grad;\n > 1 = faster than diffusers. 'other load' = share of CPU time other processes took "
      "while the row was timed)"
    )
  if "memory" in results:
    mc = results["memory_config"]
    p("")
    p("2) compiled memory of one 2B training step (XLA memory_analysis, abstract shapes, nothing executed):")
    p(
      f"   TransformerConfig(): {mc['layers']} layers, hidden {mc['hidden']}, feature cache on, lax.scan "
      f"layers, bf16 compute, f32 params + AdamW m/v, no EMA, state donated;"
    )
    p(
      f"   latents {'x'.join(map(str, mc['latents']))}, text {'x'.join(map(str, mc['text']))}, "
      f"{mc['sequence']} tokens; {mc['train_tflop_per_sample']:.1f} TFLOP/sample (analytic)"
    )
    p("")
    hdr = (
      f"{'remat':<10} {'train':<8} {'layers':>6} {'compile s':>9} {'state':>9} {'argument':>9} {'output':>9} "
      f"{'alias':>9} {'temp':>9} {'code':>6} {'peak est':>9}  status"
    )
    p(hdr + "   (sizes in GiB)")
    p("-" * len(hdr))
    for r in results["memory"]:
      m = r.get("memory") or {}
      arg, out, alias, temp = (
        m.get(k)
        for k in (
          "argument_size_in_bytes",
          "output_size_in_bytes",
          "alias_size_in_bytes",
          "temp_size_in_bytes",
        )
      )
      peak = None if None in (arg, out, temp) else arg + temp + out - (alias or 0)
      r["peak_estimate_bytes"] = peak
      comp = f"{r['compile_s']:.1f}" if "compile_s" in r else f">{r['wall_s']:.0f}"
      train = f"lora r{r['lora_rank']}" if r.get("lora_rank") else "all"
      p(
        f"{r['remat']:<10} {train:<8} {r['layers']:>6} {comp:>9} {_fmt_gib(r.get('state_bytes')):>9} "
        f"{_fmt_gib(arg):>9} {_fmt_gib(out):>9} "
        f"{_fmt_gib(alias):>9} {_fmt_gib(temp):>9} {_fmt_gib(m.get('generated_code_size_in_bytes')):>6} "
        f"{_fmt_gib(peak):>9}  {r['status']}"
      )
    p(
      "   state = the train state (params, AdamW moments; for LoRA the frozen base, factors and their moments)."
    )
    p("   peak est = argument + temp + output - alias. These are CPU XLA numbers: they approximate what a")
    p("   GPU/TPU compile would need (other fusion, layouts and scheduling; CPU reports code size 0).")
    p(
      "   attention_backend='xla' holds one query block's scores on CPU, not the S x S matrix "
      f"({mc['attention_scores_gib_per_layer']:.1f} GiB per layer in bf16);"
    )
    p("   on GPU/TPU 'auto' picks the flash kernels (cudnn / splash), which hold none.")
    shallow = any(r["layers"] != mc["layers"] for r in results["memory"])
    p(
      "   compile s: XLA compile only (lowering excluded); with lax.scan it should not grow with depth"
      + (" (compare the shallow row)." if shallow else ".")
    )
  p("")
  p(f"total benchmark wall time: {time.perf_counter() - t_start:.0f} s")
  return "\n".join(lines)


def main(argv=None) -> dict:
  a = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if a.mem_child:
    print(json.dumps(mem_child(json.loads(a.mem_child))), flush=True)
    return {}
  if a.omp_wait_policy:
    os.environ.setdefault("OMP_WAIT_POLICY", a.omp_wait_policy)  # read when torch loads libgomp
  t_start = time.perf_counter()
  busy_before = busy_fraction()
  if busy_before > 0.1:
    log(f"WARNING: CPUs are {100 * busy_before:.0f}% busy with other processes; timings will be noisy")
  run_load = OtherLoad()

  import jax

  results: dict = dict(
    args=vars(a),
    jax=jax.__version__,
    cpus=os.cpu_count(),
    cpu_model=cpu_model(),
    date=time.strftime("%Y-%m-%d"),
    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
    other_load_before=busy_before,
  )
  if not a.skip_timing:
    import torch

    if a.peak_gflops is None:
      results["matmul_peak"] = matmul_peak(a.threads)
      a.peak_gflops = results["matmul_peak"]["peak_gflops_per_s"]

    results["torch"] = torch.__version__
    run_timing(a, results)
  if not a.skip_memory:
    run_memory(a, results)
  results["other_load_run"] = run_load.value()
  text = report(a, results, busy_before, t_start)
  print(text, flush=True)
  results["report"] = text
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(results, fh, indent=2, default=str)
    log(f"wrote {a.json}")
  return results


if __name__ == "__main__":
  host_memory_setup()  # ours and torch alike, before JAX starts
  main()
