"""``balloonlab-dashboard RUN_DIR``: replay a run in the browser; and the launcher's ``--dashboard`` hook.

    balloonlab-dashboard RUN_DIR [--port N] [--host ADDRESS]

prints the page's URL (with its secret) and serves until Ctrl-C. A run
directory that is still being written is followed as it grows.
Exit status: 0 after Ctrl-C, 2 for a run directory without logs or a port in use.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, TypeVar

__all__ = ["main", "serve", "with_dashboard"]

T = TypeVar("T")


async def with_dashboard(work: Awaitable[T], run_dir: Path, *, enabled: bool, port: int = 0,
                         out: Any = None) -> T:
    """Run ``work`` (the launcher's run) with a live dashboard over ``run_dir`` when ``enabled``.

    The URL is printed before the run starts; when the run is over the
    dashboard reads the logs and summary.json one last time, tells its pages
    so, and stops.
    """
    if not enabled:
        return await work
    from .server import Dashboard

    out = out or sys.stderr
    dash = Dashboard(run_dir, port=port, live=True)
    try:
        url = await dash.start()
    except OSError as exc:
        if asyncio.iscoroutine(work):
            work.close()
        print(f"balloonlab: dashboard: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", file=out, flush=True)
        raise SystemExit(2) from exc
    print(f"balloonlab: dashboard at {url}", file=out, flush=True)
    try:
        return await work
    finally:
        await dash.close()
        print(f"balloonlab: dashboard closed; replay it with: balloonlab-dashboard {run_dir}", file=out, flush=True)


async def serve(run_dir: Path, *, host: str = "127.0.0.1", port: int = 0, secret: str | None = None,
                ready: asyncio.Future[str] | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve a replay of ``run_dir`` until ``stop`` is set (or SIGINT/SIGTERM)."""
    from .server import Dashboard

    dash = Dashboard(run_dir, host=host, port=port, secret=secret, live=False)
    url = await dash.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready is not None:
        ready.set_result(url)
    else:
        v = dash.model.current_variant()
        frames = sum(len(m.frames) for m in dash.model.variants.values())
        print(f"balloonlab-dashboard: {run_dir}: {len(dash.model.variants)} variant(s), {frames} frames"
              + ("" if v else " (no logs yet: waiting for them)"), file=sys.stderr)
        print(f"balloonlab-dashboard: replay at {url}  (Ctrl-C to stop)", flush=True)
    try:
        await stop.wait()
    finally:
        await dash.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="balloonlab-dashboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    ap.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be in 0..65535, got {args.port}")
    from balloonlab.analysis.logs import find_variants

    try:
        find_variants(args.run_dir)
    except FileNotFoundError as exc:
        print(f"balloonlab-dashboard: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"balloonlab-dashboard: warning: listening on {args.host}, not loopback: anyone who has the URL "
              f"can read the run", file=sys.stderr)
    try:
        asyncio.run(serve(args.run_dir, host=args.host, port=args.port))
    except OSError as exc:
        print(f"balloonlab-dashboard: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
