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

import numpy as np

from ..memory import first_true_from
from .base import HandPolicy, clear_circular

__all__ = ["EscPolicy"]


class EscPolicy(HandPolicy):
    name = "esc"
    load_sets_r = True

    def __init__(self, n_frames: int) -> None:
        super().__init__(n_frames)
        # state[1]: the compiled paging core keeps a bitmap of candidate (0,0) frames
        # (``zero_zero_bits``); clearing R here makes (0,0) frames it has not seen,
        # so these methods mark it stale and the core rebuilds it
        self.state[1] = 1
        self.zero_zero_bits = np.zeros((n_frames + 63) // 64, np.uint64)

    def select_victim(self) -> int:
        fr = self.frames
        assert fr is not None
        self.state[1] = 1
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

    def select_victims(self, n: int) -> np.ndarray:
        """``n`` calls of ``select_victim``, each victim taken out of ``resident``, in runs.

        Same victims, order, R bits and hand as one call at a time (which scans
        every frame per call), but whole runs of calls are resolved together:

        - while (0,0) frames exist, step 1 takes them in circular order from the
          hand and changes nothing else: all of them (or as many as needed) at once;
        - with none, step 2 takes the (0,1) frames in circular order, clearing R
          behind the hand; that creates no (0,0) until the cleared stretch reaches
          the first resident (1,0) frame, so the run goes on up to and including
          the first (0,1) past it (the (1,1) frames it turns into (0,1) lie behind
          the hand, found only after the others, in a later run);
        - with neither, step 3 is one call, as defined.
        """
        fr = self.frames
        assert fr is not None
        self.state[1] = 1
        n_frames = fr.n
        res, r_bits, m_bits = fr.resident, fr.R, fr.M
        parts: list[np.ndarray] = []
        got = 0
        h = self.hand
        while got < n:
            want = n - got
            clean = _circular(res & ~r_bits & ~m_bits, h)             # step 1 candidates, in order
            if clean.size:
                take = clean[:want]
                clean_circular_end = None
            else:
                dirty = _circular(res & ~r_bits & m_bits, h)          # step 2 candidates, in order
                if dirty.size:
                    ref_clean = np.flatnonzero(res & r_bits & ~m_bits)
                    first_rc = int(((ref_clean - h) % n_frames).min()) if ref_clean.size else n_frames
                    # picks before the stretch reaches it, plus the one whose stretch does
                    upto = int(np.searchsorted((dirty - h) % n_frames, first_rc)) + 1
                    take = dirty[:min(upto, want)]
                    clean_circular_end = int(take[-1])
                else:
                    # step 3: every resident frame has R=1 (as defined, R is cleared even with none resident)
                    r_bits[:] = False
                    v = first_true_from(res & ~m_bits, h)
                    if v < 0:
                        v = first_true_from(res, h)
                        if v < 0:
                            break
                    take = np.array([v], np.int64)
                    clean_circular_end = None
            if clean_circular_end is not None:
                clear_circular(r_bits, h, clean_circular_end)
            res[take] = False
            parts.append(take)
            got += int(take.size)
            h = (int(take[-1]) + 1) % n_frames
        self.hand = h
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _circular(mask: np.ndarray, start: int) -> np.ndarray:
    """Indices of the True entries of ``mask`` in circular order from ``start``."""
    idx = np.flatnonzero(mask)
    k = int(np.searchsorted(idx, start))
    return np.concatenate((idx[k:], idx[:k])) if k else idx
