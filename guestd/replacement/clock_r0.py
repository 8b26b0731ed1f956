"""``clock-r0``: ``clock`` whose loaded pages start with R=0.

This is libCacheSim's Clock (FIFO-reinsertion: an object is inserted with
its visited bit clear), so fault counts can be compared with that
simulator. Everything else is ``clock``: hits set R=1, free frames fill
lowest-numbered first without moving the hand, the sweep clears R=1 frames
and evicts the first R=0 frame at the hand, then the hand advances past it.
"""
from __future__ import annotations

from .clock import ClockPolicy

__all__ = ["ClockR0Policy"]


class ClockR0Policy(ClockPolicy):
    name = "clock-r0"
    load_sets_r = False
