"""Attention: against jax.nn and a numpy reference, blocked == dense, masks, dtypes, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsim
from tests import reference

KINDS = ("dot", "scaled_dot", "cosine")
TOL = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 2e-2}
LARGE_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _qkv(seed, *, b=2, t=5, s=7, n=4, k=2, h=8, hv=None, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, n, h), dtype)
  key = jax.random.normal(kk, (b, s, k, h), dtype)
  v = jax.random.normal(kv, (b, s, k, hv or h), dtype)
  return q, key, v


def _extras(config, seed, *, b, n, t, s):
  """Keyword arguments for one masking configuration; masks remove some whole rows."""
  rng = np.random.default_rng(seed)
  out = {}
  if "mask" in config:
    mask = rng.random((b, n if "heads" in config else 1, t, s)) < 0.6
    mask[0, 0, 1] = False  # a query that sees nothing
    out["mask"] = mask
  if "causal" in config:
    out["is_causal"] = True
  if "bias" in config:
    out["bias"] = rng.normal(size=(b, n, t, s)).astype(np.float32)
  return out


def _visible_rows(kwargs, b, n, t, s):
  """`(B, T, N)` True where a query row keeps at least one key."""
  keep = reference.attention_keep((b, n, t, s), kwargs.get("mask"),
                                  kwargs.get("is_causal", False))
  return np.moveaxis(keep.any(-1), 1, 2)


_nn_attention = jax.jit(jax.nn.dot_product_attention, static_argnames="is_causal")


# (N, K): multi-head, grouped-query, multi-query; each masking option once, all together twice.
@pytest.mark.parametrize("config, heads", [
    ("plain", (2, 2)),
    ("mask", (4, 2)),
    ("causal", (4, 2)),
    ("bias", (3, 1)),
    ("mask_heads_causal_bias", (4, 2)),
    ("mask_heads_causal_bias", (3, 1)),
], ids=lambda v: f"N{v[0]}K{v[1]}" if isinstance(v, tuple) else v)
def test_scaled_dot_matches_jax_nn(config, heads):
  n, k = heads
  b, t, s = 2, 5, 7
  q, key, v = _qkv(0, b=b, t=t, s=s, n=n, k=k)
  kwargs = _extras(config, 1, b=b, n=n, t=t, s=s)
  want = _nn_attention(q, key, v, **kwargs)
  # jax.nn averages all values on rows with nothing visible; jaxsim gives zeros there.
  rows = _visible_rows(kwargs, b, n, t, s)
  for block_size in (None, 3):
    got = jaxsim.attention(q, key, v, block_size=block_size, **kwargs)
    assert got.shape == want.shape == (b, t, n, 8) and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows],
                               atol=TOL[jnp.float32])
    np.testing.assert_array_equal(np.asarray(got)[~rows], 0.0)


def test_scaled_dot_gradient_matches_jax_nn():
  b, t, s, n = 2, 6, 6, 4
  q, key, v = _qkv(2, b=b, t=t, s=s, n=n, k=2)
  bias = jnp.asarray(np.random.default_rng(3).normal(size=(1, n, t, s)), jnp.float32)
  ct = jax.random.normal(jax.random.key(4), q.shape)

  def loss(fn, *args):
    return jnp.sum(fn(*args) * ct)

  theirs = functools.partial(jax.nn.dot_product_attention, is_causal=True)
  want = jax.jit(jax.grad(lambda *a: loss(lambda q, k, v, bb: theirs(q, k, v, bias=bb), *a),
                          argnums=(0, 1, 2, 3)))(q, key, v, bias)
  for block_size in (None, 4):
    ours = functools.partial(jaxsim.attention, is_causal=True, block_size=block_size)
    got = jax.grad(lambda *a, f=ours: loss(lambda q, k, v, bb: f(q, k, v, bias=bb), *a),
                   argnums=(0, 1, 2, 3))(q, key, v, bias)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("config", ["plain", "mask_heads_causal_bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_numpy_reference(kind, config):
  b, t, s, n, k = 2, 5, 9, 4, 2
  q, key, v = _qkv(5, b=b, t=t, s=s, n=n, k=k, hv=3)
  # A zero key row: cosine's zero-row convention (cosine 0 with everything) must hold.
  key = key.at[0, 2, 1].set(0.0)
  kwargs = _extras(config, 6, b=b, n=n, t=t, s=s)
  scale = {"dot": None, "scaled_dot": 0.4, "cosine": None}[kind]
  ref_kw = dict(kind=kind, scale=scale, mask=kwargs.get("mask"),
                is_causal=kwargs.get("is_causal", False), bias=kwargs.get("bias"))

  want = reference.attention(q, key, v, **ref_kw)
  for block_size in (None, 4):
    out = jaxsim.attention(q, key, v, kind=kind, scale=scale, block_size=block_size, **kwargs)
    np.testing.assert_allclose(out, want, atol=2e-5)
  weights = jaxsim.attention_weights(q, key, kind=kind, scale=scale, **kwargs)
  np.testing.assert_allclose(weights, reference.attention_weights(q, key, **ref_kw), atol=2e-6)
  scores = jaxsim.attention_scores(q, key, kind=kind, scale=scale, **kwargs)
  keep = reference.attention_keep((b, n, t, s), kwargs.get("mask"), ref_kw["is_causal"])
  want = reference.attention_logits(q, key, kind=kind, scale=scale, bias=kwargs.get("bias"))
  assert scores.shape == (b, n, t, s) and scores.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(scores)[keep], want[keep], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(scores)[~keep], np.float32(LARGE_NEGATIVE))


# T=6, S=10: 4 divides neither (padded query block, shifted key block), 5 only S,
# 16 exceeds both (one block each way); query blocks of 2 under key blocks of 5.
@pytest.mark.parametrize("kind, block_size, query_block_size", [
    ("dot", 4, None), ("scaled_dot", 4, None), ("cosine", 4, None), ("scaled_dot", 5, 2),
    ("cosine", 16, None),
])
def test_blocked_equals_dense_in_value_and_gradient(kind, block_size, query_block_size):
  b, t, s, n = 2, 6, 10, 4
  q, key, v = _qkv(7, b=b, t=t, s=s, n=n, k=2, hv=5)
  kwargs = _extras("mask_heads_causal", 8, b=b, n=n, t=t, s=s)
  bias = jnp.asarray(np.random.default_rng(9).normal(size=(b, 1, t, s)), jnp.float32)
  scale = None if kind == "dot" else jnp.float32(1.3)
  ct = jax.random.normal(jax.random.key(10), (b, t, n, 5))

  def loss(q, key, v, bias, scale, block_size):
    out = jaxsim.attention(q, key, v, kind=kind, scale=scale, bias=bias, block_size=block_size,
                           query_block_size=query_block_size if block_size else None,
                           **kwargs)
    return jnp.sum(out * ct), out

  argnums = (0, 1, 2, 3) if kind == "dot" else (0, 1, 2, 3, 4)
  grad = jax.grad(loss, argnums=argnums, has_aux=True)
  (g_dense, dense), (g_blocked, blocked) = (grad(q, key, v, bias, scale, bs)
                                            for bs in (None, block_size))
  np.testing.assert_allclose(blocked, dense, atol=2e-6)
  for gb, gd in zip(g_blocked, g_dense, strict=True):
    assert np.all(np.isfinite(gb))
    np.testing.assert_allclose(gb, gd, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["scaled_dot", "cosine"])
def test_rows_with_nothing_visible_give_zeros_and_zero_gradients(kind):
  b, t, s, n = 1, 4, 5, 2
  q, key, v = _qkv(11, b=b, t=t, s=s, n=n, k=1)
  mask = np.ones((b, n, t, s), bool)
  mask[0, 1, 2] = False  # one (head, query) sees nothing
  mask[..., 0] = False  # with causal, query 0 sees nothing in every head
  kw = dict(kind=kind, mask=mask, is_causal=True)

  empty = np.zeros((b, t, n), bool)
  empty[0, 0, :] = empty[0, 2, 1] = True
  for block_size in (None, 2):
    loss = lambda q, key, v, bs=block_size: jnp.sum(
        jaxsim.attention(q, key, v, block_size=bs, **kw) ** 2)
    out = jaxsim.attention(q, key, v, block_size=block_size, **kw)
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
    assert np.all(np.abs(np.asarray(out)[~empty]) > 0)
    gq, gk, gv = jax.grad(loss, argnums=(0, 1, 2))(q, key, v)
    for g in (gq, gk, gv):
      assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(gq)[empty], 0.0)
    assert np.any(np.asarray(gq)[~empty] != 0)
  np.testing.assert_array_equal(jaxsim.attention_weights(q, key, **kw)[0, 1, 2], 0.0)


def test_fully_masked_everything_is_zero_not_nan():
  q, key, v = _qkv(12, b=1, t=3, s=4, n=2, k=2)
  mask = np.zeros((1, 1, 3, 4), bool)
  for block_size in (None, 3):
    out, grads = jax.value_and_grad(
        lambda q, k, v, bs=block_size: jnp.sum(jaxsim.attention(q, k, v, mask=mask,
                                                                block_size=bs)),
        argnums=(0, 1, 2))(q, key, v)
    assert out == 0.0
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)


def test_minus_inf_bias_masks_like_a_mask_in_both_forms():
  q, key, v = _qkv(13, b=1, t=3, s=4, n=1, k=1)
  mask = np.ones((1, 1, 3, 4), bool)
  mask[0, 0, 1] = False
  mask[0, 0, 2, :2] = False
  bias = np.where(mask, 0.0, -np.inf).astype(np.float32)
  want = jaxsim.attention(q, key, v, mask=mask)
  for block_size in (None, 2):
    np.testing.assert_allclose(jaxsim.attention(q, key, v, bias=bias, block_size=block_size),
                               want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(jaxsim.attention_weights(q, key, bias=bias)[0, 0, 1], 0.0)


def test_no_keys_gives_zeros_in_both_forms():
  q, key, v = _qkv(14, b=1, t=3, s=4, n=2, k=1)
  for block_size in (None, 2):
    out = jaxsim.attention(q, key[:, :0], v[:, :0], block_size=block_size)
    assert out.shape == q.shape
    np.testing.assert_array_equal(out, 0.0)


def test_jit_vmap_and_unbatched_form():
  block_size = 3
  q, key, v = _qkv(13, b=3, t=5, s=7, n=4, k=2)
  mask = np.random.default_rng(14).random((5, 7)) < 0.7  # (T, S): broadcasts over B and N
  fn = functools.partial(jaxsim.attention, kind="cosine", block_size=block_size, is_causal=True)
  batched = fn(q, key, v, mask=mask)
  unbatched = jnp.stack([fn(q[i], key[i], v[i], mask=mask) for i in range(3)])
  mapped = jax.vmap(lambda a, b, c: fn(a, b, c, mask=mask))(q, key, v)
  jitted = jax.jit(lambda a, b, c, m: fn(a, b, c, mask=m))(q, key, v, mask)
  assert unbatched.shape == (3, 5, 4, 8)
  for got in (unbatched, mapped, jitted):
    np.testing.assert_allclose(got, batched, atol=1e-6)
  scores = jax.vmap(lambda a, b: jaxsim.attention_scores(a, b, kind="dot"))(q, key)
  np.testing.assert_allclose(scores, jaxsim.attention_scores(q, key, kind="dot"), atol=1e-6)


@pytest.mark.parametrize("kind, dtype", [
    ("dot", jnp.float16), ("cosine", jnp.float16), ("scaled_dot", jnp.bfloat16),
    ("cosine", jnp.bfloat16),
])
def test_low_precision_accumulates_in_float32(kind, dtype):
  b, t, s, n = 2, 6, 9, 2
  q, key, v = _qkv(15, b=b, t=t, s=s, n=n, k=1, dtype=dtype)
  # "dot" logits of these rows reach ~15, and exp(15) overflows float16 (max 65504):
  # a float16 softmax would give inf/NaN, the float32 accumulation must not.
  q = q * jnp.asarray(2.0, dtype)
  want = reference.attention(q.astype(jnp.float32), key.astype(jnp.float32),
                             v.astype(jnp.float32), kind=kind, is_causal=True)
  for block_size in (None, 4):
    out = jaxsim.attention(q, key, v, kind=kind, is_causal=True, block_size=block_size)
    assert out.dtype == dtype
    # The inputs are already rounded to `dtype`; errors come from rounding the scaled
    # or normalised rows and the weights, so allow a few ulps of the output.
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=4 * TOL[dtype],
                               rtol=4 * TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_scores_are_float32_weights_keep_the_dtype(dtype):
  q, key, _ = _qkv(18, b=1, t=3, s=4, n=2, k=2, dtype=dtype)
  scores = jaxsim.attention_scores(q, key, is_causal=True)
  assert scores.dtype == jnp.float32
  np.testing.assert_array_equal(scores[0, :, 0, 1:], np.float32(LARGE_NEGATIVE))
  weights = jaxsim.attention_weights(q, key, is_causal=True)
  assert weights.dtype == dtype
  np.testing.assert_allclose(np.asarray(weights, np.float32).sum(-1), 1.0, rtol=TOL[dtype])


def test_cosine_weights_ignore_magnitudes_dot_weights_do_not():
  q, key, _ = _qkv(16, b=1, t=3, s=6, n=1, k=1)
  factors = jnp.array([0.1, 1.0, 3.0, 0.5, 10.0, 2.0])[None, :, None, None]
  for kind, invariant in (("cosine", True), ("dot", False), ("scaled_dot", False)):
    w = jaxsim.attention_weights(q, key, kind=kind)
    w_scaled = jaxsim.attention_weights(q * 7.0, key * factors, kind=kind)
    assert np.allclose(w, w_scaled, atol=1e-6) == invariant, kind


def test_cosine_scale_is_the_inverse_temperature():
  q, key, _ = _qkv(17, b=1, t=4, s=5, n=2, k=2, h=16)
  cos = jaxsim.attention_scores(q, key, kind="cosine", scale=1.0)
  assert np.all(np.abs(cos) <= 1.0)
  np.testing.assert_allclose(jaxsim.attention_scores(q, key, kind="cosine"), 4.0 * cos,
                             rtol=1e-6)
  np.testing.assert_allclose(jaxsim.attention_scores(q, key, kind="cosine", scale=12.5),
                             12.5 * cos, rtol=1e-6)


def _memory(fn, *args):
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  if stats is None:
    pytest.skip("backend does not report memory_analysis")
  return stats.temp_size_in_bytes


def test_blocked_temporaries_far_below_the_score_matrix():
  b, t, n, h, block = 1, 2048, 2, 32, 128
  spec = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  scores_bytes = b * n * t * t * 4  # 32 MiB

  def fwd(block_size):
    return lambda q, k, v: jaxsim.attention(q, k, v, is_causal=True, block_size=block_size)

  def bwd(block_size):
    return jax.grad(lambda q, k, v: jnp.sum(fwd(block_size)(q, k, v)), argnums=(0, 1, 2))

  dense, blocked = _memory(fwd(None), spec, spec, spec), _memory(fwd(block), spec, spec, spec)
  dense_grad = _memory(bwd(None), spec, spec, spec)
  blocked_grad = _memory(bwd(block), spec, spec, spec)
  # The dense form materialises the scores (the measurement can see them) ...
  assert dense >= scores_bytes and dense_grad >= scores_bytes
  # ... the blocked one holds (block x block) logits per head, and its gradient keeps
  # one query block's running sums per key block, (S / block) x block x H. What is
  # left is O((T + S) H): about 3 MiB forward and 5 MiB for the gradient here, and
  # twice that, not four times, at T = S = 4096.
  assert blocked < scores_bytes / 8, blocked
  assert blocked_grad < scores_bytes / 4, blocked_grad


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.ones((5, 8)), np.ones((7, 8)), np.ones((7, 8))), {}, ValueError, "query"),
        ((np.ones((1, 5, 2, 8)), np.ones((7, 2, 8)), np.ones((7, 2, 8))), {}, ValueError, "rank"),
        ((np.ones((5, 3, 8)), np.ones((7, 2, 8)), np.ones((7, 2, 8))), {}, ValueError,
         "multiple"),
        ((np.ones((5, 2, 8)), np.ones((7, 2, 4)), np.ones((7, 2, 4))), {}, ValueError, "head dim"),
        ((np.ones((5, 2, 8)), np.ones((7, 2, 8)), np.ones((6, 2, 8))), {}, ValueError, "value"),
        ((np.ones((2, 5, 2, 8)), np.ones((3, 7, 2, 8)), np.ones((3, 7, 2, 8))), {}, ValueError,
         "batch"),
        ((np.ones((5, 2, 8)),) + (np.ones((7, 2, 8)),) * 2, {"mask": np.ones((5, 6), bool)},
         ValueError, r"mask.*\(5, 6\).*broadcast"),
        ((np.ones((5, 2, 8)),) + (np.ones((7, 2, 8)),) * 2, {"mask": np.ones((5, 7))},
         TypeError, "boolean"),
        ((np.ones((5, 2, 8)),) + (np.ones((7, 2, 8)),) * 2, {"bias": np.ones((3, 5, 7))},
         ValueError, "bias"),
        ((np.ones((5, 2, 8)),) + (np.ones((7, 2, 8)),) * 2, {"kind": "euclidean"}, ValueError,
         "kind"),
        ((np.ones((5, 2, 8)),) + (np.ones((7, 2, 8)),) * 2, {"kind": "dot", "scale": 2.0},
         ValueError, "scale"),
        ((np.ones((5, 2, 8)),) + (np.ones((7, 2, 8)),) * 2, {"block_size": 0}, ValueError,
         "block_size"),
        ((np.ones((5, 2, 8)),) + (np.ones((7, 2, 8)),) * 2, {"query_block_size": 2},
         ValueError, "query_block_size"),
        ((np.ones((5, 2, 8)) * 1j,) + (np.ones((7, 2, 8)),) * 2, {}, TypeError, "complex"),
    ],
)
def test_bad_input_raises_naming_the_argument(args, kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxsim.attention(*args, **kwargs)

