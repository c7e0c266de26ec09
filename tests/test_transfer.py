"""Fine-tune ground truth: determinism, padding to shared shapes (against a direct unpadded
fine-tune), one compilation for every target, the zoo's weights, caching, the noise ceiling and
errors."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from know2vec_jax import transfer
from know2vec_jax.data import Task
from know2vec_jax.transfer import (FinetuneConfig, TransferError, TransferTarget,
                                   finetune_accuracy, ground_truth, noise_ceiling, split_half,
                                   target_data)
from know2vec_jax.zoo import BuildConfig, ModelSpec, build_zoo
from know2vec_jax.zoo import train as train_lib

TARGET = TransferTarget("digits-flip", Task("digits+flip", (1, 2, 7)), split="train")
CFG = FinetuneConfig(steps=8, shots=20, test_per_class=40, runs=2, chunk_size=4)
# The linear probe of every test here: one protocol, and one model per jitted chunk, so that its
# compiled fine-tune (one per architecture) serves stacks of any size and every test.
LIN = FinetuneConfig(mode="linear", steps=20, shots=20, test_per_class=40, runs=2, chunk_size=1)
# Two stacks, requested out of their order: three MLPs (six fine-tunes, one chunk of four and one
# padded to four) and the cnn_s of test_padded_finetune_equals_a_direct_unpadded_one, whose
# compiled fine-tunes these share.
IDS = ["mlp.digits.1-5-7-8.a", "cnn_s.digits.1-5-7-8.a", "mlp.digits+invert.3-4-5-8.a",
       "mlp.digits.3-4-5-8.a"]


def test_target_split_is_fixed_disjoint_and_resamples_shots():
  td = target_data(TARGET, shots=20, test_per_class=40)
  pool = np.concatenate(td.pool)
  assert len(np.intersect1d(pool, td.test)) == 0
  assert [int(np.sum(td.labels[td.test] == c)) for c in range(3)] == [40, 40, 40]
  a, b = td.train_sample(20, seed=1), td.train_sample(20, seed=2)
  assert len(a) == 60 and not np.array_equal(a, b)
  assert np.isin(a, pool).all()
  np.testing.assert_array_equal(td.test, target_data(TARGET, 20, 40).test)


def test_finetune_is_deterministic_and_follows_the_requested_order(tiny_zoo):
  zoo, _ = tiny_zoo
  ids = IDS
  a = finetune_accuracy(zoo, ids, TARGET, CFG)
  b = finetune_accuracy(zoo, ids, TARGET, CFG)
  assert a.shape == (2, 4) and np.all((a >= 0) & (a <= 1))
  np.testing.assert_array_equal(a, b)
  # Column order follows the request, whatever the stacks.
  np.testing.assert_array_equal(finetune_accuracy(zoo, ids[::-1], TARGET, CFG), a[:, ::-1])
  # The linear probe (frozen body) is a different measurement of the same models.
  lin = finetune_accuracy(zoo, ids, TARGET, LIN)
  assert lin.shape == a.shape and not np.array_equal(lin, a)


def test_ground_truth_cache_roundtrip_and_key(tiny_zoo, tiny_zoo_dir, tmp_path, monkeypatch):
  zoo, _ = tiny_zoo
  ids = IDS[:3]
  first = ground_truth(zoo, tiny_zoo_dir, ids, [TARGET], CFG, cache_dir=tmp_path)
  files = list(tmp_path.glob("*.npz"))
  assert len(files) == 1

  def boom(*a, **k):
    raise AssertionError("recomputed despite the cache")
  monkeypatch.setattr(transfer, "finetune_accuracy", boom)
  again = ground_truth(zoo, tiny_zoo_dir, ids, [TARGET], CFG, cache_dir=tmp_path)
  np.testing.assert_array_equal(first[TARGET.name], again[TARGET.name])
  # A different protocol is a different cache entry, never a stale hit.
  with pytest.raises(AssertionError, match="recomputed"):
    ground_truth(zoo, tiny_zoo_dir, ids, [TARGET], FinetuneConfig(steps=9, shots=20,
                                                                  test_per_class=40, runs=2),
                 cache_dir=tmp_path)
  # A computation that changes the numbers changes the key as well.
  monkeypatch.setattr(transfer, "_IMPLEMENTATION", transfer._IMPLEMENTATION + 1)
  with pytest.raises(AssertionError, match="recomputed"):
    ground_truth(zoo, tiny_zoo_dir, ids, [TARGET], CFG, cache_dir=tmp_path)
  monkeypatch.undo()
  files[0].write_bytes(files[0].read_bytes()[:40])
  with pytest.raises(TransferError, match="unreadable cache file"):
    ground_truth(zoo, tiny_zoo_dir, ids, [TARGET], CFG, cache_dir=tmp_path)


def test_bad_requests_get_clear_errors(tiny_zoo):
  zoo, _ = tiny_zoo
  with pytest.raises(TransferError, match="at least 2"):
    target_data(TransferTarget("one", Task("digits", (3,))), 5, 10)
  with pytest.raises(TransferError, match="unknown model id 'nope'"):
    finetune_accuracy(zoo, ["nope"], TARGET, CFG)
  with pytest.raises(TransferError, match="plus at least 10 to test on"):
    target_data(TransferTarget("small", Task("digits", (1, 2)), split="test"), 50, 300)
  with pytest.raises(TransferError, match="runs must be >= 2"):
    FinetuneConfig(runs=1)
  with pytest.raises(TransferError, match="mode"):
    FinetuneConfig(mode="partial")


def test_split_half_is_agreement_between_halves():
  rng = np.random.default_rng(0)
  truth = rng.random(30)
  clean = truth + 0.001 * rng.normal(size=(6, 30))
  noisy = truth + 1.0 * rng.normal(size=(6, 30))

  def corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])
  assert split_half(clean, corr) > 0.99
  assert split_half(noisy, corr) < split_half(clean, corr) - 0.3
  # Directly: the mean over the 10 divisions of 6 runs into two halves.
  direct = []
  for a in itertools.combinations(range(6), 3):
    b = [i for i in range(6) if i not in a]
    if 0 in a:
      direct.append(corr(noisy[list(a)].mean(0), noisy[b].mean(0)))
  assert len(direct) == 10 and split_half(noisy, corr) == pytest.approx(np.mean(direct))
  with pytest.raises(TransferError, match="R >= 2"):
    noise_ceiling(truth[None], corr)


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_noise_ceiling_matches_the_truths_agreement_with_the_mean(sigma):
  # Synthetic runs with a known truth: the ceiling estimates tau(R-run mean, truth), the score a
  # method that knew the expected accuracies would get; the uncorrected split-half is far lower.
  from scipy.stats import kendalltau

  from know2vec_jax.metrics import weighted_tau

  def kendall(a, b):
    return float(kendalltau(a, b).statistic)
  rng = np.random.default_rng(1)
  est = {"kendall": [], "weighted": []}
  direct = {"kendall": [], "weighted": []}
  half = []
  for _ in range(60):
    truth = rng.normal(size=60)
    runs = truth + sigma * rng.normal(size=(6, 60))
    for name, score in (("kendall", kendall), ("weighted", weighted_tau)):
      est[name].append(noise_ceiling(runs, score))
      direct[name].append(score(runs.mean(0), truth))
    half.append(split_half(runs, kendall))
  assert abs(np.mean(est["kendall"]) - np.mean(direct["kendall"])) < 0.015
  # Weighted tau: conservative by at most a few hundredths at these noise levels.
  gap = np.mean(direct["weighted"]) - np.mean(est["weighted"])
  assert -0.01 < gap < 0.04
  assert np.mean(half) < np.mean(direct["kendall"]) - 0.05


def _direct_finetune(zoo, model_id, target, cfg, run):
  """One model's fine-tune written out at the target's own shapes (a K-way head, the unpadded
  sample and test set): what :func:`finetune_accuracy` must reproduce from its padded arrays."""
  rec = zoo.records[model_id]
  stack = zoo.stacks[rec.stack]
  td = target_data(target, cfg.shots, cfg.test_per_class)
  idx = td.train_sample(cfg.shots, transfer._run_seed(cfg, run, target))
  spec = dataclasses.replace(stack.spec, num_classes=target.k)
  fresh = train_lib.init_stack(spec, transfer._head_seeds(cfg, [run], target, spec.arch))
  params = jax.tree_util.tree_map_with_path(
      lambda path, f, b: f[0] if transfer._head_key(path) else b[rec.stack_index], fresh,
      stack.params)
  lr = cfg.learning_rate * (10.0 if cfg.mode == "linear" else 1.0)
  logits = _direct_run(spec.graphdef(), params, transfer._batch_keys(cfg, [run], target)[0],
                       td.images[idx], td.labels[idx], td.images[td.test], lr, steps=cfg.steps,
                       batch_size=cfg.batch_size, linear=cfg.mode == "linear")
  pred = np.argmax(np.asarray(logits), -1)
  return float(np.mean(pred == td.labels[td.test])), len(td.test)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "batch_size", "linear"))
def _direct_run(graphdef, params, key, x, y, x_test, lr, *, steps, batch_size, linear):
  adam = optax.scale_by_adam()

  def loss(p, u):
    return optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(x[u]), y[u]).mean()

  def body(t, carry):
    p, o = carry
    u = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, x.shape[0])
    g = jax.grad(loss)(p, u)
    if linear:  # the frozen body: only the head moves
      g = jax.tree_util.tree_map_with_path(
          lambda path, a: a if transfer._head_key(path) else jnp.zeros_like(a), g)
    upd, o = adam.update(g, o, p)
    return jax.tree.map(lambda a, b: a - train_lib.learning_rate(t, steps, lr) * b, p, upd), o
  p, _ = jax.lax.fori_loop(0, steps, body, (params, adam.init(params)))
  return nnx.merge(graphdef, p)(x_test)


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_padded_finetune_equals_a_direct_unpadded_one(tiny_zoo, mode):
  # The zoo's stacks are up to 4-way and the target 3-way: the head runs 4 wide (one masked
  # class), the sample and test index arrays are padded, and the batches are drawn from the
  # sample's true length. None of that may change a single prediction.
  zoo, _ = tiny_zoo
  ids = ["mlp.digits.3-4-5-8.a", "cnn_s.digits.1-5-7-8.a"]
  cfg = CFG if mode == "full" else LIN
  got = finetune_accuracy(zoo, ids, TARGET, cfg)
  differ = 0
  for r in range(cfg.runs):
    for j, m in enumerate(ids):
      want, n_test = _direct_finetune(zoo, m, TARGET, cfg, r)
      # Reductions over the padded width may round differently: at most one borderline test
      # image, in at most one of the four (model, run) cells.
      assert abs(got[r, j] - want) <= 1.0 / n_test + 1e-6, (m, r, got[r, j], want)
      differ += abs(got[r, j] - want) > 1e-6
  assert differ <= 1


def test_one_compilation_serves_targets_of_every_k_and_size(tiny_zoo, tiny_zoo_dir, tmp_path):
  # Targets differ in K and in their sample and test sizes; padded to the zoo's shared shapes,
  # they reuse each stack's compiled fine-tune instead of compiling (and memory-mapping) their
  # own: ground_truth no longer needs to drop JAX's caches after every target.
  zoo, _ = tiny_zoo
  ids = IDS
  targets = [TARGET, TransferTarget("digits-2", Task("digits", (3, 8)), split="train"),
             TransferTarget("digits-4", Task("digits", (0, 2, 6, 9)), split="test")]
  for cfg, fn in ((CFG, transfer._finetune_rows), (LIN, transfer._linear_rows)):
    finetune_accuracy(zoo, ids, targets[0], cfg)
    compiled = fn._cache_size()
    assert compiled > 0
    out = ground_truth(zoo, tiny_zoo_dir, ids, targets, cfg, cache_dir=tmp_path / cfg.mode)
    assert fn._cache_size() == compiled
    assert all(np.all((a > 0.2) & (a <= 1)) for a in out.values())


@pytest.fixture(scope="module")
def fashion_zoo():
  """Two MLPs trained on 10-way Fashion-MNIST (about 8 s on 2 CPU cores)."""
  task = Task("fashion_mnist", tuple(range(10)))
  specs = [ModelSpec(f"mlp.fashion.{s}", "mlp", task, seed=s, steps=200) for s in (1, 5)]
  return build_zoo(specs, BuildConfig(chunk_size=2), progress=False)[0]


def test_finetuning_starts_from_the_zoo_weights(fashion_zoo):
  # Frozen body + new head (the selection labels' protocol) on a related real task: the four
  # Fashion-MNIST tops, test split. Bodies trained on 10-way Fashion-MNIST must beat the same
  # architecture from random initialisation (measured, 2-run means: 0.686 and 0.646 vs
  # 0.524-0.551 for four random bodies); a fine-tune that ignored the zoo's weights would score
  # like the random ones. (The full protocol, new head and body trained together by Adam at
  # 1e-3 for 30 steps, scores these pre-trained bodies below the random ones: 0.44-0.52 vs
  # 0.50-0.61 per run.)
  zoo = fashion_zoo
  ids = sorted(zoo.records)
  tops = TransferTarget("fashion-tops", Task("fashion_mnist", (0, 2, 4, 6)), split="test")
  cfg = FinetuneConfig(mode="linear", steps=100, shots=10, test_per_class=100, runs=2)
  trained = finetune_accuracy(zoo, ids, tops, cfg)
  random = []
  for seeds in ([11, 12], [13, 14]):
    stacks = {n: dataclasses.replace(s, params=train_lib.init_stack(s.spec, seeds))
              for n, s in zoo.stacks.items()}
    random.append(finetune_accuracy(dataclasses.replace(zoo, stacks=stacks), ids, tops, cfg))
  trained, random = trained.mean(0), np.concatenate(random, 1).mean(0)  # over runs
  assert trained.min() > random.max() + 0.05, (trained, random)
