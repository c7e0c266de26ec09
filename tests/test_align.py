"""Aligner: the loss, 1 vs 8 devices, checkpoint resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from know2vec_jax import align
from know2vec_jax.mesh import data_mesh
from know2vec_jax.vectorizers import VectorizerConfig

D = 8  # feature size of the synthetic grids
VCFG = VectorizerConfig(hidden=16, embed_dim=8, heads=2, layers=1)
# One config for the trainers of the default vectorizers and objective: the step's compilation
# is keyed on the config (the schedule reads ``steps``), so the agreement and checkpoint tests run
# the first steps of the 60 the loss test needs and all share its compiled step, one per mesh.
# The learning rate gives that test a clear margin (last/first loss about 0.57, needed < 0.7).
CFG = align.AlignConfig(steps=60, batch_size=16, learning_rate=1e-2, warmup_steps=2,
                        checkpoint_every=3)
SHORT = 6  # steps of the agreement and checkpoint tests
RANK = align.RankingObjective(feature_noise=0.01)
# Both batch augmentations on: the vectorizer variants train with them, so that each variant's
# compiled step also shows that class-subset and near-twin batches train on 8 devices (the
# augmentations' own tests check the batches they draw). No feature noise: the tests above train
# with it, and its Gaussian draws add about 5 s to the compilation of each step.
AUGMENTED = align.RankingObjective(subset_prob=0.5, hard_share=0.25)


def trainer(data, cfg=CFG, vcfg=VCFG, objective=RANK, **kw):
  return align.Trainer(vcfg, D, cfg, objective, data, **kw)


def _data(seed=0, models=24, tasks=8):
  rng = np.random.default_rng(seed)
  task_feat = rng.normal(size=(tasks, 4, 4, 8)).astype(np.float32)
  model_task = (np.arange(models) % tasks).astype(np.int32)
  mg = task_feat[model_task] + 0.1 * rng.normal(size=(models, 4, 4, 8)).astype(np.float32)
  qg = task_feat[:, None] + 0.1 * rng.normal(size=(tasks, 5, 4, 4, 8)).astype(np.float32)
  mask = np.ones((tasks, 4), np.float32)
  return align.AlignData(mg, np.ones((models, 4), np.float32), model_task, qg, mask)


def test_ranking_loss_by_hand():
  q = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  m = jnp.asarray([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
  task = jnp.asarray([0, 1, 2])
  loss, s = align.ranking_loss(q, m, task, margin=0.2)
  # query 0: pos 1.0, hardest neg 0.6 -> 0; query 1: pos 0.8, neg 1.0 -> 0.4;
  # query 2: pos 0.8, neg 1.0 -> 0.4.  model 0: pos 1, neg max(0, .6) -> 0; model 1: pos .8,
  # neg max(.6, 1.0) -> 0.4; model 2: pos .8, neg max(0, 1.0) -> 0.4.
  assert float(loss) == pytest.approx(0.8 / 3 + 0.8 / 3, abs=1e-6)
  # Same-task pairs are never negatives.
  loss2, _ = align.ranking_loss(q, m, jnp.asarray([0, 1, 1]), margin=0.2)
  assert float(loss2) < float(loss)


def _train(mesh, steps=CFG.steps, ckpt=None):
  tr = trainer(_data(), mesh=mesh, checkpoint_dir=ckpt)
  hist = tr.run(steps, progress=False, log_every=1)
  return tr, hist


def _embed_models(model, grid, mask):
  """``model.embed_models`` in one jitted call (op by op, each primitive compiles on its own)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, g, m: nnx.merge(graphdef, s).embed_models(g, m))(state, grid, mask)


def test_one_and_eight_devices_agree():
  assert jax.device_count() == 8
  one = data_mesh(1)
  eight = data_mesh(8)
  t1, h1 = _train(one, SHORT)
  t8, h8 = _train(eight, SHORT)
  assert len(h1) == len(h8) == SHORT
  assert t8.state["params"]["model_vectorizer"]["encoder"]["diag"]["kernel"].sharding.mesh.size \
      == 8
  np.testing.assert_allclose([h["loss"] for h in h1], [h["loss"] for h in h8], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(t1.state["params"]), jax.tree.leaves(t8.state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss():
  _, hist = _train(data_mesh(1))
  assert len(hist) == 60
  assert np.mean([h["loss"] for h in hist[-10:]]) < 0.7 * np.mean([h["loss"] for h in hist[:5]])


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
  mesh = data_mesh(8)
  full, _ = _train(mesh, SHORT)
  part, _ = _train(mesh, steps=3, ckpt=tmp_path)
  assert part.step == 3
  resumed = trainer(_data(), mesh=mesh, checkpoint_dir=tmp_path)
  assert resumed.step == 3
  resumed.run(SHORT, progress=False)
  assert resumed.step == SHORT
  for a, b in zip(jax.tree.leaves(full.state["params"]), jax.tree.leaves(resumed.state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_batch_must_divide_devices():
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    trainer(_data(), dataclasses.replace(CFG, batch_size=12), mesh=data_mesh(8))


def test_objective_and_data_must_match():
  with pytest.raises(ValueError, match="TransferObjective trains on TransferData, got AlignData"):
    trainer(_data(), objective=align.TransferObjective(), mesh=data_mesh(8))


@pytest.mark.parametrize("variant,shared", [("lstm", False), ("lstm", True),
                                            ("attention", False)])
def test_every_variant_trains(variant, shared):
  vcfg = dataclasses.replace(VCFG, variant=variant, shared=shared)
  tr = trainer(_data(), dataclasses.replace(CFG, steps=3), vcfg, AUGMENTED, mesh=data_mesh(8))
  hist = tr.run(progress=False, log_every=1)
  assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
  v = _embed_models(tr.model(), jnp.asarray(_data().model_grid[:2]), jnp.ones((2, 4)))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=-1), 1.0, atol=1e-5)


def test_class_subset_augmentation():
  data = _data()
  cfg = dataclasses.replace(CFG, batch_size=64)
  rows, eps, subset = align.sample_batch_indices(data, cfg, 0.5, step=0)
  batch = align.local_batch(data, rows, eps, subset)
  sizes = subset.sum(1)
  assert set(sizes.tolist()) <= {2.0, 3.0, 4.0} and 10 < (sizes < 4).sum() < 54
  np.testing.assert_array_equal(batch["model_mask"], batch["query_mask"])  # same subset both sides
  np.testing.assert_array_equal(batch["full"], (sizes == 4).astype(np.float32))
  # Items of one task share a ranking key only when they keep the same classes.
  for i in range(64):
    for j in range(64):
      same = batch["task"][i] == batch["task"][j] and np.array_equal(subset[i], subset[j])
      assert (batch["key"][i] == batch["key"][j]) == same
  # Deterministic per step (every process draws the same global batch).
  again = align.sample_batch_indices(data, cfg, 0.5, step=0)
  np.testing.assert_array_equal(again[2], subset)
  # Such batches train on 8 devices: test_every_variant_trains (AUGMENTED).


def test_near_twin_batches():
  """Near-twin tasks are found from the query episodes alone, and a hard share puts models of
  an item's look-alike tasks in the batch, leaving the rest of the batch as it was."""
  rng = np.random.default_rng(3)
  base = rng.normal(size=(10, D)).astype(np.float32)
  classes = [(0, 1, 2, 3), (0, 1, 2, 4), (5, 6, 7, 8), (5, 6, 7, 9), (0, 1, 5, 6), (3, 4, 8, 9)]
  qg = np.zeros((len(classes), 3, 4, 4, D), np.float32)
  for t, cls in enumerate(classes):
    for k, c in enumerate(cls):
      qg[t, :, k, k] = base[c] + 0.05 * rng.normal(size=(3, D))
  mask = np.ones((len(classes), 4), np.float32)
  twins = align.near_twin_tasks(qg, mask, 1)
  # The task sharing three classes of four is each one's nearest look-alike.
  np.testing.assert_array_equal(twins[:4, 0], [1, 0, 3, 2])
  assert align.near_twin_tasks(qg, mask, 99).shape == (6, 5)  # capped at T - 1, never itself
  assert not np.any(align.near_twin_tasks(qg, mask, 5) == np.arange(6)[:, None])
  model_task = np.repeat(np.arange(6), 3).astype(np.int32)
  mg = qg[model_task, 0] + 0.1 * rng.normal(size=(18, 4, 4, D)).astype(np.float32)
  data = align.AlignData(mg, np.ones((18, 4), np.float32), model_task, qg, mask)
  cfg = dataclasses.replace(CFG, batch_size=16)
  plain = align.sample_batch_indices(data, cfg, 0.0, step=2)
  hard = align.sample_batch_indices(data, cfg, 0.0, step=2, hard_share=0.5, hard_neighbours=1)
  np.testing.assert_array_equal(hard[0][:8], plain[0][:8])
  np.testing.assert_array_equal(hard[1], plain[1])
  np.testing.assert_array_equal(model_task[hard[0][8:]], twins[model_task[hard[0][:8]], 0])
  assert np.any(hard[0][8:] != plain[0][8:])
  with pytest.raises(ValueError, match="hard_share"):
    align.RankingObjective(hard_share=0.75)
  # Such batches train on 8 devices: test_every_variant_trains (AUGMENTED).


def _transfer_data(seed=0, models=12, targets=6):
  """Targets whose measured accuracy depends on the match between target and model features."""
  rng = np.random.default_rng(seed)
  mg = rng.normal(size=(models, 4, 4, 8)).astype(np.float32)
  qg = rng.normal(size=(targets, 3, 4, 4, 8)).astype(np.float32)
  acc = 0.5 + 0.1 * np.tanh(np.einsum("tskd,mkd->tm", qg[:, :, range(4), range(4)],
                                      mg[:, range(4), range(4)]) / 6)
  return align.TransferData(mg, np.ones((models, 4), np.float32), qg,
                            np.ones((targets, 4), np.float32), acc.astype(np.float32))


def test_listwise_loss_by_hand():
  scores = jnp.asarray([[0.0, 0.1]])
  acc = jnp.asarray([[0.5, 0.7]])
  # z = [-1, 1]; target = softmax([-2, 2]) (tau 0.5); prediction = softmax([0, 1]) (T 0.1).
  target = np.exp([-2.0, 2.0]) / np.exp([-2.0, 2.0]).sum()
  logp = np.asarray([0.0, 1.0]) - np.log(np.exp([0.0, 1.0]).sum())
  want = -(target * logp).sum()
  got = align.listwise_loss(scores, acc, temperature=0.1, target_temperature=0.5)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Reversing the scores (wrong order) costs more.
  assert float(align.listwise_loss(scores[:, ::-1], acc, 0.1, 0.5)) > float(got)


def test_transfer_objective_one_and_eight_devices_agree_and_learn():
  cfg = dataclasses.replace(CFG, steps=40, batch_size=8, learning_rate=3e-3)
  h = {}
  for n in (1, 8):
    tr = trainer(_transfer_data(), cfg, objective=align.TransferObjective(), mesh=data_mesh(n))
    h[n] = tr.run(progress=False, log_every=1)
    if n == 8:
      model = tr.model()
  np.testing.assert_allclose([x["loss"] for x in h[1]], [x["loss"] for x in h[8]], rtol=1e-4)
  assert np.mean([x["loss"] for x in h[8][-5:]]) < np.mean([x["loss"] for x in h[8][:3]])
  d = _transfer_data()
  graphdef, state = nnx.split(model)

  @jax.jit  # one compilation rather than one per primitive op by op
  def predict(state):
    model = nnx.merge(graphdef, state)
    q = model.embed_queries(d.query_grid[:, 0], d.query_mask)
    m = model.embed_models(d.model_grid, d.model_mask)
    return model.predict_accuracy(q[:, None], m[None])
  pred = np.asarray(predict(state))
  assert pred.shape == d.accuracy.shape and np.all((pred > 0) & (pred < 1))


def test_transfer_data_checks_shapes_and_values():
  d = _transfer_data()
  with pytest.raises(ValueError, match="targets"):
    align.TransferData(d.model_grid, d.model_mask, d.query_grid[:3], d.query_mask, d.accuracy)
  bad = d.accuracy.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    align.TransferData(d.model_grid, d.model_mask, d.query_grid, d.query_mask, bad)
