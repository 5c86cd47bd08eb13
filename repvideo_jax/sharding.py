"""The one place that defines the device mesh and how logical axes map onto it.

Models annotate parameters and activations with *logical* axis names (``embed``, ``heads``,
``mlp``, ``activation_batch`` ...). ``LOGICAL_RULES`` maps each to zero or more mesh axes of the
mesh ``(data, fsdp, tensor, context)``. Models never see the mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical axis -> mesh axes (a tuple shards over several, None replicates)
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "activation_batch": ("data", "fsdp"),
    "activation_length": "context",
    "activation_embed": None,
    "activation_heads": "tensor",
    # Inside attention the full sequence is needed: heads are split over tensor *and* context, so
    # sequence-sharded activations are exchanged with one all-to-all (Ulysses-style context
    # parallelism) instead of gathering K/V. Needs num_heads divisible by tensor * context.
    "activation_attn_heads": ("tensor", "context"),
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "modulation": "tensor",
    "text_embed": None,
    "patch": None,
    "time_embed": None,
    "norm": None,
    "layers": None,
    "conv_in": None,  # VAE convolutions: small, replicated
    "conv_out": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor, context) mesh; ``-1`` for data takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [data, fsdp, tensor, context]
  fixed = int(np.prod([s for s in shape if s != -1]))
  if shape.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  if -1 in shape:
    if len(devices) % fixed:
      raise ValueError(f"{len(devices)} devices do not divide into fsdp*tensor*context={fixed}")
    shape[shape.index(-1)] = len(devices) // fixed
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None] | None,
                    rules: dict[str, tuple[str, ...] | str | None] | None = None) -> P:
  """Turns a tuple of logical axis names into a PartitionSpec; unknown names raise."""
  rules = LOGICAL_RULES if rules is None else rules
  if logical_axes is None:
    return P()
  out, used = [], set()
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_RULES")
    mesh_axes = rules[name]
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used)  # a mesh axis shards one dim only
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*out)


def tree_shardings(logical_tree, mesh: Mesh, rules=None):
  """A tree of logical-axis tuples (e.g. ``transformer.logical_axes(cfg)``) -> NamedShardings."""
  return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, rules)), logical_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation; a no-op when no mesh is active (single device, tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))
