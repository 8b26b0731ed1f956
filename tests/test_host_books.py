"""The compiled passes over the host's books (hostd/_books.c) against their numpy definitions."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.hostd._books import alloc_run, count_codes, gather_or, or_backed

FRAME = 1


def _or_backed_numpy(packed: bytes, state: np.ndarray, loc: np.ndarray, target: np.ndarray) -> int:
    bits = np.unpackbits(np.frombuffer(packed, np.uint8), count=state.size).view(bool)
    target[loc[bits & (state == FRAME)]] = True
    return int(np.count_nonzero(bits))


@pytest.mark.parametrize("pages", [1, 7, 8, 9, 2048, 2051])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_or_backed_sets_exactly_the_frames_numpy_sets(pages: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = rng.integers(0, 4, pages).astype(np.uint8)
    loc = rng.permutation(3 * pages)[:pages].astype(np.int64)
    for density in (0.0, 0.05, 0.5, 1.0):
        bits = rng.random(pages) < density
        packed = np.packbits(bits).tobytes()
        if pages % 8:   # padding bits set in the last byte must be ignored
            packed = packed[:-1] + bytes([packed[-1] | (0xFF >> (pages % 8))])
        want, got = np.zeros(3 * pages, bool), np.zeros(3 * pages, bool)
        n_want = _or_backed_numpy(packed, state, loc, want)
        assert or_backed(packed, state, FRAME, loc, got) == n_want
        assert np.array_equal(got, want)


def test_or_backed_refuses_a_bitmap_of_the_wrong_size_and_a_frame_outside_the_pool() -> None:
    state, loc = np.full(16, FRAME, np.uint8), np.arange(16, dtype=np.int64)
    with pytest.raises(ValueError, match="bitmap bytes"):
        or_backed(b"\xff", state, FRAME, loc, np.zeros(16, bool))
    with pytest.raises(IndexError, match="outside"):
        or_backed(b"\x00\x01", state, FRAME, loc, np.zeros(15, bool))
    with pytest.raises(TypeError, match="items of 8 bytes"):
        or_backed(b"\x00\x01", state, FRAME, loc.astype(np.int32), np.zeros(16, bool))


def test_gather_or_ors_in_the_sampled_bits() -> None:
    rng = np.random.default_rng(4)
    bits = rng.random(1000) < 0.3
    packed = np.packbits(bits).tobytes()
    idx = np.sort(rng.choice(1000, 100, replace=False)).astype(np.int64)
    out = rng.random(100) < 0.2
    want = out | bits[idx]
    gather_or(packed, idx, out)
    assert np.array_equal(out, want)
    with pytest.raises(IndexError):
        gather_or(packed, np.array([1000], np.int64), np.zeros(1, bool))


def test_alloc_run_refuses_arrays_that_do_not_fit() -> None:
    n = 8
    pool = [np.zeros(n, np.uint8), np.full(n, -1, np.int32), np.full(n, -1, np.int64), np.zeros(n, np.uint64),
            np.zeros(n, bool)]
    disk = [np.arange(16, dtype=np.uint64), np.zeros(16, bool), np.full(16, -1, np.int64), np.zeros(16, np.uint8)]
    stack = np.arange(n, dtype=np.int64)
    alloc_run(stack, 8, 4, *pool, 2, 5, 3, *disk, 1)
    assert disk[2][3:7].tolist() == [7, 6, 5, 4] and pool[2][[7, 6, 5, 4]].tolist() == [3, 4, 5, 6]
    assert pool[3][7] == 3 and pool[1][4] == 5 and disk[3][3:7].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="frames off a stack"):
        alloc_run(stack, 3, 4, *pool, 2, 5, 0, *disk, 1)          # fewer than count on the stack
    with pytest.raises(ValueError, match="frames off a stack"):
        alloc_run(stack, 8, 4, *pool, 2, 5, 14, *disk, 1)         # entries past the disk's end
    with pytest.raises(IndexError, match="outside the pool"):
        alloc_run(np.array([99], np.int64), 1, 1, *pool, 2, 5, 0, *disk, 1)
    with pytest.raises(TypeError, match="owner_guest"):
        alloc_run(stack, 8, 1, pool[0], pool[2], pool[2], pool[3], pool[4], 2, 5, 0, *disk, 1)


def test_release_run_clears_the_frames_and_moves_the_counts_or_changes_nothing() -> None:
    from balloonlab.hostd._books import release_run
    n = 8
    kind = np.array([0, 2, 2, 2, 1, 0, 2, 2], np.uint8)
    owner = np.array([-1, 3, 3, 3, 3, -1, 4, 3], np.int32)
    index, token = np.arange(n, dtype=np.int64), np.arange(n, dtype=np.uint64) + 10
    flags = [np.ones(n, bool) for _ in range(4)]
    counts = np.array([2, 1, 5, 0, 0], np.int64)
    pool = (kind, owner, index, token, *flags, counts)
    release_run(np.array([3, 1], np.int64), 3, *pool)
    assert kind.tolist() == [0, 0, 2, 0, 1, 0, 2, 2] and owner[[1, 3]].tolist() == [-1, -1]
    assert index[[1, 3]].tolist() == [-1, -1] and token[[1, 3]].tolist() == [0, 0]
    assert all(f[[1, 3]].tolist() == [False, False] and f[2] for f in flags)
    assert counts.tolist() == [4, 1, 3, 0, 0]
    before = [a.copy() for a in pool]
    for frames, owner_id, match in (([2, 1], 3, "freed twice"), ([2, 6], 3, "held by guest 4"),
                                    ([9], 3, "outside")):
        with pytest.raises((ValueError, IndexError), match=match):
            release_run(np.array(frames, np.int64), owner_id, *pool)
        assert all(np.array_equal(a, b) for a, b in zip(pool, before)), "a refused run changed the books"


def test_take_clusters_gives_up_their_frames_in_order_or_changes_nothing() -> None:
    from balloonlab.hostd._books import take_clusters
    cp, frame, not_cached, no_loc = 4, 1, 0, -1
    state = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 0], np.uint8)     # 10 blocks: clusters of 4, the last of 2
    loc = np.array([10, 11, -1, 13, 14, 15, 16, 17, 18, -1], np.int64)
    cdirty, cached = np.zeros(3, np.int64), np.array([3, 4, 1], np.int64)
    out = np.full(12, -7, np.int64)
    n = take_clusters(np.array([2, 0], np.int64), cp, state, loc, cdirty, cached, frame, not_cached, no_loc, out)
    assert n == 4 and out[:n].tolist() == [18, 10, 11, 13]         # the clusters as given, blocks ascending
    assert state.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0] and cached.tolist() == [0, 4, 0]
    assert loc[[0, 1, 3, 8]].tolist() == [-1, -1, -1, -1]
    cdirty[1] = 2
    before = (state.copy(), loc.copy(), cached.copy())
    with pytest.raises(ValueError, match="dirty"):
        take_clusters(np.array([1], np.int64), cp, state, loc, cdirty, cached, frame, not_cached, no_loc, out)
    with pytest.raises(ValueError, match="outside"):
        take_clusters(np.array([3], np.int64), cp, state, loc, cdirty, cached, frame, not_cached, no_loc, out)
    assert all(np.array_equal(a, b) for a, b in zip((state, loc, cached), before))


@pytest.mark.parametrize("pages", [0, 1, 3, 4, 5, 4099])
@pytest.mark.parametrize("seed", [1, 2])
def test_count_codes_counts_what_bincount_counts(pages: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 7, pages).astype(np.uint8)
    codes[: pages // 3] = 4                       # a run of one code too
    out = np.full(9, -1, np.int64)
    count_codes(codes, out)
    assert out.tolist() == np.bincount(codes, minlength=9).tolist()


def test_count_codes_refuses_a_code_out_has_no_place_for_and_a_wrong_item_size() -> None:
    out = np.full(3, -1, np.int64)
    with pytest.raises(ValueError, match="code 5 found"):
        count_codes(np.array([0, 5, 1], np.uint8), out)
    assert out.tolist() == [-1, -1, -1]          # left as it was
    with pytest.raises(TypeError, match="codes: expected items of 1 bytes"):
        count_codes(np.array([0, 1], np.int64), out)
    with pytest.raises(TypeError, match="out: expected items of 8 bytes"):
        count_codes(np.array([0, 1], np.uint8), np.zeros(3, np.int32))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sample_touched_counts_what_numpy_counts_and_refuses_a_bad_sample(seed: int) -> None:
    """A working-set period's close: of the sampled gpfns not ballooned, how many, and how many touched."""
    from balloonlab.hostd._books import sample_touched
    rng = np.random.default_rng(seed)
    for _ in range(50):
        n = int(rng.integers(1, 3000))
        k = int(rng.integers(0, min(n, 200)))
        state = rng.integers(0, 5, n).astype(np.uint8)
        sample = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        touched = rng.random(k) < 0.4
        keep = state[sample] != 2
        assert sample_touched(state, sample, touched, 2) == (int(np.count_nonzero(keep)),
                                                             int(np.count_nonzero(touched[keep])))
    with pytest.raises(IndexError, match="outside"):
        sample_touched(np.zeros(4, np.uint8), np.array([4], np.int64), np.ones(1, bool), 2)
    with pytest.raises(ValueError, match="touched bits"):
        sample_touched(np.zeros(4, np.uint8), np.array([1], np.int64), np.ones(2, bool), 2)
