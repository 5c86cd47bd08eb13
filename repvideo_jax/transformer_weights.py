"""Weight names and layouts for the transformer: diffusers and SAT state dicts -> our param tree.

Every source key is accounted for: a key that maps nowhere, or a param that no key fills, raises a
``CheckpointKeyError`` listing them. Layout changes (PyTorch [out, in] -> [in, out], conv OIHW ->
HWIO, channel-major output features -> channels-last) happen here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from typing import Any, Callable, Iterable

import jax
import numpy as np

from repvideo_jax import checkpoint_io
from repvideo_jax.weights_common import (CheckpointKeyError, check_param_shapes, flatten,
                                         set_path)
from repvideo_jax.transformer import DTYPES, TransformerConfig, abstract_params

log = logging.getLogger(__name__)

SAT_PREFIX = "model.diffusion_model."
SAT_IGNORED = ("mixins.pos_embed.pos_embedding",)  # frozen sin-cos table: regenerated, never loaded


# ----------------------------------------------------------------------------------------------
# Layout helpers.


def _linear(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)  # torch [out, in] -> [in, out]


def _conv_patch(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]


def _out_features(x: np.ndarray, cfg: TransformerConfig) -> np.ndarray:
  """Reorders the last axis of proj_out from torch's (c, py, px) to our (py, px, c)."""
  p, c = cfg.patch_size, cfg.out_channels
  y = x.reshape(*x.shape[:-1], c, p, p)
  return np.ascontiguousarray(np.moveaxis(y, -3, -1)).reshape(x.shape)


def _leaf_rules(prefix_src: str, path: tuple, kind: str) -> list[tuple[str, tuple, Callable]]:
  """(source key, our path, transform) for one module: 'linear' or 'norm'."""
  if kind == "linear":
    return [(f"{prefix_src}.weight", path + ("kernel",), _linear),
            (f"{prefix_src}.bias", path + ("bias",), lambda a: a)]
  return [(f"{prefix_src}.weight", path + ("scale",), lambda a: a),
          (f"{prefix_src}.bias", path + ("bias",), lambda a: a)]


# ----------------------------------------------------------------------------------------------
# Per-format mappings: each yields (source key, our path, transform). Block paths use the layer
# index as the second element; ``_assemble`` stacks them.


def diffusers_rules(cfg: TransformerConfig) -> list[tuple[str, tuple, Callable]]:
  rules = [
      ("patch_embed.proj.weight", ("patch_kernel",), _conv_patch),
      ("patch_embed.proj.bias", ("patch_bias",), lambda a: a),
      *_leaf_rules("patch_embed.text_proj", ("text_proj",), "linear"),
      *_leaf_rules("time_embedding.linear_1", ("time_linear_1",), "linear"),
      *_leaf_rules("time_embedding.linear_2", ("time_linear_2",), "linear"),
      *_leaf_rules("norm_final", ("norm_final",), "norm"),
      *_leaf_rules("norm_out.norm", ("norm_out",), "norm"),
      *_leaf_rules("norm_out.linear", ("norm_out_mod",), "linear"),
      ("proj_out.weight", ("proj_out", "kernel"), lambda a: _out_features(a.T, cfg)),
      ("proj_out.bias", ("proj_out", "bias"), lambda a: _out_features(a, cfg)),
  ]
  names = {"norm1.norm": ("norm1", "norm"), "norm1.linear": ("norm1_mod", "linear"),
           "attn1.to_q": ("to_q", "linear"), "attn1.to_k": ("to_k", "linear"),
           "attn1.to_v": ("to_v", "linear"), "attn1.to_out.0": ("to_out", "linear"),
           "attn1.norm_q": ("norm_q", "norm"), "attn1.norm_k": ("norm_k", "norm"),
           "norm2.norm": ("norm2", "norm"), "norm2.linear": ("norm2_mod", "linear"),
           "ff.net.0.proj": ("ff_in", "linear"), "ff.net.2": ("ff_out", "linear")}
  for i in range(cfg.num_layers):
    for src, (ours, kind) in names.items():
      rules += _leaf_rules(f"transformer_blocks.{i}.{src}", ("blocks", i, ours), kind)
  if cfg.feature_cache:  # diffusers has no gates; RepVideo exports of ours may add this key
    rules.append(("learnable_gating", ("gates",), lambda a: a))
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


def sat_rules(cfg: TransformerConfig) -> list[tuple[str, tuple, Callable]]:
  rules = [
      ("mixins.patch_embed.proj.weight", ("patch_kernel",), _conv_patch),
      ("mixins.patch_embed.proj.bias", ("patch_bias",), lambda a: a),
      *_leaf_rules("mixins.patch_embed.text_proj", ("text_proj",), "linear"),
      *_leaf_rules("time_embed.0", ("time_linear_1",), "linear"),
      *_leaf_rules("time_embed.2", ("time_linear_2",), "linear"),
      *_leaf_rules("transformer.final_layernorm", ("norm_final",), "norm"),
      *_leaf_rules("mixins.final_layer.norm_final", ("norm_out",), "norm"),
      *_leaf_rules("mixins.final_layer.adaLN_modulation.1", ("norm_out_mod",), "linear"),
      ("mixins.final_layer.linear.weight", ("proj_out", "kernel"), lambda a: _out_features(a.T, cfg)),
      ("mixins.final_layer.linear.bias", ("proj_out", "bias"), lambda a: _out_features(a, cfg)),
  ]
  for i in range(cfg.num_layers):
    layer, blk = f"transformer.layers.{i}", ("blocks", i)
    rules += _leaf_rules(f"{layer}.input_layernorm", blk + ("norm1",), "norm")
    rules += _leaf_rules(f"{layer}.post_attention_layernorm", blk + ("norm2",), "norm")
    rules += _leaf_rules(f"{layer}.attention.dense", blk + ("to_out",), "linear")
    rules += _leaf_rules(f"{layer}.mlp.dense_h_to_4h", blk + ("ff_in",), "linear")
    rules += _leaf_rules(f"{layer}.mlp.dense_4h_to_h", blk + ("ff_out",), "linear")
    rules += _leaf_rules(f"mixins.adaln_layer.query_layernorm_list.{i}", blk + ("norm_q",), "norm")
    rules += _leaf_rules(f"mixins.adaln_layer.key_layernorm_list.{i}", blk + ("norm_k",), "norm")
    for part, name in enumerate(("to_q", "to_k", "to_v")):
      for wb, leaf in (("weight", "kernel"), ("bias", "bias")):
        rules.append((f"{layer}.attention.query_key_value.{wb}", blk + (name, leaf), _qkv(part, wb)))
    for which in ("norm1_mod", "norm2_mod"):
      for wb, leaf in (("weight", "kernel"), ("bias", "bias")):
        rules.append((f"mixins.adaln_layer.adaLN_modulations.{i}.1.{wb}", blk + (which, leaf),
                      _adaln_chunks(which, wb)))
  if cfg.feature_cache:
    rules.append(("transformer.learnable_gating", ("gates",), lambda a: a.reshape(-1)))
  return rules


# ----------------------------------------------------------------------------------------------
# Assembly with strict key accounting.


def _assemble(state: dict[str, np.ndarray], rules, cfg: TransformerConfig, *, ignored=(),
              allow_missing_gates: bool = False, progress: bool = False) -> dict[str, Any]:
  target = abstract_params(cfg)
  dtype = np.dtype(DTYPES[cfg.param_dtype])
  used = {k for k in state if k in ignored}
  missing, flat = [], {}
  items: Iterable = rules
  if progress:
    from tqdm.auto import tqdm
    items = tqdm(rules, desc="converting transformer", unit="tensor")
  for src, path, fn in items:
    if src not in state:
      missing.append(src)
      continue
    used.add(src)
    flat[path] = fn(np.asarray(state[src]))
  if missing == ["transformer.learnable_gating"] or missing == ["learnable_gating"]:
    if not allow_missing_gates:
      raise CheckpointKeyError(f"checkpoint has no RepVideo gates ({missing[0]}) but the config has "
                               "feature_cache=True; pass allow_missing_gates=True to start them at "
                               f"{cfg.gate_init}, or use a config with feature_cache=False")
    log.warning("checkpoint has no RepVideo gates: initialising all %d gates to %s (the feature cache "
                "is not an identity at this value; fine-tune before sampling)", cfg.num_layers,
                cfg.gate_init)
    flat[("gates",)] = np.full((cfg.num_layers,), cfg.gate_init, np.float32)
    missing = []
  unknown = sorted(set(state) - used)
  if missing or unknown:
    raise CheckpointKeyError(
        "checkpoint keys do not match the config "
        f"(num_layers={cfg.num_layers}, feature_cache={cfg.feature_cache}):\n"
        f"  missing from checkpoint ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
        f"  unexpected in checkpoint ({len(unknown)}): {unknown[:20]}{' ...' if len(unknown) > 20 else ''}\n"
        "Check the checkpoint format and that the config matches the checkpoint (layers, cache on/off).")
  # Stack per-layer tensors and check every shape against the config.
  params: dict[str, Any] = {}
  for path, leaf_abs in flatten(target):
    if path[0] == "blocks":
      arr = np.stack([flat[(path[0], i) + path[1:]] for i in range(cfg.num_layers)])
    else:
      arr = flat[path]
    if tuple(arr.shape) != tuple(leaf_abs.shape):
      raise CheckpointKeyError(f"shape mismatch for {'.'.join(map(str, path))}: checkpoint gives "
                               f"{tuple(arr.shape)}, config expects {tuple(leaf_abs.shape)}")
    set_path(params, path, arr.astype(dtype))
  return params


def from_diffusers(state: dict[str, np.ndarray], cfg: TransformerConfig, *,
                   allow_missing_gates: bool = True, progress: bool = False) -> dict[str, Any]:
  """diffusers ``CogVideoXTransformer3DModel`` state dict -> our params (gates start at gate_init)."""
  return _assemble(state, diffusers_rules(cfg), cfg, allow_missing_gates=allow_missing_gates,
                   progress=progress)


def strip_sat_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops ``model.diffusion_model.`` and the first-stage/conditioner weights a full SAT dump holds."""
  if not any(k.startswith(SAT_PREFIX) for k in state):
    return dict(state)
  other = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in state if not k.startswith(SAT_PREFIX)})
  if other:
    log.info("ignoring non-transformer SAT keys under %s", other)
  return {k[len(SAT_PREFIX):]: v for k, v in state.items() if k.startswith(SAT_PREFIX)}


def from_sat(state: dict[str, np.ndarray], cfg: TransformerConfig, *,
             allow_missing_gates: bool = True, progress: bool = False) -> dict[str, Any]:
  """Official SAT state dict (``module`` of mp_rank_00_model_states.pt) -> our params."""
  return _assemble(strip_sat_prefix(state), sat_rules(cfg), cfg, ignored=SAT_IGNORED,
                   allow_missing_gates=allow_missing_gates, progress=progress)


# ----------------------------------------------------------------------------------------------
# Configs from checkpoints.


def config_from_diffusers(cfg_json: dict[str, Any], **overrides) -> TransformerConfig:
  """diffusers ``config.json`` -> TransformerConfig (cache off unless overridden)."""
  unsupported = {k: cfg_json.get(k) for k in ("patch_size_t", "ofs_embed_dim")
                 if cfg_json.get(k)}
  if cfg_json.get("use_learned_positional_embeddings"):
    unsupported["use_learned_positional_embeddings"] = True
  if unsupported:
    raise ValueError(f"unsupported CogVideoX variant {unsupported} (CogVideoX 1.5 / I2V); "
                     "only CogVideoX 1.0 text-to-video (2B and 5B) is supported")
  tcr = cfg_json.get("temporal_compression_ratio", 4)
  fields = dict(
      num_layers=cfg_json.get("num_layers", 30), num_heads=cfg_json.get("num_attention_heads", 30),
      head_dim=cfg_json.get("attention_head_dim", 64), in_channels=cfg_json.get("in_channels", 16),
      out_channels=cfg_json.get("out_channels") or cfg_json.get("in_channels", 16),
      patch_size=cfg_json.get("patch_size", 2), text_embed_dim=cfg_json.get("text_embed_dim", 4096),
      text_length=cfg_json.get("max_text_seq_length", 226),
      time_embed_dim=cfg_json.get("time_embed_dim", 512),
      norm_eps=float(cfg_json.get("norm_eps", 1e-5)), out_norm_eps=float(cfg_json.get("norm_eps", 1e-5)),
      positional_embedding="rope" if cfg_json.get("use_rotary_positional_embeddings") else "sincos",
      sample_frames=(cfg_json.get("sample_frames", 49) - 1) // tcr + 1,
      sample_height=cfg_json.get("sample_height", 60), sample_width=cfg_json.get("sample_width", 90),
      spatial_interpolation_scale=float(cfg_json.get("spatial_interpolation_scale", 1.875)),
      temporal_interpolation_scale=float(cfg_json.get("temporal_interpolation_scale", 1.0)),
      feature_cache=False)
  for key in ("flip_sin_to_cos", "freq_shift", "activation_fn", "timestep_activation_fn",
              "norm_elementwise_affine", "attention_bias", "patch_bias"):
    expected = {"flip_sin_to_cos": True, "freq_shift": 0, "activation_fn": "gelu-approximate",
                "timestep_activation_fn": "silu", "norm_elementwise_affine": True,
                "attention_bias": True, "patch_bias": True}[key]
    if key in cfg_json and cfg_json[key] != expected:
      raise ValueError(f"unsupported diffusers config {key}={cfg_json[key]!r} (expected {expected!r})")
  fields.update(overrides)
  return TransformerConfig(**fields)


def config_from_sat(state: dict[str, np.ndarray], **overrides) -> TransformerConfig:
  """Infers the architecture from a SAT state dict's shapes (SAT folders carry no config file)."""
  state = strip_sat_prefix(state)
  try:
    patch = state["mixins.patch_embed.proj.weight"]
    layers = 1 + max(int(m.group(1)) for k in state
                     if (m := re.match(r"transformer\.layers\.(\d+)\.", k)))
    head_dim = state["mixins.adaln_layer.query_layernorm_list.0.weight"].shape[0]
    hidden = patch.shape[0]
    fields = dict(
        num_layers=layers, num_heads=hidden // head_dim, head_dim=head_dim, in_channels=patch.shape[1],
        patch_size=patch.shape[2],
        out_channels=state["mixins.final_layer.linear.weight"].shape[0] // patch.shape[2] ** 2,
        text_embed_dim=state["mixins.patch_embed.text_proj.weight"].shape[1],
        time_embed_dim=state["time_embed.0.weight"].shape[0],
        mlp_dim=state["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape[0],
        feature_cache="transformer.learnable_gating" in state)
  except (KeyError, ValueError) as e:
    raise CheckpointKeyError(f"not a SAT CogVideoX transformer state dict (missing {e}); "
                             f"first keys: {sorted(state)[:10]}") from None
  if fields["mlp_dim"] == 4 * hidden:
    fields["mlp_dim"] = None
  fields.update(overrides)
  return TransformerConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Loading from disk: diffusers folder, SAT checkpoint, or our converted (orbax) folder.


def _diffusers_folder(path: pathlib.Path) -> pathlib.Path:
  """A diffusers transformer folder, or the ``transformer/`` inside a pipeline folder."""
  if (path / "transformer").is_dir() and not (path / "config.json").exists():
    return path / "transformer"
  return path


def detect_format(path: str | pathlib.Path) -> str:
  """'ours', 'diffusers' or 'sat' for a path; raises FileNotFoundError with what was found."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}")
  if path.is_file():
    if path.suffix in (".pt", ".pth", ".ckpt"):
      return "sat"
    raise ValueError(f"{path}: a single file must be a SAT .pt checkpoint; for diffusers weights "
                     "pass the folder holding config.json and the safetensors")
  if (path / "metadata.json").exists() and (path / "params").exists():
    return "ours"
  if _diffusers_folder(path) != path:
    return detect_format(path / "transformer")
  if (path / "config.json").exists():
    return "diffusers"
  if (path / "latest").exists() or (path / "mp_rank_00_model_states.pt").exists():
    return "sat"
  raise FileNotFoundError(
      f"{path} is not a transformer checkpoint: expected config.json + safetensors (diffusers), "
      f"'latest' or mp_rank_00_model_states.pt (SAT), or a folder converted by repvideo_jax.convert; "
      f"found {sorted(p.name for p in path.iterdir())[:20]}")


def save(path: str | pathlib.Path, config: TransformerConfig, params: dict[str, Any], *,
         source: str | None = None, overwrite: bool = False) -> None:
  """Writes our converted format: orbax params plus ``metadata.json`` with the config and source."""
  from repvideo_jax.config import to_dict
  checkpoint_io.save_params(path, params, overwrite=overwrite, metadata={
      "component": "transformer", "config": to_dict(config), "source": source})


def read_config(path: str | pathlib.Path) -> TransformerConfig | None:
  """The config of a checkpoint without reading its weights; None for SAT (inferred from shapes)."""
  path = pathlib.Path(path)
  fmt = detect_format(path)
  if fmt == "ours":
    from repvideo_jax.config import from_dict
    meta = json.loads((path / "metadata.json").read_text())
    return from_dict(TransformerConfig, meta["config"], where=f"{path}/metadata.json")
  if fmt == "diffusers":
    folder = _diffusers_folder(path)
    return config_from_diffusers(json.loads((folder / "config.json").read_text()))
  return None


def load(path: str | pathlib.Path, config: TransformerConfig | None = None, *,
         allow_missing_gates: bool = True, progress: bool = False, verify: bool = True,
         **config_overrides
         ) -> tuple[TransformerConfig, dict[str, Any]]:
  """Loads transformer weights from any supported format. Returns (config, params).

  ``config`` defaults to the one stored with (ours), in (diffusers ``config.json``) or inferred from
  (SAT shapes) the checkpoint; ``config_overrides`` replace fields (e.g. ``feature_cache=True`` to
  add RepVideo gates to a CogVideoX-2B diffusers checkpoint, or ``dtype='bfloat16'``). ``verify``
  checks a converted folder's files against their recorded SHA-256 (``checkpoint_io.load_params``).
  """
  path = pathlib.Path(path)
  fmt = detect_format(path)
  if fmt == "ours":
    params, meta = checkpoint_io.load_params(path, verify=verify)
    if meta.get("component", "transformer") != "transformer":
      raise ValueError(f"{path} holds a converted {meta['component']!r}, not a transformer")
    from repvideo_jax.config import from_dict
    stored = from_dict(TransformerConfig, meta["config"], where=f"{path}/metadata.json")
    cfg = config or dataclasses.replace(stored, **config_overrides)
    if cfg.feature_cache and "gates" not in params:
      if not allow_missing_gates:
        raise CheckpointKeyError(f"{path} has no RepVideo gates but feature_cache=True")
      log.warning("converted checkpoint has no RepVideo gates: initialising them to %s", cfg.gate_init)
      params = {**params, "gates": np.full((cfg.num_layers,), cfg.gate_init, np.float32)}
    elif not cfg.feature_cache and "gates" in params:
      params = {k: v for k, v in params.items() if k != "gates"}
    check_param_shapes(params, abstract_params(cfg), "transformer")
    dtype = np.dtype(DTYPES[cfg.param_dtype])
    return cfg, jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
  if fmt == "diffusers":
    folder = _diffusers_folder(path)
    with open(folder / "config.json") as f:
      cfg_json = json.load(f)
    cfg = config or config_from_diffusers(cfg_json, **config_overrides)
    state = checkpoint_io.read_safetensors_folder(folder)
    return cfg, from_diffusers(state, cfg, allow_missing_gates=allow_missing_gates, progress=progress)
  state = checkpoint_io.load_sat_checkpoint(path)
  cfg = config or config_from_sat(state, **config_overrides)
  return cfg, from_sat(state, cfg, allow_missing_gates=allow_missing_gates, progress=progress)
