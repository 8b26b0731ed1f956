"""The handshake: the first request on a connection, guest -> host.

``Hello{version, guest_id, token, pid}`` is answered by ``Welcome`` or by an
error reply (``VERSION_MISMATCH``, ``UNKNOWN_GUEST``, ``DUPLICATE_GUEST``,
``BAD_TOKEN``) after which the host closes. Before it completes the host
accepts nothing else (``NOT_AUTHENTICATED``).
"""
from __future__ import annotations

import hmac
import secrets
from collections.abc import Container

from .errors import ErrorCode, HandshakeRefused, RemoteError
from .messages import Hello, Welcome

__all__ = ["PROTOCOL_VERSION", "HandshakeError", "new_token", "check_hello", "client_hello"]

PROTOCOL_VERSION = 1


class HandshakeError(HandshakeRefused):
    """Raised by the host's check; its ``code`` goes back in the error reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


def new_token() -> str:
    return secrets.token_hex(16)


def check_hello(hello: Hello, token: str, known_ids: Container[int], connected_ids: Container[int]) -> None:
    if hello.version != PROTOCOL_VERSION:
        raise HandshakeError(ErrorCode.VERSION_MISMATCH,
                             f"protocol version {hello.version} not supported; this host speaks {PROTOCOL_VERSION}")
    # Constant-time, and checked before the id so that a wrong token learns nothing about ids.
    if not hmac.compare_digest(hello.token.encode(), token.encode()):
        raise HandshakeError(ErrorCode.BAD_TOKEN, f"bad token for guest {hello.guest_id}")
    if hello.guest_id not in known_ids:
        raise HandshakeError(ErrorCode.UNKNOWN_GUEST, f"guest id {hello.guest_id} is not part of this run")
    if hello.guest_id in connected_ids:
        raise HandshakeError(ErrorCode.DUPLICATE_GUEST, f"guest id {hello.guest_id} is already connected")


async def client_hello(conn, guest_id: int, token: str, pid: int, timeout_s: float = 10.0) -> Welcome:
    """Send Hello on ``conn`` (an RpcConnection); raise ``HandshakeRefused`` on refusal."""
    try:
        reply = await conn.call(Hello(PROTOCOL_VERSION, guest_id, token, pid), timeout_s=timeout_s)
    except RemoteError as exc:
        raise HandshakeRefused(exc.code, exc.message) from None
    assert isinstance(reply, Welcome)
    return reply
