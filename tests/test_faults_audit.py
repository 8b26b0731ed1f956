"""The end-of-run audit finds what it must: a guest kernel on real host memory, then one corruption at a time.

In one process: a ``GuestKernel`` whose hypervisor and disk are a
``HostMemory`` (the same calls the sockets carry), on a host small enough
that it swaps, with a balloon inflated and guest pages swapped to the
guest's disk. A clean world audits clean. Then each test breaks one thing
the way a bug or a crash could -- a page's content in host swap, a disk
block, the balloon's books on one side, a placeholder left by a deferred
shootdown, a page the guest no longer has anywhere, a dead guest's slot --
and the audit must name it.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

from balloonlab.guestd.audit import audit_reply, self_check
from balloonlab.guestd.balloon import BalloonDriver
from balloonlab.guestd.kernel import GuestKernel
from balloonlab.guestd.kernel_config import KernelConfig
from balloonlab.guestd.workload import Layout, Region, build_workload
from balloonlab.hostd.errors import InvariantViolation
from balloonlab.hostd.audit import GuestClaims, check_guest, check_released
from balloonlab.hostd.hostswap import PENDING_TOKEN
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.p2m import PageState
from balloonlab.proto.costs import CostModel

GID = 3
RAM = 256


class HostHypervisor:
    """The guest's hypervisor calls, made straight on host memory."""

    backs_all_initially = False

    def __init__(self, mem: HostMemory, gid: int) -> None:
        self.mem, self.gid = mem, gid

    async def ept_fault(self, gpfns: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        return await self.mem.ept_fault(self.gid, gpfns, vt_us)

    async def balloon_inflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        self.mem.balloon_inflate(self.gid, gpfns)
        return vt_us

    async def balloon_deflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        self.mem.balloon_deflate(self.gid, gpfns)
        return vt_us


class HostDisk:
    def __init__(self, mem: HostMemory, gid: int, n_blocks: int) -> None:
        self.mem, self.gid, self.n_blocks = mem, gid, n_blocks

    async def read(self, blocks: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        return await self.mem.vdisk_read(self.gid, blocks, vt_us)

    async def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> float:
        return await self.mem.vdisk_write(self.gid, blocks, tokens, vt_us)


async def make_world() -> SimpleNamespace:
    layout = Layout([Region("db", "file", 150), Region("heap", "anon", 200)])
    cfg = KernelConfig(ram_pages=RAM, layout=layout, policy="esc", kernel_pages=8)
    mem = HostMemory(350, 2048, "random", np.random.default_rng(5), CostModel(), "ssd")
    mem.add_guest(GID, RAM, RAM // 2, disk_blocks=cfg.disk_blocks)
    kernel = GuestKernel(cfg, np.random.default_rng(6), HostDisk(mem, GID, cfg.disk_blocks),
                         HostHypervisor(mem, GID), CostModel())

    async def shootdown(gid: int, gpfns: np.ndarray) -> np.ndarray:
        assert gid == GID
        return kernel.invalidate(gpfns)

    mem.wire(shootdown=shootdown)
    balloon = BalloonDriver(kernel, kernel.hypervisor)
    kernel.on_oom = balloon.deflate_on_oom
    work = build_workload([{"kind": "db", "region": "db", "weight": 2},
                           {"kind": "anon-hot", "region": "heap", "weight": 2}], layout, np.random.default_rng(7))
    for i in range(16):
        pages, writes = work.next_batch(256)
        await kernel.access(pages, writes)
        if i % 4 == 3:
            await mem.reclaim(30, kernel.vt_us)   # host pressure: blind host swapping
        if i == 8:
            balloon.set_target(60)
            await balloon.reconcile()
    world = SimpleNamespace(mem=mem, kernel=kernel, balloon=balloon, state=SimpleNamespace(kernel=kernel, balloon=balloon))
    # The world has everything the audit looks at.
    report, places = self_check(world.state)
    assert report["host_took_pages"] > 0 and report["disk_only_pages"] > 0 and report["balloon_pages"] == 60
    return world


def audit(w: SimpleNamespace) -> list[str]:
    claims = GuestClaims.from_replies([audit_reply(w.state, first, 64) for first in range(0, 1024, 64)])
    return check_guest(w.mem, GID, claims)


async def test_a_clean_world_audits_clean() -> None:
    w = await make_world()
    assert audit(w) == []
    assert self_check(w.state)[0]["problems"] == []


def _swapped_gpfn(w: SimpleNamespace) -> int:
    held = np.flatnonzero((w.kernel.frames.vpage >= 0) & ~w.kernel.frames.backed)
    return int(held[0])


def corrupt_host_swap(w: SimpleNamespace) -> str:
    g = _swapped_gpfn(w)
    slot = w.mem.p2m(GID).loc[g]
    w.mem.swap.token[slot] ^= np.uint64(1)
    return f"gpfn {g}: host swap holds"


def leave_a_placeholder(w: SimpleNamespace) -> str:
    g = _swapped_gpfn(w)
    w.mem.swap.token[w.mem.p2m(GID).loc[g]] = PENDING_TOKEN
    return "placeholder of an unanswered shootdown"


def corrupt_a_disk_block(w: SimpleNamespace) -> str:
    pt = w.kernel.pt
    p = int(np.flatnonzero((pt.gpfn < 0) & pt.on_disk & (pt.version > 0))[0])
    w.mem.vdisk(GID).tokens[pt.block[p]] ^= np.uint64(2)
    return f"disk block {int(pt.block[p])} holds"


def host_forgets_a_balloon_page(w: SimpleNamespace) -> str:
    g = int(np.flatnonzero(w.mem.p2m(GID).state == PageState.BALLOONED)[0])
    w.mem.balloon_deflate(GID, np.array([g], np.uint64))   # the host's books only: the guest still has it
    return "balloon"


def guest_thinks_a_swapped_page_backed(w: SimpleNamespace) -> str:
    g = _swapped_gpfn(w)
    w.kernel.frames.backed[g] = True
    return f"gpfn {g} holds a page the guest believes backed"


def guest_loses_a_page(w: SimpleNamespace) -> str:
    pt = w.kernel.pt
    p = int(np.flatnonzero((pt.gpfn < 0) & pt.on_disk & (pt.version > 0) & (pt.cached < 0))[0])
    pt.on_disk[p] = False    # as if its write-back never happened
    return f"page {p}"


def host_drops_a_swapped_page(w: SimpleNamespace) -> str:
    g = _swapped_gpfn(w)
    p2m = w.mem.p2m(GID)
    w.mem.swap.drop(np.array([p2m.loc[g]]))
    p2m.set(np.array([g]), PageState.UNBACKED)
    return "the page is lost"


CORRUPTIONS: list[Callable[[SimpleNamespace], str]] = [
    corrupt_host_swap, leave_a_placeholder, corrupt_a_disk_block, host_forgets_a_balloon_page,
    guest_thinks_a_swapped_page_backed, guest_loses_a_page, host_drops_a_swapped_page]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
async def test_the_audit_names_each_corruption(corrupt: Callable[[SimpleNamespace], str]) -> None:
    w = await make_world()
    expected = corrupt(w)
    problems = audit(w)
    assert problems, f"{corrupt.__name__} went unnoticed"
    assert any(expected in p for p in problems), problems
    assert all(p.startswith(f"guest {GID}: ") for p in problems)


async def test_a_dead_guest_must_hold_nothing() -> None:
    w = await make_world()
    w.mem.remove_guest(GID)
    assert check_released(w.mem, GID) == []
    w.mem.swap.used[0] = True                  # a slot left behind, still marked as the dead guest's
    w.mem.swap.owner_guest[0] = GID
    assert check_released(w.mem, GID) == [f"guest {GID} left but 1 host swap slots are still its own"]


def test_the_guest_reports_an_empty_audit_before_it_has_started() -> None:
    reply = audit_reply(None, 0, 1024)
    claims = GuestClaims.from_replies([reply])
    assert claims.ram_gpfns.size == claims.disk_blocks.size == claims.balloon_gpfns.size == 0
    assert reply.report["not_started"] is True


def _claims(pages: int = 2) -> SimpleNamespace:
    """A guest's claims as ``_ask`` returns them: ``pages`` pages in its RAM, all backed; no disk, no balloon."""
    return SimpleNamespace(ram_gpfns=np.arange(pages), ram_backed=np.ones(pages, bool), disk_blocks=np.zeros(0),
                           balloon_gpfns=np.zeros(0))


def _fake_audit_parts(monkeypatch: pytest.MonkeyPatch, ask: Callable, gids: list[int],
                      check: Callable = lambda mem, gid, res: []) -> tuple[SimpleNamespace, SimpleNamespace, list[int]]:
    """``run_audit``'s collaborators faked around ``ask`` (for ``_ask``) and ``check`` (for ``check_guest``):
    no page lost, no shootdown pending. Returns host memory, the shootdowns, and the guests
    ``check_released`` was asked about."""
    from balloonlab.hostd import audit as host_audit
    released: list[int] = []
    monkeypatch.setattr(host_audit, "_ask", ask)
    monkeypatch.setattr(host_audit, "check_guest", check)
    monkeypatch.setattr(host_audit, "count_lost_pages", lambda mem, gid, res: 0)
    monkeypatch.setattr(host_audit, "check_released", lambda mem, gid: released.append(gid) or [])
    mem = SimpleNamespace(guest_ids=lambda: gids, balloon_pages=lambda gid: 0, check_invariant=lambda: None)
    shootdowns = SimpleNamespace(pending=lambda gid: False, leftover_placeholders=lambda gid: 0)
    return mem, shootdowns, released


async def test_a_guest_answered_is_let_go_and_a_rejoined_one_is_audited_as_live(monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    """``answered`` comes once per guest as its claims are checked, in the order they come; a guest let go
    there may close before the audit ends (it leaves the live sessions quietly), and one that had left
    earlier in the run and rejoined is still audited as the live guest it was at the audit's start, not
    as one that left for good (whose memory must have been released)."""
    import asyncio

    from balloonlab.hostd import audit as host_audit
    answer = {gid: asyncio.Event() for gid in (0, 1)}

    async def ask(sessions: object, spec: object, gid: int, timeout_s: float) -> SimpleNamespace:
        await answer[gid].wait()
        return _claims()

    mem, shootdowns, released = _fake_audit_parts(monkeypatch, ask, [0, 1])

    class Sessions:
        live, gone = {0, 1}, {0, 2}     # guest 0 was lost once and rejoined; guest 2 left for good

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(sorted(self.live))

        def left_for_good(self) -> list[int]:
            return sorted(self.gone - self.live)

    sessions = Sessions()
    let_go: list[int] = []

    def answered(gid: int) -> None:
        let_go.append(gid)
        sessions.live.discard(gid)      # its RunEnd, and its connection's close, before the audit ends

    run = asyncio.ensure_future(host_audit.run_audit(sessions, mem, shootdowns, {0: None, 1: None},  # type: ignore
                                                     unresponsive_s=5.0, answered=answered))
    for gid in (0, 1):
        answer[gid].set()
        while gid not in let_go:
            await asyncio.sleep(0)
        assert not run.done()
    result = await asyncio.wait_for(run, 5.0)
    assert let_go == [0, 1] and released == [2]
    assert result["guests"]["0"]["answered"] and result["guests"]["2"] == {"ok": True, "released": True}
    assert result["audited"] == 2 and result["released"] == 1 and result["ok"] is True


@pytest.mark.parametrize("memory", ["holds", "violated"])
async def test_each_guests_claims_are_checked_as_they_come(monkeypatch: pytest.MonkeyPatch, memory: str) -> None:
    """The host checks a guest's claims when they arrive, not once every guest has answered (its checks
    and the other guests' answers then share the CPU); the result is the same, in guest order. Host
    memory's own invariant is checked while the guests gather their claims, and reported last."""
    import asyncio

    from balloonlab.hostd import audit as host_audit
    order: list[str] = []
    answer = {gid: asyncio.Event() for gid in (0, 1, 2)}

    async def ask(sessions: object, spec: object, gid: int, timeout_s: float) -> SimpleNamespace:
        await answer[gid].wait()
        order.append(f"answer {gid}")
        return SimpleNamespace(ram_gpfns=np.arange(gid + 1), ram_backed=np.ones(gid + 1, bool),
                               disk_blocks=np.zeros(0), balloon_gpfns=np.zeros(0))

    def check(mem: object, gid: int, res: object) -> list[str]:
        order.append(f"check {gid}")
        return [f"guest {gid}: made up"] if gid == 1 else []

    monkeypatch.setattr(host_audit, "_ask", ask)
    monkeypatch.setattr(host_audit, "check_guest", check)
    monkeypatch.setattr(host_audit, "count_lost_pages", lambda mem, gid, res: gid)
    def check_invariant() -> None:
        order.append("invariant")
        if memory == "violated":
            raise InvariantViolation("frame 7 is made up")

    mem = SimpleNamespace(guest_ids=lambda: [0, 1, 2], balloon_pages=lambda gid: 0, check_invariant=check_invariant)
    shootdowns = SimpleNamespace(pending=lambda gid: False, leftover_placeholders=lambda gid: 0)

    class Sessions(list):
        def left_for_good(self) -> list[int]:
            return []

    run = asyncio.ensure_future(host_audit.run_audit(Sessions([2, 0, 1]), mem, shootdowns, {0: None, 1: None, 2: None},
                                                     unresponsive_s=5.0))

    async def settle(step: str) -> None:
        while step not in order:
            await asyncio.sleep(0)

    await asyncio.wait_for(settle("invariant"), 5.0)     # checked before any guest has answered
    for gid in (2, 0, 1):
        answer[gid].set()
        await asyncio.wait_for(settle(f"check {gid}"), 5.0)
    result = await asyncio.wait_for(run, 5.0)
    assert order == ["invariant", "answer 2", "check 2", "answer 0", "check 0", "answer 1", "check 1"]
    assert result["problems"] == ["guest 1: made up"] + (
        ["host memory invariant: frame 7 is made up"] if memory == "violated" else [])
    assert result["lost_pages"] == 3 and result["audited"] == 3
    assert list(result["guests"]) == ["0", "1", "2"] and result["guests"]["2"]["ram_pages"] == 3


async def test_every_guest_is_asked_before_the_host_checks_its_own_memory() -> None:
    """The guests gather their claims while the host runs its full invariant check (it takes a while with
    many guests): every guest's first Audit request is out before that check starts."""
    import asyncio

    from balloonlab.hostd import audit as host_audit
    order: list[str] = []
    never = asyncio.Event()

    class Conn:
        def __init__(self, gid: int) -> None:
            self.gid = gid

        async def call(self, msg: object, timeout_s: float | None = None) -> object:
            order.append(f"asked {self.gid}")
            await never.wait()

    class Sessions(dict):
        def left_for_good(self) -> list[int]:
            return []

    gids = [0, 1, 2, 3]
    sessions = Sessions({gid: SimpleNamespace(conn=Conn(gid)) for gid in gids})
    specs = {gid: SimpleNamespace(ram_pages=8, config={"disk_blocks": 8}) for gid in gids}

    def check_invariant() -> None:
        order.append("invariant")

    mem = SimpleNamespace(guest_ids=lambda: gids, check_invariant=check_invariant)
    shootdowns = SimpleNamespace(pending=lambda gid: False)
    run = asyncio.ensure_future(host_audit.run_audit(sessions, mem, shootdowns, specs,  # type: ignore[arg-type]
                                                     unresponsive_s=5.0))
    try:
        while "invariant" not in order:
            await asyncio.sleep(0)
        assert order.index("invariant") == len(gids), order
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_no_guest_is_asked_before_every_silent_one_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest silent at the audit (stopped mid-tick) goes on with its late tick once it wakes, faulting
    pages back in and taking frames from the others: no guest is asked before it is back (``until_back``).
    One not back by the deadline is asked all the same; if its claims disagree, the audit says it was not
    at rest."""
    import asyncio

    from balloonlab.hostd import audit as host_audit
    asked: list[int] = []

    async def ask(sessions: object, spec: object, gid: int, timeout_s: float) -> SimpleNamespace:
        asked.append(gid)
        return _claims()

    mem, shootdowns, _ = _fake_audit_parts(monkeypatch, ask, [0, 1, 2],
                                           check=lambda mem, gid, res: [f"guest {gid}: made up"] if gid == 2 else [])

    class Sessions(list):
        def left_for_good(self) -> list[int]:
            return []

    loop = asyncio.get_running_loop()
    back = loop.create_future()          # guest 1 finishes its late tick when the test says so
    never = loop.create_future()         # guest 2 does not, in time

    def until_back(gid: int) -> object:
        return {0: None, 1: back, 2: never}[gid]

    monkeypatch.setattr(host_audit, "AUDIT_TIMEOUT_S", 0.5)     # the deadline, made short
    run = asyncio.ensure_future(host_audit.run_audit(Sessions([0, 1, 2]), mem, shootdowns,
                                                     {0: None, 1: None, 2: None}, unresponsive_s=5.0,
                                                     until_back=until_back))
    for _ in range(20):
        await asyncio.sleep(0)
    assert asked == [] and not run.done()        # not even guest 0, at rest: guest 1 may still move pages
    back.set_result(True)
    result = await asyncio.wait_for(run, 5.0)    # guest 2's deadline passes: then everyone is asked
    assert asked == [0, 1, 2]
    assert result["guests"]["1"]["answered"] and result["guests"]["2"]["answered"]
    assert result["problems"] == ["guest 2: made up",
                                  "guest 2: silent when the audit began and not back with its late tick within "
                                  "0.5 s: its books were not at rest, and what its late tick moved meanwhile may "
                                  "show above"]


async def test_a_guest_that_leaves_during_the_audit_is_checked_as_one_that_left(monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    """Killed while the audit runs: not "did not answer the audit" (its loss is the run's to report), but
    the question asked of every guest that left: does it hold anything still?"""
    import asyncio

    from balloonlab.hostd import audit as host_audit
    from balloonlab.proto.errors import PeerClosed

    class Sessions(list):
        def left_for_good(self) -> list[int]:
            return []

    sessions = Sessions([0, 1])

    async def ask(sessions_: object, spec: object, gid: int, timeout_s: float) -> SimpleNamespace:
        if gid == 1:
            sessions.remove(1)             # its connection closed: the registry lets it go
            raise PeerClosed("connection to guest-1 closed")
        return _claims()

    mem, shootdowns, released = _fake_audit_parts(monkeypatch, ask, [0, 1])
    result = await asyncio.wait_for(host_audit.run_audit(sessions, mem, shootdowns, {0: None, 1: None},
                                                         unresponsive_s=5.0), 5.0)
    assert released == [1] and result["ok"] is True and result["problems"] == []
    assert result["guests"]["1"] == {"ok": True, "released": True, "left_during_audit": True}
    assert result["audited"] == 1 and result["released"] == 1

def _reply_fields(reply: object) -> tuple:
    return (tuple(np.asarray(getattr(reply, name)).tolist() if name != "ram_backed" else bytes(reply.ram_backed)
                  for name in ("ram_gpfns", "ram_tokens", "ram_backed", "disk_blocks", "disk_tokens", "balloon_gpfns")),
            reply.report)


def _python_reply(state: object, first: int, count: int, monkeypatch: pytest.MonkeyPatch) -> object:
    from balloonlab.guestd import audit as guest_audit
    with monkeypatch.context() as m:
        m.setattr(guest_audit, "_compiled_reply", lambda *a: None)
        return audit_reply(state, first, count)


async def test_the_compiled_audit_answers_as_the_python_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Books that hold: the compiled pass gives every window's reply exactly as the Python check does."""
    from balloonlab.guestd import audit as guest_audit
    w = await make_world()
    for first, count in ((0, 64), (64, 64), (0, 1024), (100, 37), (900, 500), (5000, 64)):
        fast = guest_audit._compiled_reply(w.state, first, count)
        assert fast is not None
        assert _reply_fields(fast) == _reply_fields(_python_reply(w.state, first, count, monkeypatch))
    assert audit(w) == []


async def test_the_compiled_audit_leaves_any_broken_book_to_the_python_check(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    """One entry of the guest's books changed at random, 300 times: where the Python check finds a problem
    (or fails), the compiled pass declines (None) and the Python check answers; where it finds none, both
    answer alike."""
    from balloonlab.guestd import audit as guest_audit
    w = await make_world()
    pt, fr = w.kernel.pt, w.kernel.frames
    arrays = {"gpfn": pt.gpfn, "cached": pt.cached, "expect": pt.expect, "on_disk": pt.on_disk, "block": pt.block,
              "version": pt.version, "vpage": fr.vpage, "kind": fr.kind, "backed": fr.backed, "token": fr.token}
    saved = {k: a.copy() for k, a in arrays.items()}
    rng = np.random.default_rng(11)
    declined = agreed = 0
    for _ in range(300):
        name = str(rng.choice(list(arrays)))
        a = arrays[name]
        i = int(rng.integers(a.size))
        if a.dtype == bool:
            a[i] = not a[i]
        elif name in ("gpfn", "cached", "vpage"):
            a[i] = int(rng.choice([-1, int(rng.integers(fr.kind.size)), int(rng.integers(pt.n))]))
        elif name == "kind":
            a[i] = int(rng.integers(5))
        elif name == "block":
            a[i] = int(rng.choice([-1, int(rng.integers(2 * pt.n))]))
        else:
            a[i] = int(rng.choice([0, int(rng.integers(1 << 40))]))
        try:
            slow = _reply_fields(_python_reply(w.state, 0, 1 << 16, monkeypatch))
        except IndexError:
            slow = None
        fast = guest_audit._compiled_reply(w.state, 0, 1 << 16)
        if slow is None or slow[1]["problems"]:
            assert fast is None, (name, i, slow and slow[1]["problems"])
            declined += 1
        else:
            assert fast is not None and _reply_fields(fast) == slow, (name, i)
            agreed += 1
        for k, arr in arrays.items():
            arr[:] = saved[k]
    assert declined > 50 and agreed > 50, (declined, agreed)
