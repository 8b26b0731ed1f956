"""The ``[host]`` and ``[balloon]`` tables of a scenario, validated.

Sizes are given in MiB (4 KiB pages: 256 per MiB) and become pages here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from balloonlab.proto.errors import ConfigError

__all__ = ["HostMemConfig", "BalloonConfig", "host_memory_config", "balloon_config", "MIB_PAGES"]

MIB_PAGES = 256

_HOST_KEYS: dict[str, tuple[type, ...]] = {
    "ram_mib": (int, float), "overcommit": (int, float), "swap_mib": (int, float), "victim": (str,),
    "cache_max_mib": (int, float), "cluster_kib": (int,), "max_inflight_requests": (int,),
    "low_watermark_pct": (int, float), "reclaim_batch_pages": (int,), "invariant_every_ticks": (int,),
    "invariant": (str,),
    "shootdown_timeout_s": (int, float), "uncooperative_ticks": (int,), "request_order": (str,),
    "vdisk_cache": (str,), "dirty_expire_ms": (int, float), "dirty_writeback_ms": (int, float),
    "dirty_background_pct": (int, float), "dirty_pct": (int, float),
    "memory_states": (str,), "min_free_pct": (int, float), "victim_scope": (str,),
    "swap_cache": (bool,),
}


@dataclass(frozen=True, slots=True)
class HostMemConfig:
    ram_pages: int | None          # None: derived from the guests and `overcommit`
    overcommit: float              # sum of guest RAM / host RAM when ram_mib is not given
    swap_pages: int | None         # None: twice the host RAM
    victim: str
    cache_max_pages: int | None
    cluster_pages: int
    max_inflight_requests: int
    low_watermark_pct: float | None  # None: the low state's threshold with memory states, else 1 % of RAM
    reclaim_batch_pages: int
    invariant_every_ticks: int
    invariant: str                  # "sample" (each check a sample, the full one at the end) or "full" (debug)
    shootdown_timeout_s: float
    uncooperative_ticks: int        # no balloon progress for this long -> fall back to host swapping
    request_order: str | None       # "deterministic" / "arrival" ("virtual-time": deterministic); None: the default
    vdisk_cache: str = "writethrough"  # the host page cache's mode for the virtual disks (QEMU's cache=)
    dirty_expire_ms: float = 30_000.0      # Linux vm.dirty_expire_centisecs
    dirty_writeback_ms: float = 5_000.0    # Linux vm.dirty_writeback_centisecs
    dirty_background_pct: float = 10.0     # Linux vm.dirty_background_ratio, of the cache's budget
    dirty_pct: float = 20.0                # Linux vm.dirty_ratio, of the cache's budget
    memory_states: str = "esx"      # "esx": ESX memory states decide reclaim (hostd.memstate); "none": watermark only
    min_free_pct: float | None = None   # None: ESX's sliding scale for minFree
    victim_scope: str = "vm"        # boundary host swap: "vm" (furthest above target first) or "global" (blind)
    swap_cache: bool = True         # a page swapped in keeps its slot until written (Linux and ESX do)

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
            raise ConfigError(f"{where}[host].request_order = \"{self.request_order}\" cannot go with a [locks] "
                              "protocol: the lock model needs the guests' requests to run concurrently")
        return "arrival"

    def host_ram_pages(self, guest_ram_pages: int) -> int:
        if self.ram_pages is not None:
            return self.ram_pages
        return max(1, int(guest_ram_pages / self.overcommit))


@dataclass(frozen=True, slots=True)
class BalloonConfig:
    policy: str
    params: dict[str, Any]
    max_percent: float
    log_decisions: str = "changes"   # "changes": a hold only when its reason changes; "all": every decision


def _check(table: Mapping[str, Any], keys: Mapping[str, tuple[type, ...]], where: str) -> None:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{where}.{key}: unknown key; known: {sorted(keys)}")
        if (isinstance(value, bool) and bool not in keys[key]) or not isinstance(value, keys[key]):
            raise ConfigError(f"{where}.{key}: expected {'/'.join(t.__name__ for t in keys[key])}, "
                              f"got {type(value).__name__} {value!r}")


def _positive(table: Mapping[str, Any], key: str, where: str, default: Any, allow_zero: bool = False) -> Any:
    value = table.get(key, default)
    if value is None:
        return None
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}.{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def host_memory_config(table: Mapping[str, Any], where: str = "[host]") -> HostMemConfig:
    _check(table, _HOST_KEYS, where)
    from .victim import VICTIM_POLICIES  # the registry names the valid victims
    victim = table.get("victim", "random")
    if victim not in VICTIM_POLICIES:
        raise ConfigError(f"{where}.victim: unknown victim policy {victim!r}; known: {sorted(VICTIM_POLICIES)}")
    ram = _positive(table, "ram_mib", where, None)
    swap = _positive(table, "swap_mib", where, None, allow_zero=True)
    cache = _positive(table, "cache_max_mib", where, None, allow_zero=True)
    cluster_kib = _positive(table, "cluster_kib", where, 64)
    if cluster_kib % 4:
        raise ConfigError(f"{where}.cluster_kib: must be a multiple of 4 (the page size), got {cluster_kib}")
    pct = _positive(table, "low_watermark_pct", where, None)
    if pct is not None and pct >= 50:
        raise ConfigError(f"{where}.low_watermark_pct: must be < 50, got {pct}")
    from .invariant import INVARIANT_MODES
    invariant = table.get("invariant", INVARIANT_MODES[0])
    if invariant not in INVARIANT_MODES:
        raise ConfigError(f"{where}.invariant: must be one of {list(INVARIANT_MODES)}, got {invariant!r}")
    from .hostcache import (CACHE_MODE_DEFAULT, DIRTY_BACKGROUND_PCT_DEFAULT, DIRTY_EXPIRE_MS_DEFAULT,
                            DIRTY_PCT_DEFAULT, DIRTY_WRITEBACK_MS_DEFAULT)
    from .vdisk import CACHE_MODES
    mode = table.get("vdisk_cache", CACHE_MODE_DEFAULT)
    if mode not in CACHE_MODES:
        raise ConfigError(f"{where}.vdisk_cache: must be one of {list(CACHE_MODES)}, got {mode!r}")
    dirty_bg = float(_positive(table, "dirty_background_pct", where, DIRTY_BACKGROUND_PCT_DEFAULT, allow_zero=True))
    dirty = float(_positive(table, "dirty_pct", where, DIRTY_PCT_DEFAULT))
    if dirty > 100 or dirty_bg > 100:
        raise ConfigError(f"{where}.dirty_pct / dirty_background_pct: must be <= 100, got {dirty} / {dirty_bg}")
    if dirty_bg >= dirty:
        raise ConfigError(f"{where}.dirty_background_pct ({dirty_bg}) must be below dirty_pct ({dirty}): the "
                          f"flusher starts before writers are throttled")
    from .memstate import MEMORY_STATES_MODES, VICTIM_SCOPES
    states = table.get("memory_states", MEMORY_STATES_MODES[0])
    if states not in MEMORY_STATES_MODES:
        raise ConfigError(f"{where}.memory_states: must be one of {list(MEMORY_STATES_MODES)}, got {states!r}")
    scope = table.get("victim_scope", VICTIM_SCOPES[0])
    if scope not in VICTIM_SCOPES:
        raise ConfigError(f"{where}.victim_scope: must be one of {list(VICTIM_SCOPES)}, got {scope!r}")
    min_free_pct = _positive(table, "min_free_pct", where, None)
    if min_free_pct is not None and min_free_pct > 25:
        raise ConfigError(f"{where}.min_free_pct: must be in (0, 25] (ESX's minFree is 1-6 % of host RAM), "
                          f"got {min_free_pct}")
    if states == "none" and "min_free_pct" in table:
        raise ConfigError(f"{where}.min_free_pct: has no effect with memory_states = \"none\"")
    order = table.get("request_order")
    from .discipline import DEPRECATED_ORDERS, REQUEST_ORDERS
    if order is not None and order not in REQUEST_ORDERS and order not in DEPRECATED_ORDERS:
        raise ConfigError(f"{where}.request_order: must be one of {list(REQUEST_ORDERS)}, got {order!r}")
    return HostMemConfig(
        ram_pages=None if ram is None else int(ram * MIB_PAGES),
        overcommit=float(_positive(table, "overcommit", where, 1.25)),
        swap_pages=None if swap is None else int(swap * MIB_PAGES),
        victim=victim,
        cache_max_pages=None if cache is None else int(cache * MIB_PAGES),
        cluster_pages=cluster_kib // 4,
        max_inflight_requests=int(_positive(table, "max_inflight_requests", where, 32)),
        low_watermark_pct=None if pct is None else float(pct),
        reclaim_batch_pages=int(_positive(table, "reclaim_batch_pages", where, 32)),
        invariant_every_ticks=int(_positive(table, "invariant_every_ticks", where, 1)),
        invariant=invariant,
        shootdown_timeout_s=float(_positive(table, "shootdown_timeout_s", where, 10.0)),
        uncooperative_ticks=int(_positive(table, "uncooperative_ticks", where, 50)),
        request_order=order,
        vdisk_cache=mode,
        dirty_expire_ms=float(_positive(table, "dirty_expire_ms", where, DIRTY_EXPIRE_MS_DEFAULT, allow_zero=True)),
        dirty_writeback_ms=float(_positive(table, "dirty_writeback_ms", where, DIRTY_WRITEBACK_MS_DEFAULT)),
        dirty_background_pct=dirty_bg,
        dirty_pct=dirty,
        memory_states=states,
        min_free_pct=None if min_free_pct is None else float(min_free_pct),
        victim_scope=scope,
        swap_cache=bool(table.get("swap_cache", True)),
    )


def balloon_config(table: Mapping[str, Any], where: str = "[balloon]") -> BalloonConfig:
    _check(table, {"policy": (str,), "params": (dict,), "max_percent": (int, float), "log_decisions": (str,)}, where)
    policy = table.get("policy", "none")
    params = dict(table.get("params", {}))
    max_percent = float(_positive(table, "max_percent", where, 65.0, allow_zero=True))
    if max_percent > 100:
        raise ConfigError(f"{where}.max_percent: must be <= 100, got {max_percent}")
    from .balloon import make_controller  # raises ConfigError-compatible errors for bad names/params
    try:
        make_controller(policy, params)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    from .balloon.decision import LOG_DECISIONS
    log_decisions = table.get("log_decisions", "changes")
    if log_decisions not in LOG_DECISIONS:
        raise ConfigError(f"{where}.log_decisions: must be one of {list(LOG_DECISIONS)}, got {log_decisions!r}")
    return BalloonConfig(policy, params, max_percent, log_decisions)
