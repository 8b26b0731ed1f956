"""The host's monitors on hand-made ticks and on a real ``HostMemory``: what each one logs, and when.

Swap-storm detector (the chain, link by link), swap-area pinning (the cure:
no double fault after the pin), double faults and double paging (counted
and logged with their evidence), the convergence report, and their config.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from balloonlab.hostd.monitors import HostMonitors, monitors_config
from balloonlab.hostd.monitors.convergence import ConvergenceConfig, ConvergenceTracker
from balloonlab.hostd.monitors.window import GuestSample, History, TickSample
from balloonlab.hostd.monitors.swap_storm import SwapStormConfig, SwapStormDetector
from balloonlab.hostd.vdisk import CacheState
from balloonlab.proto import events as ev
from balloonlab.proto.errors import ConfigError

from .test_host_fakes import FakeGuests, make_memory


class Log:
    """Records what a monitor logs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    info = warning = error = _add

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.events if name == event]


def guest(gid: int, vt_us: float, swap_in: int = 0, swap: int = 0, host_swapped: int = 0, pff: float = 0.0,
          target: int = 0, ram: int = 1000) -> GuestSample:
    return GuestSample(guest_id=gid, vt_us=vt_us, swap_pages=swap, swap_in_pages=swap_in, major_faults=swap_in,
                       faults=swap_in, refs=0, pff=pff, host_swap_out_pages=host_swapped, target_pages=target,
                       actual_pages=target, working_set_pages=0, ram_pages=ram)


def tick(t: int, free: int, io: int = 0, swapped: int = 0, guests: tuple[GuestSample, ...] = (),
         total: int = 10_000) -> TickSample:
    return TickSample(tick=t, vt_us=t * 10_000.0, total_frames=total, free_frames=free, cache_pages=io,
                      iobuf_pages=0, pinned_frames=0, swap_out_pages=swapped, vdisk_pages=0,
                      guests={g.guest_id: g for g in guests})


# -- config ---------------------------------------------------------------------------------------

def test_monitor_config_names_bad_keys_and_values() -> None:
    assert monitors_config({}).pinning.enabled is False
    assert monitors_config({"swap_storm": {"window_ticks": 4}}).swap_storm.window_ticks == 4
    for bad, where in [({"storm": {}}, "storm"), ({"swap_storm": {"window": 1}}, "window"),
                       ({"swap_storm": {"window_ticks": 0}}, "window_ticks"),
                       ({"swap_storm": {"io_fraction": 2.0}}, "io_fraction"),
                       ({"pinning": {"enabled": 1}}, "enabled"), ({"pinning": {"mode": "glue"}}, "glue")]:
        with pytest.raises(ConfigError, match=where):
            monitors_config(bad)


# -- the swap-storm detector --------------------------------------------------------------------------

def storm_ticks(n: int, thrash: bool = True, io: int = 2000, free: int = 100, swap_step: int = 50,
                thrashing_guests: int = 2, io_step: int = 100, state: str | None = None) -> History:
    """``n`` ticks of a host short of memory with guests 0, 2, ... reading back 1000 swap pages per 10 ms tick.

    Host RAM 10,000 frames: ESX's minFree is 600, its hard state below 192 free frames.
    """
    hist = History(10)
    for t in range(n):
        busy = [guest(2 * i if i else 0, t * 10_000.0, swap_in=(1000 * t if thrash else 0), swap=2000 * t)
                for i in range(thrashing_guests)]
        g1 = guest(1, t * 10_000.0, host_swapped=20 * t)       # healthy, but the host takes its pages
        sample = tick(t, free=free, io=io + io_step * t, swapped=swap_step * t, guests=(*busy, g1))
        if state is not None:
            sample = dataclasses.replace(sample, memory_state=state)
        hist.push(sample)
    return hist


def replay(hist: History, cfg: SwapStormConfig) -> tuple[SwapStormDetector, Log]:
    log = Log()
    det = SwapStormDetector(cfg, log)
    window = History(cfg.window_ticks)
    for s in hist.samples:
        window.push(s)
        det.check(window)
    return det, log


def test_the_storm_is_detected_once_with_every_link_of_the_chain() -> None:
    det, log = replay(storm_ticks(20), SwapStormConfig(window_ticks=5, quiet_ticks=3))
    (e,) = log.named(ev.SWAP_STORM_DETECTED)
    assert det.storms == 1 and e["storm"] == 1
    links = {link["link"]: link for link in e["chain"]}
    assert list(links) == ["guests_thrashing", "host_io_memory", "host_free_low", "host_swapping"]
    assert all(link["ok"] for link in links.values())
    assert links["guests_thrashing"]["guests"] == [0, 2] and links["guests_thrashing"]["threshold"] == 2
    assert links["host_free_low"]["threshold"] == 192                    # 32 % of ESX's minFree (600)
    assert links["host_io_memory"]["threshold"] == 1000                  # 10 %: dirty_background_ratio
    assert links["host_swapping"]["healthy_guests_hit"] == [1]
    rates = {g["guest"]: g for g in e["guests"]}
    assert rates[0]["swap_in_pages_per_s"] == pytest.approx(100_000.0)    # 1000 pages per 10 ms
    assert rates[0]["thrashing"] and not rates[1]["thrashing"]


@pytest.mark.parametrize("broken", ["no_thrash", "one_guest_thrashing", "io_small", "io_flat", "free_plenty",
                                    "no_host_swap", "state_soft"])
def test_no_storm_while_one_link_is_missing(broken: str) -> None:
    hist = storm_ticks(20, thrash=broken != "no_thrash", io=100 if broken == "io_small" else 2000,
                       io_step=0 if broken in ("io_flat", "io_small") else 100,
                       free=300 if broken == "free_plenty" else 100, swap_step=0 if broken == "no_host_swap" else 50,
                       thrashing_guests=1 if broken == "one_guest_thrashing" else 2,
                       state="soft" if broken == "state_soft" else None)
    det, log = replay(hist, SwapStormConfig(window_ticks=5))
    assert det.storms == 0 and not log.named(ev.SWAP_STORM_DETECTED)


def test_the_host_memory_state_decides_the_free_link_when_the_host_logs_one() -> None:
    # Free frames plentiful by ESX's thresholds, but the host says it is in its hard state: that counts.
    det, log = replay(storm_ticks(20, free=5000, state="hard"), SwapStormConfig(window_ticks=5))
    assert det.storms == 1
    link = next(l for l in log.named(ev.SWAP_STORM_DETECTED)[0]["chain"] if l["link"] == "host_free_low")
    assert link["value"] == "hard" and link["ok"]


def test_a_share_of_the_guests_can_be_required() -> None:
    # Two of three guests thrash: enough for the default (2), not for a share of 90 %.
    assert replay(storm_ticks(20), SwapStormConfig(window_ticks=5))[0].storms == 1
    assert replay(storm_ticks(20), SwapStormConfig(window_ticks=5, min_guest_share=0.9))[0].storms == 0


def test_esx_min_free() -> None:
    from balloonlab.hostd.monitors.swap_storm import esx_min_free_pages
    gib = 262_144
    assert esx_min_free_pages(gib) == int(0.06 * gib)
    assert esx_min_free_pages(12 * gib) == int(0.06 * 4 * gib + 0.04 * 8 * gib)
    assert esx_min_free_pages(64 * gib) == int(0.06 * 4 * gib + 0.04 * 8 * gib + 0.02 * 16 * gib + 0.01 * 36 * gib)


def test_a_second_storm_counts_only_after_the_chain_stayed_broken() -> None:
    log = Log()
    det = SwapStormDetector(SwapStormConfig(window_ticks=2, quiet_ticks=3), log)
    hist = History(2)
    t = 0

    def run(n: int, storm: bool) -> None:
        nonlocal t
        for _ in range(n):
            busy = [guest(g, t * 10_000.0, swap_in=(1000 * t if storm else 0)) for g in (0, 1)]
            swapped = 50 * t if storm else (hist.now.swap_out_pages if hist.samples else 0)
            hist.push(tick(t, free=100 if storm else 5000, io=2000 + 100 * t, swapped=swapped, guests=tuple(busy)))
            det.check(hist)
            t += 1

    run(5, True)
    run(2, False)       # broken, but not for long enough
    run(3, True)
    assert det.storms == 1
    run(6, False)
    assert log.named(ev.SWAP_STORM_ENDED)
    run(4, True)
    assert det.storms == 2


# -- double faults, pinning, double paging on a real HostMemory ------------------------------------

def blocks(*values: int) -> np.ndarray:
    return np.array(values, np.uint64)


async def test_double_faults_are_logged_with_their_blocks_and_count() -> None:
    """A partial write into a host cache cluster that is not cached reads the rest first (read-modify-write)."""
    hm = make_memory(total_frames=128, swap_slots=128, low_watermark_frames=0)
    FakeGuests(hm).add(1, 16, disk_blocks=64)
    log = Log()
    mon = HostMonitors({"double_faults": {"samples": 2}}, hm, 10_000)
    hm.wire(observer=mon)
    mon["double_faults"].log = log
    mon.guest_joined(1, 16, {"swap_base_block": 32, "swap_blocks": 32})
    await hm.vdisk_write(1, blocks(33, 34), np.array([5, 6], np.uint64), 0.0)   # cluster 2: read 14 first
    await hm.vdisk_write(1, blocks(40), np.array([7], np.uint64), 1.0)           # cluster 2 is cached now
    await hm.vdisk_write(1, blocks(50), np.array([8], np.uint64), 2.0)           # cluster 3: read 15 first
    mon["double_faults"].drain(0)
    (e,) = log.named(ev.DOUBLE_FAULT)
    assert e["count"] == 3 == hm.snapshot()["double_faults"]
    assert e["reads"] == 0 and e["writes"] == 3 and e["in_swap_area"] == 3
    assert e["blocks"] == [33, 34] and e["swap_slots"] == [1, 2]         # a sample of `samples`
    assert e["clusters"] == [2, 3] and e["added_us"] > 0 and not e["swap_area_pinned"]
    mon["double_faults"].drain(1)
    assert len(log.named(ev.DOUBLE_FAULT)) == 1                           # nothing new, nothing logged
    hm.check_invariant()


async def test_pinning_keeps_the_swap_area_cached_so_no_double_fault_follows() -> None:
    hm = make_memory(total_frames=128, swap_slots=128, low_watermark_frames=0)
    FakeGuests(hm).add(1, 16, disk_blocks=64)
    log = Log()
    mon = HostMonitors({"pinning": {"enabled": True, "window_ticks": 1, "calm_ticks": 2, "mode": "resident"}},
                       hm, 10_000)
    hm.wire(observer=mon)
    mon["pinning"].log = log
    mon.guest_joined(1, 16, {"swap_base_block": 32, "swap_blocks": 32})
    vd = hm.vdisk(1)
    await hm.vdisk_write(1, blocks(33, 34, 35), np.array([5, 6, 7], np.uint64), 0.0)   # cluster 2 cached
    faults = vd.counters.double_faults

    major = {"n": 0}

    def end_tick(t: int, swapping: bool, faults: int = 100) -> None:
        if swapping:   # the host counts the swap area's I/O itself; the guest's own count is not used
            vd.counters.swap_area_write_pages += 1000
            major["n"] += faults          # per 10 ms tick: 100 faults = 10,000 per virtual s
        stats = {1: {"vt_us": (t + 1) * 10_000.0, "pff": 0.0, "major_faults": major["n"]}}
        mon.end_tick(t, (t + 1) * 10_000, hm.snapshot(), stats, {1: 0})

    end_tick(0, True)
    end_tick(1, True, faults=5)          # swapping, but PFF 500/s: below pff_high, no pin
    assert not log.named(ev.SWAP_AREA_PINNED)
    end_tick(2, True)
    (pin,) = log.named(ev.SWAP_AREA_PINNED)
    assert pin["guest"] == 1 and pin["blocks"] == 32 and pin["dropped_swapped_pages"] == 0
    assert pin["pinned_pages"] == 16 and pin["mode"] == "resident"
    assert hm.pool.pinned[vd.cache_loc[32:48]].all()
    hm.check_invariant()
    # Neither the budget nor host pressure drops the pinned clusters; a write into them is a plain hit.
    hm.cache.boundary({1: vd}, 2e6, want_frames=10_000)
    assert (vd.cache_state[32:48] == CacheState.FRAME).all()
    await hm.vdisk_write(1, blocks(36), np.array([8], np.uint64), 3e6)
    tokens, _ = await hm.vdisk_read(1, blocks(33, 34, 35, 36), 3e6)
    assert tokens.tolist() == [5, 6, 7, 8]
    assert vd.counters.double_faults == faults
    # Calm for calm_ticks: unpinned, and the clusters may go again.
    end_tick(3, False)
    end_tick(4, False)
    end_tick(5, False)
    assert log.named(ev.SWAP_AREA_UNPINNED) and not mon["pinning"].is_pinned(1)
    assert not hm.pool.pinned.any()
    assert mon.metrics()["pinning"]["pinned_pages_peak"] >= 16
    hm.check_invariant()


async def test_a_page_the_host_swapped_and_the_guest_then_pages_out_is_double_paging() -> None:
    hm = make_memory(total_frames=4, swap_slots=32, low_watermark_frames=0, reclaim_batch_frames=1,
                     cluster_pages=1)
    guests = FakeGuests(hm)
    guests.add(1, 8, disk_blocks=16)
    log = Log()
    mon = HostMonitors({}, hm, 10_000)
    hm.wire(observer=mon)
    mon["double_faults"].log = log
    mon.guest_joined(1, 8, {"swap_base_block": 8, "swap_blocks": 8})
    for g in range(8):                       # 8 pages on 4 frames: the host swaps some out
        await guests.touch(1, np.array([g]), write=True)
    swapped = np.flatnonzero(~guests.backed[1])
    assert swapped.size
    g = int(swapped[0])
    # The guest picks that page to page out: it faults it back in (a host swap-in) ...
    await guests.touch(1, np.array([g]), write=False)
    # ... and writes its content to its swap area.
    await hm.vdisk_write(1, blocks(9), guests.content[1][[g]], 0.0)
    await hm.vdisk_write(1, blocks(10), np.array([12345], np.uint64), 0.0)    # other content: not counted
    mon["double_faults"].drain(0)
    (e,) = log.named(ev.DOUBLE_PAGING_DETECTED)
    assert e["guest"] == 1 and e["pages"] == 1 and e["blocks"] == [9]
    assert mon.metrics()["double_faults"]["double_paging_swap_area_pages"] == 1


# -- the convergence report ---------------------------------------------------------------------------

def test_convergence_time_and_overshoot_after_a_step() -> None:
    log = Log()
    tr = ConvergenceTracker(ConvergenceConfig(enabled=True, start_tick=2, step_fraction=0.1, step_ticks=3, settle_ticks=3,
                                              tolerance_fraction=0.01, pff_high=100.0), 10_000.0, log)
    hist = History(3)
    plan = ([(0, 8000, 0.0)] * 4 + [(0, 6000, 0.0), (200, 6000, 500.0), (400, 6000, 0.0),
                                     (300, 6000, 0.0)] + [(300, 6000, 0.0)] * 5)
    for t, (target, free, pff) in enumerate(plan):
        hist.push(tick(t, free=free, guests=(guest(0, t * 1e4, pff=pff, target=target),)))
        tr.update(hist, {0: target})
    (e,) = log.named(ev.BALLOON_CONVERGED)
    assert e["step_tick"] == 4 and e["settled"]
    assert e["settled_tick"] == 8 and e["convergence_ticks"] == 4       # 300 from tick 7 on: steady from 8
    assert e["overshoot_pages"] == 100 and e["overshoot_fraction"] == pytest.approx(1 / 3, abs=1e-3)
    assert e["pff_above_ticks"] == 1


def test_a_guest_above_its_pff_threshold_keeps_the_step_open() -> None:
    tr = ConvergenceTracker(ConvergenceConfig(enabled=True, start_tick=0, step_fraction=0.1, step_ticks=2, settle_ticks=2,
                                              pff_high=100.0), 10_000.0, Log())
    hist = History(2)
    for t in range(20):
        free = 8000 if t < 3 else 5000
        hist.push(tick(t, free=free, guests=(guest(0, t * 1e4, pff=900.0, target=50),)))
        tr.update(hist, {0: 50})
    (step,) = tr.metrics()["steps"]
    assert not step["settled"] and step["convergence_ticks"] is None
    assert step["longest_pff_above_ticks"] >= 15


async def test_resident_pinning_keeps_the_whole_area_cached_and_never_trims_it() -> None:
    hm = make_memory(total_frames=128, swap_slots=128, low_watermark_frames=0, vdisk_cache_max_pages=4)
    FakeGuests(hm).add(1, 16, disk_blocks=64)
    mon = HostMonitors({"pinning": {"enabled": True, "mode": "resident", "window_ticks": 1}}, hm, 10_000)
    hm.wire(observer=mon)
    mon["pinning"].log = Log()
    mon.guest_joined(1, 16, {"swap_base_block": 32, "swap_blocks": 32})
    vd = hm.vdisk(1)
    for t in range(2):
        vd.counters.swap_area_write_pages += 100
        mon.end_tick(t, (t + 1) * 10_000, hm.snapshot(),
                     {1: {"vt_us": (t + 1) * 10_000.0, "major_faults": 100 * t}}, {1: 0})
    assert mon["pinning"].is_pinned(1) and vd.pinned[32:64].all()
    await hm.vdisk_write(1, np.arange(32, 48, dtype=np.uint64), np.arange(1, 17, dtype=np.uint64), 2e4)
    hm.tick(1e9)
    # More than the cache's bound of 4 pages stays cached: a resident pin is never trimmed.
    assert np.count_nonzero(vd.cache_state[32:48] == CacheState.FRAME) == 16
    assert mon["pinning"].pinned_pages(1) == 16
    hm.check_invariant()
