"""Weight names and layouts for the VAE: diffusers and SAT state dicts -> our param tree.

Every source key is accounted for: a key that maps nowhere, or a param that no key fills, raises a
``CheckpointKeyError`` listing them (SAT ``loss.*`` keys -- the training discriminator/LPIPS -- are
ignored on purpose). Layout changes happen here and nowhere else: Conv3d [O, I, kt, kh, kw] ->
[kt, kh, kw, I, O], Conv2d [O, I, kh, kw] -> HWIO [kh, kw, I, O], GroupNorm weight -> scale.

Name maps (docs/checkpoints.md, 'VAE keys'). Our tree mirrors diffusers' module tree with these
leaf renames:
  <conv>.conv.weight/bias   -> <conv>.kernel/bias        (causal convs: conv_in, conv1, conv2, conv_out,
                                                          conv_y, conv_b)
  conv_shortcut.weight/bias -> conv_shortcut.kernel/bias
  downsamplers.0 / upsamplers.0 -> downsample / upsample
  GroupNorm weight/bias     -> scale/bias;  SpatialNorm ``norm_layer`` -> ``norm``
SAT names are diffusers' with these renames: resnets. <- block., down_blocks. <-
down., downsamplers.0 <- downsample, upsamplers.0 <- upsample, conv_shortcut <- nin_shortcut,
mid_block.resnets.{0,1} <- mid.block_{1,2}, and decoder.up_blocks.{j} <- decoder.up.{L-1-j}.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from repvideo_jax import checkpoint_io
from repvideo_jax import weights_common as common
from repvideo_jax.functional import DTYPES
from repvideo_jax.vae import VAEConfig, abstract_params
from repvideo_jax.weights_common import CheckpointKeyError, Rule, flatten  # noqa: F401

SAT_IGNORED_PREFIXES = ("loss.",)
__all__ = [
  "CheckpointKeyError",
  "config_from_diffusers",
  "config_from_sat",
  "detect_format",
  "diffusers_rules",
  "from_diffusers",
  "from_sat",
  "load",
  "save",
  "sat_key",
]


# ----------------------------------------------------------------------------------------------
# Layout helpers.


def _conv3d(w: np.ndarray) -> np.ndarray:
  if w.ndim != 5:
    raise CheckpointKeyError(f"expected a Conv3d weight [O, I, kt, kh, kw], got shape {w.shape}")
  return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))


def _conv2d(w: np.ndarray) -> np.ndarray:
  if w.ndim != 4:
    raise CheckpointKeyError(f"expected a Conv2d weight [O, I, kh, kw], got shape {w.shape}")
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv_rules(src: str, path: tuple, transform=_conv3d) -> list[Rule]:
  return [Rule(f"{src}.weight", path + ("kernel",), transform), Rule(f"{src}.bias", path + ("bias",))]


def _norm_rules(src: str, path: tuple) -> list[Rule]:
  return [Rule(f"{src}.weight", path + ("scale",)), Rule(f"{src}.bias", path + ("bias",))]


def _resnet_rules(src: str, path: tuple, cin: int, cout: int, spatial: bool) -> list[Rule]:
  rules = []
  for n in ("norm1", "norm2"):
    if spatial:
      rules += _norm_rules(f"{src}.{n}.norm_layer", path + (n, "norm"))
      rules += _conv_rules(f"{src}.{n}.conv_y.conv", path + (n, "conv_y"))
      rules += _conv_rules(f"{src}.{n}.conv_b.conv", path + (n, "conv_b"))
    else:
      rules += _norm_rules(f"{src}.{n}", path + (n,))
  rules += _conv_rules(f"{src}.conv1.conv", path + ("conv1",))
  rules += _conv_rules(f"{src}.conv2.conv", path + ("conv2",))
  if cin != cout:
    rules += _conv_rules(f"{src}.conv_shortcut", path + ("conv_shortcut",))
  return rules


def diffusers_rules(cfg: VAEConfig) -> list[Rule]:
  """The rules for every tensor of a diffusers ``AutoencoderKLCogVideoX``."""
  boc = cfg.block_out_channels
  rules = _conv_rules("encoder.conv_in.conv", ("encoder", "conv_in"))
  for i in range(len(boc)):
    cin = boc[max(i - 1, 0)]
    for r in range(cfg.layers_per_block):
      rules += _resnet_rules(
        f"encoder.down_blocks.{i}.resnets.{r}",
        ("encoder", "down_blocks", str(i), "resnets", str(r)),
        cin if r == 0 else boc[i],
        boc[i],
        spatial=False,
      )
    if i < len(boc) - 1:
      rules += _conv_rules(
        f"encoder.down_blocks.{i}.downsamplers.0.conv",
        ("encoder", "down_blocks", str(i), "downsample", "conv"),
        _conv2d,
      )
  for r in range(2):
    rules += _resnet_rules(
      f"encoder.mid_block.resnets.{r}",
      ("encoder", "mid_block", "resnets", str(r)),
      boc[-1],
      boc[-1],
      spatial=False,
    )
  rules += _norm_rules("encoder.norm_out", ("encoder", "norm_out"))
  rules += _conv_rules("encoder.conv_out.conv", ("encoder", "conv_out"))

  rev = tuple(reversed(boc))
  rules += _conv_rules("decoder.conv_in.conv", ("decoder", "conv_in"))
  for r in range(2):
    rules += _resnet_rules(
      f"decoder.mid_block.resnets.{r}",
      ("decoder", "mid_block", "resnets", str(r)),
      rev[0],
      rev[0],
      spatial=True,
    )
  for i in range(len(rev)):
    cin = rev[max(i - 1, 0)]
    for r in range(cfg.layers_per_block + 1):
      rules += _resnet_rules(
        f"decoder.up_blocks.{i}.resnets.{r}",
        ("decoder", "up_blocks", str(i), "resnets", str(r)),
        cin if r == 0 else rev[i],
        rev[i],
        spatial=True,
      )
    if i < len(rev) - 1:
      rules += _conv_rules(
        f"decoder.up_blocks.{i}.upsamplers.0.conv",
        ("decoder", "up_blocks", str(i), "upsample", "conv"),
        _conv2d,
      )
  rules += _norm_rules("decoder.norm_out.norm_layer", ("decoder", "norm_out", "norm"))
  rules += _conv_rules("decoder.norm_out.conv_y.conv", ("decoder", "norm_out", "conv_y"))
  rules += _conv_rules("decoder.norm_out.conv_b.conv", ("decoder", "norm_out", "conv_b"))
  rules += _conv_rules("decoder.conv_out.conv", ("decoder", "conv_out"))
  return rules


def sat_key(diffusers_key: str, num_levels: int) -> str:
  """The SAT ``3d-vae.pt`` name of a diffusers VAE key (the renames above, undone)."""
  k = diffusers_key
  k = re.sub(
    r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
    lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.",
    k,
  )
  k = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.", k)
  k = k.replace("down_blocks.", "down.").replace("resnets.", "block.")
  k = k.replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
  return k.replace("conv_shortcut", "nin_shortcut")


def sat_rules(cfg: VAEConfig) -> list[Rule]:
  n = len(cfg.block_out_channels)
  return [rule._replace(source=sat_key(rule.source, n)) for rule in diffusers_rules(cfg)]


def _convert(
  state: Mapping[str, np.ndarray], rules: list[Rule], cfg: VAEConfig, fmt: str, *, ignore=()
) -> dict[str, Any]:
  return common.convert(
    state,
    rules,
    abstract_params(cfg),
    dtype=DTYPES[cfg.param_dtype],
    what=f"{fmt} VAE",
    config_note=f"block_out_channels={cfg.block_out_channels}, layers_per_block={cfg.layers_per_block}",
    ignore=ignore,
  )


def from_diffusers(state: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict[str, Any]:
  """diffusers ``AutoencoderKLCogVideoX`` state dict -> our params."""
  return _convert(state, diffusers_rules(cfg), cfg, "diffusers")


def strip_sat_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Keeps ``first_stage_model.*`` (prefix dropped) when a full SAT model dump is passed."""
  prefix = "first_stage_model."
  if any(k.startswith(prefix) for k in state) and not any(k.startswith("encoder.") for k in state):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
  return dict(state)


def from_sat(state: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict[str, Any]:
  """SAT ``3d-vae.pt`` state dict (``encoder.*``, ``decoder.*``; ``loss.*`` ignored) -> our params."""
  return _convert(strip_sat_prefix(state), sat_rules(cfg), cfg, "SAT", ignore=SAT_IGNORED_PREFIXES)


# ----------------------------------------------------------------------------------------------
# Configs.


def config_from_diffusers(cfg_json: Mapping[str, Any], **overrides) -> VAEConfig:
  """diffusers VAE ``config.json`` -> VAEConfig; refuses variants this port does not implement."""
  cls = cfg_json.get("_class_name")
  if cls is not None and cls != "AutoencoderKLCogVideoX":
    raise ValueError(f"not a CogVideoX VAE config (_class_name={cls!r})")
  unsupported = {
    k: cfg_json[k]
    for k in ("use_quant_conv", "use_post_quant_conv", "invert_scale_latents")
    if cfg_json.get(k)
  }
  unsupported.update(
    {k: cfg_json[k] for k in ("shift_factor", "latents_mean", "latents_std") if cfg_json.get(k) is not None}
  )
  if cfg_json.get("act_fn", "silu") not in ("silu", "swish"):
    unsupported["act_fn"] = cfg_json["act_fn"]
  for key, want in (("down_block_types", "CogVideoXDownBlock3D"), ("up_block_types", "CogVideoXUpBlock3D")):
    if any(t != want for t in cfg_json.get(key, ())):
      unsupported[key] = cfg_json[key]
  if unsupported:
    raise ValueError(f"unsupported CogVideoX VAE config {unsupported}")
  fields = dict(
    in_channels=cfg_json.get("in_channels", 3),
    out_channels=cfg_json.get("out_channels", 3),
    block_out_channels=tuple(cfg_json.get("block_out_channels", (128, 256, 256, 512))),
    layers_per_block=cfg_json.get("layers_per_block", 3),
    latent_channels=cfg_json.get("latent_channels", 16),
    norm_num_groups=cfg_json.get("norm_num_groups", 32),
    norm_eps=float(cfg_json.get("norm_eps", 1e-6)),
    temporal_compression_ratio=int(cfg_json.get("temporal_compression_ratio", 4)),
    scaling_factor=float(cfg_json.get("scaling_factor", VAEConfig.scaling_factor)),
    sample_height=cfg_json.get("sample_height", 480),
    sample_width=cfg_json.get("sample_width", 720),
  )
  fields.update(overrides)
  return VAEConfig(**fields)


def config_from_sat(state: Mapping[str, np.ndarray], **overrides) -> VAEConfig:
  """Infers the architecture from a SAT VAE state dict's shapes (3d-vae.pt carries no config).

  ``norm_num_groups``, ``norm_eps`` and ``temporal_compression_ratio`` cannot be read from shapes:
  they default to the released values (32, 1e-6, 4); override them for other models.
  """
  state = strip_sat_prefix(state)
  try:
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    boc = tuple(int(state[f"encoder.down.{i}.block.0.conv1.conv.weight"].shape[0]) for i in range(levels))
    blocks = 1 + max(
      int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))
    )
    conv_in = state["encoder.conv_in.conv.weight"]
    fields = dict(
      in_channels=int(conv_in.shape[1]),
      block_out_channels=boc,
      layers_per_block=blocks,
      latent_channels=int(state["encoder.conv_out.conv.weight"].shape[0]) // 2,
      out_channels=int(state["decoder.conv_out.conv.weight"].shape[0]),
    )
  except (KeyError, ValueError) as e:
    raise CheckpointKeyError(
      f"not a SAT CogVideoX VAE state dict (missing {e}); first keys: {sorted(state)[:10]}"
    ) from None
  fields.update(overrides)
  return VAEConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Loading from disk: diffusers ``vae/`` folder, SAT ``3d-vae.pt``, or our converted folder.


COMPONENT = common.Component(
  name="vae",
  label="VAE",
  config_cls=VAEConfig,
  abstract=abstract_params,
  markers=(("config.json", "diffusers"), ("3d-vae.pt", "sat")),
  expected="config.json + safetensors (diffusers vae/ folder), a SAT 3d-vae.pt file, or a folder "
  "converted by repvideo_jax",
  file_error="a single file must be a SAT VAE .pt checkpoint (3d-vae.pt); for diffusers weights "
  "pass the vae/ folder holding config.json and the safetensors",
  file_suffixes=(".pt", ".pth", ".ckpt"),
)


def detect_format(path: str | pathlib.Path) -> str:
  """'ours', 'diffusers' or 'sat' for a path; raises FileNotFoundError/ValueError with what was found."""
  return common.detect_format(path, COMPONENT)


def read_sat_state(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a SAT ``3d-vae.pt`` torch-free: the ``state_dict`` entry (or a bare state dict)."""
  obj = checkpoint_io.read_torch_pickle(path)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a dict with a 'state_dict', got {type(obj).__name__}")
  state = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not state:
    raise ValueError(f"{path}: no tensors found (keys: {sorted(obj)[:10]})")
  return state


def save(
  path: str | pathlib.Path,
  config: VAEConfig,
  params: dict[str, Any],
  *,
  source: str | None = None,
  overwrite: bool = False,
) -> None:
  """Writes our converted format: orbax params plus ``metadata.json`` {"component": "vae", ...}."""
  common.save_converted(path, COMPONENT, config, params, source=source, overwrite=overwrite)


def load(
  path: str | pathlib.Path, config: VAEConfig | None = None, *, verify: bool = True, **config_overrides
) -> tuple[VAEConfig, dict[str, Any]]:
  """Loads VAE weights from a diffusers ``vae/`` folder (or a pipeline folder holding one), a SAT
  ``3d-vae.pt`` (or its folder), or our converted folder. Returns (config, params).

  ``config`` defaults to the stored one (ours), ``config.json`` (diffusers) or the shapes (SAT);
  ``config_overrides`` replace fields (e.g. ``dtype='bfloat16'``).
  """
  fmt, src = common.locate(path, COMPONENT)
  if fmt == "ours":
    return common.load_converted(src, COMPONENT, config, overrides=config_overrides, verify=verify)
  if fmt == "diffusers":
    cfg = config or config_from_diffusers(json.loads((src / "config.json").read_text()), **config_overrides)
    return cfg, from_diffusers(checkpoint_io.read_safetensors_folder(src), cfg)
  state = read_sat_state(src / "3d-vae.pt" if src.is_dir() else src)
  cfg = config or config_from_sat(state, **config_overrides)
  return cfg, from_sat(state, cfg)
