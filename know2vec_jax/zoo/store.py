"""ZooStore: a zoo on disk. Parameters with orbax-checkpoint, metadata as JSON, atomic writes.

Layout of a zoo directory::

    zoo.json               manifest: format, version, image shape, stacks, estimator sets, one
                           record per model
    params/<stack name>/   orbax checkpoint of the stack's parameters (leading model axis)
    estimators/<set name>/ orbax checkpoint of a scikit-learn family's estimators: their skops
                           bytes back to back (uint8) and the offsets (int64 [M + 1])

A zoo is written into a sibling temporary directory; the manifest is written last, then the
directory is renamed into place. An interrupted write therefore never leaves a directory that loads
as a complete zoo, and an existing zoo at the same path stays intact until the new one is complete.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
from flax import nnx

from know2vec_jax import storage
from know2vec_jax.zoo import train as train_lib
from know2vec_jax.zoo.estimators import EstimatorSet
from know2vec_jax.zoo.zoo import ModelRecord, Zoo, ZooError, ZooStack

FORMAT = "know2vec-zoo"
VERSION = 3  # 3: estimator sets (scikit-learn families) beside the Flax stacks
READS = (2, 3)  # a version-2 zoo is a version-3 zoo without estimator sets
MANIFEST = "zoo.json"


def save_zoo(zoo: Zoo, path: str | os.PathLike, build_info: dict | None = None) -> pathlib.Path:
  """Writes a zoo atomically.

  Args:
    zoo: the zoo.
    path: the zoo directory (created or replaced).
    build_info: optional build facts stored in the manifest (time, strategy, ...).

  Returns:
    The absolute path written.
  """
  manifest = {
      "format": FORMAT, "version": VERSION, "image_shape": list(zoo.image_shape),
      "stacks": [{"name": s.name, "arch": s.spec.arch, "num_classes": s.spec.num_classes,
                  "conv_impl": s.spec.conv_impl, "model_ids": s.model_ids}
                 for s in zoo.stacks.values()],
      "estimators": [{"name": e.name, "family": e.family, "num_classes": e.num_classes,
                      "model_ids": e.model_ids, "bytes": [len(b) for b in e.blobs]}
                     for e in zoo.estimators.values()],
      "models": [r.to_json() for r in zoo.records.values()],
      "build": build_info or {},
  }
  trees = {f"params/{name}": nnx.to_pure_dict(stack.params) for name, stack in zoo.stacks.items()}
  trees |= {f"estimators/{name}": e.pack() for name, e in zoo.estimators.items()}
  return storage.save_artifact(path, trees, MANIFEST, manifest)


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of a stored zoo (no weights loaded); raises ZooError if it is not a zoo."""
  return storage.read_manifest(path, MANIFEST, FORMAT, READS, "zoo", ZooError,
                               hint=" (build one with `know2vec zoo build --force`)")


def load_zoo(path: str | os.PathLike, conv_impl: str | None = None) -> Zoo:
  """Loads a stored zoo: the same parameters, bit for bit, without retraining.

  Args:
    path: the zoo directory.
    conv_impl: override the stored convolution lowering (same parameters, same function).

  Returns:
    The :class:`Zoo`.

  Raises:
    ZooError: missing, incomplete or corrupted zoo (every stack is checked against the shapes
      and checksum recorded at save time).
  """
  root = pathlib.Path(path).expanduser().absolute()
  manifest = read_manifest(root)
  try:
    image_shape = tuple(manifest["image_shape"])
    records = {d["model_id"]: ModelRecord.from_json(d) for d in manifest["models"]}
    specs = {s["name"]: (train_lib.StackSpec(s["arch"], s["num_classes"], image_shape,
                                             conv_impl or s["conv_impl"]), list(s["model_ids"]))
             for s in manifest["stacks"]}
    est_specs = {e["name"]: (e["family"], int(e["num_classes"]), list(e["model_ids"]),
                             [int(b) for b in e["bytes"]])
                 for e in manifest.get("estimators", [])}
  except (KeyError, TypeError, ValueError) as e:
    raise ZooError(f"{root / MANIFEST} is corrupted: {type(e).__name__}: {e}") from e
  states, targets = {}, {}
  for name, (spec, ids) in specs.items():
    state = nnx.state(nnx.eval_shape(lambda spec=spec: spec.make(0)))
    states[name] = jax.tree.map(lambda a: jax.ShapeDtypeStruct((len(ids),) + a.shape, a.dtype),
                                state)
    targets[f"params/{name}"] = nnx.to_pure_dict(states[name])
  for name, (_, _, ids, sizes) in est_specs.items():
    targets[f"estimators/{name}"] = {"blob": np.zeros((sum(sizes),), np.uint8),
                                     "offsets": np.zeros((len(ids) + 1,), np.int64)}
  restored = storage.restore_trees(root, manifest, targets, "zoo", ZooError)
  stacks = {}
  for name, (spec, ids) in specs.items():
    state = states[name]
    nnx.replace_by_pure_dict(state, restored[f"params/{name}"])
    stacks[name] = ZooStack(name, spec, ids, state)
  estimators = {name: EstimatorSet(name, family, k, image_shape, ids,
                                   EstimatorSet.unpack(restored[f"estimators/{name}"]))
                for name, (family, k, ids, _) in est_specs.items()}
  for r in records.values():
    held = stacks.get(r.stack) or estimators.get(r.stack)
    if held is None or held.model_ids[r.stack_index] != r.model_id:
      raise ZooError(f"zoo {root} is inconsistent: model {r.model_id!r} not at "
                     f"{r.stack}[{r.stack_index}]")
  return Zoo(image_shape, stacks, records, estimators)
