"""Vectorizers: permutation invariance, any K, shared encoder, the LSTM variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from know2vec_jax.vectorizers import Know2Vec, VectorizerConfig, pad_grid

D = 16


def _model(variant="attention", shared=True, **kw):
  cfg = VectorizerConfig(variant=variant, shared=shared, hidden=32, embed_dim=8, **kw)
  # Parameters drawn by numpy (kernels fan-in scaled): what is tested here holds for any
  # parameters, and the initialisers, run op by op, compile a program per shape (seconds on a CPU).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Know2Vec(cfg, D, 5, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def draw(a):
    fan_in = a.shape[0] if len(a.shape) > 1 else 10.0
    return jnp.asarray(rng.normal(size=a.shape) / np.sqrt(fan_in), a.dtype)
  return nnx.merge(graphdef, jax.tree.map(draw, state))


def _grid(k, seed=0, batch=3):
  # Drawn by numpy: jax.random.normal compiles a program per shape (seconds each on a CPU).
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, k, k, D)), jnp.float32)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("k", [2, 4, 7])
def test_attention_is_invariant_to_class_permutations(shared, k):
  m = _model("attention", shared)
  grid, mask = pad_grid(_grid(k), 10)
  perm = np.random.default_rng(k).permutation(k)
  g2, mask2 = pad_grid(_grid(k)[:, perm][:, :, perm], 10)
  for embed in (m.embed_models, m.embed_queries):
    a, b = embed(grid, mask), embed(g2, mask2)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), 1.0, atol=1e-5)


def test_padding_does_not_change_the_vector():
  m = _model()
  g = _grid(4)
  a = m.embed_models(*pad_grid(g, 4))
  b = m.embed_models(*pad_grid(g, 10))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_lstm_variant_depends_on_class_order():
  m = _model("lstm", shared=False)
  grid, mask = pad_grid(_grid(4), 10)
  perm = jnp.asarray([1, 0, 3, 2] + list(range(4, 10)))
  a = m.embed_models(grid, mask)
  b = m.embed_models(grid[:, perm][:, :, perm], mask[:, perm])
  assert float(jnp.abs(a - b).max()) > 1e-3
  q = m.embed_queries(grid, mask)
  assert q.shape == (3, 8)


def test_shared_uses_one_encoder_for_both_sides():
  shared, separate = _model(shared=True), _model(shared=False)
  grid, mask = pad_grid(_grid(4), 10)
  assert shared.query_vectorizer is None
  np.testing.assert_allclose(shared.embed_models(grid, mask), shared.embed_queries(grid, mask))
  assert float(jnp.abs(separate.embed_models(grid, mask) -
                       separate.embed_queries(grid, mask)).max()) > 1e-3


def test_anchors_only_ignores_boundary_cells():
  m = _model(use_boundaries=False)
  g = _grid(4)
  g2 = g + 5.0 * (1 - jnp.eye(4))[None, :, :, None]  # change only the off-diagonal cells
  np.testing.assert_allclose(m.embed_models(*pad_grid(g, 10)), m.embed_models(*pad_grid(g2, 10)),
                             atol=1e-5)


def test_too_many_classes():
  with pytest.raises(ValueError, match="11 classes exceed the vectorizer's maximum of 10"):
    pad_grid(_grid(11), 10)
