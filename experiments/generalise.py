"""Generalisation of Know2Vec: held-out tasks, foreign model families, perturbed queries, and
queries that fit no model, over several aligner seeds, against random, untrained anchor matching
and LEEP.

Command:   python -m experiments.generalise              (everything below; --zoo artifacts/zoo-varied)
           python -m experiments.generalise --quick
           python -m experiments.generalise --validate   (model selection)
           (the zoo: ``know2vec zoo build --preset varied --zoo artifacts/zoo-varied``, 615
           models of 6 families, 3 of them scikit-learn estimators)
Hardware:  2-core x86-64 CPU, 24 GiB, no GPU (measured there).
Runtime:   EXPECTED_RUNTIME below.
Expected:  EXPECTED_NUMBERS below (experiments/results/generalise.json, figure generalise.png).

Everything runs through the product: the proxy is the ``varied`` preset (``know2vec train
--preset varied``: the demo preset with near-twin aligner batches, VALIDATION round 7), a
training is ``Proxy.train(zoo, cfg, model_ids=...)``, the other models join through
``Proxy.build_index`` (no retraining), and queries are ranked by
``Proxy.search`` (the aligned vectors' shortlist, then class-level matching,
:mod:`know2vec_jax.classmatch`), whose no-fit flag is the proxy's own calibrated threshold.
Baselines come from :mod:`know2vec_jax.baselines`. Every Know2Vec figure is the mean over
``seeds`` aligner seeds (``proxy.align.seed``), with the spread (max - min) beside it.

Protocol:
1. Held-out tasks: the 4-way tasks in ``folds`` folds (NNR's assignment, :mod:`experiments.nnr`);
   fold f's models join the index after training; queries of fold-f tasks are ``heldout``, the
   others ``seen``. A hit is a model trained on the query's task (source domain and class set).
2. Leave one family out: for each family F with tasks only F has, the proxy trains without any
   model of F, all of F's models join afterwards, and the queries are those tasks' (each has
   exactly one right model, F's). Families with ``neural: false`` are scikit-learn estimators
   answering logits (``logreg``), probabilities (``forest``) or one-hot labels (``knn``).
3. Perturbations (:data:`know2vec_jax.data.perturb.SUITE`): every query's images perturbed
   (translations of 1-3 px in 5 directions, rotation +-10 degrees, noise sigma 0.1, contrast
   x 0.5, brightness x 0.7); ``drop`` = clean top-1 - perturbed top-1 over the same queries.
4. No fit: the proxy's flag (its best model's class-level fit score under the threshold it
   calibrated on validation queries of its training tasks, ``ProxyConfig.false_alarm`` = 0.02).
   ``false_alarm`` = the share of clean held-out queries flagged; ``detection`` = the share
   flagged among pure-noise queries and among queries from sources no zoo model saw
   (:data:`OOD_SOURCES`).

Rows (:data:`ROWS`): ``know2vec`` is the configured proxy; the ablation rows switch one lever at a
time, on fold 0: ``vector-only`` (no class matching: the aligned vectors alone),
``class-only`` (class matching without the vector term), ``no-familiar-gate`` (every query
scored as an unfamiliar one: :class:`know2vec_jax.retrieval.MatchConfig`'s ``familiar_*``
settings off), ``no-augmentation`` (phi and the query episodes without nuisance views).

Model selection (``--validate``; never the evaluation queries): a quarter of fold 0's training
4-way tasks become validation tasks; the proxy trains on the other training tasks' models;
validation queries are drawn from the *train* splits outside the probe pool, of the validation
tasks (unseen by the aligner) and of training tasks (seen), clean and under perturbations outside
the suite (shift (1, -2), rotation 7 degrees, noise 0.07, contrast 0.6, brightness 0.8). Measured
there (VALIDATION below; the numbers that decided ``MatchConfig``'s defaults and the levers).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import time

import jax
import numpy as np

from experiments.common import add_config_arguments, add_run_arguments, config_from_args, pyplot
from experiments.nnr import fold_assignment, fold_models, leep_matrix, make_queries, \
    zoo_tasks_sorted
from know2vec_jax import config as config_lib
from know2vec_jax.baselines import run_baseline
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.config import Presets, require, require_known
from know2vec_jax.data import Task, load_source, sample_tasks, task_split
from know2vec_jax.data.perturb import SUITE, Perturbation, perturb
from know2vec_jax.metrics import first_correct_rank, retrieval_metrics
from know2vec_jax import pool as pool_lib
from know2vec_jax.pipeline import Cache
from know2vec_jax.proxy import Proxy, ProxyConfig, proxy_preset, zoo_metadata
from know2vec_jax.zoo import load_zoo
from know2vec_jax.zoo.specs import NEURAL_FAMILIES

EXPECTED_RUNTIME = (
    "2-core CPU, nothing else running, zoo built and the knowledge, phi and episodes cached "
    "(by --quick or --validate): full 41 min (2,442 s: 30 proxy trainings of 41-51 s, 456 "
    "queries x 11 views per default-row training, LEEP 0.14 s per query), measured before the "
    "current defaults; at them, on a 2-core Intel Xeon @ 2.60GHz from the knowledge cache "
    "alone, 6,836 s (114 min) with the CPU shared with other runs for most of it and the run "
    "paused for about 16 min, so not a time to quote; --quick 5.7 min (342 s); --validate "
    "about 40 min (round 7's three variants; two of them took 27 min)")
EXPECTED_NUMBERS = (
    "At the current defaults (the probe pool in test splits, phi on the training tasks' labels "
    "plus the contrastive loss on the pool, stand-ins within the radius, fit token weight 2; "
    "measured on a 2-core Intel Xeon @ 2.60GHz): 615 models, 456 queries, 3 aligner seeds "
    "(mean, spread): seen top-1 0.963 +- 0.006 (2,774 of 2,880 over the seeds; target 0.97: "
    "not met), held-out top-1 0.862 +- 0.012, top-5 0.981, MRR 0.914; leave one family out, "
    "top-5: mlp 0.875, cnn_s 0.976, cnn_l 1.000, logreg 0.944, forest 1.000, knn 0.958; worst "
    "perturbation drop 0.041 (shift up 3 px); no-fit false alarm 0.005 on held-out queries "
    "(seen 0.019), detection noise 1.00, mnist5k+rot90+invert 0.53, fashion_mnist+rot90+invert "
    "0.43, digits+flip+blur 0.00; LEEP held-out 0.272, anchor matching 0.373. Fold-0 ablation: "
    "no familiar gate seen 0.930 / held-out 0.887; vectors alone 0.939 / 0.392; class matching "
    "alone 0.778 / 0.787; no nuisance views 0.976 / 0.900 (worst drop 0.180). Before those "
    "defaults (commit 02dc784, the AMD EPYC): seen 0.976 +- 0.004, held-out 0.872 +- 0.042 / "
    "0.985 / MRR 0.918, mlp top-5 0.917, knn 0.931, worst drop 0.076, false alarm 0.012, "
    "detection 1.00 / 1.00 / 0.57 / 0.06. --quick (fold 0, before): seen 0.983, held-out "
    "0.880 / 0.998, worst drop 0.079. Before the near-twin batches (round 7 of VALIDATION; "
    "uniform batches, the demo preset): seen 0.969 +- 0.003, held-out 0.873 +- 0.027 / 0.986, "
    "mlp top-5 0.903, knn 0.958, worst drop 0.064; with familiar vector weight 0.75 (round 6; "
    "experiments/results/generalise-familiar-0.75.json): seen 0.968 +- 0.006, held-out 0.870 "
    "+- 0.022 / 0.984.")
VALIDATION = (
    "Two rounds, never on evaluation queries. (1) python -m experiments.generalise --validate "
    "on the earlier code (26 min): 68 queries of 34 validation tasks and 68 of training tasks, 3 "
    "aligner seeds. Levers on (phi and episodes on nuisance views): vectors alone unseen 0.47 / "
    "seen 0.98, worst perturbed view 0.69; class matching with token weight 0.25, vector weight "
    "0.25, 100 neighbours (the best mean of unseen and seen top-1 of the 36 settings token "
    "weight {0.25, 0.5, 1} x vector weight {0, 0.1, 0.25, 0.5} x neighbours {10, 30, 100}) unseen "
    "0.84 / seen 1.00, worst view 0.89 (shift); vector weight 0: seen 0.88; token weight 1: unseen "
    "<= 0.72. Levers off, same setting: unseen 0.80 / seen 1.00, worst view 0.84; vectors alone "
    "worst view 0.34 (contrast). So: class matching on, the levers on (the demo preset's "
    "defaults). (2) The same with VALIDATION_VARIANTS also holding 'no-stability' and the grid "
    "hub_k {0, 1, 2} x vector weight {0.1, 0.25} x token weight {0.1, 0.25} (27 min; "
    "experiments/results/generalise-validation-stability.json): the same queries plus, per "
    "family, a "
    "proxy trained without it (2 seeds) and 24 train-split queries of 12 tasks it shares with "
    "other families, those tasks' other models removed (validation_family_split); the grid "
    "hub_k {0, 1, 2} x vector weight {0.1, 0.25} x token weight {0.1, 0.25}, with and without "
    "the label-stability tie-break (knowledge.stability_views 8 / 0). The rule: round (1)'s mean "
    "of unseen and seen top-1 with the worst family's top-5 as a third term (the family target "
    "is a floor for every family). Chosen: "
    "stability on, hub_k 1, vector weight 0.1, token weight 0.25: unseen 0.917, seen 0.975, "
    "worst view 0.929, family top-5 mlp 0.96 cnn_s 1.00 cnn_l 0.96 logreg 0.96 forest 1.00 knn "
    "0.81 (mean 0.901). The setting before (stability off, hub_k 0, weights 0.25 / 0.25): unseen "
    "0.848, seen 1.000, knn 0.33, logreg 0.81, cnn_s 0.85 (mean 0.726); stability alone (hub_k 0, "
    "0.25 / 0.25): knn 0.65; hub_k 1 alone (stability off, 0.1 / 0.25): knn 0.62, unseen 0.887; "
    "hub_k 2 was no better than 1 anywhere (knn 0.79-0.81, seen 0.966-0.980). Vectors alone: "
    "knn 0.00-0.21, mlp 0.31-0.38. (3) An option since removed (models lifted to a floor, the "
    "median hub offset of the training models, instead of the offset subtracted; 14.5 min): "
    "vector weight 0.1: unseen 0.912, seen 0.985, knn 0.79, logreg 0.90 (mean 0.896) against "
    "0.917 / 0.975 / 0.81 (0.901) subtracted; on 204 queries of all seen tasks it kept 0.956 "
    "seen against 0.946 subtracted and 0.980 raw. Sharper token cosines (exp((cos - 1) / tau), "
    "tau 0.02-0.1) and centring phi's features before the token cosine each lowered seen top-1 "
    "there (to 0.716-0.946 and 0.936-0.946). (4) python -m experiments.generalise --validate "
    "(13.5 min; experiments/results/generalise-validation.json): seen queries of every seen "
    "4-way task (204 seen + 68 unseen; perturbed views of 68 + 68), hub_scale {0, 0.5, 0.75, "
    "1} x vector weight {0.1, 0.25, 0.5}, token weight 0.25. No setting reaches seen 0.97 and "
    "knn 0.80 together: hub_scale 1 / 0.1: unseen 0.917, seen 0.954, knn 0.81 (mean 0.894, "
    "the best); 0.5 / 0.25: 0.887 / 0.980 / knn 0.73, logreg 0.88 (0.866); 0.75 / 0.5: "
    "0.863 / 0.975 / 0.73; 0 / 0.25 (raw): 0.843 / 0.990 / knn 0.65 (0.826). The vector term "
    "is what tells seen tasks apart and what ranks a foreign family down: the hub correction "
    "trades one for the other. hub_scale 1, vector weight 0.1 stays. (5) The familiar-task gate "
    "(MatchConfig familiar_*: a query scored with a larger vector weight and a smaller hub "
    "correction when it sits near the reference queries of a training task and its vector's "
    "favourite model fits its classes within a gap of the best one), decided on the seen "
    "evaluation target being short (0.943) with every other target met, and chosen here "
    "by round (1)-(2)'s rule, the mean of unseen and seen top-1 and the worst family's top-5 "
    "(python -m experiments.generalise --validate, 38 min on the shared CPU; "
    "experiments/results/generalise-validation-familiar.json): gate off: unseen 0.912, seen "
    "0.953, worst view 0.926, knn 0.77 (mean 0.878); chosen, quantile 0.98, fit gap 0.1, hub "
    "scale 0.5, vector weight 0.5: 0.907 / 0.985 / 0.939 / knn 0.75 (0.881); fit gap 0.05: "
    "0.912 / 0.979 / knn 0.75 (0.880); no fit-gap condition (1.0): 0.882 / 0.987 / knn 0.75; "
    "quantile 0.95: knn 0.71-0.73, unseen 0.838-0.917; familiar hub scale 0: unseen 0.863-0.897. "
    "The reference-cosine condition alone passes 31% of unseen queries at quantile 0.98 (97% of "
    "seen) and the fit-gap condition alone 67% at gap 0.1 (98% of seen); together 18% and 95% "
    "(offline sweep of the same components). (6) Round (5)'s choice sat on its grid's edge "
    "(vector weight 0.5 and quantile 0.98 the largest tried) and the seen evaluation target was "
    "still short (0.969), so the grid was extended past it: quantile {0 (gate off), 0.98, "
    "0.99} x fit gap {0.05, 0.1} x familiar hub scale {0.5, 1} x familiar vector weight {0.5, "
    "0.75, 1}, the same queries and rule (python -m experiments.generalise --validate, 32 min "
    "on the shared CPU; experiments/results/generalise-validation-familiar2.json). Best by the "
    "rule: vector weight 0.75 (quantile 0.98, fit gap 0.1, hub scale 0.5): unseen 0.907, seen "
    "0.987, worst view 0.936, knn 0.75 (mean 0.8813), against 0.5: 0.907 / 0.985 / 0.939 / "
    "0.75 (0.8807), one seen validation query of 612 apart; vector weight 1: seen 0.985, unseen "
    "0.902; quantile 0.99: seen 0.975-0.982 (mean <= 0.8796); familiar hub scale 1: seen "
    "0.933-0.956 whatever the rest. At 0.75, tests/test_classmatch.py's labels-only black box "
    "loses to its one-class-swapped twin on the tiny zoo (the vector term outweighs the class "
    "terms that tell them apart), so the one-query lead was taken as a tie and 0.5 stays. An "
    "evaluation run at 0.75 had been made before the test was run: seen 0.968 +- 0.006, "
    "held-out 0.870 +- 0.022 (experiments/results/generalise-familiar-0.75.json). The gate is "
    "near its best here: what is left of the seen target is not in these four settings. (7) "
    "The seen evaluation misses were near-twin tasks (three classes of four shared) where the "
    "right model's class terms were weaker than a twin's (logreg, mlp or small CNN against a "
    "large CNN); the aligned vectors ranked the right model first in about half of them. So the "
    "aligner's batches were given near-twins (RankingObjective.hard_share: that share of each "
    "batch drawn from the 4 tasks whose query classes look most like an item's, "
    "align.near_twin_tasks), so that the hardest negatives the ranking loss takes are look-alike "
    "tasks (python -m experiments.generalise --validate, 27 min, the same queries and rule; "
    "experiments/results/generalise-validation-hard.json; uniform batches are round 6's "
    "numbers): uniform (hard_share 0), familiar vector weight 0.5: unseen 0.907, seen 0.985, "
    "worst view 0.939, families mlp 0.96 logreg 0.90 knn 0.75 (mean 0.8807); hard_share 0.25: "
    "0.897 / 0.987 / 0.931, logreg 0.92, knn 0.77 (0.8847); hard_share 0.5: 0.897 / 0.989 / "
    "0.931, mlp 0.96, cnn_l 1.00, logreg 0.98, knn 0.81 (0.8987, the best). Vectors alone, "
    "seen: 0.969 uniform, 0.977 and 0.982 with the two shares. Familiar vector weight 0.75 with "
    "hard_share 0.5: seen 0.992, the rest equal but forest 0.94 and worst view 0.929 (0.8997): "
    "two seen queries in 612, taken as a tie like round 6's (0.75 fails the tiny-zoo twin "
    "test), so 0.5 stays. hard_share 0.5 is the most the design allows (every near-twin is "
    "drawn for another item of the batch) and went into the product's 'varied' proxy preset, "
    "which this experiment uses; the demo preset keeps uniform batches (not validated on the "
    "demo zoo's tasks).")

# Each row: (overrides of the proxy it trains, overrides of its retrieval settings at query time).
ROWS = {
    "know2vec": ((), ()),
    "vector-only": ((), ("enabled=false",)),
    "class-only": ((), ("vector_weight=0", "familiar_quantile=0")),
    "no-familiar-gate": ((), ("familiar_quantile=0",)),
    "no-augmentation": (("backbone.augment=0", "episode_augment=0"), ()),
}
DEFAULT_ROW = "know2vec"

# Sources no zoo model of the demo or varied zoo was trained on (and phi never saw).
OOD_SOURCES = ("mnist5k+rot90+invert", "fashion_mnist+rot90+invert", "digits+flip+blur")
# Perturbations outside the suite, for model selection only.
VALIDATION_VIEWS = (Perturbation("val_shift", "shift", (1, -2)),
                    Perturbation("val_rotate", "rotate", 7.0),
                    Perturbation("val_noise", "noise", 0.07),
                    Perturbation("val_contrast", "contrast", 0.6),
                    Perturbation("val_brightness", "brightness", 0.8))


def _proxy(preset: str) -> ProxyConfig:
  """The product's proxy preset with the training levers on (the demo and varied presets have
  them)."""
  return config_lib.override(proxy_preset(preset), ("backbone.augment=0.8",
                                                    "episode_augment=0.5"))


@dataclasses.dataclass(frozen=True)
class GeneraliseConfig:
  """The generalisation experiment.

  Attributes:
    proxy: the proxy of the ``know2vec`` row (the ablation rows override it, :data:`ROWS`).
    folds, evaluate_folds: folds of the 4-way tasks, and how many are trained (the first ones).
    seeds: aligner seeds (``proxy.align.seed``).
    rows: the Know2Vec rows (the default row on ``evaluate_folds``, the others on fold 0).
    families: leave-one-family-out families (those with tasks of their own in the zoo).
    queries_per_task, query_shots: evaluation queries per task and images per class.
    perturbations: names from :data:`know2vec_jax.data.perturb.SUITE`.
    noise_queries, ood_tasks: pure-noise queries, and tasks per unseen source (2 queries each).
    leep: score LEEP (every query forwarded through every zoo model).
    seed: folds, queries and perturbation noise.
  """
  proxy: ProxyConfig = ProxyConfig()
  folds: int = 3
  evaluate_folds: int = 3
  seeds: tuple[int, ...] = (0, 1, 2)
  rows: tuple[str, ...] = tuple(ROWS)
  families: tuple[str, ...] = ("mlp", "cnn_s", "cnn_l", "logreg", "forest", "knn")
  queries_per_task: int = 2
  query_shots: int = 5
  perturbations: tuple[str, ...] = tuple(SUITE)
  noise_queries: int = 60
  ood_tasks: int = 10
  leep: bool = True
  seed: int = 0

  def __post_init__(self):
    require(self.folds >= 2, f"folds must be >= 2, got {self.folds}")
    require(1 <= self.evaluate_folds <= self.folds,
            f"evaluate_folds must be in 1..folds={self.folds}, got {self.evaluate_folds}")
    require(len(self.seeds) >= 1, "seeds must name at least one aligner seed")
    require(self.queries_per_task >= 1 and self.query_shots >= 1,
            "queries_per_task and query_shots must be >= 1")
    require(self.noise_queries >= 0 and self.ood_tasks >= 0,
            "noise_queries and ood_tasks must be >= 0")
    require_known(self.rows, ROWS, "row(s)")
    require(DEFAULT_ROW in self.rows, f"rows must include {DEFAULT_ROW!r}")
    require_known(self.perturbations, SUITE, "perturbation(s)")


PRESETS: Presets[GeneraliseConfig] = Presets("generalise")


@PRESETS.register("full")
def _full() -> GeneraliseConfig:
  """3 folds x 3 seeds, the ablation rows on fold 0, 6 families left out, OOD, LEEP."""
  return GeneraliseConfig(proxy=_proxy("varied"))


@PRESETS.register("quick")
def _quick() -> GeneraliseConfig:
  """Fold 0 x 3 seeds, the default row, perturbations and OOD; no family left out, no LEEP."""
  return GeneraliseConfig(proxy=_proxy("varied"), evaluate_folds=1, rows=(DEFAULT_ROW,),
                          families=(), leep=False)


@PRESETS.register("tiny")
def _tiny() -> GeneraliseConfig:
  """The tiny zoo and tiny proxy (tests): 3 folds, 2 seeds, two perturbations."""
  return GeneraliseConfig(proxy=_proxy("tiny"), seeds=(0, 1), rows=(DEFAULT_ROW, "vector-only"),
                          families=("cnn_s",), queries_per_task=2, query_shots=3,
                          perturbations=("shift_down_2", "contrast_0.5"), noise_queries=4,
                          ood_tasks=1, leep=False)


# ---- the protocol's pieces (pure, tested) --------------------------------------------------------

def exclusive_tasks(zoo) -> dict[str, list[Task]]:
  """Family -> the tasks whose every model is of that family (by task id)."""
  by_task: dict[Task, set] = {}
  for r in zoo.records.values():
    by_task.setdefault(r.task, set()).add(r.arch)
  out: dict[str, list[Task]] = {}
  for t, archs in sorted(by_task.items(), key=lambda kv: kv[0].task_id):
    if len(archs) == 1:
      out.setdefault(next(iter(archs)), []).append(t)
  return out


def family_split(zoo, family: str) -> tuple[list[str], list[str]]:
  """(training model ids: every model not of ``family``, the family's model ids)."""
  train = [m for m, r in zoo.records.items() if r.arch != family]
  held = [m for m, r in zoo.records.items() if r.arch == family]
  return train, held


def noise_queries(n: int, k: int, shots: int, image_shape, seed: int):
  """``n`` queries of uniform-noise images, ``shots`` per class of ``k``: fit no model."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(k, dtype=np.int32), shots)
  return [(rng.random((k * shots,) + tuple(image_shape), np.float32), labels) for _ in range(n)]


def source_queries(sources, tasks_per_source: int, per_task: int, shots: int, seed: int,
                   k: int = 4, pool=None, pool_seed: int = 0):
  """Queries of random ``k``-way tasks of each source (test splits, outside the rows a probe
  pool ``pool`` holds of the same base source): (source, images, labels)."""
  out = []
  for i, name in enumerate(sources):
    data = load_source(name)
    for j, task in enumerate(sample_tasks(data, k, tasks_per_source, seed=seed + 7 * i)):
      for q in range(per_task):
        x, y = make_queries([task], 1, shots, seed * 1000 + 31 * j + q, pool=pool,
                            pool_seed=pool_seed)[0][1:]
        out.append((name, x, y))
  return out


def train_split_queries(tasks, per_task: int, shots: int, seed: int, exclude: dict):
  """Validation queries: ``shots`` images per class from each task's *train* split, never an
  image of the probe pool (``exclude``: source -> train-split rows the pool holds).

  Returns:
    (task index, images, labels) triples.
  """
  out = []
  for i, t in enumerate(tasks):
    data = load_source(t.source)
    idx, y = task_split(data, t, "train")
    keep = ~np.isin(idx, exclude.get(t.source, []))
    idx, y = idx[keep], y[keep]
    rng = np.random.default_rng([seed, i])
    for _ in range(per_task):
      sel = np.concatenate([rng.choice(idx[y == c], shots, replace=False) for c in range(t.k)])
      out.append((i, data.train_images[sel], np.repeat(np.arange(t.k, dtype=np.int32), shots)))
  return out


def perturbed(queries, view, seed: int):
  """The same queries with every image perturbed (noise seeded per query)."""
  return [(t, perturb(x, view, seed=seed * 7919 + qi), y) for qi, (t, x, y) in enumerate(queries)]


def search_ranks(proxy: Proxy, index, queries, q_task: np.ndarray, m_task: dict,
                 rows: dict | None = None):
  """Rank of the first model of each query's task, and the no-fit flags, for each row's
  retrieval settings.

  This is :meth:`Proxy.search` split in its two public halves so that one description of the
  queries (:meth:`Proxy.describe_queries`) is ranked under several settings
  (:meth:`know2vec_jax.retrieval.Retriever.score`).

  Args:
    proxy, index: the trained proxy and the index of every zoo model.
    queries: (task number, images, labels) triples.
    q_task: [Q] each query's task number; m_task: model id -> task number.
    rows: row name -> ``MatchConfig`` overrides ("key=value" strings); default: the proxy's own
      settings, returned bare.

  Returns:
    (int [Q] ranks, 1 = the first model is of the query's task, R + 1 when none of the R models
    returned (the shortlist) is; bool [Q] no-fit flags), per row when ``rows`` is given.
  """
  settings = {None: ()} if rows is None else rows
  proxy.check_index(index)
  xy = [(x, y) for _, x, y in queries]
  described: dict = {}  # the settings that change how queries are described -> description
  out = {}
  for row, overrides in settings.items():
    retriever = proxy.retriever.with_settings(overrides)
    match = retriever.config
    key = (match.neighbours, match.radius, match.min_neighbours)
    if key not in described:
      described[key] = proxy.with_match(neighbours=match.neighbours, radius=match.radius,
                                        min_neighbours=match.min_neighbours).describe_queries(
                                            xy, index=index)
    vectors, classes = described[key]
    found = retriever.score(index, vectors, classes if match.enabled else None, len(index))
    ranks = np.empty(len(queries), np.int64)
    for qi, ids in enumerate(found.ids):
      hit = [r for r, m in enumerate(ids) if m_task[m] == q_task[qi]]
      # Past the vector stage's shortlist the order is unknown: rank it just past the list.
      ranks[qi] = hit[0] + 1 if hit else len(ids) + 1
    out[row] = (ranks, found.no_fit)
  return out[None] if rows is None else out


def summarise(ranks_by_seed: list[np.ndarray]) -> dict:
  """Mean and spread over seeds of top-1, top-5 and MRR; ``per_seed`` keeps each seed's."""
  per = [retrieval_metrics(r) for r in ranks_by_seed]
  out = {m: float(np.mean([p[m] for p in per])) for m in ("top1", "top5", "mrr")}
  out["spread"] = {m: float(np.ptp([p[m] for p in per])) for m in ("top1", "top5", "mrr")}
  out["per_seed"] = per
  return out


def rate(flags_by_seed: list[np.ndarray]) -> dict:
  """Mean and spread over seeds of the share of flagged queries."""
  per = [float(np.mean(f)) if len(f) else 0.0 for f in flags_by_seed]
  return {"rate": float(np.mean(per)), "spread": float(np.ptp(per)), "per_seed": per}


# ---- the experiment ------------------------------------------------------------------------------

def _setup(cfg: GeneraliseConfig, zoo_dir: str, cache_dir: str):
  """(zoo, cache, tasks by id, model id -> task number, 4-way task -> fold)."""
  zoo = load_zoo(zoo_dir)
  tasks = zoo_tasks_sorted(zoo)
  task_no = {t: i for i, t in enumerate(tasks)}
  m_task = {m: task_no[r.task] for m, r in zoo.records.items()}
  return zoo, Cache(cache_dir), tasks, m_task, fold_assignment(tasks, cfg.folds, cfg.seed)


def run(cfg: GeneraliseConfig, zoo_dir: str, cache_dir: str, out: str | None,
        progress: bool = True) -> dict:
  """Runs the experiment; writes ``out`` (JSON) and a figure beside it when ``out`` is given."""
  t_start = time.perf_counter()
  zoo, cache, tasks, m_task, fold_of = _setup(cfg, zoo_dir, cache_dir)
  queries = make_queries(tasks, cfg.queries_per_task, cfg.query_shots, cfg.seed,
                         pool=cfg.proxy.pool, pool_seed=cfg.proxy.seed)
  q_task = np.asarray([i for i, _, _ in queries])
  q_fold = np.asarray([fold_of.get(tasks[i], -1) for i in q_task])
  views = {p: perturbed(queries, p, cfg.seed) for p in cfg.perturbations}
  meta = zoo_metadata(zoo)
  excl = exclusive_tasks(zoo)
  families = [f for f in cfg.families if f in excl]
  ood = {"noise": [(-1, x, y) for x, y in noise_queries(cfg.noise_queries, 4, cfg.query_shots,
                                                          zoo.image_shape, cfg.seed + 11)]}
  for name, x, y in source_queries(OOD_SOURCES, cfg.ood_tasks, 2, cfg.query_shots, cfg.seed,
                                   pool=cfg.proxy.pool, pool_seed=cfg.proxy.seed):
    ood.setdefault(name, []).append((-1, x, y))
  ood = {k: v for k, v in ood.items() if v}

  ranks: dict = {}  # row -> view -> seed -> fold -> int [Q]
  flags: dict = {}  # seed -> fold -> bool [Q] (clean queries, default row)
  ood_flags: dict = {}  # set -> seed -> fold -> bool [n]
  lofo: dict = {}  # row -> family -> seed -> int [Q_F]
  costs: dict = {}
  reference = None
  trainings = {}  # training overrides -> the rows it serves
  for row in cfg.rows:
    trainings.setdefault(ROWS[row][0], []).append(row)
  for train_ov, rows in trainings.items():
    pcfg = config_lib.override(cfg.proxy, train_ov)
    n_folds = cfg.evaluate_folds if DEFAULT_ROW in rows else 1
    for seed in cfg.seeds:
      scfg = config_lib.override(pcfg, [f"align.seed={seed}"])
      for fold in range(n_folds):
        train_ids, _ = fold_models(zoo, fold_of, fold)
        proxy = Proxy.train(zoo, scfg, model_ids=train_ids, cache=cache, progress=progress)
        index = proxy.build_index(groups_from_zoo(zoo, strategy=scfg.strategy), meta,
                                  cache=cache, progress=progress)
        t = time.perf_counter()
        # Ablation rows on fold 0 only.
        settings = {row: ROWS[row][1] for row in rows if row == DEFAULT_ROW or fold == 0}
        for view, qs in [("clean", queries)] + list(views.items()):
          for row, (r, f) in search_ranks(proxy, index, qs, q_task, m_task, settings).items():
            ranks.setdefault(row, {}).setdefault(view, {}).setdefault(seed, {})[fold] = r
            if row == DEFAULT_ROW and view == "clean":
              flags.setdefault(seed, {})[fold] = f
        if DEFAULT_ROW in settings:
          for name, qs in ood.items():
            found = proxy.search(index, [(x, y) for _, x, y in qs], k=1)
            ood_flags.setdefault(name, {}).setdefault(seed, {})[fold] = found.no_fit
        c = costs.setdefault(",".join(rows), {"train_s": [], "queries_s": []})
        c["train_s"].append(proxy.info["seconds"]["total"])
        c["queries_s"].append(time.perf_counter() - t)
        if reference is None and DEFAULT_ROW in rows:
          reference = proxy

  # Leave one family out: trained without the family, every model in the index.
  lofo_rows = [r for r in (DEFAULT_ROW, "vector-only") if r in cfg.rows]
  for fam in families:
    fam_q = [i for i, q in enumerate(queries) if tasks[q[0]] in excl[fam]]
    for seed in cfg.seeds:
      scfg = config_lib.override(cfg.proxy, [f"align.seed={seed}"])
      train_ids, _ = family_split(zoo, fam)
      proxy = Proxy.train(zoo, scfg, model_ids=train_ids, cache=cache, progress=progress)
      index = proxy.build_index(groups_from_zoo(zoo, strategy=scfg.strategy), meta, cache=cache,
                                progress=progress)
      found = search_ranks(proxy, index, [queries[i] for i in fam_q], q_task[fam_q], m_task,
                           {row: ROWS[row][1] for row in lofo_rows})
      for row, (r, _) in found.items():
        lofo.setdefault(row, {}).setdefault(fam, {})[seed] = r
      costs.setdefault("leave-one-family-out", {"train_s": []})["train_s"].append(
          proxy.info["seconds"]["total"])

  def split_ranks(per_fold: dict, split: str) -> np.ndarray:
    """Ranks of one split pooled over the trained folds (held-out: each query in its fold)."""
    parts = []
    for fold, r in sorted(per_fold.items()):
      keep = (q_fold == fold) if split == "heldout" else (q_fold != fold)
      parts.append(r[keep])
    return np.concatenate(parts)

  def row_summary(by_view: dict) -> dict:
    """One row's figures over its trained folds: mean and spread over seeds."""
    folds = sorted(by_view["clean"][cfg.seeds[0]])

    def pooled(view, seed, splits=("seen", "heldout")):
      per_fold = {f: by_view[view][seed][f] for f in folds}
      return np.concatenate([split_ranks(per_fold, sp) for sp in splits])
    s = {split: summarise([pooled("clean", sd, (split,)) for sd in cfg.seeds])
         for split in ("seen", "heldout")}
    s["clean_top1"] = summarise([pooled("clean", sd) for sd in cfg.seeds])["top1"]
    s["perturbations"] = {}
    for view in cfg.perturbations:
      both = summarise([pooled(view, sd) for sd in cfg.seeds])
      entry = {"top1": both["top1"], "drop": s["clean_top1"] - both["top1"],
               "spread": both["spread"]["top1"], "by_split": {}}
      for split in ("seen", "heldout"):
        pert = summarise([pooled(view, sd, (split,)) for sd in cfg.seeds])
        entry["by_split"][split] = {"top1": pert["top1"],
                                    "drop": s[split]["top1"] - pert["top1"]}
      s["perturbations"][view] = entry
    s["max_drop"] = max((e["drop"] for e in s["perturbations"].values()), default=0.0)
    s["folds"] = folds
    return s

  summary = {row: row_summary(by_view) for row, by_view in ranks.items()}
  for row in summary:  # the default row on fold 0 too: like for like with the ablation rows
    if row == DEFAULT_ROW and len(summary[row]["folds"]) > 1:
      summary[row]["fold0"] = row_summary({v: {sd: {0: per[0]} for sd, per in by_seed.items()}
                                           for v, by_seed in ranks[row].items()})

  def family_row(row: str) -> dict:
    out = {}
    for fam, by_seed in lofo.get(row, {}).items():
      s = summarise([by_seed[sd] for sd in cfg.seeds])
      out[fam] = {"top1": s["top1"], "top5": s["top5"], "mrr": s["mrr"], "spread": s["spread"],
                  "neural": fam in NEURAL_FAMILIES,
                  "models": sum(r.arch == fam for r in zoo.records.values()),
                  "queries": int(len(by_seed[cfg.seeds[0]])), "tasks": len(excl[fam])}
    return out

  held_flags = [np.concatenate([flags[sd][f][q_fold == f] for f in sorted(flags[sd])])
                for sd in cfg.seeds]
  ood_summary = {"false_alarm": rate(held_flags),
                 "false_alarm_seen": rate([np.concatenate([flags[sd][f][q_fold != f]
                                                           for f in sorted(flags[sd])])
                                           for sd in cfg.seeds]),
                 "detection": {name: rate([np.concatenate(list(by_fold.values()))
                                           for by_fold in by_seed.values()]) | {"queries": len(
                                               ood[name])}
                               for name, by_seed in ood_flags.items()},
                 "threshold": reference.retriever.fit_threshold,
                 "calibration": reference.info.get("calibration")}

  # Baselines on the same queries: their scores do not depend on the fold or the aligner seed.
  baselines: dict = {}
  groups = groups_from_zoo(zoo, strategy=cfg.proxy.strategy)
  ids, m_grid, m_mask = reference.model_grids(groups, cache=cache)
  correct = np.asarray([[m_task[m] == q_task[qi] for m in ids] for qi in range(len(queries))])
  folds_trained = range(cfg.evaluate_folds)

  def baseline_row(scores_by_view: dict) -> dict:
    """A fold-independent scorer read like the Know2Vec rows."""
    clean = first_correct_rank(scores_by_view["clean"], correct)
    row = {split: retrieval_metrics(split_ranks({f: clean for f in folds_trained}, split))
           for split in ("seen", "heldout")}
    row["clean_top1"] = retrieval_metrics(clean)["top1"]
    row["perturbations"] = {}
    for view, sc in scores_by_view.items():
      if view != "clean":
        top1 = retrieval_metrics(first_correct_rank(sc, correct))["top1"]
        row["perturbations"][view] = {"top1": top1, "drop": row["clean_top1"] - top1}
    row["leave_one_family_out"] = {}
    for fam in families:
      fam_q = np.asarray([i for i, q in enumerate(queries) if tasks[q[0]] in excl[fam]])
      m = retrieval_metrics(clean[fam_q])
      row["leave_one_family_out"][fam] = {k: m[k] for k in ("top1", "top5", "mrr")}
    return row

  def anchor_scores(qs):
    grids = [reference.query_grid(x, y) for _, x, y in qs]
    return run_baseline("anchor-matching", query_grid=np.stack([g for g, _ in grids]),
                        query_mask=np.stack([m for _, m in grids]), model_grids=m_grid,
                        model_masks=m_mask).scores

  baselines["anchor-matching (untrained)"] = baseline_row(
      {"clean": anchor_scores(queries)} | {v: anchor_scores(qs) for v, qs in views.items()})
  rand = run_baseline("random", key=jax.random.key(cfg.seed + 2),
                      num_models=len(queries) * len(ids)).scores.reshape(len(queries), len(ids))
  baselines["random"] = baseline_row({"clean": rand})
  if cfg.leep:
    leep, forwards, sec = leep_matrix(groups, queries, ids)
    baselines["leep"] = baseline_row({"clean": leep})
    baselines["leep"]["forwards_per_query"] = float(np.mean(forwards))
    baselines["leep"]["seconds_per_query"] = sec

  d = summary[DEFAULT_ROW]
  res = {
      "summary": {
          "seen": {m: d["seen"][m] for m in ("top1", "top5", "mrr")} | {
              "spread": d["seen"]["spread"]},
          "heldout": {m: d["heldout"][m] for m in ("top1", "top5", "mrr")} | {
              "spread": d["heldout"]["spread"]},
          "leave_one_family_out": family_row(DEFAULT_ROW),
          "perturbations": {v: {"top1": e["top1"], "drop": e["drop"], "spread": e["spread"]}
                            for v, e in d["perturbations"].items()},
          "ood": {"false_alarm": ood_summary["false_alarm"]["rate"],
                  "detection": {k: v["rate"] for k, v in ood_summary["detection"].items()}}},
      "rows": summary, "baselines": baselines, "ood": ood_summary,
      "leave_one_family_out": {row: family_row(row) for row in lofo},
      "ranks": {row: {view: {str(sd): {str(f): r.tolist() for f, r in per.items()}
                             for sd, per in by_seed.items()} for view, by_seed in by_view.items()}
                for row, by_view in ranks.items()},
      "query_tasks": [tasks[t].task_id for t in q_task], "query_folds": q_fold.tolist(),
      "costs": costs, "config": config_lib.to_dict(cfg),
      "num_models": len(ids), "num_tasks": len(tasks), "num_queries": len(queries),
      "seconds": time.perf_counter() - t_start, "backend": jax.default_backend(),
  }
  if out is not None:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    plot(res, str(path.with_suffix(".png")))
  return res


# Round 7 (VALIDATION): the aligner's near-twin batches. The "uniform" variant is round 6's
# proxy (the same queries and code path); round 7 ran the other two and took its numbers from
# round 6's results.
VALIDATION_GRID = {"familiar_vector_weight": (0.5, 0.75)}
VALIDATION_VARIANTS = {"uniform": ("ranking.hard_share=0",),
                       "hard-0.25": ("ranking.hard_share=0.25",),
                       "hard-0.5": ("ranking.hard_share=0.5",)}


def validation_family_split(zoo, family: str, train_pool, tasks_per_family: int, seed: int):
  """Leave-one-family-out on training tasks, for model selection: tasks that ``family`` shares
  with other families stand in for tasks only it has.

  Up to ``tasks_per_family`` of ``train_pool``'s tasks that have a model of ``family`` and a model
  of another family are drawn; every model of the family and every model of those tasks stays out
  of training; the index holds the training models and the family's models, so each drawn task
  has exactly the family's models in the index, as a task only the family has.

  Returns:
    (drawn tasks, training model ids, index model ids).
  """
  by_task: dict = {}
  for r in zoo.records.values():
    by_task.setdefault(r.task, set()).add(r.arch)
  pool = set(train_pool)
  shared = sorted((t for t, archs in by_task.items() if family in archs and len(archs) > 1
                   and t in pool), key=lambda t: t.task_id)
  order = np.random.default_rng([seed, 29]).permutation(len(shared))
  drawn = {shared[int(i)] for i in order[:tasks_per_family]}
  train = [m for m, r in zoo.records.items() if r.arch != family and r.task not in drawn]
  index = train + [m for m, r in zoo.records.items() if r.arch == family]
  return sorted(drawn, key=lambda t: t.task_id), train, index


def validate(cfg: GeneraliseConfig, zoo_dir: str, cache_dir: str, progress: bool = True,
             grid: dict | None = None, variants: dict | None = None,
             family_seeds: tuple[int, ...] = (0, 1)) -> dict:
  """Model selection on validation queries (see the module docstring); never evaluation queries.

  For each training variant and aligner seed, one proxy is trained on fold 0's inner training
  tasks and every retrieval setting of ``grid`` (``MatchConfig`` fields -> values) is scored on
  the same proxy ("unseen", "seen", "views"); then, for each family of ``cfg.families`` and each
  of ``family_seeds``, a proxy is trained without the family (:func:`validation_family_split`)
  and the same settings score the family's queries ("families").

  Returns:
    {"validation": {variant: {setting: {"unseen", "seen", "views", "families"}}}, ...}: top-1
    (top-5 for families) means over seeds, printed as it goes.
  """
  zoo, cache, tasks, m_task, fold_of = _setup(cfg, zoo_dir, cache_dir)
  task_no = {t: i for i, t in enumerate(tasks)}
  train_pool = [t for t in tasks if fold_of.get(t, -1) != 0]
  four = [t for t in train_pool if t.k == 4]
  order = np.random.default_rng(cfg.seed + 3).permutation(len(four))
  val = {four[int(i)] for i in order[:len(four) // 4]}
  inner_ids = [m for m, r in zoo.records.items() if r.task in train_pool and r.task not in val]
  keep_ids = [m for m, r in zoo.records.items() if r.task in train_pool]
  sources = sorted({r.source for r in zoo.records.values()})
  exclude = {s: pool_lib.config_rows(cfg.proxy.pool, s, "train", cfg.proxy.seed, sources)
             for s in sources}
  seen_tasks = [t for t in train_pool if t not in val and t.k == 4]
  all_tasks = sorted(val, key=lambda t: t.task_id) + seen_tasks
  qs = train_split_queries(all_tasks, 2, cfg.query_shots, cfg.seed + 5, exclude)
  q_task = np.asarray([task_no[all_tasks[i]] for i, _, _ in qs])
  unseen = np.asarray([all_tasks[i] in val for i, _, _ in qs])
  # Perturbed views of as many seen as unseen queries (the views ask about invariance, not about
  # telling seen tasks apart).
  viewed = np.flatnonzero(unseen | (np.cumsum(~unseen) <= unseen.sum()))
  views = {v.name: perturbed([qs[i] for i in viewed], v, cfg.seed) for v in VALIDATION_VIEWS}
  grid = grid or VALIDATION_GRID
  variants = variants or VALIDATION_VARIANTS
  settings = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
  keys = {json.dumps(st): tuple(f"{k}={v}" for k, v in st.items()) for st in settings}
  keys[json.dumps({"enabled": False})] = ("enabled=false",)
  families = {}
  for fam in cfg.families:
    drawn, train_ids, index_ids = validation_family_split(zoo, fam, train_pool, 12, cfg.seed)
    if drawn:
      fq = train_split_queries(drawn, 2, cfg.query_shots, cfg.seed + 9, exclude)
      families[fam] = (train_ids, index_ids, fq, np.asarray([task_no[drawn[i]] for i, _, _ in fq]))
  out: dict = {}
  for name, ov in variants.items():
    acc: dict = {}
    for seed in cfg.seeds:
      scfg = config_lib.override(cfg.proxy, list(ov) + [f"align.seed={seed}"])
      proxy = Proxy.train(zoo, scfg, model_ids=inner_ids, cache=cache, progress=progress)
      index = proxy.build_index(groups_from_zoo(zoo, model_ids=keep_ids), cache=cache)
      clean = search_ranks(proxy, index, qs, q_task, m_task, keys)
      per_view = {vname: search_ranks(proxy, index, vq, q_task[viewed], m_task, keys)
                  for vname, vq in views.items()}
      for key, (r, _) in clean.items():
        entry = acc.setdefault(key, {"unseen": [], "seen": [], "views": {}, "families": {}})
        entry["unseen"].append(float(np.mean(r[unseen] == 1)))
        entry["seen"].append(float(np.mean(r[~unseen] == 1)))
        for vname, res in per_view.items():
          entry["views"].setdefault(vname, []).append(float(np.mean(res[key][0] == 1)))
    for fam, (train_ids, index_ids, fq, fq_task) in families.items():
      for seed in family_seeds:
        scfg = config_lib.override(cfg.proxy, list(ov) + [f"align.seed={seed}"])
        proxy = Proxy.train(zoo, scfg, model_ids=train_ids, cache=cache, progress=progress)
        index = proxy.build_index(groups_from_zoo(zoo, model_ids=index_ids), cache=cache)
        for key, (r, _) in search_ranks(proxy, index, fq, fq_task, m_task, keys).items():
          acc[key]["families"].setdefault(fam, []).append(float(np.mean(r <= 5)))
    out[name] = {k: {"unseen": float(np.mean(v["unseen"])), "seen": float(np.mean(v["seen"])),
                     "views": {n: float(np.mean(x)) for n, x in v["views"].items()},
                     "families": {n: float(np.mean(x)) for n, x in v["families"].items()}}
                 for k, v in acc.items()}
    for k, v in out[name].items():
      fams = " ".join(f"{n} {x:.2f}" for n, x in v["families"].items())
      print(name, k, f"unseen {v['unseen']:.3f} seen {v['seen']:.3f} worst view "
            f"{min(v['views'].values()):.3f} | family top-5: {fams}", flush=True)
  return {"validation": out, "queries": len(qs), "unseen_queries": int(unseen.sum()),
          "family_queries": {f: len(v[2]) for f, v in families.items()},
          "config": config_lib.to_dict(cfg)}


def plot(out: dict, path: str) -> None:
  """Left: top-1 per perturbation for each Know2Vec row and anchor matching; right: top-5 per
  family left out."""
  plt = pyplot()
  if plt is None:
    return
  fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 1.4]})
  ax = axes[0]
  rows = {r: s.get("fold0", s) for r, s in out["rows"].items()}
  views = ["clean"] + list(next(iter(rows.values()))["perturbations"])
  series = [(r, [s["clean_top1"]] + [s["perturbations"][v]["top1"] for v in views[1:]],
             [0.0] + [s["perturbations"][v]["spread"] for v in views[1:]])
            for r, s in rows.items()]
  a = out["baselines"]["anchor-matching (untrained)"]
  series.append(("anchor matching", [a["clean_top1"]] + [a["perturbations"][v]["top1"]
                                                         for v in views[1:]], None))
  width = 0.8 / len(series)
  for j, (name, vals, err) in enumerate(series):
    pos = np.arange(len(views)) + j * width - 0.4 + width / 2
    ax.bar(pos, vals, width, yerr=err, label=name, capsize=2)
  ax.set_xticks(np.arange(len(views)), views, rotation=30, ha="right", fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("top-1 (seen + held-out queries)")
  ax.set_title(f"Perturbed queries, {out['num_models']} models, {out['num_queries']} queries, "
               f"fold 0 (mean over aligner seeds, bars: spread)", fontsize=9)
  ax.legend(fontsize=7, loc="lower left")
  ax = axes[1]
  fam = out["summary"]["leave_one_family_out"]
  if fam:
    names = list(fam)
    vec = out["leave_one_family_out"].get("vector-only", {})
    ax.bar(np.arange(len(names)) - 0.2, [fam[n]["top5"] for n in names], 0.4, label="know2vec",
           yerr=[fam[n]["spread"]["top5"] for n in names], capsize=2)
    if vec:
      ax.bar(np.arange(len(names)) + 0.2, [vec[n]["top5"] for n in names], 0.4,
             label="vector-only")
    ax.axhline(0.8, color="red", lw=0.8, ls="--", label="target")
    ax.set_xticks(np.arange(len(names)), [f"{n}{'' if fam[n]['neural'] else '*'}"
                                          for n in names], rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("top-5")
    ax.set_title("Family left out of training (*: not neural)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(out: dict) -> str:
  """Markdown: the configured proxy and the baselines over every trained fold, the ablation rows
  on fold 0, leave-one-family-out, and the no-fit flag."""
  def line(name, s, spread: bool):
    worst = max(s["perturbations"].items(), key=lambda kv: kv[1]["drop"], default=(None, None))
    w = f"{worst[1]['drop']:.3f} ({worst[0]})" if worst[0] else "-"
    pm = (lambda sp: f" ± {s[sp]['spread']['top1']:.3f}") if spread else (lambda sp: "")
    return (f"| {name} | {s['seen']['top1']:.3f}{pm('seen')} | {s['heldout']['top1']:.3f}"
            f"{pm('heldout')} | {s['heldout']['top5']:.3f} | {s['heldout']['mrr']:.3f} | {w} |")
  head = ["| method | seen top-1 | held-out top-1 | held-out top-5 | held-out MRR | "
          "worst perturbation drop |", "|---|---|---|---|---|---|"]
  d = out["rows"][DEFAULT_ROW]
  lines = [f"Every trained fold ({len(d['folds'])}):"] + head + [line(DEFAULT_ROW, d, True)]
  lines += [line(n, b, False) for n, b in out["baselines"].items()]
  if len(out["rows"]) > 1:
    lines += ["", "Ablation, fold 0:"] + head
    lines += [line(r, s.get("fold0", s), True) for r, s in out["rows"].items()]
  fam = out["summary"]["leave_one_family_out"]
  if fam:
    lines += ["", "Leave one family out (top-5; a query of a task only the family has):",
              "| family | neural | models | know2vec top-1 | know2vec top-5 | vector-only top-5 "
              "| anchor matching top-5 |", "|---|---|---|---|---|---|---|"]
    vec = out["leave_one_family_out"].get("vector-only", {})
    am = out["baselines"]["anchor-matching (untrained)"]["leave_one_family_out"]
    for n, s in fam.items():
      v = f"{vec[n]['top5']:.3f}" if n in vec else "-"
      lines.append(f"| {n} | {'yes' if s['neural'] else 'no'} | {s['models']} | "
                   f"{s['top1']:.3f} | {s['top5']:.3f} ± {s['spread']['top5']:.3f} | {v} | "
                   f"{am[n]['top5']:.3f} |")
  o = out["ood"]
  lines += ["", f"No fit (threshold {o['threshold']:.3f}): false alarm on held-out queries "
            f"{o['false_alarm']['rate']:.3f} (seen {o['false_alarm_seen']['rate']:.3f}); "
            "detection " + ", ".join(f"{k} {v['rate']:.3f}" for k, v in o["detection"].items())]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_config_arguments(p, PRESETS, "full")
  add_run_arguments(p, "results JSON (default experiments/results/generalise.json, "
                    "generalise-quick.json with --quick)",
                    "cache of derived artifacts (knowledge, backbone, episodes)",
                    quick="the 'quick' preset", zoo="varied")
  p.add_argument("--validate", action="store_true",
                 help="model selection on validation queries carved from fold 0's training tasks")
  args = p.parse_args(argv)
  if args.quick:
    args.preset = "quick"
  cfg = config_from_args(p, PRESETS, args)
  if args.validate:
    res = validate(cfg, args.zoo, args.cache, not args.quiet)
    path = pathlib.Path(args.out or "experiments/results/generalise-validation.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return
  out_path = args.out or ("experiments/results/generalise-quick.json" if args.preset == "quick"
                          else "experiments/results/generalise.json")
  out = run(cfg, args.zoo, args.cache, out_path, progress=not args.quiet)
  print(format_table(out))
  print("\nperturbation top-1 drops of the know2vec row (mean over seeds):")
  for v, e in out["rows"][DEFAULT_ROW]["perturbations"].items():
    print(f"  {v:16s} top-1 {e['top1']:.3f}  drop {e['drop']:+.3f}")
  print(f"\n{out['num_models']} models, {out['num_queries']} queries, seeds {list(cfg.seeds)}; "
        f"{out['seconds']:.0f} s")


if __name__ == "__main__":
  main()
