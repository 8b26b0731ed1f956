"""Guests SIGKILLed at the worst moments, in one run: nothing lost, nothing leaked, the others run on.

Each victim stops itself at a fault point (``BALLOONLAB_PAUSE_AT``: it logs
``fault_point_reached`` and sends itself SIGSTOP) and the test kills it
from outside with SIGKILL, so the crash lands exactly there:

- guest 1 right after its ``BalloonInflate`` went out (the host may or may
  not have applied it when the guest dies);
- guest 2 right after a ``DiskWrite`` went out, inside the guest's reclaim,
  holding its memory lock L_vmem (the host holds I/O buffers for it);
- guest 3 on receiving the host's TLB shootdown, before acknowledging it
  (the host is waiting for that acknowledgement, frames busy);
- guest 4 right after its 40th ``EptFault`` went out, holding L_vmem.

(``tests/test_guest_death.py`` kills a guest in the window *before* its
inflate hypercall; mid-deflate is ``test_faults_deflate.py``.)

Then: the launcher exits 0 and reports the four lost guests; the host's
invariant held throughout; the end-of-run audit passes, which includes
"every guest that left holds nothing" (no frame of any kind, no swap
slot); the survivors ran every tick with no page lost.
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
from tests.rawclient import fault_points, proc_state, record_fault, run_pids
from tests.test_launch import assert_no_leftovers, events_named, read_jsonl

pytestmark = pytest.mark.multiprocess

TICKS = 40
SCENARIO = f"""
[scenario]
name = "faults-kill"
expect_guests_lost = [1, 2, 3, 4]   # killed at their fault points: the run is degraded, as expected
seed = 23
guests = 6
ticks = {TICKS}
metrics_every_ticks = 10

[host]
overcommit = 2.0          # host swapping (shootdowns to every guest) from the first ticks
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

[[guests]]                # more heap than RAM: its own reclaim writes to its swap all the time
id = 2
regions = [{{ name = "heap", kind = "anon", mib = 10 }}]
workload = [{{ kind = "anon-hot", region = "heap", weight = 1 }}]

[costs]
mem_ref_us = 5.0

[balloon]                 # host swapping alone first, then every guest inflates
policy = "static"
params = {{ fraction = 0.4, start_tick = 20 }}
"""

VICTIMS = {1: "balloon_inflate", 2: "disk_write", 3: "invalidate", 4: "ept_fault@40"}
SURVIVORS = (0, 5)
UNDER_LOCK = {"disk_write", "ept_fault"}
# A shootdown at a tick boundary may reach a vCPU parked at its gate in the middle of a fault (with
# its memory lock held) or between batches (without): both are the contract (proto/README.md, the gate).
EITHER = {"invalidate"}
RUN_TIMEOUT_S = 150.0


def kill_at_fault_points(run: Launched, run_dir: Path, victims: dict[int, str], timeout_s: float) -> dict[int, int]:
    """SIGKILL each victim once it has stopped at its fault point; returns guest id -> pid."""
    killed: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    while len(killed) < len(victims):
        if run.proc.poll() is not None:
            break
        pids = run_pids(run_dir)
        for gid in victims:
            pid = pids.get(f"guest-{gid}")
            if gid not in killed and pid is not None and proc_state(pid) == "T":
                os.kill(pid, signal.SIGKILL)
                record_fault(run_dir, f"guest-{gid}", pid, "SIGKILL", at=victims[gid])
                killed[gid] = pid
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    return killed


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("faults-kill")
    scenario = base / "faults-kill.toml"
    scenario.write_text(SCENARIO)
    run_dir = base / "run"
    spec = ",".join(f"{gid}:{point}" for gid, point in VICTIMS.items())
    os.environ["BALLOONLAB_PAUSE_AT"] = spec   # the launcher hands its environment to the children
    try:
        run = Launched("--scenario", str(scenario), "--run-dir", str(run_dir), "--no-report")
    finally:
        del os.environ["BALLOONLAB_PAUSE_AT"]
    try:
        killed = kill_at_fault_points(run, run_dir, VICTIMS, RUN_TIMEOUT_S)
        rc = run.wait(RUN_TIMEOUT_S)
    finally:
        run.close()
    assert set(killed) == set(VICTIMS), f"only {sorted(killed)} reached their fault point\n{dump_logs(run_dir)}"
    assert rc == 0, f"launcher exit {rc}\n{run.err}\n{dump_logs(run_dir)}"
    return {"run_dir": run_dir, "err": run.err, "killed": killed,
            "host": read_jsonl(run_dir / "host.jsonl"),
            "summary": json.loads((run_dir / "summary.json").read_text())["variants"]["default"]}


@pytest.mark.timeout(300)
def test_each_victim_died_at_its_point(killed_run: dict[str, Any]) -> None:
    run_dir = killed_run["run_dir"]
    for gid, spec in VICTIMS.items():
        point, _, nth = spec.partition("@")
        reached = fault_points(run_dir / f"guest-{gid}.jsonl")
        assert len(reached) == 1, reached
        e = reached[0]
        assert e["point"] == point and e["occurrence"] == int(nth or 1) and e["pid"] == killed_run["killed"][gid]
        # The reclaim and fault paths hold the guest's memory lock across the request. An Invalidate
        # may come either way (EITHER): at a tick's end, or while the guest waits for its own fault,
        # whose reclaim took its pages (only guest pages are host-swap victims).
        if point not in EITHER:
            assert e["mm_lock_held"] is (point in UNDER_LOCK), e
        assert f"guest-{gid} was killed by SIGKILL" in killed_run["err"]


@pytest.mark.timeout(300)
def test_the_host_released_them_and_the_others_ran_on(killed_run: dict[str, Any]) -> None:
    host, v = killed_run["host"], killed_run["summary"]
    fin = events_named(host, "run_finished")[0]
    assert fin["reason"] == "completed" and fin["ticks"] == TICKS
    assert fin["invariant_violations"] == 0 and not events_named(host, "invariant_violated")
    gone = {e["guest"]: e for e in events_named(host, "guest_disconnected")}
    assert set(gone) == set(VICTIMS)
    assert all(e["released_frames"] > 0 for e in gone.values()), gone
    assert sorted(fin["guests_memory"]) == [str(g) for g in SURVIVORS]
    # The host was waiting for guest 3's acknowledgement: that shootdown failed, the frames stayed the guest's.
    assert fin["memory"]["shootdown_failures"] >= 1
    assert fin["memory"]["busy_frames"] == 0
    assert sorted(int(g) for g in v["guests_lost"]) == sorted(VICTIMS)
    assert v["lost_pages"] == 0 and v["lost_pages_host"] == 0   # what guests say, and what the host's audit found
    # Not "completed": four guests were lost (as the scenario's expect_guests_lost says, so the launcher exits 0).
    assert v["status"] == "degraded" and [w.split(":")[0] for w in v["status_reasons"]] == [
        f"guest {g} lost" for g in sorted(VICTIMS)], v["status_reasons"]
    for gid in SURVIVORS:
        done = events_named(read_jsonl(killed_run["run_dir"] / f"guest-{gid}.jsonl"), "guest_finished")
        # A tick in which the host held a request of its across the boundary owes no TickDone.
        assert done and TICKS - fin.get("held_across_boundary", 0) <= done[0]["ticks"] <= TICKS, done
        assert done[0]["stats"]["lost_pages"] == 0


@pytest.mark.timeout(300)
def test_the_audit_finds_nothing_left_behind(killed_run: dict[str, Any]) -> None:
    v = killed_run["summary"]
    assert v["audit_ok"] is True, v["audit_problems"]
    audit = events_named(killed_run["host"], "audit_completed")[0]
    for gid in VICTIMS:
        assert audit["guests"][str(gid)] == {"ok": True, "released": True}
    for gid in SURVIVORS:
        assert audit["guests"][str(gid)]["ok"] and audit["guests"][str(gid)]["answered"]
    assert v["faults_injected"] == len(VICTIMS) and v["fault_points_reached"] == len(VICTIMS)
    assert_no_leftovers(killed_run["run_dir"])
