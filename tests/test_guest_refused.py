"""A request of the vCPU's that the host refuses (its EPT fault, when the host has no frame to give) ends
the guest with a one-line reason and exit status 4, not a traceback."""
from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import msgpack
import pytest

from balloonlab.guestd.agent import EXIT_REFUSED, GuestAgent
from balloonlab.proto.transport import parse_address
from tests.rawclient import ERROR, HELLO, NOTIFY, OVERLOADED, PING, REPLY, REQUEST, TICK_START, UNKNOWN_TYPE, \
    guest_token
from tests.test_guest_liveness import FakeHost, _frame

CONTENT_REPORT = 5


class RefusingHost(FakeHost):
    """Welcomes the guest, starts tick 0, and refuses every request of its vCPU with OVERLOADED."""

    def __init__(self) -> None:
        super().__init__({})    # the guest's own heartbeat defaults
        self.refused: list[int] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while data := await reader.read(65536):
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                n = struct.unpack(">I", buf[:4])[0]
                (kind, msg_id, mtype, body), buf = msgpack.unpackb(buf[4:4 + n], raw=False), buf[4 + n:]
                if kind != REQUEST:
                    continue
                if mtype == HELLO:
                    writer.write(_frame([REPLY, msg_id, HELLO, {"run_id": "refusing", "tick": 0, "vt_us": 0.0,
                                                                "tick_us": 10_000, "config": self.config}]))
                elif mtype == CONTENT_REPORT:   # an older host: the guest goes on without a content map
                    writer.write(_frame([ERROR, msg_id, mtype, {"code": UNKNOWN_TYPE, "message": "unknown"}]))
                    writer.write(_frame([NOTIFY, 0, TICK_START, {"tick": 0, "vt_us": 0.0, "tick_us": 10_000}]))
                elif mtype == PING:
                    writer.write(_frame([REPLY, msg_id, PING, {"payload": body["payload"]}]))
                else:
                    self.refused.append(mtype)
                    writer.write(_frame([ERROR, msg_id, mtype, {"code": OVERLOADED,
                                                                "message": "need 16 free frames, have 0"}]))


@pytest.mark.timeout(60)
async def test_a_refused_vcpu_request_ends_the_guest_with_its_reason(sock_dir: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    host = RefusingHost()
    path = str(sock_dir / "h.sock")
    server = await asyncio.start_unix_server(host.serve, path=path)
    try:
        code = await asyncio.wait_for(GuestAgent(0, guest_token(0), parse_address(path)).run(), 30)
    finally:
        server.close()
    err = capsys.readouterr().err
    assert host.refused, "the guest's vCPU asked the host nothing"
    assert code == EXIT_REFUSED, err
    assert "guestd[0]: the host refused a request of the vCPU: OVERLOADED: need 16 free frames, have 0" in err, err
    assert "Traceback" not in err
