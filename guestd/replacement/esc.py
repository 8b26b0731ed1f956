"""``esc``: Enhanced Second-Chance over the four (R, M) classes of the seed.

Definition (reproduce exactly for the same fault and write-back counts):
the circle, hand and fill rules are those of ``clock``. Every reference sets
R=1 and a write also sets M=1; a loaded page gets R=1, and M=1 only if the
faulting access writes. On a fault with no free frame:

1. scan k frames from the hand changing nothing; take the first (0,0);
2. else scan k frames from the hand and take the first (0,1), clearing R on
   every frame passed;
3. else (all R are now 0) repeat step 1, then step 2: one succeeds.

Every scan starts at the same hand. The new page goes into the victim's
frame and the hand moves to the frame after it. Evicting a page with M=1
costs a write-back. Class order: (0,0) < (0,1) < (1,0) < (1,1).
"""
from __future__ import annotations

from ..memory import first_true_from
from .base import PolicyBase, clear_circular

__all__ = ["EscPolicy"]


class EscPolicy(PolicyBase):
    name = "esc"
    load_sets_r = True

    def __init__(self, n_frames: int) -> None:
        super().__init__(n_frames)
        self.hand = 0

    def select_victim(self) -> int:
        fr = self.frames
        assert fr is not None
        h = self.hand
        not_r = fr.resident & ~fr.R
        # step 1: first (0,0), nothing changes
        v = first_true_from(not_r & ~fr.M, h)
        if v < 0:
            # step 2: first (0,1), clearing R on the frames passed
            v = first_true_from(not_r & fr.M, h)
            if v >= 0:
                clear_circular(fr.R, h, v)
            else:
                # step 2 went all the way round: every R is now 0
                fr.R[:] = False
                v = first_true_from(fr.resident & ~fr.M, h)   # step 1 again
                if v < 0:
                    v = first_true_from(fr.resident, h)      # step 2 again: all dirty
                    if v < 0:
                        return -1
        self.hand = (v + 1) % fr.n
        return v
