"""The host's watchdog: liveness only -- which guests have gone silent, and which are back.

Liveness is by heartbeat (``proto.liveness``). A guest is *unresponsive*
(silent) once nothing at all has been heard from it, not even an answer to
a ping, for ``RunConfig.unresponsive_s`` wall seconds (a guest's first
tick, which includes its start-up, gets at least ``FIRST_TICK_GRACE_S``):
a stopped process (SIGSTOP), a guest that stopped reading its socket, a
hung loop. A guest that answers pings but sends nothing else for
``STUCK_FACTOR`` times the bound while the host owes it no answer is
*stuck*: it is cut off (``on_stuck``). A guest that is merely slow is
neither: the tick waits for it. While the server waits for a tick's barrier, the watchdog
reports the tick as stalled every ``watchdog_s`` wall seconds
(``tick_stalled``) and, past the bound, takes silent guests out of the
barrier (``guest_unresponsive``): they get no more ticks until they answer
again. A silent guest that finishes its late tick is back
(``guest_responsive``) and rejoins the barrier at the next tick.

What follows from a verdict is not the watchdog's business: it tells its
``LivenessListener`` (the machine), which passes it on to the shootdowns
(waiting ones are deferred: ``hostd.shootdown``), to silent-guest memory
(it goes to host swap: ``hostd.silent``) and to the request discipline
(nothing may wait for the guest any more).
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.faultpoints import flush_log

if TYPE_CHECKING:
    from .registry import SessionRegistry
    from .session import GuestSession

__all__ = ["Watchdog", "LivenessListener", "FIRST_TICK_GRACE_S"]

log = structlog.get_logger("hostd.watchdog")

FIRST_TICK_GRACE_S = 10.0   # a guest's first tick may take this long before it counts as unresponsive
STUCK_FACTOR = 3.0            # alive but doing nothing this many times the bound: cut off


class LivenessListener(Protocol):
    def guest_silent(self, guest_id: int) -> None:
        """The guest left the barrier: it is not running."""
        ...

    def guest_back(self, guest_id: int) -> None:
        """A silent guest finished its late tick: it runs again."""
        ...


class Watchdog:
    """Call order (from the server)::

        each tick: await watch(tick, barrier, done)   (returns when the barrier is done or empty)
        a silent guest's late TickDone: back(session, tick, late_tick)
        the end-of-run audit, before it asks any guest: await until_back(session) for each silent one
    """

    def __init__(self, sessions: "SessionRegistry", listener: LivenessListener, *, watchdog_s: float,
                 unresponsive_s: float, owes_host: Callable[[int], bool],
                 on_stalled: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.sessions = sessions
        self.listener = listener
        self.watchdog_s = watchdog_s
        self.unresponsive_s = unresponsive_s
        self.owes_host = owes_host       # gid -> the guest owes the host an answer (a deferred shootdown to it)
        self.on_stalled = on_stalled       # progress line for the launcher
        # gid, why -> cut the guest off (the server's): it is alive but stuck, and the others must go on
        self.on_stuck: Callable[[int, str], None] | None = None
        self._back: dict[int, asyncio.Future[None]] = {}    # gid -> done when that silent guest is back

    def bound_s(self, guest_id: int) -> float:
        """How long the barrier waits for ``guest_id``: a guest's first tick includes its start-up, so it gets more."""
        s = self.sessions.get(guest_id)
        if s is not None and s.last_tick_done < 0:
            return max(self.unresponsive_s, FIRST_TICK_GRACE_S)
        return self.unresponsive_s

    def waits_for_host(self, guest_id: int) -> bool:
        """The host is still working on a request of this guest's (and the guest owes it no answer)."""
        s = self.sessions.get(guest_id)
        return (s is not None and getattr(s.conn, "in_progress", 0) > 0
                and not self.owes_host(guest_id))

    async def watch(self, tick: int, barrier: set[int], done: asyncio.Future) -> None:
        """Wait until ``done``, reporting stalls and judging the guests still in ``barrier`` meanwhile."""
        started = time.monotonic()
        next_report = started + self.watchdog_s
        first = True
        while True:
            now = time.monotonic()
            if first and barrier.issubset(self.sessions):
                # Silence and idleness count from the tick's start and every bound is at least
                # unresponsive_s, so no guest is due before this: most ticks end well within it,
                # and the per-guest scan (a few µs a guest, 64 guests a tick) is not needed.
                wake = min(next_report, now + max(0.0, min(self.unresponsive_s - (now - started), 0.05)))
            else:
                wake = min([next_report, *(self._judgement_due(gid, started) for gid in barrier)])
            first = False
            try:
                await asyncio.wait_for(asyncio.shield(done), max(0.01, wake - now))
                return
            except asyncio.TimeoutError:
                now = time.monotonic()
                waited = now - started
                missing = sorted(barrier)
                if now >= next_report:
                    next_report = now + self.watchdog_s
                    log.warning(ev.TICK_STALLED, tick=tick, waited_s=round(waited, 3), missing=missing)
                    if self.on_stalled is not None:
                        self.on_stalled({"stalled": tick, "missing": missing, "waited_s": round(waited, 1)})
                for gid in missing:
                    self._judge(gid, tick, barrier, started)
                if not barrier:
                    return

    def _quiet_s(self, guest_id: int, started: float) -> tuple[float, float]:
        """Wall seconds the guest has been silent, and inactive (only heartbeats), within this tick."""
        s = self.sessions[guest_id]
        loop_now = asyncio.get_running_loop().time()
        since = loop_now - (time.monotonic() - started)   # the tick's start, on the loop's clock
        return loop_now - max(s.conn.heard_at, since), loop_now - max(s.conn.active_at, since)

    def _judgement_due(self, guest_id: int, started: float) -> float:
        """When (time.monotonic) the barrier must next look at ``guest_id``: its silence or idleness bound."""
        if guest_id not in self.sessions:
            return time.monotonic()
        silent, idle = self._quiet_s(guest_id, started)
        bound = self.bound_s(guest_id)
        # While the host owes it an answer it is not stuck; look again a little later.
        stuck_in = bound / 4 if self.waits_for_host(guest_id) else STUCK_FACTOR * bound - idle
        return time.monotonic() + max(0.0, min(bound - silent, max(stuck_in, 0.05)))

    def _judge(self, guest_id: int, tick: int, barrier: set[int], started: float) -> None:
        """Liveness by heartbeat: a silent guest leaves the barrier; one alive but doing nothing is cut off.

        Silent: nothing at all heard from it (not even an answer to a ping)
        for the bound: stopped, or its loop hung; it comes back when it
        answers. Stuck: it answers pings but sends nothing else for
        ``STUCK_FACTOR`` times the bound while the host owes it no answer. A
        guest that is merely slow does neither: the tick waits for it.
        """
        if guest_id not in self.sessions:
            barrier.discard(guest_id)
            return
        silent, idle = self._quiet_s(guest_id, started)
        bound = self.bound_s(guest_id)
        if silent >= bound:
            self.mark_silent(guest_id, tick, barrier)
        elif idle >= STUCK_FACTOR * bound and not self.waits_for_host(guest_id) and self.on_stuck is not None:
            self.on_stuck(guest_id, f"alive (it answers pings) but it sent nothing else for {idle:.0f} s "
                                    f"in tick {tick}, and the host owed it no answer")

    def mark_silent(self, guest_id: int, tick: int, barrier: set[int]) -> None:
        s = self.sessions.get(guest_id)
        if s is None:
            return
        s.unresponsive = True
        barrier.discard(guest_id)
        log.warning(ev.GUEST_UNRESPONSIVE, guest=guest_id, tick=tick, waited_s=self.unresponsive_s,
                    silent_s=round(asyncio.get_running_loop().time() - s.conn.heard_at, 3))
        self.listener.guest_silent(guest_id)
        flush_log()  # an operator (or a test) waits for this line; it must not sit in a buffer

    async def until_back(self, session: "GuestSession") -> bool:
        """Wait until this silent guest finished its late tick (True) or its connection closed (False).

        A silent guest was stopped mid-tick: once it runs again it goes on with that tick (faults,
        reads, writes) until its late ``TickDone``. Only then are its books at rest.
        """
        gid = session.guest_id
        assert gid is not None
        if not session.unresponsive:
            return True
        fut = self._back.get(gid)
        if fut is None or fut.done():
            fut = self._back[gid] = asyncio.get_running_loop().create_future()
        closed = asyncio.ensure_future(session.conn.wait_closed())
        try:
            await asyncio.wait((fut, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        return fut.done() and not session.unresponsive

    def back(self, session: "GuestSession", tick: int, late_tick: int) -> None:
        """A silent guest sent its (late) TickDone: alive again, in the barrier from the next tick on."""
        gid = session.guest_id
        assert gid is not None
        session.unresponsive = False
        waiting = self._back.pop(gid, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        self.listener.guest_back(gid)
        log.info(ev.GUEST_RESPONSIVE, guest=gid, tick=tick, late_tick=late_tick)
