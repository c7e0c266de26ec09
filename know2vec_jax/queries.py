"""A user's few-shot queries as retrieval reads them: checked, lifted to query grids by phi,
embedded by the query vectorizer, and their classes located in the probe pool
(:mod:`know2vec_jax.classmatch`). What ``Proxy.describe_queries`` runs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from know2vec_jax import classmatch, features
from know2vec_jax.blackbox import InputError
from know2vec_jax.index import ModelIndex
from know2vec_jax.vectorizers import pad_grid


def describe(proxy, queries: Sequence[tuple], batch_size: int = 64,
                     classes: bool = True, index: ModelIndex | None = None):
  """Query vectors and class descriptions of many few-shot sets (what retrieval reads).

  Args:
    queries: (images, labels) pairs, each as :meth:`know2vec_jax.proxy.Proxy.embed_query` takes them.
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
      checked.append(features.check_query(images, labels, proxy.image_shape, proxy.max_classes))
    except InputError as e:
      if len(queries) == 1:
        raise
      raise InputError(f"query {i}: {e}") from e
  k_max = proxy.max_classes
  match = proxy.retriever.config
  out = np.zeros((len(checked), proxy.embed_dim), np.float32)
  protos = np.zeros((len(checked), k_max, proxy.backbone.dim), np.float32)
  masks = np.zeros((len(checked), k_max), np.float32)
  radius = np.ones((len(checked), k_max), np.float32)
  by_shape: dict[tuple, list[int]] = {}
  for i, (_, y, k) in enumerate(checked):
    by_shape.setdefault((len(y), k), []).append(i)
  for (_, k), rows in by_shape.items():
    for s in range(0, len(rows), batch_size):
      part = rows[s:s + batch_size]
      grid = features.query_grid_batch(proxy.backbone, np.stack([checked[i][0] for i in part]),
                                       np.stack([checked[i][1] for i in part]), k,
                                       radius=classes and match.radius)
      if classes and match.radius:
        grid, radius[part, :k] = grid
      gp, m = pad_grid(grid, k_max)
      m = np.broadcast_to(np.asarray(m), (len(part), k_max))
      out[part] = proxy.embed_grids(np.asarray(gp), m, "queries")
      protos[part, :k] = grid[:, np.arange(k), np.arange(k)]
      masks[part] = m
  if not classes:
    return out, None
  found = classmatch.query_classes(protos, masks, proxy.index_pool_features(index),
                                   match.neighbours, radius if match.radius else None,
                                   match.min_neighbours)
  found.familiarity = proxy.retriever.familiarity(out)
  return out, found
