"""kswapd's watermarks: when background reclaim starts and when it stops (mm/page_alloc.c, mm/vmscan.c).

Linux keeps three marks per zone (``__setup_per_zone_wmarks``):

- ``min`` = ``min_free_kbytes`` in pages, where ``min_free_kbytes`` =
  ``int_sqrt(lowmem_kbytes * 16)`` clamped to [128, 262144]
  (``calculate_min_free_kbytes``);
- ``low`` = min + d and ``high`` = min + 2d, with
  d = max(min / 4, managed pages x ``watermark_scale_factor`` / 10,000).

An allocation that leaves free memory below ``low`` wakes kswapd, which
reclaims (``balance_pgdat``) until free memory is back at ``high``, and
sleeps again. In this model the allocator may take the last free frame
(there is no atomic reserve below ``min``): direct reclaim is a fault that
finds no free frame at all, so ``min`` only places the other two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Watermarks", "watermarks", "BG_PERIOD_US"]

# kswapd and the readahead mark are looked at whenever the vCPU's clock passes a multiple of this
# (and at each tick start): Linux wakes kswapd at the allocation that crosses the low mark; a
# batch of references here is cut at these points so that the wake-up is at most this late.
BG_PERIOD_US = 1000.0

_PAGE_KIB = 4


@dataclass(frozen=True, slots=True)
class Watermarks:
    min_pages: int
    low_pages: int
    high_pages: int


def watermarks(managed_pages: int, scale_factor: int) -> Watermarks:
    """Linux's min/low/high for a zone of ``managed_pages`` and ``vm.watermark_scale_factor``."""
    min_free_kib = min(max(math.isqrt(managed_pages * _PAGE_KIB * 16), 128), 262144)
    wmin = min_free_kib // _PAGE_KIB
    d = max(wmin >> 2, managed_pages * scale_factor // 10000)
    return Watermarks(wmin, wmin + d, wmin + 2 * d)
