"""A guest's first ticks, played once in the fork server before it forks, against a stand-in host.

Every forked guest runs the same code for the first time: CPython quickens
and specializes each function's bytecode on its first calls, fills its
method caches, and numpy fills its ufunc-loop caches, all of it writes to
memory the guest shares with the fork server, so each guest copied those
pages and redid that work during its start and its first ticks. Played
once here, on a small guest of the usual shape (file and anonymous memory,
read chains and answers ahead offered), the work is done and the pages
are written before the fork, and every guest shares them. With 64 guests:
~1 ms of CPU less per guest, mostly in ticks 1-19 (0.405 -> 0.375 ms per
tick) and its start (6.9 -> 6.6 ms).

The stand-in host answers every request at once, serves no chained read
beyond the first and no answer ahead (as a host may), and is gone when
``rehearse`` returns: nothing of the rehearsal stays but warm code and
caches (a guest forked afterwards counts exactly what an exec'd one does,
``tests/test_forkserver.py``).
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from balloonlab.proto.messages import (BalloonDeflate, BalloonInflate, BalloonReply, DiskRead, DiskReadReply,
                                       DiskWrite, DiskWriteReply, EptFault, EptFaultReply, MsgType, TickDone,
                                       TickStart)
from balloonlab.proto.rpc import RpcConnection

from .gate import VcpuGate, VcpuStopped
from .session import GuestSessionState, build_guest
from .statswire import StatsOnWire, StatsRow

__all__ = ["rehearse", "REHEARSAL_TICKS"]

REHEARSAL_TICKS = 30
_TICK_US = 10_000
_NO_TOKENS = np.zeros(0, np.uint64)
# The scale scenario's guest, smaller: its pages are faulted and read in over the first ticks, then hit.
_CONFIG: dict[str, Any] = {
    "ram_mib": 4, "kernel_mib": 1, "policy": "clock", "seed": 1, "batch_refs": 1024,
    "regions": [{"name": "db", "kind": "file", "mib": 1}, {"name": "heap", "kind": "anon", "mib": 1}],
    "workload": [{"kind": "db", "region": "db", "weight": 1}, {"kind": "anon-hot", "region": "heap", "weight": 1}],
    "costs": {"cpu_us_per_ref": 19.9}, "read_chain": 64, "ahead_chain": True,
}


class _StandIn:
    """The host's side of the rehearsal: ticks, immediate answers, TickDones encoded as a real host decodes."""

    def __init__(self, ticks: int) -> None:
        self.ticks = ticks
        self.tick = -1
        self.state: GuestSessionState | None = None
        self.codec = RpcConnection(name="rehearsal")    # only its frame encoder
        self.ahead_owed = False
        self.lost_pages = 0
        self.stats_on_wire = StatsOnWire()   # a map first, then values: both ways warmed before the fork

    def start(self, state: GuestSessionState) -> None:
        self.state = state
        state.send_tick_done = self.tick_done
        self._next_tick()

    def _next_tick(self) -> None:
        st = self.state
        assert st is not None
        self.tick += 1
        if self.tick >= self.ticks:
            st.gate.stop("completed")
            return
        st.gate.open(TickStart(self.tick, float(self.tick * _TICK_US), _TICK_US))
        if self.ahead_owed:     # TickAhead right after TickStart: nothing served ahead
            self.ahead_owed = False
            st.take_ahead(self.tick, _NO_TOKENS, b"")

    def tick_done(self, tick: int, vt_us: float, stats: StatsRow, accessed: bytes, dirty: bytes,
                  ahead: bytes = b"") -> None:
        self.codec._encode([2, 0, int(MsgType.TICK_DONE), TickDone(tick, vt_us, self.stats_on_wire(stats),
                                                                    accessed, dirty, ahead).to_body()])
        self.ahead_owed = bool(ahead)
        self.lost_pages = int(stats.get("lost_pages", 0))
        asyncio.get_running_loop().call_soon(self._next_tick)

    async def call(self, msg: Any, **_: Any) -> Any:
        done = float(msg.vt_us) + 100.0
        if isinstance(msg, EptFault):
            return EptFaultReply(np.zeros(msg.gpfns.size, np.uint64), done)
        if isinstance(msg, DiskRead):     # the first block only: no chained read served
            return DiskReadReply(np.zeros(len(msg.blocks), np.uint64), done)
        if isinstance(msg, DiskWrite):
            return DiskWriteReply(done)
        if isinstance(msg, (BalloonInflate, BalloonDeflate)):
            return BalloonReply(0, float(msg.vt_us) + 1.0)
        raise AssertionError(f"the rehearsal's host has no answer to {type(msg).__name__}")


async def _play(ticks: int) -> _StandIn:
    host = _StandIn(ticks)
    state = build_guest(0, dict(_CONFIG, ticks=ticks, metrics_every_ticks=ticks + 1), host,  # type: ignore[arg-type]
                        VcpuGate())
    host.start(state)
    try:
        await state.run_vcpu()
    except VcpuStopped:
        pass
    return host


def rehearse(ticks: int = REHEARSAL_TICKS) -> int:
    """Play a small guest's first ``ticks`` ticks on an event loop of its own; returns the guest's lost
    pages (0: it ran clean). Call it where nothing else runs a loop (the fork server, before it forks).

    On asyncio's own loop, not uvloop's: libuv keeps process-wide state from its first loop on (a pipe
    it locks its signal handling with, made again in a forked child by an at-fork handler, before the
    child closes the descriptors it inherited), which a fork server must not carry into its guests.
    """
    return asyncio.run(_play(ticks)).lost_pages
