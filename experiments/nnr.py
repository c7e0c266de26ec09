"""NNR (neural network retrieval) on the demo zoo: Know2Vec against random, untrained anchor
matching and LEEP, on tasks the aligner saw and on tasks (and models) it never saw.

Command:   python -m experiments.nnr            (full: 3 folds, 3 variants, the T ablation, LEEP)
           python -m experiments.nnr --quick    (3 folds, the default variant and the baselines)
           python -m experiments.nnr --validate [--set KEY=VALUE ...]   (model selection)
Hardware:  2-core x86-64 CPU, 24 GiB, no GPU (measured there).
Runtime:   full 11-13 min from a built demo zoo (knowledge 66 s per T, backbone 45 s, 12 aligner
           trainings of 22-120 s, LEEP 77 s); --quick 5 min with an empty cache, under 3 min
           with cached artifacts.
Expected (experiments/results/nnr.json, 396 held-out and 1,008 seen queries):
           default know2vec-attention-shared: seen top-1 0.95, held-out top-1 0.54, top-5 0.82;
           separate encoders held-out top-1 0.19; released-code LSTM 0.49; T=0 (no boundary
           search) 0.49; untrained anchor matching 0.46; LEEP 0.38 (top-5 0.99); random 0.01.

Model selection (``--validate``, never the evaluation queries): a quarter of fold 0's training
4-way tasks are held out as validation tasks; queries are episodes from their *train* splits.
Measured there (top-1 on 66 validation queries): ce_weight 1 vs 0: 0.82 vs 0.58 (with 32
anchors per class); 32 vs 1 anchors per class: 0.58 vs 0.50 (ce_weight 0); feature noise 0.1:
0.32; 500 instead of 1500 steps: 0.58; class-subset augmentation 0.25 / 0.5: 0.74 / 0.73. The
defaults are the best of these.

Protocol (nothing is tuned on the evaluation queries):
- Every distinct task of the zoo is a task. 4-way tasks are split into ``folds`` folds; in fold f
  the aligner trains on every task outside fold f (its models and query episodes drawn from the
  tasks' *train* splits); fold f's models are vectorized after training and added to the index.
- Queries: ``queries_per_task`` draws of ``shots`` images per class from each task's *held-out*
  split. The index holds every zoo model; a retrieved model is correct when it was trained on the
  query's task (same source domain and class set). ``seen`` = queries of training tasks,
  ``heldout`` = queries of fold-f tasks; each task is held out in exactly one fold.
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

from experiments.common import cached_npz, pyplot, split_overrides, zoo_artifacts
from know2vec_jax import align, features
from know2vec_jax.baselines import leep_scores
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.data import Task, few_shot, load_source
from know2vec_jax.index import ModelIndex
from know2vec_jax.metrics import first_correct_rank, retrieval_metrics
from know2vec_jax.vectorizers import VectorizerConfig, pad_grid

VARIANTS = {
    "know2vec-attention-shared": VectorizerConfig(variant="attention", shared=True),
    "know2vec-attention-separate": VectorizerConfig(variant="attention", shared=False),
    "know2vec-lstm": VectorizerConfig(variant="lstm", shared=False),
}
DEFAULT_VARIANT = "know2vec-attention-shared"


@dataclasses.dataclass(frozen=True)
class NNRConfig:
  zoo_dir: str = "artifacts/zoo-demo"
  cache_dir: str = "artifacts/nnr-cache"
  out: str = "experiments/results/nnr.json"
  folds: int = 3
  shots: int = 5
  queries_per_task: int = 3
  pool_per_source: int = 800
  search_steps: int = 8
  anchors_per_class: int = 32
  episodes: int = 32
  max_classes: int = 10
  variants: tuple[str, ...] = tuple(VARIANTS)
  ablate_search_steps: bool = True
  leep: bool = True
  align: align.AlignConfig = align.AlignConfig()
  vectorizer_overrides: tuple = ()
  validate: bool = False
  seed: int = 0


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


def run(cfg: NNRConfig, progress: bool = True) -> dict:
  t_start = time.perf_counter()
  art = zoo_artifacts(cfg.zoo_dir, cfg.cache_dir, pool_per_source=cfg.pool_per_source,
                      search_steps=(cfg.search_steps,) + ((0,) if cfg.ablate_search_steps
                                                          and not cfg.validate else ()),
                      anchors_per_class=cfg.anchors_per_class, max_classes=cfg.max_classes,
                      seed=cfg.seed, progress=progress)
  zoo, ids, cache, backbone, k_max = art.zoo, art.ids, art.cache, art.backbone, cfg.max_classes
  records = [zoo.records[m] for m in ids]
  kn_main = art.knowledge[cfg.search_steps]
  timings = {"knowledge_s": float(kn_main["seconds"])}
  grids_main = art.grids(cfg.search_steps)

  # 4. Tasks, training episodes (train split) and evaluation queries (held-out split).
  tasks = sorted({r.task for r in records}, key=lambda t: t.task_id)
  task_index = {t: i for i, t in enumerate(tasks)}
  model_task = np.asarray([task_index[r.task] for r in records], np.int32)
  overlap = closest_overlap(tasks)

  def episodes():
    ep = np.zeros((len(tasks), cfg.episodes, k_max, k_max, backbone.dim), np.float32)
    for i, t in enumerate(tasks):
      g = features.task_episodes(backbone, load_source(t.source), t, cfg.episodes, cfg.shots,
                                 seed=cfg.seed * 7919 + i, split="train")
      ep[i] = pad_grid(g, k_max)[0]
    return {"grid": ep}
  ep_grid = cached_npz(cache / f"episodes-{cfg.episodes}x{cfg.shots}.npz", episodes)["grid"]
  task_mask = np.stack([np.asarray(pad_grid(np.zeros((t.k, t.k, 1)), k_max)[1]) for t in tasks])

  queries = []  # (task index, query grid [k_max, k_max, D], images, labels)
  for i, t in enumerate(tasks):
    data = load_source(t.source)
    for q in range(cfg.queries_per_task):
      x, y = few_shot(data, t, cfg.shots, seed=cfg.seed * 100003 + i * 31 + q, split="test")
      queries.append((i, x, y))
  q_grid = np.stack([pad_grid(features.query_grid(backbone, x, y), k_max)[0]
                     for _, x, y in queries])
  q_task = np.asarray([i for i, _, _ in queries])
  q_mask = task_mask[q_task]

  # 5. Folds over the 4-way tasks.
  four = [i for i, t in enumerate(tasks) if t.k == 4]
  fold_of = {}
  for j, i in enumerate(np.random.default_rng(cfg.seed + 1).permutation(four)):
    fold_of[int(i)] = j % cfg.folds

  results = {"queries": {}, "costs": {}, "top1": {}}

  def record(method, fold, scores):
    """scores [Q, M] over all models -> per-query ranks of the first correct model."""
    correct = model_task[None, :] == q_task[:, None]
    order = np.argsort(-scores, axis=1, kind="stable")
    first = np.argmax(np.take_along_axis(correct, order, 1), axis=1) + 1
    held = np.asarray([fold_of.get(int(t), -1) == fold for t in q_task])
    seen = np.asarray([fold_of.get(int(t), -1) != fold for t in q_task])
    store = results["queries"].setdefault(method, {"heldout": {}, "seen": {}})
    top = results["top1"].setdefault(method, {})
    for split, sel in (("heldout", held), ("seen", seen)):
      for qi in np.flatnonzero(sel):
        store[split].setdefault(int(qi), []).append(int(first[qi]))
        if split == "heldout":
          top[int(qi)] = ids[int(order[qi, 0])]

  def train_and_score(name, vcfg, grids):
    for fold in range(cfg.folds):
      train_tasks = [i for i in range(len(tasks)) if fold_of.get(i, -1) != fold]
      remap = {t: j for j, t in enumerate(train_tasks)}
      rows = np.flatnonzero(np.isin(model_task, train_tasks))
      data = align.AlignData(grids[0][rows], grids[1][rows],
                             np.asarray([remap[t] for t in model_task[rows]], np.int32),
                             ep_grid[train_tasks], task_mask[train_tasks])
      trainer = align.Trainer(dataclasses.replace(vcfg, max_classes=k_max, **dict(cfg.vectorizer_overrides)), cfg.align, data)
      trainer.run(progress=progress)
      model = trainer.model()
      index = ModelIndex(vcfg.embed_dim)
      held_rows = np.setdiff1d(np.arange(len(ids)), rows)
      m_vec = np.asarray(model.embed_models(grids[0], grids[1]))
      # Held-out models join after training: vectorized by the trained model vectorizer.
      index.add_vectors([ids[i] for i in rows], m_vec[rows])
      index.add_vectors([ids[i] for i in held_rows], m_vec[held_rows])
      qv = np.asarray(model.embed_queries(q_grid, q_mask))
      scores, got = index.search(qv, k=len(ids))
      pos = {m: i for i, m in enumerate(ids)}
      full = np.full((len(qv), len(ids)), -np.inf, np.float32)
      for qi in range(len(qv)):
        full[qi, [pos[m] for m in got[qi]]] = scores[qi]
      record(name, fold, full)
      if fold == 0 and "example" not in results:
        # One held-out query, shown end to end: its task and the models ranked for it.
        qi = next(i for i, t in enumerate(q_task) if fold_of.get(int(t), -1) == 0)
        t = tasks[q_task[qi]]
        data = load_source(t.source)
        results["example"] = {
            "method": name, "query_task": t.task_id,
            "query_classes": [data.class_names[c] for c in t.classes],
            "ranked": [{"model_id": m, "score": float(sc), "arch": zoo.records[m].arch,
                        "task": zoo.records[m].task.task_id,
                        "correct": zoo.records[m].task == t}
                       for m, sc in zip(got[qi][:5], scores[qi][:5])]}
      results["costs"].setdefault(name, {"train_s": []})["train_s"].append(trainer.seconds)

  if cfg.validate:
    return validate(cfg, tasks, fold_of, model_task, grids_main, ep_grid, task_mask, ids,
                    progress)

  for name in cfg.variants:
    train_and_score(name, VARIANTS[name], grids_main)
  if cfg.ablate_search_steps:
    grids_t0 = art.grids(0)
    train_and_score(f"{DEFAULT_VARIANT} (T=0)", VARIANTS[DEFAULT_VARIANT], grids_t0)

  # Baselines (query-time scores do not depend on the fold; ranks are split per fold).
  rng = np.random.default_rng(cfg.seed + 2)
  rand = rng.random((len(q_task), len(ids)))
  anchors = grids_main[0][:, np.arange(k_max), np.arange(k_max)]  # [M, K_max, D]
  protos = q_grid[:, np.arange(k_max), np.arange(k_max)]  # [Q, K_max, D]
  sim = np.einsum("qid,mjd->qmij", protos, anchors)
  valid = q_mask[:, None, :, None] * grids_main[1][None, :, None, :]
  sim = np.where(valid > 0, sim, -np.inf)
  q_side = np.where(q_mask[:, None] > 0, sim.max(3), 0).sum(2) / q_mask.sum(1)[:, None]
  m_side = (np.where(grids_main[1][None] > 0, sim.max(2), 0).sum(2) /
            grids_main[1].sum(1)[None])
  anchor = 0.5 * (q_side + m_side)
  for fold in range(cfg.folds):
    record("random", fold, rand)
    record("anchor-matching (untrained)", fold, anchor)
  if cfg.leep:
    t = time.perf_counter()
    groups = groups_from_zoo(zoo)
    leep = np.zeros((len(queries), len(ids)), np.float32)
    pos = {m: i for i, m in enumerate(ids)}
    forwards = 0
    for qi, (_, x, y) in enumerate(queries):
      for g in groups:
        logits = g(x)
        forwards += logits.shape[0] * logits.shape[1]
        s = np.asarray(leep_scores(logits, y, int(y.max()) + 1))
        leep[qi, [pos[m] for m in g.model_ids]] = s
    results["costs"]["leep"] = {"forwards_per_query": forwards / len(queries),
                                "seconds_per_query": (time.perf_counter() - t) / len(queries)}
    for fold in range(cfg.folds):
      record("leep", fold, leep)

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
  out = {
      "summary": summary, "by_closest_overlap": by_overlap,
      "heldout_top1_errors": {m: error_kinds(top, [tasks[t] for t in q_task], zoo)
                              for m, top in results["top1"].items()},
      "ranks": {m: {split: {str(q): r for q, r in per_q.items()} for split, per_q in sp.items()}
                for m, sp in results["queries"].items()},
      "query_tasks": [tasks[t].task_id for t in q_task],
      "config": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                 for k, v in dataclasses.asdict(cfg).items()},
      "num_models": len(ids), "num_tasks": len(tasks), "num_queries": len(queries),
      "heldout_tasks_per_fold": [sum(1 for v in fold_of.values() if v == f)
                                 for f in range(cfg.folds)],
      "knowledge_queries_per_model": {str(k): int(kn_main[f"queries/{mid}"])
                                      for k, mid in [(r.k, r.model_id) for r in records]},
      "costs": results["costs"] | {"knowledge_s": timings["knowledge_s"]},
      "example": results.get("example"),
      "seconds": time.perf_counter() - t_start, "backend": jax.default_backend(),
  }
  path = pathlib.Path(cfg.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  plot(out, str(path.with_suffix(".png")))
  return out


def validate(cfg, tasks, fold_of, model_task, grids, ep_grid, task_mask, ids, progress):
  """Model selection without the evaluation queries.

  Inside fold 0's *training* tasks, a quarter of the 4-way tasks become validation tasks: the
  aligner trains on the rest, and validation queries are query episodes drawn from the validation
  tasks' *train* splits. Fold 0's evaluation tasks and their models are left out entirely.
  """
  train_pool = [i for i in range(len(tasks)) if fold_of.get(i, -1) != 0]
  four = [i for i in train_pool if tasks[i].k == 4]
  val = set(np.random.default_rng(cfg.seed + 3).permutation(four)[:len(four) // 4].tolist())
  inner = [i for i in train_pool if i not in val]
  remap = {t: j for j, t in enumerate(inner)}
  rows = np.flatnonzero(np.isin(model_task, inner))
  keep = np.flatnonzero(np.isin(model_task, train_pool))
  out = {}
  for name in cfg.variants:
    vcfg = dataclasses.replace(VARIANTS[name], max_classes=cfg.max_classes,
                               **dict(cfg.vectorizer_overrides))
    data = align.AlignData(grids[0][rows], grids[1][rows],
                           np.asarray([remap[t] for t in model_task[rows]], np.int32),
                           ep_grid[inner], task_mask[inner])
    trainer = align.Trainer(vcfg, cfg.align, data)
    trainer.run(progress=progress)
    model = trainer.model()
    m_vec = np.asarray(model.embed_models(grids[0][keep], grids[1][keep]))
    vt = sorted(val)
    qg = ep_grid[vt, :3].reshape((-1,) + ep_grid.shape[2:])
    qt = np.repeat(vt, 3)
    q_vec = np.asarray(model.embed_queries(qg, task_mask[qt]))
    ranks = first_correct_rank(q_vec @ m_vec.T, model_task[keep][None] == qt[:, None])
    out[name] = retrieval_metrics(ranks)
    print(name, out[name], flush=True)
  return {"validation": out, "align": dataclasses.asdict(cfg.align),
          "vectorizer_overrides": dict(cfg.vectorizer_overrides)}


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
  p.add_argument("--quick", action="store_true", help="1 fold, default variant, no ablation")
  p.add_argument("--zoo", default=NNRConfig.zoo_dir, help="the zoo directory (demo preset)")
  p.add_argument("--out", default=None, help=f"results JSON (default {NNRConfig.out})")
  p.add_argument("--cache", default=NNRConfig.cache_dir, help="cache of derived artifacts")
  p.add_argument("--steps", type=int, default=None, help="aligner steps (default from config)")
  p.add_argument("--validate", action="store_true",
                  help="model selection on validation tasks carved from fold 0's training tasks")
  p.add_argument("--variant", action="append", default=None, choices=list(VARIANTS))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override an AlignConfig or VectorizerConfig field (repeatable)")
  args = p.parse_args(argv)
  cfg = NNRConfig(zoo_dir=args.zoo, cache_dir=args.cache)
  align_over, vec_over = split_overrides(
      args.set, {f.name for f in dataclasses.fields(align.AlignConfig)})
  cfg = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, **align_over),
                            vectorizer_overrides=tuple(sorted(vec_over.items())),
                            validate=args.validate)
  if args.variant:
    cfg = dataclasses.replace(cfg, variants=tuple(args.variant))
  if args.validate:
    out = run(cfg)
    print(json.dumps(out, indent=1))
    return
  if args.quick:
    cfg = dataclasses.replace(cfg, variants=(DEFAULT_VARIANT,), ablate_search_steps=False,
                              out="experiments/results/nnr-quick.json")
  if args.out:
    cfg = dataclasses.replace(cfg, out=args.out)
  if args.steps:
    cfg = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, steps=args.steps))
  out = run(cfg)
  print(format_table(out))
  ex = out.get("example")
  if ex:
    print(f"\nExample held-out query: {ex['query_task']} ({', '.join(ex['query_classes'])}); "
          f"top models by {ex['method']}:")
    for r, row in enumerate(ex["ranked"], 1):
      print(f"  {r}. {row['model_id']:44s} score {row['score']:.3f}"
            f"{'   <- trained on this task' if row['correct'] else ''}")
  print(f"\n{out['num_models']} models, {out['num_tasks']} tasks, {out['num_queries']} queries, "
        f"{cfg.folds} folds; {out['seconds']:.0f} s")


if __name__ == "__main__":
  main()
