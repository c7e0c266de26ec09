"""Decision knowledge of black-box models: anchors and label-only decision-boundary search.

For a model with K output classes the knowledge is a K x K grid of inputs (DESIGN.md §2, step 3):

- diagonal ``(i, i)``: the **anchor** of class i: the probe-pool image the model assigns to class i
  with the highest confidence (logit margin); the A next most confident are kept too.
  **Fallback** for a class the model never predicts on the pool: the pool images with the highest
  margin for that class (all predicted as something else); ``anchor_fallback[m, i]`` flags it.
- off-diagonal ``(i, j)``: the point on the segment anchor_i -> anchor_j where the predicted label
  stops being i, found by a **label-only binary search** of T steps. Each step asks every model
  for the labels of all its K(K-1) current midpoints in **one batched call per group**; a midpoint
  predicted as i moves the lower end up, anything else moves the upper end down. The grid holds the
  final midpoint x((lo + hi) / 2).

The grid's logits come from one more call. Black-box queries per model, exactly::

    N_pool + T * K * (K - 1) + K * K

(the pool pass for anchors, the search, the final grid), tested against the query counters.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from know2vec_jax.blackbox import BlackBoxGroup, check_images


@dataclasses.dataclass(frozen=True)
class KnowledgeConfig:
  """Settings of knowledge extraction.

  Attributes:
    search_steps: T, binary-search steps per class pair (0: the grid's off-diagonal cells are
      segment midpoints, i.e. no boundary information).
    anchors_per_class: A, how many most-confident pool images are kept per class. The grid's
      diagonal input (and the end of every search segment) is the first; the features of the
      diagonal cell average all A (:func:`know2vec_jax.features.knowledge_features`), because a
      small network's single most confident image is often out of its training domain (on the
      demo zoo only ~60 % of top-1 anchors came from the model's own source; the mean feature of
      the top 32 was closer to the true class prototype: cosine 0.90 vs 0.81).
    pool_batch: probe-pool images per black-box call during the anchor pass.
  """
  search_steps: int = 8
  anchors_per_class: int = 32
  pool_batch: int = 2048


@dataclasses.dataclass
class Knowledge:
  """The decision knowledge of a group of M models with K classes.

  Attributes:
    model_ids: [M].
    inputs: float32 [M, K, K, H, W, C]: anchors on the diagonal, boundary points off it.
    logits: float32 [M, K, K, K]: each model's logits at its grid points.
    flip_t: float32 [M, K, K]: the position t in [0, 1] of each boundary point on its segment.
    anchor_index: int32 [M, K, A]: pool indices of each class's A anchors, best first.
    anchor_fallback: bool [M, K]: the class was never predicted on the pool (see module doc).
    queries: int64 [M]: black-box inputs evaluated per model during extraction.
  """
  model_ids: list[str]
  inputs: np.ndarray
  logits: np.ndarray
  flip_t: np.ndarray
  anchor_index: np.ndarray
  anchor_fallback: np.ndarray
  queries: np.ndarray

  @property
  def k(self) -> int:
    return self.inputs.shape[1]


def expected_queries(pool_size: int, k: int, search_steps: int) -> int:
  """Black-box queries one model spends on knowledge extraction (see the module docstring)."""
  return pool_size + search_steps * k * (k - 1) + k * k


def _margin(logits: np.ndarray) -> np.ndarray:
  """Logit margin of every class: z_c - max_{c' != c} z_c'. [..., K] -> [..., K]."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  other = np.where(logits >= top2[..., -1:], top2[..., -2:-1], top2[..., -1:])
  return logits - other


def find_anchors(group: BlackBoxGroup, pool: np.ndarray, pool_batch: int = 2048,
                 anchors_per_class: int = 1):
  """The ``anchors_per_class`` most confident pool images of every class of every model.

  Confidence is the logit margin z_c - max_{c' != c} z_c' among the images the model predicts as
  c: unlike the softmax probability it does not saturate at 1, so it still orders the many images
  a small network calls "certainly c" (and ranks in-domain images above the out-of-domain ones such
  networks are often over-confident on; see ``anchors_per_class`` in :class:`KnowledgeConfig`).

  Returns:
    (anchor_index int32 [M, K, A] best first, anchor_fallback bool [M, K]).
  """
  m, k, a = group.num_models, group.num_classes, anchors_per_class
  # Two running top-A lists: among images predicted as c, and (fallback) among all images.
  best = {name: (np.full((m, k, a), -np.inf), np.zeros((m, k, a), np.int64))
          for name in ("own", "any")}
  for start in range(0, len(pool), pool_batch):
    logits = group(pool[start:start + pool_batch], validate=False)  # [M, B, K]
    margin = _margin(logits)
    pred = logits.argmax(-1)
    scores = {"own": np.where(pred[..., None] == np.arange(k), margin, -np.inf), "any": margin}
    for name, score in scores.items():
      vals, idx = best[name]
      cand_v = np.concatenate([vals, np.moveaxis(score, 1, 2)], axis=2)  # [M, K, A + B]
      cand_i = np.concatenate([idx, np.broadcast_to(np.arange(start, start + score.shape[1]),
                                                    (m, k, score.shape[1]))], axis=2)
      order = np.argsort(-cand_v, axis=2, kind="stable")[..., :a]
      best[name] = (np.take_along_axis(cand_v, order, 2), np.take_along_axis(cand_i, order, 2))
  own_v, own_i = best["own"]
  fallback = ~np.isfinite(own_v[..., 0])
  # Fewer than A images predicted as c: fill the list from the fallback ranking.
  short = ~np.isfinite(own_v)
  index = np.where(short, best["any"][1], own_i)
  return index.astype(np.int32), fallback


def extract_knowledge(group: BlackBoxGroup, pool, config: KnowledgeConfig = KnowledgeConfig()
                      ) -> Knowledge:
  """Anchors, boundary search and grid logits for every model of a group.

  Args:
    group: the black boxes (one label-space size K).
    pool: float32 [N, H, W, C] unlabelled probe images in [0, 1] (never the query images).
    config: search steps and batching.

  Returns:
    The group's :class:`Knowledge`.
  """
  pool = check_images(pool, group.image_shape, what="probe pool")
  if len(pool) == 0:
    raise ValueError("the probe pool is empty")
  start_queries = group.queries.copy()
  m, k = group.num_models, group.num_classes
  anchor_index, fallback = find_anchors(group, pool, config.pool_batch,
                                        config.anchors_per_class)
  anchors = pool[anchor_index[..., 0]]  # [M, K, H, W, C]
  ii, jj = np.nonzero(~np.eye(k, dtype=bool))  # the K(K-1) ordered pairs
  a_i, a_j = anchors[:, ii], anchors[:, jj]  # [M, P, H, W, C]
  lo = np.zeros((m, len(ii)), np.float32)
  hi = np.ones((m, len(ii)), np.float32)
  for _ in range(config.search_steps):
    t = (lo + hi) / 2
    x = a_i + t[..., None, None, None] * (a_j - a_i)
    still_i = group(x, validate=False).argmax(-1) == ii  # [M, P]
    lo = np.where(still_i, t, lo)
    hi = np.where(still_i, hi, t)
  t = (lo + hi) / 2
  flip_t = np.zeros((m, k, k), np.float32)
  flip_t[:, ii, jj] = t
  inputs = np.empty((m, k, k) + group.image_shape, np.float32)
  inputs[:, np.arange(k), np.arange(k)] = anchors
  inputs[:, ii, jj] = a_i + t[..., None, None, None] * (a_j - a_i)
  logits = group(inputs.reshape((m, k * k) + group.image_shape), validate=False)
  return Knowledge(model_ids=list(group.model_ids), inputs=inputs,
                   logits=logits.reshape(m, k, k, k), flip_t=flip_t,
                   anchor_index=anchor_index, anchor_fallback=fallback,
                   queries=group.queries - start_queries)
