"""``file-first``: the seed's naive policy; page cache always goes before anonymous memory.

Definition: the victim class is FILE if any resident frame holds a file
(page-cache) page, else ANON; recency never overrides the class. Within
the class it is ``clock`` with the shared hand: while the frame at the hand
is not of the class or has R=1, clear R if it is of the class, and advance;
evict the frame at the hand and advance past it. Loaded pages get R=1.

With no file pages at all (e.g. a plain trace replay) it is exactly ``clock``.
A hot database cache is therefore evicted before cold anonymous memory
that has not been touched in hours: the seed's cautionary example.
"""
from __future__ import annotations

from ..memory import FrameKind, first_true_from
from .base import PolicyBase

__all__ = ["FileFirstPolicy"]

_FILE = int(FrameKind.FILE)


class FileFirstPolicy(PolicyBase):
    name = "file-first"
    load_sets_r = True

    def __init__(self, n_frames: int) -> None:
        super().__init__(n_frames)
        self.hand = 0

    def select_victim(self) -> int:
        fr = self.frames
        assert fr is not None
        h = self.hand
        of_class = fr.resident & (fr.kind == _FILE)
        if not of_class.any():
            of_class = fr.resident
        v = first_true_from(of_class & ~fr.R, h)
        if v >= 0:
            # clear R only on frames of the class between the hand and the victim
            if h <= v:
                fr.R[h:v] &= ~of_class[h:v]
            else:
                fr.R[h:] &= ~of_class[h:]
                fr.R[:v] &= ~of_class[:v]
        else:
            v = first_true_from(of_class, h)
            if v < 0:
                return -1
            fr.R[of_class] = False
        self.hand = (v + 1) % fr.n
        return v
