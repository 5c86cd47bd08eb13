"""The one weight-conversion engine behind ``transformer_weights``, ``vae_weights`` and
``text_encoder_weights``.

A component module describes its checkpoints as data: a list of :class:`Rule` (which source tensor
fills which param, and the layout change on the way) and a :class:`Component` (the markers that tell
its folder formats apart, its config class and param tree). Everything else lives here:

* :func:`convert` turns a flat source state dict into our nested params, with strict accounting:
  every source key must be used or ignored and every param filled, else one ``CheckpointKeyError``
  lists the missing and unexpected keys; every tensor's shape is checked against the config.
* :func:`locate` / :func:`detect_format` tell which format a path holds.
* :func:`save_converted` / :func:`load_converted` / :func:`read_converted_config` handle our own
  converted folder (``checkpoint_io.save_params`` + a ``metadata.json`` naming the component and
  its config), with the checksum verification of ``checkpoint_io.load_params``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from repvideo_jax import checkpoint_io
from repvideo_jax.config import from_dict, to_dict
from repvideo_jax.functional import DTYPES


class CheckpointKeyError(ValueError):
  """A checkpoint's keys or shapes do not match the model config."""


# ----------------------------------------------------------------------------------------------
# Nested-dict paths.


def flatten(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """(path, leaf) pairs of a nested dict, depth first."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def set_path(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _dotted(path: tuple) -> str:
  return ".".join(map(str, path))


def nonfinite(params: dict) -> list[str]:
  """Dotted names of the leaves holding NaN or inf values."""
  return [_dotted(path) for path, a in flatten(params) if not np.isfinite(np.asarray(a)).all()]


def check_param_shapes(params: dict, abstract: dict, what: str) -> None:
  """Raises CheckpointKeyError unless ``params`` has exactly ``abstract``'s leaves and shapes."""
  want, have = dict(flatten(abstract)), dict(flatten(params))
  if set(want) != set(have):
    raise CheckpointKeyError(
      f"converted {what} params do not match the config: missing "
      f"{sorted(map(_dotted, set(want) - set(have)))[:20]}, unexpected "
      f"{sorted(map(_dotted, set(have) - set(want)))[:20]}"
    )
  for path, leaf in want.items():
    if tuple(have[path].shape) != tuple(leaf.shape):
      raise CheckpointKeyError(
        f"shape mismatch for {_dotted(path)}: checkpoint gives "
        f"{tuple(have[path].shape)}, config expects {tuple(leaf.shape)}"
      )


# ----------------------------------------------------------------------------------------------
# Rule tables.


def same(a: np.ndarray) -> np.ndarray:
  """The identity layout (norm scales, biases, embeddings)."""
  return a


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """A PyTorch linear weight [out, in] as our kernel [in, out]."""
  return np.ascontiguousarray(np.asarray(w).T)


class Rule(NamedTuple):
  """One tensor of a checkpoint and where it goes.

  ``source`` is the checkpoint key, or a tuple of names of one tied tensor (the first present is
  used, all present ones are consumed and must agree). ``target`` is the path in our param tree;
  with ``layer`` set the result fills row ``layer`` of that stacked (layers-first) param.
  ``transform`` changes the layout (PyTorch -> channels last). ``fallback`` makes the tensor
  optional: when it is the only kind of key missing, ``fallback()`` gives the value (or raises).
  """

  source: str | tuple[str, ...]
  target: tuple
  transform: Callable[[np.ndarray], np.ndarray] = same
  layer: int | None = None
  fallback: Callable[[], np.ndarray] | None = None


def _names(rule: Rule) -> tuple[str, ...]:
  return (rule.source,) if isinstance(rule.source, str) else tuple(rule.source)


def _ignored(key: str, ignore: Sequence[str]) -> bool:
  return any(key.startswith(p) if p.endswith(".") else key == p for p in ignore)


def _listing(keys: Sequence[str], limit: int = 20) -> str:
  return f"({len(keys)}): {list(keys[:limit])}{' ...' if len(keys) > limit else ''}"


def convert(
  state: Mapping[str, Any],
  rules: Sequence[Rule],
  abstract: dict,
  *,
  dtype: Any,
  what: str,
  config_note: str = "",
  ignore: Iterable[str] = (),
  hints: Sequence[tuple[str | tuple[str, ...], str]] = (),
  advice: str = "Check the checkpoint format and that the config matches the checkpoint.",
  progress: bool = False,
) -> dict[str, Any]:
  """Builds our nested params (of ``dtype``, shaped like ``abstract``) from a flat ``state`` dict.

  Keys are accounted for before any tensor is read: a rule's key absent from ``state`` (and with
  no ``fallback``, or missing along with others) or a key of ``state`` that no rule uses and
  ``ignore`` does not name (an entry ending in "." names every key under it) raises one
  ``CheckpointKeyError`` listing both, headed by ``what`` and ``config_note`` and ending with
  ``advice``; ``hints`` are (key prefixes, text) pairs whose text is added when an unexpected key
  starts with one of the prefixes. Tensors are then converted one at a time into preallocated
  arrays, so the peak memory is the output plus one tensor (``state`` may be a lazy memory map).
  """
  ignore = tuple(ignore)
  used = {k for k in state if _ignored(k, ignore)}
  missing: list[str] = []
  problems: list[str] = []
  optional: list[Rule] = []
  for rule in rules:
    present = [k for k in _names(rule) if k in state]
    used.update(present)
    if not present:
      name = " or ".join(_names(rule))
      if rule.fallback is not None:
        optional.append(rule)
      if name not in missing:
        missing.append(name)
    for other in present[1:]:
      a, b = state[present[0]], state[other]
      if not (tuple(a.shape) == tuple(b.shape) and np.array_equal(a, b)):
        problems.append(
          f"{present[0]} and {other} are both present but differ (they name one tied "
          "tensor; this checkpoint is inconsistent)"
        )
  if set(missing) == {" or ".join(_names(r)) for r in optional}:
    missing = []  # only optional tensors are absent (if any): their fallbacks fill them in
  else:
    optional = []
  fallbacks = {id(r): np.asarray(r.fallback()) for r in optional}  # (may raise, or warn)
  unknown = sorted(set(state) - used)
  if missing or unknown or problems:
    notes = [text for prefixes, text in hints if any(k.startswith(prefixes) for k in unknown)]
    raise CheckpointKeyError(
      f"{what} checkpoint keys do not match the config{f' ({config_note})' if config_note else ''}:\n"
      f"  missing from checkpoint {_listing(missing)}\n"
      f"  unexpected in checkpoint {_listing(unknown)}"
      + "".join(f"\n  {line}" for line in problems + notes)
      + f"\n{advice}"
    )

  target = dict(flatten(abstract))
  dtype = np.dtype(dtype)
  out = {path: np.empty(leaf.shape, dtype) for path, leaf in target.items()}
  filled: set[tuple[tuple, int | None]] = set()
  items: Iterable[Rule] = rules
  if progress:
    items = tqdm(rules, desc=f"converting {what}", unit="tensor")
  for rule in items:
    if rule.target not in target:
      raise CheckpointKeyError(
        f"internal {what} name map error: {rule.source} maps to "
        f"{_dotted(rule.target)}, which the model does not have"
      )
    if id(rule) in fallbacks:
      name, arr = " or ".join(_names(rule)), fallbacks[id(rule)]
    else:
      name = next(k for k in _names(rule) if k in state)
      arr = rule.transform(np.asarray(state[name]))
    leaf = target[rule.target]
    want = tuple(leaf.shape) if rule.layer is None else tuple(leaf.shape[1:])
    where = _dotted(rule.target) + ("" if rule.layer is None else f"[{rule.layer}]")
    if tuple(arr.shape) != want:
      raise CheckpointKeyError(
        f"shape mismatch for {name} -> {where}: checkpoint gives {tuple(arr.shape)}, config expects {want}"
      )
    if rule.layer is None:
      out[rule.target][...] = arr
    else:
      out[rule.target][rule.layer] = arr
    filled.add((rule.target, rule.layer))
  layered = {path for path, layer in filled if layer is not None}
  unmapped = [_dotted(path) for path in target if path not in layered and (path, None) not in filled]
  unmapped += [
    f"{_dotted(path)}[{i}]"
    for path in layered
    for i in range(target[path].shape[0])
    if (path, i) not in filled
  ]
  if unmapped:  # the rules and the module tree must agree (a bug if not)
    raise CheckpointKeyError(f"internal {what} name map error: no rule fills {sorted(unmapped)[:10]}")
  params: dict[str, Any] = {}
  for path, arr in out.items():
    set_path(params, path, arr)
  return params


# ----------------------------------------------------------------------------------------------
# Formats on disk.


@dataclasses.dataclass(frozen=True)
class Component:
  """What the shared loaders need to know about one model part.

  ``markers`` are (name inside a folder, format it marks), tried in order after our own format
  (``metadata.json`` + ``params/``); a folder with none of them but a ``name`` sub-folder (a
  pipeline folder) is looked into. A single file is format ``file_format`` when its suffix is in
  ``file_suffixes``; other files get ``file_error``. ``expected`` says what a folder should hold.
  """

  name: str  # metadata.json's "component", and the sub-folder of a pipeline folder
  label: str  # how messages call it
  config_cls: type
  abstract: Callable[[Any], dict]  # config -> tree of ShapeDtypeStruct
  markers: tuple[tuple[str, str], ...]
  expected: str
  file_error: str
  file_suffixes: tuple[str, ...] = ()
  file_format: str = "sat"


def locate(path: str | pathlib.Path, component: Component) -> tuple[str, pathlib.Path]:
  """(format, path to read) for a checkpoint path: 'ours' or one of ``component``'s marker
  formats; the path is the component's sub-folder when ``path`` is a pipeline folder."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path} (nothing there to load the {component.label} from)")
  if path.is_file():
    if path.suffix in component.file_suffixes:
      return component.file_format, path
    raise ValueError(f"{path}: {component.file_error}")
  if (path / "metadata.json").exists() and (path / "params").exists():
    return "ours", path
  for name, fmt in component.markers:
    if (path / name).exists():
      return fmt, path
  if (path / component.name).is_dir():
    return locate(path / component.name, component)
  raise FileNotFoundError(
    f"{path} is not a {component.label} checkpoint: expected {component.expected}; found "
    f"{sorted(p.name for p in path.iterdir())[:20]}"
  )


def detect_format(path: str | pathlib.Path, component: Component) -> str:
  """The format :func:`locate` finds at ``path``."""
  return locate(path, component)[0]


def save_converted(
  path: str | pathlib.Path,
  component: Component,
  config: Any,
  params: dict[str, Any],
  *,
  source: str | None = None,
  overwrite: bool = False,
) -> None:
  """Writes our converted format: orbax params plus ``metadata.json`` with the component's name,
  its config and where the weights came from (plus the checksums ``save_params`` adds)."""
  checkpoint_io.save_params(
    path,
    params,
    overwrite=overwrite,
    metadata={"component": component.name, "config": to_dict(config), "source": source},
  )


def read_converted_config(path: str | pathlib.Path, component: Component) -> Any:
  """The config stored in a converted folder, without reading the weights."""
  meta = json.loads((pathlib.Path(path) / "metadata.json").read_text())
  return from_dict(component.config_cls, meta["config"], where=f"{path}/metadata.json")


def load_converted(
  path: str | pathlib.Path,
  component: Component,
  config: Any = None,
  *,
  overrides: Mapping[str, Any] | None = None,
  verify: bool = True,
  untagged_ok: bool = False,
  adjust: Callable[[Any, dict], dict] | None = None,
) -> tuple[Any, dict[str, Any]]:
  """Reads a converted folder of ``component``. Returns (config, params).

  The config is ``config`` if given, else the stored one with ``overrides`` applied. ``adjust``
  may reshape the params for that config (e.g. add or drop optional tensors) before they are
  checked against it and cast to its ``param_dtype``. ``verify`` checks the files against the
  SHA-256 recorded at save time; ``untagged_ok`` accepts a folder whose metadata names no
  component (written before components were recorded).
  """
  params, meta = checkpoint_io.load_params(path, verify=verify)
  found = meta.get("component", component.name if untagged_ok else None)
  if found != component.name:
    raise ValueError(f"{path} holds a converted {found!r}, not a {component.name}")
  stored = from_dict(component.config_cls, meta["config"], where=f"{path}/metadata.json")
  cfg = config or dataclasses.replace(stored, **(overrides or {}))
  if adjust is not None:
    params = adjust(cfg, params)
  check_param_shapes(params, component.abstract(cfg), component.label)
  dtype = np.dtype(DTYPES[cfg.param_dtype])
  return cfg, jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
