"""The host's watchdog: liveness only -- which guests have gone silent, and which are back.

A guest is *unresponsive* (silent) once it has not finished a tick within
``RunConfig.unresponsive_s`` wall seconds (a guest's first tick, which
includes its start-up, gets at least ``FIRST_TICK_GRACE_S``): a stopped
process (SIGSTOP), a guest that stopped reading its socket, a guest stuck
in a loop. While the server waits for a tick's barrier, the watchdog
reports the tick as stalled every ``watchdog_s`` wall seconds
(``tick_stalled``) and, past the bound, takes silent guests out of the
barrier (``guest_unresponsive``): they get no more ticks until they answer
again. A guest waiting for the host to answer it is not silent -- the host
may be waiting for another guest -- so it is given up on only after three
times the bound. A silent guest that finishes its late tick is back
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
_WAITING_FOR_HOST_FACTOR = 3   # a guest the host owes an answer is given up on only after this many bounds


class LivenessListener(Protocol):
    def guest_silent(self, guest_id: int) -> None:
        """The guest left the barrier: it is not running."""
        ...

    def guest_back(self, guest_id: int) -> None:
        """A silent guest finished its late tick: it runs again."""
        ...


class Watchdog:
    """Call order (from the server's tick loop)::

        each tick: await watch(tick, barrier, done)   (returns when the barrier is done or empty)
        a silent guest's late TickDone: back(session, tick, late_tick)
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
        """Wait until ``done``, reporting stalls and taking silent guests out of ``barrier`` meanwhile."""
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            bound = min(self.bound_s(gid) for gid in barrier)
            timeout = self.watchdog_s if waited >= bound else min(self.watchdog_s, bound - waited)
            try:
                await asyncio.wait_for(asyncio.shield(done), max(0.01, timeout))
                return
            except asyncio.TimeoutError:
                waited = time.monotonic() - started
                missing = sorted(barrier)
                log.warning(ev.TICK_STALLED, tick=tick, waited_s=round(waited, 3), missing=missing)
                if self.on_stalled is not None:
                    self.on_stalled({"stalled": tick, "missing": missing, "waited_s": round(waited, 1)})
                for gid in missing:
                    bound = self.bound_s(gid)
                    # A guest waiting for the host to answer it is not silent: the host may be
                    # waiting for another guest. Once that one is marked, its shootdowns stop
                    # blocking; only much later is a waiting guest given up on too.
                    if waited >= bound and (not self.waits_for_host(gid)
                                            or waited >= _WAITING_FOR_HOST_FACTOR * bound):
                        self.mark_silent(gid, tick, barrier)
                if not barrier:
                    return

    def mark_silent(self, guest_id: int, tick: int, barrier: set[int]) -> None:
        s = self.sessions.get(guest_id)
        if s is None:
            return
        s.unresponsive = True
        barrier.discard(guest_id)
        log.warning(ev.GUEST_UNRESPONSIVE, guest=guest_id, tick=tick, waited_s=self.unresponsive_s)
        self.listener.guest_silent(guest_id)
        flush_log()  # an operator (or a test) waits for this line; it must not sit in a buffer

    def back(self, session: "GuestSession", tick: int, late_tick: int) -> None:
        """A silent guest sent its (late) TickDone: alive again, in the barrier from the next tick on."""
        gid = session.guest_id
        assert gid is not None
        session.unresponsive = False
        self.listener.guest_back(gid)
        log.info(ev.GUEST_RESPONSIVE, guest=gid, tick=tick, late_tick=late_tick)
