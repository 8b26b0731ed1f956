"""HostMemory: EPT faults, host swapping, balloon, A/D bits, pinning, dead guests, the invariant."""
from __future__ import annotations

import asyncio
import json
from typing import Callable

import numpy as np
import pytest

from balloonlab.hostd.errors import (BadBatch, BalloonLimit, DuplicateGuest, DuplicatePages, HostdError, HostOutOfMemory,
                          InvalidState, InvariantViolation, OutOfRange, UnknownGuest)
from balloonlab.hostd.hostswap import PENDING_TOKEN
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.p2m import PageState
from balloonlab.hostd.devices import Device, device_profile
from balloonlab.hostd.hostswap import SwapTooSmall
from balloonlab.proto.costs import CostModel
from balloonlab.proto.tokens import KEEP_TOKEN
from balloonlab.proto.errors import ErrorCode

from .test_host_fakes import FakeGuests, make_memory


def gp(*values: int) -> np.ndarray:
    return np.array(values, np.uint64)


async def yield_until(pred: Callable[[], bool], max_yields: int = 100) -> None:
    """Let other tasks run until ``pred()`` holds (no sleeping: only yields)."""
    for _ in range(max_yields):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


class GatedShootdown:
    """A shootdown that waits until the test opens the gate, and returns fixed tokens."""

    def __init__(self, hm: HostMemory, tokens_of: dict[int, np.ndarray]) -> None:
        self.gate = asyncio.Event()
        self.calls: list[tuple[int, list[int]]] = []
        self.tokens_of = tokens_of
        hm.wire(shootdown=self)

    async def __call__(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        self.calls.append((gid, gpfns.astype(int).tolist()))
        await self.gate.wait()
        return self.tokens_of[gid][gpfns.astype(np.int64)]


# -- EPT faults ------------------------------------------------------------------

async def test_fault_backs_unbacked_pages_with_zero_pages() -> None:
    hm = make_memory(total_frames=8, costs=CostModel(ept_fault_us=5.0))
    hm.add_guest(1, 16)
    tokens, done = await hm.ept_fault(1, gp(3, 5), 1000.0)
    assert tokens.tolist() == [0, 0]
    assert done == 1000.0 + 2 * 5.0
    assert hm.guest_counts(1)["resident_pages"] == 2
    assert hm.counters.ept_faults == 2 and hm.counters.ept_fault_calls == 1
    assert hm.pool.counts()["guest"] == 2
    hm.check_invariant()


async def test_fault_accepts_the_wire_form() -> None:
    hm = make_memory()
    hm.add_guest(1, 16)
    tokens, _ = await hm.ept_fault(1, np.asarray([1, 2], "<u8").tobytes(), 0.0)
    assert tokens.size == 2 and hm.guest_counts(1)["resident_pages"] == 2


async def test_fault_on_a_backed_page_keeps_the_guests_content() -> None:
    """The host never took that frame: only the guest knows what it wrote there since, so the reply says KEEP."""
    hm = make_memory()
    hm.add_guest(1, 16)
    await hm.ept_fault(1, gp(4), 0.0)
    frame = int(hm._guests[1].p2m.loc[4])
    hm.pool.token[frame] = 77   # what the host stored when it backed it: stale once the guest writes
    tokens, _ = await hm.ept_fault(1, gp(4), 0.0)
    assert tokens.tolist() == [KEEP_TOKEN]
    tokens, _ = await hm.ept_fault(1, gp(2, 4, 6), 0.0)   # mixed: fresh pages get theirs, the backed one KEEP
    assert tokens.tolist() == [0, KEEP_TOKEN, 0]
    assert hm._guests[1].p2m.loc[4] == frame and hm.pool.token[frame] == 77
    assert hm.counters.ept_faults == 3 and hm.counters.ept_fault_spurious_pages == 2


async def test_fault_refuses_the_same_gpfn_twice() -> None:
    """proto/README.md: the same gpfn twice in one batch is BAD_FIELD, and nothing is done."""
    hm = make_memory()
    hm.add_guest(1, 16)
    with pytest.raises(DuplicatePages, match="gpfn 3 appears twice") as e:
        await hm.ept_fault(1, gp(3, 5, 3), 0.0)
    assert e.value.code == ErrorCode.BAD_FIELD
    assert hm.guest_counts(1)["resident_pages"] == 0


async def test_fault_out_of_range_names_the_gpfn() -> None:
    hm = make_memory()
    hm.add_guest(1, 16)
    with pytest.raises(OutOfRange, match="guest 1: gpfn 16 out of range") as e:
        await hm.ept_fault(1, gp(2, 16), 0.0)
    assert e.value.code == ErrorCode.OUT_OF_RANGE
    assert hm.guest_counts(1)["resident_pages"] == 0   # refused as a whole


async def test_fault_on_a_ballooned_page_is_refused() -> None:
    hm = make_memory()
    hm.add_guest(1, 16)
    hm.balloon_inflate(1, gp(5))
    with pytest.raises(InvalidState, match="gpfn 5 is BALLOONED; deflate it") as e:
        await hm.ept_fault(1, gp(4, 5), 0.0)
    assert e.value.code == ErrorCode.INVALID_STATE


async def test_unknown_and_duplicate_guests() -> None:
    hm = make_memory()
    hm.add_guest(1, 16)
    with pytest.raises(DuplicateGuest):
        hm.add_guest(1, 16)
    with pytest.raises(UnknownGuest, match="guest 9 is not known") as e:
        await hm.ept_fault(9, gp(0), 0.0)
    assert e.value.code == ErrorCode.UNKNOWN_GUEST


# -- host swapping -------------------------------------------------------------------

async def test_tokens_survive_swap_out_and_swap_in() -> None:
    """Every page the guest held comes back with the content it had: no page lost."""
    hm = make_memory(total_frames=16, swap_slots=128, low_watermark_frames=2)
    guests = FakeGuests(hm)
    guests.add(1, 40)
    guests.add(2, 40)
    rng = np.random.default_rng(5)
    for _ in range(200):
        gid = int(rng.integers(1, 3))
        await guests.touch(gid, rng.integers(0, 40, 3), write=bool(rng.random() < 0.6))
    for gid in (1, 2):
        for first in range(0, 40, 4):
            await guests.touch(gid, np.arange(first, first + 4), write=False)
    assert guests.lost_pages == 0
    assert hm.counters.swap_out_pages > 50 and hm.counters.swap_in_pages > 50
    assert hm.counters.shootdowns > 0
    hm.check_invariant()


async def test_swapped_page_content_is_in_its_slot_until_faulted_back() -> None:
    hm = make_memory(total_frames=2, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1)
    guests = FakeGuests(hm)
    guests.add(1, 4)
    await guests.touch(1, gp(0, 1), write=True)
    await guests.touch(1, gp(2), write=False)
    p2m = hm._guests[1].p2m
    out = int(np.flatnonzero(p2m.state == PageState.SWAPPED)[0])
    slot = int(p2m.loc[out])
    assert hm.swap.token[slot] == guests.content[1][out] != 0
    assert guests.shootdowns == [(1, [out])]
    assert hm.swap.used_slots == 1
    await guests.touch(1, gp(out), write=False)
    assert guests.lost_pages == 0
    assert hm.swap.used_slots == 1      # the slot of the page evicted for it; its own slot was freed
    assert p2m.state[out] == PageState.FRAME
    hm.check_invariant()


async def test_direct_reclaim_waits_for_the_swap_out_write_and_swap_in_read() -> None:
    costs = CostModel(ept_fault_us=5.0)
    hm = make_memory(total_frames=2, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1,
                     costs=costs, swap_profile="hdd")
    guests = FakeGuests(hm)
    guests.add(1, 4)
    await guests.touch(1, gp(0, 1), write=True)
    ref = Device(device_profile("hdd"))          # the guest's lane of the swap device, replayed
    _, done = await hm.ept_fault(1, gp(2), 100.0)
    out = int(np.flatnonzero(hm._guests[1].p2m.state == PageState.SWAPPED)[0])
    write_done = ref.submit(1, 100.0, 1, write=True, offset=out)     # its slot: the file's base (0) + gpfn
    assert done == write_done + 5.0
    assert hm.counters.direct_reclaims == 1
    # Faulting the swapped page back: another eviction write, then the read, on one hdd channel.
    tokens, done = await hm.ept_fault(1, gp(out), 200.0)
    second = int(np.flatnonzero(hm._guests[1].p2m.state == PageState.SWAPPED)[0])
    second_write = ref.submit(1, 200.0, 1, write=True, offset=second)
    read_done = ref.submit(1, second_write, 1, write=False, offset=out)
    assert done == read_done + 5.0
    assert tokens[0] == guests.content[1][out]


async def test_every_allocation_keeps_the_low_watermark_without_stalling_the_vcpu() -> None:
    hm = make_memory(total_frames=10, swap_slots=32, low_watermark_frames=2, reclaim_batch_frames=1,
                     costs=CostModel(ept_fault_us=5.0))
    guests = FakeGuests(hm)
    guests.add(1, 16)
    await guests.touch(1, np.arange(8), write=True)
    assert hm.pool.free_frames == 2 and hm.counters.swap_out_pages == 0
    _, done = await hm.ept_fault(1, gp(8), 100.0)
    assert hm.counters.swap_out_pages == 1 and hm.pool.free_frames == 2
    assert done == 100.0 + 5.0                 # frames were there: no wait for the write
    assert hm.counters.direct_reclaims == 0
    hm.check_invariant()


async def test_out_of_memory_when_everything_is_pinned() -> None:
    hm = make_memory(total_frames=4, low_watermark_frames=0)
    guests = FakeGuests(hm)
    guests.add(1, 8)
    await guests.touch(1, gp(0, 1, 2, 3), write=False)
    hm.pin_gpfns(1, gp(0, 1, 2, 3))
    with pytest.raises(HostOutOfMemory, match="no evictable frame") as e:
        await hm.ept_fault(1, gp(4), 0.0)
    assert e.value.code == ErrorCode.OVERLOADED
    assert hm.counters.oom_refusals == 1
    hm.check_invariant()


def test_a_guest_whose_swap_file_does_not_fit_is_refused() -> None:
    hm = make_memory(total_frames=2, swap_slots=6)
    hm.add_guest(1, 4)
    with pytest.raises(SwapTooSmall, match="need 12"):
        hm.add_guest(2, 8)
    assert hm.guest_ids() == [1]


async def test_pinned_gpfns_stay_resident_and_stay_pinned_when_faulted_again() -> None:
    hm = make_memory(total_frames=4, swap_slots=32, low_watermark_frames=0)
    guests = FakeGuests(hm)
    guests.add(1, 16)
    hm.pin_gpfns(1, gp(0, 1))
    await guests.touch(1, gp(0, 1), write=True)
    for first in range(2, 16, 2):
        await guests.touch(1, np.arange(first, first + 2), write=True)
    p2m = hm._guests[1].p2m
    assert p2m.state[[0, 1]].tolist() == [PageState.FRAME, PageState.FRAME]
    assert hm.pool.pinned[p2m.loc[[0, 1]]].all()
    hm.unpin_gpfns(1, gp(0, 1))
    assert not hm.pool.pinned.any()
    hm.check_invariant()


async def test_a_fault_on_a_page_being_evicted_waits_for_the_shootdown() -> None:
    hm = make_memory(total_frames=2, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1)
    hm.add_guest(1, 4)
    held = np.array([11, 12, 13, 14], np.uint64)
    await hm.ept_fault(1, gp(0, 1), 0.0)
    gate = GatedShootdown(hm, {1: held})
    evicting = asyncio.create_task(hm.ept_fault(1, gp(2), 0.0))
    await yield_until(lambda: len(gate.calls) == 1)
    victim = gate.calls[0][1][0]
    assert hm.pool.busy[hm._guests[1].p2m.loc[victim]]
    hm.check_invariant()                      # consistent while the shootdown is pending
    refault = asyncio.create_task(hm.ept_fault(1, gp(victim), 0.0))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not refault.done()
    gate.gate.set()
    await evicting
    tokens, _ = await refault
    assert tokens.tolist() == [held[victim]]
    hm.check_invariant()


@pytest.mark.parametrize("pages", [1, 2])   # the one-page path and the batch path
async def test_a_fault_never_hands_back_a_deferred_shootdowns_placeholder(pages: int) -> None:
    """A page evicted by a deferred shootdown comes back with the guest's answer, not the placeholder.

    The deferral can start while the fault is already in host memory (a
    silent guest's frames are taken at a tick end while its late fault waits
    for room), so host memory itself waits for the answer before it reads
    the slot.
    """
    hm = make_memory(total_frames=4, swap_slots=16, low_watermark_frames=0, reclaim_batch_frames=4)
    hm.add_guest(1, 8)
    held = np.arange(100, 108, dtype=np.uint64)
    deferred: list[np.ndarray] = []

    async def deferred_shootdown(gid: int, gpfns: np.ndarray) -> np.ndarray:
        deferred.append(gpfns.astype(np.int64))
        return np.full(gpfns.size, PENDING_TOKEN, np.uint64)

    settles: list[int] = []

    async def settle(gid: int) -> None:   # the guest's late answer arrives
        settles.append(gid)
        for g in deferred:
            hm.fill_placeholders(gid, g.astype(np.uint64), held[g])
        deferred.clear()

    hm.wire(shootdown=deferred_shootdown, placeholders_settled=settle)
    await hm.ept_fault(1, gp(0, 1, 2, 3), 0.0)
    await hm.reclaim(4, 0.0)
    assert hm.placeholder_slots(1) == 4
    tokens, _ = await hm.ept_fault(1, gp(*range(pages)), 0.0)
    assert tokens.tolist() == held[:pages].tolist() and settles == [1]
    assert hm.placeholder_slots(1) == 0
    hm.check_invariant()


async def test_inflating_a_page_whose_eviction_is_pending_drops_it_when_the_ack_comes() -> None:
    hm = make_memory(total_frames=2, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1)
    hm.add_guest(1, 4)
    await hm.ept_fault(1, gp(0, 1), 0.0)
    gate = GatedShootdown(hm, {1: np.arange(4, dtype=np.uint64) + 100})
    evicting = asyncio.create_task(hm.ept_fault(1, gp(2), 0.0))
    await yield_until(lambda: len(gate.calls) == 1)
    victim = gate.calls[0][1][0]
    assert hm.balloon_inflate(1, gp(victim)) == 0     # its frame is freed when the ack arrives
    hm.check_invariant()
    gate.gate.set()
    await evicting
    assert hm._guests[1].p2m.state[victim] == PageState.BALLOONED
    assert hm.counters.dropped_evictions == 1 and hm.swap.used_slots == 0
    hm.check_invariant()


async def test_a_guest_dying_while_its_shootdown_is_pending_leaks_nothing() -> None:
    hm = make_memory(total_frames=4, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1)
    hm.add_guest(1, 4)
    hm.add_guest(2, 4)
    await hm.ept_fault(1, gp(0, 1, 2, 3), 0.0)
    hm.pin_gpfns(1, gp(1, 2, 3))
    gate = GatedShootdown(hm, {1: np.zeros(4, np.uint64)})
    faulting = asyncio.create_task(hm.ept_fault(2, gp(0), 0.0))
    await yield_until(lambda: len(gate.calls) == 1)
    assert gate.calls == [(1, [0])]
    hm.remove_guest(1)
    hm.check_invariant()
    gate.gate.set()
    await faulting
    assert hm.pool.counts() == {"free": 3, "guest": 1, "cache": 0, "iobuf": 0, "zcache": 0}
    assert hm.swap.used_slots == 0
    hm.check_invariant()


async def test_a_failed_shootdown_keeps_the_mapping() -> None:
    hm = make_memory(total_frames=2, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1)
    hm.add_guest(1, 4)
    await hm.ept_fault(1, gp(0, 1), 0.0)

    async def broken(gid: int, gpfns: np.ndarray) -> np.ndarray:
        raise ConnectionError("guest went away")

    hm.wire(shootdown=broken)
    with pytest.raises(HostOutOfMemory):
        await hm.ept_fault(1, gp(2), 0.0)
    assert hm.counters.shootdown_failures >= 1
    assert hm.guest_counts(1)["resident_pages"] == 2 and hm.swap.used_slots == 0
    assert not hm.pool.busy.any()
    hm.check_invariant()


async def test_a_short_shootdown_reply_is_a_failure_not_a_loss() -> None:
    hm = make_memory(total_frames=2, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1)
    hm.add_guest(1, 4)
    await hm.ept_fault(1, gp(0, 1), 0.0)

    async def short(gid: int, gpfns: np.ndarray) -> np.ndarray:
        return np.zeros(0, np.uint64)

    hm.wire(shootdown=short)
    got = await hm.reclaim(1, 0.0)
    assert got.freed_frames == 0 and hm.counters.shootdown_failures == 1
    hm.check_invariant()


async def test_a_cancelled_reclaim_leaves_memory_consistent() -> None:
    hm = make_memory(total_frames=2, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1)
    hm.add_guest(1, 4)
    await hm.ept_fault(1, gp(0, 1), 0.0)
    gate = GatedShootdown(hm, {1: np.zeros(4, np.uint64)})
    task = asyncio.create_task(hm.reclaim(1, 0.0))
    await yield_until(lambda: len(gate.calls) == 1)
    assert hm.pool.busy.any()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not hm.pool.busy.any() and hm.swap.used_slots == 0
    hm.check_invariant()


async def test_background_balance_refills_to_twice_the_low_watermark() -> None:
    hm = make_memory(total_frames=20, swap_slots=64, low_watermark_frames=3)
    guests = FakeGuests(hm)
    guests.add(1, 40)
    await guests.touch(1, np.arange(17), write=True)
    assert hm.pool.free_frames == 3
    got = await hm.balance(0.0)
    assert got.freed_frames == 3 and hm.pool.free_frames == 6
    assert (await hm.balance(0.0)).freed_frames == 0
    hm.check_invariant()


# -- balloon ------------------------------------------------------------------------------

async def test_inflate_frees_frames_and_slots_at_once() -> None:
    hm = make_memory(total_frames=2, swap_slots=8, low_watermark_frames=0, reclaim_batch_frames=1)
    guests = FakeGuests(hm)
    guests.add(1, 8, max_balloon_pages=4)
    await guests.touch(1, gp(0, 1), write=True)
    await guests.touch(1, gp(2), write=True)
    state = hm._guests[1].p2m.state
    swapped = int(np.flatnonzero(state == PageState.SWAPPED)[0])
    framed = int(np.flatnonzero(state == PageState.FRAME)[0])
    assert hm.balloon_inflate(1, gp(swapped, framed, 7)) == 1
    assert hm.pool.free_frames == 1 and hm.swap.used_slots == 0
    assert hm.balloon_pages(1) == 3
    assert hm.guest_counts(1)["ballooned_pages"] == 3
    hm.check_invariant()


def test_inflate_refusals_are_typed_name_the_page_and_change_nothing() -> None:
    hm = make_memory()
    hm.add_guest(1, 16, max_balloon_pages=4)
    hm.balloon_inflate(1, gp(1, 2))
    with pytest.raises(InvalidState, match="gpfn 2 is already BALLOONED"):
        hm.balloon_inflate(1, gp(3, 2))
    with pytest.raises(DuplicatePages, match="gpfn 5 appears twice") as dup:
        hm.balloon_inflate(1, gp(5, 6, 5))
    assert dup.value.code == ErrorCode.BAD_FIELD
    with pytest.raises(OutOfRange, match="gpfn 99"):
        hm.balloon_inflate(1, gp(3, 99))
    with pytest.raises(BalloonLimit, match="balloon of 2 pages \\+ 3 would exceed the maximum of 4") as lim:
        hm.balloon_inflate(1, gp(3, 4, 5))
    assert lim.value.code == ErrorCode.INVALID_STATE
    assert hm.balloon_pages(1) == 2
    assert hm._guests[1].p2m.in_state(PageState.BALLOONED).tolist() == [1, 2]
    hm.check_invariant()


async def test_deflate_returns_pages_as_fresh_zero_pages() -> None:
    hm = make_memory()
    guests = FakeGuests(hm)
    guests.add(1, 16)
    await guests.touch(1, gp(3), write=True)
    guests.inflate(1, gp(3))
    guests.deflate(1, gp(3))
    tokens, _ = await hm.ept_fault(1, gp(3), 0.0)
    assert tokens.tolist() == [0]
    assert hm.balloon_pages(1) == 0 and hm.counters.balloon_deflated_pages == 1


def test_deflating_what_was_never_inflated_is_refused() -> None:
    hm = make_memory()
    hm.add_guest(1, 16)
    hm.balloon_inflate(1, gp(1))
    with pytest.raises(InvalidState, match="gpfn 2 is UNBACKED; only BALLOONED pages can be deflated"):
        hm.balloon_deflate(1, gp(1, 2))
    with pytest.raises(DuplicatePages):
        hm.balloon_deflate(1, gp(1, 1))
    assert hm.balloon_pages(1) == 1


def test_default_max_balloon_is_65_percent_of_guest_ram() -> None:
    hm = make_memory()
    hm.add_guest(1, 100)
    assert hm.guest_counts(1)["max_balloon_pages"] == 65


# -- A/D bits ----------------------------------------------------------------------------

async def test_ad_bits_are_ored_into_the_backing_frames() -> None:
    hm = make_memory()
    hm.add_guest(1, 20)
    await hm.ept_fault(1, gp(0, 9, 19), 0.0)
    hm.pool.accessed[:] = False
    accessed = np.zeros(20, bool)
    accessed[[9, 10]] = True           # 10 is not backed: nothing to mark
    dirty = np.zeros(20, bool)
    dirty[19] = True
    hm.set_ad_bits(1, np.packbits(accessed).tobytes(), np.packbits(dirty))
    loc = hm._guests[1].p2m.loc
    assert hm.pool.accessed[loc[[0, 9, 19]]].tolist() == [False, True, False]
    assert hm.pool.dirty[loc[[0, 9, 19]]].tolist() == [False, False, True]
    assert int(np.count_nonzero(hm.pool.accessed)) == 1
    hm.set_ad_bits(1, np.packbits(np.zeros(20, bool)), np.packbits(np.zeros(20, bool)))
    assert hm.pool.accessed[loc[9]]        # OR, not replace
    hm.set_ad_bits(1, b"", b"")            # nothing to report
    with pytest.raises(BadBatch, match="accessed bits have 2 bytes, expected 3"):
        hm.set_ad_bits(1, b"\0\0", np.packbits(dirty))


# -- dead guests, observation, invariant --------------------------------------------------------

async def test_removing_a_guest_releases_frames_slots_cache_and_buffers() -> None:
    hm = make_memory(total_frames=16, swap_slots=64, low_watermark_frames=0, cluster_pages=4)
    guests = FakeGuests(hm)
    guests.add(1, 32, disk_blocks=64)
    guests.add(2, 8)
    for first in range(0, 32, 4):
        await guests.touch(1, np.arange(first, first + 4), write=True)
    await hm.vdisk_write(1, np.arange(4), np.arange(4) + 1, 0.0)
    await guests.touch(2, np.arange(4), write=True)
    hm.balloon_inflate(1, gp(30))
    assert hm.swap.used_slots > 0 and hm.pool.counts()["cache"] > 0
    guests.remove(1)
    assert hm.guest_ids() == [2]
    assert hm.pool.counts()["guest"] == hm.guest_counts(2)["resident_pages"]
    assert hm.pool.counts()["cache"] == hm.pool.counts()["iobuf"] == 0
    assert hm.swap.used_slots == hm.guest_counts(2)["swapped_pages"]
    hm.check_invariant()
    with pytest.raises(UnknownGuest):
        hm.remove_guest(1)


async def test_snapshot_is_json_and_has_the_gauges() -> None:
    hm = make_memory(total_frames=8, swap_slots=16, low_watermark_frames=0)
    guests = FakeGuests(hm)
    guests.add(3, 16, disk_blocks=32)
    for first in range(0, 12, 3):
        await guests.touch(3, np.arange(first, first + 3), write=True)
    snap = hm.snapshot()
    json.dumps(snap)
    for key in ("free_frames", "guest_frames", "cache_pages", "iobuf_pages", "swap_used_slots",
                "swap_out_pages", "swap_in_pages", "ept_faults", "reclaim_calls", "double_faults"):
        assert key in snap, key
    g = snap["guests"]["3"]
    assert g["resident_pages"] + g["swapped_pages"] == 12
    assert snap["free_frames"] + snap["guest_frames"] + snap["cache_pages"] + snap["iobuf_pages"] == 8
    assert snap["swap_used_slots"] == g["swapped_pages"] == snap["swap_out_pages"] - snap["swap_in_pages"]


async def test_invariant_names_what_is_wrong() -> None:
    hm = make_memory(total_frames=8)
    hm.add_guest(1, 8)
    await hm.ept_fault(1, gp(0, 1), 0.0)
    p2m = hm._guests[1].p2m
    p2m.loc[1] = p2m.loc[0]
    with pytest.raises(InvariantViolation, match="guest 1 gpfn 1 is FRAME .* guest 1 index 0"):
        hm.check_invariant()

    hm = make_memory(total_frames=8)
    hm.add_guest(1, 8)
    await hm.ept_fault(1, gp(0), 0.0)
    hm._guests[1].p2m.set(np.array([0]), PageState.UNBACKED)
    with pytest.raises(InvariantViolation, match="frame leak"):
        hm.check_invariant()

    hm = make_memory(total_frames=8)
    hm.add_guest(1, 8)
    hm.swap.store(hm.swap.slots_of(1, np.array([3])), np.array([5], np.uint64))
    with pytest.raises(InvariantViolation, match="slot leak"):
        hm.check_invariant()

    hm = make_memory(total_frames=8)
    hm.add_guest(1, 8)
    hm.balloon_inflate(1, gp(2))
    hm._guests[1].balloon_pages = 0
    with pytest.raises(InvariantViolation, match="BALLOONED"):
        hm.check_invariant()
    assert issubclass(InvariantViolation, HostdError)


def test_every_hostd_error_carries_a_wire_code() -> None:
    import balloonlab.hostd.errors as errors
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.HostdError)
        assert isinstance(cls.code, ErrorCode)
