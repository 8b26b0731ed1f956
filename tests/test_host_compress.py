"""The host's compression cache, zero-page detection and free page reporting (hostd.compress, HostMemory)."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.hostd.compress import ZipConfig
from balloonlab.hostd.errors import InvalidState, InvariantViolation
from balloonlab.hostd.framepool import FrameKind
from balloonlab.hostd.memconfig import host_memory_config
from balloonlab.hostd.memstate import RECLAIM_BY_STATE, MemState
from balloonlab.hostd.p2m import PageState
from balloonlab.proto.content import PAGE_BYTES, ContentMap, ContentRange, compressed_bytes
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import ConfigError

from .test_host_fakes import FakeGuests, make_memory

TEXT = ContentMap([ContentRange(0, 1 << 28, compress=(0.25, 0.45))])      # every page fits in 2 KiB
RANDOM = ContentMap([ContentRange(0, 1 << 28, compress=(1.0, 1.0))])      # none does
ZERO_WRITES = ContentMap([ContentRange(0, 1 << 28, zero_writes=True)])    # every write is zeros


def _setup(pages: int = 32, frames: int = 64, content: ContentMap = TEXT, **zip_kw: object):
    cfg = ZipConfig(**{"compression": True, **zip_kw})   # type: ignore[arg-type]
    hm = make_memory(total_frames=frames, swap_slots=4 * pages, zip=cfg,
                     costs=CostModel(ept_fault_us=1.0))
    fg = FakeGuests(hm)
    fg.add(1, pages)
    hm.set_content(1, content.to_wire())     # what the guest's ContentReport gives the host
    return hm, fg


def _frames_of(hm, gid: int, gpfns: np.ndarray) -> np.ndarray:
    return hm.p2m(gid).loc[gpfns].copy()


async def test_compressible_pages_go_to_the_cache_not_to_swap() -> None:
    hm, fg = _setup(cache_pct=50)      # room for all 16
    all_pages = np.arange(32)
    await fg.touch(1, all_pages, write=True)
    victims = _frames_of(hm, 1, np.arange(16))
    got = await hm.reclaim_victims(victims, 100.0)
    p2m = hm.p2m(1)
    assert np.all(p2m.state[:16] == PageState.COMPRESSED)
    z = hm.zip
    sizes = compressed_bytes(TEXT, 1, fg.content[1][:16])
    assert z.book(1).bytes == int(sizes.sum())
    n_z = -(-int(sizes.sum()) // PAGE_BYTES)
    assert hm.pool.counts()["zcache"] == n_z and n_z < 16
    assert got.freed_frames == 16 - n_z            # compression saves frames only by its ratio
    assert hm.counters.swap_write_pages == 0 and hm.swap.used_slots == 0
    assert z.counters.compressed_pages == 16 and z.counters.compress_attempts == 16
    assert got.done_vt_us == pytest.approx(100.0 + 16 * z.cfg.compress_page_us)
    hm.check_invariant()
    # Faults decompress: CPU time, no I/O, the content back intact.
    done = await fg.touch(1, all_pages, write=False, vt_us=1000.0)
    assert fg.lost_pages == 0
    assert z.counters.decompressed_pages == 16 and hm.counters.swap_in_pages == 0
    assert done == pytest.approx(1000.0 + 16 * 1.0 + 16 * z.cfg.decompress_page_us)
    assert z.book(1).bytes == 0 and hm.pool.counts()["zcache"] == 0
    hm.check_invariant()


async def test_incompressible_pages_go_to_swap() -> None:
    hm, fg = _setup(content=RANDOM)
    await fg.touch(1, np.arange(8), write=True)
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(8)), 0.0)
    assert np.all(hm.p2m(1).state[:8] == PageState.SWAPPED)
    assert hm.zip.counters.compress_rejected_pages == 8 and hm.zip.counters.compressed_pages == 0
    assert hm.counters.swap_write_pages == 8 and hm.pool.counts()["zcache"] == 0
    await fg.touch(1, np.arange(8), write=False)
    assert fg.lost_pages == 0
    hm.check_invariant()


async def test_a_full_cache_spills_its_oldest_pages_to_swap() -> None:
    hm, fg = _setup(pages=40, cache_pct=10)     # cap: 4 frames
    cap = hm.zip.book(1).cap_frames
    assert cap == 4
    await fg.touch(1, np.arange(40), write=True)
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(10)), 0.0)      # first in
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(10, 30)), 0.0)
    b = hm.zip.book(1)
    assert b.n_frames <= cap and hm.pool.counts()["zcache"] == b.n_frames
    state = hm.p2m(1).state
    spilled = np.flatnonzero(state == PageState.SWAPPED)
    assert spilled.size == hm.zip.counters.compress_spilled_pages > 0
    assert hm.counters.swap_write_pages == spilled.size          # real swap writes
    assert spilled.max() < 10 or np.all(state[:10] == PageState.SWAPPED), "the oldest go first"
    kept = np.flatnonzero(state == PageState.COMPRESSED)
    assert kept.min() > spilled.max() or kept.size == 0
    hm.check_invariant()
    await fg.touch(1, np.arange(40), write=False)
    assert fg.lost_pages == 0
    assert hm.counters.swap_in_pages == spilled.size
    hm.check_invariant()


async def test_the_invariant_sees_a_cache_frame_leak() -> None:
    hm, fg = _setup(cache_pct=50)
    await fg.touch(1, np.arange(16), write=True)
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(16)), 0.0)
    hm.check_invariant()
    b = hm.zip.book(1)
    b.n_frames -= 1                       # the books forget a frame the pool still has as ZCACHE
    with pytest.raises(InvariantViolation):
        hm.check_invariant()


async def test_zero_pages_are_dropped_without_io() -> None:
    hm, fg = _setup(compression=False, zero_pages=True)
    await fg.touch(1, np.arange(8), write=False)      # faulted, never written: the zero page
    await fg.touch(1, np.arange(8, 16), write=True)
    got = await hm.reclaim_victims(_frames_of(hm, 1, np.arange(16)), 0.0)
    state = hm.p2m(1).state
    assert np.all(state[:8] == PageState.ZERO) and np.all(state[8:16] == PageState.SWAPPED)
    z = hm.zip.counters
    assert z.zero_pages_dropped == 8 and z.zero_checked_pages == 16
    assert hm.counters.swap_write_pages == 8 and got.freed_frames == 16
    assert hm.swap.used_slots == 8
    hm.check_invariant()
    await fg.touch(1, np.arange(16), write=False)
    assert fg.lost_pages == 0 and z.zero_pages_refaulted == 8 and hm.counters.swap_in_pages == 8
    hm.check_invariant()


async def test_a_zero_writes_region_keeps_its_token_through_a_zero_drop() -> None:
    """Pages written with zeros have real tokens: the host holds the token and no bytes."""
    hm, fg = _setup(content=ZERO_WRITES, compression=False, zero_pages=True)
    await fg.touch(1, np.arange(4), write=True)
    assert np.all(fg.content[1][:4] != 0)
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(4)), 0.0)
    assert np.all(hm.p2m(1).state[:4] == PageState.ZERO)
    await fg.touch(1, np.arange(4), write=False)
    assert fg.lost_pages == 0
    hm.check_invariant()


async def test_balloon_inflation_frees_cache_frames() -> None:
    hm, fg = _setup(cache_pct=50)
    await fg.touch(1, np.arange(16), write=True)
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(16)), 0.0)
    n_z = hm.pool.counts()["zcache"]
    freed = hm.balloon_inflate(1, np.arange(16))
    assert freed == n_z and hm.pool.counts()["zcache"] == 0
    assert hm.zip.counters.compressed_dropped_pages == 16
    hm.check_invariant()


async def test_free_page_reports_discard_frames_slots_and_cache() -> None:
    hm, fg = _setup(pages=32, frames=64, content=RANDOM)
    await fg.touch(1, np.arange(24), write=True)
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(8)), 0.0)        # 0..7 swapped
    free_before = hm.pool.free_frames
    freed = hm.report_free(1, np.arange(0, 16))
    assert freed == 8 and hm.pool.free_frames == free_before + 8
    assert np.all(hm.p2m(1).state[:16] == PageState.UNBACKED)
    assert hm.swap.used_slots == 0
    c = hm.counters
    assert (c.pages_reported, c.frames_discarded, c.reported_slots_dropped, c.free_reports) == (16, 8, 8, 1)
    hm.check_invariant()
    # The next touch is an ordinary fault: a fresh zero page (the guest must not expect the old content).
    tokens, _ = await hm.ept_fault(1, np.arange(16), 0.0)
    assert np.all(tokens == 0)
    hm.check_invariant()


async def test_reports_refuse_ballooned_pages_and_change_nothing() -> None:
    hm, fg = _setup()
    await fg.touch(1, np.arange(8), write=True)
    hm.balloon_inflate(1, np.array([5]))
    with pytest.raises(InvalidState, match="gpfn 5"):
        hm.report_free(1, np.array([4, 5]))
    assert hm.p2m(1).state[4] == PageState.FRAME and hm.counters.pages_reported == 0


def test_config_keys_are_checked() -> None:
    cfg = host_memory_config({"compression": True, "zero_page_detection": True, "compression_cache_pct": 5})
    assert cfg.zip.compression and cfg.zip.zero_pages and cfg.zip.cache_pct == 5
    assert not host_memory_config({}).zip.enabled
    with pytest.raises(ConfigError, match="compression_cache_pct"):
        host_memory_config({"compression_cache_pct": 0})
    with pytest.raises(ConfigError, match="compression_max_bytes"):
        host_memory_config({"compression_max_bytes": 5000})
    with pytest.raises(ConfigError, match="compression"):
        host_memory_config({"compression": "yes"})


def test_the_state_table_compresses_where_it_swaps() -> None:
    assert [s.label for s in MemState if RECLAIM_BY_STATE[s].compress] == ["hard", "low"]
    assert all(RECLAIM_BY_STATE[s].compress == RECLAIM_BY_STATE[s].host_swap for s in MemState)


def test_frame_kind_and_snapshot_keys() -> None:
    hm = make_memory(zip=ZipConfig(compression=True))
    hm.add_guest(0, 16)
    snap = hm.snapshot()
    assert snap["compression"] is True and snap["zcache_frames"] == 0
    assert {"compressed_pages", "decompressed_pages", "zero_pages_dropped", "compress_cpu_us"} <= set(snap)
    assert "compressed_pages" in snap["guests"]["0"]
    assert FrameKind.ZCACHE == 4
    off = make_memory()
    assert off.zip is None and off.snapshot()["compression"] is False


async def test_a_vms_consumption_counts_its_cache_frames() -> None:
    """ESX counts the compression cache in what a VM consumes (allocation targets, blocking)."""
    hm, fg = _setup(cache_pct=50)
    await fg.touch(1, np.arange(20), write=True)
    assert hm.consumed_frames(1) == 20
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(16)), 0.0)
    n_z = hm.pool.counts()["zcache"]
    assert n_z > 0 and hm.consumed_frames(1) == 4 + n_z
    assert hm.vm_allocations()[0].consumed_pages == 4 + n_z


async def test_the_tick_end_reclaim_reaches_its_goal_although_compressed_pages_free_part_of_a_frame() -> None:
    """One pass of victims frees fewer frames than pages when they compress: the boundary goes on."""
    cfg = ZipConfig(compression=True, cache_pct=100)
    hm = make_memory(total_frames=64, swap_slots=256, zip=cfg, low_watermark_frames=10)
    fg = FakeGuests(hm)
    fg.add(1, 128)
    hm.set_content(1, TEXT.to_wire())
    await fg.touch(1, np.arange(60), write=True)
    assert hm.pool.free_frames == 4
    got = await hm.balance(0.0)
    assert hm.pool.free_frames >= 20, (hm.pool.free_frames, got)      # twice the watermark
    assert got.freed_frames == hm.pool.free_frames - 4 and hm.pool.counts()["zcache"] > 0
    hm.check_invariant()
    await fg.touch(1, np.arange(60), write=False)
    assert fg.lost_pages == 0


async def test_the_state_table_decides_whether_swapped_pages_are_compressed() -> None:
    """Swapping counted under soft (arrival mode's in-tick reclaim can) does not compress; hard does."""
    hm, fg = _setup(cache_pct=50)
    await fg.touch(1, np.arange(16), write=True)
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(8)), 0.0, MemState.SOFT)
    assert np.all(hm.p2m(1).state[:8] == PageState.SWAPPED) and hm.zip.counters.compress_attempts == 0
    await hm.reclaim_victims(_frames_of(hm, 1, np.arange(8, 16)), 0.0, MemState.HARD)
    assert np.all(hm.p2m(1).state[8:16] == PageState.COMPRESSED)
    hm.check_invariant()
