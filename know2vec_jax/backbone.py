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
    augment: probability that a training image is augmented (0: never); an augmented image gets
      a random rotation of up to ``aug_rotate`` degrees and translation of up to ``aug_shift``
      pixels, contrast and brightness factors drawn from ``aug_contrast`` and
      ``aug_brightness`` and Gaussian noise of sigma up to ``aug_noise`` (see :func:`augment`):
      the nuisances of :mod:`know2vec_jax.data.perturb`, so that phi, shared by the query and
      model sides, does not tell a shifted or darker image of a task from a centred one.
    centre: phi reads every image (in training and in ``embed``) with its content moved to the
      centre (:func:`centre`), so a translation does not change its features at all.
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
  augment: float = 0.0
  centre: bool = False
  aug_shift: float = 3.0
  aug_rotate: float = 12.0
  aug_contrast: tuple[float, float] = (0.5, 1.5)
  aug_brightness: tuple[float, float] = (0.6, 1.2)
  aug_noise: float = 0.15

  def __post_init__(self):
    for name in ("dim", "steps", "batch_size", "max_per_source"):
      require(getattr(self, name) >= 1, f"backbone {name} must be >= 1, got "
              f"{getattr(self, name)}")
    require(len(self.channels) == len(self.strides) and len(self.channels) >= 1,
            f"backbone channels {self.channels} and strides {self.strides} must have one entry "
            "per conv layer")
    require(self.learning_rate > 0, f"backbone learning_rate must be > 0, got "
            f"{self.learning_rate}")
    require(0.0 <= self.augment <= 1.0, f"backbone augment must be a probability in [0, 1], got "
            f"{self.augment}")
    require(self.aug_shift >= 0 and self.aug_rotate >= 0 and self.aug_noise >= 0,
            f"backbone aug_shift, aug_rotate and aug_noise must be >= 0, got {self.aug_shift}, "
            f"{self.aug_rotate}, {self.aug_noise}")
    for name in ("aug_contrast", "aug_brightness"):
      lo_hi = getattr(self, name)
      require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
              f"backbone {name} must be (low, high) with 0 < low <= high, got {lo_hi}")


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
    outs = [_embed(self.graphdef, self.params, flat[i:i + batch_size], self.config.centre)
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


def centre(images: jax.Array) -> jax.Array:
  """Moves each image's content to the centre (jittable): a translation-free view of it.

  The content is where pixels differ from the image's border (its mean border value, so white
  backgrounds and black ones alike); its centroid is shifted to the image centre with
  :func:`warp`. An image with no content stays as it is.

  Args:
    images: float32 [B, H, W, C].

  Returns:
    float32 [B, H, W, C].
  """
  b, h, w, _ = images.shape
  border = jnp.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]],
                           axis=1).mean(axis=(1, 2))  # [B]
  mass = jnp.abs(images - border[:, None, None, None]).sum(-1)  # [B, H, W]
  total = mass.sum(axis=(1, 2))
  ii = jnp.arange(h, dtype=jnp.float32)[None, :, None]
  jj = jnp.arange(w, dtype=jnp.float32)[None, None, :]
  safe = jnp.maximum(total, 1e-6)
  ci = jnp.where(total > 1e-6, (mass * ii).sum(axis=(1, 2)) / safe, (h - 1) / 2.0)
  cj = jnp.where(total > 1e-6, (mass * jj).sum(axis=(1, 2)) / safe, (w - 1) / 2.0)
  shift = jnp.stack([(h - 1) / 2.0 - ci, (w - 1) / 2.0 - cj], -1)
  return warp(images, jnp.zeros((b,)), shift)


@functools.partial(jax.jit, static_argnames=("graphdef", "centred"))
def _embed(graphdef, params, images, centred=False):
  if centred:
    images = centre(images)
  f = nnx.merge(graphdef, params).features(images)
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-6)


def warp(images: jax.Array, angle: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotates each image about its centre and translates it (bilinear, border repeated; jittable).

  Args:
    images: float32 [B, H, W, C].
    angle: [B] radians, counter-clockwise as displayed (row 0 at the top).
    shift: [B, 2] (down, right) pixels.

  Returns:
    float32 [B, H, W, C]: what :func:`know2vec_jax.data.perturb.perturb`'s ``rotate`` and
    ``shift`` give for the same amounts.
  """
  _, h, w, c = images.shape
  ci, cj = (h - 1) / 2.0, (w - 1) / 2.0
  gi, gj = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")

  def one(img, a, t):
    # Output pixel p reads the input at R(-a) (p - centre - t) + centre, where R(a) turns
    # (row, col) offsets counter-clockwise as displayed: right (0, 1) to up (-1, 0).
    di, dj = gi - ci - t[0], gj - cj - t[1]
    si = jnp.cos(a) * di + jnp.sin(a) * dj + ci
    sj = jnp.cos(a) * dj - jnp.sin(a) * di + cj
    return jnp.stack([jax.scipy.ndimage.map_coordinates(img[..., ch], [si, sj], order=1,
                                                        mode="nearest") for ch in range(c)], -1)

  return jax.vmap(one)(images, angle, shift)


def augment(key: jax.Array, images: jax.Array, config: BackboneConfig) -> jax.Array:
  """Random nuisance views of a batch, drawn independently per image (jittable).

  Each image is, with probability ``config.augment``, rotated by an angle uniform in
  +-``aug_rotate`` degrees and translated by up to ``aug_shift`` pixels per axis (bilinear, the
  border pixel repeated, as :func:`know2vec_jax.data.perturb.perturb` does), scaled in contrast
  about its mean and in brightness by factors uniform in ``aug_contrast`` / ``aug_brightness``,
  and given Gaussian noise of a sigma uniform in [0, ``aug_noise``]; then clipped to [0, 1].

  Args:
    key: a PRNG key.
    images: float32 [B, H, W, C].
    config: the augmentation settings.

  Returns:
    float32 [B, H, W, C].
  """
  b = images.shape[0]
  ks = jax.random.split(key, 7)
  on = jax.random.bernoulli(ks[0], config.augment, (b,))
  angle = jnp.deg2rad(jax.random.uniform(ks[1], (b,), minval=-config.aug_rotate,
                                         maxval=config.aug_rotate))
  shift = jax.random.uniform(ks[2], (b, 2), minval=-config.aug_shift, maxval=config.aug_shift)
  x = warp(images, angle, shift)
  contrast = jax.random.uniform(ks[3], (b, 1, 1, 1), minval=config.aug_contrast[0],
                                maxval=config.aug_contrast[1])
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  x = mean + contrast * (x - mean)
  x = x * jax.random.uniform(ks[4], (b, 1, 1, 1), minval=config.aug_brightness[0],
                             maxval=config.aug_brightness[1])
  sigma = jax.random.uniform(ks[5], (b, 1, 1, 1), maxval=config.aug_noise)
  x = jnp.clip(x + sigma * jax.random.normal(ks[6], x.shape), 0.0, 1.0)
  return jnp.where(on[:, None, None, None], x, images)


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
      k_idx, k_aug = jax.random.split(jax.random.fold_in(key, i))
      idx = jax.random.randint(k_idx, (config.batch_size,), 0, len(y))
      images = x[idx] if config.augment == 0 else augment(k_aug, x[idx], config)
      if config.centre:
        images = centre(images)
      return _train_step(bb.graphdef, tx, p, o, images, y[idx])
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
  view = jax.jit(centre) if config.centre else (lambda a: a)
  pred = np.concatenate([np.asarray(jnp.argmax(model(view(xt_[i:i + 1024])), -1))
                         for i in range(0, len(xt_), 1024)])
  info = dict(seconds=time.perf_counter() - t0, final_loss=float(loss),
              heldout_accuracy=float(np.mean(pred == yt_)), num_labels=offset,
              sources=list(sources))
  return bb, info
