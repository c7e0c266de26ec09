"""Spies on what reaches a proxy's fitted parts: phi's training, the probe pool, the aligner's
episodes and the calibration. The experiments' leak tests (tests/test_openworld.py,
tests/test_experiments.py) read them at the data level, image by image."""

from __future__ import annotations

import numpy as np

from know2vec_jax import backbone as backbone_lib
from know2vec_jax import pipeline
from know2vec_jax import pool as pool_lib
from know2vec_jax import training
from know2vec_jax.data import load_source
from know2vec_jax.proxy import Proxy


def install(monkeypatch) -> list[dict]:
  """Spies on every ``Proxy.train`` of the test and what reaches its fitted parts.

  Returns:
    One record per training (filled in as it runs): ``model_ids``; and, where that training
    computed them rather than reading a cache, ``pool`` / ``pool_prov`` (the pool's images and
    provenance), ``phi_names`` / ``phi_images`` / ``phi_labels`` / ``phi_unlabelled`` (phi's
    labels, labelled images and unlabelled images), ``episode_sets`` (the aligner's query-episode
    sets), ``calibration_tasks`` / ``calibration_images`` / ``calibration_models``.
  """
  seen: list[dict] = []
  real_train = Proxy.train.__func__
  real_build, real_fit = pool_lib.build, backbone_lib.fit_backbone
  real_labelled, real_episodes = backbone_lib.labelled_data, pipeline.episode_grids
  real_val, real_cal = training.validation_queries, training.calibrate

  def train(cls, zoo, cfg=None, **kw):
    seen.append({"model_ids": list(kw.get("model_ids") or zoo.records),
                 "transfer": kw.get("transfer")})
    return real_train(cls, zoo, cfg, **kw)

  def build(*a, **k):
    p = real_build(*a, **k)
    seen[-1].update(pool=p.images, pool_prov=p.provenance)
    return p

  def labelled(*a, **k):
    out = real_labelled(*a, **k)
    seen[-1]["phi_names"] = out[4]
    return out

  def fit(config, image_shape, images, labels, num_labels, unlabelled=None, *a, **k):
    seen[-1].update(phi_images=np.asarray(images), phi_labels=np.asarray(labels),
                    phi_unlabelled=None if unlabelled is None else np.asarray(unlabelled))
    return real_fit(config, image_shape, images, labels, num_labels, unlabelled, *a, **k)

  def episodes(backbone, sets, *a, **k):
    seen[-1].setdefault("episode_sets", []).extend(sets)
    return real_episodes(backbone, sets, *a, **k)

  def validation(proxy, ids, model_tasks, image_shape):
    queries, q_tasks = real_val(proxy, ids, model_tasks, image_shape)
    seen[-1]["calibration_tasks"] = sorted({model_tasks[m] for m in ids}, key=str)
    seen[-1]["calibration_images"] = [x for x, _ in queries]
    return queries, q_tasks

  def calibrate(proxy, rows, queries, q_tasks):
    seen[-1]["calibration_models"] = list(rows[0])
    return real_cal(proxy, rows, queries, q_tasks)

  monkeypatch.setattr(Proxy, "train", classmethod(train))
  monkeypatch.setattr(pool_lib, "build", build)
  monkeypatch.setattr(backbone_lib, "labelled_data", labelled)
  monkeypatch.setattr(backbone_lib, "fit_backbone", fit)
  monkeypatch.setattr(pipeline, "episode_grids", episodes)
  monkeypatch.setattr(training, "validation_queries", validation)
  monkeypatch.setattr(training, "calibrate", calibrate)
  return seen


def image_set(images) -> set:
  """The images of ``images`` [N, H, W, C] as a set of byte strings."""
  return {im.tobytes() for im in np.asarray(images)}


def source_images(sources) -> set:
  """Every image (both splits) of ``sources``."""
  out = set()
  for s in sources:
    d = load_source(s)
    out |= image_set(np.concatenate([d.train_images, d.test_images]))
  return out


def count_in(images, images_set: set) -> int:
  """How many of ``images`` are in ``images_set``."""
  return sum(im.tobytes() in images_set for im in np.asarray(images))


def fitted_images(record: dict) -> dict:
  """Every image array one training's fitted parts saw, by part."""
  out = {k: record[k] for k in ("pool", "phi_images", "phi_unlabelled")
         if record.get(k) is not None}
  for i, s in enumerate(record.get("episode_sets", [])):
    out[f"episodes {s.name}"] = s.images[s.index]
  for i, x in enumerate(record.get("calibration_images", [])):
    out[f"calibration query {i}"] = x
  return out
