"""Seeded fuzz of the Python API and the ``know2vec`` command with malformed inputs.

Four categories, one test each: damaged artifacts (the proxy, an index and the zoo, truncated,
with flipped bytes, a file deleted, the manifest replaced by garbage or given a field of the wrong
type), bad query inputs through the Python API, bad queries through ``know2vec query``, and
refused index edits; beside them, one test that a failed restore prints nothing after its error.
The cases are drawn from ``np.random.default_rng(SEED + i)`` (the artifacts, the queries) or
listed, with random parts from the same generators, so a failure reproduces; its description is in
every assertion message.

What every case must give:

- the Python API: the project's own error class for that input (listed per case), its message on
  one line and naming the problem; never a KeyError, a TypeError, a plain ValueError or a JAX error
  from inside the library;
- the command: exit status 2 and exactly one stderr line, ``know2vec: error: ...``;
- nothing written or lost: the damaged copy is byte for byte what the damage left, the session's
  artifacts are byte for byte what they were, and a refused index edit leaves the index (in
  memory and on disk) as it was.

The README's robustness table lists what is tried (its last rows).
"""

import hashlib
import json
import shutil
import struct
import zlib

import numpy as np

from know2vec_jax import storage
from know2vec_jax.blackbox import BlackBoxError, CallableBlackBox, InputError
from know2vec_jax.cli import main
from know2vec_jax.data import few_shot, load_source
from know2vec_jax.index import IndexStoreError, ModelIndex
from know2vec_jax.proxy import Proxy, ProxyError, query
from know2vec_jax.zoo import ZooError, load_zoo

SEED = 2026
ARTIFACT_CASES = 36  # 12 per artifact kind
SHAPE = (28, 28, 1)
# Values a damaged or hand-edited manifest field may hold instead of the right one.
GARBAGE = [None, -1, 0, 1.5, "x", [], {}, [1, "a"], {"a": 1}, True, 10**12, [-3]]


def _sums(root):
  """SHA-256 of every file under ``root``, by relative path: what "nothing written" compares."""
  return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(root.rglob("*")) if f.is_file()}


def _one_line(err: str, what: str, *fragments) -> str:
  """The stderr of a refused command: exactly one line ``know2vec: error: ...`` with fragments."""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("know2vec: error: "), (what, err)
  for f in fragments:
    assert f in lines[0], (what, f, lines[0])
  return lines[0]


def _refused(fn, expected, what: str, *fragments) -> str:
  """Runs ``fn``, which must raise ``expected`` (exactly that family: the project's class for
  this input) with a one-line message holding ``fragments``; returns the message."""
  try:
    fn()
  except expected as e:
    msg = str(e)
  except Exception as e:  # anything else escaping the library is a finding
    raise AssertionError(f"{what}: {type(e).__name__} escaped instead of "
                         f"{expected.__name__}: {e}") from e
  else:
    raise AssertionError(f"{what}: accepted, expected {expected.__name__}")
  assert "\n" not in msg and msg.strip(), (what, msg)
  for f in fragments:
    assert f in msg, (what, f, msg)
  return msg


def _run(capsys, argv):
  """``know2vec ARGV`` in process: (exit status, stdout, stderr). An exception escaping ``main``
  is a traceback for the user: it fails the case."""
  capsys.readouterr()
  try:
    rc = main([str(a) for a in argv])
  except BaseException as e:
    raise AssertionError(f"know2vec {argv[:2]} raised {type(e).__name__}: {e}") from e
  out, err = capsys.readouterr()
  return rc, out, err


# ---- artifacts -----------------------------------------------------------------------------------

MANIFESTS = {"proxy": "proxy.json", "index": "index.json", "zoo": "zoo.json"}
# Manifest fields the loaders read; "*" stands for a mapping's first key.
FIELDS = {
    "proxy": [("format",), ("version",), ("fingerprint",), ("config",), ("config", "vectorizer"),
              ("config", "max_classes"), ("backbone",), ("backbone", "image_shape"),
              ("backbone", "num_labels"), ("vectorizer",), ("vectorizer", "feature_dim"),
              ("vectorizer", "num_tasks"), ("pool_shape",), ("pool_shape", 0), ("pool",),
              ("pool", 0), ("pool", 0, "source"), ("pool", 0, "rows"), ("tasks",),
              ("knowledge",), ("knowledge", 0), ("knowledge", 0, 2), ("reference",),
              ("retrieval",), ("retrieval", "fit_threshold"), ("retrieval", "familiar_other"),
              ("checksums",), ("checksums", "vectorizer")],
    "index": [("format",), ("version",), ("dim",), ("num_vectors",), ("storage",), ("rescore",),
              ("ids",), ("ids", 0), ("metadata",), ("metadata", 0), ("metadata", 0, "arch"),
              ("metadata", 0, "task"), ("metadata", 0, "proxy"), ("classes",),
              ("classes", "max_classes"), ("classes", "pool_size"), ("pool",), ("proxies",),
              ("proxies", "*"), ("checksums",), ("checksums", "vectors")],
    "zoo": [("format",), ("version",), ("image_shape",), ("image_shape", 0), ("stacks",),
            ("stacks", 0), ("stacks", 0, "arch"), ("stacks", 0, "num_classes"),
            ("stacks", 0, "conv_impl"), ("stacks", 0, "model_ids"), ("stacks", 0, "model_ids", 0),
            ("stacks", 0, "name"), ("estimators",), ("models",), ("models", 0),
            ("models", 0, "model_id"), ("models", 0, "stack"), ("models", 0, "stack_index"),
            ("models", 0, "task"), ("checksums",)],
}


def _files(root):
  """The artifact's files in an order that does not depend on orbax's random file names."""
  return sorted((f for f in root.rglob("*") if f.is_file()),
                key=lambda f: (str(f.relative_to(root).parent), f.stat().st_size, f.name))


def _damage(root, kind: str, manifest: str, rng) -> str:
  """Damages the artifact at ``root`` in one way; returns what was done (for messages)."""
  files = _files(root)
  if kind in ("truncate", "flip", "delete"):
    # Half the time one of the three largest files (array data), else any file (orbax's
    # metadata and commit markers, the manifest).
    pool = sorted(files, key=lambda f: -f.stat().st_size)[:3] if rng.random() < 0.5 else files
    f = pool[rng.integers(len(pool))]
    rel, data = f.relative_to(root), f.read_bytes()
    if kind == "delete":
      f.unlink()
      return f"deleted {rel}"
    if kind == "truncate":
      cut = int(rng.integers(len(data))) if data else 0
      f.write_bytes(data[:cut])
      return f"truncated {rel} at {cut} of {len(data)} bytes"
    raw = bytearray(data)
    at = sorted(int(i) for i in rng.integers(len(raw), size=min(3, len(raw))))
    for i in at:
      raw[i] ^= int(rng.integers(1, 256))
    f.write_bytes(bytes(raw))
    return f"flipped bytes {at} of {rel}"
  if kind == "garbage":
    blob = rng.bytes(int(rng.integers(0, 300)))
    (root / manifest).write_bytes(blob)
    return f"{manifest} replaced by {len(blob)} random bytes"
  m = json.loads((root / manifest).read_text())
  fields = FIELDS[root.name.rstrip("0123456789")]
  path = fields[rng.integers(len(fields))]
  value = GARBAGE[rng.integers(len(GARBAGE))]
  node = m
  for key in path[:-1]:
    node = node[key]
  node[next(iter(node)) if path[-1] == "*" else path[-1]] = value
  # Re-sealed: the manifest's own checksum would refuse any edit at once (tested apart), so the
  # loaders' checks of each field are reached only through a manifest whose checksum matches.
  m[storage.MANIFEST_CHECKSUM] = storage.manifest_checksum(m)
  (root / manifest).write_text(json.dumps(m))
  return f"{manifest} field {list(path)} set to {value!r} (checksum re-sealed)"


def _same_arrays(kind, loaded, proxy, index, zoo) -> bool:
  """Whether a damaged copy that loaded holds the original's arrays (checksummed; a re-sealed
  manifest's free-form JSON may differ)."""
  if kind == "proxy":
    return loaded.fingerprint == proxy.fingerprint
  if kind == "index":
    return loaded.ids == index.ids and np.array_equal(loaded.vectors, index.vectors)
  import jax
  return loaded.records.keys() == zoo.records.keys() and all(
      np.array_equal(a, b) for name in zoo.stacks for a, b in zip(
          jax.tree.leaves(loaded.stacks[name].params), jax.tree.leaves(zoo.stacks[name].params)))


def test_damaged_artifacts(tiny_proxy, tiny_proxy_dir, tiny_index, tiny_zoo, tiny_zoo_dir,
                           tmp_path, capsys):
  """ARTIFACT_CASES damaged copies of the proxy, a saved index and the zoo, each loaded through
  the Python API (Proxy.load, ModelIndex.load, load_zoo) and the command (``query``, ``index
  info`` and ``index remove``, ``zoo summary``): the artifact's own error class (ProxyError,
  IndexStoreError, ZooError) on one line naming the artifact's path, or, where the damage hit
  nothing the loader reads, exactly the original arrays; the command exits 2 with one line (or 0
  when the API loaded it too); the damaged copy and the originals are unchanged."""
  index_dir = tiny_index.save(tmp_path / "index")
  sources = {"proxy": tiny_proxy_dir, "index": index_dir, "zoo": tiny_zoo_dir}
  errors = {"proxy": ProxyError, "index": IndexStoreError, "zoo": ZooError}
  loaders = {"proxy": Proxy.load, "index": ModelIndex.load, "zoo": load_zoo}
  before = {k: _sums(p) for k, p in sources.items()}
  # A query folder of one class: a proxy that loads is refused at the query, before any compile.
  x, _ = _base_query(tiny_zoo[0])
  one_class = _png_folder(tmp_path / "one-class", {"a": x[:3]})
  rng = np.random.default_rng(SEED)
  for n in range(ARTIFACT_CASES):
    kind = ("proxy", "index", "zoo")[n % 3]
    root = tmp_path / f"{kind}{n}"
    shutil.copytree(sources[kind], root)
    damage = ("truncate", "flip", "delete", "garbage", "field")[rng.integers(5)]
    what = f"case {n} ({kind}): " + _damage(root, damage, MANIFESTS[kind], rng)
    damaged = _sums(root)
    try:
      loaded = loaders[kind](root)
    except errors[kind] as e:
      loaded, msg = None, str(e)
      assert "\n" not in msg and str(root) in msg, (what, msg)
    except Exception as e:
      raise AssertionError(f"{what}: {type(e).__name__} escaped instead of "
                           f"{errors[kind].__name__}: {e}") from e
    if loaded is not None:
      assert _same_arrays(kind, loaded, tiny_proxy, tiny_index, tiny_zoo[0]), what
    commands = {"proxy": [["query", "--proxy", root, "--index", index_dir, "--images",
                           one_class]],
                "index": [["index", "info", "--index", root],
                          ["index", "remove", "--index", root, "no-such-model"]],
                "zoo": [["zoo", "summary", "--zoo", root]]}[kind]
    for argv in commands:
      rc, _, err = _run(capsys, argv)
      refused = loaded is None or argv[0] == "query" or argv[1] == "remove"
      if refused:
        assert rc == 2, (what, argv[:2], rc, err)
        _one_line(err, f"{what}; know2vec {argv[0]} {argv[1]}")
      else:
        assert rc == 0 and not err.strip(), (what, argv[:2], rc, err)
    assert _sums(root) == damaged, f"{what}: the damaged copy was written to"
  for k, p in sources.items():
    assert _sums(p) == before[k], f"the original {k} changed"


def test_a_failed_restore_prints_nothing_after_its_error(tiny_index, tmp_path, monkeypatch):
  """When orbax fails on one damaged array it closes its event loop with the checkpoint's other
  reads still in flight; as each finishes, tensorstore reports an unraisable "RuntimeError:
  Event loop is closed", a traceback on stderr after the command's one line (seen under load).
  After a failed restore those reports are dropped, any other unraisable still reaches the hook.
  The late read is replayed with tensorstore's own future, so the check does not depend on
  timing."""
  import asyncio
  import gc
  import sys

  import tensorstore as ts
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  path = tiny_index.save(tmp_path / "index")
  for f in (path / "vectors").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  _refused(lambda: ModelIndex.load(path), IndexStoreError, "truncated vectors",
           "cannot read the vectors checkpoint")

  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()

  async def read():
    return await future
  loop.create_task(read())
  loop.run_until_complete(asyncio.sleep(0.01))
  loop.close()
  promise.set_result(1)  # the late read lands on the closed loop

  class Other:
    def __del__(self):
      raise RuntimeError("another problem")
  Other()
  gc.collect()
  assert [str(e) for e in seen] == ["another problem"], seen


# ---- query inputs (Python API) -------------------------------------------------------------------

def _base_query(zoo, shots=3):
  """A valid few-shot query of the first zoo model's task (K classes, ``shots`` images each)."""
  r = next(iter(zoo.records.values()))
  return few_shot(load_source(r.source), r.task, shots, seed=0)


def _ragged(x):
  return [x[0], x[1][:5]]


# (name, mutation (x, y, rng) -> (x, y), expected class, fragment of the message)
QUERY_MUTATIONS = [
    ("NaN pixel", lambda x, y, r: (_poke(x, r, np.nan), y), InputError, "NaN/inf"),
    ("+inf pixel", lambda x, y, r: (_poke(x, r, np.inf), y), InputError, "NaN/inf"),
    ("-inf pixel", lambda x, y, r: (_poke(x, r, -np.inf), y), InputError, "NaN/inf"),
    ("3-D images", lambda x, y, r: (x[..., 0], y), InputError, "must have shape"),
    ("5-D images", lambda x, y, r: (x[None], y), InputError, "must have shape"),
    ("one image, no batch axis", lambda x, y, r: (x[0], y), InputError, "must have shape"),
    ("wrong H/W", lambda x, y, r: (_resized(x, r), y), InputError, "image shape"),
    ("3 channels", lambda x, y, r: (np.repeat(x, 3, -1), y), InputError, "image shape"),
    ("uint8 images", lambda x, y, r: ((x * 255).astype(np.uint8), y), InputError, "dtype uint8"),
    ("int64 images", lambda x, y, r: (x.astype(np.int64), y), InputError, "dtype int64"),
    ("bool images", lambda x, y, r: (x > 0.5, y), InputError, "dtype bool"),
    ("object images", lambda x, y, r: (x.astype(object), y), InputError, "dtype object"),
    ("string images", lambda x, y, r: (x.astype(str), y), InputError, "dtype <U"),
    ("complex images", lambda x, y, r: (x.astype(np.complex64), y), InputError, "complex64"),
    ("ragged image list", lambda x, y, r: (_ragged(x), y[:2]), InputError, "not an array"),
    ("None images", lambda x, y, r: (None, y), InputError, "must have shape"),
    ("values in [0, 255]", lambda x, y, r: (x * 255, y), InputError, "must lie in [0, 1]"),
    ("negative values", lambda x, y, r: (x - 1.5, y), InputError, "must lie in [0, 1]"),
    ("one label short", lambda x, y, r: (x, y[:-1]), InputError, "one label per image"),
    ("2-D labels", lambda x, y, r: (x, y[:, None]), InputError, "one label per image"),
    ("float labels", lambda x, y, r: (x, y + 0.5), InputError, "must be integers"),
    ("bool labels", lambda x, y, r: (x, y > 0), InputError, "must be integers"),
    ("string labels", lambda x, y, r: (x, y.astype(str)), InputError, "must be integers"),
    ("negative label", lambda x, y, r: (x, np.where(y == y.max(), -1, y)), InputError,
     "must be in 0..K-1"),
    ("one class", lambda x, y, r: (x, np.zeros_like(y)), InputError, "at least 2 classes"),
    ("one class, label 3", lambda x, y, r: (x, np.full_like(y, 3)), InputError,
     "have no images"),
    ("an empty class", lambda x, y, r: (x, np.where(y == 1, y.max() + 1, y)), InputError,
     "[1] have no images"),
    ("zero images", lambda x, y, r: (x[:0], y[:0]), InputError, "has no images"),
    ("10,000 classes", lambda x, y, r: (x, np.where(y == y.max(), 9_999, y)), InputError,
     "10000 classes, more than the vectorizer's maximum"),
    ("label 10**12", lambda x, y, r: (x, np.where(y == y.max(), 10**12, y.astype(np.int64))),
     InputError, "more than the vectorizer's maximum"),
    ("11 classes of one image", lambda x, y, r: (np.repeat(x[:1], 11, 0), np.arange(11)),
     InputError, "11 classes, more than the vectorizer's maximum of 10"),
]
BAD_K = [0, -1, -10**9, 1.5, True, None, "3"]
QUERY_CASES = len(QUERY_MUTATIONS) + len(BAD_K) + 4


def _poke(x, rng, value):
  x = x.copy()
  x.reshape(-1)[rng.integers(x.size)] = value
  return x


def _resized(x, rng):
  h, w = rng.choice([1, 27, 29, 56], size=2)
  return np.zeros((len(x), h, w, 1), np.float32)


def test_bad_query_inputs(tiny_proxy, tiny_index, tiny_zoo):
  """Every mutation of QUERY_MUTATIONS, every bad k of BAD_K and four malformed query lists, in
  a seeded order, each through an entry point drawn from embed_query, describe_queries, search
  and query (search and query for k): NaN/inf pixels, wrong rank, size or channels, non-float
  dtypes, values outside [0, 1], labels of the wrong length, rank, dtype or range, one-class
  tasks, an empty class, zero images, 10,000 classes, queries that are not (images, labels) pairs
  and k <= 0 or not an int: each refused with InputError (ProxyError for k) on one line naming
  the problem, before any model runs; then one valid query asking for more models than the index
  holds gets every one of them."""
  x, y = _base_query(tiny_zoo[0])
  entry = {"embed_query": lambda a, b, k: tiny_proxy.embed_query(a, b),
           "describe_queries": lambda a, b, k: tiny_proxy.describe_queries([(a, b)]),
           "search": lambda a, b, k: tiny_proxy.search(tiny_index, [(a, b)], k),
           "query": lambda a, b, k: query(tiny_proxy, tiny_index, a, b, k=k)}
  malformed = [(x, y), None, [x], [(x, y, y)]]  # the pair given bare, no list, no pairs
  cases = ([("mutation", i) for i in range(len(QUERY_MUTATIONS))] +
           [("k", i) for i in range(len(BAD_K))] + [("queries", i) for i in range(len(malformed))])
  assert len(cases) == QUERY_CASES
  rng = np.random.default_rng(SEED + 1)
  for n in rng.permutation(len(cases)):
    family, i = cases[n]
    if family == "mutation":
      via = list(entry)[rng.integers(len(entry))]
      name, mutate, expected, fragment = QUERY_MUTATIONS[i]
      a, b = mutate(x, y, rng)
      _refused(lambda: entry[via](a, b, 5), expected, f"case {n}: {name} via {via}", fragment)
    elif family == "k":  # only search and query take one
      via = ("search", "query")[rng.integers(2)]
      _refused(lambda: entry[via](x, y, BAD_K[i]), ProxyError,
               f"case {n}: k={BAD_K[i]!r} via {via}", "k must be a positive integer")
    else:
      bad = malformed[i]
      via = ("search", "describe_queries")[rng.integers(2)]
      fn = ((lambda: tiny_proxy.search(tiny_index, bad, 5)) if via == "search" else
            (lambda: tiny_proxy.describe_queries(bad)))
      _refused(fn, InputError, f"case {n}: queries {type(bad).__name__} via {via}",
               "queries" if bad is None else "pair")
  rows = query(tiny_proxy, tiny_index, x, y, k=10_000)
  assert len(rows) == len(tiny_index) and {r["model_id"] for r in rows} == set(tiny_index.ids)
  _refused(lambda: tiny_index.search(np.ones(tiny_index.dim), 0), IndexStoreError, "index k=0",
           "k must be a positive int")


# ---- queries through the command -----------------------------------------------------------------

def _png(pixels) -> bytes:
  """A greyscale PNG of float pixels in [0, 1]."""
  import io

  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray((np.asarray(pixels)[..., 0] * 255).round().astype(np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _png_folder(root, classes: dict) -> str:
  """A query folder: one sub-folder per class, its images as PNGs (bytes are written as is)."""
  for name, images in classes.items():
    (root / name).mkdir(parents=True)
    for i, im in enumerate(images):
      (root / name / f"{i}.png").write_bytes(im if isinstance(im, bytes) else _png(im))
  return str(root)


def _bomb(png: bytes) -> bytes:
  """``png`` claiming 30000 x 30000 pixels (a decompression bomb to PIL), its CRC fixed."""
  raw = bytearray(png)
  raw[16:24] = struct.pack(">II", 30000, 30000)
  raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
  return bytes(raw)


def test_bad_queries_through_the_command(tiny_proxy_dir, tiny_index, tiny_zoo, tmp_path, capsys):
  """``know2vec query`` with image folders that are missing, a file, empty, without images, of
  one class, with an empty class or with damaged PNGs (random bytes flipped, truncated, empty,
  a decompression bomb), and with bad -k, --task, --shots and --set values: exit 2, one line
  naming the problem; the proxy and the index are not written to."""
  index_dir = tiny_index.save(tmp_path / "index")
  before = {"proxy": _sums(tiny_proxy_dir), "index": _sums(index_dir)}
  x, _ = _base_query(tiny_zoo[0])
  good = _png(x[0])
  rng = np.random.default_rng(SEED + 2)
  flipped = bytearray(good)
  for i in rng.integers(len(good), size=4):
    flipped[i] ^= int(rng.integers(1, 256))
  q = tmp_path / "q"
  (q / "file").parent.mkdir()
  (q / "file").write_text("not a folder")
  (q / "empty").mkdir()
  (q / "no-images" / "a").mkdir(parents=True)
  (q / "no-images" / "a" / "notes.txt").write_text("no image here")
  (q / "no-images" / "a" / "data.npz").write_bytes(b"PK\x03\x04")
  # A damaged image sits in a folder of one class: even if it decoded, the query is refused.
  folders = {
      "missing": (str(q / "nowhere"), "does not exist"),
      "a file": (str(q / "file"), "does not exist or is not a directory"),
      "no class folders": (str(q / "empty"), "has no class sub-folders"),
      "non-image files": (str(q / "no-images"), "holds no images"),
      "one class": (_png_folder(q / "one", {"a": x[:3]}), "at least 2 classes, got 1"),
      "an empty class": (_png_folder(q / "hole", {"a": x[:2], "b": []}), "holds no images"),
      "flipped bytes": (_png_folder(q / "flip", {"a": [x[0], bytes(flipped)]}), ""),
      "truncated PNG": (_png_folder(q / "trunc", {"a": [x[0], good[:int(rng.integers(8, 60))]]}),
                        "cannot read image"),
      "empty PNG": (_png_folder(q / "zero", {"a": [x[0], b""]}), "cannot read image"),
      "decompression bomb": (_png_folder(q / "bomb", {"a": [x[0], _bomb(good)]}),
                             "decompression bomb"),
  }
  base = ["query", "--proxy", tiny_proxy_dir, "--index", index_dir]
  cases = [(f"--images ({name})", base + ["--images", path], fragment)
           for name, (path, fragment) in folders.items()]
  cases += [("-k 0", base + ["--task", "digits:0,1", "-k", "0"], "-k must be >= 1"),
            ("-k -5", base + ["--task", "digits:0,1", "-k", "-5"], "-k must be >= 1"),
            ("-k 1.5", base + ["--task", "digits:0,1", "-k", "1.5"], "invalid int value"),
            ("--task without classes", base + ["--task", "digits"], "--task must be"),
            ("--task of one class", base + ["--task", "digits:0"], ""),
            ("--task with an unknown class", base + ["--task", "digits:0,99"], "99"),
            ("--task of an unknown source", base + ["--task", "nosuch:0,1"], "nosuch"),
            ("--shots 0", base + ["--task", "digits:0,1", "--shots", "0"], ""),
            ("--set an unknown key", base + ["--task", "digits:0,1", "--set", "match.bogus=1"],
             "bogus")]
  for what, argv, fragment in cases:
    rc, _, err = _run(capsys, argv)
    assert rc == 2, (what, rc, err)
    _one_line(err, what, fragment)
  assert _sums(tiny_proxy_dir) == before["proxy"] and _sums(index_dir) == before["index"]


# ---- index edits ---------------------------------------------------------------------------------

def _state(index):
  """Everything an index holds, for comparing before and after a refused edit."""
  classes = index.classes
  return (list(index.ids), index.vectors.copy(), [index.metadata(m) for m in index.ids],
          None if classes is None else {k: np.array(v) for k, v in classes.items()},
          None if index.pool is None else index.pool.copy())


def _same_state(a, b) -> bool:
  ids_a, vec_a, meta_a, cls_a, pool_a = a
  ids_b, vec_b, meta_b, cls_b, pool_b = b
  same_classes = (cls_a is None) == (cls_b is None) and (
      cls_a is None or all(np.array_equal(cls_a[k], cls_b[k]) for k in cls_a))
  same_pool = (pool_a is None) == (pool_b is None) and (
      pool_a is None or np.array_equal(pool_a, pool_b))
  return (ids_a == ids_b and np.array_equal(vec_a, vec_b) and meta_a == meta_b and same_classes
          and same_pool)


def test_refused_index_edits(tiny_proxy, tiny_proxy_dir, tiny_index, tiny_zoo_dir, tmp_path,
                             capsys):
  """Duplicated ids in one add, ids already present, unknown ids to remove (alone or beside
  known ones), ids that are not strings, vectors of the wrong shape or with NaN, rows without the
  class knowledge the index holds, and black boxes already in the index or failing: each refused
  with IndexStoreError (BlackBoxError for a failing black box) on one line naming the id or the
  problem, and the index is unchanged (ids, vectors, metadata, class knowledge, pool), in memory
  and, through ``know2vec index remove|add``, on disk."""
  path = tiny_index.save(tmp_path / "index")
  index = ModelIndex.load(path)
  ids, e = index.ids, index.dim
  rng = np.random.default_rng(SEED + 3)
  known = ids[rng.integers(len(ids))]
  other = [i for i in ids if i != known][rng.integers(len(ids) - 1)]
  unit = np.eye(e, dtype=np.float32)[:2]
  cls = {k: v[:2] for k, v in index.classes.items()}
  cases = [
      ("duplicated id in one add", lambda: index.add_vectors(["new", "new"], unit, classes=cls),
       "duplicate model id 'new'"),
      ("id already present", lambda: index.add_vectors(["new", known], unit, classes=cls),
       f"model id {known!r} is already in the index"),
      ("empty id", lambda: index.add_vectors(["", "new"], unit, classes=cls), "non-empty"),
      ("an int id", lambda: index.add_vectors([7, "new"], unit, classes=cls), "got 7"),
      ("a string for the ids", lambda: index.add_vectors("new", unit[:1], classes=cls),
       "ids must be a list"),
      ("vectors of another size", lambda: index.add_vectors(["new"], np.ones((1, e + 1)),
                                                            classes=cls), "shape"),
      ("NaN vector", lambda: index.add_vectors(["n1", "n2"], unit * np.nan, classes=cls),
       "non-finite"),
      ("no class knowledge", lambda: index.add_vectors(["n1", "n2"], unit),
       "new models need theirs too"),
      ("unknown id to remove", lambda: index.remove(["nope"]), "unknown model id 'nope'"),
      ("known and unknown ids", lambda: index.remove([known, other, "nope"]),
       "unknown model id 'nope'"),
      ("an int to remove", lambda: index.remove(5), "ids must be"),
      ("a list id to remove", lambda: index.remove([[known]]), "unknown model id"),
      ("a black box already in the index", lambda: tiny_proxy.build_index(
          [CallableBlackBox(lambda z: np.zeros((len(z), 2)), 2, SHAPE, model_id=known)],
          index=index), f"e.g. {known!r}"),
  ]
  for what, fn, fragment in cases:
    state = _state(index)
    _refused(fn, IndexStoreError, what, fragment)
    assert _same_state(state, _state(index)), f"{what}: the index changed"

  # A failing black box given a new index and its own pool: the index gets neither rows nor pool.
  def down(z):
    raise ConnectionError("server down")
  fresh = ModelIndex(e)
  pool = np.random.default_rng(0).random((8,) + SHAPE, np.float32)
  _refused(lambda: tiny_proxy.build_index([CallableBlackBox(down, 2, SHAPE, model_id="remote")],
                                          index=fresh, pool=pool),
           BlackBoxError, "failing black box with a pool", "server down")
  assert len(fresh) == 0 and fresh.pool is None, "the refused build left its pool in the index"

  # The command: the saved index is not written to by a refused edit.
  saved = _sums(path)
  for what, argv, fragment in [
      ("remove unknown", ["index", "remove", "--index", path, known, "nope"],
       "unknown model id 'nope'"),
      ("add present", ["index", "add", "--proxy", tiny_proxy_dir, "--zoo", tiny_zoo_dir,
                       "--index", path, "--models", known, "--quiet"], "already in the index"),
      ("add unknown", ["index", "add", "--proxy", tiny_proxy_dir, "--zoo", tiny_zoo_dir,
                       "--index", path, "--models", "nope", "--quiet"], "'nope'")]:
    rc, _, err = _run(capsys, argv)
    assert rc == 2, (what, rc, err)
    _one_line(err, what, fragment)
    assert _sums(path) == saved, f"{what}: the saved index changed"
  assert ModelIndex.load(path).ids == ids
