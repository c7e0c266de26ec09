"""N-LEEP (Li et al., "Ranking Neural Checkpoints", CVPR 2021), batched over models.

PCA of a model's outputs on the target images, keeping a fraction of the variance; a Gaussian
mixture fit by EM with ``components_per_class * K`` components; then LEEP with the mixture's
posteriors in place of the source classifier's softmax. Everything has static shapes so the whole
pipeline jits and vmaps over the zoo: PCA returns a fixed number of columns and masks the ones
beyond each model's variance cut; k-means and EM are bounded ``while_loop``s.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from know2vec_jax.baselines.checks import BaselineInputError, check_scores_inputs
from know2vec_jax.baselines.leep import leep_from_probs

COVARIANCES = ("diag", "full")


def pca_reduce(f, variance: float, max_dim: int):
  """Principal components of one model's outputs, keeping the fewest that explain more than a
  fraction ``variance`` of the variance (scikit-learn's ``PCA(n_components=variance)`` rule).

  Args:
    f: float [N, D].
    variance: fraction in (0, 1].
    max_dim: static number of output columns (<= min(N, D)); the count kept is capped by it.

  Returns:
    (z [N, max_dim] centred projections with the columns beyond the cut set to 0,
     mask [max_dim] float 1 for kept columns, kept: int scalar).
  """
  fc = f - f.mean(0)
  _, s, vh = jnp.linalg.svd(fc, full_matrices=False)
  var = s * s
  ratio = jnp.cumsum(var) / jnp.maximum(var.sum(), jnp.finfo(f.dtype).tiny)
  kept = jnp.clip(jnp.sum(ratio <= variance) + 1, 1, max_dim)
  mask = (jnp.arange(max_dim) < kept).astype(f.dtype)
  return (fc @ vh[:max_dim].T) * mask, mask, kept


def _m_step(z, mask, resp, reg, covariance):
  """Mixture weights, means and (diagonal or full) covariances from responsibilities [N, C]."""
  n, d = z.shape
  nk = resp.sum(0) + 10 * jnp.finfo(z.dtype).eps  # as scikit-learn: no empty component divides by 0
  weights = nk / n
  means = resp.T @ z / nk[:, None]  # [C, d]
  if covariance == "diag":
    # E[z^2] - mean^2 as scikit-learn's diagonal M-step (the clamp covers float32 cancellation).
    var = resp.T @ (z * z) / nk[:, None] - means * means
    # Masked columns are 0 in z and means; giving them variance 1 makes their density a constant
    # shared by every component, so they drop out of the posteriors.
    var = jnp.maximum(var, 0.0) + reg
    return weights, means, jnp.where(mask > 0, var, 1.0)
  # Centred products, as scikit-learn's full M-step: E[z z^T] - mean mean^T can lose positive
  # definiteness in float32 and break the Cholesky factorisation.
  diff = z[None, :, :] - means[:, None, :]  # [C, N, d]
  cov = jnp.einsum("nc,cnd,cne->cde", resp, diff, diff) / nk[:, None, None]
  cov = cov + reg * jnp.eye(d, dtype=z.dtype)
  keep = mask[:, None] * mask[None, :]
  return weights, means, jnp.where(keep > 0, cov, jnp.eye(d, dtype=z.dtype))


def _log_resp(z, mask, params, covariance):
  """Log posteriors log p(c | z_n) [N, C] and the mean log-likelihood of the mixture (the masked
  columns add nothing: they are 0 with mean 0 and variance 1 in every component)."""
  weights, means, cov = params
  if covariance == "diag":
    prec = 1.0 / cov  # [C, d]
    maha = ((z * z) @ prec.T - 2 * z @ (means * prec).T + jnp.sum(means * means * prec, 1))
    logdet = jnp.sum(jnp.log(cov) * mask, 1)
  else:
    chol = jnp.linalg.cholesky(cov)  # [C, d, d]
    diff = z[None, :, :] - means[:, None, :]  # [C, N, d]
    sol = jax.scipy.linalg.solve_triangular(chol, jnp.swapaxes(diff, 1, 2), lower=True)
    maha = jnp.sum(sol * sol, 1).T  # [N, C]
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)), 1)
  log_p = jnp.log(weights) - 0.5 * (logdet + maha + mask.sum() * math.log(2 * math.pi))
  log_norm = jax.nn.logsumexp(log_p, axis=1, keepdims=True)
  return log_p - log_norm, jnp.mean(log_norm)


def _kmeans_plus_plus(z, num_components, key):
  """k-means++ seeds (Arthur and Vassilvitskii 2007): each next seed is a point drawn with
  probability proportional to its squared distance to the nearest seed so far. Random distinct
  points often leave two seeds in one cluster and none in another, a local optimum EM keeps."""
  n, d = z.shape
  keys = jax.random.split(key, num_components)
  first = z[jax.random.randint(keys[0], (), 0, n)]
  centres = jnp.zeros((num_components, d), z.dtype).at[0].set(first)
  d2 = jnp.sum((z - first) ** 2, 1)

  def add(i, state):
    centres, d2 = state
    # Points already chosen have d2 = 0 and so probability 0; all-zero d2 (fewer distinct points
    # than seeds) falls back to a uniform draw.
    logits = jnp.where(d2.sum() > 0, jnp.log(jnp.maximum(d2, 0.0)), 0.0)
    nxt = z[jax.random.categorical(keys[i], logits)]
    return centres.at[i].set(nxt), jnp.minimum(d2, jnp.sum((z - nxt) ** 2, 1))

  centres, _ = jax.lax.fori_loop(1, num_components, add, (centres, d2))
  return centres


def gmm_posteriors(z, mask, num_components: int, key, *, covariance: str = "diag",
                   kmeans_steps: int = 100, em_steps: int = 100, em_tol: float = 1e-3,
                   reg_covar: float = 1e-6):
  """Posteriors of a Gaussian mixture fit to z by EM (traceable; no input checks).

  As scikit-learn's ``GaussianMixture`` with its defaults: k-means (k-means++ seeds drawn with
  ``key``, Lloyd steps until no point changes cluster) gives hard responsibilities and one M-step
  turns them into parameters; E/M steps then run until the mean log-likelihood changes by less
  than ``em_tol``; a final E-step gives the posteriors.

  Args:
    z: float [N, d]; mask: float [d], 1 for the columns to model (the others must be 0 in z).
    num_components: C <= N (static).
    key: PRNG key for the k-means seeds.
    covariance: "diag" or "full".
    kmeans_steps, em_steps: most Lloyd and EM steps. Under ``vmap`` every model runs until the
      slowest has converged; a converged model's state no longer changes.
    em_tol: convergence threshold on the mean log-likelihood per sample.
    reg_covar: added to every variance, relative to the mean variance of the kept columns (so the
      result does not depend on the scale of z).

  Returns:
    float [N, C] posteriors p(c | z_n).
  """
  col_var = jnp.sum(jnp.var(z, 0) * mask) / jnp.maximum(mask.sum(), 1.0)
  # Constant outputs (a dead feature layer) have no scale to be relative to; any positive variance
  # then gives every point the same posteriors, i.e. an uninformative model.
  reg = jnp.where(col_var > 0, reg_covar * col_var, 1.0)

  def assign(c):
    return jnp.argmin(jnp.sum(c * c, 1) - 2 * z @ c.T, 1)  # nearest centre ([N, C] minus |z|^2)

  def lloyd(state):
    c, labels, _, i = state
    hard = jax.nn.one_hot(labels, num_components, dtype=z.dtype)
    count = hard.sum(0)
    # An empty cluster keeps its centre (it cannot move without points).
    c = jnp.where(count[:, None] > 0, hard.T @ z / jnp.maximum(count, 1.0)[:, None], c)
    new = assign(c)
    return c, new, jnp.any(new != labels), i + 1

  centres = _kmeans_plus_plus(z, num_components, key)
  _, labels, _, _ = jax.lax.while_loop(lambda s: s[2] & (s[3] < kmeans_steps), lloyd,
                                       (centres, assign(centres), jnp.bool_(True), 0))
  params = _m_step(z, mask, jax.nn.one_hot(labels, num_components, dtype=z.dtype), reg,
                   covariance)

  def em(state):
    p, ll, _, i = state
    log_resp, new_ll = _log_resp(z, mask, p, covariance)
    return (_m_step(z, mask, jnp.exp(log_resp), reg, covariance), new_ll,
            jnp.abs(new_ll - ll), i + 1)

  params, _, _, _ = jax.lax.while_loop(
      lambda s: (s[2] >= em_tol) & (s[3] < em_steps), em,
      (params, jnp.asarray(-jnp.inf, z.dtype), jnp.asarray(jnp.inf, z.dtype), 0))
  return jnp.exp(_log_resp(z, mask, params, covariance)[0])


@functools.partial(jax.jit, static_argnames=("max_dim",))
def _pca_batch(x, variance, max_dim):
  return jax.vmap(pca_reduce, in_axes=(0, None, None))(x, variance, max_dim)


@functools.partial(jax.jit, static_argnames=("num_target_classes", "num_components", "covariance"))
def _nleep(z, mask, labels, key, num_target_classes, num_components, covariance, kmeans_steps,
           em_steps, em_tol, reg_covar):
  def one(z, mask):
    post = gmm_posteriors(z, mask, num_components, key, covariance=covariance,
                          kmeans_steps=kmeans_steps, em_steps=em_steps, em_tol=em_tol,
                          reg_covar=reg_covar)
    return leep_from_probs(post, labels, num_target_classes)

  # The same seeds for every model: differences between models come from their outputs alone.
  return jax.vmap(one)(z, mask)


def _bucket(dims: int, cap: int) -> int:
  """dims rounded up to a multiple of 8 (at most ``cap``): few distinct shapes to compile."""
  return min(cap, -(-dims // 8) * 8)


def nleep_scores(x, labels, num_target_classes: int, *, key=None, variance: float = 0.8,
                 components_per_class: int = 5, max_dim: int | None = None,
                 covariance: str = "diag", kmeans_steps: int = 100, em_steps: int = 100,
                 em_tol: float = 1e-3, reg_covar: float = 1e-6):
  """N-LEEP of every model for one labelled target set.

  Args:
    x: float [M, N, D]: logits (black-box) or penultimate features (white-box) of M models on the
      N target images.
    labels: int [N] target labels in 0..num_target_classes-1.
    num_target_classes: K.
    key: PRNG key of the k-means seeds (default ``jax.random.key(0)``: deterministic scores).
    variance: fraction of the variance the PCA keeps (the paper's 0.8).
    components_per_class: v; the mixture has min(v * K, N) components.
    max_dim: most PCA dimensions kept (default min(N, D), i.e. never binding). The mixture is
      fit on as many columns as the model that needs the most (rounded up to a multiple of 8).
    covariance: "diag" (default; cost linear in the kept dimensions) or "full".
    kmeans_steps, em_steps, em_tol, reg_covar: see :func:`gmm_posteriors` (the defaults are
      scikit-learn's for EM).

  Returns:
    float32 [M] scores in (-inf, 0] (higher = expected to transfer better).

  Raises:
    BaselineInputError: see :func:`know2vec_jax.baselines.checks.check_scores_inputs`; also bad
      options (variance outside (0, 1], v < 1, max_dim < 1, unknown covariance, negative steps).
  """
  if not 0 < variance <= 1:
    raise BaselineInputError(f"variance must be a fraction in (0, 1], got {variance}")
  if int(components_per_class) < 1:
    raise BaselineInputError(f"components_per_class must be >= 1, got {components_per_class}")
  if covariance not in COVARIANCES:
    raise BaselineInputError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
  if max_dim is not None and int(max_dim) < 1:
    raise BaselineInputError(f"max_dim must be >= 1, got {max_dim}")
  if int(kmeans_steps) < 0 or int(em_steps) < 0 or not (reg_covar >= 0 and em_tol >= 0):
    raise BaselineInputError(f"need kmeans_steps, em_steps >= 0 and em_tol, reg_covar >= 0, got "
                             f"{kmeans_steps}, {em_steps}, {em_tol}, {reg_covar}")
  x, labels, k = check_scores_inputs(x, labels, num_target_classes)
  _, n, d = x.shape
  cap = min(n, d) if max_dim is None else min(int(max_dim), n, d)
  z, mask, kept = _pca_batch(x, float(variance), cap)
  if not isinstance(kept, jax.core.Tracer):
    # The mixture's cost grows with the columns it carries, masked or not: keep only as many as
    # the model that needs the most (features of trained nets often reach the variance cut in a
    # fraction of their width). One small host sync; outside an enclosing jit only.
    dims = _bucket(int(kept.max()), cap)
    z, mask = z[:, :, :dims], mask[:, :dims]
  components = min(int(components_per_class) * k, n)
  key = jax.random.key(0) if key is None else key
  return _nleep(z, mask, labels, key, k, components, covariance, int(kmeans_steps),
                int(em_steps), float(em_tol), float(reg_covar))
