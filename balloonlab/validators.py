"""Scenario table validators: the host's and the guest's own checks, run early.

The scenario's schema (``balloonlab.proto.schema``) checks every key; these
add what only the host or a guest knows (registries of victim and balloon
policies, disk profiles, replacement policies and their parameters, monitors, building the
workload), with the same code the processes run, so a bad name is reported
with the file name and the run never starts half-configured. Every error is
a ValueError; it comes back as one ConfigError.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.schema import split_where

__all__ = ["VALIDATORS", "guest_sizes", "guest_swap_area", "reset_guest_configs"]


def _as_config_error(fn: Callable[[Mapping[str, Any], str], Any]) -> Callable[[Mapping[str, Any], str], None]:
    def check(table: Mapping[str, Any], where: str) -> None:
        try:
            fn(table, where)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ConfigError(f"{where}: {exc}" if where not in str(exc) else str(exc)) from None
    return check


# A scenario's guests mostly share one table: each is checked, sized and given its swap area, three builds
# of its config (a workload and a policy each). The config depends only on the table, so one build per
# distinct table serves them all: 192 builds for 64 guests were ~30 ms of the launcher's start, on the cores
# where the host and the fork server import. Only configs that built are kept: a bad table raises each
# time, naming its own guest. A launch starts with none (``reset_guest_configs``): a policy or workload
# loaded from the user's file is read again by the next run in the same process.
_CONFIGS: dict[str, Any] = {}


def reset_guest_configs() -> None:
    """Forget the guest configs built so far (a new launch reads plugin files afresh)."""
    _CONFIGS.clear()


def _guest_config(table: Mapping[str, Any], where: str = "guest") -> Any:
    from balloonlab.guestd.config import RUN_KEYS, guest_config_from_mapping
    try:   # what the config is built from: the table without the run's own keys (the guest's id, ...)
        key = json.dumps({k: v for k, v in table.items() if k not in RUN_KEYS}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):   # not plain JSON values: built every time
        return guest_config_from_mapping(table, where=where)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = guest_config_from_mapping(table, where=where)
        if len(_CONFIGS) >= 256:
            _CONFIGS.clear()
        _CONFIGS[key] = cfg
    return cfg


def _guest(table: Mapping[str, Any], where: str) -> None:
    _guest_config(table, where)


def _host(table: Mapping[str, Any], where: str) -> None:
    from balloonlab.hostd.memconfig import host_memory_config
    host_memory_config(table, where=split_where(where, "host"))


def _balloon(table: Mapping[str, Any], where: str) -> None:
    from balloonlab.hostd.memconfig import balloon_config
    balloon_config(table, where=split_where(where, "balloon"))


def _disk(table: Mapping[str, Any], where: str) -> None:
    from balloonlab.hostd.devices import disk_topology   # the device profiles' names are the host's
    disk_topology(table, where=where)


def _monitors(table: Mapping[str, Any], where: str) -> None:
    from balloonlab.hostd.monitors.config import monitors_config
    context = split_where(where, "monitors")
    monitors_config(table, where=f"{context}: monitors" if context else "monitors")


VALIDATORS = {"guest": _as_config_error(_guest), "host": _as_config_error(_host),
              "balloon": _as_config_error(_balloon), "disk": _as_config_error(_disk),
              "monitors": _as_config_error(_monitors)}


def guest_sizes(table: Mapping[str, Any]) -> tuple[int, int]:
    """(ram_pages, disk_blocks) of a validated guest table: the host sizes its p2m and disk from them."""
    cfg = _guest_config(table)
    return cfg.ram_pages, cfg.disk_blocks


def guest_swap_area(table: Mapping[str, Any]) -> tuple[int, int]:
    """(first block, blocks) of a validated guest table's swap area on its virtual disk."""
    cfg = _guest_config(table)
    return cfg.kernel.swap_base_block, cfg.kernel.swap_slots
