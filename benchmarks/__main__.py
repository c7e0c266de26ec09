"""``python -m benchmarks [--quick] [--only NAME] [--devices N] [--out DIR]``: run the suite.

Results go to ``<out>/<backend>-<device-kind>.json`` (``-quick`` added for ``--quick``; merged with
earlier results of other benchmarks on the same machine kind) and a markdown table beside it, the
headline table first. The machine's peaks (``peak``) are measured in every run, first, because every
other benchmark reports its throughput as a fraction of them; each benchmark stores the peak figures
it was compared with, so merged results never mix runs. Both files are rewritten (whole) after
every benchmark, so a run that fails or is stopped keeps the benchmarks that finished.

Headline figures (``headline`` in the JSON): ratios are ours / theirs in throughput terms (> 1 means
we are faster); ``headline_detail`` names the configuration, the baseline and the target of each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import re
import sys
import time

BENCHMARKS = ("peak", "probe", "knowledge_scaling", "boundary", "retrieval", "retrieval_threads",
              "query", "align_train", "zoo_train")
HEADLINE_KEYS = ("probe_vs_torch_loop", "probe_fraction_of_peak", "retrieval_1e6_vs_faiss",
                 "retrieval_1e6_fraction_of_bandwidth", "retrieval_1e6_int8_vs_faiss",
                 "retrieval_1e6_int8_recall10", "retrieval_1e6_bf16_vs_faiss",
                 "retrieval_1e6_bf16_recall10", "retrieval_1e6_int8_vs_faiss_matched",
                 "query_p50_ms_1e4",
                 "knowledge_models_per_s", "knowledge_scaling_efficiency",
                 "knowledge_2proc_efficiency")
RESULTS = pathlib.Path(__file__).parent / "results"
# What each benchmark's entry records of the machine it ran on.
RUN_FACTS = ("cpu_model", "processor", "cpu_count", "device_kind", "jax", "date")


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if v is None:
    return "-"
  return str(v)


def _table(rows: list[dict], skip=("min_s", "max_s", "repeats")) -> list[str]:
  keys = []
  for r in rows:  # union of keys, first-seen order (rows of one table may differ slightly)
    keys += [k for k in r if k not in keys and k not in skip]
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
  return lines + [""]


def _met(value, target: str | None):
  """Whether ``value`` meets a target written as ``">= 3"`` or ``"<= 20"``; None if unknown."""
  if value is None or not target:
    return None
  m = re.fullmatch(r"\s*(>=|<=)\s*([0-9.eE+-]+)\s*", target)
  if not m:
    return None
  bound = float(m.group(2))
  return bool(value >= bound) if m.group(1) == ">=" else bool(value <= bound)


def headline(results: dict) -> tuple[dict, dict]:
  """The headline figures and their details, gathered from the benchmarks' own entries."""
  values = {k: None for k in HEADLINE_KEYS}
  detail = {}
  for name, res in results.get("benchmarks", {}).items():
    for key, d in res.get("headline", {}).items():
      values[key] = d.get("value")
      detail[key] = dict(d, benchmark=name, quick=res.get("quick", False),
                         met=_met(d.get("value"), d.get("target")))
  return values, detail


def _markdown(results: dict) -> str:
  m = results["machine"]
  lines = [f"# Benchmarks on {m['device_kind']} ({m['backend']}, {m['num_devices']} device(s))",
           "", f"Last run: {m.get('cpu_model', m['processor'])}, {m.get('cpu_count', '?')} cores; "
           f"{m['platform']}; jax {m['jax']}, flax {m['flax']}, torch {m.get('torch')}, "
           f"faiss {m.get('faiss')}; {m['date']}", "",
           "Ratios are ours / baseline in throughput terms (> 1: ours is faster), both measured "
           "in the same process.", "", "## Headline", "",
           "| figure | value | target | met | configuration | baseline | details |",
           "|---|---|---|---|---|---|---|"]
  plain = ("value", "target", "met", "config", "baseline", "benchmark", "quick")
  for key, value in results.get("headline", {}).items():
    d = results.get("headline_detail", {}).get(key, {})
    met = {True: "yes", False: "no", None: "-"}[d.get("met")]
    extra = ", ".join(f"{k} {_fmt(v)}" for k, v in d.items() if k not in plain)
    lines.append(f"| {key} | {_fmt(value)} | {d.get('target', '-')} | {met} | "
                 f"{d.get('config', 'not measured')} | {d.get('baseline', '-')} | {extra or '-'} |")
  lines.append("")
  for name, res in results["benchmarks"].items():
    lines += [f"## {name}" + (" (--quick)" if res.get("quick") else ""), ""]
    if res.get("note"):
      lines += [res["note"], ""]
    tables = [k for k, v in res.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    for table in sorted(tables, key=lambda k: (k != "summary", k == "rows", k)):
      lines += [f"{table.capitalize()}:", ""] + _table(res[table])
    for k, v in res.get("ratios", {}).items():
      lines.append(f"- {k}: {_fmt(v)}")
    for k in ("peaks", "checks"):
      for kk, v in res.get(k, {}).items():
        lines.append(f"- {kk}: {_fmt(v)}")
    load = res.get("load_average_after")
    ran = res.get("machine")
    if ran:
      lines.append(f"- ran on: {ran.get('cpu_model') or ran.get('processor')}, "
                   f"{ran.get('cpu_count', '?')} cores, {ran.get('date')}")
    lines += [f"- seconds: {res.get('seconds', 0):.1f}"
              + (f"; load average after (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in load)}"
                 if load else ""), ""]
  return "\n".join(lines)


def _write(path: pathlib.Path, results: dict, seconds: float) -> None:
  """Writes the results gathered so far (``path`` and its Markdown twin), after every benchmark:
  a run that fails or is stopped part-way keeps what finished. Each file is replaced whole."""
  from know2vec_jax import storage  # here, not at the top: only after _set_devices
  # Keep the suite's order in the file whatever order earlier runs wrote it in.
  results["benchmarks"] = {n: results["benchmarks"][n] for n in BENCHMARKS
                           if n in results["benchmarks"]}
  results["headline"], results["headline_detail"] = headline(results)
  results["seconds_this_run"] = seconds
  storage.write_json_atomic(path, results)
  storage.write_text_atomic(path.with_suffix(".md"), _markdown(results))


def _set_devices(n: int | None) -> None:
  """Forces ``n`` host (CPU) devices; only possible before JAX has created its backends."""
  import jax
  from jax._src import xla_bridge
  if n is None:
    return
  if xla_bridge.backends_are_initialized():
    if jax.device_count() != n:
      raise SystemExit(f"--devices {n}: JAX is already initialised with {jax.device_count()} "
                       "devices in this process; run the suite in a fresh process")
    return
  jax.config.update("jax_num_cpu_devices", n)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="small sizes, the same headline figures (a smoke run: about 5 minutes on 2 "
                      "CPU cores)")
  p.add_argument("--only", action="append", choices=BENCHMARKS,
                 help="run only these (repeatable); the peak benchmark always runs")
  p.add_argument("--devices", type=int, default=None,
                 help="force this many host (CPU) devices (default: the platform's own)")
  p.add_argument("--out", default=str(RESULTS), help="results directory")
  args = p.parse_args(argv)
  if args.devices is not None and args.devices < 1:
    p.error(f"--devices must be >= 1, got {args.devices}")
  _set_devices(args.devices)
  from benchmarks.common import machine
  info = machine()
  kind = re.sub(r"[^a-z0-9]+", "-", info["device_kind"].lower()).strip("-")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{info['backend']}-{kind}{'-quick' if args.quick else ''}.json"
  results = {"benchmarks": {}}
  if path.exists():
    try:
      results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      print(f"warning: ignoring unreadable earlier results {path}: {e}", file=sys.stderr)
  results["machine"] = info
  names = ["peak"] + [n for n in (args.only or BENCHMARKS) if n != "peak"]
  ctx: dict = {"devices_flag": args.devices}
  t_all = time.perf_counter()
  for name in names:
    print(f"[{name}]", flush=True)
    t0 = time.perf_counter()
    mod = importlib.import_module(f"benchmarks.{name}")
    res = mod.run(quick=args.quick, ctx=ctx)
    if name != "peak":
      res["peak_used"] = ctx["peak"]
    # The load average beside each result: the machine may be shared, and load from elsewhere
    # slows ours and the baselines alike only when they are timed interleaved.
    # Each entry names the machine and date it ran on: a merged file may hold entries of
    # several runs (and, on machines of one kind, several CPU models).
    results["benchmarks"][name] = res | {"quick": args.quick,
                                         "seconds": time.perf_counter() - t0,
                                         "load_average_after": list(os.getloadavg()),
                                         "machine": {k: info.get(k) for k in RUN_FACTS}}
    _write(path, results, time.perf_counter() - t_all)
  print("headline:", json.dumps(results["headline"]))
  print(f"wrote {path} and {path.with_suffix('.md')} ({results['seconds_this_run']:.0f} s)")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  raise SystemExit(main())
