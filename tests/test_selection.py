"""Fine-tune selection in the product: training targets, the accuracy head, `Proxy.select` and
`know2vec select`."""

import copy
import json

import numpy as np
import pytest
from scipy import stats

from know2vec_jax.cli import main
from know2vec_jax.config import override
from know2vec_jax.data import Task
from know2vec_jax.pipeline import Cache, draw_episodes
from know2vec_jax.proxy import Proxy, ProxyError, proxy_preset
from know2vec_jax.selection import SelectionConfig, draw_targets, finetunable, fit_head

# Small enough for the tiny zoo: 4 targets, 2 short fine-tunes each.
SMALL = ["objective=both", "selection.targets=4", "selection.finetune.steps=8",
         "selection.finetune.shots=20", "selection.finetune.test_per_class=40",
         "selection.episodes=2", "selection.shots=5", "selection.steps=300"]


def test_draw_targets_follow_the_zoo_and_respect_exclusions(tiny_zoo):
  zoo, _ = tiny_zoo
  tasks = [r.task for r in zoo.records.values()]
  targets = draw_targets(tasks, 6, seed=3)
  sources = {t.source for t in tasks}
  ks = {t.k for t in tasks}
  assert len(targets) == 6 and len({t.task for t in targets}) == 6
  assert all(t.split == "train" and t.task.source in sources and t.k in ks for t in targets)
  assert [t.task for t in draw_targets(tasks, 6, seed=3)] == [t.task for t in targets]
  # An excluded task is never drawn (class order does not matter).
  banned = Task(targets[0].task.source, tuple(reversed(targets[0].task.classes)))
  again = draw_targets(tasks, 6, seed=3, exclude=[banned])
  assert all(sorted(t.task.classes) != sorted(banned.classes) or t.task.source != banned.source
             for t in again)
  assert all(t.k == 3 for t in draw_targets(tasks, 4, ks=(3,), seed=0))
  with pytest.raises(ValueError, match="could not draw"):
    draw_targets(tasks, 10_000, ks=(2,), seed=0)


def test_accuracy_head_beats_a_constant_and_the_prior_on_held_out_targets():
  # Synthetic: a model's accuracy on a target is its quality plus how well its vector aligns
  # with the target's, so the best model depends on the target.
  rng = np.random.default_rng(0)
  e, n_models, n_targets, episodes = 8, 40, 24, 4
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  m = unit(rng.normal(size=(n_models, e))).astype(np.float32)
  centres = unit(rng.normal(size=(n_targets, e)))
  quality = rng.uniform(0.0, 0.1, n_models)
  acc = np.clip(0.5 + quality[None] + 0.3 * centres @ m.T, 0, 1).astype(np.float32)
  q = unit(np.repeat(centres, episodes, 0) + 0.1 * rng.normal(size=(n_targets * episodes, e)))
  qt = np.repeat(np.arange(n_targets), episodes)
  head, info = fit_head(q.astype(np.float32), qt, m, acc, SelectionConfig(steps=800), hidden=32)
  val = info["validation"]
  assert len(val["targets"]) == 6
  assert val["head_mae"] < 0.5 * val["constant_mae"]
  assert val["head_tau"] > val["prior_tau"] + 0.3
  # Each model's mean accuracy over the training targets, on the held-out ones.
  train = np.setdiff1d(np.arange(n_targets), val["targets"])
  assert val["per_model_mae"] == pytest.approx(np.mean(
      [np.abs(acc[train].mean(0) - acc[v]).mean() for v in val["targets"]]), rel=1e-5)
  assert val["head_mae"] < 0.6 * val["per_model_mae"]
  # The final fit (on every target) predicts them closely.
  pred = np.asarray(head(q[:, None, :], m[None]))
  assert np.mean(np.abs(pred - acc[qt])) < val["constant_mae"]


def test_the_heads_first_fit_never_sees_its_validation_targets(monkeypatch):
  """At the data level: the fit that the validation figures measure receives no query vector
  and no accuracy row of a validation target (matched back to the targets by value, not by the
  split the code computed); the final fit receives every target."""
  from know2vec_jax import selection
  rng = np.random.default_rng(1)
  n_targets, episodes, n_models, e = 10, 3, 6, 8
  q = rng.normal(size=(n_targets * episodes, e)).astype(np.float32)
  qt = np.repeat(np.arange(n_targets), episodes)
  acc = rng.uniform(0.2, 0.9, (n_targets, n_models)).astype(np.float32)
  m = rng.normal(size=(n_models, e)).astype(np.float32)
  fits = []
  real = selection._fit

  def spy(qq, mm, aa, *a, **k):
    fits.append((np.asarray(qq), np.asarray(aa)))
    return real(qq, mm, aa, *a, **k)
  monkeypatch.setattr(selection, "_fit", spy)
  _, info = fit_head(q, qt, m, acc, SelectionConfig(steps=20, holdout=0.3), hidden=8)
  val = info["validation"]["targets"]
  assert len(fits) == 2 and len(val) == 3

  def targets_of(queries, rows):
    by_query = {qt[np.flatnonzero((q == v).all(1))[0]] for v in queries}
    by_row = {int(np.flatnonzero((acc == r).all(1))[0]) for r in rows}
    return by_query, by_row
  first_q, first_rows = targets_of(*fits[0])
  assert not first_q & set(val) and not first_rows & set(val)
  assert first_q | set(val) == set(range(n_targets)) == first_rows | set(val)
  assert targets_of(*fits[1]) == (set(range(n_targets)), set(range(n_targets)))


def test_finetunable_keeps_networks_only(tiny_zoo):
  zoo, _ = tiny_zoo
  assert finetunable(zoo) == list(zoo.records)  # the tiny zoo is all networks
  assert finetunable(zoo, list(zoo.records)[:2]) == list(zoo.records)[:2]


@pytest.fixture(scope="module")
def both_proxy(tiny_zoo, tiny_zoo_dir, tmp_path_factory):
  cache = Cache(tmp_path_factory.mktemp("cache"))
  proxy = Proxy.train(tiny_zoo[0], override(proxy_preset("tiny"), SMALL), cache=cache,
                      zoo_dir=tiny_zoo_dir, progress=False)
  return proxy, cache


@pytest.fixture(scope="module")
def both_labels(both_proxy, tiny_zoo, tiny_zoo_dir):
  """The measured fine-tune accuracies the ``both`` proxy's head was fitted on, read back from the
  cache its training wrote them to (nothing is fine-tuned again)."""
  proxy, cache = both_proxy
  before = sorted((cache.path / "finetune").glob("*.npz"))
  labels = Proxy.measure_labels(tiny_zoo[0], proxy.config, cache=cache, zoo_dir=tiny_zoo_dir,
                                progress=False)
  assert sorted((cache.path / "finetune").glob("*.npz")) == before
  assert [s.name for s in labels.targets] == proxy.info["selection"]["target_names"]
  return labels


@pytest.fixture(scope="module")
def both_index(both_proxy, tiny_zoo):
  from know2vec_jax.blackbox import groups_from_zoo
  from know2vec_jax.proxy import zoo_metadata
  return both_proxy[0].build_index(groups_from_zoo(tiny_zoo[0]), zoo_metadata(tiny_zoo[0]))


def test_both_objective_keeps_retrieval_and_adds_selection(both_proxy, both_labels, both_index,
                                                           tiny_proxy, tiny_zoo, tiny_index,
                                                           tmp_path):
  """The ``both`` objective: the retrieval vectors of the ``retrieve`` objective, plus an accuracy
  head whose ``select`` rows are ranked by predicted accuracy and follow the measured labels: on a
  query of each training target, the model ranked first is one of the best measured there, and
  the order agrees with the measured one."""
  from know2vec_jax.data import few_shot, load_source
  proxy, cache = both_proxy
  zoo = tiny_zoo[0]
  assert proxy.has_accuracy_head and not tiny_proxy.has_accuracy_head
  sel = proxy.info["selection"]
  assert sel["targets"] == 4 and sel["models"] == len(zoo) and "validation" in sel
  assert len(list((cache.path / "finetune").glob("*.npz"))) == 4  # the labels are cached
  index = both_index
  # Retrieval is trained exactly as by the 'retrieve' objective: the same model vectors.
  np.testing.assert_allclose(index.vectors, tiny_index.vectors, atol=1e-5)
  src = load_source("digits")
  task = zoo.records[next(iter(zoo.records))].task
  images, labels = few_shot(src, task, 5, seed=0, split="test")
  rows = proxy.select(images, labels, index, k=5)
  pred = [r["predicted_accuracy"] for r in rows]
  assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and pred == sorted(pred, reverse=True)
  assert all(0.0 <= p <= 1.0 for p in pred) and rows[0]["arch"] in ("mlp", "cnn_s")
  assert len(proxy.select(images, labels, index, k=100)) == len(index)
  # Predictions follow the measured labels (a query drawn from each target's shot pool).
  for t, target in enumerate(both_labels.targets):
    measured = dict(zip(both_labels.model_ids, both_labels.accuracy[t]))
    picks, y = draw_episodes(target, 1, 5, seed=2)
    ranked = [measured[r["model_id"]] for r in proxy.select(target.images[picks[0]], y[0], index,
                                                            k=len(index))]
    assert max(ranked) - ranked[0] <= 0.01, (target.name, ranked)
    assert stats.kendalltau(ranked, -np.arange(len(ranked))).statistic > 0.3, (target.name, ranked)
  # Retrieval still answers from the same index.
  assert proxy.search(index, [(images, labels)], k=3).ids[0]
  # The head survives a save and load bit for bit.
  loaded = Proxy.load(proxy.save(tmp_path / "both"))
  assert loaded.has_accuracy_head and loaded.fingerprint == proxy.fingerprint
  assert loaded.select(images, labels, index, k=5) == rows


def test_selection_head_ranks_training_targets_better_than_the_prior(both_proxy, both_labels,
                                                                     both_index):
  """On each training target whose fine-tune accuracies the proxy measured, the head's predicted
  accuracies for query episodes of the target (the mean over 4 episodes from its shot pool, as
  the head's validation averages them) rank the models closer to the measured order than the
  query-blind prior does: each model's mean measured accuracy over the targets (this target
  included), what a head that ignores the query would learn. The mean Kendall tau and Spearman
  rho must both beat the prior's by a margin, the head's tau be positive on every target, and its
  favourite be within 0.01 of the best measured model on every target, where the prior's is 0.1
  or more below the best on at least one."""
  proxy, _ = both_proxy
  labels = both_labels
  models = both_index.vectors[[both_index.ids.index(m) for m in labels.model_ids]]
  prior = labels.accuracy.mean(0)
  head_tau, prior_tau, head_rho, prior_rho, head_regret, prior_regret = ([] for _ in range(6))
  for t, target in enumerate(labels.targets):
    acc = labels.accuracy[t]
    picks, y = draw_episodes(target, 4, 5, seed=1)
    # One episode per call, the shapes select() compiles for.
    pred = np.mean([proxy.predict_accuracy(proxy.embed_query(target.images[p], yy)[None],
                                           models)[0] for p, yy in zip(picks, y)], axis=0)
    head_tau.append(stats.kendalltau(acc, pred).statistic)
    prior_tau.append(stats.kendalltau(acc, prior).statistic)
    head_rho.append(stats.spearmanr(acc, pred).statistic)
    prior_rho.append(stats.spearmanr(acc, prior).statistic)
    head_regret.append(acc.max() - acc[np.argmax(pred)])
    prior_regret.append(acc.max() - acc[np.argmax(prior)])
  report = dict(head_tau=head_tau, prior_tau=prior_tau, head_rho=head_rho, prior_rho=prior_rho,
                head_regret=head_regret, prior_regret=prior_regret)
  assert np.mean(head_tau) >= np.mean(prior_tau) + 0.15, report
  assert np.mean(head_rho) >= np.mean(prior_rho) + 0.15, report
  assert min(head_tau) > 0, report
  assert max(head_regret) <= 0.01 and max(prior_regret) >= 0.1, report


def test_select_errors_are_clear(tiny_proxy, tiny_index, tiny_zoo):
  from know2vec_jax.data import few_shot, load_source
  zoo = tiny_zoo[0]
  images, labels = few_shot(load_source("digits"), zoo.records[next(iter(zoo.records))].task, 3,
                            seed=0)
  with pytest.raises(ProxyError, match="no accuracy head"):
    tiny_proxy.select(images, labels, tiny_index)
  from know2vec_jax.blackbox import groups_from_zoo
  from know2vec_jax.proxy import zoo_tasks
  with pytest.raises(ProxyError, match="objective 'both' trains on TransferLabels"):
    Proxy.fit(groups_from_zoo(zoo), zoo_tasks(zoo),
              override(proxy_preset("tiny"), ["objective=both"]), progress=False)


def test_select_ranks_by_the_configured_scorer(both_proxy, both_index, tiny_zoo):
  """``"head"`` ranks by predicted accuracy, ``"q.m"`` by the query vector against the model
  vectors; both rows carry the head's prediction; an unknown scorer is refused, in the config
  too."""
  from know2vec_jax.config import ConfigError
  from know2vec_jax.data import few_shot, load_source
  proxy, _ = both_proxy
  task = tiny_zoo[0].records[next(iter(tiny_zoo[0].records))].task
  images, labels = few_shot(load_source(task.source), task, 5, seed=1, split="test")
  index = both_index
  n = len(index)
  by_head = proxy.select(images, labels, index, k=n)
  assert proxy.config.selection.scorer == "head"
  assert proxy.select(images, labels, index, k=n, scorer="head") == by_head
  assert all(r["score"] == r["predicted_accuracy"] for r in by_head)
  by_qm = proxy.select(images, labels, index, k=n, scorer="q.m")
  q = proxy.embed_query(images, labels)
  qm = dict(zip(index.ids, np.asarray(index.vectors) @ q))
  assert [r["model_id"] for r in by_qm] == sorted(qm, key=lambda m: -qm[m])
  np.testing.assert_allclose([r["score"] for r in by_qm], [qm[r["model_id"]] for r in by_qm],
                             rtol=1e-5)
  pred = {r["model_id"]: r["predicted_accuracy"] for r in by_head}
  assert all(r["predicted_accuracy"] == pytest.approx(pred[r["model_id"]]) for r in by_qm)
  # The configured scorer is the default.
  qm_proxy = copy.copy(proxy)
  qm_proxy.config = override(proxy.config, ["selection.scorer=q.m"])
  assert qm_proxy.select(images, labels, index, k=n) == by_qm
  with pytest.raises(ProxyError, match="unknown scorer 'qm'"):
    proxy.select(images, labels, index, scorer="qm")
  with pytest.raises(ConfigError, match="selection.scorer must be one of"):
    override(proxy_preset("tiny"), ["selection.scorer=best"])


def test_select_shows_predicted_accuracy_only_with_its_validation_error():
  from know2vec_jax.cli import accuracy_note
  shown, note = accuracy_note({"targets": 4})  # fitted without held-out targets
  assert not shown and "error is unknown" in note
  assert accuracy_note(None)[0] is False
  val = {"targets": [1, 3], "head_mae": 0.05, "constant_mae": 0.09, "per_model_mae": 0.07,
         "head_tau": 0.5, "prior_tau": 0.3}
  shown, note = accuracy_note({"validation": val})
  assert shown and "2 held-out training targets" in note and "no better" not in note
  shown, note = accuracy_note({"validation": val | {"head_mae": 0.08}})
  assert shown and note.endswith("read the ranking, not the values")
  # A proxy saved before the per-model error was measured: the line without it.
  old = {k: v for k, v in val.items() if k != "per_model_mae"}
  shown, note = accuracy_note({"validation": old})
  assert shown and "each model's mean accuracy" not in note


def test_cli_select(both_proxy, tiny_zoo, tiny_zoo_dir, tiny_proxy_dir, tmp_path, capsys):
  proxy, _ = both_proxy
  pdir = proxy.save(tmp_path / "proxy")
  idx = tmp_path / "index"
  assert main(["index", "build", "--proxy", str(pdir), "--zoo", str(tiny_zoo_dir), "--out",
               str(idx), "--quiet"]) == 0
  capsys.readouterr()
  task = tiny_zoo[0].records[next(iter(tiny_zoo[0].records))].task
  spec = f"{task.source}:{','.join(map(str, task.classes))}"
  assert main(["select", "--proxy", str(pdir), "--index", str(idx), "--task", spec, "-k", "3",
               "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert len(out["results"]) == 3 and out["query"]["task"] == task.task_id
  assert all(0 <= r["predicted_accuracy"] <= 1 for r in out["results"])
  val = proxy.info["selection"]["validation"]
  assert out["accuracy_validation"] == val and "per_model_mae" in val
  assert out["scorer"] == "head"
  assert main(["select", "--proxy", str(pdir), "--index", str(idx), "--task", spec, "-k", "3",
               "--scorer", "q.m", "--json"]) == 0
  qm = json.loads(capsys.readouterr().out)
  assert qm["scorer"] == "q.m"
  scores = [r["score"] for r in qm["results"]]
  assert scores == sorted(scores, reverse=True)
  assert main(["select", "--proxy", str(pdir), "--index", str(idx), "--task", spec]) == 0
  text = capsys.readouterr().out
  assert "predicted_accuracy" in text
  note = text.strip().splitlines()[-1]
  assert note.startswith(f"predicted accuracy, measured on {len(val['targets'])} held-out")
  assert f"mean abs. error {val['head_mae']:.3f}" in note
  assert f"each model's mean accuracy {val['per_model_mae']:.3f}" in note
  assert ("no better than each model's mean accuracy" in note) == \
      (val["head_mae"] >= val["per_model_mae"])
  # A retrieval-only proxy: one line, exit 2.
  assert main(["select", "--proxy", str(tiny_proxy_dir), "--index", str(idx), "--task",
               spec]) == 2
  err = capsys.readouterr().err
  assert err.startswith("know2vec: error: proxy") and "no accuracy head" in err
  assert err.count("\n") == 1
