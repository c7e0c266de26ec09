"""The trained proxy: training on the tiny zoo, vectorizing black boxes, queries, storage, configs;
and the README's Python API example, run as written."""

import dataclasses
import pathlib
import shutil

import jax
import numpy as np
import pytest

from know2vec_jax.blackbox import CallableBlackBox, groups_from_zoo
from know2vec_jax.data import few_shot, load_source
from know2vec_jax.index import ModelIndex
from know2vec_jax.knowledge import expected_queries
from know2vec_jax.proxy import (Proxy, ProxyConfig, ProxyError, apply_overrides, proxy_preset,
                                query, zoo_metadata)


def test_training_covers_every_task_with_the_documented_budget(tiny_proxy, tiny_zoo):
  zoo = tiny_zoo[0]
  cfg = tiny_proxy.config
  tasks = {r.task.task_id for r in zoo.records.values()}
  assert {t["task_id"] for t in tiny_proxy.tasks} == tasks
  assert sum(t["models"] for t in tiny_proxy.tasks) == len(zoo)
  sources = sorted({r.source for r in zoo.records.values()})
  assert tiny_proxy.info["sources"] == sources
  # The pool is the nnr.py draw: pool_per_source train-split images of every source.
  rng = np.random.default_rng(cfg.seed)
  want = np.concatenate([load_source(s).train_images[
      rng.permutation(len(load_source(s).train_images))[:cfg.pool_per_source]] for s in sources])
  np.testing.assert_array_equal(tiny_proxy.pool, want)
  for k, n in tiny_proxy.info["knowledge_queries_per_model"].items():
    assert n == expected_queries(len(want), int(k), cfg.knowledge.search_steps)
  vcfg = tiny_proxy.vectorizer_config
  assert (vcfg.variant, vcfg.shared, vcfg.max_classes, vcfg.feature_dim) == (
      "attention", True, cfg.max_classes, tiny_proxy.backbone.dim)


def test_seen_tasks_are_retrieved(tiny_proxy, tiny_index, tiny_zoo):
  """Held-out images of every training task: a model of that task must come first."""
  zoo = tiny_zoo[0]
  hits = []
  for task in sorted({r.task for r in zoo.records.values()}, key=lambda t: t.task_id):
    for seed in range(3):
      x, y = few_shot(load_source(task.source), task, 5, seed=seed)
      rows = query(tiny_proxy, tiny_index, x, y, k=3)
      hits.append(rows[0]["task"] == task.task_id)
  assert np.mean(hits) >= 0.75, hits


def test_query_rows(tiny_proxy, tiny_index, tiny_zoo):
  zoo = tiny_zoo[0]
  r = next(iter(zoo.records.values()))
  x, y = few_shot(load_source(r.source), r.task, 4, seed=1)
  rows = query(tiny_proxy, tiny_index, x, y, k=5)
  assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5]
  assert list(rows[0])[:5] == ["rank", "model_id", "score", "arch", "task"]
  q = tiny_proxy.embed_query(x, y)
  assert q.shape == (tiny_proxy.embed_dim,) and abs(np.linalg.norm(q) - 1) < 1e-5
  for row in rows:
    rec = zoo.records[row["model_id"]]
    v = tiny_index.vectors[tiny_index.ids.index(row["model_id"])]
    assert row["score"] == pytest.approx(float(q @ v), abs=1e-5)
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
  assert json_keys(tiny_proxy_dir) == {"proxy.json", "backbone", "vectorizer", "pool"}


def json_keys(path):
  return {p.name for p in pathlib.Path(path).iterdir()}


def test_presets_and_overrides():
  from experiments.nnr import DEFAULT_VARIANT, NNRConfig, VARIANTS
  demo, nnr = proxy_preset("demo"), NNRConfig()
  assert (demo.pool_per_source, demo.knowledge.search_steps, demo.knowledge.anchors_per_class,
          demo.episodes, demo.shots, demo.max_classes, demo.seed) == (
      nnr.pool_per_source, nnr.search_steps, nnr.anchors_per_class, nnr.episodes, nnr.shots,
      nnr.max_classes, nnr.seed)
  assert demo.align == nnr.align and demo.vectorizer == VARIANTS[DEFAULT_VARIANT]
  full = proxy_preset("full")
  assert full.pool_per_source > demo.pool_per_source and full.episodes > demo.episodes
  with pytest.raises(ProxyError, match="unknown proxy preset 'huge'"):
    proxy_preset("huge")

  cfg = apply_overrides(demo, ["align.steps=200", "knowledge.search_steps=4",
                               "vectorizer.shared=false", "backbone.sources=digits, mnist5k",
                               "seed=3", "align.learning_rate=3e-4", "vectorizer.variant=lstm"])
  assert (cfg.align.steps, cfg.knowledge.search_steps, cfg.vectorizer.shared, cfg.seed) == (
      200, 4, False, 3)
  assert cfg.backbone.sources == ("digits", "mnist5k") and cfg.align.learning_rate == 3e-4
  assert cfg.vectorizer.variant == "lstm" and demo.align.steps == 1500  # demo untouched
  for bad, match in [("align.stepz=3", "unknown config key 'align.stepz'; valid keys: .*"
                                       "align.steps"),
                     ("align.steps=abc", "bad value 'abc' for align.steps: expected an integer"),
                     ("align.steps", "not key=value"),
                     ("vectorizer.variant=gru", "bad value 'gru' for vectorizer.variant"),
                     ("vectorizer.shared=maybe", "expected true or false"),
                     ("align.learning_rate=nan", "finite"),
                     ("episodes=0", "episodes must be >= 1"),
                     ("vectorizer.hidden=30", "divisible by heads")]:
    with pytest.raises(ProxyError, match=match):
      apply_overrides(demo, [bad])


def test_train_refuses_impossible_configs(tiny_zoo):
  zoo = tiny_zoo[0]
  with pytest.raises(ProxyError, match="more than max_classes=3"):
    Proxy.train(zoo, dataclasses.replace(proxy_preset("tiny"), max_classes=3), progress=False)
  cfg = apply_overrides(proxy_preset("tiny"), ["align.batch_size=12"])
  with pytest.raises(ProxyError, match="batch_size=12 must be divisible by the 8 devices"):
    Proxy.train(zoo, cfg, progress=False)
  with pytest.raises(ProxyError, match="pool_per_source must be >= 1"):
    ProxyConfig(pool_per_source=0)


# The README's "Python API" example. The test runs this text as it stands, except the three
# settings lines, which point it at the tiny zoo and the session's proxy instead of the demo ones.
README_EXAMPLE = '''
import os

import numpy as np
from know2vec_jax import (CallableBlackBox, ModelIndex, few_shot, groups_from_zoo, load_source,
                          load_zoo, make_task, task_images)
from know2vec_jax.proxy import Proxy, proxy_preset, query, zoo_metadata

zoo_dir, proxy_dir, index_dir = "artifacts/zoo-demo", "artifacts/proxy-demo", "artifacts/index-demo"

# 1. A zoo seen only through black-box calls, and a trained proxy (trained once, then loaded).
zoo = load_zoo(zoo_dir)
if os.path.exists(os.path.join(proxy_dir, "proxy.json")):
  proxy = Proxy.load(proxy_dir)
else:                                            # train one (minutes for the demo zoo)
  proxy = Proxy.train(zoo, proxy_preset("demo"))
  proxy.save(proxy_dir)

# 2. The index: every zoo model vectorized from its decision knowledge (vectors + metadata only).
index = proxy.build_index(groups_from_zoo(zoo), zoo_metadata(zoo))

# 3. Any callable images [B, 28, 28, 1] -> logits [B, K] is a black box too: here a
#    nearest-class-mean classifier of inverted digits 0, 3, 5, 7, added without retraining.
data = load_source("digits+invert")
task = make_task(data, ["0", "3", "5", "7"])
x_train, y_train = task_images(data, task, "train")
means = np.stack([x_train[y_train == c].mean(0) for c in range(task.k)])

def my_classifier(images):
  return -((images[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))

black_box = CallableBlackBox(my_classifier, num_classes=4, image_shape=(28, 28, 1),
                             model_id="my-nearest-mean")
proxy.build_index([black_box], {"my-nearest-mean": {"arch": "nearest-mean",
                                                    "task": task.task_id}}, index=index)
index.save(index_dir)

# 4. A query: 5 labelled images per class of the user's task, never seen by any model.
images, labels = few_shot(data, task, shots=5, seed=0, split="test")
results = query(proxy, ModelIndex.load(index_dir), images, labels, k=5)
for row in results:
  print(row["rank"], row["model_id"], row["arch"], row["task"], round(row["score"], 3))

# 5. The Flax NNX vectorizers inside other JAX code: jit them, differentiate through them.
import jax
from flax import nnx
from know2vec_jax import pad_grid, query_grid
grid, mask = pad_grid(query_grid(proxy.backbone, images, labels), proxy.max_classes)
embed = jax.jit(lambda vectorizer, g, m: vectorizer.embed_queries(g, m))
q = embed(proxy.vectorizer, grid, mask)          # == proxy.embed_query(images, labels)
grads = nnx.grad(lambda v: v.embed_queries(grid, mask) @ q)(proxy.vectorizer)
'''


def test_readme_python_api_example(tiny_zoo_dir, tiny_proxy_dir, tmp_path, capsys):
  settings = ('zoo_dir, proxy_dir, index_dir = "artifacts/zoo-demo", "artifacts/proxy-demo", '
              '"artifacts/index-demo"')
  assert settings in README_EXAMPLE
  shutil.copytree(tiny_proxy_dir, tmp_path / "proxy")
  code = README_EXAMPLE.replace(settings, f"zoo_dir, proxy_dir, index_dir = {str(tiny_zoo_dir)!r}"
                                f", {str(tmp_path / 'proxy')!r}, {str(tmp_path / 'index')!r}")
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)
  out = capsys.readouterr().out.splitlines()
  results, index, proxy = scope["results"], scope["index"], scope["proxy"]
  assert len(results) == 5 and len(out) == 5 and out[0].startswith("1 ")
  assert "my-nearest-mean" in index and len(index) == 9
  assert index.metadata("my-nearest-mean")["task"] == "digits+invert/0-3-5-7"
  np.testing.assert_allclose(np.asarray(scope["q"]), proxy.embed_query(scope["images"],
                                                                      scope["labels"]), atol=1e-5)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(scope["grads"]))
  assert ModelIndex.load(tmp_path / "index").ids == index.ids
