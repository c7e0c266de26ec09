"""The probing engine: logits of many stacked models on per-model (or shared) inputs, jitted.

Strategies over the model axis:

- ``"vmap"``: one batched computation for all models.
- ``"map"``: ``lax.map`` over models inside one jitted call.
- ``"loop"``: a Python loop calling one jitted single-model function per model (the baseline a
  per-model implementation would use; one dispatch per model).
- ``"auto"``: the rule measured by ``benchmarks/probe.py``: ``map`` on CPU (XLA:CPU runs a small
  model's matmuls efficiently one model at a time, and ``vmap`` over conv weights lowers to slow
  grouped convolutions), ``vmap`` on GPU/TPU.

With several devices the model axis is sharded over a 1-D mesh (``jax.make_mesh``, axis ``data``)
with ``jax.shard_map``: every device runs the chosen strategy on its own slice of models.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from know2vec_jax.mesh import data_mesh  # noqa: F401  (re-exported)

PROBE_STRATEGIES = ("vmap", "map", "loop", "auto")


def resolve_probe_strategy(strategy: str, backend: str | None = None) -> str:
  """Maps ``"auto"`` to the measured choice for the backend (see the module docstring)."""
  if strategy not in PROBE_STRATEGIES:
    raise ValueError(f"probe strategy must be one of {PROBE_STRATEGIES}, got {strategy!r}")
  if strategy != "auto":
    return strategy
  return "map" if (backend or jax.default_backend()) == "cpu" else "vmap"


def _apply(graphdef, p, x, features):
  model = nnx.merge(graphdef, p)
  return model.features(x) if features else model(x)


def _local(graphdef, params, images, shared, strategy, features):
  if strategy == "vmap":
    return jax.vmap(lambda p, x: _apply(graphdef, p, x, features),
                    in_axes=(0, None if shared else 0))(params, images)
  if shared:
    return jax.lax.map(lambda p: _apply(graphdef, p, images, features), params)
  return jax.lax.map(lambda a: _apply(graphdef, a[0], a[1], features), (params, images))


@functools.partial(jax.jit, static_argnames=("graphdef", "shared", "strategy", "features", "mesh"))
def _stack_logits(graphdef, params, images, *, shared, strategy, features, mesh):
  if mesh is None:
    return _local(graphdef, params, images, shared, strategy, features)
  fn = functools.partial(_local, graphdef, shared=shared, strategy=strategy, features=features)
  return jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P() if shared else P("data")),
                       out_specs=P("data"))(params, images)


@functools.partial(jax.jit, static_argnames=("graphdef", "features"))
def _one_logits(graphdef, p, x, *, features):
  return _apply(graphdef, p, x, features)


def stack_logits(graphdef, params, images, *, strategy: str = "auto", mesh=None,
                 features: bool = False) -> jax.Array:
  """Logits of every model of a stack.

  Args:
    graphdef: the stack's NNX graph definition.
    params: stacked parameters, leading axis M.
    images: float32 [M, B, H, W, C] (one batch per model) or [B, H, W, C] (shared by all).
    strategy: ``"vmap"``, ``"map"``, ``"loop"`` or ``"auto"``.
    mesh: a 1-D ``data`` mesh to shard the model axis over; ``None`` runs on one device. M need
      not divide the device count: the stack is padded with copies of its first model.
    features: return penultimate features instead of logits.

  Returns:
    [M, B, K] logits (or [M, B, D] features).
  """
  strategy = resolve_probe_strategy(strategy)
  shared = images.ndim == 4
  m = jax.tree.leaves(params)[0].shape[0]
  if strategy == "loop":
    outs = [_one_logits(graphdef, jax.tree.map(lambda a: a[i], params),
                        images if shared else images[i], features=features) for i in range(m)]
    return jnp.stack(outs)
  if mesh is None or mesh.size == 1:
    return _stack_logits(graphdef, params, images, shared=shared, strategy=strategy,
                         features=features, mesh=None)
  pad = (-m) % mesh.size
  if pad:
    params = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]), params)
    if not shared:
      images = jnp.concatenate([images, jnp.repeat(images[:1], pad, 0)])
  sharding = NamedSharding(mesh, P("data"))
  params = jax.device_put(params, sharding)
  images = jax.device_put(images, NamedSharding(mesh, P()) if shared else sharding)
  out = _stack_logits(graphdef, params, images, shared=shared, strategy=strategy,
                      features=features, mesh=mesh)
  return out[:m]


def shard_stack(params, mesh):
  """Places stacked parameters sharded along the model axis (padding is done per call)."""
  m = jax.tree.leaves(params)[0].shape[0]
  if mesh is None or mesh.size == 1 or m % mesh.size:
    return params
  return jax.device_put(params, NamedSharding(mesh, P("data")))
