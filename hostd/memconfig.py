"""The ``[host]`` and ``[balloon]`` tables of a scenario, as the host reads them.

Their keys, types, bounds and defaults are the schema's
(``balloonlab.proto.schema.tables``: ``HostTable``, ``BalloonTable``); sizes
in MiB become pages there, once (``proto.schema.units``). What is added
here is what only the host knows: the victim policies, the request orders
and invariant modes its parts implement, the balloon controllers.
"""
from __future__ import annotations

from typing import Any, Mapping

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.schema import BalloonTable, HostTable, SchemaError, decode, unknown_name

__all__ = ["HostMemConfig", "BalloonConfig", "host_memory_config", "balloon_config"]


class HostMemConfig(HostTable, frozen=True):
    """The ``[host]`` table (every key of ``HostTable``, sizes also as ``*_pages``) and what the host derives."""

    def resolved_request_order(self, locks_enabled: bool, where: str = "") -> str:
        """The default mode (``virtual-time``) unless a lock model runs; asking for it with one is an error."""
        if not locks_enabled:
            from .discipline import REQUEST_ORDERS   # the first mode is the default
            return self.request_order or REQUEST_ORDERS[0]
        if self.request_order == "virtual-time":
            raise ConfigError(f"{where}host.request_order: \"virtual-time\" cannot go with a [locks] protocol: "
                              "the lock model needs the guests' requests to run concurrently")
        return "arrival"

    def host_ram_pages(self, guest_ram_pages: int) -> int:
        if self.ram_pages is not None:
            return self.ram_pages
        return max(1, int(guest_ram_pages / self.overcommit))


class BalloonConfig(BalloonTable, frozen=True):
    """The ``[balloon]`` table (every key of ``BalloonTable``)."""


def host_memory_config(table: Mapping[str, Any], where: str = "") -> HostMemConfig:
    cfg = decode(HostMemConfig, dict(table), path="host", where=where)
    from .victim import VICTIM_POLICIES  # the registry names the valid victims
    if cfg.victim not in VICTIM_POLICIES:
        raise SchemaError("host.victim", unknown_name("victim policy", cfg.victim, VICTIM_POLICIES), where)
    from .discipline import REQUEST_ORDERS   # a registry: a new discipline is one line there
    if cfg.request_order is not None and cfg.request_order not in REQUEST_ORDERS:
        raise SchemaError("host.request_order", unknown_name("request order", cfg.request_order, REQUEST_ORDERS),
                          where)
    return cfg


def balloon_config(table: Mapping[str, Any], where: str = "") -> BalloonConfig:
    cfg = decode(BalloonConfig, dict(table), path="balloon", where=where)
    from .balloon import make_controller  # raises ConfigError-compatible errors for bad names/params
    try:
        make_controller(cfg.policy, dict(cfg.params))
    except (KeyError, ValueError, TypeError) as exc:
        reason = str(exc).strip("'\"")
        raise SchemaError("balloon.params" if "parameter" in reason else "balloon.policy", reason, where) from None
    return cfg
