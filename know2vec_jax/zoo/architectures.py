"""Flax NNX architecture families of the zoo, with a real capacity spread.

- ``mlp``: flatten -> 64 -> K (~50k parameters at 28x28).
- ``cnn_s``: 3x3/16 s2 -> 3x3/32 s2 -> 64 -> K.
- ``cnn_l``: 3x3/32 s2 -> 3x3/64 s2 -> 3x3/64 -> 128 -> K (wider and deeper).

Every family exposes ``features(x)`` (the penultimate activations, for white-box transfer and
baselines) and ``__call__(x)`` (logits). Images are float32 NHWC in [0, 1].

Convolutions come in two lowerings with the same parameters (kernel HWIO, bias):
``"im2col"`` builds the 3x3 patches with strided slices and multiplies them with the kernel, so the
forward *and* both backward products are plain matmuls; ``"xla"`` calls ``lax.conv_general_dilated``.
On XLA:CPU the backward pass of ``lax.conv`` is several times slower than its forward and ``vmap``
over stacked conv weights lowers to grouped convolutions; the im2col lowering avoids both (see
``benchmarks/zoo_train.py`` for the measurement). On GPU/TPU ``"xla"`` uses the vendor kernels.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

CONV_IMPLS = ("im2col", "xla")


class Conv(nnx.Module):
  """A 'SAME'-padded 2-D convolution with a selectable lowering (see the module docstring)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, stride: int = 1,
               *, impl: str = "im2col", rngs: nnx.Rngs):
    if impl not in CONV_IMPLS:
      raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    fan_in = kernel_size * kernel_size * in_features
    init = jax.nn.initializers.he_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_features,
                                                 out_features), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    self.kernel_size = kernel_size
    self.stride = stride
    self.impl = impl
    del fan_in

  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.stride
    if self.impl == "xla":
      y = jax.lax.conv_general_dilated(x, self.kernel[...], (s, s), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return y + self.bias[...]
    n, h, w, c = x.shape
    ho, wo = math.ceil(h / s), math.ceil(w / s)
    # The same padding 'SAME' uses, so both lowerings compute the same function.
    pad_h = max((ho - 1) * s + k - h, 0)
    pad_w = max((wo - 1) * s + k - w, 0)
    xp = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                     (0, 0)))
    patches = jnp.concatenate(
        [xp[:, dy:dy + (ho - 1) * s + 1:s, dx:dx + (wo - 1) * s + 1:s, :]
         for dy in range(k) for dx in range(k)], axis=-1)
    y = patches.reshape(n * ho * wo, k * k * c) @ self.kernel[...].reshape(k * k * c, -1)
    return y.reshape(n, ho, wo, -1) + self.bias[...]


class MLP(nnx.Module):
  """flatten -> hidden -> K."""

  def __init__(self, num_classes: int, *, image_shape=(28, 28, 1), hidden: int = 64,
               conv_impl: str = "im2col", rngs: nnx.Rngs):
    del conv_impl
    self.fc = nnx.Linear(math.prod(image_shape), hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


class CNN(nnx.Module):
  """Stride-2 3x3 convolutions, optional stride-1 ones, flatten -> hidden -> K."""

  def __init__(self, num_classes: int, *, image_shape=(28, 28, 1), channels=(16, 32),
               strides=(2, 2), hidden: int = 64, conv_impl: str = "im2col", rngs: nnx.Rngs):
    if len(channels) != len(strides):
      raise ValueError("channels and strides must have the same length")
    h, w, c = image_shape
    convs = []
    for ch, s in zip(channels, strides):
      convs.append(Conv(c, ch, 3, s, impl=conv_impl, rngs=rngs))
      c, h, w = ch, math.ceil(h / s), math.ceil(w / s)
    self.convs = nnx.List(convs)
    self.fc = nnx.Linear(h * w * c, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


def _cnn_s(num_classes, **kw):
  return CNN(num_classes, channels=(16, 32), strides=(2, 2), hidden=64, **kw)


def _cnn_l(num_classes, **kw):
  return CNN(num_classes, channels=(32, 64, 64), strides=(2, 2, 1), hidden=128, **kw)


ARCHITECTURES: dict[str, Callable[..., nnx.Module]] = {"mlp": MLP, "cnn_s": _cnn_s, "cnn_l": _cnn_l}


def make_model(arch: str, num_classes: int, *, image_shape=(28, 28, 1), conv_impl: str = "im2col",
               seed: int | jax.Array = 0) -> nnx.Module:
  """One freshly initialised model of a family.

  Args:
    arch: a key of :data:`ARCHITECTURES`.
    num_classes: output classes K.
    image_shape: (H, W, C) of the inputs.
    conv_impl: ``"im2col"`` or ``"xla"`` (same parameters and function; different lowering).
    seed: an int or a PRNG key.

  Returns:
    The NNX module.
  """
  if arch not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return ARCHITECTURES[arch](num_classes, image_shape=tuple(image_shape), conv_impl=conv_impl,
                             rngs=nnx.Rngs(params=seed))


@functools.lru_cache(maxsize=None)
def flops_per_image(arch: str, num_classes: int, image_shape=(28, 28, 1)) -> int:
  """Forward multiply-add FLOPs (2 per MAC) of one image, for throughput reports."""
  model = nnx.eval_shape(lambda: make_model(arch, num_classes, image_shape=image_shape))
  h, w, _ = image_shape
  total = 0
  if isinstance(model, CNN):
    for conv in model.convs:
      kh, kw, ci, co = conv.kernel.shape
      h, w = math.ceil(h / conv.stride), math.ceil(w / conv.stride)
      total += 2 * h * w * kh * kw * ci * co
  for lin in (model.fc, model.head):
    total += 2 * lin.kernel.shape[0] * lin.kernel.shape[1]
  return total
