"""The host's tick loop gives its event loop a turn every tick, even a tick no guest takes part in.

A guest that dies right after its TickDone can leave its connection
*closing* with the close itself (``connection_lost``) still queued behind
the tick loop: the TickStart that follows finds it closed and leaves it
out, so the barrier is empty. Were that tick to end without a yield, the
next would find the same, and so on: the loop would race through every
remaining tick without running the close, a signal handler or a read.
This is the state a fork server's death left under load, made on purpose
here: the host runs in this process, and the test closes the guest's
connection on the host's side just before a TickStart goes out.
"""
from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from balloonlab.hostd.config import RunConfig
from balloonlab.proto.transport import parse_address
from tests.rawclient import HELLO, NOTIFY, REPLY, REQUEST, TICK_DONE, TICK_START, TOKEN, guest_token

RAM_PAGES = 1024
TICKS = 3000
CLOSE_AT = 3


async def _frame(reader: asyncio.StreamReader) -> list | None:
    try:
        (n,) = struct.unpack(">I", await reader.readexactly(4))
        return msgpack.unpackb(await reader.readexactly(n), raw=False, strict_map_key=False)
    except asyncio.IncompleteReadError:
        return None


def _send(writer: asyncio.StreamWriter, kind: int, msg_id: int, msg_type: int, body: Any) -> None:
    data = msgpack.packb([kind, msg_id, msg_type, body], use_bin_type=True)
    writer.write(struct.pack(">I", len(data)) + data)


async def _guest(path: str) -> list[int]:
    """Hello, then TickDone for every TickStart until the host closes the connection; the ticks it saw."""
    reader, writer = await asyncio.open_unix_connection(path)
    _send(writer, REQUEST, 1, HELLO, {"version": 1, "guest_id": 0, "token": guest_token(0), "pid": os.getpid()})
    seen: list[int] = []
    bitmap = bytes(RAM_PAGES // 8)
    while (frame := await _frame(reader)) is not None:
        if frame[0] == REQUEST and frame[2] != HELLO:
            _send(writer, REPLY, frame[1], frame[2], {"payload": b""})   # a ping; nothing else comes this early
        elif frame[0] == NOTIFY and frame[2] == TICK_START:
            t = frame[3]
            seen.append(t["tick"])
            _send(writer, NOTIFY, 0, TICK_DONE, {"tick": t["tick"], "vt_us": t["vt_us"] + t["tick_us"],
                                                 "stats": {"refs": 1}, "accessed": bitmap, "dirty": bitmap})
    writer.close()
    return seen


@pytest.mark.timeout(60)
def test_a_connection_closing_at_a_tick_start_is_seen_that_tick(sock_dir: Path) -> None:
    from balloonlab.hostd.server import Host
    cfg = RunConfig.from_mapping({
        "run_id": "tick-yield", "scenario": "raw", "variant": "default", "seed": 1, "ticks": TICKS,
        "tick_us": 10_000, "connect_timeout_s": 20.0, "watchdog_s": 5.0,
        "guests": [{"id": 0, "ram_pages": RAM_PAGES}], "host": {"ram_mib": 6}})
    path = str(sock_dir / "h.sock")
    host = Host(cfg, TOKEN, parse_address(path))
    send_tick_start = host._send_tick_start

    def closing_at_start(tick: int, vt_us: int) -> None:
        if tick == CLOSE_AT:
            # closing now, its connection_lost queued for the loop's next turn
            host.sessions[0].conn.transport.close()
        send_tick_start(tick, vt_us)

    host._send_tick_start = closing_at_start   # type: ignore[method-assign]

    async def scenario() -> tuple[int, list[int]]:
        run = asyncio.ensure_future(host.run())
        while not os.path.exists(path):
            await asyncio.sleep(0.01)
        seen = await asyncio.wait_for(_guest(path), 30)
        return await asyncio.wait_for(run, 30), seen

    rc, seen = asyncio.run(scenario())
    assert seen == list(range(CLOSE_AT)), seen
    # Gone in the tick its connection closed, which ends; the next finds nobody: not every tick for nobody.
    assert host.tick == CLOSE_AT + 1, f"the host ran {host.tick} ticks; its only guest left in tick {CLOSE_AT}"
    assert host.sessions.gone() == {0: "connection closed"}
    assert rc == 1
