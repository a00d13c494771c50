"""Backend-aware defaults (jaxsim/_src/defaults.py): CPU sizes unchanged, larger tiles on
GPU and TPU that still give the same results, and bf16 matmuls that stay bf16 with
float32 accumulation (the tensor-core / MXU path)."""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsim
from jaxsim._src import defaults, stats
from tests import reference

ACCELERATORS = ("gpu", "tpu")
# One accelerator per distinct set of defaults, for the tests that run computations.
DISTINCT = [name for i, name in enumerate(ACCELERATORS)
            if defaults.for_backend(name) not in map(defaults.for_backend, ACCELERATORS[:i])]


@pytest.fixture
def as_backend(monkeypatch):
  """Makes the defaults pick `name`'s sizes; jit caches are cleared around the change,
  since the sizes are read when a function is traced."""

  def use(name):
    monkeypatch.setattr(defaults, "backend", lambda: name)
    jax.clear_caches()

  yield use
  jax.clear_caches()


def test_the_current_backend_is_jax_default_backend():
  assert defaults.backend() == jax.default_backend() == "cpu"
  assert defaults.for_backend() == defaults.for_backend("cpu")


def test_cpu_defaults_are_the_sizes_tuned_on_cpu():
  # The sizes the streamed reductions used before defaults were per backend: CPU
  # behaviour must not change.
  cpu = defaults.for_backend("cpu")
  assert (cpu.corpus_block, cpu.topk_tile, cpu.stats_tile) == (4096, 1 << 21, 1 << 20)
  for block in (1, 24, 256, 4096):
    assert defaults.attention_query_block(block) == block


@pytest.mark.parametrize("name", ["rocm_plugin", "METAL", "interpreter"])
def test_unknown_backends_get_the_smallest_defaults(name):
  assert defaults.for_backend(name) == defaults.for_backend("cpu")


@pytest.mark.parametrize("name", ACCELERATORS)
def test_accelerators_get_larger_tiles_within_a_gib(as_backend, name):
  as_backend(name)
  cpu, acc = defaults.for_backend("cpu"), defaults.for_backend(name)
  assert acc.corpus_block > cpu.corpus_block
  assert acc.topk_tile > cpu.topk_tile and acc.stats_tile > cpu.stats_tile
  # Top-k holds about two float32 tiles, the statistics a few (scores, bins, masks).
  assert 2 * 4 * acc.topk_tile <= 1 << 30
  assert 8 * 4 * acc.stats_tile <= 1 << 30
  # A default tile must pass tile_sizes' own bound (int32 per-tile counts).
  q, n = stats.tile_sizes(1 << 20, 1 << 24, None, None, multiple=32, tile=acc.topk_tile)
  assert n == acc.corpus_block and q * n <= acc.topk_tile


@pytest.mark.parametrize("name", ACCELERATORS)
@pytest.mark.parametrize("block", [1, 7, 128, 300, 512, 1024, 4096, 1 << 21])
def test_attention_query_block_fills_the_tile(as_backend, name, block):
  as_backend(name)
  tile = defaults.for_backend(name).attention_tile
  rows = defaults.attention_query_block(block)
  assert rows >= block
  if rows > block:  # grown to fill the tile: whole 128-row tiles, no more than needed
    assert rows % 128 == 0 and rows * block >= tile and (rows - 128) * block < tile
  else:
    assert block * block >= tile or rows % 128 == 0


@pytest.mark.parametrize("q,n", [(1, 1), (37, 5000), (1000, 100_000), (4096, 1 << 20)])
def test_tile_sizes_follow_the_backend(as_backend, q, n):
  as_backend("cpu")
  cpu_q, cpu_n = stats.tile_sizes(q, n, None, None)
  as_backend("gpu")
  gpu_q, gpu_n = stats.tile_sizes(q, n, None, None)
  for qb, nb, name in ((cpu_q, cpu_n, "cpu"), (gpu_q, gpu_n, "gpu")):
    d = defaults.for_backend(name)
    assert nb <= max(d.corpus_block, 1) and qb <= max(q, 1)
    # Equal blocks: as few as the cap allows.
    assert -(-n // nb) == -(-n // d.corpus_block)
    assert qb * nb <= d.stats_tile + 8 * nb or qb == 8
  assert gpu_n >= cpu_n and gpu_q * gpu_n >= cpu_q * cpu_n
  # Explicit sizes always win.
  assert stats.tile_sizes(q, n, 64, 16) == (min(16, q), min(64, n))


# Shapes used only here: the functions below are traced with the GPU sizes, and jit
# caches by shape, so no other test may reuse a trace made with them.
X_ROWS, Y_ROWS, DIM = 611, 9001, 12


@pytest.mark.parametrize("name", DISTINCT)
def test_accelerator_tiles_give_the_same_results(as_backend, name):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((X_ROWS, DIM)).astype(np.float32)
  y = rng.standard_normal((Y_ROWS, DIM)).astype(np.float32)
  ref = reference.cosine(x, y)
  as_backend(name)
  # One corpus block and one query block, where the CPU sizes take 3 corpus blocks
  # and 2 query blocks.
  scores, idx = jaxsim.topk(x, y, 7)
  want_s, want_i = reference.topk(ref, 7)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
  st = jaxsim.similarity_stats(x, y, bins=16)
  vals = ref.ravel()
  assert int(st.count) == vals.size
  np.testing.assert_allclose([st.mean, st.std, st.min, st.max],
                             [vals.mean(), vals.std(), vals.min(), vals.max()],
                             rtol=1e-5, atol=1e-6)
  # A float32 score within rounding of a bin edge may land in the next bin.
  moved = np.abs(np.asarray(st.histogram) - np.histogram(vals, 16, range=(-1, 1))[0]).sum()
  assert moved <= 1e-5 * vals.size
  top = np.sort(vals)[-41:]
  threshold = float(top[0] + top[1]) / 2  # between the 41st and 40th largest
  pairs = jaxsim.pairs_above(x, y, threshold=threshold, max_pairs=64)
  rows, cols, _ = reference.pairs_above(ref, threshold)
  assert int(pairs.count) == len(rows) == 40
  np.testing.assert_array_equal(pairs.rows[:40], rows)
  np.testing.assert_array_equal(pairs.cols[:40], cols)


@pytest.mark.parametrize("name", DISTINCT)
def test_accelerator_attention_blocks_give_the_same_results(as_backend, name):
  rng = np.random.default_rng(4)
  # T = 301 queries: on CPU blocks of 16 give 19 query blocks; on GPU/TPU one block
  # of 65536 rows, clipped to all 301.
  q, k, v = (rng.standard_normal((1, 301, 2, 8)).astype(np.float32) for _ in range(3))
  as_backend(name)
  assert defaults.attention_query_block(16) > 301
  for metric in ("scaled_dot", "cosine"):
    params = inspect.signature(jaxsim.attention).parameters
    options = {"metric" if "metric" in params else "kind": metric}  # before/after issue 10
    got = jaxsim.attention(q, k, v, is_causal=True, block_size=16, **options)
    want = reference.attention(q, k, v, kind=metric, is_causal=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def _dot_generals(jaxpr):
  """Every dot_general in a jaxpr, nested jaxprs (scan, cond, jit, remat) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _dot_generals(inner)


def _check_matmuls(jaxpr, dtype, name):
  """The largest matmul takes `dtype` operands as they are (no upcast before the
  tensor cores / MXU) and accumulates in float32; no matmul accumulates in less."""
  dots = list(_dot_generals(jaxpr))
  assert dots, name
  for eqn in dots:
    acc = eqn.params["preferred_element_type"] or eqn.invars[0].aval.dtype
    assert jnp.finfo(acc).bits >= 32, (name, eqn)
  main = max(dots, key=lambda e: math.prod(e.outvars[0].aval.shape))
  assert [v.aval.dtype for v in main.invars] == [dtype, dtype], (name, main)
  assert main.params["preferred_element_type"] == jnp.float32, (name, main)


@pytest.mark.parametrize("name,fn", [
    ("cosine", lambda x, y: jaxsim.cosine(x, y)),
    ("euclidean", lambda x, y: jaxsim.euclidean(x, y)),
    ("topk", lambda x, y: jaxsim.topk(x, y, 5)),
    ("topk euclidean", lambda x, y: jaxsim.topk(x, y, 5, metric="sq_euclidean")),
    ("pairs_above", lambda x, y: jaxsim.pairs_above(x, y, threshold=0.5, max_pairs=8)),
    ("similarity_stats", lambda x, y: jaxsim.similarity_stats(x, y)),
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_matmuls_keep_their_dtype_and_accumulate_in_float32(name, fn, dtype):
  x = jnp.ones((600, 64), dtype)
  y = jnp.ones((5000, 64), dtype)
  _check_matmuls(jax.make_jaxpr(fn)(x, y).jaxpr, dtype, name)


@pytest.mark.parametrize("block_size", [None, 64])
def test_half_precision_attention_accumulates_in_float32(block_size):
  # H = 32 < block: the logits' matmul is the largest, whatever the values' is.
  q = jnp.ones((1, 256, 2, 32), jnp.bfloat16)
  fn = lambda q: jaxsim.attention(q, q, q, block_size=block_size)
  _check_matmuls(jax.make_jaxpr(fn)(q).jaxpr, jnp.bfloat16, f"attention {block_size}")


def test_stats_and_triangle_blocks_come_from_the_cpu_sweep():
  # experiments/tiles.py: 1024 x 1024 tiles for the cross statistics and pairs, square
  # triangle tiles of 512 rows; larger on accelerators, a triangle tile of the stats tile.
  cpu, acc = defaults.for_backend("cpu"), defaults.for_backend("gpu")
  assert (cpu.stats_block, cpu.triangle_block) == (1024, 512)
  assert stats.tile_sizes(2**17, 2**17, None, None, block=cpu.stats_block) == (1024, 1024)
  assert acc.stats_block >= cpu.stats_block and acc.triangle_block**2 == acc.stats_tile
  assert stats.triangle_block(5000, None) == 504 and stats.triangle_block(300, None) == 300
