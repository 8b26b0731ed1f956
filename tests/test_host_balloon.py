"""Balloon controller policies on hand-made views, the registry, and the non-cooperation detector."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from balloonlab.hostd.balloon import BALLOON_POLICIES, GuestView, HostView, NonCooperationDetector, make_controller
from balloonlab.hostd.balloon.proportional import shares_per_page
from balloonlab.hostd.errors import PolicyConfigError
from balloonlab.proto.errors import ConfigError


def guest(gid: int, ram: int = 1000, target: int = 0, actual: int | None = None, resident: int | None = None,
          max_balloon: int | None = None, shares: int = 1000, **stats: float) -> GuestView:
    return GuestView(guest_id=gid, ram_pages=ram,
                     max_balloon_pages=int(ram * 0.65) if max_balloon is None else max_balloon,
                     target_pages=target, actual_pages=target if actual is None else actual,
                     resident_pages=ram - target if resident is None else resident,
                     stats=stats, shares=shares)


def view(*guests: GuestView, free: int, total: int = 4000, tick: int = 0) -> HostView:
    return HostView(tick=tick, vt_us=tick * 10_000.0, total_frames=total, free_frames=free,
                    cache_pages=0, iobuf_pages=0, guests=list(guests))


# -- registry ----------------------------------------------------------------------

def test_registry_knows_every_policy() -> None:
    assert sorted(BALLOON_POLICIES) == ["aggressive", "hyperv", "mom", "none", "proportional", "senpai",
                                        "squeezed", "static", "sweep", "working-set"]
    for name in BALLOON_POLICIES:
        assert make_controller(name).name == name


def test_unknown_policy_lists_the_known_names() -> None:
    with pytest.raises(PolicyConfigError, match=r"'greedy' is unknown; known: \['aggressive', 'hyperv', 'mom'"):
        make_controller("greedy")


def test_unknown_and_mistyped_params_are_named() -> None:
    with pytest.raises(PolicyConfigError, match=r"unknown parameter\(s\) \['rate'\]; known: .*pressure_rate"):
        make_controller("mom", {"rate": 0.1})
    with pytest.raises(PolicyConfigError, match="parameter 'pressure_rate': expected a number, got a string 'fast'"):
        make_controller("mom", {"pressure_rate": "fast"})
    with pytest.raises(PolicyConfigError, match="'tax_rate' must be in \\[0, 1\\)"):
        make_controller("proportional", {"tax_rate": 1.0})
    with pytest.raises(PolicyConfigError, match="'period_ticks' must be >= 1, got 0"):
        make_controller("aggressive", {"period_ticks": 0})
    with pytest.raises(ConfigError):       # the scenario loader catches ConfigError
        make_controller("none", {"x": 1})


@pytest.mark.parametrize("name", sorted(BALLOON_POLICIES))
def test_every_policy_clamps_to_zero_and_max(name: str) -> None:
    params: dict[str, Any] = {"fraction": 1.0} if name == "static" else {}
    ctl = make_controller(name, params)
    rng = np.random.default_rng(7)
    for tick in range(30):
        gs = [guest(g, ram=1000, target=int(rng.integers(0, 650)), max_balloon=int(rng.integers(0, 700)),
                    free=float(rng.integers(0, 1000)), working_set_pages=float(rng.integers(0, 1000)),
                    pff=float(rng.integers(0, 300)))
              for g in range(4)]
        out = ctl.targets(view(*gs, free=int(rng.integers(0, 4000)), tick=tick))
        assert set(out) == {g.guest_id for g in gs}
        for g in gs:
            assert 0 <= out[g.guest_id] <= g.max_balloon_pages, (name, g, out)


# -- none, static ---------------------------------------------------------------------

def test_none_never_balloons() -> None:
    assert make_controller("none").targets(view(guest(1, target=50), guest(2), free=0)) == {1: 0, 2: 0}


def test_static_targets_from_start_tick() -> None:
    ctl = make_controller("static", {"targets_mib": {"1": 2, 3: 100}, "fraction": 0.1, "start_tick": 5})
    gs = (guest(1, ram=2000), guest(2, ram=2000), guest(3, ram=2000))
    assert ctl.targets(view(*gs, free=0, tick=4)) == {1: 0, 2: 0, 3: 0}
    assert ctl.targets(view(*gs, free=0, tick=5)) == {1: 512, 2: 200, 3: 1300}   # 3 clamped to 65 %
    with pytest.raises(PolicyConfigError, match="targets_mib key 'a' is not a guest id"):
        make_controller("static", {"targets_mib": {"a": 1}})


# -- mom ----------------------------------------------------------------------------------

def test_mom_shrinks_by_at_most_5_percent_under_pressure() -> None:
    ctl = make_controller("mom")
    out = ctl.targets(view(guest(1, ram=1000, target=100, free=800), free=100, total=4000))
    assert out == {1: 150}


def test_mom_keeps_20_percent_of_the_guest_free() -> None:
    ctl = make_controller("mom")
    # memory 900 pages, 200 free: 20 % of 900 = 180 must stay free -> shrink by 20 only.
    out = ctl.targets(view(guest(1, ram=1000, target=100, free=200), free=100))
    assert out == {1: 120}
    g_after = 1000 - out[1]
    assert 200 - (out[1] - 100) >= 0.2 * g_after
    # Already at the 20 % line: no shrink at all.
    assert ctl.targets(view(guest(1, ram=1000, target=100, free=180), free=100)) == {1: 100}
    # No free stat reported yet: not shrunk.
    assert ctl.targets(view(guest(1, ram=1000, target=100), free=100)) == {1: 100}


def test_mom_ignores_changes_below_a_quarter_percent() -> None:
    ctl = make_controller("mom")
    # 20 % rule leaves a 2-page step on a 1000-page guest: < 2.5 pages, not made.
    assert ctl.targets(view(guest(1, ram=1000, target=100, free=182), free=100)) == {1: 100}
    assert ctl.targets(view(guest(1, ram=1000, target=100, free=183), free=100)) == {1: 103}


def test_mom_grows_guests_back_without_pressure() -> None:
    ctl = make_controller("mom")
    out = ctl.targets(view(guest(1, ram=1000, target=120, free=0), guest(2, ram=1000, target=30), free=3000))
    assert out == {1: 70, 2: 0}


def test_mom_acts_every_period() -> None:
    ctl = make_controller("mom", {"period_ticks": 3})
    g = guest(1, ram=1000, target=100, free=800)
    assert ctl.targets(view(g, free=100, tick=1)) == {1: 100}
    assert ctl.targets(view(g, free=100, tick=3)) == {1: 150}


# -- working-set -----------------------------------------------------------------------------

def test_working_set_never_goes_below_working_set_plus_headroom() -> None:
    ctl = make_controller("working-set", {"headroom": 0.1, "reserve_pages": 10, "max_step_pages": 10_000})
    rng = np.random.default_rng(1)
    for tick in range(50):
        gs = [guest(g, ram=1000, target=int(rng.integers(0, 650)),
                    working_set_pages=float(rng.integers(0, 1000)), pff=0.0) for g in range(3)]
        out = ctl.targets(view(*gs, free=int(rng.integers(0, 800)), tick=tick))
        for g in gs:
            floor = int(np.ceil(g.stats["working_set_pages"] * 1.1)) + 10
            assert out[g.guest_id] <= max(0, 1000 - floor), (g, out)


def test_working_set_takes_the_deficit_from_slack_at_a_limited_rate() -> None:
    ctl = make_controller("working-set", {"free_target_fraction": 0.1, "headroom": 0.0, "reserve_pages": 0,
                                          "max_step_pages": 50})
    gs = (guest(1, ram=1000, working_set_pages=400), guest(2, ram=1000, working_set_pages=900))
    out = ctl.targets(view(*gs, free=300, total=4000))   # deficit 100 pages
    # Slack: guest 1 has 600 (cap 600 with max 650), guest 2 has 100: 6:1, at most 50 each.
    assert out == {1: 50, 2: 15}
    out = ctl.targets(view(*gs, free=0, total=4000))
    assert out == {1: 50, 2: 50}


def test_working_set_lowers_a_target_when_the_working_set_grows() -> None:
    ctl = make_controller("working-set", {"headroom": 0.0, "reserve_pages": 0})
    out = ctl.targets(view(guest(1, ram=1000, target=500, working_set_pages=800), free=900, total=4000))
    assert out == {1: 200}


def test_working_set_backs_off_a_thrashing_guest() -> None:
    ctl = make_controller("working-set", {"pff_high": 50.0, "max_step_pages": 40, "headroom": 0.0,
                                          "reserve_pages": 0})
    gs = (guest(1, ram=1000, target=300, working_set_pages=100, pff=80.0),
          guest(2, ram=1000, target=300, working_set_pages=100, pff=10.0))
    out = ctl.targets(view(*gs, free=100, total=4000))    # under pressure
    assert out[1] == 260          # backs off
    assert out[2] > 300           # the other one covers the deficit
    # Without pressure, and below the release line, a healthy guest is left alone.
    out = ctl.targets(view(*gs, free=500, total=4000))
    assert out == {1: 260, 2: 300}


def test_working_set_releases_when_memory_is_plentiful() -> None:
    ctl = make_controller("working-set", {"release_fraction": 0.2, "max_step_pages": 100})
    out = ctl.targets(view(guest(1, ram=1000, target=300, working_set_pages=100), free=3500, total=4000))
    assert out == {1: 200}


# -- aggressive -----------------------------------------------------------------------------

def test_aggressive_covers_the_whole_deficit_at_once_evenly() -> None:
    ctl = make_controller("aggressive", {"free_target_fraction": 0.25})
    gs = (guest(1, working_set_pages=990), guest(2), guest(3))
    out = ctl.targets(view(*gs, free=100, total=4000))      # deficit 900
    assert out == {1: 300, 2: 300, 3: 300}
    assert sum(out.values()) >= 900


def test_aggressive_does_not_ask_twice_while_guests_catch_up() -> None:
    ctl = make_controller("aggressive", {"free_target_fraction": 0.25})
    gs = (guest(1, target=300, actual=0), guest(2, target=300, actual=0), guest(3, target=300, actual=0))
    assert ctl.targets(view(*gs, free=100, total=4000)) == {1: 300, 2: 300, 3: 300}


# -- proportional -------------------------------------------------------------------------------

def test_shares_per_page_taxes_idle_memory() -> None:
    rho = shares_per_page(np.array([1000.0, 1000.0]), np.array([500.0, 500.0]), np.array([1.0, 0.0]), 0.75)
    assert rho[0] == pytest.approx(1000 / 500)
    assert rho[1] == pytest.approx(1000 / (500 * 4))


def test_proportional_reclaims_from_the_idle_guest_first() -> None:
    ctl = make_controller("proportional", {"free_target_fraction": 0.1})
    gs = (guest(1, ram=1000, working_set_pages=900), guest(2, ram=1000, working_set_pages=100))
    out = ctl.targets(view(*gs, free=300, total=4000))    # deficit 100
    assert out == {1: 0, 2: 100}


def test_proportional_respects_shares() -> None:
    ctl = make_controller("proportional", {"free_target_fraction": 0.1})
    gs = (guest(1, ram=1000, shares=4000, working_set_pages=500), guest(2, ram=1000, working_set_pages=500))
    out = ctl.targets(view(*gs, free=300, total=4000))
    assert out == {1: 0, 2: 100}


def test_proportional_spreads_once_ratios_meet() -> None:
    ctl = make_controller("proportional", {"free_target_fraction": 0.5, "release_fraction": 0.6})
    gs = (guest(1, ram=1000, working_set_pages=500), guest(2, ram=1000, working_set_pages=500))
    out = ctl.targets(view(*gs, free=1600, total=4000))    # deficit 400, equal guests
    assert sum(out.values()) == 400
    assert abs(out[1] - out[2]) <= 400 // 32


def test_proportional_gives_back_to_the_most_deserving_first() -> None:
    ctl = make_controller("proportional", {"free_target_fraction": 0.05, "release_fraction": 0.1})
    gs = (guest(1, ram=1000, target=200, shares=3000, working_set_pages=800),
          guest(2, ram=1000, target=200, working_set_pages=100))
    out = ctl.targets(view(*gs, free=500, total=4000))    # surplus 100
    assert out == {1: 100, 2: 200}


def _tax_pair(**params: object) -> tuple[dict[int, int], dict[int, int]]:
    """An idle guest holding 600 pages (100 active) and a thrashing one ballooned to 400 pages it all uses;
    free memory within the band. Returns the targets before and after."""
    ctl = make_controller("proportional", {"free_target_fraction": 0.05, "release_fraction": 0.2, **params})
    idle = guest(1, ram=1000, target=400, resident=600, host_working_set_pages=100)
    busy = guest(2, ram=1000, target=600, resident=400, host_working_set_pages=400)
    return {1: 400, 2: 600}, ctl.targets(view(idle, busy, free=400, total=4000))


def test_proportional_revokes_from_the_idle_guest_for_a_demanding_one_within_the_band() -> None:
    before, after = _tax_pair(tax_rate=0.75)
    assert after[1] > before[1] and after[2] < before[2]
    # An exchange: the host's expected free memory does not change.
    assert after[1] - before[1] == before[2] - after[2]
    # No more than the demand asks for: the busy guest's working set still fills >= 80 % of what it may use.
    assert 400 >= 0.8 * (1000 - after[2]) - 1000 // 256


def test_proportional_revocation_stops_where_the_rhos_meet() -> None:
    # Tax 0: rho = shares / pages; the busy guest (400 pages) gets pages until both hold about as many.
    _, after = _tax_pair(tax_rate=0.0)
    held_idle, held_busy = 600 - (after[1] - 400), 400 + (600 - after[2])
    assert after[2] < 600
    # Stopped once the busy guest's rho is within the 10 % hysteresis of the idle one's (one chunk: 3 pages).
    assert 1.0 <= held_idle / held_busy <= 1.1 and (held_idle + 3) / (held_busy - 3) > 1.1


def test_proportional_does_not_revoke_for_a_guest_that_does_not_demand_or_when_off() -> None:
    ctl = make_controller("proportional", {"free_target_fraction": 0.05, "release_fraction": 0.2})
    # The small guest has the higher rho but touches little of what its balloon leaves it: no demand.
    idle = guest(1, ram=1000, target=400, resident=600, host_working_set_pages=100)
    lazy = guest(2, ram=1000, target=600, resident=400, host_working_set_pages=150)
    assert ctl.targets(view(idle, lazy, free=400, total=4000)) == {1: 400, 2: 600}
    assert _tax_pair(tax_rate=0.75, revoke_on_demand=False)[1] == {1: 400, 2: 600}


def test_proportional_revokes_only_for_a_guest_that_pages() -> None:
    # The same pair as _tax_pair, but the busy guest's pages all fit (it barely faults): nothing moves, however
    # its sampled working set compares; thrashing (pff 3000) it gets memory.
    ctl = make_controller("proportional", {"free_target_fraction": 0.05, "release_fraction": 0.2,
                                           "tax_rate": 0.75})
    idle = guest(1, ram=1000, target=400, resident=600, host_working_set_pages=100, pff=0.0)
    fits = guest(2, ram=1000, target=600, resident=400, host_working_set_pages=400, pff=20.0)
    assert ctl.targets(view(idle, fits, free=400, total=4000)) == {1: 400, 2: 600}
    pages = guest(2, ram=1000, target=600, resident=400, host_working_set_pages=400, pff=3000.0)
    after = ctl.targets(view(idle, pages, free=400, total=4000))
    assert after[1] > 400 and after[2] < 600


def test_proportional_gives_a_surplus_back_only_to_a_guest_that_demands_memory() -> None:
    ctl = make_controller("proportional", {"free_target_fraction": 0.05, "release_fraction": 0.1})
    # Surplus 100. The idle guest touches 100 of the 600 pages its balloon leaves it: it would never back
    # pages given back, the host's free memory would not fall and the same surplus would go again next step.
    idle = guest(1, ram=1000, target=400, resident=600, host_working_set_pages=100)
    assert ctl.targets(view(idle, free=500, total=4000)) == {1: 400}
    busy = guest(2, ram=1000, target=400, resident=600, host_working_set_pages=590)
    assert ctl.targets(view(idle, busy, free=500, total=4000)) == {1: 400, 2: 300}
    anyone = make_controller("proportional", {"free_target_fraction": 0.05, "release_fraction": 0.1,
                                              "release_needs_demand": False})
    assert anyone.targets(view(idle, free=500, total=4000)) == {1: 300}


# -- non-cooperation ----------------------------------------------------------------------------------

def test_a_guest_that_does_not_follow_its_target_is_flagged() -> None:
    det = NonCooperationDetector(stall_ticks=3)
    stuck = [guest(1, target=100, actual=10), guest(2, target=100, actual=10)]
    assert det.update(view(*stuck, free=0, tick=0)) == frozenset()
    for tick, moving in enumerate((20, 30, 40), start=1):
        flagged = det.update(view(guest(1, target=100, actual=10), guest(2, target=100, actual=moving),
                                  free=0, tick=tick))
    assert flagged == {1}
    # Progress clears it; reaching the target too.
    assert det.update(view(guest(1, target=100, actual=11), free=0)) == frozenset()
    assert det.update(view(guest(1, target=100, actual=100), free=0)) == frozenset()


def test_deflation_that_does_not_happen_is_flagged_too() -> None:
    det = NonCooperationDetector(stall_ticks=2)
    for tick in range(3):
        flagged = det.update(view(guest(1, target=0, actual=50), free=0, tick=tick))
    assert flagged == {1}
