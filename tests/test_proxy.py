"""The trained proxy: training on the tiny zoo, vectorizing black boxes, queries, storage, configs;
and the README's Python API example, run as written."""

import dataclasses
import math
import pathlib
import shutil
from collections import Counter

import jax
import numpy as np
import pytest

from know2vec_jax import pool as pool_lib
from know2vec_jax.backbone import BackboneConfig
from know2vec_jax.blackbox import CallableBlackBox, InputError, groups_from_zoo
from know2vec_jax.data import few_shot, load_source, stable_seed
from know2vec_jax.index import ModelIndex
from know2vec_jax.knowledge import expected_queries
from know2vec_jax.config import ConfigError, from_dict, override, to_dict
from know2vec_jax.pipeline import TransferLabels
from know2vec_jax.proxy import (Proxy, ProxyConfig, ProxyError, proxy_preset, query, query_result,
                                zoo_metadata, zoo_tasks)


def test_training_covers_every_task_with_the_documented_budget(tiny_proxy, tiny_zoo):
  zoo = tiny_zoo[0]
  cfg = tiny_proxy.config
  tasks = {r.task.task_id for r in zoo.records.values()}
  assert {t["task_id"] for t in tiny_proxy.tasks} == tasks
  assert sum(t["models"] for t in tiny_proxy.tasks) == len(zoo)
  sources = sorted({r.source for r in zoo.records.values()})
  assert tiny_proxy.info["sources"] == sources
  # The pool: per_source test-split images of every source (at most half of the split), one
  # permutation per base source, so digits and digits+invert hold the same underlying images.
  want, rows = [], {}
  for s in sources:
    base = s.split("+")[0]
    n = len(load_source(s).test_images)
    rows.setdefault(base, np.random.default_rng(stable_seed("pool", base, "test", cfg.seed))
                    .permutation(n)[:min(cfg.pool.per_source, n // 2)])
    want.append(load_source(s).test_images[rows[base]])
  want = np.concatenate(want)
  np.testing.assert_array_equal(tiny_proxy.pool, want)
  assert [(p["source"], p["split"], p["images"]) for p in tiny_proxy.pool_provenance] == [
      (s, "test", cfg.pool.per_source) for s in sources]
  # Nothing a zoo model trained on: every pool image is a test-split image.
  assert tiny_proxy.provenance["pool"][0]["split"] == "test"
  for k, n in tiny_proxy.info["knowledge_queries_per_model"].items():
    assert n == expected_queries(len(want), int(k), cfg.knowledge.search_steps)
  vcfg = tiny_proxy.vectorizer_config
  assert (vcfg.variant, vcfg.shared) == ("attention", True)
  assert tiny_proxy.vectorizer.feature_dim == tiny_proxy.backbone.dim
  # The proxy remembers the knowledge of every model it trained on.
  assert len(tiny_proxy.knowledge) == len(zoo)


def _held_out_queries(proxy, tasks, seeds, shots=5):
  """``shots``-per-class queries of each task from its source's test split, outside the proxy's
  probe pool (no query image is one the models were probed with), one per seed:
  [(task, images, labels)]."""
  out = []
  for task in tasks:
    data = load_source(task.source)
    held = pool_lib.excluded_rows(proxy.pool_provenance, task.source, "test")
    out += [(task, *few_shot(data, task, shots, seed=s, split="test", exclude=held))
            for s in seeds]
  return out


def _search_each(proxy, index, queries) -> list[list[str]]:
  """Every model of ``index`` ranked for each (task, images, labels) query, one ``search`` call
  per query: its jitted steps then compile once per index and class count rather than once per
  batch size, which is most of what a search costs on a CPU."""
  return [proxy.search(index, [(x, y)], k=len(index)).ids[0] for _, x, y in queries]


def _random_reciprocal_rank(models: int, right: int) -> float:
  """The exact expected reciprocal rank of the first of ``right`` right models among ``models``
  ranked uniformly at random: the first one is at rank i with probability
  C(models - i, right - 1) / C(models, right)."""
  return sum(math.comb(models - i, right - 1) / math.comb(models, right) / i
             for i in range(1, models - right + 2))


def test_seen_tasks_are_retrieved(tiny_proxy, tiny_index, tiny_zoo):
  """Held-out images of every training task (test split, outside the probe pool; three seeds
  each): a model of that task must come first for every query.

  The two 4-way digits tasks share their domain and differ only in their classes, so a retriever
  that ranks by domain alone (or always answers one task) must fail every query of one of them:
  the test computes the best top-1 any domain-only ranking can reach on these queries (0.75),
  checks that two such rankings fail the same assertion, and that the product is above that bound.
  The aligned vectors were trained on these tasks, so they alone could rank them; the class terms
  alone (vector weights 0) must rank every query's task first too, which is what shows the class
  matching reads the classes. The mean reciprocal rank of the right task must beat the exact
  expectation of a random ranking of the same index by a margin."""
  zoo = tiny_zoo[0]
  tasks = sorted({r.task for r in zoo.records.values()}, key=lambda t: t.task_id)
  twins = [t for t in tasks if t.source == "digits" and t.k == 4]
  assert len(twins) == 2 and set(twins[0].classes) != set(twins[1].classes)
  queries = _held_out_queries(tiny_proxy, tasks, range(3))
  on_twins = np.array([t in twins for t, _, _ in queries])

  def top1(ranked_ids) -> np.ndarray:
    return np.array([zoo.record(ids[0]).task == t for (t, _, _), ids in zip(queries, ranked_ids)])

  def report(ranked_ids) -> list:
    return [(t.task_id, [zoo.record(m).task.task_id for m in ids[:3]])
            for (t, _, _), ids in zip(queries, ranked_ids)]

  found = _search_each(tiny_proxy, tiny_index, queries)
  hits = top1(found)
  assert hits[on_twins].all(), report(found)
  assert hits.all(), report(found)
  # A domain-only ranking gives every query of a domain one order, so it answers one task per
  # domain: at best each domain's most queried task.
  per_domain: dict[str, Counter] = {}
  for t, _, _ in queries:
    per_domain.setdefault(t.source, Counter())[t] += 1
  best_blind = sum(max(c.values()) for c in per_domain.values()) / len(queries)
  assert best_blind == 0.75 and hits.mean() > best_blind
  for order in (tiny_index.ids, tiny_index.ids[::-1]):
    blind = [sorted(order, key=lambda m: zoo.record(m).source != t.source) for t, _, _ in queries]
    assert not top1(blind)[on_twins].all() and top1(blind).mean() <= best_blind
  # The class terms alone.
  by_class = _search_each(tiny_proxy.with_match(vector_weight=0.0, familiar_vector_weight=0.0),
                          tiny_index, queries)
  assert top1(by_class).all(), report(by_class)
  # Mean reciprocal rank of the first model of the right task against a random ranking's.
  rr = [1 / next(i + 1 for i, m in enumerate(ids) if zoo.record(m).task == t)
        for (t, _, _), ids in zip(queries, found)]
  models_of = Counter(r.task for r in zoo.records.values())
  random_rr = [_random_reciprocal_rank(len(tiny_index), models_of[t]) for t, _, _ in queries]
  assert _random_reciprocal_rank(8, 1) == pytest.approx(sum(1 / i for i in range(1, 9)) / 8)
  assert _random_reciprocal_rank(8, 8) == 1.0
  assert np.mean(rr) >= np.mean(random_rr) + 0.4, (np.mean(rr), np.mean(random_rr))


def test_query_rows(tiny_proxy, tiny_index, tiny_zoo):
  zoo = tiny_zoo[0]
  r = next(iter(zoo.records.values()))
  x, y = few_shot(load_source(r.source), r.task, 4, seed=1)
  rows = query(tiny_proxy, tiny_index, x, y, k=5)
  res = query_result(tiny_proxy, tiny_index, x, y, k=5)
  assert res["results"] == rows
  assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5]
  assert list(rows[0])[:8] == ["rank", "model_id", "score", "agreement", "token", "vector",
                               "arch", "task"]
  q = tiny_proxy.embed_query(x, y)
  assert q.shape == (tiny_proxy.embed_dim,) and abs(np.linalg.norm(q) - 1) < 1e-5
  match = tiny_proxy.config.match
  assert match.hub_k >= 1 and len(tiny_proxy.reference) >= match.hub_k
  hub = tiny_index.hub_offsets(match.hub_k)
  # A familiar query (of a task the proxy trained on) is scored with the familiar settings.
  hub_scale, weight = ((match.familiar_hub_scale, match.familiar_vector_weight) if res["familiar"]
                       else (match.hub_scale, match.vector_weight))
  for row in rows:
    rec = zoo.records[row["model_id"]]
    j = tiny_index.ids.index(row["model_id"])
    v = tiny_index.vectors[j]
    # The vector part is the cosine minus (hub_scale times) the model's mean top-hub_k cosine to
    # the reference queries, which the index row stores best first.
    ref_cos = np.sort(tiny_proxy.reference @ v)[::-1]
    np.testing.assert_allclose(tiny_index.classes["hub"][j], ref_cos[:tiny_index.classes[
        "hub"].shape[1]], atol=1e-5)
    assert hub[j] == pytest.approx(float(ref_cos[:match.hub_k].mean()), abs=1e-5)
    assert row["vector"] == pytest.approx(float(q @ v) - hub_scale * hub[j], abs=1e-5)
    assert 0 <= row["agreement"] <= 1 and 0 <= row["token"] <= 1
    assert row["score"] == pytest.approx(row["agreement"] + match.token_weight * row["token"]
                                         + weight * row["vector"], abs=1e-5)
    assert (row["arch"], row["task"], row["k"]) == (rec.arch, rec.task.task_id, rec.k)
    assert row["proxy"] == tiny_proxy.fingerprint
  assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))


def test_callable_and_stack_black_boxes_give_the_same_vector(tiny_proxy, tiny_index, tiny_zoo):
  """A zoo model wrapped as a plain callable is vectorized like its stack (black-box only)."""
  zoo = tiny_zoo[0]
  mid = tiny_index.ids[2]
  net, rec = zoo.model(mid), zoo.records[mid]
  bb = CallableBlackBox(lambda x: np.asarray(net(x)), rec.k, zoo.image_shape, model_id="copy")
  ids, vec = tiny_proxy.vectorize(bb)
  assert ids == ["copy"]
  np.testing.assert_allclose(vec[0], tiny_index.vectors[2], atol=1e-4)
  assert bb.queries[0] == expected_queries(len(tiny_proxy.pool), rec.k,
                                           tiny_proxy.config.knowledge.search_steps)


def test_adding_models_later_needs_no_retraining(tiny_proxy, tiny_index, tiny_zoo):
  zoo = tiny_zoo[0]
  ids = tiny_index.ids
  first = tiny_proxy.build_index(groups_from_zoo(zoo, model_ids=ids[:3]), zoo_metadata(zoo))
  before = tiny_proxy.fingerprint
  tiny_proxy.build_index(groups_from_zoo(zoo, model_ids=ids[3:]), zoo_metadata(zoo), index=first)
  assert tiny_proxy.fingerprint == before
  order = [first.ids.index(m) for m in ids]
  np.testing.assert_allclose(first.vectors[order], tiny_index.vectors, atol=1e-5)


def test_save_load_round_trip(tiny_proxy, tiny_proxy_dir, tiny_zoo):
  back = Proxy.load(tiny_proxy_dir)
  assert back.fingerprint == tiny_proxy.fingerprint
  assert back.config == tiny_proxy.config and back.tasks == tiny_proxy.tasks
  assert back.vectorizer_config == tiny_proxy.vectorizer_config
  np.testing.assert_array_equal(back.pool, tiny_proxy.pool)
  for a, b in zip(jax.tree.leaves(back._state), jax.tree.leaves(tiny_proxy._state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  r = next(iter(tiny_zoo[0].records.values()))
  x, y = few_shot(load_source(r.source), r.task, 3, seed=0)
  np.testing.assert_array_equal(back.embed_query(x, y), tiny_proxy.embed_query(x, y))
  assert json_keys(tiny_proxy_dir) == {"proxy.json", "backbone", "vectorizer", "pool",
                                       "knowledge", "reference"}
  assert len(back.reference) > 0
  np.testing.assert_array_equal(back.reference, tiny_proxy.reference)
  assert len(back.knowledge) == len(tiny_proxy.knowledge) > 0
  _same_knowledge(back, tiny_proxy)
  # Retrieval's fitted statistics come back exactly, and with them the thresholds in use.
  a, b = back.retriever, tiny_proxy.retriever
  assert a.fit_threshold == b.fit_threshold > 0 and a.familiar_threshold == b.familiar_threshold
  for name in ("fit_scores", "familiar_other", "familiar_same"):
    np.testing.assert_array_equal(getattr(a.calibration, name), getattr(b.calibration, name))


def test_a_version_5_proxy_loads_with_its_thresholds(tiny_proxy, tiny_proxy_dir, tmp_path):
  """A proxy saved before retrieval's statistics had their own place (version 5: both thresholds
  in the config's match section, the familiar cosines in ``info``) loads, and searches with the
  thresholds it was saved with."""
  import json
  import shutil
  from know2vec_jax import storage
  old = tmp_path / "v5"
  shutil.copytree(tiny_proxy_dir, old)
  m = json.loads((old / "proxy.json").read_text())
  m["version"] = 5
  cal = m.pop("retrieval")
  m["config"]["match"]["fit_threshold"] = cal["fit_threshold"]
  m["config"]["match"]["familiar_threshold"] = tiny_proxy.retriever.familiar_threshold
  m[storage.MANIFEST_CHECKSUM] = storage.manifest_checksum(m)
  (old / "proxy.json").write_text(json.dumps(m))
  back = Proxy.load(old)
  assert back.config == tiny_proxy.config
  assert back.retriever.fit_threshold == tiny_proxy.retriever.fit_threshold > 0
  assert back.retriever.familiar_threshold == tiny_proxy.retriever.familiar_threshold
  np.testing.assert_array_equal(back.reference, tiny_proxy.reference)
  # A new quantile is read from the recorded cosines, as before.
  q = back.with_match(familiar_quantile=0.5).retriever.familiar_threshold
  assert q == pytest.approx(tiny_proxy.with_match(familiar_quantile=0.5).retriever
                            .familiar_threshold, abs=1e-5)


def _same_knowledge(a, b):
  ka, kb = dict(a.knowledge.items()), dict(b.knowledge.items())
  assert ka.keys() == kb.keys()
  for key in ka:
    np.testing.assert_array_equal(ka[key].anchor_index, kb[key].anchor_index)
    np.testing.assert_array_equal(ka[key].flip_t, kb[key].flip_t)
    np.testing.assert_array_equal(ka[key].anchor_fallback, kb[key].anchor_fallback)


def json_keys(path):
  return {p.name for p in pathlib.Path(path).iterdir()}


def test_presets_and_overrides():
  demo = proxy_preset("demo")
  assert demo == ProxyConfig(backbone=BackboneConfig(augment=0.8, ssl_weight=1.0),
                             episode_augment=0.5)
  full = proxy_preset("full")
  assert full.pool.per_source > demo.pool.per_source and full.episodes > demo.episodes
  varied = proxy_preset("varied")
  assert varied.ranking.hard_share == 0.5 and demo.ranking.hard_share == 0.0
  assert dataclasses.replace(varied, ranking=demo.ranking) == demo
  with pytest.raises(ConfigError, match="unknown proxy preset 'huge'; choose one of tiny, demo"):
    proxy_preset("huge")

  cfg = override(demo, ["align.steps=200", "knowledge.search_steps=4",
                        "vectorizer.shared=false", "backbone.sources=digits, mnist5k",
                        "seed=3", "align.learning_rate=3e-4", "vectorizer.variant=lstm",
                        "ranking.margin=0.3", "strategy=vmap"])
  assert (cfg.align.steps, cfg.knowledge.search_steps, cfg.vectorizer.shared, cfg.seed) == (
      200, 4, False, 3)
  assert cfg.backbone.sources == ("digits", "mnist5k") and cfg.align.learning_rate == 3e-4
  assert cfg.vectorizer.variant == "lstm" and demo.align.steps == 1500  # demo untouched
  assert cfg.ranking.margin == 0.3 and cfg.strategy == "vmap"
  for bad, match in [("align.stepz=3", "unknown config key 'align.stepz'; valid keys: .*"
                                       "align.steps"),
                     ("align.steps=abc", "bad value 'abc' for align.steps: expected an integer"),
                     ("align.steps", "not key=value"),
                     ("vectorizer.variant=gru", "bad value for vectorizer.variant: variant must"),
                     ("vectorizer.shared=maybe", "expected true or false"),
                     ("align.learning_rate=nan", "finite"),
                     ("episodes=0", "episodes must be >= 1"),
                     ("vectorizer.hidden=30", "divisible by heads"),
                     ("strategy=pmap", "strategy must be one of"),
                     # K_max lives in one place: the vectorizer has no such field.
                     ("vectorizer.max_classes=4", "unknown config key 'vectorizer.max_classes'"),
                     ("backbone.image_size=32", "unknown config key 'backbone.image_size'")]:
    with pytest.raises(ConfigError, match=match):
      override(demo, [bad])
  # Configs round-trip through JSON (the proxy manifest stores them this way).
  assert from_dict(ProxyConfig, to_dict(cfg)) == cfg


def test_train_refuses_impossible_configs(tiny_zoo):
  zoo = tiny_zoo[0]
  with pytest.raises(ProxyError, match="more than max_classes=3"):
    Proxy.train(zoo, dataclasses.replace(proxy_preset("tiny"), max_classes=3), progress=False)
  cfg = override(proxy_preset("tiny"), ["align.batch_size=12"])
  with pytest.raises(ProxyError, match="batch_size=12 must be divisible by the 8 devices"):
    Proxy.train(zoo, cfg, progress=False)
  with pytest.raises(ConfigError, match="pool per_source must be >= 1"):
    override(proxy_preset("tiny"), ["pool.per_source=0"])
  with pytest.raises(ConfigError, match="unknown split 'val'"):
    override(proxy_preset("tiny"), ["pool.sources=digits@val"])
  # "transfer" is the earlier name of "finetune"; its labels are needed (Proxy.train measures
  # them, Proxy.fit takes them) and the retrieval objective refuses them.
  assert override(proxy_preset("tiny"), ["objective=transfer"]).objective == "finetune"
  groups, tasks = groups_from_zoo(zoo), zoo_tasks(zoo)
  with pytest.raises(ProxyError, match="objective 'finetune' trains on TransferLabels"):
    Proxy.fit(groups, tasks, override(proxy_preset("tiny"), ["objective=finetune"]),
              progress=False)
  labels = TransferLabels([], [], np.zeros((0, 0)))
  with pytest.raises(ProxyError, match="objective 'retrieve' takes no TransferLabels"):
    Proxy.fit(groups, tasks, proxy_preset("tiny"), transfer=labels, progress=False)


def readme_python_example() -> str:
  """The Python code block of README.md's "Python API" section, as it stands."""
  text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
  section = text.split("\n## Python API", 1)[1].split("\n## ", 1)[0]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_api_example(tiny_zoo_dir, tiny_proxy_dir, tmp_path, capsys):
  """README.md's Python example, read from README.md and run with its paths pointed at the tiny
  zoo and the session's proxy (the one settings line is the only change)."""
  example = readme_python_example()
  settings = ('zoo_dir, proxy_dir, index_dir = "artifacts/zoo-demo", "artifacts/proxy-demo", '
              '"artifacts/index-demo"')
  assert settings in example
  shutil.copytree(tiny_proxy_dir, tmp_path / "proxy")
  code = example.replace(settings, f"zoo_dir, proxy_dir, index_dir = {str(tiny_zoo_dir)!r}"
                                f", {str(tmp_path / 'proxy')!r}, {str(tmp_path / 'index')!r}")
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)
  out = capsys.readouterr().out.splitlines()
  results, index, proxy = scope["results"], scope["index"], scope["proxy"]
  assert len(results) == 5 and len(out) == 6 and out[0].startswith("1 ")
  assert "my-nearest-mean" in index and len(index) == 9
  assert index.metadata("my-nearest-mean")["task"] == "digits+invert/0-3-5-7"
  np.testing.assert_allclose(np.asarray(scope["q"]), proxy.embed_query(scope["images"],
                                                                      scope["labels"]), atol=1e-5)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(scope["grads"]))
  assert ModelIndex.load(tmp_path / "index").ids == index.ids
  # Step 6: another setting, the same fitted threshold, five rows of the index.
  heavier, found = scope["heavier_tokens"], scope["found"]
  assert heavier.config.token_weight == 0.5 and proxy.config.match.token_weight == 0.25
  assert heavier.fit_threshold == proxy.retriever.fit_threshold > 0
  assert len(found.ids[0]) == 5 and set(found.ids[0]) <= set(index.ids)


def test_train_then_index_build_probes_each_model_once(tiny_zoo, tiny_proxy, tmp_path):
  """The knowledge extracted for training is the index's: building the index of the training
  zoo calls no black box, with the live proxy or a saved and reloaded one; a model the proxy
  never saw is probed once, and a model whose weights changed (same id) is probed again."""
  zoo = tiny_zoo[0]
  groups = groups_from_zoo(zoo)
  tiny_proxy.build_index(groups, zoo_metadata(zoo))
  assert all(np.all(g.queries == 0) for g in groups)
  tiny_proxy.save(tmp_path / "p")
  loaded = Proxy.load(tmp_path / "p")
  groups = groups_from_zoo(zoo)
  index = loaded.build_index(groups, zoo_metadata(zoo))
  assert all(np.all(g.queries == 0) for g in groups) and len(index) == len(zoo)
  # A copy of a zoo model under a new id and behind a callable without a fingerprint: probed.
  mid = index.ids[0]
  net, rec = zoo.model(mid), zoo.records[mid]
  bb = CallableBlackBox(lambda x: np.asarray(net(x)), rec.k, zoo.image_shape, model_id="copy",
                        fingerprint="copy-v1")
  loaded.build_index(bb, index=index)
  n = expected_queries(len(loaded.pool), rec.k, loaded.config.knowledge.search_steps)
  assert bb.queries[0] == n
  # The same callable again (same id, same fingerprint): remembered, not probed.
  bb2 = CallableBlackBox(lambda x: np.asarray(net(x)), rec.k, zoo.image_shape, model_id="copy",
                         fingerprint="copy-v1")
  loaded.vectorize(bb2)
  assert bb2.queries[0] == 0
  # New weights under the same id: the stack's fingerprint changes, so it is probed again.
  stack = zoo.stacks[rec.stack]
  changed = dataclasses.replace(stack, params=jax.tree.map(lambda a: a * 1.01, stack.params))
  from know2vec_jax.blackbox import StackGroup
  g = StackGroup(changed)
  loaded.vectorize(g)
  assert np.all(g.queries == expected_queries(len(loaded.pool), g.num_classes,
                                              loaded.config.knowledge.search_steps))


def test_cli_train_then_index_build_probes_each_model_once(tiny_zoo_dir, tmp_path, capsys):
  """The same through the command line: `index build` after `train` reports 0 models probed."""
  import json as json_lib
  from know2vec_jax.cli import main
  proxy_dir, index_dir = tmp_path / "proxy", tmp_path / "index"
  assert main(["train", "--zoo", str(tiny_zoo_dir), "--out", str(proxy_dir), "--preset", "tiny",
               "--quiet", "--json"]) == 0
  capsys.readouterr()
  assert main(["index", "build", "--proxy", str(proxy_dir), "--zoo", str(tiny_zoo_dir), "--out",
               str(index_dir), "--quiet", "--json"]) == 0
  info = json_lib.loads(capsys.readouterr().out)
  assert info["models"] == 8 and info["probed"] == 0


def test_training_does_not_depend_on_how_black_boxes_are_grouped(tiny_zoo, tiny_proxy):
  """The same models packed into other groups, in another order, train the same proxy: rows follow
  the caller's model order, and each model's knowledge is the same wherever it is probed (phi's
  features of a batch of one and of a stack differ in the last float bits, hence the tolerance)."""
  from know2vec_jax.proxy import zoo_tasks
  zoo = tiny_zoo[0]
  singles = [g.subset([m]) for g in groups_from_zoo(zoo) for m in g.model_ids][::-1]
  other = Proxy.fit(singles, zoo_tasks(zoo), tiny_proxy.config, progress=False)
  for key, rec in tiny_proxy.knowledge.items():
    np.testing.assert_array_equal(dict(other.knowledge.items())[key].anchor_index,
                                  rec.anchor_index)
  for a, b in zip(jax.tree.leaves(other.trees["vectorizer"]),
                  jax.tree.leaves(tiny_proxy.trees["vectorizer"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_embed_queries_equals_embed_query_per_query(tiny_proxy, tiny_zoo):
  zoo = tiny_zoo[0]
  tasks = sorted({r.task for r in zoo.records.values()}, key=lambda t: t.task_id)
  queries = []
  for i, t in enumerate(tasks):
    data = load_source(t.source)
    for shots in (2, 3):  # two shapes per task: batched per shape
      queries.append(few_shot(data, t, shots, seed=i))
  batched = tiny_proxy.embed_queries(queries, batch_size=3)
  single = np.stack([tiny_proxy.embed_query(x, y) for x, y in queries])
  np.testing.assert_allclose(batched, single, atol=1e-5)
  x, y = queries[0]
  with pytest.raises(InputError, match="query 1: .*image shape"):
    tiny_proxy.embed_queries([(x, y), (x[:, :20], y)])
