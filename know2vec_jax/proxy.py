"""The trained Know2Vec proxy: backbone phi, aligned vectorizers and probe pool, as one artifact.

A :class:`Proxy` is what a zoo owner trains once and then serves: it vectorizes any black box
(a zoo stack or a wrapped callable) from its decision knowledge on the proxy's own probe pool, turns
a user's few-shot labelled images into a query vector, and builds the :class:`ModelIndex` that
answers queries. Training follows the NNR experiment (``experiments/nnr.py``) with every zoo task
as a training task:

    probe pool -> knowledge (black-box) -> backbone phi -> model grids -> query episodes
    -> aligner -> trained vectorizers

Layout of a saved proxy directory (written atomically, like every artifact of the project)::

    proxy.json     manifest: format, version, configs, tasks, pool shape, checksums, training info
    backbone/      orbax checkpoint of phi's parameters
    vectorizer/    orbax checkpoint of the Know2Vec vectorizers (and the aligner's task head)
    pool/          orbax checkpoint of the probe pool {"images": float32 [N, H, W, C]}

The pool is stored with the proxy so that a black box added later is probed with exactly the images
the training models were probed with: its vector is comparable to theirs without retraining.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from know2vec_jax import features, storage
from know2vec_jax.align import AlignConfig, AlignData, Trainer
from know2vec_jax.backbone import Backbone, BackboneConfig, train_backbone
from know2vec_jax.blackbox import BlackBoxGroup, groups_from_zoo
from know2vec_jax.data import load_source
from know2vec_jax.index import IndexStoreError, ModelIndex
from know2vec_jax.knowledge import KnowledgeConfig, extract_knowledge
from know2vec_jax.vectorizers import Know2Vec, VectorizerConfig, pad_grid

FORMAT = "know2vec-proxy"
VERSION = 1
MANIFEST = "proxy.json"
TREES = ("backbone", "vectorizer", "pool")


class ProxyError(ValueError):
  """A proxy that cannot be trained, saved, loaded or used as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
  """Everything that decides how a proxy is trained.

  Attributes:
    pool_per_source: unlabelled train-split images per zoo source in the probe pool.
    knowledge: anchors and boundary search (T, A).
    backbone: phi; empty ``sources`` means the zoo's sources (image size and channels always
      follow the zoo).
    vectorizer: the Know2Vec encoders (default: attention, one shared encoder). ``max_classes``
      and ``feature_dim`` are taken from this config's ``max_classes`` and phi's size.
    align: the aligner's training.
    episodes, shots: query episodes per training task, drawn from its train split.
    max_classes: K_max, the most classes a model or query may have.
    seed: probe-pool and episode sampling.
  """
  pool_per_source: int = 800
  knowledge: KnowledgeConfig = KnowledgeConfig()
  backbone: BackboneConfig = BackboneConfig()
  vectorizer: VectorizerConfig = VectorizerConfig(variant="attention", shared=True)
  align: AlignConfig = AlignConfig()
  episodes: int = 32
  shots: int = 5
  max_classes: int = 10
  seed: int = 0

  def __post_init__(self):
    for name in ("pool_per_source", "episodes", "shots"):
      if getattr(self, name) < 1:
        raise ProxyError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.max_classes < 2:
      raise ProxyError(f"max_classes must be >= 2, got {self.max_classes}")
    if self.knowledge.search_steps < 0 or self.knowledge.anchors_per_class < 1:
      raise ProxyError("knowledge.search_steps must be >= 0 and knowledge.anchors_per_class >= 1")
    if self.align.steps < 1 or self.align.batch_size < 1:
      raise ProxyError("align.steps and align.batch_size must be >= 1")
    if self.backbone.steps < 1:
      raise ProxyError(f"backbone.steps must be >= 1, got {self.backbone.steps}")

  def vectorizer_config(self, feature_dim: int) -> VectorizerConfig:
    """The effective vectorizer config: K_max from this config, D from phi."""
    return dataclasses.replace(self.vectorizer, max_classes=self.max_classes,
                               feature_dim=feature_dim)


def proxy_preset(name: str) -> ProxyConfig:
  """A named proxy config.

  - ``tiny``: for tests and smoke runs; a proxy of the 8-model tiny zoo trains in seconds (a small
    phi, T = 3, 60 aligner steps). Its retrieval quality is not meaningful.
  - ``demo``: the settings of ``experiments/nnr.py``'s default variant (pool 800 per source, T = 8,
    32 anchors per class, 32 episodes of 5 shots, 1,500 aligner steps; the model selection behind
    them is documented there).
  - ``full``: the demo settings with twice the probe pool (1,600 per source), T = 10 and 64 episodes
    per task: more anchors and query variety for larger zoos, about twice the demo's knowledge
    extraction time.

  Raises:
    ProxyError: an unknown name.
  """
  if name == "demo":
    return ProxyConfig()
  if name == "full":
    return ProxyConfig(pool_per_source=1600, knowledge=KnowledgeConfig(search_steps=10),
                       episodes=64)
  if name == "tiny":
    return ProxyConfig(
        pool_per_source=120,
        knowledge=KnowledgeConfig(search_steps=3, anchors_per_class=4),
        backbone=BackboneConfig(channels=(8, 16), strides=(2, 2), dim=32, steps=60,
                                batch_size=64, max_per_source=600),
        vectorizer=VectorizerConfig(variant="attention", shared=True, hidden=32, embed_dim=32,
                                    heads=2, layers=1),
        align=AlignConfig(steps=60, batch_size=16, warmup_steps=10),
        episodes=4, shots=3, max_classes=10)
  raise ProxyError(f"unknown proxy preset {name!r}; choose one of {PRESETS}")


PRESETS = ("tiny", "demo", "full")


# ---- configs <-> dicts and command-line overrides ----------------------------------------------

def config_to_dict(cfg) -> dict:
  """A (nested) config dataclass as a JSON-serialisable dict."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls, d: Mapping, what: str = "config"):
  """Rebuilds a (nested) config dataclass from :func:`config_to_dict`'s output.

  Lists become tuples; nested dataclasses are rebuilt from their defaults' types.

  Raises:
    ProxyError: a key the dataclass does not have, or a value it refuses.
  """
  if not isinstance(d, Mapping):
    raise ProxyError(f"{what} must be a dict, got {type(d).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(d) - set(fields)
  if unknown:
    raise ProxyError(f"{what} has unknown field(s) {sorted(unknown)} for {cls.__name__}")
  kw = {}
  defaults = cls()
  for name, value in d.items():
    current = getattr(defaults, name)
    if dataclasses.is_dataclass(current):
      kw[name] = config_from_dict(type(current), value, f"{what}.{name}")
    else:
      kw[name] = tuple(value) if isinstance(value, list) else value
  try:
    return cls(**kw)
  except (TypeError, ValueError) as e:
    raise ProxyError(f"{what} is invalid: {e}") from e


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses an override's value as the type of the field's current value."""
  def bad(expect):
    return ProxyError(f"bad value {text!r} for {key}: expected {expect}")
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise bad("true or false")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an integer") from None
  if isinstance(current, float):
    try:
      value = float(text)
    except ValueError:
      raise bad("a number") from None
    if not np.isfinite(value):
      raise bad("a finite number")
    return value
  if isinstance(current, str):
    return text
  if isinstance(current, tuple):
    items = [s.strip() for s in text.strip("()[] ").split(",") if s.strip()]
    kind = type(current[0]) if current else str
    try:
      return tuple(kind(s) for s in items)
    except ValueError:
      raise bad(f"a comma-separated list of {kind.__name__}") from None
  raise bad(f"a value of type {type(current).__name__}")


def override_keys(cfg: ProxyConfig) -> list[str]:
  """Every key :func:`apply_overrides` accepts, e.g. ``align.steps``."""
  keys = []
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
    else:
      keys.append(f.name)
  return keys


def apply_overrides(cfg: ProxyConfig, overrides: Iterable[str]) -> ProxyConfig:
  """Applies ``key=value`` overrides (``align.steps=200``, ``seed=3``, ``backbone.sources=a,b``).

  Args:
    cfg: the config to start from.
    overrides: strings ``section.field=value`` or ``field=value``; the value is parsed as the
      field's type (int, float, bool, str, or a comma-separated tuple).

  Returns:
    The new config.

  Raises:
    ProxyError: a malformed override, an unknown key (the message lists the valid ones), a value
      of the wrong type, or a value the config refuses.
  """
  for item in overrides:
    if "=" not in item:
      raise ProxyError(f"override {item!r} is not key=value (e.g. align.steps=200)")
    key, text = (s.strip() for s in item.split("=", 1))
    parts = key.split(".")
    if key not in override_keys(cfg):
      # Name the keys of the section the user meant, else the top level and the sections.
      section = getattr(cfg, parts[0], None) if len(parts) == 2 else None
      if dataclasses.is_dataclass(section):
        valid = [f"{parts[0]}.{f.name}" for f in dataclasses.fields(section)]
      else:
        valid = [k if "." not in k else k.split(".")[0] + ".*" for k in override_keys(cfg)]
        valid = list(dict.fromkeys(valid))
      raise ProxyError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
    try:
      if len(parts) == 1:
        cfg = dataclasses.replace(cfg, **{key: _parse_value(key, text, getattr(cfg, key))})
      else:
        section = getattr(cfg, parts[0])
        value = _parse_value(key, text, getattr(section, parts[1]))
        cfg = dataclasses.replace(cfg, **{parts[0]: dataclasses.replace(section,
                                                                        **{parts[1]: value})})
    except ProxyError:
      raise
    except (TypeError, ValueError) as e:  # a config's own validation
      raise ProxyError(f"bad value {text!r} for {key}: {e}") from e
  return cfg


# ---- the proxy ---------------------------------------------------------------------------------

def _pure(tree) -> dict:
  """A pytree of arrays (or an NNX state) as a pure dict of host numpy arrays: the form orbax
  writes and the checksums are computed on."""
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return jax.tree.map(np.asarray, tree)


def _checksum(tree) -> str:
  """SHA-256 over the paths, dtypes, shapes and bytes of a pytree's leaves (order-stable)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


@functools.partial(jax.jit, static_argnames=("graphdef", "side"))
def _embed(graphdef, state, grid, mask, side: str):
  model = nnx.merge(graphdef, state)
  return model.embed_models(grid, mask) if side == "models" else model.embed_queries(grid, mask)


def _bar(total: int, desc: str, progress: bool):
  if not progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="model", dynamic_ncols=True)


def zoo_metadata(zoo, model_ids: Sequence[str] | None = None) -> dict[str, dict]:
  """Index metadata of zoo models from their records (never their weights).

  Returns:
    model id -> {arch, task, source, domain, k, classes, role, steps, train_accuracy,
    heldout_accuracy}.
  """
  ids = list(zoo.records) if model_ids is None else list(model_ids)
  out = {}
  for mid in ids:
    r = zoo.record(mid)
    out[mid] = {"arch": r.arch, "task": r.task.task_id, "source": r.source, "domain": r.domain,
                "k": r.k, "classes": list(r.class_names), "role": r.role, "steps": r.steps,
                "train_accuracy": float(r.train_accuracy),
                "heldout_accuracy": float(r.heldout_accuracy)}
  return out


class Proxy:
  """A trained Know2Vec proxy: frozen phi, aligned vectorizers, probe pool, config and tasks.

  Build one with :meth:`train` or :meth:`load`. Attributes: ``config`` (:class:`ProxyConfig`),
  ``backbone`` (:class:`Backbone`), ``vectorizer`` (the trained :class:`Know2Vec` NNX module;
  ``vectorizer.model_vectorizer`` / ``vectorizer.embed_queries`` can be used inside other JAX
  code), ``pool`` (float32 [N, H, W, C]), ``tasks`` (one dict per training task: task_id, source,
  classes, class_names, models), ``info`` (training facts: seconds per stage, final losses).
  """

  def __init__(self, config: ProxyConfig, backbone: Backbone, vectorizer: Know2Vec,
               pool: np.ndarray, tasks: list[dict], info: dict | None = None):
    self.config = config
    self.backbone = backbone
    self.vectorizer = vectorizer
    self.pool = np.asarray(pool, np.float32)
    self.tasks = list(tasks)
    self.info = dict(info or {})
    self._graphdef, self._state = nnx.split(vectorizer)
    self._pool_features = None
    self._trees = None

  # ---- properties --------------------------------------------------------------------------

  @property
  def vectorizer_config(self) -> VectorizerConfig:
    return self.vectorizer.cfg

  @property
  def embed_dim(self) -> int:
    """E, the size of model and query vectors (an index must have this vector size)."""
    return self.vectorizer.cfg.embed_dim

  @property
  def max_classes(self) -> int:
    return self.vectorizer.cfg.max_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.backbone.image_shape

  def _pure_trees(self) -> dict:
    if self._trees is None:
      self._trees = {"backbone": _pure(self.backbone.params), "vectorizer": _pure(self._state),
                     "pool": {"images": self.pool}}
    return self._trees

  @functools.cached_property
  def fingerprint(self) -> str:
    """A short hash of phi, the vectorizers and the pool: vectors of two proxies with the same
    fingerprint are comparable. Every index row this proxy adds records it (``proxy``)."""
    trees = self._pure_trees()
    return hashlib.sha256("".join(_checksum(trees[t]) for t in TREES).encode()).hexdigest()[:16]

  def pool_features(self) -> np.ndarray:
    """phi of the probe pool [N, D] (computed once)."""
    if self._pool_features is None:
      self._pool_features = np.asarray(self.backbone.embed(self.pool))
    return self._pool_features

  # ---- training ----------------------------------------------------------------------------

  @classmethod
  def train(cls, zoo, cfg: ProxyConfig | None = None, progress: bool = True) -> "Proxy":
    """Trains a proxy on a zoo, every task of the zoo being a training task.

    The zoo's models are seen only as black boxes (:func:`groups_from_zoo`); their records give
    the task each was trained on (the aligner's supervision) and the sources of the probe pool.

    Args:
      zoo: a :class:`know2vec_jax.zoo.Zoo`.
      cfg: the config (default: the ``demo`` preset).
      progress: tqdm bars on the long steps.

    Returns:
      The trained proxy.

    Raises:
      ProxyError: an empty zoo, a task with more classes than ``cfg.max_classes``, an aligner
        batch size the device count does not divide.
    """
    cfg = cfg or proxy_preset("demo")
    t_start = time.perf_counter()
    seconds = {}
    records = list(zoo.records.values())
    if not records:
      raise ProxyError("the zoo holds no models")
    too_big = [r.model_id for r in records if r.k > cfg.max_classes]
    if too_big:
      raise ProxyError(f"{len(too_big)} zoo model(s) have more than max_classes="
                       f"{cfg.max_classes} classes (e.g. {too_big[0]!r}); raise max_classes")
    if cfg.align.batch_size % jax.device_count():
      raise ProxyError(f"align.batch_size={cfg.align.batch_size} must be divisible by the "
                       f"{jax.device_count()} devices")
    ids = [r.model_id for r in records]
    sources = sorted({r.source for r in records})
    h, w, c = zoo.image_shape
    if h != w:
      raise ProxyError(f"zoo images must be square, got {zoo.image_shape}")

    def source(name):
      return load_source(name, image_size=h, channels=c)

    # 1. Probe pool: unlabelled train-split images of every domain (queries come from test
    # splits), drawn as in experiments/nnr.py so the demo preset reproduces its knowledge.
    t = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    pool = np.concatenate([
        source(s).train_images[rng.permutation(len(source(s).train_images))
                               [:cfg.pool_per_source]] for s in sources])
    seconds["pool"] = time.perf_counter() - t

    # 2. Decision knowledge, black-box.
    t = time.perf_counter()
    knowledge = {}
    queries = {}
    bar = _bar(len(ids), "extracting knowledge", progress)
    for g in groups_from_zoo(zoo):
      kn = extract_knowledge(g, pool, cfg.knowledge)
      for i, mid in enumerate(kn.model_ids):
        knowledge[mid] = (kn.inputs[i], kn.anchor_index[i])
        queries[mid] = int(kn.queries[i])
      if bar is not None:
        bar.update(g.num_models)
    if bar is not None:
      bar.close()
    seconds["knowledge"] = time.perf_counter() - t

    # 3. Backbone phi on the train splits of the zoo's sources.
    t = time.perf_counter()
    bcfg = dataclasses.replace(cfg.backbone, sources=cfg.backbone.sources or tuple(sources),
                               image_size=h, channels_in=c)
    backbone, bb_info = train_backbone(bcfg, progress=progress)
    seconds["backbone"] = time.perf_counter() - t

    # 4. Model grids [M, K_max, K_max, D] and query episodes from the tasks' train splits.
    t = time.perf_counter()
    k_max = cfg.max_classes
    pool_feat = np.asarray(backbone.embed(pool))
    grids = np.zeros((len(ids), k_max, k_max, backbone.dim), np.float32)
    masks = np.zeros((len(ids), k_max), np.float32)
    for i, mid in enumerate(ids):
      inputs, anchors = knowledge[mid]
      g = features.knowledge_features(backbone, inputs[None],
                                      features.anchor_features(pool_feat, anchors[None]))[0]
      gp, m = pad_grid(g, k_max)
      grids[i], masks[i] = gp, m
    tasks = sorted({r.task for r in records}, key=lambda t: t.task_id)
    task_index = {t: i for i, t in enumerate(tasks)}
    model_task = np.asarray([task_index[r.task] for r in records], np.int32)
    ep = np.zeros((len(tasks), cfg.episodes, k_max, k_max, backbone.dim), np.float32)
    task_mask = np.zeros((len(tasks), k_max), np.float32)
    for i, task in enumerate(tasks):
      g = features.task_episodes(backbone, source(task.source), task, cfg.episodes, cfg.shots,
                                 seed=cfg.seed * 7919 + i, split="train")
      ep[i] = pad_grid(g, k_max)[0]
      task_mask[i, :task.k] = 1.0
    seconds["grids"] = time.perf_counter() - t

    # 5. The aligner.
    vcfg = cfg.vectorizer_config(backbone.dim)
    trainer = Trainer(vcfg, cfg.align, AlignData(grids, masks, model_task, ep, task_mask))
    history = trainer.run(progress=progress)
    seconds["align"] = trainer.seconds
    seconds["total"] = time.perf_counter() - t_start

    names = {r.task: list(r.class_names) for r in records}
    task_rows = [{"task_id": t.task_id, "source": t.source, "classes": list(t.classes),
                  "class_names": names[t], "models": int(np.sum(model_task == i))}
                 for i, t in enumerate(tasks)]
    info = {"seconds": seconds, "num_models": len(ids), "num_tasks": len(tasks),
            "sources": sources, "pool_size": int(len(pool)),
            "knowledge_queries_per_model": {str(r.k): queries[r.model_id] for r in records},
            "backbone": bb_info, "align_final": history[-1] if history else {},
            "backend": jax.default_backend(), "devices": jax.device_count()}
    proxy = cls(cfg, backbone, trainer.model(), pool, task_rows, info)
    proxy._pool_features = pool_feat
    return proxy

  # ---- vectorizing models and queries ------------------------------------------------------

  def _check_group(self, g: BlackBoxGroup) -> None:
    if not isinstance(g, BlackBoxGroup):
      raise ProxyError(f"expected a BlackBoxGroup (a zoo stack or a CallableBlackBox), got "
                       f"{type(g).__name__}")
    if tuple(g.image_shape) != self.image_shape:
      raise ProxyError(f"black box {g.model_ids[0]!r} takes images of shape {g.image_shape}, "
                       f"the proxy's probe pool has {self.image_shape}")
    if g.num_classes > self.max_classes:
      raise ProxyError(f"black box {g.model_ids[0]!r} has {g.num_classes} classes, more than the "
                       f"proxy's maximum of {self.max_classes} (max_classes)")

  def model_grids(self, groups: Sequence[BlackBoxGroup], progress: bool = False):
    """Knowledge-grid features of black boxes, probed with the proxy's pool.

    Returns:
      (model ids [M], grids float32 [M, K_max, K_max, D], masks float32 [M, K_max]).
    """
    groups = list(groups)
    for g in groups:
      self._check_group(g)
    ids = [m for g in groups for m in g.model_ids]
    if len(set(ids)) != len(ids):
      dup = next(m for m in ids if ids.count(m) > 1)
      raise ProxyError(f"model id {dup!r} appears in more than one black box")
    k_max = self.max_classes
    grids = np.zeros((len(ids), k_max, k_max, self.backbone.dim), np.float32)
    masks = np.zeros((len(ids), k_max), np.float32)
    bar = _bar(len(ids), "vectorizing models", progress)
    row = 0
    for g in groups:
      kn = extract_knowledge(g, self.pool, self.config.knowledge)
      feat = features.knowledge_features(
          self.backbone, kn.inputs, features.anchor_features(self.pool_features(),
                                                             kn.anchor_index))
      gp, m = pad_grid(feat, k_max)
      grids[row:row + g.num_models], masks[row:row + g.num_models] = gp, m
      row += g.num_models
      if bar is not None:
        bar.update(g.num_models)
    if bar is not None:
      bar.close()
    return ids, grids, masks

  def embed_grids(self, grids, masks, side: str = "models", batch_size: int = 256) -> np.ndarray:
    """Unit vectors [M, E] of padded feature grids (``side``: "models" or "queries")."""
    if side not in ("models", "queries"):
      raise ProxyError(f"side must be 'models' or 'queries', got {side!r}")
    grids, masks = np.asarray(grids, np.float32), np.asarray(masks, np.float32)
    out = [np.asarray(_embed(self._graphdef, self._state, jnp.asarray(grids[i:i + batch_size]),
                             jnp.asarray(masks[i:i + batch_size]), side))
           for i in range(0, len(grids), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

  def vectorize(self, groups: BlackBoxGroup | Sequence[BlackBoxGroup], progress: bool = False
                ) -> tuple[list[str], np.ndarray]:
    """Model vectors of black boxes with the trained model vectorizer (no retraining).

    Args:
      groups: :class:`BlackBoxGroup` s: zoo stacks (:func:`groups_from_zoo`) or
        :class:`know2vec_jax.blackbox.CallableBlackBox` s wrapping any callable.
      progress: a tqdm bar over models.

    Returns:
      (model ids [M], unit vectors float32 [M, E]).

    Raises:
      ProxyError: wrong image shape, too many classes, repeated ids;
      BlackBoxError / BudgetExceededError from the black boxes themselves.
    """
    if isinstance(groups, BlackBoxGroup):
      groups = [groups]
    ids, grids, masks = self.model_grids(groups, progress)
    return ids, self.embed_grids(grids, masks, "models")

  def embed_query(self, images, labels) -> np.ndarray:
    """The query vector of a few-shot labelled image set.

    Args:
      images: float32 [N, H, W, C] in [0, 1] (the proxy's image shape).
      labels: int [N] in 0..K-1, every class with at least one image, 2 <= K <= max_classes.

    Returns:
      float32 [E], a unit vector.

    Raises:
      InputError: bad images or labels (see :func:`know2vec_jax.features.check_query`).
    """
    grid = features.query_grid(self.backbone, images, labels, self.max_classes)
    gp, m = pad_grid(grid, self.max_classes)
    return self.embed_grids(np.asarray(gp)[None], np.asarray(m)[None], "queries")[0]

  def build_index(self, groups: BlackBoxGroup | Sequence[BlackBoxGroup],
                  metadata: Mapping[str, dict] | None = None, index: ModelIndex | None = None,
                  progress: bool = False) -> ModelIndex:
    """Vectorizes black boxes and adds them to an index (a new one unless ``index`` is given).

    Each row's metadata: ``num_classes``, ``proxy`` (this proxy's fingerprint), then the group's
    own ``metadata`` attribute when it has one (a dict per model id, or one dict for a group of one
    model), then ``metadata[model_id]`` (e.g. :func:`zoo_metadata`).

    Raises:
      ProxyError: as :meth:`vectorize`, or an index whose vector size is not the proxy's;
      IndexStoreError: an id already in ``index`` (checked before any black box is called).
    """
    if isinstance(groups, BlackBoxGroup):
      groups = [groups]
    groups = list(groups)
    if index is None:
      index = ModelIndex(self.embed_dim)
    self.check_index(index)
    present = [m for g in groups for m in g.model_ids if m in index]
    if present:
      raise IndexStoreError(f"{len(present)} model id(s) already in the index, e.g. "
                            f"{present[0]!r}")
    ids, vectors = self.vectorize(groups, progress)
    metas = []
    for g in groups:
      own = getattr(g, "metadata", None)
      for mid in g.model_ids:
        meta = {"num_classes": g.num_classes, "proxy": self.fingerprint}
        if isinstance(own, Mapping):
          if isinstance(own.get(mid), Mapping):
            meta.update(own[mid])
          elif g.num_models == 1 and not any(isinstance(v, Mapping) for v in own.values()):
            meta.update(own)
        if metadata is not None:
          meta.update(metadata.get(mid, {}))
        metas.append(meta)
    index.add_vectors(ids, vectors, metas)
    return index

  def check_index(self, index: ModelIndex) -> None:
    """Raises ProxyError when the index's vector size is not this proxy's E."""
    if index.dim != self.embed_dim:
      raise ProxyError(f"the index holds vectors of size {index.dim} but this proxy's vectorizer "
                       f"makes vectors of size {self.embed_dim}: it was built by another proxy; "
                       "rebuild it with this proxy")

  # ---- storage -----------------------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the proxy atomically: an interrupted save leaves any previous proxy at ``path``
    intact and loadable.

    Returns:
      The absolute path written.
    """
    trees = self._pure_trees()
    has_accuracy_head = getattr(self.vectorizer, "accuracy_head", None) is not None
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
        "config": config_to_dict(self.config),
        "backbone": {"config": config_to_dict(self.backbone.config),
                     "num_labels": self.backbone.num_labels},
        "vectorizer": {"config": config_to_dict(self.vectorizer_config),
                       "num_tasks": int(self.vectorizer.task_head.out_features),
                       "accuracy_head": has_accuracy_head},
        "pool_shape": list(self.pool.shape), "tasks": self.tasks,
        "checksums": {t: _checksum(trees[t]) for t in TREES},
        "info": json.loads(json.dumps(self.info, default=float)),
    }
    return storage.save_artifact(path, trees, MANIFEST, manifest)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Proxy":
    """Loads a saved proxy, bit for bit.

    Raises:
      ProxyError: a missing, incomplete, truncated or corrupted proxy (the message names the
        path); every array is checked against the checksum recorded at save time.
    """
    root = pathlib.Path(path).expanduser().absolute()
    m = storage.read_manifest(root, MANIFEST, FORMAT, VERSION, "proxy", ProxyError,
                              hint=" (train one with `know2vec train`)")
    try:
      cfg = config_from_dict(ProxyConfig, m["config"], "config")
      bcfg = config_from_dict(BackboneConfig, m["backbone"]["config"], "backbone config")
      vcfg = config_from_dict(VectorizerConfig, m["vectorizer"]["config"], "vectorizer config")
      num_labels, num_tasks = int(m["backbone"]["num_labels"]), int(m["vectorizer"]["num_tasks"])
      pool_shape = tuple(int(d) for d in m["pool_shape"])
      checksums, tasks = dict(m["checksums"]), list(m["tasks"])
    except (KeyError, TypeError, ValueError) as e:
      raise ProxyError(f"{root / MANIFEST} is corrupted: {type(e).__name__}: {e}") from e
    backbone = Backbone(bcfg, num_labels)
    # Only pass accuracy_head when set, so proxies without one load with any Know2Vec version.
    extra = {"accuracy_head": True} if m["vectorizer"].get("accuracy_head") else {}
    vectorizer = Know2Vec(vcfg, num_tasks, rngs=nnx.Rngs(0), **extra)
    _, v_state = nnx.split(vectorizer)
    targets = {"backbone": _pure(backbone.params), "vectorizer": _pure(v_state),
               "pool": {"images": np.zeros(pool_shape, np.float32)}}
    restored = {}
    with ocp.StandardCheckpointer() as ckpt:
      for name in TREES:
        ckpt_dir = root / name
        if not ckpt_dir.is_dir():
          raise ProxyError(f"proxy {root} is corrupted: {name} checkpoint missing ({ckpt_dir})")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), targets[name])
        try:
          tree = _pure(ckpt.restore(ckpt_dir, abstract))
        except Exception as e:  # orbax raises many types for a damaged checkpoint
          raise ProxyError(f"proxy {root}: cannot read the {name} checkpoint {ckpt_dir}: "
                           f"{type(e).__name__}: {e}") from e
        # orbax restores the stored shapes whatever the target says, so check them.
        got = jax.tree.map(lambda a: (a.shape, a.dtype), tree)
        want = jax.tree.map(lambda a: (a.shape, a.dtype), targets[name])
        if got != want or _checksum(tree) != checksums.get(name):
          raise ProxyError(f"proxy {root} is corrupted: the {name} checkpoint {ckpt_dir} does "
                           "not match the checksum and shapes recorded in proxy.json")
        restored[name] = tree
    nnx.replace_by_pure_dict(backbone.params, restored["backbone"])
    nnx.replace_by_pure_dict(v_state, restored["vectorizer"])
    nnx.update(vectorizer, v_state)
    proxy = cls(cfg, backbone, vectorizer, restored["pool"]["images"], tasks, m.get("info", {}))
    if proxy.fingerprint != m.get("fingerprint"):
      raise ProxyError(f"proxy {root} is corrupted: fingerprint mismatch")
    return proxy

  def load_index(self, path: str | os.PathLike, **kwargs) -> ModelIndex:
    """Loads an index and checks its vector size against this proxy's (ProxyError if not)."""
    index = ModelIndex.load(path, **kwargs)
    self.check_index(index)
    return index


def query(proxy: Proxy, index: ModelIndex, images, labels, k: int = 10) -> list[dict]:
  """Ranks the index's models for a few-shot task.

  Args:
    proxy: the trained proxy.
    index: an index built with this proxy.
    images: float32 [N, H, W, C] in [0, 1].
    labels: int [N] in 0..K-1.
    k: how many models to return.

  Returns:
    One dict per model, best first: ``rank`` (1-based), ``model_id``, ``score`` (cosine of the
    query and model vectors), ``arch`` and ``task`` (None when the index has no such metadata),
    then the rest of the model's metadata.

  Raises:
    InputError: a bad query; ProxyError: an index of another vector size, or top models that
    another proxy vectorized (their ``proxy`` fingerprint differs).
  """
  proxy.check_index(index)
  q = proxy.embed_query(images, labels)
  scores, ids = index.search(q, k)
  rows = []
  for r, (mid, s) in enumerate(zip(ids[0], scores[0]), 1):
    meta = index.metadata(mid)
    fp = meta.get("proxy")
    if fp is not None and fp != proxy.fingerprint:
      raise ProxyError(f"model {mid!r} of the index was vectorized by another proxy ({fp}, this "
                       f"one is {proxy.fingerprint}); rebuild the index with this proxy")
    rows.append({"rank": r, "model_id": mid, "score": float(s), "arch": meta.pop("arch", None),
                 "task": meta.pop("task", None)} | meta)
  return rows
