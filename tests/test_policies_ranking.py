"""The ranking of controllers (balloonlab/analysis/ranking.py): its arithmetic, and a real run that produces it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from balloonlab.analysis.ranking import Score, jain_index, rank, settle_time_s
from balloonlab.analysis.report import write_report
from tests.procs import run_launcher
from tests.test_launch import assert_no_leftovers, read_jsonl

# -- arithmetic ---------------------------------------------------------------------------------


def test_jain_index() -> None:
    assert jain_index([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)        # one guest gets it all: 1/n
    assert jain_index([1.0, 3.0]) == pytest.approx(16 / (2 * 10))
    assert jain_index([]) is None
    assert jain_index([0.0, 0.0]) == 1.0


def _set(tick: int, guest: int, previous: int, target: int) -> dict[str, Any]:
    return {"event": "balloon_target_set", "tick": tick, "guest": guest, "previous_pages": previous,
            "target_pages": target}


def test_settle_time_is_when_every_target_entered_the_band_for_good() -> None:
    ram = {0: 1000, 1: 1000}     # band: 5 % of 1000 = 50 pages around the final target
    events = [_set(0, 0, 0, 400), _set(10, 0, 400, 300), _set(20, 0, 300, 330),   # in the band from tick 10's end
              _set(5, 1, 0, 100)]
    assert settle_time_s(events, 10_000.0, ram) == pytest.approx(0.11)
    # A late excursion outside the band and back counts until it is back.
    events.append(_set(40, 1, 100, 300))
    events.append(_set(50, 1, 300, 120))
    assert settle_time_s(events, 10_000.0, ram) == pytest.approx(0.51)
    assert settle_time_s([], 10_000.0, ram) == 0.0
    assert settle_time_s([_set(3, 0, 0, 40)], 10_000.0, ram) == 0.0          # never left the band


def test_rank_orders_by_mean_rank_and_shares_ties() -> None:
    rows = rank({
        "a": Score(throughput=100.0, host_swap_io_pages=0.0, fairness=0.9, fairness_raw=0.5, settle_s=1.0),
        "b": Score(throughput=200.0, host_swap_io_pages=0.0, fairness=0.5, fairness_raw=0.5, settle_s=2.0),
        "c": Score(throughput=50.0, host_swap_io_pages=10.0, fairness=None, fairness_raw=None, settle_s=0.0),
    })
    by = {r["variant"]: r for r in rows}
    assert by["a"]["ranks"] == {"throughput": 2, "host_swap_io_pages": 1, "fairness": 1, "settle_s": 2}
    assert by["b"]["ranks"] == {"throughput": 1, "host_swap_io_pages": 1, "fairness": 2, "settle_s": 3}
    assert by["c"]["ranks"] == {"throughput": 3, "host_swap_io_pages": 3, "fairness": 3, "settle_s": 1}
    assert [r["variant"] for r in rows] == ["a", "b", "c"] and [r["position"] for r in rows] == [1, 2, 3]


# -- a real run -----------------------------------------------------------------------------------

@pytest.mark.multiprocess
def test_policies_scenario_runs_every_new_controller_and_ranks_them(tmp_path: Path) -> None:
    """tests-policies: none, squeezed, hyperv, senpai on the same guests; the report ranks them from the logs."""
    run_dir = tmp_path / "run"
    res = run_launcher("--scenario", "tests-policies", "--run-dir", str(run_dir), "--no-report", timeout_s=240.0)
    assert res.returncode == 0, res.stdout + res.stderr
    write_report(run_dir, plots=False)
    summary = json.loads((run_dir / "summary.json").read_text())["variants"]
    names = ["none", "squeezed", "hyperv", "senpai"]
    assert sorted(summary) == sorted(names)
    for n in names:
        assert summary[n]["reason"] == "completed" and summary[n]["lost_pages"] == 0, n
    report = (run_dir / "report.md").read_text()
    section = report.split("### Ranking", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert sorted(r.split("`")[1] for r in rows) == sorted(names)
    # The table's numbers are summary.json's: throughput and host swap I/O per variant.
    for r in rows:
        n = r.split("`")[1]
        cells = [c.strip() for c in r.strip("|").split("|")]
        host = summary[n]["host"]
        assert cells[2].split(" (")[0] == f"{summary[n]['refs_per_vsec']:,.0f}"
        assert cells[3].split(" (")[0] == f"{host['swap_out_pages'] + host['swap_in_pages']:,.0f}"

    # Each new controller decided with its own numbers, logged as balloon_decision events.
    def decisions(variant: str) -> list[dict[str, Any]]:
        return [e for e in read_jsonl(run_dir / variant / "host.jsonl") if e["event"] == "balloon_decision"]

    sq = decisions("squeezed")
    assert {"gamma", "surplus_pages", "dynamic_min_pages", "xen_free_pages"} <= set(sq[0]["inputs"])
    assert any(e["code"] == "freeing_phase" and e["decision"] == "inflate" for e in sq)
    hv = decisions("hyperv")
    assert hv[0]["code"] == "startup"
    assert any({"pressure", "demand_pages", "request_pages", "weight"} <= set(e["inputs"]) for e in hv)
    sp = decisions("senpai")
    assert {e["code"] for e in sp} >= {"reset_to_current", "loosen"}
    # No guest reports psi_some_us yet in this build: the stall came from the guest's clock, and said so.
    psi = any("psi_some_us" in e for e in read_jsonl(run_dir / "senpai" / "guest-0.jsonl"))
    source = "psi_some_us" if psi else "vt_us - refs x ref_cost_us"
    assert any(source in e["reason"] for e in sp)
    assert_no_leftovers(run_dir)
