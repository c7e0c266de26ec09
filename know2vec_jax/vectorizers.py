"""Model and query vectorizers (Flax NNX), importable into any JAX code.

Both sides see a *grid* of backbone features [K, K, D] with a class mask [K]:

- model side (:func:`know2vec_jax.knowledge.extract_knowledge` + phi): anchors on the diagonal,
  decision-boundary points off it;
- query side (:func:`query_grid`): class prototypes (mean phi of the shots) on the diagonal, and
  off it phi of the pixel midpoint of two classes' mean images: the query's own between-class
  points, mirroring the model's boundary points.

Variants:

- ``"attention"``: one token per class (its anchor / prototype plus the means of its grid row and
  column of boundary points); masked multi-head self-attention blocks; masked mean pool; linear to
  E; L2 normalisation. No positional information, so the vector is invariant to any permutation of
  the classes, and any K <= K_max works.
- ``"lstm"``: recurrent encoders laid out after the released code (model side: a BiLSTM reads each
  grid row, an LSTM reads the row vectors; query side: a BiLSTM over the class prototypes; L2
  normalisation). It is *not* the released code: here one BiLSTM with shared weights reads every
  row (the released code has one per row position), each sequence is summarised by its final
  carry (not the last step's output), initial states are zero (not random), and a linear layer maps
  to E on both sides. It depends on the order of the classes.

``shared=True`` (in :class:`Know2Vec`) applies *one* encoder to both sides: a query grid and a
model grid are then read by the same function (knowledge consistency taken literally), which
generalises to tasks the aligner never saw far better than two separate encoders
(docs/design.md, "What we measured").

The feature size D is not a config field: it is the backbone's, passed to the constructors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from know2vec_jax.config import require

VARIANTS = ("attention", "lstm")


@dataclasses.dataclass(frozen=True)
class VectorizerConfig:
  """Sizes and variant of the vectorizers.

  Attributes:
    variant: ``"attention"`` or ``"lstm"``.
    shared: one encoder for models and queries.
    hidden: width of tokens / LSTM states.
    embed_dim: E, the size of the output unit vectors.
    heads, layers: attention blocks.
    use_boundaries: read the off-diagonal cells (False: anchors/prototypes only).
  """
  variant: str = "attention"
  shared: bool = True
  hidden: int = 128
  embed_dim: int = 128
  heads: int = 4
  layers: int = 2
  use_boundaries: bool = True

  def __post_init__(self):
    require(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
    for name in ("hidden", "embed_dim", "heads", "layers"):
      require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
    require(self.hidden % self.heads == 0,
            f"hidden={self.hidden} must be divisible by heads={self.heads}")


def l2_normalize(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-6)


class AttentionBlock(nnx.Module):
  """Pre-LayerNorm masked multi-head self-attention + MLP."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.q = nnx.Linear(dim, dim, rngs=rngs)
    # No key bias: softmax over keys ignores a shift shared by all keys, so its gradient is exactly
    # zero and Adam would turn float noise into updates.
    self.k = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.v = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x, mask):
    """x [..., T, dim]; mask [..., T] (1 = valid token)."""
    *lead, t, d = x.shape
    h = self.heads
    xn = self.ln1(x)
    q, k, v = self.q(xn), self.k(xn), self.v(xn)
    split = lambda a: a.reshape(*lead, t, h, d // h)  # noqa: E731
    logits = jnp.einsum("...qhd,...khd->...hqk", split(q), split(k)) / jnp.sqrt(d // h)
    logits = jnp.where(mask[..., None, None, :] > 0, logits, -1e9)
    att = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("...hqk,...khd->...qhd", att, split(v)).reshape(*lead, t, d)
    x = x + self.out(y)
    return x + self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(x))))


class AttentionGridEncoder(nnx.Module):
  """Grid [..., K, K, D] + class mask [..., K] -> unit vector [..., E]; class-order invariant.

  One token per class: its diagonal cell (anchor / prototype), plus the mean of its row (its
  boundary points towards every other class) and of its column (the other classes' boundary
  points towards it), each through its own projection. K tokens rather than K^2 keep a 10-way grid
  cheap; the means are over valid classes only, so the token set is permuted, never changed, when
  the classes are.
  """

  def __init__(self, cfg: VectorizerConfig, feature_dim: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.diag = nnx.Linear(feature_dim, cfg.hidden, rngs=rngs)
    self.row = nnx.Linear(feature_dim, cfg.hidden, rngs=rngs)
    self.col = nnx.Linear(feature_dim, cfg.hidden, rngs=rngs)
    self.blocks = nnx.List([AttentionBlock(cfg.hidden, cfg.heads, rngs=rngs)
                            for _ in range(cfg.layers)])
    self.ln = nnx.LayerNorm(cfg.hidden, rngs=rngs)
    self.head = nnx.Linear(cfg.hidden, cfg.embed_dim, rngs=rngs)

  def __call__(self, grid, mask):
    k = grid.shape[-2]
    mask = mask.astype(grid.dtype)
    diag = jnp.moveaxis(jnp.diagonal(grid, axis1=-3, axis2=-2), -1, -2)  # [..., K, D]
    x = self.diag(diag)
    if self.cfg.use_boundaries:
      off = mask[..., :, None] * mask[..., None, :] * (1 - jnp.eye(k, dtype=grid.dtype))
      n = jnp.maximum(off.sum(-1), 1.0)[..., None]  # valid other classes (same for rows / cols)
      row = (off[..., None] * grid).sum(-2) / n  # mean of row i over j != i
      col = (off[..., None] * grid).sum(-3) / n  # mean of column j over i != j
      x = x + self.row(row) + self.col(col)
    for block in self.blocks:
      x = block(x, mask)
    x = self.ln(x)
    pooled = (x * mask[..., None]).sum(-2) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
    return l2_normalize(self.head(pooled))


def _bilstm(in_dim, hidden, rngs):
  return nnx.Bidirectional(nnx.RNN(nnx.LSTMCell(in_dim, hidden, rngs=rngs), rngs=False),
                           nnx.RNN(nnx.LSTMCell(in_dim, hidden, rngs=rngs), rngs=False),
                           return_carry=True, rngs=False)


def _zero_carry(batch: int, hidden: int):
  """The LSTM's zero initial (c, h): given explicitly so the RNNs hold no PRNG state."""
  z = jnp.zeros((batch, hidden), jnp.float32)
  return (z, z)


def _final_hidden(carry):
  """Concatenated final hidden states of a Bidirectional(return_carry=True) carry."""
  (c_f, h_f), (c_b, h_b) = carry
  del c_f, c_b
  return jnp.concatenate([h_f, h_b], axis=-1)


class LSTMGridEncoder(nnx.Module):
  """Model encoder: one shared BiLSTM reads each grid row, an LSTM reads the row vectors;
  order-dependent (see the module docstring for how it differs from the released code)."""

  def __init__(self, cfg: VectorizerConfig, feature_dim: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.rows = _bilstm(feature_dim, cfg.hidden, rngs)
    self.over_rows = nnx.RNN(nnx.LSTMCell(2 * cfg.hidden, cfg.hidden, rngs=rngs),
                             return_carry=True, rngs=False)
    self.head = nnx.Linear(cfg.hidden, cfg.embed_dim, rngs=rngs)

  def __call__(self, grid, mask):
    lead, k = grid.shape[:-3], grid.shape[-2]
    lengths = mask.sum(-1).astype(jnp.int32)
    if not self.cfg.use_boundaries:  # keep the diagonal (anchors) only
      grid = grid * jnp.eye(k, dtype=grid.dtype)[:, :, None]
    rows = grid.reshape(-1, k, grid.shape[-1])  # [N*K, K, D]
    row_len = jnp.repeat(lengths.reshape(-1), k)
    zero = _zero_carry(rows.shape[0], self.cfg.hidden)
    carry, _ = self.rows(rows, seq_lengths=row_len, initial_carry=(zero, zero))
    row_vec = _final_hidden(carry).reshape(-1, k, 2 * self.cfg.hidden)
    (_, h), _ = self.over_rows(row_vec, seq_lengths=lengths.reshape(-1),
                               initial_carry=_zero_carry(row_vec.shape[0], self.cfg.hidden))
    return l2_normalize(self.head(h)).reshape(*lead, -1)


class LSTMSetEncoder(nnx.Module):
  """Query encoder: a BiLSTM over the class prototypes (the grid's diagonal)."""

  def __init__(self, cfg: VectorizerConfig, feature_dim: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.lstm = _bilstm(feature_dim, cfg.hidden, rngs)
    self.head = nnx.Linear(2 * cfg.hidden, cfg.embed_dim, rngs=rngs)

  def __call__(self, grid, mask):
    lead, k = grid.shape[:-3], grid.shape[-2]
    protos = jnp.diagonal(grid, axis1=-3, axis2=-2)  # [..., D, K]
    protos = jnp.moveaxis(protos, -1, -2).reshape(-1, k, grid.shape[-1])
    zero = _zero_carry(protos.shape[0], self.cfg.hidden)
    carry, _ = self.lstm(protos, seq_lengths=mask.sum(-1).astype(jnp.int32).reshape(-1),
                         initial_carry=(zero, zero))
    return l2_normalize(self.head(_final_hidden(carry))).reshape(*lead, -1)


class ModelVectorizer(nnx.Module):
  """Knowledge grid features [..., K, K, D] + class mask [..., K] -> unit vector [..., E]."""

  def __init__(self, cfg: VectorizerConfig, feature_dim: int, *, rngs: nnx.Rngs):
    self.encoder = (AttentionGridEncoder(cfg, feature_dim, rngs=rngs)
                    if cfg.variant == "attention" else LSTMGridEncoder(cfg, feature_dim,
                                                                       rngs=rngs))

  def __call__(self, grid, mask):
    return self.encoder(grid, mask)


class QueryVectorizer(nnx.Module):
  """Query grid features [..., K, K, D] (prototypes on the diagonal) + mask -> unit vector."""

  def __init__(self, cfg: VectorizerConfig, feature_dim: int, *, rngs: nnx.Rngs):
    self.encoder = (AttentionGridEncoder(cfg, feature_dim, rngs=rngs)
                    if cfg.variant == "attention" else LSTMSetEncoder(cfg, feature_dim,
                                                                      rngs=rngs))

  def __call__(self, grid, mask):
    return self.encoder(grid, mask)


class AccuracyHead(nnx.Module):
  """Predicts a model's fine-tune accuracy on a query's task from the two unit vectors.

  An MLP on [q, m, q * m] with a sigmoid output: a calibrated estimate in [0, 1], which ranking
  scores (q . m) and training-free transferability metrics do not give.
  """

  def __init__(self, embed_dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(3 * embed_dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, q, m):
    """q [..., E] and m [..., E] (broadcastable) -> predicted accuracy [...]."""
    q, m = jnp.broadcast_arrays(q, m)
    h = jax.nn.gelu(self.fc1(jnp.concatenate([q, m, q * m], axis=-1)))
    return jax.nn.sigmoid(self.fc2(h)[..., 0])


class Know2Vec(nnx.Module):
  """Both vectorizers plus the task-id head used by the aligner's cross-entropy term.

  Args:
    cfg: the vectorizer config.
    feature_dim: D, the backbone's feature size (the grids' last axis).
    num_tasks: classes of the task-id head (the aligner's training tasks); 0 for none.
    accuracy_head: add an :class:`AccuracyHead` (trained by the transferability objective).
    rngs: initialisation PRNGs.
  """

  def __init__(self, cfg: VectorizerConfig, feature_dim: int, num_tasks: int = 0, *,
               accuracy_head: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.feature_dim = int(feature_dim)
    self.model_vectorizer = ModelVectorizer(cfg, feature_dim, rngs=rngs)
    self.query_vectorizer = None if cfg.shared else QueryVectorizer(cfg, feature_dim, rngs=rngs)
    self.task_head = nnx.Linear(cfg.embed_dim, max(num_tasks, 1), rngs=rngs)
    self.accuracy_head = (AccuracyHead(cfg.embed_dim, cfg.hidden, rngs=rngs)
                          if accuracy_head else None)

  def predict_accuracy(self, q, m):
    """Predicted fine-tune accuracy [...] of models ``m`` on query tasks ``q`` (unit vectors)."""
    if self.accuracy_head is None:
      raise ValueError("this Know2Vec was built without an accuracy head "
                       "(Know2Vec(..., accuracy_head=True))")
    return self.accuracy_head(q, m)

  def embed_models(self, grid, mask):
    """Model vectors [..., E] from knowledge-grid features."""
    return self.model_vectorizer(grid, mask)

  def embed_queries(self, grid, mask):
    """Query vectors [..., E] from query-grid features."""
    if self.query_vectorizer is None:
      return self.model_vectorizer(grid, mask)
    return self.query_vectorizer(grid, mask)


def pad_grid(grid, k_max: int):
  """Pads a [..., K, K, D] grid to [..., K_max, K_max, D] and returns (grid, mask [..., K_max])."""
  k = grid.shape[-2]
  if k > k_max:
    raise ValueError(f"{k} classes exceed the vectorizer's maximum of {k_max} (max_classes)")
  pad = [(0, 0)] * (grid.ndim - 3) + [(0, k_max - k), (0, k_max - k), (0, 0)]
  mask = jnp.concatenate([jnp.ones(grid.shape[:-3] + (k,)), jnp.zeros(grid.shape[:-3] +
                                                                      (k_max - k,))], -1)
  return jnp.pad(grid, pad), mask
