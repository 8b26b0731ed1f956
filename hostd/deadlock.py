"""The run's wait-for graph over every lock owner, cycle detection, and a lockdep-style order check.

Pure: fed ``LockTransition`` events (the host's own and those its guests
report) with the host's wall time of arrival; no I/O, no clock, no asyncio.

Nodes are owners (``"guest-1/vcpu"``, ``"host/reclaim"``). An owner waits
for a lock instance (``L_hostmem@host``, ``L_vmem@guest-1``); the lock is
held by one owner; so "A waits for B" when A waits for a lock B holds. An
owner may wait for several locks at once (the host shoots down several
guests concurrently) and needs all of them. Remote acquisitions are made on
behalf of an owner (the host's EPT-fault handler waits for ``L_hostmem`` *as*
the guest's vCPU), so a wait through a hypercall or a host callback is one
edge, and the seed's deadlock is a cycle of two::

    guest-1/vcpu  holds L_vmem@guest-1  waits for L_hostmem@host
    host/reclaim  holds L_hostmem@host  waits for L_vmem@guest-1

A reported edge names the task that concretely holds the lock in its own
process (``proc``/``task``: the guest's vCPU, the host's reclaim task or the
host's handler of a guest's request) and the owner it holds it for.

The graph is exact, not a guess: each process reports the transitions of its
own locks in order, an event is sent before the reply that follows it, and
an owner blocked in a call cannot change what it holds.

But a guest is untrusted, so only waits the host *observed* (``observed``:
a wait for the host's own lock, or the host's own task waiting for a lock
it asked a guest for) can close a cycle. A wait a guest merely reports for
its own tasks is kept, shown and counted, never followed: otherwise two
task names a guest makes up could "deadlock" through the host's real lock
and end everyone's run.

``LockdepValidator``: every acquisition attempt is checked against the
global order of ``proto.locks`` with what its owner holds anywhere in the
run; a violation is returned once per (held class, acquiring class, site).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from balloonlab.proto.locks import LockClass, LockOp, LockTransition, order_violation

__all__ = ["Hold", "Wait", "CycleEdge", "WaitForGraph", "OrderViolation", "LockdepValidator", "cycle_signature"]


@dataclass(frozen=True, slots=True)
class Hold:
    lock: str             # instance, e.g. "L_vmem@guest-1"
    cls: LockClass
    owner: str
    proc: str             # the process the lock lives in (where the holding task runs)
    task: str
    site: str
    since_vt_us: float
    since_wall_s: float
    observed: bool = True  # seen by the host itself (see the module docstring); only these waits form cycles


Wait = Hold               # the same record: who waits for which lock, since when


@dataclass(frozen=True, slots=True)
class CycleEdge:
    """One owner of a cycle: what it holds (that the previous owner waits for) and what it waits for."""

    owner: str
    proc: str             # where the held lock lives, and the task there holding it
    task: str
    holds: str            # lock class label
    holds_lock: str
    held_since_vt_us: float
    waits_for: str
    waits_for_lock: str
    wait_proc: str        # where the wait happens, and the task there waiting
    wait_task: str
    site: str             # what the waiting task was doing
    since_vt_us: float    # waiting since (virtual time of the waiter)
    since_wall_s: float   # waiting since (host wall clock, seconds since the epoch)

    def as_dict(self, now_wall_s: float | None = None) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        if now_wall_s is not None:
            out["waited_s"] = round(max(0.0, now_wall_s - self.since_wall_s), 3)
        return out


def cycle_signature(cycle: Iterable[CycleEdge]) -> frozenset[tuple[str, str]]:
    """The same deadlock seen twice has the same signature."""
    return frozenset((e.owner, e.waits_for_lock) for e in cycle)


class WaitForGraph:
    def __init__(self) -> None:
        self._holds: dict[str, Hold] = {}                    # lock instance -> its hold
        self._held_by: dict[str, dict[str, Hold]] = {}       # owner -> lock instance -> hold
        self._waits: dict[str, dict[str, Wait]] = {}         # owner -> lock instance -> wait
        self.anomalies = 0    # events that contradict the graph (e.g. a release by a non-holder); counted, ignored

    # --- updates ----------------------------------------------------------------------

    def apply(self, t: LockTransition, wall_s: float, observed: bool = True) -> None:
        ref = t.ref
        rec = Hold(ref, t.lock, t.owner, t.proc, t.task, t.site, t.vt_us, wall_s, observed)
        if t.op is LockOp.WAIT:
            self._waits.setdefault(t.owner, {})[ref] = rec
        elif t.op is LockOp.CANCEL:
            self._drop_wait(t.owner, ref)
        elif t.op is LockOp.ACQUIRE:
            self._drop_wait(t.owner, ref)
            old = self._holds.get(ref)
            if old is not None and old.owner != t.owner:
                self.anomalies += 1
                self._drop_hold(old)
            self._holds[ref] = rec
            self._held_by.setdefault(t.owner, {})[ref] = rec
        elif t.op is LockOp.RELEASE:
            old = self._holds.get(ref)
            if old is None or old.owner != t.owner:
                self.anomalies += 1
                return
            self._drop_hold(old)

    def _drop_wait(self, owner: str, ref: str) -> None:
        waits = self._waits.get(owner)
        if waits is not None:
            waits.pop(ref, None)
            if not waits:
                del self._waits[owner]

    def _drop_hold(self, hold: Hold) -> None:
        self._holds.pop(hold.lock, None)
        mine = self._held_by.get(hold.owner)
        if mine is not None:
            mine.pop(hold.lock, None)
            if not mine:
                del self._held_by[hold.owner]

    def drop_proc(self, proc: str) -> None:
        """A process is gone: its locks, and every hold and wait of its owners, go with it."""
        for hold in [h for h in self._holds.values() if h.proc == proc or h.owner.startswith(proc + "/")]:
            self._drop_hold(hold)
        for owner in list(self._waits):
            for ref, w in list(self._waits[owner].items()):
                if w.proc == proc or owner.startswith(proc + "/"):
                    self._drop_wait(owner, ref)

    # --- queries ------------------------------------------------------------------------

    def held(self, owner: str) -> list[Hold]:
        return list(self._held_by.get(owner, {}).values())

    def waits(self, owner: str) -> list[Wait]:
        return list(self._waits.get(owner, {}).values())

    def is_waiting(self, owner: str, ref: str) -> bool:
        return ref in self._waits.get(owner, {})

    def holder(self, ref: str) -> Hold | None:
        return self._holds.get(ref)

    def waiting_owners(self) -> list[str]:
        return sorted(self._waits)

    def observed_waits(self, owner: str) -> list[Wait]:
        """``owner``'s waits the host observed itself, in a deterministic order."""
        return sorted((w for w in self._waits.get(owner, {}).values() if w.observed), key=lambda w: w.lock)

    def cycle_through(self, start: str) -> list[CycleEdge] | None:
        """A cycle of observed waits that comes back to ``start``, or None (depth-first, deterministic)."""
        path: list[tuple[str, Wait]] = []   # the edges from the root to the top of the stack
        visited = {start}
        stack: list[tuple[str, list[Wait]]] = [(start, self.observed_waits(start))]
        while stack:
            owner, todo = stack[-1]
            if not todo:
                stack.pop()
                if path:
                    path.pop()
                continue
            wait = todo.pop(0)
            hold = self._holds.get(wait.lock)
            if hold is None or hold.owner == owner:
                continue
            nxt = hold.owner
            if nxt == start:
                return self._edges(path + [(owner, wait)])
            if nxt in visited or nxt not in self._waits:
                continue
            visited.add(nxt)   # explored once: if it does not lead back to start, it never will
            path.append((owner, wait))
            stack.append((nxt, self.observed_waits(nxt)))
        return None

    def cycles(self) -> list[list[CycleEdge]]:
        """Every distinct cycle reachable from a waiting owner."""
        seen: set[frozenset[tuple[str, str]]] = set()
        out = []
        for owner in self.waiting_owners():
            cyc = self.cycle_through(owner)
            if cyc is not None:
                sig = cycle_signature(cyc)
                if sig not in seen:
                    seen.add(sig)
                    out.append(cyc)
        return out

    def _edges(self, path: list[tuple[str, Wait]]) -> list[CycleEdge]:
        k = len(path)
        edges = []
        for i, (owner, wait) in enumerate(path):
            held = self._holds[path[i - 1][1].lock]      # what the previous owner waits for: ours
            edges.append(CycleEdge(
                owner=owner, proc=held.proc, task=held.task, holds=held.cls.label, holds_lock=held.lock,
                held_since_vt_us=held.since_vt_us, waits_for=wait.cls.label, waits_for_lock=wait.lock,
                wait_proc=wait.proc, wait_task=wait.task, site=wait.site, since_vt_us=wait.since_vt_us,
                since_wall_s=wait.since_wall_s))
        # Start where the seed starts: a task holding L_vmem (the guest's), then by owner name.
        start = min(range(k), key=lambda i: (edges[i].holds != LockClass.L_VMEM.label, edges[i].owner))
        return edges[start:] + edges[:start]


@dataclass(frozen=True, slots=True)
class OrderViolation:
    owner: str
    proc: str             # where the acquisition happens, and the task making it
    task: str
    site: str
    held: str             # lock class label held ...
    held_lock: str
    held_site: str
    acquiring: str        # ... while acquiring this one, which ranks before it
    acquiring_lock: str
    vt_us: float

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class LockdepValidator:
    """Checks each acquisition attempt against ``proto.locks.GLOBAL_ORDER``."""

    def __init__(self) -> None:
        self._seen: set[tuple[LockClass, LockClass, str]] = set()
        self.checked = 0
        self.violating_acquisitions = 0   # every one, reported or not

    def check(self, held: Iterable[Hold], t: LockTransition) -> OrderViolation | None:
        """``held``: what ``t.owner`` holds now; returns a violation the first time its kind is seen."""
        self.checked += 1
        others = [h for h in held if h.lock != t.ref]
        worst = order_violation((h.cls for h in others), t.lock)
        if worst is None:
            return None
        self.violating_acquisitions += 1
        key = (worst, t.lock, t.site)
        if key in self._seen:
            return None
        self._seen.add(key)
        h = min((h for h in others if h.cls == worst), key=lambda h: h.lock)
        return OrderViolation(owner=t.owner, proc=t.proc, task=t.task, site=t.site, held=worst.label,
                              held_lock=h.lock, held_site=h.site, acquiring=t.lock.label, acquiring_lock=t.ref,
                              vt_us=t.vt_us)

    @property
    def distinct(self) -> int:
        return len(self._seen)
