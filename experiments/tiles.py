"""Tile shapes on this CPU: block-matmul efficiency, and all-pairs statistics from one triangle.

The streamed reductions compute their scores a tile at a time, so the tile shape sets
how close they run to the big matmul. Three benchmarks, float32, d = 384:

- `tile_matmul`: every score of `x @ x.T` (n = 8192) computed as (rows x cols) tiles in
  the shared block loop (`blockscan.block_map` over row blocks, `block_scan` over column
  blocks), each tile reduced to row sums at once, against XLA's one big matmul. The rate
  is GFLOP/s of the whole product; the sweep behind the CPU defaults in
  `jaxsim/_src/defaults.py` (`stats_block`, `stats_tile`, `triangle_block`).
- `triangle_step`: the tiles `i <= j` of square blocks (`blockscan.triangle_scan`) with
  only a sum per tile ("triangle matmul"), and with the statistics' own per-tile step
  (`jaxsim.similarity_stats(x, block_size=b)`): the difference is the step's cost. The
  rate is that of the full product the triangle stands for (2 n^2 d flops), so a rate
  above the big matmul's is time saved.
- `self_stats`: the target of issue 15, `similarity_stats(x)` on n x 384 against XLA's
  raw `x @ x.T`, numpy's (BLAS syrk) and the two-sided `similarity_stats(x, x)`.

Every candidate is checked against float64 numpy first: the mean score over the pairs
`i < j` (row sums for `tile_matmul`). Rows are unit vectors, so cosine and dot agree.
Flags: none; jaxsim relies on no XLA flag.

Run: `python -m experiments.tiles --out results` (`--quick`: small sizes, about a minute).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxsim
from experiments import harness
from experiments.harness import Benchmark, Candidate, Grid, Target
from jaxsim._src import blockscan

NAME = "tiles"
TRIANGLE = "jaxsim.similarity_stats(x)"
TWO_SIDED = "similarity_stats(x, x)"
RAW = "XLA x @ x.T"
NUMPY = "numpy x @ x.T (syrk)"
TILED = "tiles"
TRI_MATMUL = "triangle matmul"
TRI_STATS = "similarity_stats(x, block_size=b)"
D = 384


def unit_rows(point, ctx):
  x = ctx.rng.standard_normal((point["n"], point.get("d", D)), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return harness.Case(x=x, xj=jnp.asarray(x), point=point)


def pair_mean(x: np.ndarray) -> float:
  """The mean of `x_i . x_j` over `i < j`, in float64, without the n x n matrix."""
  x64 = x.astype(np.float64)
  total = x64.sum(axis=0)
  n = len(x)
  return float((total @ total - np.sum(x64 * x64)) / (n * (n - 1)))


def matrix_pair_mean(m) -> float:
  m = np.asarray(m)
  n = m.shape[0]
  return float((m.sum(dtype=np.float64) - np.trace(m, dtype=np.float64)) / (n * (n - 1)))


def check_means(case, outputs: dict) -> dict:
  want = pair_mean(case.x)
  return {name: abs(float(out) - want) for name, out in outputs.items()}


# --------------------------------------------------------------------------- tile matmul


@functools.cache
def tiled_row_sums(rows: int, cols: int):
  """`jnp.sum(x @ x.T, axis=1)` computed as (rows x cols) tiles in the block loop."""

  @jax.jit
  def f(x):
    def per_row_block(q):
      step = lambda acc, block, start, valid: acc + jnp.sum(q @ block.T, axis=1)
      return blockscan.block_scan(step, jnp.zeros(q.shape[0], q.dtype), x, block_size=cols,
                                  remat=False, pad_tail=False)

    return blockscan.block_map(per_row_block, x, block_size=rows)

  return f


_RAW = jax.jit(lambda a: a @ a.T)

TILE_MATMUL = Benchmark(
    name="tile_matmul",
    title="Block-matmul efficiency: x @ x.T as (rows x cols) tiles against one matmul, f32",
    grid=Grid(quick={"rows": [256, 1024], "cols": [256, 1024], "n": [2048]},
              full={"rows": [256, 512, 1024, 2048, 4096], "cols": [256, 512, 1024, 2048, 4096],
                    "n": [8192]}),
    setup=unit_rows,
    candidates=[
        Candidate(TILED, lambda c: tiled_row_sums(c.point["rows"], c.point["cols"])(c.xj)),
        Candidate(RAW, lambda c: _RAW(c.xj), output=lambda m: np.asarray(m).sum(1, np.float64)),
    ],
    check=harness.close_to(lambda c: c.x.astype(np.float64) @ c.x.sum(0, np.float64)),
    tolerance=1e-3,
    work=lambda p: 2 * p["n"] ** 2 * D / 1e9, rate_unit="GFLOP/s", baseline=RAW, x="cols",
    note="rate: GFLOP/s of the whole product; speed-up > 1: the tiles beat the big matmul",
)


# --------------------------------------------------------------------------- triangle step


@functools.cache
def triangle_sum(b: int):
  """The sum of `x_i . x_j` over `i < j` from the tiles `i <= j` only: the triangle's
  matmul with the least work a tile can do (a sum), diagonal tiles masked."""

  @jax.jit
  def f(x):
    n = x.shape[0]

    def step(acc, r, c, r_start, c_start, r_valid, c_valid):
      def masked(s):
        ids = jnp.arange(b, dtype=jnp.int32)
        ok = (r_valid[:, None] & c_valid[None, :]
              & (((r_start + ids)[:, None] < (c_start + ids)[None, :]) | (r_start != c_start)))
        return jnp.sum(jnp.where(ok, s, 0.0))

      s = r @ c.T
      inner = (r_start != c_start) & jnp.all(r_valid) & jnp.all(c_valid)
      return acc + jax.lax.cond(inner, jnp.sum, masked, s)

    total = blockscan.triangle_scan(step, jnp.float32(0), x, block_size=b, remat=False)
    return total / (n * (n - 1) / 2)

  return f


def stats_mean(st):
  return float(st.mean)


TRIANGLE_STEP = Benchmark(
    name="triangle_step",
    title="The triangle's matmul alone and with the statistics' per-tile step, f32",
    grid=Grid(quick={"b": [512], "n": [2048]}, full={"b": [256, 512, 1024, 2048], "n": [8192]}),
    setup=unit_rows,
    candidates=[
        Candidate(TRI_MATMUL, lambda c: triangle_sum(c.point["b"])(c.xj)),
        Candidate(TRI_STATS, lambda c: jaxsim.similarity_stats(c.xj, block_size=c.point["b"]),
                  output=stats_mean),
        Candidate(RAW, lambda c: _RAW(c.xj), output=matrix_pair_mean),
    ],
    check=check_means, tolerance=1e-6,
    work=lambda p: 2 * p["n"] ** 2 * D / 1e9, rate_unit="GFLOP/s (full product)", baseline=RAW,
    x="b",
    note="rate: the full product's flops over the time; the statistics' step costs the gap",
)


# --------------------------------------------------------------------------- the target


def two_sided_pair_mean(st, n: int) -> float:
  """The two-sided call's mean over all n^2 ordered pairs, turned into the mean over
  i < j: the same off-diagonal pairs twice, plus the diagonal (1 for unit rows)."""
  return (float(st.mean) * n * n - n) / (n * (n - 1))


SELF_STATS = Benchmark(
    name="self_stats",
    title="All-pairs statistics of a set, one triangle, against the full matmul, f32, d=384",
    grid=Grid(quick={"n": [4096]}, full={"n": [4096, 8192, 16384]}),
    setup=unit_rows,
    candidates=[
        Candidate(TRIANGLE, lambda c: jaxsim.similarity_stats(c.xj), output=stats_mean),
        Candidate(TWO_SIDED, lambda c: jaxsim.similarity_stats(c.xj, c.xj),
                  output=lambda st: st),
        Candidate(RAW, lambda c: _RAW(c.xj), output=matrix_pair_mean),
        Candidate(NUMPY, lambda c: c.x @ c.x.T, output=matrix_pair_mean),
    ],
    check=lambda case, outs: check_means(case, {
        k: two_sided_pair_mean(v, len(case.x)) if k == TWO_SIDED else v
        for k, v in outs.items()}),
    tolerance=1e-6,
    work=lambda p: 2 * p["n"] ** 2 * D / 1e9, rate_unit="GFLOP/s (full product)", baseline=RAW,
    targets=[Target(TRIANGLE, RAW, at_least=2.0, where=lambda p: p["n"] >= 16384,
                    label="similarity_stats(x) at least 2x the raw matmul (issue 15)")],
)


def main(argv: list[str] | None = None) -> dict:
  return harness.main([TILE_MATMUL, TRIANGLE_STEP, SELF_STATS], name=NAME, description=__doc__,
                      argv=argv)


if __name__ == "__main__":
  main()
