"""What a zoo contains: one :class:`ModelSpec` per model, and the preset zoos.

The demo preset is designed so that both evaluation settings are meaningful (docs/design.md,
"What we measured"): tasks that differ by class set *and* tasks that share a class set but differ
in domain; and, within the models of a task, structured variety that changes how well a model
transfers (capacity, training budget, source breadth, deliberately weak models).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from know2vec_jax.config import Presets
from know2vec_jax.data import load_source, sample_tasks
from know2vec_jax.data.tasks import Task

ROLES = ("normal", "label_noise", "short")
PRESETS: Presets[list] = Presets("zoo")  # name -> factory(seed) of the model specs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How one zoo model is trained.

  Attributes:
    model_id: unique, human-readable id.
    arch: architecture family (see ``architectures.ARCHITECTURES``).
    task: the source (domain transforms included) and its classes, in label order.
    seed: init and batch-order seed.
    steps: Adam steps.
    learning_rate: peak learning rate.
    batch_size: per-step batch.
    label_noise: fraction of training labels replaced by a uniformly drawn other class.
    role: ``normal``, or why the model is deliberately weak (``label_noise``, ``short``).
  """
  model_id: str
  arch: str
  task: Task
  seed: int
  steps: int
  learning_rate: float = 3e-3
  batch_size: int = 64
  label_noise: float = 0.0
  role: str = "normal"

  @property
  def k(self) -> int:
    return self.task.k

  def __post_init__(self):
    if self.steps < 0:
      raise ValueError(f"{self.model_id}: steps must be >= 0")
    if not 0.0 <= self.label_noise < 1.0:
      raise ValueError(f"{self.model_id}: label_noise must be in [0, 1)")
    if self.role not in ROLES:
      raise ValueError(f"{self.model_id}: role must be one of {ROLES}")


def model_id(arch: str, task: Task, variant: str = "a") -> str:
  return f"{arch}.{task.source}.{'-'.join(str(c) for c in task.classes)}.{variant}"


@PRESETS.register("demo")
def demo_specs(seed: int = 0, image_size: int = 28, channels: int = 1) -> list[ModelSpec]:
  """The demo zoo: 435 models over 3 datasets x 4 domains, 3 families, K in {2, 4, 10}.

  Per base dataset (fashion_mnist, mnist5k, digits):
    - 32 distinct 4-way class sets in the plain domain, and 12 of them again in a transformed domain
      (4 each inverted, rotated, blurred): 44 4-way tasks, 3 models each (mlp, cnn_s, cnn_l).
    - 4 two-way tasks (mlp and cnn_s) and 10-way tasks in each domain (cnn_s; also cnn_l plain).
  Budgets vary by model (short 100, normal 300, long 600 steps for CNNs; MLPs 400); about 1 in 16
  4-way models is trained with 50% label noise and about 1 in 16 for only 12 steps.

  Args:
    seed: the seed for class sets, budgets, weak-model choice and model seeds.
    image_size, channels: the common image format (used to check the tasks against the sources).

  Returns:
    The model specs, in a fixed order.
  """
  rng = np.random.default_rng(seed)
  specs: list[ModelSpec] = []
  domains = ("invert", "rot90", "blur")
  for b, base in enumerate(("fashion_mnist", "mnist5k", "digits")):
    data = load_source(base, image_size=image_size, channels=channels)
    class_sets = [t.classes for t in sample_tasks(data, 4, 32, seed=seed * 1000 + b)]
    tasks = [Task(base, c) for c in class_sets]
    tasks += [Task(f"{base}+{domains[i // 4]}", class_sets[i]) for i in range(12)]
    for task in tasks:
      for arch in ("mlp", "cnn_s", "cnn_l"):
        roll = rng.random()
        steps = 400 if arch == "mlp" else int(rng.choice([100, 300, 300, 600]))
        noise, role = 0.0, "normal"
        if roll < 1 / 16:
          noise, role = 0.5, "label_noise"
        elif roll < 2 / 16:
          steps, role = 12, "short"
        specs.append(ModelSpec(model_id(arch, task), arch, task, seed=int(rng.integers(2**31)),
                               steps=steps, label_noise=noise, role=role))
    for t in sample_tasks(data, 2, 4, seed=seed * 1000 + 100 + b):
      for arch in ("mlp", "cnn_s"):
        specs.append(ModelSpec(model_id(arch, t), arch, t, seed=int(rng.integers(2**31)),
                               steps=300))
    all_classes = tuple(range(data.num_classes))
    for dom in ("",) + domains:
      task = Task(base + (f"+{dom}" if dom else ""), all_classes)
      for arch in (("cnn_s", "cnn_l") if not dom else ("cnn_s",)):
        specs.append(ModelSpec(model_id(arch, task), arch, task, seed=int(rng.integers(2**31)),
                               steps=600))
  return specs


STARTER_PLAIN_SETS = 16  # plain 4-way class sets per dataset in the starter zoo


@PRESETS.register("starter")
def starter_specs(seed: int = 0, image_size: int = 28, channels: int = 1) -> list[ModelSpec]:
  """The main job's zoo: 180 models of the demo zoo, exactly as it trains them.

  A subset of :func:`demo_specs` (the same ids, seeds, budgets, label noise and short runs, so a
  starter model is the demo model of its id): per base dataset, the ``mlp`` and ``cnn_s`` models
  of the first :data:`STARTER_PLAIN_SETS` plain 4-way class sets and of the 12 transformed-domain
  4-way tasks (4 each inverted, rotated, blurred; their class sets are plain sets 0-11, so tasks
  that share a class set across domains stay in), and the ``cnn_s`` 10-way model of every domain
  (a model whose label space covers the query's, a distractor that LEEP ranks first; they were
  added after a first version without them, on which LEEP's held-out top-1 was 0.88 against
  Know2Vec's 0.85, so that the starter zoo keeps the demo zoo's kinds of distractor). It drops
  the ``cnn_l`` models, most of the demo zoo's training time, and the 2-way tasks.

  Args:
    seed, image_size, channels: as :func:`demo_specs`.

  Returns:
    The model specs, in the demo zoo's order.
  """
  specs = demo_specs(seed, image_size, channels)
  plain: dict[str, list] = {}  # base dataset -> its plain 4-way tasks, in the demo's order
  for s in specs:
    if s.k == 4 and "+" not in s.task.source and s.task not in plain.get(s.task.source, []):
      plain.setdefault(s.task.source, []).append(s.task)
  keep = {t for tasks in plain.values() for t in tasks[:STARTER_PLAIN_SETS]}

  def wanted(s: ModelSpec) -> bool:
    if s.k == 10:
      return s.arch == "cnn_s"
    return s.k == 4 and s.arch in ("mlp", "cnn_s") and ("+" in s.task.source or s.task in keep)
  return [s for s in specs if wanted(s)]


NEURAL_FAMILIES = ("mlp", "cnn_s", "cnn_l")
ESTIMATOR_FAMILIES = ("logreg", "forest", "knn")


@PRESETS.register("varied")
def varied_specs(seed: int = 0, image_size: int = 28, channels: int = 1) -> list[ModelSpec]:
  """The demo zoo plus non-neural families and family-exclusive tasks: 615 models, 6 families.

  On top of :func:`demo_specs` (435 models of ``mlp``, ``cnn_s``, ``cnn_l``), per base dataset:
    - the three scikit-learn families (``logreg``: logits, ``forest``: probabilities, ``knn``:
      labels only; :mod:`know2vec_jax.zoo.estimators`) on 12 of the demo's 4-way tasks (the first
      8 plain class sets and the first of each transformed domain): 108 models;
    - for each of the six families, 4 tasks that only it has (class sets the demo zoo does not
      use; 2 plain, 2 in a transformed domain), one model each: 72 models. A query of such a task
      has exactly one right model, of one known family: what leave-one-family-out evaluation
      asks about (``experiments/generalise.py``).

  Args:
    seed: as :func:`demo_specs` (its models are exactly the demo zoo's).
    image_size, channels: the common image format.

  Returns:
    The model specs, the demo's first.
  """
  specs = demo_specs(seed, image_size, channels)
  rng = np.random.default_rng([seed, 17])
  domains = ("invert", "rot90", "blur")
  families = NEURAL_FAMILIES + ESTIMATOR_FAMILIES
  for b, base in enumerate(("fashion_mnist", "mnist5k", "digits")):
    data = load_source(base, image_size=image_size, channels=channels)
    used = [t.classes for t in sample_tasks(data, 4, 32, seed=seed * 1000 + b)]
    shared = [Task(base, c) for c in used[:8]]
    shared += [Task(f"{base}+{domains[i // 4]}", used[i]) for i in (0, 4, 8)]
    shared.append(Task(base, used[8]))
    for task in shared:
      for arch in ESTIMATOR_FAMILIES:
        specs.append(ModelSpec(model_id(arch, task), arch, task, seed=int(rng.integers(2**31)),
                               steps=0))
    fresh = [t.classes for t in sample_tasks(data, 4, 32 + 4 * len(families),
                                             seed=seed * 1000 + 500 + b)
             if t.classes not in used][:4 * len(families)]
    for f, arch in enumerate(families):
      for j in range(4):
        dom = "" if j < 2 else f"+{domains[(f + j) % 3]}"
        task = Task(base + dom, fresh[4 * f + j])
        steps = 0 if arch in ESTIMATOR_FAMILIES else (400 if arch == "mlp" else 300)
        specs.append(ModelSpec(model_id(arch, task, "x"), arch, task,
                               seed=int(rng.integers(2**31)), steps=steps))
  return specs


@PRESETS.register("tiny")
def tiny_specs(seed: int = 0) -> list[ModelSpec]:
  """A zoo small enough for tests: 8 models on the small offline datasets, a few seconds to train.

  Two 4-way digits tasks (mlp and cnn_s each), one of them also inverted, and one 2-way mnist5k
  task with a cnn_s, plus one deliberately weak (label-noise) mlp.
  """
  digits = load_source("digits")
  mnist = load_source("mnist5k")
  t1, t2 = sample_tasks(digits, 4, 2, seed=seed)
  t3 = Task("digits+invert", t1.classes)
  (t4,) = sample_tasks(mnist, 2, 1, seed=seed)
  rng = np.random.default_rng(seed)
  specs = []
  for task in (t1, t2, t3):
    for arch in ("mlp", "cnn_s"):
      specs.append(ModelSpec(model_id(arch, task), arch, task, seed=int(rng.integers(2**31)),
                             steps=120))
  specs.append(ModelSpec(model_id("cnn_s", t4), "cnn_s", t4, seed=int(rng.integers(2**31)),
                         steps=80))
  specs.append(ModelSpec(model_id("mlp", t1, "noisy"), "mlp", t1, seed=int(rng.integers(2**31)),
                         steps=120, label_noise=0.5, role="label_noise"))
  return specs


def preset_specs(name: str, seed: int = 0) -> list[ModelSpec]:
  """The specs of a named zoo preset (:data:`PRESETS`: ``demo``, ``starter``, ``varied``, ``tiny``).

  Raises:
    ConfigError: an unknown name.
  """
  return PRESETS.get(name, seed=seed)
