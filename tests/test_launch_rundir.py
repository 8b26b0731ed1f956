"""Run directories never mix runs, and the command line never ends in a traceback.

- An existing, non-empty ``--run-dir`` is refused (exit 2, one line) unless
  ``--force``, which clears it first; a directory the launcher did not create
  keeps its permissions (and its socket goes elsewhere).
- A ``--run-dir`` that is a file, under a missing parent, or on a read-only
  file system: one line naming it and why, exit 2, no traceback.
- ``balloonlab-analyze RUN --json | head -1``: quiet.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import REPO, dump_logs, run_launcher
from tests.test_launch import assert_no_leftovers, events_named, read_jsonl

pytestmark = pytest.mark.multiprocess


def _one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("balloonlab-launch: --run-dir ") and all(w in lines[0] for w in words), lines[0]


def test_bad_run_directories_are_one_line_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    _one_line_error(run_launcher("--scenario", "tests-tiny", "--run-dir", str(a_file)), "not a directory")
    missing = tmp_path / "no" / "such" / "run"
    _one_line_error(run_launcher("--scenario", "tests-tiny", "--run-dir", str(missing)),
                    f"its parent {missing.parent} does not exist")
    assert not (tmp_path / "no").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text("{}")
    _one_line_error(run_launcher("--scenario", "tests-tiny", "--run-dir", str(used)), "not empty", "--force")
    assert (used / "summary.json").read_text() == "{}"      # untouched
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (not root?): the read-only case is untested")
    try:
        _one_line_error(run_launcher("--scenario", "tests-tiny", "--run-dir", str(ro)), "Read-only file system")
        _one_line_error(run_launcher("--scenario", "tests-tiny", "--run-dir", str(ro / "run")), "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.fixture(scope="module")
def forced_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of someone else's (0755) holding an old run's files, reused with --force."""
    run_dir = tmp_path_factory.mktemp("forced") / "run"
    run_dir.mkdir(mode=0o755)
    os.chmod(run_dir, 0o755)
    (run_dir / "host.jsonl").write_text(json.dumps({"event": "run_started", "scenario": "old-run"}) + "\n")
    (run_dir / "report.md").write_text("an old report")
    (run_dir / "old-variant").mkdir()
    res = run_launcher("--scenario", "tests-tiny", "--guests", "2", "--ticks", "8", "--run-dir", str(run_dir),
                       "--force", "--no-report", timeout_s=120)
    assert res.returncode == 0, f"{res.stderr}\n{dump_logs(run_dir)}"
    assert_no_leftovers(run_dir)
    return run_dir


def test_force_clears_an_old_run_and_keeps_the_directorys_permissions(forced_run: Path) -> None:
    assert sorted(p.name for p in forced_run.iterdir()) == sorted(
        ["scenario.toml", "host-config.json", "host.jsonl", "guest-0.jsonl", "guest-1.jsonl", "summary.json"])
    host = read_jsonl(forced_run / "host.jsonl")
    assert [e["scenario"] for e in events_named(host, "run_started")] == ["tests-tiny"]   # one run, not two mixed
    assert stat.S_IMODE(os.stat(forced_run).st_mode) == 0o755                          # not chmodded to 0700
    address = events_named(host, "run_started")[0]["address"]
    assert str(forced_run) not in address      # its socket went to a private directory instead
    summary = json.loads((forced_run / "summary.json").read_text())
    assert summary["scenario"] == "tests-tiny" and summary["variants"]["default"]["status"] == "completed"


def test_a_reader_that_goes_away_ends_analyze_quietly(forced_run: Path) -> None:
    """`balloonlab-analyze RUN --json | head -1`, with a pipe smaller than the output so the write really fails."""
    import fcntl
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)                 # F_SETPIPE_SZ: the summary (~8 KB) cannot fit
    proc = subprocess.Popen([sys.executable, "-m", "balloonlab.analyze", str(forced_run), "--json", "--no-report"],
                            cwd=REPO, stdout=w, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    os.close(w)
    assert proc.stderr is not None
    first = os.read(r, 64)                      # head: a few bytes, then it goes away
    os.close(r)
    err = proc.stderr.read().decode()
    rc = proc.wait(60)
    assert first.startswith(b"{")
    assert len(json.dumps(json.loads((forced_run / "summary.json").read_text()), indent=2)) > 4096 + 1024
    assert "Traceback" not in err and "BrokenPipeError" not in err and len(err.strip().splitlines()) <= 1, err
    assert rc in (0, 141), rc


def test_exit_now_flushes_both_streams_and_keeps_the_status() -> None:
    # The launcher and the fork server end with it (no interpreter teardown): what they wrote last, with
    # Python's own buffering on a pipe, must still arrive, and the status be sys.exit's.
    code = ("import sys; from balloonlab.cli import exit_now\n"
            "for _ in range(3000): sys.stdout.write('out-')\n"
            "sys.stderr.write('err'); exit_now(int(sys.argv[1]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # the buffers under test
    for status, want in ((0, 0), (2, 2), (258, 2)):
        res = subprocess.run([sys.executable, "-c", code, str(status)], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
        assert (res.returncode, len(res.stdout), res.stderr) == (want, 12000, "err"), res
