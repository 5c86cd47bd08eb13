"""Step caching: faster sampling without retraining, inside the one compiled sampling loop.

    python -m repvideo_jax.step_cache calibrate --model DIR [--prompts-file F] [--steps 50]
    python sample.py --step-cache residual            # or residual:0.3, cfg, cfg:3, residual:0.3+cfg:2

Two methods, alone or together (``GenerationSettings.step_cache``, ``sample.py --step-cache``):

  residual[:THRESHOLD]  Skip the layer stack on some steps and reuse its residual (output minus input on
                        the joint text + video sequence, ``transformer.apply_with_residual``) from the
                        last step that ran it: a skipped step costs only the embeddings and the output
                        head. Which steps to skip is fixed before the loop (MagCache's static schedule)
                        from the model folder's calibration: the measured relative change of the
                        residual from each step to the next (TeaCache's relative-L1 criterion, measured
                        offline). The changes of skipped steps add up; a step runs in full when the sum
                        would pass THRESHOLD (default 0.3), and never more than ``MAX_SKIP`` steps in a
                        row are skipped.
  cfg[:K]               Run the unconditional branch only every K steps (default 2); in between, the
                        conditional branch alone (B instead of 2B) with the guidance difference
                        D_c - D_u of the last step that ran both (FasterCache's idea, without its
                        frequency split).

The first 20% of the steps (``RETAIN``, at least 2; MagCache's retention ratio) and the last step
always run in full: early steps change the video most. The plan (one code per step: FULL,
COND_ONLY or REUSE, ``samplers``) is data to the compiled loop: one compilation serves every prompt,
threshold and K, and the loop shards over a mesh like the uncached one.

RepVideo's feature cache is a different thing: inside one transformer call it mixes each layer's input
with the mean of recent layers' outputs. A step cache works across sampling steps, on whole calls; a
reused residual already contains the feature cache's effect, and a computed step runs it as usual.

Calibration (``calibrate``) samples a few prompts without caching and stores, per sampler and step
count, the mean relative change of the residual between consecutive steps in ``<model>/step_cache.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from repvideo_jax.demo import demo_model_dir
from repvideo_jax.demo import domain as D
from repvideo_jax.outputs import atomic_write

FILE = "step_cache.json"
FORMAT = "repvideo-jax-step-cache"
METHODS = ("residual", "cfg")
DEFAULT_THRESHOLD = 0.3
DEFAULT_CFG_INTERVAL = 2
RETAIN = 0.2  # this share of the first steps (at least 2) always runs in full (MagCache's retention ratio)
MAX_SKIP = 3  # at most this many residual reuses in a row
FULL, COND_ONLY, REUSE = 0, 1, 2  # as samplers.FULL, COND_ONLY, REUSE


@dataclasses.dataclass(frozen=True)
class StepCache:
  """A parsed ``--step-cache`` setting: the residual threshold and the CFG interval (None = off)."""

  residual: float | None = None
  cfg: int | None = None

  def __str__(self) -> str:
    parts = []
    if self.residual is not None:
      parts.append(f"residual:{self.residual:g}")
    if self.cfg is not None:
      parts.append(f"cfg:{self.cfg}")
    return "+".join(parts) or "none"


def parse(text: str | None) -> StepCache | None:
  """``residual[:T]``, ``cfg[:K]`` or both joined by '+' (``none`` or None: no step cache). Raises
  ValueError naming the problem."""
  if text is None or text.strip().lower() in ("", "none", "off"):
    return None
  fields: dict[str, Any] = {}
  for part in text.split("+"):
    m = re.fullmatch(r"\s*([a-z]+)\s*(?::\s*([^:]+?)\s*)?", part)
    if not m or m.group(1) not in METHODS:
      raise ValueError(
        f"step cache {text!r}: expected residual[:THRESHOLD], cfg[:K] or both joined by '+' "
        f"(e.g. residual:0.3+cfg:2)"
      )
    method, value = m.group(1), m.group(2)
    if method in fields:
      raise ValueError(f"step cache {text!r} names {method} twice")
    if method == "residual":
      threshold = DEFAULT_THRESHOLD if value is None else _number(value, text)
      if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"step cache {text!r}: the residual threshold must be a number > 0")
      fields["residual"] = threshold
    else:
      k = DEFAULT_CFG_INTERVAL if value is None else _number(value, text)
      if k != int(k) or k < 2:
        raise ValueError(f"step cache {text!r}: the cfg interval K must be an integer >= 2")
      fields["cfg"] = int(k)
  return StepCache(**fields)


def _number(value: str, text: str) -> float:
  try:
    return float(value)
  except ValueError:
    raise ValueError(f"step cache {text!r}: {value!r} is not a number") from None


# ----------------------------------------------------------------------------------------------
# Plans.


def plan(
  cache: StepCache, num_steps: int, *, use_guidance: bool, changes: Sequence[float] | None = None
) -> np.ndarray:
  """The per-step codes (int32, (num_steps,)) of ``cache``. ``changes``: the calibrated relative
  residual change into each step (``calibration_for``), needed by the residual method."""
  n = num_steps
  codes = np.full(n, FULL, np.int32)
  always = np.zeros(n, bool)
  always[: warmup_steps(n)] = True
  always[-1] = True
  if cache.residual is not None:
    if changes is None:
      raise ValueError("the residual step cache needs the model's calibration (changes per step)")
    changes = np.asarray(changes, np.float64)
    if changes.shape != (n,):
      raise ValueError(f"calibrated changes cover {changes.shape[0]} steps, the sampler runs {n}")
    total, run = 0.0, 0
    for i in range(n):
      if not always[i] and run < MAX_SKIP and total + changes[i] <= cache.residual:
        codes[i], total, run = REUSE, total + changes[i], run + 1
      else:
        total, run = 0.0, 0
  if cache.cfg is not None and use_guidance:
    full_since = 0
    for i in range(n):
      if codes[i] == REUSE:
        continue
      if always[i] or full_since + 1 >= cache.cfg:
        full_since = 0  # this step runs both branches
      else:
        codes[i], full_since = COND_ONLY, full_since + 1
  return codes


def warmup_steps(num_steps: int) -> int:
  """How many first steps always run in full: ``RETAIN`` of them, at least 2."""
  return min(num_steps, max(2, round(RETAIN * num_steps)))


def transformer_calls(codes: np.ndarray, use_guidance: bool) -> float:
  """Transformer layer-stack work of a plan, in units of one B-batch call (2 per FULL step with
  guidance, 1 for COND_ONLY, 0 for REUSE)."""
  codes = np.asarray(codes)
  per_full = 2 if use_guidance else 1
  return float(per_full * np.sum(codes == FULL) + np.sum(codes == COND_ONLY))


# ----------------------------------------------------------------------------------------------
# Calibration files.


def calibration_key(sampler: str, steps: int) -> str:
  return f"{sampler}/{steps}"


def read_calibration(model_dir: str | pathlib.Path) -> dict[str, Any] | None:
  path = pathlib.Path(model_dir) / FILE
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); recalibrate with python -m repvideo_jax.step_cache calibrate"
    ) from None
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} file")
  return data


def calibration_for(model_dir: str | pathlib.Path, sampler: str, steps: int) -> np.ndarray:
  """The calibrated per-step changes of a model folder for (sampler, steps); a clear error naming the
  command when the folder has none."""
  command = (
    f"python -m repvideo_jax.step_cache calibrate --model {model_dir} --sampler {sampler} --steps {steps}"
  )
  data = read_calibration(model_dir)
  if data is None:
    raise FileNotFoundError(f"{model_dir} has no step-cache calibration ({FILE}); run `{command}`")
  entry = data.get("calibrations", {}).get(calibration_key(sampler, steps))
  if entry is None:
    have = sorted(data.get("calibrations", {}))
    raise FileNotFoundError(
      f"{model_dir}/{FILE} has no calibration for {sampler} at {steps} steps (it has {have}); run `{command}`"
    )
  return np.asarray(entry["changes"], np.float64)


def write_calibration(
  model_dir: str | pathlib.Path, sampler: str, steps: int, entry: dict[str, Any]
) -> pathlib.Path:
  path = pathlib.Path(model_dir) / FILE
  data = read_calibration(model_dir) or {"format": FORMAT, "version": 1, "calibrations": {}}
  data["calibrations"][calibration_key(sampler, steps)] = entry
  atomic_write(path, json.dumps(data, indent=1) + "\n")
  return path


# ----------------------------------------------------------------------------------------------
# Calibration.

# The default calibration prompts of a model folder other than the bundled demo model (which uses 6
# of its training captions); pass --prompts-file for a model trained on other text.
DEFAULT_PROMPTS = (
  "A panda, dressed in a small, red jacket and a tiny hat, sits on a wooden stool in a serene bamboo forest.",
  "A drone view of waves crashing against the rugged cliffs along Big Sur's coast.",
  "A golden retriever running through a field of sunflowers at sunset.",
  "A busy city street at night, neon signs reflecting on the wet pavement.",
  "An astronaut floating above the earth, slowly turning towards the camera.",
  "A red sports car driving along a winding mountain road, seen from above.",
)


def default_prompts(model_dir: pathlib.Path) -> list[str]:
  if pathlib.Path(model_dir).resolve() == demo_model_dir().resolve():
    train = D.split_specs()[0]
    return [D.caption(s) for s in train[:: len(train) // 6][:6]]
  return list(DEFAULT_PROMPTS)


def calibrate(pipe, prompts: Sequence[str], settings, *, batch_size: int = 4, progress: bool = True) -> dict:
  """Samples ``prompts`` with every step in full through the residual path and returns the
  calibration entry: the mean (over prompts) relative change of the residual into each step
  ("changes", step 0's is 0), with the settings and prompts used."""
  from repvideo_jax import pipeline  # noqa: PLC0415 (pipeline imports this module)

  if not prompts:
    raise ValueError("calibration needs at least one prompt")
  settings = dataclasses.replace(settings, step_cache=None)
  runs = []
  t0 = time.perf_counter()
  for start in range(0, len(prompts), batch_size):
    text = pipe.encode_prompts(list(prompts[start : start + batch_size]))
    _, changes = pipeline.sample_latents(pipe, text, settings, first_index=start, return_changes=True)
    runs.append(np.asarray(changes, np.float64))
    if progress:
      print(f"calibrate: {min(start + batch_size, len(prompts))}/{len(prompts)} prompts", file=sys.stderr)
  changes = np.mean(runs, axis=0)
  return {
    "changes": [float(c) for c in changes],
    "prompts": list(prompts),
    "guidance": settings.guidance,
    "cfg_schedule": settings.cfg_schedule,
    "frames": [settings.num_frames, settings.height, settings.width],
    "seed": settings.seed,
    "seconds": round(time.perf_counter() - t0, 1),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m repvideo_jax.step_cache",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True)
  cal = sub.add_parser(
    "calibrate", help="measure the residual's change per step; write <model>/step_cache.json"
  )
  cal.add_argument("--model", help="model folder (default: the bundled demo model)")
  cal.add_argument(
    "--prompts-file",
    help="one prompt per line (default: 6 built-in prompts; the demo model: 6 of its training captions)",
  )
  cal.add_argument("--steps", type=int, default=None, help="sampling steps (default: the folder's)")
  cal.add_argument("--sampler", choices=["dpmpp2m", "ddim"], default=None)
  cal.add_argument("--guidance", type=float, default=None)
  cal.add_argument("--num-frames", type=int, default=None)
  cal.add_argument("--height", type=int, default=None)
  cal.add_argument("--width", type=int, default=None)
  cal.add_argument("--batch-size", type=int, default=4)
  cal.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  from repvideo_jax import pipeline  # noqa: PLC0415 (pipeline imports this module)

  try:
    model = pathlib.Path(args.model) if args.model else demo_model_dir()
    prompts = default_prompts(model)
    if args.prompts_file:
      path = pathlib.Path(args.prompts_file)
      if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path} does not exist")
      prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    pipe = pipeline.load_pipeline(model)
    settings = pipeline.settings_for(
      pipe,
      steps=args.steps,
      sampler=args.sampler,
      guidance=args.guidance,
      num_frames=args.num_frames,
      height=args.height,
      width=args.width,
    )
    entry = calibrate(pipe, prompts, settings, batch_size=args.batch_size, progress=not args.no_progress)
    path = write_calibration(model, settings.sampler, settings.steps, entry)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  changes = np.asarray(entry["changes"])
  print(f"wrote {path}: {settings.sampler} at {settings.steps} steps, {len(prompts)} prompts")
  for threshold in (0.1, 0.2, 0.3, 0.5):
    codes = plan(
      StepCache(residual=threshold), settings.steps, use_guidance=settings.uses_guidance, changes=changes
    )
    print(f"  residual:{threshold:g} skips {int(np.sum(codes == REUSE))} of {settings.steps} steps")
  return 0


if __name__ == "__main__":
  sys.exit(main())
