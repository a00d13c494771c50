"""Attention as a similarity kernel plus a softmax: a drop-in for `jax.nn.dot_product_attention`.

The signature, layout, masking and outputs are those of `jax.nn.dot_product_attention`,
with jax's shape legend::

  B = batch size            T = query length (target)     S = key/value length (source)
  N = query heads           K = key/value heads           H = head dim
  G = N // K (query heads per key/value head)

Queries are `(B, T, N, H)`, keys and values `(B, S, K, H)` (unbatched: drop `B`), a
boolean `mask` (True = attend) and an additive `bias` broadcast to `(B, N, T, S)`, and
`is_causal`, `query_seq_lengths`, `key_value_seq_lengths` and `local_window_size` add
positional masks. Every call that `jax.nn.dot_product_attention` accepts gives its
result, with one documented exception: a query row that no key is visible to outputs
zeros (jax.nn gives the mean of all values there).

The logits of every head are pairwise scores between its query and key rows: each row
set is prepared once (`kernels.prepare`: unit rows for cosine, the raw rows otherwise)
and `kernels.score` makes the logits, so cosine attention is scaled-dot attention on
unit rows. With `implementation="xla"` or `"cudnn"` the prepared rows go to
`jax.nn.dot_product_attention` itself, and with it to cuDNN's fused kernel on a GPU.

jaxsim's own forms are dense (the `(B, N, T, S)` weights at once) or blocked. The
blocked form is a client of the shared block loop: `blockscan.block_map` takes query
blocks one at a time, and for each, `blockscan.block_scan` folds in key/value blocks
with an online softmax (running max, denominator and weighted sum of values). A block
that the causal, local-window or sequence-length masks hide entirely is skipped by a
`lax.cond`, in the forward pass and, since the cond is differentiated as a cond, in the
backward pass too. The weights stay float32 through the product with the values, so
bf16/fp16 gradients are as accurate as the dense form's.

Internally heads are laid out grouped: queries `(B, K, G, T, H)` against keys
`(B, K, 1, S, H)`, so key heads broadcast over their query group in the matmul instead
of being repeated.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsim._src import blockscan, defaults, kernels, sharding, validation

Metric = Literal["dot", "scaled_dot", "cosine"]
METRICS: tuple[str, ...] = ("dot", "scaled_dot", "cosine")
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn")


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
  return metric


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


def _common_dtype(arrays) -> list:
  """Casts `arrays` to one canonical floating dtype.

  Canonical (float64 becomes float32 unless x64 is on) *before* any cast is asked for,
  so that float64 numpy inputs, or float32 mixed with float64, never make jax warn
  about an explicitly requested float64. Mixed inputs widen as numpy would, the one
  place that promotes on purpose (so it also runs under strict dtype promotion).
  """
  dtypes = [jax.dtypes.canonicalize_dtype(a.dtype) for a in arrays]
  with jax.numpy_dtype_promotion("standard"):
    dtype = jnp.result_type(*dtypes)
  return [a if isinstance(a, jax.Array) and a.dtype == dtype else jnp.asarray(a, dtype)
          for a in arrays]


def _check_qkv(query, key, value, *, need_value: bool):
  """Validates query/key(/value); returns them 4-D, of one dtype, and `batched`."""
  query = validation.as_float_array(query, "query")
  key = validation.as_float_array(key, "key")
  validation.check_rank(query, "query", min_rank=3, max_rank=4)
  if key.ndim != query.ndim:
    raise ValueError(
        "`key` must have the same rank as `query` ((B, S, K, H) with (B, T, N, H), or "
        f"(S, K, H) with (T, N, H)), got query.shape={query.shape}, key.shape={key.shape}.")
  arrays = [query, key]
  if need_value:
    if value is None:
      raise TypeError(
          "`value` must be an array of shape (B, S, K, H) (or (S, K, H)), got None; for "
          "the attention weights alone, call `attention_weights(query, key)`.")
    value = validation.as_float_array(value, "value")
    if value.ndim != key.ndim or value.shape[:-1] != key.shape[:-1]:
      raise ValueError(
          "`value` must match `key` in every axis but the last, got "
          f"key.shape={key.shape}, value.shape={value.shape}.")
    arrays.append(value)
  batched = query.ndim == 4
  if not batched:
    arrays = [a[None] for a in arrays]
  q4, k4 = arrays[0].shape, arrays[1].shape
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
  arrays = _common_dtype(arrays)
  if not need_value:
    arrays.append(None)
  return (*arrays, batched)


def _logit_array(arr, name, *, target, batched):
  """Checks a mask or bias against `target = (B, N, T, S)`; returns it 4-D, or None."""
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
    arr = _common_dtype([arr])[0]
  want = target if batched else target[1:]
  form = "(B, N, T, S)" if batched else "(N, T, S)"
  if arr.ndim > 4:
    raise ValueError(f"`{name}` must have rank <= 4, got shape {arr.shape}.")
  shape = (1,) * (4 - arr.ndim) + tuple(arr.shape)
  if any(got not in (1, full) for got, full in zip(shape, target, strict=True)):
    raise ValueError(
        f"`{name}` of shape {arr.shape} does not broadcast to {form} = {want}.")
  return jnp.reshape(arr, shape)


def _seq_lengths(lengths, name, *, b, batched):
  """`(B,)` int32 lengths (a scalar, or shape (1,), for unbatched inputs), or None."""
  if lengths is None:
    return None
  if not isinstance(lengths, (jax.Array, np.ndarray)):
    lengths = np.asarray(lengths)
  if lengths.dtype.kind not in "iu":
    raise TypeError(f"`{name}` must be an integer array of shape (B,), got dtype "
                    f"{lengths.dtype}.")
  shape = lengths.shape
  if not batched and lengths.ndim == 0:
    lengths = jnp.reshape(lengths, (1,))
  if lengths.shape != (b,):
    form = f"(B,) = ({b},)" if batched else "() or (1,) for unbatched inputs"
    raise ValueError(f"`{name}` must have shape {form}, got shape {shape}.")
  return jnp.asarray(lengths, jnp.int32)


def _window_size(window) -> tuple[int, int] | None:
  is_int = lambda w: isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_))
  if window is None:
    return None
  if is_int(window):
    return int(window), int(window)
  if isinstance(window, (tuple, list)) and len(window) == 2 and all(map(is_int, window)):
    return int(window[0]), int(window[1])
  raise TypeError("`local_window_size` must be an int or a (left, right) pair of ints, got "
                  f"{window!r}.")


def _scale(metric, scale, h):
  if scale is None:
    return {"dot": 1.0, "scaled_dot": kernels.default_scale(h),
            "cosine": default_cosine_scale(h)}[metric]
  if metric == "dot":
    raise ValueError("`scale` has no effect with metric='dot' (unscaled logits); use "
                     "metric='scaled_dot' for a custom scale.")
  scale = validation.check_scalar(scale, "scale")
  # Python numbers reach the jitted core as one weak-typed float: a new value, int or
  # float, reuses the compiled program.
  return float(scale) if isinstance(scale, (int, float, np.number)) else scale


class _Call(NamedTuple):
  """One call's checked inputs, 4-D: what the public functions share."""

  query: jax.Array  # (B, T, N, H)
  key: jax.Array  # (B, S, K, H)
  value: jax.Array | None  # (B, S, K, Hv)
  bias: jax.Array | None  # (B|1, N|1, T|1, S|1)
  mask: jax.Array | None  # same, bool
  scale: Any  # Python number or scalar array
  q_len: jax.Array | None  # (B,) int32
  kv_len: jax.Array | None  # (B,) int32
  window: tuple[int, int] | None
  batched: bool


def _check_call(query, key, value, bias, mask, *, scale, is_causal, query_seq_lengths,
                key_value_seq_lengths, local_window_size, metric, need_value) -> _Call:
  check_metric(metric)
  validation.check_bool(is_causal, "is_causal")
  window = _window_size(local_window_size)
  query, key, value, batched = _check_qkv(query, key, value, need_value=need_value)
  b, t, n, h = query.shape
  target = (b, n, t, key.shape[1])
  return _Call(
      query, key, value,
      bias=_logit_array(bias, "bias", target=target, batched=batched),
      mask=_logit_array(mask, "mask", target=target, batched=batched),
      scale=_scale(metric, scale, h),
      q_len=_seq_lengths(query_seq_lengths, "query_seq_lengths", b=b, batched=batched),
      kv_len=_seq_lengths(key_value_seq_lengths, "key_value_seq_lengths", b=b,
                          batched=batched),
      window=window, batched=batched)


# ---------------------------------------------------------------------------------------
# The computation, on the grouped layout (B, K, G, T, H) x (B, K, 1, S, H).


class _Logits(NamedTuple):
  """How logits are made and which are kept: everything but the query and key rows."""

  metric: str
  scale: jax.Array
  mask: jax.Array | None  # (B|1, K|1, G|1, T|1, S|1)
  bias: jax.Array | None  # same
  is_causal: bool
  window: tuple[int, int] | None
  q_len: jax.Array | None  # (B,)
  kv_len: jax.Array | None  # (B,)
  precision: Any


def _grouped(query, key, value, mask, bias, num_kv_heads):
  """BTNH -> (B, K, G, T, H); BSKH -> (B, K, 1, S, H); (B, N, T, S) -> (B, K|1, G|1, T, S)."""
  b, t, n, h = query.shape
  g = n // num_kv_heads
  q = jnp.transpose(jnp.reshape(query, (b, t, num_kv_heads, g, h)), (0, 2, 3, 1, 4))
  kv = lambda a: None if a is None else jnp.transpose(a, (0, 2, 1, 3))[:, :, None]

  def heads(a):
    if a is None:
      return None
    if a.shape[1] == 1:
      return a[:, :, None]
    return jnp.reshape(a, (a.shape[0], num_kv_heads, g) + a.shape[2:])

  return q, kv(key), kv(value), heads(mask), heads(bias)


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


def _logits(qp, kp, spec: _Logits, *, rows=None, start=0, valid=None):
  """Logits `(B, K, G, t, s)` of `t` prepared query rows against `s` prepared key rows
  starting at key index `start`, and where they are kept.

  `rows` holds the `(t,)` query indices, None for all `T`; `valid` is `(s,)`, False on
  key rows the block loop marks as already seen, None for all valid. A logit is kept
  where the mask, the causal, window and length masks and `valid` allow it, and the
  bias is not -inf.
  """
  s = kernels.score(qp, kp, "cosine" if spec.metric == "cosine" else "dot",
                    precision=spec.precision)
  if spec.metric != "dot":
    # Scaled after the matmul, in float32, as jax.nn does: no rounding of q * scale.
    s = s * jnp.asarray(spec.scale, s.dtype)
  t, size = s.shape[-2:]
  # Every operand rank 5, (B, K, G, t, s) or size 1: user code may run with
  # jax_numpy_rank_promotion="raise".
  keep = jnp.ones((1,) * 5, bool) if valid is None else jnp.reshape(valid, (1, 1, 1, 1, size))
  if spec.bias is not None:
    s = s + _window(spec.bias, rows, start, size).astype(s.dtype)
    # A -inf bias is a mask written additively: treat it as one, so that a row it
    # hides entirely gives zeros, as a row the mask hides does.
    keep = keep & (s != -jnp.inf)
  if spec.mask is not None:
    keep = keep & _window(spec.mask, rows, start, size)
  row = (jax.lax.broadcasted_iota(jnp.int32, (t, 1), 0) if rows is None else rows[:, None])
  col = start + jax.lax.broadcasted_iota(jnp.int32, (1, size), 1)
  positional = []  # (t, s), or (B, t, s) for the lengths
  if spec.is_causal:
    # jax.nn's convention: query i sees keys 0..i (top-left aligned when T != S).
    positional.append(col <= row)
  if spec.window is not None:
    left, right = spec.window
    positional += [col >= row - left, col <= row + right]
  if spec.q_len is not None:
    positional.append(row[None] < spec.q_len[:, None, None])
  if spec.kv_len is not None:
    positional.append(col[None] < spec.kv_len[:, None, None])
  for m in positional:
    keep = keep & (m[:, None, None] if m.ndim == 3 else m[None, None, None])
  return s, jnp.broadcast_to(keep, s.shape)


def _block_visibility(spec: _Logits, first, last, start, size):
  """Which positional masks leave key block `[start, start + size)` to query rows
  `[first, last]`: 0 if they hide it from every row (skip it), 2 if they hide none of
  it (no positional mask to apply), 1 otherwise; None when no positional mask is set."""
  end = start + size - 1
  some, every = [], []  # some row sees some key / every row sees every key
  if spec.is_causal:
    some.append(start <= last)
    every.append(end <= first)
  if spec.window is not None:
    left, right = spec.window
    some += [end >= first - left, start <= last + right]
    every += [start >= last - left, end <= first + right]
  if spec.kv_len is not None:
    some.append(start < jnp.max(spec.kv_len))
    every.append(end < jnp.min(spec.kv_len))
  if spec.q_len is not None:
    some.append(first < jnp.max(spec.q_len))
    every.append(last < jnp.min(spec.q_len))
  if not some:
    return None
  all_of = lambda conds: functools.reduce(jnp.logical_and, conds)
  return jnp.where(all_of(some), jnp.where(all_of(every), 2, 1), 0)


def _dense(qp, kp, spec: _Logits):
  """Masked logits `(B, K, G, T, S)` (masked entries at the large negative, as jax.nn)
  and the softmax weights in float32, zero on rows with no visible key."""
  s, keep = _logits(qp, kp, spec)
  padded = jnp.where(keep, s, large_negative(s.dtype))
  w = jax.nn.softmax(padded, axis=-1)
  # jax.nn spreads such rows over all values; zero is what "nothing to attend to"
  # should give, and `where` also zeroes the gradient flowing into them.
  return padded, jnp.where(jnp.any(keep, axis=-1, keepdims=True), w, 0.0)


def _online_softmax_step(qp, rows, spec: _Logits, *, t):
  """The `block_scan` step: folds one key/value block into (max, denominator, sum)."""
  first = rows[0]
  last = jnp.minimum(first + rows.shape[0] - 1, t - 1)  # query blocks pad at the end

  def update(carry, kb, vb, start, valid, spec):
    m, l, acc = carry
    s, keep = _logits(qp, kb, spec, rows=rows, start=start, valid=valid)
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
    # p stays float32 through the product: rounded to bf16, its gradient would no
    # longer cancel against the float32 denominator's, and bf16 gradients would be
    # several times less accurate than the dense form's.
    pv = jnp.matmul(p, vb.astype(p.dtype), precision=spec.precision)
    return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

  unmasked = spec._replace(is_causal=False, window=None, q_len=None, kv_len=None)

  def step(carry, block, start, valid):
    kb, vb = block
    visibility = _block_visibility(spec, first, last, start, valid.shape[0])
    if visibility is None:
      return update(carry, kb, vb, start, valid, spec)
    # `switch` runs one branch (a `select` only under vmap), and its transpose is a
    # switch too: hidden blocks cost nothing forward or backward, and blocks inside
    # every row's window skip building the positional masks.
    return jax.lax.switch(visibility, [
        lambda c: c,
        lambda c: update(c, kb, vb, start, valid, spec),
        lambda c: update(c, kb, vb, start, valid, unmasked),
    ], carry)

  return step


def _blocked(qp, kp, v, spec: _Logits, *, block_size, query_block_size):
  """Output `(B, K, G, T, Hv)` and logsumexp `(B, K, G, T)` in the accumulation dtype.

  `block_map` takes query blocks one at a time, each folding every key/value block in
  with `block_scan`; temporaries are `(query_block, block)` per head. Each query block is
  checkpointed, so the backward pass keeps only one query block's per-key-block
  carries at a time and the gradient's temporaries stay O((T + S) H) too.
  """
  acc_dtype = kernels.accum_dtype(qp.rows.dtype)
  t, hv = qp.rows.shape[3], v.shape[-1]

  def query_block(xs):
    qb, rows = xs
    step = _online_softmax_step(qb, rows[0, 0, 0], spec, t=t)
    shape = qb.rows.shape[:-1]
    init = (jnp.full(shape, -jnp.inf, acc_dtype), jnp.zeros(shape, acc_dtype),
            jnp.zeros(shape + (hv,), acc_dtype))
    # Axis 3 is S for the key rows, their aux and the values alike. `pad_tail=False`
    # slices blocks in place, so `start` always indexes real key columns and the mask
    # and bias can be cut at it directly.
    m, l, acc = blockscan.block_scan(step, init, (kp, v), block_size=block_size, axis=3,
                                     pad_tail=False)
    seen = l > 0  # l >= 1 wherever a key was visible (the max contributes exp(0))
    l = jnp.where(seen, l, 1.0)
    return acc / l[..., None], jnp.where(seen, m + jnp.log(l), large_negative(acc_dtype))

  rows = jnp.arange(t, dtype=jnp.int32)[None, None, None]  # (1, 1, 1, T): T on axis 3
  return blockscan.block_map(jax.checkpoint(query_block), (qp, rows),
                             block_size=query_block_size, axis=3)


_STATIC = ("metric", "is_causal", "window", "precision")


@functools.partial(jax.jit, static_argnames=_STATIC + ("weights",))
def _scores(query, key, bias, mask, scale, q_len, kv_len, *, metric, is_causal, window,
            precision, weights):
  b, t, n, _ = query.shape
  q, k, _, mask, bias = _grouped(query, key, None, mask, bias, key.shape[2])
  spec = _Logits(metric, scale, mask, bias, is_causal, window, q_len, kv_len, precision)
  padded, w = _dense(kernels.prepare(q, metric), kernels.prepare(k, metric), spec)
  out = w.astype(query.dtype) if weights else padded
  return jnp.reshape(out, (b, n, t, key.shape[1]))


@functools.partial(jax.jit, static_argnames=_STATIC + ("block_size", "query_block_size"))
def _attention(query, key, value, bias, mask, scale, q_len, kv_len, *, metric, is_causal,
               window, precision, block_size, query_block_size):
  b, t, n, _ = query.shape
  hv = value.shape[-1]
  q, k, v, mask, bias = _grouped(query, key, value, mask, bias, key.shape[2])
  spec = _Logits(metric, scale, mask, bias, is_causal, window, q_len, kv_len, precision)
  qp, kp = kernels.prepare(q, metric), kernels.prepare(k, metric)
  if block_size is None:
    padded, w = _dense(qp, kp, spec)
    # As jax.nn: the weights are rounded to the value dtype for the product.
    out = jnp.matmul(w.astype(v.dtype), v, precision=precision,
                     preferred_element_type=kernels.accum_dtype(v.dtype))
    lse = jax.nn.logsumexp(padded, axis=-1)
  else:
    out, lse = _blocked(qp, kp, v, spec, block_size=block_size,
                        query_block_size=query_block_size)
  out = jnp.reshape(jnp.transpose(out, (0, 3, 1, 2, 4)), (b, t, n, hv)).astype(query.dtype)
  lse = jnp.reshape(jnp.transpose(lse, (0, 3, 1, 2)), (b, t, n)).astype(key.dtype)
  return out, jax.lax.stop_gradient(lse)


@functools.partial(jax.jit, static_argnames=("metric", "is_causal", "window", "implementation",
                                             "static_scale"))
def _jax_nn(query, key, value, bias, mask, scale, q_len, kv_len, *, metric, is_causal, window,
            implementation, static_scale):
  """The prepared rows through `jax.nn.dot_product_attention`, fully masked rows zeroed."""
  q, k = kernels.prepare(query, metric).rows, kernels.prepare(key, metric).rows
  if static_scale is None and implementation == "cudnn":
    # cuDNN takes the scale as a compile-time constant; a traced (learned) scale is
    # folded into the query rows instead, so it can still vary and be differentiated.
    q = (q.astype(kernels.accum_dtype(q.dtype)) * scale).astype(q.dtype)
    scale = 1.0
  elif static_scale is not None:
    scale = static_scale
  if bias is not None:
    # The XLA path adds the bias to float32 logits (cast here, so that strict dtype
    # promotion holds); cuDNN wants the input dtype. A -inf bias becomes the large
    # negative: a row it hides entirely then gives zeros, not NaN.
    bias = bias.astype(kernels.accum_dtype(q.dtype) if implementation == "xla" else q.dtype)
    bias = jnp.where(bias == -jnp.inf, large_negative(bias.dtype), bias)
  # jax.nn widens bf16/fp16 logits to float32 implicitly, which strict dtype promotion
  # (user code may run under it) would refuse.
  with jax.numpy_dtype_promotion("standard"):
    out, lse = jax.nn.dot_product_attention(
        q, k, value, bias, mask, scale=scale, is_causal=is_causal, query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len, local_window_size=window,
        implementation=implementation, return_residual=True)
  # A row with no visible key has logsumexp = the large negative (+ log S); NaN rows
  # stay NaN.
  hidden = lse.astype(jnp.float32) <= 0.5 * large_negative(jnp.float32)
  return jnp.where(hidden[..., None], jnp.zeros((), out.dtype), out), lse


def _scores_or_weights(query, key, bias, mask, *, scale, is_causal, query_seq_lengths,
                       key_value_seq_lengths, local_window_size, metric, precision, weights):
  c = _check_call(query, key, None, bias, mask, scale=scale, is_causal=is_causal,
                  query_seq_lengths=query_seq_lengths,
                  key_value_seq_lengths=key_value_seq_lengths,
                  local_window_size=local_window_size, metric=metric, need_value=False)
  out = _scores(c.query, c.key, c.bias, c.mask, c.scale, c.q_len, c.kv_len, metric=metric,
                is_causal=bool(is_causal), window=c.window, precision=precision,
                weights=weights)
  return out if c.batched else out[0]


# ---------------------------------------------------------------------------------------
# Public API.


def attention_scores(query: ArrayLike, key: ArrayLike, bias: ArrayLike | None = None,
                     mask: ArrayLike | None = None, *,
                     scale: float | jax.Array | None = None, is_causal: bool = False,
                     query_seq_lengths: ArrayLike | None = None,
                     key_value_seq_lengths: ArrayLike | None = None,
                     local_window_size: int | tuple[int, int] | None = None,
                     metric: Metric = "scaled_dot", precision=None) -> jax.Array:
  r"""Attention logits of every query against every key, per head, as masked for the softmax.

  .. math:: s_{bntj} = c\,\mathrm{sim}(q_{btn}, k_{bj,\lfloor n/G \rfloor}) + \beta_{bntj},
     \quad s_{bntj} = -0.7\, f_{\max} \text{ where masked}

  with `sim` the dot product of the raw rows (`"dot"`, `"scaled_dot"`) or of the unit
  rows (`"cosine"`), :math:`c` the scale, :math:`\beta` the bias and :math:`f_{\max}` the
  float32 maximum: the finite "large negative" of `jax.nn.dot_product_attention`.
  Shapes use jax's legend: B batch, T query length, S key length, N query heads,
  K key/value heads (:math:`G = N / K`), H head dim.

  Args:
    query: `(B, T, N, H)` array, or unbatched `(T, N, H)`.
    key: `(B, S, K, H)` array, or unbatched `(S, K, H)`; `N` must be a multiple of `K`
      (`K < N` is grouped-query attention, `K = 1` multi-query).
    bias: optional array broadcastable to `(B, N, T, S)` (`(N, T, S)` unbatched), added
      to the logits before masking; an entry of -inf masks its logit as `mask=False`
      does.
    mask: optional boolean array broadcastable to `(B, N, T, S)`; True = attend.
    scale: :math:`c`, a Python or traced scalar (a new value does not recompile).
      Default :math:`1/\sqrt{H}` for `"scaled_dot"` (as jax.nn) and :math:`\sqrt{H}` for
      `"cosine"` (see `default_cosine_scale`); passing it with `"dot"` is an error.
    is_causal: if True, query `i` sees only keys `j <= i` (top-left aligned, as jax.nn).
    query_seq_lengths: optional `(B,)` integer array; query rows `i >= length` see
      nothing.
    key_value_seq_lengths: optional `(B,)` integer array; keys `j >= length` are hidden.
    local_window_size: optional `(left, right)`, or one int for both: query `i` sees
      keys `i - left <= j <= i + right`.
    metric: how logits are made from query and key rows, named as the kernels' `metric`:
      `"scaled_dot"` :math:`c\, q \cdot k` (Vaswani et al., and jax.nn);
      `"dot"` the raw :math:`q \cdot k`, magnitude-sensitive and unscaled;
      `"cosine"` :math:`c \cos(q, k)`, bounded by `c`, an inverse temperature. A zero
      query or key row has cosine 0 with everything.
    precision: `jax.lax.Precision` for the matmul.

  Returns:
    `(B, N, T, S)` (or `(N, T, S)`) logits in float32 (float64 for float64 inputs under
    x64), the dtype the softmax is taken in whatever the input dtype; masked entries
    hold the large negative, which float16 could not represent.

  Raises:
    TypeError: for complex or non-numeric inputs, a non-boolean mask, non-integer
      sequence lengths or a malformed `local_window_size`.
    ValueError: for wrong ranks, mismatched batch or head dims, `N` not a multiple of
      `K`, a mask or bias that does not broadcast, lengths not of shape `(B,)`, an
      unknown `metric`, or a `scale` with `"dot"`.

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
    >>> jaxsim.attention_scores(q, k, metric="dot")
    Array([[[-0.4066...,  0.9725...]]], dtype=float32)
  """
  return _scores_or_weights(query, key, bias, mask, scale=scale, is_causal=is_causal,
                            query_seq_lengths=query_seq_lengths,
                            key_value_seq_lengths=key_value_seq_lengths,
                            local_window_size=local_window_size, metric=metric,
                            precision=precision, weights=False)


def attention_weights(query: ArrayLike, key: ArrayLike, bias: ArrayLike | None = None,
                      mask: ArrayLike | None = None, *,
                      scale: float | jax.Array | None = None, is_causal: bool = False,
                      query_seq_lengths: ArrayLike | None = None,
                      key_value_seq_lengths: ArrayLike | None = None,
                      local_window_size: int | tuple[int, int] | None = None,
                      metric: Metric = "scaled_dot", precision=None) -> jax.Array:
  r"""Attention weights: the softmax over keys of `attention_scores`.

  .. math:: w_{bntj} = \frac{\exp s_{bntj}}{\sum_{j'} \exp s_{bntj'}}

  The softmax is taken in float32. A query row that no key is visible to (every key
  masked, or the row past its `query_seq_lengths`) gets all-zero weights and zero
  gradients, where `jax.nn.dot_product_attention` would spread its weight uniformly.
  Shapes use jax's legend: B batch, T query length, S key length, N query heads,
  K key/value heads, H head dim.

  Args:
    query: `(B, T, N, H)` array, or unbatched `(T, N, H)`.
    key: `(B, S, K, H)` array, or unbatched `(S, K, H)`; `N` a multiple of `K`.
    bias: optional array broadcastable to `(B, N, T, S)`, added to the logits; -inf
      entries mask their logits.
    mask: optional boolean array broadcastable to `(B, N, T, S)`; True = attend.
    scale: the logit scale, as in `attention_scores` (default :math:`1/\sqrt{H}` for
      `"scaled_dot"`, :math:`\sqrt{H}` for `"cosine"`, none for `"dot"`).
    is_causal: if True, query `i` sees only keys `j <= i`.
    query_seq_lengths: optional `(B,)` integers; query rows past them see nothing.
    key_value_seq_lengths: optional `(B,)` integers; keys past them are hidden.
    local_window_size: optional `(left, right)` or int: query `i` sees keys
      `i - left <= j <= i + right`.
    metric: `"scaled_dot"`, `"dot"` or `"cosine"`, as in `attention_scores`.
    precision: `jax.lax.Precision` for the matmul.

  Returns:
    `(B, N, T, S)` (or `(N, T, S)`) weights in the inputs' floating dtype; each row sums
    to 1, or is all zero where nothing is visible.

  Raises:
    TypeError, ValueError: as `attention_scores`.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> q = jnp.ones((1, 1, 4))                    # (T=1, N=1, H=4)
    >>> k = jnp.array([[[1., 1, 1, 1]], [[2., 2, 2, 2]]])
    >>> jaxsim.attention_weights(q, k, metric="cosine")  # same direction: equal weights
    Array([[[0.5, 0.5]]], dtype=float32)
  """
  return _scores_or_weights(query, key, bias, mask, scale=scale, is_causal=is_causal,
                            query_seq_lengths=query_seq_lengths,
                            key_value_seq_lengths=key_value_seq_lengths,
                            local_window_size=local_window_size, metric=metric,
                            precision=precision, weights=True)


def _like_query(query, *args, **kwargs) -> jax.sharding.PartitionSpec:
  """Where `attention`'s output lies under `Explicit` mesh axes: as the query's batch,
  token and head axes (`sharding.auto_axes`)."""
  del args, kwargs
  return jax.sharding.PartitionSpec(*sharding.spec_entries(query)[:-1], None)


@sharding.auto_axes(_like_query)
def attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
              bias: ArrayLike | None = None, mask: ArrayLike | None = None, *,
              scale: float | jax.Array | None = None, is_causal: bool = False,
              query_seq_lengths: ArrayLike | None = None,
              key_value_seq_lengths: ArrayLike | None = None,
              local_window_size: int | tuple[int, int] | None = None,
              return_residual: bool = False,
              implementation: Literal["xla", "cudnn"] | None = None,
              metric: Metric = "scaled_dot", block_size: int | None = None,
              query_block_size: int | None = None,
              precision=None) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Multi-head attention with scaled-dot, dot or cosine logits: `jax.nn.dot_product_attention`
  with a choice of logits and a blocked form.

  .. math:: o_{btn} = \sum_j w_{bntj}\, v_{bj,\lfloor n/G \rfloor}

  with the weights of `attention_weights`. Shapes use jax's legend: B batch, T query
  length, S key/value length, N query heads, K key/value heads (:math:`G = N / K`),
  H head dim. The arguments up to `implementation` are jax.nn's, with its meaning,
  and with `metric="scaled_dot"` (the default) the result is jax.nn's, except that a
  query row that no key is visible to outputs zeros, with zero gradients, where jax.nn
  outputs the mean of all values. Query rows past `query_seq_lengths` output zeros in
  both.

  With `block_size`, keys and values are streamed `block_size` rows at a time through
  `blockscan.block_scan` with an online softmax: a running max `m`, denominator `l`
  and weighted sum `a` per query row, updated per block as

  .. math:: m' = \max(m, \max_j s_j),\quad l' = e^{m - m'} l + \sum_j e^{s_j - m'},
     \quad a' = e^{m - m'} a + \sum_j e^{s_j - m'} v_j

  and :math:`o = a / l`, the weights kept in float32 throughout. Queries are taken
  `query_block_size` rows at a time, so the logits held at once are
  `(B, N, query_block_size, block_size)` instead of `(B, N, T, S)`; every block is
  recomputed in the backward pass, so the gradient's temporaries are O((T + S) N H)
  too. Blocks that `is_causal`, `local_window_size` or the sequence lengths hide
  entirely are skipped, forward and backward: a causal call costs about half an
  unmasked one. Values and gradients equal the dense form's up to rounding. On a CPU
  the dense form is usually faster while its `T x S` temporaries fit.

  Args:
    query: `(B, T, N, H)` array, or unbatched `(T, N, H)`.
    key: `(B, S, K, H)` array, or unbatched `(S, K, H)`; `N` a multiple of `K`
      (`K < N` is grouped-query attention, `K = 1` multi-query).
    value: `(B, S, K, Hv)` array (`(S, K, Hv)` unbatched); jax.nn needs `Hv = H`,
      jaxsim's own forms do not.
    bias: optional array broadcastable to `(B, N, T, S)` (`(N, T, S)` unbatched), added
      to the logits before masking; -inf entries mask their logits.
    mask: optional boolean array broadcastable to `(B, N, T, S)`; True = attend.
    scale: the logit scale :math:`c`, a Python or traced scalar (a new value does not
      recompile, except with `"cudnn"`, which compiles it in). Default
      :math:`1/\sqrt{H}` for `"scaled_dot"` and :math:`\sqrt{H}` for `"cosine"`; an
      error with `"dot"`.
    is_causal: if True, query `i` sees only keys `j <= i` (top-left aligned).
    query_seq_lengths: optional `(B,)` integer array; query rows `i >= length` output
      zeros.
    key_value_seq_lengths: optional `(B,)` integer array; keys `j >= length` are hidden.
    local_window_size: optional `(left, right)`, or one int for both: query `i` sees
      keys `i - left <= j <= i + right`.
    return_residual: also return the logsumexp of each query row's masked logits,
      `(B, T, N)` (or `(T, N)`) in the inputs' dtype, gradient stopped, as jax.nn: the
      residual that FlashAttention-2's backward pass and ring attention combine. A row
      with nothing visible has the large negative (-0.7 times the float32 maximum;
      -inf once rounded to float16).
    implementation: None for jaxsim's own forms; `"xla"` or `"cudnn"` to run the
      prepared rows (unit rows for `"cosine"`) through
      `jax.nn.dot_product_attention(implementation=...)`, whose fused cuDNN kernel
      then computes every metric on a GPU (float16/bfloat16 only, with its limits on
      shapes and masks). Fully masked rows still give zeros. Not with `block_size` or
      `precision`.
    metric: how logits are made, named as the kernels' `metric`: `"scaled_dot"`
      :math:`c\, q \cdot k` (jax.nn's); `"dot"` the raw :math:`q \cdot k`; `"cosine"`
      :math:`c\, \hat q \cdot \hat k` with unit rows, bounded by `c`, an inverse
      temperature; a zero row has cosine 0 with everything.
    block_size: key/value rows per block; None for the dense form. Any positive int (it
      need not divide `S`).
    query_block_size: query rows per block of the blocked form (default: `block_size`
      on CPU; on GPU and TPU enough rows for 2**20 logits a head, see
      `jaxsim._src.defaults`; it need not divide `T`). Only with `block_size`.
    precision: `jax.lax.Precision` for the matmuls of jaxsim's own forms.

  Returns:
    `(B, T, N, Hv)` (or `(T, N, Hv)`) output in the inputs' floating dtype, and with
    `return_residual` the `(output, logsumexp)` pair. Logits, softmax and the blocked
    form's weighted sums are float32 for float16/bfloat16 inputs.

  Raises:
    TypeError: as `attention_scores`, and for a `value` of None.
    ValueError: as `attention_scores`; for a non-positive `block_size` or
      `query_block_size`, a `query_block_size` without `block_size`, a `value` whose
      shape does not match `key`, an unknown `implementation`, or one combined with
      `block_size` or `precision`.

  References:
    Rabe and Staats, "Self-attention Does Not Need O(n^2) Memory", 2021.
    Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
    IO-Awareness", NeurIPS 2022.
    Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", 2023.
    Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxsim
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 16))
    >>> dense = jaxsim.attention(q, k, v, is_causal=True)
    >>> blocked = jaxsim.attention(q, k, v, is_causal=True, block_size=24)
    >>> bool(jnp.allclose(dense, blocked, atol=1e-5))
    True
    >>> bool(jnp.allclose(dense, jax.nn.dot_product_attention(q, k, v, is_causal=True),
    ...                   atol=1e-5))
    True
  """
  block_size, query_block_size = validation.block_sizes(block_size, query_block_size)
  if block_size is None and query_block_size is not None:
    raise ValueError(f"`query_block_size={query_block_size}` needs `block_size` (the blocked "
                     "form); the dense form takes no block sizes.")
  if block_size is not None and query_block_size is None:
    query_block_size = defaults.attention_query_block(block_size)
  validation.check_bool(return_residual, "return_residual")
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"`implementation` must be None (jaxsim's own forms) or one of "
                       f"{IMPLEMENTATIONS}, got {implementation!r}.")
    if block_size is not None or precision is not None:
      raise ValueError(f"`implementation={implementation!r}` runs jax.nn's kernel, which "
                       "takes no `block_size` or `precision`.")
  c = _check_call(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                  query_seq_lengths=query_seq_lengths,
                  key_value_seq_lengths=key_value_seq_lengths,
                  local_window_size=local_window_size, metric=metric, need_value=True)
  if implementation is not None:
    if c.value.shape[-1] != c.key.shape[-1]:
      raise ValueError(f"`implementation={implementation!r}` needs `value` of the same shape "
                       f"as `key`, got key.shape={key.shape}, value.shape={value.shape}.")
    static = (implementation == "cudnn" and isinstance(c.scale, (int, float, np.number)))
    out, lse = _jax_nn(c.query, c.key, c.value, c.bias, c.mask, None if static else c.scale,
                       c.q_len, c.kv_len, implementation=implementation,
                       static_scale=float(c.scale) if static else None, metric=metric,
                       is_causal=bool(is_causal), window=c.window)
  else:
    if c.key.shape[1] == 0:
      block_size = query_block_size = None  # No keys: nothing to stream; zeros either way.
    out, lse = _attention(c.query, c.key, c.value, c.bias, c.mask, c.scale, c.q_len,
                          c.kv_len, precision=precision, block_size=block_size,
                          query_block_size=query_block_size or block_size, metric=metric,
                          is_causal=bool(is_causal), window=c.window)
  if not c.batched:
    out, lse = out[0], lse[0]
  return (out, lse) if return_residual else out
