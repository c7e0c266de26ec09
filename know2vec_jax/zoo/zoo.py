"""The in-memory zoo: stacks of trained models plus one metadata record per model."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from know2vec_jax import strategy as strategy_lib
from know2vec_jax.data.tasks import Task
from know2vec_jax.zoo import train as train_lib


class ZooError(ValueError):
  """A zoo that cannot be built, stored or loaded, or a lookup that fails; the message says why."""


@dataclasses.dataclass
class ModelRecord:
  """Metadata of one zoo model (everything but its weights).

  Attributes:
    model_id, arch, task, seed, steps, learning_rate, batch_size, label_noise, role: as trained
      (see :class:`know2vec_jax.zoo.specs.ModelSpec`).
    class_names: the names of the task's classes, in label order.
    train_accuracy: accuracy on (up to 2,000 of) its task's train images, with clean labels.
    heldout_accuracy: accuracy on its task's whole held-out split.
    stack: the name of the stack holding its weights; stack_index: its row there.
  """
  model_id: str
  arch: str
  task: Task
  class_names: tuple[str, ...]
  seed: int
  steps: int
  learning_rate: float
  batch_size: int
  label_noise: float
  role: str
  train_accuracy: float
  heldout_accuracy: float
  stack: str
  stack_index: int

  @property
  def k(self) -> int:
    return self.task.k

  @property
  def source(self) -> str:
    return self.task.source

  @property
  def base_source(self) -> str:
    return self.task.source.split("+")[0]

  @property
  def domain(self) -> str:
    """The domain transforms (``"+"``-joined), or ``"plain"``."""
    parts = self.task.source.split("+")[1:]
    return "+".join(parts) if parts else "plain"

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["task"] = self.task.to_json()
    d["class_names"] = list(self.class_names)
    d.update(k=self.k, source=self.source, base_source=self.base_source, domain=self.domain)
    return d

  @classmethod
  def from_json(cls, d: dict) -> "ModelRecord":
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    kw["task"] = Task.from_json(d["task"])
    kw["class_names"] = tuple(d["class_names"])
    return cls(**kw)


@dataclasses.dataclass
class ZooStack:
  """Models of one architecture and output size, as one stacked parameter tree.

  Attributes:
    name: e.g. ``cnn_l-k4``.
    spec: architecture, classes, image shape and conv lowering shared by the stack.
    model_ids: the model id of each row.
    params: stacked NNX parameter state, leading axis = model.
  """
  name: str
  spec: train_lib.StackSpec
  model_ids: list[str]
  params: nnx.State

  def __len__(self) -> int:
    return len(self.model_ids)

  @functools.cached_property
  def graphdef(self):
    return self.spec.graphdef()

  def apply(self, images, strategy: str = "auto", features: bool = False) -> jax.Array:
    """Logits [M, B, K] (or features) of every model of the stack on ``images`` [B, H, W, C]."""
    return _apply_jit(self.graphdef, self.params, images,
                      strategy=strategy_lib.resolve(strategy, allowed=strategy_lib.TRACED),
                      features=features)

  def model(self, index: int) -> nnx.Module:
    """Model ``index`` of the stack as a standalone NNX module."""
    return nnx.merge(self.graphdef, train_lib.unstack(self.params, index))


@functools.partial(jax.jit, static_argnames=("graphdef", "strategy", "features"))
def _apply_jit(graphdef, params, images, *, strategy, features):
  return train_lib.apply_stack(graphdef, params, images, strategy, features)


@dataclasses.dataclass
class Zoo:
  """A trained zoo: stacks of Flax weights, sets of scikit-learn estimators
  (:class:`know2vec_jax.zoo.estimators.EstimatorSet`) and one :class:`ModelRecord` per model
  (its ``stack`` names the stack or estimator set holding it)."""
  image_shape: tuple[int, int, int]
  stacks: dict[str, ZooStack]
  records: dict[str, ModelRecord]
  estimators: dict = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.records)

  def record(self, model_id: str) -> ModelRecord:
    if model_id not in self.records:
      raise ZooError(f"unknown model id {model_id!r} (the zoo holds {len(self.records)} models)")
    return self.records[model_id]

  def model(self, model_id: str):
    """One zoo model as a standalone NNX module, or the fitted scikit-learn estimator of a
    non-neural family (white-box access, for ground truth)."""
    r = self.record(model_id)
    if r.stack in self.estimators:
      return self.estimators[r.stack].estimator(r.stack_index)
    return self.stacks[r.stack].model(r.stack_index)

  def summary(self) -> list[dict]:
    """Rows per (base source, domain, architecture, K): count, mean and min held-out accuracy."""
    groups: dict[tuple, list[ModelRecord]] = {}
    for r in self.records.values():
      groups.setdefault((r.base_source, r.domain, r.arch, r.k), []).append(r)
    rows = []
    for (src, dom, arch, k), rs in sorted(groups.items()):
      acc = np.asarray([r.heldout_accuracy for r in rs])
      normal = np.asarray([r.heldout_accuracy for r in rs if r.role == "normal"])
      rows.append(dict(source=src, domain=dom, arch=arch, k=k, count=len(rs),
                       weak=sum(r.role != "normal" for r in rs), mean_acc=float(acc.mean()),
                       min_acc=float(acc.min()),
                       mean_acc_normal=float(normal.mean()) if len(normal) else float("nan")))
    return rows
