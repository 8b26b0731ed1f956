"""The one place the host's parts are built from the run config and connected.

``assemble`` reads the resolved run config and returns a ``HostCore``:

    discipline      the request discipline (``hostd.discipline``: virtual-time, arrival, or the lock model)
    silent          silent-guest memory, which wraps the blind victim policy (``hostd.silent``)
    mem             host memory: victim policy, generator, costs, swap device, the discipline's callout
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

from balloonlab.proto.costs import CostModel, DiskProfile
from balloonlab.proto.errors import ConfigError
from balloonlab.proto.locks import lock_config_from_mapping

from .balloon import make_controller
from .config import RunConfig
from .discipline import DisciplineContext, RequestDiscipline, make_discipline
from .handlers import HandlerTables
from .invariant import INVARIANT_MODES, InvariantChecker
from .machine import Machine
from .memconfig import balloon_config, host_memory_config
from .memory import HostMemory
from .monitors import HostMonitors
from .registry import SessionRegistry
from .shootdown import Shootdowns
from .silent import SilentGuestMemory
from .victim import make_victim_policy
from .watchdog import Watchdog

__all__ = ["HostCore", "assemble", "INVARIANT_ENV"]

_HOST_STREAM = 0x6F5        # seeds the host's generator apart from the guests'
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


def assemble(cfg: RunConfig, sessions: SessionRegistry, *, running: Callable[[], Collection[int]],
             stop: Callable[[str], None], clock: Callable[[], float],
             progress: Callable[[dict[str, Any]], None] | None = None) -> HostCore:
    """Build and connect the host's parts for ``cfg`` (see the module docstring)."""
    mem_cfg = host_memory_config(cfg.host)
    balloon_cfg = balloon_config(cfg.balloon)
    lock_cfg = lock_config_from_mapping(cfg.locks)
    costs = CostModel.from_mapping(cfg.costs)
    vdisk_profile = DiskProfile.from_mapping(cfg.disk.get("vdisk", {}), "[disk.vdisk]")
    swap_profile = DiskProfile.from_mapping(cfg.disk.get("swap", {}), "[disk.swap]")
    guest_ram = sum(g.ram_pages for g in cfg.guests)
    ram_pages = mem_cfg.host_ram_pages(guest_ram)
    swap_pages = mem_cfg.swap_pages if mem_cfg.swap_pages is not None else 2 * guest_ram

    discipline = make_discipline(
        mem_cfg.resolved_request_order(lock_cfg.enabled), lock_cfg,
        DisciplineContext(sessions=sessions, running=running, stop=stop, clock=clock,
                          hypercall_us=costs.hypercall_us, shootdown_timeout_s=mem_cfg.shootdown_timeout_s))
    # Silent guests' frames go first to host swap; the blind policy decides among the others.
    silent = SilentGuestMemory(make_victim_policy(mem_cfg.victim))
    mem = HostMemory(
        ram_pages, swap_pages, silent.victims,
        np.random.default_rng(np.random.SeedSequence([cfg.seed, _HOST_STREAM])), costs, swap_profile,
        callout=discipline.memory_callout(),
        low_watermark_frames=max(1, int(ram_pages * mem_cfg.low_watermark_pct / 100)),
        reclaim_batch_frames=mem_cfg.reclaim_batch_pages, cluster_pages=mem_cfg.cluster_pages,
        vdisk_cache_max_pages=mem_cfg.cache_max_pages,
        max_inflight_requests=mem_cfg.max_inflight_requests)
    shootdowns = Shootdowns(mem, sessions, discipline, mem_cfg.shootdown_timeout_s,
                            on_answered=silent.guest_answered)
    monitors = HostMonitors(cfg.monitors, mem, cfg.tick_us)
    mem.wire(shootdown=shootdowns.shootdown, observer=monitors, placeholders_settled=shootdowns.settled)
    invariant = InvariantChecker(mem, invariant_mode(mem_cfg.invariant), mem_cfg.invariant_every_ticks,
                                 np.random.default_rng(np.random.SeedSequence([cfg.seed, _INVARIANT_STREAM])))
    machine = Machine(cfg, mem_cfg=mem_cfg, balloon_cfg=balloon_cfg, costs=costs, vdisk_profile=vdisk_profile,
                      mem=mem, sessions=sessions, discipline=discipline, shootdowns=shootdowns, silent=silent,
                      monitors=monitors, invariant=invariant,
                      controller=make_controller(balloon_cfg.policy, balloon_cfg.params))
    watchdog = Watchdog(sessions, machine, watchdog_s=cfg.watchdog_s, unresponsive_s=cfg.unresponsive_s,
                        owes_host=shootdowns.pending, on_stalled=progress)
    handlers = HandlerTables(mem, shootdowns, discipline, costs.hypercall_us)
    return HostCore(mem=mem, discipline=discipline, shootdowns=shootdowns, silent=silent, monitors=monitors,
                    invariant=invariant, machine=machine, watchdog=watchdog, handlers=handlers)
