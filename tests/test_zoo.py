"""Zoo: architectures, stacked training, the tiny preset, presets' design, ZooStore."""

import collections
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from know2vec_jax import storage
from flax import nnx

from know2vec_jax import zoo as zoo_lib
from know2vec_jax.zoo import architectures, build, train
from know2vec_jax.zoo.specs import demo_specs, starter_specs, tiny_specs


@pytest.mark.parametrize("arch", ["cnn_s", "cnn_l"])
def test_im2col_and_xla_convs_compute_the_same_function_and_gradient(arch):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.random((6, 28, 28, 1), np.float32))
  y = jnp.arange(6) % 4

  def abstract(impl):
    return nnx.split(nnx.eval_shape(lambda: architectures.make_model(arch, 4, conv_impl=impl)))
  # The two lowerings hold the same parameters (paths, shapes, dtypes) ...
  (gd_a, st_a), (gd_b, st_b) = abstract("im2col"), abstract("xla")
  assert jax.tree.structure(st_a) == jax.tree.structure(st_b)
  assert jax.tree.leaves(st_a) == jax.tree.leaves(st_b)
  # ... and compute the same function of them, forward and backward, under jit as the zoo trains
  # them. The parameters are drawn by numpy (fan-in scaled, non-zero biases): jitted, the model's
  # own initialisers take seconds to compile per kernel shape on a CPU.
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(
      np.prod(a.shape[:-1]) if len(a.shape) > 1 else 10.0), a.dtype), st_a)

  @jax.jit
  def logits_and_grads(params):
    return [(nnx.merge(gd, params)(x), jax.grad(lambda s: train._loss_fn(gd, s, x, y))(params))
            for gd in (gd_a, gd_b)]
  (la, ga), (lb, gb) = logits_and_grads(params)
  np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_capacity_spread():
  def count(arch):  # from the shapes alone: initialising values compiles each initialiser op
    model = nnx.eval_shape(lambda: architectures.make_model(arch, 4))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model)))
  counts = {a: count(a) for a in architectures.ARCHITECTURES}
  flops = {a: architectures.flops_per_image(a, 4) for a in architectures.ARCHITECTURES}
  assert counts["mlp"] < counts["cnn_s"] < counts["cnn_l"]
  assert flops["mlp"] < flops["cnn_s"] < flops["cnn_l"]


def test_tiny_zoo_trains_models_clearly_above_chance(tiny_zoo):
  zoo, info = tiny_zoo
  assert len(zoo) == len(tiny_specs()) == info["num_models"]
  for r in zoo.records.values():
    chance = 1.0 / r.k
    assert r.heldout_accuracy > chance + 0.4, (r.model_id, r.heldout_accuracy)
    if r.role == "normal":
      assert r.heldout_accuracy > 0.85, (r.model_id, r.heldout_accuracy)
  # Held-out accuracy is measured, not copied: recomputing it from the stored weights agrees.
  from know2vec_jax.data import load_source, task_images
  rid = "cnn_s.digits+invert." + "-".join(map(str, tiny_specs()[4].task.classes)) + ".a"
  r = zoo.record(rid)
  x, y = task_images(load_source(r.source), r.task, "test")
  acc = float(np.mean(np.argmax(zoo.model(rid)(x), -1) == y))
  assert acc == pytest.approx(r.heldout_accuracy, abs=1e-6)


def _train(specs, strategy, chunk=None):
  pool = build.ImagePool(sorted({s.task.source for s in specs}), 28, 1)
  spec = train.StackSpec(specs[0].arch, specs[0].k)
  cfg = build.BuildConfig(strategy=strategy)
  return build.train_models(specs, pool, spec, cfg)


def _stacked_specs():
  """Two cnn_s models of one class set, on digits and on digits+invert, with different budgets.
  In a stack they share a pool of both sources (the second one's rows point into its second
  half); alone each gets a pool of its own source only."""
  s = [x for x in tiny_specs() if x.arch == "cnn_s" and x.k == 4]
  a, b = s[0], next(x for x in s if x.task.source != s[0].task.source)
  assert a.task.classes == b.task.classes and a.seed != b.seed
  return [dataclasses.replace(a, steps=a.steps // 2), dataclasses.replace(b, steps=20)]


@pytest.fixture(scope="module")
def trained_alone():
  """Each model of :func:`_stacked_specs` trained alone (with equal shapes, one compilation
  serves both): the reference for both strategies, since one model alone is one training loop
  whatever maps over the model axis (measured: the vmap stack stays within 4% of the tolerance
  below from it)."""
  return [_train([s], "map") for s in _stacked_specs()]


@pytest.mark.parametrize("strategy", ["map", "vmap"])
def test_stacked_training_equals_training_each_model_alone(strategy, trained_alone):
  # Different budgets in one stack: each model must still run exactly its own (under vmap the
  # one that finished is held fixed while the other goes on), on its own images.
  specs = _stacked_specs()
  params, heldout, _, _ = _train(specs, strategy)
  for i, (p1, h1, _, _) in enumerate(trained_alone):
    for a, b in zip(jax.tree.leaves(train.unstack(params, i)), jax.tree.leaves(p1), strict=True):
      np.testing.assert_allclose(a, b[0], rtol=2e-4, atol=2e-5)
    assert heldout[i] == pytest.approx(h1[0], abs=2e-3)


def test_zero_step_models_keep_their_initial_weights():
  # The stacked-training test's models (the budgets are traced: its compilations serve).
  s = [dataclasses.replace(x, steps=0) for x in _stacked_specs()]
  params, _, _, _ = _train(s, "map")
  init = train.init_stack(train.StackSpec(s[0].arch, s[0].k), [x.seed for x in s])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init)):
    np.testing.assert_array_equal(a, b)


def test_label_noise_is_applied_and_deterministic():
  y = np.arange(1000) % 4
  a = build._noisy_labels(y, 4, 0.5, seed=1)
  assert np.all(a == build._noisy_labels(y, 4, 0.5, seed=1))
  assert 0.45 < np.mean(a != y) < 0.55
  assert np.all((a >= 0) & (a < 4))


def test_demo_preset_design():
  specs = demo_specs()
  assert len(specs) >= 400
  assert len({s.model_id for s in specs}) == len(specs)
  four = [s for s in specs if s.k == 4]
  tasks = collections.Counter(s.task for s in four)
  assert len(tasks) >= 120 and min(tasks.values()) >= 3
  per_base = collections.Counter(t.source.split("+")[0] for t in tasks)
  assert set(per_base) == {"fashion_mnist", "mnist5k", "digits"}
  assert min(per_base.values()) >= 40
  # The same class set in different domains.
  by_classes = collections.defaultdict(set)
  for t in tasks:
    by_classes[(t.source.split("+")[0], t.classes)].add(t.source)
  assert sum(len(v) > 1 for v in by_classes.values()) >= 30
  assert {s.k for s in specs} == {2, 4, 10}
  assert {s.arch for s in specs} == {"mlp", "cnn_s", "cnn_l"}
  assert len({s.steps for s in specs}) >= 4
  roles = collections.Counter(s.role for s in specs)
  assert roles["label_noise"] >= 10 and roles["short"] >= 10
  assert demo_specs() == specs  # deterministic
  # The main job's starter zoo: demo models exactly as the demo trains them, both families and
  # every domain of every base, the cross-domain twins and the 10-way distractors kept.
  starter = starter_specs()
  assert len(starter) == 180 and set(starter) <= set(specs)
  assert {s.arch for s in starter} == {"mlp", "cnn_s"} and {s.k for s in starter} == {4, 10}
  assert {s.task.source for s in starter} == {s.task.source for s in specs}
  kept = {s.task for s in starter if s.k == 4}
  assert sum(len({t for t in kept if (t.source.split("+")[0], t.classes) == key}) > 1
             for key in by_classes) == 36
  assert {s.role for s in starter} == {"normal", "label_noise", "short"}


def test_bad_specs_are_rejected():
  s = tiny_specs()[0]
  with pytest.raises(zoo_lib.ZooError, match="duplicate model id"):
    build.check_specs([s, s])
  with pytest.raises(zoo_lib.ZooError, match="unknown architecture 'resnet'"):
    build.check_specs([dataclasses.replace(s, arch="resnet")])
  with pytest.raises(zoo_lib.ZooError, match="at least one"):
    build.check_specs([])
  with pytest.raises(ValueError, match="label_noise"):
    dataclasses.replace(s, label_noise=1.5)


def test_store_round_trips_bit_exactly(tiny_zoo, tiny_zoo_dir):
  zoo, info = tiny_zoo
  loaded = zoo_lib.load_zoo(tiny_zoo_dir)
  assert list(loaded.records) == list(zoo.records)
  for mid, r in zoo.records.items():
    assert loaded.records[mid] == r
  for name, stack in zoo.stacks.items():
    other = loaded.stacks[name]
    assert other.model_ids == stack.model_ids and other.spec == stack.spec
    la, lb = jax.tree.leaves(stack.params), jax.tree.leaves(other.params)
    assert len(la) == len(lb)
    for a, b in zip(la, lb):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = np.random.default_rng(0).random((4, 28, 28, 1), np.float32)
  for name in zoo.stacks:
    np.testing.assert_array_equal(zoo.stacks[name].apply(x), loaded.stacks[name].apply(x))
  assert zoo_lib.read_manifest(tiny_zoo_dir)["build"]["num_models"] == len(zoo)


def test_interrupted_save_leaves_previous_zoo_intact(tiny_zoo, tiny_zoo_dir, tmp_path,
                                                     monkeypatch):
  import shutil
  target = tmp_path / "zoo"
  shutil.copytree(tiny_zoo_dir, target)
  before = (target / "zoo.json").read_text()

  def boom(*a, **k):
    raise KeyboardInterrupt("simulated interruption while writing the manifest")
  monkeypatch.setattr(storage, "write_json_atomic", boom)
  with pytest.raises(KeyboardInterrupt):
    zoo_lib.save_zoo(tiny_zoo[0], target)
  assert (target / "zoo.json").read_text() == before
  assert sorted(os.listdir(tmp_path)) == ["zoo"]  # no half-written sibling left behind
  assert len(zoo_lib.load_zoo(target)) == len(tiny_zoo[0])
  # An interrupted first build leaves nothing that loads.
  with pytest.raises(KeyboardInterrupt):
    zoo_lib.save_zoo(tiny_zoo[0], tmp_path / "fresh")
  with pytest.raises(zoo_lib.ZooError, match="does not exist"):
    zoo_lib.load_zoo(tmp_path / "fresh")


def test_incomplete_or_corrupted_zoo_is_refused(tiny_zoo_dir, tmp_path):
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(tiny_zoo_dir, bad)
  (bad / "zoo.json").unlink()
  with pytest.raises(zoo_lib.ZooError, match="zoo.json is missing"):
    zoo_lib.load_zoo(bad)
  shutil.copy(tiny_zoo_dir / "zoo.json", bad / "zoo.json")
  (bad / "zoo.json").write_text((tiny_zoo_dir / "zoo.json").read_text()[:200])
  with pytest.raises(zoo_lib.ZooError, match="corrupted"):
    zoo_lib.load_zoo(bad)
  shutil.copy(tiny_zoo_dir / "zoo.json", bad / "zoo.json")
  shutil.rmtree(bad / "params" / "mlp-k4")
  with pytest.raises(zoo_lib.ZooError, match="params/mlp-k4 checkpoint missing"):
    zoo_lib.load_zoo(bad)
  shutil.copytree(tiny_zoo_dir / "params" / "mlp-k4", bad / "params" / "mlp-k4")
  # Same shapes, other values: only the recorded checksum can tell.
  m = json.loads((tiny_zoo_dir / "zoo.json").read_text())
  m["checksums"]["params/mlp-k4"] = "0" * 64
  m[storage.MANIFEST_CHECKSUM] = storage.manifest_checksum(m)  # the manifest itself holds
  (bad / "zoo.json").write_text(json.dumps(m))
  with pytest.raises(zoo_lib.ZooError, match="does not match the checksum and shapes"):
    zoo_lib.load_zoo(bad)
  shutil.copy(tiny_zoo_dir / "zoo.json", bad / "zoo.json")
  for f in (bad / "params" / "cnn_s-k4").rglob("*"):
    if f.is_file() and f.stat().st_size > 100 and "d" in f.parent.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(zoo_lib.ZooError, match="cnn_s-k4"):
    zoo_lib.load_zoo(bad)
  m = json.loads((tiny_zoo_dir / "zoo.json").read_text())
  m["version"] = 99
  (bad / "zoo.json").write_text(json.dumps(m))
  with pytest.raises(zoo_lib.ZooError, match="version 99"):
    zoo_lib.load_zoo(bad)


def test_unknown_model_id(tiny_zoo):
  with pytest.raises(zoo_lib.ZooError, match="unknown model id 'nope'"):
    tiny_zoo[0].model("nope")


def test_varied_preset_design():
  from know2vec_jax.zoo.specs import ESTIMATOR_FAMILIES, NEURAL_FAMILIES, varied_specs
  specs = varied_specs()
  assert specs[:len(demo_specs())] == demo_specs()  # the demo zoo, then the rest
  archs = collections.Counter(s.arch for s in specs)
  assert set(archs) == set(NEURAL_FAMILIES) | set(ESTIMATOR_FAMILIES)
  by_task = collections.defaultdict(set)
  for s in specs:
    by_task[s.task].add(s.arch)
  # Every family has tasks only it has (4 per base dataset), with exactly one model each.
  for fam in archs:
    own = [t for t, a in by_task.items() if a == {fam}]
    assert len(own) >= 12
    assert all(sum(s.task == t for s in specs) == 1 for t in own)
  assert varied_specs() == specs


def test_estimator_families_train_answer_and_round_trip(tmp_path):
  """Non-neural families: fitted by the builder, stored as skops bytes, served as black boxes
  answering logits, probabilities or one-hot labels, loaded back byte for byte."""
  from know2vec_jax.blackbox import EstimatorGroup, groups_from_zoo
  from know2vec_jax.zoo.specs import ModelSpec, model_id
  task = tiny_specs()[0].task
  specs = [ModelSpec(model_id(a, task), a, task, seed=i, steps=0)
           for i, a in enumerate(("logreg", "forest", "knn"))]
  # The label-noise twin is a kNN, fitted in no time (a logistic regression's lbfgs fit takes
  # seconds): measured 0.65-0.68 held out, against 0.99 for the clean one.
  specs.append(dataclasses.replace(specs[2], model_id="knn.noisy", label_noise=0.5,
                                   role="label_noise"))
  zoo, _ = build.build_zoo(specs, progress=False)
  recs = zoo.records
  assert all(recs[s.model_id].heldout_accuracy > 0.8 for s in specs[:3])  # chance is 0.25
  assert recs["knn.noisy"].heldout_accuracy < recs[specs[2].model_id].heldout_accuracy - 0.1
  zoo_lib.save_zoo(zoo, tmp_path / "z")
  back = zoo_lib.load_zoo(tmp_path / "z")
  assert set(back.estimators) == {"logreg-k4", "forest-k4", "knn-k4"}
  for name, est in zoo.estimators.items():
    assert back.estimators[name].blobs == est.blobs
    assert back.estimators[name].fingerprints() == est.fingerprints()
  groups = groups_from_zoo(back)
  assert all(isinstance(g, EstimatorGroup) for g in groups)
  x = np.random.default_rng(0).random((6, 28, 28, 1)).astype(np.float32)
  out = {g.name: g(x) for g in groups}
  assert out["forest-k4"].min() >= 0 and np.allclose(out["forest-k4"].sum(-1), 1, atol=1e-5)
  knn = out["knn-k4"]
  assert set(np.unique(knn)) <= {0.0, 1.0} and np.all(knn.sum(-1) == 1)  # labels only
  logreg = back.model(specs[0].model_id)
  np.testing.assert_allclose(out["logreg-k4"][0], logreg.decision_function(x.reshape(6, -1)),
                             rtol=1e-5)
  sub = groups_from_zoo(back, model_ids=["knn.noisy"])
  assert [g.model_ids for g in sub] == [["knn.noisy"]]
  assert sub[0](x).shape == (1, 6, 4) and sub[0].queries.tolist() == [6]
