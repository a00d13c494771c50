"""Rows spread over processes: `jaxsim.shard_rows` and the checks of multi-process calls.

On JAX's distributed runtime (`jax.distributed.initialize()` in every process) each
process usually holds its own rows: its share of a corpus, any number of them. JAX
cannot build a global array whose row count does not divide the device count, and
padding with zero or NaN rows corrupts counts, statistics and Euclidean top-k. So a
corpus spread over processes travels as a `ShardedRows`: a padded global array plus
the number of real rows, made by `shard_rows` from each process's local rows.

Layout: global ids run in process order (process 0's rows first, then process 1's,
...). `shard_rows` moves the rows once so that the global array holds them in id
order, cut into one contiguous block of `ceil(count / devices)` rows per mesh device,
with the padding at the end. That is exactly the layout `sharding.map_shards` cuts a
corpus into, so `topk`, `pairs_above` and `similarity_stats` scan `data` where it lies,
inside one program, without moving or copying the rows again: every padding row has a
global id `>= count`, which the reductions mask, never count and never return. Ties go to the lower
global id, as in the single-process call over all rows.

The move is one XLA gather over the mesh: its rows cross processes once, and its
temporaries may hold the whole corpus on each device (XLA's SPMD partitioner gathers
the source). It is a one-off at build time; searches then scan each device's own rows.

Inputs that every process passes in full (queries, thresholds, `k`, options) must be
identical in every process: JAX takes each process's own copy of a host array, so
differing queries would mix silently. `check_replicated` compares a 64-bit hash of
each of them across processes (one small allgather, not a copy) and raises the same
error on every process.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxsim._src import kernels, sharding, validation

# --- meshes -----------------------------------------------------------------------


def spans_processes(mesh: Mesh | None) -> bool:
  """Whether `mesh` holds devices of more than one process."""
  return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def check_mesh(mesh: Any, axis: str | tuple[str, ...] | None = None
               ) -> tuple[Mesh, tuple[str, ...]]:
  """Validates a mesh (and the axis names of it that rows are split over).

  Returns:
    The mesh with `Auto` axes (`sharding.check_mesh`), and the axis names to split rows
    over: `axis`, or all of the mesh's axes.

  Raises:
    TypeError: `mesh` is not a `jax.sharding.Mesh`.
    ValueError: an axis name the mesh does not have.
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  mesh = sharding.check_mesh(mesh)
  if axis is None:
    return mesh, tuple(mesh.axis_names)
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  missing = [a for a in names if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"`mesh` has no axis {missing[0]!r}: its axes are {mesh.axis_names} "
                     f"(mesh.shape={dict(mesh.shape)}).")
  return mesh, names


def _is_global(x: Any) -> bool:
  return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
          and not x.is_fully_addressable)


def resolve_mesh(mesh: Mesh | None, corpus: Any, *, name: str = "corpus") -> Mesh | None:
  """The mesh a reduction runs on: `mesh`, or the one a sharded `corpus` implies.

  A corpus that is a `jax.Array` sharded by rows over a `NamedSharding` of several
  devices, given without `mesh=`, runs on that sharding's mesh, so the rows are
  scanned where they are instead of being gathered onto every device.

  Raises:
    ValueError: `mesh` spans several processes while `corpus` is process-local (a
      host array, or a `jax.Array` on this process's devices only), or a `corpus`
      spread over processes is given with a mesh of other devices.
  """
  if isinstance(corpus, jax.core.Tracer):
    return mesh  # inside a program: the caller's jit owns the shardings
  if mesh is None:
    sh = getattr(corpus, "sharding", None)
    if isinstance(corpus, jax.Array) and isinstance(sh, NamedSharding) and len(
        sh.device_set) > 1 and corpus.ndim >= 1 and sh.spec and sh.spec[0] is not None:
      return sharding.check_mesh(sh.mesh)
    if _is_global(corpus):
      _warn_once(f"`{name}` is spread over processes but its sharding does not split its "
                 "rows over a mesh; pass `mesh=` so that its rows are not gathered on every "
                 "device.")
    return None
  mesh = sharding.check_mesh(mesh)
  if spans_processes(mesh) and not _is_global(corpus):
    raise ValueError(
        f"`mesh` spans {len({d.process_index for d in mesh.devices.flat})} processes "
        f"(mesh.shape={dict(mesh.shape)}), but `{name}` is local to this process "
        f"(shape {np.shape(corpus)}): each process would scan its own copy. Pass a global "
        "array, or `jaxsim.shard_rows(local_rows, mesh)`.")
  if _is_global(corpus) and not corpus.sharding.device_set <= set(mesh.devices.flat):
    raise ValueError(f"`mesh` (mesh.shape={dict(mesh.shape)}) does not hold the devices "
                     f"that `{name}` lives on.")
  return mesh


def prepare_call(mesh: Mesh | None, corpus: Any, *, name: str = "corpus",
                 **replicated: Any) -> Mesh | None:
  """`resolve_mesh`, then, on a mesh over several processes, `check_replicated`."""
  mesh = resolve_mesh(mesh, corpus, name=name)
  if spans_processes(mesh) and not isinstance(corpus, jax.core.Tracer):
    check_replicated(**replicated)
  return mesh


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _WARNED:
    _WARNED.add(message)
    warnings.warn(message, UserWarning, stacklevel=3)


# --- replicated inputs --------------------------------------------------------------


def fingerprint(value: Any) -> int:
  """A 64-bit hash of a host value: an array's dtype, shape and bytes, or its repr."""
  if _is_global(value) or isinstance(value, jax.core.Tracer):
    return 0  # one array for all processes (or a traced value): nothing to compare
  if isinstance(value, (jax.Array, np.ndarray)) or validation.is_torch(value):
    if validation.is_torch(value):
      value = validation.torch_to_numpy(value)
    arr = np.ascontiguousarray(np.asarray(value))
    head = f"{arr.dtype.str}{arr.shape}".encode()
    digest = hashlib.blake2b(head + arr.tobytes(), digest_size=8).digest()
  else:
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def check_replicated(**values: Any) -> None:
  """Checks that every process passed the same `values` (no-op in one process).

  One allgather of a 64-bit hash per value. Every process sees the same gathered
  table, so a mismatch raises the same error on every process instead of leaving
  the others waiting in a collective.

  Raises:
    ValueError: naming the first argument that differs, and the processes.
  """
  if jax.process_count() == 1 or not values:
    return
  names = list(values)
  words = np.array([fingerprint(values[k]) for k in names], np.uint64)
  # Two int32 words per hash: allgather works on 32-bit ints without jax_enable_x64.
  local = words.view(np.uint32).view(np.int32).reshape(len(names), 2)
  table = np.asarray(multihost_utils.process_allgather(local))  # (processes, values, 2)
  for i, key in enumerate(names):
    column = table[:, i, :]
    differ = np.flatnonzero(np.any(column != column[0], axis=1))
    if differ.size:
      raise ValueError(
          f"`{key}` differs between processes (process 0 and process {int(differ[0])} "
          f"disagree): every process must pass the same `{key}`. Replicated inputs "
          "(queries, thresholds, k, options) must be identical on every process; give "
          "rows that differ by process through `jaxsim.shard_rows`.")


# --- sharded rows ---------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class ShardedRows:
  """A corpus spread over a mesh: padded global rows plus the count of real rows.

  Made by `jaxsim.shard_rows`. Accepted as the corpus of `jaxsim.topk`, as `x` or `y`
  of `jaxsim.pairs_above` and `jaxsim.similarity_stats`, and as the rows of
  `jaxsim.Index`. A pytree (the count, mesh and per-process counts are static).

  Attributes:
    data: `(devices * per, d)` global array, rows sharded over `mesh`; rows
      `0 .. count - 1` are the real rows in global-id order, the rest zero padding.
    count: the number of real rows, `len(rows)`.
    mesh: the mesh the rows are sharded over.
    process_counts: each process's number of rows, in process order.
  """

  def __init__(self, data: jax.Array, count: int, mesh: Mesh,
               process_counts: tuple[int, ...] = ()):
    self.data, self.count, self.mesh = data, int(count), mesh
    self.process_counts = tuple(process_counts) or (int(count),)

  def tree_flatten(self):
    return (self.data,), (self.count, self.mesh, self.process_counts)

  @classmethod
  def tree_unflatten(cls, static, children):
    return cls(children[0], *static)

  @property
  def shape(self) -> tuple[int, int]:
    return (self.count, self.data.shape[1])

  @property
  def dtype(self):
    return self.data.dtype

  @property
  def ndim(self) -> int:
    return 2

  def __len__(self) -> int:
    return self.count

  def process_offset(self, process: int | None = None) -> int:
    """The global id of the first row of `process` (default: this process)."""
    p = jax.process_index() if process is None else process
    return int(sum(self.process_counts[:p]))

  def gather(self) -> np.ndarray:
    """All real rows on this host, in global-id order: a `(count, d)` numpy copy."""
    if _is_global(self.data):
      return np.asarray(multihost_utils.process_allgather(self.data, tiled=True))[:self.count]
    return np.asarray(self.data)[:self.count]

  def __repr__(self) -> str:
    return (f"ShardedRows(count={self.count}, dim={self.data.shape[1]}, "
            f"dtype={self.data.dtype}, mesh={dict(self.mesh.shape)}, "
            f"process_counts={self.process_counts})")


def place_rows(rows: Any, mesh: Mesh | None, name: str = "corpus") -> Any:
  """A corpus whose row count does not divide the devices of `mesh`, placed once as the
  `ShardedRows` that `shard_rows` would make; anything else is returned as it is.

  JAX cannot shard an array of `n` rows evenly over `mesh.size` devices unless `n`
  divides, so a program given such a corpus with `mesh=` received it replicated on every
  device and padded a copy of each shard. Placed here, outside the program, each device
  holds only its own `ceil(n / devices)` rows. Process-local calls only (a mesh over
  several processes takes `shard_rows`), and not inside a caller's `jit`, where the
  caller's program owns the placement.
  """
  if (not isinstance(mesh, Mesh) or spans_processes(mesh) or isinstance(rows, jax.core.Tracer)
      or not isinstance(rows, (np.ndarray, jax.Array)) or np.ndim(rows) != 2
      or np.dtype(rows.dtype).kind not in "fiu" or rows.shape[0] % mesh.size == 0):
    return rows
  rows = validation.as_float_array(rows, name)
  n, d = rows.shape
  pad = sharding.shard_rows(n, mesh) * mesh.size - n
  padded = (np.concatenate([rows, np.zeros((pad, d), rows.dtype)])
            if isinstance(rows, np.ndarray) else jnp.pad(rows, ((0, pad), (0, 0))))
  spec = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
  return ShardedRows(jax.device_put(padded, spec), n, mesh)


def _local_host(value: Any, name: str) -> np.ndarray:
  if validation.is_torch(value):
    value = validation.torch_to_numpy(value)
  if _is_global(value):
    raise ValueError(f"`{name}` must be this process's own rows (a host array), got a "
                     f"global array of shape {value.shape} spread over processes.")
  value = np.asarray(validation.as_float_array(value, name))
  validation.check_rank(value, name, min_rank=2, max_rank=2)
  return value


def shard_rows(local_rows: ArrayLike, mesh: Mesh, *,
               axis: str | tuple[str, ...] | None = None) -> ShardedRows:
  """Makes one global corpus from every process's own rows, any count each.

  Call it in every process with that process's rows (the counts may differ, zero
  included). Global ids run in process order: process `p`'s row `i` gets id
  `sum(counts[:p]) + i`. The rows are moved once so that each mesh device holds a
  contiguous block of `ceil(count / devices)` of them, in id order, padding last.

  Args:
    local_rows: `(n_p, d)` this process's rows (numpy, JAX or CPU torch); `d` and
      the dtype must agree across processes.
    mesh: the devices to shard the rows over, usually
      `Mesh(np.array(jax.devices()), ("rows",))` over every process's devices.
    axis: the mesh axis or axes to split the rows over (default: all of them, the
      split `topk`, `pairs_above` and `similarity_stats` use).

  Returns:
    A `ShardedRows` of `sum(n_p)` rows.

  Raises:
    TypeError: `mesh` is not a Mesh; rows that are complex or not numeric.
    ValueError: rows that are not 2-D, feature dims or dtypes that differ between
      processes, a mesh that holds none of this process's devices or misses `axis`.

  Examples:
    >>> import jax, numpy as np, jaxsim
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("rows",))
    >>> rows = jaxsim.shard_rows(np.eye(3, 4, dtype=np.float32), mesh)
    >>> len(rows), rows.shape
    (3, (3, 4))
  """
  mesh, axes = check_mesh(mesh, axis)
  rows = _local_host(local_rows, "local_rows")
  me = jax.process_index()
  flat = list(mesh.devices.flat)
  if not any(d.process_index == me for d in flat):
    raise ValueError(f"`mesh` (mesh.shape={dict(mesh.shape)}) holds none of process {me}'s "
                     "devices; build it over `jax.devices()`.")
  procs = jax.process_count()
  dtype_code = np.dtype(rows.dtype).num
  if procs > 1:
    info = np.asarray(multihost_utils.process_allgather(
        np.array([rows.shape[0], rows.shape[1], dtype_code], np.int32)))
  else:
    info = np.array([[rows.shape[0], rows.shape[1], dtype_code]], np.int32)
  if np.any(info[:, 1] != info[0, 1]) or np.any(info[:, 2] != info[0, 2]):
    raise ValueError(
        "`local_rows` must have the same feature dim and dtype in every process, got "
        + ", ".join(f"process {p}: d={int(r[1])} dtype={np.dtype(np.sctypeDict[int(r[2])]).name}"
                    if int(r[2]) in np.sctypeDict else f"process {p}: d={int(r[1])}"
                    for p, r in enumerate(info)) + ".")
  counts = info[:, 0].astype(np.int64)
  total, d = int(counts.sum()), rows.shape[1]
  size = mesh.size
  # Source layout: process p's rows cut into blocks of `block` rows, block j on p's
  # j-th device (in mesh order), each device one block of the source array.
  positions = [[i for i, dev in enumerate(flat) if dev.process_index == p] for p in range(procs)]
  pairs = list(zip(counts, positions, strict=True))
  block = max(1, max(-(-int(c) // max(1, len(pos))) for c, pos in pairs))
  if any(c and not pos for c, pos in pairs):
    raise ValueError(f"`mesh` (mesh.shape={dict(mesh.shape)}) holds no device of a process "
                     "that has rows; build it over every process's devices.")
  src_sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
  mine = positions[me]
  padded = np.zeros((len(mine) * block, d), rows.dtype)
  padded[:rows.shape[0]] = rows
  shards = [jax.device_put(padded[j * block:(j + 1) * block], flat[pos])
            for j, pos in enumerate(mine)]
  source = jax.make_array_from_single_device_arrays((size * block, d), src_sharding, shards)
  table = np.zeros((procs, max(len(p) for p in positions) or 1), np.int32)
  for p, pos in enumerate(positions):
    table[p, :len(pos)] = pos
  per = sharding.shard_rows(total, mesh)
  out = NamedSharding(mesh, PartitionSpec(axes))
  data = _gather_rows(source, np.cumsum(counts).astype(np.int32), table, block=block,
                      total=total, rows_out=per * size, out=out)
  return ShardedRows(data, total, mesh, tuple(int(c) for c in counts))


@functools.partial(jax.jit, static_argnames=("block", "total", "rows_out", "out"))
def _gather_rows(source, ends, table, *, block, total, rows_out, out):
  gid = jnp.arange(rows_out, dtype=jnp.int32)
  proc = jnp.searchsorted(ends, gid, side="right").astype(jnp.int32)
  proc_c = jnp.minimum(proc, ends.shape[0] - 1)
  local = gid - jnp.where(proc_c > 0, ends[jnp.maximum(proc_c - 1, 0)], 0)
  j = local // block
  src = table[proc_c, jnp.minimum(j, table.shape[1] - 1)] * block + local % block
  valid = gid < total
  rows = jnp.where(valid[:, None], source[jnp.where(valid, src, 0)], 0)
  return jax.lax.with_sharding_constraint(rows.astype(source.dtype), out)


# --- the reductions over sharded rows ----------------------------------------------


def replicate(tree, mesh: Mesh):
  """Outputs of a program over `mesh` made fully replicated, so every process reads them."""
  if not spans_processes(mesh):
    return tree
  return _replicate(tree, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _replicate(tree, *, mesh):
  return _replicated(mesh, tree)


def _replicated(mesh: Mesh, tree):
  spec = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, spec), tree)


def _options(kwargs: dict) -> tuple:
  return tuple(sorted(kwargs.items()))


def _mesh_for(rows: ShardedRows, mesh: Mesh | None) -> Mesh:
  if mesh is not None and mesh != rows.mesh:
    raise ValueError(f"`mesh` (mesh.shape={dict(mesh.shape)}) must be the mesh the rows "
                     f"were sharded over (mesh.shape={dict(rows.mesh.shape)}), or None.")
  return rows.mesh


def placed(value: Any) -> bool:
  """Whether `value` is a `ShardedRows` outside a program: the reductions hand it to the
  functions below, which pass it into one program whole."""
  return isinstance(value, ShardedRows) and not isinstance(value.data, jax.core.Tracer)


def real_rows(value: Any) -> tuple[Any, int | None]:
  """`(rows, count)`: a `ShardedRows` inside a program as its padded rows and its
  number of real rows, which a reduction scans where they lie, masking rows from
  `count` on (slicing them off inside the program would make each device a shard-sized
  copy, padded again to split it); anything else as `(value, None)`."""
  if isinstance(value, ShardedRows):
    return value.data, value.count
  return value, None


def whole_rows(value: Any) -> Any:
  """The real rows of a `ShardedRows` inside a program, for a side every device holds
  whole anyway (the queries, or a set against itself); anything else as it is."""
  rows, count = real_rows(value)
  return rows if count is None else rows[:count]


def _check_inputs(names_values: dict, options: dict) -> None:
  replicated = {k: v for k, v in names_values.items() if not isinstance(v, ShardedRows)}
  replicated.update({k: v for k, v in options.items()})
  check_replicated(**replicated)


def topk(queries: ArrayLike, corpus: ShardedRows, k: int, *, mesh: Mesh | None = None,
         **options) -> tuple[jax.Array, jax.Array]:
  """`jaxsim.topk` over a `ShardedRows` corpus; results replicated on every process."""
  mesh = _mesh_for(corpus, mesh)
  _check_inputs({"queries": queries}, {"k": k, **options})
  return _topk(queries, corpus, k=k, mesh=mesh, options=_options(options))


@functools.partial(jax.jit, static_argnames=("k", "mesh", "options"))
def _topk(queries, corpus, *, k, mesh, options):
  from jaxsim._src import search  # search imports this module
  return _replicated(mesh, search.topk(queries, corpus, k, mesh=mesh, **dict(options)))


def pairs_above(x, y=None, *, threshold, max_pairs, mesh: Mesh | None = None, **options):
  """`jaxsim.pairs_above` where `x` and/or `y` is a `ShardedRows`."""
  rows = x if isinstance(x, ShardedRows) else y
  mesh = _mesh_for(rows, mesh)
  _check_inputs({"x": x, "y": y}, {"threshold": threshold, "max_pairs": max_pairs, **options})
  # Checked here, where it is concrete: inside `_pairs` it is a tracer.
  validation.check_scalar(threshold, "threshold")
  found = _pairs(x, y, threshold, max_pairs=max_pairs, mesh=mesh, options=_options(options))
  if bool(found.overflowed):
    warnings.warn(f"pairs_above: {found.count} pairs qualify but max_pairs={max_pairs}; only "
                  "the first max_pairs (row-major) are returned.", RuntimeWarning, stacklevel=4)
  return found


@functools.partial(jax.jit, static_argnames=("max_pairs", "mesh", "options"))
def _pairs(x, y, threshold, *, max_pairs, mesh, options):
  from jaxsim._src import pairs  # pairs imports this module
  return _replicated(mesh, pairs.pairs_above(x, y, threshold=threshold, max_pairs=max_pairs,
                                             mesh=mesh, **dict(options)))


def similarity_stats(x, y=None, *, mesh: Mesh | None = None, **options):
  """`jaxsim.similarity_stats` where `x` and/or `y` is a `ShardedRows`."""
  rows = x if isinstance(x, ShardedRows) else y
  mesh = _mesh_for(rows, mesh)
  _check_inputs({"x": x, "y": y}, options)
  from jaxsim._src import stats  # stats imports this module

  # `similarity_stats` takes the histogram range as a runtime value; it is passed in as
  # one here too: ends that are constants of this program would be folded into edges
  # that can round differently from the direct call's.
  ends = options.pop("range", None)
  if ends is None and options.get("metric", "cosine") == "cosine":
    ends = (-1.0, 1.0)
  if ends is not None:
    # Checked here, where it is concrete: inside `_stats` the ends are tracers.
    acc = kernels.accum_dtype(x.dtype)
    default_bins = inspect.signature(stats.similarity_stats).parameters["bins"].default
    stats.check_range(ends, options.get("bins", default_bins), acc)
    ends = np.asarray(ends, acc)  # one (2,) array: a tuple of tracers is not array-like
  return _stats(x, y, ends, mesh=mesh, options=_options(options))


@functools.partial(jax.jit, static_argnames=("mesh", "options"))
def _stats(x, y, ends, *, mesh, options):
  from jaxsim._src import stats  # stats imports this module

  options = dict(options) if ends is None else {**dict(options), "range": ends}
  return _replicated(mesh, stats.similarity_stats(x, y, mesh=mesh, **options))


# --- an Index over processes --------------------------------------------------------


def _local_sums(rows: ShardedRows) -> tuple[np.ndarray, int]:
  """float64 sum and count of this process's real, finite rows (its devices' shards)."""
  total, count = np.zeros((rows.data.shape[1],), np.float64), 0
  for shard in rows.data.addressable_shards:
    start = shard.index[0].start or 0
    block = np.asarray(shard.data, np.float64)[:max(0, rows.count - start)]
    if shard.replica_id != 0:
      continue  # a copy of rows another device already counts
    finite = np.all(np.isfinite(block), axis=1)
    total += block[finite].sum(axis=0)
    count += int(finite.sum())
  return total, count


def _global_shift(rows: ShardedRows, dtype) -> np.ndarray:
  """`kernels.centre` of all real rows, as `index._host_shift` rounds it."""
  from jaxsim._src import index  # index imports this module

  total, count = _local_sums(rows)
  if jax.process_count() > 1:
    # float64 travels as int32 words: the allgather keeps 32-bit types without x64.
    words = np.concatenate([total.view(np.int32), np.array([count], np.int32)])
    table = np.asarray(multihost_utils.process_allgather(words))
    total = table[:, :-1].copy().view(np.float64).sum(axis=0)
    count = int(table[:, -1].sum())
  return index._host_shift([(total / max(count, 1))[None]], dtype)


def index_parts(rows: ArrayLike | ShardedRows, *, metric: str, mesh: Mesh | None,
                page_rows: int | None, precision) -> dict[str, Any]:
  """The storage of a `jaxsim.Index` over rows spread over processes.

  Each process passes its own rows (or all pass one `ShardedRows`); they become one
  sharded storage, ids in process order, as `shard_rows` numbers them.

  Returns:
    The keyword arguments of `Index._from_parts`.
  """
  from jaxsim._src import buckets, index, search  # they import this module

  if isinstance(rows, ShardedRows):
    mesh = _mesh_for(rows, mesh)
  else:
    check_mesh(mesh)
    rows = shard_rows(rows, mesh)
  d, dtype = rows.data.shape[1], np.dtype(rows.dtype)
  unit = search.GROUP * mesh.size
  page = index.default_page_rows(d, mesh) if page_rows is None else page_rows
  if page % unit:
    raise ValueError(f"`page_rows` must be a multiple of {unit} (32 x {mesh.size} devices), "
                     f"got {page}.")
  acc = kernels.accum_dtype(dtype)
  shift = (_global_shift(rows, dtype) if metric in kernels.DISTANCES
           else np.zeros((1, d), acc))
  replicated = NamedSharding(mesh, PartitionSpec())
  shift = jax.make_array_from_callback(shift.shape, replicated, lambda i: shift[i])
  capacity = buckets.capacity_bucket(rows.count, page=page)
  storage, aux = _prepare_storage(rows.data, shift, metric=metric, capacity=capacity,
                                  out=NamedSharding(mesh, PartitionSpec(mesh.axis_names)))
  return dict(metric=metric, mesh=mesh, store="device", page=page, precision=precision,
              dtype=dtype, dim=d, shift=shift, count=rows.count, rows=storage, aux=aux)


@functools.partial(jax.jit, static_argnames=("metric", "capacity", "out"))
def _prepare_storage(data, shift, *, metric, capacity, out):

  pad = capacity - data.shape[0]
  prepared = kernels.prepare(jnp.pad(data, ((0, pad), (0, 0))), metric,
                             shift=shift if metric in kernels.DISTANCES else None)
  return (jax.lax.with_sharding_constraint(prepared.rows, out),
          jax.lax.with_sharding_constraint(prepared.aux, out))
