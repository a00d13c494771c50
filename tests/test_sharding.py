"""The corpus-splitting helper: shards, global offsets, padding, device order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxsim._src import sharding


def _local(rows, offset, scale):
  # Which global rows this shard holds, and the sum of its real rows.
  n_real = jnp.sum(rows[:, 1] > 0)
  return offset, n_real, scale * jnp.sum(rows[:, 0])


@pytest.mark.parametrize("n", [8, 21, 3])
@pytest.mark.parametrize("shape", [(8,), (2, 4)])
def test_map_shards_splits_rows_in_device_order(n, shape):
  mesh = Mesh(np.array(jax.devices()).reshape(shape), ("a",) if len(shape) == 1 else ("a", "b"))
  # Column 0: the row's index; column 1: 1 for real rows (padding rows are zeros).
  rows = np.stack([np.arange(n), np.ones(n)], 1).astype(np.float32)
  offsets, counts, sums = sharding.map_shards(_local, rows, jnp.float32(2.0), mesh=mesh)
  per = sharding.shard_rows(n, mesh)
  np.testing.assert_array_equal(offsets, np.arange(8) * per)
  want_counts = np.clip(n - np.arange(8) * per, 0, per)
  np.testing.assert_array_equal(counts, want_counts)
  want_sums = [2.0 * np.arange(o, o + c).sum() for o, c in zip(offsets, want_counts, strict=True)]
  np.testing.assert_allclose(sums, want_sums)


def test_map_shards_without_mesh_is_one_shard():
  rows = np.ones((5, 2), np.float32)
  offsets, counts, sums = sharding.map_shards(_local, rows, jnp.float32(1.0), mesh=None)
  assert offsets.shape == (1,) and int(offsets[0]) == 0
  assert int(counts[0]) == 5 and float(sums[0]) == 5.0


def test_check_mesh():
  assert sharding.check_mesh(None) is None
  with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh"):
    sharding.check_mesh("devices")


@pytest.mark.parametrize("mesh_shape", [None, (8,), (2, 4)])
def test_map_devices_runs_once_per_device_in_order(mesh_shape):
  mesh = None if mesh_shape is None else Mesh(
      np.array(jax.devices()).reshape(mesh_shape), ("a", "b")[:len(mesh_shape)])
  index, count, total = sharding.map_devices(
      lambda i, c, v: (i, jnp.int32(c), jnp.sum(v)), jnp.arange(4.0), mesh=mesh)
  size = sharding.num_shards(mesh)
  np.testing.assert_array_equal(index, np.arange(size))
  np.testing.assert_array_equal(count, np.full(size, size))
  np.testing.assert_allclose(total, np.full(size, 6.0))
