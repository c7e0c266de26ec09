"""``python -m benchmarks [--quick] [--only NAME]``: run the suite, write results and a table.

Results go to ``benchmarks/results/<backend>-<device-kind>.json`` (merged with earlier results of
other benchmarks on the same machine kind) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import re

from benchmarks.common import machine

BENCHMARKS = ("zoo_train",)
RESULTS = pathlib.Path(__file__).parent / "results"


def _markdown(results: dict) -> str:
  m = results["machine"]
  lines = [f"# Benchmarks on {m['device_kind']} ({m['backend']}, {m['num_devices']} device(s))",
           "", f"{m.get('cpu_model', m['processor'])}, {m.get('cpu_count', '?')} cores; "
           f"{m['platform']}; jax {m['jax']}, flax {m['flax']}; {m['date']}", ""]
  for name, res in results["benchmarks"].items():
    lines += [f"## {name}", ""]
    rows = res.get("rows", [])
    if rows:
      keys = [k for k in rows[0] if k not in ("min_s", "max_s", "repeats")]
      lines.append("| " + " | ".join(keys) + " |")
      lines.append("|" + "---|" * len(keys))
      for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")
      lines.append("")
    for k, v in res.get("ratios", {}).items():
      lines.append(f"- {k}: {v:.2f}")
    lines.append("")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
  p.add_argument("--only", action="append", choices=BENCHMARKS, help="run only these")
  p.add_argument("--out", default=str(RESULTS), help="results directory")
  args = p.parse_args(argv)
  info = machine()
  kind = re.sub(r"[^a-z0-9]+", "-", info["device_kind"].lower()).strip("-")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{info['backend']}-{kind}{'-quick' if args.quick else ''}.json"
  results = json.loads(path.read_text()) if path.exists() else {"benchmarks": {}}
  results["machine"] = info
  for name in args.only or BENCHMARKS:
    print(f"[{name}]", flush=True)
    mod = importlib.import_module(f"benchmarks.{name}")
    results["benchmarks"][name] = mod.run(quick=args.quick) | {"quick": args.quick}
  path.write_text(json.dumps(results, indent=1))
  path.with_suffix(".md").write_text(_markdown(results))
  print(f"wrote {path} and {path.with_suffix('.md')}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
