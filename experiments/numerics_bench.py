"""Cost of exact close pairs in the dense Euclidean forms: refined vs the bare expansion.

`jaxsim.sq_euclidean` recomputes close pairs directly (`jaxsim._src.refine`); the issue
allows at most 1.5x the cost of the expansion alone for d >= 64. Candidates, timed side
by side (`harness.compare`) on `(n, d)` float32 rows against `(n, d)` others:
- "expansion": centre, prepare, one matmul and the clamp (the dense form before
  this change, rebuilt from the same kernels);
- "refined": `jaxsim.sq_euclidean(x, y)`, with random rows (nothing close: the
  refinement costs only its test);
- "refined, 1% close": the same with 1% of `y`'s rows copies of `x`'s rows plus 1e-4
  noise, so that `n` pairs are recomputed.

Run: `python -m experiments.numerics_bench --out results` (`--quick`: one size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import harness
from jaxsim._src import kernels

NAME = "numerics_bench"
TARGET = 1.5
GRID = {"quick": [(2048, 64)], "full": [(2048, 64), (2048, 256), (4096, 128)]}


@jax.jit
def _expansion(x, y):
  # The dense form as it was before the refinement: centre, prepare, matmul, clamp.
  shift = kernels.centre(y)
  xp = kernels.prepare(x, "sq_euclidean", shift=shift)
  yp = kernels.prepare(y, "sq_euclidean", shift=shift)
  dots = kernels.matmul_t(xp.rows, yp.rows)
  return jnp.maximum(xp.aux[:, None] + yp.aux[None, :] - 2.0 * dots, 0.0)


def main(argv=None):
  args = harness.parser(__doc__).parse_args(argv)
  rows = []
  for n, d in GRID["quick" if args.quick else "full"]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, d), np.float32))
    y = np.asarray(rng.standard_normal((n, d), np.float32))
    close = y.copy()
    close[: n // 100] = np.asarray(x[: n // 100]) + 1e-4 * rng.standard_normal((n // 100, d))
    y, close = jnp.asarray(y), jnp.asarray(close)
    t = harness.compare(repeats=args.repeats, candidates={
        "expansion": lambda x=x, y=y: _expansion(x, y),
        "refined": lambda x=x, y=y: kernels.pairwise(x, y, metric="sq_euclidean"),
        "refined, 1% close": lambda x=x, y=close: kernels.pairwise(x, y, metric="sq_euclidean"),
    })
    base = t["expansion"].median
    rows.append({"n": n, "d": d, **{k: v.median for k, v in t.items()},
                 "ratio": t["refined"].median / base,
                 "ratio_1pct": t["refined, 1% close"].median / base})
  print(harness.format_table(rows))
  ok = all(r["ratio"] <= TARGET for r in rows)
  print(f"target refined <= {TARGET}x expansion for d >= 64: {'met' if ok else 'NOT met'}")
  harness.write_json(args.out, NAME, {"rows": rows, "target": TARGET, "met": ok})


if __name__ == "__main__":
  main()
