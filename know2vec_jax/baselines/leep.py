"""LEEP: Log Expected Empirical Prediction (Nguyen et al., ICML 2020), batched over models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("num_target_classes",))
def leep_scores(logits, labels, num_target_classes: int):
  """LEEP of every model for one labelled target set.

  With source-model softmax theta(x_i) over Z source labels and target labels y_i:
  P(y, z) = 1/N sum_i theta_z(x_i) [y_i = y], P(y | z) = P(y, z) / P(z), and
  LEEP = 1/N sum_i log sum_z P(y_i | z) theta_z(x_i).

  Args:
    logits: float [M, N, Z] source logits of M models on the N target images.
    labels: int [N] target labels in 0..num_target_classes-1.
    num_target_classes: K.

  Returns:
    float32 [M] scores (higher = expected to transfer better).
  """
  theta = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [M, N, Z]
  onehot = jax.nn.one_hot(labels, num_target_classes)  # [N, K]
  n = labels.shape[0]
  joint = jnp.einsum("mnz,nk->mkz", theta, onehot) / n  # [M, K, Z]
  cond = joint / jnp.maximum(joint.sum(1, keepdims=True), 1e-12)  # P(y | z)
  eep = jnp.einsum("mkz,mnz->mnk", cond, theta)  # [M, N, K]
  picked = jnp.take_along_axis(eep, labels[None, :, None], axis=2)[..., 0]
  return jnp.mean(jnp.log(jnp.maximum(picked, 1e-12)), axis=1)
