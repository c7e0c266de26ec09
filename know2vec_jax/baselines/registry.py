"""The baselines an SF-MTE experiment compares against, by display name, with what each needs at
query time."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import numpy as np

from know2vec_jax.baselines.anchor import anchor_matching_scores
from know2vec_jax.baselines.blind import prior_scores, random_scores, source_aware_prior_scores
from know2vec_jax.baselines.checks import BaselineInputError
from know2vec_jax.baselines.hscore import hscore_scores, hscore_shrinkage_scores
from know2vec_jax.baselines.leep import leep_scores
from know2vec_jax.baselines.logme import logme_scores
from know2vec_jax.baselines.nce import nce_scores
from know2vec_jax.baselines.nleep import nleep_scores

INPUTS = ("logits", "features", "knowledge", "ground_truth", "prototypes", "none")


@dataclasses.dataclass(frozen=True)
class Baseline:
  """One baseline of the registry.

  Attributes:
    fn: the scoring function. input "logits"/"features": ``fn(x [M, N, D], labels [N], K)``;
      "knowledge": ``fn(query_grid, query_mask, model_grids, model_masks)``;
      "ground_truth": ``fn(ground_truth_other_targets [T, M])``; "prototypes":
      ``fn(query_prototype [D], target_prototypes [T, D], ground_truth_other_targets [T, M])``;
      "none": ``fn(key, M)``.
    input: what it reads at query time: the zoo's logits (black-box), its penultimate features
      (white-box), the proxy's stored knowledge grids (no zoo call), the measured accuracy on
      other targets (with "prototypes": of the targets nearest the query in phi), or nothing.
    white_box: whether it needs access inside the models (features).
    reference: where the method comes from.
  """
  fn: Callable
  input: str
  white_box: bool
  reference: str

  def __post_init__(self):
    if self.input not in INPUTS:
      raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}")

  def forward_passes(self, num_models: int, num_images: int) -> int:
    """Zoo forward passes one query costs: every model on every target image for the methods
    that read logits or features (one pass yields both), none for the query-blind ones."""
    return int(num_models) * int(num_images) if self.input in ("logits", "features") else 0


BASELINES: dict[str, Baseline] = {
    "leep": Baseline(leep_scores, "logits", False, "Nguyen et al., ICML 2020"),
    "nce": Baseline(nce_scores, "logits", False, "Tran et al., ICCV 2019"),
    "nleep-logits": Baseline(nleep_scores, "logits", False, "Li et al., CVPR 2021"),
    "nleep-features (white-box)": Baseline(nleep_scores, "features", True, "Li et al., CVPR 2021"),
    "logme-logits": Baseline(logme_scores, "logits", False, "You et al., ICML 2021"),
    "logme-features (white-box)": Baseline(logme_scores, "features", True,
                                           "You et al., ICML 2021"),
    "hscore-logits": Baseline(hscore_scores, "logits", False, "Bao et al., ICIP 2019"),
    "hscore-features (white-box)": Baseline(hscore_scores, "features", True,
                                            "Bao et al., ICIP 2019"),
    "hscore-shrinkage-logits": Baseline(hscore_shrinkage_scores, "logits", False,
                                        "Ibrahim et al., ICLR 2022"),
    "hscore-shrinkage-features (white-box)": Baseline(hscore_shrinkage_scores, "features", True,
                                                      "Ibrahim et al., ICLR 2022"),
    "anchor-matching": Baseline(anchor_matching_scores, "knowledge", False,
                                "untrained: prototypes vs anchors in phi space"),
    "random": Baseline(random_scores, "none", False, "chance level"),
    "prior": Baseline(prior_scores, "ground_truth", False,
                      "query-blind: minus the mean rank on the other targets"),
    "source-aware prior": Baseline(functools.partial(source_aware_prior_scores, k=1),
                                   "prototypes", False,
                                   "the prior of the measured target nearest the query in phi"),
    "source-aware prior (5 nearest)": Baseline(
        functools.partial(source_aware_prior_scores, k=5), "prototypes", False,
        "the prior of the 5 measured targets nearest the query in phi"),
}


def _lookup(method: str) -> Baseline:
  if method not in BASELINES:
    raise BaselineInputError(f"unknown baseline {method!r}; known: {sorted(BASELINES)}")
  return BASELINES[method]


def forward_passes(method: str, num_models: int, num_images: int) -> int:
  """Zoo forward passes ``method`` needs for one query of ``num_images`` images on a zoo of
  ``num_models`` models (see :meth:`Baseline.forward_passes`)."""
  return _lookup(method).forward_passes(num_models, num_images)


@dataclasses.dataclass
class BaselineRun:
  """Scores of one baseline for one target, with its query-time cost.

  Attributes:
    scores: float32 [M], higher = expected to transfer better.
    seconds: wall time of the scoring alone (the zoo's forward passes are not included; on the
      first call for a new input shape it includes compilation).
    forward_passes: zoo forward passes the method needed.
    cpu_seconds: CPU time of this process over the same span, all threads together (less
      sensitive than wall time to other processes sharing the cores).
  """
  scores: np.ndarray
  seconds: float
  forward_passes: int
  cpu_seconds: float = float("nan")


def run_baseline(method: str, *, logits=None, features=None, labels=None,
                 num_target_classes: int | None = None, ground_truth_other_targets=None,
                 key=None, num_models: int | None = None, query_grid=None, query_mask=None,
                 model_grids=None, model_masks=None, query_prototype=None,
                 target_prototypes=None) -> BaselineRun:
  """Runs one registry entry with the inputs it reads, timing it on the host.

  Args:
    method: a key of :data:`BASELINES`.
    logits, features: float [M, N, Z] / [M, N, F] of the zoo on the target images (only the one
      the method reads is needed).
    labels, num_target_classes: the target task (for logits / features methods).
    ground_truth_other_targets: float [T, M] (for "prior" and the source-aware priors).
    query_prototype, target_prototypes: float [D] / [T, D] unit prototypes in phi
      (:func:`know2vec_jax.baselines.blind.task_prototype`; for the source-aware priors), the
      rows of ``target_prototypes`` matching those of ``ground_truth_other_targets``.
    key, num_models: PRNG key and M (for "random"; key defaults to ``jax.random.key(0)``).
    query_grid, query_mask, model_grids, model_masks: padded grids (for "knowledge" methods:
      :meth:`know2vec_jax.proxy.Proxy.query_grid` and ``model_grids``).

  Returns:
    A :class:`BaselineRun`.

  Raises:
    BaselineInputError: unknown method, a missing input, or any error of the method itself.
  """
  b = _lookup(method)
  t, cpu = time.perf_counter(), time.process_time()
  if b.input in ("logits", "features"):
    x = logits if b.input == "logits" else features
    if x is None or labels is None or num_target_classes is None:
      raise BaselineInputError(f"{method!r} needs {b.input}, labels and num_target_classes")
    scores = np.asarray(b.fn(x, labels, num_target_classes))
    passes = b.forward_passes(np.shape(x)[0], np.shape(x)[1])
  elif b.input == "knowledge":
    if any(a is None for a in (query_grid, query_mask, model_grids, model_masks)):
      raise BaselineInputError(f"{method!r} needs query_grid, query_mask, model_grids and "
                               "model_masks")
    scores = np.asarray(b.fn(query_grid, query_mask, model_grids, model_masks))
    passes = 0
  elif b.input == "ground_truth":
    if ground_truth_other_targets is None:
      raise BaselineInputError(f"{method!r} needs ground_truth_other_targets [T, M]")
    scores = np.asarray(b.fn(ground_truth_other_targets))
    passes = 0
  elif b.input == "prototypes":
    if any(a is None for a in (query_prototype, target_prototypes, ground_truth_other_targets)):
      raise BaselineInputError(f"{method!r} needs query_prototype [D], target_prototypes [T, D] "
                               "and ground_truth_other_targets [T, M]")
    scores = np.asarray(b.fn(query_prototype, target_prototypes, ground_truth_other_targets))
    passes = 0
  else:
    if num_models is None:
      raise BaselineInputError(f"{method!r} needs num_models")
    scores = np.asarray(b.fn(jax.random.key(0) if key is None else key, num_models))
    passes = 0
  return BaselineRun(scores, time.perf_counter() - t, passes, time.process_time() - cpu)
