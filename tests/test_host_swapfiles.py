"""Host swap: one file per guest, slot = gpfn, a swap cache that saves rewriting unchanged pages."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from balloonlab.hostd.errors import InvariantViolation
from balloonlab.hostd.hostswap import PENDING_TOKEN, HostSwap, SwapTooSmall
from balloonlab.hostd.memory import HostMemory
from balloonlab.proto.errors import ConfigError


def test_files_are_laid_out_by_guest_id_whoever_opens_first() -> None:
    a, b = HostSwap(100), HostSwap(100)
    a.reserve({2: 10, 0: 20, 1: 5})
    b.reserve({1: 5, 2: 10, 0: 20})
    for swap, order in ((a, (2, 0, 1)), (b, (0, 1, 2))):
        for gid in order:
            swap.add_file(gid, {0: 20, 1: 5, 2: 10}[gid])
    assert [a.base(g) for g in (0, 1, 2)] == [b.base(g) for g in (0, 1, 2)] == [0, 20, 25]
    assert a.slots_of(1, np.array([0, 4])).tolist() == [20, 24]


def test_a_device_too_small_for_the_files_is_refused_with_the_sizes() -> None:
    swap = HostSwap(512)
    with pytest.raises(SwapTooSmall, match=r"512 slots \(2 MiB\) but .* need 768 \(3 MiB.*at least 3"):
        swap.reserve({0: 256, 1: 512})
    swap.add_file(0, 256)
    with pytest.raises(SwapTooSmall, match="need 768"):
        swap.add_file(1, 512)


def test_swap_cache_keeps_the_content_after_swap_in_and_saves_the_rewrite() -> None:
    swap = HostSwap(16)
    swap.add_file(3, 8)
    slots = swap.slots_of(3, np.array([1, 2, 5]))
    toks = np.array([11, 12, 15], np.uint64)
    assert swap.store(slots, toks).tolist() == [True, True, True]
    assert swap.used_slots == 3
    assert swap.swap_in(slots).tolist() == [11, 12, 15]
    assert swap.used_slots == 0 and swap.cached_slots == 3
    # Page 2 was written by the guest meanwhile: a new token; the others come back unchanged.
    again = swap.store(slots, np.array([11, 99, 15], np.uint64))
    assert again.tolist() == [False, True, False]
    assert swap.writes_avoided == 2
    swap.check_invariant()


def test_dropping_forgets_swapped_and_cached_content() -> None:
    swap = HostSwap(8)
    swap.add_file(0, 8)
    s = swap.slots_of(0, np.array([0, 1]))
    swap.store(s, np.array([5, 6], np.uint64))
    swap.swap_in(s[:1])
    swap.drop(s)
    assert swap.used_slots == 0 and swap.cached_slots == 0 and swap.token[s].tolist() == [0, 0]
    # After a drop the same content is written again: nothing vouches for it any more.
    assert swap.store(s[:1], np.array([5], np.uint64)).tolist() == [True]


def test_placeholders_are_never_taken_for_cached_content() -> None:
    swap = HostSwap(8)
    swap.add_file(0, 8)
    s = swap.slots_of(0, np.array([3]))
    swap.store(s, np.array([7], np.uint64))
    swap.swap_in(s)
    assert swap.store(s, np.array([PENDING_TOKEN], np.uint64)).tolist() == [True]
    assert swap.placeholders(0) == 1
    assert swap.fill_placeholders(0, np.array([3]), np.array([7], np.uint64)) == 1
    assert swap.placeholders(0) == 0 and swap.token[s].tolist() == [7]


def test_a_removed_file_holds_nothing_and_comes_back_at_its_place() -> None:
    swap = HostSwap(16)
    swap.reserve({0: 8, 1: 8})
    swap.add_file(0, 8)
    swap.add_file(1, 8)
    swap.store(swap.slots_of(1, np.array([0, 7])), np.array([1, 2], np.uint64))
    swap.remove_file(1)
    assert swap.used_slots == 0 and swap.slots_owned_by(1).size == 0
    assert swap.add_file(1, 8) == 8
    swap.check_invariant()
    swap.used[0] = True
    with pytest.raises(InvariantViolation, match="marked used"):
        swap.check_invariant()


class _Guest:
    """Shootdown replies from a guest whose page contents the test controls."""

    def __init__(self, pages: int) -> None:
        self.content = np.arange(pages, dtype=np.uint64) + np.uint64(1 << 32)
        self.labels = np.zeros(pages, bool)
        self.mem: HostMemory | None = None

    async def shootdown(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        g = gpfns.astype(np.int64)
        assert self.mem is not None
        self.mem.record_labels(gid, g, np.packbits(self.labels[g]).tobytes())
        return self.content[g].copy()


async def _host(pages: int = 16, frames: int = 64) -> tuple[HostMemory, _Guest]:
    guest = _Guest(pages)
    mem = HostMemory(frames, 64, "random", np.random.default_rng(1), low_watermark_frames=1,
                     reclaim_batch_frames=1)
    guest.mem = mem
    mem.wire(shootdown=guest.shootdown)
    mem.add_guest(0, pages, disk_blocks=0)
    await mem.ept_fault(0, np.arange(pages, dtype=np.uint64), 0.0)
    return mem, guest


async def _evict_all(mem: HostMemory) -> None:
    got = await mem.reclaim(mem.pool.frames_of(1), 0.0)
    assert got.freed_frames > 0


async def test_host_memory_rewrites_only_pages_the_guest_changed() -> None:
    mem, guest = await _host()
    await _evict_all(mem)
    written = mem.counters.swap_write_pages
    assert written == 16 and mem.counters.swap_writes_avoided == 0
    tokens, _ = await mem.ept_fault(0, np.arange(16, dtype=np.uint64), 100.0)
    assert tokens.tolist() == guest.content.tolist()
    guest.content[[3, 4]] += np.uint64(1)           # the guest writes two pages
    await _evict_all(mem)
    assert mem.counters.swap_write_pages - written == 2
    assert mem.counters.swap_writes_avoided == 14
    assert mem.counters.swap_out_pages == 32
    mem.check_invariant()


async def test_a_fresh_fault_on_a_swapped_page_reads_nothing_and_returns_zero() -> None:
    mem, guest = await _host()
    await _evict_all(mem)
    reads = mem.swap.disk.read_pages
    fresh = np.packbits(np.array([True, False])).tobytes()
    tokens, done = await mem.ept_fault(0, np.array([5, 6], np.uint64), 1000.0, fresh)
    assert tokens.tolist() == [0, int(guest.content[6])]
    assert mem.swap.disk.read_pages - reads == 1
    assert mem.counters.fresh_swapins_avoided == 1
    assert not mem.swap.cached[mem.swap.slots_of(0, np.array([5]))][0]   # the old content is gone
    mem.check_invariant()


async def test_labels_attribute_real_swap_writes_and_reads_of_clean_cache_pages() -> None:
    mem, guest = await _host()
    guest.labels[:4] = True                          # the guest had pages 0-3 as clean page cache
    await _evict_all(mem)
    c = mem.counters
    assert c.clean_cache_evicted_pages == 4 and c.clean_cache_swap_write_pages == 4
    await mem.ept_fault(0, np.arange(0, 8, dtype=np.uint64), 10.0)
    assert c.clean_cache_swap_read_pages == 4        # 4-7 were not labelled
    # Evicted again unchanged: the swap cache saves the write, and the count says so.
    await _evict_all(mem)
    assert c.clean_cache_evicted_pages == 8 and c.clean_cache_swap_write_pages == 4
    assert mem.snapshot()["guests"]["0"]["clean_cache_swap_read_pages"] == 4


async def test_labels_of_the_wrong_length_are_counted_and_ignored() -> None:
    mem, _ = await _host()
    assert not mem.record_labels(0, np.arange(9), b"\xff")
    assert mem.counters.bad_labels == 1
    assert mem.record_labels(0, np.arange(9), b"\xff\x80")


async def test_the_disk_cache_is_never_host_swapped() -> None:
    mem, _ = await _host(pages=8, frames=40)
    mem.add_guest(1, 8, disk_blocks=64)
    await mem.vdisk_read(1, np.arange(0, 16, dtype=np.uint64), 0.0)
    assert mem.pool.frames_of(2) == 16
    await mem.reclaim(40, 0.0)
    assert mem.pool.frames_of(2) == 16 and mem.counters.swap_out_cache_pages == 0
    assert mem.pool.frames_of(1) == 0


def test_the_scenario_refuses_a_swap_too_small_for_the_files() -> None:
    from balloonlab.scenario import Overrides, find_scenario, load_scenario
    from balloonlab.validators import VALIDATORS
    path = find_scenario("tests-tiny")
    with pytest.raises(ConfigError, match=r"swap_mib = 1 cannot hold the guests' swap files"):
        load_scenario(path, Overrides(settings=_settings({"host.swap_mib": 1})), VALIDATORS)


def _settings(values: dict) -> tuple:
    from balloonlab.overrides import parse_setting
    return tuple(parse_setting(f"{k}={v}") for k, v in values.items())


async def test_a_late_answer_that_comes_before_its_eviction_is_applied_is_not_lost() -> None:
    """One reclaim, two guests: guest 0's shootdown is deferred (placeholders) and answered while guest 1's
    shootdown is still out; the eviction is applied afterwards and must take the answer, not the placeholder."""
    mem = HostMemory(8, 64, "random", np.random.default_rng(3), low_watermark_frames=0, reclaim_batch_frames=1)
    content = {0: np.arange(4, dtype=np.uint64) + np.uint64(100), 1: np.arange(4, dtype=np.uint64) + np.uint64(200)}
    gate = asyncio.Event()

    async def shootdown(gid: int, gpfns: np.ndarray) -> np.ndarray:
        g = gpfns.astype(np.int64)
        if gid == 0:              # unresponsive: placeholders now, the answer a moment later
            asyncio.get_running_loop().call_soon(mem.fill_placeholders, 0, g, content[0][g].copy())
            return np.full(g.size, PENDING_TOKEN, np.uint64)
        await gate.wait()
        return content[1][g].copy()

    mem.wire(shootdown=shootdown)
    for gid in (0, 1):
        mem.add_guest(gid, 4)
        await mem.ept_fault(gid, np.arange(4, dtype=np.uint64), 0.0)
    task = asyncio.ensure_future(mem.reclaim(8, 0.0))
    for _ in range(5):
        await asyncio.sleep(0)    # guest 0 answered; guest 1 has not
    gate.set()
    await task
    assert mem.placeholder_slots(0) == 0
    for gid in (0, 1):
        tokens, _ = await mem.ept_fault(gid, np.arange(4, dtype=np.uint64), 10.0)
        assert tokens.tolist() == content[gid].tolist()
    mem.check_invariant()


def test_without_the_swap_cache_every_eviction_writes() -> None:
    """``[host] swap_cache = false``: a swapped-in page keeps no slot, so taking it again unchanged writes again."""
    from balloonlab.hostd.memconfig import host_memory_config

    for keep, writes in ((True, [3, 0]), (False, [3, 3])):
        swap = HostSwap(16)
        swap.keep_cache = keep
        swap.add_file(3, 8)
        slots = swap.slots_of(3, np.array([1, 2, 5]))
        got = []
        for _ in range(2):
            got.append(int(np.count_nonzero(swap.store(slots, np.array([11, 12, 15], np.uint64)))))
            swap.swap_in(slots)
        assert got == writes and swap.cached_slots == (3 if keep else 0)
        swap.check_invariant()
    assert host_memory_config({"swap_cache": False}).swap_cache is False
    assert host_memory_config({}).swap_cache is True
    with pytest.raises(ConfigError, match="swap_cache"):
        host_memory_config({"swap_cache": "no"})
