"""Black boxes: images in, logits out. The proxy side sees zoo models only through this API.

A :class:`BlackBoxGroup` is M black boxes with one label-space size K, called together with one
batch of inputs *per model* (``[M, B, H, W, C] -> [M, B, K]``) or one batch shared by all
(``[B, H, W, C] -> [M, B, K]``). Two adapters:

- :class:`StackGroup`, the fast path: a zoo stack evaluated by one jitted call for all its models
  (:mod:`know2vec_jax.probe`: ``vmap | map | loop | auto``, sharded over devices).
- :class:`CallableBlackBox`, the slow path: any Python callable ``images -> logits`` (a remote API,
  a PyTorch model, ...), called in batches; it is a group of one.
- :class:`EstimatorGroup`: fitted scikit-learn-style estimators on pixel vectors, answering
  logits, probabilities or one-hot labels (a zoo's non-neural families).

What a black box returns may be logits, probabilities or one-hot labels alike: the proxy reads
only each row's argmax and margin, and breaks ties (one-hot rows) by a fixed pool order.

Every group counts the inputs each model evaluated and can enforce a per-model budget. Inputs are
validated (shape, dtype, range, finiteness) and so are outputs (shape, finiteness): a failure names
the black box and the problem instead of surfacing from deep inside JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable, Sequence

import jax
import numpy as np

from know2vec_jax import probe as probe_lib
from know2vec_jax import strategy as strategy_lib


class InputError(ValueError):
  """User-supplied images (or labels) that cannot be used; the message says why."""


class BlackBoxError(RuntimeError):
  """A black box that raised, returned a wrong shape or non-finite logits."""


class BudgetExceededError(BlackBoxError):
  """A call would take a black box past its query budget."""


def check_images(images, image_shape: Sequence[int] | None = None, *, batch_dims: int = 1,
                 what: str = "images") -> np.ndarray:
  """Validates float images in [0, 1]; returns them as a float32 numpy array.

  Args:
    images: array-like [*batch, H, W, C].
    image_shape: the expected (H, W, C), or None to accept any.
    batch_dims: how many leading batch axes.
    what: the name used in error messages.

  Raises:
    InputError: wrong rank or shape, a non-float dtype, NaN/inf, or values outside [0, 1].
  """
  try:
    x = np.asarray(images)
  except (TypeError, ValueError) as e:  # ragged nested lists, unconvertible objects
    raise InputError(f"{what} are not an array: {' '.join(str(e).split())[:200]}") from None
  if x.ndim != batch_dims + 3:
    raise InputError(f"{what} must have shape [{', '.join(['B'] * batch_dims)}, H, W, C] "
                     f"({batch_dims + 3} axes), got shape {x.shape}")
  if image_shape is not None and tuple(x.shape[batch_dims:]) != tuple(image_shape):
    raise InputError(f"{what} have image shape {tuple(x.shape[batch_dims:])}, expected "
                     f"{tuple(image_shape)} (H, W, C)")
  if not np.issubdtype(x.dtype, np.floating):
    raise InputError(f"{what} must be float32 in [0, 1], got dtype {x.dtype} "
                     "(divide uint8 images by 255)")
  if not np.all(np.isfinite(x)):
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    raise InputError(f"{what} contain {bad} NaN/inf values")
  if x.size and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
    raise InputError(f"{what} must lie in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]")
  return x.astype(np.float32, copy=False)


class BlackBoxGroup:
  """M black boxes with one label-space size, evaluated together.

  Subclasses implement :meth:`_evaluate` (and :meth:`subset` where a group holds several
  models). Attributes: ``model_ids``, ``num_classes``, ``image_shape``, ``queries`` (int64 [M],
  inputs evaluated per model), ``budget`` (per model, or None), ``fingerprints`` (per model: a
  string that changes whenever the model's function may have changed, or None when unknown; a
  proxy reuses a model's stored knowledge only when id and fingerprint match).
  """

  def __init__(self, model_ids: Sequence[str], num_classes: int, image_shape: Sequence[int],
               budget: int | None = None):
    if num_classes < 2:
      raise ValueError(f"a black box needs at least 2 classes, got {num_classes}")
    self.model_ids = list(model_ids)
    self.num_classes = int(num_classes)
    self.image_shape = tuple(int(d) for d in image_shape)
    self.budget = budget
    self.queries = np.zeros(len(self.model_ids), np.int64)
    self._parent: tuple[BlackBoxGroup, np.ndarray] | None = None  # set by subset()

  @property
  def num_models(self) -> int:
    return len(self.model_ids)

  @property
  def fingerprints(self) -> list[str | None]:
    """Per model, an identifier of its current function (None: unknown, never reused)."""
    return [None] * self.num_models

  def subset(self, model_ids: Sequence[str]) -> "BlackBoxGroup":
    """A group of some of this group's models whose queries count on this group's counters too.

    Raises:
      InputError: an id that is not in the group.
    """
    if self._members(model_ids) is None:
      return self
    raise NotImplementedError(f"{type(self).__name__} cannot be split into sub-groups")

  def _members(self, model_ids: Sequence[str]) -> np.ndarray | None:
    """The rows of ``model_ids`` in this group, or None when they are the whole group in order.

    Raises:
      InputError: an id that is not in the group.
    """
    if list(model_ids) == self.model_ids:
      return None
    unknown = [m for m in model_ids if m not in self.model_ids]
    if unknown:
      raise InputError(f"model id {unknown[0]!r} is not in black-box group "
                       f"{getattr(self, 'name', self.model_ids[:3])!r}")
    return np.asarray([self.model_ids.index(m) for m in model_ids])

  def _attach(self, parent: "BlackBoxGroup", model_ids: Sequence[str]) -> "BlackBoxGroup":
    rows = np.asarray([parent.model_ids.index(m) for m in model_ids])
    self._parent = (parent, rows)
    self.queries = parent.queries[rows].copy()
    return self

  def __call__(self, images, *, validate: bool = True) -> np.ndarray:
    """Logits of every model.

    Args:
      images: [M, B, H, W, C] (a batch per model) or [B, H, W, C] (shared by all models).
      validate: check the inputs (the knowledge extractor skips it for points it built itself
        from already-validated inputs).

    Returns:
      float32 [M, B, K].

    Raises:
      InputError, BudgetExceededError, BlackBoxError.
    """
    shared = np.ndim(images) == 4
    if validate:
      images = check_images(images, self.image_shape, batch_dims=1 if shared else 2)
    if not shared and np.shape(images)[0] != self.num_models:
      raise InputError(f"got inputs for {np.shape(images)[0]} models, the group has "
                       f"{self.num_models}")
    b = np.shape(images)[0 if shared else 1]
    if self.budget is not None and np.any(self.queries + b > self.budget):
      worst = int(np.argmax(self.queries))
      raise BudgetExceededError(
          f"black box {self.model_ids[worst]!r}: {b} more queries would exceed its budget of "
          f"{self.budget} ({int(self.queries[worst])} used)")
    try:
      out = self._evaluate(images, shared)
    except (InputError, BlackBoxError):
      raise
    except Exception as e:
      raise BlackBoxError(f"black box group {self.model_ids[:3]}... raised "
                          f"{type(e).__name__}: {e}") from e
    out = np.asarray(out)
    expect = (self.num_models, b, self.num_classes)
    if out.shape != expect:
      raise BlackBoxError(f"black box {self.model_ids[0]!r} returned logits of shape {out.shape}, "
                          f"expected {expect}")
    if not np.all(np.isfinite(out)):
      bad = [self.model_ids[i] for i in np.flatnonzero(~np.isfinite(out).all(axis=(1, 2)))]
      raise BlackBoxError(f"black box {bad[0]!r} returned NaN/inf logits"
                          + (f" ({len(bad)} models)" if len(bad) > 1 else ""))
    self.queries += b
    if self._parent is not None:
      parent, rows = self._parent
      parent.queries[rows] += b
    return out.astype(np.float32, copy=False)

  def _evaluate(self, images, shared: bool):
    raise NotImplementedError


class StackGroup(BlackBoxGroup):
  """The fast path: every model of a zoo stack in one jitted call.

  Built by :func:`groups_from_zoo`; it keeps the stack's parameters private and exposes only
  logits.
  """

  def __init__(self, stack, *, strategy: str = "auto", mesh=None, budget: int | None = None):
    super().__init__(stack.model_ids, stack.spec.num_classes, stack.spec.image_shape, budget)
    self._stack = stack
    self._graphdef = stack.graphdef
    self._params = probe_lib.shard_stack(stack.params, mesh)  # padded and placed once
    self.strategy = strategy_lib.resolve(strategy)
    self._mesh = mesh
    self.name = stack.name
    self.max_pairs = 16384  # (model, image) pairs live at once per device under vmap
    self.min_batch = 256  # vmap: below this many images per call, models run in chunks instead
    self.max_batch = 4096

  @functools.cached_property
  def _fingerprints(self) -> list[str]:
    # SHA-256 of the architecture and each model's own parameter bytes: the zoo owner's side of
    # the black box knows its weights changed; the proxy only ever compares these strings.
    leaves = [(jax.tree_util.keystr(p), np.asarray(a))
              for p, a in jax.tree_util.tree_flatten_with_path(self._stack.params)[0]]
    out = []
    for i in range(self.num_models):
      spec = self._stack.spec  # not its conv lowering, which computes the same function
      h = hashlib.sha256(f"{spec.arch}|{spec.num_classes}|{spec.image_shape}|".encode())
      for path, a in leaves:
        h.update(f"{path}|{a.dtype}|{a.shape[1:]}|".encode())
        h.update(np.ascontiguousarray(a[i]).tobytes())
      out.append(h.hexdigest()[:32])
    return out

  @property
  def fingerprints(self) -> list[str | None]:
    return list(self._fingerprints)

  def subset(self, model_ids: Sequence[str]) -> "StackGroup":
    """The listed models of the stack as one group (counted here too); see the base class."""
    rows = self._members(model_ids)
    if rows is None:
      return self
    stack = dataclasses.replace(self._stack, model_ids=list(model_ids),
                                params=jax.tree.map(lambda a: a[rows], self._stack.params))
    sub = StackGroup(stack, strategy=self.strategy, mesh=self._mesh, budget=self.budget)
    sub.__dict__["_fingerprints"] = [self._fingerprints[r] for r in rows]
    return sub._attach(self, model_ids)

  def call_plan(self, b: int) -> tuple[int, int | None]:
    """(images per call, models at once per device or None for all) for ``b`` inputs per model.

    vmap materialises the activations of every model it batches, so it covers at most
    ``max_pairs`` (model, image) pairs per device: by fewer images per call while that keeps
    ``min_batch`` of them, beyond that by running the models in chunks within the call (a large
    stack would otherwise be probed one image per call). map and loop hold one model at a time.
    """
    per_call = min(b, self.max_batch)
    if self.strategy != "vmap":
      return max(per_call, 1), None
    devices = self._mesh.size if self._mesh is not None else 1
    models = -(-self.num_models // devices)  # per device
    per_call = min(per_call, max(self.max_pairs // models, self.min_batch))
    chunk = None if models * per_call <= self.max_pairs else max(self.max_pairs // per_call, 1)
    return max(per_call, 1), chunk

  def _evaluate(self, images, shared: bool):
    b = images.shape[0 if shared else 1]
    per_call, chunk = self.call_plan(b)
    outs = []
    for s in range(0, b, per_call):
      x = images[s:s + per_call] if shared else images[:, s:s + per_call]
      outs.append(probe_lib.stack_logits(self._graphdef, self._params, jax.numpy.asarray(x),
                                         strategy=self.strategy, mesh=self._mesh,
                                         num_models=self.num_models, model_chunk=chunk))
    return outs[0] if len(outs) == 1 else jax.numpy.concatenate(outs, axis=1)


class CallableBlackBox(BlackBoxGroup):
  """The slow path: one black box from any callable ``images [B, H, W, C] -> logits [B, K]``.

  Args:
    fn: the callable (numpy in; numpy or JAX array out).
    num_classes: its label-space size K.
    image_shape: the (H, W, C) it takes.
    model_id: its id in the index.
    batch_size: largest batch passed to ``fn`` at once.
    budget: optional query budget.
    fingerprint: optional version string of the function behind ``fn`` (e.g. a model hash or
      release tag): with one, a proxy may reuse the knowledge it extracted before; without one it
      probes the black box every time.
  """

  def __init__(self, fn: Callable, num_classes: int, image_shape: Sequence[int],
               model_id: str = "callable", batch_size: int = 256, budget: int | None = None,
               fingerprint: str | None = None):
    super().__init__([model_id], num_classes, image_shape, budget)
    self._fn = fn
    self.batch_size = int(batch_size)
    self.fingerprint = fingerprint

  @property
  def fingerprints(self) -> list[str | None]:
    return [self.fingerprint]

  def _evaluate(self, images, shared: bool):
    x = np.asarray(images if shared else images[0])
    outs = []
    for i in range(0, len(x), self.batch_size):
      chunk = x[i:i + self.batch_size]
      out = np.asarray(self._fn(chunk))
      if out.shape != (len(chunk), self.num_classes):
        raise BlackBoxError(f"black box {self.model_ids[0]!r} returned logits of shape "
                            f"{out.shape} for {len(chunk)} images, expected "
                            f"{(len(chunk), self.num_classes)}")
      outs.append(out)
    return np.concatenate(outs)[None] if outs else np.zeros((1, 0, self.num_classes), np.float32)


class EstimatorGroup(BlackBoxGroup):
  """Fitted scikit-learn-style estimators of one output size as black boxes.

  The adapter behind a zoo's non-neural families (:mod:`know2vec_jax.zoo.estimators`), usable for
  any estimator set: it flattens each image to a pixel vector and answers what the family answers
  (``logits``, ``probabilities`` or one-hot ``labels``); the proxy treats all three alike, by the
  argmax and the margin of each row.

  Args:
    estimators: an object with ``model_ids``, ``num_classes``, ``image_shape``, ``family``,
      ``output``, ``estimator(i)`` and ``fingerprints()`` (a zoo's
      :class:`know2vec_jax.zoo.estimators.EstimatorSet`).
    budget: optional per-model query budget.
  """

  def __init__(self, estimators, *, budget: int | None = None):
    super().__init__(estimators.model_ids, estimators.num_classes, estimators.image_shape, budget)
    self._set = estimators
    self._rows = list(range(len(estimators.model_ids)))
    self._fps = list(estimators.fingerprints())
    self.name = getattr(estimators, "name", "estimators")

  @property
  def fingerprints(self) -> list[str | None]:
    return list(self._fps)

  def subset(self, model_ids: Sequence[str]) -> "EstimatorGroup":
    """The listed estimators as one group (counted here too); see the base class."""
    pos = self._members(model_ids)
    if pos is None:
      return self
    sub = EstimatorGroup.__new__(EstimatorGroup)
    BlackBoxGroup.__init__(sub, model_ids, self.num_classes, self.image_shape, self.budget)
    sub._set, sub.name = self._set, self.name
    sub._rows = [self._rows[i] for i in pos]
    sub._fps = [self._fps[i] for i in pos]
    return sub._attach(self, model_ids)

  def _evaluate(self, images, shared: bool):
    x = np.asarray(images, np.float32)
    return np.stack([estimator_outputs(self._set.estimator(r), x if shared else x[i],
                                       self._set.output, self.num_classes)
                     for i, r in enumerate(self._rows)])


def estimator_outputs(estimator, images: np.ndarray, output: str, num_classes: int
                      ) -> np.ndarray:
  """What a fitted scikit-learn-style estimator answers for images.

  Args:
    estimator: has ``decision_function`` (``output="logits"``), ``predict_proba``
      (``"probabilities"``) or ``predict`` (``"labels"``).
    images: float32 [B, H, W, C], flattened to pixel vectors.
    output: ``logits``, ``probabilities`` or ``labels``.
    num_classes: K.

  Returns:
    float32 [B, K]: the logits, the probabilities, or one-hot labels.
  """
  x = np.asarray(images, np.float32).reshape(len(images), -1)
  if output == "logits":
    out = estimator.decision_function(x)
    if out.ndim == 1:  # two classes: one column, the score of class 1
      out = np.stack([-out, out], axis=1) / 2
  elif output == "probabilities":
    out = estimator.predict_proba(x)
  elif output == "labels":
    out = np.eye(num_classes, dtype=np.float32)[np.asarray(estimator.predict(x), np.int64)]
  else:
    raise InputError(f"estimator output must be logits, probabilities or labels, got {output!r}")
  return np.asarray(out, np.float32)


def groups_from_zoo(zoo, *, strategy: str = "auto", mesh=None, budget: int | None = None,
                    model_ids: Sequence[str] | None = None) -> list[BlackBoxGroup]:
  """The zoo's models as black-box groups, one per stack (optionally only some models).

  Args:
    zoo: a :class:`know2vec_jax.zoo.Zoo`.
    strategy: probe strategy for every stack.
    mesh: shard each stack's model axis over this mesh.
    budget: per-model query budget.
    model_ids: restrict to these models (stacks are sliced; order within a stack is kept).
  """
  wanted = None if model_ids is None else set(model_ids)
  if wanted is not None:
    unknown = wanted - set(zoo.records)
    if unknown:
      raise InputError(f"unknown model ids: {sorted(unknown)[:5]}")
  groups = []
  for stack in zoo.stacks.values():
    if wanted is not None:
      rows = [i for i, m in enumerate(stack.model_ids) if m in wanted]
      if not rows:
        continue
      if len(rows) != len(stack):
        sel = np.asarray(rows)
        stack = dataclasses.replace(stack, model_ids=[stack.model_ids[i] for i in rows],
                                    params=jax.tree.map(lambda a: a[sel], stack.params))
    groups.append(StackGroup(stack, strategy=strategy, mesh=mesh, budget=budget))
  for est in getattr(zoo, "estimators", {}).values():
    group = EstimatorGroup(est, budget=budget)
    if wanted is not None:
      keep = [m for m in est.model_ids if m in wanted]
      if not keep:
        continue
      group = group.subset(keep) if len(keep) != len(est) else group
      group._parent = None  # a fresh group of its own, not counted on a throw-away parent
    groups.append(group)
  return groups
