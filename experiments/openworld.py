"""Open-world retrieval: queries of sources and classes the proxy never saw, with phi, the probe
pool, the aligner and the calibrations free of their labels.

Command:   python -m experiments.openworld              (know2vec eval openworld; full)
           python -m experiments.openworld --quick
           python -m experiments.openworld --validate   (model selection)
           (the zoo: ``know2vec zoo build --preset varied --zoo artifacts/zoo-varied``, 615
           models of 6 families, 3 of them scikit-learn estimators)
Hardware:  2-core x86-64 CPU, 24 GiB, no GPU (measured there).
Runtime:   EXPECTED_RUNTIME below.
Expected:  EXPECTED_NUMBERS below (experiments/results/openworld.json, figure openworld.png).

Everything runs through the product: the proxy is ``know2vec train``'s default (the ``demo``
preset), a training is ``Proxy.train(zoo, cfg, model_ids=...)``, every other model joins through
``Proxy.build_index`` (no retraining), and queries are ranked by ``Proxy.search``, whose no-fit
flag is the proxy's own calibrated threshold. Every Know2Vec figure is the mean over ``seeds``
aligner seeds (``proxy.align.seed``) with the spread (max - min) beside it.

Settings ("held out" = no label, no model and no calibration of it reaches phi, the aligner, the
no-fit threshold, the familiar-task gate or the reference queries):

- ``unseen_source[S]``, S in fashion_mnist, mnist5k, digits (every domain of S: plain, inverted,
  rotated, blurred): the proxy trains on the models of the other two sources only; phi learns
  their (source, class) labels. S's models join by ``build_index``. Queries: ``query_shots``
  images per class of every task of S's models, from S's test split outside the probe pool's
  rows. Two pools: ``broad`` (the pool holds unlabelled test-split images of every source, S
  included, as a hub's broad pool would; ``--pool`` of every zoo source) and ``strict`` (the
  default pool of the training models: no image of S anywhere in training or the pool).
- ``unseen_classes``: ``held_classes`` classes of every base source (the same in each of its
  domains) are held out: no training model has any of them (so the 10-way models join later), phi
  never learns them; the models of every task with one of them join by ``build_index``. Queries:
  tasks with at least 2 held-out classes. Broad pool.
- Rows on the same queries: ``know2vec`` (the product default), ``vector-only`` (the aligned
  vectors alone, class matching off: the paper's method), ``anchor-matching`` (untrained, the
  same knowledge grids), ``leep`` (every query forwarded through every model; forwards per query
  reported) and ``random``.
- ``no_fit``: the index first holds the training models only, and each S query is searched
  there: ``detection`` is the share flagged; ``false_alarm`` is the share flagged with every
  model in the index, over the unseen-source and unseen-class queries.

A hit is a model trained on the query's task (source domain and class set); ranks over the
whole index (615 models).

Model selection (``--validate``; never an evaluation query, never an image or label of the
evaluation's held-out source): for each evaluation source S, the training side (the other two
sources) is carved once more: the proxy trains on one of them (T) and the other (V) is the unseen
source, with a pool of T's and V's test-split images (broad for V, nothing of S); validation
queries are drawn from V's *train* split (:data:`CARVES`). Training variants
(:data:`VALIDATION_VARIANTS`) and retrieval settings (:data:`VALIDATION_GRID`) are scored there;
the numbers that decided the defaults are in VALIDATION.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import pathlib
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import add_config_arguments, add_run_arguments, config_from_args, pyplot
from experiments.generalise import search_ranks, summarise, rate
from experiments.nnr import leep_matrix, zoo_tasks_sorted
from know2vec_jax import config as config_lib
from know2vec_jax import pool as pool_lib
from know2vec_jax import retrieval
from know2vec_jax import training
from know2vec_jax.baselines import run_baseline
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.classmatch import greedy_assignment
from know2vec_jax.config import Presets, require, require_known
from know2vec_jax.data import DataError, Task, few_shot, load_source, parse_source_name
from know2vec_jax.metrics import first_correct_rank, retrieval_metrics
from know2vec_jax.pipeline import Cache
from know2vec_jax.proxy import Proxy, ProxyConfig, proxy_preset, zoo_metadata
from know2vec_jax.zoo import load_zoo

SOURCES = ("fashion_mnist", "mnist5k", "digits")
POOLS = ("broad", "strict")
# Each Know2Vec row: MatchConfig overrides at query time (one trained proxy serves both).
# "fixed-neighbours" is the radius lever's ablation (each query class stood in for by its 100
# nearest pool images, the earlier rule).
ROWS = {"know2vec": (), "vector-only": ("enabled=false",), "fixed-neighbours": ("radius=false",)}
DEFAULT_ROW = "know2vec"
# Validation carves: evaluation source S -> (the training source T, the validation source V),
# both from S's training side; each source is T once and V once.
CARVES = {"fashion_mnist": ("mnist5k", "digits"), "mnist5k": ("digits", "fashion_mnist"),
          "digits": ("fashion_mnist", "mnist5k")}
# The same pairs the other way round (``--carves reversed|all``): with CARVES, every ordered pair
# of sources, so that each kind of image is held out against a proxy trained on each other kind
# (a digits-only proxy meets clothing in CARVES' "mnist5k" carve, a 28 x 28 digits proxy only
# here, in "digits:reversed").
REVERSED_CARVES = {f"{s}:reversed": (v, t) for s, (t, v) in CARVES.items()}

EXPECTED_RUNTIME = (
    "full: 7,343 s (122 min) on the 2-core CPU from a built varied zoo, the broad pool's knowledge "
    "partly cached, the CPU shared with a test run for about 60 of those minutes (so not the "
    "60 min budget: not met, and not yet measured alone). Per setting, first aligner seed (phi, "
    "knowledge of a new pool, the index) 300-1,037 s, each further seed 109-200 s; the three "
    "strict pools each probe all 615 models anew. --quick: 573 s with the full run's cache "
    "(phi and knowledge cached; one seed, broad pool, no LEEP): broad top-1 fashion_mnist "
    "0.618, mnist5k 0.868, digits 0.737 (mean 0.741), unseen classes 0.833. The 60 min budget "
    "is out of reach at these settings on this CPU: the 14 further seeds alone took 2,217 s, and "
    "each of the 7 settings trains its own phi (about 290 s on this CPU, its contrastive loss "
    "reads the setting's pool) and its first seed's aligner, so the floor is about 89 min before "
    "any knowledge extraction or LEEP. Since that run a source's broad and strict settings share "
    "one LEEP computation (about 80 s each of the three sources).")
EXPECTED_NUMBERS = (
    "(experiments/results/openworld.json; mean of 3 aligner seeds) unseen source, broad pool: "
    "fashion_mnist 0.651 +- 0.033 / 0.899, mnist5k 0.811 / 0.978, digits 0.748 / 0.974 (top-1 / "
    "top-5); mean 0.737 / 0.950 (vectors alone 0.189 / 0.361, the 100 nearest stand-ins "
    "0.701 / 0.940, anchor matching 0.364, LEEP 0.279 / 0.814, random 0.000); strict pool mean "
    "0.121 / 0.311 (LEEP 0.279); unseen classes 0.810 +- 0.018 / 0.958 (100 nearest 0.750, "
    "vectors alone 0.242, LEEP 0.369); no-fit detection, broad: fashion_mnist 0.73, mnist5k "
    "1.00, digits 0.99, false alarm over every unseen query 0.016.")
VALIDATION = (
    "python -m experiments.openworld --validate --set seeds=0,1 (95 min on the 2-core CPU, "
    "shared for its first 30 min; experiments/results/openworld-validation.json): the three "
    "carves (CARVES: train on one source, the other one unseen, nothing of the evaluation's "
    "source), 152 train-split queries of the unseen source per carve, 2 aligner seeds; means "
    "over carves. Rule: ranking settings by mean top-1 (a lead under 0.01, about 9 of the 912 "
    "query evaluations, is a tie, broken by the no-fit numbers); the no-fit setting with the "
    "highest mean detection at mean false alarm <= 0.05 and no carve above 0.10. phi: labels "
    "of the training tasks alone (the earlier default, minus the classes no training model "
    "has) top-1 0.694 / top-5 0.944 (n 100, radius); labels + contrastive loss on the pool "
    "(ssl_weight 1) 0.748 / 0.948; contrastive alone 0.754 / 0.955, a tie, and its no-fit "
    "detection is lower (0.945 against 0.985 at false alarm 0.024 / 0.033), so labels + "
    "contrastive (the labels also carry what the in-label-space experiments validated). Stand-ins "
    "(labels + contrastive, token weight 0.25): 100 nearest 0.712, 100 within the radius 0.748, "
    "50 nearest 0.750, 30 nearest 0.736; token weight 0.5 lost 0.02-0.04 everywhere; vectors "
    "alone 0.202. 100 within the radius and 50 nearest tie; the radius keeps the earlier cap "
    "and detects more (0.985 against 0.838 at false alarm 0.033 / 0.061 with the token weight "
    "2 fit): chosen. No-fit (100, radius): fit token weight 0.25 (the earlier fit score) false "
    "alarm 0.208 (worst carve 0.421), detection 0.956; 1: 0.094 / 0.993; 2: 0.033 (worst "
    "0.072) / 0.985 at the calibration quantile 0.02 (ProxyConfig.false_alarm, unchanged), "
    "0.009 / 0.961 at 0.01: token weight 2 with quantile 0.02 chosen. The earlier defaults "
    "(phi on labels alone, 100 nearest, fit token weight 0.25) on the same carves: top-1 0.649, "
    "false alarm 0.384, detection 0.656.")
# Measured after the evaluation's Fashion-MNIST detection (0.73) fell short of 0.80: a lever
# suggested by that miss, so scored on carves of the training side only and not yet a default.
VALIDATION_NO_FIT_ANCHOR = (
    "python -m experiments.openworld --validate --carves reversed --variants labels+ssl "
    "--no-fit-only --set seeds=0 (32 min on the 2-core CPU, shared with another run for part of "
    "it; experiments/results/openworld-validation-nofit.json; the no-fit flag does not depend "
    "on the aligner seed). The reversed carves hold each kind of image out against a proxy "
    "trained on another: digits:reversed (train on mnist5k, Fashion-MNIST unseen) is the one "
    "that repeats the evaluation's miss: at the product's settings (100 within the radius, fit "
    "token weight 2, quantile 0.02) its detection is 0.914 (13 unflagged queries, 12 of them "
    "best fit by plain mnist5k models), the other two carves 1.000, false alarm 0.013 / 0.066 "
    "/ 0.000 (mean 0.026, detection 0.971). Adding the share of a model class's anchors among "
    "the query class's counted stand-ins (one-to-one over classes, weight u; 'in' and 'near' "
    "measured the same, as the counted stand-ins are the pool images within the radius): u 1: "
    "detection 0.974 on digits:reversed, mean 0.991, false alarm mean 0.022 (worst 0.053); u "
    "2: 0.987, mean 0.996, false alarm 0.020 (worst 0.033); with fit token weight 1 and u 2: "
    "mean false alarm 0.011 (worst 0.020), detection 0.996. The same on the paired carves "
    "(--carves paired, 34 min with the CPU shared; openworld-validation-nofit-paired.json; "
    "unflagged there: 6 queries of the mnist5k carve, best fit by digits models). Over all six "
    "carves at quantile 0.02: the product's fit (token weight 2, no anchor term) mean false "
    "alarm 0.027 (worst carve 0.066), mean detection 0.979 (worst 0.914); token weight 1 + "
    "anchor weight 2: 0.008 (worst 0.020), 0.996 (worst 0.987); token weight 1 + anchor 1: "
    "0.023 (worst 0.066), 0.997 (worst 0.987); token 0.25 + anchor 2: 0.019 / 0.992; token 2 + "
    "anchor 2: 0.011 / 0.979 (worst 0.888). By the VALIDATION rule (highest mean detection at "
    "mean false alarm <= 0.05, no carve above 0.10; a lead under 0.01 a tie, broken by the "
    "false alarm) token weight 1 + anchor weight 2 is chosen. Not yet the product's fit score: "
    "the index does not store each model's anchors yet.")


@dataclasses.dataclass(frozen=True)
class OpenWorldConfig:
  """The open-world experiment.

  Attributes:
    proxy: the proxy (default: the product's, ``know2vec train``'s ``demo`` preset).
    sources: the base sources held out one at a time (``unseen_source``).
    pools: which pool settings to run for ``unseen_source`` (``broad``, ``strict``).
    unseen_classes: run the held-out-classes setting.
    held_classes: classes held out per base source there.
    seeds: aligner seeds.
    queries_per_task, query_shots: queries per task and images per class.
    leep: score LEEP (every query through every model).
    seed: held-out classes, queries, baselines.
  """
  proxy: ProxyConfig = ProxyConfig()
  sources: tuple[str, ...] = SOURCES
  pools: tuple[str, ...] = POOLS
  unseen_classes: bool = True
  held_classes: int = 3
  seeds: tuple[int, ...] = (0, 1, 2)
  queries_per_task: int = 2
  query_shots: int = 5
  leep: bool = True
  seed: int = 0

  def __post_init__(self):
    require(len(self.seeds) >= 1, "seeds must name at least one aligner seed")
    require_known(self.pools, POOLS, "pool setting(s)")
    require(self.held_classes >= 2, f"held_classes must be >= 2 (queries need 2 of them), got "
            f"{self.held_classes}")
    require(self.queries_per_task >= 1 and self.query_shots >= 1,
            "queries_per_task and query_shots must be >= 1")
    require(bool(self.sources) or self.unseen_classes, "nothing to run: no source and no "
            "unseen_classes")


PRESETS: Presets[OpenWorldConfig] = Presets("openworld")


@PRESETS.register("full")
def _full() -> OpenWorldConfig:
  """3 sources x (broad, strict) pools + unseen classes, 3 seeds, LEEP."""
  return OpenWorldConfig(proxy=proxy_preset("demo"))


@PRESETS.register("quick")
def _quick() -> OpenWorldConfig:
  """3 sources, broad pool, and unseen classes, one seed, no LEEP."""
  return OpenWorldConfig(proxy=proxy_preset("demo"), pools=("broad",), seeds=(0,), leep=False,
                         queries_per_task=1)


@PRESETS.register("tiny")
def _tiny() -> OpenWorldConfig:
  """The tiny zoo and tiny proxy (tests): digits held out, both pools, 2 seeds."""
  return OpenWorldConfig(proxy=proxy_preset("tiny"), sources=("digits",), seeds=(0, 1),
                         held_classes=3, queries_per_task=1, query_shots=3, leep=False)


# ---- the protocol's pieces (pure, tested) --------------------------------------------------------

def base_of(source: str) -> str:
  """``digits+invert`` -> ``digits``."""
  return parse_source_name(source)[0]


def source_split(zoo, source: str, model_ids=None) -> tuple[list[str], list[str]]:
  """(model ids of every other base source, model ids of ``source``'s every domain), among
  ``model_ids`` (default: the whole zoo)."""
  ids = list(zoo.records) if model_ids is None else list(model_ids)
  held = [m for m in ids if base_of(zoo.record(m).source) == source]
  return [m for m in ids if m not in set(held)], held


def draw_held_classes(zoo, n: int, seed: int) -> dict[str, tuple[int, ...]]:
  """Base source -> ``n`` of its classes, drawn once (the same in every domain)."""
  out = {}
  for base in sorted({base_of(r.source) for r in zoo.records.values()}):
    k = load_source(base).num_classes
    rng = np.random.default_rng([seed, sum(map(ord, base))])
    out[base] = tuple(sorted(int(c) for c in rng.choice(k, size=min(n, k), replace=False)))
  return out


def class_split(zoo, held: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
  """(models whose task has none of its base's held-out classes, the others)."""
  train, out = [], []
  for m, r in zoo.records.items():
    hit = set(r.task.classes) & set(held.get(base_of(r.source), ()))
    (out if hit else train).append(m)
  return train, out


def class_query_tasks(tasks, held: dict[str, tuple[int, ...]], at_least: int = 2) -> list[Task]:
  """The tasks with at least ``at_least`` held-out classes."""
  return [t for t in tasks
          if len(set(t.classes) & set(held.get(base_of(t.source), ()))) >= at_least]


def pool_config(cfg: ProxyConfig, setting: str, zoo, training_ids) -> ProxyConfig:
  """The proxy with the pool of a setting: ``broad`` = the test splits of every zoo source;
  ``strict`` = the default pool (the training models' sources only)."""
  if setting == "strict":
    return dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, sources=()))
  every = tuple(sorted({r.source for r in zoo.records.values()}))
  return dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, sources=every))


def make_queries(tasks: list[Task], per_task: int, shots: int, seed: int, split: str,
                 exclude) -> list[tuple]:
  """(task index, images, labels) of ``per_task`` queries per task, ``shots`` per class from
  ``split``, never a row ``exclude(source)`` names (the probe pool's); a task whose classes are
  too small is skipped."""
  out = []
  for i, t in enumerate(tasks):
    data = load_source(t.source)
    for q in range(per_task):
      try:
        x, y = few_shot(data, t, shots, seed=seed * 100003 + i * 31 + q, split=split,
                        exclude=exclude(t.source))
      except DataError:
        continue
      out.append((i, x, y))
  return out


def broad_exclusion(cfg: ProxyConfig, zoo, split: str = "test"):
  """source -> the rows of ``split`` that a broad pool of ``cfg`` holds (queries avoid them in
  every setting, so broad and strict are scored on the same queries)."""
  every = tuple(sorted({r.source for r in zoo.records.values()}))
  pcfg = dataclasses.replace(cfg.pool, sources=every)
  memo: dict = {}

  def rows(source: str) -> np.ndarray:
    if source not in memo:
      memo[source] = pool_lib.config_rows(pcfg, source, split, cfg.seed)
    return memo[source]
  return rows


# ---- one setting ------------------------------------------------------------------------------

def run_setting(zoo, cache, pcfg: ProxyConfig, train_ids, held_ids, queries, q_task, m_task,
                seeds, meta, progress: bool) -> dict:
  """Trains one proxy per seed on ``train_ids``, indexes the training models (no-fit search
  of the queries there), then adds ``held_ids`` (full search).

  Returns:
    {"ranks": row -> seed -> int [Q], "flags": seed -> bool [Q] (models present),
    "detection": seed -> bool [Q] (held models absent), "proxy": the first seed's proxy,
    "seconds": per seed}.
  """
  out = {"ranks": {}, "flags": {}, "detection": {}, "seconds": [], "proxy": None}
  xy = [(x, y) for _, x, y in queries]
  for seed in seeds:
    t0 = time.perf_counter()
    scfg = config_lib.override(pcfg, [f"align.seed={seed}"])
    proxy = Proxy.train(zoo, scfg, model_ids=train_ids, cache=cache, progress=progress)
    index = proxy.build_index(groups_from_zoo(zoo, model_ids=train_ids, strategy=scfg.strategy),
                              meta, cache=cache, progress=progress)
    out["detection"][seed] = proxy.search(index, xy, k=1).no_fit
    index = proxy.build_index(groups_from_zoo(zoo, model_ids=held_ids, strategy=scfg.strategy),
                              meta, index=index, cache=cache, progress=progress)
    for row, (r, f) in search_ranks(proxy, index, queries, q_task, m_task, ROWS).items():
      out["ranks"].setdefault(row, {})[seed] = r
      if row == DEFAULT_ROW:
        out["flags"][seed] = f
    out["seconds"].append(time.perf_counter() - t0)
    if out["proxy"] is None:
      out["proxy"] = proxy
      out["index"] = index
  return out


def baseline_rows(proxy: Proxy, index, zoo, queries, q_task, m_task, leep: bool, seed: int,
                  leep_memo: dict | None = None) -> dict:
  """Anchor matching (the setting's knowledge grids and phi), LEEP and random on the queries.

  LEEP reads neither the pool nor phi, so a source's broad and strict settings (the same queries,
  the same models in the same order) share one computation through ``leep_memo``, keyed by the
  queries' images and labels and the index's model ids."""
  groups = groups_from_zoo(zoo, model_ids=index.ids)
  ids, m_grid, m_mask = proxy.model_grids(groups, index=index)
  correct = np.asarray([[m_task[m] == q_task[qi] for m in ids] for qi in range(len(queries))])
  grids = [proxy.query_grid(x, y) for _, x, y in queries]
  anchor = run_baseline("anchor-matching", query_grid=np.stack([g for g, _ in grids]),
                        query_mask=np.stack([m for _, m in grids]), model_grids=m_grid,
                        model_masks=m_mask).scores
  rand = run_baseline("random", key=jax.random.key(seed + 2),
                      num_models=len(queries) * len(ids)).scores.reshape(len(queries), len(ids))
  out = {"anchor-matching": retrieval_metrics(first_correct_rank(anchor, correct)),
         "random": retrieval_metrics(first_correct_rank(rand, correct))}
  if leep:
    digest = hashlib.sha256()
    for _, x, y in queries:
      digest.update(np.ascontiguousarray(x).tobytes())
      digest.update(np.ascontiguousarray(y).tobytes())
    key = (digest.hexdigest(), tuple(ids))
    memo = {} if leep_memo is None else leep_memo
    if key not in memo:
      memo[key] = leep_matrix(groups, queries, ids)
    scores, forwards, sec = memo[key]
    out["leep"] = retrieval_metrics(first_correct_rank(scores, correct)) | {
        "forwards_per_query": float(np.mean(forwards)), "seconds_per_query": sec}
  return out


def setting_summary(res: dict, seeds) -> dict:
  """Rows' mean and spread over seeds, and the no-fit rates."""
  out = {row: summarise([by_seed[s] for s in seeds]) for row, by_seed in res["ranks"].items()}
  out["no_fit"] = {"detection": rate([res["detection"][s] for s in seeds]),
                   "false_alarm": rate([res["flags"][s] for s in seeds])}
  return out


# ---- the experiment ---------------------------------------------------------------------------

def run(cfg: OpenWorldConfig, zoo_dir: str, cache_dir: str, out: str | None,
        progress: bool = True) -> dict:
  """Runs the experiment; writes ``out`` (JSON) and a figure beside it when ``out`` is given."""
  t_start = time.perf_counter()
  zoo = load_zoo(zoo_dir)
  cache = Cache(cache_dir)
  tasks = zoo_tasks_sorted(zoo)
  task_no = {t: i for i, t in enumerate(tasks)}
  m_task = {m: task_no[r.task] for m, r in zoo.records.items()}
  meta = zoo_metadata(zoo)
  exclude = broad_exclusion(cfg.proxy, zoo)
  settings: dict = {}
  flags_all: dict = {}  # seed -> flags of every broad unseen query (false alarm)
  leep_memo: dict = {}  # LEEP of a source's queries, shared by its broad and strict settings

  def one(name, pcfg, train_ids, held_ids, q_tasks):
    qs = make_queries([tasks[i] for i in q_tasks], cfg.queries_per_task, cfg.query_shots,
                      cfg.seed, "test", exclude)
    queries = [(q_tasks[i], x, y) for i, x, y in qs]
    q_task = np.asarray([i for i, _, _ in queries])
    res = run_setting(zoo, cache, pcfg, train_ids, held_ids, queries, q_task, m_task,
                      cfg.seeds, meta, progress)
    summary = setting_summary(res, cfg.seeds)
    summary["baselines"] = baseline_rows(res["proxy"], res["index"], zoo, queries, q_task,
                                         m_task, cfg.leep, cfg.seed, leep_memo)
    summary["queries"] = len(queries)
    summary["tasks"] = len(set(q_task.tolist()))
    summary["train_models"], summary["held_models"] = len(train_ids), len(held_ids)
    summary["seconds"] = res["seconds"]
    summary["proxy"] = {"pool": pool_lib.summary(res["proxy"].pool_provenance),
                        "backbone": res["proxy"].provenance["backbone"],
                        "calibration": res["proxy"].info.get("calibration")}
    settings[name] = summary
    if name.endswith(":broad") or name == "unseen_classes":
      for s in cfg.seeds:
        flags_all.setdefault(s, []).append(res["flags"][s])
    top = summary[DEFAULT_ROW]
    print(f"{name}: top-1 {top['top1']:.3f} top-5 {top['top5']:.3f} MRR {top['mrr']:.3f} | "
          f"vector-only {summary['vector-only']['top1']:.3f} | " + " ".join(
              f"{b} {v['top1']:.3f}" for b, v in summary["baselines"].items())
          + f" | detection {summary['no_fit']['detection']['rate']:.2f} false alarm "
          f"{summary['no_fit']['false_alarm']['rate']:.2f}", flush=True)

  for source in cfg.sources:
    train_ids, held_ids = source_split(zoo, source)
    q_tasks = [i for i, t in enumerate(tasks) if base_of(t.source) == source]
    for setting in cfg.pools:
      one(f"unseen_source:{source}:{setting}", pool_config(cfg.proxy, setting, zoo, train_ids),
          train_ids, held_ids, q_tasks)
  held = draw_held_classes(zoo, cfg.held_classes, cfg.seed) if cfg.unseen_classes else {}
  if cfg.unseen_classes:
    train_ids, held_ids = class_split(zoo, held)
    q_tasks = [task_no[t] for t in class_query_tasks(tasks, held)]
    one("unseen_classes", pool_config(cfg.proxy, "broad", zoo, train_ids), train_ids, held_ids,
        q_tasks)

  res = {"summary": summarise_targets(settings, cfg, flags_all), "settings": settings,
         "held_classes": {b: [load_source(b).class_names[c] for c in cs]
                          for b, cs in held.items()},
         "config": config_lib.to_dict(cfg), "num_models": len(zoo),
         "seconds": time.perf_counter() - t_start, "backend": jax.default_backend()}
  if out is not None:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    plot(res, str(path.with_suffix(".png")))
  return res


def summarise_targets(settings: dict, cfg: OpenWorldConfig, flags_all: dict) -> dict:
  """The ``summary``, keyed by setting: unseen_source[pool][S] and its mean, unseen_classes,
  no_fit, with every row beside the product's."""
  def entry(s):
    d = s[DEFAULT_ROW]
    return {"top1": d["top1"], "top5": d["top5"], "mrr": d["mrr"], "spread": d["spread"],
            "rows": {r: {m: s[r][m] for m in ("top1", "top5", "mrr")} for r in ROWS
                     if r != DEFAULT_ROW and r in s}
            | {b: {m: v[m] for m in ("top1", "top5", "mrr")} for b, v in s["baselines"].items()},
            "queries": s["queries"]}
  out: dict = {"unseen_source": {}}
  for setting in cfg.pools:
    per = {src: entry(settings[f"unseen_source:{src}:{setting}"]) for src in cfg.sources
           if f"unseen_source:{src}:{setting}" in settings}
    if per:
      per["mean"] = {m: float(np.mean([p[m] for p in per.values()]))
                     for m in ("top1", "top5", "mrr")}
      per["worst_top1"] = float(min(p["top1"] for k, p in per.items() if k != "mean"))
      per["mean"]["rows"] = {r: {m: float(np.mean([p["rows"][r][m] for k, p in per.items()
                                                   if k not in ("mean", "worst_top1")]))
                                 for m in ("top1", "top5", "mrr")}
                             for r in next(iter(v for v in per.values()
                                                if isinstance(v, dict)))["rows"]}
    out["unseen_source"][setting] = per
  if "unseen_classes" in settings:
    out["unseen_classes"] = entry(settings["unseen_classes"])
  out["no_fit"] = {setting: {src: settings[f"unseen_source:{src}:{setting}"]["no_fit"][
      "detection"]["rate"] for src in cfg.sources if f"unseen_source:{src}:{setting}" in settings}
      for setting in cfg.pools}
  if flags_all:
    out["false_alarm"] = rate([np.concatenate(v) for _, v in sorted(flags_all.items())])
  return out


# ---- model selection ----------------------------------------------------------------------------

# Training variants (ProxyConfig overrides) scored on the validation carves.
VALIDATION_VARIANTS = {
    "labels": (),
    "labels+ssl": ("backbone.ssl_weight=1.0",),
    "ssl": ("backbone.ssl_weight=1.0", "backbone.labelled=false"),
}
# Retrieval settings: how query classes are described (neighbours, radius) and ranked
# (token_weight) ...
VALIDATION_GRID = {"neighbours": (30, 50, 100), "radius": (False, True),
                   "token_weight": (0.25, 0.5)}
# ... and the no-fit flag: the token's weight in the fit score, and the share of the
# calibration queries (validation queries of the training tasks) flagged.
VALIDATION_NO_FIT = {"fit_token_weight": (0.25, 1.0, 2.0), "false_alarm": (0.005, 0.01, 0.02)}
# The candidate extra fit term (validation only; ``anchor_weight`` 0 is the product's fit score):
# whether the model's most confident pool images (its anchors) lie where the query's classes
# are, as the share of a model class's anchors among the query class's counted stand-ins,
# one-to-one over classes like the agreement (``anchor_term`` "in" in the results' keys). The
# first runs also scored "near" (anchors as close to the prototype as the farthest counted
# stand-in): the same images, as the counted stand-ins are the pool images within that cosine,
# and the same numbers in openworld-validation-nofit*.json, so it was dropped.
VALIDATION_ANCHOR = {"anchor_weight": (0.0, 0.5, 1.0, 2.0)}


@functools.partial(jax.jit, static_argnames=("pool_size",))
def _anchor_overlap(q_mask, standins, weights, anchors, a_mask, *, pool_size: int):
  """One query batch against every model: q_mask [Q, Kq], standins and weights [Q, Kq, n];
  anchors int [M, Km, A] (pool indices), a_mask [M, Km] -> float32 [Q, M]."""
  q, kq = q_mask.shape
  bitmap = jnp.zeros((q, kq, pool_size), bool).at[
      jnp.arange(q)[:, None, None], jnp.arange(kq)[None, :, None], standins].max(weights > 0)
  inside = bitmap[:, :, anchors].mean(-1)  # [Q, Kq, M, Km]
  total = greedy_assignment(inside.transpose(0, 2, 1, 3), q_mask[:, None, :] > 0,
                            a_mask[None] > 0)
  return total / jnp.maximum(q_mask.sum(-1), 1.0)[:, None]


def anchor_overlap(classes, pool_size: int, anchors, a_mask, batch: int = 4) -> np.ndarray:
  """:func:`_anchor_overlap` over every query (``classes``: QueryClasses; without stand-in
  weights every stand-in counts) in batches of ``batch``: float32 [Q, M]."""
  q = len(classes)
  w = classes.weights if classes.weights is not None else np.ones(classes.anchors.shape,
                                                                  np.float32)
  an, am = jnp.asarray(anchors), jnp.asarray(a_mask)
  outs = []
  for s in range(0, q, batch):
    part = np.minimum(np.arange(s, s + batch), q - 1)  # the last batch padded: one shape
    got = _anchor_overlap(jnp.asarray(classes.mask[part]), jnp.asarray(classes.anchors[part]),
                          jnp.asarray(w[part]), an, am, pool_size=int(pool_size))
    outs.append(np.asarray(got)[:min(batch, q - s)])
  return np.concatenate(outs)


def validation_carves(kind: str, sources) -> dict[str, tuple[str, str]]:
  """The carves of ``kind`` (``paired``: :data:`CARVES`, ``reversed``: :data:`REVERSED_CARVES`,
  ``all``: both) for the evaluation sources ``sources``: name -> (training source, unseen
  source)."""
  require_known([kind], ("paired", "reversed", "all"), "carve set(s)")
  chosen = {**(CARVES if kind != "reversed" else {}), **(REVERSED_CARVES if kind != "paired"
                                                         else {})}
  return {k: v for k, v in chosen.items() if k.partition(":")[0] in sources}


def _index_anchors(proxy: Proxy, index) -> tuple[np.ndarray, np.ndarray]:
  """Every index row's anchor indices (int32 [M, Km, A], padded) and class mask [M, Km], from
  the knowledge the proxy probed them with (its pool)."""
  recs = {m: r for (m, _), r in proxy.knowledge.items()}
  rows = [recs[m].anchor_index for m in index.ids]
  km = max(r.shape[0] for r in rows)
  a = rows[0].shape[1]
  anchors = np.zeros((len(rows), km, a), np.int32)
  mask = np.zeros((len(rows), km), np.float32)
  for i, r in enumerate(rows):
    anchors[i, :r.shape[0]] = r
    mask[i, :r.shape[0]] = 1
  return anchors, mask


def _fit_parts(proxy: Proxy, index, described, anchors=None) -> dict:
  """The fit score's parts for every (query, index row), rows in index order: agreement,
  token [Q, M] and, with ``anchors`` (:func:`_index_anchors`), the candidate anchor term."""
  vectors, classes = described
  found = proxy.retriever.score(index, vectors, classes, len(index))
  col = {m: j for j, m in enumerate(index.ids)}
  order = np.asarray([[col[m] for m in row] for row in found.ids], np.int64)
  parts = {}
  for name in ("agreement", "token"):
    v = np.full((len(order), len(index)), -np.inf, np.float32)
    np.put_along_axis(v, order, np.asarray(getattr(found, name)), axis=1)
    parts[name] = v
  if anchors is not None:
    parts["anchor"] = anchor_overlap(classes, len(proxy.index_pool_features(index)), *anchors)
  return parts


def _fit(parts: dict, w: float, u: float = 0.0) -> np.ndarray:
  """``agreement + w * token (+ u * anchor share)`` [Q, M]: the product's fit score
  (:func:`know2vec_jax.retrieval.fit_score`) at token weight ``w``, plus the candidate term."""
  f = retrieval.fit_score(parts["agreement"], parts["token"],
                          types.SimpleNamespace(fit_token_weight=w))
  return f + u * parts["anchor"] if u else f


def _best_fit(parts: dict, w: float, u: float = 0.0) -> np.ndarray:
  """Each query's highest :func:`_fit` over the index."""
  f = _fit(parts, w, u)
  return f.max(1) if f.shape[1] else np.zeros(len(f))


def validate(cfg: OpenWorldConfig, zoo_dir: str, cache_dir: str, progress: bool = True,
             variants: dict | None = None, grid: dict | None = None,
             no_fit: dict | None = None, carves: dict | None = None,
             anchor: dict | None = None) -> dict:
  """Model selection on the carves (see the module docstring); never an evaluation query.

  Per training variant, carve and aligner seed, one proxy is trained on the carve's training
  source; every retrieval setting of ``grid`` ranks the validation source's queries, and every
  no-fit setting of ``no_fit`` is calibrated exactly as the product calibrates it (the quantile
  of the training tasks' validation queries' fit scores against the training models) and read
  on the validation queries with their models absent (``detection``) and present
  (``false_alarm``), also with the candidate anchor terms of ``anchor``
  (:data:`VALIDATION_ANCHOR`; keys with ``anchor_weight`` > 0 name them). ``diagnostics``
  records, per carve, which training models' sources give the unflagged absent queries their
  best fit under the product's settings.

  Returns:
    {"ranking": {variant: {setting: {carve: {"top1", "top5"}, "mean": ...}}},
     "no_fit": {variant: {setting: {carve: {"false_alarm", "detection"}, "mean": ...}}},
     "diagnostics": {variant: {carve: {source: unflagged absent queries best fit there}}}}.
  """
  zoo = load_zoo(zoo_dir)
  cache = Cache(cache_dir)
  tasks = zoo_tasks_sorted(zoo)
  task_no = {t: i for i, t in enumerate(tasks)}
  m_task = {m: task_no[r.task] for m, r in zoo.records.items()}
  meta = zoo_metadata(zoo)
  variants = variants or VALIDATION_VARIANTS
  grid = grid or VALIDATION_GRID
  no_fit = no_fit or VALIDATION_NO_FIT
  carves = carves or {s: CARVES[s] for s in cfg.sources}
  anchor = anchor or {"anchor_weight": (0.0,)}
  fits = [(w, u) for w in no_fit["fit_token_weight"] for u in anchor["anchor_weight"]]
  with_anchors = any(u for _, u in fits)
  describe = list(itertools.product(grid["neighbours"], grid["radius"]))
  product = cfg.proxy.match
  ranking: dict = {}
  flags: dict = {}
  diagnostics: dict = {}
  for name, ov in variants.items():
    rank_acc: dict = {}
    fit_acc: dict = {}
    for evaluation, (train_src, val_src) in carves.items():
      ids = [m for m, r in zoo.records.items() if base_of(r.source) in (train_src, val_src)]
      train_ids, held_ids = source_split(zoo, val_src, ids)
      srcs = tuple(sorted({zoo.record(m).source for m in ids}))
      pcfg = config_lib.override(cfg.proxy, list(ov))
      pcfg = dataclasses.replace(pcfg, pool=dataclasses.replace(pcfg.pool, sources=srcs))
      q_tasks = [i for i, t in enumerate(tasks) if base_of(t.source) == val_src]
      # The pool is in the test splits: train-split queries share no image with it.
      qs = make_queries([tasks[i] for i in q_tasks], cfg.queries_per_task, cfg.query_shots,
                        cfg.seed + 5, "train", lambda s: np.zeros(0, np.int64))
      queries = [(q_tasks[i], x, y) for i, x, y in qs]
      q_task = np.asarray([i for i, _, _ in queries])
      xy = [(x, y) for _, x, y in queries]
      for seed in cfg.seeds:
        scfg = config_lib.override(pcfg, [f"align.seed={seed}"])
        proxy = Proxy.train(zoo, scfg, model_ids=train_ids, cache=cache, progress=progress)
        index = proxy.build_index(groups_from_zoo(zoo, model_ids=train_ids), meta, cache=cache)
        calib, _ = training.validation_queries(proxy, train_ids, {m: zoo.record(m).task for m in
                                                                  train_ids}, zoo.image_shape)
        stats = {}
        anchors = _index_anchors(proxy, index) if with_anchors else None
        for n, radius in describe:
          p = proxy.with_match(neighbours=n, radius=radius)
          stats[(n, radius)] = {
              "calibration": _fit_parts(p, index, p.describe_queries(calib, index=index),
                                        anchors),
              "absent": _fit_parts(p, index, p.describe_queries(xy, index=index), anchors)}
        if seed == cfg.seeds[0] and (product.neighbours, product.radius) in stats:
          st = stats[(product.neighbours, product.radius)]
          w = product.fit_token_weight
          th = float(np.quantile(_best_fit(st["calibration"], w), pcfg.false_alarm,
                                 method="lower"))
          f = _fit(st["absent"], w)
          src = [zoo.record(m).source for m in index.ids]
          missed = f.max(1) >= th
          diagnostics.setdefault(name, {})[evaluation] = dict(sorted(
              collections.Counter(src[j] for j in f.argmax(1)[missed]).items()))
        index = proxy.build_index(groups_from_zoo(zoo, model_ids=held_ids), meta, index=index,
                                  cache=cache)
        anchors = _index_anchors(proxy, index) if with_anchors else None
        for n, radius in describe:
          p = proxy.with_match(neighbours=n, radius=radius)
          described = p.describe_queries(xy, index=index)
          stats[(n, radius)]["present"] = _fit_parts(p, index, described, anchors)
          for tw in grid["token_weight"]:
            found = p.retriever.with_settings([f"token_weight={tw}"]).score(
                index, described[0], described[1], len(index))
            r = np.asarray([next((j + 1 for j, m in enumerate(row) if m_task[m] == q_task[qi]),
                                 len(row) + 1) for qi, row in enumerate(found.ids)])
            key = json.dumps({"neighbours": n, "radius": radius, "token_weight": tw})
            e = rank_acc.setdefault(key, {}).setdefault(evaluation, {"top1": [], "top5": []})
            e["top1"].append(float(np.mean(r == 1)))
            e["top5"].append(float(np.mean(r <= 5)))
          st = stats[(n, radius)]
          for w, u in fits:
            best = {part: _best_fit(st[part], w, u) for part in st}
            for fa in no_fit["false_alarm"]:
              th = float(np.quantile(best["calibration"], fa, method="lower"))
              setting = {"neighbours": n, "radius": radius, "fit_token_weight": w,
                         "false_alarm": fa}
              if u:
                setting.update(anchor_term="in", anchor_weight=u)
              e = fit_acc.setdefault(json.dumps(setting), {}).setdefault(
                  evaluation, {"false_alarm": [], "detection": []})
              e["false_alarm"].append(float(np.mean(best["present"] < th)))
              e["detection"].append(float(np.mean(best["absent"] < th)))
        vec_only = search_ranks(proxy, index, queries, q_task, m_task,
                                {"vector-only": ("enabled=false",)})["vector-only"][0]
        e = rank_acc.setdefault("vector-only", {}).setdefault(evaluation, {"top1": [], "top5": []})
        e["top1"].append(float(np.mean(vec_only == 1)))
        e["top5"].append(float(np.mean(vec_only <= 5)))
    ranking[name] = _means(rank_acc)
    flags[name] = _means(fit_acc)
    for key, v in ranking[name].items():
      print(name, key, " ".join(f"{c} {x['top1']:.3f}" for c, x in v.items() if c != "mean"),
            f"| mean top-1 {v['mean']['top1']:.3f} top-5 {v['mean']['top5']:.3f}", flush=True)
    for key, v in flags[name].items():
      print(name, key, " ".join(f"{c} {x['false_alarm']:.3f}/{x['detection']:.3f}"
                                for c, x in v.items() if c != "mean"),
            f"| mean false alarm {v['mean']['false_alarm']:.3f} detection "
            f"{v['mean']['detection']:.3f}", flush=True)
  return {"ranking": ranking, "no_fit": flags, "diagnostics": diagnostics,
          "carves": {k: list(v) for k, v in carves.items()}, "config": config_lib.to_dict(cfg)}


def _means(acc: dict) -> dict:
  """setting -> carve -> metric -> [per seed] to means per carve and over carves."""
  out = {}
  for key, by_carve in acc.items():
    out[key] = {c: {m: float(np.mean(v)) for m, v in e.items()} for c, e in by_carve.items()}
    metrics = next(iter(by_carve.values())).keys()
    out[key]["mean"] = {m: float(np.mean([out[key][c][m] for c in by_carve])) for m in metrics}
  return out


# ---- report -----------------------------------------------------------------------------------

def plot(out: dict, path: str) -> None:
  """Top-1 of every row per setting (bars: the seeds' spread)."""
  plt = pyplot()
  if plt is None:
    return
  names = list(out["settings"])
  rows = ["know2vec", "fixed-neighbours", "vector-only", "anchor-matching", "leep", "random"]
  fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names)), 4.5))
  width = 0.8 / len(rows)
  for j, row in enumerate(rows):
    vals, err = [], []
    for n in names:
      s = out["settings"][n]
      v = s.get(row) or s["baselines"].get(row)
      vals.append(v["top1"] if v else np.nan)
      err.append(v["spread"]["top1"] if v and "spread" in v else 0.0)
    pos = np.arange(len(names)) + j * width - 0.4 + width / 2
    ax.bar(pos, vals, width, yerr=err, label=row, capsize=2)
  ax.set_xticks(np.arange(len(names)), [n.replace("unseen_source:", "") for n in names],
                rotation=20, ha="right", fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("top-1")
  ax.set_title(f"Open world: sources and classes the proxy never saw ({out['num_models']} "
               "models; mean over aligner seeds)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(out: dict) -> str:
  """Markdown: one line per setting, every row's top-1 (top-5), the no-fit rates."""
  lines = ["| setting | know2vec top-1 | top-5 | MRR | fixed neighbours | vector-only | "
           "anchor matching | LEEP | random | detection | false alarm |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, s in out["settings"].items():
    d = s[DEFAULT_ROW]
    b = s["baselines"]
    cell = lambda v: f"{v['top1']:.3f} / {v['top5']:.3f}" if v else "-"  # noqa: E731
    lines.append(f"| {name} | {d['top1']:.3f} ± {d['spread']['top1']:.3f} | {d['top5']:.3f} | "
                 f"{d['mrr']:.3f} | {cell(s.get('fixed-neighbours'))} | {cell(s['vector-only'])} | "
                 f"{cell(b.get('anchor-matching'))} "
                 f"| {cell(b.get('leep'))} | {cell(b.get('random'))} | "
                 f"{s['no_fit']['detection']['rate']:.3f} | "
                 f"{s['no_fit']['false_alarm']['rate']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_config_arguments(p, PRESETS, "full")
  add_run_arguments(p, "results JSON (default experiments/results/openworld.json, "
                    "openworld-quick.json with --quick)",
                    "cache of derived artifacts (knowledge, backbone, episodes)",
                    quick="the 'quick' preset", zoo="varied")
  p.add_argument("--validate", action="store_true",
                 help="model selection on carves of the training side (never an evaluation "
                 "query)")
  p.add_argument("--carves", choices=("paired", "reversed", "all"), default="paired",
                 help="--validate: CARVES, REVERSED_CARVES or both")
  p.add_argument("--variants", default=",".join(VALIDATION_VARIANTS),
                 help="--validate: the training variants to score, comma-separated")
  p.add_argument("--no-fit-only", action="store_true",
                 help="--validate: the product's stand-in and token settings only, with the "
                 "candidate anchor terms of the fit score (VALIDATION_ANCHOR)")
  args = p.parse_args(argv)
  if args.quick:
    args.preset = "quick"
  cfg = config_from_args(p, PRESETS, args)
  if args.validate:
    carves = validation_carves(args.carves, cfg.sources)
    names = [v for v in args.variants.split(",") if v]
    require_known(names, tuple(VALIDATION_VARIANTS), "validation variant(s)")
    grid = anchor = None
    if args.no_fit_only:
      m = cfg.proxy.match
      grid = {"neighbours": (m.neighbours,), "radius": (m.radius,),
              "token_weight": (m.token_weight,)}
      anchor = VALIDATION_ANCHOR
    res = validate(cfg, args.zoo, args.cache, not args.quiet,
                   variants={v: VALIDATION_VARIANTS[v] for v in names}, grid=grid,
                   carves=carves, anchor=anchor)
    path = pathlib.Path(args.out or "experiments/results/openworld-validation.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return
  out_path = args.out or ("experiments/results/openworld-quick.json" if args.preset == "quick"
                          else "experiments/results/openworld.json")
  out = run(cfg, args.zoo, args.cache, out_path, progress=not args.quiet)
  print(format_table(out))
  print(f"\n{out['num_models']} models; {out['seconds']:.0f} s")


if __name__ == "__main__":
  main()
