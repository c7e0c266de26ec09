"""The aligner across 2 processes on loopback (JAX's CPU collectives) equals 1 process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(nproc: int, tmp_path, devices_per_process: int):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  out = tmp_path / f"out{nproc}.json"
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(nproc), port, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(nproc)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return json.loads(out.read_text())


def test_two_processes_match_one(tmp_path):
  one = _run(1, tmp_path, devices_per_process=4)
  two = _run(2, tmp_path, devices_per_process=2)
  assert one["processes"] == 1 and two["processes"] == 2
  assert one["devices"] == two["devices"] == 4
  np.testing.assert_allclose(one["losses"], two["losses"], rtol=1e-4)
  for a, b in zip(one["params"], two["params"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
