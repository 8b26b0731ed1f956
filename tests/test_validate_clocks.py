"""``balloonlab-validate --clocks``: the guests' clocks against the host's at tick ends, from a run's logs.

Synthetic logs pin the rule (a guest at a tick end is at or past the host's
end of that tick, by at most one reference, a zero fill and a balloon round
plus what was in flight; the host's own count over every TickDone fails the
check too); the command reads every variant of a run directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from balloonlab.analysis.clocks import check_clocks
from balloonlab.validate import main

TICK_US = 10_000
REF_US = 1.0   # mem_ref_us 0.1 + cpu_us_per_ref 0.9


def _write_run(root: Path, guest_vt: dict[int, list[tuple[int, float, float]]], *, host_late: int = 0,
               locks: dict[str, Any] | None = None) -> Path:
    """One variant: the host's tick ends every tick, each guest's (tick, tick_vt_us, tick_inflight_us)."""
    v = root / "run" / "only"
    v.mkdir(parents=True)
    (v / "host-config.json").write_text(json.dumps({
        "tick_us": TICK_US, "costs": {"cpu_us_per_ref": 0.9}, "locks": locks or {}}))
    ticks = sorted({t for rows in guest_vt.values() for t, _, _ in rows})
    with open(v / "host.jsonl", "w") as f:
        for t in ticks:
            f.write(json.dumps({"event": "tick_completed", "tick": t, "vt_us": (t + 1) * TICK_US}) + "\n")
    for gid, rows in guest_vt.items():
        with open(v / f"guest-{gid}.jsonl", "w") as f:
            for t, vt, inflight in rows:
                f.write(json.dumps({"event": "tick_completed", "tick": t, "tick_vt_us": vt,
                                    "tick_inflight_us": inflight, "vt_us": vt}) + "\n")
    (root / "run" / "summary.json").write_text(json.dumps(
        {"variants": {"only": {"host": {"tick_done_late": host_late, "tick_done_max_over_us": 0.0}}}}))
    return root / "run"


def test_guests_within_one_reference_plus_the_request_in_flight_pass(tmp_path: Path) -> None:
    run = _write_run(tmp_path, {0: [(0, 10_000.5, 0.0), (1, 20_000.0, 0.0), (2, 30_350.0, 349.0)],
                                1: [(0, 10_000.9, 0.0), (1, 20_001.0, 0.0), (2, 30_000.2, 0.0)]})
    [c] = check_clocks(run)
    assert c.ok and c.ticks_checked == 6 and c.guests == 2 and c.late == 0 and c.early == 0
    assert c.max_inflight_us == 349.0


def test_a_guest_past_the_bound_or_before_the_tick_end_fails(tmp_path: Path) -> None:
    # The fixed part of the bound: one reference (1 µs) + a zero fill (0.75 + 0.25) + a balloon round (256 µs).
    run = _write_run(tmp_path, {0: [(0, 10_000.0 + 258.0 + 50.0 + 0.5, 50.0), (1, 19_990.0, 0.0),
                                    (2, 30_000.0, 0.0)]})
    [c] = check_clocks(run)
    assert not c.ok and c.late == 1 and c.early == 1
    assert {w["tick"]: w["what"] for w in c.worst} == {0: "past the bound", 1: "before the tick's end"}


def test_a_request_counts_only_in_the_tick_it_was_sent_in(tmp_path: Path) -> None:
    # Tick 0: a fault sent before the gate completes 25 ms late (in flight: allowed). Ticks 1 and 2: the
    # guest's clock is still past their ends with nothing in flight: late, as the host counts them.
    run = _write_run(tmp_path, {0: [(0, 35_000.0, 25_000.0), (1, 35_000.0, 15_000.0), (2, 35_000.0, 5_000.0),
                                    (3, 40_000.5, 0.0)]})
    [c] = check_clocks(run)
    assert c.late == 2 and c.ahead == 2 and not c.ok
    assert [w["tick"] for w in c.worst] == [1, 2]


def test_the_host_s_own_count_over_every_tick_done_fails_the_check_and_locks_are_exempt(tmp_path: Path) -> None:
    rows = {0: [(0, 10_000.0, 0.0)]}
    [c] = check_clocks(_write_run(tmp_path / "a", rows, host_late=2))
    assert not c.ok and c.host_late == 2
    [c] = check_clocks(_write_run(tmp_path / "b", {0: [(0, 25_000.0, 0.0)]}, locks={"protocol": "naive"}))
    assert c.late == 1 and c.exempt == "lock model" and c.ok


def test_the_command_reads_run_directories_and_names_a_missing_one(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    good = _write_run(tmp_path / "a", {0: [(0, 10_000.0, 0.0)]})
    bad = _write_run(tmp_path / "b", {0: [(0, 10_400.0, 0.0)]})
    assert main(["--clocks", str(good)]) == 0
    assert main(["--clocks", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "tick 0: past the bound" in out
    assert main(["--clocks", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
