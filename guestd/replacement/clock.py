"""``clock``: second chance with one R bit per frame and one hand.

Definition (reproduce exactly for the same fault counts):
frames form a circle 0..k-1 and the hand starts at frame 0. A hit sets
R=1. A fault while a frame is free loads the page into the lowest-numbered
free frame with R=1 (the faulting access sets R) and the hand does not
move. A fault with no free frame sweeps: while R[hand]=1, clear it and
advance; then evict the page at the hand, load the new page there with R=1
and advance the hand by one.

In the kernel the circle is every gpfn; frames that hold no workload page
(free, kernel, balloon) are passed over without being chosen.
"""
from __future__ import annotations

from ..memory import first_true_from
from .base import HandPolicy, clear_circular

__all__ = ["ClockPolicy"]

# Try a short stretch after the hand before building a mask over all frames:
# the hand usually stops within a few frames.
_NEAR = 256


class ClockPolicy(HandPolicy):
    name = "clock"
    load_sets_r = True

    def select_victim(self) -> int:
        fr = self.frames
        assert fr is not None
        n, h = fr.n, self.hand
        stop = min(n, h + _NEAR)
        near = fr.resident[h:stop] & ~fr.R[h:stop]
        i = int(near.argmax())
        if near[i]:
            v = h + i
        else:
            v = first_true_from(fr.resident & ~fr.R, h)
        if v >= 0:
            clear_circular(fr.R, h, v)
        else:
            # Every resident frame has R=1: one full turn clears them all and
            # the hand stops at the first resident frame it meets again.
            v = first_true_from(fr.resident, h)
            if v < 0:
                return -1
            fr.R[:] = False
        self.hand = (v + 1) % n
        return v
