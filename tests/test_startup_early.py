"""The launcher starts the host and the fork server before it loads the scenario.

Both import while the launcher checks the scenario; the host then takes its
real command line, environment and stderr file from one JSON line on stdin,
the fork server its run directory from an ``adopt`` packet. Nothing either
wrote before that is lost, /proc shows them as if they had been started with
their final arguments, and a run that never starts leaves neither behind.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from balloonlab.forkclient import ForkServer, start_early
from balloonlab.runner import child_env

# An unknown warning category: the interpreter says so on stderr as it starts, before any of our code runs.
EARLY_NOISE = {"PYTHONWARNINGS": "ignore::NoSuchWarningCategory"}


def wait_until(pred: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _children() -> list[tuple[int, list[str]]]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                out.append((int(entry), _cmdline(int(entry))))
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_a_host_started_early_exits_0_when_no_arguments_come() -> None:
    done = subprocess.run([sys.executable, "-m", "balloonlab.hostd", "--args-on-stdin"], input=b"",
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()


def test_a_host_started_early_runs_with_the_arguments_and_stderr_it_is_sent(tmp_path: Path) -> None:
    """Its stderr file holds what it wrote before it had one, then the error of the arguments it was given."""
    stderr_path = tmp_path / "host.stderr"
    line = json.dumps({"argv": ["--config", str(tmp_path / "missing.json"), "--address", f"unix:{tmp_path}/h.sock"],
                       "env": dict(child_env(), BALLOONLAB_TOKEN="t" * 32), "stderr": str(stderr_path)})
    with tempfile.TemporaryFile() as early_err:
        done = subprocess.run([sys.executable, "-m", "balloonlab.hostd", "--args-on-stdin"],
                              input=line.encode() + b"\n", stdout=subprocess.PIPE, stderr=early_err,
                              env=dict(child_env(), **EARLY_NOISE), timeout=120)
    text = stderr_path.read_text()
    assert done.returncode == 2, text
    assert "NoSuchWarningCategory" in text.splitlines()[0]
    assert "hostd: " in text and "missing.json" in text


def test_a_fork_server_started_early_moves_its_stderr_and_shows_its_run(tmp_path: Path) -> None:
    early = start_early(dict(child_env(), **EARLY_NOISE))
    early.sock.send(b"not json")   # read after its imports: it complains on the stderr it started with

    async def go() -> None:
        server = ForkServer.adopt(early, tmp_path)
        try:
            await server.wait_ready()
            assert await asyncio.to_thread(wait_until, lambda: "--run-dir" in _cmdline(server.pid)), \
                _cmdline(server.pid)
            assert _cmdline(server.pid)[-2:] == ["--run-dir", str(tmp_path)]
        finally:
            await server.close()
    asyncio.run(go())
    text = (tmp_path / "forkserver.stderr").read_text()
    assert "NoSuchWarningCategory" in text
    assert "a control packet that is not JSON" in text


def test_a_launch_that_never_starts_leaves_no_early_process(tmp_path: Path) -> None:
    from balloonlab.launch import main
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario]\nname = 'bad'\nguests = 'many'\n")
    assert main(["--scenario", str(bad), "--run-dir", str(tmp_path / "run"), "--no-report"]) == 2
    left = [cmd for _, cmd in _children() if "balloonlab.hostd" in cmd or "balloonlab.forkserver" in cmd]
    assert left == []
    assert not (tmp_path / "run").exists()

