"""The ``[host]`` and ``[balloon]`` tables of a scenario, as the host reads them.

Their keys, types, bounds and defaults are the schema's
(``balloonlab.proto.schema.tables``: ``HostTable``, ``BalloonTable``); sizes
in MiB become pages there, once (``proto.schema.units``). What is added
here is what only the host knows: the victim policies, the request orders
its disciplines implement (and their deprecated names), the balloon
controllers, and the watermark the memory states imply.
"""
from __future__ import annotations

from typing import Any, Mapping

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.schema import BalloonTable, HostTable, SchemaError, decode, unknown_name

__all__ = ["HostMemConfig", "BalloonConfig", "host_memory_config", "balloon_config"]


class HostMemConfig(HostTable, frozen=True):
    """The ``[host]`` table (every key of ``HostTable``, sizes also as ``*_pages``) and what the host derives."""

    def low_watermark_frames(self, ram_pages: int, low_state_frames: int | None) -> int:
        """The in-tick watermark: as configured, else the low state's threshold (states on) or 1 % of RAM.

        With memory states an allocation swaps mid-tick only when free
        memory is in the low state, where ESX swaps and blocks: the request
        waits for the swap-out writes (direct reclaim).
        """
        if self.low_watermark_pct is not None:
            return max(1, int(ram_pages * self.low_watermark_pct / 100))
        if low_state_frames is not None:
            return max(1, int(low_state_frames))
        return max(1, int(ram_pages * 1.0 / 100))

    def resolved_request_order(self, locks_enabled: bool, where: str = "") -> str:
        """The default mode (``deterministic``) unless a lock model runs; asking for it with one is an error.

        A deprecated name resolves to the mode it stands for (``DEPRECATED_ORDERS``).
        """
        from .discipline import DEPRECATED_ORDERS, REQUEST_ORDERS   # the first mode is the default
        order = DEPRECATED_ORDERS.get(self.request_order or "", self.request_order)
        if not locks_enabled:
            return order or REQUEST_ORDERS[0]
        if order is not None and order != "arrival":
            raise ConfigError(f"{where}host.request_order: \"{self.request_order}\" cannot go with a [locks] "
                              "protocol: the lock model needs the guests' requests to run concurrently")
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
    from .discipline import DEPRECATED_ORDERS, REQUEST_ORDERS   # a registry: a new discipline is one line there
    if cfg.request_order is not None and cfg.request_order not in (*REQUEST_ORDERS, *DEPRECATED_ORDERS):
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
