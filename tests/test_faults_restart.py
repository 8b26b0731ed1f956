"""A guest killed and restarted under the same id joins again as a fresh guest; a live duplicate is refused.

Guest 2 stops at its 20th EPT fault and is SIGKILLed there; the host
releases its session and memory. A new ``guestd --guest-id 2`` (what the
soak benchmark does every so often) then joins the running run: a fresh
guest with fresh memory and a fresh disk, in the barrier from its first
tick, audited at the end like the others. Meanwhile a second process
claiming guest 0, which is alive, is refused with DUPLICATE_GUEST and
exits 4.

Both joins race the run: a tiny run's remaining ticks take well under the
second a Python process needs to start. So the test holds the run while
they happen: guest 1 is stopped from outside (SIGSTOP) once the victim is
stopped, which keeps every tick barrier waiting for it (its
``unresponsive_s`` is far away), and is continued (SIGCONT) only after the
host has logged the restarted guest's join and the duplicate's refusal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.rawclient import REPO, HostProcess, guest_token, proc_state, run_config, wait_stopped

pytestmark = pytest.mark.multiprocess

TICKS = 250
VICTIM = 2
HOLDER = 1


@pytest.mark.timeout(300)
def test_a_restarted_guest_rejoins_and_a_live_duplicate_is_refused() -> None:
    cfg = run_config("tests-tiny", guests=3, ticks=TICKS, connect_timeout_s=60.0, unresponsive_s=240.0)
    h = HostProcess(cfg)
    try:
        holder = None
        for gid in (0, 1):
            started = h.start_guest(gid)
            holder = started if gid == HOLDER else holder
        old = h.start_guest(VICTIM, {"BALLOONLAB_PAUSE_AT": f"{VICTIM}:ept_fault@20"})
        deadline = time.monotonic() + 60.0
        while proc_state(old.pid) != "T":
            assert time.monotonic() < deadline and old.poll() is None, "the victim never reached its fault point"
            time.sleep(0.005)
        # The stopped victim holds the tick open; the stopped holder keeps every later one open.
        os.kill(holder.pid, signal.SIGSTOP)
        wait_stopped(holder.pid, 30.0)
        os.kill(old.pid, signal.SIGKILL)
        assert old.wait(10) == -signal.SIGKILL
        # The host notices the broken connection and releases the session; then the id is free again.
        new = h.start_guest(VICTIM)
        dup = subprocess.run([sys.executable, "-m", "balloonlab.guestd", "--address", h.sock, "--guest-id", "0"], cwd=REPO,
                             env={**h.env, "BALLOONLAB_TOKEN": guest_token(0)}, capture_output=True, text=True,
                             timeout=60)
        deadline = time.monotonic() + 60.0
        while not [e for e in h.events("guest_connected") if e["guest"] == VICTIM and e["rejoined"]]:
            assert time.monotonic() < deadline and h.proc.poll() is None and new.poll() is None, \
                "the restarted guest never joined"
            time.sleep(0.01)
        os.kill(holder.pid, signal.SIGCONT)
        rc = h.wait(120)
        assert new.wait(30) == 0
    finally:
        events = h.events()   # read before close() removes the directory
        new_events = h.guest_events(VICTIM)
        h.close()

    assert dup.returncode == 4 and "DUPLICATE_GUEST" in dup.stderr and "guest id 0" in dup.stderr, dup.stderr
    assert rc == 0

    def named(name: str) -> list[dict]:
        return [e for e in events if e["event"] == name]

    connected = [e for e in named("guest_connected") if e["guest"] == VICTIM]
    assert [e["rejoined"] for e in connected] == [0, 1]
    gone = [e for e in named("guest_disconnected") if e["guest"] == VICTIM]
    assert len(gone) == 1 and gone[0]["released_frames"] > 0
    refused = named("guest_refused")
    assert [(e["guest"], e["code"]) for e in refused] == [(0, "DUPLICATE_GUEST")]
    fin = named("run_finished")[0]
    assert fin["reason"] == "completed" and fin["ticks"] == TICKS
    assert fin["guests_rejoined"] == {str(VICTIM): 1} and list(fin["guests_lost"]) == [str(VICTIM)]
    assert fin["invariant_violations"] == 0
    assert fin["audit_ok"] is True, fin["audit"]
    audit = named("audit_completed")[0]["guests"]
    assert audit[str(VICTIM)]["answered"] and audit[str(VICTIM)]["ok"]   # the new one, audited as live
    assert fin["rejected_requests"] == {"DUPLICATE_GUEST": 1}
    # Both processes logged to guest-2.jsonl: the first started and died, the second ran to the end.
    started = [e for e in new_events if e["event"] == "guest_started"]
    finished = [e for e in new_events if e["event"] == "guest_finished"]
    assert len(started) == 2 and len(finished) == 1
    assert 0 < finished[0]["ticks"] < TICKS and finished[0]["stats"]["lost_pages"] == 0
