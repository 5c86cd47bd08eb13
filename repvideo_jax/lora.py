"""LoRA adapters for the RepVideo / CogVideoX transformer: config, init, merge, and the two file formats.

A LoRA adapts some of a Block's linear kernels W (in, out) to W + s * alpha / r * A @ B, with A
(in, r) and B (r, out) per layer, alpha / r peft's scaling rule and s the scale the user picks when
applying it. Here a LoRA is a plain nested dict that mirrors the transformer's param paths, stacked
over layers like the kernels it adapts:

    {"alpha": () float32,                                 # a constant: apply / merge stop its gradient
     "blocks": {"to_q": {"a": (num_layers, in, r),        # for blocks/to_q/kernel (num_layers, in, out)
                         "b": (num_layers, r, out)},
                ...},
     "gates": (num_layers,) float32}                      # optional: RepVideo gate offsets

Two ways to use one (both take any number of LoRAs, each with its own scale):
  merged     ``merge(params, lora, scale)`` once: plain params, the model runs at its usual cost;
  unmerged   ``transformer.apply(params, ..., lora=[(lora, scale), ...])``: the factors ride in the
             layer scan and adapt one layer's kernels at a time; the base params stay unmodified.
The math of both is ``transformer.lora_kernel`` / ``lora_multiplier`` (the scan hook's), so they agree.
A LoRA trained with the RepVideo gates (``lora.train_gates``) carries the gates it learned as offsets
from the base model's ("gates"), added times the scale, merged or not (``transformer.lora_gate_offsets``).
``dropout`` is recorded for training (peft drops the LoRA branch's input); apply and merge ignore it.

Files (``load`` tells them apart, ``save`` writes either):
  ours   a folder with ``adapter.safetensors`` (keys ``blocks.<name>.a`` / ``.b``, our layout) and
         ``adapter.json`` (the LoraConfig and a description of the base model);
  peft   diffusers' ``pytorch_lora_weights.safetensors`` (``CogVideoXPipeline.save_lora_weights``):
         ``transformer.transformer_blocks.<i>.attn1.to_q.lora_A.weight`` [r, in], ``lora_B`` [out, r];
         alpha from the ``lora_adapter_metadata`` JSON when the file has it, else alpha = rank
         (what diffusers' ``load_lora_weights`` does for CogVideoX, which passes no network alphas).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from repvideo_jax import checkpoint_io
from repvideo_jax import transformer as T
from repvideo_jax.config import from_dict, to_dict
from repvideo_jax.outputs import atomic_write
from repvideo_jax.transformer import LORA_TARGETS, TransformerConfig, lora_kernel, lora_multiplier
from repvideo_jax.weights_common import CheckpointKeyError

log = logging.getLogger(__name__)

FORMAT = "repvideo-jax-lora"
WEIGHTS = "adapter.safetensors"  # ours
MANIFEST = "adapter.json"  # ours
PEFT_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PEFT_PREFIX = "transformer."
# Our Block linear -> its module path inside a diffusers CogVideoXBlock (docs/checkpoints.md).
PEFT_NAMES = {
  "to_q": "attn1.to_q",
  "to_k": "attn1.to_k",
  "to_v": "attn1.to_v",
  "to_out": "attn1.to_out.0",
  "ff_in": "ff.net.0.proj",
  "ff_out": "ff.net.2",
  "norm1_mod": "norm1.linear",
  "norm2_mod": "norm2.linear",
}
_PEFT_KEY = re.compile(
  r"^(?:transformer\.)?transformer_blocks\.(\d+)\.("
  + "|".join(re.escape(v) for v in PEFT_NAMES.values())
  + r")\.lora_([AB])\.weight$"
)
_OURS = {v: k for k, v in PEFT_NAMES.items()}
PEFT_DEFAULT_RANK_ALPHA = 8  # peft's LoraConfig defaults for r and lora_alpha


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What a LoRA adapts and its scaling. ``alpha`` None means alpha = rank (scaling 1)."""

  rank: int = 64
  alpha: float | None = None
  # The attention projections, as diffusers' CogVideoX LoRAs; also "ff_in", "ff_out" (MLP) and
  # "norm1_mod", "norm2_mod" (the AdaLN modulation linears).
  targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")
  dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
      raise ValueError(f"LoRA targets must be a tuple of names from {LORA_TARGETS}, got {self.targets!r}")
    object.__setattr__(self, "targets", tuple(self.targets))
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
    if self.alpha is not None and (
      isinstance(self.alpha, bool)
      or not isinstance(self.alpha, (int, float))
      or not math.isfinite(self.alpha)
      or self.alpha <= 0
    ):
      raise ValueError(
        f"LoRA alpha must be a finite number > 0 (or None for alpha = rank), got {self.alpha!r}"
      )
    unknown = [t for t in self.targets if t not in LORA_TARGETS]
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(
        f"LoRA targets must be distinct names from {LORA_TARGETS} (attention: to_q, to_k, to_v, "
        f"to_out; MLP: ff_in, ff_out; AdaLN modulation: norm1_mod, norm2_mod), got {self.targets!r}"
      )
    if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

  @property
  def lora_alpha(self) -> float:
    return float(self.rank if self.alpha is None else self.alpha)

  @property
  def scaling(self) -> float:
    """alpha / rank: what one unit of ``scale`` multiplies A @ B by (peft's rule)."""
    return self.lora_alpha / self.rank


# ----------------------------------------------------------------------------------------------
# Creating, describing and checking LoRA trees.


def _kernel_shape(config: TransformerConfig, name: str) -> tuple[int, int, int]:
  return tuple(T.abstract_params(config)["blocks"][name]["kernel"].shape)


def init(config: TransformerConfig, lora_cfg: LoraConfig, rng: int | jax.Array = 0) -> dict[str, Any]:
  """A fresh LoRA for ``config``: A as peft initialises it (kaiming-uniform with a = sqrt(5) on the
  [r, in] weight, i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero, so the model starts as the base model."""
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  dtype = T.DTYPES[config.param_dtype]
  blocks = {}
  for name, k in zip(lora_cfg.targets, jax.random.split(key, len(lora_cfg.targets))):
    layers, din, dout = _kernel_shape(config, name)
    bound = 1.0 / math.sqrt(din)
    blocks[name] = {
      "a": jax.random.uniform(k, (layers, din, lora_cfg.rank), dtype, -bound, bound),
      "b": jnp.zeros((layers, lora_cfg.rank, dout), dtype),
    }
  return {"alpha": jnp.asarray(lora_cfg.lora_alpha, jnp.float32), "blocks": blocks}


def logical_axes(config: TransformerConfig, lora_cfg: LoraConfig) -> dict[str, Any]:
  """The LoRA tree's logical axis names: A shards like its kernel's input axis, B like its output
  axis, both keep the kernel's leading ``layers`` axis; the rank axis is never sharded."""
  kernels = T.logical_axes(config)["blocks"]
  blocks = {}
  for name in lora_cfg.targets:
    layers, din, dout = kernels[name]["kernel"]
    blocks[name] = {"a": (layers, din, None), "b": (layers, None, dout)}
  return {"alpha": (), "blocks": blocks}


def trainable_mask(lora: dict[str, Any]) -> dict[str, Any]:
  """The tree with True on the factors and False on ``alpha`` (e.g. for ``optax.masked``): alpha is
  a constant whose gradient apply / merge stop, but weight decay would still shrink it."""
  return {"alpha": False, "blocks": jax.tree.map(lambda _: True, lora["blocks"])}


def config_of(lora: dict[str, Any], dropout: float = 0.0) -> LoraConfig:
  """The LoraConfig a tree implies (rank from its shapes; one rank for all targets)."""
  ranks = {name: ab["a"].shape[-1] for name, ab in lora["blocks"].items()}
  if len(set(ranks.values())) != 1:
    raise ValueError(f"a LoRA has one rank for all its targets; this tree has {ranks}")
  return LoraConfig(
    rank=next(iter(ranks.values())),
    alpha=float(np.asarray(lora["alpha"])),
    targets=tuple(lora["blocks"]),
    dropout=dropout,
  )


def check(lora: dict[str, Any], config: TransformerConfig, where: str = "LoRA") -> None:
  """Raises ValueError naming the mismatch when ``lora`` was made for another model than ``config``."""
  keys = set(lora)
  if not {"alpha", "blocks"} <= keys <= {"alpha", "blocks", "gates"} or not isinstance(
    lora["blocks"], Mapping
  ):
    raise ValueError(f"{where}: not a LoRA tree (expected keys alpha, blocks[, gates]; got {sorted(lora)})")
  if not lora["blocks"]:
    raise ValueError(f"{where}: the LoRA adapts no kernel (empty blocks)")
  if "gates" in lora:
    if not config.feature_cache:
      raise ValueError(
        f"{where}: holds RepVideo gate offsets, but this transformer has the feature cache off"
      )
    if tuple(np.shape(lora["gates"])) != (config.num_layers,):
      raise ValueError(
        f"{where}: gate offsets of shape {tuple(np.shape(lora['gates']))}, this transformer has "
        f"num_layers={config.num_layers} gates"
      )
  for name, ab in lora["blocks"].items():
    if name not in LORA_TARGETS:
      raise ValueError(f"{where}: adapts {name!r}, which is not one of the Block linears {LORA_TARGETS}")
    layers, din, dout = _kernel_shape(config, name)
    a, b = tuple(ab["a"].shape), tuple(ab["b"].shape)
    if len(a) != 3 or len(b) != 3 or a[0] != b[0] or a[2] != b[1]:
      raise ValueError(f"{where}: {name} factors have shapes a {a}, b {b}; expected (L, in, r), (L, r, out)")
    if a[0] != layers:
      raise ValueError(
        f"{where}: made for a model with {a[0]} layers, this transformer has num_layers={layers}"
      )
    if (a[1], b[2]) != (din, dout):
      raise ValueError(
        f"{where}: {name} adapts a ({a[1]}, {b[2]}) kernel, this transformer's is ({din}, {dout}) "
        f"(hidden size {config.hidden_size}, MLP {config.ff_dim}, time embedding {config.time_embed_dim}): "
        "the LoRA was made for another model"
      )


def merge(params: dict[str, Any], lora: dict[str, Any], scale: float | jax.Array = 1.0) -> dict[str, Any]:
  """Params with the LoRA folded into its kernels: kernel + scale * alpha / rank * A @ B per layer
  (and its gate offsets, when it has them, into the gates: gates + scale * offsets).
  Pure (``params`` is not modified; untouched subtrees are shared), jit and grad friendly. Several
  LoRAs: merge each in turn with its own scale."""
  blocks = dict(params["blocks"])
  for name, ab in lora["blocks"].items():
    module = dict(blocks[name])
    module["kernel"] = lora_kernel(module["kernel"], ab["a"], ab["b"], lora_multiplier(lora, name, scale))
    blocks[name] = module
  out = {**params, "blocks": blocks}
  if "gates" in lora:
    if "gates" not in params:
      raise ValueError(
        "the LoRA holds RepVideo gate offsets but the params have no gates (feature cache off)"
      )
    gates = params["gates"].astype(jnp.float32) + scale * jnp.asarray(lora["gates"], jnp.float32)
    out["gates"] = gates.astype(params["gates"].dtype)
  return out


# ----------------------------------------------------------------------------------------------
# diffusers / peft state dicts.


def to_peft(lora: dict[str, Any], lora_cfg: LoraConfig | None = None) -> tuple[dict[str, np.ndarray], dict]:
  """Our tree -> (diffusers state dict with torch layouts, ``lora_adapter_metadata`` dict). The metadata
  carries r and lora_alpha (keys prefixed ``transformer.`` as diffusers writes them), so diffusers
  and peft load the same scaling; write both with ``save(..., fmt="peft")``."""
  lora_cfg = lora_cfg or config_of(lora)
  state = {}
  for name, ab in lora["blocks"].items():
    a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
    for i in range(a.shape[0]):
      key = f"{PEFT_PREFIX}transformer_blocks.{i}.{PEFT_NAMES[name]}"
      state[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, in]
      state[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, r]
  config = {
    "r": lora_cfg.rank,
    "lora_alpha": float(np.asarray(lora["alpha"])),
    "lora_dropout": lora_cfg.dropout,
    "target_modules": sorted(PEFT_NAMES[name] for name in lora["blocks"]),
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
  }
  return state, {f"{PEFT_PREFIX}{k}": v for k, v in config.items()}


def _alpha_from_metadata(metadata: Mapping[str, Any] | None, rank: int, where: str) -> float:
  """alpha as diffusers' CogVideoX loader reads it: no metadata -> alpha = rank; metadata -> its
  ``lora_alpha`` (peft's default 8 when absent). Features it would apply that we do not are refused."""
  if metadata is None:
    return float(rank)
  meta = {k.removeprefix(PEFT_PREFIX): v for k, v in metadata.items() if k.startswith(PEFT_PREFIX)}
  refused = [k for k in ("use_rslora", "use_dora", "lora_bias") if meta.get(k)]
  refused += [k for k in ("rank_pattern", "alpha_pattern") if meta.get(k)]
  if refused:
    raise ValueError(
      f"{where}: the LoRA's metadata sets {refused} ({ {k: meta[k] for k in refused} }), which this "
      "package does not implement (one rank and alpha for every adapted kernel, plain LoRA)"
    )
  r = int(meta.get("r", PEFT_DEFAULT_RANK_ALPHA))
  if r != rank:
    raise ValueError(f"{where}: metadata says r={r} but the factors have rank {rank}")
  return float(meta.get("lora_alpha", PEFT_DEFAULT_RANK_ALPHA))


def from_peft(
  state: Mapping[str, Any],
  config: TransformerConfig | None = None,
  *,
  metadata: Mapping[str, Any] | None = None,
  where: str = "LoRA",
) -> tuple[LoraConfig, dict[str, Any]]:
  """A diffusers/peft CogVideoX LoRA state dict -> (LoraConfig, our tree of float32 arrays).

  ``metadata`` is the file's parsed ``lora_adapter_metadata`` (None when absent: alpha = rank).
  ``config`` (the transformer it will adapt) fixes the number of layers and checks the shapes;
  without it the layers are counted from the keys. A key that does not map to our model, or an A
  without its B, raises one CheckpointKeyError listing them all. Layers a target has no factors for
  (peft's ``layers_to_transform``) get zero factors, which adapt nothing."""
  found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  unknown = []
  for key, value in state.items():
    m = _PEFT_KEY.match(key)
    if m is None or (config is not None and int(m.group(1)) >= config.num_layers):
      unknown.append(key)
      continue
    found.setdefault(_OURS[m.group(2)], {}).setdefault(int(m.group(1)), {})[m.group(3)] = value
  missing = [
    f"{PEFT_PREFIX}transformer_blocks.{i}.{PEFT_NAMES[name]}.lora_{ab}.weight"
    for name, layers in found.items()
    for i, pair in layers.items()
    for ab in "AB"
    if ab not in pair
  ]
  if unknown or missing or not found:
    hints = []
    if any("lora_magnitude_vector" in k for k in unknown):
      hints.append("DoRA magnitude vectors are not supported (plain LoRA only).")
    if any(k.endswith(".bias") for k in unknown):
      hints.append("LoRA biases (peft lora_bias=True) are not supported.")
    if any(k.startswith("text_encoder.") for k in unknown):
      hints.append("text-encoder LoRAs are not supported (the transformer's only).")
    if config is not None and any(
      (m := _PEFT_KEY.match(k)) and int(m.group(1)) >= config.num_layers for k in unknown
    ):
      hints.append(f"some keys name layers >= num_layers={config.num_layers}: a LoRA for a deeper model.")
    raise CheckpointKeyError(
      f"{where}: LoRA keys do not map to the transformer's Block linears "
      f"({', '.join(f'{v} -> {k}' for k, v in PEFT_NAMES.items())}):\n"
      f"  unexpected ({len(unknown)}): {sorted(unknown)[:20]}{' ...' if len(unknown) > 20 else ''}\n"
      f"  missing ({len(missing)}): {sorted(missing)[:20]}{' ...' if len(missing) > 20 else ''}"
      + ("\n  no LoRA factors found" if not found and not unknown else "")
      + "".join(f"\n  {h}" for h in hints)
    )
  ranks = {np.shape(pair["A"])[0] for layers in found.values() for pair in layers.values()}
  if len(ranks) != 1:
    raise ValueError(
      f"{where}: factors of different ranks {sorted(ranks)} (per-module ranks are not supported)"
    )
  rank = ranks.pop()
  num_layers = config.num_layers if config is not None else 1 + max(i for ls in found.values() for i in ls)
  blocks = {}
  for name in (n for n in LORA_TARGETS if n in found):
    layers = found[name]
    first = next(iter(layers.values()))
    din, dout = np.shape(first["A"])[1], np.shape(first["B"])[0]
    if config is not None:
      want = _kernel_shape(config, name)[1:]
      if (din, dout) != want:
        raise CheckpointKeyError(
          f"{where}: {PEFT_NAMES[name]} LoRA adapts a ({din} -> {dout}) linear, the transformer's is "
          f"({want[0]} -> {want[1]}): the LoRA was made for another model"
        )
    a = np.zeros((num_layers, din, rank), np.float32)
    b = np.zeros((num_layers, rank, dout), np.float32)
    for i, pair in layers.items():
      key = f"transformer_blocks.{i}.{PEFT_NAMES[name]}"
      if np.shape(pair["A"]) != (rank, din) or np.shape(pair["B"]) != (dout, rank):
        raise CheckpointKeyError(
          f"{where}: {key} has lora_A {np.shape(pair['A'])} and lora_B {np.shape(pair['B'])}, "
          f"expected ({rank}, {din}) and ({dout}, {rank})"
        )
      a[i] = np.asarray(pair["A"], np.float32).T
      b[i] = np.asarray(pair["B"], np.float32).T
    absent = sorted(set(range(num_layers)) - set(layers))
    if absent:
      log.warning("%s: %s has no LoRA factors in layers %s (left unadapted)", where, PEFT_NAMES[name], absent)
    blocks[name] = {"a": a, "b": b}
  alpha = _alpha_from_metadata(metadata, rank, where)
  lora = {"alpha": np.asarray(alpha, np.float32), "blocks": blocks}
  dropout = float((metadata or {}).get(f"{PEFT_PREFIX}lora_dropout", 0.0) or 0.0)
  return LoraConfig(rank=rank, alpha=alpha, targets=tuple(blocks), dropout=dropout), lora


# ----------------------------------------------------------------------------------------------
# Files.


class LoadedLora(NamedTuple):
  """What ``load`` returns."""

  config: LoraConfig
  lora: dict[str, Any]  # the tree (NumPy arrays)
  format: str  # "ours" or "peft"
  base: dict[str, Any] | None  # ours: the base model description saved with it


def base_description(config: TransformerConfig, base_path: str | pathlib.Path | None = None) -> dict:
  """What ``adapter.json`` records about the base model: its transformer config and, for one of our
  converted folders (or a model folder holding one), a SHA-256 over its recorded file checksums."""
  out: dict[str, Any] = {"transformer": to_dict(config)}
  if base_path is not None:
    base_path = pathlib.Path(base_path)
    meta = base_path / "metadata.json"
    if not meta.exists() and (base_path / "transformer" / "metadata.json").exists():
      meta = base_path / "transformer" / "metadata.json"
    out["path"] = str(base_path)
    if meta.exists():
      checksums = json.loads(meta.read_text()).get("checksums")
      if checksums:
        out["checksums_sha256"] = hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()
  return out


def detect_format(path: str | pathlib.Path) -> tuple[str, pathlib.Path]:
  """("ours", folder) or ("peft", safetensors file) for a LoRA path; FileNotFoundError saying what
  was found otherwise."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no LoRA at {path}")
  if path.is_file():
    if path.suffix != ".safetensors":
      raise ValueError(f"{path}: a LoRA file must be a .safetensors file (diffusers' {PEFT_WEIGHTS})")
    return "peft", path
  if (path / MANIFEST).is_file() and (path / WEIGHTS).is_file():
    return "ours", path
  if (path / PEFT_WEIGHTS).is_file():
    return "peft", path / PEFT_WEIGHTS
  found = sorted(p.name for p in path.iterdir())[:20]
  raise FileNotFoundError(
    f"{path} is not a LoRA folder: expected {MANIFEST} + {WEIGHTS} (ours) or {PEFT_WEIGHTS} "
    f"(diffusers); found {found}"
  )


def read_peft_metadata(path: str | pathlib.Path) -> dict[str, Any] | None:
  """The parsed ``lora_adapter_metadata`` of a diffusers LoRA file, or None when it has none."""
  with safe_open(str(path), framework="numpy") as f:
    raw = (f.metadata() or {}).get(PEFT_METADATA_KEY)
  if not raw:
    return None
  try:
    meta = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: {PEFT_METADATA_KEY} is not valid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{path}: {PEFT_METADATA_KEY} must be a JSON object")
  return meta


def load(path: str | pathlib.Path, config: TransformerConfig | None = None) -> LoadedLora:
  """Reads a LoRA in either format. With ``config`` the LoRA is checked against that transformer
  (layers and shapes; a mismatch is a ValueError naming it)."""
  fmt, src = detect_format(path)
  if fmt == "peft":
    state = checkpoint_io.read_safetensors(src)
    lora_cfg, lora = from_peft(state, config, metadata=read_peft_metadata(src), where=str(src))
    base = None
  else:
    try:
      manifest = json.loads((src / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{src / MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
      raise ValueError(f"{src / MANIFEST} is not a {FORMAT} manifest")
    lora_cfg = from_dict(LoraConfig, manifest["lora"], where=str(src / MANIFEST))
    blocks: dict[str, dict[str, np.ndarray]] = {}
    gates = None
    for key, value in checkpoint_io.read_safetensors(src / WEIGHTS, mmap=False).items():
      if key == "gates":
        gates = value.astype(np.float32)
        continue
      parts = key.split(".")
      if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in ("a", "b"):
        raise CheckpointKeyError(
          f"{src / WEIGHTS}: unexpected key {key!r} (expected blocks.<name>.a / .b, and gates)"
        )
      blocks.setdefault(parts[1], {})[parts[2]] = value
    if set(blocks) != set(lora_cfg.targets) or any(set(ab) != {"a", "b"} for ab in blocks.values()):
      raise CheckpointKeyError(
        f"{src}: the weights hold {sorted(blocks)} but {MANIFEST} names targets {list(lora_cfg.targets)}"
      )
    blocks = {name: blocks[name] for name in lora_cfg.targets}  # the config's order
    lora = {"alpha": np.asarray(lora_cfg.lora_alpha, np.float32), "blocks": blocks}
    if gates is not None:
      lora["gates"] = gates
    base = manifest.get("base")
  if config is not None:
    check(lora, config, where=str(path))
    stored = (base or {}).get("transformer")
    if stored:
      execution = {"dtype", "param_dtype", "scan_layers", "remat", "attention_backend"}
      differ = sorted(k for k, v in to_dict(config).items() if k not in execution and stored.get(k, v) != v)
      if differ:
        log.warning("%s was made for a transformer that differs in %s", path, differ)
  return LoadedLora(lora_cfg, lora, fmt, base)


def save(
  path: str | pathlib.Path,
  lora: dict[str, Any],
  lora_cfg: LoraConfig | None = None,
  *,
  fmt: str = "ours",
  base: dict[str, Any] | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes a LoRA: ``fmt="ours"`` a folder (``adapter.safetensors`` + ``adapter.json`` recording
  ``lora_cfg`` and ``base``, e.g. ``base_description(config)``); ``fmt="peft"`` diffusers'
  ``pytorch_lora_weights.safetensors`` with its metadata, in the folder ``path`` (or at ``path``
  when it ends in .safetensors). Files are replaced atomically. Returns what was written."""
  lora_cfg = lora_cfg or config_of(lora)
  if set(lora["blocks"]) != set(lora_cfg.targets) or float(np.asarray(lora["alpha"])) != lora_cfg.lora_alpha:
    raise ValueError(
      f"the LoRA tree (targets {list(lora['blocks'])}, alpha {float(np.asarray(lora['alpha']))}) does not "
      f"match its config (targets {list(lora_cfg.targets)}, alpha {lora_cfg.lora_alpha})"
    )
  path = pathlib.Path(path)
  if fmt == "peft":
    target = path if path.suffix == ".safetensors" else path / PEFT_WEIGHTS
    if target.exists() and not overwrite:
      raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    if "gates" in lora:
      log.warning(
        "%s: diffusers' LoRA format has no place for RepVideo gate offsets; written without them "
        "(our format keeps them)",
        target,
      )
    state, adapter_metadata = to_peft(lora, lora_cfg)
    metadata = {"format": "pt", PEFT_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True)}
    checkpoint_io.write_safetensors(target, state, metadata)
    return target
  if fmt != "ours":
    raise ValueError(f"LoRA format must be 'ours' or 'peft', got {fmt!r}")
  if path.exists() and not path.is_dir():
    raise ValueError(f"{path} is a file; our LoRA format is a folder")
  if (path / MANIFEST).exists() and not overwrite:
    raise FileExistsError(f"{path} already holds a LoRA; pass overwrite=True (--overwrite) to replace it")
  tensors = {
    f"blocks.{name}.{k}": np.asarray(v) for name, ab in lora["blocks"].items() for k, v in ab.items()
  }
  if "gates" in lora:
    tensors["gates"] = np.asarray(lora["gates"], np.float32)
  layers = int(np.shape(next(iter(lora["blocks"].values()))["a"])[0])
  manifest = {
    "format": FORMAT,
    "version": 1,
    "lora": to_dict(lora_cfg),
    "base": {
      "num_layers": layers,
      "kernels": {
        n: [int(np.shape(ab["a"])[1]), int(np.shape(ab["b"])[2])] for n, ab in lora["blocks"].items()
      },
      **(base or {}),
    },
  }
  checkpoint_io.write_safetensors(path / WEIGHTS, tensors)  # atomic (outputs.atomic_write)
  atomic_write(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: marks the folder complete
  return path
