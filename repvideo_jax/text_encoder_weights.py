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

import dataclasses
import json
import logging
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from repvideo_jax import checkpoint_io
from repvideo_jax.text_encoder import DTYPES, FEED_FORWARD, T5Config, abstract_params
from repvideo_jax.weights_common import (CheckpointKeyError, check_param_shapes, flatten,
                                         set_path)

log = logging.getLogger(__name__)

__all__ = ["CheckpointKeyError", "config_from_hf", "detect_format", "from_hf", "hf_rules", "load",
           "save"]

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
DECODER_PREFIXES = ("decoder.", "lm_head.")

# transformers' T5Config defaults: a config.json omits keys that equal them.
HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   layer_norm_epsilon=1e-6, feed_forward_proj="relu")


def _linear(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w).T)  # torch [out, in] -> [in, out]


def _same(w: np.ndarray) -> np.ndarray:
  return np.asarray(w)


def hf_rules(cfg: T5Config) -> list[tuple[str, tuple, int | None, Callable]]:
  """(HF key, our path, layer index or None, transform) for every param except the embedding."""
  rules = [
      ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
       ("relative_attention_bias",), None, _same),
      ("encoder.final_layer_norm.weight", ("final_norm", "scale"), None, _same),
  ]
  ffn = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
  for i in range(cfg.num_layers):
    pre = f"encoder.block.{i}.layer"
    rules.append((f"{pre}.0.layer_norm.weight", ("blocks", "attn_norm", "scale"), i, _same))
    for name in ("q", "k", "v", "o"):
      rules.append((f"{pre}.0.SelfAttention.{name}.weight", ("blocks", name, "kernel"), i, _linear))
    rules.append((f"{pre}.1.layer_norm.weight", ("blocks", "ffn_norm", "scale"), i, _same))
    for name in ffn:
      rules.append((f"{pre}.1.DenseReluDense.{name}.weight", ("blocks", name, "kernel"), i, _linear))
  return rules


def _list(keys: list[str], limit: int = 20) -> str:
  return f"({len(keys)}): {keys[:limit]}{' ...' if len(keys) > limit else ''}"


def from_hf(state: dict[str, np.ndarray], cfg: T5Config, *, ignore_decoder: bool = False
            ) -> dict[str, Any]:
  """HF T5 state dict (``T5EncoderModel``, or a full T5 with ``ignore_decoder=True``) -> our params.

  Tensors are converted one at a time into preallocated stacked arrays of ``cfg.param_dtype``, so
  peak memory is the output plus one tensor (the source may be a lazily paged memory map).
  """
  dtype = np.dtype(DTYPES[cfg.param_dtype])
  used: set[str] = set()
  if ignore_decoder:
    used |= {k for k in state if k.startswith(DECODER_PREFIXES)}
  missing: list[str] = []
  problems: list[str] = []
  embeds = [k for k in EMBED_KEYS if k in state]
  used |= set(embeds)
  if not embeds:
    missing.append(" or ".join(EMBED_KEYS))
  elif len(embeds) == 2 and not (state[embeds[0]].shape == state[embeds[1]].shape
                                 and np.array_equal(state[embeds[0]], state[embeds[1]])):
    problems.append(f"{EMBED_KEYS[0]} and {EMBED_KEYS[1]} are both present but differ (T5 ties them; "
                    "this checkpoint is inconsistent)")
  rules = hf_rules(cfg)
  for src, _, _, _ in rules:
    if src in state:
      used.add(src)
    else:
      missing.append(src)
  unknown = sorted(set(state) - used)
  if missing or unknown or problems:
    decoder = [k for k in unknown if k.startswith(DECODER_PREFIXES)]
    hint = ("\n  The unexpected keys include a T5 decoder: pass ignore_decoder=True to use only the "
            "encoder." if decoder else "")
    raise CheckpointKeyError(
        "T5 checkpoint keys do not match the config "
        f"(num_layers={cfg.num_layers}, feed_forward_proj={cfg.feed_forward_proj!r}):\n"
        f"  missing from checkpoint {_list(missing)}\n"
        f"  unexpected in checkpoint {_list(unknown)}"
        + "".join(f"\n  {p}" for p in problems) + hint +
        "\nCheck that the config matches the checkpoint (layers, feed-forward type).")
  target = dict(flatten(abstract_params(cfg)))
  out = {path: np.empty(leaf.shape, dtype) for path, leaf in target.items()}

  def put(src: str, path: tuple, layer: int | None, arr: np.ndarray) -> None:
    want = target[path].shape if layer is None else target[path].shape[1:]
    if tuple(arr.shape) != tuple(want):
      raise CheckpointKeyError(f"shape mismatch for {src} -> {'.'.join(path)}: checkpoint gives "
                               f"{tuple(arr.shape)}, config expects {tuple(want)}")
    if layer is None:
      out[path][...] = arr
    else:
      out[path][layer] = arr

  put(embeds[0], ("embedding",), None, np.asarray(state[embeds[0]]))
  for src, path, layer, fn in rules:
    put(src, path, layer, fn(state[src]))
  params: dict[str, Any] = {}
  for path, arr in out.items():
    set_path(params, path, arr)
  return params


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
    raise ValueError(f"unsupported T5 feed_forward_proj={fields['feed_forward_proj']!r}; supported: "
                     f"{FEED_FORWARD}")
  fields["layer_norm_epsilon"] = float(fields["layer_norm_epsilon"])
  fields.update(overrides)
  return T5Config(**fields)


# ----------------------------------------------------------------------------------------------
# Loading from disk: a HF text_encoder/ folder, or our converted (orbax) folder.


def detect_format(path: str | pathlib.Path) -> str:
  """'ours' or 'hf' for a folder; raises FileNotFoundError with what was found."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no text encoder checkpoint at {path}")
  if not path.is_dir():
    raise ValueError(f"{path}: pass the folder holding config.json and the safetensors (a HF "
                     "text_encoder/ folder), or a folder converted by repvideo_jax")
  if (path / "metadata.json").exists() and (path / "params").exists():
    return "ours"
  if (path / "text_encoder").is_dir() and not (path / "config.json").exists():
    return detect_format(path / "text_encoder")
  if (path / "config.json").exists():
    return "hf"
  raise FileNotFoundError(
      f"{path} is not a T5 text encoder checkpoint: expected config.json + safetensors (a HF "
      f"text_encoder/ folder, possibly sharded with an index), a pipeline folder with text_encoder/, "
      f"or a converted folder (metadata.json + params/); found {sorted(p.name for p in path.iterdir())[:20]}")


def _hf_folder(path: pathlib.Path) -> pathlib.Path:
  if (path / "text_encoder").is_dir() and not (path / "config.json").exists():
    return path / "text_encoder"
  return path


def save(path: str | pathlib.Path, config: T5Config, params: dict[str, Any], *,
         source: str | None = None, overwrite: bool = False) -> None:
  """Writes our converted format: orbax params plus ``metadata.json`` with the config and source."""
  from repvideo_jax.config import to_dict
  checkpoint_io.save_params(path, params, overwrite=overwrite, metadata={
      "component": "text_encoder", "config": to_dict(config), "source": source})


def load(path: str | pathlib.Path, config: T5Config | None = None, *, verify: bool = True,
         **config_overrides) -> tuple[T5Config, dict[str, Any]]:
  """Loads T5 encoder weights from a HF folder or our converted folder. Returns (config, params).

  ``config`` defaults to the one in ``config.json`` (HF) or stored with the weights (ours);
  ``config_overrides`` replace fields (e.g. ``dtype='bfloat16', param_dtype='bfloat16'``). Decoder
  weights in a full T5 checkpoint are skipped (logged at INFO).
  """
  path = pathlib.Path(path)
  fmt = detect_format(path)
  if fmt == "ours":
    params, meta = checkpoint_io.load_params(path, verify=verify)
    if meta.get("component") != "text_encoder":
      raise ValueError(f"{path} holds a converted {meta.get('component')!r}, not a text_encoder")
    from repvideo_jax.config import from_dict
    stored = from_dict(T5Config, meta["config"], where=f"{path}/metadata.json")
    cfg = config or dataclasses.replace(stored, **config_overrides)
    check_param_shapes(params, abstract_params(cfg), "T5")
    dtype = np.dtype(DTYPES[cfg.param_dtype])
    return cfg, jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
  folder = _hf_folder(path)
  with open(folder / "config.json") as f:
    cfg_json = json.load(f)
  cfg = config or config_from_hf(cfg_json, **config_overrides)
  state = checkpoint_io.read_safetensors_folder(folder)
  decoder = sorted(k for k in state if k.startswith(DECODER_PREFIXES))
  if decoder:
    log.info("%s: ignoring %d T5 decoder tensors (%s ...); only the encoder is used", folder,
             len(decoder), decoder[0])
  return cfg, from_hf(state, cfg, ignore_decoder=True)
