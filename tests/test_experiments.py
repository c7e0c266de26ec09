"""The experiments' protocol logic, on the tiny zoo: folds, priors, targets, per-query costs, and an
NNR run end to end through the product."""

import numpy as np
import pytest

import leak_spies
from experiments import nnr, sfmte
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.config import ConfigError
from know2vec_jax.data import Task, load_source
from know2vec_jax.transfer import TransferTarget, leak_key, leaks


def test_nnr_folds_keep_every_held_out_model_and_task_out_of_training(tiny_zoo):
  zoo = tiny_zoo[0]
  tasks = nnr.zoo_tasks_sorted(zoo)
  fold_of = nnr.fold_assignment(tasks, 3, seed=0)
  four = [t for t in tasks if t.k == 4]
  assert sorted(fold_of, key=str) == sorted(four, key=str)  # every 4-way task, and only those
  held_once = []
  for fold in range(3):
    train, held = nnr.fold_models(zoo, fold_of, fold)
    assert sorted(train + held) == sorted(zoo.records)
    held_tasks = {zoo.records[m].task for m in held}
    assert held_tasks == {t for t, f in fold_of.items() if f == fold}
    assert not held_tasks & {zoo.records[m].task for m in train}
    held_once += sorted(held_tasks, key=str)
  assert sorted(held_once, key=str) == sorted(four, key=str)  # each held out exactly once


def _record_queries(monkeypatch, module) -> list:
  """Records every evaluation query ``module.make_queries`` hands the experiment."""
  made = []
  real = module.make_queries

  def spy(*a, **k):
    out = real(*a, **k)
    made.extend(out)
    return out
  monkeypatch.setattr(module, "make_queries", spy)
  return made


def _assert_no_query_reaches_training(trainings, queries, zoo) -> None:
  """Data-level leak check of one experiment run: no evaluation query image reaches anything
  fitted (pool, phi's labelled and unlabelled images, the aligner's episodes, the
  calibration) of any training, and each training's episodes and calibration read its own
  training tasks and models only."""
  q_images = leak_spies.image_set(np.concatenate([x for _, x, _ in queries]))
  fitted = 0
  for i, t in enumerate(trainings):
    held = set(zoo.records) - set(t["model_ids"])
    train_tasks = {zoo.records[m].task for m in t["model_ids"]}
    for part, images in leak_spies.fitted_images(t).items():
      assert leak_spies.count_in(images, q_images) == 0, (i, part)
      fitted += 1
    names = {s.name.rsplit(":", 1)[0] for s in t.get("episode_sets", [])}
    assert names <= {task.task_id for task in train_tasks}, (i, names)
    assert set(t.get("calibration_tasks", [])) <= train_tasks, i
    assert not held & set(t.get("calibration_models", [])), i
    # phi learned the (source, class) pairs of this training's tasks only: the phi it trained,
    # or (read from the cache) one an earlier training trained on those pairs.
    pairs = {f"{task.source}:{load_source(task.source).class_names[c]}" for task in train_tasks
             for c in task.classes}
    if "phi_names" in t:
      assert set(t["phi_names"]) <= pairs, (i, set(t["phi_names"]) - pairs)
    else:
      assert any(set(r["phi_names"]) <= pairs for r in trainings[:i] if "phi_names" in r), i
  # The spies saw the data: a pool, phi's images, episodes and calibration queries.
  assert fitted >= 4 and any("phi_images" in t for t in trainings)


def test_nnr_run_trains_each_fold_without_its_held_out_models_and_counts_leep(
    tiny_zoo_dir, tmp_path, monkeypatch):
  """The experiment itself, through Proxy: the models each fold's proxy trains on never include
  that fold's held-out models, no evaluation query image reaches anything fitted, and LEEP's
  forwards per query are what the black boxes counted."""
  trainings = leak_spies.install(monkeypatch)
  queries = _record_queries(monkeypatch, nnr)
  cfg = nnr.PRESETS.get("tiny")
  out = nnr.run(cfg, str(tiny_zoo_dir), str(tmp_path / "cache"), None, progress=False)
  from know2vec_jax.zoo import load_zoo
  zoo = load_zoo(tiny_zoo_dir)
  tasks = nnr.zoo_tasks_sorted(zoo)
  fold_of = nnr.fold_assignment(tasks, cfg.folds, cfg.seed)
  assert len(trainings) == cfg.folds
  for fold, t in enumerate(trainings):
    assert not {m for m in t["model_ids"] if fold_of.get(zoo.records[m].task, -1) == fold}
  _assert_no_query_reaches_training(trainings, queries, zoo)
  assert set(out["summary"]) == {nnr.DEFAULT_VARIANT, nnr.VECTORS_ONLY, "random",
                                 "anchor-matching (untrained)", "leep"}
  # Every query forwards K * shots images through every model: the counters say exactly that.
  ks = [t.k for t in tasks for _ in range(cfg.queries_per_task)]
  want = len(zoo) * cfg.query_shots * np.mean(ks)
  assert out["costs"]["leep"]["forwards_per_query"] == pytest.approx(want)
  # Each task's queries are held out in exactly one fold and seen in the others.
  for method, splits in out["ranks"].items():
    held = {int(q) for q in splits["heldout"]}
    four = [i for i, t in enumerate(out["query_tasks"]) if t.count("-") == 3]
    assert held == set(four), method


def test_leep_matrix_forwards_equal_the_counters(tiny_zoo):
  zoo = tiny_zoo[0]
  tasks = nnr.zoo_tasks_sorted(zoo)
  queries = nnr.make_queries(tasks[:2], 1, 3, seed=0)
  groups = groups_from_zoo(zoo)
  ids = [m for g in groups for m in g.model_ids]
  scores, forwards, _ = nnr.leep_matrix(groups, queries, ids)
  assert scores.shape == (2, len(zoo)) and np.all(np.isfinite(scores))
  assert forwards == [len(zoo) * len(y) for _, _, y in queries]
  assert sum(forwards) == sum(int(g.queries.sum()) for g in groups)
  # Batching the queries changes nothing: each query alone gives its own row.
  from know2vec_jax.baselines import leep_scores
  _, x, y = queries[1]
  for g in groups_from_zoo(zoo):
    want = np.asarray(leep_scores(g(x), y, int(y.max()) + 1))
    got = scores[1, [ids.index(m) for m in g.model_ids]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sfmte_leave_one_out_prior_never_reads_the_target_it_ranks():
  rng = np.random.default_rng(0)
  acc = rng.random((6, 9))
  for i in range(6):
    changed = acc.copy()
    changed[i] = rng.random(9) * 100  # anything at all in the target's own row
    np.testing.assert_array_equal(sfmte.loo_prior(acc, i), sfmte.loo_prior(changed, i))
    assert sfmte.other_targets(acc, i).shape == (5, 9)
  # ... while every other row does change it.
  changed = acc.copy()
  changed[1] = acc[1][::-1]
  assert not np.array_equal(sfmte.loo_prior(acc, 0), sfmte.loo_prior(changed, 0))


def _demo_zoo_records():
  """The demo zoo's records as its specs define them (no training): what the benchmarks read."""
  import types

  from know2vec_jax.zoo import ModelRecord, preset_specs
  recs = {}
  for s in preset_specs("demo"):
    recs[s.model_id] = ModelRecord(s.model_id, s.arch, s.task, (), s.seed, s.steps,
                                   s.learning_rate, s.batch_size, s.label_noise, s.role, 0.0,
                                   0.0, "", 0)
  return types.SimpleNamespace(records=recs)


@pytest.mark.parametrize("bench", sfmte.BENCHMARKS)
def test_sfmte_targets_obey_the_leak_rule(bench):
  # Over the experiment's actual lists: no evaluation target shares (dataset, class set) with a
  # model of the benchmark's zoo or a training target, in any domain.
  zoo = _demo_zoo_records()
  setup = sfmte.benchmark_setup(bench, sfmte.PRESETS.get("all"), zoo)
  ev, train = setup["eval_targets"], setup["train_targets"]
  tasks = [zoo.records[m].task for m in setup["ids"]]
  assert leaks([t.task for t in ev], tasks, [t.task for t in train]) == []
  assert len(ev) >= 10 and len(train) == getattr(sfmte.PRESETS.get("all"), bench).train_targets
  assert {t.split for t in train} == {"train"} and {t.split for t in ev} == {"test"}
  if bench == "capacity":
    # The original list had three leaking targets; they are dropped and named.
    assert set(setup["dropped_leaking"]) == {"fashion-shirt-tshirt", "fashion-flip-10",
                                             "fashion-lowcontrast-10"}
    # Training targets stay in the zoo's own domains; evaluation targets may not.
    assert {t.task.source.split("+", 1)[-1] for t in train if "+" in t.task.source} <= {
        "invert", "rot90", "blur"}
  elif bench == "mixed":
    # Every model of the zoo (all neural), targets drawn like the product's over its sources.
    assert len(setup["ids"]) == len(zoo.records) == 435
    assert {t.kind for t in ev} == {"mixed"} and len(ev) == 24
    assert {t.k for t in ev} <= {2, 4, 10} and len({t.task.source for t in ev}) >= 10
  else:
    # Matched models (one architecture and budget) and targets in every source of the zoo.
    recs = [zoo.records[m] for m in setup["ids"]]
    assert len(recs) == 120 and {(r.arch, r.steps, r.k) for r in recs} == {("mlp", 400, 4)}
    assert {t.task.source for t in ev} == set(sfmte.QD_SOURCES)
    assert len({leak_key(t.task) for t in ev}) == len(ev)  # one domain per class set
  # The rule itself catches what it is for: a zoo model's classes in another domain.
  first = ev[0].task
  assert leaks([first], [Task(first.source.split("+")[0] + "+invert", first.classes[::-1])])


def test_leak_rule_catches_training_targets_in_other_domains():
  ev = [Task("fashion_mnist+flip", (0, 2, 4))]
  assert leaks(ev, training=[Task("fashion_mnist", (4, 2, 0))])
  assert not leaks(ev, training=[Task("mnist5k", (0, 2, 4))])
  assert not leaks(ev, [Task("fashion_mnist", (0, 2, 4, 6))])


def test_sfmte_benchmark_aligner_settings_reach_the_label_trained_variants_only():
  tuned = ("transfer.target_temperature=2.0", "align.steps=7")
  own = sfmte.variant_proxy("know2vec-attention-shared", 10, 1, tuned)
  assert own.transfer.target_temperature == 2.0 and own.align.steps == 7
  assert own.align.seed == 1 and own.shots == 10
  # know2vec-both's vectors are the retrieval proxy's: the benchmark's aligner leaves them be.
  both = sfmte.variant_proxy("know2vec-both", 10, 1, tuned)
  assert both.align == sfmte.variant_proxy("know2vec-both", 10, 1).align
  with pytest.raises(ConfigError, match="nope"):
    sfmte.BenchmarkConfig(aligner=("transfer.nope=1",))


def test_sfmte_label_trained_rows_are_the_select_preset():
  """The query-dependent benchmark's label-trained proxy is `know2vec train --preset select`
  with only what the benchmark must set (its queries' shots, the seed, a train-split pool)."""
  from know2vec_jax import config as config_lib
  from know2vec_jax.proxy import proxy_preset
  bench = sfmte.PRESETS.get("full").query_dependent
  got = sfmte.variant_proxy("know2vec-attention-shared", bench.eval_gt.shots, 2, bench.aligner)
  want = config_lib.override(proxy_preset("select"), [
      f"shots={bench.eval_gt.shots}", "align.seed=2", "selection.seed=2",
      f"pool.split={sfmte.POOL_SPLIT}"])
  assert got == want
  assert want.objective == "finetune" and want.selection.scorer == "q.m"
  assert want.selection.targets == 192 and want.align.steps == 2000


def test_sfmte_baseline_costs_are_the_black_boxes_counts(tiny_zoo):
  zoo = tiny_zoo[0]
  ids = list(zoo.records)
  target = TransferTarget("t", Task("digits", (0, 1, 2)), split="test")
  x = np.concatenate([zoo_images for zoo_images in [_images(target, 4)]])
  y = np.repeat(np.arange(3), 4).astype(np.int32)
  groups = groups_from_zoo(zoo)
  before = sum(int(g.queries.sum()) for g in groups)
  scores, costs = sfmte.score_baselines(["leep", "logme-features (white-box)", "random"], groups,
                                        zoo, x, y, 3, ids, None, 0)
  counted = sum(int(g.queries.sum()) for g in groups) - before
  # One warm-up pass and one timed pass through every model; the cost is one pass.
  assert counted == 2 * len(ids) * len(x)
  assert costs["leep"]["forwards"] == costs["logme-features (white-box)"]["forwards"] == \
      len(ids) * len(x)
  assert costs["random"]["forwards"] == 0
  assert all(s.shape == (len(ids),) for s in scores.values())


def test_sfmte_run_learns_from_its_training_targets_only(tiny_zoo_dir, tmp_path, monkeypatch):
  """A tiny SF-MTE run end to end through the product (the query-dependent benchmark on the tiny
  zoo's MLPs and digits sources, the tiny proxy with the fine-tune objective, small protocols):
  the transfer labels reaching ``Proxy.train`` are exactly the training targets' shot pools and
  measured accuracies, the leak rule holds between them, the zoo and the evaluation targets, and
  no image of an evaluation target (its shot pool or test images) reaches anything fitted."""
  from know2vec_jax import config as config_lib
  from know2vec_jax.pipeline import LabelledSet
  from know2vec_jax.proxy import proxy_preset
  from know2vec_jax.transfer import FinetuneConfig, ground_truth, target_data
  from know2vec_jax.zoo import load_zoo
  trainings = leak_spies.install(monkeypatch)
  monkeypatch.setattr(sfmte, "matched", lambda rec: rec.arch == "mlp")
  monkeypatch.setattr(sfmte, "QD_SOURCES", ("digits", "digits+invert"))
  monkeypatch.setattr(sfmte, "_sfmte_proxy",
                      lambda: config_lib.override(proxy_preset("tiny"), ["objective=finetune"]))
  gt_cfg = FinetuneConfig(mode="linear", steps=10, shots=5, test_per_class=20, runs=2)
  bench = sfmte.BenchmarkConfig(gt_cfg, gt_cfg, 4, ("know2vec-attention-shared",),
                                ("align.steps=20",))
  cfg = sfmte.SFMTEConfig(benchmarks=("query_dependent",), query_dependent=bench, seeds=(0,),
                          baselines=("random", "source-aware prior"))
  out = sfmte.run(cfg, str(tiny_zoo_dir), str(tmp_path / "cache"), None, None, progress=False)
  res = out["benchmarks"]["query_dependent"]
  zoo = load_zoo(tiny_zoo_dir)
  # The benchmark's lists, recomputed (deterministic in the zoo and the config).
  setup = sfmte.benchmark_setup("query_dependent", cfg, zoo)
  ids, train, ev = setup["ids"], setup["train_targets"], setup["eval_targets"]
  assert res["model_ids"] == ids and len(ids) == 4 and len(train) == 4 and len(ev) == 4
  assert res["training_targets"] == [t.name for t in train]
  assert sorted(res["targets"]) == sorted(t.name for t in ev)
  assert leaks([t.task for t in ev], [zoo.records[m].task for m in ids],
               [t.task for t in train]) == []
  (rec,) = trainings
  assert rec["model_ids"] == ids
  labels = rec["transfer"]
  # Exactly the training targets' shot pools, and their accuracies as measured from scratch.
  want = [LabelledSet.from_target(t, gt_cfg) for t in train]
  assert [s.name for s in labels.targets] == [s.name for s in want]
  for got, w in zip(labels.targets, want):
    np.testing.assert_array_equal(got.images[got.index], w.images[w.index])
    np.testing.assert_array_equal(got.labels, w.labels)
  assert labels.model_ids == ids
  measured = ground_truth(zoo, None, ids, list(train) + list(ev), gt_cfg)
  np.testing.assert_allclose(labels.accuracy, np.stack([measured[t.name].mean(0) for t in train]),
                             atol=1e-6)
  # No evaluation image reaches the labels, the pool, phi, the episodes or the calibration.
  ev_images = set()
  for t in ev:
    ev_images |= leak_spies.image_set(target_data(t, gt_cfg.shots, gt_cfg.test_per_class).images)
  parts = leak_spies.fitted_images(rec)
  parts.update({f"labels {s.name}": s.images[s.index] for s in labels.targets})
  assert {"pool", "phi_images"} <= set(parts) and len(parts) >= 6
  for part, images in parts.items():
    assert leak_spies.count_in(images, ev_images) == 0, part
  assert set(res["summary"]) >= {"know2vec-attention-shared (accuracy head)",
                                 "know2vec-attention-shared (q.m)", "random",
                                 "prior (training targets)", "source-aware prior"}
  assert all(-1 <= s["mean_tau_symmetric"] <= 1 for s in res["summary"].values()
             if "mean_regret" in s)
  # Paired per-target differences of the key comparisons that ran, both tau conventions.
  pair = res["paired"]["know2vec-attention-shared (q.m) - source-aware prior"]
  for metric in ("weighted_tau", "weighted_tau_symmetric"):
    want = np.mean([res["per_target"]["know2vec-attention-shared (q.m)"][n][metric]
                    - res["per_target"]["source-aware prior"][n][metric] for n in res["targets"]
                    if n in res["per_target"]["source-aware prior"]])
    assert pair[metric]["mean"] == pytest.approx(want)
    assert pair[metric]["targets"] == len(res["per_target"]["source-aware prior"])
  assert "know2vec-attention-shared (q.m) - logme-features (white-box)" not in res["paired"]
  # Training-time labels: 4 training targets x 4 models x 2 runs for every row that reads them.
  cost = {m: s["train_finetunes"] for m, s in res["summary"].items() if "mean_regret" in s}
  assert cost == {"know2vec-attention-shared (accuracy head)": 32,
                  "know2vec-attention-shared (q.m)": 32, "prior (training targets)": 32,
                  "source-aware prior": 32, "random": 0}
  # Accuracy predictors the head is measured against, recomputed from the measured accuracies.
  truth = {t.name: measured[t.name].mean(0) for t in ev if t.name not in res["dropped_saturated"]}
  assert truth
  ref = res["accuracy_reference_mae"]
  assert ref["per-model mean"] == pytest.approx(np.mean(
      [np.abs(labels.accuracy.mean(0) - a).mean() for a in truth.values()]), abs=1e-6)
  assert ref["constant"] == pytest.approx(np.mean(
      [np.abs(labels.accuracy.mean() - a).mean() for a in truth.values()]), abs=1e-6)
  assert set(ref) == {"constant", "per-model mean", "source-aware prior",
                      "source-aware prior (5 nearest)"}
  head = res["summary"]["know2vec-attention-shared (accuracy head)"]
  assert head["accuracy_mae_ratio_per_model_mean"] == pytest.approx(
      head["accuracy_mae"] / ref["per-model mean"])


def _images(target, per_class):
  from know2vec_jax.data import load_source, task_split
  data = load_source(target.task.source)
  idx, y = task_split(data, target.task, "test")
  pick = np.concatenate([idx[y == c][:per_class] for c in range(target.k)])
  return data.test_images[pick]


@pytest.fixture(scope="module")
def generalise_run(tiny_zoo_dir, tmp_path_factory):
  """One tiny generalisation run (the slowest experiment test: run once, asserted by two tests),
  with what reached every ``Proxy.train`` call's fitted parts and every evaluation query
  recorded."""
  from experiments import generalise
  tmp = tmp_path_factory.mktemp("generalise")
  cfg = generalise.PRESETS.get("tiny")
  with pytest.MonkeyPatch.context() as mp:
    trained = leak_spies.install(mp)
    queries = _record_queries(mp, generalise)
    out = generalise.run(cfg, str(tiny_zoo_dir), str(tmp / "cache"),
                         str(tmp / "generalise.json"), progress=False)
  return cfg, out, trained, tmp, queries


def test_generalise_run_through_the_product_reports_seeds_spread_and_drops(generalise_run):
  """The generalisation experiment end to end on the tiny zoo: every seed trains, held-out and
  seen are pooled over folds, each perturbation's drop is clean minus perturbed top-1."""
  cfg, out, _, tmp, _ = generalise_run
  row = out["rows"]["know2vec"]
  assert len(row["heldout"]["per_seed"]) == len(cfg.seeds) == 2
  for split in ("seen", "heldout"):
    per = [p["top1"] for p in row[split]["per_seed"]]
    assert row[split]["top1"] == pytest.approx(np.mean(per))
    assert row[split]["spread"]["top1"] == pytest.approx(max(per) - min(per))
  assert sorted(row["perturbations"]) == sorted(cfg.perturbations)
  for e in row["perturbations"].values():
    assert e["drop"] == pytest.approx(row["clean_top1"] - e["top1"])
  assert set(out["summary"]) == {"seen", "heldout", "leave_one_family_out", "perturbations",
                                 "ood"}
  ood = out["summary"]["ood"]
  assert 0 <= ood["false_alarm"] <= 1 and ood["detection"]["noise"] >= 0
  assert set(out["baselines"]) == {"anchor-matching (untrained)", "random"}
  assert (tmp / "generalise.json").exists()


def test_generalise_perturbed_queries_change_only_the_images(tiny_zoo):
  from experiments import generalise
  zoo = tiny_zoo[0]
  tasks = nnr.zoo_tasks_sorted(zoo)
  queries = nnr.make_queries(tasks, 1, 3, seed=0)
  views = generalise.perturbed(queries, "shift_down_2", seed=0)
  for (t, x, y), (t2, x2, y2) in zip(queries, views):
    assert t == t2 and np.array_equal(y, y2) and x.shape == x2.shape
    assert not np.allclose(x, x2)


def test_leave_one_family_out_split_keeps_the_family_out_of_training(tiny_zoo, generalise_run):
  from experiments import generalise
  zoo = tiny_zoo[0]
  for fam in {r.arch for r in zoo.records.values()}:
    train, held = generalise.family_split(zoo, fam)
    assert sorted(train + held) == sorted(zoo.records)
    assert not [m for m in train if zoo.records[m].arch == fam]
    assert all(zoo.records[m].arch == fam for m in held)
  excl = generalise.exclusive_tasks(zoo)
  for fam, tasks in excl.items():
    for t in tasks:
      assert {r.arch for r in zoo.records.values() if r.task == t} == {fam}
  # The run trains each left-out family's proxy without any of its models.
  cfg, out, trained, _, queries = generalise_run
  lofo = trained[-len(cfg.seeds) * len(cfg.families):]
  for t in lofo:
    assert not [m for m in t["model_ids"] if zoo.records[m].arch in cfg.families]
  # The fold trainings leave their fold's tasks out; no evaluation query image (clean or of the
  # out-of-distribution tasks) reaches anything fitted.
  fold_of = nnr.fold_assignment(nnr.zoo_tasks_sorted(zoo), cfg.folds, cfg.seed)
  folds = [sorted(nnr.fold_models(zoo, fold_of, f)[0]) for f in range(cfg.folds)]
  for t in trained[:-len(lofo)]:
    assert sorted(t["model_ids"]) in folds
  _assert_no_query_reaches_training(trained, queries, zoo)
  fam = out["summary"]["leave_one_family_out"]
  assert set(fam) == set(cfg.families) and fam["cnn_s"]["neural"]
  assert set(out["summary"]["ood"]["detection"]) >= {"noise"}


def test_validation_family_split_turns_shared_tasks_into_the_familys_own(tiny_zoo):
  """Model selection's leave-one-family-out: the drawn tasks are training tasks the family shares
  with another family; neither the family nor any model of those tasks trains, and in the index
  each drawn task has the family's models alone."""
  from experiments import generalise
  zoo = tiny_zoo[0]
  tasks = sorted({r.task for r in zoo.records.values()}, key=lambda t: t.task_id)
  archs = {t: {r.arch for r in zoo.records.values() if r.task == t} for t in tasks}
  checked = 0
  for fam in sorted({r.arch for r in zoo.records.values()}):
    drawn, train, index = generalise.validation_family_split(zoo, fam, tasks, 12, seed=0)
    assert all(fam in archs[t] and len(archs[t]) > 1 for t in drawn)
    assert not [m for m in train if zoo.records[m].arch == fam or zoo.records[m].task in drawn]
    assert set(train) <= set(index)
    for t in drawn:
      assert {zoo.records[m].arch for m in index if zoo.records[m].task == t} == {fam}
    checked += len(drawn)
    # Only the tasks of the pool it is given are drawn.
    assert generalise.validation_family_split(zoo, fam, [], 12, seed=0)[0] == []
  assert checked > 0
