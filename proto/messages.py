"""Typed messages: one frozen class per message body, validated on decode.

Every message is a request (answered by its reply class), a reply, or a
notification (no answer). Decoding rejects unknown and missing fields and
wrong types with a ``BadField`` naming the field; page-number batches are
msgpack ``bin`` of little-endian ``uint64`` and decode to read-only numpy
views without copying.
"""
from __future__ import annotations

from dataclasses import _FIELD, MISSING, Field, FrozenInstanceError, field, fields  # type: ignore[attr-defined]
from enum import IntEnum
from typing import Any, Callable, ClassVar

import numpy as np

from .errors import BadField, UnknownMessageType

__all__ = [
    "MsgType", "Kind", "Message", "pages_to_bytes",
    "Hello", "Welcome", "ContentReport", "ContentReportReply", "TickStart", "TickDone", "RunEnd",
    "EptFault", "EptFaultReply", "Invalidate", "InvalidateReply",
    "BalloonTarget", "BalloonInflate", "BalloonDeflate", "BalloonReply", "FreeReport", "FreeReportReply",
    "DiskRead", "DiskReadReply", "DiskWrite", "DiskWriteReply", "Audit", "AuditReply",
    "Ping", "Pong", "TickAhead", "REQUESTS", "NOTIFICATIONS", "MAX_PAGES_PER_MESSAGE", "msg_type_of",
    "LockAcquire", "LockRelease", "LockReply", "LockEvent",
    "SharePeek", "SharePeekReply", "ShareProtect", "ShareProtectReply",
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
    CONTENT_REPORT = 5    # guest -> host request, right after Welcome: its content map; reply ContentReportReply
    TICK_START = 10       # host -> guest notification
    TICK_DONE = 11        # guest -> host notification
    RUN_END = 12          # host -> guest notification
    TICK_AHEAD = 13       # host -> guest notification, right after TickStart: the answers to TickDone.ahead
    EPT_FAULT = 20        # guest -> host request
    INVALIDATE = 21       # host -> guest request (TLB shootdown)
    BALLOON_TARGET = 30   # host -> guest notification
    BALLOON_INFLATE = 31  # guest -> host request
    BALLOON_DEFLATE = 32  # guest -> host request
    FREE_REPORT = 33      # guest -> host request: free page reporting (virtio-balloon VIRTIO_BALLOON_F_REPORTING)
    DISK_READ = 40        # guest -> host request
    DISK_WRITE = 41       # guest -> host request
    AUDIT = 50            # host -> guest request, once the last tick is done; reply AuditReply
    PING = 60             # either way; reply Pong
    LOCK_ACQUIRE = 70     # either way: take a lock on behalf of a task; reply LockReply once held
    LOCK_RELEASE = 71     # either way: release it, or give up a pending acquisition; reply LockReply
    LOCK_EVENT = 72       # guest -> host notification: a wait/acquire/release/cancel of the guest's lock
    SHARE_PEEK = 80       # host -> guest request at a tick boundary: what these gpfns hold now; reply SharePeekReply
    SHARE_PROTECT = 81    # host -> guest request at a tick boundary: write-protect these (now shared); reply ShareProtectReply


# Field kinds. Checking with exact types is deliberate: bool is an int in
# Python but not on the wire.
_INT = "int"        # msgpack int >= 0
_NUM = "number"     # int or float, finite and >= 0, decoded as float
_STR = "str"
_BIN = "bin"
_PAGES = "pages"    # bin, length a multiple of 8, <= MAX_PAGES_PER_MESSAGE u64
_MAP = "map"        # str -> any msgpack value
_STATS = "stats"    # a map as _MAP, or an array: the values of the keys the sender's last map named, in order
_LIST = "list"      # msgpack array (the message's own checks look inside)

_INF = float("inf")


_U64 = np.dtype("<u8")   # a dtype object: a string would be parsed on every call


def pages_to_bytes(pages: Any) -> bytes:
    return np.asarray(pages, dtype=_U64).tobytes()


class Message:
    """Base of every typed message body.

    ``SPEC`` maps each field, in order, to its wire kind; the decorator
    below derives ``_FIELDS`` (name, checker) and ``_PAGE_FIELDS`` from it
    once per class, and compiles the class's own ``from_body``,
    ``to_body`` and ``__init__`` from it (``_compile``): straight-line
    code per class, because a host serves every guest request through
    them. The general methods here are what those must agree with.
    """

    TYPE: ClassVar[MsgType]
    SPEC: ClassVar[dict[str, str]]
    _FIELDS: ClassVar[tuple[tuple[str, Callable[[str, str, Any], Any]], ...]]
    _NAMES: ClassVar[tuple[str, ...]]
    _PAGE_FIELDS: ClassVar[tuple[str, ...]]
    _OPTIONAL: ClassVar[frozenset[str]]
    _DEFAULTS: ClassVar[dict[str, Any]]
    __slots__ = ()

    # What ``dataclass(frozen=True, slots=True)`` would write into each class, once here for all of them
    # (``_frozen_slotted``): the same repr, equality, hash, frozen fields and pickling.
    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self._NAMES) + ")"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return tuple(getattr(self, n) for n in self._NAMES) == tuple(getattr(other, n) for n in self._NAMES)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self._NAMES))

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __getstate__(self) -> list[Any]:
        return [getattr(self, n) for n in self._NAMES]

    def __setstate__(self, state: list[Any]) -> None:
        for name, value in zip(self._NAMES, state):
            object.__setattr__(self, name, value)

    def to_body(self) -> dict[str, Any]:
        return self._to_body_general()

    def _to_body_general(self) -> dict[str, Any]:
        """The body of this message, field by field (each class's compiled ``to_body`` must give the same)."""
        out = {}
        for name in self._NAMES:
            value = getattr(self, name)
            # An optional field (added to the protocol later) is left out while it has its default, so
            # a peer that predates it never sees it.
            if name not in self._OPTIONAL or value != self._DEFAULTS[name]:
                out[name] = value
        for name in self._PAGE_FIELDS:
            out[name] = pages_to_bytes(out[name])
        return out

    @classmethod
    def from_body(cls, body: Any) -> "Message":
        return cls._from_body_general(body)

    @classmethod
    def _from_body_general(cls, body: Any) -> "Message":
        """Decode and validate ``body`` (each class's compiled ``from_body`` must agree: value or error)."""
        fields_ = cls._FIELDS
        # Fast path: exactly the expected keys (same count, and every one
        # present implies no unknown one), checked in SPEC order.
        if type(body) is dict and len(body) == len(fields_):
            name = cls.__name__
            values = []
            try:
                for key, check in fields_:
                    values.append(check(name, key, body[key]))
            except KeyError:
                pass  # a key is missing and another unknown: say which below
            else:
                return cls(*values)
        return cls._from_body_slow(body)

    @classmethod
    def _from_body_slow(cls, body: Any) -> "Message":
        """Field by field, so the ``BadField`` names the first problem: unknown, then missing/wrong."""
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
                if key in cls._OPTIONAL:
                    continue   # added to the protocol later, with a default: an older peer omits it
                raise BadField(name, key, "missing field")
            values[key] = _check(name, key, kind, body[key])
        return cls(**values)


def _check_pages(msg: str, key: str, value: Any) -> np.ndarray:
    if type(value) is not bytes:
        raise BadField(msg, key, f"expected bin of little-endian u64, got {type(value).__name__}")
    if len(value) % 8:
        raise BadField(msg, key, f"length {len(value)} is not a multiple of 8")
    if len(value) > MAX_PAGES_PER_MESSAGE * 8:
        raise BadField(msg, key, f"{len(value) // 8} pages exceed the limit of {MAX_PAGES_PER_MESSAGE}")
    return np.frombuffer(value, _U64)


def _check_int(msg: str, key: str, value: Any) -> int:
    if type(value) is not int:
        raise BadField(msg, key, f"expected int, got {type(value).__name__}")
    if value < 0:
        raise BadField(msg, key, f"must be >= 0, got {value}")
    return value


def _check_number(msg: str, key: str, value: Any) -> float:
    t = type(value)
    if t is not float and t is not int:
        raise BadField(msg, key, f"expected number, got {t.__name__}")
    if not 0 <= value < _INF:  # also rejects NaN; inf is no point in virtual time
        raise BadField(msg, key, f"must be finite and >= 0, got {value}")
    return float(value)


def _check_str(msg: str, key: str, value: Any) -> str:
    if type(value) is not str:
        raise BadField(msg, key, f"expected str, got {type(value).__name__}")
    return value


def _check_bin(msg: str, key: str, value: Any) -> bytes:
    if type(value) is not bytes:
        raise BadField(msg, key, f"expected bin, got {type(value).__name__}")
    return value


def _check_map(msg: str, key: str, value: Any) -> dict:
    if type(value) is not dict:
        raise BadField(msg, key, f"expected map, got {type(value).__name__}")
    for k in value:
        if type(k) is not str:
            raise BadField(msg, key, f"map key {k!r} is not a string")
    return value


def _check_stats(msg: str, key: str, value: Any) -> dict | list:
    if type(value) is list:
        return value   # values only: the receiver pairs them with the keys it last saw (and checks them)
    if type(value) is not dict:
        raise BadField(msg, key, f"expected map or array, got {type(value).__name__}")
    return _check_map(msg, key, value)


def _check_list(msg: str, key: str, value: Any) -> list:
    if type(value) is not list:
        raise BadField(msg, key, f"expected array, got {type(value).__name__}")
    return value


_CHECKERS: dict[str, Callable[[str, str, Any], Any]] = {
    _INT: _check_int, _NUM: _check_number, _STR: _check_str, _BIN: _check_bin,
    _PAGES: _check_pages, _MAP: _check_map, _STATS: _check_stats, _LIST: _check_list,
}


def _check(msg: str, key: str, kind: str, value: Any) -> Any:
    """Validate one field of message ``msg``; return its decoded value or raise ``BadField``."""
    return _CHECKERS[kind](msg, key, value)


# What a compiled ``from_body`` tests inline per field kind: a condition that holds only for
# values the kind's checker returns unchanged. Any other value goes through the checker itself
# (which converts it, or raises), so compiled and general paths cannot disagree on an error.
_PASSES = {
    _INT: "type({v}) is int and {v} >= 0",
    _NUM: "type({v}) is float and 0.0 <= {v} < _INF",
    _STR: "type({v}) is str",
    _BIN: "type({v}) is bytes",
    _LIST: "type({v}) is list",
    _STATS: "type({v}) is list",   # a map goes through the checker (its keys)
}
_MAX_PAGE_BYTES = MAX_PAGES_PER_MESSAGE * 8


def _compile(cls: type, spec: dict[str, str]) -> None:
    """Give ``cls`` its own ``from_body``, ``to_body`` and ``__init__``, compiled from its spec.

    They do what ``Message._from_body_general``, ``Message._to_body_general``
    and the dataclass ``__init__`` do (tests pin them together on random
    bodies), without a loop over the fields, a checker call per valid field,
    or ``object.__setattr__`` per field: slots are set through their
    descriptors, which a frozen class's ``__setattr__`` never sees.
    """
    names = list(spec)
    env: dict[str, Any] = {
        "_cls": cls, "_NAME": cls.__name__, "_new": object.__new__, "_slow": cls._from_body_slow,
        "_frombuffer": np.frombuffer, "_asarray": np.asarray, "_ndarray": np.ndarray, "_U64": _U64,
        "_INF": _INF, "_MAX_PAGE_BYTES": _MAX_PAGE_BYTES,
    }
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    required = len(names) - len(defaults)

    def lookup(i: int, name: str, indent: str) -> list[str]:
        return [f"{indent}try:", f"{indent}    v{i} = body[{name!r}]",
                f"{indent}except KeyError:",   # one missing and another unknown: the slow path says which
                f"{indent}    return _slow(body)"]

    def check(i: int, name: str, kind: str, indent: str) -> list[str]:
        v = f"v{i}"
        if kind == _PAGES:
            return [f"{indent}if type({v}) is bytes and not len({v}) % 8 and len({v}) <= _MAX_PAGE_BYTES:",
                    f"{indent}    {v} = _frombuffer({v}, _U64)",
                    f"{indent}else:",
                    f"{indent}    {v} = _check{i}(_NAME, {name!r}, {v})"]
        if kind in _PASSES:
            return [f"{indent}if not ({_PASSES[kind].format(v=v)}):",
                    f"{indent}    {v} = _check{i}(_NAME, {name!r}, {v})"]
        return [f"{indent}{v} = _check{i}(_NAME, {name!r}, {v})"]

    for i, (name, kind) in enumerate(spec.items()):
        env[f"_set{i}"] = cls.__dict__[name].__set__
        env[f"_check{i}"] = _CHECKERS[kind]
        if name in defaults:
            env[f"_default{name}"] = defaults[name]
    # Every field given: each looked up and checked in turn (_from_body_general's fast path).
    full = []
    for i, (name, kind) in enumerate(spec.items()):
        full += lookup(i, name, "    " * (2 if defaults else 1)) + check(i, name, kind, "    " * (2 if defaults else 1))
    if not defaults:
        decode = ["def from_body(body):",
                  f"    if type(body) is not dict or len(body) != {len(names)}:",
                  "        return _slow(body)"] + full
    else:
        # Optional fields left out (Message.to_body omits them at their default): the slow path's order,
        # an unknown key first, then each field in turn.
        part = [f"        found = {required}"]
        checks: list[str] = []
        for i, (name, kind) in enumerate(spec.items()):
            if name in defaults:
                part += ["        try:", f"            v{i} = body[{name!r}]", "            found += 1",
                         "        except KeyError:", f"            v{i} = _default{name}",
                         f"            given{i} = False",
                         "        else:", f"            given{i} = True"]
                checks += [f"        if given{i}:"] + check(i, name, kind, "            ")
            else:
                part += lookup(i, name, "        ")
                checks += check(i, name, kind, "        ")
        decode = ["def from_body(body):",
                  "    if type(body) is not dict:",
                  "        return _slow(body)",
                  f"    if len(body) == {len(names)}:"] + full + [
                  f"    elif {required} <= len(body) < {len(names)}:"] + part + [
                  "        if found != len(body):", "            return _slow(body)"] + checks + [
                  "    else:", "        return _slow(body)"]
    decode += ["    self = _new(_cls)"] + [f"    _set{i}(self, v{i})" for i in range(len(names))] + ["    return self"]

    encode = ["def to_body(self):"]
    items = []
    for i, (name, kind) in enumerate(spec.items()):
        if name in defaults:
            continue
        if kind == _PAGES:   # pages_to_bytes, without its asarray for the usual u64 array
            encode += [f"    v{i} = self.{name}",
                       f"    if type(v{i}) is not _ndarray or v{i}.dtype is not _U64:",
                       f"        v{i} = _asarray(v{i}, dtype=_U64)"]
            items.append(f"{name!r}: v{i}.tobytes()")
        else:
            items.append(f"{name!r}: self.{name}")
    encode.append("    body = {" + ", ".join(items) + "}")
    for name in defaults:   # optional fields carry no pages (asserted in _message)
        encode += [f"    if self.{name} != _default{name}:", f"        body[{name!r}] = self.{name}"]
    encode.append("    return body")

    params = []
    for i, f in enumerate(fields(cls)):
        assert f.default_factory is MISSING and f.init, (cls.__name__, f.name)
        if f.default is MISSING:
            params.append(f.name)
        else:
            env[f"_default{i}"] = f.default
            params.append(f"{f.name}=_default{i}")
    assert not hasattr(cls, "__post_init__"), cls.__name__
    init = [f"def __init__(self, {', '.join(params)}):"] + [f"    _set{i}(self, {name})" for i, name in
                                                            enumerate(names)]

    exec("\n".join(decode + encode + init), env)
    annotations = {f.name: f.type for f in fields(cls)} | {"return": None}   # as a dataclass's __init__ has them
    for fname in ("from_body", "to_body", "__init__"):
        fn = env[fname]
        fn.__qualname__ = f"{cls.__qualname__}.{fname}"
        fn.__module__ = cls.__module__
    env["__init__"].__annotations__ = annotations
    cls.from_body = staticmethod(env["from_body"])
    cls.to_body = env["to_body"]
    cls.__init__ = env["__init__"]


def _frozen_slotted(cls: type) -> type:
    """``cls`` as ``dataclass(frozen=True, slots=True)`` makes it, for a message: its fields (from its own
    annotations, in order, with their defaults) in ``__slots__`` and ``__dataclass_fields__``
    (``dataclasses.fields`` and ``replace`` read them), ``__match_args__``; the methods come from
    ``Message``, and ``__init__`` from ``_compile``. The dataclass decorator compiled six functions per
    class with ``exec``: ~15 ms of every process's start for the protocol's classes."""
    found: dict[str, Field] = {}
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if isinstance(annotation, str) and annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        f = field(default=cls.__dict__.get(name, MISSING))
        f.name, f.type, f._field_type = name, annotation, _FIELD   # type: ignore[attr-defined]
        found[name] = f
    ns = {k: v for k, v in cls.__dict__.items() if k not in found and k not in ("__dict__", "__weakref__")}
    ns["__slots__"] = tuple(found)
    ns["__dataclass_fields__"] = found
    ns["__match_args__"] = tuple(found)
    new = type(cls)(cls.__name__, cls.__bases__, ns)
    new.__qualname__ = cls.__qualname__
    return new


def _message(msg_type: MsgType | None, **spec: str):
    """Class decorator: a frozen slotted class with dataclass fields and its wire spec, and its compiled codecs."""

    def wrap(cls: type) -> type:
        cls = _frozen_slotted(cls)
        names = [f.name for f in fields(cls)]
        assert names == list(spec), (cls.__name__, names, list(spec))
        cls.SPEC = dict(spec)
        cls._FIELDS = tuple((name, _CHECKERS[kind]) for name, kind in spec.items())
        cls._NAMES = tuple(spec)
        cls._PAGE_FIELDS = tuple(name for name, kind in spec.items() if kind == _PAGES)
        cls._OPTIONAL = frozenset(f.name for f in fields(cls) if f.default is not MISSING)
        cls._DEFAULTS = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        assert not any(spec[name] == _PAGES for name in cls._OPTIONAL), cls.__name__
        if msg_type is not None:
            cls.TYPE = msg_type
        _compile(cls, spec)
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


@_message(MsgType.CONTENT_REPORT, ranges=_LIST)
class ContentReport(Message):
    """What the guest's pages hold, as ``proto.content.ContentMap.to_wire()``: sent once, right after
    Welcome (the guest learns its regions from Welcome's config), before its vCPU starts. A guest
    that never sends it is all private, "mixed" compressibility (the empty map)."""

    ranges: list


@_message(MsgType.CONTENT_REPORT, ranges=_INT)
class ContentReportReply(Message):
    """The host took the map: how many ranges it holds."""

    ranges: int


# --- the tick cycle ---------------------------------------------------------

@_message(MsgType.TICK_START, tick=_INT, vt_us=_NUM, tick_us=_INT)
class TickStart(Message):
    tick: int
    vt_us: float
    tick_us: int


@_message(MsgType.TICK_DONE, tick=_INT, vt_us=_NUM, stats=_STATS, accessed=_BIN, dirty=_BIN, ahead=_BIN,
          ahead_seen=_INT)
class TickDone(Message):
    """``accessed``/``dirty``: EPT A/D bits, ``np.packbits`` over the guest's gpfns.

    ``ahead`` (only to a host whose Welcome config offers ``ahead_chain``):
    the requests the next tick's first batch certainly makes first, as a read
    chain's program from its first reference at ``vt_us`` (proto/README.md,
    "Answers ahead"); ``ahead_seen``: how many of the host's requests and
    notifications other than TickStart, TickAhead, RunEnd and Ping the guest
    had received when it parked. Empty: none; a guest that offers one waits
    for the host's ``TickAhead`` after its next ``TickStart``.

    ``stats``: a map, or an array of the values of the keys the guest's last
    map named, in that order (proto/README.md, ``TickDone.stats``)."""

    tick: int
    vt_us: float
    stats: dict | list
    accessed: bytes
    dirty: bytes
    ahead: bytes = b""
    ahead_seen: int = 0


@_message(MsgType.TICK_AHEAD, tick=_INT, tokens=_PAGES, times=_BIN)
class TickAhead(Message):
    """The answers to the last ``TickDone.ahead``, sent right after ``TickStart`` of ``tick``: ``tokens`` of
    each request served in order (1 per read, n per fault of n pages), ``times`` float64 (start,
    completion) per request served. Empty: none served (the guest sends them itself)."""

    tick: int
    tokens: np.ndarray
    times: bytes


@_message(MsgType.RUN_END, reason=_STR, tick=_INT)
class RunEnd(Message):
    reason: str
    tick: int


# --- memory -----------------------------------------------------------------

@_message(MsgType.EPT_FAULT, gpfns=_PAGES, vt_us=_NUM, fresh=_BIN)
class EptFault(Message):
    """Back ``gpfns``. ``fresh`` is ``np.packbits`` over them (``ceil(n/8)`` bytes, or empty: none):
    a set bit says the guest overwrites that page entirely before reading it, so the host need
    not restore its content (no swap-in read; token 0 comes back)."""
    gpfns: np.ndarray
    vt_us: float
    fresh: bytes = b""


@_message(MsgType.EPT_FAULT, tokens=_PAGES, done_vt_us=_NUM)
class EptFaultReply(Message):
    tokens: np.ndarray
    done_vt_us: float


@_message(MsgType.INVALIDATE, gpfns=_PAGES)
class Invalidate(Message):
    gpfns: np.ndarray


@_message(MsgType.INVALIDATE, tokens=_PAGES, labels=_BIN)
class InvalidateReply(Message):
    """The tokens the gpfns held. ``labels`` (``np.packbits`` over the gpfns, or empty) marks the
    pages that were clean page cache in the guest: instrumentation only, so the host can attribute
    its real swap I/O; the host never decides anything from it."""
    tokens: np.ndarray
    labels: bytes = b""


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


@_message(MsgType.FREE_REPORT, gpfns=_PAGES, vt_us=_NUM)
class FreeReport(Message):
    """Free page reporting: these gpfns are free in the guest (blocks that stayed free); the host
    discards what backs them (frame, swap slot, compressed copy) and they become unbacked: the
    next touch is an ordinary EPT fault that maps a fresh zero page."""

    gpfns: np.ndarray
    vt_us: float


@_message(MsgType.FREE_REPORT, discarded_frames=_INT, done_vt_us=_NUM)
class FreeReportReply(Message):
    discarded_frames: int
    done_vt_us: float


# --- virtual disk -----------------------------------------------------------

@_message(MsgType.DISK_READ, blocks=_PAGES, vt_us=_NUM, chain=_BIN)
class DiskRead(Message):
    """Read ``blocks``. ``chain`` (one block only; only to a host whose Welcome config offers ``read_chain``):
    the reads that certainly follow this one, as a program of clock steps and checks the host runs to
    serve them too (proto/README.md, "Read chains"); empty: none."""
    blocks: np.ndarray
    vt_us: float
    chain: bytes = b""


@_message(MsgType.DISK_READ, tokens=_PAGES, done_vt_us=_NUM, chain_vt_us=_BIN)
class DiskReadReply(Message):
    """The content token of each block, in order. With ``chain``: one more token per chained read served,
    ``done_vt_us`` is the last read's completion, and ``chain_vt_us`` (float64 little-endian) holds the
    first read's completion, then each chained read's start and completion; empty: no chained read."""
    tokens: np.ndarray
    done_vt_us: float
    chain_vt_us: bytes = b""


@_message(MsgType.DISK_WRITE, blocks=_PAGES, tokens=_PAGES, vt_us=_NUM)
class DiskWrite(Message):
    blocks: np.ndarray
    tokens: np.ndarray
    vt_us: float


@_message(MsgType.DISK_WRITE, done_vt_us=_NUM)
class DiskWriteReply(Message):
    done_vt_us: float


# --- end-of-run audit --------------------------------------------------------

@_message(MsgType.AUDIT, first=_INT, count=_INT)
class Audit(Message):
    """After the last tick: where does the guest say each of its pages is?

    Asks about gpfns and disk blocks in ``[first, first + count)``; the host
    asks window by window so a reply stays well inside one frame.
    """

    first: int
    count: int


@_message(MsgType.AUDIT, ram_gpfns=_PAGES, ram_tokens=_PAGES, ram_backed=_BIN, disk_blocks=_PAGES,
          disk_tokens=_PAGES, balloon_gpfns=_PAGES, report=_MAP)
class AuditReply(Message):
    """The guest's claims, for the host to check against its own books.

    ``ram_gpfns``: gpfns in the window holding a page (resident or a clean
    soft-reclaimed copy); ``ram_tokens``: the token each must hold (what the
    guest last wrote); ``ram_backed``: one byte per entry, 1 if the guest
    believes the host backs that gpfn (else the host must hold it in swap).
    ``disk_blocks``/``disk_tokens``: blocks in the window that are the only
    up-to-date copy of a page, and the token each must hold (0: a file block
    never written). ``balloon_gpfns``: the guest's balloon frames in the
    window. ``report``: the guest's own totals and self-check
    (``balloon_pages``, ``lost_pages``, ``problems``: a list of strings).
    """

    ram_gpfns: np.ndarray
    ram_tokens: np.ndarray
    ram_backed: bytes
    disk_blocks: np.ndarray
    disk_tokens: np.ndarray
    balloon_gpfns: np.ndarray
    report: dict


# --- locks (proto.locks) -------------------------------------------------------

@_message(MsgType.LOCK_ACQUIRE, lock=_STR, owner=_STR, site=_STR, vt_us=_NUM)
class LockAcquire(Message):
    """Take ``lock`` (a class label: the host's ``L_hostmem``, a guest's ``L_vmem``) for ``owner``
    (``"proc/task"``, the task on whose behalf); answered when it is held."""

    lock: str
    owner: str
    site: str
    vt_us: float


@_message(MsgType.LOCK_RELEASE, lock=_STR, owner=_STR, site=_STR, vt_us=_NUM)
class LockRelease(Message):
    """Release one level of ``owner``'s hold, or give up its pending ``LockAcquire``."""

    lock: str
    owner: str
    site: str
    vt_us: float


@_message(None, done_vt_us=_NUM)
class LockReply(Message):
    done_vt_us: float


@_message(MsgType.LOCK_EVENT, op=_STR, lock=_STR, owner=_STR, task=_STR, site=_STR, vt_us=_NUM)
class LockEvent(Message):
    """One transition of a guest's lock (``op``: wait, acquire, release, cancel), in the order it happened."""

    op: str
    lock: str
    owner: str
    task: str
    site: str
    vt_us: float


# --- page sharing (hostd.sharing) --------------------------------------------------

@_message(MsgType.SHARE_PEEK, gpfns=_PAGES)
class SharePeek(Message):
    """The page-sharing scanner reads these gpfns (the guest is parked at a tick boundary): nothing is
    invalidated, nothing is charged to the guest (a hypervisor reads guest memory directly)."""

    gpfns: np.ndarray


@_message(MsgType.SHARE_PEEK, tokens=_PAGES)
class SharePeekReply(Message):
    """The token each gpfn's frame holds now; ``KEEP_TOKEN`` where it holds no page of the guest's
    (a free, balloon or kernel frame: not the scanner's to share)."""

    tokens: np.ndarray


@_message(MsgType.SHARE_PROTECT, gpfns=_PAGES)
class ShareProtect(Message):
    """These gpfns are now backed by shared frames: a write to one must fault to the host first
    (an ``EptFault`` on it is the copy-on-write break; its reply is ``KEEP_TOKEN``)."""

    gpfns: np.ndarray


@_message(MsgType.SHARE_PROTECT, pages=_INT)
class ShareProtectReply(Message):
    """How many gpfns the guest write-protected."""

    pages: int


# --- liveness and benchmarks ------------------------------------------------

@_message(MsgType.PING, payload=_BIN)
class Ping(Message):
    payload: bytes


@_message(MsgType.PING, payload=_BIN)
class Pong(Message):
    payload: bytes


REQUESTS: dict[MsgType, tuple[type[Message], type[Message]]] = {
    MsgType.HELLO: (Hello, Welcome),
    MsgType.CONTENT_REPORT: (ContentReport, ContentReportReply),
    MsgType.EPT_FAULT: (EptFault, EptFaultReply),
    MsgType.INVALIDATE: (Invalidate, InvalidateReply),
    MsgType.BALLOON_INFLATE: (BalloonInflate, BalloonReply),
    MsgType.BALLOON_DEFLATE: (BalloonDeflate, BalloonReply),
    MsgType.FREE_REPORT: (FreeReport, FreeReportReply),
    MsgType.DISK_READ: (DiskRead, DiskReadReply),
    MsgType.DISK_WRITE: (DiskWrite, DiskWriteReply),
    MsgType.AUDIT: (Audit, AuditReply),
    MsgType.PING: (Ping, Pong),
    MsgType.LOCK_ACQUIRE: (LockAcquire, LockReply),
    MsgType.LOCK_RELEASE: (LockRelease, LockReply),
    MsgType.SHARE_PEEK: (SharePeek, SharePeekReply),
    MsgType.SHARE_PROTECT: (ShareProtect, ShareProtectReply),
}
"""Request type -> (request class, reply class)."""

NOTIFICATIONS: dict[MsgType, type[Message]] = {
    MsgType.TICK_START: TickStart,
    MsgType.TICK_DONE: TickDone,
    MsgType.RUN_END: RunEnd,
    MsgType.TICK_AHEAD: TickAhead,
    MsgType.BALLOON_TARGET: BalloonTarget,
    MsgType.LOCK_EVENT: LockEvent,
}


def msg_type_of(raw: Any) -> MsgType:
    """The ``MsgType`` of a wire value; only a msgpack int names a type (not 60.0, not True)."""
    if type(raw) is not int:
        raise UnknownMessageType(raw)
    try:
        return MsgType(raw)
    except (ValueError, TypeError):
        raise UnknownMessageType(raw) from None
