"""hostd.discipline.deterministic in one process: serial lanes, grants, held requests, refill rounds, boundaries.

The multi-process consequence (same seed, same counts, with the CPU
loaded) is tests/test_determinism.py; here each mechanism is driven
through the real assembly with fake sessions and a barrier the test holds.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any

import numpy as np
import pytest

from balloonlab.hostd.assembly import assemble
from balloonlab.hostd.registry import SessionRegistry
from balloonlab.hostd.errors import UnknownGuest
from balloonlab.proto.messages import DiskRead, EptFault, EptFaultReply, MsgType, TickDone
from tests.test_host_core import fake_session, run_config


class _Conn:
    """A guest connection that answers every TLB shootdown with the tokens of never-written pages."""

    is_closing = False
    in_progress = 0

    async def call(self, msg: Any, timeout_s: float | None = None) -> Any:
        from balloonlab.proto.messages import InvalidateReply
        return InvalidateReply(np.zeros(msg.gpfns.size, np.uint64))

    def notify(self, msg: Any) -> None:
        pass


class Run:
    """Three guests of 512 pages on a host of 256 frames; the test plays the server's barrier."""

    def __init__(self, guests: int = 3, ram_mib: float = 1.0, **host: Any) -> None:
        self.barrier: set[int] = set()
        self.excused: list[int] = []
        self.sessions = SessionRegistry()
        cfg = run_config(host={"ram_mib": ram_mib, **host},
                         guests=[{"id": i, "ram_pages": 512, "disk_blocks": 32} for i in range(guests)])
        self.core = assemble(cfg, self.sessions, running=lambda: self.barrier, stop=lambda why: None,
                             clock=lambda: 0.0, count_done=self._count_done)
        self.mem = self.core.mem
        self.disc: Any = self.core.discipline
        self.tables = {}
        for gid in range(guests):
            s = fake_session(gid)
            s.conn = _Conn()
            self.sessions.join(s)
            self.core.machine.guest_joined(s)
            self.tables[gid] = self.core.handlers.guest(s, self.core.machine.tick_done)

    def _count_done(self, gid: int) -> None:
        self.excused.append(gid)
        self.barrier.discard(gid)

    def start(self, tick: int) -> None:
        self.core.machine.tick_started(tick, tick * 10_000)
        self.barrier |= set(self.tables)

    def done(self, gid: int, tick: int, vt_us: float | None = None) -> None:
        vt = (tick + 1) * 10_000.0 if vt_us is None else vt_us
        self.tables[gid].notifications[MsgType.TICK_DONE](TickDone(tick, vt, {}, b"", b""))
        self.barrier.discard(gid)

    def fault(self, gid: int, gpfns: np.ndarray, vt_us: float) -> "asyncio.Future[Any]":
        return asyncio.ensure_future(answered(self.tables[gid].requests[MsgType.EPT_FAULT](
            EptFault(np.asarray(gpfns, np.uint64), vt_us))))


async def answered(result: Any) -> Any:
    """A served handler's reply: a lane answers a request that did not wait at once, not as an awaitable."""
    return await result if inspect.isawaitable(result) else result


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_grants_split_every_free_frame_and_a_guest_allocates_only_from_its_own() -> None:
    r = Run()
    r.start(0)
    granted = {g: r.mem.pool.granted(g) for g in range(3)}
    assert sum(granted.values()) == 256 and r.mem.pool.global_free_frames == 0
    assert max(granted.values()) - min(granted.values()) <= 1          # equal weights before any demand
    reply = await r.fault(1, np.arange(10), 5.0)
    assert reply.tokens.size == 10
    assert r.mem.pool.granted(1) == granted[1] - 10 and r.mem.pool.granted(0) == granted[0]


async def test_a_short_grant_holds_until_every_guest_is_parked_then_a_refill_round_serves_it() -> None:
    r = Run()
    r.start(0)
    big = r.fault(2, np.arange(200), 5.0)          # more than its third of the host
    await settle()
    assert not big.done() and r.disc.held_requests == 1 and r.disc.refill_rounds == 0
    r.done(0, 0)
    await settle()
    assert not big.done(), "guest 1 is still computing: no round yet"
    r.done(1, 0)
    await settle()
    assert big.done() and r.disc.refill_rounds == 1 and r.excused == []
    assert big.result().done_vt_us < 10_000      # released in the tick: no virtual time lost


async def test_when_nobody_can_be_served_the_held_request_crosses_the_boundary_and_goes_first_next_tick() -> None:
    r = Run()
    r.start(0)
    for gid in (0, 1):                             # the others use their whole grants
        await r.fault(gid, np.arange(r.mem.pool.granted(gid)), 5.0)
        r.done(gid, 0)
    big = r.fault(2, np.arange(150), 5.0)          # more than the whole host has left
    await settle()
    assert not big.done() and r.excused == [2] and r.disc.held_across_boundary == 1
    assert not r.barrier                          # the guest counts as done: the boundary may run
    await r.core.machine.end_tick(0, 10_000)      # the boundary reclaims for it (host swap, shootdowns)
    r.start(1)
    await settle()
    assert big.done() and big.result().done_vt_us >= 10_000   # served from the next tick's start


async def test_a_short_grant_drops_its_own_least_recently_used_clean_clusters_before_holding() -> None:
    """Step 2 of the in-partition reclaim is the host cache's own LRU drop, on the requester's disk only."""
    r = Run(cache_max_mib=0.5)                     # 128 pages of cache: every disk's two clusters fit
    r.start(0)
    for gid in (0, 1):
        for vt, first in ((1.0, 0), (2.0, 16)):   # cluster 0 used first, cluster 1 later
            await answered(r.tables[gid].requests[MsgType.DISK_READ](
                DiskRead(np.arange(first, first + 16, dtype=np.uint64), vt)))
    vd0, vd1 = r.mem.vdisk(0), r.mem.vdisk(1)
    assert vd0.cached_pages == vd1.cached_pages == 32
    r.mem.tick(5.0)                                # the reads' I/O buffers (if any) retire
    short = 10
    big = r.fault(0, np.arange(r.mem.pool.granted(0) + short), 5.0)
    await settle()
    assert big.done(), "held: the guest's own clean cache should have made the room"
    gc = r.mem._guests[0].counters
    assert gc.self_dropped_cache_pages == 16 and gc.held_requests == 0 and gc.self_swap_pages == 0
    assert vd0.cache_state[:16].sum() == 0 and vd0.cache_state[16:32].all()   # the older cluster went
    assert vd1.cached_pages == 32                  # nobody else's cache is touched
    assert r.mem.counters.swap_out_pages == 0
    r.mem.check_invariant()


async def test_a_lane_serves_one_guests_requests_in_the_order_sent() -> None:
    r = Run()
    r.start(0)
    order: list[int] = []
    served = r.disc._in_lane(r.disc._lanes[0], lambda m: _record(order, m))
    first = asyncio.ensure_future(answered(served(EptFault(np.array([1], np.uint64), 3.0))))    # slow
    second = asyncio.ensure_future(answered(served(EptFault(np.array([2], np.uint64), 1.0))))   # earlier vt, sent later
    await asyncio.gather(first, second)
    assert order == [1, 2]


async def test_an_idle_lane_answers_a_request_that_does_not_wait_at_once_and_stays_idle() -> None:
    r = Run()
    r.start(0)
    lane = r.disc._lanes[0]

    async def quick(m: EptFault) -> EptFaultReply:
        return EptFaultReply(np.zeros(1, np.uint64), m.vt_us + 2.0)

    reply = r.disc._in_lane(lane, quick)(EptFault(np.array([1], np.uint64), 3.0))
    assert isinstance(reply, EptFaultReply) and reply.done_vt_us == 5.0     # no awaitable: served inline
    assert lane.inflight == 0 and lane.last_done_us == 5.0

    async def broken(m: EptFault) -> EptFaultReply:
        raise UnknownGuest(7)

    with pytest.raises(UnknownGuest):
        r.disc._in_lane(lane, broken)(EptFault(np.array([2], np.uint64), 4.0))
    assert lane.inflight == 0, "a request that failed must not leave its lane busy (the tick would never end)"
    order: list[int] = []
    served = r.disc._in_lane(lane, lambda m: _record(order, m))
    slow = served(EptFault(np.array([1], np.uint64), 6.0))     # waits: becomes a lane request
    assert inspect.isawaitable(slow) and lane.inflight == 1
    behind = served(EptFault(np.array([2], np.uint64), 7.0))   # queued behind it
    await asyncio.gather(answered(slow), answered(behind))
    assert order == [1, 2] and lane.inflight == 0


async def _record(order: list[int], m: EptFault) -> None:
    if int(m.gpfns[0]) == 1:
        await asyncio.sleep(0.01)
    order.append(int(m.gpfns[0]))


async def test_a_tick_done_far_past_the_tick_end_is_counted_late_not_refused() -> None:
    r = Run(guests=1)
    r.start(0)
    await r.fault(0, np.arange(4), 9_999.0)         # a fault started before the end completes after it
    r.done(0, 0, vt_us=10_000.0 + 5.0)
    assert r.disc.tick_done_late == 0
    await r.core.machine.end_tick(0, 10_000)
    r.start(1)
    r.done(0, 1, vt_us=20_000.0 + 5_000.0)           # a batch that ran 5 ms past the gate
    assert r.disc.tick_done_late == 1 and r.disc.stats()["tick_done_late"] == 1


def test_the_grant_plan_gives_held_needs_first_then_splits_the_rest_by_recent_demand() -> None:
    from balloonlab.hostd.grants import FLOOR_PAGES, GrantPlanner
    p = GrantPlanner()
    assert p.plan(10, [2, 0, 1], {}) == {0: 4, 1: 3, 2: 3}          # equal weights: the spare one to the lowest id
    p.record_demand({0: 0, 1: 98, 2: 0})                            # guest 1 took 98 frames last tick: weight 50
    plan = p.plan(104, [0, 1, 2], {2: 30})
    assert plan[2] >= 30 and sum(plan.values()) == 104             # the held need first, every frame handed out
    assert plan[1] > 10 * plan[0]
    assert p.plan(5, [0, 1], {0: 9}) == {0: 5, 1: 0}                # not even the held need fits: all of it to it
    capped = GrantPlanner(floor_only=lambda gid: gid == 1)
    assert capped.plan(1000, [0, 1], {}) == {0: 1000 - FLOOR_PAGES, 1: FLOOR_PAGES}


def test_the_old_request_order_name_is_the_deterministic_mode_with_a_deprecation_line() -> None:
    import structlog.testing
    with structlog.testing.capture_logs() as logs:
        core = assemble(run_config(host={"request_order": "virtual-time"}), SessionRegistry(),
                        running=set, stop=lambda why: None, clock=lambda: 0.0)
    assert core.discipline.request_order == "deterministic"
    assert [e for e in logs if e["event"] == "config_deprecated" and e["value"] == "virtual-time"], logs
