"""The README's results tables, generated from the experiments' JSON.

Each table lives in README.md between `<!-- report:NAME -->` and `<!-- /report:NAME -->`
and is rewritten from the JSON that `harness.main` wrote; under each table, one line
says which command, commit, machine and load produced it, and whether the harness
flagged the run as noisy. Nothing is typed in by hand.

Run: `python -m experiments.report` (reads `docs/results/`, rewrites README.md), or
`--check` to exit non-zero when README.md is not what the JSON gives. A table whose
JSON is missing is left as it is, with a note on stderr.

The README's figures come from (each writes its JSON and plots to `docs/results/`):

    python -m experiments.scaling --out docs/results
    python -m experiments.seed_table --out docs/results
    python -m experiments.seed_table --sync-dispatch --out docs/results
    python -m experiments.search_bench --out docs/results
    python -m experiments.embedding_stats --out docs/results
    python -m experiments.attention_demo --out docs/results
    python -m experiments.numerics_bench --out docs/results
    python -m experiments.knn_graph --out docs/results
    python -m experiments.tiles --out docs/results
    python -m experiments.dense_forms --out docs/results
    python -m experiments.bf16_matmul --out docs/results
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments import harness

RESULTS = Path("docs/results")
README = Path("README.md")
# A row timed while the machine was busy, or with a wide spread, carries this mark.
NOISY = "†"


def load(results: Path, name: str) -> dict | None:
  path = results / f"{name}.json"
  if not path.exists():
    return None
  payload = json.loads(path.read_text())
  if payload.get("schema") != harness.SCHEMA:
    raise ValueError(f"{path} has schema {payload.get('schema')!r}, expected "
                     f"{harness.SCHEMA!r}: rerun the experiment.")
  return payload


def source_line(payload: Mapping[str, Any]) -> str:
  """Which command, commit, machine, versions and load produced a table."""
  env = payload["environment"]
  versions = env.get("versions", {})
  libs = ", ".join(f"{k} {versions[k]}" for k in ("jax", "torch", "faiss-cpu", "numpy")
                   if k in versions)
  git = env.get("git") or {}
  commit = git.get("commit", "unknown")[:7] + (" + local edits" if git.get("dirty") else "")
  load = env.get("load_average") or {}
  start, end = (load.get("start") or ["?"])[0], (load.get("end") or ["?"])[0]
  dispatch = "" if env.get("cpu_async_dispatch", True) else ", synchronous CPU dispatch"
  line = (f"<sub>`{_command(payload)}` at commit {commit}, {env['date'][:10]}; "
          f"{harness.machine_line(env)} ({', '.join(env.get('cpu_flags') or [])}){dispatch}; "
          f"{libs}; load average {start} at start, {end} at end.")
  if payload.get("noisy"):
    line += (f" {NOISY} marks timings the harness flagged as noisy (interquartile range "
             f"above {100 * harness.NOISY_SPREAD:.0f}% of the median, or load above the "
             "core count).")
  return line + "</sub>"


def _command(payload: Mapping[str, Any]) -> str:
  # The path of --out is where this run wrote, not part of what was measured.
  return re.sub(r" --out \S+", "", payload["command"])


def _rows(payload, bench: str) -> list[dict]:
  return payload["benchmarks"].get(bench, {}).get("rows", [])


def _cell(row: dict | None, fmt: Callable[[dict], str]) -> str:
  if row is None or row.get("status") != "ok":
    status = None if row is None else row.get("status")
    return {None: "-", "skipped": "-", "unavailable": "not installed"}.get(status, "check failed")
  return fmt(row) + (f" {NOISY}" if row.get("noisy") else "")


def pivot(rows: list[dict], key: str, fmt: Callable[[dict], str], *,
          key_label: str | None = None, key_fmt: Callable[[Any], str] = str) -> str:
  """A markdown table: one line per value of `key`, one column per candidate."""
  names = list(dict.fromkeys(r["candidate"] for r in rows))
  keys = list(dict.fromkeys(r[key] for r in rows))
  lines = ["| " + " | ".join([key_label or key, *names]) + " |",
           "| " + " | ".join(["---"] * (len(names) + 1)) + " |"]
  for k in keys:
    by = {r["candidate"]: r for r in rows if r[key] == k}
    lines.append("| " + " | ".join([key_fmt(k), *(_cell(by.get(n), fmt) for n in names)])
                 + " |")
  return "\n".join(lines)


def _time(r: dict) -> str:
  return harness.fmt_seconds(r["median_s"])


def _targets(payload, bench: str) -> list[str]:
  section = payload["benchmarks"].get(bench, {})
  lines = []
  for t in section.get("targets", []):
    for p in t["points"]:
      if "best" not in p:  # JSON written before the harness recorded it
        keys = {k: v for k, v in p.items() if k not in ("value", "met", "noisy")}
        rows = {r["candidate"]: r for r in section["rows"] if r["status"] == "ok"
                and all(r.get(k) == v for k, v in keys.items())}
        if t["candidate"] in rows and t["baseline"] in rows:
          p["best"] = harness.best_ratio(t["measure"], rows[t["candidate"]],
                                         rows[t["baseline"]])
    lines.append(harness.describe_target(t))
  return lines


def _bullets(lines: list[str]) -> str:
  return "\n".join(f"- {line}" for line in lines)


# --------------------------------------------------------------------------- tables


def scaling(results: Path) -> str | None:
  p = load(results, "scaling")
  if p is None:
    return None
  parts = ["All-pairs cosine of N x 128 float32 rows, median time per call:", "",
           pivot(_rows(p, "n_sweep"), "n", _time, key_label="N")]
  exps = p["benchmarks"].get("n_sweep", {}).get("analysis", {}).get("exponents", {})
  if exps:
    parts += ["", "Time grows as N^" + ", N^".join(
        f"{f['exponent']:.2f} for {name}" for name, f in exps.items()) + "."]
  rate = _rows(p, "rate")
  if rate:
    parts += ["", "jaxsim against the raw XLA matmul alone (the rate goal):", "",
              pivot(rate, "n", lambda r: f"{_time(r)}, {r['rate']:.0f} GFLOP/s", key_label="N")]
  checks = _targets(p, "rate")
  if checks:
    parts += ["", _bullets(checks)]
  return "\n".join(parts + ["", source_line(p)])


def small(results: Path) -> str | None:
  p = load(results, "seed_table")
  if p is None:
    return None
  sync = load(results, "seed_table_sync")
  parts = ["One (50, 64) float32 matrix, eager calls, median time per call:", ""]
  modes = [("default (async) dispatch", p)] + ([("sync dispatch", sync)] if sync else [])
  names = list(dict.fromkeys(r["candidate"] for r in _rows(p, "overhead")))
  head = ["candidate"] + [f"{m}: time" for m, _ in modes] + [f"{m}: / bare jit" for m, _ in modes]
  lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
  for name in names:
    rows = [next((r for r in _rows(q, "overhead") if r["candidate"] == name), None)
            for _, q in modes]
    lines.append("| " + " | ".join(
        [name] + [_cell(r, _time) for r in rows]
        + [_cell(r, lambda r: f"{1 / r['speedup']:.2f}x") for r in rows]) + " |")
  parts.append("\n".join(lines))
  batched = _rows(p, "batched")
  if batched:
    b = batched[0]
    parts += ["", f"{b['batch']} sets of ({b['n']}, {b['d']}) in one call:", "",
              pivot(batched, "batch", lambda r: f"{_time(r)} ({r['rate']:.1f} GFLOP/s)",
                    key_label="sets")]
  checks = _targets(p, "overhead") + _targets(p, "batched")
  if sync:
    checks += [f"sync dispatch: {line}" for line in _targets(sync, "overhead")]
  parts += ["", _bullets(checks), "", source_line(p)]
  if sync:
    parts += ["", source_line(sync)]
  return "\n".join(parts)


def post_table(results: Path) -> str | None:
  p = load(results, "seed_table")
  if p is None or not _rows(p, "post_table"):
    return None
  lines = ["| implementation | time per call | speed-up over the scipy loop |",
           "| --- | --- | --- |"]
  for r in _rows(p, "post_table"):
    lines.append(f"| {r['candidate']} | {_cell(r, _time)} | "
                 f"{_cell(r, lambda r: format(r['speedup'], '.3g') + 'x')} |")
  return "\n".join(lines + ["", source_line(p)])


def search(results: Path) -> str | None:
  p = load(results, "search_bench")
  if p is None:
    return None
  rows = _rows(p, "search")
  rates = lambda rows: pivot(rows, "n", lambda r: f"{r['rate']:,.0f}", key_label="corpus n",
                             key_fmt=lambda n: f"{n:,}")
  parts = []
  if rows:
    r0 = rows[0]
    worst = max((r.get("error") or 0.0 for r in rows if r["status"] == "ok"), default=0.0)
    parts += [f"Exact top-{r0['k']} cosine search, {r0['queries']} queries, d={r0['d']}, "
              f"queries per second (every candidate's top-{r0['k']} recall against float64 "
              f"is at least {1 - worst:.3f}):", "", rates(rows)]
  self_rows = _rows(p, "self_topk")
  if self_rows:
    planned = p["benchmarks"]["self_topk"]["analysis"].get("dense_planned_bytes", {})
    parts += ["", "Top-10 nearest rows of every row, N x 128, time per call and XLA's memory "
              "beyond the inputs (dense: its plan where it was not run):", "",
              pivot(self_rows, "n", lambda r: f"{_time(r)}, {harness.fmt_bytes(r['peak_bytes'])}",
                    key_label="N")]
    for n, b in planned.items():
      parts += [f"\nAt N={n} the dense route would need {harness.fmt_bytes(b)} (planned, not "
                "run)."]
  l2_rows = _rows(p, "search_l2")
  if l2_rows:
    r0 = l2_rows[0]
    parts += ["", f"Exact top-{r0['k']} squared-Euclidean search, {r0['queries']} queries, "
              f"d={r0['d']}, raw random rows, queries per second:", "", rates(l2_rows)]
  checks = _targets(p, "search")
  if checks:
    parts += ["", _bullets(checks)]
  return "\n".join(parts + ["", source_line(p)])


def stages(results: Path) -> str | None:
  p = load(results, "search_bench")
  rows = [] if p is None else [r for r in _rows(p, "stages") if r["status"] == "ok"]
  if not rows:
    return None
  r0 = rows[0]
  # Candidates are named "TILES: STAGE", in stage order per path.
  by = {tuple(r["candidate"].split(": ", 1)): r for r in rows}
  paths = list(dict.fromkeys(t for t, _ in by))
  names = list(dict.fromkeys(s for _, s in by))
  lines = [f"Where the time of a top-{r0['k']} cosine search of {r0['queries']} queries in "
           f"{r0['n']:,} x {r0['d']} rows goes: `jaxsim.topk`'s loop with its work added stage "
           "by stage, time per call (over the tile matmuls of the same path):", "",
           "| tiles | " + " | ".join(names) + " |",
           "| " + " | ".join(["---"] * (len(names) + 1)) + " |"]
  for tiles in paths:
    base = by.get((tiles, names[0]))
    cells = [_cell(by.get((tiles, name)), lambda r, base=base: _time(r) + (
        "" if base is None or r is base else f" ({r['median_s'] / base['median_s']:.2f}x)"))
             for name in names]
    lines.append(f"| {tiles} | " + " | ".join(cells) + " |")
  return "\n".join(lines + ["", source_line(p)])


def embedding(results: Path) -> str | None:
  p = load(results, "embedding_stats")
  if p is None:
    return None
  s = p["studies"]["token_cosines"]
  if "table" not in s:
    return None
  n, d = s["shape"]
  t = s["timing"]["table"]
  text = (f"All {s['table']['count']:,} pairs of {s['table_name']} ({n:,} x {d}): "
          f"{100 * s['share_nonnegative']:.1f}% of the cosines are non-negative, against "
          f"{100 * s['share_nonnegative_random']:.1f}% for a Gaussian table of the same shape; "
          f"mean {s['table']['mean']:.3f}, standard deviation {s['table']['std']:.3f}. "
          f"Streamed in {t['run_s']:.1f} s with {harness.fmt_bytes(t['temp_bytes'])} of XLA "
          f"temporaries, where the dense matrix would take {harness.fmt_bytes(4 * n * n)}.")
  return text + "\n\n" + source_line(p)


def attention(results: Path) -> str | None:
  p = load(results, "attention_demo")
  if p is None:
    return None
  parts = []
  rows = _rows(p, "attention_scaling")
  if rows:
    parts += [p["benchmarks"]["attention_scaling"]["title"] + "; time per call and XLA's "
              "memory beyond the inputs:", "",
              pivot(rows, "T", lambda r: f"{_time(r)}, {harness.fmt_bytes(r['peak_bytes'])}")]
  causal = _rows(p, "attention_causal")
  if causal:
    parts += ["", p["benchmarks"]["attention_causal"]["title"] + ", time per call:", "",
              pivot(causal, "T", _time), "", _bullets(_targets(p, "attention_causal"))]
  tr = p["studies"].get("training")
  if tr:
    acc = ", ".join(f"{name} {v['mean_accuracy']:.3f}" for name, v in tr["variants"].items())
    parts += ["", f"Associative recall after {tr['steps']} Adam steps (optax), held-out "
              f"accuracy (chance {tr['chance_accuracy']:.3f}): {acc}."]
  return "\n".join(parts + ["", source_line(p)])


def benchmarks(experiment: str, *names: str, fmt: Callable[[dict], str] = _time
               ) -> Callable[[Path], str | None]:
  """A table maker for any declared benchmark: per benchmark of `experiment`, its title,
  a table (one line per grid point, one column per candidate, `fmt` of each row) and
  its targets with the measured ratios."""

  def make(results: Path) -> str | None:
    p = load(results, experiment)
    if p is None:
      return None
    parts = []
    for name in names:
      bench = p["benchmarks"].get(name)
      if not bench or not bench["rows"]:
        continue
      keys = list(dict.fromkeys(k for point in bench["grid"] for k in point))
      label = " x ".join(keys)
      rows = [{**r, label: " x ".join(str(r[k]) for k in keys)} for r in bench["rows"]]
      unit = ", time per call" if fmt is _time else ""
      parts += [f"{bench['title']}{unit}:", "", pivot(rows, label, fmt), ""]
      checks = _targets(p, name)
      if checks:
        parts += [_bullets(checks), ""]
    return "\n".join(parts + [source_line(p)]) if parts else None

  return make


def xla_flags(results: Path) -> str | None:
  p = load(results, "dense_forms")
  study = None if p is None else p.get("studies", {}).get("xla_flags")
  if not study or not study.get("rows"):
    return None
  lines = [f"{study['n']} x {study['n']} x {study['d']} float32 matmul, one fresh process per "
           "setting (run in turn, not interleaved: differences within about 5% are noise):", "",
           "| setting | matmul GFLOP/s | vs default | dense `cosine(x)` vs the matmul |",
           "| --- | --- | --- | --- |"]
  for r in study["rows"]:
    if r["status"] != "ok":
      lines.append(f"| {r['setting']} | {r['status']} | - | - |")
      continue
    lines.append(f"| {r['setting']} | {r['matmul_gflops']:.0f} | "
                 f"{r.get('matmul_vs_default', float('nan')):.2f}x | "
                 f"{r['cosine_vs_matmul']:.2f}x |")
  return "\n".join(lines + ["", source_line(p)])


TABLES: dict[str, Callable[[Path], str | None]] = {
    "scaling": scaling, "small": small, "post_table": post_table, "search": search,
    "stages": stages,
    "embedding": embedding, "attention": attention,
    "numerics": benchmarks("numerics_bench", "euclidean_refinement"),
    "knn_graph": benchmarks("knn_graph", "knn_graph", "knn_graph_l2"),
    "self_stats": benchmarks("tiles", "self_stats", "triangle_step"),
    "tile_sweep": benchmarks("tiles", "tile_matmul",
                             fmt=lambda r: f"{r['rate']:.0f}" if r.get("rate") else _time(r)),
    "dense_forms": benchmarks("dense_forms", "dense_self", "dense_cross", "dense_self_dot"),
    "xla_flags": xla_flags,
    "bf16_matmul": benchmarks("bf16_matmul", "bf16_matmul")}


def render(results: Path) -> dict[str, str]:
  """Table name -> markdown, for every table whose JSON exists."""
  out = {}
  for name, make in TABLES.items():
    text = make(results)
    if text is not None:
      out[name] = text
  return out


def update(readme: str, blocks: Mapping[str, str]) -> tuple[str, list[str]]:
  """`readme` with each `<!-- report:NAME -->` block replaced; also the names not found."""
  missing = []
  for name, text in blocks.items():
    pattern = re.compile(rf"(<!-- report:{re.escape(name)} -->\n).*?(<!-- /report:"
                         rf"{re.escape(name)} -->)", re.DOTALL)
    if not pattern.search(readme):
      missing.append(name)
      continue
    readme = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), readme)
  return readme, missing


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON files")
  p.add_argument("--readme", type=Path, default=README)
  p.add_argument("--check", action="store_true",
                 help="only check that the README matches the JSON; exit 1 if not")
  args = p.parse_args(argv)
  blocks = render(args.results)
  for name in TABLES:
    if name not in blocks:
      print(f"report: no JSON for the {name!r} table in {args.results}; left as it is",
            file=sys.stderr)
  old = args.readme.read_text(encoding="utf-8")
  new, missing = update(old, blocks)
  for name in missing:
    print(f"report: {args.readme} has no <!-- report:{name} --> block", file=sys.stderr)
  if args.check:
    if new != old:
      print(f"report: {args.readme} differs from {args.results}; run python -m "
            "experiments.report", file=sys.stderr)
      return 1
    return 0
  if new != old:
    tmp = args.readme.with_name(f".{args.readme.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(args.readme)
  print(f"report: {len(blocks) - len(missing)} table(s) written to {args.readme}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
