"""The one runner every experiment uses: declare a benchmark as data, `main()` does the rest.

A benchmark file declares what to measure; the runner owns the loop, the correctness
check, the timing, the table, the plot, the JSON and the command line. A whole
benchmark file:

    import jax.numpy as jnp
    import numpy as np
    from sklearn.metrics.pairwise import cosine_similarity

    import jaxsim
    from experiments import harness
    from experiments.harness import Benchmark, Candidate, Grid, Target

    def setup(point, ctx):                      # inputs for one grid point, built untimed
      x = ctx.rng.standard_normal((point["n"], point["d"]), dtype=np.float32)
      return harness.Case(x=x, xj=jnp.asarray(x))

    def reference(case):                        # float64, what every candidate must match
      u = case.x / np.linalg.norm(case.x.astype(np.float64), axis=1, keepdims=True)
      return u @ u.T

    BENCHMARK = Benchmark(
        name="cosine_small",
        title="All-pairs cosine, float32",
        grid=Grid(quick={"n": [256, 1024], "d": [128]},
                  full={"n": [256, 1024, 4096], "d": [128]}),
        setup=setup,
        candidates=[                            # adding a candidate is one line
            Candidate("jaxsim.cosine", lambda c: jaxsim.cosine(c.xj)),
            Candidate("sklearn", lambda c: cosine_similarity(c.x)),
        ],
        check=harness.close_to(reference), tolerance=1e-5,  # max abs error
        work=lambda p: 2 * p["n"] ** 2 * p["d"] / 1e9, rate_unit="GFLOP/s",
        baseline="sklearn",                     # the "x sklearn" column divides by it
        targets=[Target("jaxsim.cosine", "sklearn", at_least=1.2, where=lambda p: p["n"] >= 1024)],
    )

    if __name__ == "__main__":
      harness.main([BENCHMARK], name="cosine_small", description=__doc__)

`python -m experiments.cosine_small --quick --out results` then prints the comparison
table, a "Checks" section (results against the reference, targets with the measured
ratio, noise warnings), writes `results/cosine_small.json` and one PNG per benchmark.

Timing rules (the same for every experiment, so numbers compare):
- every candidate's result is checked before anything is timed; a candidate that fails
  its check is not timed, and the run exits non-zero;
- every candidate is warmed up first (compilation and caches out of the way);
- each sample times enough back-to-back calls to last at least `min_sample_s`, and
  waits for the result (`jax.block_until_ready`; torch CPU results are ready on return);
- before each sample the runner pauses `IDLE_S` (untimed), so another library's
  spinning worker threads are idle when the next candidate starts;
- candidates at one grid point are timed side by side, round-robin, so machine noise
  hits all of them alike (each round starts at the next candidate, so none always
  follows the same one); ratios come from those same samples, never across runs;
- the median is reported with the interquartile range; a row whose IQR exceeds
  `NOISY_SPREAD` of its median, or a point timed while the load average exceeded the
  core count, is flagged noisy in the table, the checks and the JSON.

JSON layout (`SCHEMA`), one file per run, `OUT/NAME.json` (`NAME_sync.json` with
`--sync-dispatch`), written atomically:

    {"schema", "experiment", "command", "argv", "quick", "options",
     "environment": {versions, CPU, vector units, devices, git commit, thread pools
                     (threadpoolctl), load average at start and end, ...},
     "benchmarks": {name: {"title", "x", "baseline", "rate_unit", "grid", "rows": [ROW...],
                           "targets": [TARGET...], "analysis": {...}}},
     "studies": {name: {...}},        # untimed results (statistics, training runs)
     "checks_passed": bool, "noisy": bool, "warnings": [str]}

ROW, one per (grid point, candidate): the point's keys (e.g. "n", "d"), then
`candidate`, `status` ("ok", "check failed", "skipped" where `when` excludes the point,
"unavailable" with a `reason` where an optional library is missing), `median_s`, `q1_s`, `q3_s`,
`min_s`, `samples_s` (every sample), `calls_per_sample`, `spread` ((q3 - q1) / median),
`noisy`, `load`, `rate` (work / median, in `rate_unit`, or null), `speedup` (baseline
median / this median, or null), `error` (the check's error, or null), `peak_bytes`,
`peak_how`.

TARGET: `candidate`, `baseline`, `measure` ("speed": baseline time / candidate time,
or "overhead": candidate time / baseline time), `goal`, and per judged point its keys,
`value`, `met`, `noisy`; plus `met` over all points.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np

__all__ = [
    "Benchmark",
    "Candidate",
    "Case",
    "Context",
    "Grid",
    "Study",
    "Target",
    "close_to",
    "compare",
    "compiled_memory",
    "environment",
    "format_table",
    "main",
    "progress",
    "run",
    "save_figure",
    "set_cpu_dispatch",
    "time_fn",
    "to_numpy",
    "torch_peak_bytes",
    "traced_peak_bytes",
    "xla_peak_bytes",
]

SCHEMA = "jaxsim-experiments/1"
# A row whose interquartile range exceeds this share of its median is flagged noisy.
NOISY_SPREAD = 0.25
QUICK_TIMING = {"repeats": 5, "min_sample_s": 0.02}
FULL_TIMING = {"repeats": 7, "min_sample_s": 0.05}

Case = SimpleNamespace  # the inputs `setup` builds for one grid point: any attributes


# --------------------------------------------------------------------------- declarations


@dataclasses.dataclass(frozen=True)
class Grid:
  """The sizes a benchmark runs at: axis name -> values, the product of all axes.

  `quick` should finish in about a minute on a 2-core CPU; `full` is what the README's
  figures come from. `--grid AXIS=V1,V2` on the command line replaces one axis.
  """

  quick: Mapping[str, Sequence[Any]]
  full: Mapping[str, Sequence[Any]]

  def points(self, quick: bool, overrides: Mapping[str, list] | None = None) -> list[dict]:
    axes = dict(self.quick if quick else self.full)
    for key, values in (overrides or {}).items():
      if key in axes:
        axes[key] = values
    points = [{}]
    for key, values in axes.items():
      points = [{**p, key: v} for p in points for v in values]
    return points


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One implementation to time.

  Attributes:
    name: the label in tables, plots and JSON.
    call: `call(case)` computes the result from the point's inputs (or from what
      `prepare` returned); the harness times `lambda: call(case)`.
    prepare: optional `prepare(case)`, run once per point outside the timing (build an
      index, fit a model, convert inputs); its result is passed to `call`.
    when: optional `when(point) -> bool`; the candidate is skipped where it is False.
    output: turns the result into what the check compares (default `to_numpy`).
    memory: how to measure peak bytes when the benchmark measures memory: a function
      `memory(case) -> bytes` (see `xla_peak_bytes`), `"tracemalloc"` (numpy and
      Python allocations of one call) or `"torch"` (torch's profiler over one call).
    style: matplotlib keywords for this candidate's line (colour, marker) if wanted.
  """

  name: str
  call: Callable[[Any], Any]
  prepare: Callable[[Any], Any] | None = None
  when: Callable[[dict], bool] | None = None
  output: Callable[[Any], Any] | None = None
  memory: Callable[[Any], int | None] | str | None = None
  style: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Target:
  """A goal judged on ratios measured side by side in one run.

  `at_least`: baseline time / candidate time must reach it (a speed ratio, > 1 means
  the candidate is faster). `at_most`: candidate time / baseline time must stay under
  it (an overhead). Exactly one of the two. `where(point)` picks the judged points.
  """

  candidate: str
  baseline: str
  at_least: float | None = None
  at_most: float | None = None
  where: Callable[[dict], bool] | None = None
  label: str | None = None

  def __post_init__(self):
    if (self.at_least is None) == (self.at_most is None):
      raise ValueError("Target needs exactly one of at_least= and at_most=.")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A timed comparison: a grid of sizes, candidates, a check, a rate and targets.

  Attributes:
    name: file stem of its plot and key in the JSON.
    title: one line naming what is computed (shown above its table).
    grid: `Grid` of sizes.
    setup: `setup(point, ctx) -> case`, the inputs for one point (untimed).
    candidates: `Candidate`s, in table order; the first is the subject of the plot.
    check: `check(case, outputs) -> {name: error}`, outputs as each candidate's
      `output` gives them; every error must be `<= tolerance`. `close_to` builds one.
    tolerance: the largest error that passes.
    work: `work(point)`, the amount of work per call in `rate_unit` seconds (e.g.
      GFLOP), for a rate column; None for no rate column.
    rate_unit: the rate column's label, e.g. "GFLOP/s" or "queries/s".
    baseline: candidate the "speed-up" column divides by (default: none).
    targets: `Target`s judged in the checks section.
    memory: measure each candidate's peak memory (see `Candidate.memory`).
    x: grid axis for the plot's x axis (default: the first axis with several values).
    analyse: optional `analyse(rows) -> dict` of derived results (growth exponents);
      a `"text"` entry, if any, is printed after the table.
    timing: overrides for `compare` (repeats, warmup, min_sample_s) at this benchmark.
    note: one line printed under the title (how to read the table).
  """

  name: str
  title: str
  grid: Grid
  setup: Callable[[dict, Context], Any]
  candidates: Sequence[Candidate]
  check: Callable[[Any, dict], dict] | None = None
  tolerance: float = 1e-5
  work: Callable[[dict], float] | None = None
  rate_unit: str | None = None
  baseline: str | None = None
  targets: Sequence[Target] = ()
  memory: bool = False
  x: str | None = None
  analyse: Callable[[list[dict]], dict] | None = None
  timing: Mapping[str, Any] | None = None
  note: str | None = None


@dataclasses.dataclass(frozen=True)
class Study:
  """An untimed result (statistics of a table, a training run): computed, printed, plotted.

  Attributes:
    name: key in the JSON.
    title: heading of its printed summary.
    run: `run(ctx) -> dict`, JSON-serialisable.
    summary: `summary(result) -> str`, printed under the title.
    plot: optional `plot(result, out_dir) -> list of paths`.
    passed: optional `passed(result) -> bool`; False fails the run (a failed check).
  """

  name: str
  title: str
  run: Callable[[Context], dict]
  summary: Callable[[dict], str] | None = None
  plot: Callable[[dict, Path], Sequence[Path]] | None = None
  passed: Callable[[dict], bool] | None = None


@dataclasses.dataclass
class Context:
  """What `setup` and `Study.run` get: the parsed options, the mode and a seeded RNG."""

  args: argparse.Namespace
  quick: bool
  rng: np.random.Generator
  seed: int
  out: Path


# --------------------------------------------------------------------------- timing


def _ready(out):
  return jax.block_until_ready(out)


class Timing(dict):
  """Seconds per call: `median`, `min`, `q1`, `q3`, `samples`, `number`, `all`."""

  @property
  def median(self) -> float:
    return self["median"]


# Long enough for libgomp's and OpenBLAS's spinning workers to go to sleep (GNU OpenMP
# spins for well under this by default; Intel's KMP_BLOCKTIME is 200 ms).
IDLE_S = 0.25


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
                q3=float(q[1]), samples=len(samples), number=number, all=list(samples))


def compare(candidates: Mapping[str, Callable[[], Any]], *, repeats: int = 7,
            warmup: int = 2, min_sample_s: float = 0.05, idle_s: float = IDLE_S,
            on_sample: Callable[[], None] | None = None) -> dict[str, Timing]:
  """Times zero-argument callables side by side, round-robin.

  Args:
    candidates: name -> callable returning its result (JAX, numpy or torch).
    repeats: samples per candidate; the median is reported.
    warmup: untimed calls per candidate before timing.
    min_sample_s: each sample loops calls until it lasts at least this long, so
      microsecond calls are not lost in timer resolution.
    idle_s: untimed pause before each sample, so that the worker threads of the
      previous candidate's library (OpenMP, BLAS, torch) stop spinning and do not
      compete with the one being timed.
    on_sample: called after every sample (progress bars).

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
      if idle_s > 0 and len(names) > 1:
        time.sleep(idle_s)
      samples[name].append(_sample(candidates[name], numbers[name]))
      if on_sample is not None:
        on_sample()
  return {name: _summary(s, numbers[name]) for name, s in samples.items()}


def time_fn(fn: Callable[[], Any], **kwargs) -> Timing:
  """Times one callable; see `compare` for the options."""
  return compare({"fn": fn}, **kwargs)["fn"]


# --------------------------------------------------------------------------- checks


def to_numpy(result) -> Any:
  """A JAX, torch or numpy result (or a tuple of them) as numpy arrays."""
  if isinstance(result, tuple):
    return tuple(to_numpy(r) for r in result)
  if hasattr(result, "detach"):
    result = result.detach().cpu().numpy()
  return np.asarray(result)


def close_to(reference: Callable[[Any], np.ndarray], *, rtol: float = 0.0,
             rows: Callable[[Any], np.ndarray] | None = None) -> Callable[[Any, dict], dict]:
  """A check: each output's max abs error against `reference(case)`, scaled.

  The error is `max |out - ref| / (1 + rtol * max |ref|)`, so it reads as an absolute
  error for results of order 1. `rows(case)`, if given, picks the rows compared (for
  large outputs, where the reference is computed for those rows only; `reference`
  then returns just those rows).
  """

  def check(case, outputs: dict) -> dict:
    ref = np.asarray(reference(case), np.float64)
    idx = None if rows is None else rows(case)
    errors = {}
    for name, out in outputs.items():
      out = np.asarray(out)
      if idx is not None:
        out = out[idx]
      if out.shape != ref.shape:
        errors[name] = float("inf")
        continue
      diff = np.abs(out.astype(np.float64) - ref)
      errors[name] = float(np.max(diff, initial=0.0) / (1.0 + rtol * np.max(np.abs(ref),
                                                                             initial=0.0)))
    return errors

  return check


# --------------------------------------------------------------------------- memory


def compiled_memory(jitted: Callable, *args, **kwargs) -> dict[str, int]:
  """Bytes XLA plans for a jitted function: temporaries, arguments, outputs."""
  stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
  if stats is None:  # Some backends do not report.
    return {}
  return {
      "temp_bytes": int(stats.temp_size_in_bytes),
      "argument_bytes": int(stats.argument_size_in_bytes),
      "output_bytes": int(stats.output_size_in_bytes),
      "generated_code_bytes": int(stats.generated_code_size_in_bytes),
  }


def xla_peak_bytes(jitted: Callable, *args) -> int | None:
  """Bytes beyond the inputs that XLA plans for one call: temporaries plus outputs.

  Arguments may be `jax.ShapeDtypeStruct`s: XLA plans the buffers without running,
  which is how sizes too large to run are still reported.
  """
  m = compiled_memory(jitted, *args)
  return m["temp_bytes"] + m["output_bytes"] if m else None


@contextlib.contextmanager
def _quiet_stderr():
  # torch's profiler prints start/stop lines straight to fd 2.
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def torch_peak_bytes(fn: Callable[[], Any]) -> int:
  """Peak of torch's own allocations during one call, from the profiler's memory events."""
  from torch.profiler import ProfilerActivity, profile

  with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    fn()
  events = sorted(prof.events(), key=lambda e: e.time_range.start)
  current = peak = 0
  for e in events:
    current += e.self_cpu_memory_usage
    peak = max(peak, current)
  return int(peak)


def traced_peak_bytes(fn: Callable[[], Any]) -> int:
  """Peak of Python-visible allocations (numpy buffers included) during one call."""
  tracemalloc.start()
  try:
    fn()
    return int(tracemalloc.get_traced_memory()[1])
  finally:
    tracemalloc.stop()


def _peak(cand: Candidate, case, fn) -> tuple[int | None, str | None]:
  if cand.memory is None:
    return None, None
  if cand.memory == "tracemalloc":
    return traced_peak_bytes(fn), "tracemalloc"
  if cand.memory == "torch":
    return torch_peak_bytes(fn), "torch.profiler"
  return cand.memory(case), "xla temp+output"


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return None


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


def _git() -> dict[str, Any] | None:
  root = Path(__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
    # Only the code that runs counts: an edited README does not change a timing.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            "jaxsim", "experiments"], cwd=root, capture_output=True, text=True,
                           check=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": bool(dirty.strip())}


def _threadpools() -> list[dict[str, Any]]:
  """BLAS and OpenMP pools loaded in this process and their thread counts."""
  try:
    from threadpoolctl import threadpool_info
  except ImportError:
    return []
  keep = ("user_api", "internal_api", "num_threads", "version", "threading_layer")
  return [{k: info.get(k) for k in keep if info.get(k) is not None}
          for info in threadpool_info()]


def cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def environment() -> dict[str, Any]:
  """What a reader needs to reproduce a number: versions, backend, devices, CPUs, load."""
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
      "cpu_affinity": cpu_count(),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "versions": {p: v for p in packages if (v := _version(p))},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "thread_env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
      "threadpools": _threadpools(),
      "cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
      "git": _git(),
      "load_average": load_average(),
  }
  if "torch" in sys.modules:
    env["torch_threads"] = sys.modules["torch"].get_num_threads()
  return env


def machine_line(env: Mapping[str, Any]) -> str:
  """One line naming the hardware, for plot titles and the README."""
  if env["backend"] == "cpu":
    return f"CPU: {env['processor']}, {env.get('cpu_affinity', env['cpu_count'])} cores"
  return f"{env['backend'].upper()}: {env['device_kind']} x{env['device_count']}"


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


# --------------------------------------------------------------------------- output


def _jsonable(obj):
  if isinstance(obj, (np.generic, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, Path):
    return str(obj)
  raise TypeError(f"Not JSON serialisable: {type(obj).__name__}")


def _finite(obj):
  """Non-finite floats as the strings "nan", "inf", "-inf": JSON has no literal for them."""
  if isinstance(obj, float) and not np.isfinite(obj):
    return str(obj)
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def write_json_atomic(path: Path, payload: Any) -> Path:
  """Writes JSON through a temporary file and a rename: never a half-written file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  text = json.dumps(_finite(json.loads(json.dumps(payload, default=_jsonable))), indent=1,
                    allow_nan=False)
  tmp.write_text(text + "\n")
  os.replace(tmp, path)
  return path


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> Path:
  path = Path(out_dir) / f"{name}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp.png")
  fig.savefig(tmp, dpi=130, bbox_inches="tight")
  os.replace(tmp, path)
  import matplotlib.pyplot as plt

  plt.close(fig)
  return path


def format_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
  """A plain fixed-width text table."""
  if not rows:
    return ""
  columns = columns or list(dict.fromkeys(k for r in rows for k in r))
  cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]
  return "\n".join(lines)


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def fmt_seconds(s: float | None) -> str:
  if s is None:
    return "-"
  for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
    if s >= scale:
      return f"{s / scale:.3g} {unit}"
  return f"{s * 1e9:.3g} ns"


def fmt_bytes(b: int | None) -> str:
  if b is None:
    return "-"
  if b >= 2**30:
    return f"{b / 2**30:.3g} GiB"
  if b >= 2**20:
    return f"{b / 2**20:.3g} MiB"
  return f"{b / 2**10:.3g} KiB"


# --------------------------------------------------------------------------- the loop


def progress(items: Iterable, desc: str) -> Iterable:
  """Yields `items` with a progress bar and ETA on a terminal (tqdm)."""
  from tqdm.auto import tqdm

  return tqdm(list(items), desc=desc, disable=None, leave=False, file=sys.stderr)


def _progress_bar(total: int, desc: str):
  from tqdm.auto import tqdm

  # disable=None: a bar on a terminal, nothing in logs and captured test output.
  return tqdm(total=total, desc=desc, unit="sample", disable=None, leave=False, file=sys.stderr)


def _timing_options(bench: Benchmark, args) -> dict:
  opts = dict(QUICK_TIMING if args.quick else FULL_TIMING)
  opts["warmup"] = 2
  opts["idle_s"] = IDLE_S
  opts.update(bench.timing or {})
  if args.repeats is not None:
    opts["repeats"] = args.repeats
  if args.min_sample_s is not None:
    opts["min_sample_s"] = args.min_sample_s
  if args.idle_s is not None:
    opts["idle_s"] = args.idle_s
  return opts


def _selected(cands: Sequence[Candidate], patterns: list[str] | None) -> list[Candidate]:
  if not patterns:
    return list(cands)
  return [c for c in cands if any(p.lower() in c.name.lower() for p in patterns)]


def run(bench: Benchmark, ctx: Context) -> dict:
  """Checks, then times, every candidate at every grid point; returns the JSON section."""
  args = ctx.args
  points = bench.grid.points(ctx.quick, args.grid)
  cands = _selected(bench.candidates, args.candidates)
  opts = _timing_options(bench, args)
  rows: list[dict] = []
  total = len(points) * len(cands) * opts["repeats"]
  cores = cpu_count()
  with _progress_bar(total, bench.name) as bar:
    for point in points:
      case = bench.setup(point, ctx)
      active = [c for c in cands if c.when is None or c.when(point)]
      fns, outputs, unavailable = {}, {}, {}
      for c in active:
        # An optional library that is not installed (faiss, torch, scikit-learn) makes
        # its candidate unavailable, not the run fail; any other error is a real one.
        try:
          arg = case if c.prepare is None else c.prepare(case)
          fn = (lambda call=c.call, arg=arg: call(arg))
          out = fn()
        except ImportError as err:
          unavailable[c.name] = f"{type(err).__name__}: {err}"
          continue
        fns[c.name] = fn
        if bench.check is not None:
          outputs[c.name] = (c.output or to_numpy)(out)
        del out
      errors: dict[str, float] = {}
      if bench.check is not None and outputs:
        errors = bench.check(case, outputs)
      # A candidate the check did not score fails too: nothing is timed unchecked.
      failed = {n for n in outputs if not errors.get(n, float("nan")) <= bench.tolerance}
      outputs.clear()
      timed = {n: f for n, f in fns.items() if n not in failed}
      load = load_average()
      timings = compare(timed, on_sample=bar.update, **opts) if timed else {}
      load_end = load_average()
      busy = load is not None and max(load[0], load_end[0]) > cores
      base = timings.get(bench.baseline)
      for c in cands:
        row = {**point, "candidate": c.name}
        if c.name in unavailable:
          rows.append({**row, "status": "unavailable", "reason": unavailable[c.name]})
          bar.update(opts["repeats"])
          continue
        if c.name not in fns:
          rows.append({**row, "status": "skipped"})
          bar.update(opts["repeats"])
          continue
        row["error"] = errors.get(c.name)
        if c.name in failed:
          rows.append({**row, "status": "check failed"})
          bar.update(opts["repeats"])
          continue
        t = timings[c.name]
        spread = (t["q3"] - t["q1"]) / t.median
        row.update(status="ok", median_s=t.median, q1_s=t["q1"], q3_s=t["q3"], min_s=t["min"],
                   samples_s=t["all"], calls_per_sample=t["number"], spread=spread,
                   noisy=bool(spread > NOISY_SPREAD or busy),
                   load=None if load is None else max(load[0], load_end[0]),
                   rate=None if bench.work is None else bench.work(point) / t.median,
                   speedup=None if base is None else base.median / t.median)
        if bench.memory:
          row["peak_bytes"], row["peak_how"] = _peak(c, case, fns[c.name])
        rows.append(row)
      del case, fns
  return {"title": bench.title, "x": _x_axis(bench, points), "baseline": bench.baseline,
          "rate_unit": bench.rate_unit, "tolerance": bench.tolerance,
          "grid": points, "timing": opts, "rows": rows,
          "targets": [judge(t, rows) for t in bench.targets],
          "analysis": bench.analyse(rows) if bench.analyse else {}}


def _x_axis(bench: Benchmark, points: list[dict]) -> str | None:
  if bench.x is not None:
    return bench.x
  for key in points[0] if points else ():
    if len({p[key] for p in points}) > 1:
      return key
  return None


def _point_of(row: Mapping[str, Any], keys: Iterable[str]) -> tuple:
  return tuple(row.get(k) for k in keys)


def best_ratio(measure: str, cand: Mapping[str, Any], base: Mapping[str, Any]) -> float:
  """The ratio of the two fastest samples: least exposed to other load; shown, not judged."""
  return (base["min_s"] / cand["min_s"] if measure == "speed"
          else cand["min_s"] / base["min_s"])


def judge(target: Target, rows: list[dict]) -> dict:
  """A target's verdict at each judged point, from the rows of one run."""
  by = {}
  for r in rows:
    if r.get("status") == "ok":
      keys = [k for k in r if k not in _ROW_FIELDS]
      by.setdefault(_point_of(r, keys), {})[r["candidate"]] = (r, keys)
  measure = "speed" if target.at_least is not None else "overhead"
  goal = target.at_least if target.at_least is not None else target.at_most
  points = []
  for group in by.values():
    if target.candidate not in group or target.baseline not in group:
      continue
    (cand, keys), (base, _) = group[target.candidate], group[target.baseline]
    point = {k: cand[k] for k in keys}
    if target.where is not None and not target.where(point):
      continue
    value = (base["median_s"] / cand["median_s"] if measure == "speed"
             else cand["median_s"] / base["median_s"])
    met = value >= goal if measure == "speed" else value <= goal
    points.append({**point, "value": value, "met": bool(met),
                   "noisy": bool(cand["noisy"] or base["noisy"]),
                   "best": best_ratio(measure, cand, base)})
  return {"candidate": target.candidate, "baseline": target.baseline, "measure": measure,
          "goal": goal, "label": target.label, "points": points,
          "met": bool(points) and all(p["met"] for p in points)}


_ROW_FIELDS = frozenset({
    "candidate", "status", "median_s", "q1_s", "q3_s", "min_s", "samples_s",
    "calls_per_sample", "spread", "noisy", "load", "rate", "speedup", "error", "peak_bytes",
    "peak_how", "reason"})


# --------------------------------------------------------------------------- printing


def table_rows(section: Mapping[str, Any]) -> list[dict]:
  """The comparison table of one benchmark section, as printed."""
  out = []
  base = section["baseline"]
  varying = _varying_keys(section)
  for r in section["rows"]:
    point = {k: r[k] for k in r if k in varying}
    row = {**point, "candidate": r["candidate"]}
    if r["status"] != "ok":
      row["time"] = {"skipped": "skipped", "unavailable": "not installed"}.get(r["status"],
                                                                             "CHECK FAILED")
      out.append(row)
      continue
    row["time"] = fmt_seconds(r["median_s"])
    row["IQR"] = f"±{50 * r['spread']:.0f}%" + (" (noisy)" if r["noisy"] else "")
    if section["rate_unit"]:
      row[section["rate_unit"]] = f"{r['rate']:.4g}"
    if base:
      row[f"x {base}"] = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
    if "peak_bytes" in r:
      row["peak memory"] = fmt_bytes(r["peak_bytes"])
    out.append(row)
  return out


def _varying_keys(section: Mapping[str, Any]) -> list[str]:
  points = section["grid"]
  return [k for k in (points[0] if points else ()) if len({p[k] for p in points}) > 1]


def fixed_sizes(section: Mapping[str, Any]) -> str:
  """The grid axes that hold one value, as `"n=50, d=64"` (they are not table columns)."""
  points = section["grid"]
  varying = _varying_keys(section)
  return ", ".join(f"{k}={v}" for k, v in (points[0] if points else {}).items()
                   if k not in varying)


def describe_target(t: Mapping[str, Any]) -> str:
  """One line per target: what was measured, the goal, and whether it was met."""
  if t["measure"] == "speed":
    what = f"{t['candidate']} speed / {t['baseline']}"
    goal = f">= {t['goal']:g}x"
  else:
    what = f"{t['candidate']} time / {t['baseline']}"
    goal = f"<= {t['goal']:g}x"
  if t.get("label"):
    what = f"{t['label']}: {what}"
  if not t["points"]:
    return f"{what}: not measured in this run (goal {goal})"
  parts = []
  shown = [k for k in t["points"][0] if k not in ("value", "met", "noisy", "best")
           and len({p[k] for p in t["points"]}) > 1]
  for p in t["points"]:
    keys = ", ".join(f"{k}={p[k]}" for k in shown)
    # Under load the medians wait for the CPU; the fastest samples show the work itself.
    noisy = f" (noisy; fastest samples: {p['best']:.2f}x)" if p["noisy"] and "best" in p else (
        " (noisy)" if p["noisy"] else "")
    parts.append(f"{keys + ': ' if keys else ''}{p['value']:.2f}x{noisy}")
  verdict = "met" if t["met"] else "not met"
  return f"{what}, goal {goal}: {'; '.join(parts)} -> {verdict}"


def print_benchmark(section: Mapping[str, Any], note: str | None = None) -> None:
  fixed = fixed_sizes(section)
  print(f"\n{section['title']}" + (f" ({fixed})" if fixed else ""))
  if note:
    print(note)
  print(format_table(table_rows(section)))
  text = section.get("analysis", {}).get("text")
  if text:
    print(text)


def _checks_lines(payload: Mapping[str, Any]) -> list[str]:
  lines = []
  for name, sec in payload["benchmarks"].items():
    ok = [r for r in sec["rows"] if r["status"] == "ok"]
    bad = [r for r in sec["rows"] if r["status"] == "check failed"]
    errs = [r["error"] for r in ok if r.get("error") is not None]
    if errs or bad:
      lines.append(f"{name}: {len(ok) if errs else 0} results agree with the reference "
                   f"(largest error {max(errs, default=0.0):.2g}, tolerance "
                   f"{sec['tolerance']:g})" + (f"; {len(bad)} DISAGREE and were not timed: "
                                               + ", ".join(sorted({r['candidate'] for r in bad}))
                                               if bad else ""))
    for t in sec["targets"]:
      lines.append(describe_target(t))
  for name, st in payload["studies"].items():
    if "passed" in st:
      lines.append(f"{name}: {'agrees with the reference' if st['passed'] else 'FAILED its check'}")
  lines += payload["warnings"]
  return lines


def _noise_warnings(payload: Mapping[str, Any]) -> list[str]:
  warnings = []
  cores = payload["environment"].get("cpu_affinity") or 1
  for name, sec in payload["benchmarks"].items():
    timed = [r for r in sec["rows"] if r["status"] == "ok"]
    noisy = [r for r in timed if r["noisy"]]
    if noisy:
      worst = max(noisy, key=lambda r: r["spread"])
      load = max((r["load"] for r in noisy if r.get("load") is not None), default=None)
      warnings.append(
          f"warning: {len(noisy)} of {len(timed)} {name} timings are noisy (IQR above "
          f"{100 * NOISY_SPREAD:.0f}% of the median, or load average above {cores} cores; "
          f"worst IQR {100 * worst['spread']:.0f}% for {worst['candidate']}"
          + (f", load up to {load:.2f}" if load is not None else "")
          + "): rerun on a quiet machine before quoting them")
  return warnings


# --------------------------------------------------------------------------- plotting


def _style(i: int, cand_style: Mapping[str, Any] | None) -> dict:
  markers = "osv^D<>px*h"
  style = {"color": f"C{i % 10}", "marker": markers[i % len(markers)]}
  if i == 0:
    style["lw"] = 2.5
  style.update(cand_style or {})
  return style


def plot_benchmark(bench: Benchmark, section: Mapping[str, Any], out: Path,
                   env: Mapping[str, Any], suffix: str = "") -> Path | None:
  """Time (median, IQR bars), rate and memory against the grid axis; bars for one point."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in section["rows"] if r["status"] == "ok"]
  if not rows:
    return None
  x = section["x"]
  styles = {c.name: _style(i, c.style) for i, c in enumerate(bench.candidates)}
  names = [c.name for c in bench.candidates if any(r["candidate"] == c.name for r in rows)]
  if x is None:  # a single point: horizontal bars with IQR whiskers
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    med = [r["median_s"] for r in rows]
    err = [[r["median_s"] - r["q1_s"] for r in rows], [r["q3_s"] - r["median_s"] for r in rows]]
    ax.barh(range(len(rows)), med, xerr=err, color=[styles[r["candidate"]]["color"]
                                                    for r in rows], capsize=3)
    ax.set_yticks(range(len(rows)), [r["candidate"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds per call (median, IQR bars)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_title(section["title"], fontsize=9)
  else:
    panels = ["time"] + (["rate"] if section["rate_unit"] else []) + (
        ["memory"] if any(r.get("peak_bytes") for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.3 * len(panels), 4.2), squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))
    others = [k for k in rows[0] if k not in _ROW_FIELDS and k != x]
    groups = sorted({_point_of(r, others) for r in rows}, key=str)
    for name in names:
      for gi, g in enumerate(groups):
        pts = sorted((r for r in rows if r["candidate"] == name and _point_of(r, others) == g),
                     key=lambda r: r[x])
        if not pts:
          continue
        label = name + ("" if len(groups) == 1 else " " + ", ".join(
            f"{k}={v}" for k, v in zip(others, g, strict=True)))
        xs = [r[x] for r in pts]
        med = np.array([r["median_s"] for r in pts])
        err = [med - [r["q1_s"] for r in pts], [r["q3_s"] for r in pts] - med]
        style = dict(styles[name], **({"ls": ("-", "--", ":", "-.")[gi % 4]} if gi else {}))
        axes["time"].errorbar(xs, med, yerr=err, capsize=2, label=label, **style)
        if "rate" in axes:
          axes["rate"].plot(xs, [r["rate"] for r in pts], label=label, **style)
        mem = [r for r in pts if r.get("peak_bytes")]
        if "memory" in axes and mem:
          axes["memory"].plot([r[x] for r in mem], [r["peak_bytes"] / 2**20 for r in mem],
                              label=label, **style)
    axes["time"].set(ylabel="seconds per call (median, IQR bars)", yscale="log")
    if "rate" in axes:
      axes["rate"].set(ylabel=section["rate_unit"])
    if "memory" in axes:
      axes["memory"].set(ylabel="peak memory beyond inputs (MiB)", yscale="log")
    for ax in axes.values():
      ax.set_xscale("log", base=2)
      ax.set_xlabel(x)
      ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes["time"].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=7,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(section["title"], fontsize=10)
  fig.text(0.99, 0.99, machine_line(env), ha="right", va="top", fontsize=7)
  return save_figure(fig, out, bench.name + suffix)


# --------------------------------------------------------------------------- main


def _grid_override(text: str) -> tuple[str, list]:
  key, sep, values = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"--grid takes AXIS=V1,V2,..., got {text!r}")
  out = []
  for v in values.split(","):
    if not v:
      continue
    try:
      out.append(int(v))
    except ValueError:
      try:
        out.append(float(v))
      except ValueError:
        out.append(v)
  return key, out


def parser(description: str, items: Sequence[Benchmark | Study] = ()) -> argparse.ArgumentParser:
  """The options every experiment takes."""
  names = ", ".join(i.name for i in items)
  p = argparse.ArgumentParser(description=(description.strip() or "An experiment.").splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="results", help="folder for the JSON and PNG files")
  p.add_argument("--quick", action="store_true", help="small grid, about a minute on 2 CPUs")
  p.add_argument("--only", type=lambda s: [v for v in s.split(",") if v],
                 help=f"run only these parts, comma-separated ({names})")
  p.add_argument("--candidates", type=lambda s: [v for v in s.split(",") if v],
                 help="time only candidates whose name contains one of these, comma-separated")
  p.add_argument("--grid", type=_grid_override, action="append", default=[],
                 metavar="AXIS=V1,V2", help="replace one axis of the grid (repeatable)")
  p.add_argument("--repeats", type=int, help="timed samples per candidate (default 7, quick 5)")
  p.add_argument("--min-sample-s", type=float, help="shortest timed sample (default 0.05 s)")
  p.add_argument("--idle-s", type=float, help=f"untimed pause before each sample, for other "
                 f"libraries' threads to go idle (default {IDLE_S} s)")
  p.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
  p.add_argument("--torch-threads", type=int,
                 help="torch.set_num_threads for torch candidates (default: torch's own)")
  p.add_argument("--sync-dispatch", action="store_true",
                 help="CPU only: run JAX programs on the calling thread (not JAX's default); "
                      "writes NAME_sync.json")
  p.add_argument("--no-plot", action="store_true", help="write the JSON only")
  return p


def main(items: Sequence[Benchmark | Study], *, name: str, description: str = "",
         argv: list[str] | None = None,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> dict:
  """Runs benchmarks and studies from the command line; returns the JSON payload.

  Prints each comparison table, then a "Checks" section (results against their
  references, targets with the measured ratios, noise warnings), writes
  `OUT/NAME.json` and the plots, and exits with status 1 if a result disagreed
  with its reference.

  Args:
    items: `Benchmark`s and `Study`s, run in order.
    name: the experiment's name (JSON file stem), usually the module's.
    description: shown by `--help` (the module docstring).
    argv: command-line arguments (default `sys.argv[1:]`).
    add_arguments: adds the experiment's own options; `setup` and `Study.run` read
      them from `ctx.args`.
  """
  p = parser(description, items)
  if add_arguments is not None:
    add_arguments(p)
  args = p.parse_args(argv)
  args.grid = dict(args.grid)
  if args.only:
    unknown = set(args.only) - {i.name for i in items}
    if unknown:
      p.error(f"--only: unknown part(s) {sorted(unknown)}; choose from "
              f"{[i.name for i in items]}")
    items = [i for i in items if i.name in args.only]
  if args.sync_dispatch:
    set_cpu_dispatch(False)
  if args.torch_threads is not None:
    import torch

    torch.set_num_threads(args.torch_threads)
  out = Path(args.out)
  suffix = "_sync" if args.sync_dispatch else ""
  ctx = Context(args=args, quick=args.quick, rng=np.random.default_rng(args.seed),
                seed=args.seed, out=out)
  load_start = load_average()
  git_start = _git()  # the code that ran, even if the checkout changes during a long run
  payload: dict[str, Any] = {
      "schema": SCHEMA, "experiment": name + suffix,
      "command": shlex.join(["python", "-m", f"experiments.{name}",
                             *(sys.argv[1:] if argv is None else argv)]),
      "argv": sys.argv if argv is None else argv, "quick": args.quick,
      "options": {k: v for k, v in vars(args).items() if _plain(v)},
      "benchmarks": {}, "studies": {}}
  paths = []
  for item in items:
    if isinstance(item, Benchmark):
      section = run(item, ctx)
      payload["benchmarks"][item.name] = section
      print_benchmark(section, item.note)
    else:
      result = item.run(ctx)
      if item.passed is not None:
        result["passed"] = bool(item.passed(result))
      payload["studies"][item.name] = result
      print(f"\n{item.title}")
      if item.summary is not None:
        print(item.summary(result))
  env = environment()
  env["load_average"] = {"start": load_start, "end": env["load_average"]}
  env["git"] = git_start
  payload["environment"] = env
  payload["warnings"] = _noise_warnings(payload)
  payload["noisy"] = bool(payload["warnings"])
  failed = [r for s in payload["benchmarks"].values() for r in s["rows"]
            if r["status"] == "check failed"]
  failed += [s for s in payload["studies"].values() if s.get("passed") is False]
  payload["checks_passed"] = not failed
  lines = _checks_lines(payload)
  if lines:
    print("\nChecks")
    print("\n".join("  " + line for line in lines))
  if not args.no_plot:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    for item in items:
      if isinstance(item, Benchmark):
        path = plot_benchmark(item, payload["benchmarks"][item.name], out, env, suffix)
        if path is not None:
          paths.append(path)
      elif item.plot is not None:
        paths += list(item.plot(payload["studies"][item.name], out) or [])
  paths.append(write_json_atomic(out / f"{name}{suffix}.json", payload))
  print(f"\n{machine_line(env)}; load average {load_start} at start, "
        f"{env['load_average']['end']} at end")
  print("wrote " + ", ".join(str(p) for p in paths))
  if failed:
    print("some results disagree with their reference: see Checks above", file=sys.stderr)
    raise SystemExit(1)
  return payload


def _plain(v) -> bool:
  return v is None or isinstance(v, (bool, int, float, str)) or (
      isinstance(v, (list, dict)) and json.dumps(v, default=lambda o: None) is not None)


def write_json(out_dir: str | os.PathLike, name: str, results: Any) -> Path:
  """Writes `{"experiment", "argv", "environment", "results"}` to `out_dir/name.json`.

  For scripts not yet declared as `Benchmark`s; `main` writes the full layout.
  """
  payload = {"schema": SCHEMA, "experiment": name, "argv": sys.argv,
             "environment": environment(), "results": results}
  return write_json_atomic(Path(out_dir) / f"{name}.json", payload)
