"""Retrieval latency against zoo size: the figure behind "a query never runs the zoo".

Command:   python -m experiments.latency            (measures, then draws)
           python -m experiments.latency --from-results benchmarks/results/cpu-cpu.json
Hardware:  2-core x86-64 CPU, 24 GiB, no GPU (measured there).
Runtime:   about 4 min on an idle machine (the machine-peak and retrieval benchmarks at full size).
Expected:  top-10 of one query (ModelIndex, f32): 0.1 ms at 10^3 models, 0.25 ms at 10^4, 3-4 ms at
           10^5, 27-35 ms at 10^6 (a memory-bound scan of 1 GB; numpy 25-36 ms, faiss 30-37 ms,
           all moving with machine load); 256 queries at once: 0.8-1.3 s at 10^6 against 5-9 s
           for numpy and faiss. The committed run's numbers are in
           experiments/results/latency.json.

It runs the ``retrieval`` benchmark of ``benchmarks/`` (machine peak first, for the bandwidth
bound) and plots p50 latency of one query (and of 256 at once) against M for every method, with
the memory-bandwidth bound of a float32 scan.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from experiments.common import pyplot

OUT = pathlib.Path("experiments/results/latency.json")
FIGURE = pathlib.Path("experiments/results/latency_vs_zoo_size.png")


def measure() -> dict:
  from benchmarks import peak, retrieval
  from benchmarks.common import machine
  ctx: dict = {}
  peak.run(ctx=ctx)  # fills ctx["peak"]: the bandwidth bound of the figure
  return {"machine": machine(), "retrieval": retrieval.run(ctx=ctx), "peak": ctx["peak"]}


def plot(res: dict, path: pathlib.Path) -> None:
  plt = pyplot()
  if plt is None:
    return
  rows = res["retrieval"]["rows"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, q in zip(axes, (1, 256)):
    for method in sorted({r["method"] for r in rows}):
      pts = sorted((r["models"], r["p50_ms"]) for r in rows
                   if r["method"] == method and r["queries"] == q)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=method)
    bw = (res.get("peak") or {}).get("memory_gbytes_per_s")
    if bw:
      ms = np.asarray(sorted({r["models"] for r in rows}), float)
      ax.plot(ms, ms * 256 * 4 / (bw * 1e9) * 1e3, "k--", lw=0.8,
              label=f"f32 scan at {bw:.0f} GB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("models in the index (E = 256)")
    ax.set_ylabel("top-10 latency, p50 (ms)")
    ax.set_title(f"{q} quer{'y' if q == 1 else 'ies'} at once")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7)
  m = res.get("machine", {})
  fig.suptitle(f"Retrieval latency vs zoo size: {m.get('cpu_model', m.get('device_kind', ''))}, "
               f"{m.get('cpu_count', '?')} cores", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--from-results", default=None,
                 help="draw from a benchmarks results JSON instead of measuring")
  args = p.parse_args(argv)
  if args.from_results:
    full = json.loads(pathlib.Path(args.from_results).read_text())
    res = {"machine": full["machine"], "retrieval": full["benchmarks"]["retrieval"],
           "peak": full["benchmarks"]["retrieval"].get("peak_used", {})}
  else:
    res = measure()
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(json.dumps(res, indent=1))
  plot(res, FIGURE)
  q1 = {(r["method"], r["models"]): r["p50_ms"] for r in res["retrieval"]["rows"]
        if r["queries"] == 1}
  for (method, m), v in sorted(q1.items()):
    print(f"{method:12s} M={m:>8d}  p50 {v:8.3f} ms")
  print(f"wrote {OUT} and {FIGURE}")


if __name__ == "__main__":
  main()
