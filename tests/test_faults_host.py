"""The host SIGKILLed mid-tick: every guest says so and exits non-zero, the launcher too, nothing is left.

The run is over TCP (the host listens on loopback). The host stops itself right after sending ``TickStart`` of tick 19 (the
fault point ``host:tick_started@20``): the guests are running that tick,
some of them waiting for the host's answer to an EPT fault or a disk read.
The test kills the host there. Each guest must notice at once (its
connection breaks), log ``host_lost`` and exit 3 with a one-line reason on
stderr; the launcher must say the host was killed and exit 1; no process
of the run may survive.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.procs import Launched, dump_logs
from tests.rawclient import record_fault, run_pids, wait_stopped
from tests.test_hostile_security import token_free
from tests.test_launch import assert_no_leftovers, events_named, read_jsonl_partial

pytestmark = pytest.mark.multiprocess

GUESTS = 4
GUEST_EXIT_BOUND_S = 5.0       # "within a few seconds" of the host's death
LAUNCHER_EXIT_BOUND_S = 15.0   # the launcher waits for its guests, then reports


def _ts(e: dict) -> float:
    return dt.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(300)
def test_host_killed_mid_tick(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    os.environ["BALLOONLAB_PAUSE_AT"] = "host:tick_started@20"
    try:
        run = Launched("--scenario", "tests-tiny", "--ticks", "500", "--transport", "tcp", "--run-dir", str(run_dir),
                       "--no-report")
    finally:
        del os.environ["BALLOONLAB_PAUSE_AT"]
    try:
        deadline = time.monotonic() + 90.0
        while "host" not in run_pids(run_dir) or len(run_pids(run_dir)) < 1 + GUESTS:
            assert time.monotonic() < deadline and run.proc.poll() is None, dump_logs(run_dir)
            time.sleep(0.02)
        host_pid = run_pids(run_dir)["host"]
        token = Path(f"/proc/{host_pid}/environ").read_bytes().split(b"BALLOONLAB_TOKEN=")[1].split(b"\0")[0]
        wait_stopped(host_pid, 90.0)
        guests_before = {k: v for k, v in run_pids(run_dir).items() if k != "host"}
        assert len(guests_before) == GUESTS
        killed_at = time.time()
        os.kill(host_pid, signal.SIGKILL)
        record_fault(run_dir, "host", host_pid, "SIGKILL", at="tick_started@20")
        rc = run.wait(60.0)
        launcher_s = time.time() - killed_at
    finally:
        run.close()

    assert rc == 1, f"launcher exit {rc}\n{run.err}"
    assert launcher_s < LAUNCHER_EXIT_BOUND_S, f"the launcher took {launcher_s:.1f} s to notice"
    assert "the host was killed by SIGKILL" in run.err, run.err
    host_log = read_jsonl_partial(run_dir / "host.jsonl")   # flushed at the fault point
    reached = events_named(host_log, "fault_point_reached")
    assert [(e["point"], e["tick"]) for e in reached] == [("tick_started", 19)]
    # Over TCP the host listens on loopback only (no address was given); and the token is in no file.
    assert events_named(host_log, "run_started")[0]["address"].startswith("tcp://127.0.0.1:")
    token_free(run_dir, token.decode())
    for gid in range(GUESTS):
        # Exit 3, with the reason on stderr (the launcher keeps a non-empty stderr file) ...
        assert f"guest-{gid} exited with 3" in run.err, run.err
        stderr = (run_dir / f"guest-{gid}.stderr").read_text()
        assert f"guestd[{gid}]:" in stderr and "host" in stderr and len(stderr.strip().splitlines()) == 1, stderr
        # ... and in its log, within a few seconds of the kill.
        lost = events_named(read_jsonl_partial(run_dir / f"guest-{gid}.jsonl"), "host_lost")
        assert len(lost) == 1, dump_logs(run_dir)
        assert _ts(lost[0]) - killed_at < GUEST_EXIT_BOUND_S, lost
    summary = json.loads((run_dir / "summary.json").read_text())["variants"]["default"]
    assert "no run_finished" in summary["reason"] and summary["faults_injected"] == 1
    assert summary["audit_ok"] is False   # never audited: the host died
    assert_no_leftovers(run_dir)
