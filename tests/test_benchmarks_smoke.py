"""The benchmark harness keeps working (``--quick`` sizes, smaller still; no timing assertions).

The suite (every section but align_train) runs once per module, here with the 8 forced devices of
the test session, so the sharded probe, index and training paths are exercised too: 174 s on a
2-core AMD EPYC shared with other work, where the earlier smoke sizes took 382 s measured right
after it; compilations are most of it. The tests check its structure, the correctness checks it
records and that every fraction of a peak is a true bound, not its figures, so the run is cut to
what exercises every path once (``smoke_sizes``): each section still runs end to end and writes
its rows.
"""

import json

import jax
import numpy as np
import pytest

from benchmarks import __main__ as bench
from benchmarks import common, probe, torch_models

# align_train is left out of the smoke run: its check (1 and 8 devices train the same model) is
# tests/test_align.py::test_one_and_eight_devices_agree, and its compilations cost a minute here.
SECTIONS = ("peak", "probe", "knowledge_scaling", "boundary", "retrieval", "query", "zoo_train")
# knowledge_scaling's zoo here: one small stack of 3 models (split 2 + 1 between 2 processes). Its
# --quick zoo, the demo families, takes minutes of process starts and compilations, and every
# worker process compiles each stack's initialisation anew (seconds per family on 2 cores).
SMALL_ZOO = {"mlp-k4": 3}
# knowledge_scaling's (processes, devices per process) here: the 1-process 1-device run every row
# is compared with, and 2 processes on loopback (the multi-process launch, split and exchange,
# checked equal to 1 device bit for bit). Its --quick 1-process 8-device row is left out: one more
# worker process, for the sharded StackGroup that the boundary section runs here in-process.
SCALING_CONFIGS = ((1, 1), (2, 1))
# The probe: one per-model configuration per family and the headline (every method, family and
# input kind still runs). Its stacks have 4 models, as the boundary and zoo_train sections' do,
# so that each stack initialisation compiles once for the three sections (seconds each on 2
# cores). The per-model batch is a boundary-search step of a 4-way model (K (K - 1) = 12 images)
# and the headline probes cnn_s (not the heaviest family, cnn_l, as full runs do) on the
# boundary section's pool of 256 images: the boundary section then calls the same shapes,
# compiled.
PROBE_CONFIGS = [(4, 12, False)]
PROBE_HEADLINE = ("cnn_s", 4, 256, True)
# Retrieval at one index size, sharded over the 8 devices (ModelIndex shards from 8,192 rows), and
# the query counts the section's checks read (1 and 16); recall on 16 queries reuses the Q = 16
# compilations. The query section's probe pool: 960 images (the demo's 9,600 make its first call
# embed them all).
RETRIEVAL_SIZES = (10**4,)
RETRIEVAL_QUERIES = (1, 16)
QUERY_POOL = 960
# zoo_train's stacks: 4 models (see above) trained for 2 steps per timed call rather than 10 (the
# xla lowering's backward pass takes seconds per step here).
ZOO_TRAIN_SIZE = (4, 2)
# The timing helpers' repeats and samples: one timed call (after one untimed) or two samples per
# figure. The figures are not checked here; every timed path still runs.
TIMING_CAPS = {"time_call": dict(repeats=1, warmup=1),
               "compare": dict(repeats=1, warmup=1, min_repeats=1),
               "compare_latency": dict(samples=2, rounds=1, warmup=1, settle_s=0.0),
               "latency": dict(samples=2, min_samples=2, warmup=1)}


def _capped(fn, caps):
  """A timing helper of ``benchmarks.common`` called with ``caps`` in place of its arguments."""
  def timed(*args, **kwargs):
    return fn(*args, **(kwargs | caps))
  return timed


def smoke_sizes(mp: pytest.MonkeyPatch) -> None:
  """Shrinks the ``--quick`` run to the smoke test's sizes (the constants above)."""
  from benchmarks import boundary, knowledge_scaling, peak, query, retrieval, zoo_train
  mp.setattr(knowledge_scaling, "composition", lambda scale: dict(SMALL_ZOO))
  mp.setitem(knowledge_scaling.SIZES, "quick", dict(scale=1, pool=64, pool_batch=64))
  mp.setitem(knowledge_scaling.CONFIGS, "quick", SCALING_CONFIGS)
  mp.setitem(probe.CONFIGS, "quick", PROBE_CONFIGS)
  mp.setitem(probe.HEADLINE, "quick", PROBE_HEADLINE)
  mp.setitem(retrieval.SIZES, "quick", RETRIEVAL_SIZES)
  mp.setattr(retrieval, "QUERIES", RETRIEVAL_QUERIES)
  mp.setattr(retrieval, "RECALL_QUERIES", RETRIEVAL_QUERIES[-1])
  mp.setattr(query, "POOL", QUERY_POOL)
  mp.setattr(zoo_train, "QUICK_SIZE", ZOO_TRAIN_SIZE)
  for mod in (peak, probe, boundary, retrieval, query, zoo_train):
    for name, caps in TIMING_CAPS.items():
      if hasattr(mod, name):
        mp.setattr(mod, name, _capped(getattr(common, name), caps))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  with pytest.MonkeyPatch.context() as mp:
    smoke_sizes(mp)
    only = [a for s in SECTIONS[1:] for a in ("--only", s)]
    assert bench.main(["--quick", "--out", str(out), *only]) == 0
  (path,) = out.glob("*.json")
  return json.loads(path.read_text()), path


def test_results_files_and_headline(quick_run):
  res, path = quick_run
  assert path.name == f"{res['machine']['backend']}-cpu-quick.json"
  assert list(res["benchmarks"]) == list(SECTIONS)
  assert all(res["benchmarks"][s]["quick"] for s in SECTIONS)
  m = res["machine"]
  assert m["backend"] == "cpu" and m["num_devices"] == jax.device_count()
  assert {"jax", "flax", "numpy", "date", "cpu_model"} <= set(m)
  assert set(bench.HEADLINE_KEYS) <= set(res["headline"])
  # --quick stops at 10^4 vectors: the 10^6 retrieval figures are absent, never made up.
  assert res["headline"]["retrieval_1e6_vs_faiss"] is None
  assert res["headline"]["retrieval_1e6_fraction_of_bandwidth"] is None
  for key in ("probe_vs_torch_loop", "probe_fraction_of_peak", "query_p50_ms_1e4"):
    if key == "probe_vs_torch_loop" and m["torch"] is None:
      continue
    assert res["headline"][key] > 0
    detail = res["headline_detail"][key]
    assert detail["target"] and detail["baseline"] and detail["met"] in (True, False)
  md = path.with_suffix(".md").read_text()
  assert md.startswith("# Benchmarks on")
  assert md.index("## Headline") < md.index("## peak") < md.index("## zoo_train")


def test_peaks_are_used_by_every_benchmark(quick_run):
  res, _ = quick_run
  peaks = res["benchmarks"]["peak"]["peaks"]
  assert all(v > 0 for v in peaks.values())
  for s in SECTIONS[1:]:
    assert res["benchmarks"][s]["peak_used"] == peaks


def test_probe_rows_and_torch_equivalence(quick_run):
  res, _ = quick_run
  probe = res["benchmarks"]["probe"]
  methods = {r["method"] for r in probe["rows"]}
  assert {"vmap", "map", "loop"} <= methods
  assert {r["arch"] for r in probe["rows"]} == {"mlp", "cnn_s", "cnn_l"}
  assert {r["inputs"] for r in probe["rows"]} == {"shared", "per-model"}
  assert all(r["pairs_per_s"] > 0 and 0 < r["frac_peak"] <= 1 for r in probe["rows"])
  # The headline probes the full run's batch (the same figure), against a true bound.
  detail = res["headline_detail"]["probe_fraction_of_peak"]
  assert f"B={PROBE_HEADLINE[2]}" in detail["config"] and 0 < detail["value"] <= 1
  assert detail["peak_gflops_per_s"] >= max(detail["peak_benchmark_f32_gflops_per_s"],
                                            detail["fastest_probe_call_gflops_per_s"])
  if res["machine"]["torch"] is not None:
    assert any(mt.startswith("torch") for mt in methods)
    # The PyTorch baseline computes the same logits as the JAX stack.
    assert max(probe["torch_max_abs_logit_diff"].values()) < 1e-4


def test_every_fraction_of_a_peak_is_a_true_bound(quick_run):
  res, _ = quick_run
  peaks = res["benchmarks"]["peak"]["peaks"]
  assert peaks["f32_gflops_per_s"] == max(peaks["matmul_gflops_per_s"],
                                          peaks["conv_im2col_gflops_per_s"],
                                          peaks["conv_xla_gflops_per_s"])
  seen = 0
  for name, section in res["benchmarks"].items():
    for table in (v for v in section.values() if isinstance(v, list)):
      for row in (r for r in table if isinstance(r, dict)):
        for key in ("frac_peak", "auto_frac_peak", "fraction_of_bandwidth"):
          if row.get(key) is not None:
            assert 0 < row[key] <= 1, (name, key, row)
            seen += 1
  assert seen > 20


def test_knowledge_scaling_rows(quick_run):
  res, _ = quick_run
  k = res["benchmarks"]["knowledge_scaling"]
  rows = {(r["processes"], r["devices_per_process"]): r for r in k["rows"]}
  assert set(rows) == set(SCALING_CONFIGS)
  for r in rows.values():
    assert "error" not in r, r
    assert r["models"] == sum(SMALL_ZOO.values()) and r["models_per_s"] > 0
    assert r["tie_break_queries"] == 0  # every model cost N_pool + T K (K - 1) queries
  assert rows[(1, 1)]["speedup"] == 1 and rows[(2, 1)]["devices"] == 2
  # Two processes with one device each extract exactly what one process does.
  assert rows[(2, 1)]["same_as_1_device"] == 1
  head, detail = res["headline"], res["headline_detail"]
  assert head["knowledge_models_per_s"] == rows[(1, 1)]["models_per_s"]
  assert head["knowledge_2proc_efficiency"] == pytest.approx(rows[(2, 1)]["speedup"] / 2)
  # No 1-process multi-device row ran: that figure is absent, never made up.
  assert head["knowledge_scaling_efficiency"] is None
  # Forced CPU devices share the cores: no scaling target is claimed, and the note says why.
  assert detail["knowledge_scaling_efficiency"]["met"] is None
  assert "share" in k["note"]


def test_boundary_checks(quick_run):
  res, _ = quick_run
  b = res["benchmarks"]["boundary"]
  assert b["checks"]["queries_per_model_as_expected"]
  # The loop strategy probes the same models: it finds the same boundaries (up to a float
  # rounding that flips a near-tie midpoint, which would move one boundary by one step).
  assert b["checks"]["stack-loop_same_boundaries_fraction"] >= 0.95
  assert {r["method"] for r in b["rows"]} >= {"stack-auto", "stack-loop"}


def test_retrieval_methods_agree(quick_run):
  res, _ = quick_run
  r = res["benchmarks"]["retrieval"]
  assert {(row["models"], row["queries"]) for row in r["rows"]} == {
      (m, q) for m in RETRIEVAL_SIZES for q in RETRIEVAL_QUERIES}
  # The index's rows are sharded over the session's devices (the multi-device search).
  assert {row["shards"] for row in r["rows"] if row["method"].startswith("index")} == {
      jax.device_count()}
  assert {f"M{m}/index-int8_max_score_diff_of_found" for m in RETRIEVAL_SIZES} <= set(r["checks"])
  for key, diff in r["checks"].items():
    assert diff < (2e-2 if "bf16" in key else 1e-4), key
  assert all(row["p99_ms"] >= row["p50_ms"] > 0 for row in r["rows"])


def test_query_and_training_sections(quick_run):
  res, _ = quick_run
  q = res["benchmarks"]["query"]
  assert q["first_call_ms"] > 0 and q["rows"][0]["path"].startswith("end to end")
  z = res["benchmarks"]["zoo_train"]
  assert {(row["arch"], row["strategy"]) for row in z["rows"]} >= {
      ("mlp", "vmap"), ("mlp", "map"), ("cnn_s", "vmap"), ("cnn_s", "map")}
  assert "cnn_s_im2col_vs_xla_conv_map" in z["ratios"]


def test_headline_targets_and_merge():
  results = {"benchmarks": {"probe": {"quick": False, "headline": {
      "probe_vs_torch_loop": {"value": 2.5, "target": ">= 3"},
      "probe_fraction_of_peak": {"value": 0.6, "target": ">= 0.5"}}},
      "query": {"headline": {"query_p50_ms_1e4": {"value": 12.0, "target": "<= 20"}}}}}
  values, detail = bench.headline(results)
  assert values["probe_vs_torch_loop"] == 2.5 and values["retrieval_1e6_vs_faiss"] is None
  assert detail["probe_vs_torch_loop"]["met"] is False
  assert detail["probe_fraction_of_peak"]["met"] is True
  assert detail["query_p50_ms_1e4"]["met"] is True and detail["query_p50_ms_1e4"]["benchmark"] \
      == "query"


def test_devices_flag_cannot_change_an_initialised_backend():
  bench._set_devices(jax.device_count())  # the same count is fine
  with pytest.raises(SystemExit, match="already initialised"):
    bench._set_devices(jax.device_count() + 1)
  with pytest.raises(SystemExit):
    bench.main(["--devices", "0"])


@pytest.mark.parametrize("arch", ["mlp", "cnn_s", "cnn_l"])
def test_torch_models_match_the_jax_stack(arch):
  torch = pytest.importorskip("torch")
  from know2vec_jax import probe
  from know2vec_jax.zoo import train
  spec = train.StackSpec(arch, 3)
  params = train.init_stack(spec, [0, 1])
  x = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
  logits = probe.stack_logits(spec.graphdef(), params, x, strategy="loop")
  models = torch_models.torch_models(torch, arch, params)
  assert len(models) == 2
  assert torch_models.max_abs_diff(torch, models, x, logits) < 1e-4


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_map_probe_matches_loop(monkeypatch, shared):
  """The cache-sized chunks of the CPU ``map`` probe (a batch that is not a multiple of the
  chunk, so the padding path runs) give the per-model loop's logits."""
  from know2vec_jax import probe
  from know2vec_jax.zoo import train
  # The benchmark run's cnn_s stack shape (4 models, K = 4): its initialisation compiles once
  # in this module.
  spec = train.StackSpec("cnn_s", 4)
  params = train.init_stack(spec, [0, 1, 2, 3])
  rng = np.random.default_rng(0)
  x = rng.random((37, 28, 28, 1) if shared else (4, 37, 28, 28, 1), np.float32)
  monkeypatch.setattr(probe, "CHUNK_BYTES", 4 * 2**20)  # forces chunks of 16 images
  assert probe._chunk_size(spec.graphdef(), params, (28, 28, 1), False) == 16
  chunked = probe.stack_logits(spec.graphdef(), params, x, strategy="map")
  ref = probe.stack_logits(spec.graphdef(), params, x, strategy="loop")
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_a_run_that_fails_part_way_keeps_what_finished(tmp_path):
  """Results are written after every benchmark: a later benchmark's failure leaves the earlier
  ones' figures on disk, whole, beside the error."""
  from benchmarks import retrieval
  with pytest.MonkeyPatch.context() as mp:
    smoke_sizes(mp)

    def broken(**kwargs):
      raise RuntimeError("retrieval broke")
    mp.setattr(retrieval, "run", broken)
    with pytest.raises(RuntimeError, match="retrieval broke"):
      bench.main(["--quick", "--out", str(tmp_path), "--only", "retrieval"])
  (path,) = tmp_path.glob("*.json")
  res = json.loads(path.read_text())
  assert list(res["benchmarks"]) == ["peak"] and res["benchmarks"]["peak"]["peaks"]
  assert path.with_suffix(".md").read_text().startswith("# Benchmarks on")
  assert not list(tmp_path.glob("*.tmp*"))


def test_matched_threads_retrieval_pins_each_setting(monkeypatch):
  """The matched-threads comparison runs each setting in its own process pinned to its cores
  (faiss's rows and the headline only where faiss is installed)."""
  from benchmarks import retrieval_threads
  monkeypatch.setitem(retrieval_threads.SIZES, "quick", 1000)
  monkeypatch.setattr(retrieval_threads, "_cores", lambda: [1])
  res = retrieval_threads.run(quick=True)
  assert res["settings"] == [{"threads": 1, "cores": res["settings"][0]["cores"]}]
  assert len(res["settings"][0]["cores"]) == 1
  methods = {r["method"] for r in res["rows"]}
  assert {(r["queries"], r["threads"]) for r in res["rows"]} == {(1, 1), (64, 1)}
  assert all(r["p50_ms"] > 0 and r["models"] == 1000 for r in res["rows"])
  if "faiss" in methods:
    assert res["recall10"]["index-int8"] >= 0.99
    assert res["headline"]["retrieval_1e4_int8_vs_faiss_matched"]["value"] > 0
  else:
    assert methods == {"index-int8"} and res["headline"] == {}
