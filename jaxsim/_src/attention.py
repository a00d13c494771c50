"""Attention as a similarity kernel plus a softmax: dot, scaled-dot and cosine logits.

The logits of every head are the core pairwise scores between its query and key rows
(`kernels.prepare` once per row set, then `kernels.score`), so attention reuses the
same normalisation and matmul as `jaxsim.cosine` and `jaxsim.scaled_dot`. Layout and
masking follow `jax.nn.dot_product_attention`: `(B, T, N, H)` queries, `(B, S, K, H)`
keys and values with `N` a multiple of `K` (grouped-query heads), a boolean `mask`
(True = attend) and an additive `bias`, both broadcastable to `(B, N, T, S)`.

The blocked form is a client of the shared block loop: `blockscan.block_map` takes
query blocks one at a time, and for each, `blockscan.block_scan` folds in key/value
blocks with an online softmax (running max, running denominator, running weighted sum
of values), the mask, bias and causal structure cut to the current (query block, key
block) window. No `T x S` (or `T x block`) array is ever held, in the forward pass or,
with every query block and key block recomputed under `jax.checkpoint`, the backward.

Internally heads are laid out grouped: queries `(B, K, G, T, H)` against keys
`(B, K, 1, S, H)`, `G = N // K`, so the key heads broadcast over their query group in
the matmul instead of being repeated.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsim._src import blockscan, defaults, kernels, validation

Kind = Literal["dot", "scaled_dot", "cosine"]
KINDS: tuple[str, ...] = ("dot", "scaled_dot", "cosine")


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
  return kind


def large_negative(dtype) -> float:
  """The finite logit masked entries get, as in `jax.nn.dot_product_attention`.

  Finite rather than `-inf`, so a softmax over a fully masked row stays finite; capped
  at the float32 range, where the softmax is computed.
  """
  return -0.7 * float(min(jnp.finfo(dtype).max, jnp.finfo(jnp.float32).max))


def default_cosine_scale(h: int) -> float:
  r"""The default inverse temperature of cosine attention, :math:`\sqrt{H}`.

  Query and key rows with unit-variance entries have norms near :math:`\sqrt{H}`, so
  their scaled-dot logits :math:`q \cdot k / \sqrt{H}` are about
  :math:`\sqrt{H} \cos(q, k)`: with this scale cosine logits span the same range as
  scaled-dot ones, and the softmax can still be sharp (a bare cosine in `[-1, 1]`
  gives weights within a factor e^2 of each other). nGPT uses the same
  :math:`\sqrt{d_k}` softmax scale for its normalised queries and keys; Swin
  Transformer V2 learns the temperature, starting from a scale of 10.
  """
  return float(max(h, 1)) ** 0.5


# ---------------------------------------------------------------------------------------
# Input checks: on static shapes and dtypes only, so they cost nothing under jit/vmap.


def _inputs(query, key, value):
  """Validates query/key(/value); returns them as floats of one dtype and `batched`."""
  query = validation.as_float_array(query, "query")
  key = validation.as_float_array(key, "key")
  validation.check_rank(query, "query", min_rank=3, max_rank=4)
  if key.ndim != query.ndim:
    raise ValueError(
        "`key` must have the same rank as `query` ((B, S, K, H) with (B, T, N, H), or "
        f"(S, K, H) with (T, N, H)), got query.shape={query.shape}, key.shape={key.shape}.")
  arrays = [query, key]
  if value is not None:
    value = validation.as_float_array(value, "value")
    if value.ndim != key.ndim or value.shape[:-1] != key.shape[:-1]:
      raise ValueError(
          "`value` must match `key` in every axis but the last, got "
          f"key.shape={key.shape}, value.shape={value.shape}.")
    arrays.append(value)
  batched = query.ndim == 4
  q4 = query.shape if batched else (1,) + query.shape
  k4 = key.shape if batched else (1,) + key.shape
  if q4[0] != k4[0]:
    raise ValueError(
        f"`query` and `key` must have the same batch size, got query.shape={query.shape}, "
        f"key.shape={key.shape}.")
  if q4[-1] != k4[-1]:
    raise ValueError(
        "`query` and `key` must have the same head dim H (last axis), got "
        f"query.shape={query.shape}, key.shape={key.shape}.")
  if k4[2] == 0 or q4[2] % k4[2]:
    raise ValueError(
        f"The number of query heads N={q4[2]} must be a multiple of the number of key/value "
        f"heads K={k4[2]}, got query.shape={query.shape}, key.shape={key.shape}.")
  dtype = functools.reduce(jnp.promote_types, [a.dtype for a in arrays])
  arrays = [a if a.dtype == dtype else jnp.asarray(a, dtype) for a in arrays]
  if value is None:
    arrays.append(None)
  return (*arrays, batched)


def _logit_array(arr, name, *, target, batched):
  """Checks a mask or bias against `target = (B, N, T, S)`; returns it 4-D or None."""
  if arr is None:
    return None
  if name == "mask":
    if not isinstance(arr, (jax.Array, np.ndarray)):
      arr = np.asarray(arr)
    if arr.dtype != np.bool_:
      raise TypeError(
          f"`mask` must be a boolean array (True = attend), got dtype {arr.dtype}; pass an "
          "additive mask as `bias`.")
  else:
    arr = validation.as_float_array(arr, name)
  want = target if batched else target[1:]
  form = "(B, N, T, S)" if batched else "(N, T, S)"
  if arr.ndim > 4:
    raise ValueError(f"`{name}` must have rank <= 4, got shape {arr.shape}.")
  shape = (1,) * (4 - arr.ndim) + tuple(arr.shape)
  if any(got not in (1, full) for got, full in zip(shape, target, strict=True)):
    raise ValueError(
        f"`{name}` of shape {arr.shape} does not broadcast to {form} = {want}.")
  return jnp.reshape(arr, shape)


def _scale(kind, scale):
  if scale is None:
    return None
  if kind == "dot":
    raise ValueError("`scale` has no effect with kind='dot' (unscaled logits); use "
                     "kind='scaled_dot' for a custom scale.")
  return validation.check_scalar(scale, "scale")


# ---------------------------------------------------------------------------------------
# The computation, on the grouped layout (B, K, G, T, H) x (B, K, 1, S, H).


def _grouped(query, key, value, mask, bias, num_kv_heads):
  """BTNH -> (B, K, G, T, H); BSKH -> (B, K, 1, S, H); (B, N, T, S) -> (B, K|1, G|1, T, S)."""
  b, t, n, h = query.shape
  g = n // num_kv_heads
  q = jnp.transpose(jnp.reshape(query, (b, t, num_kv_heads, g, h)), (0, 2, 3, 1, 4))
  kv = lambda a: jnp.transpose(a, (0, 2, 1, 3))[:, :, None]

  def heads(a):
    if a is None:
      return None
    if a.shape[1] == 1:
      return a[:, :, None]
    return jnp.reshape(a, (a.shape[0], num_kv_heads, g) + a.shape[2:])

  return q, kv(key), None if value is None else kv(value), heads(mask), heads(bias)


def _window(a, rows, start, size):
  """`a[..., rows, start:start + size]` of a `(..., T|1, S|1)` mask or bias.

  `rows=None` means all rows. Size-1 (broadcast) axes are kept as they are; a block
  that needs both a row and a column cut is read with one gather of exactly the window,
  so neither a `(T, block)` nor a `(block, S)` slice is ever made.
  """
  all_rows = rows is None or a.shape[-2] == 1
  all_cols = a.shape[-1] in (1, size)
  if all_rows and all_cols:
    return a
  if all_rows:
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis=a.ndim - 1)
  if all_cols:
    return jnp.take(a, rows, axis=a.ndim - 2)
  cols = start + jnp.arange(size, dtype=jnp.int32)
  return a[..., rows[:, None], cols[None, :]]


def _logits(qp, kp, start, valid, *, rows=None, kind, scale, mask, bias, is_causal, precision):
  """Logits `(B, K, G, t, s)` of `t` prepared query rows against `s` prepared key rows
  that start at key index `start`, and where they are kept (mask, causal, `valid`).

  `rows` holds the query indices of the `t` rows, None for all of them.
  """
  if kind == "scaled_dot":
    s = kernels.score(qp, kp, "scaled_dot", scale=scale, precision=precision)
  else:
    s = kernels.score(qp, kp, kind, precision=precision)
    if kind == "cosine":
      s = s * jnp.asarray(scale, s.dtype)
  size, t = s.shape[-1], s.shape[-2]
  keep = valid[None, None, None, None, :]
  if bias is not None:
    s = s + _window(bias, rows, start, size).astype(s.dtype)
    # A -inf bias is a mask written additively: treat it as one, so that a row it
    # hides entirely gives zeros in the dense form, as in the blocked form.
    keep = keep & (s != -jnp.inf)
  if mask is not None:
    keep = keep & _window(mask, rows, start, size)
  if is_causal:
    # jax.nn's convention: query i sees keys 0..i (top-left aligned when T != S).
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (t, size), 1)
    if rows is None:
      rows = jax.lax.broadcasted_iota(jnp.int32, (t, 1), 0)
    else:
      rows = rows[:, None]
    keep = keep & (cols <= rows)[None, None, None]
  return s, jnp.broadcast_to(keep, s.shape)


def _prepare(q, k, kind):
  return kernels.prepare(q, kind), kernels.prepare(k, kind)


def _dense_weights(qp, kp, **opts):
  """Softmax weights `(B, K, G, T, S)` in float32; rows with no visible key are zero."""
  s_len = kp.rows.shape[-2]
  s, keep = _logits(qp, kp, jnp.int32(0), jnp.ones((s_len,), bool), **opts)
  w = jax.nn.softmax(jnp.where(keep, s, large_negative(s.dtype)), axis=-1)
  # jax.nn would average all values for such rows; zero is what "nothing to attend
  # to" should give, and `where` also zeroes the gradient flowing into them.
  return jnp.where(jnp.any(keep, axis=-1, keepdims=True), w, 0.0)


def _online_softmax_step(qp, rows, *, value_dtype, precision, **opts):
  """The `block_scan` step: folds one key/value block into (max, denominator, sum)."""

  def step(carry, block, start, valid):
    m, l, acc = carry
    kb, vb = block
    s, keep = _logits(qp, kb, start, valid, rows=rows, precision=precision, **opts)
    # The output does not depend on the shift, so its gradient is exactly zero: stop
    # it, and max's subgradient never enters the backward pass.
    m_new = jax.lax.stop_gradient(
        jnp.maximum(m, jnp.max(jnp.where(keep, s, -jnp.inf), axis=-1)))
    # -inf while no key has been visible yet; shift by 0 then (l and acc are 0).
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    # Masked logits go to -inf *before* exp: exp(-inf) = 0 has derivative 0, whereas
    # masking after exp would leak 0 * inf = NaN into the gradient.
    p = jnp.exp(jnp.where(keep, s - shift[..., None], -jnp.inf))
    alpha = jnp.exp(m - shift)
    pv = jnp.matmul(p.astype(value_dtype), vb, precision=precision,
                    preferred_element_type=acc.dtype)
    return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

  return step


def _blocked(qp, kp, v, *, block_size, query_block_size, precision, **opts):
  """Output `(B, K, G, T, Hv)` in the accumulation dtype, query block by key block.

  `block_map` takes query blocks one at a time, each folding every key/value block in
  with `block_scan`; temporaries are `(query_block, block)` per head. Each query block is
  checkpointed, so the backward pass keeps only one query block's per-key-block
  carries at a time and the gradient's temporaries stay O((T + S) H) too.
  """
  acc_dtype = kernels.accum_dtype(qp.rows.dtype)
  hv = v.shape[-1]

  def query_block(xs):
    qb, rows = xs
    step = _online_softmax_step(qb, rows[0, 0, 0], value_dtype=v.dtype, precision=precision,
                                **opts)
    shape = qb.rows.shape[:-1]
    init = (jnp.full(shape, -jnp.inf, acc_dtype), jnp.zeros(shape, acc_dtype),
            jnp.zeros(shape + (hv,), acc_dtype))
    # Axis 3 is S for the key rows, their aux and the values alike. `pad_tail=False`
    # slices blocks in place, so `start` always indexes real key columns and the mask
    # and bias can be cut at it directly.
    _, l, acc = blockscan.block_scan(step, init, (kp, v), block_size=block_size, axis=3,
                                     pad_tail=False)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]  # l == 0 only where acc == 0

  t = qp.rows.shape[3]
  rows = jnp.arange(t, dtype=jnp.int32)[None, None, None]  # (1, 1, 1, T): T on axis 3
  return blockscan.block_map(jax.checkpoint(query_block), (qp, rows),
                             block_size=query_block_size, axis=3)


@functools.partial(jax.jit, static_argnames=("kind", "is_causal", "precision", "output"))
def _scores(query, key, mask, bias, scale, *, kind, is_causal, precision, output):
  b, t, n, _ = query.shape
  s_len = key.shape[1]
  q, k, _, mask, bias = _grouped(query, key, None, mask, bias, key.shape[2])
  qp, kp = _prepare(q, k, kind)
  opts = dict(kind=kind, scale=scale, mask=mask, bias=bias, is_causal=is_causal,
              precision=precision)
  if output == "weights":
    out = _dense_weights(qp, kp, **opts).astype(query.dtype)
  else:
    s, keep = _logits(qp, kp, jnp.int32(0), jnp.ones((s_len,), bool), **opts)
    out = jnp.where(keep, s, large_negative(s.dtype))
  return jnp.reshape(out, (b, n, t, s_len))


@functools.partial(jax.jit, static_argnames=("kind", "is_causal", "block_size",
                                             "query_block_size", "precision"))
def _attention(query, key, value, mask, bias, scale, *, kind, is_causal, block_size,
               query_block_size, precision):
  b, t, n, _ = query.shape
  hv = value.shape[-1]
  q, k, v, mask, bias = _grouped(query, key, value, mask, bias, key.shape[2])
  qp, kp = _prepare(q, k, kind)
  opts = dict(kind=kind, scale=scale, mask=mask, bias=bias, is_causal=is_causal)
  if block_size is None:
    w = _dense_weights(qp, kp, precision=precision, **opts)
    out = jnp.matmul(w.astype(v.dtype), v, precision=precision,
                     preferred_element_type=kernels.accum_dtype(query.dtype))
  else:
    out = _blocked(qp, kp, v, block_size=block_size, query_block_size=query_block_size,
                   precision=precision, **opts)
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).astype(query.dtype)
  return jnp.reshape(out, (b, t, n, hv))


def _setup(query, key, value, kind, scale, mask, bias, is_causal):
  check_kind(kind)
  validation.check_bool(is_causal, "is_causal")
  query, key, value, batched = _inputs(query, key, value)
  if not batched:
    query, key = query[None], key[None]
    value = None if value is None else value[None]
  b, t, n, h = query.shape
  target = (b, n, t, key.shape[1])
  mask = _logit_array(mask, "mask", target=target, batched=batched)
  bias = _logit_array(bias, "bias", target=target, batched=batched)
  scale = _scale(kind, scale)
  if kind == "cosine" and scale is None:
    scale = default_cosine_scale(h)
  return query, key, value, mask, bias, scale, batched


# ---------------------------------------------------------------------------------------
# Public API.

_SHARED_ARGS = """\
    kind: how logits are made from query and key rows:
      `"scaled_dot"`: :math:`c\\, q \\cdot k` with :math:`c = 1/\\sqrt{H}` by default
      (Vaswani et al.), the same as `jax.nn.dot_product_attention`;
      `"dot"`: the raw :math:`q \\cdot k`, magnitude-sensitive and unscaled;
      `"cosine"`: :math:`c \\cos(q, k)`, logits bounded by `c`, which acts as an
      inverse temperature; :math:`c = \\sqrt{H}` by default (see
      `default_cosine_scale`). A zero query or key row has cosine 0 with everything.
    scale: :math:`c` for `"scaled_dot"` and `"cosine"`; a Python or traced scalar.
      Passing it with `"dot"` is an error.
    mask: optional boolean array broadcastable to `(B, N, T, S)` (`(N, T, S)` for
      unbatched inputs); True = attend.
    is_causal: if True, query `i` attends only to keys `j <= i`.
    bias: optional array broadcastable to `(B, N, T, S)`, added to the logits before
      masking; entries of -inf mask their logits as `mask=False` does.
    precision: `jax.lax.Precision` for the matmuls."""


def attention_scores(query: ArrayLike, key: ArrayLike, *, kind: Kind = "scaled_dot",
                     scale: float | jax.Array | None = None, mask: ArrayLike | None = None,
                     is_causal: bool = False, bias: ArrayLike | None = None,
                     precision=None) -> jax.Array:
  r"""Attention logits of every query against every key, per head.

  .. math:: s_{bntj} = \mathrm{sim}(q_{btn}, k_{bj,\lfloor n/G \rfloor}) + \beta_{bntj},
     \quad s_{bntj} = -0.7\, f_{\max} \text{ where masked}

  with `sim` the kernel picked by `kind`, :math:`G = N/K` and
  :math:`f_{\max}` the float32 maximum (the finite "large negative" of
  `jax.nn.dot_product_attention`).

  Args:
    query: `(B, T, N, H)` array, or unbatched `(T, N, H)`.
    key: `(B, S, K, H)` array, or unbatched `(S, K, H)`; `N` must be a multiple of `K`
      (`K < N` is grouped-query attention, `K = 1` multi-query).
{args}

  Returns:
    `(B, N, T, S)` (or `(N, T, S)`) logits in float32 (float64 for float64 inputs),
    the dtype attention accumulates in whatever the input dtype; masked entries hold
    the large negative, which float16 could not represent.

  Raises:
    TypeError: for complex or non-numeric inputs, or a non-boolean mask.
    ValueError: for wrong ranks, mismatched batch or head dims, `N` not a multiple of
      `K`, a mask or bias that does not broadcast, or an unknown `kind`.

  References:
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
    Henry et al., "Query-Key Normalization for Transformers", Findings of EMNLP 2020.
    Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022.
    Loshchilov et al., "nGPT: Normalized Transformer with Representation Learning on
    the Hypersphere", ICLR 2025.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> q = jnp.array([[[0.91, 0.38]]])                  # (T=1, N=1, H=2)
    >>> k = jnp.array([[[-0.76, 0.75]], [[0.91, 0.38]]])  # (S=2, K=1, H=2)
    >>> jaxsim.attention_scores(q, k, kind="dot")
    Array([[[-0.4066...,  0.9725...]]], dtype=float32)
  """
  query, key, _, mask, bias, scale, batched = _setup(query, key, None, kind, scale, mask,
                                                     bias, is_causal)
  out = _scores(query, key, mask, bias, scale, kind=kind, is_causal=bool(is_causal),
                precision=precision, output="scores")
  return out if batched else out[0]


def attention_weights(query: ArrayLike, key: ArrayLike, *, kind: Kind = "scaled_dot",
                      scale: float | jax.Array | None = None, mask: ArrayLike | None = None,
                      is_causal: bool = False, bias: ArrayLike | None = None,
                      precision=None) -> jax.Array:
  r"""Attention weights: the softmax over keys of `attention_scores`.

  .. math:: w_{bntj} = \frac{\exp s_{bntj}}{\sum_{j'} \exp s_{bntj'}}

  The softmax is taken in float32. A query row whose mask removes every key gets all-
  zero weights (and zero gradients), where `jax.nn.dot_product_attention` would spread
  its weight uniformly over the masked keys.

  Args:
    query: `(B, T, N, H)` array, or unbatched `(T, N, H)`.
    key: `(B, S, K, H)` array, or unbatched `(S, K, H)`; `N` a multiple of `K`.
{args}

  Returns:
    `(B, N, T, S)` (or `(N, T, S)`) weights in the inputs' floating dtype; each row sums
    to 1, or is all zero where nothing is visible.

  Raises:
    TypeError, ValueError: as `attention_scores`.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> q = jnp.ones((1, 1, 4))                    # (T=1, N=1, H=4)
    >>> k = jnp.array([[[1., 1, 1, 1]], [[2., 2, 2, 2]]])
    >>> jaxsim.attention_weights(q, k, kind="cosine")  # same direction: equal weights
    Array([[[0.5, 0.5]]], dtype=float32)
  """
  query, key, _, mask, bias, scale, batched = _setup(query, key, None, kind, scale, mask,
                                                     bias, is_causal)
  out = _scores(query, key, mask, bias, scale, kind=kind, is_causal=bool(is_causal),
                precision=precision, output="weights")
  return out if batched else out[0]


def attention(query: ArrayLike, key: ArrayLike, value: ArrayLike, *, kind: Kind = "scaled_dot",
              scale: float | jax.Array | None = None, mask: ArrayLike | None = None,
              is_causal: bool = False, bias: ArrayLike | None = None,
              block_size: int | None = None, query_block_size: int | None = None,
              precision=None) -> jax.Array:
  r"""Multi-head attention with dot, scaled-dot or cosine logits, dense or blocked.

  .. math:: o_{btn} = \sum_j w_{bntj}\, v_{bj,\lfloor n/G \rfloor}

  with the weights of `attention_weights`. For `kind="scaled_dot"` this is
  `jax.nn.dot_product_attention` (same layout, mask, bias, causal and grouped-query
  semantics), except that a query row whose mask removes every key outputs zeros
  (with finite, zero gradients) instead of the mean of all values.

  With `block_size`, keys and values are streamed `block_size` rows at a time through
  `blockscan.block_scan` with an online softmax: a running max `m`, denominator `l`
  and weighted sum `a` per query row, updated per block as

  .. math:: m' = \max(m, \max_j s_j),\quad l' = e^{m - m'} l + \sum_j e^{s_j - m'},
     \quad a' = e^{m - m'} a + \sum_j e^{s_j - m'} v_j

  and :math:`o = a / l`. Queries are taken `query_block_size` rows at a time, so
  the logits held at once are `(B, N, query_block_size, block_size)` instead of
  `(B, N, T, S)`, and what remains is O((T + S) N H); every block is recomputed in the
  backward pass, so the gradient's temporaries are O((T + S) N H) too. Values and
  gradients equal the dense form's up to rounding. On a CPU the dense form is usually
  faster while its `T x S` temporaries fit; the blocked form is for when they do not.

  Args:
    query: `(B, T, N, H)` array, or unbatched `(T, N, H)`.
    key: `(B, S, K, H)` array, or unbatched `(S, K, H)`; `N` a multiple of `K`.
    value: `(B, S, K, Hv)` array (`(S, K, Hv)` unbatched); usually `Hv = H`.
{args}
    block_size: key/value rows per block; None for the dense form. Any positive int
      (it need not divide `S`).
    query_block_size: query rows per block of the blocked form (default: `block_size`
      on CPU; on GPU and TPU enough rows for 2**20 logits a head, see
      `jaxsim._src.defaults`; it need not divide `T`). Only with `block_size`.

  Returns:
    `(B, T, N, Hv)` (or `(T, N, Hv)`) output in the inputs' floating dtype; logits,
    softmax and the weighted sums accumulate in float32 for float16/bfloat16 inputs.

  Raises:
    TypeError, ValueError: as `attention_scores`, and a ValueError for a
    non-positive `block_size` or `query_block_size`, a `query_block_size` without
    `block_size`, or a `value` whose shape does not match `key`.

  References:
    Rabe and Staats, "Self-attention Does Not Need O(n^2) Memory", 2021.
    Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
    IO-Awareness", NeurIPS 2022.
    Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxsim
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 16))
    >>> dense = jaxsim.attention(q, k, v, is_causal=True)
    >>> blocked = jaxsim.attention(q, k, v, is_causal=True, block_size=24)
    >>> bool(jnp.allclose(dense, blocked, atol=1e-5))
    True
  """
  block_size, query_block_size = validation.block_sizes(block_size, query_block_size)
  if block_size is None and query_block_size is not None:
    raise ValueError(f"`query_block_size={query_block_size}` needs `block_size` (the blocked "
                     "form); the dense form takes no block sizes.")
  if block_size is not None and query_block_size is None:
    query_block_size = defaults.attention_query_block(block_size)
  query, key, value, mask, bias, scale, batched = _setup(query, key, value, kind, scale, mask,
                                                         bias, is_causal)
  if key.shape[1] == 0:
    block_size = query_block_size = None  # No keys: nothing to stream; zeros either way.
  out = _attention(query, key, value, mask, bias, scale, kind=kind, is_causal=bool(is_causal),
                   block_size=block_size, query_block_size=query_block_size or block_size,
                   precision=precision)
  return out if batched else out[0]


for _fn in (attention_scores, attention_weights, attention):
  _fn.__doc__ = _fn.__doc__.replace("{args}", _SHARED_ARGS)
del _fn
