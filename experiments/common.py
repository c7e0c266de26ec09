"""What the experiments share beyond the library: the figure backend and their command line.

Everything an experiment computes goes through the product (:class:`know2vec_jax.proxy.Proxy`,
:mod:`know2vec_jax.baselines`); this module only parses arguments and draws.
"""

from __future__ import annotations

import argparse

from know2vec_jax import config as config_lib


def pyplot():
  """matplotlib's pyplot on a file-only backend, or None (with a hint) when it is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing: no figure (pip install '.[plot]')")
    return None
  return plt


def add_config_arguments(p: argparse.ArgumentParser, presets: config_lib.Presets,
                         default: str) -> None:
  """``--preset NAME`` and repeatable ``--set KEY=VALUE`` (dotted keys of the experiment config,
  e.g. ``proxy.align.steps=500``), the same parser the ``know2vec`` command uses."""
  p.add_argument("--preset", default=default, choices=list(presets.names),
                 help="; ".join(f"{n}: {presets.doc(n)}" for n in presets.names))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a field of the experiment config, e.g. proxy.align.steps=500 "
                 "(repeatable; an unknown key lists the valid ones)")


def add_run_arguments(p: argparse.ArgumentParser, out_help: str, cache_help: str,
                      quick: str | None = None, zoo: str = "demo") -> None:
  """The arguments every experiment shares: ``--zoo``, ``--out``, ``--cache``, ``--quiet`` and,
  where the experiment has a quick preset, ``--quick`` (``quick``: its help); ``zoo``: the zoo
  preset the experiment is designed for (its default directory is ``artifacts/zoo-<zoo>``)."""
  if quick is not None:
    p.add_argument("--quick", action="store_true", help=quick)
  p.add_argument("--zoo", default=f"artifacts/zoo-{zoo}",
                 help=f"the zoo directory ({zoo} preset: know2vec zoo build --preset {zoo})")
  p.add_argument("--out", default=None, help=out_help)
  p.add_argument("--cache", default="artifacts/cache", help=cache_help)
  p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(p: argparse.ArgumentParser, presets: config_lib.Presets, args):
  """The preset with the ``--set`` overrides applied; a bad key or value is a usage error (exit 2)
  before any work starts."""
  try:
    return config_lib.override(presets.get(args.preset), args.set)
  except config_lib.ConfigError as e:
    p.error(str(e))
