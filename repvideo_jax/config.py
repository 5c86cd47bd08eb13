"""Typed configuration: dataclasses, YAML presets in ``configs/`` and ``key=value`` overrides.

A preset is a YAML file whose top-level keys are sections (``transformer:``, later ``vae:``,
``train:`` ...). Each section maps onto a frozen dataclass; unknown keys are errors, so a typo in a
preset or on the command line is caught instead of silently ignored.

The presets live in the repository's top-level ``configs/`` folder, which the package build installs
as the package-data package ``repvideo_jax.configs`` (pyproject.toml maps one onto the other), so an
installed package finds them with ``importlib.resources``; a source checkout or an editable install,
where no such package exists, reads the folder itself.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import importlib.resources.abc
import math
import pathlib
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

SOURCE_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"  # in a checkout
PRESET_PACKAGE = "repvideo_jax.configs"  # the same files, installed as package data

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
  """Converts YAML/JSON values into the dataclass field's type (tuples, floats from ints, ...)."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
    if value is None and type(None) in args:
      return None
    non_none = [a for a in args if a is not type(None)]
    if len(non_none) == 1:
      return _coerce(value, non_none[0], where)
    # X | tuple[X, ...] (one value or a list): a list takes the sequence arm, anything else the other
    sequences = [a for a in non_none if typing.get_origin(a) in (tuple, list)]
    others = [a for a in non_none if a not in sequences]
    if isinstance(value, (list, tuple)) and len(sequences) == 1:
      return _coerce(value, sequences[0], where)
    if not isinstance(value, (list, tuple)) and len(others) == 1:
      return _coerce(value, others[0], where)
    return value
  if origin is typing.Literal:
    if value not in args:
      raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
    return value
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{where}: expected a list, got {value!r}")
    item = args[0] if args else Any
    return (
      tuple(_coerce(v, item, where) for v in value)
      if origin is tuple
      else [_coerce(v, item, where) for v in value]
    )
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if annotation is float and isinstance(value, str):
    try:
      return float(value)  # YAML reads "1e-5" as a string
    except ValueError:
      raise ValueError(f"{where}: expected float, got {value!r}") from None
  if annotation in (int, float, bool, str) and not isinstance(value, annotation):
    raise ValueError(f"{where}: expected {annotation.__name__}, got {value!r}")
  return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
  """Builds dataclass ``cls`` from a mapping; unknown keys raise ValueError listing the valid ones."""
  where = where or cls.__name__
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
  kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
  return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
  """Dataclass -> plain dict with lists instead of tuples (YAML/JSON friendly)."""

  def plain(v):
    if isinstance(v, tuple):
      return [plain(x) for x in v]
    if isinstance(v, Mapping):
      return {k: plain(x) for k, x in v.items()}
    return v

  return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def preset_dir() -> importlib.resources.abc.Traversable:
  """The folder of the bundled presets: the installed ``repvideo_jax.configs`` package data, or, when
  that package is absent (a source checkout or an editable install), the checkout's ``configs/``."""
  try:
    return importlib.resources.files(PRESET_PACKAGE)
  except ModuleNotFoundError:
    return SOURCE_CONFIG_DIR


def preset_path(name_or_path: str | pathlib.Path) -> pathlib.Path:
  """Resolves a preset name (``repvideo-2b``) or a path to a YAML file."""
  path = pathlib.Path(name_or_path)
  if path.suffix in (".yaml", ".yml") and path.exists():
    return path
  folder = preset_dir()
  candidate = folder.joinpath(f"{name_or_path}.yaml")
  if candidate.is_file():
    return pathlib.Path(candidate)  # the package is installed as files on disk (it ships weight folders)
  available = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
  raise FileNotFoundError(
    f"config preset {str(name_or_path)!r} not found: pass a YAML file path or one of {available}"
  )


def parse_override(text: str) -> tuple[list[str], Any]:
  """``'transformer.num_layers=4'`` -> (['transformer', 'num_layers'], 4). Values are parsed as YAML."""
  if "=" not in text:
    raise ValueError(f"override {text!r} must look like section.key=value")
  key, raw = text.split("=", 1)
  return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """Applies ``key=value`` overrides to a nested dict (returns a new dict)."""
  tree = copy.deepcopy(tree)
  for text in overrides:
    path, value = parse_override(text)
    node = tree
    for part in path[:-1]:
      if not isinstance(node.get(part, {}), dict):
        raise ValueError(f"override {text!r}: {part!r} is not a section")
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def load_yaml(name_or_path: str | pathlib.Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Reads a preset (by name or path) and applies overrides; returns the nested dict."""
  with open(preset_path(name_or_path)) as f:
    tree = yaml.safe_load(f) or {}
  return apply_overrides(tree, overrides)


def load_section(
  cls: type[T], section: str, name_or_path: str | pathlib.Path, overrides: Sequence[str] = ()
) -> T:
  """One typed section of a preset, e.g. ``load_section(TransformerConfig, 'transformer', 'tiny')``.

  Overrides may be given as ``section.key=value`` or, for this section, plain ``key=value``.
  """
  overrides = [o if o.split("=", 1)[0].count(".") else f"{section}.{o}" for o in overrides]
  tree = load_yaml(name_or_path, overrides)
  if section not in tree:
    raise ValueError(f"preset {str(name_or_path)!r} has no {section!r} section (has {sorted(tree)})")
  return from_dict(cls, tree[section] or {}, where=f"{name_or_path}:{section}")


def parse_lora_arg(text: str, flag: str = "--lora") -> tuple[pathlib.Path, float]:
  """``PATH[:SCALE]``, a command line's ``--lora`` (``repvideo_jax.lora``) -> (path, scale), the scale
  1.0 when not given. A path that itself holds ':' is taken whole when what follows its last ':' is
  not a number. Raises ValueError naming ``flag``."""
  path, scale = text, 1.0
  head, sep, tail = text.rpartition(":")
  if sep and head:
    try:
      path, scale = head, float(tail)
    except ValueError:
      path, scale = text, 1.0
  if not math.isfinite(scale):
    raise ValueError(f"{flag} {text}: the scale must be a finite number, got {scale}")
  if not pathlib.Path(path).exists():
    raise ValueError(f"{flag} {text}: no LoRA at {path}")
  return pathlib.Path(path), scale
