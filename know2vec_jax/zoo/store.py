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

A zoo built by several processes (:func:`know2vec_jax.zoo.build.build_zoo_to`) is first written
as **parts**, one file per process, in a hidden sibling directory ``.<name>.parts-<run>/``:
``part-<i>-of-<n>.npz`` (written atomically with its checksum, :func:`save_part`) holds the
chunks process i trained (their parameters, or their estimators' skops bytes), and in its
metadata the run, its position, the chunks' model ids and each model's accuracies. Process 0
reads every part back (:func:`load_part`: present, intact, of this run, exactly the chunks it was
assigned) and only then writes the zoo. A part never loads as a zoo (it has no ``zoo.json``), and
the parts directory is removed once the zoo is written.

A build that does not finish (a process lost or failed, the run killed) leaves its parts
directory behind. The next build of the same zoo, with any number of processes, removes every
``.<name>.parts-*`` directory first (:func:`remove_leftover_parts`, one line on stderr naming
them): process 0 does it before the processes agree on the new run's id, so before any process
writes a part. Leftover parts are not resumed: each part records its run, and a new run trains
its chunks again. Two builds of the same zoo at the same time are not supported (the later one
would remove the earlier one's parts).
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil

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
  """The manifest of a stored zoo (no weights loaded); raises ZooError if it is not a zoo or its
  model records are not a list of dicts with a model_id."""
  manifest = storage.read_manifest(path, MANIFEST, FORMAT, READS, "zoo", ZooError,
                                   hint=" (build one with `know2vec zoo build --force`)")
  models = manifest.get("models")
  if not isinstance(models, list) or not all(
      isinstance(m, dict) and isinstance(m.get("model_id"), str) for m in models):
    raise ZooError(f"{pathlib.Path(path).expanduser().absolute() / MANIFEST} is corrupted: its "
                   "models are not a list of model records with a model_id")
  return manifest


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
  states, targets = {}, {}
  # Every field the loader reads is checked here: a manifest with a wrong type or value anywhere
  # is "corrupted", never a TypeError from deep inside the model definitions.
  try:
    image_shape = tuple(int(d) for d in manifest["image_shape"])
    if len(image_shape) != 3 or min(image_shape) < 1:
      raise ValueError(f"image_shape {list(image_shape)}")
    records = {d["model_id"]: ModelRecord.from_json(d) for d in manifest["models"]}
    if not all(isinstance(m, str) and isinstance(r.stack, str) and isinstance(r.stack_index, int)
               for m, r in records.items()):
      raise ValueError("a model record's model_id, stack or stack_index has the wrong type")
    specs = {s["name"]: (train_lib.StackSpec(s["arch"], s["num_classes"], image_shape,
                                             conv_impl or s["conv_impl"]), list(s["model_ids"]))
             for s in manifest["stacks"]}
    est_specs = {e["name"]: (e["family"], int(e["num_classes"]), list(e["model_ids"]),
                             [int(b) for b in e["bytes"]])
                 for e in manifest.get("estimators", [])}
    for name, (spec, ids) in specs.items():
      states[name] = stack_state(spec, len(ids))  # refuses an unknown arch, a bad num_classes
      targets[f"params/{name}"] = nnx.to_pure_dict(states[name])
    for name, (_, _, ids, sizes) in est_specs.items():
      targets[f"estimators/{name}"] = {"blob": np.zeros((sum(sizes),), np.uint8),
                                       "offsets": np.zeros((len(ids) + 1,), np.int64)}
  except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
    raise ZooError(f"{root / MANIFEST} is corrupted: {type(e).__name__}: {e}") from e
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
    if (held is None or not 0 <= r.stack_index < len(held.model_ids)
        or held.model_ids[r.stack_index] != r.model_id):
      raise ZooError(f"zoo {root} is inconsistent: model {r.model_id!r} not at "
                     f"{r.stack}[{r.stack_index}]")
  held_ids = [m for h in (*stacks.values(), *estimators.values()) for m in h.model_ids]
  if len(held_ids) != len(records):  # a stored model without its record (or held twice)
    missing = [m for m in held_ids if m not in records]
    raise ZooError(f"zoo {root} is inconsistent: {len(held_ids)} stored models but "
                   f"{len(records)} model records" + (f" (none for {missing[0]!r})" if missing
                                                      else ""))
  return Zoo(image_shape, stacks, records, estimators)


def stack_state(spec: train_lib.StackSpec, num_models: int) -> nnx.State:
  """The abstract NNX state (shapes and dtypes only) of a stack of ``num_models`` models."""
  state = nnx.state(nnx.eval_shape(lambda: spec.make(0)))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((num_models,) + a.shape, a.dtype), state)


# ---- parts of a zoo built by several processes -------------------------------------------------

PART_FORMAT = "know2vec-zoo-part"
PART_VERSION = 1


def parts_dir(path: str | os.PathLike, run: str) -> pathlib.Path:
  """The hidden sibling directory holding the parts of run ``run`` of a zoo built at ``path``."""
  target = pathlib.Path(path).expanduser().absolute()
  return target.with_name(f".{target.name}.parts-{run}")


def remove_leftover_parts(path: str | os.PathLike) -> list[pathlib.Path]:
  """Removes the parts directories that earlier, unfinished builds of the zoo at ``path`` left.

  Args:
    path: the zoo directory (it need not exist).

  Returns:
    The directories removed, in name order.
  """
  target = pathlib.Path(path).expanduser().absolute()
  found = sorted(pathlib.Path(p) for p in
                 glob.glob(os.path.join(glob.escape(str(target.parent)),
                                        f".{glob.escape(target.name)}.parts-*")))
  removed = []
  for d in found:
    if d.is_dir() and not d.is_symlink():
      shutil.rmtree(d, ignore_errors=True)
      removed.append(d)
  return removed


def part_path(parts: pathlib.Path, index: int, count: int) -> pathlib.Path:
  return pathlib.Path(parts) / f"part-{index:05d}-of-{count:05d}.npz"


def _leaves(prefix: str, tree) -> dict[str, np.ndarray]:
  return {f"{prefix}{jax.tree_util.keystr(p)}": np.asarray(a)
          for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_part(parts: pathlib.Path, index: int, count: int, run: str, stacks: list[dict],
              estimators: list[dict], accuracies: dict[str, tuple[float, float]]
              ) -> pathlib.Path:
  """Writes process ``index``'s part of a multi-process zoo build: one checksummed file, written
  atomically (:func:`know2vec_jax.storage.save_arrays`).

  Args:
    parts: the run's parts directory (:func:`parts_dir`).
    index, count: this part and the number of parts (processes).
    run: the run's id (every part of one build shares it).
    stacks: trained stack chunks, ``{"unit": chunk number, "stack": name, "model_ids": [...]
      (training order), "params": the chunk's stacked parameters}``.
    estimators: fitted estimator chunks, ``{"unit", "set": name, "model_ids", "blobs": [bytes]}``.
    accuracies: model id -> (held-out accuracy, train accuracy) of every model in the part.

  Returns:
    The part's file.
  """
  arrays = {}
  for u in stacks:
    arrays |= _leaves(f"units/{u['unit']}", storage.pure(u["params"]))
  for u in estimators:  # EstimatorSet.pack's layout: the bytes back to back, and offsets
    arrays[f"units/{u['unit']}/blob"] = np.frombuffer(b"".join(u["blobs"]), np.uint8)
    arrays[f"units/{u['unit']}/offsets"] = np.concatenate(
        [[0], np.cumsum([len(b) for b in u["blobs"]])]).astype(np.int64)
  meta = {
      "format": PART_FORMAT, "version": PART_VERSION, "run": run, "index": index,
      "count": count,
      "stacks": [{"unit": u["unit"], "stack": u["stack"], "model_ids": list(u["model_ids"])}
                 for u in stacks],
      "estimators": [{"unit": u["unit"], "set": u["set"], "model_ids": list(u["model_ids"])}
                     for u in estimators],
      "accuracies": {m: [float(h), float(t)] for m, (h, t) in accuracies.items()},
  }
  return storage.save_arrays(part_path(parts, index, count), arrays, meta)


def load_part(parts: pathlib.Path, index: int, count: int, run: str,
              units: dict[int, tuple]) -> tuple[dict[int, object], dict[str, tuple]]:
  """Reads part ``index`` of ``count`` back and checks it is the one the merge expects.

  Args:
    parts: the run's parts directory.
    index, count: which part, of how many.
    run: the run's id.
    units: chunk number -> ``("stack", StackSpec, model ids)`` or ``("estimators", model ids)``:
      exactly the chunks the part must hold.

  Returns:
    (chunk number -> its parameters (pure tree) or its estimators' bytes (list), model id ->
    (held-out accuracy, train accuracy)).

  Raises:
    ZooError: a missing part (the message names it), a damaged one, one of another run or
      position, one that lacks a chunk or holds another's, or a chunk of other shapes.
  """
  where = part_path(parts, index, count)
  what = f"zoo part {index} of {count}"
  if not where.is_file():
    raise ZooError(f"{what} is missing: {where} (process {index} did not finish its share, or "
                   f"{parts.parent} is not on a filesystem every process shares)")
  arrays, m = storage.load_arrays(where, ZooError)
  if (m.get("format"), m.get("version")) != (PART_FORMAT, PART_VERSION):
    raise ZooError(f"{where} is not a know2vec zoo part of version {PART_VERSION}")
  if (m.get("run"), m.get("index"), m.get("count")) != (run, index, count):
    raise ZooError(f"{what} at {where} belongs to another build (run {m.get('run')!r}, part "
                   f"{m.get('index')} of {m.get('count')})")
  try:
    held = {int(u["unit"]): ("stack", list(u["model_ids"])) for u in m["stacks"]}
    held |= {int(u["unit"]): ("estimators", list(u["model_ids"])) for u in m["estimators"]}
    accs = {str(k): (float(v[0]), float(v[1])) for k, v in m["accuracies"].items()}
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise ZooError(f"{where} is corrupted: {type(e).__name__}: {e}") from e
  if set(held) != set(units):
    differ = sorted(set(units) ^ set(held))
    raise ZooError(f"{what} at {where} holds chunks {sorted(held)}, expected {sorted(units)} "
                   f"(chunk {differ[0]} differs): the processes did not split the same zoo")
  out = {}
  for u, want in units.items():
    if held[u] != (want[0], list(want[-1])):
      raise ZooError(f"{what} at {where}: chunk {u} holds other models than expected")
    if want[0] == "stack":
      target = nnx.to_pure_dict(stack_state(want[1], len(want[2])))
      paths, treedef = jax.tree_util.tree_flatten_with_path(target)
      leaves = []
      for path, spec in paths:
        a = arrays.get(f"units/{u}{jax.tree_util.keystr(path)}")
        if a is None or a.shape != spec.shape or a.dtype != spec.dtype:
          raise ZooError(f"{what} at {where}: chunk {u}'s {jax.tree_util.keystr(path)} is missing "
                         "or of another shape")
        leaves.append(a)
      out[u] = jax.tree_util.tree_unflatten(treedef, leaves)
    else:
      blob, off = arrays.get(f"units/{u}/blob"), arrays.get(f"units/{u}/offsets")
      if blob is None or off is None or len(off) != len(want[-1]) + 1:
        raise ZooError(f"{what} at {where}: chunk {u}'s estimators are missing")
      out[u] = EstimatorSet.unpack({"blob": blob, "offsets": off})
  missing = [mid for want in units.values() for mid in want[-1] if mid not in accs]
  if missing:
    raise ZooError(f"{what} at {where} records no accuracy for model {missing[0]!r}")
  return out, accs
