"""The ``[monitors]`` table of a scenario, validated: one sub-table per monitor, every key optional.

Each monitor owns its table (``[monitors.NAME]``): its keys, their types and
defaults are the fields of its spec's ``config`` dataclass, documented in
its module (``swap_storm``, ``pinning``, ``double_faults``, ``convergence``).
This module only reads a table against them: a key the dataclass does not
have, a value of the wrong type, a negative number, a ``fraction`` above 1,
an ``at_least_one`` below 1 or a ``choice`` not offered is a ``ConfigError``
naming it.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Iterator, Mapping

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.schema import describe, did_you_mean, with_known

from . import registry

__all__ = ["MonitorsConfig", "monitors_config", "parse_table"]

_WORDS = {bool: "true or false", str: "a string", float: "a number", int: "an integer"}


class MonitorsConfig:
    """Each monitor's config by name (``cfg["pinning"]`` or ``cfg.pinning``); defaults for tables not given."""

    def __init__(self, by_name: Mapping[str, Any] | None = None) -> None:
        given = dict(by_name or {})
        self._by_name = {spec.name: given.get(spec.name, spec.default_config()) for spec in registry.MONITORS}

    def __getitem__(self, name: str) -> Any:
        return self._by_name[name]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_by_name"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MonitorsConfig) and self._by_name == other._by_name

    def __repr__(self) -> str:
        return f"MonitorsConfig({self._by_name!r})"


def parse_table(cls: type, raw: Any, where: str) -> Any:
    """``raw`` (a TOML table) read as the config dataclass ``cls``; raises ``ConfigError`` naming a bad key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table, got {describe(raw)}")
    default = cls()
    declared = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in declared:
            raise ConfigError(f"{where}.{key}: {with_known('unknown key', key, declared)}")
        kind = type(getattr(default, key))
        meta = declared[key].metadata
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is str:
            ok = isinstance(value, str)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where}.{key}: expected {_WORDS[kind]}, got {describe(value)}")
        if kind in (int, float) and value < 0:
            raise ConfigError(f"{where}.{key}: must be >= 0, got {value}")
        if meta.get("fraction") and value > 1:
            raise ConfigError(f"{where}.{key}: must be in [0, 1], got {value}")
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{where}.{key}: must be one of {list(meta['choices'])}, got {value!r}"
                              f"{did_you_mean(value, meta['choices'])}")
        if meta.get("at_least_one") and value < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1, got {value}")
        values[key] = value
    return replace(default, **values)


def monitors_config(table: Mapping[str, Any] | None, where: str = "monitors") -> MonitorsConfig:
    """Parse ``[monitors]``; a bad key or value raises ``ConfigError`` naming it."""
    table = table or {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {describe(table)}")
    sections = {spec.name: spec.config for spec in registry.MONITORS if spec.config is not None}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in sections:
            raise ConfigError(f"{where}.{key}: {with_known('unknown monitor', key, sections)}")
        out[key] = parse_table(sections[key], value, f"{where}.{key}")
    return MonitorsConfig(out)
