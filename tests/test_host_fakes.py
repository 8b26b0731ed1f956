"""A fake of the guests' side of host memory, for the host tests (and its own tests).

Each fake guest holds the current content token of every gpfn (what is in
its RAM) and knows which gpfns the host backs. The shootdown hands the
content to the host, like ``GuestKernel.invalidate``; a fault gets it back
from the host and checks it: a mismatch is a lost page.
"""
from __future__ import annotations

import asyncio

import numpy as np

from balloonlab.hostd.memory import HostMemory
from balloonlab.proto.tokens import make_tokens

__all__ = ["FakeGuests", "make_memory"]


def make_memory(total_frames: int = 64, swap_slots: int = 256, victim: str = "random", seed: int = 0,
                **kw: object) -> HostMemory:
    return HostMemory(total_frames, swap_slots, victim, np.random.default_rng(seed), **kw)  # type: ignore[arg-type]


class FakeGuests:
    def __init__(self, hm: HostMemory, yield_in_shootdown: bool = True) -> None:
        self.hm = hm
        self.content: dict[int, np.ndarray] = {}
        self.backed: dict[int, np.ndarray] = {}
        self.ballooned: dict[int, np.ndarray] = {}
        self.versions: dict[int, int] = {}
        self.lost_pages = 0
        self.shootdowns: list[tuple[int, list[int]]] = []
        self.yield_in_shootdown = yield_in_shootdown
        hm.wire(shootdown=self.shootdown)

    def add(self, gid: int, pages: int, **kw: object) -> None:
        self.hm.add_guest(gid, pages, **kw)  # type: ignore[arg-type]
        self.content[gid] = np.zeros(pages, np.uint64)
        self.backed[gid] = np.zeros(pages, bool)
        self.ballooned[gid] = np.zeros(pages, bool)
        self.versions[gid] = 0

    def remove(self, gid: int) -> None:
        self.hm.remove_guest(gid)
        for d in (self.content, self.backed, self.ballooned, self.versions):
            del d[gid]

    async def shootdown(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        if self.yield_in_shootdown:
            await asyncio.sleep(0)   # the ack crosses a socket: other tasks run meanwhile
        if gid not in self.content:
            raise ConnectionError(f"guest {gid} is gone")
        gp = gpfns.astype(np.int64)
        self.shootdowns.append((gid, gp.tolist()))
        self.backed[gid][gp] = False
        return self.content[gid][gp].copy()

    async def touch(self, gid: int, gpfns: np.ndarray, write: bool, vt_us: float = 0.0) -> float:
        """Reference pages: fault in the unbacked ones (checking their content), maybe write."""
        gp = np.unique(np.asarray(gpfns, np.int64))
        gp = gp[~self.ballooned[gid][gp]]
        need = gp[~self.backed[gid][gp]]
        done = vt_us
        if need.size:
            tokens, done = await self.hm.ept_fault(gid, need, vt_us)
            if gid not in self.content:
                return done
            self.lost_pages += int(np.count_nonzero(tokens != self.content[gid][need]))
            self.backed[gid][need] = True
        if write:
            still = gp[self.backed[gid][gp]]   # a shootdown may have raced us; the next touch faults
            self.versions[gid] += 1
            self.content[gid][still] = make_tokens(still + (gid << 24), np.full(still.size, self.versions[gid]))
        return done

    def inflate(self, gid: int, gpfns: np.ndarray) -> None:
        self.hm.balloon_inflate(gid, gpfns)
        self.ballooned[gid][gpfns] = True
        self.backed[gid][gpfns] = False
        self.content[gid][gpfns] = 0

    def deflate(self, gid: int, gpfns: np.ndarray) -> None:
        self.hm.balloon_deflate(gid, gpfns)
        self.ballooned[gid][gpfns] = False


async def test_the_fake_round_trips_content_through_host_swap() -> None:
    hm = make_memory(total_frames=4, swap_slots=16, low_watermark_frames=0, reclaim_batch_frames=1)
    guests = FakeGuests(hm)
    guests.add(1, 12)
    for gpfn in range(12):
        await guests.touch(1, np.array([gpfn]), write=True)
    for first in range(0, 12, 2):
        await guests.touch(1, np.arange(first, first + 2), write=False)
    assert guests.lost_pages == 0
    assert hm.counters.swap_out_pages > 0 and hm.counters.swap_in_pages > 0
    hm.check_invariant()
