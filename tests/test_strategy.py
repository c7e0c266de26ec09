"""The model-axis strategy module: the measured auto rule, and one computation under each strategy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from know2vec_jax import strategy


def test_auto_rule_per_backend():
  assert strategy.resolve("auto", "cpu") == "map"
  assert strategy.resolve("auto", "gpu") == "vmap"
  assert strategy.resolve("auto", "tpu") == "vmap"
  assert strategy.resolve("loop", "cpu") == "loop"
  with pytest.raises(ValueError, match="strategy must be one of"):
    strategy.resolve("pmap")
  # Jitted computations cannot loop in Python: the traced set refuses it by name.
  with pytest.raises(ValueError, match=r"\('vmap', 'map', 'auto'\), got 'loop'"):
    strategy.resolve("loop", allowed=strategy.TRACED)


@pytest.mark.parametrize("name,chunk", [("vmap", None), ("vmap", 2), ("map", None),
                                        ("auto", None)])
def test_map_models_matches_a_python_loop(name, chunk):
  w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3, 2)), jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4, 3)), jnp.float32)

  def one(wi, xi):
    return jnp.tanh(xi @ wi)
  # chunk 2 of 5 models: two vmapped chunks in turn and a remainder of one.
  got = jax.jit(lambda w, x: strategy.map_models(one, w, x, strategy=name, chunk=chunk))(w, x)
  want = np.stack([np.asarray(one(w[i], x[i])) for i in range(5)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
