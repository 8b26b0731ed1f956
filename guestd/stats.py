"""What the guest reports: cumulative counters, the working-set estimate and PFF.

``PagingCounters`` are plain cumulative counts. ``WorkingSetSampler`` is
ESX's idle-page sampling turned inward: each period it draws a fixed number
of random resident frames from the seeded generator, clears their sampler
bit (``Frames.touched``, separate from R so the policy never notices) and,
at the end of the period, the fraction found touched times the resident
pages is the estimate. ``PffMeter`` is page faults per virtual second,
smoothed with an exponentially weighted moving average over periods.
"""
from __future__ import annotations

import operator

import numpy as np

from .memory import Frames

__all__ = ["PagingCounters", "BackgroundCounters", "WorkingSetSampler", "PffMeter"]


class PagingCounters:
    """The guest kernel's cumulative counters, held in one int64 array.

    The compiled paging core bumps them in place (``array``, in the order
    of ``FIELDS``); Python reads and writes them as attributes.
    """

    __slots__ = ("array",)

    FIELDS: tuple[str, ...] = (
        "refs",                          # references completed
        "hits",
        "major_faults",                  # needed disk I/O (swap-in or file read)
        "minor_faults",                  # no I/O: zero-fill of a fresh anonymous page, or a soft-reclaimed page taken back
        "swap_in",                       # pages read from guest swap
        "swap_out",                      # pages written to guest swap
        "file_reads",                    # pages read from their file
        "file_writes",                   # dirty page-cache pages written back to their file
        "writebacks",                    # evictions of a page with M=1 (= swap_out + file_writes)
        "evictions",                     # pages taken out of frames by the policy (faults, reclaim, balloon)
        "ept_faults",                    # gpfns the host had to back (each EPT fault counted per page)
        "ept_fault_calls",
        "invalidations",                 # gpfns the host took away (TLB shootdowns)
        "lost_pages",                    # integrity violations: a page came back with the wrong token
        "soft_reclaimed",                # pages reclaimed by ``reclaim`` (content kept until the frame is reused)
        "balloon_inflated",              # frames handed to the balloon
        "balloon_deflated",              # frames given back
        "oom_calls",                     # times the OOM hook ran
        "refaults",                      # faults on pages that had been evicted by the guest before
        "refault_reads",                 # ... that needed a disk read (the I/O cost of having evicted them)
        "refault_file_reads",            # ... of which page cache re-read from its file
        "evicted_clean_file",            # evictions of clean page cache (dropped at no I/O)
        "balloon_reclaimed",             # pages the guest evicted to inflate its balloon
        "balloon_reclaimed_clean_file",  # ... of which clean page cache, dropped at no I/O
        "host_took_pages",               # pages whose frame the host swapped out (content held)
        "host_took_clean_file",          # ... of which clean page cache
        "host_refaults",                 # EPT faults that brought such a page back (a host swap-in)
        "host_refaults_clean_file",      # ... of which clean page cache
        "double_paging_pages",           # dirty pages the guest paged out after EPT-faulting them back first
        "ept_fresh_pages",               # gpfns EPT-faulted with the fresh bit (no content to restore)
        "flusher_writes",                # dirty page-cache pages the background flusher wrote (not waited for)
        "flusher_cleaned",               # ... found still unchanged when their write completed: now clean
    )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, **values: int) -> None:
        unknown = sorted(set(values) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"PagingCounters: unknown counter(s) {', '.join(unknown)}")
        self.array = np.zeros(len(self.FIELDS), np.int64)
        for name, value in values.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.FIELDS, self.array.tolist()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PagingCounters) and bool(np.array_equal(self.array, other.array))

    def __repr__(self) -> str:
        return "PagingCounters(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


def _counter(index: int) -> property:
    def get(self: PagingCounters) -> int:
        return int(self.array[index])

    def set(self: PagingCounters, value: int) -> None:
        self.array[index] = value

    return property(get, set)


for _i, _name in enumerate(PagingCounters.FIELDS):
    setattr(PagingCounters, _name, _counter(_i))
del _i, _name


class BackgroundCounters:
    """Counters of the work the kernel does beside the compiled core: kswapd, readahead, overwrites.

    Kept apart from ``PagingCounters``, whose layout the compiled core
    shares; all cumulative.
    """

    FIELDS: tuple[str, ...] = (
        "kswapd_wakeups",          # times free memory fell below the low watermark with kswapd asleep
        "pgscan_kswapd",           # victims kswapd's passes took from the policy (Linux's pgscan_kswapd)
        "pgsteal_kswapd",          # ... reclaimed (clean: soft-reclaimed at no I/O; Linux's pgsteal_kswapd)
        "kswapd_writes",           # dirty victims kswapd started writing back (not waited for), reclaimed once clean
        "kswapd_cleaned",          # ... found unchanged when their write completed: now clean
        "readahead_requests",      # disk reads that carried pages read ahead
        "readahead_async",         # ... of them started by the readahead mark, the vCPU not waiting
        "readahead_pages",         # pages read ahead (beyond the page the fault needed)
        "readahead_hits",          # read-ahead pages later used (taken back at a minor fault, or waited for)
        "readahead_wasted",        # read-ahead pages dropped or never placed without having been used
        "readahead_waited",        # faults that waited for a page still in an asynchronous readahead (a
                                   # hit; the fault also counts in file_reads, the read in readahead_pages)
        "overwrite_reads_avoided",  # write faults on a page in guest swap that store all of it: no swap-in
    )

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.FIELDS, self.values()))

    def values(self) -> list[int]:
        """The counters in ``FIELDS`` order (read at every tick end)."""
        return list(map(int, _background_getter(self)))


_background_getter = operator.attrgetter(*BackgroundCounters.FIELDS)


class WorkingSetSampler:
    """Estimate the active pages by sampling, as ESX does (Waldspurger, OSDI 2002)."""

    def __init__(self, sample_pages: int, rng: np.random.Generator) -> None:
        self.sample_pages = sample_pages
        self.rng = rng
        self.sample = np.zeros(0, np.int64)
        self.estimate_pages = 0
        self.last_fraction = 0.0

    def end_period(self, frames: Frames) -> int:
        """Close the period: estimate from the current sample, then draw the next one."""
        resident = np.flatnonzero(frames.resident)
        if self.sample.size:
            still = self.sample[frames.resident[self.sample]]   # frames that left the pool do not count
            if still.size:
                self.last_fraction = float(frames.touched[still].mean())
                self.estimate_pages = int(round(self.last_fraction * resident.size))
        k = min(self.sample_pages, resident.size)
        self.sample = self.rng.choice(resident, size=k, replace=False) if k else np.zeros(0, np.int64)
        frames.touched[self.sample] = False
        return self.estimate_pages


class PffMeter:
    """Faults per virtual second over the last period, smoothed (EWMA with weight ``alpha``)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.pff = 0.0
        self.last_rate = 0.0
        self._faults = 0
        self._vt_us = 0.0
        self._primed = False

    def end_period(self, faults_total: int, vt_us: float) -> float:
        dt = vt_us - self._vt_us
        if dt > 0:
            self.last_rate = (faults_total - self._faults) * 1e6 / dt
            self.pff = self.last_rate if not self._primed else self.alpha * self.last_rate + (1 - self.alpha) * self.pff
            self._primed = True
        self._faults = faults_total
        self._vt_us = vt_us
        return self.pff
