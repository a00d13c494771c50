"""Pairwise similarity kernels: prepare each row once, one matmul, a cheap finish.

Every metric here is the same three steps, which is what lets the blocked reductions
(`jaxsim.topk`, `jaxsim.pairs_above`, `jaxsim.similarity_stats`) and attention reuse
them block by block:

1. `prepare`: an O(n d) pass over each row set (unit-normalise for cosine, centre and
   take squared norms for the Euclidean metrics).
2. `score`: one `dot_general` between prepared row sets, accumulating in at least
   float32 (`preferred_element_type`), followed by an elementwise finish.
3. The public functions cast the float32 scores back to the inputs' dtype.

No per-pair loop and no N x M division ever happen.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxsim._src import validation

Metric = Literal["dot", "cosine", "scaled_dot", "sq_euclidean", "euclidean"]
METRICS: tuple[str, ...] = ("dot", "cosine", "scaled_dot", "sq_euclidean", "euclidean")
# Metrics where a smaller score means "more similar".
DISTANCES: frozenset[str] = frozenset({"sq_euclidean", "euclidean"})


class Prepared(NamedTuple):
  """Rows made ready for the matmul; a pytree, so it can be sliced into blocks.

  Attributes:
    rows: `(..., n, d)` rows in the input dtype: unit rows for cosine, centred rows
      for the Euclidean metrics, the raw rows otherwise.
    aux: `(..., n)` float32 per-row values the finish needs: squared norms of the
      centred rows for the Euclidean metrics, 1.0 for kept / 0.0 for zero rows for
      cosine, unused (zeros) otherwise.
  """

  rows: jax.Array
  aux: jax.Array


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
  return metric


def accum_dtype(dtype) -> jnp.dtype:
  """The dtype scores are accumulated in: float32, or wider for wider inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def default_scale(d: int) -> float:
  """The attention scale 1/sqrt(d); 1 for empty feature dims."""
  return 1.0 / float(max(d, 1)) ** 0.5


def unit_rows(x: jax.Array, eps: float | jax.Array = 0.0) -> tuple[jax.Array, jax.Array]:
  """Unit-normalises rows without overflow or underflow, in the accumulation dtype.

  Each row is first divided by its largest absolute entry, so that squaring cannot
  overflow (fp16 rows of magnitude 300) or underflow (rows of magnitude 1e-30) before
  the norm is taken. Rows whose norm is `<= eps` (always including all-zero rows) map
  to the zero vector, and both their value and gradient are exactly zero.

  Args:
    x: `(..., n, d)` array.
    eps: norm threshold; rows with `||x|| <= eps` are treated as zero vectors.

  Returns:
    `(unit, keep)`: `(..., n, d)` unit rows in `accum_dtype(x.dtype)` and the
    `(..., n)` boolean mask of rows that were kept.
  """
  xf = x.astype(accum_dtype(x.dtype))
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True, initial=0.0)
  nonzero = amax > 0
  xs = xf / jnp.where(nonzero, amax, 1.0)
  sumsq = jnp.sum(xs * xs, axis=-1, keepdims=True)  # >= 1 for nonzero rows
  keep = nonzero & (amax * jnp.sqrt(jnp.where(nonzero, sumsq, 1.0)) > eps)
  inv = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, sumsq, 1.0)), 0.0)
  return xs * inv, keep[..., 0]


def prepare(x: jax.Array, metric: str, *, eps: float | jax.Array = 0.0,
            shift: jax.Array | None = None) -> Prepared:
  """The O(n d) per-row pass of `metric` (see the module docstring).

  Args:
    x: `(..., n, d)` floating array.
    metric: one of `METRICS`.
    eps: cosine only; rows with norm `<= eps` count as zero vectors.
    shift: Euclidean metrics only; a `(..., 1, d)` point subtracted from every row
      of both sets. Distances do not change, but centring near the data keeps the
      expansion `|x|^2 + |y|^2 - 2 x.y` from cancelling catastrophically.
  """
  acc = accum_dtype(x.dtype)
  if metric == "cosine":
    unit, keep = unit_rows(x, eps)
    return Prepared(unit.astype(x.dtype), keep.astype(acc))
  if metric in DISTANCES:
    xf = x.astype(acc)
    if shift is not None:
      xf = xf - jax.lax.stop_gradient(shift.astype(acc))
    return Prepared(xf.astype(x.dtype), jnp.sum(xf * xf, axis=-1))
  return Prepared(x, jnp.zeros(x.shape[:-1], acc))


def centre(y: jax.Array) -> jax.Array:
  """The `shift` that `prepare` uses for the Euclidean metrics: about the mean row.

  Rows with an infinite or NaN entry are left out of the mean, so that one bad row
  spoils only its own distances. Each entry of the mean is rounded to 8 significant
  bits: close enough to the mean to avoid the cancellation, and coarse enough that
  rows of small integers (or other short binary fractions) stay exact after the
  shift, so their distances are exact and equal distances really tie.
  """
  yf = y.astype(accum_dtype(y.dtype))
  finite = jnp.all(jnp.isfinite(yf), axis=-1, keepdims=True)
  total = jnp.sum(jnp.where(finite, yf, 0.0), axis=-2, keepdims=True)
  mean = total / jnp.maximum(jnp.sum(finite, axis=-2, keepdims=True), 1).astype(yf.dtype)
  mantissa, exponent = jnp.frexp(mean)
  return jnp.ldexp(jnp.round(mantissa * 256.0), exponent - 8)


def matmul_t(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
  """`a @ b^T` over the last two axes, batch dims broadcast, accumulated in f32+."""
  return jnp.matmul(a, jnp.swapaxes(b, -1, -2), precision=precision,
                    preferred_element_type=accum_dtype(a.dtype))


def score(xp: Prepared, yp: Prepared, metric: str, *, scale: float | jax.Array | None = None,
          precision=None) -> jax.Array:
  """Scores between two prepared row sets, `(..., n, m)` in the accumulation dtype.

  Args:
    xp: prepared `(..., n, d)` rows.
    yp: prepared `(..., m, d)` rows.
    metric: one of `METRICS`.
    scale: `scaled_dot` only; the logit scale (default `1/sqrt(d)`). It multiplies
      the `n x d` side before the matmul rather than the `n x m` result.
    precision: passed to the matmul.
  """
  rows = xp.rows
  if metric == "scaled_dot":
    s = default_scale(rows.shape[-1]) if scale is None else scale
    rows = (rows.astype(accum_dtype(rows.dtype)) * s).astype(rows.dtype)
  dots = matmul_t(rows, yp.rows, precision)
  if metric == "cosine":
    return jnp.clip(dots, -1.0, 1.0)
  if metric in DISTANCES:
    sq = jnp.maximum(xp.aux[..., :, None] + yp.aux[..., None, :] - 2.0 * dots, 0.0)
    return safe_sqrt(sq) if metric == "euclidean" else sq
  return dots


@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
  """`sqrt` whose derivative at 0 is 0 (the subgradient) instead of inf."""
  return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = jnp.sqrt(x)
  return y, jnp.where(y > 0, t / (2.0 * jnp.where(y > 0, y, 1.0)), 0.0)


def _pairwise(x, y, eps, scale, *, metric, precision):
  self_sim = y is None
  squeeze_x, squeeze_y = x.ndim == 1, (x if self_sim else y).ndim == 1
  if squeeze_x:
    x = x[None]
  if not self_sim:
    if squeeze_y:
      y = y[None]
    # Equal ranks, so batch dims broadcast by size only (user code may run with
    # jax_numpy_rank_promotion="raise").
    rank = max(x.ndim, y.ndim)
    x, y = (a.reshape((1,) * (rank - a.ndim) + a.shape) for a in (x, y))
  shift = centre(x if self_sim else y) if metric in DISTANCES else None
  xp = prepare(x, metric, eps=eps, shift=shift)
  yp = xp if self_sim else prepare(y, metric, eps=eps, shift=shift)
  s = score(xp, yp, metric, scale=scale, precision=precision)
  if self_sim and metric in ("cosine", "sq_euclidean", "euclidean"):
    # Exact diagonals: 1 for nonzero rows under cosine (xp.aux is that mask), 0 for
    # self-distances. A scatter writes n values in place; a select over an eye mask
    # would be one more pass over all n^2.
    idx = jnp.arange(s.shape[-1])
    s = s.at[..., idx, idx].set(xp.aux if metric == "cosine" else 0.0)
  s = s.astype(x.dtype)
  drop = tuple(s.ndim + ax for ax, sq in ((-2, squeeze_x), (-1, squeeze_y)) if sq)
  return jnp.squeeze(s, axis=drop) if drop else s


def pairwise(x: ArrayLike, y: ArrayLike | None = None, *, metric: Metric = "cosine",
             eps: float = 0.0, scale: float | None = None, precision=None) -> jax.Array:
  r"""Pairwise scores between the rows of `x` and `y` under `metric`.

  The dispatcher behind `dot`, `cosine`, `scaled_dot`, `sq_euclidean` and
  `euclidean`; see those for the math of each metric.

  Args:
    x: `(..., n, d)` array, or a single `(d,)` vector.
    y: `(..., m, d)` array, a single `(d,)` vector, or `None` for the rows of `x`
      against themselves. Batch dims `...` broadcast against those of `x`.
    metric: one of `"dot"`, `"cosine"`, `"scaled_dot"`, `"sq_euclidean"`,
      `"euclidean"`.
    eps: cosine only; rows with norm `<= eps` count as zero vectors.
    scale: scaled_dot only; defaults to `1/sqrt(d)`.
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    `(..., n, m)` scores in the inputs' floating dtype (integers promote to the default
    float). A 1-D `x` drops the `n` axis and a 1-D `y` the `m` axis, so two vectors
    give a scalar.

  Raises:
    TypeError: for complex or non-numeric inputs.
    ValueError: for rank-0 inputs, mismatched feature dims, batch dims that do not
      broadcast, or an unknown metric.
  """
  check_metric(metric)
  x, y = validation.pair(x, y)
  validation.check_scalar(eps, "eps")
  if scale is not None:
    validation.check_scalar(scale, "scale")
  if all(v is None or isinstance(v, (int, float)) for v in (eps, scale)):
    return _pairwise_static(x, y, eps=eps, scale=scale, metric=metric, precision=precision)
  return _pairwise_traced(x, y, eps, scale, metric=metric, precision=precision)


# Python-number options are compiled in: passing them as traced arguments would cost a
# host-to-device copy on every eager call. Array options (a learned scale, say) stay
# traced so that they can be differentiated and vary without recompiling.
_pairwise_static = jax.jit(_pairwise, static_argnames=("eps", "scale", "metric", "precision"))
_pairwise_traced = jax.jit(_pairwise, static_argnames=("metric", "precision"))


def dot(x: ArrayLike, y: ArrayLike | None = None, *, precision=None) -> jax.Array:
  r"""Pairwise dot products :math:`s_{ij} = x_i \cdot y_j`.

  Args:
    x: `(..., n, d)` array, or a `(d,)` vector.
    y: `(..., m, d)` array, a `(d,)` vector, or `None` for `x` against itself.
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    `(..., n, m)` array in the inputs' floating dtype, accumulated in float32 or wider.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> jaxsim.dot(jnp.array([[1., 2.]]), jnp.array([[3., 4.], [0., 1.]]))
    Array([[11.,  2.]], dtype=float32)
  """
  return pairwise(x, y, metric="dot", precision=precision)


def cosine(x: ArrayLike, y: ArrayLike | None = None, *, eps: float = 0.0,
           precision=None) -> jax.Array:
  r"""Pairwise cosine similarity :math:`s_{ij} = \hat x_i \cdot \hat y_j`.

  With :math:`\hat x = x / \lVert x \rVert`. Each row is normalised once (O(n d)),
  then one matmul; values are clipped to `[-1, 1]`. A zero row (or one with norm
  `<= eps`) has cosine 0 against everything, with a zero gradient, never NaN. For
  `y=None` the diagonal is exactly 1 for nonzero rows. Normalisation divides by the
  row's largest entry first, so fp16 rows of large magnitude and float32 rows of
  magnitude 1e-30 are both exact. XLA flushes subnormal numbers to zero, so a row
  whose entries are all subnormal counts as a zero row.

  Args:
    x: `(..., n, d)` array, or a `(d,)` vector.
    y: `(..., m, d)` array, a `(d,)` vector, or `None` for `x` against itself.
    eps: rows whose Euclidean norm is `<= eps` are treated as zero vectors. This is a
      threshold, not a clamp: rows above it are normalised exactly.
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    `(..., n, m)` array in `[-1, 1]`, in the inputs' floating dtype.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> jaxsim.cosine(jnp.array([-0.76, 0.75]), jnp.array([0.91, 0.38]))
    Array(-0.38..., dtype=float32)
  """
  return pairwise(x, y, metric="cosine", eps=eps, precision=precision)


def scaled_dot(x: ArrayLike, y: ArrayLike | None = None, *, scale: float | None = None,
               precision=None) -> jax.Array:
  r"""Scaled dot products, the attention logits :math:`s_{ij} = c\, x_i \cdot y_j`.

  Args:
    x: `(..., n, d)` queries, or a `(d,)` vector.
    y: `(..., m, d)` keys, a `(d,)` vector, or `None` for `x` against itself.
    scale: :math:`c`; defaults to :math:`1/\sqrt{d}` (Vaswani et al., 2017).
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    `(..., n, m)` array in the inputs' floating dtype.

  References:
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
  """
  return pairwise(x, y, metric="scaled_dot", scale=scale, precision=precision)


def sq_euclidean(x: ArrayLike, y: ArrayLike | None = None, *, precision=None) -> jax.Array:
  r"""Pairwise squared Euclidean distances :math:`\lVert x_i - y_j \rVert^2`.

  Computed as :math:`\lVert x_i\rVert^2 + \lVert y_j\rVert^2 - 2 x_i \cdot y_j` on rows
  centred at the mean of `y`, which keeps the cancellation error small for data far
  from the origin. Results are clamped at 0, and for `y=None` the diagonal is exactly 0.

  Args:
    x: `(..., n, d)` array, or a `(d,)` vector.
    y: `(..., m, d)` array, a `(d,)` vector, or `None` for `x` against itself.
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    `(..., n, m)` non-negative array in the inputs' floating dtype. In float16 a
    distance above 65504 is `inf`, as any float16 value would be.
  """
  return pairwise(x, y, metric="sq_euclidean", precision=precision)


def euclidean(x: ArrayLike, y: ArrayLike | None = None, *, precision=None) -> jax.Array:
  r"""Pairwise Euclidean distances :math:`\lVert x_i - y_j \rVert`.

  The square root of `sq_euclidean`, with the subgradient 0 at zero distance, so
  gradients stay finite for duplicate points and on the self-distance diagonal.

  Args:
    x: `(..., n, d)` array, or a `(d,)` vector.
    y: `(..., m, d)` array, a `(d,)` vector, or `None` for `x` against itself.
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    `(..., n, m)` non-negative array in the inputs' floating dtype.
  """
  return pairwise(x, y, metric="euclidean", precision=precision)
