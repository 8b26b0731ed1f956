"""The "central banker": after a step in host demand the working-set controller settles, over real processes.

``central-banker`` with two guests (one busy, one whose working set moves to
fresh pages at about tick 30) for 0.7 virtual seconds. ``working-set``
settles within a bounded number of ticks with no guest's PFF above the
threshold for long; ``aggressive`` pushes the busy guest below its working
set and never settles.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balloonlab.proto import events as ev
from tests.pathology_runs import headline, host_events, run_scenario

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def banker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("central-banker") / "run"
    variants = run_scenario(run_dir, "central-banker", "--guests", "2", "--ticks", "70")
    assert sorted(variants) == ["aggressive", "working-set"]
    for name, v in variants.items():
        print(headline(name, v), "\n   convergence:", v["convergence"]["steps"])
    return run_dir, variants


@pytest.mark.timeout(90)
def test_the_working_set_controller_settles_after_the_step(banker: tuple[Path, dict]) -> None:
    run_dir, variants = banker
    ws = variants["working-set"]
    steps = ws["convergence"]["steps"]
    assert steps, ws["convergence"]
    first = steps[0]
    assert 25 <= first["step_tick"] <= 45, first               # the phased guest's move, not the warm-up
    assert first["settled"] and first["convergence_ticks"] <= 30, first
    assert first["longest_pff_above_ticks"] <= 15, first
    assert first["overshoot_fraction"] <= 0.25, first
    logged = host_events(run_dir, "working-set", ev.BALLOON_CONVERGED)
    assert logged and logged[0]["convergence_ticks"] == first["convergence_ticks"]
    assert ws["swap_storms"] == 0


@pytest.mark.timeout(90)
def test_inflating_everyone_at_once_puts_the_busy_guest_in_recession(banker: tuple[Path, dict]) -> None:
    _, variants = banker
    agg, ws = variants["aggressive"], variants["working-set"]
    msg = headline("aggressive", agg) + "\n" + headline("working-set", ws)
    first = agg["convergence"]["steps"][0]
    assert not first["settled"] or first["pff_above_ticks"] >= 3 * ws["convergence"]["steps"][0]["pff_above_ticks"], msg
    assert first["longest_pff_above_ticks"] >= 20, first
    busy_agg, busy_ws = agg["guests"][0], ws["guests"][0]
    assert busy_agg["refs_per_vsec"] < 0.6 * busy_ws["refs_per_vsec"], msg
