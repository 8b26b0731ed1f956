"""Each side of the lock model in one event loop: the host's ``HostLocks``, the guest's ``GuestLocks``.

The other side is played by hand (a fake connection that records what is
sent and answers calls), so each test can put the two processes' locks
exactly where the seed puts them.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from balloonlab.guestd.locks import GuardedHypervisor, GuestLocks
from balloonlab.hostd.locks import (CURRENT_OWNER, RECLAIM_OWNER, BadLockRequest, DeadlockBroken, HostLocks,
                         LockStateError)
from balloonlab.proto import events as ev
from balloonlab.proto.errors import ErrorCode, RemoteError
from balloonlab.proto.locks import LockClass, LockConfig, LockOp, LockProtocol, LockTransition
from balloonlab.proto.messages import EptFault, EptFaultReply, LockAcquire, LockEvent, LockRelease, LockReply, MsgType

GUEST = "guest-1/vcpu"


def host_locks(protocol: LockProtocol = LockProtocol.NAIVE, **kw: Any) -> tuple[HostLocks, list[str]]:
    stops: list[str] = []
    return HostLocks(LockConfig(protocol=protocol, **kw), stops.append, lambda: 10_000.0), stops


def guest_event(op: str, owner: str, task: str = "vcpu", site: str = "vcpu") -> LockEvent:
    return LockEvent(op, "L_vmem", owner, task, site, 0.0)


async def fault_handler(m: EptFault) -> EptFaultReply:
    return EptFaultReply(m.gpfns, m.vt_us + 5.0)


class GuestHoldingVmem:
    """Guest 1 as the host's reclaim sees it: its vCPU holds L_vmem, so the host's LockAcquire never returns."""

    is_closing = False
    name = "guest-1"

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def call(self, msg: Any, timeout_s: float | None = None) -> Any:
        self.calls.append(msg)
        if isinstance(msg, LockAcquire):
            await asyncio.get_running_loop().create_future()
        return LockReply(msg.vt_us + 2.0)


async def _seed_deadlock(locks: HostLocks) -> tuple[asyncio.Task, asyncio.Task]:
    """The host's reclaim holds L_hostmem; guest 1's vCPU holds L_vmem and faults; the reclaim shoots it down."""
    await locks.hostmem.acquire(RECLAIM_OWNER, task="reclaim", site="tick_reclaim")
    locks.on_guest_event(1, guest_event("acquire", GUEST))
    handler = locks.wrap(1, MsgType.EPT_FAULT, fault_handler)
    fault = asyncio.ensure_future(handler(EptFault(b"\x01" + b"\x00" * 7, 123.0)))  # type: ignore[arg-type]
    await asyncio.sleep(0)            # the handler now waits for L_hostmem, for the guest's vCPU

    async def reclaim_shootdown() -> None:
        CURRENT_OWNER.set(RECLAIM_OWNER)
        await locks.shootdown(GuestHoldingVmem(), 1, np.array([1], np.uint64), 0)  # type: ignore[arg-type]

    shootdown = asyncio.ensure_future(reclaim_shootdown())
    await asyncio.sleep(0)            # its LockAcquire is out: the guest reports the wait it caused
    locks.on_guest_event(1, guest_event("wait", RECLAIM_OWNER, task="lock_acquire", site="shootdown"))
    return fault, shootdown


async def test_naive_the_host_reports_the_seeds_cycle_after_the_order_violation_and_ends_the_run() -> None:
    locks, stops = host_locks()
    with capture_logs() as logs:
        fault, shootdown = await _seed_deadlock(locks)
    names = [e["event"] for e in logs if e["event"] in (ev.LOCK_ORDER_VIOLATION, ev.DEADLOCK_DETECTED)]
    assert names == [ev.LOCK_ORDER_VIOLATION, ev.DEADLOCK_DETECTED]   # flagged before the deadlock
    violation = next(e for e in logs if e["event"] == ev.LOCK_ORDER_VIOLATION)
    assert (violation["held"], violation["acquiring"], violation["site"]) == ("L_vmem", "L_hostmem", "ept_fault")
    report = next(e for e in logs if e["event"] == ev.DEADLOCK_DETECTED)
    assert [(c["proc"], c["task"], c["holds"], c["waits_for"]) for c in report["cycle"]] == [
        ("guest-1", "vcpu", "L_vmem", "L_hostmem"), ("host", "reclaim", "L_hostmem", "L_vmem")]
    assert report["action"] == "ending the run" and stops == ["deadlock"]
    assert locks.deadlocked and locks.final_metrics()["deadlocks"] == 1
    assert locks.sweep() == 0          # already reported: the sweep does not report it again
    fault.cancel()
    shootdown.cancel()


async def test_break_deadlocks_fails_the_guests_wait_with_deadlock_broken() -> None:
    locks, stops = host_locks(break_deadlocks=True)
    with capture_logs():
        fault, shootdown = await _seed_deadlock(locks)
    with pytest.raises(DeadlockBroken) as info:
        await fault
    shootdown.cancel()
    assert info.value.code == ErrorCode.DEADLOCK_BROKEN and stops == [] and not locks.deadlocked
    assert locks.graph.cycles() == []
    m = locks.final_metrics()
    assert (m["deadlocks"], m["deadlocks_broken"]) == (1, 1)


async def test_a_cycle_the_events_close_without_a_new_wait_is_found_by_the_sweep() -> None:
    locks, stops = host_locks()
    with capture_logs():
        for e in [LockTransition(LockOp.ACQUIRE, LockClass.L_VMEM, "guest-1", GUEST, "vcpu", "", 0.0),
                  LockTransition(LockOp.ACQUIRE, LockClass.L_HOSTMEM, "host", RECLAIM_OWNER, "reclaim", "", 0.0),
                  LockTransition(LockOp.WAIT, LockClass.L_HOSTMEM, "host", GUEST, "x", "", 0.0),
                  LockTransition(LockOp.WAIT, LockClass.L_VMEM, "guest-1", RECLAIM_OWNER, "y", "", 0.0)]:
            locks.graph.apply(e, 0.0)   # straight into the graph: no check on the way
        assert locks.sweep() == 1
    assert stops == ["deadlock"]


async def test_the_host_refuses_bad_lock_requests_and_events() -> None:
    locks, _ = host_locks(LockProtocol.ORDERED)
    handlers = locks.lock_handlers(1)
    with pytest.raises(BadLockRequest, match="own tasks"):
        await handlers[MsgType.LOCK_ACQUIRE](LockAcquire("L_hostmem", "guest-2/vcpu", "x", 0.0))
    with pytest.raises(BadLockRequest, match="only L_hostmem"):
        await handlers[MsgType.LOCK_ACQUIRE](LockAcquire("L_vmem", GUEST, "x", 0.0))
    with pytest.raises(LockStateError, match="neither holds nor waits"):
        handlers[MsgType.LOCK_RELEASE](LockRelease("L_hostmem", GUEST, "x", 0.0))
    reply = await handlers[MsgType.LOCK_ACQUIRE](LockAcquire("L_hostmem", GUEST, "vcpu", 50.0))
    assert isinstance(reply, LockReply) and reply.done_vt_us == 52.0 and locks.hostmem.held_by(GUEST)
    locks.guest_gone(1)                 # a guest that dies holding the host's lock gives it back
    assert locks.hostmem.holder is None
    with pytest.raises(BadLockRequest, match="'explode'"):
        locks.on_guest_event(1, LockEvent("explode", "L_vmem", GUEST, "vcpu", "", 0.0))
    # A lying guest must not draw edges for others: another guest's vCPU, or a host task that never
    # asked for its L_vmem (with both, it could fake a cycle and end everyone's run).
    with pytest.raises(BadLockRequest, match="neither its own task"):
        locks.on_guest_event(1, LockEvent("wait", "L_vmem", "guest-2/vcpu", "vcpu", "", 0.0))
    with pytest.raises(BadLockRequest, match="neither its own task"):
        locks.on_guest_event(1, LockEvent("wait", "L_vmem", RECLAIM_OWNER, "lock_acquire", "shootdown", 0.0))
    assert locks.graph.cycles() == [] and locks.final_metrics()["bad_guest_events"] >= 3
    with pytest.raises(BadLockRequest, match="only L_vmem"):
        locks.on_guest_event(1, LockEvent("wait", "L_hostmem", GUEST, "vcpu", "", 0.0))


# --- the guest's side ------------------------------------------------------------------------

class FakeHost:
    """The guest's connection to the host: records notifications, answers calls from a script."""

    def __init__(self) -> None:
        self.is_closing = False
        self.sent: list[Any] = []
        self.calls: list[Any] = []
        self.fail_next: list[int] = []

    def notify(self, msg: Any) -> None:
        self.sent.append(msg)

    async def call(self, msg: Any, timeout_s: float | None = None) -> Any:
        self.calls.append(msg)
        if isinstance(msg, (LockAcquire, LockRelease)):
            return LockReply(msg.vt_us + 2.0)
        raise AssertionError(f"unexpected call {msg!r}")


class Kernel:
    vt_us = 1_000.0


def guest_locks(protocol: LockProtocol, conn: FakeHost) -> GuestLocks:
    locks = GuestLocks(1, LockConfig(protocol=protocol), conn)  # type: ignore[arg-type]
    locks.attach(Kernel())
    return locks


async def test_ordered_the_vcpu_takes_the_hosts_lock_before_its_own_and_gives_it_back_after() -> None:
    conn = FakeHost()
    locks = guest_locks(LockProtocol.ORDERED, conn)
    async with locks.mm_lock():
        async with locks.mm_lock():     # nested: still one pair of lock hypercalls
            pass
    assert [(type(c).__name__, c.lock) for c in conn.calls] == [("LockAcquire", "L_hostmem"),
                                                               ("LockRelease", "L_hostmem")]
    assert [(m.op, m.lock, m.owner) for m in conn.sent] == [("acquire", "L_vmem", GUEST), ("release", "L_vmem", GUEST)]
    assert locks.kernel.vt_us == 1_004.0   # each lock hypercall costs the vCPU its hypercall time


async def test_no_callback_the_vcpu_drops_its_lock_around_a_hypercall() -> None:
    conn = FakeHost()
    locks = guest_locks(LockProtocol.NO_CALLBACK, conn)
    seen_held: list[bool] = []

    class Hyp:
        async def ept_fault(self, gpfns: Any, vt_us: float) -> tuple[Any, float]:
            seen_held.append(locks.vmem.held_by(GUEST))
            return gpfns, vt_us

    hyp = GuardedHypervisor(Hyp(), locks)
    async with locks.mm_lock():
        await hyp.ept_fault([1], 0.0)
        assert locks.vmem.held_by(GUEST)
    assert seen_held == [False]
    assert [m.op for m in conn.sent] == ["acquire", "release", "acquire", "release"]


async def test_a_hypercall_failed_with_deadlock_broken_yields_the_lock_then_is_retried() -> None:
    conn = FakeHost()
    locks = guest_locks(LockProtocol.NAIVE, conn)
    attempts: list[bool] = []
    order: list[str] = []

    class Hyp:
        async def ept_fault(self, gpfns: Any, vt_us: float) -> tuple[Any, float]:
            attempts.append(True)
            if len(attempts) == 1:
                raise RemoteError(ErrorCode.DEADLOCK_BROKEN, "cycle")
            return gpfns, vt_us

    async def host_shootdown() -> None:   # the host's remote acquisition, queued behind the vCPU
        await locks.on_lock_acquire(LockAcquire("L_vmem", RECLAIM_OWNER, "shootdown", 0.0))
        order.append("shootdown")
        locks.on_lock_release(LockRelease("L_vmem", RECLAIM_OWNER, "shootdown", 0.0))

    hyp = GuardedHypervisor(Hyp(), locks)
    async with locks.mm_lock():
        shoot = asyncio.ensure_future(host_shootdown())
        await asyncio.sleep(0)
        await hyp.ept_fault([1], 0.0)
        order.append("retried")
    await shoot
    assert len(attempts) == 2 and order == ["shootdown", "retried"]
    assert locks.counters.deadlock_retries == 1
    with pytest.raises(Exception, match="neither holds nor waits"):
        locks.on_lock_release(LockRelease("L_vmem", RECLAIM_OWNER, "shootdown", 0.0))


async def test_a_guest_gone_unresponsive_loses_the_hosts_lock_and_tolerates_it() -> None:
    locks, _ = host_locks(LockProtocol.ORDERED)
    handlers = locks.lock_handlers(1)
    await handlers[MsgType.LOCK_ACQUIRE](LockAcquire("L_hostmem", GUEST, "vcpu", 0.0))
    with capture_logs() as logs:
        locks.guest_unresponsive(1)             # e.g. stopped with SIGSTOP while it held it
    assert locks.hostmem.holder is None and locks.counters.locks_revoked == 1
    assert [e["event"] for e in logs if e["event"] != ev.LOCK_EVENT] == [ev.LOCK_REVOKED]

    class Revoked(FakeHost):
        async def call(self, msg: Any, timeout_s: float | None = None) -> Any:
            if isinstance(msg, LockRelease):
                raise RemoteError(ErrorCode.INVALID_STATE, "neither holds nor waits")
            return await super().call(msg, timeout_s)

    g = guest_locks(LockProtocol.ORDERED, Revoked())
    async with g.mm_lock():
        pass                                    # its late release is refused; the vCPU goes on
    assert g.counters.hostmem_revoked == 1 and not g.vmem.held_by(GUEST)
