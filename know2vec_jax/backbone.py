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
from flax import nnx

from know2vec_jax import config as config_lib
from know2vec_jax import storage
from know2vec_jax.config import require
from know2vec_jax.data import load_source
from know2vec_jax.zoo.architectures import CNN

FORMAT = "know2vec-backbone"
VERSION = 2  # 2: checksummed parameters; the image shape beside the config
MANIFEST = "backbone.json"


class BackboneError(ValueError):
  """A backbone that cannot be trained, saved or loaded as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """How phi is built and trained.

  The image shape is not a field: it is the zoo's (the black boxes'), passed to
  :func:`train_backbone` and :class:`Backbone`.

  Attributes:
    sources: the sources (domains included) whose train splits phi learns from; empty: the
      sources of the models a proxy is trained on.
    channels, strides, dim: the CNN body and the feature size D.
    steps, batch_size, learning_rate: Adam training budget.
    max_per_source: at most this many train images per source (balances large and small ones).
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
  seed: int = 0

  def __post_init__(self):
    for name in ("dim", "steps", "batch_size", "max_per_source"):
      require(getattr(self, name) >= 1, f"backbone {name} must be >= 1, got "
              f"{getattr(self, name)}")
    require(len(self.channels) == len(self.strides) and len(self.channels) >= 1,
            f"backbone channels {self.channels} and strides {self.strides} must have one entry "
            "per conv layer")
    require(self.learning_rate > 0, f"backbone learning_rate must be > 0, got "
            f"{self.learning_rate}")


class Backbone:
  """A trained, frozen phi: ``embed(images) -> L2-normalised features [N, D]``.

  Args:
    config: the architecture and training settings.
    image_shape: (H, W, C) of the images it reads.
    num_labels: outputs of the (domain, class) head it was trained with.
    params: its parameters (default: freshly initialised).
  """

  def __init__(self, config: BackboneConfig, image_shape, num_labels: int,
               params: nnx.State | None = None):
    self.config = config
    self.image_shape = tuple(int(d) for d in image_shape)
    self.num_labels = int(num_labels)
    model = CNN(self.num_labels, image_shape=self.image_shape, channels=config.channels,
                strides=config.strides, hidden=config.dim, rngs=nnx.Rngs(params=config.seed))
    self.graphdef, state = nnx.split(model)
    self.params = state if params is None else params

  @property
  def dim(self) -> int:
    return self.config.dim

  @functools.cached_property
  def fingerprint(self) -> str:
    """A short hash of phi's parameters: features of two backbones with one fingerprint agree."""
    return storage.checksum(storage.pure(self.params))[:16]

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
    """Writes phi atomically (orbax parameters + JSON config, checksummed)."""
    return storage.save_artifact(
        path, {"params": self.params}, MANIFEST,
        {"format": FORMAT, "version": VERSION, "config": config_lib.to_dict(self.config),
         "image_shape": list(self.image_shape), "num_labels": self.num_labels})

  @classmethod
  def load(cls, path) -> "Backbone":
    """Reads a saved phi, verified against the checksum recorded at save time.

    Raises:
      BackboneError: a missing, incomplete or corrupted backbone (the message names the path).
    """
    root = pathlib.Path(path).expanduser().absolute()
    meta = storage.read_manifest(root, MANIFEST, FORMAT, VERSION, "backbone", BackboneError)
    try:
      bb = cls(config_lib.from_dict(BackboneConfig, meta["config"], "backbone config"),
               meta["image_shape"], meta["num_labels"])
    except (KeyError, TypeError, ValueError) as e:
      raise BackboneError(f"{root / MANIFEST} is corrupted: {type(e).__name__}: {e}") from e
    restored = storage.restore_trees(root, meta, {"params": storage.pure(bb.params)},
                                     "backbone", BackboneError)
    nnx.replace_by_pure_dict(bb.params, restored["params"])
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


def train_backbone(config: BackboneConfig, sources=(), image_shape=(28, 28, 1),
                   progress: bool = True) -> tuple[Backbone, dict]:
  """Trains phi on the train splits of its sources ((source, class) labels).

  Args:
    config: the architecture and training budget.
    sources: the sources to learn from when ``config.sources`` is empty.
    image_shape: (H, W, C), square images.
    progress: a tqdm bar.

  Returns:
    (the frozen backbone, info: seconds, final loss, held-out accuracy on the sources' test splits
    (a check that phi learned, never used for selection), sources).
  """
  sources = tuple(config.sources or sources)
  if not sources:
    raise BackboneError("no sources to train the backbone on (BackboneConfig.sources is empty)")
  h, w, c = image_shape
  if h != w:
    raise BackboneError(f"backbone images must be square, got {tuple(image_shape)}")
  t0 = time.perf_counter()
  rng = np.random.default_rng(config.seed)
  xs, ys, xt, yt, offset = [], [], [], [], 0
  for s in sources:
    d = load_source(s, image_size=h, channels=c)
    sel = rng.permutation(len(d.train_labels))[:config.max_per_source]
    xs.append(d.train_images[sel])
    ys.append(d.train_labels[sel] + offset)
    tsel = rng.permutation(len(d.test_labels))[:500]
    xt.append(d.test_images[tsel])
    yt.append(d.test_labels[tsel] + offset)
    offset += d.num_classes
  x = jax.device_put(np.concatenate(xs))
  y = jax.device_put(np.concatenate(ys).astype(np.int32))
  bb = Backbone(config, image_shape, offset)
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
              heldout_accuracy=float(np.mean(pred == yt_)), num_labels=offset,
              sources=list(sources))
  return bb, info
