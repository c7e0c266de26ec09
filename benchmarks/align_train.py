"""Aligner training throughput: (query, model) samples per second of ``align.train_step``.

Measured on one device in this process and on 8 devices in a subprocess started with
``--xla_force_host_platform_device_count=8`` (unless this process already has 8 CPU devices).
Forced host devices share the same CPU cores, so the 8-device figure is a correctness and overhead
check of the sharded step (batch split over the ``data`` axis, replicated state, XLA-inserted
collectives), not a scaling result: real scaling needs real devices. The check trains the same
steps on 1 and on 8 devices from the same initialisation and reports the largest loss and
parameter differences.

Two rates per device count: ``trainer`` is :meth:`align.Trainer.run` (host-side batch sampling
and transfer included: what training actually runs at) and ``step`` is the jitted step alone on a
batch already on the device. The data are random grids shaped like the demo's (K_max = 10,
D = 128, tasks with 2, 4 and 10 classes); a step's cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.common import block, ratio
from know2vec_jax import align
from know2vec_jax.mesh import data_mesh
from know2vec_jax.vectorizers import VectorizerConfig

NAME = "align_train"
BATCH = 64
DIM = 128  # the backbone's feature size D
OBJECTIVE = align.RankingObjective(subset_prob=0.3)


def _data(models: int = 256, tasks: int = 64, episodes: int = 8, k_max: int = 10,
          dim: int = DIM, seed: int = 0) -> align.AlignData:
  rng = np.random.default_rng(seed)
  ks = np.asarray([(2, 4, 4, 10)[t % 4] for t in range(tasks)])
  task_mask = (np.arange(k_max)[None] < ks[:, None]).astype(np.float32)
  model_task = (np.arange(models) % tasks).astype(np.int32)
  grid_mask = task_mask[:, :, None, None] * task_mask[:, None, :, None]
  model_grid = rng.standard_normal((models, k_max, k_max, dim), dtype=np.float32)
  model_grid *= grid_mask[model_task]
  query_grid = rng.standard_normal((tasks, episodes, k_max, k_max, dim), dtype=np.float32)
  query_grid *= grid_mask[:, None]
  return align.AlignData(model_grid, task_mask[model_task], model_task, query_grid, task_mask)


def measure(num_devices: int, steps: int, warmup: int = 3) -> dict:
  """Samples/s of the trainer and of the bare jitted step on a ``num_devices`` mesh."""
  data = _data()
  cfg = align.AlignConfig(steps=warmup + steps, batch_size=BATCH, checkpoint_every=10**9)
  trainer = align.Trainer(VectorizerConfig(), DIM, cfg, OBJECTIVE, data,
                          mesh=data_mesh(num_devices))
  t0 = time.perf_counter()
  trainer.run(warmup, progress=False)
  block(trainer.state)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  trainer.run(warmup + steps, progress=False, log_every=10**9)
  block(trainer.state)
  trainer_s = time.perf_counter() - t0
  # The jitted public step alone, sharded as the trainer shards it, on one batch already placed.
  mesh = data_mesh(num_devices)
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  graphdef, state = align.init_state(VectorizerConfig(), DIM, data.num_tasks, cfg)
  step = jax.jit(functools.partial(align.train_step, graphdef, cfg, OBJECTIVE),
                 in_shardings=(replicated, split, replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
  batch = jax.device_put(OBJECTIVE.host_batch(data, cfg, 0, slice(None)), split)
  state = jax.device_put(state, replicated)
  key = jax.random.key(0)
  state, _ = step(state, batch, (), key)
  block(state)
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batch, (), jax.random.fold_in(key, i))
  block((state, metrics))
  step_s = time.perf_counter() - t0
  return dict(devices=num_devices, backend=jax.default_backend(), batch=BATCH, steps=steps,
              trainer_samples_per_s=BATCH * steps / trainer_s,
              step_samples_per_s=BATCH * steps / step_s,
              step_ms=step_s / steps * 1e3, first_steps_s=compile_s)


def agreement(num_devices: int, steps: int = 4) -> dict:
  """Largest |1-device - N-device| loss and parameter difference after the same steps."""
  data = _data(models=64, tasks=16)
  cfg = align.AlignConfig(steps=steps, batch_size=BATCH, checkpoint_every=10**9)
  runs = []
  for n in (1, num_devices):
    tr = align.Trainer(VectorizerConfig(), DIM, cfg, OBJECTIVE, data, mesh=data_mesh(n))
    hist = tr.run(steps, progress=False, log_every=1)
    runs.append(([h["loss"] for h in hist], jax.tree.leaves(jax.device_get(tr.state["params"]))))
  (l1, p1), (ln, pn) = runs
  return dict(steps=steps, max_loss_diff=float(np.max(np.abs(np.subtract(l1, ln)))),
              max_param_diff=float(max(np.max(np.abs(a - b)) for a, b in zip(p1, pn))))


def _subprocess(devices: int, steps: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "benchmarks.align_train", "--devices", str(devices),
         "--steps", str(steps)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  del ctx
  steps = 8 if quick else 40
  rows = [measure(1, steps)]
  print(f"  1 device ({rows[0]['backend']}): {rows[0]['trainer_samples_per_s']:.0f} samples/s "
        f"(step alone {rows[0]['step_samples_per_s']:.0f})", flush=True)
  if jax.default_backend() == "cpu" and jax.device_count() >= 8:
    eight = dict(measure(8, steps), agreement=agreement(8), where="this process")
  else:
    eight = dict(_subprocess(8, steps), where="subprocess, 8 forced host devices")
  check = eight.pop("agreement")
  rows.append(eight)
  print(f"  8 devices ({eight['backend']}, {eight['where']}): "
        f"{eight['trainer_samples_per_s']:.0f} samples/s; 1 vs 8 devices: loss diff "
        f"{check['max_loss_diff']:.2g}, param diff {check['max_param_diff']:.2g}", flush=True)
  return {"rows": rows, "checks": check,
          "ratios": {"8dev_vs_1dev_trainer": ratio(eight["trainer_samples_per_s"],
                                                   rows[0]["trainer_samples_per_s"])},
          "headline": {"align_samples_per_s": dict(
              value=rows[0]["trainer_samples_per_s"],
              config=f"Trainer.run, batch {BATCH}, default attention vectorizer, 1 device",
              baseline=f"8 forced host devices: {eight['trainer_samples_per_s']:.0f} samples/s "
                       "(correctness only)")},
          "note": "8 forced host devices share the CPU cores: correctness and overhead, not "
                  "scaling"}


def _worker(argv=None) -> int:
  p = argparse.ArgumentParser(description="one device-count measurement (used by run())")
  p.add_argument("--devices", type=int, required=True)
  p.add_argument("--steps", type=int, required=True)
  args = p.parse_args(argv)
  if jax.device_count() != args.devices:
    raise SystemExit(f"expected {args.devices} devices, JAX has {jax.device_count()} "
                     "(set XLA_FLAGS=--xla_force_host_platform_device_count)")
  out = dict(measure(args.devices, args.steps), agreement=agreement(args.devices))
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  raise SystemExit(_worker())
