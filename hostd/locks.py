"""The host's side of the lock model: ``L_hostmem``, remote ``L_vmem`` for shootdowns, the detector.

Active only when the scenario's ``[locks]`` table names a protocol
(``proto.locks``). Then:

- ``L_hostmem`` (the host's frame table) is an ``OwnerLock``. Every memory
  or disk request of a guest runs under it, taken *on behalf of* the guest's
  vCPU (``wrap``); the host's reclaim task (``host/reclaim``, the seed's
  host thread, run during a tick when memory is short) and the tick-end
  balance (``host/tick``) take it for themselves.
- A TLB shootdown (``shootdown``) takes the guest's ``L_vmem`` remotely, for
  the owner the host acts for (``CURRENT_OWNER``): ``LockAcquire`` ->
  ``Invalidate`` -> ``LockRelease``. Under ``naive`` and ``ordered`` the host
  keeps ``L_hostmem`` meanwhile; under ``no-callback-under-lock``
  ``HostMemory.callout`` drops it around the shootdowns (victims picked under
  the lock, shootdown without it, commit under it again).
- Under ``ordered`` a guest takes ``L_hostmem`` itself, before its
  ``L_vmem`` (``lock_handlers``: ``LockAcquire``/``LockRelease``).
- Every transition, the host's and those the guests report (``LockEvent``),
  feeds one ``WaitForGraph`` and the ``LockdepValidator``. A new wait is
  checked for a cycle at once, and the whole graph every
  ``check_interval_s``. A cycle is logged as ``deadlock_detected``; then
  either the run ends (reason ``deadlock``) or, with ``break_deadlocks``,
  one guest's wait for ``L_hostmem`` in it fails with ``DEADLOCK_BROKEN``
  and the guest retries.
- A cycle is made only of waits the host itself observed: waits for its
  own ``L_hostmem`` (whoever the owner), and waits of its own tasks for a
  guest's ``L_vmem`` that it asked for (``LockAcquire`` outstanding). A
  guest may report its own tasks' waits (they are logged and counted), but
  they never close a cycle: one guest's word about its own task names must
  not end everyone's run.
- A guest that took ``L_hostmem`` itself (``LockAcquire``, the ordered
  protocol) and keeps it for ``hold_bound_s`` while others wait for it loses
  it (``lock_revoked``) and is cut off (``guard_holds``); the run goes on.

Individual lock events are logged at debug level (``lock_event``); counts
go to ``run_finished``.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.errors import ErrorCode, PeerClosed, ProtoError
from balloonlab.proto.locks import (DEADLOCK_REASON, HOST_PROC, VCPU_TASK, LockClass, LockConfig, LockOp, LockProtocol,
                         LockTransition, OwnerLock, guest_proc, owner_name, split_owner)
from balloonlab.proto.messages import Invalidate, InvalidateReply, LockAcquire, LockEvent, LockRelease, LockReply, MsgType
from balloonlab.proto.rpc import RequestHandler, RpcConnection

from .deadlock import CycleEdge, LockdepValidator, WaitForGraph, cycle_signature
from .errors import HostdError

__all__ = ["HostLocks", "DeadlockBroken", "BadLockRequest", "CURRENT_OWNER", "RECLAIM_OWNER", "TICK_OWNER"]

log = structlog.get_logger("hostd.locks")

RECLAIM_OWNER = owner_name(HOST_PROC, "reclaim")
TICK_OWNER = owner_name(HOST_PROC, "tick")

CURRENT_OWNER: contextvars.ContextVar[str] = contextvars.ContextVar("balloonlab_lock_owner", default=TICK_OWNER)
"""Whom the host is acting for in this task: a guest's vCPU in its request handler, else a host task."""

_RECENT_EVENTS = 32        # kept for the deadlock report: what led to it
_FRUITLESS_RECLAIMS = 2    # the reclaim task gives up after this many rounds that free nothing


class DeadlockBroken(HostdError, RuntimeError):
    code = ErrorCode.DEADLOCK_BROKEN

    def __init__(self, owner: str, lock: str) -> None:
        super().__init__(f"{owner}'s wait for {lock} closed a deadlock cycle; it was failed to break it: retry")
        self.owner = owner
        self.lock = lock


class BadLockRequest(HostdError, ValueError):
    code = ErrorCode.BAD_FIELD


class LockStateError(HostdError, ValueError):
    code = ErrorCode.INVALID_STATE


@dataclass(slots=True)
class LockCounters:
    events: int = 0
    guest_events: int = 0
    bad_guest_events: int = 0
    hostmem_acquisitions: int = 0
    hostmem_waits: int = 0
    hostmem_wait_s: float = 0.0      # wall seconds owners spent waiting for L_hostmem
    vmem_waits: int = 0              # waits for a guest's L_vmem (reported by the guests)
    vmem_wait_s: float = 0.0
    remote_vmem_acquisitions: int = 0  # L_vmem taken by the host for a shootdown
    deadlocks: int = 0
    deadlocks_broken: int = 0
    violating_acquisitions: int = 0
    locks_revoked: int = 0           # L_hostmem taken back from a guest the watchdog gave up on
    tick_reclaims: int = 0
    tick_reclaim_frames: int = 0


class HostLocks:
    def __init__(self, cfg: LockConfig, stop: Callable[[str], None], clock: Callable[[], float],
                 hypercall_us: float = 2.0) -> None:
        if cfg.protocol is None:
            raise ValueError("HostLocks needs a lock protocol")
        self.cfg = cfg
        self.protocol: LockProtocol = cfg.protocol
        self._stop = stop
        self._clock = clock                      # the host's virtual time now
        self.hypercall_us = hypercall_us
        self.hostmem = OwnerLock(LockClass.L_HOSTMEM, HOST_PROC, self._on_host_event)
        self.graph = WaitForGraph()
        self.validator = LockdepValidator()
        self.counters = LockCounters()
        self.deadlocked = False
        self.first_cycle: list[dict[str, Any]] | None = None
        self._reported: set[frozenset[tuple[str, str]]] = set()
        self._recent: deque[dict[str, Any]] = deque(maxlen=_RECENT_EVENTS)
        self._reclaim_task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        # (guest id, host owner) -> the host's LockAcquires of that guest's L_vmem not yet released:
        # the only host owners a guest may report transitions for (it must not invent others' waits).
        self._asked: dict[tuple[int, str], int] = {}
        # owner -> (guest id, wall time it got L_hostmem) for holds a guest took itself (LockAcquire).
        self._guest_holds: dict[str, tuple[int, float]] = {}
        self.hold_bound_s = 0.0                  # 0: no bound (guard_holds sets one)
        self._on_overheld: Callable[[int, str], None] | None = None

    def guard_holds(self, bound_s: float, on_overheld: Callable[[int, str], None]) -> None:
        """A guest holding L_hostmem it took itself for ``bound_s`` while others wait loses it; ``on_overheld(gid, why)``."""
        self.hold_bound_s = bound_s
        self._on_overheld = on_overheld

    # --- events -----------------------------------------------------------------------

    def _on_host_event(self, t: LockTransition) -> None:
        self._ingest(t, observed=True)

    def on_guest_event(self, guest_id: int, msg: LockEvent) -> None:
        """A guest reports a transition of its ``L_vmem`` (a ``LockEvent`` notification)."""
        try:
            op = LockOp(msg.op)
            cls = LockClass.from_label(msg.lock)
            split_owner(msg.owner)
        except ValueError as exc:
            self.counters.bad_guest_events += 1
            raise BadLockRequest(f"guest {guest_id}: lock event {msg.op!r} on {msg.lock!r}: {exc}") from None
        if cls is not LockClass.L_VMEM:
            self.counters.bad_guest_events += 1
            raise BadLockRequest(f"guest {guest_id}: a guest has only L_vmem, it reported {msg.lock!r}")
        proc, _ = split_owner(msg.owner)
        if proc != guest_proc(guest_id) and not (proc == HOST_PROC and self._asked.get((guest_id, msg.owner))):
            # A lying guest could otherwise draw a cycle that is not there and end everyone's run.
            self.counters.bad_guest_events += 1
            raise BadLockRequest(f"guest {guest_id}: lock event for {msg.owner!r}, which is neither its own task "
                                 f"nor a host task that asked for its L_vmem")
        self.counters.guest_events += 1
        # A host task's wait for this L_vmem is one the host observes itself (it asked and waits for the
        # answer); a guest task's wait is only the guest's word.
        self._ingest(LockTransition(op, cls, guest_proc(guest_id), msg.owner, msg.task, msg.site, msg.vt_us),
                     observed=proc == HOST_PROC)

    def _ingest(self, t: LockTransition, observed: bool) -> None:
        now = time.time()
        c = self.counters
        c.events += 1
        g = self.graph
        ref = t.ref
        waiting = g.is_waiting(t.owner, ref)
        if t.op is LockOp.WAIT or (t.op is LockOp.ACQUIRE and not waiting):
            v = self.validator.check(g.held(t.owner), t)
            if v is not None:
                log.warning(ev.LOCK_ORDER_VIOLATION, protocol=self.protocol.value, **v.as_dict())
        if t.op is LockOp.ACQUIRE and t.lock is LockClass.L_HOSTMEM:
            c.hostmem_acquisitions += 1
        if t.op is LockOp.WAIT:
            if t.lock is LockClass.L_HOSTMEM:
                c.hostmem_waits += 1
            else:
                c.vmem_waits += 1
        elif waiting and t.op in (LockOp.ACQUIRE, LockOp.CANCEL):
            w = next(w for w in g.waits(t.owner) if w.lock == ref)
            if t.lock is LockClass.L_HOSTMEM:
                c.hostmem_wait_s += now - w.since_wall_s
            else:
                c.vmem_wait_s += now - w.since_wall_s
        c.violating_acquisitions = self.validator.violating_acquisitions
        g.apply(t, now, observed=observed)
        record = {"op": t.op.value, "lock": ref, "owner": t.owner, "task": t.task, "site": t.site,
                  "vt_us": round(t.vt_us, 3)}
        self._recent.append(record)
        log.debug(ev.LOCK_EVENT, **record)
        if t.op is LockOp.WAIT and observed:
            cycle = g.cycle_through(t.owner)
            if cycle is not None:
                self._on_cycle(cycle)

    def sweep(self) -> int:
        """Check the whole graph; returns the cycles found that were not reported before."""
        new = 0
        for cycle in self.graph.cycles():
            if cycle_signature(cycle) not in self._reported:
                new += 1
                self._on_cycle(cycle)
        return new

    def _on_cycle(self, cycle: list[CycleEdge]) -> None:
        sig = cycle_signature(cycle)
        if sig in self._reported or self.deadlocked:
            return   # seen, or the run is ending on a deadlock already (its other cycles are the same knot)
        self._reported.add(sig)
        self.counters.deadlocks += 1
        now = time.time()
        edges = [e.as_dict(now) for e in cycle]
        victim = self._breakable(cycle) if self.cfg.break_deadlocks else None
        action = f"failed {victim.owner}'s wait for {victim.waits_for_lock}" if victim else "ending the run"
        if self.first_cycle is None:
            self.first_cycle = edges
        log.error(ev.DEADLOCK_DETECTED, protocol=self.protocol.value, length=len(edges), cycle=edges,
                  summary=describe_cycle(cycle), action=action, recent_events=list(self._recent))
        if victim is not None:
            self.counters.deadlocks_broken += 1
            # The wait closed a cycle; the signature may come back after the retry.
            self._reported.discard(sig)
            self.hostmem.fail_waiter(victim.owner, DeadlockBroken(victim.owner, victim.waits_for_lock))
            return
        if not self.deadlocked:
            self.deadlocked = True
            self._stop(DEADLOCK_REASON)

    def _breakable(self, cycle: list[CycleEdge]) -> CycleEdge | None:
        """A guest vCPU's wait for L_hostmem, the request the guest can retry."""
        for e in cycle:
            if e.waits_for_lock == self.hostmem.ref and split_owner(e.owner)[1] == VCPU_TASK \
                    and e.owner in self.hostmem.waiting():
                return e
        return None

    def start(self) -> None:
        """Start the periodic sweep (needs a running loop)."""
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.check_interval_s)  # a wall-clock period, by design
            self.sweep()
            self.check_holds()

    def check_holds(self) -> list[int]:
        """Revoke L_hostmem from a guest that took it itself and kept it past the bound while others wait."""
        holder = self.hostmem.holder
        if not self.hold_bound_s or holder is None or holder not in self._guest_holds or not self.hostmem.waiting():
            return []
        gid, since = self._guest_holds[holder]
        held_s = time.monotonic() - since
        if held_s < self.hold_bound_s:
            return []
        waiting = self.hostmem.waiting()
        levels = self.hostmem.release_all(holder, vt_us=self._clock())
        self._guest_holds.pop(holder, None)
        self.counters.locks_revoked += 1
        why = (f"held {self.hostmem.ref} for {held_s:.1f} s (bound {self.hold_bound_s:g} s) while "
               f"{len(waiting)} owner(s) waited for it")
        log.warning(ev.LOCK_REVOKED, guest=gid, owner=holder, lock=self.hostmem.ref, levels=levels, reason=why,
                    waiting=waiting[:8])
        if self._on_overheld is not None:
            self._on_overheld(gid, why)
        return [gid]

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._reclaim_task is not None and not self._reclaim_task.done():
            self._reclaim_task.cancel()

    # --- the guests' requests ------------------------------------------------------------

    def wrap(self, guest_id: int, msg_type: MsgType, handler: Callable[[Any], Any]) -> RequestHandler:
        """``handler`` runs under L_hostmem, held for the guest's vCPU."""
        owner = owner_name(guest_proc(guest_id), VCPU_TASK)
        site = msg_type.name.lower()
        task = f"{site}:{guest_proc(guest_id)}"
        lock = self.hostmem

        async def locked(m: Any) -> Any:
            CURRENT_OWNER.set(owner)   # this request's own task: the shootdowns it causes are for the vCPU
            async with lock.hold(owner, task=task, site=site, vt_us=m.vt_us) as granted:
                if granted > m.vt_us:   # stalled behind a holder in virtual time: the request starts then
                    m = dataclasses.replace(m, vt_us=granted)
                result = handler(m)
                if inspect.isawaitable(result):
                    result = await result
                return result

        return locked  # type: ignore[return-value]

    def lock_handlers(self, guest_id: int) -> dict[MsgType, RequestHandler]:
        """``LockAcquire``/``LockRelease`` of L_hostmem by a guest (the ``ordered`` protocol)."""
        proc = guest_proc(guest_id)
        task = f"lock_acquire:{proc}"
        lock = self.hostmem

        def check(m: LockAcquire | LockRelease) -> str:
            if m.lock != LockClass.L_HOSTMEM.label:
                raise BadLockRequest(f"guest {guest_id}: the host has only {LockClass.L_HOSTMEM.label}, "
                                     f"not {m.lock!r}")
            try:
                owner_proc, _ = split_owner(m.owner)
            except ValueError as exc:
                raise BadLockRequest(f"guest {guest_id}: {exc}") from None
            if owner_proc != proc:
                raise BadLockRequest(f"guest {guest_id}: may take locks for its own tasks only, not {m.owner!r}")
            return m.owner

        async def acquire(m: LockAcquire) -> LockReply:
            owner = check(m)
            granted = await lock.acquire(owner, task=task, site=m.site or "lock_acquire", vt_us=m.vt_us)
            if owner not in self._guest_holds and lock.held_by(owner):
                self._guest_holds[owner] = (guest_id, time.monotonic())
            return LockReply(granted + self.hypercall_us)

        def release(m: LockRelease) -> LockReply:
            owner = check(m)
            if lock.held_by(owner):
                lock.release(owner, site=m.site or "lock_release", vt_us=m.vt_us)
                if not lock.held_by(owner):
                    self._guest_holds.pop(owner, None)
            elif not lock.fail_waiter(owner, asyncio.CancelledError(f"{owner} gave up")):
                raise LockStateError(f"guest {guest_id}: {owner} neither holds nor waits for {lock.ref}")
            return LockReply(m.vt_us + self.hypercall_us)

        return {MsgType.LOCK_ACQUIRE: acquire, MsgType.LOCK_RELEASE: release}  # type: ignore[dict-item]

    def guest_unresponsive(self, guest_id: int) -> None:
        """A guest the watchdog gave up on loses L_hostmem if its vCPU holds it (ordered), or the host stalls."""
        owner = owner_name(guest_proc(guest_id), VCPU_TASK)
        levels = 0
        for o in self._owners_of(guest_proc(guest_id)):
            n = self.hostmem.release_all(o, vt_us=self._clock())
            if n:
                owner, levels = o, n
        self._forget_holds(guest_id)
        if levels:
            self.counters.locks_revoked += 1
            log.warning(ev.LOCK_REVOKED, guest=guest_id, owner=owner, lock=self.hostmem.ref, levels=levels)

    def guest_gone(self, guest_id: int) -> None:
        """Its vCPU's holds and waits end with it (or the others would wait forever)."""
        proc = guest_proc(guest_id)
        for owner in self._owners_of(proc):   # any task name it took or waits for the lock for
            self.hostmem.release_all(owner, vt_us=self._clock())
        self._forget_holds(guest_id)
        self.graph.drop_proc(proc)

    def _owners_of(self, proc: str) -> list[str]:
        owners = [self.hostmem.holder, *self.hostmem.waiting(), owner_name(proc, VCPU_TASK)]
        return sorted({o for o in owners if o is not None and split_owner(o)[0] == proc})

    def _forget_holds(self, guest_id: int) -> None:
        for owner in [o for o, (g, _) in self._guest_holds.items() if g == guest_id]:
            if not self.hostmem.held_by(owner):
                del self._guest_holds[owner]

    # --- shootdowns ------------------------------------------------------------------------

    async def shootdown(self, conn: RpcConnection, guest_id: int, gpfns: np.ndarray, timeout_s: float,
                        invalidate: Callable[[], Awaitable[np.ndarray]] | None = None) -> np.ndarray:
        """Invalidate ``gpfns`` in the guest while holding its L_vmem for ``CURRENT_OWNER``.

        ``invalidate`` sends the Invalidate and returns the tokens (default: a
        plain call). The machine passes the watchdog's, so that once the
        Invalidate is out, a guest that goes silent gets a deferred shootdown
        instead of a failed one that it might still obey later.
        """
        owner = CURRENT_OWNER.get()
        vt = float(self._clock())
        acquire = LockAcquire(LockClass.L_VMEM.label, owner, "shootdown", vt)
        release = LockRelease(LockClass.L_VMEM.label, owner, "shootdown", vt)
        key = (guest_id, owner)
        self._asked[key] = self._asked.get(key, 0) + 1   # until the release is done (_release_remote)
        try:
            await conn.call(acquire, timeout_s=timeout_s)
        except BaseException:
            # It may still be granted later: tell the guest to let go.
            self._spawn(self._release_remote(conn, release, timeout_s, key))
            raise
        self.counters.remote_vmem_acquisitions += 1
        try:
            if invalidate is not None:
                return await invalidate()
            reply = await conn.call(Invalidate(gpfns), timeout_s=timeout_s)
            assert isinstance(reply, InvalidateReply)
            return reply.tokens
        finally:
            # Awaited, so the guest's release event is in before we go on (the graph stays exact);
            # shielded, so a cancelled shootdown still lets go of the guest's lock.
            await asyncio.shield(self._spawn(self._release_remote(conn, release, timeout_s, key)))

    async def _release_remote(self, conn: RpcConnection, msg: LockRelease, timeout_s: float,
                              key: tuple[int, str]) -> None:
        try:
            if not conn.is_closing:
                await conn.call(msg, timeout_s=timeout_s)
        except (PeerClosed, ProtoError) as exc:
            log.debug(ev.LOCK_RELEASE_FAILED, lock=msg.lock, owner=msg.owner, peer=conn.name, reason=str(exc))
        finally:
            # The guest's release event, if any, came in before its reply: from now on it may send none.
            left = self._asked.get(key, 0) - 1
            if left > 0:
                self._asked[key] = left
            else:
                self._asked.pop(key, None)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def callout(self) -> Any:
        """For ``HostMemory.callout`` under no-callback-under-lock: drop L_hostmem around a call to guests."""
        return self.hostmem.suspended(CURRENT_OWNER.get(), site="callout", vt_us=self._clock)

    # --- the host's own tasks ------------------------------------------------------------------

    def tick_started(self, mem: Any, vt_us: float) -> None:
        """The seed's host thread: reclaim while the guests run, if free frames are short."""
        if self.cfg.reclaim_free_pct <= 0 or (self._reclaim_task is not None and not self._reclaim_task.done()):
            return
        target = int(mem.pool.total_frames * self.cfg.reclaim_free_pct / 100)
        if mem.pool.free_frames >= target:
            return
        self._reclaim_task = asyncio.ensure_future(self._tick_reclaim(mem, target, float(vt_us)))

    async def _tick_reclaim(self, mem: Any, target: int, vt_us: float) -> None:
        CURRENT_OWNER.set(RECLAIM_OWNER)
        c = self.counters
        async with self.hostmem.hold(RECLAIM_OWNER, task="reclaim", site="tick_reclaim", vt_us=vt_us) as vt_us:
            c.tick_reclaims += 1
            fruitless = 0
            while mem.pool.free_frames < target and fruitless < _FRUITLESS_RECLAIMS:
                got = await mem.reclaim(max(target - mem.pool.free_frames, mem.reclaim_batch_frames), vt_us)
                c.tick_reclaim_frames += got.freed_frames
                fruitless = 0 if got.freed_frames else fruitless + 1

    async def finish_tick(self) -> None:
        """Wait for this tick's reclaim task (the tick's end changes memory too)."""
        task = self._reclaim_task
        if task is None:
            return
        self._reclaim_task = None
        try:
            await task
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a reclaim failure must not end the run; it is logged
            log.error(ev.TICK_RECLAIM_FAILED, reason=f"{type(exc).__name__}: {exc}")

    async def balance(self, mem: Any, vt_us: float) -> Any:
        """The tick-end background reclaim, under L_hostmem as ``host/tick``."""
        token = CURRENT_OWNER.set(TICK_OWNER)
        try:
            async with self.hostmem.hold(TICK_OWNER, task="tick", site="tick_balance", vt_us=vt_us) as granted:
                return await mem.balance(granted)
        finally:
            CURRENT_OWNER.reset(token)

    # --- reporting -----------------------------------------------------------------------------------

    def final_metrics(self) -> dict[str, Any]:
        c = asdict(self.counters)
        c["hostmem_wait_s"] = round(c["hostmem_wait_s"], 3)
        c["vmem_wait_s"] = round(c["vmem_wait_s"], 3)
        return {"protocol": self.protocol.value, "break_deadlocks": self.cfg.break_deadlocks,
                "lock_order_violations": self.validator.distinct, "deadlocked": self.deadlocked,
                "graph_anomalies": self.graph.anomalies, "first_cycle": self.first_cycle, **c}


def describe_cycle(cycle: list[CycleEdge]) -> str:
    """One line a person reads: who holds what and waits for what."""
    return "; ".join(f"{e.proc}/{e.task} (for {e.owner}) holds {e.holds_lock} and waits for {e.waits_for_lock}"
                     if f"{e.proc}/{e.task}" != e.owner else
                     f"{e.owner} holds {e.holds_lock} and waits for {e.waits_for_lock}" for e in cycle)

