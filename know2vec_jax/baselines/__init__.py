"""Training-free baselines: every one scores the whole zoo for one labelled target task, batched
over the model axis (``name_scores(x [M, N, D], labels [N], K) -> [M]``; anchor matching reads
the proxy's knowledge grids instead). :data:`BASELINES` is the registry every experiment scores
through."""

from know2vec_jax.baselines.anchor import anchor_matching_scores
from know2vec_jax.baselines.blind import (prior_scores, random_scores, source_aware_accuracy,
                                          source_aware_prior_scores, task_prototype)
from know2vec_jax.baselines.checks import BaselineInputError
from know2vec_jax.baselines.hscore import hscore_scores, hscore_shrinkage_scores
from know2vec_jax.baselines.leep import leep_scores
from know2vec_jax.baselines.logme import logme_scores
from know2vec_jax.baselines.nce import nce_scores
from know2vec_jax.baselines.nleep import nleep_scores
from know2vec_jax.baselines.registry import (BASELINES, Baseline, BaselineRun, forward_passes,
                                             run_baseline)

__all__ = [
    "BASELINES", "Baseline", "anchor_matching_scores", "BaselineInputError", "BaselineRun", "forward_passes",
    "hscore_scores", "hscore_shrinkage_scores", "leep_scores", "logme_scores", "nce_scores",
    "nleep_scores", "prior_scores", "random_scores", "run_baseline", "source_aware_accuracy",
    "source_aware_prior_scores", "task_prototype",
]
