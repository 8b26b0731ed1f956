"""Addresses and sockets: Unix domain sockets by default, TCP as an option.

An address is ``unix:PATH`` (or a bare path) or ``tcp://HOST:PORT``. The
Unix socket is created with mode 0600 inside a directory the launcher made
0700; TCP binds exactly the address it is given (loopback unless told
otherwise), with a warning for any other.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Callable

import structlog

from .errors import ConfigError

__all__ = ["Address", "parse_address", "serve", "connect"]

log = structlog.get_logger("proto.transport")


@dataclass(frozen=True, slots=True)
class Address:
    scheme: str          # "unix" or "tcp"
    path: str = ""       # unix
    host: str = ""       # tcp
    port: int = 0        # tcp; 0 = pick a free port when serving

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.scheme == "unix" else f"tcp://{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    if text.startswith("tcp://"):
        rest = text[len("tcp://"):]
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"address {text!r}: expected tcp://HOST:PORT")
        try:
            port_n = int(port)
        except ValueError:
            raise ConfigError(f"address {text!r}: port {port!r} is not a number") from None
        if not 0 <= port_n <= 65535:
            raise ConfigError(f"address {text!r}: port {port_n} out of range")
        return Address("tcp", host=host.strip("[]"), port=port_n)
    path = text[len("unix:"):] if text.startswith("unix:") else text
    if not path:
        raise ConfigError(f"address {text!r}: empty socket path")
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"address {text!r}: Unix socket paths are limited to 107 bytes")
    return Address("unix", path=path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(address: Address, factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.AbstractServer, Address]:
    """Listen; return the server and the bound address (with the real port)."""
    loop = asyncio.get_running_loop()
    if address.scheme == "unix":
        if os.path.exists(address.path):
            os.unlink(address.path)
        old = os.umask(0o177)  # socket file 0600 from birth, no window for others
        try:
            server = await loop.create_unix_server(factory, path=address.path, backlog=1024)
        finally:
            os.umask(old)
        os.chmod(address.path, 0o600)
        return server, address
    if not _is_loopback(address.host):
        log.warning("tcp_not_loopback", host=address.host,
                    hint="guests on other machines can reach this host; their credentials are the only guard")
    server = await loop.create_server(factory, host=address.host, port=address.port, backlog=1024,
                                      reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    return server, Address("tcp", host=address.host, port=port)


async def connect(address: Address, factory: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
    loop = asyncio.get_running_loop()
    if address.scheme == "unix":
        _, proto = await loop.create_unix_connection(factory, path=address.path)
    else:
        _, proto = await loop.create_connection(factory, host=address.host, port=address.port)
        sock = proto.transport.get_extra_info("socket")  # type: ignore[attr-defined]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return proto
