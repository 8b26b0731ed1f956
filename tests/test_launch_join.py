"""An outside guest joins a run with its own credential, and only as itself.

``balloonlab-launch --external-guests 1`` starts the host and guest 0, and
says how guest 1 joins: the address, the id, its credential file, the
command line (and ``join.json`` in the run directory, for programs). Every
guest's credential is a file of its own, 0600 in a 0700 directory; guest 0's
opens nothing for guest 1; the files go when the variant ends.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import REPO, Launched, dump_logs
from tests.test_launch import assert_no_leftovers, events_named, read_jsonl

pytestmark = pytest.mark.multiprocess


def wait_for_join(run: Launched, run_dir: Path, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "join.json").exists():
        assert run.proc.poll() is None and time.monotonic() < deadline, f"no join.json\n{dump_logs(run_dir)}"
        time.sleep(0.02)
    time.sleep(0.05)   # written in one go; let it land
    return json.loads((run_dir / "join.json").read_text())


def guest_argv(command: str) -> list[str]:
    """The printed command line, run with this interpreter."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "balloonlab.guestd"], argv
    return [sys.executable, *argv[1:]]


@pytest.mark.timeout(180)
def test_an_outside_guest_joins_with_its_own_credential(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = Launched("--scenario", "tests-tiny", "--guests", "2", "--ticks", "20", "--external-guests", "1",
                   "--run-dir", str(run_dir), "--no-report", "--join-timeout", "60")
    try:
        join = wait_for_join(run, run_dir)
        cred_dir = run_dir / "credentials"
        mine = Path(join["guests"]["1"]["token_file"])
        assert sorted(join["guests"]) == ["1"] and join["address"].startswith("unix:")
        assert stat.S_IMODE(os.stat(cred_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(mine).st_mode) == 0o600 and len(mine.read_text().strip()) == 32
        # The guest the launcher started has its credential in its environment only: no file of it.
        assert sorted(p.name for p in cred_dir.iterdir()) == ["guest-1.token"]
        other = tmp_path / "guessed.token"
        other.write_text(secrets.token_hex(16) + "\n")
        other.chmod(0o600)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("BALLOONLAB_TOKEN", None)
        argv = guest_argv(join["guests"]["1"]["command"])
        # A credential that is not guest 1's does not open its session (another guest's valid one does not
        # either: tests/test_proto_rpc.py).
        intruder = subprocess.run([*argv[:argv.index("--token-file") + 1], str(other)], cwd=run_dir, env=env,
                                  capture_output=True, text=True, timeout=60)
        assert intruder.returncode == 4 and "BAD_TOKEN" in intruder.stderr, intruder.stderr
        # Its own does: the command line as printed, run from the run directory.
        guest = subprocess.run(argv, cwd=run_dir, env=env, capture_output=True, text=True, timeout=90)
        rc = run.wait(90)
    finally:
        run.close()
    assert guest.returncode == 0, guest.stderr
    assert rc == 0, f"{run.err}\n{dump_logs(run_dir)}"
    assert f"guest 1: {join['guests']['1']['command']}" in run.err
    assert not (run_dir / "credentials").exists() and not (run_dir / "join.json").exists()   # dead secrets go
    host = read_jsonl(run_dir / "host.jsonl")
    assert sorted(e["guest"] for e in events_named(host, "guest_connected")) == [0, 1]
    assert [(e["guest"], e["code"]) for e in events_named(host, "guest_refused")] == [(1, "BAD_TOKEN")]
    summary = json.loads((run_dir / "summary.json").read_text())["variants"]["default"]
    assert summary["status"] == "completed" and [g["id"] for g in summary["guests"]] == [0, 1]
    assert all(g["refs"] > 0 for g in summary["guests"])
    assert_no_leftovers(run_dir)
