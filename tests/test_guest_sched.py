"""Guests run as SCHED_BATCH at a lower nice so that a guest woken by the host's reply never preempts the host."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from balloonlab.guestd.__main__ import GUEST_NICE

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH here")

_PROBE = ("import os; from balloonlab.guestd.__main__ import yield_to_host; yield_to_host(); "
          "print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))")


def _policy(env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BALLOONLAB_GUEST_SCHED"}
    if env_value is not None:
        env["BALLOONLAB_GUEST_SCHED"] = env_value
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60)


def test_a_guest_runs_as_batch_by_default_and_as_other_when_asked() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    lowered = max(base, GUEST_NICE)
    assert _policy(None).stdout.split() == [str(os.SCHED_BATCH), str(lowered)]
    assert _policy("batch").stdout.split() == [str(os.SCHED_BATCH), str(lowered)]
    assert _policy("normal").stdout.split() == [str(os.SCHED_OTHER), str(base)]


_GROUP_PROBE = ("import os; os.setsid(); from balloonlab.guestd.__main__ import yield_group_to_host; "
                "print(yield_group_to_host(), open('/proc/self/autogroup').read().split()[-1])")


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="a kernel without autogroups")
def test_the_fork_servers_session_group_is_lowered_unless_asked_not_to() -> None:
    env = {k: v for k, v in os.environ.items() if k != "BALLOONLAB_GUEST_SCHED"}
    lowered = subprocess.run([sys.executable, "-c", _GROUP_PROBE], env=env, capture_output=True, text=True,
                             timeout=60)
    assert lowered.stdout.split() == ["True", str(GUEST_NICE)], lowered.stderr
    kept = subprocess.run([sys.executable, "-c", _GROUP_PROBE], env=dict(env, BALLOONLAB_GUEST_SCHED="normal"),
                          capture_output=True, text=True, timeout=60)
    assert kept.stdout.split() == ["False", "0"], kept.stderr


def test_a_bad_value_stops_the_guest_with_a_clear_error(tmp_path) -> None:
    env = dict(os.environ, BALLOONLAB_GUEST_SCHED="idle", BALLOONLAB_TOKEN="x")
    proc = subprocess.run([sys.executable, "-m", "balloonlab.guestd", "--address", f"unix:{tmp_path}/none.sock",
                           "--guest-id", "0", "--log", str(tmp_path / "g.jsonl")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "BALLOONLAB_GUEST_SCHED='idle'" in proc.stderr and "'batch' or 'normal'" in proc.stderr
