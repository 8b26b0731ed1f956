"""EPT faults of first touches take a short path through host memory; the books must end as the array path leaves them.

Two host memories get the same seeded sequence of multi-page EPT faults
(first touches, pages already backed, pages the host swapped out), reclaims
and tick ends, with ticks that cut faults at their gate. In one the short
path (``HostMemory._ept_fault_first``) is switched off, so every fault takes
the array path. Every reply, every counter and every array of the books --
down to the order of the free stacks and the grants, which decide the frames
later faults get -- must be the same. Both run with and without per-guest
grants (the partitioned host), where a grant that runs dry sends the fault
the long way.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from balloonlab.hostd.errors import HostOutOfMemory
from balloonlab.hostd.framepool import FrameKind
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.p2m import PageState
from balloonlab.proto.costs import CostModel
from balloonlab.proto.tokens import LATER_TOKEN
from tests.test_host_one_page import assert_same, guest_wrote, in_lockstep, memory_books, reclaim_or_tick

GUESTS, PAGES = 3, 1024
TICK_US = 400.0


class World:
    def __init__(self, short_path: bool, grants: bool) -> None:
        # 0.7 µs a page: a running sum of it is not n times it, so the gate's cut must add as the array path does
        self.hm = HostMemory(192, 4096, "random", np.random.default_rng(5), low_watermark_frames=2,
                             reclaim_batch_frames=3, vdisk_cache_max_pages=8, costs=CostModel(ept_fault_us=0.7))
        self.short_taken = 0
        if not short_path:
            self.hm._ept_fault_first = lambda *a: None     # type: ignore[method-assign]
        else:
            first = self.hm._ept_fault_first

            def counted(*a: Any) -> Any:
                got = first(*a)
                self.short_taken += got is not None
                return got
            self.hm._ept_fault_first = counted     # type: ignore[method-assign]
        self.content = {g: np.arange(PAGES, dtype=np.uint64) + np.uint64((g + 1) << 32) for g in range(GUESTS)}
        self.hm.wire(shootdown=self.shootdown)
        for g in range(GUESTS):
            self.hm.add_guest(g, PAGES, PAGES // 2, disk_blocks=16)
        self.hm.set_swap_profile("ssd")
        self.grants = grants
        if grants:
            self.hm.pool.open_grants(list(range(GUESTS)))
            for g in range(GUESTS):
                self.hm.pool.grant(g, 40)
        self.replies: list[Any] = []

    async def shootdown(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        return self.content[gid][gpfns.astype(np.int64)].copy()

    async def step(self, op: str, gid: int, pages: np.ndarray, fresh: bytes, vt_us: float) -> None:
        hm = self.hm
        if op == "fault":
            try:
                tokens, done = await hm.ept_fault(gid, pages.astype(np.uint64), vt_us, fresh)
            except HostOutOfMemory as exc:     # a grant spent with nothing of its own to reclaim: refused alike
                self.replies.append(("refused", str(exc)))
                return
            self.replies.append((op, tokens.dtype.str, tokens.tolist(), done))
        else:
            await reclaim_or_tick(hm, self.replies, op, pages, vt_us)
        if op == "tick":
            end = (vt_us // TICK_US + 1) * TICK_US
            hm.open_tick(end, bound_faults=bool(pages.size % 2))
            if self.grants:
                for g in range(GUESTS):
                    self.replies.append(("grant", g, hm.pool.grant(g, int(pages[0]) % 24)))

    def books(self) -> dict[str, Any]:
        return {**memory_books(self.hm), "grants": [self.hm.pool.grant_left(g) for g in range(GUESTS)]}


@pytest.mark.parametrize("grants", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_first_touch_faults_leave_the_books_as_the_array_path_does(seed: int, grants: bool) -> None:
    short, full = World(True, grants), World(False, grants)
    rng = np.random.default_rng(seed)
    vt_us = 0.0
    ops = ["fault"] * 8 + ["reclaim", "tick"]
    for i in range(500):
        op = str(rng.choice(ops))
        gid = int(rng.integers(0, GUESTS))
        n = int(rng.integers(2, 20))
        untouched = np.flatnonzero(short.hm.p2m(gid).state == 0)
        if rng.random() < 0.6 and untouched.size >= n:   # first touches (the short path's, room permitting)
            pages = rng.choice(untouched, n, replace=False)
        else:
            pages = rng.choice(PAGES, n, replace=False)
        fresh = np.packbits(rng.random(n) < 0.5).tobytes() if rng.random() < 0.5 else b""
        if op == "fault" and rng.random() < 0.5:
            guest_wrote(gid, pages, short, full)
        vt_us += float(rng.integers(0, 120))
        await in_lockstep(short, full, i, op, gid, pages, fresh, vt_us)
    assert_same(short, full)
    c = short.hm.counters
    # the short path was really taken, and the long one really had work of its own
    assert short.short_taken > 30 and c.swap_in_pages > 10 and c.ept_faults_cut > 0, \
        (short.short_taken, c.swap_in_pages, c.ept_faults_cut)
    assert any(r[0] == "fault" and LATER_TOKEN in r[2] for r in short.replies)
    short.hm.check_invariant()


async def test_a_fault_with_content_or_a_wrong_fresh_bitmap_goes_the_long_way() -> None:
    w = World(True, False)
    hm = w.hm
    pages = np.array([3, 9, 4], np.uint64)
    assert hm._ept_fault_first(hm._guest(0), pages.astype(np.int64), 0.0) is not None      # all first touches
    # 4 is backed now: the whole fault is the array path's (its KEEP_TOKEN for 4)
    assert hm._ept_fault_first(hm._guest(0), np.array([4, 5], np.int64), 0.0) is None
    with pytest.raises(Exception, match="fresh bits"):
        await hm.ept_fault(0, np.array([20, 21], np.uint64), 0.0, b"\x00\x00")
    hm.check_invariant()


@pytest.mark.parametrize("gate_us", [None, 2.5, 100.0])
async def test_the_gate_cuts_where_the_array_path_does_to_the_last_bit(gate_us: float | None) -> None:
    # From 0 µs the completion is the running sum itself: 7 x 0.7 added one by one is not 7 * 0.7.
    worlds = World(True, False), World(False, False)
    got = []
    for w in worlds:
        w.hm.open_tick(gate_us)
        got.append((await w.hm.ept_fault(1, np.arange(10, 17, dtype=np.uint64), 0.0), w.books()))
    (short_reply, short_books), (full_reply, full_books) = got
    assert worlds[0].short_taken == 1
    assert short_reply[0].tolist() == full_reply[0].tolist() and short_reply[1] == full_reply[1]
    assert short_books == full_books
    served = 7 - short_reply[0].tolist().count(LATER_TOKEN)
    assert served == {None: 7, 2.5: 4, 100.0: 7}[gate_us]     # pages start at 0, 0.7, 1.4, 2.1 (< 2.5), 2.8


def test_the_compiled_pass_refuses_gpfns_out_of_order_before_it_changes_anything() -> None:
    hm = World(True, False).hm
    p2m, pool = hm.p2m(0), hm.pool
    before = (pool.kind.copy(), p2m.state.copy(), p2m.loc.copy(), pool.free_frames)
    for bad in ([5, 5], [7, 3]):
        with pytest.raises(ValueError, match="strictly ascending"):
            pool.alloc_pages(FrameKind.GUEST, 0, np.array(bad, np.int64), p2m.pinned, p2m.state, p2m.loc,
                             int(PageState.FRAME))
    assert (pool.kind == before[0]).all() and (p2m.state == before[1]).all() and (p2m.loc == before[2]).all()
    assert pool.free_frames == before[3]
