"""Host RAM as a pool of frames: one numpy array per attribute, a free stack.

A frame is FREE, or backs a guest page (GUEST: owner guest + gpfn), or
caches a virtual-disk block (CACHE: owner guest + block), or is an I/O
buffer of an in-flight virtual-disk request (IOBUF). ``token`` is the
content the frame holds: for CACHE frames the block's content, for GUEST
frames the content the page had when the host backed it (the guest changes
it without telling the host; the TLB shootdown returns the current one).

``busy`` marks frames whose eviction is waiting for a guest's TLB-shootdown
acknowledgement: they are neither free nor evictable until it arrives.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

from .errors import InvariantViolation

__all__ = ["FrameKind", "FramePool", "NO_OWNER", "has_duplicates"]

NO_OWNER = -1


def has_duplicates(values: np.ndarray, limit: int | None = None) -> bool:
    """Whether any value repeats; with ``limit`` (values in [0, limit)) in O(n + limit) by counting."""
    if values.size < 2:
        return False
    if limit is not None and values.size * 8 >= limit:
        return bool(np.bincount(values, minlength=limit).max() > 1)
    srt = np.sort(values)
    return bool(np.any(srt[1:] == srt[:-1]))


class FrameKind(IntEnum):
    FREE = 0
    GUEST = 1
    CACHE = 2
    IOBUF = 3


_FREE = int(FrameKind.FREE)   # plain int: an IntEnum attribute costs about a microsecond per lookup


class FramePool:
    """``total_frames`` host frames; alloc/free in O(n) numpy, no per-frame Python."""

    def __init__(self, total_frames: int) -> None:
        if total_frames <= 0:
            raise ValueError(f"total_frames must be > 0, got {total_frames}")
        n = int(total_frames)
        self.total_frames = n
        self.kind = np.zeros(n, np.uint8)
        self.owner_guest = np.full(n, NO_OWNER, np.int32)
        self.owner_index = np.full(n, NO_OWNER, np.int64)   # gpfn (GUEST), block (CACHE, IOBUF)
        self.token = np.zeros(n, np.uint64)
        self.accessed = np.zeros(n, bool)
        self.dirty = np.zeros(n, bool)
        self.pinned = np.zeros(n, bool)
        self.busy = np.zeros(n, bool)
        # Free frames live in _free_stack[:_n_free]; pushed frames go on top so
        # a just-freed frame is reused first (warm, and deterministic).
        self._free_stack = np.arange(n - 1, -1, -1, dtype=np.int64)
        self._n_free = n
        self._kind_frames = np.zeros(len(FrameKind), np.int64)
        self._kind_frames[FrameKind.FREE] = n

    # -- allocation ---------------------------------------------------------

    @property
    def free_frames(self) -> int:
        return self._n_free

    @property
    def used_frames(self) -> int:
        return self.total_frames - self._n_free

    def frames_of(self, kind: FrameKind) -> int:
        return int(self._kind_frames[kind])

    def counts(self) -> dict[str, int]:
        """Frames per kind, by lower-case kind name."""
        return {k.name.lower(): int(self._kind_frames[k]) for k in FrameKind}

    def alloc(self, n: int, kind: FrameKind, owner_guest: int = NO_OWNER,
              owner_index: np.ndarray | None = None, tokens: np.ndarray | None = None) -> np.ndarray:
        """Take up to ``n`` free frames as ``kind``; returns fewer when the pool runs dry.

        ``owner_index`` and ``tokens`` (if given) must have ``n`` entries;
        only the first ``len(result)`` are used.
        """
        if kind == FrameKind.FREE:
            raise ValueError("cannot allocate frames as FREE")
        take = min(int(n), self._n_free)
        frames = self._free_stack[self._n_free - take:self._n_free][::-1].copy()
        self._n_free -= take
        self.kind[frames] = kind
        self.owner_guest[frames] = owner_guest
        if owner_index is not None:
            self.owner_index[frames] = np.asarray(owner_index, np.int64)[:take]
        if tokens is not None:
            self.token[frames] = np.asarray(tokens, np.uint64)[:take]
        self._kind_frames[FrameKind.FREE] -= take
        self._kind_frames[kind] += take
        return frames

    def alloc_one(self, kind: FrameKind, owner_guest: int, owner_index: int, token: int | None = None) -> int:
        """``alloc`` of one frame, in scalars (the one-page requests that dominate); -1 when the pool is dry.

        Takes the same frame ``alloc(1, ...)`` would.
        """
        if self._n_free == 0:
            return -1
        self._n_free -= 1
        f = int(self._free_stack[self._n_free])
        self.kind[f] = kind
        self.owner_guest[f] = owner_guest
        self.owner_index[f] = owner_index
        if token is not None:
            self.token[f] = token
        counts = self._kind_frames
        counts[_FREE] -= 1
        counts[kind] += 1
        return f

    def free_one(self, frame: int) -> None:
        """``free`` of one frame, in scalars."""
        kind = int(self.kind[frame])
        if kind == _FREE:
            raise InvariantViolation(f"frame {frame} freed twice")
        counts = self._kind_frames
        counts[kind] -= 1
        counts[_FREE] += 1
        self.kind[frame] = _FREE
        self.owner_guest[frame] = NO_OWNER
        self.owner_index[frame] = NO_OWNER
        self.token[frame] = 0
        self.accessed[frame] = False
        self.dirty[frame] = False
        self.pinned[frame] = False
        self.busy[frame] = False
        self._free_stack[self._n_free] = frame
        self._n_free += 1

    def free(self, frames: np.ndarray) -> None:
        """Return frames to the pool and clear everything they held."""
        frames = np.asarray(frames, np.int64)
        if frames.size == 0:
            return
        kinds = self.kind[frames]
        if np.any(kinds == FrameKind.FREE):
            bad = int(frames[np.flatnonzero(kinds == FrameKind.FREE)[0]])
            raise InvariantViolation(f"frame {bad} freed twice")
        if has_duplicates(frames, self.total_frames):
            raise InvariantViolation("the same frame appears twice in one free() call")
        self._kind_frames -= np.bincount(kinds, minlength=len(FrameKind))
        self._kind_frames[FrameKind.FREE] += frames.size
        self.kind[frames] = FrameKind.FREE
        self.owner_guest[frames] = NO_OWNER
        self.owner_index[frames] = NO_OWNER
        self.token[frames] = 0
        self.accessed[frames] = False
        self.dirty[frames] = False
        self.pinned[frames] = False
        self.busy[frames] = False
        self._free_stack[self._n_free:self._n_free + frames.size] = frames
        self._n_free += frames.size

    # -- queries --------------------------------------------------------------

    def evictable(self) -> np.ndarray:
        """Mask of frames a victim policy may pick: guest pages, not pinned, not busy.

        The host's disk cache is dropped or written back, never host-swapped,
        so its frames are never victims.
        """
        return (self.kind == FrameKind.GUEST) & ~self.pinned & ~self.busy

    def frames_owned_by(self, guest_id: int, kind: FrameKind | None = None) -> np.ndarray:
        mask = self.owner_guest == guest_id
        if kind is not None:
            mask &= self.kind == kind
        return np.flatnonzero(mask)

    def check_counters(self) -> None:
        """The counts kept as frames move agree with each other (O(1): the sampled invariant's part)."""
        if int(self._kind_frames.sum()) != self.total_frames or self._kind_frames[FrameKind.FREE] != self._n_free \
                or not 0 <= self._n_free <= self.total_frames:
            raise InvariantViolation(f"kind counts drifted: kept {self._kind_frames.tolist()}, free stack "
                                     f"{self._n_free}, total {self.total_frames}")

    def check_invariant(self) -> None:
        """The pool's own consistency; HostMemory cross-checks owners against p2m and vdisks."""
        counted = np.bincount(self.kind, minlength=len(FrameKind))
        if counted.size != len(FrameKind):
            raise InvariantViolation(f"frame kind out of range: {int(self.kind.max())}")
        if not np.array_equal(counted, self._kind_frames):
            raise InvariantViolation(
                f"kind counts drifted: counted {counted.tolist()}, kept {self._kind_frames.tolist()}")
        if counted.sum() != self.total_frames or self._n_free + self.used_frames != self.total_frames:
            raise InvariantViolation(f"free {self._n_free} + used {self.used_frames} != total {self.total_frames}")
        if counted[FrameKind.FREE] != self._n_free:
            raise InvariantViolation(
                f"{int(counted[FrameKind.FREE])} frames are FREE but the free stack holds {self._n_free}")
        stack = self._free_stack[:self._n_free]
        if has_duplicates(stack, self.total_frames):
            raise InvariantViolation("a frame is on the free stack twice")
        if np.any(self.kind[stack] != FrameKind.FREE):
            bad = int(stack[np.flatnonzero(self.kind[stack] != FrameKind.FREE)[0]])
            raise InvariantViolation(f"frame {bad} is on the free stack but kind {FrameKind(self.kind[bad]).name}")
        free = self.kind == FrameKind.FREE
        if np.any(free & ((self.owner_guest != NO_OWNER) | self.pinned | self.busy | (self.token != 0))):
            bad = int(np.flatnonzero(free & ((self.owner_guest != NO_OWNER) | self.pinned
                                             | self.busy | (self.token != 0)))[0])
            raise InvariantViolation(f"free frame {bad} still carries an owner, pin, busy flag or token")
        owned = ~free
        if np.any(owned & (self.owner_guest == NO_OWNER)):
            bad = int(np.flatnonzero(owned & (self.owner_guest == NO_OWNER))[0])
            raise InvariantViolation(f"frame {bad} of kind {FrameKind(self.kind[bad]).name} has no owner guest")
