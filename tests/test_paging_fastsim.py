"""The fast simulators and the kernel give the counts of the written definitions.

``NAIVE`` holds one-step-per-reference simulators written straight from the
definitions in guestd/README.md, independent of both engines. Random traces
(uniform and with locality, with and without writes, frame counts from 1 to
more than the pages) must give identical fault and write-back counts on all
three.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from balloonlab.guestd.errors import GuestConfigError, UnknownPolicy
from balloonlab.guestd.fastsim import FAST_POLICIES, TraceIndex, simulate_fast, stable_argsort
from balloonlab.guestd.replay import replay_kernel

Trace = list[tuple[int, bool]]


def naive_fifo(tr: Trace, k: int) -> tuple[int, int]:
    order: list[int] = []
    dirty: dict[int, bool] = {}
    faults = wb = 0
    for p, w in tr:
        if p in dirty:
            dirty[p] |= w
            continue
        faults += 1
        if len(order) == k:
            wb += dirty.pop(order.pop(0))
        order.append(p)
        dirty[p] = w
    return faults, wb


def naive_lru(tr: Trace, k: int) -> tuple[int, int]:
    order: list[int] = []          # least recent first
    dirty: dict[int, bool] = {}
    faults = wb = 0
    for p, w in tr:
        if p in dirty:
            order.remove(p)
            order.append(p)
            dirty[p] |= w
            continue
        faults += 1
        if len(order) == k:
            wb += dirty.pop(order.pop(0))
        order.append(p)
        dirty[p] = w
    return faults, wb


def naive_opt(tr: Trace, k: int) -> tuple[int, int]:
    pages = [p for p, _ in tr]
    frames: list[int] = []
    dirty: dict[int, bool] = {}
    faults = wb = 0
    for i, (p, w) in enumerate(tr):
        if p in dirty:
            dirty[p] |= w
            continue
        faults += 1
        if len(frames) < k:
            frames.append(p)
        else:
            def next_use(q: int) -> int:
                return next((j for j in range(i + 1, len(pages)) if pages[j] == q), len(pages))
            f = max(range(k), key=lambda f: (next_use(frames[f]), -f))   # ties: lowest frame
            wb += dirty.pop(frames[f])
            frames[f] = p
        dirty[p] = w
    return faults, wb


def naive_clock(tr: Trace, k: int, r_on_load: bool = True) -> tuple[int, int]:
    page: list[int | None] = [None] * k
    R = [False] * k
    M = [False] * k
    where: dict[int, int] = {}
    hand = faults = wb = 0
    for p, w in tr:
        if p in where:
            R[where[p]] = True
            M[where[p]] |= w
            continue
        faults += 1
        if None in page:
            f = page.index(None)                 # lowest free frame, hand unchanged
        else:
            while R[hand]:
                R[hand] = False
                hand = (hand + 1) % k
            f = hand
            hand = (hand + 1) % k
            wb += M[f]
            del where[page[f]]
        page[f], where[p], R[f], M[f] = p, f, r_on_load, w
    return faults, wb


def naive_esc(tr: Trace, k: int) -> tuple[int, int]:
    page: list[int | None] = [None] * k
    R = [False] * k
    M = [False] * k
    where: dict[int, int] = {}
    hand = faults = wb = 0
    for p, w in tr:
        if p in where:
            R[where[p]] = True
            M[where[p]] |= w
            continue
        faults += 1
        if None in page:
            f = page.index(None)
        else:
            def step1() -> int:
                return next((f for f in ((hand + i) % k for i in range(k)) if not R[f] and not M[f]), -1)

            def step2() -> int:
                for f in ((hand + i) % k for i in range(k)):
                    if not R[f] and M[f]:
                        return f
                    R[f] = False
                return -1
            f = step1()
            if f < 0:
                f = step2()
            if f < 0:
                f = step1()
            if f < 0:
                f = step2()
            hand = (f + 1) % k
            wb += M[f]
            del where[page[f]]
        page[f], where[p], R[f], M[f] = p, f, True, w
    return faults, wb


NAIVE = {
    "fifo": naive_fifo, "lru": naive_lru, "opt": naive_opt, "esc": naive_esc,
    "clock": naive_clock, "clock-r0": lambda tr, k: naive_clock(tr, k, r_on_load=False),
}


def random_trace(rng: np.random.Generator, n: int, n_pages: int) -> tuple[np.ndarray, np.ndarray]:
    hot = rng.integers(0, max(1, n_pages // 8), n)
    anywhere = rng.integers(0, n_pages, n)
    pages = np.where(rng.random(n) < rng.random(), hot, anywhere)
    scale = int(rng.choice([1, 3, 1 << 40]))           # sparse and huge page numbers too
    return (pages * scale).astype(np.uint64), rng.random(n) < rng.random()


def test_fast_simulators_match_definitions() -> None:
    rng = np.random.default_rng(20240611)
    assert set(NAIVE) == set(FAST_POLICIES)
    for _ in range(120):
        n_pages = int(rng.integers(1, 40))
        pages, writes = random_trace(rng, int(rng.integers(1, 400)), n_pages)
        index = TraceIndex(pages, writes)
        tr = list(zip(pages.tolist(), writes.tolist()))
        for k in {1, int(rng.integers(1, n_pages + 3)), n_pages + 1}:
            for policy, naive in NAIVE.items():
                r = simulate_fast(policy, k, pages, writes, index=index)
                assert (r.faults, r.writebacks) == naive(tr, k), (policy, k, tr)
                assert r.refs == len(tr)


def test_kernel_engine_matches_definitions() -> None:
    """The kernel with each policy module is the definition too (odd batch sizes split faults)."""
    rng = np.random.default_rng(7)
    for _ in range(25):
        n_pages = int(rng.integers(1, 25))
        pages, writes = random_trace(rng, int(rng.integers(1, 250)), n_pages)
        tr = list(zip(pages.tolist(), writes.tolist()))
        k = int(rng.integers(1, n_pages + 2))
        batch = int(rng.integers(1, 64))
        for policy, naive in NAIVE.items():
            r = replay_kernel(policy, k, pages, writes, batch=batch)
            assert (r.faults, r.writebacks) == naive(tr, k), (policy, k, batch, tr)


def test_longer_traces_fast_equals_kernel() -> None:
    """Thousands of references with locality: fast simulators == kernel engine."""
    rng = np.random.default_rng(11)
    pages, writes = random_trace(rng, 6000, 300)
    for policy in FAST_POLICIES:
        for k in (17, 64):
            a = simulate_fast(policy, k, pages, writes, engine="python")
            b = replay_kernel(policy, k, pages, writes, engine="reference")
            c = simulate_fast(policy, k, pages, writes)      # the compiled kernel, where it runs the policy
            assert (a.faults, a.writebacks) == (b.faults, b.writebacks) == (c.faults, c.writebacks), policy


def test_dense_page_ids_keep_page_order() -> None:
    from balloonlab.guestd.fastsim import dense_page_ids
    for pages in (np.array([5, 3, 5, 9], np.uint64), np.array([1 << 40, 7, 1 << 40, 3], np.uint64)):
        assert dense_page_ids(pages).tolist() == np.unique(pages, return_inverse=True)[1].tolist()


def test_stable_argsort_is_a_stable_sort() -> None:
    rng = np.random.default_rng(2)
    for hi in (3, 70_000, 1 << 40, (1 << 64) - 1):
        keys = rng.integers(0, hi, 5000, dtype=np.uint64, endpoint=True)
        assert np.array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(UnknownPolicy, match="'nope'.*clock"):
        simulate_fast("nope", 3, np.arange(4))
    with pytest.raises(GuestConfigError, match="frames must be >= 1, got 0"):
        simulate_fast("clock", 0, np.arange(4))
    assert simulate_fast("lru", 3, np.zeros(0, np.uint64)).faults == 0


def test_replay_cli_json(tmp_path: Path) -> None:
    """``python -m balloonlab.guestd.replay --json`` prints exactly policy, frames, refs, faults, writebacks."""
    trace = tmp_path / "t.txt"
    trace.write_text("7,0,1,2,0,3,0,4,2,3,0,3,2,1,2,0,1,7,0,1\n")
    out = subprocess.run([sys.executable, "-m", "balloonlab.guestd.replay", "--policy", "lru", "--frames", "3",
                          str(trace), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"policy": "lru", "frames": 3, "refs": 20, "faults": 12, "writebacks": 0}
