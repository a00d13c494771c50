"""Attention: jax.nn's own attention cases (tests/nn_test.py), blocked == dense, every metric
against numpy, skipped blocks, low-precision gradients, the jax.nn pass-through."""

import functools
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsim
from jaxsim._src import attention as attention_module
from jaxsim._src import kernels
from tests import reference

METRICS = ("dot", "scaled_dot", "cosine")
TOL = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 2e-2}
LARGE_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)
F32 = functools.partial(np.asarray, dtype=np.float32)


def _f32(x):
  return None if x is None else F32(jnp.asarray(x).astype(jnp.float32))


def _qkv(seed, *, b=2, t=5, s=7, n=4, k=2, h=8, hv=None, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, n, h), dtype)
  key = jax.random.normal(kk, (b, s, k, h), dtype)
  v = jax.random.normal(kv, (b, s, k, hv or h), dtype)
  return q, key, v


def _positional_keep(b, t, s, *, is_causal=False, window=None, q_len=None, kv_len=None):
  """`(B, 1, T, S)` numpy: where the positional options leave a logit visible."""
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  keep = np.ones((b, 1, t, s), bool)
  if is_causal:
    keep &= j <= i
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    keep &= (j >= i - left) & (j <= i + right)
  if q_len is not None:
    keep &= np.arange(t)[None, None, :, None] < np.asarray(q_len)[:, None, None, None]
  if kv_len is not None:
    keep &= np.arange(s)[None, None, None, :] < np.asarray(kv_len)[:, None, None, None]
  return keep


def _reference_kwargs(b, n, t, s, kwargs):
  """jaxsim keyword arguments -> `tests.reference.attention` ones (one combined mask)."""
  keep = _positional_keep(
      b, t, s, is_causal=kwargs.get("is_causal", False),
      window=kwargs.get("local_window_size"), q_len=kwargs.get("query_seq_lengths"),
      kv_len=kwargs.get("key_value_seq_lengths"))
  if kwargs.get("mask") is not None:
    keep = keep & np.asarray(kwargs["mask"])
  return dict(kind=kwargs.get("metric", "scaled_dot"), scale=kwargs.get("scale"),
              mask=np.broadcast_to(keep, (b, n, t, s)), bias=_f32(kwargs.get("bias")))


def _grads(fn, args, ct, argnums):
  """Gradients of `sum(fn(*args) * ct)` in float32."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=argnums))(*args)


# jax.nn, the reference, widens bf16 logits to float32 implicitly, forward and in its
# einsums' transposes, which the suite's strict dtype promotion would refuse: its calls
# are traced under standard promotion (jaxsim's own forms run under strict).
standard_promotion = functools.partial(jax.numpy_dtype_promotion, "standard")
jax_nn_attention = jax.nn.dot_product_attention


# jax.nn's fp16 attention asks for the F16_F16_F32 dot algorithm, which XLA:CPU cannot run
# under jit; its fp16 reference is then jax.nn in float32 on the same (fp16-rounded) inputs.
def _jax_nn_dtype(dtype):
  if dtype == jnp.float16 and jax.default_backend() == "cpu":
    return jnp.float32
  return dtype


def _forms(t, s):
  """The dense form, and a blocked one whose key blocks do not divide S (the last block is
  shifted back) under smaller query blocks that do not divide T (padded)."""
  return {"dense": {}, "blocked": {"block_size": s // 3 + 1, "query_block_size": t // 4 + 1}}


FORMS = _forms(128, 128)


def _run(fn, args, ct, argnums):
  """`fn(*args)` -> (output, residual), and gradients of `sum(output * ct)`, in one
  compiled call."""
  def loss(*a):
    out, lse = fn(*a)
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), (out, lse)

  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums,
                                                      has_aux=True))(*args)
  return out, lse, grads


# --------------------------------------------------------------------------------------
# jax's tests/nn_test.py, ported: its shapes (B=2, T=S=128, N=4, H=32), mask modes, bias,
# grouped-query and vmap cases and tolerances, for jaxsim's dense and blocked forms.

NN_MASK_MODES = ["bias", "causal", "padding", "custom", ("causal", "padding"),
                 ("custom", "padding"), ("bias", "causal"), ("causal", "sliding_window"),
                 "sliding_window"]


def _nn_mask_case(mode, dtype):
  """testDotProductAttentionMask's inputs for `mode`; returns args, kwargs, cotangent."""
  mode = (mode,) if isinstance(mode, str) else mode
  b, s, t, n, h = 2, 128, 128, 4, 32
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype)
  k = jax.random.normal(keys[1], (b, s, n, h), dtype)
  v = jax.random.normal(keys[2], (b, s, n, h), dtype)
  ct = jax.random.normal(keys[3], (b, t, n, h), dtype)
  bias = mask = None
  kwargs = {"is_causal": "causal" in mode}
  if "padding" in mode:
    kwargs["query_seq_lengths"] = jnp.array([t // 2, t // 4], jnp.int32)
    kwargs["key_value_seq_lengths"] = jnp.array([s // 4, s // 2], jnp.int32)
  if "custom" in mode:
    mask = jnp.tril(jnp.ones((t, s), jnp.bool_))[None, None]
  if "bias" in mode:
    bias = jax.random.normal(keys[4], (1, n, t, s), dtype)
  if "sliding_window" in mode:
    kwargs["local_window_size"] = (3, 2) if kwargs["is_causal"] else (3, 0)
  return (q, k, v, bias, mask), kwargs, ct


@pytest.mark.parametrize("mode, dtype", [(m, jnp.bfloat16) for m in NN_MASK_MODES] + [
    (m, jnp.float32) for m in (("bias", "causal"), ("custom", "padding"),
                               ("causal", "sliding_window"))], ids=str)
def test_nn_mask_modes_match_jax_nn(mode, dtype):
  (q, k, v, bias, mask), kwargs, ct = _nn_mask_case(mode, dtype)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  nn = functools.partial(jax_nn_attention, return_residual=True, **kwargs)
  with standard_promotion():
    want_out, want_lse, want = _run(lambda q, k, v, b: nn(q, k, v, b, mask), (q, k, v, bias),
                                    ct, argnums)
  # nn_test's tolerances for bf16 (.01 out and dV, .02 dQ, dK, dbias).
  out_tol, grad_tol = (1e-5, 2e-5) if dtype == jnp.float32 else (1e-2, 2e-2)
  for form in FORMS.values():
    # bias and mask positional, as in jax.nn.
    ours = functools.partial(jaxsim.attention, return_residual=True, **kwargs, **form)
    out, lse, got = _run(lambda q, k, v, b, f=ours: f(q, k, v, b, mask), (q, k, v, bias), ct,
                         argnums)
    assert out.shape == want_out.shape and out.dtype == want_out.dtype
    assert lse.shape == want_lse.shape and lse.dtype == want_lse.dtype
    np.testing.assert_allclose(_f32(out), _f32(want_out), atol=out_tol, rtol=out_tol)
    # Rows past query_seq_lengths: zeros and the large negative, in both.
    np.testing.assert_allclose(_f32(lse), _f32(want_lse), atol=out_tol, rtol=out_tol)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(_f32(g), _f32(w), atol=grad_tol, rtol=grad_tol)


@pytest.mark.parametrize("dtype, group, use_vmap", [
    (jnp.bfloat16, 1, False), (jnp.bfloat16, 2, True), (jnp.bfloat16, 4, False),
    (jnp.float16, 2, False), (jnp.float16, 4, True), (jnp.float32, 2, True),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_nn_grouped_query_attention_matches_repeated_heads(dtype, group, use_vmap):
  """testDotProductAttention: GQA against jax.nn on keys repeated over each group."""
  b, s, t, n, h = 2, 128, 128, 4, 32
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype)
  k = jax.random.normal(keys[1], (b, s, n // group, h), dtype)
  v = jax.random.normal(keys[2], (b, s, n // group, h), dtype)
  ct = jax.random.normal(keys[3], (b, t, n, h), dtype)
  ref_dtype = _jax_nn_dtype(dtype)
  k_ref, v_ref = (jnp.repeat(a, group, axis=2).astype(ref_dtype) for a in (k, v))
  with standard_promotion():
    want_out, _, want = _run(functools.partial(jax_nn_attention, return_residual=True),
                             (q.astype(ref_dtype), k_ref, v_ref), ct, (0, 1, 2))
  d_k, d_v = (w.reshape(b, s, n // group, group, h).sum(axis=3) for w in want[1:])
  tol = 2e-5 if dtype == jnp.float32 else 1e-2
  for form in FORMS.values():
    fn = functools.partial(jaxsim.attention, return_residual=True, **form)
    if use_vmap:
      fn = jax.vmap(fn)  # over B, with unbatched (T, N, H) inputs inside
    out, _, got = _run(fn, (q, k, v), ct, (0, 1, 2))
    assert out.dtype == dtype
    np.testing.assert_allclose(_f32(out), _f32(want_out), atol=tol, rtol=tol)
    for g, w in zip(got, (want[0], d_k, d_v), strict=True):
      np.testing.assert_allclose(_f32(g), _f32(w), atol=2 * tol, rtol=2 * tol)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_nn_bias_gradient_of_self_attention(batch_size):
  """testDotProductAttentionBiasGradient: q = k = v = x, a (1, 1, S) mask, dbias."""
  b, s, n, h = batch_size, 128, 4, 32
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (b, s, n, h), jnp.bfloat16)
  bias = jax.random.normal(keys[1], (b, n, s, s), jnp.bfloat16)
  mask = jnp.ones((1, 1, s), jnp.bool_)

  def vjp(fn):
    out, f_vjp = jax.vjp(lambda x, bias: fn(x, x, x, bias, mask), x, bias)
    return out, f_vjp(x)

  with standard_promotion():
    want_out, (want_dx, want_dbias) = jax.jit(lambda: vjp(jax_nn_attention))()
  for form in ("dense", "blocked"):
    out, (dx, dbias) = vjp(functools.partial(jaxsim.attention, **FORMS[form]))
    np.testing.assert_allclose(_f32(out), _f32(want_out), atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(_f32(dbias), _f32(want_dbias), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(_f32(dx), _f32(want_dx), atol=5e-2, rtol=2e-2)


def test_float32_at_512_rows_matches_jax_nn_in_value_and_gradient():
  """Past the toy sizes: fused XLA code paths, GQA, causal, a full bias, uneven blocks."""
  b, t, s, n, k, h = 1, 512, 640, 4, 2, 64
  q, key, v = _qkv(30, b=b, t=t, s=s, n=n, k=k, h=h)
  bias = jax.random.normal(jax.random.key(31), (b, n, t, s))
  ct = jax.random.normal(jax.random.key(32), q.shape)
  nn = functools.partial(jax_nn_attention, is_causal=True)
  want_out = jax.jit(nn)(q, key, v, bias)
  want = _grads(nn, (q, key, v, bias), ct, (0, 1, 2, 3))
  for form in ({}, {"block_size": 96, "query_block_size": 160}):
    fn = functools.partial(jaxsim.attention, is_causal=True, **form)
    np.testing.assert_allclose(jax.jit(fn)(q, key, v, bias), want_out, atol=2e-5, rtol=1e-5)
    for g, w in zip(_grads(fn, (q, key, v, bias), ct, (0, 1, 2, 3)), want, strict=True):
      np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Every metric against the numpy reference; blocked == dense with every option.

OPTION_SETS = {
    "plain": {},
    "mask_causal_bias": {"mask": True, "is_causal": True, "bias": True},
    "window_lengths": {"local_window_size": (2, 1), "query_seq_lengths": [4, 6],
                       "key_value_seq_lengths": [9, 3]},
    "all": {"mask": True, "bias": True, "is_causal": True, "local_window_size": 3,
            "key_value_seq_lengths": [7, 2]},
}


def _options(name, seed, *, b, n, t, s):
  """Keyword arguments for one option set; the random mask hides some whole rows."""
  rng = np.random.default_rng(seed)
  out = dict(OPTION_SETS[name])
  if out.pop("mask", False):
    mask = rng.random((b, n, t, s)) < 0.6
    mask[0, 0, 1] = False  # a query that sees nothing
    out["mask"] = mask
  if out.pop("bias", False):
    out["bias"] = rng.normal(size=(b, n, t, s)).astype(np.float32)
  for name in ("query_seq_lengths", "key_value_seq_lengths"):
    if name in out:
      out[name] = np.asarray(out[name], np.int32)
  return out


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_matches_numpy_reference(metric, options):
  b, t, s, n, k = 2, 6, 9, 4, 2
  q, key, v = _qkv(5, b=b, t=t, s=s, n=n, k=k, hv=3)
  key = key.at[0, 2, 1].set(0.0)  # a zero key row: cosine 0 with everything
  kwargs = _options(options, 6, b=b, n=n, t=t, s=s)
  kwargs.update(metric=metric, scale={"dot": None, "scaled_dot": 0.4, "cosine": None}[metric])
  ref_kw = _reference_kwargs(b, n, t, s, kwargs)
  want = reference.attention(q, key, v, **ref_kw)
  for form in _forms(t, s).values():
    np.testing.assert_allclose(jaxsim.attention(q, key, v, **kwargs, **form), want, atol=2e-5)
  weights = jaxsim.attention_weights(q, key, **kwargs)
  np.testing.assert_allclose(weights, reference.attention_weights(q, key, **ref_kw), atol=2e-6)
  scores = jaxsim.attention_scores(q, key, **kwargs)
  keep = ref_kw.pop("mask")
  ref_kw.pop("bias")
  want = reference.attention_logits(q, key, bias=_f32(kwargs.get("bias")), **ref_kw)
  assert scores.shape == (b, n, t, s) and scores.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(scores)[keep], want[keep], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(scores)[~keep], np.float32(LARGE_NEGATIVE))


# T=6, S=10: 4 divides neither (padded query block, shifted key block), 5 only S, 16
# exceeds both (one block each way); query blocks of 2 under key blocks of 5.
@pytest.mark.parametrize("metric, options, block_size, query_block_size", [
    ("dot", "mask_causal_bias", 4, None), ("scaled_dot", "all", 4, None),
    ("cosine", "window_lengths", 4, None), ("scaled_dot", "window_lengths", 5, 2),
    ("cosine", "all", 16, None), ("scaled_dot", "mask_causal_bias", 3, 4),
])
def test_blocked_equals_dense_in_value_and_gradient(metric, options, block_size,
                                                    query_block_size):
  b, t, s, n = 2, 6, 10, 4
  q, key, v = _qkv(7, b=b, t=t, s=s, n=n, k=2, hv=5)
  kwargs = _options(options, 8, b=b, n=n, t=t, s=s)
  bias = jnp.asarray(np.random.default_rng(9).normal(size=(b, 1, t, s)), jnp.float32)
  kwargs.pop("bias", None)
  scale = None if metric == "dot" else jnp.float32(1.3)
  ct = jax.random.normal(jax.random.key(10), (b, t, n, 5))

  def loss(q, key, v, bias, scale, block_size):
    out, lse = jaxsim.attention(q, key, v, bias, metric=metric, scale=scale,
                                block_size=block_size, return_residual=True,
                                query_block_size=query_block_size if block_size else None,
                                **kwargs)
    return jnp.sum(out * ct), (out, lse)

  argnums = (0, 1, 2, 3) if metric == "dot" else (0, 1, 2, 3, 4)
  grad = jax.grad(loss, argnums=argnums, has_aux=True)
  (g_dense, dense), (g_blocked, blocked) = (grad(q, key, v, bias, scale, bs)
                                            for bs in (None, block_size))
  for got, want in zip(blocked, dense, strict=True):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
  for gb, gd in zip(g_blocked, g_dense, strict=True):
    assert np.all(np.isfinite(gb))
    np.testing.assert_allclose(gb, gd, atol=2e-5, rtol=2e-5)


def test_residual_is_the_logsumexp_of_the_scores():
  b, t, s, n = 2, 7, 9, 4
  q, key, v = _qkv(20, b=b, t=t, s=s, n=n, k=2)
  kwargs = _options("all", 21, b=b, n=n, t=t, s=s)
  scores = jaxsim.attention_scores(q, key, **kwargs)  # (B, N, T, S)
  want = np.moveaxis(jax.nn.logsumexp(scores, axis=-1), 1, 2)  # (B, T, N)
  for form in _forms(t, s).values():
    _, lse = jaxsim.attention(q, key, v, return_residual=True, **kwargs, **form)
    np.testing.assert_allclose(lse, want, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------
# Rows with nothing to attend to: zeros, where jax.nn averages the values.


@pytest.mark.parametrize("implementation", [None, "xla"])
@pytest.mark.parametrize("metric", ["scaled_dot", "cosine"])
def test_rows_with_nothing_visible_give_zeros_and_zero_gradients(metric, implementation):
  b, t, s, n = 2, 4, 5, 2
  q, key, v = _qkv(11, b=b, t=t, s=s, n=n, k=1)
  mask = np.ones((b, n, t, s), bool)
  mask[0, 1, 2] = False  # one (head, query) sees nothing
  mask[..., 0] = False  # with causal, query 0 sees nothing in every head
  bias = np.zeros((b, n, t, s), np.float32)
  bias[1, 0, 3] = -np.inf  # a -inf bias hides a whole row too
  kw = dict(metric=metric, is_causal=True, key_value_seq_lengths=np.array([5, 5], np.int32),
            implementation=implementation)
  empty = np.zeros((b, t, n), bool)
  empty[:, 0, :] = empty[0, 2, 1] = empty[1, 3, 0] = True
  forms = [{}] if implementation else list(_forms(t, s).values())
  for form in forms:
    fn = functools.partial(jaxsim.attention, bias=bias, mask=mask, **kw, **form)
    out = fn(q, key, v)
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
    assert np.all(np.abs(np.asarray(out)[~empty]) > 0)
    grads = jax.grad(lambda q, k, v, f=fn: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))(
        q, key, v)
    for g in grads:
      assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(grads[0])[empty], 0.0)
    assert np.any(np.asarray(grads[0])[~empty] != 0)
  if implementation is None:
    weights = jaxsim.attention_weights(q, key, bias, mask, metric=metric, is_causal=True)
    np.testing.assert_array_equal(weights[0, 1, 2], 0.0)
    np.testing.assert_array_equal(weights[1, 0, 3], 0.0)


@pytest.mark.parametrize("form", ["dense", "blocked"])
def test_no_visible_key_at_all_is_zero_not_nan(form):
  q, key, v = _qkv(12, b=2, t=3, s=4, n=2, k=2)
  form = _forms(3, 4)[form]
  for kw in ({"mask": np.zeros((1, 1, 3, 4), bool)},
             {"key_value_seq_lengths": np.array([0, 0], np.int32)},
             {"query_seq_lengths": np.array([0, 0], np.int32)}):
    fn = functools.partial(jaxsim.attention, **kw, **form)
    out, grads = jax.value_and_grad(lambda q, k, v, f=fn: jnp.sum(f(q, k, v)),
                                    argnums=(0, 1, 2))(q, key, v)
    assert out == 0.0
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)
    _, lse = fn(q, key, v, return_residual=True)
    np.testing.assert_array_equal(lse, np.float32(LARGE_NEGATIVE))


def test_no_keys_gives_zeros_in_both_forms():
  q, key, v = _qkv(14, b=1, t=3, s=4, n=2, k=1)
  for form in _forms(3, 4).values():
    out = jaxsim.attention(q, key[:, :0], v[:, :0], **form)
    assert out.shape == q.shape
    np.testing.assert_array_equal(out, 0.0)


# --------------------------------------------------------------------------------------
# Skipped blocks. A NaN in a value row poisons every block that reads it, even where it
# is masked (0 * NaN); so rows that stay finite show which blocks were never computed,
# in the forward and the backward pass.


@pytest.mark.parametrize("options, poisoned, clean_rows", [
    # Causal: the last key is read only by the last query block.
    ({"is_causal": True}, 63, slice(0, 48)),
    # A window of 4 either side: key 0 is read only by query blocks 0 and 1 (block 16).
    ({"local_window_size": 4}, 0, slice(32, 64)),
    # Keys past every sequence length: never read.
    ({"key_value_seq_lengths": np.array([40, 20], np.int32)}, 50, slice(0, 64)),
])
def test_hidden_blocks_are_skipped_forward_and_backward(options, poisoned, clean_rows):
  b, t, n, h = 2, 64, 2, 8
  q, key, v = _qkv(40, b=b, t=t, s=t, n=n, k=n, h=h)
  bad_v = v.at[:, poisoned].set(jnp.nan)
  ct = jax.random.normal(jax.random.key(41), q.shape)
  fn = functools.partial(jaxsim.attention, block_size=16, **options)
  want = fn(q, key, v)
  got = fn(q, key, bad_v)
  np.testing.assert_allclose(got[:, clean_rows], want[:, clean_rows], atol=1e-6)
  # In the backward pass a computed hidden block would give these rows 0 * NaN too.
  gq, wq = (_grads(fn, (q, key, vv), ct, (0,))[0] for vv in (bad_v, v))
  np.testing.assert_allclose(gq[:, clean_rows], wq[:, clean_rows], atol=1e-5)


# --------------------------------------------------------------------------------------
# Low precision: float32 accumulation, and blocked gradients as accurate as dense ones.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("constant_values", [False, True], ids=["random_v", "constant_v"])
def test_blocked_low_precision_gradients_as_accurate_as_dense(dtype, constant_values):
  """Errors against float32 gradients of the same rounded inputs: blocked <= 2x dense.

  With every value row equal the output does not depend on the weights, so the exact
  gradients of q, k and the bias are 0: weights rounded to bf16 before the product with
  the values (the old blocked form) gave 1e-2 there, dense 1e-6.
  """
  b, t, s, n, h = 2, 128, 128, 4, 32
  keys = jax.random.split(jax.random.key(50), 5)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype) * 2  # sharp softmax
  k = jax.random.normal(keys[1], (b, s, n, h), dtype)
  v = jax.random.normal(keys[2], (b, 1 if constant_values else s, n, h), dtype)
  v = jnp.broadcast_to(v, (b, s, n, h))
  bias = jax.random.normal(keys[3], (b, n, t, s), dtype)
  ct = jax.random.normal(keys[4], (b, t, n, h), dtype)
  args, argnums = (q, k, v, bias), (0, 1, 2, 3)
  with standard_promotion():
    truth = _grads(functools.partial(jax_nn_attention, is_causal=True),
                   [a.astype(jnp.float32) for a in args], ct, argnums)
  errors = {}
  for form in FORMS:
    fn = functools.partial(jaxsim.attention, is_causal=True, **FORMS[form])
    got = _grads(fn, args, ct, argnums)
    errors[form] = [np.max(np.abs(_f32(g) - _f32(w))) for g, w in zip(got, truth, strict=True)]
  # The floor is float32 rounding of the softmax itself, 1e-6 here.
  for name, blocked, dense in zip("qkvb", errors["blocked"], errors["dense"], strict=True):
    assert blocked <= 2 * dense + 1e-5, (name, errors)


@pytest.mark.parametrize("metric, dtype", [
    ("dot", jnp.float16), ("cosine", jnp.float16), ("scaled_dot", jnp.bfloat16),
    ("cosine", jnp.bfloat16),
])
def test_low_precision_accumulates_in_float32(metric, dtype):
  b, t, s, n = 2, 6, 9, 2
  q, key, v = _qkv(15, b=b, t=t, s=s, n=n, k=1, dtype=dtype)
  # "dot" logits of these rows reach ~15, and exp(15) overflows float16 (max 65504):
  # a float16 softmax would give inf/NaN, the float32 accumulation must not.
  q = q * jnp.asarray(2.0, dtype)
  want = reference.attention(_f32(q), _f32(key), _f32(v), kind=metric, is_causal=True)
  for form in _forms(t, s).values():
    out = jaxsim.attention(q, key, v, metric=metric, is_causal=True, **form)
    assert out.dtype == dtype
    # The inputs are already rounded to `dtype`; errors come from rounding the
    # normalised rows and the weights, so allow a few ulps of the output.
    np.testing.assert_allclose(_f32(out), want, atol=4 * TOL[dtype], rtol=4 * TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_scores_are_float32_weights_keep_the_dtype(dtype):
  q, key, _ = _qkv(18, b=1, t=3, s=4, n=2, k=2, dtype=dtype)
  scores = jaxsim.attention_scores(q, key, is_causal=True)
  assert scores.dtype == jnp.float32
  np.testing.assert_array_equal(scores[0, :, 0, 1:], np.float32(LARGE_NEGATIVE))
  weights = jaxsim.attention_weights(q, key, is_causal=True)
  assert weights.dtype == dtype
  np.testing.assert_allclose(_f32(weights).sum(-1), 1.0, rtol=TOL[dtype])


def _strict_promotion_supported():
  try:
    with jax.numpy_dtype_promotion("strict"):
      kernels.accum_dtype(jnp.bfloat16)
  except jax.dtypes.TypePromotionError:
    return False
  return True


@pytest.mark.skipif(not _strict_promotion_supported(),
                    reason="kernels.accum_dtype widens bf16/f16 implicitly (the numerics "
                           "branch makes it explicit)")
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("implementation", [None, "xla"])
def test_low_precision_under_strict_dtype_promotion(dtype, implementation):
  if implementation and dtype == jnp.float16 and jax.default_backend() == "cpu":
    pytest.skip("jax.nn's fp16 attention asks for the F16_F16_F32 dot, which XLA:CPU lacks")
  q, key, v = _qkv(19, b=1, t=8, s=8, n=2, k=1, dtype=dtype)
  bias = jnp.ones((1, 1, 8, 8), dtype)
  forms = [{}] if implementation else list(_forms(8, 8).values())
  with jax.numpy_dtype_promotion("strict"):
    want = jaxsim.attention(q, key, v, bias, is_causal=True)
    for form in forms:
      fn = functools.partial(jaxsim.attention, is_causal=True, metric="cosine",
                             implementation=implementation, **form)
      out = fn(q, key, v, bias)
      assert out.dtype == dtype
      if implementation is None:  # jax.nn's own backward widens implicitly
        jax.grad(lambda q, f=fn: jnp.sum(f(q, key, v, bias).astype(jnp.float32)))(q)
    for form in forms:
      got = jaxsim.attention(q, key, v, bias, is_causal=True, implementation=implementation,
                             **form)
      np.testing.assert_allclose(_f32(got), _f32(want), atol=TOL[dtype])
    jaxsim.attention_weights(q, key, bias, metric="cosine")


# --------------------------------------------------------------------------------------
# implementation="xla" / "cudnn": the prepared rows through jax.nn's own kernel.


@pytest.mark.parametrize("metric", METRICS)
def test_xla_implementation_equals_jaxsims_own_forms(metric):
  b, t, s, n = 2, 12, 16, 4
  q, key, v = _qkv(60, b=b, t=t, s=s, n=n, k=2, h=16)
  q = q.at[0, 3, 1].set(0.0)  # a zero query row (cosine 0 with every key)
  kwargs = _options("all", 61, b=b, n=n, t=t, s=s)
  if metric != "dot":
    kwargs["scale"] = 0.7
  kwargs["metric"] = metric
  ct = jax.random.normal(jax.random.key(62), q.shape)
  bias = kwargs.pop("bias")
  xla = functools.partial(jaxsim.attention, implementation="xla", **kwargs)
  want_out, want_lse = xla(q, key, v, bias, return_residual=True)
  want = _grads(lambda *a: xla(*a), (q, key, v, bias), ct, (0, 1, 2, 3))
  for form in _forms(t, s).values():
    own = functools.partial(jaxsim.attention, **kwargs, **form)
    out, lse = own(q, key, v, bias, return_residual=True)
    np.testing.assert_allclose(out, want_out, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-5)
    for g, w in zip(_grads(lambda *a, f=own: f(*a), (q, key, v, bias), ct, (0, 1, 2, 3)), want,
                    strict=True):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("traced_scale", [False, True])
@pytest.mark.parametrize("metric", METRICS)
def test_cudnn_implementation_passes_prepared_rows_to_jax_nn(monkeypatch, request, metric,
                                                              traced_scale):
  """What jaxsim hands jax.nn under implementation="cudnn", run here through jax.nn's XLA
  kernel: unit rows for cosine, the scale as a constant or folded into the query rows."""
  calls = []
  real = jax.nn.dot_product_attention
  # The fake is traced into the jitted pass-through: start from, and leave, an empty cache.
  attention_module._jax_nn.clear_cache()
  request.addfinalizer(attention_module._jax_nn.clear_cache)

  def fake(query, key, value, bias=None, mask=None, *, scale=None, implementation=None,
           **kwargs):
    calls.append(dict(scale=scale, implementation=implementation))
    return real(query, key, value, bias, mask, scale=scale, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  q, key, v = _qkv(63, b=2, t=8, s=8, n=2, k=1, h=16)
  scale = None if metric == "dot" else (jnp.float32(0.9) if traced_scale else 0.9)
  kwargs = dict(metric=metric, scale=scale, is_causal=True)
  got = jaxsim.attention(q, key, v, implementation="cudnn", **kwargs)
  np.testing.assert_allclose(got, jaxsim.attention(q, key, v, **kwargs), atol=2e-6)
  # Equal to jaxsim's own form, so the rows were prepared (unit rows for cosine).
  (call,) = calls
  assert call["implementation"] == "cudnn"
  if traced_scale and metric != "dot":
    assert call["scale"] == 1.0  # folded into the query rows: cuDNN compiles scales in
  else:
    assert isinstance(call["scale"], float) and call["scale"] == (0.9 if scale else 1.0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("metric", METRICS)
def test_cudnn_on_gpu_equals_jaxsims_own_forms(metric):
  b, t, n, h = 2, 256, 4, 64
  q, key, v = _qkv(64, b=b, t=t, s=t, n=n, k=n, h=h, dtype=jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(65), q.shape, jnp.bfloat16)
  kwargs = dict(metric=metric, is_causal=True)
  want = jaxsim.attention(q, key, v, **kwargs)
  got = jaxsim.attention(q, key, v, implementation="cudnn", **kwargs)
  np.testing.assert_allclose(_f32(got), _f32(want), atol=2e-2, rtol=2e-2)
  for g, w in zip(_grads(functools.partial(jaxsim.attention, implementation="cudnn", **kwargs),
                         (q, key, v), ct, (0, 1, 2)),
                  _grads(functools.partial(jaxsim.attention, **kwargs), (q, key, v), ct,
                         (0, 1, 2)), strict=True):
    np.testing.assert_allclose(_f32(g), _f32(w), atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------------------
# Transforms, metrics' properties, memory.


def test_jit_vmap_and_unbatched_form():
  q, key, v = _qkv(13, b=3, t=5, s=7, n=4, k=2)
  mask = np.random.default_rng(14).random((5, 7)) < 0.7  # (T, S): broadcasts over B and N
  fn = functools.partial(jaxsim.attention, metric="cosine", block_size=3, is_causal=True,
                         local_window_size=(3, 1))
  lengths = np.array([5, 3, 6], np.int32)
  batched = fn(q, key, v, mask=mask, key_value_seq_lengths=lengths)
  unbatched = jnp.stack([fn(q[i], key[i], v[i], mask=mask, key_value_seq_lengths=lengths[i])
                         for i in range(3)])
  mapped = jax.vmap(lambda a, b, c, n: fn(a, b, c, mask=mask, key_value_seq_lengths=n))(
      q, key, v, lengths)
  jitted = jax.jit(lambda a, b, c, m, n: fn(a, b, c, mask=m, key_value_seq_lengths=n))(
      q, key, v, mask, lengths)
  assert unbatched.shape == (3, 5, 4, 8)
  for got in (unbatched, mapped, jitted):
    np.testing.assert_allclose(got, batched, atol=1e-6)
  scores = jax.vmap(lambda a, b: jaxsim.attention_scores(a, b, metric="dot"))(q, key)
  np.testing.assert_allclose(scores, jaxsim.attention_scores(q, key, metric="dot"), atol=1e-6)


def test_new_scale_values_do_not_recompile():
  q, key, v = _qkv(22, b=1, t=4, s=4, n=1, k=1)
  jaxsim.attention(q, key, v, metric="cosine", scale=1.0)
  size = attention_module._attention._cache_size()
  for scale in (2.0, 3.5, 2, np.float32(0.5)):
    want = reference.attention(q, key, v, kind="cosine", scale=float(scale))
    np.testing.assert_allclose(jaxsim.attention(q, key, v, metric="cosine", scale=scale), want,
                               atol=2e-6)
  assert attention_module._attention._cache_size() == size


def test_cosine_weights_ignore_magnitudes_dot_weights_do_not():
  q, key, _ = _qkv(16, b=1, t=3, s=6, n=1, k=1)
  factors = jnp.array([0.1, 1.0, 3.0, 0.5, 10.0, 2.0])[None, :, None, None]
  for metric, invariant in (("cosine", True), ("dot", False), ("scaled_dot", False)):
    w = jaxsim.attention_weights(q, key, metric=metric)
    w_scaled = jaxsim.attention_weights(q * 7.0, key * factors, metric=metric)
    assert np.allclose(w, w_scaled, atol=1e-6) == invariant, metric


def test_cosine_scale_is_the_inverse_temperature():
  q, key, _ = _qkv(17, b=1, t=4, s=5, n=2, k=2, h=16)
  cos = jaxsim.attention_scores(q, key, metric="cosine", scale=1.0)
  assert np.all(np.abs(cos) <= 1.0)
  np.testing.assert_allclose(jaxsim.attention_scores(q, key, metric="cosine"), 4.0 * cos,
                             rtol=1e-6)
  np.testing.assert_allclose(jaxsim.attention_scores(q, key, metric="cosine", scale=12.5),
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
  # left is O((T + S) H): about 3 MiB forward and 5 MiB for the gradient here.
  assert blocked < scores_bytes / 8, blocked
  assert blocked_grad < scores_bytes / 4, blocked_grad


# --------------------------------------------------------------------------------------
# Inputs: warnings, modes and errors.


def test_float64_and_mixed_inputs_raise_no_warning():
  q, key, v = (np.asarray(a, np.float64) for a in _qkv(23, b=1, t=4, s=5, n=2, k=1))
  bias = np.random.default_rng(24).normal(size=(1, 2, 4, 5))  # float64
  want = jaxsim.attention(*(a.astype(np.float32) for a in (q, key, v)), bias.astype(np.float32))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for args in ((q, key, v, bias), (q.astype(np.float32), key, v, bias),
                 (q, key.astype(np.float32), v.astype(np.float32), bias)):
      for form in _forms(4, 5).values():
        np.testing.assert_allclose(jaxsim.attention(*args, **form), want, atol=1e-6)
      jaxsim.attention(*args, implementation="xla")
    jaxsim.attention_weights(q, key, bias, query_seq_lengths=np.array([3], np.int64))
    jaxsim.attention_scores(q, key.astype(np.float32))


def test_import_under_python_OO():
  code = "import jaxsim; print(jaxsim.attention.__doc__)"
  out = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "None"


ARGS = (np.ones((5, 2, 8)),) + (np.ones((7, 2, 8)),) * 2


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.ones((5, 8)), np.ones((7, 8)), np.ones((7, 8))), {}, ValueError, "query"),
        ((np.ones((1, 5, 2, 8)), np.ones((7, 2, 8)), np.ones((7, 2, 8))), {}, ValueError, "rank"),
        ((np.ones((5, 3, 8)), np.ones((7, 2, 8)), np.ones((7, 2, 8))), {}, ValueError,
         "multiple"),
        ((np.ones((5, 2, 8)), np.ones((7, 2, 4)), np.ones((7, 2, 4))), {}, ValueError, "head dim"),
        ((np.ones((5, 2, 8)), np.ones((7, 2, 8)), np.ones((6, 2, 8))), {}, ValueError, "value"),
        ((np.ones((5, 2, 8)), np.ones((7, 2, 8)), None), {}, TypeError, "`value`.*None"),
        ((np.ones((2, 5, 2, 8)), np.ones((3, 7, 2, 8)), np.ones((3, 7, 2, 8))), {}, ValueError,
         "batch"),
        (ARGS, {"mask": np.ones((5, 6), bool)}, ValueError, r"mask.*\(5, 6\).*broadcast"),
        (ARGS, {"mask": np.ones((5, 7))}, TypeError, "boolean"),
        (ARGS, {"bias": np.ones((3, 5, 7))}, ValueError, "bias"),
        (ARGS, {"metric": "euclidean"}, ValueError, "metric"),
        (ARGS, {"metric": "dot", "scale": 2.0}, ValueError, "scale"),
        (ARGS, {"scale": np.ones(2)}, ValueError, "scale"),
        (ARGS, {"block_size": 0}, ValueError, "block_size"),
        (ARGS, {"query_block_size": 2}, ValueError, "query_block_size"),
        (ARGS, {"query_seq_lengths": np.array([5.0])}, TypeError, "query_seq_lengths"),
        (ARGS, {"key_value_seq_lengths": np.array([5, 5])}, ValueError,
         r"key_value_seq_lengths.*\(2,\)"),
        (ARGS, {"local_window_size": (1, 2, 3)}, TypeError, "local_window_size"),
        (ARGS, {"local_window_size": 1.5}, TypeError, "local_window_size"),
        (ARGS, {"is_causal": "yes"}, TypeError, "is_causal"),
        (ARGS, {"return_residual": 1}, TypeError, "return_residual"),
        (ARGS, {"implementation": "flash"}, ValueError, "implementation"),
        (ARGS, {"implementation": "xla", "block_size": 4}, ValueError, "block_size"),
        (ARGS, {"implementation": "xla", "precision": "highest"}, ValueError, "precision"),
        ((ARGS[0], ARGS[1], np.ones((7, 2, 4))), {"implementation": "xla"}, ValueError,
         "value"),
        ((np.ones((5, 2, 8)) * 1j,) + ARGS[1:], {}, TypeError, "complex"),
    ],
)
def test_bad_input_raises_naming_the_argument(args, kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxsim.attention(*args, **kwargs)
