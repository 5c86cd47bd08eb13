"""Helpers shared by the ``*_weights`` modules: nested-dict paths and strict param checks."""

from __future__ import annotations

from typing import Any, Iterator


class CheckpointKeyError(ValueError):
  """A checkpoint's keys or shapes do not match the model config."""


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


def check_param_shapes(params: dict, abstract: dict, what: str) -> None:
  """Raises CheckpointKeyError unless ``params`` has exactly ``abstract``'s leaves and shapes."""
  want, have = dict(flatten(abstract)), dict(flatten(params))
  if set(want) != set(have):
    raise CheckpointKeyError(
        f"converted {what} params do not match the config: missing "
        f"{sorted(map('.'.join, map(lambda p: map(str, p), set(want) - set(have))))[:20]}, unexpected "
        f"{sorted(map('.'.join, map(lambda p: map(str, p), set(have) - set(want))))[:20]}")
  for path, leaf in want.items():
    if tuple(have[path].shape) != tuple(leaf.shape):
      raise CheckpointKeyError(f"shape mismatch for {'.'.join(map(str, path))}: checkpoint gives "
                               f"{tuple(have[path].shape)}, config expects {tuple(leaf.shape)}")
