"""Weight names and layouts for the transformer: diffusers and SAT state dicts -> our param tree.

Every source key is accounted for: a key that maps nowhere, or a param that no key fills, raises a
``CheckpointKeyError`` listing them. Layout changes (PyTorch [out, in] -> [in, out], conv OIHW ->
HWIO, channel-major output features -> channels-last) happen here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from repvideo_jax import checkpoint_io
from repvideo_jax import weights_common as common
from repvideo_jax.transformer import DTYPES, TransformerConfig, abstract_params
from repvideo_jax.weights_common import CheckpointKeyError, Rule, same
from repvideo_jax.weights_common import linear_kernel as _linear

log = logging.getLogger(__name__)

SAT_PREFIX = "model.diffusion_model."
SAT_IGNORED = ("mixins.pos_embed.pos_embedding",)  # frozen sin-cos table: regenerated, never loaded


# ----------------------------------------------------------------------------------------------
# Layout helpers.


def _conv_patch(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]


def _out_features(x: np.ndarray, cfg: TransformerConfig) -> np.ndarray:
  """Reorders the last axis of proj_out from torch's (c, py, px) to our (py, px, c)."""
  p, c = cfg.patch_size, cfg.out_channels
  y = x.reshape(*x.shape[:-1], c, p, p)
  return np.ascontiguousarray(np.moveaxis(y, -3, -1)).reshape(x.shape)


def _leaf_rules(prefix_src: str, path: tuple, kind: str, layer: int | None = None) -> list[Rule]:
  """The weight and bias rules of one module: 'linear' or 'norm'."""
  weight = (path + ("kernel",), _linear) if kind == "linear" else (path + ("scale",), same)
  return [
    Rule(f"{prefix_src}.weight", *weight, layer=layer),
    Rule(f"{prefix_src}.bias", path + ("bias",), layer=layer),
  ]


# ----------------------------------------------------------------------------------------------
# Rule tables, one per source format. Block params are stacked layers-first: their rules carry the
# layer index.


def _initial_gates(cfg: TransformerConfig, allow_missing: bool, where: str) -> np.ndarray:
  """The RepVideo gates for a checkpoint without them (every CogVideoX one): ``gate_init`` with a
  warning, or an error when ``allow_missing`` is off. One rule for every format."""
  if not allow_missing:
    raise CheckpointKeyError(
      f"{where} has no RepVideo gates but the config has feature_cache=True; pass "
      f"allow_missing_gates=True to start them at {cfg.gate_init}, or use a config with feature_cache=False"
    )
  log.warning(
    "%s has no RepVideo gates: initialising all %d gates to %s (the feature cache is not an identity "
    "at this value; fine-tune before sampling)",
    where,
    cfg.num_layers,
    cfg.gate_init,
  )
  return np.full((cfg.num_layers,), cfg.gate_init, np.float32)


def _gates_rule(src: str, cfg: TransformerConfig, allow_missing: bool, transform=same) -> Rule:
  """The RepVideo gates: absent from CogVideoX checkpoints, then started at ``gate_init``."""
  return Rule(
    src, ("gates",), transform, fallback=lambda: _initial_gates(cfg, allow_missing, f"checkpoint ({src})")
  )


def diffusers_rules(cfg: TransformerConfig, *, allow_missing_gates: bool = True) -> list[Rule]:
  """The rules for a diffusers ``CogVideoXTransformer3DModel`` state dict."""
  rules = [
    Rule("patch_embed.proj.weight", ("patch_kernel",), _conv_patch),
    Rule("patch_embed.proj.bias", ("patch_bias",)),
    *_leaf_rules("patch_embed.text_proj", ("text_proj",), "linear"),
    *_leaf_rules("time_embedding.linear_1", ("time_linear_1",), "linear"),
    *_leaf_rules("time_embedding.linear_2", ("time_linear_2",), "linear"),
    *_leaf_rules("norm_final", ("norm_final",), "norm"),
    *_leaf_rules("norm_out.norm", ("norm_out",), "norm"),
    *_leaf_rules("norm_out.linear", ("norm_out_mod",), "linear"),
    Rule("proj_out.weight", ("proj_out", "kernel"), lambda a: _out_features(a.T, cfg)),
    Rule("proj_out.bias", ("proj_out", "bias"), lambda a: _out_features(a, cfg)),
  ]
  names = {
    "norm1.norm": ("norm1", "norm"),
    "norm1.linear": ("norm1_mod", "linear"),
    "attn1.to_q": ("to_q", "linear"),
    "attn1.to_k": ("to_k", "linear"),
    "attn1.to_v": ("to_v", "linear"),
    "attn1.to_out.0": ("to_out", "linear"),
    "attn1.norm_q": ("norm_q", "norm"),
    "attn1.norm_k": ("norm_k", "norm"),
    "norm2.norm": ("norm2", "norm"),
    "norm2.linear": ("norm2_mod", "linear"),
    "ff.net.0.proj": ("ff_in", "linear"),
    "ff.net.2": ("ff_out", "linear"),
  }
  for i in range(cfg.num_layers):
    for src, (ours, kind) in names.items():
      rules += _leaf_rules(f"transformer_blocks.{i}.{src}", ("blocks", ours), kind, i)
  if cfg.feature_cache:  # diffusers has no gates; RepVideo exports of ours may add this key
    rules.append(_gates_rule("learnable_gating", cfg, allow_missing_gates))
  return rules


_SAT_VIDEO_TEXT_ORDER = {"norm1_mod": (0, 1, 2, 6, 7, 8), "norm2_mod": (3, 4, 5, 9, 10, 11)}


def _adaln_chunks(which: str, w_or_b: str) -> Callable:
  """SAT's 12-way adaLN modulation [12D, E] -> our 6-way [E, 6D] for norm1 or norm2."""

  def pick(a):
    chunks = np.split(a, 12, axis=0)
    out = np.concatenate([chunks[j] for j in _SAT_VIDEO_TEXT_ORDER[which]], axis=0)
    return _linear(out) if w_or_b == "weight" else out

  return pick


def _qkv(part: int, w_or_b: str) -> Callable:
  def pick(a):
    out = np.split(a, 3, axis=0)[part]  # fused [q | k | v] along the output axis
    return _linear(out) if w_or_b == "weight" else out

  return pick


def sat_rules(cfg: TransformerConfig, *, allow_missing_gates: bool = True) -> list[Rule]:
  """The rules for an official SAT state dict (``model.diffusion_model.`` already stripped)."""
  rules = [
    Rule("mixins.patch_embed.proj.weight", ("patch_kernel",), _conv_patch),
    Rule("mixins.patch_embed.proj.bias", ("patch_bias",)),
    *_leaf_rules("mixins.patch_embed.text_proj", ("text_proj",), "linear"),
    *_leaf_rules("time_embed.0", ("time_linear_1",), "linear"),
    *_leaf_rules("time_embed.2", ("time_linear_2",), "linear"),
    *_leaf_rules("transformer.final_layernorm", ("norm_final",), "norm"),
    *_leaf_rules("mixins.final_layer.norm_final", ("norm_out",), "norm"),
    *_leaf_rules("mixins.final_layer.adaLN_modulation.1", ("norm_out_mod",), "linear"),
    Rule("mixins.final_layer.linear.weight", ("proj_out", "kernel"), lambda a: _out_features(a.T, cfg)),
    Rule("mixins.final_layer.linear.bias", ("proj_out", "bias"), lambda a: _out_features(a, cfg)),
  ]
  for i in range(cfg.num_layers):
    layer = f"transformer.layers.{i}"
    rules += _leaf_rules(f"{layer}.input_layernorm", ("blocks", "norm1"), "norm", i)
    rules += _leaf_rules(f"{layer}.post_attention_layernorm", ("blocks", "norm2"), "norm", i)
    rules += _leaf_rules(f"{layer}.attention.dense", ("blocks", "to_out"), "linear", i)
    rules += _leaf_rules(f"{layer}.mlp.dense_h_to_4h", ("blocks", "ff_in"), "linear", i)
    rules += _leaf_rules(f"{layer}.mlp.dense_4h_to_h", ("blocks", "ff_out"), "linear", i)
    rules += _leaf_rules(f"mixins.adaln_layer.query_layernorm_list.{i}", ("blocks", "norm_q"), "norm", i)
    rules += _leaf_rules(f"mixins.adaln_layer.key_layernorm_list.{i}", ("blocks", "norm_k"), "norm", i)
    for wb, leaf in (("weight", "kernel"), ("bias", "bias")):
      for part, name in enumerate(("to_q", "to_k", "to_v")):
        rules.append(
          Rule(f"{layer}.attention.query_key_value.{wb}", ("blocks", name, leaf), _qkv(part, wb), layer=i)
        )
      for which in ("norm1_mod", "norm2_mod"):
        rules.append(
          Rule(
            f"mixins.adaln_layer.adaLN_modulations.{i}.1.{wb}",
            ("blocks", which, leaf),
            _adaln_chunks(which, wb),
            layer=i,
          )
        )
  if cfg.feature_cache:
    rules.append(
      _gates_rule("transformer.learnable_gating", cfg, allow_missing_gates, lambda a: a.reshape(-1))
    )
  return rules


def _convert(
  state: dict[str, np.ndarray],
  rules: list[Rule],
  cfg: TransformerConfig,
  fmt: str,
  *,
  ignore=(),
  progress: bool = False,
) -> dict[str, Any]:
  return common.convert(
    state,
    rules,
    abstract_params(cfg),
    dtype=DTYPES[cfg.param_dtype],
    what=f"{fmt} transformer",
    config_note=f"num_layers={cfg.num_layers}, feature_cache={cfg.feature_cache}",
    ignore=ignore,
    advice="Check the checkpoint format and that the config matches the checkpoint (layers, cache on/off).",
    progress=progress,
  )


def from_diffusers(
  state: dict[str, np.ndarray],
  cfg: TransformerConfig,
  *,
  allow_missing_gates: bool = True,
  progress: bool = False,
) -> dict[str, Any]:
  """diffusers ``CogVideoXTransformer3DModel`` state dict -> our params (gates start at gate_init)."""
  return _convert(
    state, diffusers_rules(cfg, allow_missing_gates=allow_missing_gates), cfg, "diffusers", progress=progress
  )


def strip_sat_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops ``model.diffusion_model.`` and the first-stage/conditioner weights a full SAT dump holds."""
  if not any(k.startswith(SAT_PREFIX) for k in state):
    return dict(state)
  other = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in state if not k.startswith(SAT_PREFIX)})
  if other:
    log.info("ignoring non-transformer SAT keys under %s", other)
  return {k[len(SAT_PREFIX) :]: v for k, v in state.items() if k.startswith(SAT_PREFIX)}


def from_sat(
  state: dict[str, np.ndarray],
  cfg: TransformerConfig,
  *,
  allow_missing_gates: bool = True,
  progress: bool = False,
) -> dict[str, Any]:
  """Official SAT state dict (``module`` of mp_rank_00_model_states.pt) -> our params."""
  return _convert(
    strip_sat_prefix(state),
    sat_rules(cfg, allow_missing_gates=allow_missing_gates),
    cfg,
    "SAT",
    ignore=SAT_IGNORED,
    progress=progress,
  )


# ----------------------------------------------------------------------------------------------
# Configs from checkpoints.


def config_from_diffusers(cfg_json: dict[str, Any], **overrides) -> TransformerConfig:
  """diffusers ``config.json`` -> TransformerConfig (cache off unless overridden)."""
  unsupported = {k: cfg_json.get(k) for k in ("patch_size_t", "ofs_embed_dim") if cfg_json.get(k)}
  if cfg_json.get("use_learned_positional_embeddings"):
    unsupported["use_learned_positional_embeddings"] = True
  if unsupported:
    raise ValueError(
      f"unsupported CogVideoX variant {unsupported} (CogVideoX 1.5 / I2V); "
      "only CogVideoX 1.0 text-to-video (2B and 5B) is supported"
    )
  tcr = cfg_json.get("temporal_compression_ratio", 4)
  fields = dict(
    num_layers=cfg_json.get("num_layers", 30),
    num_heads=cfg_json.get("num_attention_heads", 30),
    head_dim=cfg_json.get("attention_head_dim", 64),
    in_channels=cfg_json.get("in_channels", 16),
    out_channels=cfg_json.get("out_channels") or cfg_json.get("in_channels", 16),
    patch_size=cfg_json.get("patch_size", 2),
    text_embed_dim=cfg_json.get("text_embed_dim", 4096),
    text_length=cfg_json.get("max_text_seq_length", 226),
    time_embed_dim=cfg_json.get("time_embed_dim", 512),
    norm_eps=float(cfg_json.get("norm_eps", 1e-5)),
    out_norm_eps=float(cfg_json.get("norm_eps", 1e-5)),
    positional_embedding="rope" if cfg_json.get("use_rotary_positional_embeddings") else "sincos",
    sample_frames=(cfg_json.get("sample_frames", 49) - 1) // tcr + 1,
    sample_height=cfg_json.get("sample_height", 60),
    sample_width=cfg_json.get("sample_width", 90),
    spatial_interpolation_scale=float(cfg_json.get("spatial_interpolation_scale", 1.875)),
    temporal_interpolation_scale=float(cfg_json.get("temporal_interpolation_scale", 1.0)),
    feature_cache=False,
  )
  for key in (
    "flip_sin_to_cos",
    "freq_shift",
    "activation_fn",
    "timestep_activation_fn",
    "norm_elementwise_affine",
    "attention_bias",
    "patch_bias",
  ):
    expected = {
      "flip_sin_to_cos": True,
      "freq_shift": 0,
      "activation_fn": "gelu-approximate",
      "timestep_activation_fn": "silu",
      "norm_elementwise_affine": True,
      "attention_bias": True,
      "patch_bias": True,
    }[key]
    if key in cfg_json and cfg_json[key] != expected:
      raise ValueError(f"unsupported diffusers config {key}={cfg_json[key]!r} (expected {expected!r})")
  fields.update(overrides)
  return TransformerConfig(**fields)


def config_from_sat(state: dict[str, np.ndarray], **overrides) -> TransformerConfig:
  """Infers the architecture from a SAT state dict's shapes (SAT folders carry no config file)."""
  state = strip_sat_prefix(state)
  try:
    patch = state["mixins.patch_embed.proj.weight"]
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer\.layers\.(\d+)\.", k)))
    head_dim = state["mixins.adaln_layer.query_layernorm_list.0.weight"].shape[0]
    hidden = patch.shape[0]
    fields = dict(
      num_layers=layers,
      num_heads=hidden // head_dim,
      head_dim=head_dim,
      in_channels=patch.shape[1],
      patch_size=patch.shape[2],
      out_channels=state["mixins.final_layer.linear.weight"].shape[0] // patch.shape[2] ** 2,
      text_embed_dim=state["mixins.patch_embed.text_proj.weight"].shape[1],
      time_embed_dim=state["time_embed.0.weight"].shape[0],
      mlp_dim=state["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape[0],
      feature_cache="transformer.learnable_gating" in state,
    )
  except (KeyError, ValueError) as e:
    raise CheckpointKeyError(
      f"not a SAT CogVideoX transformer state dict (missing {e}); first keys: {sorted(state)[:10]}"
    ) from None
  if fields["mlp_dim"] == 4 * hidden:
    fields["mlp_dim"] = None
  fields.update(overrides)
  return TransformerConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Loading from disk: diffusers folder, SAT checkpoint, or our converted (orbax) folder.


COMPONENT = common.Component(
  name="transformer",
  label="transformer",
  config_cls=TransformerConfig,
  abstract=abstract_params,
  markers=(("config.json", "diffusers"), ("latest", "sat"), ("mp_rank_00_model_states.pt", "sat")),
  expected="config.json + safetensors (diffusers), 'latest' or mp_rank_00_model_states.pt (SAT), or "
  "a folder converted by repvideo_jax.convert",
  file_error="a single file must be a SAT .pt checkpoint; for diffusers weights pass the folder "
  "holding config.json and the safetensors",
  file_suffixes=(".pt", ".pth", ".ckpt"),
)


def detect_format(path: str | pathlib.Path) -> str:
  """'ours', 'diffusers' or 'sat' for a path; raises FileNotFoundError with what was found."""
  return common.detect_format(path, COMPONENT)


def save(
  path: str | pathlib.Path,
  config: TransformerConfig,
  params: dict[str, Any],
  *,
  source: str | None = None,
  overwrite: bool = False,
) -> None:
  """Writes our converted format: orbax params plus ``metadata.json`` with the config and source."""
  common.save_converted(path, COMPONENT, config, params, source=source, overwrite=overwrite)


def read_config(path: str | pathlib.Path) -> TransformerConfig | None:
  """The config of a checkpoint without reading its weights; None for SAT (inferred from shapes)."""
  fmt, src = common.locate(path, COMPONENT)
  if fmt == "ours":
    return common.read_converted_config(src, COMPONENT)
  if fmt == "diffusers":
    return config_from_diffusers(json.loads((src / "config.json").read_text()))
  return None


def load(
  path: str | pathlib.Path,
  config: TransformerConfig | None = None,
  *,
  allow_missing_gates: bool = True,
  progress: bool = False,
  verify: bool = True,
  **config_overrides,
) -> tuple[TransformerConfig, dict[str, Any]]:
  """Loads transformer weights from any supported format. Returns (config, params).

  ``config`` defaults to the one stored with (ours), in (diffusers ``config.json``) or inferred from
  (SAT shapes) the checkpoint; ``config_overrides`` replace fields (e.g. ``feature_cache=True`` to
  add RepVideo gates to a CogVideoX-2B diffusers checkpoint, or ``dtype='bfloat16'``). ``verify``
  checks a converted folder's files against their recorded SHA-256 (``checkpoint_io.load_params``).
  """
  fmt, src = common.locate(path, COMPONENT)
  if fmt == "ours":

    def fit_gates(cfg: TransformerConfig, params: dict[str, Any]) -> dict[str, Any]:
      if cfg.feature_cache and "gates" not in params:
        return {**params, "gates": _initial_gates(cfg, allow_missing_gates, f"converted checkpoint {path}")}
      if not cfg.feature_cache and "gates" in params:
        return {k: v for k, v in params.items() if k != "gates"}
      return params

    return common.load_converted(
      src, COMPONENT, config, overrides=config_overrides, verify=verify, untagged_ok=True, adjust=fit_gates
    )
  if fmt == "diffusers":
    cfg = config or config_from_diffusers(json.loads((src / "config.json").read_text()), **config_overrides)
    state = checkpoint_io.read_safetensors_folder(src)
    return cfg, from_diffusers(state, cfg, allow_missing_gates=allow_missing_gates, progress=progress)
  state = checkpoint_io.load_sat_checkpoint(src)
  cfg = config or config_from_sat(state, **config_overrides)
  return cfg, from_sat(state, cfg, allow_missing_gates=allow_missing_gates, progress=progress)
