"""The model side of a proxy: black boxes probed on its pool, vectorized, and added to an index
as rows (vectors, class knowledge, hub rows, metadata). What ``Proxy.knowledge_of``,
``Proxy.model_grids``, ``Proxy.vectorize`` and ``Proxy.build_index`` run; nothing is retrained.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from know2vec_jax import pipeline
from know2vec_jax import pool as pool_lib
from know2vec_jax.blackbox import BlackBoxGroup
from know2vec_jax.index import IndexStoreError, ModelIndex
from know2vec_jax.knowledge import KnowledgeStore, store_context
from know2vec_jax.pipeline import ProxyError

HUB_DEPTH = 32  # reference cosines kept per index row (the most ``match.hub_k`` can average)


def check_groups(proxy, groups: Sequence[BlackBoxGroup]) -> list[str]:
  """The groups' model ids; ProxyError for a group the proxy cannot probe (not a black box,
  another image shape, too many classes) or an id in two groups."""
  for g in groups:
    if not isinstance(g, BlackBoxGroup):
      raise ProxyError(f"expected a BlackBoxGroup (a zoo stack or a CallableBlackBox), got "
                       f"{type(g).__name__}")
    if tuple(g.image_shape) != proxy.image_shape:
      raise ProxyError(f"black box {g.model_ids[0]!r} takes images of shape {g.image_shape}, "
                       f"the proxy's probe pool has {proxy.image_shape}")
    if g.num_classes > proxy.max_classes:
      raise ProxyError(f"black box {g.model_ids[0]!r} has {g.num_classes} classes, more than "
                       f"the proxy's maximum of {proxy.max_classes} (max_classes)")
  ids = [m for g in groups for m in g.model_ids]
  if len(set(ids)) != len(ids):
    dup = next(m for m in ids if ids.count(m) > 1)
    raise ProxyError(f"model id {dup!r} appears in more than one black box")
  return ids


def knowledge_of(proxy, groups: Sequence[BlackBoxGroup], cache: pipeline.Cache | None = None,
                 progress: bool = False, index: ModelIndex | None = None):
  """The knowledge of black boxes on the proxy's pool (followed by ``index``'s own pool, when
  it has one): remembered when the proxy (or ``cache``) probed the same model (id and
  fingerprint) on the same images before, else extracted now."""
  groups = list(groups)
  check_groups(proxy, groups)
  pool = proxy.index_pool(index)
  if pool is proxy.pool:
    stores = [proxy.knowledge]
  else:  # an index's own pool: knowledge kept for this session, and in the cache
    context = store_context(pool, proxy.config.knowledge)
    stores = [proxy._pool_knowledge.setdefault(context, KnowledgeStore(context))]
  if cache is not None:
    stores.append(cache.knowledge_store(pool, proxy.config.knowledge))
  bar = pipeline.bar(sum(g.num_models for g in groups), "vectorizing models", progress)
  out = pipeline.extract(groups, pool, proxy.config.knowledge, stores,
                         bar.update if bar is not None else None)
  if bar is not None:
    bar.close()
  return out


def build_index(proxy, groups: BlackBoxGroup | Sequence[BlackBoxGroup],
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
    ProxyError: as :meth:`know2vec_jax.proxy.Proxy.vectorize`, or an index whose vector size is not the proxy's;
    IndexStoreError: an id already in ``index`` (checked before any black box is called).
  """
  if isinstance(groups, BlackBoxGroup):
    groups = [groups]
  groups = list(groups)
  if index is None:
    index = ModelIndex(proxy.embed_dim)
  proxy.check_index(index)
  present = [m for g in groups for m in g.model_ids if m in index]
  if present:
    raise IndexStoreError(f"{len(present)} model id(s) already in the index, e.g. "
                          f"{present[0]!r}")
  if pool is not None:
    images, prov = ((pool.images, pool.provenance) if isinstance(pool, pool_lib.Pool)
                    else (pool, [{"source": "array", "images": int(len(pool))}]))
    if tuple(np.shape(images)[1:]) != proxy.image_shape:
      raise ProxyError(f"the index's pool holds images of shape {list(np.shape(images)[1:])}, "
                       f"this proxy's are {list(proxy.image_shape)}")
    index.set_pool(images, prov)
  try:
    return _fill(proxy, groups, metadata, index, cache, progress)
  except BaseException:
    if pool is not None and not len(index):  # refused: the index stays as it was, no pool
      index._unset_pool()
    raise


def _fill(proxy, groups, metadata, index, cache, progress) -> ModelIndex:
  """:func:`build_index` once the index (and its pool) is checked: probes, embeds, adds."""
  check_index_pool(proxy, index)
  kn = knowledge_of(proxy, groups, cache, progress, index)
  ids, grids, masks = pipeline.knowledge_grids(proxy.backbone, proxy.index_pool_features(index),
                                               kn, proxy.max_classes, cache)
  vectors, classes = proxy.index_rows(grids, masks,
                                      np.concatenate([k.pool_labels for k in kn]))
  metas = []
  for g, k in zip(groups, kn):
    own = getattr(g, "metadata", None)
    for i, mid in enumerate(g.model_ids):
      meta = {"num_classes": g.num_classes, "proxy": proxy.fingerprint}
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
  index.record_proxy(proxy.fingerprint, proxy.provenance)
  return index


def index_rows(proxy, grids, masks, pool_labels):
  """What an index row holds for models with these padded grids: (unit vectors [M, E], class
  knowledge: tokens = the grids' diagonals (normalised mean phi of each class's anchors), their
  mask, the models' pool labels, and each model's ``HUB_DEPTH`` highest cosines to the reference
  queries, best first)."""
  k = grids.shape[1]
  vectors = proxy.embed_grids(grids, masks, "models")
  depth = min(HUB_DEPTH, len(proxy.reference))
  hub = -np.sort(-(vectors @ proxy.reference.T), axis=1)[:, :depth]
  classes = {"tokens": np.asarray(grids)[:, np.arange(k), np.arange(k)],
             "mask": np.asarray(masks, np.float32), "pool_labels": np.asarray(pool_labels),
             "hub": hub.astype(np.float32)}
  return vectors, classes


def check_index_pool(proxy, index: ModelIndex) -> None:
  """Raises ProxyError when the index's rows were probed on other images than this proxy's
  pool (followed by the index's own pool)."""
  if index.has_classes and index.classes["pool_labels"].shape[1] != len(proxy.pool) + (
      0 if index.pool is None else len(index.pool)):
    raise ProxyError("the index's class knowledge was made by another proxy (other probe pool "
                     "or max_classes); rebuild it with this proxy")
