"""SF-MTE ranking metrics: weighted tau against scipy (ties included), Pearson, Spearman, top-1
regret, and their input checks."""

import numpy as np
import pytest
import scipy.stats

from know2vec_jax.metrics import (pearson, ranking_report, spearman, top1_regret, weighted_tau,
                                  weighted_tau_symmetric)


def _cases():
  """50 random (ground truth, scores) pairs: continuous, heavy ties on either or both sides,
  integer and mixed dtypes, lengths from 2 to 80."""
  rng = np.random.default_rng(0)
  cases = []
  for i in range(50):
    n = int(rng.integers(2, 81))
    kind = i % 5
    if kind == 0:
      gt, s = rng.random(n), rng.normal(size=n)
    elif kind == 1:  # ties in the ground truth (accuracies on a coarse test set)
      gt, s = rng.integers(0, 4, n) / 4, rng.random(n)
    elif kind == 2:  # ties in the scores
      gt, s = rng.random(n), rng.integers(0, 3, n).astype(np.float64)
    elif kind == 3:  # heavy ties on both sides, integer vs float dtypes
      gt, s = rng.integers(0, 3, n), rng.integers(0, 2, n).astype(np.float32)
    else:  # correlated, with some joint ties
      gt = rng.integers(0, 10, n).astype(np.float64)
      s = gt + rng.integers(0, 3, n)
    cases.append((gt, s))
  return cases


@pytest.mark.parametrize("case", range(50))
def test_weighted_tau_equals_scipy(case):
  gt, s = _cases()[case]
  ref = scipy.stats.weightedtau(gt, s, rank=None).correlation
  got = weighted_tau(gt, s)
  if np.isnan(ref):  # a constant side (scipy gives NaN): so must we
    assert np.isnan(got)
  else:
    assert got == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("case", range(0, 50, 3))
def test_symmetric_weighted_tau_equals_scipys_default(case):
  gt, s = _cases()[case]
  ref = scipy.stats.weightedtau(gt, s).correlation  # rank=True, what most SF-MTE tables call
  got = weighted_tau_symmetric(gt, s)
  if np.isnan(ref):
    assert np.isnan(got)
  else:
    assert got == pytest.approx(ref, abs=1e-12)


def test_weighted_tau_hand_values_and_asymmetry():
  assert weighted_tau([0.1, 0.5, 0.9], [1, 2, 3]) == pytest.approx(1.0)
  assert weighted_tau([0.1, 0.5, 0.9], [3, 2, 1]) == pytest.approx(-1.0)
  # The scipy docstring's example: importance comes from the first argument, so order matters.
  x, y = [12, 2, 1, 12, 2], [1, 4, 7, 1, 0]
  assert weighted_tau(x, y) == pytest.approx(-0.4157652301037516, abs=1e-12)
  assert weighted_tau(y, x) == pytest.approx(-0.7181341329699028, abs=1e-12)
  # Swapping the bottom pair costs less than swapping the top pair (hyperbolic weights).
  gt = np.arange(6.0)[::-1]
  top, bottom = gt.copy(), gt.copy()
  top[[0, 1]] = top[[1, 0]]
  bottom[[4, 5]] = bottom[[5, 4]]
  assert weighted_tau(gt, bottom) > weighted_tau(gt, top)
  assert np.isnan(weighted_tau([1, 1, 1], [1, 2, 3]))


def test_pearson_spearman_equal_scipy():
  for gt, s in _cases()[:20]:
    if np.ptp(gt) == 0 or np.ptp(s) == 0:
      continue
    assert pearson(gt, s) == pytest.approx(scipy.stats.pearsonr(gt, s).statistic, abs=1e-10)
    assert spearman(gt, s) == pytest.approx(scipy.stats.spearmanr(gt, s).statistic, abs=1e-10)
  assert np.isnan(pearson([1, 2, 3], [5, 5, 5]))


def test_top1_regret():
  gt = [0.70, 0.90, 0.80]
  assert top1_regret(gt, [0.1, 0.3, 0.2]) == pytest.approx(0.0)
  assert top1_regret(gt, [0.9, 0.1, 0.5]) == pytest.approx(0.20)
  # Tied top scores: the expected regret of picking one of them at random.
  assert top1_regret(gt, [1.0, 0.0, 1.0]) == pytest.approx(0.90 - 0.75)
  assert top1_regret(gt, [0.0, 0.0, 0.0]) == pytest.approx(0.90 - 0.80)


def test_ranking_report():
  gt, s = np.asarray([0.6, 0.9, 0.7, 0.8]), np.asarray([1.0, 4.0, 3.0, 2.0])
  r = ranking_report(gt, s)
  assert set(r) == {"weighted_tau", "weighted_tau_symmetric", "pearson", "spearman",
                    "top1_regret", "models"}
  assert r["weighted_tau_symmetric"] == pytest.approx(scipy.stats.weightedtau(gt, s).correlation)
  assert r["weighted_tau"] == pytest.approx(scipy.stats.weightedtau(gt, s, rank=None).correlation)
  assert r["spearman"] == pytest.approx(0.8)
  assert r["top1_regret"] == 0.0 and r["models"] == 4


@pytest.mark.parametrize("fn", [weighted_tau, pearson, spearman, top1_regret, ranking_report])
@pytest.mark.parametrize("gt,s,match", [
    ([0.1, np.nan, 0.3], [1, 2, 3], "ground_truth has 1 NaN/inf value\\(s\\), first at index 1"),
    ([0.1, 0.2, 0.3], [1, np.inf, 3], "scores has 1 NaN/inf"),
    ([0.1, 0.2, 0.3], [1, 2], "differ in length: 3 vs 2"),
    ([0.1], [1], "at least 2 models"),
    ([[0.1, 0.2]], [1, 2], "ground_truth must be a 1-D vector"),
    ([0.1, 0.2], ["a", "b"], "scores must be numeric"),
])
def test_bad_inputs(fn, gt, s, match):
  with pytest.raises(ValueError, match=match):
    fn(gt, s)
