"""Liveness by heartbeat: is the peer alive, however slow it is?

A per-call timeout cannot tell a dead peer from a slow one: on a machine
loaded fifty times over, a host that is merely busy misses any fixed bound,
and its guests would give up on a run that was going fine. So calls wait
for as long as the peer is *alive*, and liveness is proved separately:

- each side notes when the peer last sent anything (``RpcConnection.heard_at``);
- when the peer has been quiet for ``interval_s``, ``Heartbeat`` sends it a
  ``Ping``; every peer answers ``Ping`` at once from its event loop, whatever
  else it is doing (a reply does not wait for the vCPU or for a lock);
- a peer silent for ``silent_s`` is dead or stopped (SIGSTOP, a hung event
  loop, a cable pulled): ``on_silent`` is called once.

A heartbeat costs nothing while the peer talks anyway: pings go out only
into silence. ``Heartbeat`` uses one timer and at most one ping in flight.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from .errors import ProtoError
from .messages import Ping
from .rpc import RpcConnection

__all__ = ["Heartbeat", "HEARTBEAT_S_DEFAULT", "HOST_SILENT_S_DEFAULT", "LIVENESS_KEY"]

HEARTBEAT_S_DEFAULT = 1.0
HOST_SILENT_S_DEFAULT = 60.0   # a guest gives up on a host it has not heard from for this long
LIVENESS_KEY = "liveness"      # Welcome.config[LIVENESS_KEY] = {"heartbeat_s": float, "host_silent_s": float}


class Heartbeat:
    """Pings ``conn``'s peer whenever it has been quiet for ``interval_s``; reports silence past ``silent_s``.

    Call order::

        Heartbeat(conn, ...) -> start() -> [on_silent(quiet_s)] -> stop()   (also stops when the connection closes)
    """

    def __init__(self, conn: RpcConnection, interval_s: float = HEARTBEAT_S_DEFAULT, silent_s: float = 0.0,
                 on_silent: Callable[[float], None] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 s, got {interval_s}")
        self.conn = conn
        self.interval_s = interval_s
        self.silent_s = silent_s          # 0: never report silence (someone else judges it)
        self.on_silent = on_silent
        self.pings_sent = 0
        self.pongs_received = 0
        self.silent_reported = False
        self._handle: asyncio.TimerHandle | None = None
        self._ping: asyncio.Future | None = None

    def configure(self, interval_s: float, silent_s: float) -> None:
        """New bounds (e.g. what the host said in Welcome); pings go out at least thrice per silence bound."""
        self.silent_s = silent_s
        self.interval_s = min(interval_s, silent_s / 3) if silent_s > 0 else interval_s
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self.start()

    def start(self) -> None:
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._beat)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._ping is not None and not self._ping.done():
            self._ping.cancel()

    def quiet_s(self) -> float:
        """Wall seconds since the peer last sent anything."""
        return asyncio.get_running_loop().time() - self.conn.heard_at

    def _beat(self) -> None:
        self._handle = None
        conn = self.conn
        if conn.is_closing:
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - conn.heard_at
        if self.silent_s > 0 and quiet >= self.silent_s and not self.silent_reported:
            self.silent_reported = True
            if self.on_silent is not None:
                self.on_silent(quiet)
            if conn.is_closing:
                return
        elif quiet < self.silent_s:
            self.silent_reported = False
        if quiet >= self.interval_s and (self._ping is None or self._ping.done()):
            self.pings_sent += 1
            self._ping = asyncio.ensure_future(conn.call(Ping(b""), timeout_s=0))
            self._ping.add_done_callback(self._pong)
        # Wake at the next interval, or right when the silence bound is due if that is sooner.
        wait = self.interval_s
        if self.silent_s > 0 and not self.silent_reported:
            wait = min(wait, max(0.01, self.silent_s - quiet))
        self._handle = loop.call_later(wait, self._beat)

    def _pong(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()   # retrieved, so a closed connection is not an "unretrieved" error
        if exc is None:
            self.pongs_received += 1
        elif not isinstance(exc, (ProtoError, ConnectionError)):
            raise exc
