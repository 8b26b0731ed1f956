"""Host RAM as a pool of frames: one numpy array per attribute, a free stack.

A frame is FREE, or backs a guest page (GUEST: owner guest + gpfn), or
caches a virtual-disk block (CACHE: owner guest + block), or is an I/O
buffer of an in-flight virtual-disk request (IOBUF), or holds compressed
pages of one VM's compression cache (ZCACHE: owner guest, no index). ``token`` is the
content the frame holds: for CACHE frames the block's content, for GUEST
frames the content the page had when the host backed it (the guest changes
it without telling the host; the TLB shootdown returns the current one).

``busy`` marks frames whose eviction is waiting for a guest's TLB-shootdown
acknowledgement: they are neither free nor evictable until it arrives.

Grants (the deterministic discipline's partitions of free memory): between
``open_grants`` and ``close_grants`` each guest with a grant has a private
free list of actual frame numbers, moved there from the global free stack
(``grant``). ``alloc``/``alloc_one`` for that owner take from its private
list only, and ``free``/``free_one`` of a frame it owned put the frame back
on that list, so within a tick one guest's allocations and frees never see
another guest's. ``close_grants`` returns every private list to the global
stack in guest-id order. Frames on a private list are FREE like any other
(``free_frames`` counts them); ``global_free_frames`` is the stack alone.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

from ._books import alloc_pages, alloc_run, release_run
from .errors import InvariantViolation

_nz = np.count_nonzero   # on small masks a fraction of np.any's cost; truthy exactly when np.any is

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
    ZCACHE = 4    # holds compressed guest pages of one VM's compression cache (hostd.compress)


_FREE = int(FrameKind.FREE)   # plain int: an IntEnum attribute costs about a microsecond per lookup


class _Grant:
    """One guest's private free list: ``stack[:n]``, top last (the next frame handed out)."""

    __slots__ = ("stack", "view", "n", "taken")

    def __init__(self) -> None:
        self.stack = np.zeros(64, np.int64)
        self.view = memoryview(self.stack)   # scalar access for alloc_one/free_one; follows ``stack``
        self.n = 0
        self.taken = 0          # frames handed out from it since it opened (the guest's demand)

    def push(self, frames: np.ndarray) -> None:
        need = self.n + frames.size
        if need > self.stack.size:
            self._grow(need)
        self.stack[self.n:need] = frames
        self.n = need

    def reserve(self, more: int) -> None:
        """Room for ``more`` frames on top (``hostd/_chain.c`` pushes onto ``stack`` in place)."""
        if self.n + more > self.stack.size:
            self._grow(self.n + more)

    def _grow(self, need: int) -> None:
        grown = np.zeros(max(need, 2 * self.stack.size), np.int64)
        grown[:self.n] = self.stack[:self.n]
        self.stack = grown
        self.view = memoryview(grown)

    def push_one(self, frame: int) -> None:
        if self.n == self.stack.size:
            self.push(np.array((frame,), np.int64))
            return
        self.view[self.n] = frame
        self.n += 1


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
        self._grants: dict[int, _Grant] | None = None   # None: no grants, one global free stack
        # Closed lists, empty, kept for the next open: each tick opens one per guest, and a new one would
        # grow its stack again to the grant's size (allocated and copied, per guest and tick).
        self._spare_grants: dict[int, _Grant] = {}
        self._n_granted = 0
        # Scalar views of the arrays above for the one-frame paths (``alloc_one``, ``free_one``, the
        # one-page requests): an element of a memoryview is a plain int (or bool), 2-3x cheaper to get
        # or set than a numpy element. The arrays are never replaced, so the views stay valid.
        self.kind_mv = memoryview(self.kind)
        self.owner_guest_mv = memoryview(self.owner_guest)
        self.owner_index_mv = memoryview(self.owner_index)
        self.token_mv = memoryview(self.token)
        self.accessed_mv = memoryview(self.accessed)
        self.dirty_mv = memoryview(self.dirty)
        self.pinned_mv = memoryview(self.pinned)
        self.busy_mv = memoryview(self.busy)
        self._free_stack_mv = memoryview(self._free_stack)
        self._kind_frames_mv = memoryview(self._kind_frames)

    # -- grants (see the module docstring) ------------------------------------

    @property
    def grants_open(self) -> bool:
        return self._grants is not None

    def open_grants(self, guest_ids: list[int] | tuple[int, ...] = ()) -> None:
        """Start partitioning: each of ``guest_ids`` gets an (empty) private free list."""
        if self._grants is not None:
            raise InvariantViolation("grants are open already")
        self._grants = {}
        for gid in sorted(guest_ids):
            self._grants[int(gid)] = self._new_grant(int(gid))

    def add_grant(self, guest_id: int) -> None:
        """An empty private list for a guest that joined while grants are open (no-op otherwise)."""
        if self._grants is not None and guest_id not in self._grants:
            self._grants[int(guest_id)] = self._new_grant(int(guest_id))

    def _new_grant(self, guest_id: int) -> _Grant:
        g = self._spare_grants.pop(guest_id, None)
        if g is None:
            return _Grant()
        g.taken = 0    # (n is 0: closed lists are emptied first)
        return g

    def has_grant(self, guest_id: int) -> bool:
        return self._grants is not None and guest_id in self._grants

    def granted(self, guest_id: int) -> int:
        """Frames left on the guest's private list (0 without one)."""
        g = None if self._grants is None else self._grants.get(guest_id)
        return 0 if g is None else g.n

    def grant(self, guest_id: int, n: int) -> int:
        """Move up to ``n`` frames from the top of the global stack to the guest's list; returns how many."""
        g = self._grants.get(guest_id) if self._grants is not None else None
        if g is None:
            raise InvariantViolation(f"guest {guest_id} has no open grant")
        take = min(int(n), self._n_free)
        if take <= 0:
            return 0
        # Keep the stack's order: the frame the global stack would have handed out first is on top.
        g.push(self._free_stack[self._n_free - take:self._n_free])
        self._n_free -= take
        self._n_granted += take
        return take

    def take_back(self, guest_id: int) -> int:
        """Return what is left of the guest's list to the global stack (its list stays open, empty)."""
        g = self._grants.get(guest_id) if self._grants is not None else None
        if g is None or g.n == 0:
            return 0
        n = g.n
        self._free_stack[self._n_free:self._n_free + n] = g.stack[:n]
        self._n_free += n
        self._n_granted -= n
        g.n = 0
        return n

    def close_grant(self, guest_id: int) -> int:
        """The guest is gone: its list returns to the global stack and closes."""
        n = self.take_back(guest_id)
        if self._grants is not None:
            self._grants.pop(guest_id, None)
        self._spare_grants.pop(guest_id, None)
        return n

    def close_grants(self) -> dict[int, int]:
        """End partitioning: every list returns to the global stack in guest-id order.

        Returns the frames each guest took from its list while it was open
        (its demand in this period).
        """
        if self._grants is None:
            return {}
        taken = {}
        for gid in sorted(self._grants):
            self.take_back(gid)
            taken[gid] = self._grants[gid].taken
        self._spare_grants = self._grants
        self._grants = None
        return taken

    def grant_of(self, owner_guest: int) -> _Grant | None:
        """The guest's open grant (its private free list), or None."""
        return self._grant_of(owner_guest)

    def _grant_of(self, owner_guest: int) -> _Grant | None:
        grants = self._grants
        return None if grants is None else grants.get(owner_guest)

    # -- allocation ---------------------------------------------------------

    @property
    def free_frames(self) -> int:
        """Every FREE frame: the global stack and the guests' private lists."""
        return self._n_free + self._n_granted

    @property
    def global_free_frames(self) -> int:
        """Free frames on the global stack (outside every grant)."""
        return self._n_free

    def grant_left(self, guest_id: int) -> int:
        """Frames left on the guest's private list; -1 without one (``has_grant`` and ``granted`` in one call)."""
        grants = self._grants
        g = None if grants is None else grants.get(guest_id)
        return -1 if g is None else g.n

    def available(self, guest_id: int) -> int:
        """Frames an allocation for ``guest_id`` can take now: its grant when it has one, else the stack."""
        g = self._grant_of(guest_id)
        return self._n_free if g is None else g.n

    @property
    def used_frames(self) -> int:
        return self.total_frames - self.free_frames

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
        if kind == _FREE:
            raise ValueError("cannot allocate frames as FREE")
        g = self._grant_of(owner_guest)
        if g is None:
            take = min(int(n), self._n_free)
            frames = self._free_stack[self._n_free - take:self._n_free][::-1].copy()
            self._n_free -= take
        else:
            take = min(int(n), g.n)
            frames = g.stack[g.n - take:g.n][::-1].copy()
            g.n -= take
            g.taken += take
            self._n_granted -= take
        self.kind[frames] = kind
        self.owner_guest[frames] = owner_guest
        if owner_index is not None:
            self.owner_index[frames] = np.asarray(owner_index, np.int64)[:take]
        if tokens is not None:
            self.token[frames] = np.asarray(tokens, np.uint64)[:take]
        self._kind_frames[_FREE] -= take
        self._kind_frames[kind] += take
        return frames

    def alloc_run(self, kind: FrameKind | int, owner_guest: int, first: int, n: int, src_token: np.ndarray,
                  src_pinned: np.ndarray, out_loc: np.ndarray, out_state: np.ndarray, state_value: int) -> bool:
        """``alloc_one`` for entries ``first .. first + n - 1`` of a disk, in one compiled pass; False if dry.

        Entry ``first + i`` gets the frame the ``i``-th ``alloc_one`` would
        (the free list's top first), holding ``src_token[first + i]``, pinned
        as ``src_pinned[first + i]``; ``out_loc`` and ``out_state`` (the
        disk's) get the frame and ``state_value``. Nothing changes when the
        pool has fewer than ``n`` frames for this owner.
        """
        g, stack, top = self._list_of(owner_guest)
        if top < n:
            return False
        alloc_run(stack, top, n, self.kind, self.owner_guest, self.owner_index, self.token, self.pinned, int(kind),
                  owner_guest, first, src_token, src_pinned, out_loc, out_state, state_value)
        self._took(g, top, n, kind)
        return True

    def alloc_pages(self, kind: FrameKind | int, owner_guest: int, gpfns: np.ndarray, p2m_pinned: np.ndarray,
                    p2m_state: np.ndarray, p2m_loc: np.ndarray, state_value: int) -> bool:
        """``alloc`` of a frame per gpfn (int64, ascending), each holding a zero page, accessed and pinned as
        ``p2m_pinned`` says, then the p2m's ``set(gpfns, state_value, frames)``: one compiled pass, the same
        frames in the same order. False (nothing changed) when the pool has too few for this owner."""
        g, stack, top = self._list_of(owner_guest)
        n = int(gpfns.size)
        if top < n:
            return False
        alloc_pages(stack, top, gpfns, self.kind, self.owner_guest, self.owner_index, self.token, self.pinned,
                    self.accessed, int(kind), owner_guest, p2m_pinned, p2m_state, p2m_loc, state_value)
        self._took(g, top, n, kind)
        return True

    def _list_of(self, owner_guest: int) -> tuple[_Grant | None, np.ndarray, int]:
        """The free list an allocation for ``owner_guest`` takes from: (its grant or None, the stack, its top)."""
        grants = self._grants
        g = None if grants is None else grants.get(owner_guest)
        return (None, self._free_stack, self._n_free) if g is None else (g, g.stack, g.n)

    def _took(self, g: _Grant | None, top: int, n: int, kind: FrameKind | int) -> None:
        """The books once ``n`` frames came off the top of ``g``'s list (None: the global stack) as ``kind``."""
        if g is None:
            self._n_free = top - n
        else:
            g.n = top - n
            g.taken += n
            self._n_granted -= n
        counts = self._kind_frames_mv
        counts[_FREE] -= n
        counts[kind] += n

    def alloc_one(self, kind: FrameKind | int, owner_guest: int, owner_index: int, token: int | None = None) -> int:
        """``alloc`` of one frame, in scalars (the one-page requests that dominate); -1 when the pool is dry.

        Takes the same frame ``alloc(1, ...)`` would.
        """
        grants = self._grants
        g = None if grants is None else grants.get(owner_guest)
        if g is None:
            n = self._n_free
            if n == 0:
                return -1
            n -= 1
            self._n_free = n
            f = self._free_stack_mv[n]
        else:
            n = g.n
            if n == 0:
                return -1
            n -= 1
            g.n = n
            g.taken += 1
            self._n_granted -= 1
            f = g.view[n]
        self.kind_mv[f] = kind
        self.owner_guest_mv[f] = owner_guest
        self.owner_index_mv[f] = owner_index
        if token is not None:
            self.token_mv[f] = token
        counts = self._kind_frames_mv
        counts[_FREE] -= 1
        counts[kind] += 1
        return f

    def free_one(self, frame: int) -> None:
        """``free`` of one frame, in scalars."""
        kind = self.kind_mv[frame]
        if kind == _FREE:
            raise InvariantViolation(f"frame {frame} freed twice")
        counts = self._kind_frames_mv
        counts[kind] -= 1
        counts[_FREE] += 1
        grants = self._grants
        g = None if grants is None else grants.get(self.owner_guest_mv[frame])
        self.kind_mv[frame] = _FREE
        self.owner_guest_mv[frame] = NO_OWNER
        self.owner_index_mv[frame] = NO_OWNER
        self.token_mv[frame] = 0
        self.accessed_mv[frame] = False
        self.dirty_mv[frame] = False
        self.pinned_mv[frame] = False
        self.busy_mv[frame] = False
        if g is not None:
            g.push_one(frame)
            self._n_granted += 1
            return
        self._free_stack_mv[self._n_free] = frame
        self._n_free += 1

    def free_run(self, frames: np.ndarray | list[int], owner: int) -> None:
        """``free_ones`` of frames all held by guest ``owner`` (a dropped cluster's), in one compiled pass.

        The same frames end on the same list in the same order.
        """
        arr = np.ascontiguousarray(frames, np.int64)
        try:
            release_run(arr, owner, self.kind, self.owner_guest, self.owner_index, self.token, self.accessed,
                        self.dirty, self.pinned, self.busy, self._kind_frames)
        except ValueError as exc:
            raise InvariantViolation(str(exc)) from None
        g = None if self._grants is None else self._grants.get(owner)
        if g is not None:
            g.push(arr)
            self._n_granted += arr.size
        else:
            self._free_stack[self._n_free:self._n_free + arr.size] = arr
            self._n_free += arr.size

    def free_ones(self, frames: list[int]) -> None:
        """``free_one`` of each frame in turn (the same stack or grant order), with the views bound once."""
        kind, owner_guest, owner_index, token = self.kind_mv, self.owner_guest_mv, self.owner_index_mv, self.token_mv
        accessed, dirty, pinned, busy = self.accessed_mv, self.dirty_mv, self.pinned_mv, self.busy_mv
        counts, stack, grants = self._kind_frames_mv, self._free_stack_mv, self._grants
        for frame in frames:
            k = kind[frame]
            if k == _FREE:
                raise InvariantViolation(f"frame {frame} freed twice")
            counts[k] -= 1
            counts[_FREE] += 1
            g = None if grants is None else grants.get(owner_guest[frame])
            kind[frame] = _FREE
            owner_guest[frame] = NO_OWNER
            owner_index[frame] = NO_OWNER
            token[frame] = 0
            accessed[frame] = False
            dirty[frame] = False
            pinned[frame] = False
            busy[frame] = False
            if g is not None:
                g.push_one(frame)
                self._n_granted += 1
            else:
                stack[self._n_free] = frame
                self._n_free += 1

    def free(self, frames: np.ndarray) -> None:
        """Return frames to the pool and clear everything they held."""
        frames = np.asarray(frames, np.int64)
        if frames.size == 0:
            return
        kinds = self.kind[frames]
        if _nz(kinds == _FREE):
            bad = int(frames[np.flatnonzero(kinds == _FREE)[0]])
            raise InvariantViolation(f"frame {bad} freed twice")
        if has_duplicates(frames, self.total_frames):
            raise InvariantViolation("the same frame appears twice in one free() call")
        self._kind_frames -= np.bincount(kinds, minlength=len(FrameKind))
        self._kind_frames[_FREE] += frames.size
        owners = self.owner_guest[frames] if self._grants else None
        self.kind[frames] = _FREE
        self.owner_guest[frames] = NO_OWNER
        self.owner_index[frames] = NO_OWNER
        self.token[frames] = 0
        self.accessed[frames] = False
        self.dirty[frames] = False
        self.pinned[frames] = False
        self.busy[frames] = False
        if owners is not None:
            frames = self._to_grants(frames, owners)
        self._free_stack[self._n_free:self._n_free + frames.size] = frames
        self._n_free += frames.size

    def _to_grants(self, frames: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """Push the frames whose owner has a grant onto its list (in the given order); returns the rest."""
        assert self._grants is not None
        first = int(owners[0])
        if _nz(owners == first) == owners.size:   # the usual case: one guest's frames
            g = self._grants.get(first)
            if g is None:
                return frames
            g.push(frames)
            self._n_granted += frames.size
            return frames[:0]
        rest = np.ones(frames.size, bool)
        for gid in np.unique(owners).tolist():
            g = self._grants.get(gid)
            if g is None:
                continue
            mine = owners == gid
            g.push(frames[mine])
            self._n_granted += int(np.count_nonzero(mine))
            rest &= ~mine
        return frames[rest]

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
        granted = 0 if self._grants is None else sum(g.n for g in self._grants.values())
        if int(self._kind_frames.sum()) != self.total_frames or granted != self._n_granted \
                or self._kind_frames[FrameKind.FREE] != self._n_free + self._n_granted \
                or not 0 <= self._n_free <= self.total_frames:
            raise InvariantViolation(f"kind counts drifted: kept {self._kind_frames.tolist()}, free stack "
                                     f"{self._n_free}, granted {self._n_granted} (lists hold {granted}), "
                                     f"total {self.total_frames}")

    def check_invariant(self) -> None:
        """The pool's own consistency; HostMemory cross-checks owners against p2m and vdisks."""
        counted = np.bincount(self.kind, minlength=len(FrameKind))
        if counted.size != len(FrameKind):
            raise InvariantViolation(f"frame kind out of range: {int(self.kind.max())}")
        if not np.array_equal(counted, self._kind_frames):
            raise InvariantViolation(
                f"kind counts drifted: counted {counted.tolist()}, kept {self._kind_frames.tolist()}")
        lists = [self._free_stack[:self._n_free]]
        if self._grants is not None:
            lists += [g.stack[:g.n] for _, g in sorted(self._grants.items())]
        stack = np.concatenate(lists)
        if stack.size != self._n_free + self._n_granted:
            raise InvariantViolation(f"the grants hold {stack.size - self._n_free} frames, "
                                     f"counted {self._n_granted}")
        if counted.sum() != self.total_frames or self.free_frames + self.used_frames != self.total_frames:
            raise InvariantViolation(f"free {self.free_frames} + used {self.used_frames} != total {self.total_frames}")
        if counted[FrameKind.FREE] != stack.size:
            raise InvariantViolation(
                f"{int(counted[FrameKind.FREE])} frames are FREE but the free stack and grants hold {stack.size}")
        if has_duplicates(stack, self.total_frames):
            raise InvariantViolation("a frame is on the free stack (or a grant) twice")
        if np.any(self.kind[stack] != FrameKind.FREE):
            bad = int(stack[np.flatnonzero(self.kind[stack] != FrameKind.FREE)[0]])
            raise InvariantViolation(f"frame {bad} is on the free stack or a grant but kind "
                                     f"{FrameKind(self.kind[bad]).name}")
        free = self.kind == FrameKind.FREE
        if np.any(free & ((self.owner_guest != NO_OWNER) | self.pinned | self.busy | (self.token != 0))):
            bad = int(np.flatnonzero(free & ((self.owner_guest != NO_OWNER) | self.pinned
                                             | self.busy | (self.token != 0)))[0])
            raise InvariantViolation(f"free frame {bad} still carries an owner, pin, busy flag or token")
        owned = ~free
        if np.any(owned & (self.owner_guest == NO_OWNER)):
            bad = int(np.flatnonzero(owned & (self.owner_guest == NO_OWNER))[0])
            raise InvariantViolation(f"frame {bad} of kind {FrameKind(self.kind[bad]).name} has no owner guest")
