"""Generalisation of Know2Vec on the demo zoo: held-out tasks and perturbed queries, over several
aligner seeds, against random, untrained anchor matching and LEEP.

Command:   python -m experiments.generalise            (3 folds x 3 aligner seeds, the ablation rows)
           python -m experiments.generalise --quick    (fold 0 x 3 seeds, default proxy only)
Hardware:  2-core x86-64 CPU, 24 GiB, no GPU (measured there).
Runtime:   EXPECTED_RUNTIME below.
Expected:  EXPECTED_NUMBERS below (experiments/results/generalise.json, figure generalise.png).

Everything runs through the product: a fold is ``Proxy.train(zoo, cfg, model_ids=<the fold's
training models>)``, its held-out models join through ``Proxy.build_index``, queries are
``Proxy.embed_queries`` + ``ModelIndex.search``; baselines come from :mod:`know2vec_jax.baselines`.
The folds, queries and LEEP scoring are NNR's (:mod:`experiments.nnr`), so the clean numbers of a
row are comparable with the NNR table.

Protocol:
- Held-out tasks: 4-way tasks in ``folds`` folds; fold f's models are added to the index after
  training, and its tasks' queries are ``heldout``; the other queries are ``seen``. Each
  Know2Vec row is trained with ``seeds`` aligner seeds (``proxy.align.seed``); every figure is the
  mean over seeds, with the spread (max - min over seeds) beside it.
- Perturbations (:data:`know2vec_jax.data.perturb.SUITE`): every query's images perturbed
  (translations of 1-3 px in several directions, rotation +-10 degrees, noise sigma 0.1,
  contrast x 0.5, brightness x 0.7); ``drop`` = clean top-1 - perturbed top-1 over the same
  queries (seen and held-out together; per split in ``by_split``).
- Rows (:data:`ROWS`): ``know2vec`` is the configured proxy (the demo proxy with the levers of
  :data:`LEVERS`: phi trained on nuisance views with probability 0.8, half the aligner's query
  episodes shown as nuisance views); the ablation rows switch one lever
  off at a time: ``no-phi-augmentation`` (phi trained on clean images only), ``no-episode-views``
  (aligner episodes all clean), ``no-augmentation`` (both, the proxy before this experiment);
  ``with-centring`` adds a lever instead: phi reads every image with its content moved to the
  centre (``BackboneConfig.centre``).

Model selection (never the evaluation queries): the augmentation ranges were fixed a priori
(``BackboneConfig.aug_*``: shift 3 px, rotation 12 degrees, contrast 0.5-1.5, brightness 0.6-1.2,
noise up to 0.15). Whether to augment was measured on validation queries: 80 queries of 40
training tasks (5 shots from their *train* splits) under perturbations other than the suite's
(shift (1, -2), rotation 7 degrees, noise 0.07, contrast 0.6, brightness 0.8), a proxy trained on
every zoo model: top-1 without augmentation 0.64 / 0.96 / 0.95 / 0.33 / 0.99 (clean 1.00); with
phi augmentation (p = 0.8) 0.98 / 0.99 / 0.99 / 0.99 / 0.99 (clean 1.00); with phi augmentation
and half the episodes as views 0.99 / 1.00 / 0.99 / 1.00 / 1.00 (clean 1.00); adding centring
0.99 / 0.975 / 0.975 / 0.99 / 0.99 (clean 1.00): no better there, so centring is a measured row
(``with-centring``), not part of the configured proxy.
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
from experiments.nnr import (fold_assignment, fold_models, leep_matrix, make_queries,
                             zoo_tasks_sorted)
from know2vec_jax import config as config_lib
from know2vec_jax.baselines import run_baseline
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.config import Presets, require, require_known
from know2vec_jax.data.perturb import SUITE, perturb
from know2vec_jax.metrics import first_correct_rank, retrieval_metrics
from know2vec_jax.pipeline import Cache
from know2vec_jax.proxy import Proxy, ProxyConfig, proxy_preset, zoo_metadata
from know2vec_jax.zoo import load_zoo

EXPECTED_RUNTIME = (
    "full 31 min on the 2-core CPU from a built demo zoo with the knowledge cached (21 trainings "
    "of about 45 s plus 23 s of queries each; phi and episodes cached after the first); --quick "
    "4.6 min (277 s) with the knowledge, phi and episodes cached; from an empty cache add the "
    "knowledge (84 s) and phi (70 s)")
EXPECTED_NUMBERS = (
    "468 queries, 3 aligner seeds. know2vec (augmented phi + episode views), 3 folds: seen top-1 "
    "0.95, held-out top-1 0.52 +- 0.06 (spread over seeds), top-5 0.84, worst perturbation drop "
    "0.20 (shift up 3 px). Fold 0: no augmentation worst drop 0.64 (shift diagonal 2 px); with "
    "centring 0.09; held-out top-1 of every row 0.49-0.62 with spreads of 0.07-0.12. Anchor "
    "matching held-out 0.36, LEEP 0.38 (top-5 0.99), random 0.01")

# Each row is a set of overrides of the configured proxy.
ROWS = {
    "know2vec": (),
    "with-centring": ("backbone.centre=true",),
    "no-episode-views": ("episode_augment=0",),
    "no-phi-augmentation": ("backbone.augment=0",),
    "no-augmentation": ("backbone.augment=0", "episode_augment=0"),
}
DEFAULT_ROW = "know2vec"
# The levers this experiment measures, on top of the product's demo proxy (which keeps them off
# until the NNR table is regenerated with them).
LEVERS = ("backbone.augment=0.8", "episode_augment=0.5")


def _proxy(preset: str) -> ProxyConfig:
  return config_lib.override(proxy_preset(preset), LEVERS)
@dataclasses.dataclass(frozen=True)
class GeneraliseConfig:
  """The generalisation experiment.

  Attributes:
    proxy: the proxy of the ``know2vec`` row (the ablation rows override it, :data:`ROWS`).
    folds, evaluate_folds: folds of the 4-way tasks, and how many are trained (the first ones).
    seeds: aligner seeds per row (``proxy.align.seed``).
    rows: the Know2Vec rows to train.
    ablation_folds: folds the ablation rows are trained on (the first ones; the default row uses
      ``evaluate_folds``).
    queries_per_task, query_shots: evaluation queries per task and images per class.
    perturbations: names from :data:`know2vec_jax.data.perturb.SUITE`.
    leep: score LEEP (every query forwarded through every zoo model).
    seed: folds, queries and perturbation noise.
  """
  proxy: ProxyConfig = ProxyConfig()
  folds: int = 3
  evaluate_folds: int = 3
  seeds: tuple[int, ...] = (0, 1, 2)
  rows: tuple[str, ...] = tuple(ROWS)
  ablation_folds: int = 1
  queries_per_task: int = 3
  query_shots: int = 5
  perturbations: tuple[str, ...] = tuple(SUITE)
  leep: bool = True
  seed: int = 0

  def __post_init__(self):
    require(self.folds >= 2, f"folds must be >= 2, got {self.folds}")
    require(1 <= self.evaluate_folds <= self.folds and 1 <= self.ablation_folds <= self.folds,
            f"evaluate_folds and ablation_folds must be in 1..folds={self.folds}, got "
            f"{self.evaluate_folds}, {self.ablation_folds}")
    require(len(self.seeds) >= 1, "seeds must name at least one aligner seed")
    require(self.queries_per_task >= 1 and self.query_shots >= 1,
            "queries_per_task and query_shots must be >= 1")
    require_known(self.rows, ROWS, "row(s)")
    require_known(self.perturbations, SUITE, "perturbation(s)")


PRESETS: Presets[GeneraliseConfig] = Presets("generalise")


@PRESETS.register("full")
def _full() -> GeneraliseConfig:
  """3 folds x 3 seeds for the default row, fold 0 x 3 seeds for each ablation row, LEEP."""
  return GeneraliseConfig(proxy=_proxy("demo"))


@PRESETS.register("quick")
def _quick() -> GeneraliseConfig:
  """Fold 0 x 3 seeds, the default row only, no LEEP."""
  return GeneraliseConfig(proxy=_proxy("demo"), evaluate_folds=1, rows=(DEFAULT_ROW,),
                          leep=False)


@PRESETS.register("tiny")
def _tiny() -> GeneraliseConfig:
  """The tiny zoo and tiny proxy (tests): 3 folds, 2 seeds, two perturbations."""
  return GeneraliseConfig(proxy=_proxy("tiny"), seeds=(0, 1), rows=(DEFAULT_ROW,),
                          queries_per_task=2, query_shots=3,
                          perturbations=("shift_down_2", "contrast_0.5"), leep=False)


# ---- the protocol's pieces -----------------------------------------------------------------------

def search_ranks(proxy: Proxy, index, queries, q_task: np.ndarray, m_task: dict) -> np.ndarray:
  """Rank of the first model of each query's task, through ``embed_queries`` + ``search``.

  Args:
    proxy, index: the trained proxy and the index of every zoo model.
    queries: (task number, images, labels) triples.
    q_task: [Q] each query's task number.
    m_task: model id -> task number.

  Returns:
    int [Q], 1 = the first model retrieved is of the query's task.
  """
  qv = proxy.embed_queries([(x, y) for _, x, y in queries])
  scores, got = index.search(qv, k=len(index))
  correct = np.asarray([[m_task[m] == q_task[qi] for m in got[qi]] for qi in range(len(qv))])
  return first_correct_rank(scores, correct)


def perturbed(queries, name: str, seed: int):
  """The same queries with every image perturbed by ``name`` (noise seeded per query)."""
  return [(t, perturb(x, name, seed=seed * 7919 + qi), y) for qi, (t, x, y) in enumerate(queries)]


def summarise(ranks_by_seed: list[np.ndarray]) -> dict:
  """Mean and spread over seeds of top-1, top-5 and MRR; ``per_seed`` keeps each seed's."""
  per = [retrieval_metrics(r) for r in ranks_by_seed]
  out = {m: float(np.mean([p[m] for p in per])) for m in ("top1", "top5", "mrr")}
  out["spread"] = {m: float(np.ptp([p[m] for p in per])) for m in ("top1", "top5", "mrr")}
  out["per_seed"] = per
  return out


# ---- the experiment ------------------------------------------------------------------------------

def run(cfg: GeneraliseConfig, zoo_dir: str, cache_dir: str, out: str | None,
        progress: bool = True) -> dict:
  """Runs the experiment; writes ``out`` (JSON) and a figure beside it when ``out`` is given."""
  t_start = time.perf_counter()
  zoo = load_zoo(zoo_dir)
  cache = Cache(cache_dir)
  tasks = zoo_tasks_sorted(zoo)
  task_no = {t: i for i, t in enumerate(tasks)}
  m_task = {m: task_no[r.task] for m, r in zoo.records.items()}
  fold_of = fold_assignment(tasks, cfg.folds, cfg.seed)
  queries = make_queries(tasks, cfg.queries_per_task, cfg.query_shots, cfg.seed)
  q_task = np.asarray([i for i, _, _ in queries])
  q_fold = np.asarray([fold_of.get(tasks[i], -1) for i in q_task])
  views = {p: perturbed(queries, p, cfg.seed) for p in cfg.perturbations}
  meta = zoo_metadata(zoo)

  # ranks[row][view][seed] -> {fold: int [Q]}; a query is held out in its own fold only.
  ranks: dict = {}
  costs: dict = {}
  reference = None
  for row in cfg.rows:
    pcfg = config_lib.override(cfg.proxy, ROWS[row])
    n_folds = cfg.evaluate_folds if row == DEFAULT_ROW else cfg.ablation_folds
    for seed in cfg.seeds:
      scfg = config_lib.override(pcfg, [f"align.seed={seed}"])
      for fold in range(n_folds):
        train_ids, _ = fold_models(zoo, fold_of, fold)
        proxy = Proxy.train(zoo, scfg, model_ids=train_ids, cache=cache, progress=progress)
        index = proxy.build_index(groups_from_zoo(zoo, strategy=scfg.strategy), meta,
                                  cache=cache, progress=progress)
        t = time.perf_counter()
        for view, qs in [("clean", queries)] + list(views.items()):
          r = search_ranks(proxy, index, qs, q_task, m_task)
          ranks.setdefault(row, {}).setdefault(view, {}).setdefault(seed, {})[fold] = r
        c = costs.setdefault(row, {"train_s": [], "queries_s": []})
        c["train_s"].append(proxy.info["seconds"]["total"])
        c["queries_s"].append(time.perf_counter() - t)
        if reference is None and row == DEFAULT_ROW:
          reference = proxy

  def split_ranks(per_fold: dict, split: str) -> np.ndarray:
    """Ranks of one split pooled over the trained folds (held-out: each query in its fold)."""
    parts = []
    for fold, r in sorted(per_fold.items()):
      keep = (q_fold == fold) if split == "heldout" else (q_fold != fold)
      parts.append(r[keep])
    return np.concatenate(parts)

  def row_summary(by_view: dict, folds) -> dict:
    """One row's figures over the given folds: mean and spread over seeds."""
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
    s["folds"] = list(folds)
    return s

  summary: dict = {}
  common = range(min(cfg.ablation_folds, cfg.evaluate_folds))
  for row, by_view in ranks.items():
    trained = sorted(by_view["clean"][cfg.seeds[0]])
    summary[row] = row_summary(by_view, trained)
    # Every row on the folds all rows were trained on: the like-for-like ablation.
    summary[row]["common_folds"] = row_summary(by_view, common)

  # Baselines on the same queries: their scores do not depend on the fold or the aligner seed.
  baselines: dict = {}
  groups = groups_from_zoo(zoo, strategy=cfg.proxy.strategy)
  ids, m_grid, m_mask = reference.model_grids(groups, cache=cache)
  correct = np.asarray([[m_task[m] == q_task[qi] for m in ids] for qi in range(len(queries))])

  def baseline_row(scores_by_view: dict, folds=range(cfg.evaluate_folds)) -> dict:
    """A fold-independent scorer read like the Know2Vec rows: each fold's held-out and seen
    queries pooled (``common_folds``: on the ablation rows' folds)."""
    clean = first_correct_rank(scores_by_view["clean"], correct)
    row = {split: retrieval_metrics(split_ranks({f: clean for f in folds}, split))
           for split in ("seen", "heldout")}
    row["clean_top1"] = retrieval_metrics(clean)["top1"]
    row["perturbations"] = {}
    for view, sc in scores_by_view.items():
      if view != "clean":
        top1 = retrieval_metrics(first_correct_rank(sc, correct))["top1"]
        row["perturbations"][view] = {"top1": top1, "drop": row["clean_top1"] - top1}
    if folds != common:
      row["common_folds"] = baseline_row(scores_by_view, common)
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

  res = {
      "summary": {"seen": {m: summary[DEFAULT_ROW]["seen"][m] for m in ("top1", "top5", "mrr")},
                  "heldout": {m: summary[DEFAULT_ROW]["heldout"][m]
                              for m in ("top1", "top5", "mrr")},
                  "perturbations": {v: {"top1": e["top1"], "drop": e["drop"]} for v, e in
                                    summary[DEFAULT_ROW]["perturbations"].items()}},
      "rows": summary, "baselines": baselines,
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


def plot(out: dict, path: str) -> None:
  """Top-1 per perturbation for each Know2Vec row and the anchor-matching baseline."""
  plt = pyplot()
  if plt is None:
    return
  rows = {r: s["common_folds"] for r, s in out["rows"].items()}  # like for like
  views = ["clean"] + list(next(iter(rows.values()))["perturbations"])
  fig, ax = plt.subplots(figsize=(11, 4.5))
  series = [(r, [s["clean_top1"]] + [s["perturbations"][v]["top1"] for v in views[1:]],
             [0.0] + [s["perturbations"][v]["spread"] for v in views[1:]])
            for r, s in rows.items()]
  a = out["baselines"]["anchor-matching (untrained)"]
  a = a.get("common_folds", a)
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
               f"fold(s) {next(iter(rows.values()))['folds']} (mean over aligner seeds, bars: "
               f"spread)", fontsize=9)
  ax.legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(out: dict) -> str:
  """Markdown: the configured proxy and the baselines over every trained fold, then every row on
  the folds all rows were trained on (the ablation), each with its worst perturbation drop."""
  def line(name, s, spread: bool):
    worst = max(s["perturbations"].items(), key=lambda kv: kv[1]["drop"], default=(None, None))
    w = f"{worst[1]['drop']:.3f} ({worst[0]})" if worst[0] else "-"
    pm = (lambda sp: f" ± {s[sp]['spread']['top1']:.3f}") if spread else (lambda sp: "")
    return (f"| {name} | {s['seen']['top1']:.3f}{pm('seen')} | {s['heldout']['top1']:.3f}"
            f"{pm('heldout')} | {s['heldout']['top5']:.3f} | {s['heldout']['mrr']:.3f} | {w} |")
  head = ["| method | seen top-1 | held-out top-1 | held-out top-5 | held-out MRR | "
          "worst perturbation drop |", "|---|---|---|---|---|---|"]
  d = out["rows"][DEFAULT_ROW]
  lines = [f"Every trained fold ({len(d['folds'])}):"] + head
  lines.append(line(DEFAULT_ROW, d, True))
  lines += [line(n, b, False) for n, b in out["baselines"].items()]
  if len(out["rows"]) > 1:
    lines += ["", f"Ablation, on the folds every row was trained on "
              f"({len(d['common_folds']['folds'])}):"] + head
    lines += [line(r, s["common_folds"], True) for r, s in out["rows"].items()]
    lines += [line(n, b["common_folds"], False) for n, b in out["baselines"].items()
              if "common_folds" in b]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_config_arguments(p, PRESETS, "full")
  add_run_arguments(p, "results JSON (default experiments/results/generalise.json, "
                    "generalise-quick.json with --quick)",
                    "cache of derived artifacts (knowledge, backbone, episodes)",
                    quick="the 'quick' preset")
  args = p.parse_args(argv)
  if args.quick:
    args.preset = "quick"
  cfg = config_from_args(p, PRESETS, args)
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
