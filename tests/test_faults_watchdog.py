"""Deferred shootdowns of silent guests, in one process: frames taken at once, content filled in by the late answer.

Host memory with the real shootdowns (``hostd.shootdown``), silent-guest
memory (``hostd.silent``) and a request discipline, wired as
``hostd.assembly`` wires them; the guest's connection is a fake whose
``call`` the test answers when it likes -- a stopped guest.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np

from balloonlab.hostd.discipline import ArrivalOrder, DisciplineContext, LockModel
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.p2m import PageState
from balloonlab.hostd.registry import SessionRegistry
from balloonlab.hostd.shootdown import PENDING_TOKEN, Shootdowns
from balloonlab.hostd.silent import SilentGuestMemory
from balloonlab.hostd.victim import make_victim_policy
from balloonlab.hostd.victim.prefer import PreferVictims
from balloonlab.proto.faultpoints import PausePoints
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import PeerClosed
from balloonlab.proto.locks import LockConfig, LockProtocol
from balloonlab.proto.messages import Invalidate, InvalidateReply, LockAcquire, LockRelease, LockReply

GID, OTHER = 1, 2
PAGES = 32


class StoppedGuestConn:
    """``call`` sends nothing anywhere: each Invalidate waits until the test answers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, asyncio.Future]] = []

    async def call(self, msg: Any, timeout_s: float | None = None) -> Any:
        assert isinstance(msg, Invalidate)
        fut = asyncio.get_running_loop().create_future()
        self.calls.append((np.asarray(msg.gpfns).copy(), fut))
        return await fut


def _world(victim: str = "random", timeout_s: float = 5.0, locks: LockConfig | None = None,
           conn: type = StoppedGuestConn) -> SimpleNamespace:
    sessions = SessionRegistry()
    silent = SilentGuestMemory(make_victim_policy(victim))
    mem = HostMemory(96, 256, silent.victims, np.random.default_rng(3), CostModel(), "ssd")  # room for both
    ctx = DisciplineContext(sessions=sessions, running=set, stop=lambda why: None, clock=lambda: 0.0,
                            hypercall_us=2.0, shootdown_timeout_s=timeout_s)
    discipline = ArrivalOrder(ctx) if locks is None else LockModel(locks, ctx)
    sd = Shootdowns(mem, sessions, discipline, timeout_s, on_answered=silent.guest_answered)
    mem.wire(shootdown=sd.shootdown)
    content = {gid: np.arange(PAGES, dtype=np.uint64) + np.uint64((gid << 32) | 7) for gid in (GID, OTHER)}
    for gid in (GID, OTHER):
        mem.add_guest(gid, PAGES, PAGES // 2)
        sessions.join(SimpleNamespace(guest_id=gid, unresponsive=False, conn=conn()))  # type: ignore[arg-type]

    def go_silent(gid: int) -> None:   # the watchdog's verdict, passed on as Machine.guest_silent does
        sessions[gid].unresponsive = True
        silent.guest_silent(gid)
        sd.guest_silent(gid)
        discipline.guest_silent(gid)

    return SimpleNamespace(mem=mem, sd=sd, silent=silent, sessions=sessions, content=content, go_silent=go_silent)


def _answer(conn: StoppedGuestConn, content: np.ndarray) -> None:
    for gpfns, fut in conn.calls:
        if not fut.done():
            fut.set_result(InvalidateReply(content[gpfns.astype(np.int64)]))


async def test_an_unresponsive_guests_frames_go_at_once_and_its_late_answer_fills_them() -> None:
    w = _world()
    for gid in (GID, OTHER):
        await w.mem.ept_fault(gid, np.arange(PAGES, dtype=np.uint64), 0.0)
    w.go_silent(GID)
    freed = await w.silent.reclaim(w.mem, 0.0, w.sd.pending_pages)
    # Every frame of the frozen guest, and only its frames, went to host swap without waiting.
    assert freed == PAGES and w.mem.guest_counts(GID)["resident_pages"] == 0
    assert w.mem.guest_counts(OTHER)["resident_pages"] == PAGES
    p2m = w.mem.p2m(GID)
    assert np.all(p2m.state == PageState.SWAPPED)
    assert np.all(w.mem.swap.token[p2m.loc] == PENDING_TOKEN) and w.sd.pending(GID)
    # A fault of that guest waits for the answer (the host never hands back a placeholder) ...
    async def fault() -> np.ndarray:
        await w.sd.settled(GID)
        tokens, _ = await w.mem.ept_fault(GID, np.array([3, 4], np.uint64), 0.0)
        return tokens

    task = asyncio.ensure_future(fault())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    # ... the guest wakes and answers: the content it held is what comes back.
    _answer(w.sessions[GID].conn, w.content[GID])
    assert list(await task) == list(w.content[GID][[3, 4]])
    assert w.sd.leftover_placeholders(GID) == 0 and not w.sd.pending(GID)
    assert w.sd.metrics()["deferred_settled_pages"] == PAGES
    w.mem.check_invariant()
    # It answered, so it runs again: what it faults back in for its late tick stays, though it
    # is not back in the barrier yet (without this, every tick end took it again: a livelock).
    assert GID not in w.silent.silent and w.silent.metrics()["woke"] == 1
    assert await w.silent.reclaim(w.mem, 0.0, w.sd.pending_pages) == 0
    assert w.mem.guest_counts(GID)["resident_pages"] == 2


async def test_a_shootdown_already_waiting_is_deferred_when_the_guest_goes_silent() -> None:
    w = _world()
    await w.mem.ept_fault(GID, np.arange(PAGES, dtype=np.uint64), 0.0)
    reclaim = asyncio.ensure_future(w.mem.reclaim(8, 0.0))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not reclaim.done() and len(w.sessions[GID].conn.calls) == 1   # waiting for the acknowledgement
    w.go_silent(GID)                                                       # the watchdog's verdict
    got = await asyncio.wait_for(reclaim, 1.0)
    assert got.freed_frames == 8 and w.sd.late_shootdowns == 1
    assert w.sd.leftover_placeholders(GID) == 8
    _answer(w.sessions[GID].conn, w.content[GID])
    await w.sd.settled(GID)
    assert w.sd.leftover_placeholders(GID) == 0
    w.mem.check_invariant()


async def test_a_guest_that_dies_before_answering_takes_its_placeholders_with_it() -> None:
    w = _world()
    await w.mem.ept_fault(GID, np.arange(PAGES, dtype=np.uint64), 0.0)
    w.go_silent(GID)
    await w.silent.reclaim(w.mem, 0.0, w.sd.pending_pages)
    for _, fut in w.sessions[GID].conn.calls:
        fut.set_exception(PeerClosed("connection to guest-1 closed"))
    await w.sd.settled(GID)
    assert w.sd.metrics()["deferred_failed"] == 1 and not w.sd.pending(GID)
    w.mem.remove_guest(GID)
    w.sd.forget(GID)
    w.silent.forget(GID)
    assert w.mem.swap.slots_owned_by(GID).size == 0
    w.mem.check_invariant()


def test_preferred_victims_come_first_then_the_blind_policy() -> None:
    w = _world()
    asyncio.run(_fault_all(w))
    prefer = PreferVictims(w.silent.victims.inner, {GID})
    picked = prefer.pick(w.mem.pool, PAGES + 4, np.random.default_rng(0))
    owners = w.mem.pool.owner_guest[picked]
    assert np.all(owners[:PAGES] == GID) and picked.size == np.unique(picked).size == PAGES + 4


async def _fault_all(w: SimpleNamespace) -> None:
    for gid in (GID, OTHER):
        await w.mem.ept_fault(gid, np.arange(PAGES, dtype=np.uint64), 0.0)


def test_pause_points_parse_who_point_and_occurrence() -> None:
    pp = PausePoints("host:tick_started@3, 2:ept_fault, host:tick_started@5", "host")
    assert pp.wanted == {"tick_started": {3, 5}}
    assert not PausePoints("", "host") and not PausePoints("1:invalidate", "host")
    assert [pp.reached("other") for _ in range(3)] == [False, False, False]
    # Occurrences 1 and 2 are not wanted; the 3rd would stop this very process, so it is not reached here.
    assert [pp.reached("tick_started") for _ in range(2)] == [False, False] and pp.seen == {"tick_started": 2}


class LockingStoppedGuestConn(StoppedGuestConn):
    """A guest under a lock protocol that grants its L_vmem, then stops before it answers the Invalidate."""

    def __init__(self) -> None:
        super().__init__()
        self.is_closing = False
        self.sent: list[str] = []

    async def call(self, msg: Any, timeout_s: float | None = None) -> Any:
        self.sent.append(type(msg).__name__)
        if isinstance(msg, (LockAcquire, LockRelease)):
            return LockReply(msg.vt_us + 2.0)
        return await super().call(msg, timeout_s)


async def test_under_a_lock_protocol_an_invalidate_left_unanswered_is_deferred_not_dropped() -> None:
    """The host holds the guest's L_vmem and has sent the Invalidate; the guest stops before answering.

    Failing the eviction there would leave the host with the frame while the
    guest, once it runs again, obeys the Invalidate and drops its mapping: a
    lost page. So past ``shootdown_timeout_s`` it is deferred, as without locks.
    """
    w = _world(timeout_s=0.2, locks=LockConfig(protocol=LockProtocol.ORDERED), conn=LockingStoppedGuestConn)
    conn = w.sessions[GID].conn
    await w.mem.ept_fault(GID, np.arange(PAGES, dtype=np.uint64), 0.0)
    got = await asyncio.wait_for(w.mem.reclaim(8, 0.0), 5.0)
    assert got.freed_frames == 8 and w.sd.late_shootdowns == 1
    assert conn.sent == ["LockAcquire", "Invalidate", "LockRelease"]   # its lock is let go after the Invalidate
    assert w.sd.leftover_placeholders(GID) == 8
    _answer(conn, w.content[GID])
    await w.sd.settled(GID)
    assert w.sd.leftover_placeholders(GID) == 0
    swapped = np.flatnonzero(w.mem.p2m(GID).state == PageState.SWAPPED)
    tokens, _ = await w.mem.ept_fault(GID, swapped.astype(np.uint64), 0.0)
    assert list(tokens) == list(w.content[GID][swapped])
    w.mem.check_invariant()
