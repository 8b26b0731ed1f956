"""The host's monitors: swap storms, nested swapping and its cure, balloon convergence.

One module per monitor, each with its ``SPEC`` (``base.MonitorSpec``: its
config, its keys in the summary, its report section), listed in
``registry.MONITORS``:

- ``swap_storm.SwapStormDetector``: the seed's chain of failures, logged
  as ``swap_storm_detected`` with every link's value and threshold;
- ``double_faults.DoubleFaultMonitor``: every double fault of the virtual
  disks and every case of double paging, logged per guest and tick;
- ``pinning.SwapAreaPinner``: pins a swapping guest's swap area in host
  memory (``swap_area_pinned`` / ``swap_area_unpinned``);
- ``convergence.ConvergenceTracker``: after a step in host demand, when the
  balloon targets settle and by how much they overshot (``balloon_converged``);
- ``history.HistoryMonitor``: records the window the others read
  (``window.History``, the last ticks' samples) and the host's I/O-buffer peak;
- ``wss.WssMonitor``: the host's working-set estimate of each guest, sampled
  as ESX samples it (``hostd.wss``); the balloon controllers read it, so the
  machine feeds it each guest's accessed bits (``tick_bits``) and closes its
  tick before the controllers decide (``close_wss_tick``).

``HostMonitors`` runs them all for the machine, in the registry's order::

    HostMonitors(run_cfg.monitors, mem, tick_us) -> (guest_joined | guest_gone)* ;
    each tick, after host memory's tick and the balloon targets: end_tick(...) ;
    at the end: metrics()

It is also host memory's ``observer`` (``hostd.assembly`` connects it): it
passes host swap-ins of guest pages and every disk write on, as they
happen, to the monitors that listen.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import structlog

from .base import Monitor, MonitorBase, MonitorContext, MonitorSpec, TickContext
from .config import MonitorsConfig, monitors_config
from .convergence import ConvergenceTracker
from .double_faults import DoubleFaultMonitor
from .history import HistoryMonitor
from .pinning import SwapAreaPinner
from . import registry
from .registry import MONITORS
from .swap_storm import SwapStormDetector
from .window import GuestSample, History, TickSample

__all__ = ["HostMonitors", "MonitorsConfig", "monitors_config", "MONITORS", "Monitor", "MonitorSpec",
           "SwapStormDetector", "SwapAreaPinner", "DoubleFaultMonitor", "ConvergenceTracker", "HistoryMonitor",
           "History", "TickSample", "GuestSample"]

log = structlog.get_logger("hostd.monitors")


def _overrides(m: Monitor, hook: str) -> bool:
    return getattr(type(m), hook, None) is not getattr(MonitorBase, hook)


class HostMonitors:
    def __init__(self, table: Mapping[str, Any] | None, mem: Any, tick_us: float, seed: int = 0) -> None:
        self.cfg = monitors_config(table)
        self.mem = mem                  # hostd.memory.HostMemory
        specs = registry.MONITORS
        keep = max(spec.history_ticks(self.cfg[spec.name]) for spec in specs if spec.config is not None)
        self._by_name: dict[str, Monitor] = {}
        ctx = MonitorContext(mem=mem, tick_us=tick_us, log=log, history_ticks=keep, peers=self._by_name.get,
                             seed=int(seed))
        for spec in specs:
            self._by_name[spec.name] = spec.make(self.cfg[spec.name], ctx)
        self.monitors = list(self._by_name.values())
        recorder = self._by_name.get("history")
        assert isinstance(recorder, HistoryMonitor), "the monitors read its window: the registry must list history"
        self.history = recorder.window
        # Per disk write and per swap-in: only the monitors that listen are called.
        self._on_swapped_in = [m for m in self.monitors if _overrides(m, "guest_pages_swapped_in")]
        self._on_written = [m for m in self.monitors if _overrides(m, "disk_written")]

    def __getitem__(self, name: str) -> Any:
        return self._by_name[name]

    # -- guests ---------------------------------------------------------------------------

    def guest_joined(self, guest_id: int, ram_pages: int, spec: Mapping[str, Any]) -> None:
        """``spec`` is the guest's run config; ``swap_base_block``/``swap_blocks`` locate its swap area."""
        first, n = spec.get("swap_base_block"), spec.get("swap_blocks")
        if isinstance(first, int) and isinstance(n, int) and n > 0:
            self.mem.vdisk(guest_id).set_swap_area(first, n)   # its I/O is counted apart from now on
        for m in self.monitors:
            m.guest_joined(guest_id, ram_pages, spec)

    def guest_gone(self, guest_id: int) -> None:
        for m in self.monitors:
            m.guest_gone(guest_id)

    # -- host memory's observer -------------------------------------------------------------

    def guest_pages_swapped_in(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> None:
        for m in self._on_swapped_in:
            m.guest_pages_swapped_in(guest_id, gpfns, tokens)

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        for m in self._on_written:
            m.disk_written(guest_id, blocks, tokens)

    # -- the host's working-set estimate (read by the balloon controllers) -------------------

    def tick_bits(self, guest_id: int, accessed: bytes, stats: Mapping[str, Any] | None = None) -> None:
        """A guest's EPT accessed bits of the tick it just finished (``TickDone.accessed``), and its stats."""
        self._by_name["wss"].accessed(guest_id, accessed, stats)

    def close_wss_tick(self) -> None:
        """Close the estimator's tick: call before the controllers decide. Its next samples are drawn at the
        monitors' ``end_tick`` (off the boundary the guests wait for)."""
        self._by_name["wss"].close_tick(draw=False)

    def wss_estimate(self, guest_id: int) -> int | None:
        """The host's working-set estimate of a guest in pages; None before its first period ends."""
        return self._by_name["wss"].estimate(guest_id)

    def wss_row(self, guest_id: int) -> dict[str, Any]:
        return self._by_name["wss"].row(guest_id)

    # -- the tick ---------------------------------------------------------------------------

    def end_tick(self, tick: int, vt_us: float, snap: Mapping[str, Any], stats: Mapping[int, Mapping[str, Any]],
                 targets: Mapping[int, int]) -> None:
        """``snap`` is host memory's snapshot of this tick; ``stats`` each live guest's last report."""
        ctx = TickContext(tick=tick, vt_us=float(vt_us), snap=snap, stats=stats, targets=targets,
                          history=self.history)
        for m in self.monitors:
            m.record_tick(ctx)
        for m in self.monitors:
            m.end_tick(ctx)

    def metrics(self) -> dict[str, Any]:
        """``run_finished.monitors``: each monitor's keys (the summary reads them)."""
        out: dict[str, Any] = {}
        for m in self.monitors:
            out.update(m.finished_keys())
        return out
