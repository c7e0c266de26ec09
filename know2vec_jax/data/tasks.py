"""K-way tasks as class subsets of a source, sampled deterministically from a seed."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math

import numpy as np

from know2vec_jax.data.sources import DataError, SourceData


def stable_seed(*parts) -> int:
  """A platform-independent 31-bit seed from strings and ints (``hash()`` is salted per process):
  samples keyed by a task's name stay the same whichever other tasks are drawn beside it."""
  h = hashlib.sha1("|".join(str(p) for p in parts).encode()).digest()
  return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class Task:
  """A K-way task: an ordered tuple of class ids of one source.

  Local label i of the task is source class ``classes[i]``.
  """
  source: str
  classes: tuple[int, ...]

  @property
  def k(self) -> int:
    return len(self.classes)

  @property
  def task_id(self) -> str:
    """A stable name, e.g. ``mnist5k+invert/0-3-5-7`` (classes sorted, so order-free)."""
    return f"{self.source}/" + "-".join(str(c) for c in sorted(self.classes))

  def to_json(self) -> dict:
    return {"source": self.source, "classes": list(self.classes)}

  @classmethod
  def from_json(cls, d: dict) -> "Task":
    return cls(source=d["source"], classes=tuple(int(c) for c in d["classes"]))


def make_task(data: SourceData, classes) -> Task:
  """A task from class names or ids; checks every class exists and has images in both splits.

  Raises:
    DataError: fewer than 2 classes, a repeated or unknown class, or a class with no images.
  """
  ids = tuple(data.class_index(c) for c in classes)
  if len(ids) < 2:
    raise DataError(f"a task needs at least 2 classes, got {len(ids)}")
  if len(set(ids)) != len(ids):
    raise DataError(f"task classes repeat: {list(classes)}")
  for split in ("train", "test"):
    _, labels = data.split(split)
    for c in ids:
      if not np.any(labels == c):
        raise DataError(f"class {data.class_names[c]!r} of source {data.name!r} has no images in "
                        f"the {split} split")
  return Task(source=data.name, classes=ids)


def sample_tasks(data: SourceData, k: int = 4, n_tasks: int = 1, seed: int = 0) -> list[Task]:
  """Samples ``n_tasks`` distinct K-way class subsets of a source, deterministic from ``seed``.

  Args:
    data: the source.
    k: classes per task.
    n_tasks: how many distinct class sets.
    seed: the sampling seed; the same seed gives the same tasks on every machine.

  Returns:
    Tasks with classes in increasing id order.

  Raises:
    DataError: ``k`` < 2 or larger than the source's classes, or more tasks than subsets exist.
  """
  n = data.num_classes
  if k < 2:
    raise DataError(f"k must be >= 2, got {k}")
  if k > n:
    raise DataError(f"k={k} is larger than the {n} classes of source {data.name!r}")
  total = math.comb(n, k)
  if n_tasks > total:
    raise DataError(f"asked for {n_tasks} distinct {k}-way tasks but source {data.name!r} has only "
                    f"C({n},{k}) = {total}")
  rng = np.random.default_rng(seed)
  if total <= 50_000:
    subsets = list(itertools.combinations(range(n), k))
    chosen = [subsets[i] for i in rng.choice(total, size=n_tasks, replace=False)]
  else:  # too many to enumerate: rejection-sample distinct sets
    seen, chosen = set(), []
    while len(chosen) < n_tasks:
      s = tuple(sorted(rng.choice(n, size=k, replace=False).tolist()))
      if s not in seen:
        seen.add(s)
        chosen.append(s)
  return [make_task(data, c) for c in chosen]


def task_split(data: SourceData, task: Task, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Indices into ``data``'s split and the task-local labels for one task.

  ``split="train"`` is where zoo models train; ``split="test"`` is the held-out split from which
  few-shot queries and fine-tune data are drawn. They come from the source's fixed train and test
  splits, so they are disjoint.

  Returns:
    (indices int64 [N], local labels int32 [N]) with local label i = ``task.classes[i]``.
  """
  _, labels = data.split(split)
  lookup = np.full(data.num_classes, -1, np.int32)
  lookup[list(task.classes)] = np.arange(task.k, dtype=np.int32)
  idx = np.flatnonzero(lookup[labels] >= 0)
  return idx, lookup[labels[idx]]


def task_images(data: SourceData, task: Task, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, H, W, C], local labels int32 [N]) of one task split."""
  idx, y = task_split(data, task, split)
  images, _ = data.split(split)
  return images[idx], y


def few_shot(data: SourceData, task: Task, shots: int, seed: int, split: str = "test",
             exclude=None):
  """``shots`` images per class from a task split, deterministic from ``seed``.

  Args:
    data, task: the source and the task.
    shots: images per class.
    seed: which images.
    split: ``"test"`` (default) or ``"train"``.
    exclude: rows of the split never to draw (e.g. a probe pool's,
      :func:`know2vec_jax.pool.excluded_rows`); None or empty: none.

  Returns:
    (images [K * shots, H, W, C], local labels [K * shots]) grouped by class.

  Raises:
    DataError: a class has fewer than ``shots`` images in the split (outside ``exclude``).
  """
  idx, y = task_split(data, task, split)
  if exclude is not None and len(exclude):
    keep = ~np.isin(idx, np.asarray(exclude))
    idx, y = idx[keep], y[keep]
  rng = np.random.default_rng(seed)
  picks = []
  for c in range(task.k):
    cand = idx[y == c]
    if len(cand) < shots:
      raise DataError(f"class {data.class_names[task.classes[c]]!r} has {len(cand)} images in the "
                      f"{split} split of {data.name!r}"
                      + (" outside the probe pool" if exclude is not None and len(exclude) else "")
                      + f", fewer than shots={shots}")
    picks.append(rng.choice(cand, size=shots, replace=False))
  images, _ = data.split(split)
  sel = np.concatenate(picks)
  return images[sel], np.repeat(np.arange(task.k, dtype=np.int32), shots)
