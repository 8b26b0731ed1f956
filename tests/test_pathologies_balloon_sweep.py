"""The thrashing curve: throughput and page-fault frequency against balloon size, over real processes.

``balloon-sweep``: one guest with a 3072-page working set, its balloon
grown by 5 % of its RAM every 8 ticks. Blind (``sweep``), the knee sits
where the guest's free memory drops below its working set; guarded by the
working-set estimate (``sweep-guarded``), the sweep stops before it.
"""
from __future__ import annotations

from typing import Any

import pytest

from tests.pathology_runs import run_scenario

pytestmark = pytest.mark.multiprocess

TRUE_WS = 3072


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("balloon-sweep") / "run"
    variants = run_scenario(run_dir, "balloon-sweep", "--ticks", "125")
    assert sorted(variants) == ["sweep", "sweep-guarded"]
    for name, v in variants.items():
        curve = v["balloon_sweep"]["0"]
        print(f"\n{name}: " + ", ".join(f"{k}={x}" for k, x in curve.items() if k != "steps"))
        for r in curve["steps"]:
            print(f"   balloon {r['balloon_pages']:5d}  free {r['guest_free_pages']:5d}  refs/vs {r['refs_per_vsec']:>10}"
                  f"  faults/vs {r['faults_per_vsec']:>8}  ws estimate {r['working_set_estimate_pages']}")
    return variants


@pytest.mark.timeout(90)
def test_the_knee_is_where_free_memory_drops_below_the_working_set(sweep: dict[str, Any]) -> None:
    curve = sweep["sweep"]["balloon_sweep"]["0"]
    steps = curve["steps"]
    assert curve["true_working_set_pages"] == TRUE_WS
    assert len(steps) >= 8 and steps[0]["balloon_pages"] == 0
    assert curve["knee_guest_free_pages"] is not None, curve
    # The last step that kept throughput had at least the working set free; the knee had less.
    assert curve["knee_guest_free_pages"] < TRUE_WS <= curve["last_good_guest_free_pages"] + 0.02 * TRUE_WS, curve
    knee = next(i for i, r in enumerate(steps) if r["balloon_pages"] == curve["knee_balloon_pages"])
    assert steps[knee]["faults_per_vsec"] >= 1000 and steps[knee]["faults_per_vsec"] > 10 * (
        steps[knee - 1]["faults_per_vsec"] + 10), steps
    # Flat before the knee (the balloon took free and cold memory), collapsed past it.
    assert all(r["refs_per_vsec"] >= 0.8 * curve["baseline_refs_per_vsec"] for r in steps[:knee]), steps
    assert steps[-1]["refs_per_vsec"] < 0.5 * curve["baseline_refs_per_vsec"], steps
    # The guest's own estimate, reported next to the true working set, is close to it before the knee.
    est = steps[knee - 1]["working_set_estimate_pages"]
    assert 0.8 * TRUE_WS <= est <= 1.2 * TRUE_WS, steps


@pytest.mark.timeout(90)
def test_a_sweep_guarded_by_the_working_set_stops_before_the_knee(sweep: dict[str, Any]) -> None:
    curve = sweep["sweep-guarded"]["balloon_sweep"]["0"]
    assert curve["knee_balloon_pages"] is None, curve
    steps = curve["steps"]
    assert all(r["refs_per_vsec"] >= 0.8 * curve["baseline_refs_per_vsec"] for r in steps), steps
    assert all(r["guest_free_pages"] >= TRUE_WS for r in steps), steps
    assert steps[-1]["balloon_pages"] >= 0.5 * 8192                 # it still took most of what was spare
    blind = sweep["sweep"]["balloon_sweep"]["0"]["steps"]
    assert steps[-1]["refs_per_vsec"] > 2 * blind[-1]["refs_per_vsec"], (steps[-1], blind[-1])
