"""Shared timing helpers and machine facts for the benchmark suite."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import jax


def block(x):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_call(fn, *, repeats: int = 3, warmup: int = 1) -> dict:
  """Runs ``fn()`` ``warmup`` times untimed, then ``repeats`` times; returns seconds statistics."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t)
  times.sort()
  return {"median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1],
          "repeats": repeats}


def cpu_model() -> str:
  """The CPU's model name (Linux), else the platform's processor string."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  """The facts printed beside every result: device, backend, library versions, date."""
  import flax
  import jaxlib
  import numpy
  import optax
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(), "device_kind": dev.device_kind,
      "num_devices": jax.device_count(), "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "optax": optax.__version__, "numpy": numpy.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
