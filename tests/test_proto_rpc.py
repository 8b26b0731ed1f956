"""RPC over real sockets: every test body runs over both Unix and TCP.

A ``Pair`` is one server-side and one client-side ``RpcConnection`` joined
by a real socket. Tests that must speak bytes the RPC layer would never
produce use a ``RawPeer`` (asyncio streams + ``FrameDecoder``) instead, and
assert the exact envelope the peer receives. Nothing here sleeps to wait for
something: it waits on events or with ``wait_until``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from balloonlab.proto import handshake
from balloonlab.proto.errors import (ErrorCode, FrameTooLarge, HandshakeRefused, PeerClosed, RemoteError,
                          RpcTimeout)
from balloonlab.proto.framing import FrameDecoder, encode_frame
from balloonlab.proto.handshake import PROTOCOL_VERSION, HandshakeError, check_hello, client_hello, guest_token, new_token
from balloonlab.proto.messages import (Hello, Kind, MsgType, Ping, Pong, RunEnd, TickDone, TickStart,
                            Welcome)
from balloonlab.proto.rpc import RpcConnection, RpcLimits
from balloonlab.proto.transport import Address, connect, serve

from .conftest import wait_until

pytestmark = [pytest.mark.usefixtures("loop_errors"), pytest.mark.timeout(30)]

REQ, REPLY, ERROR, NOTIFY = (int(k) for k in Kind)
CALL_TIMEOUT_S = 5.0  # so that a broken feature fails a test quickly instead of hanging it
PING = int(MsgType.PING)


# --- fixtures and helpers ----------------------------------------------------

@pytest.fixture(params=["unix", "tcp"])
def address(request: pytest.FixtureRequest, sock_dir: Path) -> Address:
    if request.param == "unix":
        return Address("unix", path=str(sock_dir / "rpc.sock"))
    return Address("tcp", host="127.0.0.1", port=0)


def pong(msg: Ping) -> Pong:
    return Pong(msg.payload)


@dataclass
class Pair:
    client: RpcConnection
    server: RpcConnection
    address: Address


@dataclass
class Server:
    address: Address
    conns: list[RpcConnection] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serving(address: Address, setup: Callable[[RpcConnection], None] | None = None,
                  **server_kw: Any) -> AsyncIterator[Server]:
    """A listening server whose every connection is an ``RpcConnection(**server_kw)``, then ``setup(conn)``."""
    made: list[RpcConnection] = []

    server_kw.setdefault("limits", RpcLimits(timeout_s=CALL_TIMEOUT_S))

    def factory() -> RpcConnection:
        conn = RpcConnection(name="server", **server_kw)
        if setup is not None:
            setup(conn)
        made.append(conn)
        return conn

    srv, bound = await serve(address, factory)
    try:
        yield Server(bound, made)
    finally:
        srv.close()
        for conn in made:
            conn.abort()
        for conn in made:
            await asyncio.wait_for(conn.wait_closed(), 5)
        await asyncio.wait_for(srv.wait_closed(), 5)


@contextlib.asynccontextmanager
async def rpc_pair(address: Address, server: dict[str, Any] | None = None,
                   client: dict[str, Any] | None = None) -> AsyncIterator[Pair]:
    async with serving(address, **(server or {})) as srv:
        client_kw = {"limits": RpcLimits(timeout_s=CALL_TIMEOUT_S)} | (client or {})
        cli = await connect(srv.address, lambda: RpcConnection(name="client", **client_kw))
        assert isinstance(cli, RpcConnection)
        try:
            await wait_until(lambda: srv.conns and srv.conns[0].transport is not None, 5, "server side accepted")
            yield Pair(cli, srv.conns[0], srv.address)
        finally:
            cli.abort()
            await asyncio.wait_for(cli.wait_closed(), 5)


class RawPeer:
    """A client that writes arbitrary bytes and reads raw envelopes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.frames: list[Any] = []

    @classmethod
    async def open(cls, address: Address) -> "RawPeer":
        if address.scheme == "unix":
            r, w = await asyncio.open_unix_connection(address.path)
        else:
            r, w = await asyncio.open_connection(address.host, address.port)
        return cls(r, w)

    def send(self, obj: Any) -> None:
        self.writer.write(encode_frame(obj))

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout_s: float = 5.0) -> Any:
        """The next frame; fails on EOF."""
        async def next_frame() -> Any:
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("peer closed before sending a frame")
                self.frames.extend(self.decoder.feed(data))
            return self.frames.pop(0)
        return await asyncio.wait_for(next_frame(), timeout_s)

    async def closed_by_peer(self, timeout_s: float = 5.0) -> bool:
        """Read to EOF (discarding frames); True once the peer closed."""
        async def drain_to_eof() -> bool:
            while await self.reader.read(65536):
                pass
            return True
        return await asyncio.wait_for(drain_to_eof(), timeout_s)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_peer(address: Address, **server_kw: Any) -> AsyncIterator[tuple[RawPeer, Server]]:
    server_kw.setdefault("requests", {MsgType.PING: pong})
    async with serving(address, **server_kw) as srv:
        peer = await RawPeer.open(srv.address)
        await wait_until(lambda: srv.conns and srv.conns[0].transport is not None, 5, "server side accepted")
        try:
            yield peer, srv
        finally:
            await peer.close()


async def ping_roundtrip(peer: RawPeer, req_id: int, payload: bytes = b"hi") -> None:
    """The connection still works: a good request gets its reply."""
    peer.send([REQ, req_id, PING, {"payload": payload}])
    assert await peer.recv() == [REPLY, req_id, PING, {"payload": payload}]


class CodedError(Exception):
    """A handler error that chooses its wire code, as hostd's errors do."""

    code = ErrorCode.NOT_OWNER


# --- request / reply ---------------------------------------------------------

async def test_request_and_reply_both_ways(address: Address) -> None:
    async with rpc_pair(address, server={"requests": {MsgType.PING: pong}},
                        client={"requests": {MsgType.PING: pong}}) as p:
        reply = await p.client.call(Ping(b"from client"))
        assert reply == Pong(b"from client")
        reply = await p.server.call(Ping(b"from server"))
        assert reply == Pong(b"from server")
        assert p.client.outstanding == 0 and p.server.outstanding == 0


async def test_async_handler_reply(address: Address) -> None:
    async def slow_pong(msg: Ping) -> Pong:
        await asyncio.sleep(0)
        return Pong(msg.payload[::-1])

    async with rpc_pair(address, server={"requests": {MsgType.PING: slow_pong}}) as p:
        assert await p.client.call(Ping(b"abc")) == Pong(b"cba")


async def test_wire_envelope_of_request_and_reply(address: Address) -> None:
    """What a peer in another language sees: ``[0, id, 60, {payload}]`` -> ``[1, id, 60, {payload}]``."""
    async with raw_peer(address) as (peer, _):
        peer.send_bytes(bytes.fromhex("00000012" "9400093c81a77061796c6f6164c40378797a"))
        reply = await asyncio.wait_for(peer.reader.readexactly(4 + 18), 5)
        assert reply == bytes.fromhex("00000012" "9401093c81a77061796c6f6164c40378797a")


async def test_many_outstanding_requests_both_ways_at_once(address: Address) -> None:
    """500 concurrent calls each way; at least 100 are in a handler at the same time on each side."""
    n, together = 500, 100

    class Side:
        def __init__(self) -> None:
            self.active = 0
            self.peak = 0
            self.gate = asyncio.Event()

        async def handle(self, msg: Ping) -> Pong:
            self.active += 1
            self.peak = max(self.peak, self.active)
            if self.active >= together:
                self.gate.set()
            await self.gate.wait()
            self.active -= 1
            return Pong(msg.payload)

    s, c = Side(), Side()
    async with rpc_pair(address, server={"requests": {MsgType.PING: s.handle}},
                        client={"requests": {MsgType.PING: c.handle}}) as p:
        calls = [p.client.call(Ping(b"c%d" % i)) for i in range(n)]
        calls += [p.server.call(Ping(b"s%d" % i)) for i in range(n)]
        replies = await asyncio.wait_for(asyncio.gather(*calls), 20)
    assert [r.payload for r in replies] == [b"c%d" % i for i in range(n)] + [b"s%d" % i for i in range(n)]
    assert s.peak >= together and c.peak >= together
    # Our window (max_outstanding) matches the peer's max_incoming: never OVERLOADED.
    assert s.peak <= 256 and c.peak <= 256


async def test_outstanding_calls_are_bounded_by_max_outstanding(address: Address) -> None:
    gate = asyncio.Event()
    seen = 0

    async def held(msg: Ping) -> Pong:
        nonlocal seen
        seen += 1
        await gate.wait()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: held}},
                        client={"limits": RpcLimits(max_outstanding=4, timeout_s=CALL_TIMEOUT_S)}) as p:
        calls = [asyncio.ensure_future(p.client.call(Ping(b"%d" % i))) for i in range(10)]
        await wait_until(lambda: seen == 4, 5, "4 requests reached the server")
        assert p.client.outstanding == 4
        for _ in range(20):  # the other 6 stay queued on our side
            await asyncio.sleep(0)
        assert seen == 4
        gate.set()
        assert len(await asyncio.wait_for(asyncio.gather(*calls), 5)) == 10
        assert seen == 10


async def test_a_caller_cancelled_while_waiting_for_a_slot_gives_nothing_away(address: Address) -> None:
    gate = asyncio.Event()
    seen = 0

    async def held(msg: Ping) -> Pong:
        nonlocal seen
        seen += 1
        await gate.wait()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: held}},
                        client={"limits": RpcLimits(max_outstanding=1, timeout_s=CALL_TIMEOUT_S)}) as p:
        first = asyncio.ensure_future(p.client.call(Ping(b"1")))
        waiting = [asyncio.ensure_future(p.client.call(Ping(b"w%d" % i))) for i in range(3)]
        await wait_until(lambda: seen == 1, 5)
        waiting[0].cancel()  # cancelled while queued for the slot
        last = asyncio.ensure_future(p.client.call(Ping(b"last")))
        for _ in range(5):
            await asyncio.sleep(0)
        waiting[1].cancel()
        gate.set()
        assert (await first).payload == b"1"
        assert (await asyncio.wait_for(waiting[2], 5)).payload == b"w2"
        assert (await asyncio.wait_for(last, 5)).payload == b"last"
        for w in waiting[:2]:
            assert w.cancelled()
        assert seen == 3  # 1, w2, last: the cancelled callers never sent anything
        # Every slot came back: a full window of calls goes through again.
        assert [r.payload for r in await asyncio.gather(*(p.client.call(Ping(b"%d" % i)) for i in range(3)))] \
            == [b"0", b"1", b"2"]


async def test_callers_waiting_for_a_slot_get_peer_closed(address: Address) -> None:
    gate = asyncio.Event()

    async def held(msg: Ping) -> Pong:
        await gate.wait()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: held}},
                        client={"limits": RpcLimits(max_outstanding=1, timeout_s=CALL_TIMEOUT_S)}) as p:
        calls = [asyncio.ensure_future(p.client.call(Ping(b""))) for _ in range(3)]
        await wait_until(lambda: p.client.outstanding == 1, 5)
        p.client.close()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert [type(r) for r in results] == [PeerClosed] * 3
        gate.set()


# --- timeouts ----------------------------------------------------------------

async def test_timeout_raises_and_the_late_reply_is_counted_as_stray(address: Address) -> None:
    release = asyncio.Event()
    answered = asyncio.Event()

    async def late(msg: Ping) -> Pong:
        await release.wait()
        answered.set()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: late}}) as p:
        with pytest.raises(RpcTimeout) as info:
            await p.client.call(Ping(b"x"), timeout_s=0.05)
        assert isinstance(info.value, TimeoutError)
        assert info.value.msg_type == "ping" and info.value.timeout_s == 0.05
        assert p.client.outstanding == 0
        release.set()
        await wait_until(lambda: p.client.stray_replies == 1, 5, "late reply arrived")
        # The connection is unharmed.
        assert await p.client.call(Ping(b"y"), timeout_s=5) == Pong(b"y")


async def test_each_call_times_out_on_its_own_deadline(address: Address) -> None:
    """Short and long timeouts mixed, armed in either order; an answered call's deadline fires nothing."""
    gate = asyncio.Event()

    async def handler(msg: Ping) -> Pong:
        if msg.payload != b"quick":
            await gate.wait()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: handler}}) as p:
        loop = asyncio.get_running_loop()
        assert await p.client.call(Ping(b"quick"), timeout_s=0.05) == Pong(b"quick")  # its deadline passes unused
        long = asyncio.ensure_future(p.client.call(Ping(b"long"), timeout_s=20))
        t0 = loop.time()
        with pytest.raises(RpcTimeout):
            await p.client.call(Ping(b"short"), timeout_s=0.2)
        assert 0.19 <= loop.time() - t0 < 2.0
        t0 = loop.time()
        with pytest.raises(RpcTimeout):
            await p.client.call(Ping(b"shorter"), timeout_s=0.05)
        assert 0.04 <= loop.time() - t0 < 2.0
        assert not long.done() and p.client.outstanding == 1
        gate.set()
        assert await asyncio.wait_for(long, 5) == Pong(b"long")
        await wait_until(lambda: p.client.stray_replies == 2, 5, "late replies to the timed-out calls")


async def test_default_timeout_comes_from_limits(address: Address) -> None:
    gate = asyncio.Event()

    async def held(msg: Ping) -> Pong:
        await gate.wait()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: held}},
                        client={"limits": RpcLimits(timeout_s=0.05)}) as p:
        with pytest.raises(RpcTimeout, match="no reply to ping within 0.05 s"):
            await p.client.call(Ping(b""))
        gate.set()


async def test_cancelled_call_leaves_nothing_pending(address: Address) -> None:
    gate = asyncio.Event()

    async def held(msg: Ping) -> Pong:
        await gate.wait()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: held}}) as p:
        task = asyncio.ensure_future(p.client.call(Ping(b"x"), timeout_s=30))
        await wait_until(lambda: p.client.outstanding == 1, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert p.client.outstanding == 0
        gate.set()
        await wait_until(lambda: p.client.stray_replies == 1, 5, "reply to the cancelled call")


async def test_a_request_too_large_to_send_raises_and_leaves_nothing_pending(address: Address) -> None:
    async with rpc_pair(address, server={"requests": {MsgType.PING: pong}},
                        client={"limits": RpcLimits(max_frame_bytes=1024, timeout_s=CALL_TIMEOUT_S)}) as p:
        with pytest.raises(FrameTooLarge):
            await p.client.call(Ping(b"x" * 2000))
        assert p.client.outstanding == 0
        assert await p.client.call(Ping(b"small")) == Pong(b"small")


# --- error replies -----------------------------------------------------------

async def test_handler_error_with_code_is_sent_back_with_code_and_message(address: Address) -> None:
    def refuse(msg: Ping) -> Pong:
        raise CodedError("gpfn 7 belongs to guest 2")

    async def refuse_later(msg: Ping) -> Pong:
        await asyncio.sleep(0)
        raise CodedError("block 9 belongs to guest 3")

    for handler, text in ((refuse, "gpfn 7 belongs to guest 2"), (refuse_later, "block 9 belongs to guest 3")):
        async with rpc_pair(address, server={"requests": {MsgType.PING: handler}}) as p:
            with pytest.raises(RemoteError) as info:
                await p.client.call(Ping(b""))
            assert info.value.code == ErrorCode.NOT_OWNER and info.value.message == text
            assert str(info.value) == f"NOT_OWNER: {text}"
            assert p.client.errors_received == 1 and p.server.errors_sent == 1


async def test_plain_exception_becomes_internal_and_is_logged(address: Address) -> None:
    def buggy(msg: Ping) -> Pong:
        raise ValueError("boom")

    async with rpc_pair(address, server={"requests": {MsgType.PING: buggy}}) as p:
        with capture_logs() as logs:
            with pytest.raises(RemoteError) as info:
                await p.client.call(Ping(b""))
    assert info.value.code == ErrorCode.INTERNAL
    assert info.value.message == "ValueError: boom"
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["request_failed"]


async def test_a_handler_returning_no_message_gets_internal_and_the_connection_lives(address: Address) -> None:
    async with rpc_pair(address, server={"requests": {MsgType.PING: lambda m: None}}) as p:
        with capture_logs():
            with pytest.raises(RemoteError) as info:
                await p.client.call(Ping(b""))
            assert info.value.code == ErrorCode.INTERNAL and "NoneType" in info.value.message
            with pytest.raises(RemoteError):
                await p.client.call(Ping(b""))


async def test_unknown_request_type_gets_unknown_type(address: Address) -> None:
    async with raw_peer(address) as (peer, _):
        peer.send([REQ, 5, 999, {}])
        kind, req_id, typ, body = await peer.recv()
        assert (kind, req_id, typ, body["code"]) == (ERROR, 5, 999, ErrorCode.UNKNOWN_TYPE)
        assert "999" in body["message"]
        # A known type that this side does not serve is unknown here too.
        peer.send([REQ, 6, int(MsgType.INVALIDATE), {"gpfns": b""}])
        assert (await peer.recv())[:3] == [ERROR, 6, int(MsgType.INVALIDATE)]
        await ping_roundtrip(peer, 7)


async def test_unserved_request_through_rpc_gets_unknown_type(address: Address) -> None:
    async with rpc_pair(address) as p:  # the server serves nothing
        with pytest.raises(RemoteError) as info:
            await p.client.call(Ping(b""))
        assert info.value.code == ErrorCode.UNKNOWN_TYPE


async def test_bad_field_gets_bad_field_naming_the_field(address: Address) -> None:
    async with raw_peer(address) as (peer, _):
        peer.send([REQ, 3, PING, {"payload": "not bin"}])
        kind, req_id, typ, body = await peer.recv()
        assert (kind, req_id, typ, body["code"]) == (ERROR, 3, PING, ErrorCode.BAD_FIELD)
        assert body["message"] == "Ping.payload: expected bin, got str"
        peer.send([REQ, 4, PING, {"payload": b"", "extra": 1}])
        assert (await peer.recv())[3]["message"] == "Ping.extra: unknown field"
        await ping_roundtrip(peer, 5)


async def test_garbage_gets_bad_frame_with_id_0_and_the_connection_still_works(address: Address) -> None:
    async with raw_peer(address) as (peer, srv):
        peer.send_bytes(b"\x00\x00\x00\x03\xc1\xc1\xc1")   # a frame whose body is not msgpack
        err = await peer.recv()
        assert err[:3] == [ERROR, 0, 0] and err[3]["code"] == ErrorCode.BAD_FRAME
        assert "not valid msgpack" in err[3]["message"]
        await ping_roundtrip(peer, 1)
        for bad in ({"kind": 0}, [0, 1, 60], [0, "1", 60, {}], [0, 1, 60.0, {}], [True, 1, 60, {}]):
            peer.send(bad)
            err = await peer.recv()
            assert err[:3] == [ERROR, 0, 0] and err[3]["code"] == ErrorCode.BAD_FRAME, bad
        peer.send([7, 2, PING, {}])  # unknown envelope kind: tied to its id
        assert (await peer.recv())[:2] == [ERROR, 2]
        await ping_roundtrip(peer, 3)
        assert srv.conns[0].errors_sent == 7


async def test_request_id_0_is_refused(address: Address) -> None:
    async with raw_peer(address) as (peer, _):
        peer.send([REQ, 0, PING, {"payload": b""}])
        err = await peer.recv()
        assert err[:3] == [ERROR, 0, PING] and err[3]["code"] == ErrorCode.BAD_FRAME
        peer.send([REQ, -5, PING, {"payload": b""}])
        assert (await peer.recv())[3]["message"] == "request id must be >= 1, got -5"
        await ping_roundtrip(peer, 1)


async def test_oversized_frame_gets_bad_frame_then_the_connection_closes(address: Address) -> None:
    """Only the 4-byte header of a 100 MiB frame is sent; the server must not wait for the body."""
    async with raw_peer(address, limits=RpcLimits(max_frame_bytes=1024)) as (peer, srv):
        await ping_roundtrip(peer, 1)
        with capture_logs() as logs:
            peer.send_bytes(struct.pack(">I", 100 * 1024 * 1024))
            err = await peer.recv()
            assert err[:3] == [ERROR, 0, 0] and err[3]["code"] == ErrorCode.BAD_FRAME
            assert "104857600 bytes exceeds the maximum of 1024" in err[3]["message"]
            assert await peer.closed_by_peer()
            await asyncio.wait_for(srv.conns[0].wait_closed(), 5)
        assert [e["event"] for e in logs] == ["frame_rejected"]


async def test_truncated_frame_at_eof_is_logged(address: Address) -> None:
    async with raw_peer(address) as (peer, srv):
        with capture_logs() as logs:
            peer.send_bytes(encode_frame([REQ, 1, PING, {"payload": b"abc"}])[:9])
            peer.writer.write_eof()
            await asyncio.wait_for(srv.conns[0].wait_closed(), 5)
        assert [(e["event"], "connection closed after 9 of" in e["reason"]) for e in logs] == [("frame_rejected", True)]


async def test_error_replies_without_a_request_are_counted_not_fatal(address: Address) -> None:
    async with raw_peer(address) as (peer, srv):
        with capture_logs() as logs:
            peer.send([ERROR, 0, 0, {"code": 1, "message": "you sent garbage"}])
            peer.send([REPLY, 77, PING, {"payload": b""}])  # a reply to nothing
            await ping_roundtrip(peer, 1)
        conn = srv.conns[0]
        assert conn.errors_received == 1 and conn.stray_replies == 1
        assert [e["event"] for e in logs] == ["peer_error"]


async def test_malformed_error_reply_fails_the_call_with_bad_frame(address: Address) -> None:
    async with raw_peer(address) as (peer, srv):
        call = asyncio.ensure_future(srv.conns[0].call(Ping(b"")))
        kind, req_id, typ, _ = await peer.recv()
        assert (kind, typ) == (REQ, PING)
        peer.send([ERROR, req_id, PING, "not a map"])
        with pytest.raises(RemoteError) as info:
            await call
        assert info.value.code == ErrorCode.BAD_FRAME


async def test_bad_reply_body_fails_the_call_with_bad_field(address: Address) -> None:
    async with raw_peer(address) as (peer, srv):
        call = asyncio.ensure_future(srv.conns[0].call(Ping(b"")))
        _, req_id, _, _ = await peer.recv()
        peer.send([REPLY, req_id, PING, {"payload": 5}])
        with pytest.raises(Exception, match="Pong.payload: expected bin, got int") as info:
            await call
        assert getattr(info.value, "code", None) == ErrorCode.BAD_FIELD


# --- notifications -----------------------------------------------------------

async def test_notifications_arrive_in_order_without_reply(address: Address) -> None:
    got: list[Any] = []
    done = asyncio.Event()

    async def on_run_end(msg: RunEnd) -> None:
        await asyncio.sleep(0)
        got.append(msg)
        done.set()

    async with rpc_pair(address, client={"notifications": {MsgType.TICK_START: got.append,
                                                           MsgType.RUN_END: on_run_end}}) as p:
        for tick in range(5):
            p.server.notify(TickStart(tick, tick * 10_000.0, 10_000))
        p.server.notify(RunEnd("completed", 5))
        await asyncio.wait_for(done.wait(), 5)
        assert got == [TickStart(t, t * 10_000.0, 10_000) for t in range(5)] + [RunEnd("completed", 5)]
        assert p.server.errors_received == 0 and p.client.errors_sent == 0


async def test_a_notification_framed_once_arrives_as_one_sent_each_time(address: Address) -> None:
    """The host frames a tick's TickStart once for every guest (``notification_frame``) and sends it alone or
    ahead of others in one write (``notify_framed``): the peer gets exactly what ``notify`` and
    ``notify_together`` would have sent."""
    got: list[Any] = []
    done = asyncio.Event()

    async def on_run_end(msg: RunEnd) -> None:
        got.append(msg)
        done.set()

    async with rpc_pair(address, client={"notifications": {MsgType.TICK_START: got.append,
                                                           MsgType.RUN_END: on_run_end}}) as p:
        start = TickStart(3, 30_000.0, 10_000)
        frame = p.server.notification_frame(start)
        p.server.notify_framed(start, frame)
        p.server.notify_framed(start, frame, TickStart(4, 40_000.0, 10_000), RunEnd("completed", 5))
        await asyncio.wait_for(done.wait(), 5)
        assert got == [start, start, TickStart(4, 40_000.0, 10_000), RunEnd("completed", 5)]
        assert p.server.errors_received == 0 and p.client.errors_sent == 0


async def test_bad_or_unserved_notification_gets_error_with_id_0(address: Address) -> None:
    async with raw_peer(address, notifications={MsgType.TICK_DONE: lambda m: None}) as (peer, _):
        peer.send([NOTIFY, 0, int(MsgType.TICK_DONE), {"tick": -1}])
        err = await peer.recv()
        assert err[:3] == [ERROR, 0, int(MsgType.TICK_DONE)] and err[3]["code"] == ErrorCode.BAD_FIELD
        peer.send([NOTIFY, 0, 999, {}])
        err = await peer.recv()
        assert err[:3] == [ERROR, 0, 999] and err[3]["code"] == ErrorCode.UNKNOWN_TYPE
        peer.send([NOTIFY, 0, int(MsgType.RUN_END), {"reason": "x", "tick": 1}])  # not served here
        assert (await peer.recv())[3]["code"] == ErrorCode.UNKNOWN_TYPE
        await ping_roundtrip(peer, 1)


# --- limits and backpressure -------------------------------------------------

async def test_incoming_limit_gets_overloaded(address: Address) -> None:
    gate = asyncio.Event()
    started = 0

    async def held(msg: Ping) -> Pong:
        nonlocal started
        started += 1
        await gate.wait()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: held},
                                         "limits": RpcLimits(max_incoming=2, timeout_s=CALL_TIMEOUT_S)}) as p:
        first = [asyncio.ensure_future(p.client.call(Ping(b"%d" % i))) for i in range(2)]
        await wait_until(lambda: started == 2, 5)
        with pytest.raises(RemoteError) as info:
            await p.client.call(Ping(b"third"))
        assert info.value.code == ErrorCode.OVERLOADED
        assert started == 2
        gate.set()
        assert [r.payload for r in await asyncio.gather(*first)] == [b"0", b"1"]
        assert await p.client.call(Ping(b"again")) == Pong(b"again")


async def test_async_notification_handlers_share_the_incoming_limit(address: Address) -> None:
    """A peer flooding notifications whose handlers wait cannot start unbounded tasks."""
    gate = asyncio.Event()
    started = 0

    async def held(msg: TickStart) -> None:
        nonlocal started
        started += 1
        await gate.wait()

    async with rpc_pair(address, server={"notifications": {MsgType.TICK_START: held},
                                         "limits": RpcLimits(max_incoming=3, timeout_s=CALL_TIMEOUT_S)}) as p:
        for tick in range(10):
            p.client.notify(TickStart(tick, 0.0, 10_000))
        await wait_until(lambda: p.client.errors_received == 7, 5)
        assert started == 3 and p.server.errors_sent == 7
        gate.set()
        await wait_until(lambda: p.server._incoming == 0, 5)
        p.client.notify(TickStart(99, 0.0, 10_000))  # the bound is free again
        await wait_until(lambda: started == 4, 5)
        assert p.client.errors_received == 7


async def test_close_fails_pending_calls_with_peer_closed(address: Address) -> None:
    gate = asyncio.Event()
    arrived = 0

    async def held(msg: Ping) -> Pong:
        nonlocal arrived
        arrived += 1
        await gate.wait()
        return Pong(msg.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: held}}) as p:
        calls = [asyncio.ensure_future(p.client.call(Ping(b""))) for _ in range(3)]
        await wait_until(lambda: arrived == 3, 5)
        p.server.close()  # the peer goes away
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert all(isinstance(r, PeerClosed) and isinstance(r, ConnectionError) for r in results), results
        assert p.client.outstanding == 0
        with pytest.raises(PeerClosed):
            await p.client.call(Ping(b""))
        with pytest.raises(PeerClosed):
            p.client.notify(RunEnd("x", 0))
        gate.set()  # the parked handlers finish; their replies go nowhere


async def test_own_close_fails_pending_calls_and_reports_once(address: Address) -> None:
    gate = asyncio.Event()
    closed: list[Any] = []

    async def held(msg: Ping) -> Pong:
        await gate.wait()
        return Pong(b"")

    async with rpc_pair(address, server={"requests": {MsgType.PING: held}},
                        client={"on_close": lambda conn, exc: closed.append(conn)}) as p:
        call = asyncio.ensure_future(p.client.call(Ping(b"")))
        await wait_until(lambda: p.client.outstanding == 1, 5)
        p.client.close()
        with pytest.raises(PeerClosed):
            await asyncio.wait_for(call, 5)
        await p.client.wait_closed()
        assert closed == [p.client]
        gate.set()


async def test_drain_waits_while_the_peer_does_not_read(address: Address) -> None:
    high = 64 * 1024
    received = 0

    def count(msg: TickDone) -> None:
        nonlocal received
        received += 1

    payload = b"\xff" * 16 * 1024
    async with rpc_pair(address, server={"notifications": {MsgType.TICK_DONE: count}},
                        client={"limits": RpcLimits(high_water_bytes=high, timeout_s=CALL_TIMEOUT_S)}) as p:
        p.server.transport.pause_reading()
        sent = 0
        while p.client.transport.get_write_buffer_size() <= high:
            p.client.notify(TickDone(sent, 0.0, {}, payload, b""))
            sent += 1
            assert sent < 10_000, "the socket never filled up"
            if sent % 64 == 0:
                await asyncio.sleep(0)  # let the transport flush to the kernel as it would in real use
        drain = asyncio.ensure_future(p.client.drain())
        for _ in range(50):
            await asyncio.sleep(0)
        assert not drain.done(), "drain() returned while the send buffer was above the high-water mark"
        p.server.transport.resume_reading()
        await asyncio.wait_for(drain, 5)
        await wait_until(lambda: received == sent, 10, "every notification arrived")


async def test_a_peer_that_does_not_read_is_disconnected_at_the_hard_limit(address: Address) -> None:
    """Memory stays bounded: the send buffer never grows past the hard limit plus one frame."""
    hard, frame_payload = 1 << 20, 64 * 1024
    with capture_logs() as logs:
        async with rpc_pair(address, client={"limits": RpcLimits(high_water_bytes=64 * 1024,
                                                                 hard_limit_bytes=hard,
                                                                 timeout_s=CALL_TIMEOUT_S)}) as p:
            p.server.transport.pause_reading()
            pending = asyncio.ensure_future(p.client.call(Ping(b"")))
            await wait_until(lambda: p.client.outstanding == 1, 5, "a call in flight")
            peak, sent = 0, 0
            while True:
                p.client.notify(TickDone(sent, 0.0, {}, b"\x00" * frame_payload, b""))
                sent += 1
                if p.client.is_closing:
                    break  # the write that crossed the hard limit aborted the connection
                peak = max(peak, p.client.transport.get_write_buffer_size())
                assert sent < 2000, "never disconnected"
            with pytest.raises(PeerClosed):
                await asyncio.wait_for(pending, 5)
            await asyncio.wait_for(p.client.wait_closed(), 5)
    assert hard - frame_payload - 1024 < peak <= hard
    assert [e["event"] for e in logs if e["event"] == "peer_disconnected"] == ["peer_disconnected"]


# --- handshake ---------------------------------------------------------------

def test_check_hello_accepts_a_good_hello() -> None:
    secret = new_token()
    check_hello(Hello(PROTOCOL_VERSION, 1, guest_token(secret, 1), 99), secret, {1, 2}, set())


SECRET = "s3cret"


@pytest.mark.parametrize("hello, code", [
    (Hello(PROTOCOL_VERSION + 1, 1, guest_token(SECRET, 1), 1), ErrorCode.VERSION_MISMATCH),
    (Hello(PROTOCOL_VERSION, 1, "wr0ng", 1), ErrorCode.BAD_TOKEN),
    (Hello(PROTOCOL_VERSION, 9, guest_token(SECRET, 9), 1), ErrorCode.UNKNOWN_GUEST),
    (Hello(PROTOCOL_VERSION, 2, guest_token(SECRET, 2), 1), ErrorCode.DUPLICATE_GUEST),
    # the token is judged before the id: a wrong token learns nothing about ids
    (Hello(PROTOCOL_VERSION, 9, "wr0ng", 1), ErrorCode.BAD_TOKEN),
    # per-guest credentials: one guest's credential opens no other id, nor does the run secret
    (Hello(PROTOCOL_VERSION, 1, guest_token(SECRET, 2), 1), ErrorCode.BAD_TOKEN),
    (Hello(PROTOCOL_VERSION, 1, SECRET, 1), ErrorCode.BAD_TOKEN),
])
def test_check_hello_refusals(hello: Hello, code: ErrorCode) -> None:
    with pytest.raises(HandshakeError) as info:
        check_hello(hello, SECRET, known_ids={1, 2}, connected_ids={2})
    assert info.value.code == code
    assert isinstance(info.value, RemoteError)  # what client_hello re-raises as HandshakeRefused
    # No token ever appears in a refusal (it is logged by the host).
    for secret in (SECRET, "wr0ng", guest_token(SECRET, 1), guest_token(SECRET, 2)):
        assert secret not in str(info.value)


def test_guest_tokens_are_the_documented_hmac() -> None:
    """proto/README.md, "Credentials": HMAC-SHA256(secret, "balloonlab guest N"), 32 hex characters."""
    import hashlib
    want = hmac.new(b"s3cret", b"balloonlab guest 7", hashlib.sha256).hexdigest()[:32]
    assert guest_token("s3cret", 7) == want
    assert len({guest_token("s3cret", i) for i in range(1000)}) == 1000
    assert guest_token("s3cret", 7) != guest_token("s3cres", 7)


def test_check_hello_compares_tokens_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(handshake.hmac, "compare_digest", spy)
    mine = guest_token("tok", 1).encode()
    check_hello(Hello(PROTOCOL_VERSION, 1, mine.decode(), 1), "tok", {1}, set())
    with pytest.raises(HandshakeError):
        check_hello(Hello(PROTOCOL_VERSION, 1, "tak", 1), "tok", {1}, set())
    assert calls == [(mine, mine), (b"tak", mine)]


def test_new_tokens_are_long_and_distinct() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) == 32 for t in tokens)


async def test_handshake_over_the_socket(address: Address) -> None:
    """A host-like server: Hello answered by Welcome, or refused with a code and then closed."""
    secret = "t" * 32
    token = guest_token(secret, 1)
    connected: set[int] = set()

    def host_side(conn: RpcConnection) -> None:
        def on_hello(hello: Hello) -> Welcome:
            try:
                check_hello(hello, secret, {1, 2}, connected)
            except HandshakeError:
                asyncio.get_running_loop().call_soon(conn.close)  # after the error reply is written
                raise
            connected.add(hello.guest_id)
            conn.requests = {MsgType.PING: pong}
            return Welcome("run-1", 0, 0.0, 10_000, {"seed": 1})
        conn.requests = {MsgType.HELLO: on_hello}

    async with serving(address, setup=host_side) as srv:
        async def guest(guest_id: int, tok: str) -> tuple[RpcConnection, Welcome | HandshakeRefused]:
            conn = await connect(srv.address, lambda: RpcConnection(name="guest", limits=RpcLimits(timeout_s=CALL_TIMEOUT_S)))
            assert isinstance(conn, RpcConnection)
            try:
                return conn, await client_hello(conn, guest_id, tok, pid=1234, timeout_s=5)
            except HandshakeRefused as exc:
                return conn, exc

        ok_conn, welcome = await guest(1, token)
        assert welcome == Welcome("run-1", 0, 0.0, 10_000, {"seed": 1})
        assert await ok_conn.call(Ping(b"after hello")) == Pong(b"after hello")
        for gid, tok, code in ((1, token, ErrorCode.DUPLICATE_GUEST), (2, "x" * 32, ErrorCode.BAD_TOKEN),
                               (2, token, ErrorCode.BAD_TOKEN), (7, guest_token(secret, 7), ErrorCode.UNKNOWN_GUEST)):
            conn, refused = await guest(gid, tok)
            assert isinstance(refused, HandshakeRefused) and refused.code == code, refused
            await asyncio.wait_for(conn.wait_closed(), 5)  # the host closed after refusing
        ok_conn.close()
        await ok_conn.wait_closed()


async def test_requests_before_hello_get_not_authenticated(address: Address) -> None:
    async with raw_peer(address, requests={MsgType.HELLO: lambda m: None}) as (peer, _):
        peer.send([REQ, 1, PING, {"payload": b""}])
        err = await peer.recv()
        assert err[:2] == [ERROR, 1] and err[3]["code"] == ErrorCode.NOT_AUTHENTICATED
        peer.send([NOTIFY, 0, int(MsgType.TICK_DONE), {}])
        err = await peer.recv()
        assert err[:2] == [ERROR, 0] and err[3]["code"] == ErrorCode.NOT_AUTHENTICATED
