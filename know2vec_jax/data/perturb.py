"""Perturbations of query images: what a user's images do that our centred test splits do not.

A perturbation keeps the task (same classes, same domain) and changes the pixels: translations,
small rotations, sensor noise, contrast and brightness. They measure how much a retrieval depends
on nuisances (``experiments/generalise.py``) and augment phi's training images
(:func:`know2vec_jax.backbone.augment`, the same kinds drawn at random inside the jitted step).

Geometric ones resample with ``scipy.ndimage`` (bilinear, the border pixel repeated, so an
inverted image's white background stays white); photometric ones work per image and clip to
[0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy import ndimage


class PerturbError(ValueError):
  """An unknown perturbation or images it cannot apply to; the message says which."""


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """One named perturbation.

  Attributes:
    name: its name in :data:`SUITE` and in results.
    kind: ``shift`` (amount = (dy, dx) pixels), ``rotate`` (degrees, counter-clockwise),
      ``noise`` (Gaussian sigma), ``contrast`` (factor about each image's mean) or ``brightness``
      (factor).
    amount: the kind's parameter.
  """
  name: str
  kind: str
  amount: float | tuple[float, float]


def _shift(x, amount, rng):
  dy, dx = amount
  return ndimage.shift(x, (0, dy, dx, 0), order=1, mode="nearest")


def _rotate(x, amount, rng):
  return ndimage.rotate(x, amount, axes=(2, 1), reshape=False, order=1, mode="nearest")


def _noise(x, amount, rng):
  return x + rng.normal(0.0, amount, x.shape).astype(np.float32)


def _contrast(x, amount, rng):
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return mean + amount * (x - mean)


def _brightness(x, amount, rng):
  return amount * x


KINDS: dict[str, Callable] = {"shift": _shift, "rotate": _rotate, "noise": _noise,
                              "contrast": _contrast, "brightness": _brightness}

# The evaluation suite: translations of 1-3 px in several directions, rotations of +-10 degrees,
# noise sigma 0.1, contrast x 0.5, brightness x 0.7.
SUITE: dict[str, Perturbation] = {p.name: p for p in (
    Perturbation("shift_right_1", "shift", (0, 1)),
    Perturbation("shift_left_2", "shift", (0, -2)),
    Perturbation("shift_down_2", "shift", (2, 0)),
    Perturbation("shift_up_3", "shift", (-3, 0)),
    Perturbation("shift_diag_2", "shift", (2, 2)),
    Perturbation("rotate_+10", "rotate", 10.0),
    Perturbation("rotate_-10", "rotate", -10.0),
    Perturbation("noise_0.1", "noise", 0.1),
    Perturbation("contrast_0.5", "contrast", 0.5),
    Perturbation("brightness_0.7", "brightness", 0.7),
)}


def perturb(images: np.ndarray, perturbation: str | Perturbation, seed: int = 0) -> np.ndarray:
  """Applies one perturbation to a batch of images.

  Args:
    images: float32 [N, H, W, C] in [0, 1].
    perturbation: a :data:`SUITE` name or a :class:`Perturbation`.
    seed: seeds the noise (the other kinds are deterministic).

  Returns:
    float32 [N, H, W, C] in [0, 1], a new array.
  """
  if isinstance(perturbation, str):
    if perturbation not in SUITE:
      raise PerturbError(f"unknown perturbation {perturbation!r}; known: {sorted(SUITE)}")
    perturbation = SUITE[perturbation]
  if perturbation.kind not in KINDS:
    raise PerturbError(f"unknown perturbation kind {perturbation.kind!r}; known: {sorted(KINDS)}")
  x = np.asarray(images)
  if x.ndim != 4 or x.dtype != np.float32:
    raise PerturbError(f"images must be float32 [N, H, W, C], got {x.dtype} {x.shape}")
  out = KINDS[perturbation.kind](x, perturbation.amount, np.random.default_rng(seed))
  return np.clip(out, 0.0, 1.0).astype(np.float32)
