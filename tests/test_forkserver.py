"""Guests forked from the fork server: same counts as exec'd guests, real processes, a dead server reported.

The launcher runs as a user runs it (real host, fork server and guests over a
Unix socket); each test bounds its time and checks that no process of the
run is left. The last test drives the fork server's client directly.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Launched, dump_logs, procs_mentioning, python_prints, wait_until
from tests.rawclient import proc_state, run_pids, wait_stopped

# An exited process: gone, a zombie not yet reaped (Z), or one being reaped right now (X).
_GONE = ("", "Z", "X")
from tests.test_determinism import determinism_run
from tests.test_launch import RUN_TIMEOUT_S, TINY, assert_no_leftovers, events_named, guest_pid, host_tick, read_jsonl

pytestmark = pytest.mark.multiprocess

PRIVATE_MIB_TARGET = 20.0


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _private_mib(pid: int) -> float:
    kib = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kib += int(line.split()[1])
    return kib / 1024


def _forkserver_pid(run_dir: Path) -> int:
    found = [pid for pid, cmd in procs_mentioning(str(run_dir)) if "-m balloonlab.forkserver" in cmd]
    assert len(found) == 1, procs_mentioning(str(run_dir))
    return found[0]


def _fail(run: Launched, run_dir: Path) -> str:
    return f"stderr:\n{run.err}\n{dump_logs(run_dir)}"


@pytest.mark.timeout(240)
def test_forked_guests_count_exactly_what_execd_guests_count(tmp_path: Path, determinism_seed5: dict[str, Any]
                                                           ) -> None:
    """Same scenario + seed: every guest stat and the host's books identical, forked or exec'd.

    The forked run is test_determinism's seed-5 run (a session fixture: the same launcher command, run once)."""
    fork = determinism_seed5
    # The fork run's fork server said nothing on stderr (an empty file is removed).
    assert not (fork["run_dir"] / "forkserver.stderr").exists()
    execd = determinism_run(tmp_path, "exec", guest_start="exec")
    for gid in (0, 1):
        a, b = fork["guests"][gid], execd["guests"][gid]
        assert a["evictions"] > 100 and a["refs"] > 0, a          # the run really paged
        assert a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
    assert fork["host"]["guests_memory"] == execd["host"]["guests_memory"]
    assert fork["host"]["ticks"] == execd["host"]["ticks"] and fork["host"]["reason"] == "completed"


@pytest.mark.timeout(180)
def test_a_forked_guest_is_a_real_process_stopped_and_killed_as_before(tmp_path: Path) -> None:
    """Forked guests: children of the fork server, own process group and command line, small private memory.

    SIGSTOP/SIGCONT on a guest's pid work; a SIGKILLed guest is reported by the launcher as today
    (its exit status comes from the fork server, which reaps it).
    """
    run_dir = tmp_path / "run"
    ticks = 300
    # paced (3 wall s at least): the processes are looked at while the run is live
    run = Launched("--scenario", TINY, "--ticks", str(ticks), "--run-dir", str(run_dir), "--no-report",
                   "--guest-start", "fork", "--pace", "1")
    try:
        wait_until(lambda: host_tick(run_dir) >= 9 and guest_pid(run_dir, 2), 60.0, what="tick 10 in host.jsonl")
        server = _forkserver_pid(run_dir)
        pids = run_pids(run_dir)    # found by their command lines, as the fault tests find them
        assert sorted(pids) == ["guest-0", "guest-1", "guest-2", "guest-3", "host"], pids
        for gid in range(4):
            pid = pids[f"guest-{gid}"]
            assert pid == guest_pid(run_dir, gid), "the host saw another process than the command line names"
            st = _status(pid)
            assert int(st["PPid"]) == server, st
            assert os.getpgid(pid) == pid                    # its own process group, as exec'd guests have
            assert os.getsid(pid) == os.getsid(server)       # in the server's session: one scheduling group
            if os.path.exists(f"/proc/{server}/autogroup"):
                group = Path(f"/proc/{pid}/autogroup").read_text().split()[0]
                assert group == Path(f"/proc/{server}/autogroup").read_text().split()[0], group
            private = _private_mib(pid)
            assert private < PRIVATE_MIB_TARGET, f"guest {gid}: {private:.1f} MiB private"
        victim = pids["guest-1"]
        os.kill(victim, signal.SIGSTOP)
        wait_stopped(victim, 10.0)
        os.kill(victim, signal.SIGCONT)
        wait_until(lambda: proc_state(victim) not in ("T", ""), 10.0, what="guest 1 running again")
        os.kill(pids["guest-2"], signal.SIGKILL)
        rc = run.wait(RUN_TIMEOUT_S)
    finally:
        run.close()
    assert rc == 1, _fail(run, run_dir)
    assert "[default] degraded: guest 2 lost" in run.err, run.err
    assert "guest-2 was killed by SIGKILL" in run.err, run.err
    fin = events_named(read_jsonl(run_dir / "host.jsonl"), "run_finished")[0]
    assert fin["reason"] == "completed" and fin["ticks"] == ticks
    for gid in (0, 1, 3):
        done = events_named(read_jsonl(run_dir / f"guest-{gid}.jsonl"), "guest_finished")
        assert done and done[0]["ticks"] == ticks, f"guest {gid} did not run to the end"
    summary = json.loads((run_dir / "summary.json").read_text())["variants"]["default"]
    assert list(summary["guests_lost"]) == ["2"] and summary["lost_pages"] == 0
    assert_no_leftovers(run_dir)


@pytest.mark.timeout(180)
def test_a_dead_fork_server_fails_the_run_and_says_so(tmp_path: Path) -> None:
    """SIGKILL the fork server mid-run: its guests die with it, the host ends the run, the launcher says why."""
    run_dir = tmp_path / "run"
    run = Launched("--scenario", TINY, "--ticks", "100000", "--run-dir", str(run_dir), "--no-report",
                   "--guest-start", "fork")
    try:
        wait_until(lambda: host_tick(run_dir) >= 4, 60.0, what="tick 5 in host.jsonl")
        server = _forkserver_pid(run_dir)
        guests = [pid for name, pid in run_pids(run_dir).items() if name.startswith("guest-")]
        assert len(guests) == 4
        os.kill(server, signal.SIGKILL)
        rc = run.wait(RUN_TIMEOUT_S)
    finally:
        run.close()
    assert rc == 1, _fail(run, run_dir)
    assert f"the guest fork server (pid {server}) died" in run.err, run.err
    assert "killed by SIGKILL" in run.err and "guest(s) were killed with it" in run.err, run.err
    # The host was stopped in order: it ended the run and wrote its summary line.
    fin = events_named(read_jsonl(run_dir / "host.jsonl"), "run_finished")
    assert fin, dump_logs(run_dir)
    for pid in guests:
        assert proc_state(pid) in _GONE or not Path(f"/proc/{pid}").exists()
    assert_no_leftovers(run_dir)


@pytest.mark.timeout(120)
def test_the_client_restarts_signals_and_reaps_guests(tmp_path: Path) -> None:
    """The client API: exit statuses from the server, a guest started again under its id, cleanup on close."""
    from balloonlab.forkclient import ForkServer, ForkServerError

    async def scenario() -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        server = await ForkServer.start(tmp_path, env)
        assert server.rehearsed   # it played a guest's first ticks before its first fork (guestd/rehearsal.py)
        nowhere = ["--address", f"unix:{tmp_path}/nobody.sock", "--guest-id", "7"]
        genv = {"BALLOONLAB_TOKEN": "t" * 16, "PATH": os.environ.get("PATH", "")}
        try:
            bad = await server.spawn("guest-7", ["--guest-id", "x"], genv, tmp_path / "bad.stderr")
            assert await asyncio.wait_for(bad.wait(), 30) == 2          # argparse's status, reaped by the server
            assert "--guest-id: invalid int value" in (tmp_path / "bad.stderr").read_text()
            first = await server.spawn("guest-7", nowhere, genv, tmp_path / "g7.stderr")
            wait_until(lambda: b"--guest-id\x007\x00" in Path(f"/proc/{first.pid}/cmdline").read_bytes(), 30.0,
                       what="the guest's own command line")
            assert os.getsid(first.pid) == os.getsid(server.pid) and os.getpgid(first.pid) == first.pid
            environ = Path(f"/proc/{first.pid}/environ").read_bytes().split(b"\0")
            assert b"BALLOONLAB_TOKEN=" + b"t" * 16 in environ        # its environment, as an exec'd one shows it
            first.send_signal(signal.SIGSTOP)
            wait_stopped(first.pid, 10.0)
            first.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(first.wait(), 30) == -signal.SIGKILL
            first.send_signal(signal.SIGKILL)                           # after its end: a no-op, not an error
            again = await server.spawn("guest-7", nowhere, genv, tmp_path / "g7.stderr", own_session=True)
            assert again.pid != first.pid and again.returncode is None
            # asked for: a session of its own (the reply comes at the fork; the child then sets it up)
            wait_until(lambda: os.getsid(again.pid) == again.pid, 30.0, what="guest 7 in a session of its own")
        finally:
            await server.close()
        assert server.proc.returncode == 0
        assert again.lost and again.returncode is None                  # closed under it: killed, not reported
        wait_until(lambda: proc_state(again.pid) in _GONE, 10.0, what="the guest gone with its server")
        with pytest.raises(ForkServerError, match="cannot start guest-8"):
            await server.spawn("guest-8", nowhere, genv, tmp_path / "g8.stderr")

    asyncio.run(asyncio.wait_for(scenario(), 100))
    assert not procs_mentioning(str(tmp_path))


def test_forked_guests_share_the_servers_session_unless_requests_come_in_arrival_order() -> None:
    from balloonlab.runner import _arrival_order
    assert not _arrival_order({"host": {}, "locks": {}})                       # deterministic, the default
    assert not _arrival_order({"host": {"request_order": "deterministic"}})
    assert _arrival_order({"host": {"request_order": "arrival"}, "locks": {}})
    assert _arrival_order({"host": {}, "locks": {"protocol": "ordered"}})      # a lock model runs in arrival order


def test_the_switch_picks_how_guests_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from balloonlab.runner import default_guest_start
    monkeypatch.delenv("BALLOONLAB_FORKSERVER", raising=False)
    assert default_guest_start() == "fork"
    for off in ("0", "no", "off", "false"):
        monkeypatch.setenv("BALLOONLAB_FORKSERVER", off)
        assert default_guest_start() == "exec"
    monkeypatch.setenv("BALLOONLAB_FORKSERVER", "1")
    assert default_guest_start() == "fork"


def test_an_unknown_guest_start_is_refused_before_anything_starts(tmp_path: Path) -> None:
    import balloonlab
    from balloonlab.proto.errors import ConfigError
    with pytest.raises(ConfigError, match="guest_start must be one of fork, exec, got 'spawn'"):
        balloonlab.run(TINY, ticks=1, run_dir=tmp_path / "run", guest_start="spawn", verbose=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(120)
def test_a_guest_of_a_dead_server_is_waited_for_until_it_has_exited(tmp_path: Path) -> None:
    """Its server gone, a guest's wait() returns (lost) only once the process has exited: a launcher that
    returns then leaves none of its guests running (it used to return at once, while they still died)."""
    from balloonlab.forkclient import ForkServer

    async def scenario() -> None:
        server = await ForkServer.start(tmp_path, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        nowhere = ["--address", f"unix:{tmp_path}/nobody.sock", "--guest-id", "3"]
        genv = {"BALLOONLAB_TOKEN": "t" * 16, "PATH": os.environ.get("PATH", "")}
        try:
            guest = await server.spawn("guest-3", nowhere, genv, tmp_path / "g3.stderr")
            # The server's death as the client sees it, with the guest still alive: its kill held back, so
            # that the wait has something to wait for.
            guest.send_signal = lambda sig: None          # type: ignore[method-assign]
            server._died("a test")
            waiting = asyncio.ensure_future(guest.wait())
            await asyncio.sleep(0.3)
            assert guest.lost and not waiting.done() and proc_state(guest.pid) not in _GONE
            os.kill(guest.pid, signal.SIGKILL)
            assert await asyncio.wait_for(waiting, 30) is None
            assert proc_state(guest.pid) in _GONE
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(scenario(), 100))
    assert not procs_mentioning(str(tmp_path))


def test_the_rehearsal_plays_a_guests_first_ticks_clean_and_leaves_nothing_running() -> None:
    """In a fresh interpreter, as in the fork server: the rehearsal's guest faults, reads (chained), offers
    answers ahead and loses no page; afterwards no loop runs, and no thread or file is left open."""
    probe = """
import asyncio, os, threading
from balloonlab.guestd import rehearsal
calls = {}
orig = rehearsal._StandIn.call
async def counted(self, msg, **kw):
    kind = type(msg).__name__ + ("+chain" if getattr(msg, "chain", b"") else "")
    calls[kind] = calls.get(kind, 0) + 1
    return await orig(self, msg, **kw)
rehearsal._StandIn.call = counted
aheads = []
done = rehearsal._StandIn.tick_done
def tick_done(self, *a, **kw):
    aheads.append(bool(a[5]) if len(a) > 5 else False)
    return done(self, *a, **kw)
rehearsal._StandIn.tick_done = tick_done
fds = sorted(os.listdir("/proc/self/fd"))
lost = rehearsal.rehearse()
try:
    asyncio.get_running_loop()
    running = True
except RuntimeError:
    running = False
print(lost, len(aheads), sum(aheads), calls.get("EptFault", 0) > 0, calls.get("DiskRead+chain", 0) > 0,
      running, threading.active_count(), sorted(os.listdir("/proc/self/fd")) == fds)
"""
    out = python_prints(probe, 120.0)
    lost, ticks, aheads, faulted, chained, running, threads, same_fds = out.split()
    from balloonlab.guestd.rehearsal import REHEARSAL_TICKS
    assert (lost, ticks, faulted, chained, running, threads, same_fds) == (
        "0", str(REHEARSAL_TICKS), "True", "True", "False", "1", "True"), out
    assert int(aheads) > 0, out


@pytest.mark.timeout(120)
def test_the_rehearsal_can_be_switched_off(tmp_path: Path) -> None:
    """``BALLOONLAB_REHEARSAL=0``: the server forks without having played a guest first (to measure it)."""
    from balloonlab.forkclient import ForkServer

    async def start() -> bool:
        server = await ForkServer.start(tmp_path, dict(os.environ, OPENBLAS_NUM_THREADS="1", BALLOONLAB_REHEARSAL="0"))
        try:
            return server.rehearsed
        finally:
            await server.close()

    assert asyncio.run(asyncio.wait_for(start(), 100)) is False
    assert not procs_mentioning(str(tmp_path))


def test_a_forked_guest_gets_exactly_its_own_environment_and_a_bad_one_is_refused() -> None:
    """The server works out before the fork what differs from its own environment; the child applies only
    that, and must end with exactly the environment asked for (removed, changed and added variables)."""
    out = python_prints("""
import json, os, socket
os.environ["ONLY_THE_SERVER"] = "1"; os.environ["CHANGED"] = "old"
from balloonlab.forkserver import _Server, _environ_diff, _set_environ
want = {k: v for k, v in os.environ.items() if k != "ONLY_THE_SERVER"}
want.update(CHANGED="new", ADDED="x")
diff = _environ_diff(want)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    _set_environ(diff)
    os.write(w, json.dumps(dict(os.environ)).encode()); os._exit(0)
os.close(w)
got = json.loads(os.read(r, 1 << 20).decode()); os.waitpid(pid, 0)
a, b = socket.socketpair()
_Server(a).spawn({"id": 9, "args": [], "env": ["not", "a", "map"]})
print(json.dumps([got == want, sorted(diff[0]), sorted(diff[1]), json.loads(b.recv(4096))]))
""")
    same, gone, changed, reply = json.loads(out)
    assert same and gone == ["ONLY_THE_SERVER"] and changed == ["ADDED", "CHANGED"]
    assert reply == {"op": "spawn_failed", "id": 9, "error": "spawn request's 'env' is not a map"}


def test_a_forked_guest_leaves_its_loop_standing_but_not_its_last_writes() -> None:
    """``main(teardown=False)`` (a forked guest, which exits right after) does not take its event loop down,
    but it returns only once its connection is closed: everything it wrote reached the peer."""
    import asyncio
    import socket
    import threading

    from balloonlab.guestd.__main__ import _run_and_leave

    mine, peer = socket.socketpair()
    got = bytearray()

    def read_all() -> None:
        while chunk := peer.recv(1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=read_all)

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.closed = asyncio.get_running_loop().create_future()

        def connection_lost(self, exc: Exception | None) -> None:
            self.closed.set_result(None)

        async def wait_closed(self) -> None:
            await self.closed

    class Agent:
        conn: Any = None

        async def run(self) -> int:
            transport, self.conn = await asyncio.get_running_loop().create_unix_connection(Conn, sock=mine)
            transport.write(b"x" * (4 << 20))     # far more than the socket takes at once: still buffered
            transport.close()
            reader.start()                         # the peer reads only now
            return 7

    agent = Agent()
    try:
        assert _run_and_leave(agent) == 7
        reader.join(5)      # returns at the peer's EOF: only a closed socket, its writes all out, gives one
        assert not reader.is_alive() and len(got) == 4 << 20
        loop = asyncio.get_event_loop_policy().get_event_loop()
        assert not loop.is_closed()                # left standing: the process exits next
    finally:
        peer.shutdown(socket.SHUT_RDWR)            # (a reader still blocked, had it not been closed)
        reader.join(5)
        peer.close()
        asyncio.set_event_loop(None)
