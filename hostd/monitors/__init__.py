"""The host's monitors: swap storms, nested swapping and its cure, balloon convergence.

One module per monitor; ``HostMonitors`` owns them all for the machine:

- ``swap_storm.SwapStormDetector``: the seed's chain of failures, logged
  as ``swap_storm_detected`` with every link's value and threshold;
- ``pinning.SwapAreaPinner``: pins a swapping guest's swap area in host
  memory (``swap_area_pinned`` / ``swap_area_unpinned``);
- ``double_faults.DoubleFaultMonitor``: every double fault of the virtual
  disks and every case of double paging, logged per guest and tick;
- ``convergence.ConvergenceTracker``: after a step in host demand, when the
  balloon targets settle and by how much they overshot (``balloon_converged``).

Call order (from ``hostd.machine.Machine``)::

    HostMonitors(run_cfg, mem) -> (guest_joined | guest_gone)* ;
    each tick, after host memory's tick and the balloon targets: end_tick(...) ;
    at the end: metrics()

``HostMonitors`` is also host memory's ``observer``: it hears about host
swap-ins of guest pages and every disk write as they happen.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import structlog

from ..framepool import FrameKind
from .config import MonitorsConfig, monitors_config
from .convergence import ConvergenceTracker
from .double_faults import DoubleFaultMonitor
from .history import GuestSample, History, TickSample
from .pinning import SwapAreaPinner
from .swap_storm import SwapStormDetector

__all__ = ["HostMonitors", "MonitorsConfig", "monitors_config", "SwapStormDetector", "SwapAreaPinner",
           "DoubleFaultMonitor", "ConvergenceTracker", "History", "TickSample", "GuestSample"]

log = structlog.get_logger("hostd.monitors")


def _int(stats: Mapping[str, Any], key: str) -> int:
    v = stats.get(key, 0)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _float(stats: Mapping[str, Any], key: str) -> float:
    v = stats.get(key, 0.0)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else 0.0


class HostMonitors:
    def __init__(self, table: Mapping[str, Any] | None, mem: Any, tick_us: float) -> None:
        self.cfg = monitors_config(table)
        self.mem = mem                  # hostd.memory.HostMemory
        c = self.cfg
        self.history = History(max(c.swap_storm.window_ticks, c.pinning.window_ticks, c.convergence.step_ticks))
        self.storm = SwapStormDetector(c.swap_storm, log)
        self.pinner = SwapAreaPinner(c.pinning, mem, log)
        self.double_faults = DoubleFaultMonitor(c.double_faults, mem, self.pinner.is_pinned, log)
        self.convergence = ConvergenceTracker(c.convergence, tick_us, log)
        self.iobuf_pages_peak = 0       # host I/O-buffer frames, sampled at every disk write and tick end
        self.ram_pages: dict[int, int] = {}

    # -- guests ---------------------------------------------------------------------------

    def guest_joined(self, guest_id: int, ram_pages: int, spec: Mapping[str, Any]) -> None:
        """``spec`` is the guest's run config; ``swap_base_block``/``swap_blocks`` locate its swap area."""
        self.ram_pages[guest_id] = int(ram_pages)
        first, n = spec.get("swap_base_block"), spec.get("swap_blocks")
        if isinstance(first, int) and isinstance(n, int) and n > 0:
            self.mem.vdisk(guest_id).set_swap_area(first, n)
            self.pinner.guest_joined(guest_id, first, n)

    def guest_gone(self, guest_id: int) -> None:
        self.pinner.guest_gone(guest_id)
        self.double_faults.guest_gone(guest_id)
        self.history.forget(guest_id)
        self.ram_pages.pop(guest_id, None)

    # -- host memory's observer -------------------------------------------------------------

    def guest_pages_swapped_in(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> None:
        self.double_faults.guest_pages_swapped_in(guest_id, gpfns, tokens)

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        self.iobuf_pages_peak = max(self.iobuf_pages_peak, self.mem.pool.frames_of(FrameKind.IOBUF))
        self.double_faults.disk_written(guest_id, blocks, tokens)

    # -- the tick ---------------------------------------------------------------------------

    def end_tick(self, tick: int, vt_us: float, snap: Mapping[str, Any], stats: Mapping[int, Mapping[str, Any]],
                 targets: Mapping[int, int]) -> None:
        """``snap`` is host memory's snapshot of this tick; ``stats`` each live guest's last report."""
        per_guest = snap.get("guests", {})
        guests: dict[int, GuestSample] = {}
        for gid, s in stats.items():
            h = per_guest.get(str(gid))
            if h is None:
                continue
            known_area = self.mem.vdisk(gid).swap_area[1] > 0
            if known_area:
                swap_in = int(h.get("vdisk_swap_area_read_pages", 0))
                swap_pages = swap_in + int(h.get("vdisk_swap_area_write_pages", 0))
            else:
                swap_in = _int(s, "swap_in")
                swap_pages = swap_in + _int(s, "swap_out")
            guests[gid] = GuestSample(
                guest_id=gid, vt_us=_float(s, "vt_us") or float(vt_us), swap_pages=swap_pages, swap_in_pages=swap_in,
                major_faults=_int(s, "major_faults"), faults=_int(s, "major_faults") + _int(s, "minor_faults"),
                refs=_int(s, "refs"), pff=_float(s, "pff"), host_swap_out_pages=int(h.get("swap_out_pages", 0)),
                target_pages=int(targets.get(gid, 0)), actual_pages=int(h.get("ballooned_pages", 0)),
                working_set_pages=_int(s, "working_set_pages"),
                ram_pages=self.ram_pages.get(gid, int(h.get("guest_pages", 0))), kernel_pages=_int(s, "kernel_pages"))
        self.iobuf_pages_peak = max(self.iobuf_pages_peak, int(snap.get("iobuf_pages", 0)))
        self.history.push(TickSample(
            tick=tick, vt_us=float(vt_us), total_frames=int(snap["total_frames"]),
            free_frames=int(snap["free_frames"]), cache_pages=int(snap.get("cache_pages", 0)),
            iobuf_pages=int(snap.get("iobuf_pages", 0)), pinned_frames=int(snap.get("pinned_frames", 0)),
            swap_out_pages=int(snap.get("swap_out_pages", 0)),
            vdisk_pages=int(snap.get("vdisk_read_pages", 0)) + int(snap.get("vdisk_write_pages", 0)),
            guests=guests))
        # Double faults of this tick are judged against the pins it ran under, so drain them first.
        self.double_faults.end_tick(tick)
        self.storm.end_tick(self.history)
        self.pinner.end_tick(self.history)
        self.convergence.end_tick(self.history, targets)

    def metrics(self) -> dict[str, Any]:
        """Counters for ``run_finished`` (the summary reads them)."""
        return {"swap_storm": self.storm.metrics(), "double_faults": self.double_faults.metrics(),
                "pinning": self.pinner.metrics(), "convergence": self.convergence.metrics(),
                "iobuf_pages_peak": self.iobuf_pages_peak}
