"""H-score (Bao et al., ICIP 2019) and its shrinkage-regularised form (Ibrahim, Ponomareva and
Mazumder, "Newer is not always better", ICLR 2022), batched over models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from know2vec_jax.baselines.checks import check_scores_inputs


def _class_means(fc, labels, num_target_classes):
  """g_i = E[f | y = y_i]: every row replaced by the mean of its class, [N, D]."""
  onehot = jax.nn.one_hot(labels, num_target_classes, dtype=fc.dtype)  # [N, K]
  means = (onehot.T @ fc) / jnp.maximum(onehot.sum(0), 1.0)[:, None]  # [K, D]
  return onehot @ means


def ledoit_wolf_shrinkage(fc):
  """Ledoit-Wolf shrinkage intensity of centred data fc [N, D], as scikit-learn's
  ``ledoit_wolf_shrinkage`` (empirical covariance S = fc^T fc / N, target mu I, mu = tr(S) / D).

  Args:
    fc: float [N, D], columns centred.

  Returns:
    float scalar in [0, 1].
  """
  n, d = fc.shape
  sq = fc * fc
  mu = sq.sum() / (n * d)
  # sum_{d,e} (X^2^T X^2)_{de} = sum_n ||x_n||^4 ; ||S||_F^2 via the N x N Gram matrix, which is
  # the smaller side in the few-shot case and equal to the D x D one.
  beta_ = jnp.sum(sq.sum(1) ** 2)
  delta_ = jnp.sum((fc @ fc.T) ** 2) / n ** 2
  beta = (beta_ / n - delta_) / (d * n)
  delta = (delta_ - d * mu ** 2) / d
  shrink = jnp.where(delta > 0, jnp.minimum(beta, delta) / jnp.where(delta > 0, delta, 1.0), 0.0)
  return jnp.clip(shrink, 0.0, 1.0)


def _hscore_one(f, labels, num_target_classes, shrinkage: bool):
  n, d = f.shape
  fc = f - f.mean(0)
  gc = _class_means(fc, labels, num_target_classes)  # centred, since fc is
  # tr(cov_f^+ cov_g) through the SVD fc = U s V^T rather than a pseudo-inverse of cov_f: it avoids
  # squaring cov_f's condition number in float32. The rows of gc lie in the row space of fc (they
  # are class means of its rows), so only the right singular vectors V carry any of cov_g.
  _, s, vh = jnp.linalg.svd(fc, full_matrices=False)  # s [k], vh [k, D]
  between = jnp.sum((gc @ vh.T) ** 2, 0) / (n - 1)  # v_i^T cov_g v_i (np.cov, ddof 1)
  # Directions below numerical rank are noise in float32, as in numpy's matrix_rank.
  keep = s > s.max() * max(n, d) * jnp.finfo(f.dtype).eps
  if shrinkage:
    alpha = ledoit_wolf_shrinkage(fc)
    mu = jnp.sum(fc * fc) / (n * d)
    # Eigenvalues of (1 - alpha) S + alpha mu I on span(V), S = fc^T fc / N (scikit-learn).
    eig = (1 - alpha) * s ** 2 / n + alpha * mu
    keep = keep | (alpha > 0)
    return (1 - alpha) * jnp.sum(jnp.where(keep, between / jnp.where(keep, eig, 1.0), 0.0))
  total = s ** 2 / (n - 1)  # eigenvalues of cov_f (ddof 1)
  return jnp.sum(jnp.where(keep, between / jnp.where(keep, total, 1.0), 0.0))


@functools.partial(jax.jit, static_argnames=("num_target_classes", "shrinkage"))
def _hscore(x, labels, num_target_classes, shrinkage):
  return jax.vmap(_hscore_one, in_axes=(0, None, None, None))(x, labels, num_target_classes,
                                                              shrinkage)


def hscore_scores(x, labels, num_target_classes: int):
  """H-score of every model: tr(cov(f)^+ cov(E[f | y])).

  It sums the between-class share of the variance over the whitened directions of f, so it lies
  in [0, K - 1] (K - 1 when f is a function of the label). Both covariances use ddof 1 (the
  reference implementation).

  Args:
    x: float [M, N, D]: logits (black-box) or penultimate features (white-box) of M models on the
      N target images.
    labels: int [N] target labels in 0..num_target_classes-1.
    num_target_classes: K.

  Returns:
    float32 [M] scores (higher = expected to transfer better).

  Raises:
    BaselineInputError: see :func:`know2vec_jax.baselines.checks.check_scores_inputs`.
  """
  x, labels, k = check_scores_inputs(x, labels, num_target_classes)
  return _hscore(x, labels, k, False)


def hscore_shrinkage_scores(x, labels, num_target_classes: int):
  """Shrinkage-regularised H-score: (1 - a) tr(cov_a(f)^-1 cov(E[f | y])), where cov_a is the
  Ledoit-Wolf estimate (1 - a) S + a (tr S / D) I of the feature covariance.

  Shrinkage keeps the inverse stable when N is small against D, which makes the plain H-score
  unreliable. As the reference implementation, S uses ddof 0 and cov(E[f | y]) ddof 1.

  Args:
    x: float [M, N, D] logits or features of M models on the N target images.
    labels: int [N] target labels in 0..num_target_classes-1.
    num_target_classes: K.

  Returns:
    float32 [M] scores (higher = expected to transfer better).

  Raises:
    BaselineInputError: see :func:`know2vec_jax.baselines.checks.check_scores_inputs`.
  """
  x, labels, k = check_scores_inputs(x, labels, num_target_classes)
  return _hscore(x, labels, k, True)
