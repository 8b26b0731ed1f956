"""The guest process: connect, handshake, take part in ticks, serve the host.

Call order::

    connect -> Hello/Welcome -> ContentReport -> (TickStart -> vCPU runs to the tick's end -> TickDone)* -> RunEnd -> exit 0
                                  any time: Invalidate (reply with tokens), BalloonTarget
                                  at tick boundaries: SharePeek, ShareProtect (page sharing)
    host vanishes -> exit 3;  host refuses -> exit 4

One vCPU coroutine runs for the whole run (``GuestSessionState.run_vcpu``).
A ``TickStart`` moves its gate (``guestd.gate``); when the vCPU reaches the
gate it sends ``TickDone`` and parks. The host's callbacks (Invalidate)
are served between the vCPU's batches and while it waits, on the same
event loop.

The guest waits for the host's answers as long as the host is alive, and no
longer: there is no per-call timeout (on a machine loaded far beyond its
cores a healthy host may take minutes to answer), but a heartbeat
(``proto.liveness``) pings a quiet host, and a host silent for
``host_silent_s`` (from ``Welcome.config["liveness"]``) is taken for dead:
exit 3.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any, Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.errors import ErrorCode, HandshakeRefused, PeerClosed, ProtoError, RemoteError
from balloonlab.proto.faultpoints import PausePoints
from balloonlab.proto.handshake import client_hello
from balloonlab.proto.liveness import HEARTBEAT_S_DEFAULT, HOST_SILENT_S_DEFAULT, LIVENESS_KEY, Heartbeat
from balloonlab.proto.messages import (Audit, AuditReply, BalloonTarget, ContentReport, Invalidate, InvalidateReply,
                                       MsgType, Pong, RunEnd, SharePeek, SharePeekReply, ShareProtect,
                                       ShareProtectReply, TickAhead, TickDone, TickStart)
from balloonlab.proto.messages import LockAcquire, LockRelease, LockReply
from balloonlab.proto.rpc import RpcConnection
from balloonlab.proto.transport import Address, connect

from .audit import audit_reply, pausing_call
from .errors import GuestdError
from .gate import VcpuGate, VcpuStopped
from .session import GuestSessionState, build_guest
from .statswire import StatsOnWire, StatsRow

__all__ = ["GuestAgent", "EXIT_OK", "EXIT_HOST_LOST", "EXIT_REFUSED"]

log = structlog.get_logger("guestd")

EXIT_OK = 0
EXIT_BUG = 1
EXIT_HOST_LOST = 3
EXIT_REFUSED = 4
CONNECT_TIMEOUT_S = 60.0     # the host may still be starting (or, on a loaded machine, slow to)
_LOST = "host lost"


class GuestNotReady(RuntimeError):
    code = ErrorCode.INVALID_STATE


class GuestAgent:
    def __init__(self, guest_id: int, token: str, address: Address) -> None:
        self.guest_id = guest_id
        self._token = token
        self.address = address
        self.conn: RpcConnection | None = None
        self.state: GuestSessionState | None = None
        # TickStarts move the gate even before the kernel is built (the host may start
        # the first tick the moment every guest has said hello)
        self.gate = VcpuGate()
        self._ending = False
        self._early_target: int | None = None
        self.end_reason = ""
        self.pause = PausePoints.from_env(guest_id)  # fault points for tests (BALLOONLAB_PAUSE_AT)
        self.heartbeat: Heartbeat | None = None
        self._host_silent_s: float | None = None     # set when the heartbeat gave up on the host
        self.host_messages = 0      # the host's own messages that may touch our state, received so far
        self._stats_on_wire = StatsOnWire()     # one connection per agent: the host has seen what it sent

    async def run(self) -> int:
        try:
            conn = await self._connect()
        except (OSError, PeerClosed) as exc:
            return self._fail(EXIT_HOST_LOST, f"cannot reach the host at {self.address}: {exc}")
        self.conn = conn
        # Handlers go in before Hello: the host may start the first tick the
        # moment every guest has said hello, before we have built our kernel.
        # Each of the host's own messages that may touch our state is counted (``TickDone.ahead_seen``):
        # the host answers a batch's requests ahead only if it has sent us none we had not seen at the park.
        counted = self._counted
        conn.requests = {MsgType.INVALIDATE: counted(self._on_invalidate), MsgType.PING: lambda m: Pong(m.payload),
                         MsgType.AUDIT: counted(self._on_audit)}
        if self.pause:
            conn.call = pausing_call(conn.call, self.pause)  # type: ignore[method-assign]
        conn.requests.update({MsgType.LOCK_ACQUIRE: counted(self._on_lock_acquire),
                              MsgType.LOCK_RELEASE: counted(self._on_lock_release),
                              MsgType.SHARE_PEEK: counted(self._on_share_peek),
                              MsgType.SHARE_PROTECT: counted(self._on_share_protect)})
        conn.notifications = {MsgType.TICK_START: self._on_tick_start, MsgType.RUN_END: self._on_run_end,
                              MsgType.BALLOON_TARGET: counted(self._on_balloon_target),
                              MsgType.TICK_AHEAD: self._on_tick_ahead}
        self.heartbeat = Heartbeat(conn, HEARTBEAT_S_DEFAULT, HOST_SILENT_S_DEFAULT, self._on_host_silent)
        self.heartbeat.start()
        try:
            welcome = await client_hello(conn, self.guest_id, self._token, os.getpid())
        except HandshakeRefused as exc:
            conn.close()
            # The host's message may already start with the code's name; say it once.
            code_name = str(exc).split(":", 1)[0]
            why = exc.message if exc.message.startswith(f"{code_name}:") else str(exc)
            return self._fail(EXIT_REFUSED, f"the host refused guest {self.guest_id}: {why}")
        except (PeerClosed, ProtoError) as exc:
            conn.close()
            return self._fail(EXIT_HOST_LOST, f"handshake with the host failed: {self._lost_why(exc)}")
        config = dict(welcome.config)
        self._set_liveness(config.pop(LIVENESS_KEY, None))
        try:
            self.state = build_guest(self.guest_id, config, conn, self.gate)
        except (ProtoError, GuestdError) as exc:
            conn.close()
            return self._fail(EXIT_REFUSED, f"bad guest config from the host: {exc}")
        refused = await self._report_content(conn)
        if refused is not None:
            return refused
        mm_lock = self.state.kernel.mm_lock
        self.pause.context = lambda: {"mm_lock_held": bool(mm_lock.locked())}
        if {"ept_fault", "disk_read"} & set(self.pause.wanted):
            # "Stop after the Nth EPT fault (or read) sent" counts the requests of a run without read
            # chains, whose counts are the same: each of those requests is sent on its own.
            self.state.kernel.read_chain = 0
        if self._early_target is not None:
            self.state.set_balloon_target(self._early_target)
        log.info(ev.GUEST_STARTED, guest=self.guest_id, pid=os.getpid(), ram_pages=welcome.config.get("ram_pages"),
                 policy=welcome.config.get("policy", "esc"))
        if conn.is_closing:
            return self._fail(EXIT_HOST_LOST, "the host closed the connection right after the handshake")
        try:
            code = await self._vcpu_loop()
        except PeerClosed as exc:
            if self._ending:   # the host ended the run mid-tick (e.g. on a deadlock) and closed on us
                self.state.log_finished(self.end_reason)
                code = EXIT_OK
            else:
                code = self._fail(EXIT_HOST_LOST, f"lost the host mid-tick: {self._lost_why(exc)}")
        except RemoteError as exc:
            # The vCPU cannot go on without what it asked for (a frame for its EPT fault, say), and nothing
            # in the guest can stand in for the host's answer: the guest stops, saying why.
            code = self._fail(EXIT_REFUSED, f"the host refused a request of the vCPU: {exc}")
        finally:
            self.heartbeat.stop()
            conn.close()
        return code

    async def _report_content(self, conn: RpcConnection) -> int | None:
        """Tell the host what our pages hold (``proto.content``), before the vCPU starts; an exit code if refused.

        Our regions come in Welcome's config, so the map cannot ride on Hello.
        A host that does not know the message (older) leaves us with the
        empty map: nothing shared, nothing is lost either.
        """
        assert self.state is not None
        cmap = self.state.kernel.config.layout.content_map()
        try:
            await conn.call(ContentReport(cmap.to_wire()))
        except RemoteError as exc:
            if exc.code == ErrorCode.UNKNOWN_TYPE:
                log.warning(ev.CONTENT_MAP_TAKEN, guest=self.guest_id, taken=False, reason=str(exc))
                return None
            conn.close()
            return self._fail(EXIT_REFUSED, f"the host refused guest {self.guest_id}'s content map: {exc}")
        except (PeerClosed, ProtoError) as exc:
            conn.close()
            return self._fail(EXIT_HOST_LOST, f"lost the host sending the content map: {self._lost_why(exc)}")
        return None

    def _set_liveness(self, raw: Any) -> None:
        """The host's heartbeat interval and how long we wait for it before we give it up."""
        assert self.heartbeat is not None
        if not isinstance(raw, dict):
            return

        def value(key: str, default: float) -> float:
            v = raw.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6 else default

        self.heartbeat.configure(value("heartbeat_s", self.heartbeat.interval_s),
                                 value("host_silent_s", self.heartbeat.silent_s))

    def _on_host_silent(self, quiet_s: float) -> None:
        """Not a word from the host (not even an answer to a ping) for this long: it is dead or stopped."""
        self._host_silent_s = quiet_s
        if self.conn is not None:
            self.conn.abort()

    def _lost_why(self, exc: BaseException) -> str:
        if self._host_silent_s is not None:
            return f"no sign of life from the host for {self._host_silent_s:.0f} s (heartbeat)"
        return str(exc)

    async def _connect(self) -> RpcConnection:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        delay = 0.02
        while True:
            try:
                proto = await connect(self.address, lambda: RpcConnection(name="host", on_close=self._on_close))
                return proto  # type: ignore[return-value]
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)  # the host is still starting; back off
                delay = min(delay * 2, 0.5)

    async def _vcpu_loop(self) -> int:
        assert self.state is not None and self.conn is not None
        st = self.state
        st.send_tick_done = self._send_tick_done
        try:
            await st.run_vcpu()
        except VcpuStopped as stop:
            st.log_finished(stop.reason)
            if not self._ending:
                why = ("no sign of life from the host for " f"{self._host_silent_s:.0f} s (heartbeat)"
                       if self._host_silent_s is not None else "the host closed the connection before ending the run")
                return self._fail(EXIT_HOST_LOST, why)
            return EXIT_OK
        raise AssertionError("the vCPU returned without the run ending")  # pragma: no cover

    def _send_tick_done(self, tick: int, vt_us: float, stats: StatsRow, accessed: bytes, dirty: bytes,
                        ahead: bytes = b"") -> None:
        if self.conn is None or self.conn.is_closing:
            return   # the loss stops the gate
        self.conn.notify(TickDone(tick, vt_us, self._stats_on_wire(stats), accessed, dirty, ahead,
                                  self.host_messages if ahead else 0))

    def _counted(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def handle(msg: Any) -> Any:
            self.host_messages += 1
            return handler(msg)
        return handle

    def _on_tick_ahead(self, msg: TickAhead) -> None:
        if self.state is None:
            log.error("protocol_violated", reason="TickAhead before the guest has built its memory", tick=msg.tick)
            return
        self.state.take_ahead(msg.tick, msg.tokens, msg.times)

    # --- handlers from the host ------------------------------------------------

    def _on_tick_start(self, msg: TickStart) -> None:
        try:
            self.gate.open(msg)
        except ValueError as exc:
            log.error("protocol_violated", reason=str(exc), tick=msg.tick)
        else:
            structlog.contextvars.bind_contextvars(tick=msg.tick)

    def _on_run_end(self, msg: RunEnd) -> None:
        self._ending = True
        self.end_reason = msg.reason
        in_tick = self.state is not None and self.state.in_tick
        self.gate.stop(msg.reason)
        if in_tick and self.conn is not None:
            # The run ended under a running tick (a deadlock): our pending calls will never be
            # answered; closing fails them, and the vCPU stops.
            self.conn.close()

    def _on_balloon_target(self, msg: BalloonTarget) -> None:
        if self.state is None:
            self._early_target = msg.target_pages
        else:
            self.state.set_balloon_target(msg.target_pages)

    def _on_invalidate(self, msg: Invalidate) -> InvalidateReply:
        if self.state is None:
            raise GuestNotReady("invalidate before the guest has built its memory")
        self.pause.reached("invalidate", pages=int(msg.gpfns.size))
        tokens, clean_cache = self.state.invalidate(msg.gpfns)
        labels = np.packbits(clean_cache).tobytes() if clean_cache.any() else b""
        return InvalidateReply(tokens, labels)

    def _on_share_peek(self, msg: SharePeek) -> SharePeekReply:
        """Page sharing's scanner reads our frames (we are parked at a tick boundary)."""
        if self.state is None:
            raise GuestNotReady("share peek before the guest has built its memory")
        return SharePeekReply(self.state.kernel.share_peek(msg.gpfns))

    def _on_share_protect(self, msg: ShareProtect) -> ShareProtectReply:
        """The host merged these frames with others: our writes to them fault first (copy-on-write)."""
        if self.state is None:
            raise GuestNotReady("share protect before the guest has built its memory")
        return ShareProtectReply(self.state.kernel.share_protect(msg.gpfns))

    def _on_audit(self, msg: Audit) -> AuditReply:
        """The end-of-run audit: where our books say each page is (guestd.audit)."""
        self.pause.reached("audit", first=msg.first)
        return audit_reply(self.state, msg.first, msg.count)

    def _lock_state(self) -> Any:
        if self.state is None or self.state.locks is None:
            raise GuestNotReady("a lock request, but this guest has no lock model (or no memory yet)")
        return self.state.locks

    async def _on_lock_acquire(self, msg: LockAcquire) -> LockReply:
        """The host takes our L_vmem for one of its tasks (before a TLB shootdown)."""
        return await self._lock_state().on_lock_acquire(msg)

    def _on_lock_release(self, msg: LockRelease) -> LockReply:
        return self._lock_state().on_lock_release(msg)

    def _on_close(self, conn: RpcConnection, exc: BaseException | None) -> None:
        if not self._ending:
            self.gate.stop(_LOST)

    def _fail(self, code: int, message: str) -> int:
        if code == EXIT_HOST_LOST:
            log.error(ev.HOST_LOST, reason=message)
        else:
            log.error("guest_failed", reason=message, exit_code=code)
        print(f"guestd[{self.guest_id}]: {message}", file=sys.stderr)
        return code
