r"""Float32 scores from bfloat16 matmuls, with a proven bound on the difference.

On CPUs with AVX512-BF16 (or AMX) a bfloat16 x bfloat16 matmul accumulated in float32
runs at about twice the float32 rate (1.95x on the 2-core AMD EPYC,
`experiments/bf16_matmul.py`). Its scores differ from the float32 ones by at most a
bound computed per row, so an exact search can rank with them and recompute in
float32 only the few candidates the bound leaves in reach of the k-th score
(`jaxsim._src.search`).

The bound. For float32 rows :math:`q, c \in \mathbb{R}^d`, let :math:`\tilde q, \tilde
c` be them rounded to bfloat16 and :math:`u = 2^{-24}` float32's unit roundoff. Then

.. math:: q\cdot c - \tilde q\cdot\tilde c = (q - \tilde q)\cdot\tilde c
          + q\cdot(c - \tilde c),

so by Cauchy-Schwarz :math:`|q\cdot c - \tilde q\cdot\tilde c| \le \lVert q - \tilde
q\rVert\,\lVert\tilde c\rVert + \lVert q\rVert\,\lVert c - \tilde c\rVert`. Two
computed values are compared with these exact ones:

- the float32 score :math:`\hat s = \mathrm{fl}(q\cdot c)`, in any summation order,
  with or without FMA: :math:`|\hat s - q\cdot c| \le \gamma_d\, \lVert q\rVert
  \lVert c\rVert`, :math:`\gamma_d = d u / (1 - d u)` (Higham, Theorem 3.5; each
  product and each partial sum is rounded at most once per addition, at most `d`
  times in all, and :math:`\sum_i |q_i c_i| \le \lVert q\rVert\lVert c\rVert`);
- the bfloat16 score :math:`\hat t = \mathrm{fl}_{32}(\tilde q\cdot\tilde c)`: a
  product of two bfloat16 numbers (8-bit significands) is exact in float32 (24 bits),
  so only the sums round: :math:`|\hat t - \tilde q\cdot\tilde c| \le \gamma_d\,
  \lVert\tilde q\rVert\lVert\tilde c\rVert`.

Flushing of subnormals (XLA:CPU and `vdpbf16ps` flush inputs, products and sums below
:math:`2^{-126}`) adds at most :math:`2^{-126}` per product and per sum in each
computation, and :math:`2^{-126} \sum_i |\tilde c_i| \le 2^{-126}\sqrt d \lVert\tilde
c\rVert` for flushed inputs of either side: :math:`\tau = 2^{-126}(4d + \sqrt d
(\lVert\tilde q\rVert + \lVert\tilde c\rVert))`. Together, for every pair,

.. math:: |\hat s - \hat t| \le E = \lVert q - \tilde q\rVert\lVert\tilde c\rVert
          + \lVert q\rVert\lVert c - \tilde c\rVert + 2\gamma_d \lVert q\rVert
          \lVert c\rVert + \gamma_d\lVert\tilde q\rVert\lVert\tilde c\rVert + \tau.

The second :math:`\gamma_d \lVert q\rVert\lVert c\rVert` covers a candidate whose row
is prepared again for the float32 rescoring in a different set: `kernels.unit_rows`
picks its one-pass or pre-scaled form per set, and the two agree to a relative
:math:`\gamma_d`. Clipping cosines to [-1, 1] is 1-Lipschitz, so the same bound holds
for the clipped scores.

The norms are computed in float32 as upper bounds (`Norms`): each sum of squares gets
:math:`d\, 2^{-126}` for squares that underflow and the final bound a relative
`SLACK` for the rounding of its own computation (at most about :math:`(d + 10) u`).
Rows whose norms overflow, or pairs with :math:`\lVert q\rVert \lVert c\rVert \ge
2^{100}` (where a partial sum could overflow in one order and not the other), get an
infinite bound, as do rows with a non-finite entry (their norms are inf or NaN): a
caller that compares with the bound then falls back to float32 for them.

For speed the bound is taken per row on one side and over the maxima of a whole
corpus on the other (`Norms.max`, `bound`): one vector per query, not a matrix.

Where it is used (`use`): float32 rows on a backend where `defaults.lowprec_search()`
holds (a CPU with the `avx512_bf16` or `amx_bf16` flag; off on GPU and TPU until
measured there), with the default `precision` (an explicit `precision`, e.g.
`"highest"`, keeps the search in float32), and only for searches large enough that the
second compiled path pays for itself, over corpora long enough (`MIN_ROWS` rows per
device) that it is faster. `FORCE` overrides the decision (tests).

References:
  Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM 2002, §3.1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsim._src import defaults

LOW = jnp.bfloat16
# float32 unit roundoff and the smallest normal float32.
U = 2.0**-24
TINY = 2.0**-126
# Norm products at or above this get an infinite bound (no partial sum can overflow below it).
HUGE = 2.0**100
# None: the backend decides (`use`); True / False force the low-precision search on or
# off wherever it applies (tests monkeypatch this).
FORCE: bool | None = None
# Searches with fewer multiply-adds (queries x corpus rows x d) stay in float32: for
# them the saved time is below the cost of compiling the second path.
MIN_WORK = 2**31
# So do corpora of fewer rows per device: every corpus block is split and every query's
# candidates are rescored and certified, work that only a long corpus pays for. 1024
# queries, d = 384, random rows, on the 2-core EPYC (`experiments/search_bench.py`):
# 0.99x the float32 search's speed over 10,000 rows, 0.96x over 30,000, 1.07x over
# 100,000. On real embeddings a few percent of the queries also need the float32
# fallback (2.6% of the all-MiniLM-L6-v2 token table searched in itself).
MIN_ROWS = 2**16


class Norms(NamedTuple):
  """Upper bounds on per-row norms (float32, `(..., n)`), or their maxima over rows.

  Attributes:
    norm: :math:`\\lVert x\\rVert`.
    low: :math:`\\lVert\\tilde x\\rVert`, the bfloat16 row.
    resid: :math:`\\lVert x - \\tilde x\\rVert`, the rounding residual.
  """

  norm: jax.Array
  low: jax.Array
  resid: jax.Array

  def max(self, keep: jax.Array | None = None) -> Norms:
    """The maxima over the last axis of the rows where `keep` holds (0 if none).

    NaN (a row with a NaN entry) propagates, which makes every bound that uses it
    NaN, i.e. never satisfied.
    """
    def reduce(v):
      if keep is not None:
        v = jnp.where(keep, v, 0.0)
      return jnp.max(v, axis=-1, initial=0.0)

    return Norms(*map(reduce, self))

  @staticmethod
  def combine(a: Norms, b: Norms) -> Norms:
    """Elementwise maxima of two sets of maxima (a running maximum over blocks)."""
    return Norms(*(jnp.maximum(x, y) for x, y in zip(a, b, strict=True)))


class Split(NamedTuple):
  """Rows rounded to bfloat16 and the norms of the bound.

  Attributes:
    low: `(..., n, d)` bfloat16 rows.
    norms: `Norms` of each row, `(..., n)`.
  """

  low: jax.Array
  norms: Norms


def _norm_upper(x: jax.Array) -> jax.Array:
  """Upper bound on each row's norm, up to the relative `slack` of its own rounding."""
  d = x.shape[-1]
  return jnp.sqrt(jnp.sum(x * x, axis=-1) + d * TINY)


def split(x: jax.Array) -> Split:
  """`x` (`(..., n, d)` float32) rounded to bfloat16, with its rows' `Norms`."""
  if x.dtype != jnp.float32:
    raise TypeError(f"`lowprec.split` needs float32 rows, got {x.dtype}.")
  low = x.astype(LOW)
  back = low.astype(jnp.float32)
  return Split(low, Norms(_norm_upper(x), _norm_upper(back), _norm_upper(x - back)))


def slack(d: int) -> float:
  """The factor that covers the float32 rounding of the bound's own computation."""
  g = (d + 10) * U
  return 1.0 + 2.0 * g / (1.0 - g)


def gamma(d: int) -> float:
  """:math:`\\gamma_d = d u / (1 - d u)`."""
  return d * U / (1.0 - d * U)


def bound(a: Norms, b: Norms, d: int) -> jax.Array:
  """`E` of the module docstring between rows with norms `a` and `b` (broadcast).

  `(q,)` against a corpus's maxima (`Norms.max`) gives one bound per query that holds
  for every pair. Infinite (or NaN) where it cannot be trusted (module docstring).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxsim._src import lowprec
    >>> x, y = jnp.array([[0.6, 0.8]]), jnp.array([[1.0, 1 / 3], [0.1, 0.7]])
    >>> a, b = lowprec.split(x), lowprec.split(y)
    >>> e = lowprec.bound(a.norms, b.norms.max(), 2)  # one bound per row of x
    >>> err = jnp.abs(x @ y.T - lowprec.matmul_t(a.low, b.low))
    >>> bool(jnp.all(err <= e[:, None])), bool(e[0] < 0.01)
    (True, True)
  """
  g = gamma(d)
  prod = a.norm * b.norm
  e = (a.resid * b.low + a.norm * b.resid + 2.0 * g * prod + g * (a.low * b.low)
       + TINY * (4.0 * d + math.sqrt(d) * (a.low + b.low)))
  e = e * slack(d)
  return jnp.where(prod < HUGE, e, jnp.inf)


def matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b^T` of bfloat16 rows (`(..., n, d)`, `(..., m, d)`), accumulated in float32."""
  return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)),
                                (tuple(range(a.ndim - 2)), tuple(range(b.ndim - 2)))),
                         preferred_element_type=jnp.float32)


def width(k: int) -> int:
  """Candidates kept per query by the bfloat16 scan: `2 k + 4` rounded up to 8.

  A query is certified when its k-th and width-th bfloat16 scores lie more than the
  bound apart. On random unit rows (d = 384, n = 100k, k = 10) about 7.5 rows lie within
  twice the bound below the 10th best score, and a width of 20 already certified 256
  queries of 256 (16: 89%); the rows near the k-th grow about in proportion to `k`.
  """
  return -(-(2 * k + 4) // 8) * 8


def use(dtype, *, metric: str, precision, approx: bool, work: int, rows: int, k: int) -> bool:
  """Whether a top-k search takes the bfloat16 path (module docstring).

  Args:
    dtype: the dtype of the prepared rows (None: the two sides differ).
    metric: the search's metric; only the inner-product ones are supported.
    precision: the caller's `precision`; anything but None keeps float32.
    approx: `approx=True` keeps the float32 path.
    work: queries x corpus rows x d.
    rows: corpus rows per device; fewer than the width keep float32.
    k: results per query.
  """
  if dtype is None or jnp.dtype(dtype) != jnp.float32:
    return False
  if metric not in ("cosine", "dot", "scaled_dot"):
    return False
  if precision is not None or approx or rows <= width(k):
    return False
  if FORCE is not None:
    return FORCE
  return work >= MIN_WORK and rows >= MIN_ROWS and defaults.lowprec_search()
