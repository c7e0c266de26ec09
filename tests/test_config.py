"""The config system: typed dotted overrides, sections rebuilt together, JSON round trips, presets."""

import dataclasses

import pytest

from know2vec_jax import config
from know2vec_jax.config import ConfigError, Presets, require


@dataclasses.dataclass(frozen=True)
class Inner:
  channels: tuple[int, ...] = (8, 16, 32)
  strides: tuple[int, ...] = (2, 2, 1)
  rate: float = 0.1
  name: str | None = None

  def __post_init__(self):
    require(len(self.channels) == len(self.strides), "channels and strides differ in length")


@dataclasses.dataclass(frozen=True)
class Outer:
  inner: Inner = Inner()
  steps: int = 10
  on: bool = True


def test_values_parse_by_declared_type_and_sections_change_together():
  cfg = config.override(Outer(), ["steps=3", "on=no", "inner.rate=1e-3", "inner.name=abc"])
  assert (cfg.steps, cfg.on, cfg.inner.rate, cfg.inner.name) == (3, False, 1e-3, "abc")
  assert config.override(cfg, ["inner.name=none"]).inner.name is None
  # Two fields that must agree change in one step; one alone is refused, naming the key.
  both = config.override(Outer(), ["inner.channels=4,4", "inner.strides=1, 2"])
  assert both.inner.channels == (4, 4) and both.inner.strides == (1, 2)
  with pytest.raises(ConfigError, match="bad value for inner.channels: channels and strides"):
    config.override(Outer(), ["inner.channels=4,4"])
  assert config.override(Outer(), ["steps=1", "steps=2"]).steps == 2  # the last one wins
  assert config.override(Outer(), []) == Outer()


def test_unknown_keys_and_bad_values_name_the_problem():
  with pytest.raises(ConfigError, match=r"unknown config key 'inner\.rat'; valid keys: "
                                        r"inner\.channels, inner\.strides, inner\.rate"):
    config.override(Outer(), ["inner.rat=1"])
  with pytest.raises(ConfigError, match=r"valid keys: inner\.\*, steps, on"):
    config.override(Outer(), ["nope=1"])
  with pytest.raises(ConfigError, match="expected an integer"):
    config.override(Outer(), ["steps=1.5"])
  with pytest.raises(ConfigError, match="not key=value"):
    config.override(Outer(), ["steps"])
  assert config.keys(Outer()) == ["inner.channels", "inner.strides", "inner.rate", "inner.name",
                                  "steps", "on"]


def test_dict_round_trip_and_refusals():
  cfg = Outer(Inner((1, 2), (1, 1), 0.5, "x"), 7, False)
  d = config.to_dict(cfg)
  assert d["inner"]["channels"] == [1, 2]  # JSON lists
  assert config.from_dict(Outer, d) == cfg
  with pytest.raises(ConfigError, match=r"unknown field\(s\) \['extra'\] for Outer"):
    config.from_dict(Outer, d | {"extra": 1})
  with pytest.raises(ConfigError, match="channels and strides differ"):
    config.from_dict(Outer, {"inner": {"channels": [1]}})


def test_presets_register_once_and_name_the_known_ones():
  presets = Presets("thing")

  @presets.register("small")
  def _small(scale: int = 1):
    """A small thing."""
    return Outer(steps=scale)
  assert presets.get("small", scale=4).steps == 4 and presets.names == ("small",)
  assert presets.doc("small") == "A small thing."
  with pytest.raises(ConfigError, match="unknown thing preset 'big'; choose one of small"):
    presets.get("big")
  with pytest.raises(ConfigError, match="registered twice"):
    presets.register("small")(_small)


def test_require_known_names_every_unknown_entry_and_the_valid_ones():
  from know2vec_jax.config import require_known
  require_known(["a"], {"a": 1, "b": 2}, "rows")
  with pytest.raises(ConfigError, match=r"unknown rows \['x', 'y'\]; choose from \['a', 'b'\]"):
    require_known(["a", "x", "y"], {"a": 1, "b": 2}, "rows")
