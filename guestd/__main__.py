"""``python -m balloonlab.guestd --address ADDR --guest-id N [--log FILE]``

The per-run token comes in ``BALLOONLAB_TOKEN``. Exit status: 0 when the
host ends the run, 3 when the host vanishes, 4 when it refuses us, 2 for bad
arguments, 1 for a bug (with a traceback in the log).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m balloonlab.guestd", description="balloonlab guest")
    ap.add_argument("--address", required=True, help="the host's unix:PATH, PATH or tcp://HOST:PORT")
    ap.add_argument("--guest-id", required=True, type=int)
    ap.add_argument("--log", type=Path, default=None, help="JSON-lines log file (default: stderr)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    token = os.environ.get("BALLOONLAB_TOKEN", "")
    if not token:
        print("guestd: BALLOONLAB_TOKEN is not set; the launcher passes the per-run token there", file=sys.stderr)
        return 2
    from balloonlab.proto.errors import ConfigError
    from balloonlab.proto.logconf import configure_logging
    from balloonlab.proto.transport import parse_address
    try:
        address = parse_address(args.address)
    except ConfigError as exc:
        print(f"guestd: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log, proc="guest", level=args.log_level, guest=args.guest_id)
    import uvloop

    from balloonlab.guestd.agent import GuestAgent
    return uvloop.run(GuestAgent(args.guest_id, token, address).run())


if __name__ == "__main__":
    sys.exit(main())
