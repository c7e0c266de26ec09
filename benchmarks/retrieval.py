"""Retrieval: top-10 latency of :class:`ModelIndex` for M model vectors (E = 256), vs numpy and faiss.

For M in 10^3 .. 10^6 random unit vectors and Q in {1, 16, 256} queries at once, in the same
process:

- ``index-f32`` / ``index-bf16`` / ``index-int8``: ``ModelIndex.search`` with storage float32,
  bfloat16 and int8 (jitted scores + ``lax.top_k`` on the index's device copy; the public call,
  host-side checks and id lookup included). The compressed two keep ``RESCORE * 10`` rows per
  query and re-score them exactly in float32 from the host's float32 rows (included in the time);
- ``numpy``: ``q @ V.T`` then ``np.argpartition`` and a sort of the k best (float32), at the BLAS
  default thread count and (``numpy-1t``, via threadpoolctl) at one thread;
- ``faiss``: ``faiss.IndexFlatIP.search`` (float32; optional dependency), at its default thread
  count and at one thread, the faster kept (on a small shared CPU its OpenMP pool can lose more
  than it gains);
- ``faiss-sq8``: ``faiss.IndexScalarQuantizer`` (``QT_8bit``: 8 bits per value on per-dimension
  ranges trained on the rows, inner product), both thread settings; its scores are the decoded
  approximations;
- ``faiss-sq8-refine``: the same re-ranked exactly by ``faiss.IndexRefine`` over the IndexFlatIP
  with ``k_factor = RESCORE``: faiss's form of our two-stage search at the same shortlist depth,
  the comparison at matched recall. At 256 queries and M >= 10^5 both are left out (faiss scans
  the codes once per query: seconds per call).

Methods are timed in interleaved blocks (:func:`benchmarks.common.compare_latency`) so that load
from elsewhere on a shared machine hits them alike, and none runs beside the still-spinning worker
threads of the one before. A brute-force scan must read every vector once per call, so
``M * E * bytes`` per latency is the achieved scan rate; it is reported against the memory
bandwidth (``fraction_of_bandwidth``: 1 = at the bound). The bound is a true one: the fastest read
of the same M's vectors seen in the run (any method's best call, in its own bytes), or the peak
benchmark's scan where that is faster; a small M fits in cache and reads faster than the peak's
large array. With many queries the scan becomes a matmul, so the FLOP rate is reported against
the best float32 rate of the run as well (``frac_peak``). The index runs on the default single
device unless the process has several (``--devices``): the number of shards is in each row.

``recall``: recall@10 against exact float32 search (``ModelIndex`` float32) over ``RECALL_QUERIES``
random unit queries (searched as one batch), for the compressed methods, and for ours at shortlist
depths 1 and 2 as well (the trade-off the ``rescore`` factor sets). Random unit vectors are the
hard case for a quantized index: no cluster structure separates the top rows from the rest.

``memory``: what each storage holds, computed from the array sizes: the device copy searched,
and the host float32 rows. The index keeps the float32 rows whatever its storage (they are saved
bit for bit and class matching reads them), and the compressed storages re-score from them: the
re-scoring copy costs ``M * E * 4`` bytes of host memory, no device memory.

``large`` (full runs only, when the machine has the memory): the int8 index against faiss at
10^7 rows of E = 128 (1.3 GB of int8 codes; 5.1 GB of float32 rows on the host, and 5.1 GB more
for faiss's flat index), one query.

``breakdown`` splits one query at the largest M into its parts, timed interleaved: a plain scan
(``jnp.sum``) of the same float32 array, the jitted scores alone (f32, bf16 and int8, the last two
as the index computes them and the bf16 matrix-vector product it avoids), ``lax.top_k`` alone on
precomputed scores, and the whole ``ModelIndex.search`` per storage. The headline fraction of
bandwidth is the f32 search's median read rate against the fastest read of the same vectors in
the run (the peak's scan, this interleaved scan's and every part's best call); the search against
the interleaved scan, median against median, is beside it.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import accelerator, compare_latency, fraction, optional, ratio
from know2vec_jax import index as index_lib
from know2vec_jax.index import ModelIndex

NAME = "retrieval"
E = 256
TOPK = 10
RESCORE = index_lib.RESCORE
SIZES = {"quick": (10**3, 10**4), "cpu": (10**3, 10**4, 10**5, 10**6),
         "accel": (10**3, 10**4, 10**5, 10**6)}
QUERIES = (1, 16, 256)
RECALL_QUERIES = 256
# The size of the headline figures, and (rows, dim) of the large comparison: the int8 codes of
# 10^7 x 128 are 1.3 GB.
BIG = 10**6
LARGE = (10**7, 128)
STORAGES = {"float32": ("index-f32", 4), "bfloat16": ("index-bf16", 2), "int8": ("index-int8", 1)}


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


def _family(method: str) -> str:
  """A method without its thread setting: ``faiss-sq8-1t`` -> ``faiss-sq8``."""
  return re.sub(r"-\d+t$", "", method)


def _device_bytes(m: int, dim: int, storage: str) -> int:
  """Bytes of the device copy a search reads (int8: the codes and a float32 scale per row)."""
  return m * dim * {"float32": 4, "bfloat16": 2, "int8": 1}[storage] + (
      4 * m if storage == "int8" else 0)


def _rows(ids: list[list[str]]) -> np.ndarray:
  """Index ids ``m<row>`` back to row numbers [Q, k]."""
  return np.array([[int(i[1:]) for i in row] for row in ids])


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
  """Mean over queries of |found & exact| / k (the k true best rows)."""
  return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b)
                        for a, b in zip(found, exact)]))


def faiss_indexes(faiss, unit: np.ndarray, k_factor: int) -> dict:
  """faiss's indexes of ``unit`` [M, E]: ``flat`` (IndexFlatIP), ``sq8`` (IndexScalarQuantizer
  QT_8bit, inner product) and ``refine`` (SQ8 re-ranked exactly by the flat index, ``k_factor``
  rows per result: faiss's form of our two-stage search)."""
  dim = unit.shape[1]
  flat = faiss.IndexFlatIP(dim)
  flat.add(unit)
  sq8 = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
  sq8.train(unit)
  sq8.add(unit)
  # The refine stage shares the flat index: no second float32 copy.
  refine = faiss.IndexRefine(sq8, flat)
  refine.k_factor = float(k_factor)
  return {"flat": flat, "sq8": sq8, "refine": refine}


def _faiss_methods(faiss, unit: np.ndarray, k_factor: int) -> tuple[dict, dict]:
  """faiss's flat, SQ8 and SQ8 + exact refine searches at both thread settings, and the indexes
  (kept alive with them)."""
  fidx = faiss_indexes(faiss, unit, k_factor)
  flat, sq8, refine = fidx["flat"], fidx["sq8"], fidx["refine"]
  default_threads = faiss.omp_get_max_threads()

  def search(index, q, threads):
    faiss.omp_set_num_threads(threads)
    try:
      return index.search(q, TOPK)
    finally:
      faiss.omp_set_num_threads(default_threads)
  methods = {}
  for name, index, nbytes in (("faiss", flat, 4), ("faiss-sq8", sq8, 1),
                              ("faiss-sq8-refine", refine, 1)):
    for t in sorted({default_threads, 1}, reverse=True):
      methods[f"{name}-{t}t"] = (lambda q, i=index, t=t: search(i, q, t), nbytes, 1)
  return methods, fidx


def _breakdown(unit: np.ndarray, q: np.ndarray, indexes: dict, quick: bool) -> dict:
  """Where one query's time goes at this M (see the module docstring)."""
  dims = (((1,), (1,)), ((), ()))
  vd = jax.device_put(unit)
  vb = jax.device_put(unit.astype(jnp.bfloat16))
  qd = jax.device_put(q)
  # The index's own device copies, queries and score kernels: what its search computes.
  placed = {s: (i._device_state or i._place())[0] for s, i in indexes.items()}
  kernel = {s: i._kernel() for s, i in indexes.items()}
  q8 = jax.device_put(index_lib._compact_queries(q, "int8"))
  scores = jax.jit(lambda q, v: jax.lax.dot_general(q.astype(v.dtype), v, dims,
                                                    preferred_element_type=jnp.float32))
  as_index = jax.jit(index_lib._scores, static_argnames=("kernel",))
  top_k = jax.jit(lambda s: jax.lax.top_k(s, TOPK))
  scan = jax.jit(jnp.sum)
  s = scores(qd, vd)
  fns = {"scan: jnp.sum of the f32 vectors": lambda: scan(vd),
         "scores alone (f32 dot)": lambda: scores(qd, vd),
         "scores alone (bf16 dot)": lambda: scores(qd, vb),
         "scores alone (bf16 fused, as the index)":
             lambda: as_index(qd, placed["bfloat16"], kernel=kernel["bfloat16"]),
         "scores alone (int8 x int8, as the index)":
             lambda: as_index(q8, placed["int8"], kernel=kernel["int8"]),
         "lax.top_k alone": lambda: top_k(s),
         "ModelIndex.search (f32)": lambda: indexes["float32"].search(q, TOPK),
         "ModelIndex.search (bf16)": lambda: indexes["bfloat16"].search(q, TOPK),
         "ModelIndex.search (int8)": lambda: indexes["int8"].search(q, TOPK)}
  lat = compare_latency(fns, samples=10 if quick else 30, budget_s=1.0 if quick else 3.0,
                        warmup=2, rounds=2 if quick else 3)
  nbytes = {"scan": 4, "scores alone (f32": 4, "scores alone (bf16": 2, "scores alone (int8": 1,
            "ModelIndex.search (f32": 4, "ModelIndex.search (bf16": 2,
            "ModelIndex.search (int8": 1}
  for name, d in lat.items():
    b = next((v for k, v in nbytes.items() if name.startswith(k)), None)
    d["scan_gbytes_per_s"] = (unit.shape[0] * unit.shape[1] * b / (d["p50_ms"] / 1e3) / 1e9
                              if b else None)
  return lat


def _mem_available() -> int | None:
  """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _large(faiss) -> dict:
  """The int8 index against faiss at LARGE rows, one query, when the memory allows."""
  m, dim = LARGE
  # At the end: the index's float32 rows, its int8 device copy (and as much again transient while
  # it is placed), faiss's flat rows and SQ8 codes, ~400 bytes a row of ids, row dict and
  # metadata. Measured at 10^6 and 2 x 10^6 rows: 1.6 GiB per 10^6 rows, this formula's 1.7.
  need = m * dim * (4 + 1 + 1 + 4 + 1) + m * 400
  have = _mem_available()
  if faiss is None:
    return {"skipped": "faiss not installed"}
  if have is None or have < need:
    return {"skipped": f"needs about {need / 2**30:.1f} GiB free, "
                       f"{'unknown' if have is None else f'{have / 2**30:.1f} GiB'} available"}
  rng = np.random.default_rng(1)
  t0 = time.perf_counter()
  vecs = rng.standard_normal((m, dim), dtype=np.float32)
  vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
  index = ModelIndex(dim, storage="int8")
  index.add_vectors([f"m{i}" for i in range(m)], vecs)
  del vecs
  queries = rng.standard_normal((RECALL_QUERIES // 4, dim), dtype=np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  index.search(queries[:1], TOPK)  # quantises, places and compiles
  unit = index.vectors
  methods, fidx = _faiss_methods(faiss, unit, index.rescore)
  methods["index-int8"] = (lambda q: index.search(q, TOPK), 1, index.num_shards)
  build_s = time.perf_counter() - t0
  lats = compare_latency({n: (lambda fn=fn: fn(queries[:1])) for n, (fn, _, _) in methods.items()},
                         samples=10, budget_s=3.0, rounds=3)
  _, exact = fidx["flat"].search(queries, TOPK)
  recall = {"index-int8": _recall(_rows(index.search(queries, TOPK)[1]), exact),
            "faiss-sq8": _recall(fidx["sq8"].search(queries, TOPK)[1], exact),
            "faiss-sq8-refine": _recall(fidx["refine"].search(queries, TOPK)[1], exact)}
  rows = []
  for name, lat in lats.items():
    s = lat["p50_ms"] / 1e3
    rows.append(dict(models=m, dim=dim, queries=1, method=name, **lat, queries_per_s=1 / s,
                     recall10=recall.get(_family(name))))
  print("  large " + "  ".join(f"{r['method']} {r['p50_ms']:.1f} ms" for r in rows), flush=True)
  flat = max((r for r in rows if _family(r["method"]) == "faiss"),
             key=lambda r: r["queries_per_s"])
  ours = next(r for r in rows if r["method"] == "index-int8")
  return {"rows": rows, "build_s": build_s, "int8_vs_faiss": ratio(ours["queries_per_s"],
                                                                   flat["queries_per_s"]),
          "int8_recall10": recall["index-int8"], "recall_queries": len(queries),
          "device_bytes_int8": _device_bytes(m, dim, "int8"), "host_float32_bytes": m * dim * 4}


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  size = "quick" if quick else ("accel" if accelerator() else "cpu")
  peak = (ctx or {}).get("peak", {})
  bw = peak.get("memory_gbytes_per_s")
  f32_peak = peak.get("f32_gflops_per_s")
  faiss = optional("faiss")
  threadpoolctl = optional("threadpoolctl")
  rng = np.random.default_rng(0)
  rows, builds, checks, recalls, memory = [], [], {}, [], []
  for m in SIZES[size]:
    vecs = rng.standard_normal((m, E), dtype=np.float32)
    ids = [f"m{i}" for i in range(m)]
    queries = {q: rng.standard_normal((q, E), dtype=np.float32) for q in QUERIES}
    queries = {q: v / np.linalg.norm(v, axis=1, keepdims=True) for q, v in queries.items()}
    recall_q = rng.standard_normal((RECALL_QUERIES, E), dtype=np.float32)
    recall_q /= np.linalg.norm(recall_q, axis=1, keepdims=True)
    methods, indexes = {}, {}
    for storage, (name, nbytes) in STORAGES.items():
      t0 = time.perf_counter()
      index = ModelIndex(E, storage=storage)
      index.add_vectors(ids, vecs)
      add_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      index.search(queries[1], TOPK)  # places the device copy (quantised) and compiles for Q = 1
      first_s = time.perf_counter() - t0
      builds.append(dict(models=m, dtype=storage, add_vectors_s=add_s, first_search_s=first_s,
                         shards=index.num_shards))
      memory.append(dict(models=m, dim=E, storage=storage,
                         device_bytes=_device_bytes(m, E, storage), host_float32_bytes=m * E * 4))
      indexes[storage] = index
      methods[name] = (lambda q, index=index: index.search(q, TOPK), nbytes, index.num_shards)
    del vecs
    unit = indexes["float32"].vectors  # the stored unit rows, shared by the baselines
    methods["numpy"] = (lambda q: _numpy_search(unit, q, TOPK), 4, 1)
    if threadpoolctl is not None:
      # The same function; the one-thread BLAS limit is set around its blocks (see below).
      methods["numpy-1t"] = (lambda q: _numpy_search(unit, q, TOPK), 4, 1)
    fidx = {}
    if faiss is not None:
      more, fidx = _faiss_methods(faiss, unit, RESCORE)
      methods |= more
    one_thread_blas = ({"numpy-1t": lambda: threadpoolctl.threadpool_limits(1)}
                       if threadpoolctl is not None else {})
    # The methods must agree on the top-10 (scores to float32 rounding). Those that may miss a row
    # (a shortlist) are compared on the rows both found: their scores must be exact all the same.
    # faiss-sq8's scores are decoded approximations by design: its recall is measured instead.
    ref_s, ref_i = methods["numpy"][0](queries[16])
    for name, (fn, _, _) in methods.items():
      if _family(name) == "faiss-sq8":
        continue
      got_s, got_i = fn(queries[16])
      got_s, got_i = np.asarray(got_s), (_rows(got_i) if name.startswith("index") else got_i)
      if name in ("index-bf16", "index-int8") or _family(name) == "faiss-sq8-refine":
        ref = {(q, int(j)): s for q in range(len(ref_i)) for j, s in zip(ref_i[q], ref_s[q])}
        diffs = [abs(s - ref[q, int(j)]) for q in range(len(got_i))
                 for j, s in zip(got_i[q], got_s[q]) if (q, int(j)) in ref]
        checks[f"M{m}/{name}_max_score_diff_of_found"] = float(max(diffs))
      else:
        checks[f"M{m}/{name}_max_score_diff"] = float(np.abs(got_s - ref_s).max())
    # Recall@10 against exact float32 search, one batch of queries.
    _, exact = indexes["float32"].search(recall_q, TOPK)
    exact = _rows(exact)
    for storage in ("bfloat16", "int8"):
      for depth in sorted({1, 2, RESCORE}):
        if depth != RESCORE and storage != "int8":
          continue
        found = _rows(indexes[storage].search(recall_q, TOPK, rescore=depth)[1])
        recalls.append(dict(models=m, dim=E, method=STORAGES[storage][0], rescore=depth,
                            recall10=_recall(found, exact), queries=RECALL_QUERIES))
    if fidx:
      for name, key, depth in (("faiss-sq8", "sq8", None), ("faiss-sq8-refine", "refine",
                                                            RESCORE)):
        recalls.append(dict(models=m, dim=E, method=name, rescore=depth, queries=RECALL_QUERIES,
                            recall10=_recall(fidx[key].search(recall_q, TOPK)[1], exact)))
    print(f"  M={m:>7d} recall@10: " + "  ".join(
        f"{r['method']}{'' if r['rescore'] in (None, RESCORE) else '@' + str(r['rescore'])} "
        f"{r['recall10']:.4f}" for r in recalls if r["models"] == m), flush=True)
    samples, budget = _budget(m, quick)
    for q in QUERIES:
      run_now = dict(methods)
      if q == QUERIES[-1] and m >= 10**5:
        # A baseline at two thread settings keeps only the one faster at the previous Q here:
        # these calls take seconds each on a small CPU. faiss's SQ8 scans the codes once per
        # query: tens of seconds per call here, so it is left out.
        for family in {_family(n) for n in methods}:
          cands = [r for r in rows if (r["models"], r["queries"]) == (m, QUERIES[-2])
                   and _family(r["method"]) == family]
          for r in cands:
            if r is not max(cands, key=lambda r: r["queries_per_s"]):
              run_now.pop(r["method"], None)
        run_now = {n: v for n, v in run_now.items() if not _family(n).startswith("faiss-sq8")}
      lats = compare_latency({name: (lambda fn=fn, q=q: fn(queries[q]))
                              for name, (fn, _, _) in run_now.items()},
                             samples=samples, budget_s=budget, rounds=2 if quick else 3,
                             contexts=one_thread_blas)
      for name, lat in lats.items():
        _, nbytes, shards = run_now[name]
        s = lat["p50_ms"] / 1e3
        gbytes = m * E * nbytes / s / 1e9
        gflops = 2 * q * m * E / s / 1e9
        best_s = lat["min_ms"] / 1e3
        rows.append(dict(models=m, queries=q, method=name, shards=shards, **lat,
                         queries_per_s=q / s, scan_gbytes_per_s=gbytes,
                         best_scan_gbytes_per_s=m * E * nbytes / best_s / 1e9,
                         gflops_per_s=gflops,
                         frac_peak=fraction(gflops, f32_peak, 2 * q * m * E / best_s / 1e9)))
      line = "  ".join(f"{name} {lat['p50_ms']:8.3f}" for name, lat in lats.items())
      print(f"  M={m:>7d} Q={q:3d} p50 ms: {line}", flush=True)
    if m == SIZES[size][-1]:
      breakdown = _breakdown(unit, queries[1], indexes, quick)
      for name, lat in breakdown.items():
        print(f"  breakdown M={m} Q=1: {name:42s} p50 {lat['p50_ms']:8.3f} ms", flush=True)
    del methods, indexes, unit, fidx

  # Bandwidth fractions are true bounds: the reference is the fastest read of the same M's
  # vectors seen in this run (any method's best call, in its own bytes), or the peak benchmark's
  # scan where that is faster. A small M fits in cache and reads faster than the peak's large
  # array: its bound is then that best call.
  best_read = {m: max(r["best_scan_gbytes_per_s"] for r in rows if r["models"] == m)
               for m in SIZES[size]}
  for r in rows:
    r["fraction_of_bandwidth"] = fraction(r["scan_gbytes_per_s"], bw, best_read[r["models"]])

  def get(m, q, method):
    return next((r for r in rows if (r["models"], r["queries"], r["method"]) == (m, q, method)),
                None)

  def best(m, q, family):
    cands = [r for r in rows if (r["models"], r["queries"]) == (m, q)
             and _family(r["method"]) == family]
    return max(cands, key=lambda r: r["queries_per_s"]) if cands else None

  def qps_ratio(a, b):
    return ratio(a["queries_per_s"] if a else None, b["queries_per_s"] if b else None)

  def recall_of(m, method, depth=RESCORE):
    return next((r["recall10"] for r in recalls if (r["models"], r["method"]) == (m, method)
                 and r["rescore"] in (depth, None)), None)

  summary = []
  for m in SIZES[size]:
    for q in QUERIES:
      ours, bf16, int8 = get(m, q, "index-f32"), get(m, q, "index-bf16"), get(m, q, "index-int8")
      npy, f = best(m, q, "numpy"), best(m, q, "faiss")
      sq8, sq8r = best(m, q, "faiss-sq8"), best(m, q, "faiss-sq8-refine")
      summary.append(dict(models=m, queries=q, ours_p50_ms=ours["p50_ms"],
                          ours_p99_ms=ours["p99_ms"], ours_bf16_p50_ms=bf16["p50_ms"],
                          ours_int8_p50_ms=int8["p50_ms"],
                          numpy_p50_ms=npy["p50_ms"], faiss_p50_ms=f["p50_ms"] if f else None,
                          faiss_sq8_p50_ms=sq8["p50_ms"] if sq8 else None,
                          faiss_sq8_refine_p50_ms=sq8r["p50_ms"] if sq8r else None,
                          vs_numpy=qps_ratio(ours, npy), vs_faiss=qps_ratio(ours, f),
                          bf16_vs_f32=qps_ratio(bf16, ours), int8_vs_f32=qps_ratio(int8, ours),
                          bf16_vs_faiss=qps_ratio(bf16, f), int8_vs_faiss=qps_ratio(int8, f),
                          int8_vs_faiss_sq8=qps_ratio(int8, sq8),
                          int8_vs_faiss_sq8_refine=qps_ratio(int8, sq8r),
                          fraction_of_bandwidth=ours["fraction_of_bandwidth"]))
  large = _large(faiss) if size != "quick" else {"skipped": "not in --quick"}
  big = BIG
  headline = {}
  if big in SIZES[size]:
    ours, f = get(big, 1, "index-f32"), best(big, 1, "faiss")
    sq8, sq8r = best(big, 1, "faiss-sq8"), best(big, 1, "faiss-sq8-refine")
    config = "M=10^6 x E=256 float32, one query, top-10, ModelIndex.search p50"
    headline["retrieval_1e6_vs_faiss"] = dict(
        value=qps_ratio(ours, f), config=config,
        ours_p50_ms=ours["p50_ms"], baseline_p50_ms=f["p50_ms"] if f else None,
        baseline="faiss IndexFlatIP (faster of default threads and 1 thread)"
                 if f else "faiss not installed", target=">= 1")
    scan = breakdown["scan: jnp.sum of the f32 vectors"]
    search = breakdown["ModelIndex.search (f32)"]
    # The best read of these bytes seen in the run: the peak's scan, any breakdown part's or
    # any method's best call at this M (each in its own bytes).
    best_bw = max([bw or 0.0, best_read[big]] + [
        d["scan_gbytes_per_s"] * d["p50_ms"] / d["min_ms"] for d in breakdown.values()
        if d.get("scan_gbytes_per_s")])
    headline["retrieval_1e6_fraction_of_bandwidth"] = dict(
        value=fraction(search["scan_gbytes_per_s"], best_bw), config=config,
        search_gbytes_per_s=search["scan_gbytes_per_s"], bound_gbytes_per_s=best_bw,
        peak_benchmark_gbytes_per_s=bw, scan_gbytes_per_s=scan["scan_gbytes_per_s"],
        vs_interleaved_scan_p50=scan["p50_ms"] / search["p50_ms"],
        baseline="the fastest read of 10^6 x 256 float32 seen in this run (the peak benchmark's "
                 "scan, a jnp.sum of the same vectors timed interleaved with the search, and "
                 "every method's best call); ours is the median search; 1 = at the bandwidth "
                 "bound", target=">= 0.5")
    for storage, short in (("int8", "int8"), ("bfloat16", "bf16")):
      mine = get(big, 1, f"index-{short}")
      config = (f"M=10^6 x E=256, storage {storage}, one query, top-10 (a shortlist of "
                f"{RESCORE * TOPK} rows re-scored exactly in float32), ModelIndex.search p50")
      detail = dict(ours_p50_ms=mine["p50_ms"], baseline_p50_ms=f["p50_ms"] if f else None,
                    recall10=recall_of(big, f"index-{short}"),
                    vs_faiss_sq8=qps_ratio(mine, sq8),
                    faiss_sq8_p50_ms=sq8["p50_ms"] if sq8 else None,
                    faiss_sq8_recall10=recall_of(big, "faiss-sq8"),
                    vs_faiss_sq8_refine=qps_ratio(mine, sq8r),
                    faiss_sq8_refine_recall10=recall_of(big, "faiss-sq8-refine"),
                    vs_index_f32=qps_ratio(mine, ours),
                    device_bytes=_device_bytes(big, E, storage), host_float32_bytes=big * E * 4)
      if storage == "int8":
        detail |= dict(vs_faiss_1e7_e128=large.get("int8_vs_faiss"),
                       recall10_1e7_e128=large.get("int8_recall10"))
      headline[f"retrieval_1e6_{short}_vs_faiss"] = dict(
          value=qps_ratio(mine, f), config=config, **detail,
          baseline="faiss IndexFlatIP float32 (faster of default threads and 1 thread); beside "
                   f"it faiss IndexScalarQuantizer QT_8bit alone and re-ranked by IndexRefine "
                   f"(k_factor {RESCORE}, the same depth)" if f else "faiss not installed",
          target=">= 2")
      headline[f"retrieval_1e6_{short}_recall10"] = dict(
          value=recall_of(big, f"index-{short}"),
          config=f"M=10^6 x E=256 random unit rows, {RECALL_QUERIES} random unit queries, "
                 f"storage {storage}, rescore {RESCORE}, top-10",
          baseline="exact float32 search (ModelIndex float32): recall@10 = the share of its "
                   "top-10 found", target=">= 0.99",
          faiss_sq8_recall10=recall_of(big, "faiss-sq8"),
          faiss_sq8_refine_recall10=recall_of(big, "faiss-sq8-refine"),
          recall10_rescore_1=recall_of(big, f"index-{short}", 1) if short == "int8" else None,
          recall10_rescore_2=recall_of(big, f"index-{short}", 2) if short == "int8" else None)
  return {"rows": rows, "summary": summary, "builds": builds, "checks": checks,
          "recall": recalls, "memory": memory, "large": large.get("rows", []),
          "large_info": {k: v for k, v in large.items() if k != "rows"},
          "breakdown": [dict(models=SIZES[size][-1], queries=1, part=k, **v)
                        for k, v in breakdown.items()],
          "headline": headline, "num_devices": jax.device_count(),
          "note": "latency of one search call (Q queries at once, top-10) in ms: p50 / p99 over "
                  "`samples` calls; random unit vectors (latency does not depend on the values); "
                  "numpy and faiss flat search float32; index-bf16 and index-int8 re-score "
                  f"{RESCORE} x 10 rows exactly from the host float32 rows (the re-scoring copy: "
                  "M x E x 4 bytes of host memory, which every storage keeps); faiss-sq8 returns "
                  "decoded scores, faiss-sq8-refine re-ranks the same depth exactly; summary "
                  "baselines: the faster thread setting of each"}
