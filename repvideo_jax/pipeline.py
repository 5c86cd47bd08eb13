"""A whole model folder in one call: transformer, T5 text encoder, VAE and tokenizer.

``load_pipeline(path)`` accepts a folder written by ``python -m repvideo_jax.convert pipeline``
(``pipeline.json`` + one converted folder per component) or, directly, a diffusers-layout CogVideoX
folder (``transformer/ vae/ text_encoder/ tokenizer/``), which is converted in memory on each load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

from repvideo_jax import text_encoder as TE
from repvideo_jax import text_encoder_weights, transformer_weights, vae_weights
from repvideo_jax.text_encoder import T5Config
from repvideo_jax.transformer import TransformerConfig
from repvideo_jax.vae import VAEConfig

log = logging.getLogger(__name__)
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")


@dataclasses.dataclass
class Pipeline:
  """Configs, params (plain nested dicts) and the tokenizer of one model."""
  transformer_config: TransformerConfig
  transformer_params: dict[str, Any]
  text_encoder_config: T5Config
  text_encoder_params: dict[str, Any]
  vae_config: VAEConfig
  vae_params: dict[str, Any]
  tokenizer: Any
  path: pathlib.Path
  manifest: dict[str, Any] = dataclasses.field(default_factory=dict)

  def encode_prompts(self, prompts, use_mask: bool = False):
    """Prompts -> T5 embeddings (B, text_length, d_model), as released (no mask, pads kept)."""
    return TE.encode_prompts(self.text_encoder_params, self.text_encoder_config, self.tokenizer,
                             prompts, use_mask=use_mask, max_length=self.transformer_config.text_length)


def load_pipeline(path: str | pathlib.Path, *, transformer_overrides: dict | None = None,
                  text_encoder_overrides: dict | None = None,
                  vae_overrides: dict | None = None) -> Pipeline:
  """Loads every component of a model folder; overrides replace config fields (e.g. dtype)."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"no model folder at {path}: convert one with "
                            "`python -m repvideo_jax.convert pipeline --src COGVIDEOX_DIR --dst DIR`")
  missing = [c for c in COMPONENTS if not (path / c).is_dir()]
  if missing:
    raise FileNotFoundError(f"{path} is not a model folder: missing {missing} (found "
                            f"{sorted(p.name for p in path.iterdir())})")
  manifest = {}
  if (path / "pipeline.json").exists():
    manifest = json.loads((path / "pipeline.json").read_text())
  else:
    log.info("%s has no pipeline.json: loading the diffusers layout directly (convert it once with "
             "`python -m repvideo_jax.convert pipeline` for faster loads)", path)
  t_cfg, t_params = transformer_weights.load(path / "transformer", **(transformer_overrides or {}))
  e_cfg, e_params = text_encoder_weights.load(path / "text_encoder", **(text_encoder_overrides or {}))
  v_cfg, v_params = vae_weights.load(path / "vae", **(vae_overrides or {}))
  if e_cfg.d_model != t_cfg.text_embed_dim:
    raise ValueError(f"text encoder width {e_cfg.d_model} != transformer text_embed_dim "
                     f"{t_cfg.text_embed_dim}: the components come from different models")
  if v_cfg.latent_channels != t_cfg.in_channels:
    raise ValueError(f"VAE latent channels {v_cfg.latent_channels} != transformer in_channels "
                     f"{t_cfg.in_channels}: the components come from different models")
  tokenizer = TE.load_tokenizer(path / "tokenizer")
  return Pipeline(t_cfg, t_params, e_cfg, e_params, v_cfg, v_params, tokenizer, path, manifest)
