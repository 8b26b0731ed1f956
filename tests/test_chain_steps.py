"""A read chain's compiled steps (hostd/_chain.c) must leave host memory exactly as the Python steps do.

Two host memories get the same seeded sequence of requests: one-block reads
with a chained program after them, programs served ahead of a batch, writes
(dirty clusters a drop must pass over), pinned ranges, tick ends with new
grants. One serves the chains' steps compiled where it can
(``hostd.chainsteps``), the other every step in Python. Every reply and
every book -- the disk's arrays, its LRU heap's entries, its in-flight list
and counters, the frame pool's arrays and free lists, the grant's stack, the
device lane's channels, offsets and sums -- must be the same after each
request, while the compiled side really serves most reads and hands the
others back (faults, queue-depth waits, drops short of clean clusters).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import balloonlab.hostd.chainsteps as chainsteps
import balloonlab.hostd.memory as memory_mod
from balloonlab.hostd.errors import HostOutOfMemory, InvariantViolation
from balloonlab.hostd.hostcache import CacheConfig
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.readchain import ADD, CHECK, EPT, EPT_PAGE, READ, WIN, check_program
from balloonlab.proto.tokens import LATER_TOKEN
from tests.test_host_one_page import memory_books

GUESTS, PAGES, TICK_US = 3, 64, 1000.0


class World:
    def __init__(self, compiled: bool, cluster_pages: int, blocks: int, mode: str = "writeback") -> None:
        self.compiled = compiled
        self.hm = HostMemory(400, GUESTS * PAGES, "random", np.random.default_rng(9), low_watermark_frames=2,
                             reclaim_batch_frames=3, cluster_pages=cluster_pages, max_inflight_requests=12,
                             cache=CacheConfig(40, mode))
        self.hm.wire(shootdown=self.shootdown)
        for g in range(GUESTS):
            self.hm.add_guest(g, PAGES, PAGES // 2, disk_blocks=blocks)
        self.hm.read_chain = 24
        self.replies: list[Any] = []

    async def shootdown(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        return np.zeros(gpfns.size, np.uint64)

    def open_tick(self, vt_us: float, shares: list[int]) -> None:
        pool = self.hm.pool
        pool.open_grants(list(range(GUESTS)))
        for g, n in enumerate(shares):
            pool.grant(g, n)
        self.hm.open_tick(vt_us + TICK_US)

    def close_tick(self, vt_us: float) -> None:
        self.hm.pool.close_grants()
        self.hm.tick(vt_us)

    async def step(self, monkeypatch: pytest.MonkeyPatch, op: str, gid: int, arg: Any, vt_us: float) -> None:
        with monkeypatch.context() as m:
            if not self.compiled:
                m.setattr(memory_mod, "chain_steps", lambda *a: None)
            try:
                await self._step(op, gid, arg, vt_us)
            except HostOutOfMemory as exc:   # a grant too small for a write or an unchained read: both alike
                self.replies.append(("refused", op, str(exc)))

    async def _step(self, op: str, gid: int, arg: Any, vt_us: float) -> None:
        hm = self.hm
        if op == "write":
            blocks, token = arg
            got = hm.vdisk_write_now(gid, blocks, np.full(blocks.size, token, np.uint64), vt_us)
            self.replies.append((op, got if type(got) is float else await got))
        elif op == "chain":
            block, prog = arg
            first = hm.vdisk_read_now(gid, np.array([block], np.uint64), vt_us)
            if type(first) is not tuple:
                tokens, done = await first
                self.replies.append(("waited", tokens.tolist(), done))
                return
            tokens, done, times = hm.vdisk_read_chain(gid, first, vt_us, prog)
            self.replies.append((op, tokens.tolist(), done, times))
        elif op == "ahead":
            tokens, times = hm.vdisk_chain_ahead(gid, vt_us, arg)
            self.replies.append((op, tokens.tolist(), times))
        elif op == "pin":
            first, n, on = arg
            hm.vdisk(gid).set_pinned(first, n, on)

    def books(self) -> dict[str, Any]:
        hm = self.hm
        out = memory_books(hm)
        pool = hm.pool
        out["pool.kinds"] = (pool._kind_frames.tolist(), pool._n_granted, pool._n_free)
        out["counters"] = dataclasses.asdict(hm.counters)
        out["guest counters"] = [dataclasses.asdict(hm._guest(g).counters) for g in range(GUESTS)]
        out["p2m pinned"] = [hm.p2m(g).pinned.tolist() for g in range(GUESTS)]
        for g in range(GUESTS):
            vd = hm.vdisk(g)
            out[f"{g}.vdisk"] = (vd.cache_state.tolist(), vd.cache_loc.tolist(), vd.dirty.tolist(),
                                 vd.cluster_stamp_us.tolist(), vd.cluster_cached.tolist(),
                                 vd.cluster_dirty.tolist(), vd.cached_pages, vd.dirty_pages, vd.fill_pages_tick,
                                 sorted(vd._lru), list(vd._inflight_done_us), len(vd._inflight_frames),
                                 dataclasses.asdict(vd.counters))
            grant = pool.grant_of(g)
            out[f"{g}.grant"] = None if grant is None else (grant.stack[:grant.n].tolist(), grant.n, grant.taken)
            dev = vd.device
            lane = dev.lanes[g]
            out[f"{g}.lane"] = (sorted(lane.free_at_us), lane.next_offset, lane.seeks, lane.demand_us,
                                lane.requests, lane.pages, lane.busy_us, lane.share, lane.speed,
                                dev.requests, dev.pages, dev.read_pages, dev.write_pages)
        return out


def _program(rng: np.random.Generator, blocks: int, deadline: float, faults: bool) -> list[float]:
    """A chain program in the core's shape: hits, clock steps, reads (now and then one outside the disk or
    not whole), and with ``faults`` an EPT fault of fresh pages now and then."""
    ops: list[float] = [deadline, 0.5]
    for _ in range(int(rng.integers(1, 40))):
        r = rng.random()
        if r < 0.15:
            ops += [WIN, float(rng.integers(1, 6))]
        elif r < 0.25:
            ops += [CHECK, 0.0]
        elif r < 0.35:
            ops += [ADD, float(rng.integers(0, 30))]
        elif r < 0.38:
            ops += [READ, float(blocks + 3) if rng.random() < 0.5 else 2.5]
        elif faults and r < 0.42:
            pages = rng.choice(PAGES, int(rng.integers(1, 4)), replace=False)
            for p in pages.tolist():
                ops += [EPT_PAGE, float(p)]
            ops += [EPT, float(pages.size)]
        else:
            ops += [READ, float(rng.integers(0, blocks))]
    return ops


def _count_fast(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    seen = {"reads": 0, "faults": 0, "handed_back": 0, "stopped": 0}
    real = chainsteps.serve_reads

    def counting(*args: Any) -> Any:
        k, vt, reads, status, faults = real(*args)
        seen["reads"] += reads - args[10]
        seen["faults"] += faults
        seen["stopped"] += status == 1
        seen["handed_back"] += status == 0 and k < len(args[7])
        return k, vt, reads, status, faults

    monkeypatch.setattr(chainsteps, "serve_reads", counting)
    return seen


@pytest.mark.parametrize("cluster_pages,blocks,mode", [(1, 96, "writeback"), (4, 96, "writeback"),
                                                      (16, 130, "writeback"), (4, 96, "writethrough")])
@pytest.mark.parametrize("seed", [1, 2])
async def test_compiled_chain_steps_leave_the_books_as_the_python_steps_do(
        monkeypatch: pytest.MonkeyPatch, seed: int, cluster_pages: int, blocks: int, mode: str) -> None:
    fast = _count_fast(monkeypatch)
    compiled, python = World(True, cluster_pages, blocks, mode), World(False, cluster_pages, blocks, mode)
    rng = np.random.default_rng(seed)
    vt_us, tick = 0.0, 0
    for w in (compiled, python):
        w.open_tick(vt_us, [60, 60, 60])
    for i in range(500):
        r = rng.random()
        gid = int(rng.integers(0, GUESTS))
        if r < 0.06:        # the tick ends; grants of unequal sizes, one now and then too small for a cluster
            tick += 1
            shares = [int(x) for x in rng.integers(0, 90, GUESTS)]
            for w in (compiled, python):
                w.close_tick(tick * TICK_US)
                w.open_tick(tick * TICK_US, shares)
            vt_us = tick * TICK_US
            continue
        vt_us = min(vt_us + float(rng.integers(0, 40)), (tick + 1) * TICK_US - 1.0)
        if r < 0.18:
            n = int(rng.integers(1, 4))
            step: tuple[str, Any] = ("write", (rng.choice(blocks, n, replace=False).astype(np.uint64),
                                               int(rng.integers(1, 2**62))))
        elif r < 0.22:
            step = ("pin", (int(rng.integers(0, blocks - 8)), 8, bool(rng.random() < 0.5)))
        elif r < 0.45:     # a batch's program served ahead: a cold tick's reads and first touches
            step = ("ahead", check_program(gid, np.array(
                _program(rng, blocks, (tick + 1) * TICK_US, faults=True), "<f8").tobytes()))
        else:
            prog = _program(rng, blocks, (tick + 1) * TICK_US, faults=True)
            step = ("chain", (int(rng.integers(0, blocks)), check_program(gid, np.array(prog, "<f8").tobytes())))
        for w in (compiled, python):
            await w.step(monkeypatch, step[0], gid, step[1], vt_us)
        assert compiled.replies == python.replies, f"replies differ after request {i} ({step[0]})"
        if i % 10 == 9:
            assert compiled.books() == python.books(), f"books differ after request {i}"
    assert compiled.books() == python.books()
    compiled.hm.check_invariant()
    # it was the compiled side that served them, and it handed steps back and stopped chains too
    assert fast["reads"] > 300 and fast["handed_back"] > 10 and fast["stopped"] > 10, fast
    assert fast["faults"] > 8, fast     # first touches of several pages, served compiled
    c = compiled.hm.vdisk(0).counters
    assert c.cluster_loads > 20 and c.cache_hit_pages > 20 and c.dropped_clean_pages > 0, c
    assert (c.writeback_pages > 0) == (mode == "writeback"), c    # dirty clusters the drops passed over



async def test_a_drop_short_of_clean_clusters_is_handed_back_with_nothing_changed() -> None:
    w = World(True, 4, 64)
    w.open_tick(0.0, [60, 60, 60])
    hm, vd = w.hm, w.hm.vdisk(0)
    for blk in (1, 6):              # clusters 0 and 1 cached and dirty: the disk's whole allowance
        assert type(hm.vdisk_write_now(0, np.array([blk], np.uint64), np.array([7], np.uint64), 1.0)) is float
    vd.allowance_pages = vd.cached_pages
    assert vd.cluster_dirty[:2].all() and vd.cached_pages == 8
    prog = check_program(0, np.array([TICK_US, 0.5, READ, 20.0, READ, 21.0], "<f8").tobytes())
    fast = chainsteps.chain_steps(vd, prog, 24, TICK_US)
    assert fast is not None
    before = w.books()
    # the read of block 20 must make room, and only dirty clusters could give it: Python's step
    assert fast(2, 5.0, 0, [], []) == (2, 5.0, 0, False)
    assert w.books() == before
    toks, times = __import__("balloonlab.hostd.readchain", fromlist=["run_chain"]).run_chain(
        prog, 5.0, None, None, 24, TICK_US, lambda b, v: None, None, fast)
    assert toks == [] and times == []   # (a read the Python step refuses ends the chain there)


def test_books_that_contradict_themselves_are_an_invariant_violation() -> None:
    w = World(True, 4, 64)
    w.open_tick(0.0, [60, 60, 60])
    hm, vd = w.hm, w.hm.vdisk(0)
    assert type(hm.vdisk_read_now(0, np.array([1], np.uint64), 1.0)) is tuple    # cluster 0 cached
    vd.cache_loc[2] = -1                                                          # a cached block without a frame
    prog = check_program(0, np.array([TICK_US, 0.5, READ, 2.0], "<f8").tobytes())
    fast = chainsteps.chain_steps(vd, prog, 24, TICK_US)
    assert fast is not None
    with pytest.raises(InvariantViolation, match="guest 0: .*block 2 .* outside the pool"):
        fast(2, 5.0, 0, [], [])


@pytest.mark.parametrize("at", [0.5, 4.0, 7.0, 500.0])   # µs before the tick's end: cut after 1, 2 or 3 pages, or not
async def test_first_touches_served_compiled_are_cut_and_pinned_as_in_python(
        monkeypatch: pytest.MonkeyPatch, at: float) -> None:
    """A fault of several fresh pages in a chain (3 µs a page here) near the tick's end: the pages past the gate
    are answered LATER and counted as cut, the frames taken are pinned as the p2m says, and the chain stops
    after a cut fault or goes on to the next one; both sides alike, the compiled one serving them."""
    fast = _count_fast(monkeypatch)
    worlds = World(True, 4, 96), World(False, 4, 96)
    for w in worlds:
        w.open_tick(0.0, [60, 60, 60])
        w.hm.p2m(1).pinned[[3, 9, 40]] = True
    prog = check_program(1, np.array([TICK_US, 0.5, EPT_PAGE, 9.0, EPT_PAGE, 2.0, EPT_PAGE, 40.0, EPT, 3.0,
                                      WIN, 2.0, EPT_PAGE, 3.0, EPT_PAGE, 5.0, EPT, 2.0, READ, 7.0], "<f8").tobytes())
    for w in worlds:
        await w.step(monkeypatch, "ahead", 1, prog, TICK_US - at)
    compiled, python = worlds
    assert compiled.replies == python.replies
    assert compiled.books() == python.books()
    tokens, times = compiled.replies[0][1:]
    cut = {0.5: 2, 4.0: 1, 7.0: 0, 500.0: 0}[at]     # pages left LATER by the first fault
    assert tokens.count(int(LATER_TOKEN)) == cut
    c = compiled.hm.counters
    assert c.ept_faults_cut == (cut > 0) and c.ept_fault_later_pages == cut
    assert fast["faults"] == (1 if cut or at < 10 else 2)
    p2m, pool = compiled.hm.p2m(1), compiled.hm.pool
    backed = [g for g in (9, 2, 40, 3, 5) if p2m.state[g] == 1]
    assert backed and all(pool.pinned[p2m.loc[g]] == (g in (3, 9, 40)) for g in backed)
    compiled.hm.check_invariant()


async def test_can_fault_is_asked_only_when_a_fault_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``run_chain``'s fault step: a program without faults never asks (a host without shootdowns passes
    a ``can_fault`` that cannot answer), one with faults asks, and a no stops the chain before the fault."""
    w = World(True, 4, 96)
    w.open_tick(0.0, [60, 60, 60])
    hm = w.hm
    reads = check_program(0, np.array([TICK_US, 0.5, READ, 3.0, WIN, 2.0, READ, 4.0], "<f8").tobytes())

    def cannot_say() -> bool:
        raise AssertionError("asked without a fault to serve")

    hm.vdisk_chain_ahead(0, 5.0, reads, cannot_say)
    asked = []
    faults = check_program(0, np.array([TICK_US, 0.5, READ, 9.0, EPT_PAGE, 7.0, EPT_PAGE, 8.0, EPT, 2.0,
                                        READ, 10.0], "<f8").tobytes())
    tokens, times = hm.vdisk_chain_ahead(0, 50.0, faults, lambda: asked.append(1) or False)
    assert asked and len(tokens) == 1 and hm.p2m(0).state[7] == 0      # the read before the fault only
    tokens, times = hm.vdisk_chain_ahead(0, 100.0, faults, lambda: True)
    assert len(tokens) == 4 and hm.p2m(0).state[7] == 1                # the read, the fault's two, the read
