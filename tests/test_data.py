"""Data sources and task sampling, on the real offline data."""

import numpy as np
import pytest

from know2vec_jax import data
from know2vec_jax.data import DataError, load_source, make_task, sample_tasks, task_split
from know2vec_jax.data.sources import SourceData, _stratified_split


@pytest.mark.parametrize("name,n_train,n_test", [
    ("fashion_mnist", 60000, 10000), ("mnist5k", 3500, 1500), ("digits", 1258, 539)])
def test_builtin_sources_load_real_images(name, n_train, n_test):
  src = load_source(name)
  assert src.train_images.shape == (n_train, 28, 28, 1)
  assert src.test_images.shape == (n_test, 28, 28, 1)
  assert src.train_images.dtype == np.float32
  assert 0.0 <= src.train_images.min() and src.train_images.max() <= 1.0
  assert src.num_classes == 10
  for labels in (src.train_labels, src.test_labels):
    assert labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(10))
  # Real images, not blanks: a decent fraction of ink and variety between images.
  assert 0.05 < src.train_images.mean() < 0.6
  assert src.train_images[:100].std(axis=0).mean() > 0.05


def test_fashion_mnist_class_names_and_balance():
  src = load_source("fashion_mnist")
  assert src.class_names[0] == "t-shirt/top" and src.class_names[9] == "ankle boot"
  assert np.all(np.bincount(src.test_labels) == 1000)


def test_common_size_and_channels():
  src = load_source("digits", image_size=16, channels=3)
  assert src.train_images.shape[1:] == (16, 16, 3)
  assert np.allclose(src.train_images[..., 0], src.train_images[..., 2])


def test_transforms_make_new_domains():
  base = load_source("mnist5k")
  inv = load_source("mnist5k+invert")
  rot = load_source("mnist5k+rot90")
  blur = load_source("mnist5k+blur")
  np.testing.assert_allclose(inv.train_images, 1.0 - base.train_images, atol=1e-6)
  np.testing.assert_array_equal(rot.train_images[0, :, :, 0], np.rot90(base.train_images[0, :, :, 0]))
  assert blur.train_images.std() < base.train_images.std()
  assert inv.class_names == base.class_names
  np.testing.assert_array_equal(inv.test_labels, base.test_labels)


def test_unknown_source_and_transform():
  with pytest.raises(DataError, match="unknown source"):
    load_source("imagenet")
  with pytest.raises(DataError, match="unknown transform 'sepia'"):
    load_source("mnist5k+sepia")


def test_missing_fashion_directory_names_the_install_command(tmp_path):
  with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
    load_source("fashion_mnist", data_dir=tmp_path / "nowhere")


def test_truncated_idx_file(tmp_path):
  import gzip
  import shutil
  for f in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    shutil.copy(f"/usr/share/datasets/fashion-mnist/{f}", tmp_path / f)
  with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as out:
    out.write(bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 +
              bytes(1000))
  with pytest.raises(DataError, match="truncated"):
    load_source("fashion_mnist", data_dir=tmp_path)


def test_folder_source(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for cls, value in (("cat", 40), ("dog", 200)):
    (tmp_path / cls).mkdir()
    for i in range(5):
      arr = np.clip(rng.normal(value, 5, (20, 30, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
  src = load_source(f"folder:{tmp_path}")
  assert src.class_names == ("cat", "dog")
  assert src.train_images.shape[1:] == (28, 28, 1)
  assert len(src.train_labels) + len(src.test_labels) == 10
  images = np.concatenate([src.train_images, src.test_images])
  labels = np.concatenate([src.train_labels, src.test_labels])
  assert images[labels == 0].mean() < 0.3 < 0.6 < images[labels == 1].mean()


def test_folder_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    load_source(f"folder:{tmp_path / 'missing'}")
  with pytest.raises(DataError, match="no class sub-folders"):
    load_source(f"folder:{tmp_path}")
  (tmp_path / "empty_class").mkdir()
  with pytest.raises(DataError, match="holds no images"):
    load_source(f"folder:{tmp_path}")


def test_tfds_not_prepared_is_a_clear_error_not_a_download(tmp_path):
  with pytest.raises(DataError, match="not prepared"):
    load_source("tfds:mnist", data_dir=tmp_path)
  assert not any(tmp_path.rglob("*.tfrecord*")) and not any(tmp_path.rglob("*.array_record*"))


def test_stratified_split_is_fixed_disjoint_and_complete():
  labels = np.repeat(np.arange(5), 20)
  tr, te = _stratified_split(labels)
  tr2, te2 = _stratified_split(labels)
  np.testing.assert_array_equal(tr, tr2)
  assert set(tr).isdisjoint(te) and len(tr) + len(te) == len(labels)
  assert np.all(np.bincount(labels[te]) == 6)


def test_task_sampling_is_deterministic():
  src = load_source("fashion_mnist")
  a = sample_tasks(src, 4, 10, seed=3)
  b = sample_tasks(src, 4, 10, seed=3)
  c = sample_tasks(src, 4, 10, seed=4)
  assert a == b and a != c
  assert len({t.classes for t in a}) == 10
  assert all(t.k == 4 and len(set(t.classes)) == 4 for t in a)


def test_task_splits_are_disjoint_and_relabelled():
  src = load_source("mnist5k")
  (task,) = sample_tasks(src, 4, 1, seed=0)
  tr_idx, tr_y = task_split(src, task, "train")
  te_idx, te_y = task_split(src, task, "test")
  assert set(np.unique(tr_y)) == set(np.unique(te_y)) == {0, 1, 2, 3}
  np.testing.assert_array_equal(src.train_labels[tr_idx], np.asarray(task.classes)[tr_y])
  # The two splits hold different images (no held-out image also appears in training).
  tr_img = {src.train_images[i].tobytes() for i in tr_idx}
  assert not any(src.test_images[i].tobytes() in tr_img for i in te_idx)


def test_few_shot_is_deterministic_and_balanced():
  src = load_source("digits")
  task = make_task(src, ["1", "3", "7"])
  x1, y1 = data.few_shot(src, task, 5, seed=1)
  x2, _ = data.few_shot(src, task, 5, seed=1)
  assert x1.shape == (15, 28, 28, 1) and list(np.bincount(y1)) == [5, 5, 5]
  np.testing.assert_array_equal(x1, x2)
  with pytest.raises(DataError, match="fewer than shots"):
    data.few_shot(src, task, 500, seed=1)


def test_bad_task_requests():
  src = load_source("digits")
  with pytest.raises(DataError, match="larger than the 10 classes"):
    sample_tasks(src, 11, 1)
  with pytest.raises(DataError, match="k must be >= 2"):
    sample_tasks(src, 1, 1)
  with pytest.raises(DataError, match="only C\\(10,9\\) = 10"):
    sample_tasks(src, 9, 11)
  with pytest.raises(DataError, match="unknown class 'zebra'"):
    make_task(src, ["1", "zebra"])
  with pytest.raises(DataError, match="at least 2 classes"):
    make_task(src, ["1"])
  empty = SourceData("toy", ("a", "b", "c"), src.train_images[:4], np.asarray([0, 1, 0, 1]),
                     src.test_images[:4], np.asarray([0, 1, 2, 1]))
  with pytest.raises(DataError, match="'c' of source 'toy' has no images in the train split"):
    make_task(empty, ["a", "c"])
