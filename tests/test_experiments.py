"""Every experiment module end to end at a tiny size, its JSON schema, and the harness's rules.

Each module runs in-process into a `tmp_path` with a tiny `--grid` and one timed sample;
the tests check the JSON layout every module shares (`harness.SCHEMA`), that every
result agreed with its reference before it was timed, and the module's own numbers
against independent references. Timings themselves are not tested.
"""

import argparse
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import (
  attention_demo,
  bf16_matmul,
  dense_forms,
  embedding_stats,
  harness,
  knn_graph,
  numerics_bench,
  report,
  scaling,
  search_bench,
  seed_table,
  tiles,
)
from experiments.harness import Benchmark, Candidate, Grid, Study, Target
from tests import reference

TINY = ["--repeats", "1", "--min-sample-s", "0", "--idle-s", "0"]
ENV_KEYS = {"date", "processor", "cpu_flags", "cpu_affinity", "backend", "versions",
            "threadpools", "cpu_async_dispatch", "git", "load_average", "thread_env"}
OK_ROW_KEYS = {"candidate", "status", "median_s", "q1_s", "q3_s", "min_s", "samples_s",
               "calls_per_sample", "spread", "noisy", "load", "rate", "speedup", "error"}


def check_schema(payload: dict, name: str) -> None:
  """The layout `harness.main` promises, for any experiment."""
  assert payload["schema"] == harness.SCHEMA and payload["experiment"] == name
  assert payload["command"].startswith(f"python -m experiments.{name.removesuffix('_sync')}")
  env = payload["environment"]
  assert ENV_KEYS <= set(env)
  assert env["backend"] == "cpu" and env["versions"]["jax"]
  assert set(env["load_average"]) == {"start", "end"}
  assert env["git"] is None or len(env["git"]["commit"]) == 40
  assert isinstance(payload["checks_passed"], bool) and isinstance(payload["noisy"], bool)
  assert payload["noisy"] == bool(payload["warnings"])
  for bench in payload["benchmarks"].values():
    assert {"title", "x", "baseline", "rate_unit", "grid", "rows", "targets",
            "analysis"} <= set(bench)
    assert bench["rows"], "every benchmark times something"
    for row in bench["rows"]:
      assert row["status"] in ("ok", "skipped", "check failed", "unavailable")
      assert set(bench["grid"][0]) <= set(row)
      if row["status"] == "ok":
        assert OK_ROW_KEYS <= set(row)
        assert row["q1_s"] <= row["median_s"] <= row["q3_s"]
        assert row["min_s"] == min(row["samples_s"]) > 0
        if bench["baseline"] is not None and row["candidate"] == bench["baseline"]:
          assert row["speedup"] == pytest.approx(1.0)
    for t in bench["targets"]:
      assert t["measure"] in ("speed", "overhead")
      assert t["met"] == (bool(t["points"]) and all(p["met"] for p in t["points"]))


def _run(module, tmp_path, *argv, name=None):
  module.main([*argv, "--out", str(tmp_path)])
  name = name or module.NAME
  payload = json.loads((tmp_path / f"{name}.json").read_text())
  check_schema(payload, name)
  return payload


def _ok(payload, bench):
  return {r["candidate"]: r for r in payload["benchmarks"][bench]["rows"] if r["status"] == "ok"}


def _is_png(path):
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- every module, tiny -------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """All experiment JSON of one tiny run, shared by the module tests and the report test."""
  return tmp_path_factory.mktemp("results")


def test_seed_table(results):
  p = _run(seed_table, results, *TINY, "--grid", "n=12", "--grid", "d=5", "--grid", "batch=3")
  assert p["checks_passed"]
  rows = _ok(p, "post_table")
  assert {*seed_table.LOOPS, "sklearn", seed_table.NUMPY_MATRIX, seed_table.TORCH_MM,
          seed_table.JAXSIM, seed_table.BARE} <= set(rows)
  assert max(r["error"] for r in rows.values()) <= seed_table.TOLERANCE
  overhead = {t["candidate"]: t for t in p["benchmarks"]["overhead"]["targets"]}
  assert overhead[seed_table.JAXSIM]["measure"] == "overhead"
  # The overhead is jaxsim's time over the bare matmul's, from the same run's rows.
  o = _ok(p, "overhead")
  assert overhead[seed_table.JAXSIM]["points"][0]["value"] == pytest.approx(
      o[seed_table.JAXSIM]["median_s"] / o[seed_table.BARE]["median_s"])
  batched = _ok(p, "batched")
  assert set(batched) == {seed_table.JAXSIM, seed_table.XLA_BATCHED, seed_table.TORCH_BMM,
                          seed_table.NUMPY_BATCHED}
  assert batched[seed_table.JAXSIM]["rate"] == pytest.approx(
      2 * 3 * 12**2 * 5 / 1e9 / batched[seed_table.JAXSIM]["median_s"])
  assert _is_png(results / "post_table.png") and _is_png(results / "batched.png")


def test_seed_table_sync_dispatch_writes_its_own_json(tmp_path):
  # The CPU client reads the dispatch mode once, when JAX starts: a fresh process.
  import subprocess
  import sys
  from pathlib import Path

  root = Path(__file__).resolve().parent.parent
  subprocess.run([sys.executable, "-m", "experiments.seed_table", "--sync-dispatch", "--only",
                  "overhead", *TINY, "--grid", "n=8", "--grid", "d=4", "--no-plot", "--out",
                  str(tmp_path)], cwd=root, check=True, capture_output=True, timeout=300)
  payload = json.loads((tmp_path / "seed_table_sync.json").read_text())
  check_schema(payload, "seed_table_sync")
  assert payload["environment"]["cpu_async_dispatch"] is False
  assert set(payload["benchmarks"]) == {"overhead"} and payload["checks_passed"]


@pytest.mark.parametrize("shape", [(7, 4), (3, 7, 4)])
def test_seed_table_candidates_agree_with_float64_reference(shape):
  x = np.random.default_rng(0).random(shape, dtype=np.float32)
  want = reference.cosine(x, x) if x.ndim == 2 else np.stack([reference.cosine(a, a) for a in x])
  import torch

  got = {"numpy": seed_table.numpy_batched_cosine(x),
         "torch": seed_table.torch_bmm_cosine(torch.from_numpy(x)).numpy() if x.ndim == 3
         else seed_table.torch_matrix_cosine(torch.from_numpy(x)).numpy()}
  if x.ndim == 2:
    got["scipy loop"] = seed_table.scipy_loop_cosine(x, np.zeros((7, 7), np.float32))
    got["numpy matrix"] = seed_table.numpy_matrix_cosine(x)
  for name, out in got.items():
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_scaling(results):
  p = _run(scaling, results, *TINY, "--grid", "n=32,64", "--grid", "d=8")
  assert p["checks_passed"]
  cands = {scaling.JAXSIM, scaling.RAW, scaling.TORCH, scaling.NUMPY, scaling.SKLEARN}
  rows = [r for r in p["benchmarks"]["n_sweep"]["rows"]]
  assert {r["n"] for r in rows} == {32, 64} and {r["candidate"] for r in rows} == cands
  for r in rows:
    assert r["rate"] == pytest.approx(2 * r["n"] ** 2 * r["d"] / r["median_s"] / 1e9)
    # Peak memory includes the (n, n) float32 output, for every candidate.
    assert r["peak_bytes"] >= 4 * r["n"] ** 2
  assert set(p["benchmarks"]["n_sweep"]["analysis"]["exponents"]) == cands
  rate = p["benchmarks"]["rate"]
  assert {r["candidate"] for r in rate["rows"]} == {scaling.JAXSIM, scaling.RAW}
  # N=32, 64 are below the goal's smallest N: measured, not judged.
  assert rate["targets"][0]["points"] == [] and not rate["targets"][0]["met"]
  assert _is_png(results / "n_sweep.png")


def test_scaling_growth_exponent_recovers_known_powers():
  rows = [{"candidate": "sq", "n": n, "d": 8, "median_s": 3e-9 * n**2} for n in (64, 128, 512)]
  rows += [{"candidate": "lin", "n": n, "d": 8, "median_s": 1e-6 * n} for n in (64, 128, 512)]
  fits = scaling.growth_exponents(rows, "n")
  assert fits["sq"]["exponent"] == pytest.approx(2.0)
  assert fits["lin"]["exponent"] == pytest.approx(1.0)
  assert fits["sq"]["from"] == 64 and fits["sq"]["to"] == 512


def test_search_bench(results):
  p = _run(search_bench, results, *TINY, "--grid", "n=300", "--grid", "queries=20",
           "--grid", "d=16")
  assert p["checks_passed"]
  rows = _ok(p, "search")
  assert set(rows) == {search_bench.JAXSIM, search_bench.JAXSIM_F32, search_bench.FAISS,
                       search_bench.TORCH, search_bench.SKLEARN, search_bench.RAW,
                       search_bench.TILES, search_bench.TILES_BF16}
  assert all(r["error"] <= search_bench.RECALL_TOLERANCE for r in rows.values())
  assert rows[search_bench.JAXSIM]["rate"] == pytest.approx(
      20 / rows[search_bench.JAXSIM]["median_s"])
  assert {t["baseline"] for t in p["benchmarks"]["search"]["targets"]} == {
      search_bench.FAISS, search_bench.RAW, search_bench.TILES, search_bench.JAXSIM_F32,
      search_bench.TILES_BF16}
  self_rows = _ok(p, "self_topk")
  assert self_rows[search_bench.JAXSIM]["peak_bytes"] > 0
  stages = _ok(p, "stages")
  assert len(stages) == 8 and all(r["error"] <= search_bench.RECALL_TOLERANCE
                                  for r in stages.values())
  assert "| float32 | " in report.stages(results)
  l2 = _ok(p, "search_l2")
  assert set(l2) == {search_bench.JAXSIM, search_bench.FAISS_L2, search_bench.SKLEARN}
  assert all(r["error"] <= search_bench.RECALL_TOLERANCE for r in l2.values())


def test_search_bench_l2_check_ranks_by_distance():
  # Rows of different lengths: their nearest rows by distance and by cosine differ.
  rng = np.random.default_rng(5)
  q = rng.standard_normal((50, 16)).astype(np.float32)
  c = (rng.standard_normal((400, 16)) * rng.uniform(0.2, 3.0, (400, 1))).astype(np.float32)
  d = np.sum((q[:, None, :].astype(np.float64) - c[None, :, :]) ** 2, axis=-1)
  outputs = {"distance": np.argsort(d, axis=1, kind="stable")[:, :5],
             "cosine": search_bench.exact_topk(q, c, 5)}
  errors = search_bench.recall_check(harness.Case(q=q, c=c, k=5), outputs, l2=True)
  assert errors["distance"] == 0.0 and errors["cosine"] > 0.2


@pytest.mark.parametrize("stage", list(search_bench.STAGES))
@pytest.mark.parametrize("bf16", [False, True])
def test_search_bench_stages_are_checked_against_float64(stage, bf16):
  # 300 rows in blocks of 64: the last block is shifted back over the one before it.
  rng = np.random.default_rng(3)
  q, c = (search_bench._normalise(rng.standard_normal(s, dtype=np.float32))
          for s in ((20, 16), (300, 16)))
  case = harness.Case(q=q, c=c, args=argparse.Namespace(block_size=64))
  out = search_bench._tile_matmuls(jnp.asarray(q), jnp.asarray(c), block_size=64, bf16=bf16,
                                   stage=stage)
  assert out[0].shape == (20, 2 if stage == "keys" else 64)
  assert search_bench._tile_error(case, out, bf16=bf16, grouped=stage == "keys") <= (
      search_bench.RECALL_TOLERANCE if bf16 else 1e-6)
  wrong = (out[0].at[3, 1].add(0.05), out[1])
  assert search_bench._tile_error(case, wrong, bf16=bf16, grouped=stage == "keys") > (
      search_bench.RECALL_TOLERANCE)


def test_search_bench_exact_topk_matches_a_float64_sort():
  rng = np.random.default_rng(2)
  q, c = rng.standard_normal((9, 6)), rng.standard_normal((50, 6))
  want = np.argsort(-reference.cosine(q, c), axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(search_bench.exact_topk(q, c, 4), want)


def test_bf16_matmul(results):
  p = _run(bf16_matmul, results, *TINY, "--grid", "rows=16", "--grid", "cols=64",
           "--grid", "d=32")
  assert p["checks_passed"]
  rows = _ok(p, "bf16_matmul")
  assert set(rows) == {bf16_matmul.F32, bf16_matmul.BF16, bf16_matmul.ALGO}
  # float32 is far inside the bound; bfloat16 products are not exact but inside it.
  assert rows[bf16_matmul.F32]["error"] < 1e-5
  assert 1e-5 < rows[bf16_matmul.BF16]["error"] <= bf16_matmul.BOUND


def test_knn_graph(results):
  p = _run(knn_graph, results, *TINY, "--grid", "n=300", "--grid", "d=16")
  assert p["checks_passed"]
  rows = _ok(p, "knn_graph")
  assert set(rows) == {knn_graph.TRIANGLE, knn_graph.ONE_PROGRAM, knn_graph.TWO_SIDED,
                       knn_graph.FAISS}
  assert all(r["error"] <= knn_graph.RECALL_TOLERANCE for r in rows.values())
  targets = p["benchmarks"]["knn_graph"]["targets"]
  assert {(t["candidate"], t["baseline"]) for t in targets} == {
      (knn_graph.TRIANGLE, knn_graph.FAISS), (knn_graph.TRIANGLE, knn_graph.TWO_SIDED)}
  l2 = _ok(p, "knn_graph_l2")
  assert set(l2) == {knn_graph.TRIANGLE, knn_graph.TWO_SIDED, knn_graph.FAISS_L2}
  assert all(r["error"] <= knn_graph.RECALL_TOLERANCE for r in l2.values())


def test_knn_graph_reference_and_drop_self():
  x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
  rows = np.array([0, 7, 49])
  s = reference.cosine(x, x)
  np.fill_diagonal(s, -np.inf)
  np.testing.assert_array_equal(knn_graph.exact_graph(x, rows, 4), reference.topk(s, 4)[1][rows])
  d = -reference.METRICS["sq_euclidean"](x, x)
  np.fill_diagonal(d, -np.inf)
  np.testing.assert_array_equal(knn_graph.exact_graph(x, rows, 4, l2=True),
                                reference.topk(d, 4)[1][rows])
  # The row's own id is dropped wherever it is; without it, the last neighbour is.
  np.testing.assert_array_equal(knn_graph.drop_self(np.array([[0, 3, 4], [2, 1, 5], [0, 3, 4]])),
                                [[3, 4], [2, 5], [0, 3]])


def test_embedding_stats(results, tmp_path):
  rng = np.random.default_rng(3)
  table = rng.standard_normal((150, 12)).astype(np.float32) + 0.3  # skewed: mostly positive
  np.save(tmp_path / "table.npy", table)
  (tmp_path / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(150)) + "\n")
  p = _run(embedding_stats, results, "--table", str(tmp_path / "table.npy"), "--vocab",
           str(tmp_path / "vocab.txt"), "--token", "tok7", "--top", "4", "--bins", "40")
  res = p["studies"]["token_cosines"]
  assert res["passed"] and res["check"]["passed"]
  s = reference.cosine(table, table)[np.triu_indices(150, k=1)]
  assert res["table"]["count"] == s.size == sum(res["table"]["histogram"])
  assert res["share_nonnegative"] == pytest.approx(np.mean(s >= 0), abs=1e-6)
  assert res["table"]["mean"] == pytest.approx(s.mean(), abs=1e-5)
  assert 0.3 < res["share_nonnegative_random"] < 0.7
  row = reference.cosine(table[7:8], table)[0]
  want = np.argsort(row, kind="stable")[:4]
  assert [r["index"] for r in res["opposed"]["most_negative"]] == want.tolist()
  np.testing.assert_allclose([r["cosine"] for r in res["opposed"]["most_negative"]], row[want],
                             atol=1e-5)
  assert _is_png(results / "embedding_stats.png")


def test_embedding_stats_check_catches_wrong_statistics(monkeypatch):
  import jaxsim

  real = jaxsim.similarity_stats
  monkeypatch.setattr(jaxsim, "similarity_stats",
                      lambda *a, **k: real(*a, **k)._replace(mean=real(*a, **k).mean + 1e-3))
  table = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
  res = embedding_stats.check(table, bins=10, rng=np.random.default_rng(0))
  assert not res["passed"] and not res["ok"]["mean"] and res["ok"]["count"]


def test_tiles(results):
  p = _run(tiles, results, *TINY, "--grid", "n=64", "--grid", "rows=16,32", "--grid", "cols=32",
           "--grid", "b=16")
  assert p["checks_passed"]
  sweep = p["benchmarks"]["tile_matmul"]["rows"]
  assert {(r["rows"], r["cols"]) for r in sweep} == {(16, 32), (32, 32)}
  for r in sweep:
    assert r["rate"] == pytest.approx(2 * 64**2 * tiles.D / 1e9 / r["median_s"])
  assert set(_ok(p, "triangle_step")) == {tiles.TRI_MATMUL, tiles.TRI_STATS, tiles.RAW}
  assert set(_ok(p, "self_stats")) == {tiles.TRIANGLE, tiles.TWO_SIDED, tiles.RAW, tiles.NUMPY}
  assert all(r["error"] <= 1e-6 for r in _ok(p, "self_stats").values())


def test_tiles_references_agree_with_the_full_matrix():
  x = np.random.default_rng(4).standard_normal((50, 7)).astype(np.float32)
  m = reference.dot(x, x)
  want = m[np.triu_indices(50, 1)].mean()
  assert tiles.pair_mean(x) == pytest.approx(want, abs=1e-12)
  assert tiles.matrix_pair_mean(m) == pytest.approx(want, abs=1e-12)
  np.testing.assert_allclose(tiles.tiled_row_sums(16, 25)(x), m.sum(1), rtol=1e-5, atol=1e-5)


def test_attention_demo(results):
  # Training compiles four models: it is run on its own below, for one of them.
  p = _run(attention_demo, results, *TINY, "--grid", "T=40", "--only",
           "toy,heatmaps,attention_scaling,attention_causal", "--no-plot")
  assert p["checks_passed"]
  assert set(p["studies"]) == {"toy", "heatmaps"}
  toy = p["studies"]["toy"]
  # Cosine weights ignore the key's magnitude; dot weights do not.
  assert toy["max_weight_change"]["cosine"] < 1e-6 < toy["max_weight_change"]["dot"]
  rows = _ok(p, "attention_scaling")
  assert set(rows) == {"dense", "blocked", "jax.nn"}
  assert all(r["error"] <= 1e-4 for r in rows.values())
  assert set(p["benchmarks"]["attention_scaling"]["analysis"]["grad_temp_bytes"]["40"]) == {
      "dense", "blocked"}
  # Causal and unmasked, forward and gradient, each checked against jax.nn's.
  assert set(_ok(p, "attention_causal")) == {"unmasked", "causal", "unmasked grad",
                                             "causal grad"}


def test_numerics_bench(results):
  p = _run(numerics_bench, results, *TINY, "--grid", "n=300", "--no-plot")
  assert p["checks_passed"]
  assert set(_ok(p, "euclidean_refinement")) == {"expansion", "refined", "refined, 1% close"}


def test_dense_forms(results):
  p = _run(dense_forms, results, *TINY, "--quick", "--grid", "n=300", "--grid", "d=16",
           "--no-plot", "--flags-n", "64")
  assert p["checks_passed"]
  assert set(_ok(p, "dense_self")) == {dense_forms.JAXSIM_SELF, dense_forms.RAW,
                                       dense_forms.SKLEARN}
  assert set(_ok(p, "dense_cross")) == {dense_forms.JAXSIM_CROSS, dense_forms.RAW_CROSS}
  assert set(_ok(p, "dense_self_dot")) == {dense_forms.JAXSIM_DOT, dense_forms.RAW_DOT,
                                           dense_forms.NUMPY_DOT}
  sweep = p["studies"]["xla_flags"]
  assert [r["setting"] for r in sweep["rows"]] == list(dense_forms.QUICK_SETTINGS)
  default = sweep["rows"][0]
  assert default["status"] == "ok" and default["max_abs_diff"] < 1e-5
  assert default["matmul_gflops"] == pytest.approx(2 * 64**2 * 512 / 1e9 / default["matmul_s"])
  # What the parent ran under is recorded (here the test's 8-device flag).
  assert set(sweep["flags_in_effect"]) == {"XLA_FLAGS", "GLIBC_TUNABLES"}


def test_attention_training_runs_optax_and_learns_the_scale():
  losses, accuracy, scale = attention_demo.train(0, kind="cosine", learned=True, steps=2)
  losses = np.asarray(losses)
  assert losses.shape == (2,) and np.all(np.isfinite(losses))
  assert 0.0 <= float(accuracy) <= 1.0
  # Adam moves the learned inverse temperature away from its initial 10 at once.
  assert float(scale) != pytest.approx(10.0, abs=1e-4) and float(scale) > 0


# --- report -----------------------------------------------------------------------------


def test_report_writes_every_table_between_its_markers(results, tmp_path):
  # Runs after the module tests above (file order), from the JSON they wrote.
  readme = tmp_path / "README.md"
  names = list(report.TABLES)
  readme.write_text("intro\n" + "".join(f"<!-- report:{n} -->\nold\n<!-- /report:{n} -->\n"
                                        for n in names) + "end\n")
  assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
  assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
  text = readme.read_text()
  assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
  assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
  p = json.loads((results / "scaling.json").read_text())
  fastest = min(_ok(p, "n_sweep").values(), key=lambda r: r["median_s"])
  assert harness.fmt_seconds(fastest["median_s"]) in text
  assert "python -m experiments.scaling --repeats 1" in text  # the command, without --out
  assert p["environment"]["processor"] in text


def test_report_leaves_a_table_without_json_alone(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("<!-- report:scaling -->\nkept\n<!-- /report:scaling -->\n")
  assert report.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
  assert "kept" in readme.read_text()


# --- harness ------------------------------------------------------------------------------


def _tiny_bench(candidates, **kw):
  def setup(point, ctx):
    return harness.Case(x=np.full(point["n"], 2.0))

  return Benchmark(name="tiny", title="tiny", grid=Grid(quick={"n": [3]}, full={"n": [3, 5]}),
                   setup=setup, candidates=candidates,
                   check=harness.close_to(lambda c: c.x * 2), **kw)


def test_harness_a_new_benchmark_is_a_declaration(tmp_path, capsys):
  bench = _tiny_bench([Candidate("double", lambda c: c.x * 2),
                       Candidate("add", lambda c: c.x + c.x)],
                      baseline="add", work=lambda p: p["n"], rate_unit="items/s",
                      targets=[Target("double", "add", at_least=1e-9)])
  study = Study("extra", "An untimed part", run=lambda ctx: {"seed": ctx.seed},
                summary=lambda r: f"seed was {r['seed']}", passed=lambda r: True)
  p = harness.main([bench, study], name="tiny", argv=[*TINY, "--out", str(tmp_path)])
  assert [r["n"] for r in p["benchmarks"]["tiny"]["rows"]] == [3, 3, 5, 5]  # the full grid
  assert p["studies"]["extra"] == {"seed": 0, "passed": True}
  assert p["benchmarks"]["tiny"]["targets"][0]["met"]
  out = capsys.readouterr().out
  # The table first, then the labelled checks with the measured ratio.
  assert out.index("candidate") < out.index("Checks") < out.index("double speed / add")
  assert "seed was 0" in out and "[FAIL]" not in out
  assert json.loads((tmp_path / "tiny.json").read_text())["schema"] == harness.SCHEMA
  assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_harness_does_not_time_a_wrong_candidate_and_fails_the_run(tmp_path):
  timed = []
  bench = _tiny_bench([Candidate("right", lambda c: timed.append("right") or c.x * 2),
                       Candidate("wrong", lambda c: timed.append("wrong") or c.x * 3),
                       Candidate("wrong shape", lambda c: c.x[:2] * 2),
                       Candidate("nan", lambda c: c.x * np.nan)])
  with pytest.raises(SystemExit) as err:
    harness.main([bench], name="tiny", argv=[*TINY, "--quick", "--out", str(tmp_path)])
  assert err.value.code == 1
  p = json.loads((tmp_path / "tiny.json").read_text())
  rows = {r["candidate"]: r for r in p["benchmarks"]["tiny"]["rows"]}
  assert rows["wrong"]["status"] == "check failed" and rows["wrong"]["error"] == 2.0
  assert rows["wrong shape"]["error"] == "inf" and rows["nan"]["error"] == "nan"
  assert {r["status"] for n, r in rows.items() if n != "right"} == {"check failed"}
  assert rows["right"]["status"] == "ok" and not p["checks_passed"]
  assert timed.count("wrong") == 1  # the check's call only


def test_harness_a_missing_library_makes_its_candidate_unavailable(tmp_path, capsys):
  def needs_a_missing_library(c):
    import a_library_that_is_not_installed  # noqa: F401

  bench = _tiny_bench([Candidate("a", lambda c: c.x * 2),
                       Candidate("missing", needs_a_missing_library)])
  p = harness.main([bench], name="tiny", argv=[*TINY, "--quick", "--out", str(tmp_path)])
  rows = {r["candidate"]: r for r in p["benchmarks"]["tiny"]["rows"]}
  assert rows["a"]["status"] == "ok" and p["checks_passed"]
  assert rows["missing"]["status"] == "unavailable"
  assert "a_library_that_is_not_installed" in rows["missing"]["reason"]
  assert "not installed" in capsys.readouterr().out


def test_harness_candidates_when_and_only(tmp_path):
  bench = _tiny_bench([Candidate("a", lambda c: c.x * 2),
                       Candidate("b", lambda c: c.x * 2, when=lambda p: p["n"] > 3)])
  p = harness.main([bench], name="tiny", argv=[*TINY, "--out", str(tmp_path)])
  status = [(r["n"], r["candidate"], r["status"]) for r in p["benchmarks"]["tiny"]["rows"]]
  assert status == [(3, "a", "ok"), (3, "b", "skipped"), (5, "a", "ok"), (5, "b", "ok")]
  p = harness.main([bench], name="tiny", argv=[*TINY, "--candidates", "b", "--grid", "n=7",
                                               "--out", str(tmp_path)])
  assert [(r["n"], r["candidate"]) for r in p["benchmarks"]["tiny"]["rows"]] == [(7, "b")]
  with pytest.raises(SystemExit):
    harness.main([bench], name="tiny", argv=["--only", "nope", "--out", str(tmp_path)])


@pytest.mark.parametrize("measure,goal,met", [("at_least", 1.9, True), ("at_least", 2.1, False),
                                              ("at_most", 0.55, True), ("at_most", 0.45, False)])
def test_harness_targets_judge_the_ratio_of_one_run(measure, goal, met):
  rows = [{"n": n, "candidate": c, "status": "ok", "median_s": s, "min_s": s / m, "noisy": n == 8}
          for n in (4, 8) for c, s, m in (("fast", 1.0, 2.0), ("slow", 2.0, 1.0))]
  rows.append({"n": 16, "candidate": "fast", "status": "skipped"})
  t = harness.judge(Target("fast", "slow", **{measure: goal}), rows)
  assert [p["n"] for p in t["points"]] == [4, 8] and t["met"] is met
  assert [p["value"] for p in t["points"]] == [2.0, 2.0] if measure == "at_least" else [0.5, 0.5]
  assert [p["noisy"] for p in t["points"]] == [False, True]
  # The fastest samples: 0.5 s against 2 s.
  assert [p["best"] for p in t["points"]] == ([4.0, 4.0] if measure == "at_least" else [0.25, 0.25])
  assert "fastest samples" in harness.describe_target(t)
  t = harness.judge(Target("fast", "slow", at_least=1.0, where=lambda p: p["n"] > 4), rows)
  assert [p["n"] for p in t["points"]] == [8]


def test_harness_target_needs_one_goal():
  with pytest.raises(ValueError, match="exactly one"):
    Target("a", "b")


def test_harness_flags_wide_spreads_as_noisy(tmp_path, monkeypatch):
  samples = iter([1.0, 1.0, 3.0, 1.0, 1.0, 1.0] * 10)
  monkeypatch.setattr(harness, "_sample", lambda fn, number: next(samples))
  monkeypatch.setattr(harness, "load_average", lambda: [0.0, 0.0, 0.0])
  bench = _tiny_bench([Candidate("a", lambda c: c.x * 2), Candidate("b", lambda c: c.x * 2)])
  p = harness.main([bench], name="tiny", argv=["--repeats", "3", "--min-sample-s", "0",
                                               "--quick", "--out", str(tmp_path)])
  rows = {r["candidate"]: r for r in p["benchmarks"]["tiny"]["rows"]}
  # Round robin a, b, | b, a | a, b: a gets 1, 1, 1 and b gets 1, 3, 1.
  assert rows["a"]["samples_s"] == [1.0, 1.0, 1.0] and not rows["a"]["noisy"]
  assert rows["b"]["noisy"] and p["noisy"]
  assert "1 of 2 tiny timings are noisy" in p["warnings"][0]


def test_harness_compare_rotates_the_round_robin_start():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
  res = harness.compare(fns, repeats=3, warmup=0, min_sample_s=0.0)
  assert set(res) == set("abc") and all(t["samples"] == 3 for t in res.values())
  timed = calls[-9:]  # one call per sample once `number` is 1
  assert [timed[0], timed[3], timed[6]] == ["a", "b", "c"]


def test_harness_grid_is_the_product_of_its_axes_with_overrides():
  g = Grid(quick={"n": [1, 2], "d": [8]}, full={"n": [1, 2, 3], "d": [8, 16]})
  assert g.points(True) == [{"n": 1, "d": 8}, {"n": 2, "d": 8}]
  assert len(g.points(False)) == 6
  assert g.points(True, {"d": [4, 5], "other": [1]}) == [
      {"n": 1, "d": 4}, {"n": 1, "d": 5}, {"n": 2, "d": 4}, {"n": 2, "d": 5}]


def test_harness_memory_probes_see_the_allocations():
  x = np.ones((64, 4), np.float32)
  assert harness.traced_peak_bytes(lambda: x @ x.T) >= 64 * 64 * 4
  import jax
  import torch

  t = torch.from_numpy(x)
  # The post's function holds four (64, 64) float32 temporaries together at its end.
  assert harness.torch_peak_bytes(lambda: seed_table.torch_matrix_cosine(t)) >= 4 * 64 * 64 * 4
  spec = jax.ShapeDtypeStruct((64, 4), np.float32)
  assert harness.xla_peak_bytes(jax.jit(lambda a: a @ a.T), spec) >= 64 * 64 * 4
