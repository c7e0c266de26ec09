"""One config system for the whole project (docs/design.md, "Configs").

Every setting lives in exactly one typed, frozen dataclass that validates itself in
``__post_init__`` (raising :class:`ConfigError`, a ``ValueError``). Configs nest: a proxy config
holds the knowledge, backbone, vectorizer and aligner configs; an experiment config holds a proxy
config. This module gives all of them the same four tools:

- :func:`to_dict` / :func:`from_dict`: a config as JSON and back (manifests, results files);
- :func:`override`: dotted ``key=value`` strings (``align.steps=500``,
  ``proxy.vectorizer.variant=lstm``) parsed by the field's declared type, for the command line and
  every experiment alike; an unknown key or a bad value fails at once, before any work starts;
- :class:`Presets`: one registry style for named presets (zoo, proxy, experiment).

Quantities derived from data (a backbone's image shape, the vectorizer's feature size) are not
config fields: they are passed to the constructors that need them, so no value can be set in one
place and silently overwritten from another.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config value, key or preset that cannot be used; the message names it."""


def require(condition: bool, message: str) -> None:
  """Raises :class:`ConfigError` with ``message`` unless ``condition`` holds (for validation)."""
  if not condition:
    raise ConfigError(message)


def require_known(names, known, what: str) -> None:
  """Raises :class:`ConfigError` naming every entry of ``names`` not in ``known``, and the valid
  ones (``what``: the plural noun, e.g. "variants")."""
  unknown = [n for n in names if n not in known]
  require(not unknown, f"unknown {what} {unknown}; choose from {list(known)}")


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _is_config(value) -> bool:
  return dataclasses.is_dataclass(value) and not isinstance(value, type)


def to_dict(cfg) -> dict:
  """A (nested) config as a JSON-serialisable dict (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _optional_inner(hint):
  """``X`` for ``X | None`` / ``Optional[X]``, else None."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(hint)) == 2:
      return args[0]
  return None


def _coerce(value, hint, what: str):
  """A JSON value as the field's declared type (lists -> tuples, nested dicts -> configs)."""
  inner = _optional_inner(hint)
  if inner is not None:
    return None if value is None else _coerce(value, inner, what)
  if isinstance(hint, type) and dataclasses.is_dataclass(hint):
    return from_dict(hint, value, what)
  if typing.get_origin(hint) is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{what} must be a list, got {type(value).__name__}")
    args = typing.get_args(hint)
    item = args[0] if args else Any
    return tuple(_coerce(v, item, what) for v in value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def from_dict(cls: type[T], d: Mapping, what: str = "config") -> T:
  """Rebuilds a config from :func:`to_dict`'s output; missing fields keep their defaults.

  Raises:
    ConfigError: not a dict, a field ``cls`` does not have, or a value it refuses.
  """
  if not isinstance(d, Mapping):
    raise ConfigError(f"{what} must be a dict, got {type(d).__name__}")
  hints = _hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f"{what} has unknown field(s) {unknown} for {cls.__name__}")
  kw = {k: _coerce(v, hints[k], f"{what}.{k}") for k, v in d.items()}
  try:
    return cls(**kw)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{what} is invalid: {e}") from e


def keys(cfg, prefix: str = "") -> list[str]:
  """Every dotted key :func:`override` accepts for ``cfg``, e.g. ``align.steps``."""
  out = []
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if _is_config(value):
      out += keys(value, f"{prefix}{f.name}.")
    else:
      out.append(prefix + f.name)
  return out


def _parse(key: str, text: str, hint) -> Any:
  """Parses an override's text as the field's declared type."""
  def bad(expect):
    return ConfigError(f"bad value {text!r} for {key}: expected {expect}")
  inner = _optional_inner(hint)
  if inner is not None:
    return None if text.strip().lower() in ("none", "null", "") else _parse(key, text, inner)
  if hint is bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise bad("true or false")
  if hint is int:
    try:
      return int(text)
    except ValueError:
      raise bad("an integer") from None
  if hint is float:
    try:
      value = float(text)
    except ValueError:
      raise bad("a number") from None
    if not math.isfinite(value):
      raise bad("a finite number")
    return value
  if hint is str:
    return text
  if typing.get_origin(hint) is tuple:
    args = typing.get_args(hint)
    item = args[0] if args else str
    items = [s.strip() for s in text.strip().strip("()[]").split(",") if s.strip()]
    return tuple(_parse(key, s, item) for s in items)
  raise bad(f"a value of type {hint}")


def _field_hint(cfg, path: list[str]):
  for name in path[:-1]:
    cfg = getattr(cfg, name)
  return _hints(type(cfg))[path[-1]]


def parse_override(cfg, item: str) -> tuple[str, Any]:
  """Checks one ``key=value`` string against ``cfg``; returns (key, parsed value).

  Raises:
    ConfigError: not ``key=value``, an unknown key (the message lists the keys of the section the
      user meant), or a value that does not parse as the field's type.
  """
  if "=" not in item:
    raise ConfigError(f"override {item!r} is not key=value (e.g. align.steps=200)")
  key, text = (s.strip() for s in item.split("=", 1))
  valid = keys(cfg)
  if key not in valid:
    parts = key.split(".")
    section, prefix = cfg, ""
    # Walk down as far as the key names real sections, then list that section's keys.
    for p in parts[:-1]:
      sub = getattr(section, p, None) if _is_config(section) else None
      if not _is_config(sub):
        break
      section, prefix = sub, prefix + p + "."
    names = [prefix + k for k in keys(section)] if prefix else list(dict.fromkeys(
        k if "." not in k else k.split(".")[0] + ".*" for k in valid))
    raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(names)}")
  return key, _parse(key, text, _field_hint(cfg, key.split(".")))


def _apply(cfg, path: tuple, changes: dict):
  """``cfg`` with the overrides of its section (``changes[path]``) and of its sub-sections, each
  section rebuilt once, so fields that must agree (channels and strides) can change together."""
  kw = {}
  for f in dataclasses.fields(cfg):
    sub = getattr(cfg, f.name)
    if _is_config(sub) and any(p[:len(path) + 1] == path + (f.name,) for p in changes):
      kw[f.name] = _apply(sub, path + (f.name,), changes)
  own = changes.get(path, {})
  kw.update({name: value for name, (_, value) in own.items()})
  try:
    return dataclasses.replace(cfg, **kw)
  except (TypeError, ValueError) as e:  # the section's own validation
    keys = [key for key, _ in own.values()] or [".".join(path + (n,)) for n in kw]
    raise ConfigError(f"bad value for {', '.join(keys)}: {e}") from e


def override(cfg: T, items: Iterable[str]) -> T:
  """Applies dotted ``key=value`` overrides to a config.

  Every key and value is checked first; then each config section is rebuilt once with all of its
  overrides (so related fields can change together) and validates itself.

  Args:
    cfg: the config to start from (any config dataclass of the project).
    items: strings ``a.b.c=value``; the value is parsed as the field's declared type (int,
      float, bool, str, a comma-separated tuple, ``none`` for an optional field). A later
      override of the same key wins.

  Returns:
    The new config (``cfg`` itself is unchanged).

  Raises:
    ConfigError: a malformed override, an unknown key, a value of the wrong type, or a value the
      config's own validation refuses (naming the keys of the section that refused).
  """
  changes: dict[tuple, dict] = {}
  for item in items:
    key, value = parse_override(cfg, item)
    *path, name = key.split(".")
    changes.setdefault(tuple(path), {})[name] = (key, value)
  return _apply(cfg, (), changes) if changes else cfg


class Presets(Generic[T]):
  """A registry of named presets of one kind (``zoo``, ``proxy``, ``nnr``, ...).

  Register a factory with ``@PRESETS.register("name")``; :meth:`get` calls it. Factories take
  keyword arguments where a preset is parameterised (a zoo preset's seed).
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._factories: dict[str, Callable[..., T]] = {}

  def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    def deco(fn):
      if name in self._factories:
        raise ConfigError(f"{self.kind} preset {name!r} registered twice")
      self._factories[name] = fn
      return fn
    return deco

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._factories)

  def __contains__(self, name: object) -> bool:
    return name in self._factories

  def doc(self, name: str) -> str:
    """The first line of a preset's docstring."""
    return ((self._factories[name].__doc__ or "").strip().splitlines() or [""])[0]

  def get(self, name: str, **kwargs) -> T:
    """The preset ``name``.

    Raises:
      ConfigError: an unknown name (the message lists the known ones).
    """
    if name not in self._factories:
      raise ConfigError(f"unknown {self.kind} preset {name!r}; choose one of "
                        f"{', '.join(self._factories)}")
    return self._factories[name](**kwargs)
