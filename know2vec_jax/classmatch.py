"""Class-level matching: a query's classes against each model's classes (docs/design.md,
"Retrieval").

One aligned vector per model tells tasks apart only as well as the aligner learned to compose
class sets; on class sets it never trained on, a one-class-swapped twin often scores as high as the
right model. This module scores a (query, model) pair class by class, with no training, from what
both sides already hold:

- **agreement** (cross-evaluation on the probe pool): each query class is stood in for by the
  ``neighbours`` pool images nearest to its prototype in phi; the model's stored label for every
  pool image (:class:`know2vec_jax.knowledge.KnowledgeRecord`'s ``pool_labels``, recorded during
  the anchor pass at no extra query) gives a confusion matrix [K_q, K_m]; the best one-to-one
  assignment of query classes to model classes, divided by K_q, is the fraction of the query's
  stand-ins the model would label consistently. A model trained on the query's classes scores
  near 1; a twin with one class swapped sends that class's stand-ins to classes already taken.
- **token**: the query's class prototypes against the model's class tokens (the normalised mean phi
  of each class's anchors: the diagonal of its knowledge grid), one-to-one, summed cosine divided by
  max(K_q, K_m), so classes of a wider model that the query lacks count against it.

How the class terms join the aligned vectors in the retrieval score, the familiar-task gate and
the no-fit flag are :mod:`know2vec_jax.retrieval`'s. The one-to-one assignment is greedy
(repeatedly the largest remaining entry), jitted and batched over queries and candidates; on the
demo zoo's queries it ranked as the exact (Hungarian) assignment did (top-1 0.865 vs 0.863).

On a large index the vector stage first keeps a ``shortlist`` of candidates per query (one
matrix product and a top-k), and only those are matched class by class.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from know2vec_jax import shapes


@dataclasses.dataclass
class QueryClasses:
  """The class-level description of Q queries (padded to K_max classes).

  Attributes:
    prototypes: float32 [Q, K_max, D] unit class prototypes (zero rows past a query's K).
    mask: float32 [Q, K_max] 1 for the query's classes.
    anchors: int32 [Q, K_max, n] pool indices standing for each class (nearest first).
    familiarity: float32 [Q] each query's highest cosine to the proxy's reference queries
      (:func:`familiarity`), or None (a proxy without reference queries).
    weights: float32 [Q, K_max, n], 1 for the stand-ins that count (``MatchConfig.radius``) and
      0 for the others (a mask: any value above 0 counts as 1), or None: every one counts.
  """
  prototypes: np.ndarray
  mask: np.ndarray
  anchors: np.ndarray
  familiarity: np.ndarray | None = None
  weights: np.ndarray | None = None

  def __len__(self) -> int:
    return self.prototypes.shape[0]

  def device_batch(self, rows, k: int) -> tuple:
    """(prototypes, mask, anchors, weights or None) of the queries at ``rows``, trimmed to ``k``
    classes, on the device: what class scoring reads of a batch."""
    w = None if self.weights is None else jnp.asarray(self.weights[rows, :k])
    return (jnp.asarray(self.prototypes[rows, :k]), jnp.asarray(self.mask[rows, :k]),
            jnp.asarray(self.anchors[rows, :k]), w)

  def take(self, rows) -> "QueryClasses":
    """The queries at ``rows``."""
    fam = None if self.familiarity is None else self.familiarity[rows]
    w = None if self.weights is None else self.weights[rows]
    return QueryClasses(self.prototypes[rows], self.mask[rows], self.anchors[rows], fam, w)


@functools.partial(jax.jit, static_argnames=("n",))
def _nearest(prototypes, pool_features, n: int):
  sim = jnp.einsum("qkd,nd->qkn", prototypes, pool_features)
  top, idx = jax.lax.top_k(sim, n)
  return idx.astype(jnp.int32), top


def query_classes(prototypes, mask, pool_features, neighbours: int, radius=None,
                  min_neighbours: int = 1) -> QueryClasses:
  """Locates every query class in the probe pool.

  Args:
    prototypes: float [Q, K_max, D] unit class prototypes (the query grids' diagonals).
    mask: float [Q, K_max].
    pool_features: float32 [N, D] phi of the probe pool.
    neighbours: n, pool images per class (at most N).
    radius: float [Q, K_max] or None: only stand-ins whose cosine to the prototype reaches the
      class's radius count (``weights``), and at least ``min_neighbours`` of them.
    min_neighbours: see ``radius``.

  Returns:
    The :class:`QueryClasses`.
  """
  prototypes = np.asarray(prototypes, np.float32)
  n = min(int(neighbours), len(pool_features))
  anchors, sim = _nearest(jnp.asarray(prototypes), jnp.asarray(pool_features), n)
  weights = None
  if radius is not None:
    sim = np.asarray(sim)
    keep = (sim >= np.asarray(radius, np.float32)[..., None] - 1e-6) | (
        np.arange(n) < min(int(min_neighbours), n))
    weights = keep.astype(np.float32)
  return QueryClasses(prototypes, np.asarray(mask, np.float32), np.asarray(anchors),
                      weights=weights)


def greedy_assignment(scores, row_mask, col_mask):
  """Sum of a greedy one-to-one assignment (jittable, batched over leading axes).

  Repeatedly takes the largest entry among rows and columns not yet used, min(valid rows, valid
  columns) times.

  Args:
    scores: float [..., R, C].
    row_mask, col_mask: bool [..., R] / [..., C], the valid rows and columns.

  Returns:
    float [...]: the summed scores of the assigned pairs.
  """
  r, c = scores.shape[-2:]
  valid = row_mask[..., :, None] & col_mask[..., None, :]
  s = jnp.where(valid, scores, -jnp.inf)
  rows, cols = jnp.arange(r), jnp.arange(c)

  def step(_, carry):
    s, total = carry
    flat = s.reshape(s.shape[:-2] + (r * c,))
    at = jnp.argmax(flat, axis=-1)
    best = jnp.take_along_axis(flat, at[..., None], axis=-1)[..., 0]
    total = total + jnp.where(jnp.isfinite(best), best, 0.0)
    used = ((rows == (at // c)[..., None])[..., :, None]
            | (cols == (at % c)[..., None])[..., None, :])
    return jnp.where(used, -jnp.inf, s), total

  _, total = jax.lax.fori_loop(0, min(r, c), step, (s, jnp.zeros(scores.shape[:-2])))
  return total


# The most pool labels one class-scoring call reads as whole rows (64 Mi: 64 MB of uint8 labels).
_WHOLE_ROWS = 1 << 26


def _field_counts(labels, keep, km: int, n: int, axis: int):
  """How many of the ``n`` labels along ``axis`` of ``labels`` (integers) equal each class
  0..km-1, counting only where ``keep`` (bool, broadcast against ``labels``): int32 [..., km]
  (``axis`` removed). Counting is packed: each class's count is a field of
  ``bits`` >= bit_length(n) bits in a uint32 word (4 classes per word for n < 256), so one add
  per label counts every class of its word instead of one compare per class (6x faster on a
  CPU); a field never carries into the next, as it never exceeds n."""
  bits = max(8, int(n).bit_length())
  per = max(32 // bits, 1)
  g = labels.astype(jnp.int32)
  out = []
  for w0 in range(0, km, per):
    inside = keep & (g >= w0) & (g < w0 + per)
    shift = (bits * jnp.clip(g - w0, 0, per - 1)).astype(jnp.uint32)
    word = jnp.where(inside, jnp.left_shift(jnp.uint32(1), shift), jnp.uint32(0))
    total = word.sum(axis, dtype=jnp.uint32)
    field = jnp.uint32((1 << bits) - 1) if bits < 32 else jnp.uint32(0xFFFFFFFF)
    out += [jnp.right_shift(total, jnp.uint32(bits * e)) & field
            for e in range(min(per, km - w0))]
  return jnp.stack(out, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("gather_tokens",))
def _class_scores(prototypes, q_mask, anchors, weights, tokens, t_mask, labels, rows,
                  gather_tokens: bool):
  """prototypes [Q, Kq, D], q_mask [Q, Kq], anchors [Q, Kq, n], the stand-ins' weights
  [Q, Kq, n] (a mask: above 0 counts); every model's tokens [M, Km, D], t_mask [M, Km] and
  pool labels, pool-major, [N, M]; each query's candidates ``rows`` [Q, R] (indices into M)
  -> (agreement, token) [Q, R]. ``gather_tokens``: the prototype-token cosines from the
  candidates' gathered tokens (Q R Km D values) rather than against every model's, then picked
  (Q M Kq Km values): whichever is smaller."""
  km = tokens.shape[-2]
  n = anchors.shape[-1]
  m, r = labels.shape[1], rows.shape[1]
  qm = q_mask > 0
  tm = t_mask[rows] > 0  # [Q, R, Km]
  kq = jnp.maximum(q_mask.sum(-1), 1.0)[:, None]  # [Q, 1]
  keep = (jnp.ones(anchors.shape, bool) if weights is None else weights > 0)[..., None]
  # Each candidate's labels on each query class's stand-ins. The labels are stored pool-major,
  # so a stand-in's labels by every model are one contiguous row: reading whole rows and
  # counting for every model beats gathering R * Kq * n scattered bytes (4.4 against 24 ms for
  # one query, R = 4,096 of M = 10^4 on a 2-core CPU) while M is within a few R; for a much
  # larger index, or a batch whose whole rows would pass _WHOLE_ROWS labels, only the
  # candidates' columns are gathered.
  if m <= 8 * r and anchors.size * m <= _WHOLE_ROWS:
    counts = _field_counts(labels[anchors], keep, km, n, axis=2)  # [Q, Kq, M, Km]
    counts = jnp.take_along_axis(counts, rows[:, None, :, None], axis=2)  # [Q, Kq, R, Km]
  else:
    got = labels[anchors[:, :, :, None], rows[:, None, None, :]]  # [Q, Kq, n, R]
    counts = _field_counts(got, keep, km, n, axis=2)
  used = keep[..., 0].sum(-1).astype(jnp.float32)  # [Q, Kq] the stand-ins that count
  confusion = (counts.transpose(0, 2, 1, 3).astype(jnp.float32)
               / jnp.maximum(used, 1.0)[:, None, :, None])  # [Q, R, Kq, Km]
  agreement = greedy_assignment(confusion, qm[:, None], tm) / kq
  if gather_tokens:
    sim = jnp.einsum("qkd,qrjd->qrkj", prototypes, tokens[rows])  # [Q, R, Kq, Km]
  else:
    sim = jnp.einsum("qkd,mjd->qmkj", prototypes, tokens)
    sim = jnp.take_along_axis(sim, rows[:, :, None, None], axis=1)
  token = greedy_assignment(sim, qm[:, None], tm) / jnp.maximum(kq, tm.sum(-1))
  return agreement, token


def _pool_major(labels: np.ndarray, block: int = 512) -> np.ndarray:
  """uint8 [M, N] -> contiguous [N, M], transposed in slabs of ``block`` models (a whole
  transpose at once reads memory in strides: 1.9 s against 0.26 s for 10^4 x 9,600 labels)."""
  out = np.empty(labels.shape[::-1], labels.dtype)
  for i in range(0, labels.shape[0], block):
    out[:, i:i + block] = labels[i:i + block].T
  return out


@dataclasses.dataclass(frozen=True)
class ClassKnowledge:
  """Every model's class knowledge as :func:`class_scores` reads it (device arrays, classes
  trimmed to the widest model): build it once per index (:meth:`from_arrays`) and reuse it, so
  a query moves only its own indices to the device.

  Attributes:
    tokens: float32 [M, Km, D]; mask: float32 [M, Km]; pool_labels: uint8 [N, M], pool-major
      (a pool image's labels by every model are one contiguous row: what a query reads).
  """
  tokens: jax.Array
  mask: jax.Array
  pool_labels: jax.Array

  @classmethod
  def from_arrays(cls, tokens, token_mask, pool_labels, device=None) -> "ClassKnowledge":
    """From host arrays (``tokens`` [M, K_max, D], ``token_mask`` [M, K_max], ``pool_labels``
    [M, N]) onto ``device`` (default: JAX's default device)."""
    token_mask = np.asarray(token_mask, np.float32)
    km = max(int(token_mask.sum(-1).max(initial=0)), 1)
    put = (lambda a: jax.device_put(a, device)) if device is not None else jnp.asarray
    return cls(put(np.ascontiguousarray(np.asarray(tokens, np.float32)[:, :km])),
               put(np.ascontiguousarray(token_mask[:, :km])),
               put(_pool_major(np.asarray(pool_labels, np.uint8))))

  def __len__(self) -> int:
    return self.tokens.shape[0]


def class_scores(query: QueryClasses, tokens, token_mask=None, pool_labels=None, rows=None,
                 chunk: int = 32):
  """Class-level scores of candidate models for each query.

  Args:
    query: Q queries (:func:`query_classes`).
    tokens: float32 [M, K_max, D] every model's unit class tokens, or a :class:`ClassKnowledge`
      holding all three arrays (then ``token_mask`` and ``pool_labels`` are not given).
    token_mask: float32 [M, K_max].
    pool_labels: uint8 [M, N] every model's label for each pool image.
    rows: int [Q, R] the candidate models of each query (default: all M for every query).
    chunk: the most queries per jitted call.

  Returns:
    (agreement float32 [Q, R], token float32 [Q, R]).
  """
  know = tokens if isinstance(tokens, ClassKnowledge) else ClassKnowledge.from_arrays(
      tokens, token_mask, pool_labels)
  q = len(query)
  m = len(know)
  rows = np.broadcast_to(np.arange(m), (q, m)) if rows is None else np.asarray(rows)
  agree = np.zeros(rows.shape, np.float32)
  tok = np.zeros(rows.shape, np.float32)
  if q == 0 or rows.shape[1] == 0:
    return agree, tok
  km, dim = know.tokens.shape[1:]
  for kk, part, pad in query_batches(query, chunk):
    gather = rows.shape[1] * km * dim < m * kk * km
    a, t = _class_scores(*query.device_batch(pad, kk), know.tokens, know.mask, know.pool_labels,
                         jnp.asarray(rows[pad], jnp.int32), gather)
    agree[part], tok[part] = np.asarray(a)[:len(part)], np.asarray(t)[:len(part)]
  return agree, tok


def query_batches(query: QueryClasses, chunk: int):
  """The batches class scoring runs ``query`` in: queries of one class count together, trimmed
  to it (a 4-way query padded to 10 classes would gather and compare 2.5x the labels), at most
  ``chunk`` per batch and padded to a power of two (one compilation per size).

  Yields:
    (class count K >= 1, the batch's query rows, those rows padded by repeating the last).
  """
  k_of = query.mask.sum(-1).astype(int)
  for kq in np.unique(k_of):
    members = np.flatnonzero(k_of == kq)
    size = shapes.bucket(len(members), chunk)
    for s in range(0, len(members), size):
      part = members[s:s + size]
      yield max(int(kq), 1), part, np.concatenate([part, np.full(size - len(part), part[-1])])


def familiarity(query_vectors, reference) -> np.ndarray | None:
  """Each query's highest cosine to the reference queries (float32 [Q]); None without them.

  Args:
    query_vectors: float [Q, E] unit query vectors.
    reference: float [R, E] the proxy's reference query vectors (validation queries of its
      training tasks).
  """
  reference = np.asarray(reference, np.float32)
  if reference.shape[0] == 0:
    return None
  return (np.asarray(query_vectors, np.float32) @ reference.T).max(1)


# Moved to know2vec_jax.retrieval (the scorer owns the score, the gate and the calibrations);
# read through here for code that imported them from this module.
_MOVED = ("MatchConfig", "combine", "class_score", "fit_score",
          "familiar_threshold", "calibrate_familiar", "calibrate_threshold")


def __getattr__(name: str):
  if name in _MOVED:
    from know2vec_jax import retrieval
    return getattr(retrieval, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
