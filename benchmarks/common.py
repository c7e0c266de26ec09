"""Shared timing helpers and machine facts for the benchmark suite.

Timing rules used throughout:

- Every timed call ends with ``block_until_ready`` on its outputs (JAX dispatch is asynchronous).
- Warm-up calls (compilation, caches) are never timed; a *first call* is reported on its own
  where it matters to a user (the end-to-end query).
- The machine is shared and noisy, so a figure and its baseline are timed *interleaved*
  (:func:`compare`: one call of each in turn, repeated; :func:`compare_latency`: blocks of calls
  in turn, each after a short pause) and summarised by their medians: a burst of load from
  elsewhere slows both rather than only one.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import statistics
import time
from typing import Callable

import jax
import numpy as np


def block(x):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def _stats(times: list[float]) -> dict:
  times = sorted(times)
  return {"median_s": statistics.median(times), "p99_s": float(np.percentile(times, 99)),
          "min_s": times[0], "max_s": times[-1], "repeats": len(times)}


def time_call(fn, *, repeats: int = 3, warmup: int = 1) -> dict:
  """Runs ``fn()`` ``warmup`` times untimed, then ``repeats`` times; returns seconds statistics."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t)
  return _stats(times)


def compare(fns: dict[str, Callable], *, repeats: int = 3, warmup: int = 1,
            budget_s: float | None = None, min_repeats: int = 2) -> dict[str, dict]:
  """Times several functions interleaved (round-robin), so machine noise hits all of them alike.

  Args:
    fns: name -> zero-argument callable.
    repeats: timed rounds (each round calls every function once).
    warmup: untimed rounds first.
    budget_s: stop after the round in which the total timed seconds exceed this (but never before
      ``min_repeats`` rounds), so slow configurations keep the suite short.
    min_repeats: the least number of timed rounds.

  Returns:
    name -> {median_s, p99_s, min_s, max_s, repeats}.
  """
  for _ in range(warmup):
    for fn in fns.values():
      block(fn())
  times = {name: [] for name in fns}
  spent = 0.0
  for r in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      block(fn())
      dt = time.perf_counter() - t
      times[name].append(dt)
      spent += dt
    if budget_s is not None and r + 1 >= min_repeats and spent > budget_s:
      break
  return {name: _stats(ts) for name, ts in times.items()}


def compare_latency(fns: dict[str, Callable], *, samples: int, budget_s: float, warmup: int = 1,
                    rounds: int = 3, settle_s: float = 0.1,
                    contexts: dict[str, Callable] | None = None) -> dict[str, dict]:
  """Latency (ms: p50, p99, min, samples) of several functions, timed in interleaved blocks.

  Each of ``rounds`` rounds gives every function one block: a pause of ``settle_s`` seconds, then
  timed calls until it has ``samples / rounds`` of them or spent ``budget_s / rounds`` seconds (at
  least one call). Blocks rather than single calls, and the pause before each, because a BLAS or
  OpenMP library keeps its worker threads spinning for up to ~100 ms after it returns (OpenBLAS
  does, by default): timed right after such a call, the next function would share the CPU with
  them. Rounds still spread load from elsewhere over all functions.

  Args:
    fns: name -> zero-argument callable.
    samples: the most timed calls per function.
    budget_s: the most timed seconds per function (at least one call per round).
    warmup: untimed calls of each function first.
    rounds: blocks per function.
    settle_s: the pause before each block.
    contexts: name -> a zero-argument callable returning a context manager entered around that
      function's warm-up and blocks (a setting too costly to switch on every call, such as a
      threadpoolctl limit).
  """
  contexts = contexts or {}

  def entered(name):
    return contexts[name]() if name in contexts else contextlib.nullcontext()
  for name, fn in fns.items():
    with entered(name):
      for _ in range(warmup):
        block(fn())
  times = {name: [] for name in fns}
  per_block = max(1, -(-samples // rounds))
  for _ in range(rounds):
    for name, fn in fns.items():
      with entered(name):
        time.sleep(settle_s)
        start = time.perf_counter()
        for _ in range(per_block):
          t = time.perf_counter()
          block(fn())
          times[name].append(time.perf_counter() - t)
          if time.perf_counter() - start > budget_s / rounds:
            break
  out = {}
  for name, ts in times.items():
    ms = np.asarray(ts) * 1e3
    out[name] = {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                 "min_ms": float(ms.min()), "samples": len(ms)}
  return out


def latency(fn, *, samples: int, warmup: int = 2, budget_s: float = 5.0,
            min_samples: int = 5) -> dict:
  """Latency distribution of ``fn()`` in milliseconds (p50, p99, mean), after ``warmup`` calls.

  Stops after ``samples`` calls or once ``budget_s`` seconds were spent (at least
  ``min_samples``). A p99 from fewer than 100 samples is close to the maximum; ``samples`` says how
  many there were.
  """
  for _ in range(warmup):
    block(fn())
  times = []
  start = time.perf_counter()
  while len(times) < samples and (len(times) < min_samples
                                  or time.perf_counter() - start < budget_s):
    t = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t)
  ms = np.asarray(times) * 1e3
  return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
          "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "samples": len(ms)}


def optional(name: str):
  """An optional benchmark dependency (torch, faiss), or None when it is not installed."""
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


def accelerator() -> bool:
  """True on GPU/TPU backends: the suite uses larger sizes there."""
  return jax.default_backend() != "cpu"


def ratio(ours: float | None, theirs: float | None) -> float | None:
  """ours / theirs (throughputs), or None when either is missing."""
  if ours is None or theirs is None or theirs == 0:
    return None
  return float(ours) / float(theirs)


def fraction(rate: float | None, *bounds: float | None) -> float | None:
  """``rate`` as a fraction of the best of ``bounds``: a true bound, so never above 1.

  ``bounds`` are rates of the same arithmetic measured in the same run (the peak benchmark's,
  :mod:`benchmarks.peak`, and best calls of the benchmark's own, e.g. ``rate``'s own fastest
  call): whichever is fastest is the most this machine was seen to do. ``rate`` should be a
  median, so the fraction leans low, never high. None when ``rate`` or every bound is missing.
  """
  known = [float(b) for b in bounds if b]
  if rate is None or not known:
    return None
  return float(rate) / max(known + [float(rate)])


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


def _version(name: str) -> str | None:
  mod = optional(name)
  return getattr(mod, "__version__", "?") if mod is not None else None


def machine() -> dict:
  """The facts printed beside every result: device, backend, library versions, date."""
  import flax
  import jaxlib
  import optax
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(), "device_kind": dev.device_kind,
      "num_devices": jax.device_count(), "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
      "torch": _version("torch"), "faiss": _version("faiss"),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
