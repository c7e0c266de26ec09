"""Untrained anchor matching: a query's class prototypes against each model's class anchors.

The reference a learned vectorizer must beat: no training at all, only phi and the same decision
knowledge Know2Vec reads (the diagonal of the model's knowledge grid: the mean feature of each
class's most confident probe images) against the diagonal of the query grid (the class prototypes).
Each query class is matched to its most similar model class and vice versa, and the two mean best
cosines are averaged: a symmetric, class-order-free set similarity. Zero zoo forwards at query time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from know2vec_jax.baselines.checks import BaselineInputError


@jax.jit
def _anchor_matching(q_diag, q_mask, m_diag, m_mask):
  sim = jnp.einsum("qid,mjd->qmij", q_diag, m_diag)  # [Q, M, Kq, Km]
  valid = q_mask[:, None, :, None] * m_mask[None, :, None, :]
  sim = jnp.where(valid > 0, sim, -jnp.inf)
  q_side = jnp.where(q_mask[:, None] > 0, sim.max(3), 0).sum(2) / q_mask.sum(1)[:, None]
  m_side = jnp.where(m_mask[None] > 0, sim.max(2), 0).sum(2) / m_mask.sum(1)[None]
  return 0.5 * (q_side + m_side)


def _diagonal(grid):
  k = grid.shape[-2]
  return grid[..., np.arange(k), np.arange(k), :]


def anchor_matching_scores(query_grid, query_mask, model_grids, model_masks):
  """Anchor-matching scores of every model for one or more queries.

  Args:
    query_grid: float [Q, K_max, K_max, D] (or one [K_max, K_max, D]) padded query grids.
    query_mask: float [Q, K_max] (or [K_max]) class masks.
    model_grids: float [M, K_max, K_max, D] padded knowledge-grid features.
    model_masks: float [M, K_max].

  Returns:
    float32 [Q, M] (or [M] for one query) in [-1, 1], higher = better match.

  Raises:
    BaselineInputError: mismatched shapes or an empty class mask.
  """
  qg, qm = np.asarray(query_grid, np.float32), np.asarray(query_mask, np.float32)
  single = qg.ndim == 3
  if single:
    qg, qm = qg[None], qm[None]
  mg, mm = np.asarray(model_grids, np.float32), np.asarray(model_masks, np.float32)
  if qg.ndim != 4 or mg.ndim != 4 or qg.shape[1:] != mg.shape[1:]:
    raise BaselineInputError(f"query grids {list(qg.shape)} and model grids {list(mg.shape)} "
                             "must both be [N, K_max, K_max, D] with the same K_max and D")
  if qm.shape != qg.shape[:2] or mm.shape != mg.shape[:2]:
    raise BaselineInputError(f"masks {list(qm.shape)} / {list(mm.shape)} do not match the grids")
  if np.any(qm.sum(1) == 0) or np.any(mm.sum(1) == 0):
    raise BaselineInputError("every query and model needs at least one class in its mask")
  out = np.asarray(_anchor_matching(jnp.asarray(_diagonal(qg)), jnp.asarray(qm),
                                    jnp.asarray(_diagonal(mg)), jnp.asarray(mm)))
  return out[0] if single else out
