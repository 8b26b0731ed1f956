"""Security defaults of a real run: a private socket, loopback TCP, and a token that never reaches a file.

- Unix transport: the run directory is 0700 and the socket in it 0600.
- TCP transport: the host listens on 127.0.0.1 (checked by
  ``test_faults_host.py``, which runs over TCP).
- The run's secret travels only in the host's environment; each guest gets
  only its own credential (``guest_token(secret, id)``), not the secret and
  not another's. Neither is on a command line, and after the run no file of
  the run directory (logs, configs, summary, stderr) contains the secret,
  and the credential files are gone. (Constant-time comparison is
  ``tests/test_proto_rpc.py``'s; a session reaching only its own guest is
  ``test_hostile_guest.py``'s.)
"""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tests.procs import Launched, dump_logs
from tests.rawclient import run_pids
from tests.test_launch import assert_no_leftovers, events_named, read_jsonl

pytestmark = pytest.mark.multiprocess


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _watch_run(run: Launched, run_dir: Path) -> dict[str, object]:
    """While the run is alive: its token (from the host's environment), modes, command lines."""
    deadline = time.monotonic() + 90.0
    while True:
        pids = run_pids(run_dir)
        if "host" in pids and len(pids) >= 5:
            break
        assert run.proc.poll() is None and time.monotonic() < deadline, dump_logs(run_dir)
        time.sleep(0.02)
    seen: dict[str, object] = {"token": _environ(pids["host"])["BALLOONLAB_TOKEN"],
                               "guest_tokens": {name: _environ(p)["BALLOONLAB_TOKEN"] for name, p in pids.items()
                                                if name != "host"},
                               "cmdlines": [_cmdline(p) for p in pids.values()],
                               "dir_mode": stat.S_IMODE(os.stat(run_dir).st_mode)}
    argv = seen["cmdlines"][list(pids).index("host")].split()  # type: ignore[index]
    address = argv[argv.index("--address") + 1]
    seen["address"] = address
    if address.startswith("unix:"):
        # Beside the logs, or in a private /tmp directory when the run directory's path is too long.
        sock = Path(address[len("unix:"):])
        st = os.stat(sock)
        seen["sock_mode"] = stat.S_IMODE(st.st_mode)
        seen["is_socket"] = stat.S_ISSOCK(st.st_mode)
        seen["sock_dir_mode"] = stat.S_IMODE(os.stat(sock.parent).st_mode)
    return seen


def token_free(run_dir: Path, token: str) -> None:
    """No file of the run directory contains the run's token."""
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "host.jsonl" for p in files)
    for p in files:
        assert token.encode() not in p.read_bytes(), f"the run's token is in {p}"


@pytest.mark.timeout(300)
def test_private_socket_and_no_token_anywhere(tmp_path: Path) -> None:
    # (Over TCP the host binds to loopback: test_faults_host.py runs over TCP and checks that, and the token.)
    transport = "unix"
    run_dir = tmp_path / "run"
    # paced (2.4 wall s at least): the processes are looked at while the run is live
    run = Launched("--scenario", "tests-tiny", "--ticks", "120", "--transport", transport, "--run-dir",
                   str(run_dir), "--no-report", "--pace", "0.5")
    try:
        seen = _watch_run(run, run_dir)
        rc = run.wait(120.0)
    finally:
        run.close()
    assert rc == 0, f"{run.err}\n{dump_logs(run_dir)}"
    token = str(seen["token"])
    assert len(token) >= 32
    from balloonlab.proto.handshake import guest_token
    assert seen["guest_tokens"] == {f"guest-{g}": guest_token(token, g) for g in range(4)}   # its own, only
    assert not (run_dir / "credentials").exists()
    assert seen["dir_mode"] == 0o700
    for cmd in seen["cmdlines"]:  # type: ignore[union-attr]
        assert token not in cmd and not any(t in cmd for t in seen["guest_tokens"].values()), cmd  # type: ignore
    started = events_named(read_jsonl(run_dir / "host.jsonl"), "run_started")[0]
    if transport == "unix":
        assert seen["is_socket"] and seen["sock_mode"] == 0o600 and seen["sock_dir_mode"] == 0o700, seen
        assert started["address"] == seen["address"]
    else:
        assert started["address"].startswith("tcp://127.0.0.1:"), started
        assert not events_named(read_jsonl(run_dir / "host.jsonl"), "tcp_not_loopback")
    token_free(run_dir, token)
    assert_no_leftovers(run_dir)
