"""Scenario table validators: the host's and the guest's own parsers, run early.

The launcher checks a scenario before starting any process, with the same
code the processes use, so a bad key is reported with the file name and the
run never starts half-configured. Every parser's error is a ValueError; it
comes back as one ConfigError.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from balloonlab.proto.errors import ConfigError

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
    host_memory_config(table, where=where)


def _balloon(table: Mapping[str, Any], where: str) -> None:
    from balloonlab.hostd.memconfig import balloon_config
    balloon_config(table, where=where)


def _monitors(table: Mapping[str, Any], where: str) -> None:
    from balloonlab.hostd.monitors.config import monitors_config
    monitors_config(table, where=where)


VALIDATORS = {"guest": _as_config_error(_guest), "host": _as_config_error(_host),
              "balloon": _as_config_error(_balloon), "monitors": _as_config_error(_monitors)}


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
