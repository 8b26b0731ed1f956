"""The vCPU's gate: the end of the latest tick received, below which the guest may run.

Tick t spans ``[T_t, T_t + tick_us)``. The gate is ``T_t + tick_us`` for
the latest ``TickStart`` received. The vCPU runs references while its clock
is below the gate; every request the guest sends waits here first
(``admit(vt_us)``), so a request never carries a virtual time at or past the
end of the tick it runs in. When the vCPU reaches the gate, it *parks*:
``on_park`` sends ``TickDone`` for the latest tick (once per tick), and the
vCPU waits until a ``TickStart`` moves the gate past its clock, or the run
ends.

A fault that started before the gate may need several requests (write back
the victim, read the page, back the frame); each is admitted on its own, so
a fault in flight at the gate parks between two of them, and ``TickDone``
goes out with the clock where the last admitted request left it. That
gives the bound documented in proto/README.md: ``TickDone.vt_us`` exceeds
the tick's end by at most one request's completion plus one reference's
own costs.

In the run's last tick (``last_tick``) requests are not held at the gate:
the fault in flight completes, so that the end-of-run audit finds no page
half-evicted; only that tick's TickDone may exceed the bound.

A request the host holds across a boundary (it counts the guest done for
that tick) comes back after the next ``TickStart``: the gate has already
moved, and no ``TickDone`` is owed for the tick the guest did not park in.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from balloonlab.proto.messages import TickStart

__all__ = ["VcpuGate", "VcpuStopped"]


class VcpuStopped(Exception):
    """The run ended (``RunEnd``, or the host went away) while the vCPU waited at its gate."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VcpuGate:
    """Where the vCPU may run up to, and what happens when it gets there."""

    def __init__(self) -> None:
        self.tick = -1                 # the latest TickStart received
        self.tick_start_us = 0.0       # its T_t
        self.gate_us = 0.0             # its end; nothing runs before the first TickStart
        self.done_tick = -1            # the latest tick a TickDone went out for
        self.parks = 0                 # times the vCPU parked (one per tick it finished)
        self.parks_in_request = 0      # ... of which inside a request (a fault in flight at the gate)
        self.late_in_last_tick = 0     # requests let past the gate in the run's last tick
        self.on_park: Callable[[int, float], None] | None = None   # (tick, vt_us): send TickDone
        self.parked = False            # waiting here now
        # The run's last tick (from Welcome's "ticks"; None: unknown). In it a fault in flight at the
        # gate completes before TickDone: the end-of-run audit must find the guest's books whole, not
        # a page marked written whose write is still parked here.
        self.last_tick: int | None = None
        self._stopped: str | None = None
        # who waits for the gate to move: a future each, resolved by the next open or stop (an Event's
        # clear/wait/set bookkeeping, on every park of every guest, for what is one waiter)
        self._waiters: list[asyncio.Future[None]] = []

    def open(self, msg: TickStart) -> None:
        """A ``TickStart``: the gate moves to the end of that tick."""
        if msg.tick <= self.tick:
            raise ValueError(f"TickStart for tick {msg.tick} after tick {self.tick}: ticks must increase")
        self.tick = msg.tick
        self.tick_start_us = float(msg.vt_us)
        self.gate_us = float(msg.vt_us) + float(msg.tick_us)
        self._wake()

    def stop(self, reason: str) -> None:
        """The run is over: whoever waits at the gate gets ``VcpuStopped``."""
        if self._stopped is None:
            self._stopped = reason
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    @property
    def stopped(self) -> str | None:
        return self._stopped

    async def wait_for(self, fut: "asyncio.Future[Any]") -> None:
        """Wait until ``fut`` (an answer the host owes the vCPU) is done, or the run ends: ``VcpuStopped``."""
        if self._stopped is None and not fut.done():
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        if self._stopped is not None and (not fut.done() or fut.result() is None):
            raise VcpuStopped(self._stopped)

    def is_open(self, vt_us: float) -> bool:
        """A request at ``vt_us`` may go now: it lies inside the current tick and the vCPU is not stopped."""
        return vt_us < self.gate_us and self._stopped is None

    async def admit(self, vt_us: float) -> None:
        """A request at ``vt_us``: return once it lies inside the current tick (park at the gate until then)."""
        if self.is_open(vt_us):
            return
        self.parks_in_request += vt_us >= self.gate_us and not self._in_last_tick()
        await self.wait_open(vt_us, in_request=True)

    def _in_last_tick(self) -> bool:
        return self.last_tick is not None and self.tick >= self.last_tick

    async def wait_open(self, vt_us: float, *, in_request: bool = False) -> None:
        """Park while ``vt_us`` is at or past the gate: ``TickDone`` for the latest tick, then wait for the next.

        ``in_request``: a request waits here; in the run's last tick it goes on (see the module).
        """
        while True:
            if self._stopped is not None:
                raise VcpuStopped(self._stopped)
            if vt_us < self.gate_us:
                return
            if in_request and self._in_last_tick():
                self.late_in_last_tick += 1
                return
            if self.tick >= 0 and self.done_tick < self.tick:
                self.done_tick = self.tick
                self.parks += 1
                if self.on_park is not None:
                    self.on_park(self.tick, vt_us)
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            self.parked = True
            try:
                await fut
            finally:
                self.parked = False
                if self._waiters and fut in self._waiters:    # cancelled while it waited
                    self._waiters.remove(fut)
