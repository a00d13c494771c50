"""The accelerator check (experiments/accelerator.py): end to end on CPU at tiny sizes,
its JSON schema, and the pieces its verdicts rest on (peak table, sizes, error measure,
section isolation, the attention adapter)."""

import inspect
import json
import math

import numpy as np
import pytest

import jaxsim
from experiments import accelerator

ROW_KEYS = {
    "correctness": {"function", "dtype", "rel_error", "tolerance", "passed"},
    "allpairs": {"candidate", "dtype", "n", "d", "seconds", "tflops", "vs_raw",
                 "fraction_of_peak", "temp_bytes"},
    "topk": {"candidate", "dtype", "q", "n", "d", "k", "seconds", "tflops", "fraction_of_raw",
             "temp_bytes"},
    "attention": {"candidate", "pass", "dtype", "B", "T", "S", "N", "H", "seconds", "tflops",
                  "vs_baseline", "baseline", "temp_bytes"},
}


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path, capsys):
  accelerator.main(["--tiny", "--out", str(tmp_path)])
  path = tmp_path / "accelerator.json"
  assert [p.name for p in tmp_path.iterdir()] == ["accelerator.json"]  # no temporary left
  payload = json.loads(path.read_text())
  assert payload["experiment"] == "accelerator"
  assert payload["environment"]["backend"] == "cpu"
  res = payload["results"]
  assert res["mode"] == "tiny" and res["backend"] == "cpu" and res["device_kind"]
  assert res["versions"]["jax"] and res["peak_tflops"] is None
  assert res["defaults"]["corpus_block"] > 0 and res["sizes"]["allpairs_n"] > 0
  assert list(res["sections"]) == list(accelerator.SECTIONS)
  sizes = res["sizes"]
  for name, section in res["sections"].items():
    assert section["status"] == "ok", (name, section.get("error"))
    assert section["seconds"] > 0 and section["rows"], name
    for row in section["rows"]:
      assert ROW_KEYS[name] <= set(row), (name, row)
      if "seconds" in row:
        assert row["seconds"] > 0 and row["tflops"] > 0
  # Correctness: one row per public function and dtype, every one passed.
  corr = res["sections"]["correctness"]
  functions = {r["function"] for r in corr["rows"]}
  assert len(corr["rows"]) == len(functions) * len(sizes["check_dtypes"])
  for public in ("dot", "cosine", "scaled_dot", "sq_euclidean", "euclidean", "pairs_above",
                 "similarity_stats"):
    assert public in functions
  assert any(f.startswith("topk") for f in functions)
  assert any(f.startswith("pairwise") for f in functions)
  for fn in ("attention_scores", "attention_weights", "attention"):
    assert any(f.startswith(fn + "(") for f in functions), fn
  public = {n for n in jaxsim.__all__ if inspect.isfunction(getattr(jaxsim, n))}
  assert set(corr["unchecked"]) == public - {f.split("(")[0] for f in functions}
  assert corr["passed"] and all(r["passed"] and r["rel_error"] < r["tolerance"]
                                for r in corr["rows"])
  # Timed sections: every candidate, with ratios consistent with the seconds.
  ap = res["sections"]["allpairs"]["rows"]
  assert {r["candidate"] for r in ap} == {"jaxsim.cosine", "raw matmul"}
  raw = {r["dtype"]: r["seconds"] for r in ap if r["candidate"] == "raw matmul"}
  for r in ap:
    assert r["vs_raw"] == pytest.approx(raw[r["dtype"]] / r["seconds"])
    assert r["tflops"] == pytest.approx(2 * r["n"] ** 2 * r["d"] / r["seconds"] / 1e12)
  tk = res["sections"]["topk"]["rows"]
  assert {r["candidate"] for r in tk} == {"jaxsim.topk", "raw matmul",
                                          "dense matmul + lax.top_k"}
  att = res["sections"]["attention"]
  names = {r["candidate"] for r in att["rows"]}
  for metric in sizes["attention_metrics"]:
    assert {f"jaxsim {metric} dense", f"jaxsim {metric} blocked"} <= names
  assert "jax.nn xla scaled_dot" in names and not att["errors"]
  assert {r["pass"] for r in att["rows"]} == {"forward", "forward+backward"}
  assert att["agreement"] and all(a["passed"] and a["rel_error"] <= 2e-5
                                  for a in att["agreement"].values())
  for name in ("allpairs", "topk", "attention"):
    assert res["sections"][name]["agreement_passed"], name
    assert not res["sections"][name]["errors"], name
  # Checks: correctness and agreement pass; the speed targets apply on accelerators
  # only, so none of them passes or fails on CPU.
  checks = {c["check"]: c["passed"] for c in res["checks"]}
  agreement = [c for c in checks if "agree" in c or c.startswith("correctness")]
  assert len(agreement) == 4 and all(checks[c] is True for c in agreement)
  assert all(passed is None for c, passed in checks.items() if c not in agreement)
  assert len(checks) > len(agreement)
  out = capsys.readouterr().out
  assert "correctness" in out and "checks" in out and "backend=cpu" in out


def test_failing_section_is_recorded_and_budget_skips():
  def broken():
    raise RuntimeError("cuDNN said no")

  data = accelerator.run_section("attention", broken, deadline=math.inf)
  assert data["status"] == "error" and "cuDNN said no" in data["error"]
  assert data["rows"] == [] and "RuntimeError" in data["traceback"]
  skipped = accelerator.run_section("topk", lambda: {"rows": [1]}, deadline=-math.inf)
  assert skipped["status"] == "skipped" and skipped["rows"] == []
  ok = accelerator.run_section("topk", lambda: {"rows": [1]}, deadline=math.inf)
  assert ok["status"] == "ok" and ok["rows"] == [1]


def test_a_failing_dtype_keeps_the_others():
  def one(dtype):
    if dtype == "bfloat16":
      raise MemoryError("RESOURCE_EXHAUSTED")
    return [{"dtype": dtype}], {"passed": True}

  data = accelerator.per_dtype(("float32", "bfloat16"), one)
  assert data["rows"] == [{"dtype": "float32"}] and data["agreement_passed"]
  assert "RESOURCE_EXHAUSTED" in data["errors"]["bfloat16"]
  with pytest.raises(RuntimeError, match="every dtype failed"):
    accelerator.per_dtype(("bfloat16",), one)


def test_checks_apply_only_on_accelerators():
  results = {"sections": {
      "allpairs": {"status": "ok", "rows": [
          {"candidate": "jaxsim.cosine", "dtype": "bfloat16", "fraction_of_peak": 0.72}]},
      "topk": {"status": "ok", "rows": [
          {"candidate": "jaxsim.topk", "dtype": "bfloat16", "fraction_of_raw": 0.5}]},
      "attention": {"status": "ok", "rows": [
          {"candidate": "jaxsim cosine blocked", "pass": "forward", "vs_baseline": 1.2,
           "baseline": "jax.nn cudnn scaled_dot"}]},
  }}
  on_gpu = accelerator.checks(results, "gpu")
  assert [c["passed"] for c in on_gpu] == [True, False, True]
  assert all(c["passed"] is None for c in accelerator.checks(results, "cpu"))
  results["sections"]["topk"]["status"] = "error"
  assert len(accelerator.checks(results, "gpu")) == 2
  # Candidates that disagree fail a check on every backend, CPU included.
  results["sections"]["allpairs"]["agreement_passed"] = False
  for backend in ("cpu", "gpu"):
    first = accelerator.checks(results, backend)[0]
    assert first["check"].startswith("allpairs") and first["passed"] is False


@pytest.mark.parametrize("kind, bf16", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
])
def test_peak_table_matches_the_most_specific_name(kind, bf16):
  rates = accelerator.peak_tflops(kind)
  assert rates["bfloat16"] == bf16
  assert 0 < rates["float32"] <= rates["bfloat16"]


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA GeForce GTX 1080", "Interpreter"])
def test_unknown_devices_have_no_peak(kind):
  assert accelerator.peak_tflops(kind) is None


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("gib", [8, 16, 24, 30, 60, 80, 105])
def test_accelerator_sizes_fit_the_device_memory(backend, gib):
  memory = gib << 30
  s = accelerator.plan(backend, memory, "full")
  # Each section's largest temporary takes at most a third of the device's memory.
  assert s.topk_q * s.topk_n * 4 <= memory // 3 or s.topk_n == 1 << 16
  assert s.allpairs_n**2 * 4 <= memory // 3 or s.allpairs_n == 4096
  b, t, heads, _ = s.attention
  assert b * heads * t * t * 16 <= memory // 3 or b == 1
  if gib >= 60:  # the GPU sizes, on an H100 with XLA's default 75% of 80 GiB
    assert (s.topk_q, s.topk_n, s.topk_d) == (4096, 1 << 20, 768)
  assert s.attention_dtype == "bfloat16" and "bfloat16" in s.dtypes
  assert ("float16" in s.check_dtypes) == (backend == "gpu")


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_cpu_sizes_reach_fused_paths(mode):
  s = accelerator.plan("cpu", None, mode)
  assert s.check_rows >= 512 and s.allpairs_n >= 512 and s.topk_n > 4096
  assert set(s.check_attention_metrics) == set(s.attention_metrics) == {"dot", "scaled_dot",
                                                                          "cosine"}


def test_rel_error_is_relative_to_the_reference_scale():
  want = np.array([[2.0, -4.0], [1.0, 0.5]])
  assert accelerator.rel_error(want, want) == 0.0
  assert accelerator.rel_error(want + 0.04, want) == pytest.approx(0.01)
  assert accelerator.rel_error(np.zeros(3), np.zeros(3)) == 0.0
  assert accelerator.rel_error(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == math.inf
  with pytest.raises(ValueError, match="shape"):
    accelerator.rel_error(want[0], want)
