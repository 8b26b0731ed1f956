"""The frame invariant of host memory: every frame and swap slot accounted for exactly once.

Every host frame is free, or the frame of exactly one guest page (its p2m
says FRAME there), or a shared frame (``hostd.sharing``) whose refcount is
the number of gpfns, over all guests, whose p2m says SHARED there (zero
only while it waits for the boundary to free it), or the cache frame of exactly one virtual-disk block, or
an I/O buffer of one in-flight disk request, or a frame of one VM's
compression cache (which holds exactly ``ceil(bytes / page)`` of them for
the compressed bytes of its COMPRESSED pages, ``hostd.compress``); every used host swap slot
holds the one guest page whose slot it is (slot = its file's base + gpfn),
and a swap-cache slot belongs to a page that is resident again; every
reference points back (owner, index, token and pin agree on both sides);
a disk block's device copy equals its content unless the block is dirty in
a cache frame. Frames whose eviction waits for a shootdown (``busy``) may
be orphans.

Two ways to check it:

- ``check_full``: everything, by counting every reference. Its cost grows
  with host RAM, swap and every guest's pages.
- ``check_sample``: what is maintained incrementally (the pool's and swap's
  counters) always, plus a deterministic sample: ``FRAMES_PER_CHECK`` frames
  and ``SLOTS_PER_CHECK`` slots, each followed back to its owner's books,
  and ``PAGES_PER_CHECK`` gpfns and disk blocks of ``GUESTS_PER_CHECK``
  guests, each followed forward to its frame or slot. Its cost does not
  grow with the host (but for one sum over each sampled guest's per-cluster
  cache counts). A leak or a double reference is found when one of the
  frames or slots involved is in a sample. The sample is drawn with one
  generator call and tested in a few numpy expressions
  (``hostd.invariant_sample``); only when that test fails does
  ``check_each`` go through it frame by frame to name the inconsistency.

``InvariantChecker`` decides which runs when (``[host] invariant``): with
``"full"`` (the debug setting; the test suite forces it with the environment
variable ``BALLOONLAB_INVARIANT=full``) the full check every
``invariant_every_ticks`` ticks, as before; with ``"sample"`` (the default)
a sample every ``invariant_every_ticks`` ticks and the full check once at
the end of the run. Both report a violation the same way:
``invariant_violated`` with ``what`` and ``when``, counted in
``run_finished.invariant_violations``. The check after a guest leaves is
always full (a guest leaves rarely, and it releases a lot at once).

Both raise ``InvariantViolation`` naming the first inconsistency found, in
the same words.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev

from .errors import HostdError, InvariantViolation
from .framepool import NO_OWNER, FrameKind
from .invariant_sample import MemoryBooks, Sample, draw_sample, sample_holds
from .p2m import NO_LOC, VALID_STATE, PageState
from .sharing import SHARED_OWNER
from .vdisk import CacheState

__all__ = ["check_full", "check_sample", "check_each", "InvariantChecker", "MemoryBooks", "INVARIANT_MODES",
           "FRAMES_PER_CHECK", "SLOTS_PER_CHECK", "GUESTS_PER_CHECK", "PAGES_PER_CHECK"]

log = structlog.get_logger("hostd.invariant")

INVARIANT_MODES = ("sample", "full")
FRAMES_PER_CHECK = 64
SLOTS_PER_CHECK = 64
GUESTS_PER_CHECK = 2
PAGES_PER_CHECK = 64     # gpfns, and as many disk blocks, of each guest in the sample

_FRAME = int(PageState.FRAME)
_SWAPPED = int(PageState.SWAPPED)
_COMPRESSED = int(PageState.COMPRESSED)
_ZERO = int(PageState.ZERO)
_SHARED = int(PageState.SHARED)


# --- the full check -----------------------------------------------------------------


def check_full(mem: "MemoryBooks") -> None:
    """Raise ``InvariantViolation`` naming the first inconsistency found.

    Frames with a pending shootdown (busy) may be orphans; everything else
    must be referenced exactly once, and every reference must point back.
    """
    pool, swap = mem.pool, mem.swap
    pool.check_invariant()
    swap.check_invariant()
    slot_lists: list[np.ndarray] = [np.zeros(0, np.int64)]
    frame_lists: list[np.ndarray] = [np.zeros(0, np.int64)]
    shared_lists: list[np.ndarray] = [np.zeros(0, np.int64)]
    gids = mem.guest_ids()
    for gid in gids:
        _check_guest(mem, gid, None, None, slot_lists, frame_lists, shared_lists)
    sharing = getattr(mem, "sharing", None)
    if sharing is not None:
        _check_shared(mem, sharing, np.concatenate(shared_lists))
        frame_lists.append(np.flatnonzero(sharing.shared))     # each shared frame: the sharing table's
    slot_refs = np.bincount(np.concatenate(slot_lists), minlength=swap.n_slots)
    frame_refs = np.bincount(np.concatenate(frame_lists), minlength=pool.total_frames)
    kind = pool.kind
    owned = kind != FrameKind.FREE
    known = np.isin(pool.owner_guest, np.asarray(gids, np.int64))
    if sharing is not None:
        known |= sharing.shared
    stray = owned & ~pool.busy & ~known
    if np.any(stray):
        _unknown_owner(mem, int(np.flatnonzero(stray)[0]))
    unref = owned & ~pool.busy & (frame_refs == 0)
    if np.any(unref):
        _frame_leak(mem, int(np.flatnonzero(unref)[0]))
    if np.any(frame_refs > 1):
        f = int(np.flatnonzero(frame_refs > 1)[0])
        raise InvariantViolation(f"frame {f} is referenced {int(frame_refs[f])} times")
    if np.any(frame_refs[~owned] > 0):
        f = int(np.flatnonzero(frame_refs[~owned] > 0)[0])
        raise InvariantViolation(f"free frame {int(np.flatnonzero(~owned)[f])} is still referenced")
    leaked = swap.used & (slot_refs == 0)
    if np.any(leaked):
        _slot_leak(mem, int(np.flatnonzero(leaked)[0]))
    if np.any(slot_refs > 1):
        s = int(np.flatnonzero(slot_refs > 1)[0])
        raise InvariantViolation(f"swap slot {s} is referenced {int(slot_refs[s])} times")
    if np.any(slot_refs[~swap.used] > 0):
        s = int(np.flatnonzero((slot_refs > 0) & ~swap.used)[0])
        raise InvariantViolation(f"swap slot {s} is referenced but free")


def _check_shared(mem: "MemoryBooks", sharing: "object", sharer_frames: np.ndarray) -> None:
    """Each shared frame is a GUEST frame of no one guest whose refcount counts its SHARED gpfns."""
    pool = mem.pool
    shared = sharing.shared                           # type: ignore[attr-defined]
    refs = sharing.refs                               # type: ignore[attr-defined]
    f = np.flatnonzero(shared)
    ok = (pool.kind[f] == FrameKind.GUEST) & (pool.owner_guest[f] == SHARED_OWNER)
    if not np.all(ok):
        bad = int(f[np.flatnonzero(~ok)[0]])
        raise InvariantViolation(f"shared frame {bad} is {FrameKind(pool.kind[bad]).name} of guest "
                                 f"{int(pool.owner_guest[bad])}, not a shared guest frame")
    stray = (pool.owner_guest == SHARED_OWNER) & ~shared
    if np.any(stray):
        raise InvariantViolation(f"frame {int(np.flatnonzero(stray)[0])} is marked shared in the pool but not "
                                 "in the sharing table")
    counted = np.bincount(sharer_frames, minlength=pool.total_frames)
    wrong = shared & (counted != refs)
    if np.any(wrong):
        bad = int(np.flatnonzero(wrong)[0])
        raise InvariantViolation(f"shared frame {bad} has refcount {int(refs[bad])} but {int(counted[bad])} "
                                 "SHARED gpfns map it")
    if np.any(counted[~shared]):
        bad = int(np.flatnonzero(counted * ~shared)[0])
        raise InvariantViolation(f"frame {bad} is mapped SHARED but is not a shared frame")
    empty = np.flatnonzero(shared & (refs == 0))
    if empty.size and not np.all(np.isin(empty, sharing.released_pending)):   # type: ignore[attr-defined]
        bad = int(empty[~np.isin(empty, sharing.released_pending)][0])        # type: ignore[attr-defined]
        raise InvariantViolation(f"shared frame {bad} has no sharer and is not waiting to be freed (leak)")


def _unknown_owner(mem: "MemoryBooks", f: int) -> None:
    pool = mem.pool
    raise InvariantViolation(f"frame {f} ({FrameKind(pool.kind[f]).name}) belongs to unknown guest "
                             f"{int(pool.owner_guest[f])}")


def _frame_leak(mem: "MemoryBooks", f: int) -> None:
    pool = mem.pool
    raise InvariantViolation(
        f"frame {f} ({FrameKind(pool.kind[f]).name}) of guest {int(pool.owner_guest[f])} index "
        f"{int(pool.owner_index[f])} is referenced by nobody (frame leak)")


def _slot_leak(mem: "MemoryBooks", s: int) -> None:
    swap = mem.swap
    raise InvariantViolation(f"swap slot {s} (guest {int(swap.owner_guest[s])}) is used but referenced by "
                             f"nobody (slot leak)")


# --- one guest: every gpfn (full) or some (sample) ---------------------------------------


def _check_guest(mem: "MemoryBooks", gid: int, pages: np.ndarray | None, blocks: np.ndarray | None,
                 slot_refs: list[np.ndarray], frame_refs: list[np.ndarray],
                 shared_refs: list[np.ndarray] | None = None) -> None:
    """Forward checks from the guest's gpfns and disk blocks: all of them (None), or these."""
    pool, p2m = mem.pool, mem.p2m(gid)
    state = p2m.state if pages is None else p2m.state[pages]
    loc = p2m.loc if pages is None else p2m.loc[pages]

    def where(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask) if pages is None else pages[mask]

    if not np.all(VALID_STATE[state]):
        bad = int(where(~VALID_STATE[state])[0])
        raise InvariantViolation(f"guest {gid} gpfn {bad} has no valid state ({int(p2m.state[bad])})")
    on_frame = where(state == _FRAME)
    f = p2m.loc[on_frame]
    if np.any((f < 0) | (f >= pool.total_frames)):
        raise InvariantViolation(f"guest {gid}: a FRAME gpfn points outside the pool")
    ok = ((pool.kind[f] == FrameKind.GUEST) & (pool.owner_guest[f] == gid)
          & (pool.owner_index[f] == on_frame) & (pool.pinned[f] == p2m.pinned[on_frame]))
    if not np.all(ok):
        i = int(np.flatnonzero(~ok)[0])
        gp, fr = int(on_frame[i]), int(f[i])
        raise InvariantViolation(
            f"guest {gid} gpfn {gp} is FRAME {fr} but that frame is {FrameKind(pool.kind[fr]).name} of guest "
            f"{int(pool.owner_guest[fr])} index {int(pool.owner_index[fr])} pinned {bool(pool.pinned[fr])}")
    frame_refs.append(f)
    on_shared = where(state == _SHARED)
    if on_shared.size:
        sharing = getattr(mem, "sharing", None)
        f = p2m.loc[on_shared]
        if sharing is None or np.any((f < 0) | (f >= pool.total_frames)):
            raise InvariantViolation(f"guest {gid} gpfn {int(on_shared[0])} is SHARED but there is no shared frame "
                                     "it could be")
        ok = sharing.shared[f] & (sharing.refs[f] > 0)
        if not np.all(ok):
            i = int(np.flatnonzero(~ok)[0])
            raise InvariantViolation(f"guest {gid} gpfn {int(on_shared[i])} is SHARED on frame {int(f[i])}, which "
                                     f"is not a live shared frame (refs {int(sharing.refs[f[i]])})")
        if shared_refs is not None:
            shared_refs.append(f)
    on_swap = where(state == _SWAPPED)
    s = p2m.loc[on_swap]
    _check_slots(mem, s, on_swap, gid)
    slot_refs.append(s)
    swap = mem.swap
    base = swap.base(gid)
    cached_gpfns = (np.flatnonzero(swap.cached[swap.extent(gid)]) if pages is None
                    else pages[swap.cached[base + pages]])
    # a swap-cache copy is of a page the host holds elsewhere: in a frame (private or shared,
    # write-protected), compressed, or as a zero page
    away = p2m.state[cached_gpfns]
    away = (away != _FRAME) & (away != _SHARED) & (away != _COMPRESSED) & (away != _ZERO)
    if np.any(away):
        bad = int(cached_gpfns[np.flatnonzero(away)[0]])
        raise InvariantViolation(f"guest {gid} gpfn {bad} is {PageState(p2m.state[bad]).name} but its swap slot "
                                 f"still holds a swap-cache copy")
    stray = (state != _FRAME) & (state != _SWAPPED) & (state != _SHARED) & (loc != NO_LOC)
    if np.any(stray):
        bad = int(where(stray)[0])
        raise InvariantViolation(f"guest {gid} gpfn {bad} is {PageState(p2m.state[bad]).name} "
                                 f"but has location {int(p2m.loc[bad])}")
    balloon, max_balloon = mem.balloon_pages(gid), mem.max_balloon_pages(gid)
    # Counting every BALLOONED gpfn is the full check's; the sample checks the counter's bound.
    ballooned = int(np.count_nonzero(p2m.state == PageState.BALLOONED)) if pages is None else balloon
    if ballooned != balloon or ballooned > max_balloon:
        raise InvariantViolation(f"guest {gid}: {ballooned} gpfns BALLOONED, counter says {balloon}, "
                                 f"max {max_balloon}")
    zip_ = getattr(mem, "zip", None)
    if zip_ is not None:
        zip_.check_guest(gid, p2m, pages)
        frame_refs.append(zip_.frames_of(gid))
    elif np.any((state == _COMPRESSED) | (state == _ZERO)):
        bad = int(where((state == _COMPRESSED) | (state == _ZERO))[0])
        raise InvariantViolation(f"guest {gid} gpfn {bad} is {PageState(p2m.state[bad]).name} but the host "
                                 f"has no compression books")
    _check_vdisk(mem, gid, blocks, slot_refs, frame_refs)


def _check_slots(mem: "MemoryBooks", slots: np.ndarray, gpfns: np.ndarray, gid: int) -> None:
    swap = mem.swap
    if np.any((slots < 0) | (slots >= swap.n_slots)):
        raise InvariantViolation(f"guest {gid}: a SWAPPED gpfn points outside host swap")
    ok = swap.used[slots] & (swap.owner_guest[slots] == gid) & (slots == swap.base(gid) + gpfns)
    if not np.all(ok):
        i = int(np.flatnonzero(~ok)[0])
        sl = int(slots[i])
        raise InvariantViolation(
            f"guest {gid} gpfn {int(gpfns[i])} is SWAPPED in slot {sl} but that slot is used={bool(swap.used[sl])} "
            f"in the file of guest {int(swap.owner_guest[sl])} (its own slot is {swap.base(gid) + int(gpfns[i])})")


def _check_vdisk(mem: "MemoryBooks", gid: int, blocks: np.ndarray | None, slot_refs: list[np.ndarray],
                 frame_refs: list[np.ndarray]) -> None:
    pool, vd = mem.pool, mem.vdisk(gid)
    state = vd.cache_state if blocks is None else vd.cache_state[blocks]

    def where(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask) if blocks is None else blocks[mask]

    in_frame = where(state == CacheState.FRAME)
    f = vd.cache_loc[in_frame]
    ok = ((pool.kind[f] == FrameKind.CACHE) & (pool.owner_guest[f] == gid)
          & (pool.owner_index[f] == in_frame) & (pool.token[f] == vd.tokens[in_frame])
          & (pool.pinned[f] == vd.pinned[in_frame]))
    if not np.all(ok):
        i = int(np.flatnonzero(~ok)[0])
        raise InvariantViolation(f"guest {gid} vdisk block {int(in_frame[i])}: cache frame {int(f[i])} "
                                 f"is not a CACHE frame of this block holding its content")
    frame_refs.append(f)
    dirty = vd.dirty if blocks is None else vd.dirty[blocks]
    if np.any(dirty & (state != CacheState.FRAME)):
        raise InvariantViolation(f"guest {gid} vdisk block {int(where(dirty & (state != CacheState.FRAME))[0])} "
                                 f"is dirty but not cached: its content is lost")
    img = vd.image if blocks is None else vd.image[blocks]
    tok = vd.tokens if blocks is None else vd.tokens[blocks]
    if np.any(~dirty & (img != tok)):
        raise InvariantViolation(f"guest {gid} vdisk block {int(where(~dirty & (img != tok))[0])} is clean but "
                                 f"the device holds other content")
    loc = vd.cache_loc if blocks is None else vd.cache_loc[blocks]
    if np.any((state == CacheState.NOT_CACHED) & (loc != NO_LOC)):
        raise InvariantViolation(f"guest {gid}: an uncached vdisk block still has a location")
    if blocks is None:
        per_cluster = np.bincount(in_frame // vd.cluster_pages, minlength=vd.cluster_cached.size)
        if not np.array_equal(per_cluster, vd.cluster_cached):
            raise InvariantViolation(f"guest {gid}: vdisk per-cluster cached counts drifted")
        per_cluster = np.bincount(np.flatnonzero(vd.dirty) // vd.cluster_pages, minlength=vd.cluster_dirty.size)
        if not np.array_equal(per_cluster, vd.cluster_dirty):
            raise InvariantViolation(f"guest {gid}: vdisk per-cluster dirty counts drifted")
        if vd.cached_pages != in_frame.size or vd.dirty_pages != int(np.count_nonzero(vd.dirty)):
            raise InvariantViolation(f"guest {gid}: vdisk counts {vd.cached_pages} cached and {vd.dirty_pages} "
                                     f"dirty pages, has {in_frame.size} and {int(np.count_nonzero(vd.dirty))}")
    elif vd.cached_pages != int(vd.cluster_cached.sum()):
        raise InvariantViolation(f"guest {gid}: vdisk counts {vd.cached_pages} cached pages, "
                                 f"its clusters {int(vd.cluster_cached.sum())}")
    io = vd.iobuf_frames()
    if np.any((pool.kind[io] != FrameKind.IOBUF) | (pool.owner_guest[io] != gid)):
        raise InvariantViolation(f"guest {gid}: an in-flight request holds a frame that is not its IOBUF")
    frame_refs.append(io)


# --- the sample --------------------------------------------------------------------------


def check_sample(mem: "MemoryBooks", rng: np.random.Generator) -> None:
    """The maintained counters, and a sample of frames, slots and guest pages (see the module docstring).

    The sample is tested by ``hostd.invariant_sample`` in a few numpy
    expressions; only when that test fails do the per-frame checks below
    run over the same sample, to name the first inconsistency.
    """
    pool, swap = mem.pool, mem.swap
    pool.check_counters()      # O(guests with a grant): the pool's kind counts, free stack and grant lists
    swap.check_counters()      # O(1)
    gids = mem.guest_ids()
    sample = draw_sample(mem, gids, rng, FRAMES_PER_CHECK, SLOTS_PER_CHECK, GUESTS_PER_CHECK, PAGES_PER_CHECK)
    if not sample_holds(mem, gids, sample):
        _explain(mem, gids, sample)


def _explain(mem: "MemoryBooks", gids: list[int], sample: Sample) -> None:
    """Raise naming the sample's first inconsistency, in the per-frame checks' words."""
    check_each(mem, gids, sample)
    # Each condition of the fast test is one of the per-frame checks': reaching here is a bug in the checker.
    raise InvariantViolation("the sampled invariant's fast test failed but the per-frame checks find nothing "
                             f"(frames {np.unique(sample.frames).tolist()}, slots {np.unique(sample.slots).tolist()}, "
                             f"guests {[g for g, _, _ in sample.guests]})")


def check_each(mem: "MemoryBooks", gids: list[int], sample: Sample) -> None:
    """The sample checked one frame and one slot at a time, then each guest: raise at the first inconsistency.

    Frames, then slots, lowest number first, then the guests by id. Slow
    (Python per frame); ``check_sample`` runs it only once its fast test failed.
    """
    known = set(gids)
    for f in np.unique(sample.frames).tolist():
        _frame_points_back(mem, f, known)
    for s in np.unique(sample.slots).tolist():
        _slot_points_back(mem, s, known)
    unused: list[np.ndarray] = []
    for gid, pages, blocks in sample.guests:
        _check_guest(mem, gid, np.unique(pages), np.unique(blocks), unused, unused)


def _frame_points_back(mem: "MemoryBooks", f: int, known: set[int]) -> None:
    """Frame ``f`` is free and clean, or its owner's books hold it exactly where the frame says."""
    pool = mem.pool
    kind = int(pool.kind[f])
    owner = int(pool.owner_guest[f])
    if kind == FrameKind.FREE:
        if owner != NO_OWNER or pool.pinned[f] or pool.busy[f] or pool.token[f] != 0:
            raise InvariantViolation(f"free frame {f} still carries an owner, pin, busy flag or token")
        return
    if pool.busy[f]:
        return   # its eviction waits for a shootdown: it may be an orphan
    if owner == SHARED_OWNER:
        sharing = getattr(mem, "sharing", None)
        if sharing is None or not sharing.shared[f] or kind != FrameKind.GUEST:
            _frame_leak(mem, f)
        return
    if owner not in known:
        _unknown_owner(mem, f)
    index = int(pool.owner_index[f])
    if kind == FrameKind.GUEST:
        p2m = mem.p2m(owner)
        held = 0 <= index < p2m.guest_pages and p2m.state[index] == _FRAME and p2m.loc[index] == f
    elif kind == FrameKind.CACHE:
        vd = mem.vdisk(owner)
        held = (0 <= index < vd.n_blocks and vd.cache_state[index] == CacheState.FRAME
                and vd.cache_loc[index] == f)
    elif kind == FrameKind.ZCACHE:
        zip_ = getattr(mem, "zip", None)
        held = zip_ is not None and zip_.holds_frame(owner, f)
    else:
        held = bool(np.any(mem.vdisk(owner).iobuf_frames() == f))
    if not held:
        _frame_leak(mem, f)


def _slot_points_back(mem: "MemoryBooks", s: int, known: set[int]) -> None:
    """A used slot ``s`` is held by its owner's books where the slot says (or reserved for an eviction)."""
    swap = mem.swap
    if not swap.used[s]:
        return
    owner = int(swap.owner_guest[s])
    held = False
    if owner in known:
        index = s - swap.base(owner)
        p2m = mem.p2m(owner)
        held = 0 <= index < p2m.guest_pages and p2m.state[index] == _SWAPPED and p2m.loc[index] == s
    if not held:
        _slot_leak(mem, s)


# --- when ---------------------------------------------------------------------------------


class InvariantChecker:
    """Runs the frame invariant when it is due and reports what it finds.

    Call order (from the machine)::

        tick(tick)* | after_guest_left()* ... -> finish()   (at the end of the run)
    """

    def __init__(self, mem: "MemoryBooks", mode: str, every_ticks: int, rng: np.random.Generator) -> None:
        if mode not in INVARIANT_MODES:
            raise ValueError(f"invariant mode {mode!r} is not one of {list(INVARIANT_MODES)}")
        self.mem = mem
        self.mode = mode
        self.every_ticks = max(1, int(every_ticks))
        self.rng = rng               # its own stream: sampling must not move host memory's generator
        self.violations = 0
        self.sampled_checks = 0
        self._ended = False          # the end's full check ran (``check_end``) and nothing left since

    def tick(self, tick: int) -> None:
        if (tick + 1) % self.every_ticks:
            return
        if self.mode == "full":
            self._run("tick", check_full)
        else:
            self.sampled_checks += 1
            self._run("tick", lambda mem: check_sample(mem, self.rng))

    def after_guest_left(self) -> None:
        self._ended = False
        self._run("guest_gone", check_full)

    def check_end(self) -> HostdError | None:
        """The end of the run's full check, now (the audit's, once every tick is over): what it found, or None.

        Counted and logged as ``finish`` counts it, which then does not run it
        again unless a guest left since (the only change host memory sees
        between the audit and the run's end).
        """
        try:
            check_full(self.mem)
            found = None
        except HostdError as exc:
            found = exc
            if self.mode == "sample":
                self.violations += 1
                log.error(ev.INVARIANT_VIOLATED, what=str(exc), when="run_end")
        self._ended = True
        return found

    def finish(self) -> None:
        """The end of the run: the full check, unless every tick had it already (or ``check_end`` did)."""
        if self.mode == "sample" and not self._ended:
            self._run("run_end", check_full)

    def _run(self, when: str, check: Callable[["MemoryBooks"], None]) -> None:
        try:
            check(self.mem)
        except HostdError as exc:
            self.violations += 1
            log.error(ev.INVARIANT_VIOLATED, what=str(exc), when=when)
