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

import functools
import os
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxsim._src import blockscan, defaults, refine, sharding, validation

Metric = Literal["dot", "cosine", "scaled_dot", "sq_euclidean", "euclidean"]
METRICS: tuple[str, ...] = ("dot", "cosine", "scaled_dot", "sq_euclidean", "euclidean")
# Metrics where a smaller score means "more similar".
DISTANCES: frozenset[str] = frozenset({"sq_euclidean", "euclidean"})
# Rows per block of the streamed mean in `centre`.
CENTRE_BLOCK = 4096


class Prepared(NamedTuple):
  """Rows made ready for the matmul; a pytree, so it can be sliced into blocks.

  Attributes:
    rows: `(..., n, d)` rows in the input dtype: unit rows for cosine, centred rows
      for the Euclidean metrics, the raw rows otherwise.
    aux: `(..., n)` float32 per-row values the finish needs: squared norms of the
      centred rows for the Euclidean metrics, squared norms of the unit rows for
      cosine (1.0, less for rows under the `eps` clamp, 0.0 for zero rows), unused
      (zeros) otherwise. NaN or inf marks a row with a non-finite entry.
  """

  rows: jax.Array
  aux: jax.Array


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
  return metric


def accum_dtype(dtype) -> jnp.dtype:
  """The dtype scores are accumulated in: float32, or wider for wider inputs.

  The one place that widens a dtype; it does so explicitly, so that it holds under
  `jax_numpy_dtype_promotion="strict"`, which forbids implicit float16 -> float32.
  """
  return _widen(jnp.dtype(dtype))


@functools.cache
def _widen(dtype: jnp.dtype) -> jnp.dtype:
  # Cached: entering the promotion context costs microseconds on every eager call.
  with jax.numpy_dtype_promotion("standard"):
    return jnp.promote_types(dtype, jnp.float32)


def default_scale(d: int) -> float:
  """The attention scale 1/sqrt(d); 1 for empty feature dims."""
  return 1.0 / float(max(d, 1)) ** 0.5


# Squared norms in which the one-pass normalisation `x * rsqrt(|x|^2)` is exact, gradient
# included: no square overflows (each is <= the sum), squares that underflow are below
# 2**-126, a 2**-86 share of the sum, and rsqrt's derivative |x|^-3 stays a normal float.
FAST_SQ_NORM = (2.0**-40, 2.0**40)


def unit_rows(x: jax.Array, eps: float | jax.Array = 0.0) -> tuple[jax.Array, jax.Array]:
  r"""Unit-normalises rows without overflow or underflow, in the accumulation dtype.

  .. math:: \hat x = x / \sqrt{\max(\lVert x\rVert^2, \epsilon)}

  the convention of optax's `cosine_similarity` (`epsilon` clamps the squared norm;
  torch's `eps` clamps the product of the two norms instead). Float16 and bfloat16
  rows, and any set with a row whose squared norm lies outside `FAST_SQ_NORM` (float32
  rows of magnitude 1e-30 or 1e30, an infinite or NaN entry), are first divided by
  their largest absolute entry, so that squaring cannot overflow (fp16 rows of
  magnitude 300) or underflow before the norm is taken. That pre-scale cancels out of
  :math:`\hat x`, so no gradient flows through it (its own derivative underflows to NaN
  for rows below about 1e-19). Every other set takes one pass, `x * rsqrt(|x|^2)`: the
  same rows to rounding, without the dozen small passes of the pre-scale. Zero rows map
  to the zero vector with a zero gradient, for any `eps`.

  Args:
    x: `(..., n, d)` array.
    eps: `>= 0`; rows with `||x||^2 <= eps` are divided by `sqrt(eps)` instead of
      their norm.

  Returns:
    `(unit, sq_norm)`: `(..., n, d)` rows in `accum_dtype(x.dtype)` and their `(..., n)`
    squared norms: 1 for rows above the clamp, `||x||^2 / eps` below it, 0 for zero
    rows, NaN for rows with an infinite or NaN entry.
  """
  acc = accum_dtype(x.dtype)
  xf = x.astype(acc)
  eps = jnp.asarray(eps, acc)
  if jnp.dtype(x.dtype).itemsize < 4 or xf.shape[-1] == 0:
    return _unit_rows_prescaled(xf, eps, None)
  sumsq = jnp.sum(xf * xf, axis=-1, keepdims=True)
  amax = jax.lax.stop_gradient(jnp.max(jnp.abs(xf), axis=-1, keepdims=True, initial=0.0))
  lo, hi = FAST_SQ_NORM
  # A zero row is exact in one pass too; `amax` tells it from a row whose squares
  # all underflowed (and a NaN row, whose sum is NaN, from both).
  fast = jnp.all(((sumsq >= lo) & (sumsq <= hi)) | ((sumsq == 0) & (amax == 0)))
  return jax.lax.cond(fast, _unit_rows_one_pass, _unit_rows_prescaled, xf, eps, sumsq)


def _unit_rows_one_pass(xf, eps, sumsq):
  clamp = jnp.maximum(sumsq, eps)
  # 0 for a zero row under eps=0 (a zero row and gradient), else 1/sqrt(max(|x|^2, eps)).
  unit = xf * jnp.where(clamp > 0, jax.lax.rsqrt(jnp.where(clamp > 0, clamp, 1.0)), 0.0)
  below = sumsq <= eps
  sq_norm = jnp.where(below, sumsq / jnp.where(below & (eps > 0), eps, 1.0), 1.0)
  return unit, sq_norm[..., 0]


def _unit_rows_prescaled(xf, eps, sumsq):
  del sumsq  # may have overflowed or underflowed
  amax = jax.lax.stop_gradient(jnp.max(jnp.abs(xf), axis=-1, keepdims=True, initial=0.0))
  nonzero = amax > 0
  xs = xf / jnp.where(nonzero, amax, 1.0)
  sumsq = jnp.sum(xs * xs, axis=-1, keepdims=True)  # >= 1 for nonzero rows
  norm = amax * jnp.sqrt(jnp.where(nonzero, sumsq, 1.0))
  # Compared as norms, not squares: the square of a 1e-30 row underflows to 0.
  root_eps = jnp.sqrt(jnp.maximum(eps, 0.0))
  clamped = ~nonzero | (norm <= root_eps)
  inv_eps = jnp.where(root_eps > 0, 1.0 / jnp.where(root_eps > 0, root_eps, 1.0), 0.0)
  unit = jnp.where(clamped, xf * inv_eps, xs * jax.lax.rsqrt(jnp.where(clamped, 1.0, sumsq)))
  sq_norm = jnp.where(clamped, jnp.square(norm * inv_eps), 1.0)
  sq_norm = jnp.where(nonzero, sq_norm, 0.0)
  # NaN marks a row with a non-finite entry, so that `score` can make its cosines NaN
  # explicitly (the clip to [-1, 1] may turn a NaN into a bound in fused code).
  finite = jnp.all(jnp.isfinite(xf), axis=-1, keepdims=True)
  return unit, jnp.where(finite, sq_norm, jnp.nan)[..., 0]


def prepare(x: jax.Array, metric: str, *, eps: float | jax.Array = 0.0,
            shift: jax.Array | None = None) -> Prepared:
  """The O(n d) per-row pass of `metric` (see the module docstring).

  Args:
    x: `(..., n, d)` floating array.
    metric: one of `METRICS`.
    eps: cosine only; the clamp on the squared norm (see `unit_rows`).
    shift: Euclidean metrics only; a `(..., 1, d)` point subtracted from every row
      of both sets. Distances do not change, but centring near the data keeps the
      expansion `|x|^2 + |y|^2 - 2 x.y` from cancelling catastrophically. A row with
      an infinite or NaN entry gets a non-finite `aux`, which `score` turns into NaN
      distances.
  """
  acc = accum_dtype(x.dtype)
  if metric == "cosine":
    unit, sq_norm = unit_rows(x, eps)
    return Prepared(unit.astype(x.dtype), sq_norm)
  if metric in DISTANCES:
    xf = x.astype(acc)
    if shift is not None:
      xf = xf - jax.lax.stop_gradient(shift.astype(acc))
    return Prepared(xf.astype(x.dtype), jnp.sum(xf * xf, axis=-1))
  return Prepared(x, jnp.zeros(x.shape[:-1], acc))


def centre(y: jax.Array, *, mesh=None, count: int | None = None) -> jax.Array:
  """The `shift` that `prepare` uses for the Euclidean metrics: about the mean row.

  Rows with an infinite or NaN entry are left out of the mean, so that one bad row
  spoils only its own distances. Each entry of the mean is rounded to 8 significant
  bits: close enough to the mean to avoid the cancellation, and coarse enough that
  rows of small integers (or other short binary fractions) stay exact after the
  shift, so their distances are exact and equal distances really tie. The sum is
  streamed over blocks of rows, so no masked copy of `y` is ever made; with `mesh`
  (2-D `y` only) each device sums its own shard, as the reductions scan it.

  Args:
    y: `(..., m, d)` rows.
    mesh: a `jax.sharding.Mesh` the rows are split over, or None.
    count: only the first `count` rows are real (the rest padding, as in a
      `jaxsim.shard_rows` corpus); default all `m`.

  Returns:
    `(..., 1, d)` shift in `accum_dtype(y.dtype)`.
  """
  acc = accum_dtype(y.dtype)
  batch, (m, d) = y.shape[:-2], y.shape[-2:]
  m = m if count is None else count

  def sums(rows, offset, m):
    def step(carry, block, start, valid):
      total, count = carry
      bf = block.astype(acc)
      ok = valid & (offset + start + jnp.arange(valid.shape[0], dtype=jnp.int32) < m)
      finite = jnp.all(jnp.isfinite(bf), axis=-1, keepdims=True)
      finite &= ok.reshape((1,) * len(batch) + ok.shape + (1,))
      return (total + jnp.sum(jnp.where(finite, bf, 0.0), axis=-2, keepdims=True),
              count + jnp.sum(finite, axis=-2, keepdims=True, dtype=jnp.int32))

    init = (jnp.zeros((*batch, 1, d), acc), jnp.zeros((*batch, 1, 1), jnp.int32))
    return blockscan.block_scan(step, init, rows, block_size=CENTRE_BLOCK, axis=-2,
                                remat=False, pad_tail=False)

  if mesh is None:
    total, finite = sums(y, jnp.int32(0), m)
  else:
    total, finite = sharding.map_shards(sums, y, jnp.int32(m), mesh=mesh)
    total, finite = jnp.sum(total, axis=0), jnp.sum(finite, axis=0)
  mean = total / jnp.maximum(finite, 1).astype(acc)
  mantissa, exponent = jnp.frexp(mean)
  return jax.lax.stop_gradient(jnp.ldexp(jnp.round(mantissa * 256.0), exponent - 8))


def matmul_t(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
  """`a @ b^T` over the last two axes, batch dims broadcast, accumulated in f32+."""
  return jnp.matmul(a, jnp.swapaxes(b, -1, -2), precision=precision,
                    preferred_element_type=accum_dtype(a.dtype))


def score(xp: Prepared, yp: Prepared, metric: str, *, scale: float | jax.Array | None = None,
          precision=None) -> jax.Array:
  """Scores between two prepared row sets, `(..., n, m)` in the accumulation dtype.

  For the Euclidean metrics these are the expansion's values (see `jaxsim._src.refine`
  for their error and how callers sharpen them), and NaN for every pair with a
  non-finite row. That NaN is set explicitly from the rows' `aux`: the clamp
  `maximum(., 0)` cannot be relied on to pass a NaN through, as XLA:CPU's fused dot
  epilogue turns `maximum(NaN, 0)` into 0.

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
    acc = accum_dtype(rows.dtype)
    s = default_scale(rows.shape[-1]) if scale is None else jnp.asarray(scale, acc)
    rows = (rows.astype(acc) * s).astype(rows.dtype)
  dots = matmul_t(rows, yp.rows, precision)
  if metric == "cosine":
    return finish_cosine(dots, xp.aux[..., :, None], yp.aux[..., None, :])
  if metric in DISTANCES:
    ax, ay = xp.aux[..., :, None], yp.aux[..., None, :]
    sq = jnp.where(jnp.isfinite(ax) & jnp.isfinite(ay), jnp.maximum(ax + ay - 2.0 * dots, 0.0),
                   jnp.nan)
    return safe_sqrt(sq) if metric == "euclidean" else sq
  return dots


@jax.custom_jvp
def with_tangent_of(value: jax.Array, like: jax.Array) -> jax.Array:
  """`value`, differentiated as `like`: for a sharper recomputation of the same function."""
  del like
  return value


@with_tangent_of.defjvp
def _with_tangent_of_jvp(primals, tangents):
  return primals[0], tangents[1]


@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
  """`sqrt` whose derivative at 0 is 0 (the subgradient) instead of inf."""
  return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = jnp.sqrt(x)
  return y, jnp.where(y > 0, t / (2.0 * jnp.where(y > 0, y, 1.0)), 0.0)


def _gather_rows(a: jax.Array, batch: tuple[int, ...], flat: jax.Array) -> jax.Array:
  """Rows `flat` of `a` (`(..., n, d)`, batch dims of size 1 or `batch`) seen as a
  `(prod(batch) * n, d)` array, without broadcasting `a` to `batch` first."""
  n = a.shape[-2]
  b, r = jnp.divmod(flat, n)
  idx = jnp.unravel_index(b, batch) if batch else ()
  idx = tuple(jnp.where(size == 1, 0, i) for size, i in zip(a.shape[:-2], idx, strict=True))
  return a[(*idx, r)]


def refine_dense(sq: jax.Array, x: jax.Array, y: jax.Array, xp: Prepared, yp: Prepared, *,
                 skip_diagonal: bool) -> jax.Array:
  """The dense squared distances `sq` (`(..., n, m)`, the expansion) with every close
  pair and every pair with a non-finite row recomputed from the raw rows `x`, `y`
  (see `jaxsim._src.refine`). Differentiated as the expansion."""
  acc = sq.dtype
  ax, ay = xp.aux[..., :, None], yp.aux[..., None, :]
  close = (sq <= refine.RHO * (ax + ay)) | ~(jnp.isfinite(ax) & jnp.isfinite(ay))
  batch, (n, m) = sq.shape[:-2], sq.shape[-2:]
  flat_n = n * int(np.prod(batch, dtype=np.int64))
  close = close.reshape(flat_n, m)
  if skip_diagonal:
    rows = jax.lax.broadcasted_iota(jnp.int32, close.shape, 0) % n
    close &= rows != jax.lax.broadcasted_iota(jnp.int32, close.shape, 1)
  xs, ys = jax.lax.stop_gradient(x), jax.lax.stop_gradient(y)

  def exact(r, c):
    # Column c of flattened row r: y's batch index is r's.
    b = r // n
    return refine.direct_sq(_gather_rows(xs, batch, r), _gather_rows(ys, batch, b * m + c),
                            acc)

  fixed = refine.refine_where(jax.lax.stop_gradient(sq).reshape(flat_n, m), close, exact)
  return with_tangent_of(fixed.reshape(sq.shape), sq)


def finish_cosine(dots: jax.Array, ax: jax.Array, ay: jax.Array) -> jax.Array:
  """Cosines from the dot products of unit rows: clipped to `[-1, 1]`, NaN where a row's
  `aux` marks a non-finite entry (`ax`, `ay` broadcast against `dots`)."""
  return jnp.where(jnp.isfinite(ax) & jnp.isfinite(ay), jnp.clip(dots, -1.0, 1.0), jnp.nan)


# The symmetric dense cosine `cosine(x)` computes only the tiles (i, j), i <= j, of
# `defaults.for_backend().symmetric_block` rows (256 on CPU; off on accelerators, not
# timed there) and mirrors each (`experiments/dense_forms.py`). On the 2-core CPU, at
# d=512: 1.06x XLA's full `u @ u.T` at n=2048 and 1.08x at n=4096 (512-row tiles:
# 1.07x, 1024-row tiles: 0.8-0.9x). Where d is small the full matmul is bound by
# writing its output, which the mirror writes twice: 0.92x at d=256, 0.78x at d=128,
# so narrower rows take the one matmul. `dot(x)` and `scaled_dot(x)` take the same tiles
# from 4096 rows: the full matmul has no finish pass for the mirror to save, and at
# d=512 the mirror measured 1.01-1.12x its time at n=4096 but 0.78-1.02x at n=2048.
SYMMETRIC_MIN_ROWS = {"cosine": 2048, "dot": 4096, "scaled_dot": 4096}
SYMMETRIC_MIN_DIM = 512


def symmetric_dense(xp: Prepared, finish, out_dtype, *, precision=None) -> jax.Array:
  """The `(n, n)` scores of 2-D prepared rows against themselves, from the upper tiles.

  `finish(dots, row_aux, col_aux)` turns one tile's float32 dot products into scores
  (`row_aux`: `(b, 1)`, `col_aux`: `(1, b)`); each finished tile and its transpose are
  written into the result in place, so each score costs half a matmul, and the result
  is written from tiles that are still in cache.
  """
  n = xp.rows.shape[-2]

  def step(out, r, c, r_start, c_start, r_valid, c_valid):
    del r_valid, c_valid  # rows seen twice get the same scores twice
    dots = matmul_t(r.rows, c.rows, precision)
    tile = finish(dots, r.aux[:, None], c.aux[None, :]).astype(out_dtype)
    out = jax.lax.dynamic_update_slice(out, tile.T, (c_start, r_start))
    return jax.lax.dynamic_update_slice(out, tile, (r_start, c_start))

  return blockscan.triangle_scan(step, jnp.zeros((n, n), out_dtype), xp,
                                 block_size=defaults.for_backend().symmetric_block, remat=False)


def _symmetric_cosine(xp: Prepared, out_dtype, precision) -> jax.Array:
  """`cosine(x)` of 2-D rows from the upper tiles (see `symmetric_dense`); its
  derivative is that of the one-matmul form, which runs only when differentiated."""
  # 0 for a finite row, NaN for one with a non-finite entry: adding it after the clip
  # costs two adds a score, where a select on both rows' flags costs more in the loop.
  bad = jnp.where(jnp.isfinite(xp.aux), 0.0, jnp.nan).astype(xp.aux.dtype)
  finish = lambda dots, br, bc: jnp.clip(dots, -1.0, 1.0) + br + bc
  idx = jnp.arange(xp.rows.shape[-2])
  value = symmetric_dense(Prepared(jax.lax.stop_gradient(xp.rows), bad), finish, out_dtype,
                          precision=precision)
  value = value.at[idx, idx].set(jax.lax.stop_gradient(xp.aux).astype(out_dtype))
  s = score(xp, xp, "cosine", precision=precision)
  return with_tangent_of(value, s.at[idx, idx].set(xp.aux).astype(out_dtype))


def _symmetric_dot(x: jax.Array, scale, out_dtype, precision) -> jax.Array:
  """`dot(x)` (`scale=None`) or `scaled_dot(x)` of 2-D rows from the upper tiles (see
  `symmetric_dense`), exactly symmetric; differentiated as the one matmul."""
  acc = accum_dtype(x.dtype)
  if scale is None:
    finish = lambda dots, br, bc: dots
  else:
    scale = jnp.asarray(scale, acc)
    finish = lambda dots, br, bc: dots * scale
  rows = Prepared(jax.lax.stop_gradient(x), jnp.zeros(x.shape[:-1], acc))
  value = symmetric_dense(rows, finish, out_dtype, precision=precision)
  return with_tangent_of(value, finish(matmul_t(x, x, precision), None, None).astype(out_dtype))


def _symmetric(x, metric, eps, scale, precision):
  if metric == "cosine":
    return _symmetric_cosine(prepare(x, metric, eps=eps), x.dtype, precision)
  return _symmetric_dot(x, scale if metric == "scaled_dot" else None, x.dtype, precision)


def _use_symmetric(x: jax.Array, metric: str) -> bool:
  return (metric in SYMMETRIC_MIN_ROWS and x.ndim == 2 and x.shape[0] >= SYMMETRIC_MIN_ROWS[metric]
          and x.shape[1] >= SYMMETRIC_MIN_DIM and defaults.for_backend().symmetric_block > 0)


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
  if self_sim and _use_symmetric(x, metric):
    return _symmetric(x, metric, eps, scale, precision)
  shift = centre(x if self_sim else y) if metric in DISTANCES else None
  xp = prepare(x, metric, eps=eps, shift=shift)
  yp = xp if self_sim else prepare(y, metric, eps=eps, shift=shift)
  if metric in DISTANCES:
    s = score(xp, yp, "sq_euclidean", precision=precision)
    s = refine_dense(s, x, x if self_sim else y, xp, yp, skip_diagonal=self_sim)
    if metric == "euclidean":
      s = safe_sqrt(s)
  else:
    s = score(xp, yp, metric, scale=scale, precision=precision)
  if self_sim and metric in ("cosine", "sq_euclidean", "euclidean"):
    # Exact diagonals: the squared norm of the prepared row under cosine (1 for rows
    # above the eps clamp, 0 for zero rows), 0 for self-distances. A scatter writes n
    # values in place; a select over an eye mask would be one more pass over all n^2.
    idx = jnp.arange(s.shape[-1])
    s = s.at[..., idx, idx].set(xp.aux if metric == "cosine" else 0.0)
  s = s.astype(x.dtype)
  drop = tuple(s.ndim + ax for ax, sq in ((-2, squeeze_x), (-1, squeeze_y)) if sq)
  return jnp.squeeze(s, axis=drop) if drop else s


@functools.cache
def device_memory(device) -> int | None:
  """Bytes of memory of `device` (the host's RAM for a CPU), or None if unknown."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
  return None


# Scores of an unbatched call below which no device is too small to hold the result.
_ALWAYS_FITS = 1 << 20


def check_dense_fits(x, y, name: str) -> None:
  """Raises before a dense score matrix that cannot fit in memory is attempted."""
  rows = lambda a: a.shape[-2] if a.ndim > 1 else 1
  n, m = rows(x), rows(x if y is None else y)
  if n * m <= _ALWAYS_FITS and x.ndim <= 2 and (y is None or y.ndim <= 2):
    return  # The common small call skips the shape and device queries.
  batch = np.broadcast_shapes(x.shape[:-2], () if y is None else y.shape[:-2])
  # The float32 scores plus the result in the input dtype.
  need = int(np.prod(batch, dtype=np.int64)) * n * m * (
      accum_dtype(x.dtype).itemsize + jnp.dtype(x.dtype).itemsize)
  devices = x.devices() if isinstance(x, jax.Array) and not isinstance(
      x, jax.core.Tracer) else jax.devices()[:1]
  limit = device_memory(next(iter(devices)))
  if limit is not None and need > limit:
    raise ValueError(
        f"jaxsim.{name}: the {(*batch, n, m)} score matrix needs {need / 2**30:.1f} GiB, more "
        f"than the device's {limit / 2**30:.1f} GiB of memory. Stream the scores instead "
        "with jaxsim.topk (nearest rows), jaxsim.pairs_above (pairs past a threshold) or "
        "jaxsim.similarity_stats (all-pairs statistics).")


def _dense_spec(x, y=None, **_) -> jax.sharding.PartitionSpec:
  """Where `pairwise`'s `(..., n, m)` result lies under `Explicit` mesh axes: its rows
  and batch dims as `x`'s, its columns as `y`'s rows unless a mesh axis is already
  used (a set against itself: every device holds all columns)."""
  entries = sharding.spec_entries

  def axes(entry):
    return set() if entry is None else {entry} if isinstance(entry, str) else set(entry)

  xe, xd = entries(x), np.ndim(x)
  yd = xd if y is None else np.ndim(y)
  batch = (None,) * (max(xd, yd, 2) - 2 - max(xd - 2, 0)) + xe[:-2]
  used = set().union(*map(axes, batch))
  rows = () if xd < 2 else (None,) if axes(xe[-2]) & used else (xe[-2],)
  used |= axes(rows[0]) if rows else set()
  col = None if y is None or yd < 2 else entries(y)[-2]
  cols = () if yd < 2 else (None if axes(col) & used else col,)
  return jax.sharding.PartitionSpec(*batch, *rows, *cols)


@sharding.auto_axes(_dense_spec)
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
    eps: cosine only; `>= 0`, the clamp on each row's squared norm (see `cosine`).
    scale: scaled_dot only; defaults to `1/sqrt(d)`.
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    `(..., n, m)` scores in the inputs' floating dtype (integers promote to the default
    float). A 1-D `x` drops the `n` axis and a 1-D `y` the `m` axis, so two vectors
    give a scalar.

  Raises:
    TypeError: for complex or non-numeric inputs, or a non-numeric option.
    ValueError: for rank-0 inputs, mismatched feature dims, batch dims that do not
      broadcast, an unknown metric, a NaN or negative `eps`, a NaN `scale`, or a
      score matrix larger than the device's memory.
  """
  check_metric(metric)
  x, y = validation.pair(x, y)
  eps = validation.check_scalar(eps, "eps")
  if isinstance(eps, (int, float)) and eps < 0:
    raise ValueError(f"`eps` must be >= 0, got {eps!r}.")
  if scale is None:
    scale = default_scale(x.shape[-1])
  scale = validation.check_scalar(scale, "scale")
  check_dense_fits(x, y, metric)
  # Options are traced arguments, not compiled-in constants: sweeping `eps` or `scale`
  # reuses one program. Python numbers pass as weakly typed scalars (float() so that
  # 0 and 0.0 share it too).
  eps, scale = (float(v) if isinstance(v, (int, float)) else v for v in (eps, scale))
  return _pairwise_jit(x, y, eps, scale, metric=metric, precision=precision)


_pairwise_jit = jax.jit(_pairwise, static_argnames=("metric", "precision"))


def dot(x: ArrayLike, y: ArrayLike | None = None, *, precision=None) -> jax.Array:
  r"""Pairwise dot products :math:`s_{ij} = x_i \cdot y_j`.

  Args:
    x: `(..., n, d)` array, or a `(d,)` vector.
    y: `(..., m, d)` array, a `(d,)` vector, or `None` for `x` against itself.
    precision: `jax.lax.Precision` passed to the matmul.

  Returns:
    `(..., n, m)` array in the inputs' floating dtype, accumulated in float32 or wider.
    On CPU, `y=None` with 4096 rows or more of 512 features or more is computed from
    the 256-row tiles on and above the diagonal, each mirrored (as `cosine`): exactly
    symmetric, from half the flops.

  Examples:
    >>> import jax.numpy as jnp, jaxsim
    >>> jaxsim.dot(jnp.array([[1., 2.]]), jnp.array([[3., 4.], [0., 1.]]))
    Array([[11.,  2.]], dtype=float32)
  """
  return pairwise(x, y, metric="dot", precision=precision)


def cosine(x: ArrayLike, y: ArrayLike | None = None, *, eps: float = 0.0,
           precision=None) -> jax.Array:
  r"""Pairwise cosine similarity :math:`s_{ij} = \hat x_i \cdot \hat y_j`.

  With :math:`\hat x = x / \sqrt{\max(\lVert x \rVert^2, \epsilon)}`. Each row is
  normalised once (O(n d)), then one matmul; values are clipped to `[-1, 1]`. A zero
  row has cosine 0 against everything, with a zero gradient, never NaN; a row with an
  infinite or NaN entry has NaN cosines. For `y=None` the diagonal is exactly 1 for
  rows above the clamp. Normalisation is one pass, `x * rsqrt(|x|^2)`, where no square
  can overflow or underflow; float16 and bfloat16 rows, and sets with a row of squared
  norm outside `[2**-40, 2**40]`, divide each row by its largest entry first, so fp16
  rows of large magnitude and float32 rows of magnitude 1e-30 are both exact,
  gradients included. XLA flushes subnormal numbers to zero, so a row whose entries
  are all subnormal counts as a zero row. On CPU, `y=None` with 2048 rows or more of
  512 features or more computes only the 256-row tiles on and above the diagonal and
  mirrors each: half the flops of the matmul.

  Args:
    x: `(..., n, d)` array, or a `(d,)` vector.
    y: `(..., m, d)` array, a `(d,)` vector, or `None` for `x` against itself.
    eps: `>= 0`, a clamp on each row's squared norm, the convention of optax's
      `cosine_similarity` `epsilon` (not torch's `eps`, which clamps the product of
      the two norms): a row of norm 1e-3 against its own direction gives 0.1 with
      `eps=1e-4`. The default 0 normalises every nonzero row exactly.
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
    `(..., n, m)` array in the inputs' floating dtype. For `y=None` on CPU, as for
    `dot`: from mirrored upper tiles at 4096 x 512 and above, the scale applied to each
    float32 tile.

  References:
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
  """
  return pairwise(x, y, metric="scaled_dot", scale=scale, precision=precision)


def sq_euclidean(x: ArrayLike, y: ArrayLike | None = None, *, precision=None) -> jax.Array:
  r"""Pairwise squared Euclidean distances :math:`\lVert x_i - y_j \rVert^2`.

  Computed as :math:`\lVert x_i\rVert^2 + \lVert y_j\rVert^2 - 2 x_i \cdot y_j` on rows
  centred at the mean of `y`, one matmul; the pairs closer than :math:`2^{-5}` of
  their squared norms, where that expansion's rounding error would dominate, are
  recomputed directly as :math:`\sum_k (x_{ik} - y_{jk})^2` (see
  `jaxsim._src.refine`), so near-duplicates get their float32 distance and equal rows
  exactly 0. A pair with an infinite or NaN entry gets the direct difference's IEEE
  value (inf or NaN). Gradients are those of the expansion.

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
