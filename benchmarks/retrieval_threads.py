"""Retrieval at matched threads: the int8 index against faiss with both sides held to the same
cores.

In ``retrieval`` each side runs at its own default: XLA spreads a search over every core while
faiss's ``IndexFlatIP`` scans one query on one thread, so part of that ratio is threads. Here
each setting runs in a process of its own pinned to ``threads`` cores before JAX starts
(``os.sched_setaffinity``: XLA sizes its thread pool by the cores it may use), with faiss's
OpenMP pool set to the same count. Settings: 1 and 2 cores (the machine's count on larger
machines: 1 and all), one query and a batch of ``BATCH`` (where faiss parallelises over
queries), ``M`` random unit vectors of ``E`` dimensions.

Methods, timed in interleaved blocks (:func:`benchmarks.common.compare_latency`): ``index-int8``
(``ModelIndex.search`` with int8 storage: the public call, its exact float32 re-scoring of
``rescore * k`` rows included), ``faiss`` (``IndexFlatIP``, float32), ``faiss-sq8``
(``IndexScalarQuantizer`` QT_8bit, inner product) and ``faiss-sq8-refine`` (the same re-ranked
exactly by ``IndexRefine`` at the index's shortlist depth: faiss's form of our two-stage search).
Recall@10 against exact search over the batch's queries is reported for the three approximate
methods. Random unit vectors only: the real proxy vectors of a trained zoo, whose near-twins pack
the top rows, are not measured here.

Headline ``retrieval_1e6_int8_vs_faiss_matched``: faiss flat's p50 over ours, the smallest over
the settings (threads x queries), with our recall beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

NAME = "retrieval_threads"
E = 256
TOPK = 10
BATCH = 64
SIZES = {"quick": 10**4, "full": 10**6}
# The faiss methods: row name -> index of benchmarks.retrieval.faiss_indexes.
FAISS = {"faiss": "flat", "faiss-sq8": "sq8", "faiss-sq8-refine": "refine"}


def _cores() -> list[int]:
  """The core counts compared: 1 and every core this process may use (2 on the 2-core CPU)."""
  n = len(os.sched_getaffinity(0))
  return [1] if n == 1 else [1, n]


def _worker(threads: int, m: int, quick: bool) -> dict:
  """One setting, in its own process: pins it to ``threads`` cores, then times every method."""
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
  from benchmarks.common import compare_latency, optional
  from benchmarks.retrieval import _recall, _rows, faiss_indexes
  from know2vec_jax.index import ModelIndex
  faiss = optional("faiss")
  rng = np.random.default_rng(0)
  unit = rng.standard_normal((m, E), dtype=np.float32)
  unit /= np.linalg.norm(unit, axis=1, keepdims=True)
  queries = rng.standard_normal((BATCH, E), dtype=np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  index = ModelIndex(E, storage="int8")
  index.add_vectors([f"m{i}" for i in range(m)], unit)
  methods = {"index-int8": lambda q: index.search(q, TOPK)}
  exact = None
  if faiss is not None:
    faiss.omp_set_num_threads(threads)
    fidx = faiss_indexes(faiss, unit, index.rescore)
    methods |= {name: (lambda q, i=fidx[key]: i.search(q, TOPK))
                for name, key in FAISS.items()}
    exact = fidx["flat"].search(queries, TOPK)[1]
  rows = []
  for q in (1, BATCH):
    lats = compare_latency({n: (lambda fn=fn: fn(queries[:q])) for n, fn in methods.items()},
                           samples=6 if quick else 20, budget_s=1.0 if quick else 4.0, rounds=3)
    rows += [dict(method=n, threads=threads, queries=q, models=m, dim=E, **lat)
             for n, lat in lats.items()]
  recall = {}
  if exact is not None:
    recall = {"index-int8": _recall(_rows(index.search(queries, TOPK)[1]), exact)}
    recall |= {name: _recall(fidx[key].search(queries, TOPK)[1], exact)
               for name, key in FAISS.items() if key != "flat"}
  return {"rows": rows, "recall10": recall, "threads": threads,
          "cores": sorted(os.sched_getaffinity(0))}


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  del ctx
  from benchmarks.common import accelerator
  if accelerator():  # ours would search on the accelerator, not on the pinned cores
    return {"skipped": "a CPU comparison: on an accelerator the index does not run on the cores "
                       "faiss is pinned to"}
  m = SIZES["quick" if quick else "full"]
  settings = []
  for threads in _cores():
    # A process per setting: JAX's thread pool is sized once, when it starts.
    out = subprocess.run([sys.executable, "-m", "benchmarks.retrieval_threads", str(threads),
                          str(m), "1" if quick else "0"], capture_output=True, text=True,
                         check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if out.returncode != 0:
      raise RuntimeError(f"the {threads}-core retrieval setting failed: {out.stderr[-2000:]}")
    settings.append(json.loads(out.stdout.strip().splitlines()[-1]))
  rows = [r for s in settings for r in s["rows"]]
  for r in rows:
    print(f"  {r['threads']} core(s) Q={r['queries']:3d} {r['method']:17s} "
          f"p50 {r['p50_ms']:8.2f} ms", flush=True)
  ratios, worst = {}, None
  for s in settings:
    p50 = {(r["method"], r["queries"]): r["p50_ms"] for r in s["rows"]}
    for q in (1, BATCH):
      if ("faiss", q) in p50:
        for other in ("faiss", "faiss-sq8", "faiss-sq8-refine"):
          ratios[f"int8_vs_{other}_{s['threads']}core_q{q}"] = (
              p50[(other, q)] / p50[("index-int8", q)])
        value = ratios[f"int8_vs_faiss_{s['threads']}core_q{q}"]
        worst = value if worst is None else min(worst, value)
  recall = settings[0]["recall10"]
  headline = {}
  if worst is not None:
    headline["retrieval_1e6_int8_vs_faiss_matched" if not quick
             else "retrieval_1e4_int8_vs_faiss_matched"] = dict(
        value=worst, recall10=recall.get("index-int8"),
        faiss_sq8_recall10=recall.get("faiss-sq8"),
        config=f"M={m} x E={E} random unit vectors, storage int8, top-{TOPK}, ModelIndex.search "
               f"p50; each setting in its own process pinned to its cores (1 and "
               f"{_cores()[-1]}), 1 query and {BATCH} at once; the smallest ratio",
        baseline="faiss IndexFlatIP float32 at the same cores (omp threads = cores)",
        target=">= 2")
  return {"rows": rows, "recall10": recall, "ratios": ratios, "headline": headline,
          "settings": [{k: s[k] for k in ("threads", "cores")} for s in settings],
          "note": "milliseconds per call; ratios are faiss's p50 over ours (> 1: ours is faster), "
                  "each setting in its own pinned process; random unit vectors only"}


if __name__ == "__main__":
  print(json.dumps(_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")))
