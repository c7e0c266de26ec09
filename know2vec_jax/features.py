"""Lifting knowledge grids and few-shot queries to backbone-feature grids [K, K, D]."""

from __future__ import annotations

import numpy as np

from know2vec_jax.blackbox import InputError, check_images


def knowledge_features(backbone, inputs, anchor_features=None) -> np.ndarray:
  """Feature grid of knowledge grids: phi of every grid input, the diagonal replaced by the
  normalised mean feature of each class's A anchors when given.

  Args:
    backbone: phi.
    inputs: float32 [M, K, K, H, W, C] grid inputs (``Knowledge.inputs``).
    anchor_features: optional float32 [M, K, D] mean anchor features
      (:func:`anchor_features`).

  Returns:
    float32 [M, K, K, D].
  """
  grid = np.array(backbone.embed(inputs))
  if anchor_features is not None:
    k = grid.shape[1]
    grid[:, np.arange(k), np.arange(k)] = _normalize(np.asarray(anchor_features))
  return grid


def anchor_features(pool_features, anchor_index) -> np.ndarray:
  """Mean phi of each class's anchors: pool_features [N, D], anchor_index [M, K, A] -> [M, K, D]."""
  return np.asarray(pool_features)[np.asarray(anchor_index)].mean(axis=2)


def _normalize(x, axis=-1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-6)


def check_query(images, labels, image_shape=None, max_classes: int | None = None):
  """Validates a few-shot query; returns (images float32, labels int32, K).

  Raises:
    InputError: bad images (see ``check_images``), labels not matching the images, fewer than 2
      classes, a class id with no image (labels must be 0..K-1), or more than ``max_classes``.
  """
  images = check_images(images, image_shape, what="query images")
  try:
    labels = np.asarray(labels)
  except (TypeError, ValueError) as e:  # ragged nested lists
    raise InputError(f"query labels are not an array: {' '.join(str(e).split())[:200]}") from None
  if labels.ndim != 1 or len(labels) != len(images):
    raise InputError(f"query labels must be a vector with one label per image: got shape "
                     f"{labels.shape} for {len(images)} images")
  if not np.issubdtype(labels.dtype, np.integer):
    raise InputError(f"query labels must be integers 0..K-1, got dtype {labels.dtype}")
  if len(labels) == 0:
    raise InputError("the query has no images")
  k = int(labels.max()) + 1
  if labels.min() < 0:
    raise InputError(f"query labels must be in 0..K-1, got {int(labels.min())}")
  if k < 2:
    raise InputError(f"a query needs at least 2 classes, got {k}")
  # Before counting: a label of 10**9 must not size an array by it.
  if max_classes is not None and k > max_classes:
    raise InputError(f"the query has {k} classes, more than the vectorizer's maximum of "
                     f"{max_classes}")
  present = np.unique(labels)
  if len(present) < k:
    # The first missing ids lie below len(present) + 10, whatever k is.
    empty = np.setdiff1d(np.arange(min(k, len(present) + 10)), present)[:10].tolist()
    more = f" and {k - len(present) - len(empty)} more" if k - len(present) > len(empty) else ""
    raise InputError(f"query class(es) {empty}{more} have no images (labels must be 0..K-1, "
                     "each with at least one image)")
  return images, labels.astype(np.int32), k


def query_grid_batch(backbone, images, labels, k: int, radius: bool = False):
  """Query grids of S episodes at once.

  Args:
    backbone: phi.
    images: float32 [S, N, H, W, C], labels int32 [S, N] in 0..k-1 (every class present).
    k: classes.
    radius: also return each class's radius: the smallest cosine of its images to its
      prototype (how far from the prototype the class's own images reach in phi).

  Returns:
    float32 [S, K, K, D]: prototypes on the diagonal, phi of the midpoint of two classes' mean
    images off it; with ``radius``, (that grid, float32 [S, K]).
  """
  s, n = labels.shape
  onehot = np.eye(k, dtype=np.float32)[labels]  # [S, N, K]
  counts = onehot.sum(1)  # [S, K]
  mean_img = np.einsum("snk,snhwc->skhwc", onehot, images) / counts[..., None, None, None]
  ii, jj = np.nonzero(~np.eye(k, dtype=bool))
  mids = 0.5 * (mean_img[:, ii] + mean_img[:, jj])  # [S, P, H, W, C]
  # The shots and the class midpoints through phi in one call (a query's latency is mostly
  # phi's dispatches on a CPU: a 4-way 5-shot query is 20 + 12 images, one padded batch of 32).
  both = np.asarray(backbone.embed(np.concatenate([images, mids.astype(images.dtype)], 1)))
  feats, mid_feats = both[:, :n], both[:, n:]  # [S, N, D], [S, P, D]
  protos = _normalize(np.einsum("snk,snd->skd", onehot, feats) / counts[..., None])
  grid = np.zeros((s, k, k, protos.shape[-1]), np.float32)
  grid[:, np.arange(k), np.arange(k)] = protos
  if len(ii):
    grid[:, ii, jj] = mid_feats
  if not radius:
    return grid
  cos = np.einsum("snd,snd->sn", feats, protos[np.arange(s)[:, None], labels])  # [S, N]
  r = np.where(onehot > 0, cos[..., None], np.inf).min(1)  # [S, K]
  return grid, r.astype(np.float32)


def query_grid(backbone, images, labels, max_classes: int | None = None) -> np.ndarray:
  """The query grid [K, K, D] of one few-shot query (validated; see :func:`check_query`)."""
  images, labels, k = check_query(images, labels, backbone.image_shape, max_classes)
  return query_grid_batch(backbone, images[None], labels[None], k)[0]
