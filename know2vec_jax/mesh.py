"""The one device mesh of the project: 1-D, axis ``data``."""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType


def data_mesh(num_devices: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: the first ``num_devices``, or all).

  The axis is ``Auto``-typed: ``jit`` propagates shardings and inserts collectives itself
  (``jax.make_mesh`` defaults to ``Explicit`` axes in recent JAX, which would demand explicit
  output shardings on every contraction over the batch, e.g. the aligner's Q M^T).
  """
  if devices is None:
    devices = jax.devices()[:num_devices or jax.device_count()]
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,),
                       devices=list(devices))
