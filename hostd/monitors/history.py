"""What the monitors see each tick, and rates over a window of ticks.

One ``TickSample`` per tick: the host's gauges and cumulative counters, and
one ``GuestSample`` per live guest (its latest stats, as it reported them,
and what the host counted for it). Rates of a guest are per *guest* virtual
second: a thrashing guest's clock runs ahead of the host's within a batch
of references, so its own clock is the one its faults happened on. Rates
of the host are per host virtual second.

As a monitor, ``History`` records each tick's sample (before any other
monitor judges the tick) and the host's largest I/O-buffer use, sampled at
every disk write and tick end. It has no table of its own; it keeps as
many ticks as the longest window any monitor reads. In summary.json, under
``host``: ``io_buffer_pages_peak`` and ``cache_pages_peak``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..framepool import FrameKind
from .base import MonitorBase, MonitorSpec, SummaryKeys, TickContext

__all__ = ["GuestSample", "TickSample", "History", "SPEC"]


def _int(stats: Mapping[str, Any], key: str) -> int:
    v = stats.get(key, 0)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _float(stats: Mapping[str, Any], key: str) -> float:
    v = stats.get(key, 0.0)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else 0.0


@dataclass(frozen=True, slots=True)
class GuestSample:
    guest_id: int
    vt_us: float                  # the guest's virtual clock at its last report
    swap_pages: int               # cumulative swap I/O pages (host-observed on its swap area, or its own count)
    swap_in_pages: int            # ... of which reads: pages it had to fetch back (the thrashing part)
    major_faults: int             # cumulative, as the guest reported
    faults: int                   # cumulative major + minor
    refs: int                     # cumulative references
    pff: float                    # the guest's smoothed page-fault frequency (faults per virtual second)
    host_swap_out_pages: int      # cumulative: its pages the host swapped out
    target_pages: int             # balloon target the host set
    actual_pages: int             # balloon size the host holds
    working_set_pages: int        # the guest's estimate
    ram_pages: int
    kernel_pages: int = 0         # frames its kernel holds (never workload memory)


@dataclass(frozen=True, slots=True)
class TickSample:
    tick: int
    vt_us: float
    total_frames: int
    free_frames: int
    cache_pages: int
    iobuf_pages: int
    pinned_frames: int
    swap_out_pages: int           # cumulative host swap-outs (guest pages and cache pages)
    vdisk_pages: int              # cumulative pages read + written by every virtual disk
    guests: Mapping[int, GuestSample] = field(default_factory=dict)

    @property
    def io_pages(self) -> int:
        """Host frames holding disk I/O: buffers in flight and the disk cache."""
        return self.cache_pages + self.iobuf_pages

    @property
    def demand_pages(self) -> int:
        """Host frames in use."""
        return self.total_frames - self.free_frames


class History(MonitorBase):
    """The last ``keep_ticks`` + 1 samples (``mem``: host memory, when it records them itself)."""

    def __init__(self, keep_ticks: int, mem: Any = None) -> None:
        self.samples: deque[TickSample] = deque(maxlen=max(1, keep_ticks) + 1)
        self._last_rate: dict[tuple[int, str], float] = {}
        self.mem = mem                  # hostd.memory.HostMemory
        self.ram_pages: dict[int, int] = {}
        self.iobuf_pages_peak = 0       # host I/O-buffer frames, sampled at every disk write and tick end

    # -- as a monitor -----------------------------------------------------------------------

    def guest_joined(self, guest_id: int, ram_pages: int, spec: Mapping[str, Any]) -> None:
        self.ram_pages[guest_id] = int(ram_pages)

    def guest_gone(self, guest_id: int) -> None:
        self.forget(guest_id)
        self.ram_pages.pop(guest_id, None)

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        self.iobuf_pages_peak = max(self.iobuf_pages_peak, self.mem.pool.frames_of(FrameKind.IOBUF))

    def record_tick(self, tick: TickContext) -> None:
        """The tick's sample: host memory's snapshot and each live guest's last report."""
        snap, vt_us, targets = tick.snap, tick.vt_us, tick.targets
        per_guest = snap.get("guests", {})
        guests: dict[int, GuestSample] = {}
        for gid, s in tick.stats.items():
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
        self.push(TickSample(
            tick=tick.tick, vt_us=float(vt_us), total_frames=int(snap["total_frames"]),
            free_frames=int(snap["free_frames"]), cache_pages=int(snap.get("cache_pages", 0)),
            iobuf_pages=int(snap.get("iobuf_pages", 0)), pinned_frames=int(snap.get("pinned_frames", 0)),
            swap_out_pages=int(snap.get("swap_out_pages", 0)),
            vdisk_pages=int(snap.get("vdisk_read_pages", 0)) + int(snap.get("vdisk_write_pages", 0)),
            guests=guests))

    def finished_keys(self) -> dict[str, Any]:
        return {"iobuf_pages_peak": self.iobuf_pages_peak}

    # -- the window ---------------------------------------------------------------------------

    def push(self, sample: TickSample) -> None:
        self.samples.append(sample)

    @property
    def now(self) -> TickSample:
        return self.samples[-1]

    def _window(self, ticks: int) -> list[TickSample]:
        n = min(len(self.samples), ticks + 1)
        return list(self.samples)[-n:]

    def guest_rate(self, guest_id: int, key: str, ticks: int) -> float:
        """Growth of a guest's cumulative ``key`` per guest virtual second over the window.

        When its clock did not move in the window (it ran ahead and idles
        until the host catches up) the last rate measured stands.
        """
        win = [s.guests[guest_id] for s in self._window(ticks) if guest_id in s.guests]
        if len(win) >= 2:
            dt = win[-1].vt_us - win[0].vt_us
            if dt > 0:
                rate = (getattr(win[-1], key) - getattr(win[0], key)) * 1e6 / dt
                self._last_rate[(guest_id, key)] = rate
                return rate
        return self._last_rate.get((guest_id, key), 0.0)

    def host_delta(self, key: str, ticks: int) -> float:
        win = self._window(ticks)
        return float(getattr(win[-1], key) - getattr(win[0], key)) if len(win) >= 2 else 0.0

    def host_rate(self, key: str, ticks: int) -> float:
        """Growth of a host counter per host virtual second over the window."""
        win = self._window(ticks)
        if len(win) < 2 or win[-1].vt_us <= win[0].vt_us:
            return 0.0
        return (getattr(win[-1], key) - getattr(win[0], key)) * 1e6 / (win[-1].vt_us - win[0].vt_us)

    def host_max(self, key: str, ticks: int) -> float:
        return float(max(getattr(s, key) for s in self._window(ticks)))

    def host_min(self, key: str, ticks: int) -> float:
        return float(min(getattr(s, key) for s in self._window(ticks)))

    def forget(self, guest_id: int) -> None:
        for k in [k for k in self._last_rate if k[0] == guest_id]:
            del self._last_rate[k]


# --- the analysis ---------------------------------------------------------------------------------


def summarize(monitors: Mapping[str, Any], host_events: Sequence[Mapping[str, Any]],
              finished: Mapping[str, Any]) -> SummaryKeys:
    peaks = finished.get("peaks") or {}
    return SummaryKeys(host={
        "io_buffer_pages_peak": max(int(monitors.get("iobuf_pages_peak", 0)), int(peaks.get("iobuf_pages", 0))),
        "cache_pages_peak": int(peaks.get("cache_pages", 0)),
    })


SPEC = MonitorSpec(
    name="history",
    make=lambda cfg, ctx: History(ctx.history_ticks, ctx.mem),
    summarize=summarize,
    table_fragment=lambda v: f"io_buffer_pages_peak={v.get('host', {}).get('io_buffer_pages_peak', 0)}",
)
