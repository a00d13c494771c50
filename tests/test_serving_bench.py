"""experiments/serving_bench.py end to end at its tiny quick size (timings are not tested)."""

import json

import pytest

pytest.importorskip("faiss")


@pytest.mark.slow
def test_serving_bench_quick(tmp_path, capsys):
  from experiments import serving_bench

  results = serving_bench.main(["--quick", "--out", str(tmp_path), "--repeats", "2",
                                "--min-sample-s", "0", "--idle-s", "0"])
  payload = json.loads((tmp_path / "serving_bench.json").read_text())
  assert payload["results"]["n"] == results["n"]
  compiles = results["compiles"]
  assert 0 < compiles["batch_compiles"] <= compiles["batch_target"]
  assert 0 < compiles["round_compiles"] <= compiles["round_target"]
  assert compiles["final_rows"] == compiles["start_rows"] + sum(compiles["add_sizes"])
  for row in results["rows"]:
    # The fast answer must be the right one: the same ids as topk, the same sets as faiss.
    assert row["agreement"]["index_vs_topk_identical_order"] == 1.0
    assert row["agreement"]["index_vs_faiss_identical_sets"] == 1.0
    assert set(row["timings_s"]) == {serving_bench.INDEX, serving_bench.TOPK,
                                     *serving_bench.FAISS_ALL}
  out = capsys.readouterr().out
  assert "target index_over_topk >= 1.3" in out and "compiles:" in out
