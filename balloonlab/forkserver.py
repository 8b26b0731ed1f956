"""The guest fork server: one process that imports a guest once and forks every guest from it.

    python -m balloonlab.forkserver --control-fd FD [--run-dir DIR]

A guest started as ``python -m balloonlab.guestd`` spends its first second
and most of its private memory importing numpy, msgpack, uvloop, structlog
and the guest's own modules (its compiled paging core too). This process
does that once, freezes what it imported (``gc.freeze()``: the collector no
longer writes to those objects, so the pages stay shared after a fork), and
then forks one child per request, which runs the guest's normal entry point
(``balloonlab.guestd.__main__.main``) with its own argv, environment (its
own credential), working directory, stdout/stderr files, process group, and
command line and environment as /proc shows them (``balloonlab.proctitle``). Guests share the imported pages
copy-on-write; each keeps privately only what it writes. Guests stay in the
server's session unless asked otherwise (``own_session``), so that a kernel
that shares the CPU by session first (``CONFIG_SCHED_AUTOGROUP``) schedules
them as one group beside the host's, not as 64 groups each equal to it.

The control channel is a ``SOCK_SEQPACKET`` socket (FD, inherited), one
JSON object per packet:

- the server says ``{"op": "ready", "pid": ..., "preload_s": ...}`` once;
- the client asks ``{"op": "spawn", "id": N, "name": ..., "args": [...],
  "env": {...}, "cwd": ..., "stderr": PATH, "stdout": PATH|null, "own_session": BOOL}``
  (``own_session`` true: the child starts a session of its own; false or
  absent: it stays in the server's session, as its own process group); the server
  answers ``{"op": "spawned", "id": N, "pid": PID}`` with a pidfd of the child
  attached (so that the client can signal it without racing pid reuse), or
  ``{"op": "spawn_failed", "id": N, "error": ...}``;
- the server reaps its children and says ``{"op": "exited", "pid": PID,
  "returncode": RC}`` (RC as ``subprocess`` has it: -N for signal N);
- a server started before its run directory existed (without ``--run-dir``;
  it imports while the launcher loads the scenario) is told it with
  ``{"op": "adopt", "run_dir": DIR}`` and that run's stderr file attached:
  it copies what it wrote to stderr so far into that file, writes there from
  then on, and shows ``--run-dir DIR`` on its command line. No answer.

When the client closes its end, the server SIGKILLs the children it still
has, reaps them and exits 0. Each child dies with the server
(PR_SET_PDEATHSIG), and the server with whoever started it, so a crash at
any level leaves nothing behind.
"""
from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from balloonlab.early import child_main

__all__ = ["main", "PRELOAD", "MAX_PACKET"]

MAX_PACKET = 1 << 20          # one spawn request: argv + environment, far below this
REHEARSAL_SWITCH = "BALLOONLAB_REHEARSAL"   # 0: no rehearsal of a guest before the first fork
# numpy.ma and numpy.random: numpy imports them lazily (np.unique pulls in numpy.ma, which builds its
# functions' signatures as it loads): in every guest at its end-of-run audit, 0.1-0.5 s of CPU each,
# with all guests at once, unless they are here.
PRELOAD = ("numpy", "numpy.ma", "numpy.random", "msgpack", "uvloop", "structlog", "asyncio",
           "balloonlab.guestd.__main__",
           "balloonlab.guestd.agent", "balloonlab.guestd._paging", "balloonlab.proto.logconf",
           "balloonlab.proto.transport", "balloonlab.proto.rpc", "balloonlab.proto.messages")
_PR_SET_PDEATHSIG = 1


def _preload() -> None:
    import importlib
    import pkgutil
    from balloonlab.proto.plainlog import import_structlog
    import_structlog()
    for name in PRELOAD:
        importlib.import_module(name)
    # Every module of the guest, not only those the entry point imports at the top: the ones it
    # imports later (a replacement policy, a workload kind) would otherwise be private per guest.
    import balloonlab.guestd as guestd
    for mod in pkgutil.walk_packages(guestd.__path__, "balloonlab.guestd."):
        importlib.import_module(mod.name)
    from balloonlab.guestd.session import warm_up
    warm_up()   # the config classes' msgspec type information, built once here instead of in every guest
    from balloonlab.proctitle import prime, shared_libc
    shared_libc()   # each child's prctl calls (its parent-death signal, its command line)
    prime()         # and the address space's layout each child's command line needs
    from balloonlab.guestd.__main__ import arg_parser
    # Its objects, built here, stay shared: parse_args only reads them. One parse of a command line of
    # the launcher's shape does here what each child's first parse did (0.8 -> 0.5 ms of its start).
    arg_parser().parse_args(["--address", "unix:/nonexistent/host.sock", "--guest-id", "0",
                             "--log", "/nonexistent/guest-0.jsonl", "--log-level", "info"])


def _rehearse() -> bool:
    """A guest's first ticks, played once here (``guestd/rehearsal.py``): every guest then starts on code
    and caches already warm. One that fails is reported, not fatal: the guests only start colder.
    ``BALLOONLAB_REHEARSAL=0`` skips it (to measure what it saves)."""
    if os.environ.get(REHEARSAL_SWITCH, "1").strip().lower() in ("0", "no", "false", "off"):
        return False
    from balloonlab.guestd.rehearsal import rehearse
    try:
        lost = rehearse()
    except Exception:  # noqa: BLE001 -- the guests' own runs will show a bug; the server still serves them
        print("forkserver: the rehearsal of a guest failed; guests start without it:", file=sys.stderr)
        traceback.print_exc()
        return False
    if lost:
        print(f"forkserver: the rehearsal's guest lost {lost} pages", file=sys.stderr)
        return False
    return True


def _die_with_parent() -> None:
    from balloonlab.proctitle import shared_libc
    shared_libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _environ_diff(want: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(variables to remove, variables to set) that make the server's ``os.environ`` exactly ``want``.

    Found here, before the fork: a child shares the server's environment
    pages until it writes to them, and clearing and refilling every
    variable (or even reading each one) there copied ~180 pages per guest.
    """
    env = os.environ
    return [k for k in env if k not in want], {k: v for k, v in want.items() if env.get(k) != v}


def _set_environ(diff: tuple[list[str], dict[str, str]]) -> None:
    gone, changed = diff
    for key in gone:
        del os.environ[key]
    for key, value in changed.items():
        os.environ[key] = value


def _run_child(req: dict[str, Any], server_pid: int, env: tuple[dict[str, str], tuple[list[str], dict[str, str]]]
               ) -> int:
    """In the forked child: become the guest ``req`` describes and run it; returns its exit status.
    ``env``: its environment and what differs from the server's (``_environ_diff``)."""
    if req.get("own_session"):
        os.setsid()
    else:
        # Its own process group (signals and kills address it alone) but the
        # server's session: the guests share one autogroup, so the host gets half the CPU, not 1/65.
        os.setpgid(0, 0)
    _die_with_parent()
    if os.getppid() != server_pid:   # the server died between fork and prctl
        return 1
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a fresh interpreter
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if req.get("stdout") else null
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if req.get("stderr") else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") < 1 << 16 else 1 << 16)
    os.chdir(req.get("cwd") or "/")
    want, diff = env
    _set_environ(diff)
    from balloonlab.proctitle import set_process_image
    args = [str(a) for a in req["args"]]
    set_process_image([req.get("python") or sys.executable, "-m", "balloonlab.guestd", *args], want)
    from balloonlab.guestd import __main__ as guest_main
    sys.argv = [guest_main.__file__, *args]
    try:
        return _exit_code(guest_main.main(args, teardown=False))   # (it exits right after: _run_child's caller)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except KeyboardInterrupt:
        # A fresh interpreter dies of the SIGINT it did not handle; so does this one.
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:  # noqa: BLE001 -- the guest's bug: its traceback, exit 1, as a fresh process
        traceback.print_exc()
        return 1


def _adopt(run_dir: str, stderr_fd: int) -> None:
    """Move to the run's stderr file (with what was written before) and show the run on the command line."""
    sys.stderr.flush()
    try:
        offset = 0
        while chunk := os.pread(2, 1 << 16, offset):   # the launcher's unlinked temporary file
            os.write(stderr_fd, chunk)
            offset += len(chunk)
    except OSError:
        pass   # not a regular file (a terminal, a pipe): nothing of ours to carry over
    os.dup2(stderr_fd, 2)
    if "--run-dir" not in sys.argv:
        from balloonlab.proctitle import set_process_image
        set_process_image([sys.executable, "-m", "balloonlab.forkserver", *sys.argv[1:], "--run-dir", run_dir],
                          dict(os.environ))


class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: set[int] = set()
        self.pid = os.getpid()

    def spawn(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        for key in ("args", "env"):
            if key not in req:
                _send(self.sock, {"op": "spawn_failed", "id": rid, "error": f"spawn request without {key!r}"})
                return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            want = {str(k): str(v) for k, v in req["env"].items()}
        except (AttributeError, TypeError):
            _send(self.sock, {"op": "spawn_failed", "id": rid, "error": "spawn request's 'env' is not a map"})
            return
        env = (want, _environ_diff(want))
        try:
            pid = os.fork()
        except OSError as exc:
            _send(self.sock, {"op": "spawn_failed", "id": rid, "error": f"fork: {exc.strerror or exc}"})
            return
        if pid == 0:
            child_main(lambda: _run_child(req, self.pid, env))   # never returns into the server's loop
        self.children.add(pid)
        pidfd = os.pidfd_open(pid)
        try:
            _send(self.sock, {"op": "spawned", "id": rid, "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            try:
                _send(self.sock, {"op": "exited", "pid": pid, "returncode": os.waitstatus_to_exitcode(status)})
            except OSError:
                pass   # the client is gone; shutdown() kills and reaps the rest

    def shutdown(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10.0
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
                self.children.discard(pid)
            except ChildProcessError:
                break
            except InterruptedError:
                continue

    def serve(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)   # the wakeup fd does the work
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "control")
        sel.register(rfd, selectors.EVENT_READ, "sigchld")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "sigchld":
                        try:
                            while os.read(rfd, 4096):
                                pass
                        except BlockingIOError:
                            pass
                        self.reap()
                        continue
                    try:
                        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_PACKET, 1)
                    except InterruptedError:
                        continue
                    except ConnectionResetError:
                        data, fds = b"", []
                    try:
                        if not data:
                            return 0
                        try:
                            req = json.loads(data)
                        except ValueError:
                            print(f"forkserver: a control packet that is not JSON: {data[:80]!r}", file=sys.stderr)
                            continue
                        if req.get("op") == "spawn":
                            self.spawn(req)
                        elif req.get("op") == "adopt" and fds:
                            _adopt(str(req.get("run_dir", "")), fds[0])
                        else:
                            _send(self.sock, {"op": "error", "error": f"unknown op {req.get('op')!r}"})
                    finally:
                        for fd in fds:
                            os.close(fd)
                self.reap()   # a SIGCHLD that arrived between select and the handler
        finally:
            self.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m balloonlab.forkserver", description=__doc__.splitlines()[0])
    ap.add_argument("--control-fd", type=int, required=True, help="the inherited SOCK_SEQPACKET control socket")
    ap.add_argument("--run-dir", type=Path, default=None, help="the run this server serves (shown on its command line)")
    args = ap.parse_args(argv)
    try:
        sock = socket.socket(fileno=args.control_fd)
    except OSError as exc:
        print(f"forkserver: --control-fd {args.control_fd}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if sock.type != socket.SOCK_SEQPACKET:
        print(f"forkserver: --control-fd {args.control_fd} is not a SOCK_SEQPACKET socket", file=sys.stderr)
        return 2
    sock.set_inheritable(False)
    t0 = time.monotonic()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # no BLAS thread pool: fork only a single thread
    # What the imports and the rehearsal allocate stays (it is what the guests share): the collector's
    # passes over it would find nothing, and everything is frozen below anyway.
    gc.disable()
    _preload()
    rehearsed = _rehearse()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        # A child forked from a threaded process may inherit a lock another thread held: refuse.
        print(f"forkserver: {threads} threads after the imports (a BLAS pool? set OPENBLAS_NUM_THREADS=1); "
              "forking would be unsafe", file=sys.stderr)
        return 1
    gc.collect()   # the rehearsal's cycles
    gc.freeze()
    gc.enable()    # the guests collect as any process does
    try:
        _send(sock, {"op": "ready", "pid": os.getpid(), "preload_s": round(time.monotonic() - t0, 3),
                     "rehearsed": rehearsed})
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return 0
        raise
    return _Server(sock).serve()


if __name__ == "__main__":
    from balloonlab.cli import exit_now
    exit_now(main())
