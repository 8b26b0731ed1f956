"""Launch host + N guests from a scenario, variant by variant, and summarise.

    balloonlab-launch [--scenario NAME|FILE] [--guests N] [--seed S]
                      [--duration SECONDS | --ticks N] [--variant NAME]
                      [--set KEY=VALUE ...] [--run-dir DIR] [--transport unix|tcp]
                      [--dashboard [--dashboard-port PORT]] [--format png|svg|pdf[,...]]

Exit status: 0 when every variant ran to its end, 1 when a variant failed
(host error, a guest that crashed with an error, an unexpected deadlock),
2 for a bad scenario or arguments, 130 on Ctrl-C.

The command line is a thin layer over the Python API (``balloonlab.run``);
``prepare`` and ``launch`` below are the one code path both take.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Coroutine, TypeVar

from balloonlab.proto.errors import ConfigError
from balloonlab.proto.handshake import new_token
from balloonlab.progress import Progress
from balloonlab.runner import VariantResult, run_variant
from balloonlab.scenario import Overrides, Scenario, find_scenario, load_scenario
from balloonlab.validators import VALIDATORS, guest_sizes, guest_swap_area

__all__ = ["main", "prepare", "launch", "LaunchOutcome", "DEFAULT_SCENARIO"]

DEFAULT_SCENARIO = "basic"
T = TypeVar("T")


@dataclass
class LaunchOutcome:
    """How a launch ended: the run directory, the exit status the command line returns, what ran."""

    run_dir: Path
    exit_status: int
    results: list[VariantResult] = field(default_factory=list)
    summary: dict[str, Any] | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="balloonlab-launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default=DEFAULT_SCENARIO, help=f"scenario name or .toml path (default {DEFAULT_SCENARIO})")
    ap.add_argument("--guests", type=int, help="number of guests (overrides the scenario)")
    ap.add_argument("--seed", type=int, help="random seed (overrides the scenario)")
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, metavar="SECONDS", help="virtual seconds to run")
    length.add_argument("--ticks", type=int, help="ticks to run")
    ap.add_argument("--variant", help="run only this variant")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="override a scenario key, e.g. host.overcommit=1.5 or balloon.params.pff_high=3000 "
                         "(repeatable; every variant)")
    ap.add_argument("--run-dir", type=Path, help="where logs and the summary go (default runs/SCENARIO-TIME)")
    ap.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--no-report", action="store_true", help="skip the report and plots at the end")
    ap.add_argument("--format", default="png", metavar="png|svg|pdf[,...]",
                    help="the report's figure format(s), comma-separated (default png)")
    ap.add_argument("--dashboard", action="store_true",
                    help="serve a live dashboard on 127.0.0.1 and print its URL (balloonlab-dashboard replays it)")
    ap.add_argument("--dashboard-port", type=int, default=0, metavar="PORT", help="the dashboard's port (default: a free one)")
    args = ap.parse_args(argv)
    if args.guests is not None and args.guests < 1:
        ap.error(f"--guests must be >= 1, got {args.guests}")
    if args.ticks is not None and args.ticks < 1:
        ap.error(f"--ticks must be >= 1, got {args.ticks}")
    if args.duration is not None and not args.duration > 0:
        ap.error(f"--duration must be > 0, got {args.duration}")
    from balloonlab.analysis.plots import parse_formats
    try:
        args.formats = parse_formats(args.format)
    except ValueError as exc:
        ap.error(f"--format: {exc}")
    if not 0 <= args.dashboard_port <= 65535:
        ap.error(f"--dashboard-port must be in 0..65535, got {args.dashboard_port}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from balloonlab.api import run
    from balloonlab.overrides import parse_setting
    try:
        run_ = run(args.scenario, guests=args.guests, seed=args.seed, duration_s=args.duration, ticks=args.ticks,
                   variant=args.variant, overrides=[parse_setting(s) for s in args.settings],
                   run_dir=args.run_dir, transport=args.transport, log_level=args.log_level,
                   report=not args.no_report, formats=args.formats, dashboard=args.dashboard,
                   dashboard_port=args.dashboard_port)
    except ConfigError as exc:
        print(f"balloonlab-launch: {exc}", file=sys.stderr)
        return 2
    return run_.exit_status


def prepare(scenario: str | os.PathLike[str], overrides: Overrides = Overrides()) -> tuple[Path, Scenario]:
    """Find, load and check a scenario before any process starts; a bad one raises ``ConfigError``."""
    path = find_scenario(str(scenario))
    loaded = load_scenario(path, overrides, VALIDATORS)
    _check_locks(loaded)
    return path, loaded


def launch(path: Path, scenario: Scenario, *, run_dir: Path | None = None, transport: str = "unix",
           log_level: str = "info", report: bool = True, settings: tuple[tuple[str, Any], ...] = (),
           verbose: bool = True, formats: tuple[str, ...] = ("png",), dashboard: bool = False,
           dashboard_port: int = 0) -> LaunchOutcome:
    """Run every variant of a prepared scenario to its end; write the summary (and the report)."""
    if transport not in ("unix", "tcp"):
        raise ConfigError(f"transport must be 'unix' or 'tcp', got {transport!r}")
    run_dir = Path(run_dir) if run_dir is not None else \
        Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    shutil.copy(path, run_dir / "scenario.toml")
    if settings:   # scenario.toml alone would not say how this run differed from it
        (run_dir / "overrides.json").write_text(json.dumps(dict(settings), indent=1) + "\n")
    from balloonlab.dashboard.cli import with_dashboard
    work = _launch(scenario, run_dir, transport=transport, log_level=log_level, report=report, verbose=verbose,
                   formats=formats)
    return _run_loop(with_dashboard(work, run_dir, enabled=dashboard, port=dashboard_port))


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop; from inside a running event loop (a notebook) on a thread of its own."""
    import uvloop
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return uvloop.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = uvloop.run(coro)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
            box["error"] = exc
    thread = threading.Thread(target=target, name="balloonlab-launch")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class _Quiet:
    """Where the messages go when the caller asked for none."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


async def _launch(scenario: Scenario, run_dir: Path, *, transport: str, log_level: str, report: bool,
                  verbose: bool, formats: tuple[str, ...] = ("png",)) -> LaunchOutcome:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):   # not the main thread: the caller's own handlers stay
            break
    err: Any = sys.stderr if verbose else _Quiet()
    progress = Progress(out=err)
    results: list[VariantResult] = []
    names = list(scenario.variants)
    print(f"balloonlab: scenario {scenario.name} ({', '.join(names)}), run directory {run_dir}", file=err)
    sock_dir = None
    try:
        for name in names:
            vdir = run_dir if len(names) == 1 else run_dir / name
            token = new_token()
            run_id = f"{scenario.name}-{name}-{os.getpid()}-{int(time.time())}"
            if transport == "tcp":
                address = "tcp://127.0.0.1:0"
            else:
                sock = (vdir / "host.sock").resolve()
                if len(os.fsencode(str(sock))) > 100:  # AF_UNIX paths are limited to ~107 bytes
                    sock_dir = sock_dir or Path(tempfile.mkdtemp(prefix="balloonlab-", dir="/tmp"))
                    sock = sock_dir / f"{name}.sock"
                address = f"unix:{sock}"
            progress.start(name)
            run_config = scenario.run_config(name, run_id)
            for g in run_config["guests"]:
                g["ram_pages"], g["disk_blocks"] = guest_sizes(g)
                # Where the guest keeps its swap on that disk: the host's monitors watch it and may pin it.
                g["swap_base_block"], g["swap_blocks"] = guest_swap_area(g)
            result = await run_variant(run_config, vdir, address, token, progress.update, stop,
                                       log_level=log_level)
            progress.done()
            results.append(result)
            _report_variant(result, err)
            _report_deadlock(result, _expects_deadlock(scenario, name), err)
            if result.interrupted:
                break
    finally:
        if sock_dir is not None:
            shutil.rmtree(sock_dir, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (RuntimeError, ValueError):
                break
    interrupted = any(r.interrupted for r in results)
    from balloonlab.analysis.summary import format_table, summarize, write_summary
    try:
        summary = summarize(run_dir)
        write_summary(run_dir, summary)
        if verbose:
            print(format_table(summary))
    except Exception as exc:  # a broken analysis must not hide how the run went
        print(f"balloonlab-launch: could not summarise {run_dir}: {type(exc).__name__}: {exc}", file=err)
        summary = None
    where = _write_report(run_dir, summary, not report, interrupted, formats)
    print(f"run directory: {run_dir}", file=err)
    print(where, file=err)
    if interrupted:
        print("balloonlab-launch: interrupted; every process was stopped", file=err)
        return LaunchOutcome(run_dir, 130, results, summary)
    # A deadlock the scenario expects (expect_deadlock) is the result, not a failure.
    ok = all(r.ok or (r.deadlocked and _expects_deadlock(scenario, r.variant)) for r in results)
    return LaunchOutcome(run_dir, 0 if ok else 1, results, summary)


def _write_report(run_dir: Path, summary: dict | None, no_report: bool, interrupted: bool,
                  formats: tuple[str, ...] = ("png",)) -> str:
    """Write report.md and the plots; return the lines that say where they are (or why not)."""
    later = f"write it with: balloonlab-analyze {run_dir}"
    if summary is None or no_report or interrupted:
        why = "--no-report" if no_report else "interrupted" if interrupted else "no summary"
        return f"report: not written ({why}); {later}"
    try:
        from balloonlab.analysis.report import write_report
        report = write_report(run_dir, summary, formats=formats)
    except Exception as exc:  # the run itself went fine: a broken report must not fail it
        return f"report: not written ({type(exc).__name__}: {exc}); {later}"
    plots = sorted(run_dir.glob(f"*.{formats[0]}"))
    return f"report: {report}\nplots: {len(plots)} {formats[0].upper()} file(s) in {run_dir}" if plots else \
        f"report: {report}\nplots: none drawn (see the report)"


def _check_locks(scenario: Scenario) -> None:
    """Every variant's [locks] table, checked before any process starts (and against [host].request_order)."""
    from balloonlab.hostd.memconfig import host_memory_config
    from balloonlab.proto.locks import lock_config_from_mapping
    for name, merged in scenario.variants.items():
        where = f"{scenario.path.name} variant {name!r}"
        locks = lock_config_from_mapping(merged.get("locks"), where=f"{where}: [locks]")
        host_memory_config(merged.get("host", {})).resolved_request_order(locks.enabled, where=f"{where}: ")


def _expects_deadlock(scenario: Scenario, variant: str) -> bool:
    """``expect_deadlock`` of the variant's [scenario] table (a variant may set it), else the file's."""
    merged = scenario.variants.get(variant, {}).get("scenario", {})
    return bool(merged.get("expect_deadlock", scenario.expect_deadlock))


def _report_deadlock(r: VariantResult, expected: bool, err: Any = sys.stderr) -> None:
    """A variant the host ended on a deadlock: say so, with the cycle from the host's log."""
    if not r.deadlocked:
        if expected and not r.interrupted and r.host is not None and r.host.returncode == 0:
            print(f"[{r.variant}] note: a deadlock was expected but none happened", file=err)
        return
    cycle = []
    try:
        with open(r.run_dir / "host.jsonl", "rb") as f:
            for line in f:
                if b'"deadlock_detected"' in line:
                    cycle = json.loads(line).get("cycle") or []
                    break
    except (OSError, ValueError):
        pass
    what = "; ".join(f"{e.get('proc')}/{e.get('task')} holds {e.get('holds_lock')} and waits for "
                     f"{e.get('waits_for_lock')} (for {e.get('waited_s', '?')} s)" for e in cycle) or "see host.jsonl"
    print(f"[{r.variant}] DEADLOCK{' (expected)' if expected else ''}: the host ended the run: {what}",
          file=err)


def _report_variant(r: VariantResult, err: Any = sys.stderr) -> None:
    if r.error:
        print(f"[{r.variant}] FAILED: {r.error}", file=err)
    if r.host is not None and r.host.killed_by and not r.interrupted:
        # The guests lose the host and exit on their own (exit 3, "lost the host"); the run is incomplete.
        print(f"[{r.variant}] FAILED: the host was killed by {r.host.killed_by}; the run is incomplete",
              file=err)
    elif r.host is not None and r.host.returncode not in (0, None) and not r.interrupted and not r.deadlocked:
        print(f"[{r.variant}] host exited with {r.host.returncode}:\n{r.host.stderr_tail}", file=err)
    for g in r.guests:
        if g.killed_by:
            print(f"[{r.variant}] {g.name} was killed by {g.killed_by}", file=err)
        elif g.returncode not in (0, None):
            print(f"[{r.variant}] {g.name} exited with {g.returncode}:\n{g.stderr_tail}", file=err)


if __name__ == "__main__":
    sys.exit(main())
