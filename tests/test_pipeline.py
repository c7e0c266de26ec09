"""The pipeline's own pieces: episode draws keyed by set, and the cache that proxies share."""

import numpy as np
import pytest

from know2vec_jax import pipeline
from know2vec_jax.backbone import BackboneConfig
from know2vec_jax.data import Task, load_source

TINY_PHI = BackboneConfig(channels=(4,), strides=(2,), dim=8, steps=5, batch_size=16,
                          max_per_source=100)


def test_episodes_depend_on_the_set_alone():
  a = pipeline.LabelledSet.from_task(Task("digits", (0, 1, 2)), "train")
  b = pipeline.LabelledSet.from_task(Task("digits", (3, 4)), "train")
  pa, la = pipeline.draw_episodes(a, 4, 5, seed=0)
  assert pa.shape == la.shape == (4, 15)
  np.testing.assert_array_equal(la[0], np.repeat([0, 1, 2], 5))
  # Every pick is an image of its class.
  assert np.all(np.isin(pa[:, :5], a.index[a.labels == 0]))
  assert np.all(np.isin(pa[:, 10:], a.index[a.labels == 2]))
  again, _ = pipeline.draw_episodes(a, 4, 5, seed=0)
  np.testing.assert_array_equal(pa, again)  # whatever else was drawn in between
  pipeline.draw_episodes(b, 4, 5, seed=0)
  np.testing.assert_array_equal(pa, pipeline.draw_episodes(a, 4, 5, seed=0)[0])
  assert not np.array_equal(pa, pipeline.draw_episodes(a, 4, 5, seed=1)[0])
  # A class smaller than the shots is drawn with replacement instead of failing.
  small = pipeline.LabelledSet("small", a.images, a.index[:12], a.labels[:12], 3)
  picks, _ = pipeline.draw_episodes(small, 2, 50, seed=0)
  assert picks.shape == (2, 150)


def test_cache_reuses_phi_and_episodes(tmp_path, monkeypatch):
  cache = pipeline.Cache(tmp_path)
  bb, info = cache.backbone(TINY_PHI, {"digits": [0, 1, 2, 3, 4]}, (28, 28, 1), progress=False)
  assert info["sources"] == ["digits"] and info["labels"] == [f"digits:{c}" for c in range(5)]

  def boom(*a, **k):
    raise AssertionError("recomputed despite the cache")
  monkeypatch.setattr(pipeline, "train_backbone", boom)
  again, _ = cache.backbone(TINY_PHI, {"digits": [0, 1, 2, 3, 4]}, (28, 28, 1), progress=False)
  assert again.fingerprint == bb.fingerprint
  sets = [pipeline.LabelledSet.from_task(Task("digits", (0, 1)), "train"),
          pipeline.LabelledSet.from_task(Task("digits", (2, 3, 4)), "train")]
  grids, masks = pipeline.episode_grids(bb, sets, 3, 2, 0, 4, cache)
  assert grids.shape == (2, 3, 4, 4, 8) and masks.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
  monkeypatch.setattr(pipeline, "_episodes", boom)
  cached, _ = pipeline.episode_grids(bb, sets, 3, 2, 0, 4, cache)
  np.testing.assert_array_equal(cached, grids)
  # Another seed is another entry: computed, never a stale hit.
  with pytest.raises(AssertionError, match="recomputed"):
    pipeline.episode_grids(bb, sets, 3, 2, 1, 4, cache)
  with pytest.raises(pipeline.PipelineError, match="more than max_classes=2"):
    pipeline.episode_grids(bb, sets, 3, 2, 0, 2, cache)
  # Nuisance views are another entry too.
  with pytest.raises(AssertionError, match="recomputed"):
    pipeline.episode_grids(bb, sets, 3, 2, 0, 4, cache, views=0.5)


def test_nuisance_views_perturb_the_chosen_share_of_episodes_only():
  x = load_source("fashion_mnist").train_images[:400].reshape(40, 10, 28, 28, 1)
  cfg = BackboneConfig(augment=0.0)  # the views ignore phi's own probability
  views = pipeline.nuisance_views(x, 0.5, cfg, seed=3)
  changed = np.abs(views - x).mean(axis=(1, 2, 3, 4)) > 1e-4
  assert 10 <= changed.sum() <= 30  # about half the episodes
  np.testing.assert_array_equal(views[~changed], x[~changed])  # the others untouched
  assert views.min() >= 0.0 and views.max() <= 1.0 and views.dtype == np.float32
  np.testing.assert_array_equal(views, pipeline.nuisance_views(x, 0.5, cfg, seed=3))  # seeded
  assert pipeline.nuisance_views(x, 0.0, cfg, seed=3) is x
  every = pipeline.nuisance_views(x, 1.0, cfg, seed=3)
  assert np.all(np.abs(every - x).mean(axis=(1, 2, 3, 4)) > 1e-4)
