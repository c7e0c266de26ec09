"""The probe pool: the unlabelled images a proxy probes black boxes with (docs/design.md,
"Probe pool").

A pool is a list of entries, each ``NAME[@SPLIT]``:

- ``NAME`` is any source :func:`know2vec_jax.data.load_source` reads (``fashion_mnist``,
  ``mnist5k+invert``, ``tfds:NAME``, ...), whose labels the pool never reads, or
  ``folder:PATH``: every image file under ``PATH`` (sub-folders included, no class structure
  needed).
- ``SPLIT`` is ``test`` (the default: images no model of a zoo built from the source trained on),
  ``train`` or ``all``; a folder has one split, ``files``.

From each entry the pool takes up to ``per_source`` images, at most ``max_share`` of the split
(so that the same split keeps images the pool never holds, for few-shot queries), drawn by one
permutation per *base* source and split: ``digits`` and ``digits+invert`` hold the same
underlying images, and a query drawn outside those rows shares no image with the pool in any
domain. :func:`excluded_rows` gives back the rows a query of a source must avoid.

The pool's **provenance** (entries, sizes and rows) is recorded in the proxy, so that ``know2vec
index info`` and ``query --json`` say what the proxy's pool was built from.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Sequence

import numpy as np

from know2vec_jax.config import require
from know2vec_jax.data import DataError, load_source, parse_source_name, stable_seed
from know2vec_jax.data.sources import IMAGE_EXTENSIONS, _standardise, read_image

POOL_SPLITS = ("test", "train", "all")
FOLDER_SPLIT = "files"


@dataclasses.dataclass(frozen=True)
class PoolConfig:
  """What the probe pool holds.

  Attributes:
    sources: pool entries ``NAME[@SPLIT]`` (see the module docstring); empty: the training
      models' sources (domains included), in the ``split`` split.
    split: the split of an entry that names none.
    per_source: the most images taken from one entry.
    max_share: the largest share of an entry's split the pool takes (the rest stays for
      queries), in (0, 1].
    data_dir: where sources' files are (``fashion_mnist``'s IDX directory, a tfds data dir);
      None: the default locations.
  """
  sources: tuple[str, ...] = ()
  split: str = "test"
  per_source: int = 800
  max_share: float = 0.5
  data_dir: str | None = None

  def __post_init__(self):
    require(self.split in POOL_SPLITS, f"pool split must be one of {POOL_SPLITS}, got "
            f"{self.split!r}")
    require(self.per_source >= 1, f"pool per_source must be >= 1, got {self.per_source}")
    require(0.0 < self.max_share <= 1.0, f"pool max_share must be in (0, 1], got "
            f"{self.max_share}")
    for s in self.sources:
      parse_entry(s, self.split)  # a malformed entry fails at config time


@dataclasses.dataclass(frozen=True)
class PoolEntry:
  """One parsed pool entry: ``source`` (transforms included) and ``split``."""
  source: str
  split: str

  @property
  def base(self) -> str:
    """The source without its transforms (``folder:`` and ``tfds:`` names kept whole)."""
    return parse_source_name(self.source)[0]

  @property
  def name(self) -> str:
    return f"{self.source}@{self.split}"


def parse_entry(text: str, default_split: str = "test") -> PoolEntry:
  """``NAME[@SPLIT]`` -> :class:`PoolEntry`.

  Raises:
    ConfigError: an empty name or an unknown split (a folder takes none).
  """
  from know2vec_jax.config import ConfigError
  if not isinstance(text, str) or not text.strip():
    raise ConfigError(f"a pool entry must be a non-empty source name, got {text!r}")
  name, sep, split = text.strip().rpartition("@")
  if not sep or "/" in split:  # no '@', or one inside a folder path
    name, split = text.strip(), ""
  if name.startswith("folder:"):
    if split and split != FOLDER_SPLIT:
      raise ConfigError(f"pool entry {text!r}: a folder has no splits (every image under it is "
                        "used)")
    return PoolEntry(name, FOLDER_SPLIT)
  split = split or default_split
  if split not in POOL_SPLITS:
    raise ConfigError(f"pool entry {text!r}: unknown split {split!r}, expected one of "
                      f"{POOL_SPLITS}")
  try:
    parse_source_name(name)
  except DataError as e:
    raise ConfigError(f"pool entry {text!r}: {e}") from None
  return PoolEntry(name, split)


def entries(config: PoolConfig, default_sources: Sequence[str]) -> list[PoolEntry]:
  """The config's entries, or ``default_sources`` in its split when it names none; duplicates
  dropped, order kept.

  Raises:
    ConfigError: no entry at all.
  """
  from know2vec_jax.config import ConfigError
  names = list(config.sources) or sorted(default_sources)
  if not names:
    raise ConfigError("the probe pool names no source (pool.sources is empty and there are no "
                      "training models' sources to default to)")
  out: list[PoolEntry] = []
  for n in names:
    e = parse_entry(n, config.split)
    if e not in out:
      out.append(e)
  return out


def _folder_images(path: str, image_size: int, channels: int) -> np.ndarray:
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise DataError(f"pool folder {root} does not exist or is not a directory")
  files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                 and not any(part.startswith(".") for part in p.relative_to(root).parts))
  if not files:
    raise DataError(f"pool folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  images = [read_image(f, image_size, channels, "pool image") for f in files]
  return _standardise(np.stack(images), image_size, channels)


def entry_images(entry: PoolEntry, image_shape, data_dir: str | None = None
                 ) -> tuple[np.ndarray, int]:
  """Every image an entry's split holds (float32 [N, H, W, C]; labels never read), and how many
  of them come from the train split (``all``: train first, then test).

  Raises:
    DataError: a source or folder that cannot be read.
  """
  h, _, c = image_shape
  if entry.split == FOLDER_SPLIT:
    return _folder_images(entry.source[len("folder:"):], h, c), 0
  data = load_source(entry.source, image_size=h, channels=c, data_dir=data_dir)
  if entry.split == "all":
    return np.concatenate([data.train_images, data.test_images]), len(data.train_images)
  return data.split(entry.split)[0], len(data.train_images) if entry.split == "train" else 0


def entry_rows(entry: PoolEntry, num_images: int, per_source: int, max_share: float,
               seed: int) -> np.ndarray:
  """Which images of an entry's split the pool takes: the first ``min(per_source,
  floor(max_share * N))`` of a permutation seeded by the entry's *base* source, split and
  ``seed`` (a folder: the first ``per_source``), so every domain of a base source takes the same
  rows.

  Returns:
    int64 indices into the split, in pool order.
  """
  share = 1.0 if entry.split == FOLDER_SPLIT else max_share
  n = min(int(per_source), int(np.floor(share * num_images + 1e-9)))
  rng = np.random.default_rng(stable_seed("pool", entry.base, entry.split, seed))
  return rng.permutation(num_images)[:max(n, 0)].astype(np.int64)


@dataclasses.dataclass
class Pool:
  """A built probe pool.

  Attributes:
    images: float32 [N, H, W, C], entry after entry.
    provenance: one dict per entry: ``source``, ``split``, ``images`` (how many it gave),
      ``of`` (the split's size) and ``rows`` (indices into the split, pool order).
  """
  images: np.ndarray
  provenance: list[dict]

  def __len__(self) -> int:
    return len(self.images)


def build(config: PoolConfig, default_sources: Sequence[str], seed: int, image_shape) -> Pool:
  """Builds the pool a config names (:func:`entries`, :func:`entry_rows`).

  Args:
    config: the pool settings.
    default_sources: the sources to use when ``config.sources`` is empty.
    seed: the draw's seed (``ProxyConfig.seed``).
    image_shape: (H, W, C) of the black boxes.

  Returns:
    The :class:`Pool`.

  Raises:
    DataError: a source that cannot be read, or a pool with no image.
  """
  parts, prov = [], []
  for e in entries(config, default_sources):
    x, n_train = entry_images(e, image_shape, config.data_dir)
    rows = entry_rows(e, len(x), config.per_source, config.max_share, seed)
    parts.append(x[rows])
    prov.append({"source": e.source, "split": e.split, "images": int(len(rows)),
                 "of": int(len(x)), "train_size": int(n_train), "rows": rows.tolist()})
  images = np.concatenate(parts) if parts else np.zeros((0,) + tuple(image_shape), np.float32)
  if not len(images):
    raise DataError("the probe pool holds no image: every entry's split is empty or too small "
                    f"for max_share={config.max_share} ({[p['source'] for p in prov]})")
  return Pool(np.ascontiguousarray(images, np.float32), prov)


def provenance_problem(provenance) -> str | None:
  """What is wrong with a stored pool provenance (None: nothing), for the loaders that read one
  back: a list of dicts whose ``source`` and ``split``, where given, are strings, ``rows``
  integers and, for an ``all`` split, ``train_size`` an integer (what :func:`excluded_rows`
  reads). An index's own pool made from an array records only its source and size."""
  if not isinstance(provenance, list):
    return f"the pool provenance is a {type(provenance).__name__}, not a list"
  for i, p in enumerate(provenance):
    if not (isinstance(p, dict) and all(isinstance(p.get(k, ""), str)
                                        for k in ("source", "split"))):
      return f"pool entry {i} is not a record with a string source and split"
    rows = p.get("rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, int) for r in rows):
      return f"pool entry {i}'s rows are not a list of integers"
    if p.get("split") == "all" and not isinstance(p.get("train_size"), int):
      return f"pool entry {i} (split all) has no integer train_size"
  return None


def summary(provenance: Sequence[Mapping]) -> list[dict]:
  """The provenance without its row lists: what ``index info`` and ``query --json`` print."""
  return [{k: v for k, v in p.items() if k != "rows"} for p in provenance]


def excluded_rows(provenance: Sequence[Mapping], source: str, split: str) -> np.ndarray:
  """Rows of ``source``'s ``split`` that the pool holds in any domain of its base source: a
  query drawn from that split outside them shares no image with the pool.

  ``all`` entries count against both splits (their rows index train then test).

  Args:
    provenance: a :class:`Pool`'s (or a saved proxy's) provenance.
    source: a source name (transforms included or not).
    split: ``train`` or ``test``.

  Returns:
    int64 sorted unique rows of that split.
  """
  base = parse_source_name(source)[0]
  out = []
  for p in provenance:
    if "source" not in p or "split" not in p:  # images given as an array: rows of no source
      continue
    e = PoolEntry(p["source"], p["split"])
    if e.split == FOLDER_SPLIT or e.base != base:
      continue
    rows = np.asarray(p.get("rows", ()), np.int64)
    if e.split == split:
      out.append(rows)
    elif e.split == "all":
      n_train = int(p["train_size"])
      out.append(rows[rows < n_train] if split == "train" else rows[rows >= n_train] - n_train)
  return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)


def config_rows(config: PoolConfig, source: str, split: str, seed: int,
                default_sources: Sequence[str] = ()) -> np.ndarray:
  """The rows of ``source``'s ``split`` that a pool built from ``config`` holds in any domain of
  its base source, without building the pool: what an evaluation's queries avoid.

  Args:
    config: the pool settings.
    source: a source name.
    split: ``"train"`` or ``"test"``.
    seed: the pool's seed (``ProxyConfig.seed``).
    default_sources: the sources ``config`` defaults to when it names none.

  Returns:
    int64 sorted unique rows.
  """
  base = parse_source_name(source)[0]
  prov = []
  for e in entries(config, default_sources or [source]):
    if e.base != base or e.split not in (split, "all"):
      continue
    data = load_source(e.base, data_dir=config.data_dir)
    n_train = len(data.train_labels)
    n = {"train": n_train, "test": len(data.test_labels), "all": n_train +
         len(data.test_labels)}[e.split]
    rows = entry_rows(e, n, config.per_source, config.max_share, seed)
    prov.append({"source": e.source, "split": e.split, "rows": rows, "train_size": n_train})
  return excluded_rows(prov, source, split)
