"""Host victim policies: blind, never pinned/IOBUF/FREE/busy frames; clock gives second chances."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.hostd.errors import PolicyConfigError
from balloonlab.hostd.framepool import FrameKind, FramePool
from balloonlab.hostd.victim import VICTIM_POLICIES, make_victim_policy


def mixed_pool(rng: np.random.Generator, n: int = 512) -> FramePool:
    """Frames of every kind, some pinned, some busy, some accessed."""
    pool = FramePool(n)
    for kind, count in ((FrameKind.GUEST, n // 2), (FrameKind.CACHE, n // 8), (FrameKind.IOBUF, n // 8)):
        frames = pool.alloc(count, kind, 1, np.arange(count))
        pool.pinned[frames[rng.random(count) < 0.2]] = True
        pool.busy[frames[rng.random(count) < 0.1]] = True
        pool.accessed[frames[rng.random(count) < 0.5]] = True
    pool.free(rng.choice(np.flatnonzero(pool.kind == FrameKind.GUEST), n // 16, replace=False))
    return pool


@pytest.mark.parametrize("name", sorted(VICTIM_POLICIES))
def test_victims_are_evictable_distinct_and_bounded(name: str) -> None:
    rng = np.random.default_rng(1)
    pool = mixed_pool(rng)
    policy = make_victim_policy(name)
    evictable = set(np.flatnonzero(pool.evictable()).tolist())
    for n in (1, 7, 50, 10_000):
        picked = policy.pick(pool, n, rng)
        assert picked.dtype == np.int64
        assert picked.size == min(n, len(evictable))
        assert np.unique(picked).size == picked.size
        assert set(picked.tolist()) <= evictable
        kinds = pool.kind[picked]
        assert np.all((kinds == FrameKind.GUEST) | (kinds == FrameKind.CACHE))
        assert not np.any(pool.pinned[picked]) and not np.any(pool.busy[picked])


@pytest.mark.parametrize("name", sorted(VICTIM_POLICIES))
def test_nothing_evictable_gives_nothing(name: str) -> None:
    pool = FramePool(8)
    pool.alloc(4, FrameKind.IOBUF, 1)
    pinned = pool.alloc(4, FrameKind.GUEST, 1)
    pool.pinned[pinned] = True
    assert make_victim_policy(name).pick(pool, 3, np.random.default_rng(0)).size == 0


def test_random_is_uniform_enough_and_reproducible() -> None:
    pool = FramePool(100)
    pool.alloc(100, FrameKind.GUEST, 1)
    policy = make_victim_policy("random")
    a = policy.pick(pool, 10, np.random.default_rng(42))
    b = policy.pick(pool, 10, np.random.default_rng(42))
    assert a.tolist() == b.tolist()
    hits = np.zeros(100)
    rng = np.random.default_rng(3)
    for _ in range(400):
        hits[policy.pick(pool, 10, rng)] += 1
    assert hits.min() > 10 and hits.max() < 80   # expected 40 each


def test_clock_skips_accessed_frames_and_clears_their_bit() -> None:
    pool = FramePool(8)
    frames = pool.alloc(8, FrameKind.GUEST, 1, np.arange(8))
    frames.sort()
    pool.accessed[[0, 1, 3]] = True
    clock = make_victim_policy("clock")
    assert clock.pick(pool, 2, np.random.default_rng(0)).tolist() == [2, 4]
    assert pool.accessed.tolist() == [False, False, False, False, False, False, False, False]
    assert clock.hand == 5
    # The hand moves on: next it takes 5, 6, 7, then wraps to the frames it cleared.
    assert clock.pick(pool, 4, np.random.default_rng(0)).tolist() == [5, 6, 7, 0]


def test_clock_takes_accessed_frames_on_the_second_turn() -> None:
    pool = FramePool(4)
    pool.alloc(4, FrameKind.GUEST, 1)
    pool.accessed[:] = True
    pool.accessed[2] = False
    clock = make_victim_policy("clock")
    assert clock.pick(pool, 3, np.random.default_rng(0)).tolist() == [2, 0, 1]
    assert not pool.accessed.any()


def test_clock_keeps_recently_accessed_frames_longest() -> None:
    """Frames re-accessed between sweeps outlive frames never touched again."""
    pool = FramePool(64)
    pool.alloc(64, FrameKind.GUEST, 1)
    hot = np.arange(0, 64, 4)
    clock = make_victim_policy("clock")
    rng = np.random.default_rng(0)
    for _ in range(5):
        pool.accessed[hot] = True
        picked = clock.pick(pool, 8, rng)
        assert not np.isin(picked, hot).any()


def test_unknown_victim_policy_lists_known_names() -> None:
    with pytest.raises(PolicyConfigError, match=r"'lru' is unknown; known: \['clock', 'random'\]"):
        make_victim_policy("lru")
    with pytest.raises(PolicyConfigError, match="takes no parameters"):
        make_victim_policy("clock", {"hand": 3})


def reference_clock(pool: FramePool, hand: int, n: int) -> tuple[list[int], int]:
    """Second chance one frame at a time: the spec the windowed sweep must match."""
    picked: list[int] = []
    total = pool.total_frames
    evictable = pool.evictable()
    for _ in range(2 * total):
        if len(picked) == n:
            break
        f = hand
        hand = (hand + 1) % total
        if not evictable[f] or f in picked:
            continue
        if pool.accessed[f]:
            pool.accessed[f] = False
            continue
        picked.append(f)
    return picked, hand


@pytest.mark.parametrize("seed", range(6))
def test_clock_sweep_matches_one_frame_at_a_time(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fast_pool = mixed_pool(rng, n=3000)
    ref_pool = mixed_pool(np.random.default_rng(seed), n=3000)
    clock = make_victim_policy("clock")
    hand = 0
    for n in (1, 5, 300, 900, 2500, 40):
        want, hand = reference_clock(ref_pool, hand, n)
        got = clock.pick(fast_pool, n, rng)
        assert got.tolist() == want
        assert clock.hand == hand
        assert np.array_equal(fast_pool.accessed, ref_pool.accessed)
        assert not fast_pool.busy[got].any()
        ref_pool.accessed[rng.random(3000) < 0.3] = True
        fast_pool.accessed[:] = ref_pool.accessed
