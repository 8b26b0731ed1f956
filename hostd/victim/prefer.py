"""A victim policy that takes the frames of some guests first, then asks another policy.

A silent guest's memory is idle by definition, so it is the best victim
there is (``hostd.silent``); the blind policy still decides among everyone
else.
"""
from __future__ import annotations

from typing import AbstractSet

import numpy as np

from ..framepool import FrameKind, FramePool
from . import VictimPolicy

__all__ = ["PreferVictims"]


class PreferVictims:
    """Evictable frames of the guests in ``prefer`` first (lowest frame first), then ``inner``'s picks."""

    def __init__(self, inner: VictimPolicy, prefer: AbstractSet[int]) -> None:
        self.inner = inner
        self.prefer = prefer          # read at every pick: whoever owns the set keeps it up to date
        self.name = getattr(inner, "name", "prefer")

    def candidates(self, pool: FramePool) -> np.ndarray:
        """Evictable guest frames of the preferred guests, lowest frame first."""
        if not self.prefer:
            return np.zeros(0, np.int64)
        ids = np.fromiter(self.prefer, np.int64, len(self.prefer))
        mask = pool.evictable() & (pool.kind == FrameKind.GUEST) & np.isin(pool.owner_guest, ids)
        return np.flatnonzero(mask)

    def pick(self, pool: FramePool, n: int, rng: np.random.Generator) -> np.ndarray:
        chosen = self.candidates(pool)[:max(n, 0)]
        for _ in range(3):   # the blind policy may pick preferred frames again: ask for the difference
            if chosen.size >= n:
                break
            more = np.asarray(self.inner.pick(pool, n - chosen.size, rng), np.int64)
            more = more[~np.isin(more, chosen)]
            if not more.size:
                break
            chosen = np.concatenate((chosen, more))
        return chosen
