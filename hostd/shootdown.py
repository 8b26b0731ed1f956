"""TLB shootdowns: invalidate a guest's mappings before the host reuses the frames behind them.

Host memory calls ``Shootdowns.shootdown(guest_id, gpfns)`` for every guest
whose frames a reclaim takes, and waits for the tokens (the content) the
guest held. Two paths:

- **Normal**: the request discipline decides when and under what the
  ``Invalidate`` may go (virtual-time order: once the guest is parked; the
  lock model: under the guest's ``L_vmem``; ``hostd.discipline``), then the
  host sends it and waits for the acknowledgement.
- **Deferred**, for a guest whose vCPU does not run: one the watchdog has
  declared silent, or one that goes silent (or stays quiet longer than
  ``[host] shootdown_timeout_s``) while the host waits for it. The frames
  are taken at once and the content follows later.

Why a deferred shootdown is safe
--------------------------------
A shootdown exists so that no vCPU keeps using a mapping after the host
reuses the frame behind it, so the host waits for every vCPU to
acknowledge. A vCPU that is not running holds no TLB entry that can be
used: a real hypervisor flushes a descheduled vCPU's TLB on its next VM
entry and does not wait for it (KVM requests a flush with
``KVM_REQ_TLB_FLUSH`` and only kicks vCPUs that are in guest mode). So
for an unresponsive guest the host may take the frame at once.

In this emulation the acknowledgement also carries the page's *content*
(its token): the host stores tokens only when the guest tells them. So the
host

1. still sends the ``Invalidate`` (it waits in the guest's socket);
2. settles the eviction at once with ``PENDING_TOKEN`` in the host swap
   slot and frees the frame for others;
3. when the guest runs again it handles the ``Invalidate`` before its vCPU
   can touch those gpfns anew (they are "backed" in its view until then,
   so it cannot fault on them), and replies with the tokens it held, which
   replace the placeholders in the slots still holding those gpfns
   (``SHOOTDOWN_SETTLED``);
4. an EPT fault from that guest first waits until every deferred
   shootdown to it is settled (``settled``), so a placeholder is never
   handed back. (Its reply travels ahead of any fault on those gpfns on the
   same ordered socket; a fault on other gpfns waits for a reply that the
   guest's event loop sends whatever its vCPU is doing.)

A shootdown already waiting for a guest's acknowledgement when the guest
goes silent -- or that waits longer than ``shootdown_timeout_s`` -- is
deferred the same way, at that moment: the host stops waiting (other
guests' faults may be waiting behind that reclaim) but does not give up,
because the ``Invalidate`` is already on its way and a guest that obeys it
late would otherwise find the host keeping a stale copy of the page.

A guest that dies before it replies owned the placeholders alone; they go
with the rest of its memory. The end-of-run audit (``hostd.audit``) checks
that no placeholder is left behind. A guest that answers a deferred
shootdown runs again: ``on_answered`` tells whoever takes silent guests'
memory (``hostd.silent``) to stop.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.messages import Invalidate, InvalidateReply

from .errors import HostdError
from .hostswap import PENDING_TOKEN

if TYPE_CHECKING:
    from .discipline import RequestDiscipline
    from .memory import HostMemory
    from .registry import SessionRegistry
    from .session import GuestSession

__all__ = ["PENDING_TOKEN", "Shootdowns"]

log = structlog.get_logger("hostd.shootdown")


class Shootdowns:
    """Every TLB shootdown the host sends, normal or deferred.

    Call order::

        await shootdown(gid, gpfns)          (host memory's shootdown callback; deferred if it must be)
        guest_silent(gid)                    (the watchdog's verdict: waiting shootdowns to it are deferred)
        before an EPT fault of gid: await settled(gid) if pending(gid)
        forget(gid)                          (the guest is gone)
    """

    def __init__(self, mem: "HostMemory", sessions: "SessionRegistry", discipline: "RequestDiscipline",
                 timeout_s: float, on_answered: Callable[[int], None] | None = None) -> None:
        self.mem = mem
        self.sessions = sessions
        self.discipline = discipline
        self.timeout_s = timeout_s
        self.on_answered = on_answered
        self._pending: dict[int, set[asyncio.Future]] = {}
        self._pending_pages: dict[int, int] = {}
        self._went_silent: dict[int, asyncio.Future] = {}   # set when the guest is declared silent
        self.late_shootdowns = 0
        self.deferred_shootdowns = 0
        self.deferred_pages = 0
        self.settled_pages = 0
        self.failed_shootdowns = 0

    # --- the normal path ---------------------------------------------------------------

    async def shootdown(self, guest_id: int, gpfns: np.ndarray) -> np.ndarray:
        """Invalidate ``gpfns`` in the guest; returns the tokens it held (placeholders when deferred)."""
        session = self.sessions.get(guest_id)
        if session is None:
            raise HostdError(f"guest {guest_id} is gone; cannot invalidate its mappings")
        return await self.discipline.shootdown(session, gpfns, lambda: self._invalidate(session, gpfns))

    async def _invalidate(self, session: "GuestSession", gpfns: np.ndarray) -> np.ndarray:
        """Send the Invalidate and wait for the acknowledgement -- but not for ever.

        If the guest is (or becomes, meanwhile) unresponsive, or does not
        answer within ``timeout_s``, the shootdown is deferred: the frames
        are taken now and its answer, whenever it comes, fills in their
        content. Giving up instead would be worse: the Invalidate is already
        on its way, and a guest that obeys it late would find the host still
        holding a stale copy of the page.
        """
        gid = session.guest_id
        assert gid is not None
        if session.unresponsive:
            return self._defer_now(session, gpfns)
        gpfns = np.asarray(gpfns, np.uint64).copy()
        task = asyncio.ensure_future(session.conn.call(Invalidate(gpfns), timeout_s=0))
        silent = self._went_silent.get(gid)
        if silent is None or silent.done():
            silent = self._went_silent[gid] = asyncio.get_running_loop().create_future()
        timeout_s = self.timeout_s
        try:
            await asyncio.wait({task, silent}, timeout=timeout_s if timeout_s > 0 else None,
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()   # the host is going away (cancelled): nothing will settle this
            raise
        if task.done():
            reply = task.result()   # PeerClosed, RemoteError: the eviction fails, the mapping stays
            assert isinstance(reply, InvalidateReply)
            self.mem.record_labels(gid, gpfns, reply.labels)   # instrumentation only
            return reply.tokens
        self.late_shootdowns += 1
        log.warning(ev.SHOOTDOWN_DEFERRED, guest=gid, pages=int(gpfns.size),
                    reason="unresponsive" if silent.done() else f"no acknowledgement within {timeout_s:g} s")
        return self._defer(gid, gpfns, task)

    # --- the deferred path -------------------------------------------------------------

    def _defer_now(self, session: "GuestSession", gpfns: np.ndarray) -> np.ndarray:
        """Invalidate without waiting: send it, return placeholders (see the module docstring)."""
        gid = session.guest_id
        assert gid is not None
        gpfns = np.asarray(gpfns, np.uint64).copy()
        # No timeout: a stopped guest may answer much later; the connection's end fails the call.
        task = asyncio.ensure_future(session.conn.call(Invalidate(gpfns), timeout_s=0))
        return self._defer(gid, gpfns, task)

    def _defer(self, gid: int, gpfns: np.ndarray, task: asyncio.Future) -> np.ndarray:
        self._pending.setdefault(gid, set()).add(task)
        self._pending_pages[gid] = self._pending_pages.get(gid, 0) + int(gpfns.size)
        self.deferred_shootdowns += 1
        self.deferred_pages += int(gpfns.size)
        task.add_done_callback(lambda t, g=gid, p=gpfns: self._settle(g, p, t))
        return np.full(gpfns.size, PENDING_TOKEN, np.uint64)

    def _settle(self, gid: int, gpfns: np.ndarray, task: asyncio.Future) -> None:
        self._pending.get(gid, set()).discard(task)
        self._pending_pages[gid] = self._pending_pages.get(gid, 0) - int(gpfns.size)
        if not self._pending.get(gid):
            self._pending.pop(gid, None)
            self._pending_pages.pop(gid, None)
        reply = None if task.cancelled() or task.exception() is not None else task.result()
        if not isinstance(reply, InvalidateReply) or reply.tokens.size != gpfns.size:
            # The guest died (its slots go with it) or answered nonsense: its
            # placeholders stay, and a fault on them would show the page lost.
            self.failed_shootdowns += 1
            why = "no reply" if reply is None else f"{getattr(reply, 'tokens', np.zeros(0)).size} tokens"
            log.warning(ev.SHOOTDOWN_SETTLED, guest=gid, pages=int(gpfns.size), ok=False, reason=why,
                        connected=gid in self.sessions)
            return
        self.mem.record_labels(gid, gpfns, reply.labels)   # instrumentation only
        patched = self.mem.fill_placeholders(gid, gpfns, np.asarray(reply.tokens, np.uint64))
        self.settled_pages += patched
        if self.on_answered is not None:
            self.on_answered(gid)   # it answered, so it runs again
        log.info(ev.SHOOTDOWN_SETTLED, guest=gid, pages=int(gpfns.size), patched_pages=patched, ok=True,
                 pending_pages=self.pending_pages(gid))

    # --- the guest's state ---------------------------------------------------------------

    def guest_silent(self, guest_id: int) -> None:
        """Shootdowns waiting for this guest's acknowledgement stop waiting (they are deferred)."""
        woken = self._went_silent.pop(guest_id, None)
        if woken is not None and not woken.done():
            woken.set_result(None)

    def forget(self, guest_id: int) -> None:
        """The guest is gone: its pending shootdowns fail with the connection; nothing to keep."""
        self._went_silent.pop(guest_id, None)

    def pending(self, guest_id: int) -> bool:
        """Deferred shootdowns to this guest are not answered yet."""
        return bool(self._pending.get(guest_id))

    def pending_pages(self, guest_id: int | None = None) -> int:
        if guest_id is not None:
            return self._pending_pages.get(guest_id, 0)
        return sum(self._pending_pages.values())

    async def settled(self, guest_id: int) -> None:
        """Wait until every deferred shootdown to ``guest_id`` has been answered (or failed)."""
        while self._pending.get(guest_id):
            await asyncio.wait(set(self._pending[guest_id]))

    def leftover_placeholders(self, guest_id: int) -> int:
        """Slots of ``guest_id`` still waiting for their content (for the audit)."""
        return self.mem.placeholder_slots(guest_id)

    def metrics(self) -> dict[str, int]:
        return {"deferred_shootdowns": self.deferred_shootdowns, "deferred_shootdown_pages": self.deferred_pages,
                "late_shootdowns": self.late_shootdowns,
                "deferred_settled_pages": self.settled_pages, "deferred_failed": self.failed_shootdowns}
