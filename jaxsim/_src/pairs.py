"""All pairs whose score passes a threshold, in fixed-capacity arrays (`pairs_above`).

A client of `blockscan`: with `y` given, the `x` rows are walked in blocks (outer) and
the corpus in blocks (inner); with `y=None`, `triangle_scan` walks the square tiles
`(i, j)`, `i <= j`, of `x` against itself, so the tiles below the diagonal are never
computed. Each tile of scores is compared with the threshold as soon as it is computed,
and its qualifying pairs are inserted into buffers that keep the first `max_pairs`
pairs in row-major order, so the full `n x m` matrix is never built. With `mesh=` the
corpus is split across devices by `sharding.map_shards` (with `y=None`: every device
holds all rows and walks its share of the tiles, `sharding.map_devices`) and the
per-device pair lists merged.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxsim._src import (
    blockscan,
    defaults,
    distributed,
    kernels,
    refine,
    sharding,
    stats,
    validation,
)

_INT32_MAX = 2**31 - 1

class Pairs(NamedTuple):
  """Pairs found by `pairs_above`, in fixed-capacity arrays.

  Attributes:
    rows: `(max_pairs,)` int32 row index into `x`, -1 in unused slots.
    cols: `(max_pairs,)` int32 row index into `y` (or `x` when `y` is None), -1 in
      unused slots.
    scores: `(max_pairs,)` scores in the inputs' dtype, 0 in unused slots.
    count: the true number of qualifying pairs, which may exceed `max_pairs` (int32,
      or int64 / float32 when more than 2**31 - 1 pairs are possible; see
      `jaxsim._src.stats`).
    overflowed: bool, `count > max_pairs`: only the first `max_pairs` pairs (row-major)
      were kept.
  """

  rows: jax.Array
  cols: jax.Array
  scores: jax.Array
  count: jax.Array
  overflowed: jax.Array


class _Found(NamedTuple):
  rows: jax.Array  # _INT32_MAX in unused slots while scanning, so they sort last
  cols: jax.Array
  scores: jax.Array
  filled: jax.Array  # slots in use
  last_row: jax.Array  # largest row held
  count: stats.WideCount


def _sort_pairs(rows, cols, scores):
  return lax.sort((rows, cols, scores), num_keys=2)


def _insert(found: _Found, mask: jax.Array, s: jax.Array, ids: jax.Array, cols: jax.Array,
            capacity: int, exact=None) -> _Found:
  """Adds a tile's pairs so that `found` holds the first `capacity` pairs in row-major
  order among all pairs seen, whatever the order tiles arrive in.

  `exact(r, c)`, if given, computes the scores of the extracted pairs (tile positions)
  instead of reading them from `s`."""
  size = min(capacity, mask.size)
  total = jnp.sum(mask, dtype=jnp.int32)
  # jnp.nonzero lists the tile's pairs row-major: its first `size` are its smallest.
  r, c = jnp.nonzero(mask, size=size, fill_value=0)
  used = jnp.arange(size, dtype=jnp.int32) < jnp.minimum(total, size)
  new_rows = jnp.where(used, ids[r], _INT32_MAX)
  new_cols = jnp.where(used, cols[c], _INT32_MAX)
  new_scores = s[r, c] if exact is None else exact(r.astype(jnp.int32), c.astype(jnp.int32))
  last = jnp.maximum(found.last_row, jnp.max(jnp.where(used, new_rows, -1)))

  def append(_):
    slot = jnp.where(used, found.filled + jnp.arange(size, dtype=jnp.int32), capacity)
    put = lambda buf, v: buf.at[slot].set(v, mode="drop")
    return found._replace(rows=put(found.rows, new_rows), cols=put(found.cols, new_cols),
                          scores=put(found.scores, new_scores), filled=found.filled + total,
                          last_row=last)

  def merge(_):
    rows, cols, scores = _sort_pairs(jnp.concatenate([found.rows, new_rows]),
                                     jnp.concatenate([found.cols, new_cols]),
                                     jnp.concatenate([found.scores, new_scores]))
    rows, cols, scores = rows[:capacity], cols[:capacity], scores[:capacity]
    held = rows < _INT32_MAX
    return found._replace(rows=rows, cols=cols, scores=scores,
                          filled=jnp.sum(held, dtype=jnp.int32),
                          last_row=jnp.max(jnp.where(held, rows, -1)))

  return lax.cond(found.filled + total <= capacity, append, merge, None)


@sharding.auto_axes(sharding.replicated)
def pairs_above(x: ArrayLike, y: ArrayLike | None = None, *, threshold: float, max_pairs: int,
                metric: kernels.Metric = "cosine", block_size: int | None = None,
                query_block_size: int | None = None, mesh: jax.sharding.Mesh | None = None,
                precision=None) -> Pairs:
  r"""All pairs whose score passes `threshold`, in fixed-capacity arrays.

  For similarity metrics (`"dot"`, `"cosine"`, `"scaled_dot"`) a pair qualifies when
  :math:`s(x_i, y_j) \ge \text{threshold}`; for the distance metrics
  (`"sq_euclidean"`, `"euclidean"`) when :math:`d(x_i, y_j) \le \text{threshold}`.
  With `y=None` only the pairs :math:`i < j` of `x` are considered: each unordered
  pair once, as `(i, j)` with `i < j`, never `(j, i)` and never `(i, i)` (the pairs
  of `pairs_above(x, x)` with `rows < cols`). They come from the tiles `i <= j` of
  square `block_size` blocks: the tiles below the diagonal are not computed, and only
  the diagonal tiles are masked. Near-duplicate detection, graph construction for
  community detection.

  Pairs are returned in row-major order (by row, then column), the same for every
  block size and device count. If more than `max_pairs` pairs qualify, the first
  `max_pairs` in that order are kept, `count` still holds the true total,
  `overflowed` is True, and (outside `jit`) a `RuntimeWarning` is raised: increase
  `max_pairs` or the threshold. Tiles without a qualifying pair cost one matmul and
  one count.

  Args:
    x: `(n, d)` rows.
    y: `(m, d)` rows, or `None` for the pairs within `x`.
    threshold: the score bound (a similarity floor, or a distance ceiling).
    max_pairs: capacity of the returned arrays, at most 2**31 - 1; clamped to the
      number of pairs there are.
    metric: one of `"dot"`, `"cosine"`, `"scaled_dot"`, `"sq_euclidean"`,
      `"euclidean"`.
    block_size: corpus (`y`) rows per block; with `y=None` the rows per side of the
      square tiles. Default: equal blocks of at most about `defaults.stats_block()`
      rows (1024 on CPU, 16384 on GPU and TPU), with `y=None` about
      `defaults.triangle_block()` (512 on CPU, 4096 on GPU and TPU; see
      `jaxsim._src.defaults`).
    query_block_size: `x` rows per tile (`y` given only); default keeps a tile at
      2**20 scores (4 MiB; 2**24 on GPU and TPU).
    mesh: a `jax.sharding.Mesh`; the `y` rows are split across its devices (with
      `y=None` every device holds all of `x` and computes its share of the tiles),
      and the per-device pair lists merged in row-major order (the same pairs and
      count as the single-device call).
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    A `Pairs` (rows, cols, scores, count, overflowed) whose arrays hold
    `min(max_pairs, P)` slots, `P` the number of pairs considered; unused slots hold
    -1 indices and score 0. For the Euclidean metrics every returned distance is
    recomputed directly from the rows, and every pair whose side of the threshold the
    expansion's error bound leaves open is decided on that direct value (see
    `jaxsim._src.refine`). A pair with a non-finite row never qualifies.

  Raises:
    ValueError: for inputs that are not 2-D, mismatched feature dims, an unknown
      metric, a NaN `threshold`, a `max_pairs` outside `[1, 2**31 - 1]` or a
      non-positive block size.
    TypeError: for a `threshold` that is not a real number.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> x = jnp.array([[1., 0.], [0., 1.], [1., 0.01]])
    >>> p = jaxsim.pairs_above(x, threshold=0.99, max_pairs=4)
    >>> p.rows, p.cols, int(p.count)  # 3 rows hold 3 pairs: the buffers are clamped to 3
    (Array([ 0, -1, -1], dtype=int32), Array([ 2, -1, -1], dtype=int32), 1)
  """
  mesh = sharding.check_mesh(mesh)
  if y is not None:  # x of a set against itself is on every device anyway
    y = distributed.place_rows(y, mesh, "y")
  if distributed.placed(x) or distributed.placed(y):
    return distributed.pairs_above(x, y, threshold=threshold, max_pairs=max_pairs, mesh=mesh,
                                   metric=metric, block_size=block_size,
                                   query_block_size=query_block_size, precision=precision)
  x, (y, y_count) = distributed.whole_rows(x), distributed.real_rows(y)
  kernels.check_metric(metric)
  mesh = distributed.prepare_call(mesh, x if y is None else y, name="x" if y is None else "y",
                                  **({} if y is None else {"x": x}), threshold=threshold,
                                  max_pairs=max_pairs, metric=metric, block_size=block_size,
                                  query_block_size=query_block_size)
  x, y = validation.matrices(x, y)
  threshold = validation.check_scalar(threshold, "threshold")
  max_pairs = validation.check_positive_int(max_pairs, "max_pairs", maximum=_INT32_MAX)
  block_size, query_block_size = validation.block_sizes(block_size, query_block_size)
  n = x.shape[0]
  m = None if y is None else y.shape[0] if y_count is None else y_count
  bound = n * (n - 1) // 2 if y is None else n * m
  capacity = min(max_pairs, bound)
  if bound == 0:
    none = jnp.full((0,), -1, jnp.int32)
    return Pairs(none, none, jnp.zeros((0,), x.dtype), jnp.int32(0), jnp.bool_(False))
  found = _pairs(x, y, validation.canonical_scalar(threshold, kernels.accum_dtype(x.dtype)),
                 m=m, metric=metric, max_pairs=capacity, block_size=block_size,
                 query_block_size=query_block_size, mesh=mesh, precision=precision,
                 bound=bound)
  if not isinstance(found.overflowed, jax.core.Tracer) and bool(found.overflowed):
    warnings.warn(f"pairs_above: {found.count} pairs qualify but max_pairs={max_pairs}; only "
                  "the first max_pairs (row-major) are returned.", RuntimeWarning, stacklevel=3)
  return found


def _empty(max_pairs: int, dtype) -> _Found:
  return _Found(jnp.full((max_pairs,), _INT32_MAX, jnp.int32),
                jnp.full((max_pairs,), _INT32_MAX, jnp.int32), jnp.zeros((max_pairs,), dtype),
                jnp.int32(0), jnp.int32(-1), stats.wide_zeros())


def _tile_pairs(found, rows, cols, raw_rows, raw_cols, ids, col_ids, ok, threshold, limit, *,
                metric, max_pairs, precision):
  """Counts a tile's qualifying pairs (`ok` masks the pairs considered) and inserts them,
  unless the buffer is full and every row here comes after the pairs it holds."""
  acc = found.scores.dtype
  if metric in kernels.DISTANCES:
    exact = lambda r, c: refine.direct_sq(raw_rows[r], raw_cols[c], acc)
    s = kernels.score(rows, cols, "sq_euclidean", precision=precision)
    # Pairs the expansion cannot place on a side of the threshold: decide them on the
    # direct value.
    err = refine.error_bound(rows.aux, cols.aux, raw_rows.shape[1], raw_rows.dtype)
    s = refine.refine_where(s, ok & (jnp.abs(s - limit) <= err), exact)
    hit = ok & (s <= limit)
    if metric == "euclidean":
      exact = lambda r, c: kernels.safe_sqrt(refine.direct_sq(raw_rows[r], raw_cols[c], acc))
  else:
    exact = None
    s = kernels.score(rows, cols, metric, precision=precision)
    hit = ok & (s >= threshold)
  total = jnp.sum(hit, dtype=jnp.int32)
  counted = found._replace(count=stats.wide_add(found.count, total))
  later = (found.filled >= max_pairs) & (ids[0] > found.last_row)
  return lax.cond((total > 0) & ~later,
                  lambda f: _insert(f, hit, s, ids, col_ids, max_pairs, exact),
                  lambda f: f, counted)


@functools.partial(jax.jit, static_argnames=(
    "m", "metric", "max_pairs", "block_size", "query_block_size", "mesh", "precision", "bound"))
def _pairs(x, y, threshold, *, m=None, metric, max_pairs, block_size, query_block_size, mesh,
           precision, bound):
  # Distances are compared squared; a negative distance threshold passes no pair.
  limit = (jnp.where(threshold >= 0, threshold * threshold, -1.0)
           if metric == "euclidean" else threshold)
  options = dict(metric=metric, max_pairs=max_pairs, precision=precision)
  if y is None:
    parts = _triangle(x, threshold, limit, block_size=block_size, mesh=mesh, **options)
  else:
    parts = _cross(x, y, threshold, limit, m=m, block_size=block_size,
                   query_block_size=query_block_size, mesh=mesh, **options)
  rows, cols, scores = parts.rows.reshape(-1), parts.cols.reshape(-1), parts.scores.reshape(-1)
  rows, cols, scores = _sort_pairs(rows, cols, scores)
  rows, cols, scores = rows[:max_pairs], cols[:max_pairs], scores[:max_pairs]
  held = rows < _INT32_MAX
  count = jax.tree.map(lambda leaf: leaf[0], parts.count)
  for i in range(1, parts.rows.shape[0]):
    count = stats.wide_sum(count, jax.tree.map(lambda leaf, i=i: leaf[i], parts.count))
  return Pairs(rows=jnp.where(held, rows, -1), cols=jnp.where(held, cols, -1),
               scores=jnp.where(held, scores, 0.0).astype(x.dtype),
               count=stats.wide_result(count, bound),
               overflowed=stats.wide_greater(count, max_pairs))


def _triangle(x, threshold, limit, *, metric, max_pairs, block_size, mesh, precision):
  """Per-device buffers of the pairs `i < j` of `x`, from the tiles `i <= j` of
  `blockscan.triangle_scan`: every device holds all rows and walks its share of the
  tiles (`sharding.map_devices`), each holding the first `max_pairs` of its pairs."""
  b = stats.triangle_block(x.shape[0], block_size)
  euclid = metric in kernels.DISTANCES
  acc = kernels.accum_dtype(x.dtype)
  # The whole set is one corpus: every device computes the same shift from all rows.
  shift = kernels.centre(x) if euclid else jnp.zeros((1, 1), acc)

  def local(index, count, x, shift, threshold, limit):
    def step(found, r, c, r_start, c_start, r_valid, c_valid):
      # Each block is prepared where it is used: no prepared copy of `x` exists.
      prep = lambda rows: kernels.prepare(rows, metric, shift=shift if euclid else None)
      ids = r_start + jnp.arange(b, dtype=jnp.int32)
      cols = c_start + jnp.arange(b, dtype=jnp.int32)
      # Only the diagonal tile holds pairs i >= j; off it, every row precedes every column.
      upper = (ids[:, None] < cols[None, :]) | (r_start != c_start)
      ok = r_valid[:, None] & c_valid[None, :] & upper
      return _tile_pairs(found, prep(r), prep(c), r, c, ids, cols, ok, threshold, limit,
                         metric=metric, max_pairs=max_pairs, precision=precision)

    return blockscan.triangle_scan(step, _empty(max_pairs, acc), x, block_size=b,
                                   shard=(index, count), remat=False)

  return sharding.map_devices(local, x, shift, threshold, limit, mesh=mesh)


def _cross(x, y, threshold, limit, *, m, metric, max_pairs, block_size, query_block_size, mesh,
           precision):
  """Per-device buffers of the pairs of `x` against the first `m` rows of `y` (the rest
  padding), the `y` rows split over the devices (`sharding.map_shards`)."""
  n = x.shape[0]
  euclid = metric in kernels.DISTANCES
  acc = kernels.accum_dtype(x.dtype)
  shift = kernels.centre(y, mesh=mesh, count=m) if euclid else jnp.zeros((1, 1), acc)
  qb, nb = stats.tile_sizes(n, sharding.shard_rows(y.shape[0], mesh), block_size, query_block_size,
                            block=defaults.stats_block())
  prep = lambda rows, shift: kernels.prepare(rows, metric, shift=shift if euclid else None)

  def local(shard, offset, x, shift, threshold, limit):
    # Rows outer, columns inner: once the buffer is full, later row blocks can only
    # hold later pairs, so they are counted without being extracted. Both sides are
    # prepared a block at a time, inside the loops: no prepared copy of either exists.
    def row_step(found, qrows, qstart, qvalid):
      qp = prep(qrows, shift)
      ids = qstart + jnp.arange(qrows.shape[0], dtype=jnp.int32)
      row_ok = qvalid & (ids < n)

      def col_step(found, block, start, valid):
        cols = offset + start + jnp.arange(block.shape[0], dtype=jnp.int32)
        ok = row_ok[:, None] & (valid & (cols < m))[None, :]
        return _tile_pairs(found, qp, prep(block, shift), qrows, block, ids, cols, ok,
                           threshold, limit, metric=metric, max_pairs=max_pairs,
                           precision=precision)

      return blockscan.block_scan(col_step, found, shard, block_size=nb, pad_tail=False)

    return blockscan.block_scan(row_step, _empty(max_pairs, acc), x, block_size=qb,
                                pad_tail=False)

  return sharding.map_shards(local, y, x, shift, threshold, limit, mesh=mesh)
