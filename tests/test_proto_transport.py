"""Addresses and listening sockets: ``unix:PATH`` (or a bare path) and ``tcp://HOST:PORT``."""
from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.messages import MsgType, Ping, Pong
from balloonlab.proto.rpc import RpcConnection, RpcLimits
from balloonlab.proto.transport import Address, connect, parse_address, serve

pytestmark = [pytest.mark.usefixtures("loop_errors"), pytest.mark.timeout(30)]


async def test_async_tests_run_on_the_selected_loop() -> None:
    """conftest's loop-factory hook: uvloop unless BALLOONLAB_TEST_LOOPS says otherwise."""
    loops = os.environ.get("BALLOONLAB_TEST_LOOPS", "uvloop")
    if loops == "uvloop":
        import uvloop

        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


# --- parse_address -------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("unix:/run/bl/host.sock", Address("unix", path="/run/bl/host.sock")),
    ("/run/bl/host.sock", Address("unix", path="/run/bl/host.sock")),
    ("relative/host.sock", Address("unix", path="relative/host.sock")),
    ("tcp://127.0.0.1:7000", Address("tcp", host="127.0.0.1", port=7000)),
    ("tcp://localhost:0", Address("tcp", host="localhost", port=0)),
    ("tcp://[::1]:65535", Address("tcp", host="::1", port=65535)),
    ("tcp://example.org:80", Address("tcp", host="example.org", port=80)),
])
def test_parse_address_forms(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("addr", [
    Address("unix", path="/tmp/x.sock"), Address("tcp", host="127.0.0.1", port=7000),
])
def test_address_str_parses_back(addr: Address) -> None:
    assert parse_address(str(addr)) == addr


@pytest.mark.parametrize("text, message", [
    ("", "empty socket path"),
    ("unix:", "empty socket path"),
    ("tcp://127.0.0.1", "expected tcp://HOST:PORT"),
    ("tcp://:7000", "expected tcp://HOST:PORT"),
    ("tcp://127.0.0.1:http", "port 'http' is not a number"),
    ("tcp://127.0.0.1:", "port '' is not a number"),
    ("tcp://127.0.0.1:65536", "port 65536 out of range"),
    ("tcp://127.0.0.1:-1", "port -1 out of range"),
    ("unix:/" + "a" * 107, "limited to 107 bytes"),
])
def test_parse_address_errors_name_the_address(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_address(text)
    assert isinstance(info.value, ValueError)
    assert repr(text) in str(info.value)


def test_unix_path_limit_counts_bytes_not_characters() -> None:
    assert parse_address("/" + "a" * 106).path  # 107 bytes: fits
    with pytest.raises(ConfigError):
        parse_address("/" + "é" * 60)  # 121 bytes in UTF-8


# --- serving -------------------------------------------------------------------

async def test_unix_socket_is_created_mode_0600_and_the_umask_restored(sock_dir: Path) -> None:
    path = sock_dir / "host.sock"
    umask_before = os.umask(0o022)
    os.umask(umask_before)
    server, bound = await serve(Address("unix", path=str(path)), lambda: RpcConnection())
    try:
        assert bound == Address("unix", path=str(path))
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert os.umask(umask_before) == umask_before
    finally:
        server.close()
        await server.wait_closed()


async def test_a_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "host.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # leaves the file behind, like a crashed host
    server, _ = await serve(Address("unix", path=str(path)),
                            lambda: RpcConnection(requests={MsgType.PING: lambda m: Pong(m.payload)}))
    try:
        conn = await connect(Address("unix", path=str(path)), lambda: RpcConnection(limits=RpcLimits(timeout_s=5)))
        assert await conn.call(Ping(b"x")) == Pong(b"x")
        conn.close()
        await conn.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_port_0_binds_a_free_port_and_connects_with_nodelay() -> None:
    server, bound = await serve(Address("tcp", host="127.0.0.1", port=0),
                                lambda: RpcConnection(requests={MsgType.PING: lambda m: Pong(m.payload)}))
    try:
        assert bound.scheme == "tcp" and bound.host == "127.0.0.1" and bound.port > 0
        conn = await connect(bound, lambda: RpcConnection(limits=RpcLimits(timeout_s=5)))
        assert isinstance(conn, RpcConnection)
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert await conn.call(Ping(b"y")) == Pong(b"y")
        conn.close()
        await conn.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False),
                                          ("::1", False)])
async def test_tcp_off_loopback_is_warned_about(host: str, warned: bool) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with capture_logs() as logs:
        try:
            server, _ = await serve(Address("tcp", host=host, port=0), lambda: RpcConnection())
        except OSError as exc:  # e.g. ::1 configured away in a container
            pytest.skip(f"cannot bind {host}: {exc}")
        server.close()
        await server.wait_closed()
    assert [e["event"] for e in logs] == (["tcp_not_loopback"] if warned else [])
    if warned:
        assert logs[0]["host"] == host and logs[0]["log_level"] == "warning"


async def test_connect_to_nowhere_raises_oserror(sock_dir: Path) -> None:
    with pytest.raises(OSError):
        await connect(Address("unix", path=str(sock_dir / "absent.sock")), lambda: RpcConnection())
    with pytest.raises(OSError):
        # a port nobody listens on: bind one, close it, connect to it
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        await asyncio.wait_for(connect(Address("tcp", host="127.0.0.1", port=port), lambda: RpcConnection()), 5)
