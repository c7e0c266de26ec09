"""Zoo training throughput: model-steps/s of a stack, ``vmap`` vs ``lax.map`` over the model axis,
and the two convolution lowerings (``im2col`` matmuls vs ``lax.conv``), per architecture family.

This is the measurement behind ``know2vec_jax.strategy.resolve("auto")`` and the default ``conv_impl``. Training
FLOP/s (3x the forward FLOPs: forward plus two backward products) is also given as a fraction of the
best float32 rate measured in the same run (``benchmarks/peak.py``; a true bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import fraction, ratio, time_call
from know2vec_jax.data import load_source
from know2vec_jax.zoo import architectures, train

NAME = "zoo_train"
# (models, training steps) of every stack in --quick runs.
QUICK_SIZE = (4, 10)


def run(quick: bool = False, ctx: dict | None = None) -> dict:
  f32_peak = (ctx or {}).get("peak", {}).get("f32_gflops_per_s")
  src = load_source("mnist5k")
  pool = jax.device_put(src.train_images)
  n = 3000
  batch = 64
  rows = []
  # --quick leaves out the big family: its compilations alone would take most of the budget.
  archs = [a for a in architectures.ARCHITECTURES if not (quick and a == "cnn_l")]
  for arch in archs:
    impls = ("im2col",) if arch == "mlp" else ("im2col", "xla")
    for impl in impls:
      for strategy in ("vmap", "map"):
        # lax.conv's slow backward pass makes the xla lowering 10-15x slower: fewer model-steps
        # keep the suite short while the rate stays a per-model-step figure.
        models, steps = QUICK_SIZE if quick else ((4, 10) if impl == "xla" else (16, 40))
        if not quick and arch == "cnn_l":  # the big family: fewer model-steps, same rate
          models, steps = (2, 5) if impl == "xla" else (8, 20)
        spec = train.StackSpec(arch, 4, conv_impl=impl)
        gd = spec.graphdef()
        seeds = list(range(models))
        keys = train.model_keys(seeds)
        idx = jnp.tile(jnp.arange(n, dtype=jnp.int32), (models, 1))
        lab = jnp.asarray(np.tile(src.train_labels[:n] % 4, (models, 1)))
        counts = jnp.full((models,), n, jnp.int32)
        lr = jnp.full((models,), 3e-3, jnp.float32)
        budget = jnp.full((models,), steps, jnp.int32)

        p0 = train.init_stack(spec, seeds)
        o0 = train.init_opt_state(p0)

        def fn():
          # Fresh copies: train_stack donates its parameter and optimizer buffers.
          p, o = jax.tree.map(jnp.copy, (p0, o0))
          return train.train_stack(gd, p, o, keys, budget, lr, pool, idx, counts, lab,
                                   batch_size=batch, strategy=strategy)[2]
        t = time_call(fn, repeats=2 if quick else 3)
        rate = models * steps / t["median_s"]
        flops = 3 * architectures.flops_per_image(arch, 4) * batch * rate
        rows.append(dict(arch=arch, conv_impl=impl, strategy=strategy, models=models,
                         steps=steps, batch=batch, model_steps_per_s=rate,
                         train_gflops_per_s=flops / 1e9,
                         frac_peak=fraction(flops / 1e9, f32_peak,
                                            flops / 1e9 * t["median_s"] / t["min_s"]), **t))
        print(f"  {arch:6s} {impl:7s} {strategy:5s} {rate:9.1f} model-steps/s "
              f"({flops / 1e9:6.1f} GFLOP/s)", flush=True)
  ratios = {}
  for arch in archs:
    get = {(r["conv_impl"], r["strategy"]): r["model_steps_per_s"] for r in rows
           if r["arch"] == arch}
    ratios[f"{arch}_map_vs_vmap"] = get[("im2col", "map")] / get[("im2col", "vmap")]
    if ("xla", "map") in get:
      ratios[f"{arch}_im2col_vs_xla_conv_map"] = get[("im2col", "map")] / get[("xla", "map")]
      ratios[f"{arch}_im2col_vs_xla_conv_vmap"] = get[("im2col", "vmap")] / get[("xla", "vmap")]
  return {"rows": rows, "ratios": ratios,
          "note": "ratios are throughput ratios (> 1: the first named is faster), same process"}
