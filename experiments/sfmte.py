"""SF-MTE (source-free model transferability estimation) on a structured subset of the demo zoo.

Command:   python -m experiments.sfmte                 (ground truth, baselines, Know2Vec, figure)
           python -m experiments.sfmte --ground-truth  (only compute and cache the ground truth)
           python -m experiments.sfmte --validate [--set KEY=VALUE]   (model selection)
           python -m experiments.sfmte --compare-train-labels   (linear vs full labels, training
                                                                 targets only)
Hardware:  2-core x86-64 CPU, 24 GiB, no GPU (measured there).
Runtime:   EXPECTED_RUNTIME below.
Expected:  EXPECTED_NUMBERS below (experiments/results/sfmte.json, figure sfmte_tau.png).
           ``--train-labels linear --train-targets 48`` trains on cheap linear-probe labels instead.

Protocol (nothing is tuned on the evaluation targets):
- Zoo: :func:`sfmte_models`, 114 models of the demo zoo that keep its variety: per base dataset six
  plain 4-way tasks and one task in each transformed domain (mlp, cnn_s, cnn_l each), two 2-way
  tasks (mlp, cnn_s) and every 10-way model, plus two deliberately weak 4-way models.
- Evaluation targets (:data:`EVAL_TARGETS`): tasks no zoo model and no part of the proxy was trained
  on, drawn from the sources' *test* splits (images the backbone never saw): fine-grained class sets,
  domains no zoo model saw (flipped, low-contrast, combined transforms) and K from 2 to 10. Their
  ground truth is the full fine-tune (``transfer.FinetuneConfig()``: new head, 30 Adam steps, 50
  shots per class, 6 runs resampling seed and shots together, up to 300 test images per class).
  Targets whose mean ground truth exceeds 0.95 or whose spread across the zoo is <= 0.015 are
  dropped as saturated and listed.
- Training targets (:func:`training_targets`): 24 random tasks from the sources' *train* splits in
  the zoo's own domains, disjoint from the evaluation targets; their label is the same full
  fine-tune with fewer runs and test images (3 runs, 100 per class). The cheaper frozen-body linear
  probe (``--train-labels linear``) ranks the zoo unlike the full fine-tune: measured on the 24
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
import functools
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from experiments.common import cached_npz, pyplot, split_overrides, zoo_artifacts
from know2vec_jax import align, features
from know2vec_jax.baselines import BASELINES, run_baseline
from know2vec_jax.data import Task
from know2vec_jax.metrics import ranking_report, weighted_tau
from know2vec_jax.transfer import (FinetuneConfig, TransferTarget, ground_truth, noise_ceiling,
                                   run_sample, target_data)
from know2vec_jax.vectorizers import VectorizerConfig, pad_grid
from know2vec_jax.zoo import load_zoo

VARIANTS = {
    "know2vec-attention-shared": VectorizerConfig(variant="attention", shared=True),
    "know2vec-lstm": VectorizerConfig(variant="lstm", shared=False),
}
DEFAULT_VARIANT = "know2vec-attention-shared"

EXPECTED_RUNTIME = (
    "ground truth once, then cached: 32 min from an empty cache (evaluation targets 15.3 min, "
    "training targets 16.4 min); the rest 6.5 min (two aligner trainings of 2 min each, the "
    "baselines' zoo forwards and white-box SVDs most of the rest)")
EXPECTED_NUMBERS = (
    "14 targets, none saturated, 114 models. Mean weighted tau: noise ceiling 0.80; query-blind "
    "prior (other evaluation targets) 0.77; Know2Vec lstm ranked by its accuracy head 0.75, "
    "attention-shared by its accuracy head 0.74, lstm 0.72, attention-shared (q.m) 0.66; prior "
    "from the training targets 0.75; H-score with shrinkage on features (white-box) 0.70, H-score "
    "on features 0.62, LogME on features 0.48; NCE 0.36, LEEP 0.31; random -0.03. Accuracy head "
    "mean absolute error 0.22 (attention) and 0.18 (lstm).")

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


@dataclasses.dataclass(frozen=True)
class SFMTEConfig:
  zoo_dir: str = "artifacts/zoo-demo"
  cache_dir: str = "artifacts/sfmte-cache"
  artifacts_cache: str = "artifacts/nnr-cache"  # knowledge + backbone, shared with the NNR run
  out: str = "experiments/results/sfmte.json"
  figure: str = "experiments/results/sfmte_tau.png"
  eval_gt: FinetuneConfig = FinetuneConfig()
  train_gt: FinetuneConfig = TRAIN_LABELS["full"]
  train_targets: int = 24
  episodes: int = 8
  pool_per_source: int = 800
  search_steps: int = 8
  anchors_per_class: int = 32
  max_classes: int = 10
  variants: tuple[str, ...] = tuple(VARIANTS)
  baselines: tuple[str, ...] = tuple(BASELINES)
  align: align.AlignConfig = align.AlignConfig(steps=1000, batch_size=16, warmup_steps=50,
                                               ce_weight=0.0)
  vectorizer_overrides: tuple = ()
  validate: bool = False
  seed: int = 0


def compute_ground_truth(cfg: SFMTEConfig, zoo=None, progress: bool = True) -> dict:
  """Ground truth of the evaluation targets (full fine-tune) and training targets (linear)."""
  zoo = zoo if zoo is not None else load_zoo(cfg.zoo_dir)
  ids = sfmte_models(zoo)
  t = time.perf_counter()
  ev = ground_truth(zoo, cfg.zoo_dir, ids, EVAL_TARGETS, cfg.eval_gt,
                    cache_dir=pathlib.Path(cfg.cache_dir) / "ground-truth", progress=progress)
  t_eval = time.perf_counter() - t
  t = time.perf_counter()
  train = training_targets(zoo, cfg.train_targets, cfg.seed)
  tr = ground_truth(zoo, cfg.zoo_dir, ids, train, cfg.train_gt,
                    cache_dir=pathlib.Path(cfg.cache_dir) / "ground-truth", progress=progress)
  t_train = time.perf_counter() - t
  return {"zoo": zoo, "ids": ids, "eval": ev, "train": tr, "train_targets": train,
          "seconds": (t_eval, t_train)}


def _loo_prior(acc: np.ndarray, i: int) -> np.ndarray:
  """The query-blind prior baseline for target ``i`` from the other rows of ``acc`` [T, M]."""
  return run_baseline("prior", ground_truth_other_targets=np.delete(acc, i, 0)).scores


def compare_train_labels(cfg: SFMTEConfig, progress: bool = True) -> dict:
  """Training targets only: does the cheap linear-probe label rank the zoo like the full fine-tune?

  Computes (or loads) both labels on the first ``cfg.train_targets`` training targets and reports
  the weighted tau between them per target, and how well a leave-one-out prior built from each kind
  of label ranks a target's full fine-tune. No evaluation target is read.
  """
  zoo = load_zoo(cfg.zoo_dir)
  ids = sfmte_models(zoo)
  targets = training_targets(zoo, cfg.train_targets, cfg.seed)
  acc = {}
  for kind in ("linear", "full"):
    gt = ground_truth(zoo, cfg.zoo_dir, ids, targets, TRAIN_LABELS[kind],
                      cache_dir=pathlib.Path(cfg.cache_dir) / "ground-truth", progress=progress)
    acc[kind] = np.stack([gt[t.name].mean(0) for t in targets])
  full, lin = acc["full"], acc["linear"]
  n = len(targets)
  taus = [weighted_tau(full[i], lin[i]) for i in range(n)]
  return {
      "targets": n,
      "tau_full_vs_linear": {"mean": float(np.mean(taus)), "min": float(np.min(taus)),
                             "max": float(np.max(taus))},
      "loo_prior_tau_from_full": float(np.mean([weighted_tau(full[i], _loo_prior(full, i))
                                                for i in range(n)])),
      "loo_prior_tau_from_linear": float(np.mean([weighted_tau(full[i], _loo_prior(lin, i))
                                                  for i in range(n)])),
  }


def _query_grids(backbone, target, images, labels, k_max):
  grid = features.query_grid(backbone, images, labels, max_classes=k_max)
  return pad_grid(grid, k_max)


def _train_episodes(cfg, backbone, targets, k_max):
  """S query episodes (cfg.train_gt.shots per class) from each training target's shot pool."""
  shots = cfg.train_gt.shots
  grids = np.zeros((len(targets), cfg.episodes, k_max, k_max, backbone.dim), np.float32)
  masks = np.zeros((len(targets), k_max), np.float32)
  for i, t in enumerate(targets):
    td = target_data(t, shots, cfg.train_gt.test_per_class)
    idx = np.stack([td.train_sample(shots, seed=cfg.seed * 7919 + 100 * i + e)
                    for e in range(cfg.episodes)])
    g = features.query_grid_batch(backbone, td.images[idx], td.labels[idx], t.k)
    grids[i], m = pad_grid(g, k_max)
    masks[i] = np.asarray(m)[0]
  return {"grid": grids, "mask": masks}


def _zoo_outputs(zoo, ids, images):
  """Logits and penultimate features of every selected model on ``images``, per stack."""
  out = []
  for name, stack in sorted(zoo.stacks.items()):
    rows = [i for i, m in enumerate(stack.model_ids) if m in set(ids)]
    if not rows:
      continue
    logits = np.asarray(stack.apply(images))[rows]
    feats = np.asarray(stack.apply(images, features=True))[rows]
    out.append(([stack.model_ids[r] for r in rows], logits, feats))
  return out


def run(cfg: SFMTEConfig, progress: bool = True) -> dict:
  t_start = time.perf_counter()
  art = zoo_artifacts(cfg.zoo_dir, cfg.artifacts_cache, pool_per_source=cfg.pool_per_source,
                      search_steps=(cfg.search_steps,), anchors_per_class=cfg.anchors_per_class,
                      max_classes=cfg.max_classes, seed=cfg.seed, progress=progress)
  gt = compute_ground_truth(cfg, art.zoo, progress=progress)
  zoo, ids = art.zoo, gt["ids"]
  k_max, backbone = cfg.max_classes, art.backbone
  cache = pathlib.Path(cfg.cache_dir)
  m_grid, m_mask = art.grids(cfg.search_steps, ids)

  # Evaluation targets: drop the saturated ones (decided on the ground truth alone).
  gt_mean = {n: a.mean(0) for n, a in gt["eval"].items()}
  kept = [t for t in EVAL_TARGETS
          if gt_mean[t.name].mean() <= 0.95 and gt_mean[t.name].std() > 0.015]
  dropped = [t.name for t in EVAL_TARGETS if t not in kept]

  train_targets = gt["train_targets"]
  tr_acc = np.stack([gt["train"][t.name].mean(0) for t in train_targets])
  ep = cached_npz(cache / f"train-episodes-{len(train_targets)}x{cfg.episodes}-"
                  f"{cfg.train_gt.shots}.npz",
                  lambda: _train_episodes(cfg, backbone, train_targets, k_max))

  if cfg.validate:
    return validate(cfg, ep, tr_acc, m_grid, m_mask, train_targets, progress)

  # Queries: run 0's training sample of every evaluation target.
  queries = {t.name: run_sample(t, cfg.eval_gt, 0) for t in kept}
  q_grid = np.zeros((len(kept), k_max, k_max, backbone.dim), np.float32)
  q_mask = np.zeros((len(kept), k_max), np.float32)
  for i, t in enumerate(kept):
    g, m = _query_grids(backbone, t, *queries[t.name], k_max)
    q_grid[i], q_mask[i] = g, m

  scores, costs, predicted = {}, {}, {}
  data = align.TransferData(m_grid, m_mask, ep["grid"], ep["mask"], tr_acc)
  for name in cfg.variants:
    vcfg = dataclasses.replace(VARIANTS[name], max_classes=k_max,
                               **dict(cfg.vectorizer_overrides))
    trainer = align.Trainer(vcfg, cfg.align, data)
    trainer.run(progress=progress)
    model = trainer.model()
    mv = model.embed_models(m_grid, m_mask)  # offline, once per zoo
    # nnx.jit with the module as an argument (a closure over it breaks the LSTM's nnx.scan).
    embed = functools.partial(nnx.jit(lambda mod, g, m: mod.embed_queries(g, m)), model)
    for tgt in kept:  # warm-up: compile once per query shape
      np.asarray(embed(*[a[None] for a in _query_grids(backbone, tgt, *queries[tgt.name],
                                                         k_max)]) @ mv.T)
    predict = functools.partial(nnx.jit(
        lambda mod, q, mv: mod.predict_accuracy(q[:, None], mv[None])[0]), model)
    t = time.perf_counter()
    qvs = {}
    for tgt in kept:  # timed: images -> phi -> query vector -> scores over the zoo
      g, m = _query_grids(backbone, tgt, *queries[tgt.name], k_max)
      qvs[tgt.name] = embed(g[None], m[None])
      scores.setdefault(name, {})[tgt.name] = np.asarray(qvs[tgt.name] @ mv.T)[0]
    per_query = (time.perf_counter() - t) / len(kept)
    for tgt in kept:
      pred = np.asarray(predict(qvs[tgt.name], mv))
      scores.setdefault(f"{name} (accuracy head)", {})[tgt.name] = pred
      predicted.setdefault(name, {})[tgt.name] = pred
    for n in (name, f"{name} (accuracy head)"):
      costs[n] = {"forward_passes": 0, "query_seconds": per_query, "train_s": trainer.seconds}

  # Baselines: the same query images forwarded through every selected zoo model.
  for tgt in kept:
    x, y = queries[tgt.name]
    # Query-time costs are warm timings (a second call with the same shapes): compilation is a
    # one-off per query shape and would otherwise dominate every method's seconds.
    outs = _zoo_outputs(zoo, ids, x)
    t = time.perf_counter()
    outs = _zoo_outputs(zoo, ids, x)
    fwd_s = time.perf_counter() - t
    col = {m: i for i, m in enumerate(ids)}
    others = np.stack([gt_mean[o.name] for o in kept if o.name != tgt.name])
    for bname in cfg.baselines:
      b = BASELINES[bname]
      sc = np.zeros(len(ids), np.float32)
      sec, passes = 0.0, 0
      if b.input in ("logits", "features"):
        for mids, logits, feats in outs:
          kw = dict(logits=logits, features=feats, labels=y, num_target_classes=tgt.k)
          run_baseline(bname, **kw)
          r = run_baseline(bname, **kw)
          sc[[col[m] for m in mids]] = r.scores
          sec += r.seconds
          passes += r.forward_passes
        sec += fwd_s
      elif b.input == "ground_truth":
        r = run_baseline(bname, ground_truth_other_targets=others)
        sc, sec = r.scores, r.seconds
      else:
        r = run_baseline(bname, key=jax.random.key(cfg.seed + len(scores)), num_models=len(ids))
        sc, sec = r.scores, r.seconds
      scores.setdefault(bname, {})[tgt.name] = sc
      c = costs.setdefault(bname, {"forward_passes": passes, "query_seconds": 0.0})
      c["query_seconds"] += sec / len(kept)
    r = run_baseline("prior", ground_truth_other_targets=tr_acc)
    scores.setdefault("prior (training targets)", {})[tgt.name] = r.scores
    costs["prior (training targets)"] = {"forward_passes": 0, "query_seconds": r.seconds}

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
        "query_seconds": float(costs[method]["query_seconds"]),
        "forward_passes_per_query": int(costs[method]["forward_passes"]) // max(
            1, len(kept)) if costs[method]["forward_passes"] else 0}
  ceilings = {t.name: noise_ceiling(gt["eval"][t.name], weighted_tau) for t in kept}
  summary["noise ceiling"] = {"mean_tau": float(np.mean(list(ceilings.values())))}
  mae = {name: {n: float(np.mean(np.abs(p - gt_mean[n]))) for n, p in by_t.items()}
         for name, by_t in predicted.items()}
  out = {
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
      "training_targets": [t.name for t in train_targets],
      "num_models": len(ids), "model_ids": ids,
      "ground_truth_seconds": {"eval": gt["seconds"][0], "train": gt["seconds"][1]},
      "costs": costs,
      "config": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                 for k, v in dataclasses.asdict(cfg).items()},
      "seconds": time.perf_counter() - t_start, "backend": jax.default_backend(),
  }
  path = pathlib.Path(cfg.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  plot(out, cfg.figure)
  return out


def validate(cfg, ep, tr_acc, m_grid, m_mask, train_targets, progress):
  """Model selection on training targets only: a quarter of them become validation targets."""
  order = np.random.default_rng(cfg.seed + 3).permutation(len(train_targets))
  val, inner = order[:len(order) // 4], order[len(order) // 4:]
  data = align.TransferData(m_grid, m_mask, ep["grid"][inner], ep["mask"][inner], tr_acc[inner])
  out = {}
  for name in cfg.variants:
    vcfg = dataclasses.replace(VARIANTS[name], max_classes=cfg.max_classes,
                               **dict(cfg.vectorizer_overrides))
    trainer = align.Trainer(vcfg, cfg.align, data)
    trainer.run(progress=progress)
    model = trainer.model()
    mv = model.embed_models(m_grid, m_mask)
    qv = model.embed_queries(ep["grid"][val, 0], ep["mask"][val])
    s = np.asarray(qv @ mv.T)
    pred = np.asarray(model.predict_accuracy(qv[:, None], mv[None]))
    prior = run_baseline("prior", ground_truth_other_targets=tr_acc[inner]).scores
    out[name] = {
        "mean_tau": float(np.mean([weighted_tau(tr_acc[v], s[i]) for i, v in enumerate(val)])),
        "mean_tau_accuracy_head": float(np.mean([weighted_tau(tr_acc[v], pred[i])
                                                 for i, v in enumerate(val)])),
        "accuracy_mae": float(np.mean(np.abs(pred - tr_acc[val]))),
        "prior_mean_tau": float(np.mean([weighted_tau(tr_acc[v], prior) for v in val]))}
    print(name, out[name], flush=True)
  return {"validation": out, "align": dataclasses.asdict(cfg.align),
          "vectorizer_overrides": dict(cfg.vectorizer_overrides)}


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
                 f"{s['mean_regret']:.3f} | {s['forward_passes_per_query']} | "
                 f"{s['query_seconds']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--zoo", default=SFMTEConfig.zoo_dir, help="the zoo directory (demo preset)")
  p.add_argument("--cache", default=SFMTEConfig.cache_dir,
                 help="where the ground truth and training episodes are cached")
  p.add_argument("--out", default=None, help=f"results JSON (default {SFMTEConfig.out})")
  p.add_argument("--ground-truth", action="store_true", help="only compute the ground truth")
  p.add_argument("--train-labels", default="full", choices=list(TRAIN_LABELS),
                 help="how the training targets' accuracies are measured")
  p.add_argument("--train-targets", type=int, default=SFMTEConfig.train_targets,
                 help="how many training targets")
  p.add_argument("--compare-train-labels", action="store_true",
                 help="on the training targets only: weighted tau between linear-probe and full "
                      "fine-tune labels")
  p.add_argument("--validate", action="store_true",
                 help="model selection on validation targets carved from the training targets")
  p.add_argument("--variant", action="append", default=None, choices=list(VARIANTS))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override an AlignConfig or VectorizerConfig field (repeatable)")
  args = p.parse_args(argv)
  if args.train_targets < 4:  # --validate holds out a quarter of them; the aligner needs several
    p.error(f"--train-targets must be at least 4, got {args.train_targets}")
  cfg = SFMTEConfig(zoo_dir=args.zoo, cache_dir=args.cache, validate=args.validate,
                    train_gt=TRAIN_LABELS[args.train_labels], train_targets=args.train_targets)
  align_over, vec_over = split_overrides(
      args.set, {f.name for f in dataclasses.fields(align.AlignConfig)})
  cfg = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, **align_over),
                            vectorizer_overrides=tuple(sorted(vec_over.items())))
  if args.variant:
    cfg = dataclasses.replace(cfg, variants=tuple(args.variant))
  if args.out:
    cfg = dataclasses.replace(cfg, out=args.out)
  if args.compare_train_labels:
    print(json.dumps(compare_train_labels(cfg), indent=1))
    return
  if args.ground_truth:
    gt = compute_ground_truth(cfg)
    for name, acc in gt["eval"].items():
      m = acc.mean(0)
      print(f"{name:34s} mean {m.mean():.3f} std {m.std():.3f} min {m.min():.3f} "
            f"max {m.max():.3f} ceiling {noise_ceiling(acc, weighted_tau):.3f}")
    print(f"eval {gt['seconds'][0]:.0f} s, train {gt['seconds'][1]:.0f} s")
    return
  out = run(cfg)
  if cfg.validate:
    print(json.dumps(out, indent=1))
    return
  print(format_table(out))
  print(f"\ndropped as saturated: {out['dropped_saturated'] or 'none'}; "
        f"{len(out['noise_ceiling'])} targets, {out['num_models']} models; "
        f"{out['seconds']:.0f} s")


if __name__ == "__main__":
  main()
