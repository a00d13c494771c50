"""jaxsim.Index: equal to topk and to brute force, both stores, growth, buckets, jit, files."""

import doctest
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxsim
from experiments.serving_bench import count_compiles
from jaxsim._src import buckets
from jaxsim._src import index as index_mod
from tests import reference

METRICS = ("dot", "cosine", "scaled_dot", "sq_euclidean", "euclidean")
STORES = ("device", "host")


def _data(seed, *shapes, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _ints(seed, *shapes):
  """Small-integer rows: every score is exact in float32, so ties are exact too."""
  rng = np.random.default_rng(seed)
  return [rng.choice(np.asarray((-1, 0, 1), np.float32), size=s) for s in shapes]


def _ref_topk(queries, corpus, k, metric):
  return reference.topk(reference.METRICS[metric](queries, corpus), k,
                        largest=metric not in reference.DISTANCES)


def _build(rows, metric, store, page_rows, split, **kwargs):
  """An index built from `rows[:split]` and grown by two adds, so it has several parts."""
  idx = jaxsim.Index(rows[:split], metric=metric, store=store, page_rows=page_rows, **kwargs)
  middle = (split + rows.shape[0]) // 2
  idx.add(rows[split:middle])
  idx.add(rows[middle:])
  return idx


# --- search equals topk and brute force -------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("metric", METRICS)
def test_search_equals_topk_and_brute_force(metric, store):
  corpus, queries = _data(0, (2600, 48), (37, 48))
  # 256-row pages: 11 pages, a part boundary inside a page, capacity padding past the end.
  idx = _build(corpus, metric, store, 256, 1000)
  assert len(idx) == 2600
  scores, ids = idx.search(queries, 10)
  t_scores, t_ids = jaxsim.topk(queries, corpus, 10, metric=metric)
  r_scores, r_ids = _ref_topk(queries, corpus, 10, metric)
  assert scores.shape == ids.shape == (37, 10) and ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, t_ids)
  np.testing.assert_array_equal(ids, r_ids)
  np.testing.assert_allclose(scores, t_scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scores, r_scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("metric", ("dot", "cosine", "scaled_dot"))
def test_ties_go_to_the_lower_id(metric, store):
  # 2048 rows of 4 entries in {-1, 0, 1}: at most 81 distinct rows, so every query
  # has many exactly equal scores across pages and parts (d = 4: the scaled_dot scale
  # 1/2 is exact too).
  corpus, queries = _ints(1, (2048, 4), (19, 4))
  idx = _build(corpus, metric, store, 128, 700)
  scores, ids = idx.search(queries, 25)
  r_scores, r_ids = _ref_topk(queries, corpus, 25, metric)
  np.testing.assert_array_equal(ids, r_ids)
  np.testing.assert_allclose(scores, r_scores, rtol=1e-6, atol=1e-6)


def test_host_store_equals_device_store_bitwise():
  corpus, queries = _data(2, (3000, 32), (9, 32))
  for metric in METRICS:
    dev = _build(corpus, metric, "device", 512, 1200).search(queries, 7)
    host = _build(corpus, metric, "host", 512, 1200).search(queries, 7)
    np.testing.assert_array_equal(dev[1], host[1], err_msg=metric)
    np.testing.assert_array_equal(dev[0], host[0], err_msg=metric)


@pytest.mark.parametrize("q,k", [(1, 1), (5, 3), (16, 16), (33, 10), (300, 64)])
def test_any_batch_and_k(q, k):
  corpus, queries = _data(3, (1500, 24), (q, 24))
  idx = jaxsim.Index(corpus, page_rows=512)
  scores, ids = idx.search(queries, k)
  r_scores, r_ids = _ref_topk(queries, corpus, k, "cosine")
  assert scores.shape == ids.shape == (q, k)
  assert scores.dtype == jnp.float32
  np.testing.assert_array_equal(ids, r_ids)
  np.testing.assert_allclose(scores, r_scores, atol=1e-5)


def test_empty_queries():
  idx = jaxsim.Index(*_data(4, (64, 8)))
  scores, ids = idx.search(np.zeros((0, 8), np.float32), 3)
  assert scores.shape == ids.shape == (0, 3)


@pytest.mark.parametrize("dtype,tol", [(jnp.float16, 2e-3), (jnp.bfloat16, 2e-2)])
def test_low_precision_rows(dtype, tol):
  corpus, queries = _data(5, (1024, 32), (8, 32))
  corpus, queries = np.asarray(corpus.astype(dtype)), np.asarray(queries.astype(dtype))
  idx = jaxsim.Index(corpus, page_rows=256)
  scores, ids = idx.search(queries, 5)
  t_scores, t_ids = jaxsim.topk(queries, corpus, 5)
  assert scores.dtype == dtype
  np.testing.assert_allclose(np.asarray(scores, np.float32), np.asarray(t_scores, np.float32),
                             atol=tol)
  # Rounded scores tie often; every id returned must score as well as topk's.
  ref = reference.cosine(corpus.astype(np.float32), queries.astype(np.float32)).T
  np.testing.assert_allclose(np.take_along_axis(ref, np.asarray(ids), 1),
                             np.take_along_axis(ref, np.asarray(t_ids), 1), atol=2 * tol)


def test_torch_and_jax_inputs():
  torch = pytest.importorskip("torch")
  corpus, queries = _data(6, (700, 16), (4, 16))
  want = jaxsim.Index(corpus).search(queries, 4)
  for rows, qs in ((torch.from_numpy(corpus), torch.from_numpy(queries)),
                   (jnp.asarray(corpus), jnp.asarray(queries))):
    got = jaxsim.Index(rows).search(qs, 4)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


# --- growth and buckets -----------------------------------------------------------------------


@pytest.mark.parametrize("metric", ("cosine", "sq_euclidean"))
def test_adds_continue_ids_and_match_topk(metric):
  corpus, queries = _data(7, (3000, 20), (11, 20))
  idx = jaxsim.Index(np.zeros((0, 20), np.float32), metric=metric, page_rows=256)
  assert len(idx) == 0
  sizes = [1, 255, 256, 700, 3, 1785]
  start = 0
  for m in sizes:
    idx.add(corpus[start:start + m])
    start += m
    assert len(idx) == start
    assert idx.capacity % 256 == 0 and idx.capacity >= start
    scores, ids = idx.search(queries, 1)
    r_scores, r_ids = _ref_topk(queries, corpus[:start], 1, metric)
    np.testing.assert_array_equal(ids, r_ids)
  # An empty index takes its Euclidean shift from its first rows, so the full index
  # equals topk on all rows.
  scores, ids = idx.search(queries, 9)
  np.testing.assert_array_equal(ids, jaxsim.topk(queries, corpus, 9, metric=metric)[1])


def test_batch_sizes_share_programs():
  (corpus,) = _data(8, (2000, 16))
  idx = jaxsim.Index(corpus, page_rows=512)
  rng = np.random.default_rng(0)
  for q in (17, 32):  # the bucket of 32 compiled once
    idx.search(rng.standard_normal((q, 16)).astype(np.float32), 5)
  with count_compiles() as compiles:
    for q in (18, 25, 31, 32, 20):
      scores, ids = idx.search(rng.standard_normal((q, 16)).astype(np.float32), 5)
      assert ids.shape == (q, 5)
    idx.search(rng.standard_normal((20, 16)).astype(np.float32), 4)  # k 4: a new step
  assert len(compiles) <= 1


def test_adds_within_capacity_share_programs():
  corpus, queries = _data(9, (3000, 16), (16, 16))
  idx = jaxsim.Index(corpus[:1100], page_rows=512)  # capacity 2048 rows (4 pages)
  idx.add(corpus[1100:1200])
  idx.search(queries, 4)
  with count_compiles() as compiles:
    for end in (1250, 1390, 1536, 2048):
      idx.add(corpus[len(idx):end])
      idx.search(queries, 4)
  assert compiles == []


def test_bucket_ladders():
  for n in range(1, 5000, 7):
    b = buckets.size_bucket(n)
    assert b >= n and b & (b - 1) == 0 and (b == 1 or b // 2 < n)
    pages = buckets.page_bucket(n)
    assert pages >= n and pages == buckets.page_bucket(pages)
    if n > buckets.FINE_FROM:
      assert 3 * n >= 2 * pages - 2  # at most about a third of padding
    else:
      assert pages & (pages - 1) == 0 and pages < 2 * n
    cap = buckets.capacity_bucket(n, page=64)
    assert cap % 64 == 0 and cap >= n
  assert buckets.ladder(2048) == [2**i for i in range(12)]
  for k in range(1, 300):
    b = buckets.k_bucket(k)
    assert k <= b <= max(1.5 * k, 2) and b == buckets.k_bucket(b)
  steps = sorted({buckets.page_bucket(n) for n in range(1, 300)})
  assert steps == [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384]


# --- host store -------------------------------------------------------------------------------


def test_host_store_streams_a_memmap(tmp_path, capsys):
  corpus, queries = _data(10, (4096, 64), (16, 64))
  path = tmp_path / "rows.npy"
  np.save(path, corpus)
  rows = np.load(path, mmap_mode="r")
  page = 512  # the corpus is 8 pages
  idx = jaxsim.Index(rows, store="host", page_rows=page)
  # The memmap is kept as given, not copied into memory.
  assert np.shares_memory(idx._parts[0], rows)
  got = idx.search(queries, 10, progress=True)
  assert "Index.search" in capsys.readouterr().err
  want = jaxsim.Index(corpus, page_rows=page).search(queries, 10)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], _ref_topk(queries, corpus, 10, "cosine")[1])
  # Device memory is O(page): the program that searches a page takes one page and
  # needs temporaries of about a page, whatever the corpus size.
  best = jnp.zeros((16, 16), jnp.float32)
  compiled = index_mod._search_host_page.lower(
      best, jnp.zeros((16, 16), jnp.int32), jnp.asarray(queries), jnp.zeros((1, 64)),
      jnp.zeros((page, 64)), jnp.zeros((page,)), np.int32(0), np.int32(page), k=16,
      metric="cosine", precision=None).compile()
  mem = compiled.memory_analysis()
  page_bytes = page * 64 * 4
  assert mem.argument_size_in_bytes < 1.2 * page_bytes
  assert mem.temp_size_in_bytes < 4 * page_bytes
  assert mem.argument_size_in_bytes + mem.temp_size_in_bytes < corpus.nbytes / 2


def test_host_index_is_not_a_jit_leaf():
  idx = jaxsim.Index(*_data(11, (64, 8)), store="host")
  with pytest.raises(TypeError, match="store='host'"):
    jax.tree.leaves(idx)


# --- pytree and jit ---------------------------------------------------------------------------


def test_index_is_a_pytree_in_jit():
  corpus, queries = _data(12, (1500, 16), (6, 16))
  idx = jaxsim.Index(corpus[:900], metric="euclidean", page_rows=512)  # capacity 1024
  memory_search = jax.jit(lambda index, q: index.search(q, 5))
  scores, ids = memory_search(idx, queries)
  want = idx.search(queries, 5)
  np.testing.assert_array_equal(ids, want[1])
  np.testing.assert_allclose(scores, want[0], rtol=1e-6)
  # The count is a leaf: a grown index of the same capacity reuses the program.
  idx.add(corpus[900:1024])
  with count_compiles() as compiles:
    scores, ids = memory_search(idx, queries)
  assert compiles == []
  np.testing.assert_array_equal(ids, _ref_topk(queries, corpus[:1024], 5, "euclidean")[1])
  leaves, treedef = jax.tree.flatten(idx)
  assert len(jax.tree.unflatten(treedef, leaves)) == 1024


def test_len_and_add_inside_jit_are_clear_errors():
  idx = jaxsim.Index(*_data(13, (64, 8)))

  @jax.jit
  def f(index):
    return len(index)

  with pytest.raises(TypeError, match="traced"):
    f(idx)


# --- mesh -------------------------------------------------------------------------------------


def test_sharded_index_equals_single_device():
  corpus, queries = _data(14, (3000, 32), (10, 32))
  mesh = Mesh(np.array(jax.devices()), ("corpus",))
  idx = jaxsim.Index(corpus[:2000], mesh=mesh)
  idx.add(corpus[2000:])
  assert idx._rows.sharding.spec == jax.sharding.PartitionSpec(("corpus",))
  scores, ids = idx.search(queries, 8)
  np.testing.assert_array_equal(ids, jaxsim.topk(queries, corpus, 8)[1])
  np.testing.assert_array_equal(ids, _ref_topk(queries, corpus, 8, "cosine")[1])


# --- save / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("metric", ("cosine", "euclidean", "dot"))
def test_save_load_round_trip(tmp_path, metric, store):
  corpus, queries = _data(15, (1300, 24), (5, 24))
  idx = _build(corpus, metric, store, 256, 500)
  path = tmp_path / "index.npz"
  idx.save(path)
  for load_store in STORES:
    loaded = jaxsim.Index.load(path, store=load_store, page_rows=256)
    assert len(loaded) == 1300 and loaded.metric == metric and loaded.dim == 24
    got, want = loaded.search(queries, 6), idx.search(queries, 6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
  # Loaded rows keep their ids, and a device index keeps growing.
  loaded = jaxsim.Index.load(path)
  loaded.add(queries)
  assert len(loaded) == 1305
  np.testing.assert_array_equal(loaded.search(queries, 1)[1][:, 0], np.arange(1300, 1305))
  assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]  # no temporary left


def test_save_load_bfloat16(tmp_path):
  corpus = np.asarray(_data(16, (600, 16))[0].astype(jnp.bfloat16))
  idx = jaxsim.Index(corpus)
  idx.save(tmp_path / "i.npz")
  loaded = jaxsim.Index.load(tmp_path / "i.npz")
  assert loaded.dtype == jnp.bfloat16
  np.testing.assert_array_equal(loaded.search(corpus[:4], 3)[1], idx.search(corpus[:4], 3)[1])


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
  idx = jaxsim.Index(*_data(17, (300, 8)))
  path = tmp_path / "index.npz"
  idx.save(path)
  before = path.read_bytes()
  bigger = jaxsim.Index(*_data(18, (900, 8)))

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", broken)
  with pytest.raises(OSError, match="disk full"):
    bigger.save(path)
  monkeypatch.undo()
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]
  with pytest.raises(OSError):
    idx.save(tmp_path / "missing" / "index.npz")


def test_bad_files_raise_clear_errors(tmp_path):
  idx = jaxsim.Index(*_data(19, (500, 8)))
  good = tmp_path / "good.npz"
  idx.save(good)
  data = good.read_bytes()
  (tmp_path / "truncated.npz").write_bytes(data[:len(data) // 2])
  (tmp_path / "noise.npz").write_bytes(os.urandom(2000))
  np.savez(tmp_path / "foreign.npz", rows=np.zeros((3, 8)))
  with zipfile.ZipFile(good) as z, zipfile.ZipFile(tmp_path / "future.npz", "w") as out:
    for name in z.namelist():
      payload = z.read(name)
      if name == "meta.npy":
        payload = payload.replace(b'"version": 1', b'"version": 9')
      out.writestr(name, payload)
  for name in ("truncated", "noise", "foreign", "future"):
    with pytest.raises(ValueError, match="not a readable jaxsim Index file"):
      jaxsim.Index.load(tmp_path / f"{name}.npz")
  with pytest.raises(FileNotFoundError):
    jaxsim.Index.load(tmp_path / "absent.npz")


# --- bad input --------------------------------------------------------------------------------


def test_bad_input():
  corpus, queries = _data(20, (100, 8), (3, 8))
  idx = jaxsim.Index(corpus)
  with pytest.raises(ValueError, match=r"`queries`.*feature dim 8.*\(3, 9\)"):
    idx.search(np.zeros((3, 9), np.float32), 2)
  with pytest.raises(ValueError, match=r"`rows`.*feature dim 8"):
    idx.add(np.zeros((3, 7), np.float32))
  with pytest.raises(TypeError, match=r"`queries`.*dtype float32, got bfloat16"):
    idx.search(jnp.asarray(queries, jnp.bfloat16), 2)
  with pytest.raises(TypeError, match=r"`rows`.*dtype float32, got float16"):
    idx.add(corpus.astype(np.float16))
  with pytest.raises(ValueError, match=r"at most len\(index\) = 100, got k=101"):
    idx.search(queries, 101)
  with pytest.raises(ValueError, match="`k` must be a positive int"):
    idx.search(queries, 0)
  with pytest.raises(ValueError, match="`queries` must have rank 2"):
    idx.search(queries[0], 1)
  with pytest.raises(ValueError, match="empty"):
    jaxsim.Index(np.zeros((0, 8), np.float32)).search(queries, 1)
  with pytest.raises(ValueError, match="`rows` must have rank 2"):
    jaxsim.Index(np.zeros(8, np.float32))
  with pytest.raises(ValueError, match="`metric`"):
    jaxsim.Index(corpus, metric="manhattan")
  with pytest.raises(ValueError, match="`store`"):
    jaxsim.Index(corpus, store="disk")
  with pytest.raises(ValueError, match="`page_rows` must be a multiple of 32"):
    jaxsim.Index(corpus, page_rows=100)
  with pytest.raises(TypeError, match="`mesh`"):
    jaxsim.Index(corpus, mesh="cpu")
  assert len(idx) == 100  # nothing was added by the failed calls


@pytest.mark.parametrize("module", [index_mod, buckets])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
