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


PROBE_DEVICES = ("auto", "all", "one")


def probe_mesh(devices: str = "auto") -> jax.sharding.Mesh | None:
  """The mesh zoo stacks are probed over: this process's own devices (never another process's,
  whose share of the models it probes itself), or None for one device.

  Args:
    devices: ``"all"``: every local device; ``"one"``: the first; ``"auto"``: every local
      accelerator, one device on a CPU host. Forced host devices
      (``--xla_force_host_platform_device_count``) share the same cores, and sharding the model
      axis over them compiles one program per device for no gain: the tiny zoo's knowledge took
      4.8-5.5 s on one device and 10.7-13.0 s over 8 forced devices of the 2-core CPU (2 runs,
      compilations included). The knowledge is the same bit for bit either way
      (tests/test_knowledge.py::test_knowledge_is_the_same_on_one_device_and_eight).

  Raises:
    ValueError: an unknown ``devices`` value.
  """
  if devices not in PROBE_DEVICES:
    raise ValueError(f"probe devices must be one of {PROBE_DEVICES}, got {devices!r}")
  local = jax.local_devices()
  if devices == "one" or len(local) == 1 or (devices == "auto" and local[0].platform == "cpu"):
    return None
  return data_mesh(devices=local)
