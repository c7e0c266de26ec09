"""Bad input, one test per row of the README's robustness table.

Each test drives the user-facing surface (the trained proxy, the ``know2vec`` command); the
unit-level checks behind it are tested where they live, named in each docstring ("also: ...").
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from know2vec_jax import storage
from know2vec_jax.blackbox import (BlackBoxError, CallableBlackBox, InputError,
                                   groups_from_zoo)
from know2vec_jax.cli import main
from know2vec_jax.data import few_shot, load_source
from know2vec_jax.index import IndexStoreError, ModelIndex
from know2vec_jax.proxy import Proxy, ProxyError, query

SHAPE = (28, 28, 1)


def _query(zoo, seed=0, shots=3):
  r = next(iter(zoo.records.values()))
  return few_shot(load_source(r.source), r.task, shots, seed=seed)


def _one_line(capsys, *fragments):
  err = capsys.readouterr().err.strip()
  assert err.startswith("know2vec: error: ") and "\n" not in err and "Traceback" not in err, err
  for f in fragments:
    assert f in err, (f, err)


def _mean_classifier(k, fn=None):
  """A real black box: logits from the mean pixel of each image (optionally post-processed)."""
  def logits(x):
    z = np.stack([x.mean((1, 2, 3)) * (c + 1) for c in range(k)], 1)
    return z if fn is None else fn(z)
  return logits


def test_wrong_image_shape_dtype_or_range(tiny_proxy, tiny_index, tiny_zoo):
  """Also: test_blackbox.py::test_bad_images, test_features_metrics.py::test_bad_queries."""
  x, y = _query(tiny_zoo[0])
  for bad, match in [(np.zeros((len(y), 32, 32, 1), np.float32), r"expected \(28, 28, 1\)"),
                     ((x * 255).astype(np.uint8), "dtype uint8"),
                     (x * 255, r"must lie in \[0, 1\]"),
                     (x[..., 0], "must have shape")]:
    with pytest.raises(InputError, match=match):
      query(tiny_proxy, tiny_index, bad, y)
  other = CallableBlackBox(_mean_classifier(4), 4, (32, 32, 1), model_id="big-images")
  with pytest.raises(ProxyError, match=r"'big-images' takes images of shape \(32, 32, 1\)"):
    tiny_proxy.vectorize(other)


def test_nan_or_inf_in_images(tiny_proxy, tiny_zoo):
  """Also: test_features_metrics.py::test_bad_queries (NaN), test_blackbox.py::test_bad_images."""
  x, y = _query(tiny_zoo[0])
  for value in (np.nan, np.inf, -np.inf):
    bad = x.copy()
    bad[1, 3, 4, 0] = value
    with pytest.raises(InputError, match="query images contain 1 NaN/inf values"):
      tiny_proxy.embed_query(bad, y)
  bb = CallableBlackBox(_mean_classifier(2), 2, SHAPE)
  with pytest.raises(InputError, match="NaN/inf"):
    bb(np.full((2,) + SHAPE, np.nan, np.float32))


def test_black_box_with_nan_logits_or_wrong_output_shape(tiny_proxy, tiny_index, tmp_path):
  """Also: test_blackbox.py::test_misbehaving_black_boxes. The index is left unchanged."""
  index = ModelIndex.load(tiny_index.save(tmp_path / "index"))
  before = index.vectors.copy()

  def nan_on_bright(z):  # finite on most images, NaN on some: found during the pool pass
    return np.where(z[:, :1] > 0.15, np.nan, z)
  cases = [(CallableBlackBox(_mean_classifier(3, nan_on_bright), 3, SHAPE, model_id="nan-box"),
            "'nan-box' returned NaN/inf logits"),
           (CallableBlackBox(_mean_classifier(3, lambda z: z[:, :2]), 3, SHAPE,
                             model_id="short-box"),
            r"'short-box' returned logits of shape \(\d+, 2\) for \d+ images, expected")]
  for bb, match in cases:
    with pytest.raises(BlackBoxError, match=match):
      tiny_proxy.build_index([bb], index=index)
  assert index.ids == tiny_index.ids and np.array_equal(index.vectors, before)


def test_black_box_that_raises(tiny_proxy, tiny_index, tiny_zoo):
  """Also: test_blackbox.py::test_misbehaving_black_boxes. Nothing is added, not even the good
  black boxes of the same call."""
  index = ModelIndex(tiny_proxy.embed_dim)

  def down(x):
    raise ConnectionError("server down")
  good = CallableBlackBox(_mean_classifier(4), 4, SHAPE, model_id="good")
  bad = CallableBlackBox(down, 4, SHAPE, model_id="remote")
  with pytest.raises(BlackBoxError, match=r"\['remote'\]... raised ConnectionError: server down"):
    tiny_proxy.build_index([good, bad], index=index)
  assert len(index) == 0 and good.queries[0] > 0


def test_query_with_fewer_than_two_classes_or_an_empty_class(tiny_proxy, tiny_proxy_dir,
                                                            tiny_index, tiny_zoo, tmp_path,
                                                            capsys):
  """Also: test_features_metrics.py::test_bad_queries, test_data.py::test_folder_errors."""
  x, y = _query(tiny_zoo[0])
  with pytest.raises(InputError, match="at least 2 classes, got 1"):
    tiny_proxy.embed_query(x, np.zeros_like(y))
  with pytest.raises(InputError, match=r"class\(es\) \[1\] have no images"):
    tiny_proxy.embed_query(x, np.where(y == 1, 3, y))
  from PIL import Image
  index = str(tiny_index.save(tmp_path / "index"))
  (tmp_path / "q" / "only").mkdir(parents=True)
  for i in range(3):
    Image.fromarray((x[i, ..., 0] * 255).astype(np.uint8)).save(tmp_path / "q" / "only" /
                                                                 f"{i}.png")
  argv = ["query", "--proxy", str(tiny_proxy_dir), "--index", index, "--images",
          str(tmp_path / "q")]
  assert main(argv) == 2
  _one_line(capsys, "a query needs at least 2 classes, got 1")
  # A second folder: sources are cached by name within a process.
  shutil.copytree(tmp_path / "q", tmp_path / "q2")
  (tmp_path / "q2" / "empty").mkdir()
  assert main(argv[:-1] + [str(tmp_path / "q2")]) == 2
  _one_line(capsys, "class folder", "empty holds no images")


def test_more_classes_than_the_vectorizer_supports(tiny_proxy):
  """Also: test_features_metrics.py::test_too_many_query_classes,
  test_vectorizers.py::test_too_many_classes."""
  k = tiny_proxy.max_classes + 1
  x = np.random.default_rng(0).random((2 * k,) + SHAPE, np.float32)
  with pytest.raises(InputError, match=f"{k} classes, more than the vectorizer's maximum of "
                                       f"{k - 1}"):
    tiny_proxy.embed_query(x, np.arange(2 * k) % k)
  wide = CallableBlackBox(_mean_classifier(12), 12, SHAPE, model_id="wide")
  with pytest.raises(ProxyError, match="'wide' has 12 classes, more than the proxy's maximum"):
    tiny_proxy.vectorize(wide)
  assert wide.queries[0] == 0  # refused before a single call


def test_unknown_model_id(tiny_index, tiny_zoo):
  """Also: test_zoo.py::test_unknown_model_id, test_blackbox.py::test_group_selection_and_
  unknown_ids, test_cli.py::test_command_line_mistakes_are_one_line (index add / remove)."""
  with pytest.raises(IndexStoreError, match="unknown model id 'nope': not in the index"):
    tiny_index.remove(["nope"])
  with pytest.raises(IndexStoreError, match="unknown model id 'nope'"):
    tiny_index.metadata("nope")
  with pytest.raises(InputError, match="unknown model ids: \\['nope'\\]"):
    groups_from_zoo(tiny_zoo[0], model_ids=["nope"])


def test_index_vector_size_does_not_match_the_proxy(tiny_proxy, tiny_proxy_dir, tiny_index,
                                                   tiny_zoo, tmp_path, capsys):
  """Also: test_index.py::test_load_errors (``expected_dim``)."""
  e = tiny_proxy.embed_dim
  small = ModelIndex(16)
  small.add_vectors(["m"], np.ones((1, 16)))
  x, y = _query(tiny_zoo[0])
  msg = f"vectors of size 16 but this proxy's vectorizer makes vectors of size {e}"
  with pytest.raises(ProxyError, match=msg):
    query(tiny_proxy, small, x, y)
  with pytest.raises(ProxyError, match=msg):
    tiny_proxy.build_index([CallableBlackBox(_mean_classifier(2), 2, SHAPE)], index=small)
  path = small.save(tmp_path / "small")
  with pytest.raises(ProxyError, match=msg):
    tiny_proxy.load_index(path)
  assert main(["query", "--proxy", str(tiny_proxy_dir), "--index", str(path), "--task",
               "digits:0,1"]) == 2
  _one_line(capsys, msg)
  # Vectors alone (no class knowledge) while the proxy matches classes: told how to rebuild it.
  bare = ModelIndex(e)
  bare.add_vectors(["x"], np.ones((1, e)))
  with pytest.raises(ProxyError, match="the index holds no class knowledge: rebuild it"):
    query(tiny_proxy, bare, x, y)
  # Same size, another proxy's vectors: refused by the fingerprint each row carries.
  k_max, d, n = tiny_proxy.max_classes, tiny_proxy.backbone.dim, len(tiny_proxy.pool)
  alien = ModelIndex(e)
  alien.add_vectors(["x"], np.ones((1, e)), [{"proxy": "0123456789abcdef"}],
                    classes={"tokens": np.ones((1, k_max, d)), "mask": np.eye(k_max)[:1] + np.eye(
                        k_max)[1:2], "pool_labels": np.zeros((1, n), np.uint8),
                    "hub": np.zeros((1, 4), np.float32)})
  with pytest.raises(ProxyError, match="'x' of the index was vectorized by another proxy"):
    query(tiny_proxy, alien, x, y)
  # Class knowledge of another probe pool: refused before any scoring.
  other = ModelIndex(e)
  other.add_vectors(["x"], np.ones((1, e)), classes={
      "tokens": np.ones((1, k_max, d)), "mask": np.ones((1, k_max)),
      "pool_labels": np.zeros((1, n + 1), np.uint8), "hub": np.zeros((1, 4), np.float32)})
  with pytest.raises(ProxyError, match="class knowledge was made by another proxy"):
    query(tiny_proxy, other, x, y)


def test_truncated_or_corrupted_proxy_file(tiny_proxy_dir, tmp_path):
  """Also: test_index.py::test_load_errors and ::test_damaged_or_missing_vector_checkpoint,
  test_zoo.py::test_incomplete_or_corrupted_zoo_is_refused (zoo), and the aligner checkpoint
  below."""
  def fresh():
    path = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
    shutil.copytree(tiny_proxy_dir, path)
    return path
  p = fresh()
  text = (p / "proxy.json").read_text()
  (p / "proxy.json").write_text(text[:len(text) // 2])
  with pytest.raises(ProxyError, match=re.escape(str(p / "proxy.json")) + " is corrupted"):
    Proxy.load(p)
  (p / "proxy.json").unlink()
  with pytest.raises(ProxyError, match="proxy.json is missing"):
    Proxy.load(p)

  def data_files(root, tree):
    return sorted((f for f in (root / tree).rglob("*") if f.is_file() and f.parent.name == "d"),
                  key=lambda f: -f.stat().st_size)
  # The stored knowledge (a few KB) has no data file big enough to truncate: a record that no
  # longer matches the manifest's checksum stands for its corruption.
  p = fresh()
  m = json.loads((p / "proxy.json").read_text())
  m["checksums"]["knowledge"] = "0" * 64
  m[storage.MANIFEST_CHECKSUM] = storage.manifest_checksum(m)  # the manifest itself holds
  (p / "proxy.json").write_text(json.dumps(m))
  with pytest.raises(ProxyError, match=re.escape(str(p)) + ".*knowledge checkpoint .* does not "
                     "match the checksum"):
    Proxy.load(p)
  for tree in ("vectorizer", "backbone", "pool"):
    p = fresh()
    f = data_files(p, tree)[0]
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])  # truncated
    with pytest.raises(ProxyError, match=re.escape(f"{p}: cannot read the {tree} checkpoint")):
      Proxy.load(p)
    p = fresh()
    f = data_files(p, tree)[0]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size
    f.write_bytes(bytes(raw))
    with pytest.raises(ProxyError, match=re.escape(str(p)) + f".*{tree}"):
      Proxy.load(p)
  p = fresh()
  shutil.rmtree(p / "pool")
  with pytest.raises(ProxyError, match="pool checkpoint missing"):
    Proxy.load(p)
  assert Proxy.load(tiny_proxy_dir).fingerprint  # the original is untouched


def test_truncated_aligner_checkpoint_is_refused(tmp_path):
  """A damaged aligner checkpoint fails the resume with an error naming the file; it is not
  silently restarted from scratch or resumed from garbage."""
  from know2vec_jax import align
  from know2vec_jax.vectorizers import VectorizerConfig
  vcfg = VectorizerConfig(hidden=8, embed_dim=8, heads=2, layers=1)
  cfg = align.AlignConfig(steps=2, batch_size=8, warmup_steps=1, checkpoint_every=2)
  rank = align.RankingObjective()
  rng = np.random.default_rng(0)
  data = align.AlignData(rng.normal(size=(8, 3, 3, 8)).astype(np.float32),
                         np.ones((8, 3), np.float32), np.arange(8, dtype=np.int32) % 4,
                         rng.normal(size=(4, 2, 3, 3, 8)).astype(np.float32),
                         np.ones((4, 3), np.float32))
  align.Trainer(vcfg, 8, cfg, rank, data, checkpoint_dir=tmp_path).run(progress=False)
  for f in tmp_path.rglob("*"):
    if f.is_file() and f.parent.name == "d" and f.stat().st_size > 100:
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
    align.Trainer(vcfg, 8, cfg, rank, data, checkpoint_dir=tmp_path)


def test_save_interrupted_half_way_keeps_the_previous_one(tiny_proxy, tiny_proxy_dir,
                                                          tiny_index, tmp_path, monkeypatch,
                                                          capsys):
  """Also: test_index.py::test_interrupted_save_keeps_previous_index,
  test_zoo.py::test_interrupted_save_leaves_previous_zoo_intact."""
  path = tmp_path / "proxy"
  shutil.copytree(tiny_proxy_dir, path)
  real_save = ocp.StandardCheckpointer.save
  saved = []

  def fail_on_second_tree(self, directory, *args, **kwargs):
    if saved:  # the backbone is written; the write of the vectorizer dies
      raise OSError("disk full")
    saved.append(directory)
    return real_save(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail_on_second_tree)
  with pytest.raises(OSError, match="disk full"):
    tiny_proxy.save(path)
  monkeypatch.undo()
  assert saved and sorted(os.listdir(tmp_path)) == ["proxy"]  # no staging directory left
  assert Proxy.load(path).fingerprint == tiny_proxy.fingerprint

  # An `index remove` killed while writing: the command says so, the index keeps every model.
  index = tiny_index.save(tmp_path / "index")

  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(storage, "write_json_atomic", killed)
  assert main(["index", "remove", "--index", str(index), tiny_index.ids[0]]) == 130
  assert "interrupted" in capsys.readouterr().err
  monkeypatch.undo()
  assert ModelIndex.load(index).ids == tiny_index.ids


def test_missing_dataset_directory(tiny_proxy_dir, tiny_index, tmp_path, capsys):
  """Also: test_data.py::test_missing_fashion_directory_names_the_install_command,
  ::test_folder_errors, ::test_tfds_not_prepared_is_a_clear_error_not_a_download."""
  nowhere = str(tmp_path / "nowhere")
  assert main(["data", "show", "fashion_mnist", "--data-dir", nowhere]) == 2
  _one_line(capsys, "Fashion-MNIST not found in", nowhere, "apt-get install dataset-fashion-mnist")
  # A path long enough to overflow the error line still leaves the install command on it.
  deep = str(tmp_path / ("d" * 200) / ("e" * 200))
  assert main(["data", "show", "fashion_mnist", "--data-dir", deep]) == 2
  _one_line(capsys, "Fashion-MNIST not found in", " ... ", "apt-get install dataset-fashion-mnist")
  index = str(tiny_index.save(tmp_path / "index"))
  assert main(["query", "--proxy", str(tiny_proxy_dir), "--index", index, "--task",
               "fashion_mnist:0,1", "--data-dir", nowhere]) == 2
  _one_line(capsys, "Fashion-MNIST not found in")
  assert main(["query", "--proxy", str(tiny_proxy_dir), "--index", index, "--images",
               nowhere]) == 2
  _one_line(capsys, f"image folder {nowhere} does not exist")


def test_saved_index_holds_no_model_parameters(tiny_proxy, tiny_index, tiny_zoo, tmp_path):
  """Also: test_index.py::test_saved_index_holds_only_vectors_and_json (synthetic vectors)."""
  zoo = tiny_zoo[0]
  path = tiny_index.save(tmp_path / "index")
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.metadata(path / "vectors").item_metadata.tree
    saved = ckpt.restore(path / "vectors")
  assert list(tree) == ["vectors"]
  assert tuple(tree["vectors"].shape) == (len(zoo), tiny_proxy.embed_dim)
  index_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
  param_leaves = [np.asarray(a) for s in zoo.stacks.values() for a in jax.tree.leaves(s.params)]
  param_bytes = sum(a.nbytes for a in param_leaves)
  assert index_bytes * 50 < param_bytes, (index_bytes, param_bytes)
  per_model = [a[i] for a in param_leaves for i in range(a.shape[0])]
  vectors = np.asarray(saved["vectors"])
  e = vectors.shape[1]
  for p in param_leaves + per_model:
    assert not (p.shape == vectors.shape and np.array_equal(p, vectors))
  for p in param_leaves:  # no row of the index is a run of a parameter tensor's values either
    flat = p.reshape(-1)
    for v in vectors:
      starts = np.flatnonzero(flat[:max(flat.size - e + 1, 0)] == v[0])
      assert not any(np.array_equal(flat[s:s + e], v) for s in starts)
  # The metadata is a few scalars and names per model, no arrays.
  for mid in tiny_index.ids:
    meta = tiny_index.metadata(mid)
    assert all(not isinstance(v, list) or len(v) <= 10 for v in meta.values())
