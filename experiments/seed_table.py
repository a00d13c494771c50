"""The seed benchmark, reproduced: seven ways to compute all-pairs cosine at N=50, D=64.

The seed post ("I accidentally implemented the fastest pairwise cosine similarity
function") timed loops, scikit-learn, a numpy matrix version and its `torch.mm`
function on one `(50, 64)` uniform random matrix. This script times the same seven
candidates plus `jaxsim.cosine`, each called as a user would call it (eager, result
ready), side by side with the shared harness.

Differences from the seed's code, each deliberate:
- every loop writes its own output; the seed reused one `zeros` buffer for all three
  loops, so its "Result within 1e-8 of ... loop" lines compared the torch loop with
  itself;
- the scipy loop stores `1 - scipy.spatial.distance.cosine` (a similarity); the seed
  stored the distance;
- "numpy matrix" is pure numpy; the seed's version called `.unsqueeze` on what
  `np.matmul` returned for torch inputs, so it was partly torch;
- the agreement check states its tolerance (`torch.allclose`'s defaults, which the
  seed used, are rtol=1e-5, atol=1e-8, not "within 1e-8") and compares every pair of
  results, plus a float64 reference.

Run: `python -m experiments.seed_table [--n 50] [--d 64] [--out results]`.
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import harness

NAME = "seed_table"
JAXSIM = "jaxsim.cosine"
SEED_TORCH = "torch.mm (seed's function)"
NUMPY_MATRIX = "numpy matrix"
LOOPS = ("scipy loop", "numpy loop", "torch loop")
# float32 results of different algorithms agree to a few float32 ulps of 1.
RTOL, ATOL = 1e-5, 1e-6


def torch_matrix_cosine(tensor):
  """The seed's function, verbatim: one Gram matmul, then an outer product of norms."""
  import torch

  tmm = torch.mm(tensor, tensor.T)
  denom = torch.sqrt(tmm.diagonal()).unsqueeze(0)
  denom_mat = torch.mm(denom.T, denom)
  return torch.nan_to_num(tmm / denom_mat)


def numpy_matrix_cosine(array: np.ndarray) -> np.ndarray:
  """The seed's function in pure numpy (its "numpy matrix" twin)."""
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


def reference_cosine(array: np.ndarray) -> np.ndarray:
  """float64 cosine, the yardstick every candidate is checked against."""
  a = array.astype(np.float64)
  unit = a / np.linalg.norm(a, axis=1, keepdims=True)
  return unit @ unit.T


def candidates(data: np.ndarray, *, loops: bool = True) -> dict:
  """name -> zero-argument callable, each on its own native copy of `data`.

  The inputs are converted once, outside the timed call, as the seed did: a torch
  user holds a tensor, a JAX user a `jax.Array`.
  """
  import torch
  from sklearn.metrics.pairwise import cosine_similarity

  import jaxsim

  tensor = torch.from_numpy(data.copy())
  array = jnp.asarray(data)
  n = len(data)
  fns = {}
  if loops:
    np_out, sp_out = np.zeros((n, n), np.float32), np.zeros((n, n), np.float32)
    t_out = torch.zeros((n, n))
    fns["scipy loop"] = lambda: scipy_loop_cosine(data, sp_out)
    fns["numpy loop"] = lambda: numpy_loop_cosine(data, np_out)
    fns["torch loop"] = lambda: torch_loop_cosine(tensor, t_out)
  fns["sklearn"] = lambda: cosine_similarity(data, data)
  fns[NUMPY_MATRIX] = lambda: numpy_matrix_cosine(data)
  fns[SEED_TORCH] = lambda: torch_matrix_cosine(tensor)
  fns[JAXSIM] = lambda: jaxsim.cosine(array)
  fns[JAXSIM + " (numpy input)"] = lambda: jaxsim.cosine(data)
  return fns


def set_torch_threads(threads: int | None) -> int:
  """Sets torch's intra-op threads when `threads` is given; returns the count in use."""
  import torch

  if threads is not None:
    torch.set_num_threads(threads)
  return torch.get_num_threads()


def to_numpy(result) -> np.ndarray:
  if hasattr(result, "detach"):
    result = result.detach().cpu().numpy()
  return np.asarray(result)


def check(fns: dict, reference: np.ndarray) -> dict:
  """Runs every candidate once and compares all results with each other and `reference`.

  Returns:
    `{"reference": {name: bool}, "pairs": {"a | b": bool}, "max_abs_err": {name: float},
    "passed": bool}`.
  """
  results = {name: to_numpy(fn()).copy() for name, fn in fns.items()}
  for name, r in results.items():
    if r.shape != reference.shape:
      raise ValueError(f"{name} returned shape {r.shape}, expected {reference.shape}.")
  ref = reference
  out = {"rtol": RTOL, "atol": ATOL, "reference": {}, "pairs": {}, "max_abs_err": {}}
  for name, r in results.items():
    out["reference"][name] = bool(np.allclose(r, ref, rtol=RTOL, atol=ATOL))
    out["max_abs_err"][name] = float(np.max(np.abs(r.astype(np.float64) - ref)))
  for a, b in itertools.combinations(results, 2):
    out["pairs"][f"{a} | {b}"] = bool(np.allclose(results[a], results[b], rtol=RTOL, atol=ATOL))
  out["passed"] = all(out["reference"].values()) and all(out["pairs"].values())
  return out


def run(n: int, d: int, *, seed: int = 0, repeats: int = 7, loop_repeats: int = 3,
        min_sample_s: float = 0.05) -> dict:
  """Checks, then times, every candidate on one `(n, d)` uniform matrix (as `torch.rand`)."""
  data = np.random.default_rng(seed).random((n, d), dtype=np.float32)
  fns = candidates(data)
  checks = check(fns, reference_cosine(data))
  _print_checks(checks)
  if not checks["passed"]:
    return {"n": n, "d": d, "checks": checks, "timings": {}}
  # Loops make n^2 Python calls each: a few single-call samples are plenty.
  loops = {k: fns[k] for k in LOOPS}
  fast = {k: v for k, v in fns.items() if k not in LOOPS}
  timings = harness.compare(loops, repeats=loop_repeats, warmup=1, min_sample_s=0.0)
  timings.update(harness.compare(fast, repeats=repeats, min_sample_s=min_sample_s))
  order = [*LOOPS, *fast]
  timings = {k: timings[k] for k in order}
  return {"n": n, "d": d, "seed": seed, "checks": checks, "timings": timings,
          "async_dispatch": _async_dispatch()}


def _async_dispatch() -> bool | None:
  if jax.default_backend() != "cpu":
    return None
  return bool(jax.config.read("jax_cpu_enable_async_dispatch"))


def _print_checks(checks: dict) -> None:
  # The seed's format, then the strict all-pairs verdict.
  tol = f"rtol={checks['rtol']:g}, atol={checks['atol']:g}"
  pairs = checks["pairs"]
  for name in checks["reference"]:
    if name != JAXSIM:
      ok = pairs.get(f"{name} | {JAXSIM}", pairs.get(f"{JAXSIM} | {name}"))
      print(f"{JAXSIM} within {tol} of {name}: {ok}")
  print(f"all {len(checks['pairs'])} pairs of results agree ({tol}): "
        f"{all(checks['pairs'].values())}")
  bad = [k for k, ok in checks["reference"].items() if not ok]
  print(f"all results within {tol} of float64: {not bad}" + (f" (failed: {bad})" if bad else ""))


def table(result: dict) -> list[dict]:
  t = result["timings"]
  base = t["scipy loop"].median
  ours = t[JAXSIM].median
  return [{"implementation": name, "us": tm.median * 1e6,
           "speed-up vs scipy loop": base / tm.median, "jaxsim faster by": tm.median / ours}
          for name, tm in t.items()]


def print_table(result: dict) -> None:
  rows = table(result)
  width = max(len(r["implementation"]) for r in rows) + 1
  print(f"\nN={result['n']}, D={result['d']}, median of round-robin samples "
        f"({jax.default_backend()}, async dispatch: {result['async_dispatch']}, "
        f"torch threads: {result['torch_threads']})")
  print(f"{'':{width}}  {'time':>12}  {'speed-up':>9}  {'jaxsim x':>8}")
  for r in rows:
    mark = "* " if r["implementation"] == JAXSIM else "  "
    print(f"{mark}{r['implementation'] + ':':{width}}{r['us']:>10.1f} us  "
          f"{r['speed-up vs scipy loop']:>8.3g}x  {r['jaxsim faster by']:>7.2f}x")
  print("speed-up: vs the scipy loop; jaxsim x: that row's time / jaxsim.cosine's "
        "(> 1 means jaxsim is faster)")


def main(argv: list[str] | None = None) -> dict:
  p = harness.parser(__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=50, help="rows (the seed: 50)")
  p.add_argument("--d", type=int, default=64, help="features (the seed: 64)")
  p.add_argument("--sync-dispatch", action="store_true",
                 help="CPU only: run JAX programs on the calling thread (not JAX's default)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads for the torch candidates (default: torch's own)")
  args = p.parse_args(argv)
  if args.sync_dispatch:
    harness.set_cpu_dispatch(False)
  torch_threads = set_torch_threads(args.torch_threads)
  repeats, min_sample_s = (3, 0.02) if args.quick else (args.repeats, 0.05)
  result = run(args.n, args.d, seed=args.seed, repeats=repeats,
               loop_repeats=1 if args.quick else 3, min_sample_s=min_sample_s)
  result["torch_threads"] = torch_threads
  if result["timings"]:
    print_table(result)
  path = harness.write_json(args.out, NAME, result)
  print(f"\nwrote {path}")
  if not result["checks"]["passed"]:
    print("results disagree: nothing was timed", file=sys.stderr)
    raise SystemExit(1)
  return result


if __name__ == "__main__":
  main()
