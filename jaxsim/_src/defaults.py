"""Default tile and block sizes per backend, in one place.

The streamed reductions (`jaxsim.topk`, `jaxsim.pairs_above`, `jaxsim.similarity_stats`)
walk the corpus in blocks of rows and the queries in blocks that fill a *tile* of
(query block x corpus block) scores; blocked attention takes key/value blocks of the
caller's `block_size` and query blocks of `attention_query_block`. These sizes trade
memory for speed, and the right trade depends on the device:

| backend | corpus block | top-k tile | stats tile | stats block | triangle | mirror | attention |
| --- | --- | --- | --- | --- | --- | --- | --- |
| `cpu`, unknown | ~4096 | 2**21 (8 MiB) | 2**20 (4 MiB) | ~1024 | ~512 | 256 | `block_size` |
| `gpu`, `tpu` | ~16384 | 2**26 (256 MiB) | 2**24 (64 MiB) | ~16384 | ~4096 | off | 2**20 logits |

Blocks in rows, tiles in scores (float32 sizes in brackets), "attention" the query
block of blocked attention, "mirror" the tile of the dense `cosine(x)`, `dot(x)` and
`scaled_dot(x)` computed from its upper triangle (`kernels.SYMMETRIC_MIN_ROWS`).

The stats / pairs block is the `y` block of `pairs_above(x, y)` and
`similarity_stats(x, y)` (their query block fills the stats tile); the triangle block
is the side of the square tiles of `pairs_above(x)` and `similarity_stats(x)`, a set
against itself (`blockscan.triangle_scan`).

Corpus blocks split the rows into equal blocks of at most about that many; query blocks
fill the tile (float32 sizes in brackets); an attention query block on GPU and TPU
holds at least 2**20 logits a head (`attention_query_block`).

Why these numbers:

- CPU: the corpus block and top-k tile are the sizes the streamed reductions had before
  they were backend-aware, the fastest tried on a 2-core CPU
  (`experiments/search_bench.py`), with temporaries of tens of MiB. The statistics'
  and pairs' blocks come from a measured sweep of block-matmul efficiency on the
  2-core AMD EPYC (AVX-512), `python -m experiments.tiles --only tile_matmul`: `x @ x.T`
  for 8192 x 384 float32 rows computed as (rows x cols) tiles, each reduced to row
  sums, in GFLOP/s of the whole product (one run, side by side with XLA's one big
  matmul, which ran at 111-147 GFLOP/s there because its 256 MiB output page-faults):

  | rows / cols | 256 | 512 | 1024 | 2048 | 4096 |
  | --- | --- | --- | --- | --- | --- |
  | 256 | 160 | 162 | 161 | 154 | 141 |
  | 512 | 150 | 184 | 194 | 179 | 159 |
  | 1024 | 188 | 192 | 192 | 200 | 190 |
  | 2048 | 201 | 183 | 188 | 174 | 188 |
  | 4096 | 204 | 198 | 205 | 195 | 145 |

  256-row tiles are the slowest (the 256 x 4096 tiles the statistics used before:
  141), tiles of 512 x 1024 and of 1024 or more rows run at 180-205 GFLOP/s, near the
  2 cores' matmul rate (about 205-210 when the output does not page-fault). The
  statistics and pairs therefore take 1024 x 1024 tiles (block 1024, tile 2**20, 4
  MiB: small enough for the few temporaries of a tile to stay in cache). The square
  triangle tiles take 512 rows, from `--only triangle_step` (n = 8192, the same run
  of the same CPU, `similarity_stats(x, block_size=b)` against XLA's `x @ x.T`): b =
  256: 1.43x, 512: 1.66x, 1024: 1.39x, 2048: 1.04x (the triangle's matmul alone,
  with a sum per tile: 2.36x, 2.78x, 2.42x, 2.15x). Smaller tiles waste less on the
  masked diagonal; below 512 rows the matmul itself slows down.
- GPU and TPU: every block is one step of a `lax.scan`, which costs a few kernel
  launches (GPU) or a loop iteration (TPU) whatever its size, and a matmul only
  reaches the tensor cores' / MXU's rate when it is large. A 4096 x 16384 tile at
  d=768 is about 0.1 TFLOP, well above the per-step overhead on an H100 or a TPU v4,
  and the temporaries (about two tiles for top-k, a few for the statistics) stay
  under 1 GiB, small next to the 16-80 GiB of current accelerators. The triangle's
  square tiles of 4096 rows hold 2**24 scores, the stats tile; the cross statistics
  keep the corpus block of 16384 rows. None of these
  accelerator sizes has been timed on a GPU or TPU yet: `python -m
  experiments.accelerator` measures them (see the README's "Accelerators").

Precision: inputs are multiplied in their own dtype and accumulated in float32
(`preferred_element_type`), so bfloat16 and float16 rows use the tensor cores (GPU) or
the MXU (TPU) at full rate with float32 sums. For float32 inputs the matmul runs at
the backend's default precision (`precision=None`): TF32 on recent NVIDIA GPUs, one
bfloat16 pass on TPU, full float32 on CPU; pass `precision="highest"` for float32
products everywhere.

Approximate top-k: `jaxsim.topk(..., approx=True)` selects each block's candidates
with `lax.approx_max_k`, the fast path on TPU (a partial reduction that suits its
vector units, Chern et al. 2022; JAX optimizes it on TPU only). Use it there, with
these tile sizes, when a recall of about `recall_target` is enough; keep the exact
default on CPU and GPU.

Low-precision scoring: exact float32 top-k searches score their tiles with bfloat16
matmuls and rescore the candidates in float32 (`jaxsim._src.lowprec`) where
`lowprec_search()` holds: on a CPU whose flags include `avx512_bf16` or `amx_bf16`,
where XLA's bfloat16 x bfloat16 -> float32 matmul ran at 1.95x the float32 rate (2-core
AMD EPYC, `experiments/bf16_matmul.py`). Off on GPU and TPU (their float32 matmuls
already default to TF32 / bfloat16 passes, and the path has not been timed there) and
on CPUs without those instructions (XLA emulates bfloat16 there, slower than float32).

The backend is `jax.default_backend()` when a function is traced: the defaults follow
where the computation runs unless the caller places it elsewhere explicitly, in which
case pass `block_size` / `query_block_size` directly. Explicit sizes always win.

References:
  Chern, Jouppi et al., "TPU-KNN: K Nearest Neighbor Search at Peak FLOP/s", NeurIPS
  2022.
"""

from __future__ import annotations

import dataclasses
import functools

import jax


@dataclasses.dataclass(frozen=True)
class Defaults:
  """The default sizes of one backend (see the module docstring's table).

  Attributes:
    corpus_block: corpus rows per block, at most about this many (rows are split into
      equal blocks).
    topk_tile: scores per (query block x corpus block) tile of `jaxsim.topk`.
    stats_tile: scores per tile of `jaxsim.pairs_above` and `jaxsim.similarity_stats`.
    attention_tile: logits per head that a blocked-attention query block should
      fill, `query_block x block_size`; 0 keeps the query block equal to `block_size`.
    stats_block: `y` rows per block of `jaxsim.pairs_above(x, y)` and
      `jaxsim.similarity_stats(x, y)`, at most about (equal blocks).
    triangle_block: rows per block of the square tiles that `pairs_above(x)` and
      `similarity_stats(x)` walk for a set against itself, at most about.
    symmetric_block: rows per tile of the dense `jaxsim.cosine(x)`, `dot(x)` and
      `scaled_dot(x)` computed from the upper tiles and mirrored
      (`kernels.symmetric_dense`); 0 keeps the one matmul (accelerators: not timed
      there yet).
  """

  corpus_block: int
  topk_tile: int
  stats_tile: int
  attention_tile: int
  stats_block: int
  triangle_block: int
  symmetric_block: int


_CPU = Defaults(corpus_block=4096, topk_tile=1 << 21, stats_tile=1 << 20, attention_tile=0,
                stats_block=1024, triangle_block=512, symmetric_block=256)
_ACCELERATOR = Defaults(corpus_block=16384, topk_tile=1 << 26, stats_tile=1 << 24,
                        attention_tile=1 << 20, stats_block=16384, triangle_block=4096,
                        symmetric_block=0)
BACKENDS: dict[str, Defaults] = {"cpu": _CPU, "gpu": _ACCELERATOR, "tpu": _ACCELERATOR}


def backend() -> str:
  """The backend the defaults are chosen for: `jax.default_backend()`."""
  return jax.default_backend()


def for_backend(name: str | None = None) -> Defaults:
  """The defaults of backend `name` (`"cpu"`, `"gpu"`, `"tpu"`; None for the current
  one); unknown backends get the CPU's, which are the smallest."""
  return BACKENDS.get(backend() if name is None else name, _CPU)


def corpus_block() -> int:
  """Corpus rows per block, at most about (`jaxsim._src.stats.tile_sizes`)."""
  return for_backend().corpus_block


def topk_tile() -> int:
  """Scores per top-k tile (`jaxsim.topk`)."""
  return for_backend().topk_tile


def stats_tile() -> int:
  """Scores per tile of `jaxsim.pairs_above` and `jaxsim.similarity_stats`."""
  return for_backend().stats_tile


def stats_block() -> int:
  """`y` rows per block of `jaxsim.pairs_above(x, y)` / `jaxsim.similarity_stats(x, y)`."""
  return for_backend().stats_block


def triangle_block() -> int:
  """Rows per block of the square tiles of `pairs_above(x)` / `similarity_stats(x)`."""
  return for_backend().triangle_block


def attention_query_block(block_size: int) -> int:
  """The default query block of blocked attention, given its key/value `block_size`.

  `block_size` on CPU (as before); on GPU and TPU at least `block_size` and large
  enough that a query block fills the backend's `attention_tile` logits per head,
  rounded up to a multiple of 128 (whole MXU / tensor-core tiles). The caller clips it
  to the number of queries.
  """
  tile = for_backend().attention_tile
  if not tile:
    return block_size
  rows = -(-tile // block_size)
  return max(block_size, -(-rows // 128) * 128)


# CPU flags (Linux /proc/cpuinfo names) with native bfloat16 dot products.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def lowprec_search() -> bool:
  """Whether exact float32 top-k scores tiles in bfloat16 first (module docstring)."""
  return backend() == "cpu" and bool(_cpu_flags() & BF16_FLAGS)
