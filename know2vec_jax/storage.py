"""Atomic, verified on-disk artifacts: the one place that writes and reads stored state.

Two kinds of storage, both all-or-nothing and both verified on load:

- **Artifacts** (zoo, backbone, proxy, index): a directory with orbax checkpoints of pytrees plus a
  JSON manifest. :func:`save_artifact` writes into a sibling temporary directory, checkpoints
  first, manifest last (with a SHA-256 checksum and the shapes of every tree, and its own
  checksum), then renames it into place. :func:`read_manifest` + :func:`restore_trees` read it
  back and refuse a manifest whose content does not match its checksum and anything whose shapes,
  dtypes or checksum differ from what the manifest recorded.
- **Array files** (caches: knowledge, query episodes, fine-tune ground truth): one ``.npz`` with
  its metadata and checksum inside, written through a temporary file and renamed
  (:func:`save_arrays`, :func:`load_arrays`). The same bytes in memory (:func:`pack_arrays`,
  :func:`unpack_arrays`) carry a process's part of a multi-process stage to the other processes
  (:mod:`know2vec_jax.distributed`).

An interrupted write never leaves a path that loads as complete, and whatever was stored at the
path before stays intact until its replacement is complete. That holds for a process killed at
any point of a save (SIGKILL, no clean-up code): the next load or save of the path finishes or
undoes the interrupted replacement (:func:`recover_dir`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
import threading
import uuid
from typing import Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


def pure(tree) -> dict:
  """A pytree of arrays (or an NNX state) as a pure tree of host numpy arrays: the form orbax
  writes and checksums are computed on."""
  from flax import nnx
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  # Shapes alone (a model built abstractly, as a restore target) stay shapes.
  return jax.tree.map(lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else np.asarray(a), tree)


def checksum(tree) -> str:
  """SHA-256 over the paths, dtypes, shapes and bytes of a pytree's leaves (order-stable)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(p): [str(np.asarray(a).dtype), list(np.shape(a))]
          for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _checkpointer() -> ocp.StandardCheckpointer:
  """orbax's checkpointer for this process's own reads and writes.

  In a multi-process run orbax would treat every save and restore as one collective operation
  of all processes (barriers between them); here an artifact is written by process 0 alone and
  read by each process on its own, so each process is its own primary host with no one to wait
  for.
  """
  if jax.process_count() == 1:
    return ocp.StandardCheckpointer()
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"know2vec-{me}"))


def json_ready(obj):
  """``obj`` as it reads back from JSON (numpy scalars become floats)."""
  return json.loads(json.dumps(obj, default=float))


# The manifest's own checksum field: every other field's SHA-256, so that a damaged or hand-edited
# manifest (a model's task, a row's metadata, which the array checksums do not cover) is refused.
# Artifacts written before it have none and still load.
MANIFEST_CHECKSUM = "manifest_sha256"


def manifest_checksum(manifest: Mapping) -> str:
  """SHA-256 of a manifest's content: every field but :data:`MANIFEST_CHECKSUM`, as JSON with
  sorted keys (the same before writing and after reading back).

  Args:
    manifest: the manifest (JSON-serialisable).

  Returns:
    The hex digest.
  """
  body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}))
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file, fsynced, then renamed: a reader sees
  the old file or the new one, never part of it."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_json_atomic(path: pathlib.Path, obj) -> None:
  """Writes JSON to ``path`` as :func:`write_text_atomic` does."""
  write_text_atomic(path, json.dumps(obj, indent=1))


# A save can be killed at any instruction (SIGKILL, power loss). The tests kill a process at each
# of these points through the environment variable below and check that the path then loads as
# the old artifact or the new one (tests/test_storage_crash.py); it is not meant for users.
FAULT_POINTS = ("staged", "aside", "replaced")
_FAULT_ENV = "KNOW2VEC_TEST_KILL_AT"


def _fault_point(name: str) -> None:
  if os.environ.get(_FAULT_ENV) == name:
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up code runs, as in a real crash


def _aside_copies(target: pathlib.Path) -> list[pathlib.Path]:
  """The ``.NAME.old-*`` directories a replacement of ``target`` moved aside, newest first."""
  if not target.parent.is_dir():
    return []
  olds = [p for p in target.parent.glob(f".{target.name}.old-*") if p.is_dir()]
  return sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True)


def recover_dir(target) -> None:
  """Finishes or undoes a directory replacement that a crash interrupted.

  A replacement renames the old directory aside, renames the new one into place, then removes
  the aside copy. Killed between the two renames, it leaves no directory at ``target``: the aside
  copy is renamed back (the save did not finish, so the old artifact stays). Killed after the
  second rename, the aside copy is left over: it is removed.

  Args:
    target: the artifact directory.
  """
  target = pathlib.Path(target).expanduser().absolute()
  olds = _aside_copies(target)
  if olds and not target.exists():
    try:
      os.rename(olds[0], target)  # fails, harmlessly, if a writer put a new one in place first
      olds = olds[1:]
    except OSError:
      pass
  if target.exists():
    for old in olds:
      shutil.rmtree(old, ignore_errors=True)


def replace_dir_atomic(staging: pathlib.Path, target: pathlib.Path) -> None:
  """Moves a finished ``staging`` directory to ``target``, replacing what was there.

  The old directory is renamed aside first and removed only after the new one is in place; a
  crash between the two renames is undone by :func:`recover_dir`, which every artifact load and
  save runs first.
  """
  recover_dir(target)
  _fault_point("staged")
  old = None
  if target.exists():
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    _fault_point("aside")
  try:
    os.replace(staging, target)
  except BaseException:
    if old is not None:
      os.replace(old, target)
    raise
  _fault_point("replaced")
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def save_artifact(path, trees: Mapping[str, object], manifest_name: str, manifest: dict
                  ) -> pathlib.Path:
  """Writes an artifact directory atomically, recording every tree's checksum and shapes.

  Args:
    path: the directory (created, or replaced once the new one is complete).
    trees: relative sub-directory -> pytree of arrays (or NNX state), each saved with orbax.
    manifest_name: the manifest's file name; written last, it marks the artifact complete.
    manifest: JSON-serialisable manifest; ``checksums`` and ``shapes`` are added to it.

  Returns:
    The absolute path written.

  Raises:
    RuntimeError: a process other than 0 of a multi-process run (orbax writes host arrays from
      process 0 only; each process's own part is an array file, :func:`save_arrays`).
  """
  target = pathlib.Path(path).expanduser().absolute()
  if trees and jax.process_count() > 1 and jax.process_index() != 0:
    # orbax writes host (numpy) arrays from process 0 only: another process's save would leave
    # a manifest without its data.
    raise RuntimeError(f"process {jax.process_index()} cannot write the artifact {target}: in a "
                       "multi-process run artifacts are written by process 0 "
                       "(know2vec_jax.distributed.on_writer)")
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
  staging.mkdir()
  try:
    host = {rel: pure(tree) for rel, tree in trees.items()}
    manifest = dict(manifest, checksums={rel: checksum(t) for rel, t in host.items()},
                    shapes={rel: _shapes(t) for rel, t in host.items()})
    manifest[MANIFEST_CHECKSUM] = manifest_checksum(manifest)
    if host:
      with _checkpointer() as ckpt:
        for rel, tree in host.items():
          ckpt.save(staging / rel, tree)
        ckpt.wait_until_finished()
    write_json_atomic(staging / manifest_name, manifest)
    replace_dir_atomic(staging, target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return target


def read_manifest(path, manifest_name: str, fmt: str, version: int, what: str,
                  error: type[Exception] = ValueError, hint: str = "") -> dict:
  """Reads and checks an artifact's manifest.

  Args:
    path: the artifact directory.
    manifest_name: its manifest file name.
    fmt, version: the expected ``format`` and ``version`` fields.
    what: the artifact's name in messages ("zoo", "index", ...).
    error: the exception class to raise.
    hint: appended to the "does not exist" message (how to make one).

  Returns:
    The manifest dict.

  Raises:
    ``error``: a missing directory or manifest, unreadable JSON, another format or version.
  """
  root = pathlib.Path(path).expanduser().absolute()
  recover_dir(root)
  f = root / manifest_name
  if not root.is_dir():
    raise error(f"no {what} at {root}: directory does not exist{hint}")
  if not f.is_file():
    raise error(f"{root} is not a complete {what}: {manifest_name} is missing (an interrupted "
                "write?)")
  try:
    manifest = json.loads(f.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{f} is corrupted: {e}") from e
  if not isinstance(manifest, dict) or manifest.get("format") != fmt:
    raise error(f"{f} is not a know2vec {what} manifest")
  readable = version if isinstance(version, tuple) else (version,)
  if manifest.get("version") not in readable:
    raise error(f"{f} has {what} format version {manifest.get('version')!r}; this know2vec-jax "
                f"reads version {' or '.join(map(str, readable))}{hint}")
  if MANIFEST_CHECKSUM in manifest and manifest[MANIFEST_CHECKSUM] != manifest_checksum(manifest):
    raise error(f"{f} is corrupted: its content does not match the {MANIFEST_CHECKSUM} it "
                "records (damaged or edited by hand)")
  return manifest


# A restore that fails on one damaged array leaves orbax's other reads of the checkpoint in
# flight: orbax closes its event loop as soon as the first read raises, and the reads that finish
# later report it on stderr, milliseconds after the caller's one-line error: tensorstore as an
# unraisable "RuntimeError: Event loop is closed" (from asyncio's call_soon_threadsafe), asyncio as
# "Task exception was never retrieved" for a read of the same damaged files. Both only repeat
# the error already raised, so after a failed restore they are dropped; anything else passes.
_abandoned: set[str] = set()
_abandoned_lock = threading.Lock()


def _abandoned_read_noise(unraisable) -> bool:
  """Whether an unraisable exception is a late read's callback into orbax's closed loop."""
  if (unraisable.object is not None or not isinstance(unraisable.exc_value, RuntimeError)
      or str(unraisable.exc_value) != "Event loop is closed"):
    return False
  tb = unraisable.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


class _AbandonedTaskFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for reads of a failed checkpoint."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and record.getMessage().startswith(
        "Task exception was never retrieved") and any(d in str(exc) for d in _abandoned))


def _quiet_abandoned_reads(ckpt_dir: pathlib.Path) -> None:
  """Silences the late reports of the reads a failed restore of ``ckpt_dir`` left in flight."""
  with _abandoned_lock:
    if not _abandoned:  # the first failure in this process
      logging.getLogger("asyncio").addFilter(_AbandonedTaskFilter())
    _abandoned.add(str(ckpt_dir))
    # Wrapped again whenever someone (a test runner) has put its own hook in place since.
    if not getattr(sys.unraisablehook, "quiets_abandoned_reads", False):
      previous = sys.unraisablehook

      def hook(unraisable):
        if not _abandoned_read_noise(unraisable):
          previous(unraisable)
      hook.quiets_abandoned_reads = True
      sys.unraisablehook = hook


def restore_trees(path, manifest: dict, targets: Mapping[str, object], what: str,
                  error: type[Exception] = ValueError) -> dict[str, object]:
  """Restores an artifact's checkpoints and verifies them against its manifest.

  Args:
    path: the artifact directory.
    manifest: its manifest (from :func:`read_manifest`).
    targets: relative sub-directory -> a pytree with the expected structure, shapes and dtypes
      (arrays or ``jax.ShapeDtypeStruct`` leaves).
    what: the artifact's name in messages.
    error: the exception class to raise.

  Returns:
    Relative sub-directory -> the restored pure tree of numpy arrays.

  Raises:
    ``error``: a missing or unreadable checkpoint, or one whose shapes, dtypes or checksum differ
      from what the manifest recorded (the message names the path).
  """
  root = pathlib.Path(path).expanduser().absolute()
  sums = manifest.get("checksums")
  if not isinstance(sums, dict):
    raise error(f"{root} is corrupted: its manifest records no checksums")
  out = {}
  with _checkpointer() as ckpt:
    for rel, target in targets.items():
      ckpt_dir = root / rel
      if not ckpt_dir.is_dir():
        raise error(f"{what} {root} is corrupted: {rel} checkpoint missing ({ckpt_dir})")
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), target)
      try:
        tree = pure(ckpt.restore(ckpt_dir, abstract))
      except Exception as e:  # orbax raises many types for a damaged checkpoint
        _quiet_abandoned_reads(ckpt_dir)
        raise error(f"{what} {root}: cannot read the {rel} checkpoint {ckpt_dir}: "
                    f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
      # orbax restores the stored shapes whatever the target says, so compare them.
      got = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)
      want = jax.tree.map(lambda a: (tuple(np.shape(a)), np.dtype(a.dtype)), abstract)
      if got != want or checksum(tree) != sums.get(rel):
        raise error(f"{what} {root} is corrupted: the {rel} checkpoint {ckpt_dir} does not "
                    "match the checksum and shapes recorded in its manifest")
      out[rel] = tree
  return out


def save_arrays(path, arrays: Mapping[str, np.ndarray], meta: dict | None = None
                ) -> pathlib.Path:
  """Writes a dict of arrays plus JSON metadata to one ``.npz`` file, atomically, with a checksum.

  Args:
    path: the file (its directory is created).
    arrays: name -> array (names must not start with ``__``).
    meta: JSON-serialisable metadata stored beside them.

  Returns:
    The absolute path written.
  """
  path = pathlib.Path(path).expanduser().absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.npz")
  try:
    _write_npz(tmp, arrays, meta)  # streamed to the file: a zoo part can be large
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def pack_arrays(arrays: Mapping[str, np.ndarray], meta: dict | None = None) -> bytes:
  """A dict of arrays plus JSON metadata as the bytes of one ``.npz`` with its checksum inside
  (what :func:`save_arrays` writes), for sending a part to other processes.

  Args:
    arrays: name -> array (names must not start with ``__``).
    meta: JSON-serialisable metadata.

  Returns:
    The bytes; :func:`unpack_arrays` reads and verifies them.
  """
  buf = io.BytesIO()
  _write_npz(buf, arrays, meta)
  return buf.getvalue()


def _write_npz(target, arrays: Mapping[str, np.ndarray], meta: dict | None) -> None:
  """The arrays and a header (``meta``, the arrays' checksum) as one ``.npz`` into ``target``
  (a path or a file object)."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  header = {"meta": meta or {}, "checksum": checksum(arrays)}
  np.savez(target, __header__=np.asarray(json.dumps(header)), **arrays)


def unpack_arrays(blob: bytes, what: str, error: type[Exception] = ValueError
                  ) -> tuple[dict[str, np.ndarray], dict]:
  """Reads :func:`pack_arrays` bytes and verifies their checksum.

  Args:
    blob: the bytes.
    what: names the blob in messages (e.g. "the knowledge part of process 1").
    error: the exception class to raise.

  Returns:
    (arrays, metadata).

  Raises:
    ``error``: truncated, unreadable or tampered bytes.
  """
  return _read_npz(io.BytesIO(blob), f"{what} is unreadable", f"{what} is corrupted", error)


def _read_npz(source, unreadable: str, corrupted: str, error: type[Exception]
              ) -> tuple[dict[str, np.ndarray], dict]:
  """(arrays, metadata) of a :func:`pack_arrays` ``.npz`` (a path or a file object), its checksum
  verified; ``error`` with ``unreadable`` or ``corrupted`` (the message's start) otherwise."""
  try:
    with np.load(source, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays.pop("__header__")))
  except Exception as e:  # zip, CRC, JSON or key errors: all mean damaged bytes
    raise error(f"{unreadable}: {type(e).__name__}: {e}") from None
  if checksum(arrays) != header.get("checksum"):
    raise error(f"{corrupted}: its arrays do not match the recorded checksum")
  return arrays, header.get("meta", {})


def load_arrays(path, error: type[Exception] = ValueError,
                check: Callable[[dict, dict], str | None] | None = None
                ) -> tuple[dict[str, np.ndarray], dict]:
  """Reads a :func:`save_arrays` file and verifies its checksum.

  Args:
    path: the file.
    error: the exception class to raise.
    check: optional ``check(arrays, meta)`` returning a problem description, or None if the
      content is what the caller expects (shapes, ids).

  Returns:
    (arrays, metadata).

  Raises:
    ``error``: an unreadable, truncated or tampered file, or one ``check`` refuses.
  """
  path = pathlib.Path(path)
  arrays, meta = _read_npz(path, f"unreadable cache file {path}",
                           f"cache file {path} is corrupted", error)
  problem = check(arrays, meta) if check is not None else None
  if problem:
    raise error(f"cache file {path} does not match the request: {problem}")
  return arrays, meta
