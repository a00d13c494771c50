"""How all-pairs cosine scales: jaxsim against numpy, scikit-learn, torch and XLA's raw matmul.

Three parts, each candidate's result checked against float64 before it is timed:

1. `n_sweep`: N rows at fixed D: time per call, GFLOP/s and peak memory, with the
   growth exponent fitted by least squares on log-log axes.
2. `d_sweep`: D features at fixed N.
3. `rate`: jaxsim against the raw matmul alone, at N >= 2048, for the rate goal. In the
   sweeps the round-robin also runs torch and numpy, whose idle worker threads can keep
   spinning into the next candidate's call; timing the two XLA programs on their own
   keeps that load out of the ratio.

Candidates, `x` of shape `(N, D)`, float32:
- `jaxsim.cosine(x)` on a `jax.Array`;
- "XLA matmul (pre-normalised)": `jax.jit(lambda u: u @ u.T)` on rows normalised
  beforehand, outside the timing: the same matmul without normalisation, clipping or
  exact diagonal, the most any XLA program can do here;
- "torch.mm + norms": the original blog post's function on a torch tensor;
- "numpy matrix": the same function in numpy;
- "sklearn": `sklearn.metrics.pairwise.cosine_similarity(x, x)`.

GFLOP/s counts the matmul only, 2 N^2 D, for every candidate. Peak memory is bytes
allocated beyond the inputs, output included: JAX, XLA's compiled plan (temporaries +
output); numpy and scikit-learn, `tracemalloc` over one call; torch, the profiler's
allocation events over one call.

Run: `python -m experiments.scaling --quick --out results` (about a minute on a 2-core
CPU), or without `--quick` for the full grid. The small-size table is
`experiments.seed_table`; top-k of every row is in `experiments.search_bench`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxsim
from experiments import harness, seed_table
from experiments.harness import Benchmark, Candidate, Grid, Target

NAME = "scaling"
JAXSIM = "jaxsim.cosine"
RAW = "XLA matmul (pre-normalised)"
TORCH = "torch.mm + norms"
NUMPY = "numpy matrix"
SKLEARN = "sklearn"
RATE_GOAL, RATE_MIN_N = 0.95, 2048
TOLERANCE = 1e-5
CHECK_ROWS = 64  # rows compared with float64: the full N x N reference is too big
# Accelerators: the CPU libraries only up to this N, where they still finish quickly.
CPU_MAX_N = 4096

_raw_matmul = jax.jit(lambda u: u @ u.T)
_jit_cosine = jax.jit(jaxsim.cosine)


def setup(point: dict, ctx: harness.Context) -> harness.Case:
  import torch

  x = ctx.rng.standard_normal((point["n"], point["d"]), dtype=np.float32)
  rows = np.sort(ctx.rng.choice(len(x), size=min(len(x), CHECK_ROWS), replace=False))
  return harness.Case(x=x, xj=jnp.asarray(x), uj=jnp.asarray(seed_table.unit_rows(x)),
                      xt=torch.from_numpy(x.copy()), rows=rows)


def reference_rows(case: harness.Case) -> np.ndarray:
  """float64 cosine of the checked rows against all rows."""
  x64 = case.x.astype(np.float64)
  unit = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
  return unit[case.rows] @ unit.T


def _sklearn(c):
  from sklearn.metrics.pairwise import cosine_similarity

  return cosine_similarity(c.x, c.x)


def _on_cpu_or_small(point: dict) -> bool:
  return jax.default_backend() == "cpu" or point["n"] <= CPU_MAX_N


CANDIDATES = [
    Candidate(JAXSIM, lambda c: jaxsim.cosine(c.xj),
              memory=lambda c: harness.xla_peak_bytes(_jit_cosine, c.xj)),
    Candidate(RAW, lambda c: _raw_matmul(c.uj), style={"color": "k", "ls": "--"},
              memory=lambda c: harness.xla_peak_bytes(_raw_matmul, c.uj)),
    Candidate(TORCH, lambda c: seed_table.torch_matrix_cosine(c.xt), when=_on_cpu_or_small,
              memory="torch"),
    Candidate(NUMPY, lambda c: seed_table.numpy_matrix_cosine(c.x), when=_on_cpu_or_small,
              memory="tracemalloc"),
    Candidate(SKLEARN, _sklearn, when=_on_cpu_or_small, memory="tracemalloc"),
]


def growth_exponents(rows: list[dict], axis: str) -> dict[str, dict]:
  """Least-squares slope of log(seconds) on log(`axis`), per candidate and other sizes."""
  others = [k for k in ("n", "d") if k != axis]
  fits = {}
  for name in dict.fromkeys(r["candidate"] for r in rows):
    mine = [r for r in rows if r["candidate"] == name and r.get("median_s")]
    groups = {tuple(r[k] for k in others) for r in mine}
    for g in sorted(groups):
      pts = [(r[axis], r["median_s"]) for r in mine if tuple(r[k] for k in others) == g]
      if len({p[0] for p in pts}) < 2:
        continue
      slope, _ = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)
      label = name if len(groups) == 1 else name + " (" + ", ".join(
          f"{k}={v}" for k, v in zip(others, g, strict=True)) + ")"
      fits[label] = {"exponent": float(slope), "from": int(min(p[0] for p in pts)),
                     "to": int(max(p[0] for p in pts)), "points": len(pts)}
  return fits


def _exponents(axis: str):
  def analyse(rows: list[dict]) -> dict:
    fits = growth_exponents(rows, axis)
    text = "\n".join(f"  time ~ {axis.upper()}^{f['exponent']:.2f}  {name} "
                     f"({axis} = {f['from']}..{f['to']}, {f['points']} points)"
                     for name, f in fits.items())
    return {"exponents": fits, "text": "Growth exponents (least-squares slope of log time)\n"
                                       + text if fits else ""}
  return analyse


def _sweep(name: str, title: str, grid: Grid, axis: str) -> Benchmark:
  return Benchmark(
      name=name, title=title, grid=grid, setup=setup, candidates=CANDIDATES,
      check=harness.close_to(reference_rows, rows=lambda c: c.rows), tolerance=TOLERANCE,
      work=lambda p: 2.0 * p["n"] ** 2 * p["d"] / 1e9, rate_unit="GFLOP/s", baseline=JAXSIM,
      memory=True, x=axis, analyse=_exponents(axis), timing={"warmup": 1},
      note=f"x {JAXSIM}: jaxsim's time / this row's time (below 1: slower than jaxsim)")


N_SWEEP = _sweep(
    "n_sweep", "All-pairs cosine of N rows x D=128, float32",
    Grid(quick={"n": [256, 512, 1024, 2048, 4096], "d": [128]},
         full={"n": [128, 256, 512, 1024, 2048, 4096, 8192, 16384], "d": [128]}), "n")
D_SWEEP = _sweep(
    "d_sweep", "All-pairs cosine of N=1024 (full: 4096) rows x D, float32",
    Grid(quick={"n": [1024], "d": [32, 128, 512]},
         full={"n": [4096], "d": [16, 32, 64, 128, 256, 512, 1024, 2048]}), "d")
RATE = Benchmark(
    name="rate",
    title="jaxsim.cosine against the raw XLA matmul alone, D=128",
    note=f"x {RAW}: its time / this row's time, the share of the raw matmul's rate",
    grid=Grid(quick={"n": [2048, 4096], "d": [128]}, full={"n": [2048, 4096, 8192], "d": [128]}),
    setup=setup, candidates=CANDIDATES[:2],
    check=harness.close_to(reference_rows, rows=lambda c: c.rows), tolerance=TOLERANCE,
    work=lambda p: 2.0 * p["n"] ** 2 * p["d"] / 1e9, rate_unit="GFLOP/s", baseline=RAW,
    targets=[Target(JAXSIM, RAW, at_least=RATE_GOAL, where=lambda p: p["n"] >= RATE_MIN_N,
                    label="rate against the raw matmul")],
    timing={"repeats": 9, "min_sample_s": 0.1})
BENCHMARKS = [N_SWEEP, D_SWEEP, RATE]


def main(argv: list[str] | None = None) -> dict:
  return harness.main(BENCHMARKS, name=NAME, description=__doc__, argv=argv)


if __name__ == "__main__":
  main()
