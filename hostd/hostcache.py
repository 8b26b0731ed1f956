"""The host's page cache for the virtual disks: one budget for all, its flusher, its trimming.

Each virtual disk (``hostd.vdisk``) keeps its own cluster cache; this
module holds what is host-wide, and runs only at tick boundaries, when
every guest is parked, in guest-id order:

1. **The flusher** (Linux's semantics, ``mm/page-writeback.c``): every
   ``dirty_writeback_us`` it writes back pages dirty for longer than
   ``dirty_expire_us`` (Linux: ``dirty_writeback_centisecs`` = 5 s,
   ``dirty_expire_centisecs`` = 30 s); at every boundary a disk whose dirty
   pages exceed ``dirty_background_pct`` % of its allowance is written back
   below it (``dirty_background_ratio`` = 10). A writer above
   ``dirty_pct`` % of its allowance (``dirty_ratio`` = 20) writes its own
   back before its write completes (``VirtualDisk.write``). Linux takes the
   ratios of the memory available for the page cache; here that is the
   cache's budget, shared as allowances.
2. **The budget** ``[host] cache_max_mib``: one host setting, whatever the
   number of guests. Over it, the least recently used clean clusters of all
   disks are dropped (by the virtual time of their last use, ties by guest
   id then cluster), down to 1/16 below it so that the next tick has room;
   dirty ones are written back first if clean ones do not suffice.
3. **Host pressure**: when the host wants frames back (free frames below
   its refill level), clean clusters are dropped first, least recently used
   first: a dropped clean page costs one read if used again, a host-swapped
   one a write and a read.
4. **Allowances** for the next tick: each disk may grow by a part of what
   is left of the budget, in proportion to its cache fills in the tick that
   ended (+1, so an idle disk gets some). Within a tick a disk beyond its
   allowance makes room in its own cache only (``VirtualDisk.fit_allowance``).

Pinned clusters (the pinning monitor's cure) are never dropped, so pins
may hold the cache above its budget; the pinned pages are reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .vdisk import CACHE_MODES, VirtualDisk

__all__ = ["CacheConfig", "HostCache", "DIRTY_EXPIRE_MS_DEFAULT", "DIRTY_WRITEBACK_MS_DEFAULT",
           "DIRTY_BACKGROUND_PCT_DEFAULT", "DIRTY_PCT_DEFAULT", "CACHE_MODE_DEFAULT"]

DIRTY_EXPIRE_MS_DEFAULT = 30_000.0     # vm.dirty_expire_centisecs = 3000
DIRTY_WRITEBACK_MS_DEFAULT = 5_000.0   # vm.dirty_writeback_centisecs = 500
DIRTY_BACKGROUND_PCT_DEFAULT = 10.0    # vm.dirty_background_ratio = 10
DIRTY_PCT_DEFAULT = 20.0               # vm.dirty_ratio = 20
# QEMU's own default is writeback; the lab's is writethrough (QEMU's cache=writethrough: the host page
# cache with O_DSYNC), because then a guest's write-backs and swap-outs cost a device write, as a
# guest under memory pressure pays on a host that does not hide its writes; with writeback the
# host's RAM absorbs a thrashing guest's swap-outs up to the dirty limit, which erases the cost the
# pathology scenarios measure. Scenarios that study the host cache set it (nested-swap: writeback).
CACHE_MODE_DEFAULT = "writethrough"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_pages: int
    mode: str = CACHE_MODE_DEFAULT
    dirty_expire_us: float = DIRTY_EXPIRE_MS_DEFAULT * 1000
    dirty_writeback_us: float = DIRTY_WRITEBACK_MS_DEFAULT * 1000
    dirty_background_pct: float = DIRTY_BACKGROUND_PCT_DEFAULT
    dirty_pct: float = DIRTY_PCT_DEFAULT

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ValueError(f"cache mode {self.mode!r} is not one of {list(CACHE_MODES)}")
        if self.max_pages < 0:
            raise ValueError(f"cache budget must be >= 0 pages, got {self.max_pages}")


@dataclass(slots=True)
class CacheCounters:
    budget_dropped_pages: int = 0      # clean pages dropped to keep the budget
    pressure_dropped_pages: int = 0    # clean pages dropped because the host wanted frames
    flushed_pages: int = 0             # dirty pages the flusher wrote back
    budget_written_back_pages: int = 0  # dirty pages written back because clean ones did not cover the budget


class HostCache:
    """The host-wide part of the disk cache (see the module docstring)."""

    def __init__(self, cfg: CacheConfig, expected_guests: int = 1) -> None:
        self.cfg = cfg
        self.expected_guests = max(1, int(expected_guests))
        self.counters = CacheCounters()
        self._next_writeback_us = cfg.dirty_writeback_us

    def initial_allowance(self, disks: Mapping[int, VirtualDisk]) -> int:
        """A new disk's allowance until the next boundary: an equal part of the budget, of what is not given."""
        given = sum(vd.allowance_pages for vd in disks.values())
        return max(0, min(self.cfg.max_pages // max(self.expected_guests, len(disks) + 1),
                          self.cfg.max_pages - given))

    def set_limits(self, vd: VirtualDisk, allowance_pages: int) -> None:
        vd.allowance_pages = int(allowance_pages)
        vd.dirty_limit_pages = max(1, int(allowance_pages * self.cfg.dirty_pct / 100))
        vd.dirty_background_pages = int(allowance_pages * self.cfg.dirty_background_pct / 100)

    def boundary(self, disks: Mapping[int, VirtualDisk], vt_us: float, want_frames: int) -> int:
        """Flusher, budget, host pressure, allowances (in this order); returns clean pages dropped for pressure."""
        ids = sorted(disks)
        cfg = self.cfg
        expired_due = vt_us >= self._next_writeback_us
        if expired_due:
            self._next_writeback_us = vt_us + cfg.dirty_writeback_us
        for gid in ids:
            vd = disks[gid]
            background = int(vd.allowance_pages * cfg.dirty_background_pct / 100)
            self.counters.flushed_pages += vd.flush(vt_us, cfg.dirty_expire_us if expired_due else float("inf"),
                                                    background)
        total = sum(disks[g].cached_pages for g in ids)
        over = total - cfg.max_pages
        if over > 0:
            over += cfg.max_pages // 16
            got = self._drop_lru(disks, ids, over)
            self.counters.budget_dropped_pages += got
            for gid in ids:   # dirty beyond the budget: written back, then dropped, oldest disks' first
                if got >= over:
                    break
                before = disks[gid].cached_pages
                dirty = disks[gid].dirty_pages
                disks[gid].release_clusters(over - got, vt_us, dirty_too=True)
                freed = before - disks[gid].cached_pages
                self.counters.budget_written_back_pages += min(dirty, freed)
                got += freed
        pressure = self._drop_lru(disks, ids, want_frames) if want_frames > 0 else 0
        self.counters.pressure_dropped_pages += pressure
        self._allow(disks, ids)
        return pressure

    def _drop_lru(self, disks: Mapping[int, VirtualDisk], ids: list[int], want: int) -> int:
        """Drop clean clusters of all disks, least recently used first, until ``want`` pages are freed."""
        if want <= 0:
            return 0
        parts = [(gid, *disks[gid].droppable_clusters()) for gid in ids]
        parts = [p for p in parts if p[1].size]
        if not parts:
            return 0
        gids = np.concatenate([np.full(p[1].size, p[0], np.int64) for p in parts])
        clusters = np.concatenate([p[1] for p in parts])
        stamps = np.concatenate([p[2] for p in parts])
        pages = np.concatenate([p[3] for p in parts])
        order = np.lexsort((clusters, gids, stamps))
        upto = int(np.searchsorted(np.cumsum(pages[order]), want)) + 1
        chosen = order[:upto]
        freed = 0
        for gid in ids:
            mine = clusters[chosen[gids[chosen] == gid]]
            if mine.size:
                freed += disks[gid]._drop_clusters(np.sort(mine))
        return freed

    def _allow(self, disks: Mapping[int, VirtualDisk], ids: list[int]) -> None:
        if not ids:
            return
        total = sum(disks[g].cached_pages for g in ids)
        headroom = max(0, self.cfg.max_pages - total)
        # plain ints: a handful of guests, at every boundary
        weights = [disks[g].fill_pages_tick + 1 for g in ids]
        total_weight = sum(weights)
        share = [headroom * w // total_weight for w in weights]
        for i in range(headroom - sum(share)):        # the remainder (fewer than the guests), to the lowest ids
            share[i] += 1
        for gid, extra in zip(ids, share):
            vd = disks[gid]
            self.set_limits(vd, vd.cached_pages + extra)
            vd.fill_pages_tick = 0

    def metrics(self) -> dict[str, int]:
        c = self.counters
        return {"cache_budget_pages": self.cfg.max_pages,
                "cache_budget_dropped_pages": c.budget_dropped_pages,
                "cache_pressure_dropped_pages": c.pressure_dropped_pages,
                "cache_flushed_pages": c.flushed_pages,
                "cache_budget_written_back_pages": c.budget_written_back_pages}
