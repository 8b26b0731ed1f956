"""Read chains: file reads the paging core knows will follow a read, served with it (hostd/readchain.py).

The chain must change nothing but the number of round trips: the paging
core with chains and without ends in the same state, array for array and
clock for clock, through deadlines that cut batches mid-chain, evictions
and every compiled policy; the host refuses a malformed program before it
serves anything; and a real run with chains has the counts of one with
``host.read_chain = 0``.
"""
from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from balloonlab.guestd.errors import ReadChainDiverged
from balloonlab.guestd.gate import VcpuGate, VcpuStopped
from balloonlab.proto.messages import TickStart
from balloonlab.hostd.errors import BadBatch
from balloonlab.hostd.readchain import (ADD, CHECK, EPT, EPT_PAGE, MAX_PAIRS, READ, WIN, _check_program, _checked,
                                        check_program, run_chain)
from balloonlab.proto.costs import CostModel
from tests.procs import run_launcher
from balloonlab.guestd.hypervisor import LocalHypervisor
from balloonlab.guestd.kernel import GuestKernel
from balloonlab.guestd.kernel_config import KernelConfig
from balloonlab.guestd.workload import Layout, Region
from tests.test_paging_engines import AwaitedDisk, AwaitedNull, _quiet_log, assert_same, snapshot


def _now(run: Any) -> Any:
    """The value of a coroutine that never suspends (the in-process models' requests)."""
    try:
        run.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("an in-process request suspended")


class ColdHost(LocalHypervisor):
    """A host that backs nothing before the guest faults it, as hostd does; each fault answered after a
    suspension point and recorded as a vCPU stall, as the remote link records it."""

    backs_all_initially = False

    def __init__(self, n_frames: int, costs: CostModel, stalls: list[tuple[float, float]]) -> None:
        super().__init__(n_frames, costs)
        self.stalls = stalls
        self.calls = 0

    async def ept_fault(self, gpfns: np.ndarray, vt_us: float,
                        fresh: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        self.calls += 1
        await asyncio.sleep(0)
        tokens, done = _now(super().ept_fault(gpfns, vt_us, fresh))
        self.stalls.append((vt_us, done))
        return tokens, done


class ModelDisk(AwaitedDisk):
    """A remote disk in process: each request answered after a suspension point by the disk model; with
    ``chain`` > 0 it serves read chains as the host does (``run_chain`` over the same models)."""

    def __init__(self, n_blocks: int, chain: int) -> None:
        super().__init__(n_blocks)
        self.chain = chain
        self.requests = 0
        self.stalls: list[tuple[float, float]] = []     # what the vCPU's link records per paging request
        self.link = SimpleNamespace(gate_requests=False, took=lambda vt, done: self.stalls.append((vt, done)))
        self.chained = 0
        self.chained_faults = 0
        self.ahead = 0          # requests answered before their batch ran (``_serve_ahead``)
        self.host: LocalHypervisor | None = None        # the EPT faults a chain carries go here

    def _read_now(self, blk: int, vt: float) -> tuple[int, float]:
        inner = self.inner
        inner.io_counts[0] += 1
        inner.io_counts[2] += 1
        return int(inner.tokens[blk]), float(inner.model.submit(vt, 1))

    def _fault_now(self, gpfns: list[int], vt: float) -> tuple[list[int], float, bool]:
        assert self.host is not None
        self.chained_faults += 1
        tokens, done = _now(LocalHypervisor.ept_fault(self.host, np.array(gpfns, np.int64), vt,
                                                      np.ones(len(gpfns), bool)))
        return tokens.tolist(), float(done), False

    async def read_one(self, blk: int, vt_us: float) -> tuple[int, float]:
        self.requests += 1
        await asyncio.sleep(0)
        tok, done = self._read_now(blk, vt_us)
        self.stalls.append((vt_us, done))
        return tok, done

    async def read_chain(self, blk: int, vt_us: float, chain: bytes) -> tuple[int, float, np.ndarray, list[float]]:
        """``RemoteBlockDevice.read_chain``'s reply, as a host serves it (the kernel books the stall)."""
        self.requests += 1
        prog = check_program(0, chain)
        await asyncio.sleep(0)
        tok, done = self._read_now(blk, vt_us)
        faults = self.chained_faults
        toks, times = run_chain(prog, vt_us, tok, done, self.chain, math.inf, self._read_now,
                                self._fault_now if self.host is not None else None)
        self.chained += (len(times) - 1) // 2 - (self.chained_faults - faults)
        return toks[0], times[0], np.array(toks[1:], np.uint64), times[1:]


def _kernel(policy: str, ram: int, chain: int, ref_us: float = 0.1, cold: bool = False) -> Any:
    """A guest kernel on the model disk; ``cold``: on a host that backs frames only when they fault."""
    costs = CostModel(mem_ref_us=ref_us, page_zero_us=1.5, minor_fault_us=0.7)
    layout = Layout([Region("db", "file", 96), Region("log", "file", 64), Region("heap", "anon", 96)])
    cfg = KernelConfig(ram_pages=ram, layout=layout, policy=policy, kernel_pages=8, ws_sample_pages=8,
                       ws_period_us=500.0, fault_around_pages=6)
    disk = ModelDisk(cfg.disk_blocks, chain)
    host: Any = ColdHost(ram, costs, disk.stalls) if cold else AwaitedNull()
    if cold:
        disk.host = host
    k = GuestKernel(cfg, np.random.default_rng(3), disk, host, costs, engine="compiled", log=_quiet_log())
    k.enable_read_chain(chain)
    return k


def _serve_ahead(k: Any, deadline: float, pages: np.ndarray, writes: np.ndarray) -> int:
    """What a host does with ``TickDone.ahead``: the batch's first requests served before it runs, over the
    same models; the answers handed to the kernel. How many requests were answered."""
    prog = k.ahead_program(pages, writes, deadline)
    if prog is None:
        return 0
    disk = k.blockdev
    faults = disk.chained_faults        # (counted here as answered ahead, not as chained)
    toks, times = run_chain(check_program(0, prog), k.vt_us, None, None, disk.chain, math.inf, disk._read_now,
                            disk._fault_now if disk.host is not None else None)
    disk.chained_faults = faults
    disk.ahead += k.answered_ahead(prog, np.array(toks, np.uint64), times)
    return len(times) // 2


async def _drive(k: Any, seed: int, ticks: int, tick_us: float, ahead: bool = False) -> None:
    """Batches cut at each tick's end, as the vCPU's gate cuts them; the rest runs in the next tick.
    ``ahead``: each tick's batch has its first requests answered before it runs (``TickDone.ahead``)."""
    rng = np.random.default_rng(seed)
    n = k.pt.gpfn.size
    pending = np.zeros(0, np.int64)
    pending_w = np.zeros(0, bool)
    for t in range(ticks):
        if pending.size < 400:
            hot = rng.integers(0, n, 40)
            pages = np.where(rng.random(600) < 0.5, rng.choice(hot, 600), rng.integers(0, n, 600))
            pending = np.concatenate([pending, pages.astype(np.int64)])
            pending_w = np.concatenate([pending_w, rng.random(600) < 0.2])
        k.vt_us = max(k.vt_us, t * tick_us)
        if ahead:
            _serve_ahead(k, (t + 1) * tick_us, pending, pending_w)
        done = await k.access(pending, pending_w, deadline_us=(t + 1) * tick_us)
        pending, pending_w = pending[done:], pending_w[done:]


@pytest.mark.parametrize("policy", ["clock", "esc", "fifo", "lru"])
@pytest.mark.parametrize("ram", [288, 200, 40], ids=["roomy", "tight", "tiny"])
@pytest.mark.parametrize("tick_us, ref_us", [(150.0, 0.1), (1000.0, 0.1), (700.0, 13.7)])
@pytest.mark.parametrize("cold", [False, True], ids=["backed", "cold"])
def test_a_chain_changes_nothing_but_the_round_trips(policy: str, ram: int, tick_us: float, ref_us: float,
                                                     cold: bool) -> None:
    """With references of 13.7 µs a tick's end falls inside runs of hits between two reads, where the
    host's check of the run's last reference decides whether the next read is the guest's. On a cold
    host the chains carry the fault-around EPT faults of the free frames they fill."""
    plain, chained = _kernel(policy, ram, 0, ref_us, cold), _kernel(policy, ram, 64, ref_us, cold)
    assert plain.read_chain == 0 and chained.read_chain == 64
    asyncio.run(_drive(plain, 7, 60, tick_us))
    asyncio.run(_drive(chained, 7, 60, tick_us))
    assert_same(snapshot(plain), snapshot(chained), f"{policy} ram={ram} tick={tick_us} ref={ref_us}")
    # every read's and fault's start and completion, in order
    assert plain.blockdev.stalls == chained.blockdev.stalls
    assert chained.blockdev.chained > 0
    saved = chained.blockdev.chained + chained.blockdev.chained_faults
    assert chained.blockdev.requests + saved == plain.blockdev.requests + (
        plain.hypervisor.calls - chained.hypervisor.calls if cold else 0)
    if cold:
        assert chained.blockdev.chained_faults > 0
        assert chained.hypervisor.calls + chained.blockdev.chained_faults == plain.hypervisor.calls


@pytest.mark.parametrize("policy", ["clock", "esc", "fifo", "lru"])
@pytest.mark.parametrize("ram", [288, 200, 40], ids=["roomy", "tight", "tiny"])
@pytest.mark.parametrize("tick_us, ref_us", [(150.0, 0.1), (1000.0, 0.1), (700.0, 13.7)])
@pytest.mark.parametrize("cold", [False, True], ids=["backed", "cold"])
def test_a_batch_answered_ahead_changes_nothing_but_the_round_trips(policy: str, ram: int, tick_us: float,
                                                                    ref_us: float, cold: bool) -> None:
    """Each batch's first requests, from its first reference on, served before it runs and replayed: the
    same books, counters, clock and stalls as one request at a time; the requests answered ahead are ones
    the guest does not send."""
    plain, ahead = _kernel(policy, ram, 0, ref_us, cold), _kernel(policy, ram, 64, ref_us, cold)
    asyncio.run(_drive(plain, 7, 60, tick_us))
    asyncio.run(_drive(ahead, 7, 60, tick_us, ahead=True))
    assert_same(snapshot(plain), snapshot(ahead), f"{policy} ram={ram} tick={tick_us} ref={ref_us}")
    assert plain.blockdev.stalls == ahead.blockdev.stalls
    assert ahead.blockdev.ahead > 0
    sent = ahead.blockdev.requests + (ahead.hypervisor.calls if cold else 0)
    saved = ahead.blockdev.ahead + ahead.blockdev.chained + ahead.blockdev.chained_faults
    assert sent + saved == plain.blockdev.requests + (plain.hypervisor.calls if cold else 0)


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
@pytest.mark.parametrize("ahead", [False, True], ids=["chains", "ahead"])
def test_answers_are_replayed_in_the_compiled_core(monkeypatch: pytest.MonkeyPatch, ahead: bool,
                                                   cold: bool) -> None:
    """The answers a chain or a batch ahead brought -- reads, and on a cold host first-touch EPT faults --
    are replayed by the core, many in one call (``GuestKernel._replay_compiled``); the books and stalls
    are those of one request at a time (the tests above), and it is that call that replays nearly all."""
    used: list[int] = []
    real = GuestKernel._replay_compiled

    def counting(self: Any, core: Any, chained: list[Any]) -> Any:
        before = len(chained)
        out = real(self, core, chained)
        used.append(before - len(chained))
        return out

    monkeypatch.setattr(GuestKernel, "_replay_compiled", counting)
    plain, k = _kernel("clock", 200, 0, cold=cold), _kernel("clock", 200, 64, cold=cold)
    asyncio.run(_drive(plain, 7, 60, 1000.0))
    asyncio.run(_drive(k, 7, 60, 1000.0, ahead=ahead))
    assert_same(snapshot(plain), snapshot(k), f"ahead={ahead} cold={cold}")
    assert plain.blockdev.stalls == k.blockdev.stalls
    replayed = k.blockdev.ahead + k.blockdev.chained + k.blockdev.chained_faults
    assert sum(used) > 0.9 * replayed and max(used) >= 5, (sum(used), replayed, max(used, default=0))
    if cold:   # first touches answered with the reads, not sent: their fresh pages counted the same
        assert k.hypervisor.calls < plain.hypervisor.calls, (k.hypervisor.calls, plain.hypervisor.calls)
        assert k.counters.ept_fresh_pages == plain.counters.ept_fresh_pages > 0


def test_the_compiled_answer_list_is_the_python_one() -> None:
    """``answered_ahead``'s replay list built compiled (``_paging.ahead_answers``) from random programs --
    reads, faults of 0 to 3 pages, pages with a read among them, clock steps -- and as many answers as
    there are requests or fewer, or answers that do not fit (which the Python replay refuses): the same
    list, or the same refusal."""
    from balloonlab.guestd import _paging
    rng = np.random.default_rng(5)
    k = SimpleNamespace(_ahead=None)
    compiled = 0
    for _ in range(3000):
        prog: list[float] = [1e4, 0.5]
        for _ in range(int(rng.integers(0, 40))):
            r = rng.random()
            if r < 0.4:
                prog += [float(rng.choice([WIN, CHECK, ADD])), float(rng.integers(0, 9))]
            elif r < 0.7:
                prog += [READ, float(rng.integers(0, 4000))]
            else:
                n = int(rng.integers(0, 4))
                for j in range(n):
                    prog += [EPT_PAGE, float(rng.integers(0, 4000))]
                    if rng.random() < 0.1:
                        prog += [READ, float(rng.integers(0, 4000))]
                prog += [EPT, float(n)]
        data = np.array(prog, "<f8").tobytes()
        asked = [q for q in _python_asked(data)]
        m = int(rng.integers(0, len(asked) + 1)) + (1 if rng.random() < 0.05 else 0)
        n_tok = sum(len(q) if type(q) is tuple else 1 for q in asked[:m]) + (1 if rng.random() < 0.05 else 0)
        tokens = rng.integers(0, 2**63, n_tok, dtype=np.uint64)
        times = rng.random(2 * m + (1 if rng.random() < 0.03 else 0)).tolist()
        results = []
        # contiguous: the compiled list; a strided view of the same tokens: the Python one
        for toks in (tokens, np.repeat(tokens, 2)[::2]):
            k._ahead = None
            try:
                results.append((GuestKernel.answered_ahead(k, data, toks, times), k._ahead))
            except ReadChainDiverged as exc:
                results.append(("refused", str(exc)))
        assert results[0] == results[1]
        compiled += _paging.ahead_answers(data, tokens, times) is not None
    assert compiled > 1500


class _ReplyLink:
    """A guest's link to the host that answers every call with one reply and records the stalls booked."""

    gate_requests = False

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.stalls: list[tuple[float, float]] = []

    async def call(self, msg: Any, vt_us: float, stall: bool = True) -> Any:
        return self.reply

    def took(self, vt_us: float, done_us: float) -> None:
        self.stalls.append((vt_us, done_us))


def test_a_remote_chain_s_answers_are_paired_with_its_requests_in_one_compiled_pass() -> None:
    """The remote disk hands a chain's reply over as it came (``read_chain``) and the kernel pairs it with
    the program's requests in one compiled pass (``_paging.ahead_answers``): each request with its start,
    completion and tokens, last first, and the first read's stall booked; a reply that does not fit the
    program is refused before any stall is booked."""
    from balloonlab.guestd.remote import RemoteBlockDevice
    from balloonlab.proto.errors import ProtoError
    from balloonlab.proto.messages import DiskReadReply
    prog = np.array([1e4, 0.5, READ, 7, WIN, 2, EPT_PAGE, 40, EPT_PAGE, 41, EPT, 2, READ, 9], "<f8").tobytes()

    def reply(tokens: list[int], times: list[float]) -> Any:
        return DiskReadReply(np.array(tokens, np.uint64), times[-1] if times else 5.0,
                             np.array(times, "<f8").tobytes())

    cases = {   # tokens, times -> the answers chained, last first
        "two of three": (([100, 101, 102, 103], [5.0, 6.0, 7.0, 8.0, 9.0]),
                         [((40, 41), 8.0, 9.0, [102, 103]), (7, 6.0, 7.0, [101])]),
        "all": (([100, 101, 102, 103, 104], [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]),
                [(9, 10.0, 11.0, [104]), ((40, 41), 8.0, 9.0, [102, 103]), (7, 6.0, 7.0, [101])]),
        "none": (([100], []), []),
    }
    for name, ((tokens, times), want) in cases.items():
        link = _ReplyLink(reply(tokens, times))
        k = SimpleNamespace(blockdev=RemoteBlockDevice(None, 64, link), vt_us=1.0)
        chained: list[Any] = []
        assert asyncio.run(GuestKernel._read_chain(k, 3, prog, chained)) == (100, 5.0), name
        assert chained == want, name
        assert link.stalls == [(1.0, 5.0)], name
    for tokens in ([100, 101, 102], [100, 101, 102, 103, 104]):     # the fault's second token missing; one extra
        link = _ReplyLink(reply(tokens, [5.0, 6.0, 7.0, 8.0, 9.0]))
        k = SimpleNamespace(blockdev=RemoteBlockDevice(None, 64, link), vt_us=1.0)
        with pytest.raises(ProtoError, match=f"{len(tokens)} tokens and 5 chain times for a chain of 3 requests"):
            asyncio.run(GuestKernel._read_chain(k, 3, prog, []))
        assert link.stalls == []


def test_the_core_counts_a_faults_fresh_frames_as_the_kernel_does() -> None:
    """``Core.count_fresh`` (a replayed fault's check) against ``GuestKernel._fresh`` over frames of every
    kind: free, holding a page, the kernel's and the balloon's."""
    k = _kernel("clock", 200, 64, cold=True)
    asyncio.run(_drive(k, 7, 10, 1000.0))
    asyncio.run(k.balloon_alloc(5))
    core, fr = k._core, k.frames
    kinds = {int(x) for x in fr.kind}
    assert len(kinds) >= 4, kinds     # free, anon, file, the kernel's and the balloon's
    most = next(n for n in range(1, 64) if _refuses(core, n + 1))      # the last fault's size
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(1, most + 1))
        k._ept_gs[:n] = rng.integers(0, fr.n, n).astype(np.uint64)
        fresh = int(np.count_nonzero(k._fresh(k._ept_gs[:n])))
        assert core.count_fresh(n) == fresh


def _refuses(core: Any, n: int) -> bool:
    try:
        core.count_fresh(n)
    except ValueError:
        return True
    return False


def _python_asked(prog: bytes) -> list[Any]:
    from balloonlab.guestd.kernel import _asked
    return _asked(prog)


def test_chains_stop_where_the_deadline_cuts_the_batch() -> None:
    """Ticks of 150 µs end inside chains: the host's checks stop them exactly where the core stops."""
    k = _kernel("clock", 288, 64)
    asyncio.run(_drive(k, 3, 60, 150.0))
    long = _kernel("clock", 288, 64)
    asyncio.run(_drive(long, 3, 9, 6000.0))
    per_request_short = k.blockdev.chained / k.blockdev.requests
    per_request_long = long.blockdev.chained / long.blockdev.requests
    assert per_request_short < per_request_long


@pytest.mark.parametrize("policy", ["clock", "esc", "fifo", "lru"])
def test_a_chain_goes_on_through_clean_evictions_and_stops_at_a_dirty_one(policy: str) -> None:
    """Memory full of clean file pages; then one batch writes a new page and reads 38 more: every miss
    evicts. The walk picks each victim with the policy's own scan on copies of its state. Clock, FIFO
    and LRU come to the written page as their 32nd victim: it is dirty, its write-back is a request of
    the guest's own, and the chain stops before it; ESC spares it (a modified page goes last)."""
    runs = {}
    for chain in (0, 64):
        k = _kernel(policy, 40, chain)
        free = int(np.count_nonzero(k.frames.kind == 0))
        fill = np.arange(free, dtype=np.int64)                 # the db file's first pages: memory full
        asyncio.run(k.access(fill, np.zeros(free, bool)))
        assert int(np.count_nonzero(k.frames.kind == 0)) == 0
        before = (k.blockdev.requests, k.blockdev.chained, int(k.counters.evictions))
        pages = np.arange(free, free + 39, dtype=np.int64)
        writes = np.zeros(39, bool)
        writes[0] = True
        asyncio.run(k.access(pages, writes))
        runs[chain] = (k, before)
    (plain, p0), (chained, c0) = runs[0], runs[64]
    assert_same(snapshot(plain), snapshot(chained), policy)
    assert plain.blockdev.stalls == chained.blockdev.stalls
    assert int(chained.counters.evictions) - c0[2] == 39
    assert int(chained.counters.writebacks) == (0 if policy == "esc" else 1)
    assert chained.blockdev.chained - c0[1] >= 30          # the reads behind clean evictions went in chains
    assert chained.blockdev.requests - c0[0] <= plain.blockdev.requests - p0[0] - 30


def test_a_chain_evicts_in_fifo_load_order_not_frame_order() -> None:
    """FIFO evicts by load order. Here the first page the batch loads lands in the highest frame (freed
    by a discard), so after the 31 pages loaded before the batch, the walk's 32nd victim is that frame,
    not the lowest of the frames the walk filled since; the batch then touches both pages again, and
    which of them misses decides the chain's reads: the walk must keep the load order as it loads."""
    runs = {}
    for chain in (0, 64):
        k = _kernel("fifo", 40, chain)
        free = int(np.count_nonzero(k.frames.kind == 0))
        asyncio.run(k.access(np.arange(free - 1, dtype=np.int64), np.zeros(free - 1, bool)))
        heap = 160                                              # the first anonymous page (Region "heap")
        asyncio.run(k.access(np.array([heap], np.int64), np.ones(1, bool)))
        assert int(np.count_nonzero(k.frames.kind == 0)) == 0
        top = int(k.pt.gpfn[heap])
        assert top == int(k.pt.gpfn[:free - 1].max()) + 1      # the highest frame in use
        asyncio.run(k.discard(np.array([heap], np.int64)))
        before = k.blockdev.chained
        first = free - 1
        pages = np.concatenate([np.arange(first, first + 33), [first, first + 1]]).astype(np.int64)
        asyncio.run(k.access(pages, np.zeros(pages.size, bool)))
        runs[chain] = (k, before)
    (plain, _), (chained, c0) = runs[0], runs[64]
    assert_same(snapshot(plain), snapshot(chained), "fifo")
    assert plain.blockdev.stalls == chained.blockdev.stalls
    assert chained.blockdev.chained - c0 >= 32


def test_a_limit_of_one_chains_one_read_at_most() -> None:
    k = _kernel("clock", 288, 1)
    asyncio.run(_drive(k, 5, 20, 1000.0))
    assert 0 < k.blockdev.chained <= k.blockdev.requests


@pytest.mark.parametrize("late", ["each", "the third"])
def test_an_answer_the_core_does_not_ask_for_stops_the_run(late: str) -> None:
    """A host that answers a read the guest would not have sent: the guest says so and stops, whether the
    answer is the first after the read's own (replayed in Python) or one the core replays in a run."""
    k = _kernel("clock", 288, 64)
    disk = k.blockdev
    real = disk.read_chain
    lied = []

    async def lying(blk: int, vt_us: float, chain: bytes) -> Any:
        tok, done, rest, times = await real(blk, vt_us, chain)     # times: a start and a completion each
        if late == "each":
            return tok, done, rest, [t + 1.0 if i % 2 == 0 else t for i, t in enumerate(times)]   # one µs late
        if len(times) >= 6:
            lied.append(len(times) // 2)
            times = [t + 1.0 if i == 4 else t for i, t in enumerate(times)]     # the third one's start
        return tok, done, rest, times
    disk.read_chain = lying
    with pytest.raises(ReadChainDiverged, match="answered a read of block"):
        asyncio.run(_drive(k, 7, 20, 1000.0))
    assert late == "each" or lied


def test_a_run_that_ends_while_answers_are_on_their_way_stops_the_vcpu_as_a_request_would() -> None:
    """The host ends the run (RunEnd stops the vCPU's gate) after answering a chain: the next request the
    core makes would stop at the gate, so the replay stops there too, not as a divergence."""
    k = _kernel("clock", 288, 64)
    gate = VcpuGate()
    gate.open(TickStart(0, 0.0, 10**9))
    disk = k.blockdev
    disk.link = SimpleNamespace(gate_requests=True, gate=gate, took=lambda vt, done: None)
    real = disk.read_chain

    async def ending(blk: int, vt_us: float, chain: bytes) -> Any:
        got = await real(blk, vt_us, chain)
        if got[3]:      # requests chained after the read
            gate.stop("run ended")
        return got
    disk.read_chain = ending
    with pytest.raises(VcpuStopped, match="run ended"):
        asyncio.run(_drive(k, 7, 20, 1000.0))


def _program(*ops: tuple[int, float], deadline: float = 1e9, ref_us: float = 0.5) -> list[float]:
    return check_program(0, np.array([deadline, ref_us, *[x for op in ops for x in op]], "<f8").tobytes())


def test_the_host_runs_the_program_as_the_core_counts() -> None:
    served: list[tuple[int, float]] = []

    def read(blk: int, vt: float) -> tuple[int, float]:
        served.append((blk, vt))
        return 100 + blk, vt + 10.0

    prog = _program((ADD, 0.5), (WIN, 4.0), (CHECK, 0.0), (READ, 7.0), (ADD, 0.5), (WIN, 1.0), (CHECK, 0.0),
                    (READ, 9.0), deadline=40.0)
    toks, times = run_chain(prog, 1.0, 55, 20.0, 64, 1e9, read)
    # after the first read (done 20): +0.5, a run of 4 hits (+2.0), read 7 at 22.5 (done 32.5), +0.5 +0.5,
    # read 9 at 33.5
    assert served == [(7, 22.5), (9, 33.5)] and toks == [55, 107, 109]
    assert times == [20.0, 22.5, 32.5, 33.5, 43.5]
    served.clear()
    # a run of hits whose last reference starts at the deadline stops the chain before it
    toks, times = run_chain(_program((WIN, 5.0), (CHECK, 0.0), (READ, 7.0), deadline=22.0), 1.0, 55, 20.0,
                            64, 1e9, read)
    assert served == [] and toks == [55] and times == [20.0]
    # so does a read whose clock is at the deadline (the core starts nothing at or past it)
    toks, _ = run_chain(_program((ADD, 2.0), (CHECK, 0.0), (READ, 7.0), deadline=22.0), 1.0, 55, 20.0, 64, 1e9,
                        read)
    assert served == [] and toks == [55]
    # the host's own gate, the limit, and a read it cannot serve now stop it too
    assert run_chain(prog, 1.0, 55, 20.0, 64, 22.0, read)[0] == [55]
    assert run_chain(prog, 1.0, 55, 20.0, 1, 1e9, read)[0] == [55, 107]
    assert run_chain(prog, 1.0, 55, 20.0, 64, 1e9, lambda b, v: None)[0] == [55]


def test_the_host_runs_a_chained_fault_and_stops_after_one_the_gate_cut() -> None:
    faults: list[tuple[list[int], float]] = []

    def read(blk: int, vt: float) -> tuple[int, float]:
        return 100 + blk, vt + 10.0

    def fault(gpfns: list[int], vt: float) -> tuple[list[int], float, bool]:
        faults.append((gpfns, vt))
        return [0] * len(gpfns), vt + 3.0, len(faults) == 2

    prog = _program((EPT_PAGE, 5.0), (EPT_PAGE, 6.0), (EPT, 2.0), (ADD, 0.5), (CHECK, 0.0), (READ, 7.0),
                    (EPT_PAGE, 9.0), (EPT, 1.0), (ADD, 0.5), (CHECK, 0.0), (READ, 8.0))
    toks, times = run_chain(prog, 1.0, 55, 20.0, 64, 1e9, read, fault)
    # the fault at 20 (done 23), +0.5, read 7 at 23.5 (done 33.5), the fault at 33.5: cut short, so no read 8
    assert faults == [([5, 6], 20.0), ([9], 33.5)]
    assert toks == [55, 0, 0, 107, 0] and times == [20.0, 20.0, 23.0, 23.5, 33.5, 33.5, 36.5]
    # a host that cannot fault now stops the chain before the fault
    assert run_chain(prog, 1.0, 55, 20.0, 64, 1e9, read, lambda g, v: None) == ([55], [20.0])
    assert run_chain(prog, 1.0, 55, 20.0, 64, 1e9, read) == ([55], [20.0])


@pytest.mark.parametrize("chain, why", [
    (b"\0" * 8, "bytes"),
    (np.array([1.0, 0.1] + [ADD, 1.0] * (MAX_PAIRS + 1), "<f8").tobytes(), f"1 to {MAX_PAIRS}"),
    (np.array([1.0, 0.1, 9.0, 1.0], "<f8").tobytes(), "unknown op"),
    (np.array([1.0, 0.1, READ, -1.0], "<f8").tobytes(), "finite number"),
    (np.array([1.0, 0.1, ADD, math.nan], "<f8").tobytes(), "finite number"),
    (np.array([1.0, math.inf, ADD, 1.0], "<f8").tobytes(), "finite number"),
    (np.array([1.0, 0.1, EPT_PAGE, 4.0, EPT, 2.0], "<f8").tobytes(), "EPT of 2.0 pages after 1"),
    (np.array([1.0, 0.1, EPT, 0.0], "<f8").tobytes(), "EPT of 0.0 pages after 0"),
    (np.array([1.0, 0.1, EPT_PAGE, 4.5, EPT, 1.0], "<f8").tobytes(), "EPT_PAGE of gpfn 4.5"),
    (np.array([1.0, 0.1, EPT_PAGE, 4.0, ADD, 1.0], "<f8").tobytes(), "without their EPT"),
    (np.array([1.0, 0.1, ADD, 1.0, EPT_PAGE, 4.0], "<f8").tobytes(), "ends in EPT_PAGEs"),
    (np.array([math.nan, 0.1, ADD, 1.0], "<f8").tobytes(), "finite number"),
    # each value finite, their sum not (math.fsum raises OverflowError, which must not reach the server)
    (np.array([1e308, 1.0, ADD, 1e308, ADD, 1e308], "<f8").tobytes(), "finite number"),
])
def test_a_malformed_program_is_refused(chain: bytes, why: str) -> None:
    with pytest.raises(BadBatch, match=why):
        check_program(3, chain)
    with pytest.raises(BadBatch, match=why):
        _check_program(3, chain)


def _random_program(rng: np.random.Generator) -> bytes:
    """A program that is often well formed and often broken in one place (an op, a value, the EPT runs)."""
    pairs: list[tuple[float, float]] = []
    for _ in range(int(rng.integers(0, 12))):
        op = rng.choice([WIN, CHECK, ADD, READ, EPT_PAGE])
        if op == EPT_PAGE:
            n = int(rng.integers(1, 4))
            pairs += [(EPT_PAGE, float(rng.integers(0, 64))) for _ in range(n)] + [(EPT, float(n))]
        else:
            pairs.append((float(op), float(rng.integers(0, 9)) * float(rng.choice([1.0, 0.25]))))
    prog = [float(rng.choice([1e4, math.inf])), float(rng.choice([0.5, 0.0]))] + [x for p in pairs for x in p]
    if len(prog) > 2 and rng.random() < 0.5:
        i = int(rng.integers(0, len(prog)))
        prog[i] = float(rng.choice([-1.0, math.nan, math.inf, 1e308, 2.5, 6.0, 4.0, 5.0, -0.0, 1e20]))
    data = np.array(prog, "<f8").tobytes()
    return data[:-8] if rng.random() < 0.05 else data


def test_the_compiled_check_takes_exactly_the_programs_python_takes() -> None:
    """The compiled check returns Python's list for a program Python accepts, or leaves it to Python; it
    never accepts what Python refuses (the refusal's wording is Python's in both)."""
    rng = np.random.default_rng(7)
    compiled = refused = 0
    for _ in range(4000):
        chain = _random_program(rng)
        try:
            want: Any = _check_program(5, chain)
        except BadBatch as exc:
            want = str(exc)
        fast = _checked(chain, MAX_PAIRS)
        if fast is not None:
            assert fast == want and [math.copysign(1, x) for x in fast] == [math.copysign(1, x) for x in want]
            compiled += 1
        got: Any
        try:
            got = check_program(5, chain)
        except BadBatch as exc:
            got = str(exc)
            refused += 1
        assert got == want
    assert compiled > 1000 and refused > 1000


def _counts(run_dir: Any, variant: str = "default") -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    v = summary["variants"][variant]
    engine = ("vdisk_chained_reads", "vdisk_chained_faults", "vdisk_ahead_reads", "vdisk_ahead_faults")
    host = {k: x for k, x in v["host"].items() if k not in engine}
    guests = [{k: x for k, x in g.items() if k != "ahead_answered"} for g in v["guests"]]
    return {"guests": guests, "host": host, "status": v["status"]}


@pytest.mark.parametrize("ticks", [30, 1])
def test_a_run_with_chains_counts_as_one_without(tmp_path: Any, ticks: int) -> None:
    """One request at a time, chains, and chains with answers ahead: the same counts. (One tick: the run's
    last tick, where faults are not cut at the gate, chains too, and there is no next tick to answer.)"""
    runs = {}
    for name, sets in (("ahead", ()), ("chains", ("host.ahead_chain=false",)), ("none", ("host.read_chain=0",))):
        run_dir = tmp_path / name
        args = [a for s in sets for a in ("--set", s)]
        proc = run_launcher("--scenario", "scale", "--guests", "4", "--ticks", str(ticks), *args,
                            "--run-dir", str(run_dir), "--no-report", timeout_s=90)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = run_dir
    counts = {name: _counts(d) for name, d in runs.items()}
    assert counts["ahead"] == counts["chains"] == counts["none"] and counts["ahead"]["status"] == "completed"
    assert all(g["lost_pages"] == 0 for g in counts["ahead"]["guests"])
    host = {name: json.loads((d / "summary.json").read_text())["variants"]["default"]["host"]
            for name, d in runs.items()}
    assert host["chains"]["vdisk_chained_reads"] > 0 and host["none"]["vdisk_chained_reads"] == 0
    assert host["chains"]["vdisk_chained_faults"] > 0 and host["none"]["vdisk_chained_faults"] == 0
    assert host["chains"]["vdisk_ahead_reads"] == 0 and host["none"]["vdisk_ahead_reads"] == 0
    if ticks > 1:   # a cold tick's first requests answered at its start: reads and faults
        assert host["ahead"]["vdisk_ahead_reads"] > 0 and host["ahead"]["vdisk_ahead_faults"] > 0
        saved = {n: sum(host[n][k] for k in ("vdisk_chained_reads", "vdisk_chained_faults", "vdisk_ahead_reads",
                                               "vdisk_ahead_faults")) for n in ("ahead", "chains")}
        assert saved["ahead"] > saved["chains"]
    else:
        assert host["ahead"]["vdisk_ahead_reads"] == 0


def test_a_squeezed_run_chains_through_its_evictions_and_counts_as_one_without(tmp_path: Any) -> None:
    """The ballooning variant of the small io-amplification scenario: the balloon squeezes the page cache
    and nearly every miss evicts a clean page; chained or not, the same counts."""
    runs = {}
    for chain in (64, 0):
        run_dir = tmp_path / f"chain{chain}"
        proc = run_launcher("--scenario", "tests-ioamp", "--variant", "ballooning", "--ticks", "60", "--set",
                            f"host.read_chain={chain}", "--run-dir", str(run_dir), "--no-report", timeout_s=90)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[chain] = run_dir
    with_chain, without = _counts(runs[64], "ballooning"), _counts(runs[0], "ballooning")
    assert with_chain == without and with_chain["status"] == "completed"
    assert all(g["lost_pages"] == 0 for g in with_chain["guests"])
    host = json.loads((runs[64] / "summary.json").read_text())["variants"]["ballooning"]["host"]
    guests = with_chain["guests"]
    # A chain without evictions has only the reads into free frames: at most all reads less those whose
    # fault evicted, and a fault's own evictions (pgsteal_direct) not made by a read were zero fills
    # (minor faults). More chained reads than that bound went through evictions (3,782 of 6,802 reads
    # were chained here before, under a bound of 4,660).
    evicting_reads = sum(g["pgsteal_direct"] for g in guests) - sum(g["minor_faults"] for g in guests)
    assert evicting_reads > 0
    assert host["vdisk_chained_reads"] + host["vdisk_ahead_reads"] > host["vdisk_read_requests"] - evicting_reads
    # The balloon's new targets touch guests at boundaries: their offers ahead were declined (answered
    # empty), as a host that served them anyway would have made the run diverge.
    finished = [json.loads(line) for line in (runs[64] / "host.jsonl").read_text().splitlines()
                if '"run_finished"' in line][0]
    assert host["vdisk_ahead_reads"] > 0 and finished["ahead_declined"] > 0


def test_the_walk_from_a_batch_start_checks_its_input_and_changes_nothing() -> None:
    k = _kernel("clock", 200, 64)
    n = k.pt.gpfn.size
    core = k._core
    with pytest.raises(ValueError, match="int64"):
        core.lookahead_batch(np.zeros(4, np.int32), np.zeros(4, bool), 1e9, 64)
    with pytest.raises(ValueError, match="outside"):
        core.lookahead_batch(np.array([0, n], np.int64), np.zeros(2, bool), 1e9, 64)
    # a cold guest's first batch: its first miss is the program's first request
    prog = k.ahead_program(np.arange(10, dtype=np.int64), np.zeros(10, bool), 1e9)
    assert prog is not None and READ in np.frombuffer(prog, "<f8")[2::2]
    assert k.ahead_program(np.arange(10, dtype=np.int64), np.zeros(10, bool), 1e9) == prog   # it changed nothing
    k.read_chain = 0
    assert k.ahead_program(np.arange(10, dtype=np.int64), np.zeros(10, bool), 1e9) is None
