"""Domain transforms: each turns a source into a new domain with the same classes.

They give the zoo models that share a class set but differ in decision function (docs/design.md,
"What we measured"): the same 4 classes seen inverted, rotated or blurred are a different task for
a model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _invert(x: np.ndarray) -> np.ndarray:
  return 1.0 - x


def _rot90(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2)))


def _flip(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x[:, :, ::-1])


def _blur(x: np.ndarray) -> np.ndarray:
  # Separable binomial 5-tap kernel (a close integer approximation of a Gaussian, sigma ~ 1).
  k = np.asarray([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0
  out = x
  for axis in (1, 2):
    pad = [(0, 0)] * out.ndim
    pad[axis] = (2, 2)
    padded = np.pad(out, pad, mode="edge")
    n = out.shape[axis]
    out = sum(k[i] * np.take(padded, np.arange(i, i + n), axis=axis) for i in range(5))
  return out.astype(np.float32)


def _low_contrast(x: np.ndarray) -> np.ndarray:
  return 0.3 + 0.4 * x


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "invert": _invert,
    "rot90": _rot90,
    "flip": _flip,
    "blur": _blur,
    "lowcontrast": _low_contrast,
}


def parse_source_name(name: str) -> tuple[str, tuple[str, ...]]:
  """Splits ``base+t1+t2`` into ``("base", ("t1", "t2"))``; validates the transform names.

  ``folder:`` and ``tfds:`` bases may contain ``+`` in a path, so only known transform names at the
  end are split off.
  """
  from know2vec_jax.data.sources import DataError  # avoid an import cycle at module load
  if not isinstance(name, str) or not name:
    raise DataError(f"source name must be a non-empty string, got {name!r}")
  parts = name.split("+")
  transforms: list[str] = []
  while len(parts) > 1 and parts[-1] in TRANSFORMS:
    transforms.insert(0, parts.pop())
  base = "+".join(parts)
  if "+" in base and not base.startswith(("folder:", "tfds:")):
    bad = base.split("+")[-1]
    raise DataError(f"unknown transform {bad!r} in source {name!r}; known: {sorted(TRANSFORMS)}")
  return base, tuple(transforms)


def compose(names: tuple[str, ...]) -> Callable[[np.ndarray], np.ndarray]:
  """The composition of the named transforms, applied left to right."""
  def fn(x: np.ndarray) -> np.ndarray:
    for n in names:
      x = TRANSFORMS[n](x)
    return np.clip(x, 0.0, 1.0).astype(np.float32)
  return fn


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of float [N, H, W, C] to [N, size, size, C]."""
  import jax
  n, _, _, c = images.shape
  out = jax.image.resize(np.asarray(images, np.float32), (n, size, size, c), method="linear",
                         antialias=True)
  return np.asarray(out, np.float32)
