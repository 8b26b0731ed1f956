"""The host runs as SCHED_BATCH in deterministic order, so that its wake-ups do not preempt a guest mid-tick."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from balloonlab.hostd.__main__ import host_sched_wanted
from balloonlab.proto.errors import ConfigError
from tests.procs import run_launcher

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH here")


def _probe(want: str, order: str) -> tuple[str, int]:
    """``host_sched(want, order)`` in a process of its own: what it returns, and the policy it left."""
    code = ("import os; from balloonlab.hostd.__main__ import host_sched; "
            f"print(host_sched({want!r}, {order!r}), os.sched_getscheduler(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    name, policy = out.split()
    return name, int(policy)


def test_the_wanted_policy_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch) -> None:
    monkeypatch.delenv("BALLOONLAB_HOST_SCHED", raising=False)
    assert host_sched_wanted() == "auto"
    monkeypatch.setenv("BALLOONLAB_HOST_SCHED", " Normal ")
    assert host_sched_wanted() == "normal"
    monkeypatch.setenv("BALLOONLAB_HOST_SCHED", "idle")
    with pytest.raises(ConfigError, match=r"BALLOONLAB_HOST_SCHED='idle': expected one of auto, batch, normal"):
        host_sched_wanted()


@pytest.mark.parametrize("want, order, expected", [
    ("auto", "deterministic", "batch"),
    ("auto", "arrival", "normal"),       # the lock scenarios keep the timing they were measured with
    ("normal", "deterministic", "normal"),
    ("batch", "arrival", "batch"),
])
def test_auto_is_batch_in_deterministic_order_only(want: str, order: str, expected: str) -> None:
    name, policy = _probe(want, order)
    assert name == expected
    assert policy == (os.SCHED_BATCH if expected == "batch" else os.SCHED_OTHER)


def _run_started(run_dir: Path) -> dict:
    for line in (run_dir / "host.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "run_started":
            return event
    raise AssertionError(f"no run_started in {run_dir / 'host.jsonl'}")


def _no_wall(value: object) -> object:
    """A summary without its wall-clock figures (the only ones the policy may change)."""
    if isinstance(value, dict):
        return {k: _no_wall(v) for k, v in value.items() if "wall" not in k}
    return value


def test_a_run_logs_the_hosts_policy_and_its_counts_do_not_depend_on_it(tmp_path: Path) -> None:
    summaries = {}
    for want in ("auto", "normal"):
        run_dir = tmp_path / want
        res = run_launcher("--scenario", "tests-tiny", "--ticks", "6", "--run-dir", str(run_dir), "--no-report",
                           env={"BALLOONLAB_HOST_SCHED": want}, timeout_s=90)
        assert res.returncode == 0, res.stderr[-3000:]
        assert _run_started(run_dir)["host_sched"] == ("batch" if want == "auto" else "normal")
        summaries[want] = json.loads((run_dir / "summary.json").read_text())
    counts = [_no_wall({k: s["variants"]["default"][k] for k in ("host", "guests", "lost_pages", "ticks")})
              for s in summaries.values()]
    assert counts[0]["lost_pages"] == 0
    assert counts[0] == counts[1]


def test_a_bad_policy_stops_the_run_with_a_clear_error(tmp_path: Path) -> None:
    res = run_launcher("--scenario", "tests-tiny", "--ticks", "2", "--run-dir", str(tmp_path / "run"), "--no-report",
                       env={"BALLOONLAB_HOST_SCHED": "realtime"}, timeout_s=90)
    assert res.returncode != 0
    assert "BALLOONLAB_HOST_SCHED='realtime'" in res.stderr + res.stdout
