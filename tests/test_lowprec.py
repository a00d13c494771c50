"""bfloat16 scoring with a proven bound (`jaxsim._src.lowprec`) and the exact top-k built on it."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxsim
from jaxsim._src import lowprec
from tests import reference


def _topk(force, monkeypatch, *args, **kwargs):
  monkeypatch.setattr(lowprec, "FORCE", force)
  scores, idx = jaxsim.topk(*args, **kwargs)
  return np.asarray(scores), np.asarray(idx)


def _assert_exact(idx, queries, corpus, k, metric, *, exclude_self=False, tie=1e-6):
  """`idx` is the float64 top-k (stable, ties to the lower index), except that entries
  whose float64 scores lie within `tie` (relative) of each other may swap: float32
  rounding can order those either way."""
  s = reference.METRICS[metric](queries, corpus)
  if exclude_self:
    np.fill_diagonal(s, -np.inf)
  want_s, want = reference.topk(s, k)
  got_s = np.take_along_axis(s, idx, axis=1)
  scale = np.max(np.abs(want_s), axis=1, keepdims=True)
  assert np.all(np.abs(got_s - want_s) <= tie * scale), "not the float64 top-k"
  assert np.mean(idx == want) > 0.99
  for row in range(len(idx)):  # no duplicates, and each entry a real row
    assert len(set(idx[row])) == k


def _assert_same(a, b, *, rtol=1e-6):
  """Two float32 searches agree: indices except at last-bit near-ties, scores to rtol."""
  (sa, ia), (sb, ib) = a, b
  np.testing.assert_allclose(sa, sb, rtol=rtol, atol=rtol)
  differ = ia != ib
  assert np.mean(differ) < 0.01
  # Where the order differs, it is between scores equal to float32 rounding.
  assert np.all(np.abs(sa - sb)[differ] <= rtol * np.maximum(1.0, np.abs(sa[differ])))


# --- the bound ---------------------------------------------------------------------------


@pytest.mark.parametrize("d", [3, 64, 1000])
def test_bound_covers_float32_and_float64_against_bfloat16(d):
  rng = np.random.default_rng(d)
  # Rows over many magnitudes, some with entries that underflow bfloat16's range.
  x = rng.standard_normal((64, d)) * 10.0 ** rng.uniform(-30, 15, (64, 1))
  y = rng.standard_normal((96, d)) * 10.0 ** rng.uniform(-30, 15, (96, 1))
  y[:4] = x[:4] * (1 + 1e-3 * rng.standard_normal((4, d)))  # near-parallel pairs
  x, y = x.astype(np.float32), y.astype(np.float32)
  xs, ys = lowprec.split(jnp.asarray(x)), lowprec.split(jnp.asarray(y))
  low = np.asarray(lowprec.matmul_t(xs.low, ys.low), np.float64)
  pair = np.asarray(lowprec.bound(jax.tree.map(lambda v: v[:, None], xs.norms),
                                  jax.tree.map(lambda v: v[None, :], ys.norms), d))
  per_query = np.asarray(lowprec.bound(xs.norms, ys.norms.max(), d))
  assert np.all(pair <= per_query[:, None])
  f32 = np.asarray(jnp.asarray(x) @ jnp.asarray(y).T, np.float64)
  f64 = reference.dot(x, y)
  finite = np.isfinite(pair)
  assert finite.mean() > 0.5  # huge products are rightly unbounded, most are not
  for exact in (f32, f64):
    assert np.all(np.abs(exact - low)[finite] <= pair[finite])
  # Not vacuous: within 50x of the worst actual error on unit-scale rows.
  unit = np.abs(np.log10(np.linalg.norm(x.astype(np.float64), axis=1)))[:, None] < 1
  assert np.max((np.abs(f64 - low) / pair)[finite & unit]) > 0.02


def test_doctests():
  assert doctest.testmod(lowprec).failed == 0


def test_bound_is_not_finite_for_non_finite_or_huge_rows():
  x = np.ones((3, 8), np.float32)
  x[0, 1], x[1, 2], x[2] = np.nan, np.inf, 1e30
  e = np.asarray(lowprec.bound(lowprec.split(jnp.asarray(x)).norms,
                               lowprec.split(jnp.ones((1, 8))).norms.max(), 8))
  assert not np.any(e < np.inf)  # NaN or inf: never certifies


def test_use_only_float32_inner_products_at_default_precision(monkeypatch):
  big = dict(precision=None, approx=False, work=2**40, rows=10**6, k=10)
  monkeypatch.setattr(lowprec, "FORCE", True)
  assert lowprec.use(jnp.float32, metric="cosine", **big)
  assert not lowprec.use(jnp.bfloat16, metric="cosine", **big)
  assert not lowprec.use(None, metric="cosine", **big)
  assert not lowprec.use(jnp.float32, metric="euclidean", **big)
  assert not lowprec.use(jnp.float32, metric="dot", **big | dict(precision="highest"))
  assert not lowprec.use(jnp.float32, metric="dot", **big | dict(approx=True))
  assert not lowprec.use(jnp.float32, metric="dot", **big | dict(rows=lowprec.width(10)))
  monkeypatch.setattr(lowprec, "FORCE", None)
  assert not lowprec.use(jnp.float32, metric="dot", **big | dict(work=lowprec.MIN_WORK - 1))
  assert not lowprec.use(jnp.float32, metric="dot", **big | dict(rows=lowprec.MIN_ROWS - 1))


# --- exact top-k -------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "dot"])  # scaled_dot: the non-finite test
def test_topk_bfloat16_scoring_is_the_float32_search(metric, monkeypatch):
  # 300 x 5000 x 64: XLA's fused matmul paths, two corpus blocks.
  queries, corpus = reference.normal_rows(41, (300, 64), (5000, 64))
  k = 10
  on = _topk(True, monkeypatch, queries, corpus, k, metric=metric)
  off = _topk(False, monkeypatch, queries, corpus, k, metric=metric)
  _assert_same(on, off)
  _assert_exact(on[1], queries, corpus, k, metric)


def _near_ties(seed, centres, *, copies, n, n_queries=100, d=48):
  """Random rows plus, for each of `centres` queries, `copies` corpus rows `q + 1e-3 v`
  (`|v| ~ |q|`): their dot products with `q` differ by about 1e-4 relative, which
  float32 resolves and bfloat16 (about 4e-3) does not, so with more copies than the
  width the bfloat16 candidates alone would be the wrong ones."""
  rng = np.random.default_rng(seed)
  queries = rng.standard_normal((n_queries, d))
  corpus = rng.standard_normal((n, d))
  near = queries[:centres, None, :] + 1e-3 * rng.standard_normal((centres, copies, d))
  corpus[rng.choice(n, centres * copies, replace=False)] = near.reshape(-1, d)
  return queries.astype(np.float32), corpus.astype(np.float32)


@pytest.mark.parametrize("centres,copies,n,q", [(5, 120, 3000, 100), (80, 40, 4000, 100),
                                               (20, 40, 8000, 2048)])
def test_topk_near_ties_fall_back_to_float32(centres, copies, n, q, monkeypatch):
  # Uncertified queries (the centres, and random queries with a cluster in their
  # top-k): 6 of 100 take the compact float32 pass, 93 of 100 (more than FALLBACK_ROWS)
  # the full one, 100 of 2048 (more than FALLBACK_ROWS, up to one in FALLBACK_SHARE)
  # the compact one.
  assert copies > lowprec.width(12)
  queries, corpus = _near_ties(42, centres, copies=copies, n=n, n_queries=q)
  on = _topk(True, monkeypatch, queries, corpus, 12, metric="dot")
  # The copies' scores lie ~1e-4 apart, far outside the tie tolerance: a wrong
  # candidate set would fail here.
  _assert_exact(on[1], queries, corpus, 12, "dot")
  _assert_same(on, _topk(False, monkeypatch, queries, corpus, 12, metric="dot"))


def test_topk_bfloat16_keeps_rows_within_twice_the_bound_below_the_kth(monkeypatch):
  # The bfloat16 scan drops a row once its key lies 2 E below the k-th kept one
  # (`_lowprec_topk`). Here k rows that bfloat16 rounds up come first, and rows that it
  # rounds down come two blocks later: in float32 the late rows win by 0.3 s, in
  # bfloat16 they lose by s = 2**-7, which lies between E (about 0.9 s for d = 2) and
  # 2 E. Dropping rows at E below the k-th would lose them, and since every other row
  # scores far lower, the certificate alone would not notice.
  s, k = 2.0**-7, 10
  rng = np.random.default_rng(46)
  corpus = rng.uniform(0.0, 0.1, (4096, 2))
  corpus[:k] = [1 + 0.6 * s, 1]  # float32 2 + 0.6 s, bfloat16 2 + s
  late = np.arange(3000, 3000 + k // 2)
  corpus[late] = 1 + 0.45 * s  # float32 2 + 0.9 s, bfloat16 2
  queries = np.concatenate([np.ones((1, 2)), rng.uniform(0.0, 1.0, (63, 2))])
  queries, corpus = queries.astype(np.float32), corpus.astype(np.float32)
  on = _topk(True, monkeypatch, queries, corpus, k, metric="dot", block_size=1024)
  np.testing.assert_array_equal(on[1][0], np.concatenate([late, np.arange(k // 2)]))
  _assert_exact(on[1], queries, corpus, k, "dot")


@pytest.mark.parametrize("metric", ["cosine", "scaled_dot"])
def test_topk_bfloat16_non_finite_rows_as_in_float32(metric, monkeypatch):
  # A NaN query (all scores NaN, ranked by index) fails its certificate alone. Cosine:
  # NaN and infinite corpus rows score NaN in both precisions and do not widen the
  # bound. scaled_dot (the query side scaled before rounding): the other queries are
  # certified. (For dot metrics a non-finite corpus row makes every bound infinite.)
  queries, corpus = reference.normal_rows(43, (200, 32), (2000, 32))
  if metric == "cosine":
    corpus[[5, 700]] = np.nan
    corpus[900, 3] = np.inf
  queries[7, 0] = np.nan
  on = _topk(True, monkeypatch, queries, corpus, 10, metric=metric)
  off = _topk(False, monkeypatch, queries, corpus, 10, metric=metric)
  _assert_same(on, off)
  np.testing.assert_array_equal(on[1][7], np.arange(10))  # all NaN: by index
  if metric == "cosine":
    assert not np.isin(np.delete(on[1], 7, axis=0), [5, 700, 900]).any()
  else:
    _assert_exact(np.delete(on[1], 7, axis=0), np.delete(queries, 7, axis=0), corpus, 10,
                  metric)


def test_topk_bfloat16_with_a_mesh_exclude_self_and_small_blocks(monkeypatch):
  (corpus,) = reference.normal_rows(44, (1203, 40))
  corpus[100:110] = corpus[50]  # exact duplicates tie to the lower index
  # 60 near-ties (more than the width): 61 queries take the compact fallback on the mesh.
  corpus[200:260] = corpus[150] + 1e-3 * reference.normal_rows(45, (60, 40))[0]
  mesh = Mesh(np.array(jax.devices()), ("corpus",))
  kwargs = dict(metric="dot", exclude_self=True, block_size=64, query_block_size=96)
  on = _topk(True, monkeypatch, corpus, corpus, 7, mesh=mesh, **kwargs)
  off = _topk(False, monkeypatch, corpus, corpus, 7, **kwargs)
  _assert_same(on, off)
  _assert_exact(on[1], corpus, corpus, 7, "dot", exclude_self=True)
  np.testing.assert_array_equal(on[1][50, :6], [100, 101, 102, 103, 104, 105])


def test_topk_bfloat16_temporaries_stay_small(monkeypatch):
  monkeypatch.setattr(lowprec, "FORCE", True)
  q, n, d = 1024, 2**20, 64
  spec = (jax.ShapeDtypeStruct((q, d), jnp.float32), jax.ShapeDtypeStruct((n, d), jnp.float32))
  temp = jax.jit(lambda a, b: jaxsim.topk(a, b, 10)).lower(*spec).compile().memory_analysis()
  assert temp.temp_size_in_bytes < n * d * 4 / 4
