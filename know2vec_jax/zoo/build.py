"""Training a zoo from its specs: models grouped into stacks, each chunk of a stack one jitted call."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import shutil
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from know2vec_jax import distributed
from know2vec_jax import strategy as strategy_lib
from know2vec_jax.data import load_source, task_split
from know2vec_jax.zoo import estimators as estimators_lib
from know2vec_jax.zoo import store as store_lib
from know2vec_jax.zoo import train as train_lib
from know2vec_jax.zoo.architectures import flops_per_image
from know2vec_jax.zoo.specs import ModelSpec
from know2vec_jax.zoo.zoo import ModelRecord, Zoo, ZooError, ZooStack


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """How a zoo is trained (not what it contains: that is the specs).

  Attributes:
    image_size, channels: the common image format of every source.
    conv_impl: ``"im2col"`` (fast on CPU) or ``"xla"``.
    strategy: ``"vmap"``, ``"map"`` or ``"auto"`` over the model axis
      (:mod:`know2vec_jax.strategy`).
    chunk_size: models per jitted training call; the last chunk of a stack is padded with
      zero-step copies so that every chunk of a stack reuses one compilation.
    eval_chunk: images per forward call when measuring accuracy.
    train_eval_max: at most this many train images per model for the train accuracy.
  """
  image_size: int = 28
  channels: int = 1
  conv_impl: str = "im2col"
  strategy: str = "auto"
  chunk_size: int = 16
  eval_chunk: int = 512
  train_eval_max: int = 2000


class ImagePool:
  """Every image of every (source, split) a zoo needs, in one array, addressed by offsets."""

  def __init__(self, sources: list[str], image_size: int, channels: int):
    self.data = {s: load_source(s, image_size=image_size, channels=channels) for s in sources}
    parts, self.offsets, n = [], {}, 0
    for s in sources:
      for split in ("train", "test"):
        images, _ = self.data[s].split(split)
        self.offsets[(s, split)] = n
        parts.append(images)
        n += len(images)
    self.images = jax.device_put(np.concatenate(parts))

  def task_rows(self, spec: ModelSpec, split: str):
    """Global pool indices and task-local labels of one task split."""
    idx, y = task_split(self.data[spec.task.source], spec.task, split)
    return (idx + self.offsets[(spec.task.source, split)]).astype(np.int32), y


def _noisy_labels(y: np.ndarray, k: int, fraction: float, seed: int) -> np.ndarray:
  """Replaces ``fraction`` of the labels by a uniformly drawn *other* class (deterministic)."""
  if fraction <= 0:
    return y
  rng = np.random.default_rng([seed, 7])
  flip = rng.random(len(y)) < fraction
  shift = rng.integers(1, k, size=len(y))
  return np.where(flip, (y + shift) % k, y).astype(np.int32)


def check_specs(specs: list[ModelSpec]) -> None:
  """Raises ZooError on an empty zoo, duplicate ids or an unknown architecture."""
  from know2vec_jax.zoo.architectures import ARCHITECTURES
  known = set(ARCHITECTURES) | set(estimators_lib.FAMILIES)
  if not specs:
    raise ZooError("a zoo needs at least one model spec")
  seen = set()
  for s in specs:
    if s.model_id in seen:
      raise ZooError(f"duplicate model id {s.model_id!r}")
    seen.add(s.model_id)
    if s.arch not in known:
      raise ZooError(f"{s.model_id}: unknown architecture {s.arch!r}; known: {sorted(known)}")


def train_models(specs: list[ModelSpec], pool: ImagePool, stack_spec: train_lib.StackSpec,
                 config: BuildConfig):
  """Trains the given models (one architecture, one K) as one stack call.

  Returns:
    (stacked params, heldout accuracy [M], train accuracy [M], final loss [M]) as numpy/State.
  """
  strategy = strategy_lib.resolve(config.strategy, allowed=strategy_lib.TRACED)
  batch_sizes = {s.batch_size for s in specs}
  if len(batch_sizes) != 1:
    raise ZooError(f"models of one training call need one batch size, got {sorted(batch_sizes)}")
  train_rows, train_labels, test_rows, test_labels, evtr_rows, evtr_labels = [], [], [], [], [], []
  for s in specs:
    idx, y = pool.task_rows(s, "train")
    if len(idx) == 0:
      raise ZooError(f"{s.model_id}: task {s.task.task_id} has no training images")
    train_rows.append(idx)
    train_labels.append(_noisy_labels(y, s.k, s.label_noise, s.seed))
    sub = np.random.default_rng([s.seed, 3]).permutation(len(idx))[:config.train_eval_max]
    evtr_rows.append(idx[sub])
    evtr_labels.append(y[sub])
    idx, y = pool.task_rows(s, "test")
    test_rows.append(idx)
    test_labels.append(y)
  tr_idx, _ = train_lib.pad_rows(train_rows)
  tr_lab, _ = train_lib.pad_rows(train_labels)
  keys = train_lib.model_keys([s.seed for s in specs])
  params = train_lib.init_stack(stack_spec, [s.seed for s in specs])
  opt_state = train_lib.init_opt_state(params)
  data_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  graphdef = stack_spec.graphdef()
  params, opt_state, loss = train_lib.train_stack(
      graphdef, params, opt_state, data_keys,
      jnp.asarray([s.steps for s in specs], jnp.int32),
      jnp.asarray([s.learning_rate for s in specs], jnp.float32), pool.images, jnp.asarray(tr_idx),
      jnp.asarray([len(r) for r in train_rows], jnp.int32), jnp.asarray(tr_lab),
      batch_size=specs[0].batch_size, strategy=strategy)
  accs = []
  for rows, labels in ((test_rows, test_labels), (evtr_rows, evtr_labels)):
    idx, mask = train_lib.pad_rows(rows, config.eval_chunk)
    lab, _ = train_lib.pad_rows(labels, config.eval_chunk)
    accs.append(np.asarray(train_lib.stack_accuracy(
        graphdef, params, pool.images, jnp.asarray(idx), jnp.asarray(lab),
        jnp.asarray(mask), strategy=strategy, chunk=config.eval_chunk)))
  return params, accs[0], accs[1], np.asarray(loss)


def build_zoo(specs: list[ModelSpec], config: BuildConfig = BuildConfig(),
              progress: bool = True) -> tuple[Zoo, dict]:
  """Trains every model of a zoo and measures its accuracy on its own task.

  Models are grouped by (architecture, K) into stacks; each stack trains in chunks of
  ``config.chunk_size`` models, one jitted call per chunk.

  Args:
    specs: the models to train (e.g. ``preset_specs("demo")``).
    config: how to train them.
    progress: show a progress bar (tqdm) over model-steps.

  Returns:
    (the zoo, build info: seconds, model-steps, strategy, backend, conv_impl).
  """
  check_specs(specs)
  t0 = time.perf_counter()
  sources = sorted({s.task.source for s in specs})
  pool = ImagePool(sources, config.image_size, config.channels)
  image_shape, groups, fitted = _plan(specs, config)
  cost = functools.partial(_cost, image_shape=image_shape)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=round(sum(cost(s) for g in groups.values() for s in g)), unit="GFLOP",
               desc="training zoo",
               dynamic_ncols=True)
  stacks, records = {}, {}
  for name, group in groups.items():
    stack_spec = _stack_spec(group, image_shape, config)
    order, chunks = _stack_chunks(group, config.chunk_size)
    chunk_params, by_id = [], {}
    for c0, chunk in zip(range(0, len(order), config.chunk_size), chunks):
      if bar is not None:
        bar.set_postfix_str(f"{name} models {c0 + 1}-{c0 + len(chunk)}/{len(group)}")
      params, accs = _train_chunk(chunk, pool, stack_spec, config)
      chunk_params.append(params)
      by_id |= accs
      if bar is not None:
        bar.update(round(sum(cost(s) for s in chunk)))
    stacks[name] = ZooStack(name, stack_spec, [s.model_id for s in group],
                            _spec_order(group, order, chunk_params))
    for row, s in enumerate(group):
      records[s.model_id] = _record(s, pool, name, row, *by_id[s.model_id])
  if bar is not None:
    bar.close()
  estimator_sets = {}
  for name, group in fitted.items():
    estimator_sets[name], recs = fit_estimators(name, group, pool, image_shape, config,
                                                progress=progress)
    records.update(recs)
  # Records in spec order, whatever the stack grouping.
  records = {s.model_id: records[s.model_id] for s in specs}
  info = dict(seconds=time.perf_counter() - t0, model_steps=int(sum(s.steps for s in specs)),
              strategy=strategy_lib.resolve(config.strategy, allowed=strategy_lib.TRACED),
              backend=jax.default_backend(),
              conv_impl=config.conv_impl, num_models=len(specs))
  return Zoo(image_shape, stacks, records, estimator_sets), info


def _plan(specs: list[ModelSpec], config: BuildConfig):
  """(image shape, network specs by stack name, estimator specs by set name), in spec order."""
  image_shape = (config.image_size, config.image_size, config.channels)
  groups: dict[str, list[ModelSpec]] = {}
  fitted: dict[str, list[ModelSpec]] = {}
  for s in specs:
    (fitted if estimators_lib.is_estimator(s.arch) else groups).setdefault(
        f"{s.arch}-k{s.k}", []).append(s)
  return image_shape, groups, fitted


def _cost(s: ModelSpec, image_shape) -> float:
  """A network's training GFLOPs (3x the forward pass): progress and the split across processes
  are counted in them, because step costs differ by 60x across families."""
  return 3e-9 * flops_per_image(s.arch, s.k, image_shape) * s.batch_size * max(s.steps, 1)


def _stack_spec(group: list[ModelSpec], image_shape, config: BuildConfig) -> train_lib.StackSpec:
  return train_lib.StackSpec(group[0].arch, group[0].k, image_shape, config.conv_impl)


def _stack_chunks(group: list[ModelSpec], chunk_size: int):
  """(training order of the stack's models, its chunks of specs in that order)."""
  # Budgets sorted within a stack so that, under vmap, models of similar length share a chunk.
  order = sorted(range(len(group)), key=lambda i: (group[i].batch_size, group[i].steps))
  return order, [[group[i] for i in order[c0:c0 + chunk_size]]
                 for c0 in range(0, len(order), chunk_size)]


def _train_chunk(chunk: list[ModelSpec], pool: ImagePool, stack_spec, config: BuildConfig):
  """One jitted training call: (params of the chunk's models [real, ...], model id ->
  (held-out accuracy, train accuracy)). The chunk is padded with zero-step copies to
  ``config.chunk_size``, so its result does not depend on which other chunks are trained."""
  real = len(chunk)
  pad = [dataclasses.replace(chunk[0], steps=0)] * (config.chunk_size - real)
  params, heldout, train_acc, _ = train_models(chunk + pad, pool, stack_spec, config)
  return (jax.tree.map(lambda a: a[:real], params),
          {s.model_id: (float(heldout[j]), float(train_acc[j])) for j, s in enumerate(chunk)})


def _spec_order(group: list[ModelSpec], order: list[int], chunk_params: list):
  """The chunks' parameters concatenated, rows in spec order (the stored stack's order), not
  the training order."""
  params = jax.tree.map(lambda *a: jnp.concatenate(a), *chunk_params)
  trained_order = [group[i].model_id for i in order]
  perm = np.asarray([trained_order.index(s.model_id) for s in group])
  return jax.tree.map(lambda a: a[perm], params)


def _record(s: ModelSpec, pool: ImagePool, stack: str, row: int, heldout: float,
            train_acc: float) -> ModelRecord:
  data = pool.data[s.task.source]
  return ModelRecord(
      model_id=s.model_id, arch=s.arch, task=s.task,
      class_names=tuple(data.class_names[c] for c in s.task.classes), seed=s.seed,
      steps=s.steps, learning_rate=s.learning_rate, batch_size=s.batch_size,
      label_noise=s.label_noise, role=s.role, train_accuracy=train_acc,
      heldout_accuracy=heldout, stack=stack, stack_index=row)


# ---- several processes ---------------------------------------------------------------------------

def build_zoo_to(path, specs: list[ModelSpec], config: BuildConfig = BuildConfig(),
                 progress: bool = True, build_info: dict | None = None
                 ) -> tuple[Zoo | None, dict]:
  """Trains a zoo and writes it to ``path`` atomically, in one process or across several.

  One process (``jax.process_count() == 1``): :func:`build_zoo`, then
  :func:`know2vec_jax.zoo.save_zoo`, exactly. Several processes (every one calls this with the
  same arguments; docs/design.md, "Multi-process stages"): the training chunks (each stack's
  chunks of ``config.chunk_size`` models, and each estimator family's) are assigned to the
  processes by training FLOPs (:func:`know2vec_jax.distributed.assign`); each process trains its
  chunks exactly as one process does (same padding, seeds and compiled call, so the same
  parameters bit for bit) and writes them as its part (:func:`know2vec_jax.zoo.store.save_part`,
  atomic); after every process has written its part, process 0 verifies every part
  (:func:`merge_parts`) and writes the zoo. ``path`` must be on a filesystem every process
  shares. A process that dies leaves only the hidden parts directory, never a loadable zoo; the
  next build of the zoo removes it before any part is written (one line on stderr).

  Args:
    path: the zoo directory (created, or replaced once the new zoo is complete).
    specs, config, progress: as :func:`build_zoo` (across processes, process 0 shows its share).
    build_info: extra facts for the manifest's ``build`` record (e.g. the preset's name).

  Returns:
    (the zoo, build info); across processes the zoo on process 0 and None on the others.

  Raises:
    ZooError: bad specs, or (process 0) a missing or damaged part, named;
    DistributedError: training or the merge failed on another process.
  """
  if distributed.process_count() == 1:
    _remove_leftover_parts(path)
    zoo, info = build_zoo(specs, config, progress)
    info |= build_info or {}
    store_lib.save_zoo(zoo, path, info)
    return zoo, info
  check_specs(specs)
  t0 = time.perf_counter()
  count, me = distributed.process_count(), distributed.process_index()
  if me == 0:
    # Before the collective below, which no process leaves before process 0 enters it: no part
    # of this run exists yet.
    _remove_leftover_parts(path)
  # One id per build, chosen by process 0: parts of an earlier (failed) run are never merged.
  run = distributed.allgather(np.frombuffer(uuid.uuid4().bytes[:6], np.uint8))[0].tobytes().hex()
  parts = store_lib.parts_dir(path, run)
  pool = ImagePool(sorted({s.task.source for s in specs}), config.image_size, config.channels)
  image_shape, groups, fitted = _plan(specs, config)
  units = _units(groups, fitted, config, image_shape)
  owner = distributed.assign([u["cost"] for u in units], count)

  def train_share():
    stacks, estimators, accs = [], [], {}
    bar = None
    if progress and me == 0:
      from tqdm.auto import tqdm
      bar = tqdm(total=round(sum(u["cost"] for u, p in zip(units, owner) if p == me)),
                 unit="GFLOP", desc=f"training zoo (process 0 of {count})", dynamic_ncols=True)
    for number, (u, p) in enumerate(zip(units, owner)):
      if p != me:
        continue
      ids = [s.model_id for s in u["specs"]]
      if u["kind"] == "stack":
        params, a = _train_chunk(u["specs"], pool, _stack_spec(groups[u["name"]], image_shape,
                                                                config), config)
        stacks.append({"unit": number, "stack": u["name"], "model_ids": ids, "params": params})
        accs |= a
      else:
        est, recs = fit_estimators(u["name"], u["specs"], pool, image_shape, config)
        estimators.append({"unit": number, "set": u["name"], "model_ids": ids,
                           "blobs": est.blobs})
        accs |= {m: (r.heldout_accuracy, r.train_accuracy) for m, r in recs.items()}
      if bar is not None:
        bar.update(round(u["cost"]))
    if bar is not None:
      bar.close()
    store_lib.save_part(parts, me, count, run, stacks, estimators, accs)

  distributed.local_step("zoo training", train_share)
  info = dict(model_steps=int(sum(s.steps for s in specs)),
              strategy=strategy_lib.resolve(config.strategy, allowed=strategy_lib.TRACED),
              backend=jax.default_backend(), conv_impl=config.conv_impl, num_models=len(specs),
              processes=count) | (build_info or {})

  def merge():
    zoo = merge_parts(parts, count, run, specs, config, pool)
    store_lib.save_zoo(zoo, path, dict(info, seconds=time.perf_counter() - t0))
    shutil.rmtree(parts, ignore_errors=True)  # the zoo is complete: its parts are not needed
    return zoo

  zoo = distributed.on_writer("zoo", merge)
  return zoo, dict(info, seconds=time.perf_counter() - t0)


def _remove_leftover_parts(path) -> None:
  """Removes the parts that unfinished builds of this zoo left, saying so in one line."""
  removed = store_lib.remove_leftover_parts(path)
  if removed:
    print(f"removed the parts of {len(removed)} unfinished build(s) of {path}: "
          f"{', '.join(d.name for d in removed)}", file=sys.stderr)


def _units(groups: dict, fitted: dict, config: BuildConfig, image_shape) -> list[dict]:
  """The build's chunks in a fixed order: each stack's training chunks, then each estimator
  family's chunks of ``config.chunk_size`` models, with their costs (training GFLOPs; a fitted
  estimator is counted as the zoo's mean network, since its cost is not known in FLOPs)."""
  units = []
  for name, group in groups.items():
    for chunk in _stack_chunks(group, config.chunk_size)[1]:
      units.append({"kind": "stack", "name": name, "specs": chunk,
                    "cost": sum(_cost(s, image_shape) for s in chunk)})
  nets = [u["cost"] / len(u["specs"]) for u in units]
  per_estimator = float(np.mean(nets)) if nets else 1.0
  for name, group in fitted.items():
    for c0 in range(0, len(group), config.chunk_size):
      chunk = group[c0:c0 + config.chunk_size]
      units.append({"kind": "estimators", "name": name, "specs": chunk,
                    "cost": per_estimator * len(chunk)})
  return units


def merge_parts(parts, count: int, run: str, specs: list[ModelSpec], config: BuildConfig,
                pool: ImagePool | None = None) -> Zoo:
  """The zoo assembled from the parts of a multi-process build (run by process 0).

  Every part must be present and complete, of this run, and hold exactly the chunks
  :func:`know2vec_jax.distributed.assign` gave its process; each chunk is verified against the
  checksums its part recorded. The stacks are then assembled as :func:`build_zoo` assembles
  them (chunks in training order, rows in spec order).

  Args:
    parts: the run's parts directory (:func:`know2vec_jax.zoo.store.parts_dir`).
    count: the number of parts (processes).
    run: the run's id.
    specs, config: what every process was asked to build.
    pool: the sources' images (for the class names); loaded when None.

  Returns:
    The :class:`Zoo`.

  Raises:
    ZooError: a missing, incomplete, foreign or damaged part (the first one, named).
  """
  image_shape, groups, fitted = _plan(specs, config)
  units = _units(groups, fitted, config, image_shape)
  owner = distributed.assign([u["cost"] for u in units], count)
  got, accs = {}, {}
  parts = pathlib.Path(parts)
  for i in range(count):
    want = {}
    for number, (u, p) in enumerate(zip(units, owner)):
      if p == i:
        ids = [s.model_id for s in u["specs"]]
        want[number] = (("stack", _stack_spec(groups[u["name"]], image_shape, config), ids)
                        if u["kind"] == "stack" else ("estimators", ids))
    chunks, a = store_lib.load_part(parts, i, count, run, want)
    got |= chunks
    accs |= a
  if pool is None:
    pool = ImagePool(sorted({s.task.source for s in specs}), config.image_size, config.channels)
  numbers = {}
  for number, u in enumerate(units):
    numbers.setdefault((u["kind"], u["name"]), []).append(number)
  stacks, records = {}, {}
  for name, group in groups.items():
    spec = _stack_spec(group, image_shape, config)
    order, _ = _stack_chunks(group, config.chunk_size)
    state = store_lib.stack_state(spec, len(group))
    nnx.replace_by_pure_dict(state, _spec_order(group, order,
                                                [got[n] for n in numbers[("stack", name)]]))
    stacks[name] = ZooStack(name, spec, [s.model_id for s in group], state)
    for row, s in enumerate(group):
      records[s.model_id] = _record(s, pool, name, row, *accs[s.model_id])
  estimator_sets = {}
  for name, group in fitted.items():
    blobs = [b for n in numbers[("estimators", name)] for b in got[n]]
    estimator_sets[name] = estimators_lib.EstimatorSet(
        name, group[0].arch, group[0].k, tuple(image_shape), [s.model_id for s in group], blobs)
    for row, s in enumerate(group):
      records[s.model_id] = _record(s, pool, name, row, *accs[s.model_id])
  return Zoo(image_shape, stacks, {s.model_id: records[s.model_id] for s in specs},
             estimator_sets)


def fit_estimators(name: str, specs: list[ModelSpec], pool: ImagePool, image_shape,
                   config: BuildConfig = BuildConfig(), progress: bool = False):
  """Fits the scikit-learn models of one family and K (:mod:`know2vec_jax.zoo.estimators`).

  Each is fitted on (a seeded subsample of) its task's train split, with the spec's label noise;
  ``steps`` is not used. Accuracies are measured like the Flax models'.

  Returns:
    (the :class:`EstimatorSet`, model id -> :class:`ModelRecord`).
  """
  images = np.asarray(pool.images)
  blobs, records = [], {}
  it = specs
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(specs, desc=f"fitting {name}", unit="model", dynamic_ncols=True)
  for row, s in enumerate(it):
    idx, y = pool.task_rows(s, "train")
    if len(idx) == 0:
      raise ZooError(f"{s.model_id}: task {s.task.task_id} has no training images")
    est = estimators_lib.fit(s.arch, images[idx], _noisy_labels(y, s.k, s.label_noise, s.seed),
                             s.seed)
    blobs.append(estimators_lib.dumps(est))
    acc = {}
    for split in ("test", "train"):
      idx, y = pool.task_rows(s, split)
      if split == "train":  # as for the Flax models: a seeded subsample of the train split
        sub = np.random.default_rng([s.seed, 3]).permutation(len(idx))[:config.train_eval_max]
        idx, y = idx[sub], y[sub]
      pred = est.predict(images[idx].reshape(len(idx), -1))
      acc[split] = float(np.mean(pred == y))
    records[s.model_id] = _record(s, pool, name, row, acc["test"], acc["train"])
  est_set = estimators_lib.EstimatorSet(name, specs[0].arch, specs[0].k, tuple(image_shape),
                                        [s.model_id for s in specs], blobs)
  return est_set, records

