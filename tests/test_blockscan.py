"""The shared block loop: results independent of block size, padding invisible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsim._src import blockscan


@pytest.mark.parametrize("block_size", [None, 1, 3, 7, 10, 64])
def test_block_scan_sums_and_counts_every_row_once(block_size):
  x = jnp.arange(10.0 * 3).reshape(10, 3)

  def step(carry, block, start, valid):
    total, count, first = carry
    total = total + jnp.sum(jnp.where(valid[:, None], block, 0.0), axis=0)
    return total, count + jnp.sum(valid), jnp.minimum(first, start)

  total, count, first = blockscan.block_scan(
      step, (jnp.zeros(3), jnp.int32(0), jnp.int32(99)), x, block_size=block_size)
  np.testing.assert_allclose(total, np.asarray(x).sum(0))
  assert int(count) == 10 and int(first) == 0


@pytest.mark.parametrize("axis", [0, 1])
def test_block_scan_passes_blocks_along_axis_with_their_start(axis):
  x = jax.random.normal(jax.random.key(0), (5, 11, 2) if axis == 1 else (11, 5, 2))

  def step(carry, block, start, valid):
    rows = jnp.moveaxis(block, axis, 0)
    idx = (start + jnp.arange(rows.shape[0])).astype(rows.dtype)
    return carry + jnp.sum(jnp.where(valid[:, None, None], rows * idx[:, None, None], 0.0))

  want = np.sum(np.moveaxis(np.asarray(x), axis, 0) * np.arange(11)[:, None, None])
  got = blockscan.block_scan(step, jnp.float32(0), x, block_size=4, axis=axis)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("block_size", [None, 1, 4, 9])
@pytest.mark.parametrize("axis", [0, 1])
def test_block_map_equals_unblocked(block_size, axis):
  x = jax.random.normal(jax.random.key(1), (9, 6) if axis == 0 else (6, 9))
  fn = lambda a: (jnp.tanh(a) * 2, jnp.sum(a, axis=1 - axis, keepdims=True))
  got, want = blockscan.block_map(fn, x, block_size=block_size, axis=axis), fn(x)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6)


def test_block_scan_gradient_matches_unblocked():
  x = jax.random.normal(jax.random.key(2), (13, 4))

  def blocked(a):
    step = lambda c, b, s, v: c + jnp.sum(jnp.where(v[:, None], jnp.sin(b) ** 2, 0.0))
    return blockscan.block_scan(step, jnp.float32(0), a, block_size=5)

  np.testing.assert_allclose(jax.grad(blocked)(x), jax.grad(lambda a: jnp.sum(jnp.sin(a) ** 2))(x),
                             rtol=1e-5)


def test_block_scan_rejects_mismatched_leaves():
  with pytest.raises(ValueError, match="share the size"):
    blockscan.block_scan(lambda c, b, s, v: c, 0.0, (jnp.ones(3), jnp.ones(4)), block_size=2)


@pytest.mark.parametrize("block_size", [1, 3, 4, 7, 9, 10, 64])
def test_block_scan_in_place_tail_visits_every_row_once(block_size):
  # pad_tail=False: the last block is shifted back instead of padded; rows it shares
  # with the previous block come marked not valid.
  x = jnp.arange(10.0 * 3).reshape(10, 3)

  def step(carry, block, start, valid):
    total, count, seen = carry
    total = total + jnp.sum(jnp.where(valid[:, None], block, 0.0), axis=0)
    rows = start + jnp.arange(block.shape[0])
    seen = seen.at[rows].add(valid.astype(jnp.int32))
    return total, count + jnp.sum(valid), seen

  init = (jnp.zeros(3), jnp.int32(0), jnp.zeros(10, jnp.int32))
  total, count, seen = blockscan.block_scan(step, init, x, block_size=block_size,
                                            pad_tail=False)
  np.testing.assert_allclose(total, np.asarray(x).sum(0))
  assert int(count) == 10
  np.testing.assert_array_equal(seen, np.ones(10))


def test_block_scan_in_place_tail_gradient_matches_unblocked():
  x = jax.random.normal(jax.random.key(3), (13, 4))

  def blocked(a):
    step = lambda c, b, s, v: c + jnp.sum(jnp.where(v[:, None], jnp.sin(b) ** 2, 0.0))
    return blockscan.block_scan(step, jnp.float32(0), a, block_size=5, pad_tail=False)

  np.testing.assert_allclose(jax.grad(blocked)(x), jax.grad(lambda a: jnp.sum(jnp.sin(a) ** 2))(x),
                             rtol=1e-5)


@pytest.mark.parametrize("block_size,count", [(None, 1), (None, 3), (1, 8), (3, 1), (3, 8),
                                              (4, 3), (7, 1), (7, 2)])
def test_triangle_scan_visits_each_unordered_pair_once_in_row_major_order(block_size, count):
  # Rows carry their index; each tile adds the pairs (r, c), r <= c, that it covers.
  # Summed over the shards, every pair of the upper triangle is counted exactly once,
  # and every row block meets column blocks in ascending order.
  m = 10
  x = jnp.arange(m, dtype=jnp.int32)

  def step(carry, rows, cols, r_start, c_start, r_valid, c_valid):
    seen, last, ordered = carry
    pair = (r_valid[:, None] & c_valid[None, :] & (rows[:, None] <= cols[None, :])
            & (r_start <= c_start))
    seen = seen.at[rows[:, None], cols[None, :]].add(pair.astype(jnp.int32))
    # Arrival order: the column side of a row block must not go backwards.
    live = jnp.any(r_valid)
    ordered &= ~live | ((last[rows[0]] <= c_start) & (last[cols[0]] <= r_start))
    last = jnp.where(live, last.at[rows].max(c_start).at[cols].max(r_start), last)
    return seen, last, ordered

  init = (jnp.zeros((m, m), jnp.int32), jnp.full((m,), -1, jnp.int32), jnp.bool_(True))
  total = jnp.zeros((m, m), jnp.int32)
  for index in range(count):
    seen, _, ordered = blockscan.triangle_scan(step, init, x, block_size=block_size,
                                               shard=(index, count))
    assert bool(ordered)
    total = total + seen
  np.testing.assert_array_equal(total, np.triu(np.ones((m, m), np.int32)))
