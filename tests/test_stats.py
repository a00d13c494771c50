"""All-pairs statistics: numpy over the full matrix, exact counts, devices, memory."""

import warnings

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxsim
from jaxsim._src import stats
from tests import reference


def _data(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _check(got, vals, bins, lo, hi, *, tol=1e-5):
  """Compares `similarity_stats` output with float64 numpy over the pair values."""
  assert got.count.dtype == jnp.int32 and got.histogram.dtype == jnp.int32
  assert int(got.count) == vals.size
  np.testing.assert_allclose(got.mean, vals.mean(), rtol=tol, atol=tol)
  np.testing.assert_allclose(got.std, vals.std(), rtol=tol, atol=tol)
  np.testing.assert_allclose(got.min, vals.min(), rtol=tol, atol=tol)
  np.testing.assert_allclose(got.max, vals.max(), rtol=tol, atol=tol)
  # float32 and float64 may disagree on the sign (or bin) of values within rounding of
  # 0 (or of a bin edge); allow exactly those.
  unsure = np.sum(np.abs(vals) < 1e-5)
  assert abs(float(got.share_nonnegative) * vals.size - np.sum(vals >= 0)) <= unsure + 0.5
  want, edges = np.histogram(vals, bins, (lo, hi))
  np.testing.assert_allclose(got.bin_edges, edges, rtol=1e-6, atol=1e-6)
  near = np.sum(np.abs(vals[:, None] - edges[None, 1:-1]) < 1e-4 * (hi - lo))
  assert np.sum(np.abs(np.asarray(got.histogram) - want)) <= 2 * near
  assert int(np.sum(got.histogram)) == np.sum((vals >= lo) & (vals <= hi))


@pytest.mark.parametrize("metric,value_range", [("cosine", None), ("euclidean", (0.0, 8.0)),
                                                ("dot", (-6.0, 6.0))])
@pytest.mark.parametrize("within,exclude_diagonal", [(True, True), (True, False),
                                                     (False, True)])
def test_stats_match_numpy(metric, value_range, within, exclude_diagonal):
  x, y = _data(0, (70, 6), (45, 6))
  x[5] = 0.0  # a zero row: cosine 0 against everything
  s = reference.METRICS[metric](x, x if within else y)
  vals = reference.pair_values(s, within=within, diagonal=not exclude_diagonal)
  if metric == "cosine":
    vals = np.clip(vals, -1.0, 1.0)  # float64 self-cosines can round to 1 + 2e-16
  lo, hi = value_range or (-1.0, 1.0)
  got = jaxsim.similarity_stats(x, None if within else y, metric=metric, bins=16,
                                range=value_range, exclude_diagonal=exclude_diagonal,
                                block_size=16, query_block_size=24)
  _check(got, vals, 16, lo, hi)


@pytest.mark.parametrize("block_size,query_block_size", [(None, None), (1, 7), (50, 13),
                                                         (200, 300)])
def test_stats_independent_of_block_sizes(block_size, query_block_size):
  (x,) = _data(1, (130, 5))
  vals = reference.pair_values(reference.cosine(x, x), within=True)
  got = jaxsim.similarity_stats(x, bins=10, block_size=block_size,
                                query_block_size=query_block_size)
  _check(got, vals, 10, -1.0, 1.0)


def test_stats_accurate_for_offset_values_over_a_million_pairs():
  # Scores about 36 with a spread of about 5: the mean and the variance about it both
  # need care in float32 over 1.1e6 values.
  rng = np.random.default_rng(2)
  x = (3.0 + 0.5 * rng.standard_normal((1500, 4))).astype(np.float32)
  vals = reference.pair_values(reference.dot(x, x), within=True)
  got = jaxsim.similarity_stats(x, metric="dot", range=(0.0, 80.0), bins=8, block_size=256)
  assert int(got.count) == vals.size == 1500 * 1499 // 2
  np.testing.assert_allclose(got.mean, vals.mean(), rtol=2e-6)
  np.testing.assert_allclose(got.std, vals.std(), rtol=2e-5)


def test_stats_under_jit():
  x, y = _data(4, (20, 3), (30, 3))
  eager = jaxsim.similarity_stats(x, y, bins=5)
  jitted = jax.jit(lambda a, b: jaxsim.similarity_stats(a, b, bins=5))(x, y)
  for a, b in zip(eager, jitted, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_wide_count_is_exact_past_int32():
  increments = np.random.default_rng(5).integers(0, 2**30, size=300)
  step = lambda w, n: (stats.wide_add(w, n), None)
  w, _ = jax.lax.scan(step, stats.wide_zeros(), jnp.asarray(increments, jnp.int32))
  total = int(np.sum(increments, dtype=np.int64))
  assert total > 2**37
  assert int(w.hi) * 2**24 + int(w.lo) == total and 0 <= int(w.lo) < 2**24
  for p, want in ((total - 1, True), (total, False), (total + 2**24, False), (0, True)):
    assert bool(stats.wide_greater(w, p)) == want
  doubled = stats.wide_sum(w, w)
  assert int(doubled.hi) * 2**24 + int(doubled.lo) == 2 * total
  np.testing.assert_allclose(float(stats.wide_float(w)), total, rtol=1e-7)


@pytest.mark.parametrize("n,dtype", [(30522, jnp.int32), (70000, jnp.float32)])
def test_count_dtype_exact_for_a_vocabulary(n, dtype):
  # 30522^2 / 2 pairs fit int32 exactly; 70000^2 / 2 > 2**31 do not, and without x64
  # the count is returned as float32. Shapes only: nothing is computed.
  spec = jax.ShapeDtypeStruct((n, 8), jnp.float32)
  out = jax.eval_shape(lambda x: jaxsim.similarity_stats(x), spec)
  assert out.count.dtype == dtype and out.histogram.dtype == dtype
  pairs = jax.eval_shape(lambda x: jaxsim.pairs_above(x, threshold=0.9, max_pairs=4), spec)
  assert pairs.count.dtype == dtype


@pytest.mark.parametrize("kwargs,match", [
    (dict(metric="euclidean"), r"`range` is required for metric 'euclidean'"),
    (dict(range=(1.0, 1.0)), r"lo < hi"),
    (dict(bins=0), r"`bins` must be a positive int"),
    (dict(block_size=0), r"`block_size`"),
    (dict(metric="cosines"), r"`metric` must be one of"),
    (dict(range=(0.0, 1.0, 2.0)), r"`range` must be a pair"),
])
def test_stats_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jaxsim.similarity_stats(np.ones((4, 3), np.float32), **kwargs)


def test_stats_error_without_pairs_and_bad_shapes():
  with pytest.raises(ValueError, match=r"no pairs.*x.shape=\(1, 3\)"):
    jaxsim.similarity_stats(np.ones((1, 3)))
  with pytest.raises(ValueError, match=r"same feature dim"):
    jaxsim.similarity_stats(np.ones((4, 3)), np.ones((4, 2)))
  with pytest.raises(ValueError, match=r"`x` must have rank 2"):
    jaxsim.similarity_stats(np.ones(3))


def _around_edges(edges: np.ndarray, lo: float, hi: float, seed: int) -> np.ndarray:
  """Every edge and its two float32 neighbours, the values just outside `[lo, hi]`, and
  uniform values over and beyond it; an odd count. No subnormals: XLA:CPU flushes them
  to zero, numpy does not."""
  e = edges.astype(np.float32)
  up, down = np.float32(np.inf), np.float32(-np.inf)
  width = hi - lo
  vals = np.concatenate([
      e, np.nextafter(e, down), np.nextafter(e, up),
      np.float32([lo - width, hi + width]),
      np.random.default_rng(seed).uniform(lo - 0.1 * width, hi + 0.1 * width, 3000)
  ]).astype(np.float32)
  vals = vals[(vals == 0) | (np.abs(vals) >= np.finfo(np.float32).tiny)]
  return vals[vals.size % 2 == 0:]


@pytest.mark.parametrize("lo,hi,bins", [(-1.0, 1.0, 100), (-3.3, 7.1, 37), (1e3, 1e3 + 1, 100),
                                        (-1.0, 1.0, 40000)])
def test_bins_exact_on_and_next_to_every_edge(lo, hi, bins):
  # The bins are found without gathering the edges (`stats._bin_steps`), or, for more
  # bins than that allows (40000), with the gather. Either way numpy with the returned
  # edges puts every value in the same bin: each edge, its neighbours, lo, hi, outside.
  ones = np.ones((1, 1), np.float32)
  edges = np.asarray(jaxsim.similarity_stats(ones, ones, metric="dot", bins=bins,
                                             range=(lo, hi)).bin_edges)
  assert edges[0] == np.float32(lo) and edges[-1] == np.float32(hi)
  assert np.all(np.diff(edges) > 0)
  ulp = np.spacing(np.float32(max(abs(lo), abs(hi))))
  assert np.max(np.abs(edges - np.linspace(lo, hi, bins + 1))) <= 2 * ulp
  if lo == -hi:  # the middle edge of a symmetric range is 0 itself, as numpy's
    assert edges[bins // 2] == 0
  vals = _around_edges(edges, lo, hi, bins)
  want, _ = np.histogram(vals, bins=edges)
  # Cross form (masked tiles): `x_i * 1` is the value itself.
  got = jaxsim.similarity_stats(vals[:, None], ones, metric="dot", bins=bins, range=(lo, hi))
  np.testing.assert_array_equal(got.histogram, want)
  # A tile inside the triangle (no mask), an odd number of scores.
  grid = stats._make_bins(jnp.float32(lo), jnp.float32(hi), bins)
  tile = stats._tile_moments(jnp.asarray(vals), None, grid)
  np.testing.assert_array_equal(tile.hist.lo, want)
  assert int(tile.nonneg.lo) == np.sum(vals >= 0)


def test_float64_under_x64_matches_numpy():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 4))
    vals = reference.pair_values(reference.cosine(x, x), within=True)
    got = jaxsim.similarity_stats(x, block_size=16, query_block_size=8)
    assert got.mean.dtype == jnp.float64
    np.testing.assert_allclose(got.mean, vals.mean(), rtol=1e-12)
    np.testing.assert_allclose(got.std, vals.std(), rtol=1e-10)
    np.testing.assert_array_equal(got.histogram, np.histogram(vals, 100, (-1, 1))[0])


# --- Numerics: non-finite rows, near-duplicates, options, guards (issue 9) -------------------


@pytest.mark.parametrize("metric,value_range", [("euclidean", (0.0, 10.0)),
                                                ("sq_euclidean", (0.0, 60.0)),
                                                ("cosine", None)])
def test_a_non_finite_row_makes_the_summaries_nan_and_stays_out_of_the_histogram(
    metric, value_range):
  (x,) = _data(40, (600, 16))
  x[-1, 0] = np.nan
  got = jaxsim.similarity_stats(x, metric=metric, range=value_range)
  assert int(got.count) == 600 * 599 // 2
  for field in (got.mean, got.std, got.min, got.max):
    assert np.isnan(field)
  vals = reference.pair_values(reference.METRICS[metric](x[:-1], x[:-1]), within=True)
  lo, hi = value_range or (-1.0, 1.0)
  want, _ = np.histogram(vals, 100, (lo, hi))
  assert abs(int(np.sum(got.histogram)) - int(np.sum(want))) == 0


def test_euclidean_min_of_near_duplicates_is_accurate():
  query, corpus = reference.near_duplicates(41)
  x = np.concatenate([query, corpus])
  got = jaxsim.similarity_stats(x, metric="euclidean", range=(0.0, 1e-3), bins=10)
  vals = reference.pair_values(reference.euclidean(x, x), within=True)
  np.testing.assert_allclose(got.min, vals.min(), rtol=1e-5)
  np.testing.assert_array_equal(got.histogram, np.histogram(vals, 10, (0.0, 1e-3))[0])


@pytest.mark.parametrize("value_range,match", [
    ((0.0, np.inf), r"`range` must be finite"),
    ((-np.inf, 1.0), r"`range` must be finite"),
    ((np.nan, 1.0), r"`range` must not be NaN"),
    ((-3e38, 3e38), r"too wide"),
    ((1.0, 1.0 + 1e-9), r"lo < hi in float32"),
    ((1.0, 1.0 + 1e-6), r"too narrow for 100 distinct bins"),
    (("a", 1.0), r"`range` must be a real number"),
])
def test_nonsense_ranges_raise(value_range, match):
  (x,) = _data(42, (20, 4))
  with pytest.raises((ValueError, TypeError), match=match):
    jaxsim.similarity_stats(x, metric="dot", range=value_range)


def test_new_ranges_reuse_the_compiled_program():
  (x,) = _data(43, (512, 8))
  first = jaxsim.similarity_stats(x, metric="dot", range=(-1.0, 1.0))
  before = stats._stats._cache_size()
  # As the docs suggest: a first call's min and max as the next call's range.
  again = jaxsim.similarity_stats(x, metric="dot", range=(first.min, first.max))
  jaxsim.similarity_stats(x, metric="dot", range=(-2, 3.5))
  assert stats._stats._cache_size() == before
  assert int(np.sum(again.histogram)) == int(again.count)


def test_mean_of_16_8m_identical_pairs_is_exactly_one_under_x64():
  with jax.enable_x64(True):
    x = np.ones((4100, 4))
    got = jaxsim.similarity_stats(x, x)
    assert int(got.count) == 4100 * 4100 > 2**24
    assert got.mean.dtype == jnp.float64
    assert float(got.mean) == 1.0 and float(got.std) == 0.0


def test_float64_inputs_raise_no_warning():
  x, y = _data(44, (512, 8), (64, 8))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jaxsim.similarity_stats(x.astype(np.float64), y)
  assert got.mean.dtype == jnp.float32


# --- One triangle for y=None (issue 15) ---------------------------------------------------


def scores_computed(fn, *args) -> int:
  """Scores the matmuls of `fn(*args)` compute when run, from its jaxpr: each
  `dot_general`'s output size times the trip counts of the scans around it (the larger
  branch of a `cond`, whose branches are alternatives)."""

  def walk(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        total += int(np.prod(eqn.outvars[0].aval.shape))
      is_jaxpr = lambda v: isinstance(v, (jex.Jaxpr, jex.ClosedJaxpr))
      subs = [walk(getattr(v, "jaxpr", v))
              for v in jax.tree.leaves(eqn.params, is_leaf=is_jaxpr) if is_jaxpr(v)]
      if subs:
        inner = max(subs) if eqn.primitive.name == "cond" else sum(subs)
        total += inner * eqn.params.get("length", 1)
    return total

  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


RANGES = {"cosine": None, "dot": (-8.0, 8.0), "scaled_dot": (-0.5, 0.5),
          "sq_euclidean": (0.0, 40.0), "euclidean": (0.0, 7.0)}


@pytest.mark.parametrize("metric,block_size,exclude_diagonal", [
    (metric, *options) for i, metric in enumerate(RANGES)
    for options in ([(None, True), (65, False)], [(96, True), (260, False)])[i % 2]])
def test_triangle_matches_numpy_for_every_metric(metric, block_size, exclude_diagonal):
  # 260 rows: one block (the default, or 260), four that divide them, three that do not
  # (the last block shifted back over rows the block before covered).
  (x,) = _data(50, (260, 8))
  x[7] = x[200]  # a duplicate pair: distance exactly 0, cosine 1, across blocks
  vals = reference.pair_values(reference.METRICS[metric](x, x), within=True,
                               diagonal=not exclude_diagonal)
  if metric == "cosine":
    vals = np.clip(vals, -1.0, 1.0)
  lo, hi = RANGES[metric] or (-1.0, 1.0)
  got = jaxsim.similarity_stats(x, metric=metric, bins=16, range=RANGES[metric],
                                exclude_diagonal=exclude_diagonal, block_size=block_size)
  _check(got, vals, 16, lo, hi)


@pytest.mark.parametrize("block_size", [None, 23])
def test_triangle_counts_each_unordered_pair_once(block_size):
  # Small integers: every score is exact, so the two calls must agree exactly. The
  # two-sided call counts every ordered pair: each unordered pair twice, plus (i, i).
  rng = np.random.default_rng(51)
  x = rng.choice(np.float32([-2, -1, 0, 1, 3]), size=(120, 6))
  # Edges at half-integers: no score lies on one.
  kwargs = dict(metric="dot", range=(-30.5, 29.5), bins=60, block_size=block_size)
  one = jaxsim.similarity_stats(x, **kwargs)
  with_diagonal = jaxsim.similarity_stats(x, exclude_diagonal=False, **kwargs)
  both = jaxsim.similarity_stats(x, x, **kwargs)
  n = len(x)
  assert int(one.count) == n * (n - 1) // 2 and int(with_diagonal.count) == n * (n + 1) // 2
  assert int(both.count) == 2 * int(one.count) + n
  diagonal, _ = np.histogram(np.sum(x.astype(np.float64) ** 2, axis=1), 60, (-30.5, 29.5))
  np.testing.assert_array_equal(np.asarray(with_diagonal.histogram) - one.histogram, diagonal)
  np.testing.assert_array_equal(both.histogram, 2 * np.asarray(one.histogram) + diagonal)
  # The ordered pairs off the diagonal have the same mean as the unordered ones.
  trace = float(np.sum(x.astype(np.float64) ** 2))
  np.testing.assert_allclose((float(both.mean) * n * n - trace) / (n * (n - 1)), one.mean,
                             rtol=1e-5)
  assert float(both.min) == float(with_diagonal.min) and float(both.max) == float(
      with_diagonal.max)
  want, _ = np.histogram(reference.pair_values(reference.dot(x, x), within=True),
                         np.asarray(one.bin_edges, np.float64))
  np.testing.assert_array_equal(one.histogram, want)


@pytest.mark.parametrize("exclude_diagonal", [True, False])
def test_triangle_mesh_identical_to_single_device(exclude_diagonal):
  # 203 rows in blocks of 16: 13 blocks, 91 tiles over 8 devices (5 padding tiles).
  rng = np.random.default_rng(52)
  x = rng.choice(np.float32([-1, 0, 1, 2]), size=(203, 5))
  kwargs = dict(metric="dot", range=(-10.0, 10.0), bins=20, block_size=16,
                exclude_diagonal=exclude_diagonal)
  single = jaxsim.similarity_stats(x, **kwargs)
  sharded = jaxsim.similarity_stats(x, mesh=Mesh(np.array(jax.devices()), ("c",)), **kwargs)
  for field in ("count", "min", "max", "share_nonnegative", "histogram", "bin_edges"):
    np.testing.assert_array_equal(getattr(sharded, field), getattr(single, field))
  np.testing.assert_allclose(sharded.mean, single.mean, rtol=1e-6)
  np.testing.assert_allclose(sharded.std, single.std, rtol=1e-6)
  _check(single, reference.pair_values(reference.dot(x, x), within=True,
                                       diagonal=not exclude_diagonal), 20, -10.0, 10.0)


@pytest.mark.parametrize("n,block_size", [(1000, 128), (1024, 256)])
def test_triangle_computes_only_the_upper_tiles(n, block_size):
  x = jax.ShapeDtypeStruct((n, 16), jnp.float32)
  nb = -(-n // block_size)
  one = scores_computed(lambda a: jaxsim.similarity_stats(a, block_size=block_size), x)
  assert one == nb * (nb + 1) // 2 * block_size**2
  both = scores_computed(lambda a: jaxsim.similarity_stats(a, a, block_size=block_size), x)
  # Half the products of the (padded) two-sided product, plus half the diagonal tiles.
  assert both >= n * n and 2 * one == (nb * block_size) ** 2 + nb * block_size**2


@pytest.mark.parametrize("metric", list(RANGES))
def test_triangle_memory_is_a_few_tiles(metric):
  n, d, b = 8192, 32, 256
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
  fn = jax.jit(lambda a: jaxsim.similarity_stats(a, metric=metric, range=RANGES[metric],
                                                 block_size=b))
  temp = fn.lower(spec).compile().memory_analysis().temp_size_in_bytes
  # A few (b, b) tiles and a prepared copy of the rows; the n x n scores would be 256 MiB.
  assert temp <= 16 * b * b * 4 + 2 * n * d * 4, temp
