"""LogME: maximum log evidence of a Bayesian linear head (You et al., ICML 2021; the fast fixed
point of You et al., JMLR 2022), batched over models."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from know2vec_jax.baselines.checks import BaselineInputError, check_scores_inputs

# Floors of the alpha / beta updates, as in the reference implementation: they keep the update
# finite when a target column is fit exactly (residual 0) or the weights vanish (m^T m = 0). When
# the features carry nothing about a class, the evidence peaks only as alpha -> inf and the floor
# stops alpha (and the score) a little short of that supremum, as published.
_EPS = 1e-5


def _terms(sigma, x2, res_x2, t):
  """m^T m and ||F m - y||^2 at lambda = alpha / beta, from the SVD F = U diag(s) V^T.

  Args:
    sigma: s^2, [k]. x2: (U^T y)^2, [k]. res_x2: ||y||^2 - ||U^T y||^2 (y outside span(U)).
    t: alpha / beta.
  """
  # t ~ 0 when the features are all 0 (see _max_evidence): floor it, and let zero singular values
  # contribute nothing to m rather than 0 / 0.
  t = jnp.maximum(t, jnp.finfo(sigma.dtype).tiny)
  m2 = jnp.sum(jnp.where(sigma > 0, sigma * x2 / jnp.where(sigma > 0, t + sigma, 1.0) ** 2, 0.0))
  res2 = jnp.sum(x2 * (t / (t + sigma)) ** 2) + res_x2
  return m2, res2


def _evidence(sigma, m2, res2, alpha, beta, n, d):
  """log p(y | F, alpha, beta) of the model y = F w + N(0, 1/beta), w ~ N(0, I / alpha).

  sigma holds the k = min(N, D) eigenvalues of F^T F that the SVD returns; the other D - k are 0
  and add (D - k) log alpha to log|A| = sum_i log(alpha + beta sigma_i).
  """
  k = sigma.shape[0]
  logdet_a = jnp.sum(jnp.log(alpha + beta * sigma)) + (d - k) * jnp.log(alpha)
  return (d / 2 * jnp.log(alpha) + n / 2 * jnp.log(beta) - 0.5 * logdet_a
          - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))


def _max_evidence(sigma, x, y_sq, n, d, max_iter, tol):
  """Algorithm 2 of the JMLR paper for one target column: MacKay's fixed point over (alpha, beta)
  in the SVD basis, then the evidence per sample at the final (alpha, beta)."""
  x2 = x * x
  # ||y||^2 - ||U^T y||^2 cancels in float32 when y lies (almost) in span(U); it cannot be < 0.
  res_x2 = jnp.maximum(y_sq - x2.sum(), 0.0)
  tiny = jnp.finfo(sigma.dtype).tiny

  def body(state):
    alpha, beta, _, i = state
    # All-zero features (a dead layer) drive gamma and alpha to 0; the evidence no longer depends
    # on alpha there, and the floors keep 0 / 0 and log 0 out of it.
    t = jnp.maximum(alpha / beta, tiny)  # as in _terms
    gamma = jnp.sum(sigma / (sigma + t))
    m2, res2 = _terms(sigma, x2, res_x2, t)
    alpha = jnp.maximum(gamma / (m2 + _EPS), tiny)
    beta = (n - gamma) / (res2 + _EPS)
    return alpha, beta, jnp.abs(alpha / beta - t) / t, i + 1

  def cond(state):
    return (state[2] > tol) & (state[3] < max_iter)

  one = jnp.ones((), sigma.dtype)
  alpha, beta, _, _ = jax.lax.while_loop(cond, body, (one, one, jnp.inf * one, 0))
  # The reference code reports the evidence with m from the previous iterate; recomputing m at the
  # final (alpha, beta) gives the exact evidence there (identical at convergence).
  m2, res2 = _terms(sigma, x2, res_x2, alpha / beta)
  return _evidence(sigma, m2, res2, alpha, beta, n, d) / n


def _logme_one(f, labels, num_target_classes, max_iter, tol):
  n, d = f.shape
  y = jax.nn.one_hot(labels, num_target_classes, dtype=f.dtype)  # [N, K]: one column per class
  # One SVD per model serves every class: only U^T y changes between them.
  u, s, _ = jnp.linalg.svd(f, full_matrices=False)  # u [N, k]
  x = u.T @ y  # [k, K]
  per_class = jax.vmap(_max_evidence, in_axes=(None, 1, 0, None, None, None, None))(
      s * s, x, jnp.sum(y * y, 0), n, d, max_iter, tol)
  # A class with no image has y = 0, whose evidence grows without bound as alpha, beta -> inf;
  # the mean runs over the classes present in the target set.
  present = y.sum(0) > 0
  return jnp.sum(jnp.where(present, per_class, 0.0)) / jnp.sum(present)


@functools.partial(jax.jit, static_argnames=("num_target_classes",))
def _logme(x, labels, num_target_classes, max_iter, tol):
  return jax.vmap(_logme_one, in_axes=(0, None, None, None, None))(
      x, labels, num_target_classes, max_iter, tol)


def logme_scores(x, labels, num_target_classes: int, *, max_iter: int = 11, tol: float = 1e-3):
  """LogME of every model: the maximum log evidence per sample of a Bayesian linear regression
  from x onto each target class's one-hot column, averaged over the classes.

  For one column y and weights w ~ N(0, I / alpha), noise precision beta,
    log p(y | F, alpha, beta) = D/2 log alpha + N/2 log beta - N/2 log 2 pi
                                - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log|A|,
  A = alpha I + beta F^T F, m = beta A^-1 F^T y; (alpha, beta) are set by the fixed point
  alpha = gamma / m^T m, beta = (N - gamma) / ||F m - y||^2, gamma = sum_i beta s_i / (alpha +
  beta s_i) over the eigenvalues s_i of F^T F, run in the SVD basis of F until lambda = alpha /
  beta changes by less than ``tol`` (relative) or ``max_iter`` updates. x is used as given (no
  centring, no bias), as in the paper.

  Args:
    x: float [M, N, D]: logits (black-box) or penultimate features (white-box) of M models on the
      N target images.
    labels: int [N] target labels in 0..num_target_classes-1.
    num_target_classes: K.
    max_iter, tol: fixed-point budget; the defaults are the reference implementation's (it
      typically converges in 2-3 updates).

  Returns:
    float32 [M] scores (higher = expected to transfer better).

  Raises:
    BaselineInputError: see :func:`know2vec_jax.baselines.checks.check_scores_inputs`; also
      max_iter < 1 or tol <= 0.
  """
  if int(max_iter) < 1 or not tol > 0:
    raise BaselineInputError(f"need max_iter >= 1 and tol > 0, got {max_iter}, {tol}")
  x, labels, k = check_scores_inputs(x, labels, num_target_classes)
  return _logme(x, labels, k, int(max_iter), float(tol))


def log_evidence(features, y, alpha, beta) -> float:
  """log p(y | F, alpha, beta) of one target column at given (alpha, beta), through the SVD path
  that :func:`logme_scores` uses (for checking it against a direct Gaussian evaluation).

  Args:
    features: float [N, D]. y: float [N]. alpha, beta: positive precisions.

  Returns:
    The log evidence (not divided by N).
  """
  f = jnp.asarray(features, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  if f.ndim != 2 or y.shape != (f.shape[0],):
    raise BaselineInputError(f"need features [N, D] and y [N], got {f.shape} and {y.shape}")
  if not (alpha > 0 and beta > 0):
    raise BaselineInputError(f"alpha and beta must be > 0, got {alpha}, {beta}")
  n, d = f.shape
  u, s, _ = jnp.linalg.svd(f, full_matrices=False)
  x = u.T @ y
  x2 = x * x
  m2, res2 = _terms(s * s, x2, jnp.maximum(jnp.sum(y * y) - x2.sum(), 0.0), alpha / beta)
  return float(_evidence(s * s, m2, res2, jnp.float32(alpha), jnp.float32(beta), n, d))
