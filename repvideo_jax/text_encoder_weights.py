"""Weight names and layouts for the T5 encoder: Hugging Face T5 state dicts -> our param tree.

HF names (``T5EncoderModel``; a full ``T5ForConditionalGeneration`` adds ``decoder.*`` and ``lm_head``):
  shared.weight / encoder.embed_tokens.weight                       -> embedding        (tied; either)
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight -> relative_attention_bias
  encoder.block.{i}.layer.0.layer_norm.weight                       -> blocks.attn_norm.scale[i]
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight          -> blocks.{q,k,v,o}.kernel[i]
  encoder.block.{i}.layer.1.layer_norm.weight                       -> blocks.ffn_norm.scale[i]
  encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight    -> blocks.{wi_0,wi_1,wo}.kernel[i]
                                                  ({wi,wo} for feed_forward_proj="relu")
  encoder.final_layer_norm.weight                                   -> final_norm.scale
Linear weights are transposed (PyTorch [out, in] -> [in, out]); nothing else changes layout.

Every source key is accounted for: a key that maps nowhere, or a param that no key fills, raises a
``CheckpointKeyError`` listing them. Decoder keys count as unexpected unless ``ignore_decoder=True``
(which ``load`` passes for a folder, logging what it skipped).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import numpy as np

from repvideo_jax import checkpoint_io
from repvideo_jax import weights_common as common
from repvideo_jax.text_encoder import DTYPES, FEED_FORWARD, T5Config, abstract_params
from repvideo_jax.weights_common import CheckpointKeyError, Rule
from repvideo_jax.weights_common import linear_kernel as _linear

log = logging.getLogger(__name__)

__all__ = ["CheckpointKeyError", "config_from_hf", "detect_format", "from_hf", "hf_rules", "load", "save"]

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
DECODER_PREFIXES = ("decoder.", "lm_head.")

# transformers' T5Config defaults: a config.json omits keys that equal them.
HF_DEFAULTS = dict(
  vocab_size=32128,
  d_model=512,
  d_kv=64,
  d_ff=2048,
  num_layers=6,
  num_heads=8,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  layer_norm_epsilon=1e-6,
  feed_forward_proj="relu",
)


def hf_rules(cfg: T5Config) -> list[Rule]:
  """The rules for every tensor of a HF T5 encoder (the embedding under either tied name)."""
  rules = [
    Rule(EMBED_KEYS, ("embedding",)),
    Rule(
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("relative_attention_bias",)
    ),
    Rule("encoder.final_layer_norm.weight", ("final_norm", "scale")),
  ]
  ffn = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
  for i in range(cfg.num_layers):
    pre = f"encoder.block.{i}.layer"
    rules.append(Rule(f"{pre}.0.layer_norm.weight", ("blocks", "attn_norm", "scale"), layer=i))
    for name in ("q", "k", "v", "o"):
      rules.append(Rule(f"{pre}.0.SelfAttention.{name}.weight", ("blocks", name, "kernel"), _linear, i))
    rules.append(Rule(f"{pre}.1.layer_norm.weight", ("blocks", "ffn_norm", "scale"), layer=i))
    for name in ffn:
      rules.append(Rule(f"{pre}.1.DenseReluDense.{name}.weight", ("blocks", name, "kernel"), _linear, i))
  return rules


def from_hf(state: dict[str, np.ndarray], cfg: T5Config, *, ignore_decoder: bool = False) -> dict[str, Any]:
  """HF T5 state dict (``T5EncoderModel``, or a full T5 with ``ignore_decoder=True``) -> our params.

  Tensors are converted one at a time into preallocated stacked arrays of ``cfg.param_dtype``, so
  peak memory is the output plus one tensor (the source may be a lazily paged memory map).
  """
  return common.convert(
    state,
    hf_rules(cfg),
    abstract_params(cfg),
    dtype=DTYPES[cfg.param_dtype],
    what="T5",
    config_note=f"num_layers={cfg.num_layers}, feed_forward_proj={cfg.feed_forward_proj!r}",
    ignore=DECODER_PREFIXES if ignore_decoder else (),
    hints=[
      (
        DECODER_PREFIXES,
        "The unexpected keys include a T5 decoder: pass ignore_decoder=True to use only the encoder.",
      )
    ],
    advice="Check that the config matches the checkpoint (layers, feed-forward type).",
  )


# ----------------------------------------------------------------------------------------------
# Config from a HF config.json.


def config_from_hf(cfg_json: dict[str, Any], **overrides) -> T5Config:
  """HF T5 ``config.json`` dict -> T5Config (missing keys take transformers' T5Config defaults)."""
  if cfg_json.get("model_type", "t5") not in ("t5", "umt5", "mt5"):
    raise ValueError(f"not a T5 config: model_type={cfg_json.get('model_type')!r}")
  if cfg_json.get("model_type") == "umt5":
    raise ValueError("umT5 has a relative position bias in every layer; only T5 / T5 v1.1 is supported")
  if cfg_json.get("is_decoder"):
    raise ValueError("this config describes a T5 decoder (is_decoder=true); an encoder is needed")
  fields = {k: cfg_json.get(k, v) for k, v in HF_DEFAULTS.items()}
  if fields["feed_forward_proj"] not in FEED_FORWARD:
    raise ValueError(
      f"unsupported T5 feed_forward_proj={fields['feed_forward_proj']!r}; supported: {FEED_FORWARD}"
    )
  fields["layer_norm_epsilon"] = float(fields["layer_norm_epsilon"])
  fields.update(overrides)
  return T5Config(**fields)


# ----------------------------------------------------------------------------------------------
# Loading from disk: a HF text_encoder/ folder, or our converted (orbax) folder.


COMPONENT = common.Component(
  name="text_encoder",
  label="T5 text encoder",
  config_cls=T5Config,
  abstract=abstract_params,
  markers=(("config.json", "hf"),),
  expected="config.json + safetensors (a HF text_encoder/ folder, possibly sharded with an index), "
  "a pipeline folder with text_encoder/, or a converted folder (metadata.json + params/)",
  file_error="pass the folder holding config.json and the safetensors (a HF text_encoder/ folder), or "
  "a folder converted by repvideo_jax",
)


def detect_format(path: str | pathlib.Path) -> str:
  """'ours' or 'hf' for a folder; raises FileNotFoundError with what was found."""
  return common.detect_format(path, COMPONENT)


def save(
  path: str | pathlib.Path,
  config: T5Config,
  params: dict[str, Any],
  *,
  source: str | None = None,
  overwrite: bool = False,
) -> None:
  """Writes our converted format: orbax params plus ``metadata.json`` with the config and source."""
  common.save_converted(path, COMPONENT, config, params, source=source, overwrite=overwrite)


def load(
  path: str | pathlib.Path, config: T5Config | None = None, *, verify: bool = True, **config_overrides
) -> tuple[T5Config, dict[str, Any]]:
  """Loads T5 encoder weights from a HF folder or our converted folder. Returns (config, params).

  ``config`` defaults to the one in ``config.json`` (HF) or stored with the weights (ours);
  ``config_overrides`` replace fields (e.g. ``dtype='bfloat16', param_dtype='bfloat16'``). Decoder
  weights in a full T5 checkpoint are skipped (logged at INFO).
  """
  fmt, folder = common.locate(path, COMPONENT)
  if fmt == "ours":
    return common.load_converted(folder, COMPONENT, config, overrides=config_overrides, verify=verify)
  cfg = config or config_from_hf(json.loads((folder / "config.json").read_text()), **config_overrides)
  state = checkpoint_io.read_safetensors_folder(folder)
  decoder = sorted(k for k in state if k.startswith(DECODER_PREFIXES))
  if decoder:
    log.info(
      "%s: ignoring %d T5 decoder tensors (%s ...); only the encoder is used",
      folder,
      len(decoder),
      decoder[0],
    )
  return cfg, from_hf(state, cfg, ignore_decoder=True)
