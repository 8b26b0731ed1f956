"""``request_order = "virtual-time"``: the guests' requests one at a time, in virtual-time order.

Inside a tick the guests run for real, concurrently, and their requests
reach the host in whatever order the machine's scheduler makes. Under
memory pressure that order decides everything: whose fault finds a free
frame, whose page the host swaps out to make room, where each request
lands in a shared disk queue. Served in arrival order, the same scenario
and seed would give other counts on every run (and other ones again on a
busier machine). So the host serves them as a conservative discrete-event
simulator would: one request at a time, the one earliest in virtual time
(ties by guest id), and only once no guest still computing could send an
earlier one.

A guest's vCPU is sequential: it sends a request and waits for the reply,
and its virtual clock never runs backwards; after a reply it resumes at
``max(its clock, the reply's done time)``. So a guest that is computing
has a lower bound on the time of its next request. The request at the head
of the queue is granted when every running guest (in the tick's barrier,
not finished, not given up on) is either waiting in the queue itself or
has a lower bound past the head. Guests that finish the tick, die, or are
declared unresponsive leave the running set, so the queue always drains.

One request can reach into another guest: the host evicts one of its
pages and sends it a TLB shootdown. Where in that guest's run the shootdown
lands must not depend on timing either, so it is sent only once the guest is
*parked*: waiting in the queue (it has sent its next request and reads
nothing else until the reply), done with the tick, or the guest being
served. A guest still computing is waited for; it needs nothing from the
host to reach its next request, so the wait always ends.

Lock-model runs (``[locks]``) do not use this: there the real interleaving
of lock requests is the point.

``RequestSequencer`` is the mechanism; ``VirtualTimeOrder`` is the request
discipline (``hostd.discipline``) built on it.
"""
from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Collection, Mapping

import numpy as np

from balloonlab.proto.messages import MsgType
from balloonlab.proto.rpc import RequestHandler

from ..errors import HostdError
from .base import DisciplineBase, DisciplineContext, GuestHandlers, Invalidate

if TYPE_CHECKING:
    from ..memory import HostMemory
    from ..session import GuestSession

__all__ = ["RequestSequencer", "VirtualTimeOrder"]


class _Lane:
    """One guest session's place in the order (a restarted guest gets a new lane)."""

    __slots__ = ("gid", "waiting", "lower_bound_us", "tick_done", "park_waiters")

    def __init__(self, gid: int) -> None:
        self.gid = gid
        self.waiting = 0             # its requests in the queue, not yet granted
        self.lower_bound_us = 0.0    # its next request is no earlier than this
        self.tick_done = False       # it sends nothing more until the next tick
        self.park_waiters: list[asyncio.Future] = []


class RequestSequencer:
    """One per host: ``join`` a guest session, ``wrap`` its request handlers, report its ticks to it."""

    def __init__(self, running: Callable[[], Collection[int]]) -> None:
        self._running = running      # guest ids that may still send requests this tick
        self._lanes: dict[int, _Lane] = {}
        self._queue: list[tuple[float, int, int, asyncio.Future, _Lane]] = []
        self._seq = itertools.count()
        self._busy = False
        self._serving: _Lane | None = None
        self.granted = 0
        self.held = 0                # requests that had to wait for another guest to catch up
        self.behind_bound = 0        # requests earlier than their guest's lower bound: served late, order not kept
        self.park_waits = 0          # shootdowns that waited for their guest to park

    def join(self, gid: int) -> _Lane:
        old = self._lanes.get(gid)
        lane = self._lanes[gid] = _Lane(gid)
        if old is not None:
            self._wake_parked(old)
        return lane

    def lane(self, gid: int) -> _Lane:
        """The lane of the guest's current session (``join`` made it)."""
        return self._lanes[gid]

    def leave(self, gid: int) -> None:
        """The guest is gone (its queued requests still drain, harmlessly)."""
        lane = self._lanes.pop(gid, None)
        if lane is not None:
            self._wake_parked(lane)
        self.kick()

    def tick_started(self, vt_us: float) -> None:
        for lane in self._lanes.values():
            lane.lower_bound_us = max(lane.lower_bound_us, float(vt_us))
            lane.tick_done = False
        self.kick()

    def tick_done(self, gid: int, vt_us: float) -> None:
        lane = self._lanes.get(gid)
        if lane is not None:
            lane.tick_done = True
            lane.lower_bound_us = max(lane.lower_bound_us, float(vt_us))
            self._wake_parked(lane)
            self.kick()

    def running_changed(self) -> None:
        """A guest left the running set (given up on): the head may go now, shootdowns to it too."""
        for lane in list(self._lanes.values()):
            if self._parked(lane):
                self._wake_parked(lane)
        self.kick()

    def _parked(self, lane: _Lane) -> bool:
        return (lane.waiting > 0 or lane.tick_done or lane is self._serving or self._lanes.get(lane.gid) is not lane
                or lane.gid not in self._running())

    async def until_parked(self, gid: int) -> None:
        """Return once guest ``gid`` reads nothing but what the host sends it (see the module docstring)."""
        lane = self._lanes.get(gid)
        if lane is None or self._parked(lane):
            return
        self.park_waits += 1
        fut = asyncio.get_running_loop().create_future()
        lane.park_waiters.append(fut)
        await fut

    def _wake_parked(self, lane: _Lane) -> None:
        waiters, lane.park_waiters = lane.park_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def wrap(self, lane: _Lane, handler: Callable[[Any], Any]) -> Callable[[Any], Awaitable[Any]]:
        """``handler`` for ``lane``'s requests, run only when its turn comes."""
        async def in_order(msg: Any) -> Any:
            vt = float(msg.vt_us)
            if vt < lane.lower_bound_us:
                self.behind_bound += 1
            await self._enter(lane, vt)
            done = vt
            try:
                reply = handler(msg)
                if inspect.isawaitable(reply):
                    reply = await reply
                done = max(vt, float(getattr(reply, "done_vt_us", vt)))
                return reply
            finally:
                lane.lower_bound_us = max(lane.lower_bound_us, done)
                self._serving = None
                self._busy = False
                self.kick()
        return in_order

    async def _enter(self, lane: _Lane, vt_us: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (vt_us, lane.gid, next(self._seq), fut, lane))
        lane.waiting += 1
        self._wake_parked(lane)
        self.kick()
        if not fut.done():
            self.held += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted just as we were cancelled: give the turn back.
                self._serving = None
                self._busy = False
                self.kick()
            else:
                fut.cancel()
                lane.waiting -= 1
                self.kick()      # it may have been the head
            raise

    def kick(self) -> None:
        """Grant the head of the queue if nobody is served and no running guest can still precede it."""
        queue = self._queue
        while not self._busy and queue:
            vt, gid, _, fut, lane = queue[0]
            if fut.cancelled():
                heapq.heappop(queue)
                continue
            for other in self._running():
                ln = self._lanes.get(other)
                if (ln is not None and ln.waiting == 0 and not ln.tick_done
                        and (ln.lower_bound_us, other) <= (vt, gid)):
                    return   # it is computing and may still send something earlier
            heapq.heappop(queue)
            lane.waiting -= 1
            self._busy = True
            self._serving = lane
            self.granted += 1
            fut.set_result(None)

    def stats(self) -> dict[str, int]:
        return {"requests_sequenced": self.granted, "requests_held": self.held,
                "requests_behind_bound": self.behind_bound, "shootdowns_waited_for_park": self.park_waits}


class VirtualTimeOrder(DisciplineBase):
    """The request discipline on a ``RequestSequencer``: same scenario and seed, same counts."""

    request_order = "virtual-time"

    def __init__(self, ctx: DisciplineContext) -> None:
        super().__init__(ctx)
        self.sequencer = RequestSequencer(ctx.running)

    def guest_joined(self, guest_id: int) -> None:
        self.sequencer.join(guest_id)

    def serve(self, guest_id: int, requests: Mapping[MsgType, RequestHandler]) -> GuestHandlers:
        lane = self.sequencer.lane(guest_id)
        return GuestHandlers({t: self.sequencer.wrap(lane, h) for t, h in requests.items()})  # type: ignore[misc]

    def guest_left(self, guest_id: int) -> None:
        self.sequencer.leave(guest_id)

    def guest_silent(self, guest_id: int) -> None:
        self.sequencer.running_changed()   # out of the barrier: the others' requests must not wait for it

    def tick_started(self, tick: int, vt_us: float, mem: "HostMemory") -> None:
        self.sequencer.tick_started(vt_us)

    def tick_done(self, guest_id: int, vt_us: float) -> None:
        self.sequencer.tick_done(guest_id, vt_us)

    async def shootdown(self, session: "GuestSession", gpfns: np.ndarray, invalidate: Invalidate) -> np.ndarray:
        gid = session.guest_id
        assert gid is not None
        # Only where the guest is parked, so the shootdown lands at the same point of its run every time.
        await self.sequencer.until_parked(gid)
        if self.ctx.sessions.get(gid) is not session:   # died meanwhile (maybe even came back)
            raise HostdError(f"guest {gid} is gone; cannot invalidate its mappings")
        return await invalidate()

    def stats(self) -> dict[str, Any]:
        return {"request_order": self.request_order, **self.sequencer.stats()}
