"""``opt``: Belady's MIN, offline; it needs the whole reference string in advance.

Definition: the victim is the resident page whose next reference is the
farthest in the future; pages never referenced again count as infinitely
far, and ties among them go to the lowest-numbered frame (this only changes
which page is written back, never the fault count).

Parameter ``future``: the pages the kernel will be asked for, in order
(reference number i is ``future[i]``).
"""
from __future__ import annotations

import numpy as np

from ..errors import PolicyNeedsTrace
from .base import PolicyBase

__all__ = ["OptPolicy", "next_use"]


def next_use(pages: np.ndarray) -> np.ndarray:
    """For each reference i, the index of the next reference to the same page (len(pages) if none)."""
    n = pages.shape[0]
    order = np.argsort(pages, kind="stable")
    nxt = np.full(n, n, np.int64)
    same = pages[order[1:]] == pages[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


class OptPolicy(PolicyBase):
    name = "opt"

    def __init__(self, n_frames: int, future: np.ndarray | None = None) -> None:
        super().__init__(n_frames)
        if future is None:
            raise PolicyNeedsTrace("policy 'opt' is offline: pass future=<the whole page sequence>")
        self.future = np.asarray(future)
        self.nxt = next_use(self.future)
        self.next_ref = np.zeros(n_frames, np.int64)

    def _check(self, ref_end: int) -> None:
        if ref_end > self.future.shape[0]:
            raise PolicyNeedsTrace(f"opt: reference {ref_end - 1} is past the end of its {self.future.shape[0]}-reference future")

    def on_hits(self, gpfns: np.ndarray, writes: np.ndarray, first_ref: int) -> None:
        end = first_ref + gpfns.shape[0]
        self._check(end)
        # a frame hit twice in the batch: the later hit's next use is the larger one
        np.maximum.at(self.next_ref, gpfns, self.nxt[first_ref:end])

    def on_load(self, gpfn: int, write: bool, ref: int) -> None:
        super().on_load(gpfn, write, ref)
        self._check(ref + 1)
        assert self.frames is not None
        if int(self.frames.vpage[gpfn]) != int(self.future[ref]):
            raise PolicyNeedsTrace(
                f"opt: reference {ref} is page {int(self.frames.vpage[gpfn])} but the future says {int(self.future[ref])}")
        self.next_ref[gpfn] = self.nxt[ref]

    def select_victim(self) -> int:
        assert self.frames is not None
        nxt = np.where(self.frames.resident, self.next_ref, -1)
        v = int(nxt.argmax())   # first maximum: lowest-numbered frame among ties
        return v if self.frames.resident[v] else -1
