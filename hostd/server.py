"""The host process: accepts guests, drives virtual time in ticks, ends the run.

A tick is: send ``TickStart`` to every live guest, wait until each has sent
``TickDone`` (the barrier), then let the machine resolve what is due (disk
buffers, balloon targets, monitors) and log the tick. A guest that dies is
released and dropped from the barrier; a guest that stays silent past the
watchdog bound is reported, and past ``unresponsive_s`` taken out of the
barrier, so one guest never hangs the run: it gets no more ticks until it
answers again, and its memory goes to host swap (``hostd.watchdog``,
``hostd.silent``).

The parts the server drives are built by ``hostd.assembly``; the live
sessions are a ``SessionRegistry`` that the server fills and the parts read.

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
from balloonlab.proto.messages import Hello, MsgType, RunEnd, TickDone, TickStart, Welcome
from balloonlab.proto.rpc import RpcConnection, RpcLimits
from balloonlab.proto.locks import DEADLOCK_REASON, EXIT_DEADLOCK
from balloonlab.proto.transport import Address, serve

from .assembly import assemble
from .config import RunConfig
from .audit import run_audit
from .registry import SessionRegistry
from .session import GuestConnection, GuestSession, SessionState
from balloonlab.proto.faultpoints import PausePoints

__all__ = ["Host"]

log = structlog.get_logger("hostd")

HANDSHAKE_TIMEOUT_S = 10.0
MAX_UNAUTHENTICATED = 256


class Host:
    def __init__(self, cfg: RunConfig, token: str, address: Address,
                 progress_out: IO[str] | None = None, limits: RpcLimits | None = None) -> None:
        self.cfg = cfg
        self._token = token
        self.address = address
        self.progress_out = progress_out
        self.limits = limits or RpcLimits()
        self.sessions = SessionRegistry()                # live, by guest id; who left and why; who came back
        self.pause = PausePoints.from_env("host")        # fault points for tests (BALLOONLAB_PAUSE_AT)
        self._unauthenticated: set[GuestSession] = set()
        # running: the tick's barrier, the guests that may still send requests in this tick
        self.core = assemble(cfg, self.sessions, running=lambda: self._barrier, stop=self.stop,
                             clock=lambda: float(self.vt_us), progress=self._emit)
        self.machine = self.core.machine
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
                audit = await run_audit(self.sessions, self.core.mem, self.core.shootdowns, self.machine.specs,
                                        unresponsive_s=self.cfg.unresponsive_s)
        finally:
            await self._end_run(reason)
            server.close()
            await server.wait_closed()
        log.info(ev.RUN_FINISHED, ticks=self.tick, vt_us=self.vt_us, wall_s=round(time.monotonic() - wall0, 3),
                 reason=reason, guests_lost=self.sessions.gone(), refused=self.refused,
                 guests_rejoined=self.sessions.rejoined(), audit_ok=audit["ok"],
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
            missing = self.sessions.missing(self.cfg.guest_ids)
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
        # The watchdog reports a slow tick and takes silent guests out of the barrier.
        await self.core.watchdog.watch(tick, self._barrier, self._barrier_done)

    async def _end_run(self, reason: str) -> None:
        for s in self.sessions.sessions():
            s.state = SessionState.ENDING
            try:
                s.conn.notify(RunEnd(reason, self.tick))
            except PeerClosed:
                pass
        # Guests close on RunEnd; give them a moment, then close what is left.
        deadline = time.monotonic() + 5.0
        for s in self.sessions.sessions():
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
        self.core.handlers.handshake(lambda m: self._on_hello(session, m)).install(conn)
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
        rejoined = self.sessions.join(session)
        self.machine.guest_joined(session)
        table = self.core.handlers.guest(session, self._on_tick_done)
        session.activate(gid, hello.pid, table.requests, table.notifications)
        log.info(ev.GUEST_CONNECTED, guest=gid, pid=hello.pid, rejoined=rejoined)
        if self.sessions.all_accounted(self.cfg.guest_ids) and self._all_connected is not None:
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
            session.last_vt_us = msg.vt_us
            self.machine.tick_done(session, msg)
            self.core.watchdog.back(session, self.tick, msg.tick)
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
        reason = None if was is SessionState.ENDING else f"connection lost: {exc}" if exc else "connection closed"
        if not self.sessions.leave(session, reason) or reason is None:
            return
        released = self.machine.guest_gone(session)
        log.warning(ev.GUEST_DISCONNECTED, guest=gid, reason=reason, tick=self.tick, **released)
        self._emit({"guest_lost": gid, "tick": self.tick})
        self._barrier.discard(gid)
        if not self._barrier and self._barrier_done is not None and not self._barrier_done.done():
            self._barrier_done.set_result(None)
        if self._all_connected is not None and self.sessions.all_accounted(self.cfg.guest_ids):
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

