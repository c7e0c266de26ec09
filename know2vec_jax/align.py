"""The aligner: trains the vectorizers so that a query's vector points at the models that fit it.

Two objectives, each a frozen config with its own loss and batch sampler (docs/design.md,
"Method", step 7), trained by one pure step:

- :class:`RankingObjective` (retrieval; after the released code and TANS): on S = Q M^T over a
  batch of (query, model) pairs, a bidirectional hardest-negative margin ranking loss (each query's
  own model must beat the hardest model of another task by ``margin``, and each model's own query
  the hardest query of another task), plus ``ce_weight`` x cross-entropy classifying each model
  vector into its task id. Models of the query's own task are never negatives. Trains on
  :class:`AlignData`.
- :class:`TransferObjective` (fine-tune selection, SF-MTE): a listwise loss ranking the whole zoo
  per target query by measured fine-tune accuracy, plus an accuracy head's squared error. Trains
  on :class:`TransferData`.

The step is a pure function ``train_step(state, batch, rng) -> (state, metrics)``, jitted with
explicit shardings: the batch is split over the ``data`` axis of a ``jax.make_mesh`` mesh, the
state is replicated, and XLA inserts the collectives (S needs every device's vectors). The host
side draws each step's global batch from a seed and the step number, so every process (and any
device count) sees the same global batch; each process feeds only its own slice through
``jax.make_array_from_process_local_data``: the same code runs on one CPU, 8 forced CPU devices,
or a multi-host GPU/TPU setup after ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from know2vec_jax.config import require
from know2vec_jax.mesh import data_mesh
from know2vec_jax.vectorizers import Know2Vec, VectorizerConfig


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """How the aligner optimises (whatever the objective).

  Attributes:
    steps, batch_size: optimisation budget; batch_size must divide by the device count.
    learning_rate, warmup_steps, weight_decay: AdamW with warm-up and cosine decay.
    seed: init and batch-sampling seed.
    checkpoint_every: steps between orbax checkpoints (when a checkpoint dir is given).
  """
  steps: int = 1500
  batch_size: int = 64
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  weight_decay: float = 1e-4
  seed: int = 0
  checkpoint_every: int = 500

  def __post_init__(self):
    for name in ("steps", "batch_size", "checkpoint_every"):
      require(getattr(self, name) >= 1, f"align {name} must be >= 1, got {getattr(self, name)}")
    require(self.warmup_steps >= 0, f"align warmup_steps must be >= 0, got {self.warmup_steps}")
    require(self.learning_rate > 0, f"align learning_rate must be > 0, got "
            f"{self.learning_rate}")


@dataclasses.dataclass
class AlignData:
  """What the ranking objective trains on (host arrays).

  Attributes:
    model_grid: float32 [M, K_max, K_max, D] knowledge-grid features of the training models.
    model_mask: float32 [M, K_max].
    model_task: int32 [M] task index of each model in [0, T).
    query_grid: float32 [T, S, K_max, K_max, D]: S sampled query episodes per task (from the
      task's *train* split, never the evaluation queries).
    query_mask: float32 [T, K_max].
  """
  model_grid: np.ndarray
  model_mask: np.ndarray
  model_task: np.ndarray
  query_grid: np.ndarray
  query_mask: np.ndarray

  @property
  def num_tasks(self) -> int:
    return self.query_grid.shape[0]


@dataclasses.dataclass
class TransferData:
  """What the transferability (SF-MTE) objective trains on (host arrays).

  Attributes:
    model_grid: float32 [M, K_max, K_max, D] knowledge-grid features of the zoo models.
    model_mask: float32 [M, K_max].
    query_grid: float32 [T, S, K_max, K_max, D]: S query episodes of each training target.
    query_mask: float32 [T, K_max].
    accuracy: float32 [T, M] measured (ground-truth) transfer accuracy of each model on each
      training target.
  """
  model_grid: np.ndarray
  model_mask: np.ndarray
  query_grid: np.ndarray
  query_mask: np.ndarray
  accuracy: np.ndarray

  def __post_init__(self):
    t, m = self.accuracy.shape
    if self.query_grid.shape[0] != t or self.query_mask.shape[0] != t:
      raise ValueError(f"accuracy has {t} targets but query_grid/query_mask have "
                       f"{self.query_grid.shape[0]}/{self.query_mask.shape[0]}")
    if self.model_grid.shape[0] != m or self.model_mask.shape[0] != m:
      raise ValueError(f"accuracy has {m} models but model_grid/model_mask have "
                       f"{self.model_grid.shape[0]}/{self.model_mask.shape[0]}")
    if not np.all(np.isfinite(self.accuracy)):
      raise ValueError("accuracy contains NaN or inf")

  @property
  def num_tasks(self) -> int:
    return 0  # no task-id head: targets are not classified


def listwise_loss(scores, accuracy, temperature: float, target_temperature: float):
  """ListNet-style cross-entropy between the model ranking and the measured accuracies.

  Each row's accuracies are standardised (so a target's difficulty and spread do not matter, only
  the order and relative gaps) and turned into a target distribution ``softmax(z /
  target_temperature)`` over the zoo; the scores give ``softmax(scores / temperature)``.

  Args:
    scores: [B, M] cosine scores q . m.
    accuracy: [B, M] measured accuracies.
    temperature, target_temperature: the two softmax temperatures.

  Returns:
    The mean cross-entropy (scalar).
  """
  z = (accuracy - accuracy.mean(1, keepdims=True)) / (accuracy.std(1, keepdims=True) + 1e-6)
  target = jax.nn.softmax(z / target_temperature, axis=1)
  return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(scores / temperature, axis=1), axis=1))


def ranking_loss(q, m, task, margin: float):
  """Bidirectional hardest-negative margin ranking loss on S = q m^T.

  Args:
    q, m: [B, E] unit query and model vectors; row i of each belongs to task ``task[i]``.
    task: int32 [B].
    margin: the margin.

  Returns:
    (loss scalar, S [B, B]).
  """
  s = q @ m.T
  same = task[:, None] == task[None, :]
  pos = jnp.diagonal(s)
  neg_s = jnp.where(same, -jnp.inf, s)
  hard_m = neg_s.max(axis=1)  # hardest other-task model for each query
  hard_q = neg_s.max(axis=0)  # hardest other-task query for each model
  l_q = jnp.where(jnp.isfinite(hard_m), jax.nn.relu(margin - pos + hard_m), 0.0)
  l_m = jnp.where(jnp.isfinite(hard_q), jax.nn.relu(margin - pos + hard_q), 0.0)
  return l_q.mean() + l_m.mean(), s


@dataclasses.dataclass(frozen=True)
class RankingObjective:
  """Retrieval: margin ranking on S = Q M^T plus task-id cross-entropy (trains on AlignData).

  Attributes:
    margin: ranking margin.
    ce_weight: weight of the task-id cross-entropy.
    feature_noise: std of Gaussian noise added to input features (augmentation; uses the rng).
    subset_prob: class-subset augmentation: the fraction of batch items whose model grid and
      query grid are both restricted to the same random subset of the task's classes (a 3-of-4
      sub-task is a new (query, model) pair for free).
    hard_share: the share of each batch drawn as near-twins of the batch's other items: a model
      of one of the ``hard_neighbours`` tasks whose query classes look most like an item's
      (:func:`near_twin_tasks`), so that the hardest negatives the loss takes are the tasks a
      query is most easily mistaken for (three classes of four shared, the same classes in
      another domain) rather than whatever a uniform batch happens to hold.
    hard_neighbours: how many look-alike tasks of each task a near-twin is drawn from.
  """
  margin: float = 0.2
  ce_weight: float = 1.0
  feature_noise: float = 0.0
  subset_prob: float = 0.0
  hard_share: float = 0.0
  hard_neighbours: int = 4

  data_type: ClassVar[type] = AlignData
  accuracy_head: ClassVar[bool] = False
  progress_metric: ClassVar[tuple[str, str]] = ("top1", "batch_top1")

  def __post_init__(self):
    require(self.margin >= 0, f"margin must be >= 0, got {self.margin}")
    require(self.ce_weight >= 0, f"ce_weight must be >= 0, got {self.ce_weight}")
    require(self.feature_noise >= 0, f"feature_noise must be >= 0, got {self.feature_noise}")
    require(0 <= self.subset_prob <= 1, f"subset_prob must be in [0, 1], got {self.subset_prob}")
    require(0 <= self.hard_share <= 0.5, f"hard_share must be in [0, 0.5] (each near-twin needs "
            f"an item of the batch to be the twin of), got {self.hard_share}")
    require(self.hard_neighbours >= 1, f"hard_neighbours must be >= 1, got "
            f"{self.hard_neighbours}")

  def replicated(self, data: AlignData):
    """Step inputs every device needs whole (none for this objective)."""
    return ()

  def host_batch(self, data: AlignData, cfg: AlignConfig, step: int, rows: slice) -> dict:
    """This process's slice ``rows`` of the step's global batch (the same on every process)."""
    idx, eps, subset = sample_batch_indices(data, cfg, self.subset_prob, step, self.hard_share,
                                            self.hard_neighbours)
    return local_batch(data, idx[rows], eps[rows], subset[rows])

  def loss(self, model: Know2Vec, batch: dict, replicated, rng):
    del replicated
    mg, qg = batch["model_grid"], batch["query_grid"]
    if self.feature_noise > 0:
      k1, k2 = jax.random.split(rng)
      mg = mg + self.feature_noise * jax.random.normal(k1, mg.shape)
      qg = qg + self.feature_noise * jax.random.normal(k2, qg.shape)
    m = model.embed_models(mg, batch["model_mask"])
    q = model.embed_queries(qg, batch["query_mask"])
    rank, s = ranking_loss(q, m, batch["key"], self.margin)
    # The task-id head classifies whole-task model vectors only (class subsets are not tasks).
    ce_all = optax.softmax_cross_entropy_with_integer_labels(model.task_head(m), batch["task"])
    ce = (ce_all * batch["full"]).sum() / jnp.maximum(batch["full"].sum(), 1.0)
    loss = rank + self.ce_weight * ce
    top1 = jnp.mean(jnp.argmax(s, axis=1) == jnp.arange(s.shape[0]))
    return loss, {"loss": loss, "rank_loss": rank, "ce_loss": ce, "batch_top1": top1}


@dataclasses.dataclass(frozen=True)
class TransferObjective:
  """Fine-tune selection: listwise ranking of the zoo plus the accuracy head (TransferData).

  Attributes:
    temperature, target_temperature: the two softmax temperatures of :func:`listwise_loss`.
    accuracy_weight: weight of the accuracy head's squared error.
  """
  temperature: float = 0.05
  target_temperature: float = 0.5
  accuracy_weight: float = 1.0

  data_type: ClassVar[type] = TransferData
  accuracy_head: ClassVar[bool] = True
  progress_metric: ClassVar[tuple[str, str]] = ("mae", "accuracy_mae")

  def __post_init__(self):
    require(self.temperature > 0 and self.target_temperature > 0,
            f"temperatures must be > 0, got {self.temperature}, {self.target_temperature}")
    require(self.accuracy_weight >= 0, f"accuracy_weight must be >= 0, got "
            f"{self.accuracy_weight}")

  def replicated(self, data: TransferData):
    """Every step scores the whole zoo: the model grids are a replicated step input."""
    return (data.model_grid, data.model_mask)

  def host_batch(self, data: TransferData, cfg: AlignConfig, step: int, rows: slice) -> dict:
    """This process's slice of the step's global batch of target queries."""
    rng = np.random.default_rng([cfg.seed, step])
    tgt = rng.integers(0, data.accuracy.shape[0], cfg.batch_size)[rows]
    eps = rng.integers(0, data.query_grid.shape[1], cfg.batch_size)[rows]
    return {"query_grid": data.query_grid[tgt, eps], "query_mask": data.query_mask[tgt],
            "accuracy": data.accuracy[tgt].astype(np.float32)}

  def loss(self, model: Know2Vec, batch: dict, replicated, rng):
    del rng
    m = model.embed_models(*replicated)
    q = model.embed_queries(batch["query_grid"], batch["query_mask"])
    acc = batch["accuracy"]
    lw = listwise_loss(q @ m.T, acc, self.temperature, self.target_temperature)
    pred = model.predict_accuracy(q[:, None, :], m[None, :, :])
    mse = jnp.mean((pred - acc) ** 2)
    loss = lw + self.accuracy_weight * mse
    return loss, {"loss": loss, "listwise_loss": lw,
                  "accuracy_mae": jnp.mean(jnp.abs(pred - acc))}


# The aligner's two losses, by the proxy objective that trains with each ("both" trains the
# ranking loss, then an accuracy head on the frozen vectors: know2vec_jax.selection).
OBJECTIVES = {"retrieve": RankingObjective, "finetune": TransferObjective}


def make_optimizer(cfg: AlignConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                max(cfg.steps, cfg.warmup_steps + 1),
                                                0.02 * cfg.learning_rate)
  return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def init_state(vcfg: VectorizerConfig, feature_dim: int, num_tasks: int, cfg: AlignConfig,
               accuracy_head: bool = False):
  """(graphdef, state) where state = {"params", "opt_state", "step"} is a pure pytree."""
  model = Know2Vec(vcfg, feature_dim, num_tasks, accuracy_head=accuracy_head,
                   rngs=nnx.Rngs(cfg.seed))
  graphdef, params = nnx.split(model)
  tx = make_optimizer(cfg)
  return graphdef, {"params": params, "opt_state": tx.init(params),
                    "step": jnp.zeros((), jnp.int32)}


def train_step(graphdef, cfg: AlignConfig, objective, state, batch, replicated, rng):
  """One AdamW step of ``objective``. Pure: ``(state, batch, replicated, rng) -> (state,
  metrics)``; ``replicated`` holds the step inputs every device sees whole."""
  tx = make_optimizer(cfg)

  def loss_fn(params):
    return objective.loss(nnx.merge(graphdef, params), batch, replicated, rng)
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


@functools.lru_cache(maxsize=None)
def _jitted_step(mesh):
  """:func:`train_step` jitted for ``mesh`` (state, inputs every device sees whole and the key
  replicated, the batch split over ``data``). One jitted function per mesh, with the model
  definition, the config and the objective static, so that every trainer of equal shapes reuses
  one compilation."""
  rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(train_step, static_argnums=(0, 1, 2), in_shardings=(rep, split, rep, rep),
                 out_shardings=(rep, rep), donate_argnums=(3,))


def near_twin_tasks(query_grid, query_mask, n: int) -> np.ndarray:
  """Each task's ``n`` most look-alike other tasks, by their query episodes alone.

  A task's class prototypes are the normalised means over its episodes of the query grids'
  diagonals; task b looks like task a by the mean over a's classes of the best cosine to one of
  b's. No task metadata is read: a zoo of any sources and class sets works.

  Args:
    query_grid: float [T, S, K_max, K_max, D] query episodes; query_mask: float [T, K_max].
    n: neighbours per task (at most T - 1).

  Returns:
    int32 [T, min(n, T - 1)], most look-alike first.
  """
  grid = np.asarray(query_grid, np.float32)
  k = grid.shape[2]
  protos = grid[:, :, np.arange(k), np.arange(k)].mean(1)  # [T, K, D]
  protos /= np.maximum(np.linalg.norm(protos, axis=-1, keepdims=True), 1e-6)
  mask = np.asarray(query_mask) > 0
  look = np.empty((len(protos), len(protos)), np.float64)
  for a in range(0, len(protos), 256):  # [256, T, K, K] at a time, not a large zoo's T^2 K^2
    sim = np.einsum("akd,bjd->abkj", protos[a:a + 256], protos)
    sim = np.where(mask[None, :, None, :], sim, -np.inf).max(-1)  # a's class k vs b's best
    m = mask[a:a + 256]
    look[a:a + 256] = np.where(m[:, None, :], sim, 0.0).sum(-1) / np.maximum(m.sum(-1), 1)[:, None]
  np.fill_diagonal(look, -np.inf)
  n = min(int(n), len(look) - 1)
  return np.argsort(-look, axis=1, kind="stable")[:, :n].astype(np.int32)


def _twins(data: AlignData, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """(near-twin tasks [T, n], each task's model rows), computed once per data and n."""
  cached = getattr(data, "_twins", None)
  if cached is None or cached[0] != n:
    by_task = [np.flatnonzero(data.model_task == t) for t in range(data.num_tasks)]
    cached = (n, near_twin_tasks(data.query_grid, data.query_mask, n), by_task)
    data._twins = cached
  return cached[1], cached[2]


def sample_batch_indices(data: AlignData, cfg: AlignConfig, subset_prob: float, step: int,
                         hard_share: float = 0.0, hard_neighbours: int = 4):
  """The global batch of a step, the same on every process.

  Returns:
    (model rows [B], episode ids [B], class-subset masks float32 [B, K_max]). With probability
    ``subset_prob`` an item keeps only a random subset (>= 2) of its task's classes, on the
    model grid and the query grid alike (see ``RankingObjective.subset_prob``). With
    ``hard_share`` the last round(hard_share * B) rows are models of near-twin tasks of the
    first ones (``RankingObjective.hard_share``), drawn from a generator of their own so that the
    rest of the batch is what it is without them.
  """
  rng = np.random.default_rng([cfg.seed, step])
  rows = rng.integers(0, len(data.model_task), cfg.batch_size)
  eps = rng.integers(0, data.query_grid.shape[1], cfg.batch_size)
  h = int(round(hard_share * cfg.batch_size))
  if h and data.num_tasks > 1:
    twins, by_task = _twins(data, hard_neighbours)
    hard = np.random.default_rng([cfg.seed, step, 1])
    for b in range(cfg.batch_size - h, cfg.batch_size):
      of = data.model_task[rows[b - (cfg.batch_size - h)]]
      task = twins[of, hard.integers(0, twins.shape[1])]
      rows[b] = by_task[task][hard.integers(0, len(by_task[task]))]
  subset = np.array(data.query_mask[data.model_task[rows]])
  for b in np.flatnonzero(rng.random(cfg.batch_size) < subset_prob):
    valid = np.flatnonzero(subset[b] > 0)
    if len(valid) > 2:
      keep = rng.choice(valid, size=rng.integers(2, len(valid)), replace=False)
      subset[b] = 0.0
      subset[b, keep] = 1.0
  return rows, eps, subset


def local_batch(data: AlignData, rows, eps, subset) -> dict:
  """Gathers a batch. ``key`` identifies (task, class subset): the ranking loss's positives."""
  task = data.model_task[rows]
  bits = (subset > 0) @ (1 << np.arange(subset.shape[1]))
  full = np.all(subset == data.query_mask[task], axis=1)
  return {"model_grid": data.model_grid[rows], "model_mask": data.model_mask[rows] * subset,
          "query_grid": data.query_grid[task, eps], "query_mask": data.query_mask[task] * subset,
          "task": task.astype(np.int32),
          "key": (task.astype(np.int64) * (1 << subset.shape[1]) + bits).astype(np.int32),
          "full": full.astype(np.float32)}


class Trainer:
  """Runs the aligner: sharded jitted steps, progress, orbax checkpoints with resume.

  Args:
    vcfg: vectorizer config.
    feature_dim: D, the backbone's feature size.
    cfg: how to optimise.
    objective: :class:`RankingObjective` (on :class:`AlignData`) or :class:`TransferObjective`
      (on :class:`TransferData`).
    data: the training data (on every process).
    mesh: the ``data`` mesh (default: all devices of all processes).
    checkpoint_dir: where a ``CheckpointManager`` keeps the latest checkpoints; training resumes
      from the latest step found there.

  Raises:
    ValueError: a batch size the device count does not divide, or data of the wrong kind for the
      objective.
  """

  def __init__(self, vcfg: VectorizerConfig, feature_dim: int, cfg: AlignConfig, objective,
               data, mesh=None, checkpoint_dir=None):
    self.vcfg, self.cfg, self.objective, self.data = vcfg, cfg, objective, data
    if not isinstance(data, objective.data_type):
      raise ValueError(f"{type(objective).__name__} trains on {objective.data_type.__name__}, "
                       f"got {type(data).__name__}")
    self.mesh = mesh if mesh is not None else data_mesh()
    n = self.mesh.size
    if cfg.batch_size % n:
      raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {n} devices")
    self.graphdef, state = init_state(vcfg, feature_dim, data.num_tasks, cfg,
                                      accuracy_head=objective.accuracy_head)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.state = jax.device_put(state, self.replicated)
    whole = jax.device_put(objective.replicated(data), self.replicated)
    step = _jitted_step(self.mesh)
    # The seed and the checkpoint spacing do not enter the step: trainers that differ only in
    # them (seeds of one experiment, the folds of equal shapes) share its compilation.
    key_cfg = dataclasses.replace(cfg, seed=0, checkpoint_every=1)
    graphdef = self.graphdef
    self._step = lambda state, batch, rng: step(graphdef, key_cfg, objective, state, batch,
                                                whole, rng)
    self.manager = None
    if checkpoint_dir is not None:
      self.manager = ocp.CheckpointManager(
          pathlib.Path(checkpoint_dir).expanduser().absolute(),
          options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
      latest = self.manager.latest_step()
      if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
        restored = self.manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        self.state = jax.device_put(restored, self.replicated)
    self._host_step = int(self.state["step"])

  @property
  def step(self) -> int:
    """Steps done. Kept on the host: reading ``state["step"]`` would sync with the device
    every step and stall the asynchronous dispatch of the next one."""
    return self._host_step

  def global_batch(self, step: int) -> dict:
    """This process's slice of the step's global batch, assembled into global sharded arrays."""
    per = self.cfg.batch_size // jax.process_count()
    sl = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    local = self.objective.host_batch(self.data, self.cfg, step, sl)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}

  def run(self, steps: int | None = None, progress: bool = True, log_every: int = 50) -> list:
    """Trains up to ``steps`` (default ``cfg.steps``) total steps; returns logged metrics."""
    total = self.cfg.steps if steps is None else steps
    history = []
    bar = None
    if progress and jax.process_index() == 0:
      from tqdm.auto import tqdm
      bar = tqdm(total=total, initial=self.step, desc="training aligner", unit="step",
                 dynamic_ncols=True)
    key = jax.random.key(self.cfg.seed + 1)
    t0 = time.perf_counter()
    while self.step < total:
      step = self.step
      batch = self.global_batch(step)
      self.state, metrics = self._step(self.state, batch, jax.random.fold_in(key, step))
      self._host_step += 1
      if (step + 1) % log_every == 0 or step + 1 == total:
        m = {k: float(v) for k, v in metrics.items()} | {"step": step + 1}
        history.append(m)
        if bar is not None:
          label, name = self.objective.progress_metric
          bar.set_postfix({"loss": f"{m['loss']:.3f}", label: f"{m[name]:.3f}"})
      if bar is not None:
        bar.update(1)
      if self.manager is not None and ((step + 1) % self.cfg.checkpoint_every == 0
                                       or step + 1 == total):
        self.manager.save(step + 1, args=ocp.args.StandardSave(self.state))
    if self.manager is not None:
      self.manager.wait_until_finished()
    if bar is not None:
      bar.close()
    self.seconds = time.perf_counter() - t0
    return history

  def model(self) -> Know2Vec:
    """The trained vectorizers as an NNX module (host copy of the parameters)."""
    return nnx.merge(self.graphdef, jax.device_get(self.state["params"]))
