"""The guest kernel: where pages go, what I/O that costs, balloon frames, host backing, stats."""
from __future__ import annotations

import json

import numpy as np
import pytest

from balloonlab.proto.costs import CostModel, DiskProfile
from balloonlab.proto.tokens import make_tokens
from balloonlab.guestd.blockdev import LocalBlockDevice
from balloonlab.guestd.errors import BadFrames, BadPages, GuestConfigError, OutOfMemory, UnknownPolicy
from balloonlab.guestd.hypervisor import LocalHypervisor, NullHypervisor
from balloonlab.guestd.kernel import GuestKernel
from balloonlab.guestd.kernel_config import KernelConfig, kernel_config_from_mapping
from balloonlab.guestd.memory import FrameKind
from balloonlab.guestd.replacement import POLICIES, make_policy
from balloonlab.guestd.workload import Layout, Region, build_workload, run_workload

U64 = np.uint64


def make_kernel(regions: list[tuple[str, str, int]], ram: int, policy: str = "esc", kernel_pages: int = 0,
                hv=None, costs: CostModel | None = None, **kw) -> GuestKernel:
    layout = Layout([Region(*r) for r in regions])
    cfg = KernelConfig(ram_pages=ram, layout=layout, policy=policy, kernel_pages=kernel_pages, **kw)
    hv = hv if hv is not None else NullHypervisor()
    return GuestKernel(cfg, np.random.default_rng(1), LocalBlockDevice(cfg.disk_blocks), hv, costs or CostModel())


def pages(*p: int) -> np.ndarray:
    return np.array(p, U64)


async def test_clean_file_pages_are_dropped_without_io() -> None:
    """Reading a file bigger than memory: every fault is a file read, and eviction writes nothing."""
    k = make_kernel([("f", "file", 50)], ram=10, policy="clock")
    for _ in range(3):
        await k.access(np.arange(50, dtype=U64))
    s = k.stats()
    assert s["major_faults"] == s["file_reads"] == 150
    assert s["file_writes"] == s["writebacks"] == s["swap_out"] == 0
    assert k.blockdev.writes == 0
    assert s["caches"] == s["file_pages"] == 10 and s["lost_pages"] == 0


async def test_dirty_file_pages_are_written_back_to_their_own_blocks() -> None:
    k = make_kernel([("f", "file", 20)], ram=5, policy="fifo")
    await k.access(np.arange(20, dtype=U64), np.ones(20, bool))
    s = k.stats()
    assert s["file_writes"] == s["writebacks"] == 15 and s["swap_out"] == 0
    # block b of the file holds page b at version 1 (written once)
    assert np.array_equal(k.blockdev.tokens[:15], make_tokens(np.arange(15), np.ones(15)))
    await k.access(np.arange(20, dtype=U64))          # read everything back: content intact
    assert k.stats()["lost_pages"] == 0


async def test_anonymous_pages_go_to_swap_and_fault_major_on_return() -> None:
    """First touch of an anonymous page is a minor fault (zero fill); coming back from swap is major."""
    k = make_kernel([("a", "anon", 20)], ram=5, policy="lru")
    await k.access(np.arange(20, dtype=U64), np.ones(20, bool))
    s = k.stats()
    assert s["minor_faults"] == 20 and s["major_faults"] == 0
    assert s["swap_out"] == 15 and s["swap_used"] == 15
    await k.access(np.arange(20, dtype=U64))
    s = k.stats()
    assert s["swap_in"] == s["major_faults"] == 20 - 5 + 5    # all 20: the last 5 were pushed out by 0..4
    assert s["lost_pages"] == 0


async def test_clean_swapped_page_is_dropped_again_for_free() -> None:
    """A page swapped in and not written keeps its slot: evicting it again costs no write."""
    k = make_kernel([("a", "anon", 4)], ram=2, policy="fifo")
    await k.access(pages(0, 1, 2, 3), np.ones(4, bool))       # 0, 1 swapped out dirty
    await k.access(pages(0, 1, 2, 3))                          # 0,1 in (2,3 out dirty); then 2,3 in (0,1 out clean)
    s = k.stats()
    assert s["swap_out"] == 4                                  # 0,1 then 2,3; the clean 0,1 cost nothing
    assert s["swap_used"] == 4 and s["lost_pages"] == 0


async def test_never_written_anonymous_page_needs_no_swap() -> None:
    k = make_kernel([("a", "anon", 10)], ram=2, policy="clock")
    await k.access(np.arange(10, dtype=U64))
    await k.access(np.arange(10, dtype=U64))
    s = k.stats()
    assert s["swap_out"] == 0 and s["swap_in"] == 0 and s["minor_faults"] == 20 and s["lost_pages"] == 0


async def test_soft_reclaimed_page_comes_back_as_a_minor_fault() -> None:
    k = make_kernel([("a", "anon", 8)], ram=8, policy="clock")
    await k.access(np.arange(8, dtype=U64), np.ones(8, bool))
    assert await k.reclaim(3) == 3
    s = k.stats()
    assert s["swap_out"] == 3 and s["free"] == 3 and s["soft_cached_pages"] == 3
    gone = np.flatnonzero(k.pt.cached >= 0).astype(U64)
    before = k.stats()
    await k.access(gone)
    s = k.stats()
    assert s["minor_faults"] - before["minor_faults"] == 3 and s["major_faults"] == 0
    assert s["swap_in"] == 0 and s["soft_cached_pages"] == 0 and s["lost_pages"] == 0


async def test_free_frames_fill_lowest_first_and_soft_ones_last() -> None:
    k = make_kernel([("a", "anon", 10)], ram=6, policy="fifo", kernel_pages=2)
    await k.access(pages(5, 6))
    assert k.pt.gpfn[[5, 6]].tolist() == [2, 3]                # gpfns 0, 1 are the kernel's
    await k.reclaim(1)                                          # page 5 (loaded first) soft-reclaimed in gpfn 2
    await k.access(pages(7, 8, 9))
    assert k.pt.gpfn[[7, 8]].tolist() == [4, 5] and k.pt.gpfn[9] == 2
    assert k.pt.cached[5] == -1          # its frame was reused; page 5 was never written: a zero page again


async def test_virtual_time_charges_references_faults_and_disk() -> None:
    costs = CostModel(mem_ref_us=0.5, minor_fault_us=3.0, page_zero_us=0.0)
    k = make_kernel([("a", "anon", 4), ("f", "file", 4)], ram=8, policy="clock", costs=costs)
    await k.access(pages(0, 0, 0))                                # one zero-fill fault + 3 references
    assert k.vt_us == pytest.approx(3 * 0.5 + 3.0)
    t = k.vt_us
    await k.access(pages(4))                                       # a file read: ssd latency + transfer
    ssd = DiskProfile(latency_us=100.0, bandwidth_bps=500e6, queue_depth=32)
    assert k.vt_us == pytest.approx(t + ssd.latency_us + 4096 * 1e6 / ssd.bandwidth_bps + 0.5)


async def test_balloon_alloc_takes_free_then_victims_and_marks_frames() -> None:
    k = make_kernel([("f", "file", 6), ("a", "anon", 6)], ram=10, policy="esc", kernel_pages=2)
    await k.access(np.arange(12, dtype=U64)[:8], np.array([0, 0, 0, 0, 1, 1, 1, 1], bool))   # 8 frames full
    got = await k.balloon_alloc(5)
    assert got.dtype == U64 and got.size == 5
    fr = k.frames
    assert (fr.kind[got.astype(np.int64)] == FrameKind.BALLOON).all()
    assert not fr.backed[got.astype(np.int64)].any()
    s = k.stats()
    assert s["balloon_pages"] == 5 and s["free"] == 0 and s["anon_pages"] + s["file_pages"] == 3
    assert s["swap_out"] + s["file_writes"] == s["writebacks"]
    # partial progress: only 3 workload frames are left, the kernel's 2 are never taken
    more = await k.balloon_alloc(10)
    assert more.size == 3 and k.stats()["balloon_pages"] == 8
    assert k.policy.select_victim() == -1
    # ballooned frames are never victims and pages still come back intact after deflating
    k.balloon_release(k.balloon_pick(4))
    await k.access(np.arange(12, dtype=U64))
    assert k.stats()["lost_pages"] == 0
    assert (fr.kind[fr.kind == FrameKind.BALLOON].size == 4)


async def test_balloon_pick_is_lifo_and_release_checks_frames() -> None:
    k = make_kernel([("a", "anon", 4)], ram=8, policy="clock")
    first = await k.balloon_alloc(2)
    second = await k.balloon_alloc(2)
    assert k.balloon_pick(3).tolist() == second[::-1].tolist() + [first[-1]]
    with pytest.raises(BadFrames, match=r"\[7\] are not balloon frames"):
        k.balloon_release(np.array([7], U64))
    with pytest.raises(BadFrames, match="gpfn 99 outside"):
        k.balloon_release(np.array([99], U64))
    k.balloon_release(second)
    assert not k.frames.backed[second.astype(np.int64)].any()
    assert k.stats()["balloon_pages"] == 2 and k.stats()["free"] == 6
    with pytest.raises(BadFrames, match="not balloon frames"):
        k.balloon_release(second)


async def test_oom_hook_deflates_then_the_fault_proceeds() -> None:
    k = make_kernel([("a", "anon", 4)], ram=4, policy="clock", kernel_pages=1)
    await k.balloon_alloc(3)                        # every non-kernel frame is in the balloon
    calls = []

    async def on_oom(n: int) -> None:
        calls.append(n)
        k.balloon_release(k.balloon_pick(n))
    k.on_oom = on_oom
    await k.access(pages(0, 1))          # 0 gets the deflated frame; 1 then evicts 0: one OOM only
    assert calls == [1] and k.stats()["oom_calls"] == 1 and k.stats()["balloon_pages"] == 2


async def test_oom_without_relief_is_a_typed_error() -> None:
    k = make_kernel([("a", "anon", 4)], ram=4, policy="esc", kernel_pages=1)
    await k.balloon_alloc(3)
    with pytest.raises(OutOfMemory, match="balloon_pages=3"):
        await k.access(pages(0))
    k.on_oom = lambda n: _noop()
    with pytest.raises(OutOfMemory):
        await k.access(pages(0))


async def _noop() -> None:
    return None


async def test_invalidate_and_ept_fault_round_trip() -> None:
    """The host swaps frames out (TLB shootdown) and back in on the next touch; tokens come back equal."""
    hv = LocalHypervisor(8)
    k = make_kernel([("a", "anon", 6)], ram=8, policy="clock", hv=hv)
    await k.access(np.arange(6, dtype=U64), np.ones(6, bool))
    g = k.pt.gpfn[[0, 1, 2]]
    want = k.frames.token[g].copy()
    hv.swap_out(k, g)
    assert not k.frames.backed[g].any() and np.array_equal(hv.kept[g], want)
    t = k.vt_us
    await k.access(pages(0, 1, 2, 3))
    s = k.stats()
    assert s["ept_faults"] == 3 and s["ept_fault_calls"] == 1      # one batched EPT fault for the window
    assert k.frames.backed[g].all() and s["lost_pages"] == 0
    assert k.vt_us >= t + k.costs.ept_fault_us


async def test_dirty_victim_swapped_by_the_host_is_read_back_before_write_back() -> None:
    """Double paging: writing back a page the host swapped out needs an EPT fault first."""
    hv = LocalHypervisor(3)
    k = make_kernel([("a", "anon", 6)], ram=3, policy="fifo", hv=hv)
    await k.access(pages(0, 1, 2), np.ones(3, bool))
    hv.swap_out(k, np.arange(3))
    await k.access(pages(3))                     # evicts 0 (dirty): its frame must come back first
    s = k.stats()
    assert s["ept_faults"] >= 1 and s["swap_out"] == 1 and s["lost_pages"] == 0
    await k.access(pages(0))
    assert k.stats()["lost_pages"] == 0


async def test_frames_start_unbacked_when_the_hypervisor_says_so() -> None:
    class Host(LocalHypervisor):
        backs_all_initially = False
    k = make_kernel([("a", "anon", 40)], ram=40, policy="clock", hv=Host(40), fault_around_pages=16)
    await k.access(pages(0))
    assert k.stats()["ept_faults"] == 16 and k.stats()["ept_fault_calls"] == 1   # fault-around
    await k.access(np.arange(40, dtype=U64))
    assert k.stats()["ept_fault_calls"] == 3 and k.frames.backed.all()


async def test_take_ad_bits_reports_and_clears() -> None:
    k = make_kernel([("a", "anon", 10)], ram=16, policy="clock")
    await k.access(pages(0, 1, 2), np.array([True, False, False]))
    k.take_ad_bits()
    await k.access(pages(1, 2), np.array([False, True]))
    a, d = k.take_ad_bits()
    acc, dirty = np.unpackbits(a)[:16].astype(bool), np.unpackbits(d)[:16].astype(bool)
    g1, g2 = int(k.pt.gpfn[1]), int(k.pt.gpfn[2])
    assert np.flatnonzero(acc).tolist() == sorted([g1, g2]) and np.flatnonzero(dirty).tolist() == [g2]
    a, d = k.take_ad_bits()
    assert not a.any() and not d.any()


async def test_stats_are_json_and_complete() -> None:
    k = make_kernel([("a", "anon", 10)], ram=8, policy="car")
    await k.access(np.arange(10, dtype=U64))
    s = k.stats()
    required = {"refs", "swap_in", "swap_out", "major_faults", "minor_faults", "free", "total", "available",
                "caches", "file_reads", "file_writes", "writebacks", "pff", "working_set_pages", "anon_pages",
                "file_pages", "balloon_pages", "ept_faults", "lost_pages"}
    assert required <= set(s)
    assert json.loads(json.dumps(s)) == s
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s.values())
    assert s["total"] == 8 and s["refs"] == 10


async def test_working_set_estimate_and_pff() -> None:
    """ESX-style sampling finds a 300-page hot set among 2000 resident pages; PFF is ~0 once warm."""
    k = make_kernel([("a", "anon", 2000)], ram=2048, policy="clock", ws_period_us=2_000.0, ws_sample_pages=400)
    await k.access(np.arange(2000, dtype=U64))
    rng = np.random.default_rng(0)
    await k.access(rng.integers(0, 300, 4096).astype(U64))
    k.advance_to(k.vt_us + 2_000.0)              # close the warm-up period: it was all faults
    warm = k.stats()["pff"]
    assert warm > 100_000
    for _ in range(30):
        await k.access(rng.integers(0, 300, 4096).astype(U64))
    s = k.stats()
    assert 200 <= s["working_set_pages"] <= 400, s["working_set_pages"]
    assert s["pff_last"] == 0.0 and s["pff"] < warm / 4      # no faults since: the average decays
    # now thrash: a working set bigger than memory keeps faulting
    t = make_kernel([("a", "anon", 4000)], ram=1000, policy="clock", ws_period_us=2_000.0)
    for _ in range(20):
        await t.access(rng.integers(0, 4000, 4096).astype(U64))
    assert t.stats()["pff"] > 10_000


async def test_same_seed_same_run() -> None:
    async def run() -> dict:
        k = make_kernel([("db", "file", 300), ("a", "anon", 300)], ram=200, policy="car")
        w = build_workload([{"kind": "db", "region": "db"}, {"kind": "anon-hot", "region": "a", "ws_pages": 100}],
                           k.config.layout, np.random.default_rng(5))
        await run_workload(k, w, 30_000, batch_pages=1000)
        return k.stats()
    assert await run() == await run()


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"opt"}))
async def test_every_policy_copes_with_balloon_churn(policy: str) -> None:
    k = make_kernel([("db", "file", 100), ("a", "anon", 100)], ram=80, policy=policy, kernel_pages=4)
    w = build_workload([{"kind": "db", "region": "db", "write_frac": 0.1},
                        {"kind": "anon-hot", "region": "a"}], k.config.layout, np.random.default_rng(2))
    for i in range(6):
        await run_workload(k, w, 2000, batch_pages=256)
        if i % 2 == 0:
            await k.balloon_alloc(20)
        else:
            k.balloon_release(k.balloon_pick(15))
        assert k.policy.capacity_pages == 76 - k.stats()["balloon_pages"]
    await k.access(np.arange(200, dtype=U64))
    s = k.stats()
    assert s["lost_pages"] == 0 and s["free"] + s["anon_pages"] + s["file_pages"] + s["balloon_pages"] + 4 == 80


async def test_bad_input_is_a_typed_error_naming_the_value() -> None:
    k = make_kernel([("a", "anon", 10)], ram=4, policy="clock")
    with pytest.raises(BadPages, match="page 10 outside the layout's 10 pages"):
        await k.access(pages(1, 10))
    with pytest.raises(BadPages, match="negative"):
        await k.access(np.array([-1]))
    with pytest.raises(BadPages, match="writes has shape"):
        await k.access(pages(1, 2), np.array([True]))
    with pytest.raises(BadFrames, match="gpfn 4 outside"):
        k.invalidate(np.array([4], U64))
    with pytest.raises(UnknownPolicy, match=r"'lfu'; did you mean 'lru'\? known: car, clock"):
        make_policy("lfu", 4)
    with pytest.raises(GuestConfigError, match="unknown parameter"):
        make_policy("clock", 4, tau=3)
    with pytest.raises(GuestConfigError, match=r"guest.ram_pagez: unknown key; did you mean 'ram_pages'"):
        kernel_config_from_mapping({"ram_pages": 4, "ram_pagez": 3}, where="guest")
    with pytest.raises(GuestConfigError, match=r"guest.regions\[0\]: missing key 'pages'"):
        kernel_config_from_mapping({"ram_pages": 4, "regions": [{"name": "a", "kind": "anon"}]}, where="guest")


def test_config_from_mapping_builds_the_layout() -> None:
    cfg = kernel_config_from_mapping({
        "ram_pages": 64, "kernel_pages": 4, "policy": "car",
        "regions": [{"name": "db", "kind": "file", "pages": 100}, {"name": "heap", "kind": "anon", "pages": 50},
                    {"name": "log", "kind": "file", "pages": 10}]})
    lay = cfg.layout
    assert lay.n_vpages == 160 and lay.n_file_blocks == 110
    assert lay.file_block[[0, 99, 150, 159]].tolist() == [0, 99, 100, 109]
    assert (lay.file_block[100:150] == -1).all()
    assert cfg.swap_base_block == 110 and cfg.disk_blocks == 160


async def test_a_keep_token_leaves_the_pages_content_as_the_guest_wrote_it() -> None:
    """A fault on a gpfn the host still backs is answered KEEP_TOKEN: the guest keeps its own content."""
    from balloonlab.proto.tokens import KEEP_TOKEN

    class KeepingHost(LocalHypervisor):
        """Takes the mapping (a shootdown) but, as if it never took the frame, answers KEEP on the fault."""
        async def ept_fault(self, gpfns: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
            tokens, done = await super().ept_fault(gpfns, vt_us)
            return np.full(len(gpfns), KEEP_TOKEN, np.uint64), done

    hv = KeepingHost(16)
    k = make_kernel([("a", "anon", 10)], ram=16, policy="clock", hv=hv)
    await k.access(pages(0, 1, 2), np.array([True, True, True]))     # written: their tokens are not 0 now
    k.frames.backed[:] = False                                       # the guest dropped its mappings
    await k.access(pages(0, 1, 2))                                   # faulted back: KEEP for each
    assert hv.ept_faults == 3 and k.stats()["lost_pages"] == 0
