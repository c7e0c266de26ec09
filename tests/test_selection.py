"""Fine-tune selection in the product: training targets, the accuracy head, `Proxy.select` and
`know2vec select`."""

import json

import numpy as np
import pytest

from know2vec_jax.cli import main
from know2vec_jax.config import override
from know2vec_jax.data import Task
from know2vec_jax.pipeline import Cache
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
  # The final fit (on every target) predicts them closely.
  pred = np.asarray(head(q[:, None, :], m[None]))
  assert np.mean(np.abs(pred - acc[qt])) < val["constant_mae"]


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


def test_both_objective_keeps_retrieval_and_adds_selection(both_proxy, tiny_proxy, tiny_zoo,
                                                           tiny_index, tmp_path):
  from know2vec_jax.blackbox import groups_from_zoo
  from know2vec_jax.data import few_shot, load_source
  from know2vec_jax.proxy import zoo_metadata
  proxy, cache = both_proxy
  zoo = tiny_zoo[0]
  assert proxy.has_accuracy_head and not tiny_proxy.has_accuracy_head
  sel = proxy.info["selection"]
  assert sel["targets"] == 4 and sel["models"] == len(zoo) and "validation" in sel
  assert len(list((cache.path / "finetune").glob("*.npz"))) == 4  # the labels are cached
  index = proxy.build_index(groups_from_zoo(zoo), zoo_metadata(zoo))
  # Retrieval is trained exactly as by the 'retrieve' objective: the same model vectors.
  np.testing.assert_allclose(index.vectors, tiny_index.vectors, atol=1e-5)
  src = load_source("digits")
  task = zoo.records[next(iter(zoo.records))].task
  images, labels = few_shot(src, task, 5, seed=0, split="test")
  rows = proxy.select(images, labels, index, k=5)
  pred = [r["predicted_accuracy"] for r in rows]
  assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and pred == sorted(pred, reverse=True)
  assert all(0.0 <= p <= 1.0 for p in pred) and rows[0]["arch"] in ("mlp", "cnn_s")
  full = proxy.predict_accuracy(proxy.embed_query(images, labels)[None], index.vectors)[0]
  assert rows[0]["model_id"] == index.ids[int(np.argmax(full))]
  assert len(proxy.select(images, labels, index, k=100)) == len(index)
  # Retrieval still answers from the same index.
  assert proxy.search(index, [(images, labels)], k=3).ids[0]
  # The head survives a save and load bit for bit.
  loaded = Proxy.load(proxy.save(tmp_path / "both"))
  assert loaded.has_accuracy_head and loaded.fingerprint == proxy.fingerprint
  assert loaded.select(images, labels, index, k=5) == rows


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
  assert main(["select", "--proxy", str(pdir), "--index", str(idx), "--task", spec]) == 0
  assert "predicted_accuracy" in capsys.readouterr().out
  # A retrieval-only proxy: one line, exit 2.
  assert main(["select", "--proxy", str(tiny_proxy_dir), "--index", str(idx), "--task",
               spec]) == 2
  err = capsys.readouterr().err
  assert err.startswith("know2vec: error: proxy") and "no accuracy head" in err
  assert err.count("\n") == 1
