"""Mesh from the config, logical-axis rules, and sharded state creation.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the
config's rules map them onto the mesh axes data / fsdp / tensor. State is
built abstractly (`jax.eval_shape`), its shardings derived from the names, and
then materialised by a jitted init whose outputs are already sharded: no full
copy ever lives on one device. The same abstract sharded tree is the Orbax
restore target, which is what lets a checkpoint land on another mesh.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils

from diverse_cfg import config_lib

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over these


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many blocks of rows a batch is split into (the product of the BATCH_AXES sizes)."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  config_lib.validate_mesh(mesh_cfg, num_devices)
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  fixed = int(np.prod([s for s in sizes if s != -1]))
  return tuple(num_devices // fixed if s == -1 else s for s in sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:  # topology-aware placement on TPU/GPU; plain reshape elsewhere
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(grid, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_of(mesh_cfg) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax)
               for name, ax in mesh_cfg.rules)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules):
  """Context for tracing: activation constraints resolve against mesh+rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_shardings(logical_tree: Any, mesh: jax.sharding.Mesh, rules) -> Any:
  """Boxed (LogicallyPartitioned) tree -> NamedSharding tree (unboxed structure)."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def names_to_sharding(names: Sequence[str | None], mesh, rules) -> jax.sharding.NamedSharding:
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  return jax.sharding.NamedSharding(mesh, spec)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> jax.sharding.NamedSharding:
  """Leading (batch) dim over data+fsdp, the rest replicated."""
  spec = jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))
  return jax.sharding.NamedSharding(mesh, spec)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def create_sharded(init_fn: Callable[..., Any], mesh, rules, *args) -> tuple[Any, Any]:
  """Materialises `init_fn(*args)` (returning boxed params) directly sharded.

  Returns (unboxed state, its NamedSharding tree).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_to_shardings(abstract, mesh, rules)

  def unboxed_init(*a):
    return nn.meta.unbox(init_fn(*a))

  with activate(mesh, rules):
    state = jax.jit(unboxed_init, out_shardings=shardings)(*args)
  return state, shardings


def abstract_sharded(init_fn: Callable[..., Any], mesh, rules, *args) -> Any:
  """ShapeDtypeStructs carrying target shardings: the restore target."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_to_shardings(abstract, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(abstract), shardings)


def to_host(x: Any) -> np.ndarray:
  """The whole value of an array as numpy, on every process.

  A global array spread over several processes cannot be read by one of them
  (np.asarray fails): it is all-gathered, a collective every process must call.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def to_global(tree: Any, shardings: Any) -> Any:
  """Arrays laid out as `shardings` (a tree like `tree`, or one sharding for all).

  For values every process holds whole (e.g. a frozen evaluator restored onto
  each process's first device): jit refuses such arrays as global arguments
  and CPU backends cannot move them across hosts, so each process builds its
  own shards of the global array from its host copy.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    host = to_host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)
