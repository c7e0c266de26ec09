"""Non-neural model families of the zoo: scikit-learn estimators on raw pixels.

They give the zoo inductive biases no Flax family has, and black boxes that answer in other
currencies than logits, which the proxy must take as first-class inputs:

- ``logreg``: multinomial logistic regression; answers **logits** (``decision_function``).
- ``forest``: a random forest of depth-limited trees; answers **probabilities**
  (``predict_proba``, many of them exactly equal).
- ``knn``: k-nearest neighbours on a stored subsample of the task's images; answers **labels
  only** (one-hot rows): every margin is the same, so anchors are told apart by the pool's
  tie-break order alone (:func:`know2vec_jax.knowledge.pool_priority`).

An estimator is stored with skops (``skops.io``, scikit-learn's secure persistence format: no
pickle, only the types listed in :data:`TRUSTED` are loaded); the zoo store keeps the bytes as a
checksummed array like every other tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import numpy as np

OUTPUTS = ("logits", "probabilities", "labels")
# The only types skops is allowed to rebuild beyond its defaults (a forest's fitted trees).
TRUSTED = ["sklearn.tree._tree.Tree"]


@dataclasses.dataclass(frozen=True)
class EstimatorFamily:
  """A scikit-learn model family.

  Attributes:
    name: its architecture name in specs and records.
    make: factory(seed) -> an unfitted estimator.
    output: what its black box answers: ``logits``, ``probabilities`` or ``labels``.
    max_train: at most this many training images per model (a seeded subsample).
  """
  name: str
  make: Callable[[int], object]
  output: str
  max_train: int


def _logreg(seed: int):
  from sklearn.linear_model import LogisticRegression
  return LogisticRegression(C=0.05, max_iter=300, random_state=seed)


def _forest(seed: int):
  from sklearn.ensemble import RandomForestClassifier
  return RandomForestClassifier(n_estimators=40, max_depth=10, min_samples_leaf=2, n_jobs=1,
                                random_state=seed)


def _knn(seed: int):
  del seed  # deterministic given its training subsample
  from sklearn.neighbors import KNeighborsClassifier
  return KNeighborsClassifier(n_neighbors=5)


FAMILIES: dict[str, EstimatorFamily] = {f.name: f for f in (
    EstimatorFamily("logreg", _logreg, "logits", 3000),
    EstimatorFamily("forest", _forest, "probabilities", 3000),
    EstimatorFamily("knn", _knn, "labels", 500),
)}


def is_estimator(arch: str) -> bool:
  """Whether ``arch`` names a scikit-learn family (else a Flax one)."""
  return arch in FAMILIES


def fit(family: str, images: np.ndarray, labels: np.ndarray, seed: int):
  """Fits one estimator of ``family`` on flattened images (a seeded subsample of at most
  ``max_train``).

  Args:
    family: a key of :data:`FAMILIES`.
    images: float32 [N, H, W, C] in [0, 1].
    labels: int [N] task-local labels (every class present).
    seed: the subsample and estimator seed.

  Returns:
    The fitted estimator.
  """
  fam = FAMILIES[family]
  rng = np.random.default_rng([seed, 11])
  keep = rng.permutation(len(labels))[:fam.max_train]
  est = fam.make(int(seed) % (2 ** 31))
  est.fit(images[keep].reshape(len(keep), -1), labels[keep])
  return est


def dumps(estimator) -> bytes:
  """An estimator as skops bytes."""
  import skops.io as sio
  return sio.dumps(estimator)


def loads(blob: bytes):
  """An estimator from skops bytes (only default and :data:`TRUSTED` types are rebuilt)."""
  import skops.io as sio
  return sio.loads(blob, trusted=TRUSTED)


def fingerprint(blob: bytes, family: str) -> str:
  """A stable hash of a stored estimator (its family and bytes)."""
  return hashlib.sha256(family.encode() + b"|" + blob).hexdigest()[:32]


@dataclasses.dataclass
class EstimatorSet:
  """The estimators of one family and output size K, the counterpart of a Flax stack.

  Attributes:
    name: e.g. ``forest-k4``.
    family: a key of :data:`FAMILIES`.
    num_classes: K.
    image_shape: (H, W, C).
    model_ids: the model id of each estimator.
    blobs: each estimator's skops bytes (what is stored and fingerprinted).
  """
  name: str
  family: str
  num_classes: int
  image_shape: tuple[int, int, int]
  model_ids: list[str]
  blobs: list[bytes]

  def __len__(self) -> int:
    return len(self.model_ids)

  @property
  def output(self) -> str:
    return FAMILIES[self.family].output

  def estimator(self, index: int):
    """Estimator ``index``, rebuilt from its bytes (cached)."""
    cache = self.__dict__.setdefault("_estimators", {})
    if index not in cache:
      cache[index] = loads(self.blobs[index])
    return cache[index]

  def fingerprints(self) -> list[str]:
    return [fingerprint(b, self.family) for b in self.blobs]

  def pack(self) -> dict[str, np.ndarray]:
    """The set as arrays for the checksummed store: ``blob`` uint8 (all estimators' bytes back
    to back) and ``offsets`` int64 [M + 1]."""
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in self.blobs])]).astype(np.int64)
    return {"blob": np.frombuffer(b"".join(self.blobs), np.uint8).copy(), "offsets": offsets}

  @staticmethod
  def unpack(arrays: dict) -> list[bytes]:
    """The estimators' bytes from :meth:`pack`'s arrays."""
    blob, off = np.asarray(arrays["blob"], np.uint8), np.asarray(arrays["offsets"])
    return [blob[off[i]:off[i + 1]].tobytes() for i in range(len(off) - 1)]
