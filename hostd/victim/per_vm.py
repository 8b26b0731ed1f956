"""Random victims within one VM, each VM from its own seeded stream (ESX's per-VM host swapping).

ESX picks the VM to swap from by its allocation target, then pages within
it at random (Waldspurger, OSDI 2002, section 3.2: random selection
avoids the pathologies a VM's own LRU-like pattern would provoke in a host
LRU). Each guest has its own generator,
``SeedSequence([seed, stream, guest_id])``, so which of a guest's pages go
depends only on the seed and on that guest's own history, never on what
other guests did: the picks commute across guests (the deterministic
engine's partitions). Still blind: only frames backing the guest's gpfns,
not pinned, not busy (a shootdown pending), in gpfn order, are candidates.
"""
from __future__ import annotations

import numpy as np

from ..framepool import FramePool
from ..p2m import P2M, PageState

__all__ = ["PerVmVictims"]


class PerVmVictims:
    name = "per-vm-random"

    def __init__(self, seed: int, stream: int) -> None:
        self.seed = int(seed)
        self.stream = int(stream)
        self._rngs: dict[int, np.random.Generator] = {}

    def rng(self, guest_id: int) -> np.random.Generator:
        """The guest's own stream (created on first use; a guest that left starts over when it rejoins)."""
        g = self._rngs.get(guest_id)
        if g is None:
            g = self._rngs[guest_id] = np.random.default_rng(
                np.random.SeedSequence([self.seed, self.stream, int(guest_id)]))
        return g

    def forget(self, guest_id: int) -> None:
        self._rngs.pop(guest_id, None)

    @staticmethod
    def candidates(pool: FramePool, p2m: P2M) -> np.ndarray:
        """The guest's evictable frames, in gpfn order."""
        frames = p2m.loc[p2m.state == PageState.FRAME].astype(np.int64, copy=False)
        return frames[~pool.pinned[frames] & ~pool.busy[frames]]

    def evictable_count(self, pool: FramePool, p2m: P2M) -> int:
        return int(self.candidates(pool, p2m).size)

    def pick(self, pool: FramePool, p2m: P2M, guest_id: int, n: int) -> np.ndarray:
        """Up to ``n`` distinct evictable frames of the guest, uniformly at random from its stream."""
        if n <= 0:
            return np.zeros(0, np.int64)
        cand = self.candidates(pool, p2m)
        if cand.size <= n:
            return cand
        return self.rng(guest_id).choice(cand, size=int(n), replace=False).astype(np.int64)
