"""RPC in both directions over one framed connection.

Envelope of every frame: ``[kind, id, type, body]`` (see ``Kind``). Either
side may send requests; each carries an id unique among that side's
outstanding requests, and the reply or error carries it back. Errors that
cannot be tied to a request (an undecodable frame, a bad notification) are
sent with id 0.

Call order of one connection::

    connection_made -> (data_received | call | notify)* -> close -> connection_lost

Backpressure: at most ``max_outstanding`` requests of ours in flight
(callers wait for a slot); at most ``max_incoming`` of the peer's handled at
once, holding at most ``max_incoming_bytes`` of their frames (and, with a
shared ``ByteBudget``, at most its bytes over every connection); beyond that
the peer gets ``OVERLOADED``. Writes pause at the transport's high-water mark
(``drain()``), and a peer that lets our send buffer grow past
``hard_limit_bytes`` is disconnected. What one frame may decode to is
bounded by ``DecodeLimits``.

Liveness is not a per-call timeout: calls wait as long as the peer is alive
(``proto.liveness.Heartbeat`` proves it), unless the caller gives a timeout.
``heard_at`` is when the peer last sent anything, ``active_at`` when it last
sent a message that was served: a request or notification its handler
took, an answer to one of ours -- not a heartbeat, not garbage or refusals.

Events a peer causes (bad frames, error frames, failed handlers) are
counted in full (``peer_events``) and logged only at counts 1-10, 100,
1000, ...: a flood must not flood the log. A server shares one count over
all its connections (``shared_events``), so that many connections cannot
each log their first ten.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import types
from collections import deque
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import structlog

from .errors import (ErrorCode, FrameTooLarge, MessageError, PeerClosed, ProtoError,
                     RemoteError, RpcTimeout, TruncatedFrame, UndecodableFrame)
from .framing import MAX_FRAME_BYTES_DEFAULT, DecodeLimits, FrameDecoder, FrameEncoder
from .messages import NOTIFICATIONS, REQUESTS, Kind, Message, MsgType

__all__ = ["RpcConnection", "RequestHandler", "NotifyHandler", "RpcLimits", "ByteBudget", "should_log_count", "eager",
           "resume_stepped"]

RequestHandler = Callable[[Message], "Message | Awaitable[Message]"]
NotifyHandler = Callable[[Message], "None | Awaitable[None]"]

log = structlog.get_logger("proto.rpc")

# The hot path works on plain ints: comparing with, hashing and packing an
# IntEnum member all cost more than with the int it stands for.
_REQUEST, _REPLY, _ERROR, _NOTIFY = int(Kind.REQUEST), int(Kind.REPLY), int(Kind.ERROR), int(Kind.NOTIFY)
_REQUEST_TABLE: dict[int, tuple[MsgType, Callable[[Any], Message]]] = {
    int(t): (t, req.from_body) for t, (req, _reply) in REQUESTS.items()}
_NOTIFY_TABLE: dict[int, tuple[MsgType, type[Message]]] = {int(t): (t, cls) for t, cls in NOTIFICATIONS.items()}
_WIRE_TYPE: dict[MsgType, int] = {t: int(t) for t in MsgType}  # MsgType -> its wire int
_CALL_INFO: dict[MsgType, tuple[int, type[Message]]] = {t: (int(t), reply) for t, (_, reply) in REQUESTS.items()}
_PING = int(MsgType.PING)
_PING_TYPE = MsgType.PING
# A coalesced batch is written once it reaches either bound. Small batches
# keep both ends busy at once (the peer starts on the first frames while we
# still produce the rest); whole-window batches would make them take turns.
_CORK_MAX_FRAMES = 16
_CORK_MAX_BYTES = 64 * 1024
_TIMER_SLACK_S = 0.001
_LOG_FIRST = 10   # a peer-caused event is logged at counts 1..10, then at 100, 1000, ...
_EAGER = "_rpc_eager"
_CoroutineType = types.CoroutineType

_H = TypeVar("_H", bound=Callable[..., Any])


def eager(handler: _H) -> _H:
    """Mark a request handler whose coroutine may take its first step inside ``data_received``.

    For a handler that usually finishes without waiting (the host's lanes:
    an idle lane, a page the host has), this saves a task, its done
    callback and two loop iterations per request: the reply is written
    before ``data_received`` returns. A step that waits goes on as a task
    from where it stopped, registered like any handler's task (counted in
    the incoming bounds, answered by ``_request_done``). Only for handlers
    that neither need to be a task during their first step
    (``asyncio.current_task``, ``asyncio.timeout``) nor depend on running
    after the rest of the frames of the same read: the lock model's are
    not marked.
    """
    setattr(handler, _EAGER, True)
    return handler


@types.coroutine
def resume_stepped(coro: Any, yielded: Any) -> Any:
    """Go on with a coroutine stepped once already (``yielded``: what it waits for): awaitable, or a task's body."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:   # thrown into the task (cancelled): pass it on
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def should_log_count(n: int) -> bool:
    """Log the ``n``-th occurrence of a peer-caused event? The first few, then each power of ten."""
    return n <= _LOG_FIRST or (n >= 100 and str(n).rstrip("0") == "1")


class ByteBudget:
    """Bytes shared by many connections (e.g. every guest's requests in progress on the host).

    ``RpcConnection._room_for`` and ``_release`` do ``take`` and ``give`` inline (every request).
    """

    __slots__ = ("limit_bytes", "used_bytes", "refused")

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.refused = 0

    def take(self, n: int) -> bool:
        if self.used_bytes + n > self.limit_bytes:
            self.refused += 1
            return False
        self.used_bytes += n
        return True

    def give(self, n: int) -> None:
        self.used_bytes -= n


class RpcLimits:
    """Per-connection bounds; every queue on a connection is bounded by one of these.

    ``timeout_s`` is the default of ``call``: 0 waits for the answer as long
    as the connection lives (liveness is the heartbeat's job).
    ``max_incoming_bytes``: frame bytes of the peer's requests in progress;
    ``budget``: the same, shared with other connections. A connection with
    nothing in progress always gets one request through, so a peer is never
    starved by the others. ``decode``: what one frame may decode to (None:
    only its size bounds it; for peers we trust).
    """

    __slots__ = ("max_frame_bytes", "max_outstanding", "max_incoming", "high_water_bytes",
                 "hard_limit_bytes", "timeout_s", "max_incoming_bytes", "budget", "decode")

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT, max_outstanding: int = 256,
                 max_incoming: int = 256, high_water_bytes: int = 1 << 20,
                 hard_limit_bytes: int = 32 << 20, timeout_s: float = 0.0,
                 max_incoming_bytes: int = 16 << 20, budget: ByteBudget | None = None,
                 decode: DecodeLimits | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_outstanding = max_outstanding
        self.max_incoming = max_incoming
        self.high_water_bytes = high_water_bytes
        self.hard_limit_bytes = hard_limit_bytes
        self.timeout_s = timeout_s
        self.max_incoming_bytes = max_incoming_bytes
        self.budget = budget
        self.decode = decode

    def replace(self, **changes: Any) -> "RpcLimits":
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return RpcLimits(**values)


class RpcConnection(asyncio.Protocol):
    """One peer: framing, request ids, replies, timeouts, notifications."""

    def __init__(self, *, name: str = "peer", limits: RpcLimits | None = None,
                 requests: Mapping[MsgType, RequestHandler] | None = None,
                 notifications: Mapping[MsgType, NotifyHandler] | None = None,
                 on_close: Callable[["RpcConnection", BaseException | None], None] | None = None,
                 shared_events: dict[str, int] | None = None) -> None:
        self.name = name
        self.limits = limits or RpcLimits()
        self.requests: dict[MsgType, RequestHandler] = dict(requests or {})
        self.notifications: dict[MsgType, NotifyHandler] = dict(notifications or {})
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(self.limits.max_frame_bytes, self.limits.decode)
        self._encoder = FrameEncoder(self.limits.max_frame_bytes)
        self._encode = self._encoder.encode
        self._ids = itertools.count(1)
        # req id -> (future, request type, reply class, deadline (loop time) or None, timeout_s)
        self._pending: dict[int, tuple[asyncio.Future, MsgType, type[Message], float | None, float]] = {}
        # One timer per connection, not one per call: it fires at the
        # earliest deadline it knows of, expires what is due and re-arms.
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._timeout_at = 0.0
        # The window of our own requests: a counter and a FIFO of waiting
        # callers; cheaper than an asyncio.Semaphore on every call.
        self._in_flight = 0
        self._slot_waiters: deque[asyncio.Future] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Write coalescing ("cork"): while not None, frames collect here and
        # go out in one transport.write when the batch ends (see data_received).
        self._corked: list[bytes] | None = None
        self._corked_bytes = 0
        self._replies_delivered = 0
        self._incoming = 0
        self._incoming_bytes = 0          # frame bytes of the peer's requests in progress
        self._receiving = True            # False once we stopped listening (stop_receiving)
        self._active = False              # a message was served in the current batch (not a heartbeat, not garbage)
        self.heard_at = 0.0               # loop time the peer last sent anything
        self.active_at = 0.0              # ... anything but a heartbeat (Ping or its Pong)
        self._tasks: set[asyncio.Task] = set()
        self._can_write: asyncio.Event | None = None
        self._writable = True  # mirrors _can_write, without a method call per request
        self._closed: asyncio.Future | None = None
        self.close_exc: BaseException | None = None
        # Counted, never fatal: a peer's oddities are its problem, not ours.
        self.errors_sent = 0
        self.errors_received = 0
        self.stray_replies = 0
        self.peer_events: dict[str, int] = {}   # event name -> times this peer caused it (logged or not)
        # The same over every connection of a server, if it keeps one; logging follows this count.
        self.shared_events = shared_events

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.transport = transport  # type: ignore[assignment]
        self.heard_at = self.active_at = loop.time()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closed = loop.create_future()
        transport.set_write_buffer_limits(high=self.limits.high_water_bytes)  # type: ignore[attr-defined]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close_exc = exc
        err = PeerClosed(f"connection to {self.name} closed" + (f": {exc}" if exc else ""))
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
            self._timeout_handle = None
        for fut, *_ in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._writable = True
        if self._can_write is not None:
            self._can_write.set()  # wake drainers; they will see the closed transport
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self, exc)
        # Handlers are closures over whoever owns this connection (a session that holds the
        # connection in turn): drop them, so a closed connection is freed now, by its reference
        # count, not at some later full collection of cyclic garbage.
        self.requests = {}
        self.notifications = {}
        self._decoder = FrameDecoder(self.limits.max_frame_bytes, self.limits.decode)

    def pause_writing(self) -> None:
        assert self._can_write is not None
        self._writable = False
        self._can_write.clear()

    def resume_writing(self) -> None:
        assert self._can_write is not None
        self._writable = True
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        if not self._receiving:
            return
        now = self.heard_at = self._loop.time()  # type: ignore[union-attr]
        try:
            items = self._decoder.feed(data)
        except FrameTooLarge:
            return  # already reported when first seen; the connection is closing
        self._active = False
        if self._corked is not None:  # a batch is already collecting
            self._receive(items, self._decoder.sizes)
            if self._active:
                self.active_at = now
            return
        self._corked = []
        self._replies_delivered = 0
        try:
            self._receive(items, self._decoder.sizes)
        finally:
            if self._active:
                self.active_at = now
            if self._replies_delivered > 1 and not self.is_closing:
                # Several callers were woken: their next requests, written
                # when they run right after this callback, go out together.
                self._loop.call_soon(self._uncork)  # type: ignore[union-attr]
            else:
                corked = self._corked
                if corked:   # _flush_corked, without a call per read
                    self._corked_bytes = 0
                    self._send(corked[0] if len(corked) == 1 else b"".join(corked))
                self._corked = None

    def _receive(self, items: list[Any], sizes: list[int]) -> None:
        for item, size in zip(items, sizes):
            if not self._receiving:
                return   # we stopped listening (a refused handshake): what follows is not answered
            # Fast path for well-formed replies and requests; everything
            # else (notifications, errors, bad envelopes) goes to _dispatch.
            if type(item) is list and len(item) == 4:
                kind, req_id, raw_type, body = item
                if type(req_id) is int and type(raw_type) is int:
                    if kind == _REPLY and type(kind) is int:
                        self._on_reply(_REPLY, req_id, body)
                        continue
                    if kind == _REQUEST and type(kind) is int and req_id > 0:
                        self._on_request(req_id, raw_type, body, size)
                        continue
                self._dispatch(item, size)
                continue
            if isinstance(item, FrameTooLarge):
                self._send_error(0, 0, ErrorCode.BAD_FRAME, str(item))
                self.peer_event("frame_rejected", reason=str(item))
                self.close()
                return
            if isinstance(item, UndecodableFrame):
                self._send_error(0, 0, ErrorCode.BAD_FRAME, str(item))
                self.peer_event("frame_rejected", reason=str(item))
                continue
            self._dispatch(item, size)

    def eof_received(self) -> bool | None:
        try:
            self._decoder.check_eof()
        except TruncatedFrame as exc:
            self.peer_event("frame_rejected", reason=str(exc))
        return None  # close our side too

    def peer_event(self, event: str, level: str = "warning", **fields: Any) -> None:
        """Count an event this peer caused; log it only at counts 1-10, 100, 1000, ... (of all peers, if shared)."""
        n = self.peer_events[event] = self.peer_events.get(event, 0) + 1
        shared = self.shared_events
        if shared is not None:
            n = shared[event] = shared.get(event, 0) + 1
        if should_log_count(n):
            getattr(log, level)(event, peer=self.name, count=n, **fields)

    # --- public API ---------------------------------------------------------

    @property
    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def call(self, msg: Message, timeout_s: float | None = None) -> Message:
        """Send a request and wait for its reply; raises ``RemoteError`` on an error reply.

        At most ``limits.max_outstanding`` calls are in flight; later callers
        wait, first come first served. ``timeout_s`` (default
        ``limits.timeout_s``; 0 = none: as long as the connection lives)
        raises ``RpcTimeout``; it bounds the whole call, the wait for room in
        a full send buffer included.
        """
        transport = self.transport
        if transport is None or transport.is_closing():   # self.is_closing, without a property call per call
            raise PeerClosed(f"connection to {self.name} is closed")
        if self._in_flight < self.limits.max_outstanding and not self._slot_waiters:
            self._in_flight += 1
        else:
            await self._wait_for_slot()  # returns holding a slot
            if self.is_closing:  # it closed while we waited
                self._release_slot()
                raise PeerClosed(f"connection to {self.name} is closed")
        try:
            loop = self._loop
            assert loop is not None
            req_id = next(self._ids)
            fut = loop.create_future()
            t = self.limits.timeout_s if timeout_s is None else timeout_s
            if t > 0:
                deadline: float | None = loop.time() + t
                if self._timeout_handle is None or deadline < self._timeout_at:  # type: ignore[operator]
                    self._arm_timeouts(deadline)  # type: ignore[arg-type]
            else:
                deadline = None
            msg_type = msg.TYPE
            wire_type, reply_cls = _CALL_INFO[msg_type]
            self._pending[req_id] = (fut, msg_type, reply_cls, deadline, t)
            try:
                self._write([_REQUEST, req_id, wire_type, msg.to_body()])
                if not self._writable:
                    await self._drain_or(fut)
                return await fut
            finally:
                # Normally the reply already removed the entry. A cancelled
                # caller or a request that could not be encoded must not
                # leave it behind until its deadline.
                self._pending.pop(req_id, None)
        finally:
            if self._slot_waiters:
                self._release_slot()
            else:   # _release_slot with nobody to hand the slot to
                self._in_flight -= 1

    async def _wait_for_slot(self) -> None:
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot we will not use: pass it on
            else:
                self._slot_waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        """A call ended: hand its slot to the first live waiter, or free it."""
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot stays counted, now the waiter's
                return
        self._in_flight -= 1

    def notify(self, msg: Message) -> None:
        if self.is_closing:
            raise PeerClosed(f"connection to {self.name} is closed")
        self._write([_NOTIFY, 0, _WIRE_TYPE[msg.TYPE], msg.to_body()])

    def notify_together(self, *msgs: Message) -> None:
        """Notifications in one write, in order: the peer wakes once for all of them."""
        if self.is_closing:
            raise PeerClosed(f"connection to {self.name} is closed")
        self._send_frames([self.notification_frame(m) for m in msgs])

    def notification_frame(self, msg: Message) -> bytes:
        """``msg`` framed as ``notify`` sends it: one notification for many peers encoded once."""
        return self._encode([_NOTIFY, 0, _WIRE_TYPE[msg.TYPE], msg.to_body()])

    def notify_framed(self, msg: Message, frame: bytes, *more: Message) -> None:
        """``notify_together(msg, *more)`` with ``msg``'s frame made already (``notification_frame``, by a
        connection with the same frame limit)."""
        if self.is_closing:
            raise PeerClosed(f"connection to {self.name} is closed")
        self._send_frames([frame, *map(self.notification_frame, more)])

    def _send_frames(self, frames: list[bytes]) -> None:
        if self._corked is not None:
            self._corked.extend(frames)
            self._corked_bytes += sum(len(f) for f in frames)
        else:
            self._send(frames[0] if len(frames) == 1 else b"".join(frames))

    async def _drain_or(self, fut: asyncio.Future) -> None:
        """Wait for room in the send buffer, or until ``fut`` is done (answered, timed out, closed)."""
        assert self._can_write is not None
        room = asyncio.ensure_future(self._can_write.wait())
        try:
            await asyncio.wait((room, fut), return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()

    async def drain(self) -> None:
        """Wait until the send buffer is below its high-water mark."""
        assert self._can_write is not None
        await self._can_write.wait()
        if self.is_closing and self._closed is not None and self._closed.done():
            raise PeerClosed(f"connection to {self.name} closed while draining")

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests and fuzzers use it to send bad frames)."""
        assert self.transport is not None
        self._flush_corked()
        self.transport.write(data)

    def stop_receiving(self) -> None:
        """Read nothing more from the peer, not even frames already received; then ``close``.

        After a refusal (a bad handshake) whatever the peer pipelined behind
        it must not be answered.
        """
        self._receiving = False
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.pause_reading()
            except RuntimeError:
                pass

    def close(self) -> None:
        """Close after everything written so far has been sent."""
        if self.transport is not None and not self.transport.is_closing():
            self._flush_corked()
            self.transport.close()

    def abort(self) -> None:
        """Close at once, discarding what is not sent yet."""
        self._corked = None
        self._corked_bytes = 0
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    @property
    def incoming_bytes(self) -> int:
        """Frame bytes of the peer's requests we are still working on."""
        return self._incoming_bytes

    # --- internals ----------------------------------------------------------

    def _write(self, envelope: list[Any]) -> None:
        frame = self._encode(envelope)
        corked = self._corked
        if corked is None:
            self._send(frame)
            return
        # One transport.write per batch instead of one per frame: a write is
        # a system call. Bounded, so flow control still sees the bytes soon.
        corked.append(frame)
        self._corked_bytes += len(frame)
        if len(corked) >= _CORK_MAX_FRAMES or self._corked_bytes >= _CORK_MAX_BYTES:
            self._flush_corked()

    def _uncork(self) -> None:
        self._flush_corked()
        self._corked = None

    def _flush_corked(self) -> None:
        corked = self._corked
        if corked:
            data = corked[0] if len(corked) == 1 else b"".join(corked)
            corked.clear()
            self._corked_bytes = 0
            self._send(data)

    def _send(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return  # aborted meanwhile (hard limit, peer gone): nothing more goes out
        transport.write(data)
        if transport.get_write_buffer_size() > self.limits.hard_limit_bytes:
            self.peer_event("peer_disconnected",
                            reason=f"send buffer above {self.limits.hard_limit_bytes} bytes: peer is not reading")
            transport.abort()

    def _send_error(self, req_id: int, msg_type: int, code: int, message: str) -> None:
        if self.is_closing:
            return
        self.errors_sent += 1
        self._write([_ERROR, req_id, int(msg_type), {"code": int(code), "message": message}])

    def _arm_timeouts(self, when: float) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        assert self._loop is not None
        self._timeout_at = when
        self._timeout_handle = self._loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        """Fail every call past its deadline with ``RpcTimeout``; re-arm for the next one.

        It scans the pending calls (at most ``max_outstanding``), and runs
        once per earliest deadline, not once per call.
        """
        self._timeout_handle = None
        # Timers may fire up to a clock tick early (uvloop rounds to ms);
        # without the slack that would re-arm for "now" and spin.
        now = self._loop.time() + _TIMER_SLACK_S  # type: ignore[union-attr]
        due = [req_id for req_id, e in self._pending.items() if e[3] is not None and e[3] <= now]
        for req_id in due:
            fut, msg_type, _, _, timeout_s = self._pending.pop(req_id)
            if not fut.done():
                fut.set_exception(RpcTimeout(msg_type.name.lower(), timeout_s))
        later = [e[3] for e in self._pending.values() if e[3] is not None]
        if later:
            self._arm_timeouts(min(later))

    def _dispatch(self, item: Any, size: int = 0) -> None:
        """Route one decoded frame, or answer why it is not a valid envelope."""
        if type(item) is not list or len(item) != 4:
            self._send_error(0, 0, ErrorCode.BAD_FRAME, "envelope must be an array [kind, id, type, body]")
            return
        kind, req_id, raw_type, body = item
        if type(req_id) is not int or type(raw_type) is not int or type(kind) is not int:
            self._send_error(0, 0, ErrorCode.BAD_FRAME, "envelope kind, id and type must be integers")
            return
        if kind == _REQUEST:
            if req_id <= 0:  # id 0 marks errors tied to no request; a reply to it would be lost
                self._send_error(0, raw_type, ErrorCode.BAD_FRAME, f"request id must be >= 1, got {req_id}")
                return
            self._on_request(req_id, raw_type, body, size)
        elif kind == _REPLY or kind == _ERROR:
            self._on_reply(kind, req_id, body)
        elif kind == _NOTIFY:
            self._on_notify(raw_type, body, size)
        else:
            self._send_error(req_id, raw_type, ErrorCode.BAD_FRAME, f"unknown envelope kind {kind}")

    def _room_for(self, size: int) -> str | None:
        """Why a request of ``size`` frame bytes cannot be taken on now, or None (and it is charged)."""
        limits = self.limits
        incoming = self._incoming
        if incoming >= limits.max_incoming:
            return f"more than {limits.max_incoming} requests outstanding"
        if incoming:   # one request at a time always gets through
            if self._incoming_bytes + size > limits.max_incoming_bytes:
                return (f"requests in progress hold {self._incoming_bytes} bytes; {size} more would pass "
                        f"this connection's {limits.max_incoming_bytes}")
        budget = limits.budget
        if budget is not None:
            if budget.used_bytes + size <= budget.limit_bytes:   # budget.take(size), without a call per request
                budget.used_bytes += size
            else:
                budget.refused += 1
                if incoming:
                    return (f"requests in progress on every connection hold {budget.used_bytes} bytes; {size} "
                            f"more would pass the {budget.limit_bytes} they share")
                budget.used_bytes += size   # the one request every connection may have
        self._incoming_bytes += size
        return None

    def _release(self, size: int) -> None:
        self._incoming_bytes -= size
        budget = self.limits.budget
        if budget is not None:
            budget.used_bytes -= size   # budget.give(size)

    def _on_request(self, req_id: int, raw_type: int, body: Any, size: int = 0) -> None:
        entry = _REQUEST_TABLE.get(raw_type)
        if entry is None:
            self._send_error(req_id, raw_type, ErrorCode.UNKNOWN_TYPE, f"unknown request type {raw_type}")
            return
        msg_type, decode = entry
        handler = self.requests.get(msg_type)
        if handler is None:
            self._send_error(req_id, raw_type, self._refusal_code(msg_type),
                             f"{msg_type.name.lower()} is not accepted here now")
            return
        full = self._room_for(size)
        if full is not None:
            self._send_error(req_id, raw_type, ErrorCode.OVERLOADED, full)
            return
        try:
            msg = decode(body)
        except MessageError as exc:
            self._release(size)
            self._send_error(req_id, raw_type, exc.code, str(exc))
            return
        if raw_type != _PING:
            self._active = True
        try:
            result = handler(msg)
        except Exception as exc:
            self._release(size)
            self._reply_exception(req_id, raw_type, exc)
            return
        if isinstance(result, Message):  # a plain handler: answer now, no task
            self._release(size)
            self._reply(req_id, raw_type, result)
        elif type(result) is _CoroutineType and getattr(handler, _EAGER, False):
            self._start_eager(req_id, raw_type, result, size)
        elif inspect.isawaitable(result):
            self._incoming += 1
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._request_done, req_id=req_id, raw_type=raw_type,
                                                     size=size))
        else:
            self._release(size)
            self._reply(req_id, raw_type, result)

    def _start_eager(self, req_id: int, raw_type: int, coro: Any, size: int) -> None:
        """Run an ``eager`` handler's coroutine to its first wait; only then, if it waits, make it a task."""
        # In a context of its own, as a task would have: what it sets must not leak into the loop's.
        ctx = contextvars.copy_context()
        try:
            yielded = ctx.run(coro.send, None)
        except StopIteration as stop:
            self._release(size)
            self._reply(req_id, raw_type, stop.value)
            return
        except asyncio.CancelledError:
            self._release(size)
            self._send_error(req_id, raw_type, ErrorCode.SHUTTING_DOWN, "request cancelled")
            return
        except Exception as exc:
            self._release(size)
            self._reply_exception(req_id, raw_type, exc)
            return
        self._incoming += 1
        task = self._loop.create_task(resume_stepped(coro, yielded), context=ctx)  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._request_done, req_id=req_id, raw_type=raw_type, size=size))

    def _refusal_code(self, msg_type: MsgType) -> ErrorCode:
        # Before the handshake only HELLO is accepted; later, a type that
        # only the other direction serves is unknown to this side.
        if MsgType.HELLO in self.requests:
            return ErrorCode.NOT_AUTHENTICATED
        return ErrorCode.UNKNOWN_TYPE

    def _request_done(self, task: asyncio.Task, req_id: int, raw_type: int, size: int = 0) -> None:
        self._tasks.discard(task)
        self._incoming -= 1
        self._release(size)
        if task.cancelled():
            self._send_error(req_id, raw_type, ErrorCode.SHUTTING_DOWN, "request cancelled")
            return
        exc = task.exception()
        if exc is not None:
            self._reply_exception(req_id, raw_type, exc)
        else:
            self._reply(req_id, raw_type, task.result())

    def _reply(self, req_id: int, raw_type: int, result: Message) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():   # self.is_closing, without a property call per reply
            return
        if not isinstance(result, Message):
            # A handler bug; answered as one instead of failing data_received,
            # which would take the whole connection down.
            self._reply_exception(req_id, raw_type, TypeError(
                f"handler for type {raw_type} returned {type(result).__name__}, not a Message"))
            return
        try:
            self._write([_REPLY, req_id, raw_type, result.to_body()])
        except ProtoError as exc:
            self._reply_exception(req_id, raw_type, exc)

    def _reply_exception(self, req_id: int, raw_type: int, exc: BaseException) -> None:
        code = getattr(exc, "code", None)
        if isinstance(code, int) and not isinstance(code, bool):
            self._send_error(req_id, raw_type, code, str(exc))
            return
        self.peer_event("request_failed", level="error", msg_type=raw_type,
                        exc_info=(type(exc), exc, exc.__traceback__))
        self._send_error(req_id, raw_type, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _on_reply(self, kind: int, req_id: int, body: Any) -> None:
        entry = self._pending.pop(req_id, None)
        if entry is None:
            if kind == _ERROR:
                self.errors_received += 1
                self._log_peer_error(body)
            else:
                self.stray_replies += 1
            return
        fut, msg_type, reply_cls, _, _ = entry
        if msg_type is not _PING_TYPE:
            self._active = True
        if fut.done():
            return
        if kind == _ERROR:
            self.errors_received += 1
            if type(body) is dict and type(body.get("code")) is int:
                fut.set_exception(RemoteError(body["code"], str(body.get("message", ""))))
            else:
                fut.set_exception(RemoteError(ErrorCode.BAD_FRAME, f"malformed error reply {body!r:.200}"))
            return
        self._replies_delivered += 1
        try:
            fut.set_result(reply_cls.from_body(body))
        except MessageError as exc:
            fut.set_exception(exc)

    def _log_peer_error(self, body: Any) -> None:
        self.peer_event("peer_error", body=repr(body)[:300])

    def _on_notify(self, raw_type: int, body: Any, size: int = 0) -> None:
        entry = _NOTIFY_TABLE.get(raw_type)
        if entry is None:
            self._send_error(0, raw_type, ErrorCode.UNKNOWN_TYPE, f"unknown notification type {raw_type}")
            return
        msg_type, cls = entry
        handler = self.notifications.get(msg_type)
        if handler is None:
            self._send_error(0, raw_type, self._refusal_code(msg_type),
                             f"{msg_type.name.lower()} is not accepted here now")
            return
        try:
            msg = cls.from_body(body)
        except MessageError as exc:
            self._send_error(0, raw_type, exc.code, str(exc))
            return
        self._active = True
        try:
            result = handler(msg)
        except Exception as exc:
            self._reply_exception(0, raw_type, exc)
            return
        if result is not None and inspect.isawaitable(result):
            # Async notification handlers share the incoming bounds with
            # requests: a peer flooding notifications cannot start unbounded tasks.
            full = self._room_for(size)
            if full is not None:
                if inspect.iscoroutine(result):
                    result.close()
                self._send_error(0, raw_type, ErrorCode.OVERLOADED, full + " (requests and notifications)")
                return
            self._incoming += 1
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(lambda t, r=raw_type, n=size: self._notify_done(t, r, n))

    def _notify_done(self, task: asyncio.Task, raw_type: int, size: int = 0) -> None:
        self._tasks.discard(task)
        self._incoming -= 1
        self._release(size)
        if not task.cancelled() and task.exception() is not None:
            self._reply_exception(0, raw_type, task.exception())  # type: ignore[arg-type]
