"""Shared fixtures. The suite runs with 8 forced CPU devices so sharded paths are exercised."""

import contextlib
import fcntl
import json
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


@contextlib.contextmanager
def _built_once(tmp_path_factory, worker_id: str, name: str):
  """Where the xdist workers of one run share an artifact: yields (its directory, whether it is
  there already), holding a lock meanwhile, so that the first worker to need it builds and saves
  it and the others load it instead of building it again (the tiny proxy's first training is
  about a minute of compiling per worker). None without xdist (nothing to share)."""
  if worker_id == "master":
    yield None, False
    return
  root = tmp_path_factory.getbasetemp().parent / "shared"  # this run's, common to its workers
  root.mkdir(exist_ok=True)
  path = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield path, (root / f"{name}.done").exists()
      (root / f"{name}.done").touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, worker_id):
  """The tiny preset, trained once for the whole run (about 10 s on 2 CPU cores); the other
  test workers load it, bit for bit."""
  from know2vec_jax.zoo import BuildConfig, build_zoo, load_zoo, save_zoo, tiny_specs
  with _built_once(tmp_path_factory, worker_id, "zoo") as (path, there):
    if there:
      return load_zoo(path), json.loads((path.parent / "zoo-info.json").read_text())
    zoo, info = build_zoo(tiny_specs(), BuildConfig(chunk_size=4), progress=False)
    if path is not None:
      save_zoo(zoo, path, info)
      (path.parent / "zoo-info.json").write_text(json.dumps(info))
    return zoo, info


@pytest.fixture(scope="session")
def tiny_zoo_dir(tiny_zoo, tmp_path_factory):
  from know2vec_jax.zoo import save_zoo
  path = tmp_path_factory.mktemp("zoo") / "tiny"
  save_zoo(tiny_zoo[0], path, tiny_zoo[1])
  return path


@pytest.fixture(scope="session")
def tiny_proxy(tiny_zoo, tmp_path_factory, worker_id):
  """A Know2Vec proxy trained on the tiny zoo with the ``tiny`` preset, once for the whole run
  (about 15 s of training on 2 CPU cores); the other test workers load it, bit for bit."""
  from know2vec_jax.proxy import Proxy, proxy_preset
  with _built_once(tmp_path_factory, worker_id, "proxy") as (path, there):
    if there:
      return Proxy.load(path)
    proxy = Proxy.train(tiny_zoo[0], proxy_preset("tiny"), progress=False)
    if path is not None:
      proxy.save(path)
    return proxy


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
