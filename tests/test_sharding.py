"""The multi-device helpers: shards, global offsets, padding, device order, and meshes and
inputs with Explicit axes."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsim
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
  explicit = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
  auto = sharding.check_mesh(explicit)
  assert auto.axis_types == (jax.sharding.AxisType.Auto,)
  assert (auto.devices == explicit.devices).all()


# Every reduction that takes `mesh=`, on 1003 rows (uneven over 8 devices: the corpus is
# placed as shards first).
_REDUCTIONS = {
    "topk": lambda q, x, mesh: jaxsim.topk(q, x, 7, mesh=mesh),
    "topk_self_euclidean": lambda q, x, mesh: jaxsim.topk(x, None, 7, metric="sq_euclidean",
                                                          exclude_self=True, mesh=mesh),
    "pairs_above": lambda q, x, mesh: jaxsim.pairs_above(q, x, threshold=0.4, max_pairs=4096,
                                                         mesh=mesh),
    "similarity_stats_self": lambda q, x, mesh: jaxsim.similarity_stats(x, mesh=mesh),
    "index": lambda q, x, mesh: jaxsim.Index(x, mesh=mesh).search(q, 7),
    "shard_rows": lambda q, x, mesh: jaxsim.topk(
        q, x if mesh is None else jaxsim.shard_rows(x, mesh), 7, mesh=mesh),
}


@pytest.mark.parametrize("name", sorted(_REDUCTIONS))
def test_a_mesh_from_make_mesh_gives_the_single_device_results(name):
  # `jax.make_mesh` gives Explicit axes (the default of current JAX), under whose rules the
  # reductions' own merging of per-device results failed to trace.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1003, 32), dtype=np.float32)
  q = rng.standard_normal((64, 32), dtype=np.float32)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
  got, want = (_REDUCTIONS[name](q, x, m) for m in (mesh, None))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


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


# Inputs typed with Explicit mesh axes (sharding in types), where JAX asks every
# operation for a sharding it can infer: the rows of `x` and `q` split over 4 devices.
_EXPLICIT_CALLS = {
    "cosine_self": (lambda q, x, b: jaxsim.cosine(x), P("d", None)),
    "cosine_cross": (lambda q, x, b: jaxsim.cosine(q, x), P("d", None)),
    "euclidean_self": (lambda q, x, b: jaxsim.euclidean(x), P("d", None)),
    "dot_batched": (lambda q, x, b: jaxsim.dot(b, b), P("d", None, None)),
    "topk": (lambda q, x, b: jaxsim.topk(q, x, 5), P()),
    "topk_self_mesh": (lambda q, x, b: jaxsim.topk(
        x, None, 5, exclude_self=True, mesh=jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])),
                       P()),
    "similarity_stats": (lambda q, x, b: jaxsim.similarity_stats(q, x), P()),
    "index": (lambda q, x, b: jaxsim.Index(x).search(q, 5), P()),
    # By keyword: the result's layout is found from `query` however it is passed.
    "attention_blocked": (lambda q, x, b: jaxsim.attention(
        query=b.reshape(4, 40, 2, 12), key=b.reshape(4, 40, 2, 12),
        value=b.reshape(4, 40, 2, 12), block_size=8), P("d", None, None, None)),
}


@pytest.mark.parametrize(("name", "context"), [
    *((name, False) for name in sorted(_EXPLICIT_CALLS)),
    *((name, True) for name in ("cosine_cross", "topk_self_mesh", "similarity_stats", "index",
                                "attention_blocked"))])
def test_explicitly_sharded_inputs_give_the_unsharded_results(name, context):
  """`context`: the call also runs inside `jax.set_mesh` of the Explicit mesh."""
  call, spec = _EXPLICIT_CALLS[name]
  rng = np.random.default_rng(1)
  q, x = (rng.standard_normal((m, 24), dtype=np.float32) for m in (64, 520))
  b = rng.standard_normal((4, 40, 24), dtype=np.float32)
  mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:4])
  placed = [jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (q, x, b)]
  with jax.set_mesh(mesh) if context else contextlib.nullcontext():
    got = call(*placed)
  want = call(q, x, b)
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-6, atol=1e-6)
  # Dense scores stay split by the rows of the first set; reductions come back whole.
  first = jax.tree.leaves(got)[0]
  assert tuple(first.sharding.spec) + (None,) * (first.ndim - len(first.sharding.spec)) == (
      tuple(spec) + (None,) * (first.ndim - len(spec)))
