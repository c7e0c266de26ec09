"""End-to-end query latency: 5 shots x 4 classes of images -> query vector -> ranked list.

The product's query path, :func:`know2vec_jax.proxy.query` on a :class:`Proxy` of the default
(demo) configuration, per call: :meth:`Proxy.query_grid` (validation, backbone features of the
shots and of the class midpoints, class-prototype grid, padding) -> the jitted query vectorizer
(:meth:`Proxy.embed_grids`) -> :meth:`ModelIndex.search` over a 10^4-model index -> ranked rows
(model id, score, metadata).

Reported: the first call (compilation included) on its own, then p50 / p99 over many calls, and
the p50 of each stage. The same path with the vectorizer called eagerly (the proxy's Flax NNX
module un-jitted, one dispatch per op) is timed as the baseline: it is what a caller who does not
jit the module gets. The proxy's backbone and vectorizer are freshly initialised (latency does not
depend on trained values); the index holds random unit vectors of the vectorizer's size E.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from benchmarks.common import latency, ratio
from know2vec_jax.backbone import Backbone
from know2vec_jax.data import load_source
from know2vec_jax.index import ModelIndex
from know2vec_jax.proxy import Proxy, proxy_preset, query
from know2vec_jax.vectorizers import Know2Vec

NAME = "query"
SHOTS, CLASSES, TOPK = 5, 4, 10
NUM_MODELS = 10**4


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  del ctx
  src = load_source("mnist5k")
  rng = np.random.default_rng(0)
  picks = np.concatenate([rng.choice(np.flatnonzero(src.test_labels == c), SHOTS, replace=False)
                          for c in range(CLASSES)])
  images = src.test_images[picks]
  labels = np.repeat(np.arange(CLASSES, dtype=np.int32), SHOTS)

  t_setup = time.perf_counter()
  cfg = proxy_preset("demo")
  backbone = Backbone(cfg.backbone, src.image_shape, num_labels=10)
  vcfg = cfg.vectorizer
  proxy = Proxy(cfg, backbone, Know2Vec(vcfg, backbone.dim, rngs=nnx.Rngs(0)),
                src.train_images[:64], tasks=[])
  eager_model = proxy.vectorizer
  index = ModelIndex(vcfg.embed_dim)
  vecs = rng.standard_normal((NUM_MODELS, vcfg.embed_dim), dtype=np.float32)
  index.add_vectors([f"m{i}" for i in range(NUM_MODELS)], vecs,
                    [{"arch": ("mlp", "cnn_s", "cnn_l")[i % 3], "task": f"t{i % 500}"}
                     for i in range(NUM_MODELS)])
  setup_s = time.perf_counter() - t_setup

  def ranked(vec):
    scores, ids = index.search(np.asarray(vec), TOPK)
    return [dict(rank=r + 1, model_id=i, score=float(s), **index.metadata(i))
            for r, (i, s) in enumerate(zip(ids[0], scores[0]))]

  def end_to_end():
    return query(proxy, index, images, labels, k=TOPK)

  def end_to_end_eager():
    g, mask = proxy.query_grid(images, labels)
    return ranked(eager_model.embed_queries(g[None], mask[None])[0])

  t0 = time.perf_counter()
  first = end_to_end()
  first_ms = (time.perf_counter() - t0) * 1e3
  assert len(first) == TOPK and first[0]["rank"] == 1
  samples, budget = (30, 2.0) if quick else (300, 10.0)
  e2e = latency(end_to_end, samples=samples, warmup=3, budget_s=budget)
  eager = latency(end_to_end_eager, samples=samples // 3, warmup=2, budget_s=budget / 2)
  # Stages (p50 each), so a regression shows where it is.
  g, mask = proxy.query_grid(images, labels)
  vec = proxy.embed_grids(g[None], mask[None], "queries")[0]
  stages = {
      "Proxy.query_grid (validate + backbone + prototypes + pad)":
          latency(lambda: proxy.query_grid(images, labels), samples=samples,
                  budget_s=budget / 4),
      "Proxy.embed_grids (jitted vectorizer)":
          latency(lambda: proxy.embed_grids(g[None], mask[None], "queries"), samples=samples,
                  budget_s=budget / 4),
      "vectorizer (eager NNX)":
          latency(lambda: eager_model.embed_queries(g[None], mask[None]), samples=samples // 3,
                  budget_s=budget / 4),
      f"index.search (M={NUM_MODELS}) + ranked rows": latency(lambda: ranked(vec),
                                                              samples=samples,
                                                              budget_s=budget / 4),
  }
  rows = [dict(path="end to end (jitted vectorizer)", **e2e),
          dict(path="end to end (eager NNX vectorizer)", **eager)]
  rows += [dict(path=f"stage: {name}", **lat) for name, lat in stages.items()]
  for r in rows:
    print(f"  {r['path']:55s} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms", flush=True)
  print(f"  first call (compiles) {first_ms:.0f} ms", flush=True)
  headline = {"query_p50_ms_1e4": dict(
      value=e2e["p50_ms"], p99_ms=e2e["p99_ms"], first_call_ms=first_ms,
      config=f"{SHOTS} shots x {CLASSES} classes -> ranked top-{TOPK} of {NUM_MODELS} models "
             f"(E={vcfg.embed_dim}, {vcfg.variant} vectorizer)",
      baseline=f"same path, eager NNX vectorizer: p50 {eager['p50_ms']:.1f} ms",
      target="<= 20")}
  return {"rows": rows, "first_call_ms": first_ms, "setup_s": setup_s,
          "ratios": {"jit_vs_eager": ratio(eager["p50_ms"], e2e["p50_ms"])},
          "headline": headline, "num_devices": jax.device_count(),
          "note": "milliseconds per query; the first call (compilation) is reported separately "
                  "and excluded from p50/p99"}
