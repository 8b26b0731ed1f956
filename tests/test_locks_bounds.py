"""One guest cannot stop the run through the lock model.

- A cycle is declared only from waits the host observed itself: a guest that
  reports a wait of one of its own tasks for its own ``L_vmem``, behind a
  real wait of another of its tasks for the host's lock, draws a "cycle"
  that is only its word; the host does not end everyone's run on it. (The
  seed's real cycle, with the host's own wait, is still found:
  ``test_deadlock_sides.py``.)
- A guest that takes ``L_hostmem`` itself (``LockAcquire``, the ordered
  protocol) and keeps it while others wait loses it after the bound and is
  cut off; the waiter gets the lock.
"""
from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from balloonlab.proto import events as ev
from balloonlab.proto.locks import LockProtocol
from balloonlab.proto.messages import LockAcquire, LockRelease, MsgType

from .test_deadlock_sides import guest_event, host_locks


async def test_a_guests_own_task_names_cannot_make_a_host_wide_deadlock() -> None:
    locks, stops = host_locks(LockProtocol.ORDERED)
    handlers = locks.lock_handlers(1)
    acquire = handlers[MsgType.LOCK_ACQUIRE]
    # Task y takes the host's lock (real, observed); task x takes the guest's own L_vmem (its word).
    await acquire(LockAcquire("L_hostmem", "guest-1/y", "attack", 0.0))
    locks.on_guest_event(1, guest_event("acquire", "guest-1/x", task="x"))
    # x waits for the host's lock, held by y: a real wait the host sees.
    x_waits = asyncio.ensure_future(acquire(LockAcquire("L_hostmem", "guest-1/x", "attack", 0.0)))
    await asyncio.sleep(0)
    assert locks.hostmem.waiting() == ["guest-1/x"]
    with capture_logs() as logs:
        # y "waits" for L_vmem@guest-1, held by x: only the guest says so. That would close x -> y -> x.
        locks.on_guest_event(1, guest_event("wait", "guest-1/y", task="y"))
        assert locks.sweep() == 0
    assert not locks.deadlocked and stops == [] and locks.counters.deadlocks == 0
    assert not [e for e in logs if e["event"] == ev.DEADLOCK_DETECTED]
    assert locks.graph.is_waiting("guest-1/y", "L_vmem@guest-1")   # kept, shown, just never followed
    x_waits.cancel()
    locks.guest_gone(1)
    assert locks.hostmem.holder is None and locks.hostmem.waiting() == []


async def test_a_guest_keeping_the_hosts_lock_past_the_bound_loses_it_and_is_cut_off() -> None:
    locks, stops = host_locks(LockProtocol.ORDERED)
    cut: list[tuple[int, str]] = []
    locks.guard_holds(5.0, lambda gid, why: cut.append((gid, why)))
    hog = locks.lock_handlers(2)[MsgType.LOCK_ACQUIRE]
    await hog(LockAcquire("L_hostmem", "guest-2/hog", "attack", 0.0))
    other = asyncio.ensure_future(locks.lock_handlers(1)[MsgType.LOCK_ACQUIRE](
        LockAcquire("L_hostmem", "guest-1/vcpu", "batch", 0.0)))
    await asyncio.sleep(0)
    assert locks.check_holds() == []                      # held, but not for long yet
    gid, since = locks._guest_holds["guest-2/hog"]
    locks._guest_holds["guest-2/hog"] = (gid, since - 6.0)   # as if 6 s had passed
    with capture_logs() as logs:
        assert locks.check_holds() == [2]
    revoked = [e for e in logs if e["event"] == ev.LOCK_REVOKED]
    assert revoked and revoked[0]["guest"] == 2 and revoked[0]["owner"] == "guest-2/hog"
    assert cut and cut[0][0] == 2 and "held L_hostmem@host for 6" in cut[0][1] and "1 owner(s) waited" in cut[0][1]
    await asyncio.wait_for(other, 1)                        # the waiter got it
    assert locks.hostmem.holder == "guest-1/vcpu" and locks.counters.locks_revoked == 1 and stops == []


async def test_a_lock_held_past_the_bound_with_nobody_waiting_is_left_alone() -> None:
    """Holding costs the others nothing while nobody waits; and a release ends the watch."""
    locks, _ = host_locks(LockProtocol.ORDERED)
    cut: list[tuple[int, str]] = []
    locks.guard_holds(0.01, lambda gid, why: cut.append((gid, why)))
    handlers = locks.lock_handlers(2)
    await handlers[MsgType.LOCK_ACQUIRE](LockAcquire("L_hostmem", "guest-2/vcpu", "batch", 0.0))
    time.sleep(0.02)
    assert locks.check_holds() == [] and cut == []
    handlers[MsgType.LOCK_RELEASE](LockRelease("L_hostmem", "guest-2/vcpu", "batch", 0.0))
    assert locks._guest_holds == {}
