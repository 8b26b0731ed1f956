"""Random, concurrent sequences of host-memory operations keep the invariant and lose no page.

Each guest acts like one vCPU (its own operations run one at a time) while
different guests and the host's own reclaim run concurrently, interleaving
at every shootdown. After every round the invariant must hold; at the end
every page and every disk block must read back what was last written.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloonlab.hostd.errors import HostOutOfMemory
from balloonlab.hostd.hostcache import CacheConfig
from balloonlab.hostd.invariant import check_sample

from .test_host_fakes import FakeGuests, make_memory

GUEST_PAGES = 48
DISK_BLOCKS = 64
GUEST_OPS = ("touch", "touch", "write", "write", "inflate", "deflate", "disk_write", "disk_read", "ad_bits",
             "pin", "die")
HOST_OPS = ("reclaim", "balance", "check", "none")


class World:
    def __init__(self, victim: str, seed: int) -> None:
        self.hm = make_memory(total_frames=64, swap_slots=1024, victim=victim, seed=seed,
                              low_watermark_frames=2, reclaim_batch_frames=4, cluster_pages=4,
                              cache=CacheConfig(16, "writeback"), max_inflight_requests=4)
        self.guests = FakeGuests(self.hm)
        self.sample_rng = np.random.default_rng(seed + 1)   # the sampled invariant's own: the ops' rng stays as it was
        self.disk_truth: dict[int, np.ndarray] = {}
        self.next_gid = 0
        self.vt_us = 0.0
        self.versions = 0
        self.oom = 0
        for _ in range(3):
            self.spawn()

    def spawn(self) -> None:
        gid = self.next_gid
        self.next_gid += 1       # fresh ids: a stale shootdown never reaches a newcomer
        self.guests.add(gid, GUEST_PAGES, max_balloon_pages=24, disk_blocks=DISK_BLOCKS)
        self.disk_truth[gid] = np.zeros(DISK_BLOCKS, np.uint64)

    async def guest_op(self, gid: int, op: str, rng: np.random.Generator) -> None:
        g, hm = self.guests, self.hm
        try:
            if op in ("touch", "write"):
                pages = rng.integers(0, GUEST_PAGES, int(rng.integers(1, 6)))
                await g.touch(gid, pages, write=op == "write", vt_us=self.vt_us)
            elif op == "inflate":
                free = np.flatnonzero(~g.ballooned[gid])
                n = min(int(rng.integers(1, 6)), 24 - int(g.ballooned[gid].sum()), free.size)
                if n > 0:
                    g.inflate(gid, rng.choice(free, n, replace=False))
            elif op == "deflate":
                held = np.flatnonzero(g.ballooned[gid])
                if held.size:
                    g.deflate(gid, rng.choice(held, min(held.size, int(rng.integers(1, 6))), replace=False))
            elif op == "disk_write":
                blocks = rng.choice(DISK_BLOCKS, int(rng.integers(1, 5)), replace=False)
                self.versions += 1
                tokens = (blocks.astype(np.uint64) << np.uint64(20)) + np.uint64(self.versions)
                await hm.vdisk_write(gid, blocks, tokens, self.vt_us)
                self.disk_truth[gid][blocks] = tokens
            elif op == "disk_read":
                blocks = rng.integers(0, DISK_BLOCKS, int(rng.integers(1, 5)))
                tokens, _ = await hm.vdisk_read(gid, blocks, self.vt_us)
                assert tokens.tolist() == self.disk_truth[gid][blocks].tolist()
            elif op == "ad_bits":
                bits = rng.random(GUEST_PAGES) < 0.3
                hm.set_ad_bits(gid, np.packbits(bits), np.packbits(bits & (rng.random(GUEST_PAGES) < 0.5)))
            elif op == "pin":
                first = int(rng.integers(0, DISK_BLOCKS - 4))
                if rng.random() < 0.5:
                    hm.pin_vdisk_range(gid, first, 4)
                    hm.pin_gpfns(gid, rng.integers(0, GUEST_PAGES, 2))
                else:
                    hm.unpin_vdisk_range(gid, 0, DISK_BLOCKS)
                    hm.unpin_gpfns(gid, np.arange(GUEST_PAGES))
        except HostOutOfMemory:
            self.oom += 1

    async def host_op(self, op: str, rng: np.random.Generator) -> None:
        if op == "reclaim":
            await self.hm.reclaim(int(rng.integers(1, 12)), self.vt_us)
        elif op == "balance":
            await self.hm.balance(self.vt_us)
        elif op == "check":
            # While others wait for shootdowns: the sample, like the full check, holds at every await.
            check_sample(self.hm, self.sample_rng)
            self.hm.check_invariant()

    async def round(self, ops: list[tuple[int, str]], host: str, rng: np.random.Generator) -> None:
        live = sorted(self.guests.content)
        work = []
        for slot, op in ops:
            gid = live[slot % len(live)]
            if op == "die":
                continue
            work.append(self.guest_op(gid, op, rng))
        work.append(self.host_op(host, rng))
        # One task per guest at most: a guest's own operations are sequential.
        by_guest: dict[int, list[Any]] = {}
        for (slot, op), coro in zip([o for o in ops if o[1] != "die"], work):
            by_guest.setdefault(live[slot % len(live)], []).append(coro)

        async def sequential(coros: list[Any]) -> None:
            for c in coros:
                await c

        await asyncio.gather(*(sequential(c) for c in by_guest.values()), work[-1])
        for slot, op in ops:
            if op == "die" and len(self.guests.content) > 1:
                self.guests.remove(sorted(self.guests.content)[slot % len(self.guests.content)])
                self.spawn()
        self.vt_us += 10_000.0
        self.hm.tick(self.vt_us)
        self.hm.check_invariant()
        check_sample(self.hm, self.sample_rng)

    async def verify_everything(self) -> None:
        for gid in sorted(self.guests.content):
            for first in range(0, GUEST_PAGES, 4):
                await self.guests.touch(gid, np.arange(first, first + 4), write=False, vt_us=self.vt_us)
            for first in range(0, DISK_BLOCKS, 8):
                blocks = np.arange(first, first + 8)
                # Like a vCPU: the next read is issued when the previous one completed.
                tokens, self.vt_us = await self.hm.vdisk_read(gid, blocks, self.vt_us)
                assert tokens.tolist() == self.disk_truth[gid][blocks].tolist()
            self.vt_us += 10_000.0
            self.hm.tick(self.vt_us)
        assert self.guests.lost_pages == 0
        self.hm.check_invariant()


async def run_world(victim: str, seed: int, rounds: list[tuple[list[tuple[int, str]], str]]) -> World:
    world = World(victim, seed)
    rng = np.random.default_rng(seed)
    for ops, host in rounds:
        await world.round(ops, host, rng)
    await world.verify_everything()
    return world


def random_rounds(rng: np.random.Generator, n: int) -> list[tuple[list[tuple[int, str]], str]]:
    return [([(int(rng.integers(0, 3)), str(rng.choice(GUEST_OPS))) for _ in range(int(rng.integers(1, 7)))],
             str(rng.choice(HOST_OPS))) for _ in range(n)]


async def test_long_seeded_run_with_random_victims() -> None:
    world = await run_world("random", 11, random_rounds(np.random.default_rng(11), 150))
    c = world.hm.counters
    assert c.swap_out_pages > 100 and c.swap_in_pages > 50 and c.balloon_inflated_pages > 0
    snap = world.hm.snapshot()
    assert snap["double_faults"] > 0                           # read-modify-writes of the disk cache
    assert c.swap_in_cache_pages == c.swap_out_cache_pages == 0   # the cache never goes to host swap
    assert c.swap_writes_avoided > 0 and c.swap_write_pages + c.swap_writes_avoided == c.swap_out_pages
    assert snap["vdisk_write_requests"] > 20
    assert world.oom == 0


async def test_long_seeded_run_with_clock_victims() -> None:
    world = await run_world("clock", 12, random_rounds(np.random.default_rng(12), 150))
    assert world.hm.counters.swap_out_pages > 100
    assert world.oom == 0


async def test_same_seed_same_counts() -> None:
    a = await run_world("random", 5, random_rounds(np.random.default_rng(5), 40))
    b = await run_world("random", 5, random_rounds(np.random.default_rng(5), 40))
    assert a.hm.snapshot() == b.hm.snapshot()


round_st = st.tuples(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(GUEST_OPS)), min_size=1, max_size=6),
                     st.sampled_from(HOST_OPS))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(victim=st.sampled_from(["random", "clock"]), seed=st.integers(0, 2**16),
       rounds=st.lists(round_st, min_size=1, max_size=25))
def test_any_sequence_keeps_the_invariant(victim: str, seed: int,
                                          rounds: list[tuple[list[tuple[int, str]], str]]) -> None:
    world = asyncio.run(run_world(victim, seed, rounds))
    assert world.oom == 0


@pytest.mark.parametrize("mode", ["sample", "full"])
def test_the_audits_end_check_is_the_runs_last_full_check_unless_a_guest_left_after_it(
        monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    import balloonlab.hostd.invariant as inv
    from balloonlab.hostd.errors import InvariantViolation
    runs: list[str] = []
    broken = {"now": False}

    def check_full(mem: object) -> None:
        runs.append("full")
        if broken["now"]:
            raise InvariantViolation("frame 3 is nobody's")

    monkeypatch.setattr(inv, "check_full", check_full)
    checker = inv.InvariantChecker(object(), mode, 1, np.random.default_rng(0))   # type: ignore[arg-type]
    assert checker.check_end() is None and runs == ["full"]
    checker.finish()
    assert runs == ["full"]                              # the audit's check was the end's: not run twice
    checker.after_guest_left()                           # host memory changed after it: the end checks again
    checker.finish()
    assert runs == ["full"] * (3 if mode == "sample" else 2)
    broken["now"] = True
    found = checker.check_end()
    assert isinstance(found, InvariantViolation)
    assert checker.violations == (1 if mode == "sample" else 0)   # counted once, as finish would have
    checker.finish()
    assert checker.violations == (1 if mode == "sample" else 0)
