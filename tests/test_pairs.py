"""Threshold pairs: brute force, row-major order, overflow, devices, numerics."""

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxsim
from jaxsim._src import pairs
from tests import reference
from tests.test_stats import scores_computed

_data, _ints = reference.normal_rows, reference.int_rows


def _mesh():
  return Mesh(np.array(jax.devices()), ("corpus",))


def _ref_pairs(x, y, metric, share):
  """A threshold passed by about `share` of the pairs, placed mid-way in a gap between
  scores so that float32 and float64 agree on every comparison, and the reference."""
  within = y is None
  s = reference.METRICS[metric](x, x if within else y)
  largest = metric not in reference.DISTANCES
  vals = np.sort(reference.pair_values(s, within=within))
  if largest:
    vals = vals[::-1]
  i = int(share * len(vals))
  gaps = np.abs(np.diff(vals[i:i + 200]))
  j = i + int(np.argmax(gaps > 1e-3))
  threshold = float((vals[j] + vals[j + 1]) / 2)
  return threshold, reference.pairs_above(s, threshold, largest=largest, upper=within)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
@pytest.mark.parametrize("within", [True, False])
@pytest.mark.parametrize("block_size,query_block_size", [(None, None), (7, 5), (45, 32)])
def test_pairs_above_matches_brute_force(metric, within, block_size, query_block_size):
  x, y = _data(20, (90, 6), (70, 6))
  y = None if within else y
  threshold, (rows, cols, vals) = _ref_pairs(x, y, metric, 0.05)
  assert 10 < len(rows) < 1000
  got = jaxsim.pairs_above(x, y, threshold=threshold, max_pairs=1000, metric=metric,
                           block_size=block_size, query_block_size=query_block_size)
  c = len(rows)
  assert int(got.count) == c and not bool(got.overflowed)
  np.testing.assert_array_equal(got.rows[:c], rows)
  np.testing.assert_array_equal(got.cols[:c], cols)
  np.testing.assert_allclose(got.scores[:c], vals, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.rows[c:], -1)
  np.testing.assert_array_equal(got.cols[c:], -1)
  np.testing.assert_array_equal(got.scores[c:], 0.0)


@pytest.mark.parametrize("block_size,query_block_size", [(None, None), (9, 4), (32, 64)])
def test_pairs_above_overflow_keeps_first_pairs_and_warns(block_size, query_block_size):
  (x,) = _data(21, (80, 5))
  threshold, (rows, cols, _) = _ref_pairs(x, None, "cosine", 0.2)
  cap = len(rows) // 3
  with pytest.warns(RuntimeWarning, match=r"pairs qualify but max_pairs"):
    got = jaxsim.pairs_above(x, threshold=threshold, max_pairs=cap, block_size=block_size,
                             query_block_size=query_block_size)
  assert int(got.count) == len(rows) and bool(got.overflowed)
  np.testing.assert_array_equal(got.rows, rows[:cap])
  np.testing.assert_array_equal(got.cols, cols[:cap])


def test_pairs_above_under_jit_reports_overflow_without_warning():
  (x,) = _data(22, (40, 5))
  threshold, (rows, _, _) = _ref_pairs(x, None, "cosine", 0.2)
  fn = jax.jit(lambda a: jaxsim.pairs_above(a, threshold=threshold, max_pairs=5))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = fn(x)
  assert bool(got.overflowed) and int(got.count) == len(rows)
  np.testing.assert_array_equal(got.rows, rows[:5])


@pytest.mark.parametrize("metric,threshold", [("sq_euclidean", 0.5), ("cosine", 0.9999)])
def test_pairs_above_finds_duplicates(metric, threshold):
  # Integer rows: distinct rows are at squared distance >= 1 and cosine <= 0.99;
  # duplicates at (float32) distance ~0 and cosine ~1.
  (base,) = _ints(23, (12, 4), values=(1, 2, 3))
  x = np.concatenate([base, base[:3], base[5:6]])
  got = jaxsim.pairs_above(x, threshold=threshold, max_pairs=20, metric=metric, block_size=4)
  rows, cols, _ = reference.pairs_above(reference.METRICS[metric](x, x), threshold,
                                        largest=metric == "cosine", upper=True)
  c = int(got.count)
  assert c == len(rows) >= 4
  np.testing.assert_array_equal(got.rows[:c], rows)
  np.testing.assert_array_equal(got.cols[:c], cols)


@pytest.mark.parametrize("within", [True, False])
def test_pairs_above_mesh_identical_to_single_device(within):
  # Within: 203 rows in blocks of 16, 91 tiles over 8 devices (5 padding tiles).
  x, y = _ints(24, (45, 5), (203, 5))
  x, y = (y, None) if within else (x, y)
  kwargs = dict(threshold=2.0, metric="dot", block_size=16)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # small capacity on purpose
    single = jaxsim.pairs_above(x, y, max_pairs=100, **kwargs)
    sharded = jaxsim.pairs_above(x, y, max_pairs=100, mesh=_mesh(), **kwargs)
  for a, b in zip(single, sharded, strict=True):
    np.testing.assert_array_equal(a, b)
  rows, cols, _ = reference.pairs_above(reference.dot(x, x if within else y), 2.0,
                                        upper=within)
  assert int(single.count) == len(rows) > 100
  np.testing.assert_array_equal(single.rows, rows[:100])
  np.testing.assert_array_equal(single.cols, cols[:100])


def test_pairs_above_errors():
  x = np.ones((5, 3), np.float32)
  with pytest.raises(ValueError, match=r"`max_pairs` must be a positive int"):
    jaxsim.pairs_above(x, threshold=0.5, max_pairs=0)
  with pytest.raises(ValueError, match=r"same feature dim"):
    jaxsim.pairs_above(x, np.ones((4, 2)), threshold=0.5, max_pairs=3)
  with pytest.raises(ValueError, match=r"`x` must have rank 2"):
    jaxsim.pairs_above(np.ones((2, 5, 3)), threshold=0.5, max_pairs=3)
  with pytest.raises(TypeError):
    jaxsim.pairs_above(x, threshold=0.5)  # threshold and max_pairs are required
  with pytest.raises(ValueError, match=r"`threshold` must be a scalar, got shape \(2,\)"):
    jaxsim.pairs_above(x, threshold=np.array([0.5, 0.6]), max_pairs=3)


@pytest.mark.parametrize("x_rows,y_rows", [(0, None), (1, None), (3, 0), (0, 4)])
def test_pairs_above_without_pairs_is_empty(x_rows, y_rows):
  x = np.ones((x_rows, 3), np.float32)
  y = None if y_rows is None else np.ones((y_rows, 3), np.float32)
  p = jaxsim.pairs_above(x, y, threshold=0.5, max_pairs=2)
  assert int(p.count) == 0 and not bool(p.overflowed)
  # Buffers are clamped to the pairs there are: none.
  assert p.rows.shape == p.cols.shape == p.scores.shape == (0,)


def test_pairs_above_euclidean_near_duplicates_counted_exactly():
  query, corpus = reference.near_duplicates(34)
  x = np.concatenate([query, corpus])
  for metric, threshold in (("euclidean", 5e-4), ("sq_euclidean", 2.5e-7)):
    got = jaxsim.pairs_above(x, threshold=threshold, max_pairs=64, metric=metric)
    rows, cols, vals = reference.pairs_above(reference.METRICS[metric](x, x), threshold,
                                             largest=False, upper=True)
    c = int(got.count)
    assert c == len(rows) >= 4
    np.testing.assert_array_equal(got.rows[:c], rows)
    np.testing.assert_array_equal(got.cols[:c], cols)
    np.testing.assert_allclose(got.scores[:c], vals, rtol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "sq_euclidean", "cosine"])
def test_pairs_above_never_pairs_a_non_finite_row(metric):
  (x,) = _data(35, (600, 8))
  x[-1] = x[0]
  x[-1, 3] = np.nan
  threshold = 0.5 if metric == "cosine" else 1.0
  got = jaxsim.pairs_above(x, threshold=threshold, max_pairs=20000, metric=metric)
  rows, cols, _ = reference.pairs_above(reference.METRICS[metric](x[:-1], x[:-1]), threshold,
                                        largest=metric == "cosine", upper=True)
  c = int(got.count)
  assert c == len(rows)
  np.testing.assert_array_equal(got.rows[:c], rows)
  np.testing.assert_array_equal(got.cols[:c], cols)


def test_pairs_above_buffers_clamped_to_the_possible_pairs():
  (x,) = _data(36, (100, 4))
  p = jaxsim.pairs_above(x, threshold=-1.0, max_pairs=2**28)
  assert p.rows.shape == p.cols.shape == p.scores.shape == (4950,)
  assert int(p.count) == 4950 and not bool(p.overflowed)
  compiled = jax.jit(lambda a: jaxsim.pairs_above(a, threshold=0.5, max_pairs=2**28)).lower(
      x).compile()
  assert compiled.memory_analysis().output_size_in_bytes < 2**20


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(threshold="0.5", max_pairs=4), TypeError, r"`threshold` must be a real number"),
    (dict(threshold=float("nan"), max_pairs=4), ValueError, r"`threshold` must not be NaN"),
    (dict(threshold=np.float32("nan"), max_pairs=4), ValueError, r"`threshold` must not be NaN"),
    (dict(threshold=0.5, max_pairs=2**31), ValueError, r"`max_pairs` must be at most"),
])
def test_pairs_above_nonsense_options_raise(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxsim.pairs_above(np.ones((5, 3), np.float32), **kwargs)


def test_new_thresholds_reuse_the_compiled_program():
  (x,) = _data(37, (512, 8))
  jaxsim.pairs_above(x, threshold=0.9, max_pairs=2**20)
  before = pairs._pairs._cache_size()
  for t in (0.8, 0.7, 1):
    jaxsim.pairs_above(x, threshold=t, max_pairs=2**20)
  assert pairs._pairs._cache_size() == before


# --- One triangle for y=None (issue 15) ---------------------------------------------------


@pytest.mark.parametrize("metric", ["scaled_dot", "sq_euclidean"])
@pytest.mark.parametrize("block_size", [None, 30, 64])
def test_triangle_pairs_match_brute_force(metric, block_size):
  # The metrics the test above leaves out; 90 rows: one block, three that divide them,
  # two that do not.
  (x,) = _data(60, (90, 6))
  threshold, (rows, cols, vals) = _ref_pairs(x, None, metric, 0.05)
  got = jaxsim.pairs_above(x, threshold=threshold, max_pairs=1000, metric=metric,
                           block_size=block_size)
  c = len(rows)
  assert int(got.count) == c and 10 < c < 1000
  np.testing.assert_array_equal(got.rows[:c], rows)
  np.testing.assert_array_equal(got.cols[:c], cols)
  np.testing.assert_allclose(got.scores[:c], vals, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [None, 13])
def test_triangle_pairs_are_the_two_sided_pairs_with_row_below_col(block_size):
  # Every unordered pair once, as (i, j) with i < j; the two-sided call lists both
  # orders and the self pairs (i, i), whose dot is >= the threshold for these rows.
  x, = _ints(61, (70, 5), values=(0, 1, 2))
  one = jaxsim.pairs_above(x, threshold=4.0, max_pairs=5000, metric="dot",
                           block_size=block_size)
  both = jaxsim.pairs_above(x, x, threshold=4.0, max_pairs=5000, metric="dot",
                            block_size=block_size)
  c, cb = int(one.count), int(both.count)
  r, k = np.asarray(both.rows[:cb]), np.asarray(both.cols[:cb])
  upper = r < k
  np.testing.assert_array_equal(one.rows[:c], r[upper])
  np.testing.assert_array_equal(one.cols[:c], k[upper])
  np.testing.assert_array_equal(one.scores[:c], np.asarray(both.scores[:cb])[upper])
  self_pairs = int(np.sum(np.sum(x.astype(np.float64) ** 2, axis=1) >= 4.0))
  assert cb == 2 * c + self_pairs and np.all(np.asarray(one.rows[:c]) < one.cols[:c])


@pytest.mark.parametrize("n,block_size", [(1000, 128), (1024, 256)])
def test_triangle_pairs_compute_only_the_upper_tiles(n, block_size):
  x = jax.ShapeDtypeStruct((n, 16), np.float32)
  nb = -(-n // block_size)
  one = scores_computed(lambda a: jaxsim.pairs_above(a, threshold=0.9, max_pairs=8,
                                                     block_size=block_size), x)
  assert one == nb * (nb + 1) // 2 * block_size**2
  both = scores_computed(lambda a: jaxsim.pairs_above(a, a, threshold=0.9, max_pairs=8,
                                                      block_size=block_size), x)
  assert both >= n * n


@pytest.mark.parametrize("metric", ["cosine", "dot", "scaled_dot", "sq_euclidean", "euclidean"])
def test_triangle_pairs_memory_is_a_few_tiles(metric):
  n, d, b = 8192, 32, 256
  fn = jax.jit(lambda a: jaxsim.pairs_above(a, threshold=0.5, max_pairs=1024, metric=metric,
                                            block_size=b))
  temp = fn.lower(jax.ShapeDtypeStruct((n, d), np.float32)).compile().memory_analysis()
  # A few (b, b) tiles and the pair buffers; the n x n scores would be 256 MiB.
  assert temp.temp_size_in_bytes <= 16 * b * b * 4 + 64 * 1024, temp.temp_size_in_bytes
