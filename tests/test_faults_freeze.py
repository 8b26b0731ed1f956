"""A frozen guest (SIGSTOP mid-EPT-fault, holding L_vmem): out of the barrier, its memory to host swap, nothing lost.

Guest 1 stops itself right after its 110th EPT fault (around tick 20) went out
(``BALLOONLAB_PAUSE_AT=1:ept_fault@110``): a vCPU frozen in the middle of a
hypercall, its memory lock held. After ``unresponsive_s`` (1 s here) the
host's watchdog takes it out of the tick barrier and, at the tick's end,
swaps out every frame it has -- with a *deferred* shootdown, since a guest
that is not running cannot acknowledge one (``hostd/shootdown.py`` explains
why that is safe). The test waits for that in the host's log, then sends
SIGCONT. The guest answers the queued shootdown (its tokens replace the
host's placeholders), finishes its late tick, is back in the barrier, and
faults its pages back in from host swap: with the content it last wrote.

The others' throughput (references per virtual second) is measured against
the same run without the freeze.
"""
from __future__ import annotations

import json
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

TICKS = 60
FROZEN = 1
OTHERS = (0, 2)
SCENARIO = f"""
[scenario]
name = "faults-freeze"
seed = 31
guests = 3
ticks = {TICKS}
metrics_every_ticks = 10
watchdog_s = 0.5
unresponsive_s = 1.0

[host]
overcommit = 1.6          # the host swaps: a frozen guest's frames are worth taking
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
  {{ kind = "anon-hot", region = "heap", weight = 2 }},
]

[costs]
mem_ref_us = 5.0
"""


def _run(tmp: Path, name: str, freeze: bool, resume: str = "reclaimed") -> dict[str, Any]:
    """``resume``: when the frozen guest gets SIGCONT -- once the host took its memory ("reclaimed"), or
    once the host has run its last tick without it, so that it wakes during the end-of-run audit ("audit")."""
    scenario = tmp / "faults-freeze.toml"
    scenario.write_text(SCENARIO)
    run_dir = tmp / name
    if freeze:
        os.environ["BALLOONLAB_PAUSE_AT"] = f"{FROZEN}:ept_fault@110"
    try:
        run = Launched("--scenario", str(scenario), "--run-dir", str(run_dir), "--no-report")
    finally:
        os.environ.pop("BALLOONLAB_PAUSE_AT", None)
    out: dict[str, Any] = {"run_dir": run_dir}
    try:
        if freeze:
            pid = wait_guest_stopped(run, run_dir, FROZEN)
            frozen_at = time.monotonic()

            def reclaimed() -> list[dict[str, Any]]:
                return [e for e in events_named(read_jsonl_partial(run_dir / "host.jsonl"), "guest_memory_reclaimed")
                        if e["guest"] == FROZEN]

            def last_tick() -> bool:
                return any(e["tick"] == TICKS - 1 for e in events_named(
                    read_jsonl_partial(run_dir / "host.jsonl"), "tick_completed"))

            wanted = reclaimed if resume == "reclaimed" else last_tick
            while not wanted():
                assert time.monotonic() - frozen_at < 60.0, f"no {resume} while guest {FROZEN} is frozen\n" \
                                                             f"{dump_logs(run_dir)}"
                time.sleep(0.02)
            out["frozen_s"] = time.monotonic() - frozen_at
            os.kill(pid, signal.SIGCONT)
            record_fault(run_dir, f"guest-{FROZEN}", pid, "SIGCONT", at="ept_fault@110",
                         frozen_s=round(out["frozen_s"], 3), resumed=resume)
        rc = run.wait(150.0)
    finally:
        run.close()
    assert rc == 0, f"{run.err}\n{dump_logs(run_dir)}"
    out["host"] = read_jsonl(run_dir / "host.jsonl")
    out["summary"] = json.loads((run_dir / "summary.json").read_text())["variants"]["default"]
    assert_no_leftovers(run_dir)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("faults-freeze")
    return {"frozen": _run(tmp, "frozen", True), "baseline": _run(tmp, "baseline", False)}


def fin_watchdog(host: list[dict[str, Any]]) -> dict[str, int]:
    return events_named(host, "run_finished")[0]["watchdog"]


@pytest.mark.timeout(400)
def test_the_frozen_guest_leaves_the_barrier_and_its_memory_goes_to_host_swap(runs: dict[str, Any]) -> None:
    host = runs["frozen"]["host"]
    unresponsive = [e for e in events_named(host, "guest_unresponsive") if e["guest"] == FROZEN]
    assert len(unresponsive) == 1, unresponsive
    reclaimed = [e for e in events_named(host, "guest_memory_reclaimed") if e["guest"] == FROZEN]
    # Everything it had resident went at the first tick end; later ones catch what its late tick faulted in.
    # (busy: an eviction already under way when it froze, now deferred too; it settles right after.)
    first = reclaimed[0]
    assert first["reclaimed_frames"] > 100 and first["resident_pages"] == first["busy_pages"], reclaimed
    assert fin_watchdog(host)["late_shootdowns"] >= (1 if first["busy_pages"] else 0)
    fin = events_named(host, "run_finished")[0]
    wd = fin["watchdog"]
    # Every deferred shootdown was answered after SIGCONT and filled its placeholders.
    assert wd["deferred_shootdown_pages"] >= reclaimed[0]["reclaimed_frames"]
    assert wd["deferred_failed"] == 0 and wd["deferred_settled_pages"] == wd["deferred_shootdown_pages"], wd
    settled = [e for e in events_named(host, "shootdown_settled") if e["guest"] == FROZEN]
    assert settled and all(e["ok"] for e in settled)
    back = [e for e in events_named(host, "guest_responsive") if e["guest"] == FROZEN]
    assert len(back) == 1 and back[0]["tick"] > unresponsive[0]["tick"]
    # Past start-up, the frozen guest stalled the barrier, and only until the watchdog's bound. (Another
    # guest may be missing with it: one whose EPT fault waited for a frame the frozen guest held. It is
    # waiting for the host, not silent, so it is not marked: only the frozen one is.)
    stalls = [e for e in events_named(host, "tick_stalled") if e.get("phase") != "connect" and e["tick"] > 0]
    assert stalls and all(FROZEN in e["missing"] and e["waited_s"] < 3.0 for e in stalls), stalls
    assert [e["guest"] for e in events_named(host, "guest_unresponsive")] == [FROZEN]
    assert fin["invariant_violations"] == 0 and fin["reason"] == "completed" and fin["ticks"] == TICKS


@pytest.mark.timeout(400)
def test_nothing_is_lost_and_the_pages_come_back_from_host_swap(runs: dict[str, Any]) -> None:
    frozen = runs["frozen"]
    v = frozen["summary"]
    assert v["audit_ok"] is True, v["audit_problems"]
    assert v["lost_pages"] == 0 and v["guests_lost"] == {} and v["faults_injected"] == 1
    fin = events_named(frozen["host"], "run_finished")[0]
    reclaimed = [e for e in events_named(frozen["host"], "guest_memory_reclaimed") if e["guest"] == FROZEN]
    # Its working set came back from host swap (with the tokens its late answer filled in).
    print("frozen guest:", fin["guests_memory"][str(FROZEN)]["ept_fault_swapins"], "pages read back of",
          reclaimed[0]["reclaimed_frames"], "swapped while frozen")
    assert fin["guests_memory"][str(FROZEN)]["ept_fault_swapins"] > reclaimed[0]["reclaimed_frames"] // 4
    done = events_named(read_jsonl(frozen["run_dir"] / f"guest-{FROZEN}.jsonl"), "guest_finished")
    assert done and done[0]["stats"]["lost_pages"] == 0
    assert 0 < done[0]["ticks"] < TICKS   # it missed the ticks it was frozen for


@pytest.mark.timeout(400)
def test_the_others_throughput_is_unaffected(runs: dict[str, Any]) -> None:
    def rate(run: dict[str, Any], gid: int) -> float:
        return next(g["refs_per_vsec"] for g in run["summary"]["guests"] if g["id"] == gid)

    for gid in OTHERS:
        with_freeze, without = rate(runs["frozen"], gid), rate(runs["baseline"], gid)
        print(f"guest {gid}: {with_freeze:.0f} refs/vs with guest {FROZEN} frozen, {without:.0f} without")
        assert with_freeze >= 0.7 * without, (gid, with_freeze, without)


@pytest.mark.timeout(400)
def test_a_guest_that_wakes_during_the_audit_is_audited_once_its_late_tick_is_done(tmp_path: Path) -> None:
    """Frozen until the host has run its last tick: it wakes while the audit runs and goes on with its
    late tick, faulting back in what the host took (and taking frames from the others for it). Asked
    at once, it would answer from books that tick is still changing, and pages the host took and gave
    back meanwhile would look lost (some 430 did). No guest is asked before its late TickDone: then
    nothing is lost and nothing is out of place, for it or for the others."""
    run = _run(tmp_path, "woke-at-audit", True, resume="audit")
    host, v = run["host"], run["summary"]
    back = [e for e in events_named(host, "guest_responsive") if e["guest"] == FROZEN]
    assert len(back) == 1 and back[0]["tick"] == TICKS, back        # back after the last tick: in the audit
    assert v["audit_ok"] is True, v["audit_problems"]
    assert v["lost_pages"] == 0 and v["guests_lost"] == {}
    fin = events_named(host, "run_finished")[0]
    assert fin["audit"]["lost_pages"] == 0 and fin["audit"]["audited"] == 3, fin["audit"]
    assert fin["reason"] == "completed" and fin["invariant_violations"] == 0
    wd = fin["watchdog"]
    assert wd["deferred_failed"] == 0 and wd["deferred_settled_pages"] == wd["deferred_shootdown_pages"], wd
