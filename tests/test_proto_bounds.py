"""Every wait and every buffer on a connection is bounded; a peer is judged alive by heartbeat.

In one process, over real sockets (Unix and TCP):

- a call waits as long as the peer is alive -- longer than its silence bound,
  since the heartbeat's pings are answered meanwhile -- and a peer that
  falls silent is reported once;
- a call's deadline also bounds its wait for room in a full send buffer;
- requests in progress are bounded in bytes, per connection and over
  connections sharing a ``ByteBudget``; one request always gets through;
- one frame decodes to a bounded number of maps, arrays and entries;
- what a peer causes (garbage, error frames) is counted in full and logged
  at counts 1-10, 100, 1000 only;
- after ``stop_receiving`` nothing the peer pipelined is answered.
"""
from __future__ import annotations

import asyncio
import struct
import time

import msgpack
import pytest
from structlog.testing import capture_logs

from balloonlab.proto.errors import ErrorCode, RemoteError, RpcTimeout
from balloonlab.proto.framing import DecodeLimits, FrameDecoder
from balloonlab.proto.liveness import Heartbeat
from balloonlab.proto.messages import DiskWrite, DiskWriteReply, MsgType, Ping, Pong
from balloonlab.proto.rpc import ByteBudget, RpcConnection, RpcLimits, should_log_count
from balloonlab.proto.transport import Address, connect, serve

from .conftest import wait_until
from .test_proto_rpc import address, pong, raw_peer, rpc_pair, serving  # noqa: F401  (address is a fixture)

pytestmark = pytest.mark.usefixtures("loop_errors")


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --- liveness -------------------------------------------------------------------------------

async def test_a_call_waits_for_a_slow_peer_as_long_as_it_is_alive(address: Address) -> None:
    """The reply takes 1.5 s, more than the 0.6 s silence bound: the heartbeat's pings prove the peer alive."""
    async def slow(m: Ping) -> Pong:
        await asyncio.sleep(1.5)   # a slow host; its loop still answers pings
        return Pong(m.payload)

    silences: list[float] = []
    async with rpc_pair(address, server={"requests": {MsgType.PING: slow}},
                        client={"limits": RpcLimits()}) as p:
        # The heartbeat's own pings go to the same slow handler here; that they are answered late
        # is fine: any frame from the peer counts as a sign of life, and the replies keep coming.
        p.server.requests[MsgType.PING] = lambda m: Pong(m.payload) if m.payload == b"" else slow(m)
        beat = Heartbeat(p.client, interval_s=0.1, silent_s=0.6, on_silent=silences.append)
        beat.start()
        t0 = time.monotonic()
        assert await p.client.call(Ping(b"work")) == Pong(b"work")   # no timeout: RpcLimits' default is none
        assert time.monotonic() - t0 >= 1.4
        beat.stop()
    assert RpcLimits().timeout_s == 0
    assert beat.pings_sent >= 5 and beat.pongs_received >= 5 and silences == []


async def test_a_silent_peer_is_reported_once(address: Address) -> None:
    """A peer that reads but never answers (a stopped process, a hung loop) is silent after ``silent_s``."""
    async with raw_peer(address) as (peer, srv):
        await wait_until(lambda: srv.conns, 5, "accepted")
        conn = srv.conns[0]
        silences: list[float] = []
        beat = Heartbeat(conn, interval_s=0.05, silent_s=0.4, on_silent=silences.append)
        t0 = time.monotonic()
        beat.start()
        await wait_until(lambda: silences, 5, "the silence reported")
        assert 0.35 <= time.monotonic() - t0 < 2.0 and len(silences) == 1 and silences[0] >= 0.4
        first = await peer.recv()          # it was pinged meanwhile (and answered nothing)
        assert first[:1] == [0] and first[2] == int(MsgType.PING)
        await asyncio.sleep(0.3)
        assert len(silences) == 1          # once, not at every beat
        beat.stop()


async def test_a_full_send_buffer_does_not_outlive_the_calls_deadline(address: Address) -> None:
    """The peer reads nothing: the call used to wait in drain() for ever; now its deadline bounds it all."""
    async with raw_peer(address) as (peer, srv):
        await wait_until(lambda: srv.conns, 5, "accepted")
        conn = srv.conns[0]
        conn.transport.set_write_buffer_limits(high=1024)   # type: ignore[union-attr]
        t0 = time.monotonic()
        with pytest.raises(RpcTimeout):
            await conn.call(Ping(bytes(256 * 1024)), timeout_s=0.3)
        assert time.monotonic() - t0 < 2.0


# --- bytes --------------------------------------------------------------------------------------

def _write(n_blocks: int) -> DiskWrite:
    blocks = bytes(8 * n_blocks)
    import numpy as np
    return DiskWrite(np.frombuffer(blocks, "<u8"), np.frombuffer(blocks, "<u8"), 0.0)


async def test_requests_in_progress_are_bounded_in_bytes_per_connection_and_in_total(address: Address) -> None:
    """Handlers that hold their request: 1 MiB per connection, 1.2 MiB shared; then OVERLOADED."""
    release = asyncio.Event()

    async def hold(m: DiskWrite) -> DiskWriteReply:
        await release.wait()
        return DiskWriteReply(0.0)

    budget = ByteBudget(1200 * 1024)
    limits = RpcLimits(max_incoming_bytes=1 << 20, budget=budget)
    async with serving(address, requests={MsgType.DISK_WRITE: hold}, limits=limits) as srv:
        a = await connect(srv.address, lambda: RpcConnection(name="a"))
        b = await connect(srv.address, lambda: RpcConnection(name="b"))
        assert isinstance(a, RpcConnection) and isinstance(b, RpcConnection)
        big = _write(40_000)            # ~640 KB a frame
        first = [asyncio.ensure_future(a.call(big)) for _ in range(3)]
        await wait_until(lambda: sum(f.done() for f in first) == 2, 5, "the 2nd and 3rd refused")
        # The 1st is held; a 2nd would pass a's 1 MiB, so both others were refused, not queued.
        codes = sorted(f.exception().code for f in first if f.done())   # type: ignore[union-attr]
        assert codes == [ErrorCode.OVERLOADED] * 2
        held = srv.conns[0].incoming_bytes
        assert 640_000 < held <= 1 << 20 and budget.used_bytes == held
        # b: its first gets through although the shared budget cannot take a second whole one
        # (a connection with nothing in progress is never starved by the others)...
        b1 = asyncio.ensure_future(b.call(big))
        await wait_until(lambda: budget.used_bytes > held, 5, "b's first request held")
        with pytest.raises(RemoteError) as info:
            await b.call(_write(1000))      # ... and then it is full for b too
        assert info.value.code == ErrorCode.OVERLOADED and "share" in info.value.message
        release.set()
        assert isinstance(await first[0], DiskWriteReply) and isinstance(await b1, DiskWriteReply)
        await wait_until(lambda: budget.used_bytes == 0, 5, "the budget given back")
        assert await a.call(big) == DiskWriteReply(0.0)   # and usable again
        for c in (a, b):
            c.abort()
            await c.wait_closed()


def test_one_frame_decodes_to_a_bounded_number_of_objects() -> None:
    """4 MiB of nested empty maps would be millions of dicts; the receiver stops at its limits."""
    d = FrameDecoder(limits=DecodeLimits(max_containers=1024, max_container_len=256, max_str_bytes=1024))
    nested = msgpack.packb([[{}] * 256] * 256)            # 65,792 maps and arrays in 66 KB
    flat = b"\xdd" + struct.pack(">I", 4_000_000) + b"\x80" * 4_000_000   # an array of 4M empty maps
    long_str = msgpack.packb("x" * 5000)
    ok = msgpack.packb([0, 1, 60, {"payload": b"y" * 100_000}])
    out = d.feed(b"".join(_frame(b) for b in (nested, flat, long_str, ok)))
    assert [type(x).__name__ for x in out] == ["UndecodableFrame"] * 3 + ["list"]
    assert "more than 1024 maps and arrays" in str(out[0])
    assert "max_array_len" in str(out[1]) and "max_str_len" in str(out[2])
    assert out[3][3]["payload"] == b"y" * 100_000      # bins are bounded by the frame, not by these
    assert d.sizes == [len(nested), len(flat), len(long_str), len(ok)]
    # A decoder without limits (for a peer we trust) decodes the same nesting.
    assert len(FrameDecoder().feed(_frame(nested))[0]) == 256


# --- what a peer causes is counted, and logged sparingly ----------------------------------------------

def test_the_log_rate_limit_is_the_first_ten_then_powers_of_ten() -> None:
    assert [n for n in range(1, 20_001) if should_log_count(n)] == [*range(1, 11), 100, 1000, 10_000]


async def test_a_flood_of_garbage_and_error_frames_is_counted_not_logged_each_time(address: Address) -> None:
    async with raw_peer(address) as (peer, srv):
        with capture_logs() as logs:
            peer.send_bytes(_frame(b"\xc1") * 1500 + _frame(msgpack.packb([2, 0, 0, {"code": 1, "message": "x"}])) * 1500)
            await wait_until(lambda: srv.conns and srv.conns[0].peer_events.get("peer_error") == 1500, 10,
                             "every frame counted")
        conn = srv.conns[0]
        assert conn.peer_events == {"frame_rejected": 1500, "peer_error": 1500}
        logged = [(e["event"], e["count"]) for e in logs if e["event"] in ("frame_rejected", "peer_error")]
        assert logged == [("frame_rejected", n) for n in (*range(1, 11), 100, 1000)] + \
                         [("peer_error", n) for n in (*range(1, 11), 100, 1000)]


async def test_nothing_pipelined_after_stop_receiving_is_answered(address: Address) -> None:
    """A refused handshake stops reading: the requests behind it in the same bytes get no answer."""
    def setup(conn: RpcConnection) -> None:
        def refuse(m: Ping) -> Pong:
            conn.stop_receiving()
            asyncio.get_running_loop().call_soon(conn.close)
            raise RemoteError(ErrorCode.BAD_TOKEN, "bad token")
        conn.requests = {MsgType.PING: refuse}

    async with raw_peer(address, requests={}) as (peer, srv):
        srv_conns = srv.conns
        srv_conns[0].requests = {}
        setup(srv_conns[0])
        peer.send_bytes(b"".join(_frame(msgpack.packb([0, i, 60, {"payload": b""}])) for i in range(1, 7)))
        first = await peer.recv()
        assert first[:2] == [2, 1] and first[3]["code"] == ErrorCode.BAD_TOKEN
        assert await peer.closed_by_peer()       # and nothing else came before the end
        assert peer.frames == []
