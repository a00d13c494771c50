"""Accelerator check: jaxsim on whatever backend JAX has, in one short command.

    python -m experiments.accelerator [--quick] --out DIR

Sizes come from the backend and the device's memory (`jax.devices()[0].memory_stats()`
where the backend reports it): GPU and TPU sizes such as all-pairs cosine over
16384 x 1024 rows and top-k of 4096 queries over 2**20 x 768 corpus rows, and CPU sizes
that finish in minutes on two cores. Four sections, each run on its own so that one
failure is recorded in the JSON and the rest still runs (an accelerator run is rare):

- `correctness`: every public function at moderate sizes (512+ rows) in float32,
  bfloat16 and float16, against float64 numpy on the host (`tests/reference.py`, the
  references the test suite uses): the largest error relative to the reference's scale,
  per function and dtype.
- `allpairs`: `jaxsim.cosine(x)` (all pairs of one set) in float32 and bfloat16, in
  TFLOP/s (2 n^2 d flops) against the raw matmul of the same pre-normalised rows and
  against the device's peak rate (`PEAK_TFLOPS`).
- `topk`: `jaxsim.topk` against the raw matmul of the same shape (scores only, in the
  input dtype) and against the dense matmul plus `lax.top_k`, with the memory XLA
  plans for each; on TPU also `approx=True`.
- `attention`: every logit metric, dense and blocked, against
  `jax.nn.dot_product_attention` with `implementation="xla"` and on GPU `"cudnn"`:
  time and memory, forward and forward + backward; on GPU also jaxsim's
  `implementation="cudnn"` form of every metric, where this jaxsim has it.

Before anything is timed, the candidates of a section are checked against each other;
a disagreement is recorded and checked, not fatal, and so is a dtype or a candidate
that fails (out of memory, a kernel refusing a shape).

Output: a table per section on stdout, and `DIR/accelerator.json` with the backend,
device kind and memory, versions, the sizes, every row, each section's status and the
checks against the targets (written after every section, atomically, so a run cut off
by a timeout still leaves the sections it finished). Timing uses the shared harness:
warm-up, then side-by-side round-robin samples, median reported.

`--tiny` shrinks every size for the test suite; `--budget-s` skips the sections that
would start after that many seconds (recorded as skipped); `--only` picks sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxsim
from experiments import harness
from jaxsim._src import defaults
from tests import reference

# Dense peak rates in TFLOP/s (no sparsity), from the vendors' data sheets, by a
# substring of `device_kind`; the first match wins, so the more specific names come
# first. "float32" is the rate of JAX's default precision for float32 matmuls on that
# device: TF32 tensor cores on NVIDIA Ampere and later, one bfloat16 pass on TPU.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 495.0}),  # SXM
    ("H200", {"bfloat16": 989.0, "float32": 495.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.0, "float32": 183.0}),
    ("L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}),  # v6e (Trillium)
)

# The targets, checked where they apply (a GPU or TPU with a known peak).
TARGETS = {
    "allpairs_bf16_fraction_of_peak": 0.70,
    "topk_fraction_of_raw_matmul": 0.60,
    "blocked_cosine_over_cudnn_scaled_dot": 1.3,
}

# Largest error relative to the reference's scale that counts as correct. float32 on an
# accelerator runs at the default matmul precision (TF32 / bfloat16 passes, about
# 3 decimal digits), hence the looser bound there.
TOLERANCE = {"float32": 2e-5, "float32_accelerator": 1e-2, "bfloat16": 2e-2,
             "float16": 4e-3}

ATTENTION_METRICS = ("dot", "scaled_dot", "cosine")
# A full run on a GPU or TPU starts no section after this many seconds unless
# `--budget-s` says otherwise, so that it ends within about 5 minutes.
ACCELERATOR_BUDGET_S = 240.0
SECTIONS = ("correctness", "allpairs", "topk", "attention")


def peak_tflops(device_kind: str) -> dict[str, float] | None:
  """The dense peak rates of a device by its `device_kind`, or None if unknown."""
  for name, rates in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return rates
  return None


def device_memory() -> int | None:
  """The first device's memory in bytes, where the backend reports it."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # Backends without the call raise; None means "not reported".
    return None
  if not stats:
    return None
  return int(stats.get("bytes_limit") or stats.get("bytes_reservable_limit") or 0) or None


# ---------------------------------------------------------------------------------------
# Sizes.


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Problem sizes of one run; see `plan`."""

  check_rows: int  # correctness: rows of x; y has 0.8x as many
  check_d: int
  check_dtypes: tuple[str, ...]
  check_attention_metrics: tuple[str, ...]
  dtypes: tuple[str, ...]  # of the timed all-pairs and top-k sections
  allpairs_n: int
  allpairs_d: int
  topk_q: int
  topk_n: int
  topk_d: int
  topk_k: int
  attention: tuple[int, int, int, int]  # (B, T=S, N=K, H)
  attention_block: int
  attention_dtype: str
  attention_metrics: tuple[str, ...]
  repeats: int
  min_sample_s: float
  idle_s: float = harness.IDLE_S  # the pause before each timed sample (`harness.compare`)


def plan(backend: str, memory: int | None, mode: str) -> Sizes:
  """Sizes for `backend` with `memory` bytes of device memory, `mode` full/quick/tiny.

  Accelerator sizes are the issue's (all pairs of 16384 rows at d=1024; top-k of 4096
  queries over 2**20 x 768 corpus rows; attention at B=4, T=S=4096, 16 heads of 128),
  halved until each section's largest temporary (the dense top-k baseline's `q x n`
  float32 scores, the `n x n` scores, dense attention's backward pass) takes at most a
  third of the memory XLA may use (on GPU, 75% of the card unless
  `XLA_PYTHON_CLIENT_MEM_FRACTION` says otherwise).
  """
  if mode == "tiny":
    # Every code path once, at sizes where compilation is all the cost: one dtype,
    # one attention metric (the one the attention target is about).
    return Sizes(check_rows=96, check_d=16, check_dtypes=("float32",),
                 check_attention_metrics=("cosine",), dtypes=("float32",), allpairs_n=64,
                 allpairs_d=16, topk_q=16, topk_n=300, topk_d=16, topk_k=5,
                 attention=(1, 40, 2, 16), attention_block=16, attention_dtype="float32",
                 attention_metrics=("cosine",), repeats=1, min_sample_s=0.0, idle_s=0.0)
  # TPUs have no float16 matmul unit; XLA emulates it there.
  check_dtypes = (("float32", "bfloat16") if backend == "tpu"
                  else ("float32", "bfloat16", "float16"))
  every = dict(check_dtypes=check_dtypes, check_attention_metrics=ATTENTION_METRICS,
               dtypes=("float32", "bfloat16"), attention_metrics=ATTENTION_METRICS)
  if backend in ("gpu", "tpu") and mode == "full":
    mem = memory or 16 << 30
    topk_n, allpairs_n, batch = 1 << 20, 16384, 4
    while topk_n > 1 << 16 and 4096 * topk_n * 4 > mem // 3:
      topk_n //= 2
    while allpairs_n > 4096 and allpairs_n**2 * 4 > mem // 3:
      allpairs_n //= 2
    # Dense attention's backward pass holds about four (B, N, T, S) float32 arrays
    # (logits, weights and their gradients).
    while batch > 1 and batch * 16 * 4096**2 * 4 * 4 > mem // 3:
      batch //= 2
    return Sizes(check_rows=768, check_d=64, **every, allpairs_n=allpairs_n,
                 allpairs_d=1024, topk_q=4096, topk_n=topk_n, topk_d=768, topk_k=10,
                 attention=(batch, 4096, 16, 128), attention_block=1024,
                 attention_dtype="bfloat16", repeats=5, min_sample_s=0.05)
  if backend in ("gpu", "tpu"):  # quick on an accelerator
    return Sizes(check_rows=512, check_d=64, **every, allpairs_n=8192,
                 allpairs_d=512, topk_q=1024, topk_n=1 << 18, topk_d=256, topk_k=10,
                 attention=(2, 2048, 8, 64), attention_block=512, attention_dtype="bfloat16",
                 repeats=3, min_sample_s=0.02)
  if mode == "full":  # CPU
    return Sizes(check_rows=768, check_d=96, **every, allpairs_n=4096,
                 allpairs_d=256, topk_q=1024, topk_n=100_000, topk_d=256, topk_k=10,
                 attention=(1, 2048, 4, 64), attention_block=256, attention_dtype="float32",
                 repeats=5, min_sample_s=0.05)
  return Sizes(check_rows=512, check_d=64, **every, allpairs_n=2048,
               allpairs_d=128, topk_q=256, topk_n=32768, topk_d=128, topk_k=10,
               attention=(1, 1024, 4, 64), attention_block=256, attention_dtype="float32",
               repeats=3, min_sample_s=0.02)


# ---------------------------------------------------------------------------------------
# Helpers.


def compiled(fn: Callable, *args) -> tuple[Callable, dict[str, int] | None]:
  """`fn` compiled for `args`, and the memory XLA plans for it (None if unreported)."""
  exe = jax.jit(fn).lower(*args).compile()
  try:
    stats = exe.memory_analysis()
  except Exception:  # Some backends and versions raise instead of returning None.
    stats = None
  if stats is None:
    return exe, None
  return exe, {"temp_bytes": int(stats.temp_size_in_bytes),
               "argument_bytes": int(stats.argument_size_in_bytes),
               "output_bytes": int(stats.output_size_in_bytes)}


def time_all(fns: dict[str, Callable[[], Any]], sizes: Sizes) -> dict[str, float]:
  """Median seconds per call of each zero-argument callable, timed side by side."""
  timings = harness.compare(fns, repeats=sizes.repeats, warmup=1,
                            min_sample_s=sizes.min_sample_s, idle_s=sizes.idle_s)
  return {name: t.median for name, t in timings.items()}


def to_f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def rel_error(got, want) -> float:
  """Largest |got - want| over the largest |want| (1 if all are zero), NaN-aware."""
  got, want = to_f64(got), np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise ValueError(f"shape {got.shape} != reference shape {want.shape}")
  scale = float(np.max(np.abs(want), initial=0.0)) or 1.0
  diff = np.abs(got - want)
  if not np.all(np.isfinite(diff)):
    return math.inf
  return float(np.max(diff, initial=0.0)) / scale


def tolerance(dtype: str, backend: str) -> float:
  if dtype == "float32" and backend != "cpu":
    return TOLERANCE["float32_accelerator"]
  return TOLERANCE[dtype]


def normal(key, shape, dtype) -> jax.Array:
  """Standard normal data made on the device (no host round trip for large corpora)."""
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def unit(x: jax.Array) -> jax.Array:
  xf = x.astype(jnp.float32)
  return (xf * lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))).astype(x.dtype)


def matmul_t(a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
  """`a @ b.T` accumulated in float32, returned in `out_dtype`: the raw matmul."""
  dims = (((1,), (1,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(out_dtype)


# ---------------------------------------------------------------------------------------
# Sections. Each returns {"rows": [...], ...}; `run_section` records failures.


def correctness(sizes: Sizes, backend: str, key) -> dict[str, Any]:
  """Every public function against float64 numpy, per dtype."""
  n, d = sizes.check_rows, sizes.check_d
  m = max(8, (n * 4) // 5)
  rng = np.random.default_rng(0)
  x32 = rng.standard_normal((n, d)).astype(np.float32)
  y32 = rng.standard_normal((m, d)).astype(np.float32)
  # Near-duplicate rows: small distances, where the Euclidean expansion cancels.
  y32[: m // 8] = x32[: m // 8] + 0.05 * rng.standard_normal((m // 8, d)).astype(np.float32)
  b, t, heads, h = 2, max(24, n // 4), 4, 32
  s_len = t + t // 4
  qa = rng.standard_normal((b, t, heads, h)).astype(np.float32)
  ka = rng.standard_normal((b, s_len, heads // 2, h)).astype(np.float32)
  va = rng.standard_normal((b, s_len, heads // 2, h)).astype(np.float32)
  rows = []
  for dtype in sizes.check_dtypes:
    tol = tolerance(dtype, backend)
    x, y = jnp.asarray(x32, dtype), jnp.asarray(y32, dtype)
    xr, yr = to_f64(x), to_f64(y)  # the rounded inputs: the reference sees what jaxsim sees

    def record(name, fn, dtype=dtype, tol=tol):
      try:
        err = fn()
        if not math.isfinite(err):
          raise FloatingPointError("non-finite values where the reference is finite")
        rows.append({"function": name, "dtype": dtype, "rel_error": err, "tolerance": tol,
                     "passed": bool(err <= tol)})
      except Exception as e:  # One function failing must not hide the others' results.
        rows.append({"function": name, "dtype": dtype, "rel_error": None, "tolerance": tol,
                     "passed": False, "error": f"{type(e).__name__}: {e}"[:500]})

    for metric in reference.METRICS:
      fn = getattr(jaxsim, metric)
      record(metric, lambda fn=fn, metric=metric: rel_error(fn(x, y),
                                                            reference.METRICS[metric](xr, yr)))
    for metric in ("cosine", "euclidean"):
      record(f"pairwise(x, metric={metric!r})",
             lambda metric=metric: rel_error(jaxsim.pairwise(x, metric=metric),
                                             reference.METRICS[metric](xr, xr)))
    for metric in ("cosine", "sq_euclidean"):
      record(f"topk(metric={metric!r})", lambda metric=metric: _check_topk(x, y, xr, yr, metric))
    record("pairs_above", lambda: _check_pairs(x, xr))
    record("similarity_stats", lambda: _check_stats(x, y, xr, yr))
    qd, kd, vd = (jnp.asarray(a, dtype) for a in (qa, ka, va))
    qr, kr, vr = (to_f64(a) for a in (qd, kd, vd))
    for metric in sizes.check_attention_metrics:
      record(f"attention_scores({metric})",
             lambda metric=metric: rel_error(
                 jaxsim.attention_scores(qd, kd, metric=metric),
                 reference.attention_logits(qr, kr, kind=metric)))
      record(f"attention_weights({metric})",
             lambda metric=metric: rel_error(
                 jaxsim.attention_weights(qd, kd, metric=metric),
                 reference.attention_weights(qr, kr, kind=metric)))
      want = functools.cache(
          lambda metric=metric: reference.attention(qr, kr, vr, kind=metric, is_causal=True))
      record(f"attention({metric}, causal)",
             lambda metric=metric, want=want: rel_error(
                 jaxsim.attention(qd, kd, vd, metric=metric, is_causal=True),
                 want()))
      record(f"attention({metric}, causal, blocked)",
             lambda metric=metric, want=want: rel_error(
                 jaxsim.attention(qd, kd, vd, metric=metric, is_causal=True,
                                block_size=max(8, t // 3)), want()))
  # Public functions this section does not cover yet (added to jaxsim after it).
  covered = {r["function"].split("(")[0] for r in rows}
  unchecked = sorted(name for name in jaxsim.__all__
                     if inspect.isfunction(getattr(jaxsim, name)) and name not in covered)
  return {"rows": rows, "passed": all(r["passed"] for r in rows), "unchecked": unchecked,
          "notes": [f"not checked: {', '.join(unchecked)}"] if unchecked else [],
          "sizes": {"x": [n, d], "y": [m, d], "attention_q": list(qa.shape),
                    "attention_kv": list(ka.shape)}}


def _check_topk(x, y, xr, yr, metric) -> float:
  k = 10
  scores, idx = jaxsim.topk(x, y, k, metric=metric)
  ref = reference.METRICS[metric](xr, yr)
  want, want_idx = reference.topk(ref, k, largest=metric not in reference.DISTANCES)
  # Scores are compared rank by rank, which near-ties cannot upset; the indices must
  # be the reference's wherever the reference's k-th and (k+1)-th scores are apart.
  agree = np.mean([len(set(a) & set(b)) / k for a, b in zip(np.asarray(idx), want_idx,
                                                             strict=True)])
  err = rel_error(scores, want)
  if agree < 0.99:
    raise AssertionError(f"top-{k} sets agree with the reference for {agree:.3f} of slots")
  return err


def _check_pairs(x, xr) -> float:
  ref = reference.cosine(xr, xr)
  # Between the top 0.05% and 0.1% of the pairs, cut in the widest gap between
  # neighbouring scores, so that rounding cannot move a pair across the threshold.
  lo = max(1, ref.shape[0] ** 2 // 4000)
  top = np.sort(ref[np.triu_indices(ref.shape[0], 1)])[::-1][:2 * lo + 2]
  i = lo + int(np.argmax(top[lo:2 * lo + 1] - top[lo + 1:2 * lo + 2]))
  threshold = float(top[i] + top[i + 1]) / 2
  want_rows, want_cols, want_vals = reference.pairs_above(ref, threshold, upper=True)
  got = jaxsim.pairs_above(x, threshold=threshold, max_pairs=4 * len(want_rows) + 16)
  count = int(got.count)
  held = np.asarray(got.rows) >= 0
  got_pairs = dict(zip(zip(np.asarray(got.rows)[held].tolist(),
                           np.asarray(got.cols)[held].tolist(), strict=True),
                       to_f64(got.scores)[held], strict=True))
  want_pairs = dict(zip(zip(want_rows.tolist(), want_cols.tolist(), strict=True), want_vals,
                        strict=True))
  common = got_pairs.keys() & want_pairs.keys()
  # A pair within rounding of the threshold may fall either side; more than 1% is wrong.
  if abs(count - len(want_pairs)) > 0.01 * len(want_pairs) + 1 or not common:
    raise AssertionError(f"{count} pairs found, {len(want_pairs)} in the reference")
  return max(abs(got_pairs[p] - want_pairs[p]) for p in common) / max(abs(want_vals).max(), 1)


def _check_stats(x, y, xr, yr) -> float:
  st = jaxsim.similarity_stats(x, y, bins=20)
  vals = reference.pair_values(reference.cosine(xr, yr))
  if int(st.count) != vals.size:
    raise AssertionError(f"count {int(st.count)} != {vals.size}")
  want = np.array([vals.mean(), vals.std(), vals.min(), vals.max()])
  got = np.array([float(st.mean), float(st.std), float(st.min), float(st.max)])
  hist, _ = np.histogram(vals, bins=20, range=(-1.0, 1.0))
  # Scores within rounding of a bin edge may land in the neighbouring bin.
  moved = np.abs(np.asarray(st.histogram, np.float64) - hist).sum() / vals.size
  if moved > 0.01:
    raise AssertionError(f"{moved:.4f} of the pairs are in a different histogram bin")
  return float(np.max(np.abs(got - want)))


def per_dtype(dtypes, fn: Callable[[str], tuple[list, dict]]) -> dict[str, Any]:
  """Runs `fn(dtype) -> (rows, agreement)` for each dtype; a dtype that fails (out of
  memory, say) is recorded under `errors` and the others still run."""
  rows, agreement, errors = [], {}, {}
  for dtype in dtypes:
    try:
      more, agreement[dtype] = fn(dtype)
      rows += more
    except Exception as e:  # Keep the other dtype's figures.
      errors[dtype] = f"{type(e).__name__}: {e}"[:500]
  if errors and not rows:
    raise RuntimeError(f"every dtype failed: {errors}")
  return {"rows": rows, "agreement": agreement, "errors": errors,
          "agreement_passed": all(a["passed"] for a in agreement.values() if a)}


def allpairs(sizes: Sizes, backend: str, key, peak) -> dict[str, Any]:
  """All-pairs cosine against the raw matmul and the device's peak rate."""
  n, d = sizes.allpairs_n, sizes.allpairs_d
  flops = 2.0 * n * n * d

  def one(dtype):
    x = normal(key, (n, d), dtype)
    xn = jax.block_until_ready(unit(x))
    jax_fn, jax_mem = compiled(jaxsim.cosine, x)
    raw_fn, raw_mem = compiled(lambda a: matmul_t(a, a, a.dtype), xn)
    # Recorded, not raised: a rare accelerator run still times what it can.
    err = rel_error(jax_fn(x)[:256], to_f64(raw_fn(xn)[:256]))
    agreement = {"rel_error": err, "passed": bool(err <= tolerance(dtype, backend))}
    t = time_all({"jaxsim.cosine": lambda: jax_fn(x), "raw matmul": lambda: raw_fn(xn)}, sizes)
    rate = peak.get(dtype) if peak else None
    rows = []
    for name, mem in (("jaxsim.cosine", jax_mem), ("raw matmul", raw_mem)):
      tflops = flops / t[name] / 1e12
      rows.append({"candidate": name, "dtype": dtype, "n": n, "d": d, "seconds": t[name],
                   "tflops": tflops, "vs_raw": t["raw matmul"] / t[name],
                   "fraction_of_peak": None if rate is None else tflops / rate,
                   "temp_bytes": None if mem is None else mem["temp_bytes"]})
    return rows, agreement

  return {**per_dtype(sizes.dtypes, one), "flops": flops}


def topk(sizes: Sizes, backend: str, key, memory) -> dict[str, Any]:
  """Streamed top-k against the raw matmul and the dense matmul + `lax.top_k`."""
  q, n, d, k = sizes.topk_q, sizes.topk_n, sizes.topk_d, sizes.topk_k
  flops = 2.0 * q * n * d
  kq, kc = jax.random.split(key)
  notes = []

  def one(dtype):
    queries, corpus = normal(kq, (q, d), dtype), normal(kc, (n, d), dtype)
    qn, cn = jax.block_until_ready((unit(queries), unit(corpus)))
    cands, mems = {}, {}
    fn, mems["jaxsim.topk"] = compiled(lambda a, b: jaxsim.topk(a, b, k), queries, corpus)
    cands["jaxsim.topk"] = lambda fn=fn: fn(queries, corpus)
    if backend == "tpu":
      fn, mems["jaxsim.topk approx"] = compiled(
          lambda a, b: jaxsim.topk(a, b, k, approx=True), queries, corpus)
      cands["jaxsim.topk approx"] = lambda fn=fn: fn(queries, corpus)
    fn, mems["raw matmul"] = compiled(lambda a, b: matmul_t(a, b, a.dtype), qn, cn)
    cands["raw matmul"] = lambda fn=fn: fn(qn, cn)
    dense_bytes = q * n * 4
    if memory is None or dense_bytes * 3 < memory:
      fn, mems["dense matmul + lax.top_k"] = compiled(
          lambda a, b: lax.top_k(matmul_t(a, b, jnp.float32), k), qn, cn)
      cands["dense matmul + lax.top_k"] = lambda fn=fn: fn(qn, cn)
    else:
      notes.append(f"{dtype}: dense baseline skipped, {dense_bytes / 2**30:.1f} GiB of scores")
    got_scores, got_idx = cands["jaxsim.topk"]()
    agreement = {}
    if "dense matmul + lax.top_k" in cands:
      want_scores, want_idx = cands["dense matmul + lax.top_k"]()
      # Near-ties may swap under rounding: 99% of the indices must agree.
      agree = float(jnp.mean(jnp.any(got_idx[:, :, None] == want_idx[:, None, :], axis=-1)))
      err = rel_error(got_scores, to_f64(want_scores))
      agreement = {"index_agreement": agree, "rel_error": err,
                   "passed": bool(agree >= 0.99 and err <= tolerance(dtype, backend))}
    t = time_all(cands, sizes)
    rows = []
    for name in cands:
      mem = mems[name]
      rows.append({"candidate": name, "dtype": dtype, "q": q, "n": n, "d": d, "k": k,
                   "seconds": t[name], "tflops": flops / t[name] / 1e12,
                   "fraction_of_raw": t["raw matmul"] / t[name],
                   "temp_bytes": None if mem is None else mem["temp_bytes"]})
    return rows, agreement

  return {**per_dtype(sizes.dtypes, one), "flops": flops, "notes": notes}


def attention(sizes: Sizes, backend: str, key) -> dict[str, Any]:
  """Every logit metric, dense and blocked, against jax.nn's XLA (and cuDNN) attention."""
  b, t, heads, h = sizes.attention
  dtype = sizes.attention_dtype
  kq, kk, kv, kg = jax.random.split(key, 4)
  q, k, v = (normal(kk_, (b, t, heads, h), dtype) for kk_ in (kq, kk, kv))
  ct = normal(kg, (b, t, heads, h), jnp.float32)
  flops = 4.0 * b * heads * t * t * h  # two matmuls of 2 BNTSH each
  forms: dict[str, Callable] = {}
  for metric in sizes.attention_metrics:
    forms[f"jaxsim {metric} dense"] = functools.partial(jaxsim.attention,
                                                        metric=metric)
    forms[f"jaxsim {metric} blocked"] = functools.partial(
        jaxsim.attention, metric=metric, block_size=sizes.attention_block)
    if backend == "gpu":
      forms[f"jaxsim {metric} cudnn"] = functools.partial(
          jaxsim.attention, metric=metric, implementation="cudnn")
  forms["jax.nn xla scaled_dot"] = functools.partial(jax.nn.dot_product_attention,
                                                     implementation="xla")
  if backend == "gpu":
    forms["jax.nn cudnn scaled_dot"] = functools.partial(jax.nn.dot_product_attention,
                                                         implementation="cudnn")
  rows, errors, outputs = [], {}, {}
  fwd, bwd = {}, {}
  for name, form in forms.items():
    try:
      f_exe, f_mem = compiled(lambda q, k, v, form=form: form(q, k, v), q, k, v)

      def loss(q, k, v, form=form):
        return jnp.sum(form(q, k, v).astype(jnp.float32) * ct)

      g_exe, g_mem = compiled(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v)
      outputs[name] = jax.block_until_ready(f_exe(q, k, v))
      # Run the backward pass once here too: out of memory or a kernel refusing a
      # shape drops this form only, not the whole timing table.
      jax.block_until_ready(g_exe(q, k, v))
      fwd[name], bwd[name] = (f_exe, f_mem), (g_exe, g_mem)
    except Exception as e:  # e.g. cuDNN refusing a shape: record it, time the others.
      errors[name] = f"{type(e).__name__}: {e}"[:500]
  # Every scaled-dot form must give jax.nn's result; cosine and dot dense == blocked.
  ref_name = "jax.nn xla scaled_dot"
  tol = tolerance(dtype, backend)
  checks = {}
  for name, out in outputs.items():
    metric = name.split()[1] if name.startswith("jaxsim") else "scaled_dot"
    base = ref_name if metric == "scaled_dot" else f"jaxsim {metric} dense"
    if base in outputs and base != name:
      checks[name] = rel_error(out, to_f64(outputs[base]))
  for label, table, mult in (("forward", fwd, 1.0), ("forward+backward", bwd, 3.0)):
    t_all = time_all({name: (lambda exe=exe: exe(q, k, v)) for name, (exe, _) in table.items()},
                     sizes)
    base = next((b for b in ("jax.nn cudnn scaled_dot", ref_name) if b in t_all), None)
    for name, seconds in t_all.items():
      mem = table[name][1]
      rows.append({"candidate": name, "pass": label, "dtype": dtype, "B": b, "T": t, "S": t,
                   "N": heads, "H": h, "seconds": seconds,
                   "tflops": mult * flops / seconds / 1e12,
                   "vs_baseline": None if base is None else seconds / t_all[base],
                   "baseline": base,
                   "temp_bytes": None if mem is None else mem["temp_bytes"]})
  return {"rows": rows, "errors": errors,
          "agreement": {n: {"rel_error": e, "passed": bool(e <= tol)} for n, e in checks.items()},
          "agreement_passed": all(e <= tol for e in checks.values()), "flops_forward": flops,
          "flops_convention": "forward 4 B N T S H; forward+backward 3x that"}


# ---------------------------------------------------------------------------------------
# Checks, tables, JSON.


def checks(results: dict[str, Any], backend: str) -> list[dict[str, Any]]:
  """Correctness and agreement (on every backend), then the issue's targets against the
  measured ratios: `passed` None where a target does not apply (CPU) or was not
  measured."""
  sections = results["sections"]
  on_accel = backend in ("gpu", "tpu")
  out = []
  for name, s in sections.items():
    if name == "correctness" and s.get("status") == "ok":
      out.append({"check": "correctness: every function within tolerance",
                  "value": sum(r["passed"] for r in s["rows"]) / max(len(s["rows"]), 1),
                  "target": "1.0 (share passed)", "passed": bool(s["passed"])})
    elif "agreement_passed" in s:
      out.append({"check": f"{name}: candidates agree before timing",
                  "value": None, "target": "all", "passed": bool(s["agreement_passed"])})

  def rows(section):
    s = sections.get(section, {})
    return s.get("rows", []) if s.get("status") == "ok" else []

  frac = [r["fraction_of_peak"] for r in rows("allpairs")
          if r["candidate"] == "jaxsim.cosine" and r["dtype"] == "bfloat16"]
  value = frac[0] if frac else None
  target = TARGETS["allpairs_bf16_fraction_of_peak"]
  out.append({"check": "all-pairs bf16 cosine, fraction of peak", "value": value,
              "target": f">= {target}",
              "passed": None if value is None or not on_accel else value >= target})
  target = TARGETS["topk_fraction_of_raw_matmul"]
  for r in rows("topk"):
    if r["candidate"] == "jaxsim.topk":
      value = r["fraction_of_raw"]
      out.append({"check": f"top-k {r['dtype']}, fraction of the raw matmul rate",
                  "value": value, "target": f">= {target}",
                  "passed": value >= target if on_accel else None})
  target = TARGETS["blocked_cosine_over_cudnn_scaled_dot"]
  for r in rows("attention"):
    if r["candidate"] == "jaxsim cosine blocked":
      if r["vs_baseline"] is None:
        continue
      applies = on_accel and r["baseline"] == "jax.nn cudnn scaled_dot"
      out.append({"check": f"blocked cosine attention ({r['pass']}) / {r['baseline']}",
                  "value": r["vs_baseline"], "target": f"<= {target} (vs cudnn)",
                  "passed": r["vs_baseline"] <= target if applies else None})
  return out


def _table(section: str, data: dict[str, Any]) -> str:
  if data.get("status") != "ok":
    return f"{section}: {data.get('status')} {data.get('error', '')}"
  columns = {
      "correctness": ["function", "dtype", "rel_error", "tolerance", "passed"],
      "allpairs": ["candidate", "dtype", "n", "d", "seconds", "tflops", "vs_raw",
                   "fraction_of_peak", "temp_bytes"],
      "topk": ["candidate", "dtype", "q", "n", "d", "seconds", "tflops", "fraction_of_raw",
               "temp_bytes"],
      "attention": ["candidate", "pass", "dtype", "seconds", "tflops", "vs_baseline",
                    "temp_bytes"],
  }[section]
  lines = [f"{section} ({data['seconds']:.0f} s)", harness.format_table(data["rows"], columns)]
  lines += [f"note: {note}" for note in data.get("notes", [])]
  lines += [f"failed: {name}: {err}" for name, err in data.get("errors", {}).items()]
  lines += [f"disagrees: {name}: {a}" for name, a in data.get("agreement", {}).items()
            if a and not a["passed"]]
  return "\n".join(lines)


def run_section(name: str, fn: Callable[[], dict[str, Any]], deadline: float) -> dict[str, Any]:
  """Runs one section, turning an exception or an exhausted budget into a status."""
  t0 = time.perf_counter()
  if t0 > deadline:
    return {"status": "skipped", "error": "time budget spent", "seconds": 0.0, "rows": []}
  try:
    data = fn()
    data["status"] = "ok"
  except Exception as e:  # Report it and go on: the other sections still run.
    data = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc()[-4000:], "rows": []}
  data["seconds"] = time.perf_counter() - t0
  return data


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="results", help="folder for accelerator.json")
  p.add_argument("--quick", action="store_true",
                 help="smaller sizes: about 3 minutes on a 2-core CPU")
  p.add_argument("--tiny", action="store_true", help="tiny sizes, for the test suite")
  p.add_argument("--only", default=",".join(SECTIONS),
                 help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
  p.add_argument("--budget-s", type=float, default=None,
                 help="skip the sections that would start after this many seconds "
                      f"(default: {ACCELERATOR_BUDGET_S:.0f} for a full run on GPU/TPU, "
                      "else none)")
  p.add_argument("--seed", type=int, default=0)
  return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parser().parse_args(argv)
  only = [s.strip() for s in args.only.split(",") if s.strip()]
  unknown = set(only) - set(SECTIONS)
  if unknown:
    raise SystemExit(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
  start = time.perf_counter()
  backend = jax.default_backend()
  device = jax.devices()[0]
  memory = device_memory()
  mode = "tiny" if args.tiny else "quick" if args.quick else "full"
  budget = args.budget_s
  if budget is None and mode == "full" and backend in ("gpu", "tpu"):
    budget = ACCELERATOR_BUDGET_S
  deadline = math.inf if budget is None else start + budget
  sizes = plan(backend, memory, mode)
  peak = peak_tflops(device.device_kind)
  env = harness.environment()
  results: dict[str, Any] = {
      "mode": mode, "backend": backend, "device_kind": device.device_kind,
      "device_count": jax.device_count(), "device_memory_bytes": memory,
      "versions": env["versions"], "peak_tflops": peak, "sizes": dataclasses.asdict(sizes),
      "defaults": dataclasses.asdict(defaults.for_backend(backend)), "budget_s": budget,
      "sections": {},
      "checks": [],
  }
  payload = {"experiment": "accelerator", "argv": sys.argv if argv is None else argv,
             "environment": env, "results": results}
  out_dir = Path(args.out)
  print(f"backend={backend} device={device.device_kind} memory="
        f"{'n/a' if memory is None else f'{memory / 2**30:.1f} GiB'} mode={mode}", flush=True)
  key = jax.random.key(args.seed)
  runs = {
      "correctness": lambda: correctness(sizes, backend, key),
      "allpairs": lambda: allpairs(sizes, backend, key, peak),
      "topk": lambda: topk(sizes, backend, key, memory),
      "attention": lambda: attention(sizes, backend, key),
  }
  for name in SECTIONS:
    if name not in only:
      continue
    print(f"[{name}] started at {time.perf_counter() - start:.0f} s", flush=True)
    results["sections"][name] = data = run_section(name, runs[name], deadline)
    results["checks"] = checks(results, backend)
    results["total_seconds"] = time.perf_counter() - start
    results["load_average_end"] = harness.load_average()
    harness.write_json_atomic(out_dir / "accelerator.json", payload)
    print("\n" + _table(name, data), flush=True)
  print("\nchecks")
  print(harness.format_table(results["checks"], ["check", "value", "target", "passed"]))
  print(f"\n{out_dir / 'accelerator.json'} ({results['total_seconds']:.0f} s)")
  return payload


if __name__ == "__main__":
  main()
