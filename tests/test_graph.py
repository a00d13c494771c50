"""The kNN graph of a set from one triangle (`topk(x, None, k)`) and `knn_graph`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from jax.experimental import sparse
from jax.sharding import Mesh
from sklearn.datasets import load_digits
from sklearn.neighbors import kneighbors_graph

import jaxsim
from jaxsim._src import graph
from tests import reference

METRICS = ("dot", "cosine", "scaled_dot", "sq_euclidean", "euclidean")


def _ref(x, k, metric, exclude_self):
  s = reference.METRICS[metric](x, x)
  largest = metric not in reference.DISTANCES
  if exclude_self:
    np.fill_diagonal(s, -np.inf if largest else np.inf)
  return reference.topk(s, k, largest=largest)


def _mesh():
  return Mesh(np.array(jax.devices()), ("devices",))


def _same(got, want, rtol=1e-5):
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_triangle_identical_to_two_sided_topk(metric):
  # Random rows at fused sizes: blocks of 96 (6 blocks, the last shifted back; not a
  # multiple of the 32-column groups, so keyed tiles and `search._merge_tile`), and
  # blocks of 128 with k = 3 (4 groups a row: the lazy finish and grouped selection; the
  # Euclidean metrics' k + 16 candidates need wider tiles, as in the digits test below).
  x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
  legs = ((96, 7),) if metric in reference.DISTANCES else ((96, 7), (128, 3))
  for block, k in legs:
    got = jaxsim.topk(x, None, k, metric=metric, exclude_self=True, block_size=block)
    assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.int32
    _same(got, jaxsim.topk(x, x, k, metric=metric, exclude_self=True))
    _same(got, _ref(x, k, metric, True))
  # Entries of +-1 in 16 dims: every score is exact (unit rows are +-1/4, the scale
  # 1/4), so duplicates and equal scores tie exactly, across tiles and devices: blocks
  # of 416 (13 groups, k = 12; 3 blocks, 6 tiles over 8 devices, the last shifted),
  # and blocks of one row.
  if metric in ("sq_euclidean", "scaled_dot"):  # the code paths of euclidean and cosine
    return  # less a sqrt or a scale: only their compile time would be added
  x = np.random.default_rng(1).choice(np.float32([-1, 1]), size=(1000, 16))
  x[150:160] = x[3]
  x[900:905] = x[420]
  got = jaxsim.topk(x, None, 12, metric=metric, block_size=416, mesh=_mesh())
  _same(got, _ref(x, 12, metric, False))
  if metric not in reference.DISTANCES:  # the same selection; only its compile is slow
    _same(jaxsim.topk(x[:40], None, 12, metric=metric, exclude_self=True, block_size=1),
          _ref(x[:40], 12, metric, True))


def test_one_tile_more_devices_than_tiles_and_euclidean_refinement():
  x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
  _same(jaxsim.topk(x, None, 4, exclude_self=True, mesh=_mesh()), _ref(x, 4, "cosine", True))
  # Tight clusters far from the origin in one tile: the expansion cannot order a
  # cluster, so the refinement and its second pass decide; a row is at exactly 0 from
  # itself and ranks first.
  rng = np.random.default_rng(3)
  centres = rng.standard_normal((6, 32)) * 100
  x = (centres[rng.integers(0, 6, 700)] + 1e-4 * rng.standard_normal((700, 32)))
  x = x.astype(np.float32)
  got = jaxsim.topk(x, None, 5, metric="euclidean")
  np.testing.assert_array_equal(got[1][:, 0], np.arange(700))
  np.testing.assert_array_equal(got[0][:, 0], 0.0)
  _same(got, _ref(x, 5, "euclidean", False))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_non_finite_rows_rank_last(metric):
  x = np.random.default_rng(4).standard_normal((300, 8)).astype(np.float32)
  x[7, 2], x[250, 0] = np.nan, np.inf
  got = jaxsim.topk(x, None, 299, metric=metric, exclude_self=True, block_size=64)
  _same(got, jaxsim.topk(x, x, 299, metric=metric, exclude_self=True))
  ok = np.setdiff1d(np.arange(300), [7, 250])
  assert set(np.asarray(got[1])[ok][:, -2:].ravel()) == {7, 250}
  if metric not in reference.DISTANCES:  # their k + 16 candidates leave 128 rows ungrouped
    # The fused finish (blocks of 128, k = 3) flags the two rows the same way.
    _same(jaxsim.topk(x, None, 3, metric=metric, exclude_self=True, block_size=128),
          jaxsim.topk(x, x, 3, metric=metric, exclude_self=True))


@pytest.mark.parametrize("metric", METRICS)
def test_temporaries_stay_o_of_the_tiles(metric):
  # A 128 MiB set, a 64 GiB score matrix: the (n, k) running top-k (k + 16 wide for
  # the Euclidean refinement, 20 MiB) and a few tiles, but no prepared or padded copy.
  n, d, k = 2**17, 256, 4
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
  fn = lambda x: jaxsim.topk(x, None, k, metric=metric, exclude_self=True)
  temp = jax.jit(fn).lower(spec).compile().memory_analysis().temp_size_in_bytes
  assert temp < n * d * 4 / 2, f"{metric}: {temp / 2**20:.1f} MiB of temporaries"


@pytest.fixture(scope="module")
def digits():
  # Real data with distinct distances: digits has exact integer ties, which scikit-learn
  # orders arbitrarily; a tiny jitter keeps them apart without changing the neighbours.
  x = load_digits().data
  return (x + 1e-3 * np.random.default_rng(5).standard_normal(x.shape)).astype(np.float32)


@pytest.mark.parametrize("mode", ["connectivity", "distance"])
def test_knn_graph_matches_scikit_learn(digits, mode):
  k = 6
  want = kneighbors_graph(digits.astype(np.float64), k, mode=mode, include_self=False)
  dist, idx = jaxsim.topk(digits, None, k, metric="euclidean", exclude_self=True)
  csr = jaxsim.knn_graph(dist, idx, mode=mode, format="csr")
  assert isinstance(csr, scipy.sparse.csr_matrix) and csr.shape == want.shape
  np.testing.assert_array_equal(csr.indices, want.indices)
  np.testing.assert_array_equal(csr.indptr, want.indptr)
  np.testing.assert_allclose(csr.data, want.data, rtol=1e-5)
  bcoo = jaxsim.knn_graph(dist, idx, mode=mode)
  assert isinstance(bcoo, sparse.BCOO) and bcoo.nse == digits.shape[0] * k
  np.testing.assert_allclose(bcoo.todense(), want.toarray(), rtol=1e-5)


def test_knn_graph_rectangular_and_explicit_zeros():
  scores = np.float32([[0.0, 2.0], [1.0, 3.0]])
  idx = np.int32([[4, 1], [0, 4]])
  csr = jaxsim.knn_graph(scores, idx, n_cols=5, mode="distance", format="csr")
  assert csr.shape == (2, 5) and csr.nnz == 4  # the 0.0 is stored, as scikit-learn does
  np.testing.assert_array_equal(csr.toarray(), [[0, 2, 0, 0, 0], [1, 0, 0, 0, 3]])
  dense = jaxsim.knn_graph(scores, idx, n_cols=5).todense()
  np.testing.assert_array_equal(dense, [[0, 1, 0, 0, 1], [1, 0, 0, 0, 1]])


@pytest.mark.parametrize("call,error,match", [
    (lambda x: jaxsim.topk(x, None, 50, exclude_self=True), ValueError, r"k=50 with n=50"),
    (lambda x: jaxsim.topk(x, None, 51), ValueError, r"k=51 with n=50"),
    (lambda x: jaxsim.topk(x, None, 2, query_block_size=8), ValueError, r"query_block_size"),
    (lambda x: jaxsim.topk(x, None, 2, block_size=0), ValueError, r"`block_size`"),
    (lambda x: jaxsim.topk(x[0], None, 2), ValueError, r"`queries` must have rank 2"),
    (lambda x: jaxsim.topk(x, None, 2, metric="l1"), ValueError, r"`metric` must be one of"),
    (lambda x: jaxsim.topk(x, None, 2, mesh="cpu"), TypeError, r"`mesh` must be a"),
    (lambda x: jaxsim.knn_graph(x[:, :2], np.int32([[0, 1]])), ValueError,
     r"scores.shape=\(50, 2\) and indices.shape=\(1, 2\)"),
    (lambda x: jaxsim.knn_graph(x[:1, :2], np.float32([[0, 1]])), TypeError, r"integers"),
    (lambda x: jaxsim.knn_graph(x[:1, :2], np.int32([[0, 7]]), n_cols=5), ValueError,
     r"\[0, n_cols=5\), got values in \[0, 7\]"),
    (lambda x: jaxsim.knn_graph(x[:1, :2], np.int32([[0, 1]]), mode="weights"), ValueError,
     r"`mode`"),
    (lambda x: jaxsim.knn_graph(x[:1, :2], np.int32([[0, 1]]), format="dense"), ValueError,
     r"`format`"),
])
def test_bad_input_raises(call, error, match):
  with pytest.raises(error, match=match):
    call(np.ones((50, 4), np.float32))


def test_grouped_selection_of_a_few_rows():
  # Four noisy copies of 256 rows, one block each, noisier block by block, so each
  # row's nearest other row is settled by its first off-diagonal tile; then planted
  # near-copies (two each, in different 32-row groups) bring candidates to 8 rows only:
  # rows 0-7 on the row side of tile (0, 2), rows 712-719 on the column side of tile
  # (1, 2), where only those rows take the selection (`search.SPARSE`).
  rng = np.random.default_rng(6)
  base = rng.standard_normal((256, 16))
  x = np.concatenate([base + s * rng.standard_normal((256, 16)) for s in (0.1, 0.2, 0.4, 0.8)])
  for i in range(8):
    for j in (1, 2):  # at distinct distances, so that no two tie to float32 rounding
      x[512 + 64 * j + i] = x[i] + 0.02 * j * rng.standard_normal(16)
      x[256 + 64 * j + i] = x[712 + i] + 0.02 * j * rng.standard_normal(16)
  x = x.astype(np.float32)
  got = jaxsim.topk(x, None, 1, exclude_self=True, block_size=256)
  _same(got, _ref(x, 1, "cosine", True))
  _same(got, jaxsim.topk(x, x, 1, exclude_self=True))


@pytest.mark.parametrize(("metric", "block", "k", "exclude_self"),
                         [("cosine", 128, 3, True), ("dot", 96, 7, False)])
def test_two_threads_give_the_one_program_results(metric, block, k, exclude_self, monkeypatch):
  # Entries of +-1: exact equal scores in both threads' runs of tiles, so the merge's ties
  # to the lower id are under test; blocks of 128 with k = 3 take the grouped selection.
  x = np.random.default_rng(2).choice(np.float32([-1, 1]), size=(700, 16))
  x[300:305] = x[7]
  call = lambda: jaxsim.topk(x, None, k, metric=metric, exclude_self=exclude_self,
                             block_size=block)
  monkeypatch.setattr(graph, "THREADS_MIN_ROWS", 1 << 62)
  one = call()
  ran = []
  monkeypatch.setattr(graph, "THREADS_MIN_ROWS", 0)
  monkeypatch.setattr(graph, "_run_in_threads",
                      lambda calls, run=graph._run_in_threads: ran.append(len(calls)) or run(calls))
  two = call()
  assert ran == [graph.THREADS]
  np.testing.assert_array_equal(two[0], one[0])
  np.testing.assert_array_equal(two[1], one[1])
  _same(two, _ref(x, k, metric, exclude_self))
  # Inside a program the call is traced: one program, no threads.
  jax.jit(call)()
  assert ran == [graph.THREADS]
