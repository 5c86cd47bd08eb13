"""Generate videos from text prompts with a RepVideo / CogVideoX model folder.

    python sample.py --prompt "a red circle moving left on a black background"     # bundled demo model
    python sample.py --model DIR --prompt "a panda playing guitar" [--prompt ...] --out outputs/

Without --model, the tiny demo model bundled with the package is used (no download; 17 frames at
64x64). DIR is a folder written by `python -m repvideo_jax.convert pipeline` (or a diffusers-layout
CogVideoX folder). Writes one mp4 per prompt plus a JSON sidecar with every setting, the seed and
the timings. Settings left unset come from the model folder's own defaults (pipeline.json), else
the released RepVideo sampler: 50 steps of DPM-Solver++(2M) SDE, dynamic CFG (scale 6, as
released), zero unconditional embedding, 49 frames at 480x720, 8 fps.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import re
import sys
import time

from repvideo_jax.config import parse_lora_arg
from repvideo_jax.outputs import atomic_write, check_output


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--model",
    default=None,
    help="model folder (converted pipeline or diffusers layout); default: the bundled demo model",
  )
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts-file", help="text file with one prompt per line")
  p.add_argument(
    "--negative-prompt",
    default=None,
    help="encode this as the unconditional branch (diffusers style); default: the released zero embedding",
  )
  p.add_argument(
    "--out",
    default="outputs",
    help="output folder (default: outputs); videos already there are kept and numbering continues after them",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="number from 0000 again, replacing videos of the same number and prompt",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=None, help="sampler steps (default 50)")
  p.add_argument(
    "--guidance",
    type=float,
    default=None,
    help="CFG scale (constant w, or the scale of the released/smooth schedules; default 6)",
  )
  p.add_argument(
    "--cfg-schedule",
    choices=["released", "constant", "smooth"],
    default=None,
    help="released (default): dynamic CFG with the raw-timestep formula; smooth: the same "
    "formula over the step index (a deviation from the release)",
  )
  p.add_argument("--sampler", choices=["dpmpp2m", "ddim"], default=None, help="default dpmpp2m")
  p.add_argument(
    "--step-cache",
    default=None,
    metavar="METHOD[:VALUE]",
    help="skip transformer work on some steps: residual[:THRESHOLD] (reuse the layer stack's residual; "
    "needs the folder's calibration, python -m repvideo_jax.step_cache calibrate), cfg[:K] (the "
    "unconditional branch every K steps), or both joined by '+'; default none",
  )
  p.add_argument("--frames", type=int, default=None, help="video frames, 8k+1 (default 49)")
  p.add_argument("--height", type=int, default=None, help="default 480")
  p.add_argument("--width", type=int, default=None, help="default 720")
  p.add_argument("--fps", type=float, default=None, help="default 8")
  p.add_argument(
    "--dtype",
    choices=["float32", "bfloat16"],
    default=None,
    help="compute dtype of all models (default: bfloat16 on GPU/TPU, float32 on CPU)",
  )
  p.add_argument("--batch-size", type=int, default=None, help="prompts sampled together (default 1)")
  p.add_argument(
    "--preset",
    default=None,
    help="sampling preset (configs/sample-*.yaml): batch size, sizes, weight dtypes, VAE "
    "tiling and device mesh for an accelerator; flags given here still win",
  )
  p.add_argument(
    "--mesh",
    default=None,
    metavar="data=N,context=M",
    help="device mesh for one call (axes data, fsdp, tensor, context): batch and its CFG "
    "pair over data, each video's sequence over context. Default: the preset's, else the "
    "batch over all devices when it divides them",
  )
  p.add_argument(
    "--lora",
    action="append",
    default=[],
    metavar="PATH[:SCALE]",
    help="a LoRA for the transformer (our folder or diffusers' pytorch_lora_weights.safetensors) "
    "with its scale (default 1.0); repeatable",
  )
  p.add_argument(
    "--lora-merge",
    action="store_true",
    help="fold the LoRAs into the weights once at load (default: apply them layer by layer)",
  )
  m = p.add_argument_group(
    "memory", "what stays on the device and how the VAE decodes; README, 'Memory', says what fits where"
  )
  m.add_argument(
    "--offload",
    choices=["auto", "none", "text", "stage"],
    default=None,
    help="which models stay on the device between stages: none (all stay), text (the text encoder "
    "leaves once every prompt is encoded), stage (only the running stage's model is on the device). "
    "Default: the preset's, else auto: the first of none, text, stage whose weights on the device at "
    "any one stage fit in three quarters of its memory",
  )
  m.add_argument(
    "--vae-tiling",
    choices=["auto", "on", "off"],
    default=None,
    help="decode in overlapping spatial tiles, streamed tile by tile and chunk by chunk (diffusers' "
    "tiled decode). Default: the preset's, else auto (tiles when the untiled decode would not fit)",
  )
  m.add_argument(
    "--vae-tile",
    default=None,
    metavar="HxW",
    help="tile size in pixels, e.g. 240x360 (default: half the VAE's sample size, as diffusers)",
  )
  m.add_argument(
    "--vae-tile-overlap",
    default=None,
    metavar="FH[,FW]",
    help="tile overlap as a fraction of the tile, height and width (default 1/6,1/5, as diffusers)",
  )
  m.add_argument(
    "--text-encoder-dtype",
    choices=["float32", "bfloat16"],
    default=None,
    help="T5 weights and compute (default: bfloat16 on GPU/TPU, float32 on CPU)",
  )
  m.add_argument(
    "--quantize",
    choices=["none", "text-encoder", "transformer", "all"],
    default=None,
    help="int8 weight-only quantisation (qwix) of the layer stacks of these models; the quality cost "
    "is in docs/memory.md (default: the preset's, else none)",
  )
  m.add_argument(
    "--low-memory",
    action="store_true",
    help="settings for a 12 GB accelerator: --offload stage --vae-tiling on, with T5 in bfloat16 "
    "(the accelerator default); flags given here still win. Add --quantize text-encoder for less",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument(
    "--no-verify", action="store_true", help="skip the SHA-256 check of the converted weight files on load"
  )
  return p.parse_args(argv)


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    path = pathlib.Path(args.prompts_file)
    if not path.is_file():
      raise FileNotFoundError(f"--prompts-file {path} does not exist")
    prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
  return prompts


def slug(text: str, n: int = 48) -> str:
  return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "video"


def check_args(args) -> None:
  """Each flag's own check, once, before any model is loaded: one clear error naming the flag (and
  the --out folder created). The settings they make up with the model folder's defaults are checked
  against the model by ``pipeline.settings_for``; the library trusts both from then on."""
  if args.seed is not None and not 0 <= args.seed < 2**32:
    raise ValueError(f"--seed must be in [0, 2^32 - 1], got {args.seed}")
  if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 1):
    raise ValueError(f"--guidance must be a finite number >= 1 (1 = no guidance), got {args.guidance}")
  if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
    raise ValueError(f"--fps must be a finite number > 0, got {args.fps}")
  for flag, value in (
    ("--steps", args.steps),
    ("--frames", args.frames),
    ("--height", args.height),
    ("--width", args.width),
    ("--batch-size", args.batch_size),
  ):
    if value is not None and value < 1:
      raise ValueError(f"{flag} must be >= 1, got {value}")
  args.vae_tile_config = parse_vae_tile(args.vae_tile, args.vae_tile_overlap)
  args.loras = [parse_lora_arg(text) for text in args.lora]
  if args.lora_merge and not args.loras:
    raise ValueError("--lora-merge needs at least one --lora")
  check_output(args.out, "--out", folder=True)


def parse_vae_tile(tile: str | None, overlap: str | None):
  """--vae-tile HxW and --vae-tile-overlap FH[,FW] -> the fields of ``vae.TilingConfig`` (a dict;
  None when neither is given)."""
  if tile is None and overlap is None:
    return None
  fields = {}
  if tile is not None:
    m = re.fullmatch(r"(\d+)x(\d+)", tile.strip())
    if not m or min(int(m.group(1)), int(m.group(2))) < 8:
      raise ValueError(f"--vae-tile must be HEIGHTxWIDTH in pixels, each >= 8, e.g. 240x360; got {tile!r}")
    fields.update(tile_sample_height=int(m.group(1)), tile_sample_width=int(m.group(2)))
  if overlap is not None:
    try:
      parts = [float(x) for x in overlap.split(",")]
    except ValueError:
      parts = []
    if len(parts) not in (1, 2) or not all(0 <= f < 0.5 for f in parts):
      raise ValueError(
        f"--vae-tile-overlap must be one or two fractions in [0, 0.5) (height[,width]), e.g. 0.1667,0.2; "
        f"got {overlap!r}"
      )
    fields.update(overlap_factor_height=parts[0], overlap_factor_width=parts[-1])
  return fields


def next_number(out: pathlib.Path) -> int:
  """The first file number after the videos already in ``out`` (0000_<prompt>.mp4 ...)."""
  numbers = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"(\d{4,})_.*\.(mp4|json)$", p.name))]
  return max(numbers, default=-1) + 1


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  args = parse_args(argv)
  written: list[pathlib.Path] = []
  try:
    check_args(args)
    return run(args, written)
  except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(
      f"interrupted: kept the {len(written)} finished video(s) in {args.out}"
      f"{' (' + ', '.join(p.name for p in written) + ')' if written else ''}; the batch in progress "
      "was not written",
      file=sys.stderr,
    )
    return 130


def run(args, written: list) -> int:
  # The package is imported here, after the arguments are checked: importing jax and the pipeline
  # takes ~3.5 s (measured), which `--help` and a mistyped flag should not wait for.
  import jax  # noqa: PLC0415

  from repvideo_jax import pipeline, quantize, sharding, step_cache, video_io  # noqa: PLC0415
  from repvideo_jax import vae as V  # noqa: PLC0415
  from repvideo_jax.demo import demo_model_dir  # noqa: PLC0415

  prompts = read_prompts(args)
  preset = pipeline.load_sampling_preset(args.preset) if args.preset else None
  if preset is not None:  # the preset fills what the command line leaves unset
    for flag, value in (
      ("batch_size", preset.batch),
      ("frames", preset.frames),
      ("height", preset.height),
      ("width", preset.width),
    ):
      if getattr(args, flag) is None:
        setattr(args, flag, value)
  args.batch_size = 1 if args.batch_size is None else args.batch_size  # >= 1: flag or preset checked
  n_dev = jax.device_count()
  layout = None
  if args.mesh:
    layout = sharding.parse_mesh(args.mesh)
  elif preset is not None and n_dev > 1:
    layout = preset.mesh or pipeline.default_sample_mesh(n_dev, args.batch_size, preset.use_guidance)
  accelerator = jax.default_backend() != "cpu"
  dtype = args.dtype or ("bfloat16" if accelerator else "float32")
  if args.low_memory:  # the settings for a 12 GB device fill what the command line leaves unset
    args.offload = args.offload or "stage"
    args.vae_tiling = args.vae_tiling or "on"
    # (T5 in bfloat16 is the accelerator default already; XLA:CPU would need more memory for it)
  vae_tiling = args.vae_tiling or ("on" if preset is not None and preset.vae_tiling else "auto")
  vae_tile = V.TilingConfig(**args.vae_tile_config) if args.vae_tile_config else None
  if preset is not None:  # the preset's memory settings, where the command line gives none
    args.offload = args.offload or preset.offload
    args.quantize = args.quantize or preset.quantize
  quantized = quantize.CHOICES[args.quantize or "none"]
  model = args.model or str(demo_model_dir())
  t0 = time.perf_counter()
  overrides = {
    c: {"dtype": dtype, **((getattr(preset, c) or {}) if preset is not None else {})}
    for c in ("transformer", "text_encoder", "vae")
  }
  if args.dtype:  # an explicit --dtype wins over the preset's compute dtypes
    for c in overrides.values():
      c["dtype"] = dtype
  # T5 weights and compute: bfloat16 on accelerators unless asked (docs/memory.md states its parity)
  text_encoder_dtype = args.text_encoder_dtype
  if text_encoder_dtype is None and accelerator and not args.dtype and not (preset and preset.text_encoder):
    text_encoder_dtype = "bfloat16"  # unless --dtype or the preset says otherwise
  if text_encoder_dtype:
    overrides["text_encoder"].update(dtype=text_encoder_dtype, param_dtype=text_encoder_dtype)
  pipe = pipeline.load_pipeline(
    model,
    transformer_overrides=overrides["transformer"],
    text_encoder_overrides=overrides["text_encoder"],
    vae_overrides=overrides["vae"],
    verify=not args.no_verify,
    loras=args.loras,
    lora_merge=args.lora_merge,
    quantize_weights=quantized,
  )
  fps = args.fps  # --fps was checked by check_args; the folder's default is checked here
  if fps is None:
    fps = pipeline.model_defaults(pipe).get("fps", 8.0)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
      raise ValueError(f'"fps" in {model}/pipeline.json defaults must be a positive number, got {fps!r}')
  settings = pipeline.settings_for(
    pipe,
    num_frames=args.frames,
    height=args.height,
    width=args.width,
    steps=args.steps,
    guidance=args.guidance,
    cfg_schedule=args.cfg_schedule,
    sampler=args.sampler,
    seed=args.seed,
    negative_prompt=args.negative_prompt,
    step_cache=args.step_cache,
  )
  plan = pipeline.step_cache_plan(pipe, settings)  # before any sampling: a missing calibration fails now
  if vae_tile is not None and vae_tiling == "off":
    raise ValueError(
      "--vae-tile / --vae-tile-overlap set tiles, but VAE tiling is off: drop them or use --vae-tiling auto|on"
    )
  if vae_tile is not None:  # tiles that cannot tile fail now, not after sampling
    _, lat_h, lat_w, _ = settings.latent_shape(pipe.transformer_config, pipe.vae_config)
    pipeline.check_tiles(pipe.vae_config, vae_tile, lat_h, lat_w)
  load_s = time.perf_counter() - t0
  out = pathlib.Path(args.out)  # created by check_args
  first_number = 0 if args.overwrite else next_number(out)
  from tqdm.auto import tqdm  # noqa: PLC0415 (see the top of run)

  res = pipe.residency(args.offload or "auto")
  starts = list(range(0, len(prompts), args.batch_size))
  embeddings, encode_s = {}, {}
  if res.mode != "none":  # every prompt first, so the text encoder leaves the device for good
    for start in starts:
      t_enc = time.perf_counter()
      embeddings[start] = jax.block_until_ready(
        pipeline.encode_for_sampling(pipe, prompts[start : start + args.batch_size], settings)
      )
      encode_s[start] = time.perf_counter() - t_enc
    res.release("text_encoder")
  total_steps, sampling_s, copies_seen = 0, 0.0, 0
  for start in starts:
    batch = prompts[start : start + args.batch_size]
    if layout is not None:
      mesh = sharding.make_mesh(**layout)
    else:
      mesh = sharding.make_mesh(data=n_dev) if n_dev > 1 and len(batch) % n_dev == 0 else None
    bar = (
      None
      if args.no_progress
      else tqdm(
        total=settings.steps,
        unit="step",
        leave=False,
        desc=f"prompts {start + 1}-{start + len(batch)}/{len(prompts)}",
      )
    )
    timings: dict = {}
    frames = pipeline.generate(
      pipe,
      batch,
      settings,
      mesh=mesh,
      timings=timings,
      first_index=start,
      vae_tiling=vae_tiling,
      vae_tile=vae_tile,
      embeddings=embeddings.get(start),
      progress=None if bar is None else (lambda _i, bar=bar: bar.update(1)),
    )
    if start in encode_s:  # encoded before the loop (with the text encoder's copies, first batch)
      timings["text_encode_s"] = encode_s[start]
    timings["memory"] = res.summary(copies_seen)  # what this batch copied to and from the device
    copies_seen = len(res.copies)
    if bar is not None:
      bar.close()
    total_steps += settings.steps
    sampling_s += timings["sampling_s"]
    for k, prompt in enumerate(batch):
      index = start + k  # the video's noise key: position in this run, whatever the file number
      stem = out / f"{first_number + index:04d}_{slug(prompt)}"
      video_io.write_mp4(stem.with_suffix(".mp4"), frames[k], fps=fps)
      sidecar = {
        "prompt": prompt,
        "index": index,
        "video": stem.with_suffix(".mp4").name,
        "frames_sha256": hashlib.sha256(frames[k].tobytes()).hexdigest(),
        "model": str(pathlib.Path(model).resolve()),
        "fps": fps,
        "dtype": dtype,
        "batch_size": args.batch_size,
        "batch_prompts": batch,
        "devices": n_dev,
        "preset": args.preset,
        "memory_settings": {
          "offload": res.mode,
          "offload_requested": args.offload or "auto",
          "low_memory": args.low_memory,
          "text_encoder_dtype": pipe.text_encoder_config.param_dtype,
          "quantize": list(pipe.quantized),
          "vae_tiling": timings["vae"].get("vae_tiling"),
          "vae_tiling_requested": vae_tiling,
          "vae_tile": dataclasses.asdict(vae_tile) if vae_tile else None,
        },
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "settings": dataclasses.asdict(settings),
        "timings": {**timings, "load_s": load_s},
        "transformer": {
          "feature_cache": pipe.transformer_config.feature_cache,
          "num_layers": pipe.transformer_config.num_layers,
        },
        "loras": pipe.loras,  # path, scale, merged, format, rank, alpha, targets of each LoRA
        "step_cache": None
        if plan is None
        else {
          "plan": plan.tolist(),  # per step: 0 full, 1 conditional branch only, 2 residual reused
          "transformer_calls": step_cache.transformer_calls(plan, settings.uses_guidance),
          "uncached_calls": step_cache.transformer_calls(
            [step_cache.FULL] * len(plan), settings.uses_guidance
          ),
        },
        "jax_backend": jax.default_backend(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
      }
      atomic_write(stem.with_suffix(".json"), json.dumps(sidecar, indent=2))
      written.append(stem.with_suffix(".mp4"))
  print(
    f"wrote {len(written)} video(s) to {out} | {sampling_s / max(total_steps, 1):.3f} s/step "
    f"(incl. first-call compile) | load {load_s:.1f}s",
    file=sys.stderr,
  )
  return 0


if __name__ == "__main__":
  from repvideo_jax import host_memory  # noqa: PLC0415

  host_memory.setup_cli()  # before JAX starts: see repvideo_jax/host_memory.py
  sys.exit(main())
