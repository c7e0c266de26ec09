"""Training a proxy: the checks, the pipeline's stages, the ``"both"`` objective's accuracy head
and retrieval's calibration, in that order (docs/design.md, "Data flow").

:func:`fit` trains on any black boxes whose training tasks are known; :func:`train` on (some of) a
zoo's models, seen through black-box calls only (their records give each model's task). Both
return a :class:`know2vec_jax.proxy.Proxy`, which serves; nothing here serves a query.
:class:`know2vec_jax.proxy.Proxy`'s ``train`` and ``fit`` are these functions.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import jax
import numpy as np

from know2vec_jax import pipeline, retrieval, selection
from know2vec_jax import pool as pool_lib
from know2vec_jax.blackbox import BlackBoxGroup, groups_from_zoo
from know2vec_jax.data import Task
from know2vec_jax.index import ModelIndex
from know2vec_jax.mesh import probe_mesh
from know2vec_jax.pipeline import ProxyConfig, ProxyError, proxy_preset


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


def zoo_tasks(zoo, model_ids: Sequence[str] | None = None) -> dict[str, Task]:
  """The task each zoo model was trained on (the retrieval objective's supervision)."""
  ids = list(zoo.records) if model_ids is None else list(model_ids)
  return {m: zoo.record(m).task for m in ids}


def train(zoo, cfg: ProxyConfig | None = None, *, model_ids: Sequence[str] | None = None,
          transfer: pipeline.TransferLabels | None = None, cache: pipeline.Cache | None = None,
          zoo_dir=None, exclude_targets: Sequence[Task] = (), progress: bool = True):
  """Trains a proxy on (some of) a zoo's models, seen only through black-box calls.

  The records give each model's training task (the retrieval objective's supervision) and the
  sources of the probe pool; the weights stay behind :func:`groups_from_zoo`. The ``"finetune"``
  and ``"both"`` objectives also need measured fine-tune accuracies: unless ``transfer`` gives
  them, they are measured here (white-box, the zoo's weights): ``cfg.selection.targets`` training
  targets drawn from the zoo's train splits (:func:`know2vec_jax.selection.draw_targets`), every
  fine-tunable model fine-tuned on each (:func:`know2vec_jax.pipeline.finetune_labels`, cached
  under ``cache`` when ``zoo_dir`` is given).

  Args:
    zoo: a :class:`know2vec_jax.zoo.Zoo`.
    cfg: the config (default: the ``demo`` preset).
    model_ids: train on these models only (default: all).
    transfer: measured fine-tune accuracies for the ``"finetune"`` / ``"both"`` objectives
      (default: measured here).
    cache: share knowledge, phi, episodes and fine-tune labels through this cache.
    zoo_dir: the directory ``zoo`` was loaded from (keys the cached fine-tune labels).
    exclude_targets: tasks the drawn training targets must not equal (an evaluation's).
    progress: tqdm bars on the long steps.

  Returns:
    The trained :class:`know2vec_jax.proxy.Proxy`.

  Raises:
    ProxyError: see :func:`fit`; also a zoo without fine-tunable models for an objective that
      needs labels.
  """
  from know2vec_jax.proxy import Proxy
  cfg = cfg or proxy_preset("demo")
  ids = list(zoo.records) if model_ids is None else list(model_ids)
  if not ids:
    raise ProxyError("the zoo holds no models" if model_ids is None else "model_ids names no model")
  groups = groups_from_zoo(zoo, strategy=cfg.strategy, model_ids=ids,
                           mesh=probe_mesh(cfg.probe_devices))
  if cfg.needs_labels and transfer is None:
    transfer = measure_labels(zoo, cfg, ids, cache=cache, zoo_dir=zoo_dir,
                              exclude_targets=exclude_targets, progress=progress)
  return Proxy.fit(groups, zoo_tasks(zoo, ids), cfg, transfer=transfer, cache=cache,
                   progress=progress)


def measure_labels(zoo, cfg: ProxyConfig, model_ids: Sequence[str] | None = None, *,
                   cache: pipeline.Cache | None = None, zoo_dir=None,
                   exclude_targets: Sequence[Task] = (),
                   progress: bool = True) -> pipeline.TransferLabels:
  """The fine-tune labels :func:`train` measures: ``cfg.selection.targets`` targets drawn from
  the zoo's train splits, every fine-tunable model of ``model_ids`` fine-tuned on each.

  Raises:
    ProxyError: no fine-tunable model among ``model_ids``.
  """
  sel = cfg.selection
  ids = selection.finetunable(zoo, model_ids)
  if not ids:
    raise ProxyError(f"objective {cfg.objective!r} needs fine-tune accuracies, and none of the "
                 "models is a network that can be fine-tuned")
  try:
    targets = selection.draw_targets(zoo_tasks(zoo, model_ids).values(), sel.targets, sel.ks,
                                     sel.seed, exclude_targets, cfg.max_classes)
  except ValueError as e:
    raise ProxyError(str(e)) from e
  return pipeline.finetune_labels(zoo, ids, targets, sel.finetune, zoo_dir, cache, progress)


def _check(groups, model_tasks, cfg: ProxyConfig, transfer) -> list[str]:
  """The model ids; ProxyError for inputs the pipeline cannot train on."""
  ids = [m for g in groups for m in g.model_ids]
  if not ids:
    raise ProxyError("no black boxes to train on")
  if len(set(ids)) != len(ids):
    raise ProxyError(f"model id {next(m for m in ids if ids.count(m) > 1)!r} appears twice")
  missing = [m for m in ids if m not in model_tasks]
  if missing:
    raise ProxyError(f"no training task given for model {missing[0]!r}")
  too_big = [g.model_ids[0] for g in groups if g.num_classes > cfg.max_classes]
  if too_big:
    raise ProxyError(f"zoo model(s) have more than max_classes={cfg.max_classes} classes "
                 f"(e.g. {too_big[0]!r}); raise max_classes")
  if cfg.align.batch_size % jax.device_count():
    raise ProxyError(f"align.batch_size={cfg.align.batch_size} must be divisible by the "
                 f"{jax.device_count()} devices")
  if cfg.needs_labels != (transfer is not None):
    raise ProxyError(f"objective {cfg.objective!r} " + (
        "trains on TransferLabels (measured fine-tune accuracies): pass transfer=, or use "
        "Proxy.train, which measures them" if cfg.needs_labels else
        "takes no TransferLabels (the 'finetune' and 'both' objectives do)"))
  image_shape = groups[0].image_shape
  if image_shape[0] != image_shape[1] or any(g.image_shape != image_shape for g in groups):
    raise ProxyError(f"black boxes must all take one square image shape, got "
                 f"{sorted({g.image_shape for g in groups})}")
  return ids


def fit(groups: Sequence[BlackBoxGroup], model_tasks: Mapping[str, Task],
        cfg: ProxyConfig | None = None, *, transfer: pipeline.TransferLabels | None = None,
        cache: pipeline.Cache | None = None, progress: bool = True):
  """Trains a proxy on black boxes whose training tasks are known.

  Steps (:mod:`know2vec_jax.pipeline`): probe pool -> knowledge of every black box -> phi ->
  model grids -> query episodes (each task's train split, or each transfer target's shot pool)
  -> the aligner; then, for ``"both"``, the accuracy head (:func:`fit_selection_head`), and
  retrieval's calibration on validation queries of the training tasks (:func:`calibrate`).

  Args:
    groups: the black boxes (:func:`groups_from_zoo`, :class:`CallableBlackBox`, ...).
    model_tasks: model id -> the :class:`Task` it was trained on, for every black box.
    cfg: the config (default: the ``demo`` preset).
    transfer: measured fine-tune accuracies (the ``"finetune"`` and ``"both"`` objectives).
    cache: a :class:`know2vec_jax.pipeline.Cache` to share derived artifacts through.
    progress: tqdm bars.

  Returns:
    The trained :class:`know2vec_jax.proxy.Proxy`.

  Raises:
    ProxyError: no black boxes, a model without a task or with more than ``max_classes``
      classes, non-square images, an aligner batch the device count does not divide, or an
      objective without its labels.
  """
  from know2vec_jax.proxy import Proxy
  cfg = cfg or proxy_preset("demo")
  groups = list(groups)
  _check(groups, model_tasks, cfg, transfer)
  joint = cfg.objective == "finetune"
  t = pipeline.train(groups, model_tasks, cfg, transfer=transfer if joint else None,
                     cache=cache, progress=progress)
  proxy = Proxy(cfg, t.backbone, t.vectorizer, t.pool, t.tasks, t.info, t.knowledge,
                pool_provenance=t.pool_provenance)
  proxy._pool_features = t.pool_features
  if cfg.objective == "both":
    fit_selection_head(proxy, t.rows, transfer, cache)
  if cfg.objective != "finetune" and cfg.calibration_queries:
    t0 = time.perf_counter()
    queries, q_tasks = validation_queries(proxy, t.rows[0], model_tasks,
                                          sorted({g.image_shape for g in groups})[0])
    if queries:
      calibrate(proxy, t.rows, queries, q_tasks)
      proxy.info.setdefault("calibration", {}).update(
          {"queries": len(queries), "seconds": time.perf_counter() - t0})
  return proxy


def fit_selection_head(proxy, rows, labels: pipeline.TransferLabels,
                       cache: pipeline.Cache | None) -> None:
  """The ``"both"`` objective's second stage: an accuracy head on the proxy's frozen vectors,
  fitted on measured fine-tune accuracies (:func:`know2vec_jax.selection.fit_head`)."""
  t0 = time.perf_counter()
  sel = proxy.config.selection
  ids, grids, masks = rows[0], rows[1], rows[2]
  row = {m: i for i, m in enumerate(ids)}
  missing = [m for m in labels.model_ids if m not in row]
  if missing:
    raise ProxyError(f"fine-tune accuracy is given for model {missing[0]!r}, which is not among the "
                 "black boxes")
  order = np.asarray([row[m] for m in labels.model_ids])
  m_vec = proxy.embed_grids(grids[order], masks[order])
  ep, ep_mask = pipeline.episode_grids(proxy.backbone, labels.targets, sel.episodes, sel.shots,
                                       proxy.config.seed, proxy.max_classes, cache)
  t, e = ep.shape[:2]
  q_vec = proxy.embed_grids(ep.reshape((t * e,) + ep.shape[2:]), np.repeat(ep_mask, e, axis=0),
                            side="queries")
  head, info = selection.fit_head(q_vec, np.repeat(np.arange(t), e), m_vec, labels.accuracy,
                                  sel, proxy.vectorizer_config.hidden)
  proxy.set_accuracy_head(head)
  info["seconds"] = time.perf_counter() - t0
  info["target_names"] = [s.name for s in labels.targets]
  proxy.info["selection"] = info
  proxy.info.setdefault("seconds", {})["selection_head"] = info["seconds"]


def validation_queries(proxy, ids, model_tasks: Mapping[str, Task], image_shape) -> tuple:
  """The calibration's queries: ``calibration_queries`` queries of ``shots`` images per class
  from each training task's train split, outside the probe pool: queries like a user's, of tasks
  the proxy knows, that no training step saw.

  Args:
    proxy: the trained proxy (its config and pool provenance).
    ids: the training models; model_tasks: their tasks; image_shape: (H, W, C).

  Returns:
    (the (images, labels) queries, int [R] each one's task number).
  """
  cfg = proxy.config
  tasks = sorted({model_tasks[m] for m in ids}, key=lambda t: t.task_id)
  queries, q_tasks = [], []
  for task_no, task in enumerate(tasks):
    s = pipeline.LabelledSet.from_task(task, "train", image_shape)
    keep = ~np.isin(s.index, pool_lib.excluded_rows(proxy.pool_provenance, task.source, "train"))
    if np.bincount(s.labels[keep], minlength=s.k).min() == 0:
      continue  # a class whose every train image is in the pool: no clean validation query
    s = dataclasses.replace(s, name=s.name + ":calibration", index=s.index[keep],
                            labels=s.labels[keep])
    picks, y = pipeline.draw_episodes(s, cfg.calibration_queries, cfg.shots, cfg.seed)
    queries += [(s.images[p], yy) for p, yy in zip(picks, y)]
    q_tasks += [task_no] * len(y)
  return queries, np.asarray(q_tasks, np.int64)


def calibrate(proxy, rows, queries, q_tasks) -> None:
  """Fits retrieval's statistics on the validation queries and gives them to the proxy
  (:func:`know2vec_jax.retrieval.calibrate`): the queries' vectors become the reference queries,
  the familiar-task statistics come from them, and, with class matching on, the no-fit threshold
  is read from their best fit scores against the training models (``rows``: their ids, grids,
  masks and pool labels)."""
  cfg = proxy.config
  vectors, classes = proxy.describe_queries(queries, classes=cfg.match.enabled)
  # The reference queries first: the training models' hub rows are read against them.
  proxy.set_calibration(retrieval.Calibration(vectors))
  index = None
  if cfg.match.enabled:
    ids, grids, masks, labels = rows
    index = ModelIndex(proxy.embed_dim)
    vectors_m, classes_m = proxy.index_rows(grids, masks, labels)
    index.add_vectors(ids, vectors_m, classes=classes_m)
  calibration, report = retrieval.calibrate(cfg.match, vectors, q_tasks, cfg.false_alarm, index,
                                            classes)
  proxy.set_calibration(calibration)
  proxy.info.update(report)
