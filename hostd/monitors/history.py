"""The history monitor: it records each tick's sample in the window the other monitors read.

It runs first in every tick (``record_tick``), so the window holds the
tick before any monitor judges it (``window.History``), and it keeps as
many ticks as the longest window any monitor reads. It also follows the
host's largest I/O-buffer use, sampled at every disk write and tick end.
It has no table of its own. In summary.json, under ``host``:
``io_buffer_pages_peak`` and ``cache_pages_peak``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from .._books import stat_numbers
from ..framepool import FrameKind
from .base import MonitorBase, MonitorSpec, SummaryKeys, TickContext
from .window import GuestSample, History, TickSample

__all__ = ["HistoryMonitor", "SPEC"]


def _int(stats: Mapping[str, Any], key: str) -> int:
    v = stats.get(key, 0)
    if type(v) is int:   # the common case (the machine sanitised the stats), per guest and key each tick
        return v
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _float(stats: Mapping[str, Any], key: str) -> float:
    v = stats.get(key, 0.0)
    # math, not numpy: a numpy call on one number costs a microsecond, and this runs per guest and key each tick
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0.0


# What a guest's sample reads from its stats, and how (``stat_numbers``: i _int, f _float, o _float or None).
_SAMPLE_KEYS = ("vt_us", "major_faults", "minor_faults", "refs", "pff", "working_set_pages", "kernel_pages",
                "psi_some_us")
_SAMPLE_KINDS = "fiiifiio"
_SWAP_KEYS = ("swap_in", "swap_out")


def _numbers(stats: Mapping[str, Any], keys: tuple[str, ...], kinds: str) -> tuple[Any, ...]:
    """``keys``' values read as ``kinds`` says: compiled for a dict (every sanitised report), else in Python."""
    if type(stats) is dict:
        return stat_numbers(stats, keys, kinds)
    return tuple(_int(stats, k) if kind == "i" else _float(stats, k) if kind == "f" or k in stats else None
                 for k, kind in zip(keys, kinds))


class HistoryMonitor(MonitorBase):
    def __init__(self, keep_ticks: int, mem: Any) -> None:
        self.window = History(keep_ticks)
        self.mem = mem                  # hostd.memory.HostMemory
        self.ram_pages: dict[int, int] = {}
        self.iobuf_pages_peak = 0       # host I/O-buffer frames, sampled at every disk write and tick end
        self._free_low = 1 << 62        # fewest free frames seen this tick (disk writes, host swap-ins)

    def guest_joined(self, guest_id: int, ram_pages: int, spec: Mapping[str, Any]) -> None:
        self.ram_pages[guest_id] = int(ram_pages)

    def guest_gone(self, guest_id: int) -> None:
        self.window.forget(guest_id)
        self.ram_pages.pop(guest_id, None)

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        self.iobuf_pages_peak = max(self.iobuf_pages_peak, self.mem.pool.frames_of(FrameKind.IOBUF))
        self._free_low = min(self._free_low, self.mem.pool.free_frames)

    def guest_pages_swapped_in(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> None:
        # A host swap-in happens under pressure: the tick's low point of free memory is near it.
        self._free_low = min(self._free_low, self.mem.pool.free_frames)

    def record_tick(self, tick: TickContext) -> None:
        """The tick's sample: host memory's gauges and each live guest's last report.

        A guest's gauges are read from host memory itself, not from the
        snapshot's per-guest rows: the machine builds those only in the ticks it logs.
        """
        snap, vt_us, targets = tick.snap, tick.vt_us, tick.targets
        mem = self.mem
        live = set(mem.guest_ids())
        guests: dict[int, GuestSample] = {}
        for gid, s in tick.stats.items():
            if gid not in live:
                continue
            vdisk = mem.vdisk(gid)
            if vdisk.swap_area[1] > 0:
                swap_in = int(vdisk.counters.swap_area_read_pages)
                swap_pages = swap_in + int(vdisk.counters.swap_area_write_pages)
            else:
                swap_in, swap_out = _numbers(s, _SWAP_KEYS, "ii")
                swap_pages = swap_in + swap_out
            ram_pages = self.ram_pages.get(gid)
            g_vt_us, major, minor, refs, pff, ws_pages, kernel_pages, psi_some_us = \
                _numbers(s, _SAMPLE_KEYS, _SAMPLE_KINDS)
            guests[gid] = GuestSample(
                guest_id=gid, vt_us=g_vt_us or float(vt_us), swap_pages=swap_pages, swap_in_pages=swap_in,
                major_faults=major, faults=major + minor, refs=refs, pff=pff,
                host_swap_out_pages=int(mem.guest_counters(gid).swap_out_pages),
                target_pages=int(targets.get(gid, 0)), actual_pages=int(mem.balloon_pages(gid)),
                working_set_pages=ws_pages,
                ram_pages=ram_pages if ram_pages is not None else int(mem.p2m(gid).guest_pages),
                kernel_pages=kernel_pages, psi_some_us=psi_some_us)
        self.iobuf_pages_peak = max(self.iobuf_pages_peak, int(snap.get("iobuf_pages", 0)))
        self.window.push(TickSample(
            tick=tick.tick, vt_us=float(vt_us), total_frames=int(snap["total_frames"]),
            free_frames=int(snap["free_frames"]), cache_pages=int(snap.get("cache_pages", 0)),
            iobuf_pages=int(snap.get("iobuf_pages", 0)), pinned_frames=int(snap.get("pinned_frames", 0)),
            swap_out_pages=int(snap.get("swap_out_pages", 0)),
            vdisk_pages=int(snap.get("vdisk_read_pages", 0)) + int(snap.get("vdisk_write_pages", 0)),
            guests=guests, free_frames_low=self._free_low if self._free_low < (1 << 62) else None,
            memory_state=snap["memory_state"] if isinstance(snap.get("memory_state"), str) else None))
        self._free_low = 1 << 62

    def finished_keys(self) -> dict[str, Any]:
        return {"iobuf_pages_peak": self.iobuf_pages_peak}


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
    make=lambda cfg, ctx: HistoryMonitor(ctx.history_ticks, ctx.mem),
    summarize=summarize,
    table_fragment=lambda v: f"io_buffer_pages_peak={v.get('host', {}).get('io_buffer_pages_peak', 0)}",
)
