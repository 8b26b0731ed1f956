"""``python -m balloonlab.hostd --config RUN.json --address ADDR [--log FILE]``

The run secret comes in the environment (``BALLOONLAB_TOKEN``), never on
the command line; each guest proves its id with its own credential derived
from it (``proto.handshake.guest_token``). The host listens on ``ADDR``
only. Its first stdout line is ``{"ready": "ADDRESS"}`` (the address it
really listens on, with the real port), then JSON progress lines, last
``{"finished": REASON, ...}``; the structured log goes to ``--log``.
proto/README.md, "Running a host and joining it from outside", is the
contract. Exit status: 0 when the run ends (or a stop signal ends it), 5 on
a deadlock, 2 for a bad config, address or environment, 1 otherwise.

``python -m balloonlab.hostd --args-on-stdin [--run-dir DIR]`` is how the
launcher starts a host before it has loaded the scenario: the host imports
what a run needs, then reads its real command line and environment (and
where its stderr goes) as one JSON line on stdin and carries on exactly as
if it had been started with them (/proc shows them too). ``--run-dir`` is
only shown, for tools that find a run's processes by it. EOF instead of
that line: exit 0.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import IO

from balloonlab.proto.plainlog import import_structlog

# The host's imports and its build allocate a few hundred thousand objects, none of them garbage: the
# collector's passes over them were ~8 % of that CPU, spent while the launcher and the fork server import
# on the same two cores. Collection resumes once the host is built (``main``), with all of that frozen:
# the collector's first passes would otherwise walk it (37 ms of the host's time at 64 guests, two thirds
# of it in two stops in the first ticks, every guest waiting).
_GC_PAUSED = __name__ == "__main__" and gc.isenabled()
if _GC_PAUSED:
    gc.disable()
import_structlog()   # before anything below imports it

from balloonlab.proto.errors import ConfigError  # noqa: E402
from balloonlab.proto.logconf import configure_logging  # noqa: E402
from balloonlab.proto.transport import parse_address  # noqa: E402

ARGS_ON_STDIN = "--args-on-stdin"
# What main() imports once it has its arguments (its run and the event loop). numpy.ma: numpy
# imports it lazily at the first np.unique, which the host reaches during its run (~7 ms on the
# host's path, every guest waiting); here it loads while the launcher loads the scenario.
PRESTART_IMPORTS = ("uvloop", "numpy.ma", "balloonlab.hostd.config", "balloonlab.hostd.server",
                    "balloonlab.proto.profiling")


HOST_SCHED_ENV = "BALLOONLAB_HOST_SCHED"
HOST_SCHED_VALUES = ("auto", "batch", "normal")
HOST_GROUP_NICE_ENV = "BALLOONLAB_HOST_GROUP_NICE"
HOST_GROUP_NICE_DEFAULT = 4


def host_sched_wanted() -> str:
    """``BALLOONLAB_HOST_SCHED``: ``auto`` (the default), ``batch`` or ``normal``; ConfigError for anything else."""
    want = os.environ.get(HOST_SCHED_ENV, "auto").strip().lower() or "auto"
    if want not in HOST_SCHED_VALUES:
        raise ConfigError(f"{HOST_SCHED_ENV}={os.environ[HOST_SCHED_ENV]!r}: expected one of "
                          f"{', '.join(HOST_SCHED_VALUES)}")
    return want


def host_sched(want: str, request_order: str) -> str:
    """Run the host as ``SCHED_BATCH`` in deterministic order (``auto``), or as ``want`` says; returns the policy.

    The guests already run as batch tasks (``guestd.__main__.yield_to_host``),
    so a woken guest never preempts the host. The host woken by a guest's
    ``TickDone`` or request preempted the guest running on that CPU in the
    middle of its tick, though: some fifty times per tick with 64 guests,
    each time both processes' working sets evicted from that CPU's caches. As
    a batch task too, the host runs when that guest blocks (within its few
    hundred microseconds) or at once on an idle CPU. In arrival order (the
    lock scenarios), where wall-clock timing is the experiment, ``auto``
    keeps ``SCHED_OTHER``, as those scenarios were measured. Counts do not
    depend on it, only wall time.
    """
    batch = want == "batch" or (want == "auto" and request_order == "deterministic")
    if not batch or not hasattr(os, "SCHED_BATCH"):
        return "normal"
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        return "normal"   # a sandbox may forbid it; the host only runs slower
    return "batch"


def host_group_nice_wanted() -> int:
    """``BALLOONLAB_HOST_GROUP_NICE``: the nice of the host's autogroup in batch mode, 0-19 (default
    ``HOST_GROUP_NICE_DEFAULT``; 0 leaves it as it is); ConfigError for anything else."""
    raw = os.environ.get(HOST_GROUP_NICE_ENV, "").strip()
    if not raw:
        return HOST_GROUP_NICE_DEFAULT
    try:
        nice = int(raw)
    except ValueError:
        nice = -1
    if not 0 <= nice <= 19:
        raise ConfigError(f"{HOST_GROUP_NICE_ENV}={os.environ[HOST_GROUP_NICE_ENV]!r}: expected a whole number "
                          "from 0 to 19 (0: the host's scheduling group keeps its weight)")
    return nice


def host_group_nice(nice: int) -> int | None:
    """Give the host's own autogroup ``nice`` (``/proc/self/autogroup``); returns it, or None where not done.

    Linux weighs each session's autogroup as one: with 64 guests in the fork
    server's session and the host in its own, the host took half a CPU
    whenever it was runnable, in some thirty short runs per tick, each taken
    from a guest's tick. Its work in the guests' phase (their ``TickDone``s,
    the answers to their requests) can wait a little; a guest's tick that
    waits holds up the barrier. At nice 4 (weight 423 against the guests'
    1024) the host runs in half as many, longer stretches, and at the
    boundary, where it runs alone, nothing changes. Only a host that leads
    its own session (as the launcher starts it) does this: another's
    autogroup is shared with its session's other processes, a shell's say.
    Nothing where there are no autogroups.
    """
    if nice <= 0 or os.getsid(0) != os.getpid():
        return None
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        return None
    return nice


def _args_from_stdin() -> list[str] | None:
    """Import what a run needs, then take on the command line and environment the launcher sends."""
    import importlib
    for name in PRESTART_IMPORTS:   # now, while the launcher loads the scenario
        importlib.import_module(name)
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    req = json.loads(line)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)    # as exec'd: nothing more to read
    os.close(null)
    if req.get("stderr"):
        _move_stderr(req["stderr"])
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in req["env"].items()})
    argv = [str(a) for a in req["argv"]]
    from balloonlab.proctitle import set_process_image
    set_process_image([sys.executable, "-m", "balloonlab.hostd", *argv], dict(os.environ))
    return argv


def _move_stderr(path: str) -> None:
    """Write stderr to ``path`` from now on, beginning with what was written before (the launcher's temporary file)."""
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        offset = 0
        while chunk := os.pread(2, 1 << 16, offset):
            os.write(fd, chunk)
            offset += len(chunk)
    except OSError:
        pass   # not a regular file: nothing of ours to carry over
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == ARGS_ON_STDIN:
        got = _args_from_stdin()
        if got is None:
            return 0
        argv = got
    ap = argparse.ArgumentParser(prog="python -m balloonlab.hostd", description="balloonlab host hypervisor")
    ap.add_argument("--config", required=True, type=Path, help="resolved run config (JSON) written by the launcher")
    ap.add_argument("--address", required=True, help="unix:PATH, PATH or tcp://HOST:PORT to listen on")
    ap.add_argument("--log", type=Path, default=None, help="JSON-lines log file (default: stderr)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    token = os.environ.get("BALLOONLAB_TOKEN", "")
    if not token:
        print("hostd: BALLOONLAB_TOKEN is not set; it holds the run secret (the launcher passes it there)",
              file=sys.stderr)
        return 2
    from balloonlab.hostd.config import load_run_config  # after argparse so --help is fast
    try:
        sched = host_sched_wanted()
        group_nice = host_group_nice_wanted()
        cfg = load_run_config(args.config)
        address = parse_address(args.address)
    except ConfigError as exc:
        print(f"hostd: {exc}", file=sys.stderr)
        return 2
    _open_files.append(configure_logging(args.log, proc="host", level=args.log_level, run_id=cfg.run_id,
                                         variant=cfg.variant))
    import uvloop

    from balloonlab.hostd.server import Host
    try:
        host = Host(cfg, token, address, progress_out=sys.stdout)
    except ConfigError as exc:
        print(f"hostd: {exc}", file=sys.stderr)
        return 2
    if _GC_PAUSED:
        gc.freeze()
        gc.enable()
    host.start_mode = _start
    host.sched_policy = host_sched(sched, host.core.discipline.request_order)
    if host.sched_policy == "batch":
        host.group_nice = host_group_nice(group_nice)
    from balloonlab.proto.profiling import run_profiled
    return run_profiled(lambda: uvloop.run(host.run()), f"host-{cfg.variant or 'run'}")


def _exit_now(code: int) -> None:
    """Flush what the host wrote and end the process without finalizing the interpreter.

    Tearing down a host's heap after a run (its memory model, sessions,
    modules) took ~0.1 s that the launcher waits for before it can read the
    logs; nothing in it is needed: the log, stdout and stderr are flushed here.
    """
    for f in (*_open_files, sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_open_files: list[IO[str]] = []   # the log file main() opened
_start = "exec"                   # how this process became the host: "fork" when forked from the launcher


def run_forked(argv: list[str]) -> None:
    """``main`` in a host forked from the launcher (``balloonlab.early.fork_early_host``), then exit.

    As when started with ``python -m``: the collector paused while it imports and builds, the exit without
    finalizing the interpreter (whose heap is the launcher's too, and nobody's to tear down)."""
    global _GC_PAUSED, _start
    _start = "fork"
    _GC_PAUSED = True       # an exec'd host's collector runs once it is built, whatever the launcher's did
    gc.disable()
    code = 1
    try:
        code = main(argv)
    except SystemExit as exc:    # as the interpreter reads it: None is 0, anything else not an int is 1
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 -- as an exec'd interpreter: the traceback, exit 1
        import traceback
        traceback.print_exc()
    finally:
        _exit_now(code)


if __name__ == "__main__":
    _exit_now(main())
