"""``fifo``: evict the resident page that was loaded first.

Definition: every load gets the next sequence number; the victim is the
resident page with the smallest one. Hits change nothing. Free frames are
filled lowest-numbered first (the kernel's allocator), which does not
matter to FIFO's fault count.
"""
from __future__ import annotations

import numpy as np

from .base import PolicyBase

__all__ = ["FifoPolicy"]

_NEVER = np.iinfo(np.int64).max


class FifoPolicy(PolicyBase):
    name = "fifo"

    def __init__(self, n_frames: int) -> None:
        super().__init__(n_frames)
        self.load_seq = np.zeros(n_frames, np.int64)
        self.state = np.zeros(2, np.int64)     # [next sequence number, unused], shared with the compiled core

    def on_load(self, gpfn: int, write: bool, ref: int) -> None:
        super().on_load(gpfn, write, ref)
        self.load_seq[gpfn] = self.state[0]
        self.state[0] += 1

    def select_victim(self) -> int:
        assert self.frames is not None
        seq = np.where(self.frames.resident, self.load_seq, _NEVER)
        v = int(seq.argmin())
        return v if self.frames.resident[v] else -1
