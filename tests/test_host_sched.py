"""The host runs as SCHED_BATCH in deterministic order, so that its wake-ups do not preempt a guest mid-tick,
and with its own autogroup weighted down, so that it takes fewer, longer turns beside the guests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from balloonlab.hostd.__main__ import host_group_nice_wanted, host_sched_wanted
from balloonlab.proto.errors import ConfigError
from tests.procs import run_counts, run_launcher, run_started

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


def test_the_groups_nice_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch) -> None:
    monkeypatch.delenv("BALLOONLAB_HOST_GROUP_NICE", raising=False)
    assert host_group_nice_wanted() == 4
    monkeypatch.setenv("BALLOONLAB_HOST_GROUP_NICE", " 7 ")
    assert host_group_nice_wanted() == 7
    monkeypatch.setenv("BALLOONLAB_HOST_GROUP_NICE", "0")
    assert host_group_nice_wanted() == 0
    for bad in ("-3", "20", "four", "2.5"):
        monkeypatch.setenv("BALLOONLAB_HOST_GROUP_NICE", bad)
        with pytest.raises(ConfigError, match=rf"BALLOONLAB_HOST_GROUP_NICE='{bad}': expected a whole number "
                                              r"from 0 to 19"):
            host_group_nice_wanted()


_AUTOGROUP = Path("/proc/self/autogroup")
_ROOT = os.geteuid() == 0
needs_autogroups = pytest.mark.skipif(not _AUTOGROUP.exists(), reason="no autogroups in this kernel")


def _group_probe(nice: int, own_session: bool) -> tuple[object, str, str]:
    """``host_group_nice(nice)`` in a process of its own (leading a session of its own or not): what it
    returned, and its autogroup before and after."""
    code = ("import json; from pathlib import Path; from balloonlab.hostd.__main__ import host_group_nice; "
            "p = Path('/proc/self/autogroup'); before = p.read_text().strip(); "
            f"got = host_group_nice({nice}); print(json.dumps([got, before, p.read_text().strip()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         start_new_session=own_session).stdout
    got, before, after = json.loads(out)
    return got, before, after


@needs_autogroups
def test_a_host_leading_its_own_session_weights_its_group_down() -> None:
    got, before, after = _group_probe(6, own_session=True)
    if got is None:
        # Only an unprivileged process may be refused: the kernel lets it change an autogroup's nice once
        # per 100 ms, machine-wide (another test's host may just have done it).
        assert not _ROOT
        return
    assert got == 6
    assert before.endswith("nice 0")
    assert after.endswith("nice 6")


@needs_autogroups
def test_a_host_in_a_shared_session_leaves_its_group_alone() -> None:
    # The group is its session's: a shell's, with everything else started from it.
    got, before, after = _group_probe(6, own_session=False)
    assert got is None
    assert after == before


@needs_autogroups
def test_nice_0_leaves_the_group_as_it_is() -> None:
    got, before, after = _group_probe(0, own_session=True)
    assert got is None
    assert after == before


def test_a_run_logs_the_hosts_policy_and_its_counts_do_not_depend_on_it(tmp_path: Path) -> None:
    counts = []
    for want in ("auto", "normal"):
        run_dir = tmp_path / want
        res = run_launcher("--scenario", "tests-tiny", "--ticks", "6", "--run-dir", str(run_dir), "--no-report",
                           env={"BALLOONLAB_HOST_SCHED": want}, timeout_s=90)
        assert res.returncode == 0, res.stderr[-3000:]
        started = run_started(run_dir)
        assert started["host_sched"] == ("batch" if want == "auto" else "normal")
        if want == "normal":
            assert started["host_group_nice"] is None
        elif _AUTOGROUP.exists():
            # (an unprivileged host may be refused, see above: then it says so)
            assert started["host_group_nice"] == 4 or (not _ROOT and started["host_group_nice"] is None)
        counts.append(run_counts(run_dir))
    assert counts[0]["lost_pages"] == 0  # type: ignore[index]
    assert counts[0] == counts[1]


def test_a_bad_group_nice_stops_the_run_with_a_clear_error(tmp_path: Path) -> None:
    res = run_launcher("--scenario", "tests-tiny", "--ticks", "2", "--run-dir", str(tmp_path / "run"), "--no-report",
                       env={"BALLOONLAB_HOST_GROUP_NICE": "-5"}, timeout_s=90)
    assert res.returncode != 0
    assert "BALLOONLAB_HOST_GROUP_NICE='-5': expected a whole number from 0 to 19" in res.stderr + res.stdout


def test_a_bad_policy_stops_the_run_with_a_clear_error(tmp_path: Path) -> None:
    res = run_launcher("--scenario", "tests-tiny", "--ticks", "2", "--run-dir", str(tmp_path / "run"), "--no-report",
                       env={"BALLOONLAB_HOST_SCHED": "realtime"}, timeout_s=90)
    assert res.returncode != 0
    assert "BALLOONLAB_HOST_SCHED='realtime'" in res.stderr + res.stdout
