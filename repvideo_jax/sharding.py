"""The one place that defines the device mesh and how logical axes map onto it.

Models annotate parameters and activations with *logical* axis names (``embed``, ``heads``,
``mlp``, ``activation_batch`` ...); a rule table maps each name to zero or more axes of the mesh
``(data, fsdp, tensor, context)``. Models never see the mesh or the table:

  * ``MeshConfig`` is the ``mesh:`` section of a training preset: axis sizes, data-parallel slices
    over DCN, the TPU topology it is meant for, and ``logical_axis_rules`` -- the rule table, as
    data. A preset (or ``mesh.logical_axis_rules.embed=null`` on the command line) overrides some
    entries; the rest keep ``DEFAULT_LOGICAL_RULES``.
  * ``build_mesh(config)`` / ``make_mesh(...)`` build the mesh, within one slice or across slices.
  * ``logical_rules(table)`` makes a table the active one while a program is traced (``activate``
    sets it with the mesh); ``constrain``, ``logical_to_spec``, ``tree_shardings`` and
    ``batch_sharding`` read the active table unless given one. With none active they use
    ``DEFAULT_LOGICAL_RULES``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import types
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")

# What one logical axis maps to: a mesh axis, several (a tuple shards over their product), or None
# (replicated).
MeshAxes = tuple[str, ...] | str | None

# logical axis -> mesh axes. Read-only: a run changes it through MeshConfig.logical_axis_rules.
DEFAULT_LOGICAL_RULES: Mapping[str, MeshAxes] = types.MappingProxyType(
  {
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
)


class RuleTable(Mapping):
  """A complete, read-only rule table (logical axis -> mesh axes). Hashable, so configs holding one
  stay hashable and usable as static arguments; compares equal to a dict with the same entries."""

  def __init__(self, rules: Mapping[str, MeshAxes]):
    self._rules = dict(rules)

  def __getitem__(self, name: str) -> MeshAxes:
    return self._rules[name]

  def __iter__(self):
    return iter(self._rules)

  def __len__(self) -> int:
    return len(self._rules)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._rules.items())))

  def __repr__(self) -> str:
    return f"RuleTable({self._rules!r})"


def rule_table(overrides: Mapping[str, MeshAxes | list] | None = None) -> RuleTable:
  """The complete rule table: ``DEFAULT_LOGICAL_RULES`` with ``overrides`` (a full or partial
  mapping, e.g. from YAML, where lists stand for tuples) laid over it. Unknown logical names, unknown
  mesh axes and a mesh axis named twice in one rule are ValueErrors."""
  table = dict(DEFAULT_LOGICAL_RULES)
  for name, axes in (overrides or {}).items():
    if name not in DEFAULT_LOGICAL_RULES:
      raise ValueError(
        f"logical_axis_rules: unknown logical axis {name!r}; the models use {sorted(DEFAULT_LOGICAL_RULES)}"
      )
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      if len(set(axes)) != len(axes):
        raise ValueError(f"logical_axis_rules.{name}: mesh axis named twice in {list(axes)}")
    elif axes is not None and not isinstance(axes, str):
      raise ValueError(
        f"logical_axis_rules.{name}: expected a mesh axis, a list of them or null, got {axes!r}"
      )
    bad = [a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in MESH_AXES]
    if bad:
      raise ValueError(
        f"logical_axis_rules.{name}: unknown mesh axis {bad[0]!r}; the mesh axes are {list(MESH_AXES)}"
      )
    table[name] = axes
  # Attention's shard_map splits batch, sequence and heads by these three rules at once: a mesh axis
  # may serve only one of them.
  seen: dict[str, str] = {}
  for name in ("activation_batch", "activation_length", "activation_heads"):
    axes = table[name]
    for a in (axes,) if isinstance(axes, str) else axes or ():
      if a in seen:
        raise ValueError(
          f"logical_axis_rules: mesh axis {a!r} is in both {seen[a]} and {name}; attention splits "
          "batch, sequence and heads at once, so these three rules need different mesh axes"
        )
      seen[a] = name
  return RuleTable(table)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device layout of a run (a training preset's ``mesh:`` section)."""

  data: int = -1  # -1: all remaining devices (of one slice when dcn_data > 1)
  fsdp: int = 1
  tensor: int = 1
  context: int = 1
  dcn_data: int = 1  # data-parallel slices across DCN (multi-slice pods); multiplies `data`
  # The TPU topology this layout is meant for (libtpu names, e.g. v5p:4x4x2): what
  # `python -m repvideo_jax.aot train` compiles for. Not read when training.
  topology: str | None = None
  # logical axis -> mesh axes (a name, a list of names, or null to replicate). Entries a preset gives
  # replace those of DEFAULT_LOGICAL_RULES; the field always holds the complete table.
  logical_axis_rules: Mapping[str, MeshAxes] = dataclasses.field(default_factory=rule_table)

  def __post_init__(self):
    object.__setattr__(self, "logical_axis_rules", rule_table(self.logical_axis_rules))


def _resolve_shape(shape: Sequence[int], count: int, what: str) -> list[int]:
  """``shape`` with its one ``-1`` (if any) set so the shape covers ``count`` devices exactly."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  fixed = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if count % fixed:
      raise ValueError(f"{count} {what} do not divide into fsdp*tensor*context={fixed}")
    shape[shape.index(-1)] = count // fixed
  if int(np.prod(shape)) != count:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} {what}, have {count}")
  return shape


def make_mesh(
  data: int = -1,
  fsdp: int = 1,
  tensor: int = 1,
  context: int = 1,
  devices: Sequence[jax.Device] | None = None,
  dcn_data: int = 1,
) -> Mesh:
  """Builds the (data, fsdp, tensor, context) mesh; ``-1`` for an axis takes the remaining devices.

  With ``dcn_data > 1`` the devices form that many slices joined by DCN: the sizes given describe one
  slice, and the mesh's data axis is ``dcn_data x data``, ordered so only data-parallel traffic
  crosses slices (``mesh_utils.create_hybrid_device_mesh``)."""
  devices = list(devices if devices is not None else jax.devices())
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if dcn_data > 1:
    if len(devices) % dcn_data:
      raise ValueError(f"{len(devices)} devices do not split into dcn_data={dcn_data} slices")
    shape = _resolve_shape([data, fsdp, tensor, context], len(devices) // dcn_data, "devices per slice")
    arr = mesh_utils.create_hybrid_device_mesh(shape, (dcn_data, 1, 1, 1), devices=devices)
    return Mesh(arr, MESH_AXES, axis_types=axis_types)
  shape = _resolve_shape([data, fsdp, tensor, context], len(devices), "devices")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def build_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh a ``MeshConfig`` describes, over ``devices`` (default: all of them)."""
  return make_mesh(
    config.data, config.fsdp, config.tensor, config.context, devices=devices, dcn_data=config.dcn_data
  )


def parse_mesh(text: str) -> dict[str, int]:
  """``'data=2,context=2'`` -> {'data': 2, 'fsdp': 1, 'tensor': 1, 'context': 2}."""
  out = dict.fromkeys(MESH_AXES, 1)
  for part in text.split(","):
    key, _, value = part.partition("=")
    if key.strip() not in out or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: use axis=size pairs over {list(out)}, e.g. data=2,context=2")
    out[key.strip()] = int(value)
  return out


# ----------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpecs, under the active rule table.

_ACTIVE_RULES: contextvars.ContextVar[RuleTable | None] = contextvars.ContextVar(
  "repvideo_logical_rules", default=None
)


@contextlib.contextmanager
def logical_rules(rules: Mapping[str, MeshAxes] | None) -> Iterator[RuleTable]:
  """Makes ``rules`` (completed by ``rule_table``; None: the defaults) the active table within the
  block. Enter it where the mesh is set (``jax.set_mesh``), around tracing and lowering: a program
  takes the table active when it is *traced*, and jax reuses a trace for a function it has seen, so
  a changed table needs a newly made function (``trainer.build_train_step`` makes one per call).
  Module-level jitted functions (the samplers' loops, the VAE, T5) keep the table of their first
  trace for the life of the process: sampling with a non-default table belongs in a fresh process."""
  table = rule_table(rules)
  token = _ACTIVE_RULES.set(table)
  try:
    yield table
  finally:
    _ACTIVE_RULES.reset(token)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Iterator[Mesh]:
  """``jax.set_mesh(mesh)`` and ``logical_rules(rules)`` together: where a run traces and runs its
  programs."""
  with jax.set_mesh(mesh), logical_rules(rules):
    yield mesh


def active_rules() -> Mapping[str, MeshAxes]:
  """The table set by the innermost ``logical_rules`` block, else ``DEFAULT_LOGICAL_RULES``."""
  table = _ACTIVE_RULES.get()
  return DEFAULT_LOGICAL_RULES if table is None else table


def _table(rules: Mapping[str, MeshAxes] | None) -> Mapping[str, MeshAxes]:
  return active_rules() if rules is None else rule_table(rules)


def logical_to_spec(
  logical_axes: Sequence[str | None] | None, rules: Mapping[str, MeshAxes] | None = None
) -> P:
  """Turns a tuple of logical axis names into a PartitionSpec under ``rules`` (default: the active
  table; a partial mapping is laid over the defaults). Unknown names raise KeyError."""
  table = _table(rules)
  if logical_axes is None:
    return P()
  out, used = [], set()
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to DEFAULT_LOGICAL_RULES")
    mesh_axes = table[name]
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used)  # a mesh axis shards one dim only
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*out)


def tree_shardings(logical_tree, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None):
  """A tree of logical-axis tuples (e.g. ``transformer.logical_axes(cfg)``) -> NamedShardings, under
  ``rules`` (default: the active table)."""
  table = _table(rules)
  return jax.tree.map(
    lambda names: NamedSharding(mesh, logical_to_spec(names, table)),
    logical_tree,
    is_leaf=lambda x: isinstance(x, tuple),
  )


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


def logical_size(mesh, logical: str, rules: Mapping[str, MeshAxes] | None = None) -> int:
  """Number of devices a ``logical`` axis is split over on ``mesh`` under ``rules`` (default the
  active table): the product of its rule's mesh axes that the mesh has."""
  axes = logical_to_spec((logical,), rules)[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return mesh_size(mesh, [a for a in axes if a in mesh.shape])


def batch_sharding(mesh, batch: int, rules: Mapping[str, MeshAxes] | None = None) -> NamedSharding:
  """Inputs of ``batch`` examples: split over the mesh's batch axes (``activation_batch`` under
  ``rules``, default the active table) when they divide it, else replicated (e.g. one video on a
  data=2 mesh; its CFG pair, made inside, is what gets split)."""
  axes = logical_to_spec(("activation_batch",), rules)[0]
  if batch % mesh_size(mesh, axes):
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(axes))


def constrain(
  x: jax.Array, logical_axes: Sequence[str | None], rules: Mapping[str, MeshAxes] | None = None
) -> jax.Array:
  """Sharding hint for an activation, by ``rules`` (default: the table active while tracing); a
  no-op when no mesh is active (single device, tests)."""
  if active_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))
