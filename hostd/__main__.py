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
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.logconf import configure_logging
from balloonlab.proto.transport import parse_address


def main(argv: list[str] | None = None) -> int:
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
        cfg = load_run_config(args.config)
        address = parse_address(args.address)
    except ConfigError as exc:
        print(f"hostd: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log, proc="host", level=args.log_level, run_id=cfg.run_id, variant=cfg.variant)
    import uvloop

    from balloonlab.hostd.server import Host
    try:
        host = Host(cfg, token, address, progress_out=sys.stdout)
    except ConfigError as exc:
        print(f"hostd: {exc}", file=sys.stderr)
        return 2
    from balloonlab.proto.profiling import run_profiled
    return run_profiled(lambda: uvloop.run(host.run()), f"host-{cfg.variant or 'run'}")


if __name__ == "__main__":
    sys.exit(main())
