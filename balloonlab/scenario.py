"""Scenario files: TOML in, one validated run config per variant out.

The tables, their keys, types, bounds and defaults are the schema in
``balloonlab.proto.schema`` (README "Scenario files" documents them). The
file is checked as written first, so an error names the key where the user
wrote it (``basic.toml: guest.workload[1].wieght: unknown key; did you mean
'weight'? ...``, ``variants.ballooning.balloon.max_percent: ...``); then each
variant is checked merged, with the overrides, and with the host's and the
guests' own checks (``validators``: registries of policies, monitors).

A policy given as ``file.py:Class`` (``guest.policy``, ``balloon.policy``)
and a trace workload's ``path`` are resolved against the scenario file's
directory here, so every process gets an absolute path.
"""
from __future__ import annotations

import copy
import importlib.resources
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from balloonlab.proto.clock import s_to_us
from balloonlab.proto.errors import ConfigError
from balloonlab.proto.plugins import is_file_spec, resolve_file_spec
from balloonlab.proto.schema import GuestTable, ScenarioFile, SchemaError, Tables, decode, describe, join_path

from .overrides import Setting, apply_settings

__all__ = ["Scenario", "Overrides", "load_scenario", "SCENARIO_DIR", "find_scenario"]

SCENARIO_DIR = Path(str(importlib.resources.files("balloonlab.scenarios")))  # scripts/scenarios in the repository

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
    tables: dict[str, Tables] = field(default_factory=dict)   # variant name -> the merged tables, decoded

    def run_config(self, variant: str, run_id: str) -> dict[str, Any]:
        """The resolved config the host reads (``hostd.config.RunConfig``)."""
        merged = self.variants[variant]
        typed = self.tables.get(variant) or decode(Tables, merged, where=self.path.name)
        sc = typed.scenario
        if sc.ticks is not None:
            ticks = sc.ticks
        else:
            duration_s = 5.0 if sc.duration_s is None else sc.duration_s
            ticks = max(1, math.ceil(s_to_us(duration_s) / sc.tick_us))
        guests = []
        for gid, g in _guest_tables(merged, sc.guests).items():
            g["id"] = gid
            g["ram_pages"] = decode(GuestTable, {k: v for k, v in g.items() if k not in ("id",)},
                                    path="guest").ram_pages
            guests.append(g)
        out: dict[str, Any] = {
            "run_id": run_id, "scenario": self.name, "variant": variant, "seed": sc.seed,
            "ticks": ticks, "tick_us": sc.tick_us, "guests": guests,
            "host": merged.get("host", {}), "balloon": merged.get("balloon", {}),
            "costs": merged.get("costs", {}), "disk": merged.get("disk", {}),
            "locks": merged.get("locks", {}), "monitors": merged.get("monitors", {}),
            "metrics_every_ticks": sc.metrics_every_ticks, "watchdog_s": sc.watchdog_s,
            "unresponsive_s": sc.unresponsive_s, "connect_timeout_s": sc.connect_timeout_s,
            "pace": sc.pace,
        }
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
    """Parse, check the file as written, merge variants, apply overrides, check each variant.

    ``validators`` maps a table name ("host", "guest", "balloon", "monitors")
    to a function that raises ConfigError for a bad table; the launcher
    passes the host's and guest's own checks (registries of policies and
    monitors) so errors surface before any process starts.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"scenario file {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario {path.name}: not valid TOML: {exc}") from None
    where = path.name
    decode(ScenarioFile, raw, where=where)            # every table as written, with the exact key of an error
    variants_raw = raw.get("variants", {})
    for name, var in variants_raw.items():
        if not isinstance(var, dict):
            raise SchemaError(f"variants.{name}", f"expected a table, got {describe(var)}", where)
        decode(Tables, var, path=f"variants.{name}", where=where)
    base = {k: v for k, v in raw.items() if k not in ("variants", "sweep")}
    names = list(variants_raw) or ["default"]
    all_names = list(names)
    if overrides.variant is not None:
        if overrides.variant not in names:
            raise ConfigError(f"scenario {where}: no variant {overrides.variant!r}; variants: {names}")
        names = [overrides.variant]
    merged_all: dict[str, dict[str, Any]] = {}
    typed_all: dict[str, Tables] = {}
    for name in names:
        merged = _deep_merge(base, variants_raw.get(name, {}))
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
        _resolve_paths(merged, path.parent.resolve())
        try:
            typed_all[name] = _validate(merged, f"{where} variant {name!r}" if variants_raw else where,
                                        validators or {})
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
                    raw=raw, variants=merged_all, expect_deadlock=bool(sc0.get("expect_deadlock", False)),
                    tables=typed_all)


def _resolve_paths(merged: dict[str, Any], base_dir: Path) -> None:
    """``file.py:Class`` policies and trace files relative to the scenario file's directory, made absolute."""
    tables = [merged.get("balloon"), merged.get("guest")]
    guests = merged.get("guests")
    if isinstance(guests, list):
        tables += guests
    for table in tables:
        if not isinstance(table, dict):
            continue
        if is_file_spec(table.get("policy")):
            table["policy"] = resolve_file_spec(table["policy"], base_dir)
        for spec in table.get("workload") or ():
            if isinstance(spec, dict) and spec.get("kind") == "trace" and isinstance(spec.get("path"), str):
                if spec["path"] != "-":
                    spec["path"] = str(base_dir / Path(spec["path"]).expanduser())


def _validate(merged: dict[str, Any], where: str, validators: Mapping[str, Validator]) -> Tables:
    tables = decode(Tables, merged, where=where)
    n_guests = tables.scenario.guests
    guests: list[GuestTable] = []
    for gid, g in _guest_tables(merged, n_guests).items():
        at = f"{where}: guest {gid}"
        guest = decode(GuestTable, g, path="guest", where=at)
        guests.append(guest)
        try:
            guest.check()
        except ValueError as exc:
            rel, _, reason = str(exc).partition(": ")
            raise SchemaError(join_path("guest", rel), reason, at) from None
        if "guest" in validators:
            validators["guest"](g, at)
    _check_swap_files(tables, guests, where)
    for table, fn in validators.items():
        if table != "guest":
            fn(merged.get(table, {}), f"{where}: {table}")
    return tables


def _check_swap_files(tables: Tables, guests: list[GuestTable], where: str) -> None:
    """``host.swap_mib`` must hold every guest's swap file (one slot per page of guest RAM)."""
    swap_pages = tables.host.swap_pages
    need_pages = sum(g.ram_pages for g in guests)
    if swap_pages is not None and swap_pages < need_pages:
        need_mib = sum(g.ram_mib for g in guests)
        raise SchemaError("host.swap_mib", f"swap_mib = {tables.host.swap_mib:g} cannot hold the guests' swap files: "
                          f"each guest has one of its RAM's size, {need_mib:g} MiB for {len(guests)} guests; raise "
                          f"swap_mib to at least {need_mib:g} or leave it out (default: twice the guests' RAM)", where)


def _guest_tables(merged: Mapping[str, Any], n_guests: int) -> dict[int, dict[str, Any]]:
    """Each guest's table: ``[guest]`` with the ``[[guests]]`` entries that name it merged over it."""
    per_guest: dict[int, dict[str, Any]] = {}
    for entry in merged.get("guests", []):
        body = {k: v for k, v in entry.items() if k not in ("id", "ids")}
        ids = [entry["id"]] if "id" in entry else entry.get("ids", [])
        for gid in ids:
            if gid < n_guests:   # fewer guests asked for on the command line: the entry does not apply
                per_guest[gid] = _deep_merge(per_guest.get(gid, {}), body)
    base = merged.get("guest", {})
    return {gid: _deep_merge(base, per_guest.get(gid, {})) for gid in range(n_guests)}


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
