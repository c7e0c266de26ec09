"""A trained proxy on disk: :func:`save` and :func:`load` (what ``Proxy.save`` / ``Proxy.load``
run).

Layout of a saved proxy directory (written atomically and checksummed, like every artifact)::

    proxy.json     manifest: format, version, configs, tasks, pool shape and provenance,
                   knowledge ids and fingerprints, retrieval's fitted statistics (thresholds and
                   the scores they were read from), checksums and shapes, training info
    backbone/      orbax checkpoint of phi's parameters
    vectorizer/    orbax checkpoint of the Know2Vec vectorizers (and task / accuracy heads)
    pool/          orbax checkpoint of the probe pool {"images": float32 [N, H, W, C]}
    knowledge/     orbax checkpoint of the compact knowledge of the probed models (anchor indices,
                   boundary positions, never-predicted flags; about 2 KB per model)
    reference/     orbax checkpoint of {"vectors": float32 [R, E]}: the reference queries
                   (validation queries of the training tasks; absent when R == 0)

Version 5 proxies (thresholds inside the config's ``match`` section) load as well: their
thresholds become the fitted statistics they are.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import numpy as np
from flax import nnx

from know2vec_jax import config as config_lib
from know2vec_jax import pool as pool_lib
from know2vec_jax import retrieval, storage
from know2vec_jax.backbone import Backbone
from know2vec_jax.knowledge import KnowledgeRecord, KnowledgeStore, store_context
from know2vec_jax.pipeline import ProxyConfig, ProxyError
from know2vec_jax.vectorizers import Know2Vec

FORMAT = "know2vec-proxy"
VERSION = 6  # 3: pool labels in the stored knowledge; class matching and its no-fit threshold;
# 4: reference query vectors (the index's hub cosines); 5: the pool's provenance, the pool and
# phi's labels in the config; 6: retrieval's fitted statistics apart from the config
READS = (5, 6)
MANIFEST = "proxy.json"


def _knowledge_tree(proxy):
  """The knowledge store as padded arrays (one row per model) plus (ids, fingerprints, ks)."""
  items = proxy.knowledge.items()
  k_max, a = proxy.max_classes, proxy.config.knowledge.anchors_per_class
  n = len(items)
  tree = {"anchor_index": np.zeros((n, k_max, a), np.int32),
          "flip_t": np.zeros((n, k_max, k_max), np.float32),
          "fallback": np.zeros((n, k_max), np.uint8), "queries": np.zeros((n,), np.int64),
          "pool_labels": np.zeros((n, len(proxy.pool)), np.uint8)}
  rows = []
  for i, ((mid, fp), r) in enumerate(items):
    k = r.k
    tree["anchor_index"][i, :k] = r.anchor_index
    tree["flip_t"][i, :k, :k] = r.flip_t
    tree["fallback"][i, :k] = r.anchor_fallback
    tree["queries"][i] = r.queries
    tree["pool_labels"][i] = r.pool_labels
    rows.append([mid, fp, k])
  return tree, rows


def save(proxy, path: str | os.PathLike) -> pathlib.Path:
  """Writes the proxy atomically: an interrupted save leaves any previous proxy at ``path``
  intact and loadable.

  Returns:
    The absolute path written.
  """
  trees = dict(proxy.trees)
  know, rows = _knowledge_tree(proxy)
  if rows:  # orbax cannot write zero-size arrays
    trees["knowledge"] = know
  reference = proxy.reference
  if len(reference):
    trees["reference"] = {"vectors": reference}
  manifest = {
      "format": FORMAT, "version": VERSION, "fingerprint": proxy.fingerprint,
      "config": config_lib.to_dict(proxy.config),
      "backbone": {"image_shape": list(proxy.backbone.image_shape),
                   "num_labels": proxy.backbone.num_labels},
      "vectorizer": {"feature_dim": int(proxy.vectorizer.feature_dim),
                     "num_tasks": int(proxy.vectorizer.task_head.out_features),
                     "accuracy_head": proxy.has_accuracy_head},
      "pool_shape": list(proxy.pool.shape), "pool": proxy.pool_provenance,
      "tasks": proxy.tasks, "knowledge": rows,
      "reference": len(reference),
      "retrieval": proxy.retriever.calibration.to_manifest(),
      "info": storage.json_ready(proxy.info),
  }
  return storage.save_artifact(path, trees, MANIFEST, manifest)


def _v5_thresholds(m: dict) -> tuple[dict, float | None]:
  """A version 5 manifest's thresholds moved out of its config: (the calibration's manifest
  form, the familiar threshold it used)."""
  match = m["config"].get("match", {}) if isinstance(m["config"], dict) else {}
  fit = match.pop("fit_threshold", 0.0)
  familiar = match.pop("familiar_threshold", None)
  fam = (m.get("info") or {}).get("familiar") or {}
  cal = {"fit_threshold": fit, "false_alarm": (m.get("info") or {}).get(
      "calibration", {}).get("false_alarm"),
         "familiar_other": fam.get("other_task", ()), "familiar_same": fam.get("same_task", ())}
  return cal, familiar


def load(path: str | os.PathLike):
  """Loads a saved proxy, bit for bit.

  Raises:
    ProxyError: a missing, incomplete, truncated or corrupted proxy (the message names the
      path); every array is checked against the checksum recorded at save time.
  """
  from know2vec_jax.proxy import Proxy
  root = pathlib.Path(path).expanduser().absolute()
  m = storage.read_manifest(root, MANIFEST, FORMAT, READS, "proxy", ProxyError,
                            hint=" (train one with `know2vec train`)")
  try:
    familiar = retrieval._DERIVED
    if m["version"] == 5:
      cal_manifest, familiar = _v5_thresholds(m)
    else:
      cal_manifest = m["retrieval"]
    cfg = config_lib.from_dict(ProxyConfig, m["config"], "config")
    bb, vec = m["backbone"], m["vectorizer"]
    try:
      # Shapes only: the restore fills them in (initialising would compile a random-number
      # program per parameter shape, seconds each on a CPU, for values thrown away).
      backbone = Backbone.abstract(cfg.backbone, bb["image_shape"], int(bb["num_labels"]))
      vectorizer = nnx.eval_shape(lambda: Know2Vec(
          cfg.vectorizer, int(vec["feature_dim"]), int(vec["num_tasks"]),
          accuracy_head=bool(vec["accuracy_head"]), rngs=nnx.Rngs(0)))
    except Exception as e:  # Flax and JAX refuse bad sizes with many types (and allocations)
      raise ValueError(f"its backbone and vectorizer records build no model: "
                       f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
    pool_shape = tuple(int(d) for d in m["pool_shape"])
    if len(pool_shape) != 4 or min(pool_shape) < 1:
      raise ValueError(f"pool_shape {list(pool_shape)} is not [N, H, W, C]")
    problem = pool_lib.provenance_problem(m["pool"])
    if problem:
      raise ValueError(problem)
    provenance = [dict(p) for p in m["pool"]]
    tasks, rows = list(m["tasks"]), [(i, f, k) for i, f, k in m["knowledge"]]
    if not all(isinstance(i, str) and isinstance(f, str) and isinstance(k, int)
               and 2 <= k <= cfg.max_classes for i, f, k in rows):
      raise ValueError(f"a knowledge row is not [model id, fingerprint, K in 2.."
                       f"{cfg.max_classes}]")
    n_ref = int(m["reference"])
    if n_ref < 0:
      raise ValueError(f"reference count {n_ref}")
    embed_dim = cfg.vectorizer.embed_dim
    calibration = retrieval.Calibration.from_manifest(cal_manifest, ())  # checked before any
    # array is read; the reference vectors follow from the restore
  except (KeyError, TypeError, ValueError) as e:
    raise ProxyError(f"{root / MANIFEST} is corrupted: {type(e).__name__}: {e}") from e
  _, v_state = nnx.split(vectorizer)
  targets = {"backbone": storage.pure(backbone.params), "vectorizer": storage.pure(v_state),
             "pool": {"images": jax.ShapeDtypeStruct(pool_shape, np.float32)}}
  k_max, a = cfg.max_classes, cfg.knowledge.anchors_per_class
  if rows:
    n = len(rows)
    sds = jax.ShapeDtypeStruct  # shapes only: nothing is allocated before the checks
    targets["knowledge"] = {"anchor_index": sds((n, k_max, a), np.int32),
                            "flip_t": sds((n, k_max, k_max), np.float32),
                            "fallback": sds((n, k_max), np.uint8),
                            "queries": sds((n,), np.int64),
                            "pool_labels": sds((n, pool_shape[0]), np.uint8)}
  if n_ref:
    targets["reference"] = {"vectors": jax.ShapeDtypeStruct((n_ref, embed_dim), np.float32)}
  restored = storage.restore_trees(root, m, targets, "proxy", ProxyError)
  nnx.replace_by_pure_dict(backbone.params, restored["backbone"])
  nnx.replace_by_pure_dict(v_state, restored["vectorizer"])
  nnx.update(vectorizer, v_state)
  pool = restored["pool"]["images"]
  store = KnowledgeStore(store_context(pool, cfg.knowledge))
  for i, (mid, fp, k) in enumerate(rows):
    kn = restored["knowledge"]
    store.put(mid, fp, KnowledgeRecord(kn["anchor_index"][i, :k], kn["flip_t"][i, :k, :k],
                                       kn["fallback"][i, :k].astype(bool),
                                       int(kn["queries"][i]), kn["pool_labels"][i]))
  if n_ref:
    calibration = dataclasses.replace(calibration, reference=restored["reference"]["vectors"])
  proxy = Proxy(cfg, backbone, vectorizer, pool, tasks, m.get("info", {}), store, calibration,
                provenance)
  if familiar is not retrieval._DERIVED:  # a version 5 proxy's threshold, exactly as it used it
    proxy.retriever = retrieval.Retriever(cfg.match, calibration, familiar_threshold=familiar)
  if proxy.fingerprint != m.get("fingerprint"):
    raise ProxyError(f"proxy {root} is corrupted: fingerprint mismatch")
  return proxy
