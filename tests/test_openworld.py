"""The open-world experiment on the tiny zoo: at the data level, no image or label of a held-out
source or class reaches phi's training, the pool, the aligner's episodes or the calibration;
and a retriever that ignores classes fails the tiny-zoo retrieval check the product passes."""

import numpy as np
import pytest

import leak_spies
from experiments import openworld
from know2vec_jax import pool as pool_lib
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.config import ConfigError, override
from know2vec_jax.data import few_shot, load_source, parse_source_name
from know2vec_jax.proxy import Proxy, proxy_preset, zoo_metadata
from know2vec_jax.zoo import load_zoo


def test_unseen_source_and_classes_leak_nothing_into_training(tiny_zoo_dir, tmp_path,
                                                              monkeypatch):
  zoo = load_zoo(tiny_zoo_dir)
  # A class draw that leaves training tasks and gives query tasks (>= 2 held-out classes).
  seed = next(s for s in range(200) if _usable(zoo, s))
  cfg = override(openworld.PRESETS.get("tiny"), [f"seed={seed}", "sources=mnist5k",
                                                 "seeds=0", "proxy.backbone.ssl_weight=1.0"])
  trainings = leak_spies.install(monkeypatch)
  out = openworld.run(cfg, str(tiny_zoo_dir), str(tmp_path / "cache"), None, progress=False)
  broad_t, strict_t, classes_t = trainings
  mnist = [s for s in {r.source for r in zoo.records.values()} if s.startswith("mnist5k")]
  mnist_images = leak_spies.source_images(mnist)
  mnist_test = {im.tobytes() for s in mnist for im in load_source(s).test_images}
  for name, t in (("strict", strict_t), ("broad", broad_t)):
    # phi: no label, no labelled image of the held-out source.
    assert not any(n.startswith("mnist5k") for n in t["phi_names"]), name
    assert leak_spies.count_in(t["phi_images"], mnist_images) == 0, name
    # The aligner's episodes and the calibration: no task, no image of it.
    assert t["episode_sets"] and not any(s.name.startswith("mnist5k") for s in t["episode_sets"])
    for s in t["episode_sets"]:
      assert leak_spies.count_in(s.images[s.index], mnist_images) == 0
    assert not any(task.source.startswith("mnist5k") for task in t["calibration_tasks"])
    assert all(leak_spies.count_in(x, mnist_images) == 0 for x in t["calibration_images"])
    assert not any(zoo.record(m).source.startswith("mnist5k") for m in t["calibration_models"])
  # strict: no image of it anywhere, the pool and phi's unlabelled images included.
  assert leak_spies.count_in(strict_t["pool"], mnist_images) == 0
  assert leak_spies.count_in(strict_t["phi_unlabelled"], mnist_images) == 0
  # broad: the pool (and so phi's contrastive loss) holds unlabelled test-split images of it,
  # never one a model trained on.
  n_broad = leak_spies.count_in(broad_t["pool"], mnist_images)
  assert n_broad > 0 and n_broad == leak_spies.count_in(broad_t["pool"], mnist_test)
  assert leak_spies.count_in(broad_t["phi_unlabelled"], mnist_images) == n_broad
  # Unseen classes: no held-out (source, class) label for phi, no labelled image of one for phi,
  # the episodes or the calibration.
  held = openworld.draw_held_classes(zoo, cfg.held_classes, cfg.seed)
  names = {f"{s}:{load_source(s).class_names[c]}" for s in {r.source for r in
                                                             zoo.records.values()}
           for c in held[parse_source_name(s)[0]]}
  assert not names & set(classes_t["phi_names"])
  held_images = set()
  for s in {r.source for r in zoo.records.values()}:
    d = load_source(s)
    for x, y in ((d.train_images, d.train_labels), (d.test_images, d.test_labels)):
      held_images |= {im.tobytes() for im in x[np.isin(y, held[parse_source_name(s)[0]])]}
  assert leak_spies.count_in(classes_t["phi_images"], held_images) == 0
  for s in classes_t["episode_sets"]:
    assert leak_spies.count_in(s.images[s.index], held_images) == 0
  assert all(leak_spies.count_in(x, held_images) == 0 for x in classes_t["calibration_images"])
  for m in classes_t["calibration_models"]:
    assert not set(zoo.record(m).task.classes) & set(held[parse_source_name(
        zoo.record(m).source)[0]])
  # The report carries every setting, row and rate the summary promises.
  s = out["summary"]
  assert set(s["unseen_source"]) == {"broad", "strict"}
  assert set(s["unseen_source"]["broad"]) == {"mnist5k", "mean", "worst_top1"}
  for entry in (s["unseen_source"]["broad"]["mnist5k"], s["unseen_classes"]):
    assert set(entry["rows"]) == {"vector-only", "fixed-neighbours", "anchor-matching", "random"}
    assert 0 <= entry["top1"] <= entry["top5"] <= 1
  assert set(s["no_fit"]["broad"]) == {"mnist5k"} and 0 <= s["false_alarm"]["rate"] <= 1


def _usable(zoo, seed: int) -> bool:
  held = openworld.draw_held_classes(zoo, 3, seed)
  train, out = openworld.class_split(zoo, held)
  tasks = openworld.zoo_tasks_sorted(zoo)
  return (len({zoo.record(m).task for m in train}) >= 2 and bool(out)
          and bool(openworld.class_query_tasks(tasks, held)))


def test_splits_hold_out_every_domain_and_every_task_with_a_held_class(tiny_zoo):
  zoo = tiny_zoo[0]
  train, held = openworld.source_split(zoo, "digits")
  assert {zoo.record(m).source for m in held} == {"digits", "digits+invert"}
  assert {zoo.record(m).source for m in train} == {"mnist5k"}
  held_classes = {"digits": (0, 1, 2), "mnist5k": (0, 1, 2)}
  train, out = openworld.class_split(zoo, held_classes)
  assert sorted(train + out) == sorted(zoo.records)
  for m in train:
    assert not set(zoo.record(m).task.classes) & {0, 1, 2}
  for m in out:
    assert set(zoo.record(m).task.classes) & {0, 1, 2}
  draw = openworld.draw_held_classes(zoo, 3, 0)
  assert set(draw) == {"digits", "mnist5k"} and all(len(v) == 3 for v in draw.values())
  assert draw == openworld.draw_held_classes(zoo, 3, 0)
  with pytest.raises(ConfigError, match="pool setting"):
    override(openworld.PRESETS.get("tiny"), ["pools=wide"])


def test_a_retriever_that_ignores_classes_fails_what_the_product_passes(tiny_zoo):
  """Queries of two tasks of one domain that differ only in their classes (one of them never
  trained on: its models join through build_index), and of the first task's classes in another
  domain: the product ranks each query's own task first; a retriever that ignores the classes
  (it ranks by domain alone) cannot, whatever its order."""
  zoo = tiny_zoo[0]
  tasks = sorted({r.task for r in zoo.records.values() if r.k == 4}, key=str)
  plain = [t for t in tasks if t.source == "digits"]
  inverted = [t for t in tasks if t.source != "digits"]
  assert len(plain) == 2 and len(inverted) == 1
  unseen = next(t for t in plain if t.classes != inverted[0].classes)
  train = [m for m, r in zoo.records.items() if r.task != unseen]
  every = tuple(sorted({r.source for r in zoo.records.values()}))
  cfg = override(proxy_preset("tiny"), [f"pool.sources={','.join(every)}"])
  proxy = Proxy.train(zoo, cfg, model_ids=train, progress=False)
  index = proxy.build_index(groups_from_zoo(zoo), zoo_metadata(zoo))
  queries = []
  for t in plain + inverted:
    held = pool_lib.excluded_rows(proxy.pool_provenance, t.source, "test")
    for seed in range(2):
      queries.append((t, *few_shot(load_source(t.source), t, 5, seed=seed, exclude=held)))
  found = proxy.search(index, [(x, y) for _, x, y in queries], k=len(index))

  def passes(ranked_ids) -> bool:
    return all(zoo.record(ids[0]).task == t for (t, _, _), ids in zip(queries, ranked_ids))
  assert passes(found.ids), [(str(t), ids[:3]) for (t, _, _), ids in zip(queries, found.ids)]
  # Ranking by domain alone: one order per domain, whichever it is.
  for order in (index.ids, index.ids[::-1]):
    blind = [sorted(order, key=lambda m: zoo.record(m).source != t.source)
             for t, _, _ in queries]
    assert not passes(blind)


def test_leep_is_computed_once_for_a_sources_two_pool_settings(tiny_zoo, tiny_proxy, tiny_index,
                                                               monkeypatch):
  """LEEP reads neither phi nor the pool: the broad and strict settings of a source share its
  scores, and the shared scores are what a fresh computation gives; other queries compute anew."""
  zoo, _ = tiny_zoo
  tasks = openworld.zoo_tasks_sorted(zoo)
  task_no = {t: i for i, t in enumerate(tasks)}
  m_task = {m: task_no[r.task] for m, r in zoo.records.items()}
  qs = openworld.make_queries(tasks[:2], 1, 3, 0, "test", lambda source: np.zeros(0, np.int64))
  q_task = np.asarray([i for i, _, _ in qs])
  calls = []
  real = openworld.leep_matrix
  monkeypatch.setattr(openworld, "leep_matrix", lambda *a: calls.append(1) or real(*a))
  memo: dict = {}
  first = openworld.baseline_rows(tiny_proxy, tiny_index, zoo, qs, q_task, m_task, True, 0, memo)
  again = openworld.baseline_rows(tiny_proxy, tiny_index, zoo, qs, q_task, m_task, True, 0, memo)
  alone = openworld.baseline_rows(tiny_proxy, tiny_index, zoo, qs, q_task, m_task, True, 0)
  assert len(calls) == 2 and first["leep"] == again["leep"]
  assert {k: v for k, v in first["leep"].items() if k != "seconds_per_query"} == {
      k: v for k, v in alone["leep"].items() if k != "seconds_per_query"}
  other = openworld.make_queries(tasks[:2], 1, 3, 1, "test", lambda source: np.zeros(0, np.int64))
  openworld.baseline_rows(tiny_proxy, tiny_index, zoo, other, q_task, m_task, True, 0, memo)
  assert len(calls) == 3


def test_anchor_overlap_reads_where_a_models_anchors_lie():
  # Two query classes, each stood in for by 3 pool images; model 0's anchors are exactly those
  # images (class order swapped: the assignment finds it), model 1's lie elsewhere in the pool,
  # model 2 has one class whose anchors are half inside. Pool features: one-hot per image, the
  # prototypes the normalised sums of their stand-ins.
  n, d = 12, 12
  pool = np.eye(n, d, dtype=np.float32)
  standins = np.asarray([[[0, 1, 2], [3, 4, 5]]])
  protos = pool[standins].sum(2)
  protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
  from know2vec_jax.classmatch import QueryClasses
  q = QueryClasses(protos, np.ones((1, 2), np.float32), standins,
                   weights=np.ones((1, 2, 3), np.float32))
  anchors = np.asarray([[[3, 4, 5], [0, 1, 2], [0, 0, 0]],
                        [[6, 7, 8], [9, 10, 11], [0, 0, 0]],
                        [[0, 6, 7], [8, 9, 10], [0, 0, 0]]])
  mask = np.asarray([[1, 1, 0], [1, 1, 0], [1, 1, 0]], np.float32)
  inside = openworld.anchor_overlap(q, n, anchors, mask)
  np.testing.assert_allclose(inside[0], [1.0, 0.0, 1 / 6], atol=1e-6)
  # "near": an anchor as close to the prototype as its farthest stand-in counts; those are the
  # counted stand-ins themselves, so the share inside is that share (why "near" was dropped).
  edge = np.einsum("kd,knd->kn", protos[0], pool[standins[0]]).min(-1)
  close = np.einsum("kd,mjad->kmja", protos[0], pool[anchors]) >= edge[:, None, None, None] - 1e-6
  near = np.asarray([max(close[0, m, a].mean() + close[1, m, b].mean() for a, b in ((0, 1), (1, 0)))
                     / 2 for m in range(3)])
  np.testing.assert_allclose(near, [1.0, 0.0, 1 / 6], atol=1e-6)
  np.testing.assert_allclose(inside[0], near, atol=1e-6)
  # A stand-in that does not count (weight 0) is not "inside".
  q.weights = np.asarray([[[1, 1, 0], [1, 1, 1]]], np.float32)
  inside = openworld.anchor_overlap(q, n, anchors, mask)
  np.testing.assert_allclose(inside[0], [5 / 6, 0.0, 1 / 6], atol=1e-6)


def test_validation_carves_cover_every_ordered_pair_once():
  every = openworld.validation_carves("all", openworld.SOURCES)
  assert sorted(every.values()) == sorted(
      (t, v) for t in openworld.SOURCES for v in openworld.SOURCES if t != v)
  assert set(openworld.validation_carves("paired", openworld.SOURCES)) == set(openworld.CARVES)
  rev = openworld.validation_carves("reversed", ("digits",))
  assert rev == {"digits:reversed": ("mnist5k", "fashion_mnist")}  # MNIST trains, clothes unseen
  with pytest.raises(ConfigError, match="carve set"):
    openworld.validation_carves("some", openworld.SOURCES)
