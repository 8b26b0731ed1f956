"""Dotted-key overrides of a scenario's tables: ``{"host.overcommit": 1.5, "balloon.policy": "none"}``.

A path names a table of the scenario file and a key in it, as deep as the
tables go (``balloon.params.pff_high``). It applies to every variant, after
the variant's own tables are merged in, so it wins over them; a path that
starts with ``variants.NAME.`` applies to that variant alone, and
``guests.ID.KEY`` overrides one guest (as a ``[[guests]]`` entry would).
Values are TOML values (``1.5``, ``true``, ``"text"``, ``[1, 2]``); on the
command line a value that is not valid TOML is taken as a string
(``balloon.policy=working-set``).

A policy given as ``file.py:Class`` in an override is relative to the
working directory (the file's own are relative to the scenario file).
Parameters belong to their policy: an override that changes
``balloon.policy`` (``guest.policy``) drops the parameters the scenario
gave the other policy (``params``, ``policy_params``), so that
``balloon.policy=none`` works on a scenario whose variant tuned another;
parameters given as overrides too (``balloon.params.pff_high=50``) apply
to the new policy.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.plugins import is_file_spec, resolve_file_spec
from balloonlab.proto.schema import TOP_TABLES, unknown_name

__all__ = ["Setting", "parse_setting", "parse_value", "normalize", "apply_settings", "TABLES", "POLICY_KEYS"]

Setting = tuple[str, Any]

# The tables a dotted path may start with (scenario.py's top-level tables; [[guests]] by id).
TABLES = tuple(t for t in TOP_TABLES if t not in ("variants", "sweep"))
# Keys whose value may be a user's ``file.py:Class``.
POLICY_KEYS = ("policy",)
# A policy's parameters, by the table that names the policy.
_PARAMS_OF = {"balloon": "params", "guest": "policy_params", "guests": "policy_params"}


def parse_value(text: str) -> Any:
    """``"1.5"`` -> 1.5, ``"true"`` -> True, ``"[1, 2]"`` -> [1, 2], ``'"x"'`` -> "x"; anything else as is."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def parse_setting(text: str) -> Setting:
    """``"host.overcommit=1.5"`` -> ``("host.overcommit", 1.5)``."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted KEY, e.g. host.overcommit=1.5")
    return path.strip(), parse_value(value)


def normalize(settings: Mapping[str, Any] | Iterable[Setting] | None, cwd: Path | None = None) -> tuple[Setting, ...]:
    """Settings as ``(path, value)`` pairs, paths checked, file policies made absolute (against ``cwd``)."""
    if settings is None:
        return ()
    items = list(settings.items()) if isinstance(settings, Mapping) else list(settings)
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"override {item!r}: expected a (dotted key, value) pair")
        path, value = item
        parts = _split(path)
        if parts[-1] in POLICY_KEYS and is_file_spec(value):
            value = resolve_file_spec(value, cwd or Path.cwd())
        out.append((".".join(parts), value))
    return tuple(out)


def _split(path: str) -> list[str]:
    parts = path.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {path!r}: empty part in the dotted key")
    head = parts[2:] if parts[0] == "variants" else parts
    if parts[0] == "variants" and len(parts) < 4:
        raise ConfigError(f"override {path!r}: expected variants.NAME.TABLE.KEY")
    if head[0] not in TABLES:
        raise ConfigError(f"override {path!r}: {unknown_name('table', head[0], TABLES)}")
    if len(head) < 2:
        raise ConfigError(f"override {path!r}: name a key in [{head[0]}], e.g. {head[0]}.KEY")
    if head[0] == "guests" and (not head[1].isdigit() or len(head) < 3):
        raise ConfigError(f"override {path!r}: expected guests.ID.KEY with a guest id")
    return parts


def apply_settings(merged: dict[str, Any], settings: Iterable[Setting], variant: str,
                   variants: Iterable[str]) -> list[str]:
    """Apply ``settings`` to one variant's merged tables; returns the paths that added a key not there before."""
    added = []
    known = list(variants)
    # Policies first: a policy that changes drops the old parameters, then the overrides' own apply.
    settings = sorted(settings, key=lambda s: not s[0].endswith(".policy"))
    for path, value in settings:
        parts = path.split(".")
        if parts[0] == "variants":
            if parts[1] not in known:
                raise ConfigError(f"override {path!r}: no variant {parts[1]!r}; variants: {known}")
            if parts[1] != variant:
                continue
            parts = parts[2:]
        if parts[0] == "guests":
            entry: dict[str, Any] = {"id": int(parts[1])}
            _set(entry, parts[2:], value, path)
            if parts[2:] == ["policy"]:
                entry["policy_params"] = {}
            guests = merged.setdefault("guests", [])
            if not isinstance(guests, list):
                raise ConfigError(f"override {path!r}: [[guests]] is not an array of tables")
            guests.append(entry)
            added.append(path)
            continue
        params = _PARAMS_OF.get(parts[0]) if len(parts) == 2 and parts[1] == "policy" else None
        if params is not None and isinstance(merged.get(parts[0]), dict) \
                and merged[parts[0]].get("policy") != value:
            merged[parts[0]].pop(params, None)   # another policy's parameters would not fit this one
        if _set(merged, parts, value, path):
            added.append(path)
    return added


def _set(table: dict[str, Any], parts: list[str], value: Any, path: str) -> bool:
    """Set ``table[parts...] = value``, creating tables on the way; True when the key was not there."""
    here = table
    for i, key in enumerate(parts[:-1]):
        nxt = here.get(key)
        if nxt is None:
            nxt = here[key] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {path!r}: {'.'.join(parts[:i + 1])} is {nxt!r}, not a table")
        here = nxt
    new = parts[-1] not in here
    here[parts[-1]] = copy.deepcopy(value)
    return new
