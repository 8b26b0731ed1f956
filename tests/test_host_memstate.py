"""ESX memory states: minFree, the states, the reclaim table, allocation targets, boundary reclaim by VM."""
from __future__ import annotations

import numpy as np
import pytest
from structlog.testing import capture_logs

from balloonlab.hostd.balloon import DecisionLog, GuestView, HostView, make_controller
from balloonlab.hostd.balloon.decision import Decision
from balloonlab.hostd.memconfig import host_memory_config
from balloonlab.hostd.memstate import (RECLAIM_BY_STATE, MemoryStates, MemState, VmAllocation, blocks,
                                       derived_alloc_target, may_balloon, may_host_swap, min_free_pages,
                                       plan_boundary_swap, state_of, thresholds_pages)
from balloonlab.hostd.victim.per_vm import PerVmVictims
from balloonlab.proto.errors import ConfigError

from .test_host_fakes import FakeGuests, make_memory

GIB_PAGES = (1 << 30) // 4096
MIB_PAGES = 256


# -- minFree and the states ---------------------------------------------------------

def test_min_free_follows_the_sliding_scale() -> None:
    # The worked examples quote 28 GiB -> 899 MB and 100 GiB -> 1,619 MB, rounding each band down
    # (245 + 327 + 327; + 720 for 1 % of 72 GB); exactly, the bands give 245.76 + 327.68 + 327.68 MiB
    # and 1 % of 72 GiB = 737.28 MiB.
    assert min_free_pages(4 * GIB_PAGES) == round(0.06 * 4 * GIB_PAGES)
    assert min_free_pages(28 * GIB_PAGES) / MIB_PAGES == pytest.approx(245.76 + 327.68 + 327.68, abs=0.01)
    assert min_free_pages(100 * GIB_PAGES) / MIB_PAGES == pytest.approx(901.12 + 737.28, abs=0.01)
    assert min_free_pages(12 * GIB_PAGES) == round(0.06 * 4 * GIB_PAGES + 0.04 * 8 * GIB_PAGES)
    # A small lab host is in the first band: 6 %.
    assert min_free_pages(192 * MIB_PAGES) == round(0.06 * 192 * MIB_PAGES)
    assert min_free_pages(10_000, min_free_pct=2.5) == 250


def test_states_at_their_thresholds() -> None:
    mf = 1000
    assert thresholds_pages(mf) == {"clear": 1000, "soft": 640, "hard": 320, "low": 160,
                                    "high_break_large_pages": 4000}
    cases = [(5000, MemState.HIGH), (1000, MemState.HIGH), (999, MemState.CLEAR), (640, MemState.CLEAR),
             (639, MemState.SOFT), (320, MemState.SOFT), (319, MemState.HARD), (160, MemState.HARD),
             (159, MemState.LOW), (0, MemState.LOW)]
    for free, want in cases:
        assert state_of(free, mf) == want, free


def test_the_reclaim_table() -> None:
    runs = {s.label: [m for m in ("sharing", "balloon", "host_swap", "block") if getattr(RECLAIM_BY_STATE[s], m)]
            for s in MemState}
    assert runs == {"high": [], "clear": [], "soft": ["balloon"], "hard": ["balloon", "host_swap"],
                    "low": ["balloon", "host_swap", "block"]}
    assert [may_balloon(s) for s in MemState] == [False, False, True, True, True]
    assert [may_host_swap(s) for s in MemState] == [False, False, False, True, True]
    above, at = VmAllocation(0, 500, 400), VmAllocation(1, 400, 400)
    assert blocks(MemState.LOW, above) and not blocks(MemState.LOW, at)
    assert not blocks(MemState.HARD, above)


def test_transitions_are_logged_once_each() -> None:
    st = MemoryStates(100_000, min_free_pct=1.0)     # minFree 1,000 frames
    with capture_logs() as logs:
        for tick, free in enumerate([5000, 900, 800, 600, 300, 100, 700]):
            st.update(tick, tick * 10_000.0, free)
    changed = [(e["previous"], e["state"], e["tick"]) for e in logs if e["event"] == "memory_state_changed"]
    assert changed == [("high", "clear", 1), ("clear", "soft", 3), ("soft", "hard", 4), ("hard", "low", 5),
                       ("low", "clear", 6)]
    assert st.ticks_in_state == {"high": 1, "clear": 3, "soft": 1, "hard": 1, "low": 1}
    assert st.summary()["memory_state_changes"] == 5


def test_what_the_engine_asks_mid_tick() -> None:
    st = MemoryStates(100_000, min_free_pct=1.0)
    st.set_alloc_targets({0: VmAllocation(0, 500, 400), 1: VmAllocation(1, 300, 400)})
    seen = {}
    for free in (800, 500, 300, 100):      # clear, soft, hard, low
        st.update(0, 0.0, free)
        seen[st.state.label] = ([st.may_self_swap(g, c) for g, c in ((0, 500), (1, 300))],
                                [st.grows_no_further(g, c) for g, c in ((0, 500), (1, 300))])
    assert seen == {"clear": ([True, True], [False, False]), "soft": ([True, True], [False, False]),
                    "hard": ([True, True], [True, False]), "low": ([False, True], [True, False])}
    # Against what it consumes now: guest 0 back under its target swaps again in low.
    assert st.may_self_swap(0, 350) and not st.blocks(0, 350)


def test_swap_goal_only_in_hard_and_low_up_to_the_soft_threshold() -> None:
    st = MemoryStates(100_000, min_free_pct=1.0)
    for free, goal in [(700, 0), (500, 0), (300, 340), (50, 590)]:
        st.update(0, 0.0, free)
        assert st.swap_goal_frames(free) == goal, free


def test_config_keys_are_checked() -> None:
    cfg = host_memory_config({})
    assert (cfg.memory_states, cfg.victim_scope, cfg.min_free_pct, cfg.low_watermark_pct) == ("esx", "vm", None, None)
    assert cfg.low_watermark_frames(10_000, 96) == 96            # the low state's threshold
    assert host_memory_config({"low_watermark_pct": 2}).low_watermark_frames(10_000, 96) == 200
    assert host_memory_config({"memory_states": "none"}).low_watermark_frames(10_000, None) == 100
    for table, msg in [({"victim_scope": "guest"}, r"victim_scope: must be one of \['vm', 'global'\], got 'guest'"),
                       ({"memory_states": "kvm"}, r"memory_states: must be one of \['esx', 'none'\]"),
                       ({"min_free_pct": 30}, r"min_free_pct: must be <= 25, got 30"),
                       ({"min_free_pct": 0}, r"min_free_pct: must be > 0"),
                       ({"memory_states": "none", "min_free_pct": 2}, r"no effect")]:
        with pytest.raises(ConfigError, match=msg):
            host_memory_config(table)


# -- allocation targets -------------------------------------------------------------

def _guest(gid: int, resident: int, target: int, actual: int, ram: int = 1000) -> GuestView:
    return GuestView(guest_id=gid, ram_pages=ram, max_balloon_pages=650, target_pages=target, actual_pages=actual,
                     resident_pages=resident)


def _view(*guests: GuestView, free: int, state: str | None = None, tick: int = 0) -> HostView:
    return HostView(tick=tick, vt_us=0.0, total_frames=4000, free_frames=free, cache_pages=0, iobuf_pages=0,
                    guests=list(guests), memory_state=state, min_free_frames=240 if state else 0)


class _Fixed:
    name = "fixed"

    def __init__(self, decisions: dict[int, Decision] | None) -> None:
        self.decisions = decisions

    def decide(self, view: HostView) -> dict[int, Decision] | None:
        return self.decisions


def test_balloon_only_decisions_derive_the_allocation_target() -> None:
    log = DecisionLog("fixed")
    g0, g1 = _guest(0, resident=900, target=100, actual=40), _guest(1, resident=700, target=0, actual=0)
    log.decide(_Fixed({0: Decision(300, "x", "x"), 1: Decision(0, "x", "x", alloc_target_pages=500)}),
               _view(g0, g1, free=10))
    # guest 0: 900 consumed, the balloon still owes 300 - 40 = 260 -> 640; guest 1 gave its own.
    assert log.alloc_targets == {0: 640, 1: 500}
    assert derived_alloc_target(900, 300, 40) == 640
    # A tick the controller skips: the derived one follows the standing target, the explicit one stands.
    g0 = _guest(0, resident=800, target=300, actual=200)
    log.decide(_Fixed(None), _view(g0, g1, free=10))
    assert log.alloc_targets == {0: 700, 1: 500}


def test_proportional_inflates_only_from_soft_on() -> None:
    ctl = make_controller("proportional")
    guests = [_guest(0, resident=1000, target=0, actual=0), _guest(1, resident=1000, target=0, actual=0)]
    # 4000 frames, goal 6 % = 240 free; 100 free is short.
    for state, inflates in [(None, True), ("high", False), ("clear", False), ("soft", True), ("hard", True)]:
        d = ctl.decide(_view(*guests, free=100, state=state))
        assert d is not None
        assert (sum(x.target_pages for x in d.values()) > 0) == inflates, state
        if not inflates:
            assert {x.code for x in d.values()} == {"state_no_inflate"}
    # Giving back a surplus is not gated by the state.
    full = [_guest(0, resident=500, target=400, actual=400), _guest(1, resident=500, target=400, actual=400)]
    d = ctl.decide(_view(*full, free=2000, state="high"))
    assert d is not None and sum(x.target_pages for x in d.values()) < 800


# -- the boundary plan --------------------------------------------------------------

def test_plan_takes_from_the_furthest_above_target_first() -> None:
    vms = [VmAllocation(0, 1000, 900), VmAllocation(1, 1000, 600), VmAllocation(2, 1000, 1000)]
    ev = {0: 1000, 1: 1000, 2: 1000}
    assert plan_boundary_swap(100, vms, ev) == {0: 0, 1: 100, 2: 0}
    # 400 -> guest 1 down to 100 above (300), then both level: 1 gives 350, 0 gives 50.
    assert plan_boundary_swap(400, vms, ev) == {0: 50, 1: 350, 2: 0}
    # More than everyone's excess: the rest in proportion to evictable frames.
    got = plan_boundary_swap(800, vms, ev)
    assert sum(got.values()) == 800 and got[1] >= 400 and got[0] >= 100 and got[2] > 0
    # Never more than a VM's evictable frames.
    assert plan_boundary_swap(400, vms, {0: 1000, 1: 50, 2: 1000})[1] == 50
    # Odd remainders go to the lowest id among the level ones: deterministic.
    even = [VmAllocation(0, 100, 0), VmAllocation(1, 100, 0)]
    assert plan_boundary_swap(3, even, {0: 100, 1: 100}) == {0: 2, 1: 1}


# -- host memory's boundary reclaim by state ----------------------------------------

async def _filled(scope_vm: bool, seed: int = 0) -> tuple:  # type: ignore[type-arg]
    states = MemoryStates(1000, min_free_pct=10.0)            # minFree 100: soft < 64, hard < 32, low < 16
    hm = make_memory(total_frames=1000, swap_slots=2000, low_watermark_frames=1, states=states,
                     vm_victims=PerVmVictims(seed, 7) if scope_vm else None)
    guests = FakeGuests(hm)
    for gid in (0, 1, 2):
        guests.add(gid, 600)
    for gid, n in ((0, 330), (1, 330), (2, 320)):
        await guests.touch(gid, np.arange(n), write=True)
    return hm, guests, states


async def test_balance_swaps_nothing_above_hard() -> None:
    hm, guests, states = await _filled(True)
    assert hm.pool.free_frames == 20
    states.update(0, 0.0, 40)        # pretend the boundary saw soft
    assert (await hm.balance(0.0)).freed_frames == 0
    assert hm.counters.swap_out_pages == 0


async def test_balance_in_hard_swaps_the_vm_furthest_above_its_target_to_the_soft_threshold() -> None:
    hm, guests, states = await _filled(True)
    states.update(0, 0.0, hm.pool.free_frames)       # 20 free: hard
    assert states.state == MemState.HARD
    states.set_alloc_targets({0: VmAllocation(0, 330, 330), 1: VmAllocation(1, 330, 250),
                              2: VmAllocation(2, 320, 320)})
    got = await hm.balance(0.0)
    assert got.freed_frames == 44 and hm.pool.free_frames == 64          # up to the soft threshold
    assert [hm.p2m(g).counts()["swapped"] for g in (0, 1, 2)] == [0, 44, 0]
    assert states.swap_out_pages_by_state["hard"] == 44
    assert guests.lost_pages == 0
    await guests.touch(1, np.arange(330), write=False)                  # the content comes back
    assert guests.lost_pages == 0
    hm.check_invariant()


async def test_balance_victims_depend_only_on_the_seed_and_the_vm() -> None:
    picks = []
    for _ in range(2):
        hm, guests, states = await _filled(True, seed=5)
        states.update(0, 0.0, hm.pool.free_frames)
        states.set_alloc_targets({g: VmAllocation(g, 330, 200) for g in (0, 1, 2)})
        await hm.balance(0.0)
        picks.append([np.flatnonzero(hm.p2m(g).state == 2).tolist() for g in (0, 1, 2)])
    assert picks[0] == picks[1] and all(picks[0])


async def test_global_scope_picks_blind() -> None:
    hm, guests, states = await _filled(False)
    states.update(0, 0.0, hm.pool.free_frames)
    states.set_alloc_targets({0: VmAllocation(0, 330, 330), 1: VmAllocation(1, 330, 250),
                              2: VmAllocation(2, 320, 320)})
    got = await hm.balance(0.0)
    assert got.freed_frames == 44
    # Blind: not all from guest 1.
    assert sum(hm.p2m(g).counts()["swapped"] > 0 for g in (0, 1, 2)) >= 2
    hm.check_invariant()
