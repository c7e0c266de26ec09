"""ModelIndex: the retrieval index of a model zoo (unit vectors plus metadata, never weights).

Each model of the zoo is one row: a unit vector of size ``dim`` (from the model vectorizer) and a
JSON-serialisable metadata dict, keyed by a unique string model id. Search is maximum inner product
(cosine, since rows are unit vectors) with ``jax.lax.top_k``; rows can be sharded across devices.

The float32 rows are the source of truth (saved bit for bit). What a search reads on the device is
a copy in the index's **storage** type (the ``storage`` argument, recorded in the manifest):

- ``float32``: the rows themselves (4 bytes per value); scores are exact.
- ``bfloat16``: 2 bytes per value.
- ``int8``: 1 byte per value plus a float32 scale per row (symmetric per-row quantisation,
  :func:`quantize_int8`); the query is quantised the same way and the product is int8 x int8
  with int32 accumulation.

A compressed search is two-stage, as faiss's ``IndexRefine`` and ScaNN's reordering: the device
keeps the ``rescore * k`` best rows by the compressed score, and those are re-scored exactly in
float32 from the host's float32 rows. The returned scores are therefore exact float32 cosines, and
the top k equals the exact search's except where a true top-k row scored outside the shortlist.
The cost is the host float32 copy (``M * dim * 4`` bytes, which the index keeps anyway) and a
gather of ``Q * rescore * k`` rows per search; the device holds only the compact copy.

An index built by a proxy also holds each model's **class knowledge**: its class tokens
[K_max, D] (mean phi of each class's anchors), their mask, and its label for every image of the
proxy's probe pool (uint8 [N]), and its H highest cosines to the proxy's reference queries
(float32 [H], best first: how close the model's vector ever comes to a query, which
:class:`know2vec_jax.retrieval.MatchConfig`'s ``hub_k`` subtracts from its cosine, so that
models whose vectors sit apart, e.g. of a family the aligner never saw, are not ranked down for
it). Retrieval (:class:`know2vec_jax.retrieval.Retriever`) then ranks in two stages: the vector
stage keeps a shortlist per query, and class-level matching (:mod:`know2vec_jax.classmatch`)
scores it. Rows hold class knowledge all or none; the index stores them and searches vectors,
scoring is retrieval's.

An index may also hold **its own pool**: unlabelled images (e.g. a zoo owner's images of their
domain) that it adds to its proxy's probe pool. Every row of such an index was probed on the
proxy's pool followed by these images (its anchors, boundary points and pool labels), and its
queries locate their classes in both; the proxy itself is not retrained. The pool is set on an
empty index (:meth:`ModelIndex.set_pool`), so that all rows are probed on the same images.

Layout of an index directory::

    index.json   manifest: format, version, dim, ids (row order), one metadata dict per model,
                 the class-knowledge shapes (or null), the checksum and shape of every array
    vectors/     orbax checkpoint of {"vectors": float32 [M, dim]} (absent when M == 0), whatever
                 the storage type (the compact copy is derived from it when searched)
    classes/     orbax checkpoint of {"tokens": float32 [M, K_max, D], "mask": float32
                 [M, K_max], "pool_labels": uint8 [M, N], "hub": float32 [M, H]} (only with class
                 knowledge)
    pool/        orbax checkpoint of {"images": float32 [N', H, W, C]}: the index's own pool
                 (only when it has one; the manifest's ``pool`` records its shape and provenance)

An index is written into a sibling temporary directory with the manifest last, then renamed into
place, so an interrupted save leaves any previous index at that path intact and loadable.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from know2vec_jax import classmatch
from know2vec_jax import storage as storage_io
from know2vec_jax.mesh import data_mesh

FORMAT = "know2vec-index"
# 3: class knowledge (tokens, mask, pool labels) beside the vectors; 4: hub cosines; 5: the
# storage type and rescore depth in the manifest (a version 4 index reads as float32 storage);
# 6: the index's own pool.
VERSION = 6
READABLE_VERSIONS = (4, 5, 6)
MANIFEST = "index.json"
VECTORS_DIR = "vectors"
CLASSES_DIR = "classes"
POOL_DIR = "pool"
CLASS_ARRAYS = ("tokens", "mask", "pool_labels", "hub")
STORAGES = ("float32", "bfloat16", "int8")
DTYPES = STORAGES  # the earlier name (storage was the ``dtype`` argument)
# A compressed search re-scores this many times k rows exactly, unless told otherwise: on random
# unit vectors (the hardest case: no cluster structure separates the top rows) recall@10 against
# exact float32 search is >= 0.99 at 10^6 rows of 256 values (benchmarks/retrieval.py).
RESCORE = 4
# Below this many rows one device answers a search faster than a cross-device gather costs.
SHARD_MIN_ROWS = 8192
# Fewest query rows of an int8 product (see _compact_queries).
INT8_MIN_QUERIES = 4
# Rows validated per step: bounds the float64 temporaries of a large batch (64 MiB at dim 128).
_CHUNK_ROWS = 1 << 16
# Rows quantised per step: a block of a few MiB stays in cache through the in-place steps.
_QUANT_ROWS = 4096


class IndexStoreError(ValueError):
  """An index operation that cannot be done (bad vectors, ids or files); the message says why."""


def quantize_int8(x) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric per-row int8 quantisation: ``x[i] ~= codes[i] * scales[i]``.

  Each row's scale is its largest magnitude / 127, so every row uses the whole code range
  whatever its norm. A zero row (or one whose scale underflows float32) gets scale 0 and zero
  codes: it decodes to zeros, never to NaN.

  Args:
    x: finite float array [n, d].

  Returns:
    ``(codes, scales)``: int8 [n, d] in -127..127 and float32 [n] >= 0.
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise IndexStoreError(f"int8 quantisation takes a matrix [n, d], got shape {list(x.shape)}")
  if not np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float64)
  codes = np.empty(x.shape, np.int8)
  scales = np.empty(x.shape[0], np.float32)
  step = _QUANT_ROWS
  for start in range(0, x.shape[0], step):
    # In the input's own precision: dividing by the row's peak first (never multiplying by
    # 127 / peak, which overflows for a tiny row) keeps every ratio in [-1, 1]. Small blocks,
    # in place: the work stays in cache.
    rows = x[start:start + step]
    if rows.shape[1]:
      peak = np.abs(np.maximum(rows.max(axis=1, keepdims=True),
                               -rows.min(axis=1, keepdims=True)))
    else:
      peak = np.zeros((len(rows), 1), rows.dtype)
    ratio = np.divide(rows, peak, out=np.zeros(rows.shape, rows.dtype), where=peak > 0)
    scale64 = peak[:, 0].astype(np.float64) / 127.0
    if np.any(scale64 > np.finfo(np.float32).max):
      row = start + int(np.argmax(scale64))
      raise IndexStoreError(f"row {row} has values up to {peak.max():.3g}: its int8 scale does "
                            "not fit in float32")
    scale = scale64.astype(np.float32)
    ratio *= 127
    block = codes[start:start + step]
    np.rint(ratio, out=ratio)
    block[...] = ratio
    # A row whose scale underflowed float32 decodes to zero: say so in its codes too.
    block[scale == 0] = 0
    scales[start:start + step] = scale
  return codes, scales


def _int8_device_layout(x: np.ndarray, m_pad: int, columns: bool
                        ) -> tuple[np.ndarray, np.ndarray]:
  """The int8 codes and scales of ``x`` [m, d], padded with zero rows to ``m_pad``: codes
  [m_pad, d], or [d, m_pad] with ``columns``. Written block by block into the final array, so a
  large index needs no second full-size copy of its codes."""
  m, d = x.shape
  codes = np.zeros((d, m_pad) if columns else (m_pad, d), np.int8)
  scales = np.zeros(m_pad, np.float32)
  for start in range(0, m, _CHUNK_ROWS):
    block, scale = quantize_int8(x[start:start + _CHUNK_ROWS])
    if columns:
      codes[:, start:start + len(block)] = block.T
    else:
      codes[start:start + len(block)] = block
    scales[start:start + len(block)] = scale
  return codes, scales


def _compact_queries(q: np.ndarray, storage: str) -> np.ndarray:
  """Queries [Q, E] as the compressed search reads them.

  Only each query's ranking of the rows matters before the exact re-scoring, and that ranking
  does not depend on the query's scale: every query is divided by its largest magnitude (a zero
  query stays zero, a tiny one does not vanish in bfloat16), and for int8 rounded to codes
  (x 127). Fewer than ``INT8_MIN_QUERIES`` int8 queries are padded with zero rows to that many:
  XLA:CPU lowers a one-row int8 product to a matrix-vector loop about 10x slower than its matrix
  kernel, which is fastest from 3-4 rows (measured on a 2-core x86-64 CPU).
  """
  peak = np.abs(q).max(axis=1, keepdims=True)
  unit = np.divide(q, peak, out=np.zeros_like(q), where=peak > 0)
  if storage != "int8":
    return unit
  codes = np.rint(unit * 127).astype(np.int8)
  if len(codes) < INT8_MIN_QUERIES:
    codes = np.concatenate([codes, np.zeros((INT8_MIN_QUERIES - len(codes), q.shape[1]),
                                            np.int8)])
  return codes


def _kernel(storage: str, platform: str) -> str:
  """The score kernel of a storage type on a platform: ``storage``, or ``int8_cols`` for int8 on
  CPU, whose codes are laid out [dim, M] (XLA:CPU's int8 product contracting the major axis
  took 0.7-0.8x the CPU time of the [M, dim] layout; other backends keep rows contiguous, the
  layout their int8 matrix units read without a transpose)."""
  return "int8_cols" if storage == "int8" and platform == "cpu" else storage


def _scores(queries: jax.Array, arrays: tuple, kernel: str) -> jax.Array:
  """[Q, E] x rows [M, E] -> [Q, M] float32 scores, read from the device copy ``arrays``
  (:func:`_kernel` names the layout).

  float32 and bfloat16: one product in the rows' dtype with float32 accumulation; one bfloat16
  query is instead a fused convert-multiply-reduce over the rows (XLA:CPU's bfloat16
  matrix-vector product is several times slower than float32's; the fused loop reads the
  2-byte rows once, measured 1.2-1.3x faster than float32's product). int8: int8 codes x int8
  query codes with int32 accumulation (exact: at most 127 * 127 * E), times each row's scale;
  the query's own scale is left out (it does not change a query's ranking).
  """
  dims = (((1,), (1,)), ((), ()))
  if kernel in ("int8", "int8_cols"):
    codes, scales = arrays  # codes [M, E], or [E, M] for int8_cols
    if kernel == "int8_cols":
      dims = (((1,), (0,)), ((), ()))
    dots = jax.lax.dot_general(queries, codes, dims, preferred_element_type=jnp.int32)
    return dots.astype(jnp.float32) * scales[None, :]
  (vectors,) = arrays
  if vectors.dtype == jnp.bfloat16 and queries.shape[0] == 1:
    return jnp.sum(vectors.astype(jnp.float32) * queries.astype(jnp.float32), axis=1)[None]
  return jax.lax.dot_general(queries.astype(vectors.dtype), vectors, dims,
                             preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("k", "kernel", "num_queries"))
def _search_single(queries: jax.Array, arrays: tuple, num_valid: jax.Array, k: int,
                   kernel: str, num_queries: int):
  """Top-k of one device's rows for the first ``num_queries`` queries (the rest are padding);
  columns at or past ``num_valid`` are padding and score -inf."""
  scores = _scores(queries, arrays, kernel)[:num_queries]
  col = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
  scores = jnp.where(col < num_valid, scores, -jnp.inf)
  return jax.lax.top_k(scores, k)


def _row_specs(kernel: str) -> tuple:
  """How each device array of a kernel is sharded: along its rows axis."""
  if kernel == "int8_cols":
    return PartitionSpec(None, "data"), PartitionSpec("data")
  if kernel == "int8":
    return PartitionSpec("data", None), PartitionSpec("data")
  return (PartitionSpec("data", None),)


@functools.lru_cache(maxsize=64)
def _sharded_search_fn(mesh: jax.sharding.Mesh, k_local: int, k: int, kernel: str = "float32",
                       num_queries: int | None = None) -> Callable:
  """A jitted search over rows sharded on the mesh's ``data`` axis (one compile per mesh, k and
  kernel, :func:`_kernel`).

  Each device takes the top ``k_local`` of its own rows, the candidates (n * k_local per query,
  not the whole [Q, M] score matrix) are gathered, and a second top_k picks the global best. Ties
  resolve as in one device's top_k: candidates are gathered in shard order, each shard's in row
  order, and top_k prefers the earlier position, so the lower row index wins. The mesh may span
  the devices of several processes: the rows are sharded over all of them and the result is
  replicated on each.
  """
  def local(queries, arrays, num_valid):
    rows = arrays[-1].shape[0]  # the vectors [rows, E], or the int8 scales [rows]
    scores = _scores(queries, arrays, kernel)[:num_queries]
    offset = jax.lax.axis_index("data") * rows
    col = offset + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    scores = jnp.where(col < num_valid, scores, -jnp.inf)
    vals, idx = jax.lax.top_k(scores, k_local)
    vals = jax.lax.all_gather(vals, "data", axis=1, tiled=True)
    idx = jax.lax.all_gather(idx + offset, "data", axis=1, tiled=True)
    top, pos = jax.lax.top_k(vals, k)
    return top, jnp.take_along_axis(idx, pos, axis=1)

  spec_rows = _row_specs(kernel)
  # The final top_k runs redundantly on every device, so the outputs are replicated and unvarying
  # along "data"; check_vma cannot see that through top_k of gathered values.
  fn = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), spec_rows, PartitionSpec()),
                     out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
  return jax.jit(fn)


def _storage_name(value: Any) -> str:
  """A storage type's canonical name ("float32", "bfloat16" or "int8"); IndexStoreError if none."""
  try:
    name = jnp.dtype(value).name
  except TypeError:
    name = None
  if name not in STORAGES:
    raise IndexStoreError(f"unknown index storage {value!r}; use one of {', '.join(STORAGES)} "
                          "(the dtype of the searched copy)")
  return name


def _storage_arg(storage: Any, dtype: Any) -> str | None:
  """The storage type named by ``storage`` or by its earlier name ``dtype`` (None if neither)."""
  if storage is not None and dtype is not None and _storage_name(storage) != _storage_name(dtype):
    raise IndexStoreError(f"storage={storage!r} and dtype={dtype!r} (its earlier name) disagree; "
                          "pass storage alone")
  value = storage if storage is not None else dtype
  return None if value is None else _storage_name(value)


def _rescore_depth(value: Any) -> int:
  """A valid ``rescore`` factor (a positive int); IndexStoreError if not."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise IndexStoreError(f"rescore must be a positive int (the shortlist is rescore * k rows), "
                          f"got {value!r}")
  return int(value)


def check_k(k: Any, error: type[Exception] = IndexStoreError) -> None:
  """Refuses a ``k`` (how many models to return per query) that is not a positive int.

  Args:
    k: the value to check.
    error: the exception class to raise (the caller's own: the index's or the proxy's).

  Raises:
    ``error``: ``k`` is a bool, not an int, or below 1.
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise error(f"k must be a positive integer, got {k!r}")


def _json_copy(obj: Any, what: str) -> Any:
  """``obj`` as it reads back from JSON (so a loaded index equals the saved one)."""
  try:
    return json.loads(json.dumps(obj, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise IndexStoreError(f"{what} is not JSON-serialisable: {e}") from e


class ModelIndex:
  """Unit vectors [M, dim] (float32) plus one metadata dict per model, keyed by model id.

  Rows keep insertion order. The host copy is the source of truth (float32, saved bit for bit);
  searches use a cached device copy in the index's storage type (float32, bfloat16 or int8; see
  the module docstring), sharded across devices, that is rebuilt only after :meth:`add_vectors`,
  :meth:`remove` or :meth:`set_storage`.
  """

  def __init__(self, dim: int, *, storage: str | None = None, rescore: int = RESCORE,
               devices: Sequence[jax.Device] | None = None,
               shard_min_rows: int = SHARD_MIN_ROWS, dtype: str | None = None):
    """Creates an empty index.

    Args:
      dim: vector size E (the model vectorizer's output size).
      storage: what the device copy searched holds: "float32" (default; exact), "bfloat16"
        (2 bytes per value) or "int8" (1 byte per value and a scale per row). The stored, saved
        vectors are float32 whatever the storage; scores are always returned in float32, exact
        (compressed storage re-scores its shortlist from the float32 rows).
      rescore: for compressed storage, how many times k rows per query the compressed stage
        keeps for exact re-scoring (faiss's ``k_factor``; ignored for float32).
      devices: devices to search on; default ``jax.devices()`` (those of every process). With
        more than one, rows are sharded across them once the index holds ``shard_min_rows`` rows.
      shard_min_rows: the number of rows from which a multi-device search is sharded.
      dtype: the earlier name of ``storage`` (either may be given; not both with different
        values).
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
      raise IndexStoreError(f"index vector size must be a positive int, got {dim!r}")
    storage = _storage_arg(storage, dtype) or "float32"
    if devices is not None and len(devices) == 0:
      raise IndexStoreError("devices must name at least one device (or be None for all)")
    self._dim = int(dim)
    self._storage = storage
    self._rescore = _rescore_depth(rescore)
    self._devices = tuple(devices) if devices is not None else None
    self._shard_min_rows = int(shard_min_rows)
    self._ids: list[str] = []
    self._row: dict[str, int] = {}
    self._meta: list[dict] = []
    self._vectors = np.zeros((0, self._dim), np.float32)
    self._classes: dict[str, np.ndarray] | None = None  # CLASS_ARRAYS, one row per model
    # (device arrays: (vectors,) or (int8 codes, scales); num_valid on device; mesh or None)
    self._device_state = None
    self._device_classes = None  # classmatch.ClassKnowledge, built on the first query
    self._device_match: dict = {}  # hub_k -> (float32 vectors, hub offsets) on the device
    self._pool: np.ndarray | None = None  # the index's own pool images [N', H, W, C]
    self._pool_provenance: list[dict] = []
    self._proxies: dict[str, dict] = {}  # fingerprint -> what that proxy was built from

  # ---- read access -------------------------------------------------------------------------

  @property
  def dim(self) -> int:
    """Vector size E."""
    return self._dim

  @property
  def storage(self) -> str:
    """What the searched device copy holds: "float32", "bfloat16" or "int8"."""
    return self._storage

  @property
  def dtype(self) -> str:
    """The earlier name of :attr:`storage`."""
    return self._storage

  @property
  def rescore(self) -> int:
    """For compressed storage, the shortlist a search re-scores exactly, in multiples of k."""
    return self._rescore

  def set_storage(self, storage: str, rescore: int | None = None) -> None:
    """Changes the storage type (and optionally the rescore depth) of the searched copy.

    The float32 rows are kept, so this converts in either direction without loss; the device
    copy is rebuilt at the next search, and the next :meth:`save` records the new type.

    Args:
      storage: "float32", "bfloat16" or "int8".
      rescore: a new rescore factor; None keeps the current one.

    Raises:
      IndexStoreError: an unknown storage type or a rescore factor that is not a positive int.
    """
    storage = _storage_name(storage)
    self._rescore = _rescore_depth(rescore) if rescore is not None else self._rescore
    if storage != self._storage:
      self._storage = storage
      self._device_state = None

  @property
  def ids(self) -> list[str]:
    """Model ids in row (insertion) order; a copy."""
    return list(self._ids)

  def __len__(self) -> int:
    return len(self._ids)

  def __contains__(self, model_id: object) -> bool:
    return model_id in self._row

  @property
  def vectors(self) -> np.ndarray:
    """The unit vectors, float32 [M, dim], row i for ``ids[i]`` (a read-only view)."""
    view = self._vectors.view()
    view.flags.writeable = False  # writes would bypass the device cache's invalidation
    return view

  @property
  def has_classes(self) -> bool:
    """Whether the rows hold class knowledge (so retrieval can score classes)."""
    return self._classes is not None

  @property
  def classes(self) -> dict[str, np.ndarray] | None:
    """The class knowledge (``tokens``, ``mask``, ``pool_labels``, one row per model), read-only
    views; None when the index holds none."""
    if self._classes is None:
      return None
    out = {}
    for name, a in self._classes.items():
      out[name] = a.view()
      out[name].flags.writeable = False
    return out

  def metadata(self, model_id: str) -> dict:
    """A copy of one model's metadata dict.

    Args:
      model_id: the model's id.

    Returns:
      The metadata dict given when the model was added (as it round-trips through JSON).
    """
    return json.loads(json.dumps(self._meta[self._lookup(model_id)]))

  def _lookup(self, model_id: str) -> int:
    try:
      return self._row[model_id]
    except (KeyError, TypeError):
      raise IndexStoreError(f"unknown model id {model_id!r}: not in the index "
                            f"({len(self)} models)") from None

  @property
  def num_shards(self) -> int:
    """How many devices the next search uses (1 unless rows are sharded)."""
    devices = self._devices or tuple(jax.devices())
    if len(devices) > 1 and len(self) >= max(self._shard_min_rows, 1):
      return len(devices)
    return 1

  # ---- mutation ------------------------------------------------------------------------------

  def add_vectors(self, ids: Sequence[str], vectors, metadata: Sequence[dict] | None = None,
                  classes: dict | None = None) -> None:
    """Adds models; their vectors are L2-normalised before they are stored.

    Nothing is added unless every row is valid.

    Args:
      ids: n new, unique, non-empty model ids.
      vectors: array-like [n, dim] of finite, non-zero vectors.
      metadata: n JSON-serialisable dicts, or None for empty dicts.
      classes: the models' class knowledge, ``{"tokens": float [n, K_max, D], "mask": [n,
        K_max], "pool_labels": int [n, N], "hub": float [n, H]}`` (what :meth:`know2vec_jax.proxy.Proxy.build_index`
        gives); required when the index already holds class knowledge, refused when it holds
        rows without.

    Raises:
      IndexStoreError: wrong shape, NaN/inf or zero vector, duplicate or invalid id, bad metadata,
        class knowledge missing, unexpected or of another shape.
    """
    if isinstance(ids, str):
      raise IndexStoreError(f"ids must be a list of model ids, got the string {ids!r}")
    ids = list(ids)
    for i in ids:
      if not isinstance(i, str) or not i:
        raise IndexStoreError(f"model ids must be non-empty strings, got {i!r}")
    try:
      arr = np.asarray(vectors)
    except Exception as e:  # ragged lists, objects, ...
      raise IndexStoreError(f"vectors are not an array: {e}") from e
    if arr.dtype.kind not in "fiub" and arr.dtype != jnp.bfloat16:
      raise IndexStoreError(f"vectors must be numeric, got dtype {arr.dtype}")
    if arr.shape != (len(ids), self._dim):
      raise IndexStoreError(f"vectors must have shape [n, dim] = {[len(ids), self._dim]} for "
                            f"{len(ids)} ids, got {list(arr.shape)}")
    seen = set()
    for i in ids:
      if i in seen:
        raise IndexStoreError(f"duplicate model id {i!r} in this call")
      if i in self._row:
        raise IndexStoreError(f"model id {i!r} is already in the index")
      seen.add(i)
    if metadata is None:
      metas = [{} for _ in ids]
    else:
      metas = list(metadata)
      if len(metas) != len(ids):
        raise IndexStoreError(f"got {len(metas)} metadata dicts for {len(ids)} ids")
      for i, m in zip(ids, metas):
        if not isinstance(m, dict):
          raise IndexStoreError(f"metadata of {i!r} must be a dict, got {type(m).__name__}")
      metas = [_json_copy(m, f"metadata of {i!r}") for i, m in zip(ids, metas)]
    # float64 for the checks and the norm: a float32 square could overflow, and a value that is
    # finite in float64 may not be in float32. In chunks of rows, so that a large batch needs no
    # float64 copy of the whole of it; every row is checked for finite values before any norm.
    f32_max = float(np.finfo(np.float32).max)
    for start in range(0, len(ids), _CHUNK_ROWS):
      rows = arr[start:start + _CHUNK_ROWS].astype(np.float64)
      bad = np.flatnonzero(~np.all(np.isfinite(rows) & (np.abs(rows) <= f32_max), axis=1))
      if bad.size:
        raise IndexStoreError(f"vector of {ids[start + bad[0]]!r} has non-finite values (NaN or "
                              "inf)")
    unit = np.empty((len(ids), self._dim), np.float32)
    for start in range(0, len(ids), _CHUNK_ROWS):
      rows = arr[start:start + _CHUNK_ROWS].astype(np.float64)
      norms = np.linalg.norm(rows, axis=1)
      zero = np.flatnonzero(norms == 0)
      if zero.size:
        raise IndexStoreError(f"vector of {ids[start + zero[0]]!r} is zero; it has no direction "
                              "to normalise")
      unit[start:start + _CHUNK_ROWS] = rows / norms[:, None]
    new_classes = self._check_classes(classes, len(ids))
    self._vectors = (unit if not len(self) else
                     np.concatenate([self._vectors, unit], axis=0))
    if new_classes is not None:
      self._classes = (new_classes if self._classes is None else
                       {n: np.concatenate([self._classes[n], new_classes[n]]) for n in CLASS_ARRAYS})
    for i, m in zip(ids, metas):
      self._row[i] = len(self._ids)
      self._ids.append(i)
      self._meta.append(m)
    self._device_state = None
    self._device_classes = None
    self._device_match = {}

  def _check_classes(self, classes: dict | None, n: int) -> dict | None:
    """Validated class knowledge of n new rows (None when there is none)."""
    if classes is None:
      if self._classes is not None:
        raise IndexStoreError("this index holds class knowledge for every model; new models need "
                              "theirs too (add them with Proxy.build_index)")
      return None
    if len(self) and self._classes is None:
      raise IndexStoreError("this index holds models without class knowledge; models with it "
                            "cannot join them (build a new index with Proxy.build_index)")
    if not isinstance(classes, dict) or set(classes) != set(CLASS_ARRAYS):
      raise IndexStoreError(f"classes must be a dict with keys {list(CLASS_ARRAYS)}")
    tokens = np.asarray(classes["tokens"], np.float32)
    mask = np.asarray(classes["mask"], np.float32)
    labels = np.asarray(classes["pool_labels"])
    hub = np.asarray(classes["hub"], np.float32)
    if tokens.ndim != 3 or tokens.shape[0] != n or mask.shape != tokens.shape[:2] \
        or labels.ndim != 2 or labels.shape[0] != n or hub.ndim != 2 or hub.shape[0] != n:
      raise IndexStoreError(f"class knowledge must be tokens [n, K_max, D], mask [n, K_max], "
                            f"pool_labels [n, N] and hub [n, H] for n = {n} models, got "
                            f"{list(tokens.shape)}, {list(mask.shape)}, {list(labels.shape)}, "
                            f"{list(hub.shape)}")
    if self._classes is not None:
      have = (self._classes["tokens"].shape[1:], self._classes["pool_labels"].shape[1],
              self._classes["hub"].shape[1])
      if (tokens.shape[1:], labels.shape[1], hub.shape[1]) != have:
        raise IndexStoreError(f"class knowledge of shape tokens {list(tokens.shape[1:])}, pool "
                              f"{labels.shape[1]}, hub {hub.shape[1]} does not match the index's "
                              f"tokens {list(have[0])}, pool {have[1]}, hub {have[2]}: it comes "
                              "from another proxy")
    if not np.all(np.isfinite(tokens)) or not np.all(np.isfinite(hub)):
      raise IndexStoreError("class tokens or hub cosines hold NaN or inf")
    k = mask.sum(1)
    if np.any(k < 1) or np.any(labels < 0) or np.any(labels >= np.maximum(k, 1)[:, None]):
      raise IndexStoreError("class knowledge is inconsistent: every model needs at least one "
                            "class in its mask and pool labels in 0..K-1")
    return {"tokens": tokens, "mask": mask, "pool_labels": labels.astype(np.uint8), "hub": hub}

  def add(self, model_id: str, vectorize_fn: Callable[..., Any], *args,
          metadata: dict | None = None) -> np.ndarray:
    """Vectorizes one model with ``vectorize_fn(*args)`` and adds it (no retraining needed).

    Args:
      model_id: the new model's id.
      vectorize_fn: returns the model's vector, [dim] or [1, dim] (e.g. a trained vectorizer).
      *args: passed to ``vectorize_fn``.
      metadata: the model's JSON-serialisable metadata.

    Returns:
      The stored unit vector [dim].

    Raises:
      IndexStoreError: as :meth:`add_vectors`.
    """
    if not isinstance(model_id, str) or not model_id:
      raise IndexStoreError(f"model ids must be non-empty strings, got {model_id!r}")
    if model_id in self._row:  # before paying for the vectorization
      raise IndexStoreError(f"model id {model_id!r} is already in the index")
    vec = np.asarray(vectorize_fn(*args))
    if vec.shape == (self._dim,):
      vec = vec[None]
    elif vec.shape != (1, self._dim):
      raise IndexStoreError(f"vectorize_fn returned shape {list(vec.shape)} for {model_id!r}; "
                            f"expected [{self._dim}] or [1, {self._dim}]")
    self.add_vectors([model_id], vec, None if metadata is None else [metadata])
    return self._vectors[-1].copy()

  def remove(self, ids: str | Sequence[str]) -> None:
    """Removes models (their rows and metadata); the other rows keep their order.

    Args:
      ids: one model id or a list of them.

    Raises:
      IndexStoreError: an id is not in the index (then nothing is removed).
    """
    try:
      ids = [ids] if isinstance(ids, str) else list(ids)
    except TypeError:
      raise IndexStoreError(f"ids must be a model id or a list of them, got {ids!r}") from None
    drop = {self._lookup(i) for i in ids}
    if not drop:
      return
    keep = [r for r in range(len(self._ids)) if r not in drop]
    self._vectors = self._vectors[keep]
    if self._classes is not None:
      self._classes = {n: a[keep] for n, a in self._classes.items()} if keep else None
    self._ids = [self._ids[r] for r in keep]
    self._meta = [self._meta[r] for r in keep]
    self._row = {i: r for r, i in enumerate(self._ids)}
    self._device_state = None
    self._device_classes = None
    self._device_match = {}

  # ---- search --------------------------------------------------------------------------------

  def _place(self):
    """Copies the vectors, in the storage type, to the device(s) once; reused by every search
    until the next change."""
    devices = self._devices or tuple(jax.devices())
    m = len(self)
    n = self.num_shards
    kernel = self._kernel()
    # Sharded rows are padded to a multiple of the device count; padded rows are masked to -inf
    # before top_k.
    m_pad = math.ceil(m / n) * n
    if self._storage == "int8":
      host = _int8_device_layout(self._vectors, m_pad, kernel == "int8_cols")
    else:
      host = (self._vectors.astype(jnp.dtype(self._storage), copy=False),)
      if m_pad > m:
        host = (np.concatenate([host[0], np.zeros((m_pad - m, self._dim), host[0].dtype)]),)
    if n > 1:
      # One mesh over the devices of every process: device_put places each process's own shards.
      mesh = data_mesh(devices=devices)
      arrays = tuple(jax.device_put(a, NamedSharding(mesh, spec))
                     for a, spec in zip(host, _row_specs(kernel)))
      num_valid = jax.device_put(np.int32(m), NamedSharding(mesh, PartitionSpec()))
    else:
      mesh = None
      # This process's own device: another process's is not addressable from here.
      device = next((d for d in devices if d.process_index == jax.process_index()), devices[0])
      arrays = tuple(jax.device_put(a, device) for a in host)
      num_valid = jax.device_put(np.int32(m), device)
    self._device_state = (arrays, num_valid, mesh)
    return self._device_state

  def _kernel(self) -> str:
    """The score kernel for this storage on the search devices' platform (:func:`_kernel`)."""
    return _kernel(self._storage, (self._devices or jax.devices())[0].platform)

  def _rescore_exact(self, q: np.ndarray, rows: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's shortlist ``rows`` [Q, R] by exact score, from the float32 rows.

    Each score is the float32 rounding of the dot product accumulated in float64; equal scores
    resolve to the lower row index, as the float32 search's top_k does.
    """
    cand = self._vectors[rows].astype(np.float64)  # [Q, R, E]: Q * R rows gathered, not M
    exact = np.matmul(cand, q.astype(np.float64)[:, :, None])[..., 0].astype(np.float32)
    order = np.lexsort((rows, -exact), axis=1)[:, :k]
    return np.take_along_axis(exact, order, 1), np.take_along_axis(rows, order, 1)

  def check_queries(self, queries) -> np.ndarray:
    """``queries`` as float32 [Q, dim] (a 1-D query becomes Q = 1); IndexStoreError naming the
    problem for a non-float array, a wrong shape or a non-finite query."""
    try:
      q = np.asarray(queries, dtype=np.float32)
    except Exception as e:
      raise IndexStoreError(f"queries are not a float array: {e}") from e
    if q.ndim == 1:
      q = q[None]
    if q.ndim != 2 or q.shape[1] != self._dim:
      raise IndexStoreError(f"queries must have shape [{self._dim}] or [Q, {self._dim}] for this "
                            f"index, got {list(np.shape(queries))}")
    bad = np.flatnonzero(~np.all(np.isfinite(q), axis=1))
    if bad.size:
      raise IndexStoreError(f"query {int(bad[0])} has non-finite values (NaN or inf)")
    return q

  def search(self, queries, k: int = 10, *, rescore: int | None = None
             ) -> tuple[np.ndarray, list[list[str]]]:
    """The k best models per query by dot product (cosine for unit queries), best first.

    With float32 storage the device search is exact. With bfloat16 or int8 storage the device
    keeps each query's ``rescore * k`` best rows by the compressed score, and those are re-scored
    exactly from the float32 rows: the scores returned are exact float32 dot products, and a row
    is missed only when its compressed score fell outside the shortlist.

    Args:
      queries: float [dim] (one query) or [Q, dim], finite.
      k: how many models to return per query; k' = min(k, len(self)) are returned.
      rescore: the shortlist factor for this call (default: the index's :attr:`rescore`).

    Returns:
      ``(scores, ids)``: float32 scores [Q, k'] (Q = 1 for a 1-D query), descending along each
      row, and for each query the k' model ids in the same order. Equal scores resolve to the
      earlier-added model.

    Raises:
      IndexStoreError: wrong query shape, non-finite query, k < 1, rescore < 1.
    """
    check_k(k)
    depth = self._rescore if rescore is None else _rescore_depth(rescore)
    q = self.check_queries(queries)
    kk = min(int(k), len(self))
    nq = q.shape[0]
    if kk == 0 or nq == 0:
      return np.zeros((nq, kk), np.float32), [[] for _ in range(nq)]
    exact = self._storage == "float32"
    r = kk if exact else min(kk * depth, len(self))  # the device's shortlist per query
    arrays, num_valid, mesh = self._device_state or self._place()
    q_host = q if exact else _compact_queries(q, self._storage)
    kernel = self._kernel()
    if mesh is None:
      q_dev = jax.device_put(q_host, next(iter(arrays[0].devices())))
      scores, idx = _search_single(q_dev, arrays, num_valid, r, kernel, nq)
    else:
      rows_per_shard = arrays[-1].shape[0] // mesh.size
      fn = _sharded_search_fn(mesh, min(r, rows_per_shard), r, kernel, nq)
      q_dev = jax.device_put(q_host, NamedSharding(mesh, PartitionSpec()))
      scores, idx = fn(q_dev, arrays, num_valid)
    scores, idx = np.asarray(scores), np.asarray(idx)
    # Padding scores -inf and so can never outrank one of the r real rows; this guards the logic.
    assert idx.size == 0 or idx.max() < len(self), "search returned a padding row"
    if not exact:
      scores, idx = self._rescore_exact(q, idx, kk)
    return scores, [[self._ids[j] for j in row] for row in idx]

  def rows_of(self, ids: Sequence[Sequence[str]]) -> np.ndarray:
    """int [Q, R] the row numbers of ``ids`` (per query, R model ids, as :meth:`search` gives)."""
    return np.asarray([[self._row[i] for i in row] for row in ids], np.int64).reshape(
        len(ids), -1)

  def ids_at(self, rows) -> list[list[str]]:
    """The model ids of row numbers ``rows`` [Q, R] (no copy of the whole id list)."""
    return [[self._ids[j] for j in row] for row in rows]

  def class_knowledge(self) -> classmatch.ClassKnowledge:
    """Every row's class knowledge as class scoring reads it, resident on the device: built on
    the first call after a change, so that a query moves only its own indices.

    Raises:
      IndexStoreError: an index without class knowledge.
    """
    if self._classes is None:
      raise IndexStoreError("this index holds no class knowledge (it was not built by "
                            "Proxy.build_index)")
    if self._device_classes is None:
      self._device_classes = classmatch.ClassKnowledge.from_arrays(
          self._classes["tokens"], self._classes["mask"], self._classes["pool_labels"])
    return self._device_classes

  def match_arrays(self, hub_k: int) -> tuple[jax.Array, jax.Array]:
    """The rows as the default query's device scorer reads them, resident on the device: built
    on the first call after a change, so that a query moves only its own vectors.

    Args:
      hub_k: the hub correction's k (:meth:`hub_offsets`; 0: no correction, zeros).

    Returns:
      (float32 [M, dim] the unit vectors, float32 [M] the hub offsets).
    """
    k = int(hub_k)
    if k not in self._device_match:
      hub = self.hub_offsets(k)
      hub = np.zeros(len(self), np.float32) if hub is None else np.asarray(hub, np.float32)
      self._device_match[k] = (jnp.asarray(self._vectors, jnp.float32), jnp.asarray(hub))
    return self._device_match[k]

  def hub_offsets(self, k: int) -> np.ndarray | None:
    """Each model's mean of its ``k`` highest cosines to the proxy's reference queries
    (float32 [M]), what centred retrieval subtracts from q . m; None when ``k`` is 0.

    This is the hubness correction of cross-domain similarity local scaling (CSLS; Conneau et
    al., "Word translation without parallel data", ICLR 2018), on the model side: a model whose
    vector sits close to many queries (a hub) is not preferred for it, and one whose vector sits
    apart from every query the aligner was trained on is not penalised for it.
    """
    if not k:
      return None
    if self._classes is None:
      raise IndexStoreError("hub correction needs the class knowledge of an index built by "
                            "Proxy.build_index")
    hub = self._classes["hub"]
    return hub[:, :min(int(k), hub.shape[1])].mean(1) if hub.shape[1] else np.zeros(len(self),
                                                                                     np.float32)

  # ---- the index's own pool ----------------------------------------------------------------

  @property
  def pool(self) -> np.ndarray | None:
    """The images this index adds to its proxy's probe pool (float32 [N', H, W, C]), or None."""
    return self._pool

  @property
  def pool_provenance(self) -> list[dict]:
    """What the index's own pool was built from (:mod:`know2vec_jax.pool`'s provenance)."""
    return [dict(p) for p in self._pool_provenance]

  @property
  def proxies(self) -> dict[str, dict]:
    """Proxy fingerprint -> what that proxy (which vectorized rows of this index) was built
    from: its probe pool's entries and phi's training data (:attr:`know2vec_jax.proxy.Proxy.
    provenance`)."""
    return json.loads(json.dumps(self._proxies))

  def record_proxy(self, fingerprint: str, provenance: dict) -> None:
    """Records what the proxy with ``fingerprint`` was built from (see :attr:`proxies`)."""
    self._proxies[str(fingerprint)] = _json_copy(provenance, "proxy provenance")

  def set_pool(self, images, provenance: Sequence[dict] = ()) -> None:
    """Gives an empty index its own pool: images its rows are probed on beside the proxy's pool.

    Args:
      images: float32 [N', H, W, C] in [0, 1], N' >= 1.
      provenance: what the images are (one dict per entry), recorded in the manifest.

    Raises:
      IndexStoreError: an index that already holds rows or a pool, or bad images.
    """
    if len(self):
      raise IndexStoreError(f"an index's pool is set while it is empty (this one holds {len(self)} "
                            "models, probed without it): build a new index with the pool")
    if self._pool is not None:
      raise IndexStoreError("this index already has its own pool")
    x = np.asarray(images)
    if x.ndim != 4 or not len(x) or not np.issubdtype(x.dtype, np.floating):
      raise IndexStoreError(f"an index's pool must be float images [N, H, W, C] with N >= 1, got "
                            f"{x.dtype} {list(x.shape)}")
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
      raise IndexStoreError("an index's pool images must be finite and in [0, 1]")
    self._pool = np.ascontiguousarray(x, np.float32)
    self._pool_provenance = _json_copy(list(provenance), "pool provenance")

  def _unset_pool(self) -> None:
    """Takes back the pool :meth:`set_pool` gave this (still empty) index, when the call that
    set it fails before adding any row."""
    assert not len(self), "an index with rows keeps its pool"
    self._pool, self._pool_provenance = None, []

  # ---- storage -------------------------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the index atomically (vectors with orbax-checkpoint, the rest as JSON).

    The float32 rows are written whatever the storage type; the manifest records the storage
    type and the rescore factor, which :meth:`load` restores.

    Args:
      path: the index directory (created, or replaced once the new index is complete).

    Returns:
      The absolute path written.
    """
    classes = None
    if self._classes is not None:
      t = self._classes["tokens"]
      classes = {"max_classes": t.shape[1], "token_dim": t.shape[2],
                 "pool_size": self._classes["pool_labels"].shape[1],
                 "hub_depth": self._classes["hub"].shape[1]}
    manifest = {"format": FORMAT, "version": VERSION, "dim": self._dim,
                "num_vectors": len(self), "vectors_dtype": "float32", "storage": self._storage,
                "rescore": self._rescore, "ids": self._ids, "metadata": self._meta,
                "classes": classes,
                "pool": None if self._pool is None else {
                    "shape": list(self._pool.shape), "provenance": self._pool_provenance},
                "proxies": self._proxies}
    # orbax cannot save a zero-size array: an empty index is its manifest alone.
    trees = {VECTORS_DIR: {"vectors": np.array(self._vectors)}} if len(self) else {}
    if classes is not None:
      trees[CLASSES_DIR] = {n: np.array(a) for n, a in self._classes.items()}
    if self._pool is not None:
      trees[POOL_DIR] = {"images": self._pool}
    return storage_io.save_artifact(path, trees, MANIFEST, manifest)

  @classmethod
  def load(cls, path: str | os.PathLike, expected_dim: int | None = None,
           storage: str | None = None, **kwargs) -> "ModelIndex":
    """Loads a saved index, bit for bit, with the storage type and rescore factor it was saved
    with (an index of format version 4, which recorded none, loads as float32).

    Args:
      path: the index directory.
      expected_dim: if given, the vector size the index must have (the vectorizer's).
      storage: if given, the storage type the index must have ("float32", "bfloat16" or
        "int8"; ``dtype`` is accepted as its earlier name). To change an index's type, load it
        without this and call :meth:`set_storage`.
      **kwargs: passed to the constructor (``rescore`` overrides the saved factor; ``devices``,
        ``shard_min_rows``).

    Returns:
      The :class:`ModelIndex`.

    Raises:
      IndexStoreError: missing, incomplete or corrupted index, a vector size other than
        ``expected_dim``, or a storage type other than ``storage``.
    """
    expected = _storage_arg(storage, kwargs.pop("dtype", None))
    root = pathlib.Path(path).expanduser().absolute()
    f = root / MANIFEST
    manifest = storage_io.read_manifest(root, MANIFEST, FORMAT, READABLE_VERSIONS, "index",
                                        IndexStoreError)
    if manifest["version"] < 5:  # before the storage type was recorded: float32 only
      saved, depth = "float32", RESCORE
    else:
      saved, depth = manifest.get("storage"), manifest.get("rescore")
      try:
        saved, depth = _storage_name(saved), _rescore_depth(depth)
      except IndexStoreError as e:
        raise IndexStoreError(f"{f} is corrupted: storage {saved!r} or rescore {depth!r} is "
                              "invalid") from e
    if expected is not None and expected != saved:
      raise IndexStoreError(f"index {root} stores {saved} vectors, not the {expected} expected "
                            f"here; load it without storage=, call set_storage({expected!r}) "
                            f"and save it (or `know2vec index convert --storage {expected}`)")
    kwargs.setdefault("rescore", depth)
    dim, ids, metas = manifest.get("dim"), manifest.get("ids"), manifest.get("metadata")
    if (not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0
        or not isinstance(ids, list) or not isinstance(metas, list)
        or len(ids) != len(metas) or manifest.get("num_vectors") != len(ids)
        or not all(isinstance(i, str) and i for i in ids) or len(set(ids)) != len(ids)
        or not all(isinstance(m, dict) for m in metas)):
      raise IndexStoreError(f"{f} is corrupted: dim, ids, metadata or num_vectors are invalid")
    if expected_dim is not None and dim != expected_dim:
      raise IndexStoreError(f"index vector size {dim} does not match the vectorizer's "
                            f"{expected_dim} ({root})")
    vectors = np.zeros((0, dim), np.float32)
    # Restore targets are shapes only: a corrupted size must not allocate an array of that size.
    sds = jax.ShapeDtypeStruct
    shapes = manifest.get("classes")
    classes = None
    pool_meta = manifest.get("pool")
    pool, provenance = None, []
    if pool_meta is not None:
      try:
        pool_shape = tuple(int(d) for d in pool_meta["shape"])
        provenance = pool_meta.get("provenance", [])
        if len(pool_shape) != 4 or min(pool_shape) < 1:
          raise ValueError(f"shape {list(pool_shape)}")
        from know2vec_jax.pool import provenance_problem
        problem = provenance_problem(provenance)
        if problem:
          raise ValueError(problem)
      except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise IndexStoreError(f"{f} is corrupted: bad pool record ({e})") from e
      pool = storage_io.restore_trees(
          root, manifest, {POOL_DIR: {"images": sds(pool_shape, np.float32)}}, "index",
          IndexStoreError)[POOL_DIR]["images"]
    if ids:
      targets = {VECTORS_DIR: {"vectors": sds((len(ids), dim), np.float32)}}
      if shapes is not None:
        try:
          kmax, d, n, h = (int(shapes[key]) for key in ("max_classes", "token_dim", "pool_size",
                                                         "hub_depth"))
          if min(kmax, d, n) < 1 or h < 0:
            raise ValueError(f"sizes {[kmax, d, n, h]}")
        except (KeyError, TypeError, ValueError) as e:
          raise IndexStoreError(f"{f} is corrupted: bad class-knowledge shapes ({e})") from e
        m = len(ids)
        targets[CLASSES_DIR] = {"tokens": sds((m, kmax, d), np.float32),
                                "mask": sds((m, kmax), np.float32),
                                "pool_labels": sds((m, n), np.uint8),
                                "hub": sds((m, h), np.float32)}
      restored = storage_io.restore_trees(root, manifest, targets, "index", IndexStoreError)
      vectors = restored[VECTORS_DIR]["vectors"]
      if not np.all(np.isfinite(vectors)):
        raise IndexStoreError(f"index {root} is corrupted: the vectors hold NaN or inf")
      if shapes is not None:
        classes = {n: np.asarray(restored[CLASSES_DIR][n]) for n in CLASS_ARRAYS}
    index = cls(dim, storage=saved, **kwargs)
    index._vectors = np.ascontiguousarray(vectors, np.float32)
    index._classes = classes
    index._ids = list(ids)
    index._row = {i: r for r, i in enumerate(ids)}
    index._meta = metas
    index._pool = None if pool is None else np.ascontiguousarray(pool, np.float32)
    index._pool_provenance = provenance
    proxies = manifest.get("proxies") or {}
    if not isinstance(proxies, dict) or not all(isinstance(v, dict) for v in proxies.values()):
      raise IndexStoreError(f"{f} is corrupted: bad proxies record")
    index._proxies = proxies
    return index
