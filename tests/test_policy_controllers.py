"""squeezed, hyperv and senpai against their sources' formulas, on hand-made views."""
from __future__ import annotations

import math

import numpy as np
import pytest

from balloonlab.hostd.balloon.hyperv import memory_pressure, requested_pages, weighted_fill
from balloonlab.hostd.balloon.senpai import (STALL_DERIVED, STALL_PSI, backoff_factor, memory_stall_us,
                                             probe_factor)
from balloonlab.hostd.balloon.squeezed import Domain, StucknessMonitor, proportional_targets, squeeze_gamma
from balloonlab.hostd.errors import PolicyConfigError
from balloonlab.proto.costs import CostModel
from balloonlab.hostd.balloon import HostView, make_controller
from tests.test_host_balloon import guest


def at(*guests, total: int = 4000, free: int = 0, cache: int = 0, vt_s: float = 0.0, tick: int = 0) -> HostView:
    return HostView(tick=tick, vt_us=vt_s * 1e6, total_frames=total, free_frames=free, cache_pages=cache,
                    iobuf_pages=0, guests=list(guests))


# -- squeezed ---------------------------------------------------------------------------------

def test_gamma_is_surplus_over_ranges_clamped_like_ocaml() -> None:
    assert squeeze_gamma(300, 1200) == 0.25
    assert squeeze_gamma(5000, 1200) == 1.0
    assert squeeze_gamma(0, 1200) == 0.0
    assert squeeze_gamma(0, 0) == 0.0       # NaN -> the minimum (squeeze.ml: constrain)
    assert squeeze_gamma(10, 0) == 1.0      # +inf -> the maximum


def test_proportional_targets_follow_compute_target_adjustments() -> None:
    doms = [Domain(1, dynamic_min=250, dynamic_max=1000, target=1000, actual=1000),
            Domain(2, dynamic_min=500, dynamic_max=1000, target=1000, actual=900)]
    # max free = 100 + (1000-250-2) + (900-500-2) = 1246; surplus = 1246 - 46 = 1200; ranges 750 + 500
    targets, gamma, surplus = proportional_targets(doms, free_pages=100, host_free_target_pages=46, inaccuracy=1)
    assert surplus == 1200 and gamma == pytest.approx(1200 / 1250)
    assert targets == {1: 250 + int(gamma * 750), 2: 500 + int(gamma * 500)}


def test_squeezed_sets_freeing_targets_first_then_allocating_ones() -> None:
    ctl = make_controller("squeezed", {"host_free_target_mib": 0.0, "inaccuracy_pages": 0})
    # RAM 1000 each, dynamic min 350 (max balloon 650), max 1000. Guest 1 holds 1000 pages of memory, guest 2 600.
    # Xen free = 1700 - 1000 - 600 = 100; surplus = 100 + 650 + 250 = 1000; gamma = 1000/1300.
    g1, g2 = guest(1, ram=1000, target=0), guest(2, ram=1000, target=400)
    out = ctl.decide(at(g1, g2, total=1700))
    gamma = 1000 / 1300
    want = {1: 350 + int(gamma * 650), 2: 350 + int(gamma * 650)}   # 850 each
    assert out[1].code == "freeing_phase" and out[1].target_pages == 1000 - want[1]
    assert out[2].code == "waiting_for_freeing" and out[2].target_pages == 400      # it would grow: waits
    assert out[1].inputs["gamma"] == pytest.approx(gamma) and out[1].inputs["xen_free_pages"] == 100
    # Guest 1 has freed its memory: now guest 2 may allocate.
    g1 = guest(1, ram=1000, target=1000 - want[1])
    out = ctl.decide(at(g1, g2, total=1700, vt_s=1.0))
    assert out[2].code == "allocation_phase" and out[2].target_pages == 1000 - want[2]


def test_squeezed_iterates_every_period_within_a_call_and_checks_again_after_balance_check_s() -> None:
    ctl = make_controller("squeezed", {"period_s": 0.5, "balance_check_s": 10.0, "host_free_target_mib": 0.0})
    asked = guest(1, ram=1000, target=0)                  # on a host of 800 frames it must give memory
    first = ctl.decide(at(asked, total=800, vt_s=0.0))
    assert first[1].code == "freeing_phase" and first[1].inputs["balancing_call"] == 1
    assert ctl.decide(at(asked, total=800, vt_s=0.49)) is None
    moving = guest(1, ram=1000, target=first[1].target_pages, actual=10)   # on its way
    assert ctl.decide(at(moving, total=800, vt_s=0.5))[1].code == "target_stands"
    there = guest(1, ram=1000, target=first[1].target_pages)
    done = ctl.decide(at(there, total=800, vt_s=1.0))[1]
    assert done.code == "balanced" and "next check in 10 s" in done.reason
    # Between calls nothing is decided, however the host changes; the next check is 10 s after the call ended.
    assert ctl.decide(at(there, total=700, vt_s=5.0)) is None
    again = ctl.decide(at(there, total=700, vt_s=11.0))[1]
    assert again.code == "freeing_phase" and again.inputs["balancing_call"] == 2


def test_each_balancing_call_judges_stuckness_afresh() -> None:
    ctl = make_controller("squeezed", {"period_s": 1.0, "balance_check_s": 2.0, "host_free_target_mib": 0.0,
                                       "inaccuracy_pages": 0})
    b = ctl.decide(at(guest(1, ram=1000), guest(2, ram=1000), total=1400, vt_s=0.0))
    targets = {g: b[g].target_pages for g in (1, 2)}
    codes = []
    for t in range(1, 8):     # guest 1 never moves, guest 2 follows at once
        out = ctl.decide(at(guest(1, ram=1000, target=targets[1], actual=0),
                            guest(2, ram=1000, target=targets[2]), total=1400, vt_s=float(t)))
        if out is None:
            codes.append(None)
            continue
        targets = {g: out[g].target_pages for g in (1, 2)}
        codes.append(out[1].code)
    assert codes[:6] == ["target_stands"] * 5 + ["stuck"]
    # The call goes on with guest 2 alone until it is balanced, then a new call counts guest 1 in again.
    later = [c for c in codes[6:] if c is not None]
    for t in range(8, 14):
        out = ctl.decide(at(guest(1, ram=1000, target=targets[1], actual=0),
                            guest(2, ram=1000, target=targets[2]), total=1400, vt_s=float(t)))
        if out is not None:
            targets = {g: out[g].target_pages for g in (1, 2)}
            later.append(out[1].code)
    assert "stuck_excluded" in later and later[-1] not in ("stuck", "stuck_excluded"), later


def test_stuckness_monitor_needs_five_seconds_without_progress_toward_a_request() -> None:
    mon = StucknessMonitor(stuck_after_s=5.0, inaccuracy=1)
    asked = Domain(1, 250, 1000, target=600, actual=1000)   # asked to free 400 pages
    for t in (0.0, 2.0, 5.0):
        mon.update([asked], t)
        assert mon.is_active(1)
    mon.update([asked], 5.01)
    assert not mon.is_active(1)
    mon.update([Domain(1, 250, 1000, target=600, actual=990)], 6.0)   # it moved toward the target: active again
    assert mon.is_active(1)
    # At its target, no request: never stuck however long it sits there.
    mon.update([Domain(1, 250, 1000, target=600, actual=600)], 6.5)
    mon.update([Domain(1, 250, 1000, target=600, actual=600)], 60.0)
    assert mon.is_active(1)


def test_a_stuck_guest_is_excluded_and_the_others_are_squeezed_harder() -> None:
    ctl = make_controller("squeezed", {"host_free_target_mib": 0.0, "inaccuracy_pages": 0})
    stuck, ok = 1, 2
    targets = {stuck: 0, ok: 0}
    actual = {stuck: 0, ok: 0}
    out = None
    for second in range(8):
        gs = [guest(gid, ram=1000, target=targets[gid], actual=actual[gid]) for gid in (stuck, ok)]
        out = ctl.decide(at(*gs, total=1400, vt_s=float(second)))
        for gid in (stuck, ok):
            targets[gid] = out[gid].target_pages
        actual[ok] = targets[ok]           # guest 2 follows; guest 1 never moves
        if second == 5:
            assert out[stuck].code != "stuck"       # 5 s without progress is not yet more than 5 s
        if out[stuck].code == "stuck":
            break
    assert out is not None and out[stuck].code == "stuck" and second == 6
    assert out[stuck].inputs["no_progress_s"] == 6.0
    # Squeezed now divides the host among the active guest alone: guest 1's 1000 pages count as taken.
    assert out[ok].inputs["active_guests"] == 1
    # Xen free = 1400 - 1000 - 700 = -300; guest 2 can free 700 - 350: gamma = 50 / 650, memory 350 + 50.
    assert out[ok].target_pages == 1000 - 400 and targets[ok] > 300
    assert ctl.decide(at(*[guest(g, ram=1000, target=targets[g], actual=actual[g]) for g in (stuck, ok)],
                         total=1400, vt_s=7.0))[stuck].code == "stuck_excluded"


def test_squeezed_refuses_bad_params_by_name() -> None:
    with pytest.raises(PolicyConfigError, match="dynamic_min_fraction 0.9 is above dynamic_max_fraction 0.5"):
        make_controller("squeezed", {"dynamic_min_fraction": 0.9, "dynamic_max_fraction": 0.5})
    with pytest.raises(PolicyConfigError, match="'period_s' must be > 0, got 0.0"):
        make_controller("squeezed", {"period_s": 0.0})


# -- hyperv -----------------------------------------------------------------------------------

def test_pressure_and_request_follow_the_documented_formulas() -> None:
    assert memory_pressure(800, 1000) == 80.0
    assert memory_pressure(1200, 1000) == 120.0
    assert requested_pages(500, 20.0, minimum=100, maximum=1000) == 600        # demand + 20 % buffer
    assert requested_pages(900, 20.0, minimum=100, maximum=1000) == 1000       # at most the maximum
    assert requested_pages(10, 20.0, minimum=350, maximum=1000) == 350         # at least the minimum


def test_weighted_fill_splits_by_weight_and_passes_on_what_a_guest_cannot_take() -> None:
    got = weighted_fill(300, np.array([1000.0, 1000.0]), np.array([100.0, 50.0]))
    assert got.tolist() == pytest.approx([200.0, 100.0])
    got = weighted_fill(300, np.array([50.0, 1000.0]), np.array([100.0, 50.0]))
    assert got.tolist() == pytest.approx([50.0, 250.0])
    got = weighted_fill(300, np.array([100.0, 1000.0]), np.array([0.0, 50.0]))    # weight 0 gets the leftovers
    assert got.tolist() == pytest.approx([0.0, 300.0])
    got = weighted_fill(2000, np.array([100.0, 1000.0]), np.array([0.0, 50.0]))
    assert got.tolist() == pytest.approx([100.0, 1000.0])


def test_hyperv_assigns_demand_plus_buffer_when_it_fits() -> None:
    ctl = make_controller("hyperv", {"period_s": 0.1})
    gs = [guest(1, ram=1000, anon_pages=400, kernel_pages=100), guest(2, ram=1000, anon_pages=200, kernel_pages=50)]
    boot = ctl.decide(at(*gs, total=4000))
    assert {g: d.code for g, d in boot.items()} == {1: "startup", 2: "startup"}
    assert boot[1].target_pages == 0                      # startup RAM = all of it
    out = ctl.decide(at(*gs, total=4000, vt_s=0.1))
    assert out[1].code == "requests_fit" and out[1].target_pages == 1000 - 600     # (400 + 100) x 1.2
    assert out[2].target_pages == 1000 - 350      # (200 + 50) x 1.2 = 300, below the minimum 350 (max balloon 650)
    assert out[1].inputs["pressure"] == pytest.approx(50.0)     # 500 demanded of 1000 assigned
    # Committed memory counts anonymous pages the guest swapped out too: demand may exceed what it holds.
    swapped = guest(1, ram=1000, target=400, anon_pages=500, swap_used=300, kernel_pages=100)
    d = ctl.decide(at(swapped, gs[1], total=4000, vt_s=0.2))[1]
    assert d.inputs["demand_pages"] == 900 and d.inputs["pressure"] == pytest.approx(150.0)
    assert d.target_pages == 1000 - 1000                        # 900 x 1.2 = 1080, at most the maximum 1000


def test_hyperv_under_shortage_serves_demand_before_buffers_and_by_weight() -> None:
    ctl = make_controller("hyperv", {"period_s": 0.1, "weights": {"1": 100, "2": 50}})
    gs = [guest(1, ram=1000, anon_pages=700), guest(2, ram=1000, anon_pages=700)]
    ctl.decide(at(*gs, total=1600))
    out = ctl.decide(at(*gs, total=1600, vt_s=0.1))
    # Minimums 350 each (max balloon 650); 900 left: demand (700 - 350 = 350 each) fits, 200 for buffers by weight.
    mem = {g: 1000 - out[g].target_pages for g in (1, 2)}
    assert out[1].code == "shortage_by_weight"
    assert mem[1] + mem[2] <= 1600
    assert mem[1] == pytest.approx(700 + 200 * 2 / 3, abs=1) and mem[2] == pytest.approx(700 + 200 / 3, abs=1)
    # Tighter: not even the demands fit; the heavier guest gets more of it.
    out = ctl.decide(at(*gs, total=1100, vt_s=0.2))
    mem = {g: 1000 - out[g].target_pages for g in (1, 2)}
    assert mem[1] == pytest.approx(350 + 400 * 2 / 3, abs=1) and mem[2] == pytest.approx(350 + 400 / 3, abs=1)


def test_hyperv_refuses_values_set_vmmemory_refuses() -> None:
    with pytest.raises(PolicyConfigError, match=r"'buffer_percent' must be in \[5, 2000\].*got 3.0"):
        make_controller("hyperv", {"buffer_percent": 3.0})
    with pytest.raises(PolicyConfigError, match=r"weight '2' must be an integer in \[0, 100\].*got 101"):
        make_controller("hyperv", {"weights": {"2": 101}})


# -- senpai -----------------------------------------------------------------------------------

def test_stall_prefers_psi_and_otherwise_reads_the_guests_clock() -> None:
    assert memory_stall_us({"psi_some_us": 1234.0, "vt_us": 9e6, "refs": 10}, 0.1) == (1234.0, STALL_PSI)
    # 2 s of virtual time, 15 M references at 0.1 µs = 1.5 s computing: 0.5 s stalled.
    assert memory_stall_us({"vt_us": 2e6, "refs": 15_000_000}, 0.1) == (pytest.approx(5e5), STALL_DERIVED)
    assert memory_stall_us({"free": 3}, 0.1) == (None, "none")


def test_senpai_factors_are_the_sources() -> None:
    # err = 40000 / 10000 = 4; (4 / 20)^2 * 1.0 = 0.04
    assert backoff_factor(40_000, 10_000, 20, 1.0) == pytest.approx(0.04)
    assert backoff_factor(10_000_000, 10_000, 20, 1.0) == 1.0
    # err = 10000 / 5000 = 2; (2 / 10)^2 * 0.01 = 0.0004
    assert probe_factor(5_000, 10_000, 10, 0.01) == pytest.approx(0.0004)
    assert probe_factor(0, 10_000, 10, 0.01) == 0.01       # max(integral, 1): no stall at all probes fully


def _senpai_guest(target: int, vt_us: float, refs: int, **extra: float):
    return guest(1, ram=1000, target=target, free=100, vt_us=vt_us, refs=refs, **extra)


def test_senpai_starts_at_memory_current_probes_after_the_interval_and_backs_off_under_stall() -> None:
    ctl = make_controller("senpai", {"interval": 3})
    ctl.bind_costs(CostModel(mem_ref_us=1.0))
    target, vt, refs = 0, 0.0, 0
    d = ctl.decide(at(_senpai_guest(target, vt, refs), vt_s=0.0))[1]
    assert d.code == "reset_to_current" and d.target_pages == 100     # 1000 - 0 balloon - 100 free = 900 in use
    target = d.target_pages
    codes = []
    for s in range(1, 5):       # no stall: every reference took its 1 µs
        vt += 1e6
        refs += 1_000_000
        d = ctl.decide(at(_senpai_guest(target, vt, refs), vt_s=float(s)))[1]
        codes.append(d.code)
        target = d.target_pages
    assert codes == ["grace", "grace", "grace", "tighten"]
    assert d.target_pages == 1000 - int(900 - 900 * 0.01)              # probe by max_probe: 1 % of the limit
    # Now 40 ms stalled in one second: integral 40,000 > 10,000 -> back off by (4 / 20)^2 = 0.04 at once.
    limit = 1000 - target
    vt += 1e6
    refs += 1_000_000 - 40_000
    d = ctl.decide(at(_senpai_guest(target, vt, refs), vt_s=5.0))[1]
    assert d.code == "loosen" and d.inputs["integral_us"] == pytest.approx(40_000)
    assert d.target_pages == 1000 - int(limit + limit * 0.04)


def test_senpai_uses_psi_when_the_guest_reports_it() -> None:
    ctl = make_controller("senpai", {"interval": 1, "time_scale": 0.1})    # reads every 0.1 s, target 1,000 µs
    ctl.bind_costs(CostModel(mem_ref_us=1.0))
    g = _senpai_guest(0, 0.0, 0, psi_some_us=0.0)
    target = ctl.decide(at(g, vt_s=0.0))[1].target_pages
    # The clock says no stall at all, PSI says 5 ms: PSI wins, so senpai loosens.
    d = ctl.decide(at(_senpai_guest(target, 1e5, 100_000, psi_some_us=5000.0), vt_s=0.1))[1]
    assert d.code == "loosen" and "psi_some_us" in d.reason and d.inputs["integral_us"] == 5000.0
    assert d.inputs["factor"] == pytest.approx(min((5.0 / 20) ** 2, 1.0))


def test_senpai_resets_to_current_when_the_host_changed_the_target() -> None:
    ctl = make_controller("senpai", {"interval": 1})
    target = ctl.decide(at(_senpai_guest(0, 0.0, 0), vt_s=0.0))[1].target_pages
    assert ctl.decide(at(_senpai_guest(target + 50, 1e6, 10_000_000), vt_s=1.0))[1].code == "grace"
    d = ctl.decide(at(_senpai_guest(target + 50, 2e6, 20_000_000), vt_s=2.0))[1]   # someone else moved it
    # Senpai would have probed; memory.high is not what it wrote, so it starts again from memory.current.
    assert d.code == "reset_to_current" and d.target_pages == 1000 - (1000 - (target + 50) - 100)


def test_senpai_without_bound_costs_uses_the_default_cost_model() -> None:
    ctl = make_controller("senpai")
    assert ctl._ref_cost_us() == CostModel().mem_ref_us + CostModel().cpu_us_per_ref
    bound = make_controller("senpai", costs=CostModel(mem_ref_us=2.5, cpu_us_per_ref=0.5))
    assert bound.ref_cost_us == 3.0
    given = make_controller("senpai", {"ref_cost_us": 7.0}, costs=CostModel(mem_ref_us=2.5))
    assert given.ref_cost_us == 7.0
    assert math.isclose(make_controller("senpai", {"time_scale": 0.1}).pressure_us, 1000.0)


def test_xen_free_counts_the_disk_cache_and_every_guests_memory_but_not_io_buffers() -> None:
    from balloonlab.hostd.balloon.squeezed import xen_free_pages
    gs = [guest(1, ram=1000, target=300), guest(2, ram=1000, target=0)]       # memory 700 + 1000
    v = HostView(tick=0, vt_us=0.0, total_frames=3000, free_frames=0, cache_pages=200, iobuf_pages=500, guests=gs)
    assert xen_free_pages(v) == 3000 - 200 - 1700
