"""The one block loop behind every streamed reduction.

`block_scan` walks a row set in fixed-size blocks with `lax.scan`, carrying a running
state; top-k search, threshold pairs, all-pairs statistics and blocked attention are
each just a `step` function (how one block updates the state). `block_map` splits the
other side (queries) into blocks with `lax.map`, so that temporaries stay
O(query_block x corpus_block) however many rows either side has. `triangle_scan` walks
the tiles `(i, j)`, `i <= j`, of a set compared with itself: every score of a
symmetric similarity is computed once.

Blocks are made by padding the row axis up to a multiple of the block size; `step`
receives a `valid` mask so padding never reaches a result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _axis_size(tree: PyTree, axis: int) -> int:
  sizes = {leaf.shape[axis] for leaf in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(f"All leaves must share the size of axis {axis}, got sizes {sorted(sizes)}.")
  return sizes.pop()


def _to_blocks(tree: PyTree, block_size: int, num_blocks: int, axis: int) -> PyTree:
  """Pads `axis` to `num_blocks * block_size` and splits it into a leading block axis."""

  def split(leaf):
    ax = axis % leaf.ndim
    pad = num_blocks * block_size - leaf.shape[ax]
    if pad:
      widths = [(0, 0)] * leaf.ndim
      widths[ax] = (0, pad)
      leaf = jnp.pad(leaf, widths)
    leaf = leaf.reshape(leaf.shape[:ax] + (num_blocks, block_size) + leaf.shape[ax + 1:])
    return jnp.moveaxis(leaf, ax, 0)

  return jax.tree.map(split, tree)


def num_blocks(size: int, block_size: int) -> int:
  return max(1, -(-size // block_size))


def block_scan(step: Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree], init: PyTree,
               xs: PyTree, *, block_size: int | None, axis: int = 0,
               remat: bool = True, pad_tail: bool = True) -> PyTree:
  """Folds `step` over blocks of `xs` along `axis`.

  Args:
    step: `step(carry, block, start, valid) -> carry`, where `block` is `xs` cut to
      `block_size` rows along `axis`, `start` the int32 index of its first row, and
      `valid` a `(block_size,)` bool mask, False on padding rows.
    init: the initial carry.
    xs: pytree of arrays that share the size `m` of `axis`.
    block_size: rows per block; `None` or `>= m` runs `step` once on all of `xs`.
    axis: the row axis of every leaf of `xs`.
    remat: recompute each block in the backward pass (`jax.checkpoint`) instead of
      storing its temporaries, so gradients also stay O(block) in memory.
    pad_tail: when `m` is not a multiple of `block_size`, pad `xs` with zero rows
      (True), or (False) slice every block straight out of `xs` and shift the last
      one back to end at row `m`, marking the rows the previous block already covered
      as not `valid`. False avoids copying `xs` into a padded buffer, a full extra
      pass over a large corpus; `step` then sees some rows twice, once as not valid.

  Returns:
    The final carry.
  """
  m = _axis_size(xs, axis)
  if block_size is None or block_size >= m:
    return step(init, xs, jnp.int32(0), jnp.ones((m,), bool))
  nb = num_blocks(m, block_size)
  if not pad_tail:  # also when block_size divides m: no block-major copy of xs
    return _scan_in_place(step, init, xs, block_size, nb, m, axis, remat)
  blocks = _to_blocks(xs, block_size, nb, axis)
  starts = jnp.arange(nb, dtype=jnp.int32) * block_size
  offsets = jnp.arange(block_size, dtype=jnp.int32)
  body_step = jax.checkpoint(step) if remat else step

  def body(carry, inputs):
    block, start = inputs
    return body_step(carry, block, start, start + offsets < m), None

  carry, _ = jax.lax.scan(body, init, (blocks, starts))
  return carry


def _scan_in_place(step, init, xs, block_size, nb, m, axis, remat):
  offsets = jnp.arange(block_size, dtype=jnp.int32)
  body_step = jax.checkpoint(step) if remat else step

  def body(carry, start):
    first = jnp.minimum(start, m - block_size)
    block = jax.tree.map(
        lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, first, block_size, axis % leaf.ndim), xs)
    return body_step(carry, block, first, first + offsets >= start), None

  carry, _ = jax.lax.scan(body, init, jnp.arange(nb, dtype=jnp.int32) * block_size)
  return carry


def triangle_scan(step: Callable[..., PyTree], init: PyTree, xs: PyTree, *,
                  block_size: int | None, shard: tuple[Any, int] = (0, 1),
                  remat: bool = True) -> PyTree:
  """Folds `step` over the upper-triangle tiles of `xs` against itself.

  The rows are cut into `nb` blocks as `block_scan(..., pad_tail=False)` cuts them (the
  last block shifted back to end at row `m`, its rows already covered marked not
  valid), and `step` runs once for each pair of blocks `(i, j)` with `i <= j`, in
  row-major order: `i` ascending, then `j` ascending. Every row block therefore meets
  the column blocks in ascending order, first as the column side of the tiles
  `(i, r)`, `i < r`, then as the row side of `(r, j)`, `j >= r`, so running merges
  that break ties by arrival order break them by lower index.

  Args:
    step: `step(carry, rows, cols, row_start, col_start, row_valid, col_valid) ->
      carry`, with `rows` and `cols` blocks of `xs` (the same block on the diagonal,
      where `row_start == col_start`), their int32 first-row indices and `(b,)` bool
      masks.
    init: the initial carry.
    xs: pytree of arrays sharing the row count `m` of axis 0.
    block_size: rows per block; `None` or `>= m`: one diagonal tile of all rows.
    shard: `(index, count)`: walk only the `index`-th of `count` equal, contiguous runs
      of the row-major tile list (`index` may be traced, e.g. a device's
      `lax.axis_index`). Runs are padded to equal length with tiles whose masks are
      all False, which `step` must treat as empty.
    remat: recompute each tile in the backward pass instead of storing it.

  Returns:
    The final carry.
  """
  m = _axis_size(xs, 0)
  b = m if block_size is None or block_size >= m else block_size
  nb = num_blocks(m, b)
  index, count = shard
  rows, cols = np.triu_indices(nb)
  per = -(-rows.size // count)
  live = np.arange(per * count) < rows.size
  tiles = np.stack([np.resize(rows, per * count), np.resize(cols, per * count), live], axis=1)
  mine = jax.lax.dynamic_index_in_dim(jnp.asarray(tiles.reshape(count, per, 3), jnp.int32),
                                      index, keepdims=False)
  offsets = jnp.arange(b, dtype=jnp.int32)
  body_step = jax.checkpoint(step) if remat else step

  def block(k, ok):
    start = k * b
    first = jnp.minimum(start, m - b)
    cut = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, first, b), xs)
    return cut, first, ok & (first + offsets >= start)

  def body(carry, tile):
    ok = tile[2] > 0
    r, r_start, r_valid = block(tile[0], ok)
    c, c_start, c_valid = block(tile[1], ok)
    return body_step(carry, r, c, r_start, c_start, r_valid, c_valid), None

  carry, _ = jax.lax.scan(body, init, mine)
  return carry


def block_map(fn: Callable[[PyTree], PyTree], xs: PyTree, *, block_size: int | None,
              axis: int = 0) -> PyTree:
  """Applies `fn` to blocks of `xs` along `axis` one at a time and concatenates.

  Args:
    fn: maps a block of `block_size` rows to a pytree whose leaves keep the row axis
      at `axis` with `block_size` rows. Rows must be independent: padding rows are
      computed and then dropped.
    xs: pytree of arrays sharing the size `n` of `axis`.
    block_size: rows per block; `None` or `>= n` calls `fn` once on all of `xs`.
    axis: the row axis.

  Returns:
    `fn` applied to all `n` rows, as if called once.
  """
  n = _axis_size(xs, axis)
  if block_size is None or block_size >= n:
    return fn(xs)
  nb = num_blocks(n, block_size)
  out = jax.lax.map(fn, _to_blocks(xs, block_size, nb, axis))

  def merge(leaf):
    ax = axis % (leaf.ndim - 1)
    leaf = jnp.moveaxis(leaf, 0, ax)
    leaf = leaf.reshape(leaf.shape[:ax] + (nb * block_size,) + leaf.shape[ax + 2:])
    return jax.lax.slice_in_dim(leaf, 0, n, axis=ax)

  return jax.tree.map(merge, out)
