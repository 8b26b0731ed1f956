"""The lock model's request discipline (``[locks]`` names a protocol): every request under ``L_hostmem``.

Requests are served as they arrive (the real interleaving of lock requests
is the point), each under ``L_hostmem`` held for the guest's vCPU; a
shootdown runs under the guest's ``L_vmem``; the host's reclaim task runs
during a tick when memory is short, and the tick-end balance takes
``L_hostmem`` as ``host/tick``. The lock machinery itself is
``hostd.locks``; this module only connects it to the machine's fixed points.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncContextManager, Callable, Mapping

import numpy as np

from balloonlab.proto.locks import LockConfig, LockProtocol
from balloonlab.proto.messages import MsgType
from balloonlab.proto.rpc import RequestHandler

from ..locks import HostLocks
from .base import DisciplineBase, DisciplineContext, GuestHandlers, Invalidate

if TYPE_CHECKING:
    from ..memory import HostMemory, Reclaimed
    from ..session import GuestSession

__all__ = ["LockModel"]


class LockModel(DisciplineBase):
    request_order = "arrival"
    guests_park_at_gate = False   # guestd does not hold requests at the gate under a lock protocol

    def __init__(self, cfg: LockConfig, ctx: DisciplineContext) -> None:
        super().__init__(ctx)
        self.locks = HostLocks(cfg, ctx.stop, ctx.clock, ctx.hypercall_us)

    def serve(self, guest_id: int, requests: Mapping[MsgType, RequestHandler]) -> GuestHandlers:
        locks = self.locks
        wrapped = {t: locks.wrap(guest_id, t, h) for t, h in requests.items()}
        wrapped.update(locks.lock_handlers(guest_id))
        # The guest reports its L_vmem's transitions; welcome once it is admitted.
        return GuestHandlers(wrapped, {MsgType.LOCK_EVENT: lambda m: locks.on_guest_event(guest_id, m)})

    def memory_callout(self) -> Callable[[], AsyncContextManager[Any]] | None:
        if self.locks.protocol is LockProtocol.NO_CALLBACK:
            return self.locks.callout   # L_hostmem is dropped around every call into a guest
        return None

    def guard_holds(self, bound_s: float, cut_off: Callable[[int, str], None]) -> None:
        self.locks.guard_holds(bound_s, cut_off)   # a guest must not keep L_hostmem while others wait (ordered)

    def guest_left(self, guest_id: int) -> None:
        self.locks.guest_gone(guest_id)

    def guest_silent(self, guest_id: int) -> None:
        self.locks.guest_unresponsive(guest_id)   # a stopped guest must not keep the host's lock (ordered)

    def tick_started(self, tick: int, vt_us: float, mem: "HostMemory") -> None:
        self.locks.start()
        self.locks.tick_started(mem, vt_us)   # its reclaim task may run during the tick

    async def shootdown(self, session: "GuestSession", gpfns: np.ndarray, invalidate: Invalidate) -> np.ndarray:
        if session.unresponsive:
            return await invalidate()   # deferred: a silent guest's L_vmem is not asked for
        gid = session.guest_id
        assert gid is not None
        # Under the guest's L_vmem, taken there for the owner the host acts for (hostd.locks).
        return await self.locks.shootdown(session.conn, gid, gpfns, self.ctx.shootdown_timeout_s,
                                          invalidate=invalidate)

    async def finish_tick(self) -> bool:
        if self.locks.deadlocked:
            return False   # the run ends: this tick's tasks wait for each other and cannot finish it
        await self.locks.finish_tick()
        return True

    async def balance(self, mem: "HostMemory", vt_us: float) -> "Reclaimed":
        return await self.locks.balance(mem, vt_us)

    def stats(self) -> dict[str, Any]:
        return {"request_order": self.request_order, "locks": self.locks.final_metrics()}

    def close(self) -> None:
        self.locks.close()
