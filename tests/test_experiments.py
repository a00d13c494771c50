"""The experiment scripts, end to end at tiny sizes, and the helpers their claims rest on.

Each script runs in-process into a `tmp_path`; the tests check the JSON and PNG files it
writes and that the correctness checks inside it passed. Timings are not tested.
"""

import json

import numpy as np
import pytest

from experiments import embedding_stats, scaling, seed_table
from tests import reference


def _load(path):
  payload = json.loads(path.read_text())
  assert payload["environment"]["backend"] == "cpu"
  assert payload["environment"]["versions"]["jax"]
  return payload["results"]


def _is_png(path):
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- seed_table -------------------------------------------------------------------------


def test_seed_table_end_to_end(tmp_path, capsys):
  seed_table.main(["--n", "12", "--d", "5", "--quick", "--out", str(tmp_path)])
  res = _load(tmp_path / "seed_table.json")
  assert res["checks"]["passed"] and all(res["checks"]["reference"].values())
  names = set(res["timings"])
  assert {*seed_table.LOOPS, "sklearn", seed_table.NUMPY_MATRIX, seed_table.SEED_TORCH,
          seed_table.JAXSIM} <= names
  assert all(t["median"] > 0 for t in res["timings"].values())
  out = capsys.readouterr().out
  assert f"{seed_table.JAXSIM} within" in out and "jaxsim x" in out


@pytest.mark.parametrize("n", [1, 7])
def test_seed_table_candidates_agree_with_float64_reference(n):
  data = np.random.default_rng(n).random((n, 4), dtype=np.float32)
  fns = seed_table.candidates(data)
  for name, fn in fns.items():
    np.testing.assert_allclose(seed_table.to_numpy(fn()), reference.cosine(data, data),
                               rtol=1e-5, atol=1e-6, err_msg=name)


def test_seed_table_check_catches_a_wrong_candidate():
  data = np.random.default_rng(0).random((6, 3), dtype=np.float32)
  good = lambda: reference.cosine(data, data)
  wrong = lambda: reference.cosine(data, data) + 1e-4
  res = seed_table.check({"good": good, "wrong": wrong}, reference.cosine(data, data))
  assert not res["passed"]
  assert res["reference"] == {"good": True, "wrong": False}
  assert res["pairs"] == {"good | wrong": False}


# --- scaling ------------------------------------------------------------------------------


def test_scaling_end_to_end(tmp_path, capsys):
  scaling.main(["--quick", "--out", str(tmp_path), "--repeats", "1", "--ns", "32,64",
                "--d", "8", "--ds", "4,16", "--n-for-d", "48", "--topk-ns", "200",
                "--k", "3"])
  res = _load(tmp_path / "scaling.json")
  assert res["checks_passed"]
  assert _is_png(tmp_path / "scaling.png") and _is_png(tmp_path / "scaling_d.png")
  cands = {scaling.JAXSIM, scaling.RAW, scaling.TORCH, scaling.NUMPY, scaling.SKLEARN}
  for part, axis, values in (("n_sweep", "n", {32, 64}), ("d_sweep", "d", {4, 16})):
    rows = res[part]
    assert {r[axis] for r in rows} == values
    assert {r["candidate"] for r in rows} == cands
    for r in rows:
      assert r["seconds"] > 0 and r["peak_bytes"] > 0
      assert r["gflops"] == pytest.approx(2 * r["n"] ** 2 * r["d"] / r["seconds"] / 1e9)
  # Peak memory includes the (n, n) float32 output, for every candidate.
  assert all(r["peak_bytes"] >= 4 * r["n"] ** 2 for r in res["n_sweep"])
  topk = {r["candidate"]: r for r in res["topk"]}
  assert topk[scaling.TOPK]["passed"] and topk[scaling.TOPK]["check_err"] < 1e-5
  assert scaling.DENSE_TOPK in topk
  assert set(res["exponents"]["n"]) == cands
  lat = res["latency"]
  assert lat["checks"]["passed"] and lat["n"] == 50 and lat["d"] == 64
  # The default-dispatch headline is always there; on CPU the sync rows come from a child.
  assert "seed_size_latency" in res["targets"]
  assert res["latency_sync_dispatch"]["async_dispatch"] is False
  assert res["latency"]["async_dispatch"] is True
  out = capsys.readouterr().out
  assert "Targets (measured in this run)" in out and "CPU sync dispatch" in out


def test_scaling_growth_exponent_recovers_known_powers():
  rows = [{"candidate": "sq", "n": n, "seconds": 3e-9 * n**2} for n in (64, 128, 512)]
  rows += [{"candidate": "lin", "n": n, "seconds": 1e-6 * n} for n in (64, 128, 512)]
  fits = scaling.growth_exponents(rows, "n")
  assert fits["sq"]["exponent"] == pytest.approx(2.0)
  assert fits["lin"]["exponent"] == pytest.approx(1.0)
  assert fits["sq"]["from"] == 64 and fits["sq"]["to"] == 512


def test_scaling_targets_judge_each_head_to_head_ratio():
  rate = [{"n": 1024, "ratio": 0.1}, {"n": 2048, "ratio": 0.96}, {"n": 4096, "ratio": 0.9}]
  lat = {"async_dispatch": True, "us": {seed_table.JAXSIM: 10.0, seed_table.SEED_TORCH: 13.0,
                                        seed_table.NUMPY_MATRIX: 11.0}}
  t = scaling.targets(lat, None, rate)
  rate = t["rate_vs_raw_matmul"]
  assert [p["n"] for p in rate["points"]] == [2048, 4096]  # N < 2048 is not judged
  assert [p["passed"] for p in rate["points"]] == [True, False] and not rate["pass"]
  # 1.3x faster than torch but only 1.1x faster than numpy: the target needs both.
  assert not t["seed_size_latency"]["pass"]
  assert "seed_size_latency_sync_dispatch" not in t


def test_scaling_peak_memory_measures_allocations():
  x = np.ones((64, 4), np.float32)
  # numpy: the (64, 64) float32 product at least; torch: the seed function's four
  # (64, 64) float32 temporaries are alive together at its end.
  assert scaling.traced_peak_bytes(lambda: x @ x.T) >= 64 * 64 * 4
  import torch

  t = torch.from_numpy(x)
  assert scaling.torch_peak_bytes(lambda: seed_table.torch_matrix_cosine(t)) >= 4 * 64 * 64 * 4


# --- embedding_stats ----------------------------------------------------------------------


@pytest.fixture
def small_table(tmp_path):
  rng = np.random.default_rng(3)
  table = rng.standard_normal((150, 12)).astype(np.float32) + 0.3  # skewed: mostly positive
  path = tmp_path / "table.npy"
  np.save(path, table)
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(f"tok{i}" for i in range(150)) + "\n", encoding="utf-8")
  return table, path, vocab


def test_embedding_stats_end_to_end_on_a_table_file(tmp_path, small_table, capsys):
  table, path, vocab = small_table
  out = tmp_path / "out"
  embedding_stats.main(["--table", str(path), "--vocab", str(vocab), "--token", "tok7",
                        "--top", "4", "--bins", "40", "--out", str(out)])
  res = _load(out / "embedding_stats.json")
  assert _is_png(out / "embedding_stats.png")
  assert res["check"]["passed"]
  s = reference.cosine(table, table)[np.triu_indices(150, k=1)]
  assert res["table"]["count"] == s.size == sum(res["table"]["histogram"])
  assert res["share_nonnegative"] == pytest.approx(np.mean(s >= 0), abs=1e-6)
  assert res["table"]["mean"] == pytest.approx(s.mean(), abs=1e-5)
  assert res["table"]["max"] == pytest.approx(s.max(), abs=1e-5)
  assert 0.3 < res["share_nonnegative_random"] < 0.7
  opp = res["opposed"]
  row = reference.cosine(table[7:8], table)[0]
  want = np.argsort(row, kind="stable")[:4]
  assert [r["index"] for r in opp["most_negative"]] == want.tolist()
  assert [r["token"] for r in opp["most_negative"]] == [f"tok{i}" for i in want]
  np.testing.assert_allclose([r["cosine"] for r in opp["most_negative"]], row[want], atol=1e-5)
  assert 7 not in [r["index"] for r in opp["most_similar"]]
  assert "Tokens most opposed to 'tok7'" in capsys.readouterr().out


def test_embedding_stats_subset_of_the_minilm_table(tmp_path):
  embedding_stats.main(["--max-rows", "200", "--top", "3", "--bins", "20", "--out",
                        str(tmp_path)])
  res = _load(tmp_path / "embedding_stats.json")
  assert res["full_shape"] == [30522, 384] and res["shape"] == [200, 384]
  assert res["rows_subset"] and res["check"]["passed"]
  assert res["table"]["count"] == 200 * 199 // 2
  assert res["opposed"]["token"] == "good" and len(res["opposed"]["most_negative"]) == 3


def test_embedding_stats_check_catches_wrong_statistics(monkeypatch):
  import jaxsim

  real = jaxsim.similarity_stats
  monkeypatch.setattr(jaxsim, "similarity_stats",
                      lambda *a, **k: real(*a, **k)._replace(mean=real(*a, **k).mean + 1e-3))
  table = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
  res = embedding_stats.check(table, bins=10, rng=np.random.default_rng(0))
  assert not res["passed"] and not res["ok"]["mean"] and res["ok"]["count"]


@pytest.mark.parametrize("bins", [50, 400])
def test_histogram_median_is_within_a_bin_of_the_median(bins):
  v = np.random.default_rng(1).normal(0.1, 0.2, size=20001).clip(-1, 1)
  hist, edges = np.histogram(v, bins=bins, range=(-1, 1))
  got = embedding_stats.histogram_median(hist, edges)
  assert abs(got - np.median(v)) <= 2.0 / bins


def test_embedding_stats_rejects_unknown_token():
  with pytest.raises(ValueError, match="--token 'nope'"):
    embedding_stats.token_index("nope", ["a", "b"], 2)


# --- harness ------------------------------------------------------------------------------


def test_harness_compare_rotates_the_round_robin_start():
  from experiments import harness

  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
  res = harness.compare(fns, repeats=3, warmup=0, min_sample_s=0.0)
  assert set(res) == set("abc") and all(t["samples"] == 3 for t in res.values())
  timed = calls[-9:]  # one call per sample once `number` is 1
  assert [timed[0], timed[3], timed[6]] == ["a", "b", "c"]
