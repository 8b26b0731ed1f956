"""The launcher forks its first host from itself once it has imported what the two share.

The child must be what ``python -m balloonlab.hostd --args-on-stdin`` is:
its own session, its pipes, nothing of the launcher's output written twice,
/proc showing the host's command line, the run's counts the same as with an
exec'd host, and a clean fallback where a fork would not be safe.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from balloonlab.early import fork_early_host
from tests.procs import REPO, run_counts, run_launcher, run_started

_PROBE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from balloonlab.early import child_env, fork_early_host
    tmp = Path(sys.argv[1])
    sys.stdout.write("launcher output, written once\\n")     # buffered: the host must not write it again
    early = fork_early_host(child_env(), sys.executable, tmp / "run")
    pid = early.popen.pid
    deadline = time.monotonic() + 60    # set up once /proc shows the host's command line
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\\0")[1:3] != [b"-m", b"balloonlab.hostd"] \\
            and time.monotonic() < deadline:
        time.sleep(0.01)
    sid = os.getsid(pid)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\\0")[:-1]
    line = {"argv": ["--config", str(tmp / "missing.json"), "--address", f"unix:{tmp}/h.sock"],
            "env": dict(child_env(), BALLOONLAB_TOKEN="t" * 32), "stderr": str(tmp / "host.stderr")}
    early.popen.stdin.write(json.dumps(line).encode() + b"\\n")
    early.popen.stdin.close()
    code = early.popen.wait(60)
    out = early.popen.stdout.read()
    print(json.dumps({"pid": pid, "parent": os.getpid(), "code": code, "own_session": sid == pid,
                      "cmdline": [c.decode() for c in cmdline], "host_stdout": out.decode()}))
""")


def test_a_forked_host_is_set_up_as_an_execd_one_and_runs_its_arguments(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines.count("launcher output, written once") == 1, done.stdout
    got = json.loads(lines[-1])
    assert got["own_session"], got        # its own session: the group weight needs it
    assert got["cmdline"][1:] == ["-m", "balloonlab.hostd", "--args-on-stdin", "--run-dir", str(tmp_path / "run")]
    assert got["code"] == 2               # the missing config, reported as an exec'd host reports it
    assert got["host_stdout"] == ""
    text = (tmp_path / "host.stderr").read_text()
    assert "hostd: " in text and "missing.json" in text


def test_no_fork_while_another_thread_runs() -> None:
    # A child forked now could inherit a lock that thread holds: the caller starts a host the usual way.
    import threading
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert fork_early_host(dict(os.environ)) is None
    finally:
        stop.set()
        t.join()


def test_a_forked_host_runs_the_same_counts_as_an_execd_one(tmp_path: Path) -> None:
    counts = []
    for fork in ("1", "0"):
        run_dir = tmp_path / f"fork-{fork}"
        res = run_launcher("--scenario", "tests-tiny", "--ticks", "6", "--run-dir", str(run_dir), "--no-report",
                           env={"BALLOONLAB_HOST_FORK": fork}, timeout_s=90)
        assert res.returncode == 0, res.stderr[-3000:]
        assert run_started(run_dir)["host_start"] == ("fork" if fork == "1" else "exec")
        counts.append(run_counts(run_dir))
    assert counts[0]["lost_pages"] == 0  # type: ignore[index]
    assert counts[0] == counts[1]


def test_no_fork_in_a_launcher_started_with_stdin_closed() -> None:
    # Its pipes would take descriptor 0, which the child's own stdin then clobbers: it execs a host instead.
    code = ("import os, sys; from balloonlab.early import child_env, fork_early_host; "
            "print(fork_early_host(child_env(), sys.executable) is None)")
    done = subprocess.run(["bash", "-c", 'exec 0<&- && exec "$0" -c "$1"', sys.executable, code], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
