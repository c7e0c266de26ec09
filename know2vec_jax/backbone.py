"""The feature backbone phi: one frozen Flax image encoder shared by the model and query sides.

The paper uses an ImageNet ResNet-18's output. Offline, phi is a CNN (the zoo's ``cnn_l`` body,
128-d features) trained once to classify (source domain, class) over the *train* splits of the
probe sources: evaluation queries come from held-out splits, so phi never sees them. Keeping the
domain in the label keeps domain information in the features, which retrieval needs to tell apart
models that share a class set but not a domain. phi is saved with orbax and frozen afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from know2vec_jax.data import load_source
from know2vec_jax.zoo.architectures import CNN
from know2vec_jax import storage


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """How phi is built and trained.

  Attributes:
    sources: the sources (domains included) whose train splits phi learns from.
    channels, strides, dim: the CNN body and the feature size D.
    steps, batch_size, learning_rate: Adam training budget.
    max_per_source: at most this many train images per source (balances large and small ones).
    image_size, channels_in: the common image format.
    seed: init and batch seed.
  """
  sources: tuple[str, ...] = ()
  channels: tuple[int, ...] = (32, 64, 64)
  strides: tuple[int, ...] = (2, 2, 1)
  dim: int = 128
  steps: int = 1500
  batch_size: int = 256
  learning_rate: float = 2e-3
  max_per_source: int = 6000
  image_size: int = 28
  channels_in: int = 1
  seed: int = 0


class Backbone:
  """A trained, frozen phi: ``embed(images) -> L2-normalised features [N, D]``."""

  def __init__(self, config: BackboneConfig, num_labels: int, params: nnx.State | None = None):
    self.config = config
    self.num_labels = num_labels
    model = self._make(nnx.Rngs(params=config.seed))
    self.graphdef, state = nnx.split(model)
    self.params = state if params is None else params

  def _make(self, rngs):
    c = self.config
    return CNN(self.num_labels, image_shape=(c.image_size, c.image_size, c.channels_in),
               channels=c.channels, strides=c.strides, hidden=c.dim, rngs=rngs)

  @property
  def dim(self) -> int:
    return self.config.dim

  @property
  def image_shape(self) -> tuple[int, int, int]:
    c = self.config
    return (c.image_size, c.image_size, c.channels_in)

  def embed(self, images, batch_size: int = 2048) -> jax.Array:
    """L2-normalised features of float32 images [..., H, W, C] -> [..., D]."""
    images = jnp.asarray(images, jnp.float32)
    lead = images.shape[:-3]
    flat = images.reshape((-1,) + images.shape[-3:])
    outs = [_embed(self.graphdef, self.params, flat[i:i + batch_size])
            for i in range(0, max(len(flat), 1), batch_size)]
    out = jnp.concatenate(outs) if outs else jnp.zeros((0, self.dim))
    return out.reshape(lead + (self.dim,))

  def save(self, path) -> pathlib.Path:
    """Writes phi atomically (orbax parameters + JSON config)."""
    return storage.save_artifact(
        path, {"params": nnx.to_pure_dict(self.params)}, "backbone.json",
        {"format": "know2vec-backbone", "version": 1, "config": dataclasses.asdict(self.config),
         "num_labels": self.num_labels})

  @classmethod
  def load(cls, path) -> "Backbone":
    """Reads a saved phi; raises ValueError naming the path if it is missing or damaged."""
    root = pathlib.Path(path).expanduser().absolute()
    meta = storage.read_manifest(root, "backbone.json", "know2vec-backbone", 1, "backbone")
    cfg = meta["config"]
    config = BackboneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    bb = cls(config, meta["num_labels"])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            nnx.to_pure_dict(bb.params))
    try:
      with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(root / "params", abstract)
    except Exception as e:
      raise ValueError(f"backbone parameters at {root / 'params'} are unreadable: {e}") from e
    nnx.replace_by_pure_dict(bb.params, restored)
    return bb


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, params, images):
  f = nnx.merge(graphdef, params).features(images)
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-6)


def _train_step(graphdef, tx, params, opt_state, images, labels):
  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss, g = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(g, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def train_backbone(config: BackboneConfig, progress: bool = True) -> tuple[Backbone, dict]:
  """Trains phi on the train splits of ``config.sources`` ((source, class) labels).

  Returns:
    (the frozen backbone, info: seconds, final loss, held-out accuracy on the sources' test splits
    (a check that phi learned, never used for selection)).
  """
  if not config.sources:
    raise ValueError("BackboneConfig.sources is empty")
  if config.steps < 1:
    raise ValueError(f"BackboneConfig.steps must be >= 1, got {config.steps}")
  t0 = time.perf_counter()
  rng = np.random.default_rng(config.seed)
  xs, ys, xt, yt, offset = [], [], [], [], 0
  for s in config.sources:
    d = load_source(s, image_size=config.image_size, channels=config.channels_in)
    sel = rng.permutation(len(d.train_labels))[:config.max_per_source]
    xs.append(d.train_images[sel])
    ys.append(d.train_labels[sel] + offset)
    tsel = rng.permutation(len(d.test_labels))[:500]
    xt.append(d.test_images[tsel])
    yt.append(d.test_labels[tsel] + offset)
    offset += d.num_classes
  x = jax.device_put(np.concatenate(xs))
  y = jax.device_put(np.concatenate(ys).astype(np.int32))
  bb = Backbone(config, offset)
  # 50 warm-up steps, or half the budget when it is shorter (optax needs decay > warm-up).
  warmup = min(50, max(config.steps // 2, 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                                max(config.steps, warmup + 1),
                                                0.02 * config.learning_rate)
  tx = optax.adam(schedule)
  params, opt_state = bb.params, tx.init(bb.params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run(params, opt_state, key, n):
    def body(i, carry):
      p, o, _ = carry
      idx = jax.random.randint(jax.random.fold_in(key, i), (config.batch_size,), 0, len(y))
      return _train_step(bb.graphdef, tx, p, o, x[idx], y[idx])
    return jax.lax.fori_loop(0, n, body, (params, opt_state, jnp.zeros(())))

  key = jax.random.key(config.seed)
  chunk = 100
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, desc="training backbone", unit="step", dynamic_ncols=True)
  done, loss = 0, jnp.zeros(())
  while done < config.steps:
    n = min(chunk, config.steps - done)
    params, opt_state, loss = run(params, opt_state, jax.random.fold_in(key, done), n)
    done += n
    if bar is not None:
      bar.update(n)
      bar.set_postfix(loss=f"{float(loss):.3f}")
  if bar is not None:
    bar.close()
  bb.params = params
  model = nnx.merge(bb.graphdef, params)
  xt_, yt_ = np.concatenate(xt), np.concatenate(yt)
  pred = np.concatenate([np.asarray(jnp.argmax(model(xt_[i:i + 1024]), -1))
                         for i in range(0, len(xt_), 1024)])
  info = dict(seconds=time.perf_counter() - t0, final_loss=float(loss),
              heldout_accuracy=float(np.mean(pred == yt_)), num_labels=offset)
  return bb, info
