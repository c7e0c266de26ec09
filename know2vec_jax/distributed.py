"""Multi-process runs: the launch, the split of work across processes, and the exchange of parts.

**Launch.** :func:`initialize` starts ``jax.distributed`` from explicit arguments (the coordinator's
``HOST:PORT``, the number of processes, this process's id) or, with ``coordinator="auto"``, from
what JAX detects in the environment (Cloud TPU, SLURM, Open MPI). It validates the arguments
before anything starts, waits a bounded time for the coordinator and every process, and turns
each failure into one line (:class:`DistributedError`) instead of the runtime's abort. One process
(or no launch arguments at all) leaves JAX untouched: the single-process path is the same code.

**Lost processes.** A process that dies (killed, crashed, its host gone) would leave the others
waiting in their next collective until the runtime's heartbeat (100 s) aborts them with a many-line
log. Instead every process runs a watchdog (two daemon threads, so a busy main thread does not
silence it): it publishes a beat in the coordinator's key-value store every second (more often under
a short timeout) and reads the others' beats. Within ``lost_process_timeout`` seconds (default 20;
``--lost-process-timeout``) of a process's last beat, every survivor prints one line naming it and
exits with status :data:`LOST_EXIT_STATUS` (its beat was still for the timeout less three beats). A
survivor whose collective failed (gloo notices a dead peer at once) names the lost process as soon
as its beat has been still for 5 s. The coordination service of process 0 runs in a child process
that outlives process 0 by the timeout (+ 15 s), so that a lost process 0 is named too (inside
process 0, its loss would abort the others at once). A process that leaves after an error says so
(:func:`leave_failed`), and the others end at once; at a normal exit (:func:`shutdown`, also run at
interpreter exit) a process waits, still watched and watching, until every process has finished.

**Split.** Work items are split deterministically: :func:`assign` gives each item (a stack chunk
of zoo training or fine-tuning, with its cost) to a process, longest first onto the least loaded
process; :func:`shard` gives a process its contiguous share of a list of equal items (the models
of a stack whose knowledge to extract). Every process computes the same split from the same
inputs, so no process needs to be told its share.

**Parts.** Each process computes its share without talking to the others (a *local step*,
:func:`local_step`: an error there is reported on every process instead of leaving the others
waiting), then the parts meet in one of two ways (docs/design.md, "Multi-process stages"):

- **Exchange** (knowledge records, fine-tune accuracies): every process needs the whole result
  in memory (the aligner trains on every model; an index build returns the whole index), so each
  process's part travels to every process through JAX's collectives (:func:`allgather_bytes`,
  checksummed :func:`know2vec_jax.storage.pack_arrays` blobs, or :func:`allgather`); no shared
  filesystem is needed, and process 0 alone writes caches and final artifacts
  (:func:`on_writer`).
- **Part files** (the zoo): each process writes its part as an atomic artifact into a hidden
  sibling directory of the target; after a barrier process 0 verifies every part (present,
  complete, checksums) and writes the final artifact atomically. A run that dies leaves only
  the hidden parts directory, which never loads as a zoo.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

# Extra seconds JAX itself waits beyond :func:`initialize`'s own deadline: the runtime aborts the
# process when its deadline passes, so ours must come first to report the failure in one line.
_RUNTIME_GRACE = 60
# Bytes per collective round of :func:`allgather_bytes`: bounds the gathered buffer each device
# holds at once (process count x this).
_SLAB = 1 << 25
# Seconds from a lost process's last beat to the end of every survivor (``--lost-process-timeout``).
LOST_PROCESS_TIMEOUT = 20.0
# The exit status of a process that ends because another process of its run was lost or failed.
LOST_EXIT_STATUS = 3
# The runtime's own heartbeat timeout stays this much above the loss timeout: its abort (many
# lines, no process named) must never come before the watchdog's one line.
_HEARTBEAT_MARGIN = 30
# Once a collective failed here, a process whose beat has been still this long (if shorter than
# the loss timeout's) is taken as the cause: gloo reports a dead peer at once, the beat says which.
_SUSPECT_AFTER = 5.0
# Seconds between reading that another process failed and ending this one for it.
_FAILED_GRACE = 2.0
# How long process 0's coordination service outlives an abnormal end of process 0, beyond the
# loss timeout: long enough for every other process to notice and name it.
_SERVICE_LINGER = 15.0
# Where the watchdogs meet in the coordinator's key-value store.
_KEYS = "know2vec/watchdog/"


class DistributedError(ValueError):
  """A multi-process run that cannot start or continue as asked; the message says why."""


def process_count() -> int:
  """Processes of this JAX run (1 unless :func:`initialize` joined several)."""
  import jax
  return jax.process_count()


def process_index() -> int:
  """This process's index in ``[0, process_count())``."""
  import jax
  return jax.process_index()


def is_writer() -> bool:
  """Whether this process writes shared artifacts and caches (process 0, or the only one)."""
  return process_index() == 0


def _parse_address(address: str) -> tuple[str, int]:
  m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", address.strip()) if isinstance(address, str) \
      else None
  if m is None or not 0 < int(m.group(2)) < 65536:
    raise DistributedError(f"coordinator must be HOST:PORT with a port in 1..65535 (or 'auto'), "
                           f"got {address!r}")
  return m.group(1), int(m.group(2))


def _check_int(value, name: str, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise DistributedError(f"{name} must be an integer >= {low}, got {value!r}")
  return int(value)


def _reachable(host: str, port: int) -> bool:
  try:
    with socket.create_connection((host, port), timeout=1.0):
      return True
  except OSError:
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout: float = 300.0,
               heartbeat_timeout: int = 100,
               lost_process_timeout: float = LOST_PROCESS_TIMEOUT) -> tuple[int, int]:
  """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

  Call it before any other JAX work. With no arguments, or ``num_processes=1``, nothing is
  started and the run is single-process. ``coordinator="auto"`` lets JAX detect the cluster
  (Cloud TPU, SLURM, Open MPI; ``num_processes`` / ``process_id`` may still be given); otherwise
  all three arguments are needed, the same ``coordinator`` and ``num_processes`` on every
  process and each ``process_id`` once. On CPU the processes talk through JAX's gloo collectives.

  Args:
    coordinator: ``"HOST:PORT"`` of process 0 (which listens there), or ``"auto"``.
    num_processes: N, the number of processes.
    process_id: this process's id in ``[0, N)``.
    timeout: seconds to wait for the coordinator and every process to join.
    heartbeat_timeout: seconds after which the runtime itself declares a silent process dead
      and aborts the others: a backstop, raised to ``lost_process_timeout`` + 30 s if lower.
    lost_process_timeout: seconds (>= 1) within which, after a process of the run stops
      responding, every other process prints one line naming it and exits with status
      :data:`LOST_EXIT_STATUS` (module docstring, "Lost processes").

  Returns:
    ``(process index, process count)``.

  Raises:
    DistributedError: a malformed address, a missing argument, a process id outside ``[0, N)``,
      processes that disagree on N, a coordinator that cannot be reached or processes that do
      not all join within ``timeout`` seconds, or a launch after JAX has already started (after
      a timeout the process cannot join any run: exit it).
  """
  import jax
  if coordinator is None and num_processes is None and process_id is None:
    return jax.process_index(), jax.process_count()
  if coordinator is None:
    raise DistributedError("--num-processes/--process-id need --coordinator HOST:PORT (or "
                           "--coordinator auto on a TPU pod or a SLURM/Open MPI cluster)")
  auto = coordinator == "auto"
  host, port = (None, None) if auto else _parse_address(coordinator)
  if num_processes is not None:
    num_processes = _check_int(num_processes, "num_processes", 1)
  if process_id is not None:
    process_id = _check_int(process_id, "process_id", 0)
  if not auto and (num_processes is None or process_id is None):
    raise DistributedError(f"--coordinator {coordinator} needs --num-processes N and "
                           "--process-id I as well")
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise DistributedError(f"process_id {process_id} is outside [0, {num_processes}): ids run "
                           f"from 0 to num_processes - 1 = {num_processes - 1}")
  if timeout <= 0 or heartbeat_timeout < 1:
    raise DistributedError(f"timeout and heartbeat_timeout must be positive, got {timeout} and "
                           f"{heartbeat_timeout}")
  if isinstance(lost_process_timeout, bool) or not isinstance(lost_process_timeout, (int, float)) \
      or not 1 <= lost_process_timeout < math.inf:
    raise DistributedError(f"the lost-process timeout must be at least 1 second, got "
                           f"{lost_process_timeout!r}")
  heartbeat = max(int(heartbeat_timeout), math.ceil(lost_process_timeout) + _HEARTBEAT_MARGIN)
  if num_processes == 1:
    return 0, 1  # one process: nothing to coordinate, the single-process path as it is
  if jax.distributed.is_initialized():
    raise DistributedError("jax.distributed is already initialized in this process")

  # The runtime aborts the whole process when its own deadline passes, so it runs in a thread
  # with a later deadline, and this thread reports the failure first.
  outcome: list[BaseException | None] = []

  def connect():
    try:
      with _service_in_child(lost_process_timeout + _SERVICE_LINGER):
        jax.distributed.initialize(
            coordinator_address=None if auto else f"{host}:{port}", num_processes=num_processes,
            process_id=process_id, initialization_timeout=int(timeout) + _RUNTIME_GRACE,
            heartbeat_timeout_seconds=heartbeat)
      outcome.append(None)
    except BaseException as e:  # reported below, in the caller's thread
      outcome.append(e)

  who = (f"process {process_id} of {num_processes}" if process_id is not None else
         "this process")
  t0 = time.monotonic()
  thread = threading.Thread(target=connect, name="jax-distributed-connect", daemon=True)
  thread.start()
  thread.join(timeout)
  if not outcome:
    waited = time.monotonic() - t0
    if auto:
      raise DistributedError(f"the processes of the detected cluster did not all join within "
                             f"{waited:.0f} s ({who})")
    if process_id != 0 and not _reachable(host, port):
      raise DistributedError(f"cannot reach the coordinator {host}:{port} within {waited:.0f} s "
                             f"({who}): start process 0 there, or check the address and the "
                             "firewall")
    raise DistributedError(f"not all {num_processes} processes joined the coordinator "
                           f"{host}:{port} within {waited:.0f} s ({who}): check that every "
                           f"process was started, with --num-processes {num_processes} and its "
                           "own --process-id")
  if outcome[0] is not None:
    e = outcome[0]
    msg = " ".join(str(e).split())
    if auto and isinstance(e, ValueError) and "should be defined" in msg:
      raise DistributedError("--coordinator auto found no cluster environment (Cloud TPU, SLURM, "
                             "Open MPI): pass --coordinator HOST:PORT --num-processes N "
                             "--process-id I") from None
    raise DistributedError(f"cannot start the multi-process run: {msg[:300]}") from None
  index, count = _check_joined(num_processes, process_id, coordinator)
  _start_watchdog(index, count, float(lost_process_timeout))
  return index, count


def _check_joined(num_processes, process_id, coordinator) -> tuple[int, int]:
  """After the runtime started: every process must have been given the run's process count."""
  import jax
  from jax.experimental import multihost_utils
  count, index = jax.process_count(), jax.process_index()
  asked = np.asarray([num_processes if num_processes is not None else count], np.int32)
  every = np.asarray(multihost_utils.process_allgather(asked)).reshape(-1)
  wrong = [i for i, n in enumerate(every) if n != count]
  if wrong:
    raise DistributedError(
        f"processes disagree on the process count: the coordinator {coordinator} runs {count} "
        f"processes, but process(es) {wrong} were started with num_processes "
        f"{sorted({int(every[i]) for i in wrong})}")
  if process_id is not None and index != process_id:
    raise DistributedError(f"asked for process id {process_id}, the runtime gave {index}")
  return index, count


# ---- lost processes ------------------------------------------------------------------------------

# Run by process 0's child (``python -c``): starts the coordination service, says "ready", and
# keeps it up until process 0 says "done" (a normal end) or, when process 0 ends otherwise, for
# the time the other processes need to notice and name it.
_SERVICE_CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
try:
  from jaxlib import _jax
  service = _jax.get_distributed_runtime_service(args["address"], args["num_nodes"],
                                                 **args["options"])
except Exception as e:
  print("error: " + " ".join(str(e).split()), flush=True)
  sys.exit(1)
print("ready", flush=True)
if sys.stdin.readline().strip() != "done":
  time.sleep(args["linger"])
service.shutdown()
"""


class _ChildService:
  """Process 0's coordination service, run by a child process (see :func:`_service_in_child`)."""

  def __init__(self, address: str, num_nodes: int, linger: float, options: dict):
    self.proc = subprocess.Popen(
        [sys.executable, "-c", _SERVICE_CHILD,
         json.dumps({"address": address, "num_nodes": num_nodes, "linger": linger,
                     "options": options})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        # Its own session: a Ctrl-C meant for process 0 must not take the service from the others.
        start_new_session=True)
    said = self.proc.stdout.readline().decode(errors="replace").strip()
    if said != "ready":
      self.proc.wait()
      raise RuntimeError(f"the coordination service did not start on {address}: "
                         f"{said or f'exit status {self.proc.returncode}'}")

  def shutdown(self) -> None:
    """Ends the service (process 0's normal end, after the runtime's shutdown barrier)."""
    try:
      self.proc.stdin.write(b"done\n")
      self.proc.stdin.close()
      self.proc.wait(30)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()
      self.proc.wait()


class _service_in_child:
  """While ``jax.distributed.initialize`` runs: process 0's coordination service starts in a
  child process instead of in process 0.

  The runtime of every other process aborts the moment process 0's service goes away, before
  any watchdog could say why; in a child, the service outlives a lost process 0 by ``linger``
  seconds, so that the others notice and name it. Everything else is the runtime's own. A
  runtime without the expected internals keeps its service in process 0 (a lost process 0 then
  ends the others through the runtime's abort).
  """

  def __init__(self, linger: float):
    self.linger = linger
    self.module = None

  def __enter__(self):
    from jax._src import distributed as jax_distributed
    real = getattr(jax_distributed, "_jax", None)
    if real is None or not hasattr(real, "get_distributed_runtime_service"):
      return self
    linger = self.linger

    class Runtime:
      def __getattr__(self, name):
        return getattr(real, name)

      def get_distributed_runtime_service(self, address, num_nodes, **options):
        return _ChildService(address, num_nodes, linger, options)

    self.module, self.real = jax_distributed, real
    jax_distributed._jax = Runtime()
    return self

  def __exit__(self, *exc):
    if self.module is not None:
      self.module._jax = self.real
    return False


def _flush_quietly() -> None:
  """Flushes stdout and stderr, giving up after a second: the main thread may hold their locks
  while blocked, and a process that ends must not wait for it."""
  def flush():
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # a closed or broken stream: nothing to save
        pass
  t = threading.Thread(target=flush, daemon=True)
  t.start()
  t.join(0.5)


def _processes(ids: list[int], count: int) -> str:
  return (f"process {ids[0]} of {count}" if len(ids) == 1 else
          f"processes {', '.join(map(str, ids))} of {count}")


class _Watchdog:
  """Publishes this process's beat and watches the other processes' beats (module docstring,
  "Lost processes").

  Two daemon threads: one talks to the key-value store (its calls may hang when the store's host
  is gone), the other judges from what was last heard, so that a hanging call is a verdict too.
  Beats are counters, not clocks: a beat is stale when it has not moved between this process's
  own successful reads, so hosts need no common clock and a paused process does not blame the
  others when it resumes.
  """

  def __init__(self, client, index: int, count: int, timeout: float):
    self.client, self.index, self.count, self.timeout = client, index, count, timeout
    # A beat every interval; a process is lost after ``silence`` seconds without one, so that
    # with the read and the judgement that follow (an interval each, at most) every survivor ends
    # within ``timeout`` of the last beat.
    self.interval = min(1.0, timeout / 20)
    self.silence = timeout - 3 * self.interval
    now = time.monotonic()
    self.lock = threading.Lock()
    self.beats: dict[int, str | None] = {p: None for p in range(count) if p != index}
    self.moved = {p: now for p in self.beats}  # when each beat was last seen to move
    self.heard = now  # the last successful read of the store
    self.failing: float | None = None  # since when reads fail (None: the last one succeeded)
    self.pending: float | None = None  # since when the current read has been waiting
    self.done: set[int] = set()
    self.failed: dict[int, float] = {}  # process -> when its failure was first read
    self.suspect: float | None = None  # when a collective of this process failed
    self.leaving = False  # this process is ending by itself: no verdicts
    self.stopped = threading.Event()
    self.threads = [threading.Thread(target=self._talk, name="know2vec-watchdog-beat",
                                     daemon=True),
                    threading.Thread(target=self._judge, name="know2vec-watchdog-judge",
                                     daemon=True)]

  def start(self) -> None:
    for t in self.threads:
      t.start()

  def _talk(self) -> None:
    from jax._src import distributed as jax_distributed
    beat = 0
    while not self.stopped.is_set():
      if jax_distributed.global_state.client is not self.client:
        self.stopped.set()  # the runtime was shut down directly: nothing left to watch
        return
      beat += 1
      start = time.monotonic()
      self.pending = start
      try:
        self.client.key_value_set(f"{_KEYS}alive/{self.index}", str(beat), allow_overwrite=True)
        entries = self.client.key_value_dir_get(_KEYS)
      except Exception:  # unreachable store: the judge decides from how long it lasts
        with self.lock:
          self.pending = None
          self.failing = self.failing if self.failing is not None else start
      else:
        now = time.monotonic()
        with self.lock:
          self.pending = self.failing = None
          self.heard = now
          for key, value in entries:
            kind, _, who = key[len(_KEYS):].partition("/")
            if not who.isdigit():
              continue
            p = int(who)
            if kind == "alive" and p in self.beats and value != self.beats[p]:
              self.beats[p], self.moved[p] = value, now
            elif kind == "done":
              self.done.add(p)
            elif kind == "failed":
              self.failed.setdefault(p, now)
      self.stopped.wait(self.interval)

  def _judge(self) -> None:
    while not self.stopped.wait(self.interval):
      verdict = self.verdict(time.monotonic())
      if verdict is not None:
        self._end(verdict)

  def verdict(self, now: float) -> str | None:
    """The line that ends this process now, or None while every other process is fine."""
    with self.lock:
      if self.leaving or self.stopped.is_set():
        return None
      limit = self.silence if self.suspect is None else min(self.silence, _SUSPECT_AFTER)
      # A process that failed says so; the others end a moment later (when the failure was
      # collective, every process is leaving by itself by then, with its own line).
      failed = sorted(p for p, t in self.failed.items()
                      if p != self.index and now - t >= _FAILED_GRACE)
      if failed:
        return f"{_processes(failed, self.count)} failed (see its output): ending this run"
      waiting = [t for t in (self.failing, self.pending) if t is not None]
      if self.index != 0 and waiting and now - min(waiting) > limit:
        return (f"process 0 of {self.count} (the coordinator) stopped responding "
                f"{now - self.heard:.0f} s ago (lost): ending this run")
      lost = sorted(p for p in self.beats if self.heard - self.moved[p] > limit)
      if lost:
        ago = now - min(self.moved[p] for p in lost)
        return (f"{_processes(lost, self.count)} stopped responding {ago:.0f} s ago (lost): "
                "ending this run")
      return None

  def _end(self, verdict: str) -> None:
    # One line, then out at once: the main thread may be blocked in a collective that never
    # returns, and the interpreter's exit handlers would wait in the runtime's shutdown barrier
    # for the lost process. Every store writes atomically, so nothing half-written remains.
    _flush_quietly()
    os.write(2, f"know2vec: error: {verdict}\n".encode())
    os._exit(LOST_EXIT_STATUS)

  def explain(self) -> None:
    """After a collective of this process failed: waits for the verdict (which ends the process
    when another process is lost or failed); returns when there is none within the timeout."""
    with self.lock:
      self.suspect = time.monotonic()
    self.stopped.wait(self.timeout + 3 * self.interval)
    with self.lock:
      self.suspect = None

  def mark(self, kind: str) -> None:
    """Writes this process's ``done`` or ``failed`` mark (best effort: the store may be gone)."""
    try:
      self.client.key_value_set(f"{_KEYS}{kind}/{self.index}", "1", allow_overwrite=True)
    except Exception:
      pass

  def wait_for_all(self, limit: float) -> None:
    """Waits until every process is done (or ``limit`` seconds), watching them meanwhile."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
      with self.lock:
        if len(self.done | {self.index}) == self.count:
          return
      time.sleep(self.interval)

  def stop(self) -> None:
    self.stopped.set()
    for t in self.threads:
      if t is not threading.current_thread():
        t.join(5.0)


_watchdog: _Watchdog | None = None
_failed_here = False
# jax.distributed's own default: how long its shutdown barrier waits for every process.
_SHUTDOWN_WAIT = 300.0


def _start_watchdog(index: int, count: int, timeout: float) -> None:
  global _watchdog
  from jax._src import distributed as jax_distributed
  client = getattr(jax_distributed.global_state, "client", None)
  if client is None or not hasattr(client, "key_value_dir_get"):
    return  # a runtime without a key-value store: its own heartbeat ends a lost run
  _watchdog = _Watchdog(client, index, count, timeout)
  _watchdog.start()
  # Registered after JAX's own exit handler, so it runs first: this process waits, watched and
  # watching, for the others before the runtime's shutdown barrier (which watches nothing).
  atexit.register(shutdown)
  previous = sys.excepthook

  def excepthook(kind, value, tb):
    _collective_failed(value)
    previous(kind, value, tb)
    leave_failed()
  sys.excepthook = excepthook


def _collective_failed(error: BaseException) -> None:
  """A runtime error in a multi-process run: when another process is lost or failed, the watchdog
  ends this process with one line naming it (within the loss timeout); otherwise this returns
  and the error stands."""
  import jax
  if _watchdog is not None and isinstance(error, jax.errors.JaxRuntimeError):
    _watchdog.explain()


def leave_failed() -> None:
  """Tells the other processes that this one is leaving after an error, so that they end at
  once (one line naming it) instead of waiting for it; a process that then reaches its normal
  exit leaves at once too (no shutdown barrier, which would hold it for minutes). Nothing in a
  single-process run."""
  global _failed_here
  wd = _watchdog
  if wd is None:
    return
  _failed_here = True
  with wd.lock:
    wd.leaving = True
  wd.mark("failed")


def shutdown() -> None:
  """Leaves the multi-process run at its normal end (also run at interpreter exit; nothing in a
  single-process run): marks this process done, waits (watched and watching) until every
  process is done, then shuts the runtime down. After :func:`leave_failed`, ends the process at
  once instead."""
  global _watchdog
  import jax
  wd = _watchdog
  if _failed_here:
    _flush_quietly()
    os._exit(1)
  if wd is not None:
    if jax.distributed.is_initialized():
      wd.mark("done")
      wd.wait_for_all(_SHUTDOWN_WAIT)
    wd.stop()
    _watchdog = None
  jax.distributed.shutdown()


# ---- the split -----------------------------------------------------------------------------------

def assign(costs: Sequence[float], num_parts: int) -> list[int]:
  """Which part (process) does each work item: longest first onto the least loaded part.

  Deterministic (ties go to the earlier item and the lower part), so every process computes the
  same assignment from the same costs. Within 4/3 of the best possible largest load.

  Args:
    costs: one non-negative cost per item (e.g. model-steps of a stack chunk).
    num_parts: P >= 1.

  Returns:
    The part of each item, in item order.
  """
  num_parts = _check_int(num_parts, "num_parts", 1)
  costs = [float(c) for c in costs]
  if any(not np.isfinite(c) or c < 0 for c in costs):
    raise DistributedError(f"work costs must be finite and >= 0, got {costs}")
  load = [0.0] * num_parts
  owner = [0] * len(costs)
  for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
    p = min(range(num_parts), key=lambda p: (load[p], p))
    owner[i] = p
    load[p] += costs[i]
  return owner


def mine(items: Sequence[T], costs: Sequence[float] | None = None,
         index: int | None = None, count: int | None = None) -> list[T]:
  """This process's items of ``items`` under :func:`assign` (equal costs when None), in item
  order."""
  index = process_index() if index is None else index
  count = process_count() if count is None else count
  owner = assign([1.0] * len(items) if costs is None else costs, count)
  return [it for it, p in zip(items, owner) if p == index]


def shard(n: int, index: int | None = None, count: int | None = None) -> slice:
  """This process's contiguous share ``[start, stop)`` of n equal items (sizes differ by at most
  one; the first ``n % count`` shares hold one more)."""
  from know2vec_jax.data import shard_range
  index = process_index() if index is None else index
  count = process_count() if count is None else count
  return slice(*shard_range(n, index, count))


# ---- collectives ---------------------------------------------------------------------------------

def allgather(array) -> np.ndarray:
  """Every process's ``array`` (same shape and dtype on each), stacked: [P, ...]."""
  from jax.experimental import multihost_utils
  a = np.asarray(array)
  if process_count() == 1:
    return a[None]
  try:
    return np.asarray(multihost_utils.process_allgather(a, tiled=False))
  except Exception as e:  # a lost peer: named in one line rather than this error
    _collective_failed(e)
    raise


def allgather_bytes(blob: bytes) -> list[bytes]:
  """Every process's ``blob`` (any length), in process order, through JAX's collectives."""
  if process_count() == 1:
    return [bytes(blob)]
  if len(blob) >= 2 ** 31:
    raise DistributedError(f"a part of {len(blob)} bytes is too large to exchange (< 2 GiB)")
  sizes = allgather(np.asarray(len(blob), np.int32)).reshape(-1).astype(np.int64)
  longest = int(sizes.max())
  out = [bytearray() for _ in sizes]
  view = np.frombuffer(bytes(blob), np.uint8)
  for start in range(0, longest, _SLAB):
    piece = np.zeros(min(_SLAB, longest - start), np.uint8)
    own = view[start:start + len(piece)]
    piece[:len(own)] = own
    got = allgather(piece)
    for i, row in enumerate(got):
      out[i] += row.tobytes()
  return [bytes(o[:n]) for o, n in zip(out, sizes)]


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (the same name on every process)."""
  if process_count() > 1:
    from jax.experimental import multihost_utils
    try:
      multihost_utils.sync_global_devices(name)
    except Exception as e:  # a lost peer: named in one line rather than this error
      _collective_failed(e)
      raise


def failed(ok: bool) -> list[int]:
  """The processes that report ``ok=False`` (a collective: every process calls it)."""
  flags = allgather(np.asarray(1 if ok else 0, np.int32)).reshape(-1)
  return [i for i, f in enumerate(flags) if not f]


def local_step(what: str, fn: Callable[[], T]) -> T:
  """Runs ``fn`` (work without collectives) on every process, then checks that every process
  succeeded: an error on one process is re-raised there and reported on the others as a
  :class:`DistributedError` naming it, instead of leaving them waiting at the next collective.

  Single-process: just ``fn()``.
  """
  if process_count() == 1:
    return fn()
  error, result = None, None
  try:
    result = fn()
  except Exception as e:  # re-raised after every process has been told
    error = e
  bad = failed(error is None)
  if error is not None:
    raise error
  if bad:
    raise DistributedError(f"{what} failed on process(es) {bad} (see their output); this process "
                           "stops too")
  return result


def on_writer(what: str, fn: Callable[[], T]) -> T | None:
  """Runs ``fn`` (e.g. an artifact's save) on process 0 only; every process returns once it is
  done. Returns ``fn()``'s result on process 0, None on the others.

  Raises:
    The error of ``fn`` on process 0; :class:`DistributedError` on the others when it failed.
  """
  if process_count() == 1:
    return fn()
  error, result = None, None
  if is_writer():
    try:
      result = fn()
    except Exception as e:
      error = e
  bad = failed(error is None)
  if error is not None:
    raise error
  if bad:
    raise DistributedError(f"process 0 could not write the {what} (see its output)")
  return result


def total(value: int) -> int:
  """The sum of an integer (below 2**31) over every process."""
  return int(allgather(np.asarray(value, np.int32)).astype(np.int64).sum())
