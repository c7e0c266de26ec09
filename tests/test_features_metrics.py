"""Query grids and their validation; retrieval metrics; LEEP on hand-computable cases."""

import numpy as np
import pytest

from know2vec_jax.baselines import leep_scores
from know2vec_jax.blackbox import InputError
from know2vec_jax.features import check_query, query_grid_batch
from know2vec_jax.metrics import first_correct_rank, retrieval_metrics


def _q(n=8, k=2):
  x = np.random.default_rng(0).random((n, 28, 28, 1), np.float32)
  return x, np.arange(n) % k


@pytest.mark.parametrize("mutate,match", [
    (lambda x, y: (x, np.zeros_like(y)), "at least 2 classes"),
    (lambda x, y: (x, np.where(y == 1, 2, y)), "class\\(es\\) \\[1\\] have no images"),
    (lambda x, y: (x, y[:-1]), "one label per image"),
    (lambda x, y: (x, y.astype(float)), "must be integers"),
    (lambda x, y: (x, y - 1), "must be in 0..K-1"),
    (lambda x, y: (np.where(x > 0.5, np.nan, x), y), "NaN/inf"),
    (lambda x, y: (x[..., 0], y), "must have shape"),
    (lambda x, y: (x * 255, y), "must lie in \\[0, 1\\]"),
    (lambda x, y: ((x * 255).astype(np.uint8), y), "dtype uint8"),
])
def test_bad_queries(mutate, match):
  x, y = mutate(*_q())
  with pytest.raises(InputError, match=match):
    check_query(x, y, (28, 28, 1))


def test_too_many_query_classes():
  x, y = _q(12, 6)
  with pytest.raises(InputError, match="6 classes, more than the vectorizer's maximum of 4"):
    check_query(x, y, (28, 28, 1), max_classes=4)


class _FakeBackbone:
  """phi = mean pixel and mean of the top half: enough to check the grid's construction."""
  dim = 2
  image_shape = (28, 28, 1)

  def embed(self, x):
    x = np.asarray(x)
    return np.stack([x.mean((-3, -2, -1)), x[..., :14, :, :].mean((-3, -2, -1))], -1)


def test_query_grid_construction():
  x, y = _q(6, 3)
  grid = query_grid_batch(_FakeBackbone(), x[None], y[None], 3)[0]
  for c in range(3):
    proto = _FakeBackbone().embed(x[y == c]).mean(0)
    np.testing.assert_allclose(grid[c, c], proto / np.linalg.norm(proto), rtol=1e-5)
  mid = 0.5 * (x[y == 0].mean(0) + x[y == 2].mean(0))
  np.testing.assert_allclose(grid[0, 2], _FakeBackbone().embed(mid[None])[0], rtol=1e-5)


def test_retrieval_metrics():
  m = retrieval_metrics([1, 2, 6, 1])
  assert m == {"top1": 0.5, "top5": 0.75, "mrr": pytest.approx((1 + 0.5 + 1 / 6 + 1) / 4),
               "queries": 4}
  scores = np.asarray([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
  correct = np.asarray([[True, False, False], [False, False, True]])
  assert first_correct_rank(scores, correct).tolist() == [3, 3]
  with pytest.raises(ValueError):
    retrieval_metrics([0, 1])


def test_leep_by_hand():
  hard = np.log(np.asarray([[[1.0, 1e-9], [1e-9, 1.0]]]))
  flat = np.zeros((1, 2, 2))
  y = np.asarray([0, 1])
  assert float(leep_scores(hard, y, 2)[0]) == pytest.approx(0.0, abs=1e-6)
  assert float(leep_scores(flat, y, 2)[0]) == pytest.approx(np.log(0.5), abs=1e-6)
  # A model whose predictions carry the labels' information ranks above one that does not.
  both = np.concatenate([hard, flat])
  s = np.asarray(leep_scores(both, y, 2))
  assert s[0] > s[1]
