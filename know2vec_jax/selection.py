"""Model selection for fine-tuning: training targets, their measured labels and the accuracy head.

Retrieval answers "which model was trained on this task"; selection answers "which model will be
best on this task *after fine-tuning*" (docs/design.md, "Fine-tune selection"). The product learns
the second from measurements it makes itself:

1. :func:`draw_targets` draws training targets from the zoo's own sources (their *train* splits),
   K from the zoo's class counts and random class sets, skipping any (source, class set) the
   caller excludes (an evaluation benchmark's targets).
2. :func:`know2vec_jax.transfer.ground_truth` fine-tunes every fine-tunable zoo model on every
   target (white-box, cached on disk): the labels ``accuracy [T, M]``.
3. :func:`fit_head` trains an :class:`know2vec_jax.vectorizers.AccuracyHead` on the proxy's frozen
   vectors: query vectors of episodes drawn from each target's shot pool against the models'
   vectors, a squared error on the accuracy plus a listwise ranking term. Because the vectors are
   those of the retrieval index, one index serves both retrieval and selection.

Before the final fit on every target, a quarter of the targets is held out and the head's error
and ranking quality there are measured against a constant predictor and a query-blind prior (the
mean accuracy of each model over the other targets): ``Proxy.info["selection"]`` reports them, so
a user sees whether the head reads the task on this zoo at all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from know2vec_jax.align import listwise_loss
from know2vec_jax.config import require
from know2vec_jax.data import Task, load_source
from know2vec_jax.index import check_k
from know2vec_jax.metrics import weighted_tau
from know2vec_jax.retrieval import result_row
from know2vec_jax.transfer import FinetuneConfig, TransferTarget, leak_key
from know2vec_jax.vectorizers import AccuracyHead


SCORERS = ("head", "q.m")


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  """How the fine-tune selection labels and head are made.

  Attributes:
    ks: the class counts targets are drawn with; empty: the zoo's own class counts.
    finetune: how each target's label is measured (fewer runs and test images than an
      evaluation's ground truth: labels for training, not for judging). Default: the body
      frozen, a new linear head trained 100 steps on 10 shots per class, 2 runs: on 28x28 images
      a full 30-step fine-tune on 50 shots brings every pre-trained model within about 0.01 of
      the others, so its ranking says little about which pre-training suits the task, while the
      frozen body keeps that difference (experiments/sfmte.py, the query-dependent benchmark).
      ``finetune.mode=full`` measures the full fine-tune instead.
    targets: training targets; 96 chosen on validation targets of the query-dependent benchmark
      (24 left the accuracy head at weighted tau 0.09 there, 96 at 0.43).
    episodes, shots: query episodes per target and images per class in each (the head's inputs).
    steps, batch_size, learning_rate, weight_decay: the head's AdamW fit, ``batch_size`` query
      vectors (against every model) a step.
    listwise_weight, temperature, target_temperature: the ranking term beside the squared error
      (:func:`know2vec_jax.align.listwise_loss` on the predicted accuracies).
    holdout: the share of targets held out to measure the head before its final fit (0: none).
    seed: target drawing and head initialisation.
    scorer: what ``know2vec select`` ranks by: ``"head"`` (the accuracy head's predicted
      accuracy) or ``"q.m"`` (the query vector against the model vectors: for vectors trained on
      the fine-tune labels, objective ``"finetune"``; the ``select`` preset, where validation
      ranked the query-dependent benchmark's held-out training targets at weighted tau 0.698 by
      q.m against 0.672 by the head).
  """
  targets: int = 96
  ks: tuple[int, ...] = ()
  finetune: FinetuneConfig = FinetuneConfig(mode="linear", steps=100, shots=10, runs=2,
                                            test_per_class=100)
  episodes: int = 8
  shots: int = 10
  steps: int = 1500
  batch_size: int = 16
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  listwise_weight: float = 0.1
  temperature: float = 0.05
  target_temperature: float = 0.5
  holdout: float = 0.25
  seed: int = 0
  scorer: str = "head"

  def __post_init__(self):
    for name in ("targets", "episodes", "shots", "steps", "batch_size"):
      require(getattr(self, name) >= 1, f"selection.{name} must be >= 1, got "
              f"{getattr(self, name)}")
    require(all(k >= 2 for k in self.ks), f"selection.ks must all be >= 2, got {list(self.ks)}")
    require(self.learning_rate > 0, f"selection.learning_rate must be > 0, got "
            f"{self.learning_rate}")
    require(self.weight_decay >= 0 and self.listwise_weight >= 0,
            "selection.weight_decay and selection.listwise_weight must be >= 0")
    require(self.temperature > 0 and self.target_temperature > 0,
            "selection temperatures must be > 0")
    require(0.0 <= self.holdout < 1.0, f"selection.holdout must be in [0, 1), got {self.holdout}")
    require(self.scorer in SCORERS, f"selection.scorer must be one of {SCORERS}, got "
            f"{self.scorer!r}")


def finetunable(zoo, model_ids: Sequence[str] | None = None) -> list[str]:
  """The models of ``model_ids`` (default: all) that can be fine-tuned: the neural ones (a
  scikit-learn estimator has no weights to start a fine-tune from)."""
  ids = list(zoo.records) if model_ids is None else list(model_ids)
  return [m for m in ids if zoo.records[m].stack in zoo.stacks]


def draw_targets(tasks: Iterable[Task], count: int, ks: Sequence[int] = (), seed: int = 0,
                 exclude: Iterable[Task] = (), max_classes: int = 10,
                 any_domain: bool = False) -> list[TransferTarget]:
  """Training targets from the sources of a zoo's tasks (train splits), deterministic in ``seed``.

  Sources are taken in turn (every source of a zoo model, transforms included); each target's K
  is drawn from ``ks`` (default: the tasks' class counts, capped at the source's classes and
  ``max_classes``) and its classes at random. A (source, class set) in ``exclude`` or drawn before
  is skipped, so an evaluation benchmark can keep its targets out of training.

  Args:
    tasks: the zoo models' tasks (:func:`know2vec_jax.proxy.zoo_tasks`), whose sources and class
      counts the targets follow.
    count: how many targets.
    ks: the class counts to draw from (empty: the tasks').
    seed: the drawing seed.
    exclude: tasks no target may equal (source and class set; class order ignored).
    max_classes: the largest K drawn.
    any_domain: compare with ``exclude`` by base dataset and class set, whatever the domain
      (:func:`know2vec_jax.transfer.leak_key`): a benchmark's leak rule.

  Returns:
    ``count`` :class:`TransferTarget` with ``split="train"`` and ``kind="training"``.

  Raises:
    ValueError: no tasks, or fewer distinct (source, class set) pairs than ``count``.
  """
  tasks = list(tasks)
  sources = sorted({t.source for t in tasks})
  if not sources:
    raise ValueError("the zoo holds no models to draw training targets from")
  ks = sorted(set(ks or (t.k for t in tasks)))
  key = leak_key if any_domain else (lambda t: (t.source, tuple(sorted(t.classes))))
  banned = {key(t) for t in exclude}
  n_classes = {s: load_source(s).num_classes for s in sources}
  # Every distinct (source, class set) there is: asking for more fails at once rather than after
  # 100 x count draws.
  capacity = sum(math.comb(n_classes[s], k) for s in sources for k in ks
                 if 2 <= k <= min(n_classes[s], max_classes))
  if count > capacity:
    raise ValueError(f"could not draw {count} distinct training targets from sources "
                     f"{sources} with K in {ks}: there are only {capacity}")
  rng = np.random.default_rng(seed)
  out, seen, tries = [], set(), 0
  while len(out) < count:
    tries += 1
    if tries > 100 * count + 1000:
      raise ValueError(f"could not draw {count} distinct training targets from sources "
                       f"{sources} with K in {ks} (drew {len(out)})")
    src = sources[(tries - 1) % len(sources)]
    usable = [k for k in ks if 2 <= k <= min(n_classes[src], max_classes)]
    if not usable:
      continue
    k = int(rng.choice(usable))
    classes = tuple(sorted(int(c) for c in rng.choice(n_classes[src], size=k, replace=False)))
    task = Task(src, classes)
    if key(task) in banned or (src, classes) in seen:
      continue
    seen.add((src, classes))
    out.append(TransferTarget(f"select-{len(out):02d}-{src}-{'-'.join(map(str, classes))}",
                              task, split="train", kind="training"))
  return out


def _fit(q, m, acc, cfg: SelectionConfig, hidden: int, seed: int):
  """AdamW on (query, model) pairs; returns (head, per-step losses)."""
  head = AccuracyHead(q.shape[1], hidden, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(head)
  opt = optax.adamw(optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps),
                    weight_decay=cfg.weight_decay)

  def loss_fn(p, qb, ab):
    pred = nnx.merge(graphdef, p)(qb[:, None, :], m[None, :, :])  # [B, M]
    mse = jnp.mean((pred - ab) ** 2)
    lw = listwise_loss(pred, ab, cfg.temperature, cfg.target_temperature)
    return mse + cfg.listwise_weight * lw

  # Minibatches of query rows against every model: a step costs batch x M pairs through the MLP
  # (full batch, 768 queries x 435 models, is ~40 GFLOP a step: minutes per fit on a CPU).
  batch = min(cfg.batch_size, q.shape[0])

  @jax.jit
  def run(p, key):
    def step(carry, k):
      p, s = carry
      rows = jax.random.choice(k, q.shape[0], (batch,), replace=False)
      loss, g = jax.value_and_grad(loss_fn)(p, q[rows], acc[rows])
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(key, cfg.steps))
    return p, losses

  params, losses = run(params, jax.random.key(seed))
  nnx.update(head, params)
  return head, np.asarray(losses)


def _predict(head: AccuracyHead, q, m) -> np.ndarray:
  return np.asarray(head(jnp.asarray(q)[:, None, :], jnp.asarray(m)[None, :, :]))


def fit_head(query_vectors: np.ndarray, query_target: np.ndarray, model_vectors: np.ndarray,
             accuracy: np.ndarray, cfg: SelectionConfig, hidden: int
             ) -> tuple[AccuracyHead, dict]:
  """Trains the accuracy head on frozen vectors, after measuring it on held-out targets.

  Args:
    query_vectors: float32 [Q, E] query vectors (episodes of the training targets).
    query_target: int [Q] the target each query vector was drawn from (row of ``accuracy``).
    model_vectors: float32 [M, E] the labelled models' vectors.
    accuracy: float32 [T, M] measured fine-tune accuracy of each model on each target.
    cfg: the head's settings.
    hidden: the head's hidden width.

  Returns:
    (the head fitted on every target, info): ``info`` has the final training loss and, when
    ``cfg.holdout`` leaves at least one target out, ``validation``: on the held-out targets the
    head's mean absolute error and mean weighted tau against the errors of a constant predictor
    (the training targets' mean accuracy) and of the per-model mean (each model's mean accuracy
    over the training targets, the query-blind prior, whose tau is given too).
  """
  q = np.asarray(query_vectors, np.float32)
  qt = np.asarray(query_target, np.int64)
  m = jnp.asarray(np.asarray(model_vectors, np.float32))
  acc = np.asarray(accuracy, np.float32)
  t = acc.shape[0]
  info: dict = {"targets": int(t), "models": int(acc.shape[1]), "queries": int(len(q))}
  n_val = int(round(cfg.holdout * t))
  if n_val >= 1 and t - n_val >= 1:
    rng = np.random.default_rng(cfg.seed)
    val = np.sort(rng.permutation(t)[:n_val])
    train = np.setdiff1d(np.arange(t), val)
    rows = np.isin(qt, train)
    head, _ = _fit(jnp.asarray(q[rows]), m, jnp.asarray(acc[qt[rows]]), cfg, hidden, cfg.seed)
    prior = acc[train].mean(0)
    head_mae, head_tau, const_mae, model_mae, prior_tau = [], [], [], [], []
    for v in val:
      pred = _predict(head, q[qt == v], m).mean(0)  # the mean over the target's episodes
      head_mae.append(float(np.mean(np.abs(pred - acc[v]))))
      head_tau.append(weighted_tau(acc[v], pred))
      const_mae.append(float(np.mean(np.abs(acc[train].mean() - acc[v]))))
      model_mae.append(float(np.mean(np.abs(prior - acc[v]))))
      prior_tau.append(weighted_tau(acc[v], prior))
    info["validation"] = {"targets": [int(v) for v in val],
                          "head_mae": float(np.mean(head_mae)),
                          "constant_mae": float(np.mean(const_mae)),
                          "per_model_mae": float(np.mean(model_mae)),
                          "head_tau": float(np.mean(head_tau)),
                          "prior_tau": float(np.mean(prior_tau))}
  head, losses = _fit(jnp.asarray(q), m, jnp.asarray(acc[qt]), cfg, hidden, cfg.seed)
  info["final_loss"] = float(losses[-1])
  return head, info


def select(proxy, images, labels, index, k: int = 10, scorer: str | None = None) -> list[dict]:
  """Ranks the index's models for fine-tuning on a few-shot task.

  The query is embedded exactly as for retrieval and scored against every row of the index (the
  same vectors retrieval searches: one index serves both): by the accuracy head's predicted
  accuracy (scorer ``"head"``) or by q.m, the query vector against the model vectors (``"q.m"``,
  for vectors trained on fine-tune labels). Either way each row carries the head's predicted
  accuracy.

  Args:
    proxy: a :class:`know2vec_jax.proxy.Proxy` with an accuracy head.
    images: float32 [N, H, W, C] in [0, 1], the task's labelled shots.
    labels: int [N] in 0..K-1.
    index: an index built with this proxy.
    k: how many models to return.
    scorer: ``"head"`` or ``"q.m"``; None: the proxy's ``selection.scorer``.

  Returns:
    One dict per model, best first: ``rank`` (1-based), ``model_id``, ``predicted_accuracy``
    (in [0, 1]), ``score`` (what the rows are ranked by), ``arch`` and ``task`` (None when the
    index has no such metadata), then the rest of the model's metadata.

  Raises:
    InputError: a bad query; ProxyError: a proxy without an accuracy head, an unknown scorer, an
    empty index, an index of another vector size, or rows another proxy vectorized.
  """
  from know2vec_jax.pipeline import ProxyError  # the pipeline imports this module
  scorer = proxy.config.selection.scorer if scorer is None else scorer
  if scorer not in SCORERS:
    raise ProxyError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
  proxy.require_head()
  check_k(k, ProxyError)
  proxy.check_index(index)
  if len(index) == 0:
    raise ProxyError("the index is empty: add models with `know2vec index add`")
  q = proxy.embed_query(images, labels)
  pred = proxy.predict_accuracy(q[None], index.vectors)[0]
  score = pred if scorer == "head" else np.asarray(index.vectors, np.float32) @ q
  ids = index.ids
  order = np.argsort(-score, kind="stable")[:min(int(k), len(ids))]
  return [result_row(proxy, index, ids[i], r, {"predicted_accuracy": float(pred[i]),
                                                "score": float(score[i])})
          for r, i in enumerate(order)]
