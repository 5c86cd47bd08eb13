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
    # Attention (attention.py) takes q/k/v as (activation_batch, activation_length, activation_heads)
    # and, inside a shard_map, swaps the context split from the sequence to the heads with one
    # all-to-all (Ulysses-style context parallelism), so each device sees the whole sequence for
    # num_heads / (tensor * context) heads.
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    # AdaLN modulation kernels (time_embed -> 6 or 12 x hidden): 21% of the 2B's params, so sharded
    # over fsdp as well (their input dim, time_embed, is too small to split).
    "modulation": ("tensor", "fsdp"),
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


def parse_mesh(text: str) -> dict[str, int]:
  """``'data=2,context=2'`` -> {'data': 2, 'fsdp': 1, 'tensor': 1, 'context': 2}."""
  out = dict.fromkeys(MESH_AXES, 1)
  for part in text.split(","):
    key, _, value = part.partition("=")
    if key.strip() not in out or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: use axis=size pairs over {list(out)}, e.g. data=2,context=2")
    out[key.strip()] = int(value)
  return out


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


def active_mesh():
  """The mesh set with ``jax.set_mesh`` (an AbstractMesh inside jit), or None when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def target_platform(*arrays) -> str:
  """The platform the computation is placed on: the active mesh's devices, else the devices of a
  concrete input array, else JAX's default backend. A CPU host compiling for a TPU topology (with the
  topology's mesh set) gets ``'tpu'``; ``jax.default_backend()`` alone would say ``'cpu'``."""
  mesh = active_mesh()
  if mesh is not None:
    return mesh.abstract_device.platform
  for x in arrays:
    devices = getattr(getattr(x, "sharding", None), "device_set", None)
    if devices and not isinstance(x, jax.core.Tracer):
      return next(iter(devices)).platform
  return jax.default_backend()


def mesh_size(mesh, axes: str | Sequence[str] | None) -> int:
  """Number of devices along the named mesh axes (1 for None or an empty tuple)."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def batch_sharding(mesh, batch: int) -> NamedSharding:
  """Inputs of ``batch`` examples: split over the mesh's batch axes when they divide it, else
  replicated (e.g. one video on a data=2 mesh; its CFG pair, made inside, is what gets split)."""
  axes = logical_to_spec(("activation_batch",))[0]
  if batch % mesh_size(mesh, axes):
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(axes))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation; a no-op when no mesh is active (single device, tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))
