"""Guests run as SCHED_BATCH so that a guest woken by the host's reply never preempts the host."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH here")

_PROBE = ("import os; from balloonlab.guestd.__main__ import yield_to_host; yield_to_host(); "
          "print(os.sched_getscheduler(0))")


def _policy(env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BALLOONLAB_GUEST_SCHED"}
    if env_value is not None:
        env["BALLOONLAB_GUEST_SCHED"] = env_value
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60)


def test_a_guest_runs_as_batch_by_default_and_as_other_when_asked() -> None:
    assert int(_policy(None).stdout) == os.SCHED_BATCH
    assert int(_policy("batch").stdout) == os.SCHED_BATCH
    assert int(_policy("normal").stdout) == os.SCHED_OTHER


def test_a_bad_value_stops_the_guest_with_a_clear_error(tmp_path) -> None:
    env = dict(os.environ, BALLOONLAB_GUEST_SCHED="idle", BALLOONLAB_TOKEN="x")
    proc = subprocess.run([sys.executable, "-m", "balloonlab.guestd", "--address", f"unix:{tmp_path}/none.sock",
                           "--guest-id", "0", "--log", str(tmp_path / "g.jsonl")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "BALLOONLAB_GUEST_SCHED='idle'" in proc.stderr and "'batch' or 'normal'" in proc.stderr
