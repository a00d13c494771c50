"""Blocked top-k search and threshold pairs: brute force, ties, padding, devices, memory."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.neighbors import NearestNeighbors

import jaxsim
from jaxsim._src import kernels, search
from tests import reference

METRICS = ("dot", "cosine", "scaled_dot", "sq_euclidean", "euclidean")
TOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 2e-2}


_data, _ints = reference.normal_rows, reference.int_rows


def _mesh():
  return Mesh(np.array(jax.devices()), ("corpus",))


def _ref_topk(queries, corpus, k, metric):
  return reference.topk(reference.METRICS[metric](queries, corpus), k,
                        largest=metric not in reference.DISTANCES)


# --- topk -----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_topk_matches_brute_force(metric):
  queries, corpus = _data(0, (37, 16), (500, 16))
  want_s, want_i = _ref_topk(queries, corpus, 5, metric)
  # Blocks of 192 use the group prefilter and an overlapping last block; queries in
  # blocks of 16 leave a padded last query block.
  scores, idx = jaxsim.topk(queries, corpus, 5, metric=metric, block_size=192,
                            query_block_size=16)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
  assert scores.dtype == jnp.float32 and idx.dtype == jnp.int32


@pytest.mark.parametrize("block_size,query_block_size", [
    (None, None), (1, 7), (7, 5), (96, 64), (100, 37), (320, None), (1000, 3),
    # Far more than the corpus: clamped to its 321 rows before the tile-size check.
    (10**9, None)])
def test_topk_independent_of_block_sizes(block_size, query_block_size):
  queries, corpus = _data(1, (40, 8), (321, 8))
  want_s, want_i = _ref_topk(queries, corpus, 3, "cosine")
  scores, idx = jaxsim.topk(queries, corpus, 3, block_size=block_size,
                            query_block_size=query_block_size)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric,sk_metric", [("euclidean", "euclidean"),
                                              ("sq_euclidean", "sqeuclidean")])
def test_topk_matches_sklearn_nearest_neighbors(metric, sk_metric):
  queries, corpus = _data(2, (30, 12), (257, 12))
  corpus += 50.0  # far from the origin: the centring in `prepare` must hold accuracy
  queries += 50.0
  nn = NearestNeighbors(n_neighbors=6, algorithm="brute", metric=sk_metric).fit(corpus)
  want_d, want_i = nn.kneighbors(queries)
  dist, idx = jaxsim.topk(queries, corpus, 6, metric=metric, block_size=64)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(dist, want_d, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("block_size", [None, 3, 96])
def test_topk_breaks_ties_by_lower_index(block_size):
  # Entries in {-1, 0, 1} and d=4: scores take few values, so almost every row has
  # ties at its k-th place, all exact.
  queries, corpus = _ints(3, (20, 4), (250, 4))
  want_s, want_i = _ref_topk(queries, corpus, 2, "dot")
  scores, idx = jaxsim.topk(queries, corpus, 2, metric="dot", block_size=block_size,
                            query_block_size=8)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_array_equal(scores, want_s)


def _stable_merge(best, best_ids, key, first):
  """The reference for `_merge_tile`: a stable sort of the current top-k (lower ids,
  first) followed by the tile's keys, best first."""
  keys = np.concatenate([best, key], axis=1).astype(np.float64)
  ids = np.concatenate([best_ids, np.broadcast_to(first + np.arange(key.shape[1]), key.shape)],
                       axis=1)
  order = np.argsort(-keys, axis=1, kind="stable")[:, :best.shape[1]]
  return np.take_along_axis(keys, order, 1), np.take_along_axis(ids, order, 1)


@pytest.mark.parametrize("k", [1, 10, 47])
@pytest.mark.parametrize("most", [0, 1, 2, 3, 5, 9, 48])
def test_merge_tile_every_threshold_branch_matches_a_stable_sort(most, k):
  """Each branch of the running-threshold selection (skip, 1 / 2 / 4 / 8 passing
  groups, the `k` best groups), picked by the largest number of groups a row has
  above its k-th key, gives the stable sort's keys and ids: small-integer keys tie
  with the k-th (and stay out), -inf (padding) and the lowest finite value (NaN)
  never displace a real key. k=47 is one below the 48 groups of the tile."""
  rng = np.random.default_rng(most * 100 + k)
  c, groups = 24, 48
  b = groups * search.GROUP
  best = -np.sort(-rng.integers(0, 4, (c, k)).astype(np.float32), axis=1)
  best_ids = np.argsort(rng.random((c, k)), axis=1).astype(np.int32)  # all below `first`
  thr = best[:, -1:]
  # Keys at or below each row's k-th, with ties to it, padding and NaN's stand-in ...
  key = thr - rng.integers(0, 3, (c, b)).astype(np.float32)
  key[:, rng.random(b) < 0.05] = -np.inf
  key[rng.random((c, b)) < 0.02] = np.finfo(np.float32).min
  # ... and `most` groups of row 0 (fewer in the other rows) above it, ties included.
  for r in range(c):
    hit = rng.choice(groups, size=most if r == 0 else rng.integers(0, most + 1), replace=False)
    for g in hit:
      cols = g * search.GROUP + rng.choice(search.GROUP, size=rng.integers(1, 4), replace=False)
      key[r, cols] = thr[r] + rng.integers(1, 3, cols.size)
  passing = (key.reshape(c, groups, -1).max(-1) > thr).sum(1)
  assert passing.max() == most
  first = 1000
  want_s, want_i = _stable_merge(best, best_ids, key, first)
  # axis=0: the same keys handed over transposed (a triangle tile's column side).
  for axis, tile in ((1, key), (0, key.T)):
    got = jax.jit(search._merge_tile, static_argnums=(4, 5, 6, 7))(
        jnp.asarray(best), jnp.asarray(best_ids), jnp.asarray(tile), jnp.int32(first), k,
        False, 0.95, axis)
    np.testing.assert_array_equal(got[0], want_s)
    np.testing.assert_array_equal(got[1], want_i)


@pytest.mark.parametrize("k,block_size,query_block_size", [
    (10, 64, 40), (10, 96, None), (10, 352, 8), (11, 384, 64), (3, 1024, 128)])
def test_topk_threshold_selection_identical_across_blocks_and_devices(k, block_size,
                                                                      query_block_size):
  """End to end at moderate size with exact ties (small-integer rows, d=8): many
  blocks (later ones mostly skipped or narrowed by the threshold), k near the 12
  groups of a 384-row block, exclude_self, a NaN row and a mesh give the brute-force
  top-k, the same on one device and eight."""
  (x,) = _ints(21, (2000, 8), values=(-2, -1, 0, 1, 2))
  x[5] = np.nan
  s = reference.METRICS["dot"](x, x)
  s[5, :] = s[:, 5] = np.finfo(np.float32).min
  np.fill_diagonal(s, -np.inf)
  want_s, want_i = reference.topk(s, k)
  kw = dict(metric="dot", exclude_self=True, block_size=block_size,
            query_block_size=query_block_size)
  scores, idx = jaxsim.topk(x, x, k, **kw)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_array_equal(scores, want_s)
  if block_size == 96:
    sharded = jaxsim.topk(x, x, k, mesh=_mesh(), **kw)
    np.testing.assert_array_equal(sharded[1], idx)
    np.testing.assert_array_equal(sharded[0], scores)


def test_topk_duplicate_rows_come_in_index_order():
  (base,) = _data(4, (50, 8))
  corpus = np.concatenate([base, base[::-1], base])  # every row three times
  scores, idx = jaxsim.topk(base[:10], corpus, 3, block_size=64)
  idx = np.asarray(idx)
  np.testing.assert_array_equal(idx, np.stack([np.arange(10), 99 - np.arange(10),
                                               100 + np.arange(10)], 1))
  np.testing.assert_allclose(scores, 1.0, rtol=1e-6)


def test_topk_k_equals_n_sorts_every_row():
  queries, corpus = _data(5, (9, 6), (70, 6))
  want_s, want_i = _ref_topk(queries, corpus, 70, "sq_euclidean")
  scores, idx = jaxsim.topk(queries, corpus, 70, metric="sq_euclidean", block_size=32)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
  assert np.all((np.asarray(idx) >= 0) & (np.asarray(idx) < 70))  # no padding


@pytest.mark.parametrize("block_size", [None, 64])
def test_topk_exclude_self(block_size):
  (x,) = _data(6, (150, 8))
  x[7] = x[3]  # a duplicate: row 3 must still find row 7 and vice versa
  s = reference.cosine(x, x)
  np.fill_diagonal(s, -np.inf)
  want_s, want_i = reference.topk(s, 4)
  scores, idx = jaxsim.topk(x, x, 4, exclude_self=True, block_size=block_size,
                            query_block_size=32)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-6)
  assert idx[3, 0] == 7 and idx[7, 0] == 3


def test_topk_zero_rows_score_zero_and_tie_by_index():
  queries, corpus = _data(7, (5, 6), (40, 6))
  corpus[[4, 9, 30]] = 0.0
  queries[2] = 0.0  # a zero query: cosine 0 with everything, so the first k rows
  want_s, want_i = _ref_topk(queries, corpus, 5, "cosine")
  scores, idx = jaxsim.topk(queries, corpus, 5, block_size=8)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_array_equal(idx[2], np.arange(5))
  np.testing.assert_allclose(scores, want_s, atol=1e-6)
  assert not np.any(np.isnan(scores))


@pytest.mark.parametrize("block_size", [None, 4])
def test_topk_infinite_scores_rank_last_and_padding_never_appears(block_size):
  # Row 3 scores -inf against the query (and a NaN row 6): with k = n they must still
  # be returned, ranked last, and never displaced by padding or the initial state.
  corpus = np.arange(20, dtype=np.float32).reshape(10, 2)
  corpus[3] = [-np.inf, 0.0]
  corpus[6] = [np.nan, 1.0]
  scores, idx = jaxsim.topk(np.float32([[1.0, 0.0]]), corpus, 10, metric="dot",
                            block_size=block_size)
  np.testing.assert_array_equal(np.sort(idx[0]), np.arange(10))
  np.testing.assert_array_equal(idx[0, -2:], [3, 6])
  np.testing.assert_array_equal(scores[0, -2:], np.finfo(np.float32).min)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_topk_low_precision_dtypes(dtype):
  queries, corpus = _data(8, (12, 16), (200, 16))
  q, c = jnp.asarray(queries, dtype), jnp.asarray(corpus, dtype)
  full = reference.cosine(np.asarray(q, np.float32), np.asarray(c, np.float32))
  want_s, _ = reference.topk(full, 4)
  scores, idx = jaxsim.topk(q, c, 4, block_size=64)
  assert scores.dtype == dtype
  # Near-ties may order differently at low precision; the scores of what was found
  # must still be the k best.
  np.testing.assert_allclose(np.take_along_axis(full, np.asarray(idx), 1), want_s,
                             atol=TOL[dtype])
  np.testing.assert_allclose(np.asarray(scores, np.float32), want_s, atol=TOL[dtype])


def test_topk_under_jit_and_integer_inputs():
  queries, corpus = _ints(9, (6, 5), (50, 5), values=(-2, -1, 0, 1, 3))
  eager = jaxsim.topk(queries.astype(np.int32), corpus.astype(np.int32), 3, metric="dot")
  jitted = jax.jit(lambda a, b: jaxsim.topk(a, b, 3, metric="dot", block_size=16))(
      queries, corpus)
  want_s, want_i = _ref_topk(queries, corpus, 3, "dot")
  for scores, idx in (eager, jitted):
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(scores, want_s)


def test_topk_approx_recall():
  queries, corpus = _data(10, (32, 16), (600, 16))
  _, want_i = _ref_topk(queries, corpus, 10, "cosine")
  _, idx = jaxsim.topk(queries, corpus, 10, approx=True, recall_target=0.9, block_size=128)
  idx = np.asarray(idx)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, want_i, strict=True)])
  assert recall >= 0.9
  assert np.all((idx >= 0) & (idx < 600))


def test_topk_empty_queries():
  scores, idx = jaxsim.topk(np.zeros((0, 4), np.float32), np.ones((5, 4), np.float32), 2)
  assert scores.shape == (0, 2) and idx.shape == (0, 2) and idx.dtype == jnp.int32


@pytest.mark.parametrize("n,exclude_self", [(203, False), (203, True), (5, False)])
def test_topk_mesh_identical_to_single_device(n, exclude_self):
  # n=203 is not a multiple of 8 devices; n=5 leaves devices with no real rows.
  (corpus,) = _ints(11, (n, 6))
  queries = corpus if exclude_self else _ints(12, (33, 6))[0]
  k = 4
  single = jaxsim.topk(queries, corpus, k, metric="dot", exclude_self=exclude_self,
                       block_size=32)
  sharded = jaxsim.topk(queries, corpus, k, metric="dot", exclude_self=exclude_self,
                        block_size=32, mesh=_mesh())
  np.testing.assert_array_equal(sharded[1], single[1])
  np.testing.assert_array_equal(sharded[0], single[0])
  if not exclude_self:
    np.testing.assert_array_equal(single[1], _ref_topk(queries, corpus, k, "dot")[1])


def test_topk_mesh_random_data_and_euclidean():
  queries, corpus = _data(13, (17, 8), (301, 8))
  for metric in ("cosine", "euclidean"):
    single = jaxsim.topk(queries, corpus, 6, metric=metric)
    sharded = jaxsim.topk(queries, corpus, 6, metric=metric, mesh=_mesh())
    np.testing.assert_array_equal(sharded[1], single[1])
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call", ["topk", "pairs_above", "similarity_stats"])
def test_temporaries_stay_far_below_the_score_matrix(call):
  q, n, d = 4096, 32768, 32
  fns = {
      "topk": lambda a, b: jaxsim.topk(a, b, 10),
      "pairs_above": lambda a, b: jaxsim.pairs_above(a, b, threshold=0.9, max_pairs=1024),
      "similarity_stats": lambda a, b: jaxsim.similarity_stats(a, b),
  }
  spec = (jax.ShapeDtypeStruct((q, d), jnp.float32), jax.ShapeDtypeStruct((n, d), jnp.float32))
  compiled = jax.jit(fns[call]).lower(*spec).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 0.1 * q * n * 4, f"{call}: {temp / 2**20:.1f} MiB of temporaries"


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=51), r"k=51 with n=50"),
    (dict(k=50, exclude_self=True), r"k=50 with n=50"),
    (dict(k=0), r"`k` must be a positive int"),
    (dict(k=2.0), r"`k` must be a positive int"),
    (dict(k=2, block_size=0), r"`block_size`"),
    (dict(k=2, query_block_size=-1), r"`query_block_size`"),
    (dict(k=2, metric="manhattan"), r"`metric` must be one of"),
    (dict(k=2, approx=True, recall_target=1.5), r"recall_target"),
])
def test_topk_errors(kwargs, match):
  x = np.ones((50, 4), np.float32)
  with pytest.raises(ValueError, match=match):
    jaxsim.topk(x, x, **kwargs)


def test_topk_shape_and_type_errors():
  with pytest.raises(ValueError, match=r"exclude_self.*queries.shape=\(3, 4\)"):
    jaxsim.topk(np.ones((3, 4)), np.ones((5, 4)), 1, exclude_self=True)
  with pytest.raises(ValueError, match=r"same feature dim.*queries.shape=\(3, 4\)"):
    jaxsim.topk(np.ones((3, 4)), np.ones((5, 3)), 1)
  with pytest.raises(ValueError, match=r"`queries` must have rank 2, got shape \(4,\)"):
    jaxsim.topk(np.ones(4), np.ones((5, 4)), 1)
  with pytest.raises(ValueError, match=r"`corpus` must have rank 2"):
    jaxsim.topk(np.ones((3, 4)), np.ones((2, 5, 4)), 1)
  with pytest.raises(TypeError, match=r"`corpus` must be real"):
    jaxsim.topk(np.ones((3, 4)), np.ones((5, 4), np.complex64), 1)
  with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh"):
    jaxsim.topk(np.ones((3, 4)), np.ones((5, 4)), 1, mesh=jax.devices())
  with pytest.raises(TypeError, match=r"`exclude_self` must be a bool"):
    jaxsim.topk(np.ones((3, 4)), np.ones((3, 4)), 1, exclude_self="yes")


@pytest.mark.parametrize("metric", ["sq_euclidean", "euclidean"])
@pytest.mark.parametrize("block_size", [None, 1, 3])
def test_topk_equidistant_integer_points_tie_by_index(metric, block_size):
  # Four points at distance 3 from the query, three far away: the centring shift must
  # keep integer distances exact, or the four would not tie.
  corpus = np.array([[3, 0], [0, 3], [-3, 0], [0, -3], [10, 10], [11, 10], [12, 13]],
                    np.float32)
  scores, idx = jaxsim.topk(np.zeros((1, 2), np.float32), corpus, 4, metric=metric,
                            block_size=block_size)
  np.testing.assert_array_equal(idx, [[0, 1, 2, 3]])
  np.testing.assert_array_equal(scores, np.full((1, 4), 9.0 if metric == "sq_euclidean" else 3.0))


def test_topk_nan_corpus_row_spoils_only_itself():
  queries, corpus = _data(21, (5, 4), (40, 4))
  corpus[[3, 17]] = [[np.nan, 0, 0, 0], [np.inf, 1, 0, 0]]
  finite = np.setdiff1d(np.arange(40), [3, 17])
  for metric in ("euclidean", "cosine"):
    scores, idx = jaxsim.topk(queries, corpus, 38, metric=metric, block_size=16)
    want_s, want_i = _ref_topk(queries, corpus[finite], 38, metric)
    np.testing.assert_array_equal(idx, finite[want_i])
    np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)


def test_float64_under_x64_matches_float64_brute_force():
  with jax.enable_x64(True):
    queries, corpus = _data(22, (9, 5), (70, 5), dtype=np.float64)
    for metric in ("cosine", "sq_euclidean"):
      scores, idx = jaxsim.topk(queries, corpus, 7, metric=metric, block_size=16)
      want_s, want_i = _ref_topk(queries, corpus, 7, metric)
      assert scores.dtype == jnp.float64
      np.testing.assert_array_equal(idx, want_i)
      np.testing.assert_allclose(scores, want_s, rtol=1e-12, atol=1e-12)
    p = jaxsim.pairs_above(corpus, threshold=0.5, max_pairs=400, block_size=16)
    s = reference.cosine(corpus, corpus)
    rows, cols = np.nonzero(np.triu(s >= 0.5, 1))
    assert p.scores.dtype == jnp.float64 and int(p.count) == rows.size
    np.testing.assert_array_equal(p.rows[:rows.size], rows)
    np.testing.assert_allclose(p.scores[:rows.size], s[rows, cols], rtol=1e-12)


# --- Numerics: non-finite rows, near-duplicates, options, guards (issue 9) -------------------


@pytest.mark.parametrize("n", [512, 2000])
@pytest.mark.parametrize("metric", ["euclidean", "sq_euclidean", "cosine"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_topk_non_finite_corpus_row_ranks_last_at_fused_sizes(metric, n, bad):
  queries, corpus = _data(30, (64, 16), (n, 16))
  corpus[-1, 0] = bad
  scores, idx = jaxsim.topk(queries, corpus, 3, metric=metric)
  want_s, want_i = _ref_topk(queries, corpus[:-1], 3, metric)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
  # k = n: the bad row comes last for every query.
  _, idx = jaxsim.topk(queries[:4], corpus, n, metric=metric)
  np.testing.assert_array_equal(np.asarray(idx)[:, -1], n - 1)


@pytest.mark.parametrize("metric", ["euclidean", "sq_euclidean"])
@pytest.mark.parametrize("block_size", [None, 64])
def test_topk_near_duplicates_in_order_with_accurate_distances(metric, block_size):
  query, corpus = reference.near_duplicates(31)
  scores, idx = jaxsim.topk(query, corpus, 10, metric=metric, block_size=block_size)
  np.testing.assert_array_equal(idx[0], np.arange(511, 501, -1))
  want = reference.METRICS[metric](query, corpus)[0, 511:501:-1]
  np.testing.assert_allclose(scores[0], want, rtol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "sq_euclidean"])
def test_topk_a_row_equal_to_the_query_ranks_first_at_exactly_zero(metric):
  # Tight clusters far from the origin: the expansion's noise exceeds the distances
  # within a cluster, so it used to rank a neighbour above the point itself.
  rng = np.random.default_rng(32)
  centres = rng.standard_normal((8, 64)) * 100
  x = (centres[rng.integers(0, 8, 1024)] + 1e-4 * rng.standard_normal((1024, 64)))
  x = x.astype(np.float32)
  scores, idx = jaxsim.topk(x, x, 3, metric=metric)
  np.testing.assert_array_equal(idx[:, 0], np.arange(1024))
  np.testing.assert_array_equal(scores[:, 0], 0.0)
  want_s, want_i = _ref_topk(x, x, 3, metric)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5)


def test_topk_mesh_near_duplicates_identical_to_single_device():
  query, corpus = reference.near_duplicates(33, n=515)
  single = jaxsim.topk(query, corpus[:-3], 10, metric="euclidean")
  sharded = jaxsim.topk(query, corpus[:-3], 10, metric="euclidean", mesh=_mesh())
  np.testing.assert_array_equal(sharded[1], single[1])
  np.testing.assert_array_equal(sharded[0], single[0])


def test_topk_string_recall_target_raises():
  with pytest.raises(TypeError, match=r"`recall_target` must be a real number"):
    jaxsim.topk(np.ones((5, 3)), np.ones((9, 3)), 2, approx=True, recall_target="0.9")


def test_float64_inputs_raise_no_warning():
  queries, corpus = _data(38, (64, 8), (512, 8), dtype=np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for metric in ("cosine", "euclidean"):  # the dtype handling is the metrics' common code
      assert jaxsim.topk(queries, corpus.astype(np.float32), 3, metric=metric)[0].dtype == \
          jnp.float32
      jaxsim.pairs_above(queries, corpus, threshold=0.5, max_pairs=2**16, metric=metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("call", ["topk", "pairs_above", "similarity_stats"])
def test_no_corpus_sized_temporaries(call, metric):
  # A 256 MiB corpus: any prepared, masked or padded copy of it shows in the temporaries.
  q, n, d = 1024, 2**20, 64
  fns = {
      "topk": lambda a, b: jaxsim.topk(a, b, 10, metric=metric),
      "pairs_above": lambda a, b: jaxsim.pairs_above(a, b, threshold=0.9, max_pairs=1024,
                                                     metric=metric),
      "similarity_stats": lambda a, b: jaxsim.similarity_stats(a, b, metric=metric,
                                                               range=(-1.0, 1.0)),
  }
  spec = (jax.ShapeDtypeStruct((q, d), jnp.float32), jax.ShapeDtypeStruct((n, d), jnp.float32))
  temp = jax.jit(fns[call]).lower(*spec).compile().memory_analysis().temp_size_in_bytes
  assert temp < n * d * 4 / 4, f"{call}/{metric}: {temp / 2**20:.1f} MiB of temporaries"


@pytest.mark.parametrize("n", [2**20, 2**20 + 3])
@pytest.mark.parametrize("call", ["topk", "similarity_stats"])
def test_no_corpus_sized_temporaries_with_a_mesh(call, n):
  # n not divisible by the 8 devices used to pad a whole copy of the corpus (and the
  # Euclidean centring outside the devices' scans made another).
  q, d = 1024, 64
  fns = {
      "topk": lambda a, b: jaxsim.topk(a, b, 10, metric="euclidean", mesh=_mesh()),
      "similarity_stats": lambda a, b: jaxsim.similarity_stats(a, b, mesh=_mesh()),
  }
  spec = (jax.ShapeDtypeStruct((q, d), jnp.float32), jax.ShapeDtypeStruct((n, d), jnp.float32))
  temp = jax.jit(fns[call]).lower(*spec).compile().memory_analysis().temp_size_in_bytes
  assert temp < n * d * 4 / 2, f"{call}: {temp / 2**20:.1f} MiB of temporaries"


@pytest.mark.parametrize("metric", ["euclidean", "sq_euclidean", "cosine"])
def test_topk_prepared_on_a_prepared_padded_corpus_matches_topk(metric):
  # The Index path: the corpus prepared once, padded past its n real rows, n traced.
  queries, corpus = _data(39, (40, 16), (512, 16))
  corpus[100] = queries[3]  # an exact match: distance 0, first
  corpus[-1, 2] = np.nan
  euclid = metric != "cosine"

  @jax.jit
  def search_prepared(queries, corpus, n):
    shift = kernels.centre(corpus[:512]) if euclid else jnp.zeros((1, 1))
    prep = lambda rows: kernels.prepare(rows, metric, shift=shift if euclid else None)
    rows = prep(jnp.pad(corpus, ((0, 88), (0, 0))))
    return search.topk_prepared(prep(queries), rows, shift, lambda block, shift: block, n,
                                k=5, metric=metric, block_size=128, query_block_size=None)

  scores, idx = search_prepared(queries, corpus, jnp.int32(512))
  want_s, want_i = jaxsim.topk(queries, corpus, 5, metric=metric)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
  assert idx[3, 0] == 100
