"""What the monitors see each tick, and rates over a window of ticks.

One ``TickSample`` per tick: the host's gauges and cumulative counters, and
one ``GuestSample`` per live guest (its latest stats, as it reported them,
and what the host counted for it). Rates of a guest are per *guest* virtual
second: a thrashing guest's clock runs ahead of the host's within a batch
of references, so its own clock is the one its faults happened on. Rates
of the host are per host virtual second. The history monitor
(``history.py``) fills it; the others read it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["GuestSample", "TickSample", "History"]


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
    psi_some_us: float | None = None   # cumulative virtual µs with some task stalled on memory (PSI), if reported


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
    memory_state: str | None = None   # the host's memory state (high/clear/soft/hard/low) when it logs one
    free_frames_low: int | None = None  # the fewest free frames seen during the tick (at disk writes, swap-ins)

    @property
    def free_frames_min(self) -> int:
        """Free frames at their lowest in the tick: the in-tick low when sampled, else the tick end's."""
        return self.free_frames if self.free_frames_low is None else min(self.free_frames, self.free_frames_low)

    @property
    def io_pages(self) -> int:
        """Host frames holding disk I/O: buffers in flight and the disk cache."""
        return self.cache_pages + self.iobuf_pages

    @property
    def demand_pages(self) -> int:
        """Host frames in use."""
        return self.total_frames - self.free_frames


class History:
    """The last ``keep_ticks`` + 1 samples."""

    def __init__(self, keep_ticks: int) -> None:
        self.samples: deque[TickSample] = deque(maxlen=max(1, keep_ticks) + 1)
        self._last_rate: dict[tuple[int, str], float] = {}
        # windows taken since the last push, by length: the detectors ask for the same one per guest and key
        self._windows: dict[int, tuple[TickSample, ...]] = {}
        # per (window length, guest): its first and last sample in that window (``ends``), for the same reason
        self._ends: dict[tuple[int, int], tuple[GuestSample, GuestSample] | None] = {}

    def push(self, sample: TickSample) -> None:
        self.samples.append(sample)
        self._windows.clear()
        self._ends.clear()

    @property
    def now(self) -> TickSample:
        return self.samples[-1]

    def _window(self, ticks: int) -> Sequence[TickSample]:
        n = min(len(self.samples), ticks + 1)
        win = self._windows.get(n)
        if win is None or (win and win[-1] is not self.samples[-1]):   # or appended to the deque directly
            if win is not None:
                self._windows.clear()
                self._ends.clear()
            win = self._windows[n] = tuple(self.samples)[-n:]
        return win

    def ends(self, guest_id: int, ticks: int) -> tuple[GuestSample, GuestSample] | None:
        """The guest's first and last sample in the window, from two different ticks; None without two."""
        win = self._window(ticks)
        key = (len(win), guest_id)
        try:
            return self._ends[key]
        except KeyError:
            pass
        first, last = win[0].guests.get(guest_id), win[-1].guests.get(guest_id)
        if first is not None and last is not None and len(win) > 1:   # in the whole window: every guest, mostly
            out: tuple[GuestSample, GuestSample] | None = (first, last)
            self._ends[key] = out
            return out
        i = next((i for i, s in enumerate(win) if guest_id in s.guests), len(win))
        j = next((j for j in range(len(win) - 1, i, -1) if guest_id in win[j].guests), None)
        out = None if j is None else (win[i].guests[guest_id], win[j].guests[guest_id])
        self._ends[key] = out
        return out

    def guest_rate(self, guest_id: int, key: str, ticks: int) -> float:
        """Growth of a guest's cumulative ``key`` per guest virtual second over the window.

        When its clock did not move in the window (it ran ahead and idles
        until the host catches up) the last rate measured stands.
        """
        return self.guest_rates(guest_id, (key,), ticks)[0]

    def guest_rates(self, guest_id: int, keys: Sequence[str], ticks: int) -> list[float]:
        """``guest_rate`` of each of ``keys``, over one lookup of the guest's samples."""
        ends = self.ends(guest_id, ticks)
        if ends is not None:
            first, last = ends
            dt = last.vt_us - first.vt_us
            if dt > 0:
                out = []
                for key in keys:
                    rate = (getattr(last, key) - getattr(first, key)) * 1e6 / dt
                    self._last_rate[(guest_id, key)] = rate
                    out.append(rate)
                return out
        return [self._last_rate.get((guest_id, key), 0.0) for key in keys]

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
