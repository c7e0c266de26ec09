"""Saves that survive a kill: a process saving over an artifact is SIGKILLed at each step of the
replacement, and the path then loads as the old artifact or the new one, never as nothing."""

import os
import subprocess
import sys

import numpy as np
import pytest

from know2vec_jax import storage

# The subprocess runs this module's own _save_here.
SAVE = ("import sys; sys.path.insert(0, sys.argv[3]); import test_storage_crash as t; "
        "t._save_here(sys.argv[1], int(sys.argv[2]))")
# Which artifact each kill point leaves: the old one until the new one is renamed in.
SURVIVOR = {"staged": 1, "aside": 1, "replaced": 2}


def _save_here(path, tag: int) -> None:
  storage.save_artifact(path, {"w": {"a": np.full(3, float(tag))}}, "m.json",
                        {"format": "crash-test", "version": 1, "tag": tag})


def _save_killed(path, tag: int, kill_at: str) -> int:
  """Saves in a subprocess that SIGKILLs itself at ``kill_at``; its return code."""
  env = dict(os.environ)
  env[storage._FAULT_ENV] = kill_at
  here = os.path.dirname(os.path.abspath(__file__))
  return subprocess.run([sys.executable, "-c", SAVE, str(path), str(tag), here], env=env,
                        timeout=120).returncode


def _load(path) -> int:
  m = storage.read_manifest(path, "m.json", "crash-test", 1, "test artifact")
  trees = storage.restore_trees(path, m, {"w": {"a": np.zeros(3)}}, "test artifact")
  assert np.all(np.asarray(trees["w"]["a"]) == m["tag"])  # the data is the manifest's own
  return m["tag"]


@pytest.mark.parametrize("point", storage.FAULT_POINTS)
def test_a_save_killed_at_each_step_leaves_the_old_or_the_new_artifact(tmp_path, point):
  survivor = SURVIVOR[point]
  target = tmp_path / "artifact"
  _save_here(target, 1)
  assert _save_killed(target, 2, point) == -9  # killed: no clean-up code ran
  if point == "aside":
    # The crash left no directory at the path, only the aside copy: a load must restore it.
    assert not target.exists() and storage._aside_copies(target)
  assert _load(target) == survivor
  assert not storage._aside_copies(target)  # nothing left over after the load
  # And the next save goes through as usual.
  _save_here(target, 3)
  assert _load(target) == 3


def test_a_save_recovers_an_interrupted_one_before_replacing(tmp_path):
  """The state a kill between the two renames leaves (no directory, an aside copy), met by a
  save rather than a load: the save puts its artifact in place and leaves no copy behind."""
  target = tmp_path / "artifact"
  _save_here(target, 1)
  os.rename(target, target.with_name(f".{target.name}.old-0badc0de"))
  _save_here(target, 2)
  assert _load(target) == 2 and not storage._aside_copies(target)
