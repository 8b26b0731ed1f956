"""The disk cache's incremental LRU and its one-block paths must leave the books exactly as the scans did.

``VirtualDisk.drop_clean`` pops the least recently used clean clusters off a
heap kept as clusters are touched; the reference here is the scan it
replaced: every cached, clean, unpinned cluster not kept, sorted by (stamp,
cluster index), taken until they hold the pages wanted. The frames it frees
go onto the free stack in that order, which decides the frames later
requests get, so the test compares the stack too.

``read_one``/``write_one``/``fit_allowance_one`` (the scalar one-block
requests) are driven side by side with ``fit_allowance``/``read``/``write``
on arrays of one, in both cached modes and with clusters of 1 and 4 blocks;
every array of both disks and pools must agree after each request, also
with the pools partitioned into grants (frames taken from and freed to the
guest's private list).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from balloonlab.hostd.framepool import FramePool
from balloonlab.hostd.vdisk import VirtualDisk
from balloonlab.proto.costs import CostModel

BLOCKS = 96


def _disk(mode: str, cluster_pages: int, allowance_pages: int = 24) -> VirtualDisk:
    return VirtualDisk(0, BLOCKS, FramePool(256), CostModel(), mode=mode, cluster_pages=cluster_pages,
                       allowance_pages=allowance_pages, max_inflight_requests=4)


def _reference_victims(vd: VirtualDisk, want_pages: int, keep: set[int]) -> list[int]:
    """The scan ``drop_clean`` replaced: candidates by (stamp, index), until they hold ``want_pages``."""
    cand = [c for c in np.flatnonzero(vd.cluster_cached).tolist()
            if vd.cluster_dirty[c] == 0 and not vd.cluster_pinned[c] and c not in keep]
    cand.sort(key=lambda c: (float(vd.cluster_stamp_us[c]), c))
    out, got = [], 0
    for c in cand:
        if got >= want_pages:
            break
        out.append(c)
        got += int(vd.cluster_cached[c])
    return out


def _books(vd: VirtualDisk) -> dict[str, Any]:
    p = vd.pool
    return {"tokens": vd.tokens.tolist(), "image": vd.image.tolist(), "state": vd.cache_state.tolist(),
            "loc": vd.cache_loc.tolist(), "dirty": vd.dirty.tolist(), "since": vd.dirty_since_us.tolist(),
            "stamp": vd.cluster_stamp_us.tolist(), "cached": vd.cluster_cached.tolist(),
            "cdirty": vd.cluster_dirty.tolist(), "pages": (vd.cached_pages, vd.dirty_pages, vd.fill_pages_tick),
            "inflight": list(vd._inflight_done_us), "counters": repr(vd.counters),
            "device": vd.device.counters(), "pool": (p.kind.tolist(), p.owner_index.tolist(), p.token.tolist(),
                                                     p.pinned.tolist(), p._free_stack[:p._n_free].tolist())}


@pytest.mark.parametrize("mode", ["writethrough", "writeback"])
@pytest.mark.parametrize("cluster_pages", [1, 4])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_drop_clean_takes_the_clusters_the_scan_took_in_its_order(seed: int, cluster_pages: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    vd = _disk(mode, cluster_pages, allowance_pages=10_000)     # no allowance drops: only the ones tested here
    n_clusters = vd.cluster_cached.size
    vt_us = 1000.0
    drops = 0
    for i in range(1500):
        r = rng.random()
        # Few distinct times, some going back: ties and stamps that move both ways.
        vt_us = float(rng.choice([vt_us, vt_us + 10.0, vt_us - 10.0, 500.0]))
        n = 1 if rng.random() < 0.7 else int(rng.integers(2, 6))
        blocks = np.sort(rng.choice(BLOCKS, n, replace=False)).astype(np.int64)
        if r < 0.4:
            vd.read(blocks, vt_us)
        elif r < 0.55:
            vd.write(blocks, rng.integers(1, 2**40, n).astype(np.uint64), vt_us)
        elif r < 0.6:
            first = int(rng.integers(0, BLOCKS - 4))
            vd.set_pinned(first, 4, bool(rng.random() < 0.5))
        elif r < 0.65 and mode == "writeback":
            vd.flush(vt_us, 0.0, 0)
        else:
            want = int(rng.integers(1, 3 * cluster_pages + 2))
            k = int(rng.integers(0, 3))
            keep_arr = rng.choice(n_clusters, k, replace=False).astype(np.int64)
            keep: Any = None if k == 0 else (int(keep_arr[0]) if k == 1 and rng.random() < 0.5 else keep_arr)
            expected = _reference_victims(vd, want, set(keep_arr.tolist()))
            frames = [int(vd.cache_loc[b]) for c in expected
                      for b in range(c * cluster_pages, min((c + 1) * cluster_pages, BLOCKS))]
            n_free = vd.pool._n_free
            freed = vd.drop_clean(want, keep=keep)
            assert freed == len(frames), f"request {i}"
            assert vd.pool._free_stack[n_free:n_free + freed].tolist() == frames, f"request {i}"
            assert not any(vd.cluster_cached[c] for c in expected)
            drops += freed > 0
        if len(vd._lru) > 2 * vd.cached_pages + 256:
            pytest.fail(f"the LRU heap holds {len(vd._lru)} entries for {vd.cached_pages} cached pages")
    assert drops > 100


def _requests(seed: int) -> list[tuple[str, int, int, float]]:
    rng = np.random.default_rng(seed)
    out, vt_us = [], 0.0
    for _ in range(800):
        vt_us += float(rng.choice([0.0, 5.0, 40.0, 200.0]))
        op = "read" if rng.random() < 0.6 else ("write" if rng.random() < 0.9 else "tick")
        out.append((op, int(rng.integers(0, BLOCKS)), int(rng.integers(0, 2**64, dtype=np.uint64)), vt_us))
    return out


def _regrant(vd: VirtualDisk) -> None:
    """A tick boundary of the deterministic discipline: the disk's guest gets a fresh private free list.

    Exactly the list's initial size, so that frames cached before and dropped
    now (they return to the guest's list) make it grow.
    """
    vd.pool.close_grants()
    vd.pool.open_grants([vd.guest_id])
    vd.pool.grant(vd.guest_id, 64)


@pytest.mark.parametrize("granted", [False, True])
@pytest.mark.parametrize("mode", ["writethrough", "writeback"])
@pytest.mark.parametrize("cluster_pages", [1, 4])
@pytest.mark.parametrize("seed", [5, 6])
def test_one_block_requests_keep_the_books_of_the_array_path(seed: int, cluster_pages: int, mode: str,
                                                             granted: bool) -> None:
    scalar, arrays = _disk(mode, cluster_pages), _disk(mode, cluster_pages)
    scalar.set_swap_area(32, 16)
    arrays.set_swap_area(32, 16)
    for vd in (scalar, arrays) if granted else ():
        _regrant(vd)
    for i, (op, block, token, vt_us) in enumerate(_requests(seed)):
        if op == "tick":
            for vd in (scalar, arrays):
                vd.retire(vt_us)
                vd.flush(vt_us, 1000.0, vd.dirty_background_pages)
                if granted:
                    _regrant(vd)
            continue
        one = np.array((block,), np.int64)
        start_s = scalar.fit_allowance_one(block, vt_us)
        start_a = arrays.fit_allowance(one, vt_us, write=op == "write")
        assert start_s == start_a
        assert scalar.frames_needed_one(block) == (arrays.frames_needed_write(one) if op == "write"
                                                   else arrays.frames_needed_read(one))
        if op == "read":
            rs, ra = scalar.read_one(block, start_s), arrays.read(one, start_a)
            assert rs.tokens.tolist() == ra.tokens.tolist() and rs.tokens.dtype == ra.tokens.dtype
        else:
            rs = scalar.write_one(block, token, start_s)
            ra = arrays.write(one, np.array((token,), np.uint64), start_a)
        assert (rs.done_vt_us, rs.double_fault_pages) == (ra.done_vt_us, ra.double_fault_pages), f"request {i}"
        assert _books(scalar) == _books(arrays), f"books differ after request {i} ({op} {block})"
        if granted:
            assert scalar.pool.granted(0) == arrays.pool.granted(0), f"request {i}"
            assert scalar.pool._grants[0].stack[:scalar.pool.granted(0)].tolist() \
                == arrays.pool._grants[0].stack[:arrays.pool.granted(0)].tolist(), f"request {i}"
    c = scalar.counters
    assert c.dropped_clean_pages > 50 and c.cache_hit_pages > 50 and c.cache_miss_pages > 50
    assert (c.double_faults > 0) == (cluster_pages > 1)
    assert (c.throttled_writes > 0) == (mode == "writeback")


def _books_after_each(seed: int, cluster_pages: int, granted: bool) -> list[dict[str, Any]]:
    vd = _disk("writeback", cluster_pages, allowance_pages=40)
    if granted:
        _regrant(vd)
    out = []
    for op, block, token, vt_us in _requests(seed):
        if op == "tick":
            vd.retire(vt_us)
            vd.flush(vt_us, 1000.0, vd.dirty_background_pages)
            if granted:
                _regrant(vd)
        elif op == "read":
            vd.read_one(block, vd.fit_allowance_one(block, vt_us))
        else:
            vd.write_one(block, token, vd.fit_allowance_one(block, vt_us))
        out.append(_books(vd))
    return out


@pytest.mark.parametrize("granted", [False, True])
@pytest.mark.parametrize("cluster_pages", [4, 16])
def test_compiled_cache_in_and_scalar_drops_take_and_free_the_frames_the_array_calls_do(
        monkeypatch: pytest.MonkeyPatch, cluster_pages: int, granted: bool) -> None:
    """A cluster's cache-in runs in one compiled pass (``FramePool.alloc_run``) and a drop of up to
    ``_FEW_PAGES`` pages as a loop of one-frame frees; with both sent through the array calls instead
    the books must not tell them apart, after every request."""
    import balloonlab.hostd.vdisk as vdisk_mod
    fast = _books_after_each(7, cluster_pages, granted)
    assert vdisk_mod._FEW_PAGES >= cluster_pages
    monkeypatch.setattr(vdisk_mod, "_FEW_PAGES", 0)
    monkeypatch.setattr(VirtualDisk, "_cache_in_run",
                        lambda self, b0, n: self._cache_in(np.arange(b0, b0 + n, dtype=np.int64)))
    arrays = _books_after_each(7, cluster_pages, granted)
    for i, (s, a) in enumerate(zip(fast, arrays)):
        assert s == a, f"books differ after request {i}"
    assert int(fast[-1]["counters"].split("dropped_clean_pages=")[1].split(",")[0]) > 50
    assert int(fast[-1]["counters"].split("cluster_loads=")[1].split(",")[0]) > 50


def test_alloc_run_takes_nothing_from_a_pool_short_of_frames() -> None:
    pool = FramePool(8)
    vd = VirtualDisk(0, 32, pool, CostModel(), mode="writethrough", cluster_pages=16, allowance_pages=64)
    before = (pool.kind.tolist(), pool._n_free, vd.cache_state.tolist())
    assert not pool.alloc_run(2, 0, 0, 16, vd.tokens, vd.pinned, vd.cache_loc, vd.cache_state, 1)
    assert (pool.kind.tolist(), pool._n_free, vd.cache_state.tolist()) == before
