"""``python -m balloonlab.guestd --address ADDR --guest-id N [--token-file FILE] [--log FILE]``

The guest's credential (its own, ``proto.handshake.guest_token``: it opens
only guest N's session) comes in ``BALLOONLAB_TOKEN``, or from
``--token-file`` (a file readable by its owner only, as the launcher writes
them under ``RUN_DIR/credentials/``), never on the command line. Exit
status: 0 when the host ends the run, 3 when the host vanishes (or falls
silent), 4 when it refuses us, 2 for bad arguments, 1 for a bug (with a
traceback in the log).
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import stat
import sys
import time
from pathlib import Path


def read_token_file(path: Path) -> str:
    """The credential in ``path``; refuses a file others may read (it would not be a secret)."""
    try:
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ValueError(f"credential file {path} is readable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); make it 0600")
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"credential file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ValueError(f"credential file {path} is empty")
    return token


GUEST_SCHED_ENV = "BALLOONLAB_GUEST_SCHED"
# A guest's nice, and its fork server's session group's: the host is the run's
# serial bottleneck, so when both are runnable on a CPU the host should win.
GUEST_NICE = 10


def _yielding() -> bool:
    want = os.environ.get(GUEST_SCHED_ENV, "batch")
    if want not in ("batch", "normal"):
        raise ValueError(f"{GUEST_SCHED_ENV}={want!r}: expected 'batch' or 'normal'")
    return want == "batch"


def yield_to_host() -> None:
    """Run this guest as ``SCHED_BATCH`` at nice ``GUEST_NICE`` (``BALLOONLAB_GUEST_SCHED=normal``: neither).

    The host serves every guest from one process and is the run's
    bottleneck. A reply or ``TickStart`` wakes a guest; as ``SCHED_OTHER``
    the woken guest may preempt the host on its own CPU in the middle of
    its loop, so the other guests' replies wait behind it. A batch task
    never preempts on wake-up; it runs when a CPU is free. The nice makes
    the host win the CPU whenever both are runnable (when the kernel groups
    tasks by session, ``yield_group_to_host`` does that for the group).
    Counts do not depend on scheduling, only wall time does (README,
    "Guests yield to the host").
    """
    if not _yielding():
        return
    try:
        if hasattr(os, "SCHED_BATCH"):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        if os.getpriority(os.PRIO_PROCESS, 0) < GUEST_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, GUEST_NICE)
    except OSError:
        pass   # a sandbox may forbid it; the guest only runs slower


def yield_group_to_host() -> bool:
    """Lower this session's scheduling group to nice ``GUEST_NICE``; whether it was lowered.

    With ``CONFIG_SCHED_AUTOGROUP`` (on by default in most distributions'
    kernels) the CPU is shared fairly between sessions first and between a
    session's tasks second, so a task's own nice only ranks it within its
    session. The fork server calls this once for the session its guests
    share (each guest is its own process group in it, not its own
    session); the host, in a session of its own, then gets the CPU
    whenever it is runnable instead of one share among 65. Lowering a
    group's weight needs no privilege. A kernel without autogroups has no
    ``/proc/self/autogroup``: the guests' own nice does it there.
    """
    try:
        if not _yielding():
            return False
    except ValueError:
        return False   # each guest reports the bad switch itself
    for _ in range(8):
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(GUEST_NICE))
            return True
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                return False   # no autogroups here
        # The kernel takes one such change per 100 ms from unprivileged users:
        # another run's fork server started just now.
        time.sleep(0.02)
    return False


@functools.cache
def arg_parser() -> argparse.ArgumentParser:
    """The command line's parser; built once (the fork server builds it before it forks the guests)."""
    ap = argparse.ArgumentParser(prog="python -m balloonlab.guestd", description="balloonlab guest")
    ap.add_argument("--address", required=True, help="the host's unix:PATH, PATH or tcp://HOST:PORT")
    ap.add_argument("--guest-id", required=True, type=int)
    ap.add_argument("--token-file", type=Path, default=None,
                    help="this guest's credential (0600), instead of BALLOONLAB_TOKEN in the environment")
    ap.add_argument("--log", type=Path, default=None, help="JSON-lines log file (default: stderr)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap


def main(argv: list[str] | None = None) -> int:
    args = arg_parser().parse_args(argv)
    if args.token_file is not None:
        try:
            token = read_token_file(args.token_file)
        except ValueError as exc:
            print(f"guestd: {exc}", file=sys.stderr)
            return 2
    else:
        token = os.environ.get("BALLOONLAB_TOKEN", "")
    if not token:
        print("guestd: no credential: set BALLOONLAB_TOKEN or pass --token-file (the launcher writes one per "
              "guest under RUN_DIR/credentials/)", file=sys.stderr)
        return 2
    from balloonlab.proto.plainlog import import_structlog
    import_structlog()
    from balloonlab.proto.errors import ConfigError
    from balloonlab.proto.logconf import configure_logging
    from balloonlab.proto.transport import parse_address
    try:
        address = parse_address(args.address)
    except ConfigError as exc:
        print(f"guestd: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log, proc="guest", level=args.log_level, guest=args.guest_id)
    try:
        yield_to_host()
    except ValueError as exc:
        print(f"guestd: {exc}", file=sys.stderr)
        return 2
    import uvloop

    from balloonlab.guestd.agent import GuestAgent
    agent = GuestAgent(args.guest_id, token, address)
    from balloonlab.proto.profiling import run_profiled
    return run_profiled(lambda: uvloop.run(agent.run()), f"guest-{args.guest_id}")


if __name__ == "__main__":
    sys.exit(main())
