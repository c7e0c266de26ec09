"""Shared fixtures. The suite runs with 8 forced CPU devices so sharded paths are exercised."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

# The slowest files first (their serial times on the 2-core CPU, 15-165 s each), then the rest in
# their usual order: ``make test`` shares whole files among its workers (pytest-xdist,
# ``--dist loadfile``) as each worker frees up, so a long file started last would run alone at
# the end. The order changes no test's outcome.
SLOW_FIRST = ("test_experiments.py", "test_multiprocess.py", "test_benchmarks_smoke.py",
              "test_align.py", "test_openworld.py", "test_classmatch.py", "test_transfer.py",
              "test_selection.py", "test_zoo.py", "test_backbone.py", "test_blackbox.py",
              "test_baselines.py", "test_proxy.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable


@pytest.fixture(scope="session")
def tiny_zoo():
  """The tiny preset, trained once for the whole session (about 10 s on 2 CPU cores)."""
  from know2vec_jax.zoo import BuildConfig, build_zoo, tiny_specs
  zoo, info = build_zoo(tiny_specs(), BuildConfig(chunk_size=4), progress=False)
  return zoo, info


@pytest.fixture(scope="session")
def tiny_zoo_dir(tiny_zoo, tmp_path_factory):
  from know2vec_jax.zoo import save_zoo
  path = tmp_path_factory.mktemp("zoo") / "tiny"
  save_zoo(tiny_zoo[0], path, tiny_zoo[1])
  return path


@pytest.fixture(scope="session")
def tiny_proxy(tiny_zoo):
  """A Know2Vec proxy trained on the tiny zoo with the ``tiny`` preset, once per session
  (about 15 s on 2 CPU cores)."""
  from know2vec_jax.proxy import Proxy, proxy_preset
  return Proxy.train(tiny_zoo[0], proxy_preset("tiny"), progress=False)


@pytest.fixture(scope="session")
def tiny_proxy_dir(tiny_proxy, tmp_path_factory):
  path = tmp_path_factory.mktemp("proxy") / "tiny"
  tiny_proxy.save(path)
  return path


@pytest.fixture(scope="session")
def tiny_index(tiny_proxy, tiny_zoo):
  """The tiny zoo's index built with ``tiny_proxy`` (zoo metadata on every row)."""
  from know2vec_jax.blackbox import groups_from_zoo
  from know2vec_jax.proxy import zoo_metadata
  return tiny_proxy.build_index(groups_from_zoo(tiny_zoo[0]), zoo_metadata(tiny_zoo[0]))
