"""Shape buckets: a jitted function compiles once per input shape, so batches of any size are
padded up to one of few sizes (powers of two up to a cap) before they reach it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def bucket(n: int, cap: int, floor: int = 1) -> int:
  """``n`` rounded up to a power of two, at least ``floor`` (unless ``n`` is 1), at most ``cap``.

  Args:
    n: the rows to hold.
    cap: the largest bucket (a chunk size: callers split larger inputs into chunks of ``cap``).
    floor: the smallest bucket for two rows or more: small batches of any size share one
      compilation (padding a few rows costs far less than compiling again).

  Returns:
    The bucket size: few distinct values, and a single row (one query: the latency path) is not
    padded.
  """
  n, cap = int(n), int(cap)
  if n <= 1:
    return 1
  return min(max(1 << (n - 1).bit_length(), int(floor)), cap)


def pad_rows(x, size: int):
  """``x`` with zero rows appended along axis 0 up to ``size`` rows (``x`` itself when it has
  them already).

  Args:
    x: an array [N, ...] with N <= size.
    size: the rows wanted.

  Returns:
    [size, ...], the first N rows ``x``'s: a host array for a host array (padded on the host, so
    that a jitted call moves it once), a device array otherwise.
  """
  n = x.shape[0]
  if n == size:
    return x
  if isinstance(x, np.ndarray):
    return np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])
  return jnp.concatenate([jnp.asarray(x), jnp.zeros((size - n,) + x.shape[1:], x.dtype)])
