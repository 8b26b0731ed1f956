"""One guest's session on the host.

Call order (states in capitals)::

    NEW --Hello ok--> ACTIVE --(TickStart -> TickDone)*--> ENDING --close--> GONE
    NEW --Hello refused / handshake timeout--> GONE
    ACTIVE --connection lost--> GONE   (the host releases everything it held)

Before the handshake only ``Hello`` is accepted. The session's handlers for
memory and disk requests are installed by the host after the handshake
(``hostd.handlers`` builds both tables).
"""
from __future__ import annotations

import enum
import math
import time
from typing import Any, Callable, Mapping

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.messages import Message, MsgType, TickDone
from balloonlab.proto.rpc import NotifyHandler, RequestHandler, RpcConnection, RpcLimits

from ._books import plausible_stats, plausible_values

__all__ = ["SessionState", "GuestSession", "GuestConnection", "sanitize_stats", "check_tick_done", "MAX_STAT_KEYS",
           "MAX_STAT_VALUE", "TICK_DONE_SLACK_US"]

MAX_STAT_KEYS = 128           # a guest's stats map: more keys than any guest reports are dropped
MAX_STAT_KEY_CHARS = 64
MAX_STAT_VALUE = float(2 ** 53)  # counters and gauges beyond this are nonsense (and lose int precision)
# How far past its tick's end a guest's clock may be when it reports the tick done. A vCPU
# stops a batch of references only after it, so one batch can overshoot: 8192 references
# that all miss on the hdd profile stall about 65 virtual seconds. Beyond this it is nonsense.
TICK_DONE_SLACK_US = 300e6
_NUMBER_TYPES = frozenset((int, float))   # exactly: a bool is refused


class SessionState(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    ENDING = "ending"
    GONE = "gone"


class GuestSession:
    """State the host keeps per connected guest."""

    def __init__(self, conn: RpcConnection) -> None:
        self.conn = conn
        self.state = SessionState.NEW
        self.guest_id: int | None = None
        self.pid: int | None = None
        self.connected_wall_s = time.monotonic()
        self.last_stats: dict[str, Any] = {}       # the guest's latest TickDone.stats
        # the keys of its last TickDone.stats sent as a map, in order: what a stats array's values belong to
        self.stats_keys: tuple[str, ...] | None = None
        self.last_tick_done = -1                    # highest tick the guest finished
        self.last_vt_us = 0.0
        self.excused_ticks: set[int] = set()        # ticks the host counted done for it (its request was held)
        # TickDone.ahead of its last park, until the next TickStart answers it: (tick, program, vt_us, seen)
        self.ahead: tuple[int, list[float], float, int] | None = None
        self.unresponsive = False                   # taken out of the tick barrier
        self.disconnect_reason = ""
        self.rejected: dict[str, int] = {}          # refused requests by reason code name
        self.handshake_timer: Any = None            # the handshake deadline (an asyncio.TimerHandle) until it is met
        self.heartbeat: Any = None                  # its proto.liveness.Heartbeat once authenticated

    @property
    def active(self) -> bool:
        return self.state is SessionState.ACTIVE

    def activate(self, guest_id: int, pid: int, requests: Mapping[MsgType, RequestHandler],
                 notifications: Mapping[MsgType, NotifyHandler]) -> None:
        """The handshake succeeded: the guest's own handler table replaces the handshake's."""
        self.guest_id = guest_id
        self.pid = pid
        self.state = SessionState.ACTIVE
        self.conn.name = f"guest-{guest_id}"
        self.conn.requests = dict(requests)
        self.conn.notifications = dict(notifications)

    def count_rejection(self, reason: str) -> int:
        """Count one refusal; returns how many of this reason this session has had."""
        n = self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return n


_UNTOUCHED = frozenset((MsgType.TICK_START, MsgType.TICK_AHEAD, MsgType.RUN_END, MsgType.PING))


class GuestConnection(RpcConnection):
    """The host's end of one guest connection: every refusal reported, reads paused while writes are.

    The guest is untrusted. Every error reply the connection sends (a bad
    frame, an unknown type, a bad field, a request before the handshake,
    too many requests, a refusal by host memory) goes through
    ``on_refused`` first, so the host counts each by its code. And while
    the guest does not read what the host writes to it (the send buffer is
    above its high-water mark), the host reads nothing more from it: a
    guest that floods requests without reading the replies is throttled by
    its own socket instead of growing the host's buffers.
    """

    def __init__(self, *, on_refused: Callable[["GuestConnection", int, int, str], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_refused = on_refused
        self.read_pauses = 0
        self.refuse_at_once = False   # over the pending-handshake limit: closed as soon as it is accepted
        # the host's own requests and notifications that may touch the guest's state, sent so far (not
        # TickStart, TickAhead, RunEnd, Ping): the guest says how many it had seen when it parked
        # (TickDone.ahead_seen), and answers ahead are only for a guest nothing has touched since
        self.touches = 0

    def notify(self, msg: Message) -> None:
        if msg.TYPE not in _UNTOUCHED:
            self.touches += 1
        super().notify(msg)

    def notify_together(self, *msgs: Message) -> None:
        self.touches += sum(m.TYPE not in _UNTOUCHED for m in msgs)
        super().notify_together(*msgs)

    def notify_framed(self, msg: Message, frame: bytes, *more: Message) -> None:
        self.touches += (msg.TYPE not in _UNTOUCHED) + sum(m.TYPE not in _UNTOUCHED for m in more)
        super().notify_framed(msg, frame, *more)

    async def call(self, msg: Message, timeout_s: float | None = None) -> Message:
        if msg.TYPE not in _UNTOUCHED:
            self.touches += 1
        return await super().call(msg, timeout_s)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.refuse_at_once:
            self.stop_receiving()
            transport.abort()

    def authenticated(self, limits: RpcLimits) -> None:
        """The handshake succeeded: from now on the guest's bounds are ``limits`` (full-size frames)."""
        self.limits = limits
        self._decoder.max_frame_bytes = limits.max_frame_bytes
        self._decoder.set_limits(limits.decode)
        self._encoder.max_frame_bytes = limits.max_frame_bytes

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.pause_reading()
            except RuntimeError:
                return  # closing meanwhile
            self.read_pauses += 1
            if self.read_pauses == 1:
                structlog.get_logger("hostd").warning(
                    ev.GUEST_THROTTLED, guest=getattr(getattr(self, "session", None), "guest_id", None),
                    send_buffer_bytes=self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.resume_reading()
            except RuntimeError:
                pass

    @property
    def in_progress(self) -> int:
        """Requests of the guest's that the host is still working on."""
        return self._incoming

    def send_error(self, msg_type: int, code: int, message: str) -> None:
        """An error tied to no request (id 0), e.g. about a bad notification; it is not activity."""
        self._active = False   # a refused TickDone must not keep a stuck guest looking busy
        self._send_error(0, int(msg_type), int(code), message)

    def _send_error(self, req_id: int, msg_type: int, code: int, message: str) -> None:
        if not self.is_closing and self.on_refused is not None:
            self.on_refused(self, int(code), int(msg_type), message)
        super()._send_error(req_id, msg_type, code, message)


def sanitize_stats(stats: dict[str, Any] | list[Any],
                   keys: tuple[str, ...] | None = None) -> tuple[dict[str, float], list[str]]:
    """Keep the guest's stats that are plausible numbers; name the first few that are not.

    ``stats`` is a map, or an array of the values of ``keys`` (the keys of
    the guest's last map, in order; ``check_tick_done`` has matched their
    counts). Balloon controllers do arithmetic on these; a string, NaN, a
    negative or an astronomically large value from a hostile guest must not
    reach them. Values are counters and gauges: finite, >= 0, <=
    ``MAX_STAT_VALUE``.
    """
    # Every TickDone of every guest comes through here: the common case (all plausible) in one compiled
    # pass, else a few passes in C. A NaN makes the sum NaN (min and max may skip it); an infinity fails
    # one of the bounds.
    if type(stats) is list:
        if keys is None or len(keys) != len(stats):
            return {}, [f"an array of {len(stats)} values, but the last map named "
                        f"{'no' if keys is None else len(keys)} keys"]
        clean = plausible_values(keys, stats, MAX_STAT_KEYS, MAX_STAT_KEY_CHARS, MAX_STAT_VALUE)
        if clean is not None:
            return clean, []
        return _sanitize_in_python(dict(zip(keys, stats)))
    clean_copy = plausible_stats(stats, MAX_STAT_KEYS, MAX_STAT_KEY_CHARS, MAX_STAT_VALUE) \
        if type(stats) is dict else None
    if clean_copy is not None:
        return clean_copy, []
    return _sanitize_in_python(stats)


def _sanitize_in_python(stats: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """``sanitize_stats`` in Python: the definition its compiled common case must agree with."""
    vals = stats.values()
    if (0 < len(stats) <= MAX_STAT_KEYS and set(map(type, vals)) <= _NUMBER_TYPES
            and max(map(len, stats)) <= MAX_STAT_KEY_CHARS):
        total = sum(vals)
        if total == total and min(vals) >= 0 and max(vals) <= MAX_STAT_VALUE:
            return dict(stats), []
    clean: dict[str, float] = {}
    problems: list[str] = []
    for key, value in stats.items():
        if len(clean) >= MAX_STAT_KEYS:
            problems.append(f"more than {MAX_STAT_KEYS} keys; the rest dropped")
            break
        if len(key) > MAX_STAT_KEY_CHARS:
            problems.append(f"key {key[:20]!r}...: longer than {MAX_STAT_KEY_CHARS} characters")
        elif type(value) is not int and type(value) is not float:
            problems.append(f"{key}: expected a number, got {type(value).__name__}")
        elif not (0 <= value <= MAX_STAT_VALUE and math.isfinite(value)):
            problems.append(f"{key}: {value!r} is not a finite number in [0, 2**53]")
        else:
            clean[key] = value
    return clean, problems[:8]


def check_tick_done(msg: TickDone, tick_us: int, ram_pages: int,
                    stats_keys: tuple[str, ...] | None = None) -> str | None:
    """Why this ``TickDone`` must be refused whole, or None.

    Its clock must lie in its own tick, give or take the overshoot of the
    vCPU's last batch: ``tick * tick_us <= vt_us < (tick + 1) * tick_us +
    TICK_DONE_SLACK_US``. Its A/D bitmaps are empty or exactly one bit per
    gpfn. Its stats say something: a map, or an array of as many values as
    ``stats_keys`` (the keys of the guest's last map) names. (Stat values
    out of range are dropped one by one later, by ``sanitize_stats``; the
    tick still counts.)
    """
    start_us = float(msg.tick) * tick_us
    if not start_us <= msg.vt_us < start_us + tick_us + TICK_DONE_SLACK_US:
        return (f"TickDone.vt_us: {msg.vt_us!r} is outside tick {msg.tick}'s [{start_us:.0f}, "
                f"{start_us + tick_us + TICK_DONE_SLACK_US:.0f}) us (its start, to its end plus "
                f"{TICK_DONE_SLACK_US / 1e6:g} s of overshoot)")
    want = (ram_pages + 7) // 8
    for name in ("accessed", "dirty"):
        got = len(getattr(msg, name))
        if got not in (0, want):
            return (f"TickDone.{name}: {got} bytes; expected {want} (one bit per gpfn of {ram_pages}) or 0 "
                    f"(nothing to report); the tick was not taken")
    if not msg.stats:
        return "TickDone.stats: empty; a guest reports its counters every tick (proto/README.md, TickDone.stats)"
    if type(msg.stats) is list and (stats_keys is None or len(stats_keys) != len(msg.stats)):
        if stats_keys is None:
            return (f"TickDone.stats: an array of {len(msg.stats)} values before any map named their keys "
                    "(the first TickDone of a connection, and any whose keys change, sends a map)")
        return (f"TickDone.stats: an array of {len(msg.stats)} values; the guest's last map named "
                f"{len(stats_keys)} keys (a TickDone whose keys change sends a map)")
    return None


def unpack_bits(packed: bytes, n_bits: int) -> np.ndarray:
    """EPT A/D bitmaps arrive as np.packbits; a wrong length is the guest's fault."""
    arr = np.frombuffer(packed, dtype=np.uint8)
    if arr.size != (n_bits + 7) // 8:
        raise ValueError(f"bitmap of {arr.size} bytes, expected {(n_bits + 7) // 8} for {n_bits} gpfns")
    return np.unpackbits(arr, count=n_bits).astype(bool)
