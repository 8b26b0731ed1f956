"""The controllers issue #5 adds or extends, and the analysis of a balloon sweep, on hand-made input.

``sweep`` steps targets up (optionally stopping at the working set);
``working-set`` leaves frames the host never backed out of its slack and
remembers a larger recent working-set estimate; ``aggressive`` waits for
``start_tick``. ``sweep_curve`` finds the knee in logged ticks.
"""
from __future__ import annotations

from typing import Any

import pytest

from balloonlab.hostd.balloon import GuestView, HostView, make_controller
from balloonlab.hostd.errors import PolicyConfigError
from balloonlab.proto import events as ev
from balloonlab.analysis.pathologies import sweep_curve, true_working_set_pages


def guest(gid: int, ram: int = 1000, target: int = 0, actual: int | None = None, resident: int | None = None,
          **stats: float) -> GuestView:
    return GuestView(guest_id=gid, ram_pages=ram, max_balloon_pages=int(ram * 0.8), target_pages=target,
                     actual_pages=target if actual is None else actual,
                     resident_pages=ram - target if resident is None else resident, stats=stats)


def view(*guests: GuestView, free: int, total: int = 4000, tick: int = 0) -> HostView:
    return HostView(tick=tick, vt_us=tick * 1e4, total_frames=total, free_frames=free, cache_pages=0,
                    iobuf_pages=0, guests=list(guests))


def test_sweep_steps_targets_up_to_the_maximum() -> None:
    ctl = make_controller("sweep", {"start_tick": 10, "step_ticks": 5, "step_fraction": 0.1, "max_fraction": 0.35})
    g = guest(1)
    got = [ctl.targets(view(g, free=0, tick=t))[1] for t in (0, 9, 10, 14, 15, 20, 25, 60)]
    assert got == [0, 0, 100, 100, 200, 300, 350, 350]


def test_a_guarded_sweep_stops_at_the_working_set_and_backs_off_when_it_grows() -> None:
    ctl = make_controller("sweep", {"start_tick": 0, "step_ticks": 1, "step_fraction": 0.2, "max_fraction": 0.8,
                                    "respect_working_set": True, "headroom": 0.0, "reserve_pages": 0})
    g = guest(1, target=200, working_set_pages=500, kernel_pages=100)
    assert ctl.targets(view(g, free=0, tick=5))[1] == 400          # 1000 - 500 - 100 kernel pages
    grown = guest(1, target=400, working_set_pages=700, kernel_pages=100)
    assert ctl.targets(view(grown, free=0, tick=6))[1] == 200      # the working set grew past the balloon


def test_sweep_refuses_bad_parameters_by_name() -> None:
    with pytest.raises(PolicyConfigError, match="step_ticks"):
        make_controller("sweep", {"step_ticks": 0})
    with pytest.raises(PolicyConfigError, match="max_fraction"):
        make_controller("sweep", {"max_fraction": 1.5})


def test_working_set_leaves_a_guest_whose_slack_the_host_never_backed() -> None:
    ctl = make_controller("working-set", {"free_target_fraction": 0.1, "headroom": 0.0, "reserve_pages": 0,
                                          "max_step_pages": 50})
    # Guest 1 touched 600 of its 1000 pages and uses 550: 400 untouched, 50 it could give.
    # Guest 2 touched 900 and uses 500: 100 untouched, 400 it could give.
    busy = guest(1, resident=600, working_set_pages=550)
    idle = guest(2, resident=900, working_set_pages=500)
    out = ctl.targets(view(busy, idle, free=300))                 # deficit 100
    # Shares of what the host gains: 50:400 (12 and 89, at most 50 each); untouched frames go along.
    assert out == {1: 12 + 400, 2: 50 + 100}
    # A guest whose only slack is untouched frames is not inflated at all.
    full = guest(1, resident=600, working_set_pages=600)
    assert ctl.targets(view(full, free=300)) == {1: 0}


def test_working_set_remembers_a_larger_recent_estimate() -> None:
    ctl = make_controller("working-set", {"headroom": 0.0, "reserve_pages": 0, "ws_decay": 0.9,
                                          "free_target_fraction": 0.5, "release_fraction": 0.6,
                                          "max_step_pages": 1000})
    ctl.targets(view(guest(1, working_set_pages=800), free=0))
    # The estimate collapses (a stalled guest touches fewer pages): the cap follows it only slowly.
    out = ctl.targets(view(guest(1, working_set_pages=100), free=0))
    assert out[1] <= 1000 - 720


def test_aggressive_waits_for_its_start_tick() -> None:
    ctl = make_controller("aggressive", {"free_target_fraction": 0.25, "start_tick": 30})
    gs = (guest(1), guest(2))
    assert ctl.targets(view(*gs, free=100, tick=29)) == {1: 0, 2: 0}
    assert ctl.targets(view(*gs, free=100, tick=30)) == {1: 450, 2: 450}


# -- the analysis ---------------------------------------------------------------------------------

def ticks(rows: list[tuple[int, int, float]]) -> list[dict[str, Any]]:
    """Guest tick_completed events: (balloon pages, faults per tick, refs per tick) for each logged tick."""
    out = []
    refs = faults = 0.0
    for t, (balloon, f, r) in enumerate(rows):
        refs += r
        faults += f
        out.append({"event": ev.TICK_COMPLETED, "tick": t, "vt_us": (t + 1) * 10_000.0, "refs": refs,
                    "major_faults": faults, "minor_faults": 0, "balloon_target_pages": balloon,
                    "balloon_actual_pages": balloon, "total": 1000, "kernel_pages": 100,
                    "working_set_pages": 390, "pff": f * 100.0})
    return out


def test_the_knee_is_the_first_step_below_half_the_first_steps_throughput() -> None:
    rows = ([(0, 0, 10_000)] * 3 + [(200, 0, 10_000)] * 3 + [(400, 0, 9_800)] * 3 + [(550, 30, 4_000)] * 3
            + [(700, 90, 900)] * 3)
    curve = sweep_curve(ticks(rows), true_ws=400)
    assert curve is not None
    assert [r["balloon_pages"] for r in curve["steps"]] == [0, 200, 400, 550, 700]
    assert curve["knee_balloon_pages"] == 550 and curve["knee_guest_free_pages"] == 350
    assert curve["last_good_guest_free_pages"] == 500
    assert curve["steps"][3]["faults_per_vsec"] == pytest.approx(3000.0)
    assert curve["steps"][0]["true_working_set_pages"] == 400
    assert sweep_curve(ticks([(0, 0, 1)] * 5), true_ws=None) is None      # the balloon never moved


def test_the_true_working_set_comes_from_the_workload() -> None:
    g = {"ram_mib": 8, "regions": [{"name": "h", "kind": "anon", "pages": 300},
                                   {"name": "c", "kind": "anon", "pages": 200}],
         "workload": [{"kind": "anon-hot", "region": "h", "ws_pages": 120}, {"kind": "anon-cold", "region": "c"}]}
    assert true_working_set_pages(g) == 120
    g["workload"] = [{"kind": "db", "region": "h"}]
    assert true_working_set_pages(g) is None
