"""Training-free transferability / retrieval baselines that forward the query through the zoo."""

from know2vec_jax.baselines.leep import leep_scores
