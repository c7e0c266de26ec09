"""ModelIndex: exact top-k search (1 device and sharded), mutation, errors, atomic storage."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from know2vec_jax import storage
from know2vec_jax.index import IndexStoreError, ModelIndex

E = 16
# conftest forces 8 CPU devices; on a machine whose default backend has fewer, skip the sharded
# checks rather than test a different layout.
needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (see conftest.py)")
SHARDED = [False, pytest.param(True, marks=needs8)]


def _data(m, seed=0, dim=E):
  rng = np.random.default_rng(seed)
  return [f"model-{i:03d}" for i in range(m)], rng.standard_normal((m, dim)).astype(np.float32)


def _index(m, seed=0, **kwargs):
  ids, vecs = _data(m, seed)
  idx = ModelIndex(E, **kwargs)
  idx.add_vectors(ids, vecs, [{"row": i, "task": f"t{i % 3}"} for i in range(m)])
  return idx


def _reference(idx, queries, k):
  """numpy top-k by float64 dot product; asserts the data has no near-ties up to rank k."""
  scores = np.atleast_2d(queries).astype(np.float64) @ idx.vectors.astype(np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")
  top = np.take_along_axis(scores, order, axis=1)[:, :min(k + 1, scores.shape[1])]
  # Gaps far above float32 rounding: the expected order is unambiguous.
  assert top.shape[1] < 2 or np.min(-np.diff(top, axis=1)) > 1e-5
  kk = min(k, scores.shape[1])
  return top[:, :kk], [[idx.ids[j] for j in row[:kk]] for row in order]


def _one_device(**kwargs):
  return dict(devices=jax.devices()[:1], **kwargs)


@pytest.mark.parametrize("sharded", SHARDED)
def test_search_matches_numpy_topk(sharded):
  idx = _index(203, **({"shard_min_rows": 1} if sharded else _one_device()))
  assert idx.num_shards == (8 if sharded else 1)
  q = np.random.default_rng(1).standard_normal(E).astype(np.float32)
  scores, ids = idx.search(q, k=10)
  ref_scores, ref_ids = _reference(idx, q, 10)
  assert scores.shape == (1, 10) and scores.dtype == np.float32
  assert ids == ref_ids
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
  assert np.all(np.diff(scores, axis=1) < 0)  # strictly best first


def test_batched_queries_equal_single_queries():
  idx = _index(150, **_one_device())
  q = np.random.default_rng(2).standard_normal((6, E)).astype(np.float32)
  scores, ids = idx.search(q, k=5)
  ref_scores, ref_ids = _reference(idx, q, 5)
  assert scores.shape == (6, 5) and ids == ref_ids
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
  for i in range(6):
    s, one = idx.search(q[i], k=5)
    assert one[0] == ids[i]
    np.testing.assert_allclose(s[0], scores[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sharded", SHARDED)
def test_k_larger_than_index_returns_every_model_sorted(sharded):
  idx = _index(11, **({"shard_min_rows": 1} if sharded else _one_device()))
  q = np.random.default_rng(3).standard_normal((2, E)).astype(np.float32)
  scores, ids = idx.search(q, k=50)
  assert scores.shape == (2, 11)
  assert all(sorted(row) == sorted(idx.ids) for row in ids)  # padding rows never come back
  assert np.all(np.isfinite(scores)) and np.all(np.diff(scores, axis=1) <= 0)
  assert ids == _reference(idx, q, 50)[1]


def test_empty_index_search():
  scores, ids = ModelIndex(E).search(np.ones((3, E), np.float32), k=4)
  assert scores.shape == (3, 0) and ids == [[], [], []]


@needs8
def test_one_vs_eight_devices_identical():
  ids, vecs = _data(1001, seed=4)  # not a multiple of 8: exercises the padded rows
  q = np.random.default_rng(5).standard_normal((9, E)).astype(np.float32)
  one = ModelIndex(E, **_one_device())
  eight = ModelIndex(E, devices=jax.devices()[:8], shard_min_rows=1)
  for idx in (one, eight):
    idx.add_vectors(ids, vecs)
  assert one.num_shards == 1 and eight.num_shards == 8
  placed = eight._device_state or eight._place()
  assert len(placed[0].sharding.device_set) == 8 and placed[0].shape[0] == 1008
  for k in (1, 7, 200):
    s1, i1 = one.search(q, k)
    s8, i8 = eight.search(q, k)
    assert i1 == i8
    np.testing.assert_allclose(s1, s8, rtol=1e-6, atol=1e-6)


@needs8
def test_sharding_threshold_and_default_devices():
  small = _index(20)
  big = _index(20, shard_min_rows=20)
  assert small.num_shards == 1  # below SHARD_MIN_ROWS one device answers
  assert big.num_shards == jax.device_count() == 8


@needs8
def test_bfloat16_device_copy_scores_in_float32():
  idx32 = _index(300, **_one_device())
  idx16 = _index(300, dtype="bfloat16", shard_min_rows=1)
  q = np.random.default_rng(6).standard_normal((4, E)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  s32, i32 = idx32.search(q, 3)
  s16, i16 = idx16.search(q, 3)
  assert s16.dtype == np.float32 and idx16.dtype == "bfloat16"
  np.testing.assert_allclose(s16, s32, atol=2e-2)
  assert [r[0] for r in i16] == [r[0] for r in i32]
  assert idx16.vectors.dtype == np.float32  # the stored copy stays float32


@needs8
def test_device_copy_is_cached_and_invalidated():
  idx = _index(40, shard_min_rows=1)
  calls = []
  original = idx._place
  idx._place = lambda: calls.append(1) or original()
  q = np.ones(E, np.float32)
  idx.search(q, 3)
  cached = idx._device_state[0]
  with jax.transfer_guard_host_to_device("disallow"):  # queries go explicitly; nothing implicit
    idx.search(q, 3)
  assert len(calls) == 1 and idx._device_state[0] is cached
  idx.add_vectors(["new"], np.full((1, E), 3.0, np.float32))
  assert idx.search(q, 1)[1] == [["new"]] and len(calls) == 2
  idx.remove("new")
  assert idx.search(q, 1)[1] != [["new"]] and len(calls) == 3


def test_add_remove_keep_order_and_metadata():
  idx = ModelIndex(E)
  ids, vecs = _data(6)
  idx.add_vectors(ids[:4], vecs[:4] * 7.0, [{"i": i} for i in range(4)])
  idx.add_vectors(ids[4:], vecs[4:])
  assert idx.ids == ids and len(idx) == 6 and idx.dim == E
  np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(idx.vectors[0], vecs[0] / np.linalg.norm(vecs[0]), rtol=1e-6)
  assert idx.metadata(ids[2]) == {"i": 2} and idx.metadata(ids[5]) == {}
  before = idx.vectors.copy()
  idx.remove([ids[1], ids[4]])
  assert idx.ids == [ids[0], ids[2], ids[3], ids[5]]
  np.testing.assert_array_equal(idx.vectors, before[[0, 2, 3, 5]])
  assert idx.metadata(ids[3]) == {"i": 3}
  idx.metadata(ids[3])["i"] = 99  # a copy: the index is unchanged
  assert idx.metadata(ids[3]) == {"i": 3}
  with pytest.raises(ValueError):
    idx.vectors[0, 0] = 5.0  # read-only: writes would skip the device-cache invalidation
  with pytest.raises(IndexStoreError, match="model-001"):
    idx.metadata(ids[1])


def test_add_with_vectorize_fn():
  idx = _index(30)
  target = idx.vectors[17] * 3.0
  calls = []

  def vectorize(a, b):
    calls.append((a, b))
    return target[None]
  unit = idx.add("black-box", vectorize, "arg-a", "arg-b", metadata={"source": "hub"})
  assert calls == [("arg-a", "arg-b")] and idx.ids[-1] == "black-box"
  np.testing.assert_allclose(unit, idx.vectors[17], rtol=1e-6)
  assert idx.metadata("black-box") == {"source": "hub"}
  assert set(idx.search(target, 2)[1][0]) == {"model-017", "black-box"}
  with pytest.raises(IndexStoreError, match="already in the index"):
    idx.add("black-box", vectorize, 1, 2)
  assert len(calls) == 1  # rejected before vectorizing
  with pytest.raises(IndexStoreError, match=r"shape \[2, 16\]"):
    idx.add("other", lambda: np.ones((2, E)))


def test_add_errors_leave_index_unchanged():
  idx = _index(5)
  before = idx.vectors.copy()
  good = np.ones((2, E), np.float32)
  with pytest.raises(IndexStoreError, match=r"\[2, 16\].*got \[2, 8\]"):
    idx.add_vectors(["a", "b"], np.ones((2, 8)))
  with pytest.raises(IndexStoreError, match=r"got \[16\]"):
    idx.add_vectors(["a"], np.ones(E))
  with pytest.raises(IndexStoreError, match="duplicate model id 'a'"):
    idx.add_vectors(["a", "a"], good)
  with pytest.raises(IndexStoreError, match="'model-002' is already in the index"):
    idx.add_vectors(["a", "model-002"], good)
  bad = good.copy()
  bad[1, 3] = np.nan
  with pytest.raises(IndexStoreError, match="vector of 'b' has non-finite"):
    idx.add_vectors(["a", "b"], bad)
  bad[1, 3] = np.inf
  with pytest.raises(IndexStoreError, match="'b' has non-finite"):
    idx.add_vectors(["a", "b"], bad)
  with pytest.raises(IndexStoreError, match="'a' has non-finite"):  # overflows float32
    idx.add_vectors(["a"], np.full((1, E), 1e300))
  with pytest.raises(IndexStoreError, match="vector of 'z' is zero"):
    idx.add_vectors(["y", "z"], np.stack([good[0], np.zeros(E)]))
  with pytest.raises(IndexStoreError, match="not JSON-serialisable"):
    idx.add_vectors(["a"], good[:1], [{"x": object()}])
  with pytest.raises(IndexStoreError, match="non-empty strings"):
    idx.add_vectors([""], good[:1])
  with pytest.raises(IndexStoreError, match="unknown model id 'nope'"):
    idx.remove(["model-001", "nope"])
  assert idx.ids == [f"model-{i:03d}" for i in range(5)]
  np.testing.assert_array_equal(idx.vectors, before)
  # Tiny-but-nonzero and huge-but-finite vectors normalise without underflow or overflow.
  idx.add_vectors(["tiny", "huge"], np.stack([np.full(E, 1e-30), np.full(E, 1e30)]))
  np.testing.assert_allclose(idx.vectors[-2:], 0.25, rtol=1e-6)


def test_search_and_constructor_errors():
  idx = _index(5)
  with pytest.raises(IndexStoreError, match=r"\[16\] or \[Q, 16\].*got \[3, 8\]"):
    idx.search(np.ones((3, 8)))
  q = np.ones((3, E), np.float32)
  q[2, 0] = np.nan
  with pytest.raises(IndexStoreError, match="query 2 has non-finite"):
    idx.search(q)
  with pytest.raises(IndexStoreError, match="k must be a positive int"):
    idx.search(np.ones(E), k=0)
  with pytest.raises(IndexStoreError, match="positive int"):
    ModelIndex(0)
  with pytest.raises(IndexStoreError, match="dtype"):
    ModelIndex(E, dtype="float16")


def test_save_load_round_trip_is_bit_exact(tmp_path):
  idx = _index(77, shard_min_rows=1)
  path = idx.save(tmp_path / "idx")
  back = ModelIndex.load(path, expected_dim=E, devices=jax.devices()[:1])
  assert back.ids == idx.ids and back.dim == E
  assert back.vectors.dtype == np.float32
  assert back.vectors.tobytes() == idx.vectors.tobytes()
  assert all(back.metadata(i) == idx.metadata(i) for i in idx.ids)
  q = np.random.default_rng(7).standard_normal((3, E)).astype(np.float32)
  assert back.search(q, 5)[1] == idx.search(q, 5)[1]
  # Saving again over it replaces it; an empty index round-trips too.
  ModelIndex(E).save(path)
  empty = ModelIndex.load(path)
  assert len(empty) == 0 and empty.vectors.shape == (0, E)
  assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_saved_index_holds_only_vectors_and_json(tmp_path):
  idx = _index(12)
  path = idx.save(tmp_path / "idx")
  assert sorted(os.listdir(path)) == ["index.json", "vectors"]
  manifest = json.loads((path / "index.json").read_text())
  assert set(manifest) == {"format", "version", "dim", "num_vectors", "vectors_dtype", "ids",
                           "metadata", "classes", "checksums", "shapes"}
  assert manifest["classes"] is None  # vectors added alone: no class knowledge
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.metadata(path / "vectors").item_metadata.tree
  assert list(tree) == ["vectors"]  # no parameter trees, just one array
  assert tuple(tree["vectors"].shape) == (12, E)
  assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 64 * 1024


def test_interrupted_save_keeps_previous_index(tmp_path, monkeypatch):
  old = _index(20, seed=8)
  path = old.save(tmp_path / "idx")
  new = _index(25, seed=9)

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(storage, "write_json_atomic", interrupted)
  with pytest.raises(KeyboardInterrupt):
    new.save(path)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["idx"]  # no staging or .old directories left
  back = ModelIndex.load(path)
  assert back.ids == old.ids and back.vectors.tobytes() == old.vectors.tobytes()
  # A first save that is interrupted leaves nothing that loads.
  monkeypatch.setattr(storage, "write_json_atomic", interrupted)
  with pytest.raises(KeyboardInterrupt):
    new.save(tmp_path / "fresh")
  assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_load_errors(tmp_path):
  with pytest.raises(IndexStoreError, match="does not exist"):
    ModelIndex.load(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(IndexStoreError, match="index.json is missing"):
    ModelIndex.load(tmp_path / "empty")

  path = _index(10).save(tmp_path / "idx")
  manifest_file = path / "index.json"
  text = manifest_file.read_text()
  with pytest.raises(IndexStoreError, match="index vector size 16 does not match the "
                                            "vectorizer's 128"):
    ModelIndex.load(path, expected_dim=128)

  manifest_file.write_text(text[:len(text) // 2])  # truncated
  with pytest.raises(IndexStoreError, match="corrupted"):
    ModelIndex.load(path)
  manifest_file.write_bytes(b"\xff\xfe garbage")
  with pytest.raises(IndexStoreError, match="corrupted"):
    ModelIndex.load(path)

  def variant(**changes):
    manifest = json.loads(text)
    manifest.update(changes)
    manifest_file.write_text(json.dumps(manifest))
  variant(format="know2vec-zoo")
  with pytest.raises(IndexStoreError, match="not a know2vec index"):
    ModelIndex.load(path)
  variant(version=99)
  with pytest.raises(IndexStoreError, match="version 99"):
    ModelIndex.load(path)
  manifest = json.loads(text)
  variant(ids=manifest["ids"][:-1], metadata=manifest["metadata"][:-1], num_vectors=9)
  # 9 ids but 10 stored vectors: the shapes recorded at save time disagree.
  with pytest.raises(IndexStoreError, match="vectors checkpoint .* does not match the checksum"):
    ModelIndex.load(path)
  variant(ids=["same"] * 10)
  with pytest.raises(IndexStoreError, match="corrupted"):
    ModelIndex.load(path)
  manifest_file.write_text(text)
  assert len(ModelIndex.load(path)) == 10


def test_damaged_or_missing_vector_checkpoint(tmp_path):
  path = _index(10).save(tmp_path / "idx")
  ckpt_dir = path / "vectors"
  data_files = [f for f in ckpt_dir.rglob("*") if f.is_file() and f.parent.name == "d"]
  assert data_files
  for f in data_files:
    f.write_bytes(b"\x00" * 7)
  with pytest.raises(IndexStoreError, match="cannot read the vectors"):
    ModelIndex.load(path)
  (ckpt_dir / "_METADATA").unlink()
  with pytest.raises(IndexStoreError, match="vector"):
    ModelIndex.load(path)
  shutil.rmtree(ckpt_dir)
  with pytest.raises(IndexStoreError, match="vectors checkpoint missing"):
    ModelIndex.load(path)
