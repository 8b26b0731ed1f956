"""Scenario files: TOML in, one validated run config per variant out.

Schema (every table optional except where noted; README "Scenario files"):

    [scenario]  name, description, seed, guests, duration_s | ticks, tick_us,
                metrics_every_ticks, watchdog_s, unresponsive_s,
                connect_timeout_s, expect_deadlock
    [host]      the host's memory (ram_mib, swap_mib, victim, ...)
    [guest]     defaults for every guest (ram_mib, policy, workload, ...)
    [[guests]]  per-guest overrides, each with `id = N` or `ids = [..]`
    [balloon]   policy, params, max_percent
    [costs]     proto.costs.CostModel fields
    [disk]      shared; [disk.vdisk], [disk.swap]: hostd.devices.DeviceProfile fields + profile
    [locks], [monitors]         lock protocol and host monitors
    [variants.NAME]             any of the tables above, deep-merged over the base
    [sweep]                     grid and seeds for balloonlab-sweep (balloonlab.sweep.spec); runs ignore it

Errors name the file and the key. A policy given as ``file.py:Class``
(``guest.policy``, ``balloon.policy``) is resolved against the scenario
file's directory here, so every process gets an absolute path.
"""
from __future__ import annotations

import copy
import importlib.resources
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from balloonlab.proto.clock import TICK_US_DEFAULT, s_to_us
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import ConfigError
from balloonlab.proto.plugins import is_file_spec, resolve_file_spec

from .overrides import Setting, apply_settings

__all__ = ["Scenario", "Overrides", "load_scenario", "SCENARIO_DIR", "find_scenario", "MIB_PAGES"]

SCENARIO_DIR = Path(str(importlib.resources.files("balloonlab.scenarios")))  # scripts/scenarios in the repository
MIB_PAGES = 256  # 4 KiB pages per MiB

_TOP = {"scenario", "host", "guest", "guests", "balloon", "costs", "disk", "locks", "monitors", "variants", "sweep"}
_SCENARIO_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str, "description": str, "seed": int, "guests": int, "duration_s": (int, float), "ticks": int,
    "tick_us": int, "metrics_every_ticks": int, "watchdog_s": (int, float), "unresponsive_s": (int, float),
    "connect_timeout_s": (int, float), "expect_deadlock": bool, "expect_guests_lost": list,
}
_BALLOON_KEYS = {"policy": str, "params": dict, "max_percent": (int, float), "log_decisions": str}

Validator = Callable[[Mapping[str, Any], str], None]


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line and API overrides, applied to every variant (``settings``: see ``balloonlab.overrides``)."""

    guests: int | None = None
    seed: int | None = None
    duration_s: float | None = None
    ticks: int | None = None
    variant: str | None = None
    settings: tuple[Setting, ...] = ()


@dataclass(frozen=True, slots=True)
class Scenario:
    path: Path
    name: str
    description: str
    raw: dict[str, Any]                 # the file as parsed
    variants: dict[str, dict[str, Any]]  # variant name -> fully merged tables
    expect_deadlock: bool

    def run_config(self, variant: str, run_id: str) -> dict[str, Any]:
        """The resolved config the host reads (``hostd.config.RunConfig``)."""
        merged = self.variants[variant]
        sc = merged["scenario"]
        tick_us = int(sc.get("tick_us", TICK_US_DEFAULT))
        if "ticks" in sc:
            ticks = int(sc["ticks"])
        else:
            ticks = max(1, math.ceil(s_to_us(float(sc.get("duration_s", 5.0))) / tick_us))
        guest_base = merged.get("guest", {})
        per_guest = _per_guest_overrides(merged.get("guests", []), int(sc.get("guests", 4)), self.path)
        guests = []
        for gid in range(int(sc.get("guests", 4))):
            g = _deep_merge(guest_base, per_guest.get(gid, {}))
            g["id"] = gid
            g["ram_pages"] = int(round(float(g.get("ram_mib", 64)) * MIB_PAGES))
            guests.append(g)
        out: dict[str, Any] = {
            "run_id": run_id, "scenario": self.name, "variant": variant, "seed": int(sc.get("seed", 1)),
            "ticks": ticks, "tick_us": tick_us, "guests": guests,
            "host": merged.get("host", {}), "balloon": merged.get("balloon", {}),
            "costs": merged.get("costs", {}), "disk": merged.get("disk", {}),
            "locks": merged.get("locks", {}), "monitors": merged.get("monitors", {}),
        }
        for key in ("metrics_every_ticks", "watchdog_s", "unresponsive_s", "connect_timeout_s"):
            if key in sc:
                out[key] = sc[key]
        return out


def find_scenario(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise ConfigError(f"scenario file {p}: no such file")
        return p
    candidate = SCENARIO_DIR / f"{name_or_path}.toml"
    if not candidate.exists():
        known = sorted(x.stem for x in SCENARIO_DIR.glob("*.toml"))
        raise ConfigError(f"unknown scenario {name_or_path!r}; known: {known} (or give a path to a .toml file)")
    return candidate


def load_scenario(path: Path, overrides: Overrides = Overrides(),
                  validators: Mapping[str, Validator] | None = None) -> Scenario:
    """Parse, merge variants, apply overrides, validate; errors name file and key.

    ``validators`` maps a table name ("host", "guest", "balloon") to a
    function that raises ConfigError for a bad table; the launcher passes the
    host's and guest's own parsers so errors surface before any process starts.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"scenario file {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario {path.name}: not valid TOML: {exc}") from None
    where = path.name
    for key in raw:
        if key not in _TOP:
            raise ConfigError(f"scenario {where}: unknown table [{key}]; known: {sorted(_TOP)}")
    variants_raw = raw.get("variants", {})
    if not isinstance(variants_raw, dict):
        raise ConfigError(f"scenario {where}: [variants] must be a table of tables")
    base = {k: v for k, v in raw.items() if k not in ("variants", "sweep")}
    names = list(variants_raw) or ["default"]
    all_names = list(names)
    if overrides.variant is not None:
        if overrides.variant not in names:
            raise ConfigError(f"scenario {where}: no variant {overrides.variant!r}; variants: {names}")
        names = [overrides.variant]
    merged_all: dict[str, dict[str, Any]] = {}
    for name in names:
        var = variants_raw.get(name, {})
        if not isinstance(var, dict):
            raise ConfigError(f"scenario {where}: [variants.{name}] must be a table")
        for key in var:
            if key not in _TOP - {"variants", "sweep"}:
                raise ConfigError(f"scenario {where}: [variants.{name}] unknown table {key!r}")
        merged = _deep_merge(base, var)
        sc = merged.setdefault("scenario", {})
        if overrides.guests is not None:
            sc["guests"] = overrides.guests
        if overrides.seed is not None:
            sc["seed"] = overrides.seed
        if overrides.ticks is not None:
            sc["ticks"] = overrides.ticks
            sc.pop("duration_s", None)
        if overrides.duration_s is not None:
            sc["duration_s"] = overrides.duration_s
            sc.pop("ticks", None)
        added = apply_settings(merged, overrides.settings, name, all_names)
        _resolve_policies(merged, path.parent)
        try:
            _validate(merged, f"{where} variant {name!r}" if variants_raw else where, validators or {})
        except ConfigError as exc:
            # A key an override added (not in the file), or one it changed, is most likely the culprit: say so.
            paths = added + [p for p, _ in overrides.settings if p not in added]
            culprit = next((p for p in paths if p.rsplit(".", 1)[-1] in str(exc)), None)
            if culprit is None:
                raise
            raise ConfigError(f"override {culprit!r}: {exc}") from None
        merged_all[name] = merged
    sc0 = base.get("scenario", {})
    return Scenario(path=path, name=str(sc0.get("name", path.stem)), description=str(sc0.get("description", "")),
                    raw=raw, variants=merged_all, expect_deadlock=bool(sc0.get("expect_deadlock", False)))


def _resolve_policies(merged: dict[str, Any], base_dir: Path) -> None:
    """``file.py:Class`` policies relative to the scenario file's directory, made absolute."""
    tables = [merged.get("balloon"), merged.get("guest")]
    guests = merged.get("guests")
    if isinstance(guests, list):
        tables += guests
    for table in tables:
        if isinstance(table, dict) and is_file_spec(table.get("policy")):
            table["policy"] = resolve_file_spec(table["policy"], base_dir)


def _validate(merged: dict[str, Any], where: str, validators: Mapping[str, Validator]) -> None:
    sc = merged.get("scenario", {})
    _check_table(sc, _SCENARIO_KEYS, f"{where}: [scenario]")
    if "ticks" in sc and "duration_s" in sc:
        raise ConfigError(f"{where}: [scenario] give duration_s or ticks, not both")
    for key in ("guests", "ticks", "tick_us", "metrics_every_ticks"):
        if key in sc and sc[key] < 1:
            raise ConfigError(f"{where}: [scenario].{key} must be >= 1, got {sc[key]}")
    for key in ("duration_s", "watchdog_s", "unresponsive_s", "connect_timeout_s"):
        if key in sc and not sc[key] > 0:
            raise ConfigError(f"{where}: [scenario].{key} must be > 0, got {sc[key]}")
    if "seed" in sc and sc["seed"] < 0:
        raise ConfigError(f"{where}: [scenario].seed must be >= 0, got {sc['seed']}")
    for gid in sc.get("expect_guests_lost", []):
        if isinstance(gid, bool) or not isinstance(gid, int) or gid < 0:
            raise ConfigError(f"{where}: [scenario].expect_guests_lost: guest ids are integers >= 0, got {gid!r}")
    _check_table(merged.get("balloon", {}), _BALLOON_KEYS, f"{where}: [balloon]")
    CostModel.from_mapping(_table(merged, "costs", where), where=f"{where}: [costs]")
    from balloonlab.hostd.devices import disk_topology
    disk_topology(_table(merged, "disk", where), where=f"{where}: [disk]")
    for name in ("host", "guest", "locks", "monitors"):
        _table(merged, name, where)
    n_guests = int(sc.get("guests", 4))
    per_guest = _per_guest_overrides(merged.get("guests", []), n_guests, where)
    _check_swap_files(merged, n_guests, per_guest, where)
    for table, fn in validators.items():
        if table == "guest":
            for gid in range(n_guests):
                g = _deep_merge(merged.get("guest", {}), per_guest.get(gid, {}))
                fn(g, f"{where}: guest {gid}")
        else:
            fn(merged.get(table, {}), f"{where}: [{table}]")


def _check_swap_files(merged: Mapping[str, Any], n_guests: int, per_guest: Mapping[int, Any], where: str) -> None:
    """``[host].swap_mib`` must hold every guest's swap file (one slot per page of guest RAM)."""
    swap_mib = merged.get("host", {}).get("swap_mib") if isinstance(merged.get("host"), dict) else None
    if not isinstance(swap_mib, (int, float)) or isinstance(swap_mib, bool):
        return
    ram = [float(_deep_merge(merged.get("guest", {}), per_guest.get(g, {})).get("ram_mib", 64))
           for g in range(n_guests)]
    if int(swap_mib * MIB_PAGES) < sum(int(round(r * MIB_PAGES)) for r in ram):
        raise ConfigError(f"{where}: [host].swap_mib = {swap_mib:g} cannot hold the guests' swap files: each "
                          f"guest has one of its RAM's size, {sum(ram):g} MiB for {n_guests} guests; raise "
                          f"swap_mib to at least {sum(ram):g} or leave it out (default: twice the guests' RAM)")


def _table(merged: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    value = merged.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table, got {type(value).__name__}")
    return value


def _check_table(table: Any, keys: Mapping[str, type | tuple[type, ...]], where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{where}.{key}: unknown key; known: {sorted(keys)}")
        want = keys[key]
        if isinstance(value, bool) and want is not bool:
            raise ConfigError(f"{where}.{key}: expected {_type_name(want)}, got bool")
        if not isinstance(value, want):
            raise ConfigError(f"{where}.{key}: expected {_type_name(want)}, got {type(value).__name__} {value!r}")


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "number" if set(t) == {int, float} else " or ".join(x.__name__ for x in t)
    return {"str": "a string", "int": "an integer", "bool": "true/false", "dict": "a table"}.get(t.__name__, t.__name__)


def _per_guest_overrides(entries: Any, n_guests: int, where: Any) -> dict[int, dict[str, Any]]:
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: [[guests]] must be an array of tables")
    out: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: [[guests]] entry {i} must be a table")
        body = {k: v for k, v in entry.items() if k not in ("id", "ids")}
        if "id" in entry:
            ids = [entry["id"]]
        elif "ids" in entry:
            ids = entry["ids"]
        else:
            raise ConfigError(f"{where}: [[guests]] entry {i} needs `id = N` or `ids = [..]`")
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise ConfigError(f"{where}: [[guests]] entry {i}: ids must be integers")
        for gid in ids:
            if gid >= n_guests:
                continue  # fewer guests asked for on the command line; the override does not apply
            if gid < 0:
                raise ConfigError(f"{where}: [[guests]] entry {i}: guest id {gid} < 0")
            out[gid] = _deep_merge(out.get(gid, {}), body)
    return out


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
