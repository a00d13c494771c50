"""All-pairs statistics of a similarity matrix, streamed without the N x M matrix.

`similarity_stats` answers "what does the similarity structure of this table look
like?" (the share of positive cosine among all token pairs, their mean, spread,
extremes and histogram) over every pair, not a sample, in O(block) memory. Each
(query block, corpus block) tile is reduced to a `_Moments` summary and summaries are
merged with one `_combine`, the same for tiles, blocks and devices.

Exact counting: `count`, the non-negative count and the histogram are integers that
can exceed 2**31 (1e5 x 1e5 pairs is 1e10) while JAX has no 64-bit integers unless
`jax_enable_x64` is on. They are accumulated as `WideCount` pairs of int32 words
(`hi * 2**24 + lo`, exact up to 2**55), then returned as int32 when every possible
count fits in int32 (30522 x 30522 does), as int64 under `jax_enable_x64`, and
otherwise as float32 rounded once from the exact value (relative error below 6e-8).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsim._src import blockscan, defaults, distributed, kernels, refine, sharding, validation

_LO_BITS = 24
_LO_MASK = (1 << _LO_BITS) - 1
_INT32_MAX = 2**31 - 1


class WideCount(NamedTuple):
  """An exact non-negative count as two int32 words: `hi * 2**24 + lo`, `0 <= lo < 2**24`."""

  hi: jax.Array
  lo: jax.Array


def wide_zeros(shape=()) -> WideCount:
  return WideCount(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32))


def wide_add(w: WideCount, n: jax.Array) -> WideCount:
  """Adds an int32 count `0 <= n < 2**31 - 2**24` (one tile's count) to `w`."""
  lo = w.lo + n
  return WideCount(w.hi + (lo >> _LO_BITS), lo & _LO_MASK)


def wide_sum(a: WideCount, b: WideCount) -> WideCount:
  lo = a.lo + b.lo
  return WideCount(a.hi + b.hi + (lo >> _LO_BITS), lo & _LO_MASK)


def wide_float(w: WideCount, dtype=jnp.float32) -> jax.Array:
  """The count as a float of `dtype`, rounded once (`hi * 2**24` is exact below 2**48).

  The statistics divide by it in their accumulation dtype: a float32 count of 16.8M
  pairs would be off by one and bias a float64 mean by 6e-8.
  """
  return w.hi.astype(dtype) * float(1 << _LO_BITS) + w.lo.astype(dtype)


def wide_greater(w: WideCount, p: int) -> jax.Array:
  """Exact `count > p` for a Python int `p >= 0`."""
  return (w.hi > (p >> _LO_BITS)) | ((w.hi == (p >> _LO_BITS)) & (w.lo > (p & _LO_MASK)))


def wide_result(w: WideCount, bound: int) -> jax.Array:
  """The count in the narrowest exact dtype given `bound`, the largest it can be.

  int32 if `bound` fits, else int64 under `jax_enable_x64`, else float32 (rounded).
  """
  if bound <= _INT32_MAX:
    return w.hi * (1 << _LO_BITS) + w.lo
  if jax.config.jax_enable_x64:
    return w.hi.astype(jnp.int64) * (1 << _LO_BITS) + w.lo.astype(jnp.int64)
  return wide_float(w)


def _two_sum(a, b):
  """`a + b` and its rounding error (Knuth), for compensated summation."""
  s = a + b
  bp = s - a
  return s, (a - (s - bp)) + (b - bp)


class _Moments(NamedTuple):
  """A mergeable summary of a set of scores (a tile, a block, a device, everything)."""

  count: WideCount
  total: jax.Array  # compensated sum: value is total + total_err
  total_err: jax.Array
  m2: jax.Array  # sum of squared deviations from the mean, compensated likewise
  m2_err: jax.Array
  min: jax.Array
  max: jax.Array
  nonneg: WideCount
  hist: WideCount  # (bins,)
  nans: WideCount  # NaN scores: pairs with a non-finite row


def _empty(bins: int, dtype) -> _Moments:
  z = jnp.zeros((), dtype)
  return _Moments(wide_zeros(), z, z, z, z, z + jnp.inf, z - jnp.inf, wide_zeros(),
                  wide_zeros((bins,)), wide_zeros())


def _combine(a: _Moments, b: _Moments) -> _Moments:
  """Merges two summaries: Chan et al.'s pairwise update for the squared deviations,
  compensated (two-sum) accumulation of the sums, exact integer counts."""
  na, nb = wide_float(a.count, a.total.dtype), wide_float(b.count, b.total.dtype)
  n = na + nb
  both = (na > 0) & (nb > 0)
  safe = lambda v: jnp.where(v > 0, v, 1.0)
  delta = (b.total + b.total_err) / safe(nb) - (a.total + a.total_err) / safe(na)
  corr = jnp.where(both, delta * delta * (na / safe(n)) * nb, 0.0)
  total, err = _two_sum(a.total, b.total)
  m2, err2 = _two_sum(a.m2, b.m2 + corr)
  return _Moments(
      wide_sum(a.count, b.count), total, a.total_err + b.total_err + err, m2,
      a.m2_err + b.m2_err + err2, jnp.minimum(a.min, b.min), jnp.maximum(a.max, b.max),
      wide_sum(a.nonneg, b.nonneg), wide_sum(a.hist, b.hist), wide_sum(a.nans, b.nans))


class _Bins(NamedTuple):
  """Equal-width histogram bins: the `(bins + 1,)` `edges`, and the bin width split into
  `steps` and the `snap` (see `_edge`), from which any fusion recomputes an edge bit
  for bit."""

  edges: jax.Array
  steps: tuple[jax.Array, ...]
  snap: jax.Array


def _bin_steps(lo: jax.Array, hi: jax.Array, bins: int) -> tuple[jax.Array, ...]:
  """The width `(hi - lo) / bins` as a sum of a few short floats (empty: too many bins).

  Each part keeps only as many significant bits as a product `k * part`, `0 <= k <=
  bins`, leaves exact, so the edge `lo + k * part_1 + k * part_2 + ...`, summed left to
  right, has one rounding per addition and no other: the same bits whether or not the
  compiler fuses a product into an add (FMA), in every fusion that computes it. That is
  what lets the histogram test a score against its edges without gathering them.
  """
  p = jnp.finfo(lo.dtype).nmant + 1
  keep = p - bins.bit_length()
  terms = -(-(p + 2) // keep) if keep > 0 else 0
  if not 0 < terms <= 3:
    return ()
  itype = jnp.int32 if p <= 24 else jnp.int64
  clear = jnp.asarray(~((1 << (p - keep)) - 1), itype)
  rest = (hi - lo) / bins
  steps = []
  for _ in range(terms):
    part = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(rest, itype) & clear, lo.dtype)
    steps.append(part)
    rest = rest - part  # exact: the bits `part` left out
  return tuple(steps)


def _edge(k: jax.Array, lo: jax.Array, steps: tuple[jax.Array, ...],
          snap: jax.Array) -> jax.Array:
  """Edge `k` (int) of the bins starting at `lo`, bit for bit wherever it is computed.

  An edge within `snap` (half a unit in the last place of the wider end, the edge's own
  rounding error) of 0 is 0, so that the middle edge of a symmetric range is exactly 0
  as in `numpy.linspace`, not the rounding error of `lo + k * width`.
  """
  k = k.astype(lo.dtype)
  edge = lo
  for part in steps:
    edge = edge + k * part
  return jnp.where(jnp.abs(edge) < snap, jnp.zeros((), lo.dtype), edge)


def _make_bins(lo: jax.Array, hi: jax.Array, bins: int) -> _Bins:
  """`bins` equal-width bins over `[lo, hi]`: edges within about a unit in the last place
  of `max(|lo|, |hi|)` of the exact ones (as `linspace`'s), the last one `hi` itself."""
  steps = _bin_steps(lo, hi, bins)
  snap = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) * (jnp.finfo(lo.dtype).eps / 2)
  if not steps:
    return _Bins(jnp.linspace(lo, hi, bins + 1, dtype=lo.dtype), (), snap)
  k = jnp.arange(bins + 1, dtype=jnp.int32)
  return _Bins(jnp.where(k == bins, hi, _edge(k, lo, steps, snap)), steps, snap)


def _bucket(s: jax.Array, bins: _Bins) -> jax.Array:
  """Each score's histogram bin, `bins` for scores outside `[edges[0], edges[-1]]`.

  As `numpy.histogram`: an arithmetic guess, then corrected against the edges
  themselves (the guess can be one bin off next to an edge), so that a value equal to an
  edge lands in the bin that edge opens and `hi` in the last bin.
  """
  edges = bins.edges
  count = edges.shape[0] - 1
  lo, hi = edges[0], edges[-1]
  guess = jnp.clip(jnp.floor((s - lo) * (count / (hi - lo))), 0, count - 1).astype(jnp.int32)
  if bins.steps:  # the guess's two edges recomputed in place: no gather per score
    below = s < _edge(guess, lo, bins.steps, bins.snap)
    above = (s >= _edge(guess + 1, lo, bins.steps, bins.snap)) & (guess < count - 1)
    idx = guess - below.astype(jnp.int32) + above.astype(jnp.int32)
  else:
    idx = guess - (s < edges[guess]).astype(jnp.int32)
    idx = idx + ((s >= edges[idx + 1]) & (idx < count - 1)).astype(jnp.int32)
  return jnp.where((s >= lo) & (s <= hi), idx, count)


def _histogram(bucket: jax.Array, bins: int) -> WideCount:
  """Counts per bin of `bucket` values in `[0, bins]` (`bins`: outside the range).

  A scatter-add on XLA:CPU costs about one update's latency per value; for a small
  table, the values are counted two at a time as pairs in a `(bins + 1)^2` table, half
  the updates, and the table's row and column sums are the counts.
  """
  flat = bucket.ravel()
  width = bins + 1
  if width * width <= 1 << 16 and flat.size > 1:
    if flat.size % 2:
      flat = jnp.append(flat, bins)
    pairs = flat.reshape(-1, 2)
    table = jnp.zeros(width * width, jnp.int32).at[pairs[:, 0] * width + pairs[:, 1]].add(
        1, mode="promise_in_bounds").reshape(width, width)
    hist = jnp.sum(table, axis=0, dtype=jnp.int32) + jnp.sum(table, axis=1, dtype=jnp.int32)
  else:
    hist = jnp.zeros(width, jnp.int32).at[flat].add(1, mode="promise_in_bounds")
  return wide_add(wide_zeros((bins,)), hist[:bins])


def _count(pred: jax.Array, dtype) -> jax.Array:
  """`jnp.sum(pred)` as int32, summed as floats where that is exact (every partial sum
  an integer below 2**(mantissa + 1)): XLA:CPU fuses a float sum with its operand into
  one vectorised pass, where an int32 sum first writes the tile of 0/1 to memory."""
  if pred.size > 2 ** (jnp.finfo(dtype).nmant + 1):
    return jnp.sum(pred, dtype=jnp.int32)
  return jnp.sum(jnp.where(pred, jnp.ones((), dtype), jnp.zeros((), dtype))).astype(jnp.int32)


def _tile_moments(s: jax.Array, mask: jax.Array | None, grid: _Bins) -> _Moments:
  """The summary of the scores `s` where `mask` holds (one tile, a few MiB), with a
  histogram over the bins of `grid`. `mask=None` takes every score: no mask
  pass at all, the common case of a tile inside the triangle; a NaN or an infinite
  sum there falls back to the masked form, which flags NaN scores one by one."""
  bins = grid.edges.shape[0] - 1
  z = jnp.zeros((), s.dtype)
  if mask is None:
    n = s.size
    total = jnp.sum(s)

    def summary(_):
      dev = s - total / n  # here, to fuse into its reduction instead of a tile in memory
      return _Moments(
          wide_add(wide_zeros(), jnp.int32(n)), total, z, jnp.sum(dev * dev), z, jnp.min(s),
          jnp.max(s), wide_add(wide_zeros(), _count(s >= 0, s.dtype)),
          _histogram(_bucket(s, grid), bins), wide_zeros())

    masked = lambda _: _tile_moments(s, jnp.ones(s.shape, bool), grid)
    return jax.lax.cond(jnp.isfinite(total), summary, masked, None)
  # NaN scores are flagged and kept out of every sum, explicitly: a NaN inside a fused
  # min/max reduction on XLA:CPU does not reliably come out as NaN.
  nan = mask & jnp.isnan(s)
  mask = mask & ~nan
  n = jnp.sum(mask, dtype=jnp.int32)
  total = jnp.sum(jnp.where(mask, s, 0.0))
  mean = total / jnp.maximum(n, 1).astype(s.dtype)
  dev = jnp.where(mask, s - mean, 0.0)
  return _Moments(
      wide_add(wide_zeros(), n), total, z, jnp.sum(dev * dev), z,
      jnp.min(jnp.where(mask, s, jnp.inf)), jnp.max(jnp.where(mask, s, -jnp.inf)),
      wide_add(wide_zeros(), jnp.sum(mask & (s >= 0), dtype=jnp.int32)),
      _histogram(jnp.where(mask, _bucket(s, grid), bins), bins),
      wide_add(wide_zeros(), jnp.sum(nan, dtype=jnp.int32)))


class SimilarityStats(NamedTuple):
  """Statistics over all pairs; see `similarity_stats`.

  Attributes:
    count: number of pairs (exact; int32, or int64 / float32 for more than 2**31 - 1
      possible pairs, see the module notes).
    mean: mean score, in the accumulation dtype (float32, or float64 for float64
      inputs), as are the other real-valued fields.
    std: population standard deviation (ddof=0).
    min: smallest score.
    max: largest score.
    share_nonnegative: fraction of pairs with score `>= 0`.
    histogram: `(bins,)` exact counts per bin, same dtype as `count`. Scores outside
      `range` are not counted, as in `numpy.histogram`.
    bin_edges: `(bins + 1,)` edges; the last bin includes its right edge. Within about
      a unit in the last place of `max(|lo|, |hi|)` of the exact equal-width edges,
      and an edge within half a unit of 0 is 0 (the middle of a symmetric range);
      the histogram is `numpy.histogram(scores, bins=bin_edges)` exactly.
  """

  count: jax.Array
  mean: jax.Array
  std: jax.Array
  min: jax.Array
  max: jax.Array
  share_nonnegative: jax.Array
  histogram: jax.Array
  bin_edges: jax.Array


@sharding.auto_axes(sharding.replicated)
def similarity_stats(x: ArrayLike, y: ArrayLike | None = None, *, metric: kernels.Metric = "cosine",
                     bins: int = 100, range: tuple[float, float] | None = None,
                     exclude_diagonal: bool = True, block_size: int | None = None,
                     query_block_size: int | None = None, mesh: jax.sharding.Mesh | None = None,
                     precision=None) -> SimilarityStats:
  r"""Count, mean, spread, extremes and histogram of the scores of all pairs.

  Streams tiles of scores through `blockscan`, so memory stays O(tile) for any number
  of pairs: the analysis of a whole embedding table's
  similarity structure, e.g. the share of non-negative cosine among all 30,522^2
  token pairs of a vocabulary, against a random table of the same shape.

  .. math:: \mu = \frac{1}{|P|} \sum_{(i, j) \in P} s(x_i, y_j)

  with :math:`P` all pairs :math:`(i, j)` when `y` is given, and the pairs
  :math:`i < j` (:math:`i \le j` with `exclude_diagonal=False`) when `y` is None.
  Every metric here is symmetric, so :math:`i < j` covers each unordered pair once:
  `similarity_stats(x)` counts :math:`n(n-1)/2` pairs (:math:`n(n+1)/2` with the
  diagonal), while `similarity_stats(x, x)` counts every ordered pair, :math:`n^2`,
  i.e. each unordered pair twice plus the diagonal once, with the same mean over the
  off-diagonal pairs. `y=None` is computed from one triangle: `triangle_scan` walks
  square tiles of `block_size` rows, the tiles :math:`(I, J)`, :math:`I \le J`, only,
  so the work below the diagonal is skipped, not computed and masked; only the
  diagonal tiles (and those of a shorter last block) are masked.

  Args:
    x: `(n, d)` rows.
    y: `(m, d)` rows, or `None` for the pairs within `x`.
    metric: one of `"dot"`, `"cosine"`, `"scaled_dot"`, `"sq_euclidean"`,
      `"euclidean"`.
    bins: number of equal-width histogram bins.
    range: `(lo, hi)` of the histogram. Defaults to `(-1, 1)` for cosine; required for
      the other metrics, whose scores have no fixed range (a first call's `min` and
      `max` are a good choice: the ends are traced, so a new range reuses the
      compiled program). Checked in the accumulation dtype: finite, `lo < hi`, a
      width that does not overflow and `bins` distinct edges.
    exclude_diagonal: `y=None` only: leave out the self pairs `(i, i)`.
    block_size: corpus (`y`) rows per block; with `y=None` the rows per side of the
      square tiles. Default: equal blocks of at most about `defaults.stats_block()`
      rows (1024 on CPU, 16384 on GPU and TPU), with `y=None` about
      `defaults.triangle_block()` (512 on CPU, 4096 on GPU and TPU; see
      `jaxsim._src.defaults`).
    query_block_size: `x` rows per tile (`y` given only); default keeps a tile at
      2**20 scores (4 MiB; 2**24 on GPU and TPU).
    mesh: a `jax.sharding.Mesh`; the corpus rows are split across all its devices
      (see `jaxsim.shard_rows` for rows spread over processes); with `y=None` every
      device holds all of `x` and computes its share of the tiles. `count` is the same
      exactly; the other fields agree with the single-device call to float32 rounding
      of the scores and of the merge order (bit for bit when every score is exact,
      e.g. small integers).
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    A `SimilarityStats`. Scores are computed in the accumulation dtype (float32, or
    float64 for float64 inputs) from the inputs' dtype. The mean uses compensated
    summation of per-tile sums and the standard deviation Chan et al.'s pairwise
    update, so both stay accurate over 1e9+ pairs; the count they divide by is in
    the accumulation dtype. Euclidean pairs closer than the expansion can resolve
    are recomputed directly (see `jaxsim._src.refine`). A pair with a non-finite row
    has a NaN score: it makes `mean`, `std`, `min` and `max` NaN (as numpy would), is
    in `count`, and is in neither the histogram nor the non-negative share.

  Raises:
    ValueError: for bad shapes, an unknown metric, `bins < 1`, a missing, infinite,
      overflowing or collapsing `range`, or no pairs at all.
    TypeError: for `range` ends that are not real numbers.

  References:
    Chan, Golub and LeVeque, "Algorithms for computing the sample variance: analysis
    and recommendations", The American Statistician, 1983.

  Examples:
    >>> import jax, jaxsim
    >>> x = jax.random.normal(jax.random.key(0), (500, 16))
    >>> st = jaxsim.similarity_stats(x)
    >>> int(st.count), float(st.share_nonnegative) > 0.4
    (124750, True)
  """
  mesh = sharding.check_mesh(mesh)
  if y is not None:  # x of a set against itself is on every device anyway
    y = distributed.place_rows(y, mesh, "y")
  if distributed.placed(x) or distributed.placed(y):
    return distributed.similarity_stats(
        x, y, mesh=mesh, metric=metric, bins=bins, range=range,
        exclude_diagonal=exclude_diagonal, block_size=block_size,
        query_block_size=query_block_size, precision=precision)
  x, (y, y_count) = distributed.whole_rows(x), distributed.real_rows(y)
  kernels.check_metric(metric)
  mesh = distributed.prepare_call(mesh, x if y is None else y, name="x" if y is None else "y",
                                  **({} if y is None else {"x": x}), metric=metric, bins=bins,
                                  range=range, exclude_diagonal=exclude_diagonal,
                                  block_size=block_size, query_block_size=query_block_size)
  x, y = validation.matrices(x, y)
  bins = validation.check_positive_int(bins, "bins")
  block_size, query_block_size = validation.block_sizes(block_size, query_block_size)
  exclude_diagonal = validation.check_bool(exclude_diagonal, "exclude_diagonal")
  if range is None:
    if metric != "cosine":
      raise ValueError(f"`range` is required for metric {metric!r}: pass range=(lo, hi).")
    range = (-1.0, 1.0)
  lo, hi = check_range(range, bins, kernels.accum_dtype(x.dtype))
  n = x.shape[0]
  m = None if y is None else y.shape[0] if y_count is None else y_count
  if y is None:
    pairs = n * (n - 1) // 2 + (0 if exclude_diagonal else n)
  else:
    pairs = n * m
  if pairs == 0:
    raise ValueError(f"There are no pairs to summarise: x.shape={x.shape}, "
                     f"y.shape={None if y is None else (m, y.shape[1])}, "
                     f"exclude_diagonal={exclude_diagonal}.")
  return _stats(x, y, lo, hi, m=m, metric=metric, bins=bins,
                diagonal=None if y is not None else not exclude_diagonal,
                block_size=block_size, query_block_size=query_block_size, mesh=mesh,
                precision=precision, bound=pairs)


def check_range(value, bins: int, dtype) -> tuple[jax.Array, jax.Array]:
  """The histogram `range` as two scalars of `dtype` (traced arguments of the compiled
  program, so that a new range reuses it).

  Concrete ranges are checked as `numpy.histogram` checks them, in `dtype`, the
  precision the bins are computed in: both ends finite, `lo < hi`, a width that does
  not overflow, and edges that stay distinct (a range narrower than `bins` ulps would
  collapse).

  Raises:
    ValueError: for anything but a pair of finite numbers making `bins` distinct,
      increasing edges in `dtype`.
    TypeError: for ends that are not real numbers.
  """
  if isinstance(value, (str, bytes)) or np.shape(value) != (2,):
    raise ValueError(f"`range` must be a pair (lo, hi), got {value!r}.")
  lo, hi = (validation.check_scalar(v, "range") for v in value)
  lo, hi = (validation.canonical_scalar(v, dtype) for v in (lo, hi))
  if isinstance(lo, jax.core.Tracer) or isinstance(hi, jax.core.Tracer):
    return lo, hi
  a, b = np.asarray(lo), np.asarray(hi)
  if not (np.isfinite(a) and np.isfinite(b)):
    raise ValueError(f"`range` must be finite, got {value!r}.")
  with np.errstate(over="ignore", invalid="ignore"):
    width = b - a
    edges = np.linspace(a, b, bins + 1, dtype=dtype)
  if not b > a:
    raise ValueError(f"`range` must satisfy lo < hi in {jnp.dtype(dtype).name}, got {value!r}.")
  if not np.isfinite(width):
    raise ValueError(f"`range` is too wide: hi - lo overflows {jnp.dtype(dtype).name}, got "
                     f"{value!r}.")
  if not (np.all(np.diff(edges) > 0) and np.all(np.diff(_edges_of(a, b, bins)) > 0)):
    raise ValueError(f"`range` {value!r} is too narrow for {bins} distinct bins in "
                     f"{jnp.dtype(dtype).name}.")
  return lo, hi


@functools.partial(jax.jit, static_argnums=2)
def _edges_of(lo, hi, bins: int) -> jax.Array:
  return _make_bins(lo, hi, bins).edges


def _even_blocks(size: int, cap: int, multiple: int) -> int:
  """The block size that splits `size` rows into equal blocks of at most about `cap`."""
  count = -(-max(size, 1) // cap)
  per = -(-max(size, 1) // count)
  return -(-per // multiple) * multiple


def tile_sizes(q: int, n: int, block_size: int | None, query_block_size: int | None,
               *, multiple: int = 1, tile: int | None = None,
               block: int | None = None) -> tuple[int, int]:
  """Default (query block, corpus block): corpus blocks of at most about `block` rows
  (default `defaults.corpus_block()`; a multiple of `multiple`), query blocks filling a
  tile of `tile` scores (default `defaults.stats_tile()`); both per backend, see
  `defaults`.

  Rows are split into equal blocks (5000 rows: two of 2528, not 4096 + 904), since a
  short last block costs as much as a full one.
  """
  if block_size is None:
    block_size = _even_blocks(n, defaults.corpus_block() if block is None else block, multiple)
  if query_block_size is None:
    tile = defaults.stats_tile() if tile is None else tile
    query_block_size = _even_blocks(q, max(8, tile // block_size), 8)
  # Blocks never need to exceed the rows there are (the tile check below included).
  block_size = min(block_size, max(n, 1))
  query_block_size = min(query_block_size, max(q, 1))
  if query_block_size * block_size > 1 << 30:
    # Per-tile counts are int32; a tile this size would be 4 GiB of scores anyway.
    raise ValueError(f"A tile of query_block_size x block_size = {query_block_size} x "
                     f"{block_size} scores is too large (at most 2**30).")
  return query_block_size, block_size


def triangle_block(n: int, block_size: int | None) -> int:
  """Rows per block of the square tiles of a set against itself (`triangle_scan`):
  `block_size`, or the backend's `defaults.triangle_block()` split evenly over the rows
  (at most `n`)."""
  if block_size is None:
    block_size = _even_blocks(n, defaults.triangle_block(), 8)
  return min(block_size, max(n, 1))


def _sq_tile(rows, cols, raw_rows, raw_cols, mask, acc_dtype, precision):
  """Squared distances of a tile, close pairs recomputed directly (`refine`)."""
  s = kernels.score(rows, cols, "sq_euclidean", precision=precision)
  close = s <= refine.RHO * (rows.aux[:, None] + cols.aux[None, :])
  if mask is not None:
    close &= mask
  exact = lambda r, c: refine.direct_sq(raw_rows[r], raw_cols[c], acc_dtype)
  return refine.refine_where(s, close, exact)


def _triangle(x, lo, hi, *, bins, metric, diagonal, block_size, mesh, precision):
  """Per-device summaries of the pairs `i < j` (`i <= j` with `diagonal`) of `x`, from
  the tiles `i <= j` of `blockscan.triangle_scan`: every device holds all rows and
  walks its share of the tiles (`sharding.map_devices`)."""
  n = x.shape[0]
  b = triangle_block(n, block_size)
  acc_dtype = kernels.accum_dtype(x.dtype)
  euclid = metric in kernels.DISTANCES
  # The whole set is one corpus: every device computes the same shift from all rows.
  shift = kernels.centre(x) if euclid else None
  xp = kernels.prepare(x, metric, shift=shift)

  def local(index, count, rows, aux, raw, lo, hi):
    grid = _make_bins(lo, hi, bins)

    def step(acc, r, c, r_start, c_start, r_valid, c_valid):
      (r_rows, r_aux, r_raw), (c_rows, c_aux, c_raw) = r, c
      rp, cp = kernels.Prepared(r_rows, r_aux), kernels.Prepared(c_rows, c_aux)

      def tile(mask):
        if not euclid:
          s = kernels.score(rp, cp, metric, precision=precision)
        else:
          s = _sq_tile(rp, cp, r_raw, c_raw, mask, acc_dtype, precision)
          s = kernels.safe_sqrt(s) if metric == "euclidean" else s
        return _tile_moments(s, mask, grid)

      def edge_tile(_):
        # The diagonal tile (the same block twice) and the tiles of the last block,
        # whose first rows the block before already covered: the only masked tiles.
        ids = jnp.arange(b, dtype=jnp.int32)
        mask = r_valid[:, None] & c_valid[None, :]
        upper = (r_start + ids)[:, None] < (c_start + ids)[None, :]
        if diagonal:
          upper |= (r_start + ids)[:, None] == (c_start + ids)[None, :]
        return tile(mask & (upper | (r_start != c_start)))

      inner = (r_start != c_start) & jnp.all(r_valid) & jnp.all(c_valid)
      return _combine(acc, jax.lax.cond(inner, lambda _: tile(None), edge_tile, None))

    return blockscan.triangle_scan(step, _empty(bins, acc_dtype), (rows, aux, raw),
                                   block_size=b, shard=(index, count), remat=False)

  return sharding.map_devices(local, xp.rows, xp.aux, x, lo, hi, mesh=mesh)


@functools.partial(jax.jit, static_argnames=(
    "m", "metric", "bins", "diagonal", "block_size", "query_block_size", "mesh", "precision",
    "bound"))
def _stats(x, y, lo, hi, *, m=None, metric, bins, diagonal, block_size, query_block_size, mesh,
           precision, bound):
  acc_dtype = kernels.accum_dtype(x.dtype)
  if y is None:
    parts = _triangle(x, lo, hi, bins=bins, metric=metric, diagonal=diagonal,
                      block_size=block_size, mesh=mesh, precision=precision)
  else:
    parts = _cross(x, y, lo, hi, bins=bins, m=m, metric=metric, block_size=block_size,
                   query_block_size=query_block_size, mesh=mesh, precision=precision)
  total = jax.tree.map(lambda leaf: leaf[0], parts)
  for i in range(1, parts.min.shape[0]):
    total = _combine(total, jax.tree.map(lambda leaf, i=i: leaf[i], parts))
  count = wide_float(total.count, acc_dtype)
  mean = (total.total + total.total_err) / count
  var = jnp.maximum(total.m2 + total.m2_err, 0.0) / count
  # A pair with a non-finite row makes the summaries NaN, as in numpy; it is in `count`
  # but in neither the histogram nor the non-negative share's numerator.
  nan = lambda v: jnp.where((total.nans.hi > 0) | (total.nans.lo > 0), jnp.nan, v)
  count_all = wide_sum(total.count, total.nans)
  return SimilarityStats(
      count=wide_result(count_all, bound), mean=nan(mean), std=nan(jnp.sqrt(var)),
      min=nan(total.min), max=nan(total.max),
      share_nonnegative=wide_float(total.nonneg, acc_dtype) / wide_float(count_all, acc_dtype),
      histogram=wide_result(total.hist, bound),
      bin_edges=_make_bins(lo, hi, bins).edges)


def _cross(x, y, lo, hi, *, bins, m, metric, block_size, query_block_size, mesh,
           precision):
  """Per-device summaries of all pairs of `x` against the first `m` rows of `y` (the
  rest padding), the `y` rows split over the devices (`sharding.map_shards`)."""
  n = x.shape[0]
  euclid = metric in kernels.DISTANCES
  shift = kernels.centre(y, mesh=mesh, count=m) if euclid else jnp.zeros((1, 1))
  qb, nb = tile_sizes(n, sharding.shard_rows(y.shape[0], mesh), block_size, query_block_size,
                      block=defaults.stats_block())
  xp = kernels.prepare(x, metric, shift=shift if euclid else None)
  q_pad = -(-n // qb) * qb
  queries = (jnp.pad(xp.rows, ((0, q_pad - n), (0, 0))), jnp.pad(xp.aux, (0, q_pad - n)),
             jnp.arange(q_pad, dtype=jnp.int32))
  acc_dtype = kernels.accum_dtype(x.dtype)

  def local(shard, offset, queries, shift, lo, hi):
    grid = _make_bins(lo, hi, bins)

    def corpus_step(acc, block, start, valid):
      bp = kernels.prepare(block, metric, shift=shift if euclid else None)
      cols = offset + start + jnp.arange(block.shape[0], dtype=jnp.int32)
      col_ok = valid & (cols < m)

      def query_step(acc, qblock, qstart, qvalid):
        rows, aux, ids = qblock
        ok = (qvalid & (ids < n))[:, None] & col_ok[None, :]
        if not euclid:
          s = kernels.score(kernels.Prepared(rows, aux), bp, metric, precision=precision)
          return _combine(acc, _tile_moments(s, ok, grid))
        # Close pairs recomputed directly, as the dense forms do (`jaxsim._src.refine`).
        raw = jax.lax.dynamic_slice_in_dim(x, jnp.minimum(qstart, n - qb), qb)
        shifted = raw[jnp.arange(qb) + jnp.maximum(qstart + qb - n, 0)]  # last block
        s = _sq_tile(kernels.Prepared(rows, aux), bp, shifted, block, ok, acc_dtype, precision)
        s = kernels.safe_sqrt(s) if metric == "euclidean" else s
        return _combine(acc, _tile_moments(s, ok, grid))

      return blockscan.block_scan(query_step, acc, queries, block_size=qb)

    return blockscan.block_scan(corpus_step, _empty(bins, acc_dtype), shard, block_size=nb,
                                pad_tail=False)

  return sharding.map_shards(local, y, queries, shift, lo, hi, mesh=mesh)
