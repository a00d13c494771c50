"""Core kernels against numpy, scikit-learn and scipy, plus properties and transforms."""

import functools
import warnings

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.spatial.distance as ssd
from absl.testing import parameterized
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.metrics.pairwise import cosine_similarity, euclidean_distances

import jaxsim
from jaxsim._src import kernels
from tests import reference

FUNCS = {name: getattr(jaxsim, name) for name in reference.METRICS}
TOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 2e-2}


def _rand(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _assert_close(got, want, dtype=jnp.float32, scale=1.0):
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("metric", list(FUNCS))
@pytest.mark.parametrize(
    "x_shape,y_shape",
    [((7, 5), (9, 5)), ((3, 7, 5), (3, 9, 5)), ((2, 1, 4, 3), (5, 6, 3)), ((1, 8), (4, 8))],
)
def test_matches_numpy_reference(metric, x_shape, y_shape):
  x, y = _rand(x_shape, 1), _rand(y_shape, 2)
  got = FUNCS[metric](x, y)
  want = reference.METRICS[metric](x, y)
  assert got.shape == want.shape == np.broadcast_shapes(x_shape[:-2], y_shape[:-2]) + (
      x_shape[-2], y_shape[-2])
  _assert_close(got, want, scale=np.abs(want).max())


@pytest.mark.parametrize("metric", list(FUNCS))
def test_self_similarity_equals_explicit_pair(metric):
  x = _rand((6, 4), 3)
  _assert_close(FUNCS[metric](x), reference.METRICS[metric](x, x), scale=10.0)


def test_cosine_matches_sklearn_and_scipy():
  x, y = _rand((20, 16), 4), _rand((11, 16), 5)
  got = np.asarray(jaxsim.cosine(x, y))
  np.testing.assert_allclose(got, cosine_similarity(x, y), atol=1e-5)
  np.testing.assert_allclose(1.0 - got, ssd.cdist(x, y, "cosine"), atol=1e-5)


@pytest.mark.parametrize("metric,scipy_name", [("sq_euclidean", "sqeuclidean"),
                                               ("euclidean", "euclidean")])
def test_distances_match_scipy_cdist_and_sklearn(metric, scipy_name):
  # Offset far from the origin: the expansion |x|^2 + |y|^2 - 2xy would cancel
  # badly without centring.
  x, y = _rand((15, 8), 6) + 100.0, _rand((10, 8), 7) + 100.0
  want = ssd.cdist(x.astype(np.float64), y.astype(np.float64), scipy_name)
  np.testing.assert_allclose(FUNCS[metric](x, y), want, rtol=1e-4, atol=1e-3)
  sk = euclidean_distances(x, y, squared=metric == "sq_euclidean")
  np.testing.assert_allclose(FUNCS[metric](x, y), sk, rtol=1e-4, atol=1e-3)


def test_scaled_dot_default_and_explicit_scale():
  x, y = _rand((4, 16), 8), _rand((5, 16), 9)
  _assert_close(jaxsim.scaled_dot(x, y), reference.dot(x, y) / 4.0, scale=5.0)
  _assert_close(jaxsim.scaled_dot(x, y, scale=0.5), reference.dot(x, y) * 0.5, scale=5.0)
  # An array scale stays traced: it can be learned.
  _assert_close(jaxsim.scaled_dot(x, y, scale=jnp.float32(0.5)), reference.dot(x, y) * 0.5,
                scale=5.0)
  grad = jax.grad(lambda c: jnp.sum(jaxsim.scaled_dot(x, y, scale=c)))(1.0)
  np.testing.assert_allclose(grad, reference.dot(x, y).sum(), rtol=1e-4)


@pytest.mark.parametrize("metric", list(FUNCS))
def test_vectors_give_scalars_and_rows_give_vectors(metric):
  f = FUNCS[metric]
  x, y = _rand((5,), 10), _rand((3, 5), 11)
  assert f(x, x[::-1]).shape == ()
  assert f(x).shape == ()
  assert f(x, y).shape == (3,) and f(y, x).shape == (3,)
  _assert_close(f(x, y), reference.METRICS[metric](x[None], y)[0], scale=10.0)


@pytest.mark.parametrize("metric", list(FUNCS))
def test_pair_by_pair_vmap_equals_matrix(metric):
  x, y = _rand((6, 4), 12), _rand((5, 4), 13)
  f = FUNCS[metric]
  pairwise_by_vmap = jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None))(x, y)
  _assert_close(pairwise_by_vmap, np.asarray(f(x, y)), scale=10.0)


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param(np.zeros((3, 4)), id="zeros"),
        pytest.param(np.full((3, 4), 1e15), id="huge"),
        pytest.param(np.full((3, 4), 1e-15) * np.arange(1, 5), id="tiny"),
        pytest.param(np.full((3, 4), 1e-30) * np.arange(1, 5), id="tiniest"),
        pytest.param(np.tile([[1.0, -2.0, 3.0, 0.5]], (3, 1)), id="duplicates"),
    ],
)
def test_cosine_adversarial_rows(rows):
  x = np.concatenate([rows, _rand((4, 4), 14)]).astype(np.float32)
  got = np.asarray(jaxsim.cosine(x))
  assert np.all(np.isfinite(got))
  want = reference.cosine(x, x)
  np.fill_diagonal(want, (np.linalg.norm(x.astype(np.float64), axis=1) > 0).astype(float))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # sklearn treats norms below ~1e-15 as zero; elsewhere it must agree.
  if not np.any(rows) or np.abs(rows).max() > 1e-12:
    np.testing.assert_allclose(got, cosine_similarity(x.astype(np.float64)), atol=1e-5)


def test_cosine_of_zero_vector_is_zero_with_finite_gradient():
  x = jnp.asarray(np.concatenate([np.zeros((1, 3)), _rand((2, 3), 15)]), jnp.float32)
  s = jaxsim.cosine(x)
  np.testing.assert_array_equal(s[0], 0.0)
  np.testing.assert_array_equal(s[:, 0], 0.0)
  g = jax.grad(lambda a: jnp.sum(jaxsim.cosine(a, x[1:]) ** 2))(x)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_accumulates_in_float32_without_overflow(dtype):
  # 300^2 * 64 = 5.8e6 overflows float16 if squared in float16.
  big = jnp.full((3, 64), 300.0, dtype)
  s = jaxsim.cosine(big)
  assert s.dtype == dtype
  np.testing.assert_allclose(np.asarray(s, np.float32), 1.0, atol=TOL[dtype])
  x, y = _rand((8, 64), 16), _rand((5, 64), 17)
  for metric in ("dot", "cosine", "scaled_dot"):
    got = FUNCS[metric](jnp.asarray(x, dtype), jnp.asarray(y, dtype))
    assert got.dtype == dtype
    want = reference.METRICS[metric](np.asarray(jnp.asarray(x, dtype), np.float64),
                                     np.asarray(jnp.asarray(y, dtype), np.float64))
    _assert_close(got, want, dtype, scale=np.abs(want).max())


def test_precision_and_accumulation_type_reach_the_matmul():
  x = jnp.ones((4, 8), jnp.bfloat16)
  text = str(jax.make_jaxpr(
      functools.partial(jaxsim.cosine, precision=jax.lax.Precision.HIGHEST))(x, x))
  assert text.count("dot_general") == 1
  assert "preferred_element_type=float32" in text
  assert "Precision.HIGHEST" in text


@pytest.mark.parametrize("metric", list(FUNCS))
def test_dtypes_promote(metric):
  f = FUNCS[metric]
  assert f(np.arange(12).reshape(3, 4)).dtype == jnp.float32
  assert f(np.ones((3, 4), bool), np.ones((2, 4), np.float32)).dtype == jnp.float32
  assert f(jnp.ones((3, 4), jnp.float16), jnp.ones((2, 4), jnp.float32)).dtype == jnp.float32
  ints = np.arange(12).reshape(3, 4)
  _assert_close(f(ints), reference.METRICS[metric](ints, ints), scale=500.0)


@pytest.mark.parametrize("metric", list(FUNCS))
@pytest.mark.parametrize("x_shape,y_shape", [((0, 4), (3, 4)), ((3, 4), (0, 4)), ((3, 0), (2, 0))])
def test_empty_inputs(metric, x_shape, y_shape):
  out = FUNCS[metric](np.ones(x_shape, np.float32), np.ones(y_shape, np.float32))
  assert out.shape == (x_shape[0], y_shape[0])
  assert np.all(np.isfinite(out))
  if x_shape[1] == 0 and out.size:
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("metric", list(FUNCS))
@pytest.mark.parametrize(
    "x,y,error,match",
    [
        (np.ones((3, 4)), np.ones((3, 5)), ValueError, r"feature dim.*\(3, 4\).*\(3, 5\)"),
        (np.float32(1.0), None, ValueError, r"`x` must have rank.*shape \(\)"),
        (np.ones((3, 4)), np.float32(2.0), ValueError, r"`y` must have rank"),
        (np.ones((2, 3, 4)), np.ones((5, 3, 4)), ValueError, r"Batch dims.*\(2, 3, 4\)"),
        (np.ones((3, 4), np.complex64), None, TypeError, r"`x` must be real.*complex"),
        (np.ones((3, 4)), np.array([["a", "b"]]), TypeError, r"`y` must be a numeric"),
        ("abc", None, TypeError, r"`x` must be an array"),
        ([[1.0, 2.0], [3.0]], None, TypeError, r"`x` must be array-like"),
    ],
)
def test_bad_input_raises_naming_argument_and_shapes(metric, x, y, error, match):
  with pytest.raises(error, match=match):
    FUNCS[metric](x, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("metric", ["sq_euclidean", "euclidean"])
def test_a_non_finite_row_spoils_only_its_own_distances(metric, bad):
  x, y = _rand((6, 3), 30), _rand((9, 3), 31)
  y[4, 1] = bad
  got = np.asarray(FUNCS[metric](x, y))
  keep = np.arange(9) != 4
  want = ssd.cdist(x.astype(np.float64), y[keep].astype(np.float64),
                   "sqeuclidean" if metric == "sq_euclidean" else "euclidean")
  np.testing.assert_allclose(got[:, keep], want, rtol=1e-5, atol=1e-5)
  assert not np.any(np.isfinite(got[:, 4]))


def test_small_integer_rows_give_exact_distances():
  rng = np.random.default_rng(32)
  x, y = (rng.integers(-5, 6, s).astype(np.float32) + 100.0 for s in ((20, 7), (30, 7)))
  want = ssd.cdist(x.astype(np.float64), y.astype(np.float64), "sqeuclidean")
  np.testing.assert_array_equal(jaxsim.sq_euclidean(x, y), want)


def test_array_options_must_be_scalars():
  with pytest.raises(ValueError, match=r"`eps` must be a scalar, got shape \(2,\)"):
    jaxsim.cosine(np.ones((2, 2)), eps=jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match=r"`scale` must be a scalar"):
    jaxsim.scaled_dot(np.ones((2, 2)), scale=np.ones(3))


def test_python_lists_read_as_the_default_float():
  got = jaxsim.cosine([[1.0, 2.0]], jnp.ones((1, 2), jnp.bfloat16))
  assert got.dtype == jnp.float32  # as jnp.asarray(list) + bfloat16, and no float64 warning


def test_unknown_metric():
  with pytest.raises(ValueError, match="`metric` must be one of"):
    jaxsim.pairwise(np.ones((2, 2)), metric="manhattan")


# Properties over random inputs ------------------------------------------------

_finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
_matrices = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                       elements=_finite)


@settings(max_examples=15, deadline=None)
@given(x=_matrices)
@example(x=np.array([[1.0], [1.0662402e-38]], np.float32))  # a subnormal row, found by a run
def test_cosine_properties(x):
  s = np.asarray(jaxsim.cosine(x))
  assert np.all(np.abs(s) <= 1.0)
  np.testing.assert_allclose(s, s.T, atol=1e-6)
  # Not norm > 0: float32 norms of 1e-37 rows underflow. XLA flushes subnormals to
  # zero, so a row of only subnormal entries is a zero row.
  nonzero = np.any(np.abs(x) >= np.finfo(np.float32).tiny, axis=1)
  np.testing.assert_array_equal(np.diag(s), nonzero.astype(np.float32))
  # Scale invariance, for the rows that are not zero: 7.5 times a subnormal row is not.
  scaled = np.asarray(jaxsim.cosine(x * np.float32(7.5), x))
  np.testing.assert_allclose(scaled[nonzero], s[nonzero], atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(x=_matrices)
def test_distance_properties(x):
  sq, d = np.asarray(jaxsim.sq_euclidean(x)), np.asarray(jaxsim.euclidean(x))
  assert np.all(sq >= 0) and np.all(d >= 0)
  np.testing.assert_array_equal(np.diag(sq), 0.0)
  np.testing.assert_array_equal(np.diag(d), 0.0)
  np.testing.assert_allclose(sq, sq.T, rtol=1e-5, atol=1e-6 * max(1.0, sq.max()))
  want = ssd.cdist(x.astype(np.float64), x.astype(np.float64), "sqeuclidean")
  np.testing.assert_allclose(sq, want, rtol=1e-4, atol=1e-5 * max(1.0, want.max()))


# Transformations ------------------------------------------------------------


class VariantsTest(chex.TestCase):
  """The same call under jit, without jit and under pmap (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.parameters(*reference.METRICS)
  def test_variants(self, metric):
    x, y = _rand((5, 3), 18), _rand((4, 3), 19)
    got = self.variant(FUNCS[metric])(x, y)
    _assert_close(got, reference.METRICS[metric](x, y), scale=10.0)


@pytest.mark.parametrize("metric", list(FUNCS))
def test_gradients_match_finite_differences(metric):
  x, y = _rand((4, 3), 20), _rand((3, 3), 21)
  f = lambda a, b: jnp.sum(jnp.sin(FUNCS[metric](a, b)))
  jax.test_util.check_grads(f, (x, y), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_euclidean_gradient_is_finite_at_zero_distance():
  x = jnp.asarray(np.concatenate([_rand((1, 3), 22)] * 2 + [_rand((2, 3), 23)]))
  for fn in (lambda a: jaxsim.euclidean(a), lambda a: jaxsim.euclidean(a, a)):
    g = jax.grad(lambda a, fn=fn: jnp.sum(fn(a)))(x)
    assert np.all(np.isfinite(g))
  g = jax.grad(lambda a: jaxsim.euclidean(a, a[0]).sum())(x)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("metric", list(FUNCS))
def test_pmap_over_eight_devices(metric):
  assert jax.device_count() == 8
  x, y = _rand((8, 5, 3), 24), _rand((8, 4, 3), 25)
  got = jax.pmap(FUNCS[metric])(x, y)
  _assert_close(got, reference.METRICS[metric](x, y), scale=10.0)


# --- Numerics: non-finite rows, near-duplicates, options, guards (issue 9) -------------------
# Sizes of 512+ rows reach XLA:CPU's fused dot epilogues, where a NaN used to become 0.


@pytest.mark.parametrize("n", [9, 512, 2048])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("metric", ["sq_euclidean", "euclidean", "cosine"])
def test_a_non_finite_row_is_non_finite_at_every_size(metric, bad, n):
  x, y = _rand((64, 16), 40), _rand((n, 16), 41)
  y[-1, 0] = bad
  got = np.asarray(FUNCS[metric](x, y))
  assert not np.any(np.isfinite(got[:, -1]))
  want = reference.METRICS[metric](x, y[:-1])
  _assert_close(got[:, :-1], want, scale=np.abs(want).max())


@pytest.mark.parametrize("metric", ["sq_euclidean", "euclidean"])
def test_near_duplicates_get_their_direct_float32_distance(metric):
  query, corpus = reference.near_duplicates(50)
  want = reference.METRICS[metric](query, corpus)
  got = np.asarray(FUNCS[metric](query, corpus), np.float64)
  # Relative accuracy everywhere, the ten near rows (1e-4 .. 1e-3 away) included.
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(np.diff(got[0, -10:]) < 0)  # ordered as their true distances


def test_close_pairs_at_least_as_accurate_as_sklearn():
  # scikit-learn upcasts float32 to float64 in chunks for the expansion; the direct
  # differences here must be as close to the float64 truth for every pair.
  query, corpus = reference.near_duplicates(51, d=64)
  x = np.concatenate([query, corpus[-20:]])
  want = reference.euclidean(x, corpus)
  got = np.asarray(jaxsim.euclidean(x, corpus), np.float64)
  sk = euclidean_distances(x, corpus).astype(np.float64)
  assert np.all(np.abs(got - want) <= np.abs(sk - want) + 1e-6 * want)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e10])
def test_equal_rows_are_at_distance_exactly_zero(scale):
  x = _rand((512, 32), 52) * np.float32(scale) + np.float32(3 * scale)
  x[7] = x[3]
  for metric in ("sq_euclidean", "euclidean"):
    got = np.asarray(FUNCS[metric](x, x))  # x passed twice: no diagonal shortcut
    np.testing.assert_array_equal(np.diagonal(got), 0.0)
    assert got[3, 7] == 0.0 and got[7, 3] == 0.0
    want = reference.METRICS[metric](x, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_distinct_rows_6e_5_apart_are_not_at_zero():
  x = _rand((512, 64), 53)
  x[1] = x[0]
  x[1, 5] += np.float32(6e-5)
  got = np.asarray(jaxsim.euclidean(x), np.float64)
  want = np.linalg.norm(x[0].astype(np.float64) - x[1].astype(np.float64))
  np.testing.assert_allclose(got[0, 1], want, rtol=1e-6)


def test_euclidean_gradient_matches_finite_differences_near_duplicates():
  query, corpus = reference.near_duplicates(54, d=16, n=520, scale=1.0)
  w = _rand((1, 520), 55)
  f = lambda a: jnp.sum(jaxsim.sq_euclidean(a, corpus) * w)
  g = np.asarray(jax.grad(f)(jnp.asarray(query)))
  want = 2 * np.sum(w[0][:, None] * (query.astype(np.float64) - corpus), axis=0)
  np.testing.assert_allclose(g[0], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_cosine_gradient_is_finite_and_scale_free_for_tiny_rows():
  x, y, w = _rand((512, 8), 56), _rand((16, 8), 57), _rand((512, 16), 58)
  grad = jax.grad(lambda a: jnp.sum(jaxsim.cosine(a, y) * w))
  g1 = np.asarray(grad(jnp.asarray(x)), np.float64)
  for scale in (1e-20, 1e-30):
    g = np.asarray(grad(jnp.asarray(x * np.float32(scale))), np.float64)
    assert np.all(np.isfinite(g))
    # cos(a x, y) = cos(x, y): the gradient scales as 1/a.
    np.testing.assert_allclose(g * scale, g1, rtol=1e-4, atol=1e-5 * np.abs(g1).max())


def test_cosine_eps_clamps_the_squared_norm_like_optax():
  x = _rand((512, 8), 59) * np.logspace(-4, 1, 512, dtype=np.float32)[:, None]
  y = _rand((512, 8), 60)
  for eps in (0.0, 1e-4, 1e-2):
    got = jaxsim.cosine(x, y, eps=eps)
    _assert_close(got, reference.cosine_clamped(x, y, eps))
    want = optax.losses.cosine_similarity(x, y, epsilon=eps)
    np.testing.assert_allclose(np.diagonal(got), want, rtol=1e-5, atol=1e-6)
  # A row of norm 1e-3 against its own direction with eps=1e-4: 1e-3 / sqrt(1e-4).
  row = np.array([[1e-3, 0.0]], np.float32)
  np.testing.assert_allclose(jaxsim.cosine(row, np.array([[1.0, 0.0]]), eps=1e-4), [[0.1]],
                             rtol=1e-6)


def test_new_option_values_reuse_the_compiled_program():
  x = _rand((512, 8), 61)
  jaxsim.cosine(x, eps=0.1)
  jaxsim.scaled_dot(x, scale=0.5)
  jaxsim.scaled_dot(x)
  before = kernels._pairwise_jit._cache_size()
  for v in (0.2, 0.3, 1):
    jaxsim.cosine(x, eps=v)
    jaxsim.scaled_dot(x, scale=v)
  assert kernels._pairwise_jit._cache_size() == before


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(eps=np.nan), ValueError, r"`eps` must not be NaN"),
    (dict(eps=-1.0), ValueError, r"`eps` must be >= 0"),
    (dict(eps="0.1"), TypeError, r"`eps` must be a real number"),
    (dict(eps=True), TypeError, r"`eps` must be a real number"),
])
def test_nonsense_options_raise(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxsim.cosine(np.ones((3, 2)), **kwargs)


def test_nan_scale_raises():
  with pytest.raises(ValueError, match=r"`scale` must not be NaN"):
    jaxsim.scaled_dot(np.ones((3, 2)), scale=float("nan"))


def test_float64_inputs_raise_no_warning():
  x64 = _rand((512, 8), 62, np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for metric, f in FUNCS.items():
      assert f(x64).dtype == jnp.float32
      assert f(x64, x64.astype(np.float32)).dtype == jnp.float32, metric


def test_torch_tensors_that_require_grad_or_are_bfloat16():
  torch = pytest.importorskip("torch")
  x = _rand((512, 8), 63)
  t = torch.tensor(x, requires_grad=True)
  np.testing.assert_array_equal(jaxsim.cosine(t), jaxsim.cosine(x))
  got = jaxsim.cosine(t.detach().to(torch.bfloat16))
  assert got.dtype == jnp.bfloat16
  _assert_close(got, reference.cosine(x, x), jnp.bfloat16)


def test_a_dense_matrix_larger_than_memory_raises_pointing_to_streaming():
  # A broadcast view: 2**22 rows cost no memory here, their 2**44 scores would.
  x = np.broadcast_to(np.ones(8, np.float32), (2**22, 8))
  with pytest.raises(ValueError, match=r"jaxsim\.topk.*jaxsim\.pairs_above.*similarity_stats"):
    jaxsim.cosine(x)
  with pytest.raises(ValueError, match=r"the \(65536, 4194304\) score matrix needs .* GiB"):
    jaxsim.euclidean(x[:65536], x)


# --- Dense forms at fused sizes: the one-pass normalisation and the mirrored triangle ------
# `cosine(x)` of 2048+ rows of 512+ features is built from mirrored 256-row tiles; a set
# with a row outside `kernels.FAST_SQ_NORM` (or a non-finite one) takes the max-abs
# pre-scale.


def _rows_with(kind, n, d, seed):
  x = _rand((n, d), seed)
  if kind == "outliers":
    x[3] = 0.0
    x[10] *= np.float32(1e-30)
    x[11] *= np.float32(1e30)
    x[12, :] = np.float32(1e-30) * np.arange(1, d + 1, dtype=np.float32) / d
    x[-1, 0] = np.nan  # in the shifted last tile
  return x


def _cosine64(x, y):
  """Cosines in float64 after the same max-abs pre-scale (no overflow in the reference)."""
  def unit(a):
    a = a.astype(np.float64)
    a = a / np.maximum(np.abs(a).max(axis=1, keepdims=True), 1e-300)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return np.where(n > 0, a / np.where(n > 0, n, 1.0), 0.0)
  return unit(x) @ unit(y).T


@pytest.mark.parametrize("kind", ["plain", "outliers"])
@pytest.mark.parametrize("n", [2048, 2300])
def test_dense_self_cosine_at_fused_sizes(kind, n):
  x = _rows_with(kind, n, kernels.SYMMETRIC_MIN_DIM, 70)
  got = np.asarray(jaxsim.cosine(x), np.float64)
  bad = ~np.all(np.isfinite(x), axis=1)
  want = _cosine64(np.where(bad[:, None], 0.0, x), np.where(bad[:, None], 0.0, x))
  np.fill_diagonal(want, np.any(x != 0, axis=1))
  ok = ~bad
  assert np.all(np.isnan(got[bad])) and np.all(np.isnan(got[:, bad]))
  np.testing.assert_allclose(got[np.ix_(ok, ok)], want[np.ix_(ok, ok)], atol=1e-6, rtol=0)
  assert np.all(np.abs(got[np.ix_(ok, ok)]) <= 1.0)
  diag = np.diagonal(got)[ok]
  np.testing.assert_array_equal(diag, np.any(x[ok] != 0, axis=1).astype(np.float64))
  # The mirrored triangle agrees with the one-matmul cross form off the diagonal.
  cross = np.asarray(jaxsim.cosine(x, x), np.float64)
  off = ~np.eye(n, dtype=bool) & ok[:, None] & ok[None, :]
  np.testing.assert_allclose(got[off], cross[off], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["plain", "outliers"])
def test_dense_cross_cosine_at_fused_sizes(kind):
  x, y = _rows_with(kind, 1024, 24, 71), _rows_with(kind, 700, 24, 72)
  got = np.asarray(jaxsim.cosine(x, y), np.float64)
  bx, by = ~np.all(np.isfinite(x), axis=1), ~np.all(np.isfinite(y), axis=1)
  want = _cosine64(x[~bx], y[~by])
  np.testing.assert_allclose(got[np.ix_(~bx, ~by)], want, atol=1e-6, rtol=0)
  assert np.all(np.abs(got[np.ix_(~bx, ~by)]) <= 1.0)
  assert np.all(np.isnan(got[bx])) and np.all(np.isnan(got[:, by]))


def test_one_pass_and_prescaled_normalisations_agree():
  x = _rand((600, 48), 73) * np.logspace(-5, 5, 600, dtype=np.float32)[:, None]
  fast, fast_sq = kernels.unit_rows(jnp.asarray(x), 1e-3)
  slow, slow_sq = kernels._unit_rows_prescaled(jnp.asarray(x), jnp.float32(1e-3), None)
  np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(fast_sq, slow_sq, rtol=1e-5)
  # One row past FAST_SQ_NORM switches the whole set to the pre-scale: that row, whose
  # squares overflow float32, still comes out a unit row (one pass would zero it).
  x[0] *= np.float32(1e25)
  both, _ = kernels.unit_rows(jnp.asarray(x), 1e-3)
  np.testing.assert_allclose(
      both, kernels._unit_rows_prescaled(jnp.asarray(x), jnp.float32(1e-3), None)[0],
      rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(both[0], np.float64)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_dense_self_cosine_low_precision_at_fused_size(dtype):
  x = jnp.asarray(_rand((2048, 512), 74) * np.float32(300.0), dtype)  # squares overflow fp16
  got = jaxsim.cosine(x)
  assert got.dtype == dtype
  got = np.asarray(got, np.float64)
  x64 = np.asarray(x, np.float64)
  want = _cosine64(x64, x64)
  np.fill_diagonal(want, 1.0)
  _assert_close(got, want, dtype)
  assert np.all(np.abs(got) <= 1.0)
  np.testing.assert_array_equal(np.diagonal(got), 1.0)


def test_dense_self_cosine_gradients_at_fused_size():
  x = _rand((2048, 512), 75)
  x[5] *= np.float32(1e-30)  # the pre-scaled path, tiny row included
  w = _rand((2048, 2048), 76)
  g_self = jax.grad(lambda a: jnp.sum(jaxsim.cosine(a) * w))(jnp.asarray(x))
  g_cross = jax.grad(lambda a: jnp.sum(jaxsim.cosine(a, jax.lax.stop_gradient(a)) * w)
                     + jnp.sum(jaxsim.cosine(jax.lax.stop_gradient(a), a) * w))(jnp.asarray(x))
  g_self, g_cross = np.asarray(g_self, np.float64), np.asarray(g_cross, np.float64)
  assert np.all(np.isfinite(g_self))
  scale = np.abs(g_cross[np.arange(2048) != 5]).max()
  np.testing.assert_allclose(g_self, g_cross, rtol=1e-3, atol=1e-3 * scale)


# 4300 rows: the last 256-row tile is shifted back over the previous one.
@pytest.mark.parametrize("metric,n", [("dot", 4300), ("scaled_dot", 4096)])
def test_dense_self_dot_is_mirrored_exactly_at_fused_sizes(metric, n):
  x = jnp.asarray(_rand((n, kernels.SYMMETRIC_MIN_DIM), 77))
  got = FUNCS[metric](x)
  assert got.dtype == jnp.float32 and kernels._use_symmetric(x, metric)
  got = np.asarray(got, np.float64)
  np.testing.assert_array_equal(got, got.T)
  x64 = np.asarray(x, np.float64)
  want = x64 @ x64.T * (1.0 if metric == "dot" else kernels.default_scale(x.shape[1]))
  # Relative to the largest score (the diagonal). bfloat16 through the same tiles is
  # covered by `test_dense_self_cosine_low_precision_at_fused_size` (12 s here at 4096).
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_dense_self_dot_gradients_are_the_one_matmul_forms():
  n = kernels.SYMMETRIC_MIN_ROWS["scaled_dot"]
  x, w = _rand((n, 512), 78), _rand((n, n), 79)
  g = jax.grad(lambda a: jnp.sum(jaxsim.scaled_dot(a, scale=0.5) * w))(jnp.asarray(x))
  want = 0.5 * (w + w.T).astype(np.float64) @ x.astype(np.float64)
  np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
