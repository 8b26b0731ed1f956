"""Integrity: whatever mix of references, reclaims, balloon churn and host swapping, no page is lost.

The property test drives a kernel with random operations (hypothesis) and
then reads every page: each read checks the page's content token against
the version the workload last wrote, wherever the page went meanwhile
(guest swap, its file, a soft-reclaimed frame, the host's swap). The last
two tests break the disk and the host on purpose, to show the check fires.
"""
from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloonlab.proto.costs import CostModel
from balloonlab.guestd.blockdev import LocalBlockDevice
from balloonlab.guestd.hypervisor import LocalHypervisor
from balloonlab.guestd.kernel import GuestKernel
from balloonlab.guestd.kernel_config import KernelConfig
from balloonlab.guestd.memory import FrameKind
from balloonlab.guestd.replacement import POLICIES
from balloonlab.guestd.workload import Layout, Region

FILE_PAGES = 12
ANON_PAGES = 12
N_PAGES = FILE_PAGES + ANON_PAGES
RAM = 14
KERNEL = 2


class ColdHost(LocalHypervisor):
    backs_all_initially = False       # every frame starts unbacked: EPT faults from the first touch


def make(policy: str, hv: LocalHypervisor | None = None, dev: LocalBlockDevice | None = None) -> GuestKernel:
    layout = Layout([Region("f", "file", FILE_PAGES), Region("a", "anon", ANON_PAGES)])
    cfg = KernelConfig(ram_pages=RAM, layout=layout, policy=policy, kernel_pages=KERNEL,
                       fault_around_pages=4, ws_period_us=50.0, ws_sample_pages=3)
    return GuestKernel(cfg, np.random.default_rng(0), dev or LocalBlockDevice(cfg.disk_blocks),
                       hv or ColdHost(RAM), CostModel())


def check_invariants(k: GuestKernel) -> None:
    fr, pt = k.frames, k.pt
    assert k.counters.lost_pages == 0
    res = np.flatnonzero(pt.gpfn >= 0)
    assert np.array_equal(fr.vpage[pt.gpfn[res]], res)                  # page table and frames agree
    assert fr.resident[pt.gpfn[res]].all()
    assert fr.resident.sum() == res.size
    kinds = fr.kind[pt.gpfn[res]]
    assert np.array_equal(kinds == FrameKind.FILE, pt.is_file[res])
    soft = np.flatnonzero(pt.cached >= 0)
    assert not np.intersect1d(soft, res).size                          # never both resident and soft
    assert (fr.kind[pt.cached[soft]] == FrameKind.FREE).all()
    assert np.array_equal(fr.vpage[pt.cached[soft]], soft)
    s = k.stats()
    assert s["free"] + s["anon_pages"] + s["file_pages"] + s["balloon_pages"] + s["kernel_pages"] == RAM
    assert not fr.backed[fr.kind == FrameKind.BALLOON].any()


op = st.one_of(
    st.tuples(st.just("access"), st.lists(st.tuples(st.integers(0, N_PAGES - 1), st.booleans()),
                                          min_size=1, max_size=40)),
    st.tuples(st.just("reclaim"), st.integers(1, 6)),
    st.tuples(st.just("inflate"), st.integers(1, 8)),
    st.tuples(st.just("deflate"), st.integers(1, 8)),
    st.tuples(st.just("host_swap"), st.lists(st.integers(0, RAM - 1), min_size=1, max_size=8)),
    st.tuples(st.just("ad_bits"), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(sorted(set(POLICIES) - {"opt"})), ops=st.lists(op, min_size=1, max_size=30))
def test_no_page_is_ever_lost(policy: str, ops: list) -> None:
    asyncio.run(_run(policy, ops))


async def _run(policy: str, ops: list) -> None:
    hv = ColdHost(RAM)
    k = make(policy, hv)

    async def deflate_on_oom(n: int) -> None:
        picked = k.balloon_pick(n)
        await hv.balloon_deflate(picked, k.vt_us)
        k.balloon_release(picked)
    k.on_oom = deflate_on_oom
    for kind, arg in ops:
        if kind == "access":
            p = np.array([a for a, _ in arg], np.uint64)
            w = np.array([b for _, b in arg], bool)
            await k.access(p, w)
        elif kind == "reclaim":
            await k.reclaim(arg)
        elif kind == "inflate":
            got = await k.balloon_alloc(arg)
            await hv.balloon_inflate(got, k.vt_us)
        elif kind == "deflate":
            await deflate_on_oom(arg)
        elif kind == "host_swap":
            hv.swap_out(k, np.array(sorted(set(arg)), np.int64))
        else:
            k.take_ad_bits()
        check_invariants(k)
    # read every page back, wherever it is now
    await k.access(np.arange(N_PAGES, dtype=np.uint64))
    check_invariants(k)
    assert k.counters.refs == sum(len(a) for kd, a in ops if kd == "access") + N_PAGES


class ForgetfulDisk(LocalBlockDevice):
    """Drops every write to block ``lose``."""

    def __init__(self, n_blocks: int, lose: int) -> None:
        super().__init__(n_blocks)
        self.lose = lose

    async def write(self, blocks, tokens, vt_us):
        keep = np.asarray(blocks) != self.lose
        return await super().write(np.asarray(blocks)[keep], np.asarray(tokens)[keep], vt_us)


class CorruptingHost(ColdHost):
    """Gives back a frame's token with the version bumped: a host that lost a write."""

    async def ept_fault(self, gpfns, vt_us):
        tokens, done = await super().ept_fault(gpfns, vt_us)
        tokens = tokens.copy()
        tokens[tokens != 0] += np.uint64(1)
        return tokens, done


async def test_a_lost_disk_write_is_detected() -> None:
    layout_blocks = FILE_PAGES + ANON_PAGES
    k = make("fifo", dev=ForgetfulDisk(layout_blocks, lose=FILE_PAGES))   # the first swap slot
    pages = np.arange(FILE_PAGES, N_PAGES, dtype=np.uint64)                 # anonymous pages, written
    await k.access(pages, np.ones(pages.size, bool))                        # 12 pages, 12 frames
    await k.access(np.arange(0, 4, dtype=np.uint64))                        # pushes 4 anon pages to swap
    assert k.counters.lost_pages == 0
    await k.access(pages)                                                   # read them back
    assert k.counters.lost_pages == 1


async def test_a_corrupted_host_swap_is_detected() -> None:
    hv = CorruptingHost(RAM)
    k = make("clock", hv)
    await k.access(np.arange(6, dtype=np.uint64), np.ones(6, bool))
    assert k.counters.lost_pages == 0
    hv.swap_out(k, k.pt.gpfn[[0, 1]])
    await k.access(np.array([0, 1, 2], np.uint64))
    assert k.counters.lost_pages == 2
    await k.access(np.array([0, 1], np.uint64))      # counted once, then repaired
    assert k.counters.lost_pages == 2
