"""Exact top-k search: jaxsim.topk against faiss, torch, scikit-learn and XLA's matmul.

Four parts:

1. `search`: 1024 queries, top-10 by cosine, against corpora of 10,000 to 100,000 x 384
   float32 rows. Candidates (queries and corpus normalised once beforehand, outside
   the timing; jaxsim and torch normalise again inside, as their users' calls would):
   - "jaxsim.topk": exact, blocked (the `q x n` matrix is never built), as the library
     decides: on a CPU with AVX512-BF16 (or AMX) and a search this large, its tiles are
     scored in bfloat16 and the candidates rescored in float32 (`jaxsim._src.lowprec`;
     the same results);
   - "jaxsim.topk, float32 tiles": the same search with the bfloat16 scoring off;
   - "faiss IndexFlatIP": exact inner-product search, the index built untimed;
   - "torch chunked matmul + topk": sentence-transformers' `semantic_search` recipe
     (query chunks of 100, corpus chunks of 500,000, normalise + `torch.mm`, per-chunk
     `torch.topk`, merged with another `topk`);
   - "sklearn brute": `NearestNeighbors(algorithm="brute", metric="cosine")`, fitted
     untimed;
   - "XLA matmul (no top-k)": `jax.jit(lambda a, b: a @ b.T)`, the full score matrix and
     nothing else: the matmul rate a top-k can at best approach;
   - "XLA tile matmuls (no selection)": the same (query block x corpus block) tile
     matmuls `jaxsim.topk` computes, over the same blocks, each written into one
     tile buffer (the last one is checked against float64). jaxsim's time over this one is
     1 + the non-matmul share of `topk` (selection, masking, per-block preparation);
   - "XLA bf16 tile matmuls (no selection)": the same tiles as bfloat16 x bfloat16 ->
     float32 matmuls, the matmul of the bfloat16 path.
   Every top-k candidate's indices are compared with the exact float64 top-k
   (recall@k); goals: jaxsim >= 0.95x faiss's throughput (1.3x the stretch), >= 0.9x
   the raw matmul's, a non-matmul share of at most 10% at n=100,000 (each path against
   its own tile matmuls), and the bfloat16 scoring faster than float32.
2. `stages`: where the search's time goes, at n=100,000 (`--quick`: 20,000). For each
   path (float32 and bfloat16 tiles) its tile matmuls, then the same loop adding one part
   of `jaxsim.topk`'s work at a time (`_tile_matmuls`): each corpus block's preparation
   (unit rows, and the bfloat16 rounding with the norms of its bound), then each tile's
   ranking keys and group maxima, then `jaxsim.topk` itself, which adds the merge into
   the running top-k (and, for bfloat16, the float32 rescoring and certificate). Each
   stage's time over the tile matmuls' is 1 + the share that the stages so far add.
3. `self_topk`: the k nearest rows of every row of one set, streamed, at sizes where
   the N x N matrix would not fit, against the dense route (`jaxsim.cosine`, then
   `lax.top_k`) while its matrix stays under 512 MiB; XLA's planned memory of
   the dense route is reported where it is not run.
4. `search_l2`: the same search by squared Euclidean distance, faiss's most used index,
   on raw (not normalised) random rows of d = 128: "jaxsim.topk" with
   `metric="sq_euclidean"` (the expansion, its `k + 16` best recomputed directly and
   certified by the error bound, `jaxsim._src.refine`) against "faiss IndexFlatL2" and
   "sklearn brute" (`metric="euclidean"`), each checked by recall against the float64
   top-k by distance.

`--data minilm` uses the all-MiniLM-L6-v2 token table (30,522 x 384) as the corpus
and its first rows as queries instead of random data (parts 1 and 2).

Run: `python -m experiments.search_bench --out results` (a few minutes on 2 CPUs), or
`--quick` (under a minute).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxsim
from experiments import harness
from experiments.harness import Benchmark, Candidate, Grid, Target
from jaxsim._src import blockscan, defaults, kernels, lowprec, search, stats

NAME = "search_bench"
JAXSIM = "jaxsim.topk"
JAXSIM_F32 = "jaxsim.topk, float32 tiles"
FAISS = "faiss IndexFlatIP"
FAISS_L2 = "faiss IndexFlatL2"
TORCH = "torch chunked matmul + topk"
SKLEARN = "sklearn brute"
RAW = "XLA matmul (no top-k)"
TILES = "XLA tile matmuls (no selection)"
TILES_BF16 = "XLA bf16 tile matmuls (no selection)"
DENSE = "jaxsim.cosine + lax.top_k"
K = 10
# Share of the k true neighbours a candidate may miss: random float32 data has a near
# tie at the k-th place for about one query in a thousand.
RECALL_TOLERANCE = 2e-3
# The dense self top-k runs while its N x N float32 matrix fits in this.
DENSE_MAX_BYTES = 2**29
CHECK_QUERIES = 1024


def _normalise(a: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(a, axis=1, keepdims=True)
  return (a / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def setup(point: dict, ctx: harness.Context) -> harness.Case:
  n, q, d = point["n"], point["queries"], point["d"]
  if ctx.args.data == "minilm":
    from experiments import data

    table = data.minilm_token_table()[:n]
    queries, corpus = _normalise(table[:q]), _normalise(table)
  else:
    queries = _normalise(ctx.rng.standard_normal((q, d), dtype=np.float32))
    corpus = _normalise(ctx.rng.standard_normal((n, d), dtype=np.float32))
  return harness.Case(q=queries, c=corpus, qj=jnp.asarray(queries), cj=jnp.asarray(corpus),
                      k=point["k"], args=ctx.args)


def exact_topk(queries: np.ndarray, corpus: np.ndarray, k: int, *, l2: bool = False
               ) -> np.ndarray:
  """float64 top-k indices by cosine (`l2`: by smallest squared distance), in query
  chunks to bound memory."""
  c64 = corpus.astype(np.float64)
  if not l2:
    c64 /= np.maximum(np.linalg.norm(c64, axis=1, keepdims=True), 1e-300)
  out = []
  for s in range(0, len(queries), 128):
    q64 = queries[s:s + 128].astype(np.float64)
    if l2:  # in float64 the expansion's cancellation stays far below float32's rounding
      scores = 2.0 * (q64 @ c64.T) - np.sum(q64**2, axis=1)[:, None] - np.sum(c64**2, axis=1)
    else:
      scores = q64 @ c64.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    out.append(np.take_along_axis(part, order, axis=1))
  return np.concatenate(out)


def recall_check(case: harness.Case, outputs: dict, *, l2: bool = False) -> dict:
  """1 - recall@k of each candidate's indices against the float64 top-k (by cosine, or
  `l2`: by distance).

  Over at most `CHECK_QUERIES` queries (a seeded sample of a larger set).
  """
  errors = {}
  for name, (bf16, stage) in TILE_OUTPUTS.items():
    if name in outputs:
      errors[name] = _tile_error(case, outputs.pop(name), bf16=bf16, grouped=stage == "keys")
  rows = np.arange(len(case.q))
  if len(rows) > CHECK_QUERIES:  # a seeded sample keeps the float64 reference cheap
    rows = np.sort(np.random.default_rng(0).choice(len(rows), CHECK_QUERIES, replace=False))
  ref = exact_topk(case.q[rows], case.c, case.k, l2=l2)
  return errors | {name: 1.0 - float(np.mean([len(set(a) & set(b)) / case.k
                                     for a, b in zip(np.asarray(idx)[rows], ref, strict=True)]))
          for name, idx in outputs.items()}


def _tile_error(case: harness.Case, out, *, bf16: bool, grouped: bool) -> float:
  """The largest difference of a `_tile_matmuls` result from float64: the last query
  block's scores against the last corpus block (which ends at row n, its rows that the
  block before covered masked), or (`grouped`) their group maxima. For bfloat16 tiles
  scaled so that the rounding bound of unit rows is the tolerance."""
  out = np.asarray(out[0], np.float64)
  n = len(case.c)
  _, nb, group = _blocks(len(case.q), n, case.args.block_size)
  want = case.q[-out.shape[0]:].astype(np.float64) @ case.c[-nb:].astype(np.float64).T
  if grouped:
    covered = (-(-n // nb) - 1) * nb  # rows the blocks before the last one scored
    want = np.where(np.arange(n - nb, n) >= covered, np.clip(want, -1.0, 1.0), -np.inf)
    want = want.reshape(len(want), -1, group).max(axis=-1)
  diff = np.where(want == out, 0.0, np.abs(out - want))
  error = float(np.max(diff))
  return error * RECALL_TOLERANCE / BF16_UNIT_BOUND if bf16 else error


def _torch_st(queries, corpus, k, query_chunk=100, corpus_chunk=500_000):
  import torch

  q = torch.nn.functional.normalize(queries, dim=1)
  best_s, best_i = [], []
  for qs in range(0, q.shape[0], query_chunk):
    chunk_s, chunk_i = [], []
    for cs in range(0, corpus.shape[0], corpus_chunk):
      c = torch.nn.functional.normalize(corpus[cs:cs + corpus_chunk], dim=1)
      s, i = torch.topk(q[qs:qs + query_chunk] @ c.T, min(k, c.shape[0]), dim=1)
      chunk_s.append(s)
      chunk_i.append(i + cs)
    s, pos = torch.topk(torch.cat(chunk_s, 1), k, dim=1)
    best_s.append(s)
    best_i.append(torch.gather(torch.cat(chunk_i, 1), 1, pos))
  return torch.cat(best_s), torch.cat(best_i)


def _faiss(c: harness.Case, kind: str = "IndexFlatIP"):
  import faiss

  index = getattr(faiss, kind)(c.c.shape[1])
  index.add(c.c)
  return harness.Case(index=index, q=c.q, k=c.k)


def _torch_inputs(c: harness.Case):
  import torch

  return harness.Case(q=torch.from_numpy(c.q), c=torch.from_numpy(c.c), k=c.k)


def _sklearn(c: harness.Case, metric: str = "cosine"):
  from sklearn.neighbors import NearestNeighbors

  nn = NearestNeighbors(n_neighbors=c.k, algorithm="brute", metric=metric).fit(c.c)
  return harness.Case(nn=nn, q=c.q)


_raw = jax.jit(lambda a, b: a @ b.T)
# For unit rows |q.c - bf16(q).bf16(c)| <= |q - bf16(q)| |bf16(c)| + |c - bf16(c)| plus
# the float32 sums' error, under 2.1 * 2**-8 (each entry rounds by at most 2**-8 relative).
BF16_UNIT_BOUND = 2.1 * 2.0**-8


def _topk(case, bf16=None):
  """`jaxsim.topk` as the library decides (None), or with the bfloat16 scoring forced."""
  saved, lowprec.FORCE = lowprec.FORCE, bf16
  try:
    return jaxsim.topk(case.qj, case.cj, case.k, block_size=case.args.block_size)
  finally:
    lowprec.FORCE = saved


def _blocks(q: int, n: int, block_size: int | None) -> tuple[int, int, int]:
  """`jaxsim.topk`'s query and corpus block rows for `q` queries and `n` rows, and its
  group size (a whole block where `GROUP` does not divide it)."""
  qb, nb = stats.tile_sizes(q, n, block_size, None, multiple=search.GROUP,
                            tile=defaults.topk_tile())
  qb, nb = min(qb, q), min(nb, n)
  return qb, nb, search.GROUP if nb % search.GROUP == 0 else nb


# `_tile_matmuls`' stages: each adds one part of `jaxsim.topk`'s work per block or tile.
STAGES = {"matmul": "tile matmuls",
          "prepare": "+ block preparation",
          "keys": "+ keys and group maxima"}
TILE_PRECISIONS = ("float32", "bfloat16")


def _stage(tiles: str, stage: str) -> str:
  """The `stages` benchmark's candidate name of one stage (or `"topk"`) of one path."""
  return f"{tiles}: " + ("jaxsim.topk" if stage == "topk" else STAGES[stage])


# Candidates whose output is a `_tile_matmuls` result: name -> (bfloat16 tiles, stage).
TILE_OUTPUTS = {TILES: (False, "matmul"), TILES_BF16: (True, "matmul"),
                **{_stage(t, s): (t == "bfloat16", s) for t in TILE_PRECISIONS for s in STAGES}}


@functools.partial(jax.jit, static_argnames=("block_size", "bf16", "stage"))
def _tile_matmuls(queries, corpus, block_size=None, bf16=False, stage="matmul"):
  """`jaxsim.topk`'s tile matmuls over its blocks and, by `stage`, more of its work.

  `"matmul"`: the tile matmuls and nothing else, each into the same tile buffer; the
  result is the scores of the last query block against the last corpus block (`bf16`:
  of the rows rounded to bfloat16, accumulated in float32, as the bfloat16 path scores
  them). `"prepare"`: also each corpus block prepared as `topk` prepares it (unit rows
  and the running maximum of their norms; `bf16`: rounded to bfloat16 with the norms
  of the rounding bound, `lowprec.split`), and the queries once. `"keys"`: also each
  tile finished into ranking keys (clip, non-finite rows, padding masked) and reduced
  to its group maxima, `search._merge_tile`'s first pass; the result is then the last
  tile's group maxima. What `topk` adds to the last stage is the merge itself.
  Returns `(result, maxima)`.
  """
  qb, nb, group = _blocks(queries.shape[0], corpus.shape[0], block_size)
  prepared = stage != "matmul"
  qp = kernels.prepare(queries, "cosine") if prepared else kernels.Prepared(
      queries, jnp.ones(queries.shape[:1]))
  qrows = qp.rows.astype(lowprec.LOW) if bf16 else qp.rows
  zero = jnp.zeros((), jnp.float32)
  out = jnp.zeros((qb, nb // group if stage == "keys" else nb), jnp.float32)
  init = (out, lowprec.Norms(zero, zero, zero) if bf16 else zero)

  def step(carry, block, start, valid):
    out, maxima = carry
    if prepared:
      bp = kernels.prepare(block, "cosine")
      ok = valid & jnp.isfinite(bp.aux)
      if bf16:
        split = lowprec.split(bp.rows)
        maxima = lowprec.Norms.combine(maxima, split.norms.max(ok))
        bp = kernels.Prepared(split.low, bp.aux)
      else:
        maxima = jnp.maximum(maxima, jnp.max(jnp.where(ok, bp.aux, 0.0)))
    else:
      bp = kernels.Prepared(block.astype(lowprec.LOW) if bf16 else block, None)

    def tile(_, q, start, valid_rows):
      rows, aux = q
      dots = lowprec.matmul_t(rows, bp.rows) if bf16 else rows @ bp.rows.T
      if stage != "keys":
        return dots
      key = search._keys(kernels.finish_cosine(dots, aux[:, None], bp.aux[None, :]), "cosine",
                         valid[None, :])
      return jnp.max(key.reshape(key.shape[0], -1, group), axis=-1)

    return blockscan.block_scan(tile, out, (qrows, qp.aux), block_size=qb, pad_tail=False), maxima

  return blockscan.block_scan(step, init, corpus, block_size=nb, pad_tail=False)


_top_indices = jax.jit(lambda s, k: jax.lax.top_k(s, k)[1], static_argnums=1)


def _indices(out) -> np.ndarray:
  return np.asarray(harness.to_numpy(out)[1])


SEARCH = Benchmark(
    name="search",
    title=f"Exact top-{K} cosine search: queries against a corpus of n rows, float32",
    grid=Grid(quick={"n": [5_000, 20_000], "queries": [256], "d": [384], "k": [K]},
              full={"n": [10_000, 30_000, 100_000], "queries": [1024], "d": [384], "k": [K]}),
    setup=setup,
    candidates=[
        Candidate(JAXSIM, _topk, output=_indices),
        Candidate(JAXSIM_F32, lambda c: _topk(c, bf16=False), output=_indices),
        Candidate(FAISS, lambda f: f.index.search(f.q, f.k), prepare=_faiss, output=_indices),
        Candidate(TORCH, lambda t: _torch_st(t.q, t.c, t.k), prepare=_torch_inputs,
                  output=_indices),
        Candidate(SKLEARN, lambda s: s.nn.kneighbors(s.q), prepare=_sklearn,
                  output=lambda out: np.asarray(out[1]),
                  when=lambda p: p["n"] * p["queries"] <= 2**28),
        Candidate(RAW, lambda c: _raw(c.qj, c.cj), style={"color": "k", "ls": "--"},
                  output=lambda s: np.asarray(_top_indices(s, K))),
        Candidate(TILES, lambda c: _tile_matmuls(c.qj, c.cj, block_size=c.args.block_size),
                  style={"color": "grey", "ls": ":"}),
        Candidate(TILES_BF16, lambda c: _tile_matmuls(c.qj, c.cj, block_size=c.args.block_size,
                                                      bf16=True),
                  style={"color": "silver", "ls": ":"}),
    ],
    check=recall_check,
    tolerance=RECALL_TOLERANCE,
    work=lambda p: p["queries"], rate_unit="queries/s",
    baseline=FAISS,
    targets=[Target(JAXSIM, FAISS, at_least=0.95), Target(JAXSIM, FAISS, at_least=1.3),
             Target(JAXSIM, RAW, at_least=0.9),
             Target(JAXSIM_F32, FAISS, at_least=0.95),
             Target(JAXSIM, JAXSIM_F32, at_least=1.0, where=lambda p: p["n"] >= 100_000,
                    label="bfloat16 scoring faster than float32 at n=100,000"),
             Target(JAXSIM_F32, TILES, at_most=1.1, where=lambda p: p["n"] >= 100_000,
                    label="non-matmul share of the float32 path <= 10%"),
             Target(JAXSIM, TILES_BF16, at_most=1.1, where=lambda p: p["n"] >= 100_000,
                    label="non-matmul share of jaxsim.topk (bfloat16 tiles) <= 10%")],
    timing={"warmup": 1},
    note=f"x {FAISS}: faiss's time / this row's time (above 1: faster than faiss); the check "
         "is 1 - recall@k against float64",
)


def _stage_call(case: harness.Case, *, tiles: str, stage: str):
  bf16 = tiles == "bfloat16"
  if stage == "topk":
    return _topk(case, bf16=bf16)
  return _tile_matmuls(case.qj, case.cj, block_size=case.args.block_size, bf16=bf16, stage=stage)


STAGES_BENCH = Benchmark(
    name="stages",
    title=f"Where a top-{K} cosine search spends its time: {JAXSIM}'s work added stage by "
          "stage, float32 inputs",
    grid=Grid(quick={"n": [20_000], "queries": [256], "d": [384], "k": [K]},
              full={"n": [100_000], "queries": [1024], "d": [384], "k": [K]}),
    setup=setup,
    candidates=[
        Candidate(_stage(tiles, stage), functools.partial(_stage_call, tiles=tiles, stage=stage),
                  output=None if stage != "topk" else _indices)
        for tiles in TILE_PRECISIONS for stage in (*STAGES, "topk")],
    check=recall_check, tolerance=RECALL_TOLERANCE,
    timing={"warmup": 1},
    note="each stage's time over its path's tile matmuls is 1 + the share of the work it adds",
)


def self_setup(point: dict, ctx: harness.Context) -> harness.Case:
  x = ctx.rng.standard_normal((point["n"], point["d"]), dtype=np.float32)
  return harness.Case(q=x, c=x, qj=jnp.asarray(x), k=point["k"], args=ctx.args)


def _dense(x, k):
  return jax.lax.top_k(jaxsim.cosine(x, x), k)


_dense_jit = jax.jit(_dense, static_argnums=1)
_self_jit = jax.jit(lambda x, k: jaxsim.topk(x, x, k), static_argnums=1)


def _dense_fits(point: dict) -> bool:
  return 4 * point["n"] ** 2 <= DENSE_MAX_BYTES


def planned_dense_memory(rows: list[dict]) -> dict:
  """XLA's planned bytes for the dense route where it was too big to run."""
  planned = {}
  for r in rows:
    if r["candidate"] == DENSE and r["status"] == "skipped":
      spec = jax.ShapeDtypeStruct((r["n"], r["d"]), jnp.float32)
      planned[str(r["n"])] = harness.xla_peak_bytes(_dense_jit, spec, r["k"])
  text = "\n".join(f"  n={n}: the dense route would need {harness.fmt_bytes(b)} (XLA's plan, "
                   "not run)" for n, b in planned.items())
  return {"dense_planned_bytes": planned, "text": text}


SELF_TOPK = Benchmark(
    name="self_topk",
    title=f"Top-{K} nearest rows of every row of n x 128 rows, streamed vs dense",
    grid=Grid(quick={"n": [4096, 16384], "d": [128], "k": [K]},
              full={"n": [8192, 16384, 32768], "d": [128], "k": [K]}),
    setup=self_setup,
    candidates=[
        Candidate(JAXSIM, lambda c: jaxsim.topk(c.qj, c.qj, c.k), output=_indices,
                  memory=lambda c: harness.xla_peak_bytes(_self_jit, c.qj, c.k)),
        Candidate(DENSE, lambda c: _dense_jit(c.qj, c.k), output=_indices,
                  when=_dense_fits,
                  memory=lambda c: harness.xla_peak_bytes(_dense_jit, c.qj, c.k)),
    ],
    check=recall_check, tolerance=RECALL_TOLERANCE,
    work=lambda p: 2.0 * p["n"] ** 2 * p["d"] / 1e9, rate_unit="GFLOP/s",
    memory=True, analyse=planned_dense_memory, timing={"warmup": 1, "min_sample_s": 0.0},
)


def l2_setup(point: dict, ctx: harness.Context) -> harness.Case:
  q, n, d = point["queries"], point["n"], point["d"]
  queries = ctx.rng.standard_normal((q, d), dtype=np.float32)
  corpus = ctx.rng.standard_normal((n, d), dtype=np.float32)
  return harness.Case(q=queries, c=corpus, qj=jnp.asarray(queries), cj=jnp.asarray(corpus),
                      k=point["k"], args=ctx.args)


SEARCH_L2 = Benchmark(
    name="search_l2",
    title=f"Exact top-{K} squared-Euclidean search: queries against a corpus of n raw rows, "
          "float32",
    grid=Grid(quick={"n": [5_000], "queries": [256], "d": [128], "k": [K]},
              full={"n": [30_000, 100_000], "queries": [1024], "d": [128], "k": [K]}),
    setup=l2_setup,
    candidates=[
        Candidate(JAXSIM, lambda c: jaxsim.topk(c.qj, c.cj, c.k, metric="sq_euclidean",
                                                block_size=c.args.block_size),
                  output=_indices),
        Candidate(FAISS_L2, lambda f: f.index.search(f.q, f.k),
                  prepare=functools.partial(_faiss, kind="IndexFlatL2"), output=_indices),
        Candidate(SKLEARN, lambda s: s.nn.kneighbors(s.q),
                  prepare=functools.partial(_sklearn, metric="euclidean"),
                  output=lambda out: np.asarray(out[1]),
                  when=lambda p: p["n"] * p["queries"] <= 2**28),
    ],
    check=functools.partial(recall_check, l2=True), tolerance=RECALL_TOLERANCE,
    work=lambda p: p["queries"], rate_unit="queries/s", baseline=FAISS_L2,
    timing={"warmup": 1},
    note=f"x {FAISS_L2}: faiss's time / this row's time; the check is 1 - recall@k against "
         "the float64 distances",
)
BENCHMARKS = [SEARCH, STAGES_BENCH, SELF_TOPK, SEARCH_L2]


def _arguments(p) -> None:
  p.add_argument("--data", choices=("random", "minilm"), default="random")
  p.add_argument("--block-size", type=int, default=None, help="jaxsim.topk corpus block rows")


def main(argv: list[str] | None = None) -> dict:
  return harness.main(BENCHMARKS, name=NAME, description=__doc__, argv=argv,
                      add_arguments=_arguments)


if __name__ == "__main__":
  main()
