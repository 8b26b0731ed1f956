"""The guest's side of free page reporting: freeing memory (discard), the reporter, the burst workload, config."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.guestd.blockdev import LocalBlockDevice
from balloonlab.guestd.config import guest_config_from_mapping
from balloonlab.guestd.errors import BadPages, GuestConfigError
from balloonlab.guestd.hypervisor import LocalHypervisor
from balloonlab.guestd.kernel import GuestKernel
from balloonlab.guestd.kernel_config import KernelConfig
from balloonlab.guestd.memory import FrameKind
from balloonlab.guestd.reporting import FreePageReporter, ReportingConfig
from balloonlab.guestd.workload import Layout, Region, build_workload
from balloonlab.proto.costs import CostModel

U64 = np.uint64


class Host(LocalHypervisor):
    """The toy host, backing frames lazily (like the real one) and counting reports."""

    backs_all_initially = False

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.reports: list[list[int]] = []

    async def report_free(self, gpfns: np.ndarray, vt_us: float) -> float:
        self.reports.append(np.asarray(gpfns, np.int64).tolist())
        return await super().report_free(gpfns, vt_us)


def kernel(ram: int = 64, regions: list[tuple[str, str, int]] | None = None, hv: Host | None = None,
           policy: str = "clock") -> tuple[GuestKernel, Host]:
    layout = Layout([Region(*r) for r in (regions or [("heap", "anon", 16), ("burst", "anon", 32)])])
    cfg = KernelConfig(ram_pages=ram, layout=layout, policy=policy, kernel_pages=0, fault_around_pages=1)
    hv = hv or Host(ram)
    return GuestKernel(cfg, np.random.default_rng(1), LocalBlockDevice(cfg.disk_blocks), hv, CostModel()), hv


async def test_discard_frees_frames_and_the_next_touch_is_a_zero_page() -> None:
    k, hv = kernel()
    burst = np.arange(16, 48, dtype=U64)
    await k.access(burst, np.ones(32, bool))
    g = k.pt.gpfn[16:48].copy()
    assert np.all(g >= 0)
    free_before = k.stats()["free"]
    k.vt_us = 500.0
    assert await k.discard(burst) == 32
    s = k.stats()
    assert s["free"] == free_before + 32 and s["discarded_pages"] == 32
    assert np.all(k.frames.kind[g] == FrameKind.FREE) and np.all(k.frames.vpage[g] == -1)
    assert np.all(k.free_since_us[g] == 500.0)
    assert np.all(k.frames.backed[g]), "the host still backs them: only a report tells it"
    await k.access(burst, np.zeros(32, bool))          # touched again: fresh zero pages, nothing lost
    assert k.stats()["lost_pages"] == 0
    with pytest.raises(BadPages, match="file page"):
        fk, _ = kernel(regions=[("f", "file", 4)])
        await fk.discard(np.array([1], U64))


async def test_discard_takes_soft_reclaimed_and_swapped_pages_too() -> None:
    k, _ = kernel(ram=24)
    burst = np.arange(16, 48, dtype=U64)
    await k.access(burst, np.ones(32, bool))        # 32 pages in 24 frames: some went to guest swap
    await k.reclaim(4)                               # soft-reclaimed ones keep their page in a free frame
    assert k.stats()["swap_out"] > 0 and k.stats()["soft_cached_pages"] > 0
    await k.discard(burst)
    s = k.stats()
    assert s["soft_cached_pages"] == 0 and s["free"] == 24
    assert not np.any(k.pt.on_disk[16:48])
    await k.access(burst, np.zeros(32, bool))
    assert k.stats()["lost_pages"] == 0


async def test_the_reporter_reports_whole_free_blocks_after_the_delay() -> None:
    k, hv = kernel(ram=64)
    await k.access(np.arange(16, 48, dtype=U64), np.ones(32, bool))     # frames 0..31
    await k.access(np.arange(0, 16, dtype=U64), np.ones(16, bool))      # frames 32..47 (heap)
    rep = FreePageReporter(k, hv, ReportingConfig(True, delay_ms=1.0, order_pages=16))
    k.vt_us = 10.0
    await k.discard(np.arange(16, 48, dtype=U64))                       # frames 0..31 free at 10 us
    k.vt_us = 1005.0
    assert await rep.maybe_run() == 0 and rep.runs == 0, "not free for the delay yet"
    k.vt_us = 1011.0
    n = await rep.maybe_run()
    assert n == 32 and hv.reports == [list(range(32))]
    assert not np.any(k.frames.backed[:32]) and np.all(k.frames.backed[32:48])
    assert rep.stats() == {"free_report_runs": 1, "free_report_calls": 1, "pages_reported": 32}
    k.vt_us = 9000.0
    assert await rep.maybe_run() == 0 and len(hv.reports) == 1, "reported frames are not reported again"
    # Reused: the touch EPT-faults with the fresh bit; the host gives zeros; nothing lost.
    await k.access(np.arange(16, 48, dtype=U64), np.ones(32, bool))
    assert k.stats()["lost_pages"] == 0 and np.all(k.frames.backed[:32])


async def test_a_block_with_a_soft_reclaimed_or_used_frame_is_not_reported() -> None:
    k, hv = kernel(ram=64)
    await k.access(np.arange(16, 48, dtype=U64), np.ones(32, bool))     # frames 0..31
    await k.discard(np.arange(16, 32, dtype=U64))                       # frames 0..15 free
    await k.reclaim(64)                                                 # the rest soft-reclaimed
    k.vt_us = 1e6
    rep = FreePageReporter(k, hv, ReportingConfig(True, delay_ms=1.0, order_pages=16))
    assert await rep.maybe_run() == 16
    assert hv.reports == [list(range(16))], "frames 16..31 hold soft-reclaimed pages: not free"


def test_reporting_config_keys() -> None:
    base = {"ram_mib": 4, "regions": [{"name": "h", "kind": "anon", "pages": 64}]}
    cfg = guest_config_from_mapping({**base, "free_page_reporting": True, "report_delay_ms": 500,
                                     "report_order_pages": 64})
    assert cfg.reporting == ReportingConfig(True, 500.0, 64)
    assert guest_config_from_mapping(base).reporting.enabled is False
    with pytest.raises(GuestConfigError, match="report_order_pages"):
        guest_config_from_mapping({**base, "report_order_pages": 100})
    with pytest.raises(GuestConfigError, match="report_delay_ms"):
        guest_config_from_mapping({**base, "report_delay_ms": 0})
    with pytest.raises(GuestConfigError, match="free_page_reporting"):
        guest_config_from_mapping({**base, "free_page_reporting": "yes"})


def test_the_burst_workload_stops_its_batch_at_the_free() -> None:
    layout = Layout([Region("heap", "anon", 8), Region("b", "anon", 10)])
    w = build_workload([{"kind": "burst", "region": "b", "hold_refs": 5, "idle_refs": 7, "cycles": 2}],
                       layout, np.random.default_rng(0))
    p, wr = w.next_batch(100)
    assert p.size == 15 and np.all(wr[:10]) and p[:10].tolist() == list(range(8, 18))
    frees = w.take_frees()
    assert frees.tolist() == list(range(8, 18)) and w.take_frees() is None
    p, _ = w.next_batch(5)             # idle
    assert p.size == 0 and not w.exhausted
    p, _ = w.next_batch(100)           # the rest of the idle time, then the second cycle up to its free
    assert p.size == 15 and w.take_frees() is not None
    w.next_batch(100)
    assert w.exhausted
    with pytest.raises(GuestConfigError, match="anonymous"):
        build_workload([{"kind": "burst", "region": "f"}], Layout([Region("f", "file", 4)]),
                       np.random.default_rng(0))
