"""Launch host + N guests from a scenario, variant by variant, and summarise.

    balloonlab-launch [--scenario NAME|FILE] [--guests N] [--seed S]
                      [--duration SECONDS | --ticks N] [--variant NAME] [--set KEY=VALUE ...]
                      [--run-dir DIR [--force]] [--transport unix|tcp] [--address ADDR]
                      [--external-guests IDS|all [--join-timeout S]] [--expect-guests-lost IDS]
                      [--dashboard [--dashboard-port PORT]] [--pace RATE] [--format png|svg|pdf[,...]]
                      [--guest-start fork|exec]

    balloonlab-host [same options]     every guest external: start a host, print how to join

Exit status: 0 when every variant completed (or ended as its scenario
expected: ``expect_deadlock``, ``expect_guests_lost``); 1 when a variant
failed, or was degraded (guests lost or cut off, the audit failed) or
deadlocked without the scenario expecting it; 2 for a bad scenario, bad
arguments or a bad run directory; 130 on Ctrl-C.

The command line is a thin layer over the same two steps as the Python API
(``balloonlab.run``): ``prepare`` and ``launch`` below.
"""
from __future__ import annotations

import argparse
import gc
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
from typing import TYPE_CHECKING, Any, Coroutine, TypeVar

# Only what starting the host and the fork server needs is imported here (no event loop, no numpy):
# the command line starts them first, and they import while the launcher imports the rest (the runner,
# the scenario's schema and checks, which load numpy and the protocol) and loads the scenario.
from balloonlab.cli import run_cli, say
from balloonlab.early import (GUEST_START_MODES, EarlyForkServer, EarlyHost, child_env, default_guest_start,
                              die_with_parent, fork_early_host, host_fork_default, start_early, start_early_host)
from balloonlab.proto.errors import ConfigError
from balloonlab.rundir import RunDirError, prepare_run_dir

if TYPE_CHECKING:
    from balloonlab.runner import JoinInfo, VariantResult
    from balloonlab.scenario import Overrides, Scenario

__all__ = ["main", "host_main", "prepare", "launch", "LaunchOutcome", "DEFAULT_SCENARIO", "RunDirError"]

DEFAULT_SCENARIO = "basic"
JOIN_TIMEOUT_S = 600.0
T = TypeVar("T")
GuestIds = "list[int] | str"   # ids, or "all"


@dataclass
class LaunchOutcome:
    """How a launch ended: the run directory, the exit status the command line returns, what ran."""

    run_dir: Path
    exit_status: int
    results: list[VariantResult] = field(default_factory=list)
    summary: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Options:
    """How to run the variants (the command line's options; the API's defaults)."""

    transport: str = "unix"
    address: str | None = None
    external_guests: Any = ()               # guest ids the launcher does not start, or "all"
    join_timeout_s: float = JOIN_TIMEOUT_S
    expect_guests_lost: Any = None          # ids or "all"; None: the scenario's expect_guests_lost
    log_level: str = "info"
    report: bool = True
    verbose: bool = True
    formats: tuple[str, ...] = ("png",)
    prog: str = "balloonlab-launch"
    run_dir_created: bool = True
    guest_start: str | None = None          # "fork", "exec"; None: BALLOONLAB_FORKSERVER decides


def _ids(text: str) -> list[int] | str:
    if text.strip() == "all":
        return "all"
    try:
        ids = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected guest ids like 0,2,3 (or 'all'), got {text!r}") from None
    if not ids or ids[0] < 0:
        raise argparse.ArgumentTypeError(f"expected guest ids >= 0 like 0,2,3 (or 'all'), got {text!r}")
    return ids


def parse_args(argv: list[str] | None, prog: str = "balloonlab-launch") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
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
    ap.add_argument("--run-dir", type=Path, help="where logs and the summary go (default runs/SCENARIO-TIME); "
                    "must not exist, or be empty")
    ap.add_argument("--force", action="store_true", help="clear a non-empty --run-dir first")
    ap.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    ap.add_argument("--address", help="where the host listens (unix:PATH or tcp://HOST:PORT, port 0: any); "
                    "default a socket in the run directory, or tcp://127.0.0.1:0 with --transport tcp")
    ap.add_argument("--external-guests", "--join", dest="external_guests", type=_ids, default=[], metavar="IDS",
                    help="guest ids (0,2 or 'all') the launcher does not start: it prints how they join "
                    "(address, credential file, command line) and writes join.json")
    ap.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT_S, metavar="S",
                    help=f"how long the host waits for the next guest to join (default {JOIN_TIMEOUT_S:g} s "
                    "with external guests)")
    ap.add_argument("--expect-guests-lost", type=_ids, default=None, metavar="IDS",
                    help="guests the run is expected to lose (killed by a test, say): a variant that lost only "
                    "those is no failure (as [scenario] expect_guests_lost)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--guest-start", choices=list(GUEST_START_MODES), default=None,
                    help="fork: every guest forked from one fork server that imported the guest once (small "
                    "private memory per guest; the default); exec: each guest its own `python -m "
                    "balloonlab.guestd` (the default when BALLOONLAB_FORKSERVER=0)")
    ap.add_argument("--no-report", action="store_true", help="skip the report and plots at the end")
    ap.add_argument("--format", default="png", metavar="png|svg|pdf[,...]",
                    help="the report's figure format(s), comma-separated (default png)")
    ap.add_argument("--dashboard", action="store_true",
                    help="serve a live dashboard on 127.0.0.1 and print its URL (balloonlab-dashboard replays it)")
    ap.add_argument("--dashboard-port", type=int, default=0, metavar="PORT", help="the dashboard's port (default: a free one)")
    ap.add_argument("--pace", type=float, metavar="RATE",
                    help="at most RATE virtual seconds per wall second, to watch a run live (e.g. 1: real time; "
                         "same as --set scenario.pace=RATE; the counts do not depend on it)")
    ap.add_argument("--schema", action="store_true",
                    help="print the scenario file's JSON Schema (for editors: completion, checks) and exit")
    args = ap.parse_args(argv)
    if args.guests is not None and args.guests < 1:
        ap.error(f"--guests must be >= 1, got {args.guests}")
    if args.ticks is not None and args.ticks < 1:
        ap.error(f"--ticks must be >= 1, got {args.ticks}")
    if args.duration is not None and not args.duration > 0:
        ap.error(f"--duration must be > 0, got {args.duration}")
    from balloonlab.analysis.formats import parse_formats
    try:
        args.formats = parse_formats(args.format)
    except ValueError as exc:
        ap.error(f"--format: {exc}")
    if not 0 <= args.dashboard_port <= 65535:
        ap.error(f"--dashboard-port must be in 0..65535, got {args.dashboard_port}")
    if args.pace is not None and not args.pace > 0:
        ap.error(f"--pace must be > 0 virtual seconds per wall second, got {args.pace:g}")
    if not args.join_timeout > 0:
        ap.error(f"--join-timeout must be > 0, got {args.join_timeout}")
    if args.address is not None:
        from balloonlab.proto.transport import parse_address
        try:
            parse_address(args.address)
        except ConfigError as exc:
            ap.error(f"--address: {exc}")
    args.prog = prog
    return args


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def host_main(argv: list[str] | None = None) -> int:
    """``balloonlab-host``: the launcher with every guest external -- a host that waits for guests to join."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda a: _main(a, prog="balloonlab-host"), ["--external-guests", "all", *argv])


def _main(argv: list[str] | None = None, prog: str = "balloonlab-launch") -> int:
    # The scenario's checks import numpy here too, and OpenBLAS would start a thread per core that the
    # launcher never uses: ~60 ms of CPU (perf sched, 64 guests) while the host and the fork server import
    # on the same two cores. Its children get the same from ``child_env``; a value the user set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = parse_args(argv, prog)
    if args.schema:
        from .editorschema import editor_schema
        print(json.dumps(editor_schema(), indent=2))
        return 0
    # The host and the fork server import while the launcher imports and loads the scenario (they need
    # only the environment); the first variant hands the host its arguments, and every variant forks
    # from the server. The fork server starts first; the host is forked from the launcher once it has
    # imported what the two share (numpy, asyncio, the protocol), or, with BALLOONLAB_HOST_FORK=0 or
    # where a fork is not safe, started as its own interpreter.
    forked = host_fork_default()
    early_host = None if forked else start_early_host(child_env(), sys.executable, args.run_dir)
    early = None
    if (args.guest_start or default_guest_start()) == "fork" and args.external_guests != "all":
        early = start_early(child_env(), sys.executable, die_with_parent, args.run_dir)
    if early_host is None:
        early_host = fork_early_host(child_env(), sys.executable, args.run_dir) or \
            start_early_host(child_env(), sys.executable, args.run_dir)
    # The scenario's checks import the host's modules, while the host and the fork server start on the
    # same two cores: without the collector's passes over them (nothing they build is garbage, ~8 % of
    # that CPU) and with structlog imported without rich, for console renderers the launcher never uses
    # (~30 ms of CPU, -X importtime; ``balloonlab.proto.plainlog``). What they built is frozen when the
    # collector resumes, so that its first pass does not walk it either.
    gc_paused = gc.isenabled()
    gc.disable()
    try:
        from balloonlab.proto.plainlog import import_structlog
        import_structlog()
        from balloonlab.overrides import normalize, parse_setting
        from balloonlab.scenario import Overrides
        settings = normalize([parse_setting(s) for s in args.settings]
                             + ([("scenario.pace", args.pace)] if args.pace is not None else []))
        path, scenario = prepare(args.scenario, Overrides(guests=args.guests, seed=args.seed,
                                                          duration_s=args.duration, ticks=args.ticks,
                                                          variant=args.variant, settings=settings))
        _check_guest_ids(scenario, args.external_guests, args.expect_guests_lost)
        if gc_paused:
            gc_paused = False
            gc.freeze()
            gc.enable()
        outcome = launch(path, scenario, run_dir=args.run_dir, force=args.force, transport=args.transport,
                         address=args.address, external_guests=args.external_guests,
                         join_timeout_s=args.join_timeout, expect_guests_lost=args.expect_guests_lost,
                         log_level=args.log_level, report=not args.no_report, settings=settings,
                         formats=args.formats, dashboard=args.dashboard, dashboard_port=args.dashboard_port,
                         prog=prog, guest_start=args.guest_start, early_fork_server=early,
                         early_host=early_host)
    except (ConfigError, RunDirError) as exc:
        say(f"{prog}: {exc}")
        return 2
    finally:
        if gc_paused:
            gc.enable()
        # A bad scenario or run directory: the run never adopted them.
        early_host.discard()
        if early is not None:
            early.discard()
    return outcome.exit_status


def prepare(scenario: str | os.PathLike[str], overrides: Overrides | None = None) -> tuple[Path, Scenario]:
    """Find, load and check a scenario before any process starts; a bad one raises ``ConfigError``."""
    from balloonlab.scenario import Overrides, find_scenario, load_scenario
    from balloonlab.validators import VALIDATORS, reset_guest_configs
    reset_guest_configs()
    path = find_scenario(str(scenario))
    loaded = load_scenario(path, Overrides() if overrides is None else overrides, VALIDATORS)
    _check_locks(loaded)
    return path, loaded


def launch(path: Path, scenario: Scenario, *, run_dir: Path | None = None, force: bool = False,
           transport: str = "unix", address: str | None = None, external_guests: Any = (),
           join_timeout_s: float = JOIN_TIMEOUT_S, expect_guests_lost: Any = None, log_level: str = "info",
           report: bool = True, settings: tuple[tuple[str, Any], ...] = (), verbose: bool = True,
           formats: tuple[str, ...] = ("png",), dashboard: bool = False, dashboard_port: int = 0,
           prog: str = "balloonlab-launch", guest_start: str | None = None,
           early_fork_server: EarlyForkServer | None = None, early_host: EarlyHost | None = None) -> LaunchOutcome:
    """Run every variant of a prepared scenario to its end; write the summary (and the report).

    ``run_dir`` must not exist or be empty (``force`` clears it first);
    a bad one raises ``RunDirError``. ``external_guests`` (ids or "all")
    are not started: how they join is printed and written to join.json.
    ``guest_start``: ``fork`` (the fork server) or ``exec``; None: ``fork``
    unless ``BALLOONLAB_FORKSERVER=0``. ``early_fork_server``: a fork server
    from ``early.start_early`` to use; None: one is started here when
    needed. ``early_host``: a host from ``early.start_early_host`` for the
    first variant. The caller discards both if this raises before the run.
    """
    if transport not in ("unix", "tcp"):
        raise ConfigError(f"transport must be 'unix' or 'tcp', got {transport!r}")
    if guest_start is not None and guest_start not in GUEST_START_MODES:
        raise ConfigError(f"guest_start must be one of {', '.join(GUEST_START_MODES)}, got {guest_start!r}")
    default = Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir, created = prepare_run_dir(None if run_dir is None else Path(run_dir), default, force)
    try:
        shutil.copy(path, run_dir / "scenario.toml")
        if settings:   # scenario.toml alone would not say how this run differed from it
            (run_dir / "overrides.json").write_text(json.dumps(dict(settings), indent=1) + "\n")
    except OSError as exc:
        raise RunDirError(f"--run-dir {run_dir}: cannot write into it: {exc.strerror or exc}") from None
    opts = _Options(transport=transport, address=address, external_guests=external_guests,
                    join_timeout_s=join_timeout_s, expect_guests_lost=expect_guests_lost, log_level=log_level,
                    report=report, verbose=verbose, formats=tuple(formats), prog=prog, run_dir_created=created,
                    guest_start=guest_start)
    from balloonlab.dashboard.cli import with_dashboard
    work = _launch(scenario, run_dir, opts, early_fork_server, early_host)
    return _run_loop(with_dashboard(work, run_dir, enabled=dashboard, port=dashboard_port))


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop; from inside a running event loop (a notebook) on a thread of its own."""
    import asyncio

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


def _check_guest_ids(scenario: Scenario, external_guests: Any, expect_guests_lost: Any) -> None:
    """--external-guests and --expect-guests-lost name guests every variant has."""
    for name, merged in scenario.variants.items():
        n = int(merged.get("scenario", {}).get("guests", 4))
        for opt, ids in (("external-guests", external_guests), ("expect-guests-lost", expect_guests_lost)):
            if isinstance(ids, list) and ids and ids[-1] >= n:
                raise ConfigError(f"--{opt}: guest {ids[-1]} is not in variant {name!r}, "
                                  f"which has guests 0..{n - 1}")


def _needs_fork_server(scenario: Scenario, o: _Options) -> bool:
    """Whether some variant forks a guest of its own (not external) from the fork server."""
    if (o.guest_start or default_guest_start()) != "fork" or o.external_guests == "all":
        return False
    external = set(o.external_guests)
    return any(set(range(int(v.get("scenario", {}).get("guests", 4)))) - external for v in scenario.variants.values())


async def _launch(scenario: Scenario, run_dir: Path, o: _Options, early: EarlyForkServer | None = None,
                  early_host: EarlyHost | None = None) -> LaunchOutcome:
    import asyncio

    from balloonlab.forkclient import ForkServer
    from balloonlab.progress import Progress
    from balloonlab.runner import run_variant
    from balloonlab.proto.handshake import new_token
    from balloonlab.validators import guest_sizes, guest_swap_area
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):   # not the main thread: the caller's own handlers stay
            break
    err: Any = sys.stderr if o.verbose else _Quiet()
    progress = Progress(out=err)
    results: list[VariantResult] = []
    names = list(scenario.variants)
    say(f"balloonlab: scenario {scenario.name} ({', '.join(names)}), run directory {run_dir}", err)
    sock_dir = None
    server: ForkServer | None = None
    try:
        if _needs_fork_server(scenario, o):
            # One server for every variant: each forks fresh guests from the same imported image.
            server = ForkServer.adopt(early or start_early(child_env(), sys.executable, die_with_parent), run_dir)
        for i, name in enumerate(names):
            vdir = run_dir if len(names) == 1 else run_dir / name
            following = run_dir / names[i + 1] if i + 1 < len(names) else None

            def on_progress(msg: dict[str, Any], following: Path | None = following) -> None:
                nonlocal early_host
                progress.update(msg)
                if following is not None and early_host is None and "tick" in msg:
                    # The next variant's host imports while this one ticks (on a core its guests leave idle
                    # more often than not), instead of while the next one waits for it.
                    early_host = start_early_host(child_env(), sys.executable, following)
            secret = new_token()
            run_id = f"{scenario.name}-{name}-{os.getpid()}-{int(time.time())}"
            address, sock_dir = _address(o, vdir, name, sock_dir)
            progress.start(name)
            run_config = scenario.run_config(name, run_id)
            for g in run_config["guests"]:
                g["ram_pages"], g["disk_blocks"] = guest_sizes(g)
                # Where the guest keeps its swap on that disk: the host's monitors watch it and may pin it.
                g["swap_base_block"], g["swap_blocks"] = guest_swap_area(g)
            external = _external(o, run_config)
            if external:
                # The host waits for each next guest this long: a person starts them by hand.
                run_config["connect_timeout_s"] = max(float(run_config.get("connect_timeout_s", 0)), o.join_timeout_s)
            this_host, early_host = early_host, None
            result = await run_variant(run_config, vdir, address, secret, on_progress, stop,
                                       log_level=o.log_level, external=external,
                                       on_join=lambda j: _print_join(j, err), guest_start=o.guest_start,
                                       fork_server=server, early_host=this_host)
            progress.done()
            results.append(result)
            _report_variant(result, err)
            _report_deadlock(result, _expects_deadlock(scenario, name), err)
            if result.interrupted:
                break
    finally:
        if early_host is not None:
            early_host.discard()   # the run stopped before the variant it was for
        if server is not None:
            await asyncio.shield(server.close())
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
        if o.verbose:
            say(format_table(summary), sys.stdout)
    except Exception as exc:  # a broken analysis must not hide how the run went
        say(f"{o.prog}: could not summarise {run_dir}: {type(exc).__name__}: {exc}", err)
        summary = None
    where = _write_report(run_dir, summary, not o.report, interrupted, o.formats)
    say(f"run directory: {run_dir}", err)
    say(where, err)
    if interrupted:
        say(f"{o.prog}: interrupted; every process was stopped", err)
        return LaunchOutcome(run_dir, 130, results, summary)
    verdicts = [_verdict(r, summary, scenario, o) for r in results]
    for line in verdicts:
        if line:
            say(line, err)
    return LaunchOutcome(run_dir, 0 if not any(verdicts) else 1, results, summary)


def _address(o: _Options, vdir: Path, name: str, sock_dir: Path | None) -> tuple[str, Path | None]:
    """Where this variant's host listens: --address, loopback TCP, or a socket in a private directory."""
    if o.address:
        return o.address, sock_dir
    if o.transport == "tcp":
        return "tcp://127.0.0.1:0", sock_dir
    sock = (vdir / "host.sock").resolve()
    # Beside the logs only in a directory that is private and ours; AF_UNIX paths are limited to ~107 bytes.
    if len(os.fsencode(str(sock))) > 100 or not o.run_dir_created:
        sock_dir = sock_dir or Path(tempfile.mkdtemp(prefix="balloonlab-", dir="/tmp"))
        sock = sock_dir / f"{name}.sock"
    return f"unix:{sock}", sock_dir


def _external(o: _Options, run_config: dict) -> frozenset[int]:
    ids = [int(g["id"]) for g in run_config["guests"]]
    return frozenset(ids) if o.external_guests == "all" else frozenset(o.external_guests)


def _print_join(join: JoinInfo, err: Any = sys.stderr) -> None:
    """How an outside guest joins: address, id, its credential file, the command line."""
    say(f"[{join.variant}] the host listens at {join.address}; it waits for {len(join.token_files)} guest(s) to "
        f"join. Each runs, wherever it is (its credential file copied there, kept 0600):", err)
    for gid in sorted(join.token_files):
        say(f"[{join.variant}]   guest {gid}: {join.command(gid)}", err)
    say(f"[{join.variant}]   (or BALLOONLAB_TOKEN=<the file's content> instead of --token-file; "
        f"join.json in the run directory says the same)", err)


def _expected_lost(scenario: Scenario, variant: str, o: _Options) -> set[int]:
    """``--expect-guests-lost``, else the variant's [scenario] expect_guests_lost."""
    if o.expect_guests_lost is not None:
        n = int(scenario.variants.get(variant, {}).get("scenario", {}).get("guests", 4))
        return set(range(n)) if o.expect_guests_lost == "all" else set(o.expect_guests_lost)
    merged = scenario.variants.get(variant, {}).get("scenario", {})
    return {int(g) for g in merged.get("expect_guests_lost", [])}


def _verdict(r: VariantResult, summary: dict | None, scenario: Scenario, o: _Options) -> str:
    """Why this variant makes the launcher fail, or "" if it ended as it should (or as the scenario expected)."""
    v = (summary or {}).get("variants", {}).get(r.variant, {})
    status = v.get("status")
    if r.deadlocked or status == "deadlocked":
        return "" if _expects_deadlock(scenario, r.variant) else f"[{r.variant}] failed: an unexpected deadlock"
    if not r.ok:
        return f"[{r.variant}] failed: " + (r.error or "the host or a guest exited with an error")
    if status in (None, "completed"):
        return ""
    if status == "degraded":
        lost = {int(g) for g in v.get("guests_lost", {})} | {int(g) for g in v.get("guests_cut_off", {})}
        expected = _expected_lost(scenario, r.variant, o)
        if lost and lost <= expected and v.get("audit_ok"):
            return ""
    return f"[{r.variant}] {status}: " + "; ".join(v.get("status_reasons") or ["see summary.json"])


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
        locks = lock_config_from_mapping(merged.get("locks"), where=where)
        host_memory_config(merged.get("host", {})).resolved_request_order(locks.enabled, where=f"{where}: ")


def _expects_deadlock(scenario: Scenario, variant: str) -> bool:
    """``expect_deadlock`` of the variant's [scenario] table (a variant may set it), else the file's."""
    merged = scenario.variants.get(variant, {}).get("scenario", {})
    return bool(merged.get("expect_deadlock", scenario.expect_deadlock))


def _report_deadlock(r: VariantResult, expected: bool, err: Any = sys.stderr) -> None:
    """A variant the host ended on a deadlock: say so, with the cycle from the host's log."""
    if not r.deadlocked:
        if expected and not r.interrupted and r.host is not None and r.host.returncode == 0:
            say(f"[{r.variant}] note: a deadlock was expected but none happened", err)
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
    say(f"[{r.variant}] DEADLOCK{' (expected)' if expected else ''}: the host ended the run: {what}",
          err)


def _report_variant(r: VariantResult, err: Any = sys.stderr) -> None:
    if r.error:
        say(f"[{r.variant}] FAILED: {r.error}", err)
    if r.host is not None and r.host.killed_by and not r.interrupted:
        # The guests lose the host and exit on their own (exit 3, "lost the host"); the run is incomplete.
        say(f"[{r.variant}] FAILED: the host was killed by {r.host.killed_by}; the run is incomplete",
              err)
    elif r.host is not None and r.host.returncode not in (0, None) and not r.interrupted and not r.deadlocked:
        say(f"[{r.variant}] host exited with {r.host.returncode}:\n{r.host.stderr_tail}", err)
    for g in r.guests:
        if g.killed_by:
            say(f"[{r.variant}] {g.name} was killed by {g.killed_by}", err)
        elif g.returncode not in (0, None):
            say(f"[{r.variant}] {g.name} exited with {g.returncode}:\n{g.stderr_tail}", err)


if __name__ == "__main__":
    from balloonlab.cli import exit_now
    exit_now(main())
