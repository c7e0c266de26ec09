"""Retrieval scoring: how a described query ranks an index's models, and the statistics fitted for
it (docs/design.md, "Retrieval").

Three things are kept apart here:

- **Settings** (:class:`MatchConfig`): weights, the shortlist, the stand-ins' rule, the quantiles
  the thresholds are read at. A user may change any of them at query time.
- **Fitted statistics** (:class:`Calibration`): the reference queries (validation queries of the
  proxy's training tasks, embedded after training), how close each reference query comes to its
  own and to other tasks' (the familiar-task gate reads its threshold from them at
  ``MatchConfig.familiar_quantile``), and the no-fit threshold with the validation fit scores it
  was read from. They are fitted by :func:`calibrate` after training and saved with the proxy;
  never config fields, so a setting given at training is never overwritten by a fitted value.
- **Scoring** (:class:`Retriever`): settings plus statistics; :meth:`Retriever.score` ranks an
  index's rows for described queries (:meth:`know2vec_jax.proxy.Proxy.describe_queries`).

The retrieval score of a (query, model) pair is
``agreement + token_weight * token + w * (q . m - lambda * h(m))``: the class terms of
:mod:`know2vec_jax.classmatch` (cross-evaluation on the probe pool and the class tokens), the
aligned vectors' cosine, and the model's hub offset h(m) (the mean of its ``hub_k`` highest
cosines to the reference queries, stored with each index row). A query is *familiar* when it
sits as close to the reference queries as almost no reference query sits to another task's and
the model its vector prefers fits its classes about as well as any: it is scored with the
``familiar_*`` weights (:meth:`Retriever.score`). The best candidate's fit score
``agreement + fit_token_weight * token`` below the no-fit threshold flags the query as fitting
no model of the index.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from know2vec_jax import classmatch, shapes
from know2vec_jax import config as config_lib
from know2vec_jax.config import ConfigError, require

if TYPE_CHECKING:  # the index is duck-typed here: storage and top-k live in know2vec_jax.index
  from know2vec_jax.index import ModelIndex

# The fitted thresholds a user may still set by hand at query time (``Retriever.with_settings``).
THRESHOLDS = ("fit_threshold", "familiar_threshold")


@dataclasses.dataclass(frozen=True)
class MatchConfig:
  """How retrieval scores a (query, model) pair: settings only (the fitted thresholds are
  :class:`Calibration`'s).

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
    fit_token_weight: the token match's weight in the fit score the no-fit flag thresholds. A
      model of another source can label a new source's stand-ins consistently (every trouser a
      "1"), but its class tokens, made of its own kind of image, do not look like the query's
      classes: the token separates "no model fits" from "a model fits" where agreement alone
      does not.
    familiar_quantile: the familiar-task threshold is this quantile of the reference queries'
      highest cosines to *other* tasks' reference queries (what an unseen task's query looks
      like; :func:`calibrate_familiar`); 0 turns the gate off.
    familiar_fit_gap: a familiar query must also have its aligned vector's favourite model fit
      its classes within this of the best-fitting model (:func:`class_score`): the vectors and
      the class terms agree on what the query is.
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
  fit_token_weight: float = 2.0
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


def _floats(x) -> np.ndarray:
  return np.asarray(x if x is not None else (), np.float32).reshape(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
  """What retrieval fitted after training (:func:`calibrate`); saved with the proxy.

  Attributes:
    reference: float32 [R, E] the reference query vectors (validation queries of the training
      tasks): a query's familiarity is its highest cosine to them, and every index row records
      its highest cosines to them (the hub offsets).
    fit_threshold: the no-fit threshold: a query whose best candidate's fit score is below it is
      flagged (0 never flags).
    false_alarm: the share of the validation queries' fit scores below ``fit_threshold`` (the
      quantile it was read at; None: not calibrated).
    fit_scores: float32 [V] the validation queries' best fit scores it was read from.
    familiar_other: float32 [R] each reference query's highest cosine to another task's
      reference query (empty: the gate cannot be calibrated, e.g. one training task).
    familiar_same: float32 [R'] each reference query's highest cosine to its own task's others.
  """
  reference: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))
  fit_threshold: float = 0.0
  false_alarm: float | None = None
  fit_scores: np.ndarray = dataclasses.field(default_factory=lambda: _floats(None))
  familiar_other: np.ndarray = dataclasses.field(default_factory=lambda: _floats(None))
  familiar_same: np.ndarray = dataclasses.field(default_factory=lambda: _floats(None))

  def __post_init__(self):
    ref = np.asarray(self.reference, np.float32)
    require(ref.ndim == 2 or ref.size == 0, f"reference must be [R, E], got shape {ref.shape}")
    object.__setattr__(self, "reference", ref if ref.ndim == 2 else ref.reshape(0, 0))
    for name in ("fit_scores", "familiar_other", "familiar_same"):
      object.__setattr__(self, name, _floats(getattr(self, name)))
    require(np.isfinite(self.fit_threshold), f"fit_threshold must be finite, got "
            f"{self.fit_threshold}")

  def familiar_threshold(self, quantile: float) -> float | None:
    """The familiar-task threshold at ``quantile`` (:func:`familiar_threshold`); None when the
    gate is off (quantile 0) or was not calibrated."""
    if not quantile or not self.familiar_other.size:
      return None
    return familiar_threshold(self.familiar_other, quantile)

  def to_manifest(self) -> dict:
    """The JSON part (the reference vectors are an array tree of their own)."""
    return {"fit_threshold": float(self.fit_threshold), "false_alarm": self.false_alarm,
            "fit_scores": self.fit_scores.tolist(),
            "familiar_other": self.familiar_other.tolist(),
            "familiar_same": self.familiar_same.tolist()}

  @classmethod
  def from_manifest(cls, d: dict, reference) -> "Calibration":
    """Inverse of :meth:`to_manifest` (ValueError/TypeError/KeyError on a malformed dict)."""
    if not isinstance(d, dict):
      raise TypeError(f"retrieval calibration must be a dict, got {type(d).__name__}")
    fa = d.get("false_alarm")
    return cls(reference, float(d["fit_threshold"]), None if fa is None else float(fa),
               d.get("fit_scores", ()), d.get("familiar_other", ()), d.get("familiar_same", ()))


@dataclasses.dataclass
class Matches:
  """What :meth:`Retriever.score` returns for Q queries, best first (k' columns).

  Attributes:
    ids: per query, the k' model ids.
    scores: float32 [Q, k'] the retrieval score (:func:`combine`).
    agreement, token, vector: float32 [Q, k'] its parts.
    fit: float32 [Q] the highest class-level fit score among the candidates (:func:`fit_score`).
    no_fit: bool [Q] the fit score is below the retriever's ``fit_threshold``: no model of the
      index fits the query's classes well.
    familiar: bool [Q] the query looks like one of a task the proxy trained on and was scored
      with the familiar settings (:meth:`Retriever.score`).
  """
  ids: list[list[str]]
  scores: np.ndarray
  agreement: np.ndarray
  token: np.ndarray
  vector: np.ndarray
  fit: np.ndarray
  no_fit: np.ndarray
  familiar: np.ndarray


# ---- the score's parts (pure) --------------------------------------------------------------------

def combine(agreement, token, vector, config: MatchConfig, vector_weight=None):
  """The retrieval score ``agreement + token_weight * token + vector_weight * vector``.

  ``vector_weight``: float [Q, 1] per query (familiar queries weigh their vectors by
  ``familiar_vector_weight``); default the config's. ``config`` here and in the two functions
  below is a :class:`MatchConfig` or any object with its weights: the device scorer passes
  traced ones, so that a new setting does not compile again."""
  w = config.vector_weight if vector_weight is None else vector_weight
  return agreement + config.token_weight * token + w * vector


def class_score(agreement, token, config: MatchConfig):
  """The class-level part of the retrieval score (no aligned vector): ``agreement +
  token_weight * token``; the familiar-task gate compares it across candidates."""
  return agreement + config.token_weight * token


def fit_score(agreement, token, config: MatchConfig):
  """How well a model fits a query's classes, comparable across seen and unseen tasks:
  ``agreement + fit_token_weight * token``; its highest value among a query's candidates is what
  the no-fit flag thresholds."""
  return agreement + config.fit_token_weight * token


# ---- calibration (pure) --------------------------------------------------------------------------

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


# ---- the scorer ----------------------------------------------------------------------------------

_DERIVED = object()  # the familiar threshold read from the calibration at the config's quantile


class Retriever:
  """Settings plus fitted statistics: ranks an index's models for described queries.

  Args:
    config: the settings (:class:`MatchConfig`).
    calibration: the fitted statistics (default: none fitted: no reference queries, no gate,
      threshold 0).
    fit_threshold: a no-fit threshold set by hand instead of the calibration's (None: the
      calibration's).
    familiar_threshold: a familiar-task threshold set by hand (None: the gate off); default: the
      calibration's at ``config.familiar_quantile``.
  """

  def __init__(self, config: MatchConfig = MatchConfig(), calibration: Calibration | None = None,
               *, fit_threshold: float | None = None, familiar_threshold: Any = _DERIVED):
    self.config = config
    self.calibration = calibration if calibration is not None else Calibration()
    self._fit_threshold = fit_threshold
    self._familiar_threshold = familiar_threshold

  @property
  def fit_threshold(self) -> float:
    """The no-fit threshold in use (set by hand, or the calibration's)."""
    return (self.calibration.fit_threshold if self._fit_threshold is None
            else float(self._fit_threshold))

  @property
  def familiar_threshold(self) -> float | None:
    """The familiar-task threshold in use (None: the gate is off)."""
    if self._familiar_threshold is _DERIVED:
      return self.calibration.familiar_threshold(self.config.familiar_quantile)
    return self._familiar_threshold

  def with_settings(self, overrides: Sequence[str] = ()) -> "Retriever":
    """The same statistics with other settings: ``overrides`` are "key=value" strings of
    :class:`MatchConfig` fields, or ``fit_threshold`` / ``familiar_threshold`` to set a fitted
    threshold by hand (``none`` turns the familiar gate off). A new ``familiar_quantile`` without
    a hand-set ``familiar_threshold`` re-reads the threshold from the calibration.

    Raises:
      ConfigError: an unknown field or a bad value.
    """
    settings, thresholds = [], {}
    for item in overrides:
      key, sep, text = str(item).partition("=")
      key = key.strip().removeprefix("match.")
      if not sep:
        raise ConfigError(f"a retrieval setting must be KEY=VALUE, got {item!r}")
      if key in THRESHOLDS:
        thresholds[key] = _threshold(key, text)
      else:
        settings.append(f"{key}={text}")
    config = config_lib.override(self.config, settings)
    fam = self._familiar_threshold
    if "familiar_threshold" in thresholds:
      fam = thresholds["familiar_threshold"]
    elif any(s.split("=", 1)[0].strip() == "familiar_quantile" for s in settings):
      fam = _DERIVED
    fit = thresholds.get("fit_threshold", self._fit_threshold)
    if "fit_threshold" in thresholds and fit is None:
      raise ConfigError("fit_threshold must be a number (0 never flags), got none")
    return Retriever(config, self.calibration, fit_threshold=fit, familiar_threshold=fam)

  def familiarity(self, query_vectors) -> np.ndarray | None:
    """Each query's highest cosine to the reference queries (float32 [Q]); None without them."""
    return classmatch.familiarity(query_vectors, self.calibration.reference)

  def score(self, index: "ModelIndex", vectors, classes: classmatch.QueryClasses | None,
            k: int = 10) -> Matches:
    """The k best models per query by vector *and* class-level score (two stages).

    The vector stage ranks every row by q . m (corrected by the model's hub offset,
    :meth:`know2vec_jax.index.ModelIndex.hub_offsets`, times ``hub_scale``, or
    ``familiar_hub_scale`` for a familiar query, when ``hub_k`` is set: the returned ``vector``
    part is then the corrected cosine) and keeps ``shortlist`` candidates per query (all rows
    when the shortlist is 0 or at least the index size); the candidates' class terms
    (:func:`know2vec_jax.classmatch.class_scores`), the familiar-task gate,
    the score (:func:`combine`) and the top k follow in the same jitted call, on the device that
    holds the index's vectors, hub offsets and class knowledge
    (:meth:`know2vec_jax.index.ModelIndex.match_arrays`, ``class_knowledge``): a query moves
    only its own arrays. Without the hub correction, a shortlist of an index stored in bfloat16
    or int8 comes from the index's own search. With ``enabled`` False this is the index's vector
    search (the class parts are then zero and no query is flagged).

    Args:
      index: a :class:`know2vec_jax.index.ModelIndex` (with class knowledge unless class
        matching is off).
      vectors: float [Q, dim] (or [dim]) query vectors.
      classes: the same queries' :class:`know2vec_jax.classmatch.QueryClasses` (None with class
        matching off); their ``familiarity``, when set, is used instead of the cosines to the
        calibration's reference queries.
      k: how many models to return per query (at most the shortlist).

    Returns:
      :class:`Matches`.

    Raises:
      IndexStoreError: a bad k or bad query vectors; an index without class knowledge; classes
        for another number of queries or another token size.
    """
    from know2vec_jax.index import IndexStoreError, check_k
    config = self.config
    check_k(k)
    q = index.check_queries(vectors)
    nq = q.shape[0]
    if not config.enabled:
      scores, ids = index.search(q, k)
      zero = np.zeros_like(scores)
      return Matches(ids, scores, zero, zero, scores, np.zeros(nq, np.float32),
                     np.zeros(nq, bool), np.zeros(nq, bool))
    if not index.has_classes:
      raise IndexStoreError("this index holds no class knowledge (it was not built by "
                            "Proxy.build_index): search it with vectors alone (match.enabled=false)")
    if classes is None or len(classes) != nq:
      raise IndexStoreError(f"got class descriptions of {0 if classes is None else len(classes)} "
                            f"queries for {nq} query vectors")
    know = index.class_knowledge()
    if classes.prototypes.shape[-1] != know.tokens.shape[-1]:
      raise IndexStoreError(f"query prototypes of size {classes.prototypes.shape[-1]} do not match "
                            f"the index's class tokens of size {know.tokens.shape[-1]}")
    m = len(index)
    r = m if config.shortlist == 0 else min(config.shortlist, m)
    kk = min(int(k), r)
    fam = classes.familiarity if classes.familiarity is not None else self.familiarity(q)
    threshold = self.familiar_threshold
    gate_on = threshold is not None and fam is not None
    fam = np.zeros(nq, np.float32) if fam is None else np.asarray(fam, np.float32)
    settings = jnp.asarray([config.hub_scale, config.familiar_hub_scale, config.vector_weight,
                            config.familiar_vector_weight, config.token_weight,
                            config.fit_token_weight,
                            threshold if gate_on else np.inf, config.familiar_fit_gap],
                           jnp.float32)
    vecs, hub = index.match_arrays(config.hub_k)
    # The shortlist on the device by centred cosine (so that no family is cut for where it
    # sits), unless the vectors alone decide it and the index stores them compressed: then the
    # index's own search (its storage type and sharding, exact re-scoring) makes it.
    rows_given = r < m and not config.hub_k and index.storage != "float32"
    if rows_given:
      raw_given, ids_given = index.search(q, r)
      rows_all = index.rows_of(ids_given)
    out = [np.zeros((nq, kk), np.int64)] + [np.zeros((nq, kk), np.float32) for _ in range(4)] + [
        np.zeros(nq, np.float32), np.zeros(nq, bool)]
    if m == 0 or kk == 0:
      return Matches([[] for _ in range(nq)], *out[1:5], out[5], out[5] < self.fit_threshold,
                     out[6])
    km, dim = know.tokens.shape[1:]
    for c, part, pad in classmatch.query_batches(classes, _QUERY_CHUNK):
      given = ((jnp.asarray(rows_all[pad], jnp.int32), jnp.asarray(raw_given[pad]))
               if rows_given else None)
      got = _ranked(jnp.asarray(q[pad]), vecs, hub, given, jnp.asarray(fam[pad]),
                    *classes.device_batch(pad, c), know.tokens, know.mask, know.pool_labels,
                    settings, r=r, k=shapes.bucket(kk, r), gather_tokens=r * km * dim < m * c * km)
      # The top k is taken at a power of two (one compilation for many k), then cut to k.
      for dst, src in zip(out, jax.device_get(got)):
        src = np.asarray(src)[:len(part)]
        dst[part] = src[:, :kk] if src.ndim == 2 else src
    rows, score, agree, tok, vec, best_fit, gate = out
    return Matches(index.ids_at(rows), score, agree, tok, vec, best_fit,
                   best_fit < self.fit_threshold, gate if gate_on else np.zeros(nq, bool))


# Queries per jitted scoring call (a batch pads up to a power of two below it).
_QUERY_CHUNK = 32


@functools.partial(jax.jit, static_argnames=("r", "k", "gather_tokens"))
def _ranked(q, vectors, hub, given, fam, prototypes, q_mask, anchors, weights, tokens, t_mask,
            labels, settings, *, r: int, k: int, gather_tokens: bool):
  """The default query's scoring in one jitted call: the shortlist, the class terms, the
  familiar-task gate, the combined score and the top k (:meth:`Retriever.score`).

  Args:
    q: float32 [Q, E] query vectors; vectors [M, E] and hub [M] the index's rows
      (:meth:`know2vec_jax.index.ModelIndex.match_arrays`).
    given: None (the shortlist is made here: the r best rows by q . m - hub_scale * hub, every
      row when r == M) or (rows int32 [Q, r], their cosines [Q, r]) made by the index's search.
    fam: float32 [Q] each query's familiarity.
    prototypes, q_mask, anchors, weights: the queries' classes (trimmed to their class count).
    tokens, t_mask, labels: the index's class knowledge (:class:`classmatch.ClassKnowledge`).
    settings: float32 [8]: hub_scale, familiar_hub_scale, vector_weight, familiar_vector_weight,
      token_weight, fit_token_weight, the familiar threshold (inf: the gate is off) and
      familiar_fit_gap (traced: a new setting does not compile again).

  Returns:
    (rows int32 [Q, k], score, agreement, token, vector float32 [Q, k], best fit float32 [Q],
    familiar bool [Q]), best first; equal scores keep the shortlist's order.
  """
  (hub_scale, fam_hub_scale, vector_weight, fam_vector_weight, token_weight, fit_token_weight,
   threshold, fit_gap) = (settings[i] for i in range(8))
  m = vectors.shape[0]
  if given is None:
    raw_all = q @ vectors.T  # [Q, M]
    if r == m:  # every row is a candidate: no vector top-k needed
      rows = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), raw_all.shape)
      raw = raw_all
    else:  # lax.top_k puts the lower row first among equal values
      _, rows = jax.lax.top_k(raw_all - hub_scale * hub[None], r)
      raw = jnp.take_along_axis(raw_all, rows, 1)
  else:
    rows, raw = given
  agree, tok = classmatch._class_scores(prototypes, q_mask, anchors, weights, tokens, t_mask,
                                        labels, rows, gather_tokens)
  # The score's parts through the same functions as every caller (the weights traced).
  weights = types.SimpleNamespace(token_weight=token_weight, vector_weight=vector_weight,
                                  fit_token_weight=fit_token_weight)
  # The familiar-task gate: close to the reference queries, and the model the vectors prefer
  # fits the classes within the gap of the best-fitting candidate.
  fit_c = class_score(agree, tok, weights)
  preferred = jnp.take_along_axis(fit_c, jnp.argmax(raw, axis=1)[:, None], 1)[:, 0]
  gate = (fam >= threshold) & (fit_c.max(1) - preferred <= fit_gap)
  g = gate[:, None]
  vec = raw - jnp.where(g, fam_hub_scale, hub_scale) * hub[rows]
  score = combine(agree, tok, vec, weights, jnp.where(g, fam_vector_weight, vector_weight))
  best_fit = fit_score(agree, tok, weights).max(1)
  top, order = jax.lax.top_k(score, k)
  take = lambda a: jnp.take_along_axis(a, order, 1)  # noqa: E731
  return take(rows), top, take(agree), take(tok), take(vec), best_fit, gate


def _threshold(key: str, text: str) -> float | None:
  t = text.strip().lower()
  if t in ("none", "null", ""):
    return None
  try:
    v = float(t)
  except ValueError:
    raise ConfigError(f"bad value {text!r} for {key}: expected a number") from None
  if not np.isfinite(v):
    raise ConfigError(f"bad value {text!r} for {key}: expected a finite number")
  return v


def calibrate(config: MatchConfig, reference, reference_tasks, false_alarm: float,
              index: "ModelIndex | None" = None,
              classes: classmatch.QueryClasses | None = None) -> tuple[Calibration, dict]:
  """Fits retrieval's statistics after training.

  The familiar-task statistics come from the reference queries alone
  (:func:`calibrate_familiar`); with class matching on and the training models' ``index`` given,
  the reference queries (described by ``classes``) are scored against it and the no-fit
  threshold is the ``false_alarm`` quantile of their best fit scores (:func:`calibrate_threshold`).

  Args:
    config: the retrieval settings the statistics are read under.
    reference: float32 [R, E] the reference query vectors (validation queries of the training
      tasks, train-split images no training step saw).
    reference_tasks: int [R] each one's task.
    false_alarm: the share of validation queries the no-fit flag may fire on.
    index: an index of the training models (with class knowledge), or None: no threshold.
    classes: the reference queries' class descriptions (with ``index``).

  Returns:
    (the :class:`Calibration`, a report for the proxy's ``info``: ``{"familiar": ...,
    "calibration": ...}``). With class matching off, the reference queries alone and no report.
  """
  reference = np.asarray(reference, np.float32)
  if not config.enabled:  # vectors alone read no threshold: the reference queries only
    return Calibration(reference), {}
  info: dict = {}
  other = same = ()
  try:
    cal = calibrate_familiar(reference, reference_tasks, config.familiar_quantile)
    other, same = cal["other_task"], cal["same_task"]
    on = bool(config.familiar_quantile)
    info["familiar"] = {"threshold": cal["threshold"] if on else None,
                        "quantile": config.familiar_quantile, "seen_pass": cal["seen_pass"],
                        "other_task": [round(x, 5) for x in other],
                        "same_task": [round(x, 5) for x in same]}
  except ValueError as e:
    info["familiar"] = {"threshold": None, "why": str(e)}
  calibration = Calibration(reference, familiar_other=other, familiar_same=same)
  if index is None or classes is None:
    return calibration, info
  classes = dataclasses.replace(classes, familiarity=classmatch.familiarity(reference, reference))
  found = Retriever(config, calibration).score(index, reference, classes, k=1)
  threshold = calibrate_threshold(found.fit, false_alarm)
  info["calibration"] = {"threshold": threshold, "false_alarm": false_alarm,
                         "fit_quantiles": np.quantile(found.fit, [0, .02, .05, .5]).tolist()}
  return dataclasses.replace(calibration, fit_threshold=threshold, false_alarm=false_alarm,
                             fit_scores=found.fit), info


# ---- a query's answer, as the CLI and the Python API give it -------------------------------------

def result_row(proxy, index: "ModelIndex", model_id: str, rank: int, scores: dict) -> dict:
  """One ranked row: rank, id, ``scores``, arch, task, then the model's other metadata; refuses a
  row another proxy vectorized (ProxyError)."""
  from know2vec_jax.pipeline import ProxyError  # pipeline imports this module's MatchConfig
  meta = index.metadata(model_id)
  fp = meta.get("proxy")
  if fp is not None and fp != proxy.fingerprint:
    raise ProxyError(f"model {model_id!r} of the index was vectorized by another proxy ({fp}, "
                     f"this one is {proxy.fingerprint}); rebuild the index with this proxy")
  return ({"rank": rank + 1, "model_id": model_id} | scores |
          {"arch": meta.pop("arch", None), "task": meta.pop("task", None)} | meta)



def query(proxy, index: "ModelIndex", images, labels, k: int = 10) -> list[dict]:
  """Ranks the index's models for a few-shot task (:func:`query_result` without the fit flag).

  Args:
    proxy: the trained proxy.
    index: an index built with this proxy.
    images: float32 [N, H, W, C] in [0, 1].
    labels: int [N] in 0..K-1.
    k: how many models to return.

  Returns:
    One dict per model, best first: ``rank`` (1-based), ``model_id``, ``score`` (the retrieval
    score, :func:`combine`), its parts ``agreement``, ``token`` and
    ``vector`` (the cosine of the query and model vectors), ``arch`` and ``task`` (None when the
    index has no such metadata), then the rest of the model's metadata.

  Raises:
    InputError: a bad query; ProxyError: an index of another vector size, or top models that
    another proxy vectorized (their ``proxy`` fingerprint differs).
  """
  return query_result(proxy, index, images, labels, k)["results"]



def query_result(proxy, index: "ModelIndex", images, labels, k: int = 10) -> dict:
  """Ranks the index's models for a few-shot task and says whether any of them fits it.

  Returns:
    ``{"results": rows as :func:`query` gives them, "fit": the best model's class-level fit
    score, "no_fit": True when it is below the proxy's calibrated threshold (no model of the
    index fits the query's classes well), "fit_threshold": that threshold, "familiar": True
    when the query looks like one of a task the proxy trained on (scored with the familiar
    settings, :class:`MatchConfig`)}``.

  Raises:
    As :func:`query`.
  """
  found = proxy.search(index, [(images, labels)], k)
  rows = [result_row(proxy, index, mid, r, {
      "score": float(found.scores[0, r]), "agreement": float(found.agreement[0, r]),
      "token": float(found.token[0, r]), "vector": float(found.vector[0, r])})
      for r, mid in enumerate(found.ids[0])]
  return {"results": rows, "fit": float(found.fit[0]), "no_fit": bool(found.no_fit[0]),
          "fit_threshold": proxy.retriever.fit_threshold,
          "familiar": bool(found.familiar[0])}
