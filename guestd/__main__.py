"""``python -m balloonlab.guestd --address ADDR --guest-id N [--token-file FILE] [--log FILE]``

The guest's credential (its own, ``proto.handshake.guest_token``: it opens
only guest N's session) comes in ``BALLOONLAB_TOKEN``, or from
``--token-file`` (a file readable by its owner only, as the launcher writes
them for external guests under ``RUN_DIR/credentials/``), never on the
command line. Exit
status: 0 when the host ends the run, 3 when the host vanishes (or falls
silent), 4 when it refuses us, 2 for bad arguments, 1 for a bug (with a
traceback in the log).
"""
from __future__ import annotations

import argparse
import functools
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from balloonlab.guestd.agent import GuestAgent

# How long a forked guest that ends waits for its connection's close (its last writes) before it exits.
CLOSE_WAIT_S = 2.0


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


def yield_to_host() -> None:
    """Run this guest as ``SCHED_BATCH`` (``BALLOONLAB_GUEST_SCHED=normal`` keeps ``SCHED_OTHER``).

    The host serves every guest from one process and is the run's
    bottleneck. A reply or ``TickStart`` wakes a guest; as ``SCHED_OTHER``
    the woken guest may preempt the host on its own CPU in the middle of
    its loop, so the other guests' replies wait behind it. A batch task
    never preempts on wake-up; it runs when a CPU is free. Counts do not
    depend on scheduling, only wall time does (README, "Guests yield to the host").
    """
    want = os.environ.get(GUEST_SCHED_ENV, "batch")
    if want == "normal" or not hasattr(os, "SCHED_BATCH"):
        return
    if want != "batch":
        raise ValueError(f"{GUEST_SCHED_ENV}={want!r}: expected 'batch' or 'normal'")
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        pass   # a sandbox may forbid it; the guest only runs slower


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


def main(argv: list[str] | None = None, *, teardown: bool = True) -> int:
    """The guest's process; ``teardown`` False: the caller exits the moment this returns (a forked guest,
    whose server's child ends with ``os._exit``), so the event loop is not taken down first."""
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
              "external guest under RUN_DIR/credentials/)", file=sys.stderr)
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
    return run_profiled(lambda: uvloop.run(agent.run()) if teardown else _run_and_leave(agent),
                        f"guest-{args.guest_id}")


def _run_and_leave(agent: "GuestAgent") -> int:
    """``agent.run()`` on a new event loop, left as it is afterwards once the connection is closed.

    A loop's teardown (cancelling what is left, such as the heartbeat's
    timer, then closing it) is ~0.5 ms of CPU per guest at the run's end,
    when every guest ends at once; in a process about to exit it changes
    nothing. The connection's close is waited for (whatever it still had to
    write goes out, and the host sees the guest leave).
    """
    import asyncio

    import uvloop
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    code = loop.run_until_complete(agent.run())
    if agent.conn is not None:
        loop.run_until_complete(_closed(agent.conn))
    return code


async def _closed(conn: Any) -> None:
    import asyncio
    try:
        await asyncio.wait_for(conn.wait_closed(), CLOSE_WAIT_S)
    except asyncio.TimeoutError:
        pass


if __name__ == "__main__":
    # As the host and the launcher do: the log is flushed line by line and stdout/stderr here, and
    # tearing down the interpreter's heap (numpy, the guest's modules, its memory model) cost an exec'd
    # guest ~20 ms of CPU after its run, at the run's end, with every guest at once.
    from balloonlab.cli import exit_now
    exit_now(main())
