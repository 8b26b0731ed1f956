"""What the machine needs from a request discipline, and the defaults every mode starts from.

A request discipline decides *when* and *under what* the guests' memory
and disk requests are served, and where a TLB shootdown may land in a
guest's run. The machine never asks which mode it runs; it calls this
interface at fixed points:

    assembly:            memory_callout(), memory_hold()   (handed to host memory), floor_grants(floor_only)
    guest joins:         guest_joined(gid) -> serve(gid, requests)   (its handler table)
    liveness:            guard_holds(bound_s, cut_off)   (a guest keeping a host lock too long)
    guest goes silent:   guest_silent(gid)          (the watchdog gave up on it)
    guest leaves:        guest_left(gid)
    each tick:           tick_started(tick, vt_us, mem) -> [tick_done(gid, vt_us)]*
                         -> finish_tick() -> balance(mem, vt_us)    (False: skip the tick's end)
    each shootdown:      await shootdown(session, gpfns, invalidate)
    at the end:          close() -> stats()

``DisciplineBase`` is the mode that adds nothing: requests are served as
they arrive, concurrently (``arrival``). A mode overrides what it changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncContextManager, Awaitable, Callable, Collection, Mapping, Protocol

import numpy as np

from balloonlab.proto.messages import MsgType
from balloonlab.proto.rpc import NotifyHandler, RequestHandler

if TYPE_CHECKING:
    from ..memory import HostMemory, Reclaimed
    from ..registry import SessionRegistry
    from ..session import GuestSession

__all__ = ["RequestDiscipline", "DisciplineBase", "DisciplineContext", "GuestHandlers", "Invalidate"]

Invalidate = Callable[[], Awaitable[np.ndarray]]
"""Sends the Invalidate of one shootdown and returns the tokens the guest held."""


@dataclass(frozen=True)
class GuestHandlers:
    """One guest's requests and notifications as a mode serves them (``hostd.handlers`` installs them)."""

    requests: dict[MsgType, RequestHandler]
    notifications: dict[MsgType, NotifyHandler] = field(default_factory=dict)


@dataclass(frozen=True)
class DisciplineContext:
    """What a mode may need from the host around it (``hostd.assembly`` builds it)."""

    sessions: "SessionRegistry"
    running: Callable[[], Collection[int]]   # guests that may still send requests this tick (the barrier)
    stop: Callable[[str], None]              # end the run, with a reason
    clock: Callable[[], float]               # the host's virtual time now (µs)
    hypercall_us: float
    shootdown_timeout_s: float
    count_done: Callable[[int], None] = lambda gid: None   # the host counts the guest done with this tick
    tick_us: float = 10_000.0
    ref_us: float = 0.0                      # one reference's cost (mem_ref_us + cpu_us_per_ref)
    overshoot_us: float = 0.0                # past the gate beyond one reference (zero fill, a balloon round)
    last_tick: int | None = None             # the run's last tick: guests finish their fault in flight there


class RequestDiscipline(Protocol):
    request_order: str
    """Reported in ``run_finished.request_order``: ``deterministic`` or ``arrival``."""
    guests_park_at_gate: bool
    """The guests park at each tick's end: host memory stops a fault of several pages there."""

    def serve(self, guest_id: int, requests: Mapping[MsgType, RequestHandler]) -> GuestHandlers:
        """The guest's memory and disk handlers as this mode serves them, plus the mode's own messages."""
        ...

    def memory_callout(self) -> Callable[[], AsyncContextManager[Any]] | None:
        """Run around every wait of host memory for a guest (``HostMemory`` ``callout``); None: nothing."""
        ...

    def memory_hold(self) -> Callable[[int, int, float], Awaitable[float]] | None:
        """``async (guest_id, need_frames, vt_us) -> resume_vt_us``: where host memory parks a request
        whose guest's grant ran out (``HostMemory`` ``hold``); None: the mode has no grants."""
        ...

    def floor_grants(self, floor_only: Callable[[int], bool]) -> None:
        """A guest for which ``floor_only(gid)`` holds at a tick's start gets only a floor of a grant (the
        memory states); a mode without grants ignores it."""
        ...

    def guest_joined(self, guest_id: int) -> None: ...

    def guard_holds(self, bound_s: float, cut_off: Callable[[int, str], None]) -> None:
        """A guest that keeps something of the mode's (a host lock) for ``bound_s`` while others wait for it
        loses it and is ``cut_off(gid, why)``; a mode with nothing a guest can keep does nothing."""
        ...

    def guest_left(self, guest_id: int) -> None: ...

    def guest_silent(self, guest_id: int) -> None:
        """The watchdog took the guest out of the barrier: nothing may wait for it any more."""
        ...

    def tick_started(self, tick: int, vt_us: float, mem: "HostMemory") -> None: ...

    def tick_done(self, guest_id: int, vt_us: float) -> None:
        """The guest finished its tick at ``vt_us`` (its own clock)."""
        ...

    async def shootdown(self, session: "GuestSession", gpfns: np.ndarray, invalidate: Invalidate) -> np.ndarray:
        """Run ``invalidate`` when, and under what, this mode lets a shootdown reach the guest."""
        ...

    async def finish_tick(self) -> bool:
        """Wait for the mode's own work in the tick; False when the tick cannot end (the run is ending)."""
        ...

    async def balance(self, mem: "HostMemory", vt_us: float) -> "Reclaimed":
        """The tick-end background reclaim (``HostMemory.balance``), under whatever the mode needs."""
        ...

    def stats(self) -> dict[str, Any]:
        """Keys for ``run_finished``: ``request_order`` and the mode's counters."""
        ...

    def stopping(self) -> None:
        """The run is ending (a stop signal): nothing may wait for the guests' tick any more."""
        ...

    def close(self) -> None: ...


class DisciplineBase:
    """Requests served as they arrive; shootdowns sent at once; nothing held (the arrival mode's behaviour)."""

    request_order = "arrival"
    # The guests' vCPUs park at the end of each tick, so a fault of several pages stops there
    # (HostMemory.open_tick); a mode whose guests do not park must say False.
    guests_park_at_gate = True

    def __init__(self, ctx: DisciplineContext) -> None:
        self.ctx = ctx

    def serve(self, guest_id: int, requests: Mapping[MsgType, RequestHandler]) -> GuestHandlers:
        return GuestHandlers(dict(requests))

    def memory_callout(self) -> Callable[[], AsyncContextManager[Any]] | None:
        return None

    def memory_hold(self) -> Callable[[int, int, float], Awaitable[float]] | None:
        return None

    def floor_grants(self, floor_only: Callable[[int], bool]) -> None:
        pass

    def guest_joined(self, guest_id: int) -> None:
        pass

    def guard_holds(self, bound_s: float, cut_off: Callable[[int, str], None]) -> None:
        pass

    def guest_left(self, guest_id: int) -> None:
        pass

    def guest_silent(self, guest_id: int) -> None:
        pass

    def tick_started(self, tick: int, vt_us: float, mem: "HostMemory") -> None:
        pass

    def tick_done(self, guest_id: int, vt_us: float) -> None:
        pass

    async def shootdown(self, session: "GuestSession", gpfns: np.ndarray, invalidate: Invalidate) -> np.ndarray:
        return await invalidate()

    async def finish_tick(self) -> bool:
        return True

    async def balance(self, mem: "HostMemory", vt_us: float) -> "Reclaimed":
        return await mem.balance(vt_us)

    def stats(self) -> dict[str, Any]:
        return {"request_order": self.request_order}

    def stopping(self) -> None:
        pass

    def close(self) -> None:
        pass
