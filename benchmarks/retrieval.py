"""Retrieval: top-10 latency of :class:`ModelIndex` for M model vectors (E = 256), vs numpy and faiss.

For M in 10^3 .. 10^6 random unit vectors and Q in {1, 16, 256} queries at once, in the same
process:

- ``index-f32`` / ``index-bf16``: ``ModelIndex.search`` (jitted dot product + ``lax.top_k`` on the
  index's device copy; the public call, host-side checks and id lookup included);
- ``numpy``: ``q @ V.T`` then ``np.argpartition`` and a sort of the k best (float32), at the BLAS
  default thread count and (``numpy-1t``, via threadpoolctl) at one thread;
- ``faiss``: ``faiss.IndexFlatIP.search`` (float32; optional dependency), at its default thread
  count and at one thread, the faster kept (on a small shared CPU its OpenMP pool can lose more
  than it gains).

Methods are timed in interleaved blocks (:func:`benchmarks.common.compare_latency`) so that load
from elsewhere on a shared machine hits them alike, and none runs beside the still-spinning worker
threads of the one before. A brute-force scan must read every vector once per call, so
``M * E * bytes`` per latency is the achieved scan rate; it is reported against the memory
bandwidth measured in the same run (``fraction_of_bandwidth``: 1 = at the bound). With many queries the scan becomes a matmul, so the
FLOP rate against the matmul peak is reported as well. The index runs on the default single
device unless the process has several (``--devices``): the number of shards is in each row.

``breakdown`` splits one query at the largest M into its parts, timed interleaved: a plain scan
(``jnp.sum``) of the same float32 array, the jitted scores alone (f32 and bf16), ``lax.top_k``
alone on precomputed scores, and the whole ``ModelIndex.search``. The headline fraction of
bandwidth is the search against this interleaved scan (median against median: on a shared machine
a best-call peak and a median taken minutes apart can see very different loads); the fraction of
the peak benchmark's best-call bandwidth is beside it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import accelerator, compare_latency, optional, ratio
from know2vec_jax.index import ModelIndex

NAME = "retrieval"
E = 256
TOPK = 10
SIZES = {"quick": (10**3, 10**4), "cpu": (10**3, 10**4, 10**5, 10**6),
         "accel": (10**3, 10**4, 10**5, 10**6)}
QUERIES = (1, 16, 256)


def _numpy_search(vectors: np.ndarray, q: np.ndarray, k: int):
  scores = q @ vectors.T  # [Q, M]
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  top = np.take_along_axis(scores, part, axis=1)
  order = np.argsort(-top, axis=1, kind="stable")
  return np.take_along_axis(top, order, 1), np.take_along_axis(part, order, 1)


def _budget(m: int, quick: bool) -> tuple[int, float]:
  """(max samples, timed seconds per method) per latency measurement: many samples where calls
  are cheap, one per round where they are not."""
  if quick:
    return 20, 0.2
  return (150, 0.6) if m <= 10**5 else (30, 2.0)


def _breakdown(unit: np.ndarray, q: np.ndarray, index: ModelIndex, quick: bool) -> dict:
  """Where one query's time goes at this M (see the module docstring)."""
  dims = (((1,), (1,)), ((), ()))
  vd = jax.device_put(unit)
  vb = jax.device_put(unit.astype(jnp.bfloat16))
  qd = jax.device_put(q)
  scores = jax.jit(lambda q, v: jax.lax.dot_general(q.astype(v.dtype), v, dims,
                                                    preferred_element_type=jnp.float32))
  top_k = jax.jit(lambda s: jax.lax.top_k(s, TOPK))
  scan = jax.jit(jnp.sum)
  s = scores(qd, vd)
  fns = {"scan: jnp.sum of the f32 vectors": lambda: scan(vd),
         "scores alone (f32 dot)": lambda: scores(qd, vd),
         "scores alone (bf16 dot)": lambda: scores(qd, vb),
         "lax.top_k alone": lambda: top_k(s),
         "ModelIndex.search (f32)": lambda: index.search(q, TOPK)}
  lat = compare_latency(fns, samples=10 if quick else 30, budget_s=1.0 if quick else 3.0,
                        warmup=2, rounds=2 if quick else 3)
  nbytes = {"scan": 4, "scores alone (f32": 4, "scores alone (bf16": 2, "ModelIndex": 4}
  for name, d in lat.items():
    b = next((v for k, v in nbytes.items() if name.startswith(k)), None)
    d["scan_gbytes_per_s"] = (unit.shape[0] * unit.shape[1] * b / (d["p50_ms"] / 1e3) / 1e9
                              if b else None)
  return lat


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  size = "quick" if quick else ("accel" if accelerator() else "cpu")
  peak = (ctx or {}).get("peak", {})
  bw = peak.get("memory_gbytes_per_s")
  mm = peak.get("matmul_gflops_per_s")
  faiss = optional("faiss")
  threadpoolctl = optional("threadpoolctl")
  rng = np.random.default_rng(0)
  rows, builds, checks = [], [], {}
  for m in SIZES[size]:
    vecs = rng.standard_normal((m, E), dtype=np.float32)
    ids = [f"m{i}" for i in range(m)]
    queries = {q: rng.standard_normal((q, E), dtype=np.float32) for q in QUERIES}
    queries = {q: v / np.linalg.norm(v, axis=1, keepdims=True) for q, v in queries.items()}
    methods, indexes = {}, {}
    for dtype in ("float32", "bfloat16"):
      t0 = time.perf_counter()
      index = ModelIndex(E, dtype=dtype)
      index.add_vectors(ids, vecs)
      add_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      index.search(queries[1], TOPK)  # places the device copy and compiles for Q = 1
      first_s = time.perf_counter() - t0
      builds.append(dict(models=m, dtype=dtype, add_vectors_s=add_s, first_search_s=first_s,
                         shards=index.num_shards))
      indexes[dtype] = index
      methods[f"index-{'f32' if dtype == 'float32' else 'bf16'}"] = (
          lambda q, index=index: index.search(q, TOPK), 4 if dtype == "float32" else 2,
          index.num_shards)
    unit = indexes["float32"].vectors  # the stored unit rows, shared by the baselines
    methods["numpy"] = (lambda q: _numpy_search(unit, q, TOPK), 4, 1)
    if threadpoolctl is not None:
      # The same function; the one-thread BLAS limit is set around its blocks (see below).
      methods["numpy-1t"] = (lambda q: _numpy_search(unit, q, TOPK), 4, 1)
    if faiss is not None:
      fidx = faiss.IndexFlatIP(E)
      fidx.add(unit)
      default_threads = faiss.omp_get_max_threads()

      def faiss_search(q, threads):
        faiss.omp_set_num_threads(threads)
        try:
          return fidx.search(q, TOPK)
        finally:
          faiss.omp_set_num_threads(default_threads)
      methods[f"faiss-{default_threads}t"] = (
          lambda q, t=default_threads: faiss_search(q, t), 4, 1)
      if default_threads > 1:
        methods["faiss-1t"] = (lambda q: faiss_search(q, 1), 4, 1)
    one_thread_blas = ({"numpy-1t": lambda: threadpoolctl.threadpool_limits(1)}
                       if threadpoolctl is not None else {})
    # The methods must agree on the top-10 (scores to float32 rounding; bf16 is approximate).
    ref_s, _ = methods["numpy"][0](queries[16])
    for name, (fn, _, _) in methods.items():
      out = fn(queries[16])
      got = np.asarray(out[0])
      checks[f"M{m}/{name}_max_score_diff"] = float(np.abs(got - ref_s).max())
    samples, budget = _budget(m, quick)
    for q in QUERIES:
      run_now = dict(methods)
      if q == QUERIES[-1] and m >= 10**5:
        # A baseline at two thread settings keeps only the one faster at the previous Q here:
        # these calls take seconds each on a small CPU.
        for family in ("numpy", "faiss"):
          cands = [r for r in rows if (r["models"], r["queries"]) == (m, QUERIES[-2])
                   and r["method"].startswith(family)]
          for r in cands:
            if r is not max(cands, key=lambda r: r["queries_per_s"]):
              run_now.pop(r["method"], None)
      lats = compare_latency({name: (lambda fn=fn, q=q: fn(queries[q]))
                              for name, (fn, _, _) in run_now.items()},
                             samples=samples, budget_s=budget, rounds=2 if quick else 3,
                             contexts=one_thread_blas)
      for name, lat in lats.items():
        _, nbytes, shards = run_now[name]
        s = lat["p50_ms"] / 1e3
        gbytes = m * E * nbytes / s / 1e9
        gflops = 2 * q * m * E / s / 1e9
        rows.append(dict(models=m, queries=q, method=name, shards=shards, **lat,
                         queries_per_s=q / s, scan_gbytes_per_s=gbytes,
                         fraction_of_bandwidth=ratio(gbytes, bw), gflops_per_s=gflops,
                         frac_matmul_peak=ratio(gflops, mm)))
      line = "  ".join(f"{name} {lat['p50_ms']:8.3f}" for name, lat in lats.items())
      print(f"  M={m:>7d} Q={q:3d} p50 ms: {line}", flush=True)
    if m == SIZES[size][-1]:
      breakdown = _breakdown(unit, queries[1], indexes["float32"], quick)
      for name, lat in breakdown.items():
        print(f"  breakdown M={m} Q=1: {name:42s} p50 {lat['p50_ms']:8.3f} ms", flush=True)
    del methods, indexes, unit, vecs
    if faiss is not None:
      del fidx

  def get(m, q, method):
    return next((r for r in rows if (r["models"], r["queries"], r["method"]) == (m, q, method)),
                None)

  def best(m, q, prefix):
    cands = [r for r in rows if (r["models"], r["queries"]) == (m, q)
             and r["method"].startswith(prefix)]
    return max(cands, key=lambda r: r["queries_per_s"]) if cands else None

  summary = []
  for m in SIZES[size]:
    for q in QUERIES:
      ours, bf16 = get(m, q, "index-f32"), get(m, q, "index-bf16")
      npy, f = best(m, q, "numpy"), best(m, q, "faiss")
      summary.append(dict(models=m, queries=q, ours_p50_ms=ours["p50_ms"],
                          ours_p99_ms=ours["p99_ms"], ours_bf16_p50_ms=bf16["p50_ms"],
                          numpy_p50_ms=npy["p50_ms"], faiss_p50_ms=f["p50_ms"] if f else None,
                          vs_numpy=ratio(ours["queries_per_s"], npy["queries_per_s"]),
                          vs_faiss=ratio(ours["queries_per_s"], f["queries_per_s"] if f else None),
                          bf16_vs_f32=ratio(bf16["queries_per_s"], ours["queries_per_s"]),
                          fraction_of_bandwidth=ours["fraction_of_bandwidth"]))
  big = 10**6
  headline = {}
  if big in SIZES[size]:
    ours, f = get(big, 1, "index-f32"), best(big, 1, "faiss")
    config = "M=10^6 x E=256 float32, one query, top-10, ModelIndex.search p50"
    headline["retrieval_1e6_vs_faiss"] = dict(
        value=ratio(ours["queries_per_s"], f["queries_per_s"] if f else None), config=config,
        ours_p50_ms=ours["p50_ms"], baseline_p50_ms=f["p50_ms"] if f else None,
        baseline="faiss IndexFlatIP (faster of default threads and 1 thread)"
                 if f else "faiss not installed", target=">= 1")
    scan = breakdown["scan: jnp.sum of the f32 vectors"]
    search = breakdown["ModelIndex.search (f32)"]
    headline["retrieval_1e6_fraction_of_bandwidth"] = dict(
        value=scan["p50_ms"] / search["p50_ms"], config=config,
        search_gbytes_per_s=search["scan_gbytes_per_s"],
        scan_gbytes_per_s=scan["scan_gbytes_per_s"],
        fraction_of_peak_benchmark_best=ours["fraction_of_bandwidth"],
        baseline="a plain scan (jnp.sum) of the same vectors, timed interleaved with the search; "
                 "1 = at the bandwidth bound", target=">= 0.5")
  return {"rows": rows, "summary": summary, "builds": builds, "checks": checks,
          "breakdown": [dict(models=SIZES[size][-1], queries=1, part=k, **v)
                        for k, v in breakdown.items()],
          "headline": headline, "num_devices": jax.device_count(),
          "note": "latency of one search call (Q queries at once, top-10) in ms: p50 / p99 over "
                  "`samples` calls; random unit vectors (latency does not depend on the values); "
                  "numpy and faiss search float32 only; summary baselines: the faster thread "
                  "setting of each"}
