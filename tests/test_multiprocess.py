"""Multi-process runs on loopback (JAX's gloo CPU collectives): the aligner and every stage that
splits its models across processes equal 1 process, and a bad launch or a lost process fails in
one line.

Starting Python and JAX and joining a run cost seconds of CPU per process, and the lost-process
cases mostly wait: one 2-process run serves every stage check (this process computes its own
results meanwhile), and those cases run side by side, each timed by its own clock.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.abspath(HERE))
STAGES = os.path.join(HERE, "multiprocess_stages.py")
RECORD = ("anchor_index", "flip_t", "anchor_fallback", "queries", "pool_labels")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  # The stage workers keep the test process's device count: XLA:CPU's float rounding of a
  # convolution depends on how many devices share the host, so bit-for-bit comparisons need the
  # same count on both sides. They import this checkout's package, not an installed copy.
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, **extra)


class _Launch:
  """Processes started together, their output in files (nothing to drain while other processes
  run): a thread notes when each one ends, and which of the others were still running then."""

  def __init__(self, commands, logs, env):
    self.logs = logs
    self.t0 = time.monotonic()
    self.procs = []
    for cmd, log in zip(commands, logs):
      with open(log, "wb") as f:
        self.procs.append(subprocess.Popen(list(map(str, cmd)), env=env, stdout=f,
                                           stderr=subprocess.STDOUT))
    self.ended = [None] * len(self.procs)  # time.monotonic() when each was first seen ended
    self.running_then = [None] * len(self.procs)  # the others still running at that moment
    threading.Thread(target=self._watch, daemon=True).start()

  def _watch(self):
    while None in self.ended:
      now = time.monotonic()
      done = [p.poll() is not None for p in self.procs]
      for i, d in enumerate(done):
        if d and self.ended[i] is None:
          self.ended[i] = now
          self.running_then[i] = [j for j, dj in enumerate(done) if not dj]
      time.sleep(0.02)

  def join(self, timeout: float) -> None:
    """Waits until every process ended, at most ``timeout`` seconds more."""
    deadline = time.monotonic() + timeout
    while None in self.ended and time.monotonic() < deadline:
      time.sleep(0.05)

  def wait(self, timeout: float) -> list[str]:
    """Waits until every process ended, at most ``timeout`` seconds more (then kills the rest
    and fails); returns their output."""
    self.join(timeout)
    self.kill()
    logs = [pathlib.Path(log).read_text(errors="replace") for log in self.logs]
    assert None not in self.ended, f"still running after {timeout} s more: " + "\n".join(
        log[-1500:] for log, t in zip(logs, self.ended) if t is None)
    return logs

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def _spawn(mode: str, nproc: int, out, logs=None, **env) -> _Launch:
  """The processes of a run of multiprocess_stages.py in ``mode``, their output in
  ``logs``/log-<id>.txt (default: ``out``)."""
  logs = logs or out
  logs.mkdir(parents=True, exist_ok=True)
  port = _free_port()
  return _Launch([[sys.executable, STAGES, mode, i, nproc, port, out] for i in range(nproc)],
                 [logs / f"log-{i}.txt" for i in range(nproc)], _env(**env))


# ---- the stages: zoo build, aligner, knowledge, ground truth, index build, search ----------------

def _one_process(zoo):
  """This process's own results for the stage checks that take seconds to make: the aligner
  trained over this process's 8 devices as test_align's agreement test trains it (one compiled
  step for both), as (losses, parameters); and the ground truth of the stage run's protocol."""
  import jax

  from know2vec_jax import transfer
  from know2vec_jax.mesh import data_mesh
  from multiprocess_stages import ALIGN_STEPS, gt_setup
  from test_align import _data, trainer
  one = trainer(_data(), mesh=data_mesh(8))
  losses = [h["loss"] for h in one.run(ALIGN_STEPS, progress=False, log_every=1)]
  params = [np.asarray(leaf) for leaf in jax.tree.leaves(one.state["params"])]
  ids, targets, cfg = gt_setup(zoo)
  return {"align": (losses, params), "gt": transfer.ground_truth(zoo, None, ids, targets, cfg)}


@pytest.fixture(scope="module")
def stages(tmp_path_factory, request):
  """One 2-process run of every stage (zoo build, aligner training, knowledge, ground truth,
  index build, index search), shared by the tests below: (its output directory, each process's
  facts, this process's own results from _one_process).

  This process would otherwise only wait for the run, so it works meanwhile: the run starts
  before this process has the tiny zoo and proxy (a session's first use trains them here), and
  builds its own zoo and trains the aligner first; then it waits for out/reference.json naming
  them, and this process computes its own results."""
  out = tmp_path_factory.mktemp("stages")
  # The parts an unfinished earlier build left: the build removes them before writing its own.
  (out / ".zoo.parts-0123456789ab").mkdir()
  (out / ".zoo.parts-0123456789ab" / "part-00001-of-00002.npz").write_bytes(b"left over")
  run = _spawn("stages", 2, out)
  try:
    dirs = {k: str(request.getfixturevalue(f"tiny_{k}_dir")) for k in ("zoo", "proxy")}
    (out / "reference.tmp").write_text(json.dumps(dirs))
    os.replace(out / "reference.tmp", out / "reference.json")  # whole, or not there
    own = _one_process(request.getfixturevalue("tiny_zoo")[0])
    logs = run.wait(600)
  finally:
    run.kill()
  for p, log in zip(run.procs, logs):
    assert p.returncode == 0, log[-3000:]
  return out, [json.loads((out / f"facts-{i}.json").read_text()) for i in range(2)], own


def test_aligner_two_processes_equal_one(stages):
  """The aligner trained data-parallel over 2 devices of each of 2 processes equals one process
  (this one, over its 8 devices): losses and parameters, on every process (bit for bit the same
  on both).

  Float tolerance, as between 1 and 8 devices in test_align: the meshes differ, and XLA:CPU's
  rounding with them."""
  from multiprocess_stages import ALIGN_STEPS
  out, facts, own = stages
  losses, params = own["align"]
  assert len(losses) == ALIGN_STEPS
  two = []
  for f in facts:
    assert f["processes"] == 2
    assert f["align"]["devices"] == 4 and f["align"]["processes"] == [0, 1]
    np.testing.assert_allclose(f["align"]["losses"], losses, rtol=1e-4)
    with np.load(out / f"align-{f['process']}.npz") as z:
      two.append([z[f"arr_{i}"] for i in range(len(z.files))])
  assert len(two[0]) == len(two[1]) == len(params)
  for a, b0, b1 in zip(params, *two):
    np.testing.assert_array_equal(b0, b1)  # one replicated state: the same on both processes
    np.testing.assert_allclose(b0, a, rtol=1e-4, atol=1e-5)


def _split(facts, key, everything):
  """Each process did a share of the work: non-empty, disjoint, together everything."""
  shares = [set(f[key]) for f in facts]
  assert all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == set(everything)


def test_zoo_build_two_processes_equal_one(stages, tiny_zoo):
  import jax
  from flax import nnx

  from know2vec_jax.zoo import load_zoo, read_manifest
  out, facts, _ = stages
  one, two = tiny_zoo[0], load_zoo(out / "zoo")
  assert list(two.stacks) == list(one.stacks)
  for name, stack in one.stacks.items():
    assert two.stacks[name].model_ids == stack.model_ids
    a, b = nnx.to_pure_dict(stack.params), nnx.to_pure_dict(two.stacks[name].params)
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                                     a, b)), name  # bit for bit
  assert {m: r.to_json() for m, r in two.records.items()} == \
      {m: r.to_json() for m, r in one.records.items()}
  assert read_manifest(out / "zoo")["build"]["processes"] == 2
  _split(facts, "zoo_trained", one.records)
  assert not list(out.glob(".zoo.parts-*"))  # the leftover removed first; this run's merged
  assert "removed the parts of 1 unfinished build(s) of " in (out / "log-0.txt").read_text()
  assert "know2vec: error:" not in (out / "log-0.txt").read_text()  # no process was lost


def test_knowledge_two_processes_equal_one(stages, tiny_zoo, tiny_proxy_dir):
  from know2vec_jax.blackbox import groups_from_zoo
  from know2vec_jax.knowledge import group_knowledge
  from know2vec_jax.proxy import Proxy
  out, facts, _ = stages
  proxy = Proxy.load(tiny_proxy_dir)
  one = group_knowledge(groups_from_zoo(tiny_zoo[0]), proxy.pool, proxy.config.knowledge)
  with np.load(out / "knowledge.npz") as two:
    for kn in one:
      for i, m in enumerate(kn.model_ids):
        for name in RECORD:
          np.testing.assert_array_equal(getattr(kn, name)[i], two[f"{m}/{name}"], err_msg=m)
  _split(facts, "knowledge_probed", tiny_zoo[0].records)


def test_ground_truth_two_processes_equal_one(stages, tiny_zoo, tiny_zoo_dir, monkeypatch):
  from know2vec_jax import transfer
  from multiprocess_stages import gt_setup
  out, facts, own = stages
  one = own["gt"]
  zoo = tiny_zoo[0]
  ids, targets, cfg = gt_setup(zoo)
  with np.load(out / "gt.npz") as two:
    for t in targets:
      np.testing.assert_array_equal(one[t.name], two[t.name])  # bit for bit
  # Every jitted chunk ran once, on one process or the other.
  chunks = len(targets) * len(transfer.chunk_plan(zoo, ids, cfg))
  assert [f["gt_chunks"] > 0 for f in facts] == [True, True]
  assert sum(f["gt_chunks"] for f in facts) == chunks
  # Process 0 wrote the cache: read back, nothing recomputed.
  monkeypatch.setattr(transfer, "finetune_accuracy", lambda *a, **k: 1 / 0)
  cached = transfer.ground_truth(zoo, tiny_zoo_dir, ids, targets, cfg, cache_dir=out / "gt")
  for t in targets:
    np.testing.assert_array_equal(cached[t.name], one[t.name])


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_finetune_chunks_split_anyhow_add_up_to_the_whole(tiny_zoo, mode):
  import dataclasses

  from know2vec_jax import transfer
  from multiprocess_stages import gt_setup
  ids, targets, cfg = gt_setup(tiny_zoo[0])
  cfg = dataclasses.replace(cfg, mode=mode, chunk_size=2 if mode == "linear" else 4)
  plan = transfer.chunk_plan(tiny_zoo[0], ids, cfg)
  assert len(plan) == 2 and sum(c["runs"] for c in plan) == len(ids) * cfg.runs
  whole = transfer.finetune_accuracy(tiny_zoo[0], ids, targets[0], cfg)
  parts = [transfer.finetune_accuracy(tiny_zoo[0], ids, targets[0], cfg,
                                      only_chunks=lambda c, i=i: c == i) for i in range(2)]
  assert all((p > 0).any() and (p == 0).any() for p in parts)  # each chunk fills some cells
  np.testing.assert_array_equal(parts[0] + parts[1], whole)


def test_index_build_two_processes_equal_one(stages, tiny_zoo, tiny_proxy_dir):
  from know2vec_jax.blackbox import groups_from_zoo
  from know2vec_jax.index import ModelIndex
  from know2vec_jax.knowledge import KnowledgeStore, store_context
  from know2vec_jax.proxy import Proxy, zoo_metadata
  out, facts, _ = stages
  zoo = tiny_zoo[0]
  proxy = Proxy.load(tiny_proxy_dir)
  proxy.knowledge = KnowledgeStore(store_context(proxy.pool, proxy.config.knowledge))
  one = proxy.build_index(groups_from_zoo(zoo), zoo_metadata(zoo))
  two = ModelIndex.load(out / "index")
  assert two.ids == one.ids
  np.testing.assert_array_equal(two.vectors, one.vectors)
  for name, a in one.classes.items():
    np.testing.assert_array_equal(two.classes[name], a)
  assert [two.metadata(m) for m in two.ids] == [one.metadata(m) for m in one.ids]
  _split(facts, "index_probed", zoo.records)
  assert [f["index_rows"] for f in facts] == [len(zoo.records)] * 2  # every process holds all


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_index_search_across_two_processes_equals_one(stages, storage):
  import jax

  from know2vec_jax.index import ModelIndex
  from multiprocess_stages import SEARCH_K, search_setup
  out, _, _ = stages
  got = [json.loads((out / f"search-{i}.json").read_text()) for i in range(2)]
  built = ModelIndex.load(out / "index")
  ids, vectors, queries = search_setup()
  cases = {"built": (built.ids, built.vectors,
                     built.vectors[[0, len(built) // 2, len(built) - 1]]),
           "synthetic": (ids, vectors, queries)}
  for name, (ids, vectors, queries) in cases.items():
    # One process, one device: the plain search.
    one = ModelIndex(vectors.shape[1], storage=storage, devices=jax.devices()[:1])
    one.add_vectors(ids, vectors)
    scores, found = one.search(queries, SEARCH_K)
    assert one.num_shards == 1
    for i in range(2):
      two_scores, two_ids, where = got[i][name][storage]
      assert two_ids == found, (name, i)
      two_scores = np.asarray(two_scores, np.float32)
      if storage == "float32":
        # XLA:CPU's product rounds by the shard's row count: within 2 ulps of 1.
        np.testing.assert_allclose(two_scores, scores, rtol=0, atol=2.5e-7, err_msg=name)
      else:  # the shortlist is re-scored on the host from the float32 rows: bit for bit
        np.testing.assert_array_equal(two_scores, scores, err_msg=name)
      # The rows were sharded over the devices of both processes, each holding its half.
      devices = 2 * jax.device_count()
      padded = -(-len(ids) // devices) * devices
      assert where == {"devices": devices, "processes": [0, 1], "local_shards": devices // 2,
                       "local_rows": padded // 2, "padded_rows": padded}, (name, where)
  # Equal scores resolve to the earlier row wherever the copies sit: query 4 is row 17, and its
  # ten copies (rows 2000-2009) live on other shards.
  assert got[0]["synthetic"][storage][1][4] == ["m0017"] + [f"m{2000 + j}" for j in range(9)]


def test_split_is_deterministic_balanced_and_complete():
  from know2vec_jax.distributed import DistributedError, assign, mine, shard
  costs = [5, 1, 1, 3, 2, 2, 8, 1]
  owner = assign(costs, 3)
  assert owner == assign(costs, 3)  # every process computes the same split
  loads = [sum(c for c, p in zip(costs, owner) if p == i) for i in range(3)]
  assert sorted(loads) == [7, 8, 8]  # longest first: 8 | 5+2+1 | 3+2+1+1 (none can beat 8)
  shares = [mine(list("abcdefgh"), costs, i, 3) for i in range(3)]
  assert sorted(x for s in shares for x in s) == list("abcdefgh")
  assert all(s == sorted(s) for s in shares)  # in item order
  assert [shard(7, i, 3) for i in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
  assert assign([1.0], 4) == [0] and assign([], 2) == []
  with pytest.raises(DistributedError, match="costs must be finite"):
    assign([1.0, float("nan")], 2)


# ---- failures ----------------------------------------------------------------------------------

def test_launch_arguments_are_checked_before_anything_starts(tmp_path, capsys):
  from know2vec_jax import cli
  from know2vec_jax.distributed import DistributedError, initialize
  for args, match in [
      (("127.0.0.1:1234", 2, 2), r"process_id 2 is outside \[0, 2\)"),
      (("127.0.0.1:1234", 0, 0), "num_processes must be an integer >= 1"),
      (("127.0.0.1:1234", 2, -1), "process_id must be an integer >= 0"),
      (("127.0.0.1", 2, 0), "coordinator must be HOST:PORT"),
      (("127.0.0.1:99999", 2, 0), "coordinator must be HOST:PORT"),
      (("127.0.0.1:1234", 2, None), "needs --num-processes N and --process-id I"),
      ((None, 2, 0), "need --coordinator HOST:PORT")]:
    with pytest.raises(DistributedError, match=match):
      initialize(*args)
  with pytest.raises(DistributedError, match="lost-process timeout must be at least 1 second"):
    initialize("127.0.0.1:1234", 2, 0, lost_process_timeout=0.5)
  import jax
  jax.devices()  # JAX has started: too late to join a run
  with pytest.raises(DistributedError, match="must be called before any JAX"):
    initialize(f"127.0.0.1:{_free_port()}", 2, 0, timeout=5)
  assert cli.main(["zoo", "build", "--preset", "tiny", "--zoo", str(tmp_path / "z"),
                   "--coordinator", "127.0.0.1:1234", "--num-processes", "2",
                   "--process-id", "5"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("know2vec: error: process_id 5 is outside")
  assert not (tmp_path / "z").exists()


def _cli(*args):
  """A `know2vec` command line."""
  return [sys.executable, "-m", "know2vec_jax.cli", *args]


# The loss timeout of the lost-process cases, and the seconds a survivor may take beyond it to
# exit and be seen exiting on a loaded 2-core machine.
LOST_TIMEOUT, LOST_MARGIN = 3, 2


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
  """The runs of the failure tests below, started when the first of them runs: {case: (its
  directory, its processes)}. Each is timed from its own start and by when each of its processes
  ended.

  unreachable: process 0 whose process 1 never comes, process 1 of a coordinator nothing listens
  at, and `--coordinator auto` outside any cluster; run first and on its own, as its time bound
  counts its start-ups. Then side by side, as they mostly wait (for a busy process, a death, the
  loss timeout), so that together they take about as long as the longest:
  lose-coordinator: process 1 is done at once and waits; process 0 is busy for BUSY_FOR (over
  twice the loss timeout), then dies. die-after-part: a zoo build whose process 1 dies right
  after writing its part. disagree: two processes started with different process counts."""
  root = tmp_path_factory.mktemp("failures")
  cases = ("unreachable", "lose-coordinator", "die-after-part", "disagree")
  where, logs = {c: root / c for c in cases}, root / "logs"  # logs beside the runs' directories
  for path in (*where.values(), logs):
    path.mkdir()
  # No cluster in the environment, whatever machine runs the tests (for `--coordinator auto`).
  env = {k: v for k, v in _env().items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "CLOUD_TPU", "JAX_COORDINATOR"))}
  zoo = ("zoo", "build", "--preset", "tiny", "--zoo")
  u = where["unreachable"]
  runs = {"unreachable": _Launch(
      [_cli(*zoo, u / "a", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", 2,
            "--process-id", 0, "--coordinator-timeout", 3),
       _cli(*zoo, u / "b", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", 2,
            "--process-id", 1, "--coordinator-timeout", 3),
       _cli(*zoo, u / "c", "--coordinator", "auto")],
      [logs / f"unreachable-{z}.txt" for z in "abc"], env)}
  runs["unreachable"].join(120)
  for case in ("lose-coordinator", "die-after-part"):  # the longest first
    runs[case] = _spawn(case, 2, where[case], logs=logs / case,
                        LOST_PROCESS_TIMEOUT=str(LOST_TIMEOUT))
  port = _free_port()
  runs["disagree"] = _Launch(
      [_cli(*zoo, where["disagree"] / "z", "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", n, "--process-id", i, "--coordinator-timeout", 60)
       for i, n in ((0, 2), (1, 3))],
      [logs / f"disagree-{i}.txt" for i in range(2)], env)
  yield {case: (where[case], run) for case, run in runs.items()}
  for run in runs.values():
    run.kill()


def _error_line(log: str) -> str:
  """The one error line of a `know2vec` command that failed."""
  lines = [ln for ln in log.splitlines() if ln.startswith("know2vec: error:")]
  assert len(lines) == 1, log[-2000:]
  return lines[0]


def test_unreachable_coordinator_and_missing_processes_fail_in_bounded_time(failures):
  path, run = failures["unreachable"]
  alone, lost, auto = run.wait(120)
  assert [p.returncode for p in run.procs] == [2, 2, 2], (alone + lost + auto)[-3000:]
  assert "cannot reach the coordinator 127.0.0.1:" in _error_line(lost)
  assert "not all 2 processes joined the coordinator" in _error_line(alone)
  assert "--coordinator auto found no cluster environment" in _error_line(auto)
  assert max(run.ended) - run.t0 < 60  # 3 s waits, plus starting Python and JAX three times
  assert not any((path / z).exists() for z in "abc")


def test_processes_that_disagree_on_the_count_stop_with_one_line(failures):
  path, run = failures["disagree"]
  logs = run.wait(120)
  for p, log in zip(run.procs, logs):
    assert p.returncode == 2, log[-2000:]
    line = _error_line(log)
    assert "processes disagree on the process count" in line and "process(es) [1]" in line
  assert not (path / "z").exists()


def _parts(zoo, ids_units, index, count, run, parts):
  """Writes part ``index`` from a trained zoo's own parameters (the chunks assign() gives it)."""
  import jax

  from know2vec_jax.zoo import store
  stacks = []
  for number, u in ids_units:
    ids = [s.model_id for s in u["specs"]]
    st = zoo.stacks[u["name"]]
    rows = np.asarray([st.model_ids.index(m) for m in ids])
    stacks.append({"unit": number, "stack": u["name"], "model_ids": ids,
                   "params": jax.tree.map(lambda a: np.asarray(a)[rows], st.params)})
  accs = {m: (zoo.records[m].heldout_accuracy, zoo.records[m].train_accuracy)
          for _, u in ids_units for m in (s.model_id for s in u["specs"])}
  return store.save_part(parts, index, count, run, stacks, [], accs)


def test_merge_names_a_missing_or_damaged_part_and_assembles_the_zoo(tiny_zoo, tmp_path):
  import jax
  from flax import nnx

  from know2vec_jax.distributed import assign
  from know2vec_jax.zoo import BuildConfig, ZooError, load_zoo, tiny_specs
  from know2vec_jax.zoo import build, store
  specs, cfg = tiny_specs(), BuildConfig(chunk_size=4)
  image_shape, groups, fitted = build._plan(specs, cfg)
  units = build._units(groups, fitted, cfg, image_shape)
  owner = assign([u["cost"] for u in units], 2)
  parts = store.parts_dir(tmp_path / "zoo", "r1")
  mine = [[(n, u) for n, (u, p) in enumerate(zip(units, owner)) if p == i] for i in range(2)]
  _parts(tiny_zoo[0], mine[0], 0, 2, "r1", parts)
  with pytest.raises(ZooError, match=r"zoo part 1 of 2 is missing: .*part-00001-of-00002\.npz"):
    build.merge_parts(parts, 2, "r1", specs, cfg)
  second = _parts(tiny_zoo[0], mine[1], 1, 2, "r1", parts)
  with pytest.raises(ZooError, match="belongs to another build"):
    build.merge_parts(parts, 2, "r2", specs, cfg)
  zoo = build.merge_parts(parts, 2, "r1", specs, cfg)
  for name, stack in tiny_zoo[0].stacks.items():
    assert jax.tree.all(jax.tree.map(np.array_equal, nnx.to_pure_dict(stack.params),
                                     nnx.to_pure_dict(zoo.stacks[name].params)))
  assert zoo.records == tiny_zoo[0].records
  second.write_bytes(second.read_bytes()[:100])  # a damaged part
  with pytest.raises(ZooError, match="part-00001-of-00002.npz"):
    build.merge_parts(parts, 2, "r1", specs, cfg)
  with pytest.raises(ZooError, match="does not exist"):  # parts never load as a zoo
    load_zoo(tmp_path / "zoo")


def _lost_line(log: str) -> str:
  """The one line a survivor prints about a lost process (and no traceback or runtime abort)."""
  lines = [ln for ln in log.splitlines() if ln.startswith("know2vec:")]
  assert len(lines) == 1, log[-3000:]
  assert "Traceback" not in log and "Check failure" not in log, log[-3000:]
  return lines[0]


def _death(run, victim: int) -> float:
  """When ``run``'s process ``victim`` was seen dead (killed). Every other process was still
  running then: none ended the run while the victim was alive (and busy)."""
  assert run.procs[victim].returncode == -signal.SIGKILL, \
      f"process {victim}, the one to lose, ended with status {run.procs[victim].returncode}"
  assert run.running_then[victim] == [i for i in range(len(run.procs)) if i != victim]
  return run.ended[victim]


def test_a_killed_process_leaves_no_zoo_that_loads_and_ends_the_run(failures, monkeypatch,
                                                                   capsys):
  from know2vec_jax.distributed import LOST_EXIT_STATUS
  from know2vec_jax.zoo import BuildConfig, ZooError, build, load_zoo, tiny_specs
  path, run = failures["die-after-part"]
  log = run.wait(300)[0]
  died = _death(run, 1)  # right after writing its part
  # The survivor ended by itself, in time, with one line naming the lost process.
  assert run.procs[0].returncode == LOST_EXIT_STATUS, log[-3000:]
  assert run.ended[0] - died <= LOST_TIMEOUT + LOST_MARGIN
  line = _lost_line(log)
  assert line.startswith("know2vec: error: process 1 of 2 stopped responding ") and \
      line.endswith(" s ago (lost): ending this run"), line
  (part,) = path.glob(".zoo.parts-*/part-00001-of-00002.npz")
  assert not (path / "zoo").exists()
  with pytest.raises(ZooError, match="does not exist"):
    load_zoo(path / "zoo")
  with pytest.raises(ZooError, match="zoo.json is missing"):
    load_zoo(part.parent)
  assert [p.name for p in path.iterdir()] == [part.parent.name]
  # The next build of the zoo (here one process) removes the leftover parts before it trains.
  monkeypatch.setattr(build, "build_zoo", lambda *a, **k: 1 / 0)
  capsys.readouterr()
  with pytest.raises(ZeroDivisionError):
    build.build_zoo_to(path / "zoo", tiny_specs(), BuildConfig(), progress=False)
  assert list(path.iterdir()) == []
  assert capsys.readouterr().err == (f"removed the parts of 1 unfinished build(s) of "
                                     f"{path / 'zoo'}: {part.parent.name}\n")


def test_a_lost_coordinator_is_named_and_a_busy_process_is_not_lost(failures):
  from know2vec_jax.distributed import LOST_EXIT_STATUS
  from multiprocess_stages import BUSY_FOR
  # Process 1 is done at once and waits; process 0 is busy for BUSY_FOR (over twice the loss
  # timeout), then dies: process 1 must wait for it all that time, then name it.
  _, run = failures["lose-coordinator"]
  log = run.wait(120)[1]
  died = _death(run, 0)
  assert died - run.t0 >= BUSY_FOR
  assert run.procs[1].returncode == LOST_EXIT_STATUS, log[-3000:]
  assert run.ended[1] - died <= LOST_TIMEOUT + LOST_MARGIN
  assert _lost_line(log).startswith("know2vec: error: process 0 of 2 stopped responding "), log


def test_leftover_parts_of_this_zoo_only_are_removed(tmp_path):
  from know2vec_jax.zoo import store
  for name in (".zoo.parts-aaaa", ".zoo.parts-bbbb", ".zoo2.parts-cccc", ".zoo.old-dddd"):
    (tmp_path / name).mkdir()
  (tmp_path / ".zoo.parts-file").write_text("not a directory")
  assert store.remove_leftover_parts(tmp_path / "zoo") == [tmp_path / ".zoo.parts-aaaa",
                                                            tmp_path / ".zoo.parts-bbbb"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [".zoo.old-dddd", ".zoo.parts-file",
                                                         ".zoo2.parts-cccc"]
  assert store.remove_leftover_parts(tmp_path / "missing" / "zoo") == []
