"""The one path from black boxes to the aligner's training data (docs/design.md, "Pipeline").

    black-box groups --probe pool--> knowledge (anchors + boundary search, cached by model)
      --phi--> model grids [M, K_max, K_max, D]
    labelled sets (a task's train split, a target's shot pool) --phi--> query episodes
    model grids + episodes + supervision --> AlignData | TransferData --> the aligner

:class:`know2vec_jax.proxy.Proxy` trains through these functions and nothing else, and so does
every experiment (an NNR fold is a proxy trained on the fold's models, a SF-MTE run is a proxy
trained on measured fine-tune accuracies). :class:`Cache` keeps what they derive (knowledge, phi,
episodes) on disk, keyed by everything the result depends on, so that proxies trained on
different subsets of one zoo share one extraction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Mapping, Sequence

import numpy as np

from know2vec_jax import config as config_lib
from know2vec_jax import features, storage
from know2vec_jax.align import AlignData, TransferData
from know2vec_jax.backbone import Backbone, BackboneConfig, train_backbone
from know2vec_jax.blackbox import BlackBoxGroup
from know2vec_jax.data import Task, load_source, stable_seed, task_split
from know2vec_jax.knowledge import (Knowledge, KnowledgeConfig, KnowledgeStore, group_knowledge,
                                    store_context)
from know2vec_jax.vectorizers import pad_grid


class PipelineError(ValueError):
  """Training inputs that cannot be used (an empty zoo, a task too large, mismatched labels)."""


def probe_pool(sources: Sequence[str], per_source: int, seed: int, image_shape) -> np.ndarray:
  """The proxy's unlabelled probe pool: ``per_source`` train-split images of every source.

  Train splits only: queries and evaluation images come from test splits. The draw is one
  permutation per source, in sorted source order, from one generator seeded by ``seed``.

  Returns:
    float32 [len(sources) * per_source (or fewer for small sources), H, W, C].
  """
  h, _, c = image_shape
  rng = np.random.default_rng(seed)
  parts = []
  for s in sorted(sources):
    images = load_source(s, image_size=h, channels=c).train_images
    parts.append(images[rng.permutation(len(images))[:per_source]])
  return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class LabelledSet:
  """Labelled images that query episodes of one task are drawn from.

  Attributes:
    name: identifies the content (a task id and split, a target name): episodes are seeded and
      cached by it.
    images: float32 [N, H, W, C], shared (not copied) with the source.
    index: int [n] the rows of ``images`` that belong to the set.
    labels: int32 [n] task-local labels 0..k-1 of those rows.
    k: classes.
  """
  name: str
  images: np.ndarray
  index: np.ndarray
  labels: np.ndarray
  k: int

  @classmethod
  def from_task(cls, task: Task, split: str, image_shape=(28, 28, 1)) -> "LabelledSet":
    """A task's images of one split of its source."""
    data = load_source(task.source, image_size=image_shape[0], channels=image_shape[2])
    idx, y = task_split(data, task, split)
    return cls(f"{task.task_id}:{split}", data.split(split)[0], idx, y.astype(np.int32), task.k)


def draw_episodes(s: LabelledSet, episodes: int, shots: int, seed: int):
  """Image indices and labels of ``episodes`` random ``shots``-per-class samples of a set.

  Classes with fewer than ``shots`` images are drawn with replacement. Seeded by the set's name,
  so a set's episodes do not depend on which other sets are drawn.

  Returns:
    (index into ``s.images`` int [episodes, k * shots], labels int32 [episodes, k * shots]).
  """
  rng = np.random.default_rng(stable_seed("episodes", seed, s.name))
  by_class = [s.index[s.labels == c] for c in range(s.k)]
  picks = np.stack([np.concatenate([rng.choice(p, size=shots, replace=len(p) < shots)
                                    for p in by_class]) for _ in range(episodes)])
  labels = np.tile(np.repeat(np.arange(s.k, dtype=np.int32), shots), (episodes, 1))
  return picks, labels


class Cache:
  """Derived artifacts shared by proxies and experiments, under one directory.

  ``knowledge/<context>/``: one verified file per model (:class:`KnowledgeStore`);
  ``backbone/<key>/``: trained phi per (config, sources, image shape);
  ``episodes/<key>.npz``: query-episode grids per (phi, set, episodes, shots, seed).
  Every entry is keyed by what it depends on, so a stale entry is never reused; files are written
  atomically and verified when read.
  """

  def __init__(self, path):
    self.path = pathlib.Path(path).expanduser().absolute()

  def knowledge_store(self, pool: np.ndarray, config: KnowledgeConfig) -> KnowledgeStore:
    return KnowledgeStore(store_context(pool, config), self.path / "knowledge")

  def _key(self, *parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]

  def backbone(self, config: BackboneConfig, sources: Sequence[str], image_shape,
               progress: bool = True) -> tuple[Backbone, dict]:
    """phi for these settings: loaded when trained before, else trained and stored."""
    key = self._key(config_lib.to_dict(config), sorted(config.sources or sources),
                    list(image_shape))
    where = self.path / "backbone" / key
    if (where / "backbone.json").exists():
      return Backbone.load(where), json.loads((where / "info.json").read_text())
    bb, info = train_backbone(config, sources, image_shape, progress=progress)
    bb.save(where)
    storage.write_json_atomic(where / "info.json", info)
    return bb, info

  def episodes(self, backbone: Backbone, s: LabelledSet, episodes: int, shots: int, seed: int):
    """The query-episode grids [episodes, k, k, D] of one set (see :func:`episode_grids`)."""
    key = self._key(backbone.fingerprint, s.name, episodes, shots, seed)
    f = self.path / "episodes" / f"{key}.npz"
    want = (episodes, s.k, s.k, backbone.dim)
    if f.exists():
      arrays, _ = storage.load_arrays(f, PipelineError, check=lambda a, m: None if (
          a["grid"].shape == want) else f"grid shape {a['grid'].shape}, expected {want}")
      return arrays["grid"]
    grid = _episodes(backbone, s, episodes, shots, seed)
    storage.save_arrays(f, {"grid": grid}, {"set": s.name, "backbone": backbone.fingerprint})
    return grid


def _episodes(backbone, s: LabelledSet, episodes: int, shots: int, seed: int) -> np.ndarray:
  picks, labels = draw_episodes(s, episodes, shots, seed)
  return features.query_grid_batch(backbone, s.images[picks], labels, s.k)


def episode_grids(backbone: Backbone, sets: Sequence[LabelledSet], episodes: int, shots: int,
                  seed: int, k_max: int, cache: Cache | None = None):
  """Padded query-episode grids of every set: what the aligner reads on the query side.

  Each episode is ``shots`` images per class (:func:`draw_episodes`), lifted by
  :func:`know2vec_jax.features.query_grid_batch` exactly as a user's query is.

  Returns:
    (grids float32 [T, episodes, K_max, K_max, D], masks float32 [T, K_max]).
  """
  grids = np.zeros((len(sets), episodes, k_max, k_max, backbone.dim), np.float32)
  masks = np.zeros((len(sets), k_max), np.float32)
  for i, s in enumerate(sets):
    if s.k > k_max:
      raise PipelineError(f"{s.name} has {s.k} classes, more than max_classes={k_max}")
    g = (cache.episodes(backbone, s, episodes, shots, seed) if cache is not None
         else _episodes(backbone, s, episodes, shots, seed))
    grids[i] = np.asarray(pad_grid(g, k_max)[0])
    masks[i, :s.k] = 1.0
  return grids, masks


def knowledge_grids(backbone: Backbone, pool_features: np.ndarray,
                    knowledge: Sequence[Knowledge], k_max: int):
  """Padded feature grids of extracted knowledge: what the aligner reads on the model side.

  The diagonal is the normalised mean phi of each class's anchors, the off-diagonal cells phi of
  the boundary points (:func:`know2vec_jax.features.knowledge_features`).

  Returns:
    (model ids [M], grids float32 [M, K_max, K_max, D], masks float32 [M, K_max]).
  """
  ids = [m for kn in knowledge for m in kn.model_ids]
  grids = np.zeros((len(ids), k_max, k_max, backbone.dim), np.float32)
  masks = np.zeros((len(ids), k_max), np.float32)
  row = 0
  for kn in knowledge:
    g = features.knowledge_features(backbone, kn.inputs,
                                    features.anchor_features(pool_features, kn.anchor_index))
    gp, m = pad_grid(g, k_max)
    n = len(kn.model_ids)
    grids[row:row + n], masks[row:row + n] = np.asarray(gp), np.asarray(m)
    row += n
  return ids, grids, masks


def extract(groups: Sequence[BlackBoxGroup], pool: np.ndarray, config: KnowledgeConfig,
            stores: Sequence[KnowledgeStore] = (), progress=None) -> list[Knowledge]:
  """:func:`know2vec_jax.knowledge.group_knowledge` over several stores: a model is read from the
  first store that holds it, else probed, and what is probed goes into every store."""
  stores = list(stores)
  if not stores:
    return group_knowledge(groups, pool, config, None, progress)
  first, rest = stores[0], stores[1:]
  for g in groups:
    for m, fp in zip(g.model_ids, g.fingerprints):
      if first.get(m, fp) is None:
        for s in rest:
          rec = s.get(m, fp)
          if rec is not None:
            first.put(m, fp, rec)
            break
  out = group_knowledge(groups, pool, config, first, progress)
  for g in groups:
    for m, fp in zip(g.model_ids, g.fingerprints):
      rec = first.get(m, fp)
      for s in rest:
        if rec is not None and s.get(m, fp) is None:
          s.put(m, fp, rec)
  return out


@dataclasses.dataclass
class TransferLabels:
  """The supervision of the fine-tune selection objective.

  Attributes:
    targets: each training target's labelled shot pool (its query episodes are drawn there).
    model_ids: the models, in the column order of ``accuracy``.
    accuracy: float32 [T, M] the measured fine-tune accuracy of each model on each target.
  """
  targets: list[LabelledSet]
  model_ids: list[str]
  accuracy: np.ndarray

  def __post_init__(self):
    self.accuracy = np.asarray(self.accuracy, np.float32)
    if self.accuracy.shape != (len(self.targets), len(self.model_ids)):
      raise PipelineError(f"accuracy must have shape [targets, models] = "
                          f"{[len(self.targets), len(self.model_ids)]}, got "
                          f"{list(self.accuracy.shape)}")


def retrieval_data(ids: Sequence[str], grids, masks, model_tasks: Mapping[str, Task],
                   episode_grid, episode_mask, tasks: Sequence[Task]) -> AlignData:
  """The ranking objective's data: each model labelled by the index of its task in ``tasks``."""
  index = {t: i for i, t in enumerate(tasks)}
  return AlignData(grids, masks, np.asarray([index[model_tasks[m]] for m in ids], np.int32),
                   episode_grid, episode_mask)


def transfer_data(ids: Sequence[str], grids, masks, labels: TransferLabels, episode_grid,
                  episode_mask) -> TransferData:
  """The fine-tune selection objective's data, model rows in ``labels.model_ids`` order."""
  missing = [m for m in labels.model_ids if m not in ids]
  if missing:
    raise PipelineError(f"accuracy is given for model {missing[0]!r}, which is not among the "
                        "black boxes")
  row = {m: i for i, m in enumerate(ids)}
  order = np.asarray([row[m] for m in labels.model_ids])
  return TransferData(grids[order], masks[order], episode_grid, episode_mask, labels.accuracy)
