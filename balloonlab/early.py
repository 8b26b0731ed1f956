"""The host and the fork server, started before the launcher loads the scenario.

Both take a few hundred milliseconds of CPU to import (numpy, the
protocol, the host's or the guest's modules); a launcher starts them first,
while it imports its own modules and loads the scenario, so that on a small
machine they import side by side instead of one after the other. So this
module imports only what starting a child needs: no event loop, no numpy.
The fork server is exec'd at once. The host is forked from the launcher
(``fork_early_host``) once the launcher has imported what the two share
(``HOST_PREIMPORTS``, ~0.14 s of a host's start that it no longer repeats),
or exec'd like the server (``start_early_host``; ``BALLOONLAB_HOST_FORK=0``,
and the next variants' hosts, started while a run's event loop runs). A
child started here is adopted by the run that follows (``ForkServer.adopt``,
the runner's ``EarlyHost``), or discarded if the scenario turns out bad.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Callable, NoReturn

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["EarlyChild", "EarlyHost", "EarlyForkServer", "ForkedChild", "start_early", "start_early_host",
           "fork_early_host", "host_fork_default", "child_main", "child_env", "die_with_parent", "default_guest_start",
           "forkserver_default", "GUEST_START_MODES", "ENV_SWITCH", "HOST_FORK_SWITCH", "HOST_PREIMPORTS"]

ENV_SWITCH = "BALLOONLAB_FORKSERVER"
HOST_FORK_SWITCH = "BALLOONLAB_HOST_FORK"   # 0: the launcher's first host is exec'd, not forked from it
# What the host and the launcher both import (``fork_early_host``): imported once, by the launcher,
# before it forks the host. The rest of the host (its memory, machine and server) the host imports itself.
HOST_PREIMPORTS = ("numpy", "numpy.random", "msgpack", "asyncio", "uvloop", "balloonlab.proto.errors",
                   "balloonlab.proto.messages", "balloonlab.proto.rpc", "balloonlab.proto.transport",
                   "balloonlab.proto.logconf", "balloonlab.hostd.__main__")
GUEST_START_MODES = ("fork", "exec")
_PR_SET_PDEATHSIG = 1


def host_fork_default() -> bool:
    """The launcher forks its first host from itself unless ``BALLOONLAB_HOST_FORK=0`` (or ``no``/``false``/``off``)."""
    return os.environ.get(HOST_FORK_SWITCH, "1").strip().lower() not in ("0", "no", "false", "off")


def forkserver_default() -> bool:
    """Guests start from the fork server unless ``BALLOONLAB_FORKSERVER=0`` (or ``no``/``false``/``off``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "no", "false", "off")


class EarlyChild:
    """A child started before its run was known (its imports overlap the launcher's), until a run adopts it.

    ``discard`` stops one no run adopted (the scenario was bad, say) and
    closes what the launcher holds of it; after adoption it does nothing.
    """

    def __init__(self, popen: subprocess.Popen[bytes], stderr: Any) -> None:
        self.popen = popen
        self.stderr = stderr          # an unlinked temporary file: what the child writes before adoption
        self.adopted = False

    def discard(self) -> None:
        if self.adopted:
            return
        self.adopted = True
        self._stop()
        for f in (self.popen.stdin, self.popen.stdout, self.stderr):
            if f is not None:
                f.close()

    def _stop(self) -> None:
        self.popen.kill()             # still importing, or waiting for its arguments: nothing to end cleanly
        self.popen.wait()

class EarlyForkServer(EarlyChild):
    """A fork server started by ``start_early``, not yet adopted by a run (``ForkServer.adopt``)."""

    def __init__(self, popen: subprocess.Popen[bytes], sock: socket.socket, stderr: Any) -> None:
        super().__init__(popen, stderr)
        self.sock = sock

    def _stop(self) -> None:
        self.sock.close()             # the server sees its client go and exits
        try:
            self.popen.wait(10.0)
        except subprocess.TimeoutExpired:
            super()._stop()

def start_early(env: dict[str, str], python: str = sys.executable, preexec_fn: Any = None,
                run_dir: Path | None = None) -> EarlyForkServer:
    """Start a fork server now, outside any event loop, before the run directory exists.

    ``run_dir``, when already known, is on its command line from the start (tools find a run's
    processes by it); otherwise it is added there on adoption.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stderr = tempfile.TemporaryFile()
    shown = [] if run_dir is None else ["--run-dir", str(run_dir)]
    try:
        popen = subprocess.Popen(
            [python, "-m", "balloonlab.forkserver", "--control-fd", str(theirs.fileno()), *shown], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            preexec_fn=preexec_fn, pass_fds=(theirs.fileno(),))
    except BaseException:
        ours.close()
        stderr.close()
        raise
    finally:
        theirs.close()
    return EarlyForkServer(popen, ours, stderr)


def default_guest_start() -> str:
    """``fork`` (guests from the fork server) unless ``BALLOONLAB_FORKSERVER=0``: then ``exec``."""
    return "fork" if forkserver_default() else "exec"


def child_env() -> dict[str, str]:
    """The environment every process of a run starts from (each adds its own credential)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("BALLOONLAB_TOKEN", None)
    return env


def die_with_parent() -> None:
    """``preexec_fn`` of every child: it is SIGKILLed when the launcher dies."""
    # Runs in the child between fork and exec.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class EarlyHost(EarlyChild):
    """A host started before the launcher loaded the scenario (``hostd --args-on-stdin``), for one variant to adopt."""


def start_early_host(env: dict[str, str], python: str = sys.executable, run_dir: Path | None = None) -> EarlyHost:
    """Start a host now, outside any event loop: it imports while the launcher loads the scenario.

    ``run_dir``, when already known, is shown on its command line (tools find a run's processes by it).
    """
    stderr = tempfile.TemporaryFile()
    shown = [] if run_dir is None else ["--run-dir", str(run_dir)]
    try:
        popen = subprocess.Popen([python, "-m", "balloonlab.hostd", "--args-on-stdin", *shown], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
                                 preexec_fn=die_with_parent)
    except BaseException:
        stderr.close()
        raise
    return EarlyHost(popen, stderr)


def child_main(run: Callable[[], int]) -> NoReturn:
    """In a child forked without an exec: ``run()``, the traceback of whatever escapes it, its streams
    flushed, and the process ends with its exit status. It never returns into the parent's code."""
    code = 1
    try:
        code = run()
    except BaseException:  # noqa: BLE001 -- never into the parent's code: its traceback, exit 1
        try:
            import traceback
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class ForkedChild:
    """A child forked from the launcher without an exec, with the parts of ``subprocess.Popen`` the launcher uses
    (``pid``, ``stdin``, ``stdout``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``)."""

    def __init__(self, pid: int, stdin: Any, stdout: Any) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:      # reaped elsewhere: its status is lost, not its end
                self.returncode = 255
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is not None:
            return self.returncode  # type: ignore[return-value]
        if timeout is not None:
            import select
            pidfd = os.pidfd_open(self.pid)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired([str(self.pid)], timeout)
            finally:
                os.close(pidfd)
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                self.returncode = 255
                break
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:      # never a reaped pid, which the kernel may have given to another process
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_early_host(env: dict[str, str], python: str = sys.executable,
                    run_dir: Path | None = None) -> EarlyHost | None:
    """``start_early_host``, forked from the launcher once it imported what it shares with the host (``HOST_PREIMPORTS``).

    numpy, asyncio, uvloop, msgpack and the protocol are ~0.14 s of a host's
    start; the launcher imports them anyway, so the host forked from it
    starts with them, on a machine where the two import side by side with
    the fork server. The child becomes what ``python -m balloonlab.hostd
    --args-on-stdin`` is: its own session, its pipes on 0 and 1, a
    temporary stderr, nothing else open, a fresh interpreter's signal
    dispositions, the same command line and environment in /proc. None
    when it cannot fork safely (another thread runs: a child would inherit
    the locks it holds) or at all: the caller starts one the usual way.
    """
    import importlib
    import threading
    for name in HOST_PREIMPORTS:
        importlib.import_module(name)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        return None
    stderr = tempfile.TemporaryFile()
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)

    def give_up() -> None:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        stderr.close()

    if min(in_r, in_w, out_r, out_w, stderr.fileno()) < 3:
        # a launcher started with 0, 1 or 2 closed: the child's dup2 onto them would clobber its own pipes
        give_up()
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()         # or the child writes the launcher's buffered output again
        except (OSError, ValueError, AttributeError):
            pass
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        give_up()
        return None
    if pid == 0:
        child_main(lambda: _become_early_host(parent, in_r, out_w, stderr.fileno(), env, python, run_dir))
    os.close(in_r)
    os.close(out_w)
    return EarlyHost(ForkedChild(pid, open(in_w, "wb"), open(out_r, "rb")), stderr)  # type: ignore[arg-type]


def _become_early_host(parent: int, in_r: int, out_w: int, err_fd: int, env: dict[str, str], python: str,
                       run_dir: Path | None) -> int:
    """In the forked child: set up as an exec'd early host would be, then run the host's entry point."""
    import io
    os.setsid()
    die_with_parent()
    if os.getppid() != parent:     # the launcher died between the fork and the prctl
        return 1
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)             # as Python starts
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.dup2(in_r, 0)
    os.dup2(out_w, 1)
    os.dup2(err_fd, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") < 1 << 16 else 1 << 16)
    # The launcher's stream objects may hold buffered bytes or stand for other files: new ones on 0, 1, 2,
    # unbuffered as PYTHONUNBUFFERED makes an exec'd host's.
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace")
    os.environ.clear()
    os.environ.update(env)
    shown = [] if run_dir is None else ["--run-dir", str(run_dir)]
    from balloonlab.hostd import __main__ as host_main
    from balloonlab.proctitle import set_process_image
    argv = [host_main.ARGS_ON_STDIN, *shown]
    set_process_image([python, "-m", "balloonlab.hostd", *argv], env)
    sys.argv = [host_main.__file__, *argv]     # as ``python -m`` sets it
    host_main.run_forked(argv)
    return 1   # (run_forked does not return)
