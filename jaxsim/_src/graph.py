r"""The k-nearest-neighbour graph of a set: top-k of every row among the same rows.

`jaxsim.topk(x, None, k)` computes what `jaxsim.topk(x, x, k)` computes, from half the
scores. A symmetric similarity has :math:`s(i, j) = s(j, i)`, so the tiles `(i, j)`,
`i <= j`, of row blocks (`blockscan.triangle_scan`) hold every score once. Each tile
is selected twice: its rows feed the running top-k of its row block and its columns
(selected down the columns, without a transposed copy) that of its column block; the
diagonal tile feeds its block once.
The carry is every row's running top-k, `(n, k)` keys and ids: memory is O(n k) plus
O(tiles), never O(n^2), and no prepared copy of the rows is made (a row block is
prepared once for its run of tiles, a column block in each tile, O(b d) against the
tile's O(b^2 d) matmul).

Outside the matmul, a tile costs its selection (`search._merge_tile`'s grouped
running-threshold selection, for both sides) and the pass that turns scores into
keys. An off-diagonal tile, where no self-match can lie, leaves the matmul's output
as it is (`_Lazy`): one elementwise pass with per-row float masks makes the keys for
the group maxima of both sides, and the few chosen groups are gathered from the raw
tile and keyed again (`_merge_lazy`); diagonal tiles, 1 in about n / (2 b) of them,
take the keyed path with the self-match mask.

Ties go to the lower index as in the two-sided search: `triangle_scan` visits tiles
row-major, so every row block meets the column blocks in ascending order, first as the
column side of the tiles `(i, r)`, `i < r`, then as the row side of `(r, j)`, `j >= r`,
and `search.merge_topk` keeps earlier arrivals first. With `mesh=` every device holds
all rows and walks one contiguous run of the row-major tiles (`sharding.map_devices`);
the runs hold increasing column blocks for any one row, so merging the devices' top-k
in device order again breaks ties by lower index. On CPU without a mesh, a large
inner-product graph is split the same way into two runs, walked by two programs from
two threads (`THREADS`).

The Euclidean metrics keep the guarantees of the two-sided search (`jaxsim._src.refine`):
each row's `k + refine.TOPK_EXTRA` best by the expansion are recomputed directly as
`sum((x_i - x_j)**2)`, and where the error bound leaves a row outside them within reach
of the k-th distance, a second triangle pass recomputes every pair within reach.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxsim._src import (
  blockscan,
  defaults,
  distributed,
  kernels,
  refine,
  search,
  sharding,
  stats,
  validation,
)


def default_block(n: int) -> int:
  """Rows per square tile: the backend's top-k tile made square (1024 rows on CPU,
  8192 on GPU and TPU; see `jaxsim._src.defaults`), split into equal blocks, a
  multiple of `search.GROUP`, and never more than `n`."""
  side = 1 << (defaults.topk_tile().bit_length() - 1) // 2
  return min(stats._even_blocks(n, side, search.GROUP), max(n, 1))


def topk_self(x, k, *, metric, block_size, query_block_size, exclude_self, approx,
              recall_target, mesh, precision) -> tuple[jax.Array, jax.Array]:
  """`jaxsim.topk(x, None, k, ...)`: validates, then runs the triangle (see `search.topk`)."""
  kernels.check_metric(metric)
  mesh = distributed.prepare_call(mesh, x, name="queries", k=k, metric=metric,
                                  block_size=block_size, exclude_self=exclude_self,
                                  approx=approx, recall_target=recall_target)
  x, _ = validation.matrices(x, None, x_name="queries")
  k = validation.check_positive_int(k, "k")
  block_size, query_block_size = validation.block_sizes(block_size, query_block_size)
  if query_block_size is not None:
    raise ValueError("`query_block_size` does not apply with `corpus=None`: its tiles are "
                     f"square, of `block_size` rows; got query_block_size={query_block_size}.")
  exclude_self = validation.check_bool(exclude_self, "exclude_self")
  approx = validation.check_bool(approx, "approx")
  n = x.shape[0]
  recall_target = search.check_k_and_recall(
      k, n, exclude_self=exclude_self, recall_target=recall_target, rows="rows",
      shapes=f"queries.shape={x.shape}, corpus=None")
  block = default_block(n) if block_size is None else min(block_size, n)
  if mesh is None:
    # Placed once for both threads (`_in_threads`); a numpy `x` becomes a tracer here
    # inside a caller's program, whose trace it joins. With a mesh the program places it.
    x = jnp.asarray(x)
  run = functools.partial(_topk_self, x, k=k, metric=metric, block=block,
                          exclude_self=exclude_self, approx=approx,
                          recall_target=recall_target, mesh=mesh, precision=precision)
  if _in_threads(x, metric=metric, approx=approx, mesh=mesh):
    parts = _run_in_threads([functools.partial(run, jnp.int32(i), parts=THREADS)
                             for i in range(THREADS)])
    scores, ids = _merge_parts(*(jnp.stack(v) for v in zip(*parts, strict=True)), width=k)
  else:
    scores, ids = run()
  return scores.astype(x.dtype), ids


# On CPU, an inner-product triangle of at least `THREADS_MIN_ROWS` rows outside any
# program or mesh runs as `THREADS` programs, each walking one run of the tiles, started
# from as many threads. XLA:CPU runs one program an operation at a time and its `top_k`
# on one thread, so one program leaves a core idle while it selects; two programs on
# the same device run side by side, one selecting while the other multiplies
# (`experiments/knn_graph.py`). The results are those of one program, merged as a
# two-device mesh merges them.
THREADS = 2
THREADS_MIN_ROWS = 4096


def _in_threads(x, *, metric, approx, mesh) -> bool:
  return (mesh is None and not approx and metric not in kernels.DISTANCES
          and x.shape[0] >= THREADS_MIN_ROWS and not isinstance(x, jax.core.Tracer)
          # A thread sees none of the caller's `jax.default_device` or mesh contexts.
          and jax.config.jax_default_device is None
          and jax.sharding.get_abstract_mesh().empty
          and all(d.platform == "cpu" for d in x.devices()))


def _run_in_threads(calls):
  with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
    futures = [pool.submit(lambda c=c: jax.block_until_ready(c())) for c in calls]
    return [f.result() for f in futures]


def _merge_devices(best: jax.Array, ids: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """Per-device `(devices, n, w)` top-k merged into `(n, width)`, ties to the lower id.

  Device `i`'s run of tiles gives every row lower column ids than device `i + 1`'s, so
  position ties in the concatenation in device order are ties to the lower id.
  """
  if best.shape[0] == 1:
    return best[0], ids[0]
  n = best.shape[1]
  best = jnp.moveaxis(best, 0, 1).reshape(n, -1)
  ids = jnp.moveaxis(ids, 0, 1).reshape(n, -1)
  return search.merge_topk(best[:, :0], ids[:, :0], best, ids, width)


_merge_parts = jax.jit(_merge_devices, static_argnames="width")


class _Lazy(NamedTuple):
  """An off-diagonal tile's scores left as the matmul wrote them, keyed on demand.

  `vals` is the `(b, b)` tile; `key_of(v, row, col)` maps entries `v` of it to ranking
  keys (`search._keys` of the scores) given their rows' and columns' `(flag, mask)`
  (see `_side_info`), broadcast against `v`. It uses only selects, clips and
  minima, which round nothing, so the keys of the group maxima (taken over the whole
  tile) and of the gathered candidates are the same numbers wherever XLA fuses them.
  """
  vals: jax.Array
  key_of: Callable


def _side_info(aux: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row of a block: `flag` (0, or NaN for a row with a non-finite entry, as its
  `aux` marks it for cosine) and `mask` (+inf for a valid row, -inf for padding), as
  floats: with broadcast boolean masks (and the self-match's iota compare) XLA:CPU's
  finish pass ran about 1.7 ms slower a 1024 x 1024 tile, as long as the matmul's
  third of it."""
  return (jnp.where(jnp.isfinite(aux), 0.0, jnp.nan).astype(aux.dtype),
          jnp.where(valid, jnp.inf, -jnp.inf).astype(aux.dtype))


def _masked(key, row, col):
  return jnp.minimum(jnp.minimum(key, row[1]), col[1])


def _take(info, index):
  return tuple(v[index] for v in info)


def _merge_lazy(rb, ri, cb, ci, lazy: _Lazy, row, col, r0, c0, k, floors=(None, None)):
  """Both sides of an off-diagonal tile from its raw scores: one elementwise pass makes
  the keys, feeding the group maxima along the rows and down the columns, and only the
  chosen groups are gathered, from the raw tile, and keyed again."""
  vals, key_of = lazy
  b = vals.shape[0]
  groups, g = b // search.GROUP, search.GROUP
  offsets = jnp.arange(g, dtype=jnp.int32)[None, None, :]
  keys = key_of(vals, _take(row, (slice(None), None)), _take(col, (None, slice(None))))
  row_max = jnp.max(keys.reshape(b, groups, g), axis=-1)
  col_max = jnp.max(keys.reshape(groups, g, b), axis=1).T

  def positions(top):
    return (top[:, :, None] * g + offsets).reshape(top.shape[0], -1)

  def gather_row(top, rows=None):
    pos = positions(top)
    if rows is None:
      cand = jnp.take_along_axis(vals.reshape(b, groups, g), top[:, :, None], axis=1)
      rows = slice(None)
    else:
      cand = vals.reshape(b, groups, g)[rows[:, None], top]
    cand = cand.reshape(pos.shape)
    return key_of(cand, _take(row, (rows, None)), _take(col, pos)), pos + c0

  def gather_col(top, rows=None):
    pos = positions(top)
    if rows is None:
      cand = jnp.take_along_axis(vals.reshape(groups, g, b), top.T[:, None, :], axis=0)
      cand = jnp.transpose(cand, (2, 0, 1))
      rows = slice(None)
    else:
      cand = vals.reshape(groups, g, b)[top[:, :, None], offsets, rows[:, None, None]]
    cand = cand.reshape(pos.shape)
    return key_of(cand, _take(row, pos), _take(col, (rows, None))), pos + r0

  rb, ri = search.merge_groups(rb, ri, row_max, gather_row, k, floor=floors[0])
  cb, ci = search.merge_groups(cb, ci, col_max, gather_col, k, floor=floors[1])
  return rb, ri, cb, ci


def _scan(x, prep, tile, width, extra, *, block, mesh, approx, recall_target, lazy=None,
          finish=None, part=None, drop=None):
  """Every row's streamed top-`width` over the triangle tiles, merged over devices.

  `prep(rows)` prepares a block (`kernels.Prepared`). `tile(rows, cols, rp, cp, r_ids,
  c_ids, keep, *extra)` gives a tile's `(row_keys, col_keys)`, both `(b, b)` (rows x
  columns; `col_keys` is selected down its columns), for raw row blocks `rows` and
  `cols`, prepared as `rp` and `cp`, with global ids `r_ids` and `c_ids`, where `keep`
  marks the valid pairs. `lazy(rp, cp, *extra)`, where given, gives an off-diagonal
  tile as a `_Lazy` instead (the fast path, taken where the grouped selection applies).
  `finish(best, ids, *extra)` maps each device's `(best, ids)` to `(best, ids, *more)`
  before the devices are merged; `more` comes back stacked per device. `part=(index,
  count)` (no mesh): only the `index`-th of `count` runs of the tiles, unmerged, as one
  of `count` devices would walk them. `drop=(k, err)`: the keys are within `err` (`(n,)`,
  per row, for every pair) of the exact ones, so each side skips the candidates that
  `search.drop_below` rules out of its top-k.
  """
  n = x.shape[0]
  acc = kernels.accum_dtype(x.dtype)
  merge = functools.partial(search._merge_tile, k=width, approx=approx,
                            recall_target=recall_target)
  b = min(block, n)
  grouped = not approx and b % search.GROUP == 0 and b // search.GROUP > width
  lazy = lazy if grouped else None

  def local(index, count, x, extra):
    shapes = jax.eval_shape(prep, x[:b])
    init = (jnp.full((n, width), -jnp.inf, acc), jnp.full((n, width), -1, jnp.int32),
            jnp.int32(-1), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def step(carry, rows, cols, r0, c0, r_valid, c_valid):
      best, ids, r_at, r_prep = carry
      # A row block's tiles come in a run: it is prepared once per run, not per tile.
      rp = lax.cond(r_at == r0, lambda: r_prep, lambda: prep(rows))
      cp = prep(cols)
      offsets = jnp.arange(b, dtype=jnp.int32)
      r_ids, c_ids = r0 + offsets, c0 + offsets
      sl = lambda v, at: lax.dynamic_slice_in_dim(v, at, b)
      rb, ri, cb, ci = sl(best, r0), sl(ids, r0), sl(best, c0), sl(ids, c0)
      floors = (None, None) if drop is None else (
          search.drop_below(rb, drop[0], sl(drop[1], r0)[:, None]),
          search.drop_below(cb, drop[0], sl(drop[1], c0)[:, None]))

      def keyed(rb, ri, cb, ci):
        keep = r_valid[:, None] & c_valid[None, :]
        row_key, col_key = tile(rows, cols, rp, cp, r_ids, c_ids, keep, *extra)
        rb, ri = merge(rb, ri, row_key, first=c0, floor=floors[0])
        # The diagonal tile holds its block's scores once; its column side would repeat
        # them.
        cb, ci = lax.cond(r0 == c0, lambda: (cb, ci),
                          lambda: merge(cb, ci, col_key, first=r0, axis=0, floor=floors[1]))
        return rb, ri, cb, ci

      def fast(rb, ri, cb, ci):
        return _merge_lazy(rb, ri, cb, ci, lazy(rp, cp, *extra), _side_info(rp.aux, r_valid),
                           _side_info(cp.aux, c_valid), r0, c0, width, floors)

      if lazy is None:
        rb, ri, cb, ci = keyed(rb, ri, cb, ci)
      else:
        rb, ri, cb, ci = lax.cond(r0 == c0, keyed, fast, rb, ri, cb, ci)
      best = lax.dynamic_update_slice_in_dim(best, rb, r0, 0)
      ids = lax.dynamic_update_slice_in_dim(ids, ri, r0, 0)
      # Written after the row side: the shifted last block overlaps the one before it,
      # where its rows are not valid (their column side changed nothing) and the row
      # side's update must stand. On the diagonal the column side is the row side.
      keep_col = (c_valid & (r0 != c0))[:, None]
      best = lax.dynamic_update_slice_in_dim(best, jnp.where(keep_col, cb, sl(best, c0)), c0, 0)
      ids = lax.dynamic_update_slice_in_dim(ids, jnp.where(keep_col, ci, sl(ids, c0)), c0, 0)
      return best, ids, r0, rp

    best, ids, *_ = blockscan.triangle_scan(step, init, x, block_size=block,
                                            shard=(index, count), remat=False)
    return (best, ids) if finish is None else finish(best, ids, *extra)

  if part is not None:
    return local(*part, x, extra)
  out = sharding.map_devices(local, x, extra, mesh=mesh)
  return (*_merge_devices(out[0], out[1], width), *out[2:])


@functools.partial(jax.jit, static_argnames=(
    "k", "metric", "block", "exclude_self", "approx", "recall_target", "mesh", "precision",
    "parts"))
def _topk_self(x, index=None, *, k, metric, block, exclude_self, approx, recall_target, mesh,
               precision, parts=None):
  """The triangle's top-k; with `parts`, inner-product metrics only, the unmerged top-k of
  the `index`-th of `parts` runs of its tiles (see `_in_threads`)."""
  euclid = metric in kernels.DISTANCES
  shift = kernels.centre(x) if euclid else None
  prep = lambda rows: kernels.prepare(rows, metric, shift=shift)
  opts = dict(block=block, mesh=mesh, approx=approx, recall_target=recall_target)

  def keep_of(keep, r_ids, c_ids):
    return keep & (r_ids[:, None] != c_ids[None, :]) if exclude_self else keep

  lowest = jnp.finfo(kernels.accum_dtype(x.dtype)).min

  if not euclid:
    def tile(rows, cols, rp, cp, r_ids, c_ids, keep):
      key = search._keys(kernels.score(rp, cp, metric, precision=precision), metric,
                         keep_of(keep, r_ids, c_ids))
      return key, key

    if metric == "cosine":
      # `kernels.finish_cosine` and `search._keys`: the clipped dot product, the lowest
      # finite key where a row has a non-finite entry, -inf for padding.
      def key_of(v, row, col):
        return _masked(jnp.where(jnp.isnan(row[0] + col[0]), lowest, jnp.clip(v, -1.0, 1.0)),
                       row, col)
    else:
      def key_of(v, row, col):
        return _masked(jnp.where(v >= lowest, v, lowest), row, col)

    def lazy(rp, cp):
      vals = (kernels.matmul_t(rp.rows, cp.rows, precision) if metric == "cosine"
              else kernels.score(rp, cp, metric, precision=precision))
      return _Lazy(vals, key_of)

    return _scan(x, prep, tile, k, (), lazy=lazy, part=None if parts is None else (index, parts),
                 **opts)

  # Euclidean: as `search.topk_prepared`, (1) each device's k + TOPK_EXTRA best by the
  # expansion, recomputed directly; (2) where the bound leaves a row outside them within
  # reach of the k-th distance, a second pass over the tiles recomputing every pair in
  # reach. Keys are negated squared distances.
  d = x.shape[1]
  acc = kernels.accum_dtype(x.dtype)
  width = min(k + refine.TOPK_EXTRA, x.shape[0])
  aux = prep(x).aux
  aux_max = jnp.max(jnp.where(jnp.isfinite(aux), aux, 0.0))
  err = refine.error_bound(aux, aux_max[None], d, x.dtype)[:, 0]

  def expansion(rows, cols, rp, cp, r_ids, c_ids, keep):
    s = kernels.score(rp, cp, "sq_euclidean", precision=precision)
    key = search._keys(s, metric, keep_of(keep, r_ids, c_ids))
    return key, key

  def expansion_lazy(rp, cp):
    # The keys' arithmetic (|x|^2 + |y|^2 - 2 x.y) is done once, in one fusion, and
    # kept (the barrier): fused into two consumers it could round differently in each.
    key = search._keys(kernels.score(rp, cp, "sq_euclidean", precision=precision), metric,
                       jnp.bool_(True))
    return _Lazy(lax.optimization_barrier(key), _masked)

  def exact_candidates(hat, hat_ids):
    worst = hat[:, -1]

    # Refined in place, block by block: each block's candidates are read from the carry
    # just before they are overwritten, so no second (n, width) pair is held. Row blocks
    # are sliced in place (`pad_tail=False`, no padded copy of `x`); the shifted last
    # block refines some rows again, which leaves them as they are.
    def refine_rows(out, rows, start, valid):
      del valid
      hat_b, ids_b = (lax.dynamic_slice_in_dim(v, start, rows.shape[0]) for v in out)
      new = search._refine_candidates(rows, hat_b, ids_b, x, shift, None, raw=True)
      return tuple(lax.dynamic_update_slice_in_dim(o, v, start, 0)
                   for o, v in zip(out, new, strict=True))

    qr = max(8, defaults.stats_tile() // (width * d))
    best, ids = blockscan.block_scan(refine_rows, (hat, hat_ids), x, block_size=qr,
                                     pad_tail=False, remat=False)
    # Every row this device scored for row i outside its candidates has an expansion
    # >= the worst candidate's, hence a squared distance >= `floor`, or was dropped as
    # out of the top-k (`drop`).
    floor = jnp.where(worst > -jnp.inf, -worst - err, jnp.inf)
    return best, ids, floor

  best, ids, floor = _scan(x, prep, expansion, width, (), lazy=expansion_lazy,
                           finish=exact_candidates, drop=(k, err), **opts)
  best, ids = best[:, :k], ids[:, :k]
  kth = -best[:, k - 1]  # the k-th direct squared distance (+inf when non-finite)
  open_ = jnp.isfinite(kth) & jnp.any(floor <= kth[None, :], axis=0)

  def second(_):
    def tile(rows, cols, rp, cp, r_ids, c_ids, keep, kth, open_):
      s = kernels.score(rp, cp, "sq_euclidean", precision=precision)
      reach = s - refine.error_bound(rp.aux, cp.aux, d, x.dtype)
      keep = keep_of(keep, r_ids, c_ids)
      row_maybe = keep & open_[r_ids][:, None] & (reach <= kth[r_ids][:, None])
      col_maybe = keep & open_[c_ids][None, :] & (reach <= kth[c_ids][None, :])
      s = refine.refine_where(s, row_maybe | col_maybe,
                              lambda r, c: refine.direct_sq(rows[r], cols[c], acc))
      return jnp.where(row_maybe, -s, -jnp.inf), jnp.where(col_maybe, -s, -jnp.inf)

    again, again_ids = _scan(x, prep, tile, k, (kth, open_), **opts)
    keep = open_[:, None]
    return jnp.where(keep, again, best), jnp.where(keep, again_ids, ids)

  best, ids = lax.cond(jnp.any(open_), second, lambda _: (best, ids), None)
  dist = -best
  if metric == "euclidean":
    dist = kernels.safe_sqrt(dist)
  lowest = jnp.finfo(acc).min
  # As `search.topk_prepared`: non-finite distances rank last, reported as the largest
  # finite value; abs turns the -0.0 of a negated zero key into 0.0.
  return jnp.abs(jnp.where(dist <= -lowest, dist, -lowest)), ids


def knn_graph(scores: ArrayLike, indices: ArrayLike, *, n_cols: int | None = None,
              mode: str = "connectivity", format: str = "bcoo"):
  """A top-k result as a sparse `(n, n_cols)` matrix, as scikit-learn's
  `kneighbors_graph` returns it.

  Row `i` holds an entry at column `indices[i, j]` for each of its `k` neighbours:
  1.0 (`mode="connectivity"`) or `scores[i, j]` (`mode="distance"`; the metric's own
  units, so distances for `"euclidean"` as in scikit-learn, similarities otherwise).
  An entry of 0 (a duplicate row at distance 0) is stored explicitly, as scikit-learn
  stores it. `jaxsim.topk(x, None, k, metric="euclidean", exclude_self=True)` followed
  by `knn_graph(..., mode="distance", format="csr")` is
  `sklearn.neighbors.kneighbors_graph(x, k, mode="distance")`.

  Args:
    scores: `(n, k)` scores, as `jaxsim.topk` returns them.
    indices: `(n, k)` integer column ids in `[0, n_cols)`.
    n_cols: the number of columns (corpus rows); default `n`, the graph of one set.
    mode: `"connectivity"` (ones) or `"distance"` (the scores).
    format: `"bcoo"` for a `jax.experimental.sparse.BCOO`, `"csr"` for a
      `scipy.sparse.csr_matrix` (scipy needed; each row's entries in neighbour order,
      best first, as scikit-learn's).

  Returns:
    The `(n, n_cols)` sparse matrix of `n * k` entries, in the scores' dtype.

  Raises:
    ValueError: shapes that differ or are not 2-D, an unknown `mode` or `format`,
      indices outside `[0, n_cols)` (checked for concrete arrays).
    TypeError: non-integer `indices`.
    ImportError: `format="csr"` without scipy.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> x = jnp.array([[0.], [1.], [3.]])
    >>> dist, idx = jaxsim.topk(x, None, 1, metric="euclidean", exclude_self=True)
    >>> jaxsim.knn_graph(dist, idx, mode="distance").todense()
    Array([[0., 1., 0.],
           [1., 0., 0.],
           [0., 2., 0.]], dtype=float32)
  """
  from jax.experimental import sparse

  if mode not in ("connectivity", "distance"):
    raise ValueError(f"`mode` must be 'connectivity' or 'distance', got {mode!r}.")
  if format not in ("bcoo", "csr"):
    raise ValueError(f"`format` must be 'bcoo' or 'csr', got {format!r}.")
  scores = jnp.asarray(validation.as_float_array(scores, "scores"))
  indices = jnp.asarray(indices) if not isinstance(indices, jax.Array) else indices
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"`indices` must be integers, got dtype {indices.dtype}.")
  if scores.ndim != 2 or scores.shape != indices.shape:
    raise ValueError("`scores` and `indices` must be 2-D arrays of one shape (n, k), got "
                     f"scores.shape={scores.shape} and indices.shape={indices.shape}.")
  n, k = indices.shape
  n_cols = n if n_cols is None else validation.check_positive_int(n_cols, "n_cols")
  if not isinstance(indices, jax.core.Tracer) and indices.size:
    lo, hi = int(jnp.min(indices)), int(jnp.max(indices))
    if lo < 0 or hi >= n_cols:
      raise ValueError(f"`indices` must lie in [0, n_cols={n_cols}), got values in "
                       f"[{lo}, {hi}] (indices.shape={indices.shape}).")
  data = jnp.ones_like(scores) if mode == "connectivity" else scores
  if format == "csr":
    try:
      import scipy.sparse
    except ImportError as err:
      raise ImportError("`format='csr'` needs scipy: pip install scipy.") from err
    return scipy.sparse.csr_matrix(
        (np.asarray(data).ravel(), np.asarray(indices).ravel(), np.arange(0, n * k + 1, k)),
        shape=(n, n_cols))
  rows = jnp.broadcast_to(jnp.arange(n, dtype=indices.dtype)[:, None], (n, k))
  coords = jnp.stack([rows.ravel(), indices.ravel()], axis=1)
  return sparse.BCOO((data.ravel(), coords), shape=(n, n_cols), unique_indices=True)
