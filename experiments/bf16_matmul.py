"""Does a bfloat16 x bfloat16 -> float32 matmul beat float32 on this CPU? (issue 15, item 6)

Exact search at low-precision speed scores each tile in bfloat16 with float32
accumulation, keeps every candidate within the proven error bound of the k-th score
and rescores those in float32. That only pays where the bfloat16 matmul is faster, so
this measures it first, at `jaxsim.topk`'s tile shapes: unit rows (as cosine search
multiplies), d=384, one (query block x corpus block) tile per call.

Candidates (inputs cast beforehand, outside the timing):
- "float32": `a @ b.T` on float32 rows, XLA's default precision (full float32 on CPU);
- "bfloat16 -> float32": `lax.dot_general(..., preferred_element_type=float32)` on
  bfloat16 rows (AVX512-BF16 `vdpbf16ps` where XLA:CPU uses it);
- "float32, BF16_BF16_F32 algorithm": float32 rows with the dot algorithm preset that
  asks for bfloat16 products (rounding inside the matmul).
The check is the largest error against float64 of the same (unrounded) rows; for unit
rows the bfloat16 rounding of both sides bounds it by about 2 * 2**-8 (plus the float32
accumulation, about d * 2**-24).

Run: `python -m experiments.bf16_matmul --out results` (about a minute), or `--quick`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments import harness
from experiments.harness import Benchmark, Candidate, Grid, Target

NAME = "bf16_matmul"
F32 = "float32"
BF16 = "bfloat16 -> float32"
ALGO = "float32, BF16_BF16_F32 algorithm"
# |bf16(q) . bf16(c) - q . c| <= (2 u + u**2) |q| |c| with u = 2**-8 for unit rows, plus
# float32 accumulation of d terms.
BOUND = 2 * 2.0**-8 + 2.0**-16 + 384 * 2.0**-23
_DIMS = (((1,), (1,)), ((), ()))


def _unit(rng, n, d):
  a = rng.standard_normal((n, d), dtype=np.float32)
  return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def setup(point: dict, ctx: harness.Context) -> harness.Case:
  a, b = _unit(ctx.rng, point["rows"], point["d"]), _unit(ctx.rng, point["cols"], point["d"])
  return harness.Case(a=a, b=b, a32=jnp.asarray(a), b32=jnp.asarray(b),
                      a16=jnp.asarray(a, jnp.bfloat16), b16=jnp.asarray(b, jnp.bfloat16))


_f32 = jax.jit(lambda a, b: a @ b.T)
_bf16 = jax.jit(lambda a, b: lax.dot_general(a, b, _DIMS, preferred_element_type=jnp.float32))
_algo = jax.jit(lambda a, b: lax.dot_general(a, b, _DIMS,
                                             precision=lax.DotAlgorithmPreset.BF16_BF16_F32))


def check(case: harness.Case, outputs: dict) -> dict:
  want = case.a.astype(np.float64) @ case.b.astype(np.float64).T
  return {name: float(np.max(np.abs(np.asarray(out, np.float64) - want)))
          for name, out in outputs.items()}


BENCHMARK = Benchmark(
    name="bf16_matmul",
    title="One top-k tile's matmul, unit rows: bfloat16 products with float32 sums vs float32",
    grid=Grid(quick={"rows": [512], "cols": [4096], "d": [384]},
              full={"rows": [512, 1024], "cols": [4096], "d": [384]}),
    setup=setup,
    candidates=[
        Candidate(F32, lambda c: _f32(c.a32, c.b32)),
        Candidate(BF16, lambda c: _bf16(c.a16, c.b16)),
        Candidate(ALGO, lambda c: _algo(c.a32, c.b32)),
    ],
    check=check, tolerance=BOUND,
    work=lambda p: 2.0 * p["rows"] * p["cols"] * p["d"] / 1e9, rate_unit="GFLOP/s",
    baseline=F32,
    targets=[Target(BF16, F32, at_least=1.0, label="bfloat16 products faster than float32")],
    note=f"x {F32}: the float32 matmul's time / this row's time; the check is the largest "
         "error against float64, at most the bfloat16 rounding bound",
)


def main(argv: list[str] | None = None) -> dict:
  return harness.main([BENCHMARK], name=NAME, description=__doc__, argv=argv)


if __name__ == "__main__":
  main()
