"""The host process: accepts guests, drives virtual time in ticks, ends the run.

A tick is: send ``TickStart`` to every live guest, wait until each has sent
``TickDone`` (the barrier), then let the machine resolve what is due (disk
buffers, balloon targets, monitors) and log the tick. A guest that parked
with the next batch's first requests in its ``TickDone`` (``ahead``) gets
its ``TickStart`` with their answers (``TickAhead``), served once the
boundary is over, unless the host sent it anything since it parked
(``_answer_ahead``; proto/README.md, "Answers ahead"). A guest that dies is
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

Nothing at the host waits on one peer without a bound:

- liveness is by heartbeat (``proto.liveness``): a guest that sends nothing
  for ``unresponsive_s`` (it does not even answer pings) is out of the
  barrier; a guest that answers pings but does nothing else for
  ``STUCK_FACTOR * unresponsive_s`` while the host owes it nothing is *cut
  off* (``cut_off``): told ``RunEnd``, disconnected, its memory released;
  the run goes on and reports it (``guests_cut_off``). A slow guest, on a
  slow machine, is neither: the run only takes longer.
- a connection must complete its handshake within ``HANDSHAKE_TIMEOUT_S``
  with frames of at most ``PREAUTH_MAX_FRAME_BYTES``; at most
  ``MAX_UNAUTHENTICATED`` wait at once, and one beyond that is closed the
  moment it is accepted; a refused ``Hello`` is answered, then nothing
  more from that connection is read, and it is closed;
- the end of the run (audit, ``RunEnd``, closing) has deadlines, and a
  termination signal ends the host within ``SIGNAL_GRACE_S`` whatever a
  guest does (a second signal at once).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import IO, Any, Awaitable, Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.errors import ErrorCode, PeerClosed
from balloonlab.proto.faultpoints import flush_log
from balloonlab.proto.framing import DecodeLimits
from balloonlab.proto.handshake import HandshakeError, check_hello
from balloonlab.proto.liveness import LIVENESS_KEY, Heartbeat
from balloonlab.proto.messages import Hello, MsgType, RunEnd, TickAhead, TickDone, TickStart, Welcome
from balloonlab.proto.rpc import ByteBudget, RpcConnection, RpcLimits, should_log_count
from balloonlab.proto.locks import DEADLOCK_REASON, EXIT_DEADLOCK
from balloonlab.proto.transport import Address, serve

from .assembly import assemble
from .config import RunConfig
from .audit import run_audit
from .errors import HostdError
from .readchain import check_program
from .registry import SessionRegistry
from .session import GuestConnection, GuestSession, SessionState, check_tick_done
from balloonlab.proto.faultpoints import PausePoints

__all__ = ["Host"]

log = structlog.get_logger("hostd")

HANDSHAKE_TIMEOUT_S = 10.0
MAX_UNAUTHENTICATED = 256
PREAUTH_MAX_FRAME_BYTES = 16 * 1024     # a Hello is under 100 bytes; nothing bigger is read before it
PREAUTH_DECODE = DecodeLimits(max_containers=8, max_container_len=16, max_str_bytes=1024)
GUEST_DECODE = DecodeLimits()           # what one frame of an authenticated guest may decode to
REQUEST_BYTES_PER_GUEST = 16 << 20      # frame bytes of one guest's requests in progress
REQUEST_BYTES_TOTAL = 256 << 20         # ... and of every guest's together (one each always gets through)
STUCK_FACTOR = 3.0                      # alive but doing nothing this many times unresponsive_s: cut off
END_GRACE_S = 5.0                       # after RunEnd, guests have this long to close before they are cut
SIGNAL_GRACE_S = 15.0                   # a stop signal ends the process within this, audit or not
CUT_OFF_GRACE_S = 1.0                   # a cut-off guest's RunEnd gets this long to leave before the abort
_NO_TOKENS = np.zeros(0, np.uint64)     # a TickAhead that answers nothing


def default_limits() -> RpcLimits:
    """The host's bounds on an authenticated guest connection (bytes per guest and in total)."""
    return RpcLimits(max_incoming_bytes=REQUEST_BYTES_PER_GUEST, budget=ByteBudget(REQUEST_BYTES_TOTAL),
                     decode=GUEST_DECODE)


class Host:
    def __init__(self, cfg: RunConfig, token: str, address: Address,
                 progress_out: IO[str] | None = None, limits: RpcLimits | None = None) -> None:
        self.cfg = cfg
        self._token = token
        self.address = address
        self.progress_out = progress_out
        self.limits = limits or default_limits()
        # Before the handshake a connection may send only a small Hello: its frames are tiny, its
        # requests one at a time, and none of the guests' shared byte budget is its.
        self._preauth_limits = self.limits.replace(
            max_frame_bytes=min(PREAUTH_MAX_FRAME_BYTES, self.limits.max_frame_bytes), decode=PREAUTH_DECODE,
            max_incoming=4, max_incoming_bytes=PREAUTH_MAX_FRAME_BYTES, budget=None)
        self.sessions = SessionRegistry()                # live, by guest id; who left and why; who came back
        self.pause = PausePoints.from_env("host")        # fault points for tests (BALLOONLAB_PAUSE_AT)
        self._unauthenticated: set[GuestSession] = set()
        # running: the tick's barrier, the guests that may still send requests in this tick
        self.core = assemble(cfg, self.sessions, running=lambda: self._barrier, stop=self.stop,
                             clock=lambda: float(self.vt_us), progress=self._emit, count_done=self._count_done)
        self.machine = self.core.machine
        self.core.watchdog.on_stuck = self.cut_off
        self.tick = 0
        self.vt_us = 0
        self._barrier: set[int] = set()
        self._ahead_owed: list[int] = []      # guests of this tick owed TickStart + TickAhead (_answer_ahead)
        self._tick_start_msg: TickStart | None = None
        self._tick_start_frame: bytes | None = None
        self._barrier_done: asyncio.Future | None = None
        self._all_connected: asyncio.Event | None = None
        self._stop_reason: str | None = None
        self._stop_event: asyncio.Event | None = None
        self._last_progress_s = 0.0
        self.refused = 0
        self.ahead_declined = 0     # TickDone.ahead answered empty: the guest touched since its park (or stale)
        self.refused_by_code: dict[str, int] = {}        # refused connections and Hellos, by code
        self.peer_events: dict[str, int] = {}            # frame_rejected, peer_error, ... of every connection (shared)
        self.guests_cut_off: dict[int, str] = {}         # guest id -> why the host cut it off (last time)
        self._signals = 0
        self.sched_policy = "normal"    # the process's CPU policy, as the entry point set it (run_started shows it)
        self.group_nice: int | None = None   # its autogroup's nice, when the entry point set one (ditto)
        self.start_mode = "exec"              # "fork": forked from the launcher (``balloonlab.early``)
        self._last_join_s = time.monotonic()
        self.heartbeat_s = min(1.0, max(0.05, cfg.unresponsive_s / 4))
        self.core.discipline.guard_holds(cfg.unresponsive_s, self.cut_off)

    # --- lifecycle ------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._all_connected = asyncio.Event()
        self._stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        server, bound = await serve(self.address, self._new_connection)
        self.address = bound
        log.info(ev.RUN_STARTED, scenario=self.cfg.scenario, variant=self.cfg.variant, seed=self.cfg.seed,
                 guests=sorted(self.cfg.guest_ids), tick_us=self.cfg.tick_us, ticks=self.cfg.ticks,
                 address=str(bound), host_sched=self.sched_policy, host_group_nice=self.group_nice,
                 host_start=self.start_mode)
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
                audit = await self._audit(reason)
                reason = self._stop_reason if (self._stop_reason or "").startswith("signal") else reason
        finally:
            await self._end_run(reason)
            server.close()
            try:   # a connection that will not close must not hold the host (uvloop waits for them all)
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
        log.info(ev.RUN_FINISHED, ticks=self.tick, vt_us=self.vt_us, wall_s=round(time.monotonic() - wall0, 3),
                 reason=reason, guests_lost=self.sessions.gone(), refused=self.refused,
                 guests_rejoined=self.sessions.rejoined(), audit_ok=audit["ok"],
                 audit={k: v for k, v in audit.items() if k not in ("ok", "guests")},
                 guests_cut_off=dict(sorted(self.guests_cut_off.items())),
                 refused_by_code=dict(sorted(self.refused_by_code.items())), peer_events=self._peer_event_totals(),
                 ahead_declined=self.ahead_declined,
                 **self.machine.final_metrics())
        self._emit({"finished": reason, "tick": self.tick, "vt_us": self.vt_us})
        if reason == DEADLOCK_REASON:
            return EXIT_DEADLOCK
        return 0 if reason in ("completed",) or reason.startswith("signal") else 1

    def _on_signal(self, sig: int) -> None:
        """First signal: end the run (RunEnd, logs closed). It ends within SIGNAL_GRACE_S; a second one ends it now."""
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            self.stop(f"signal {name}")
            asyncio.get_running_loop().call_later(SIGNAL_GRACE_S, self._force_exit, name)
        else:
            self._force_exit(name)

    def _force_exit(self, name: str) -> None:
        log.error(ev.RUN_FINISHED, ticks=self.tick, vt_us=self.vt_us, reason=f"signal {name} (forced)",
                  guests_lost=self.sessions.gone(), forced=True,
                  guests_cut_off=dict(sorted(self.guests_cut_off.items())))
        self._emit({"finished": f"signal {name} (forced)", "tick": self.tick, "vt_us": self.vt_us})
        flush_log()
        os._exit(1)

    async def _audit(self, reason: str) -> dict[str, Any]:
        """The end-of-run audit, unless a stop signal comes first (it is not worth the wait then).

        A guest whose claims are in and checked is told the run is over (``reason``) at once: the audit
        asks nothing more of it, and its way out overlaps the other guests' audits.
        """
        assert self._stop_event is not None

        def answered(gid: int) -> None:
            session = self.sessions.get(gid)
            if session is not None:
                self._end_session(session, reason)

        def until_back(gid: int) -> Awaitable[bool] | None:
            session = self.sessions.get(gid)
            if session is None or not session.unresponsive:
                return None
            return self.core.watchdog.until_back(session)

        audit = asyncio.ensure_future(run_audit(self.sessions, self.core.mem, self.core.shootdowns, self.machine.specs,
                                                unresponsive_s=self.cfg.unresponsive_s,
                                                invariant=self.core.invariant, answered=answered,
                                                until_back=until_back))
        stopped = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait((audit, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if audit.done():
            return audit.result()
        audit.cancel()
        return {"ok": None, "reason": f"not finished: {self._stop_reason}"}

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
        self.core.discipline.stopping()

    async def _wait_for_guests(self) -> bool:
        """Until every guest has said hello, or none has for ``connect_timeout_s`` (a slow start is still a start)."""
        assert self._all_connected is not None
        while not self._all_connected.is_set():
            left = self._last_join_s + self.cfg.connect_timeout_s - time.monotonic()
            if left <= 0:
                missing = self.sessions.missing(self.cfg.guest_ids)
                log.warning(ev.TICK_STALLED, tick=0, waited_s=self.cfg.connect_timeout_s, missing=missing,
                            phase="connect")
                break
            try:
                await asyncio.wait_for(self._all_connected.wait(), left)
            except asyncio.TimeoutError:
                pass
        return bool(self.sessions) and self._stop_reason is None

    async def _tick_loop(self) -> str:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        started = loop.time()         # when the last tick started (pace)
        observe: Callable[[], None] | None = None     # the last boundary's observations (Machine.end_tick)
        try:
            for tick in range(cfg.ticks):
                self.tick = tick  # ticks completed so far, as run_finished reports them when the run stops here
                if cfg.pace > 0 and tick > 0:
                    # the wait yields to the loop: what it lets in (a late TickDone, a hello) must not reach
                    # the observations, so they run first
                    observe = _run(observe)
                    await self._pace(started + cfg.tick_us / 1e6 / cfg.pace)
                    started = loop.time()
                if self._stop_reason is not None:
                    return self._stop_reason
                if not self.sessions:
                    return "all guests gone"
                vt_us = tick * cfg.tick_us
                structlog.contextvars.bind_contextvars(tick=tick, vt_us=vt_us)
                self._send_tick_start(tick, vt_us)
                if observe is not None:
                    # no yield since end_tick: the guests' next requests are not read yet; logged as the
                    # tick they observe
                    with structlog.contextvars.bound_contextvars(tick=tick - 1, vt_us=(tick - 1) * cfg.tick_us):
                        observe = _run(observe)
                self.vt_us = vt_us
                self.machine.tick_started(tick, vt_us)
                self._answer_ahead(tick)
                await self._wait_tick(tick)
                self.vt_us = (tick + 1) * cfg.tick_us
                observe = await self.machine.end_tick(tick, self.vt_us)
                self._progress(tick + 1)
            self.tick = cfg.ticks
            return self._stop_reason or "completed"
        finally:
            _run(observe)

    async def _pace(self, due: float) -> None:
        """Holds the next tick until wall time ``due`` (a tick's length at the pace after the last one started,
        so a stall is not made up for), or a stop: only when ticks start, never what they do."""
        assert self._stop_event is not None
        left = due - asyncio.get_running_loop().time()
        if left > 0:
            try:
                await asyncio.wait_for(self._stop_event.wait(), left)
            except asyncio.TimeoutError:
                pass

    def _answer_ahead(self, tick: int) -> None:
        """``TickStart`` and ``TickAhead`` in one write to each guest of the tick that offered
        ``TickDone.ahead`` at its park: the requests served, when nothing touched the guest since
        (``GuestConnection.touches`` = what it had seen), else none. Here, after the boundary's
        observations, as its first requests of the tick would be; guest by guest, so that each runs while
        the next one's are served."""
        mem = self.core.mem
        shootdowns = self.core.shootdowns
        start = self._tick_start_msg
        assert start is not None
        owed, self._ahead_owed = self._ahead_owed, []
        for gid in owed:
            s = self.sessions.get(gid)
            if s is None:
                continue
            t, prog, vt, seen = s.ahead if s.ahead is not None else (-1, [], 0.0, -1)
            s.ahead = None
            tokens, times = _NO_TOKENS, b""
            if t == tick - 1 and s.conn.touches == seen and not s.unresponsive:
                tokens, times = mem.vdisk_chain_ahead(gid, vt, prog, lambda: not shootdowns.pending(gid))
            else:
                self.ahead_declined += 1
            try:
                # its TickStart held back until now: one write, one wake-up, while the next guest is served
                s.conn.notify_framed(start, self._start_frame(s.conn), TickAhead(tick, tokens, times))
            except PeerClosed:
                self._barrier.discard(gid)

    def _send_tick_start(self, tick: int, vt_us: int) -> None:
        loop = asyncio.get_running_loop()
        self._barrier = {gid for gid, s in self.sessions.items() if not s.unresponsive}
        self._barrier_done = loop.create_future()
        msg = self._tick_start_msg = TickStart(tick, float(vt_us), self.cfg.tick_us)
        self._tick_start_frame = None   # the same TickStart to every guest: framed once (``_start_frame``)
        # An unresponsive guest gets no ticks: a stopped one would find a
        # backlog of stale ticks when it wakes. It rejoins by answering.
        # A guest owed a TickAhead gets its TickStart with it (``_answer_ahead``).
        self._ahead_owed = []
        for gid in sorted(self._barrier):
            s = self.sessions[gid]
            if s.ahead is not None:
                self._ahead_owed.append(gid)
                continue
            try:
                s.conn.notify_framed(msg, self._start_frame(s.conn))
            except PeerClosed:
                self._barrier.discard(gid)

    def _start_frame(self, conn: RpcConnection) -> bytes:
        """This tick's ``TickStart`` as a frame, made by the first connection it goes to."""
        frame = self._tick_start_frame
        if frame is None:
            assert self._tick_start_msg is not None
            frame = self._tick_start_frame = conn.notification_frame(self._tick_start_msg)
        return frame

    async def _wait_tick(self, tick: int) -> None:
        self.pause.reached("tick_started", tick=tick)
        if not self._barrier:
            # No guest in the barrier (all silent, or their connections closing with the close still
            # queued): the loop still gets its turn, or a tick after tick would run without reading a
            # socket, running a close or a signal handler -- the run would race on for nobody.
            await asyncio.sleep(0)
            return
        # The watchdog reports a slow tick and takes silent guests out of the barrier.
        assert self._barrier_done is not None
        await self.core.watchdog.watch(tick, self._barrier, self._barrier_done)

    def _end_session(self, s: GuestSession, reason: str) -> None:
        """``RunEnd`` to one guest, once: from then on its connection's close is the run's end, not a loss."""
        if s.state is SessionState.ENDING:
            return
        s.state = SessionState.ENDING
        if s.heartbeat is not None:
            s.heartbeat.stop()
        try:
            s.conn.notify(RunEnd(reason, self.tick))
        except PeerClosed:
            pass

    async def _end_run(self, reason: str) -> None:
        for s in self.sessions.sessions():
            self._end_session(s, reason)
        for s in list(self._unauthenticated):
            s.conn.abort()
        waits = [asyncio.ensure_future(s.conn.wait_closed()) for s in self.sessions.sessions()]
        if waits:
            await asyncio.wait(waits, timeout=END_GRACE_S)
            for w in waits:
                w.cancel()
        for s in self.sessions.sessions():
            s.conn.abort()

    # --- connections ----------------------------------------------------------

    def _new_connection(self) -> RpcConnection:
        conn = GuestConnection(name="unauthenticated", limits=self._preauth_limits, on_close=self._conn_closed,
                               on_refused=self._on_refused, shared_events=self.peer_events)
        session = GuestSession(conn)
        conn.session = session  # type: ignore[attr-defined]
        if len(self._unauthenticated) >= MAX_UNAUTHENTICATED:
            # Closed the moment it is accepted, without a frame: an idle flood must not hold fds.
            conn.refuse_at_once = True
            self._count_refusal("OVERLOADED", f"more than {MAX_UNAUTHENTICATED} connections wait for their handshake")
            return conn
        self.core.handlers.handshake(lambda m: self._on_hello(session, m)).install(conn)
        self._unauthenticated.add(session)
        # Cancelled once the handshake is over: a pending timer would keep the session alive for its 10 s.
        session.handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self._handshake_deadline, session)
        return conn

    def _count_refusal(self, code: str, reason: str, **fields: Any) -> None:
        """A connection or Hello refused: counted in full by code, logged at counts 1-10, 100, 1000, ..."""
        n = self.refused_by_code[code] = self.refused_by_code.get(code, 0) + 1
        if should_log_count(n):
            log.warning(ev.GUEST_REFUSED, code=code, reason=reason, count=n, **fields)

    def _on_refused(self, conn: GuestConnection, code: int, msg_type: int, message: str) -> None:
        """Every error reply to a guest (or a would-be guest) is counted by its code and logged."""
        try:
            name = MsgType(msg_type).name.lower()
        except ValueError:
            name = str(msg_type)
        session = getattr(conn, "session", None)
        # Before the handshake there is no guest to count per: a flood over many connections is one flood.
        self.machine.count_rejection(session if session is not None and session.guest_id is not None else None,
                                     name, code, message)

    def _handshake_deadline(self, session: GuestSession) -> None:
        if session.state is SessionState.NEW:
            self._count_refusal("HANDSHAKE_TIMEOUT", f"no hello within {HANDSHAKE_TIMEOUT_S:g} s")
            session.conn.abort()

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
            self._count_refusal(ErrorCode(exc.code).name, exc.message, guest=hello.guest_id)
            # The error reply is written; whatever the peer pipelined behind this Hello is not
            # read, let alone answered; then the connection closes.
            session.conn.stop_receiving()
            asyncio.get_running_loop().call_soon(session.conn.close)
            raise
        gid = hello.guest_id
        self._unauthenticated.discard(session)
        if session.handshake_timer is not None:
            session.handshake_timer.cancel()
        session.conn.authenticated(self.limits)   # full-size frames from now on
        session.guest_id = gid  # the machine's handlers are bound to it
        rejoined = self.sessions.join(session)
        self.machine.guest_joined(session)
        table = self.core.handlers.guest(session, self._on_tick_done)
        session.activate(gid, hello.pid, table.requests, table.notifications)
        session.heartbeat = Heartbeat(session.conn, self.heartbeat_s)
        session.heartbeat.start()
        log.info(ev.GUEST_CONNECTED, guest=gid, pid=hello.pid, rejoined=rejoined)
        self._last_join_s = time.monotonic()
        if self.sessions.all_accounted(self.cfg.guest_ids) and self._all_connected is not None:
            self._all_connected.set()
        spec = next(g for g in self.cfg.guests if g.guest_id == gid)
        config = dict(spec.config)
        config.update(seed=self.cfg.seed, costs=self.cfg.costs, disk=self.cfg.disk, locks=self.cfg.locks,
                      ticks=self.cfg.ticks, metrics_every_ticks=self.cfg.metrics_every_ticks)
        if self.core.mem.read_chain:   # offered only where the host serves chains (hostd.readchain)
            config["read_chain"] = self.core.mem.read_chain
            if self.core.mem.ahead_chain:
                config["ahead_chain"] = True
        # How this guest proves it is alive and judges whether we are (proto.liveness).
        config[LIVENESS_KEY] = {"heartbeat_s": self.heartbeat_s, "host_silent_s": self.host_silent_s}
        return Welcome(self.cfg.run_id, self.tick, float(self.vt_us), self.cfg.tick_us, config)

    @property
    def host_silent_s(self) -> float:
        """How long a guest waits without a sign of life from us before it gives up on the host."""
        return max(60.0, 2 * self.cfg.unresponsive_s)

    def _count_done(self, gid: int) -> None:
        """The discipline holds the guest's request across the tick boundary: it owes no TickDone for this tick."""
        session = self.sessions.get(gid)
        if session is not None:
            session.excused_ticks.add(self.tick)
        self._barrier.discard(gid)
        if not self._barrier and self._barrier_done is not None and not self._barrier_done.done():
            self._barrier_done.set_result(None)

    def _on_tick_done(self, session: GuestSession, msg: TickDone) -> None:
        gid = session.guest_id
        assert gid is not None
        # A TickDone is taken whole or refused whole, with an error frame naming why.
        problem = check_tick_done(msg, self.cfg.tick_us, self.machine.specs[gid].ram_pages, session.stats_keys)
        if problem is not None:
            session.conn.send_error(MsgType.TICK_DONE, ErrorCode.BAD_FIELD, problem)
            return
        session.ahead = None
        if msg.ahead:
            try:
                prog = check_program(gid, msg.ahead)
            except HostdError as exc:
                session.conn.send_error(MsgType.TICK_DONE, ErrorCode.BAD_FIELD, f"TickDone.ahead: {exc}")
                return
            if self.core.mem.ahead_chain:
                session.ahead = (msg.tick, prog, msg.vt_us, msg.ahead_seen)
        if type(msg.stats) is dict:
            session.stats_keys = tuple(msg.stats)   # a TickDone taken: its next ones' arrays are these keys' values
        if msg.tick in session.excused_ticks:
            # A guest that does not know it was excused still finishes that tick: its bits and stats count.
            session.excused_ticks.discard(msg.tick)
            self.machine.tick_done(session, msg, excused=True)
            return
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

    def cut_off(self, gid: int, reason: str) -> None:
        """This guest alone stops: ``RunEnd`` to it, its connection closed, its memory released; the run goes on.

        For a guest that is alive but stuck, or that holds what the others
        need past a bound. Reported in ``run_finished.guests_cut_off`` (and
        ``guests_lost``, with the reason).
        """
        s = self.sessions.get(gid)
        if s is None or s.state is not SessionState.ACTIVE:
            return
        self.guests_cut_off[gid] = reason
        s.disconnect_reason = f"cut off: {reason}"
        log.warning(ev.GUEST_CUT_OFF, guest=gid, reason=reason, tick=self.tick)
        self._emit({"guest_cut_off": gid, "tick": self.tick, "reason": reason})
        if s.heartbeat is not None:
            s.heartbeat.stop()
        try:
            s.conn.notify(RunEnd(f"cut off: {reason}", self.tick))
        except PeerClosed:
            pass
        s.conn.stop_receiving()
        s.conn.close()
        asyncio.get_running_loop().call_later(CUT_OFF_GRACE_S, s.conn.abort)
        self._barrier.discard(gid)
        if not self._barrier and self._barrier_done is not None and not self._barrier_done.done():
            self._barrier_done.set_result(None)

    def _conn_closed(self, conn: RpcConnection, exc: BaseException | None) -> None:
        session: GuestSession = conn.session  # type: ignore[attr-defined]
        self._unauthenticated.discard(session)
        if session.handshake_timer is not None:
            session.handshake_timer.cancel()
            session.handshake_timer = None
        if session.heartbeat is not None:
            session.heartbeat.stop()
        session.heartbeat = None
        conn.session = None   # type: ignore[attr-defined]  # no cycle: freed by its reference count
        gid = session.guest_id
        was = session.state
        session.state = SessionState.GONE
        reason = (None if was is SessionState.ENDING else session.disconnect_reason
                  or (f"connection lost: {exc}" if exc else "connection closed"))
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

    def _peer_event_totals(self) -> dict[str, int]:
        """Every peer-caused event of the run, over all connections (logged or not)."""
        return dict(sorted(self.peer_events.items()))

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


def _run(observe: Callable[[], None] | None) -> None:
    """Run a boundary's pending observations (if any); returns None, the nothing-pending value."""
    if observe is not None:
        observe()
    return None
