"""Black boxes and the probing engine."""

import jax
import numpy as np
import pytest

from know2vec_jax import probe
from know2vec_jax.blackbox import (BlackBoxError, BudgetExceededError, CallableBlackBox,
                                   InputError, groups_from_zoo)

SHAPE = (28, 28, 1)


def _images(n, seed=0):
  return np.random.default_rng(seed).random((n,) + SHAPE, np.float32)


def test_callable_counts_and_budget():
  bb = CallableBlackBox(lambda x: np.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1), 2, SHAPE,
                        batch_size=3, budget=10)
  out = bb(_images(7))
  assert out.shape == (1, 7, 2) and bb.queries.tolist() == [7]
  with pytest.raises(BudgetExceededError, match="exceed its budget of 10"):
    bb(_images(4))
  assert bb.queries.tolist() == [7]  # a refused call is not charged


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 28, 28), np.float32), "must have shape"),
    (np.zeros((2, 32, 32, 1), np.float32), "expected \\(28, 28, 1\\)"),
    (np.zeros((2, 28, 28, 1), np.uint8), "dtype uint8"),
    (np.full((2, 28, 28, 1), np.nan, np.float32), "NaN/inf"),
    (np.full((2, 28, 28, 1), 2.0, np.float32), "must lie in \\[0, 1\\]"),
])
def test_bad_images(images, match):
  bb = CallableBlackBox(lambda x: np.zeros((len(x), 2)), 2, SHAPE)
  with pytest.raises(InputError, match=match):
    bb(images)


def test_misbehaving_black_boxes():
  def raises(x):
    raise RuntimeError("server down")
  with pytest.raises(BlackBoxError, match="raised RuntimeError: server down"):
    CallableBlackBox(raises, 2, SHAPE, model_id="remote")(_images(2))
  with pytest.raises(BlackBoxError, match="'wrong' returned logits of shape \\(2, 3\\)"):
    CallableBlackBox(lambda x: np.zeros((len(x), 3)), 2, SHAPE, model_id="wrong")(_images(2))
  with pytest.raises(BlackBoxError, match="'nan' returned NaN/inf logits"):
    CallableBlackBox(lambda x: np.full((len(x), 2), np.nan), 2, SHAPE, model_id="nan")(_images(2))


def test_stack_group_matches_each_model(tiny_zoo):
  zoo, _ = tiny_zoo
  x = _images(5)
  for g in groups_from_zoo(zoo):
    out = g(x)
    for i, mid in enumerate(g.model_ids):
      np.testing.assert_allclose(out[i], np.asarray(zoo.model(mid)(x)), rtol=1e-4, atol=1e-5)
    per_model = g(np.stack([x] * g.num_models))
    np.testing.assert_allclose(per_model, out, rtol=1e-5, atol=1e-6)
    assert np.all(g.queries == 10)


@pytest.mark.parametrize("strategy", ["vmap", "map", "loop"])
def test_strategies_and_sharding_agree(tiny_zoo, strategy):
  zoo, _ = tiny_zoo
  stack = zoo.stacks["mlp-k4"]
  x = jax.numpy.asarray(np.stack([_images(6, s) for s in range(len(stack))]))
  ref = np.asarray(probe.stack_logits(stack.graphdef, stack.params, x, strategy="map"))
  got = np.asarray(probe.stack_logits(stack.graphdef, stack.params, x, strategy=strategy))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  if strategy != "loop":
    mesh = probe.data_mesh(8)
    assert mesh.size == 8
    sharded = np.asarray(probe.stack_logits(stack.graphdef, stack.params, x, strategy=strategy,
                                            mesh=mesh))
    np.testing.assert_allclose(sharded, ref, rtol=1e-5, atol=1e-6)


def test_vmap_group_runs_a_large_stack_in_model_chunks(tiny_zoo):
  # A stack too large for max_pairs at min_batch images runs its models in chunks within each
  # call instead of shrinking the call to a few images; the logits are the unchunked ones.
  zoo, _ = tiny_zoo
  g = next(g for g in groups_from_zoo(zoo, strategy="vmap") if g.num_models >= 3)
  x = _images(12)
  ref = g(x)
  g.max_pairs, g.min_batch = 16, 8  # models * 8 images > 16 pairs: chunks of 2 models
  assert g.call_plan(12) == (8, 2)
  np.testing.assert_allclose(g(x), ref, rtol=1e-5, atol=1e-6)
  per = np.stack([_images(12, s) for s in range(g.num_models)])
  g.max_pairs, g.min_batch = 1 << 20, 256
  assert g.call_plan(12) == (12, None)
  ref = g(per)
  g.max_pairs, g.min_batch = 16, 8
  np.testing.assert_allclose(g(per), ref, rtol=1e-5, atol=1e-6)
  # Whatever the plan, the live pairs stay within max_pairs and every image is covered.
  for pairs, least in ((64, 4), (16, 1), (1000, 256)):
    g.max_pairs, g.min_batch = pairs, least
    per_call, chunk = g.call_plan(12)
    assert 1 <= per_call <= 12 and (chunk or g.num_models) * per_call <= max(pairs, per_call)


def test_group_selection_and_unknown_ids(tiny_zoo):
  zoo, _ = tiny_zoo
  some = list(zoo.records)[:3]
  groups = groups_from_zoo(zoo, model_ids=some)
  assert sorted(m for g in groups for m in g.model_ids) == sorted(some)
  with pytest.raises(InputError, match="unknown model ids"):
    groups_from_zoo(zoo, model_ids=["nope"])


def test_sharded_stack_group_pads_once_and_matches(tiny_zoo):
  zoo, _ = tiny_zoo
  mesh = probe.data_mesh(8)
  plain = {g.name: g for g in groups_from_zoo(zoo)}
  for g in groups_from_zoo(zoo, mesh=mesh):
    # Placed once at construction, padded to a multiple of the 8 devices.
    leaf = jax.tree.leaves(g._params)[0]
    assert leaf.shape[0] % 8 == 0 and leaf.shape[0] >= g.num_models
    assert probe.shard_stack(g._params, mesh) is g._params
    # Batches of test_stack_group_matches_each_model's shapes: the unsharded reference calls
    # reuse its compilations.
    x = _images(5)
    np.testing.assert_allclose(g(x), plain[g.name](x), rtol=1e-5, atol=1e-6)
    per = np.stack([_images(5, s) for s in range(g.num_models)])
    np.testing.assert_allclose(g(per), plain[g.name](per), rtol=1e-5, atol=1e-6)
    assert np.all(g.queries == 10)
