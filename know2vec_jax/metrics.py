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
