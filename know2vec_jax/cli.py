"""The ``know2vec`` command.

    know2vec data list                     the sources and transforms
    know2vec data show SOURCE [--task ..]  sizes and classes of a source
    know2vec data grid SOURCE --out F.png  a PNG grid of a task's images
    know2vec zoo build [--preset demo]     train a zoo and store it (progress bar, summary table)
    know2vec zoo list  [--zoo DIR]         one line per model
    know2vec zoo show  MODEL_ID            one model's metadata
    know2vec zoo summary [--zoo DIR]       the per-source/architecture accuracy table
    know2vec train --zoo Z --out PROXY     train a Know2Vec proxy on a zoo (black-box access only)
    know2vec index build|add|remove|info|convert   the retrieval index of a zoo
    know2vec query --proxy P --index I ..  rank the index's models for a few-shot task
    know2vec eval nnr|sfmte|generalise|openworld|latency  run an experiment (the ``experiments`` package)
    know2vec bench [args]                  run the benchmark suite (the ``benchmarks`` package)

Every command takes ``--help``; commands whose output is data take ``--json``; long steps show
progress bars unless ``--quiet``. User mistakes (a missing dataset or artifact, an unknown id, a bad
argument or override) print one line ``know2vec: error: ...`` and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys

from know2vec_jax.strategy import STRATEGIES, TRACED

DEFAULT_ZOO = os.environ.get("KNOW2VEC_ZOO", "artifacts/zoo-demo")
# Metadata keys shown as extra columns of the query table by default, after rank, model id,
# architecture, task and score (``--columns`` adds more). A metadata field that index builders
# start writing (e.g. a predicted fine-tune accuracy) becomes a column by being named here.
DEFAULT_QUERY_COLUMNS: tuple[str, ...] = ("agreement", "token", "vector")
ERROR_CHARS = 600  # the longest error line printed (a longer message keeps its two ends)
# `know2vec eval NAME` runs experiments.NAME.main: the experiments and benchmarks are packages of
# the distribution (pyproject.toml), importable wherever know2vec-jax is installed.
EXPERIMENTS = ("nnr", "sfmte", "generalise", "openworld", "latency")
# `know2vec index build|convert --storage`: index.STORAGES and index.RESCORE, named here so that
# building the parser imports no JAX.
INDEX_STORAGES = ("float32", "bfloat16", "int8")
INDEX_RESCORE = 4


class CommandError(ValueError):
  """A command that cannot run as asked (an artifact in the way, an unwritable path, ...)."""


class _Parser(argparse.ArgumentParser):
  """argparse with the command's one-line error format (usage mistakes exit 2 too)."""

  def error(self, message):
    self.exit(2, f"know2vec: error: {message} (see `{self.prog} --help`)\n")


def _fmt_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
  """A plain-text table; ``cols`` are (key, format) pairs."""
  def cell(r, k, f):
    v = r.get(k)
    if v is None:
      return "-"
    try:
      return format(v, f) if f else str(v)
    except (TypeError, ValueError):
      return str(v)
  cells = [[cell(r, k, f) for k, f in cols] for r in rows]
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


def _split_list(text: str | None) -> list[str] | None:
  """``"a,b, c"`` -> ``["a", "b", "c"]``; None stays None."""
  if text is None:
    return None
  return [s.strip() for s in text.split(",") if s.strip()]


def _check_new_artifact(path: str, force: bool, manifest: str, what: str) -> pathlib.Path:
  """Refuses to replace an existing artifact without --force and checks the path is writable
  *before* minutes of work are spent making it."""
  out = pathlib.Path(path).expanduser().absolute()
  if (out / manifest).exists() and not force:
    raise CommandError(f"a {what} already exists at {out} (use --force to replace it)")
  if out.exists() and not out.is_dir():
    raise CommandError(f"{out} exists and is not a directory")
  parent = out.parent
  while not parent.exists():
    parent = parent.parent
  if not os.access(parent, os.W_OK):
    raise CommandError(f"cannot write {what} to {out}: {parent} is not writable")
  return out


def _print(obj, as_json: bool, text: str) -> None:
  print(json.dumps(obj, indent=1, default=float) if as_json else text)


# ---- data ----------------------------------------------------------------------------------------

def _cmd_data(args) -> int:
  from know2vec_jax import data
  if args.action == "list":
    names = data.list_sources()
    _print(names, args.json, "\n".join(names))
    return 0
  src = data.load_source(args.source, data_dir=args.data_dir)
  if args.action == "grid":
    info = write_grid(src, _split_list(args.classes), args.out, per_class=args.per_class,
                      split=args.split, seed=args.seed, scale=args.scale)
    _print(info, args.json, f"wrote {info['path']} ({len(info['classes'])} classes x "
                            f"{info['per_class']} images, {info['size'][0]}x{info['size'][1]} px)")
    return 0
  info = dict(source=src.name, classes=list(src.class_names), image_shape=list(src.image_shape),
              train=len(src.train_labels), test=len(src.test_labels),
              train_per_class=[int((src.train_labels == c).sum()) for c in range(src.num_classes)])
  print(json.dumps(info, indent=1) if args.json else
        "\n".join(f"{k}: {v}" for k, v in info.items()))
  return 0


def write_grid(src, classes, out, per_class: int = 8, split: str = "train", seed: int = 0,
               scale: int = 3) -> dict:
  """Writes a PNG with one row per class (its name, then ``per_class`` of its images).

  Args:
    src: a :class:`know2vec_jax.data.SourceData`.
    classes: class names or ids (None: every class).
    out: the PNG path.
    per_class, split, seed: which images (drawn without replacement, deterministic from seed).
    scale: pixel magnification.

  Returns:
    {path, source, classes, per_class, size [width, height]}.
  """
  import numpy as np
  from PIL import Image, ImageDraw

  from know2vec_jax.data import DataError
  if per_class < 1 or scale < 1:
    raise DataError(f"--per-class and --scale must be >= 1, got {per_class} and {scale}")
  ids = [src.class_index(c) for c in classes] if classes else list(range(src.num_classes))
  images, labels = src.split(split)
  rng = np.random.default_rng(seed)
  h, w, ch = src.image_shape
  cell_h, cell_w, pad = h * scale, w * scale, 2
  names = [src.class_names[c] for c in ids]
  label_w = 8 + 7 * max(len(n) for n in names)
  canvas = Image.new("RGB", (label_w + per_class * (cell_w + pad), len(ids) * (cell_h + pad)),
                     "white")
  draw = ImageDraw.Draw(canvas)
  for row, (c, name) in enumerate(zip(ids, names)):
    idx = np.flatnonzero(labels == c)
    if not len(idx):
      raise DataError(f"class {name!r} of {src.name!r} has no images in the {split} split")
    pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
    y0 = row * (cell_h + pad)
    draw.text((4, y0 + cell_h // 2 - 5), name, fill="black")
    for col, i in enumerate(pick):
      pix = (np.clip(images[i], 0, 1) * 255).round().astype(np.uint8)
      tile = Image.fromarray(pix[..., 0] if ch == 1 else pix).convert("RGB")
      tile = tile.resize((cell_w, cell_h), Image.NEAREST)
      canvas.paste(tile, (label_w + col * (cell_w + pad), y0))
  path = pathlib.Path(out).expanduser().absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path, format="PNG")
  return {"path": str(path), "source": src.name, "classes": names, "per_class": per_class,
          "size": list(canvas.size)}


# ---- zoo -----------------------------------------------------------------------------------------

def _cmd_zoo(args) -> int:
  from know2vec_jax import zoo as zoo_lib
  if args.action == "build":
    _launch(args)
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
      from know2vec_jax.zoo.build import build_zoo_to  # one process or several
      zoo, info = build_zoo_to(args.zoo, specs, cfg, progress=not args.quiet,
                               build_info={"preset": args.preset})
    if zoo is not None:  # across processes, process 0 reports
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


# ---- train ---------------------------------------------------------------------------------------

def _cmd_train(args) -> int:
  from know2vec_jax import config as config_lib
  from know2vec_jax import proxy as proxy_lib
  from know2vec_jax.pipeline import Cache
  from know2vec_jax.retrieval import THRESHOLDS
  from know2vec_jax.zoo import load_zoo
  distributed = _launch(args)
  overrides = list(args.set) + ([f"objective={args.objective}"] if args.objective else [])
  for item in overrides:  # a fitted value is not a setting: refuse it rather than overwrite it
    key = item.partition("=")[0].strip()
    if key.removeprefix("match.") in THRESHOLDS:
      raise CommandError(f"{key} is fitted by training (false_alarm and match.familiar_quantile "
                         f"set the quantile it is read at), not a setting; set it by hand at "
                         f"query time: know2vec query --set {key}=VALUE")
  cfg = config_lib.override(proxy_lib.proxy_preset(args.preset), overrides)
  if args.pool:
    cfg = _with_pool(cfg, args.pool)
  out = _check_new_artifact(args.out, args.force, proxy_lib.MANIFEST, "proxy")
  zoo = load_zoo(args.zoo)
  model_ids = select_models(zoo, args.models, args.zoo)
  if not args.quiet:
    what = {"retrieve": "", "both": f", then fine-tune labels on {cfg.selection.targets} "
            "targets drawn from its train splits and the accuracy head",
            "finetune": f", supervised by fine-tune labels on {cfg.selection.targets} targets"}
    n = len(zoo) if model_ids is None else len(model_ids)
    print(f"training a {args.preset!r} proxy ({cfg.objective}) on {n} models of "
          f"{args.zoo}{what[cfg.objective]} -> {out}", file=sys.stderr)
  proxy = proxy_lib.Proxy.train(zoo, cfg, model_ids=model_ids,
                                cache=Cache(args.cache) if args.cache else None,
                                zoo_dir=args.zoo, progress=not args.quiet)
  path = distributed.on_writer("proxy", lambda: proxy.save(out))  # process 0 writes
  if not distributed.is_writer():
    return 0
  info = proxy.info
  s = info["seconds"]
  result = {"path": str(path), "fingerprint": proxy.fingerprint, "preset": args.preset,
            "overrides": list(args.set), "embed_dim": proxy.embed_dim,
            "max_classes": proxy.max_classes} | info
  text = (f"proxy {proxy.fingerprint} written to {path}\n"
          f"{info['num_models']} models, {info['num_tasks']} tasks, probe pool "
          f"{info['pool_size']} images, vectors of size {proxy.embed_dim}\n"
          f"probe pool: {_pool_text(info.get('pool', []))}\n"
          f"backbone: {_backbone_text(proxy.provenance['backbone'], info['backbone'])}; aligner "
          f"final loss {info['align_final'].get('loss', float('nan')):.3f}\n"
          f"{s['total']:.0f} s (knowledge {s['knowledge']:.0f} s, backbone {s['backbone']:.0f} s, "
          f"grids {s['grids']:.0f} s, aligner {s['align']:.0f} s)")
  sel = info.get("selection")
  if sel:
    text += (f"\naccuracy head: {sel['targets']} fine-tune targets x {sel['models']} models, "
             f"fitted in {sel['seconds']:.0f} s")
    val = sel.get("validation")
    if val:
      text += f"; on {len(val['targets'])} held-out targets {_accuracy_error_text(val)}"
  cal = info.get("calibration")
  if cal:
    text += (f"\nno-fit threshold {cal['threshold']:.3f} (calibrated on {cal['queries']} "
             f"validation queries of the training tasks, false alarm {cal['false_alarm']})")
  _print(result, args.json, text)
  return 0


def _with_pool(cfg, entries: list[str]):
  """``cfg`` with its probe pool made of ``--pool`` entries (each checked at once)."""
  import dataclasses

  from know2vec_jax.pool import parse_entry
  for e in entries:
    parse_entry(e, cfg.pool.split)
  return dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, sources=tuple(entries)))


def _pool_text(summary: list[dict]) -> str:
  """One line per pool: ``source@split n`` entries."""
  if not summary:
    return "-"
  return ", ".join(f"{p['source']}@{p.get('split', '?')} {p.get('images', '?')}"
                   for p in summary)


def _backbone_text(prov: dict, info: dict) -> str:
  labelled = prov.get("labelled", {})
  pairs = sum(len(v) for v in labelled.values())
  acc = info.get("heldout_accuracy")
  return (f"phi learned {pairs} (source, class) labels of {len(labelled)} training source(s)"
          + (f" (held-out accuracy {acc:.3f})" if acc is not None else "")
          + (f" and {prov['unlabelled']} unlabelled pool images" if prov.get("unlabelled")
             else ""))


# ---- index ---------------------------------------------------------------------------------------

def select_models(zoo, spec: str | None, zoo_path: str = "the zoo") -> list[str] | None:
  """The zoo models a ``--models`` value names, in zoo order (None: every model).

  ``spec`` is a comma-separated list; each item is a file of model ids (one per line), an
  architecture family (``cnn_l``, ``knn``), or a model id or glob pattern over ids
  (``*.fashion_mnist*``).

  Raises:
    ZooError: an item that matches no model, or nothing selected.
  """
  import fnmatch

  from know2vec_jax.zoo import ZooError
  items = _split_list(spec)
  if items is None:
    return None
  archs = {r.arch for r in zoo.records.values()}
  chosen: set[str] = set()
  for item in items:
    path = pathlib.Path(item).expanduser()
    if path.is_file():
      ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
      unknown = [m for m in ids if m not in zoo.records]
      if unknown:
        raise ZooError(f"unknown model id {unknown[0]!r} in {path} (not in {zoo_path}; "
                       "`know2vec zoo list --zoo ...` shows the ids)")
      hits = ids
    elif item in archs:
      hits = [m for m, r in zoo.records.items() if r.arch == item]
    else:
      hits = fnmatch.filter(zoo.records, item)
    if not hits:
      raise ZooError(f"--models item {item!r} matches no model of {zoo_path} (an id, a glob "
                     f"such as '*.digits*', a family of {sorted(archs)} or a file of ids)")
    chosen.update(hits)
  return [m for m in zoo.records if m in chosen]


def _zoo_groups(zoo, zoo_path: str, model_ids, strategy: str = "auto",
                devices: str = "auto"):
  """The zoo's black-box groups (optionally only some models), unknown ids named; each stack
  probed over ``devices`` (:func:`know2vec_jax.mesh.probe_mesh`)."""
  from know2vec_jax.blackbox import groups_from_zoo
  from know2vec_jax.mesh import probe_mesh
  from know2vec_jax.zoo import ZooError
  if model_ids is not None:
    unknown = [m for m in model_ids if m not in zoo.records]
    if unknown:
      raise ZooError(f"unknown model id {unknown[0]!r} in {zoo_path}"
                     + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                     + "; `know2vec zoo list --zoo ...` shows the ids")
    if not model_ids:
      raise ZooError("--models names no model")
  return groups_from_zoo(zoo, model_ids=model_ids, strategy=strategy, mesh=probe_mesh(devices))


def _index_summary(index, path) -> dict:
  from collections import Counter

  from know2vec_jax.pool import summary
  metas = [index.metadata(m) for m in index.ids]
  root = pathlib.Path(path).expanduser().absolute()
  # Metadata values are any JSON a user gave: counted by their text unless they are strings.
  text = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
  return {"path": str(root), "models": len(index), "dim": index.dim,
          "storage": index.storage, "rescore": index.rescore,
          "bytes": sum(f.stat().st_size for f in root.rglob("*") if f.is_file()),
          "archs": dict(Counter(text(m.get("arch", "?")) for m in metas)),
          "tasks": len({text(m["task"]) for m in metas if "task" in m}),
          "proxies": sorted({text(m["proxy"]) for m in metas if "proxy" in m}),
          # Models with a class they never predicted on the probe pool: their anchors for it are
          # fallbacks, and their vectors say less about that class.
          "never_predicting_a_class": sum(bool(m.get("never_predicted")) for m in metas),
          # What the proxies that built the rows learned from and probed with, and the images
          # the index adds to their pool.
          "built_by": index.proxies,
          "index_pool": summary(index.pool_provenance) if index.pool is not None else []}


def _cmd_index(args) -> int:
  from know2vec_jax.index import IndexStoreError, ModelIndex
  from know2vec_jax.proxy import Proxy, zoo_metadata
  from know2vec_jax.zoo import load_zoo
  if getattr(args, "rescore", None) is not None and args.rescore < 1:  # before any loading
    raise CommandError(f"--rescore must be a positive int, got {args.rescore}")
  if args.action in ("remove", "info", "convert"):
    index = ModelIndex.load(args.index)
    if args.action == "convert":
      before = index.storage
      index.set_storage(args.storage, args.rescore)
      index.save(args.index)
      _print(_index_summary(index, args.index) | {"converted_from": before}, args.json,
             f"{args.index}: storage {before} -> {index.storage} (rescore {index.rescore}); "
             f"{len(index)} models, float32 rows unchanged")
      return 0
    if args.action == "remove":
      missing = [m for m in args.ids if m not in index]
      if missing:
        raise IndexStoreError(f"unknown model id {missing[0]!r}: not in the index {args.index} "
                              f"({len(index)} models; `know2vec index info` summarises it)")
      index.remove(args.ids)
      index.save(args.index)
      info = _index_summary(index, args.index) | {"removed": list(args.ids)}
      _print(info, args.json, f"removed {len(args.ids)} model(s); {args.index} now holds "
                              f"{len(index)}")
      return 0
    info = _index_summary(index, args.index)
    if args.ids_only:
      info["ids"] = index.ids
    text = "\n".join(f"{k}: {v}" for k, v in info.items()
                     if k not in ("ids", "built_by", "index_pool"))
    for fp, prov in info["built_by"].items():
      text += (f"\nproxy {fp}: trained on {', '.join(prov.get('training_sources', [])) or '-'}"
               f"\n  probe pool ({prov.get('pool_size', '?')} images): "
               f"{_pool_text(prov.get('pool', []))}"
               f"\n  backbone: {_backbone_text(prov.get('backbone', {}), {})}")
    if info["index_pool"]:
      text += f"\nindex's own pool: {_pool_text(info['index_pool'])}"
    if args.ids_only:
      text += "\n" + "\n".join(index.ids)
    _print(info, args.json, text)
    return 0
  if args.action == "build":
    distributed = _launch(args)
    out = _check_new_artifact(args.out, args.force, "index.json", "index")
  proxy = Proxy.load(args.proxy)
  # A new index is made here, in the asked storage type, and filled by the proxy.
  index = (ModelIndex(proxy.embed_dim, storage=args.storage, rescore=args.rescore)
           if args.action == "build" else proxy.load_index(args.index))
  zoo = load_zoo(args.zoo)
  ids = select_models(zoo, args.models, args.zoo)
  if args.action == "add" and args.skip_existing:
    ids = [m for m in (ids if ids is not None else zoo.records) if m not in index]
    if not ids:
      _print(_index_summary(index, args.index) | {"added": []}, args.json,
             f"nothing to add: every model is already in {args.index}")
      return 0
  groups = _zoo_groups(zoo, args.zoo, ids, args.strategy or proxy.config.strategy,
                       args.probe_devices or proxy.config.probe_devices)
  pool = None
  if getattr(args, "pool", None):
    import dataclasses

    from know2vec_jax import pool as pool_lib
    pcfg = dataclasses.replace(proxy.config.pool, sources=tuple(args.pool))
    pool = pool_lib.build(pcfg, (), proxy.config.seed, proxy.image_shape)
  index = proxy.build_index(groups, zoo_metadata(zoo, [m for g in groups for m in g.model_ids]),
                            index=index, progress=not args.quiet, pool=pool)
  probed = int(sum((g.queries > 0).sum() for g in groups))
  if args.action == "build":  # across processes, each probed a share and process 0 writes
    probed = distributed.total(probed)
    path = distributed.on_writer("index", lambda: index.save(out))
    if not distributed.is_writer():
      return 0
  else:
    path = index.save(args.index)
  added = [m for g in groups for m in g.model_ids]
  info = _index_summary(index, path) | {"added": added}
  info["probed"] = probed  # models whose knowledge was not already known to the proxy
  _print(info, args.json,
         f"{'built' if args.action == 'build' else 'updated'} {path}: added {len(added)} "
         f"model(s) ({probed} probed, {len(added) - probed} from the proxy's stored knowledge), "
         f"{len(index)} in all")
  return 0


# ---- query ---------------------------------------------------------------------------------------

def _query_images(args, proxy, index=None):
  """(images, labels, description dict) of the query given by --images or --task (a --task
  draws no image the probe pool, or the index's own pool, holds)."""
  import numpy as np

  from know2vec_jax import data
  from know2vec_jax import pool as pool_lib
  h, _, c = proxy.image_shape
  if args.images is not None:
    src = data.load_source(f"folder:{args.images}", image_size=h, channels=c)
    # Every image of the folder is the query (the source's fixed split is irrelevant here).
    images = np.concatenate([src.train_images, src.test_images])
    labels = np.concatenate([src.train_labels, src.test_labels])
    return images, labels, {"images": str(args.images), "classes": list(src.class_names),
                            "num_images": int(len(labels))}
  spec = args.task
  if ":" not in spec:
    raise data.DataError(f"--task must be SOURCE:class,class,... (e.g. digits:0,1,2,3), got "
                         f"{spec!r}")
  name, classes = spec.rsplit(":", 1)
  src = data.load_source(name, image_size=h, channels=c, data_dir=args.data_dir)
  task = data.make_task(src, _split_list(classes))
  held = [pool_lib.excluded_rows(proxy.pool_provenance, name, args.split)]
  if index is not None and index.pool is not None:
    held.append(pool_lib.excluded_rows(index.pool_provenance, name, args.split))
  images, labels = data.few_shot(src, task, args.shots, seed=args.seed, split=args.split,
                                 exclude=np.concatenate(held))
  return images, labels, {"task": task.task_id, "classes": [src.class_names[i]
                                                           for i in task.classes],
                          "shots": args.shots, "split": args.split, "seed": args.seed,
                          "num_images": int(len(labels))}


def query_table(rows: list[dict], extra_columns=()) -> str:
  """The query result as a text table: rank, id, architecture, task, score, then extra columns
  read from each model's index metadata (``-`` where a model has none)."""
  cols = [("rank", ""), ("model_id", ""), ("arch", ""), ("task", ""), ("score", ".3f")]
  cols += [(k, ".3f" if any(isinstance(r.get(k), float) for r in rows) else "")
           for k in extra_columns if k not in dict(cols)]
  return _fmt_table(rows, cols)


def _cmd_query(args) -> int:
  from know2vec_jax.proxy import Proxy, query_result
  if args.k < 1:
    raise CommandError(f"-k must be >= 1, got {args.k}")
  proxy = Proxy.load(args.proxy)
  if args.set:
    proxy = proxy.with_match(**dict(_match_override(o) for o in args.set))
  index = proxy.load_index(args.index)
  images, labels, desc = _query_images(args, proxy, index)
  res = query_result(proxy, index, images, labels, k=args.k)
  rows = res["results"]
  extra = list(DEFAULT_QUERY_COLUMNS) + (_split_list(args.columns) or [])
  head = (f"query: {desc.get('task', desc.get('images'))} ({', '.join(desc['classes'])}), "
          f"{desc['num_images']} images; top {len(rows)} of {len(index)} models")
  if not proxy.config.match.enabled:
    fit = "class matching off: no fit check"
  elif res["no_fit"]:
    fit = (f"NO FIT: the best model's class-level fit {res['fit']:.3f} is below the proxy's "
           f"threshold {res['fit_threshold']:.3f}; no model of the index is likely to fit these "
           "classes")
  else:
    fit = f"fit {res['fit']:.3f} (threshold {res['fit_threshold']:.3f})"
  if res["familiar"]:
    fit += "; the query looks like a task the proxy trained on"
  from know2vec_jax.pool import summary
  _print({"query": desc, "results": rows, "fit": res["fit"], "no_fit": res["no_fit"],
          "fit_threshold": res["fit_threshold"], "familiar": res["familiar"],
          "proxy": {"fingerprint": proxy.fingerprint} | proxy.provenance,
          "index_pool": summary(index.pool_provenance) if index.pool is not None else []},
         args.json, head + "\n" + query_table(rows, extra) + "\n" + fit)
  return 0


def _accuracy_error_text(val: dict) -> str:
  """The accuracy head's validation errors, one line (``per_model_mae`` is absent from proxies
  saved before it was measured)."""
  model = val.get("per_model_mae")
  return (f"mean abs. error {val['head_mae']:.3f} (constant {val['constant_mae']:.3f}"
          + (f", each model's mean accuracy {model:.3f}" if model is not None else "")
          + f"), weighted tau {val['head_tau']:.3f} (query-blind prior {val['prior_tau']:.3f})")


def accuracy_note(selection: dict | None) -> tuple[bool, str]:
  """(whether ``know2vec select`` prints predicted accuracies, the line that says why): only with
  the validation error they were measured at, and saying so when they are no better than each
  model's mean accuracy over the training targets.

  Args:
    selection: the proxy's ``info["selection"]`` (None for a proxy without it).
  """
  val = (selection or {}).get("validation")
  if not val:
    return False, ("predicted accuracies not shown: the accuracy head was fitted without held-out "
                   "targets (selection.holdout = 0), so their error is unknown; the models are "
                   "ranked by them")
  text = (f"predicted accuracy, measured on {len(val['targets'])} held-out training targets: "
          + _accuracy_error_text(val))
  model = val.get("per_model_mae")
  if model is not None and val["head_mae"] >= model:
    text += ("; no better than each model's mean accuracy over the training targets: read the "
             "ranking, not the values")
  return True, text


def _cmd_select(args) -> int:
  from know2vec_jax.proxy import Proxy
  if args.k < 1:
    raise CommandError(f"-k must be >= 1, got {args.k}")
  proxy = Proxy.load(args.proxy)
  if not proxy.has_accuracy_head:
    raise CommandError(f"proxy {args.proxy} has no accuracy head (it was trained with objective "
                       f"{proxy.config.objective!r}); train one with `know2vec train --objective "
                       "both`")
  index = proxy.load_index(args.index)
  images, labels, desc = _query_images(args, proxy, index)
  scorer = args.scorer or proxy.config.selection.scorer
  rows = proxy.select(images, labels, index, k=args.k, scorer=scorer)
  extra = _split_list(args.columns) or []
  by = ("predicted fine-tune accuracy (the accuracy head)" if scorer == "head" else
        "q.m (the query vector against model vectors trained on fine-tune labels)")
  head = (f"query: {desc.get('task', desc.get('images'))} ({', '.join(desc['classes'])}), "
          f"{desc['num_images']} images; top {len(rows)} of {len(index)} models by {by}")
  selection = proxy.info.get("selection")
  shown, note = accuracy_note(selection)
  cols = [("rank", ""), ("model_id", ""), ("arch", ""), ("task", "")]
  cols += [("score", ".3f")] if scorer == "q.m" else []
  cols += [("predicted_accuracy", ".3f")] if shown else []
  cols += [(c, ".3f" if any(isinstance(r.get(c), float) for r in rows) else "")
           for c in extra if c not in dict(cols)]
  _print({"query": desc, "results": rows, "scorer": scorer,
          "accuracy_validation": (selection or {}).get("validation"),
          "accuracy_note": note}, args.json,
         head + "\n" + _fmt_table(rows, cols) + "\n" + note)
  return 0


def _match_override(item: str) -> tuple[str, str]:
  """``match.KEY=VALUE`` (or ``KEY=VALUE``) -> (KEY, VALUE) for :meth:`Proxy.with_match`."""
  key, sep, value = item.partition("=")
  if not sep:
    raise CommandError(f"--set expects KEY=VALUE, got {item!r}")
  return key.removeprefix("match."), value


# ---- eval / bench --------------------------------------------------------------------------------

def _forward(module: str, argv: list[str]) -> int:
  """Runs ``module.main(argv)``; its exit status (argparse's SystemExit included) is returned."""
  mod = importlib.import_module(module)
  # The forwarded parser names itself after argv[0]: make its usage read `know2vec eval nnr`.
  prog = sys.argv[0]
  if module.startswith("experiments."):
    sys.argv[0] = f"know2vec eval {module.split('.', 1)[1]}"
  else:
    sys.argv[0] = "know2vec bench"
  try:
    code = mod.main(argv)
  except SystemExit as e:
    code = e.code
  finally:
    sys.argv[0] = prog
  return int(code or 0) if not isinstance(code, str) else 2


def _cmd_eval(args) -> int:
  return _forward(f"experiments.{args.experiment}", list(args.args))


# ---- the parser ----------------------------------------------------------------------------------

def _add_query_arguments(p: argparse.ArgumentParser, proxy_help: str, shots: int) -> None:
  """What `query` and `select` share: the proxy, the index, the few-shot task and the output."""
  p.add_argument("--proxy", required=True, help=proxy_help)
  p.add_argument("--index", required=True, help="an index built with that proxy")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--images", default=None,
                   help="a folder with one sub-folder of images per class (every image is used)")
  src.add_argument("--task", default=None, metavar="SOURCE:C1,C2,...",
                   help="a task of a source: SHOTS images per class drawn from its SPLIT split "
                   "(e.g. digits+invert:0,1,2,3 or fashion_mnist:trouser,bag)")
  p.add_argument("--shots", type=int, default=shots,
                 help=f"images per class for --task (default {shots})")
  p.add_argument("--seed", type=int, default=0, help="which images for --task (default 0)")
  p.add_argument("--split", default="test", choices=["train", "test"],
                 help="split for --task (default test: images no zoo model trained on)")
  p.add_argument("--data-dir", default=None, help="where --task's source files are")
  p.add_argument("-k", type=int, default=10, help="how many models (default 10)")
  p.add_argument("--columns", default=None,
                 help="extra comma-separated metadata columns, e.g. heldout_accuracy,role")
  p.add_argument("--json", action="store_true", help="JSON output (every metadata field)")


def _add_launch_arguments(parser) -> None:
  """The multi-process launch options (`zoo build`, `train`, `index build`)."""
  g = parser.add_argument_group(
      "several processes", "run this command on every process of a multi-host job, the same "
      "arguments on each but --process-id (the output must be on a filesystem all hosts share)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="process 0's address and a free port; 'auto' detects a Cloud TPU, SLURM or "
                 "Open MPI job")
  g.add_argument("--num-processes", type=int, default=None, metavar="N",
                 help="processes in the job")
  g.add_argument("--process-id", type=int, default=None, metavar="I",
                 help="this process's id, 0..N-1")
  g.add_argument("--coordinator-timeout", type=float, default=300.0, metavar="SECONDS",
                 help="how long to wait for the coordinator and every process (default 300)")
  g.add_argument("--lost-process-timeout", type=float, default=20.0, metavar="SECONDS",
                 help="a process silent this long is lost: the others stop with one line naming "
                 "it (default 20)")


def _launch(args):
  """Joins the multi-process run the launch options describe (nothing for one process); returns
  the :mod:`know2vec_jax.distributed` module."""
  from know2vec_jax import distributed
  distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                         timeout=args.coordinator_timeout,
                         lost_process_timeout=args.lost_process_timeout)
  return distributed


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="know2vec", description=(
      "Know2Vec model retrieval in JAX: vectorize a model zoo from black-box calls and retrieve "
      "the models that fit a few-shot task."), epilog=(
      "Typical use: know2vec zoo build; know2vec train --zoo Z --out P; know2vec index build "
      "--proxy P --zoo Z --out I; know2vec query --proxy P --index I --task digits:0,1,2,3"))
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  d = sub.add_parser("data", help="image sources: list them, describe one, draw a grid")
  dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
  dl = dsub.add_parser("list", help="the source names and transforms")
  dl.add_argument("--json", action="store_true", help="JSON output")
  ds = dsub.add_parser("show", help="sizes and classes of one source")
  dg = dsub.add_parser("grid", help="a PNG grid of a task's images (one row per class)",
                       description="Writes a PNG: one row per class, its name then images of it.")
  for sp in (ds, dg):
    sp.add_argument("source", help="e.g. fashion_mnist, mnist5k+invert, folder:/path, tfds:name")
    sp.add_argument("--data-dir", default=None, help="where the source's files are")
    sp.add_argument("--json", action="store_true", help="JSON output")
  dg.add_argument("--classes", default=None,
                  help="comma-separated class names or ids (default: every class)")
  dg.add_argument("--out", required=True, help="the PNG file to write")
  dg.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
  dg.add_argument("--split", default="train", choices=["train", "test"], help="which split")
  dg.add_argument("--seed", type=int, default=0, help="which images (default 0)")
  dg.add_argument("--scale", type=int, default=3, help="pixel magnification (default 3)")

  z = sub.add_parser("zoo", help="build and inspect model zoos")
  zsub = z.add_subparsers(dest="action", required=True, metavar="ACTION")
  zb = zsub.add_parser("build", help="train a zoo preset and store it")
  zb.add_argument("--preset", default="demo", choices=list(_zoo_presets()), help="which zoo")
  zb.add_argument("--seed", type=int, default=0, help="seed of the preset's tasks and models")
  zb.add_argument("--strategy", default="auto", choices=list(TRACED),
                  help="execution over the model axis (auto: measured per backend)")
  zb.add_argument("--conv-impl", default="im2col", choices=["im2col", "xla"],
                  help="convolution lowering (im2col is fast on CPU)")
  zb.add_argument("--chunk-size", type=int, default=16, help="models per jitted training call")
  zb.add_argument("--force", action="store_true", help="rebuild even if the zoo exists")
  zb.add_argument("--quiet", action="store_true", help="no progress bar")
  _add_launch_arguments(zb)
  for sp, hlp in ((zb, "build"), (zsub.add_parser("list", help="one line per model"), "list"),
                  (zsub.add_parser("show", help="one model's metadata"), "show"),
                  (zsub.add_parser("summary", help="accuracy table of a stored zoo"), "summary")):
    sp.add_argument("--zoo", default=DEFAULT_ZOO, help=f"zoo directory (default {DEFAULT_ZOO})")
    sp.add_argument("--json", action="store_true", help="JSON output")
    if hlp == "show":
      sp.add_argument("model_id", help="a model id, as `know2vec zoo list` prints it")
    if hlp == "list":
      sp.add_argument("--arch", default=None, help="only this architecture")
      sp.add_argument("--source", default=None, help="only this source (with transforms)")

  t = sub.add_parser(
      "train", help="train a Know2Vec proxy on a zoo",
      description="Trains a proxy (backbone phi, aligned vectorizers, probe pool) on a stored "
      "zoo, seen through black-box calls only, and saves it atomically with the knowledge of "
      "every model it probed (so `index build` on the same zoo probes nothing again). Presets: "
      + "; ".join(f"{n}: {_proxy_presets().doc(n)}" for n in _proxy_presets().names),
      epilog="Override any config field with --set, e.g. --set align.steps=500 --set "
      "knowledge.search_steps=4 --set vectorizer.variant=lstm --set strategy=vmap; an "
      "unknown key lists the valid ones.")
  t.add_argument("--zoo", default=DEFAULT_ZOO, help=f"zoo directory (default {DEFAULT_ZOO})")
  t.add_argument("--out", required=True, help="the proxy directory to write")
  t.add_argument("--preset", default="demo", choices=list(_proxy_presets().names),
                 help="config preset (default demo)")
  t.add_argument("--cache", default=None,
                 help="a cache directory shared with other proxies and experiments (knowledge, "
                 "backbone, episodes)")
  t.add_argument("--objective", default=None, choices=["retrieve", "finetune", "both"],
                 help="retrieve: rank the models of the query's task first (the preset's "
                 "default); both: also fit an accuracy head for `know2vec select` on fine-tune "
                 "accuracies measured on targets drawn from the zoo (white-box; cached with "
                 "--cache); finetune: train the vectors on those accuracies alone")
  t.add_argument("--models", default=None, metavar="IDS|GLOB|FAMILY|FILE",
                 help="train on these models only, comma-separated: ids, globs over ids "
                 "('*.mnist5k*'), families (cnn_l, knn) or files of ids (default: all)")
  t.add_argument("--pool", action="append", default=[], metavar="SOURCE[@SPLIT]",
                 help="an unlabelled probe-pool entry (repeatable): a source (fashion_mnist, "
                 "digits+invert, tfds:NAME) in its test split unless @train or @all is given, or "
                 "folder:PATH (every image under it). Default: the test splits of the zoo "
                 "models' sources, never an image a zoo model trained on")
  t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field (repeatable)")
  t.add_argument("--force", action="store_true", help="replace an existing proxy")
  t.add_argument("--quiet", action="store_true", help="no progress bars")
  t.add_argument("--json", action="store_true", help="JSON output (the training facts)")
  _add_launch_arguments(t)

  i = sub.add_parser("index", help="build and edit the retrieval index of a zoo")
  isub = i.add_subparsers(dest="action", required=True, metavar="ACTION")
  ib = isub.add_parser("build", help="vectorize a zoo's models into a new index",
                       description="Vectorizes every (or the listed) model of a zoo with a "
                       "trained proxy, through black-box calls, and writes a new index.")
  ia = isub.add_parser("add", help="add models to an index (no retraining)",
                       description="Vectorizes new black boxes with the proxy's trained model "
                       "vectorizer and adds them to an existing index; no retraining.")
  for sp in (ib, ia):
    sp.add_argument("--proxy", required=True, help="the trained proxy directory")
    sp.add_argument("--zoo", required=True, help="the zoo whose models to vectorize")
    sp.add_argument("--models", default=None, metavar="IDS|GLOB|FAMILY|FILE",
                    help="which models, comma-separated: ids, globs over ids ('*.digits*'), "
                    "families (cnn_l, knn) or files of ids (default: all)")
    sp.add_argument("--strategy", default=None, choices=list(STRATEGIES),
                    help="model-axis strategy for probing the zoo's stacks (default: the "
                    "proxy's config)")
    sp.add_argument("--probe-devices", default=None, choices=["auto", "all", "one"],
                    help="the local devices the stacks' model axis is sharded over when probing: "
                    "auto (every local accelerator; one device on a CPU host), all, one "
                    "(default: the proxy's config); the knowledge is the same either way")
  ib.add_argument("--out", required=True, help="the index directory to write")
  ib.add_argument("--pool", action="append", default=[], metavar="SOURCE[@SPLIT]",
                  help="unlabelled images this index adds to the proxy's probe pool (repeatable; "
                  "as `train --pool`, e.g. folder:PATH of images of the zoo's domain): its "
                  "models are probed and its queries' classes located on both; no retraining")
  ib.add_argument("--force", action="store_true", help="replace an existing index")
  _add_launch_arguments(ib)
  ic = isub.add_parser("convert", help="change an index's storage type",
                       description="Rewrites an index (atomically) with another storage type for "
                       "its searched copy; the float32 vectors are kept, so any type converts to "
                       "any other without loss.")
  ic.add_argument("--index", required=True, help="the index to convert")
  for sp in (ib, ic):
    sp.add_argument("--storage", choices=list(INDEX_STORAGES), required=sp is ic,
                    default=None if sp is ic else "float32",
                    help="what a search reads: float32 (exact), bfloat16 (2 bytes per value) or "
                    "int8 (1 byte and a scale per row); compressed types re-score a shortlist "
                    "exactly in float32")
    sp.add_argument("--rescore", type=int, default=None if sp is ic else INDEX_RESCORE,
                    help="compressed storage: re-score this many times k rows per query"
                    + (" (default: keep)" if sp is ic else " (default %(default)s)"))
  ia.add_argument("--index", required=True, help="the index to update (rewritten atomically)")
  ia.add_argument("--skip-existing", action="store_true",
                  help="skip models already in the index instead of failing")
  ir = isub.add_parser("remove", help="remove models from an index")
  ir.add_argument("--index", required=True, help="the index to update (rewritten atomically)")
  ir.add_argument("ids", nargs="+", metavar="ID", help="model ids to remove")
  ii = isub.add_parser("info", help="summary of an index")
  ii.add_argument("--index", required=True, help="the index directory")
  ii.add_argument("--ids", dest="ids_only", action="store_true", help="also list the model ids")
  for sp in (ib, ia, ir, ii, ic):
    sp.add_argument("--json", action="store_true", help="JSON output")
    if sp in (ib, ia):
      sp.add_argument("--quiet", action="store_true", help="no progress bar")

  q = sub.add_parser(
      "query", help="rank the index's models for a few-shot task",
      description="Embeds a few-shot labelled image set with the proxy, ranks the index's "
      "models by the aligned vectors and class-level matching, and prints the top-k: rank, id, "
      "architecture, task, score with its parts (agreement, token, vector cosine) and any "
      "--columns from the models' index metadata; then whether any model fits the query's "
      "classes (the no-fit flag; --json carries fit, no_fit and fit_threshold).")
  _add_query_arguments(q, "the trained proxy directory", shots=5)
  q.add_argument("--set", action="append", default=[], metavar="match.KEY=VALUE",
                 help="change a retrieval setting of the proxy for this query, e.g. "
                 "match.vector_weight=0, match.shortlist=0, match.enabled=false (repeatable)")

  sl = sub.add_parser(
      "select", help="rank the index's models for fine-tuning on a task",
      description="Embeds a few-shot labelled image set with the proxy and ranks every model of "
      "the index for fine-tuning on that task, by the proxy's validated scorer "
      "(selection.scorer): the accuracy it is predicted to reach (the accuracy head: `know2vec "
      "train --objective both`) or q.m, the query vector against model vectors trained on "
      "fine-tune labels (`know2vec train --preset select`). Zero zoo forwards; the same index as "
      "`know2vec query`. --json carries the predicted accuracies and their validation error.")
  _add_query_arguments(sl, "a proxy with an accuracy head (know2vec train --preset select, or "
                       "--objective both)", shots=10)
  sl.add_argument("--scorer", choices=("head", "q.m"), default=None,
                  help="rank by the accuracy head or by q.m (default: the proxy's "
                  "selection.scorer, chosen on validation)")

  e = sub.add_parser("eval", help="run an experiment: " + ", ".join(EXPERIMENTS) +
                     " (arguments passed on)",
                     description="Runs experiments.<EXPERIMENT>.main with the remaining "
                     "arguments, e.g. `know2vec eval nnr --quick` (`know2vec eval nnr --help` "
                     "lists its options).")
  e.add_argument("experiment", choices=EXPERIMENTS, help=", ".join(EXPERIMENTS))
  e.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the experiment")
  sub.add_parser("bench", help="run the benchmarks (arguments passed on)", add_help=False,
                 description="Runs benchmarks.__main__.main with every following argument, e.g. "
                 "`know2vec bench --quick --only zoo_train`; `know2vec bench --help` shows its "
                 "options.")
  _describe(p)
  return p


def _zoo_presets():
  from know2vec_jax.zoo.specs import PRESETS
  return PRESETS.names


def _proxy_presets():
  from know2vec_jax.pipeline import PRESETS
  return PRESETS


def _describe(parser: argparse.ArgumentParser) -> None:
  """Gives every sub-command without a description its one-line help as the description, so
  ``know2vec X --help`` says what X does."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      helps = {a.dest: a.help for a in action._choices_actions}
      for name, sub in action.choices.items():
        if not sub.description and helps.get(name):
          sub.description = helps[name][0].upper() + helps[name][1:] + "."
        _describe(sub)


def _leave_failed_run(code: int) -> None:
  """Ends a failed process of a multi-process run at once, with ``code``.

  At a normal exit JAX's runtime waits in a shutdown barrier for every other process, and a peer
  that failed differently (or already left) can keep this one there for minutes. Every store
  writes atomically, so skipping the interpreter's exit handlers loses nothing. The other
  processes are told, so that they end at once rather than wait for this one.
  """
  import jax

  from know2vec_jax import distributed
  if jax.distributed.is_initialized():
    distributed.leave_failed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
  """Entry point of the ``know2vec`` console script; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  from know2vec_jax.backbone import BackboneError
  from know2vec_jax.blackbox import BlackBoxError, InputError
  from know2vec_jax.config import ConfigError
  from know2vec_jax.data import DataError
  from know2vec_jax.distributed import DistributedError
  from know2vec_jax.index import IndexStoreError
  from know2vec_jax.knowledge import KnowledgeError
  from know2vec_jax.pipeline import PipelineError
  from know2vec_jax.proxy import ProxyError
  from know2vec_jax.transfer import TransferError
  from know2vec_jax.zoo import ZooError
  try:
    if argv[:1] == ["bench"]:
      # Everything after `bench` belongs to the benchmark runner (argparse would claim options).
      return _forward("benchmarks.__main__", argv[1:])
    try:
      args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage mistake (2, its one line already printed)
      return int(e.code or 0)
    return {"data": _cmd_data, "zoo": _cmd_zoo, "train": _cmd_train, "index": _cmd_index,
            "query": _cmd_query, "select": _cmd_select, "eval": _cmd_eval}[args.command](args)
  except (CommandError, ConfigError, DataError, ZooError, ProxyError, IndexStoreError, InputError,
          BlackBoxError, BackboneError, KnowledgeError, PipelineError, TransferError,
          DistributedError, OSError) as e:
    # One line: orbax and OS messages can span several.
    msg = " ".join(str(e).split())
    if len(msg) > ERROR_CHARS:  # long paths: keep the start and the end, where the fix is named
      msg = msg[:ERROR_CHARS // 2 - 3] + " ... " + msg[-(ERROR_CHARS // 2 - 2):]
    print(f"know2vec: error: {msg}", file=sys.stderr)
    _leave_failed_run(2)
    return 2
  except KeyboardInterrupt:
    print("know2vec: interrupted; nothing half-written was left as complete", file=sys.stderr)
    _leave_failed_run(130)
    return 130


if __name__ == "__main__":
  sys.exit(main())
