"""The one place the host's parts are built from the run config and connected.

``assemble`` reads the resolved run config and returns a ``HostCore``:

    discipline      the request discipline (``hostd.discipline``: deterministic, arrival, or the lock model)
    silent          silent-guest memory, which wraps the blind victim policy (``hostd.silent``)
    mem             host memory: victim policy, generator, costs, swap device, the discipline's callout,
                    the ESX memory states and per-VM victims (``hostd.memstate``, ``[host] memory_states``)
    shootdowns      the shootdowns (``hostd.shootdown``), host memory's shootdown callback
    monitors        the host's monitors (``hostd.monitors``), host memory's observer
    invariant       when and how the frame invariant is checked (``hostd.invariant``)
    machine         all of the above, tick by tick (``hostd.machine``)
    watchdog        liveness (``hostd.watchdog``); tells the machine who goes silent and who is back
    handlers        builds each connection's handler table (``hostd.handlers``)

Host memory takes its collaborators in its constructor, except the two
that are built on it (the shootdowns and the monitors): those are
connected by one ``HostMemory.wire`` call, here. Nothing else sets them.
The server passes in what only it has: the registry of live sessions, the
tick barrier, how to stop the run, the clock, and where progress goes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Collection

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import ConfigError
from balloonlab.proto.locks import lock_config_from_mapping
from balloonlab.proto.messages import SharePeek, SharePeekReply, ShareProtect, ShareProtectReply

from .balloon import make_controller
from .config import RunConfig
from .devices import disk_topology
from .errors import HostdError
from .hostcache import CacheConfig
from .hostswap import SwapTooSmall
from .discipline import DEPRECATED_ORDERS, DisciplineContext, RequestDiscipline, make_discipline
from .handlers import HandlerTables
from .invariant import INVARIANT_MODES, InvariantChecker
from .machine import Machine
from .memconfig import balloon_config, host_memory_config
from .memory import HostMemory
from .memstate import MemoryStates, MemState, grant_floor_only, self_swap_allowed
from .monitors import HostMonitors
from .registry import SessionRegistry
from .sharing import SCAN_PAGES_PER_S_DEFAULT, PageSharing
from .shootdown import Shootdowns
from .silent import SilentGuestMemory
from .victim import make_victim_policy
from .victim.per_vm import PerVmVictims
from .watchdog import Watchdog

__all__ = ["HostCore", "assemble", "INVARIANT_ENV"]

log = structlog.get_logger("hostd")

_HOST_STREAM = 0x6F5        # seeds the host's generator apart from the guests' (and, with a guest id, that guest's)
_INVARIANT_STREAM = 0x1A7   # ... and the invariant's sample apart from both
INVARIANT_ENV = "BALLOONLAB_INVARIANT"
"""Overrides ``[host] invariant`` for every run started with it in the environment (the test suite sets "full")."""


@dataclass(frozen=True)
class HostCore:
    mem: HostMemory
    discipline: RequestDiscipline
    shootdowns: Shootdowns
    silent: SilentGuestMemory
    monitors: HostMonitors
    invariant: InvariantChecker
    machine: Machine
    watchdog: Watchdog
    handlers: HandlerTables


def invariant_mode(configured: str) -> str:
    """``[host] invariant``, unless ``BALLOONLAB_INVARIANT`` says otherwise."""
    mode = os.environ.get(INVARIANT_ENV) or configured
    if mode not in INVARIANT_MODES:
        raise ConfigError(f"{INVARIANT_ENV}={mode!r}: must be one of {list(INVARIANT_MODES)}")
    return mode


def wire_sharing(sharing: PageSharing, sessions: SessionRegistry, timeout_s: float) -> None:
    """The scanner's two requests to a parked guest, each bounded by the shootdown timeout."""

    async def peek(gid: int, gpfns: np.ndarray) -> np.ndarray:
        reply = await sessions[gid].conn.call(SharePeek(gpfns), timeout_s=timeout_s)
        assert isinstance(reply, SharePeekReply)
        return np.asarray(reply.tokens, np.uint64)

    async def protect(gid: int, gpfns: np.ndarray) -> None:
        reply = await sessions[gid].conn.call(ShareProtect(gpfns), timeout_s=timeout_s)
        assert isinstance(reply, ShareProtectReply)
        if reply.pages != gpfns.size:
            raise HostdError(f"guest {gid} write-protected {reply.pages} of {gpfns.size} shared gpfns")

    def eligible(gid: int) -> bool:
        session = sessions.get(gid)
        return session is not None and not session.unresponsive and not session.conn.is_closing

    sharing.peek, sharing.protect, sharing.eligible = peek, protect, eligible


def assemble(cfg: RunConfig, sessions: SessionRegistry, *, running: Callable[[], Collection[int]],
             stop: Callable[[str], None], clock: Callable[[], float],
             progress: Callable[[dict[str, Any]], None] | None = None,
             count_done: Callable[[int], None] = lambda gid: None) -> HostCore:
    """Build and connect the host's parts for ``cfg`` (see the module docstring)."""
    mem_cfg = host_memory_config(cfg.host)
    balloon_cfg = balloon_config(cfg.balloon)
    lock_cfg = lock_config_from_mapping(cfg.locks)
    costs = CostModel.from_mapping(cfg.costs)
    disks = disk_topology(cfg.disk)
    guest_ram = sum(g.ram_pages for g in cfg.guests)
    ram_pages = mem_cfg.host_ram_pages(guest_ram)
    swap_pages = mem_cfg.swap_pages if mem_cfg.swap_pages is not None else 2 * guest_ram
    cluster_pages = mem_cfg.cluster_pages
    cache = CacheConfig(
        max(cluster_pages, ram_pages // 16) if mem_cfg.cache_max_pages is None else mem_cfg.cache_max_pages,
        mem_cfg.vdisk_cache, dirty_expire_us=mem_cfg.dirty_expire_ms * 1000,
        dirty_writeback_us=mem_cfg.dirty_writeback_ms * 1000, dirty_background_pct=mem_cfg.dirty_background_pct,
        dirty_pct=mem_cfg.dirty_pct)

    order = mem_cfg.resolved_request_order(lock_cfg.enabled)
    if mem_cfg.request_order in DEPRECATED_ORDERS:
        log.warning(ev.CONFIG_DEPRECATED, key="host.request_order", value=mem_cfg.request_order, resolved=order,
                    reason=f"\"{mem_cfg.request_order}\" is now an alias of \"{order}\"; write that instead")
    discipline = make_discipline(
        order, lock_cfg,
        DisciplineContext(sessions=sessions, running=running, stop=stop, clock=clock,
                          hypercall_us=costs.hypercall_us, shootdown_timeout_s=mem_cfg.shootdown_timeout_s,
                          count_done=count_done, tick_us=float(cfg.tick_us),
                          ref_us=costs.mem_ref_us + costs.cpu_us_per_ref,
                          # what else a vCPU may finish past its gate: a fault's own work between two of its
                          # requests, and one 256-PFN balloon round (proto/README.md, "The overshoot bound")
                          overshoot_us=costs.minor_fault_us + costs.page_zero_us + 256 * costs.balloon_page_us,
                          last_tick=cfg.ticks - 1))
    # Silent guests' frames go first to host swap; the blind policy decides among the others.
    silent = SilentGuestMemory(make_victim_policy(mem_cfg.victim))
    states = (MemoryStates(ram_pages, mem_cfg.min_free_pct) if mem_cfg.memory_states == "esx" else None)
    # One seeded stream per guest, SeedSequence([seed, _HOST_STREAM, gid]): victims within that guest.
    guest_streams = PerVmVictims(cfg.seed, _HOST_STREAM)
    vm_victims = guest_streams if states is not None and mem_cfg.victim_scope == "vm" else None
    mem = HostMemory(
        ram_pages, swap_pages, silent.victims,
        np.random.default_rng(np.random.SeedSequence([cfg.seed, _HOST_STREAM])), costs, disks.swap,
        callout=discipline.memory_callout(), hold=discipline.memory_hold(), guest_rng=guest_streams.rng,
        low_watermark_frames=mem_cfg.low_watermark_frames(
            ram_pages, None if states is None else states.thresholds[MemState.LOW.label]),
        reclaim_batch_frames=mem_cfg.reclaim_batch_pages, cluster_pages=cluster_pages, cache=cache,
        max_inflight_requests=mem_cfg.max_inflight_requests, expected_guests=len(cfg.guests),
        shared_disk=disks.vdisk if disks.shared else None, tick_us=cfg.tick_us,
        states=states, vm_victims=vm_victims, zip=mem_cfg.zip)
    mem.swap.keep_cache = mem_cfg.swap_cache
    # Chained reads are served ahead of other guests' requests: only where those commute (hostd.readchain).
    mem.read_chain = mem_cfg.read_chain if order == "deterministic" else 0
    mem.ahead_chain = bool(mem_cfg.ahead_chain) and mem.read_chain > 0
    try:
        # Each guest's swap file (one slot per page), laid out in guest-id order.
        mem.swap.reserve({g.guest_id: g.ram_pages for g in cfg.guests})
    except SwapTooSmall as exc:
        raise ConfigError(f"[host].swap_mib: {exc}") from None
    if states is not None:
        # Mid-tick, a guest whose grant runs out swaps its own pages only where the states allow it,
        # and a guest above its allocation target in soft or worse gets only a floor of a grant.
        mem.self_swap_allowed = self_swap_allowed
        discipline.floor_grants(grant_floor_only(mem))
    if mem_cfg.page_sharing:
        rate = mem_cfg.share_scan_pages_per_s or SCAN_PAGES_PER_S_DEFAULT
        wire_sharing(mem.enable_sharing(rate), sessions, mem_cfg.shootdown_timeout_s)
    shootdowns = Shootdowns(mem, sessions, discipline, mem_cfg.shootdown_timeout_s,
                            on_answered=silent.guest_answered)
    monitors = HostMonitors(cfg.monitors, mem, cfg.tick_us, seed=cfg.seed)
    mem.wire(shootdown=shootdowns.shootdown, observer=monitors, placeholders_settled=shootdowns.settled)
    invariant = InvariantChecker(mem, invariant_mode(mem_cfg.invariant), mem_cfg.invariant_every_ticks,
                                 np.random.default_rng(np.random.SeedSequence([cfg.seed, _INVARIANT_STREAM])))
    machine = Machine(cfg, mem_cfg=mem_cfg, balloon_cfg=balloon_cfg, costs=costs, vdisk_profile=disks.vdisk,
                      mem=mem, sessions=sessions, discipline=discipline, shootdowns=shootdowns, silent=silent,
                      monitors=monitors, invariant=invariant,
                      controller=make_controller(balloon_cfg.policy, balloon_cfg.params, costs=costs))
    watchdog = Watchdog(sessions, machine, watchdog_s=cfg.watchdog_s, unresponsive_s=cfg.unresponsive_s,
                        owes_host=shootdowns.pending, on_stalled=progress)
    handlers = HandlerTables(mem, shootdowns, discipline, costs.hypercall_us)
    return HostCore(mem=mem, discipline=discipline, shootdowns=shootdowns, silent=silent, monitors=monitors,
                    invariant=invariant, machine=machine, watchdog=watchdog, handlers=handlers)
