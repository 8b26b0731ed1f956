"""``clock``: a hand sweeps host frames; an accessed frame loses its bit and is skipped.

The accessed bits are the guest-reported EPT A bits (``set_ad_bits``), so
this is second chance on what the host can see, still blind to page use.
"""
from __future__ import annotations

import numpy as np

from ..framepool import FrameKind, FramePool

__all__ = ["ClockVictims"]

_MIN_WINDOW = 1024


class ClockVictims:
    name = "clock"

    def __init__(self) -> None:
        self.hand = 0   # next frame the hand looks at

    def pick(self, pool: FramePool, n: int, rng: np.random.Generator) -> np.ndarray:
        total = pool.total_frames
        if n <= 0:
            return np.zeros(0, np.int64)
        hand = self.hand % total
        picked: list[np.ndarray] = []
        need = n
        scanned = 0
        # The sweep goes window by window (array ops inside one), at most two
        # turns: after one turn every evictable frame has lost its bit.
        while need > 0 and scanned < 2 * total:
            w = min(max(4 * need, _MIN_WINDOW), total - hand, 2 * total - scanned)
            sl = slice(hand, hand + w)
            k = pool.kind[sl]
            ev = (k == FrameKind.GUEST) & ~pool.pinned[sl] & ~pool.busy[sl]   # the disk cache is never a victim
            acc = pool.accessed[sl]
            cand = np.flatnonzero(ev & ~acc)
            if cand.size >= need:
                last = int(cand[need - 1])
                pool.accessed[hand + np.flatnonzero(ev[:last + 1] & acc[:last + 1])] = False
                picked.append(hand + cand[:need])
                hand = (hand + last + 1) % total
                need = 0
            else:
                pool.accessed[hand + np.flatnonzero(ev & acc)] = False
                got = hand + cand
                picked.append(got)
                # Busy for the rest of this sweep so the second turn skips them.
                pool.busy[got] = True
                need -= cand.size
                hand = (hand + w) % total
            scanned += w
        out = np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, np.int64)
        pool.busy[out] = False
        self.hand = hand
        return out
