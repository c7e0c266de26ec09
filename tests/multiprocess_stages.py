"""One process of the multi-process tests (run by test_multiprocess.py, not by pytest).

Usage: python multiprocess_stages.py MODE PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Modes:
  stages          zoo build and aligner training, then (once the test process has written
                  OUT_DIR/reference.json, naming the tiny zoo and proxy its own results come from)
                  knowledge extraction, fine-tune ground truth and index build, in sequence, then
                  index search over the devices of every process (each storage type); process 0
                  writes each stage's result under OUT_DIR, every process writes what it computed
                  itself to OUT_DIR/facts-<id>.json, what its searches returned to
                  OUT_DIR/search-<id>.json and its copy of the aligner's parameters to
                  OUT_DIR/align-<id>.npz. One run serves every check of the stages: each process
                  starts Python and JAX and joins a run once, which costs more than most stages.
  die-after-part  a zoo build in which the last process kills itself right after writing its part.
  lose-coordinator  process 1 finishes at once and waits for process 0, which is busy (numpy and
                  Python, holding the GIL in turns) for BUSY_FOR seconds, then kills itself.

The environment variable LOST_PROCESS_TIMEOUT sets the run's lost-process timeout (default 20 s).
"""

import json
import os
import pathlib
import signal
import sys
import time

import numpy as np

# The ground-truth protocol and targets of the test (small: seconds on 2 CPU cores).
GT_TARGETS = (("digits-flip", "digits+flip", (1, 2, 7), "train"),
              ("digits-2", "digits", (3, 8), "train"))
GT_CONFIG = dict(steps=8, shots=20, test_per_class=40, runs=2, chunk_size=4)
# The searched index beside the built one: random rows (no cluster structure, the hardest case for
# compressed storage), some of them repeated so that equal scores must resolve alike.
SEARCH_ROWS, SEARCH_DIM, SEARCH_K = 3001, 32, 10
# Steps the aligner trains: the first of test_align's config, as its agreement test does (one
# compiled step serves any count).
ALIGN_STEPS = 6
# How long process 0 of lose-coordinator is busy before it dies: over twice the test's loss
# timeout (3 s), so that a watchdog silenced by a busy process would end the run first.
BUSY_FOR = 6.5
# How long the stage processes wait for the test process to name the reference zoo and proxy
# (it may train them first, on a loaded machine).
REFERENCE_WAIT = 900


def gt_setup(zoo):
  """(the models: the zoo's MLPs, one compiled fine-tune; the targets; the protocol)."""
  from know2vec_jax.data import Task
  from know2vec_jax.transfer import FinetuneConfig, TransferTarget
  return ([m for m in sorted(zoo.records) if zoo.records[m].arch == "mlp"],
          [TransferTarget(n, Task(s, c), split=sp) for n, s, c, sp in GT_TARGETS],
          FinetuneConfig(**GT_CONFIG))


def search_setup():
  """(model ids, vectors [SEARCH_ROWS, SEARCH_DIM], queries [6, SEARCH_DIM]) of the synthetic
  index searched across processes; queries 4 and 5 are rows of it (one of them repeated)."""
  rng = np.random.default_rng(14)
  vectors = rng.standard_normal((SEARCH_ROWS, SEARCH_DIM)).astype(np.float32)
  vectors[2000:2010] = vectors[17]  # ten copies of row 17: equal scores across shards
  queries = np.concatenate([rng.standard_normal((4, SEARCH_DIM)).astype(np.float32),
                            vectors[[17, 2500]]])
  return [f"m{i:04d}" for i in range(SEARCH_ROWS)], vectors, queries


def search_all(index, queries):
  """{storage: [scores, ids, where]} of ``index`` searched with every storage type; ``where``
  says which devices held the rows: the mesh's size, the processes of its devices, and this
  process's shards and rows of the device copy."""
  from know2vec_jax.index import STORAGES
  out = {}
  for storage in STORAGES:
    index.set_storage(storage)
    scores, ids = index.search(queries, SEARCH_K)
    arrays, _, mesh = index._device_state
    rows = arrays[-1]  # the rows [M, E], or the int8 codes' scales [M]
    where = {"devices": 1 if mesh is None else mesh.size,
             "processes": sorted({d.process_index for d in rows.sharding.device_set}),
             "local_shards": len(rows.addressable_shards),
             "local_rows": sum(s.data.shape[0] for s in rows.addressable_shards),
             "padded_rows": rows.shape[0]}
    out[storage] = [np.asarray(scores).tolist(), ids, where]
  index.set_storage("float32")
  return out


def main():
  mode, pid, nproc, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
      pathlib.Path(sys.argv[5])
  from know2vec_jax import distributed
  distributed.initialize(f"127.0.0.1:{port}", nproc, pid, timeout=120,
                         lost_process_timeout=float(os.environ.get("LOST_PROCESS_TIMEOUT", 20)))
  if mode == "lose-coordinator":
    if pid == 0:
      rng, end = np.random.default_rng(0), time.monotonic() + BUSY_FOR
      a = rng.standard_normal((200, 200))
      while time.monotonic() < end:  # long steps, with the GIL taken back between them
        a = np.tanh(a @ a.T / 200)
        sum(i * i for i in range(20000))
      os.kill(os.getpid(), signal.SIGKILL)
    distributed.shutdown()  # done, waiting for process 0
    return
  from know2vec_jax.zoo import BuildConfig, tiny_specs
  from know2vec_jax.zoo import build
  from know2vec_jax.zoo import store as zoo_store

  trained = []
  train_chunk = build._train_chunk

  def recording_train_chunk(chunk, *args):
    trained.extend(s.model_id for s in chunk)
    return train_chunk(chunk, *args)
  build._train_chunk = recording_train_chunk

  if mode == "die-after-part":
    from know2vec_jax.data import Task
    from know2vec_jax.zoo.specs import ModelSpec, model_id
    save_part = zoo_store.save_part

    def save_then_die(*args, **kwargs):
      where = save_part(*args, **kwargs)
      if pid == nproc - 1:
        os.kill(os.getpid(), signal.SIGKILL)
      return where
    zoo_store.save_part = save_then_die
    # Two short MLPs on digits, one chunk per process: what matters is when the process dies.
    # (Not the tiny preset's: it parses mnist5k's text file first, seconds of CPU per process.)
    task = Task("digits", (0, 1, 2, 3))
    specs = [ModelSpec(model_id("mlp", task, v), "mlp", task, seed=i, steps=10)
             for i, v in enumerate("ab")]
    build.build_zoo_to(out / "zoo", specs, BuildConfig(chunk_size=1), progress=False)
    return

  facts = {"process": pid, "processes": distributed.process_count(), "seconds": {}}
  clock = time.perf_counter()

  def lap(stage):  # seconds per stage, for the record
    nonlocal clock
    facts["seconds"][stage], clock = time.perf_counter() - clock, time.perf_counter()

  # 1. Zoo build: the chunks split across the processes, process 0 merges the parts.
  build.build_zoo_to(out / "zoo", tiny_specs(), BuildConfig(chunk_size=4), progress=False)
  facts["zoo_trained"] = trained
  lap("zoo")
  # 2. The aligner, data-parallel over two devices of each process, each process feeding its slice
  # of every global batch (the README's multi-host example): test_align's data and trainer. Two
  # devices of each, as the batch crosses both processes and both devices of a process; more
  # would only add compile and gloo time.
  import jax

  from know2vec_jax.mesh import data_mesh
  from test_align import _data, trainer as align_trainer
  devices = [d for p in range(distributed.process_count())
             for d in [d for d in jax.devices() if d.process_index == p][:2]]
  trainer = align_trainer(_data(), mesh=data_mesh(devices=devices))
  hist = trainer.run(ALIGN_STEPS, progress=False, log_every=1)
  facts["align"] = {"losses": [h["loss"] for h in hist], "devices": trainer.mesh.size,
                    "processes": sorted({d.process_index for d in trainer.mesh.devices.flat})}
  # This process's own copy of the (replicated) parameters: every process must hold the same.
  np.savez(out / f"align-{pid}.npz", *[np.asarray(leaf.addressable_data(0))
                                       for leaf in jax.tree.leaves(trainer.state["params"])])
  lap("align")

  # The later stages read the zoo and proxy the 1-process references were made from: the test
  # process names them once it has them (a session's first use trains them while this runs).
  from know2vec_jax.blackbox import groups_from_zoo
  from know2vec_jax.knowledge import KnowledgeStore, group_knowledge, store_context
  from know2vec_jax.proxy import Proxy, zoo_metadata
  from know2vec_jax.zoo import load_zoo
  reference = out / "reference.json"
  deadline = time.monotonic() + REFERENCE_WAIT
  while not reference.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(f"no {reference} after {REFERENCE_WAIT} s")
    time.sleep(0.1)
  dirs = json.loads(reference.read_text())
  lap("wait")
  zoo_dir = pathlib.Path(dirs["zoo"])
  zoo = load_zoo(zoo_dir)
  proxy = Proxy.load(dirs["proxy"])

  lap("load")
  # 3. Knowledge extraction.
  groups = groups_from_zoo(zoo)
  kn = group_knowledge(groups, proxy.pool, proxy.config.knowledge)
  facts["knowledge_probed"] = [m for g in groups for m, q in zip(g.model_ids, g.queries) if q]
  if distributed.is_writer():
    np.savez(out / "knowledge.npz", **{f"{k.model_ids[i]}/{name}": getattr(k, name)[i]
                                       for k in kn for i in range(len(k.model_ids))
                                       for name in ("anchor_index", "flip_t", "anchor_fallback",
                                                    "queries", "pool_labels")})

  lap("knowledge")
  # 4. Fine-tune ground truth (cached by process 0).
  from know2vec_jax import transfer
  rows = []
  finetune_rows = transfer._finetune_rows

  def counting_finetune_rows(*args, **kwargs):
    acc = finetune_rows(*args, **kwargs)
    rows.append(int(acc.shape[0]))
    return acc
  transfer._finetune_rows = counting_finetune_rows
  ids, targets, cfg = gt_setup(zoo)
  gt = transfer.ground_truth(zoo, zoo_dir, ids, targets, cfg, cache_dir=out / "gt")
  facts["gt_chunks"] = len(rows)
  if distributed.is_writer():
    np.savez(out / "gt.npz", **gt)

  lap("ground_truth")
  # 5. Index build, every model probed again (an empty knowledge store).
  proxy.knowledge = KnowledgeStore(store_context(proxy.pool, proxy.config.knowledge))
  groups = groups_from_zoo(zoo)
  index = proxy.build_index(groups, zoo_metadata(zoo))
  facts["index_probed"] = [m for g in groups for m, q in zip(g.model_ids, g.queries) if q]
  facts["index_rows"] = len(index)
  distributed.on_writer("index", lambda: index.save(out / "index"))
  lap("index")
  # 6. Index search over the devices of every process (local top-k per shard, then the global
  # top-k), each storage type: the index just built (sharded from its first row; three of its
  # rows as queries) and a larger synthetic one.
  from know2vec_jax.index import ModelIndex
  built = ModelIndex(index.dim, shard_min_rows=1)
  built.add_vectors(index.ids, index.vectors)
  ids, vectors, queries = search_setup()
  synthetic = ModelIndex(SEARCH_DIM, shard_min_rows=1)
  synthetic.add_vectors(ids, vectors)
  found = {"built": search_all(built, index.vectors[[0, len(index) // 2, len(index) - 1]]),
           "synthetic": search_all(synthetic, queries)}
  (out / f"search-{pid}.json").write_text(json.dumps(found))
  lap("search")
  (out / f"facts-{pid}.json").write_text(json.dumps(facts))
  distributed.shutdown()


if __name__ == "__main__":
  main()
