"""ZooStore: a zoo on disk. Parameters with orbax-checkpoint, metadata as JSON, atomic writes.

Layout of a zoo directory::

    zoo.json               manifest: format, version, image shape, stacks, one record per model
    params/<stack name>/   orbax checkpoint of the stack's parameters (leading model axis)

A zoo is written into a sibling temporary directory; the manifest is written last, then the
directory is renamed into place. An interrupted write therefore never leaves a directory that loads
as a complete zoo, and an existing zoo at the same path stays intact until the new one is complete.
"""

from __future__ import annotations

import os
import pathlib

import jax
from flax import nnx

from know2vec_jax import storage
from know2vec_jax.zoo import train as train_lib
from know2vec_jax.zoo.zoo import ModelRecord, Zoo, ZooError, ZooStack

FORMAT = "know2vec-zoo"
VERSION = 2  # 2: checksums and shapes of every stack in the manifest
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
      "models": [r.to_json() for r in zoo.records.values()],
      "build": build_info or {},
  }
  return storage.save_artifact(
      path, {f"params/{name}": nnx.to_pure_dict(stack.params) for name, stack in zoo.stacks.items()},
      MANIFEST, manifest)


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of a stored zoo (no weights loaded); raises ZooError if it is not a zoo."""
  return storage.read_manifest(path, MANIFEST, FORMAT, VERSION, "zoo", ZooError,
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
  except (KeyError, TypeError, ValueError) as e:
    raise ZooError(f"{root / MANIFEST} is corrupted: {type(e).__name__}: {e}") from e
  states, targets = {}, {}
  for name, (spec, ids) in specs.items():
    state = nnx.state(nnx.eval_shape(lambda spec=spec: spec.make(0)))
    states[name] = jax.tree.map(lambda a: jax.ShapeDtypeStruct((len(ids),) + a.shape, a.dtype),
                                state)
    targets[f"params/{name}"] = nnx.to_pure_dict(states[name])
  restored = storage.restore_trees(root, manifest, targets, "zoo", ZooError)
  stacks = {}
  for name, (spec, ids) in specs.items():
    state = states[name]
    nnx.replace_by_pure_dict(state, restored[f"params/{name}"])
    stacks[name] = ZooStack(name, spec, ids, state)
  for r in records.values():
    if r.stack not in stacks or stacks[r.stack].model_ids[r.stack_index] != r.model_id:
      raise ZooError(f"zoo {root} is inconsistent: model {r.model_id!r} not at "
                     f"{r.stack}[{r.stack_index}]")
  return Zoo(image_shape, stacks, records)
