"""A guest waits for its host as long as the host is alive, and no longer.

The host here is played by hand in the test's loop, over a real socket: it
answers ``Hello`` with a ``Welcome`` for a tiny guest (and the liveness the
real host sends), then either keeps answering pings while it takes its
time, or falls silent as a stopped process would. The guest is the real
``GuestAgent``.
"""
from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from balloonlab.guestd.agent import EXIT_HOST_LOST, GuestAgent
from balloonlab.proto.transport import parse_address
from tests.rawclient import guest_token, run_config


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class FakeHost:
    """Answers Hello; then answers pings only while ``alive``; records what the guest sent."""

    def __init__(self, liveness: dict[str, float]) -> None:
        cfg = run_config("tests-tiny", guests=1, ticks=5)
        self.config = dict(cfg["guests"][0], seed=1, costs=cfg["costs"], disk=cfg["disk"], locks={}, ticks=5,
                           metrics_every_ticks=5, liveness=liveness)
        self.alive = True
        self.pings_answered = 0
        self.received: list[list] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                n = struct.unpack(">I", buf[:4])[0]
                frame, buf = msgpack.unpackb(buf[4:4 + n], raw=False), buf[4 + n:]
                self.received.append(frame)
                kind, msg_id, mtype, body = frame
                if kind == 0 and mtype == 1:
                    assert body["token"] == guest_token(0)
                    writer.write(_frame([1, msg_id, 1, {"run_id": "fake", "tick": 0, "vt_us": 0.0,
                                                         "tick_us": 10_000, "config": self.config}]))
                elif kind == 0 and mtype == 60 and self.alive:
                    self.pings_answered += 1
                    writer.write(_frame([1, msg_id, 60, {"payload": body["payload"]}]))


async def _run_guest(host: FakeHost, sock_dir: Path) -> tuple[int, float]:
    path = str(sock_dir / "h.sock")
    server = await asyncio.start_unix_server(host.serve, path=path)
    try:
        agent = GuestAgent(0, guest_token(0), parse_address(path))
        t0 = time.monotonic()
        code = await asyncio.wait_for(agent.run(), 30)
        return code, time.monotonic() - t0
    finally:
        server.close()


async def test_a_guest_gives_up_on_a_host_that_falls_silent(sock_dir: Path, capsys: pytest.CaptureFixture) -> None:
    host = FakeHost({"heartbeat_s": 0.05, "host_silent_s": 0.6})
    host.alive = False              # it answers the Hello, then nothing: a stopped host
    code, took_s = await _run_guest(host, sock_dir)
    assert code == EXIT_HOST_LOST and 0.5 <= took_s < 10
    assert "no sign of life from the host for 1 s (heartbeat)" in capsys.readouterr().err
    pings = [f for f in host.received if f[0] == 0 and f[2] == 60]
    assert len(pings) >= 1           # it asked before it gave up


async def test_a_guest_waits_for_a_slow_host_that_answers_pings(sock_dir: Path) -> None:
    """No TickStart for 1.5 s -- longer than the 0.6 s silence bound -- but the host answers pings: the guest stays."""
    host = FakeHost({"heartbeat_s": 0.05, "host_silent_s": 0.6})
    path = str(sock_dir / "h.sock")
    server = await asyncio.start_unix_server(host.serve, path=path)
    try:
        agent = GuestAgent(0, guest_token(0), parse_address(path))
        task = asyncio.ensure_future(agent.run())
        await asyncio.sleep(1.5)
        assert not task.done() and host.pings_answered >= 5
        host.alive = False          # now it stops: the guest gives up within the bound
        code = await asyncio.wait_for(task, 10)
        assert code == EXIT_HOST_LOST
    finally:
        server.close()
