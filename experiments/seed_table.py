"""Small inputs: the original blog post's table at N=50, D=64, and what JAX's dispatch costs there.

The post this project started from ("I accidentally implemented the fastest pairwise
cosine similarity function") timed Python loops, scikit-learn, a numpy matrix version
and a `torch.mm` function on one `(50, 64)` uniform random matrix. Three parts:

1. `post_table`: those candidates plus `jaxsim.cosine`, each called as a user would
   (eager, result ready), and a bare `jax.jit` matmul of the same shape: the least any
   eager JAX call costs here.
2. `overhead`: `jaxsim.cosine` against the bare `jax.jit` matmul on the same `(50, 64)`
   rows (pre-normalised for the matmul, so its result is the cosine too) and against
   `jax.jit(jaxsim.cosine)`, the same XLA program without the public call's checks.
   At this size an eager call costs JAX's dispatch, not arithmetic.
3. `batched`: what a JAX user writes for many small sets, 4096 sets of 50 x 64 in one
   call, against `torch.bmm` and numpy's batched matmul of normalised rows.

Run with `--sync-dispatch` for the same tables with JAX's CPU programs run on the
calling thread (`jax_cpu_enable_async_dispatch` off; written to `seed_table_sync.json`).

Differences from the post's code, each deliberate:
- every loop writes its own output; the post reused one `zeros` buffer for all three
  loops, so its "Result within 1e-8 of ... loop" lines compared the torch loop with
  itself;
- the scipy loop stores `1 - scipy.spatial.distance.cosine` (a similarity); the post
  stored the distance;
- "numpy matrix" is pure numpy (the post's called torch's `.unsqueeze` on it);
- every result is compared with a float64 reference at a stated tolerance.

Run: `python -m experiments.seed_table --out results` (`--quick` for fewer samples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxsim
from experiments import harness
from experiments.harness import Benchmark, Candidate, Grid, Target

NAME = "seed_table"
JAXSIM = "jaxsim.cosine"
JIT_JAXSIM = "jax.jit(jaxsim.cosine)"
BARE = "jax.jit matmul (pre-normalised rows)"
TORCH_MM = "torch.mm + norms (the post's function)"
NUMPY_MATRIX = "numpy matrix"
LOOPS = ("scipy loop", "numpy loop", "torch loop")
TORCH_BMM = "torch.bmm (normalise + bmm)"
NUMPY_BATCHED = "numpy batched matmul"
XLA_BATCHED = "jax.jit batched matmul (pre-normalised rows)"
# float32 results of different algorithms agree to a few float32 ulps of 1.
TOLERANCE = 1e-5
OVERHEAD_GOAL = 1.15


def torch_matrix_cosine(tensor):
  """The post's function, verbatim: one Gram matmul, then an outer product of norms."""
  import torch

  tmm = torch.mm(tensor, tensor.T)
  denom = torch.sqrt(tmm.diagonal()).unsqueeze(0)
  denom_mat = torch.mm(denom.T, denom)
  return torch.nan_to_num(tmm / denom_mat)


def numpy_matrix_cosine(array: np.ndarray) -> np.ndarray:
  """The post's function in pure numpy (its "numpy matrix" twin)."""
  tmm = np.matmul(array, array.T)
  denom = np.sqrt(tmm.diagonal())[None, :]
  denom_mat = np.matmul(denom.T, denom)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.nan_to_num(tmm / denom_mat)


def scipy_loop_cosine(array: np.ndarray, output: np.ndarray) -> np.ndarray:
  from scipy.spatial import distance

  for i in range(len(array)):
    for j in range(len(array)):
      output[i, j] = 1.0 - distance.cosine(array[i], array[j])
  return output


def numpy_loop_cosine(array: np.ndarray, output: np.ndarray) -> np.ndarray:
  for i in range(len(array)):
    for j in range(len(array)):
      output[i, j] = float(np.dot(array[i], array[j])
                           / (np.linalg.norm(array[i]) * np.linalg.norm(array[j])))
  return output


def torch_loop_cosine(tensor, output):
  import torch

  for i in range(len(tensor)):
    for j in range(len(tensor)):
      output[i, j] = torch.cosine_similarity(tensor[i].unsqueeze(0), tensor[j].unsqueeze(0))
  return output


def torch_bmm_cosine(tensor):
  """What a torch user writes for a batch of sets: normalise the rows, then `bmm`."""
  import torch

  u = torch.nn.functional.normalize(tensor, dim=-1)
  return torch.bmm(u, u.transpose(1, 2))


def numpy_batched_cosine(array: np.ndarray) -> np.ndarray:
  u = array / np.linalg.norm(array, axis=-1, keepdims=True)
  return np.matmul(u, np.swapaxes(u, -1, -2))


def unit_rows(array: np.ndarray) -> np.ndarray:
  return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(array.dtype)


def reference_cosine(array: np.ndarray) -> np.ndarray:
  """float64 cosine over the last two axes, the yardstick every candidate is checked against."""
  a = array.astype(np.float64)
  unit = a / np.linalg.norm(a, axis=-1, keepdims=True)
  return np.matmul(unit, np.swapaxes(unit, -1, -2))


_bare_matmul = jax.jit(lambda u: u @ u.T)
_jit_cosine = jax.jit(jaxsim.cosine)
_bare_batched = jax.jit(lambda u: jnp.matmul(u, jnp.swapaxes(u, -1, -2)))


def setup(point: dict, ctx: harness.Context) -> harness.Case:
  """One uniform `[0, 1)` matrix (as `torch.rand`) in every library's own container.

  The inputs are converted once, outside the timing, as in the post: a torch user
  holds a tensor, a JAX user a `jax.Array`.
  """
  import torch

  shape = (point["batch"], point["n"], point["d"]) if "batch" in point else (point["n"],
                                                                             point["d"])
  x = np.random.default_rng(ctx.seed).random(shape, dtype=np.float32)
  return harness.Case(x=x, xj=jnp.asarray(x), xt=torch.from_numpy(x.copy()),
                      uj=jnp.asarray(unit_rows(x)))


def _loop_outputs(c: harness.Case) -> harness.Case:
  import torch

  n = len(c.x)
  return harness.Case(x=c.x, xt=c.xt, np_out=np.zeros((n, n), np.float32),
                      sp_out=np.zeros((n, n), np.float32), t_out=torch.zeros((n, n)))


def _sklearn(c):
  from sklearn.metrics.pairwise import cosine_similarity

  return cosine_similarity(c.x, c.x)


def _reference(case):
  return reference_cosine(case.x)


SEED_GRID = Grid(quick={"n": [50], "d": [64]}, full={"n": [50], "d": [64]})

POST_TABLE = Benchmark(
    name="post_table",
    title="All-pairs cosine of one (50, 64) float32 matrix, eager calls, result ready",
    note="x scipy loop: speed-up over the scipy loop (higher is faster)",
    grid=SEED_GRID,
    setup=setup,
    candidates=[
        Candidate("scipy loop", lambda c: scipy_loop_cosine(c.x, c.sp_out), prepare=_loop_outputs),
        Candidate("numpy loop", lambda c: numpy_loop_cosine(c.x, c.np_out), prepare=_loop_outputs),
        Candidate("torch loop", lambda c: torch_loop_cosine(c.xt, c.t_out), prepare=_loop_outputs),
        Candidate("sklearn", _sklearn),
        Candidate(NUMPY_MATRIX, lambda c: numpy_matrix_cosine(c.x)),
        Candidate(TORCH_MM, lambda c: torch_matrix_cosine(c.xt)),
        Candidate(JAXSIM, lambda c: jaxsim.cosine(c.xj)),
        Candidate(JAXSIM + " (numpy input)", lambda c: jaxsim.cosine(c.x)),
        Candidate(BARE, lambda c: _bare_matmul(c.uj)),
    ],
    check=harness.close_to(_reference),
    tolerance=TOLERANCE,
    baseline="scipy loop",
    # The loops make N^2 Python calls each: a few samples of one call are plenty.
    timing={"warmup": 1},
)

OVERHEAD = Benchmark(
    name="overhead",
    title="Eager call overhead at (50, 64): jaxsim.cosine against a bare jax.jit matmul",
    note=f"x {BARE.split(' (')[0]}: its time / this row's time (1.00x = no overhead)",
    grid=SEED_GRID,
    setup=setup,
    candidates=[
        Candidate(JAXSIM, lambda c: jaxsim.cosine(c.xj)),
        Candidate(JIT_JAXSIM, lambda c: _jit_cosine(c.xj)),
        Candidate(BARE, lambda c: _bare_matmul(c.uj)),
        Candidate(TORCH_MM, lambda c: torch_matrix_cosine(c.xt)),
        Candidate(NUMPY_MATRIX, lambda c: numpy_matrix_cosine(c.x)),
    ],
    check=harness.close_to(_reference),
    tolerance=TOLERANCE,
    baseline=BARE,
    targets=[Target(JAXSIM, BARE, at_most=OVERHEAD_GOAL,
                    label="public call over a bare jitted matmul"),
             Target(JIT_JAXSIM, BARE, at_most=OVERHEAD_GOAL,
                    label="jaxsim's XLA program over a bare jitted matmul")],
    timing={"repeats": 15},
)

BATCHED = Benchmark(
    name="batched",
    title="Many small sets in one call: cosine of each of B sets of (50, 64), float32",
    grid=Grid(quick={"batch": [1024], "n": [50], "d": [64]},
              full={"batch": [4096], "n": [50], "d": [64]}),
    setup=setup,
    candidates=[
        Candidate(JAXSIM, lambda c: jaxsim.cosine(c.xj)),
        Candidate(XLA_BATCHED, lambda c: _bare_batched(c.uj)),
        Candidate(TORCH_BMM, lambda c: torch_bmm_cosine(c.xt)),
        Candidate(NUMPY_BATCHED, lambda c: numpy_batched_cosine(c.x)),
    ],
    check=harness.close_to(_reference),
    tolerance=TOLERANCE,
    work=lambda p: 2.0 * p["batch"] * p["n"] ** 2 * p["d"] / 1e9,
    rate_unit="GFLOP/s",
    baseline=NUMPY_BATCHED,
    targets=[Target(JAXSIM, NUMPY_BATCHED, at_least=1.2),
             Target(JAXSIM, TORCH_BMM, at_least=0.8)],
)


BENCHMARKS = [POST_TABLE, OVERHEAD, BATCHED]


def main(argv: list[str] | None = None) -> dict:
  return harness.main(BENCHMARKS, name=NAME, description=__doc__, argv=argv)


if __name__ == "__main__":
  main()
