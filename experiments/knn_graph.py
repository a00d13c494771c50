"""The kNN graph of a set: every row's top-10 cosine neighbours among the same rows.

`x` is `n x 384` float32 (random normal, or `--data minilm` for the all-MiniLM-L6-v2
token table's first `n` rows). Candidates, each giving every row its 10 nearest other
rows:

- "jaxsim.topk(x, None)": the triangle, `jaxsim.topk(x, None, 10, exclude_self=True)`:
  the tiles `(i, j)`, `i <= j`, only, each selected for its rows and its columns;
- "jaxsim.topk(x, x)": the two-sided search, `jaxsim.topk(x, x, 10, exclude_self=True)`,
  every tile computed;
- "jaxsim.topk(x, None), one program": the same triangle as one program, not split over
  two threads (`graph.THREADS_MIN_ROWS` raised for the call): XLA:CPU runs a program one
  operation at a time and its `top_k` on one thread, so this shows what the two
  programs, one selecting while the other multiplies, gain;
- "faiss IndexFlatIP": exact inner-product search of the normalised rows in themselves
  with k=11, the self match dropped (the index built and the rows normalised untimed).

jaxsim normalises inside the call, as its users' calls would. Every candidate's
indices are compared with the float64 top-10 of a seeded sample of rows (1 - recall@10;
random float32 data has a near tie at the 10th place for about one row in a thousand).
Goals: the triangle at least 1.3x faiss and 1.3x the two-sided search.

`knn_graph_l2`: the same graph by squared Euclidean distance on raw rows of d = 128 (the
graph UMAP and t-SNE start from): the triangle and the two-sided search with
`metric="sq_euclidean"` against "faiss IndexFlatL2" (k=11, the self match dropped),
checked against the float64 distances.

Run: `python -m experiments.knn_graph --out results` (n = 30,000; a few minutes on 2
CPUs), or `--quick` (n = 8,192, about a minute). `--block-size` sets the triangle's
square tiles (default: 1024 rows on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxsim
from experiments import harness
from experiments.harness import Benchmark, Candidate, Grid, Target
from jaxsim._src import graph

NAME = "knn_graph"
TRIANGLE = "jaxsim.topk(x, None)"
ONE_PROGRAM = "jaxsim.topk(x, None), one program"
TWO_SIDED = "jaxsim.topk(x, x)"
FAISS = "faiss IndexFlatIP"
FAISS_L2 = "faiss IndexFlatL2"
K = 10
RECALL_TOLERANCE = 2e-3
CHECK_ROWS = 1024


def _normalise(a: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(a, axis=1, keepdims=True)
  return (a / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def setup(point: dict, ctx: harness.Context) -> harness.Case:
  n, d = point["n"], point["d"]
  if ctx.args.data == "minilm":
    from experiments import data

    x = np.ascontiguousarray(data.minilm_token_table()[:n])
  else:
    x = ctx.rng.standard_normal((n, d), dtype=np.float32)
  return harness.Case(x=x, u=_normalise(x), xj=jnp.asarray(x), k=point["k"], args=ctx.args)


def exact_graph(x: np.ndarray, rows: np.ndarray, k: int, *, l2: bool = False) -> np.ndarray:
  """float64 cosine (`l2`: squared-distance) top-k of `x[rows]` among the other rows of `x`."""
  u = x.astype(np.float64)
  if l2:
    sq = np.sum(u**2, axis=1)
    scores = 2.0 * (u[rows] @ u.T) - sq[rows, None] - sq[None, :]
  else:
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-300)
    scores = u[rows] @ u.T
  scores[np.arange(len(rows)), rows] = -np.inf
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
  return np.take_along_axis(part, order, axis=1)


def recall_check(case: harness.Case, outputs: dict, *, l2: bool = False) -> dict:
  """1 - recall@k of each candidate against float64 (by cosine, or `l2`: by distance),
  over a seeded sample of rows."""
  n = len(case.x)
  rows = np.arange(n)
  if n > CHECK_ROWS:
    rows = np.sort(np.random.default_rng(0).choice(n, CHECK_ROWS, replace=False))
  ref = exact_graph(case.x, rows, case.k, l2=l2)
  return {name: 1.0 - float(np.mean([len(set(a) & set(b)) / case.k
                                     for a, b in zip(np.asarray(idx)[rows], ref, strict=True)]))
          for name, idx in outputs.items()}


def _faiss(c: harness.Case, l2: bool = False) -> harness.Case:
  """faiss's exact index of the unit rows (`l2`: `IndexFlatL2` of the raw rows)."""
  import faiss

  rows = c.x if l2 else c.u
  index = (faiss.IndexFlatL2 if l2 else faiss.IndexFlatIP)(rows.shape[1])
  index.add(rows)
  return harness.Case(index=index, rows=rows, k=c.k)


def drop_self(idx: np.ndarray) -> np.ndarray:
  """k + 1 neighbours of each row of a set in itself -> the k others: the row's own
  id removed (the last neighbour where a tie pushed it out of the k + 1)."""
  idx = np.asarray(idx)
  own = idx == np.arange(len(idx))[:, None]
  own[~own.any(axis=1), -1] = True
  return idx[~own].reshape(len(idx), idx.shape[1] - 1)


def _one_program(call):
  saved, graph.THREADS_MIN_ROWS = graph.THREADS_MIN_ROWS, 1 << 62
  try:
    return jax.block_until_ready(call())
  finally:
    graph.THREADS_MIN_ROWS = saved


def _indices(out) -> np.ndarray:
  return np.asarray(harness.to_numpy(out)[1])


KNN_GRAPH = Benchmark(
    name="knn_graph",
    title=f"kNN graph: the top-{K} cosine neighbours of every row of n x 384 rows, float32",
    grid=Grid(quick={"n": [8192], "d": [384], "k": [K]},
              full={"n": [30_000], "d": [384], "k": [K]}),
    setup=setup,
    candidates=[
        Candidate(TRIANGLE, lambda c: jaxsim.topk(c.xj, None, c.k, exclude_self=True,
                                                  block_size=c.args.block_size),
                  output=_indices),
        Candidate(ONE_PROGRAM, lambda c: _one_program(
            lambda: jaxsim.topk(c.xj, None, c.k, exclude_self=True, block_size=c.args.block_size)),
                  output=_indices),
        Candidate(TWO_SIDED, lambda c: jaxsim.topk(c.xj, c.xj, c.k, exclude_self=True),
                  output=_indices),
        Candidate(FAISS, lambda f: f.index.search(f.rows, f.k + 1), prepare=_faiss,
                  output=lambda out: drop_self(out[1])),
    ],
    check=recall_check,
    tolerance=RECALL_TOLERANCE,
    work=lambda p: p["n"], rate_unit="rows/s",
    baseline=FAISS,
    targets=[Target(TRIANGLE, FAISS, at_least=1.3), Target(TRIANGLE, TWO_SIDED, at_least=1.3)],
    timing={"warmup": 1},
    note=f"x {FAISS}: faiss's time / this row's time; the check is 1 - recall@{K} against "
         "float64",
)


def _l2_graph(c: harness.Case, corpus):
  return jaxsim.topk(c.xj, corpus, c.k, metric="sq_euclidean", exclude_self=True,
                     block_size=c.args.block_size if corpus is None else None)


KNN_GRAPH_L2 = Benchmark(
    name="knn_graph_l2",
    title=f"kNN graph: the top-{K} squared-Euclidean neighbours of every row of n x d raw "
          "rows, float32",
    grid=Grid(quick={"n": [4096], "d": [128], "k": [K]},
              full={"n": [30_000], "d": [128], "k": [K]}),
    setup=setup,
    candidates=[
        Candidate(TRIANGLE, lambda c: _l2_graph(c, None), output=_indices),
        Candidate(TWO_SIDED, lambda c: _l2_graph(c, c.xj), output=_indices),
        Candidate(FAISS_L2, lambda f: f.index.search(f.rows, f.k + 1),
                  prepare=functools.partial(_faiss, l2=True),
                  output=lambda out: drop_self(out[1])),
    ],
    check=functools.partial(recall_check, l2=True),
    tolerance=RECALL_TOLERANCE,
    work=lambda p: p["n"], rate_unit="rows/s",
    baseline=FAISS_L2,
    timing={"warmup": 1},
    note=f"x {FAISS_L2}: faiss's time / this row's time; the check is 1 - recall@{K} against "
         "the float64 distances",
)
BENCHMARKS = [KNN_GRAPH, KNN_GRAPH_L2]


def _arguments(p) -> None:
  p.add_argument("--data", choices=("random", "minilm"), default="random")
  p.add_argument("--block-size", type=int, default=None,
                 help="rows per square tile of the triangle (default: jaxsim's)")


def main(argv: list[str] | None = None) -> dict:
  return harness.main(BENCHMARKS, name=NAME, description=__doc__, argv=argv,
                      add_arguments=_arguments)


if __name__ == "__main__":
  main()
