"""The trained Know2Vec proxy: backbone phi, aligned vectorizers and probe pool, as one artifact.

A :class:`Proxy` is what a zoo owner trains once and then serves: it vectorizes any black box
(a zoo stack or a wrapped callable) from its decision knowledge on the proxy's own probe pool, turns
a user's few-shot labelled images into a query vector, and builds the :class:`ModelIndex` that
answers queries. It trains through :mod:`know2vec_jax.pipeline` (the same path every experiment
takes) and remembers the knowledge of every model it has probed, so ``know2vec train`` followed by
``know2vec index build`` on the same zoo probes each model once.

Layout of a saved proxy directory (written atomically and checksummed, like every artifact)::

    proxy.json     manifest: format, version, configs, tasks, pool shape, knowledge ids and
                   fingerprints, checksums and shapes, training info
    backbone/      orbax checkpoint of phi's parameters
    vectorizer/    orbax checkpoint of the Know2Vec vectorizers (and task / accuracy heads)
    pool/          orbax checkpoint of the probe pool {"images": float32 [N, H, W, C]} (what it
                   was built from, entry by entry with its rows, is the manifest's ``pool``)
    knowledge/     orbax checkpoint of the compact knowledge of the probed models (anchor indices,
                   boundary positions, never-predicted flags; about 2 KB per model)
    reference/     orbax checkpoint of {"vectors": float32 [R, E]}: the query vectors of the
                   validation queries drawn after training (absent when R == 0)

The pool is stored with the proxy so that a black box added later is probed with exactly the images
the training models were probed with: its vector is comparable to theirs without retraining. An
index may add images of its own to it (a zoo owner's unlabelled images of their domain:
``build_index(..., pool=...)``); its rows are then probed on both.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from know2vec_jax import classmatch, features, pipeline, selection, shapes, storage
from know2vec_jax import pool as pool_lib
from know2vec_jax import config as config_lib
from know2vec_jax.backbone import Backbone
from know2vec_jax.blackbox import BlackBoxGroup, InputError, groups_from_zoo
from know2vec_jax.data import Task
from know2vec_jax.index import IndexStoreError, Matches, ModelIndex, check_k
from know2vec_jax.knowledge import KnowledgeRecord, KnowledgeStore, store_context
from know2vec_jax.pipeline import ProxyConfig, proxy_preset  # re-exported: the proxy's config
from know2vec_jax.vectorizers import Know2Vec, VectorizerConfig, pad_grid

FORMAT = "know2vec-proxy"
VERSION = 5  # 3: pool labels in the stored knowledge; class matching and its no-fit threshold;
# 4: reference query vectors (the index's hub cosines); 5: the pool's provenance, the pool and
# phi's labels in the config
MANIFEST = "proxy.json"
TREES = ("backbone", "vectorizer", "pool")  # what the fingerprint covers
HUB_DEPTH = 32  # reference cosines kept per index row (the most ``match.hub_k`` can average)


class ProxyError(ValueError):
  """A proxy that cannot be trained, saved, loaded or used as asked; the message says why."""


# ---- zoo adapters (records only: the weights stay behind the black boxes) ---------------------

def zoo_metadata(zoo, model_ids: Sequence[str] | None = None) -> dict[str, dict]:
  """Index metadata of zoo models from their records (never their weights).

  Returns:
    model id -> {arch, task, source, domain, k, classes, role, steps, train_accuracy,
    heldout_accuracy}.
  """
  ids = list(zoo.records) if model_ids is None else list(model_ids)
  out = {}
  for mid in ids:
    r = zoo.record(mid)
    out[mid] = {"arch": r.arch, "task": r.task.task_id, "source": r.source, "domain": r.domain,
                "k": r.k, "classes": list(r.class_names), "role": r.role, "steps": r.steps,
                "train_accuracy": float(r.train_accuracy),
                "heldout_accuracy": float(r.heldout_accuracy)}
  return out


def zoo_tasks(zoo, model_ids: Sequence[str] | None = None) -> dict[str, Task]:
  """The task each zoo model was trained on (the retrieval objective's supervision)."""
  ids = list(zoo.records) if model_ids is None else list(model_ids)
  return {m: zoo.record(m).task for m in ids}


# ---- the proxy ---------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "side"))
def _embed(graphdef, state, grid, mask, side: str):
  model = nnx.merge(graphdef, state)
  return model.embed_models(grid, mask) if side == "models" else model.embed_queries(grid, mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _predict(graphdef, state, q, m):
  return nnx.merge(graphdef, state).predict_accuracy(q[:, None], m[None])


class Proxy:
  """A trained Know2Vec proxy: frozen phi, aligned vectorizers, probe pool, config and tasks.

  Build one with :meth:`train` (a zoo), :meth:`fit` (any black boxes) or :meth:`load`.
  Attributes: ``config`` (:class:`ProxyConfig`), ``backbone`` (:class:`Backbone`), ``vectorizer``
  (the trained :class:`Know2Vec` NNX module; ``vectorizer.embed_models`` /
  ``vectorizer.embed_queries`` can be used inside other JAX code), ``pool`` (float32
  [N, H, W, C]), ``tasks`` (one dict per training task or target), ``info`` (training facts:
  seconds per stage, final losses), ``knowledge`` (the :class:`KnowledgeStore` of every model it
  has probed), ``reference`` (float32 [R, E]: query vectors of validation queries of the training
  tasks, against which every index row records how close its vector comes to a query).
  """

  def __init__(self, config: ProxyConfig, backbone: Backbone, vectorizer: Know2Vec,
               pool: np.ndarray, tasks: list[dict], info: dict | None = None,
               knowledge: KnowledgeStore | None = None, reference: np.ndarray | None = None,
               pool_provenance: Sequence[dict] = ()):
    self.config = config
    self.backbone = backbone
    self.vectorizer = vectorizer
    self.pool = np.asarray(pool, np.float32)
    self.pool_provenance = [dict(p) for p in pool_provenance]
    self.tasks = list(tasks)
    self.info = dict(info or {})
    self.knowledge = knowledge or KnowledgeStore(store_context(self.pool, config.knowledge))
    self._graphdef, self._state = nnx.split(vectorizer)
    self._pool_features = None
    self._index_pools: dict[str, np.ndarray] = {}  # an index pool's checksum -> its features
    self._pool_knowledge: dict[str, KnowledgeStore] = {}  # knowledge on index pools, by context
    self.reference = (np.zeros((0, self.embed_dim), np.float32) if reference is None
                      else np.asarray(reference, np.float32))

  # ---- properties --------------------------------------------------------------------------

  @property
  def vectorizer_config(self) -> VectorizerConfig:
    return self.vectorizer.cfg

  @property
  def embed_dim(self) -> int:
    """E, the size of model and query vectors (an index must have this vector size)."""
    return self.vectorizer.cfg.embed_dim

  @property
  def max_classes(self) -> int:
    return self.config.max_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.backbone.image_shape

  @property
  def has_accuracy_head(self) -> bool:
    return getattr(self.vectorizer, "accuracy_head", None) is not None

  @functools.cached_property
  def _trees(self) -> dict:
    return {"backbone": storage.pure(self.backbone.params),
            "vectorizer": storage.pure(self._state), "pool": {"images": self.pool}}

  @functools.cached_property
  def fingerprint(self) -> str:
    """A short hash of phi, the vectorizers and the pool: vectors of two proxies with the same
    fingerprint are comparable. Every index row this proxy adds records it (``proxy``)."""
    blob = "".join(storage.checksum(self._trees[t]) for t in TREES)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def pool_features(self) -> np.ndarray:
    """phi of the probe pool [N, D] (computed once)."""
    if self._pool_features is None:
      self._pool_features = np.asarray(self.backbone.embed(self.pool))
    return self._pool_features

  def index_pool(self, index: ModelIndex | None) -> np.ndarray:
    """The images an index's rows are probed on: the probe pool, then the index's own pool."""
    if index is None or index.pool is None:
      return self.pool
    if tuple(index.pool.shape[1:]) != self.image_shape:
      raise ProxyError(f"the index's own pool holds images of shape {index.pool.shape[1:]}, this "
                       f"proxy's are {self.image_shape}")
    return np.concatenate([self.pool, index.pool])

  def index_pool_features(self, index: ModelIndex | None) -> np.ndarray:
    """phi of :meth:`index_pool` [N + N', D] (the index's part computed once per pool)."""
    if index is None or index.pool is None:
      return self.pool_features()
    key = storage.checksum({"images": index.pool})
    if key not in self._index_pools:
      self._index_pools[key] = np.asarray(self.backbone.embed(index.pool))
    return np.concatenate([self.pool_features(), self._index_pools[key]])

  @property
  def provenance(self) -> dict:
    """What the proxy was built from: the probe pool's entries (source, split, images), phi's
    labelled (source, class) pairs and unlabelled images, and the training tasks' sources."""
    bb = self.info.get("backbone", {})
    labelled: dict[str, list[str]] = {}
    for name in bb.get("labels") or []:
      src, _, cls = name.partition(":")
      labelled.setdefault(src, []).append(cls)
    return {"pool": pool_lib.summary(self.pool_provenance), "pool_size": int(len(self.pool)),
            "backbone": {"labelled": labelled, "unlabelled": int(bb.get("unlabelled") or 0)},
            "training_sources": sorted({t["source"] for t in self.tasks if "source" in t})}

  # ---- training ----------------------------------------------------------------------------

  @classmethod
  def train(cls, zoo, cfg: ProxyConfig | None = None, *, model_ids: Sequence[str] | None = None,
            transfer: pipeline.TransferLabels | None = None,
            cache: pipeline.Cache | None = None, zoo_dir=None,
            exclude_targets: Sequence[Task] = (), progress: bool = True) -> "Proxy":
    """Trains a proxy on (some of) a zoo's models, seen only through black-box calls.

    The records give each model's training task (the retrieval objective's supervision) and the
    sources of the probe pool; the weights stay behind :func:`groups_from_zoo`. The
    ``"finetune"`` and ``"both"`` objectives also need measured fine-tune accuracies: unless
    ``transfer`` gives them, the product measures them itself (white-box, the zoo's weights):
    ``cfg.selection.targets`` training targets drawn from the zoo's train splits
    (:func:`know2vec_jax.selection.draw_targets`), every fine-tunable model fine-tuned on each
    (:func:`know2vec_jax.pipeline.finetune_labels`, cached under ``cache`` when ``zoo_dir`` is
    given).

    Args:
      zoo: a :class:`know2vec_jax.zoo.Zoo`.
      cfg: the config (default: the ``demo`` preset).
      model_ids: train on these models only (default: all).
      transfer: measured fine-tune accuracies for the ``"finetune"`` / ``"both"`` objectives
        (default: measured here).
      cache: share knowledge, phi, episodes and fine-tune labels through this cache.
      zoo_dir: the directory ``zoo`` was loaded from (keys the cached fine-tune labels).
      exclude_targets: tasks the drawn training targets must not equal (an evaluation's).
      progress: tqdm bars on the long steps.

    Returns:
      The trained proxy.

    Raises:
      ProxyError: see :meth:`fit`; also a zoo without fine-tunable models for an objective that
        needs labels.
    """
    cfg = cfg or proxy_preset("demo")
    ids = list(zoo.records) if model_ids is None else list(model_ids)
    if not ids:
      raise ProxyError("the zoo holds no models" if model_ids is None else
                       "model_ids names no model")
    groups = groups_from_zoo(zoo, strategy=cfg.strategy, model_ids=ids)
    if cfg.needs_labels and transfer is None:
      transfer = cls.measure_labels(zoo, cfg, ids, cache=cache, zoo_dir=zoo_dir,
                                    exclude_targets=exclude_targets, progress=progress)
    return cls.fit(groups, zoo_tasks(zoo, ids), cfg, transfer=transfer, cache=cache,
                   progress=progress)

  @staticmethod
  def measure_labels(zoo, cfg: ProxyConfig, model_ids: Sequence[str] | None = None, *,
                     cache: pipeline.Cache | None = None, zoo_dir=None,
                     exclude_targets: Sequence[Task] = (),
                     progress: bool = True) -> pipeline.TransferLabels:
    """The fine-tune labels :meth:`train` measures: ``cfg.selection.targets`` targets drawn from
    the zoo's train splits, every fine-tunable model of ``model_ids`` fine-tuned on each.

    Raises:
      ProxyError: no fine-tunable model among ``model_ids``.
    """
    sel = cfg.selection
    ids = selection.finetunable(zoo, model_ids)
    if not ids:
      raise ProxyError(f"objective {cfg.objective!r} needs fine-tune accuracies, and none of "
                       "the models is a network that can be fine-tuned")
    try:
      targets = selection.draw_targets(zoo_tasks(zoo, model_ids).values(), sel.targets, sel.ks,
                                       sel.seed, exclude_targets, cfg.max_classes)
    except ValueError as e:
      raise ProxyError(str(e)) from e
    return pipeline.finetune_labels(zoo, ids, targets, sel.finetune, zoo_dir, cache, progress)

  @classmethod
  def fit(cls, groups: Sequence[BlackBoxGroup], model_tasks: Mapping[str, Task],
          cfg: ProxyConfig | None = None, *, transfer: pipeline.TransferLabels | None = None,
          cache: pipeline.Cache | None = None, progress: bool = True) -> "Proxy":
    """Trains a proxy on black boxes whose training tasks are known.

    Steps (:mod:`know2vec_jax.pipeline`): probe pool from the tasks' sources (train splits) ->
    knowledge of every black box -> phi -> model grids -> query episodes (each task's train split,
    or each transfer target's shot pool) -> the aligner.

    Args:
      groups: the black boxes (:func:`groups_from_zoo`, :class:`CallableBlackBox`, ...).
      model_tasks: model id -> the :class:`Task` it was trained on, for every black box.
      cfg: the config (default: the ``demo`` preset).
      transfer: measured fine-tune accuracies (the ``"finetune"`` and ``"both"`` objectives).
      cache: a :class:`know2vec_jax.pipeline.Cache` to share derived artifacts through.
      progress: tqdm bars.

    Raises:
      ProxyError: no black boxes, a model without a task or with more than ``max_classes``
        classes, non-square images, an aligner batch the device count does not divide, or an
        objective without its labels.
    """
    cfg = cfg or proxy_preset("demo")
    groups = list(groups)
    ids = [m for g in groups for m in g.model_ids]
    if not ids:
      raise ProxyError("no black boxes to train on")
    if len(set(ids)) != len(ids):
      raise ProxyError(f"model id {next(m for m in ids if ids.count(m) > 1)!r} appears twice")
    missing = [m for m in ids if m not in model_tasks]
    if missing:
      raise ProxyError(f"no training task given for model {missing[0]!r}")
    too_big = [g.model_ids[0] for g in groups if g.num_classes > cfg.max_classes]
    if too_big:
      raise ProxyError(f"zoo model(s) have more than max_classes={cfg.max_classes} classes "
                       f"(e.g. {too_big[0]!r}); raise max_classes")
    if cfg.align.batch_size % jax.device_count():
      raise ProxyError(f"align.batch_size={cfg.align.batch_size} must be divisible by the "
                       f"{jax.device_count()} devices")
    if cfg.needs_labels != (transfer is not None):
      raise ProxyError(f"objective {cfg.objective!r} " + (
          "trains on TransferLabels (measured fine-tune accuracies): pass transfer=, or use "
          "Proxy.train, which measures them" if cfg.needs_labels else
          "takes no TransferLabels (the 'finetune' and 'both' objectives do)"))
    image_shape = groups[0].image_shape
    if image_shape[0] != image_shape[1] or any(g.image_shape != image_shape for g in groups):
      raise ProxyError(f"black boxes must all take one square image shape, got "
                       f"{sorted({g.image_shape for g in groups})}")
    joint = cfg.objective == "finetune"
    t = pipeline.train(groups, model_tasks, cfg, transfer=transfer if joint else None,
                       cache=cache, progress=progress)
    proxy = cls(cfg, t.backbone, t.vectorizer, t.pool, t.tasks, t.info, t.knowledge,
                pool_provenance=t.pool_provenance)
    proxy._pool_features = t.pool_features
    if cfg.objective == "both":
      proxy._fit_selection_head(t.rows, transfer, cache)
    if cfg.objective != "finetune" and cfg.calibration_queries:
      t0 = time.perf_counter()
      queries, q_tasks = proxy.validation_queries(t.rows[0], model_tasks,
                                                  sorted({g.image_shape for g in groups})[0])
      if queries:
        proxy.reference = proxy.embed_queries(queries)
        if cfg.match.enabled:
          proxy._calibrate_familiar(q_tasks)
          proxy._calibrate(t.rows, queries)
        proxy.info.setdefault("calibration", {}).update(
            {"queries": len(queries), "seconds": time.perf_counter() - t0})
    return proxy

  def _fit_selection_head(self, rows, labels: pipeline.TransferLabels,
                          cache: pipeline.Cache | None) -> None:
    """The ``"both"`` objective's second stage: an accuracy head on the frozen vectors."""
    t0 = time.perf_counter()
    sel = self.config.selection
    ids, grids, masks = rows[0], rows[1], rows[2]
    row = {m: i for i, m in enumerate(ids)}
    missing = [m for m in labels.model_ids if m not in row]
    if missing:
      raise ProxyError(f"fine-tune accuracy is given for model {missing[0]!r}, which is not "
                       "among the black boxes")
    order = np.asarray([row[m] for m in labels.model_ids])
    m_vec = self.embed_grids(grids[order], masks[order])
    ep, ep_mask = pipeline.episode_grids(self.backbone, labels.targets, sel.episodes, sel.shots,
                                         self.config.seed, self.max_classes, cache)
    t, e = ep.shape[:2]
    q_vec = self.embed_grids(ep.reshape((t * e,) + ep.shape[2:]),
                             np.repeat(ep_mask, e, axis=0), side="queries")
    head, info = selection.fit_head(q_vec, np.repeat(np.arange(t), e), m_vec, labels.accuracy,
                                    sel, self.vectorizer_config.hidden)
    self.vectorizer.accuracy_head = nnx.data(head)  # was a static None
    self._graphdef, self._state = nnx.split(self.vectorizer)
    for name in ("_trees", "fingerprint"):  # cached from the retrieval-only state
      self.__dict__.pop(name, None)
    info["seconds"] = time.perf_counter() - t0
    info["target_names"] = [s.name for s in labels.targets]
    self.info["selection"] = info
    self.info.setdefault("seconds", {})["selection_head"] = info["seconds"]

  def validation_queries(self, ids, model_tasks: Mapping[str, Task], image_shape) -> tuple:
    """The calibration's queries: ``calibration_queries`` queries of ``shots`` images per class
    from each training task's train split, outside the probe pool: queries like a user's, of
    tasks the proxy knows, that no training step saw.

    Args:
      ids: the training models; model_tasks: their tasks; image_shape: (H, W, C).

    Returns:
      (the (images, labels) queries, int [R] each one's task number).
    """
    cfg = self.config
    tasks = sorted({model_tasks[m] for m in ids}, key=lambda t: t.task_id)
    queries, q_tasks = [], []
    for task_no, task in enumerate(tasks):
      s = pipeline.LabelledSet.from_task(task, "train", image_shape)
      keep = ~np.isin(s.index, pool_lib.excluded_rows(self.pool_provenance, task.source,
                                                      "train"))
      if np.bincount(s.labels[keep], minlength=s.k).min() == 0:
        continue  # a class whose every train image is in the pool: no clean validation query
      s = dataclasses.replace(s, name=s.name + ":calibration", index=s.index[keep],
                              labels=s.labels[keep])
      picks, y = pipeline.draw_episodes(s, cfg.calibration_queries, cfg.shots, cfg.seed)
      queries += [(s.images[p], yy) for p, yy in zip(picks, y)]
      q_tasks += [task_no] * len(y)
    return queries, np.asarray(q_tasks, np.int64)

  def _calibrate_familiar(self, q_tasks) -> None:
    """Records how close the reference queries come to their own and to other tasks'
    (:func:`know2vec_jax.classmatch.calibrate_familiar`, in ``info["familiar"]``) and, with a
    ``familiar_quantile`` above 0, sets the familiar-task threshold from it; fewer than two
    reference tasks leave the gate off."""
    match = self.config.match
    try:
      cal = classmatch.calibrate_familiar(self.reference, q_tasks, match.familiar_quantile)
    except ValueError as e:
      self.info["familiar"] = {"threshold": None, "why": str(e)}
      return
    if match.familiar_quantile:
      self.config = dataclasses.replace(self.config, match=dataclasses.replace(
          match, familiar_threshold=cal["threshold"]))
    self.info["familiar"] = {
        "threshold": cal["threshold"] if match.familiar_quantile else None,
        "quantile": match.familiar_quantile, "seen_pass": cal["seen_pass"],
        "other_task": [round(x, 5) for x in cal["other_task"]],
        "same_task": [round(x, 5) for x in cal["same_task"]]}

  def _calibrate(self, rows, queries) -> None:
    """Sets the no-fit threshold from validation queries of the training tasks
    (:meth:`_validation_queries`), ranked against the training models: the ``false_alarm``
    quantile of their best models' fit scores (:func:`know2vec_jax.classmatch.calibrate_threshold`).
    """
    cfg = self.config
    ids, grids, masks, labels = rows
    index = ModelIndex(self.embed_dim)
    vectors, classes = self._index_rows(grids, masks, labels)
    index.add_vectors(ids, vectors, classes=classes)
    found = self.search(index, queries, k=1)
    threshold = classmatch.calibrate_threshold(found.fit, cfg.false_alarm)
    self.config = dataclasses.replace(cfg, match=dataclasses.replace(cfg.match,
                                                                     fit_threshold=threshold))
    self.info["calibration"] = {"threshold": threshold, "false_alarm": cfg.false_alarm,
                                "fit_quantiles": np.quantile(found.fit, [0, .02, .05, .5]).tolist()}

  # ---- vectorizing models and queries ------------------------------------------------------

  def _check_groups(self, groups: Sequence[BlackBoxGroup]) -> list[str]:
    for g in groups:
      if not isinstance(g, BlackBoxGroup):
        raise ProxyError(f"expected a BlackBoxGroup (a zoo stack or a CallableBlackBox), got "
                         f"{type(g).__name__}")
      if tuple(g.image_shape) != self.image_shape:
        raise ProxyError(f"black box {g.model_ids[0]!r} takes images of shape {g.image_shape}, "
                         f"the proxy's probe pool has {self.image_shape}")
      if g.num_classes > self.max_classes:
        raise ProxyError(f"black box {g.model_ids[0]!r} has {g.num_classes} classes, more than "
                         f"the proxy's maximum of {self.max_classes} (max_classes)")
    ids = [m for g in groups for m in g.model_ids]
    if len(set(ids)) != len(ids):
      dup = next(m for m in ids if ids.count(m) > 1)
      raise ProxyError(f"model id {dup!r} appears in more than one black box")
    return ids

  def knowledge_of(self, groups: Sequence[BlackBoxGroup], cache: pipeline.Cache | None = None,
                   progress: bool = False, index: ModelIndex | None = None):
    """The knowledge of black boxes on the proxy's pool (followed by ``index``'s own pool, when
    it has one): remembered when the proxy (or ``cache``) probed the same model (id and
    fingerprint) on the same images before, else extracted now."""
    groups = list(groups)
    self._check_groups(groups)
    pool = self.index_pool(index)
    if pool is self.pool:
      stores = [self.knowledge]
    else:  # an index's own pool: knowledge kept for this session, and in the cache
      context = store_context(pool, self.config.knowledge)
      stores = [self._pool_knowledge.setdefault(context, KnowledgeStore(context))]
    if cache is not None:
      stores.append(cache.knowledge_store(pool, self.config.knowledge))
    bar = pipeline.bar(sum(g.num_models for g in groups), "vectorizing models", progress)
    out = pipeline.extract(groups, pool, self.config.knowledge, stores,
                           bar.update if bar is not None else None)
    if bar is not None:
      bar.close()
    return out

  def model_grids(self, groups: Sequence[BlackBoxGroup], cache: pipeline.Cache | None = None,
                  progress: bool = False, index: ModelIndex | None = None):
    """Knowledge-grid features of black boxes, probed with the proxy's pool (and ``index``'s own
    pool, when it has one).

    Returns:
      (model ids [M], grids float32 [M, K_max, K_max, D], masks float32 [M, K_max]).
    """
    kn = self.knowledge_of(groups, cache, progress, index)
    return pipeline.knowledge_grids(self.backbone, self.index_pool_features(index), kn,
                                    self.max_classes, cache)

  def embed_grids(self, grids, masks, side: str = "models", batch_size: int = 256) -> np.ndarray:
    """Unit vectors [M, E] of padded feature grids (``side``: "models" or "queries")."""
    if side not in ("models", "queries"):
      raise ProxyError(f"side must be 'models' or 'queries', got {side!r}")
    grids, masks = np.asarray(grids, np.float32), np.asarray(masks, np.float32)
    out = []
    for i in range(0, len(grids), batch_size):
      g, m = grids[i:i + batch_size], masks[i:i + batch_size]
      # Chunks padded to a power of two (masked rows): few compilations whatever M is.
      size = shapes.bucket(len(g), batch_size, floor=16)
      out.append(np.asarray(_embed(self._graphdef, self._state, shapes.pad_rows(g, size),
                                   shapes.pad_rows(m, size), side))[:len(g)])
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

  def vectorize(self, groups: BlackBoxGroup | Sequence[BlackBoxGroup],
                cache: pipeline.Cache | None = None, progress: bool = False
                ) -> tuple[list[str], np.ndarray]:
    """Model vectors of black boxes with the trained model vectorizer (no retraining).

    Args:
      groups: :class:`BlackBoxGroup` s: zoo stacks (:func:`groups_from_zoo`) or
        :class:`know2vec_jax.blackbox.CallableBlackBox` s wrapping any callable.
      cache: also look up (and store) knowledge there.
      progress: a tqdm bar over models.

    Returns:
      (model ids [M], unit vectors float32 [M, E]).

    Raises:
      ProxyError: wrong image shape, too many classes, repeated ids;
      BlackBoxError / BudgetExceededError from the black boxes themselves.
    """
    if isinstance(groups, BlackBoxGroup):
      groups = [groups]
    ids, grids, masks = self.model_grids(groups, cache, progress)
    return ids, self.embed_grids(grids, masks, "models")

  def query_grid(self, images, labels):
    """The padded query grid of a few-shot labelled image set: (grid [K_max, K_max, D],
    mask [K_max]); validated (see :func:`know2vec_jax.features.check_query`)."""
    grid = features.query_grid(self.backbone, images, labels, self.max_classes)
    gp, m = pad_grid(grid, self.max_classes)
    return np.asarray(gp), np.asarray(m)

  def embed_query(self, images, labels) -> np.ndarray:
    """The query vector of a few-shot labelled image set.

    Args:
      images: float32 [N, H, W, C] in [0, 1] (the proxy's image shape).
      labels: int [N] in 0..K-1, every class with at least one image, 2 <= K <= max_classes.

    Returns:
      float32 [E], a unit vector.

    Raises:
      InputError: bad images or labels (see :func:`know2vec_jax.features.check_query`).
    """
    return self.embed_queries([(images, labels)])[0]

  def embed_queries(self, queries: Sequence[tuple], batch_size: int = 64) -> np.ndarray:
    """The query vectors of many few-shot sets at once (what :meth:`embed_query` gives each).

    Queries of one shape (images and classes) are lifted and embedded as one batch, which is much
    faster than one call per query when evaluating or serving many.

    Args:
      queries: (images, labels) pairs, each as :meth:`embed_query` takes them.
      batch_size: queries per batched call.

    Returns:
      float32 [Q, E] unit vectors, in the order given.

    Raises:
      InputError: a bad query (the message says which of them and why).
    """
    return self.describe_queries(queries, batch_size, classes=False)[0]

  def describe_queries(self, queries: Sequence[tuple], batch_size: int = 64,
                       classes: bool = True, index: ModelIndex | None = None):
    """Query vectors and class descriptions of many few-shot sets (what retrieval reads).

    Args:
      queries: (images, labels) pairs, each as :meth:`embed_query` takes them.
      batch_size: queries per batched call.
      classes: also locate each query's classes in the probe pool.
      index: the index the queries will be matched against: its own pool, when it has one,
        follows the probe pool where the classes are located.

    Returns:
      (vectors float32 [Q, E], :class:`know2vec_jax.classmatch.QueryClasses` or None).

    Raises:
      InputError: a bad query (the message says which of them and why).
    """
    try:
      queries = list(queries)
    except TypeError:
      raise InputError(f"queries must be a list of (images, labels) pairs, got "
                       f"{type(queries).__name__}") from None
    checked = []
    for i, pair in enumerate(queries):
      if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        got = (f"an array of shape {np.shape(pair)}" if isinstance(pair, np.ndarray)
               else type(pair).__name__)
        raise InputError(f"query {i} must be an (images, labels) pair, got {got} (one query "
                         "is [(images, labels)])")
      images, labels = pair
      try:
        checked.append(features.check_query(images, labels, self.image_shape, self.max_classes))
      except InputError as e:
        if len(queries) == 1:
          raise
        raise InputError(f"query {i}: {e}") from e
    k_max = self.max_classes
    match = self.config.match
    out = np.zeros((len(checked), self.embed_dim), np.float32)
    protos = np.zeros((len(checked), k_max, self.backbone.dim), np.float32)
    masks = np.zeros((len(checked), k_max), np.float32)
    radius = np.ones((len(checked), k_max), np.float32)
    by_shape: dict[tuple, list[int]] = {}
    for i, (_, y, k) in enumerate(checked):
      by_shape.setdefault((len(y), k), []).append(i)
    for (_, k), rows in by_shape.items():
      for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        grid = features.query_grid_batch(self.backbone, np.stack([checked[i][0] for i in part]),
                                         np.stack([checked[i][1] for i in part]), k,
                                         radius=classes and match.radius)
        if classes and match.radius:
          grid, radius[part, :k] = grid
        gp, m = pad_grid(grid, k_max)
        m = np.broadcast_to(np.asarray(m), (len(part), k_max))
        out[part] = self.embed_grids(np.asarray(gp), m, "queries")
        protos[part, :k] = grid[:, np.arange(k), np.arange(k)]
        masks[part] = m
    if not classes:
      return out, None
    found = classmatch.query_classes(protos, masks, self.index_pool_features(index),
                                     match.neighbours, radius if match.radius else None,
                                     match.min_neighbours)
    found.familiarity = classmatch.familiarity(out, self.reference)
    return out, found

  def match_config(self, overrides: Sequence[str] = ()) -> classmatch.MatchConfig:
    """This proxy's retrieval settings with ``overrides`` ("key=value", ``MatchConfig`` fields).

    A new ``familiar_quantile`` without an explicit ``familiar_threshold`` re-derives the
    threshold from the reference queries' statistics recorded at training
    (:func:`know2vec_jax.classmatch.familiar_threshold`): the gate is tuned without retraining.

    Raises:
      ConfigError: an unknown field or a bad value.
    """
    match = config_lib.override(self.config.match, overrides)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if "familiar_quantile" in keys and "familiar_threshold" not in keys:
      other = self.info.get("familiar", {}).get("other_task")
      threshold = (classmatch.familiar_threshold(other, match.familiar_quantile)
                   if other and match.familiar_quantile else None)
      match = dataclasses.replace(match, familiar_threshold=threshold)
    return match

  def with_match(self, **changes) -> "Proxy":
    """The same trained proxy with other retrieval settings (``match.*``: weights, shortlist,
    thresholds; :meth:`match_config`); phi, the vectorizers and the pool are shared, so its
    fingerprint is the same.

    Raises:
      ConfigError: an unknown field or a bad value.
    """
    match = self.match_config([f"{k}={v}" for k, v in changes.items()])
    other = Proxy(dataclasses.replace(self.config, match=match), self.backbone, self.vectorizer,
                  self.pool, self.tasks, self.info, self.knowledge, self.reference,
                  self.pool_provenance)
    other._pool_features = self._pool_features
    other._index_pools = self._index_pools
    other._pool_knowledge = self._pool_knowledge
    return other

  def search(self, index: ModelIndex, queries: Sequence[tuple], k: int = 10) -> Matches:
    """Ranks an index's models for many few-shot queries: the aligned vectors' shortlist, then
    class-level matching (:meth:`ModelIndex.match` with this proxy's ``config.match``).

    Args:
      index: an index built with this proxy.
      queries: (images, labels) pairs.
      k: models per query.

    Returns:
      :class:`know2vec_jax.index.Matches` (ids, scores and their parts, fit and the no-fit flag
      per query).

    Raises:
      InputError: a bad query; ProxyError: k not a positive int, an index of another vector
        size or one that holds no class knowledge while class matching is on.
    """
    check_k(k, ProxyError)
    self.check_index(index)
    match = self.config.match
    if match.enabled and not index.has_classes:
      raise ProxyError("the index holds no class knowledge: rebuild it with this proxy "
                       "(`know2vec index build`), or query with --set match.enabled=false")
    if match.enabled:
      self.check_index_pool(index)
    vectors, classes = self.describe_queries(queries, classes=match.enabled, index=index)
    if not match.enabled:
      return index.match(vectors, None, k, match)
    if classes.prototypes.shape[1] != index.classes["tokens"].shape[1]:
      raise ProxyError("the index's class knowledge was made by another proxy (other probe pool "
                       "or max_classes); rebuild it with this proxy")
    return index.match(vectors, classes, k, match)

  def predict_accuracy(self, query_vectors, model_vectors) -> np.ndarray:
    """Predicted fine-tune accuracy of each model on each query's task (accuracy head).

    Args:
      query_vectors: float32 [Q, E] (from :meth:`embed_query`).
      model_vectors: float32 [M, E] (from :meth:`vectorize` or an index's ``vectors``).

    Returns:
      float32 [Q, M] in [0, 1].

    Raises:
      ProxyError: a proxy trained without an accuracy head (objective ``"retrieve"``).
    """
    self._require_head()
    q = jnp.asarray(np.atleast_2d(np.asarray(query_vectors, np.float32)))
    return np.asarray(_predict(self._graphdef, self._state, q,
                               jnp.asarray(np.asarray(model_vectors, np.float32))))

  def _require_head(self) -> None:
    if not self.has_accuracy_head:
      raise ProxyError("this proxy has no accuracy head: train it with objective 'both' or "
                       "'finetune' (`know2vec train --objective both`)")

  def select(self, images, labels, index: ModelIndex, k: int = 10) -> list[dict]:
    """Ranks the index's models by predicted fine-tune accuracy on a few-shot task.

    The query is embedded exactly as for retrieval; the accuracy head scores it against every
    row of the index (the same vectors retrieval searches: one index serves both).

    Args:
      images: float32 [N, H, W, C] in [0, 1], the task's labelled shots.
      labels: int [N] in 0..K-1.
      index: an index built with this proxy.
      k: how many models to return.

    Returns:
      One dict per model, best first: ``rank`` (1-based), ``model_id``, ``predicted_accuracy``
      (in [0, 1]), ``arch`` and ``task`` (None when the index has no such metadata), then the
      rest of the model's metadata.

    Raises:
      InputError: a bad query; ProxyError: a proxy without an accuracy head, an empty index, an
      index of another vector size, or rows another proxy vectorized.
    """
    self._require_head()
    check_k(k, ProxyError)
    self.check_index(index)
    if len(index) == 0:
      raise ProxyError("the index is empty: add models with `know2vec index add`")
    q = self.embed_query(images, labels)
    pred = self.predict_accuracy(q[None], index.vectors)[0]
    ids = index.ids
    order = np.argsort(-pred, kind="stable")[:min(int(k), len(ids))]
    return [_result_row(self, index, ids[i], r, {"predicted_accuracy": float(pred[i])})
            for r, i in enumerate(order)]

  def build_index(self, groups: BlackBoxGroup | Sequence[BlackBoxGroup],
                  metadata: Mapping[str, dict] | None = None, index: ModelIndex | None = None,
                  cache: pipeline.Cache | None = None, progress: bool = False,
                  pool: "pool_lib.Pool | np.ndarray | None" = None) -> ModelIndex:
    """Vectorizes black boxes and adds them to an index (a new one unless ``index`` is given).

    Any black boxes will do, of sources and classes the proxy never trained on: nothing is
    retrained. ``pool`` gives a new (or empty) index its own pool, unlabelled images (e.g. of the
    zoo's domain) that follow the proxy's probe pool wherever this index's rows are probed and
    its queries' classes are located (:meth:`ModelIndex.set_pool`); an index that has one keeps
    using it when rows are added later.

    Each row's metadata: ``num_classes``, ``proxy`` (this proxy's fingerprint),
    ``never_predicted`` (the class ids the model never predicted on the probe pool, whose anchors
    are fallbacks; only when there are any), then the group's own ``metadata`` attribute when it
    has one (a dict per model id, or one dict for a group of one model), then
    ``metadata[model_id]`` (e.g. :func:`zoo_metadata`).

    Raises:
      ProxyError: as :meth:`vectorize`, or an index whose vector size is not the proxy's;
      IndexStoreError: an id already in ``index`` (checked before any black box is called).
    """
    if isinstance(groups, BlackBoxGroup):
      groups = [groups]
    groups = list(groups)
    if index is None:
      index = ModelIndex(self.embed_dim)
    self.check_index(index)
    present = [m for g in groups for m in g.model_ids if m in index]
    if present:
      raise IndexStoreError(f"{len(present)} model id(s) already in the index, e.g. "
                            f"{present[0]!r}")
    if pool is not None:
      images, prov = ((pool.images, pool.provenance) if isinstance(pool, pool_lib.Pool)
                      else (pool, [{"source": "array", "images": int(len(pool))}]))
      if tuple(np.shape(images)[1:]) != self.image_shape:
        raise ProxyError(f"the index's pool holds images of shape {list(np.shape(images)[1:])}, "
                         f"this proxy's are {list(self.image_shape)}")
      index.set_pool(images, prov)
    try:
      return self._fill_index(groups, metadata, index, cache, progress)
    except BaseException:
      if pool is not None and not len(index):  # refused: the index stays as it was, no pool
        index._unset_pool()
      raise

  def _fill_index(self, groups, metadata, index, cache, progress) -> ModelIndex:
    """:meth:`build_index` once the index (and its pool) is checked: probes, embeds, adds."""
    self.check_index_pool(index)
    kn = self.knowledge_of(groups, cache, progress, index)
    ids, grids, masks = pipeline.knowledge_grids(self.backbone, self.index_pool_features(index),
                                                 kn, self.max_classes, cache)
    vectors, classes = self._index_rows(grids, masks,
                                        np.concatenate([k.pool_labels for k in kn]))
    metas = []
    for g, k in zip(groups, kn):
      own = getattr(g, "metadata", None)
      for i, mid in enumerate(g.model_ids):
        meta = {"num_classes": g.num_classes, "proxy": self.fingerprint}
        never = np.flatnonzero(k.anchor_fallback[i]).tolist()
        if never:
          meta["never_predicted"] = never
        if isinstance(own, Mapping):
          if isinstance(own.get(mid), Mapping):
            meta.update(own[mid])
          elif g.num_models == 1 and not any(isinstance(v, Mapping) for v in own.values()):
            meta.update(own)
        if metadata is not None:
          meta.update(metadata.get(mid, {}))
        metas.append(meta)
    index.add_vectors(ids, vectors, metas, classes=classes)
    index.record_proxy(self.fingerprint, self.provenance)
    return index

  def _index_rows(self, grids, masks, pool_labels):
    """What an index row holds for models with these padded grids: (unit vectors [M, E], class
    knowledge: tokens = the grids' diagonals (normalised mean phi of each class's anchors), their
    mask, the models' pool labels, and each model's ``HUB_DEPTH`` highest cosines to the reference
    queries, best first)."""
    k = grids.shape[1]
    vectors = self.embed_grids(grids, masks, "models")
    depth = min(HUB_DEPTH, len(self.reference))
    hub = -np.sort(-(vectors @ self.reference.T), axis=1)[:, :depth]
    classes = {"tokens": np.asarray(grids)[:, np.arange(k), np.arange(k)],
               "mask": np.asarray(masks, np.float32), "pool_labels": np.asarray(pool_labels),
               "hub": hub.astype(np.float32)}
    return vectors, classes

  def check_index_pool(self, index: ModelIndex) -> None:
    """Raises ProxyError when the index's rows were probed on other images than this proxy's
    pool (followed by the index's own pool)."""
    if index.has_classes and index.classes["pool_labels"].shape[1] != len(self.pool) + (
        0 if index.pool is None else len(index.pool)):
      raise ProxyError("the index's class knowledge was made by another proxy (other probe pool "
                       "or max_classes); rebuild it with this proxy")

  def check_index(self, index: ModelIndex) -> None:
    """Raises ProxyError when the index's vector size is not this proxy's E."""
    if index.dim != self.embed_dim:
      raise ProxyError(f"the index holds vectors of size {index.dim} but this proxy's vectorizer "
                       f"makes vectors of size {self.embed_dim}: it was built by another proxy; "
                       "rebuild it with this proxy")

  # ---- storage -----------------------------------------------------------------------------

  def _knowledge_tree(self):
    """The knowledge store as padded arrays (one row per model) plus (ids, fingerprints, ks)."""
    items = self.knowledge.items()
    k_max, a = self.max_classes, self.config.knowledge.anchors_per_class
    n = len(items)
    tree = {"anchor_index": np.zeros((n, k_max, a), np.int32),
            "flip_t": np.zeros((n, k_max, k_max), np.float32),
            "fallback": np.zeros((n, k_max), np.uint8), "queries": np.zeros((n,), np.int64),
            "pool_labels": np.zeros((n, len(self.pool)), np.uint8)}
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

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the proxy atomically: an interrupted save leaves any previous proxy at ``path``
    intact and loadable.

    Returns:
      The absolute path written.
    """
    trees = dict(self._trees)
    know, rows = self._knowledge_tree()
    if rows:  # orbax cannot write zero-size arrays
      trees["knowledge"] = know
    if len(self.reference):
      trees["reference"] = {"vectors": self.reference}
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
        "config": config_lib.to_dict(self.config),
        "backbone": {"image_shape": list(self.backbone.image_shape),
                     "num_labels": self.backbone.num_labels},
        "vectorizer": {"feature_dim": int(self.vectorizer.feature_dim),
                       "num_tasks": int(self.vectorizer.task_head.out_features),
                       "accuracy_head": self.has_accuracy_head},
        "pool_shape": list(self.pool.shape), "pool": self.pool_provenance,
        "tasks": self.tasks, "knowledge": rows,
        "reference": len(self.reference),
        "info": storage.json_ready(self.info),
    }
    return storage.save_artifact(path, trees, MANIFEST, manifest)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Proxy":
    """Loads a saved proxy, bit for bit.

    Raises:
      ProxyError: a missing, incomplete, truncated or corrupted proxy (the message names the
        path); every array is checked against the checksum recorded at save time.
    """
    root = pathlib.Path(path).expanduser().absolute()
    m = storage.read_manifest(root, MANIFEST, FORMAT, VERSION, "proxy", ProxyError,
                              hint=" (train one with `know2vec train`)")
    try:
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
      targets["reference"] = {"vectors": jax.ShapeDtypeStruct((n_ref, cfg.vectorizer.embed_dim),
                                                              np.float32)}
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
    proxy = cls(cfg, backbone, vectorizer, pool, tasks, m.get("info", {}), store,
                restored["reference"]["vectors"] if n_ref else None, provenance)
    if proxy.fingerprint != m.get("fingerprint"):
      raise ProxyError(f"proxy {root} is corrupted: fingerprint mismatch")
    return proxy

  def load_index(self, path: str | os.PathLike, **kwargs) -> ModelIndex:
    """Loads an index and checks its vector size against this proxy's (ProxyError if not)."""
    index = ModelIndex.load(path, **kwargs)
    self.check_index(index)
    return index


def _result_row(proxy: Proxy, index: ModelIndex, model_id: str, rank: int, scores: dict) -> dict:
  """One ranked row: rank, id, ``scores``, arch, task, then the model's other metadata; refuses a
  row another proxy vectorized (ProxyError)."""
  meta = index.metadata(model_id)
  fp = meta.get("proxy")
  if fp is not None and fp != proxy.fingerprint:
    raise ProxyError(f"model {model_id!r} of the index was vectorized by another proxy ({fp}, "
                     f"this one is {proxy.fingerprint}); rebuild the index with this proxy")
  return ({"rank": rank + 1, "model_id": model_id} | scores |
          {"arch": meta.pop("arch", None), "task": meta.pop("task", None)} | meta)


def query(proxy: Proxy, index: ModelIndex, images, labels, k: int = 10) -> list[dict]:
  """Ranks the index's models for a few-shot task (:func:`query_result` without the fit flag).

  Args:
    proxy: the trained proxy.
    index: an index built with this proxy.
    images: float32 [N, H, W, C] in [0, 1].
    labels: int [N] in 0..K-1.
    k: how many models to return.

  Returns:
    One dict per model, best first: ``rank`` (1-based), ``model_id``, ``score`` (the retrieval
    score, :func:`know2vec_jax.classmatch.combine`), its parts ``agreement``, ``token`` and
    ``vector`` (the cosine of the query and model vectors), ``arch`` and ``task`` (None when the
    index has no such metadata), then the rest of the model's metadata.

  Raises:
    InputError: a bad query; ProxyError: an index of another vector size, or top models that
    another proxy vectorized (their ``proxy`` fingerprint differs).
  """
  return query_result(proxy, index, images, labels, k)["results"]


def query_result(proxy: Proxy, index: ModelIndex, images, labels, k: int = 10) -> dict:
  """Ranks the index's models for a few-shot task and says whether any of them fits it.

  Returns:
    ``{"results": rows as :func:`query` gives them, "fit": the best model's class-level fit
    score, "no_fit": True when it is below the proxy's calibrated threshold (no model of the
    index fits the query's classes well), "fit_threshold": that threshold, "familiar": True
    when the query looks like one of a task the proxy trained on (scored with the familiar
    settings, :class:`know2vec_jax.classmatch.MatchConfig`)}``.

  Raises:
    As :func:`query`.
  """
  found = proxy.search(index, [(images, labels)], k)
  rows = [_result_row(proxy, index, mid, r, {
      "score": float(found.scores[0, r]), "agreement": float(found.agreement[0, r]),
      "token": float(found.token[0, r]), "vector": float(found.vector[0, r])})
      for r, mid in enumerate(found.ids[0])]
  return {"results": rows, "fit": float(found.fit[0]), "no_fit": bool(found.no_fit[0]),
          "fit_threshold": proxy.config.match.fit_threshold,
          "familiar": bool(found.familiar[0])}
