"""The benchmark harness keeps working (tiny sizes; no timing assertions)."""

import json

from benchmarks.__main__ import main


def test_quick_zoo_train_benchmark_writes_results(tmp_path):
  assert main(["--quick", "--only", "zoo_train", "--out", str(tmp_path)]) == 0
  (path,) = tmp_path.glob("*.json")
  res = json.loads(path.read_text())
  bench = res["benchmarks"]["zoo_train"]
  assert res["machine"]["backend"] == "cpu" and bench["quick"]
  assert {(r["arch"], r["strategy"]) for r in bench["rows"]} >= {("mlp", "vmap"), ("mlp", "map"),
                                                                  ("cnn_s", "vmap"),
                                                                  ("cnn_s", "map")}
  assert all(r["model_steps_per_s"] > 0 for r in bench["rows"])
  assert "cnn_s_im2col_vs_xla_conv_map" in bench["ratios"]
  assert path.with_suffix(".md").read_text().startswith("# Benchmarks on")
