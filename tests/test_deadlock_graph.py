"""The lock model's pure parts: the owner lock, the wait-for graph, cycle detection, the order validator.

No processes, no sockets: events are fed by hand or come from real
``OwnerLock`` objects in one event loop, the way the host and the guests
produce them.
"""
from __future__ import annotations

import asyncio

import pytest

from balloonlab.hostd.deadlock import LockdepValidator, WaitForGraph, cycle_signature
from balloonlab.proto.errors import ConfigError
from balloonlab.proto.locks import (GLOBAL_ORDER, LockClass, LockConfig, LockOp, LockProtocol, LockTransition, OwnerLock,
                         lock_config_from_mapping, order_violation, split_owner)

HM, VM = LockClass.L_HOSTMEM, LockClass.L_VMEM
GUEST = "guest-1/vcpu"
RECLAIM = "host/reclaim"


def t(op: str, lock: LockClass, proc: str, owner: str, task: str = "", site: str = "", vt: float = 0.0
      ) -> LockTransition:
    return LockTransition(LockOp(op), lock, proc, owner, task or split_owner(owner)[1], site, vt)


def seed_cycle_events() -> list[LockTransition]:
    """The seed's dance: the guest holds L_vmem and faults; the host's reclaim holds L_hostmem and shoots down."""
    return [
        t("acquire", VM, "guest-1", GUEST, site="vcpu", vt=100.0),
        t("acquire", HM, "host", RECLAIM, task="reclaim", site="tick_reclaim", vt=0.0),
        t("wait", HM, "host", GUEST, task="ept_fault:guest-1", site="ept_fault", vt=150.0),
        t("wait", VM, "guest-1", RECLAIM, task="lock_acquire", site="shootdown", vt=0.0),
    ]


def feed(g: WaitForGraph, events: list[LockTransition], first: int = 0) -> None:
    """Event i arrives at wall second 1000 + first + i."""
    for i, e in enumerate(events):
        g.apply(e, wall_s=1000.0 + first + i)


# --- the global order ------------------------------------------------------------------

def test_the_global_order_puts_hostmem_before_vmem() -> None:
    assert GLOBAL_ORDER == (HM, VM)
    assert order_violation([VM], HM) is VM          # the guest's fault under L_vmem
    assert order_violation([HM], VM) is None        # the host's shootdown under L_hostmem
    assert order_violation([VM], VM) is None        # same class: ranked equal, not an inversion
    assert [c.label for c in LockClass] == ["L_hostmem", "L_vmem"]
    assert LockClass.from_label("L_vmem") is VM
    with pytest.raises(ValueError, match="L_nope"):
        LockClass.from_label("L_nope")


# --- the wait-for graph ----------------------------------------------------------------------

def test_the_seeds_cycle_is_found_with_both_edges() -> None:
    g = WaitForGraph()
    events = seed_cycle_events()
    feed(g, events[:-1])
    assert g.cycle_through(GUEST) is None and g.cycle_through(RECLAIM) is None   # not closed yet
    feed(g, events[-1:], first=3)
    cycle = g.cycle_through(RECLAIM)
    assert cycle is not None and len(cycle) == 2
    guest_edge, host_edge = cycle    # the guest's edge first, as the seed tells it
    assert (guest_edge.owner, guest_edge.proc, guest_edge.task) == (GUEST, "guest-1", "vcpu")
    assert (guest_edge.holds, guest_edge.holds_lock) == ("L_vmem", "L_vmem@guest-1")
    assert (guest_edge.waits_for, guest_edge.waits_for_lock) == ("L_hostmem", "L_hostmem@host")
    assert (guest_edge.wait_proc, guest_edge.wait_task, guest_edge.since_vt_us) == ("host", "ept_fault:guest-1", 150.0)
    assert (host_edge.owner, host_edge.proc, host_edge.task) == (RECLAIM, "host", "reclaim")
    assert (host_edge.holds, host_edge.waits_for, host_edge.waits_for_lock) == ("L_hostmem", "L_vmem", "L_vmem@guest-1")
    assert (host_edge.wait_proc, host_edge.site) == ("guest-1", "shootdown")
    # Found from either end, it is the same cycle.
    assert cycle_signature(g.cycle_through(GUEST) or []) == cycle_signature(cycle)
    assert len(g.cycles()) == 1
    d = host_edge.as_dict(now_wall_s=1010.0)
    assert d["waited_s"] == pytest.approx(7.0) and d["holds_lock"] == "L_hostmem@host"


def test_a_released_lock_or_a_cancelled_wait_breaks_the_cycle() -> None:
    g = WaitForGraph()
    feed(g, seed_cycle_events())
    feed(g, [t("cancel", HM, "host", GUEST, task="ept_fault:guest-1")])   # the fault was failed (DEADLOCK_BROKEN)
    assert g.cycles() == []
    g2 = WaitForGraph()
    feed(g2, seed_cycle_events()[:-1] + [t("release", VM, "guest-1", GUEST)])
    feed(g2, seed_cycle_events()[-1:])      # the shootdown now waits for a free lock: no one to wait for
    assert g2.cycles() == []


def test_an_owner_waiting_for_several_locks_is_in_a_cycle_through_any_of_them() -> None:
    """The host shoots down guests 1 and 2 at once: only guest 2 holds its L_vmem while faulting."""
    g = WaitForGraph()
    feed(g, [
        t("acquire", HM, "host", RECLAIM),
        t("acquire", VM, "guest-1", "guest-9/other"),          # someone else, not waiting for anything
        t("wait", VM, "guest-1", RECLAIM, task="lock_acquire"),
        t("acquire", VM, "guest-2", "guest-2/vcpu"),
        t("wait", VM, "guest-2", RECLAIM, task="lock_acquire"),
        t("wait", HM, "host", "guest-2/vcpu", task="ept_fault:guest-2"),
    ])
    cycle = g.cycle_through(RECLAIM)
    assert cycle is not None
    assert {e.owner for e in cycle} == {RECLAIM, "guest-2/vcpu"}
    assert {e.waits_for_lock for e in cycle} == {"L_vmem@guest-2", "L_hostmem@host"}


def test_a_longer_cycle_through_two_guests() -> None:
    """Direct reclaim in guest 1's fault handler shoots down guest 2, whose vCPU waits for the host."""
    g = WaitForGraph()
    feed(g, [
        t("acquire", VM, "guest-1", GUEST),
        t("acquire", HM, "host", GUEST, task="ept_fault:guest-1"),
        t("acquire", VM, "guest-2", "guest-2/vcpu"),
        t("wait", HM, "host", "guest-2/vcpu", task="ept_fault:guest-2"),
        t("wait", VM, "guest-2", GUEST, task="lock_acquire", site="shootdown"),
    ])
    cycle = g.cycle_through(GUEST)
    assert cycle is not None and len(cycle) == 2
    first, second = cycle
    assert (first.owner, first.holds_lock, first.waits_for_lock) == ("guest-2/vcpu", "L_vmem@guest-2", "L_hostmem@host")
    # The host task holding L_hostmem is the handler of guest 1's fault, acting for guest 1's vCPU.
    assert (second.proc, second.task, second.owner) == ("host", "ept_fault:guest-1", GUEST)
    assert (second.holds_lock, second.waits_for_lock) == ("L_hostmem@host", "L_vmem@guest-2")


def test_contradicting_events_are_counted_not_fatal_and_a_dead_process_is_dropped() -> None:
    g = WaitForGraph()
    feed(g, [t("release", VM, "guest-1", GUEST)])
    assert g.anomalies == 1
    feed(g, seed_cycle_events())
    g.drop_proc("guest-1")
    assert g.cycles() == [] and g.held(GUEST) == [] and g.waits(RECLAIM) == []
    assert [h.lock for h in g.held(RECLAIM)] == ["L_hostmem@host"]


# --- the order validator ----------------------------------------------------------------------

def test_lockdep_flags_each_inversion_once_per_site_and_never_the_right_order() -> None:
    g = WaitForGraph()
    v = LockdepValidator()
    found = []

    def step(e: LockTransition) -> None:
        if e.op is LockOp.WAIT or (e.op is LockOp.ACQUIRE and not g.is_waiting(e.owner, e.ref)):
            found.append(v.check(g.held(e.owner), e))
        g.apply(e, 0.0)

    step(t("acquire", VM, "guest-1", GUEST, site="vcpu"))
    step(t("acquire", HM, "host", GUEST, task="ept_fault:guest-1", site="ept_fault"))   # inversion
    step(t("release", HM, "host", GUEST, task="ept_fault:guest-1"))
    step(t("acquire", HM, "host", GUEST, task="ept_fault:guest-1", site="ept_fault"))   # same kind again
    step(t("release", HM, "host", GUEST))
    step(t("wait", HM, "host", GUEST, task="disk_read:guest-1", site="disk_read"))      # a new site
    step(t("acquire", HM, "host", GUEST, task="disk_read:guest-1", site="disk_read"))   # same attempt: no check
    step(t("acquire", HM, "host", RECLAIM, site="tick_reclaim"))
    step(t("acquire", VM, "guest-2", RECLAIM, task="lock_acquire", site="shootdown"))  # in order
    reported = [x for x in found if x is not None]
    assert [(x.held, x.acquiring, x.site) for x in reported] == [("L_vmem", "L_hostmem", "ept_fault"),
                                                                  ("L_vmem", "L_hostmem", "disk_read")]
    x = reported[0]
    assert (x.owner, x.proc, x.task, x.held_lock, x.held_site) == (GUEST, "host", "ept_fault:guest-1",
                                                                   "L_vmem@guest-1", "vcpu")
    assert v.violating_acquisitions == 3 and v.distinct == 2


# --- the owner lock -------------------------------------------------------------------------

async def test_owner_lock_is_reentrant_per_owner_fifo_and_reports_every_transition() -> None:
    seen: list[tuple[str, str]] = []
    lock = OwnerLock(VM, "guest-1", lambda e: seen.append((e.op.value, e.owner)))
    await lock.acquire(GUEST)
    await lock.acquire(GUEST)                 # re-entrant: no event
    order: list[str] = []

    async def take(owner: str) -> None:
        await lock.acquire(owner)
        order.append(owner)
        lock.release(owner)

    a = asyncio.ensure_future(take("host/a"))
    b = asyncio.ensure_future(take("host/b"))
    await asyncio.sleep(0)
    assert lock.waiting() == ["host/a", "host/b"]
    lock.release(GUEST)
    assert lock.held_by(GUEST)                # still one level
    lock.release(GUEST)
    await asyncio.gather(a, b)
    assert order == ["host/a", "host/b"]
    assert seen == [("acquire", GUEST), ("wait", "host/a"), ("wait", "host/b"), ("release", GUEST),
                    ("acquire", "host/a"), ("release", "host/a"), ("acquire", "host/b"), ("release", "host/b")]
    with pytest.raises(RuntimeError, match="holder is nobody"):
        lock.release(GUEST)


async def test_a_failed_or_cancelled_wait_is_reported_and_a_late_grant_is_passed_on() -> None:
    seen: list[tuple[str, str]] = []
    lock = OwnerLock(HM, "host", lambda e: seen.append((e.op.value, e.owner)))
    await lock.acquire(RECLAIM)
    failed = asyncio.ensure_future(lock.acquire(GUEST))
    cancelled = asyncio.ensure_future(lock.acquire("guest-2/vcpu"))
    late = asyncio.ensure_future(lock.acquire("guest-3/vcpu"))
    await asyncio.sleep(0)
    assert lock.fail_waiter(GUEST, KeyError("broken"))
    assert ("cancel", GUEST) in seen                   # reported at once, not when the waiter runs
    with pytest.raises(KeyError):
        await failed
    cancelled.cancel()
    await asyncio.sleep(0)
    assert ("cancel", "guest-2/vcpu") in seen and lock.waiting() == ["guest-3/vcpu"]
    lock.release(RECLAIM)                              # handed to guest 3 ...
    late.cancel()                                      # ... whose caller went away before it ran
    with pytest.raises(asyncio.CancelledError):
        await late
    assert lock.holder is None                         # passed on, not leaked
    assert seen[-2:] == [("acquire", "guest-3/vcpu"), ("release", "guest-3/vcpu")]


async def test_suspended_drops_every_level_and_takes_them_back() -> None:
    lock = OwnerLock(HM, "host")
    await lock.acquire(GUEST)
    await lock.acquire(GUEST)
    async with lock.suspended(GUEST):
        assert lock.holder is None
        await lock.acquire(RECLAIM)                    # someone else may take it meanwhile
        lock.release(RECLAIM)
    assert lock.held_by(GUEST) and lock.depth == 2
    async with lock.suspended(RECLAIM):                # not held by it: nothing happens
        assert lock.held_by(GUEST)


async def test_a_hold_across_virtual_time_stalls_the_next_holder_and_an_instant_hold_does_not() -> None:
    lock = OwnerLock(HM, "host")
    assert await lock.acquire(GUEST, vt_us=100.0) == 100.0
    lock.release(GUEST, vt_us=5_000.0)                 # held across 4.9 ms of the guest's time
    assert await lock.acquire("guest-2/vcpu", vt_us=300.0) == 5_000.0
    lock.release("guest-2/vcpu", vt_us=5_000.0)
    async with lock.hold(RECLAIM, vt_us=9_000.0) as granted:   # the host's holds take no virtual time
        assert granted == 9_000.0
    assert await lock.acquire("guest-3/vcpu", vt_us=6_000.0) == 6_000.0


# --- the [locks] table ----------------------------------------------------------------------

def test_lock_config_validates_and_names_the_bad_key() -> None:
    assert lock_config_from_mapping({}) == LockConfig() and not LockConfig().enabled
    cfg = lock_config_from_mapping({"protocol": "no-callback-under-lock", "break_deadlocks": True,
                                    "hold_vmem": "tick", "reclaim_free_pct": 5})
    assert cfg.protocol is LockProtocol.NO_CALLBACK and cfg.break_deadlocks and cfg.reclaim_free_pct == 5.0
    for bad, words in [({"protocol": "polite"}, "polite"), ({"hold_vmem": "forever"}, "forever"),
                       ({"reclaim_free_pct": 80}, "reclaim_free_pct"), ({"break_deadlocks": 1}, "break_deadlocks"),
                       ({"protocl": "naive"}, "protocl")]:
        with pytest.raises(ConfigError, match=words):
            lock_config_from_mapping(bad, where="x.toml: [locks]")
