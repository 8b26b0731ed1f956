"""The handshake: the first request on a connection, guest -> host.

``Hello{version, guest_id, token, pid}`` is answered by ``Welcome`` or by an
error reply (``VERSION_MISMATCH``, ``UNKNOWN_GUEST``, ``DUPLICATE_GUEST``,
``BAD_TOKEN``) after which the host closes. Before it completes the host
accepts nothing else (``NOT_AUTHENTICATED``).

Credentials are per guest. The host holds a run secret (``new_token``);
guest ``N``'s credential is ``guest_token(secret, N)``, an HMAC of the
secret and the id, so it proves exactly one id: a guest can only ever be
itself, and a credential handed to one guest (say, on another machine)
opens no other guest's session.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Container
from typing import TYPE_CHECKING

from .errors import ErrorCode, HandshakeRefused, RemoteError

if TYPE_CHECKING:   # (the launcher makes tokens without the wire's message classes)
    from .messages import Hello, Welcome

__all__ = ["PROTOCOL_VERSION", "HandshakeError", "new_token", "guest_token", "check_hello", "client_hello",
           "TOKEN_HEX_CHARS"]

PROTOCOL_VERSION = 1
TOKEN_HEX_CHARS = 32


class HandshakeError(HandshakeRefused):
    """Raised by the host's check; its ``code`` goes back in the error reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


def new_token() -> str:
    """A run secret: 32 lowercase hex characters (128 random bits)."""
    return secrets.token_hex(TOKEN_HEX_CHARS // 2)


def guest_token(secret: str, guest_id: int) -> str:
    """Guest ``guest_id``'s credential under the run secret ``secret``.

    ``HMAC-SHA256(key=secret, msg="balloonlab guest <id>")``, the first 32
    lowercase hex characters (proto/README.md, "Credentials").
    """
    mac = hmac.new(secret.encode(), f"balloonlab guest {int(guest_id)}".encode(), hashlib.sha256)
    return mac.hexdigest()[:TOKEN_HEX_CHARS]


def check_hello(hello: Hello, secret: str, known_ids: Container[int], connected_ids: Container[int]) -> None:
    """Refuse ``hello`` with a ``HandshakeError``, or return: its token is its id's credential under ``secret``."""
    if hello.version != PROTOCOL_VERSION:
        raise HandshakeError(ErrorCode.VERSION_MISMATCH,
                             f"protocol version {hello.version} not supported; this host speaks {PROTOCOL_VERSION}")
    # Constant-time, and checked before the id: any id has a credential, so a wrong
    # token learns nothing about which ids exist, and a right one proves one id.
    if not hmac.compare_digest(hello.token.encode(), guest_token(secret, hello.guest_id).encode()):
        raise HandshakeError(ErrorCode.BAD_TOKEN, f"bad token for guest {hello.guest_id}")
    if hello.guest_id not in known_ids:
        raise HandshakeError(ErrorCode.UNKNOWN_GUEST, f"guest id {hello.guest_id} is not part of this run")
    if hello.guest_id in connected_ids:
        raise HandshakeError(ErrorCode.DUPLICATE_GUEST, f"guest id {hello.guest_id} is already connected")


async def client_hello(conn, guest_id: int, token: str, pid: int, timeout_s: float = 60.0) -> Welcome:
    """Send Hello on ``conn`` (an RpcConnection); raise ``HandshakeRefused`` on refusal.

    ``token`` is this guest's own credential (``guest_token``), not the run secret.
    """
    from .messages import Hello, Welcome
    try:
        reply = await conn.call(Hello(PROTOCOL_VERSION, guest_id, token, pid), timeout_s=timeout_s)
    except RemoteError as exc:
        raise HandshakeRefused(exc.code, exc.message) from None
    assert isinstance(reply, Welcome)
    return reply
