"""The sampled frame invariant's fast test: does the sample hold? (``hostd.invariant.check_sample``)

``draw_sample`` draws the frames, slots, guests, gpfns and disk blocks to
look at from one generator call; ``sample_holds`` answers whether every one
of them is consistent, as a handful of numpy expressions over the sampled
index arrays. A numpy call on 64 elements costs about as much as on one, so
each kind of check is one expression over the whole sample, not a Python
loop per frame: the per-guest work is only gathering that guest's entries,
and the tests run once over all guests' entries together.

It only answers yes or no. When the answer is no, ``check_sample`` runs the
per-frame checks of ``hostd.invariant`` over the same sample, which name the
first inconsistency in the words of the full check; a sample that holds
costs no message building. Every condition here is one of those checks', so
the two agree on every sample (``tests/test_host_invariant_sample.py``
checks that they do).
"""
from __future__ import annotations

from functools import lru_cache
from itertools import accumulate
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from .errors import InvariantViolation
from .framepool import NO_OWNER, FrameKind
from .p2m import NO_LOC, VALID_STATE, PageState
from .sharing import SHARED_OWNER
from .vdisk import CacheState

if TYPE_CHECKING:
    from .framepool import FramePool
    from .hostswap import HostSwap
    from .p2m import P2M
    from .vdisk import VirtualDisk

__all__ = ["MemoryBooks", "Sample", "draw_sample", "sample_holds"]


class MemoryBooks(Protocol):
    """What the invariant reads of host memory (``HostMemory`` has it all)."""

    pool: FramePool
    swap: HostSwap

    @property
    def evictions_pending(self) -> int: ...

    def guest_ids(self) -> list[int]: ...

    def p2m(self, guest_id: int) -> P2M: ...

    def vdisk(self, guest_id: int) -> VirtualDisk: ...

    def balloon_pages(self, guest_id: int) -> int: ...

    def max_balloon_pages(self, guest_id: int) -> int: ...


_FRAME = int(PageState.FRAME)
_SWAPPED = int(PageState.SWAPPED)
_SHARED = int(PageState.SHARED)
_FREE_KIND = int(FrameKind.FREE)
_GUEST_KIND = int(FrameKind.GUEST)
_CACHE_KIND = int(FrameKind.CACHE)
_IOBUF_KIND = int(FrameKind.IOBUF)
_ZCACHE_KIND = int(FrameKind.ZCACHE)
_CACHED = int(CacheState.FRAME)
_NOT_CACHED = int(CacheState.NOT_CACHED)
# A frame's owner index points into a p2m (GUEST) or a disk's block table (CACHE), a used swap slot
# into its owner's p2m; a live reference's entry there is FRAME (the same code in both tables) or SWAPPED.
# Kinds above CACHE are looked up elsewhere (``_held_elsewhere``).
assert _FRAME == _CACHED and (_GUEST_KIND, _CACHE_KIND) == (1, 2) and _IOBUF_KIND > _CACHE_KIND < _ZCACHE_KIND

# Constant columns to slice views of (a slot's table code is GUEST's: both look in the p2m)
_MAX_SAMPLE = 4096
_GUEST_CODES = np.full(_MAX_SAMPLE, _GUEST_KIND, np.uint8)
_FRAME_CODES = np.full(_MAX_SAMPLE, _FRAME, np.uint8)
_SWAPPED_CODES = np.full(_MAX_SAMPLE, _SWAPPED, np.uint8)
for _codes in (_GUEST_CODES, _FRAME_CODES, _SWAPPED_CODES):
    _codes.flags.writeable = False


def _column(codes: np.ndarray, n: int) -> np.ndarray:
    return codes[:n] if n <= codes.size else np.full(n, codes[0], codes.dtype)


def _states(*states: PageState) -> np.ndarray:
    table = np.zeros(VALID_STATE.size, bool)
    table[[int(s) for s in states]] = True
    return table


# Tables indexed by a p2m state code (uint8): one gather answers "is this state one of ...".
_LOCLESS = ~_states(PageState.FRAME, PageState.SWAPPED, PageState.SHARED)
_NOT_HELD_ELSEWHERE = ~_states(PageState.FRAME, PageState.SHARED, PageState.COMPRESSED, PageState.ZERO)
_BAD_STATE = {True: ~VALID_STATE,                                                # with compression books
              False: ~VALID_STATE | _states(PageState.COMPRESSED, PageState.ZERO)}


_nz = np.count_nonzero     # a plain C call: ``mask.any()`` costs several times as much on 64 elements


def _not_all(mask: np.ndarray) -> bool:
    return np.count_nonzero(mask) != mask.size


class Sample(NamedTuple):
    """What one sampled check looks at; indices may repeat (a repeat is checked twice, harmlessly)."""

    frames: np.ndarray
    slots: np.ndarray
    guests: list[tuple[int, np.ndarray, np.ndarray]]    # (guest id, gpfns, disk blocks), by guest id


def draw_sample(mem: "MemoryBooks", gids: list[int], rng: np.random.Generator, frames: int, slots: int,
                guests: int, pages: int) -> Sample:
    """``frames`` frames, ``slots`` slots, ``guests`` distinct guests and ``pages`` gpfns and blocks of each.

    One ``rng.random`` call: the first floats pick the guests (a partial
    Fisher-Yates shuffle), the rest scaled by their range's size and
    truncated are the indices (``floor(u * n) < n`` for every ``u < 1``).
    """
    pool, swap = mem.pool, mem.swap
    n_pick = min(guests, len(gids))
    u = rng.random(n_pick + frames + slots + 2 * pages * n_pick)
    order = list(range(len(gids)))
    for j, x in enumerate(u[:n_pick].tolist()):
        r = j + int(x * (len(gids) - j))
        order[j], order[r] = order[r], order[j]
    picked = sorted(gids[i] for i in order[:n_pick])
    sizes = [pool.total_frames, swap.n_slots]
    for gid in picked:
        sizes += [mem.p2m(gid).guest_pages, mem.vdisk(gid).n_blocks]
    scale, cuts = _scale(tuple(sizes), frames, slots, pages)
    drawn = (u[n_pick:n_pick + scale.size] * scale).astype(np.int64)
    parts = [drawn[a:b] for a, b in cuts]
    return Sample(parts[0], parts[1], [(gid, parts[2 + 2 * i], parts[3 + 2 * i]) for i, gid in enumerate(picked)])


@lru_cache(maxsize=256)
def _scale(sizes: tuple[int, ...], frames: int, slots: int, pages: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Each drawn float's range size, and each range's slice of the draws (the same tuple: the same arrays)."""
    counts = [frames, slots, *[pages] * (len(sizes) - 2)]
    counts = [c if n else 0 for c, n in zip(counts, sizes)]          # nothing to draw from an empty range
    scale = np.repeat(np.asarray(sizes, np.float64), counts)
    scale.flags.writeable = False
    ends = list(accumulate(counts))
    return scale, list(zip([0, *ends[:-1]], ends))


def sample_holds(mem: "MemoryBooks", gids: list[int], sample: Sample) -> bool:
    """Whether every sampled frame, slot, gpfn and block is consistent (see the module docstring)."""
    return _forward_holds(mem, sample.guests) and _backward_holds(mem, gids, sample.frames, sample.slots)


# --- forward: from the sampled gpfns and blocks to their frames and slots ---------------------------


def _forward_holds(mem: "MemoryBooks", guests: list[tuple[int, np.ndarray, np.ndarray]]) -> bool:
    if not guests:
        return True
    pool, swap = mem.pool, mem.swap
    zip_ = getattr(mem, "zip", None)
    states, locs, gpfns, pins, bases = [], [], [], [], []
    for gid, pages, blocks in guests:
        p2m = mem.p2m(gid)
        if mem.balloon_pages(gid) > mem.max_balloon_pages(gid):
            return False
        if zip_ is not None:
            try:
                zip_.check_guest(gid, p2m, pages)
            except InvariantViolation:
                return False
        if not _disk_holds(mem, gid, blocks):
            return False
        states.append(p2m.state[pages])
        locs.append(p2m.loc[pages])
        pins.append(p2m.pinned[pages])
        gpfns.append(pages)
        bases.append(swap.base(gid))
    st, loc, gp = np.concatenate(states), np.concatenate(locs), np.concatenate(gpfns)
    owner, base = _per_page(tuple(g for g, _, _ in guests), tuple(bases), tuple(p.size for p in gpfns))
    own_slot = gp + base
    bad = (_BAD_STATE[zip_ is not None][st] | (_LOCLESS[st] & (loc != NO_LOC))
           | (_NOT_HELD_ELSEWHERE[st] & swap.cached[own_slot]))
    if _nz(bad):
        return False
    on = st == _FRAME
    f = loc[on]
    if f.size:
        if _nz(f.view(np.uint64) >= pool.total_frames):       # a negative location wraps to a huge one
            return False
        ok = ((pool.kind[f] == _GUEST_KIND) & (pool.owner_guest[f] == owner[on]) & (pool.owner_index[f] == gp[on])
              & (pool.pinned[f] == np.concatenate(pins)[on]))
        if _not_all(ok):
            return False
    on = st == _SWAPPED
    s = loc[on]
    if s.size:
        if _nz(s.view(np.uint64) >= swap.n_slots):
            return False
        if _not_all(swap.used[s] & (swap.owner_guest[s] == owner[on]) & (s == own_slot[on])):
            return False
    on = st == _SHARED
    if _nz(on):
        sharing = getattr(mem, "sharing", None)
        f = loc[on]
        if sharing is None or _nz(f.view(np.uint64) >= pool.total_frames):
            return False
        if _not_all(sharing.shared[f] & (sharing.refs[f] > 0)):
            return False
    return True


@lru_cache(maxsize=256)
def _per_page(gids: tuple[int, ...], bases: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Each sampled gpfn's guest and that guest's first swap slot (the same tuples: the same arrays)."""
    owner = np.repeat(np.asarray(gids, np.int32), sizes)
    base = np.repeat(np.asarray(bases, np.int64), sizes)
    owner.flags.writeable = base.flags.writeable = False
    return owner, base


def _disk_holds(mem: "MemoryBooks", gid: int, blocks: np.ndarray) -> bool:
    pool, vd = mem.pool, mem.vdisk(gid)
    # O(clusters of the disk), not O(sample): one sum over an int64 array, a few microseconds
    if vd.cached_pages != int(vd.cluster_cached.sum()):
        return False
    io = vd.iobuf_frames()
    if io.size and _nz((pool.kind[io] != _IOBUF_KIND) | (pool.owner_guest[io] != gid)):
        return False
    if not blocks.size:
        return True
    cs, dirty, loc = vd.cache_state[blocks], vd.dirty[blocks], vd.cache_loc[blocks]
    tok = vd.tokens[blocks]
    cached = cs == _CACHED
    bad = (dirty & ~cached) | (~dirty & (vd.image[blocks] != tok)) | ((cs == _NOT_CACHED) & (loc != NO_LOC))
    if _nz(bad):
        return False
    if _nz(cached):
        b, f = blocks[cached], loc[cached]
        ok = ((pool.kind[f] == _CACHE_KIND) & (pool.owner_guest[f] == gid) & (pool.owner_index[f] == b)
              & (pool.token[f] == tok[cached]) & (pool.pinned[f] == vd.pinned[b]))
        if _not_all(ok):
            return False
    return True


# --- backward: from the sampled frames and slots to their owners' books -----------------------------


def _backward_holds(mem: "MemoryBooks", gids: list[int], frames: np.ndarray, slots: np.ndarray) -> bool:
    """Each sampled frame is free and clean, or busy, or where its owner's books say; each used slot too."""
    pool, swap = mem.pool, mem.swap
    kind, owner, busy = pool.kind[frames], pool.owner_guest[frames], pool.busy[frames]
    free = kind == _FREE_KIND
    if _nz(free & ((owner != NO_OWNER) | pool.pinned[frames] | busy | (pool.token[frames] != 0))):
        return False
    live = ~(free | busy)            # a busy frame's eviction waits for a shootdown: it may be an orphan
    shared = live & (owner == SHARED_OWNER)
    if _nz(shared):
        sharing = getattr(mem, "sharing", None)
        if sharing is None or _not_all(sharing.shared[frames[shared]] & (kind[shared] == _GUEST_KIND)):
            return False
        live &= ~shared
    odd = live & (kind > _CACHE_KIND)
    if _nz(odd):
        if not _held_elsewhere(mem, gids, frames[odd], kind[odd], owner[odd]):
            return False
        live &= ~odd
    used = slots[swap.used[slots]]
    f = frames[live]
    who = np.concatenate((owner[live], swap.owner_guest[used]))
    if not who.size:
        return True
    if not gids:
        return False
    known = np.asarray(gids, np.int32)                    # sorted
    at = known.searchsorted(who)
    if _not_all(known.take(at, mode="clip") == who):
        return False
    # One list of references to look up, grouped by (owner, table): a GUEST frame (its owner's p2m entry
    # at its index, FRAME there), a used slot (its owner's p2m entry at slot - base, SWAPPED there), a
    # CACHE frame (its owner's disk block at its index, cached there). Each group's table is read with
    # one ``take`` per column.
    n_frames = f.size
    key = at * 4 + np.concatenate((kind[live], _column(_GUEST_CODES, used.size)))
    ref = np.concatenate((f, used))
    index = np.concatenate((pool.owner_index[f], used))
    want = np.concatenate((_column(_FRAME_CODES, n_frames), _column(_SWAPPED_CODES, used.size)))
    if used.size:
        slot_owners = set(who[n_frames:].tolist())
        base = np.asarray([swap.base(g) if g in slot_owners else 0 for g in gids], np.int64)
        index[n_frames:] -= base[at[n_frames:]]
    order = key.argsort()
    key, ref, index, want = key[order], ref[order], index[order], want[order]
    n = ref.size
    got_state, got_loc, limit = np.empty(n, np.uint8), np.empty(n, np.int64), np.empty(n, np.uint64)
    keys = key.tolist()
    starts = [0, *((key[1:] != key[:-1]).nonzero()[0] + 1).tolist(), n]
    for a, b in zip(starts[:-1], starts[1:]):
        k = keys[a]
        gid = gids[k >> 2]
        if k & 3 == _CACHE_KIND:
            vd = mem.vdisk(gid)
            state, loc, limit[a:b] = vd.cache_state, vd.cache_loc, vd.n_blocks
        else:
            p2m = mem.p2m(gid)
            state, loc, limit[a:b] = p2m.state, p2m.loc, p2m.guest_pages
        # clip: an index out of range reads some entry, and the range test below fails it anyway
        state.take(index[a:b], out=got_state[a:b], mode="clip")
        loc.take(index[a:b], out=got_loc[a:b], mode="clip")
    return not _not_all((index.view(np.uint64) < limit) & (got_state == want) & (got_loc == ref))


def _held_elsewhere(mem: "MemoryBooks", gids: list[int], frames: np.ndarray, kind: np.ndarray,
                    owner: np.ndarray) -> bool:
    """Frames that are neither a guest page's nor a block's: I/O buffers and compression caches."""
    zip_ = getattr(mem, "zip", None)
    for gid in np.unique(owner).tolist():
        if gid not in gids:
            return False
        mine = owner == gid
        zc = mine & (kind == _ZCACHE_KIND)
        if _nz(zc):
            if zip_ is None or _not_all(np.isin(frames[zc], _zip_frames(zip_, gid))):
                return False
        io = mine & ~zc            # any other kind: an in-flight request's buffer, as the per-frame check reads it
        if _nz(io) and _not_all(np.isin(frames[io], mem.vdisk(gid).iobuf_frames())):
            return False
    return True


def _zip_frames(zip_: Any, gid: int) -> np.ndarray:
    try:
        return zip_.frames_of(gid)
    except KeyError:                                      # no compression books for this guest
        return np.zeros(0, np.int64)
