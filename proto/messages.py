"""Typed messages: one frozen class per message body, validated on decode.

Every message is a request (answered by its reply class), a reply, or a
notification (no answer). Decoding rejects unknown and missing fields and
wrong types with a ``BadField`` naming the field; page-number batches are
msgpack ``bin`` of little-endian ``uint64`` and decode to read-only numpy
views without copying.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from .errors import BadField, UnknownMessageType

__all__ = [
    "MsgType", "Kind", "Message", "pages_to_bytes",
    "Hello", "Welcome", "TickStart", "TickDone", "RunEnd",
    "EptFault", "EptFaultReply", "Invalidate", "InvalidateReply",
    "BalloonTarget", "BalloonInflate", "BalloonDeflate", "BalloonReply",
    "DiskRead", "DiskReadReply", "DiskWrite", "DiskWriteReply",
    "Ping", "Pong", "REQUESTS", "NOTIFICATIONS", "MAX_PAGES_PER_MESSAGE", "msg_type_of",
]

# A page batch of this many u64 fits a 4 MiB frame with room to spare.
MAX_PAGES_PER_MESSAGE = 262_144


class Kind(IntEnum):
    """First element of every envelope ``[kind, id, type, body]``."""

    REQUEST = 0
    REPLY = 1
    ERROR = 2
    NOTIFY = 3


class MsgType(IntEnum):
    HELLO = 1             # guest -> host request; reply Welcome
    TICK_START = 10       # host -> guest notification
    TICK_DONE = 11        # guest -> host notification
    RUN_END = 12          # host -> guest notification
    EPT_FAULT = 20        # guest -> host request
    INVALIDATE = 21       # host -> guest request (TLB shootdown)
    BALLOON_TARGET = 30   # host -> guest notification
    BALLOON_INFLATE = 31  # guest -> host request
    BALLOON_DEFLATE = 32  # guest -> host request
    DISK_READ = 40        # guest -> host request
    DISK_WRITE = 41       # guest -> host request
    PING = 60             # either way; reply Pong


# Field kinds. Checking with exact types is deliberate: bool is an int in
# Python but not on the wire.
_INT = "int"        # msgpack int >= 0
_NUM = "number"     # int or float, finite and >= 0, decoded as float
_STR = "str"
_BIN = "bin"
_PAGES = "pages"    # bin, length a multiple of 8, <= MAX_PAGES_PER_MESSAGE u64
_MAP = "map"        # str -> any msgpack value

_INF = float("inf")


def pages_to_bytes(pages: Any) -> bytes:
    return np.asarray(pages, dtype="<u8").tobytes()


class Message:
    """Base of every typed message body."""

    TYPE: ClassVar[MsgType]
    SPEC: ClassVar[dict[str, str]]
    __slots__ = ()

    def to_body(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, kind in self.SPEC.items():
            value = getattr(self, name)
            out[name] = pages_to_bytes(value) if kind == _PAGES else value
        return out

    @classmethod
    def from_body(cls, body: Any) -> "Message":
        name = cls.__name__
        if not isinstance(body, dict):
            raise BadField(name, "<body>", f"expected a map, got {type(body).__name__}")
        spec = cls.SPEC
        for key in body:
            if key not in spec:
                raise BadField(name, str(key), "unknown field")
        values = {}
        for key, kind in spec.items():
            if key not in body:
                raise BadField(name, key, "missing field")
            values[key] = _check(name, key, kind, body[key])
        return cls(**values)


def _check(msg: str, key: str, kind: str, value: Any) -> Any:
    t = type(value)
    if kind == _PAGES:
        if t is not bytes:
            raise BadField(msg, key, f"expected bin of little-endian u64, got {t.__name__}")
        if len(value) % 8:
            raise BadField(msg, key, f"length {len(value)} is not a multiple of 8")
        if len(value) > MAX_PAGES_PER_MESSAGE * 8:
            raise BadField(msg, key, f"{len(value) // 8} pages exceed the limit of {MAX_PAGES_PER_MESSAGE}")
        return np.frombuffer(value, dtype="<u8")
    if kind == _INT:
        if t is not int:
            raise BadField(msg, key, f"expected int, got {t.__name__}")
        if value < 0:
            raise BadField(msg, key, f"must be >= 0, got {value}")
        return value
    if kind == _NUM:
        if t is not int and t is not float:
            raise BadField(msg, key, f"expected number, got {t.__name__}")
        if not 0 <= value < _INF:  # also rejects NaN; inf is no point in virtual time
            raise BadField(msg, key, f"must be finite and >= 0, got {value}")
        return float(value)
    if kind == _STR:
        if t is not str:
            raise BadField(msg, key, f"expected str, got {t.__name__}")
        return value
    if kind == _BIN:
        if t is not bytes:
            raise BadField(msg, key, f"expected bin, got {t.__name__}")
        return value
    if kind == _MAP:
        if t is not dict:
            raise BadField(msg, key, f"expected map, got {t.__name__}")
        for k in value:
            if type(k) is not str:
                raise BadField(msg, key, f"map key {k!r} is not a string")
        return value
    raise AssertionError(kind)


def _message(msg_type: MsgType | None, **spec: str):
    """Class decorator: a frozen slotted dataclass with its wire spec."""

    def wrap(cls: type) -> type:
        cls = dataclass(frozen=True, slots=True)(cls)
        names = [f.name for f in fields(cls)]
        assert names == list(spec), (cls.__name__, names, list(spec))
        cls.SPEC = dict(spec)
        if msg_type is not None:
            cls.TYPE = msg_type
        return cls

    return wrap


# --- handshake --------------------------------------------------------------

@_message(MsgType.HELLO, version=_INT, guest_id=_INT, token=_STR, pid=_INT)
class Hello(Message):
    version: int
    guest_id: int
    token: str
    pid: int


@_message(MsgType.HELLO, run_id=_STR, tick=_INT, vt_us=_NUM, tick_us=_INT, config=_MAP)
class Welcome(Message):
    run_id: str
    tick: int
    vt_us: float
    tick_us: int
    config: dict


# --- the tick cycle ---------------------------------------------------------

@_message(MsgType.TICK_START, tick=_INT, vt_us=_NUM, tick_us=_INT)
class TickStart(Message):
    tick: int
    vt_us: float
    tick_us: int


@_message(MsgType.TICK_DONE, tick=_INT, vt_us=_NUM, stats=_MAP, accessed=_BIN, dirty=_BIN)
class TickDone(Message):
    """``accessed``/``dirty``: EPT A/D bits, ``np.packbits`` over the guest's gpfns."""

    tick: int
    vt_us: float
    stats: dict
    accessed: bytes
    dirty: bytes


@_message(MsgType.RUN_END, reason=_STR, tick=_INT)
class RunEnd(Message):
    reason: str
    tick: int


# --- memory -----------------------------------------------------------------

@_message(MsgType.EPT_FAULT, gpfns=_PAGES, vt_us=_NUM)
class EptFault(Message):
    gpfns: np.ndarray
    vt_us: float


@_message(MsgType.EPT_FAULT, tokens=_PAGES, done_vt_us=_NUM)
class EptFaultReply(Message):
    tokens: np.ndarray
    done_vt_us: float


@_message(MsgType.INVALIDATE, gpfns=_PAGES)
class Invalidate(Message):
    gpfns: np.ndarray


@_message(MsgType.INVALIDATE, tokens=_PAGES)
class InvalidateReply(Message):
    tokens: np.ndarray


@_message(MsgType.BALLOON_TARGET, target_pages=_INT)
class BalloonTarget(Message):
    target_pages: int


@_message(MsgType.BALLOON_INFLATE, gpfns=_PAGES, vt_us=_NUM)
class BalloonInflate(Message):
    gpfns: np.ndarray
    vt_us: float


@_message(MsgType.BALLOON_DEFLATE, gpfns=_PAGES, vt_us=_NUM)
class BalloonDeflate(Message):
    gpfns: np.ndarray
    vt_us: float


@_message(None, balloon_pages=_INT, done_vt_us=_NUM)
class BalloonReply(Message):
    """Reply to inflate and deflate: the host's count of this guest's balloon."""

    balloon_pages: int
    done_vt_us: float


# --- virtual disk -----------------------------------------------------------

@_message(MsgType.DISK_READ, blocks=_PAGES, vt_us=_NUM)
class DiskRead(Message):
    blocks: np.ndarray
    vt_us: float


@_message(MsgType.DISK_READ, tokens=_PAGES, done_vt_us=_NUM)
class DiskReadReply(Message):
    tokens: np.ndarray
    done_vt_us: float


@_message(MsgType.DISK_WRITE, blocks=_PAGES, tokens=_PAGES, vt_us=_NUM)
class DiskWrite(Message):
    blocks: np.ndarray
    tokens: np.ndarray
    vt_us: float


@_message(MsgType.DISK_WRITE, done_vt_us=_NUM)
class DiskWriteReply(Message):
    done_vt_us: float


# --- liveness and benchmarks ------------------------------------------------

@_message(MsgType.PING, payload=_BIN)
class Ping(Message):
    payload: bytes


@_message(MsgType.PING, payload=_BIN)
class Pong(Message):
    payload: bytes


REQUESTS: dict[MsgType, tuple[type[Message], type[Message]]] = {
    MsgType.HELLO: (Hello, Welcome),
    MsgType.EPT_FAULT: (EptFault, EptFaultReply),
    MsgType.INVALIDATE: (Invalidate, InvalidateReply),
    MsgType.BALLOON_INFLATE: (BalloonInflate, BalloonReply),
    MsgType.BALLOON_DEFLATE: (BalloonDeflate, BalloonReply),
    MsgType.DISK_READ: (DiskRead, DiskReadReply),
    MsgType.DISK_WRITE: (DiskWrite, DiskWriteReply),
    MsgType.PING: (Ping, Pong),
}
"""Request type -> (request class, reply class)."""

NOTIFICATIONS: dict[MsgType, type[Message]] = {
    MsgType.TICK_START: TickStart,
    MsgType.TICK_DONE: TickDone,
    MsgType.RUN_END: RunEnd,
    MsgType.BALLOON_TARGET: BalloonTarget,
}


def msg_type_of(raw: Any) -> MsgType:
    """The ``MsgType`` of a wire value; only a msgpack int names a type (not 60.0, not True)."""
    if type(raw) is not int:
        raise UnknownMessageType(raw)
    try:
        return MsgType(raw)
    except (ValueError, TypeError):
        raise UnknownMessageType(raw) from None
