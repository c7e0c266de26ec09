"""Transferability baselines against their defining formulas on small hand-computable cases,
batching over the zoo, the registry, and the input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from know2vec_jax.baselines import (BASELINES, BaselineInputError, forward_passes, hscore_scores,
                                    hscore_shrinkage_scores, leep_scores, logme_scores,
                                    nce_scores, nleep_scores, prior_scores, random_scores,
                                    run_baseline, source_aware_accuracy,
                                    source_aware_prior_scores, task_prototype)
from know2vec_jax.baselines.cost import measure_costs
from know2vec_jax.baselines.logme import log_evidence
from know2vec_jax.baselines.nleep import pca_reduce

# The shared small case: 2 models, 6 images, 2 target classes.
Y6 = np.asarray([0, 0, 0, 1, 1, 1])
LOGITS6 = np.asarray([
    [[2.0, 0.0, -1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.2], [-1.0, 2.0, 0.0], [0.0, 0.0, 3.0],
     [0.5, 1.5, 0.0]],
    [[0.0, 0.1, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.2], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0],
     [0.0, 0.0, 0.1]],
], np.float32)
FEATS6 = np.random.default_rng(6).normal(size=(2, 6, 4)).astype(np.float32)
FEATS6[0, :, 0] += 3 * Y6  # model 0's first feature carries the label


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----- LEEP and NCE: written out with loops over images and labels -----


def test_leep_formula():
  for m in range(2):
    theta = _softmax(LOGITS6[m].astype(np.float64))
    joint = np.zeros((2, 3))
    for i, y in enumerate(Y6):
      joint[y] += theta[i] / 6
    cond = joint / joint.sum(0)
    ref = np.mean([np.log(sum(cond[y, z] * theta[i, z] for z in range(3)))
                   for i, y in enumerate(Y6)])
    assert float(leep_scores(LOGITS6, Y6, 2)[m]) == pytest.approx(ref, abs=1e-5)


def test_nce_hand_counts():
  # Model 0 predicts z = [0, 0, 1, 1, 2, 1]: with y = [0, 0, 0, 1, 1, 1] the (y=0, y=1) counts
  # are z=0: (2, 0), z=1: (1, 2), z=2: (0, 1), so
  # -H(Y|Z) = 2/6 log 1 + 1/6 log 1/3 + 2/6 log 2/3 + 1/6 log 1.
  # Model 1 predicts [1, 0, 2, 0, 1, 2]: counts z=0 (1, 1), z=1 (1, 1), z=2 (1, 1) -> log 1/2.
  want0 = (1 / 6) * np.log(1 / 3) + (2 / 6) * np.log(2 / 3)
  s = np.asarray(nce_scores(LOGITS6, Y6, 2))
  np.testing.assert_allclose(s, [want0, np.log(0.5)], atol=1e-6)
  # A model whose argmax is the label has H(Y|Z) = 0.
  perfect = np.eye(3, dtype=np.float32)[Y6][None]
  assert float(nce_scores(perfect, Y6, 2)[0]) == pytest.approx(0.0, abs=1e-7)


# ----- H-score: numpy covariance formula (float64, pinv) -----


def _hscore_ref(f, y):
  f = f.astype(np.float64)
  fc = f - f.mean(0)
  cov_f = fc.T @ fc / (len(f) - 1)
  g = np.zeros_like(f)
  for c in np.unique(y):
    g[y == c] = f[y == c].mean(0)
  return np.trace(np.linalg.pinv(cov_f, rcond=1e-10) @ np.cov(g, rowvar=False))


def _hscore_shrinkage_ref(f, y):
  f = f.astype(np.float64)
  f = f - f.mean(0)
  lw = LedoitWolf(assume_centered=False).fit(f)
  g = np.zeros_like(f)
  for c in np.unique(y):
    g[y == c] = f[y == c].mean(0)
  return np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15)
                  @ ((1 - lw.shrinkage_) * np.cov(g, rowvar=False)))


def test_hscore_formula():
  np.testing.assert_allclose(hscore_scores(FEATS6, Y6, 2),
                             [_hscore_ref(f, Y6) for f in FEATS6], rtol=1e-4)
  np.testing.assert_allclose(hscore_scores(LOGITS6, Y6, 2),
                             [_hscore_ref(f, Y6) for f in LOGITS6], rtol=1e-4)
  # More features than images, plus a dead (constant) unit: cov(f) is singular and the
  # pseudo-inverse drops the null directions.
  rng = np.random.default_rng(1)
  y = np.arange(10) % 3
  f = rng.normal(size=(2, 10, 16)).astype(np.float32)
  f[:, :, 5] = 0.0
  np.testing.assert_allclose(hscore_scores(f, y, 3), [_hscore_ref(x, y) for x in f], rtol=1e-3)
  # Each principal direction contributes its between-class share of the variance, in [0, 1]:
  # features that are a function of the label alone reach the number of classes minus one.
  onehot = np.eye(3, dtype=np.float32)[y][None] * 2.0
  assert float(hscore_scores(onehot, y, 3)[0]) == pytest.approx(2.0, rel=1e-5)


def test_hscore_shrinkage_formula():
  rng = np.random.default_rng(2)
  y = np.arange(30) % 3
  f = rng.normal(size=(2, 30, 6)).astype(np.float32)
  f[1] += 1.5 * np.eye(6, dtype=np.float32)[y]
  np.testing.assert_allclose(hscore_shrinkage_scores(f, y, 3),
                             [_hscore_shrinkage_ref(x, y) for x in f], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(hscore_shrinkage_scores(FEATS6, Y6, 2),
                             [_hscore_shrinkage_ref(x, Y6) for x in FEATS6], rtol=1e-3, atol=1e-6)


# ----- LogME: the evidence formula, its maximum, and the reference fixed point -----


def _direct_log_evidence(f, y, alpha, beta):
  """log N(y; 0, F F^T / alpha + I / beta): the evidence with w integrated out, no SVD."""
  return scipy.stats.multivariate_normal(np.zeros(len(y)), f @ f.T / alpha
                                         + np.eye(len(y)) / beta).logpdf(y)


@pytest.mark.parametrize("n,d", [(12, 3), (5, 8)])
def test_logme_evidence_formula(n, d):
  rng = np.random.default_rng(n)
  f = rng.normal(size=(n, d))
  y = (rng.random(n) > 0.5).astype(np.float64)
  for alpha, beta in [(1.0, 1.0), (0.2, 7.0), (30.0, 0.3)]:
    assert log_evidence(f, y, alpha, beta) == pytest.approx(
        _direct_log_evidence(f, y, alpha, beta), rel=1e-5)


def test_logme_maximises_the_evidence():
  rng = np.random.default_rng(3)
  y = np.asarray([0, 1, 2] * 4)
  f = rng.normal(size=(2, 12, 3))
  # Both models carry some label signal in every class, so each maximum is interior; with none the
  # evidence peaks as alpha -> inf, which the update's floor (as published) stops short of.
  f += np.asarray([1.5, 3.0])[:, None, None] * np.eye(3)[y]
  got = np.asarray(logme_scores(f.astype(np.float32), y, 3, max_iter=200, tol=1e-7))
  for m in range(2):
    best = []
    for c in range(3):
      col = (y == c).astype(np.float64)
      # Brute force: maximise the direct evidence over (log alpha, log beta) from several starts.
      res = min((scipy.optimize.minimize(
          lambda p: -_direct_log_evidence(f[m], col, *np.exp(p)), x0, method="Nelder-Mead",
          options=dict(xatol=1e-8, fatol=1e-10, maxiter=4000)) for x0 in
          ([0.0, 0.0], [3.0, -2.0], [-3.0, 3.0])), key=lambda r: r.fun)
      best.append(-res.fun / 12)
    assert got[m] == pytest.approx(np.mean(best), abs=2e-5)
  assert got[1] > got[0]  # the features that carry the label have the higher evidence


def _logme_reference(f, y):
  """The fixed-point algorithm as published (numpy, float64, 11 updates, tol 1e-3)."""
  n, d = f.shape
  u, s, _ = np.linalg.svd(f, full_matrices=False)
  sigma = s ** 2
  out = []
  for c in range(int(y.max()) + 1):
    col = (y == c).astype(np.float64)
    x2 = (u.T @ col) ** 2
    res_x2 = col @ col - x2.sum()
    alpha = beta = 1.0
    for _ in range(11):
      t = alpha / beta
      gamma = (sigma / (sigma + t)).sum()
      m2 = (sigma * x2 / (t + sigma) ** 2).sum()
      res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
      alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
      if abs(alpha / beta - t) / t <= 1e-3:
        break
    t = alpha / beta
    m2 = (sigma * x2 / (t + sigma) ** 2).sum()
    res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
    out.append((d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * sigma)
                .sum() - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n)
  return np.mean(out)


def test_logme_matches_reference_algorithm():
  np.testing.assert_allclose(logme_scores(FEATS6, Y6, 2),
                             [_logme_reference(f.astype(np.float64), Y6) for f in FEATS6],
                             rtol=1e-4)
  np.testing.assert_allclose(logme_scores(LOGITS6, Y6, 2),
                             [_logme_reference(f.astype(np.float64), Y6) for f in LOGITS6],
                             rtol=1e-4)


# ----- N-LEEP: PCA cut, mixture fit and LEEP on its posteriors -----


def test_nleep_pca_cut_matches_sklearn():
  f = np.random.default_rng(4).normal(size=(50, 10)) * np.linspace(3, 0.1, 10)
  for variance in (0.5, 0.8, 0.95):
    z, mask, kept = pca_reduce(jnp.asarray(f, jnp.float32), variance, 10)
    pca = PCA(n_components=variance, svd_solver="full").fit(f)
    assert int(kept) == pca.n_components_
    np.testing.assert_allclose(np.abs(np.asarray(z)[:, :int(kept)]), np.abs(pca.transform(f)),
                               rtol=1e-3, atol=1e-4)
    assert np.all(np.asarray(z)[:, int(kept):] == 0) and float(mask.sum()) == int(kept)


def test_nleep_on_separated_clusters_is_nce_of_the_clusters():
  # Six tight clusters and 2 components per class: the mixture's posteriors are the one-hot
  # cluster ids, so N-LEEP = sum_{z,y} P(z,y) log P(y|z), counted by hand: clusters 0-1 hold
  # class 0 only, 2-3 class 1 only, 4-5 classes 2 and 0 (5 and 5 images each).
  rng = np.random.default_rng(5)
  cluster = np.arange(60) % 6
  x = (10 * np.eye(6)[cluster] + 0.01 * rng.normal(size=(60, 6)))[None].astype(np.float32)
  y = np.asarray([0, 0, 1, 1, 2, 2])[cluster]
  y[(cluster >= 4) & (np.arange(60) >= 30)] = 0
  want = (20 / 60) * np.log(0.5)  # clusters 4-5: 20 images with P(y | z) = 1/2; the rest log 1
  for key in (jax.random.key(0), jax.random.key(1)):
    got = float(nleep_scores(x, y, 3, key=key, components_per_class=2, variance=1.0)[0])
    assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_nleep_matches_sklearn_pipeline(covariance):
  # Two overlapping Gaussian blobs in 3-D (with a 4th, low-variance direction that the PCA cut
  # drops): the two-component MLE is unique, so EM here and in scikit-learn reach the same
  # mixture; LEEP does not depend on the order of the components.
  rng = np.random.default_rng(7)
  y = np.arange(80) % 2
  f = np.concatenate([rng.normal(size=(80, 3)) + 3.0 * y[:, None] * np.asarray([1.0, 0.5, 0.0]),
                      0.01 * rng.normal(size=(80, 1))], 1)
  z = PCA(n_components=0.8, svd_solver="full").fit_transform(f)
  gmm = GaussianMixture(2, covariance_type=covariance, tol=1e-10, max_iter=2000,
                        random_state=0).fit(z)
  post = gmm.predict_proba(z)
  joint = np.stack([post[y == c].sum(0) for c in range(2)]) / 80
  cond = joint / joint.sum(0)
  want = np.mean(np.log((post @ cond.T)[np.arange(80), y]))
  got = float(nleep_scores(f[None].astype(np.float32), y, 2, components_per_class=1,
                           covariance=covariance, em_steps=1000, em_tol=1e-9)[0])
  assert got == pytest.approx(want, abs=2e-3)


# ----- query-blind references -----


def test_prior_is_minus_mean_rank():
  gt = np.asarray([[0.9, 0.5, 0.7], [0.6, 0.8, 0.8]])
  # ranks (1 = best): [1, 3, 2] and [3, 1.5, 1.5] -> means [2, 2.25, 1.75]
  np.testing.assert_allclose(prior_scores(gt), [-2.0, -2.25, -1.75])
  rng = np.random.default_rng(8)
  gt = rng.integers(0, 5, (6, 9)) / 5
  want = -np.mean([scipy.stats.rankdata(-row) for row in gt], 0)
  np.testing.assert_allclose(prior_scores(gt), want, rtol=1e-6)


def _targets_near(seed, targets, dim, models, own):
  """Unit prototypes of ``targets`` measured targets, their ground truth [T, models], a query
  prototype next to target ``own``, and the targets by cosine to it (nearest first)."""
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(targets, dim))
  protos /= np.linalg.norm(protos, axis=1, keepdims=True)
  gt = rng.random((targets, models))
  q = protos[own] + 0.05 * rng.normal(size=dim)
  q /= np.linalg.norm(q)
  near = np.argsort(-(protos @ q))
  assert near[0] == own
  return rng, protos, gt, q, near


def test_source_aware_prior_reads_only_the_nearest_targets():
  rng, protos, gt, q, near = _targets_near(3, 6, 8, 5, own=4)
  np.testing.assert_allclose(source_aware_prior_scores(q, protos, gt, k=1), prior_scores(gt[[4]]))
  np.testing.assert_allclose(source_aware_prior_scores(q, protos, gt, k=3),
                             prior_scores(gt[np.sort(near[:3])]), rtol=1e-6)
  # The farther targets' ground truth never reaches the scores; k above T is every target.
  changed = gt.copy()
  changed[near[3:]] = rng.random((3, 5))
  np.testing.assert_array_equal(source_aware_prior_scores(q, protos, gt, k=3),
                                source_aware_prior_scores(q, protos, changed, k=3))
  np.testing.assert_allclose(source_aware_prior_scores(q, protos, gt, k=99), prior_scores(gt),
                             rtol=1e-6)
  assert run_baseline("source-aware prior", query_prototype=q, target_prototypes=protos,
                      ground_truth_other_targets=gt).forward_passes == 0
  with pytest.raises(BaselineInputError, match="k must be an int >= 1"):
    source_aware_prior_scores(q, protos, gt, k=0)
  with pytest.raises(BaselineInputError, match="target_prototypes \[T, D\]"):
    source_aware_prior_scores(q, protos[:, :4], gt)
  with pytest.raises(BaselineInputError, match="needs query_prototype"):
    run_baseline("source-aware prior", ground_truth_other_targets=gt)



def test_source_aware_accuracy_is_the_nearest_targets_mean_accuracy():
  """The source-aware prior as an accuracy predictor: each model's mean measured accuracy over
  the same nearest targets the ranking reads, and nothing from the farther ones."""
  rng, protos, gt, q, near = _targets_near(5, 7, 6, 4, own=2)
  np.testing.assert_allclose(source_aware_accuracy(q, protos, gt, k=1), gt[2], rtol=1e-6)
  np.testing.assert_allclose(source_aware_accuracy(q, protos, gt, k=3), gt[near[:3]].mean(0),
                             rtol=1e-6)
  # Its order is the source-aware prior's ranking of the same targets (k = 1).
  np.testing.assert_array_equal(np.argsort(-source_aware_accuracy(q, protos, gt, k=1)),
                                np.argsort(-source_aware_prior_scores(q, protos, gt, k=1)))
  changed = gt.copy()
  changed[near[3:]] = rng.random((4, 4))
  np.testing.assert_array_equal(source_aware_accuracy(q, protos, gt, k=3),
                                source_aware_accuracy(q, protos, changed, k=3))
  with pytest.raises(BaselineInputError, match="k must be an int >= 1"):
    source_aware_accuracy(q, protos, gt, k=0)
  bad = gt.copy()
  bad[near[0], 1] = np.nan
  with pytest.raises(BaselineInputError, match="NaN"):
    source_aware_accuracy(q, protos, bad, k=1)

def test_task_prototypes_in_phi_tell_the_image_kind_apart(tiny_proxy):
  """On real images through a trained phi, a query's nearest measured target is one of its own
  source (domain), whatever the classes: what the source-aware prior relies on. The sources are
  those phi learnt (the tiny zoo's); a kind of image it never saw need not be told apart (the
  tiny phi puts digits 5-7 nearer Fashion-MNIST 0-3 than digits 0-3)."""
  from know2vec_jax.data import Task, few_shot, load_source
  def proto(source, classes, seed, split):
    x, y = few_shot(load_source(source), Task(source, classes), 5, seed=seed, split=split)
    return task_prototype(*tiny_proxy.query_grid(x, y))
  sources = ("digits", "digits+invert", "mnist5k")
  targets = np.stack([proto(s, (0, 1, 2, 3), 0, "train") for s in sources])
  for s in sources:
    for classes in ((0, 1, 2), (5, 6, 7)):
      assert sources[np.argmax(targets @ proto(s, classes, 1, "test"))] == s
  with pytest.raises(BaselineInputError, match="query_grid must be \[K, K, D\]"):
    task_prototype(np.ones((4, 3, 2)), np.ones(4))
  with pytest.raises(BaselineInputError, match="naming at least one class"):
    task_prototype(np.ones((3, 3, 2)), np.zeros(3))


def test_random_scores():
  a = np.asarray(random_scores(jax.random.key(0), 7))
  assert a.shape == (7,) and np.all((a >= 0) & (a < 1))
  np.testing.assert_array_equal(a, random_scores(jax.random.key(0), 7))
  assert not np.array_equal(a, random_scores(jax.random.key(1), 7))


# ----- batching, registry, errors -----

_X_METHODS = [m for m, b in BASELINES.items() if b.input == "logits"]


@pytest.mark.parametrize("method", _X_METHODS)
def test_batched_equals_per_model(method):
  # Models must not see each other: permuting the stack permutes the scores, and replacing one
  # model changes its score only (same shapes, so one compilation serves all three calls).
  # (24 images: with 6, N-LEEP's 10 components would give every image its own.)
  fn = BASELINES[method].fn
  y = np.arange(24) % 2
  x = np.random.default_rng(10).normal(size=(4, 24, 3)).astype(np.float32)
  together = np.asarray(fn(x, y, 2))
  assert together.shape == (4,) and np.all(np.isfinite(together))
  perm = np.asarray([2, 0, 3, 1])
  np.testing.assert_allclose(np.asarray(fn(x[perm], y, 2)), together[perm], rtol=1e-4,
                             atol=1e-6)
  other = x.copy()
  other[0, :, :2] += 3 * np.eye(2, dtype=np.float32)[y]
  changed = np.asarray(fn(other, y, 2))
  np.testing.assert_allclose(changed[1:], together[1:], rtol=1e-4, atol=1e-6)
  assert changed[0] != pytest.approx(together[0], rel=1e-3)


def test_dead_models_get_finite_uninformative_scores():
  # A dead feature layer (all 0) and a constant one must not turn the zoo's ranking into NaN: they
  # get the score of a model that knows nothing about the labels.
  y = np.arange(40) % 4
  x = np.random.default_rng(9).normal(size=(3, 40, 8)).astype(np.float32)
  x[0], x[1] = 0.0, 3.0
  uninformative = np.log(0.25)  # -H(Y) of 4 balanced classes
  for method in ("leep", "nce", "nleep-logits"):
    s = np.asarray(BASELINES[method].fn(x, y, 4))
    np.testing.assert_allclose(s[:2], uninformative, atol=1e-5, err_msg=method)
  for method in ("hscore-logits", "hscore-shrinkage-logits"):
    np.testing.assert_allclose(np.asarray(BASELINES[method].fn(x, y, 4))[:2], 0.0, atol=1e-6)
  # LogME of zero features: max over beta of log N(y; 0, I / beta) per sample, beta = N / ||y||^2.
  beta = 40 / 10
  s = np.asarray(logme_scores(x, y, 4))
  assert s[0] == pytest.approx(0.5 * (np.log(beta) - 1 - np.log(2 * np.pi)), abs=1e-4)
  assert np.all(np.isfinite(s))


def test_nleep_inside_jit_keeps_every_column():
  # Under an outer jit N-LEEP cannot trim the PCA columns to the widest variance cut, so it fits
  # the mixture on all 32 of them with the extra ones masked: the scores must not change.
  rng = np.random.default_rng(11)
  y = np.arange(40) % 2
  x = (rng.normal(size=(2, 40, 32)) * np.geomspace(4, 0.01, 32)).astype(np.float32)
  x[1, :, 0] += 6 * y
  eager = np.asarray(nleep_scores(x, y, 2))
  traced = np.asarray(jax.jit(lambda x, y: nleep_scores(x, y, 2))(x, y))
  np.testing.assert_allclose(traced, eager, rtol=1e-4, atol=1e-5)
  assert eager[1] > eager[0]


def test_callable_inside_jit():
  # Under an outer jit the value checks are skipped (tracers) but the shape checks still run.
  got = jax.jit(lambda x, y: leep_scores(x, y, 2) + logme_scores(x, y, 2))(LOGITS6, Y6)
  want = np.asarray(leep_scores(LOGITS6, Y6, 2)) + np.asarray(logme_scores(LOGITS6, Y6, 2))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_registry():
  assert set(BASELINES) >= {"leep", "nce", "nleep-logits", "nleep-features (white-box)",
                            "logme-logits", "logme-features (white-box)", "hscore-logits",
                            "hscore-features (white-box)", "random", "prior"}
  for name, b in BASELINES.items():
    assert b.white_box == ("(white-box)" in name) == (b.input == "features")
  assert forward_passes("leep", 30, 200) == 6000
  assert forward_passes("logme-features (white-box)", 30, 200) == 6000
  assert forward_passes("prior", 30, 200) == forward_passes("random", 30, 200) == 0
  r = run_baseline("hscore-features (white-box)", features=FEATS6, labels=Y6,
                   num_target_classes=2)
  np.testing.assert_allclose(r.scores, hscore_scores(FEATS6, Y6, 2))
  assert r.forward_passes == 12 and r.seconds > 0
  assert run_baseline("random", num_models=5).scores.shape == (5,)
  assert run_baseline("prior", ground_truth_other_targets=np.ones((2, 3))).forward_passes == 0
  with pytest.raises(BaselineInputError, match="needs features, labels"):
    run_baseline("logme-features (white-box)", logits=LOGITS6, labels=Y6, num_target_classes=2)
  with pytest.raises(BaselineInputError, match="unknown baseline 'logme'"):
    forward_passes("logme", 1, 1)


def test_measure_costs():
  rows = measure_costs(3, 12, 2, num_logits=3, num_features=5, repeats=1,
                       methods=["nce", "hscore-features (white-box)", "prior"])
  assert [r["method"] for r in rows] == ["nce", "hscore-features (white-box)", "prior"]
  assert [r["forward_passes"] for r in rows] == [36, 36, 0]
  assert all(r["first_s"] > 0 and r["steady_s"] > 0 and r["steady_cpu_s"] > 0 for r in rows)
  with pytest.raises(ValueError, match="unknown baseline"):
    measure_costs(3, 12, 2, methods=["leep", "logme"])


def _with_nan(x):
  x = x.copy()
  x[1, 2, 0] = np.nan
  return x


@pytest.mark.parametrize("method", _X_METHODS)
@pytest.mark.parametrize("x,y,k,match", [
    (LOGITS6, np.zeros(6, int), 2, "single class"),
    (LOGITS6, Y6 + 1, 2, "labels must be in 0..1"),
    (LOGITS6, Y6[:5], 2, "one label per image: got shape \\(5,\\)"),
    (_with_nan(LOGITS6), Y6, 2, "NaN/inf"),
    (np.where(LOGITS6 > 1.5, np.inf, LOGITS6), Y6, 2, "NaN/inf"),
    (LOGITS6[0], Y6, 2, "shape \\[M models, N images, D\\]"),
    (LOGITS6, Y6.astype(np.float32), 2, "labels must be integers"),
    (LOGITS6, Y6, 1, "at least 2 classes"),
    (LOGITS6.astype(np.int32), Y6, 2, "must be floating point"),
])
def test_bad_inputs(method, x, y, k, match):
  with pytest.raises(BaselineInputError, match=match):
    BASELINES[method].fn(x, y, k)


def test_bad_blind_inputs():
  with pytest.raises(BaselineInputError, match="shape \\[T targets, M models\\]"):
    prior_scores(np.ones(4))
  with pytest.raises(BaselineInputError, match="NaN/inf"):
    prior_scores([[0.1, np.nan]])
  with pytest.raises(BaselineInputError, match="num_models must be an int >= 1"):
    random_scores(jax.random.key(0), 0)
  with pytest.raises(BaselineInputError, match="variance must be a fraction"):
    nleep_scores(LOGITS6, Y6, 2, variance=1.5)
  with pytest.raises(BaselineInputError, match="covariance must be one of"):
    nleep_scores(LOGITS6, Y6, 2, covariance="spherical")
