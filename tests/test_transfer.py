"""SF-MTE ground truth: determinism, caching, protocol checks and errors."""

import itertools

import numpy as np
import pytest

from know2vec_jax.data import Task
from know2vec_jax.transfer import (FinetuneConfig, TransferError, TransferTarget,
                                   finetune_accuracy, ground_truth, noise_ceiling, split_half,
                                   target_data)

TARGET = TransferTarget("digits-flip", Task("digits+flip", (1, 2, 7)), split="train")
CFG = FinetuneConfig(steps=8, shots=20, test_per_class=40, runs=2, chunk_size=4)


def test_target_split_is_fixed_disjoint_and_resamples_shots():
  td = target_data(TARGET, shots=20, test_per_class=40)
  pool = np.concatenate(td.pool)
  assert len(np.intersect1d(pool, td.test)) == 0
  assert [int(np.sum(td.labels[td.test] == c)) for c in range(3)] == [40, 40, 40]
  a, b = td.train_sample(20, seed=1), td.train_sample(20, seed=2)
  assert len(a) == 60 and not np.array_equal(a, b)
  assert np.isin(a, pool).all()
  np.testing.assert_array_equal(td.test, target_data(TARGET, 20, 40).test)


def test_finetune_is_deterministic_and_uses_the_zoo_weights(tiny_zoo):
  zoo, _ = tiny_zoo
  ids = sorted(zoo.records)[:4]
  a = finetune_accuracy(zoo, ids, TARGET, CFG)
  b = finetune_accuracy(zoo, ids, TARGET, CFG)
  assert a.shape == (2, 4) and np.all((a >= 0) & (a <= 1))
  np.testing.assert_array_equal(a, b)
  # Column order follows the request, whatever the stacks.
  np.testing.assert_array_equal(finetune_accuracy(zoo, ids[::-1], TARGET, CFG), a[:, ::-1])
  # The linear probe (frozen body) is a different measurement of the same models.
  lin = finetune_accuracy(zoo, ids, TARGET, FinetuneConfig(mode="linear", steps=20, shots=20,
                                                           test_per_class=40, runs=2))
  assert lin.shape == a.shape and not np.array_equal(lin, a)


def test_ground_truth_cache_roundtrip_and_key(tiny_zoo, tiny_zoo_dir, tmp_path, monkeypatch):
  zoo, _ = tiny_zoo
  ids = sorted(zoo.records)[:3]
  first = ground_truth(zoo, tiny_zoo_dir, ids, [TARGET], CFG, cache_dir=tmp_path)
  files = list(tmp_path.glob("*.npz"))
  assert len(files) == 1
  import know2vec_jax.transfer as transfer

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


def test_ground_truth_drops_each_targets_compiled_executables(tiny_zoo, tiny_zoo_dir, tmp_path):
  # Each target compiles its own shapes, and XLA:CPU keeps every executable memory-mapped: a few
  # dozen targets' worth exhausted the kernel's mapping limit. ground_truth must release them.
  from know2vec_jax import transfer
  zoo, _ = tiny_zoo
  ids = sorted(zoo.records)[:2]
  two = TransferTarget("digits-2", Task("digits", (3, 8)), split="train")
  transfer.finetune_accuracy(zoo, ids, two, CFG)
  assert transfer._finetune_rows._cache_size() > 0
  ground_truth(zoo, tiny_zoo_dir, ids, [TARGET, two], CFG, cache_dir=tmp_path)
  assert transfer._finetune_rows._cache_size() == 0
