"""The demo: a procedural captioned-video domain, and the tiny model trained on it that ships with the
package (``demo_model_dir()``; the default model of ``sample.py``, ``evaluate`` and ``analysis``).

Rebuild the bundled model with ``python -m repvideo_jax.demo.build`` (recipe: ``configs/demo.yaml``);
teach it a new colour with a LoRA with ``python -m repvideo_jax.demo.lesson``.
"""

import pathlib

from repvideo_jax.demo.domain import (  # noqa: F401
  COLORS,
  MOTIONS,
  SHAPES,
  Spec,
  all_specs,
  caption,
  detect,
  parse_caption,
  render,
  score,
  split_specs,
  write_dataset,
)

MODEL_DIR = pathlib.Path(__file__).resolve().parent / "model"


def demo_model_dir() -> pathlib.Path:
  """The bundled demo model folder (a pipeline folder: transformer, T5, VAE, tokenizer)."""
  if not (MODEL_DIR / "pipeline.json").is_file():
    raise FileNotFoundError(
      f"the bundled demo model is missing ({MODEL_DIR} has no pipeline.json): reinstall the package, "
      "or rebuild it with `python -m repvideo_jax.demo.build --install`"
    )
  return MODEL_DIR
