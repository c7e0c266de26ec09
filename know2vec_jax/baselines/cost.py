"""Query-time cost of every registry baseline: zoo forward passes and wall time of the scoring.

    python -m know2vec_jax.baselines.cost --models 114 --images 200 --classes 4

times each baseline on synthetic zoo outputs of the given shapes (logits with a label signal,
ReLU features) and prints one row per method: forward passes, the first call (compilation
included) and the best wall and CPU time of ``--repeats`` further calls. The zoo's own forward
passes are not timed: they are the same for every method that needs them and are counted instead.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import numpy as np

from know2vec_jax.baselines.registry import BASELINES, run_baseline


def measure_costs(num_models: int, num_images: int, num_classes: int, num_logits: int = 10,
                  num_features: int = 128, num_targets: int = 20, repeats: int = 3,
                  seed: int = 0, methods=None) -> list[dict]:
  """Times every baseline of :data:`BASELINES` on synthetic inputs.

  Args:
    num_models: M. num_images: N target images. num_classes: K target classes.
    num_logits: Z source classes. num_features: F penultimate units.
    num_targets: T other targets the prior averages over.
    repeats: timed calls after the first.
    seed: of the synthetic inputs.
    methods: names of :data:`BASELINES` to time (default all).

  Returns:
    One dict per method: method, input, white_box, forward_passes, first_s (wall, compilation
    included), steady_s (best wall time of the repeats), steady_cpu_s (best CPU time, all threads).
  """
  rng = np.random.default_rng(seed)
  labels = np.arange(num_images) % num_classes
  signal = np.eye(max(num_logits, num_features))[labels % min(num_logits, num_features)]
  logits = (rng.normal(size=(num_models, num_images, num_logits))
            + 2 * signal[None, :, :num_logits]).astype(np.float32)
  features = np.maximum(rng.normal(size=(num_models, num_images, num_features))
                        + signal[None, :, :num_features], 0).astype(np.float32)
  k_max = max(num_classes, 10)
  mask = lambda k: (np.arange(k_max) < k).astype(np.float32)  # noqa: E731
  unit = lambda v: (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
  kw = dict(logits=logits, features=features, labels=labels, num_target_classes=num_classes,
            ground_truth_other_targets=rng.random((num_targets, num_models)),
            num_models=num_models,
            query_grid=rng.normal(size=(k_max, k_max, num_features)).astype(np.float32),
            query_mask=mask(num_classes),
            model_grids=rng.normal(size=(num_models, k_max, k_max, num_features)
                                   ).astype(np.float32),
            model_masks=np.tile(mask(min(4, k_max)), (num_models, 1)),
            query_prototype=unit(rng.normal(size=num_features)),
            target_prototypes=unit(rng.normal(size=(num_targets, num_features))))
  unknown = sorted(set(methods or ()) - set(BASELINES))
  if unknown:
    raise ValueError(f"unknown baseline(s) {unknown}; known: {sorted(BASELINES)}")
  rows = []
  for name, b in BASELINES.items():
    if methods and name not in methods:
      continue
    first = run_baseline(name, **kw)
    runs = [run_baseline(name, **kw) for _ in range(max(repeats, 1))]
    rows.append(dict(method=name, input=b.input, white_box=b.white_box,
                     forward_passes=first.forward_passes, first_s=first.seconds,
                     steady_s=min(r.seconds for r in runs),
                     steady_cpu_s=min(r.cpu_seconds for r in runs)))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", type=int, default=114)
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--classes", type=int, default=4)
  p.add_argument("--logits", type=int, default=10)
  p.add_argument("--features", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--methods", nargs="*", help="names of the baselines to time (default all)")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  a = p.parse_args(argv)
  rows = measure_costs(a.models, a.images, a.classes, a.logits, a.features, repeats=a.repeats,
                       methods=a.methods)
  if a.json:
    print(json.dumps(rows, indent=1))
    return
  print(f"M={a.models} N={a.images} K={a.classes} Z={a.logits} F={a.features}; "
        f"{jax.devices()[0].platform}, {platform.machine()}")
  print(f"{'method':40s} {'forwards':>9s} {'first (s)':>10s} {'steady (ms)':>12s} "
        f"{'steady CPU (ms)':>16s}")
  for r in rows:
    print(f"{r['method']:40s} {r['forward_passes']:9d} {r['first_s']:10.2f} "
          f"{r['steady_s'] * 1e3:12.1f} {r['steady_cpu_s'] * 1e3:16.1f}")


if __name__ == "__main__":
  main()
