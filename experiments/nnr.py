"""NNR (neural network retrieval) on the demo zoo: Know2Vec against random, untrained anchor
matching and LEEP, on tasks the aligner saw and on tasks (and models) it never saw.

Command:   python -m experiments.nnr          (full: 3 folds, 3 variants, the T ablation, LEEP)
           python -m experiments.nnr --quick --zoo artifacts/zoo-starter   (the main job's table)
           python -m experiments.nnr --validate [--set KEY=VALUE ...]   (model selection)
Hardware:  2-core x86-64 CPU, 24 GiB, no GPU (measured there).
Runtime:   EXPECTED_RUNTIME below.
Expected:  EXPECTED_NUMBERS below (experiments/results/nnr.json, figure nnr.png).

Everything runs through the product: a fold is ``Proxy.train(zoo, cfg, model_ids=<the fold's
training models>)``, its held-out models join afterwards through ``Proxy.build_index`` (no
retraining), and queries are ranked by ``Proxy.search`` (the aligned vectors, then class-level
matching; the "vectors only" row is the same proxy with matching off); baselines are scored by
:mod:`know2vec_jax.baselines`. One :class:`know2vec_jax.pipeline.Cache` shares the knowledge,
phi and episodes across folds and variants, so each model is probed once per knowledge config.

Model selection (``--validate``, never the evaluation queries): a quarter of fold 0's training
4-way tasks are held out as validation tasks; queries are drawn from their *train* splits.
Measured there (top-1 on 66 validation queries): ce_weight 1 vs 0: 0.82 vs 0.58 (with 32
anchors per class); 32 vs 1 anchors per class: 0.58 vs 0.50 (ce_weight 0); feature noise 0.1:
0.32; 500 instead of 1500 steps: 0.58; class-subset augmentation 0.25 / 0.5: 0.74 / 0.73. The
defaults are the best of these.

Protocol (nothing is tuned on the evaluation queries):
- Every distinct task of the zoo is a task. 4-way tasks are split into ``folds`` folds; in fold f
  the proxy trains on the models of every task outside fold f (query episodes from the tasks'
  *train* splits); fold f's models are vectorized after training and added to the index.
- Queries: ``queries_per_task`` draws of ``query_shots`` images per class from each task's
  *held-out* split. The index holds every zoo model; a retrieved model is correct when it was
  trained on the query's task (same source domain and class set). ``seen`` = queries of training
  tasks, ``heldout`` = queries of fold-f tasks; each task is held out in exactly one fold.
- Metrics: top-1, top-5 (a correct model among the first 5), MRR (1 / rank of the first correct
  model), averaged over queries; also by how many classes the query's task shares with its
  closest other task of the zoo (same base dataset, any domain).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import numpy as np

from experiments.common import add_config_arguments, add_run_arguments, config_from_args, pyplot
from know2vec_jax import config as config_lib
from know2vec_jax import pool as pool_lib
from know2vec_jax.baselines import run_baseline
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.config import Presets, require, require_known
from know2vec_jax.data import Task, few_shot, load_source
from know2vec_jax.metrics import first_correct_rank, retrieval_metrics
from know2vec_jax.pipeline import Cache
from know2vec_jax.pool import PoolConfig
from know2vec_jax.proxy import Proxy, ProxyConfig, proxy_preset, zoo_metadata
from know2vec_jax.zoo import load_zoo

# Each variant is a set of overrides of the proxy config.
VARIANTS = {
    "know2vec-attention-shared": (),
    "know2vec-attention-separate": ("vectorizer.shared=false",),
    "know2vec-lstm": ("vectorizer.variant=lstm", "vectorizer.shared=false"),
}
DEFAULT_VARIANT = "know2vec-attention-shared"
# The default variant's proxy ranking by its aligned vectors alone (no class matching).
VECTORS_ONLY = f"{DEFAULT_VARIANT} (vectors only)"
ABLATION = ("knowledge.search_steps=0",)  # T = 0: no boundary search

EXPECTED_RUNTIME = (
    "full 30 min on the 2-core CPU from a built demo zoo and an empty cache (measured 1,796 s: "
    "knowledge 158 s, 12 aligner trainings of 40-180 s, lstm the slowest, LEEP batched); 20 min "
    "(1,201 s) with the knowledge cached; --quick 312 s on a fresh clone (162 s cached). "
    "Current defaults (contrastive phi): --quick 919 s on a fresh clone of a 2-core AMD EPYC that "
    "ran the zoo build 2.7x slower than the measurements above; the default variant alone on 3 "
    "folds 826 s there with --quick's knowledge and phi cached. The main job (make demo) runs "
    "--quick on the starter zoo (180 of the demo's models): 559-606 s on fresh clones of the 2-core "
    "AMD EPYC (knowledge 20-21 s, phi 290-307 s, aligner 86-93 s; the same figures)")
EXPECTED_NUMBERS = (
    "468 queries per fold (132 held out per fold). default know2vec-attention-shared: seen top-1 "
    "0.975, held-out top-1 0.899, top-5 0.997; vectors only (class matching off) held-out 0.545 / "
    "0.856; separate encoders 0.869, lstm 0.889, T=0 0.876; untrained anchor matching 0.364; LEEP "
    "0.376 (top-5 0.985); random 0.008. --quick on the demo zoo (fold 0): held-out 0.902 / 1.000, "
    "seen 0.961. Those were measured before the current defaults; with them "
    "(results/nnr-default.json, --set variants=know2vec-attention-shared --set "
    "ablate_search_steps=false): default held-out 0.876 / 0.995, seen 0.975; vectors only 0.460 / "
    "0.848; anchor matching 0.361; LEEP 0.348; --quick on the demo zoo (fold 0): held-out 0.902 / "
    "1.000, seen 0.973, vectors only 0.455 / 0.886. The main job, --quick on the starter zoo "
    "(results/nnr-quick.json): held-out 0.845 / 1.000, seen 0.966, vectors only 0.333 / 0.786, "
    "LEEP 0.310, anchor matching 0.286, random 0.000")


@dataclasses.dataclass(frozen=True)
class NNRConfig:
  """The NNR experiment.

  Attributes:
    proxy: the proxy every variant starts from (its overrides in :data:`VARIANTS`).
    folds: how many folds the 4-way tasks are split into.
    evaluate_folds: how many of them are trained and evaluated (the first ones).
    queries_per_task, query_shots: evaluation queries per task and images per class in each.
    variants: the Know2Vec variants to train.
    ablate_search_steps: also train the default variant with T = 0.
    leep: score LEEP (forwards every query through every zoo model).
    seed: folds and queries.
  """
  proxy: ProxyConfig = ProxyConfig()
  folds: int = 3
  evaluate_folds: int = 3
  queries_per_task: int = 3
  query_shots: int = 5
  variants: tuple[str, ...] = tuple(VARIANTS)
  ablate_search_steps: bool = True
  leep: bool = True
  seed: int = 0

  def __post_init__(self):
    require(self.folds >= 2, f"folds must be >= 2, got {self.folds}")
    require(1 <= self.evaluate_folds <= self.folds,
            f"evaluate_folds must be in 1..folds={self.folds}, got {self.evaluate_folds}")
    require(self.queries_per_task >= 1 and self.query_shots >= 1,
            "queries_per_task and query_shots must be >= 1")
    require_known(self.variants, VARIANTS, "variant(s)")


PRESETS: Presets[NNRConfig] = Presets("nnr")


@PRESETS.register("full")
def _full() -> NNRConfig:
  """3 folds, every variant, the T = 0 ablation and LEEP (the README table)."""
  return NNRConfig(proxy=proxy_preset("demo"))


@PRESETS.register("quick")
def _quick() -> NNRConfig:
  """The main job: the default variant on one of the 3 folds, with the baselines."""
  return NNRConfig(proxy=proxy_preset("demo"), evaluate_folds=1,
                   variants=(DEFAULT_VARIANT,), ablate_search_steps=False)


@PRESETS.register("tiny")
def _tiny() -> NNRConfig:
  """The tiny zoo and tiny proxy (tests): 3 folds over its three 4-way tasks."""
  return NNRConfig(proxy=proxy_preset("tiny"), queries_per_task=2, query_shots=3,
                   variants=(DEFAULT_VARIANT,), ablate_search_steps=False)


# ---- the protocol's pieces (pure, tested) --------------------------------------------------------

def zoo_tasks_sorted(zoo) -> list[Task]:
  """Every distinct task of the zoo, by task id."""
  return sorted({r.task for r in zoo.records.values()}, key=lambda t: t.task_id)


def fold_assignment(tasks: list[Task], folds: int, seed: int) -> dict[Task, int]:
  """The fold of every 4-way task (others are always training tasks): a seeded permutation of
  the 4-way tasks dealt round-robin."""
  four = [i for i, t in enumerate(tasks) if t.k == 4]
  return {tasks[int(i)]: j % folds
          for j, i in enumerate(np.random.default_rng(seed + 1).permutation(four))}


def fold_models(zoo, fold_of: dict[Task, int], fold: int) -> tuple[list[str], list[str]]:
  """(training model ids, held-out model ids) of a fold: a model is held out when its task is."""
  train, held = [], []
  for mid, r in zoo.records.items():
    (held if fold_of.get(r.task, -1) == fold else train).append(mid)
  return train, held


def closest_overlap(tasks: list[Task]) -> dict[Task, int]:
  """For each task: the most classes it shares with another task of the same base dataset and K.

  4 for a 4-way task means another task has the same class set in another domain.
  """
  out = {}
  for t in tasks:
    base = t.source.split("+")[0]
    out[t] = max((len(set(t.classes) & set(o.classes)) for o in tasks
                  if o != t and o.k == t.k and o.source.split("+")[0] == base), default=0)
  return out


def error_kinds(top1: dict, query_task: list[Task], zoo) -> dict:
  """What the first model retrieved for each held-out query was trained on, as fractions of the
  held-out queries: a diagnosis of what a method confuses."""
  kinds: dict[str, int] = {}
  for qi, mid in top1.items():
    t, o = query_task[qi], zoo.records[mid].task
    if o == t:
      kind = "correct"
    elif o.source.split("+")[0] != t.source.split("+")[0]:
      kind = "other dataset"
    elif o.k != t.k:
      kind = f"{o.k}-way model, {'same' if o.source == t.source else 'other'} domain"
    elif set(o.classes) == set(t.classes):
      kind = "same classes, other domain"
    else:
      shared = len(set(o.classes) & set(t.classes))
      kind = f"{shared} classes shared, {'same' if o.source == t.source else 'other'} domain"
    kinds[kind] = kinds.get(kind, 0) + 1
  n = max(1, len(top1))
  return {k: round(v / n, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def make_queries(tasks: list[Task], per_task: int, shots: int, seed: int, split: str = "test",
                 pool: PoolConfig | None = None, pool_seed: int = 0):
  """(task index, images, labels) of every evaluation query: ``shots`` per class, ``split``,
  never an image of the probe pool ``pool`` (with seed ``pool_seed``) would hold: the pool is
  in the test splits by default, and a query shares no image with it
  (:func:`know2vec_jax.pool.config_rows`)."""
  out = []
  held: dict = {}
  for i, t in enumerate(tasks):
    data = load_source(t.source)
    if pool is not None and t.source not in held:
      held[t.source] = pool_lib.config_rows(pool, t.source, split, pool_seed)
    for q in range(per_task):
      x, y = few_shot(data, t, shots, seed=seed * 100003 + i * 31 + q, split=split,
                      exclude=held.get(t.source))
      out.append((i, x, y))
  return out


def leep_matrix(groups, queries, ids: list[str]) -> tuple[np.ndarray, list[int], float]:
  """LEEP scores [Q, M] (columns in ``ids`` order), the zoo forwards each query cost, and seconds
  per query.

  Every query's images go through every model once; the queries are batched into one call per
  black-box group (larger batches run faster; the forwards are the same), and the forwards the
  groups counted are checked to be exactly each query's images times the number of models.
  """
  col = {m: i for i, m in enumerate(ids)}
  sizes = [len(y) for _, _, y in queries]
  starts = np.concatenate([[0], np.cumsum(sizes)])
  x_all = np.concatenate([x for _, x, _ in queries])
  t = time.perf_counter()
  before = sum(int(g.queries.sum()) for g in groups)
  logits = [g(x_all) for g in groups]
  counted = sum(int(g.queries.sum()) for g in groups) - before
  forwards = [sum(g.num_models for g in groups) * n for n in sizes]
  if counted != sum(forwards):
    raise RuntimeError(f"the black boxes counted {counted} forwards, expected {sum(forwards)}")
  scores = np.zeros((len(queries), len(ids)), np.float32)
  for qi, (_, _, y) in enumerate(queries):
    for g, lg in zip(groups, logits):
      r = run_baseline("leep", logits=lg[:, starts[qi]:starts[qi + 1]], labels=y,
                       num_target_classes=int(y.max()) + 1)
      scores[qi, [col[m] for m in g.model_ids]] = r.scores
  return scores, forwards, (time.perf_counter() - t) / max(len(queries), 1)


# ---- the experiment ------------------------------------------------------------------------------

def run(cfg: NNRConfig, zoo_dir: str, cache_dir: str, out: str | None,
        progress: bool = True) -> dict:
  """Runs the experiment; writes ``out`` (JSON) and a figure beside it when ``out`` is given."""
  t_start = time.perf_counter()
  zoo = load_zoo(zoo_dir)
  cache = Cache(cache_dir)
  tasks = zoo_tasks_sorted(zoo)
  fold_of = fold_assignment(tasks, cfg.folds, cfg.seed)
  overlap = closest_overlap(tasks)
  queries = make_queries(tasks, cfg.queries_per_task, cfg.query_shots, cfg.seed,
                         pool=cfg.proxy.pool, pool_seed=cfg.proxy.seed)
  q_task = np.asarray([i for i, _, _ in queries])
  q_fold = np.asarray([fold_of.get(tasks[i], -1) for i in q_task])
  meta = zoo_metadata(zoo)
  results = {"queries": {}, "costs": {}, "top1": {}}
  ids: list[str] = []

  def record(method, fold, order_ids, scores):
    """scores [Q, M] over ``order_ids`` -> per-query ranks of the first correct model."""
    m_task = np.asarray([tasks.index(zoo.records[m].task) for m in order_ids])
    correct = m_task[None, :] == q_task[:, None]
    ranks = first_correct_rank(scores, correct)
    best = np.argmax(scores, axis=1)
    store = results["queries"].setdefault(method, {"heldout": {}, "seen": {}})
    top = results["top1"].setdefault(method, {})
    for qi in range(len(queries)):
      split = "heldout" if q_fold[qi] == fold else "seen"
      store[split].setdefault(int(qi), []).append(int(ranks[qi]))
      if split == "heldout":
        top[int(qi)] = order_ids[int(best[qi])]

  example = None
  knowledge_s = 0.0
  reference = None  # the default variant's fold-0 proxy and index: the baselines read its grids
  trainings = [(n, VARIANTS[n]) for n in cfg.variants]
  if cfg.ablate_search_steps:
    trainings.append((f"{DEFAULT_VARIANT} (T=0)", VARIANTS[DEFAULT_VARIANT] + ABLATION))
  for name, overrides in trainings:
    pcfg = config_lib.override(cfg.proxy, overrides)
    for fold in range(cfg.evaluate_folds):
      train_ids, held_ids = fold_models(zoo, fold_of, fold)
      proxy = Proxy.train(zoo, pcfg, model_ids=train_ids, cache=cache, progress=progress)
      knowledge_s += proxy.info["seconds"]["knowledge"]
      # The held-out models join after training, vectorized by the trained model vectorizer.
      groups = groups_from_zoo(zoo, strategy=pcfg.strategy)
      t = time.perf_counter()
      index = proxy.build_index(groups, meta, cache=cache, progress=progress)
      index_s = time.perf_counter() - t
      ids = index.ids
      t = time.perf_counter()
      found = proxy.search(index, [(x, y) for _, x, y in queries], k=len(index))
      per_query_s = (time.perf_counter() - t) / len(queries)
      scores, got = found.scores, found.ids
      pos = {m: i for i, m in enumerate(ids)}

      def dense(found):
        full = np.full((len(queries), len(ids)), -np.inf, np.float32)
        for qi in range(len(queries)):
          full[qi, [pos[m] for m in found.ids[qi]]] = found.scores[qi]
        return full
      record(name, fold, ids, dense(found))
      if name == DEFAULT_VARIANT:  # the same proxy, ranking by its aligned vectors alone
        record(VECTORS_ONLY, fold, ids, dense(proxy.with_match(enabled="false").search(
            index, [(x, y) for _, x, y in queries], k=len(index))))
      c = results["costs"].setdefault(name, {"train_s": [], "index_s": [], "query_s": [],
                                             "forwards_per_query": 0})
      c["train_s"].append(proxy.info["seconds"]["total"])
      c["index_s"].append(index_s)
      c["query_s"].append(per_query_s)
      if name == DEFAULT_VARIANT and fold == 0:
        reference = (proxy, index)
        # One held-out query drawn at random (seeded), shown end to end.
        held_q = np.flatnonzero(q_fold == 0)
        qi = int(np.random.default_rng(cfg.seed + 5).choice(held_q))
        t_ = tasks[q_task[qi]]
        example = {"method": name, "query": qi, "query_task": t_.task_id,
                   "query_classes": [load_source(t_.source).class_names[c] for c in t_.classes],
                   "ranked": [{"model_id": m, "score": float(s), "arch": meta[m]["arch"],
                               "task": meta[m]["task"], "correct": zoo.records[m].task == t_}
                              for m, s in zip(got[qi][:5], scores[qi][:5])]}

  # Baselines, through the registry; query-time scores do not depend on the fold.
  if reference is None:  # the default variant was not trained: a proxy for phi and knowledge
    reference = (Proxy.train(zoo, cfg.proxy, model_ids=fold_models(zoo, fold_of, 0)[0],
                             cache=cache, progress=progress), None)
  proxy, _ = reference
  groups = groups_from_zoo(zoo, strategy=cfg.proxy.strategy)
  ids, m_grid, m_mask = proxy.model_grids(groups, cache=cache)
  qg = np.stack([proxy.query_grid(x, y)[0] for _, x, y in queries])
  qm = np.stack([proxy.query_grid(x, y)[1] for _, x, y in queries])
  anchor = run_baseline("anchor-matching", query_grid=qg, query_mask=qm, model_grids=m_grid,
                        model_masks=m_mask)
  rand = run_baseline("random", key=jax.random.key(cfg.seed + 2),
                      num_models=len(queries) * len(ids)).scores.reshape(len(queries), len(ids))
  results["costs"]["anchor-matching (untrained)"] = {"forwards_per_query": 0}
  if cfg.leep:
    groups = groups_from_zoo(zoo, strategy=cfg.proxy.strategy)
    leep, forwards, sec = leep_matrix(groups, queries, ids)
    results["costs"]["leep"] = {"forwards_per_query": float(np.mean(forwards)),
                                "seconds_per_query": sec}
  for fold in range(cfg.evaluate_folds):
    record("random", fold, ids, rand)
    record("anchor-matching (untrained)", fold, ids, anchor.scores)
    if cfg.leep:
      record("leep", fold, ids, leep)

  summary, by_overlap = {}, {}
  for method, splits in results["queries"].items():
    summary[method] = {}
    by_overlap[method] = {}
    for split, per_q in splits.items():
      ranks = [r for rs in per_q.values() for r in rs]
      if not ranks:
        continue
      summary[method][split] = retrieval_metrics(np.asarray(ranks))
      groups_ = {}
      for qi, rs in per_q.items():
        groups_.setdefault(overlap[tasks[q_task[qi]]], []).extend(rs)
      by_overlap[method][split] = {str(o): retrieval_metrics(np.asarray(r)) | {"n": len(r)}
                                   for o, r in sorted(groups_.items())}
  res = {
      "summary": summary, "by_closest_overlap": by_overlap,
      "heldout_top1_errors": {m: error_kinds(top, [tasks[t] for t in q_task], zoo)
                              for m, top in results["top1"].items()},
      "ranks": {m: {split: {str(q): r for q, r in per_q.items()} for split, per_q in sp.items()}
                for m, sp in results["queries"].items()},
      "query_tasks": [tasks[t].task_id for t in q_task],
      "config": config_lib.to_dict(cfg),
      "num_models": len(ids), "num_tasks": len(tasks), "num_queries": len(queries),
      "heldout_tasks_per_fold": [sum(1 for v in fold_of.values() if v == f)
                                 for f in range(cfg.folds)],
      "knowledge_queries_per_model": proxy.info["knowledge_queries_per_model"],
      "costs": results["costs"] | {"knowledge_s": knowledge_s},
      "example": example,
      "seconds": time.perf_counter() - t_start, "backend": jax.default_backend(),
  }
  if out is not None:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    plot(res, str(path.with_suffix(".png")))
  return res


def validate(cfg: NNRConfig, zoo_dir: str, cache_dir: str, progress: bool = True) -> dict:
  """Model selection without the evaluation queries.

  Inside fold 0's *training* tasks, a quarter of the 4-way tasks become validation tasks: the
  proxy trains on the rest, and validation queries are drawn from the validation tasks' *train*
  splits. Fold 0's evaluation tasks and their models are left out entirely.
  """
  zoo = load_zoo(zoo_dir)
  cache = Cache(cache_dir)
  tasks = zoo_tasks_sorted(zoo)
  fold_of = fold_assignment(tasks, cfg.folds, cfg.seed)
  train_pool = [t for t in tasks if fold_of.get(t, -1) != 0]
  four = [t for t in train_pool if t.k == 4]
  order = np.random.default_rng(cfg.seed + 3).permutation(len(four))
  val = [four[int(i)] for i in order[:len(four) // 4]]
  inner_ids = [m for m, r in zoo.records.items() if r.task in train_pool and r.task not in val]
  keep_ids = [m for m, r in zoo.records.items() if r.task in train_pool]
  queries = make_queries(val, 3, cfg.query_shots, cfg.seed, split="train")
  out = {}
  for name in cfg.variants:
    pcfg = config_lib.override(cfg.proxy, VARIANTS[name])
    proxy = Proxy.train(zoo, pcfg, model_ids=inner_ids, cache=cache, progress=progress)
    index = proxy.build_index(groups_from_zoo(zoo, model_ids=keep_ids), cache=cache)
    found = proxy.search(index, [(x, y) for _, x, y in queries], k=len(index))
    correct = np.asarray([[zoo.records[m].task == val[i] for m in found.ids[qi]]
                          for qi, (i, _, _) in enumerate(queries)])
    out[name] = retrieval_metrics(first_correct_rank(found.scores, correct))
    print(name, out[name], flush=True)
  return {"validation": out, "config": config_lib.to_dict(cfg)}


def plot(out: dict, path: str) -> None:
  """Bar chart: top-1 and top-5 per method on seen and held-out tasks."""
  plt = pyplot()
  if plt is None:
    return
  methods = list(out["summary"])
  fig, ax = plt.subplots(figsize=(10, 4.5))
  bars = [("seen", "top1"), ("heldout", "top1"), ("heldout", "top5")]
  width = 0.8 / len(bars)
  for j, (split, metric) in enumerate(bars):
    vals = [out["summary"][m].get(split, {}).get(metric, 0.0) for m in methods]
    pos = np.arange(len(methods)) + j * width - 0.4 + width / 2
    ax.bar(pos, vals, width, label=f"{split} {metric}")
    for x, v in zip(pos, vals):
      ax.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=6)
  ax.axhline(0.75, color="red", lw=0.8, ls="--", label="held-out top-1 target")
  ax.set_xticks(np.arange(len(methods)), methods, rotation=25, ha="right", fontsize=8)
  ax.set_ylim(0, 1.08)
  ax.set_ylabel("fraction of queries")
  ax.set_title(f"NNR on the demo zoo ({out['num_models']} models, {out['num_queries']} queries)")
  ax.legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(out: dict) -> str:
  lines = ["| method | seen top-1 | seen top-5 | seen MRR | held-out top-1 | held-out top-5 | "
           "held-out MRR |", "|---|---|---|---|---|---|---|"]
  for method, s in out["summary"].items():
    cells = []
    for split in ("seen", "heldout"):
      for m in ("top1", "top5", "mrr"):
        cells.append(f"{s[split][m]:.3f}" if split in s else "-")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_config_arguments(p, PRESETS, "full")
  add_run_arguments(p, "results JSON (default experiments/results/nnr.json, nnr-quick.json with "
                    "--quick)", "cache of derived artifacts (knowledge, backbone, episodes)",
                    quick="the 'quick' preset (the main job)")
  p.add_argument("--validate", action="store_true",
                 help="model selection on validation tasks carved from fold 0's training tasks")
  args = p.parse_args(argv)
  if args.quick:
    args.preset = "quick"
  cfg = config_from_args(p, PRESETS, args)
  if args.validate:
    print(json.dumps(validate(cfg, args.zoo, args.cache, not args.quiet), indent=1))
    return
  out_path = args.out or ("experiments/results/nnr-quick.json" if args.preset == "quick"
                          else "experiments/results/nnr.json")
  out = run(cfg, args.zoo, args.cache, out_path, progress=not args.quiet)
  print(format_table(out))
  ex = out.get("example")
  if ex:
    print(f"\nA held-out query drawn at random: {ex['query_task']} "
          f"({', '.join(ex['query_classes'])}); top models by {ex['method']}:")
    for r, row in enumerate(ex["ranked"], 1):
      print(f"  {r}. {row['model_id']:44s} score {row['score']:.3f}"
            f"{'   <- trained on this task' if row['correct'] else ''}")
  print(f"\n{out['num_models']} models, {out['num_tasks']} tasks, {out['num_queries']} queries, "
        f"{cfg.evaluate_folds} of {cfg.folds} folds; {out['seconds']:.0f} s")


if __name__ == "__main__":
  main()
