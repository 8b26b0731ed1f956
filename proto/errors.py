"""Errors of the protocol layer: one base, specific leaves, codes on the wire.

Each leaf subclasses the nearest builtin and names the offending value in
its message. ``ErrorCode`` values travel in error replies; a peer written in
another language reads them from ``proto/README.md``.
"""
from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ErrorCode", "ProtoError", "ConfigError", "FrameError", "FrameTooLarge",
    "TruncatedFrame", "UndecodableFrame", "MessageError", "UnknownMessageType",
    "BadField", "PeerClosed", "RpcTimeout", "RemoteError", "HandshakeRefused",
    "Overloaded",
]


class ErrorCode(IntEnum):
    """Codes carried by error replies (``body.code``)."""

    BAD_FRAME = 1            # oversized, truncated or undecodable frame
    UNKNOWN_TYPE = 2         # message type not in MsgType
    BAD_FIELD = 3            # missing, unknown, wrongly typed or out-of-range field
    VERSION_MISMATCH = 10    # handshake: protocol version not supported
    UNKNOWN_GUEST = 11       # handshake: guest id not in this run
    DUPLICATE_GUEST = 12     # handshake: guest id already connected
    BAD_TOKEN = 13           # handshake: the token is not that guest id's credential
    NOT_AUTHENTICATED = 14   # a request before the handshake completed
    NOT_OWNER = 20           # a page or block that is not this guest's
    OUT_OF_RANGE = 21        # gpfn / block number outside the guest's range
    INVALID_STATE = 22       # e.g. deflating a page that was never inflated
    OVERLOADED = 30          # too many outstanding requests on this connection
    TIMEOUT = 31             # the peer did not answer in time
    SHUTTING_DOWN = 32       # the run is ending
    DEADLOCK_BROKEN = 40     # the deadlock detector failed this request; retry
    INTERNAL = 50            # a bug on the replying side; logged there


class ProtoError(Exception):
    """Base of every error raised by ``proto``."""


class ConfigError(ProtoError, ValueError):
    """A scenario or configuration value is wrong; the message names the key."""


class FrameError(ProtoError, ValueError):
    """A frame could not be read."""


class FrameTooLarge(FrameError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the maximum of {limit} bytes")
        self.size = size
        self.limit = limit


class TruncatedFrame(FrameError, EOFError):
    def __init__(self, partial: bytes, expected: int) -> None:
        super().__init__(f"connection closed after {len(partial)} of {expected} expected bytes")
        self.partial = partial
        self.expected = expected


class UndecodableFrame(FrameError):
    """The body is not msgpack, or not the envelope ``[kind, id, type, body]``."""


class MessageError(ProtoError, ValueError):
    """A decoded frame is not a valid message."""

    code = ErrorCode.BAD_FIELD


class UnknownMessageType(MessageError):
    code = ErrorCode.UNKNOWN_TYPE

    def __init__(self, msg_type: object) -> None:
        super().__init__(f"unknown message type {msg_type!r}")
        self.msg_type = msg_type


class BadField(MessageError):
    def __init__(self, message: str, field: str, reason: str) -> None:
        super().__init__(f"{message}.{field}: {reason}")
        self.message_name = message
        self.field = field
        self.reason = reason


class PeerClosed(ProtoError, ConnectionError):
    """The peer closed the connection (or it broke) while we needed it."""


class RpcTimeout(ProtoError, TimeoutError):
    def __init__(self, msg_type: str, timeout_s: float) -> None:
        super().__init__(f"no reply to {msg_type} within {timeout_s:g} s")
        self.msg_type = msg_type
        self.timeout_s = timeout_s


class RemoteError(ProtoError):
    """The peer answered a request with an error reply."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"{name}: {message}")
        self.code = code
        self.message = message


class HandshakeRefused(RemoteError):
    """The host refused our hello."""


class Overloaded(ProtoError, RuntimeError):
    """Too many requests outstanding on one connection."""
