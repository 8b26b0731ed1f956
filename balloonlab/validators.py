"""Scenario table validators: the host's and the guest's own checks, run early.

The scenario's schema (``balloonlab.proto.schema``) checks every key; these
add what only the host or a guest knows (registries of victim and balloon
policies, disk profiles, replacement policies and their parameters, monitors, building the
workload), with the same code the processes run, so a bad name is reported
with the file name and the run never starts half-configured. Every error is
a ValueError; it comes back as one ConfigError.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.schema import split_where

__all__ = ["VALIDATORS", "guest_sizes", "guest_swap_area"]


def _as_config_error(fn: Callable[[Mapping[str, Any], str], Any]) -> Callable[[Mapping[str, Any], str], None]:
    def check(table: Mapping[str, Any], where: str) -> None:
        try:
            fn(table, where)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ConfigError(f"{where}: {exc}" if where not in str(exc) else str(exc)) from None
    return check


def _guest(table: Mapping[str, Any], where: str) -> None:
    from balloonlab.guestd.config import guest_config_from_mapping
    guest_config_from_mapping(table, where=where)


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
    from balloonlab.guestd.config import guest_config_from_mapping
    cfg = guest_config_from_mapping(table)
    return cfg.ram_pages, cfg.disk_blocks


def guest_swap_area(table: Mapping[str, Any]) -> tuple[int, int]:
    """(first block, blocks) of a validated guest table's swap area on its virtual disk."""
    from balloonlab.guestd.config import guest_config_from_mapping
    cfg = guest_config_from_mapping(table)
    return cfg.kernel.swap_base_block, cfg.kernel.swap_slots
