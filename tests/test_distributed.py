"""Rows spread over processes: `jaxsim.shard_rows` and multi-process calls.

The multi-process tests launch real processes (2 processes x 2 CPU devices,
`jax.distributed` over gloo) with `experiments.distributed.launch`, and compare each
process's results with the single-process call over all rows on a mesh of 4 devices
(the same shards, so bitwise). The in-process tests cover the same layout on one
process, where `shard_rows` is the identity on the rows.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxsim
from experiments import distributed as launcher
from jaxsim._src import distributed
from tests import reference


@pytest.fixture(scope="module")
def two_by_two():
  """2 processes x 2 CPU devices over an uneven corpus: results of every process."""
  kw = dict(counts=[517, 300], d=24, q=9, k=7, threshold=0.6, max_pairs=2048)
  results = launcher.launch("experiments.distributed:uneven_worker", processes=2,
                            devices_per_process=2, kwargs=kw, timeout=60)
  return kw, results


def test_two_processes_equal_single_process(two_by_two):
  kw, results = two_by_two
  ref = launcher.reference(**kw, devices=4)
  rows, queries = launcher.corpus(kw["counts"], kw["d"], kw["q"], 0)
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert r["devices"] == 4 and r["count"] == sum(kw["counts"])
    assert r["rows_equal"]  # the global rows are process 0's rows, then process 1's
    assert launcher.compare(r, ref) == {key: "equal" for key in ref if key != "timings"}
  # And against independent float64 numpy references.
  for metric in ("cosine", "sq_euclidean"):
    scores = getattr(reference, metric)(queries, rows)
    want_scores, _ = reference.topk(scores, kw["k"], largest=metric == "cosine")
    got_scores, got_ids = results[0][f"topk/{metric}"]
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-4)
    # Ids may differ only among scores equal to rounding (the corpus repeats rows).
    np.testing.assert_allclose(np.take_along_axis(scores, got_ids, 1), want_scores,
                               rtol=1e-5, atol=1e-4)
  p_rows, p_cols, _ = reference.pairs_above(reference.cosine(rows, rows), kw["threshold"],
                                            upper=True)
  got = results[0]["pairs"]
  # Scores equal to the threshold up to float32 rounding may fall either side.
  assert abs(int(got[3]) - p_rows.size) <= 0.001 * p_rows.size
  assert int(results[0]["stats"][0]) == rows.shape[0] * (rows.shape[0] - 1) // 2


def test_bad_multi_process_calls_raise_on_every_process():
  messages = launcher.launch("experiments.distributed:mismatch_worker", processes=2,
                             devices_per_process=1, timeout=60)
  for queries, threshold, local in messages:
    assert "`queries` differs between processes" in queries
    assert "`threshold` differs between processes" in threshold
    assert local.startswith("`mesh` spans 2 processes") and "`corpus` is local" in local


@pytest.fixture
def mesh4():
  return Mesh(np.array(jax.devices()[:4]), ("rows",))


@pytest.mark.parametrize("n, metric", [(513, "cosine"), (1027, "cosine"), (1027, "dot"),
                                       (1027, "sq_euclidean")])
def test_sharded_rows_one_process(mesh4, n, metric):
  rng = np.random.default_rng(n)
  rows = rng.normal(size=(n, 32)).astype(np.float32)
  queries = rng.normal(size=(17, 32)).astype(np.float32)
  srows = jaxsim.shard_rows(rows, mesh4)
  assert len(srows) == n and srows.shape == (n, 32)
  assert srows.data.shape[0] % 4 == 0 and srows.data.shape[0] >= n
  np.testing.assert_array_equal(srows.gather(), rows)
  for got, want in zip(jaxsim.topk(queries, srows, 12, metric=metric),
                       jaxsim.topk(queries, rows, 12, metric=metric, mesh=mesh4), strict=True):
    np.testing.assert_array_equal(got, want)
  # About 3 standard deviations out: a few hundred pairs, all kept.
  threshold = {"cosine": 0.5, "dot": 17.0, "sq_euclidean": 20.0}[metric]
  got = jaxsim.pairs_above(srows, threshold=threshold, max_pairs=4096, metric=metric)
  want = jaxsim.pairs_above(rows, threshold=threshold, max_pairs=4096, metric=metric,
                            mesh=mesh4)
  assert 0 < int(got.count) < 4096
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)
  kw = {} if metric == "cosine" else {"range": (-40.0, 200.0)}
  want = jaxsim.similarity_stats(queries, rows, metric=metric, mesh=mesh4, **kw)
  for g, w in zip(jaxsim.similarity_stats(queries, srows, metric=metric, **kw), want,
                  strict=True):
    np.testing.assert_array_equal(g, w)


def test_sharded_array_implies_its_mesh(mesh4):
  rows = np.random.default_rng(0).normal(size=(1024, 16)).astype(np.float32)
  sharded = jax.device_put(rows, jax.sharding.NamedSharding(
      mesh4, jax.sharding.PartitionSpec("rows")))
  from jaxsim._src import distributed
  assert distributed.resolve_mesh(None, sharded) is mesh4
  want = jaxsim.topk(rows[:5], rows, 3, mesh=mesh4)
  for g, w in zip(jaxsim.topk(rows[:5], sharded, 3), want, strict=True):
    np.testing.assert_array_equal(g, w)


def test_bad_input(mesh4):
  rows = np.ones((10, 4), np.float32)
  with pytest.raises(TypeError, match="`mesh`"):
    jaxsim.shard_rows(rows, "mesh")
  with pytest.raises(ValueError, match="`mesh` has no axis 'data'"):
    jaxsim.shard_rows(rows, mesh4, axis="data")
  with pytest.raises(ValueError, match="`local_rows` must have rank 2"):
    jaxsim.shard_rows(np.ones((10,), np.float32), mesh4)
  srows = jaxsim.shard_rows(rows, mesh4)
  other = Mesh(np.array(jax.devices()[4:8]), ("rows",))
  with pytest.raises(ValueError, match="`mesh`"):
    jaxsim.topk(rows[:2], srows, 1, mesh=other)


@pytest.mark.parametrize("metric", ["cosine", "sq_euclidean"])
def test_index_over_sharded_rows(mesh4, metric):
  rng = np.random.default_rng(1)
  rows = rng.normal(size=(1001, 24)).astype(np.float32)
  queries = rng.normal(size=(5, 24)).astype(np.float32)
  index = jaxsim.Index(jaxsim.shard_rows(rows, mesh4), metric=metric)
  assert len(index) == 1001
  single = jaxsim.Index(rows, metric=metric, mesh=mesh4).search(queries, 6)
  for got, want in zip(index.search(queries, 6), single, strict=True):
    np.testing.assert_array_equal(got, want)
  want_scores, _ = reference.topk(getattr(reference, metric)(queries, rows), 6,
                                  largest=metric == "cosine")
  np.testing.assert_allclose(index.search(queries, 6)[0], want_scores, rtol=1e-5, atol=1e-4)


def test_docstring_examples():
  import doctest

  from jaxsim._src import distributed

  result = doctest.testmod(distributed, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_torch_inputs_to_the_host_side_paths():
  # bf16 tensors that require grad: fingerprinted (the multi-process check of replicated
  # inputs) and sharded like the float32 numpy rows holding the same values.
  torch = pytest.importorskip("torch")
  rows = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
  t = torch.tensor(rows, requires_grad=True).to(torch.bfloat16)
  same = t.detach().float().numpy()
  assert distributed.fingerprint(t) == distributed.fingerprint(same)
  mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
  np.testing.assert_array_equal(jaxsim.shard_rows(t, mesh).gather(), same)


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_an_uneven_corpus_is_placed_as_shards_not_replicated(kind):
  # 803 rows over 8 devices: placed once as 8 shards of 101 rows, so each device holds
  # its own rows instead of a replicated copy of all of them.
  mesh = Mesh(np.array(jax.devices()), ("rows",))
  rows = np.random.default_rng(4).normal(size=(803, 16)).astype(np.float32)
  placed = distributed.place_rows(rows if kind == "numpy" else jax.numpy.asarray(rows), mesh)
  assert isinstance(placed, jaxsim.ShardedRows) and len(placed) == 803
  assert {s.data.shape for s in placed.data.addressable_shards} == {(101, 16)}
  np.testing.assert_array_equal(placed.gather(), rows)
  compiled = distributed._topk.lower(rows[:5], placed, k=3, mesh=mesh, options=()).compile()
  assert compiled.memory_analysis().argument_size_in_bytes < rows.nbytes / 4
  # Even counts, no mesh, and tracers are left as they are.
  even = rows[:800]
  assert distributed.place_rows(even, mesh) is even and distributed.place_rows(rows, None) is rows
  # Through the public calls: the same results as one device.
  queries = rows[:7] + 0.01
  want = jaxsim.topk(queries, rows, 5)
  got = jaxsim.topk(queries, rows if kind == "numpy" else jax.numpy.asarray(rows), 5, mesh=mesh)
  np.testing.assert_array_equal(got[1], want[1])
  stats = jaxsim.similarity_stats(queries, rows, mesh=mesh)
  assert int(stats.count) == 7 * 803
  # The Euclidean shift and the pair scan see the 803 real rows only, not the padding.
  nearest = jaxsim.topk(queries, rows, 5, metric="euclidean")
  got = jaxsim.topk(queries, rows, 5, metric="euclidean", mesh=mesh)
  np.testing.assert_array_equal(got[1], nearest[1])
  np.testing.assert_allclose(got[0], nearest[0], rtol=1e-6)
  want = jaxsim.pairs_above(queries, rows, threshold=3.0, max_pairs=64, metric="euclidean")
  got = jaxsim.pairs_above(queries, rows, threshold=3.0, max_pairs=64, metric="euclidean",
                           mesh=mesh)
  assert int(got.count) == int(want.count) > 0
  np.testing.assert_array_equal(got.cols, want.cols)
  # Passed into a caller's own program, the placed rows keep their layout.
  inside = jax.jit(lambda q, c: jaxsim.topk(q, c, 5, metric="euclidean", mesh=mesh))
  np.testing.assert_array_equal(inside(queries, placed)[1], nearest[1])


@pytest.mark.parametrize("call, metric", [("topk", "cosine"), ("topk", "euclidean"),
                                          ("stats", "sq_euclidean"), ("pairs", "cosine")])
def test_an_uneven_corpus_makes_no_shard_sized_temporary(call, metric):
  # 2**20 + 3 rows of 64 floats over 8 devices: 32 MiB shards, padded in place. The
  # program scans them where they lie, masking the padding, instead of slicing the
  # real rows off and padding a copy back (34 MiB of temporaries before, against 2
  # MiB for 2**20 rows); only lowered and compiled, never run.
  mesh = Mesh(np.array(jax.devices()), ("rows",))
  n, d = 2**20 + 3, 64
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
  data = jax.ShapeDtypeStruct((-(-n // 8) * 8, d), np.float32, sharding=spec)
  rows = distributed.ShardedRows(data, n, mesh)
  queries = jax.ShapeDtypeStruct((5, d), np.float32)
  options = (("metric", metric),)
  if call == "topk":
    lowered = distributed._topk.lower(queries, rows, k=3, mesh=mesh, options=options)
  elif call == "stats":
    lowered = distributed._stats.lower(queries, rows, np.array([0.0, 100.0], np.float32),
                                       mesh=mesh, options=options)
  else:
    lowered = distributed._pairs.lower(queries, rows, np.float32(0.5), max_pairs=16, mesh=mesh,
                                       options=options)
  temp = lowered.compile().memory_analysis().temp_size_in_bytes
  assert temp < 8 * 2**20, temp / 2**20
