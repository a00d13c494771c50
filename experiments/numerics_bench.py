"""Cost of exact close pairs in the dense Euclidean forms: refined vs the bare expansion.

`jaxsim.sq_euclidean` recomputes close pairs directly (`jaxsim._src.refine`); the goal
is at most 1.5x the cost of the expansion alone for d >= 64. Candidates, on `(n, d)`
float32 rows against `(n, d)` others:
- "expansion": centre, prepare, one matmul and the clamp (the dense form before the
  refinement, rebuilt from the same kernels);
- "refined": `jaxsim.sq_euclidean(x, y)`, with random rows (nothing close: the
  refinement costs only its test);
- "refined, 1% close": the same with 1% of `y`'s rows copies of `x`'s rows plus 1e-4
  noise, so that `n / 100` pairs are recomputed.

Run: `python -m experiments.numerics_bench --out results` (`--quick`: one size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxsim
from experiments import harness
from experiments.harness import Benchmark, Candidate, Grid, Target
from jaxsim._src import kernels

NAME = "numerics_bench"


@jax.jit
def _expansion(x, y):
  shift = kernels.centre(y)
  xp = kernels.prepare(x, "sq_euclidean", shift=shift)
  yp = kernels.prepare(y, "sq_euclidean", shift=shift)
  dots = kernels.matmul_t(xp.rows, yp.rows)
  return jnp.maximum(xp.aux[:, None] + yp.aux[None, :] - 2.0 * dots, 0.0)


def _setup(point: dict, ctx: harness.Context) -> harness.Case:
  n, d = point["n"], point["d"]
  rng = np.random.default_rng(ctx.seed)
  x = rng.standard_normal((n, d), np.float32)
  y = rng.standard_normal((n, d), np.float32)
  close = y.copy()
  close[: n // 100] = x[: n // 100] + 1e-4 * rng.standard_normal((n // 100, d), np.float32)
  return harness.Case(x=jnp.asarray(x), y=jnp.asarray(y), close=jnp.asarray(close),
                      rows=np.arange(0, n, max(1, n // 64)))


def _check(case: harness.Case, outputs: dict) -> dict:
  """Max error against float64 differences, relative to the largest distance."""
  x = np.asarray(case.x, np.float64)[case.rows]
  errors = {}
  for name, out in outputs.items():
    y = np.asarray(case.close if name.endswith("close") else case.y, np.float64)
    ref = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    errors[name] = float(np.max(np.abs(np.asarray(out)[case.rows] - ref)) / ref.max())
  return errors


BENCHMARK = Benchmark(
    name="euclidean_refinement",
    title="Dense squared Euclidean distances, n x n, float32: refined against the expansion",
    grid=Grid(quick={"n": [2048], "d": [64]}, full={"n": [2048, 4096], "d": [64, 256]}),
    setup=_setup,
    candidates=[
        Candidate("expansion", lambda c: _expansion(c.x, c.y)),
        Candidate("refined", lambda c: jaxsim.sq_euclidean(c.x, c.y)),
        Candidate("refined, 1% close", lambda c: jaxsim.sq_euclidean(c.x, c.close)),
    ],
    check=_check, tolerance=1e-5, baseline="expansion",
    targets=[Target(name, "expansion", at_most=1.5, label=f"{name} <= 1.5x the expansion")
             for name in ("refined", "refined, 1% close")],
    note="x expansion: expansion time / this row's time")


def main(argv: list[str] | None = None) -> dict:
  return harness.main([BENCHMARK], name=NAME, description=__doc__, argv=argv)


if __name__ == "__main__":
  main()
