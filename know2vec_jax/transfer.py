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

from know2vec_jax import storage
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


def _head_key(path) -> bool:
  return any(getattr(p, "key", None) == "head" for p in path)


def _transplant(fresh, body):
  """``fresh`` parameters with every non-head leaf taken from ``body`` (same structure)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, f, b: f if _head_key(path) else b, fresh, body)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "batch_size", "strategy",
                                             "linear"))
def _finetune_rows(graphdef, params, keys, lr, images, train_idx, train_labels, test_idx,
                   test_labels, *, steps: int, batch_size: int, strategy: str, linear: bool):
  """Fine-tunes every row of a stack on its own training sample; returns test accuracies [R]."""
  adam = optax.scale_by_adam()

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(x), y).mean()

  def one(p, key, idx, lab, peak):
    o = adam.init(p)

    def body(t, carry):
      p, o = carry
      u = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, idx.shape[0])
      g = jax.grad(loss_fn)(p, images[idx[u]], lab[u])
      if linear:  # frozen body: only the new head moves
        g = jax.tree_util.tree_map_with_path(
            lambda path, a: a if _head_key(path) else jnp.zeros_like(a), g)
      upd, o = adam.update(g, o, p)
      scale = -train_lib.learning_rate(t, steps, peak)
      return jax.tree.map(lambda a, b: a + scale * b, p, upd), o
    p, _ = jax.lax.fori_loop(0, steps, body, (p, o))
    pred = jnp.argmax(nnx.merge(graphdef, p)(images[test_idx]), -1)
    return jnp.mean(pred == test_labels)

  return strategy_lib.map_models(one, params, keys, train_idx, train_labels, lr,
                                 strategy=strategy)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "batch_size", "strategy"))
def _linear_rows(graphdef, params, heads, keys, lr, images, train_idx, train_labels, test_idx,
                 test_labels, *, steps: int, batch_size: int, strategy: str):
  """Frozen body + new linear head: features once per model, then every run's head on them.

  ``params`` [M, ...] and ``heads`` [M, R, ...]; ``keys``, ``train_idx``, ``train_labels`` are per
  run [R, ...]. Returns test accuracies [M, R].
  """
  adam = optax.scale_by_adam()

  def per_model(p, hs):
    feats = nnx.merge(graphdef, p).features(images)  # [N, F]

    def per_run(h, key, idx, lab):
      def loss_fn(h, f, y):
        logits = f @ h["kernel"] + h["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      o = adam.init(h)

      def body(t, carry):
        h, o = carry
        u = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, idx.shape[0])
        g = jax.grad(loss_fn)(h, feats[idx[u]], lab[u])
        upd, o = adam.update(g, o, h)
        scale = -train_lib.learning_rate(t, steps, lr)
        return jax.tree.map(lambda a, b: a + scale * b, h, upd), o
      h, _ = jax.lax.fori_loop(0, steps, body, (h, o))
      pred = jnp.argmax(feats[test_idx] @ h["kernel"] + h["bias"], -1)
      return jnp.mean(pred == test_labels)
    return jax.vmap(per_run)(hs, keys, train_idx, train_labels)

  return strategy_lib.map_models(per_model, params, heads, strategy=strategy)


def finetune_accuracy(zoo: Zoo, model_ids: Sequence[str], target: TransferTarget,
                      cfg: FinetuneConfig = FinetuneConfig(), progress: Callable | None = None
                      ) -> np.ndarray:
  """Measured accuracy of every model after fine-tuning on the target, per run.

  Args:
    zoo: the trained zoo (white-box: its parameters are read here, never by the proxy).
    model_ids: which models; the result's columns follow this order.
    target: the target task.
    cfg: the fine-tuning protocol.
    progress: optional callable(rows_done) called after each jitted chunk.

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
  images = jnp.asarray(td.images)
  samples = np.stack([td.train_sample(cfg.shots, _run_seed(cfg, r, target))
                      for r in range(cfg.runs)])  # [runs, K * shots]
  train_labels = td.labels[samples]
  test_idx = jnp.asarray(td.test)
  test_labels = jnp.asarray(td.labels[td.test])
  strategy = strategy_lib.resolve(cfg.strategy, allowed=strategy_lib.TRACED)
  lr = cfg.learning_rate * (10.0 if cfg.mode == "linear" else 1.0)
  out = np.zeros((cfg.runs, len(model_ids)), np.float32)
  col = {m: i for i, m in enumerate(model_ids)}
  by_stack: dict[str, list[str]] = {}
  for m in model_ids:
    by_stack.setdefault(zoo.records[m].stack, []).append(m)
  for stack_name, mids in sorted(by_stack.items()):
    stack = zoo.stacks[stack_name]
    spec = dataclasses.replace(stack.spec, num_classes=k)
    graphdef = spec.graphdef()
    if cfg.mode == "linear":
      _linear_stack(out, col, stack, spec, graphdef, mids, images, samples, train_labels,
                    test_idx, test_labels, lr, target, cfg, strategy, progress)
      continue
    rows = [(m, r) for r in range(cfg.runs) for m in mids]
    for start in range(0, len(rows), cfg.chunk_size):
      chunk = rows[start:start + cfg.chunk_size]
      pad = cfg.chunk_size - len(chunk) if len(rows) > cfg.chunk_size else 0
      chunk_p = chunk + [chunk[-1]] * pad  # fixed shapes: one compilation per stack
      sidx = np.asarray([zoo.records[m].stack_index for m, _ in chunk_p])
      runs = np.asarray([r for _, r in chunk_p])
      # Same head initialisation and batch order for every model of a run (common random
      # numbers); a different one per run.
      fresh = train_lib.init_stack(spec, _head_seeds(cfg, runs, target, stack.spec.arch))
      body = jax.tree.map(lambda a: a[sidx], stack.params)
      params = _transplant(fresh, body)
      keys = _batch_keys(cfg, runs, target)
      acc = _finetune_rows(graphdef, params, keys,
                           jnp.full((len(chunk_p),), lr, jnp.float32), images,
                           jnp.asarray(samples[runs]), jnp.asarray(train_labels[runs]),
                           test_idx, test_labels, steps=cfg.steps, batch_size=cfg.batch_size,
                           strategy=strategy, linear=cfg.mode == "linear")
      acc = np.asarray(acc)
      for (m, r), a in zip(chunk, acc[:len(chunk)]):
        out[r, col[m]] = a
      if progress is not None:
        progress(len(chunk))
  return out


def _linear_stack(out, col, stack, spec, graphdef, mids, images, samples, train_labels, test_idx,
                  test_labels, lr, target, cfg, strategy, progress):
  """``mode="linear"`` for the models ``mids`` of one stack (fills ``out`` in place)."""
  runs = np.arange(cfg.runs)
  fresh = train_lib.init_stack(spec, _head_seeds(cfg, runs, target, stack.spec.arch))  # [R, ...]
  head0 = {k: jnp.asarray(fresh["head"][k].get_value()) for k in ("kernel", "bias")}
  # The merged graph needs a K-way head of the target's shape; only its body (taken from the zoo)
  # is used, since each run's head is trained on the features separately.
  template = jax.tree.map(lambda a: a[:1], fresh)
  keys = _batch_keys(cfg, runs, target)
  row = {m: i for i, m in enumerate(stack.model_ids)}
  for start in range(0, len(mids), cfg.chunk_size):
    chunk = mids[start:start + cfg.chunk_size]
    pad = cfg.chunk_size - len(chunk) if len(mids) > cfg.chunk_size else 0
    chunk_p = chunk + [chunk[-1]] * pad
    body = jax.tree.map(lambda a: a[np.asarray([row[m] for m in chunk_p])], stack.params)
    params = _transplant(jax.tree.map(lambda a: jnp.repeat(a, len(chunk_p), 0), template), body)
    heads = {k: jnp.broadcast_to(v, (len(chunk_p),) + v.shape) for k, v in head0.items()}
    acc = np.asarray(_linear_rows(graphdef, params, heads, keys, jnp.float32(lr), images,
                                  jnp.asarray(samples), jnp.asarray(train_labels), test_idx,
                                  test_labels, steps=cfg.steps, batch_size=cfg.batch_size,
                                  strategy=strategy))
    for i, m in enumerate(chunk):
      out[:, col[m]] = acc[i]
    if progress is not None:
      progress(len(chunk) * cfg.runs)


def _cache_key(zoo_dir: pathlib.Path, model_ids: Sequence[str], target: TransferTarget,
               cfg: FinetuneConfig) -> str:
  manifest = (zoo_dir / "zoo.json").read_bytes()
  blob = json.dumps({"zoo": hashlib.sha1(manifest).hexdigest(), "models": list(model_ids),
                     "target": target.to_json(), "cfg": dataclasses.asdict(cfg) | {
                         "chunk_size": None, "strategy": None}}, sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:16]


def ground_truth(zoo: Zoo, zoo_dir, model_ids: Sequence[str], targets: Sequence[TransferTarget],
                 cfg: FinetuneConfig = FinetuneConfig(), cache_dir=None,
                 progress: bool = False) -> dict[str, np.ndarray]:
  """:func:`finetune_accuracy` of many targets, cached on disk.

  The cache key covers the zoo's manifest, the model selection, the target and every protocol
  field that changes the numbers (not the chunking or the execution strategy, which do not), so a
  rebuilt zoo or a changed protocol never reuses stale numbers. Files are written atomically.
  JAX's compilation caches are cleared after each computed target (see the loop for why).

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
    # Every target has its own shapes (K, sample and test sizes), so its fine-tunes compile anew,
    # and XLA:CPU keeps each compiled executable memory-mapped: measured ~2,000 mappings per
    # target, which exhausts Linux's default 65,530-mapping limit after ~30 targets ("LLVM
    # compilation error: Cannot allocate memory"). Nothing compiled here is reused by the next
    # target, so dropping the caches costs no recompilation within this loop.
    jax.clear_caches()
  if bar is not None:
    bar.close()
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
