"""LEEP: Log Expected Empirical Prediction (Nguyen et al., ICML 2020), batched over models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from know2vec_jax.baselines.checks import check_scores_inputs


def leep_from_probs(theta, labels, num_target_classes: int):
  """LEEP of one or more models given their source-label distributions (traceable, no checks).

  With theta(x_i) a distribution over Z source labels and target labels y_i:
  P(y, z) = 1/N sum_i theta_z(x_i) [y_i = y], P(y | z) = P(y, z) / P(z), and
  LEEP = 1/N sum_i log sum_z P(y_i | z) theta_z(x_i).

  Args:
    theta: float [..., N, Z] rows summing to 1 (softmax of logits; GMM posteriors for N-LEEP).
    labels: int [N] in 0..num_target_classes-1.
    num_target_classes: K.

  Returns:
    float [...] scores.
  """
  onehot = jax.nn.one_hot(labels, num_target_classes, dtype=theta.dtype)  # [N, K]
  n = labels.shape[0]
  joint = jnp.einsum("...nz,nk->...kz", theta, onehot) / n  # [..., K, Z]
  # A source label no image puts mass on has P(z) = 0; its P(y | z) is never used (theta_z = 0).
  cond = joint / jnp.maximum(joint.sum(-2, keepdims=True), 1e-12)  # P(y | z)
  eep = jnp.einsum("...kz,...nz->...nk", cond, theta)  # [..., N, K]
  picked = jnp.take_along_axis(eep, jnp.broadcast_to(labels[:, None], eep.shape[:-1] + (1,)),
                               axis=-1)[..., 0]
  return jnp.mean(jnp.log(jnp.maximum(picked, 1e-12)), axis=-1)


@functools.partial(jax.jit, static_argnames=("num_target_classes",))
def _leep(logits, labels, num_target_classes):
  theta = jax.nn.softmax(logits, axis=-1)  # [M, N, Z]
  return jax.vmap(leep_from_probs, in_axes=(0, None, None))(theta, labels, num_target_classes)


def leep_scores(logits, labels, num_target_classes: int):
  """LEEP of every model for one labelled target set (black-box: logits only).

  Args:
    logits: float [M, N, Z] source logits of M models on the N target images.
    labels: int [N] target labels in 0..num_target_classes-1.
    num_target_classes: K.

  Returns:
    float32 [M] scores (higher = expected to transfer better), in (-inf, 0].

  Raises:
    BaselineInputError: see :func:`know2vec_jax.baselines.checks.check_scores_inputs`.
  """
  logits, labels, k = check_scores_inputs(logits, labels, num_target_classes, what="logits")
  return _leep(logits, labels, k)
