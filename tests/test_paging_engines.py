"""The compiled paging core and the Python reference give the same kernel, counter for counter.

Every case builds the same guest three times -- the ``reference`` engine,
the ``compiled`` engine with the in-process disk and hypervisor (the whole
batch in C), and the ``compiled`` engine behind devices that must be
awaited (the path of a real guest, whose every disk request and EPT fault is
an RPC) -- drives all three through the same operations (reference batches
with writes, reclaim, balloon inflate and deflate, a host that takes frames
away, batches cut short by a deadline and carried over) and compares every
counter, every frame and page-table array, the free set, the soft-reclaim
list, the policy's state, the clock and the disk.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

import numpy as np
import pytest

from balloonlab.proto.costs import CostModel
from balloonlab.guestd.blockdev import LocalBlockDevice
from balloonlab.guestd.errors import OutOfMemory
from balloonlab.guestd.hypervisor import LocalHypervisor, NullHypervisor
from balloonlab.guestd.kernel import GuestKernel
from balloonlab.guestd.kernel_config import KernelConfig
from balloonlab.guestd.replacement import POLICIES
from balloonlab.guestd.workload import Layout, Region

U64 = np.uint64
ALL_POLICIES = sorted(POLICIES)


class AwaitedDisk:
    """``LocalBlockDevice``'s behaviour behind a real suspension point (not the type the core runs in-process)."""

    def __init__(self, n_blocks: int, meddle: "Meddler | None" = None) -> None:
        self.inner = LocalBlockDevice(n_blocks)
        self.n_blocks = n_blocks
        self.meddle = meddle

    async def read(self, blocks: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        await asyncio.sleep(0)
        if self.meddle:
            self.meddle()
        return await self.inner.read(blocks, vt_us)

    async def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> float:
        await asyncio.sleep(0)
        if self.meddle:
            self.meddle()
        return await self.inner.write(blocks, tokens, vt_us)


class AwaitedNull(NullHypervisor):
    """``NullHypervisor`` answered after a suspension point (a subclass: the core treats it as remote)."""

    async def ept_fault(self, gpfns: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        await asyncio.sleep(0)
        return await super().ept_fault(gpfns, vt_us)


class Meddler:
    """The host taking frames away (TLB shootdowns) while the guest waits for its disk: seeded, so the
    reference and the compiled core, which await at the same points, see the same shootdowns."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.kernel: GuestKernel | None = None
        self.hv: LocalHypervisor | None = None

    def __call__(self) -> None:
        k = self.kernel
        if k is None or self.hv is None or self.rng.random() > 0.3:
            return
        g = np.unique(self.rng.integers(0, k.frames.n, int(self.rng.integers(1, 6))))
        self.hv.swap_out(k, g)


def build(engine: str, policy: str, ram: int, regions: list[tuple[str, str, int]], *, kernel_pages: int,
          host: str, remote_disk: bool, meddle_seed: int | None, future: np.ndarray | None,
          costs: CostModel) -> tuple[GuestKernel, Any]:
    layout = Layout([Region(*r) for r in regions])
    params: dict[str, Any] = {"future": future} if policy == "opt" else {}
    cfg = KernelConfig(ram_pages=ram, layout=layout, policy=policy, policy_params=params,
                       kernel_pages=kernel_pages, ws_sample_pages=8, ws_period_us=500.0, fault_around_pages=4)
    meddler = Meddler(meddle_seed) if meddle_seed is not None else None
    disk: Any = AwaitedDisk(cfg.disk_blocks, meddler) if remote_disk else LocalBlockDevice(cfg.disk_blocks)
    hv: Any = {"null": NullHypervisor(), "awaited-null": AwaitedNull(), "local": LocalHypervisor(ram)}[host]
    k = GuestKernel(cfg, np.random.default_rng(3), disk, hv, costs, engine=engine,
                    log=_quiet_log())
    if meddler is not None:
        meddler.kernel = k
        meddler.hv = hv if isinstance(hv, LocalHypervisor) else None
    return k, hv


def _quiet_log() -> Any:
    import structlog
    return structlog.wrap_logger(logging.getLogger("test.engines.quiet"))


def snapshot(k: GuestKernel) -> dict[str, Any]:
    fr, pt = k.frames, k.pt
    out: dict[str, Any] = {
        "counters": k.counters.as_dict(), "vt_us": k.vt_us, "stats": k.stats(),
        "kind": fr.kind, "resident": fr.resident, "ref_bits": fr.ref_bits, "write_bits": fr.write_bits,
        "vpage": fr.vpage, "token": fr.token, "backed": fr.backed, "host_took": fr.host_took,
        "gpfn": pt.gpfn, "cached": pt.cached, "version": pt.version, "block": pt.block, "on_disk": pt.on_disk,
        "evicted": pt.evicted, "expect": pt.expect, "free_mask": k._free_mask, "ks": k._ks,
        "soft_prev": k._soft_prev, "soft_next": k._soft_next, "inval_gen": k._inval_gen,
        "balloon": list(k._balloon), "swap_used": k.swap.used,
    }
    disk = k.blockdev.inner if isinstance(k.blockdev, AwaitedDisk) else k.blockdev
    out.update(disk_tokens=disk.tokens, disk_io=disk.io_counts, disk_chans=disk.model.free_at_us,
               disk_acct=disk.model.acct)
    for name, value in vars(k.policy).items():
        if name in ("frames", "future", "nxt", "zero_zero_bits"):
            continue        # zero_zero_bits and esc's state[1]: the compiled core's own index (a superset, kept lazily)
        if name == "state" and k.policy.name == "esc":
            value = value[:1]
        out[f"policy.{name}"] = list(value) if hasattr(value, "__iter__") and not isinstance(value, np.ndarray) \
            else value
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y), f"{what}: {key} differs at {np.flatnonzero(np.asarray(x != y).ravel())[:10]}"
        else:
            assert x == y, f"{what}: {key}: {x!r} != {y!r}"


def script(seed: int, n_pages: int, n_ops: int) -> list[tuple[str, Any]]:
    """A seeded sequence of kernel operations over ``n_pages`` pages."""
    rng = np.random.default_rng(seed)
    ops: list[tuple[str, Any]] = []
    hot = max(1, n_pages // int(rng.integers(2, 8)))
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.7:
            n = int(rng.integers(1, 700))
            pages = np.where(rng.random(n) < 0.8, rng.integers(0, hot, n), rng.integers(0, n_pages, n))
            writes = rng.random(n) < rng.choice([0.0, 0.2, 0.6])
            deadline = float(rng.uniform(5, 400)) if rng.random() < 0.25 else None
            ops.append(("access", (pages.astype(U64), writes, deadline)))
        elif r < 0.78:
            ops.append(("reclaim", int(rng.integers(1, 12))))
        elif r < 0.86:
            ops.append(("inflate", int(rng.integers(1, 10))))
        elif r < 0.93:
            ops.append(("deflate", int(rng.integers(1, 12))))
        else:
            ops.append(("host_takes", rng.integers(0, 1 << 30, int(rng.integers(1, 8)))))
    return ops


def future_of(ops: list[tuple[str, Any]]) -> np.ndarray:
    return np.concatenate([a[0] for op, a in ops if op == "access"] + [np.zeros(0, U64)])


async def drive(k: GuestKernel, hv: Any, ops: list[tuple[str, Any]]) -> list[Any]:
    """Run ``ops``; a batch cut short by its deadline is finished by the next call (as the vCPU will)."""
    log: list[Any] = []
    for op, arg in ops:
        if op == "access":
            pages, writes, deadline = arg
            done = 0
            while done < pages.size:
                dl = None if deadline is None else k.vt_us + deadline
                got = await k.access(pages[done:], writes[done:], deadline_us=dl)
                assert 0 <= got <= pages.size - done
                if dl is not None and got < pages.size - done:
                    assert k.vt_us >= dl
                log.append(got)
                done += got
                if got == 0:
                    k.advance_to(k.vt_us + 1.0)   # the deadline had passed: the next tick
        elif op == "reclaim":
            log.append(await k.reclaim(arg))
        elif op == "inflate":
            room = k.config.ram_pages // 2 - len(k._balloon)    # leave the workload half of memory
            log.append((await k.balloon_alloc(min(arg, max(room, 0)))).tolist())
        elif op == "deflate":
            pick = k.balloon_pick(arg)
            k.balloon_release(pick)
            log.append(pick.tolist())
        elif op == "host_takes":
            g = np.unique(arg % k.frames.n)
            if isinstance(hv, LocalHypervisor):
                hv.swap_out(k, g)
            else:
                log.append(k.invalidate(g).tolist())
    return log


CASES = [
    # policy, ram, kernel_pages, regions, host
    (p, ram, kp, regions, host)
    for p in ALL_POLICIES
    for ram, kp, regions, host in [
        (48, 2, [("a", "anon", 90)], "local"),
        (64, 0, [("f", "file", 60), ("a", "anon", 70)], "local"),
        (40, 3, [("f", "file", 30), ("a", "anon", 40), ("g", "file", 20)], "null"),
    ]
]


@pytest.mark.parametrize("policy,ram,kernel_pages,regions,host", CASES)
def test_engines_agree_on_random_workloads(policy: str, ram: int, kernel_pages: int,
                                           regions: list[tuple[str, str, int]], host: str) -> None:
    """Random batches with writes, reclaim, balloon churn, host shootdowns and deadlines: identical kernels."""
    n_pages = sum(r[2] for r in regions)
    costs = CostModel()
    for seed in range(3):
        ops = script(seed * 101 + ram, n_pages, 60)
        fut = future_of(ops) if policy == "opt" else None
        runs = {}
        for name, engine, remote, h in [("reference", "reference", False, host),
                                        ("compiled-local", "compiled", False, host),
                                        ("compiled-awaited", "compiled", True,
                                         "awaited-null" if host == "null" else host)]:
            k, hv = build(engine, policy, ram, regions, kernel_pages=kernel_pages, host=h, remote_disk=remote,
                          meddle_seed=None, future=fut, costs=costs)
            log = asyncio.run(drive(k, hv, ops))
            runs[name] = (snapshot(k), log, k)
        ref_state, ref_log, ref_k = runs["reference"]
        assert ref_k.counters.refs == fut.size if fut is not None else True
        assert ref_k.counters.major_faults + ref_k.counters.minor_faults > 0
        for name in ("compiled-local", "compiled-awaited"):
            state, log, _ = runs[name]
            assert log == ref_log, f"{policy} seed {seed}: {name} returned different results"
            assert_same(ref_state, state, f"{policy} seed {seed} {name}")


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_engines_agree_when_the_host_takes_frames_during_disk_waits(policy: str) -> None:
    """Shootdowns land while a fault is suspended on the disk (the kernel's concurrency contract)."""
    regions = [("f", "file", 40), ("a", "anon", 60)]
    ops = script(7, 100, 80)
    fut = future_of(ops) if policy == "opt" else None
    states = []
    for engine in ("reference", "compiled"):
        k, hv = build(engine, policy, 44, regions, kernel_pages=1, host="local", remote_disk=True,
                      meddle_seed=99, future=fut, costs=CostModel())
        log = asyncio.run(drive(k, hv, ops))
        states.append((snapshot(k), log))
    assert states[0][1] == states[1][1]
    assert states[0][0]["counters"]["host_took_pages"] > 0
    assert_same(states[0][0], states[1][0], f"{policy} meddled")


def test_lost_pages_are_counted_the_same() -> None:
    """A host that loses what it took (NullHypervisor answers zero tokens): each loss counted once, either way."""
    regions = [("a", "anon", 30)]
    counts = []
    for engine in ("reference", "compiled"):
        k, _ = build(engine, "clock", 32, regions, kernel_pages=0, host="null", remote_disk=False,
                     meddle_seed=None, future=None, costs=CostModel())

        async def run() -> None:
            await k.access(np.arange(30, dtype=U64), np.ones(30, bool))
            k.invalidate(np.arange(0, 32, 3))
            await k.access(np.arange(30, dtype=U64))
            await k.access(np.arange(30, dtype=U64))
        asyncio.run(run())
        counts.append((k.counters.lost_pages, snapshot(k)))
    assert counts[0][0] == counts[1][0] == 10
    assert_same(counts[0][1], counts[1][1], "lost pages")


def test_out_of_memory_and_the_oom_hook_agree() -> None:
    for engine in ("reference", "compiled"):
        k, _ = build(engine, "esc", 6, [("a", "anon", 10)], kernel_pages=1, host="null", remote_disk=False,
                     meddle_seed=None, future=None, costs=CostModel())
        calls: list[int] = []

        async def run() -> None:
            await k.balloon_alloc(5)
            with pytest.raises(OutOfMemory, match="balloon_pages=5"):
                await k.access(np.array([0], U64))

            async def on_oom(n: int) -> None:
                calls.append(n)
                k.balloon_release(k.balloon_pick(2))
            k.on_oom = on_oom
            assert await k.access(np.array([0, 1, 2, 0], U64), np.array([1, 0, 1, 0], bool)) == 4
        asyncio.run(run())
        assert calls == [1] and k.counters.oom_calls == 1 and k.counters.refs == 4, engine


@pytest.mark.parametrize("engine", ["reference", "compiled"])
def test_deadline_stops_before_the_first_late_reference(engine: str) -> None:
    """References start only while the clock is below the deadline; a fault started in time completes."""
    costs = CostModel(mem_ref_us=1.0, minor_fault_us=10.0, page_zero_us=0.0)
    k, _ = build(engine, "clock", 64, [("a", "anon", 64)], kernel_pages=0, host="null", remote_disk=False,
                 meddle_seed=None, future=None, costs=costs)

    async def run() -> None:
        await k.access(np.arange(8, dtype=U64))             # 8 faults: 8 * 11 µs
        assert k.vt_us == 88.0
        hits = np.tile(np.arange(8, dtype=U64), 100)
        assert await k.access(hits, deadline_us=100.0) == 12          # starts at 88..99
        assert k.vt_us == 100.0
        assert await k.access(hits, deadline_us=100.0) == 0           # already there: nothing starts
        assert await k.access(hits, deadline_us=100.5) == 1           # 100.0 < 100.5: one more
        # a fault that starts before the deadline completes past it
        assert await k.access(np.array([20, 1, 2], U64), deadline_us=101.5) == 1
        assert k.vt_us == 112.0
        assert await k.access(hits[:5], deadline_us=None) == 5        # no deadline: the whole batch
    asyncio.run(run())
    assert k.counters.refs == 8 + 12 + 1 + 1 + 5


def test_deadline_leaves_the_same_state_as_running_the_batch_in_pieces() -> None:
    """Cutting a batch at the deadline and running the rest later equals running the same pieces whole."""
    costs = CostModel()
    ops = script(5, 150, 40)
    snaps = []
    for engine in ("reference", "compiled"):
        k, hv = build(engine, "esc", 50, [("f", "file", 50), ("a", "anon", 100)], kernel_pages=0, host="null",
                      remote_disk=False, meddle_seed=None, future=None, costs=costs)
        asyncio.run(drive(k, hv, ops))
        snaps.append(snapshot(k))
    assert_same(snaps[0], snaps[1], "deadline pieces")


def test_bad_deadline_is_a_typed_error() -> None:
    from balloonlab.guestd.errors import BadPages
    k, _ = build("compiled", "clock", 8, [("a", "anon", 8)], kernel_pages=0, host="null", remote_disk=False,
                 meddle_seed=None, future=None, costs=CostModel())
    with pytest.raises(BadPages, match="deadline_us must be a number"):
        asyncio.run(k.access(np.arange(3, dtype=U64), deadline_us=float("nan")))
    with pytest.raises(BadPages, match="deadline_us must be a number"):
        asyncio.run(k.access(np.arange(3, dtype=U64), deadline_us="soon"))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lackey_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """A real program's references: GNU sort under valgrind lackey (recorded here, 150k references)."""
    if shutil.which("valgrind") is None or shutil.which("sort") is None:
        pytest.skip("valgrind or sort not installed")
    from balloonlab.guestd.workload.lackey import record_lackey
    d = tmp_path_factory.mktemp("lackey")
    words = d / "words.txt"
    rng = np.random.default_rng(1)
    words.write_text("\n".join(str(x) for x in rng.integers(0, 10**9, 3000)) + "\n")
    tr = record_lackey(["sort", str(words)], d / "sort.npz", max_refs=150_000, skip_refs=20_000)
    _, dense = np.unique(tr.pages, return_inverse=True)
    return dense.astype(U64), tr.writes


@pytest.mark.parametrize("policy", ["clock", "esc", "clock-r0", "fifo", "lru"])
def test_engines_agree_on_a_real_trace(policy: str, lackey_trace: tuple[np.ndarray, np.ndarray]) -> None:
    """A lackey trace at frame counts with a few percent and with about ten percent misses."""
    from balloonlab.guestd.fastsim import simulate_fast
    from balloonlab.guestd.replay import replay_kernel
    pages, writes = lackey_trace
    n_pages = int(pages.max()) + 1
    for frames in (max(4, n_pages // 2), max(4, n_pages // 8)):
        a = replay_kernel(policy, frames, pages, writes, engine="reference")
        b = replay_kernel(policy, frames, pages, writes, engine="compiled")
        c = simulate_fast(policy, frames, pages, writes)
        assert (a.faults, a.writebacks) == (b.faults, b.writebacks) == (c.faults, c.writebacks), (policy, frames)
        assert a.faults > 0


@pytest.mark.parametrize("policy", ["clock", "esc", "fifo", "lru", "car"])
def test_engines_agree_with_shared_frames(policy: str) -> None:
    """The host shares random resident frames between batches; writes and fills break them (copy-on-write)."""
    regions = [("f", "file", 40), ("a", "anon", 60)]
    ops = script(11, 100, 80)
    states = []
    for engine, remote in (("reference", False), ("compiled", False), ("compiled", True)):
        k, hv = build(engine, policy, 48, regions, kernel_pages=1, host="local", remote_disk=remote,
                      meddle_seed=None, future=None, costs=CostModel())
        rng = np.random.default_rng(5)

        async def run() -> list[Any]:
            log: list[Any] = []
            for op in ops:
                got = await drive(k, hv, [op])
                if op[0] == "inflate":       # the driver would tell the host: it drops their sharing
                    await hv.balloon_inflate(np.asarray(got[0], np.int64), k.vt_us)
                log += got
                cand = np.flatnonzero(k.share_peek(np.arange(k.frames.n, dtype=U64)) != U64(0xFFFF_FFFF_FFFF_FFFF))
                if cand.size:
                    hv.share(k, rng.choice(cand, min(cand.size, int(rng.integers(1, 12))), replace=False))
            return log
        log = asyncio.run(run())
        states.append((snapshot(k), log, k.cow_faults, k.frames.wp.copy(), hv.cow_breaks))
    ref = states[0]
    assert ref[2] > 20 and ref[2] == ref[4], "writes and fills broke shared frames, each once at the host"
    assert ref[0]["counters"]["lost_pages"] == 0
    for other in states[1:]:
        assert other[1] == ref[1] and other[2] == ref[2] and np.array_equal(other[3], ref[3])
        assert_same(ref[0], other[0], f"{policy} shared")
