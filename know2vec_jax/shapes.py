"""Shape buckets: a jitted function compiles once per input shape, so batches of any size are
padded up to one of few sizes (powers of two up to a cap) before they reach it."""

from __future__ import annotations

import jax.numpy as jnp


def bucket(n: int, cap: int) -> int:
  """``n`` rounded up to a power of two, at most ``cap`` (and at least 1).

  Args:
    n: the rows to hold.
    cap: the largest bucket (a chunk size: callers split larger inputs into chunks of ``cap``).

  Returns:
    The bucket size: few distinct values, and a single row is not padded to a whole chunk.
  """
  return max(min(1 << max(int(n) - 1, 0).bit_length(), int(cap)), 1)


def pad_rows(x, size: int):
  """``x`` with zero rows appended along axis 0 up to ``size`` rows (``x`` itself when it has
  them already).

  Args:
    x: an array [N, ...] with N <= size.
    size: the rows wanted.

  Returns:
    [size, ...], the first N rows ``x``'s.
  """
  n = x.shape[0]
  if n == size:
    return x
  return jnp.concatenate([jnp.asarray(x), jnp.zeros((size - n,) + x.shape[1:], x.dtype)])
