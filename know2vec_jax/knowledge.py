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

Ties in confidence (a black box that returns one-hot labels, or saturated probabilities) would
otherwise decide the anchors by chance. For such a model the proxy measures a label-only
confidence, the **label stability** of every pool image: the share of V fixed perturbations
(each a step towards another pool image) that keep the model's label; ties in margin are broken
by it, then by a fixed pseudo-random order of the pool (:func:`pool_priority`), never by pool
position: the pool is stored source by source, so position would pick every anchor from the
first source.

Black-box queries per model, exactly::

    N_pool + T * K * (K - 1)               (margins decide the anchors)
    N_pool * (1 + V) + T * K * (K - 1)     (ties broken by label stability)

(the pool pass for anchors, the stability pass where needed, then the search), tested against
the query counters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Sequence

import numpy as np

from know2vec_jax import distributed, storage
from know2vec_jax.blackbox import BlackBoxGroup, check_images
from know2vec_jax.config import require


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
    stability_views: V, perturbed copies of the pool a model is asked about when its anchors
      would otherwise be decided by equal margins (:func:`needs_tie_break`: a label-only black
      box, saturated probabilities); their label stability orders the tied images (0: never).
      On the varied zoo's ``knn`` models (one-hot answers) the share of the 32 anchors per class
      drawn from the model's own training source rose from 0.04-0.14 (pool order) to 0.21-0.44
      with V = 8 and step 0.35; step 0.15 gave 0.11-0.27.
    stability_step: how far each perturbed copy moves towards another pool image (in (0, 1)).
  """
  search_steps: int = 8
  anchors_per_class: int = 32
  pool_batch: int = 2048
  stability_views: int = 8
  stability_step: float = 0.35

  def __post_init__(self):
    require(self.search_steps >= 0 and self.anchors_per_class >= 1 and self.pool_batch >= 1,
            f"knowledge search_steps must be >= 0, anchors_per_class and pool_batch >= 1, got "
            f"{self.search_steps}, {self.anchors_per_class}, {self.pool_batch}")
    require(self.stability_views >= 0 and 0.0 < self.stability_step < 1.0,
            f"knowledge stability_views must be >= 0 and stability_step in (0, 1), got "
            f"{self.stability_views}, {self.stability_step}")


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


def expected_queries(pool_size: int, k: int, search_steps: int, stability_views: int = 0) -> int:
  """Black-box queries one model spends on knowledge extraction (see the module docstring);
  ``stability_views`` for a model whose ties were broken by label stability."""
  return pool_size * (1 + stability_views) + search_steps * k * (k - 1)


def _margin(logits: np.ndarray) -> np.ndarray:
  """Logit margin of every class: z_c - max_{c' != c} z_c'. [..., K] -> [..., K]."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  other = np.where(logits >= top2[..., -1:], top2[..., -2:-1], top2[..., -1:])
  return logits - other


def pool_priority(n: int) -> np.ndarray:
  """A fixed pseudo-random rank of each of ``n`` pool positions (a permutation of 0..n-1): the
  tie-break among equally confident pool images, the same for every model and every run."""
  return np.random.default_rng(20250101).permutation(n)


def _stability(group: BlackBoxGroup, pool: np.ndarray, labels: np.ndarray, views: int,
               step: float, pool_batch: int) -> np.ndarray:
  """Label-only confidence: the share of ``views`` fixed perturbations of each pool image, each a
  step of ``step`` towards another pool image, that keep the model's label.

  An image deep inside a class region keeps its label when moved part of the way towards an
  arbitrary other image; one near a decision boundary (or far from everything the model was
  trained on, where a nearest-neighbour vote is split) loses it. The partners are a fixed
  pseudo-random draw, the same for every model.

  Returns:
    float32 [M, N] in [0, 1].
  """
  n = len(pool)
  partner = np.random.default_rng(20250102).integers(0, n, (views, n))
  kept = np.zeros(labels.shape, np.float32)
  for v in range(views):
    for start in range(0, n, pool_batch):
      rows = slice(start, start + pool_batch)
      x = (1.0 - step) * pool[rows] + step * pool[partner[v, rows]]
      kept[:, rows] += group(x, validate=False).argmax(-1) == labels[:, rows]
  return kept / views


def needs_tie_break(margins: np.ndarray, labels: np.ndarray, anchors_per_class: int) -> np.ndarray:
  """Which models' anchor lists are decided by equal margins: for some class, the A-th and the
  (A+1)-th most confident images it predicts as that class have the same margin (a black box
  answering one-hot labels, or saturated probabilities).

  Args:
    margins: float [M, N, K] every pool image's margin per class; labels: [M, N] predictions.
    anchors_per_class: A.

  Returns:
    bool [M].
  """
  m, n, k = margins.shape
  a = anchors_per_class
  own = np.where(labels[..., None] == np.arange(k), margins, -np.inf)  # [M, N, K]
  if n <= a:
    return np.zeros(m, bool)
  top = -np.partition(-own, (a - 1, a), axis=1)[:, a - 1:a + 1]  # [M, 2, K]: A-th, (A+1)-th
  return np.any(np.isfinite(top[:, 1]) & (top[:, 0] == top[:, 1]), axis=-1)


def find_anchors(group: BlackBoxGroup, pool: np.ndarray, pool_batch: int = 2048,
                 anchors_per_class: int = 1, stability_views: int = 0,
                 stability_step: float = 0.35):
  """The ``anchors_per_class`` most confident pool images of every class of every model.

  Confidence is the logit margin z_c - max_{c' != c} z_c' among the images the model predicts as
  c: unlike the softmax probability it does not saturate at 1, so it still orders the many images
  a small network calls "certainly c" (and ranks in-domain images above the out-of-domain ones such
  networks are often over-confident on; see ``anchors_per_class`` in :class:`KnowledgeConfig`).

  Equal margins (see :func:`needs_tie_break`) are ordered by label stability
  (:func:`_stability`, ``stability_views`` extra calls over the pool, only for the models that
  need it), then by :func:`pool_priority` (see the module docstring).

  Returns:
    (anchor_index int32 [M, K, A] best first, anchor_fallback bool [M, K],
    pool_labels uint8 [M, N] the label of every pool image,
    tie_broken bool [M]: the models whose stability was measured).
  """
  m, k, a = group.num_models, group.num_classes, anchors_per_class
  n = len(pool)
  priority = pool_priority(n)
  labels = np.zeros((m, n), np.uint8)
  margins = np.empty((m, n, k), np.float32)
  for start in range(0, n, pool_batch):
    logits = np.asarray(group(pool[start:start + pool_batch], validate=False))  # [M, B, K]
    margins[:, start:start + logits.shape[1]] = _margin(logits)
    labels[:, start:start + logits.shape[1]] = logits.argmax(-1)
  stability = np.zeros((m, n), np.float32)
  tied = needs_tie_break(margins, labels, a) if stability_views > 0 else np.zeros(m, bool)
  if tied.any():
    sub = group if tied.all() else group.subset([group.model_ids[i] for i in np.flatnonzero(tied)])
    stability[tied] = _stability(sub, pool, labels[tied], stability_views, stability_step,
                                 pool_batch)
  own = np.where(labels[..., None] == np.arange(k), margins, -np.inf)
  index = np.empty((m, k, a), np.int64)
  fallback = np.zeros((m, k), bool)
  for i in range(m):
    for c in range(k):
      # Highest margin first; among equal margins, the more stable; then the pool priority.
      best = np.lexsort((priority, -stability[i], -own[i, :, c]))[:a]
      predicted = np.isfinite(own[i, best, c])
      fallback[i, c] = not predicted[0]
      if not predicted.all():  # fewer than A images predicted as c: fill from all images
        rest = np.lexsort((priority, -stability[i], -margins[i, :, c]))
        rest = rest[~np.isin(rest, best[predicted])][:a - int(predicted.sum())]
        best = np.concatenate([best[predicted], rest])
      index[i, c] = best
  return index.astype(np.int32), fallback, labels, tied


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
  anchor_index, fallback, pool_labels, _ = find_anchors(
      group, pool, config.pool_batch, config.anchors_per_class, config.stability_views,
      config.stability_step)
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
  # v2: pool labels kept, ties broken by pool priority; v3: ties broken by label stability
  # first (records of earlier versions may differ, so they are never reused).
  blob = f"{storage.checksum({'pool': np.asarray(pool)})}|T={config.search_steps}|" \
         f"A={config.anchors_per_class}|V={config.stability_views}|" \
         f"s={config.stability_step}|v3"
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
    """Stores a model's knowledge (in memory, and on disk when the store has a path: written by
    process 0 alone in a multi-process run)."""
    if fingerprint is None:
      return
    self._records[(model_id, fingerprint)] = record
    # Across processes every process holds every record; one of them writes the shared files.
    if self.path is not None and distributed.is_writer():
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
  is put into the store. In a multi-process run (``jax.process_count() > 1``) every process
  calls this with the same groups; the models to probe are split across the processes and every
  process returns every model's knowledge, equal to one process's bit for bit where the black
  boxes answer each model independently of the others in its call (the ``map`` and ``loop``
  strategies; see :func:`_extract_across_processes`). Query counters count this process's
  calls only.

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
  groups = list(groups)
  # Across processes, the models are probed once, split over the processes, and every process
  # receives every record; one process probes as it always has.
  shared = (_extract_across_processes(groups, pool, config, store)
            if distributed.process_count() > 1 else None)
  out = []
  for g in groups:
    fps = g.fingerprints
    recs = {m: store.get(m, fp) if store is not None else None
            for m, fp in zip(g.model_ids, fps)}
    missing = [m for m in g.model_ids if recs[m] is None]
    if missing:
      if shared is not None:
        found = [(m, shared[m]) for m in missing]
      else:
        sub = g if len(missing) == g.num_models else g.subset(missing)
        kn = extract_knowledge(sub, pool, config)
        found = _records({name: getattr(kn, name) for name in _RECORD_ARRAYS}, kn.model_ids)
      for m, rec in found:
        recs[m] = rec
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


_RECORD_ARRAYS = ("anchor_index", "flip_t", "anchor_fallback", "queries", "pool_labels")


def _records(arrays, model_ids) -> list[tuple[str, KnowledgeRecord]]:
  """(model id, record) per row of ``arrays`` (the :data:`_RECORD_ARRAYS`, one row per model)."""
  return [(m, KnowledgeRecord(arrays["anchor_index"][i], arrays["flip_t"][i],
                              arrays["anchor_fallback"][i], int(arrays["queries"][i]),
                              arrays["pool_labels"][i]))
          for i, m in enumerate(model_ids)]


def _extract_across_processes(groups: list[BlackBoxGroup], pool: np.ndarray,
                              config: KnowledgeConfig, store: KnowledgeStore | None
                              ) -> dict[str, KnowledgeRecord]:
  """The knowledge of every model some process's ``store`` lacks, extracted once across the
  processes of a multi-process run and given to every process (docs/design.md, "Multi-process
  stages").

  Every process holds the same black boxes. The models to probe are those any process lacks;
  each stack's share of them is split into contiguous slices, one per process
  (:func:`know2vec_jax.distributed.shard`: models of a stack cost the same, so every process
  gets an equal share of every stack). Each process extracts its slices as one sub-group per
  stack, exactly as one process extracts a whole stack, and the records are exchanged as
  checksummed parts.

  Returns:
    model id -> record, for every model that was probed.

  Raises:
    KnowledgeError: processes given different black boxes, or a part that is damaged or lacks
      a model.
  """
  ids = [m for g in groups for m in g.model_ids]
  fps = [fp for g in groups for fp in g.fingerprints]
  sig = hashlib.sha256(json.dumps([ids, fps]).encode()).digest()[:16]
  sigs = distributed.allgather(np.frombuffer(sig, np.uint8))
  if not (sigs == sigs[0]).all():
    raise KnowledgeError("the processes were given different black boxes (model ids or "
                         "fingerprints differ); every process must hold the same zoo")
  have = np.asarray([store is not None and store.get(m, fp) is not None
                     for m, fp in zip(ids, fps)], np.uint8)
  need = dict(zip(ids, distributed.allgather(have).min(axis=0) == 0))

  def extract_share() -> bytes:
    arrays, parts = {}, []
    for gi, g in enumerate(groups):
      todo = [m for m in g.model_ids if need[m]]
      share = todo[distributed.shard(len(todo))]
      if not share:
        continue
      kn = extract_knowledge(g if len(share) == g.num_models else g.subset(share), pool, config)
      for name in _RECORD_ARRAYS:
        arrays[f"{gi}/{name}"] = getattr(kn, name)
      parts.append([gi, list(kn.model_ids)])
    return storage.pack_arrays(arrays, {"groups": parts})

  blob = distributed.local_step("knowledge extraction", extract_share)
  got = {}
  for p, part in enumerate(distributed.allgather_bytes(blob)):
    arrays, meta = storage.unpack_arrays(part, f"the knowledge part of process {p}",
                                         KnowledgeError)
    for gi, mids in meta.get("groups", []):
      got.update(_records({name: arrays[f"{gi}/{name}"] for name in _RECORD_ARRAYS}, mids))
  lost = [m for m in ids if need[m] and m not in got]
  if lost:
    raise KnowledgeError(f"no process returned the knowledge of model {lost[0]!r} "
                         f"({len(lost)} missing)")
  return got
