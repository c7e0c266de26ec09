"""The feature backbone phi: one frozen Flax image encoder shared by the model and query sides.

The paper uses an ImageNet ResNet-18's output. Offline, phi is a CNN (the zoo's ``cnn_l`` body,
128-d features) trained once, from two kinds of data a proxy owns:

- **labelled**: the (source domain, class) pairs of the proxy's *training tasks* only, on their
  train splits. A class or source that no training model has is never a label of phi, so a
  user's new classes and new kinds of image are as new to phi as to the aligner. Keeping the
  domain in the label keeps domain information in the features, which retrieval needs to tell
  apart models that share a class set but not a domain.
- **unlabelled**: the probe pool, through a contrastive (SimCLR, Chen et al. 2020, NT-Xent) loss
  between two random views of each image (``ssl_weight``): structure in images whose labels
  nobody gave, e.g. a broad pool's images of domains no training model covers.

phi is saved with orbax and frozen afterwards; what it learned from is recorded in its info
(``labels``: the (source, class) names; ``unlabelled``: how many pool images).
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
from know2vec_jax import shapes, storage
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
    sources: the sources (domains included) whose train splits phi learns every class of; empty:
      the (source, class) pairs of the tasks a proxy is trained on.
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
    labelled: learn the (source, class) labels of the proxy's training tasks (False: phi
      learns from the unlabelled images alone, with ``ssl_weight`` > 0).
    ssl_weight: weight of the contrastive loss on the unlabelled images (the probe pool) beside
      the labelled cross-entropy (0: labels only; with no labelled image, contrastive only).
    ssl_batch: unlabelled images per step (each seen in two views).
    ssl_temperature: the NT-Xent temperature.
    ssl_zoom: the largest zoom (crop) factor of a contrastive view; its other nuisances are the
      ``aug_*`` ranges above.
    ssl_projection: the projection head's output size (the head is dropped after training).
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
  labelled: bool = True
  ssl_weight: float = 0.0
  ssl_batch: int = 128
  ssl_temperature: float = 0.2
  ssl_zoom: float = 1.4
  ssl_projection: int = 64

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
    require(self.ssl_weight >= 0, f"backbone ssl_weight must be >= 0, got {self.ssl_weight}")
    require(self.labelled or self.ssl_weight > 0, "a backbone with labelled=false learns from "
            "the contrastive loss alone: set ssl_weight > 0")
    require(self.ssl_batch >= 2 and self.ssl_projection >= 1,
            f"backbone ssl_batch must be >= 2 and ssl_projection >= 1, got {self.ssl_batch}, "
            f"{self.ssl_projection}")
    require(self.ssl_temperature > 0, f"backbone ssl_temperature must be > 0, got "
            f"{self.ssl_temperature}")
    require(self.ssl_zoom >= 1.0, f"backbone ssl_zoom must be >= 1, got {self.ssl_zoom}")
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

    def make():
      return CNN(self.num_labels, image_shape=self.image_shape, channels=config.channels,
                 strides=config.strides, hidden=config.dim, rngs=nnx.Rngs(params=config.seed))
    # Given parameters, the model is only traced for its structure: initialising it would compile
    # a random-number program per kernel shape (seconds each on a CPU) for values thrown away.
    model = make() if params is None else nnx.eval_shape(make)
    self.graphdef, state = nnx.split(model)
    self.params = state if params is None else params

  @property
  def dim(self) -> int:
    return self.config.dim

  @functools.cached_property
  def fingerprint(self) -> str:
    """A short hash of phi's parameters: features of two backbones with one fingerprint agree."""
    return storage.checksum(storage.pure(self.params))[:16]

  def _trunk(self) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) that embed with: phi's own parameters, its (domain, class) head
    swapped for a one-output placeholder. Embedding never reads the head, and so one compilation
    serves every phi of one architecture, whatever its number of labels (each training of an
    experiment's folds has its own)."""
    graphdef, head = _trunk_template(self.config.channels, self.config.strides, self.config.dim,
                                     self.image_shape)
    return graphdef, nnx.State({k: head if k == "head" else self.params[k]
                                for k in self.params.keys()})

  def embed(self, images, batch_size: int = 2048) -> jax.Array:
    """L2-normalised features of float32 images [..., H, W, C] -> [..., D]."""
    # Host images stay on the host until the jitted call (sliced and padded there: each eager
    # device op costs a dispatch, most of a small query's time on a CPU).
    images = (np.asarray(images, np.float32) if not isinstance(images, jax.Array)
              else images.astype(jnp.float32))
    lead = images.shape[:-3]
    flat = images.reshape((-1,) + images.shape[-3:])
    outs = []
    trunk_def, trunk = self._trunk()
    for i in range(0, len(flat), batch_size):
      chunk = flat[i:i + batch_size]
      # Chunks padded to a power of two: few compilations whatever the number of images.
      size = shapes.bucket(len(chunk), batch_size, floor=32)
      got = _embed(trunk_def, trunk, shapes.pad_rows(chunk, size), self.config.centre)
      outs.append(got if size == len(chunk) else got[:len(chunk)])
    out = (outs[0] if len(outs) == 1 else jnp.concatenate(outs) if outs
           else jnp.zeros((0, self.dim)))
    return out.reshape(lead + (self.dim,)) if out.shape[:-1] != lead else out

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
      bb = cls.abstract(config_lib.from_dict(BackboneConfig, meta["config"], "backbone config"),
                        meta["image_shape"], meta["num_labels"])
    except (KeyError, TypeError, ValueError) as e:
      raise BackboneError(f"{root / MANIFEST} is corrupted: {type(e).__name__}: {e}") from e
    restored = storage.restore_trees(root, meta, {"params": storage.pure(bb.params)},
                                     "backbone", BackboneError)
    nnx.replace_by_pure_dict(bb.params, restored["params"])
    return bb

  @classmethod
  def abstract(cls, config: BackboneConfig, image_shape, num_labels: int) -> "Backbone":
    """A phi whose parameters are shapes only (``jax.ShapeDtypeStruct``), nothing initialised:
    the target a restore fills in (:func:`flax.nnx.replace_by_pure_dict`)."""
    shapes_only = nnx.eval_shape(lambda: nnx.state(CNN(
        int(num_labels), image_shape=tuple(int(d) for d in image_shape),
        channels=config.channels, strides=config.strides, hidden=config.dim,
        rngs=nnx.Rngs(params=config.seed))))
    return cls(config, image_shape, num_labels, params=shapes_only)


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


@functools.lru_cache(maxsize=None)
def _trunk_template(channels, strides, dim, image_shape) -> tuple[nnx.GraphDef, nnx.State]:
  """The graphdef of a phi with a one-output head and that head's (zero) parameters."""
  model = nnx.eval_shape(lambda: CNN(1, image_shape=image_shape, channels=channels,
                                     strides=strides, hidden=dim, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(model)
  return graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state["head"])


@functools.partial(jax.jit, static_argnames=("graphdef", "centred"))
def _embed(graphdef, params, images, centred=False):
  if centred:
    images = centre(images)
  f = nnx.merge(graphdef, params).features(images)
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-6)


def warp(images: jax.Array, angle: jax.Array, shift: jax.Array,
         zoom: jax.Array | None = None) -> jax.Array:
  """Rotates each image about its centre, zooms and translates it (bilinear, border repeated;
  jittable).

  Args:
    images: float32 [B, H, W, C].
    angle: [B] radians, counter-clockwise as displayed (row 0 at the top).
    shift: [B, 2] (down, right) pixels.
    zoom: [B] magnification about the centre (> 1 crops in), or None (1).

  Returns:
    float32 [B, H, W, C]: what :func:`know2vec_jax.data.perturb.perturb`'s ``rotate`` and
    ``shift`` give for the same amounts.
  """
  b, h, w, c = images.shape
  zoom = jnp.ones((b,), jnp.float32) if zoom is None else zoom
  ci, cj = (h - 1) / 2.0, (w - 1) / 2.0
  gi, gj = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")

  def one(img, a, t, z):
    # Output pixel p reads the input at R(-a) (p - centre - t) / z + centre, where R(a) turns
    # (row, col) offsets counter-clockwise as displayed: right (0, 1) to up (-1, 0).
    di, dj = (gi - ci - t[0]) / z, (gj - cj - t[1]) / z
    si = jnp.cos(a) * di + jnp.sin(a) * dj + ci
    sj = jnp.cos(a) * dj - jnp.sin(a) * di + cj
    return jnp.stack([jax.scipy.ndimage.map_coordinates(img[..., ch], [si, sj], order=1,
                                                        mode="nearest") for ch in range(c)], -1)

  return jax.vmap(one)(images, angle, shift, zoom)


def augment(key: jax.Array, images: jax.Array, config: BackboneConfig,
            max_zoom: float = 1.0) -> jax.Array:
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
    max_zoom: also zoom in by a factor uniform in [1, max_zoom] (a random crop; 1: none).

  Returns:
    float32 [B, H, W, C].
  """
  b = images.shape[0]
  ks = jax.random.split(key, 8)
  on = jax.random.bernoulli(ks[0], config.augment, (b,))
  angle = jnp.deg2rad(jax.random.uniform(ks[1], (b,), minval=-config.aug_rotate,
                                         maxval=config.aug_rotate))
  shift = jax.random.uniform(ks[2], (b, 2), minval=-config.aug_shift, maxval=config.aug_shift)
  zoom = (None if max_zoom == 1.0 else
          jax.random.uniform(ks[7], (b,), minval=1.0, maxval=max_zoom))
  x = warp(images, angle, shift, zoom)
  contrast = jax.random.uniform(ks[3], (b, 1, 1, 1), minval=config.aug_contrast[0],
                                maxval=config.aug_contrast[1])
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  x = mean + contrast * (x - mean)
  x = x * jax.random.uniform(ks[4], (b, 1, 1, 1), minval=config.aug_brightness[0],
                             maxval=config.aug_brightness[1])
  sigma = jax.random.uniform(ks[5], (b, 1, 1, 1), maxval=config.aug_noise)
  x = jnp.clip(x + sigma * jax.random.normal(ks[6], x.shape), 0.0, 1.0)
  return jnp.where(on[:, None, None, None], x, images)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's normalised temperature-scaled cross-entropy (Chen et al., ICML 2020, eq. 1).

  Each of the 2B views must pick its partner (the other view of the same image) among the other
  2B - 1 views by cosine / temperature.

  Args:
    z1, z2: float [B, P], the two views' projections (row i of each: the same image).
    temperature: tau > 0.

  Returns:
    The mean loss over the 2B views (a scalar).
  """
  b = z1.shape[0]
  z = jnp.concatenate([z1, z2])
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
  sim = (z @ z.T) / temperature
  sim = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, sim)
  partner = jnp.concatenate([jnp.arange(b) + b, jnp.arange(b)])
  return optax.softmax_cross_entropy_with_integer_labels(sim, partner).mean()


class _Projection(nnx.Module):
  """SimCLR's projection head g(h): the contrastive loss reads g(phi(x)), phi keeps h."""

  def __init__(self, dim: int, out: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, out, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.hidden(h)))


def labelled_data(config: BackboneConfig, sources=(), image_shape=(28, 28, 1),
                  classes: "dict[str, list[int]] | None" = None):
  """The labelled images phi learns from: train splits, one label per (source, class).

  Args:
    config: ``sources`` (every class of each) when set; ``max_per_source`` images per source at
      most; ``seed``.
    sources: the sources when ``config.sources`` is empty and ``classes`` is None.
    image_shape: (H, W, C).
    classes: source -> the classes of it phi learns (the training tasks' classes), used when
      ``config.sources`` is empty.

  Returns:
    (train images float32 [N, H, W, C], labels int32 [N], test images, test labels (at most 500
    per source, a check that phi learned), label names ``"source:class name"``).
  """
  h, _, c = image_shape
  if config.sources or classes is None:
    classes = {s: None for s in (config.sources or sources)}
  rng = np.random.default_rng(config.seed)
  xs, ys, xt, yt, names = [], [], [], [], []
  for s in sorted(classes):
    d = load_source(s, image_size=h, channels=c)
    keep = list(range(d.num_classes)) if classes[s] is None else sorted(
        {int(k) for k in classes[s]})
    lookup = np.full(d.num_classes, -1, np.int64)
    lookup[keep] = np.arange(len(keep)) + len(names)
    names += [f"{s}:{d.class_names[k]}" for k in keep]
    idx = np.flatnonzero(lookup[d.train_labels] >= 0)
    sel = idx[rng.permutation(len(idx))[:config.max_per_source]]
    xs.append(d.train_images[sel])
    ys.append(lookup[d.train_labels[sel]])
    tidx = np.flatnonzero(lookup[d.test_labels] >= 0)
    tsel = tidx[rng.permutation(len(tidx))[:500]]
    xt.append(d.test_images[tsel])
    yt.append(lookup[d.test_labels[tsel]])
  shape = (0,) + tuple(image_shape)
  cat = lambda parts, empty: np.concatenate(parts) if parts else empty  # noqa: E731
  return (cat(xs, np.zeros(shape, np.float32)), cat(ys, np.zeros(0, np.int64)).astype(np.int32),
          cat(xt, np.zeros(shape, np.float32)), cat(yt, np.zeros(0, np.int64)).astype(np.int32),
          names)


def train_backbone(config: BackboneConfig, sources=(), image_shape=(28, 28, 1),
                   progress: bool = True, *, classes: "dict[str, list[int]] | None" = None,
                   unlabelled: np.ndarray | None = None) -> tuple[Backbone, dict]:
  """Trains phi on labelled (source, class) train splits and, with ``ssl_weight``, unlabelled
  images (:func:`labelled_data`, then :func:`fit_backbone`).

  Args:
    config: the architecture, training budget and losses.
    sources: every class of these sources, when ``config.sources`` is empty and ``classes`` is
      None.
    image_shape: (H, W, C), square images.
    progress: a tqdm bar.
    classes: source -> the classes phi learns of it (a proxy passes its training tasks').
    unlabelled: float32 [N, H, W, C] images for the contrastive loss (a proxy passes its pool).

  Returns:
    (the frozen backbone, info: seconds, final loss, held-out accuracy on the labelled classes'
    test images (a check that phi learned, never used for selection; None without labels),
    sources, ``labels`` (the label names), ``unlabelled`` (how many images)).

  Raises:
    BackboneError: nothing to learn from, or non-square images.
  """
  h, w, _ = image_shape
  if h != w:
    raise BackboneError(f"backbone images must be square, got {tuple(image_shape)}")
  x, y, xt, yt, names = labelled_data(config, sources, image_shape, classes)
  bb, info = fit_backbone(config, image_shape, x, y, len(names), unlabelled, xt, yt, progress)
  info["sources"] = sorted({n.split(":", 1)[0] for n in names})
  info["labels"] = names
  return bb, info


def _optimizer(config: BackboneConfig) -> optax.GradientTransformation:
  # 50 warm-up steps, or half the budget when it is shorter (optax needs decay > warm-up).
  warmup = min(50, max(config.steps // 2, 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                                max(config.steps, warmup + 1),
                                                0.02 * config.learning_rate)
  return optax.adam(schedule)


@functools.partial(jax.jit, donate_argnums=(0, 1),
                   static_argnames=("graphdef", "proj_def", "config", "use_ce", "use_ssl"))
def _fit_steps(params, opt_state, key, n, x, y, u, *, graphdef, proj_def, config, use_ce,
               use_ssl):
  """``n`` Adam steps of phi's loss (a pure function of its inputs, jitted once per shape and
  setting): cross-entropy on labelled images ``x, y`` and NT-Xent on two views of unlabelled
  ``u``. Returns (params, opt_state, the last step's loss)."""
  tx = _optimizer(config)
  views_cfg = dataclasses.replace(config, augment=1.0)
  view = centre if config.centre else (lambda a: a)

  def loss_fn(p, key):
    k_idx, k_aug, k_u, k_v1, k_v2 = jax.random.split(key, 5)
    model = nnx.merge(graphdef, p[0])
    loss = jnp.zeros(())
    if use_ce:
      idx = jax.random.randint(k_idx, (config.batch_size,), 0, len(y))
      xb = x[idx] if config.augment == 0 else augment(k_aug, x[idx], config)
      loss = optax.softmax_cross_entropy_with_integer_labels(model(view(xb)), y[idx]).mean()
    if use_ssl:
      ub = u[jax.random.randint(k_u, (config.ssl_batch,), 0, len(u))]
      head = nnx.merge(proj_def, p[1])
      z1 = head(model.features(view(augment(k_v1, ub, views_cfg, config.ssl_zoom))))
      z2 = head(model.features(view(augment(k_v2, ub, views_cfg, config.ssl_zoom))))
      loss = loss + config.ssl_weight * nt_xent(z1, z2, config.ssl_temperature)
    return loss

  def body(i, carry):
    p, o, _ = carry
    loss, g = jax.value_and_grad(loss_fn)(p, jax.random.fold_in(key, i))
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss
  return jax.lax.fori_loop(0, n, body, (params, opt_state, jnp.zeros(())))


def fit_backbone(config: BackboneConfig, image_shape, images: np.ndarray, labels: np.ndarray,
                 num_labels: int, unlabelled: np.ndarray | None = None,
                 test_images: np.ndarray | None = None, test_labels: np.ndarray | None = None,
                 progress: bool = True) -> tuple[Backbone, dict]:
  """Trains phi from arrays: cross-entropy on the labelled images plus ``ssl_weight`` times
  NT-Xent (:func:`nt_xent`) between two random views (:func:`augment` with every nuisance on and
  a zoom up to ``ssl_zoom``) of unlabelled images, Adam with warm-up and cosine decay.

  Args:
    config: the architecture and training settings.
    image_shape: (H, W, C).
    images, labels: float32 [N, H, W, C] and int [N] in 0..num_labels-1 (N may be 0).
    num_labels: the labelled head's outputs.
    unlabelled: float32 [U, H, W, C] or None.
    test_images, test_labels: a held-out check of the labelled head (optional).
    progress: a tqdm bar.

  Returns:
    (the frozen backbone, info: seconds, final loss, held-out accuracy or None, unlabelled).

  Raises:
    BackboneError: neither labelled images nor (with ssl_weight > 0) unlabelled ones.
  """
  t0 = time.perf_counter()
  use_ce = len(images) > 0
  use_ssl = bool(config.ssl_weight) and unlabelled is not None and len(unlabelled) > 1
  if not (use_ce or use_ssl):
    raise BackboneError("the backbone has nothing to learn from: no labelled image, and no "
                        "unlabelled image with ssl_weight > 0")
  bb = Backbone(config, image_shape, max(int(num_labels), 1))
  proj = _Projection(config.dim, config.ssl_projection, nnx.Rngs(config.seed + 1))
  proj_def, proj_params = nnx.split(proj)
  x = jax.device_put(np.asarray(images, np.float32)) if use_ce else None
  y = jax.device_put(np.asarray(labels, np.int32)) if use_ce else None
  u = jax.device_put(np.asarray(unlabelled, np.float32)) if use_ssl else None
  tx = _optimizer(config)
  params = (bb.params, proj_params)
  opt_state = tx.init(params)
  # The seed enters only through the key and the initial parameters: backbones that differ in it
  # alone (and in the sources, already read) share the compiled loop.
  static = dict(graphdef=bb.graphdef, proj_def=proj_def, use_ce=use_ce, use_ssl=use_ssl,
                config=dataclasses.replace(config, seed=0, sources=()))

  def run(params, opt_state, key, n):
    return _fit_steps(params, opt_state, key, n, x, y, u, **static)

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
  bb.params = params[0]
  accuracy = None
  if use_ce and test_images is not None and len(test_images):
    model = nnx.merge(bb.graphdef, bb.params)
    view = jax.jit(centre) if config.centre else (lambda a: a)
    pred = np.concatenate([np.asarray(jnp.argmax(model(view(test_images[i:i + 1024])), -1))
                           for i in range(0, len(test_images), 1024)])
    accuracy = float(np.mean(pred == test_labels))
  info = dict(seconds=time.perf_counter() - t0, final_loss=float(loss),
              heldout_accuracy=accuracy, num_labels=int(num_labels),
              unlabelled=int(len(unlabelled)) if use_ssl else 0)
  return bb, info
