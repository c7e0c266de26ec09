"""Knowledge extraction at scale: models/s on a synthetic zoo with 1-8 devices and 1-2 processes.

The zoo has the demo preset's families in the demo's proportions (``mlp``, ``cnn_s``, ``cnn_l``
with K in {2, 4, 10}: :func:`know2vec_jax.zoo.specs.demo_specs`), ``SIZES[...]["scale"]`` times
over (2,175 models; 435 with ``--quick``), freshly initialised
(:func:`know2vec_jax.zoo.train.init_stack`: what a probe costs does not depend on the weights'
values) and wrapped as the zoo's black boxes
(:class:`know2vec_jax.blackbox.StackGroup`, strategy ``auto``). Every configuration extracts the
knowledge of every model (:func:`know2vec_jax.knowledge.group_knowledge`: anchor pass over the
probe pool, then the T-step boundary search) with the default :class:`KnowledgeConfig` on a probe
pool of random images, smaller than the demo pool's 9,600 (256 images on CPU, 4,096 on
accelerators) so that the suite stays short: a model's queries are ``N_pool + T K (K - 1)``, so
queries/s carries over to any pool size.

Configurations (rows; ``--quick`` runs the three the headline reads: 1 and 8 devices, 2
processes):

- 1 process with 1, 2, 4 and 8 devices: the stacks' model axis sharded over a ``data`` mesh of the
  process's devices (``StackGroup(mesh=...)``, what ``groups_from_zoo(mesh=...)`` builds); one
  device runs as the product's default (no mesh).
- 2 processes on loopback (:func:`know2vec_jax.distributed.initialize`) with 1 device each:
  ``group_knowledge`` splits every stack's models between the processes and exchanges the
  records through JAX's collectives (docs/design.md, "Multi-process stages").

On a CPU host every configuration runs in a fresh process, because XLA reads the forced host
device count (``--xla_force_host_platform_device_count``) once, at start. On a GPU or TPU host the
1-process rows run in the suite's own process over its first n devices (only counts the host has),
and a 2-process row gives each process its own GPUs (``CUDA_VISIBLE_DEVICES``); on TPU it is left
out (a TPU slice's processes are launched by the slice, and a second process cannot open chips
this one holds).

Each run compiles every call shape first (one untimed call per stack and shape: the pool chunks
and a search step), then times one whole extraction between two barriers: models/s = models /
seconds (all processes together). ``speedup`` is a row's rate over the 1-process 1-device rate,
``efficiency`` the speedup per device (1 = perfect scaling). ``same_as_1_device``: the share of
models whose knowledge equals the 1-device run's bit for bit.

``host_side`` (:func:`host_costs`): milliseconds per model of the work that stays on the host
whatever the devices (knowledge extraction's bookkeeping with black boxes that answer at once;
vectorizing after probing), at the demo pool's size: the inputs of docs/scale.md.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time

NAME = "knowledge_scaling"
# Copies of the demo zoo's families (435 models each) and the probe pool, per size.
SIZES = {"quick": dict(scale=1, pool=256, pool_batch=256),
         "cpu": dict(scale=5, pool=256, pool_batch=256),
         "accel": dict(scale=5, pool=4096, pool_batch=2048)}
# (processes, devices per process) per size. --quick runs the three the headline reads.
CONFIGS = {"quick": ((1, 1), (1, 8), (2, 1)),
           "full": ((1, 1), (1, 2), (1, 4), (1, 8), (2, 1))}
IMAGE_SHAPE = (28, 28, 1)


# ---- one run (a worker process) ---------------------------------------------------------------

def _stacks(composition: dict[str, int]):
  """The synthetic zoo: one freshly initialised stack per ``"arch-kK": count``."""
  from know2vec_jax.zoo import train
  from know2vec_jax.zoo.zoo import ZooStack
  stacks, seed = [], 0
  for name, count in composition.items():
    arch, k = re.fullmatch(r"(\w+)-k(\d+)", name).groups()
    spec = train.StackSpec(arch, int(k), IMAGE_SHAPE)
    seeds = list(range(seed, seed + count))
    seed += count
    stacks.append(ZooStack(name, spec, [f"{name}.{s}" for s in seeds],
                           train.init_stack(spec, seeds)))
  return stacks


def _warm_up(groups, pool, cfg) -> None:
  """One untimed call of every shape the extraction will call each group with (what this
  process probes: its share of each stack in a multi-process run), so compilation is not timed."""
  import numpy as np

  from know2vec_jax import distributed
  chunks = {min(cfg.pool_batch, len(pool))}
  if len(pool) % cfg.pool_batch:
    chunks.add(len(pool) % cfg.pool_batch)
  for g in groups:
    if distributed.process_count() > 1:
      share = g.model_ids[distributed.shard(g.num_models)]
      g = g.subset(share) if len(share) != g.num_models else g
    for b in chunks:
      g(pool[:b], validate=False)
    k = g.num_classes
    if cfg.search_steps:
      g(np.zeros((g.num_models, k * (k - 1)) + IMAGE_SHAPE, np.float32), validate=False)


def measure(composition: dict[str, int], devices, pool_size: int, pool_batch: int) -> dict:
  """Extracts the knowledge of the synthetic zoo with this process's ``devices`` (every process
  of a multi-process run calls it); returns the facts of the run (the same on every process)."""
  import numpy as np

  from know2vec_jax import distributed
  from know2vec_jax.blackbox import StackGroup
  from know2vec_jax.knowledge import KnowledgeConfig, expected_queries, group_knowledge
  from know2vec_jax.mesh import data_mesh

  mesh = data_mesh(devices=devices) if len(devices) > 1 else None
  t0 = time.perf_counter()
  groups = [StackGroup(s, strategy="auto", mesh=mesh) for s in _stacks(composition)]
  pool = np.random.default_rng(0).random((pool_size,) + IMAGE_SHAPE, np.float32)
  cfg = KnowledgeConfig(pool_batch=pool_batch)
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  _warm_up(groups, pool, cfg)
  warm_s = time.perf_counter() - t0
  distributed.barrier("knowledge-scaling-start")
  t0 = time.perf_counter()
  kn = group_knowledge(groups, pool, cfg)
  distributed.barrier("knowledge-scaling-end")
  seconds = time.perf_counter() - t0
  models = sum(len(k.model_ids) for k in kn)
  queries = int(sum(k.queries.sum() for k in kn))
  expected = sum(len(k.model_ids) * expected_queries(pool_size, k.k, cfg.search_steps)
                 for k in kn)
  digests = {}
  for k in kn:
    for i, m in enumerate(k.model_ids):
      h = hashlib.sha256()
      for a in (k.anchor_index[i], k.flip_t[i], k.anchor_fallback[i], k.pool_labels[i]):
        h.update(np.ascontiguousarray(a).tobytes())
      digests[m] = h.hexdigest()[:16]
  return {"processes": distributed.process_count(), "devices_per_process": len(devices),
          "devices": distributed.process_count() * len(devices),
          "platform": devices[0].platform, "models": models, "seconds": seconds,
          "models_per_s": models / seconds, "queries": queries,
          "queries_per_s": queries / seconds, "tie_break_queries": queries - expected,
          "setup_s": setup_s, "compile_s": warm_s, "digests": digests}


def worker(args) -> None:
  """One process of one configuration run in a process of its own; process 0 writes the facts."""
  from know2vec_jax import distributed
  if args.processes > 1:
    distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.process_id, timeout=120)
  import jax
  devices = jax.local_devices()[:args.devices]
  if len(devices) != args.devices:
    raise SystemExit(f"asked for {args.devices} devices per process, this process has "
                     f"{len(jax.local_devices())}")
  facts = measure(json.loads(args.composition), devices, args.pool, args.pool_batch)
  if distributed.is_writer():
    pathlib.Path(args.out).write_text(json.dumps(facts))
  if distributed.process_count() > 1:
    distributed.shutdown()


# ---- per-model costs beside the devices -------------------------------------------------------

def _table_group(models: int, k: int, pool_size: int):
  """M black boxes that answer at once, from a table of random logits (a distinct row per pool
  image, so no margins tie): what is left of knowledge extraction is its host side."""
  import numpy as np

  from know2vec_jax.blackbox import BlackBoxGroup

  class Table(BlackBoxGroup):
    def __init__(self):
      super().__init__([f"t{i}" for i in range(models)], k, IMAGE_SHAPE)
      self.table = np.random.default_rng(k).standard_normal((models, pool_size, k), np.float32)
      self.at = 0

    def _evaluate(self, images, shared):
      b = images.shape[0 if shared else 1]
      if not shared:
        return self.table[:, :b]
      out = self.table[:, self.at:self.at + b]
      self.at = (self.at + b) % pool_size
      return out
  return Table()


def host_costs(models: int = 32, pool_size: int = 9600) -> list[dict]:
  """Milliseconds per model of the work no accelerator takes off the host, at the demo pool's
  size (docs/scale.md reads them):

  - ``knowledge host side``: :func:`know2vec_jax.knowledge.extract_knowledge` on black boxes
    that answer at once (the margins, the anchor sort, the search bookkeeping, the checks of
    every answer), K = 4 and 10;
  - ``vectorize``: what an index build does per model after probing, at the demo preset's sizes
    (random weights): grid inputs, phi of the grid and the mean anchor features
    (:func:`know2vec_jax.pipeline.knowledge_grids`), and the model vectorizer, on the default
    device.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from know2vec_jax import pipeline
  from know2vec_jax.backbone import Backbone
  from know2vec_jax.knowledge import KnowledgeConfig, extract_knowledge
  from know2vec_jax.vectorizers import Know2Vec
  rng = np.random.default_rng(0)
  pool = rng.random((pool_size,) + IMAGE_SHAPE, np.float32)
  rows, kn4 = [], None
  for k in (4, 10):
    group = _table_group(models, k, pool_size)
    t0 = time.perf_counter()
    kn = extract_knowledge(group, pool, KnowledgeConfig())
    rows.append(dict(part="knowledge host side", k=k, models=models, pool=pool_size,
                     ms_per_model=(time.perf_counter() - t0) / models * 1e3))
    kn4 = kn if k == 4 else kn4
  cfg = pipeline.PRESETS.get("demo")
  backbone = Backbone(cfg.backbone, IMAGE_SHAPE, 40)
  gd, state = nnx.split(Know2Vec(cfg.vectorizer, backbone.dim, rngs=nnx.Rngs(0)))
  embed = jax.jit(lambda s, g, m: nnx.merge(gd, s).embed_models(g, m))
  # phi of the pool is computed once per proxy, not per model: random features stand in.
  pool_features = rng.standard_normal((pool_size, backbone.dim)).astype(np.float32)

  def vectorize():
    _, grids, masks = pipeline.knowledge_grids(backbone, pool_features, [kn4], cfg.max_classes)
    return np.asarray(embed(state, jnp.asarray(grids), jnp.asarray(masks)))
  vectorize()  # compiles
  t0 = time.perf_counter()
  vectorize()
  rows.append(dict(part="vectorize", k=4, models=models, pool=pool_size,
                   ms_per_model=(time.perf_counter() - t0) / models * 1e3))
  return rows


# ---- the suite's entry ---------------------------------------------------------------------------

def composition(scale: float) -> dict[str, int]:
  """``"arch-kK": models`` of the demo preset's families, ``scale`` times over (at least one
  model per stack)."""
  from know2vec_jax.zoo.specs import demo_specs
  count = collections.Counter(f"{s.arch}-k{s.k}" for s in demo_specs())
  return {name: max(1, round(scale * n)) for name, n in sorted(count.items())}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(platform: str, devices: int, process_id: int) -> dict | None:
  """The environment of one worker process, or None when this host cannot run the
  configuration."""
  env = dict(os.environ)
  if platform == "cpu":
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env
  if platform == "gpu":
    first = process_id * devices
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(devices))
    return env
  return None  # TPU: see the module docstring


def _launch(size: dict, comp: dict, processes: int, devices: int, platform: str, timeout: float,
            tmp: pathlib.Path) -> dict:
  """Runs one configuration; returns its facts, or ``{"error": ...}``."""
  out = tmp / f"p{processes}-d{devices}.json"
  port = _free_port()
  envs = [_env(platform, devices, i) for i in range(processes)]
  if any(e is None for e in envs):
    return {"error": f"{processes} processes are not launched on loopback on {platform}"}
  cmd = [sys.executable, "-m", "benchmarks.knowledge_scaling", "--processes", str(processes),
         "--devices", str(devices), "--port", str(port), "--pool", str(size["pool"]),
         "--pool-batch", str(size["pool_batch"]), "--composition", json.dumps(comp),
         "--out", str(out)]
  root = pathlib.Path(__file__).resolve().parent.parent
  procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, env in enumerate(envs)]
  logs, deadline = [], time.monotonic() + timeout
  try:
    for p in procs:
      logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.communicate()
    return {"error": f"timed out after {timeout:.0f} s"}
  bad = [(p.returncode, log) for p, log in zip(procs, logs) if p.returncode != 0]
  if bad or not out.exists():
    code, log = bad[0] if bad else (0, logs[0])
    tail = " | ".join(log.strip().splitlines()[-3:])
    return {"error": f"exit status {code}: {tail[-400:]}"}
  return json.loads(out.read_text())


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  import jax

  from benchmarks.common import accelerator, cpu_model, ratio
  platform = jax.default_backend()
  size = SIZES["quick" if quick else ("accel" if accelerator() else "cpu")]
  comp = composition(size["scale"])
  configs = CONFIGS["quick" if quick else "full"]
  # On a CPU host every configuration runs: its worker processes force the host devices they
  # ask for (the total of a multi-process row may exceed any one process's count).
  available = (jax.local_device_count() if platform != "cpu"
               else max(p * d for p, d in configs))
  timeout = 300 if quick else 900
  rows, base, base_digests = [], None, None
  with tempfile.TemporaryDirectory(prefix="knowledge-scaling-") as tmp:
    for processes, devices in configs:
      if processes * devices > available:
        rows.append(dict(processes=processes, devices_per_process=devices,
                         devices=processes * devices,
                         error=f"this host has {available} {platform} device(s)"))
        continue
      if platform != "cpu" and processes == 1:
        # Real devices need no process of their own (only a forced host device count does);
        # a TPU host's chips cannot be opened by a second process while this one holds them.
        got = measure(comp, jax.local_devices()[:devices], size["pool"], size["pool_batch"])
      else:
        got = _launch(size, comp, processes, devices, platform, timeout, pathlib.Path(tmp))
      row = dict(processes=processes, devices_per_process=devices, devices=processes * devices)
      if "error" in got:
        rows.append(row | {"error": got["error"]})
        print(f"  {processes} process(es) x {devices} device(s): {got['error']}", flush=True)
        continue
      digests = got.pop("digests")
      if (processes, devices) == (1, 1):
        base, base_digests = got["models_per_s"], digests
      same = (None if base_digests is None else
              sum(digests.get(m) == d for m, d in base_digests.items()) / len(base_digests))
      speedup = ratio(got["models_per_s"], base)
      row |= dict(models=got["models"], seconds=got["seconds"],
                  models_per_s=got["models_per_s"], queries_per_s=got["queries_per_s"],
                  speedup=speedup,
                  efficiency=None if speedup is None else speedup / (processes * devices),
                  same_as_1_device=same, compile_s=got["compile_s"],
                  tie_break_queries=got["tie_break_queries"])
      rows.append(row)
      print(f"  {processes} process(es) x {devices} device(s): {got['models_per_s']:8.1f} "
            f"models/s ({got['queries_per_s']:10.0f} queries/s, {got['seconds']:.1f} s)",
            flush=True)

  costs = host_costs(models=16 if quick else 32)
  for c in costs:
    print(f"  {c['part']} (K={c['k']}): {c['ms_per_model']:.1f} ms per model", flush=True)

  def rate(processes, devices):
    return next((r.get("models_per_s") for r in rows
                 if (r["processes"], r["devices_per_process"]) == (processes, devices)), None)
  one = next((r for r in rows if (r["processes"], r["devices_per_process"]) == (1, 1)), {})
  # Scaling at the most devices one process had (none measured on a 1-device host).
  most = max((r for r in rows if r["processes"] == 1 and r["devices"] > 1
              and r.get("models_per_s")), key=lambda r: r["devices"], default=None)
  models = sum(comp.values())
  config = (f"synthetic zoo of {models} models (the demo families x{size['scale']}), probe pool "
            f"{size['pool']} random images, T=8, A=32, strategy auto")
  cpu = platform == "cpu"
  cores = os.cpu_count()
  # Forced host devices share the host's cores: scaling targets are for real devices only.
  target = None if cpu else ">= 0.8"
  headline = {
      "knowledge_models_per_s": dict(
          value=one.get("models_per_s"), config=config + ", 1 process, 1 device",
          queries_per_s=one.get("queries_per_s"),
          queries_per_model=(one["queries_per_s"] / one["models_per_s"]
                             if one.get("models_per_s") else None),
          baseline="none (a rate: black-box queries per model = N_pool + T K (K-1))"),
      "knowledge_scaling_efficiency": dict(
          value=most["efficiency"] if most else None,
          config=config + f", 1 process, {most['devices'] if most else '-'} devices",
          devices=most["devices"] if most else None,
          speedup=most["speedup"] if most else None,
          baseline="the 1-device rate x the device count", target=target,
          why_no_target=(f"forced CPU devices share the host's {cores} cores" if cpu else None)),
      "knowledge_2proc_efficiency": dict(
          value=ratio(rate(2, 1), None if base is None else 2 * base),
          config=config + ", 2 processes x 1 device on loopback",
          vs_1_process_2_devices=ratio(rate(2, 1), rate(1, 2)),
          baseline="the 1-process 1-device rate x 2", target=target,
          why_no_target=(f"the 2 processes share the host's {cores} cores" if cpu else None)),
  }
  note = (f"models/s over all processes; speedup and efficiency against the 1-process 1-device "
          f"rate. Measured on {platform}" + (
              f" ({cpu_model()}, {cores} cores): forced host devices and the processes of a "
              "2-process run share these cores, and one device already runs its convolutions "
              "on XLA:CPU's intra-op thread pool, which spans them (measured: both cores busy "
              "alike under the map probe), so more devices or processes add no hardware and "
              "the ideal speedup is 1, efficiency 1 / devices. What the CPU rows show: the "
              "cost of sharding the model axis (stacks padded to the device count, one "
              "dispatch per device) and of the 2-process split and exchange (collectives on "
              "loopback), as throughput lost at equal hardware; and (same_as_1_device) whether "
              "the records stay those of one device. On a machine shared with other work, a "
              "2-process run also takes a larger share of the cores from that work (two thread "
              "pools), which reads as a speedup: the load average is recorded beside the "
              "result. What they cannot show: scaling on real devices; the same entry runs "
              "unchanged on a GPU or TPU host" if cpu else "") + ".")
  return {"rows": rows, "host_side": costs, "headline": headline, "zoo": comp,
          "pool": size["pool"],
          "pool_batch": size["pool_batch"], "note": note}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description="one process of the knowledge_scaling benchmark")
  p.add_argument("--processes", type=int, required=True)
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--devices", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--pool", type=int, required=True)
  p.add_argument("--pool-batch", type=int, required=True)
  p.add_argument("--composition", required=True)
  p.add_argument("--out", required=True)
  worker(p.parse_args(argv))


if __name__ == "__main__":
  main()
