"""Anchors, label-only boundary search and the query-count formula."""

import jax
import numpy as np
import pytest

from know2vec_jax.blackbox import CallableBlackBox, groups_from_zoo
from know2vec_jax.data import load_source
from know2vec_jax.knowledge import (KnowledgeConfig, KnowledgeError, KnowledgeStore,
                                    expected_queries, extract_knowledge, grid_inputs,
                                    group_knowledge, store_context)


@pytest.fixture(scope="module")
def pool():
  return np.concatenate([load_source("digits").train_images[:200],
                         load_source("digits+invert").train_images[:200]])


def test_query_count_follows_the_formula(tiny_zoo, pool):
  zoo, _ = tiny_zoo
  for steps in (0, 3, 6):
    for g in groups_from_zoo(zoo):
      kn = extract_knowledge(g, pool, KnowledgeConfig(search_steps=steps, pool_batch=150))
      want = expected_queries(len(pool), g.num_classes, steps)
      assert np.all(kn.queries == want) and np.all(g.queries == want)


def test_label_only_black_box_pays_the_stability_views_and_ties_are_detected(pool):
  """One-hot answers tie every margin: the stability pass runs (N * V more queries, in the
  formula); a black box whose margins all differ does not need it."""
  from know2vec_jax.knowledge import needs_tie_break
  w = np.random.default_rng(0).standard_normal((pool[0].size, 3)).astype(np.float32)

  def logits(x):
    return x.reshape(len(x), -1) @ w

  onehot = CallableBlackBox(lambda x: np.eye(3, dtype=np.float32)[logits(x).argmax(1)], 3,
                            pool.shape[1:])
  graded = CallableBlackBox(logits, 3, pool.shape[1:])
  cfg = KnowledgeConfig(search_steps=2, anchors_per_class=4, stability_views=3)
  kn = extract_knowledge(onehot, pool, cfg)
  assert kn.queries.tolist() == [expected_queries(len(pool), 3, 2, 3)] == \
      onehot.queries.tolist()
  kn = extract_knowledge(graded, pool, cfg)
  assert kn.queries.tolist() == [expected_queries(len(pool), 3, 2)] == graded.queries.tolist()
  margins = np.array([[[1.0, -1.0], [1.0, -1.0], [0.5, -0.5]]], np.float32)  # [1, 3, 2]
  labels = np.zeros((1, 3), np.uint8)
  assert needs_tie_break(margins, labels, 1).tolist() == [True]  # 1st and 2nd of class 0 tie
  margins[0, 1, 0] = 0.9
  assert needs_tie_break(margins, labels, 1).tolist() == [False]
  with pytest.raises(ValueError, match="stability_step in"):
    KnowledgeConfig(stability_step=1.5)


def test_anchors_and_boundaries_are_what_the_model_says(tiny_zoo, pool):
  zoo, _ = tiny_zoo
  steps = 7
  (g,) = [g for g in groups_from_zoo(zoo) if g.num_classes == 4 and "cnn_s" in g.model_ids[0]]
  kn = extract_knowledge(g, pool, KnowledgeConfig(search_steps=steps))
  k = g.num_classes
  for m, mid in enumerate(kn.model_ids):
    model = zoo.model(mid)
    pred = np.asarray(model(pool)).argmax(1)
    for c in range(k):
      assert not kn.anchor_fallback[m, c]
      # The anchors are the pool images predicted as c with the largest logit margin, best first.
      logits = np.asarray(model(pool))
      margin = logits[:, c] - np.delete(logits, c, axis=1).max(1)
      cand = np.flatnonzero(pred == c)
      want = cand[np.argsort(-margin[cand], kind="stable")][:kn.anchor_index.shape[2]]
      np.testing.assert_array_equal(kn.anchor_index[m, c, :len(want)], want)
      np.testing.assert_array_equal(kn.inputs[m, c, c], pool[kn.anchor_index[m, c, 0]])
    half = 0.5 ** (steps + 1)
    for i in range(k):
      for j in range(k):
        if i == j:
          continue
        a, b = pool[kn.anchor_index[m, i, 0]], pool[kn.anchor_index[m, j, 0]]
        t = kn.flip_t[m, i, j]
        np.testing.assert_allclose(kn.inputs[m, i, j], a + t * (b - a), atol=1e-6)
        lo, hi = t - half, t + half
        labels = np.asarray(model(np.stack([a + lo * (b - a), a + hi * (b - a)]))).argmax(1)
        assert lo < 1e-9 or labels[0] == i  # the lower end still says i ...
        assert hi > 1 - 1e-9 or labels[1] != i  # ... the upper end no longer does
  # The compact record (pool indices + flip positions) rebuilds the grid bit for bit.
  np.testing.assert_array_equal(grid_inputs(pool, kn.anchor_index, kn.flip_t), kn.inputs)


def test_class_never_predicted_uses_the_documented_fallback(pool):
  def fn(x):  # class 2 always loses: it is never predicted
    s = x.reshape(len(x), -1).mean(1)
    return np.stack([s, 1 - s, 0.9 * s + 0.05 - 1.0], 1)
  bb = CallableBlackBox(fn, 3, (28, 28, 1))
  kn = extract_knowledge(bb, pool, KnowledgeConfig(search_steps=2))
  assert kn.anchor_fallback[0].tolist() == [False, False, True]
  logits = fn(pool)
  margin = logits[:, 2] - logits[:, :2].max(1)
  assert kn.anchor_index[0, 2, 0] == np.argmax(margin)


def test_zero_steps_gives_segment_midpoints(tiny_zoo, pool):
  zoo, _ = tiny_zoo
  g = groups_from_zoo(zoo)[0]
  kn = extract_knowledge(g, pool, KnowledgeConfig(search_steps=0))
  off = ~np.eye(g.num_classes, dtype=bool)
  assert np.allclose(kn.flip_t[:, off], 0.5)


def test_store_reuses_knowledge_by_id_and_fingerprint_and_probes_only_the_rest(tiny_zoo, pool,
                                                                               tmp_path):
  zoo, _ = tiny_zoo
  cfg = KnowledgeConfig(search_steps=3, anchors_per_class=4)
  store = KnowledgeStore(store_context(pool, cfg), tmp_path)
  (g,) = [g for g in groups_from_zoo(zoo) if g.num_classes == 4 and "mlp" in g.model_ids[0]]
  first = g.subset(g.model_ids[:2])
  group_knowledge([first], pool, cfg, store)
  assert first.queries.tolist() == [expected_queries(len(pool), 4, 3)] * 2
  assert g.queries[:2].tolist() == first.queries.tolist()  # counted on the parent too
  # The whole stack now: only its other models are probed; the stored two are read back.
  before = g.queries.copy()
  (kn,) = group_knowledge([g], pool, cfg, KnowledgeStore(store.context, tmp_path))
  assert (g.queries - before).tolist() == [0, 0] + [expected_queries(len(pool), 4, 3)] * (
      g.num_models - 2)
  ref = extract_knowledge(groups_from_zoo(zoo, model_ids=g.model_ids)[0], pool, cfg)
  np.testing.assert_array_equal(kn.inputs, ref.inputs)
  np.testing.assert_array_equal(kn.anchor_index, ref.anchor_index)
  # Another pool is another context: the store refuses to serve it.
  with pytest.raises(KnowledgeError, match="another probe pool"):
    group_knowledge([g], pool[:100], cfg, store)
  # A damaged file names itself.
  f = next(tmp_path.rglob("*.npz"))
  f.write_bytes(f.read_bytes()[:50])
  fresh = KnowledgeStore(store.context, tmp_path)
  with pytest.raises(KnowledgeError, match=str(f)):
    group_knowledge([g], pool, cfg, fresh)


def test_knowledge_is_the_same_on_one_device_and_eight(tiny_zoo, pool):
  """Every stack probed with its model axis sharded over the 8 local devices (what ``know2vec
  train`` and ``index build`` do on a multi-accelerator host, ``probe_devices``) gives the
  knowledge one device gives, bit for bit; the device policy is checked by name."""
  from know2vec_jax.mesh import probe_mesh
  zoo, _ = tiny_zoo
  cfg = KnowledgeConfig(search_steps=3, anchors_per_class=4)
  mesh = probe_mesh("all")
  assert mesh is not None and mesh.size == 8
  assert probe_mesh("one") is None
  if jax.local_devices()[0].platform == "cpu":  # forced host devices share the cores: one
    assert probe_mesh("auto") is None
  with pytest.raises(ValueError, match="probe devices must be one of"):
    probe_mesh("some")
  images = pool[::4]  # 100 images: the compilations, not the pool, are what this costs
  one = [extract_knowledge(g, images, cfg) for g in groups_from_zoo(zoo)]
  eight = [extract_knowledge(g, images, cfg) for g in groups_from_zoo(zoo, mesh=mesh)]
  for a, b in zip(one, eight):
    assert a.model_ids == b.model_ids
    for f in ("anchor_index", "flip_t", "anchor_fallback", "queries", "pool_labels", "inputs"):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
