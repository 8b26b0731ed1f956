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

from dataclasses import asdict, dataclass

import numpy as np

from .memory import Frames

__all__ = ["PagingCounters", "WorkingSetSampler", "PffMeter"]


@dataclass(slots=True)
class PagingCounters:
    refs: int = 0              # references completed
    hits: int = 0
    major_faults: int = 0      # needed disk I/O (swap-in or file read)
    minor_faults: int = 0      # no I/O: zero-fill of a fresh anonymous page, or a soft-reclaimed page taken back
    swap_in: int = 0           # pages read from guest swap
    swap_out: int = 0          # pages written to guest swap
    file_reads: int = 0        # pages read from their file
    file_writes: int = 0       # dirty page-cache pages written back to their file
    writebacks: int = 0        # evictions of a page with M=1 (= swap_out + file_writes)
    evictions: int = 0         # pages taken out of frames by the policy (faults, reclaim, balloon)
    ept_faults: int = 0        # gpfns the host had to back (each EPT fault counted per page)
    ept_fault_calls: int = 0
    invalidations: int = 0     # gpfns the host took away (TLB shootdowns)
    lost_pages: int = 0        # integrity violations: a page came back with the wrong token
    soft_reclaimed: int = 0    # pages reclaimed by ``reclaim`` (content kept until the frame is reused)
    balloon_inflated: int = 0  # frames handed to the balloon
    balloon_deflated: int = 0  # frames given back
    oom_calls: int = 0         # times the OOM hook ran
    # Who reclaimed what, and what it cost later: the seed's I/O-amplification
    # argument needs the guest's knowledge of what the host (blindly) took.
    refaults: int = 0                   # faults on pages that had been evicted by the guest before
    refault_reads: int = 0              # ... that needed a disk read (the I/O cost of having evicted them)
    refault_file_reads: int = 0         # ... of which page cache re-read from its file
    evicted_clean_file: int = 0         # evictions of clean page cache (dropped at no I/O)
    balloon_reclaimed: int = 0          # pages the guest evicted to inflate its balloon
    balloon_reclaimed_clean_file: int = 0   # ... of which clean page cache, dropped at no I/O
    host_took_pages: int = 0            # pages whose frame the host swapped out (content held)
    host_took_clean_file: int = 0       # ... of which clean page cache
    host_refaults: int = 0              # EPT faults that brought such a page back (a host swap-in)
    host_refaults_clean_file: int = 0   # ... of which clean page cache

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


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
