"""Decision knowledge of black-box models: anchors and label-only decision-boundary search.

For a model with K output classes the knowledge is a K x K grid of inputs (DESIGN.md §2, step 3):

- diagonal ``(i, i)``: the **anchor** of class i: the probe-pool image the model assigns to class i
  with the highest softmax confidence. **Fallback** for a class the model never predicts on the
  pool: the pool image with the highest probability of that class (it is predicted as something
  else); ``anchor_fallback[m, i]`` flags it.
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
    pool_batch: probe-pool images per black-box call during the anchor pass.
  """
  search_steps: int = 8
  pool_batch: int = 2048


@dataclasses.dataclass
class Knowledge:
  """The decision knowledge of a group of M models with K classes.

  Attributes:
    model_ids: [M].
    inputs: float32 [M, K, K, H, W, C]: anchors on the diagonal, boundary points off it.
    logits: float32 [M, K, K, K]: each model's logits at its grid points.
    flip_t: float32 [M, K, K]: the position t in [0, 1] of each boundary point on its segment.
    anchor_index: int32 [M, K]: pool index of each anchor.
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


def find_anchors(group: BlackBoxGroup, pool: np.ndarray, pool_batch: int = 2048):
  """Anchors of every model of a group on an unlabelled probe pool.

  Returns:
    (anchor_index int32 [M, K], anchor_fallback bool [M, K]).
  """
  m, k = group.num_models, group.num_classes
  best = np.full((m, k), -np.inf)
  best_idx = np.zeros((m, k), np.int64)
  any_best = np.full((m, k), -np.inf)
  any_idx = np.zeros((m, k), np.int64)
  for start in range(0, len(pool), pool_batch):
    logits = group(pool[start:start + pool_batch], validate=False)  # [M, B, K]
    z = logits - logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    pred = prob.argmax(-1)
    own = np.where(pred[..., None] == np.arange(k), prob, -np.inf)  # confidence where predicted
    for store_v, store_i, score in ((best, best_idx, own), (any_best, any_idx, prob)):
      arg = score.argmax(1)  # [M, K]
      val = np.take_along_axis(score, arg[:, None, :], 1)[:, 0]
      better = val > store_v
      store_v[better] = val[better]
      store_i[better] = (arg + start)[better]
  fallback = ~np.isfinite(best)
  return np.where(fallback, any_idx, best_idx).astype(np.int32), fallback


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
  anchor_index, fallback = find_anchors(group, pool, config.pool_batch)
  anchors = pool[anchor_index]  # [M, K, H, W, C]
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
