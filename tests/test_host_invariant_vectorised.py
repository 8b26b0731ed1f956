"""The sampled invariant's fast test (``hostd.invariant_sample``) agrees with the per-frame checks.

A sample that covers every frame and slot (backward: each followed to its
owner's books) or every gpfn and block of every guest (forward: each
followed to its frame or slot) must fail on each planted corruption its
direction can see, and hold on a consistent host; the per-frame checks
(``check_each``) then name the same problem. On random samples the fast
test and the per-frame checks agree, sample by sample. Each corruption
below breaks one condition of the fast test, so a test fails if that
condition is lost.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from balloonlab.hostd.errors import InvariantViolation
from balloonlab.hostd.framepool import FrameKind
from balloonlab.hostd.invariant import check_each, check_full, check_sample
from balloonlab.hostd.invariant_sample import Sample, draw_sample, sample_holds
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.p2m import NO_LOC, PageState
from balloonlab.hostd.vdisk import CacheState

from .test_host_compress import _frames_of, _setup
from .test_host_invariant_sample import CORRUPTIONS as SAMPLED_CORRUPTIONS
from .test_host_invariant_sample import busy_memory, first_swapped_gpfn, leak_a_frame, leak_a_slot
from .test_sharing_scanner import _booted, _boundary

BACK, FORWARD = "back", "forward"


def covering(hm: HostMemory, direction: str) -> Sample:
    """Every frame and slot (back), or every gpfn and block of every guest (forward)."""
    if direction == BACK:
        return Sample(np.arange(hm.pool.total_frames), np.arange(hm.swap.n_slots), [])
    return Sample(np.zeros(0, np.int64), np.zeros(0, np.int64),
                  [(g, np.arange(hm.p2m(g).guest_pages), np.arange(hm.vdisk(g).n_blocks)) for g in hm.guest_ids()])


def assert_found(hm: HostMemory, direction: str) -> str:
    sample = covering(hm, direction)
    assert not sample_holds(hm, hm.guest_ids(), sample), f"the {direction} test missed it"
    with pytest.raises(InvariantViolation) as slow:
        check_each(hm, hm.guest_ids(), sample)
    return str(slow.value)


def frame_gpfns(hm: HostMemory, gid: int) -> np.ndarray:
    return np.flatnonzero(hm.p2m(gid).state == PageState.FRAME)


def a_cached_block(hm: HostMemory, gid: int) -> int:
    return int(np.flatnonzero(hm.vdisk(gid).cache_state == CacheState.FRAME)[0])


def an_uncached_block(hm: HostMemory, gid: int) -> int:
    return int(np.flatnonzero(hm.vdisk(gid).cache_state == CacheState.NOT_CACHED)[0])


# --- corruptions the backward test sees (from frames and slots) ---------------------------------


def a_free_frame_keeps_a_token(hm: HostMemory) -> None:
    free = np.flatnonzero(hm.pool.kind == FrameKind.FREE)
    assert free.size
    hm.pool.token[free[0]] = 9


def a_frame_of_an_unknown_guest(hm: HostMemory) -> None:
    hm.pool.owner_guest[hm.p2m(1).loc[frame_gpfns(hm, 1)[0]]] = 9


def a_frame_names_another_gpfn(hm: HostMemory) -> None:
    a, b = frame_gpfns(hm, 1)[:2]
    hm.pool.owner_index[hm.p2m(1).loc[a]] = b


def a_frame_names_a_gpfn_past_the_guest(hm: HostMemory) -> None:
    # Past the guest's last gpfn, and that gpfn is this frame's: an index read clipped into range would match.
    p2m = hm.p2m(1)
    last = p2m.guest_pages - 1
    assert p2m.state[last] == PageState.FRAME
    hm.pool.owner_index[p2m.loc[last]] = last + 3


def a_frame_names_a_negative_gpfn(hm: HostMemory) -> None:
    # ... and entry 0, where an index read clipped into range would land, is this frame's (gpfn or block 0)
    frames = [hm.p2m(g).loc[0] for g in hm.guest_ids() if hm.p2m(g).state[0] == PageState.FRAME]
    frames += [hm.vdisk(g).cache_loc[0] for g in hm.guest_ids() if hm.vdisk(g).cache_state[0] == CacheState.FRAME]
    hm.pool.owner_index[frames[0]] = -3


def a_cache_frame_its_block_forgot(hm: HostMemory) -> None:
    vd = hm.vdisk(1)
    b = a_cached_block(hm, 1)
    vd.cache_state[b], vd.cache_loc[b], vd.dirty[b], vd.image[b] = CacheState.NOT_CACHED, NO_LOC, False, vd.tokens[b]


def an_io_buffer_no_request_holds(hm: HostMemory) -> None:
    hm.pool.alloc(1, FrameKind.IOBUF, 1, np.array([0]), np.array([0], np.uint64))


def a_slot_of_an_unknown_guest(hm: HostMemory) -> None:
    hm.swap.owner_guest[np.flatnonzero(hm.swap.used)[0]] = 9


# --- corruptions the forward test sees (from gpfns and blocks) ----------------------------------


def a_gpfn_on_a_frame_past_the_pool(hm: HostMemory) -> None:
    hm.p2m(1).loc[frame_gpfns(hm, 1)[0]] = hm.pool.total_frames + 3


def a_gpfn_on_a_negative_frame(hm: HostMemory) -> None:
    hm.p2m(1).loc[frame_gpfns(hm, 1)[0]] = -2


def a_gpfns_frame_marked_a_cache_frame(hm: HostMemory) -> None:
    hm.pool.kind[hm.p2m(1).loc[frame_gpfns(hm, 1)[0]]] = FrameKind.CACHE


def a_gpfn_in_a_slot_past_swap(hm: HostMemory) -> None:
    hm.p2m(2).loc[first_swapped_gpfn(hm, 2)] = hm.swap.n_slots + 4


def a_gpfn_in_a_free_slot(hm: HostMemory) -> None:
    hm.swap.used[hm.p2m(2).loc[first_swapped_gpfn(hm, 2)]] = False


def a_gpfn_pinned_on_an_unpinned_frame(hm: HostMemory) -> None:
    p2m = hm.p2m(2)
    p2m.pinned[frame_gpfns(hm, 2)[0]] ^= True


def a_gpfn_in_another_gpfns_slot(hm: HostMemory) -> None:
    p2m = hm.p2m(2)
    a, b = np.flatnonzero(p2m.state == PageState.SWAPPED)[:2]
    p2m.loc[a] = p2m.loc[b]


def a_gpfn_in_no_state(hm: HostMemory) -> None:
    hm.p2m(1).state[frame_gpfns(hm, 1)[0]] = 77


def an_unbacked_gpfn_keeps_its_slot(hm: HostMemory) -> None:
    hm.p2m(2).state[first_swapped_gpfn(hm, 2)] = PageState.UNBACKED


def a_swapped_gpfns_slot_also_a_swap_cache_copy(hm: HostMemory) -> None:
    g = first_swapped_gpfn(hm, 2)
    hm.swap.cached[hm.p2m(2).loc[g]] = True


def a_compressed_gpfn_without_compression(hm: HostMemory) -> None:
    p2m = hm.p2m(1)
    g = frame_gpfns(hm, 1)[0]
    p2m.state[g], p2m.loc[g] = PageState.COMPRESSED, NO_LOC


def a_shared_gpfn_without_sharing(hm: HostMemory) -> None:
    hm.p2m(1).state[frame_gpfns(hm, 1)[0]] = PageState.SHARED


def a_dirty_block_not_cached(hm: HostMemory) -> None:
    hm.vdisk(2).dirty[an_uncached_block(hm, 2)] = True


def a_clean_block_whose_device_copy_differs(hm: HostMemory) -> None:
    vd = hm.vdisk(2)
    vd.image[an_uncached_block(hm, 2)] ^= np.uint64(1)


def an_uncached_block_with_a_location(hm: HostMemory) -> None:
    hm.vdisk(2).cache_loc[an_uncached_block(hm, 2)] = 5


def a_cache_frame_marked_a_guest_frame(hm: HostMemory) -> None:
    hm.pool.kind[hm.vdisk(1).cache_loc[a_cached_block(hm, 1)]] = FrameKind.GUEST


def a_cache_frame_holding_other_content(hm: HostMemory) -> None:
    b = a_cached_block(hm, 1)
    hm.pool.token[hm.vdisk(1).cache_loc[b]] ^= np.uint64(1)


def a_disks_cached_count_drifted(hm: HostMemory) -> None:
    hm.vdisk(1).cached_pages += 1


def more_ballooned_than_allowed(hm: HostMemory) -> None:
    g = hm._guest(1)
    g.balloon_pages = g.max_balloon_pages + 1


CORRUPTIONS: dict[str, tuple[Callable[[HostMemory], None], tuple[str, ...]]] = {
    "a frame nobody references": (leak_a_frame, (BACK,)),
    "a free frame keeps a token": (a_free_frame_keeps_a_token, (BACK,)),
    "a frame of an unknown guest": (a_frame_of_an_unknown_guest, (BACK, FORWARD)),
    "a frame names another gpfn": (a_frame_names_another_gpfn, (BACK, FORWARD)),
    "a frame names a gpfn past the guest": (a_frame_names_a_gpfn_past_the_guest, (BACK, FORWARD)),
    "a frame names a negative gpfn": (a_frame_names_a_negative_gpfn, (BACK, FORWARD)),
    "a cache frame its block forgot": (a_cache_frame_its_block_forgot, (BACK,)),
    "an I/O buffer no request holds": (an_io_buffer_no_request_holds, (BACK,)),
    "a slot nobody references": (leak_a_slot, (BACK,)),
    "a slot of an unknown guest": (a_slot_of_an_unknown_guest, (BACK, FORWARD)),
    "a gpfn on a frame past the pool": (a_gpfn_on_a_frame_past_the_pool, (FORWARD,)),
    "a gpfn on a negative frame": (a_gpfn_on_a_negative_frame, (FORWARD,)),
    "a gpfn's frame marked a cache frame": (a_gpfns_frame_marked_a_cache_frame, (FORWARD,)),
    "a gpfn in a slot past swap": (a_gpfn_in_a_slot_past_swap, (FORWARD,)),
    "a gpfn in a free slot": (a_gpfn_in_a_free_slot, (FORWARD,)),
    "a gpfn pinned on an unpinned frame": (a_gpfn_pinned_on_an_unpinned_frame, (FORWARD,)),
    "a gpfn in another gpfn's slot": (a_gpfn_in_another_gpfns_slot, (BACK, FORWARD)),
    "a gpfn in no state": (a_gpfn_in_no_state, (FORWARD,)),
    "an unbacked gpfn keeps its slot": (an_unbacked_gpfn_keeps_its_slot, (BACK, FORWARD)),
    "a swapped gpfn's slot is also a swap-cache copy": (a_swapped_gpfns_slot_also_a_swap_cache_copy, (FORWARD,)),
    "a compressed gpfn without compression": (a_compressed_gpfn_without_compression, (FORWARD,)),
    "a shared gpfn without sharing": (a_shared_gpfn_without_sharing, (FORWARD,)),
    "a dirty block not cached": (a_dirty_block_not_cached, (FORWARD,)),
    "a clean block whose device copy differs": (a_clean_block_whose_device_copy_differs, (FORWARD,)),
    "an uncached block with a location": (an_uncached_block_with_a_location, (FORWARD,)),
    "a cache frame marked a guest frame": (a_cache_frame_marked_a_guest_frame, (FORWARD,)),
    "a cache frame holding other content": (a_cache_frame_holding_other_content, (FORWARD,)),
    "a disk's cached count drifted": (a_disks_cached_count_drifted, (FORWARD,)),
    "more ballooned than allowed": (more_ballooned_than_allowed, (FORWARD,)),
}


async def test_a_consistent_host_holds_in_both_directions() -> None:
    hm = await busy_memory()
    for direction in (BACK, FORWARD):
        assert sample_holds(hm, hm.guest_ids(), covering(hm, direction))
        check_each(hm, hm.guest_ids(), covering(hm, direction))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
async def test_each_corruption_is_found_by_the_directions_that_see_it(name: str) -> None:
    hm = await busy_memory()
    corrupt, directions = CORRUPTIONS[name]
    corrupt(hm)
    with pytest.raises(InvariantViolation):
        check_full(hm)
    for direction in directions:
        assert "fast test" not in assert_found(hm, direction)


# (a drifted kind count is the counters' to find, before any sample)
@pytest.mark.parametrize("name", [*CORRUPTIONS, *(n for n in SAMPLED_CORRUPTIONS if n != "a kind count drifted")])
async def test_on_random_samples_the_fast_test_and_the_per_frame_checks_agree(name: str) -> None:
    hm = await busy_memory()
    corrupt = CORRUPTIONS[name][0] if name in CORRUPTIONS else SAMPLED_CORRUPTIONS[name]
    corrupt(hm)
    rng = np.random.default_rng(5)
    seen = {True: 0, False: 0}
    for _ in range(60):
        sample = draw_sample(hm, hm.guest_ids(), rng, 16, 16, 1, 16)     # small: some samples miss it
        try:
            check_each(hm, hm.guest_ids(), sample)
            slow = True
        except InvariantViolation:
            slow = False
        assert sample_holds(hm, hm.guest_ids(), sample) == slow, sample
        seen[slow] += 1
    assert seen[False], f"{name}: no sample found it"


async def test_check_sample_names_the_first_bad_frame_in_the_per_frame_checks_words() -> None:
    hm = await busy_memory()
    leak_a_frame(hm)
    leaked = int(np.flatnonzero((hm.pool.owner_index == 0) & (hm.pool.token == 7))[0])
    rng = np.random.default_rng(3)
    for _ in range(40):
        try:
            check_sample(hm, rng)
        except InvariantViolation as exc:
            assert str(exc) == (f"frame {leaked} (GUEST) of guest 1 index 0 is referenced by nobody (frame leak)")
            return
    pytest.fail("40 samples of 64 frames in 96 did not find the leak")


def test_the_draw_is_one_generator_call_of_distinct_guests_in_range() -> None:
    hm = HostMemory(40, 200, "random", np.random.default_rng(0))
    for gid, pages in ((3, 30), (5, 50), (8, 20)):
        hm.add_guest(gid, pages, disk_blocks=gid * 4)
    rng, twin = np.random.default_rng(9), np.random.default_rng(9)
    seen = set()
    for _ in range(30):
        s = draw_sample(hm, hm.guest_ids(), rng, 64, 64, 2, 64)
        twin.random(2 + 64 + 64 + 2 * 2 * 64)
        assert rng.bit_generator.state == twin.bit_generator.state
        picked = [g for g, _, _ in s.guests]
        assert len(picked) == 2 and picked == sorted(set(picked))
        seen.update(picked)
        assert s.frames.size == 64 and 0 <= s.frames.min() and s.frames.max() < 40
        assert s.slots.size == 64 and s.slots.max() < 200
        for gid, pages, blocks in s.guests:
            assert pages.size == 64 and pages.max() < hm.p2m(gid).guest_pages
            assert blocks.size == 64 and blocks.max() < hm.vdisk(gid).n_blocks
    assert seen == {3, 5, 8}


def test_shared_frames_hold_and_a_broken_one_is_found() -> None:
    mem, _ = _booted(3, 16)
    _boundary(mem)
    sh = mem.sharing
    shared = np.flatnonzero(sh.shared)
    assert shared.size == 16
    for direction in (BACK, FORWARD):
        assert sample_holds(mem, mem.guest_ids(), covering(mem, direction))
    sh.refs[shared[0]] = 0           # its sharers still map it SHARED
    assert "not a live shared frame" in assert_found(mem, FORWARD)
    sh.refs[shared[0]] = 3
    mem.pool.kind[shared[1]] = FrameKind.CACHE
    assert "frame leak" in assert_found(mem, BACK)


async def test_compression_cache_frames_hold_and_one_the_books_lost_is_found() -> None:
    hm, fg = _setup(cache_pct=50)
    await fg.touch(1, np.arange(16), write=True)
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(16)), 0.0)
    assert np.any(hm.pool.kind == FrameKind.ZCACHE)
    for direction in (BACK, FORWARD):
        assert sample_holds(hm, hm.guest_ids(), covering(hm, direction))
    hm.zip.book(1).n_frames -= 1
    assert "frame leak" in assert_found(hm, BACK)
    assert "compression cache" in assert_found(hm, FORWARD)
