"""The balloon driver: a reconcile loop toward the host's ``target_pages``.

Like Linux's virtio_balloon: the host sets only the target; the driver
moves toward it one bounded batch at a time, through the guest's own
allocator (so the guest's replacement policy decides what goes), and
reports ``actual_pages``. Partial progress is normal: when the allocator
has nothing left to give ("out of puff") the driver backs off for a few
ticks and tries again. On deflate it tells the host *before* the pages are
reused (virtio's MUST_TELL_HOST). On guest OOM it deflates on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

__all__ = ["BalloonDriver", "BalloonCounters"]

log = structlog.get_logger("guestd.balloon")


@dataclass
class BalloonCounters:
    inflated_pages: int = 0       # handed to the host, cumulative
    deflated_pages: int = 0       # taken back, cumulative
    oom_deflated_pages: int = 0   # of which deflated on OOM
    inflate_calls: int = 0
    deflate_calls: int = 0
    out_of_puff: int = 0          # allocator had nothing to give


@dataclass
class BalloonDriver:
    kernel: Any                    # guestd.kernel.GuestKernel
    hypervisor: Any                # guestd.hypervisor.Hypervisor
    batch_pages: int = 256         # per round, as virtio_balloon's fill_balloon (VIRTIO_BALLOON_ARRAY_PFNS_MAX)
    max_pages_per_tick: int = 262_144
    backoff_ticks: int = 5         # after an allocator failure
    target_pages: int = 0          # set by the host
    actual_pages: int = 0          # in the balloon now
    counters: BalloonCounters = field(default_factory=BalloonCounters)
    _backoff_left: int = 0

    def set_target(self, target_pages: int) -> None:
        if target_pages != self.target_pages:
            log.info("balloon_target_received", target_pages=target_pages, actual_pages=self.actual_pages)
        self.target_pages = target_pages
        self._backoff_left = 0  # a new target deserves a fresh try

    async def reconcile(self) -> int:
        """Move toward the target by at most ``max_pages_per_tick``; return pages moved."""
        if self._backoff_left > 0 and self.target_pages > self.actual_pages:
            self._backoff_left -= 1
            return 0
        moved = 0
        while moved < self.max_pages_per_tick:
            diff = self.target_pages - self.actual_pages
            if diff == 0:
                break
            n = min(abs(diff), self.batch_pages, self.max_pages_per_tick - moved)
            if diff > 0:
                got = await self._fill(n)
                moved += got
                if got < n:
                    self.counters.out_of_puff += 1
                    self._backoff_left = self.backoff_ticks
                    break
            else:
                moved += await self._leak(n)
        return moved

    async def _fill(self, n: int) -> int:
        k = self.kernel
        gpfns = await k.balloon_alloc(n)
        if len(gpfns) == 0:
            return 0
        k.vt_us = max(k.vt_us, await self.hypervisor.balloon_inflate(np.asarray(gpfns, dtype=np.uint64), k.vt_us))
        self.actual_pages += len(gpfns)
        self.counters.inflated_pages += len(gpfns)
        self.counters.inflate_calls += 1
        return len(gpfns)

    async def _leak(self, n: int) -> int:
        k = self.kernel
        gpfns = k.balloon_pick(n)
        if len(gpfns) == 0:
            return 0
        # MUST_TELL_HOST: the host learns the pages are back before the guest reuses them.
        k.vt_us = max(k.vt_us, await self.hypervisor.balloon_deflate(np.asarray(gpfns, dtype=np.uint64), k.vt_us))
        k.balloon_release(gpfns)
        self.actual_pages -= len(gpfns)
        self.counters.deflated_pages += len(gpfns)
        self.counters.deflate_calls += 1
        return len(gpfns)

    async def deflate_on_oom(self, n_needed: int) -> int:
        """The guest would fail an allocation: give back up to ``n_needed`` pages."""
        freed = await self._leak(min(max(n_needed, 1), self.actual_pages))
        if freed:
            self.counters.oom_deflated_pages += freed
            # Lower the target too, or the next reconcile would inflate straight back into OOM.
            self.target_pages = min(self.target_pages, self.actual_pages)
            log.warning("balloon_deflated_on_oom", pages=freed, actual_pages=self.actual_pages)
        return freed

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {"balloon_target_pages": self.target_pages, "balloon_actual_pages": self.actual_pages,
                "balloon_inflated_pages": c.inflated_pages, "balloon_deflated_pages": c.deflated_pages,
                "balloon_oom_deflated_pages": c.oom_deflated_pages, "balloon_out_of_puff": c.out_of_puff}
