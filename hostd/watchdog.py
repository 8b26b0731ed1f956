"""The host's watchdog: guests that stop answering, and what the host does about them.

A guest is *unresponsive* once it has not finished a tick within
``RunConfig.unresponsive_s`` wall seconds: a stopped process (SIGSTOP), a
guest that stopped reading its socket, a guest stuck in a loop. The server
takes it out of the tick barrier and stops sending it ticks; this module
makes sure it does not keep its memory either, and that nothing it held is
lost:

- Its frames are the preferred victims of host swapping (``PreferVictims``),
  and at the end of every tick whatever it still has resident is swapped
  out (``Watchdog.reclaim_unresponsive``). Host swapping, never dropping:
  every page goes to a host swap slot. This stops as soon as the guest
  answers a deferred shootdown (it runs again): otherwise what it faults
  back in for its late tick would go at every tick end, and that tick might
  never finish.
- The TLB shootdown that host swapping needs is *deferred* for it.

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
   shootdown to it is settled, so a placeholder is never handed back.
   (Its reply travels ahead of any fault on those gpfns on the same
   ordered socket; a fault on other gpfns waits for a reply that the
   guest's event loop sends whatever its vCPU is doing.)

A shootdown already waiting for a guest's acknowledgement when the guest
goes silent -- or that waits longer than ``[host] shootdown_timeout_s`` --
is deferred the same way, at that moment: the host stops waiting (other
guests' faults may be waiting behind that reclaim) but does not give up,
because the ``Invalidate`` is already on its way and a guest that obeys it
late would otherwise find the host keeping a stale copy of the page.

A guest that dies before it replies owned the placeholders alone; they go
with the rest of its memory. The end-of-run audit (``hostd.audit``) checks
that no placeholder is left behind.

Fault points (``BALLOONLAB_PAUSE_AT``) let a test stop the host at an exact
moment and kill it from outside; see ``PausePoints``.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Mapping

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.faultpoints import flush_log
from balloonlab.proto.messages import Invalidate, InvalidateReply

from .framepool import FrameKind, FramePool
from .victim import VictimPolicy

if TYPE_CHECKING:
    from .memory import HostMemory
    from .session import GuestSession

__all__ = ["PENDING_TOKEN", "PreferVictims", "Watchdog"]

log = structlog.get_logger("hostd.watchdog")

PENDING_TOKEN = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
"""Held by a host swap slot whose content the frozen guest has not told yet. No real
token has it: that would take page id 2**32 - 2."""

MAX_RECLAIM_FRAMES_PER_TICK = 65_536   # one Invalidate per tick end stays well inside a frame


class PreferVictims:
    """A victim policy that takes frames of the guests in ``prefer`` first, then asks ``inner``.

    A frozen guest's memory is idle by definition, so it is the best
    victim there is; the blind policy still decides among everyone else.
    """

    def __init__(self, inner: VictimPolicy, prefer: set[int]) -> None:
        self.inner = inner
        self.prefer = prefer          # shared with the watchdog, which keeps it up to date
        self.name = getattr(inner, "name", "prefer")

    def candidates(self, pool: FramePool) -> np.ndarray:
        """Evictable guest frames of the preferred guests, lowest frame first."""
        if not self.prefer:
            return np.zeros(0, np.int64)
        ids = np.fromiter(self.prefer, np.int64, len(self.prefer))
        mask = pool.evictable() & (pool.kind == FrameKind.GUEST) & np.isin(pool.owner_guest, ids)
        return np.flatnonzero(mask)

    def pick(self, pool: FramePool, n: int, rng: np.random.Generator) -> np.ndarray:
        chosen = self.candidates(pool)[:max(n, 0)]
        for _ in range(3):   # the blind policy may pick preferred frames again: ask for the difference
            if chosen.size >= n:
                break
            more = np.asarray(self.inner.pick(pool, n - chosen.size, rng), np.int64)
            more = more[~np.isin(more, chosen)]
            if not more.size:
                break
            chosen = np.concatenate((chosen, more))
        return chosen


class Watchdog:
    """Unresponsive guests: their memory goes to host swap, their shootdowns are deferred.

    Call order (from the machine)::

        every shootdown: await shootdown(session, gpfns, timeout_s)   (deferred if it must be)
        guest_unresponsive(gid) -> [deferred_shootdown]* -> (guest_responsive | forget)
        each tick end: await reclaim_unresponsive(vt_us)
        before an EPT fault of gid: await settled(gid)
    """

    def __init__(self, mem: "HostMemory", sessions: Mapping[int, "GuestSession"]) -> None:
        self.mem = mem
        self.sessions = sessions                     # the server's live sessions, by guest id
        self.unresponsive: set[int] = set()
        self._pending: dict[int, set[asyncio.Future]] = {}
        self._went_silent: dict[int, asyncio.Future] = {}   # set when the guest is marked unresponsive
        self.late_shootdowns = 0
        self._pending_pages: dict[int, int] = {}
        self.victims = PreferVictims(mem.victim, self.unresponsive)
        mem.victim = self.victims                    # a pluggable policy: wrapping it is the intended hook
        self.deferred_shootdowns = 0
        self.deferred_pages = 0
        self.settled_pages = 0
        self.failed_shootdowns = 0
        self.reclaimed_frames = 0
        self.woke = 0                                # unresponsive guests that answered a deferred shootdown

    # --- state --------------------------------------------------------------------

    def guest_unresponsive(self, gid: int) -> None:
        self.unresponsive.add(gid)
        woken = self._went_silent.pop(gid, None)
        if woken is not None and not woken.done():
            woken.set_result(None)   # shootdowns waiting for its acknowledgement stop waiting
        flush_log()  # an operator (or a test) waits for this line; it must not sit in a buffer

    def guest_responsive(self, gid: int) -> None:
        self.unresponsive.discard(gid)

    def forget(self, gid: int) -> None:
        """The guest is gone: its pending shootdowns fail with the connection; nothing to keep."""
        self.unresponsive.discard(gid)
        self._went_silent.pop(gid, None)

    def pending(self, gid: int) -> bool:
        return bool(self._pending.get(gid))

    def pending_pages(self, gid: int | None = None) -> int:
        if gid is not None:
            return self._pending_pages.get(gid, 0)
        return sum(self._pending_pages.values())

    async def settled(self, gid: int) -> None:
        """Wait until every deferred shootdown to ``gid`` has been answered (or failed)."""
        while self._pending.get(gid):
            await asyncio.wait(set(self._pending[gid]))

    # --- shootdowns -----------------------------------------------------------------

    async def shootdown(self, session: "GuestSession", gpfns: np.ndarray, timeout_s: float) -> np.ndarray:
        """Invalidate ``gpfns`` in the guest and return the tokens it held.

        Waits for the acknowledgement, but not for ever: if the guest is (or
        becomes, meanwhile) unresponsive, or does not answer within
        ``timeout_s``, the shootdown is deferred -- the frames are taken now
        and its answer, whenever it comes, fills in their content. Giving up
        instead would be worse: the Invalidate is already on its way, and a
        guest that obeys it late would find the host still holding a stale
        copy of the page.
        """
        gid = session.guest_id
        assert gid is not None
        if session.unresponsive:
            return self.deferred_shootdown(session, gpfns)
        gpfns = np.asarray(gpfns, np.uint64).copy()
        task = asyncio.ensure_future(session.conn.call(Invalidate(gpfns), timeout_s=0))
        silent = self._went_silent.get(gid)
        if silent is None or silent.done():
            silent = self._went_silent[gid] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({task, silent}, timeout=timeout_s if timeout_s > 0 else None,
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()   # the host is going away (cancelled): nothing will settle this
            raise
        if task.done():
            reply = task.result()   # PeerClosed, RemoteError: the eviction fails, the mapping stays
            assert isinstance(reply, InvalidateReply)
            return reply.tokens
        self.late_shootdowns += 1
        log.warning(ev.SHOOTDOWN_DEFERRED, guest=gid, pages=int(gpfns.size),
                    reason="unresponsive" if silent.done() else f"no acknowledgement within {timeout_s:g} s")
        return self._defer(gid, gpfns, task)

    def deferred_shootdown(self, session: "GuestSession", gpfns: np.ndarray) -> np.ndarray:
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
        patched = self._patch(gid, gpfns, np.asarray(reply.tokens, np.uint64))
        self.settled_pages += patched
        if gid in self.unresponsive:
            # It answered, so it runs again. Stop taking its memory now, not only once its late
            # tick is done: whatever it faults in for that tick would otherwise go at every tick
            # end, and the tick might never end. (It stays out of the barrier until it is done.)
            self.unresponsive.discard(gid)
            self.woke += 1
        log.info(ev.SHOOTDOWN_SETTLED, guest=gid, pages=int(gpfns.size), patched_pages=patched, ok=True,
                 pending_pages=self.pending_pages(gid))

    def _patch(self, gid: int, gpfns: np.ndarray, tokens: np.ndarray) -> int:
        """Put the answered tokens into the slots that still hold these gpfns' placeholders."""
        if gid not in self.mem.guest_ids():
            return 0
        swap = self.mem.swap
        slots = swap.slots_owned_by(gid)
        slots = slots[(swap.owner_kind[slots] == FrameKind.GUEST) & (swap.token[slots] == PENDING_TOKEN)]
        if not slots.size:
            return 0
        order = np.argsort(gpfns, kind="stable")
        sorted_g = gpfns[order].astype(np.int64)
        idx = swap.owner_index[slots]
        pos = np.minimum(np.searchsorted(sorted_g, idx), sorted_g.size - 1)
        hit = sorted_g[pos] == idx
        swap.token[slots[hit]] = tokens[order][pos[hit]]
        return int(np.count_nonzero(hit))

    def leftover_placeholders(self, gid: int) -> int:
        """Slots of ``gid`` still waiting for their content (for the audit)."""
        swap = self.mem.swap
        slots = swap.slots_owned_by(gid)
        return int(np.count_nonzero(swap.token[slots] == PENDING_TOKEN))

    # --- reclaim ---------------------------------------------------------------------

    async def reclaim_unresponsive(self, vt_us: float) -> int:
        """Swap out what unresponsive guests still have resident; returns frames freed."""
        if not self.unresponsive:
            return 0
        mem = self.mem
        live = [gid for gid in sorted(self.unresponsive) if gid in mem.guest_ids()]
        if not live:
            return 0
        n = min(int(self.victims.candidates(mem.pool).size), mem.swap.free_slots, MAX_RECLAIM_FRAMES_PER_TICK)
        if n <= 0:
            return 0
        before = {gid: int(mem.guest_counts(gid)["resident_pages"]) for gid in live}
        got = await mem.reclaim(n, vt_us)
        self.reclaimed_frames += got.freed_frames
        for gid in live:
            if gid in mem.guest_ids():
                after = int(mem.guest_counts(gid)["resident_pages"])
                if after < before[gid]:
                    # Frames still resident are pinned, or busy: an eviction already under way
                    # (a shootdown that was waiting for this guest's answer settles right after).
                    frames = mem.pool.frames_owned_by(gid, FrameKind.GUEST)
                    busy = int(np.count_nonzero(mem.pool.busy[frames]))
                    log.info(ev.GUEST_MEMORY_RECLAIMED, guest=gid, reclaimed_frames=before[gid] - after,
                             resident_pages=after, busy_pages=busy, reason="unresponsive",
                             pending_pages=self.pending_pages(gid))
                    flush_log()
        return got.freed_frames

    def metrics(self) -> dict[str, int]:
        return {"deferred_shootdowns": self.deferred_shootdowns, "deferred_shootdown_pages": self.deferred_pages,
                "late_shootdowns": self.late_shootdowns,
                "deferred_settled_pages": self.settled_pages, "deferred_failed": self.failed_shootdowns,
                "unresponsive_reclaimed_frames": self.reclaimed_frames, "woke": self.woke}
