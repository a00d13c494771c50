r"""Exact Euclidean distances where the fast expansion cannot be trusted.

The Euclidean metrics are computed as one matmul through the expansion

.. math:: \hat s_{ij} = \lVert x_i\rVert^2 + \lVert y_j\rVert^2 - 2\, x_i \cdot y_j

on rows centred near the data (`kernels.centre`). Its rounding error is absolute, not
relative: with unit roundoff :math:`u` of the accumulation dtype, :math:`u_{in}` of the
input dtype and feature dim :math:`d`, the standard dot-product bound (Higham,
Theorem 3.5) gives

.. math:: |\hat s_{ij} - s_{ij}| \le E_{ij} = \big((d + 4)\,u + 3\,u_{in}\big)
          \big(\lVert x_i\rVert^2 + \lVert y_j\rVert^2\big),

so a pair much closer than its rows' norms (a near-duplicate) comes back as noise, or
as 0. This module recomputes such pairs directly as :math:`\sum_k (x_{ik} - y_{jk})^2`
from the raw rows, which is accurate to a few ulps relative and exactly 0 for equal
rows:

- the dense forms (`jaxsim.sq_euclidean`, `jaxsim.euclidean`) and the all-pairs
  statistics recompute the close pairs, :math:`\hat s_{ij} \le \rho (\lVert
  x_i\rVert^2 + \lVert y_j\rVert^2)` with :math:`\rho = 2^{-5}`, so every other
  pair keeps a relative error below :math:`E_{ij} / (\rho\, (\lVert x_i\rVert^2 +
  \lVert y_j\rVert^2))`, and in practice (errors growing like :math:`\sqrt d\, u`) far
  below;
- `jaxsim.pairs_above` recomputes the pairs whose side of the threshold the bound
  leaves open, :math:`|\hat s_{ij} - t| \le E_{ij}`, and every pair it returns;
- `jaxsim.topk` keeps each device's `k + TOPK_EXTRA` best candidates by the expansion
  and recomputes them all. Every other row has an expansion at least the worst
  candidate's, so a squared distance at least that minus :math:`E`; where that floor
  does not clear the k-th recomputed distance (tight clusters, many rows within the
  expansion's noise), a second scan recomputes every row the bound leaves within
  reach of the k-th, so the result is the exact top-k of the direct distances either
  way. The second scan runs only when some query needs it.

References:
  Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., SIAM 2002, §3.1.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Close pairs, recomputed by the dense forms: expansion below RHO x (|x|^2 + |y|^2).
RHO = 2.0**-5
# Extra top-k candidates kept by the expansion and recomputed exactly.
TOPK_EXTRA = 16
# Pairs recomputed per step of the refinement loop, from at most ROWS rows.
CHUNK = 4096
ROWS = 64


def error_bound(aux_x: jax.Array, aux_y: jax.Array, d: int, in_dtype) -> jax.Array:
  """`E_ij` of the module docstring for `(..., n)` and `(..., m)` squared norms."""
  u = float(jnp.finfo(aux_x.dtype).eps) / 2
  u_in = float(jnp.finfo(in_dtype).eps) / 2
  c = (d + 4) * u + 3 * u_in
  return c * (aux_x[..., :, None] + aux_y[..., None, :])


def direct_sq(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """`sum((a - b)**2, -1)` in `dtype`: the difference first, so equal rows give 0."""
  diff = a.astype(dtype) - b.astype(dtype)
  return jnp.sum(diff * diff, axis=-1)


def refine_where(s: jax.Array, mask: jax.Array, exact: Callable[[jax.Array, jax.Array],
                 jax.Array], *, chunk: int = CHUNK) -> jax.Array:
  """`s` with the entries where `mask` holds replaced by `exact(rows, cols)`.

  Walks the masked entries in row-major order, `chunk` at a time, with a
  `while_loop` that does not run at all when `mask` is empty (the common case).

  Args:
    s: `(n, m)` values.
    mask: `(n, m)` bool, the entries to recompute.
    exact: `exact(rows, cols) -> (chunk,)` values for int32 index vectors.
    chunk: entries recomputed per loop step.
  """
  n, m = s.shape
  size = min(chunk, n * m)
  if size == 0:
    return s
  total = jnp.sum(mask, dtype=jnp.int32)

  rows_per_step = min(n, ROWS)

  def body(state):
    done, last_r, last_c, s = state
    # Entries after (last_r, last_c) in row-major order: the ones not yet done. The
    # index grids are built here, fused into this pass, not kept as loop constants.
    row_ids = lax.broadcasted_iota(jnp.int32, (n, m), 0)
    col_ids = lax.broadcasted_iota(jnp.int32, (n, m), 1)
    todo = mask & ((row_ids > last_r) | ((row_ids == last_r) & (col_ids > last_c)))
    # Two small compactions instead of one over all n x m entries (jnp.nonzero's
    # scatter is the costly part on CPU): the next rows holding entries, then the
    # entries of those rows.
    (rows,) = jnp.nonzero(jnp.any(todo, axis=1), size=rows_per_step, fill_value=n)
    sub = todo.at[rows].get(mode="fill", fill_value=False)
    i, c = jnp.nonzero(sub, size=size, fill_value=0)
    count = jnp.minimum(jnp.sum(sub, dtype=jnp.int32), size)
    r = rows[i].astype(jnp.int32)
    used = jnp.arange(size, dtype=jnp.int32) < count
    vals = exact(jnp.minimum(r, n - 1), c.astype(jnp.int32)).astype(s.dtype)
    s = s.at[jnp.where(used, r, n), c].set(vals, mode="drop")
    return done + count, r[count - 1], c[count - 1].astype(jnp.int32), s

  def loop(s):
    state = (jnp.int32(0), jnp.int32(-1), jnp.int32(-1), s)
    return lax.while_loop(lambda st: st[0] < total, body, state)[3]

  # Usually nothing is masked: then not even the loop's set-up runs.
  return lax.cond(total > 0, loop, lambda s: s, s)
