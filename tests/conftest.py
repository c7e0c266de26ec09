"""Shared fixtures. The suite runs with 8 forced CPU devices so sharded paths are exercised."""

import os

# The Makefile's TEST_XLA_FLAGS, where pytest is run by hand: 8 forced devices, and XLA:CPU's
# backend optimisation off (compiling is most of the suite's time; the arrays are small).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
# Compiling is most of the suite's CPU time (tests/test_align.py: 126 CPU-s from nothing, 30 s
# with its programs compiled before), and the test workers and the processes the tests start
# compile many of the same programs: JAX's persistent compilation cache shares them. Every
# program is kept (the default keeps those over 1 s to compile, and most here take less). The
# environment carries both settings into the processes the tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax-compile"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


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
