"""Virtual disks through the host's page cache: cache modes, whole clusters, read-modify-write
double faults, the flusher, one budget with LRU by virtual time, allowances, pinning, I/O buffers."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.hostd.devices import Device, device_profile
from balloonlab.hostd.errors import BadBatch, DuplicatePages, OutOfRange
from balloonlab.hostd.framepool import FrameKind
from balloonlab.hostd.hostcache import CacheConfig
from balloonlab.hostd.vdisk import CacheState
from balloonlab.proto.costs import CostModel

from .test_host_fakes import FakeGuests, make_memory

SSD = device_profile("ssd")


def blocks(*values: int) -> np.ndarray:
    return np.array(values, np.uint64)


def tok(*values: int) -> np.ndarray:
    return np.array(values, np.uint64)


def mem(mode: str = "writeback", budget: int = 1024, **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("total_frames", 256)
    return make_memory(cache=CacheConfig(budget, mode, **kw.pop("cache_kw", {})), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "none"])
async def test_unwritten_blocks_read_as_zero_and_writes_read_back(mode: str) -> None:
    hm = mem(mode)
    hm.add_guest(1, 16, disk_blocks=64)
    tokens, _ = await hm.vdisk_read(1, blocks(0, 40), 0.0)
    assert tokens.tolist() == [0, 0]
    await hm.vdisk_write(1, blocks(40, 3), tok(7, 9), 0.0)
    tokens, _ = await hm.vdisk_read(1, blocks(3, 40, 3), 0.0)
    assert tokens.tolist() == [9, 7, 9]
    hm.check_invariant()
    assert (hm.pool.counts()["cache"] == 0) == (mode == "none")


async def test_a_miss_loads_the_whole_cluster_and_a_hit_costs_a_page_copy() -> None:
    hm = mem(costs=CostModel(page_copy_us=1.0))
    hm.add_guest(1, 16, disk_blocks=64)
    ref = Device(SSD)
    _, done = await hm.vdisk_read(1, blocks(17), 1000.0)
    assert done == ref.submit(1, 1000.0, 16, write=False, offset=16) + 1.0
    vd = hm.vdisk(1)
    assert vd.cache_state[16:32].tolist() == [CacheState.FRAME] * 16
    assert hm.pool.counts()["cache"] == 16
    assert vd.counters.cluster_loads == 1 and vd.counters.cache_miss_pages == 1
    _, done = await hm.vdisk_read(1, blocks(20, 21, 22), 5000.0)
    assert done == 5000.0 + 3 * 1.0
    assert vd.counters.cache_hit_pages == 3 and vd.device.requests == 1


async def test_writeback_completes_after_a_copy_and_the_flusher_writes_it_later() -> None:
    hm = mem("writeback", costs=CostModel(page_copy_us=1.0), cluster_pages=4,
             cache_kw={"dirty_expire_us": 1000.0, "dirty_writeback_us": 500.0})
    hm.add_guest(1, 16, disk_blocks=64)
    vd = hm.vdisk(1)
    done = await hm.vdisk_write(1, blocks(4, 5, 6, 7), tok(1, 2, 3, 4), 100.0)   # a whole cluster: no read
    assert done == 100.0 + 4 * 1.0
    assert vd.device.requests == 0 and vd.dirty_pages == 4
    assert vd.tokens[4:8].tolist() == [1, 2, 3, 4] and vd.image[4:8].tolist() == [0, 0, 0, 0]
    hm.tick(600.0)                       # the flusher runs, nothing expired yet
    assert vd.dirty_pages == 4
    hm.tick(1200.0)                      # dirtied at 100, expired at 1100
    assert vd.dirty_pages == 0 and vd.image[4:8].tolist() == [1, 2, 3, 4]
    assert vd.counters.writeback_pages == 4 and vd.counters.writeback_requests == 1
    assert vd.device.write_pages == 4
    hm.check_invariant()


async def test_writethrough_completes_on_the_device_and_leaves_the_copy_clean() -> None:
    hm = mem("writethrough", cluster_pages=4)
    hm.add_guest(1, 16, disk_blocks=64)
    ref = Device(SSD)
    done = await hm.vdisk_write(1, blocks(8, 9, 10, 11), tok(1, 2, 3, 4), 100.0)
    assert done == ref.submit(1, 100.0, 4, write=True, offset=8)
    vd = hm.vdisk(1)
    assert vd.dirty_pages == 0 and vd.image[8:12].tolist() == [1, 2, 3, 4]
    assert hm.pool.counts()["cache"] == 4


async def test_a_guest_short_of_frames_drops_its_own_least_recently_used_unpinned_clusters() -> None:
    """The one cluster-dropping step: the cache's budget and the engine's in-partition reclaim share it."""
    hm = mem("writethrough", cluster_pages=4)
    hm.add_guest(1, 16, disk_blocks=64)
    for vt, first in enumerate((0, 8, 16, 24)):
        await hm.vdisk_read(1, blocks(first), float(vt))
    await hm.vdisk_read(1, blocks(0), 10.0)    # cluster 0 becomes the most recent
    vd = hm.vdisk(1)
    vd.set_pinned(8, 4, True)                  # cluster 2 is pinned: never dropped
    hm.tick(1e12)                              # retire the reads' I/O buffers: only cache frames are left
    free = hm.pool.free_frames
    assert vd.drop_clean(5) == 8               # whole clusters, oldest first, until 5 frames are free
    cached = sorted(set((np.flatnonzero(vd.cache_state) // 4).tolist()))
    assert cached == [0, 2]                    # 4 and 6 went (the oldest unpinned); pinned 2 and recent 0 stay
    assert hm.pool.free_frames == free + 8
    assert vd.drop_clean(100) == 4 and vd.drop_clean(1) == 0
    hm.check_invariant()


async def test_none_holds_io_buffers_until_the_host_passes_completion() -> None:
    hm = mem("none")
    hm.add_guest(1, 16, disk_blocks=64)
    done_w = await hm.vdisk_write(1, np.arange(8), np.arange(8) + 1, 0.0)
    _, done_r = await hm.vdisk_read(1, np.arange(16, 20), done_w)
    assert done_w < done_r
    assert hm.pool.counts()["iobuf"] == 12 and hm.pool.counts()["cache"] == 0
    hm.tick(done_w - 1)
    assert hm.pool.counts()["iobuf"] == 12
    hm.tick(done_w)
    assert hm.pool.counts()["iobuf"] == 4
    hm.tick(done_r)
    assert hm.pool.counts()["iobuf"] == 0
    assert hm.vdisk(1).counters.iobuf_retired_pages == 12
    hm.check_invariant()


@pytest.mark.parametrize("mode", ["writeback", "writethrough"])
async def test_a_partial_write_to_an_uncached_cluster_reads_the_rest_first(mode: str) -> None:
    """The seed's nested-swapping double fault: read-modify-write of a host cache cluster."""
    hm = mem(mode, cluster_pages=4, costs=CostModel(page_copy_us=1.0))
    hm.add_guest(1, 16, disk_blocks=64)
    vd = hm.vdisk(1)
    await hm.vdisk_write(1, blocks(0, 1, 2, 3), tok(1, 2, 3, 4), 0.0)     # whole cluster: no read
    assert vd.counters.double_faults == 0 and vd.device.read_pages == 0
    ref = Device(SSD)
    done = await hm.vdisk_write(1, blocks(9), tok(5), 1000.0)            # 1 of 4: read the other 3 first
    read_done = ref.submit(1, 1000.0, 3, write=False, offset=8)
    assert vd.counters.double_faults == 1 and vd.counters.double_fault_read_pages == 3
    if mode == "writeback":
        assert done == read_done + 1.0
    assert vd.cache_state[8:12].tolist() == [1, 1, 1, 1]
    records, dropped = vd.take_double_faults()
    assert dropped == 0 and [(r.op, r.blocks.tolist()) for r in records] == [("write", [9])]
    assert records[0].added_us == pytest.approx(read_done - 1000.0)
    await hm.vdisk_write(1, blocks(10), tok(6), 2000.0)                   # now cached: no read
    assert vd.counters.double_faults == 1
    assert hm.snapshot()["double_faults"] == 1
    hm.check_invariant()


async def test_one_budget_for_all_guests_whatever_their_number() -> None:
    for n_guests in (2, 6):
        hm = mem(budget=64, total_frames=1024, cluster_pages=4, expected_guests=n_guests)
        for g in range(n_guests):
            hm.add_guest(g, 8, disk_blocks=512)
        for t in range(6):
            for g in range(n_guests):
                for first in range(0, 64, 4):
                    await hm.vdisk_read(g, blocks(t * 64 + first), t * 10_000.0 + first)
                # Within a tick a disk only makes room in its own share: the total never passes the budget.
                assert hm.pool.counts()["cache"] <= 64
            hm.tick((t + 1) * 10_000.0)
            assert hm.pool.counts()["cache"] <= 64
        hm.check_invariant()


async def test_the_budget_drops_the_least_recently_used_clusters_by_virtual_time() -> None:
    hm = mem(budget=12, cluster_pages=4)
    hm.add_guest(1, 8, disk_blocks=64)
    hm.add_guest(2, 8, disk_blocks=64)
    vd1, vd2 = hm.vdisk(1), hm.vdisk(2)
    for vd in (vd1, vd2):
        hm.cache.set_limits(vd, 100)                 # let both grow past the budget within the tick
    await hm.vdisk_read(1, blocks(0), 500.0)         # guest 1's cluster 0 at 500
    await hm.vdisk_read(2, blocks(0), 100.0)         # guest 2's cluster 0 at 100: oldest
    await hm.vdisk_read(1, blocks(4), 300.0)
    await hm.vdisk_read(2, blocks(4), 300.0)         # a tie at 300: guest 1's goes first
    await hm.vdisk_read(1, blocks(8), 900.0)
    assert hm.pool.counts()["cache"] == 20
    hm.tick(1000.0)                                  # over by 8, +12 // 16 = 0 headroom: drop 8 pages
    assert vd2.cache_state[0] == CacheState.NOT_CACHED and vd1.cache_state[4] == CacheState.NOT_CACHED
    assert vd2.cache_state[4] == CacheState.FRAME and vd1.cache_state[0] == CacheState.FRAME
    assert hm.pool.counts()["cache"] == 12
    assert hm.cache.counters.budget_dropped_pages == 8


async def test_a_disk_past_its_allowance_drops_its_own_oldest_clean_clusters() -> None:
    hm = mem(budget=8, cluster_pages=4, expected_guests=2)
    hm.add_guest(1, 8, disk_blocks=64)
    hm.add_guest(2, 8, disk_blocks=64)
    await hm.vdisk_read(2, blocks(0), 0.0)           # guest 2's 4 pages: not guest 1's to drop
    for i, first in enumerate(range(0, 32, 4)):
        await hm.vdisk_read(1, blocks(first), 10.0 * i)
        assert hm.vdisk(1).cached_pages <= 4
    assert hm.vdisk(2).cached_pages == 4
    assert hm.vdisk(1).cache_state[28] == CacheState.FRAME


async def test_dirty_pages_are_written_back_never_dropped_and_writers_are_throttled() -> None:
    hm = mem("writeback", budget=40, cluster_pages=4, cache_kw={"dirty_pct": 20.0, "dirty_background_pct": 10.0})
    hm.add_guest(1, 8, disk_blocks=256)
    vd = hm.vdisk(1)
    hm.cache.set_limits(vd, 40)                      # dirty limit 8 pages
    for i, first in enumerate(range(0, 16, 4)):
        await hm.vdisk_write(1, np.arange(first, first + 4), np.arange(4) + 1, 100.0 * i)
    assert vd.dirty_pages <= 8 and vd.counters.throttled_writes >= 1
    assert vd.counters.writeback_pages >= 8
    for i, first in enumerate(range(16, 160, 4)):
        await hm.vdisk_write(1, np.arange(first, first + 4), np.arange(4) + 7, 1000.0 + i)
    assert vd.cached_pages <= 40
    hm.check_invariant()                             # a dirty page is never dropped: the invariant says so
    hm.tick(5000.0)
    assert vd.dirty_pages <= 4                       # the flusher: below the background threshold
    hm.check_invariant()


async def test_clean_cache_goes_before_guest_pages_under_host_pressure() -> None:
    hm = mem("writethrough", budget=64, total_frames=48, swap_slots=256, low_watermark_frames=2, cluster_pages=4)
    guests = FakeGuests(hm)
    guests.add(1, 40, disk_blocks=256)
    await hm.vdisk_read(1, np.arange(0, 32, 4).astype(np.uint64), 0.0)   # 32 clean cache pages
    assert hm.pool.counts()["cache"] == 32
    for first in range(0, 20, 4):
        await guests.touch(1, np.arange(first, first + 4), write=True)
    assert hm.counters.swap_out_pages == 0 and hm.counters.pressure_dropped_cache_pages > 0
    hm.tick(10_000.0)
    assert guests.lost_pages == 0
    hm.check_invariant()


async def test_at_the_boundary_clean_clusters_are_dropped_for_free_frames() -> None:
    hm = mem("writethrough", budget=64, total_frames=40, low_watermark_frames=4, cluster_pages=4)
    hm.add_guest(1, 8, disk_blocks=256)
    hm.cache.set_limits(hm.vdisk(1), 64)
    await hm.vdisk_read(1, np.arange(0, 144, 4).astype(np.uint64)[:9], 0.0)   # 36 pages: 4 free frames left
    assert hm.pool.free_frames == 4
    hm.tick(10_000.0)                                # wants 2 x 4 free: drops one cluster
    assert hm.pool.free_frames == 8 and hm.cache.counters.pressure_dropped_pages == 4


async def test_at_most_max_inflight_requests_are_in_service() -> None:
    hm = mem("none", max_inflight_requests=2)
    hm.add_guest(1, 16, disk_blocks=64, disk_profile="hdd")
    d1 = await hm.vdisk_write(1, blocks(0), tok(1), 0.0)
    d2 = await hm.vdisk_write(1, blocks(1), tok(1), 0.0)
    d3 = await hm.vdisk_write(1, blocks(2), tok(1), 0.0)
    assert d1 < d2 < d3
    vd = hm.vdisk(1)
    assert vd.counters.backpressure_waits == 1
    assert vd.counters.backpressure_wait_us == d1     # it started when the first completed
    d4 = await hm.vdisk_write(1, blocks(3), tok(1), d2)
    assert vd.counters.backpressure_waits == 1
    assert d4 > d3


async def test_pinned_clusters_stay_cached_through_budget_and_pressure() -> None:
    hm = mem("writethrough", budget=16, total_frames=128, swap_slots=64, low_watermark_frames=0)
    FakeGuests(hm).add(1, 16, disk_blocks=128)
    hm.pin_vdisk_range(1, 0, 16)
    await hm.vdisk_read(1, blocks(0), 0.0)
    vd = hm.vdisk(1)
    assert hm.pool.pinned[vd.cache_loc[:16]].all()
    for first in range(16, 128, 16):
        await hm.vdisk_read(1, blocks(first), float(first))
    hm.tick(1e12)
    assert (vd.cache_state[:16] == CacheState.FRAME).all()
    hm.cache.boundary({1: vd}, 2e12, want_frames=1000)
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


async def test_an_exempt_range_stays_cached_without_pinning_its_frames() -> None:
    hm = mem("writethrough", budget=8, cluster_pages=4)
    hm.add_guest(1, 8, disk_blocks=64)
    vd = hm.vdisk(1)
    vd.set_swap_exempt(8, 8, True)
    await hm.vdisk_read(1, blocks(8, 12), 0.0)
    hm.cache.boundary({1: vd}, 1e6, want_frames=1000)
    assert (vd.cache_state[8:16] == CacheState.FRAME).all() and not hm.pool.pinned.any()
    vd.set_swap_exempt(8, 8, False)
    hm.cache.boundary({1: vd}, 2e6, want_frames=1000)
    assert not (vd.cache_state[8:16] == CacheState.FRAME).any()
    hm.check_invariant()
