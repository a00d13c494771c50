"""Splitting a corpus across devices: the one multi-device helper of the reductions.

`topk`, `pairs_above` and `similarity_stats` each stream a corpus through a
`block_scan`. With a `jax.sharding.Mesh` the corpus rows are cut into one contiguous
shard per device with `jax.shard_map`; every device runs the same local reduction on
its shard, told the global index of its first row, and the per-device partial results
come back stacked on a leading device axis for the caller to merge (top-k of the
top-k's, a sum of counts, a sorted merge of pair lists). Shards are in device order,
so shard `i` holds lower corpus indices than shard `i + 1`; merges that break ties by
position therefore break them by lower index, as the single-device scan does.

Across processes (`jax.distributed.initialize()` on every host), each process passes
its own rows through `jaxsim.shard_rows` (`jaxsim._src.distributed`), which lays them
out as these contiguous shards, any count per process; the same code then runs on
every process and the results come back replicated. Tested with real processes on
one host (`tests/test_distributed.py`, `python -m experiments.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, PartitionSpec

PyTree = Any


def check_mesh(mesh) -> Mesh | None:
  """`mesh` with every axis `AxisType.Auto`: the mesh the reductions run on.

  `jax.make_mesh` gives `Explicit` axes, whose sharding-in-types rules reject what the
  reductions do with their per-device results (a `top_k` along an axis that holds the
  devices, a scatter whose output sharding is ambiguous). The reductions place their
  data themselves, so the same devices with `Auto` axes compute the same results.

  Raises:
    TypeError: `mesh` is not a `jax.sharding.Mesh` or None.
    ValueError: a `mesh` given under `jax.set_mesh` of a mesh with non-`Auto` axes,
      whose sharding-in-types rules would apply inside the reductions.
  """
  if mesh is not None and not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
  context = jax.sharding.get_abstract_mesh()
  if mesh is not None and not context.empty and any(
      t != AxisType.Auto for t in context.axis_types):
    raise ValueError(
        "A mesh (`mesh=`, or the one a sharded input implies) cannot be used inside "
        "`jax.set_mesh` of a mesh with "
        f"{'/'.join(sorted({t.name for t in context.axis_types}))} axes (context mesh "
        f"shape {dict(context.shape)}): the reduction splits its work over `mesh` itself. "
        "Call it outside the `jax.set_mesh` block (with the same `mesh=`), or without `mesh=`.")
  if mesh is None or all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def num_shards(mesh: Mesh | None) -> int:
  return 1 if mesh is None else int(mesh.size)


def shard_rows(n: int, mesh: Mesh | None) -> int:
  """Rows per device when `n` rows are split over `mesh` (the last shards padded)."""
  return max(1, -(-n // num_shards(mesh)))


def map_shards(fn: Callable[..., PyTree], rows: PyTree, *args: PyTree,
               mesh: Mesh | None) -> PyTree:
  """Runs `fn` on each device's contiguous shard of `rows`, stacking the results.

  Args:
    fn: `fn(local_rows, offset, *args) -> pytree`, where `local_rows` is `rows` cut to
      `shard_rows(n, mesh)` rows along axis 0 and `offset` the int32 global index of
      its first row. Rows at global index `>= n` are zero padding that `fn` must mask.
    rows: pytree of arrays sharing the row count `n` of axis 0, split across devices.
    *args: pytrees passed whole (replicated) to every device.
    mesh: the devices; `None` runs `fn` once on all rows with `offset = 0`. The rows
      are split over all mesh axes together, in device order.

  Returns:
    `fn`'s pytree with a new leading axis of size `num_shards(mesh)`, entry `i` the
    result for shard `i`.
  """
  if mesh is None:
    return jax.tree.map(lambda leaf: leaf[None], fn(rows, jnp.int32(0), *args))
  leaves = jax.tree.leaves(rows)
  n = leaves[0].shape[0]
  per = shard_rows(n, mesh)
  pad = per * mesh.size - n
  if pad:
    rows = jax.tree.map(
        lambda leaf: jnp.pad(leaf, [(0, pad)] + [(0, 0)] * (leaf.ndim - 1)), rows)
  axes = tuple(mesh.axis_names)

  def local(shard, *replicated):
    offset = jax.lax.axis_index(axes).astype(jnp.int32) * per
    return jax.tree.map(lambda leaf: leaf[None], fn(shard, offset, *replicated))

  # check_vma=False: every output is per device (sharded on the leading axis), so no
  # replication claim needs checking, and scan carries may start replicated and end
  # device-varying.
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axes),) + (PartitionSpec(),)
                          * len(args), out_specs=PartitionSpec(axes), check_vma=False)
  return sharded(rows, *args)


def map_devices(fn: Callable[..., PyTree], *args: PyTree, mesh: Mesh | None) -> PyTree:
  """Runs `fn(index, count, *args)` once per device of `mesh`, stacking the results.

  The split of the work is `fn`'s (e.g. `blockscan.triangle_scan(..., shard=(index,
  count))`); `args` are passed whole (replicated) to every device. `mesh=None` runs
  `fn(0, 1, *args)`. Returns `fn`'s pytree with a leading axis of size
  `num_shards(mesh)`, in device order.
  """
  if mesh is None:
    return jax.tree.map(lambda leaf: leaf[None], fn(jnp.int32(0), 1, *args))
  axes = tuple(mesh.axis_names)

  def local(*replicated):
    index = jax.lax.axis_index(axes).astype(jnp.int32)
    return jax.tree.map(lambda leaf: leaf[None], fn(index, mesh.size, *replicated))

  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(),) * len(args),
                       out_specs=PartitionSpec(axes), check_vma=False)(*args)
