"""Shared fixtures. The suite runs with 8 forced CPU devices so sharded paths are exercised."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
