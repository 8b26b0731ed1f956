"""``clock``: a hand sweeps host frames; an accessed frame loses its bit and is skipped.

The accessed bits are the guest-reported EPT A bits (``set_ad_bits``), so
this is second chance on what the host can see, still blind to page use.
"""
from __future__ import annotations

import numpy as np

from ..framepool import FramePool

__all__ = ["ClockVictims"]


class ClockVictims:
    name = "clock"

    def __init__(self) -> None:
        self.hand = 0   # next frame the hand looks at

    def pick(self, pool: FramePool, n: int, rng: np.random.Generator) -> np.ndarray:
        total = pool.total_frames
        if n <= 0:
            return np.zeros(0, np.int64)
        self.hand %= total
        # One sweep in hand order, done with array ops: frames before the
        # n-th unaccessed evictable frame get their accessed bit cleared.
        order = np.concatenate((np.arange(self.hand, total), np.arange(0, self.hand)))
        evictable = pool.evictable()[order]
        accessed = pool.accessed[order]
        cand = np.flatnonzero(evictable & ~accessed)
        if cand.size >= n:
            last = int(cand[n - 1])
            swept = order[:last + 1]
            pool.accessed[swept[evictable[:last + 1]]] = False
            self.hand = (int(order[last]) + 1) % total
            return order[cand[:n]].astype(np.int64)
        # A full turn without enough: every evictable frame has lost its bit,
        # so the second turn takes the first of those it skipped.
        picked = order[cand]
        pool.accessed[order[evictable]] = False
        second = np.flatnonzero(evictable & accessed)[:n - cand.size]
        if second.size:
            self.hand = (int(order[second[-1]]) + 1) % total
        return np.concatenate((picked, order[second])).astype(np.int64)
