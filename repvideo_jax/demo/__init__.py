"""Procedural captioned-video demo domain (coloured shapes moving on a black background)."""

from repvideo_jax.demo.domain import (  # noqa: F401
  COLORS, MOTIONS, SHAPES, Spec, all_specs, caption, detect, render, score, split_specs,
  write_dataset)
