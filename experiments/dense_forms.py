"""Dense cosine forms against XLA's raw matmul, and the XLA CPU flags that move the matmul.

Issue 15, item 4. What `jaxsim.cosine` pays on top of one `a @ b.T`:
- "self": `jaxsim.cosine(x)` (computed from the upper 256-row tiles, each mirrored in
  place; `jaxsim._src.kernels.symmetric_dense`) against XLA's `u @ u.T` and
  scikit-learn's `cosine_similarity(x)` (numpy's `a @ a.T`, BLAS syrk). The raw matmul
  runs on rows normalised beforehand, untimed, so that all three give cosines and are
  checked against float64; it does the same flops as `x @ x.T`.
- "cross": `jaxsim.cosine(x, y)` against XLA's `u @ v.T` on normalised rows, at d = 512
  and d = 128.
- "self_dot": `jaxsim.dot(x)` (the same mirrored upper tiles, no finish) against XLA's
  `x @ x.T` and numpy's (BLAS syrk).
- "xla_flags" (a study): the `n x n x d` matmul and `jaxsim.cosine(x)`, each in a fresh
  subprocess per setting of `XLA_FLAGS` (the XLA CPU flags the installed jaxlib lists,
  see `XLA_FLAGS=--help`) or of `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (malloc backs
  its large blocks with transparent huge pages, so a fresh output takes far fewer page
  faults). It records the matmul rate of each and the cosine / matmul ratio inside each
  process. jaxsim sets none of them: the JSON records the flags and tunables that the
  parent process ran with (`flags_in_effect`), which must be empty for the figures of
  the benchmarks to be jaxsim's own.

Run: `python -m experiments.dense_forms --out results` (`--quick`: the three target sizes and
four flag settings at n=2048, about a minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.metrics.pairwise import cosine_similarity

import jaxsim
from experiments import harness
from experiments.harness import Benchmark, Candidate, Grid, Study, Target

NAME = "dense_forms"
RAW = "XLA u @ u.T"
RAW_CROSS = "XLA u @ v.T"
JAXSIM_SELF = "jaxsim.cosine(x)"
JAXSIM_CROSS = "jaxsim.cosine(x, y)"
SKLEARN = "sklearn cosine_similarity(x)"
JAXSIM_DOT = "jaxsim.dot(x)"
RAW_DOT = "XLA x @ x.T"
NUMPY_DOT = "numpy x @ x.T"

_matmul_t = jax.jit(lambda a, b: a @ b.T)
_self_matmul = jax.jit(lambda a: a @ a.T)


def _unit(x: np.ndarray) -> np.ndarray:
  x64 = x.astype(np.float64)
  return x64 / np.linalg.norm(x64, axis=1, keepdims=True)


def _setup(point: dict, ctx: harness.Context) -> harness.Case:
  n, d = point["n"], point["d"]
  rng = np.random.default_rng(ctx.seed)
  x, y = (rng.standard_normal((n, d), np.float32) for _ in range(2))
  ux, uy = _unit(x), _unit(y)
  rows = np.arange(0, n, max(1, n // 64))
  x64 = x.astype(np.float64)
  return harness.Case(x=x, xj=jnp.asarray(x), yj=jnp.asarray(y), rows=rows,
                      ux=jnp.asarray(ux, jnp.float32), uy=jnp.asarray(uy, jnp.float32),
                      ref_self=ux[rows] @ ux.T, ref_cross=ux[rows] @ uy.T,
                      ref_dot=x64[rows] @ x64.T)


def _check(which: str):
  def check(case, outputs):
    ref = getattr(case, f"ref_{which}")
    return {name: float(np.max(np.abs(np.asarray(out, np.float64)[case.rows] - ref)))
            for name, out in outputs.items()}
  return check


def _check_dot(case, outputs):
  # Dot products grow with d: the error relative to the largest (a squared norm).
  ref = case.ref_dot
  return {name: float(np.max(np.abs(np.asarray(out, np.float64)[case.rows] - ref))
                      / np.max(np.abs(ref))) for name, out in outputs.items()}


_GFLOP = lambda p: 2 * p["n"] ** 2 * p["d"] / 1e9

SELF = Benchmark(
    name="dense_self",
    title="Dense cosine of a set with itself, n x n from n x d float32",
    grid=Grid(quick={"n": [4096], "d": [512]}, full={"n": [2048, 4096], "d": [512]}),
    setup=_setup,
    candidates=[
        Candidate(JAXSIM_SELF, lambda c: jaxsim.cosine(c.xj)),
        Candidate(RAW, lambda c: _self_matmul(c.ux)),
        Candidate(SKLEARN, lambda c: cosine_similarity(c.x)),
    ],
    check=_check("self"), tolerance=1e-5, work=_GFLOP, rate_unit="GFLOP/s", baseline=RAW,
    targets=[Target(JAXSIM_SELF, RAW, at_least=1.0, where=lambda p: p["n"] >= 4096,
                    label="cosine(x) >= 1.0x the raw matmul at 4096 x 512 (stretch: "
                          "sklearn's 1.2-1.35x)")],
    note="x raw: the raw matmul's time / this row's; rate counts the full n^2 d flops")

CROSS = Benchmark(
    name="dense_cross",
    title="Dense cosine between two sets, n x n from two n x d float32",
    grid=Grid(quick={"n": [2048], "d": [512]}, full={"n": [2048, 4096], "d": [128, 512]}),
    setup=_setup,
    candidates=[
        Candidate(JAXSIM_CROSS, lambda c: jaxsim.cosine(c.xj, c.yj)),
        Candidate(RAW_CROSS, lambda c: _matmul_t(c.ux, c.uy)),
    ],
    check=_check("cross"), tolerance=1e-5, work=_GFLOP, rate_unit="GFLOP/s",
    baseline=RAW_CROSS,
    targets=[Target(JAXSIM_CROSS, RAW_CROSS, at_least=0.95,
                    where=lambda p: p["n"] == 2048 and p["d"] == 512,
                    label="cosine(x, y) >= 0.95x the raw matmul at 2048 x 512")],
    note="x raw: the raw matmul's time / this row's")

_self_dot = jax.jit(lambda a: a @ a.T)

SELF_DOT = Benchmark(
    name="dense_self_dot",
    title="Dense dot products of a set with itself, n x n from n x d float32",
    grid=Grid(quick={"n": [4096], "d": [512]}, full={"n": [2048, 4096], "d": [512]}),
    setup=_setup,
    candidates=[
        Candidate(JAXSIM_DOT, lambda c: jaxsim.dot(c.xj)),
        Candidate(RAW_DOT, lambda c: _self_dot(c.xj)),
        Candidate(NUMPY_DOT, lambda c: c.x @ c.x.T),
    ],
    check=_check_dot, tolerance=1e-5, work=_GFLOP, rate_unit="GFLOP/s", baseline=RAW_DOT,
    targets=[Target(JAXSIM_DOT, RAW_DOT, at_least=1.0, where=lambda p: p["n"] >= 4096,
                    label="dot(x) from mirrored tiles >= 1.0x the raw matmul at 4096 x 512")],
    note="x raw: the raw matmul's time / this row's; error relative to the largest score")

# name -> (XLA_FLAGS, GLIBC_TUNABLES), each run in its own process.
SETTINGS: dict[str, tuple[str, str]] = {
    "default": ("", ""),
    "glibc.malloc.hugetlb=1": ("", "glibc.malloc.hugetlb=1"),
    "xnnpack off": ("--xla_cpu_use_xnnpack=false", ""),
    "ynn fusion -dot": ("--xla_cpu_experimental_ynn_fusion_type=-dot", ""),
    "ynn fusion +eltwise": ("--xla_cpu_experimental_ynn_fusion_type=+eltwise", ""),
    "xnn fusion dot,eltwise": ("--xla_cpu_experimental_xnn_fusion_type=dot,eltwise", ""),
    "xnn graph fusion greedy": (
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", ""),
    "onednn": ("--xla_cpu_use_onednn=true", ""),
    "onednn custom call": ("--xla_cpu_experimental_onednn_custom_call=true", ""),
    "eigen single-thread": ("--xla_cpu_multi_thread_eigen=false", ""),
    "fast math": ("--xla_cpu_enable_fast_math=true", ""),
    "vector width 512": ("--xla_cpu_prefer_vector_width=512", ""),
    "fusion emitters off": ("--xla_cpu_use_fusion_emitters=false", ""),
}
QUICK_SETTINGS = ("default", "glibc.malloc.hugetlb=1", "xnnpack off", "ynn fusion +eltwise")

# Runs in the subprocess: times the raw matmul and jaxsim.cosine(x) side by side.
_CHILD = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import jaxsim
from experiments import harness
n, d, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
min_s, idle_s = float(sys.argv[4]), float(sys.argv[5])
x = np.random.default_rng(0).standard_normal((n, d), np.float32)
u = jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))
xj = jnp.asarray(x)
mm = jax.jit(lambda a: a @ a.T)
t = harness.compare({"matmul": lambda: mm(u), "cosine": lambda: jaxsim.cosine(xj)},
                    repeats=repeats, min_sample_s=min_s, idle_s=idle_s)
err = float(np.max(np.abs(np.asarray(jaxsim.cosine(xj))[:64] - np.asarray(mm(u))[:64])))
print(json.dumps({k: v.median for k, v in t.items()} | {"max_abs_diff": err}))
"""


def _run_setting(name: str, n: int, d: int, repeats: int, min_s: float, idle_s: float) -> dict:
  flags, tunables = SETTINGS[name]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
  if flags:
    env["XLA_FLAGS"] = flags
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  env["PYTHONPATH"] = os.pathsep.join(
      [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(d), str(repeats), str(min_s),
                         str(idle_s)], env=env, capture_output=True, text=True, timeout=600)
  row = {"setting": name, "XLA_FLAGS": flags, "GLIBC_TUNABLES": tunables}
  if proc.returncode != 0:
    return row | {"status": "failed", "reason": proc.stderr.strip().splitlines()[-1:]}
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  gflop = 2 * n * n * d / 1e9
  return row | {"status": "ok", "matmul_s": out["matmul"], "cosine_s": out["cosine"],
                "matmul_gflops": gflop / out["matmul"],
                "cosine_vs_matmul": out["matmul"] / out["cosine"],
                "max_abs_diff": out["max_abs_diff"]}


def _flag_sweep(ctx: harness.Context) -> dict:
  n = int(ctx.args.flags_n or (2048 if ctx.quick else 4096))
  d = 512
  names = QUICK_SETTINGS if ctx.quick else tuple(SETTINGS)
  repeats = ctx.args.repeats or (3 if ctx.quick else 5)
  min_s = ctx.args.min_sample_s if ctx.args.min_sample_s is not None else 0.2
  idle_s = ctx.args.idle_s if ctx.args.idle_s is not None else harness.IDLE_S
  rows = [_run_setting(name, n, d, repeats, min_s, idle_s)
          for name in harness.progress(names, "flags")]
  base = next((r for r in rows if r["setting"] == "default" and r["status"] == "ok"), None)
  for r in rows:
    if base is not None and r["status"] == "ok":
      r["matmul_vs_default"] = base["matmul_s"] / r["matmul_s"]
  return {"n": n, "d": d, "rows": rows,
          "flags_in_effect": {"XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                              "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")},
          "note": "each setting in its own process, timed in turn: compare the rates "
                  "across settings with the machine's noise in mind; cosine_vs_matmul "
                  "is measured side by side inside each process"}


def _summary(result: dict) -> str:
  lines = [f"{result['n']} x {result['n']} x {result['d']} float32 matmul per setting "
           f"(flags in effect in this process: {result['flags_in_effect']})"]
  for r in result["rows"]:
    if r["status"] != "ok":
      lines.append(f"  {r['setting']:26s} failed: {r.get('reason')}")
      continue
    lines.append(f"  {r['setting']:26s} matmul {r['matmul_gflops']:6.1f} GFLOP/s "
                 f"({r.get('matmul_vs_default', float('nan')):.2f}x default), "
                 f"cosine(x) {r['cosine_vs_matmul']:.2f}x the matmul")
  return "\n".join(lines)


FLAGS = Study(
    name="xla_flags", title="XLA CPU flags and malloc tunables against the raw matmul",
    run=_flag_sweep, summary=_summary,
    # A setting may be unknown to another jaxlib; the study fails only if the default does.
    passed=lambda r: any(x["setting"] == "default" and x["status"] == "ok" for x in r["rows"]))


def _arguments(p):
  p.add_argument("--flags-n", type=int, help="rows of the flag sweep's matmul "
                 "(default 4096, quick 2048)")


def main(argv: list[str] | None = None) -> dict:
  return harness.main([SELF, CROSS, SELF_DOT, FLAGS], name=NAME, description=__doc__, argv=argv,
                      add_arguments=_arguments)


if __name__ == "__main__":
  main()
