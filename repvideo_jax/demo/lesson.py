"""Teach the demo model a colour it has never seen with a LoRA, and measure what it learned and kept.

    python -m repvideo_jax.demo.lesson                      # configs/demo-lora-orange.yaml -> runs/lesson
    python -m repvideo_jax.demo.lesson --out runs/lesson2 train.lora.rank=8 train.run.steps=300
    python sample.py --lora runs/lesson/lora --prompt "an orange square moving up on a black background"

Stages, each in its own folder under ``--out`` and skipped when complete (a killed lesson resumes; the
LoRA run continues from its last checkpoint):
  data      rendered clips (``demo.write_dataset``): ``concept.per_spec`` of each combination of the new
            colour that is not held out, and as many of ``concept.prior_specs`` combinations of the base
            model's own training split, so that it keeps what it knew (prior preservation)
  records   ``data.prepare`` of those clips with the base model's VAE and T5
  run       ``trainer.train`` on the recipe's ``train`` section: ``optim.train: lora`` on the base
            model (``run.init_from``), whose weights stay frozen
  lora      ``trainer.export_lora``: the LoRA alone, for ``sample.py --lora``
  eval      the base model and the base model + LoRA (unmerged, scale 1) on the same prompts, seeds and
            noise: the new colour on its held-out (shape, motion) combinations, and the base model's
            held-out captions (``evaluate.evaluate``, detectors choosing from the base palette plus the
            new colour); and the v-prediction loss of both on the lesson's clips at fixed timesteps and
            noise. Written to ``eval/results.json`` and, with the rest, ``lesson.json``; the table is
            printed.

The base model's tokenizer has no word for the new colour: the caption reaches the transformer with an
unknown token where the colour goes, and the LoRA (attention projections only; the text encoder is
untouched) learns what that asks for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from repvideo_jax import config as config_lib
from repvideo_jax import evaluate, outputs, pipeline, schedule
from repvideo_jax import transformer as T
from repvideo_jax.data import prepare
from repvideo_jax.data.records import ExampleSource
from repvideo_jax.demo import build, demo_model_dir
from repvideo_jax.demo import domain as D
from repvideo_jax.training import objective, trainer

SECTIONS = ("concept", "train", "evaluation")


@dataclasses.dataclass(frozen=True)
class ConceptConfig:
  color: str = "orange"
  heldout: int = 6  # combinations (SHAPES[i % 3], MOTIONS[i]), i < heldout, kept for evaluation
  per_spec: int = 4
  prior_specs: int = 12
  seed: int = 7

  def __post_init__(self):
    if self.color not in D.NEW_PALETTE:
      raise ValueError(
        f"concept.color must be a colour the base model never saw, one of {list(D.NEW_PALETTE)}; "
        f"got {self.color!r}"
      )
    if not 0 < self.heldout <= len(D.MOTIONS):
      raise ValueError(f"concept.heldout must be in 1..{len(D.MOTIONS)}, got {self.heldout}")
    if self.per_spec < 1 or self.prior_specs < 0:
      raise ValueError(f"concept.per_spec must be >= 1 and prior_specs >= 0, got {self}")

  def specs(self, base_train: list[D.Spec]) -> tuple[list[D.Spec], list[D.Spec], list[D.Spec]]:
    """(new colour, trained), (new colour, held out), (base train-split combinations mixed in)."""
    held = [D.Spec(D.SHAPES[i % len(D.SHAPES)], self.color, D.MOTIONS[i]) for i in range(self.heldout)]
    new = [s for s in D.all_specs() if s.color == D.COLORS[0]]  # every (shape, motion) once
    new = [D.Spec(s.shape, self.color, s.motion) for s in new]
    trained = [s for s in new if s not in held]
    order = np.random.default_rng(self.seed).permutation(len(base_train))
    prior = [base_train[i] for i in sorted(order[: self.prior_specs])]
    return trained, held, prior


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  seeds: int = 4  # 0: no generation, only the fixed-noise loss
  batch_size: int = 8


def load_recipe(name_or_path: str = "demo-lora-orange", overrides=()) -> dict[str, Any]:
  tree = config_lib.load_yaml(name_or_path, overrides)
  unknown = sorted(set(tree) - set(SECTIONS))
  if unknown:
    raise ValueError(f"{name_or_path}: unknown section(s) {unknown}; a lesson has {list(SECTIONS)}")
  tree = {k: tree.get(k) or {} for k in SECTIONS}
  for name in ("transformer", "data"):
    if name in tree["train"]:
      raise ValueError(f"{name_or_path}: train.{name} comes from the base model and its clips; remove it")
  config_lib.from_dict(ConceptConfig, tree["concept"], f"{name_or_path}:concept")
  config_lib.from_dict(EvalConfig, tree["evaluation"], f"{name_or_path}:evaluation")
  return tree


def _say(msg: str) -> None:
  print(f"[demo.lesson] {msg}", file=sys.stderr, flush=True)


def lesson(
  recipe: dict[str, Any], out: str | pathlib.Path, *, model: str | pathlib.Path | None = None, progress=True
) -> dict[str, Any]:
  """Runs (or resumes) every stage (module docstring); returns the ``lesson.json`` dict."""
  out = pathlib.Path(out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  model = pathlib.Path(model or demo_model_dir()).absolute()
  concept = config_lib.from_dict(ConceptConfig, recipe["concept"], "concept")
  ev = config_lib.from_dict(EvalConfig, recipe["evaluation"], "evaluation")
  base = pipeline.load_pipeline(model)
  sizes = {k: v for k, v in pipeline.model_defaults(base).items() if k in ("num_frames", "height", "width")}
  fps = pipeline.model_defaults(base).get("fps", 8.0)
  base_train, base_heldout = D.split_specs()
  trained, held, prior = concept.specs(base_train)

  # data
  stage = build.Stage(out, "data", {"concept": recipe["concept"], "sizes": sizes})
  if not stage.done:
    _say(
      f"data: {concept.per_spec} clips of {len(trained)} {concept.color} and {len(prior)} base combinations"
    )
    D.write_dataset(
      stage.path, trained + prior, per_spec=concept.per_spec, fps=fps, seed=concept.seed, **sizes
    )
    stage.finish(captions=sorted({D.caption(s) for s in trained + prior}))
  data_dir = stage.path

  # records
  stage = build.Stage(out, "records", {"data": stage.config, "model": str(model)})
  if not stage.done:
    _say("records: encoding the clips with the base model's VAE and T5 (data.prepare)")
    prep = prepare.PrepareConfig(
      frames=sizes["num_frames"], height=sizes["height"], width=sizes["width"], fps=fps, batch_size=8
    )
    prepare.prepare(
      data_dir, data_dir / "captions.csv", model, stage.path, prep, progress=progress, verbose=False
    )
    stage.finish()
  records = stage.path

  # run
  tree = json.loads(json.dumps(recipe["train"]))
  tree["transformer"] = config_lib.to_dict(base.transformer_config)
  tree["data"] = {"records": str(records), "frames": sizes["num_frames"], "fps": fps}
  tree["data"].update(height=sizes["height"], width=sizes["width"])
  tree.setdefault("run", {}).update(output_dir=str(out / "run"), init_from=str(model))
  cfg = trainer.config_from_dict(tree, "lesson:train")
  if not cfg.trains_lora:
    raise ValueError(f"a lesson trains a LoRA: set train.optim.train=lora, not {cfg.optim.train!r}")
  train_yaml = out / "train.yaml"
  previous = yaml.safe_load(train_yaml.read_text()) if train_yaml.exists() else None
  if previous is not None and previous != tree and (out / "run").exists():
    raise ValueError(f"{out} holds a LoRA run with a different train config; use a new --out")
  outputs.atomic_write(train_yaml, yaml.safe_dump(tree, sort_keys=False))
  done = build.finished_step(out / "run")
  if done is None or done < cfg.run.steps:
    _say(f"run: LoRA rank {cfg.lora.rank} on {cfg.lora.targets}, {cfg.run.steps} steps from {done or 0}")
    with build.train_log(out / "train.log", echo=progress):
      result = trainer.train(cfg, resume=True)
    if result["final_step"] < cfg.run.steps:
      raise RuntimeError(
        f"the LoRA run stopped at step {result['final_step']}; run the lesson again to resume"
      )

  # lora
  lora_dir = out / "lora"
  if not (lora_dir / "adapter.json").is_file():
    trainer.export_lora(out / "run", lora_dir, overwrite=True)
  _say(f"LoRA: {lora_dir}")

  # eval
  adapted = pipeline.load_pipeline(model, loras=[(lora_dir, 1.0)])
  report = {
    "recipe": recipe,
    "model": str(model),
    "lora": str(lora_dir),
    "concept": {"color": concept.color, "trained": [D.caption(s) for s in trained]},
  }
  stage = build.Stage(out, "eval", {"evaluation": recipe["evaluation"], "train": tree})
  if stage.done:
    report.update(json.loads((stage.path / "results.json").read_text()))
  else:
    results = {"loss": fixed_noise_loss(base, adapted, records, concept.color)}
    if ev.seeds:
      palette = {**D.PALETTE, concept.color: D.NEW_PALETTE[concept.color]}
      settings = pipeline.settings_for(base)
      for name, specs in (("new_heldout", held), ("base_heldout", base_heldout)):
        for label, pipe in (("base", base), ("lora", adapted)):
          _say(f"eval: {label} on {len(specs)} {name} captions x {ev.seeds} seeds")
          results.setdefault(name, {})[label] = evaluate.evaluate(
            pipe,
            specs,
            settings=settings,
            seeds=ev.seeds,
            batch_size=ev.batch_size,
            features=False,
            progress=progress,
            palette=palette,
          )
      results["kept"] = kept(results["base_heldout"])
    outputs.atomic_write(stage.path / "results.json", json.dumps(results, indent=1))
    stage.finish()
    report.update(results)
  outputs.atomic_write(out / "lesson.json", json.dumps(report, indent=1))
  return report


def fixed_noise_loss(base, adapted, records: pathlib.Path, color: str, timesteps: int = 8) -> dict[str, Any]:
  """The v-prediction MSE of the base model and of base + LoRA on the lesson's clips, each clip at
  ``timesteps`` evenly spaced timesteps with noise fixed by its index: {"new"|"prior": {"base", "lora"}}."""
  source = ExampleSource(records)
  examples = [source[i] for i in range(len(source))]
  table = jnp.asarray(schedule.sqrt_alpha_table(), jnp.float32)
  ts = jnp.linspace(50, 950, timesteps).astype(jnp.int32)
  cfg = base.transformer_config

  @jax.jit
  def loss(params, loras, latents, text, key):
    x = jnp.repeat(latents[None], timesteps, axis=0)
    c = jnp.repeat(text[None], timesteps, axis=0)
    noise = jax.random.normal(key, x.shape)

    def apply_fn(p, x_t, t, c):
      return T.apply(p, x_t, t, c, config=cfg, lora=loras)

    return objective.v_mse(params, apply_fn, x, c, ts, noise, table=table)[0]

  loras = [(tree, jnp.float32(scale)) for tree, scale in adapted.transformer_loras]
  sums: dict[str, dict[str, list[float]]] = {
    "new": {"base": [], "lora": []},
    "prior": {"base": [], "lora": []},
  }
  for i, ex in enumerate(examples):
    group = "new" if f" {color} " in f" {ex['caption']} " else "prior"
    latents, text = jnp.asarray(ex["latents"], jnp.float32), jnp.asarray(ex["text_emb"], jnp.float32)
    key = jax.random.key(i)
    sums[group]["base"].append(float(loss(base.transformer_params, None, latents, text, key)))
    sums[group]["lora"].append(float(loss(adapted.transformer_params, loras, latents, text, key)))
  return {g: {k: float(np.mean(v)) for k, v in d.items()} for g, d in sums.items() if d["base"]}


def _se(p: float, n: int) -> float:
  return float(np.sqrt(p * (1 - p) / n))


def kept(results: dict[str, Any]) -> dict[str, Any]:
  """Per attribute of the base held-out captions: base and LoRA accuracy, the standard error of the
  base's (binomial, over its videos) and whether the LoRA's is within one standard error of it."""
  n = results["base"]["num_videos"]
  out = {}
  for key in ("color", "shape", "motion", "all"):
    b, a = results["base"]["accuracy"][key], results["lora"]["accuracy"][key]
    out[key] = {"base": b, "lora": a, "se": _se(b, n), "within_one_se": bool(abs(a - b) <= _se(b, n) + 1e-12)}
  return out


def format_table(report: dict[str, Any]) -> str:
  """The lesson's result as a Markdown table (the README's)."""
  color = report["concept"]["color"]
  loss = report["loss"]
  lines = [
    "| | base model | + LoRA | chance |",
    "|---|---|---|---|",
    f"| v-loss, fixed noise, {color} training clips | {loss['new']['base']:.4f} | {loss['new']['lora']:.4f} | |",
  ]
  if "prior" in loss:
    lines.append(
      f"| v-loss, fixed noise, base training clips | {loss['prior']['base']:.4f} | {loss['prior']['lora']:.4f} | |"
    )
  if "new_heldout" in report:
    new = report["new_heldout"]
    n = new["base"]["num_videos"]
    colors = len(D.PALETTE) + 1  # the detector chooses from the base palette plus the new colour
    chance = {"color": 1 / colors, "shape": 1 / len(D.SHAPES), "motion": 1 / len(D.MOTIONS)}
    chance["all"] = chance["color"] * chance["shape"] * chance["motion"]
    for key, label in (
      ("color", f"colour read as {color}"),
      ("shape", "shape"),
      ("motion", "motion"),
      ("all", "all three"),
    ):
      b, a = new["base"]["accuracy"][key], new["lora"]["accuracy"][key]
      lines.append(
        f"| held-out {color} combinations ({n} videos): {label} | {b:.2f} | **{a:.2f}** | {chance[key]:.3f} |"
      )
    n = report["base_heldout"]["base"]["num_videos"]
    for key, k in report["kept"].items():
      name = "all three" if key == "all" else key
      lines.append(
        f"| base held-out captions ({n} videos): {name} | {k['base']:.2f} ± {k['se']:.2f} | "
        f"{k['lora']:.2f} ({k['lora'] - k['base']:+.2f}) | |"
      )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m repvideo_jax.demo.lesson",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--config", default="demo-lora-orange", help="lesson recipe in configs/ or a YAML file")
  parser.add_argument("--out", default="runs/lesson", help="lesson folder (default runs/lesson)")
  parser.add_argument("--model", help="the base model folder (default: the bundled demo model)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args(argv)
  try:
    recipe = load_recipe(args.config, args.overrides)
    report = lesson(recipe, args.out, model=args.model, progress=not args.no_progress)
  except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(report))
  print(f"wrote {pathlib.Path(args.out) / 'lesson.json'}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from repvideo_jax import host_memory  # noqa: PLC0415

  host_memory.setup_cli()  # before JAX starts: see repvideo_jax/host_memory.py
  sys.exit(main())
