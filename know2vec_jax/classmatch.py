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

The retrieval score is ``agreement + token_weight * token + vector_weight * (q . m)``: the aligned
vectors keep what the aligner learned about the tasks it saw (their domains above all), the class
terms carry the composition.

**Familiar queries.** The small vector weight and the hub correction (``hub_k``) serve queries of
tasks the aligner never saw and models of families it never saw; on a query of a task it *did*
train on they let the class terms prefer a near-twin (the same classes in another domain, three
classes of four shared) that the aligned vectors tell apart. A query is *familiar* when it sits
as close to the proxy's reference queries (validation queries of its training tasks) as almost
no reference query sits to another task's (:func:`calibrate_familiar`) and the model its vector
prefers fits its classes about as well as any (:func:`familiar`); a familiar query weighs the
vectors more and corrects them less (``familiar_*`` settings). The one-to-one assignment is greedy (repeatedly the largest remaining
entry), jitted and batched over queries and candidates; on the demo zoo's queries it ranked as the
exact (Hungarian) assignment did (top-1 0.865 vs 0.863).

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
from know2vec_jax.config import require


@dataclasses.dataclass(frozen=True)
class MatchConfig:
  """How retrieval scores a (query, model) pair.

  The defaults were chosen on validation queries of training tasks of the varied zoo
  (``python -m experiments.generalise --validate``; its docstring records the numbers): top-1 on
  validation tasks the aligner never saw rose from 0.47 (vectors alone) to 0.84, and 1.00 on
  training tasks; a larger token weight (0.5, 1) or vector weight (0.5) lost 0.05-0.15 there.
  ``radius`` and ``fit_token_weight`` were chosen on the open-world validation carves (a source
  no training model has; ``python -m experiments.openworld --validate``): top-1 0.712 -> 0.748
  with the radius, and no-fit false alarm 0.208 -> 0.033 at detection 0.956 -> 0.985 with the
  fit token weight 2.

  Attributes:
    enabled: score with class-level matching (False: the vector cosine q . m alone).
    neighbours: pool images standing for each query class (nearest to its prototype in phi).
    radius: keep, of those, only the pool images at least as close to the class prototype as
      the query's own least typical image of the class (its smallest cosine to the prototype),
      and never fewer than ``min_neighbours``: a pool with few images of the query's kind (a
      small source, a domain the pool barely covers) then lends fewer, purer stand-ins instead
      of filling ``neighbours`` with other classes.
    min_neighbours: the fewest stand-ins per class with ``radius``.
    token_weight: weight of the token match.
    vector_weight: weight of the aligned vectors' cosine.
    shortlist: candidates per query that the vector stage passes on (0: every model). Large, so
      that every model of a zoo of up to this size is matched class by class: a family the aligner
      never saw gets vectors that say little (on the varied zoo, held-out ``knn`` models ranked a
      median 140th by their vectors while their class agreement was 0.99), and a short list of
      256 left them out.
    hub_k: correct each model's cosine q . m by its hub offset h(m), the mean of its ``hub_k``
      highest cosines to the proxy's reference queries
      (:meth:`know2vec_jax.index.ModelIndex.hub_offsets`; 0: raw cosines). Vectors of a family
      the aligner never saw sit apart from every query (on the varied zoo, trained without
      ``knn``: h = 0.48 for its models against 0.83-0.90 for the others): raw, their cosine ranks
      them down whatever their class agreement.
    hub_scale: lambda in q . m - lambda * h(m): 1 is cross-domain similarity local scaling on
      the model side; smaller keeps more of the raw cosine, which tells the tasks the aligner
      trained on apart best.
    fit_threshold: a query whose fit score (the highest ``agreement + fit_token_weight *
      token`` among the candidates, :func:`fit_score`) is below this is flagged as fitting no
      model; set by calibration on validation queries (:func:`calibrate_threshold`). 0 never
      flags: agreement is >= 0, and so are the token cosines, phi's features being non-negative
      (ReLU).
    fit_token_weight: the token match's weight in the fit score. A model of another source
      can label a new source's stand-ins consistently (every trouser a "1"), but its class
      tokens, made of its own kind of image, do not look like the query's classes: the token
      separates "no model fits" from "a model fits" where agreement alone does not.
    familiar_threshold: a query whose familiarity (its highest cosine to the proxy's reference
      queries, :func:`familiarity`) is at least this, and that passes ``familiar_fit_gap``, is
      *familiar*: it looks like a query of a task the aligner trained on, and is scored with
      ``familiar_hub_scale`` and ``familiar_vector_weight`` instead of ``hub_scale`` and
      ``vector_weight`` (:func:`familiar`). Set by calibration on the reference queries
      (:func:`calibrate_familiar`); None: no query is familiar.
    familiar_quantile: the calibration's share of reference queries whose nearest reference
      query of *another* task stays under the threshold (what an unseen task's query looks
      like); 0 turns the gate off (no threshold is calibrated).
    familiar_fit_gap: a familiar query must also have its aligned vector's favourite model fit
      its classes within this of the best-fitting model (:func:`fit_score`): the vectors and the
      class terms agree on what the query is.
    familiar_hub_scale, familiar_vector_weight: the vector term of a familiar query. Where the
      query is of a task the aligner trained on, its aligned vectors tell that task's models
      from near-twins (the same classes in another domain, three classes of four shared) better
      than the untrained class terms do, and the hub correction, which keeps foreign families
      in reach of unseen queries, only blurs that.
  """
  enabled: bool = True
  neighbours: int = 100
  radius: bool = True
  min_neighbours: int = 5
  token_weight: float = 0.25
  vector_weight: float = 0.1
  shortlist: int = 4096
  hub_k: int = 1
  hub_scale: float = 1.0
  fit_threshold: float = 0.0
  fit_token_weight: float = 2.0
  familiar_threshold: float | None = None
  familiar_quantile: float = 0.98
  familiar_fit_gap: float = 0.1
  familiar_hub_scale: float = 0.5
  familiar_vector_weight: float = 0.5

  def __post_init__(self):
    require(self.neighbours >= 1, f"match neighbours must be >= 1, got {self.neighbours}")
    require(1 <= self.min_neighbours <= self.neighbours, f"match min_neighbours must be in "
            f"1..neighbours={self.neighbours}, got {self.min_neighbours}")
    require(self.fit_token_weight >= 0, f"match fit_token_weight must be >= 0, got "
            f"{self.fit_token_weight}")
    require(self.token_weight >= 0 and self.vector_weight >= 0,
            f"match token_weight and vector_weight must be >= 0, got {self.token_weight}, "
            f"{self.vector_weight}")
    require(self.shortlist >= 0, f"match shortlist must be >= 0, got {self.shortlist}")
    require(self.hub_k >= 0, f"match hub_k must be >= 0, got {self.hub_k}")
    require(0.0 <= self.hub_scale <= 1.0, f"match hub_scale must be in [0, 1], got "
            f"{self.hub_scale}")
    require(0.0 <= self.familiar_hub_scale <= 1.0, f"match familiar_hub_scale must be in [0, 1], "
            f"got {self.familiar_hub_scale}")
    require(self.familiar_vector_weight >= 0, f"match familiar_vector_weight must be >= 0, got "
            f"{self.familiar_vector_weight}")
    require(0.0 <= self.familiar_quantile < 1.0, f"match familiar_quantile must be in [0, 1), got "
            f"{self.familiar_quantile}")
    require(self.familiar_fit_gap >= 0, f"match familiar_fit_gap must be >= 0, got "
            f"{self.familiar_fit_gap}")


@dataclasses.dataclass
class QueryClasses:
  """The class-level description of Q queries (padded to K_max classes).

  Attributes:
    prototypes: float32 [Q, K_max, D] unit class prototypes (zero rows past a query's K).
    mask: float32 [Q, K_max] 1 for the query's classes.
    anchors: int32 [Q, K_max, n] pool indices standing for each class (nearest first).
    familiarity: float32 [Q] each query's highest cosine to the proxy's reference queries
      (:func:`familiarity`), or None (a proxy without reference queries).
    weights: float32 [Q, K_max, n], 1 for the stand-ins that count (``MatchConfig.radius``), or
      None: every one counts.
  """
  prototypes: np.ndarray
  mask: np.ndarray
  anchors: np.ndarray
  familiarity: np.ndarray | None = None
  weights: np.ndarray | None = None

  def __len__(self) -> int:
    return self.prototypes.shape[0]

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


@functools.partial(jax.jit, static_argnames=("gather_tokens",))
def _class_scores(prototypes, q_mask, anchors, weights, tokens, t_mask, labels, rows,
                  gather_tokens: bool):
  """prototypes [Q, Kq, D], q_mask [Q, Kq], anchors [Q, Kq, n], the stand-ins' weights
  [Q, Kq, n]; every model's tokens [M, Km, D],
  t_mask [M, Km] and pool labels [M, N]; each query's candidates ``rows`` [Q, R] (indices into
  M) -> (agreement, token) [Q, R]. ``gather_tokens``: the prototype-token cosines from the
  candidates' gathered tokens (Q R Km D values) rather than against every model's, then picked
  (Q M Kq Km values): whichever is smaller."""
  km = tokens.shape[-2]
  qm = q_mask > 0
  tm = t_mask[rows] > 0  # [Q, R, Km]
  kq = jnp.maximum(q_mask.sum(-1), 1.0)[:, None]  # [Q, 1]
  # Each candidate's labels on each query class's stand-ins: [Q, R, Kq, n], gathered where the
  # labels live (a query reads R * Kq * n of the M * N labels).
  got = labels[rows[:, :, None, None], anchors[:, None, :, :]]
  # Counts by comparison in the labels' own dtype (10x faster on CPU than a float one-hot),
  # each stand-in counted by its weight (all 1 unless MatchConfig.radius drops some).
  eq = got[..., None] == jnp.arange(km, dtype=labels.dtype)  # [Q, R, Kq, n, Km]
  if weights is None:
    confusion = eq.sum(-2, dtype=jnp.int32).astype(jnp.float32) / anchors.shape[-1]
  else:
    hits = jnp.einsum("qrkne,qkn->qrke", eq.astype(jnp.float32), weights)
    confusion = hits / jnp.maximum(weights.sum(-1), 1e-6)[:, None, :, None]  # [Q, R, Kq, Km]
  agreement = greedy_assignment(confusion, qm[:, None], tm) / kq
  if gather_tokens:
    sim = jnp.einsum("qkd,qrjd->qrkj", prototypes, tokens[rows])  # [Q, R, Kq, Km]
  else:
    sim = jnp.einsum("qkd,mjd->qmkj", prototypes, tokens)
    sim = jnp.take_along_axis(sim, rows[:, :, None, None], axis=1)
  token = greedy_assignment(sim, qm[:, None], tm) / jnp.maximum(kq, tm.sum(-1))
  return agreement, token


@dataclasses.dataclass(frozen=True)
class ClassKnowledge:
  """Every model's class knowledge as :func:`class_scores` reads it (device arrays, classes
  trimmed to the widest model): build it once per index (:meth:`from_arrays`) and reuse it, so
  a query moves only its own indices to the device.

  Attributes:
    tokens: float32 [M, Km, D]; mask: float32 [M, Km]; pool_labels: uint8 [M, N].
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
               put(np.asarray(pool_labels, np.uint8)))

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
  # Queries of one class count run together, trimmed to it (a 4-way query padded to 10 classes
  # would gather and compare 2.5x the labels).
  k_of = query.mask.sum(-1).astype(int)
  for kq in np.unique(k_of):
    members = np.flatnonzero(k_of == kq)
    size = shapes.bucket(len(members), chunk)
    for s in range(0, len(members), size):
      part = members[s:s + size]
      pad = np.concatenate([part, np.full(size - len(part), part[-1])])  # one shape per size
      kk = max(int(kq), 1)
      km, dim = know.tokens.shape[1:]
      gather = rows.shape[1] * km * dim < m * kk * km
      w = None if query.weights is None else jnp.asarray(query.weights[pad, :kk])
      a, t = _class_scores(jnp.asarray(query.prototypes[pad, :kk]),
                           jnp.asarray(query.mask[pad, :kk]), jnp.asarray(query.anchors[pad, :kk]),
                           w,
                           know.tokens, know.mask, know.pool_labels,
                           jnp.asarray(rows[pad], jnp.int32), gather)
      agree[part], tok[part] = np.asarray(a)[:len(part)], np.asarray(t)[:len(part)]
  return agree, tok


def combine(agreement, token, vector, config: MatchConfig, vector_weight=None):
  """The retrieval score ``agreement + token_weight * token + vector_weight * vector``.

  ``vector_weight``: float [Q, 1] per query (familiar queries weigh their vectors by
  ``familiar_vector_weight``, :func:`vector_terms`); default the config's."""
  w = config.vector_weight if vector_weight is None else vector_weight
  return agreement + config.token_weight * token + w * vector


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


def familiar(classes: "QueryClasses | None", config: MatchConfig, fit=None,
             cosine=None) -> np.ndarray | None:
  """bool [Q]: which queries the familiar-task gate scores with the familiar settings; None
  when the gate is off or the queries carry no familiarity.

  A query is familiar when its familiarity reaches ``familiar_threshold`` and, given the
  candidates' fit scores and raw cosines, the model its aligned vector prefers fits its classes
  within ``familiar_fit_gap`` of the best-fitting candidate: the vectors and the classes agree.

  Args:
    classes: the queries' :class:`QueryClasses` (their ``familiarity``).
    config: the thresholds.
    fit: float [Q, R] the candidates' :func:`class_score` (optional).
    cosine: float [Q, R] the candidates' raw cosines q . m (optional, with ``fit``).
  """
  if config.familiar_threshold is None or classes is None or classes.familiarity is None:
    return None
  gate = np.asarray(classes.familiarity) >= config.familiar_threshold
  if fit is not None and cosine is not None and np.shape(fit)[1]:
    fit = np.asarray(fit)
    preferred = np.take_along_axis(fit, np.argmax(cosine, axis=1)[:, None], 1)[:, 0]
    gate &= fit.max(1) - preferred <= config.familiar_fit_gap
  return gate


def vector_terms(gate: np.ndarray | None, config: MatchConfig) -> tuple:
  """(hub scale, vector weight) per query, float32 [Q, 1] each, or the config's scalars when
  ``gate`` (:func:`familiar`) is None."""
  if gate is None:
    return config.hub_scale, config.vector_weight
  g = np.asarray(gate, bool)[:, None]
  return (np.where(g, config.familiar_hub_scale, config.hub_scale).astype(np.float32),
          np.where(g, config.familiar_vector_weight, config.vector_weight).astype(np.float32))


def familiar_threshold(other_task, quantile: float) -> float:
  """The ``quantile`` quantile of reference queries' highest cosines to other tasks' reference
  queries (:func:`calibrate_familiar`'s ``other_task``): the familiar-task threshold."""
  return float(np.quantile(np.asarray(other_task, np.float64), quantile, method="higher"))


def calibrate_familiar(reference, tasks, quantile: float) -> dict:
  """The familiar-task threshold from the reference queries alone.

  A query of a task the aligner trained on has that task's reference queries nearby; a query of
  another task has only other tasks' reference queries. Each reference query's highest cosine
  to reference queries of *other* tasks stands for an unseen task's familiarity; the threshold
  is its ``quantile`` quantile, so about ``1 - quantile`` of such queries would pass as familiar.
  Each reference query's highest cosine to the *same* task's other reference queries, reported
  beside it, says how many seen-task queries pass (``seen_pass``).

  Args:
    reference: float [R, E] the reference query vectors.
    tasks: int [R] each reference query's task.
    quantile: in [0, 1).

  Returns:
    {"threshold": float, "other_task": [R] cosines, "same_task": [R'] cosines (queries with a
    second query of their task), "seen_pass": the share of same-task cosines >= threshold}.

  Raises:
    ValueError: fewer than two tasks, or no task with two reference queries.
  """
  ref = np.asarray(reference, np.float32)
  tasks = np.asarray(tasks)
  if len(np.unique(tasks)) < 2:
    raise ValueError("familiar-task calibration needs reference queries of at least two tasks")
  sim = ref @ ref.T
  same = tasks[:, None] == tasks[None, :]
  other = np.where(same, -np.inf, sim).max(1)
  np.fill_diagonal(same, False)
  has_twin = same.any(1)
  if not has_twin.any():
    raise ValueError("familiar-task calibration needs two reference queries of some task")
  mine = np.where(same, sim, -np.inf).max(1)[has_twin]
  threshold = familiar_threshold(other, quantile)
  return {"threshold": threshold, "other_task": other.tolist(), "same_task": mine.tolist(),
          "seen_pass": float(np.mean(mine >= threshold))}


def class_score(agreement, token, config: MatchConfig):
  """The class-level part of the retrieval score (no aligned vector): ``agreement +
  token_weight * token``; the familiar-task gate compares it across candidates."""
  return agreement + config.token_weight * token


def fit_score(agreement, token, config: MatchConfig):
  """How well a model fits a query's classes, comparable across seen and unseen tasks:
  ``agreement + fit_token_weight * token``; its highest value among a query's candidates is what
  the no-fit flag thresholds."""
  return agreement + config.fit_token_weight * token


def calibrate_threshold(best_fit_scores, false_alarm: float = 0.02) -> float:
  """The no-fit threshold that flags at most ``false_alarm`` of in-distribution validation
  queries: the ``false_alarm`` quantile of their best models' :func:`fit_score`.

  Args:
    best_fit_scores: float [V] the best model's fit score of each validation query.
    false_alarm: the share of such queries allowed to be flagged.

  Returns:
    The threshold (a float).
  """
  x = np.asarray(best_fit_scores, np.float64)
  if x.size == 0:
    raise ValueError("no validation scores to calibrate the no-fit threshold on")
  return float(np.quantile(x, false_alarm, method="lower"))
