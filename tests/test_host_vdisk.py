"""Virtual disks served through host memory: cluster cache, write-through, I/O buffers,
backpressure, and cache pages taken by host swapping (double faults)."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.hostd.errors import BadBatch, DuplicatePages, OutOfRange
from balloonlab.hostd.framepool import FrameKind
from balloonlab.hostd.vdisk import CacheState
from balloonlab.proto.costs import CostModel, DiskModel, disk_profile

from .test_host_fakes import FakeGuests, make_memory


def blocks(*values: int) -> np.ndarray:
    return np.array(values, np.uint64)


def tok(*values: int) -> np.ndarray:
    return np.array(values, np.uint64)


async def test_unwritten_blocks_read_as_zero_and_writes_read_back() -> None:
    hm = make_memory(total_frames=256)
    hm.add_guest(1, 16, disk_blocks=64)
    tokens, _ = await hm.vdisk_read(1, blocks(0, 40), 0.0)
    assert tokens.tolist() == [0, 0]
    await hm.vdisk_write(1, blocks(40, 3), tok(7, 9), 0.0)
    tokens, _ = await hm.vdisk_read(1, blocks(3, 40, 3), 0.0)
    assert tokens.tolist() == [9, 7, 9]
    hm.check_invariant()


async def test_a_miss_loads_the_whole_cluster_and_a_hit_costs_a_page_copy() -> None:
    hm = make_memory(total_frames=256, costs=CostModel(page_copy_us=1.0))
    hm.add_guest(1, 16, disk_blocks=64)
    ref = DiskModel(disk_profile("ssd"))
    _, done = await hm.vdisk_read(1, blocks(17), 1000.0)
    assert done == ref.submit(1000.0, 16)
    vd = hm.vdisk(1)
    assert vd.cache_state[16:32].tolist() == [CacheState.FRAME] * 16
    assert hm.pool.counts()["cache"] == 16
    assert vd.counters.cluster_loads == 1 and vd.counters.cache_miss_pages == 1
    _, done = await hm.vdisk_read(1, blocks(20, 21, 22), 5000.0)
    assert done == 5000.0 + 3 * 1.0
    assert vd.counters.cache_hit_pages == 3 and vd.disk.requests == 1


async def test_writes_are_write_through_and_write_allocate() -> None:
    hm = make_memory(total_frames=256)
    hm.add_guest(1, 16, disk_blocks=64)
    ref = DiskModel(disk_profile("ssd"))
    done = await hm.vdisk_write(1, blocks(5, 6), tok(1, 2), 100.0)
    assert done == ref.submit(100.0, 2)
    vd = hm.vdisk(1)
    assert vd.tokens[[5, 6]].tolist() == [1, 2]
    assert vd.cache_state[[4, 5, 6, 7]].tolist() == [0, 1, 1, 0]   # only the written blocks
    assert hm.pool.token[vd.cache_loc[[5, 6]]].tolist() == [1, 2]
    # A read of the same cluster loads only what is missing, and sees the written data.
    tokens, _ = await hm.vdisk_read(1, blocks(4, 5), 0.0)
    assert tokens.tolist() == [0, 1]
    assert vd.counters.cluster_load_pages == 14
    hm.check_invariant()


async def test_tokens_survive_cache_eviction() -> None:
    hm = make_memory(total_frames=256, vdisk_cache_max_pages=32)
    hm.add_guest(1, 16, disk_blocks=256)
    rng = np.random.default_rng(2)
    truth = np.zeros(256, np.uint64)
    for i in range(60):
        b = rng.choice(256, 4, replace=False)
        if rng.random() < 0.5:
            t = (np.arange(4) + 100 * i + 1).astype(np.uint64)
            await hm.vdisk_write(1, b, t, 0.0)
            truth[b] = t
        else:
            got, _ = await hm.vdisk_read(1, b, 0.0)
            assert got.tolist() == truth[b].tolist()
        assert hm.vdisk(1).cached_pages <= 32
        hm.tick(1e12)
    assert hm.vdisk(1).counters.trimmed_pages > 0
    for first in range(0, 256, 16):
        got, _ = await hm.vdisk_read(1, np.arange(first, first + 16), 0.0)
        assert got.tolist() == truth[first:first + 16].tolist()
        hm.tick(1e12)
    hm.check_invariant()


async def test_the_cache_is_trimmed_least_recently_used_cluster_first() -> None:
    hm = make_memory(total_frames=256, vdisk_cache_max_pages=32, cluster_pages=4)
    hm.add_guest(1, 16, disk_blocks=64)
    for first in (0, 8, 16, 24, 32, 40, 48, 56):
        await hm.vdisk_read(1, blocks(first), 0.0)
    await hm.vdisk_read(1, blocks(0), 0.0)     # cluster 0 becomes the most recent
    vd = hm.vdisk(1)
    assert vd.cached_pages == 32 and vd.counters.trimmed_pages == 0
    # 36 pages then: over the limit, the cache goes down to 32 - 32 // 16 = 30, least recently
    # used cluster first: cluster 2 (block 8) and cluster 4 (block 16) go, recent cluster 0 stays.
    await hm.vdisk_read(1, blocks(4), 0.0)
    cached = sorted(set((np.flatnonzero(vd.cache_state) // 4).tolist()))
    assert cached == [0, 1, 6, 8, 10, 12, 14]
    assert vd.cached_pages == 28 and vd.counters.trimmed_pages == 8


async def test_a_guest_short_of_frames_drops_its_own_least_recently_used_unpinned_clusters() -> None:
    hm = make_memory(total_frames=256, vdisk_cache_max_pages=64, cluster_pages=4)
    hm.add_guest(1, 16, disk_blocks=64)
    for first in (0, 8, 16, 24):
        await hm.vdisk_read(1, blocks(first), 0.0)
    await hm.vdisk_read(1, blocks(0), 0.0)     # cluster 0 becomes the most recent
    vd = hm.vdisk(1)
    vd.set_pinned(8, 4, True)                  # cluster 2 is pinned: never dropped
    free = hm.pool.free_frames
    assert vd.drop_clean_lru(5) == 8           # whole clusters, oldest first, until 5 frames are free
    cached = sorted(set((np.flatnonzero(vd.cache_state) // 4).tolist()))
    assert cached == [0, 2]                    # 4 and 6 went (the oldest unpinned); pinned 2 and recent 0 stay
    assert hm.pool.free_frames == free + 8
    assert vd.drop_clean_lru(100) == 4 and vd.drop_clean_lru(1) == 0
    hm.check_invariant()


async def test_cache_pages_taken_by_host_swapping_come_back_by_double_fault() -> None:
    """Nested swapping: I/O to a cluster the host swapped out needs a host swap-in first."""
    hm = make_memory(total_frames=64, swap_slots=64, swap_profile="hdd", low_watermark_frames=0)
    FakeGuests(hm).add(1, 16, disk_blocks=64)
    await hm.vdisk_write(1, blocks(0, 1, 2), tok(10, 11, 12), 0.0)
    hm.tick(1e9)                                    # retire the I/O buffers: only cache frames are left
    got = await hm.reclaim(3, 1e9)
    assert got.freed_frames == 3 and hm.counters.swap_out_cache_pages == 3
    vd = hm.vdisk(1)
    assert vd.cache_state[[0, 1, 2]].tolist() == [CacheState.SWAPPED] * 3
    hm.check_invariant()

    swap_ref = DiskModel(disk_profile("hdd"))
    swap_ref.submit(1e9, 3)                         # the swap-out write
    read_done = swap_ref.submit(2e9, 1)
    tokens, done = await hm.vdisk_read(1, blocks(1), 2e9)
    assert tokens.tolist() == [11]
    assert done == read_done
    assert vd.counters.double_faults == 1 and vd.counters.double_fault_wait_us == read_done - 2e9

    # A write into a swapped page waits for the swap-in before the disk write starts.
    swapin_done = swap_ref.submit(3e9, 1)
    done = await hm.vdisk_write(1, blocks(2), tok(99), 3e9)
    assert done == DiskModel(disk_profile("ssd")).submit(swapin_done, 1)
    assert vd.counters.double_faults == 2
    tokens, _ = await hm.vdisk_read(1, blocks(0, 1, 2), 4e9)
    assert tokens.tolist() == [10, 11, 99]
    assert hm.snapshot()["double_faults"] == 3 and hm.counters.swap_in_cache_pages == 3
    hm.check_invariant()


async def test_io_buffers_are_held_until_the_host_passes_completion() -> None:
    hm = make_memory(total_frames=256)
    hm.add_guest(1, 16, disk_blocks=64)
    done_w = await hm.vdisk_write(1, np.arange(8), np.arange(8) + 1, 0.0)
    _, done_r = await hm.vdisk_read(1, np.arange(16, 20), 0.0)   # a whole cluster: slower
    assert done_w < done_r
    assert hm.pool.counts()["iobuf"] == 12
    hm.tick(done_w - 1)
    assert hm.pool.counts()["iobuf"] == 12
    hm.tick(done_w)
    assert hm.pool.counts()["iobuf"] == 4
    hm.tick(done_r)
    assert hm.pool.counts()["iobuf"] == 0
    assert hm.vdisk(1).counters.iobuf_retired_pages == 12
    hm.check_invariant()


async def test_at_most_max_inflight_requests_are_in_service() -> None:
    hm = make_memory(total_frames=256, max_inflight_requests=2)
    hm.add_guest(1, 16, disk_blocks=64, disk_profile="hdd")
    d1 = await hm.vdisk_write(1, blocks(0), tok(1), 0.0)
    d2 = await hm.vdisk_write(1, blocks(1), tok(1), 0.0)
    d3 = await hm.vdisk_write(1, blocks(2), tok(1), 0.0)
    assert d1 < d2 < d3
    vd = hm.vdisk(1)
    assert vd.counters.backpressure_waits == 1
    assert vd.counters.backpressure_wait_us == d1     # it started when the first completed
    # Once the first completes (in virtual time) a new request starts at once.
    d4 = await hm.vdisk_write(1, blocks(3), tok(1), d2)
    assert vd.counters.backpressure_waits == 1
    assert d4 > d3


async def test_disk_io_competes_for_host_frames_with_guest_pages() -> None:
    """Heavy disk I/O makes host pressure: guest pages get swapped out for buffers and cache."""
    hm = make_memory(total_frames=48, swap_slots=256, low_watermark_frames=2)
    guests = FakeGuests(hm)
    guests.add(1, 40, disk_blocks=256)
    for first in range(0, 40, 4):
        await guests.touch(1, np.arange(first, first + 4), write=True)
    before = hm.counters.swap_out_pages
    await hm.vdisk_write(1, np.arange(16), np.arange(16) + 1, 0.0)
    assert hm.counters.swap_out_pages > before
    assert hm.pool.counts()["iobuf"] == 16 and hm.pool.counts()["cache"] == 16
    await guests.touch(1, np.arange(0, 4), write=False)
    assert guests.lost_pages == 0
    hm.check_invariant()


async def test_pinned_range_is_never_swapped_nor_trimmed() -> None:
    hm = make_memory(total_frames=128, swap_slots=64, vdisk_cache_max_pages=16, low_watermark_frames=0)
    FakeGuests(hm).add(1, 16, disk_blocks=128)
    hm.pin_vdisk_range(1, 0, 16)
    await hm.vdisk_read(1, blocks(0), 0.0)
    vd = hm.vdisk(1)
    assert hm.pool.pinned[vd.cache_loc[:16]].all()
    for first in range(16, 128, 16):
        await hm.vdisk_read(1, blocks(first), 0.0)
    hm.tick(1e12)
    assert (vd.cache_state[:16] == CacheState.FRAME).all()
    await hm.reclaim(1000, 1e12)
    assert (vd.cache_state[:16] == CacheState.FRAME).all()
    hm.unpin_vdisk_range(1, 0, 16)
    assert not hm.pool.pinned.any()
    hm.check_invariant()
    with pytest.raises(OutOfRange, match="block 128"):
        hm.pin_vdisk_range(1, 120, 9)


async def test_bad_requests_are_typed() -> None:
    hm = make_memory()
    hm.add_guest(1, 16, disk_blocks=64)
    with pytest.raises(OutOfRange, match="guest 1: block 64 out of range"):
        await hm.vdisk_read(1, blocks(1, 64), 0.0)
    with pytest.raises(OutOfRange, match="block 70"):
        await hm.vdisk_write(1, blocks(70), tok(1), 0.0)
    with pytest.raises(BadBatch, match="2 blocks carries 1 tokens"):
        await hm.vdisk_write(1, blocks(1, 2), tok(1), 0.0)
    with pytest.raises(DuplicatePages, match="block 2 appears twice"):
        await hm.vdisk_write(1, blocks(2, 2), tok(1, 2), 0.0)
    assert hm.pool.counts()["iobuf"] == hm.pool.counts()["cache"] == 0
    hm.add_guest(2, 16)        # no disk
    with pytest.raises(OutOfRange, match="block 0 out of range \\[0, 0\\)"):
        await hm.vdisk_read(2, blocks(0), 0.0)


async def test_disk_io_accepts_the_wire_form() -> None:
    hm = make_memory()
    hm.add_guest(1, 16, disk_blocks=64)
    await hm.vdisk_write(1, np.asarray([3], "<u8").tobytes(), np.asarray([5], "<u8").tobytes(), 0.0)
    tokens, _ = await hm.vdisk_read(1, np.asarray([3], "<u8").tobytes(), 0.0)
    assert tokens.tolist() == [5]
    assert hm.pool.kind[hm.vdisk(1).cache_loc[3]] == FrameKind.CACHE
