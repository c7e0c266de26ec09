"""NCE: Negative Conditional Entropy (Tran, Nguyen and Hassner, ICCV 2019), batched over models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from know2vec_jax.baselines.checks import check_scores_inputs


def _nce_one(logits, labels, num_target_classes):
  """-H(Y | Z) of one model: logits [N, Z], labels [N]."""
  n, num_source = logits.shape
  # Z is the source model's hard prediction: NCE sees the label the model outputs, not its
  # confidence (argmax ties go to the lowest source label, as numpy's argmax).
  z = jax.nn.one_hot(jnp.argmax(logits, -1), num_source, dtype=jnp.float32)  # [N, Z]
  y = jax.nn.one_hot(labels, num_target_classes, dtype=jnp.float32)  # [N, K]
  joint = z.T @ y / n  # P(z, y), [Z, K]
  p_z = joint.sum(1, keepdims=True)
  # sum_{z,y} P(z,y) log P(y|z) with 0 log 0 = 0 (a source label never predicted contributes 0).
  terms = jnp.where(joint > 0, joint * jnp.log(joint / jnp.where(p_z > 0, p_z, 1.0)), 0.0)
  return terms.sum()


@functools.partial(jax.jit, static_argnames=("num_target_classes",))
def _nce(logits, labels, num_target_classes):
  return jax.vmap(_nce_one, in_axes=(0, None, None))(logits, labels, num_target_classes)


def nce_scores(logits, labels, num_target_classes: int):
  """NCE of every model for one labelled target set (black-box: logits only).

  With Z_i = argmax of model m's logits on image i and the empirical joint P(z, y) over the N
  target images, NCE = -H(Y | Z) = sum_{z, y} P(z, y) log P(y | z).

  Args:
    logits: float [M, N, Z] source logits of M models on the N target images.
    labels: int [N] target labels in 0..num_target_classes-1.
    num_target_classes: K.

  Returns:
    float32 [M] scores in [-log K, 0] (higher = expected to transfer better).

  Raises:
    BaselineInputError: see :func:`know2vec_jax.baselines.checks.check_scores_inputs`.
  """
  logits, labels, k = check_scores_inputs(logits, labels, num_target_classes, what="logits")
  return _nce(logits, labels, k)
