"""The end-of-run audit lets each guest go once its own claims are checked, not once every guest has answered.

Guest 1 stops itself when the host asks it for its audit
(``BALLOONLAB_PAUSE_AT=1:audit``). The other two answer, get their
``RunEnd`` and exit while the host still waits for guest 1 (its audit call
has a 10 s deadline here): their exit overlaps the audit instead of
following it. After SIGCONT guest 1 answers too and the run ends as any
other: audit ok, nothing lost, every guest finished with ``completed``.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.procs import Launched, dump_logs, wait_until
from tests.rawclient import record_fault, run_pids, wait_guest_stopped
from tests.test_launch import assert_no_leftovers, events_named, read_jsonl, read_jsonl_partial

pytestmark = pytest.mark.multiprocess

STOPPED = 1
OTHERS = (0, 2)
SCENARIO = """
[scenario]
name = "audit-release"
seed = 5
guests = 3
ticks = 4
unresponsive_s = 20.0     # the audit's call deadline: min(10 s, max(2 s, this))

[guest]
ram_mib = 4
kernel_mib = 0.25
regions = [{ name = "heap", kind = "anon", mib = 2 }]
workload = [{ kind = "anon-hot", region = "heap", weight = 1 }]
"""


@pytest.mark.timeout(120)
def test_a_guest_whose_audit_is_checked_ends_while_another_has_not_answered(tmp_path: Path) -> None:
    scenario = tmp_path / "audit-release.toml"
    scenario.write_text(SCENARIO)
    run_dir = tmp_path / "run"
    os.environ["BALLOONLAB_PAUSE_AT"] = f"{STOPPED}:audit"
    try:
        run = Launched("--scenario", str(scenario), "--run-dir", str(run_dir), "--no-report")
    finally:
        os.environ.pop("BALLOONLAB_PAUSE_AT", None)
    try:
        pid = wait_guest_stopped(run, run_dir, STOPPED)
        # well inside the stopped guest's 10 s audit deadline
        wait_until(lambda: not any(f"guest-{g}" in run_pids(run_dir) for g in OTHERS), 8.0, 0.02,
                   f"guests {OTHERS} to exit", lambda: dump_logs(run_dir))
        # They are gone, and the host is still waiting for the stopped guest's claims.
        host_so_far = read_jsonl_partial(run_dir / "host.jsonl")
        assert not events_named(host_so_far, "audit_completed"), dump_logs(run_dir)
        for g in OTHERS:
            fin = events_named(read_jsonl(run_dir / f"guest-{g}.jsonl"), "guest_finished")
            assert [e["reason"] for e in fin] == ["completed"], fin
        os.kill(pid, signal.SIGCONT)
        record_fault(run_dir, f"guest-{STOPPED}", pid, "SIGCONT", at="audit")
        rc = run.wait(60.0)
    finally:
        run.close()
    assert rc == 0, f"{run.err}\n{dump_logs(run_dir)}"
    host = read_jsonl(run_dir / "host.jsonl")
    audit = events_named(host, "audit_completed")
    assert len(audit) == 1 and audit[0]["ok"] is True, audit
    assert all(audit[0]["guests"][str(g)]["answered"] for g in (*OTHERS, STOPPED)), audit
    fin = events_named(host, "run_finished")[0]
    assert fin["reason"] == "completed" and fin["guests_lost"] == {}, fin
    assert events_named(read_jsonl(run_dir / f"guest-{STOPPED}.jsonl"), "guest_finished")[0]["reason"] == "completed"
    summary = json.loads((run_dir / "summary.json").read_text())["variants"]["default"]
    assert summary["audit_ok"] is True and summary["lost_pages"] == 0, summary
    assert_no_leftovers(run_dir)
