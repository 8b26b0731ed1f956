"""A guest SIGKILLed mid-deflate: the balloon pages it was taking back are not lost, nor leaked.

Deflation needs the host to want memory back less than before. Here the
``proportional`` controller inflates all three guests while the host is
short; then guest 0 is killed (at its 100th EPT fault), its memory comes
free, and the controller lowers the others' targets. Guest 1 stops itself
right after its ``BalloonDeflate`` went out (the host may have applied it:
those gpfns are no longer the balloon's; the guest never got to reuse
them) and is SIGKILLed there. The host releases everything of both, the
invariant holds, the audit passes, guest 2 runs to the end.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.procs import Launched, dump_logs
from tests.rawclient import fault_points
from tests.test_faults_kill import kill_at_fault_points
from tests.test_launch import assert_no_leftovers, events_named, read_jsonl

pytestmark = pytest.mark.multiprocess

TICKS = 60
SCENARIO = f"""
[scenario]
name = "faults-deflate"
expect_guests_lost = [0, 1]   # killed at their fault points: the run is degraded, as expected
seed = 29
guests = 3
ticks = {TICKS}
metrics_every_ticks = 10

[host]
overcommit = 1.6
cache_max_mib = 0.5

[guest]
ram_mib = 8
kernel_mib = 0.25
policy = "esc"
batch_refs = 1024
regions = [
  {{ name = "db", kind = "file", mib = 3 }},
  {{ name = "heap", kind = "anon", mib = 4 }},
]
workload = [
  {{ kind = "db", region = "db", weight = 2 }},
  {{ kind = "anon-cold", region = "heap", weight = 2 }},
]

[costs]
mem_ref_us = 5.0

[balloon]
policy = "proportional"
"""
VICTIMS = {0: "ept_fault@100", 1: "balloon_deflate"}
SURVIVOR = 2


@pytest.mark.timeout(300)
def test_a_guest_killed_mid_deflate_loses_and_leaks_nothing(tmp_path: Path) -> None:
    scenario = tmp_path / "faults-deflate.toml"
    scenario.write_text(SCENARIO)
    run_dir = tmp_path / "run"
    os.environ["BALLOONLAB_PAUSE_AT"] = ",".join(f"{g}:{p}" for g, p in VICTIMS.items())
    try:
        run = Launched("--scenario", str(scenario), "--run-dir", str(run_dir), "--no-report")
    finally:
        del os.environ["BALLOONLAB_PAUSE_AT"]
    try:
        killed = kill_at_fault_points(run, run_dir, VICTIMS, 150.0)
        rc = run.wait(150.0)
    finally:
        run.close()
    assert set(killed) == set(VICTIMS), f"only {sorted(killed)} reached their fault point\n{dump_logs(run_dir)}"
    assert rc == 0, f"{run.err}\n{dump_logs(run_dir)}"

    host = read_jsonl(run_dir / "host.jsonl")
    deflating = fault_points(run_dir / "guest-1.jsonl")[0]
    assert deflating["point"] == "balloon_deflate" and deflating["pages"] > 0
    # The guest had inflated before: the host lowered its target after guest 0 died.
    targets = [e for e in events_named(host, "balloon_target_set") if e["guest"] == 1]
    assert targets and max(e["target_pages"] for e in targets) > targets[-1]["target_pages"], targets
    fin = events_named(host, "run_finished")[0]
    assert fin["reason"] == "completed" and fin["invariant_violations"] == 0
    assert sorted(fin["guests_lost"]) == ["0", "1"] and sorted(fin["guests_memory"]) == [str(SURVIVOR)]
    assert fin["memory"]["busy_frames"] == 0
    v = json.loads((run_dir / "summary.json").read_text())["variants"]["default"]
    assert v["audit_ok"] is True, v["audit_problems"]
    assert v["lost_pages"] == 0 and v["faults_injected"] == 2
    done = events_named(read_jsonl(run_dir / f"guest-{SURVIVOR}.jsonl"), "guest_finished")
    # A tick in which the host held a request of its across the boundary owes no TickDone.
    assert done and TICKS - fin.get("held_across_boundary", 0) <= done[0]["ticks"] <= TICKS, done
    assert done[0]["stats"]["lost_pages"] == 0
    assert_no_leftovers(run_dir)
