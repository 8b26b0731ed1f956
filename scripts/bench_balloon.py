"""Balloon inflation: from a new target to host frames freed, for 1 GiB of clean guest memory.

    python scripts/bench.py balloon [--pages N] [--repeat R] [--json FILE]

What runs: one process, one uvloop event loop, a real Unix socket. The
guest half is the real ``GuestKernel`` + ``BalloonDriver`` +
``RemoteHypervisor`` (what ``guestd`` runs); the host half is the real
``HostMemory`` behind an ``RpcConnection`` serving ``EPT_FAULT`` and
``BALLOON_INFLATE``/``DEFLATE`` the way ``hostd.machine`` does. Only the
guest's file reads use an in-process ``LocalBlockDevice`` (no host disk
cache), because filling 1 GiB of page cache through the host's virtual disk
one major fault at a time would take minutes; the inflation itself needs no
disk I/O (clean pages are dropped for free). Both halves share one core
here, where the real processes would each have their own, so the figure is
a little pessimistic.

Set-up (not timed): the guest has ``--pages`` + 16 MiB of RAM, every usable
frame holding a clean page of a file it has read, each backed by a host
frame. Timed: ``BalloonDriver.set_target(--pages)`` then
``reconcile()`` (what the guest runs at the start of a tick) until the host
has freed ``--pages`` frames. Printed: wall seconds (best of ``--repeat``,
a fresh guest and host each time), pages/s, the ratio to the 1 s target,
and where the time went (guest allocator vs hypercall + host).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

__all__ = ["main", "run_once", "TARGET_S"]

TARGET_S = 1.0                    # issue #4: 262,144 pages in under 1 s of wall time
DEFAULT_PAGES = 262_144           # 1 GiB of 4 KiB pages
SLACK_PAGES = 16 * 256            # the guest keeps 16 MiB besides the balloon
KERNEL_PAGES = 256


async def _serve_host(mem: Any, sock: Path) -> tuple[Any, list[Any]]:
    """A host that answers EPT faults and balloon hypercalls for guest 0 from ``mem``."""
    from balloonlab.proto.messages import (BalloonDeflate, BalloonInflate, BalloonReply, EptFault, EptFaultReply, MsgType)
    from balloonlab.proto.rpc import RpcConnection
    from balloonlab.proto.transport import parse_address, serve

    conns: list[Any] = []

    async def ept_fault(m: EptFault) -> EptFaultReply:
        tokens, done = await mem.ept_fault(0, m.gpfns, m.vt_us)
        return EptFaultReply(tokens, done)

    def inflate(m: BalloonInflate) -> BalloonReply:
        mem.balloon_inflate(0, m.gpfns)
        return BalloonReply(mem.balloon_pages(0), m.vt_us + 2.0)

    def deflate(m: BalloonDeflate) -> BalloonReply:
        mem.balloon_deflate(0, m.gpfns)
        return BalloonReply(mem.balloon_pages(0), m.vt_us + 2.0)

    def factory() -> RpcConnection:
        conn = RpcConnection(name="guest-0", requests={MsgType.EPT_FAULT: ept_fault,  # type: ignore[dict-item]
                                                       MsgType.BALLOON_INFLATE: inflate,
                                                       MsgType.BALLOON_DEFLATE: deflate})
        conns.append(conn)
        return conn

    server, _ = await serve(parse_address(f"unix:{sock}"), factory)
    return server, conns


async def run_once(pages: int, sock_dir: Path) -> dict[str, float]:
    """Set up a guest full of clean page cache, inflate ``pages``, return timings (wall s)."""
    from balloonlab.guestd.balloon import BalloonDriver
    from balloonlab.guestd.blockdev import LocalBlockDevice
    from balloonlab.guestd.kernel import GuestKernel
    from balloonlab.guestd.kernel_config import kernel_config_from_mapping
    from balloonlab.guestd.remote import RemoteHypervisor
    from balloonlab.hostd.memory import HostMemory
    from balloonlab.proto.costs import CostModel
    from balloonlab.proto.rpc import RpcConnection
    from balloonlab.proto.transport import connect, parse_address

    ram_pages = pages + SLACK_PAGES + KERNEL_PAGES
    usable = ram_pages - KERNEL_PAGES
    costs = CostModel()
    # The host has room for all of the guest: no host reclaim interferes with the measurement.
    mem = HostMemory(ram_pages + 1024, 1024, "random", np.random.default_rng(1), costs,
                     low_watermark_frames=16)
    mem.add_guest(0, ram_pages, max_balloon_pages=ram_pages)
    sock = sock_dir / "balloon.sock"
    server, _ = await _serve_host(mem, sock)
    conn = await connect(parse_address(f"unix:{sock}"), lambda: RpcConnection(name="host"))
    try:
        cfg = kernel_config_from_mapping({
            "ram_pages": ram_pages, "kernel_pages": KERNEL_PAGES, "policy": "esc",
            # a wide fault-around only to make the (untimed) set-up quicker
            "fault_around_pages": 1024,
            "regions": [{"name": "data", "kind": "file", "pages": usable}],
        }, where="bench")
        hyp = RemoteHypervisor(conn)  # type: ignore[arg-type]
        kernel = GuestKernel(cfg, np.random.default_rng(2), LocalBlockDevice(cfg.disk_blocks), hyp, costs)
        balloon = BalloonDriver(kernel, hyp)
        kernel.on_oom = balloon.deflate_on_oom

        # Set-up: read the whole file once; every usable frame ends up holding a clean page.
        t = time.perf_counter()
        order = np.arange(usable, dtype=np.int64)
        for i in range(0, usable, 65_536):
            await kernel.access(order[i:i + 65_536])
        setup_s = time.perf_counter() - t
        resident = int(np.count_nonzero(kernel.frames.resident & ~kernel.frames.M))
        host_guest_frames = mem.pool.counts()["guest"]
        if resident != usable or host_guest_frames != usable:
            raise RuntimeError(f"set-up: {resident} clean resident pages and {host_guest_frames} host frames, "
                               f"expected {usable} of each")

        # Time where it goes: the guest's allocator vs the hypercall (socket + host).
        spent = {"alloc_s": 0.0, "hypercall_s": 0.0}
        real_alloc, real_inflate = kernel.balloon_alloc, hyp.balloon_inflate

        async def timed_alloc(n: int) -> np.ndarray:
            t0 = time.perf_counter()
            try:
                return await real_alloc(n)
            finally:
                spent["alloc_s"] += time.perf_counter() - t0

        async def timed_inflate(gpfns: np.ndarray, vt_us: float) -> float:
            t0 = time.perf_counter()
            try:
                return await real_inflate(gpfns, vt_us)
            finally:
                spent["hypercall_s"] += time.perf_counter() - t0

        kernel.balloon_alloc = timed_alloc  # type: ignore[method-assign]
        hyp.balloon_inflate = timed_inflate  # type: ignore[method-assign]

        free_before = mem.pool.free_frames
        t0 = time.perf_counter()
        balloon.set_target(pages)
        while mem.pool.free_frames - free_before < pages:
            moved = await balloon.reconcile()
            if moved == 0:
                raise RuntimeError(f"inflation stalled at {balloon.actual_pages} of {pages} pages")
        wall_s = time.perf_counter() - t0

        freed = mem.pool.free_frames - free_before
        if freed != pages or mem.balloon_pages(0) != pages or balloon.actual_pages != pages:
            raise RuntimeError(f"freed {freed} host frames, host balloon {mem.balloon_pages(0)}, "
                               f"guest balloon {balloon.actual_pages}; expected {pages}")
        mem.check_invariant()
        if kernel.counters.lost_pages:
            raise RuntimeError(f"{kernel.counters.lost_pages} pages lost")
        if kernel.counters.writebacks:
            raise RuntimeError(f"{kernel.counters.writebacks} write-backs: the pages were meant to be clean")
        return {"wall_s": wall_s, "setup_s": setup_s, "inflate_calls": float(balloon.counters.inflate_calls),
                **spent}
    finally:
        conn.close()
        server.close()
        await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py balloon", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pages", type=int, default=DEFAULT_PAGES, help="pages to inflate (default 262144 = 1 GiB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs, each with a fresh guest and host (best is reported)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.pages < 1 or args.repeat < 1:
        ap.error("--pages and --repeat must be >= 1")
    import logging

    import structlog
    import uvloop

    # The guest's info events (balloon_target_received) are not part of the output.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sock_dir = Path(tempfile.mkdtemp(prefix="bl-bench-", dir="/tmp"))
    runs = []
    try:
        for _ in range(args.repeat):
            runs.append(uvloop.run(run_once(args.pages, sock_dir)))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    best = min(runs, key=lambda r: r["wall_s"])
    median = statistics.median(r["wall_s"] for r in runs)
    mib = args.pages * 4096 / (1 << 20)
    print(f"balloon inflation, {args.pages} pages ({mib:.0f} MiB) of clean guest page cache -> host frames freed")
    print("  in-process guest (GuestKernel + BalloonDriver + RemoteHypervisor) and host (HostMemory),")
    print("  real RpcConnection pair over a Unix socket, one event loop")
    print(f"  wall: best {best['wall_s']:.3f} s, median {median:.3f} s over {args.repeat} run(s)"
          f"  ({args.pages / best['wall_s']:,.0f} pages/s)")
    print(f"  target < {TARGET_S:g} s for 262144 pages: {best['wall_s'] / TARGET_S * DEFAULT_PAGES / args.pages:.2f}x "
          f"of the target (scaled to 262144 pages)")
    print(f"  of which guest allocator {best['alloc_s']:.3f} s, hypercall + host {best['hypercall_s']:.3f} s "
          f"({int(best['inflate_calls'])} inflate call(s)); set-up {best['setup_s']:.1f} s, not timed")
    if args.json:
        args.json.write_text(json.dumps({"pages": args.pages, "best": best, "median_wall_s": median,
                                         "runs": runs, "target_s": TARGET_S}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
