"""Scenario table validators: the host's and the guest's own parsers, run early.

The launcher checks a scenario before starting any process, with the same
code the processes use, so a bad key is reported with the file name and the
run never starts half-configured.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["VALIDATORS"]


def _guest(table: Mapping[str, Any], where: str) -> None:
    from guestd.config import guest_config_from_mapping
    guest_config_from_mapping({**table, "id": 0}, where=where)


def _host(table: Mapping[str, Any], where: str) -> None:
    from hostd.memconfig import host_memory_config
    host_memory_config(table, where=where)


def _balloon(table: Mapping[str, Any], where: str) -> None:
    from hostd.memconfig import balloon_config
    balloon_config(table, where=where)


VALIDATORS = {"guest": _guest, "host": _host, "balloon": _balloon}
