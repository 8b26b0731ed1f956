"""``random``: uniform among evictable frames, as ESX picks host-swap victims."""
from __future__ import annotations

import numpy as np

from ..framepool import FramePool

__all__ = ["RandomVictims"]


class RandomVictims:
    name = "random"

    def pick(self, pool: FramePool, n: int, rng: np.random.Generator) -> np.ndarray:
        candidates = np.flatnonzero(pool.evictable())
        if n <= 0 or candidates.size == 0:
            return np.zeros(0, np.int64)
        if n >= candidates.size:
            return candidates.astype(np.int64)
        return rng.choice(candidates, size=int(n), replace=False).astype(np.int64)
