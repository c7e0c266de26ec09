"""Decision knowledge of black-box models: anchors and label-only decision-boundary search.

For a model with K output classes the knowledge is a K x K grid of inputs (docs/design.md,
"Method", step 3):

- diagonal ``(i, i)``: the **anchor** of class i: the probe-pool image the model assigns to class i
  with the highest confidence (logit margin); the A next most confident are kept too.
  **Fallback** for a class the model never predicts on the pool: the pool images with the highest
  margin for that class (all predicted as something else); ``anchor_fallback[m, i]`` flags it, and
  the index records such classes in the model's metadata (``never_predicted``).
- off-diagonal ``(i, j)``: the point on the segment anchor_i -> anchor_j where the predicted label
  stops being i, found by a **label-only binary search** of T steps. Each step asks every model
  for the labels of all its K(K-1) current midpoints in **one batched call per group**; a midpoint
  predicted as i moves the lower end up, anything else moves the upper end down. The grid holds the
  final midpoint x(t) with t = (lo + hi) / 2, stored as ``flip_t``.

The grid is therefore fully described by the pool, each class's anchor indices and the flip
positions: that compact record is what :class:`KnowledgeStore` keeps, and :func:`grid_inputs`
rebuilds the K x K inputs from it bit for bit. The anchor pass sees the model's label for every
pool image anyway; those labels (one byte per pool image) are kept as ``pool_labels``: they are what
class-level matching (:mod:`know2vec_jax.classmatch`) reads, at no extra query. The record is
about 2 KB plus one byte per pool image (11.6 KB for a 10-way model on the 9,600-image demo pool).

Ties in confidence (a black box that returns one-hot labels, or saturated probabilities) are
broken by a fixed pseudo-random order of the pool (:func:`pool_priority`), never by pool position:
the pool is stored source by source, so position would pick every anchor from the first source.

Black-box queries per model, exactly::

    N_pool + T * K * (K - 1)

(the pool pass for anchors, then the search), tested against the query counters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Sequence

import numpy as np

from know2vec_jax import storage
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
    inputs: float32 [M, K, K, H, W, C]: anchors on the diagonal, boundary points off it
      (:func:`grid_inputs` of the pool, ``anchor_index`` and ``flip_t``).
    flip_t: float32 [M, K, K]: the position t in [0, 1] of each boundary point on its segment.
    anchor_index: int32 [M, K, A]: pool indices of each class's A anchors, best first.
    anchor_fallback: bool [M, K]: the class was never predicted on the pool (see module doc).
    queries: int64 [M]: black-box inputs evaluated per model during extraction.
    pool_labels: uint8 [M, N]: each model's label (argmax) for every pool image.
  """
  model_ids: list[str]
  inputs: np.ndarray
  flip_t: np.ndarray
  anchor_index: np.ndarray
  anchor_fallback: np.ndarray
  queries: np.ndarray
  pool_labels: np.ndarray

  @property
  def k(self) -> int:
    return self.inputs.shape[1]


def expected_queries(pool_size: int, k: int, search_steps: int) -> int:
  """Black-box queries one model spends on knowledge extraction (see the module docstring)."""
  return pool_size + search_steps * k * (k - 1)


def _margin(logits: np.ndarray) -> np.ndarray:
  """Logit margin of every class: z_c - max_{c' != c} z_c'. [..., K] -> [..., K]."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  other = np.where(logits >= top2[..., -1:], top2[..., -2:-1], top2[..., -1:])
  return logits - other


def pool_priority(n: int) -> np.ndarray:
  """A fixed pseudo-random rank of each of ``n`` pool positions (a permutation of 0..n-1): the
  tie-break among equally confident pool images, the same for every model and every run."""
  return np.random.default_rng(20250101).permutation(n)


def find_anchors(group: BlackBoxGroup, pool: np.ndarray, pool_batch: int = 2048,
                 anchors_per_class: int = 1):
  """The ``anchors_per_class`` most confident pool images of every class of every model.

  Confidence is the logit margin z_c - max_{c' != c} z_c' among the images the model predicts as
  c: unlike the softmax probability it does not saturate at 1, so it still orders the many images
  a small network calls "certainly c" (and ranks in-domain images above the out-of-domain ones such
  networks are often over-confident on; see ``anchors_per_class`` in :class:`KnowledgeConfig`).

  Equal margins are ordered by :func:`pool_priority` (see the module docstring).

  Returns:
    (anchor_index int32 [M, K, A] best first, anchor_fallback bool [M, K],
    pool_labels uint8 [M, N] the label of every pool image).
  """
  m, k, a = group.num_models, group.num_classes, anchors_per_class
  priority = pool_priority(len(pool))
  labels = np.zeros((m, len(pool)), np.uint8)
  # Two running top-A lists: among images predicted as c, and (fallback) among all images.
  best = {name: (np.full((m, k, a), -np.inf), np.zeros((m, k, a), np.int64))
          for name in ("own", "any")}
  for start in range(0, len(pool), pool_batch):
    logits = group(pool[start:start + pool_batch], validate=False)  # [M, B, K]
    margin = _margin(logits)
    pred = logits.argmax(-1)
    labels[:, start:start + pred.shape[1]] = pred
    scores = {"own": np.where(pred[..., None] == np.arange(k), margin, -np.inf), "any": margin}
    for name, score in scores.items():
      vals, idx = best[name]
      cand_v = np.concatenate([vals, np.moveaxis(score, 1, 2)], axis=2)  # [M, K, A + B]
      cand_i = np.concatenate([idx, np.broadcast_to(np.arange(start, start + score.shape[1]),
                                                    (m, k, score.shape[1]))], axis=2)
      # Highest margin first; among equal margins, the lower pool priority.
      order = np.lexsort((priority[cand_i], -cand_v), axis=2)[..., :a]
      best[name] = (np.take_along_axis(cand_v, order, 2), np.take_along_axis(cand_i, order, 2))
  own_v, own_i = best["own"]
  fallback = ~np.isfinite(own_v[..., 0])
  # Fewer than A images predicted as c: fill the list from the fallback ranking.
  short = ~np.isfinite(own_v)
  index = np.where(short, best["any"][1], own_i)
  return index.astype(np.int32), fallback, labels


def grid_inputs(pool: np.ndarray, anchor_index: np.ndarray, flip_t: np.ndarray) -> np.ndarray:
  """The K x K grid inputs of models from their compact knowledge.

  Args:
    pool: float32 [N, H, W, C], the probe pool the knowledge was extracted on.
    anchor_index: int [M, K, A] pool indices of each class's anchors (the first is the grid's).
    flip_t: float32 [M, K, K] boundary positions on the segments anchor_i -> anchor_j.

  Returns:
    float32 [M, K, K, H, W, C]: anchors on the diagonal, ``x(t) = a_i + t (a_j - a_i)`` off it.
  """
  m, k = anchor_index.shape[:2]
  anchors = pool[anchor_index[..., 0]]  # [M, K, H, W, C]
  ii, jj = np.nonzero(~np.eye(k, dtype=bool))
  a_i, a_j = anchors[:, ii], anchors[:, jj]
  t = np.asarray(flip_t, np.float32)[:, ii, jj]
  inputs = np.empty((m, k, k) + pool.shape[1:], np.float32)
  inputs[:, np.arange(k), np.arange(k)] = anchors
  inputs[:, ii, jj] = a_i + t[..., None, None, None] * (a_j - a_i)
  return inputs


def extract_knowledge(group: BlackBoxGroup, pool, config: KnowledgeConfig = KnowledgeConfig()
                      ) -> Knowledge:
  """Anchors and boundary search for every model of a group.

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
  anchor_index, fallback, pool_labels = find_anchors(group, pool, config.pool_batch,
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
  flip_t = np.zeros((m, k, k), np.float32)
  flip_t[:, ii, jj] = (lo + hi) / 2
  return Knowledge(model_ids=list(group.model_ids),
                   inputs=grid_inputs(pool, anchor_index, flip_t), flip_t=flip_t,
                   anchor_index=anchor_index, anchor_fallback=fallback,
                   queries=group.queries - start_queries, pool_labels=pool_labels)


@dataclasses.dataclass
class KnowledgeRecord:
  """The compact knowledge of one model (see the module docstring).

  Attributes:
    anchor_index: int32 [K, A]; flip_t: float32 [K, K]; anchor_fallback: bool [K];
    queries: the black-box queries its extraction cost; pool_labels: uint8 [N] its label for
    every pool image.
  """
  anchor_index: np.ndarray
  flip_t: np.ndarray
  anchor_fallback: np.ndarray
  queries: int
  pool_labels: np.ndarray

  @property
  def k(self) -> int:
    return self.anchor_index.shape[0]


def store_context(pool: np.ndarray, config: KnowledgeConfig) -> str:
  """What a model's knowledge depends on besides the model: the exact probe pool and the search
  settings (``pool_batch`` only changes how the pool is batched, not the result)."""
  # v2: pool labels kept, ties broken by pool priority (records of v1 lack the first and may
  # differ in the second, so they are never reused).
  blob = f"{storage.checksum({'pool': np.asarray(pool)})}|T={config.search_steps}|" \
         f"A={config.anchors_per_class}|v2"
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


class KnowledgeStore:
  """Compact knowledge of black boxes by (model id, model fingerprint), for one context.

  A model's knowledge is reused only when its id *and* its fingerprint match (a rebuilt model
  with the same id is probed again); a black box without a fingerprint is never reused. In memory,
  and optionally backed by a directory holding one verified ``.npz`` per model under
  ``<path>/<context>/``, so several proxies and experiments share one extraction.

  Args:
    context: :func:`store_context` of the pool and knowledge config.
    path: the cache directory, or None for memory only.
  """

  def __init__(self, context: str, path=None):
    self.context = context
    self.path = None if path is None else pathlib.Path(path).expanduser().absolute() / context
    self._records: dict[tuple[str, str], KnowledgeRecord] = {}

  def __len__(self) -> int:
    return len(self._records)

  def items(self):
    """((model id, fingerprint), record) pairs held in memory."""
    return list(self._records.items())

  def _file(self, model_id: str, fingerprint: str) -> pathlib.Path:
    name = hashlib.sha1(f"{model_id}|{fingerprint}".encode()).hexdigest()[:24]
    return self.path / f"{name}.npz"

  def get(self, model_id: str, fingerprint: str | None) -> KnowledgeRecord | None:
    """The stored knowledge of a model, or None (unknown, or no fingerprint)."""
    if fingerprint is None:
      return None
    rec = self._records.get((model_id, fingerprint))
    if rec is None and self.path is not None:
      f = self._file(model_id, fingerprint)
      if f.is_file():
        arrays, _ = storage.load_arrays(
            f, KnowledgeError, check=lambda a, meta: None if (
                meta.get("model_id"), meta.get("fingerprint"), meta.get("context")) == (
                model_id, fingerprint, self.context) else "another model's knowledge")
        rec = KnowledgeRecord(arrays["anchor_index"], arrays["flip_t"],
                              arrays["anchor_fallback"], int(arrays["queries"]),
                              arrays["pool_labels"])
        self._records[(model_id, fingerprint)] = rec
    return rec

  def put(self, model_id: str, fingerprint: str | None, record: KnowledgeRecord) -> None:
    """Stores a model's knowledge (in memory, and on disk when the store has a path)."""
    if fingerprint is None:
      return
    self._records[(model_id, fingerprint)] = record
    if self.path is not None:
      storage.save_arrays(self._file(model_id, fingerprint),
                          {"anchor_index": record.anchor_index, "flip_t": record.flip_t,
                           "anchor_fallback": record.anchor_fallback,
                           "queries": np.asarray(record.queries),
                           "pool_labels": record.pool_labels},
                          {"model_id": model_id, "fingerprint": fingerprint,
                           "context": self.context})


class KnowledgeError(ValueError):
  """A knowledge store that cannot be read as asked (a damaged or foreign file)."""


def group_knowledge(groups: Sequence[BlackBoxGroup], pool, config: KnowledgeConfig,
                    store: KnowledgeStore | None = None, progress=None) -> list[Knowledge]:
  """The knowledge of every group: from ``store`` where it holds a model, else extracted.

  Only the models the store lacks are probed (a stack with some of its models stored is probed
  as the sub-group of the others, counted on the group's own query counters); what is extracted
  is put into the store.

  Args:
    groups: black-box groups.
    pool: float32 [N, H, W, C], the probe pool.
    config: the knowledge config.
    store: a :class:`KnowledgeStore` for this pool and config, or None.
    progress: optional callable(models done) after each group.

  Returns:
    One :class:`Knowledge` per group (``queries``: what each model's extraction cost, when it
    was extracted or when it was stored).
  """
  pool = check_images(pool, None, what="probe pool")
  if store is not None and store.context != store_context(pool, config):
    raise KnowledgeError("the knowledge store was made for another probe pool or knowledge "
                         "config")
  out = []
  for g in groups:
    fps = g.fingerprints
    recs = {m: store.get(m, fp) if store is not None else None
            for m, fp in zip(g.model_ids, fps)}
    missing = [m for m in g.model_ids if recs[m] is None]
    if missing:
      sub = g if len(missing) == g.num_models else g.subset(missing)
      kn = extract_knowledge(sub, pool, config)
      for i, m in enumerate(kn.model_ids):
        recs[m] = KnowledgeRecord(kn.anchor_index[i], kn.flip_t[i], kn.anchor_fallback[i],
                                  int(kn.queries[i]), kn.pool_labels[i])
        if store is not None:
          store.put(m, fps[g.model_ids.index(m)], recs[m])
    rows = [recs[m] for m in g.model_ids]
    anchor_index = np.stack([r.anchor_index for r in rows])
    flip_t = np.stack([r.flip_t for r in rows])
    out.append(Knowledge(model_ids=list(g.model_ids),
                         inputs=grid_inputs(pool, anchor_index, flip_t), flip_t=flip_t,
                         anchor_index=anchor_index,
                         anchor_fallback=np.stack([r.anchor_fallback for r in rows]),
                         queries=np.asarray([r.queries for r in rows], np.int64),
                         pool_labels=np.stack([r.pool_labels for r in rows])))
    if progress is not None:
      progress(g.num_models)
  return out
