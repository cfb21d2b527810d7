"""Device mesh and the one table that maps logical axis names to mesh axes.

Every backbone parameter is declared with logical axis names (`out_sharding=('embed', 'mlp')`,
`eager_sharding=False`). This file is the only place that decides how those names land on the
mesh: fully sharded data parallel over `fsdp`, Megatron-style tensor parallel over `tensor`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# FSDP shards the large "embed" side of each matrix; tensor parallelism splits heads and MLP.
LOGICAL_RULES: Mapping[str, Any] = {
    'batch': ('data', 'fsdp'),
    'vocab': 'tensor',
    'embed': 'fsdp',
    'mlp': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'layers': None,
    'norm': None,
}


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves `config.mesh` (-1 = the rest of the devices) against the device count."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f'config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, '
          f'which does not divide the {num_devices} devices.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'config.mesh {dict(zip(MESH_AXES, sizes))} multiplies to {math.prod(sizes)} devices, '
        f'but {num_devices} are available.')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (the compiler propagates shardings)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                         mesh: jax.sharding.Mesh | None = None) -> P:
  """Maps a tuple of logical names to a PartitionSpec of mesh axes.

  When `shape` and `mesh` are given, a dimension that the mesh axes do not divide is left
  replicated rather than failing (e.g. 2 KV heads on a tensor axis of 4).
  """
  if not logical:
    return P()
  used: set[str] = set()
  out: list[Any] = []
  for dim, name in enumerate(logical):
    if name is not None and name not in LOGICAL_RULES:
      raise KeyError(f'Logical axis {name!r} has no rule in mos_jax.infra.sharding.LOGICAL_RULES.')
    axes = LOGICAL_RULES.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)  # A mesh axis may shard one dimension only.
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _logical_axes_of(variable) -> tuple | None:
  meta = variable.get_metadata() if hasattr(variable, 'get_metadata') else {}
  return meta.get('out_sharding') or meta.get('sharding_names')


def fsdp_storage(spec: P, logical, shape, mesh) -> P:
  """FSDP only stores an array (it is gathered before use), so an array the table leaves whole
  over `fsdp` (a norm scale, a bias, a dimension fsdp does not divide) takes fsdp on its largest
  dimension that it divides; never 'layers', which scan slices."""
  out = list(spec) + [None] * (len(shape) - len(spec))
  if mesh.shape['fsdp'] == 1 or any(a == 'fsdp' or (isinstance(a, tuple) and 'fsdp' in a)
                                    for a in out):
    return spec
  names = tuple(logical or ()) + (None,) * len(shape)
  free = [d for d in range(len(shape))
          if out[d] is None and names[d] != 'layers' and shape[d] % mesh.shape['fsdp'] == 0]
  if free:
    out[max(free, key=lambda d: shape[d])] = 'fsdp'
  return P(*out)


def state_shardings(state, mesh: jax.sharding.Mesh):
  """NamedShardings for an nnx.State (or abstract state) of Params carrying logical axes."""
  from flax import nnx

  def one(variable):
    value = variable.get_value() if hasattr(variable, 'get_value') else variable.value
    logical, shape = _logical_axes_of(variable), getattr(value, 'shape', None)
    spec = logical_to_mesh_spec(logical, shape, mesh)
    if shape is not None:
      spec = fsdp_storage(spec, logical, shape, mesh)
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
  """Pins an activation to the table's layout, e.g. constrain(x, 'batch', None, 'embed').

  Without it, propagation from FSDP-sharded weights can leave activations unsharded over the
  batch (every device computing the whole batch). No-op outside a `jax.set_mesh` context.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical, x.shape, mesh))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays are split over (data, fsdp) on their leading dimension."""
  return NamedSharding(mesh, P(('data', 'fsdp'), *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def opt_state_shardings(optimizer, abstract_params, param_shardings, mesh: jax.sharding.Mesh):
  """Shardings for `optimizer.init(params)`: moments like their params, the rest replicated.

  `jax.jit(optimizer.init)` on sharded params does not propagate: the moments are fresh zeros
  and land on one device, so pass these as its `out_shardings`. (An `nnx.Optimizer`'s state
  keeps each param's `out_sharding` metadata; `state_shardings` covers it directly.)
  """
  import optax

  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  return optax.tree_utils.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_state, param_shardings,
      transform_non_params=lambda _: replicated(mesh))


def sharded_abstract(abstract, shardings):
  """ShapeDtypeStructs that carry shardings: AOT lowering inputs and Orbax restore targets."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def unsharded_large_params(tree, min_size: int = 2**16, axis: str = 'fsdp') -> list[str]:
  """Paths of arrays with >= min_size elements that are not split over mesh `axis`.

  `tree` holds arrays or `sharded_abstract` structs. Empty when the axis has size 1: the check
  is that nothing large is silently replicated across FSDP shards.
  """
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if math.prod(leaf.shape) < min_size:
      continue
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      if sharding.mesh.shape.get(axis, 1) == 1:
        continue
      if any(axis == a or (isinstance(a, tuple) and axis in a) for a in sharding.spec):
        continue
    bad.append(jax.tree_util.keystr(path).removesuffix('.value'))  # nnx.Variable adds .value
  return bad
