"""The one place a guest connection's handler table is built.

A connection answers only ``Hello`` until its handshake succeeds
(``HandlerTables.handshake``). Then, for the admitted guest
(``HandlerTables.guest``), its table is:

- the memory and disk requests (``EptFault``, ``BalloonInflate``,
  ``BalloonDeflate``, ``FreeReport``, ``DiskRead``, ``DiskWrite``), answered by host memory
  and served as the request discipline says (``hostd.discipline``: in
  virtual-time order, as they arrive, or under ``L_hostmem``);
- the discipline's own messages (the lock model's ``LockAcquire``,
  ``LockRelease`` and ``LockEvent``);
- ``Ping``;
- ``ContentReport`` (the guest's content map, stored in host memory);
- the ``TickDone`` notification, to the server's tick barrier.

A ``HostdError`` raised by a handler goes back to the guest as an error
reply with its code; the guest's connection reports every error reply to
the machine's rejection count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Mapping

import structlog

from balloonlab.proto.messages import (BalloonDeflate, BalloonInflate, BalloonReply, ContentReport,
                                       ContentReportReply, DiskRead, DiskReadReply, DiskWrite, DiskWriteReply,
                                       EptFault, EptFaultReply, FreeReport, FreeReportReply, Hello, MsgType, Ping,
                                       Pong, TickDone, Welcome)
from balloonlab.proto import events as ev
from balloonlab.proto.rpc import NotifyHandler, RequestHandler, RpcConnection

from .readchain import check_program

if TYPE_CHECKING:
    from .discipline import RequestDiscipline
    from .memory import HostMemory
    from .session import GuestSession
    from .shootdown import Shootdowns

__all__ = ["HandlerTable", "HandlerTables", "memory_requests"]

log = structlog.get_logger("hostd")


@dataclass(frozen=True)
class HandlerTable:
    requests: Mapping[MsgType, RequestHandler]
    notifications: Mapping[MsgType, NotifyHandler]

    def install(self, conn: RpcConnection) -> None:
        conn.requests = dict(self.requests)
        conn.notifications = dict(self.notifications)


def memory_requests(guest_id: int, mem: "HostMemory", shootdowns: "Shootdowns",
                    hypercall_us: float) -> dict[MsgType, RequestHandler]:
    """The guest's memory and disk requests, answered by host memory (before any discipline wraps them)."""

    async def ept_fault(m: EptFault) -> EptFaultReply:
        if shootdowns.pending(guest_id):
            # Never hand back a placeholder: let deferred shootdowns to this guest settle first.
            await shootdowns.settled(guest_id)
        tokens, done = await mem.ept_fault(guest_id, m.gpfns, m.vt_us, m.fresh)
        return EptFaultReply(tokens, done)

    def inflate(m: BalloonInflate) -> BalloonReply:
        mem.balloon_inflate(guest_id, m.gpfns)
        return BalloonReply(mem.balloon_pages(guest_id), m.vt_us + hypercall_us)

    def deflate(m: BalloonDeflate) -> BalloonReply:
        mem.balloon_deflate(guest_id, m.gpfns)
        return BalloonReply(mem.balloon_pages(guest_id), m.vt_us + hypercall_us)

    def free_report(m: FreeReport) -> FreeReportReply:
        # one hypercall; discarding a range is an unmap, no I/O (QEMU: madvise DONTNEED on the range)
        return FreeReportReply(mem.report_free(guest_id, m.gpfns), m.vt_us + hypercall_us)

    # Most disk requests need no wait: answered at once, with no coroutine (the disciplines and the
    # connection take a reply or an awaitable of one).
    def disk_read(m: DiskRead) -> DiskReadReply | Coroutine[Any, Any, DiskReadReply]:
        chain = check_program(guest_id, m.chain) if m.chain else None
        got = mem.vdisk_read_now(guest_id, m.blocks, m.vt_us)
        if type(got) is tuple:
            if chain is not None and len(m.blocks) == 1:
                return DiskReadReply(*mem.vdisk_read_chain(guest_id, got, m.vt_us, chain,
                                                           lambda: not shootdowns.pending(guest_id)))
            return DiskReadReply(*got)
        return _read_later(got)  # type: ignore[arg-type]   # it waited: no chain after it

    def disk_write(m: DiskWrite) -> DiskWriteReply | Coroutine[Any, Any, DiskWriteReply]:
        got = mem.vdisk_write_now(guest_id, m.blocks, m.tokens, m.vt_us)
        if type(got) is float:
            return DiskWriteReply(got)
        return _write_later(got)  # type: ignore[arg-type]

    handlers: dict[MsgType, Callable[[Any], Any]] = {
        MsgType.EPT_FAULT: ept_fault, MsgType.BALLOON_INFLATE: inflate, MsgType.BALLOON_DEFLATE: deflate,
        MsgType.DISK_READ: disk_read, MsgType.DISK_WRITE: disk_write, MsgType.FREE_REPORT: free_report,
    }
    return handlers  # type: ignore[return-value]


async def _read_later(waiting: Awaitable[tuple[Any, float]]) -> DiskReadReply:
    tokens, done = await waiting
    return DiskReadReply(tokens, done)


async def _write_later(waiting: Awaitable[float]) -> DiskWriteReply:
    return DiskWriteReply(await waiting)


def _pong(msg: Ping) -> Pong:
    return Pong(msg.payload)


class HandlerTables:
    """Builds each connection's table from the parts ``hostd.assembly`` made."""

    def __init__(self, mem: "HostMemory", shootdowns: "Shootdowns", discipline: "RequestDiscipline",
                 hypercall_us: float) -> None:
        self.mem = mem
        self.shootdowns = shootdowns
        self.discipline = discipline
        self.hypercall_us = hypercall_us

    @staticmethod
    def handshake(on_hello: Callable[[Hello], Welcome]) -> HandlerTable:
        """Before the handshake: ``Hello`` only."""
        return HandlerTable({MsgType.HELLO: on_hello}, {})  # type: ignore[dict-item]

    def guest(self, session: "GuestSession",
              on_tick_done: Callable[["GuestSession", TickDone], None]) -> HandlerTable:
        """An admitted guest's table (the discipline has heard it join)."""
        gid = session.guest_id
        assert gid is not None
        served = self.discipline.serve(gid, memory_requests(gid, self.mem, self.shootdowns, self.hypercall_us))
        requests = dict(served.requests)
        requests[MsgType.PING] = _pong  # type: ignore[assignment]
        mem = self.mem

        def content_report(m: ContentReport) -> ContentReportReply:
            # Per-guest state nothing reads within a tick: it needs no discipline.
            cmap = mem.set_content(gid, m.ranges)
            log.info(ev.CONTENT_MAP_TAKEN, guest=gid, taken=True, ranges=len(cmap.ranges),
                     image_pages=sum(r.pages for r in cmap.ranges if r.image),
                     zero_write_pages=sum(r.pages for r in cmap.ranges if r.zero_writes))
            return ContentReportReply(len(cmap.ranges))

        requests[MsgType.CONTENT_REPORT] = content_report  # type: ignore[assignment]
        notifications: dict[MsgType, NotifyHandler] = {
            MsgType.TICK_DONE: lambda m: on_tick_done(session, m)}  # type: ignore[arg-type, misc]
        notifications.update(served.notifications)
        return HandlerTable(requests, notifications)
