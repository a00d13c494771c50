"""jaxsim on JAX's distributed runtime, with real processes on one machine.

`launch` starts N local processes, each with K CPU devices
(`--xla_force_host_platform_device_count=K`), CPU collectives over gloo and
`jax.distributed.initialize(coordinator_address="127.0.0.1:PORT", num_processes=N,
process_id=i)`, runs a worker function (`"module:function"`) in each and returns
every process's result. The tests reuse it (tests/test_distributed.py).

    python -m experiments.distributed --processes 4 --devices-per-process 2

runs `uneven_worker`: an uneven corpus (each process holds a different number of
rows), made global with `jaxsim.shard_rows`, searched with `topk`, summarised with
`similarity_stats` and `pairs_above`; it prints whether each process's results are
bitwise equal to the single-process call over all rows on a mesh of as many devices,
and the timings.

This module imports no JAX at the top: a child process must set `XLA_FLAGS` first.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  # Each process is one of several on few cores: one BLAS thread each.
  env.setdefault("OMP_NUM_THREADS", "1")
  env.setdefault("OPENBLAS_NUM_THREADS", "1")
  return env


def launch(worker: str, *, processes: int, devices_per_process: int,
           kwargs: dict[str, Any] | None = None, timeout: float = 120.0) -> list[Any]:
  """Runs `worker(**kwargs)` in `processes` local JAX processes; returns their results.

  Args:
    worker: `"module:function"`, importable from the repository root; it runs after
      `jax.distributed.initialize` and returns a picklable value.
    processes: number of processes (`jax.process_count()`).
    devices_per_process: CPU devices in each process (`jax.local_device_count()`).
    kwargs: keyword arguments for the worker (picklable), the same in every process.
    timeout: seconds for the whole run; every process is killed past it.

  Returns:
    The workers' results, in process order.

  Raises:
    RuntimeError: a process failed or timed out (with the tail of its output).
  """
  port = free_port()
  with tempfile.TemporaryDirectory(prefix="jaxsim-dist-") as tmp:
    args_path = Path(tmp, "kwargs.pkl")
    args_path.write_bytes(pickle.dumps(kwargs or {}))
    children, logs = [], []
    for i in range(processes):
      log = open(Path(tmp, f"log{i}.txt"), "w")  # noqa: SIM115 (closed below)
      logs.append(log)
      children.append(subprocess.Popen(
          [sys.executable, "-m", "experiments.distributed", "--child", worker,
           "--process-id", str(i), "--processes", str(processes), "--port", str(port),
           "--args", str(args_path), "--result", str(Path(tmp, f"result{i}.pkl"))],
          cwd=ROOT, env=_child_env(devices_per_process), stdout=log,
          stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    failed = None
    try:
      for i, child in enumerate(children):
        try:
          rc = child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          failed = (i, f"timed out after {timeout:.0f} s")
          break
        if rc != 0:
          failed = (i, f"exited with status {rc}")
          break
    finally:
      for child in children:
        if child.poll() is None:
          child.kill()
          child.wait()
      for log in logs:
        log.close()
    if failed is not None:
      i, why = failed
      tail = Path(tmp, f"log{i}.txt").read_text()[-3000:]
      raise RuntimeError(f"process {i} of {processes} {why}; its output ends:\n{tail}")
    return [pickle.loads(Path(tmp, f"result{i}.pkl").read_bytes()) for i in range(processes)]


def _child(argv: list[str]) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--child", required=True)
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--processes", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--args", required=True)
  p.add_argument("--result", required=True)
  a = p.parse_args(argv)
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{a.port}",
                             num_processes=a.processes, process_id=a.process_id)
  module, name = a.child.split(":")
  fn = getattr(importlib.import_module(module), name)
  result = fn(**pickle.loads(Path(a.args).read_bytes()))
  tmp = a.result + ".tmp"
  Path(tmp).write_bytes(pickle.dumps(result))
  os.replace(tmp, a.result)  # never a half-written result
  jax.distributed.shutdown()


# --- the workload -------------------------------------------------------------------


def corpus(counts: list[int], d: int, q: int, seed: int):
  """The whole corpus (process `p` holds rows `sum(counts[:p]) ...`) and the queries.

  Rows are quantised to multiples of 1/8 with repeats, so that exact score ties occur
  and the rule that ties go to the lower global id is exercised.
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  n = sum(counts)
  base = np.round(rng.normal(size=(max(1, n // 3), d)) * 8) / 8
  rows = base[rng.integers(0, base.shape[0], n)].astype(np.float32)
  queries = (np.round(rng.normal(size=(q, d)) * 8) / 8).astype(np.float32)
  return rows, queries


def _timed(timings: dict, repeats: int, name: str, fn):
  """`fn()` as numpy, after recording its best time of `repeats` calls (the first call,
  which compiles, is not timed) in `timings[name]`."""
  import jax  # imported in the workers only, after their device count is set
  import numpy as np

  result = jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  timings[name] = best
  return jax.tree.map(np.asarray, result)


def uneven_worker(counts: list[int], d: int = 32, q: int = 16, k: int = 10,
                  threshold: float = 0.6, max_pairs: int = 4096, seed: int = 0,
                  metrics: tuple[str, ...] = ("cosine", "sq_euclidean"),
                  index: bool = True, repeats: int = 1) -> dict[str, Any]:
  """Every process: its own rows -> `shard_rows` -> topk, stats, pairs, Index.search."""
  import jax
  import numpy as np
  from jax.sharding import Mesh

  import jaxsim

  me = jax.process_index()
  rows, queries = corpus(counts, d, q, seed)
  start = sum(counts[:me])
  local = rows[start:start + counts[me]]
  mesh = Mesh(np.array(jax.devices()), ("rows",))
  out: dict[str, Any] = {"process": me, "devices": jax.device_count(), "timings": {}}

  timed = functools.partial(_timed, out["timings"], repeats)

  srows = jax.block_until_ready(jaxsim.shard_rows(local, mesh))
  t0 = time.perf_counter()
  srows = jax.block_until_ready(jaxsim.shard_rows(local, mesh))
  out["timings"]["shard_rows"] = time.perf_counter() - t0
  # Every process reads back the whole corpus: it must be all rows in global-id order.
  out["rows_equal"] = bool(np.array_equal(jaxsim.ShardedRows.gather(srows), rows))
  out["count"] = len(srows)
  for metric in metrics:
    out[f"topk/{metric}"] = timed(f"topk/{metric}",
                                  lambda m=metric: jaxsim.topk(queries, srows, k, metric=m))
  out["stats"] = timed("similarity_stats", lambda: tuple(jaxsim.similarity_stats(srows)))
  out["pairs"] = timed("pairs_above", lambda: tuple(jaxsim.pairs_above(
      srows, threshold=threshold, max_pairs=max_pairs)))
  if index:
    idx = jaxsim.Index(local, mesh=mesh)
    out["index_len"] = len(idx)
    out["index"] = timed("Index.search", lambda: idx.search(queries, k))
  return out


def mismatch_worker(d: int = 8) -> list[str]:
  """Bad multi-process calls; returns each one's error message (or "no error").

  Each process passes different queries (each must raise, naming `queries`), a
  different threshold, and a process-local corpus with a mesh over every process
  (an error naming `mesh`)."""
  import jax
  import numpy as np
  from jax.sharding import Mesh

  import jaxsim

  me = jax.process_index()
  mesh = Mesh(np.array(jax.devices()), ("rows",))
  rows = jaxsim.shard_rows(np.ones((3 + me, d), np.float32), mesh)
  calls = [
      lambda: jaxsim.topk(np.full((2, d), float(me), np.float32), rows, 1),
      lambda: jaxsim.pairs_above(rows, threshold=0.5 + me, max_pairs=4),
      lambda: jaxsim.topk(np.ones((2, d), np.float32), np.ones((5, d), np.float32), 1,
                          mesh=mesh),
  ]
  messages = []
  for call in calls:
    try:
      call()
      messages.append("no error")
    except ValueError as err:
      messages.append(str(err))
  return messages


def reference(counts: list[int], d: int = 32, q: int = 16, k: int = 10,
              threshold: float = 0.6, max_pairs: int = 4096, seed: int = 0,
              metrics: tuple[str, ...] = ("cosine", "sq_euclidean"), index: bool = True,
              repeats: int = 1, devices: int = 1) -> dict[str, Any]:
  """The single-process results over all rows, on a mesh of this process's first
  `devices` devices (run in the calling process).

  With as many devices as the processes have in all, the corpus is cut into the same
  shards, so the results must be bitwise equal.
  """
  import jax
  import numpy as np
  from jax.sharding import Mesh

  import jaxsim

  rows, queries = corpus(counts, d, q, seed)
  mesh = Mesh(np.array(jax.devices()[:devices]), ("rows",))
  out: dict[str, Any] = {"timings": {}, "count": rows.shape[0]}

  timed = functools.partial(_timed, out["timings"], repeats)

  for metric in metrics:
    out[f"topk/{metric}"] = timed(f"topk/{metric}",
                                  lambda m=metric: jaxsim.topk(queries, rows, k, metric=m,
                                                                mesh=mesh))
  out["stats"] = timed("similarity_stats",
                       lambda: tuple(jaxsim.similarity_stats(rows, mesh=mesh)))
  out["pairs"] = timed("pairs_above", lambda: tuple(jaxsim.pairs_above(
      rows, threshold=threshold, max_pairs=max_pairs, mesh=mesh)))
  if index:
    out["index_len"] = rows.shape[0]
    idx = jaxsim.Index(rows, mesh=mesh)
    out["index"] = timed("Index.search", lambda: idx.search(queries, k))
  return out


def compare(result: dict[str, Any], ref: dict[str, Any]) -> dict[str, str]:
  """Per output: "equal" when bitwise equal to the reference, else "DIFFERENT".

  The reference runs on a single-process mesh of as many devices, so the corpus is
  cut into the same shards and tiles: every id, count and score must match exactly.
  """
  import numpy as np

  def close(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))

  verdict = {}
  for key in ref:
    if key == "timings":
      continue
    got, want = result[key], ref[key]
    if key.startswith("topk/") or key == "index":
      ok = np.array_equal(got[1], want[1]) and close(got[0], want[0])
    elif key == "pairs":  # rows, cols, scores, count, overflowed
      ok = (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
            and close(got[2], want[2]) and int(got[3]) == int(want[3])
            and bool(got[4]) == bool(want[4]))
    elif key == "stats":
      ok = all(close(g, w) for g, w in zip(got, want, strict=True))
    else:
      ok = got == want
    verdict[key] = "equal" if ok else "DIFFERENT"
  return verdict


def uneven_counts(processes: int, rows_per_process: int) -> list[int]:
  """Row counts per process that differ and do not divide the device count."""
  return [rows_per_process + 37 * p + (p % 2) * 11 + 1 for p in range(processes)]


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--processes", type=int, default=4)
  p.add_argument("--devices-per-process", type=int, default=2)
  p.add_argument("--rows-per-process", type=int, default=2000)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--queries", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--timeout", type=float, default=600)
  a = p.parse_args(argv)
  devices = a.processes * a.devices_per_process
  # The reference runs here, on as many devices as the processes have in all; JAX is
  # not imported yet, so the flag still applies.
  os.environ["XLA_FLAGS"] = _child_env(devices)["XLA_FLAGS"]
  counts = uneven_counts(a.processes, a.rows_per_process)
  # max_pairs holds every pair over 0.6 at the default sizes (about 12,600).
  kw = dict(counts=counts, d=a.dim, q=a.queries, repeats=a.repeats, max_pairs=1 << 15)
  t0 = time.perf_counter()
  results = launch("experiments.distributed:uneven_worker", processes=a.processes,
                   devices_per_process=a.devices_per_process, kwargs=kw, timeout=a.timeout)
  wall = time.perf_counter() - t0
  ref = reference(**kw, devices=devices)
  print(f"{a.processes} processes x {a.devices_per_process} CPU devices, rows per process "
        f"{counts} ({sum(counts)} in all, d={a.dim}), {a.queries} queries; launch + run "
        f"{wall:.1f} s")
  for r in results:
    verdict = compare(r, ref)
    print(f"process {r['process']}: " + ", ".join(f"{k} {v}" for k, v in verdict.items()))
  print(f"{'operation':<22}{'single process':>16}" + "".join(
      f"{'process ' + str(r['process']):>12}" for r in results) + "   (seconds, best of "
      f"{a.repeats})")
  for name in results[0]["timings"]:
    single = ref["timings"].get(name)
    print(f"{name:<22}{'' if single is None else f'{single:.4f}':>16}"
          + "".join(f"{r['timings'][name]:>12.4f}" for r in results))
  if any(v != "equal" for r in results for v in compare(r, ref).values()):
    sys.exit(1)


if __name__ == "__main__":
  if "--child" in sys.argv:
    _child(sys.argv[1:])
  else:
    main()
