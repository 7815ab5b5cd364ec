"""THE table from logical axis names to mesh axes, and the shardings derived from it.

Parameters and activations name their dimensions logically (`("embed", "mlp")`,
`("batch", "length", "heads", "head_dim")`); this module alone knows which mesh axis each name is
split over. Within one array a mesh axis is used at most once, first dimension first: activations
[batch, length, embed] take data x fsdp for the batch, so `embed` (fsdp for parameters) stays whole.
"""

from collections.abc import Sequence
import logging
import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical name -> mesh axes it is split over, in order (MaxText-style rules, one entry each).
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),   # activations: data parallel and ZeRO-3 groups
    ("length", ("sequence",)),     # activations: context parallelism (ring attention)
    # The residual stream between layers (the scan carry, saved for the backward pass) is split
    # over tensor as well (Megatron-style sequence parallelism): otherwise all tensor ranks keep
    # the same [T/CP, D] copy of every layer's input (8B at 1M, TP 8: 69 GiB per device).
    ("residual_length", ("sequence", "tensor")),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),          # parameters: FSDP shards the model width
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),                # the scan over stacked layers needs each layer whole
)
_RULES = dict(LOGICAL_AXIS_RULES)


def mesh_axes_of(name: str | None, mesh: Mesh | None = None) -> tuple[str, ...]:
  """Mesh axes of one logical name (those present in `mesh` when given)."""
  if name is None:
    return ()
  if name not in _RULES:
    raise KeyError(f"logical axis {name!r} is not in the sharding table; known: {sorted(_RULES)}")
  axes = _RULES[name]
  return tuple(a for a in axes if a in mesh.axis_names) if mesh is not None else axes


def logical_to_spec(names: Sequence[str | None], mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for an array whose dimensions have logical `names`.

  A mesh axis is used once per array (first dimension wins). With `shape`, axes that do not divide
  their dimension are dropped (that dimension is replicated over them) so any parameter shape gets
  a valid sharding; activations that must be split use `check_divisible` instead.
  """
  used: set[str] = set()
  spec = []
  for d, name in enumerate(names):
    axes = [a for a in mesh_axes_of(name, mesh) if a not in used]
    if shape is not None and mesh is not None:
      kept = []
      for a in axes:
        if shape[d] % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]) == 0:
          kept.append(a)
        else:
          logging.info("dimension %d (%s) of %s not divisible by mesh axis %s: replicated",
                       d, name, tuple(shape), a)
      axes = kept
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def check_divisible(what: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
  """Raises a ValueError naming the dimension and mesh axes when `spec` cannot split `shape`."""
  for d, axes in enumerate(spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in axes)
    if shape[d] % size:
      raise ValueError(
          f"{what} has shape {tuple(shape)}: dimension {d} ({shape[d]}) is not divisible by mesh "
          f"axes {axes} of total size {size}; e.g. heads must be divisible by the tensor axis and "
          f"batch by data x fsdp. Change the mesh sizes or the model/batch shape.")


def named_sharding(mesh: Mesh, names: Sequence[str | None],
                   shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, mesh, shape))


def _is_spec(x) -> bool:
  return isinstance(x, P)


def state_shardings(mesh: Mesh, state: Any) -> Any:
  """NamedShardings for an nnx.State (model parameters or nnx.Optimizer state).

  Variables carry logical names as metadata (`out_sharding`, flax >= 0.12.4) which
  `nnx.get_partition_spec` turns into PartitionSpecs of logical names; optimizer moments copy their
  parameter's metadata, so one function serves both. Variables without names (step counters,
  RNG state) are replicated. Returns a tree of the same structure as `state`.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  logical = nnx.get_partition_spec(state)

  def to_sharding(spec, value):
    shape = getattr(value, "shape", ())
    names = tuple(spec) if isinstance(spec, P) else ()
    names = names + (None,) * (len(shape) - len(names))
    return named_sharding(mesh, names, shape)

  return jax.tree.map(to_sharding, logical, state, is_leaf=_is_spec)


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
  """Shardings for a batch pytree: [B, T, ...] arrays split B over data x fsdp and T over
  sequence, [B] arrays over data x fsdp, scalars replicated. Raises on indivisible shapes."""

  def one(x):
    names = ("batch", "length")[:x.ndim] + (None,) * max(0, x.ndim - 2)
    spec = logical_to_spec(names, mesh)
    check_divisible("batch array", x.shape, spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, batch)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding hint by logical names under the mesh set with `jax.set_mesh`; a no-op
  without one (single device, or code that runs outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh, x.shape))


def constrain_fn(mesh: Mesh):
  """`constrain(x, names)` bound to `mesh` (for the model's activation hints, any context)."""

  def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))

  return constrain
