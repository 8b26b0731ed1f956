"""Host frame pool, p2m and host swap slots: allocation and their own invariants."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.hostd.errors import BadBatch, DuplicatePages, InvariantViolation, OutOfRange
from balloonlab.hostd.framepool import FrameKind, FramePool
from balloonlab.hostd.p2m import P2M, PageState, as_page_numbers


def test_alloc_takes_frames_and_counts_them_by_kind() -> None:
    pool = FramePool(8)
    frames = pool.alloc(3, FrameKind.GUEST, 1, np.array([10, 11, 12]), np.array([7, 8, 9], np.uint64))
    assert frames.size == 3 and np.unique(frames).size == 3
    assert pool.free_frames == 5 and pool.used_frames == 3
    assert pool.counts() == {"free": 5, "guest": 3, "cache": 0, "iobuf": 0, "zcache": 0}
    assert pool.owner_index[frames].tolist() == [10, 11, 12]
    assert pool.token[frames].tolist() == [7, 8, 9]
    pool.check_invariant()


def test_alloc_returns_fewer_when_the_pool_runs_dry() -> None:
    pool = FramePool(4)
    assert pool.alloc(10, FrameKind.CACHE, 2).size == 4
    assert pool.alloc(1, FrameKind.CACHE, 2).size == 0
    pool.check_invariant()


def test_free_clears_everything_and_reuses_the_frame_first() -> None:
    pool = FramePool(4)
    frames = pool.alloc(2, FrameKind.GUEST, 1, np.array([0, 1]), np.array([5, 6], np.uint64))
    pool.pinned[frames] = True
    pool.accessed[frames] = True
    pool.free(frames[:1])
    f = int(frames[0])
    assert pool.kind[f] == FrameKind.FREE and pool.owner_guest[f] == -1
    assert not pool.pinned[f] and not pool.accessed[f] and pool.token[f] == 0
    assert pool.alloc(1, FrameKind.IOBUF, 3).tolist() == [f]
    pool.check_invariant()


def test_double_free_is_an_invariant_violation() -> None:
    pool = FramePool(4)
    frames = pool.alloc(1, FrameKind.GUEST, 1)
    pool.free(frames)
    with pytest.raises(InvariantViolation, match="freed twice"):
        pool.free(frames)


def test_pool_invariant_catches_a_drifted_kind() -> None:
    pool = FramePool(4)
    f = pool.alloc(1, FrameKind.GUEST, 1)
    pool.kind[f] = FrameKind.CACHE
    with pytest.raises(InvariantViolation, match="kind counts drifted"):
        pool.check_invariant()


def test_evictable_is_guest_pages_not_pinned_not_busy_never_cache() -> None:
    pool = FramePool(6)
    g = pool.alloc(3, FrameKind.GUEST, 1)
    pool.alloc(1, FrameKind.CACHE, 1)
    pool.alloc(1, FrameKind.IOBUF, 1)
    pool.pinned[g[0]] = True
    pool.busy[g[1]] = True
    assert np.flatnonzero(pool.evictable()).tolist() == [int(g[2])]


def test_page_numbers_are_checked_and_named() -> None:
    assert as_page_numbers(np.array([1, 2], np.uint64), 1, "gpfn", 4).tolist() == [1, 2]
    assert as_page_numbers(np.asarray([3, 0], "<u8").tobytes(), 1, "gpfn", 4).tolist() == [3, 0]
    with pytest.raises(OutOfRange, match="gpfn 4 out of range") as e:
        as_page_numbers([1, 4], 7, "gpfn", 4)
    assert e.value.code.name == "OUT_OF_RANGE" and e.value.guest_id == 7
    with pytest.raises(OutOfRange, match="gpfn -1"):
        as_page_numbers(np.array([-1]), 1, "gpfn", 4)
    with pytest.raises(OutOfRange, match=str(2**64 - 1)):
        as_page_numbers(np.array([2**64 - 1], np.uint64), 1, "gpfn", 4)
    with pytest.raises(DuplicatePages, match="gpfn 2 appears twice"):
        as_page_numbers([2, 1, 2], 1, "gpfn", 4, unique=True)
    with pytest.raises(BadBatch, match="integers"):
        as_page_numbers(np.array([1.5]), 1, "gpfn", 4)
    assert as_page_numbers([], 1, "gpfn", 4).size == 0


def test_p2m_starts_unbacked_and_counts_states() -> None:
    p2m = P2M(5)
    p2m.set(np.array([0, 1]), PageState.FRAME, np.array([3, 4]))
    p2m.set(np.array([2]), PageState.BALLOONED)
    assert p2m.counts() == {"unbacked": 2, "frame": 2, "swapped": 0, "ballooned": 1, "shared": 0, "compressed": 0, "zero": 0}
    assert p2m.in_state(PageState.FRAME).tolist() == [0, 1]


def test_a_grant_is_private_frames_taken_and_returned_by_their_owner_only() -> None:
    pool = FramePool(16)
    pool.open_grants([1, 2])
    assert pool.grant(1, 4) == 4 and pool.grant(2, 3) == 3
    assert pool.global_free_frames == 9 and pool.free_frames == 16
    mine = pool.alloc(4, FrameKind.GUEST, 1, np.arange(4))
    assert mine.size == 4 and pool.available(1) == 0
    # Guest 1's grant is spent: nothing comes from the global stack or guest 2's list for it.
    assert pool.alloc(1, FrameKind.GUEST, 1, np.array([9])).size == 0
    assert pool.alloc_one(FrameKind.GUEST, 1, 9) == -1
    assert pool.available(2) == 3 and pool.global_free_frames == 9
    # What guest 1 frees goes back to its own list, reused first.
    pool.free(mine[:2])
    assert pool.available(1) == 2 and pool.global_free_frames == 9
    assert pool.alloc_one(FrameKind.IOBUF, 1, 0) == int(mine[1])
    pool.free_one(int(mine[1]))
    assert pool.available(1) == 2
    # A guest without a grant still uses the global stack.
    assert pool.alloc(2, FrameKind.CACHE, 3).size == 2 and pool.global_free_frames == 7
    pool.check_invariant()
    pool.check_counters()
    demand = pool.close_grants()
    assert demand == {1: 5, 2: 0}
    assert not pool.grants_open and pool.global_free_frames == pool.free_frames == 16 - 2 - 2
    pool.check_invariant()


def test_grants_keep_the_stack_order_so_a_granted_alloc_takes_the_frames_a_global_one_would() -> None:
    a, b = FramePool(32), FramePool(32)
    a.free(a.alloc(7, FrameKind.GUEST, 0, np.arange(7))[::2])   # a shuffled stack
    b.free(b.alloc(7, FrameKind.GUEST, 0, np.arange(7))[::2])
    b.open_grants([5])
    b.grant(5, 10)
    assert a.alloc(6, FrameKind.GUEST, 5, np.arange(6)).tolist() == b.alloc(6, FrameKind.GUEST, 5, np.arange(6)).tolist()
    b.close_grants()
    assert a.alloc(20, FrameKind.CACHE, 1).tolist() == b.alloc(20, FrameKind.CACHE, 1).tolist()


def test_a_frame_on_two_lists_is_an_invariant_violation() -> None:
    pool = FramePool(8)
    pool.open_grants([0])
    pool.grant(0, 2)
    g = pool._grants[0]   # corrupt on purpose: the frame also sits on the global stack
    g.stack[0] = pool._free_stack[0]
    with pytest.raises(InvariantViolation, match="twice"):
        pool.check_invariant()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_free_ones_frees_as_free_one_each_in_turn(seed: int) -> None:
    """``free_ones`` (the disk cache's drops) against ``free_one`` per frame, with and without grants."""
    rng = np.random.default_rng(seed)
    one, many = FramePool(96), FramePool(96)
    for trial in range(60):
        if trial % 10 == 0:
            grants = rng.random() < 0.7
            sizes = rng.integers(0, 20, 2).tolist()
            for pool in (one, many):
                pool.close_grants()
                if grants:
                    pool.open_grants([1, 2])
                    pool.grant(1, sizes[0])
                    pool.grant(2, sizes[1])
        gid = int(rng.integers(0, 4))
        n = int(rng.integers(1, 6))
        for pool in (one, many):
            got = pool.alloc(n, FrameKind.CACHE, gid, np.arange(n), np.arange(1, n + 1, dtype=np.uint64))
            pool.pinned[got[::2]] = True
        used = np.flatnonzero(one.kind != FrameKind.FREE)
        frames = rng.choice(used, min(used.size, int(rng.integers(0, 6))), replace=False).tolist()
        for f in frames:
            one.free_one(f)
        many.free_ones(frames)
        for name in ("kind", "owner_guest", "owner_index", "token", "accessed", "dirty", "pinned", "busy"):
            assert getattr(one, name).tolist() == getattr(many, name).tolist(), name
        assert one._free_stack[:one._n_free].tolist() == many._free_stack[:many._n_free].tolist()
        assert one.counts() == many.counts() and one.free_frames == many.free_frames
        for gid in (1, 2):
            assert one.granted(gid) == many.granted(gid)
            if one.has_grant(gid):
                assert one._grants[gid].stack[:one.granted(gid)].tolist() \
                    == many._grants[gid].stack[:many.granted(gid)].tolist()
        many.check_invariant()
        many.check_counters()
    with pytest.raises(InvariantViolation, match="freed twice"):
        many.free_ones([int(np.flatnonzero(many.kind == FrameKind.FREE)[0])])
