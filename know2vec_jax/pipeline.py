"""The one path from black boxes to a trained proxy (docs/design.md, "Data flow").

    black-box groups --probe pool--> knowledge (anchors + boundary search, cached by model)
      --phi--> model grids [M, K_max, K_max, D]
    labelled sets (a task's train split, a target's shot pool) --phi--> query episodes
    model grids + episodes + supervision --> AlignData | TransferData --> the aligner

:class:`ProxyConfig` says how; :func:`train` runs every step. :class:`know2vec_jax.proxy.Proxy`
trains through it and nothing else, and so does every experiment (an NNR fold is a proxy trained
on the fold's models, a SF-MTE run is a proxy trained on measured fine-tune accuracies).
:class:`Cache` keeps what they derive (knowledge, phi, episodes) on disk, keyed by everything the
result depends on, so that proxies trained on different subsets of one zoo share one extraction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from know2vec_jax import config as config_lib
from know2vec_jax import features, storage
from know2vec_jax import pool as pool_lib
from know2vec_jax.align import (AlignConfig, AlignData, RankingObjective, Trainer,
                                TransferData, TransferObjective)
from know2vec_jax.backbone import Backbone, BackboneConfig, augment, train_backbone
from know2vec_jax.blackbox import BlackBoxGroup
from know2vec_jax.config import Presets, require
from know2vec_jax.data import Task, load_source, stable_seed, task_split
from know2vec_jax.knowledge import (Knowledge, KnowledgeConfig, KnowledgeStore, group_knowledge,
                                    store_context)
from know2vec_jax.mesh import PROBE_DEVICES
from know2vec_jax.pool import Pool, PoolConfig
from know2vec_jax.retrieval import MatchConfig
from know2vec_jax.selection import SelectionConfig
from know2vec_jax.strategy import STRATEGIES
from know2vec_jax.transfer import FinetuneConfig, TransferTarget, ground_truth, target_data
from know2vec_jax.vectorizers import Know2Vec, VectorizerConfig, pad_grid


PROXY_OBJECTIVES = ("retrieve", "finetune", "both")


class PipelineError(ValueError):
  """Training inputs that cannot be used (an empty zoo, a task too large, mismatched labels)."""


class ProxyError(ValueError):
  """A proxy that cannot be trained, saved, loaded or used as asked; the message says why
  (``know2vec_jax.proxy.ProxyError``: the proxy's modules share it)."""


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
  """Everything that decides how a proxy is trained.

  Attributes:
    pool: the probe pool (:mod:`know2vec_jax.pool`): unlabelled images, by default the test
      splits of the training models' sources (images no zoo model trained on), up to 800 per
      source and half of each split.
    knowledge: anchors and boundary search (T, A).
    backbone: phi (image size and channels always follow the black boxes; empty ``sources``
      means the (source, class) pairs of the training tasks; ``ssl_weight`` adds a contrastive
      loss on the probe pool's images).
    vectorizer: the Know2Vec encoders (default: attention, one shared encoder).
    objective: ``"retrieve"`` (rank the models of a query's task first; supervised by each
      model's training task), ``"finetune"`` (rank by measured fine-tune accuracy, with an
      accuracy head, trained jointly; supervised by :class:`TransferLabels`) or ``"both"``
      (``"retrieve"``, then an accuracy head fitted on the frozen vectors from
      :class:`TransferLabels`: one index serves retrieval and selection). ``"transfer"`` is read
      as ``"finetune"`` (its earlier name).
    ranking, transfer: the two aligner losses' settings (``transfer``: the ``"finetune"``
      objective's).
    selection: how the product measures fine-tune labels on targets drawn from the zoo, and how
      the ``"both"`` objective's accuracy head is fitted (:mod:`know2vec_jax.selection`).
    align: the aligner's optimisation.
    episodes, shots: query episodes per training task (or target) and images per class in each.
    episode_augment: the share of query episodes shown as nuisance views (shifted, rotated,
      re-contrasted, noisy; :func:`nuisance_views` with phi's ``aug_*`` ranges), so that the
      aligner maps a perturbed query of a task near the same models as a clean one.
    match: how retrieval scores a (query, model) pair: class-level matching beside the aligned
      vectors, the shortlist, the no-fit threshold (:mod:`know2vec_jax.classmatch`).
    calibration_queries: validation queries per training task (train-split images outside the
      probe pool) on which the no-fit threshold is calibrated after training (0: no flag).
    false_alarm: the share of those validation queries the no-fit flag may fire on.
    max_classes: K_max, the most classes a model or query may have.
    strategy: model-axis strategy for probing zoo stacks (:mod:`know2vec_jax.strategy`).
    probe_devices: the local devices zoo stacks are probed over, their model axis sharded
      (:func:`know2vec_jax.mesh.probe_mesh`: ``auto`` every local accelerator, ``all``, ``one``);
      the knowledge is the same either way.
    seed: probe-pool and episode sampling.
  """
  pool: PoolConfig = PoolConfig()
  knowledge: KnowledgeConfig = KnowledgeConfig()
  backbone: BackboneConfig = BackboneConfig()
  vectorizer: VectorizerConfig = VectorizerConfig()
  objective: str = "retrieve"
  ranking: RankingObjective = RankingObjective()
  transfer: TransferObjective = TransferObjective()
  selection: SelectionConfig = SelectionConfig()
  align: AlignConfig = AlignConfig()
  episodes: int = 32
  shots: int = 5
  episode_augment: float = 0.0
  match: MatchConfig = MatchConfig()
  calibration_queries: int = 2
  false_alarm: float = 0.02
  max_classes: int = 10
  strategy: str = "auto"
  probe_devices: str = "auto"
  seed: int = 0

  def __post_init__(self):
    for name in ("episodes", "shots"):
      require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    require(0.0 <= self.episode_augment <= 1.0, f"episode_augment must be in [0, 1], got "
            f"{self.episode_augment}")
    require(self.max_classes >= 2, f"max_classes must be >= 2, got {self.max_classes}")
    require(self.calibration_queries >= 0, f"calibration_queries must be >= 0, got "
            f"{self.calibration_queries}")
    require(0.0 <= self.false_alarm < 1.0, f"false_alarm must be in [0, 1), got "
            f"{self.false_alarm}")
    if self.objective == "transfer":  # the earlier name of "finetune" (saved configs)
      object.__setattr__(self, "objective", "finetune")
    require(self.objective in PROXY_OBJECTIVES, f"objective must be one of {PROXY_OBJECTIVES}, "
            f"got {self.objective!r}")
    require(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got "
            f"{self.strategy!r}")
    require(self.probe_devices in PROBE_DEVICES, f"probe_devices must be one of "
            f"{PROBE_DEVICES}, got {self.probe_devices!r}")

  @property
  def loss(self) -> RankingObjective | TransferObjective:
    """The settings of the chosen objective."""
    return self.transfer if self.objective == "finetune" else self.ranking

  @property
  def needs_labels(self) -> bool:
    """Whether training needs measured fine-tune accuracies (:class:`TransferLabels`)."""
    return self.objective in ("finetune", "both")


PRESETS: Presets[ProxyConfig] = Presets("proxy")


@PRESETS.register("tiny")
def _tiny() -> ProxyConfig:
  """For tests and smoke runs: a proxy of the 8-model tiny zoo trains in seconds."""
  return ProxyConfig(
      pool=PoolConfig(per_source=120),
      knowledge=KnowledgeConfig(search_steps=3, anchors_per_class=4),
      backbone=BackboneConfig(channels=(8, 16), strides=(2, 2), dim=32, steps=60, batch_size=64,
                              max_per_source=600),
      vectorizer=VectorizerConfig(variant="attention", shared=True, hidden=32, embed_dim=32,
                                  heads=2, layers=1),
      align=AlignConfig(steps=60, batch_size=16, warmup_steps=10), episodes=4, shots=3)


# phi trained on nuisance views and half the aligner's query episodes shown as such views: chosen
# on validation queries (experiments/generalise.py, --validate): with class matching, the worst of
# five perturbed validation views kept 0.89 top-1 against 0.84 without them, clean equal.
# phi also learns from the probe pool's unlabelled images (contrastive, ssl_weight 1): chosen on
# the open-world validation carves (experiments/openworld.py, --validate): a source no training
# model has, top-1 0.748 against 0.694 with labels alone (2 seeds, 3 carves).
_LEVERS = dict(backbone=BackboneConfig(augment=0.8, ssl_weight=1.0), episode_augment=0.5)


@PRESETS.register("demo")
def _demo() -> ProxyConfig:
  """The default: a pool of the training sources' test splits (800 per source), T = 8, 1,500
  aligner steps, phi on the training tasks' labels and the pool's images (contrastive), phi and
  query episodes on nuisance views, class matching."""
  return ProxyConfig(**_LEVERS)


@PRESETS.register("full")
def _full() -> ProxyConfig:
  """Twice the probe pool (1,600 per source), T = 10, 64 episodes: for larger zoos."""
  return ProxyConfig(pool=PoolConfig(per_source=1600), knowledge=KnowledgeConfig(search_steps=10),
                     episodes=64, **_LEVERS)


# Fine-tune selection (`know2vec train --preset select`, then `know2vec select`): the vectors
# trained on measured fine-tune labels (objective "finetune") of 192 training targets, the aligner
# settings and the scorer chosen on validation targets carved from the training targets of the
# SF-MTE query-dependent benchmark (experiments/sfmte.py: QD_ALIGNER and the target count, whose
# numbers are there; held-out validation targets ranked at weighted tau 0.698 by q.m against 0.672
# by the accuracy head). Query episodes of 10 shots per class, the benchmark's query size.
@PRESETS.register("select")
def _select() -> ProxyConfig:
  """Fine-tune selection: vectors trained on fine-tune labels of 192 targets (2,000 steps, listwise
  target temperature 1, score temperature 0.1), ranked by q.m (``selection.scorer``)."""
  return ProxyConfig(objective="finetune", episodes=8, shots=10,
                     align=AlignConfig(steps=2000, batch_size=16, warmup_steps=50),
                     transfer=TransferObjective(temperature=0.1, target_temperature=1.0),
                     selection=SelectionConfig(targets=192, scorer="q.m"))


# Near-twin batches for the aligner (RankingObjective.hard_share): chosen on validation queries of
# the varied zoo (experiments/generalise.py, --validate, round 7): labels-only knn left out
# 0.75 -> 0.81 top-5, logreg 0.90 -> 0.98, seen tasks 0.985 -> 0.989, unseen 0.907 -> 0.897.
# Not validated on the demo zoo's NNR tasks, so the demo preset keeps uniform batches.
@PRESETS.register("varied")
def _varied() -> ProxyConfig:
  """The demo preset for zoos of many families and look-alike tasks (the ``varied`` zoo): half
  of every aligner batch drawn from each item's near-twin tasks."""
  return ProxyConfig(ranking=RankingObjective(hard_share=0.5), **_LEVERS)


def proxy_preset(name: str) -> ProxyConfig:
  """A named proxy config (:data:`PRESETS`: ``tiny``, ``demo``, ``full``, ``varied``).

  Raises:
    ConfigError: an unknown name.
  """
  return PRESETS.get(name)


def probe_pool(config: PoolConfig, sources: Sequence[str], seed: int, image_shape) -> Pool:
  """The proxy's unlabelled probe pool (:func:`know2vec_jax.pool.build`): ``config``'s entries,
  or the test splits of ``sources`` (the training models' sources) when it names none.

  Returns:
    A :class:`know2vec_jax.pool.Pool` (images and provenance).
  """
  return pool_lib.build(config, sources, seed, image_shape)


def task_classes(tasks) -> dict[str, list[int]]:
  """Source -> the sorted classes the tasks use in it: what phi may learn labels of."""
  out: dict[str, set] = {}
  for t in tasks:
    out.setdefault(t.source, set()).update(int(c) for c in t.classes)
  return {s: sorted(c) for s, c in sorted(out.items())}


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

  @classmethod
  def from_target(cls, target: TransferTarget, finetune: FinetuneConfig,
                  image_shape=(28, 28, 1)) -> "LabelledSet":
    """A fine-tune target's shot pool (the images its measured runs train on): where the query
    episodes that stand for the target are drawn."""
    td = target_data(target, finetune.shots, finetune.test_per_class, image_shape[0],
                     image_shape[2])
    index = np.concatenate(td.pool)
    return cls(f"{target.name}:{target.task.task_id}:{target.split}:"
               f"{finetune.shots}x{finetune.test_per_class}", td.images, index,
               td.labels[index].astype(np.int32), target.k)


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
    self.grid_memo: dict[str, np.ndarray] = {}  # model grids in memory (knowledge_grids)

  def knowledge_store(self, pool: np.ndarray, config: KnowledgeConfig) -> KnowledgeStore:
    return KnowledgeStore(store_context(pool, config), self.path / "knowledge")

  def _key(self, *parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]

  def backbone(self, config: BackboneConfig, classes: Mapping[str, Sequence[int]], image_shape,
               progress: bool = True, unlabelled: np.ndarray | None = None
               ) -> tuple[Backbone, dict]:
    """phi for these settings (:func:`know2vec_jax.backbone.train_backbone`): loaded when
    trained before, else trained and stored. Keyed by the config, the labelled (source, class)
    pairs, the image shape and, when the contrastive loss is on, the unlabelled images."""
    parts = [config_lib.to_dict(config), sorted(config.sources) if config.sources else
             {s: list(c) for s, c in sorted(classes.items())}, list(image_shape)]
    if config.ssl_weight and unlabelled is not None:
      parts.append(hashlib.sha256(np.ascontiguousarray(unlabelled, np.float32)).hexdigest())
    key = self._key(*parts)
    where = self.path / "backbone" / key
    if (where / "backbone.json").exists():
      return Backbone.load(where), json.loads((where / "info.json").read_text())
    bb, info = train_backbone(config, image_shape=image_shape, progress=progress,
                              classes=dict(classes),
                              unlabelled=unlabelled if config.ssl_weight else None)
    bb.save(where)
    storage.write_json_atomic(where / "info.json", info)
    return bb, info

  def episodes(self, backbone: Backbone, s: LabelledSet, episodes: int, shots: int, seed: int,
               views: float = 0.0):
    """The query-episode grids [episodes, k, k, D] of one set (see :func:`episode_grids`)."""
    parts = (backbone.fingerprint, s.name, episodes, shots, seed)
    if views:  # the nuisance views use phi's aug_* ranges, so they key the entry too
      parts += (views, config_lib.to_dict(backbone.config))
    key = self._key(*parts)
    f = self.path / "episodes" / f"{key}.npz"
    want = (episodes, s.k, s.k, backbone.dim)
    if f.exists():
      arrays, _ = storage.load_arrays(f, PipelineError, check=lambda a, m: None if (
          a["grid"].shape == want) else f"grid shape {a['grid'].shape}, expected {want}")
      return arrays["grid"]
    grid = _episodes(backbone, s, episodes, shots, seed, views)
    storage.save_arrays(f, {"grid": grid}, {"set": s.name, "backbone": backbone.fingerprint})
    return grid


def _episodes(backbone, s: LabelledSet, episodes: int, shots: int, seed: int,
              views: float = 0.0) -> np.ndarray:
  picks, labels = draw_episodes(s, episodes, shots, seed)
  images = s.images[picks]
  if views:
    images = nuisance_views(images, views, backbone.config, stable_seed("views", seed, s.name))
  return features.query_grid_batch(backbone, images, labels, s.k)


_augment = jax.jit(augment, static_argnames="config")


def nuisance_views(images: np.ndarray, fraction: float, config: BackboneConfig,
                   seed: int) -> np.ndarray:
  """Episodes of which ``fraction`` are shown as a user might take them: every image of a chosen
  episode goes through :func:`know2vec_jax.backbone.augment` (random shift, rotation, contrast,
  brightness and noise in ``config``'s ranges), the others stay as they are.

  Args:
    images: float32 [E, N, H, W, C], E episodes of N images.
    fraction: the share of episodes to perturb, in [0, 1].
    config: the nuisance ranges (phi's ``aug_*`` fields).
    seed: which episodes, and their draws.

  Returns:
    float32 [E, N, H, W, C].
  """
  e = images.shape[0]
  chosen = np.random.default_rng(seed).random(e) < fraction
  if not chosen.any():
    return images
  # Every episode is drawn and the chosen ones kept: one compiled shape per episode size, where
  # selecting first would compile once per count of chosen episodes.
  flat = jnp.asarray(images.reshape((-1,) + images.shape[2:]))
  views = np.asarray(_augment(jax.random.key(seed % (2 ** 31)), flat,
                             dataclasses.replace(config, augment=1.0))).reshape(images.shape)
  return np.where(chosen[:, None, None, None, None], views, images)


def episode_grids(backbone: Backbone, sets: Sequence[LabelledSet], episodes: int, shots: int,
                  seed: int, k_max: int, cache: Cache | None = None, views: float = 0.0):
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
    g = (cache.episodes(backbone, s, episodes, shots, seed, views) if cache is not None
         else _episodes(backbone, s, episodes, shots, seed, views))
    grids[i] = np.asarray(pad_grid(g, k_max)[0])
    masks[i, :s.k] = 1.0
  return grids, masks


def knowledge_grids(backbone: Backbone, pool_features: np.ndarray,
                    knowledge: Sequence[Knowledge], k_max: int, cache: "Cache | None" = None):
  """Padded feature grids of extracted knowledge: what the aligner reads on the model side.

  The diagonal is the normalised mean phi of each class's anchors, the off-diagonal cells phi of
  the boundary points (:func:`know2vec_jax.features.knowledge_features`).

  Args:
    backbone, pool_features: phi and phi of the probe pool.
    knowledge: the groups' knowledge.
    k_max: the padded class count.
    cache: remember each model's grid (in memory, keyed by phi, the pool and its knowledge), so
      proxies of one experiment that share phi lift each model once.

  Returns:
    (model ids [M], grids float32 [M, K_max, K_max, D], masks float32 [M, K_max]).
  """
  ids = [m for kn in knowledge for m in kn.model_ids]
  grids = np.zeros((len(ids), k_max, k_max, backbone.dim), np.float32)
  masks = np.zeros((len(ids), k_max), np.float32)
  memo = cache.grid_memo if cache is not None else None
  pool_key = hashlib.sha1(np.ascontiguousarray(pool_features)).hexdigest() if memo is not None \
      else ""
  row = 0
  for kn in knowledge:
    n, k = len(kn.model_ids), kn.k
    keys = [hashlib.sha1(f"{backbone.fingerprint}|{pool_key}|".encode()
                         + kn.anchor_index[i].tobytes() + kn.flip_t[i].tobytes()).hexdigest()
            for i in range(n)] if memo is not None else []
    if memo is not None and all(key in memo for key in keys):
      g = np.stack([memo[key] for key in keys])
    else:
      g = features.knowledge_features(backbone, kn.inputs,
                                      features.anchor_features(pool_features, kn.anchor_index))
      if memo is not None:
        memo.update(zip(keys, np.asarray(g)))
    grids[row:row + n, :k, :k] = g
    masks[row:row + n, :k] = 1.0
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


def finetune_labels(zoo, model_ids: Sequence[str], targets: Sequence[TransferTarget],
                    finetune: FinetuneConfig, zoo_dir=None, cache: "Cache | None" = None,
                    progress: bool = True) -> TransferLabels:
  """Measured fine-tune accuracies of zoo models on training targets: the product's labels.

  Every model in ``model_ids`` is fine-tuned on every target (:func:`know2vec_jax.transfer.
  ground_truth`, white-box; ``finetune.runs`` runs averaged). Results are cached under
  ``cache.path / "finetune"`` when both ``cache`` and ``zoo_dir`` (whose manifest keys the
  entries) are given.

  Args:
    zoo: the zoo.
    model_ids: fine-tunable models (:func:`know2vec_jax.selection.finetunable`).
    targets: the training targets (:func:`know2vec_jax.selection.draw_targets`).
    finetune: the measuring protocol.
    zoo_dir: the directory the zoo was loaded from (for the cache key).
    cache: the derived-artifact cache.
    progress: a tqdm bar over (model, run) fine-tunes.

  Returns:
    :class:`TransferLabels` whose targets are the targets' shot pools.
  """
  if not model_ids:
    raise PipelineError("no fine-tunable (neural) model to measure fine-tune accuracies of")
  where = cache.path / "finetune" if cache is not None and zoo_dir is not None else None
  gt = ground_truth(zoo, zoo_dir, list(model_ids), targets, finetune, cache_dir=where,
                    progress=progress)
  sets = [LabelledSet.from_target(t, finetune, zoo.image_shape) for t in targets]
  return TransferLabels(sets, list(model_ids), np.stack([gt[t.name].mean(0) for t in targets]))


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


def bar(total: int, desc: str, progress: bool):
  """A tqdm bar over models, or None when ``progress`` is off (and on every process but 0 of a
  multi-process run, whose processes move through the same models together)."""
  if not progress or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="model", dynamic_ncols=True)


@dataclasses.dataclass
class Trained:
  """What :func:`train` makes: the parts of a :class:`know2vec_jax.proxy.Proxy`."""
  backbone: Backbone
  vectorizer: Know2Vec
  pool: np.ndarray
  pool_features: np.ndarray
  tasks: list[dict]
  info: dict
  knowledge: KnowledgeStore
  rows: tuple = ()  # (model ids, grids, masks, pool labels [M, N]) of the training models
  pool_provenance: list = dataclasses.field(default_factory=list)  # know2vec_jax.pool.Pool's


def train(groups: Sequence[BlackBoxGroup], model_tasks: Mapping[str, Task], cfg: ProxyConfig,
          transfer: TransferLabels | None = None, cache: Cache | None = None,
          progress: bool = True) -> Trained:
  """Every training step, from black boxes to trained vectorizers (inputs already validated by
  :meth:`know2vec_jax.proxy.Proxy.fit`).

  Steps: probe pool (``cfg.pool``; by default the test splits of the models' sources) ->
  knowledge of every black box (from ``cache`` where a model was probed before) -> phi (labels
  of the training tasks' classes; the pool's images with the contrastive loss) -> model grids ->
  query episodes (each task's train split, or each transfer target's shot pool) -> the aligner.
  """
  t_start = time.perf_counter()
  seconds = {}
  ids = [m for g in groups for m in g.model_ids]
  image_shape = groups[0].image_shape
  sources = sorted({model_tasks[m].source for m in ids})

  # 1. Probe pool: unlabelled images (by default the test splits of the models' sources, never
  # an image a zoo model trained on).
  t = time.perf_counter()
  built = probe_pool(cfg.pool, sources, cfg.seed, image_shape)
  pool = built.images
  seconds["pool"] = time.perf_counter() - t

  # 2. Decision knowledge, black-box (read from the cache where a model was probed before).
  t = time.perf_counter()
  store = KnowledgeStore(store_context(pool, cfg.knowledge))
  shared = [cache.knowledge_store(pool, cfg.knowledge)] if cache is not None else []
  pbar = bar(len(ids), "extracting knowledge", progress)
  knowledge = extract(groups, pool, cfg.knowledge, [store] + shared,
                      pbar.update if pbar is not None else None)
  if pbar is not None:
    pbar.close()
  seconds["knowledge"] = time.perf_counter() - t

  # 3. Backbone phi: labels of the training tasks' (source, class) pairs only, and the pool's
  # images (unlabelled) when the contrastive loss is on.
  t = time.perf_counter()
  classes = task_classes(model_tasks[m] for m in ids) if cfg.backbone.labelled else {}
  unlabelled = pool if cfg.backbone.ssl_weight else None
  if cache is not None:
    backbone, bb_info = cache.backbone(cfg.backbone, classes, image_shape, progress, unlabelled)
  else:
    backbone, bb_info = train_backbone(cfg.backbone, image_shape=image_shape, progress=progress,
                                       classes=classes, unlabelled=unlabelled)
  seconds["backbone"] = time.perf_counter() - t

  # 4. Model grids and query episodes.
  t = time.perf_counter()
  k_max = cfg.max_classes
  pool_feat = np.asarray(backbone.embed(pool))
  ids, grids, masks = knowledge_grids(backbone, pool_feat, knowledge, k_max, cache)
  # Training rows follow the caller's model order (``model_tasks``), not the grouping of the
  # black boxes: how models are packed into groups does not change what the proxy learns.
  row = {m: i for i, m in enumerate(ids)}
  order = np.asarray([row[m] for m in model_tasks if m in row])
  ids, grids, masks = [ids[i] for i in order], grids[order], masks[order]
  labels = np.concatenate([kn.pool_labels for kn in knowledge])[order]
  if transfer is None:
    tasks = sorted({model_tasks[m] for m in ids}, key=lambda t: t.task_id)
    sets = [LabelledSet.from_task(t, "train", image_shape) for t in tasks]
  else:
    sets = list(transfer.targets)
  ep, ep_mask = episode_grids(backbone, sets, cfg.episodes, cfg.shots, cfg.seed, k_max, cache,
                              cfg.episode_augment)
  if transfer is None:
    data = retrieval_data(ids, grids, masks, model_tasks, ep, ep_mask, tasks)
    task_rows = [{"task_id": t.task_id, "source": t.source, "classes": list(t.classes),
                  "models": int(np.sum(data.model_task == i))} for i, t in enumerate(tasks)]
  else:
    data = transfer_data(ids, grids, masks, transfer, ep, ep_mask)
    task_rows = [{"task_id": s.name, "k": s.k} for s in sets]
  seconds["grids"] = time.perf_counter() - t

  # 5. The aligner.
  trainer = Trainer(cfg.vectorizer, backbone.dim, cfg.align, cfg.loss, data)
  history = trainer.run(progress=progress)
  seconds["align"] = trainer.seconds
  seconds["total"] = time.perf_counter() - t_start

  info = {"seconds": seconds, "num_models": len(ids), "num_tasks": len(task_rows),
          "sources": sources, "pool_size": int(len(pool)),
          "pool": pool_lib.summary(built.provenance),
          "knowledge_queries_per_model": {str(kn.k): int(kn.queries[0]) for kn in knowledge},
          "backbone": bb_info, "align_final": history[-1] if history else {},
          "backend": jax.default_backend(), "devices": jax.device_count()}
  return Trained(backbone, trainer.model(), pool, pool_feat, task_rows, info, store,
                 (ids, grids, masks, labels), built.provenance)
