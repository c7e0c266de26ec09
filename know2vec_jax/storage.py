"""Atomic on-disk artifacts: orbax pytrees plus a JSON manifest, all-or-nothing.

Every stored artifact of the project (zoo, index, backbone) is a directory written the same way:
into a sibling temporary directory, orbax checkpoints first, the manifest last, then renamed into
place. An interrupted write never leaves a directory that loads as complete, and an artifact
already at the path stays intact until its replacement is complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid

import orbax.checkpoint as ocp


def write_json_atomic(path: pathlib.Path, obj) -> None:
  """Writes JSON to ``path`` through a temporary file, fsynced, then renamed."""
  tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def replace_dir_atomic(staging: pathlib.Path, target: pathlib.Path) -> None:
  """Moves a finished ``staging`` directory to ``target``, replacing what was there.

  The old directory is renamed aside first and removed only after the new one is in place.
  """
  old = None
  if target.exists():
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
  try:
    os.replace(staging, target)
  except BaseException:
    if old is not None:
      os.replace(old, target)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def save_artifact(path, trees: dict, manifest_name: str, manifest: dict) -> pathlib.Path:
  """Writes an artifact directory atomically.

  Args:
    path: the directory (created, or replaced once the new one is complete).
    trees: relative sub-directory -> pytree of arrays, each saved with orbax.
    manifest_name: the manifest's file name; written last, it marks the artifact complete.
    manifest: JSON-serialisable manifest.

  Returns:
    The absolute path written.
  """
  target = pathlib.Path(path).expanduser().absolute()
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
  staging.mkdir()
  try:
    if trees:
      with ocp.StandardCheckpointer() as ckpt:
        for rel, tree in trees.items():
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
  if manifest.get("version") != version:
    raise error(f"{f} has {what} format version {manifest.get('version')!r}; this know2vec-jax "
                f"reads version {version}")
  return manifest
