"""Guest-physical memory: one row per frame (gpfn), held as parallel numpy arrays.

Nothing here is a Python object per page: the kernel updates these arrays
with fancy indexing on the hot path. The arrays are public so replacement
policies and tests can read them; only the kernel changes ``kind``,
``vpage``, ``token`` and ``backed``.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["FrameKind", "Frames", "first_true_from"]


class FrameKind(IntEnum):
    """Who owns a frame."""

    FREE = 0      # allocatable (may still hold a soft-reclaimed page, see ``Frames.vpage``)
    ANON = 1      # an anonymous workload page
    FILE = 2      # a page-cache page of a workload file
    BALLOON = 3   # given to the balloon (and so to the host); never a victim
    KERNEL = 4    # the guest kernel's own memory; never a victim


class Frames:
    """All guest frames. Index = gpfn."""

    def __init__(self, n_frames: int, kernel_frames: int = 0, backed: bool = True) -> None:
        if not 0 <= kernel_frames <= n_frames:
            raise ValueError(f"kernel_frames={kernel_frames} outside 0..{n_frames}")
        self.n = n_frames
        # owner (FrameKind values)
        self.kind = np.zeros(n_frames, np.uint8)
        self.kind[:kernel_frames] = FrameKind.KERNEL
        # holds a workload page (kind ANON or FILE): the set replacement may pick from
        self.resident = np.zeros(n_frames, bool)
        # Bits set together on a reference live in one 2-d array, so the hot path
        # sets them with one fancy assignment: rows R, touched, ad_accessed.
        self.ref_bits = np.zeros((3, n_frames), bool)
        # ... and on a write: rows M, ad_dirty.
        self.write_bits = np.zeros((2, n_frames), bool)
        # the replacement policy's reference and modify bits (policies clear R; M means dirty)
        self.R = self.ref_bits[0]
        self.M = self.write_bits[0]
        # virtual page held; -1 = none. A FREE frame with vpage >= 0 still holds a
        # soft-reclaimed (clean) page that a minor fault can take back.
        self.vpage = np.full(n_frames, -1, np.int64)
        # content token of what the frame holds (proto.tokens)
        self.token = np.zeros(n_frames, np.uint64)
        # the host has a frame behind this gpfn (else touching it is an EPT fault)
        self.backed = np.full(n_frames, backed, bool)
        # the host took this frame while it held a page (host swap-out); cleared when backed again
        self.host_took = np.zeros(n_frames, bool)
        # write-protected: the host shares this frame with others (page sharing); a write to it
        # faults to the host first (copy-on-write). Only ever set on a backed frame.
        self.wp = np.zeros(n_frames, bool)
        # EPT accessed/dirty bits: set on every reference, cleared only when reported
        # to the host (take_ad_bits), independent of R/M which the policy clears
        self.ad_accessed = self.ref_bits[2]
        self.ad_dirty = self.write_bits[1]
        # the working-set sampler's own accessed bit, so sampling never disturbs R
        self.touched = self.ref_bits[1]

    def count(self, kind: FrameKind) -> int:
        return int(np.count_nonzero(self.kind == kind))


def first_true_from(mask: np.ndarray, start: int) -> int:
    """Index of the first True in ``mask`` scanning circularly from ``start``; -1 if none.

    ``argmax`` on a bool array stops at the first True, so the cost is the
    distance scanned, not the array length.
    """
    n = mask.shape[0]
    if start < n:
        tail = mask[start:]
        i = int(tail.argmax())
        if tail[i]:
            return start + i
    if start > 0:
        head = mask[:start]
        i = int(head.argmax())
        if head[i]:
            return i
    return -1
