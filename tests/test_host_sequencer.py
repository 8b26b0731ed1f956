"""hostd.discipline.virtual_time: the guests' requests one at a time, in virtual-time order, over real asyncio tasks.

No processes here: fake guests submit requests as tasks, and the tests
check who is served when. The multi-process consequence (same seed, same
counts under host swapping) is in test_determinism.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from balloonlab.hostd.discipline.virtual_time import RequestSequencer
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(10)


@dataclass
class Req:
    vt_us: float
    done_us: float | None = None


@dataclass
class Reply:
    done_vt_us: float


class Guests:
    """A sequencer over fake guests; ``served`` is the order handlers ran in."""

    def __init__(self, n: int) -> None:
        self.running: set[int] = set(range(n))
        self.seq = RequestSequencer(lambda: self.running)
        self.lanes = {gid: self.seq.join(gid) for gid in range(n)}
        self.served: list[tuple[int, float]] = []
        self.gate: dict[tuple[int, float], asyncio.Event] = {}   # hold a handler open until set
        self.seq.tick_started(0.0)

    def send(self, gid: int, vt: float, done: float | None = None, *, hold: bool = False,
             fail: bool = False) -> asyncio.Task:
        async def handler(req: Req) -> Reply:
            self.served.append((gid, req.vt_us))
            if hold:
                ev = self.gate[(gid, req.vt_us)] = asyncio.Event()
                await ev.wait()
            if fail:
                raise ValueError("refused")
            return Reply(req.done_us if req.done_us is not None else req.vt_us + 1.0)
        return asyncio.ensure_future(self.seq.wrap(self.lanes[gid], handler)(Req(vt, done)))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_earliest_request_goes_first_once_no_running_guest_can_precede_it() -> None:
    g = Guests(3)
    t0 = g.send(0, 50.0)
    t1 = g.send(1, 30.0, done=35.0)
    await settle()
    assert g.served == []                # guest 2 is still computing from 0: it may send something earlier
    t2 = g.send(2, 40.0)
    await wait_until(lambda: g.served)
    await settle()
    # 1@30 went first; then guest 1 computes again from 35, which is before 40: the rest wait for it.
    assert g.served == [(1, 30.0)] and t1.done()
    t1b = g.send(1, 36.0, done=60.0)
    await wait_until(lambda: len(g.served) == 3)
    await settle()
    # Guest 2 computes again from 41, before 0@50; guest 1 from 60 does not matter.
    assert g.served == [(1, 30.0), (1, 36.0), (2, 40.0)]
    g.seq.tick_done(2, 45.0)
    await wait_until(lambda: len(g.served) == 4)
    assert g.served[-1] == (0, 50.0)
    await asyncio.gather(t0, t2, t1b)
    assert g.seq.stats()["requests_sequenced"] == 4
    assert g.seq.stats()["requests_behind_bound"] == 0


async def test_a_guest_whose_clock_is_past_the_head_does_not_hold_it() -> None:
    g = Guests(2)
    t1 = g.send(1, 10.0, done=500.0)
    t0 = g.send(0, 20.0)
    # 1@10 first; guest 1 then computes from 500, so 0@20 need not wait for its next request.
    await asyncio.wait_for(asyncio.gather(t1, t0), 2)
    assert g.served == [(1, 10.0), (0, 20.0)]


async def test_ties_in_virtual_time_go_by_guest_id() -> None:
    g = Guests(3)
    tasks = [g.send(gid, 7.0) for gid in (2, 0, 1)]
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert g.served == [(0, 7.0), (1, 7.0), (2, 7.0)]


async def test_only_one_request_is_served_at_a_time() -> None:
    g = Guests(2)
    t0 = g.send(0, 1.0, hold=True)
    g.seq.tick_done(1, 100.0)
    await wait_until(lambda: (0, 1.0) in g.gate)
    t0b_other = g.send(1, 2.0)          # a late request of a finished guest: queued behind the one being served
    await settle()
    assert g.served == [(0, 1.0)]
    g.gate[(0, 1.0)].set()
    await asyncio.wait_for(t0, 2)
    await settle()
    assert not t0b_other.done()          # guest 0 computes again from 2.0 and precedes 1@2.0 on a tie
    g.seq.tick_done(0, 3.0)
    await asyncio.wait_for(t0b_other, 2)
    assert g.served == [(0, 1.0), (1, 2.0)]


async def test_a_guest_done_with_its_tick_or_out_of_the_barrier_holds_nobody() -> None:
    g = Guests(3)
    t0 = g.send(0, 100.0)
    await settle()
    assert g.served == []
    g.seq.tick_done(1, 90.0)            # guest 1 finished its tick
    await settle()
    assert g.served == []               # guest 2 is still computing
    g.running.discard(2)                # the watchdog gave up on guest 2
    g.seq.running_changed()
    await asyncio.wait_for(t0, 2)
    assert g.served == [(0, 100.0)]


async def test_a_failed_or_cancelled_request_releases_the_order() -> None:
    g = Guests(2)
    bad = g.send(0, 5.0, fail=True)
    waiting = g.send(1, 9.0)
    with pytest.raises(ValueError):
        await asyncio.wait_for(bad, 2)
    await settle()
    # Guest 0's clock is 5 after its failed request: guest 1 at 9 waits for it.
    assert g.served == [(0, 5.0)] and not waiting.done()
    waiting.cancel()
    await settle()
    t0 = g.send(0, 12.0)
    g.seq.tick_done(1, 20.0)
    await asyncio.wait_for(t0, 2)
    assert g.served == [(0, 5.0), (0, 12.0)]


async def test_a_guest_that_leaves_frees_the_others() -> None:
    g = Guests(2)
    t0 = g.send(0, 3.0)
    await settle()
    assert not t0.done()
    g.seq.leave(1)
    await asyncio.wait_for(t0, 2)


async def test_shootdowns_wait_until_their_guest_is_parked() -> None:
    g = Guests(3)
    # Guest 0 is served; its handler wants to shoot down pages of guests 0, 1 and 2.
    t0 = g.send(0, 1.0, done=10.0, hold=True)
    g.seq.tick_done(2, 50.0)
    t1 = g.send(1, 2.0, done=120.0)      # guest 1 is waiting in the queue
    await wait_until(lambda: (0, 1.0) in g.gate)
    own = asyncio.ensure_future(g.seq.until_parked(0))       # the guest being served is parked
    queued = asyncio.ensure_future(g.seq.until_parked(1))    # so is one waiting for its reply
    done = asyncio.ensure_future(g.seq.until_parked(2))      # and one done with its tick
    await asyncio.wait_for(asyncio.gather(own, queued, done), 2)
    g.gate[(0, 1.0)].set()
    await asyncio.wait_for(asyncio.gather(t0, t1), 2)
    assert g.seq.stats()["shootdowns_waited_for_park"] == 0

    # Now guest 1 computes from 120 (its request was answered): a shootdown to it waits for its next request.
    g.seq.tick_started(100.0)
    t2 = g.send(2, 100.0, hold=True)
    g.seq.tick_done(0, 200.0)
    await wait_until(lambda: (2, 100.0) in g.gate)
    park = asyncio.ensure_future(g.seq.until_parked(1))
    await settle()
    assert not park.done()
    t1b = g.send(1, 150.0)
    await asyncio.wait_for(park, 2)      # it sent a request and waits for the reply: parked
    assert not t1b.done()                # (which is served only after guest 2's)
    g.gate[(2, 100.0)].set()
    await asyncio.wait_for(t2, 2)
    g.seq.tick_done(2, 160.0)
    await asyncio.wait_for(t1b, 2)
    assert g.seq.stats()["shootdowns_waited_for_park"] == 1


async def test_a_shootdown_to_a_guest_given_up_on_goes_at_once() -> None:
    g = Guests(2)
    t0 = g.send(0, 1.0, hold=True)
    g.running.discard(1)
    g.seq.running_changed()
    await wait_until(lambda: (0, 1.0) in g.gate)
    await asyncio.wait_for(g.seq.until_parked(1), 2)
    g.running.add(1)                     # back in the next tick, computing
    park = asyncio.ensure_future(g.seq.until_parked(1))
    await settle()
    assert not park.done()
    g.running.discard(1)                 # silent again
    g.seq.running_changed()
    await asyncio.wait_for(park, 2)
    g.gate[(0, 1.0)].set()
    await asyncio.wait_for(t0, 2)


async def test_a_guest_that_connects_again_gets_a_fresh_place() -> None:
    g = Guests(2)
    g.seq.tick_done(1, 10.0)
    old = g.lanes[1]
    new = g.lanes[1] = g.seq.join(1)     # restarted under the same id: computing, from 0
    assert new is not old
    t0 = g.send(0, 5.0)
    await settle()
    assert not t0.done()                 # the new guest 1 (clock 0) may still send something earlier
    t1 = g.send(1, 2.0)
    await asyncio.wait_for(t1, 2)
    g.seq.tick_done(1, 10.0)
    await asyncio.wait_for(t0, 2)
    assert g.served == [(1, 2.0), (0, 5.0)]
