"""Retrieval and ranking metrics."""

from __future__ import annotations

import numpy as np


def retrieval_metrics(first_correct_rank) -> dict:
  """Top-1, top-5 and mean reciprocal rank from the rank (1-based) of each query's first correct
  model.

  Args:
    first_correct_rank: int [Q], 1 = the first retrieved model is correct.

  Returns:
    {"top1", "top5", "mrr", "queries"}.
  """
  r = np.asarray(first_correct_rank)
  if r.ndim != 1 or len(r) == 0:
    raise ValueError(f"need a non-empty vector of ranks, got shape {r.shape}")
  if np.any(r < 1):
    raise ValueError("ranks are 1-based")
  return {"top1": float(np.mean(r == 1)), "top5": float(np.mean(r <= 5)),
          "mrr": float(np.mean(1.0 / r)), "queries": int(len(r))}


def first_correct_rank(scores, correct) -> np.ndarray:
  """Rank (1-based) of the first correct item per query when items are sorted by score.

  Args:
    scores: [Q, M] higher is better (ties broken by item order).
    correct: bool [Q, M]; each row must contain a correct item.
  """
  scores, correct = np.asarray(scores), np.asarray(correct, bool)
  if scores.shape != correct.shape:
    raise ValueError(f"scores {scores.shape} and correct {correct.shape} differ in shape")
  if not np.all(correct.any(1)):
    raise ValueError("every query needs at least one correct item")
  order = np.argsort(-scores, axis=1, kind="stable")
  return np.argmax(np.take_along_axis(correct, order, 1), axis=1) + 1


# SF-MTE ranking metrics: a proxy's scores [M] for one target against the measured fine-tune
# accuracy [M] of the same models. All are host-side numpy; zoo sizes are at most a few hundred.


def _check_pair(ground_truth, scores) -> tuple[np.ndarray, np.ndarray]:
  """Both arguments as float64 vectors of one length >= 2 with finite values, else ValueError."""
  out = []
  for name, v in (("ground_truth", ground_truth), ("scores", scores)):
    a = np.asarray(v)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
      raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim != 1:
      raise ValueError(f"{name} must be a 1-D vector, got shape {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
      raise ValueError(f"{name} has {int(bad.sum())} NaN/inf value(s), first at index "
                       f"{int(np.flatnonzero(bad)[0])}")
    out.append(a)
  gt, s = out
  if len(gt) != len(s):
    raise ValueError(f"ground_truth and scores differ in length: {len(gt)} vs {len(s)}")
  if len(gt) < 2:
    raise ValueError(f"need at least 2 models to compare rankings, got {len(gt)}")
  return gt, s


def weighted_tau(ground_truth, scores) -> float:
  """Weighted Kendall's tau (Vigna 2015), hyperbolic weights, importance ranked by ground truth.

  Equal to ``scipy.stats.weightedtau(ground_truth, scores, rank=None).correlation``: element i gets
  weight 1 / (r_i + 1), where r_i (0 = most important) is its position in the decreasing
  lexicographic order by (ground_truth, scores); a pair weighs w_i + w_j, and
  tau = sum_pairs w_ij sign(dg) sign(ds) / sqrt(W_g W_s), where W_g (W_s) is the weight of the
  pairs not tied in ground_truth (scores). Pairs tied in both orders are interchangeable, so how
  such ties are ordered does not change the result.

  Args:
    ground_truth: [M] measured accuracies (or any score where higher is better).
    scores: [M] the proxy's scores, higher = expected to transfer better.

  Returns:
    tau in [-1, 1]; NaN, as scipy, when either argument is constant.

  Raises:
    ValueError: not 1-D, lengths differ, fewer than 2 entries, or a NaN/inf (the message names the
      argument).
  """
  gt, s = _check_pair(ground_truth, scores)
  n = len(gt)
  order = np.lexsort((s, gt))[::-1]  # decreasing by ground truth, then by score
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n)
  w = 1.0 / (rank + 1.0)
  iu = np.triu_indices(n, 1)
  pair_w = (w[:, None] + w[None, :])[iu]
  sg = np.sign(gt[:, None] - gt[None, :])[iu]
  ss = np.sign(s[:, None] - s[None, :])[iu]
  w_g = pair_w[sg != 0].sum()
  w_s = pair_w[ss != 0].sum()
  if w_g == 0 or w_s == 0:
    return float("nan")
  tau = (pair_w * sg * ss).sum() / np.sqrt(w_g) / np.sqrt(w_s)
  return float(np.clip(tau, -1.0, 1.0))


def _average_ranks(a: np.ndarray) -> np.ndarray:
  """1-based ascending ranks, ties given the mean of the ranks they span (scipy's "average")."""
  order = np.argsort(a, kind="stable")
  sorted_a = a[order]
  # Boundaries of runs of equal values; every element of a run gets the run's mean rank.
  starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
  ends = np.r_[starts[1:], len(a)]
  mean_rank = 0.5 * (starts + 1 + ends)  # mean of starts+1 .. ends
  ranks = np.empty(len(a), np.float64)
  ranks[order] = np.repeat(mean_rank, ends - starts)
  return ranks


def pearson(ground_truth, scores) -> float:
  """Pearson correlation of scores with ground truth; NaN when either is constant.

  Args:
    ground_truth, scores: [M] finite values (see :func:`weighted_tau` for the checks).
  """
  gt, s = _check_pair(ground_truth, scores)
  gt, s = gt - gt.mean(), s - s.mean()
  denom = np.sqrt((gt * gt).sum() * (s * s).sum())
  if denom == 0:
    return float("nan")
  return float(np.clip((gt * s).sum() / denom, -1.0, 1.0))


def spearman(ground_truth, scores) -> float:
  """Spearman rank correlation (Pearson of average ranks, so ties are handled as scipy's
  ``spearmanr``); NaN when either argument is constant.

  Args:
    ground_truth, scores: [M] finite values (see :func:`weighted_tau` for the checks).
  """
  gt, s = _check_pair(ground_truth, scores)
  return pearson(_average_ranks(gt), _average_ranks(s))


def top1_regret(ground_truth, scores) -> float:
  """Best ground-truth accuracy minus the accuracy of the model the scores rank first.

  When several models share the top score, the regret is the mean over them: the expected regret
  of picking one of them at random (a constant proxy thus gets the zoo's mean shortfall, not the
  luck of the model order).

  Args:
    ground_truth: [M] measured accuracies.
    scores: [M] proxy scores, higher = ranked first.

  Returns:
    Regret >= 0, in the units of ``ground_truth``.
  """
  gt, s = _check_pair(ground_truth, scores)
  return float(gt.max() - gt[s == s.max()].mean())


def weighted_tau_symmetric(ground_truth, scores) -> float:
  """Weighted Kendall's tau under scipy's default convention, which most published SF-MTE tables
  call (``scipy.stats.weightedtau(ground_truth, scores).correlation``, ``rank=True``): the mean of
  :func:`weighted_tau` with importance ranked by the ground truth and with importance ranked by
  the scores, so a confident wrong top of the ranking costs as much as a missed true top.

  Args:
    ground_truth: [M] measured accuracies; scores: [M] proxy scores.

  Returns:
    tau in [-1, 1]; NaN when either argument is constant.

  Raises:
    ValueError: as :func:`weighted_tau`.
  """
  return 0.5 * (weighted_tau(ground_truth, scores) + weighted_tau(scores, ground_truth))


def ranking_report(ground_truth, scores) -> dict:
  """All four ranking metrics of one target.

  Args:
    ground_truth: [M] measured accuracies; scores: [M] proxy scores.

  Returns:
    {"weighted_tau" (importance by ground truth), "weighted_tau_symmetric" (scipy's default),
    "pearson", "spearman", "top1_regret", "models"}.
  """
  gt, s = _check_pair(ground_truth, scores)
  return {"weighted_tau": weighted_tau(gt, s),
          "weighted_tau_symmetric": weighted_tau_symmetric(gt, s), "pearson": pearson(gt, s),
          "spearman": spearman(gt, s), "top1_regret": top1_regret(gt, s), "models": len(gt)}
