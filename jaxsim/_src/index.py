"""A prepared, growable search index: `jaxsim.Index`.

`jaxsim.topk` prepares (normalises or centres) the whole corpus on every call and
compiles a new program for every new query count, corpus size and `k`. An `Index`
prepares its rows once, keeps them in padded storage, and pads queries and `k` to the
ladders of `jaxsim._src.buckets`, so a server compiles a handful of programs, not one
per request.

Storage is a `(capacity, d)` array of prepared rows plus a valid count: `capacity` is
a whole number of pages (`page_rows` rows each) on the ladder of
`buckets.capacity_bucket`, and rows from `count` on are padding that is never
returned. Search walks the pages with `blockscan.block_scan`, runs the streamed top-k
of `search.topk_prepared` on each page that holds rows, skips the others, and merges
the running top-k, ties to the lower id. The padded storage plus a count is also the
shape a corpus takes when its rows are spread unevenly over devices or processes.

With `store="host"` the rows stay in host memory (a numpy array or a memory-mapped
`.npy`) and are streamed to the device one page at a time: each page is sent while
the previous page is being searched, so device memory is O(page).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxsim._src import (
  blockscan,
  buckets,
  defaults,
  distributed,
  kernels,
  search,
  sharding,
  validation,
)

FORMAT = "jaxsim.Index"
FORMAT_VERSION = 1
# Elements per page at most: 2**22 (16 MiB of float32). A page is one corpus block of
# the streamed top-k (`defaults.corpus_block()` rows, fewer for wide rows): pages past
# the last row are skipped
# whole, so padding costs less than a page of work, and host pages stream in modest
# transfers.
PAGE_ELEMENTS = 1 << 22
STORES = ("device", "host")
# Rows per chunk of the host-side mean behind the Euclidean centring shift; fixed, so
# that both stores sum in the same order and get the same shift.
_SHIFT_CHUNK = 1 << 16


def default_page_rows(d: int, mesh: Mesh | None = None) -> int:
  """Rows per page: one corpus block of `jaxsim.topk` (`defaults.corpus_block()`, 4096 on
  CPU), fewer for wide rows so a page stays near `PAGE_ELEMENTS`, at least 1024; a
  multiple of `32 * devices` so each device's share keeps the top-k group prefilter."""
  rows = 1024
  while rows < defaults.corpus_block() and rows * 2 * max(d, 1) <= PAGE_ELEMENTS:
    rows *= 2
  unit = search.GROUP * sharding.num_shards(mesh)
  return -(-rows // unit) * unit


def _to_host(value: Any, name: str) -> np.ndarray | jax.Array:
  """numpy, JAX and (CPU) torch arrays; torch goes through numpy without a copy.

  A numpy array (a memmap included) of a floating dtype JAX keeps is returned as it
  is, so that a host index holds the caller's array, not a copy.
  """
  if isinstance(value, np.ndarray) and value.dtype.kind == "f" and (
      jax.dtypes.canonicalize_dtype(value.dtype) == value.dtype):
    return value
  if validation.is_torch(value):
    value = validation.torch_to_numpy(value)
  return validation.as_float_array(value, name)


def _host_shift(parts: list[np.ndarray], dtype) -> np.ndarray:
  """`kernels.centre` of the rows in `parts`, summed in float64 chunk by chunk.

  Both stores compute the shift here, in the same order, so that they search the same
  centred rows. Rows with a non-finite entry are left out; the mean is rounded to 8
  significant bits as `kernels.centre` does.
  """
  d = parts[0].shape[1]
  total, count = np.zeros((1, d), np.float64), 0
  for part in parts:
    for start in range(0, part.shape[0], _SHIFT_CHUNK):
      chunk = np.asarray(part[start:start + _SHIFT_CHUNK], np.float64)
      finite = np.all(np.isfinite(chunk), axis=1)
      total += np.sum(chunk[finite], axis=0, keepdims=True)
      count += int(np.sum(finite))
  mean = total / max(count, 1)
  mantissa, exponent = np.frexp(mean)
  shift = np.ldexp(np.round(mantissa * 256.0), exponent - 8)
  return shift.astype(kernels.accum_dtype(dtype))


@functools.partial(jax.jit, static_argnames=("metric",))
def _prepare(rows, shift, *, metric):
  return kernels.prepare(rows, metric, shift=shift if metric in kernels.DISTANCES else None)


@functools.partial(jax.jit, static_argnames=("capacity", "mesh"))
def _grow(rows, aux, *, capacity, mesh):
  pad = capacity - rows.shape[0]
  rows, aux = jnp.pad(rows, ((0, pad), (0, 0))), jnp.pad(aux, (0, pad))
  return _constrain(rows, mesh), _constrain(aux, mesh)


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnums=(0, 1))
def _append(rows, aux, prepared, count, *, mesh):
  # A scatter with mode="drop", not a dynamic_update_slice: a slab that runs past the
  # capacity must lose its (padding) tail, not be shifted back over real rows.
  at = count + jnp.arange(prepared.rows.shape[0], dtype=jnp.int32)
  rows = rows.at[at].set(prepared.rows, mode="drop")
  aux = aux.at[at].set(prepared.aux, mode="drop")
  return _constrain(rows, mesh), _constrain(aux, mesh)


def _constrain(x, mesh):
  if mesh is None:
    return x
  return lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(mesh.axis_names)))


def _page_topk(qp, page, shift, prepare_block, valid, first, *, k, metric, mesh, precision):
  """Keys (larger is better) and global ids of the top-k of one page's first `valid` rows."""
  s, ids = search.topk_prepared(qp, page, shift, prepare_block, valid, k=k, metric=metric,
                                block_size=None, query_block_size=None, mesh=mesh,
                                precision=precision)
  key = -s if metric in kernels.DISTANCES else s
  return key, jnp.where(ids >= 0, ids + first, -1)


def _identity(block, shift):
  del shift
  return block


def _search_storage(rows, aux, shift, count, queries, *, k, metric, page, mesh, precision):
  """Top-k of `queries` over the first `count` rows of prepared storage; traceable."""
  euclid = metric in kernels.DISTANCES
  qp = kernels.prepare(queries, metric, shift=shift if euclid else None)
  count = jnp.asarray(count, jnp.int32)
  storage = kernels.Prepared(rows, aux)
  acc = qp.aux.dtype
  if mesh is not None:
    # Pages would slice across the devices' shards; the whole storage is one scan
    # per device instead (padding rows cost their matmul but are never returned).
    best, ids = _page_topk(qp, storage, shift, _identity, count, 0, k=k, metric=metric,
                           mesh=mesh, precision=precision)
  else:
    init = (jnp.full((queries.shape[0], k), -jnp.inf, acc),
            jnp.full((queries.shape[0], k), -1, jnp.int32))

    def step(carry, starts, first, valid):
      del first, valid  # one page start per block
      start = starts[0]

      def run(carry):
        # The page is sliced inside the branch: a page passed into `cond` as an
        # operand would be copied whether or not the branch runs.
        page_at = jax.tree.map(lambda leaf: lax.dynamic_slice_in_dim(leaf, start, page),
                               storage)
        key, ids = _page_topk(qp, page_at, shift, _identity, count - start, start, k=k,
                              metric=metric, mesh=None, precision=precision)
        return search.merge_topk(*carry, key, ids, k)

      # Pages past the last row are skipped, so capacity padding costs no time.
      return lax.cond(start < count, run, lambda carry: carry, carry)

    starts = jnp.arange(0, rows.shape[0], page, dtype=jnp.int32)
    best, ids = blockscan.block_scan(step, init, starts, block_size=1, remat=False)
  return (-best if euclid else best).astype(queries.dtype), ids


_search_device = jax.jit(_search_storage,
                         static_argnames=("k", "metric", "page", "mesh", "precision"))


@functools.partial(jax.jit, static_argnames=("k", "metric", "precision"))
def _search_host_page(best, best_ids, queries, shift, rows, aux, first, valid, *, k, metric,
                      precision):
  euclid = metric in kernels.DISTANCES
  qp = kernels.prepare(queries, metric, shift=shift if euclid else None)
  key, ids = _page_topk(qp, kernels.Prepared(rows, aux), shift, _identity, valid, first,
                        k=k,
                        metric=metric, mesh=None, precision=precision)
  best, best_ids = search.merge_topk(best, best_ids, key, ids, k)
  return best, best_ids, (-best if euclid else best).astype(queries.dtype)


@jax.tree_util.register_pytree_node_class
class Index:
  r"""Rows prepared once for exact top-k search; growable, saveable, a pytree.

  `Index(rows, metric=m).search(queries, k)` equals `jaxsim.topk(queries, rows, k,
  metric=m)`: the same ids, best first, ties to the lower id, and the same scores up
  to the last-bit rounding that differently shaped matmul tiles can give. It is
  faster when a corpus is searched more than once, because the rows are prepared
  (unit-normalised for `"cosine"`, centred for the Euclidean metrics) and moved to the
  device once, and it compiles one program per step of the bucket ladders
  (`jaxsim._src.buckets`) instead of one per query count, corpus size and `k`.

  .. math:: \mathrm{search}(Q, k)_i = \operatorname{arg\,top}_k \{ s(q_i, r_j) : j < n \}

  For `"sq_euclidean"` and `"euclidean"` the centring shift (the mean row, rounded to
  8 significant bits) is fixed by the rows the index is built with and kept when rows
  are added, and only the centred rows are stored. The candidates are recomputed
  directly as `sum((q - r)^2)` from the centred rows, where `jaxsim.topk` uses the raw
  rows: the two agree to float32 rounding of the centring, a row equal to a query is
  at distance exactly 0 in both, and near-ties closer than that rounding (about
  1e-7 of the rows' distance from the shift) may order differently.

  The index is a pytree (storage, aux values, shift and count are its leaves), so it
  can be passed into `jax.jit`-compiled code; inside a trace, `search` runs at the
  traced shapes and `index.count` is the traced row count (`len` needs a concrete
  one). Slots past the row count, possible there when `k > count`, get id -1.

  Args:
    rows: `(n, d)` floating rows (numpy, JAX or CPU torch); `n` may be 0 for an index
      that will be filled with `add`.
    metric: one of `"dot"`, `"cosine"`, `"scaled_dot"`, `"sq_euclidean"`,
      `"euclidean"`.
    mesh: a `jax.sharding.Mesh`; the storage is sharded by rows over all its devices,
      and each search runs on every device's shard and merges (ids as without a mesh).
    store: `"device"` (prepared rows in device memory) or `"host"` (the rows stay in
      host memory as given, numpy or `np.load(path, mmap_mode="r")`, never copied
      whole, and stream to the device a page at a time; device memory is O(page)).
    page_rows: rows per page of storage (device) or per transfer (host); a multiple of
      `32 x devices`. Default: 4096 (fewer above d = 1024, so a page stays
      within 2**22 elements).
    precision: `jax.lax.Precision` for the matmuls.

  Raises:
    ValueError: for rows that are not 2-D, an unknown metric or store, or a bad
      `page_rows`.
    TypeError: for complex or non-numeric rows, or a `mesh` that is not a `Mesh`.

  Examples:
    >>> import numpy as np, jaxsim
    >>> index = jaxsim.Index(np.eye(3, dtype=np.float32))
    >>> index.add(np.array([[1., 1., 0.]], np.float32))
    >>> scores, ids = index.search(np.array([[1., 0.9, 0.]], np.float32), 2)
    >>> ids, len(index)
    (Array([[3, 0]], dtype=int32), 4)
  """

  def __init__(self, rows: ArrayLike, *, metric: kernels.Metric = "cosine",
               mesh: Mesh | None = None, store: str = "device", page_rows: int | None = None,
               precision=None):
    kernels.check_metric(metric)
    mesh = sharding.check_mesh(mesh)
    if store not in STORES:
      raise ValueError(f"`store` must be one of {STORES}, got {store!r}.")
    if store == "host" and mesh is not None:
      raise ValueError("`store='host'` streams pages to one device; it takes no `mesh`.")
    page_rows = validation.check_positive_int(page_rows, "page_rows", allow_none=True)
    if isinstance(rows, distributed.ShardedRows) or distributed.spans_processes(mesh):
      if store != "device":
        raise ValueError("An Index over rows spread over processes takes store='device'.")
      # Each process passes its own rows; ids run in process order.
      self.__dict__.update(type(self)._from_parts(**distributed.index_parts(
          rows, metric=metric, mesh=mesh, page_rows=page_rows, precision=precision)).__dict__)
      return
    rows = _to_host(rows, "rows")
    validation.check_rank(rows, "rows", min_rank=2, max_rank=2)
    d = rows.shape[1]
    unit = search.GROUP * sharding.num_shards(mesh)
    if page_rows is None:
      page_rows = default_page_rows(d, mesh)
    elif page_rows % unit:
      raise ValueError(f"`page_rows` must be a multiple of {unit} (32 x {unit // search.GROUP} "
                       f"devices), got {page_rows}.")
    self._metric, self._mesh, self._store = metric, mesh, store
    self._page, self._precision = page_rows, precision
    self._dtype, self._dim = np.dtype(rows.dtype), d
    # Built on the host: an eager jnp.zeros would be one more compiled program.
    self._shift = jax.device_put(np.zeros((1, d), kernels.accum_dtype(self._dtype)))
    self._count = 0
    if store == "host":
      self._parts: list[np.ndarray] = []
      self._aux_parts: list[np.ndarray] | None = None  # set when the parts are prepared
      self._rows = self._aux = None
    else:
      self._rows, self._aux = self._empty_storage(
          buckets.capacity_bucket(rows.shape[0], page=page_rows))
    self.add(rows)

  # --- construction helpers -------------------------------------------------------

  def _compute_shift(self, parts):
    if self._metric not in kernels.DISTANCES:
      return np.zeros((1, self._dim), kernels.accum_dtype(self._dtype))
    parts = [np.asarray(p) if isinstance(p, jax.Array) else p for p in parts]
    return _host_shift(parts, self._dtype)

  def _empty_storage(self, capacity):
    return self._put_storage(np.zeros((capacity, self._dim), self._dtype),
                             np.zeros((capacity,), kernels.accum_dtype(self._dtype)))

  @classmethod
  def _from_parts(cls, metric, mesh, store, page, precision, dtype, dim, shift, count, rows,
                  aux, parts=None, aux_parts=None):
    self = object.__new__(cls)
    self._metric, self._mesh, self._store, self._page = metric, mesh, store, page
    self._precision, self._dtype, self._dim = precision, dtype, dim
    self._shift, self._count, self._rows, self._aux = shift, count, rows, aux
    if store == "host":
      self._parts, self._aux_parts = parts, aux_parts
    return self

  # --- pytree ---------------------------------------------------------------------

  def tree_flatten(self):
    if self._store == "host":
      raise TypeError("A store='host' Index keeps its rows in host memory and cannot be a "
                      "pytree leaf of jitted code; build it with store='device'.")
    children = (self._rows, self._aux, self._shift, self._count)
    static = (self._metric, self._mesh, self._store, self._page, self._precision, self._dtype,
              self._dim)
    return children, static

  @classmethod
  def tree_unflatten(cls, static, children):
    rows, aux, shift, count = children
    return cls._from_parts(*static, shift, count, rows, aux)

  # --- properties -----------------------------------------------------------------

  @property
  def metric(self) -> str:
    return self._metric

  @property
  def dtype(self) -> np.dtype:
    return self._dtype

  @property
  def dim(self) -> int:
    """The feature dim `d`."""
    return self._dim

  @property
  def count(self):
    """The number of rows: a Python int, or a traced int32 inside `jit`."""
    return self._count

  @property
  def capacity(self) -> int:
    """Rows of storage (device store): a number of pages on the capacity ladder."""
    if self._store == "host":
      return self._count
    return int(self._rows.shape[0])

  @property
  def store(self) -> str:
    return self._store

  def __len__(self) -> int:
    if isinstance(self._count, jax.core.Tracer):
      raise TypeError("len() of an Index inside a jitted function: the count is traced; "
                      "use `index.count`.")
    return int(self._count)

  def __repr__(self) -> str:
    count = "traced" if isinstance(self._count, jax.core.Tracer) else self._count
    return (f"Index(count={count}, dim={self._dim}, dtype={self._dtype.name}, "
            f"metric={self._metric!r}, store={self._store!r})")

  # --- checks ---------------------------------------------------------------------

  def _check_rows(self, value, name):
    value = _to_host(value, name)
    validation.check_rank(value, name, min_rank=2, max_rank=2)
    if value.shape[1] != self._dim:
      raise ValueError(f"`{name}` must have the index's feature dim {self._dim}, got "
                       f"{name}.shape={value.shape}.")
    if np.dtype(value.dtype) != self._dtype:
      raise TypeError(f"`{name}` must have the index's dtype {self._dtype.name}, got "
                      f"{np.dtype(value.dtype).name} ({name}.shape={value.shape}); cast it "
                      f"first, e.g. `{name}.astype('{self._dtype.name}')`.")
    return value

  # --- add ------------------------------------------------------------------------

  @sharding.auto_axes(sharding.replicated)
  def add(self, rows: ArrayLike) -> None:
    """Appends rows; their ids continue from `len(index)`.

    The rows are prepared with the index's metric (and, for the Euclidean metrics,
    its fixed shift; an index that was empty takes its shift from these rows). The
    storage grows along the capacity ladder, so a run of adds compiles a few programs,
    not one per row count. With `store="host"` the array is kept as given (not
    copied), so a memory-mapped file stays on disk. A device index updates its
    storage in place (the buffers are donated), so a copy of the index taken with
    `jax.tree` functions before `add` must not be used after it.

    Args:
      rows: `(m, d)` rows of the index's dtype and feature dim.

    Raises:
      ValueError: for rows that are not 2-D or have another feature dim.
      TypeError: for rows of another dtype.
    """
    if isinstance(self._count, jax.core.Tracer):
      raise TypeError("Index.add cannot run inside a jitted function: storage grows.")
    self._add(rows, set_shift=True)

  def _add(self, rows, *, set_shift):
    if distributed.spans_processes(self._mesh):
      raise ValueError("`Index.add` on an index over several processes is not supported: "
                       "build a new Index from every process's rows.")
    rows = self._check_rows(rows, "rows")
    m = rows.shape[0]
    if m == 0:
      return
    if set_shift and self._count == 0 and self._metric in kernels.DISTANCES:
      self._shift = jnp.asarray(self._compute_shift([rows]))
    if self._store == "host":
      if self._aux_parts is not None:
        raise TypeError("This host Index holds prepared rows (loaded from a file); it "
                        "cannot take raw rows. Load it with store='device' to add rows.")
      self._parts.append(rows)
      self._count += m
      return
    # Whole pages go through the same program; the last one is padded on the host.
    host = np.asarray(rows)
    new_count = self._count + m
    capacity = buckets.capacity_bucket(new_count, page=self._page)
    if capacity > self._rows.shape[0]:
      self._rows, self._aux = _grow(self._rows, self._aux, capacity=capacity, mesh=self._mesh)
    for start in range(0, m, self._page):
      slab = host[start:start + self._page]
      if slab.shape[0] < self._page:
        slab = np.concatenate(
            [slab, np.zeros((self._page - slab.shape[0], self._dim), self._dtype)])
      # Pages are prepared by the same program in both stores, so that they search
      # bitwise the same rows.
      prepared = _prepare(slab, self._shift, metric=self._metric)
      self._rows, self._aux = _append(self._rows, self._aux, prepared,
                                      np.int32(self._count + start), mesh=self._mesh)
    self._count = new_count

  # --- search ---------------------------------------------------------------------

  @sharding.auto_axes(sharding.replicated)
  def search(self, queries: ArrayLike, k: int, *, progress: bool = False
             ) -> tuple[jax.Array, jax.Array]:
    """The `k` best rows of the index for every query, best first.

    The query count is padded up to a power of two and `k` up to the `k` ladder
    (`jaxsim._src.buckets`), and the padding masked, so any batch size from 1 to 2048
    runs one of 12 compiled programs per index capacity and `k` step. Pass numpy
    queries to pad them on the host (a JAX array of a new shape costs one small
    padding program).

    Args:
      queries: `(q, d)` rows of the index's dtype and feature dim.
      k: results per query, `1 <= k <= len(index)`.
      progress: `store="host"` only; show a tqdm progress bar over the pages.

    Returns:
      `(scores, ids)`, each `(q, k)`: scores in the metric's units and the index
      dtype (as `jaxsim.topk` returns them), ids int32 row numbers in the order the
      rows were added.

    Raises:
      ValueError: for queries that are not 2-D or have another feature dim, an empty
        index, or `k` out of range.
      TypeError: for queries of another dtype.
    """
    queries = self._check_rows(queries, "queries")
    if isinstance(self._count, jax.core.Tracer) or isinstance(queries, jax.core.Tracer) or \
        isinstance(self._rows, jax.core.Tracer):
      # Inside jit: shapes are fixed by the trace, so no buckets are needed.
      k = validation.check_positive_int(k, "k")
      return _search_storage(self._rows, self._aux, self._shift, self._count, queries, k=k,
                             metric=self._metric, page=self._page, mesh=self._mesh,
                             precision=self._precision)
    k = validation.check_positive_int(k, "k")
    if self._count == 0:
      raise ValueError(f"The index is empty (len(index) == 0); add rows before searching "
                       f"(queries.shape={queries.shape}, k={k}).")
    if k > self._count:
      raise ValueError(f"`k` must be at most len(index) = {self._count}, got k={k}.")
    q = queries.shape[0]
    if q == 0:
      return jnp.zeros((0, k), self._dtype), jnp.zeros((0, k), jnp.int32)
    qb, kb = buckets.size_bucket(q), buckets.k_bucket(k)
    padded = _pad_rows(queries, qb)
    if self._store == "host":
      scores, ids = self._search_host(padded, kb, progress)
    else:
      if distributed.spans_processes(self._mesh):
        distributed.check_replicated(queries=queries, k=k)
      scores, ids = _search_device(self._rows, self._aux, self._shift, np.int32(self._count),
                                   padded, k=kb, metric=self._metric, page=self._page,
                                   mesh=self._mesh, precision=self._precision)
      scores, ids = distributed.replicate((scores, ids), self._mesh)
    if (qb, kb) == (q, k):
      return scores, ids
    # Cut on the host: an eager slice would compile a program per (q, k).
    return (jax.device_put(np.asarray(scores)[:q, :k]),
            jax.device_put(np.asarray(ids)[:q, :k]))

  def _pages(self):
    """(first id, rows, aux) of every host page of at most `page_rows` rows."""
    first = 0
    for i, part in enumerate(self._parts):
      aux = None if self._aux_parts is None else self._aux_parts[i]
      for start in range(0, part.shape[0], self._page):
        yield (first + start, part[start:start + self._page],
               None if aux is None else aux[start:start + self._page])
      first += part.shape[0]

  def _put_page(self, page):
    first, rows, aux = page
    short = self._page - rows.shape[0]
    rows = np.asarray(rows)
    if short:
      rows = np.concatenate([rows, np.zeros((short, self._dim), self._dtype)])
    if aux is None:
      # The device store's page program, so both stores search the same prepared rows.
      prepared = _prepare(jax.device_put(rows), self._shift, metric=self._metric)
    else:
      if short:
        aux = np.concatenate([aux, np.zeros((short,), aux.dtype)])
      prepared = kernels.Prepared(jax.device_put(rows), jax.device_put(np.asarray(aux)))
    # Parts need not fill whole pages, so each page says how many of its rows are real.
    return np.int32(first), prepared.rows, prepared.aux, np.int32(self._page - short)

  def _search_host(self, queries, k, progress):
    pages = list(self._pages())
    if progress:
      from tqdm.auto import tqdm

      pages = tqdm(pages, desc="Index.search", unit="page")
    acc = kernels.accum_dtype(self._dtype)
    best = jnp.full((queries.shape[0], k), -jnp.inf, acc)
    best_ids = jnp.full((queries.shape[0], k), -1, jnp.int32)
    queries = jax.device_put(queries)
    it = iter(pages)
    nxt = self._put_page(next(it))
    scores = None
    for page in it:
      cur = nxt
      # Dispatch is asynchronous: this page's search is queued, then the next page is
      # copied to the device while it runs. Waiting for the search before the next
      # round keeps at most two pages on the device.
      best, best_ids, scores = _search_host_page(
          best, best_ids, queries, self._shift, *cur[1:3], cur[0], cur[3],
          k=k, metric=self._metric, precision=self._precision)
      nxt = self._put_page(page)
      del cur
      best.block_until_ready()
    best, best_ids, scores = _search_host_page(
        best, best_ids, queries, self._shift, *nxt[1:3], nxt[0], nxt[3],
        k=k, metric=self._metric, precision=self._precision)
    return scores, best_ids

  # --- save / load ----------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Writes the index to `path` (an `.npz` file), atomically.

    Format (version 1): an uncompressed npz with `rows` (`(n, d)`, the prepared rows
    of a device index or the raw rows of a host index; bfloat16 and other
    non-numpy dtypes stored as unsigned integers of the same width), `aux` (`(n,)`
    float), `shift` (`(1, d)` float) and `meta` (UTF-8 JSON bytes: `format`
    "jaxsim.Index", `version`, `metric`, `dtype`, `count`, `dim`, `prepared`,
    `page_rows`). The file is written next to `path` under a temporary name and
    renamed over it, so a failed save leaves any old file intact.

    Raises:
      OSError: when `path` cannot be written (the old file, if any, is untouched).
    """
    path = os.fspath(path)
    n = self._count
    if self._store == "host":
      prepared = self._aux_parts is not None
      rows = np.concatenate(self._parts) if self._parts else np.zeros((0, self._dim),
                                                                      self._dtype)
      aux = (np.concatenate(self._aux_parts) if prepared and self._aux_parts
             else np.zeros((n,), kernels.accum_dtype(self._dtype)))
    else:
      prepared = True
      rows, aux = np.asarray(self._rows)[:n], np.asarray(self._aux)[:n]
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "metric": self._metric,
            "dtype": self._dtype.name, "count": int(n), "dim": self._dim, "prepared": prepared,
            "page_rows": self._page}
    arrays = {"rows": _storable(rows), "aux": np.asarray(aux), "shift": np.asarray(self._shift),
              "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".jaxsim-index-", suffix=".npz.tmp", dir=folder)
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise

  @classmethod
  def load(cls, path: str | os.PathLike, *, mesh: Mesh | None = None, store: str = "device",
           page_rows: int | None = None, precision=None) -> Index:
    """Reads an index written by `save`.

    Args:
      path: the `.npz` file.
      mesh, store, page_rows, precision: as for `Index`.

    Raises:
      ValueError: for a file that is not a complete jaxsim index of a known version
        (truncated, foreign, or inconsistent); nothing is half-built.
    """
    path = os.fspath(path)
    try:
      with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
        if "meta" not in f.files:
          raise ValueError(f"no `meta` entry (entries: {f.files})")
        meta = json.loads(bytes(f["meta"]).decode())
        if meta.get("format") != FORMAT:
          raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
          raise ValueError(f"format version {meta.get('version')!r}; this jaxsim reads "
                           f"version {FORMAT_VERSION}")
        rows, aux, shift = f["rows"], f["aux"], f["shift"]
        dtype = jnp.dtype(meta["dtype"])
        n, d = int(meta["count"]), int(meta["dim"])
        metric, prepared = kernels.check_metric(meta["metric"]), bool(meta["prepared"])
        rows = rows.view(dtype) if rows.dtype != dtype else rows
    except (OSError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile,
            json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
      if isinstance(err, FileNotFoundError):
        raise
      raise ValueError(f"{path!r} is not a readable jaxsim Index file: {err}") from None
    if rows.shape != (n, d) or aux.shape != (n,) or shift.shape != (1, d):
      raise ValueError(f"{path!r} is not a consistent jaxsim Index file: meta says {n} rows of "
                       f"dim {d}, arrays have rows {rows.shape}, aux {aux.shape}, shift "
                       f"{shift.shape}.")
    if not prepared:
      index = cls(np.zeros((0, d), dtype), metric=metric, mesh=mesh, store=store,
                  page_rows=page_rows, precision=precision)
      index._shift = jnp.asarray(shift)
      index._add(rows, set_shift=False)
      return index
    index = cls(np.zeros((0, d), dtype), metric=metric, mesh=mesh, store=store,
                page_rows=page_rows, precision=precision)
    index._shift = jnp.asarray(shift)
    if store == "host":
      index._parts, index._aux_parts, index._count = [rows], [aux], n
      return index
    capacity = buckets.capacity_bucket(n, page=index._page)
    rows = np.concatenate([rows, np.zeros((capacity - n, d), dtype)])
    aux = np.concatenate([aux, np.zeros((capacity - n,), aux.dtype)])
    index._rows, index._aux = index._put_storage(rows, aux)
    index._count = n
    return index

  def _put_storage(self, rows, aux):
    if self._mesh is None:
      return jax.device_put(rows), jax.device_put(aux)
    spec = NamedSharding(self._mesh, PartitionSpec(self._mesh.axis_names))
    return jax.device_put(rows, spec), jax.device_put(aux, spec)


def _storable(rows: np.ndarray) -> np.ndarray:
  """numpy's npz cannot hold ml_dtypes (bfloat16): store the bits as unsigned ints."""
  if rows.dtype.kind in "fiub" and rows.dtype.type.__module__ == "numpy":
    return rows
  return rows.view(np.dtype(f"u{rows.dtype.itemsize}"))


def _pad_rows(x, rows: int):
  """`x` padded with zero rows to `rows` rows, on the host for numpy inputs."""
  if x.shape[0] == rows:
    return x
  if isinstance(x, np.ndarray):
    out = np.zeros((rows, x.shape[1]), x.dtype)
    out[:x.shape[0]] = x
    return out
  return _pad_device(x, rows=rows)


@functools.partial(jax.jit, static_argnames=("rows",))
def _pad_device(x, *, rows):
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))
