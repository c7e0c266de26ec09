"""Boundary search end to end: (class pair x model) per second of :func:`extract_knowledge`.

One call covers everything knowledge extraction does for a group of M black boxes with K classes:
the anchor pass over the probe pool, T label-only binary-search steps (each one batched call for
all K(K-1) pairs of all models) and the final grid call. The same work is timed three ways, in the
same process:

- ``stack-auto``: a :class:`StackGroup` with the backend's ``auto`` probe strategy (ours);
- ``stack-loop``: the same group probing one model per jitted call;
- ``torch-callables-<n>t`` (when PyTorch is installed): every model as its own
  :class:`CallableBlackBox` wrapping an equivalent ``torch.nn`` module, extracted one after the
  other, what a per-model black-box implementation does; at the PyTorch thread count the probe
  benchmark found faster in this run (both, default and one, when it did not run).

The stack is trained for a few dozen Adam steps first so that its models predict several classes
on the pool (a fresh network often predicts one class everywhere); the amount of work per call is
fixed by the algorithm (``expected_queries``), not by the weights.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import torch_models
from benchmarks.common import accelerator, fraction, optional, ratio, time_call
from know2vec_jax.blackbox import CallableBlackBox, StackGroup
from know2vec_jax.data import load_source
from know2vec_jax.knowledge import KnowledgeConfig, expected_queries, extract_knowledge, find_anchors
from know2vec_jax.mesh import data_mesh
from know2vec_jax.zoo import architectures, train
from know2vec_jax.zoo.zoo import ZooStack

NAME = "boundary"
ARCH = "cnn_s"
K = 4
# models M, probe-pool size N, search steps T, anchors per class A
SIZES = {"quick": (4, 256, 4, 8), "cpu": (16, 2048, 8, 32), "accel": (128, 8192, 8, 32)}


def _quick_trained_stack(m: int, pool: np.ndarray, labels: np.ndarray) -> ZooStack:
  spec = train.StackSpec(ARCH, K)
  seeds = list(range(m))
  params = train.init_stack(spec, seeds)
  n = len(pool)
  idx = jnp.tile(jnp.arange(n, dtype=jnp.int32), (m, 1))
  # Each model learns its own random relabelling of the source classes onto K outputs.
  rng = np.random.default_rng(0)
  lab = jnp.asarray(np.stack([rng.permutation(10)[labels] % K for _ in seeds]).astype(np.int32))
  params, _, _ = train.train_stack(
      spec.graphdef(), params, train.init_opt_state(params), train.model_keys(seeds),
      jnp.full((m,), 40, jnp.int32), jnp.full((m,), 3e-3, jnp.float32), jax.device_put(pool), idx,
      jnp.full((m,), n, jnp.int32), lab, batch_size=64, strategy="auto")
  return ZooStack(f"{ARCH}-k{K}", spec, [f"{ARCH}.{i}" for i in seeds], params)


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  size = "quick" if quick else ("accel" if accelerator() else "cpu")
  m, n_pool, steps, anchors = SIZES[size]
  peak = (ctx or {}).get("peak", {})
  src = load_source("mnist5k")
  # Pools larger than the source's train split (accelerator sizes) repeat it: the cost per image
  # is what is measured.
  take = np.arange(n_pool) % len(src.train_labels)
  pool = src.train_images[take]
  stack = _quick_trained_stack(m, pool, src.train_labels[take])
  cfg = KnowledgeConfig(search_steps=steps, anchors_per_class=anchors, pool_batch=2048)
  pairs = m * K * (K - 1)
  queries = m * expected_queries(n_pool, K, steps)
  flops = architectures.flops_per_image(ARCH, K)
  mesh = data_mesh() if jax.device_count() > 1 else None

  groups = {"stack-auto": StackGroup(stack, strategy="auto", mesh=mesh),
            "stack-loop": StackGroup(stack, strategy="loop", mesh=mesh)}
  fns = {name: (lambda g=g: [extract_knowledge(g, pool, cfg)]) for name, g in groups.items()}
  torch = optional("torch")
  if torch is not None:
    models = torch_models.torch_models(torch, ARCH, stack.params)

    def callable_for(model, threads):
      def fn(images):
        with torch_models.num_threads(torch, threads), torch.inference_mode():
          return model(torch_models.nchw(torch, images)).cpu().numpy()
      return fn
    # The thread count the probe benchmark found faster in this run, else both.
    counts = ([ctx["torch_threads"]] if ctx and "torch_threads" in ctx
              else torch_models.thread_counts(torch))
    for threads in counts:
      boxes = [CallableBlackBox(callable_for(mod, threads), K, (28, 28, 1), model_id=i,
                                batch_size=2048) for mod, i in zip(models, stack.model_ids)]
      fns[f"torch-callables-{threads}t"] = (
          lambda boxes=boxes: [extract_knowledge(b, pool, cfg) for b in boxes])

  # One untimed call each (compilation), then interleaved timed rounds.
  results = {name: fn() for name, fn in fns.items()}
  ref = results["stack-auto"][0]
  checks = {"queries_per_model_as_expected":
            bool(np.all(ref.queries == expected_queries(n_pool, K, steps))),
            "fallback_anchor_fraction": float(ref.anchor_fallback.mean())}
  for name, other in results.items():
    if name != "stack-auto":
      t_other = np.concatenate([kn.flip_t for kn in other])
      checks[f"{name}_same_boundaries_fraction"] = float(np.mean(
          np.abs(t_other - ref.flip_t) < 1e-6))
  times = {name: [] for name in fns}
  rounds = 2 if quick else 3
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  # The anchor pass alone (ours), to split the end-to-end time into its two phases.
  g = groups["stack-auto"]
  anchor_s = time_call(lambda: find_anchors(g, pool, cfg.pool_batch, cfg.anchors_per_class),
                       repeats=rounds, warmup=0)["median_s"]

  rows = []
  for name, ts in times.items():
    med = float(np.median(ts))
    gflops = queries * flops / med / 1e9
    rows.append(dict(method=name, models=m, k=K, pool=n_pool, search_steps=steps,
                     pairs_models_per_s=pairs / med, queries_per_s=queries / med,
                     gflops_per_s=gflops,
                     frac_peak=fraction(gflops, peak.get("f32_gflops_per_s"),
                                        queries * flops / min(ts) / 1e9),
                     median_s=med, min_s=min(ts), max_s=max(ts), repeats=len(ts)))
    print(f"  {name:20s} {pairs / med:10.0f} pairs x models/s  ({med:.3f} s)", flush=True)
  rate = {r["method"]: r["pairs_models_per_s"] for r in rows}
  torch_best = max((v for k_, v in rate.items() if k_.startswith("torch")), default=None)
  auto_med = next(r["median_s"] for r in rows if r["method"] == "stack-auto")
  ratios = {"auto_vs_loop": ratio(rate["stack-auto"], rate["stack-loop"]),
            "auto_vs_torch_callables": ratio(rate["stack-auto"], torch_best),
            "anchor_pass_share_of_time": anchor_s / auto_med}
  headline = {"boundary_pairs_models_per_s": dict(
      value=rate["stack-auto"],
      config=f"{ARCH} stack, M={m}, K={K}, pool {n_pool}, T={steps}, StackGroup auto",
      baseline="per-model torch CallableBlackBox (faster thread setting): "
               f"{_fmt_rate(torch_best)} pairs x models/s; stack loop: "
               f"{_fmt_rate(rate['stack-loop'])}")}
  return {"rows": rows, "ratios": ratios, "checks": checks, "headline": headline,
          "num_devices": jax.device_count(),
          "note": "pairs x models per second of extract_knowledge end to end (anchor pass, "
                  "boundary search); queries_per_s counts black-box inputs; the "
                  "stack is trained for 40 steps first (work per call does not depend on it)"}


def _fmt_rate(v) -> str:
  return "-" if v is None else f"{v:.0f}"
