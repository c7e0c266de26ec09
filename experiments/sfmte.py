"""SF-MTE (source-free model transferability estimation) on a structured subset of the demo zoo.

Command:   python -m experiments.sfmte                 (ground truth, baselines, Know2Vec, figure)
           python -m experiments.sfmte --ground-truth  (only compute and cache the ground truth)
           python -m experiments.sfmte --validate [--set KEY=VALUE]   (model selection)
           python -m experiments.sfmte --compare-train-labels   (linear vs full labels, training
                                                                 targets only)
Hardware:  2-core x86-64 CPU, 24 GiB, no GPU (measured there).
Runtime:   EXPECTED_RUNTIME below.
Expected:  EXPECTED_NUMBERS below (experiments/results/sfmte.json, figure sfmte_tau.png).
           ``--preset linear-labels`` trains on cheap linear-probe labels of 48 targets instead.

Everything runs through the product: Know2Vec is ``Proxy.train(zoo, cfg, model_ids=<the subset>,
transfer=TransferLabels(...))`` (the ``"transfer"`` objective), the zoo's vectors come from
``Proxy.build_index`` (the knowledge stored at training: no second probe), a query is
``Proxy.embed_query`` and the accuracy head is ``Proxy.predict_accuracy``; every baseline is scored
by :mod:`know2vec_jax.baselines`, on logits from the zoo's black boxes (whose counters give the
forwards per query) and, for the white-box ones, the same models' penultimate features.

Protocol (nothing is tuned on the evaluation targets):
- Zoo: :func:`sfmte_models`, 114 models of the demo zoo that keep its variety: per base dataset six
  plain 4-way tasks and one task in each transformed domain (mlp, cnn_s, cnn_l each), two 2-way
  tasks (mlp, cnn_s) and every 10-way model, plus two deliberately weak 4-way models.
- Evaluation targets (:data:`EVAL_TARGETS`): tasks no zoo model and no part of the proxy was
  trained on, drawn from the sources' *test* splits (images the backbone never saw): fine-grained
  class sets, domains no zoo model saw (flipped, low-contrast, combined transforms) and K from 2
  to 10. Their ground truth is the full fine-tune (``transfer.FinetuneConfig()``: new head, 30
  Adam steps, 50 shots per class, 6 runs resampling seed and shots together, up to 300 test images
  per class). Targets whose mean ground truth exceeds 0.95 or whose spread across the zoo is
  <= 0.015 are dropped as saturated and listed. (The anchor-matching baseline, new here, reads
  the proxy's knowledge grids: no zoo forward at query time either.)
- Training targets (:func:`training_targets`): 24 random tasks from the sources' *train* splits in
  the zoo's own domains, disjoint from the evaluation targets; their label is the same full
  fine-tune with fewer runs and test images (3 runs, 100 per class). The cheaper frozen-body linear
  probe (``--preset linear-labels``) ranks the zoo unlike the full fine-tune: measured on the 24
  training targets alone, weighted tau between the two labels is 0.41 on average, and the
  query-blind prior built from the other targets' linear labels ranks a target's full fine-tune
  at 0.36 against 0.71 for one built from full labels (``--compare-train-labels``).
- Query: one draw of 50 shots per class of the target (run 0's training sample). Every method
  sees those same images. Know2Vec needs no zoo forward pass at query time; LEEP, NCE, N-LEEP,
  LogME and H-score forward the query through every zoo model.
- Scores: weighted Kendall's tau against the mean fine-tune accuracy (== scipy's weightedtau),
  Pearson, Spearman, top-1 regret; the per-target noise ceiling is the split-half weighted tau of
  the ground truth's runs.
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
from know2vec_jax.align import AlignConfig
from know2vec_jax.baselines import BASELINES, run_baseline
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.config import Presets, require, require_known
from know2vec_jax.data import Task
from know2vec_jax.metrics import ranking_report, weighted_tau
from know2vec_jax.pipeline import Cache, LabelledSet, TransferLabels, draw_episodes
from know2vec_jax.proxy import Proxy, ProxyConfig
from know2vec_jax.transfer import (FinetuneConfig, TransferTarget, ground_truth, noise_ceiling,
                                   run_sample, target_data)
from know2vec_jax.zoo import load_zoo

# Each variant is a set of overrides of the proxy config.
VARIANTS = {
    "know2vec-attention-shared": (),
    "know2vec-lstm": ("vectorizer.variant=lstm", "vectorizer.shared=false"),
}
DEFAULT_VARIANT = "know2vec-attention-shared"

EXPECTED_RUNTIME = (
    "ground truth once, then cached: 46 min from an empty cache in the latest run (32 min on a "
    "less loaded machine: evaluation targets 15.3 min, training targets 16.4 min); the rest "
    "9.4 min (two proxy trainings of 2-3 min each, the baselines' zoo forwards and white-box "
    "SVDs most of the rest)")
EXPECTED_NUMBERS = (
    "14 targets, none saturated, 114 models. Mean weighted tau: noise ceiling 0.80; query-blind "
    "prior (other evaluation targets) 0.77; Know2Vec lstm ranked by its accuracy head 0.75, "
    "attention-shared by its accuracy head 0.74, lstm 0.72, attention-shared (q.m) 0.65; prior "
    "from the training targets 0.75; H-score with shrinkage on features (white-box) 0.70, H-score "
    "on features 0.62, LogME on features 0.48; NCE 0.36, LEEP 0.31; anchor matching 0.10; random "
    "0.01. Accuracy head mean absolute error 0.22 (attention) and 0.18 (lstm). Baselines forward "
    "25,650 images per query (114 models x 225 images on average)")

# Fashion-MNIST: 0 t-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt,
# 7 sneaker, 8 bag, 9 ankle boot.
EVAL_TARGETS = (
    TransferTarget("fashion-tops", Task("fashion_mnist", (0, 2, 4, 6)), kind="fine-grained"),
    TransferTarget("fashion-footwear", Task("fashion_mnist", (5, 7, 9)), kind="fine-grained"),
    TransferTarget("fashion-upper5", Task("fashion_mnist", (0, 2, 3, 4, 6)),
                   kind="fine-grained"),
    TransferTarget("fashion-shirt-tshirt", Task("fashion_mnist", (0, 6)), kind="fine-grained"),
    TransferTarget("fashion-pullover-coat", Task("fashion_mnist", (2, 4)), kind="fine-grained"),
    TransferTarget("fashion-flip-tops", Task("fashion_mnist+flip", (0, 2, 4, 6)),
                   kind="domain-shift"),
    TransferTarget("fashion-flip-10", Task("fashion_mnist+flip", tuple(range(10))),
                   kind="domain-shift"),
    TransferTarget("fashion-lowcontrast-10", Task("fashion_mnist+lowcontrast", tuple(range(10))),
                   kind="domain-shift"),
    TransferTarget("fashion-invert-flip-mixed", Task("fashion_mnist+invert+flip", (1, 3, 5, 8)),
                   kind="domain-shift"),
    TransferTarget("fashion-blur-lowcontrast-tops",
                   Task("fashion_mnist+blur+lowcontrast", (0, 2, 6)), kind="domain-shift"),
    TransferTarget("mnist-flip-358", Task("mnist5k+flip", (3, 5, 8)), kind="domain-shift"),
    TransferTarget("mnist-lowcontrast-5", Task("mnist5k+lowcontrast", (1, 4, 7, 9, 2)),
                   kind="domain-shift"),
    TransferTarget("mnist-rot90-invert-4", Task("mnist5k+rot90+invert", (2, 3, 5, 6)),
                   kind="domain-shift"),
    TransferTarget("mnist-4-7-9-1", Task("mnist5k", (1, 4, 7, 9)), kind="new class set"),
)


def sfmte_models(zoo) -> list[str]:
  """The structured 114-model subset of the demo zoo (see the module docstring)."""
  recs = list(zoo.records.values())
  chosen: list[str] = []
  for base in ("fashion_mnist", "mnist5k", "digits"):
    rb = [r for r in recs if r.base_source == base]
    plain4 = list(dict.fromkeys(r.task for r in rb if r.k == 4 and r.domain == "plain"))[:6]
    dom4 = [next(r.task for r in rb if r.k == 4 and r.domain == d)
            for d in ("invert", "rot90", "blur")]
    two = list(dict.fromkeys(r.task for r in rb if r.k == 2))[:2]
    keep_tasks = set(plain4 + dom4 + two)
    sel = [r for r in rb if r.task in keep_tasks or r.k == 10]
    # Two deliberately weak models beyond those the chosen tasks happen to contain.
    for role in ("label_noise", "short"):
      extra = [r for r in rb if r.role == role and r not in sel]
      sel += extra[:1]
    chosen += [r.model_id for r in sel]
  return chosen


def training_targets(zoo, count: int = 48, seed: int = 0,
                     exclude: tuple[TransferTarget, ...] = EVAL_TARGETS) -> list[TransferTarget]:
  """Random tasks for the aligner, from *train* splits, in the zoo's own domains.

  Disjoint from ``exclude`` (no evaluation target's source and class set) and from the domains only
  evaluation targets use. K is drawn from {2, 3, 4, 5, 10}; base datasets and domains in turn.
  """
  rng = np.random.default_rng(seed)
  banned = {(t.task.source, tuple(sorted(t.task.classes))) for t in exclude}
  out, seen = [], set()
  bases = ("fashion_mnist", "mnist5k", "digits")
  domains = ("", "+invert", "+rot90", "+blur")
  i = 0
  while len(out) < count:
    base, dom = bases[i % 3], domains[(i // 3) % 4]
    i += 1
    k = int(rng.choice([2, 3, 4, 4, 5, 10]))
    classes = tuple(sorted(rng.choice(10, size=k, replace=False).tolist()))
    key = (base + dom, classes)
    if key in banned or key in seen:
      continue
    seen.add(key)
    out.append(TransferTarget(f"train-{len(out):02d}-{base}{dom}-{'-'.join(map(str, classes))}",
                              Task(base + dom, classes), split="train", kind="training"))
  return out


# Training-target labels. "linear" (frozen body + new head, 6 runs) is cheap; "full" is the
# evaluation protocol itself with fewer runs and test images (3 runs, 100 per class), so the
# aligner learns the quantity it is judged on.
TRAIN_LABELS = {
    "linear": FinetuneConfig(mode="linear", steps=100),
    "full": FinetuneConfig(runs=3, test_per_class=100),
}


def _sfmte_proxy() -> ProxyConfig:
  # The transfer objective on 8 query episodes of 50 shots per class (the size of the user's
  # query here) per training target; 1,000 steps of batch 16.
  return ProxyConfig(objective="transfer", episodes=8, shots=50,
                     align=AlignConfig(steps=1000, batch_size=16, warmup_steps=50))


@dataclasses.dataclass(frozen=True)
class SFMTEConfig:
  """The SF-MTE experiment.

  Attributes:
    proxy: the proxy every variant starts from (the ``"transfer"`` objective; its overrides in
      :data:`VARIANTS`).
    eval_gt, train_gt: how the evaluation and training targets' fine-tune accuracy is measured.
    train_targets: how many training targets.
    variants: the Know2Vec variants to train.
    baselines: the registry baselines to score.
    seed: training targets, random scores.
  """
  proxy: ProxyConfig = _sfmte_proxy()
  eval_gt: FinetuneConfig = FinetuneConfig()
  train_gt: FinetuneConfig = TRAIN_LABELS["full"]
  train_targets: int = 24
  variants: tuple[str, ...] = tuple(VARIANTS)
  baselines: tuple[str, ...] = tuple(BASELINES)
  seed: int = 0

  def __post_init__(self):
    # --validate holds out a quarter of the training targets; the aligner needs several.
    require(self.train_targets >= 4, f"train_targets must be at least 4, got "
            f"{self.train_targets}")
    require_known(self.variants, VARIANTS, "variant(s)")
    require_known(self.baselines, BASELINES, "baseline(s)")


PRESETS: Presets[SFMTEConfig] = Presets("sfmte")


@PRESETS.register("full")
def _full() -> SFMTEConfig:
  """Full fine-tune labels on 24 training targets (the README table)."""
  return SFMTEConfig()


@PRESETS.register("linear-labels")
def _linear() -> SFMTEConfig:
  """Cheap linear-probe labels on 48 training targets."""
  return SFMTEConfig(train_gt=TRAIN_LABELS["linear"], train_targets=48)


def compute_ground_truth(cfg: SFMTEConfig, zoo, zoo_dir: str, cache_dir: str,
                         progress: bool = True) -> dict:
  """Ground truth of the evaluation targets and the training targets (cached on disk)."""
  ids = sfmte_models(zoo)
  where = pathlib.Path(cache_dir) / "ground-truth"
  t = time.perf_counter()
  ev = ground_truth(zoo, zoo_dir, ids, EVAL_TARGETS, cfg.eval_gt, cache_dir=where,
                    progress=progress)
  t_eval = time.perf_counter() - t
  t = time.perf_counter()
  train = training_targets(zoo, cfg.train_targets, cfg.seed)
  tr = ground_truth(zoo, zoo_dir, ids, train, cfg.train_gt, cache_dir=where, progress=progress)
  t_train = time.perf_counter() - t
  return {"ids": ids, "eval": ev, "train": tr, "train_targets": train,
          "seconds": (t_eval, t_train)}


def target_set(target: TransferTarget, gt: FinetuneConfig) -> LabelledSet:
  """A training target's shot pool (what its ground-truth runs draw from) as a labelled set."""
  td = target_data(target, gt.shots, gt.test_per_class)
  index = np.concatenate(td.pool)
  return LabelledSet(f"{target.name}:{target.task.task_id}:{target.split}:"
                     f"{gt.shots}x{gt.test_per_class}", td.images, index, td.labels[index],
                     target.k)


def transfer_labels(cfg: SFMTEConfig, gt: dict, targets=None) -> TransferLabels:
  """The transfer objective's supervision: training targets' shot pools and mean accuracies."""
  targets = gt["train_targets"] if targets is None else targets
  return TransferLabels([target_set(t, cfg.train_gt) for t in targets], list(gt["ids"]),
                        np.stack([gt["train"][t.name].mean(0) for t in targets]))


def other_targets(acc: np.ndarray, i: int) -> np.ndarray:
  """The rows of ``acc`` [T, M] other than target ``i``: all a query-blind prior may read."""
  return np.delete(np.asarray(acc), i, 0)


def loo_prior(acc: np.ndarray, i: int) -> np.ndarray:
  """The query-blind prior for target ``i`` from the *other* rows of ``acc`` [T, M] only."""
  return run_baseline("prior", ground_truth_other_targets=other_targets(acc, i)).scores


def compare_train_labels(cfg: SFMTEConfig, zoo_dir: str, cache_dir: str,
                         progress: bool = True) -> dict:
  """Training targets only: does the cheap linear-probe label rank the zoo like the full fine-tune?

  Computes (or loads) both labels on the first ``cfg.train_targets`` training targets and reports
  the weighted tau between them per target, and how well a leave-one-out prior built from each kind
  of label ranks a target's full fine-tune. No evaluation target is read.
  """
  zoo = load_zoo(zoo_dir)
  ids = sfmte_models(zoo)
  targets = training_targets(zoo, cfg.train_targets, cfg.seed)
  acc = {}
  for kind in ("linear", "full"):
    gt = ground_truth(zoo, zoo_dir, ids, targets, TRAIN_LABELS[kind],
                      cache_dir=pathlib.Path(cache_dir) / "ground-truth", progress=progress)
    acc[kind] = np.stack([gt[t.name].mean(0) for t in targets])
  full, lin = acc["full"], acc["linear"]
  n = len(targets)
  taus = [weighted_tau(full[i], lin[i]) for i in range(n)]
  return {
      "targets": n,
      "tau_full_vs_linear": {"mean": float(np.mean(taus)), "min": float(np.min(taus)),
                             "max": float(np.max(taus))},
      "loo_prior_tau_from_full": float(np.mean([weighted_tau(full[i], loo_prior(full, i))
                                                for i in range(n)])),
      "loo_prior_tau_from_linear": float(np.mean([weighted_tau(full[i], loo_prior(lin, i))
                                                  for i in range(n)])),
  }


def zoo_outputs(groups, zoo, x):
  """Logits through the black boxes (counted) and, for the white-box baselines, the same models'
  penultimate features: [(model ids, logits [M, N, Z], features [M, N, F])] per stack."""
  out = []
  for g in groups:
    logits = g(x)
    feats = np.asarray(zoo.stacks[g.name].apply(x, features=True))
    rows = [zoo.stacks[g.name].model_ids.index(m) for m in g.model_ids]
    out.append((list(g.model_ids), logits, feats[rows]))
  return out


def score_baselines(names, groups, zoo, x, y, k: int, ids: list[str], others, seed: int,
                    knowledge=None) -> tuple[dict, dict]:
  """Scores [M] (columns in ``ids`` order) of every named baseline for one target query, and its
  cost: zoo forwards as the black boxes counted them, warm seconds (compilation excluded)."""
  col = {m: i for i, m in enumerate(ids)}
  zoo_outputs(groups, zoo, x)  # warm-up: compile the forward passes for this query's shape
  before = sum(int(g.queries.sum()) for g in groups)
  t = time.perf_counter()
  outs = zoo_outputs(groups, zoo, x)
  fwd_s = time.perf_counter() - t
  forwards = sum(int(g.queries.sum()) for g in groups) - before
  scores, costs = {}, {}
  for name in names:
    b = BASELINES[name]
    sc = np.zeros(len(ids), np.float32)
    if b.input in ("logits", "features"):
      sec = fwd_s
      for mids, logits, feats in outs:
        kw = dict(logits=logits, features=feats, labels=y, num_target_classes=k)
        run_baseline(name, **kw)  # warm-up
        r = run_baseline(name, **kw)
        sc[[col[m] for m in mids]] = r.scores
        sec += r.seconds
      cost = {"forwards": forwards, "seconds": sec}
    else:  # no zoo call at query time: knowledge grids, other targets' ground truth, nothing
      kw = (knowledge if b.input == "knowledge" else
            {"ground_truth_other_targets": others} if b.input == "ground_truth" else
            {"key": jax.random.key(seed), "num_models": len(ids)})
      run_baseline(name, **kw)  # warm-up
      r = run_baseline(name, **kw)
      sc, cost = r.scores, {"forwards": 0, "seconds": r.seconds}
    scores[name], costs[name] = np.asarray(sc), cost
  return scores, costs


def run(cfg: SFMTEConfig, zoo_dir: str, cache_dir: str, out: str | None, figure: str | None,
        progress: bool = True) -> dict:
  """Runs the experiment; writes ``out`` (JSON) and ``figure`` when given."""
  t_start = time.perf_counter()
  zoo = load_zoo(zoo_dir)
  cache = Cache(cache_dir)
  gt = compute_ground_truth(cfg, zoo, zoo_dir, cache_dir, progress=progress)
  ids = gt["ids"]

  # Evaluation targets: drop the saturated ones (decided on the ground truth alone).
  gt_mean = {n: a.mean(0) for n, a in gt["eval"].items()}
  kept = [t for t in EVAL_TARGETS
          if gt_mean[t.name].mean() <= 0.95 and gt_mean[t.name].std() > 0.015]
  dropped = [t.name for t in EVAL_TARGETS if t not in kept]
  labels = transfer_labels(cfg, gt)
  tr_acc = labels.accuracy

  # Queries: run 0's training sample of every evaluation target.
  queries = {t.name: run_sample(t, cfg.eval_gt, 0) for t in kept}
  scores, costs, predicted = {}, {}, {}
  proxy = None
  for name in cfg.variants:
    pcfg = config_lib.override(cfg.proxy, VARIANTS[name])
    proxy = Proxy.train(zoo, pcfg, model_ids=ids, transfer=labels, cache=cache,
                        progress=progress)
    groups = groups_from_zoo(zoo, model_ids=ids, strategy=pcfg.strategy)
    index = proxy.build_index(groups, cache=cache)  # the stored knowledge: nothing is probed
    pos = np.asarray([index.ids.index(m) for m in ids])
    mv = index.vectors[pos]
    for t in kept:  # warm-up: compile once per query shape
      proxy.embed_query(*queries[t.name])
    head = f"{name} (accuracy head)"
    qcost = []
    for t in kept:  # timed: images -> phi -> query vector -> scores over the zoo
      t0 = time.perf_counter()
      q = proxy.embed_query(*queries[t.name])
      scores.setdefault(name, {})[t.name] = mv @ q
      qcost.append(time.perf_counter() - t0)
      pred = proxy.predict_accuracy(q, mv)[0]
      scores.setdefault(head, {})[t.name] = pred
      predicted.setdefault(name, {})[t.name] = pred
    for n in (name, head):
      costs[n] = {"forwards_per_query": 0, "query_seconds": float(np.mean(qcost)),
                  "train_s": proxy.info["seconds"]["total"]}

  # Baselines: the same query images, through the black boxes (and white-box features).
  groups = groups_from_zoo(zoo, model_ids=ids, strategy=cfg.proxy.strategy)
  _, m_grid, m_mask = proxy.model_grids(groups, cache=cache)
  per = {}
  eval_acc = np.stack([gt_mean[t.name] for t in kept])
  for i, t in enumerate(kept):
    x, y = queries[t.name]
    qg, qm = proxy.query_grid(x, y)
    others = other_targets(eval_acc, i)
    sc, cost = score_baselines(cfg.baselines, groups, zoo, x, y, t.k, ids, others,
                               cfg.seed + i, dict(query_grid=qg, query_mask=qm,
                                                  model_grids=m_grid, model_masks=m_mask))
    for b in sc:
      scores.setdefault(b, {})[t.name] = sc[b]
      per.setdefault(b, []).append(cost[b])
    r = run_baseline("prior", ground_truth_other_targets=tr_acc)
    scores.setdefault("prior (training targets)", {})[t.name] = r.scores
    per.setdefault("prior (training targets)", []).append({"forwards": 0, "seconds": r.seconds})
  for b, cs in per.items():
    costs[b] = {"forwards_per_query": float(np.mean([c["forwards"] for c in cs])),
                "query_seconds": float(np.mean([c["seconds"] for c in cs]))}

  # Reports.
  per_target, summary = {}, {}
  for method, by_t in scores.items():
    per_target[method] = {n: ranking_report(gt_mean[n], s) for n, s in by_t.items()}
    rep = per_target[method].values()
    summary[method] = {
        "mean_tau": float(np.mean([r["weighted_tau"] for r in rep])),
        "mean_pearson": float(np.mean([r["pearson"] for r in rep])),
        "mean_spearman": float(np.mean([r["spearman"] for r in rep])),
        "mean_regret": float(np.mean([r["top1_regret"] for r in rep])),
        "query_seconds": costs[method]["query_seconds"],
        "forward_passes_per_query": costs[method]["forwards_per_query"]}
  ceilings = {t.name: noise_ceiling(gt["eval"][t.name], weighted_tau) for t in kept}
  summary["noise ceiling"] = {"mean_tau": float(np.mean(list(ceilings.values())))}
  mae = {name: {n: float(np.mean(np.abs(p - gt_mean[n]))) for n, p in by_t.items()}
         for name, by_t in predicted.items()}
  res = {
      "summary": summary,
      "per_target": per_target,
      "noise_ceiling": ceilings,
      "accuracy_head_mae": {k: {"mean": float(np.mean(list(v.values())))} | v
                            for k, v in mae.items()},
      "targets": {t.name: t.to_json() | {
          "gt_mean": float(gt_mean[t.name].mean()), "gt_std": float(gt_mean[t.name].std()),
          "gt_min": float(gt_mean[t.name].min()), "gt_max": float(gt_mean[t.name].max())}
          for t in EVAL_TARGETS},
      "dropped_saturated": dropped,
      "training_targets": [t.name for t in gt["train_targets"]],
      "num_models": len(ids), "model_ids": ids,
      "ground_truth_seconds": {"eval": gt["seconds"][0], "train": gt["seconds"][1]},
      "costs": costs,
      "config": config_lib.to_dict(cfg),
      "seconds": time.perf_counter() - t_start, "backend": jax.default_backend(),
  }
  if out is not None:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
  if figure is not None:
    plot(res, figure)
  return res


def validate(cfg: SFMTEConfig, zoo_dir: str, cache_dir: str, progress: bool = True) -> dict:
  """Model selection on training targets only: a quarter of them become validation targets."""
  zoo = load_zoo(zoo_dir)
  cache = Cache(cache_dir)
  gt = compute_ground_truth(cfg, zoo, zoo_dir, cache_dir, progress=progress)
  train = gt["train_targets"]
  order = np.random.default_rng(cfg.seed + 3).permutation(len(train))
  val, inner = order[:len(order) // 4], order[len(order) // 4:]
  labels = transfer_labels(cfg, gt, [train[i] for i in inner])
  acc = transfer_labels(cfg, gt).accuracy
  prior = run_baseline("prior", ground_truth_other_targets=acc[inner]).scores
  out = {}
  for name in cfg.variants:
    pcfg = config_lib.override(cfg.proxy, VARIANTS[name])
    proxy = Proxy.train(zoo, pcfg, model_ids=gt["ids"], transfer=labels, cache=cache,
                        progress=progress)
    index = proxy.build_index(groups_from_zoo(zoo, model_ids=gt["ids"]), cache=cache)
    mv = index.vectors[np.asarray([index.ids.index(m) for m in gt["ids"]])]
    taus, head_taus, maes = [], [], []
    for v in val:
      s = target_set(train[v], cfg.train_gt)
      picks, y = draw_episodes(s, 1, cfg.train_gt.shots, cfg.seed)
      q = proxy.embed_query(s.images[picks[0]], y[0])
      pred = proxy.predict_accuracy(q, mv)[0]
      taus.append(weighted_tau(acc[v], mv @ q))
      head_taus.append(weighted_tau(acc[v], pred))
      maes.append(float(np.mean(np.abs(pred - acc[v]))))
    out[name] = {"mean_tau": float(np.mean(taus)),
                 "mean_tau_accuracy_head": float(np.mean(head_taus)),
                 "accuracy_mae": float(np.mean(maes)),
                 "prior_mean_tau": float(np.mean([weighted_tau(acc[v], prior) for v in val]))}
    print(name, out[name], flush=True)
  return {"validation": out, "config": config_lib.to_dict(cfg)}


def plot(out: dict, path: str) -> None:
  """Bar chart: weighted tau per evaluation target per method, with the noise ceiling."""
  plt = pyplot()
  if plt is None:
    return
  methods = [m for m in out["summary"] if m in out["per_target"]]
  targets = list(out["noise_ceiling"])
  fig, ax = plt.subplots(figsize=(max(10, 1.1 * len(targets)) + 3, 5))
  width = 0.8 / len(methods)
  for j, m in enumerate(methods):
    vals = [out["per_target"][m][t]["weighted_tau"] for t in targets]
    ax.bar(np.arange(len(targets)) + j * width - 0.4 + width / 2, vals, width,
           color=plt.cm.tab20(j % 20), label=f"{m} ({out['summary'][m]['mean_tau']:.2f})")
  ax.scatter(np.arange(len(targets)), [out["noise_ceiling"][t] for t in targets], marker="_",
             s=600, color="black", label="noise ceiling", zorder=5)
  ax.set_xticks(np.arange(len(targets)), targets, rotation=35, ha="right", fontsize=8)
  ax.set_ylabel("weighted Kendall tau vs fine-tune accuracy")
  ax.axhline(0, color="grey", lw=0.5)
  ax.legend(fontsize=6, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  ax.set_title("SF-MTE: ranking the zoo per target (legend: mean tau)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(out: dict) -> str:
  lines = ["| method | mean weighted tau | mean Spearman | mean top-1 regret | zoo forwards / "
           "query | query s |", "|---|---|---|---|---|---|"]
  for m, s in sorted(out["summary"].items(), key=lambda kv: -kv[1]["mean_tau"]):
    if "mean_regret" not in s:
      lines.append(f"| {m} | {s['mean_tau']:.3f} | | | | |")
      continue
    lines.append(f"| {m} | {s['mean_tau']:.3f} | {s['mean_spearman']:.3f} | "
                 f"{s['mean_regret']:.3f} | {s['forward_passes_per_query']:,.0f} | "
                 f"{s['query_seconds']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_config_arguments(p, PRESETS, "full")
  add_run_arguments(p, "results JSON (default experiments/results/sfmte.json)",
                    "cache of derived artifacts (ground truth, knowledge, backbone, episodes)")
  p.add_argument("--figure", default="experiments/results/sfmte_tau.png", help="the figure")
  p.add_argument("--ground-truth", action="store_true", help="only compute the ground truth")
  p.add_argument("--compare-train-labels", action="store_true",
                 help="on the training targets only: weighted tau between linear-probe and full "
                      "fine-tune labels")
  p.add_argument("--validate", action="store_true",
                 help="model selection on validation targets carved from the training targets")
  args = p.parse_args(argv)
  args.out = args.out or "experiments/results/sfmte.json"
  cfg = config_from_args(p, PRESETS, args)
  progress = not args.quiet
  if args.compare_train_labels:
    print(json.dumps(compare_train_labels(cfg, args.zoo, args.cache, progress), indent=1))
    return
  if args.ground_truth:
    gt = compute_ground_truth(cfg, load_zoo(args.zoo), args.zoo, args.cache, progress)
    for name, acc in gt["eval"].items():
      m = acc.mean(0)
      print(f"{name:34s} mean {m.mean():.3f} std {m.std():.3f} min {m.min():.3f} "
            f"max {m.max():.3f} ceiling {noise_ceiling(acc, weighted_tau):.3f}")
    print(f"eval {gt['seconds'][0]:.0f} s, train {gt['seconds'][1]:.0f} s")
    return
  if args.validate:
    print(json.dumps(validate(cfg, args.zoo, args.cache, progress), indent=1))
    return
  out = run(cfg, args.zoo, args.cache, args.out, args.figure, progress)
  print(format_table(out))
  print(f"\ndropped as saturated: {out['dropped_saturated'] or 'none'}; "
        f"{len(out['noise_ceiling'])} targets, {out['num_models']} models; "
        f"{out['seconds']:.0f} s")


if __name__ == "__main__":
  main()
