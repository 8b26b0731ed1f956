"""The sampled frame invariant: it finds what the full check finds, and reports it the same way.

A small host under pressure (guests faulted in, pages and cache blocks in
host swap, I/O in flight), then one corruption at a time, the way a
bookkeeping bug would leave it. The sampled check must raise within a few
ticks' samples, and for the same corruption the full check names the same
problem. ``InvariantChecker`` runs the sample each tick and the full check
at the end, and logs a violation exactly as before (``invariant_violated``
with ``what`` and ``when``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from structlog.testing import capture_logs

from balloonlab.hostd.assembly import INVARIANT_ENV, invariant_mode
from balloonlab.hostd.errors import InvariantViolation
from balloonlab.hostd.framepool import FrameKind
from balloonlab.hostd.invariant import InvariantChecker, check_full, check_sample
from balloonlab.hostd.memconfig import host_memory_config
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.p2m import PageState
from balloonlab.hostd.vdisk import CacheState
from balloonlab.proto import events as ev
from balloonlab.proto.errors import ConfigError

from .test_host_fakes import FakeGuests, make_memory

TICKS_TO_FIND = 40     # samples of 64 frames and slots: a 96-frame pool is covered many times over


async def busy_memory() -> HostMemory:
    hm = make_memory(total_frames=96, swap_slots=96, low_watermark_frames=2, reclaim_batch_frames=4,
                     cluster_pages=4, vdisk_cache_max_pages=24)
    guests = FakeGuests(hm)
    for gid in (1, 2):
        guests.add(gid, 48, disk_blocks=64)
    for gid in (1, 2):
        await guests.touch(gid, np.arange(48), write=True)
        await hm.vdisk_write(gid, np.arange(0, 16, dtype=np.uint64), np.arange(1, 17, dtype=np.uint64), 0.0)
    await hm.reclaim(20, 0.0)
    check_full(hm)
    return hm


def first_swapped_gpfn(hm: HostMemory, gid: int) -> int:
    return int(np.flatnonzero(hm.p2m(gid).state == PageState.SWAPPED)[0])


def leak_a_frame(hm: HostMemory) -> None:
    hm.pool.alloc(1, FrameKind.GUEST, 1, np.array([0]), np.array([7], np.uint64))   # referenced by nobody


def point_two_gpfns_at_one_frame(hm: HostMemory) -> None:
    p2m = hm.p2m(1)
    a, b = np.flatnonzero(p2m.state == PageState.FRAME)[:2]
    hm.pool.free(np.array([p2m.loc[b]]))
    p2m.loc[b] = p2m.loc[a]


def leak_a_slot(hm: HostMemory) -> None:
    g = int(np.flatnonzero(hm.p2m(2).state == PageState.FRAME)[0])
    hm.swap.store(hm.swap.slots_of(2, np.array([g])), np.array([5], np.uint64))   # its p2m says FRAME


def forget_a_swapped_page(hm: HostMemory) -> None:
    p2m = hm.p2m(2)
    g = first_swapped_gpfn(hm, 2)
    p2m.state[g] = PageState.UNBACKED   # its slot still holds the page: the slot leaks


def change_a_cached_blocks_content(hm: HostMemory) -> None:
    vd = hm.vdisk(1)
    b = int(np.flatnonzero(vd.cache_state == CacheState.FRAME)[0])
    vd.tokens[b] ^= np.uint64(1)


def lose_count_of_a_kind(hm: HostMemory) -> None:
    hm.pool._kind_frames[FrameKind.CACHE] += 1


CORRUPTIONS: dict[str, Callable[[HostMemory], None]] = {
    "a frame nobody references": leak_a_frame,
    "two gpfns on one frame": point_two_gpfns_at_one_frame,
    "a slot nobody references": leak_a_slot,
    "a swapped page forgotten": forget_a_swapped_page,
    "a cached block's content changed": change_a_cached_blocks_content,
    "a kind count drifted": lose_count_of_a_kind,
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
async def test_the_sample_finds_each_corruption_within_a_few_ticks(name: str) -> None:
    hm = await busy_memory()
    rng = np.random.default_rng(4)
    for _ in range(5):
        check_sample(hm, rng)      # a consistent host passes, tick after tick
    CORRUPTIONS[name](hm)
    with pytest.raises(InvariantViolation) as full:
        check_full(hm)
    found = None
    for _ in range(TICKS_TO_FIND):
        try:
            check_sample(hm, rng)
        except InvariantViolation as exc:
            found = exc
            break
    assert found is not None, f"{name}: not found by {TICKS_TO_FIND} samples; the full check says: {full.value}"
    if name in ("a frame nobody references", "a slot nobody references", "a kind count drifted"):
        # A leak is found from the leaked frame or slot itself: the same words as the full check's.
        assert str(found).split(":")[0].split(" (")[0] == str(full.value).split(":")[0].split(" (")[0]


async def test_the_sample_is_deterministic_per_seed() -> None:
    hm = await busy_memory()
    leak_a_slot(hm)
    found = []
    for _ in range(2):
        rng = np.random.default_rng(11)
        for t in range(TICKS_TO_FIND):
            try:
                check_sample(hm, rng)
            except InvariantViolation as exc:
                found.append((t, str(exc)))
                break
    assert len(found) == 2 and found[0] == found[1]


async def test_the_checker_samples_each_tick_and_checks_everything_at_the_end() -> None:
    hm = await busy_memory()
    checker = InvariantChecker(hm, "sample", 1, np.random.default_rng(1))
    with capture_logs() as logs:
        for tick in range(3):
            checker.tick(tick)
        leak_a_frame(hm)
        checker.finish()
    assert checker.sampled_checks == 3
    (violated,) = [e for e in logs if e["event"] == ev.INVARIANT_VIOLATED]
    assert violated["when"] == "run_end" and "frame leak" in violated["what"] and violated["log_level"] == "error"
    assert checker.violations == 1


async def test_the_full_mode_checks_everything_every_tick_and_nothing_more_at_the_end() -> None:
    hm = await busy_memory()
    checker = InvariantChecker(hm, "full", 2, np.random.default_rng(1))
    leak_a_slot(hm)
    with capture_logs() as logs:
        checker.tick(0)            # not due: every 2nd tick
        checker.tick(1)
        checker.finish()
    assert [(e["event"], e["when"]) for e in logs] == [(ev.INVARIANT_VIOLATED, "tick")]
    assert "slot leak" in logs[0]["what"] and checker.violations == 1 and checker.sampled_checks == 0


def test_the_mode_is_a_host_setting_and_the_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert host_memory_config({}).invariant == "sample"
    assert host_memory_config({"invariant": "full"}).invariant == "full"
    with pytest.raises(ConfigError, match=r"host.invariant: must be one of \['sample', 'full'\], got 'every'"):
        host_memory_config({"invariant": "every"})
    monkeypatch.delenv(INVARIANT_ENV, raising=False)
    assert invariant_mode("sample") == "sample"
    monkeypatch.setenv(INVARIANT_ENV, "full")
    assert invariant_mode("sample") == "full"
    monkeypatch.setenv(INVARIANT_ENV, "often")
    with pytest.raises(ConfigError, match="BALLOONLAB_INVARIANT='often'"):
        invariant_mode("sample")
