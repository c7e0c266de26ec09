"""End-to-end query latency: 5 shots x 4 classes of images -> query vector -> ranked list.

The product's query path, :func:`know2vec_jax.proxy.query` on a :class:`Proxy` of the default
(demo) configuration, per call: :meth:`Proxy.describe_queries` (validation, backbone features of
the shots and of the class midpoints, class-prototype grid, padding, the jitted query vectorizer,
the query classes' nearest pool images) -> :meth:`Retriever.score` over a 10^4-model index
(the vector shortlist, 4,096 by default, then class-level matching on the index's
resident class knowledge) -> ranked rows (model id, score and its
parts, metadata). The proxy's probe pool has the demo's 9,600 images, and every index row holds
class knowledge of a 4-way model (tokens and a label per pool image).

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
POOL = 9600  # the demo proxy's probe pool


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
  pool = np.resize(src.train_images, (POOL,) + src.image_shape)
  proxy = Proxy(cfg, backbone, Know2Vec(vcfg, backbone.dim, rngs=nnx.Rngs(0)), pool, tasks=[])
  eager_model = proxy.vectorizer
  index = ModelIndex(vcfg.embed_dim)
  vecs = rng.standard_normal((NUM_MODELS, vcfg.embed_dim), dtype=np.float32)
  k_max, d = cfg.max_classes, backbone.dim
  mask = np.zeros((NUM_MODELS, k_max), np.float32)
  mask[:, :CLASSES] = 1
  tokens = rng.random((NUM_MODELS, k_max, d), dtype=np.float32) * mask[..., None]
  classes = {"tokens": tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-6),
             "mask": mask, "pool_labels": rng.integers(0, CLASSES, (NUM_MODELS, POOL), np.uint8),
             "hub": -np.sort(-rng.random((NUM_MODELS, 32), dtype=np.float32), axis=1)}
  index.add_vectors([f"m{i}" for i in range(NUM_MODELS)], vecs,
                    [{"arch": ("mlp", "cnn_s", "cnn_l")[i % 3], "task": f"t{i % 500}"}
                     for i in range(NUM_MODELS)], classes=classes)
  setup_s = time.perf_counter() - t_setup

  match = proxy.retriever.config

  def ranked(vec, qc):
    found = proxy.retriever.score(index, np.asarray(vec)[None], qc, TOPK)
    return [dict(rank=r + 1, model_id=i, score=float(s), **index.metadata(i))
            for r, (i, s) in enumerate(zip(found.ids[0], found.scores[0]))]

  def end_to_end():
    return query(proxy, index, images, labels, k=TOPK)

  def end_to_end_eager():
    g, m = proxy.query_grid(images, labels)
    _, qc = proxy.describe_queries([(images, labels)])
    return ranked(eager_model.embed_queries(g[None], m[None])[0], qc)

  t0 = time.perf_counter()
  first = end_to_end()
  first_ms = (time.perf_counter() - t0) * 1e3
  assert len(first) == TOPK and first[0]["rank"] == 1
  samples, budget = (30, 2.0) if quick else (300, 10.0)
  e2e = latency(end_to_end, samples=samples, warmup=3, budget_s=budget)
  eager = latency(end_to_end_eager, samples=samples // 3, warmup=2, budget_s=budget / 2)
  # Stages (p50 each), so a regression shows where it is.
  g, gm = proxy.query_grid(images, labels)
  vecs_q, qc = proxy.describe_queries([(images, labels)])
  vec = vecs_q[0]
  stages = {
      "Proxy.query_grid (validate + backbone + prototypes + pad)":
          latency(lambda: proxy.query_grid(images, labels), samples=samples,
                  budget_s=budget / 5),
      "Proxy.embed_grids (jitted vectorizer)":
          latency(lambda: proxy.embed_grids(g[None], gm[None], "queries"), samples=samples,
                  budget_s=budget / 5),
      "vectorizer (eager NNX)":
          latency(lambda: eager_model.embed_queries(g[None], gm[None]), samples=samples // 3,
                  budget_s=budget / 5),
      "Proxy.describe_queries (vector + query classes in the pool)":
          latency(lambda: proxy.describe_queries([(images, labels)]), samples=samples,
                  budget_s=budget / 5),
      f"Retriever.score (M={NUM_MODELS}, shortlist {match.shortlist}) + ranked rows":
          latency(lambda: ranked(vec, qc), samples=samples, budget_s=budget / 5),
      f"index.search (M={NUM_MODELS}, vectors alone)":
          latency(lambda: index.search(vec, TOPK), samples=samples, budget_s=budget / 5),
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
             f"(E={vcfg.embed_dim}, {vcfg.variant} vectorizer, class matching of a "
             f"{match.shortlist}-model shortlist, pool {POOL})",
      baseline=f"same path, eager NNX vectorizer: p50 {eager['p50_ms']:.1f} ms",
      target="<= 5")}
  return {"rows": rows, "first_call_ms": first_ms, "setup_s": setup_s,
          "ratios": {"jit_vs_eager": ratio(eager["p50_ms"], e2e["p50_ms"])},
          "headline": headline, "num_devices": jax.device_count(),
          "note": "milliseconds per query; the first call (compilation) is reported separately "
                  "and excluded from p50/p99"}
