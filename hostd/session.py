"""One guest's session on the host.

Call order (states in capitals)::

    NEW --Hello ok--> ACTIVE --(TickStart -> TickDone)*--> ENDING --close--> GONE
    NEW --Hello refused / handshake timeout--> GONE
    ACTIVE --connection lost--> GONE   (the host releases everything it held)

Before the handshake only ``Hello`` is accepted. The session's handlers for
memory and disk requests are installed by the host after the handshake.
"""
from __future__ import annotations

import enum
import time
from typing import Any, Callable

import numpy as np

from proto.messages import MsgType, TickDone
from proto.rpc import NotifyHandler, RequestHandler, RpcConnection

__all__ = ["SessionState", "GuestSession"]


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
        self.last_tick_done = -1                    # highest tick the guest finished
        self.last_vt_us = 0.0
        self.unresponsive = False                   # taken out of the tick barrier
        self.disconnect_reason = ""
        self.rejected: dict[str, int] = {}          # refused requests by reason code name

    @property
    def active(self) -> bool:
        return self.state is SessionState.ACTIVE

    def activate(self, guest_id: int, pid: int, requests: dict[MsgType, RequestHandler],
                 on_tick_done: Callable[["GuestSession", TickDone], None],
                 extra_notifications: dict[MsgType, NotifyHandler] | None = None) -> None:
        self.guest_id = guest_id
        self.pid = pid
        self.state = SessionState.ACTIVE
        self.conn.name = f"guest-{guest_id}"
        self.conn.requests = dict(requests)
        notes: dict[MsgType, NotifyHandler] = {MsgType.TICK_DONE: lambda m: on_tick_done(self, m)}  # type: ignore[arg-type, misc]
        notes.update(extra_notifications or {})
        self.conn.notifications = notes

    def count_rejection(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def unpack_bits(packed: bytes, n_bits: int) -> np.ndarray:
    """EPT A/D bitmaps arrive as np.packbits; a wrong length is the guest's fault."""
    arr = np.frombuffer(packed, dtype=np.uint8)
    if arr.size != (n_bits + 7) // 8:
        raise ValueError(f"bitmap of {arr.size} bytes, expected {(n_bits + 7) // 8} for {n_bits} gpfns")
    return np.unpackbits(arr, count=n_bits).astype(bool)
