"""``request_order = "deterministic"`` (the default): partitioned and parallel, same scenario + seed, same counts.

Each guest's requests are served in its own serial lane, in the order the
guest sent them, as they arrive: guests never wait for one another. What
makes this reproducible is that within a tick a guest's requests touch only
its own *partition* of the host: its p2m, its virtual disk and cache, its
lane on the swap device, its own random stream, and its **grant**, the
free frames handed to it at the tick start (``hostd.grants``,
``FramePool.grant``). Requests of different guests therefore commute, and
the interleaving the machine's scheduler picks cannot change any count.

When a request needs more frames than its grant holds, host memory
reclaims inside the partition (``HostMemory``: the guest's own completed
I/O buffers, its own clean cache, then, if the hook allows, host swapping
of its own pages), and otherwise **holds** the request here. A held
request waits until every running guest is *parked*: done with the tick
(its ``TickDone`` received and its lane drained) or held itself. That is a
deterministic point of every guest's run, so a **refill round** runs
there: the unused grants of the guests that are done go back to the
pool, and the held guests, in guest-id order, get their unmet need first;
those served are released and continue their tick (no virtual time lost:
the memory was free). When a round releases nobody, the held requests
stay held **across the boundary**: their guests count as done for the tick
(they owe no ``TickDone`` for it), the boundary reclaims with their need
added, and at the next tick start their grants come first and they are
released, in guest-id order, with ``T_{t+1}`` as their new start time.

Boundary work runs with every guest parked, in guest-id order (the
machine's end of tick): grants return to the pool (``finish_tick``), then
I/O buffers, silent guests, the reclaim (``balance``), balloon targets.

A shootdown inside a tick only ever goes to the guest whose own request
reclaims (it is parked on that request); at the boundary every guest is
parked. So the gate is open: ``invalidate`` is sent at once.

Counters (``stats``; deterministic themselves): ``grant_pages``,
``grant_exhausted``, ``held_requests``, ``held_across_boundary``,
``refill_rounds``, ``tick_done_late`` (a ``TickDone`` whose ``vt_us`` is
past the tick's end by more than the bound in docs/internals.md; counted,
not refused) and ``requests_past_tick_end`` (requests stamped at or after
the end of the tick they arrived in).
"""
from __future__ import annotations

import asyncio
import types
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

import structlog

from balloonlab.proto.messages import MsgType
from balloonlab.proto.rpc import RequestHandler, eager, resume_stepped

from ..errors import HostOutOfMemory, UnknownGuest
from ..grants import GrantPlanner
from .base import DisciplineBase, DisciplineContext, GuestHandlers, Invalidate

if TYPE_CHECKING:
    import numpy as np

    from ..memory import HostMemory, Reclaimed
    from ..session import GuestSession

__all__ = ["DeterministicOrder", "HELD_BOUNDARIES_MAX"]

log = structlog.get_logger("hostd.discipline")

_CoroutineType = types.CoroutineType
_resume = resume_stepped


async def _raise(exc: BaseException) -> Any:
    raise exc

HELD_BOUNDARIES_MAX = 3
"""Boundaries a request may stay held with nothing free to grant before it is refused (out of memory)."""


class _Hold:
    __slots__ = ("gid", "need", "vt_us", "fut", "across")

    def __init__(self, gid: int, need: int, vt_us: float, fut: asyncio.Future) -> None:
        self.gid = gid
        self.need = need            # frames the request needs from its grant, in all
        self.vt_us = vt_us
        self.fut = fut
        self.across = False         # held across the tick boundary


class _Lane:
    """One guest session's serial lane (a restarted guest gets a new one)."""

    __slots__ = ("gid", "tail", "inflight", "hold", "last_done_us", "starved", "done")

    def __init__(self, gid: int) -> None:
        self.gid = gid
        self.tail: asyncio.Future | None = None   # completes when the last request queued so far is served
        self.inflight = 0
        self.hold: _Hold | None = None
        self.last_done_us = 0.0     # completion of its latest request that started inside the tick
        self.starved = 0            # boundaries in a row its held request found too little to go on
        self.done = False           # its TickDone for this tick arrived (the server's barrier learns it after us)


class DeterministicOrder(DisciplineBase):
    request_order = "deterministic"

    def __init__(self, ctx: DisciplineContext) -> None:
        super().__init__(ctx)
        self.planner = GrantPlanner()
        self._lanes: dict[int, _Lane] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mem: "HostMemory | None" = None
        self._tick_start_us = 0.0
        self._tick_end_us = 0.0
        self._bounded = True          # TickDone is held to the overshoot bound (not in the run's last tick)
        self._parked_changed = asyncio.Event()
        self._stopping = False
        self._in_round = False
        self._holding: set[int] = set()   # guests with a held request not yet across the boundary
        self.grant_pages = 0
        self.held_requests = 0
        self.held_across_boundary = 0
        self.refill_rounds = 0
        self.tick_done_late = 0
        self.requests_past_tick_end = 0
        self.max_tick_done_over_us = 0.0

    # -- lanes ------------------------------------------------------------------------

    def guest_joined(self, guest_id: int) -> None:
        self._lanes[guest_id] = _Lane(guest_id)
        if self._mem is not None:
            self._mem.pool.add_grant(guest_id)

    def serve(self, guest_id: int, requests: Mapping[MsgType, RequestHandler]) -> GuestHandlers:
        lane = self._lanes[guest_id]
        return GuestHandlers({t: self._in_lane(lane, h) for t, h in requests.items()})  # type: ignore[misc]

    def _in_lane(self, lane: _Lane, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``handler`` served after every earlier request of the lane (queued when it arrives, not when it runs).

        A request that finds its lane idle is stepped at once, inside the read
        that brought it: most finish without waiting (a page the host has, a
        grant with room) and their reply is returned as it is, with no future,
        task or context of their own. One that waits, or one that finds the
        lane busy, becomes a lane request later ones queue behind
        (``eager``: a task only once it waits). Requests of different guests
        commute (the partition), so serving one before the rest of the read is
        handled changes no count.
        """
        @eager
        def queue(msg: Any) -> Any:
            vt = float(msg.vt_us)
            if vt >= self._tick_end_us > 0:
                self.requests_past_tick_end += 1
            if lane.inflight:
                prev = lane.tail
                mine = self._new_future()
                lane.tail = mine
                lane.inflight += 1
                return self._serve_after(lane, prev, mine, handler, msg, vt)
            lane.inflight = 1
            try:
                reply = handler(msg)
                if type(reply) is _CoroutineType:
                    try:
                        yielded = reply.send(None)
                    except StopIteration as stop:
                        reply = stop.value
                    else:   # it waits: from here on a lane request like any other
                        mine = lane.tail = self._new_future()
                        return self._finish(lane, mine, _resume(reply, yielded), vt)
                elif isinstance(reply, asyncio.Future):
                    mine = lane.tail = self._new_future()
                    return self._finish(lane, mine, reply, vt)
            except asyncio.CancelledError as exc:
                self._lane_drained(lane)
                return _raise(exc)    # answered as a cancelled request, as a task's would be
            except BaseException:
                self._lane_drained(lane)
                raise
            # _served and _lane_drained, inline: this is every request that finds its lane idle
            done = getattr(reply, "done_vt_us", None)
            if done is not None and vt < self._tick_end_us:
                done = float(done)
                if done > lane.last_done_us:
                    lane.last_done_us = done
            lane.inflight -= 1
            if not lane.inflight:
                self._parked()
            return reply
        return queue

    def _new_future(self) -> asyncio.Future:
        loop = self._loop
        if loop is None:   # asyncio.get_running_loop asks the OS for the pid on every call
            loop = self._loop = asyncio.get_running_loop()
        return loop.create_future()

    def _served(self, lane: _Lane, reply: Any, vt: float) -> None:
        done = getattr(reply, "done_vt_us", None)
        if done is not None and vt < self._tick_end_us:
            done = float(done)
            if done > lane.last_done_us:   # max(), without the call
                lane.last_done_us = done

    def _lane_drained(self, lane: _Lane) -> None:
        lane.inflight -= 1
        if not lane.inflight:
            self._parked()

    async def _serve_after(self, lane: _Lane, prev: asyncio.Future | None, mine: asyncio.Future,
                           handler: Callable[[Any], Any], msg: Any, vt: float) -> Any:
        if prev is not None and not prev.done():
            try:
                await asyncio.shield(prev)
            except BaseException:
                self._release_lane(lane, mine)
                raise
        try:
            reply = handler(msg)
        except BaseException:
            self._release_lane(lane, mine)
            raise
        if asyncio.iscoroutine(reply) or isinstance(reply, asyncio.Future):
            return await self._finish(lane, mine, reply, vt)
        self._served(lane, reply, vt)
        self._release_lane(lane, mine)
        return reply

    async def _finish(self, lane: _Lane, mine: asyncio.Future, waiting: Awaitable[Any], vt: float) -> Any:
        """The rest of a lane request that waits; ``mine`` completes when it is served."""
        try:
            reply = await waiting
            self._served(lane, reply, vt)
            return reply
        finally:
            self._release_lane(lane, mine)

    def _release_lane(self, lane: _Lane, mine: asyncio.Future) -> None:
        if not mine.done():
            mine.set_result(None)
        self._lane_drained(lane)

    def guest_left(self, guest_id: int) -> None:
        lane = self._lanes.pop(guest_id, None)
        if lane is not None and lane.hold is not None and not lane.hold.fut.done():
            lane.hold.fut.set_exception(UnknownGuest(guest_id))
        if self._mem is not None:
            self._mem.pool.close_grant(guest_id)
        self.planner.forget(guest_id)
        self._parked()

    def guest_silent(self, guest_id: int) -> None:
        self._parked()   # out of the barrier: the others' held requests must not wait for it

    # -- holds and refill rounds -----------------------------------------------------

    def floor_grants(self, floor_only: Callable[[int], bool]) -> None:
        self.planner.floor_only = floor_only

    def memory_hold(self) -> Callable[[int, int, float], Awaitable[float]] | None:
        return self.hold

    async def hold(self, guest_id: int, need_frames: int, vt_us: float) -> float:
        """Host memory found the guest's grant short by ``need_frames``: wait for a refill round.

        Returns the virtual time the request may go on from: ``vt_us``
        when a round in this tick refilled the grant, the next tick's start
        when it was held across the boundary.
        """
        lane = self._lanes.get(guest_id)
        if lane is None:
            raise UnknownGuest(guest_id)
        h = _Hold(guest_id, int(need_frames), float(vt_us), asyncio.get_running_loop().create_future())
        lane.hold = h
        self.held_requests += 1
        self._holding.add(guest_id)
        self._parked()
        try:
            return await h.fut
        finally:
            self._holding.discard(guest_id)
            if lane.hold is h:
                lane.hold = None

    def _is_parked(self, gid: int, lane: _Lane, running: Any) -> bool:
        if lane.hold is not None and not lane.hold.fut.done():
            return True
        session = self.ctx.sessions.get(gid)
        if session is None or session.unresponsive:
            return True
        return (lane.done or gid not in running) and lane.inflight == 0

    def _all_parked(self) -> bool:
        running = self.ctx.running()
        return all(self._is_parked(gid, lane, running) for gid, lane in self._lanes.items())

    def _waiting(self) -> list[_Hold]:
        return [lane.hold for _, lane in sorted(self._lanes.items())
                if lane.hold is not None and not lane.hold.fut.done() and not lane.hold.across]

    def _parked(self) -> None:
        """Something parked (a lane drained, a request held, a guest done or gone): maybe a refill round."""
        self._parked_changed.set()
        if not self._holding or self._in_round or self._mem is None or not self._mem.pool.grants_open:
            return
        if not self._waiting() or not self._all_parked():
            return
        self._in_round = True
        try:
            self._refill_round()
        finally:
            self._in_round = False

    def _refill_round(self) -> None:
        mem = self._mem
        assert mem is not None
        pool = mem.pool
        self.refill_rounds += 1
        running = self.ctx.running()
        held = self._waiting()
        held_ids = {h.gid for h in held}
        for gid, lane in sorted(self._lanes.items()):   # the done guests' unused grants go back
            if gid not in held_ids and (lane.done or gid not in running):
                pool.take_back(gid)
        released: list[_Hold] = []
        for h in held:                              # unmet need first, in guest-id order
            short = h.need - pool.granted(h.gid)
            if short <= 0:
                released.append(h)
            elif pool.global_free_frames >= short:
                self._grant(h.gid, short)
                released.append(h)
        if released and pool.global_free_frames > 0:
            # The rest to the released, by weight, so the next shortfall is not one frame away.
            sizes = self.planner.plan(pool.global_free_frames, [h.gid for h in released], {})
            for gid, n in sorted(sizes.items()):
                self._grant(gid, n)
        log.debug("refill_round", held=[h.gid for h in held], released=[h.gid for h in released],
                  free_frames=pool.global_free_frames)
        if released:
            for h in released:
                self._holding.discard(h.gid)
                h.fut.set_result(h.vt_us)
            return
        for h in held:                              # nobody can go on: across the boundary
            self._holding.discard(h.gid)
            h.across = True
            self.held_across_boundary += 1
            self.ctx.count_done(h.gid)

    def _grant(self, gid: int, n: int) -> None:
        assert self._mem is not None
        got = self._mem.pool.grant(gid, n)
        self.grant_pages += got
        self._mem.count_grant(gid, got)

    # -- the tick ------------------------------------------------------------------------

    def tick_started(self, tick: int, vt_us: float, mem: "HostMemory") -> None:
        self._mem = mem
        self._tick_start_us = float(vt_us)
        self._tick_end_us = float(vt_us) + self.ctx.tick_us
        # In the run's last tick a guest lets its fault in flight finish before TickDone (guestd/gate.py).
        self._bounded = self.ctx.last_tick is None or tick < self.ctx.last_tick
        for lane in self._lanes.values():
            lane.last_done_us = float(vt_us)
            lane.done = False
        pool = mem.pool
        gids = [gid for gid in mem.guest_ids() if gid in self._lanes]
        across = [lane.hold for _, lane in sorted(self._lanes.items())
                  if lane.hold is not None and lane.hold.across and not lane.hold.fut.done()]
        mem.note_boundary(sum(h.need for h in across))
        pool.open_grants(gids)
        sizes = self.planner.plan(pool.global_free_frames, gids, {h.gid: h.need for h in across})
        for gid in gids:
            self._grant(gid, sizes[gid])
        # Held across the boundary: served first, in guest-id order, from the new tick's start.
        for h in across:
            h.across = False
            lane = self._lanes[h.gid]
            if pool.granted(h.gid) >= h.need:
                lane.starved = 0
            else:
                lane.starved += 1
                if lane.starved >= HELD_BOUNDARIES_MAX:
                    lane.starved = 0
                    mem.counters.oom_refusals += 1
                    h.fut.set_exception(HostOutOfMemory(h.need, pool.granted(h.gid),
                                                        f"held across {HELD_BOUNDARIES_MAX} tick boundaries in a "
                                                        "row with too little memory freed for it"))
                    continue
            # (short of it, the request asks again and holds again, inside this tick)
            h.fut.set_result(max(h.vt_us, self._tick_start_us))

    def tick_done(self, guest_id: int, vt_us: float) -> None:
        lane = self._lanes.get(guest_id)
        if lane is not None:
            lane.done = True
            over = float(vt_us) - max(self._tick_end_us, lane.last_done_us)
            if self._bounded and over > self.ctx.ref_us + self.ctx.overshoot_us + 1e-6:
                self.tick_done_late += 1
                self.max_tick_done_over_us = max(self.max_tick_done_over_us, over)
        self._parked()

    async def finish_tick(self) -> bool:
        # Requests still in a lane (sent before the TickDone) finish inside the tick.
        while not self._all_parked():
            if self._stopping:   # a guest that stopped reading must not hold the end of the run
                return False
            self._parked_changed.clear()
            await self._parked_changed.wait()
        if self._mem is not None and self._mem.pool.grants_open:
            self.planner.record_demand(self._mem.pool.close_grants())
        return True

    async def balance(self, mem: "HostMemory", vt_us: float) -> "Reclaimed":
        need = sum(lane.hold.need for lane in self._lanes.values()
                   if lane.hold is not None and lane.hold.across and not lane.hold.fut.done())
        return await mem.balance(vt_us, extra_frames=need)

    async def shootdown(self, session: "GuestSession", gpfns: "np.ndarray", invalidate: Invalidate) -> "np.ndarray":
        # Inside a tick only the guest reclaiming from itself is shot down (parked on its own request);
        # at the boundary every guest is parked.
        return await invalidate()

    def stats(self) -> dict[str, Any]:
        return {"request_order": self.request_order, "grant_pages": self.grant_pages,
                "grant_exhausted": self._mem.counters.grant_exhausted if self._mem is not None else 0,
                "held_requests": self.held_requests, "held_across_boundary": self.held_across_boundary,
                "refill_rounds": self.refill_rounds, "tick_done_late": self.tick_done_late,
                "tick_done_max_over_us": round(self.max_tick_done_over_us, 3),
                "requests_past_tick_end": self.requests_past_tick_end}

    def stopping(self) -> None:
        self._stopping = True
        self._parked_changed.set()

    def close(self) -> None:
        for lane in self._lanes.values():
            if lane.hold is not None and not lane.hold.fut.done():
                lane.hold.fut.cancel()
