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
