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

Meshes with `Explicit` axes (sharding in types: `jax.make_mesh`'s default, and
`jax.set_mesh`) are met in two places: a `mesh=` runs with its axes made `Auto`
(`check_mesh`), and the public functions, decorated with `auto_axes`, run under
`jax.sharding.auto_axes` where the context or an input has `Explicit` axes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
  """
  if mesh is not None and not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
  if mesh is None or all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def explicit_mesh(*values: Any) -> Mesh | jax.sharding.AbstractMesh | None:
  """The mesh with `Explicit` axes that a call on `values` runs under: the context's
  (`jax.set_mesh`), else the one a `jax.Array` among `values` is typed with (concrete
  for an array, abstract for a tracer); None where there is none (then JAX's
  sharding-in-types rules do not apply)."""
  context = jax.sharding.get_abstract_mesh()
  if not context.empty:
    return context if AxisType.Explicit in context.axis_types else None
  for leaf in values:
    if isinstance(leaf, jax.core.Tracer):
      mesh = getattr(jax.typeof(leaf).sharding, "mesh", None)
    elif isinstance(leaf, jax.Array) and isinstance(leaf.sharding, jax.sharding.NamedSharding):
      mesh = leaf.sharding.mesh  # cheaper than `jax.typeof` on every small call
    else:
      continue
    if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
      return mesh
  return None


def auto_axes(out_spec: Callable[..., PartitionSpec]):
  """Decorates a public function to run with `Explicit` mesh axes made `Auto`.

  Under `Explicit` axes (`jax.make_mesh`'s default, and `jax.set_mesh`) every operation
  must have a sharding JAX can infer from its inputs' types, which the kernels and
  reductions do not spell out (a row-sharded set against itself asks for a result
  sharded twice over one axis). Where `explicit_mesh` of the arguments finds such a
  mesh, the function runs under `jax.sharding.auto_axes`, XLA places its operations,
  and its results are laid out as `out_spec(*args, **kwargs)`; elsewhere it runs as it
  is.
  """
  def wrap(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      values = (*args, *kwargs.values())
      mesh = explicit_mesh(*values)
      if mesh is None:
        return fn(*args, **kwargs)
      # Only the array arguments pass through `auto_axes`; everything else (ints,
      # meshes, numpy rows, an `Index` whose state a method updates) is bound as it is.
      arrays = [isinstance(v, jax.Array) for v in values]

      def inner(*given):
        it = iter(given)
        v = [next(it) if is_array else v for v, is_array in zip(values, arrays, strict=True)]
        return fn(*v[:len(args)], **dict(zip(kwargs, v[len(args):], strict=True)))

      run = jax.sharding.auto_axes(inner, out_sharding=out_spec(*args, **kwargs))
      # `auto_axes` takes its mesh from the context; a concrete one lets the programs
      # inside compile for its devices.
      if not jax.sharding.get_abstract_mesh().empty:
        context = contextlib.nullcontext()
      elif isinstance(mesh, Mesh):
        context = jax.set_mesh(mesh)
      else:
        context = jax.sharding.use_abstract_mesh(mesh)
      with context:
        return run(*(v for v, is_array in zip(values, arrays, strict=True) if is_array))

    return wrapper

  return wrap


def replicated(*args, **kwargs) -> PartitionSpec:
  """The `auto_axes` layout of small results (top-k lists, counts): on every device."""
  del args, kwargs
  return PartitionSpec()


def spec_entries(a: Any) -> tuple:
  """The `PartitionSpec` entries of each axis of `a`'s type (None: not split)."""
  spec = getattr(jax.typeof(a).sharding, "spec", None) if isinstance(a, jax.Array) else None
  spec = () if spec is None else tuple(spec)
  return spec + (None,) * (np.ndim(a) - len(spec))


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
