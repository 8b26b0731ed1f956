"""What every replacement policy shares: the frame arrays it reads and the default hooks.

The kernel owns the hit/miss flow (libCacheSim style): it sets R=1 on every
referenced frame and M=1 on every written one, then calls

    attach(frames) -> resize(capacity) -> { on_hits | select_victim | on_load }*

``select_victim`` returns the gpfn of a resident frame; the kernel evicts
that page *before* it calls ``select_victim`` again, so two calls never
return the same frame. ``on_load`` runs after the kernel has put the page
into the frame (kind, vpage, token, M = the faulting access writes) and sets
R by the policy's rule.
"""
from __future__ import annotations

import numpy as np

from ..memory import Frames

__all__ = ["PolicyBase", "HandPolicy", "clear_circular"]


class PolicyBase:
    """Default hooks: hits need no bookkeeping beyond R/M, a loaded page starts with R=1."""

    name = "base"
    load_sets_r = True

    def __init__(self, n_frames: int) -> None:
        if n_frames < 1:
            raise ValueError(f"a policy needs at least 1 frame, got {n_frames}")
        self.n_frames = n_frames
        self.capacity_pages = n_frames
        self.frames: Frames | None = None

    def attach(self, frames: Frames) -> None:
        if frames.n != self.n_frames:
            raise ValueError(f"policy sized for {self.n_frames} frames attached to {frames.n}")
        self.frames = frames

    def resize(self, capacity_pages: int) -> None:
        self.capacity_pages = capacity_pages

    def on_hits(self, gpfns: np.ndarray, writes: np.ndarray, first_ref: int) -> None:
        """References ``first_ref, first_ref+1, ...`` hit ``gpfns`` (R/M already set)."""

    def on_load(self, gpfn: int, write: bool, ref: int) -> None:
        assert self.frames is not None
        self.frames.R[gpfn] = self.load_sets_r

    def select_victim(self) -> int:  # pragma: no cover - every policy overrides it
        raise NotImplementedError

    def select_victims(self, n: int) -> np.ndarray:
        """Up to ``n`` victims, each taken out of ``resident`` before the next is chosen.

        Exactly ``n`` calls of ``select_victim`` with the kernel evicting in
        between (the balloon and kswapd take many pages at once); a policy may
        override it with a faster equivalent that gives the same victims, in
        the same order, and leaves the same state.
        """
        assert self.frames is not None
        res = self.frames.resident
        out = []
        for _ in range(n):
            v = self.select_victim()
            if v < 0:
                break
            res[v] = False
            out.append(v)
        return np.array(out, np.int64)


class HandPolicy(PolicyBase):
    """A policy with one clock hand, kept in ``state[0]`` so the compiled paging core moves the same hand."""

    def __init__(self, n_frames: int) -> None:
        super().__init__(n_frames)
        self.state = np.zeros(2, np.int64)     # [hand, policy's own]

    @property
    def hand(self) -> int:
        return int(self.state[0])

    @hand.setter
    def hand(self, value: int) -> None:
        self.state[0] = value


def clear_circular(bits: np.ndarray, start: int, stop: int) -> None:
    """Clear ``bits`` on the circular range [start, stop) (empty when start == stop)."""
    if start <= stop:
        bits[start:stop] = False
    else:
        bits[start:] = False
        bits[:stop] = False
