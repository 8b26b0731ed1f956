"""The host and the fork server, started before the launcher imports anything else.

Both take a few hundred milliseconds of CPU to import (numpy, the
protocol, the host's or the guest's modules); a launcher starts them first,
while it imports its own modules and loads the scenario, so that on a small
machine the three import side by side instead of one after the other. So
this module imports only what starting a child needs: no event loop, no
numpy. A child started here is adopted by the run that follows
(``ForkServer.adopt``, the runner's ``EarlyHost``), or discarded if the
scenario turns out bad.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["EarlyChild", "EarlyHost", "EarlyForkServer", "start_early", "start_early_host", "child_env",
           "die_with_parent", "default_guest_start", "forkserver_default", "GUEST_START_MODES", "ENV_SWITCH"]

ENV_SWITCH = "BALLOONLAB_FORKSERVER"
GUEST_START_MODES = ("fork", "exec")
_PR_SET_PDEATHSIG = 1


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
