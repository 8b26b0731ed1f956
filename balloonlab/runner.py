"""Run one variant: start the host, then the guests; watch them; tear down.

Children run in their own sessions (a terminal's Ctrl-C reaches only the
launcher, which then stops them in order) and die with the launcher
(PR_SET_PDEATHSIG), so no process outlives a run. Teardown is always:
SIGTERM, wait, SIGKILL.

Credentials: the host gets the variant's run secret, each guest only its
own credential (``proto.handshake.guest_token``), both in the environment.
Each guest started elsewhere (``external``) also has its credential written to
``RUN_DIR/credentials/guest-N.token`` (the directory 0700, each file 0600), so
that it can be handed exactly its own; ``join.json`` says where the host
listens and where each file is. The guests the launcher starts get theirs in
the environment only: 64 files written, resolved and removed again were
~3-5 ms of the launcher's CPU before it hands the host its arguments. The
files go when the variant ends: they open nothing after it.

Guests start, by default, from a fork server (``balloonlab.forkserver``):
one process that has imported the guest once and forks each guest from
that image, so that guests share the imported pages. Each is still a real
process with its own pid, session, argv, environment, stderr file and exit
status (the server reaps it and reports the status). ``guest_start="exec"``
(or ``BALLOONLAB_FORKSERVER=0``) starts each guest as
``python -m balloonlab.guestd`` instead. A fork server that dies ends the
variant with an error that says so.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from balloonlab.early import (GUEST_START_MODES, EarlyHost, child_env, default_guest_start, die_with_parent,
                              start_early_host)
from balloonlab.forkclient import ForkedProcess, ForkServer, ForkServerError, PopenProcess

__all__ = ["ChildResult", "VariantResult", "JoinInfo", "run_variant", "write_credentials", "guest_command",
           "TEARDOWN_GRACE_S", "GUEST_START_MODES", "default_guest_start", "child_env", "die_with_parent",
           "EarlyHost", "start_early_host"]

TEARDOWN_GRACE_S = 5.0
HOST_READY_TIMEOUT_S = 120.0   # a host on a machine loaded many times over starts slowly, but it starts
CREDENTIALS_DIR = "credentials"
# Spawn requests in flight to the fork server at once: it forks one after the other without waiting for
# the launcher to read each reply (a round trip per guest, 30-40 ms each on a loaded machine), and the
# control socket's buffer never holds more than a few requests (each carries an environment).
FORK_WINDOW = 8


@dataclass
class ChildResult:
    name: str
    pid: int
    returncode: int | None
    stderr_tail: str = ""

    @property
    def killed_by(self) -> str | None:
        if self.returncode is not None and self.returncode < 0:
            return signal.Signals(-self.returncode).name
        return None


@dataclass
class VariantResult:
    variant: str
    run_dir: Path
    host: ChildResult | None = None
    guests: list[ChildResult] = field(default_factory=list)
    interrupted: bool = False
    error: str | None = None
    finished: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def deadlocked(self) -> bool:
        """The host ended the run on a deadlock it detected (its exit status ``EXIT_DEADLOCK``)."""
        from balloonlab.proto.locks import EXIT_DEADLOCK   # here: the launcher starts its children before proto loads
        return self.host is not None and self.host.returncode == EXIT_DEADLOCK and not self.interrupted

    @property
    def ok(self) -> bool:
        if self.error or self.interrupted or self.host is None or self.host.returncode != 0:
            return False
        # A guest killed from outside is a reported event, not a launcher failure;
        # a guest that exited with an error code is a bug.
        return not any(g.returncode is not None and g.returncode > 0 for g in self.guests)


@dataclass
class JoinInfo:
    """How an outside guest joins this variant: where the host listens and each guest's credential file."""

    variant: str
    address: str
    token_files: dict[int, Path]

    def command(self, gid: int, python: str = "python") -> str:
        return guest_command(self.address, gid, self.token_files[gid], python)

    def as_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "address": self.address,
                "guests": {str(g): {"token_file": str(p), "command": self.command(g)}
                           for g, p in sorted(self.token_files.items())}}


def guest_command(address: str, gid: int, token_file: Path, python: str = "python") -> str:
    return (f"{python} -m balloonlab.guestd --address {address} --guest-id {gid} "
            f"--token-file {token_file} --log guest-{gid}.jsonl")


def write_credentials(run_dir: Path, secret: str, guest_ids: list[int]) -> dict[int, Path]:
    """Each guest's own credential in ``run_dir/credentials/guest-N.token`` (0700 directory, 0600 files)."""
    from balloonlab.proto.handshake import guest_token
    cdir = run_dir / CREDENTIALS_DIR
    cdir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(cdir, 0o700)   # ours: made just now (or by us in an earlier variant of this run)
    out = {}
    for gid in guest_ids:
        path = cdir / f"guest-{gid}.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # 0600 from birth
        with os.fdopen(fd, "w") as f:
            f.write(guest_token(secret, gid) + "\n")
        out[gid] = path.resolve()
    return out


class _Children:
    def __init__(self) -> None:
        self.procs: dict[str, Any] = {}     # name -> asyncio.subprocess.Process, ForkedProcess or PopenProcess
        self.stderr_paths: dict[str, Path] = {}
        self.early_stderr: dict[str, Any] = {}   # name -> an adopted early host's stderr before adoption

    async def fork(self, server: ForkServer, name: str, args: list[str], env: dict[str, str],
                   stderr_path: Path, own_session: bool = False) -> ForkedProcess:
        proc = await server.spawn(name, args, env, stderr_path, own_session=own_session)
        self.procs[name] = proc
        self.stderr_paths[name] = stderr_path
        return proc

    async def fork_all(self, server: ForkServer, guests: list[tuple[str, list[str], dict[str, str], Path]],
                       own_session: bool = False) -> None:
        """Fork every guest, ``FORK_WINDOW`` requests in flight, asked in the order given.

        ``own_session``: each guest starts a session of its own (``ForkServer.spawn``).

        Every fork asked for is awaited (and, when it worked, recorded for the
        teardown) before the first failure, in the order given, is raised.
        """
        window = asyncio.Semaphore(FORK_WINDOW)

        async def one(name: str, args: list[str], env: dict[str, str], stderr_path: Path) -> None:
            async with window:
                await self.fork(server, name, args, env, stderr_path, own_session)

        tasks = [asyncio.ensure_future(one(*g)) for g in guests]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            raise
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def spawn(self, name: str, argv: list[str], env: dict[str, str], stderr_path: Path,
                    stdout_pipe: bool = False) -> asyncio.subprocess.Process:
        with open(stderr_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else asyncio.subprocess.DEVNULL,
                stderr=err, start_new_session=True, preexec_fn=die_with_parent)
        self.procs[name] = proc
        self.stderr_paths[name] = stderr_path
        return proc

    async def adopt_host(self, early: EarlyHost, args: list[str], env: dict[str, str],
                         stderr_path: Path) -> PopenProcess:
        """Give a host from ``start_early_host`` its command line, environment and stderr file; it runs as "host"."""
        early.adopted = True
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        assert early.popen.stdout is not None and early.popen.stdin is not None
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), early.popen.stdout)
        proc = PopenProcess(early.popen, reader)
        self.procs["host"] = proc
        self.stderr_paths["host"] = stderr_path
        self.early_stderr["host"] = early.stderr
        try:
            early.popen.stdin.write(json.dumps({"argv": args, "env": env, "stderr": str(stderr_path)}).encode() + b"\n")
            early.popen.stdin.close()
        except OSError:
            pass   # it died while importing: its exit status and stderr say how
        return proc

    async def teardown(self, grace_s: float = TEARDOWN_GRACE_S) -> None:
        live = [p for p in self.procs.values() if p.returncode is None]
        for p in live:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                await asyncio.wait_for(p.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                _signal(p, signal.SIGKILL)
                await p.wait()

    async def stop_host_first(self, grace_s: float = TEARDOWN_GRACE_S) -> None:
        """Ctrl-C: the host ends the run (RunEnd to every guest, logs closed), then the rest.

        Signalling everyone at once would let the host see its guests die
        first and report them all as lost; stopping the host first keeps an
        interrupted run's logs and summary truthful. Stragglers get
        ``teardown``'s SIGTERM, wait, SIGKILL.
        """
        host = self.procs.get("host")
        if host is not None and host.returncode is None:
            _signal(host, signal.SIGTERM)
            try:
                await asyncio.wait_for(host.wait(), grace_s)
            except asyncio.TimeoutError:
                pass
        guests = [p for n, p in self.procs.items() if n != "host" and p.returncode is None]
        if guests:
            try:
                await asyncio.wait_for(asyncio.gather(*(p.wait() for p in guests)), grace_s)
            except asyncio.TimeoutError:
                pass
        await self.teardown(grace_s)

    def result(self, name: str) -> ChildResult:
        p = self.procs[name]
        tail = ""
        path = self.stderr_paths[name]
        try:
            data = path.read_bytes()
            tail = data[-2000:].decode(errors="replace")
            if not data:
                path.unlink()
        except FileNotFoundError:
            data = b""
        early = self.early_stderr.pop(name, None)
        if early is not None:
            if not data:   # it died before it moved to its stderr file
                early.seek(0)
                data = early.read()
                tail = data[-2000:].decode(errors="replace")
                if data:
                    path.write_bytes(data)
            early.close()
        return ChildResult(name, p.pid, p.returncode, tail)


def _signal(p: Any, sig: int) -> None:
    try:
        p.send_signal(sig)
    except ProcessLookupError:
        pass


def _arrival_order(run_config: dict[str, Any]) -> bool:
    """Does this variant's host serve requests in arrival order (a lock model, or asked for)?

    There real timing is the experiment: forked guests then start a session
    each, as exec'd guests do, and compete for the CPU as the lock scenarios
    were measured (sharing the fork server's scheduling group, the ordered
    protocol's stress run saw 0-7 tick reclaims instead of ~60). Under the
    deterministic order timing changes no count, and the shared group gives
    the host, the run's bottleneck, its half of the CPU.
    """
    from balloonlab.hostd.memconfig import host_memory_config
    from balloonlab.proto.locks import lock_config_from_mapping
    locks = lock_config_from_mapping(run_config.get("locks"))
    return host_memory_config(run_config.get("host", {})).resolved_request_order(locks.enabled) == "arrival"


async def run_variant(run_config: dict[str, Any], run_dir: Path, address: str, secret: str,
                      on_progress: Callable[[dict[str, Any]], None], stop: asyncio.Event,
                      python: str = sys.executable, log_level: str = "info", external: frozenset[int] = frozenset(),
                      on_join: Callable[[JoinInfo], None] | None = None,
                      guest_start: str | None = None, fork_server: ForkServer | None = None,
                      early_host: EarlyHost | None = None) -> VariantResult:
    """Start host + guests for one variant and supervise them to the end.

    Guests in ``external`` are not started: ``on_join`` is told how they join
    once the host listens, and ``join.json`` in ``run_dir`` says it too.
    ``guest_start``: ``fork`` (from the fork server) or ``exec`` (one
    interpreter each); None: ``default_guest_start()``. ``fork_server``:
    a server the caller started and closes (one for every variant); None, or
    dead: this variant starts its own. ``early_host``: a host from
    ``start_early_host`` to run this variant's host in instead of starting one.
    """
    from balloonlab.proto.handshake import guest_token
    guest_start = default_guest_start() if guest_start is None else guest_start
    if guest_start not in GUEST_START_MODES:
        raise ValueError(f"guest_start must be one of {', '.join(GUEST_START_MODES)}, got {guest_start!r}")
    if not run_dir.exists():
        run_dir.mkdir(mode=0o700)
    cfg_path = run_dir / "host-config.json"
    cfg_path.write_text(json.dumps(run_config, indent=1))
    env = child_env()
    result = VariantResult(run_config["variant"], run_dir)
    children = _Children()
    wall0 = time.monotonic()
    token_files = write_credentials(run_dir, secret, sorted(external)) if external else {}
    own_guests = [int(g["id"]) for g in run_config["guests"] if int(g["id"]) not in external]
    shared = fork_server if fork_server is not None and not fork_server.dead.is_set() else None
    server_start: asyncio.Future[ForkServer] | None = None
    server: ForkServer | None = None
    halt = asyncio.Event()          # Ctrl-C, or the fork server died: stop following the host
    watchers: list[asyncio.Future[Any]] = [asyncio.ensure_future(_relay(stop, halt))]
    try:
        if guest_start == "fork" and own_guests:
            # It imports the guest while the host starts: neither waits for the other.
            if shared is not None:
                server_start = asyncio.ensure_future(shared.wait_ready())
            else:
                server_start = asyncio.ensure_future(ForkServer.start(run_dir, env, python, die_with_parent))
        host_args = ["--config", str(cfg_path), "--address", address, "--log", str(run_dir / "host.jsonl"),
                     "--log-level", log_level]
        host_env = dict(env, BALLOONLAB_TOKEN=secret)
        if early_host is not None:
            host: Any = await children.adopt_host(early_host, host_args, host_env, run_dir / "host.stderr")
        else:
            host = await children.spawn("host", [python, "-m", "balloonlab.hostd", *host_args], host_env,
                                        run_dir / "host.stderr", stdout_pipe=True)
        assert host.stdout is not None
        ready = await _wait_ready(host, stop)
        if ready is None:
            await children.teardown()
            result.host = children.result("host")
            result.interrupted = stop.is_set()
            result.error = None if stop.is_set() else "host did not become ready: " + (result.host.stderr_tail.strip()[-500:] or "no output")
            return result
        bound = ready
        if external:
            join = JoinInfo(result.variant, bound, {g: token_files[g] for g in sorted(external)})
            (run_dir / "join.json").write_text(json.dumps(join.as_dict(), indent=1) + "\n")
            if on_join is not None:
                on_join(join)
        try:
            if server_start is not None:
                server = await server_start
                watchers.append(asyncio.ensure_future(_relay(server.dead, halt)))
            starts = [(f"guest-{gid}", ["--address", bound, "--guest-id", str(gid), "--log",
                                        str(run_dir / f"guest-{gid}.jsonl"), "--log-level", log_level],
                       dict(env, BALLOONLAB_TOKEN=guest_token(secret, gid)), run_dir / f"guest-{gid}.stderr")
                      for gid in own_guests]
            if server is not None:
                await children.fork_all(server, starts, own_session=_arrival_order(run_config))
            else:
                for name, args, genv, stderr_path in starts:
                    await children.spawn(name, [python, "-m", "balloonlab.guestd", *args], genv, stderr_path)
            result.finished = await _follow_host(host, on_progress, halt)
        except ForkServerError as exc:
            result.error = await _server_error(server, exc)
        if result.error:
            await children.stop_host_first()
        elif stop.is_set():
            result.interrupted = True
            await children.stop_host_first()
        elif server is not None and server.dead.is_set():
            # The host ends the run for the guests it still has; the run failed all the same.
            result.error = await _server_error(server, None)
            await children.stop_host_first()
        else:
            await host.wait()
            # Guests exit on RunEnd; any that do not are stopped.
            guests = [p for n, p in children.procs.items() if n != "host"]
            try:
                await asyncio.wait_for(asyncio.gather(*(p.wait() for p in guests)), TEARDOWN_GRACE_S)
            except asyncio.TimeoutError:
                pass
            await children.teardown()
    finally:
        # Whatever happened above (an exception, a cancellation), nothing outlives the run.
        for w in watchers:
            w.cancel()
        if early_host is not None:
            early_host.discard()   # never adopted: this variant failed before its host started
        await asyncio.shield(children.teardown())
        if server is None and server_start is not None:
            server = await asyncio.shield(_started(server_start))
        if server is not None and server is not shared:
            await asyncio.shield(server.close())
        import shutil
        shutil.rmtree(run_dir / CREDENTIALS_DIR, ignore_errors=True)   # dead secrets: they open nothing now
        (run_dir / "join.json").unlink(missing_ok=True)
    result.host = children.result("host")
    result.guests = [children.result(n) for n in children.procs if n != "host"]
    result.wall_s = time.monotonic() - wall0
    return result


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _started(start: asyncio.Future[ForkServer]) -> ForkServer | None:
    """The fork server ``start`` brought up (to close it), or None if it never came up."""
    if not start.done():
        start.cancel()
    try:
        return await start
    except (asyncio.CancelledError, ForkServerError, OSError):
        return None


async def _server_error(server: ForkServer | None, exc: ForkServerError | None) -> str:
    """What the run's error says about a fork server that failed: how it died and its stderr."""
    if server is not None and server.dead.is_set():
        return await server.describe_death()
    return str(exc) if exc is not None else "the guest fork server failed"


async def _wait_ready(host: asyncio.subprocess.Process, stop: asyncio.Event) -> str | None:
    assert host.stdout is not None
    deadline = time.monotonic() + HOST_READY_TIMEOUT_S
    while time.monotonic() < deadline and not stop.is_set():
        line = await _readline(host, stop, deadline - time.monotonic())
        if line is None:
            return None
        msg = _parse(line)
        if "ready" in msg:
            return str(msg["ready"])
    return None


async def _readline(host: asyncio.subprocess.Process, stop: asyncio.Event, timeout_s: float) -> bytes | None:
    assert host.stdout is not None
    read = asyncio.ensure_future(host.stdout.readline())
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({read, stopped}, timeout=max(0.01, timeout_s), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if read not in done:
        read.cancel()
        return None
    line = read.result()
    return line or None


async def _follow_host(host: asyncio.subprocess.Process, on_progress: Callable[[dict[str, Any]], None],
                       stop: asyncio.Event) -> dict[str, Any]:
    finished: dict[str, Any] = {}
    while not stop.is_set():
        line = await _readline(host, stop, 3600.0)
        if line is None:
            break
        msg = _parse(line)
        if "finished" in msg:
            finished = msg
        on_progress(msg)
    return finished


def _parse(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
        return obj if isinstance(obj, dict) else {}
    except ValueError:
        return {}
