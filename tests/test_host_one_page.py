"""One-page requests take scalar paths through host memory; the books must end exactly as the array paths leave them.

Two host memories get the same seeded sequence of requests under memory
pressure (EPT faults, disk reads and writes, reclaims, tick ends). One gets
every one-page request as a numpy array (the scalar path); the other as a
Python list, which only the array path takes. Every reply, every counter
and every array of the books -- down to the order of the free stacks, which
decides the frames later requests get -- must be the same.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from balloonlab.hostd.errors import OutOfRange
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.p2m import one_page_number, one_token

GUESTS, PAGES, BLOCKS = 3, 40, 64


def memory_books(hm: HostMemory) -> dict[str, Any]:
    """The snapshot, every array of the frame pool (its free stack too) and of host swap, and each p2m."""
    out: dict[str, Any] = {"snapshot": hm.snapshot()}
    for name in ("kind", "owner_guest", "owner_index", "token", "accessed", "dirty", "pinned", "busy",
                 "_free_stack"):
        out[f"pool.{name}"] = getattr(hm.pool, name).tolist()
    for name in ("token", "used", "cached", "owner_guest"):
        out[f"swap.{name}"] = getattr(hm.swap, name).tolist()
    for g in hm.guest_ids():
        p2m = hm.p2m(g)
        out[f"{g}.p2m"] = (p2m.state.tolist(), p2m.loc.tolist())
    return out


def guest_wrote(gid: int, pages: np.ndarray, *worlds: Any) -> None:
    """The guest wrote to ``pages``: their content changed, in every world alike."""
    for w in worlds:
        w.content[gid][pages] += np.uint64(1)


async def in_lockstep(a: Any, b: Any, i: int, *step: Any) -> None:
    """Request ``i`` to both worlds; their books compared every 50 requests."""
    for w in (a, b):
        await w.step(*step)
    if i % 50 == 49:
        assert a.books() == b.books(), f"books differ after request {i}"


async def reclaim_or_tick(hm: HostMemory, replies: list[Any], op: str, pages: np.ndarray, vt_us: float) -> None:
    """A host-wide reclaim of a few more frames than ``pages`` (its reply into ``replies``), or a tick's end."""
    if op == "reclaim":
        got = await hm.reclaim(int(pages.size) + 2, vt_us)
        replies.append((op, got.freed_frames, got.done_vt_us))
    elif op == "tick":
        hm.tick(vt_us)


def assert_same(a: Any, b: Any) -> None:
    assert a.replies == b.replies
    assert a.books() == b.books()


class World:
    def __init__(self, as_list: bool, cluster_pages: int) -> None:
        self.as_list = as_list
        self.hm = HostMemory(48, 512, "random", np.random.default_rng(9), low_watermark_frames=2,
                             reclaim_batch_frames=3, cluster_pages=cluster_pages, vdisk_cache_max_pages=12,
                             max_inflight_requests=3)
        self.content = {g: np.arange(PAGES, dtype=np.uint64) + np.uint64((g + 1) << 32) for g in range(GUESTS)}
        self.hm.wire(shootdown=self.shootdown)
        for g in range(GUESTS):
            self.hm.add_guest(g, PAGES, PAGES // 2, disk_blocks=BLOCKS)
        self.hm.set_swap_profile("ssd")
        self.replies: list[Any] = []

    async def shootdown(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        return self.content[gid][gpfns.astype(np.int64)].copy()

    def pages(self, values: np.ndarray) -> Any:
        return values.tolist() if self.as_list and values.size == 1 else values

    async def step(self, op: str, gid: int, pages: np.ndarray, token: int, vt_us: float) -> None:
        hm = self.hm
        if op == "fault":
            tokens, done = await hm.ept_fault(gid, self.pages(pages.astype(np.uint64)), vt_us)
            self.replies.append((op, tokens.dtype.str, tokens.tolist(), done))
        elif op == "write":
            tok = np.full(pages.size, token, np.uint64)
            done = await hm.vdisk_write(gid, self.pages(pages.astype(np.uint64)), self.pages(tok), vt_us)
            self.replies.append((op, done))
        elif op == "read":
            tokens, done = await hm.vdisk_read(gid, self.pages(pages.astype(np.uint64)), vt_us)
            self.replies.append((op, tokens.dtype.str, tokens.tolist(), done))
        else:
            await reclaim_or_tick(hm, self.replies, op, pages, vt_us)

    def books(self) -> dict[str, Any]:
        hm = self.hm
        out = memory_books(hm)
        for g in hm.guest_ids():
            vd = hm.vdisk(g)
            out[f"{g}.vdisk"] = (vd.tokens.tolist(), vd.image.tolist(), vd.cache_state.tolist(),
                                 vd.cache_loc.tolist(), vd.dirty.tolist(), vd.cluster_stamp_us.tolist(),
                                 vd.cluster_cached.tolist(), vd.cached_pages, vd.iobuf_frames().tolist(),
                                 vd.inflight_requests)
        return out


@pytest.mark.parametrize("cluster_pages", [1, 4])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_one_page_requests_leave_the_books_as_the_array_paths_do(seed: int, cluster_pages: int) -> None:
    scalar, arrays = World(False, cluster_pages), World(True, cluster_pages)
    rng = np.random.default_rng(seed)
    vt_us = 0.0
    ops = ["fault"] * 5 + ["write"] * 3 + ["read"] * 3 + ["reclaim", "tick"]
    for i in range(600):
        op = str(rng.choice(ops))
        gid = int(rng.integers(0, GUESTS))
        n = 1 if rng.random() < 0.8 else int(rng.integers(2, 5))
        limit = PAGES if op == "fault" else BLOCKS
        pages = rng.choice(limit, n, replace=False)
        token = int(rng.integers(1, 2**62))
        if op == "fault" and rng.random() < 0.5:
            guest_wrote(gid, pages, scalar, arrays)
        vt_us += float(rng.integers(0, 300))
        await in_lockstep(scalar, arrays, i, op, gid, pages, token, vt_us)
    assert_same(scalar, arrays)
    c = scalar.hm.counters
    assert c.swap_out_pages > 50 and c.swap_in_pages > 20 and c.direct_reclaims > 0   # it really was under pressure
    assert (scalar.hm.snapshot()["double_faults"] > 0) == (cluster_pages > 1)   # 1-page clusters: no RMW
    scalar.hm.check_invariant()


def test_one_page_numbers_are_checked_like_the_array_path() -> None:
    assert one_page_number(np.array([5], np.uint64), 1, "gpfn", 8) == 5
    assert one_page_number((5).to_bytes(8, "little"), 1, "gpfn", 8) == 5
    assert one_page_number(np.array([1, 2], np.uint64), 1, "gpfn", 8) is None      # not one page: the array path
    assert one_page_number(np.array([1.0]), 1, "gpfn", 8) is None                  # not integers: the array path says so
    assert one_page_number([3], 1, "gpfn", 8) is None
    for bad in (np.array([8], np.uint64), np.array([-1], np.int64), np.array([2**64 - 1], np.uint64)):
        with pytest.raises(OutOfRange) as exc:
            one_page_number(bad, 1, "gpfn", 8)
        assert str(exc.value) == f"guest 1: gpfn {int(bad[0])} out of range [0, 8)"
    assert one_token(np.array([-1], np.int64)) == 2**64 - 1 and one_token(np.array([1, 2])) is None
