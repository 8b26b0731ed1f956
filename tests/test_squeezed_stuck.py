"""squeezed's stuck detection on a guest frozen on purpose (SIGSTOP), in a real run.

Guest 1 stops itself in its first tick, right after its second EPT fault
went out (``BALLOONLAB_PAUSE_AT=1:ept_fault@2``), before any balloon target
reached it (a guest's balloon moves a whole target in one batch at its next
tick, so a guest frozen later has nothing left to owe). Squeezed asks every
guest to free memory at the end of that tick and this one never moves
toward its target. The host's watchdog takes it out of the tick barrier
(after 10 wall s: a guest's first tick gets at least that), virtual time
goes on, and squeezed must declare it stuck once it has
made no progress for more than 5 virtual seconds (not before), leave it out
of gamma's sums and squeeze the other two harder. Then the test sends
SIGCONT: the guest inflates to its target; the balancing call ends, and
the next one (``balance_check_s`` later, from a fresh squeezer as squeezed
starts each call) counts it in again.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Launched, dump_logs
from tests.rawclient import record_fault, wait_guest_stopped
from tests.test_launch import assert_no_leftovers, events_named, read_jsonl, read_jsonl_partial

pytestmark = pytest.mark.multiprocess

FROZEN = 1
TICK_US = 100_000          # 0.1 virtual s a tick: 5 s are 50 ticks
PERIOD_S = 0.5
TICKS = 150
SCENARIO = f"""
[scenario]
name = "squeezed-stuck"
seed = 5
guests = 3
ticks = {TICKS}
tick_us = {TICK_US}
metrics_every_ticks = 10
watchdog_s = 0.5
unresponsive_s = 1.0
# 2 virtual s per wall s at most: the test sees the stuck declaration (it re-reads a log that grows by
# every decision) and unfreezes the guest long before another 5 virtual s could declare it stuck again
pace = 2.0

[host]
overcommit = 1.5
uncooperative_ticks = 1000   # the host's own detector (50 ticks = 5 s here) would clamp the target first
cache_max_mib = 0.5

[guest]
ram_mib = 4
kernel_mib = 0.25
policy = "esc"
batch_refs = 1024
regions = [ {{ name = "heap", kind = "anon", mib = 1 }} ]   # fits in dynamic_min: squeezing never stalls a balloon
workload = [ {{ kind = "anon-hot", region = "heap", write_frac = 0.3 }} ]

[costs]
mem_ref_us = 100.0        # 1000 references per 0.1 s tick: cheap in wall time

[balloon]
policy = "squeezed"
log_decisions = "all"     # every decision of every tick, holds too: the test reads them all
params = {{ period_s = {PERIOD_S}, host_free_target_mib = 0.25, balance_check_s = 1.0 }}
"""


def _decisions(run_dir: Path) -> list[dict[str, Any]]:
    return events_named(read_jsonl_partial(run_dir / "host.jsonl"), "balloon_decision")


def test_a_frozen_guest_is_declared_stuck_after_five_virtual_seconds_and_rejoins(tmp_path: Path) -> None:
    scenario = tmp_path / "squeezed-stuck.toml"
    scenario.write_text(SCENARIO)
    run_dir = tmp_path / "run"
    os.environ["BALLOONLAB_PAUSE_AT"] = f"{FROZEN}:ept_fault@2"
    try:
        run = Launched("--scenario", str(scenario), "--run-dir", str(run_dir), "--no-report",
                       "--log-level", "info")
    finally:
        os.environ.pop("BALLOONLAB_PAUSE_AT", None)
    try:
        pid = wait_guest_stopped(run, run_dir, FROZEN)
        frozen_at = time.monotonic()
        while not [e for e in _decisions(run_dir) if e["guest"] == FROZEN and e["code"] == "stuck"]:
            assert time.monotonic() - frozen_at < 120.0 and run.proc.poll() is None, \
                f"squeezed never declared the frozen guest stuck\n{dump_logs(run_dir)}"
            time.sleep(0.05)
        os.kill(pid, signal.SIGCONT)
        record_fault(run_dir, f"guest-{FROZEN}", pid, "SIGCONT", at="ept_fault@2")
        rc = run.wait(150.0)
    finally:
        run.close()
    assert rc == 0, f"{run.err}\n{dump_logs(run_dir)}"
    host = read_jsonl(run_dir / "host.jsonl")
    decisions = events_named(host, "balloon_decision")
    mine = [e for e in decisions if e["guest"] == FROZEN]
    stuck = [e for e in mine if e["code"] == "stuck"]
    assert len(stuck) == 1, [(e["tick"], e["code"]) for e in mine]
    d = stuck[0]
    # More than 5 virtual seconds without progress, and declared at the first iteration after that.
    assert 5.0 < d["inputs"]["no_progress_s"] <= 5.0 + PERIOD_S + 1e-6, d
    assert d["inputs"]["memory_actual_pages"] > d["inputs"]["memory_target_pages"]   # it still owed pages
    # Every earlier decision for it counted it in; the others were never stuck.
    assert all(e["code"] != "stuck_excluded" for e in mine if e["tick"] < d["tick"])
    assert not [e for e in decisions if e["guest"] != FROZEN and e["code"].startswith("stuck")]
    # From then on the others are squeezed alone: one active guest fewer in gamma's sums.
    others_then = [e for e in decisions if e["guest"] != FROZEN and e["tick"] == d["tick"]]
    assert others_then and all(e["inputs"]["active_guests"] == 2 for e in others_then)
    before = [e for e in decisions if e["guest"] != FROZEN and e["tick"] < d["tick"]]
    assert before and before[-1]["inputs"]["active_guests"] == 3
    # After SIGCONT it met its target; the call that declared it stuck ended, and the next counted it in again.
    after = [e for e in mine if e["tick"] > d["tick"]]
    assert after and not after[-1]["code"].startswith("stuck"), [(e["tick"], e["code"]) for e in after]
    assert after[-1]["inputs"]["balancing_call"] > d["inputs"]["balancing_call"]
    assert after[-1]["actual_pages"] == after[-1]["target_pages"]
    fin = events_named(host, "run_finished")[0]
    assert fin["reason"] == "completed" and fin["audit_ok"], fin.get("audit")
    assert_no_leftovers(run_dir)
