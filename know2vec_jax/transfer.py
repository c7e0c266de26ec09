"""Measured transferability: the SF-MTE ground truth (white-box; the benchmark's oracle).

For a target task, every selected zoo model is fine-tuned on the target's labelled training images
and tested on its held-out images: a new K-way head, the whole network trained for a short fixed
budget (``FinetuneConfig.steps``; ~30 steps, since after 10 the result is mostly head-initialisation
noise), averaged over ``runs`` runs that change the seed *and* resample the training images
together. This is the number a user cares about ("how good will this model be on my task after
fine-tuning") and the one transferability estimators are judged against.

Two design choices keep the ground truth cheap and its ranking stable:

- **Batched over each zoo stack.** All models of one architecture and all runs fine-tune in one
  jitted call (``zoo.train.train_stack``, ``lax.map`` or ``vmap`` over rows), so the whole ground
  truth of a 100-model zoo on one target takes seconds to a minute on a CPU.
- **Compiled once per architecture and protocol.** Every target is padded to shapes its protocol
  shares with all targets of the zoo (:func:`finetune_accuracy`), so a new target reuses the
  compiled fine-tunes instead of compiling its own. Measured on the 435-model demo zoo (frozen
  body, 2-core x86-64 CPU shared with other work): 16.6 fine-tunes/s with a compilation per
  target, 44.8 with the shared shapes, with identical accuracies.
- **Common random numbers.** Within a run every model sees the same training sample, the same batch
  order and (per architecture) the same head initialisation: differences between models are then not
  drowned by sampling noise, which matters because the zoo's spread is small
  (docs/design.md, "What we measured").

The cheaper ``mode="linear"`` (frozen body, a new linear head trained on its features) is offered
for the aligner's *training* targets only; evaluation targets use ``mode="full"``.

Results are cached on disk per (zoo, model selection, target, config): a target is computed once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from know2vec_jax import distributed, storage
from know2vec_jax import strategy as strategy_lib
from know2vec_jax.data import DataError, Task, load_source, stable_seed, task_split
from know2vec_jax.zoo import train as train_lib
from know2vec_jax.zoo.zoo import Zoo, ZooError

MODES = ("full", "linear")


class TransferError(ValueError):
  """A ground-truth request that cannot be served (bad target, config or cache); says why."""


@dataclasses.dataclass(frozen=True)
class TransferTarget:
  """A target task of the transferability benchmark.

  Attributes:
    name: a short display name (e.g. ``fashion-tops``).
    task: the source (transforms included) and its classes, in label order.
    split: which fixed split of the source the target's images come from. Evaluation targets use
      ``"test"``: images no part of the proxy (backbone, aligner) was trained on.
    kind: a free-form tag for reports (``fine-grained``, ``domain-shift``, ...).
  """
  name: str
  task: Task
  split: str = "test"
  kind: str = ""

  @property
  def k(self) -> int:
    return self.task.k

  def to_json(self) -> dict:
    return {"name": self.name, "task": self.task.to_json(), "split": self.split,
            "kind": self.kind}

  @classmethod
  def from_json(cls, d: dict) -> "TransferTarget":
    return cls(d["name"], Task.from_json(d["task"]), d.get("split", "test"), d.get("kind", ""))


def leak_key(task: Task) -> tuple[str, tuple[int, ...]]:
  """What two tasks must not share across a benchmark's evaluation and everything trained: the
  base dataset (transforms stripped) and the class set (order ignored)."""
  return task.source.split("+")[0], tuple(sorted(task.classes))


def leaks(evaluation: Sequence[Task], zoo: Sequence[Task] = (),
          training: Sequence[Task] = ()) -> list[str]:
  """The leak rule of a transferability benchmark, as code.

  No evaluation target may share (dataset, class set) with a zoo model or a training target, in
  any domain (:func:`leak_key`): a zoo model trained on the target's exact classes, or a training
  target of them, would let a method recognise the target instead of estimating transfer.

  Args:
    evaluation: the evaluation targets' tasks.
    zoo: the zoo models' tasks.
    training: the training targets' tasks.

  Returns:
    One line per violation (empty: no leak).
  """
  out = []
  for what, tasks in (("zoo model", zoo), ("training target", training)):
    seen = {}
    for t in tasks:
      seen.setdefault(leak_key(t), t)
    for e in evaluation:
      if leak_key(e) in seen:
        out.append(f"evaluation target {e.task_id} shares dataset and classes with {what} "
                   f"{seen[leak_key(e)].task_id}")
  return out


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """How the ground truth is measured.

  Attributes:
    mode: ``"full"`` (new head, whole network fine-tuned) or ``"linear"`` (frozen body, new head).
    steps: optimiser steps per run (Adam, warm-up then cosine decay).
    learning_rate: peak learning rate (``"full"``; ``"linear"`` uses 10x, the head alone is stable).
    batch_size: images per step.
    shots: training images per class in each run (resampled per run).
    test_per_class: at most this many held-out images per class (fixed across runs).
    runs: independent runs averaged; each changes the seed and the training sample together.
    seed: base seed.
    chunk_size: rows (model x run) per jitted call; bounds memory.
    strategy: ``"auto"``, ``"map"`` or ``"vmap"`` over the rows (see ``zoo.train``).
  """
  mode: str = "full"
  steps: int = 30
  learning_rate: float = 1e-3
  batch_size: int = 64
  shots: int = 50
  test_per_class: int = 300
  runs: int = 6
  seed: int = 0
  chunk_size: int = 32
  strategy: str = "auto"

  def __post_init__(self):
    if self.mode not in MODES:
      raise TransferError(f"mode must be one of {MODES}, got {self.mode!r}")
    for name in ("steps", "batch_size", "shots", "test_per_class", "runs", "chunk_size"):
      if getattr(self, name) < 1:
        raise TransferError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.runs < 2:
      raise TransferError(f"runs must be >= 2 (the noise ceiling needs two halves), "
                          f"got {self.runs}")


@dataclasses.dataclass(frozen=True)
class TargetData:
  """A target's images and its fixed division into a shot pool and a test set.

  Attributes:
    images: float32 [N, H, W, C], the target's images of its split.
    labels: int32 [N], task-local labels.
    pool: per class, the indices (into ``images``) runs draw their training shots from.
    test: int [T] indices of the fixed held-out images.
  """
  images: np.ndarray
  labels: np.ndarray
  pool: tuple[np.ndarray, ...]
  test: np.ndarray

  def train_sample(self, shots: int, seed: int) -> np.ndarray:
    """``shots`` indices per class from the pool (grouped by class), deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(p, size=shots, replace=False) for p in self.pool])


def target_data(target: TransferTarget, shots: int, test_per_class: int,
                image_size: int = 28, channels: int = 1) -> TargetData:
  """Splits a target's images into a per-class shot pool and a fixed test set.

  Per class, a fixed permutation (seeded by the target's task id) puts ``min(test_per_class,
  n_c - ceil(1.4 * shots))`` images in the test set and up to ``4 * shots`` of the rest in the
  pool, so every run can draw a fresh sample of ``shots`` images (the pool holds at least 1.4x
  that).

  Raises:
    TransferError: fewer than 2 classes, or a class too small for ``shots`` plus 10 test images.
  """
  task = target.task
  if task.k < 2:
    raise TransferError(f"target {target.name!r} has {task.k} class; a target needs at least 2")
  try:
    data = load_source(task.source, image_size=image_size, channels=channels)
    idx, labels = task_split(data, task, target.split)
    images = data.split(target.split)[0][idx]
  except DataError as e:
    raise TransferError(f"target {target.name!r}: {e}") from None
  rng = np.random.default_rng(stable_seed("target-split", task.task_id, target.split))
  need_pool = math.ceil(1.4 * shots)
  pool, test = [], []
  for c in range(task.k):
    members = rng.permutation(np.flatnonzero(labels == c))
    n_test = min(test_per_class, len(members) - need_pool)
    if n_test < 10:
      raise TransferError(
          f"target {target.name!r}: class {data.class_names[task.classes[c]]!r} has "
          f"{len(members)} images in the {target.split} split; {shots} shots need "
          f"{need_pool} for the pool plus at least 10 to test on")
    test.append(members[:n_test])
    # A pool of 4x the shots is plenty to resample from; capping it bounds what is loaded.
    pool.append(members[n_test:n_test + max(need_pool, 4 * shots)])
  # Keep only the images a run can touch (test set and shot pools), re-indexed.
  test = np.concatenate(test)
  keep = np.concatenate([test] + pool)
  remap = np.full(len(labels), -1, np.int64)
  remap[keep] = np.arange(len(keep))
  return TargetData(images[keep], labels[keep].astype(np.int32),
                    tuple(remap[p] for p in pool), remap[test])


def _run_seed(cfg: "FinetuneConfig", run: int, target: TransferTarget) -> int:
  return stable_seed("run", cfg.seed, run, target.task.task_id)


def run_sample(target: TransferTarget, cfg: "FinetuneConfig", run: int = 0,
               image_size: int = 28, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """The labelled training images of one ground-truth run: ``cfg.shots`` per class.

  Run 0's sample is what a user would hand the proxy as the query: the estimators see exactly the
  images the measured fine-tune started from.

  Returns:
    (images float32 [K * shots, H, W, C], labels int32 [K * shots]).
  """
  td = target_data(target, cfg.shots, cfg.test_per_class, image_size, channels)
  idx = td.train_sample(cfg.shots, _run_seed(cfg, run, target))
  return td.images[idx], td.labels[idx]


def _head_seeds(cfg: "FinetuneConfig", runs, target: TransferTarget, arch: str) -> list[int]:
  """Head-initialisation seed of each run: one per run, shared by every model of an arch."""
  return [stable_seed("head", cfg.seed, int(r), target.task.task_id, arch) for r in runs]


def _batch_keys(cfg: "FinetuneConfig", runs, target: TransferTarget) -> jax.Array:
  """Batch-order key of each run, shared by every model (common random numbers)."""
  return jax.vmap(jax.random.key)(jnp.asarray(
      [stable_seed("batches", cfg.seed, int(r), target.task.task_id) for r in runs], jnp.uint32))


# Images per forward pass inside the jitted fine-tunes (the test set in ``"full"``, the features in
# ``"linear"``): a loop with a traced trip count runs only the chunks a target fills, so padding a
# target to the zoo's shared shapes costs at most one partial chunk of compute.
_CHUNK = 128
_MASKED = -1e9  # the logit of a padded class: exp underflows to exactly 0 in float32


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _padded_classes(zoo: Zoo, k: int) -> int:
  """The head width every fine-tune on a ``k``-way target of ``zoo`` runs at: the zoo's largest
  class count (or ``k`` if larger), so that targets of every K share one compiled executable."""
  return max([k] + [s.spec.num_classes for s in zoo.stacks.values()])


@dataclasses.dataclass(frozen=True)
class _Padded:
  """A target's arrays at the shared shapes of (protocol, padded K); the counts are traced.

  ``images`` holds only what a run touches (test set first, then every run's training images);
  the index arrays point into it and are padded with index 0, never read past the counts.
  """
  images: np.ndarray      # [n_max, H, W, C]
  n_images: int
  train_idx: np.ndarray   # [runs, kpad * shots]
  train_labels: np.ndarray
  n_train: int            # K * shots
  test_idx: np.ndarray    # [t_max]
  test_labels: np.ndarray
  n_test: int
  k: int


def _pad(td: TargetData, samples: np.ndarray, cfg: "FinetuneConfig", k: int,
         kpad: int) -> _Padded:
  """Pads one target to the shapes every target of (``cfg``, ``kpad``) shares."""
  t_max = _round_up(kpad * cfg.test_per_class, _CHUNK)
  # The runs' samples come from per-class pools of at most 4 x shots (``target_data``).
  n_max = _round_up(kpad * (cfg.test_per_class + min(cfg.runs, 4) * cfg.shots), _CHUNK)
  used = np.concatenate([td.test, np.unique(samples)])  # test and shot pools are disjoint
  remap = np.zeros(len(td.labels), np.int32)
  remap[used] = np.arange(len(used), dtype=np.int32)
  n_test, n_train = len(td.test), samples.shape[1]
  if n_test > t_max or len(used) > n_max or n_train > kpad * cfg.shots:
    raise AssertionError(f"target exceeds its padded shapes: {n_test} > {t_max}, "
                         f"{len(used)} > {n_max} or {n_train} > {kpad * cfg.shots}")

  def pad(a, n):
    return np.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
  train_idx = remap[samples]
  width = kpad * cfg.shots - n_train
  return _Padded(
      images=pad(td.images[used], n_max), n_images=len(used),
      train_idx=np.pad(train_idx, ((0, 0), (0, width))),
      train_labels=np.pad(td.labels[samples], ((0, 0), (0, width))), n_train=n_train,
      test_idx=pad(np.arange(n_test, dtype=np.int32), t_max),
      test_labels=pad(td.labels[td.test], t_max), n_test=n_test, k=k)


def _masked(logits, k):
  """Logits with the padded classes (index >= ``k``) out of the softmax and the argmax."""
  return jnp.where(jnp.arange(logits.shape[-1]) < k, logits, _MASKED)


def _chunks(n):
  return (n + _CHUNK - 1) // _CHUNK


def _count_correct(logits_of, test_idx, test_labels, n_test, k):
  """Correct predictions among the first ``n_test`` test entries, ``_CHUNK`` at a time."""
  def body(i, correct):
    idx = jax.lax.dynamic_slice_in_dim(test_idx, i * _CHUNK, _CHUNK)
    lab = jax.lax.dynamic_slice_in_dim(test_labels, i * _CHUNK, _CHUNK)
    pred = jnp.argmax(_masked(logits_of(idx), k), -1)
    valid = i * _CHUNK + jnp.arange(_CHUNK) < n_test
    return correct + jnp.sum((pred == lab) & valid)
  return jax.lax.fori_loop(0, _chunks(n_test), body, jnp.int32(0))


def _head_key(path) -> bool:
  return any(getattr(p, "key", None) == "head" for p in path)


def _with_head(body, kernel, bias):
  """``body``'s parameters with the head's kernel and bias replaced (any class count)."""
  def pick(path, a):
    if not _head_key(path):
      return a
    keys = [getattr(p, "key", None) for p in path]
    return kernel if keys[keys.index("head") + 1] == "kernel" else bias
  return jax.tree_util.tree_map_with_path(pick, body)


@functools.partial(jax.jit, static_argnames=("spec",))
def _init_heads(spec, keys):
  """The heads of ``train_lib.init_stack(spec, seeds)`` (same keys, same draw) without the rest:
  XLA drops the body's draws, which cut compiling it from seconds to under one per (architecture,
  K) on a 2-core CPU."""
  return jax.vmap(lambda k: nnx.state(spec.make(jax.random.fold_in(k, 0)))["head"])(keys)


def _fresh_heads(spec, seeds, kpad: int) -> tuple[np.ndarray, np.ndarray]:
  """New heads, one per seed: drawn at the target's own K (``spec.num_classes``), so the draw is
  that of an unpadded K-way model, then zero-padded to ``kpad`` columns (a padded column gets no
  gradient, so it stays zero and never reaches the loss or the argmax).

  Returns:
    (kernel float32 [S, F, kpad], bias float32 [S, kpad]).
  """
  head = _init_heads(spec, train_lib.model_keys(seeds))
  kernel = np.asarray(head["kernel"].get_value())
  bias = np.asarray(head["bias"].get_value())
  extra = kpad - kernel.shape[-1]
  return (np.pad(kernel, ((0, 0), (0, 0), (0, extra))), np.pad(bias, ((0, 0), (0, extra))))


def _adam(steps: int, peak) -> optax.GradientTransformation:
  """Adam with the zoo's warm-up and cosine schedule (:func:`know2vec_jax.zoo.train.learning_rate`)
  to ``peak``, which may be traced: rows with their own learning rates share one compilation."""
  return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(
      lambda t: train_lib.learning_rate(t, steps, peak)))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "batch_size", "strategy"))
def _finetune_rows(graphdef, params, keys, lr, images, train_idx, train_labels, test_idx,
                   test_labels, n_train, n_test, k, *, steps: int, batch_size: int,
                   strategy: str):
  """Fine-tunes every row of a stack on its own training sample; returns test accuracies [R].

  Shapes are the padded ones of :class:`_Padded` (the graph's head has the padded K); ``n_train``,
  ``n_test`` and ``k`` are traced, so one compilation serves every target of a protocol.
  """
  def loss_fn(p, x, y):
    logits = _masked(nnx.merge(graphdef, p)(x), k)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def one(p, key, idx, lab, peak):
    tx = _adam(steps, peak)
    o = tx.init(p)

    def body(t, carry):
      p, o = carry
      # Draws only from the first n_train entries: the same batches as an unpadded sample.
      u = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, n_train)
      g = jax.grad(loss_fn)(p, images[idx[u]], lab[u])
      upd, o = tx.update(g, o, p)
      return optax.apply_updates(p, upd), o
    p, _ = jax.lax.fori_loop(0, steps, body, (p, o))
    model = nnx.merge(graphdef, p)
    correct = _count_correct(lambda i: model(images[i]), test_idx, test_labels, n_test, k)
    return correct.astype(jnp.float32) / n_test.astype(jnp.float32)

  return strategy_lib.map_models(one, params, keys, train_idx, train_labels, lr,
                                 strategy=strategy)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "batch_size", "strategy"))
def _linear_rows(graphdef, params, heads, keys, lr, images, n_images, train_idx, train_labels,
                 test_idx, test_labels, n_train, n_test, k, *, steps: int, batch_size: int,
                 strategy: str):
  """Frozen body + new linear head: features once per model, then every run's head on them.

  ``params`` [M, ...] and ``heads`` [M, R, ...]; ``keys``, ``train_idx``, ``train_labels`` are per
  run [R, ...]; the other arrays and the traced counts are those of :func:`_finetune_rows`.
  Returns test accuracies [M, R].
  """
  def per_model(p, hs):
    model = nnx.merge(graphdef, p)

    def chunk(i, feats):
      x = jax.lax.dynamic_slice_in_dim(images, i * _CHUNK, _CHUNK)
      return jax.lax.dynamic_update_slice_in_dim(feats, model.features(x), i * _CHUNK, 0)
    feats = jax.lax.fori_loop(  # only the chunks the target fills
        0, _chunks(n_images), chunk,
        jnp.zeros((images.shape[0], hs["kernel"].shape[-2]), jnp.float32))

    def logits(h, f):
      return f @ h["kernel"] + h["bias"]

    def per_run(h, key, idx, lab):
      def loss_fn(h, f, y):
        return optax.softmax_cross_entropy_with_integer_labels(_masked(logits(h, f), k), y).mean()
      tx = _adam(steps, lr)
      o = tx.init(h)

      def body(t, carry):
        h, o = carry
        u = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, n_train)
        g = jax.grad(loss_fn)(h, feats[idx[u]], lab[u])
        upd, o = tx.update(g, o, h)
        return optax.apply_updates(h, upd), o
      h, _ = jax.lax.fori_loop(0, steps, body, (h, o))
      correct = _count_correct(lambda i: logits(h, feats[i]), test_idx, test_labels, n_test, k)
      return correct.astype(jnp.float32) / n_test.astype(jnp.float32)
    return jax.vmap(per_run)(hs, keys, train_idx, train_labels)

  return strategy_lib.map_models(per_model, params, heads, strategy=strategy)


def finetune_accuracy(zoo: Zoo, model_ids: Sequence[str], target: TransferTarget,
                      cfg: FinetuneConfig = FinetuneConfig(), progress: Callable | None = None,
                      only_chunks: Callable[[int], bool] | None = None) -> np.ndarray:
  """Measured accuracy of every model after fine-tuning on the target, per run.

  Every target runs at the shapes its protocol shares with all targets of the zoo: the head at
  the zoo's largest class count (the extra logits masked out of the loss and the argmax), the
  training and test index arrays at their largest possible lengths (the true counts traced;
  padded entries never drawn or counted). So each architecture's fine-tune compiles once per
  protocol, not once per target, and gives the accuracies an unpadded K-way fine-tune with the
  same seeds gives (up to float rounding: reductions run over wider arrays). Measured on 8
  targets of the demo zoo: all 3,480 frozen-body labels bit-identical to the unpadded ones.

  Args:
    zoo: the trained zoo (white-box: its parameters are read here, never by the proxy).
    model_ids: which models; the result's columns follow this order.
    target: the target task.
    cfg: the fine-tuning protocol.
    progress: optional callable(rows_done) called after each jitted chunk.
    only_chunks: run only the jitted chunks whose number it accepts (chunks numbered as
      :func:`chunk_plan` lists them); the cells of the others stay 0. Each chunk is computed
      exactly as in a full call, so the cells it fills are the same bit for bit: how
      :func:`ground_truth` splits the fine-tunes across processes.

  Returns:
    float32 [runs, M] test accuracies; average over axis 0 for the ground truth.

  Raises:
    TransferError: an unknown model id, or a target that cannot be split (see ``target_data``).
  """
  for m in model_ids:
    if m not in zoo.records:
      raise TransferError(f"unknown model id {m!r} (the zoo holds {len(zoo.records)} models)")
    if zoo.records[m].stack not in zoo.stacks:
      raise TransferError(f"model {m!r} is a {zoo.records[m].arch!r} estimator, not a network: "
                          "it has no weights to fine-tune")
  td = target_data(target, cfg.shots, cfg.test_per_class, zoo.image_shape[0], zoo.image_shape[2])
  k = target.k
  kpad = _padded_classes(zoo, k)
  samples = np.stack([td.train_sample(cfg.shots, _run_seed(cfg, r, target))
                      for r in range(cfg.runs)])  # [runs, K * shots]
  pt = _pad(td, samples, cfg, k, kpad)
  shared = dict(images=jnp.asarray(pt.images), test_idx=jnp.asarray(pt.test_idx),
                test_labels=jnp.asarray(pt.test_labels), n_train=jnp.int32(pt.n_train),
                n_test=jnp.int32(pt.n_test), k=jnp.int32(k))
  strategy = strategy_lib.resolve(cfg.strategy, allowed=strategy_lib.TRACED)
  lr = cfg.learning_rate * (10.0 if cfg.mode == "linear" else 1.0)
  out = np.zeros((cfg.runs, len(model_ids)), np.float32)
  col = {m: i for i, m in enumerate(model_ids)}
  first_chunk = 0  # the number of the stack's first chunk (chunk_plan's order)
  for stack_name, mids in _by_stack(zoo, model_ids):
    stack = zoo.stacks[stack_name]
    chunk_no, first_chunk = first_chunk, first_chunk + _num_chunks(len(mids), cfg)

    def wanted(start: int, first: int = chunk_no) -> bool:  # the chunk beginning at row start
      return only_chunks is None or only_chunks(first + start // cfg.chunk_size)
    graphdef = dataclasses.replace(stack.spec, num_classes=kpad).graphdef()
    # Same head initialisation and batch order for every model of a run (common random
    # numbers); a different one per run.
    kernel, bias = _fresh_heads(dataclasses.replace(stack.spec, num_classes=k),
                                _head_seeds(cfg, range(cfg.runs), target, stack.spec.arch), kpad)
    if cfg.mode == "linear":
      _linear_stack(out, col, stack, graphdef, mids, kernel, bias, pt, shared, lr, target, cfg,
                    strategy, progress, wanted)
      continue
    rows = [(m, r) for r in range(cfg.runs) for m in mids]
    for start in range(0, len(rows), cfg.chunk_size):
      if not wanted(start):
        continue
      chunk = rows[start:start + cfg.chunk_size]
      pad = cfg.chunk_size - len(chunk) if len(rows) > cfg.chunk_size else 0
      chunk_p = chunk + [chunk[-1]] * pad  # fixed shapes: one compilation per stack
      sidx = np.asarray([zoo.records[m].stack_index for m, _ in chunk_p])
      runs = np.asarray([r for _, r in chunk_p])
      body = jax.tree.map(lambda a: a[sidx], stack.params)
      params = _with_head(body, jnp.asarray(kernel[runs]), jnp.asarray(bias[runs]))
      acc = _finetune_rows(graphdef, params, _batch_keys(cfg, runs, target),
                           jnp.full((len(chunk_p),), lr, jnp.float32),
                           train_idx=jnp.asarray(pt.train_idx[runs]),
                           train_labels=jnp.asarray(pt.train_labels[runs]), **shared,
                           steps=cfg.steps, batch_size=cfg.batch_size, strategy=strategy)
      acc = np.asarray(acc)
      for (m, r), a in zip(chunk, acc[:len(chunk)]):
        out[r, col[m]] = a
      if progress is not None:
        progress(len(chunk))
  return out


def _by_stack(zoo: Zoo, model_ids: Sequence[str]) -> list[tuple[str, list[str]]]:
  """The requested models by stack, stacks in name order (the order chunks are numbered in)."""
  by_stack: dict[str, list[str]] = {}
  for m in model_ids:
    by_stack.setdefault(zoo.records[m].stack, []).append(m)
  return sorted(by_stack.items())


def _num_chunks(models: int, cfg: FinetuneConfig) -> int:
  """Jitted chunks of one stack: ``"full"`` chunks (model, run) rows, ``"linear"`` models."""
  rows = models if cfg.mode == "linear" else models * cfg.runs
  return -(-rows // cfg.chunk_size)


def chunk_plan(zoo: Zoo, model_ids: Sequence[str], cfg: FinetuneConfig) -> list[dict]:
  """The jitted chunks :func:`finetune_accuracy` runs for one target, in their order.

  Returns:
    One dict per chunk: ``stack``, ``runs`` (the (model, run) fine-tunes it measures) and
    ``cost`` (its padded rows x the architecture's forward FLOPs per image: what it takes,
    relative to the others).
  """
  from know2vec_jax.zoo.architectures import flops_per_image
  plan = []
  for stack_name, mids in _by_stack(zoo, model_ids):
    spec = zoo.stacks[stack_name].spec
    per_row = flops_per_image(spec.arch, spec.num_classes, zoo.image_shape)
    rows = len(mids) if cfg.mode == "linear" else len(mids) * cfg.runs
    per = cfg.runs if cfg.mode == "linear" else 1  # fine-tunes per row
    for start in range(0, rows, cfg.chunk_size):
      real = min(cfg.chunk_size, rows - start)
      padded = cfg.chunk_size if rows > cfg.chunk_size else real
      plan.append({"stack": stack_name, "runs": real * per, "cost": float(padded * per_row)})
  return plan


def _linear_stack(out, col, stack, graphdef, mids, kernel, bias, pt, shared, lr, target, cfg,
                  strategy, progress, wanted=lambda start: True):
  """``mode="linear"`` for the models ``mids`` of one stack (fills ``out`` in place; only the
  chunks ``wanted(first row)`` accepts)."""
  keys = _batch_keys(cfg, np.arange(cfg.runs), target)
  row = {m: i for i, m in enumerate(stack.model_ids)}
  for start in range(0, len(mids), cfg.chunk_size):
    if not wanted(start):
      continue
    chunk = mids[start:start + cfg.chunk_size]
    pad = cfg.chunk_size - len(chunk) if len(mids) > cfg.chunk_size else 0
    chunk_p = chunk + [chunk[-1]] * pad
    n = len(chunk_p)
    body = jax.tree.map(lambda a: a[np.asarray([row[m] for m in chunk_p])], stack.params)
    # Only the body of the merged graph is used (``features``); each run's head is trained on
    # the features separately, so the graph's own head is a placeholder of the padded shape.
    params = _with_head(body, jnp.zeros((n,) + kernel.shape[1:]),
                        jnp.zeros((n,) + bias.shape[1:]))
    heads = {"kernel": jnp.broadcast_to(kernel, (n,) + kernel.shape),
             "bias": jnp.broadcast_to(bias, (n,) + bias.shape)}
    acc = np.asarray(_linear_rows(graphdef, params, heads, keys, jnp.float32(lr),
                                  n_images=jnp.int32(pt.n_images),
                                  train_idx=jnp.asarray(pt.train_idx),
                                  train_labels=jnp.asarray(pt.train_labels), **shared,
                                  steps=cfg.steps, batch_size=cfg.batch_size,
                                  strategy=strategy))
    for i, m in enumerate(chunk):
      out[:, col[m]] = acc[i]
    if progress is not None:
      progress(len(chunk) * cfg.runs)


# Bumped whenever the computation changes its numbers, even by float rounding (2: targets padded to
# shared shapes), so no cache entry of an earlier computation is read back.
_IMPLEMENTATION = 2


def _cache_key(zoo_dir: pathlib.Path, model_ids: Sequence[str], target: TransferTarget,
               cfg: FinetuneConfig) -> str:
  manifest = (zoo_dir / "zoo.json").read_bytes()
  blob = json.dumps({"zoo": hashlib.sha1(manifest).hexdigest(), "models": list(model_ids),
                     "target": target.to_json(), "implementation": _IMPLEMENTATION,
                     "cfg": dataclasses.asdict(cfg) | {"chunk_size": None, "strategy": None}},
                    sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:16]


def ground_truth(zoo: Zoo, zoo_dir, model_ids: Sequence[str], targets: Sequence[TransferTarget],
                 cfg: FinetuneConfig = FinetuneConfig(), cache_dir=None,
                 progress: bool = False) -> dict[str, np.ndarray]:
  """:func:`finetune_accuracy` of many targets, cached on disk.

  The cache key covers the zoo's manifest, the model selection, the target and every protocol
  field that changes the numbers (not the chunking or the execution strategy, which do not), so a
  rebuilt zoo or a changed protocol never reuses stale numbers. Files are written atomically.
  Every target of a protocol runs at the same padded shapes (:func:`finetune_accuracy`), so the
  fine-tunes compile once per architecture, not once per target. In a multi-process run
  (``jax.process_count() > 1``) every process calls this with the same arguments; the jitted
  chunks are split across the processes and every process returns every accuracy, equal to one
  process's bit for bit (:func:`_ground_truth_across_processes`); process 0 writes the cache.

  Args:
    zoo, zoo_dir: the zoo and the directory it was loaded from (its manifest keys the cache;
      ``None`` only without ``cache_dir``).
    model_ids: the models, in column order.
    targets: the targets.
    cfg: the protocol.
    cache_dir: where cached results live; ``None`` disables caching.
    progress: show a tqdm bar over (model, run) rows.

  Returns:
    {target name: float32 [runs, M]}.
  """
  names = [t.name for t in targets]
  if len(set(names)) != len(names):
    raise TransferError(f"target names repeat: {sorted(n for n in names if names.count(n) > 1)}")
  cache = pathlib.Path(cache_dir) if cache_dir is not None else None
  if cache is not None or zoo_dir is not None:
    if zoo_dir is None:
      raise TransferError("caching the ground truth needs zoo_dir (its manifest keys the cache)")
    zoo_dir = pathlib.Path(zoo_dir)
    if not (zoo_dir / "zoo.json").exists():
      raise ZooError(f"no zoo manifest at {zoo_dir / 'zoo.json'}")
  if cache is not None:
    cache.mkdir(parents=True, exist_ok=True)
  out = {}
  todo = []
  for t in targets:
    path = cache / f"{t.name}-{_cache_key(zoo_dir, model_ids, t, cfg)}.npz" if cache else None
    if path is not None and path.exists():
      want = (cfg.runs, len(model_ids))

      def check(arrays, meta, want=want):
        got = np.shape(arrays.get("accuracy"))
        if meta.get("model_ids") != list(model_ids) or got != want:
          return f"it holds accuracies of shape {list(got)} for other models, expected {list(want)}"
        return None
      out[t.name] = storage.load_arrays(path, TransferError, check=check)[0]["accuracy"]
    else:
      todo.append((t, path))
  if distributed.process_count() > 1:
    return _ground_truth_across_processes(zoo, zoo_dir, model_ids, targets, cfg, cache, out,
                                          progress)
  bar = None
  if progress and todo:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(todo) * len(model_ids) * cfg.runs, desc="ground truth", unit="run")
  for t, path in todo:
    if bar is not None:
      bar.set_postfix_str(t.name)
    acc = finetune_accuracy(zoo, model_ids, t, cfg, progress=bar.update if bar else None)
    if path is not None:
      storage.save_arrays(path, {"accuracy": acc}, {"model_ids": list(model_ids),
                                                    "target": t.to_json()})
    out[t.name] = acc
  if bar is not None:
    bar.close()
  return {t.name: out[t.name] for t in targets}


def _ground_truth_across_processes(zoo: Zoo, zoo_dir, model_ids: Sequence[str],
                                   targets: Sequence[TransferTarget], cfg: FinetuneConfig,
                                   cache: pathlib.Path | None, out: dict,
                                   progress: bool) -> dict[str, np.ndarray]:
  """:func:`ground_truth` in a multi-process run (docs/design.md, "Multi-process stages").

  The targets some process found no cached result for are computed once: their jitted chunks
  (:func:`chunk_plan`, every target's) are assigned to the processes by cost
  (:func:`know2vec_jax.distributed.assign`); each process runs its chunks exactly as one process
  runs them (same shapes, seeds and padding, so the same accuracies bit for bit), the results
  are exchanged (each cell is filled by exactly one process, the others hold 0, so the sum is
  exact) and process 0 writes the cache files.
  """
  lacking = distributed.allgather(np.asarray([t.name not in out for t in targets], np.uint8))
  todo = [t for t, lack in zip(targets, lacking.max(axis=0)) if lack]
  if not todo:
    return {t.name: out[t.name] for t in targets}
  plan = chunk_plan(zoo, model_ids, cfg)
  units = [(ti, u) for ti in range(len(todo)) for u in range(len(plan))]
  owner = distributed.assign([plan[u]["cost"] for _, u in units], distributed.process_count())
  me = distributed.process_index()
  mine = {ti: {u for (tj, u), p in zip(units, owner) if tj == ti and p == me}
          for ti in range(len(todo))}

  def run_share() -> np.ndarray:
    acc = np.zeros((len(todo), cfg.runs, len(model_ids)), np.float32)
    bar = None
    if progress and distributed.is_writer():
      from tqdm.auto import tqdm
      bar = tqdm(total=sum(plan[u]["runs"] for us in mine.values() for u in us),
                 desc=f"ground truth (process 0 of {distributed.process_count()})", unit="run")
    for ti, t in enumerate(todo):
      if mine[ti]:
        acc[ti] = finetune_accuracy(zoo, model_ids, t, cfg, progress=bar.update if bar else None,
                                    only_chunks=mine[ti].__contains__)
    if bar is not None:
      bar.close()
    return acc

  acc = distributed.local_step("the fine-tune ground truth", run_share)
  acc = distributed.allgather(acc).sum(axis=0, dtype=np.float32)
  out.update({t.name: acc[ti] for ti, t in enumerate(todo)})

  def write():
    for ti, t in enumerate(todo):
      storage.save_arrays(cache / f"{t.name}-{_cache_key(zoo_dir, model_ids, t, cfg)}.npz",
                          {"accuracy": acc[ti]}, {"model_ids": list(model_ids),
                                                  "target": t.to_json()})
  if cache is not None:
    distributed.on_writer("ground-truth cache", write)
  return {t.name: out[t.name] for t in targets}


def split_half(runs: np.ndarray, score: Callable[[np.ndarray, np.ndarray], float],
               max_splits: int = 20) -> float:
  """Split-half agreement of a ground truth: how reproducible an R/2-run mean's ranking is.

  The runs are divided into two halves; ``score(mean of one half, mean of the other)`` (e.g.
  weighted tau) is averaged over up to ``max_splits`` distinct divisions (all of them for 6 runs:
  10). Both halves are noisier than the R-run mean methods are scored against, so this is *not*
  an upper bound on a method's score: a method that knew the expected accuracies exactly would
  exceed it. :func:`noise_ceiling` corrects it to the full mean.

  Args:
    runs: [R, M] per-run accuracies, R >= 2.
    score: a ranking agreement (ground truth first).

  Returns:
    The mean agreement.
  """
  runs = np.asarray(runs, np.float64)
  r = runs.shape[0] if runs.ndim else 0
  if runs.ndim != 2 or r < 2:
    raise TransferError(f"need per-run accuracies [R >= 2, M], got shape {runs.shape}")
  half = r // 2
  splits = []
  for a in itertools.combinations(range(r), half):
    b = tuple(i for i in range(r) if i not in a)
    if (b, a) not in splits:
      splits.append((a, b))
  splits = splits[:max_splits]
  return float(np.mean([score(runs[list(a)].mean(0), runs[list(b)].mean(0))
                        for a, b in splits]))


def noise_ceiling(runs: np.ndarray, score: Callable[[np.ndarray, np.ndarray], float],
                  max_splits: int = 20) -> float:
  """The expected agreement between the true (infinite-run) accuracies and the R-run mean.

  That is what a method that knew every model's expected fine-tune accuracy exactly would score
  against this ground truth: an upper bound, up to estimation error, for methods whose errors
  are independent of the runs' noise. Estimated from :func:`split_half` ``t`` with two stated
  corrections that hold for Gaussian run noise: Greiner's relation turns a Kendall tau into a
  correlation (``r = sin(pi t / 2)``), the Spearman-Brown formula gives the reliability of the
  full R-run mean from that of a half (``r_R = 2 r / (1 + r)``), and the truth correlates with
  the R-run mean by ``sqrt(r_R)``, turned back into a tau by ``(2 / pi) arcsin``. Measured on
  synthetic Gaussian runs (60 models, 6 runs, 100 draws; ``tests/test_transfer.py`` checks it):
  for Kendall's tau the estimate is within 0.006 of the direct tau(truth, 6-run mean) at every
  noise level; for weighted tau it is 0.003 / 0.020 / 0.058 low when the split-half tau is 0.90 /
  0.66 / 0.37, and lower still when the noise grows with the accuracy: a conservative ceiling
  (methods can exceed it by that much, never by more in expectation).

  Args:
    runs: [R, M] per-run accuracies, R >= 2.
    score: a ranking agreement (ground truth first), e.g. :func:`know2vec_jax.metrics.
      weighted_tau`.
    max_splits: as :func:`split_half`.

  Returns:
    The estimated ceiling in [0, 1] (0 when the halves do not agree at all).
  """
  t = split_half(runs, score, max_splits)
  r_half = max(math.sin(math.pi * t / 2.0), 0.0)
  r_full = 2.0 * r_half / (1.0 + r_half)
  return float(2.0 / math.pi * math.asin(math.sqrt(r_full)))
