"""The pure functional boundary shared by every NNX model in the package, and their small helpers.

``Functional(ModelClass)`` gives, for a hashable config: ``create`` (an NNX module with fresh
weights), ``abstract_params`` (ShapeDtypeStruct tree, nothing allocated), ``logical_axes`` (axis
names per leaf, for ``sharding.py``; stacked layer subtrees gain a leading ``layers`` axis),
``split_params`` / ``merge`` (module <-> plain nested dict of arrays; ``merge`` is cheap and works
inside ``jax.jit``) and ``init`` (fresh params as a plain dict).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "save_dots")


def annotate(init, axes):
  """Attaches logical axis names to an initializer (mapped to the mesh in ``sharding.py``)."""
  return nnx.with_metadata(init, logical_axes=tuple(axes))


def remat(fn, policy: str):
  """Wraps a layer-step function in the configured rematerialisation policy."""
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  if policy == "save_dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {policy!r}")


class Functional:
  def __init__(self, module_cls, stacked: tuple[str, ...] = ("blocks",)):
    self.module_cls = module_cls
    self.stacked = stacked
    self._abstract = functools.lru_cache(maxsize=32)(self._build_abstract)

  def create(self, config: Hashable, rng: int | jax.Array = 0):
    """The NNX module with freshly initialised weights."""
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    return self.module_cls(config, rngs=nnx.Rngs(params=key))

  def _build_abstract(self, config):
    """(graphdef, abstract param state) of a config, without allocating weights."""
    return nnx.split(nnx.eval_shape(lambda: self.create(config, 0)), nnx.Param)

  def abstract_params(self, config) -> dict[str, Any]:
    """The param tree of ``config`` as jax.ShapeDtypeStruct leaves."""
    _, state = self._abstract(config)
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))

  def logical_axes(self, config) -> dict[str, Any]:
    """The param tree of ``config`` with each leaf's logical axis names (tuples), for sharding."""
    _, state = self._abstract(config)

    def names(path, var):
      axes = tuple(var.get_metadata().get("logical_axes") or ())
      if path[0] in self.stacked:
        axes = ("layers",) + axes
      return axes if len(axes) == len(var.shape) else (None,) * len(var.shape)

    flat = nnx.to_flat_state(state)
    return nnx.to_pure_dict(nnx.from_flat_state([(path, nnx.Param(names(path, v))) for path, v in flat]))

  @staticmethod
  def split_params(model) -> dict[str, Any]:
    """NNX module -> plain nested dict of param arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def merge(self, config, params: dict[str, Any]):
    """Plain param dict -> NNX module (cheap; usable inside jit)."""
    graphdef, state = self._abstract(config)
    state = jax.tree.map(lambda x: x, state)  # a fresh copy of the abstract state to fill in
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)

  def init(self, config, rng: int | jax.Array = 0) -> dict[str, Any]:
    """Fresh params for ``config`` as a plain nested dict of arrays."""
    return self.split_params(self.create(config, rng))
