"""Benchmark of the paging simulators: references per second per policy on one core.

Called as ``scripts/bench.py paging [options]`` (``main(argv)``), or directly
``python -m scripts.bench_paging``. A benchmark, not a test: it prints numbers.

The trace: ``--refs`` references (default 1M) from a seeded generator, a
zipf-skewed hot working set plus a small share of references spread over a
large cold area, 25 % writes; with the default frame counts a few percent
of references miss. Each policy's offline simulator (``guestd.fastsim``:
the compiled kernel core for fifo/lru/clock/clock-r0/esc, ``fastsim-py``
its O(misses) Python loops, which opt always uses) is timed including its
preparation of the trace (dense page ids, or the sort), best of
``--repeat`` runs, against a naive pure-Python CLOCK loop over the same trace
in the same run (its fault count must agree with ``clock``).
``--kernel-refs`` also times the vCPU path (``GuestKernel.access`` in
4096-reference batches, first frame count only). The Python loops cost one
sort plus a few microseconds per miss, hits cost nothing, so their rate
falls as the miss ratio rises; the naive loop costs the same per reference
whatever the miss ratio. Real programs' traces against libCacheSim:
``scripts/bench.py traces``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (after the thread setting)

from balloonlab.guestd.fastsim import FAST_POLICIES, TraceIndex, simulate_fast  # noqa: E402

__all__ = ["main", "make_trace", "naive_clock"]


def make_trace(refs: int, seed: int, hot_pages: int = 12_000, cold_pages: int = 200_000,
               cold_share: float = 0.01, write_frac: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    from balloonlab.guestd.workload import Layout, Region, build_workload
    layout = Layout([Region("hot", "anon", hot_pages), Region("cold", "anon", cold_pages)])
    w = build_workload([
        {"kind": "zipf", "region": "hot", "theta": 0.8, "write_frac": write_frac, "weight": 1.0 - cold_share},
        {"kind": "anon-hot", "region": "cold", "write_frac": write_frac, "weight": cold_share},
    ], layout, np.random.default_rng(seed))
    return w.next_batch(refs)


def naive_clock(pages: list[int], writes: list[bool], k: int) -> tuple[int, int]:
    """CLOCK the obvious way: a dict and three lists, one Python step per reference."""
    where: dict[int, int] = {}
    page = [-1] * k
    r_bit = [False] * k
    m_bit = [False] * k
    hand = filled = faults = wb = 0
    for p, w in zip(pages, writes):
        f = where.get(p)
        if f is not None:
            r_bit[f] = True
            if w:
                m_bit[f] = True
            continue
        faults += 1
        if filled < k:
            f = filled
            filled += 1
        else:
            while r_bit[hand]:
                r_bit[hand] = False
                hand += 1
                if hand == k:
                    hand = 0
            f = hand
            hand += 1
            if hand == k:
                hand = 0
            if m_bit[f]:
                wb += 1
            del where[page[f]]
        page[f] = p
        where[p] = f
        r_bit[f] = True
        m_bit[f] = w
    return faults, wb


def _best(fn, repeat: int) -> tuple[float, object]:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


async def _kernel_run(policy: str, frames: int, pages: np.ndarray, writes: np.ndarray) -> tuple[float, int]:
    from balloonlab.proto.costs import CostModel
    from balloonlab.guestd.blockdev import LocalBlockDevice
    from balloonlab.guestd.hypervisor import NullHypervisor
    from balloonlab.guestd.kernel import GuestKernel
    from balloonlab.guestd.kernel_config import KernelConfig
    from balloonlab.guestd.workload import Layout
    _, dense = np.unique(pages, return_inverse=True)
    dense = dense.astype(np.uint64)
    cfg = KernelConfig(ram_pages=frames, layout=Layout.single_anon(int(dense.max()) + 1), policy=policy)
    k = GuestKernel(cfg, np.random.default_rng(0), LocalBlockDevice(cfg.disk_blocks), NullHypervisor(), CostModel())
    t0 = time.perf_counter()
    for i in range(0, dense.size, 4096):
        await k.access(dense[i:i + 4096], writes[i:i + 4096])
    return time.perf_counter() - t0, k.counters.major_faults + k.counters.minor_faults


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py paging", description=__doc__.splitlines()[0])
    ap.add_argument("--refs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--frames", type=int, nargs="+", default=[16384, 14000, 12000],
                    help="frame counts (default: about 2.4, 2.6 and 4.6 percent misses)")
    ap.add_argument("--policies", nargs="+", default=["clock", "esc", "clock-r0", "fifo", "lru", "opt"],
                    choices=sorted(FAST_POLICIES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kernel-refs", type=int, default=1_000_000,
                    help="references for the GuestKernel.access timing (0 to skip)")
    ap.add_argument("--json", action="store_true", help="also print the rows as one JSON list")
    args = ap.parse_args(argv)

    pages, writes = make_trace(args.refs, args.seed)
    n = pages.size
    print(f"paging bench: {n:,} references, {np.unique(pages).size:,} distinct pages, "
          f"{writes.mean():.0%} writes, one core, best of {args.repeat}")
    print(f"{'frames':>7} {'policy':<10} {'engine':<13} {'faults':>8} {'miss %':>7} {'wall s':>8} {'M refs/s':>9}")
    rows = []

    def row(frames: int, policy: str, engine: str, faults: int, secs: float, refs: int) -> None:
        rate = refs / secs / 1e6
        rows.append({"frames": frames, "policy": policy, "engine": engine, "faults": faults,
                     "miss_ratio": faults / refs, "wall_s": secs, "mrefs_per_s": rate, "refs": refs})
        print(f"{frames:>7} {policy:<10} {engine:<13} {faults:>8} {100 * faults / refs:>7.2f} {secs:>8.3f} {rate:>9.2f}")

    pl, wl = pages.tolist(), writes.tolist()
    for frames in args.frames:
        secs, (faults, _) = _best(lambda: naive_clock(pl, wl, frames), min(args.repeat, 2))
        row(frames, "clock", "naive-python", faults, secs, n)
        naive_faults = faults
        for policy in args.policies:
            for engine in ("auto", "python") if policy != "opt" else ("python",):
                secs, res = _best(lambda: simulate_fast(policy, frames, pages, writes, engine=engine), args.repeat)
                row(frames, policy, "fastsim" if engine == "auto" else "fastsim-py", res.faults, secs, n)
                if policy == "clock" and res.faults != naive_faults:
                    print(f"  MISMATCH: fastsim clock {res.faults} faults, naive {naive_faults}")
                    return 1
        if args.kernel_refs and frames == args.frames[0]:
            kp, kw = pages[:args.kernel_refs], writes[:args.kernel_refs]
            for policy in ("clock", "esc"):
                secs, faults = asyncio.run(_kernel_run(policy, frames, kp, kw))
                row(frames, policy, "kernel.access", faults, secs, kp.size)
    t0 = time.perf_counter()
    TraceIndex(pages, writes)
    print(f"(the trace sort every fastsim-py run includes: {time.perf_counter() - t0:.3f} s)")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
