"""Query-blind references: a random ranking, and a prior that ranks models by how well they did on
other targets. A proxy that does not beat the prior is not using the query."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from know2vec_jax.baselines.checks import BaselineInputError, all_finite


def random_scores(key, num_models: int):
  """Uniform random scores: the chance level of every ranking metric.

  Args:
    key: a JAX PRNG key.
    num_models: M >= 1.

  Returns:
    float32 [M] scores in [0, 1).
  """
  if isinstance(num_models, bool) or not isinstance(num_models, (int, np.integer)) \
      or num_models < 1:
    raise BaselineInputError(f"num_models must be an int >= 1, got {num_models!r}")
  return jax.random.uniform(key, (int(num_models),))


@jax.jit
def _prior(gt):
  # Rank 1 = best on each target; tied models share the mean of the ranks they span (as
  # scipy.stats.rankdata(-x, "average")): 1 + #better + (#tied - 1) / 2, with #tied counting itself.
  better = jnp.sum(gt[:, None, :] > gt[:, :, None], axis=2)  # [T, M]
  tied = jnp.sum(gt[:, None, :] == gt[:, :, None], axis=2)
  rank = 1.0 + better + 0.5 * (tied - 1)
  return -rank.mean(0)


def prior_scores(ground_truth_other_targets):
  """Minus each model's mean ground-truth rank over the other targets (rank 1 = best).

  Args:
    ground_truth_other_targets: float [T, M] measured accuracy of the M models on T >= 1 targets,
      *without* the target being scored (the caller leaves it out, or the prior sees the answer).

  Returns:
    float32 [M] scores in [-M, -1] (higher = better on average elsewhere).

  Raises:
    BaselineInputError: not [T, M] with T, M >= 1, or NaN/inf entries.
  """
  shape = tuple(np.shape(ground_truth_other_targets))
  if len(shape) != 2 or min(shape) == 0:
    raise BaselineInputError(f"ground_truth_other_targets must have shape [T targets, M models] "
                             f"with T, M >= 1, got {shape}")
  if not all_finite(ground_truth_other_targets):
    raise BaselineInputError("ground_truth_other_targets contain NaN/inf values")
  return _prior(jnp.asarray(ground_truth_other_targets, jnp.float32))


def task_prototype(query_grid, query_mask) -> np.ndarray:
  """A task's unit prototype in phi: the normalised mean of its unit class prototypes (the
  diagonal of its query grid, :meth:`know2vec_jax.proxy.Proxy.query_grid`), so each class weighs
  the same whatever its shot count.

  Args:
    query_grid: float [K_max, K_max, D] a task's padded query grid.
    query_mask: [K_max] its valid classes (nonzero).

  Returns:
    float32 [D], unit norm.

  Raises:
    BaselineInputError: a grid that is not square over classes, a mask of another length or with
      no class, or NaN/inf entries.
  """
  g = np.asarray(query_grid, np.float32)
  m = np.asarray(query_mask) != 0
  if g.ndim != 3 or g.shape[0] != g.shape[1] or m.shape != (g.shape[0],) or not m.any():
    raise BaselineInputError(f"query_grid must be [K, K, D] with query_mask [K] naming at least "
                             f"one class; got {g.shape} and {m.shape}")
  if not np.isfinite(g).all():
    raise BaselineInputError("query_grid contains NaN/inf values")
  k = np.arange(g.shape[0])
  p = g[k, k][m].mean(0)
  return p / max(float(np.linalg.norm(p)), 1e-12)


def _nearest_targets(query_prototype, target_prototypes, ground_truth_targets, k):
  """(indices of the ``k`` targets nearest the query by prototype cosine, ground truth [T, M]),
  after checking the inputs of the source-aware predictors."""
  q = np.asarray(query_prototype, np.float32)
  p = np.asarray(target_prototypes, np.float32)
  gt = np.asarray(ground_truth_targets, np.float32)
  if q.ndim != 1 or p.ndim != 2 or p.shape[1] != q.shape[0] or gt.ndim != 2 \
      or gt.shape[0] != p.shape[0] or min(gt.shape) == 0:
    raise BaselineInputError(f"need query_prototype [D], target_prototypes [T, D] and "
                             f"ground_truth_targets [T, M] with T, M >= 1; got {q.shape}, "
                             f"{p.shape}, {gt.shape}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise BaselineInputError(f"k must be an int >= 1, got {k!r}")
  if not (np.isfinite(q).all() and np.isfinite(p).all()):
    raise BaselineInputError("prototypes contain NaN/inf values")
  # Stable: equal cosines keep the targets' order, so the choice is reproducible.
  return np.argsort(-(p @ q), kind="stable")[:min(int(k), p.shape[0])], gt


def source_aware_prior_scores(query_prototype, target_prototypes, ground_truth_targets,
                              k: int = 1):
  """The prior of the ``k`` measured targets nearest to the query: what reading the query's
  source (its domain and kind of image) buys without reading its task. Targets are compared by
  the cosine of their :func:`task_prototype`; the scores are the :func:`prior_scores` of the
  nearest ``k`` targets' ground truth.

  Args:
    query_prototype: float [D] the query's unit prototype.
    target_prototypes: float [T, D] the measured targets' unit prototypes (never the query's own
      target: the caller leaves it out).
    ground_truth_targets: float [T, M] those targets' measured accuracies of the M models.
    k: how many nearest targets (1 <= k; capped at T).

  Returns:
    float32 [M] scores (higher = better on the query's nearest targets).

  Raises:
    BaselineInputError: shapes that disagree, k < 1, or NaN/inf inputs.
  """
  nearest, gt = _nearest_targets(query_prototype, target_prototypes, ground_truth_targets, k)
  return prior_scores(gt[nearest])


def source_aware_accuracy(query_prototype, target_prototypes, ground_truth_targets,
                          k: int = 1) -> np.ndarray:
  """The source-aware prior as a predictor of accuracy: each model's mean measured accuracy over
  the ``k`` targets nearest to the query (by :func:`task_prototype` cosine, the same targets
  :func:`source_aware_prior_scores` ranks by). The reference a learned accuracy predictor must
  beat to show it reads more than the query's source.

  Args:
    query_prototype, target_prototypes, ground_truth_targets, k: as
      :func:`source_aware_prior_scores`.

  Returns:
    float32 [M] predicted accuracies.

  Raises:
    BaselineInputError: shapes that disagree, k < 1, or NaN/inf inputs.
  """
  nearest, gt = _nearest_targets(query_prototype, target_prototypes, ground_truth_targets, k)
  if not np.isfinite(gt[nearest]).all():
    raise BaselineInputError("ground_truth_targets contain NaN/inf values")
  return gt[nearest].mean(0).astype(np.float32)
