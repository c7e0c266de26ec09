"""Multi-process runs: the launch, the split of work across processes, and the exchange of parts.

**Launch.** :func:`initialize` starts ``jax.distributed`` from explicit arguments (the coordinator's
``HOST:PORT``, the number of processes, this process's id) or, with ``coordinator="auto"``, from
what JAX detects in the environment (Cloud TPU, SLURM, Open MPI). It validates the arguments
before anything starts, waits a bounded time for the coordinator and every process, and turns
each failure into one line (:class:`DistributedError`) instead of the runtime's abort. One process
(or no launch arguments at all) leaves JAX untouched: the single-process path is the same code.

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

import re
import socket
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
               heartbeat_timeout: int = 100) -> tuple[int, int]:
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
    heartbeat_timeout: seconds after which the runtime declares a silent process dead (and ends
      the others).

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
  if num_processes == 1:
    return 0, 1  # one process: nothing to coordinate, the single-process path as it is
  if jax.distributed.is_initialized():
    raise DistributedError("jax.distributed is already initialized in this process")

  # The runtime aborts the whole process when its own deadline passes, so it runs in a thread
  # with a later deadline, and this thread reports the failure first.
  outcome: list[BaseException | None] = []

  def connect():
    try:
      jax.distributed.initialize(
          coordinator_address=None if auto else f"{host}:{port}", num_processes=num_processes,
          process_id=process_id, initialization_timeout=int(timeout) + _RUNTIME_GRACE,
          heartbeat_timeout_seconds=int(heartbeat_timeout))
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
  return _check_joined(num_processes, process_id, coordinator)


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
  return np.asarray(multihost_utils.process_allgather(a, tiled=False))


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
    multihost_utils.sync_global_devices(name)


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
