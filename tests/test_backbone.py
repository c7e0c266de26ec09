"""The feature backbone phi: trains, embeds unit vectors, round-trips through orbax."""

import numpy as np
import pytest

from know2vec_jax.backbone import Backbone, BackboneConfig, train_backbone
from know2vec_jax.data import load_source

CFG = BackboneConfig(sources=("digits", "digits+invert"), channels=(8, 16), strides=(2, 2),
                     dim=16, steps=150, batch_size=64, learning_rate=3e-3)


@pytest.fixture(scope="module")
def trained():
  return train_backbone(CFG, image_shape=(28, 28, 1), progress=False)


def test_backbone_learns_domain_and_class(trained):
  bb, info = trained
  assert info["num_labels"] == 20
  # 20-way (domain, class) accuracy on held-out test images, far above the 0.05 chance level.
  assert info["heldout_accuracy"] > 0.6


def test_embed_gives_unit_features_that_separate_classes(trained):
  bb, _ = trained
  d = load_source("digits")
  f = np.asarray(bb.embed(d.test_images))
  assert f.shape == (len(d.test_images), 16)
  np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
  protos = np.stack([f[d.test_labels == c].mean(0) for c in range(10)])
  nearest = np.argmax(f @ protos.T, axis=1)
  assert np.mean(nearest == d.test_labels) > 0.6
  # Batched embedding keeps leading axes.
  assert bb.embed(d.test_images[:6].reshape(2, 3, 28, 28, 1)).shape == (2, 3, 16)


def test_save_load_round_trip(trained, tmp_path):
  bb, _ = trained
  bb.save(tmp_path / "phi")
  loaded = Backbone.load(tmp_path / "phi")
  assert loaded.config == bb.config
  x = load_source("digits").test_images[:32]
  np.testing.assert_array_equal(np.asarray(loaded.embed(x)), np.asarray(bb.embed(x)))
  with pytest.raises(ValueError, match="no backbone at .* does not exist"):
    Backbone.load(tmp_path / "missing")


def test_load_verifies_the_recorded_checksum(trained, tmp_path):
  import json

  from know2vec_jax import storage
  from know2vec_jax.backbone import BackboneError
  bb, _ = trained
  path = bb.save(tmp_path / "phi")
  m = json.loads((path / "backbone.json").read_text())
  m["checksums"]["params"] = "0" * 64  # as if the parameters had changed under the manifest
  m[storage.MANIFEST_CHECKSUM] = storage.manifest_checksum(m)  # ... whose own checksum holds
  (path / "backbone.json").write_text(json.dumps(m))
  with pytest.raises(BackboneError, match="params checkpoint .* does not match the checksum"):
    Backbone.load(path)


def test_nt_xent_matches_a_direct_computation():
  import jax.numpy as jnp

  from know2vec_jax.backbone import nt_xent
  rng = np.random.default_rng(0)
  z1, z2 = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
  z = np.concatenate([z1, z2])
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sim = z @ z.T / 0.5
  want = []
  for i in range(10):
    others = [j for j in range(10) if j != i]
    partner = (i + 5) % 10
    want.append(-sim[i, partner] + np.log(np.exp(sim[i, others]).sum()))
  assert float(nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.5)) == pytest.approx(np.mean(want),
                                                                                 rel=1e-5)


def test_phi_learns_only_the_given_classes_and_from_unlabelled_images_alone():
  cfg = BackboneConfig(channels=(8, 16), strides=(2, 2), dim=16, steps=60, batch_size=32,
                       ssl_batch=32, learning_rate=3e-3)
  bb, info = train_backbone(cfg, image_shape=(28, 28, 1), progress=False,
                            classes={"digits": [1, 3], "mnist5k": [0]})
  assert info["labels"] == ["digits:1", "digits:3", "mnist5k:0"] and bb.num_labels == 3
  assert info["unlabelled"] == 0 and info["sources"] == ["digits", "mnist5k"]
  # Contrastive only (no label at all): the loss falls well below chance, log(2B - 1).
  pool = load_source("digits").test_images
  ssl = BackboneConfig(channels=(8, 16), strides=(2, 2), dim=16, steps=60, ssl_batch=32,
                       learning_rate=3e-3, labelled=False, ssl_weight=1.0)
  bb2, info2 = train_backbone(ssl, image_shape=(28, 28, 1), progress=False, classes={},
                              unlabelled=pool)
  assert info2["labels"] == [] and info2["heldout_accuracy"] is None
  assert info2["unlabelled"] == len(pool) and info2["final_loss"] < 0.75 * np.log(63)
  from know2vec_jax.backbone import BackboneError
  with pytest.raises(BackboneError, match="nothing to learn from"):
    train_backbone(cfg, image_shape=(28, 28, 1), progress=False, classes={})
  with pytest.raises(ValueError, match="labelled=false"):
    BackboneConfig(labelled=False)
