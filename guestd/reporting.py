"""Free page reporting: the guest tells the host which of its free frames it may discard.

virtio-balloon's ``VIRTIO_BALLOON_F_REPORTING`` over Linux's page
reporting (mm/page_reporting.c): when free memory of order
``page_reporting_order`` (``pageblock_order`` by default: 2 MiB = 512
pages on x86-64) or more accumulates, the reporter is scheduled
``PAGE_REPORTING_DELAY`` (2 s) later; it then isolates free blocks of at
least that order, hands them to the device in batches of
``PAGE_REPORTING_CAPACITY`` (32) scatterlist entries, and marks them
reported so they are not reported again until allocated. The host
(QEMU's virtio-balloon) discards the ranges (``ram_block_discard_range``):
the memory goes back to the host without the balloon, and a later touch
is an ordinary fault on a zero page.

Here, at deterministic virtual times inside the vCPU: at every tick start
the reporter looks for blocks to report (a numpy pass over the free mask):

- a block is ``report_order_pages`` aligned frames, every one an empty
  free frame (no page, not soft-reclaimed: a soft-reclaimed frame still
  holds a page the guest may take back) that has stayed free for
  ``report_delay_ms``;
- of those blocks, the frames the host backs or holds content for are
  reported (``FreeReport``), at most 32 blocks per request, the vCPU
  waiting for each (``hypercall_us``); the kernel then marks them unbacked
  (``GuestKernel.reported``), so the next allocation's touch EPT-faults
  with the fresh bit and gets a zero page. Nothing of their old content is
  needed: the frames are free.

Counters: ``free_report_calls``, ``pages_reported`` (guest side; the host
counts ``pages_reported`` and ``frames_discarded`` on its side).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ReportingConfig", "FreePageReporter", "REPORT_DELAY_MS_DEFAULT", "REPORT_ORDER_PAGES_DEFAULT",
           "REPORT_BLOCKS_PER_CALL"]

REPORT_DELAY_MS_DEFAULT = 2000.0     # PAGE_REPORTING_DELAY = 2 * HZ (mm/page_reporting.c)
REPORT_ORDER_PAGES_DEFAULT = 512     # pageblock_order = 9 on x86-64: 2 MiB blocks
REPORT_BLOCKS_PER_CALL = 32          # PAGE_REPORTING_CAPACITY (mm/page_reporting.h)


@dataclass(frozen=True, slots=True)
class ReportingConfig:
    enabled: bool = False
    delay_ms: float = REPORT_DELAY_MS_DEFAULT
    order_pages: int = REPORT_ORDER_PAGES_DEFAULT


class FreePageReporter:
    """Runs inside the vCPU coroutine (``GuestSessionState``) at tick starts."""

    def __init__(self, kernel: Any, hypervisor: Any, cfg: ReportingConfig) -> None:
        self.kernel = kernel
        self.hypervisor = hypervisor
        self.cfg = cfg
        self.delay_us = float(cfg.delay_ms) * 1000.0
        self.runs = 0
        self.calls = 0
        self.pages_reported = 0

    async def maybe_run(self) -> int:
        """Report the blocks that qualify now; returns the pages reported."""
        k = self.kernel
        if not self.cfg.enabled:
            return 0
        n = 0
        async with k.mm_lock:                       # the blocks are isolated while being reported
            cand = k.reportable_frames(self.delay_us, self.cfg.order_pages)
            if cand.size:
                self.runs += 1
            per_call = REPORT_BLOCKS_PER_CALL * self.cfg.order_pages
            for i in range(0, cand.size, per_call):
                part = cand[i:i + per_call]
                done = await self.hypervisor.report_free(part.astype(np.uint64), k.vt_us)
                k.reported(part)
                k.vt_us = max(k.vt_us, float(done))
                self.calls += 1
                n += int(part.size)
        self.pages_reported += n
        return n

    def stats(self) -> dict[str, int]:
        return {"free_report_runs": self.runs, "free_report_calls": self.calls,
                "pages_reported": self.pages_reported}
