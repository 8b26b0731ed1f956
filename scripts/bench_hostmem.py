"""The host's own CPU per request, in process: ``HostMemory`` driven directly, no sockets, no guests.

Called as ``scripts/bench.py hostmem [options]`` or ``python scripts/bench_hostmem.py``.
A benchmark, not a test: it prints numbers.

The io-amplification shape: 4 guests of 32 MiB on 80 MiB of host RAM (1.6x
overcommitted), one-page clusters, a 1 MiB host disk cache (a 64-page
allowance per disk), ticks of 10 virtual ms with the host's boundary work
between them. Three request streams, each seeded:

- ``read``: one-page disk reads spread over a 20 MiB file, 99 % misses in
  the small cache, as in the ballooning variant's 65,000 requests (1 %
  hits): ``vdisk_read`` -> ``fit_allowance`` -> ``read``.
- ``write``: one-page disk writes over the same file (writethrough).
- ``fault``: one-page EPT faults over each guest's whole memory, which
  does not fit (touched once first, untimed): host swapping, shootdowns,
  swap-ins; ``fault16``: the same, 16 distinct pages per message, as the
  host-swap variant's guests send them (its 3,500 faults carry 75,000 pages).

- ``wire``: the ``read`` stream's requests as the host gets them, whole:
  each a frame fed to the guest's connection (``GuestConnection.data_received``,
  a transport that only hashes what is written), decoded, served in the
  guest's lane of the deterministic discipline (its grants opened and
  closed each tick) by the handlers the host installs, and its reply
  encoded: the host's request path without the socket system calls.

- ``chain``: the ``wire`` path with read chains (``hostd.readchain``): each
  ``DiskRead`` carries a program of 15 more one-page reads of the same file
  (a reference's 1 µs between them), served in the guest's lane with its
  grant, as a cold guest's reads are; µs per read, not per message.

- ``cluster``: the scale benchmark's shape instead (``scenarios/scale.toml``
  at 64 guests: 8 MiB guests, host RAM not overcommitted, the default
  64 KiB clusters and cache budget): one-page reads of a 2 MiB file per
  guest, each miss loading its 16-page cluster and dropping others from
  the guest's small share of the cache.
- ``first16``: the same shape's EPT faults as a warming guest sends them:
  16 pages a message, none touched before (at most every page of every
  guest once, 8,192 faults): the first-touch path, a fault the tick's end
  cuts now and then.

Each stream prints µs of CPU (``time.process_time``) per request, the best of
``--repeat`` runs, and a digest of every reply and of the host's final books:
the same digest before and after a change says the change kept every count,
every frame and every completion time. The host's code is whatever
``balloonlab`` the running interpreter imports, so an A/B runs this file with
two checkouts' interpreters (``/path/to/other/.venv/bin/python scripts/bench_hostmem.py``).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import time
from typing import Any, Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from balloonlab.hostd.memory import HostMemory  # noqa: E402

__all__ = ["main", "run_stream", "STREAMS"]

GUESTS = 4
GUEST_PAGES = 8192            # 32 MiB
HOST_FRAMES = 20480           # 80 MiB: 1.6x overcommitted
DISK_BLOCKS = 8192
FILE_BLOCKS = 5120            # the 20 MiB database file
CACHE_MAX_PAGES = 256         # [host] cache_max_mib = 1
TICK_US = 10_000.0
STREAMS = ("read", "write", "fault", "fault16", "cluster", "wire", "chain",
           "first16")   # appended only: a stream's index seeds it
CHAIN_READS = 16              # reads per DiskRead in ``chain``: the first and 15 chained onto it
FAULT_BATCH = 16              # pages per EPT fault message in ``fault16`` (the host-swap variant sends ~20)
# Requests per 10 ms tick, as in the io-amplification variants (163 disk reads a tick; 9 faults of ~20
# pages a tick, of which 1 in 70 reaches the tick's end and is cut).
PER_TICK = {"read": 160, "write": 160, "fault": 160, "fault16": 10, "cluster": 384, "wire": 160, "chain": 160,
            "first16": 96}


class _Shape:
    """Guests, their memory and disks, the host: io-amplification's, or the scale benchmark's (``cluster``)."""

    def __init__(self, stream: str) -> None:
        scale = stream in ("cluster", "first16")
        self.guests = 64 if scale else GUESTS
        self.guest_pages = 2048 if scale else GUEST_PAGES            # 8 MiB, or 32 MiB
        self.host_frames = self.guests * self.guest_pages if scale else HOST_FRAMES
        self.disk_blocks = 2048 if scale else DISK_BLOCKS
        self.file_blocks = 512 if scale else FILE_BLOCKS              # a 2 MiB file, or 20 MiB
        # The default 64 KiB clusters and cache budget (a 16th of RAM), or io-amplification's settings.
        self.memory_kw: dict[str, Any] = {} if scale else {"cluster_pages": 1, "vdisk_cache_max_pages": CACHE_MAX_PAGES}


class _World:
    def __init__(self, seed: int, shape: _Shape) -> None:
        self.hm = HostMemory(shape.host_frames, shape.guests * shape.guest_pages, "random",
                             np.random.default_rng(seed), expected_guests=shape.guests, tick_us=TICK_US,
                             **shape.memory_kw)
        self.content = {g: np.arange(shape.guest_pages, dtype=np.uint64) + np.uint64((g + 1) << 32)
                        for g in range(shape.guests)}
        self.hm.wire(shootdown=self._shootdown)
        for g in range(shape.guests):
            self.hm.add_guest(g, shape.guest_pages, shape.guest_pages // 2, disk_blocks=shape.disk_blocks)

    async def _shootdown(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        return self.content[gid][gpfns.astype(np.int64)].copy()


def _plan(stream: str, seed: int, requests: int, shape: _Shape) -> tuple[np.ndarray, list[np.ndarray]]:
    """(guest per request, pages per request): round-robin over the guests, pages seeded per stream."""
    rng = np.random.default_rng([seed, STREAMS.index(stream)])
    gids = np.arange(requests) % shape.guests
    if stream == "fault16":
        pages = [rng.choice(shape.guest_pages, FAULT_BATCH, replace=False) for _ in range(requests)]
    elif stream == "first16":
        # Each guest's pages in a seeded order, 16 a fault, never one twice: every fault a first touch.
        per_guest = [rng.permutation(shape.guest_pages).reshape(-1, FAULT_BATCH) for _ in range(shape.guests)]
        requests = min(requests, shape.guests * (shape.guest_pages // FAULT_BATCH))
        gids = np.arange(requests) % shape.guests
        pages = [per_guest[g][i // shape.guests] for i, g in enumerate(gids.tolist())]
    elif stream == "chain":
        pages = [rng.choice(shape.file_blocks, CHAIN_READS, replace=False) for _ in range(requests)]
    else:
        pages = list(rng.integers(0, shape.guest_pages if stream == "fault" else shape.file_blocks, (requests, 1)))
    return gids.astype(np.int64), pages


async def _drive(world: _World, stream: str, gids: np.ndarray, pages: list[np.ndarray],
                 per_tick: int, shape: _Shape) -> tuple[float, Any]:
    hm = world.hm
    h = hashlib.sha256()
    # Requests as the RPC layer hands them over: one-page arrays decoded from the wire.
    wire = [p.astype(np.uint64) for p in pages]
    toks = [p.astype(np.uint64) * np.uint64(7) + np.uint64(1) for p in pages]
    gl = gids.tolist()
    vt = 0.0
    step_us = TICK_US / per_tick
    tick_end = TICK_US
    hm.open_tick(tick_end)
    if stream.startswith("fault"):
        # Every guest's memory touched once first (untimed): the host is full and the timed faults swap.
        for p in range(0, shape.guest_pages, 64):
            for gid in range(shape.guests):
                await hm.ept_fault(gid, np.arange(p, p + 64, dtype=np.uint64), vt)
                vt += TICK_US / 40
                if vt >= tick_end:
                    hm.tick(tick_end)
                    tick_end += TICK_US
                    hm.open_tick(tick_end)
    t0 = time.process_time()
    for i, gid in enumerate(gl):
        if vt >= tick_end:
            hm.tick(tick_end)
            tick_end += TICK_US
            hm.open_tick(tick_end)
        if stream == "read" or stream == "cluster":
            tokens, done = await hm.vdisk_read(gid, wire[i], vt)
            h.update(tokens.tobytes())
        elif stream == "write":
            done = await hm.vdisk_write(gid, wire[i], toks[i], vt)
        else:
            tokens, done = await hm.ept_fault(gid, wire[i], vt)
            h.update(tokens.tobytes())
        h.update(np.float64(done).tobytes())
        vt += step_us
    cpu_s = time.process_time() - t0
    # Float totals to 12 significant digits: a device's busy time is a sum whose order (arrival, or lane
    # by lane) moves its last bits; every reply's time above and every count stay exact.
    snap = {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in hm.snapshot().items()}
    h.update(json.dumps(snap, sort_keys=True, default=str).encode())
    h.update(hm.pool._free_stack[:hm.pool._n_free].tobytes())
    for g in hm.guest_ids():
        vd = hm.vdisk(g)
        h.update(vd.cache_state.tobytes() + vd.cache_loc.tobytes() + vd.cluster_stamp_us.tobytes())
        h.update(hm.p2m(g).state.tobytes() + hm.p2m(g).loc.tobytes())
    hm.check_invariant()
    return cpu_s, h.hexdigest()[:16]


class _HashingTransport:
    """What a connection writes goes into a digest; the send buffer is always empty."""

    def __init__(self, digest: Any) -> None:
        self.digest = digest

    def write(self, data: bytes) -> None:
        self.digest.update(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass


async def _drive_wire(world: _World, gids: np.ndarray, pages: list[np.ndarray], per_tick: int,
                      shape: _Shape, chain: int = 0) -> tuple[float, Any]:
    from balloonlab.hostd.discipline.base import DisciplineContext
    from balloonlab.hostd.discipline.deterministic import DeterministicOrder
    from balloonlab.hostd.handlers import memory_requests
    from balloonlab.hostd.session import GuestConnection
    from balloonlab.proto.framing import FrameEncoder
    from balloonlab.proto.messages import MsgType

    hm = world.hm
    h = hashlib.sha256()

    class _NoSessions:
        def get(self, gid: int) -> None:
            return None

    ctx = DisciplineContext(sessions=_NoSessions(), running=lambda: set(range(shape.guests)),  # type: ignore[arg-type]
                            stop=lambda reason: None, clock=lambda: 0.0, hypercall_us=1.0, shootdown_timeout_s=5.0,
                            tick_us=TICK_US)
    order = DeterministicOrder(ctx)
    conns = []
    for g in range(shape.guests):
        order.guest_joined(g)
        conn = GuestConnection(name=f"guest-{g}")
        conn.connection_made(_HashingTransport(h))  # type: ignore[arg-type]
        conn.requests = dict(order.serve(g, memory_requests(g, hm, None, 1.0)).requests)  # type: ignore[arg-type]
        conns.append(conn)
    enc = FrameEncoder()
    step_us = TICK_US / per_tick
    bodies = [{"blocks": p[:1].astype("<u8").tobytes(), "vt_us": i * step_us} for i, p in enumerate(pages)]
    if chain:
        from balloonlab.hostd.readchain import ADD, CHECK, READ
        hm.read_chain = 64
        for i, p in enumerate(pages):
            steps = [x for b in p[1:].tolist() for x in (ADD, 1.0, CHECK, 0.0, READ, float(b))]
            tick_end = (i * step_us // TICK_US + 1) * TICK_US     # the batch's deadline: the gate
            bodies[i]["chain"] = np.array([tick_end, 0.1, *steps], "<f8").tobytes()
    frames = [enc.encode([0, i + 1, int(MsgType.DISK_READ), b]) for i, b in enumerate(bodies)]
    gl = gids.tolist()
    tick, tick_end = 0, TICK_US
    order.tick_started(0, 0.0, hm)
    hm.open_tick(tick_end)
    t0 = time.process_time()
    for i, gid in enumerate(gl):
        if i * step_us >= tick_end:
            await order.finish_tick()
            hm.tick(tick_end)
            tick += 1
            order.tick_started(tick, tick_end, hm)
            tick_end += TICK_US
            hm.open_tick(tick_end)
        conns[gid].data_received(frames[i])
    cpu_s = time.process_time() - t0
    await order.finish_tick()
    snap = {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in hm.snapshot().items()}
    h.update(json.dumps(snap, sort_keys=True, default=str).encode())
    hm.check_invariant()
    return cpu_s, h.hexdigest()[:16]


def run_stream(stream: str, requests: int, seed: int = 42) -> tuple[float, str]:
    """One run of one stream: (µs of CPU per request, digest of replies and books)."""
    shape = _Shape(stream)
    world = _World(seed, shape)
    if stream == "wire":
        gids, pages = _plan("read", seed, requests, shape)
        cpu_s, digest = asyncio.run(_drive_wire(world, gids, pages, PER_TICK[stream], shape))
    elif stream == "chain":
        gids, pages = _plan(stream, seed, -(-requests // CHAIN_READS), shape)
        cpu_s, digest = asyncio.run(_drive_wire(world, gids, pages, PER_TICK[stream], shape, chain=CHAIN_READS))
        reads = sum(world.hm.vdisk(g).counters.read_requests for g in world.hm.guest_ids())
        return cpu_s / reads * 1e6, digest
    else:
        gids, pages = _plan(stream, seed, requests, shape)
        cpu_s, digest = asyncio.run(_drive(world, stream, gids, pages, PER_TICK[stream], shape))
        requests = len(gids)      # (first16 runs out of untouched pages)
    return cpu_s / requests * 1e6, digest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py hostmem", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000, help="requests per stream (default 20000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per stream; the best is shown (default 3)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--streams", default=",".join(STREAMS), help=f"comma-separated, of {','.join(STREAMS)}")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    streams = [s for s in args.streams.split(",") if s]
    for s in streams:
        if s not in STREAMS:
            ap.error(f"unknown stream {s!r}; expected one of {', '.join(STREAMS)}")
    out: dict[str, Any] = {}
    for s in streams:
        runs = [run_stream(s, args.requests, args.seed) for _ in range(max(1, args.repeat))]
        digests = {d for _, d in runs}
        if len(digests) != 1:
            raise SystemExit(f"stream {s}: runs of the same seed disagree: {sorted(digests)}")
        out[s] = {"us_per_request": min(u for u, _ in runs), "runs_us": [round(u, 2) for u, _ in runs],
                  "digest": runs[0][1]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{'stream':8} {'us/request':>10}  digest            runs")
        for s, r in out.items():
            print(f"{s:8} {r['us_per_request']:10.1f}  {r['digest']}  {r['runs_us']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
