"""Host-side validation shared by the transferability baselines.

Every baseline checks its inputs here, on the host and before ``jit``, so a bad target task fails
with a message that names the problem instead of a NaN score or a shape error from inside XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from know2vec_jax.blackbox import InputError


class BaselineInputError(InputError):
  """Scores that cannot be computed from the given inputs; the message says why."""


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def all_finite(x) -> bool:
  """Whether every entry of a numpy or JAX array is finite (reduced on device for JAX arrays, so
  only one bool crosses to the host)."""
  if isinstance(x, jax.Array):
    return bool(jnp.isfinite(x).all())
  return bool(np.isfinite(np.asarray(x)).all())


def check_scores_inputs(x, labels, num_target_classes, *, what: str = "x"):
  """Validates (x, labels, K) of a model-batched baseline.

  Args:
    x: float [M, N, D]: logits (D = Z source classes) or features (D = F) of M models on N images.
    labels: int [N] target labels in 0..K-1.
    num_target_classes: K >= 2.
    what: how the message names ``x`` ("logits", "features").

  Returns:
    (x as a float32 JAX array, labels as an int32 JAX array, K as int).

  Raises:
    BaselineInputError: x not [M, N, D] or empty, non-float/NaN/inf values in x; labels not an
      integer vector with one label per image, labels outside 0..K-1, fewer than 2 distinct target
      classes; K not an integer >= 2.
  """
  if isinstance(num_target_classes, bool) or not isinstance(num_target_classes,
                                                            (int, np.integer)):
    raise BaselineInputError(f"num_target_classes must be an int, got {num_target_classes!r}")
  k = int(num_target_classes)
  if k < 2:
    raise BaselineInputError(f"a target task needs at least 2 classes, got num_target_classes={k}")
  shape = tuple(np.shape(x))
  if len(shape) != 3 or min(shape) == 0:
    raise BaselineInputError(f"{what} must have shape [M models, N images, D] with M, N, D >= 1, "
                             f"got {shape}")
  dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
  if not np.issubdtype(dtype, np.floating):
    raise BaselineInputError(f"{what} must be floating point, got dtype {dtype}")
  lshape = tuple(np.shape(labels))
  if len(lshape) != 1 or lshape[0] != shape[1]:
    raise BaselineInputError(f"labels must be a vector with one label per image: got shape "
                             f"{lshape} for {what} of shape {shape} (N = {shape[1]} images)")
  ldtype = np.dtype(labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype)
  if not np.issubdtype(ldtype, np.integer):
    raise BaselineInputError(f"labels must be integers 0..K-1, got dtype {ldtype}")
  if not _is_traced(labels):
    y = np.asarray(labels)
    if y.min() < 0 or y.max() >= k:
      raise BaselineInputError(f"labels must be in 0..{k - 1} (num_target_classes={k}), got "
                               f"values in {int(y.min())}..{int(y.max())}")
    counts = np.bincount(y, minlength=k)
    if np.count_nonzero(counts) < 2:
      raise BaselineInputError(f"the target task has a single class ({int(y[0])}): every "
                               f"baseline needs at least 2 distinct labels")
  if not _is_traced(x) and not all_finite(x):
    raise BaselineInputError(f"{what} has NaN/inf values")
  return jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32), k
