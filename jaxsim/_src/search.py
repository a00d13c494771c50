"""Exact top-k search, streamed over corpus blocks.

A client of `blockscan`: the corpus is walked in blocks by `block_scan`, the queries
in blocks by `block_map`, and each (query block, corpus block) tile of scores is
merged into each query's running top-k as soon as it is computed, so the full
`q x n` matrix is never built. With `mesh=` the corpus is also split across devices
by `sharding.map_shards` and the per-device results merged.

Scores come from `kernels.prepare` and `kernels.score`, the same numbers the dense
`jaxsim.pairwise` computes. The queries are prepared once up front; each corpus block
is prepared once, inside the scan step that consumes it (still once per corpus row:
the corpus is the outer loop), because a separate pass that writes a prepared copy of
a large corpus costs more than the prepare itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxsim._src import (
  blockscan,
  defaults,
  distributed,
  kernels,
  lowprec,
  refine,
  sharding,
  stats,
  validation,
)

# The prefilter's group size: each tile's top-k is taken among the k best groups of
# `GROUP` consecutive corpus rows (ranked by their maximum), which is exact (every
# top-k element lies in one of those groups) and makes the costly per-row selection
# work on 1/GROUP of the tile.
GROUP = 32
# The passing-group counts up to which `_merge_tile` gathers only the passing groups
# (those below the running width: 16 serves the bfloat16 scan's 24).
FEW = (1, 2, 4, 8, 16)
# Scores of -inf or NaN become the lowest finite value of the accumulation dtype, so
# that they still rank below every real score but above padding and excluded entries
# (-inf): padding can then never be returned.


def _keys(s: jax.Array, metric: str, keep: jax.Array) -> jax.Array:
  """Ranking keys of a score tile: larger is better, masked entries -inf."""
  key = -s if metric in kernels.DISTANCES else s
  lowest = jnp.finfo(key.dtype).min
  key = jnp.where(key >= lowest, key, lowest)  # -inf and NaN rank last
  return jnp.where(keep, key, -jnp.inf)


def _merge_tile(best: jax.Array, best_ids: jax.Array, key: jax.Array, first: jax.Array, k: int,
                approx: bool, recall_target: float, axis: int = 1, floor: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """The running top-k of each row updated with one tile of keys.

  Only keys above a row's current k-th (`best[:, k - 1]`) can enter it: an equal key
  has a higher id than every current one, so the tie stays with `best`. Each group of
  `GROUP` columns is tested once against that threshold by its maximum, and the tile's
  cost follows the largest number of passing groups in any row: none skips the tile,
  up to `FEW[-1]` gathers only those groups (found in index order by a few min
  reductions, cheap vector passes), and more takes the `k` best groups by maximum
  with `top_k`. Sorting work (XLA:CPU's `top_k` is a per-row partial sort, about
  10 ns an element) then drops from `k * GROUP + k` elements a row to `m * GROUP + k`
  once the thresholds settle, and to none for tiles that change nothing. Every path
  returns the same, exact result.

  Args:
    best, best_ids: `(c, k)` current top-k keys (descending) and their corpus ids,
      all smaller than the tile's ids, so ties stay with the lower id.
    key: `(c, b)` keys of corpus rows `first ... first + b - 1`; with `axis=0`,
      `(b, c)`: the same keys transposed, as a triangle tile's column side holds them.
      Selecting down the columns reads the tile as it lies, where transposing it
      first costs a copy of the whole tile.
    floor: optional `(c, 1)` keys below which a row's candidates are known not to
      matter; groups are tested against it where it is above the k-th (see
      `merge_groups`).
  """
  if axis == 0:
    b, c = key.shape
  else:
    c, b = key.shape
  groups = b // GROUP
  if axis == 0 and (approx or b % GROUP or groups <= k):
    key = key.T  # the small-tile and approximate paths
  if approx and b >= k:
    cand, pos = lax.approx_max_k(key, k, recall_target=recall_target)
    return merge_topk(best, best_ids, cand, pos.astype(jnp.int32) + first, k)
  if b % GROUP or groups <= k:
    ids = jnp.broadcast_to(first + jnp.arange(b, dtype=jnp.int32), key.shape)
    return merge_topk(best, best_ids, key, ids, k)
  offsets = jnp.arange(GROUP, dtype=jnp.int32)[None, None, :]
  if axis == 0:
    grouped = key.reshape(groups, GROUP, c)
    group_max = jnp.max(grouped, axis=1).T
  else:
    grouped = key.reshape(c, groups, GROUP)
    group_max = jnp.max(grouped, axis=-1)

  def gather(top, rows=None):
    if rows is None and axis == 0:  # only the chosen groups are transposed
      cand = jnp.take_along_axis(grouped, top.T[:, None, :], axis=0)
      cand = jnp.transpose(cand, (2, 0, 1))
    elif rows is None:
      cand = jnp.take_along_axis(grouped, top[:, :, None], axis=1)
    elif axis == 0:
      cand = grouped[top[:, :, None], offsets, rows[:, None, None]]
    else:
      cand = grouped[rows[:, None], top]
    ids = (top[:, :, None] * GROUP + offsets).reshape(top.shape[0], -1) + first
    return cand.reshape(ids.shape), ids

  return merge_groups(best, best_ids, group_max, gather, k, floor=floor)


# The sparse path of `merge_groups`: at most 1 / SPARSE of a tile's rows with a passing
# group.
SPARSE = 4


def merge_groups(best: jax.Array, best_ids: jax.Array, group_max: jax.Array, gather, k: int,
                 *, floor: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The running top-k of each row updated with the groups of one tile that can enter it.

  Args:
    best, best_ids: `(c, k)` current top-k keys (descending) and their ids, all lower
      than the tile's.
    group_max: `(c, groups)` each row's maximum key in each group of `GROUP` columns.
    gather: `gather(top, rows=None) -> (keys, ids)`, `(r, m * GROUP)` each: the keys and
      ids of the groups `top` (`(r, m)`, ascending group indices) of every row, or of
      the rows `rows` (`(r,)`) only; groups in index order keep the candidates sorted by
      id, so that `top_k` (which breaks ties by position) breaks them by lower id.
    floor: optional `(c, 1)` per-row keys: groups whose maximum is not above it (nor
      above the k-th) are skipped. The caller vouches that no key below it can change
      its result (`drop_below`). NaN is ignored.

  The branch follows the most passing groups in any row (see `_merge_tile`); when at
  most 1 / `SPARSE` of the rows have any, only those rows (padded with one that has
  none, which the merge leaves as it is) take the selection, since XLA:CPU's `top_k`
  costs about 1 us a row whatever it finds.
  """
  c, groups = group_max.shape
  kth = best[:, k - 1:]
  passing = group_max > (kth if floor is None else jnp.where(floor > kth, floor, kth))

  def full(_):
    _, top = lax.top_k(group_max, k)
    return merge_topk(best, best_ids, *gather(jnp.sort(top, axis=-1)), k)

  def sparse(_):
    rows = jnp.nonzero(active, size=c // SPARSE, fill_value=jnp.argmin(active))[0]
    _, top = lax.top_k(group_max[rows], k)
    new = merge_topk(best[rows], best_ids[rows], *gather(jnp.sort(top, axis=-1), rows), k)
    return best.at[rows].set(new[0]), best_ids.at[rows].set(new[1])

  def few(m):
    def select(_):
      index = jnp.arange(groups, dtype=jnp.int32)[None, :]
      prev = jnp.full((c, 1), -1, jnp.int32)
      tops = []
      for _ in range(m):  # the next passing group after `prev` (`groups`: none left)
        prev = jnp.min(jnp.where(passing & (index > prev), index, groups), axis=1, keepdims=True)
        tops.append(prev)
      top = jnp.concatenate(tops, axis=1)
      cand, ids = gather(jnp.minimum(top, groups - 1))
      cand = jnp.where(jnp.repeat(top < groups, GROUP, axis=1), cand, -jnp.inf)
      return merge_topk(best, best_ids, cand, ids, k)

    return select

  levels = tuple(m for m in FEW if m < k)
  most = jnp.max(jnp.sum(passing, axis=1, dtype=jnp.int32))
  branch = sum((most > m).astype(jnp.int32) for m in (0, *levels))
  branches = [lambda _: (best, best_ids), *map(few, levels), full]
  if c >= 2 * SPARSE:
    active = jnp.any(passing, axis=1)
    few_rows = (jnp.sum(active, dtype=jnp.int32) <= c // SPARSE) & (branch > 0)
    branch = jnp.where(few_rows, len(branches), branch)
    branches.append(sparse)
  return lax.switch(branch, branches, None)


def merge_topk(best: jax.Array, best_ids: jax.Array, key: jax.Array, ids: jax.Array,
               k: int) -> tuple[jax.Array, jax.Array]:
  """The `k` largest of `best` and `key` (`(c, .)` keys with their ids), best first.

  `best` must hold lower ids than `key`: `top_k` breaks ties by position, so position
  ties are then ties to the lower id.
  """
  merged, pos = lax.top_k(jnp.concatenate([best, key], axis=1), k)
  return merged, jnp.take_along_axis(jnp.concatenate([best_ids, ids], axis=1), pos, axis=1)


@sharding.auto_axes(sharding.replicated)
def topk(queries: ArrayLike, corpus: ArrayLike | None, k: int, *, metric: kernels.Metric = "cosine",
         block_size: int | None = None, query_block_size: int | None = None,
         exclude_self: bool = False, approx: bool = False, recall_target: float = 0.95,
         mesh: jax.sharding.Mesh | None = None, precision=None) -> tuple[jax.Array, jax.Array]:
  r"""The `k` best corpus rows for every query, without the `q x n` score matrix.

  Exact by default: equal to sorting each row of `jaxsim.pairwise(queries, corpus)`
  (stably, best first), so equal scores go to the lower corpus index, whatever the
  block sizes and the number of devices; padding never appears. The scores are the
  matmul's results in float32 (float64 for float64 inputs), which for differently
  shaped tiles can differ in the last bit, so scores equal only up to rounding may
  order either way, as they may between any two BLAS libraries.

  .. math:: \mathrm{topk}_i = \operatorname{arg\,top}_k\, \{ s(q_i, c_j) : j < n \}

  The corpus is streamed in blocks of `block_size` rows with a running merge of each
  row's top-k, and queries are taken `query_block_size` at a time, so temporaries
  are O(query_block x block_size) (about two tiles), never O(q x n). The defaults
  depend on the backend (`jaxsim._src.defaults`): on CPU, equal corpus blocks of at
  most about 4096 rows and tiles of 2**21 scores (8 MiB), the fastest tried on a
  2-core CPU (`experiments/search_bench.py`); on GPU and TPU, 16384 rows and 2**26
  scores. Each corpus row is prepared (normalised, centred) once, in the step that
  scores it. On TPU, `approx=True` is the fast path.

  On a CPU with AVX512-BF16 or AMX (`defaults.lowprec_search`), a large float32 search
  by `"cosine"`, `"dot"` or `"scaled_dot"` at the default `precision`, over at least
  `lowprec.MIN_ROWS` (65,536) corpus rows per device, scores its tiles
  as bfloat16 x bfloat16 -> float32 matmuls (about twice the float32 rate), keeps
  about `2 k` candidates per query, rescores them in float32 and proves, per query,
  with the rounding bound of `jaxsim._src.lowprec`, that no other row can reach the
  k-th score; the few queries it cannot prove (near-ties at the bfloat16 scale) are
  searched again in float32. The results are the float32 search's (the rescored
  scores may differ from the tiles' in the last bit, so scores equal up to rounding
  may order either way, as above).

  Args:
    queries: `(q, d)` query rows.
    corpus: `(n, d)` corpus rows, or None for the k-nearest-neighbour graph of
      `queries` itself: the same results as `topk(queries, queries, k, ...)` (`n = q`,
      `exclude_self` as there), computed from the tiles `(i, j)`, `i <= j`, of one
      triangle (`jaxsim._src.graph`), about half the matmul work (the selection still
      runs for both sides of each tile; `experiments/knn_graph.py` measures the time).
      Its tiles are square, `block_size` rows a side (default 1024 rows on CPU, 8192 on
      GPU and TPU), and `query_block_size` must be None; with `mesh`, every device
      holds all the rows and scores its share of the tiles. On CPU, from 4096 rows, an
      inner-product graph called outside a program runs as two programs on two threads,
      one selecting while the other multiplies (`jaxsim._src.graph`). `jaxsim.knn_graph`
      turns the result into a sparse matrix.
    k: results per query, `1 <= k <= n` (`k <= n - 1` with `exclude_self`).
    metric: one of `"dot"`, `"cosine"`, `"scaled_dot"` (largest first) or
      `"sq_euclidean"`, `"euclidean"` (nearest first).
    block_size: corpus rows per block (default: equal blocks of at most about 4096,
      16384 on GPU and TPU). A multiple of 32 enables the exact group prefilter that
      keeps per-block selection cheap.
    query_block_size: queries per tile (default: 2**21 // block_size; 2**26 //
      block_size on GPU and TPU).
    exclude_self: queries and corpus are the same rows (`q == n`, in the same order);
      drop the match of query `i` with corpus row `i`.
    approx: select each block's candidates with `lax.approx_max_k` (fast on TPU, exact
      elsewhere); then ties are not ordered and recall is about `recall_target` (the
      target applies to each block's selection; the merge is exact).
    recall_target: `approx=True` only; the expected recall of `lax.approx_max_k`.
    mesh: a `jax.sharding.Mesh`; the corpus rows are split across all its devices,
      each computes its local top-k and the results are merged, ties again to the
      lower index (the same indices as the single-device call). A corpus whose row
      count does not divide the devices is first placed as even shards, once, as
      `jaxsim.shard_rows` places rows spread over processes.
    precision: `jax.lax.Precision` passed to the matmul; any value but None also
      keeps every tile in float32 (no bfloat16 scoring).

  Returns:
    `(scores, indices)`, each `(q, k)`, best first: `scores` in the metric's own units
    (similarities, or distances for the Euclidean metrics) in the inputs' floating
    dtype, computed as `jaxsim.pairwise` does; `indices` int32 corpus rows. For the
    Euclidean metrics the ranking and the distances are those of the direct
    differences `sum((q - c)**2)` (see `jaxsim._src.refine`): near-duplicates are in
    their true order, and a row equal to a query is at exactly 0 and ranks first
    (before later equal rows). A score of -inf or NaN (a row with an infinite or NaN
    entry, at any size) ranks last and is reported as the lowest finite value of the
    accumulation dtype (its negation for distances), which is -inf (+inf) once cast
    back to float16 or bfloat16.

  Raises:
    ValueError: for inputs that are not 2-D, mismatched feature dims, an unknown
      metric, `k` out of range, `exclude_self` with `q != n`, bad block sizes, or a
      `recall_target` outside (0, 1].
    TypeError: for complex or non-numeric inputs, a `mesh` that is not a `Mesh`, or a
      `recall_target` that is not a number.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> corpus = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
    >>> scores, idx = jaxsim.topk(jnp.array([[1., 0.1]]), corpus, 2)
    >>> idx
    Array([[0, 2]], dtype=int32)
    >>> _, graph = jaxsim.topk(corpus, None, 1, exclude_self=True)  # each row's neighbour
    >>> graph[:, 0]
    Array([2, 2, 0], dtype=int32)
  """
  mesh = sharding.check_mesh(mesh)
  if corpus is None:
    # `graph` builds on this module's selection, so it is imported here, not at the top.
    from jaxsim._src import graph

    return graph.topk_self(queries, k, metric=metric, block_size=block_size,
                           query_block_size=query_block_size, exclude_self=exclude_self,
                           approx=approx, recall_target=recall_target, mesh=mesh,
                           precision=precision)
  corpus = distributed.place_rows(corpus, mesh)
  if distributed.placed(corpus):
    return distributed.topk(queries, corpus, k, mesh=mesh, metric=metric, block_size=block_size,
                            query_block_size=query_block_size, exclude_self=exclude_self,
                            approx=approx, recall_target=recall_target, precision=precision)
  corpus, count = distributed.real_rows(corpus)
  kernels.check_metric(metric)
  mesh = distributed.prepare_call(mesh, corpus, queries=queries, k=k, metric=metric,
                                  block_size=block_size, query_block_size=query_block_size,
                                  exclude_self=exclude_self, approx=approx,
                                  recall_target=recall_target)
  queries, corpus = validation.matrices(queries, corpus, x_name="queries", y_name="corpus")
  k = validation.check_positive_int(k, "k")
  block_size, query_block_size = validation.block_sizes(block_size, query_block_size)
  exclude_self = validation.check_bool(exclude_self, "exclude_self")
  approx = validation.check_bool(approx, "approx")
  q, n = queries.shape[0], corpus.shape[0] if count is None else count
  shape = (n, corpus.shape[1])
  if exclude_self and q != n:
    raise ValueError("`exclude_self=True` needs the queries to be the corpus rows, got "
                     f"queries.shape={queries.shape} and corpus.shape={shape}.")
  recall_target = check_k_and_recall(k, n, exclude_self=exclude_self, recall_target=recall_target,
                                     rows="corpus rows", shapes=f"corpus.shape={shape}")
  if q == 0:
    return jnp.zeros((0, k), queries.dtype), jnp.zeros((0, k), jnp.int32)
  # Decided here, outside `jit`, so that `lowprec.FORCE` is part of the cache key.
  bf16 = lowprec.use(queries.dtype if corpus.dtype == queries.dtype else None, metric=metric,
                     precision=precision, approx=approx, work=q * n * queries.shape[1],
                     rows=sharding.shard_rows(n, mesh), k=k)
  return _topk(queries, corpus, n=n, k=k, metric=metric, block_size=block_size,
               query_block_size=query_block_size, exclude_self=exclude_self, approx=approx,
               recall_target=recall_target, mesh=mesh, precision=precision, bf16=bf16)


def check_k_and_recall(k: int, n: int, *, exclude_self: bool, recall_target, rows: str,
                       shapes: str) -> float:
  """`k` against the `n` rows it selects from, and `recall_target` in (0, 1] (as a
  float); the checks `topk` shares with the triangle of `topk(x, None)`."""
  if k > (n - 1 if exclude_self else n):
    bound = "n - 1 (exclude_self=True)" if exclude_self else f"n, the number of {rows}"
    raise ValueError(f"`k` must be at most {bound}: got k={k} with n={n} ({shapes}).")
  recall_target = validation.check_scalar(recall_target, "recall_target")
  if isinstance(recall_target, jax.core.Tracer) or not 0.0 < float(recall_target) <= 1.0:
    raise ValueError(f"`recall_target` must be a number in (0, 1], got {recall_target!r}.")
  return float(recall_target)


@functools.partial(jax.jit, static_argnames=(
    "n", "k", "metric", "block_size", "query_block_size", "exclude_self", "approx",
    "recall_target", "mesh", "precision", "bf16"))
def _topk(queries, corpus, *, n, k, metric, block_size, query_block_size, exclude_self, approx,
          recall_target, mesh, precision, bf16=None):
  euclid = metric in kernels.DISTANCES
  shift = kernels.centre(corpus, mesh=mesh, count=n) if euclid else jnp.zeros((1, 1))
  qp = kernels.prepare(queries, metric, shift=shift if euclid else None)
  prepare_block = lambda block, shift: kernels.prepare(
      block, metric, shift=shift if euclid else None)
  scores, ids = topk_prepared(qp, corpus, shift, prepare_block, n, k=k,
                              metric=metric, block_size=block_size,
                              query_block_size=query_block_size, exclude_self=exclude_self,
                              approx=approx, recall_target=recall_target, mesh=mesh,
                              precision=precision, queries=queries, bf16=bf16)
  return scores.astype(queries.dtype), ids


def topk_prepared(qp: kernels.Prepared, corpus, shift: jax.Array, prepare_block, n, *, k: int,
                  metric: str, block_size: int | None, query_block_size: int | None,
                  exclude_self: bool = False, approx: bool = False, recall_target: float = 0.95,
                  mesh=None, precision=None, queries: jax.Array | None = None,
                  bf16: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """The streamed top-k behind `topk` and `Index.search`; call it inside `jit`.

  Args:
    qp: prepared `(q, d)` queries.
    corpus: pytree of arrays whose leaves share the row axis 0 (`N` rows, of which the
      first `n` are real): raw rows, or rows already prepared (a `kernels.Prepared`).
    shift: array passed (replicated) to `prepare_block` on every device.
    prepare_block: `prepare_block(block, shift) -> kernels.Prepared` for a block of
      `corpus`; the identity on the rows for an already prepared corpus.
    n: the number of real corpus rows, a Python int or a traced int32 scalar; rows
      from `n` on are never returned.
    queries: Euclidean metrics only; the raw `(q, d)` queries, when `corpus` holds
      raw rows (its first leaf). The `k + refine.TOPK_EXTRA` best candidates by the
      expansion are then recomputed as `sum((query - row)**2)` from the raw rows.
      Without it they are recomputed from the prepared (centred) rows, `qp.rows` and
      `prepare_block(rows)`, which is exact for equal rows but, for float32 rows far
      from the shift, less accurate (see `jaxsim._src.refine`).
    bf16: score the tiles in bfloat16 first (`jaxsim._src.lowprec`; inner-product
      metrics on float32 rows only, the same results); None: `lowprec.use` decides.

  Returns:
    `(scores, ids)`, `(q, k)`, in the accumulation dtype, best first.
  """
  euclid = metric in kernels.DISTANCES
  q = qp.rows.shape[0]
  rows_total = jax.tree.leaves(corpus)[0].shape[0]
  qb, nb = stats.tile_sizes(q, sharding.shard_rows(rows_total, mesh), block_size,
                            query_block_size, multiple=GROUP, tile=defaults.topk_tile())
  # Padding the queries once to whole blocks makes `block_map`'s blocking a reshape.
  q_pad = -(-q // qb) * qb
  pad = lambda v: jnp.pad(v, ((0, q_pad - q),) + ((0, 0),) * (v.ndim - 1))
  padded = (pad(qp.rows), pad(qp.aux), jnp.arange(q_pad, dtype=jnp.int32))
  acc = qp.aux.dtype
  n = jnp.asarray(n, jnp.int32)

  def scan(tile, width, extra, finish=None, padded=padded, low=False, aside=(), err=None):
    """The streamed top-`width` keys that `tile(qp_block, block, bp, keep, *extra)`
    gives each tile, per device; `finish(best, ids, shard, offset, aux_max, padded,
    shift, *extra)` then maps each device's `(best, ids)` (with the largest finite corpus `aux` it
    saw) to `(best, ids, *more)` before the devices' results are merged (`finish` gets
    `*extra, *aside`: `aside` is passed to it only, not to `tile`). `padded`:
    the (padded) query rows, aux and ids. `low`: `bp.rows` are the blocks' prepared
    rows rounded to bfloat16 (`lowprec.split`), and `aux_max` the `lowprec.Norms`
    maxima of the rows (those with a finite `aux`) instead. `err(aux, extra_block,
    aux_max)`: optional `(rows, 1)` bound on how far a query block's keys lie from the
    exact ones, from its queries' `aux` and the corpus maxima so far (this block's
    included); the merge then skips what `drop_below` rules out of the top-`k`."""
    q_pad = padded[0].shape[0]

    def local(shard, offset, padded, extra, shift, n, aside):
      zero = jnp.zeros((), acc)
      init = (jnp.full((q_pad, width), -jnp.inf, acc), jnp.full((q_pad, width), -1, jnp.int32),
              lowprec.Norms(zero, zero, zero) if low else zero)

      def step(carry, block, start, valid):
        bp = prepare_block(block, shift)
        first = offset + start
        cols = first + jnp.arange(bp.rows.shape[0], dtype=jnp.int32)
        col_ok = valid & (cols < n)
        if low:
          # Rows with a non-finite `aux` (cosine: a non-finite entry) score NaN
          # exactly, in both precisions, so they do not widen the bound.
          split = lowprec.split(bp.rows)
          aux_max = lowprec.Norms.combine(carry[2], split.norms.max(col_ok & jnp.isfinite(bp.aux)))
          bp = kernels.Prepared(split.low, bp.aux)
        else:
          aux_max = jnp.maximum(carry[2], jnp.max(jnp.where(col_ok & jnp.isfinite(bp.aux), bp.aux,
                                                            0.0)))

        def one(args):
          best, best_ids, rows, aux, ids, *more = args
          qp_block = kernels.Prepared(rows, aux)
          keep = col_ok[None, :]
          if exclude_self:
            keep = keep & (ids[:, None] != cols[None, :])
          key = tile(qp_block, block, bp, keep, *more)
          floor = None if err is None else drop_below(best, k, err(aux, more, aux_max))
          return _merge_tile(best, best_ids, key, first, width, approx, recall_target,
                             floor=floor)

        best, best_ids = blockscan.block_map(one, (*carry[:2], *padded, *extra), block_size=qb)
        return best, best_ids, aux_max

      best, best_ids, aux_max = blockscan.block_scan(step, init, shard, block_size=nb,
                                                     pad_tail=False)
      if finish is None:
        return best, best_ids
      return finish(best, best_ids, shard, offset, aux_max, padded, shift, *extra, *aside)

    out = sharding.map_shards(local, corpus, padded, extra, shift, n, aside, mesh=mesh)
    best, best_ids, more = out[0], out[1], out[2:]
    if best.shape[0] > 1:
      # Shards in device order hold increasing ids, so position ties are id ties.
      best = jnp.moveaxis(best, 0, 1).reshape(q_pad, -1)
      best_ids = jnp.moveaxis(best_ids, 0, 1).reshape(q_pad, -1)
      best, pos = lax.top_k(best, width)
      best_ids = jnp.take_along_axis(best_ids, pos, axis=1)
    else:
      best, best_ids = best[0], best_ids[0]
    return (best, best_ids, *more)

  if not euclid:
    exact_tile = lambda qp_block, block, bp, keep: _keys(
        kernels.score(qp_block, bp, metric, precision=precision), metric, keep)
    d = qp.rows.shape[-1]
    corpus_dtype = jax.tree.leaves(corpus)[0].dtype
    if bf16 is None:
      bf16 = lowprec.use(qp.rows.dtype if corpus_dtype == qp.rows.dtype else None,
                         metric=metric, precision=precision, approx=approx,
                         work=q * rows_total * d, rows=sharding.shard_rows(rows_total, mesh),
                         k=k)
    if not bf16:
      best, best_ids = scan(exact_tile, k, ())
      return best[:q], best_ids[:q]
    best, best_ids = _lowprec_topk(scan, exact_tile, padded, q, k=k, metric=metric,
                                   corpus=corpus, prepare_block=prepare_block,
                                   precision=precision)
    return best[:q], best_ids[:q]

  # Euclidean: (1) each device's k + TOPK_EXTRA best by the expansion, recomputed
  # directly from its own rows; (2) for queries where the error bound cannot rule out a
  # row outside those candidates (tight clusters), a second scan that recomputes every
  # row the bound leaves in reach of the k-th distance. Keys are negated squared
  # distances.
  a = pad(queries if queries is not None else qp.rows)
  d = a.shape[-1]
  raw = queries is not None
  width = k + refine.TOPK_EXTRA
  in_dtype = qp.rows.dtype

  def exact_candidates(hat, hat_ids, shard, offset, aux_max, padded, shift, a):
    best, best_ids = _refine_candidates(a, hat, hat_ids - offset, shard, shift, prepare_block,
                                        raw=raw)
    # Every row of this shard outside its candidates has an expansion >= the worst
    # candidate's, hence a squared distance >= `floor` (-inf: all rows are candidates),
    # or was dropped as out of the top-k (`drop_below`).
    err = refine.error_bound(padded[1], aux_max[None], d, in_dtype)[:, 0]
    floor = jnp.where(hat[:, -1] > -jnp.inf, -hat[:, -1] - err, jnp.inf)
    return best, best_ids + offset, floor

  best, best_ids, floor = scan(
      lambda qp_block, block, bp, keep, _: _keys(
          kernels.score(qp_block, bp, "sq_euclidean", precision=precision), metric, keep),
      width, (a,), exact_candidates,
      err=lambda aux, _, aux_max: refine.error_bound(aux, aux_max[None], d, in_dtype))
  best, best_ids = best[:, :k], best_ids[:, :k]
  kth = -best[:, k - 1]  # the k-th direct squared distance (+inf when non-finite)
  open_ = jnp.isfinite(kth) & jnp.any(floor <= kth[None, :], axis=0) & (padded[2] < q)

  def second(_):
    def tile(qp_block, block, bp, keep, arows, limit, active):
      s = kernels.score(qp_block, bp, "sq_euclidean", precision=precision)
      e = refine.error_bound(qp_block.aux, bp.aux, d, in_dtype)
      maybe = keep & active[:, None] & (s - e <= limit[:, None])
      brows = block if raw else bp.rows
      s = refine.refine_where(s, maybe, lambda r, c: refine.direct_sq(arows[r], brows[c], acc))
      return jnp.where(maybe, -s, -jnp.inf)

    again, again_ids = scan(tile, k, (a, kth, open_))
    keep = open_[:, None]
    return jnp.where(keep, again, best), jnp.where(keep, again_ids, best_ids)

  best, best_ids = lax.cond(jnp.any(open_), second, lambda _: (best, best_ids), None)
  dist = -best[:q]
  if metric == "euclidean":
    dist = kernels.safe_sqrt(dist)
  lowest = jnp.finfo(acc).min
  # Non-finite distances rank last, reported as the largest finite value; abs also
  # turns the -0.0 of a negated zero key into 0.0.
  return jnp.abs(jnp.where(dist <= -lowest, dist, -lowest)), best_ids[:q]


def drop_below(best: jax.Array, k: int, err: jax.Array) -> jax.Array:
  """`merge_groups`' `floor` for a scan whose keys lie within `err` (`(c, 1)`) of the
  exact ones, for every row seen so far.

  A row whose key lies more than `2 err` below the k-th of `best` is, exactly, below
  each of the k rows kept there: it cannot be in the exact top-k, so the scan need not
  keep it. The last term covers the rounding of this difference itself.
  """
  kth = best[:, k - 1:k]
  return kth - 2.0 * err - (jnp.abs(kth) + 2.0 * err) * 2.0**-20


def _rescore(queries, hat, ids, gather, score):
  """Each query's candidates rescored and sorted, best first, ties to the lower id.

  `queries` is a pytree of `(q, ...)` arrays, `hat` and `ids` the `(q, c)` candidate
  keys and row ids (any id where `hat` is -inf, masked). `gather(ids)` gives the
  candidates' rows for valid ids, `score(queries, rows, keep)` their `(q, c)` keys
  (-inf where not `keep`). Masked candidates stay -inf.
  """
  c = hat.shape[1]
  d = jax.tree.leaves(queries)[0].shape[-1]
  qr = max(8, defaults.stats_tile() // max(1, c * d))

  def block(args):
    queries, hat, ids = args
    key = score(queries, gather(jnp.maximum(ids, 0)), hat > -jnp.inf)
    key = jnp.where(key == 0, 0.0, key)  # -0.0 and 0.0 tie, as in `top_k`
    neg, ids = lax.sort((-key, ids), num_keys=2)
    return -neg, ids

  return blockscan.block_map(block, (queries, hat, ids), block_size=qr)


def _gather_prepared(corpus, shift, prepare_block, ids):
  """`prepare_block` of the corpus rows `ids` (any shape), each leaf shaped `ids.shape + (...)`."""
  rows = prepare_block(jax.tree.map(lambda leaf: leaf[ids.reshape(-1)], corpus), shift)
  return jax.tree.map(lambda leaf: leaf.reshape(*ids.shape, *leaf.shape[1:]), rows)


def _refine_candidates(a, best, best_ids, corpus, shift, prepare_block, *, raw):
  """Each query's candidates sorted by direct squared distance.

  `best_ids` index the rows of `corpus` (a raw row array or a prepared pytree), -1 or
  any id where `best` is -inf (masked). Returns keys (negated squared distances; -inf
  where the candidate was masked, lowest finite for NaN) and ids, best first, ties to
  the lower id.
  """
  acc = best.dtype
  if raw:
    gather = lambda ids: jax.tree.leaves(corpus)[0][ids]
  else:
    gather = lambda ids: _gather_prepared(corpus, shift, prepare_block, ids).rows
  return _rescore(a, best, best_ids, gather, lambda a, cand, keep: _keys(
      refine.direct_sq(a[:, None, :], cand, acc), "sq_euclidean", keep))


# Queries that the bfloat16 scan could not certify are searched again in float32,
# gathered into one compact pass over the corpus when they are at most `FALLBACK_ROWS`
# or one in `FALLBACK_SHARE` of the queries (real embeddings: a few percent fail, e.g.
# 2.6% of the all-MiniLM-L6-v2 token table searched in itself, which a fixed 64 sent
# through a whole second float32 search); more take a full float32 pass.
FALLBACK_ROWS = 64
FALLBACK_SHARE = 16


def _lowprec_topk(scan, exact_tile, padded, q, *, k, metric, corpus, prepare_block, precision):
  """The exact top-k of inner-product metrics from a bfloat16 scan (`jaxsim._src.lowprec`).

  (1) Every tile is scored as bfloat16 x bfloat16 -> float32 and each query keeps its
  `lowprec.width(k)` best keys, less those more than twice the bound below its k-th
  (they cannot be in the float32 top-k, and the merge skips them); (2) each device
  rescores its candidates in float32 from its own rows and sorts them (ties to the
  lower id); (3) a query is certified when, on every device, the width-th bfloat16
  key plus the bound `E` (per query, against that device's corpus maxima) is strictly
  below the k-th rescored score: every row outside the candidates then scores, in
  float32, strictly below the k-th, so the rescored top-k is the float32 search's (to
  last-bit rounding). (4) Queries that fail (near-ties at the bound's scale, duplicate
  rows, non-finite or huge rows) are searched again with the float32 scan: the few (up
  to `FALLBACK_ROWS`, or one query in `FALLBACK_SHARE`) gathered into one small pass,
  more in a full pass; none, the usual case, costs nothing (`lax.switch`).
  """
  rows, aux, ids = padded
  d = rows.shape[-1]
  if metric == "scaled_dot":  # as `kernels.score` scales the query side
    low_rows = (rows * kernels.default_scale(d)).astype(rows.dtype)
  else:
    low_rows = rows
  qsplit = lowprec.split(low_rows)
  width = lowprec.width(k)

  def low_tile(qp_block, block, bp, keep, _):
    dots = lowprec.matmul_t(qp_block.rows, bp.rows)
    if metric == "cosine":
      dots = kernels.finish_cosine(dots, qp_block.aux[:, None], bp.aux[None, :])
    return _keys(dots, metric, keep)

  def certify(hat, hat_ids, shard, offset, maxima, padded, shift, norms, rows, aux):
    del padded
    best, best_ids = _rescore(
        (rows, aux), hat, hat_ids - offset,
        lambda ids: _gather_prepared(shard, shift, prepare_block, ids),
        lambda qa, cand, keep: _keys(kernels.score(
            kernels.Prepared(qa[0][:, None, :], qa[1][:, None]), cand, metric,
            precision=precision)[:, 0, :], metric, keep))
    # Rows outside the candidates have bfloat16 keys <= the width-th, so float32
    # scores <= `floor`, or were dropped as out of the top-k (`drop_below`); with
    # fewer valid rows than the width, all are candidates.
    floor = jnp.where(hat[:, -1] > -jnp.inf, hat[:, -1] + lowprec.bound(norms, maxima, d),
                      -jnp.inf)
    return best, best_ids + offset, floor

  best, best_ids, floor = scan(
      low_tile, width, (qsplit.norms,), certify, padded=(qsplit.low, aux, ids), low=True,
      aside=(rows, aux), err=lambda _, more, maxima: lowprec.bound(more[0], maxima, d)[:, None])
  best, best_ids = best[:, :k], best_ids[:, :k]
  # Not `floor >= kth`: a NaN bound must fail.
  open_ = ~jnp.all(floor < best[None, :, k - 1], axis=0) & (ids < q)
  q_pad = rows.shape[0]
  few = min(max(FALLBACK_ROWS, q_pad // FALLBACK_SHARE), q_pad)

  def compact(_):
    (at,) = jnp.nonzero(open_, size=few, fill_value=q_pad)
    take = jnp.minimum(at, q_pad - 1)
    again, again_ids = scan(exact_tile, k, (), padded=(rows[take], aux[take], ids[take]))
    return best.at[at].set(again, mode="drop"), best_ids.at[at].set(again_ids, mode="drop")

  def full(_):
    again, again_ids = scan(exact_tile, k, ())
    keep = open_[:, None]
    return jnp.where(keep, again, best), jnp.where(keep, again_ids, best_ids)

  count = jnp.sum(open_, dtype=jnp.int32)
  branches = [lambda _: (best, best_ids), full]
  if few < q_pad:
    branches.insert(1, compact)
  branch = jnp.minimum(count, 1) + (jnp.int32(count > few) if few < q_pad else 0)
  return lax.switch(branch, branches, None)
