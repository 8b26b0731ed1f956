"""The time-bounded vCPU: the gate, carry-over, TickDone at the gate, PSI, fresh and labels.

A fake host in the same process answers the guest's requests (every one a
fixed latency later, long enough for faults to cross tick ends) and opens
the next tick when the guest's TickDone arrives, so the guest's side of the
contract is checked request by request: every request's virtual time lies
inside the tick the host had open, every TickDone lies within the
documented bound of its tick's end, and the references run are exactly the
workload's stream, whatever the gates cut.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from balloonlab.guestd.gate import VcpuGate, VcpuStopped
from balloonlab.guestd.psi import PSI_PERIOD_US, PsiMeter
from balloonlab.guestd.session import build_guest
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import ProtoError
from balloonlab.proto.messages import (BalloonDeflate, BalloonInflate, BalloonReply, DiskRead, DiskReadReply,
                                       DiskWrite, DiskWriteReply, EptFault, EptFaultReply, TickStart)

TICK_US = 10_000


class FakeHost:
    """Answers a guest's requests ``latency_us`` after their virtual time; opens a tick per TickDone."""

    def __init__(self, latency_us: float, ticks: int) -> None:
        self.latency_us = latency_us
        self.ticks = ticks
        self.tick = -1
        self.blocks: dict[int, int] = {}
        self.kept: dict[int, int] = {}   # tokens of frames the host took (a shootdown), until faulted back
        self.requests: list[tuple[int, str, float]] = []   # (tick open, type, vt_us)
        self.outside: list[tuple[int, str, float]] = []
        self.tick_done: list[tuple[int, float, dict[str, Any]]] = []
        self.fresh_pages = 0
        self.gate: VcpuGate | None = None
        self.boundary: Any = None      # called with the tick at each TickDone (the guest is parked)

    def start(self, gate: VcpuGate) -> None:
        self.gate = gate
        self._next_tick()

    def _next_tick(self) -> None:
        assert self.gate is not None
        self.tick += 1
        if self.tick >= self.ticks:
            self.gate.stop("completed")
        else:
            self.gate.open(TickStart(self.tick, float(self.tick * TICK_US), TICK_US))

    def on_tick_done(self, tick: int, vt_us: float, stats: Any, accessed: bytes, dirty: bytes) -> None:
        assert tick == self.tick, (tick, self.tick)
        self.tick_done.append((tick, vt_us, stats.as_dict()))
        if self.boundary is not None:
            self.boundary(tick)
        asyncio.get_running_loop().call_soon(self._next_tick)   # as the host does, after the barrier

    async def call(self, msg: Any) -> Any:
        await asyncio.sleep(0)
        vt = float(msg.vt_us)
        rec = (self.tick, type(msg).__name__, vt)
        self.requests.append(rec)
        if not (self.tick * TICK_US <= vt < (self.tick + 1) * TICK_US):
            self.outside.append(rec)
        done = vt + self.latency_us
        if isinstance(msg, EptFault):
            fresh = np.zeros(msg.gpfns.size, bool)
            if msg.fresh:
                fresh = np.unpackbits(np.frombuffer(msg.fresh, np.uint8))[:msg.gpfns.size].astype(bool)
                self.fresh_pages += int(fresh.sum())
            # a fresh page's old content is dropped, as the real host does: a wrong bit loses a page
            tokens = [0 if f else self.kept.pop(g, 0) for g, f in zip(msg.gpfns.tolist(), fresh.tolist())]
            for g in msg.gpfns[fresh].tolist():
                self.kept.pop(g, None)
            return EptFaultReply(np.array(tokens, np.uint64), done)
        if isinstance(msg, DiskRead):
            return DiskReadReply(np.array([self.blocks.get(int(b), 0) for b in msg.blocks], np.uint64), done)
        if isinstance(msg, DiskWrite):
            for b, t in zip(msg.blocks.tolist(), msg.tokens.tolist()):
                self.blocks[b] = t
            return DiskWriteReply(done)
        if isinstance(msg, (BalloonInflate, BalloonDeflate)):
            return BalloonReply(0, vt + 1.0)
        raise AssertionError(f"unexpected request {msg!r}")


def guest_config(**costs: float) -> dict[str, Any]:
    return {"ram_mib": 0.25, "kernel_mib": 0.0625, "seed": 4, "policy": "esc", "batch_refs": 512,
            "regions": [{"name": "db", "kind": "file", "mib": 1.5}, {"name": "heap", "kind": "anon", "mib": 1}],
            "workload": [{"kind": "db", "region": "db", "weight": 2, "write_frac": 0.1},
                         {"kind": "anon-hot", "region": "heap", "weight": 1}],
            "costs": {"cpu_us_per_ref": 0.9, **costs}, "metrics_every_ticks": 1000, "dirty_background_ratio": 10}


async def run_guest(latency_us: float, ticks: int, prepare: Any = None, **costs: float) -> tuple[Any, FakeHost]:
    host = FakeHost(latency_us, ticks)
    gate = VcpuGate()
    st = build_guest(0, guest_config(**costs), host, gate)   # type: ignore[arg-type]  # host.call is the socket
    st.send_tick_done = host.on_tick_done
    if prepare is not None:
        prepare(st, host)
    host.start(gate)
    with pytest.raises(VcpuStopped):
        await asyncio.wait_for(st.run_vcpu(), 60)
    return st, host


def bound_us(stats: dict[str, Any], costs: CostModel) -> float:
    return (stats["tick_inflight_us"] + costs.mem_ref_us + costs.cpu_us_per_ref + costs.minor_fault_us
            + costs.page_zero_us + 256 * costs.balloon_page_us)


async def test_requests_stay_in_their_tick_and_tick_done_lies_within_the_bound() -> None:
    st, host = await run_guest(latency_us=3_000.0, ticks=100)
    costs = st.costs
    s = st.stats()
    assert s["major_faults"] > 100 and s["writebacks"] > 10 and s["ept_fault_calls"] > 0, s   # it really pages
    assert host.requests and not host.outside, host.outside[:5]
    assert [t for t, _, _ in host.tick_done] == list(range(100))
    # refs_done: the references of each tick, adding up to the total
    assert sum(st_["refs_done"] for _, _, st_ in host.tick_done) == host.tick_done[-1][2]["refs"]
    for tick, vt, stats in host.tick_done:
        end = (tick + 1) * TICK_US
        assert vt >= end, (tick, vt)
        assert vt - end <= bound_us(stats, costs) + 1e-6, (tick, vt - end, stats["tick_inflight_us"])
    # faults in flight at the gate really happened, and parked between their requests
    assert st.gate.parks_in_request > 0 and st.carried_refs > 0
    assert max(vt - (t + 1) * TICK_US for t, vt, _ in host.tick_done) > 1_000.0
    assert s["lost_pages"] == 0


async def test_carry_over_runs_the_workload_stream_exactly_once() -> None:
    """The references a gate cuts off run next tick, in order, topped up with the next batch in the same
    call: never generated again, never dropped, never more than ``batch_refs`` in one call."""
    generated: list[np.ndarray] = []
    executed: list[np.ndarray] = []       # what each access call was given (pages)
    ran: list[np.ndarray] = []            # what it completed

    def record(st: Any, host: FakeHost) -> None:
        gen, acc = st.workload.next_batch, st.kernel.access

        def next_batch(n: int) -> Any:
            p, w = gen(n)
            generated.append(p.copy())
            return p, w

        async def access(pages: np.ndarray, writes: Any = None, deadline_us: Any = None) -> int:
            done = await acc(pages, writes, deadline_us)
            executed.append(np.asarray(pages).copy())
            ran.append(np.asarray(pages[:done]).copy())
            return done

        st.workload.next_batch = next_batch
        st.kernel.access = access

    st, _ = await run_guest(latency_us=4_000.0, ticks=30, prepare=record)
    done = np.concatenate(ran)
    stream = np.concatenate(generated)
    left = 0 if st._carry is None else st._carry[0].size
    assert st.carried_refs > 0                                          # gates really cut batches
    assert done.size + left == stream.size and done.size == st.kernel.counters.refs
    assert np.array_equal(done, stream[:done.size])
    if left:
        assert np.array_equal(st._carry[0], stream[done.size:])
    # a call that starts inside one draw (a carried rest) and runs past its end: the rest was topped up
    ends = np.cumsum([g.size for g in generated])
    starts = np.cumsum([0] + [r.size for r in ran[:-1]])
    topped = [s for s, e in zip(starts, executed) if s not in ends and s + e.size > ends[np.searchsorted(ends, s)]]
    assert topped and max(e.size for e in executed) <= st.batch_refs


async def test_psi_is_the_time_the_vcpu_waited_for_paging_requests() -> None:
    latency = 3_000.0
    st, host = await run_guest(latency_us=latency, ticks=450)     # 4.5 virtual s: two PSI periods and more
    s = st.stats()
    # the vCPU's own paging requests: one EPT fault per call, one read per major fault, one write per
    # dirty eviction; the flusher's writes (background, the clock does not wait) are not among them
    paging = s["ept_fault_calls"] + s["major_faults"] + s["writebacks"]
    flusher = sum(1 for _, kind, _ in host.requests if kind == "DiskWrite") - s["writebacks"]
    assert s["flusher_writes"] > 0 and flusher > 0 and s["flusher_cleaned"] > 0, s
    # each paging request stalls the one vCPU for exactly its latency (they never overlap)
    assert s["psi_some_us"] == pytest.approx(paging * latency, rel=1e-9)
    assert s["psi_full_us"] == s["psi_some_us"]          # one vCPU, one task: see guestd/psi.py
    # ... and that is the clock's time not spent on references or zero fills (no balloon here)
    costs = st.costs
    busy = s["refs"] * (costs.mem_ref_us + costs.cpu_us_per_ref) + s["minor_faults"] * (
        costs.minor_fault_us + costs.page_zero_us)
    assert s["psi_some_us"] == pytest.approx(st.kernel.vt_us - busy, rel=1e-6)
    # avg10/avg60: Linux's fold every 2 s over the stall share of each period, from the TickDone totals
    totals = [(vt, stats["psi_some_us"]) for _, vt, stats in host.tick_done]
    a10 = a60 = 0.0
    prev = 0.0
    for k in (1, 2):
        at = [tot for vt, tot in totals if vt <= k * PSI_PERIOD_US + 1e-9]
        # the stall inside period k is known only to the tick: bound it by the totals around the edge
        share = (at[-1] - prev) / PSI_PERIOD_US * 100
        a10 = a10 * np.exp(-0.2) + share * (1 - np.exp(-0.2))
        a60 = a60 * np.exp(-2 / 60) + share * (1 - np.exp(-2 / 60))
        prev = at[-1]
    assert s["psi_some_avg10"] == pytest.approx(a10, rel=0.05) and s["psi_some_avg10"] > 1.0
    assert s["psi_some_avg60"] == pytest.approx(a60, rel=0.05) and s["psi_some_avg60"] < s["psi_some_avg10"]


def test_psi_meter_splits_a_stall_across_periods() -> None:
    m = PsiMeter()
    m.stall(1_500_000, 2_500_000)               # 0.5 s in period 1, 0.5 s in period 2
    assert m.total_us == 1_000_000
    assert m.avgs[0] == pytest.approx(25.0 * (1 - np.exp(-0.2)))     # period 1: 25 % stalled
    m.advance(4_000_000)
    e = np.exp(-0.2)
    assert m.avgs[0] == pytest.approx((25.0 * (1 - e)) * e + 25.0 * (1 - e))
    m.stall(3_000_000, 3_500_000)               # in the past: nothing is counted twice
    assert m.total_us == 1_000_000


async def test_fresh_bits_mark_frames_the_guest_will_overwrite() -> None:
    st, host = await run_guest(latency_us=500.0, ticks=20)
    # every fresh page the host saw is counted by the guest, and the first touches of an
    # empty guest are all of that kind (zero fills and page-ins into free frames)
    assert host.fresh_pages > 0 and host.fresh_pages == st.kernel.counters.ept_fresh_pages
    assert st.stats()["lost_pages"] == 0


async def test_double_paging_and_clean_cache_labels() -> None:
    seen: dict[str, Any] = {}

    def prepare(st: Any, host: FakeHost) -> None:
        def boundary(tick: int) -> None:
            if tick != 9:
                return
            # a shootdown at the boundary, the guest parked: the host takes every page it holds
            k = st.kernel
            fr = k.frames
            held = np.flatnonzero(fr.backed & (fr.vpage >= 0))
            dirty = held[fr.M[held]]
            clean_file = held[~fr.M[held] & k.pt.is_file[fr.vpage[held]]]
            other = held[~fr.M[held] & ~k.pt.is_file[fr.vpage[held]]]
            gs = np.concatenate([dirty, clean_file, other])
            want_tokens = fr.token[gs].copy()
            tokens, labels = st.invalidate(gs)
            host.kept.update(zip(gs.tolist(), tokens.tolist()))
            seen.update(dirty=dirty.size, clean=clean_file.size, labels=labels, tokens_ok=np.array_equal(
                tokens, want_tokens), want=np.r_[np.zeros(dirty.size, bool), np.ones(clean_file.size, bool),
                                                 np.zeros(other.size, bool)], before=k.counters.double_paging_pages)
        host.boundary = boundary

    st, host = await run_guest(latency_us=200.0, ticks=40, prepare=prepare)
    assert seen["dirty"] > 0 and seen["clean"] > 0 and seen["tokens_ok"]
    assert np.array_equal(seen["labels"], seen["want"])          # labels = clean page cache, nothing else
    k = st.kernel
    # afterwards the guest evicts dirty pages whose frames the host took: each must be faulted back first
    assert seen["before"] == 0 and 0 < k.counters.double_paging_pages <= seen["dirty"]
    assert k.counters.lost_pages == 0


async def test_answers_ahead_are_waited_for_until_they_come_or_the_run_ends() -> None:
    """The vCPU that offered ``TickDone.ahead`` waits at the tick's start for ``TickAhead``; a run that ends
    meanwhile stops it as a park would; answers nobody asked for are refused."""
    loop = asyncio.get_running_loop()
    gate = VcpuGate()
    owed = loop.create_future()
    waiting = asyncio.ensure_future(gate.wait_for(owed))
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.stop("run over")
    with pytest.raises(VcpuStopped, match="run over"):
        await waiting
    answered = loop.create_future()
    answered.set_result((3, np.zeros(0, np.uint64), b""))
    await VcpuGate().wait_for(answered)             # already there: no wait, no stop

    host = FakeHost(500.0, 5)
    st = build_guest(0, guest_config(), host, VcpuGate())   # type: ignore[arg-type]
    with pytest.raises(ProtoError, match="no TickDone.ahead"):
        st.take_ahead(1, np.zeros(0, np.uint64), b"")
