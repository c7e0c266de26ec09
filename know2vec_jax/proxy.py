"""The trained Know2Vec proxy: backbone phi, aligned vectorizers, probe pool and retrieval, as one
artifact that serves.

A :class:`Proxy` is what a zoo owner trains once and then serves: it vectorizes any black box
(a zoo stack or a wrapped callable) from its decision knowledge on the proxy's own probe pool, turns
a user's few-shot labelled images into a query vector and class description, builds the
:class:`ModelIndex` that answers queries, and ranks an index's models through its
:class:`know2vec_jax.retrieval.Retriever`. Training is :mod:`know2vec_jax.training`'s (the same
pipeline every experiment takes), storage :mod:`know2vec_jax.proxy_store`'s. The proxy remembers
the knowledge of every model it has probed, so ``know2vec train`` followed by ``know2vec index
build`` on the same zoo probes each model once.

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
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from know2vec_jax import features, indexing, pipeline, proxy_store, retrieval, selection
from know2vec_jax import shapes, storage
from know2vec_jax import pool as pool_lib
from know2vec_jax import queries as queries_lib
from know2vec_jax import training
from know2vec_jax.backbone import Backbone
from know2vec_jax.blackbox import BlackBoxGroup
from know2vec_jax.index import ModelIndex, check_k
from know2vec_jax.indexing import HUB_DEPTH  # noqa: F401 (re-exported)
from know2vec_jax.knowledge import KnowledgeStore, store_context
from know2vec_jax.pipeline import ProxyConfig, ProxyError, proxy_preset  # re-exported
from know2vec_jax.proxy_store import FORMAT, MANIFEST, VERSION  # noqa: F401 (re-exported)
from know2vec_jax.retrieval import Calibration, Matches, Retriever, query, query_result  # noqa: F401
from know2vec_jax.training import zoo_metadata, zoo_tasks  # noqa: F401 (re-exported)
from know2vec_jax.vectorizers import Know2Vec, pad_grid

TREES = ("backbone", "vectorizer", "pool")  # what the fingerprint covers


@functools.partial(jax.jit, static_argnames=("graphdef", "side"))
def _embed(graphdef, state, grid, mask, side: str):
  model = nnx.merge(graphdef, state)
  return model.embed_models(grid, mask) if side == "models" else model.embed_queries(grid, mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _predict(graphdef, state, q, m):
  return nnx.merge(graphdef, state).predict_accuracy(q[:, None], m[None])


class Proxy:
  """A trained Know2Vec proxy: frozen phi, aligned vectorizers, probe pool, retrieval, config and
  tasks.

  Build one with :meth:`train` (a zoo), :meth:`fit` (any black boxes) or :meth:`load`.
  Attributes: ``config`` (:class:`ProxyConfig`), ``backbone`` (:class:`Backbone`), ``vectorizer``
  (the trained :class:`Know2Vec` NNX module; ``vectorizer.embed_models`` /
  ``vectorizer.embed_queries`` can be used inside other JAX code), ``pool`` (float32
  [N, H, W, C]), ``tasks`` (one dict per training task or target), ``info`` (training facts:
  seconds per stage, final losses, the calibrations' reports), ``knowledge`` (the
  :class:`KnowledgeStore` of every model it has probed), ``retriever`` (the
  :class:`know2vec_jax.retrieval.Retriever`: ``config.match`` and the statistics fitted after
  training, :class:`know2vec_jax.retrieval.Calibration`).
  """

  def __init__(self, config: ProxyConfig, backbone: Backbone, vectorizer: Know2Vec,
               pool: np.ndarray, tasks: list[dict], info: dict | None = None,
               knowledge: KnowledgeStore | None = None, calibration: Calibration | None = None,
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
    self._index_pools: dict = {}  # id(an index's pool) -> (that pool, phi of the whole pool)
    self._pool_knowledge: dict[str, KnowledgeStore] = {}  # knowledge on index pools, by context
    self.retriever = Retriever(config.match, calibration)

  # ---- properties --------------------------------------------------------------------------

  vectorizer_config = property(lambda self: self.vectorizer.cfg)

  @property
  def embed_dim(self) -> int:
    """E, the size of model and query vectors (an index must have this vector size)."""
    return self.vectorizer.cfg.embed_dim

  max_classes = property(lambda self: self.config.max_classes)
  image_shape = property(lambda self: self.backbone.image_shape)
  has_accuracy_head = property(lambda self: getattr(self.vectorizer, "accuracy_head", None)
                               is not None)

  @property
  def reference(self) -> np.ndarray:
    """float32 [R, E] the reference queries (validation queries of the training tasks), against
    which every index row records how close its vector comes to a query."""
    ref = self.retriever.calibration.reference
    return ref if len(ref) else np.zeros((0, self.embed_dim), np.float32)

  @functools.cached_property
  def trees(self) -> dict:
    """The array trees the fingerprint covers and the store writes."""
    return {"backbone": storage.pure(self.backbone.params),
            "vectorizer": storage.pure(self._state), "pool": {"images": self.pool}}

  @functools.cached_property
  def fingerprint(self) -> str:
    """A short hash of phi, the vectorizers and the pool: vectors of two proxies with the same
    fingerprint are comparable. Every index row this proxy adds records it (``proxy``)."""
    blob = "".join(storage.checksum(self.trees[t]) for t in TREES)
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

  def index_pool_features(self, index: ModelIndex | None) -> jax.Array:
    """phi of :meth:`index_pool` [N + N', D], resident on the device (computed once per pool,
    so that a query does not move the pool's features again)."""
    pool = None if index is None else index.pool
    hit = self._index_pools.get(id(pool))
    if hit is None or hit[0] is not pool:  # the entry holds the pool: its id is not reused
      feats = self.pool_features()
      if pool is not None:
        feats = np.concatenate([feats, np.asarray(self.backbone.embed(pool))])
      hit = self._index_pools[id(pool)] = (pool, jnp.asarray(feats))
    return hit[1]

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

  # ---- training (know2vec_jax.training) ----------------------------------------------------

  @classmethod
  def train(cls, zoo, cfg: ProxyConfig | None = None, **kwargs) -> "Proxy":
    """Trains a proxy on (some of) a zoo's models: :func:`know2vec_jax.training.train` (its
    keyword arguments: ``model_ids``, ``transfer``, ``cache``, ``zoo_dir``,
    ``exclude_targets``, ``progress``)."""
    return training.train(zoo, cfg, **kwargs)

  @staticmethod
  def measure_labels(zoo, cfg: ProxyConfig, model_ids: Sequence[str] | None = None,
                     **kwargs) -> pipeline.TransferLabels:
    """The fine-tune labels :meth:`train` measures (:func:`know2vec_jax.training.measure_labels`)."""
    return training.measure_labels(zoo, cfg, model_ids, **kwargs)

  @classmethod
  def fit(cls, groups: Sequence[BlackBoxGroup], model_tasks: Mapping, cfg: ProxyConfig | None = None,
          **kwargs) -> "Proxy":
    """Trains a proxy on black boxes whose training tasks are known:
    :func:`know2vec_jax.training.fit` (keywords ``transfer``, ``cache``, ``progress``)."""
    return training.fit(groups, model_tasks, cfg, **kwargs)

  def set_accuracy_head(self, head) -> None:
    """Installs a fitted accuracy head (the ``"both"`` objective's second stage)."""
    self.vectorizer.accuracy_head = nnx.data(head)  # was a static None
    self._graphdef, self._state = nnx.split(self.vectorizer)
    for name in ("trees", "fingerprint"):  # cached from the retrieval-only state
      self.__dict__.pop(name, None)

  def set_calibration(self, calibration: Calibration) -> None:
    """Installs retrieval's fitted statistics (:func:`know2vec_jax.retrieval.calibrate`)."""
    self.retriever = Retriever(self.config.match, calibration)

  # ---- vectorizing models and queries ------------------------------------------------------

  def knowledge_of(self, groups: Sequence[BlackBoxGroup], cache: pipeline.Cache | None = None,
                   progress: bool = False, index: ModelIndex | None = None):
    """The knowledge of black boxes on the proxy's pool (and ``index``'s own pool), remembered
    or extracted now (:func:`know2vec_jax.indexing.knowledge_of`)."""
    return indexing.knowledge_of(self, groups, cache, progress, index)

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
    """(model ids [M], unit vectors float32 [M, E]) of black boxes (zoo stacks,
    :class:`know2vec_jax.blackbox.CallableBlackBox` s) with the trained model vectorizer, no
    retraining; ``cache``: also look up (and store) knowledge there.

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
    """float32 [Q, E]: the query vectors of many few-shot sets ((images, labels) pairs, each as
    :meth:`embed_query` takes them) at once; queries of one shape are embedded as one batch of up
    to ``batch_size``.

    Raises:
      InputError: a bad query (the message says which of them and why).
    """
    return self.describe_queries(queries, batch_size, classes=False)[0]

  def describe_queries(self, queries: Sequence[tuple], batch_size: int = 64,
                       classes: bool = True, index: ModelIndex | None = None):
    """Query vectors and class descriptions of many few-shot sets, what retrieval reads
    (:func:`know2vec_jax.queries.describe`: (vectors float32 [Q, E], QueryClasses or None)).

    Raises:
      InputError: a bad query (the message says which of them and why).
    """
    return queries_lib.describe(self, queries, batch_size, classes, index)

  # ---- retrieval (know2vec_jax.retrieval) --------------------------------------------------

  def match_config(self, overrides: Sequence[str] = ()) -> retrieval.MatchConfig:
    """This proxy's retrieval settings with ``overrides`` ("key=value", ``MatchConfig``
    fields; thresholds are not settings: :meth:`with_match`).

    Raises:
      ConfigError: an unknown field or a bad value.
    """
    return self.retriever.with_settings(overrides).config

  def with_match(self, **changes) -> "Proxy":
    """The same trained proxy with other retrieval settings (``MatchConfig`` fields, or a
    fitted threshold set by hand: ``fit_threshold``, ``familiar_threshold``; see
    :meth:`know2vec_jax.retrieval.Retriever.with_settings`); phi, the vectorizers, the pool and
    the fitted statistics are shared, so its fingerprint is the same.

    Raises:
      ConfigError: an unknown field or a bad value.
    """
    retriever = self.retriever.with_settings([f"{k}={v}" for k, v in changes.items()])
    other = Proxy(dataclasses.replace(self.config, match=retriever.config), self.backbone, self.vectorizer,
                  self.pool, self.tasks, self.info, self.knowledge, retriever.calibration,
                  self.pool_provenance)
    other.retriever = retriever
    other._pool_features = self._pool_features
    other._index_pools = self._index_pools
    other._pool_knowledge = self._pool_knowledge
    return other

  def search(self, index: ModelIndex, queries: Sequence[tuple], k: int = 10) -> Matches:
    """Ranks an index's models for many few-shot queries: the queries described
    (:meth:`describe_queries`), then scored by the proxy's retriever
    (:meth:`know2vec_jax.retrieval.Retriever.score`: the aligned vectors' shortlist, then
    class-level matching).

    Args:
      index: an index built with this proxy.
      queries: (images, labels) pairs.
      k: models per query.

    Returns:
      :class:`know2vec_jax.retrieval.Matches` (ids, scores and their parts, fit and the no-fit
      flag per query).

    Raises:
      InputError: a bad query; ProxyError: k not a positive int, an index of another vector
        size or one that holds no class knowledge while class matching is on.
    """
    check_k(k, ProxyError)
    self.check_index(index)
    match = self.retriever.config
    if match.enabled and not index.has_classes:
      raise ProxyError("the index holds no class knowledge: rebuild it with this proxy "
                       "(`know2vec index build`), or query with --set match.enabled=false")
    if match.enabled:
      self.check_index_pool(index)
    vectors, classes = self.describe_queries(queries, classes=match.enabled, index=index)
    if match.enabled and classes.prototypes.shape[1] != index.classes["tokens"].shape[1]:
      raise ProxyError("the index's class knowledge was made by another proxy (other probe pool "
                       "or max_classes); rebuild it with this proxy")
    return self.retriever.score(index, vectors, classes, k)

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
    self.require_head()
    q = jnp.asarray(np.atleast_2d(np.asarray(query_vectors, np.float32)))
    return np.asarray(_predict(self._graphdef, self._state, q,
                               jnp.asarray(np.asarray(model_vectors, np.float32))))

  def require_head(self) -> None:
    """ProxyError unless the proxy has an accuracy head."""
    if not self.has_accuracy_head:
      raise ProxyError("this proxy has no accuracy head: train it with objective 'both' or "
                       "'finetune' (`know2vec train --objective both`)")

  def select(self, images, labels, index: ModelIndex, k: int = 10,
             scorer: str | None = None) -> list[dict]:
    """Ranks the index's models for fine-tuning on a few-shot task
    (:func:`know2vec_jax.selection.select`: rows as :func:`query` gives them, with
    ``predicted_accuracy``; ranked by ``scorer``, default the config's ``selection.scorer``).

    Raises:
      InputError: a bad query; ProxyError: a proxy without an accuracy head, an unknown scorer,
      an empty index, an index of another vector size, or rows another proxy vectorized.
    """
    return selection.select(self, images, labels, index, k, scorer)

  def build_index(self, groups: BlackBoxGroup | Sequence[BlackBoxGroup],
                  metadata: Mapping[str, dict] | None = None, index: ModelIndex | None = None,
                  cache: pipeline.Cache | None = None, progress: bool = False,
                  pool: "pool_lib.Pool | np.ndarray | None" = None) -> ModelIndex:
    """Vectorizes black boxes, of any sources and classes, and adds them to an index (a new one
    unless ``index`` is given), nothing retrained; ``pool``: a new index's own unlabelled
    images (:func:`know2vec_jax.indexing.build_index`, which documents each row's metadata).

    Raises:
      ProxyError: as :meth:`vectorize`, or an index whose vector size is not the proxy's;
      IndexStoreError: an id already in ``index`` (checked before any black box is called).
    """
    return indexing.build_index(self, groups, metadata, index, cache, progress, pool)

  def index_rows(self, grids, masks, pool_labels):
    """(unit vectors [M, E], class knowledge) of index rows with these padded grids
    (:func:`know2vec_jax.indexing.index_rows`)."""
    return indexing.index_rows(self, grids, masks, pool_labels)

  def check_index_pool(self, index: ModelIndex) -> None:
    """ProxyError when the index's rows were probed on other images than this proxy's pool
    (followed by the index's own pool)."""
    indexing.check_index_pool(self, index)

  def check_index(self, index: ModelIndex) -> None:
    """Raises ProxyError when the index's vector size is not this proxy's E."""
    if index.dim != self.embed_dim:
      raise ProxyError(f"the index holds vectors of size {index.dim} but this proxy's vectorizer "
                       f"makes vectors of size {self.embed_dim}: it was built by another proxy; "
                       "rebuild it with this proxy")

  # ---- storage (know2vec_jax.proxy_store) --------------------------------------------------

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the proxy atomically (:func:`know2vec_jax.proxy_store.save`); returns the absolute
    path written."""
    return proxy_store.save(self, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Proxy":
    """Loads a saved proxy, bit for bit (:func:`know2vec_jax.proxy_store.load`).

    Raises:
      ProxyError: a missing, incomplete, truncated or corrupted proxy (the message names the
        path).
    """
    return proxy_store.load(path)

  def load_index(self, path: str | os.PathLike, **kwargs) -> ModelIndex:
    """Loads an index and checks its vector size against this proxy's (ProxyError if not)."""
    index = ModelIndex.load(path, **kwargs)
    self.check_index(index)
    return index
