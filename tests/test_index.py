"""ModelIndex: exact top-k search (1 device and sharded), compressed storage (bfloat16, int8)
with exact re-scoring, mutation, errors, atomic storage."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from know2vec_jax import cli, index, storage
from know2vec_jax.index import IndexStoreError, ModelIndex, quantize_int8

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
  (vectors,), _, _ = eight._device_state or eight._place()
  assert len(vectors.sharding.device_set) == 8 and vectors.shape[0] == 1008
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
  assert idx16.storage == "bfloat16"  # ``dtype`` is the earlier name of ``storage``


def _unit_data(m, dim, seed):
  rng = np.random.default_rng(seed)
  ids = [f"m{i:05d}" for i in range(m)]
  q = rng.standard_normal((24, dim)).astype(np.float32)
  return ids, rng.standard_normal((m, dim)).astype(np.float32), q / np.linalg.norm(q, axis=1,
                                                                                   keepdims=True)


def _recall(found, exact):
  return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)])


COMPRESSED = ["bfloat16", "int8"]


@pytest.mark.parametrize("storage", COMPRESSED)
def test_compressed_search_recall_and_exact_scores(storage):
  ids, vecs, q = _unit_data(4000, 64, seed=10)
  exact = ModelIndex(64, **_one_device())
  compact = ModelIndex(64, storage=storage, **_one_device())
  for idx in (exact, compact):
    idx.add_vectors(ids, vecs)
  s32, i32 = exact.search(q, 10)
  s, got = compact.search(q, 10)
  # The device searched the compact copy, not the float32 rows.
  arrays = compact._device_state[0]
  # On CPU the int8 codes are laid out [dim, M] (index._kernel says why).
  want = (64, 4000) if compact._kernel() == "int8_cols" else (4000, 64)
  assert arrays[0].dtype == np.dtype(storage) and arrays[0].shape == want
  if storage == "int8":
    assert arrays[1].dtype == np.float32 and arrays[1].shape == (4000,)  # one scale per row
  assert _recall(got, i32) >= 0.99
  # Every returned score is the exact float32 cosine of that row (the compressed scores are off
  # by ~1e-3 for int8 and ~1e-2 for bfloat16), best first.
  row_of = {i: r for r, i in enumerate(ids)}
  rows = np.array([[row_of[i] for i in r] for r in got])
  ref = np.einsum("qe,qre->qr", q.astype(np.float64), compact.vectors[rows].astype(np.float64))
  assert s.dtype == np.float32
  np.testing.assert_allclose(s, ref, rtol=0, atol=1.2e-7)
  assert np.all(np.diff(s, axis=1) <= 0)
  same = [a == b for a, b in zip(got, i32)]
  np.testing.assert_allclose(s[same], s32[same], rtol=0, atol=1e-6)
  # A single query takes the same path as a batch (int8 pads it to two rows on the device).
  s1, one = compact.search(q[3], 10)
  assert one == [got[3]] and np.array_equal(s1[0], s[3])


def test_shortlist_depth_changes_recall_not_exactness():
  # Few dimensions, many rows: int8 scores blur the top of the ranking, and only a deeper
  # shortlist recovers it; the scores returned are exact whatever the depth.
  ids, vecs, q = _unit_data(6000, 8, seed=11)
  exact = ModelIndex(8, **_one_device())
  compact = ModelIndex(8, storage="int8", rescore=1, **_one_device())
  for idx in (exact, compact):
    idx.add_vectors(ids, vecs)
  _, i32 = exact.search(q, 10)
  shallow = _recall(compact.search(q, 10)[1], i32)
  deep = _recall(compact.search(q, 10, rescore=16)[1], i32)
  assert shallow < 0.99 and deep == 1.0 and compact.rescore == 1


@needs8
@pytest.mark.parametrize("storage", ["float32"] + COMPRESSED)
def test_compressed_one_vs_eight_devices_identical(storage):
  ids, vecs, q = _unit_data(1001, E, seed=12)  # not a multiple of 8: padded rows
  one = ModelIndex(E, storage=storage, **_one_device())
  eight = ModelIndex(E, storage=storage, devices=jax.devices()[:8], shard_min_rows=1)
  for idx in (one, eight):
    idx.add_vectors(ids, vecs)
  assert one.num_shards == 1 and eight.num_shards == 8
  arrays = (eight._device_state or eight._place())[0]
  assert all(len(a.sharding.device_set) == 8 for a in arrays)
  assert arrays[-1].shape[0] == 1008 and arrays[0].size == 1008 * E
  if storage == "int8":  # codes sharded along the rows axis, whichever the layout
    assert all(s.data.size == 126 * E for s in arrays[0].addressable_shards)
  for k in (1, 7, 200):
    s1, i1 = one.search(q, k)
    s8, i8 = eight.search(q, k)
    assert i1 == i8
    if storage == "float32":  # XLA's float32 products may round differently per shard shape
      np.testing.assert_allclose(s1, s8, rtol=1e-6, atol=1e-6)
    else:  # the same shortlist, re-scored on the host: bit for bit
      np.testing.assert_array_equal(s1, s8)


def test_set_storage_converts_both_ways_and_rebuilds_the_device_copy():
  idx = _index(500, **_one_device())
  q = np.random.default_rng(13).standard_normal((5, E)).astype(np.float32)
  before = idx.search(q, 5)
  rows = idx.vectors.copy()
  idx.set_storage("int8", rescore=8)
  assert idx.storage == "int8" and idx.rescore == 8 and idx._device_state is None
  assert idx.search(q, 5)[1] == before[1]
  assert idx._device_state[0][0].dtype == np.int8
  idx.set_storage("float32")
  assert idx.search(q, 5)[1] == before[1] and idx.rescore == 8
  assert idx.vectors.tobytes() == rows.tobytes()  # the float32 rows never change


def test_int8_quantisation_of_zero_tiny_and_huge_rows():
  x = np.array([[0.0, 0.0, 0.0, 0.0],            # zero: no direction
                [1e-40, -3e-41, 0.0, 1e-45],     # float32 subnormals
                [0.5, -0.25, 0.125, 1.0],
                [1e-30, 2e-30, -4e-30, 0.0]], np.float32)
  codes, scales = quantize_int8(x)
  assert codes.dtype == np.int8 and scales.dtype == np.float32 and np.all(np.isfinite(scales))
  assert np.all(codes[0] == 0) and scales[0] == 0
  assert np.abs(codes).max() <= 127 and np.all(np.abs(codes[1:]).max(axis=1) == 127)
  decoded = codes.astype(np.float64) * scales[:, None]
  np.testing.assert_allclose(decoded[2:], x[2:], rtol=0, atol=0.5 * scales[2:, None].max())
  np.testing.assert_allclose(decoded[1], x[1], rtol=0, atol=1e-42)
  big = quantize_int8(np.array([[1e30, -5e29]]))  # float64: no overflow to inf
  assert big[0].tolist() == [[127, -64]] and big[1][0] == np.float32(1e30 / 127)
  with pytest.raises(IndexStoreError, match="row 1 has values up to 1e\\+300: its int8 scale"):
    quantize_int8(np.array([[1.0, 2.0], [1e300, -5e299]]))
  with pytest.raises(IndexStoreError, match=r"matrix \[n, d\], got shape \[4\]"):
    quantize_int8(np.ones(4))
  # Through the index: tiny-norm rows are normalised, zero and tiny queries give no NaN.
  idx = ModelIndex(4, storage="int8", **_one_device())
  idx.add_vectors(["tiny", "plain", "small"], x[1:])
  for query in (np.zeros(4, np.float32), np.full(4, 1e-39, np.float32), x[2]):
    scores, ids = idx.search(query, 3)
    assert np.all(np.isfinite(scores)) and sorted(ids[0]) == ["plain", "small", "tiny"]
  assert idx.search(x[2], 1)[1] == [["plain"]]
  assert idx.search(np.zeros(4), 3)[1] == [["tiny", "plain", "small"]]  # ties: insertion order


def test_storage_argument_errors():
  for bad in ("float16", "int4", "fp8", 3):
    with pytest.raises(IndexStoreError, match="unknown index storage .*float32, bfloat16, int8"):
      ModelIndex(E, storage=bad)
  with pytest.raises(IndexStoreError, match="storage='int8' and dtype='bfloat16'"):
    ModelIndex(E, storage="int8", dtype="bfloat16")
  assert ModelIndex(E, storage="int8", dtype=np.int8).storage == "int8"
  assert ModelIndex(E, storage=np.float32).storage == "float32"
  for bad in (0, -2, True, 2.5):
    with pytest.raises(IndexStoreError, match="rescore must be a positive int"):
      ModelIndex(E, storage="int8", rescore=bad)
  idx = _index(20, storage="int8")
  with pytest.raises(IndexStoreError, match="rescore must be a positive int"):
    idx.search(np.ones(E), 3, rescore=0)
  with pytest.raises(IndexStoreError, match="unknown index storage 'int16'"):
    idx.set_storage("int16")
  assert idx.storage == "int8"


def test_save_load_records_the_storage_type(tmp_path):
  idx = _index(300, storage="int8", rescore=3, **_one_device())
  q = np.random.default_rng(14).standard_normal((4, E)).astype(np.float32)
  path = idx.save(tmp_path / "idx")
  manifest = json.loads((path / "index.json").read_text())
  assert manifest["storage"] == "int8" and manifest["rescore"] == 3
  assert manifest["vectors_dtype"] == "float32" and manifest["version"] == 6
  for back in (ModelIndex.load(path, **_one_device()),
               ModelIndex.load(path, storage="int8", **_one_device())):
    assert back.storage == "int8" and back.rescore == 3
    assert back.vectors.tobytes() == idx.vectors.tobytes()
    assert back.search(q, 5)[1] == idx.search(q, 5)[1]
  assert ModelIndex.load(path, rescore=9).rescore == 9
  # The caller expects another storage type: one line naming both, before any array is read.
  for kwargs, want in (({"storage": "float32"}, "float32"), ({"dtype": "bfloat16"}, "bfloat16")):
    with pytest.raises(IndexStoreError) as err:
      ModelIndex.load(path, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and f"stores int8 vectors, not the {want} expected" in msg
  with pytest.raises(IndexStoreError, match="unknown index storage 'float8'"):
    ModelIndex.load(path, storage="float8")
  # A version-4 index (no storage recorded) loads as float32; a bad recorded type is corruption.
  text = (path / "index.json").read_text()
  old = json.loads(text)
  del old["storage"], old["rescore"], old[storage.MANIFEST_CHECKSUM]  # as version 4 wrote it
  (path / "index.json").write_text(json.dumps(old | {"version": 4}))
  v4 = ModelIndex.load(path)
  assert v4.storage == "float32" and v4.rescore == index.RESCORE
  with pytest.raises(IndexStoreError, match="stores float32 vectors, not the int8"):
    ModelIndex.load(path, storage="int8")
  bad = json.loads(text) | {"storage": "int3"}
  bad[storage.MANIFEST_CHECKSUM] = storage.manifest_checksum(bad)  # sealed, yet wrong
  (path / "index.json").write_text(json.dumps(bad))
  with pytest.raises(IndexStoreError, match="corrupted: storage 'int3'"):
    ModelIndex.load(path)


def test_cli_index_convert_and_info(tmp_path, capsys):
  assert cli.INDEX_STORAGES == index.STORAGES and cli.INDEX_RESCORE == index.RESCORE
  path = str(_index(40).save(tmp_path / "idx"))
  assert cli.main(["index", "convert", "--index", path, "--storage", "int8", "--rescore", "6",
                   "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["storage"] == "int8" and out["rescore"] == 6 and out["converted_from"] == "float32"
  back = ModelIndex.load(path, storage="int8")
  assert back.rescore == 6 and len(back) == 40
  assert cli.main(["index", "info", "--index", path]) == 0
  assert "storage: int8" in capsys.readouterr().out
  assert cli.main(["index", "convert", "--index", path, "--storage", "int8", "--rescore",
                   "0"]) == 2
  assert "--rescore must be a positive int" in capsys.readouterr().err
  assert cli.main(["index", "convert", "--index", path, "--storage", "int4"]) == 2
  assert "invalid choice: 'int4'" in capsys.readouterr().err


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
  assert set(manifest) == {"format", "version", "dim", "num_vectors", "vectors_dtype", "storage",
                           "rescore", "ids", "metadata", "classes", "checksums", "shapes",
                           "pool", "proxies", "manifest_sha256"}
  assert manifest["pool"] is None and manifest["proxies"] == {}  # no own pool, no proxy
  assert manifest["storage"] == "float32" and manifest["version"] == index.VERSION
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

  def variant(seal=True, **changes):
    manifest = json.loads(text)
    manifest.update(changes)
    if seal:  # the manifest's own checksum matches: the field checks behind it are reached
      manifest[storage.MANIFEST_CHECKSUM] = storage.manifest_checksum(manifest)
    manifest_file.write_text(json.dumps(manifest))
  # A manifest edited by hand (one row's metadata) is refused by its own checksum.
  variant(seal=False, metadata=[{"task": "digits/0-1"}] + json.loads(text)["metadata"][1:])
  with pytest.raises(IndexStoreError, match="does not match the manifest_sha256"):
    ModelIndex.load(path)
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
