"""The small harness every experiment shares: timing, environment, results, plots.

Timing follows one rule set so numbers from different scripts compare:
- every candidate is warmed up first (compilation and caches out of the way);
- each sample times enough back-to-back calls to last at least `min_sample_s`, and
  waits for the result (`jax.block_until_ready` on JAX outputs);
- candidates are timed side by side, round-robin, so machine noise hits all of them
  alike (each round starts at the next candidate, so none always follows the same
  one), and the median of the samples is reported with the spread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = [
    "Timing",
    "compare",
    "compiled_memory",
    "environment",
    "format_table",
    "parser",
    "progress",
    "save_figure",
    "set_cpu_dispatch",
    "time_fn",
    "write_json",
]


def _ready(out):
  return jax.block_until_ready(out)


class Timing(dict):
  """Seconds per call: `median`, `min`, `q1`, `q3`, `samples`, `number` (calls/sample)."""

  @property
  def median(self) -> float:
    return self["median"]


def _calls_per_sample(fn: Callable[[], Any], min_sample_s: float) -> int:
  number = 1
  while True:
    t0 = time.perf_counter()
    for _ in range(number):
      _ready(fn())
    elapsed = time.perf_counter() - t0
    if elapsed >= min_sample_s or number >= 1 << 20:
      return number
    number = max(number * 2, int(number * min_sample_s / max(elapsed, 1e-9) * 1.2))


def _sample(fn: Callable[[], Any], number: int) -> float:
  t0 = time.perf_counter()
  for _ in range(number):
    _ready(fn())
  return (time.perf_counter() - t0) / number


def _summary(samples: list[float], number: int) -> Timing:
  q = np.percentile(samples, [25, 75])
  return Timing(median=statistics.median(samples), min=min(samples), q1=float(q[0]),
                q3=float(q[1]), samples=len(samples), number=number)


def compare(candidates: Mapping[str, Callable[[], Any]], *, repeats: int = 7,
            warmup: int = 2, min_sample_s: float = 0.05) -> dict[str, Timing]:
  """Times zero-argument callables side by side, round-robin.

  Args:
    candidates: name -> callable returning its result (JAX, numpy or torch).
    repeats: samples per candidate; the median is reported.
    warmup: untimed calls per candidate before timing.
    min_sample_s: each sample loops calls until it lasts at least this long, so
      microsecond calls are not lost in timer resolution.

  Returns:
    name -> `Timing` in seconds per call.
  """
  numbers = {}
  for name, fn in candidates.items():
    for _ in range(warmup):
      _ready(fn())
    numbers[name] = _calls_per_sample(fn, min_sample_s)
  samples: dict[str, list[float]] = {name: [] for name in candidates}
  names = list(candidates)
  for r in range(repeats):
    # Each round starts one candidate later: whatever runs right after another
    # library's call can pay for its thread pool still spinning, so no candidate may
    # always hold that slot.
    for name in names[r % len(names):] + names[:r % len(names)]:
      samples[name].append(_sample(candidates[name], numbers[name]))
  return {name: _summary(s, numbers[name]) for name, s in samples.items()}


def time_fn(fn: Callable[[], Any], **kwargs) -> Timing:
  """Times one callable; see `compare` for the options."""
  return compare({"fn": fn}, **kwargs)["fn"]


def compiled_memory(jitted: Callable, *args, **kwargs) -> dict[str, int]:
  """Bytes XLA plans for a jitted function: temporaries, arguments, outputs.

  `temp_bytes` is the number the memory claims rest on: the scratch the compiled
  program needs beyond its inputs and outputs.
  """
  stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
  if stats is None:  # Some backends do not report.
    return {}
  return {
      "temp_bytes": int(stats.temp_size_in_bytes),
      "argument_bytes": int(stats.argument_size_in_bytes),
      "output_bytes": int(stats.output_size_in_bytes),
      "generated_code_bytes": int(stats.generated_code_size_in_bytes),
  }


def _version(dist: str) -> str | None:
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return None


def environment() -> dict[str, Any]:
  """What a reader needs to reproduce a number: versions, backend, devices, CPUs."""
  devices = jax.devices()
  packages = ("jax", "jaxlib", "numpy", "scipy", "scikit-learn", "torch", "faiss-cpu",
              "optax", "chex", "jaxsim")
  env = {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "machine": platform.machine(),
      "processor": _cpu_model(),
      "cpu_flags": _cpu_flags(),
      "cpu_count": os.cpu_count(),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "versions": {p: v for p in packages if (v := _version(p))},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "thread_env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
      "cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
  }
  try:
    env["cpu_affinity"] = len(os.sched_getaffinity(0))
  except AttributeError:
    pass
  return env


def set_cpu_dispatch(asynchronous: bool) -> None:
  """Chooses how the CPU backend runs programs; call before any JAX computation.

  JAX's default is asynchronous dispatch: a program runs on a worker thread and the
  caller waits for it, which on CPU costs tens of microseconds per call for small
  programs. `asynchronous=False` runs programs on the calling thread. The CPU client
  reads the flag once, when it is created, hence the check.
  """
  from jax._src import xla_bridge

  if xla_bridge._backends and asynchronous != jax.config.read("jax_cpu_enable_async_dispatch"):
    raise RuntimeError("set_cpu_dispatch must run before JAX creates its backends.")
  jax.config.update("jax_cpu_enable_async_dispatch", asynchronous)


# Vector units decide which matmul kernels each library gets, and so the ratios between
# them: two hosts that both report "Intel Xeon" can differ here.
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
# Settings that change how the libraries' worker threads behave (experiments/__init__.py).
_THREAD_ENV = ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
               "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


def _cpuinfo(key: str) -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(key):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def _cpu_model() -> str:
  return _cpuinfo("model name") or platform.processor()


def _cpu_flags() -> list[str] | None:
  flags = _cpuinfo("flags")
  return None if flags is None else [f for f in _CPU_FLAGS if f in flags.split()]


def write_json(out_dir: str | os.PathLike, name: str, results: Any) -> Path:
  """Writes `{"environment": ..., "results": ...}` to `out_dir/name.json`."""
  path = Path(out_dir) / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"experiment": name, "argv": sys.argv, "environment": environment(),
             "results": results}
  path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
  return path


def _jsonable(obj):
  if isinstance(obj, (np.generic, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"Not JSON serialisable: {type(obj).__name__}")


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> Path:
  path = Path(out_dir) / f"{name}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=130, bbox_inches="tight")
  import matplotlib.pyplot as plt

  plt.close(fig)
  return path


def progress(items: Iterable, desc: str) -> Iterable:
  """Yields `items`, printing `desc i/n` and elapsed time to stderr as it goes."""
  items = list(items)
  t0 = time.perf_counter()
  for i, item in enumerate(items, 1):
    print(f"[{desc}] {i}/{len(items)} {item}  ({time.perf_counter() - t0:.0f}s)",
          file=sys.stderr, flush=True)
    yield item


def format_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
  """A plain fixed-width text table."""
  if not rows:
    return ""
  columns = columns or list(rows[0])
  cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
  return "\n".join(lines)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def parser(description: str) -> argparse.ArgumentParser:
  """An argument parser with the options every experiment takes."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--out", default="results", help="folder for the JSON and PNG files")
  p.add_argument("--repeats", type=int, default=7, help="timed samples per candidate")
  p.add_argument("--quick", action="store_true", help="small sizes, about a minute on 2 CPUs")
  p.add_argument("--seed", type=int, default=0)
  return p
