"""The probing engine: logits of many stacked models on per-model (or shared) inputs, jitted.

The model axis runs by one of the strategies of :mod:`know2vec_jax.strategy` (``vmap``, ``map``,
``loop``, ``auto``; ``auto`` is the rule measured by ``benchmarks/probe.py``).

On CPU, ``map`` also splits each model's batch into cache-sized chunks (a nested ``lax.map``): an
im2col convolution's patches grow with the batch, and once they fall out of cache the same layer
runs several times slower (``benchmarks/peak.py`` on a 2-core x86-64 CPU: about 4x between 64 and
1,024 images; chunking doubled the cnn_l probe rate on 1,024-image pool batches). The chunk is sized
from the model's own per-image intermediates (:func:`_chunk_size`), so a small MLP keeps its whole
batch.

With several devices the model axis is sharded over a 1-D mesh (``jax.make_mesh``, axis ``data``)
with ``jax.shard_map``: every device runs the chosen strategy on its own slice of models.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from know2vec_jax import strategy as strategy_lib
from know2vec_jax.mesh import data_mesh  # noqa: F401  (re-exported)

def _apply(graphdef, p, x, features):
  model = nnx.merge(graphdef, p)
  return model.features(x) if features else model(x)


# Budget for one chunk's intermediates, counted unfused (every op output of the per-image
# jaxpr). XLA fuses many of them, so the working set is smaller; 64 MiB was measured best on a
# 32 MiB-L3 CPU (cnn_l -> 64 images, cnn_s -> 256, the MLP unchunked).
CHUNK_BYTES = 64 * 2**20


def _chunk_size(graphdef, params, image_shape, features) -> int:
  """Images per chunk so that one model's intermediates on a chunk stay within ``CHUNK_BYTES``.

  Traced once per compilation: the bytes of every intermediate of one model's forward pass at
  batch 2 minus batch 1 (weight-only ops cancel), rounded down to a power of two.
  """
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)

  def total(b):
    x = jax.ShapeDtypeStruct((b,) + tuple(image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: _apply(graphdef, p, x, features))(one, x)
    return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize
               for eqn in jaxpr.eqns for v in eqn.outvars)
  per_image = max(total(2) - total(1), 1)
  return 1 << max(int(math.log2(max(CHUNK_BYTES // per_image, 1))), 0)


def _chunked(fn, x, chunk):
  """``fn`` over ``x`` [B, ...] in chunks of ``chunk`` rows (zero-padded), as one lax.map."""
  b = x.shape[0]
  if b <= chunk:
    return fn(x)
  n = -(-b // chunk)
  xp = jnp.pad(x, [(0, n * chunk - b)] + [(0, 0)] * (x.ndim - 1))
  out = jax.lax.map(fn, xp.reshape((n, chunk) + x.shape[1:]))
  return out.reshape((n * chunk,) + out.shape[2:])[:b]


def _local(graphdef, params, images, shared, strategy, features, model_chunk=None):
  if strategy == "vmap":
    if shared:
      return strategy_lib.map_models(lambda p: _apply(graphdef, p, images, features), params,
                                     strategy="vmap", chunk=model_chunk)
    return strategy_lib.map_models(lambda p, x: _apply(graphdef, p, x, features), params,
                                   images, strategy="vmap", chunk=model_chunk)
  chunk = images.shape[-4]  # the whole batch: one chunk
  if jax.default_backend() == "cpu":
    chunk = _chunk_size(graphdef, params, images.shape[-3:], features)

  def one(p, x):
    return _chunked(lambda xc: _apply(graphdef, p, xc, features), x, chunk)
  if shared:
    return strategy_lib.map_models(lambda p: one(p, images), params, strategy="map")
  return strategy_lib.map_models(one, params, images, strategy="map")


@functools.partial(jax.jit, static_argnames=("graphdef", "shared", "strategy", "features", "mesh",
                                             "model_chunk"))
def _stack_logits(graphdef, params, images, *, shared, strategy, features, mesh,
                  model_chunk=None):
  if mesh is None:
    return _local(graphdef, params, images, shared, strategy, features, model_chunk)
  fn = functools.partial(_local, graphdef, shared=shared, strategy=strategy, features=features,
                         model_chunk=model_chunk)
  return jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P() if shared else P("data")),
                       out_specs=P("data"))(params, images)


@functools.partial(jax.jit, static_argnames=("graphdef", "features"))
def _one_logits(graphdef, p, x, *, features):
  return _apply(graphdef, p, x, features)


def stack_logits(graphdef, params, images, *, strategy: str = "auto", mesh=None,
                 features: bool = False, num_models: int | None = None,
                 model_chunk: int | None = None) -> jax.Array:
  """Logits of every model of a stack.

  Args:
    graphdef: the stack's NNX graph definition.
    params: stacked parameters, leading axis M.
    images: float32 [M, B, H, W, C] (one batch per model) or [B, H, W, C] (shared by all).
    strategy: ``"vmap"``, ``"map"``, ``"loop"`` or ``"auto"``.
    mesh: a 1-D ``data`` mesh to shard the model axis over; ``None`` runs on one device. M need
      not divide the device count: the stack is padded with copies of its first model (pass
      params through :func:`shard_stack` once to avoid re-padding on every call).
    features: return penultimate features instead of logits.
    num_models: how many leading rows of ``params`` are real models (the rest is padding from
      :func:`shard_stack`); default: all rows, or the number of per-model input batches.
    model_chunk: ``vmap`` only: at most this many models (per device) run at once, the rest in
      turn within the same call (:func:`know2vec_jax.strategy.map_models`); None: all at once.

  Returns:
    [M, B, K] logits (or [M, B, D] features).
  """
  strategy = strategy_lib.resolve(strategy)
  shared = images.ndim == 4
  m = num_models or (jax.tree.leaves(params)[0].shape[0] if shared else images.shape[0])
  if strategy == "loop":
    # One device runs the loop: move a sharded stack there once, rather than slicing it per
    # model and leaf through cross-device collectives (hundreds of tiny collective programs).
    leaf = jax.tree.leaves(params)[0]
    if len(getattr(leaf, "devices", lambda: ())()) > 1:
      params = jax.device_put(params, jax.devices()[0])
    outs = [_one_logits(graphdef, jax.tree.map(lambda a: a[i], params),
                        images if shared else images[i], features=features) for i in range(m)]
    return jnp.stack(outs)
  if mesh is None or mesh.size == 1:
    return _stack_logits(graphdef, params, images, shared=shared, strategy=strategy,
                         features=features, mesh=None, model_chunk=model_chunk)[:m]
  params = shard_stack(params, mesh)  # a no-op for a stack shard_stack already placed
  rows = jax.tree.leaves(params)[0].shape[0]
  if not shared and images.shape[0] < rows:  # padded stack: pad the per-model inputs to match
    images = jnp.concatenate([images, jnp.repeat(images[:1], rows - images.shape[0], 0)])
  sharding = NamedSharding(mesh, P("data"))
  images = jax.device_put(images, NamedSharding(mesh, P()) if shared else sharding)
  out = _stack_logits(graphdef, params, images, shared=shared, strategy=strategy,
                      features=features, mesh=mesh, model_chunk=model_chunk)
  return out[:m]


def shard_stack(params, mesh):
  """Stacked parameters padded to a multiple of the mesh size and sharded along the model axis.

  The padding rows are copies of the first model; :func:`stack_logits` drops their outputs. Doing
  this once (as :class:`know2vec_jax.blackbox.StackGroup` does) keeps it off every call.
  """
  if mesh is None or mesh.size == 1:
    # On the device once, not copied from the host on every call.
    return jax.device_put(params, None if mesh is None else mesh.devices.flat[0])
  sharding = NamedSharding(mesh, P("data"))
  leaf = jax.tree.leaves(params)[0]
  if leaf.shape[0] % mesh.size == 0 and getattr(leaf, "sharding", None) == sharding:
    return params
  pad = (-leaf.shape[0]) % mesh.size
  if pad:
    params = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]), params)
  return jax.device_put(params, sharding)
