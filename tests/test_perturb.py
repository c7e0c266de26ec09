"""Query perturbations and phi's training augmentation: shapes, ranges, and that each one changes
the image the way its name says."""

import jax
import numpy as np
import pytest

from know2vec_jax.backbone import BackboneConfig, augment, warp
from know2vec_jax.config import ConfigError
from know2vec_jax.data import load_source
from know2vec_jax.data.perturb import SUITE, Perturbation, PerturbError, perturb


@pytest.fixture(scope="module")
def images():
  return load_source("fashion_mnist").test_images[:16]


@pytest.mark.parametrize("name", sorted(SUITE))
def test_every_suite_perturbation_keeps_shape_and_range_and_changes_the_image(images, name):
  out = perturb(images, name, seed=3)
  assert out.shape == images.shape and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert np.abs(out - images).mean() > 1e-3, f"{name} left the images unchanged"
  assert out is not images and np.shares_memory(out, images) is False


def test_shift_moves_the_content_by_the_named_pixels(images):
  # A bright pixel on a dark background moves by exactly (dy, dx).
  x = np.zeros((1, 28, 28, 1), np.float32)
  x[0, 10, 12, 0] = 1.0
  out = perturb(x, Perturbation("s", "shift", (2, -3)))
  assert np.unravel_index(np.argmax(out[0, ..., 0]), (28, 28)) == (12, 9)
  down = perturb(images, "shift_down_2")
  np.testing.assert_allclose(down[:, 2:], images[:, :-2], atol=1e-6)


def test_photometric_perturbations_follow_their_factors(images):
  np.testing.assert_allclose(perturb(images, "brightness_0.7"), 0.7 * images, atol=1e-6)
  low = perturb(images, "contrast_0.5")
  np.testing.assert_allclose(low.std(axis=(1, 2, 3)), 0.5 * images.std(axis=(1, 2, 3)),
                             rtol=1e-4)
  a, b = perturb(images, "noise_0.1", seed=1), perturb(images, "noise_0.1", seed=2)
  assert not np.allclose(a, b)  # seeded noise
  np.testing.assert_array_equal(a, perturb(images, "noise_0.1", seed=1))


def test_rotation_turns_counter_clockwise():
  x = np.zeros((1, 29, 29, 1), np.float32)
  x[0, 14, 24, 0] = 1.0  # right of the centre
  out = perturb(x, Perturbation("r", "rotate", 90.0))
  # Counter-clockwise by 90 degrees: right of the centre goes above it.
  assert np.unravel_index(np.argmax(out[0, ..., 0]), (29, 29)) == (4, 14)


def test_bad_perturbations_are_refused(images):
  with pytest.raises(PerturbError, match="unknown perturbation 'blurr'"):
    perturb(images, "blurr")
  with pytest.raises(PerturbError, match=r"float32 \[N, H, W, C\]"):
    perturb(images[0], "noise_0.1")
  with pytest.raises(PerturbError, match="unknown perturbation kind"):
    perturb(images, Perturbation("x", "warp", 1.0))


def test_augment_is_identity_when_off_and_changes_images_when_on(images):
  x = jax.numpy.asarray(images)
  off = BackboneConfig(augment=0.0)
  np.testing.assert_array_equal(np.asarray(augment(jax.random.key(0), x, off)), images)
  on = np.asarray(augment(jax.random.key(0), x, BackboneConfig(augment=1.0)))
  assert on.shape == images.shape and on.min() >= 0.0 and on.max() <= 1.0
  assert np.all(np.abs(on - images).mean(axis=(1, 2, 3)) > 1e-3)  # every image changed
  # Every range of zero width: the identity.
  shift_only = BackboneConfig(augment=1.0, aug_rotate=0.0, aug_shift=0.0,
                              aug_contrast=(1.0, 1.0), aug_brightness=(1.0, 1.0), aug_noise=0.0)
  np.testing.assert_allclose(np.asarray(augment(jax.random.key(1), x, shift_only)), images,
                             atol=1e-5)


@pytest.mark.parametrize("angle,shift", [(10.0, (0, 0)), (-10.0, (0, 0)), (0.0, (2, -3)),
                                         (90.0, (0, 0))])
def test_augment_warp_is_the_perturbation_suites_geometry(images, angle, shift):
  # phi trains on the same rotations and translations the evaluation applies (same direction,
  # same resampling), only drawn at random.
  w = warp(jax.numpy.asarray(images), jax.numpy.full((len(images),), np.deg2rad(angle)),
           jax.numpy.tile(jax.numpy.asarray(shift, jax.numpy.float32), (len(images), 1)))
  kind = Perturbation("r", "rotate", angle) if angle else Perturbation("s", "shift", shift)
  np.testing.assert_allclose(np.asarray(w), perturb(images, kind), atol=1e-4)


@pytest.mark.parametrize("field,value", [("augment", 1.5), ("aug_shift", -1.0),
                                         ("aug_contrast", (1.2, 0.8))])
def test_bad_augmentation_settings_are_refused(field, value):
  with pytest.raises(ConfigError, match=field):
    BackboneConfig(**{field: value})


def test_centre_undoes_a_translation_and_leaves_blank_images_alone():
  from know2vec_jax.backbone import centre
  centre = jax.jit(centre)  # as phi calls it; op by op, each of its primitives compiles alone
  x = np.zeros((2, 28, 28, 1), np.float32)
  x[0, 4:9, 5:10] = 1.0  # a bright square off centre on black
  x[1] = 1.0
  x[1, 18:23, 16:21] = 0.0  # a dark square off centre on white
  c = np.asarray(centre(jax.numpy.asarray(x)))
  for img, bg in zip(c, (0.0, 1.0)):
    mass = np.abs(img[..., 0] - bg)
    ii, jj = np.indices(mass.shape)
    np.testing.assert_allclose([(mass * ii).sum() / mass.sum(), (mass * jj).sum() / mass.sum()],
                               [13.5, 13.5], atol=0.05)
  # The same content shifted elsewhere centres to the same image.
  moved = perturb(x, Perturbation("s", "shift", (3, 2)))
  np.testing.assert_allclose(np.asarray(centre(jax.numpy.asarray(moved))), c, atol=1e-4)
  blank = np.full((1, 28, 28, 1), 0.3, np.float32)
  np.testing.assert_allclose(np.asarray(centre(jax.numpy.asarray(blank))), blank, atol=1e-6)
