"""A fault of many host-swapped pages stops at the tick's end: the guests' clocks stay with the host's.

When a thrashing guest finds the frames of the references ahead taken by
the host, it faults them all in one EptFault (the paging core's window). A
vCPU takes such faults one after another, so the host reads them one after
another; before the host stopped at the gate, one such message of 100-360
host-swapped pages read them all, 10-40 virtual ms past the tick's end, and
the guest's clock stayed ahead of the host's for one to four more ticks
(swap-storm, nested-swap, validate-fig7, validate-esx41). Now the pages whose
turn comes after the gate are answered ``LATER_TOKEN`` and faulted again in
the next tick. This run (two 32 MiB guests, 26 MiB hot each, on 1.3x
overcommit: swap-storm's busy guests without a balloon) fails the clock check
without that: guest 1's clock is 17.8 ms past the end of tick 5.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from balloonlab.analysis.clocks import check_clocks
from tests.procs import dump_logs, procs_mentioning, run_launcher

pytestmark = pytest.mark.multiprocess

TICKS = 12
SCENARIO = f"""\
[scenario]
name = "fault-window"
seed = 7
guests = 2
ticks = {TICKS}
metrics_every_ticks = 1

[host]
overcommit = 1.3
victim = "random"
vdisk_cache = "writeback"
cache_max_mib = 16

[guest]
ram_mib = 32
kernel_mib = 1
policy = "esc"
regions = [ {{ name = "heap", kind = "anon", mib = 28 }} ]
workload = [ {{ kind = "anon-hot", region = "heap", ws_pages = 6656, write_frac = 0.3 }} ]

[costs]
cpu_us_per_ref = 0.9

[disk.vdisk]
profile = "ssd"
[disk.swap]
profile = "ssd"
"""


@pytest.mark.timeout(120)
def test_a_window_of_host_swapped_pages_stops_at_the_gate(tmp_path: Path) -> None:
    scenario = tmp_path / "fault-window.toml"
    scenario.write_text(SCENARIO)
    run_dir = tmp_path / "run"
    res = run_launcher("--scenario", str(scenario), "--run-dir", str(run_dir), "--no-report", timeout_s=90)
    assert res.returncode == 0, f"stderr:\n{res.stderr}\n{dump_logs(run_dir)}"
    assert not procs_mentioning(str(run_dir))

    (check,) = check_clocks(run_dir)
    assert check.ticks_checked >= 2 * (TICKS - 2), check    # a tick held across a boundary owes no TickDone
    assert check.late == 0 and check.early == 0 and check.ahead == 0, check.worst
    assert check.host_late == 0, (check.host_late, check.host_max_over_us)

    summary = json.loads((run_dir / "summary.json").read_text())
    variant = summary["variants"]["default"]
    host = variant["host"]
    # The path under test ran: windows were cut at the gate, and their pages came back later, whole.
    assert host["ept_faults_cut"] > 0 and host["ept_fault_later_pages"] > 0, host
    assert variant["lost_pages"] == 0
    # In flight at the gate: one read behind the fault's own direct reclaim, not a chain of them (the run's
    # last tick excepted: there a fault in flight completes whole, guestd/gate.py).
    for gid in (0, 1):
        for line in (run_dir / f"guest-{gid}.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e.get("event") == "tick_completed" and e["tick"] < TICKS - 1:
                assert e["tick_inflight_us"] < 1_000, (gid, e["tick"], e["tick_inflight_us"])
