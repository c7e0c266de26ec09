"""Training many models of one architecture at once, as a stack.

A *stack* is one NNX graph definition plus one parameter tree whose every leaf has a leading model
axis. Each model trains on its own task: per step it draws its own batch (from its own PRNG stream)
out of a shared image pool through its own index list, so a model's result does not depend on which
other models share its stack. One jitted call runs many optax steps for every model of the stack.

The model axis runs under ``vmap`` (one step for all models at once, batched matmuls) or
``lax.map`` (each model runs all its steps in a ``fori_loop``), chosen by
:mod:`know2vec_jax.strategy` (``auto``: the rule measured by ``benchmarks/zoo_train.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from know2vec_jax import strategy as strategy_lib
from know2vec_jax.zoo import architectures

@dataclasses.dataclass(frozen=True)
class StackSpec:
  """What all models of a stack share: the architecture and its input/output shapes."""
  arch: str
  num_classes: int
  image_shape: tuple[int, int, int] = (28, 28, 1)
  conv_impl: str = "im2col"

  def make(self, seed) -> nnx.Module:
    return architectures.make_model(self.arch, self.num_classes, image_shape=self.image_shape,
                                    conv_impl=self.conv_impl, seed=seed)

  def graphdef(self):
    return nnx.split(nnx.eval_shape(lambda: self.make(0)))[0]


def model_keys(seeds) -> jax.Array:
  """One PRNG key per model seed; init uses ``fold_in(key, 0)``, batches ``fold_in(key, 1)``."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def init_stack(spec: StackSpec, seeds) -> nnx.State:
  """Stacked parameters of ``len(seeds)`` freshly initialised models (leading model axis)."""
  return _init_stack(spec, model_keys(seeds))


@functools.partial(jax.jit, static_argnames=("spec",))
def _init_stack(spec: StackSpec, keys: jax.Array) -> nnx.State:
  return jax.vmap(lambda k: nnx.state(spec.make(jax.random.fold_in(k, 0))))(keys)


def unstack(params: nnx.State, i: int) -> nnx.State:
  """The parameters of model ``i`` of a stack."""
  return jax.tree.map(lambda a: a[i], params)


def apply_stack(graphdef, params: nnx.State, images: jax.Array, strategy: str = "vmap",
                features: bool = False) -> jax.Array:
  """Logits (or penultimate features) of every model of a stack on the same images.

  Args:
    graphdef: the stack's NNX graph definition.
    params: stacked parameters [M, ...].
    images: float32 [B, H, W, C].
    strategy: ``"vmap"`` or ``"map"`` over the model axis.
    features: return ``model.features(images)`` instead of logits.

  Returns:
    [M, B, K] logits or [M, B, D] features.
  """
  def one(p):
    model = nnx.merge(graphdef, p)
    return model.features(images) if features else model(images)
  return strategy_lib.map_models(one, params, strategy=strategy)


ADAM = optax.scale_by_adam()


def learning_rate(step, total_steps, peak, warmup_steps: int = 10, end_fraction: float = 0.05):
  """Linear warm-up then cosine decay to ``end_fraction * peak`` at ``total_steps``.

  Every argument may be a traced array, so models with different budgets and learning rates share
  one compiled training function.
  """
  step = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  warm = jnp.minimum(jnp.float32(warmup_steps), jnp.maximum(total // 2, 1.0))
  frac = jnp.clip((step - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
  cosine = end_fraction + (1 - end_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
  return peak * jnp.where(step < warm, (step + 1) / warm, cosine)


def init_opt_state(params: nnx.State):
  """Per-model Adam moments for a stack."""
  return jax.vmap(ADAM.init)(params)


def _loss_fn(graphdef, params, x, y):
  logits = nnx.merge(graphdef, params)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames=("graphdef", "batch_size", "strategy"),
                   donate_argnames=("params", "opt_state"))
def train_stack(graphdef, params, opt_state, keys, steps, lr, pool, train_idx, n_train,
                train_labels, *, batch_size: int, strategy: str):
  """Trains every model of a stack for its own number of Adam steps, in one jitted call.

  Args:
    graphdef: the stack's graph definition (static).
    params, opt_state: stacked parameters and Adam states [M, ...] (donated).
    keys: [M] per-model data keys (model ``m``'s step ``t`` batch uses ``fold_in(keys[m], t)``).
    steps: int32 [M] each model's budget (0 leaves a model untouched).
    lr: float32 [M] each model's peak learning rate (warm-up, then cosine decay over its budget).
    pool: float32 [N, H, W, C], the images of every source the stack trains on.
    train_idx: int32 [M, L] per-model indices into ``pool`` (padded).
    n_train: int32 [M] the valid length of each row of ``train_idx``.
    train_labels: int32 [M, L] the label each model trains on at each index (label noise included).
    batch_size: per-model batch (static).
    strategy: ``"vmap"`` or ``"map"`` over models (static).

  Returns:
    (params, opt_state, final-step loss [M]).
  """
  def one_step(t, p, o, key, total, peak, idx, n, lab):
    u = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, n)
    loss, g = jax.value_and_grad(functools.partial(_loss_fn, graphdef))(p, pool[idx[u]], lab[u])
    updates, o = ADAM.update(g, o, p)
    scale = -learning_rate(t, total, peak)
    return jax.tree.map(lambda a, b: a + scale * b, p, updates), o, loss

  def train_one(p, o, key, total, peak, idx, n, lab):
    # A while loop with a per-model trip count: under lax.map each model runs exactly its own
    # budget; under vmap finished models are held fixed while the others go on.
    def body(t, carry):
      return one_step(t, *carry[:2], key, total, peak, idx, n, lab)
    return jax.lax.fori_loop(0, total, body, (p, o, jnp.zeros((), jnp.float32)))

  return strategy_lib.map_models(train_one, params, opt_state, keys, steps, lr, train_idx,
                                 n_train, train_labels, strategy=strategy)


@functools.partial(jax.jit, static_argnames=("graphdef", "strategy", "chunk"))
def stack_accuracy(graphdef, params, pool, idx, labels, mask, *, strategy: str, chunk: int = 512):
  """Accuracy of each model on its own evaluation set.

  Args:
    idx: int32 [M, T] indices into ``pool`` (T a multiple of ``chunk``); labels, mask: [M, T].

  Returns:
    float32 [M] accuracies over the masked-in entries.
  """
  def per_model(p, i, y, w):
    model = nnx.merge(graphdef, p)

    def per_chunk(args):
      ci, cy, cw = args
      return jnp.sum((jnp.argmax(model(pool[ci]), -1) == cy) * cw)
    correct = jax.lax.map(per_chunk, (i.reshape(-1, chunk), y.reshape(-1, chunk),
                                      w.reshape(-1, chunk)))
    return correct.sum() / jnp.maximum(w.sum(), 1)
  return strategy_lib.map_models(per_model, params, idx, labels, mask, strategy=strategy)


def pad_rows(rows: list[np.ndarray], multiple: int = 1, fill: int = 0):
  """Pads 1-D int arrays to a common length (a multiple of ``multiple``).

  Returns:
    (int32 [M, L] padded, float32 [M, L] mask).
  """
  length = max(len(r) for r in rows)
  length = -(-length // multiple) * multiple
  out = np.full((len(rows), length), fill, np.int32)
  mask = np.zeros((len(rows), length), np.float32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
    mask[i, :len(r)] = 1.0
  return out, mask
