"""The model-axis strategy: how one computation runs over the models of a stack.

Models of one architecture live as a *stack* (one NNX graph, a leading model axis on every
parameter). Zoo training, probing and fine-tuning all run a per-model function over that axis,
and all choose how through this module:

- ``"vmap"``: one batched computation for all models (wide kernels; the natural fit on GPU/TPU).
- ``"map"``: ``lax.map`` over the models inside one jitted call (one model's working set at a
  time).
- ``"loop"``: a Python loop of one jitted single-model call per model (the baseline a per-model
  implementation would use); only the probing engine offers it, since it is not a traced
  computation.
- ``"auto"``: the measured rule below.

Measured on XLA:CPU (2-core x86-64; ``python -m benchmarks --only zoo_train`` and ``--only
probe``): ``vmap`` over stacked conv weights lowers to grouped convolutions and was 1.4-1.8x slower
than ``lax.map`` for training and 3.3x slower for extracting the demo zoo's knowledge (232 s vs
70 s); on MLPs the two were within 6 %. So ``auto`` is ``map`` on CPU and ``vmap`` on accelerators.
"""

from __future__ import annotations

from typing import Callable

import jax

STRATEGIES = ("vmap", "map", "loop", "auto")
TRACED = ("vmap", "map", "auto")  # the strategies a jitted computation can take


def resolve(strategy: str, backend: str | None = None,
            allowed: tuple[str, ...] = STRATEGIES) -> str:
  """The concrete strategy for ``strategy`` on ``backend``.

  Args:
    strategy: one of ``allowed``.
    backend: a JAX backend name; default the default backend.
    allowed: the strategies the caller supports (``TRACED`` inside jitted code).

  Returns:
    ``"vmap"``, ``"map"`` or (where allowed) ``"loop"``.

  Raises:
    ValueError: a strategy not in ``allowed``, naming the allowed ones.
  """
  if strategy not in allowed:
    raise ValueError(f"model-axis strategy must be one of {allowed}, got {strategy!r}")
  if strategy != "auto":
    return strategy
  return "map" if (backend or jax.default_backend()) == "cpu" else "vmap"


def map_models(fn: Callable, *args, strategy: str, chunk: int | None = None):
  """``fn`` applied to each model's slice of ``args`` (leading axis = model), stacked.

  Args:
    fn: a per-model function of the unstacked arguments.
    *args: pytrees whose leaves all have the model axis first.
    strategy: ``"vmap"``, ``"map"`` or ``"auto"`` (resolved for the default backend).
    chunk: ``vmap`` only: batch at most this many models at once (``lax.map`` over chunks of a
      ``vmap``), bounding the live activations of a large stack; None: every model at once.

  Returns:
    ``fn``'s outputs with a leading model axis.
  """
  if resolve(strategy, allowed=TRACED) == "vmap":
    m = jax.tree.leaves(args)[0].shape[0]
    if chunk is None or chunk >= m:
      return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args, batch_size=max(int(chunk), 1))
  return jax.lax.map(lambda a: fn(*a), args)
