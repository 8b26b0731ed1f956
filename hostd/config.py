"""The host's run configuration: the launcher's resolved scenario, as JSON.

The launcher validates the scenario and writes one ``host-config.json`` per
variant; the token is never in it (it comes in ``BALLOONLAB_TOKEN``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from balloonlab.proto.clock import TICK_US_DEFAULT
from balloonlab.proto.errors import ConfigError

__all__ = ["RunConfig", "GuestSpec", "load_run_config"]


@dataclass(frozen=True, slots=True)
class GuestSpec:
    guest_id: int
    ram_pages: int
    config: dict[str, Any]   # sent to the guest in Welcome.config


@dataclass(frozen=True, slots=True)
class RunConfig:
    run_id: str
    scenario: str
    variant: str
    seed: int
    ticks: int
    guests: tuple[GuestSpec, ...]
    tick_us: int = TICK_US_DEFAULT
    metrics_every_ticks: int = 10
    watchdog_s: float = 10.0            # report a tick that takes longer than this
    unresponsive_s: float = 30.0        # then take the silent guests out of the barrier
    connect_timeout_s: float = 120.0    # wait this long for all guests to say hello
    pace: float = 0.0                   # at most this many virtual s per wall s; 0: unpaced
    host: dict[str, Any] = field(default_factory=dict)
    balloon: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    disk: dict[str, Any] = field(default_factory=dict)
    locks: dict[str, Any] = field(default_factory=dict)
    monitors: dict[str, Any] = field(default_factory=dict)
    # every Hello checks its id against these: made once, not a set of all guests per Hello (n^2 at a start)
    _guest_ids: frozenset[int] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_guest_ids", frozenset(g.guest_id for g in self.guests))

    @property
    def guest_ids(self) -> frozenset[int]:
        return self._guest_ids

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunConfig":
        def need(key: str, typ: type) -> Any:
            if key not in raw:
                raise ConfigError(f"run config: missing key {key!r}")
            value = raw[key]
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
                raise ConfigError(f"run config: {key} must be {typ.__name__}, got {value!r}")
            return value

        guests = []
        for i, g in enumerate(need("guests", list)):
            if not isinstance(g, dict) or not isinstance(g.get("id"), int) or not isinstance(g.get("ram_pages"), int):
                raise ConfigError(f"run config: guests[{i}] needs an int 'id' and 'ram_pages'")
            guests.append(GuestSpec(g["id"], g["ram_pages"], dict(g)))
        ids = [g.guest_id for g in guests]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"run config: duplicate guest ids in {ids}")
        opt: dict[str, Any] = {}
        for key, typ in (("tick_us", int), ("metrics_every_ticks", int), ("watchdog_s", float),
                         ("unresponsive_s", float), ("connect_timeout_s", float), ("pace", float), ("host", dict),
                         ("balloon", dict), ("costs", dict), ("disk", dict), ("locks", dict),
                         ("monitors", dict)):
            if key in raw:
                opt[key] = need(key, typ)
        if opt.get("pace", 0.0) < 0:
            raise ConfigError(f"run config: pace must be >= 0, got {opt['pace']!r}")
        return cls(run_id=need("run_id", str), scenario=need("scenario", str), variant=need("variant", str),
                   seed=need("seed", int), ticks=need("ticks", int), guests=tuple(guests), **opt)


def load_run_config(path: Path) -> RunConfig:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"run config {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config {path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {path}: expected a JSON object")
    return RunConfig.from_mapping(raw)
