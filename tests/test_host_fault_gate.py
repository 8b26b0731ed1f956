"""HostMemory.open_tick: a fault of several pages is served in the order sent and stops at the tick's end."""
from __future__ import annotations

import numpy as np

from balloonlab.hostd.devices import device_profile
from balloonlab.hostd.p2m import PageState
from balloonlab.proto.costs import CostModel
from balloonlab.proto.tokens import LATER_TOKEN

from .test_host_fakes import FakeGuests, make_memory

EPT_US = 5.0
READ_US = device_profile("ssd").service_us(1, False, True) + EPT_US   # one swapped page, at full speed
GATE_US = 10_000.0


async def _swapped_guest(total_frames: int = 64) -> tuple[FakeGuests, np.ndarray]:
    """Guest 1 (64 pages) with gpfns 0..29 written and then host-swapped; returns the fake and those gpfns."""
    hm = make_memory(total_frames=total_frames, swap_slots=256, low_watermark_frames=0, reclaim_batch_frames=1,
                     costs=CostModel(ept_fault_us=EPT_US), swap_profile="ssd")
    guests = FakeGuests(hm)
    guests.add(1, 64)
    await guests.touch(1, np.arange(40), write=True)
    out = np.arange(30)
    await hm.reclaim_victims(hm._guests[1].p2m.loc[out].copy(), 0.0)
    assert np.all(hm._guests[1].p2m.state[out] == PageState.SWAPPED)
    return guests, out


async def test_a_fault_stops_at_the_gate_and_the_rest_comes_later() -> None:
    guests, out = await _swapped_guest()
    hm = guests.hm
    hm.open_tick(GATE_US)
    sent = np.concatenate(([20], out[out != 20])).astype(np.uint64)     # the one the vCPU waits for first
    start = GATE_US - 1_000.0
    tokens, done = await hm.ept_fault(1, sent, start)
    reached = tokens != np.uint64(LATER_TOKEN)
    k = int(np.count_nonzero(reached))
    assert reached[:k].all() and not reached[k:].any()          # a prefix, in the order sent
    # every page whose turn started before the gate, and not one more: 1,000 µs hold 8.9 of them
    assert k == int(np.ceil(1_000.0 / READ_US)) == 9
    assert GATE_US <= done <= GATE_US + READ_US                  # only the last one's read is past the gate
    p2m = hm._guests[1].p2m
    served, later = sent[:k].astype(np.int64), sent[k:].astype(np.int64)
    assert np.array_equal(tokens[:k], guests.content[1][served])
    assert np.all(p2m.state[served] == PageState.FRAME) and np.all(p2m.state[later] == PageState.SWAPPED)
    assert hm.counters.ept_faults_cut == 1 and hm.counters.ept_fault_later_pages == later.size
    assert hm.counters.swap_in_pages == k
    guests.backed[1][served] = True
    # The next tick: the rest, whole and intact.
    hm.open_tick(2 * GATE_US)
    tokens, done = await hm.ept_fault(1, later.astype(np.uint64), GATE_US + 10.0)
    assert np.array_equal(tokens, guests.content[1][later])
    assert done < 2 * GATE_US and np.all(p2m.state[out] == PageState.FRAME)
    hm.check_invariant()


async def test_without_a_gate_the_whole_fault_is_served() -> None:
    """No tick to stop at (a lock model's guests, the run's last tick): every page, one after another."""
    guests, out = await _swapped_guest()
    hm = guests.hm
    hm.open_tick(None)
    tokens, done = await hm.ept_fault(1, out.astype(np.uint64), GATE_US - 1_000.0)
    assert np.array_equal(tokens, guests.content[1][out])
    assert done > GATE_US + 10 * READ_US and hm.counters.ept_faults_cut == 0


async def test_a_fault_past_the_gate_is_not_cut() -> None:
    """Sent at or past the gate (the run's last tick lets a fault in flight finish): served whole."""
    guests, out = await _swapped_guest()
    hm = guests.hm
    hm.open_tick(GATE_US)
    tokens, _ = await hm.ept_fault(1, out.astype(np.uint64), GATE_US)
    assert not np.any(tokens == np.uint64(LATER_TOKEN)) and hm.counters.ept_faults_cut == 0


async def test_room_is_made_only_for_the_pages_that_fit_before_the_gate() -> None:
    """12 free frames: the 30-page fault would have to host-swap 18 pages, the 9 that fit need none."""
    guests, out = await _swapped_guest(total_frames=40)
    hm = guests.hm
    await guests.touch(1, np.arange(40, 58), write=True)
    assert hm.pool.free_frames == 12
    swapped_out = hm.counters.swap_out_pages
    hm.open_tick(GATE_US)
    tokens, _ = await hm.ept_fault(1, out.astype(np.uint64), GATE_US - 1_000.0)
    assert int(np.count_nonzero(tokens != np.uint64(LATER_TOKEN))) == 9
    assert hm.counters.swap_out_pages == swapped_out and hm.pool.free_frames == 3
    hm.check_invariant()
