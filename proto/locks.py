"""Lock classes, their global order, the lock protocols, and the owner lock both sides use.

The order is total: a task that needs several locks takes them in ascending
rank. ``L_hostmem`` (the host's frame table) ranks before ``L_vmem`` (a
guest's memory map): the seed's rule that breaks its deadlock cycle.

Owners and tasks. A lock is held by an *owner*, named ``"proc/task"``
(``"guest-1/vcpu"``, ``"host/reclaim"``). A lock can be taken on behalf of
an owner that lives in another process: the host's EPT-fault handler takes
``L_hostmem`` for the guest's vCPU that made the hypercall, and a guest takes
its ``L_vmem`` for the host task that sends the TLB shootdown. So one wait
can span two processes, and the wait-for graph (``hostd.deadlock``) is one
graph over every owner of the run. The *task* of an event is the one that
acted (``"ept_fault:guest-1"``); the owner is whom it acted for.

``OwnerLock``: exclusive, re-entrant per owner (an owner that already holds
it, e.g. the vCPU whose own fault makes the host shoot down one of its own
pages, gets it again at once), FIFO among waiters, and every transition
(wait, acquire, release, cancel) goes to an ``on_event`` callback, in the
order it happened. Re-entrant acquisitions change no one's view of who
holds what and are not reported.

Virtual time: a hold that spans virtual time (a guest's vCPU holding
``L_hostmem`` across a batch, under ``ordered``) keeps the lock busy until
its release, so a later acquisition is granted at ``max(request vt, that
release vt)`` (``acquire`` returns it): the next holder is stalled in
virtual time too, as a vCPU waiting for the lock would be. The host's own
holds take no virtual time (granted and released at the same vt) and delay
no one in virtual time; they cost wall time only.

Lock protocols (``[locks] protocol``)::

    naive                   the guest holds L_vmem across hypercalls that need L_hostmem;
                            the host holds L_hostmem across the shootdown that needs L_vmem:
                            the seed's cycle can happen
    ordered                 global order L_hostmem < L_vmem: a guest that takes L_vmem takes
                            L_hostmem first (remotely, LOCK_ACQUIRE), so no task ever waits
                            for L_hostmem while holding L_vmem
    no-callback-under-lock  no cross-process call while holding a lock: the host drops
                            L_hostmem around its shootdowns (picks victims under the lock,
                            releases it, shoots down, retakes it to commit) and the guest
                            drops L_vmem around its hypercalls
"""
from __future__ import annotations

import asyncio
import enum
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

from .schema import LockProtocol, LocksTable, decode, split_where

__all__ = [
    "LockClass", "GLOBAL_ORDER", "order_violation", "LockProtocol", "LockConfig", "lock_config_from_mapping",
    "LockOp", "LockTransition", "OwnerLock", "LockNotHeld", "owner_name", "split_owner", "lock_ref",
    "EXIT_DEADLOCK", "DEADLOCK_REASON", "HOST_PROC", "VCPU_TASK", "guest_proc",
]

EXIT_DEADLOCK = 5            # the host's exit status when it ended the run on a deadlock
DEADLOCK_REASON = "deadlock"  # run_finished.reason of such a run
HOST_PROC = "host"
VCPU_TASK = "vcpu"           # a guest's one vCPU task: every hypercall of a guest is made by it


def guest_proc(guest_id: int) -> str:
    return f"guest-{guest_id}"


class LockClass(IntEnum):
    """Value = rank in the global order."""

    L_HOSTMEM = 0
    L_VMEM = 1

    @property
    def label(self) -> str:
        """The seed's spelling, used on the wire and in logs: ``L_hostmem``, ``L_vmem``."""
        return "L_" + self.name[2:].lower()

    @classmethod
    def from_label(cls, label: str) -> "LockClass":
        for c in cls:
            if c.label == label:
                return c
        raise ValueError(f"unknown lock class {label!r}; known: {[c.label for c in cls]}")


GLOBAL_ORDER: tuple[LockClass, ...] = tuple(sorted(LockClass))


def order_violation(held: Iterable[LockClass], acquiring: LockClass) -> LockClass | None:
    """The held lock that ``acquiring`` would invert, or None if the order is kept."""
    worst = None
    for lock in held:
        if lock > acquiring and (worst is None or lock > worst):
            worst = lock
    return worst


def lock_ref(cls: LockClass, proc: str) -> str:
    """One lock instance: its class and the process it lives in, e.g. ``L_vmem@guest-1``."""
    return f"{cls.label}@{proc}"


def owner_name(proc: str, task: str) -> str:
    return f"{proc}/{task}"


def split_owner(owner: str) -> tuple[str, str]:
    """``"guest-1/vcpu"`` -> ``("guest-1", "vcpu")``; raises ValueError naming a malformed owner."""
    proc, sep, task = owner.partition("/")
    if not sep or not proc or not task:
        raise ValueError(f"owner {owner!r} is not 'proc/task'")
    return proc, task


# --- protocols and the [locks] table ------------------------------------------------

# The [locks] table's keys, bounds and defaults are the schema's (proto/schema/tables.py: LocksTable);
# LockConfig is that table, decoded.
LockConfig = LocksTable
HOLD_VMEM_CHOICES = ("batch", "tick")


def lock_config_from_mapping(raw: Mapping[str, Any] | None, where: str = "") -> LockConfig:
    """Validate a ``[locks]`` table; errors name the key and the bad value."""
    return decode(LocksTable, dict(raw or {}), path="locks", where=split_where(where, "locks"))


# --- the owner lock ------------------------------------------------------------------

class LockOp(str, enum.Enum):
    WAIT = "wait"        # the owner started waiting (the lock is held by another owner)
    ACQUIRE = "acquire"  # the owner holds it now (not reported for re-entrant acquisitions)
    RELEASE = "release"  # the owner no longer holds it
    CANCEL = "cancel"    # the owner stopped waiting without getting it (cancelled, failed, abandoned)


@dataclass(frozen=True, slots=True)
class LockTransition:
    """One reported lock event."""

    op: LockOp
    lock: LockClass
    proc: str        # the process the lock lives in
    owner: str       # "proc/task" the lock is (to be) held for
    task: str        # the task that acted
    site: str        # what it was doing ("ept_fault", "shootdown", "vcpu", ...)
    vt_us: float

    @property
    def ref(self) -> str:
        return lock_ref(self.lock, self.proc)


class LockNotHeld(RuntimeError):
    def __init__(self, lock: str, owner: str, holder: str | None) -> None:
        super().__init__(f"{lock}: {owner} releases it but the holder is {holder or 'nobody'}")
        self.lock = lock
        self.owner = owner
        self.holder = holder


@dataclass(slots=True)
class _Waiter:
    owner: str
    fut: asyncio.Future
    task: str
    site: str
    vt_us: float


class OwnerLock:
    """An exclusive lock held by owners (see the module docstring); FIFO; every transition reported."""

    def __init__(self, cls: LockClass, proc: str,
                 on_event: Callable[[LockTransition], None] | None = None) -> None:
        self.cls = cls
        self.proc = proc
        self.on_event = on_event
        self._holder: str | None = None
        self._depth = 0
        self._held_task = ""
        self._held_site = ""
        self._waiters: deque[_Waiter] = deque()
        self._free_vt_us = 0.0   # busy until: the latest release of a hold that spanned virtual time
        self._held_vt_us = 0.0   # when the current hold was granted

    @property
    def ref(self) -> str:
        return lock_ref(self.cls, self.proc)

    @property
    def holder(self) -> str | None:
        return self._holder

    @property
    def depth(self) -> int:
        return self._depth

    def held_by(self, owner: str) -> bool:
        return self._holder == owner

    def waiting(self) -> list[str]:
        return [w.owner for w in self._waiters]

    def _emit(self, op: LockOp, owner: str, task: str, site: str, vt_us: float) -> None:
        if self.on_event is not None:
            self.on_event(LockTransition(op, self.cls, self.proc, owner, task, site, float(vt_us)))

    async def acquire(self, owner: str, *, task: str | None = None, site: str = "", vt_us: float = 0.0) -> float:
        """Hold the lock for ``owner`` (again, if it holds it); returns the virtual time it is granted at."""
        task = task if task is not None else split_owner(owner)[1]
        if self._holder == owner:
            self._depth += 1
            return float(vt_us)
        if self._holder is None and not self._waiters:
            return self._take(owner, task, site, vt_us)
        w = _Waiter(owner, asyncio.get_running_loop().create_future(), task, site, vt_us)
        self._waiters.append(w)      # before the event: a listener may fail this very wait
        self._emit(LockOp.WAIT, owner, task, site, vt_us)
        try:
            granted: float = await w.fut
        except BaseException:
            if w in self._waiters:
                self._waiters.remove(w)
                self._emit(LockOp.CANCEL, owner, task, site, vt_us)
            elif w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                # Handed over to us, but our caller went away: pass it on.
                self.release(owner, task=task, site=site, vt_us=vt_us)
            raise
        return granted

    def _take(self, owner: str, task: str, site: str, vt_us: float) -> float:
        self._holder = owner
        self._depth = 1
        self._held_task = task
        self._held_site = site
        granted = max(float(vt_us), self._free_vt_us)
        self._held_vt_us = granted
        self._emit(LockOp.ACQUIRE, owner, task, site, granted)
        return granted

    def release(self, owner: str, *, task: str | None = None, site: str | None = None, vt_us: float = 0.0) -> None:
        """One level of ``owner``'s hold; at zero the first live waiter gets it."""
        if self._holder != owner:
            raise LockNotHeld(self.ref, owner, self._holder)
        self._depth -= 1
        if self._depth > 0:
            return
        self._holder = None
        if vt_us > self._held_vt_us:
            self._free_vt_us = max(self._free_vt_us, float(vt_us))
        self._emit(LockOp.RELEASE, owner, task if task is not None else self._held_task,
                   site if site is not None else self._held_site, vt_us)
        while self._waiters:
            w = self._waiters.popleft()
            if w.fut.done():   # its task was cancelled and has not run its cleanup yet
                self._emit(LockOp.CANCEL, w.owner, w.task, w.site, w.vt_us)
                continue
            w.fut.set_result(self._take(w.owner, w.task, w.site, w.vt_us))
            return

    def release_all(self, owner: str, *, vt_us: float = 0.0) -> int:
        """Drop every level ``owner`` holds and every wait of it (the owner is gone); returns the levels."""
        for w in [w for w in self._waiters if w.owner == owner]:
            self.fail_waiter(owner, asyncio.CancelledError(f"{owner} is gone"))
        if self._holder != owner:
            return 0
        levels = self._depth
        self._depth = 1
        self.release(owner, vt_us=vt_us)
        return levels

    def fail_waiter(self, owner: str, exc: BaseException) -> bool:
        """Make ``owner``'s pending acquisition raise ``exc`` (its CANCEL is reported now)."""
        for w in self._waiters:
            if w.owner == owner and not w.fut.done():
                self._waiters.remove(w)
                self._emit(LockOp.CANCEL, w.owner, w.task, w.site, w.vt_us)
                if isinstance(exc, asyncio.CancelledError):
                    w.fut.cancel(str(exc))
                else:
                    w.fut.set_exception(exc)
                return True
        return False

    @asynccontextmanager
    async def hold(self, owner: str, *, task: str | None = None, site: str = "",
                   vt_us: float = 0.0) -> AsyncIterator[float]:
        """Held for the body, which gets the virtual time it was granted at (and released at)."""
        granted = await self.acquire(owner, task=task, site=site, vt_us=vt_us)
        try:
            yield granted
        finally:
            if self._holder == owner:   # not if it was dropped for good (release_all) meanwhile
                # Released when it was (last) granted: a hold taking no virtual time.
                self.release(owner, task=task, site=site, vt_us=self._held_vt_us)

    @asynccontextmanager
    async def suspended(self, owner: str, *, task: str | None = None, site: str = "",
                        vt_us: Callable[[], float] | float = 0.0) -> AsyncIterator[None]:
        """Drop every level ``owner`` holds for the body, then take them all back.

        A no-op when ``owner`` does not hold the lock. The protocol
        no-callback-under-lock runs its cross-process calls in here.
        """
        if self._holder != owner:
            yield
            return
        now = vt_us if callable(vt_us) else (lambda: float(vt_us))  # type: ignore[misc]
        levels = self._depth
        held_vt = self._held_vt_us
        self._depth = 1
        self.release(owner, task=task, site=site, vt_us=now())
        try:
            yield
        finally:
            # Not earlier than it held it: a clock behind the holder's (the host's, for a
            # guest's vCPU) must not make the hold look as if it spanned virtual time.
            await self.acquire(owner, task=task, site=site, vt_us=max(now(), held_vt))
            self._depth += levels - 1
