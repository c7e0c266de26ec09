"""The ``know2vec`` command.

    know2vec data list                     the sources and transforms
    know2vec data show SOURCE [--task ..]  sizes and classes of a source
    know2vec zoo build [--preset demo]     train a zoo and store it (progress bar, summary table)
    know2vec zoo list  [--zoo DIR]         one line per model
    know2vec zoo show  MODEL_ID            one model's metadata
    know2vec zoo summary [--zoo DIR]       the per-source/architecture accuracy table

User mistakes (a missing dataset, an unknown id, a bad argument) print one line and exit 2; no
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_ZOO = os.environ.get("KNOW2VEC_ZOO", "artifacts/zoo-demo")


def _fmt_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
  """A plain-text table; ``cols`` are (key, format) pairs."""
  cells = [[format(r[k], f) if f else str(r[k]) for k, f in cols] for r in rows]
  widths = [max(len(k), *(len(c[i]) for c in cells)) if cells else len(k)
            for i, (k, _) in enumerate(cols)]
  line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                for i, (v, w) in enumerate(zip(vals, widths)))
  return "\n".join([line([k for k, _ in cols]), line(["-" * w for w in widths])] +
                   [line(c) for c in cells])


def summary_table(zoo) -> str:
  """The build summary: per source, domain, architecture and K: count, mean and min accuracy."""
  return _fmt_table(zoo.summary(), [("source", ""), ("domain", ""), ("arch", ""), ("k", ""),
                                    ("count", ""), ("weak", ""), ("mean_acc", ".3f"),
                                    ("min_acc", ".3f"), ("mean_acc_normal", ".3f")])


def _cmd_data(args) -> int:
  from know2vec_jax import data
  if args.action == "list":
    for name in data.list_sources():
      print(name)
    return 0
  src = data.load_source(args.source, data_dir=args.data_dir)
  info = dict(source=src.name, classes=list(src.class_names), image_shape=list(src.image_shape),
              train=len(src.train_labels), test=len(src.test_labels),
              train_per_class=[int((src.train_labels == c).sum()) for c in range(src.num_classes)])
  print(json.dumps(info, indent=1) if args.json else
        "\n".join(f"{k}: {v}" for k, v in info.items()))
  return 0


def _cmd_zoo(args) -> int:
  from know2vec_jax import zoo as zoo_lib
  if args.action == "build":
    specs = zoo_lib.preset_specs(args.preset, seed=args.seed)
    cfg = zoo_lib.BuildConfig(strategy=args.strategy, conv_impl=args.conv_impl,
                              chunk_size=args.chunk_size)
    if os.path.exists(os.path.join(args.zoo, "zoo.json")) and not args.force:
      print(f"zoo already built at {args.zoo} (use --force to rebuild)", file=sys.stderr)
      zoo = zoo_lib.load_zoo(args.zoo)
      info = zoo_lib.read_manifest(args.zoo).get("build", {})
    else:
      print(f"building the {args.preset!r} zoo: {len(specs)} models -> {args.zoo}",
            file=sys.stderr)
      zoo, info = zoo_lib.build_zoo(specs, cfg, progress=not args.quiet)
      info["preset"] = args.preset
      zoo_lib.save_zoo(zoo, args.zoo, info)
    _print_summary(zoo, info, args.json)
    return 0
  if args.action == "summary":
    zoo = zoo_lib.load_zoo(args.zoo)
    _print_summary(zoo, zoo_lib.read_manifest(args.zoo).get("build", {}), args.json)
    return 0
  manifest = zoo_lib.read_manifest(args.zoo)
  models = {m["model_id"]: m for m in manifest["models"]}
  if args.action == "list":
    rows = [m for m in models.values()
            if (not args.arch or m["arch"] == args.arch) and
            (not args.source or m["source"] == args.source)]
    if args.json:
      print(json.dumps(rows, indent=1))
    else:
      print(_fmt_table(rows, [("model_id", ""), ("arch", ""), ("k", ""), ("role", ""),
                              ("steps", ""), ("heldout_accuracy", ".3f")]))
    return 0
  if args.model_id not in models:
    raise zoo_lib.ZooError(f"unknown model id {args.model_id!r} in {args.zoo} "
                           f"({len(models)} models; `know2vec zoo list` shows them)")
  m = models[args.model_id]
  print(json.dumps(m, indent=1) if args.json else
        "\n".join(f"{k}: {v}" for k, v in m.items()))
  return 0


def _print_summary(zoo, info: dict, as_json: bool) -> None:
  if as_json:
    print(json.dumps({"build": info, "summary": zoo.summary()}, indent=1))
    return
  print(summary_table(zoo))
  four = [r for r in zoo.records.values() if r.k == 4 and r.role == "normal"]
  arch_means = {a: sum(r.heldout_accuracy for r in four if r.arch == a) /
                max(1, sum(r.arch == a for r in four)) for a in sorted({r.arch for r in four})}
  print(f"\n{len(zoo)} models in {len(zoo.stacks)} stacks; "
        f"{len({r.task for r in zoo.records.values()})} distinct tasks "
        f"({len({r.task for r in zoo.records.values() if r.k == 4})} 4-way)")
  if four:
    print("4-way models (weak ones excluded), mean held-out accuracy: " +
          ", ".join(f"{a} {v:.3f}" for a, v in arch_means.items()) +
          f"; all {sum(r.heldout_accuracy for r in four) / len(four):.3f}")
  if info.get("seconds") is not None:
    print(f"built in {info['seconds']:.0f} s ({info.get('model_steps')} model-steps, strategy "
          f"{info.get('strategy')}, conv {info.get('conv_impl')}, backend {info.get('backend')})")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="know2vec", description=(
      "Know2Vec model retrieval in JAX: vectorize a model zoo from black-box calls and retrieve "
      "the models that fit a few-shot task."))
  sub = p.add_subparsers(dest="command", required=True)

  d = sub.add_parser("data", help="image sources: list them or describe one")
  dsub = d.add_subparsers(dest="action", required=True)
  dsub.add_parser("list", help="the source names and transforms")
  ds = dsub.add_parser("show", help="sizes and classes of one source")
  ds.add_argument("source", help="e.g. fashion_mnist, mnist5k+invert, folder:/path, tfds:name")
  ds.add_argument("--data-dir", default=None, help="where the source's files are")
  ds.add_argument("--json", action="store_true", help="JSON output")

  z = sub.add_parser("zoo", help="build and inspect model zoos")
  zsub = z.add_subparsers(dest="action", required=True)
  zb = zsub.add_parser("build", help="train a zoo preset and store it")
  zb.add_argument("--preset", default="demo", choices=["tiny", "demo"], help="which zoo")
  zb.add_argument("--seed", type=int, default=0, help="seed of the preset's tasks and models")
  zb.add_argument("--strategy", default="auto", choices=["auto", "vmap", "map"],
                  help="execution over the model axis (auto: measured per backend)")
  zb.add_argument("--conv-impl", default="im2col", choices=["im2col", "xla"],
                  help="convolution lowering (im2col is fast on CPU)")
  zb.add_argument("--chunk-size", type=int, default=16, help="models per jitted training call")
  zb.add_argument("--force", action="store_true", help="rebuild even if the zoo exists")
  zb.add_argument("--quiet", action="store_true", help="no progress bar")
  for sp, hlp in ((zb, "build"), (zsub.add_parser("list", help="one line per model"), "list"),
                  (zsub.add_parser("show", help="one model's metadata"), "show"),
                  (zsub.add_parser("summary", help="accuracy table of a stored zoo"), "summary")):
    sp.add_argument("--zoo", default=DEFAULT_ZOO, help=f"zoo directory (default {DEFAULT_ZOO})")
    sp.add_argument("--json", action="store_true", help="JSON output")
    if hlp == "show":
      sp.add_argument("model_id")
    if hlp == "list":
      sp.add_argument("--arch", default=None, help="only this architecture")
      sp.add_argument("--source", default=None, help="only this source (with transforms)")
  return p


def main(argv: list[str] | None = None) -> int:
  """Entry point of the ``know2vec`` console script."""
  args = build_parser().parse_args(argv)
  from know2vec_jax.data import DataError
  from know2vec_jax.zoo import ZooError
  try:
    return {"data": _cmd_data, "zoo": _cmd_zoo}[args.command](args)
  except (DataError, ZooError) as e:
    print(f"know2vec: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("know2vec: interrupted; nothing half-written was left as complete", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
