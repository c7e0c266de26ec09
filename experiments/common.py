"""Artifacts shared by the experiments: the probe pool, black-box knowledge, backbone and grids.

They depend only on the zoo and a few settings, so they are cached under
``<cache_dir>/<sha1(zoo.json)[:10]>/``: a rebuilt zoo never reuses them, and the NNR and SF-MTE
experiments share one extraction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time

import numpy as np

from know2vec_jax import features
from know2vec_jax.backbone import Backbone, BackboneConfig, train_backbone
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.data import load_source
from know2vec_jax.knowledge import KnowledgeConfig, extract_knowledge
from know2vec_jax.vectorizers import pad_grid
from know2vec_jax.zoo import load_zoo


def pyplot():
  """matplotlib's pyplot on a file-only backend, or None (with a hint) when it is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing: no figure (pip install '.[plot]')")
    return None
  return plt


def split_overrides(pairs, align_fields) -> tuple[dict, dict]:
  """``KEY=VALUE`` strings (values in JSON) -> (aligner overrides, vectorizer overrides).

  A key naming a field of ``align_fields`` (the AlignConfig field names) goes to the aligner,
  any other key to the vectorizer config.
  """
  align_over, vec_over = {}, {}
  for kv in pairs:
    key, value = kv.split("=", 1)
    value = json.loads(value) if value not in ("True", "False") else value == "True"
    (align_over if key in align_fields else vec_over)[key] = value
  return align_over, vec_over


def cached_npz(path: pathlib.Path, make):
  """np.savez cache of a dict of arrays (written atomically)."""
  if path.exists():
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  out = make()
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **out)
  tmp.replace(path)
  return out


@dataclasses.dataclass
class ZooArtifacts:
  """What every experiment derives from a zoo before training anything on it.

  Attributes:
    zoo: the loaded zoo; ids: its model ids in a fixed order.
    cache: this zoo's cache directory.
    pool: the unlabelled probe pool (train-split images of every source of the zoo).
    pool_features: phi of the pool.
    backbone: the frozen feature backbone phi.
    knowledge: {search_steps: raw knowledge arrays by "inputs/<id>", "anchors/<id>", ...}.
    seconds: knowledge-extraction wall time per search_steps (from its first, uncached run).
  """
  zoo: object
  ids: list
  cache: pathlib.Path
  pool: np.ndarray
  pool_features: np.ndarray
  backbone: Backbone
  knowledge: dict
  max_classes: int

  def grids(self, search_steps: int, ids=None):
    """Padded knowledge-grid features [M, K_max, K_max, D] and masks [M, K_max] of ``ids``."""
    kn = self.knowledge[search_steps]
    ids = self.ids if ids is None else ids
    k_max, d = self.max_classes, self.backbone.dim
    grids = np.zeros((len(ids), k_max, k_max, d), np.float32)
    masks = np.zeros((len(ids), k_max), np.float32)
    for i, mid in enumerate(ids):
      g = features.knowledge_features(
          self.backbone, kn[f"inputs/{mid}"][None],
          features.anchor_features(self.pool_features, kn[f"anchors/{mid}"][None]))[0]
      grids[i], masks[i] = pad_grid(g, k_max)
    return grids, masks


def zoo_artifacts(zoo_dir: str, cache_dir: str, *, pool_per_source: int = 800,
                  search_steps=(8,), anchors_per_class: int = 32, max_classes: int = 10,
                  seed: int = 0, progress: bool = True) -> ZooArtifacts:
  """Loads a zoo and derives (or loads from the cache) pool, knowledge and backbone.

  Args:
    zoo_dir, cache_dir: where the zoo and the cache live.
    pool_per_source: probe-pool images per source (train splits; queries never come from there).
    search_steps: the boundary-search steps T to extract knowledge for (e.g. (8, 0)).
    anchors_per_class, max_classes, seed: extraction and padding settings.
    progress: progress bars.
  """
  zoo = load_zoo(zoo_dir)  # first: a missing or broken zoo gets the store's clear ZooError
  zoo_key = hashlib.sha1((pathlib.Path(zoo_dir) / "zoo.json").read_bytes()).hexdigest()[:10]
  cache = pathlib.Path(cache_dir) / zoo_key
  cache.mkdir(parents=True, exist_ok=True)
  records = list(zoo.records.values())
  ids = [r.model_id for r in records]
  sources = sorted({r.source for r in records})

  # Probe pool: unlabelled train-split images of every domain (queries come from test splits).
  rng = np.random.default_rng(seed)
  pool = np.concatenate([
      load_source(s).train_images[rng.permutation(len(load_source(s).train_images))
                                  [:pool_per_source]] for s in sources])

  knowledge = {}
  for steps in search_steps:
    def make(steps=steps):
      t = time.perf_counter()
      out = {}
      for g in groups_from_zoo(zoo):
        kn = extract_knowledge(g, pool, KnowledgeConfig(search_steps=steps,
                                                         anchors_per_class=anchors_per_class))
        for i, mid in enumerate(kn.model_ids):
          out[f"inputs/{mid}"] = kn.inputs[i]
          out[f"anchors/{mid}"] = kn.anchor_index[i]
          out[f"queries/{mid}"] = kn.queries[i]
      out["seconds"] = np.asarray(time.perf_counter() - t)
      return out
    knowledge[steps] = cached_npz(
        cache / f"knowledge-T{steps}-A{anchors_per_class}-pool{pool_per_source}.npz", make)

  # Backbone phi, trained on the train splits of the probe sources.
  bb_dir = cache / "backbone"
  if (bb_dir / "backbone.json").exists():
    backbone = Backbone.load(bb_dir)
  else:
    backbone, info = train_backbone(BackboneConfig(sources=tuple(sources)), progress=progress)
    backbone.save(bb_dir)
    (cache / "backbone-info.json").write_text(json.dumps(info))
  return ZooArtifacts(zoo, ids, cache, pool, np.asarray(backbone.embed(pool)), backbone,
                      knowledge, max_classes)
