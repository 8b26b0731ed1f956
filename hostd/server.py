"""The host process: accepts guests, drives virtual time in ticks, ends the run.

A tick is: send ``TickStart`` to every live guest, wait until each has sent
``TickDone`` (the barrier), then let the machine resolve what is due (disk
buffers, balloon targets, monitors) and log the tick. A guest that dies is
released and dropped from the barrier; a guest that stays silent past the
watchdog bound is reported, and past ``unresponsive_s`` taken out of the
barrier, so one guest never hangs the run: it gets no more ticks until it
answers again, and its memory goes to host swap (``hostd.watchdog``).

After the last tick the host audits every guest's pages against its own
books (``hostd.audit``) before it sends ``RunEnd``. A guest id whose session
has been released may connect again (a restarted guest joins as a fresh
guest); a live one may not.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import IO, Any

import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.errors import ErrorCode, PeerClosed
from balloonlab.proto.handshake import HandshakeError, check_hello
from balloonlab.proto.messages import Hello, MsgType, Ping, Pong, RunEnd, TickDone, TickStart, Welcome
from balloonlab.proto.rpc import RpcConnection, RpcLimits
from balloonlab.proto.locks import DEADLOCK_REASON, EXIT_DEADLOCK
from balloonlab.proto.transport import Address, serve

from .config import RunConfig
from .audit import run_audit
from .machine import Machine
from .session import GuestConnection, GuestSession, SessionState
from balloonlab.proto.faultpoints import PausePoints

__all__ = ["Host"]

log = structlog.get_logger("hostd")

HANDSHAKE_TIMEOUT_S = 10.0
FIRST_TICK_GRACE_S = 10.0   # a guest's first tick may take this long before it counts as unresponsive
MAX_UNAUTHENTICATED = 256


class Host:
    def __init__(self, cfg: RunConfig, token: str, address: Address,
                 progress_out: IO[str] | None = None, limits: RpcLimits | None = None) -> None:
        self.cfg = cfg
        self._token = token
        self.address = address
        self.progress_out = progress_out
        self.limits = limits or RpcLimits()
        self.sessions: dict[int, GuestSession] = {}     # active, by guest id
        self.gone: dict[int, str] = {}                   # guest id -> why it left (last time)
        self.rejoined: dict[int, int] = {}               # guest id -> times it connected again after leaving
        self.pause = PausePoints.from_env("host")        # fault points for tests (BALLOONLAB_PAUSE_AT)
        self._unauthenticated: set[GuestSession] = set()
        self.machine = Machine(cfg, self)
        self.tick = 0
        self.vt_us = 0
        self._barrier: set[int] = set()
        self._barrier_done: asyncio.Future | None = None
        self._all_connected: asyncio.Event | None = None
        self._stop_reason: str | None = None
        self._stop_event: asyncio.Event | None = None
        self._last_progress_s = 0.0
        self.refused = 0

    # --- lifecycle ------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._all_connected = asyncio.Event()
        self._stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, f"signal {signal.Signals(sig).name}")
        server, bound = await serve(self.address, self._new_connection)
        self.address = bound
        log.info(ev.RUN_STARTED, scenario=self.cfg.scenario, variant=self.cfg.variant, seed=self.cfg.seed,
                 guests=sorted(self.cfg.guest_ids), tick_us=self.cfg.tick_us, ticks=self.cfg.ticks,
                 address=str(bound))
        self._emit({"ready": str(bound)})
        wall0 = time.monotonic()
        reason = "completed"
        audit: dict[str, Any] = {"ok": None, "reason": "not audited"}
        try:
            if not await self._wait_for_guests():
                reason = self._stop_reason or "no guests connected"
            else:
                reason = await self._tick_loop()
            if not reason.startswith("signal") and reason != DEADLOCK_REASON:
                # (after a deadlock the guests are stuck mid-tick, with shootdowns in flight: nothing to audit)
                audit = await run_audit(self)
        finally:
            await self._end_run(reason)
            server.close()
            await server.wait_closed()
        log.info(ev.RUN_FINISHED, ticks=self.tick, vt_us=self.vt_us, wall_s=round(time.monotonic() - wall0, 3),
                 reason=reason, guests_lost=dict(sorted(self.gone.items())), refused=self.refused,
                 guests_rejoined=dict(sorted(self.rejoined.items())), audit_ok=audit["ok"],
                 audit={k: v for k, v in audit.items() if k not in ("ok", "guests")}, **self.machine.final_metrics())
        self._emit({"finished": reason, "tick": self.tick, "vt_us": self.vt_us})
        if reason == DEADLOCK_REASON:
            return EXIT_DEADLOCK
        return 0 if reason in ("completed",) or reason.startswith("signal") else 1

    def stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            log.info("stop_requested", reason=reason)
        if self._stop_event is not None:
            self._stop_event.set()
        if self._all_connected is not None:
            self._all_connected.set()
        if self._barrier_done is not None and not self._barrier_done.done():
            self._barrier_done.set_result(None)

    async def _wait_for_guests(self) -> bool:
        assert self._all_connected is not None
        try:
            await asyncio.wait_for(self._all_connected.wait(), self.cfg.connect_timeout_s)
        except asyncio.TimeoutError:
            missing = sorted(self.cfg.guest_ids - set(self.sessions) - set(self.gone))
            log.warning(ev.TICK_STALLED, tick=0, waited_s=self.cfg.connect_timeout_s, missing=missing,
                        phase="connect")
        return bool(self.sessions) and self._stop_reason is None

    async def _tick_loop(self) -> str:
        cfg = self.cfg
        for tick in range(cfg.ticks):
            self.tick = tick  # ticks completed so far, as run_finished reports them when the run stops here
            if self._stop_reason is not None:
                return self._stop_reason
            if not self.sessions:
                return "all guests gone"
            self.vt_us = tick * cfg.tick_us
            structlog.contextvars.bind_contextvars(tick=tick, vt_us=self.vt_us)
            self.machine.tick_started(tick, self.vt_us)
            await self._run_one_tick(tick)
            self.vt_us = (tick + 1) * cfg.tick_us
            await self.machine.end_tick(tick, self.vt_us)
            self._progress(tick + 1)
        self.tick = cfg.ticks
        return self._stop_reason or "completed"

    async def _run_one_tick(self, tick: int) -> None:
        loop = asyncio.get_running_loop()
        self._barrier = {gid for gid, s in self.sessions.items() if not s.unresponsive}
        self._barrier_done = loop.create_future()
        msg = TickStart(tick, float(self.vt_us), self.cfg.tick_us)
        # An unresponsive guest gets no ticks: a stopped one would find a
        # backlog of stale ticks when it wakes. It rejoins by answering.
        for gid in sorted(self._barrier):
            try:
                self.sessions[gid].conn.notify(msg)
            except PeerClosed:
                self._barrier.discard(gid)
        self.pause.reached("tick_started", tick=tick)
        if not self._barrier:
            return
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            bound = min(self._unresponsive_bound_s(gid) for gid in self._barrier)
            timeout = self.cfg.watchdog_s if waited >= bound else min(self.cfg.watchdog_s, bound - waited)
            try:
                await asyncio.wait_for(asyncio.shield(self._barrier_done), max(0.01, timeout))
                return
            except asyncio.TimeoutError:
                waited = time.monotonic() - started
                missing = sorted(self._barrier)
                log.warning(ev.TICK_STALLED, tick=tick, waited_s=round(waited, 3), missing=missing)
                self._emit({"stalled": tick, "missing": missing, "waited_s": round(waited, 1)})
                for gid in missing:
                    bound = self._unresponsive_bound_s(gid)
                    # A guest waiting for the host to answer it is not silent: the host may be
                    # waiting for another guest. Once that one is marked, its shootdowns stop
                    # blocking; only much later is a waiting guest given up on too.
                    if waited >= bound and (not self._waits_for_host(gid) or waited >= 3 * bound):
                        self._mark_unresponsive(gid)
                if not self._barrier:
                    return

    @property
    def running_guests(self) -> set[int]:
        """Guests that may still send requests in this tick (the barrier: not done, not given up on)."""
        return self._barrier

    def _waits_for_host(self, gid: int) -> bool:
        """The host is still working on a request of this guest's (and the guest owes it no answer)."""
        s = self.sessions.get(gid)
        return (s is not None and getattr(s.conn, "in_progress", 0) > 0
                and not self.machine.watchdog.pending(gid))

    def _unresponsive_bound_s(self, gid: int) -> float:
        """How long the barrier waits for ``gid``: a guest's first tick includes its start-up, so it gets more."""
        s = self.sessions.get(gid)
        if s is not None and s.last_tick_done < 0:
            return max(self.cfg.unresponsive_s, FIRST_TICK_GRACE_S)
        return self.cfg.unresponsive_s

    def _mark_unresponsive(self, gid: int) -> None:
        s = self.sessions.get(gid)
        if s is None:
            return
        s.unresponsive = True
        self._barrier.discard(gid)
        log.warning(ev.GUEST_UNRESPONSIVE, guest=gid, tick=self.tick, waited_s=self.cfg.unresponsive_s)
        self.machine.guest_unresponsive(s)

    async def _end_run(self, reason: str) -> None:
        for s in list(self.sessions.values()):
            s.state = SessionState.ENDING
            try:
                s.conn.notify(RunEnd(reason, self.tick))
            except PeerClosed:
                pass
        # Guests close on RunEnd; give them a moment, then close what is left.
        deadline = time.monotonic() + 5.0
        for s in list(self.sessions.values()):
            try:
                await asyncio.wait_for(s.conn.wait_closed(), max(0.05, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                s.conn.close()
        for s in list(self._unauthenticated):
            s.conn.close()

    # --- connections ----------------------------------------------------------

    def _new_connection(self) -> RpcConnection:
        conn = GuestConnection(name="unauthenticated", limits=self.limits, on_close=self._conn_closed,
                               on_refused=self._on_refused)
        session = GuestSession(conn)
        conn.session = session  # type: ignore[attr-defined]
        conn.requests = {MsgType.HELLO: lambda m: self._on_hello(session, m)}  # type: ignore[dict-item]
        if len(self._unauthenticated) >= MAX_UNAUTHENTICATED:
            # Refuse at once; the connection is closed after the error is written.
            asyncio.get_running_loop().call_soon(self._refuse_flood, conn)
        self._unauthenticated.add(session)
        # Cancelled once the handshake is over: a pending timer would keep the session alive for its 10 s.
        session.handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self._handshake_deadline, session)
        return conn

    def _on_refused(self, conn: GuestConnection, code: int, msg_type: int, message: str) -> None:
        """Every error reply to a guest (or a would-be guest) is counted by its code and logged."""
        try:
            name = MsgType(msg_type).name.lower()
        except ValueError:
            name = str(msg_type)
        self.machine.count_rejection(getattr(conn, "session", None), name, code, message)

    def _refuse_flood(self, conn: RpcConnection) -> None:
        log.warning(ev.GUEST_REFUSED, code=ErrorCode.OVERLOADED.name, reason="too many unauthenticated connections")
        conn.close()

    def _handshake_deadline(self, session: GuestSession) -> None:
        if session.state is SessionState.NEW:
            log.warning(ev.GUEST_REFUSED, code="HANDSHAKE_TIMEOUT",
                        reason=f"no hello within {HANDSHAKE_TIMEOUT_S:g} s")
            session.conn.close()

    def _on_hello(self, session: GuestSession, hello: Hello) -> Welcome:
        if session.state is not SessionState.NEW:
            raise HandshakeError(ErrorCode.INVALID_STATE, "hello sent twice")
        # Only a live session holds an id: one whose guest died was released,
        # and a restarted guest may take the id again as a fresh guest.
        connected = set(self.sessions)
        try:
            if self._stop_reason is not None:
                raise HandshakeError(ErrorCode.SHUTTING_DOWN, "the run is ending")
            check_hello(hello, self._token, self.cfg.guest_ids, connected)
        except HandshakeError as exc:
            self.refused += 1
            log.warning(ev.GUEST_REFUSED, guest=hello.guest_id, code=ErrorCode(exc.code).name, reason=exc.message)
            # The error reply is written first, then the connection closes.
            asyncio.get_running_loop().call_soon(session.conn.close)
            raise
        gid = hello.guest_id
        self._unauthenticated.discard(session)
        if session.handshake_timer is not None:
            session.handshake_timer.cancel()
        session.guest_id = gid  # the machine's handlers are bound to it
        session.activate(gid, hello.pid, self.machine.request_handlers(session) | {MsgType.PING: _pong},
                         self._on_tick_done)
        self.sessions[gid] = session
        self.machine.guest_joined(session)
        if gid in self.gone:
            self.rejoined[gid] = self.rejoined.get(gid, 0) + 1
        log.info(ev.GUEST_CONNECTED, guest=gid, pid=hello.pid, rejoined=self.rejoined.get(gid, 0))
        if set(self.sessions) | set(self.gone) >= self.cfg.guest_ids and self._all_connected is not None:
            self._all_connected.set()
        spec = next(g for g in self.cfg.guests if g.guest_id == gid)
        config = dict(spec.config)
        config.update(seed=self.cfg.seed, costs=self.cfg.costs, disk=self.cfg.disk, locks=self.cfg.locks,
                      ticks=self.cfg.ticks, metrics_every_ticks=self.cfg.metrics_every_ticks)
        return Welcome(self.cfg.run_id, self.tick, float(self.vt_us), self.cfg.tick_us, config)

    def _on_tick_done(self, session: GuestSession, msg: TickDone) -> None:
        gid = session.guest_id
        assert gid is not None
        if session.unresponsive:
            # Alive again (e.g. SIGCONT): its tick is late, but it is a sign of
            # life; it is back in the barrier from the next tick on.
            session.unresponsive = False
            session.last_vt_us = msg.vt_us
            self.machine.tick_done(session, msg)
            self.machine.guest_responsive(session)
            log.info(ev.GUEST_RESPONSIVE, guest=gid, tick=self.tick, late_tick=msg.tick)
            return
        if msg.tick != self.tick or gid not in self._barrier:
            self.machine.count_rejection(session, "tick_done", ErrorCode.INVALID_STATE,
                                         f"tick_done for tick {msg.tick} during tick {self.tick}"
                                         + ("" if gid in self._barrier else " (already done or not started)"))
            return
        session.last_tick_done = msg.tick
        session.last_vt_us = msg.vt_us
        self.machine.tick_done(session, msg)
        self._barrier.discard(gid)
        if not self._barrier and self._barrier_done is not None and not self._barrier_done.done():
            self._barrier_done.set_result(None)

    def _conn_closed(self, conn: RpcConnection, exc: BaseException | None) -> None:
        session: GuestSession = conn.session  # type: ignore[attr-defined]
        self._unauthenticated.discard(session)
        if session.handshake_timer is not None:
            session.handshake_timer.cancel()
        gid = session.guest_id
        was = session.state
        session.state = SessionState.GONE
        if gid is None or self.sessions.get(gid) is not session:
            return
        del self.sessions[gid]
        if was is SessionState.ENDING:
            return
        reason = f"connection lost: {exc}" if exc else "connection closed"
        self.gone[gid] = reason
        released = self.machine.guest_gone(session)
        log.warning(ev.GUEST_DISCONNECTED, guest=gid, reason=reason, tick=self.tick, **released)
        self._emit({"guest_lost": gid, "tick": self.tick})
        self._barrier.discard(gid)
        if not self._barrier and self._barrier_done is not None and not self._barrier_done.done():
            self._barrier_done.set_result(None)
        if self._all_connected is not None and set(self.sessions) | set(self.gone) >= self.cfg.guest_ids:
            self._all_connected.set()

    # --- progress for the launcher ----------------------------------------------

    def _progress(self, ticks_done: int) -> None:
        now = time.monotonic()
        if now - self._last_progress_s < 0.25 and ticks_done < self.cfg.ticks:
            return
        self._last_progress_s = now
        self._emit({"tick": ticks_done, "ticks": self.cfg.ticks, "vt_us": self.vt_us,
                    "guests": len(self.sessions), **self.machine.progress_metrics()})

    def _emit(self, obj: dict[str, Any]) -> None:
        if self.progress_out is not None:
            try:
                self.progress_out.write(json.dumps(obj) + "\n")
                self.progress_out.flush()
            except (BrokenPipeError, ValueError):
                self.progress_out = None  # the launcher is gone; keep running to a clean end


def _pong(msg: Ping) -> Pong:
    return Pong(msg.payload)
