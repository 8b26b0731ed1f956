"""``random``: uniform among evictable frames, as ESX picks host-swap victims."""
from __future__ import annotations

import numpy as np

from ..framepool import FrameKind, FramePool

__all__ = ["RandomVictims"]

_SAMPLING_ROUNDS = 4


class RandomVictims:
    name = "random"

    def pick(self, pool: FramePool, n: int, rng: np.random.Generator) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, np.int64)
        # Under pressure most frames are evictable: draw frame numbers and
        # keep the evictable ones, first draw first (uniform, without
        # replacement), instead of scanning the whole pool every time.
        picked = np.zeros(0, np.int64)
        for _ in range(_SAMPLING_ROUNDS):
            draw = rng.integers(0, pool.total_frames, 2 * (n - picked.size) + 16)
            k = pool.kind[draw]
            ok = (k == FrameKind.GUEST) & ~pool.pinned[draw] & ~pool.busy[draw]   # the disk cache is never a victim
            cand = np.concatenate((picked, draw[ok]))
            _, first = np.unique(cand, return_index=True)
            picked = cand[np.sort(first)][:n]
            if picked.size == n:
                return picked
        # Few evictable frames: take the rest uniformly from all that are left.
        rest = np.flatnonzero(pool.evictable())
        rest = rest[~np.isin(rest, picked)]
        more = min(n - picked.size, rest.size)
        if more:
            picked = np.concatenate((picked, rng.choice(rest, size=more, replace=False)))
        return picked.astype(np.int64)
