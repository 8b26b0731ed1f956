"""``lru``: exact least-recently-used, for reference.

Definition: the victim is the resident page whose last reference (hit or
the faulting reference that loaded it) is the oldest. References are
numbered, so there are no ties.
"""
from __future__ import annotations

import numpy as np

from .base import PolicyBase

__all__ = ["LruPolicy"]

_NEVER = np.iinfo(np.int64).max


class LruPolicy(PolicyBase):
    name = "lru"

    def __init__(self, n_frames: int) -> None:
        super().__init__(n_frames)
        self.last_ref = np.zeros(n_frames, np.int64)

    def on_hits(self, gpfns: np.ndarray, writes: np.ndarray, first_ref: int) -> None:
        # maximum.at: with a frame referenced twice in the batch, the later index wins
        np.maximum.at(self.last_ref, gpfns, np.arange(first_ref, first_ref + gpfns.shape[0], dtype=np.int64))

    def on_load(self, gpfn: int, write: bool, ref: int) -> None:
        super().on_load(gpfn, write, ref)
        self.last_ref[gpfn] = ref

    def select_victim(self) -> int:
        assert self.frames is not None
        last = np.where(self.frames.resident, self.last_ref, _NEVER)
        v = int(last.argmin())
        return v if self.frames.resident[v] else -1
