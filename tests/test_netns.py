"""Guests on another machine, for real: two network namespaces joined by a veth pair.

The host (``balloonlab-host``, every guest external) runs in one namespace
and listens on its veth address only, over TCP; the guests run in the
other (``ip netns exec``), each with its credential file, and reach the host
across the link. The run goes to its end; the namespaces are deleted
whatever happens.

Needs root (``ip netns add``); skipped with the reason otherwise, unless
``BALLOONLAB_REQUIRE_NETNS=1`` (``.ci/run`` sets it: CI runs as root), which
turns the skip into a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.procs import REPO, dump_logs, procs_mentioning
from tests.test_launch import events_named, read_jsonl

pytestmark = pytest.mark.multiprocess

HOST_IP, GUEST_IP = "10.231.77.1", "10.231.77.2"
GUESTS = 2
TICKS = 20


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _unavailable(why: str) -> None:
    if os.environ.get("BALLOONLAB_REQUIRE_NETNS") == "1":
        pytest.fail(f"network namespaces are required here (BALLOONLAB_REQUIRE_NETNS=1) but {why}")
    pytest.skip(f"network namespaces unavailable: {why}")


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two namespaces, ``host`` and ``guests``, with a veth pair between them; deleted afterwards, always."""
    if shutil.which("ip") is None:
        _unavailable("no `ip` command (iproute2)")
    tag = f"{os.getpid() % 100000}"
    host_ns, guest_ns = f"bl-h{tag}", f"bl-g{tag}"
    made: list[str] = []
    try:
        for ns in (host_ns, guest_ns):
            res = _ip("netns", "add", ns)
            if res.returncode:
                _unavailable(f"`ip netns add` failed: {res.stderr.strip()} (it needs root)")
            made.append(ns)
        steps = [("link", "add", f"vh{tag}", "type", "veth", "peer", "name", f"vg{tag}"),
                 ("link", "set", f"vh{tag}", "netns", host_ns), ("link", "set", f"vg{tag}", "netns", guest_ns),
                 ("-n", host_ns, "addr", "add", f"{HOST_IP}/24", "dev", f"vh{tag}"),
                 ("-n", guest_ns, "addr", "add", f"{GUEST_IP}/24", "dev", f"vg{tag}"),
                 ("-n", host_ns, "link", "set", f"vh{tag}", "up"), ("-n", guest_ns, "link", "set", f"vg{tag}", "up"),
                 ("-n", host_ns, "link", "set", "lo", "up"), ("-n", guest_ns, "link", "set", "lo", "up")]
        for step in steps:
            res = _ip(*step)
            assert res.returncode == 0, f"ip {' '.join(step)}: {res.stderr}"
        yield host_ns, guest_ns
    finally:
        for ns in made:   # deleting a namespace deletes its end of the veth, and so the pair
            _ip("netns", "del", ns)
        left = [ns for ns in made if ns in _ip("netns", "list").stdout]
        assert not left, f"namespaces left behind: {left}"


def _console_script(name: str) -> list[str]:
    path = Path(sys.executable).parent / name
    fallback = "import sys; from balloonlab.launch import host_main; sys.exit(host_main())"
    return [str(path)] if path.exists() else [sys.executable, "-c", fallback]


@pytest.mark.timeout(180)
def test_guests_in_another_namespace_run_a_scenario_over_tcp(namespaces: tuple[str, str], tmp_path: Path) -> None:
    host_ns, guest_ns = namespaces
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1")
    env.pop("BALLOONLAB_TOKEN", None)
    host = subprocess.Popen(["ip", "netns", "exec", host_ns, *_console_script("balloonlab-host"),
                             "--scenario", "tests-tiny", "--guests", str(GUESTS), "--ticks", str(TICKS),
                             "--address", f"tcp://{HOST_IP}:0", "--run-dir", str(run_dir), "--no-report",
                             "--join-timeout", "60"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    guests: list[subprocess.Popen] = []
    listening = ""
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "join.json").exists():
            assert host.poll() is None and time.monotonic() < deadline, host.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(0.05)
        join = json.loads((run_dir / "join.json").read_text())
        address = join["address"]
        assert address.startswith(f"tcp://{HOST_IP}:"), address
        # What the host listens on, seen from its namespace: its veth address only.
        listening = subprocess.run(["ip", "netns", "exec", host_ns, "ss", "-ltnH"], capture_output=True,
                                   text=True).stdout
        for gid in range(GUESTS):
            g = join["guests"][str(gid)]
            guests.append(subprocess.Popen(
                ["ip", "netns", "exec", guest_ns, sys.executable, "-m", "balloonlab.guestd", "--address", address,
                 "--guest-id", str(gid), "--token-file", g["token_file"], "--log", str(run_dir / f"guest-{gid}.jsonl")],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                start_new_session=True))
        out, err = host.communicate(timeout=120)
        codes = [g.wait(30) for g in guests]
    finally:
        for p in [host, *guests]:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    assert host.returncode == 0, f"{err}\n{dump_logs(run_dir)}"
    assert codes == [0] * GUESTS, [g.stderr.read() if g.stderr else "" for g in guests]
    port = address.rsplit(":", 1)[1]
    assert f"{HOST_IP}:{port}" in listening and f"0.0.0.0:{port}" not in listening and f"*:{port}" not in listening, \
        listening
    hostlog = read_jsonl(run_dir / "host.jsonl")
    assert events_named(hostlog, "run_started")[0]["address"] == address
    assert events_named(hostlog, "tcp_not_loopback")          # said so: the credentials are the only guard
    pids = {e["guest"]: e["pid"] for e in events_named(hostlog, "guest_connected")}
    assert sorted(pids) == list(range(GUESTS))
    summary = json.loads((run_dir / "summary.json").read_text())["variants"]["default"]
    assert summary["status"] == "completed" and summary["ticks"] == TICKS and summary["lost_pages"] == 0
    assert summary["lost_pages_host"] == 0 and all(g["refs"] > 0 for g in summary["guests"])
    assert not procs_mentioning(str(run_dir))
