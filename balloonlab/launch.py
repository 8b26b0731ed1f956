"""Launch host + N guests from a scenario, variant by variant, and summarise.

    balloonlab-launch [--scenario NAME|FILE] [--guests N] [--seed S]
                      [--duration SECONDS | --ticks N] [--variant NAME]
                      [--run-dir DIR [--force]] [--transport unix|tcp] [--address ADDR]
                      [--external-guests IDS|all [--join-timeout S]] [--expect-guests-lost IDS]

    balloonlab-host [same options]     every guest external: start a host, print how to join

Exit status: 0 when every variant completed (or ended as its scenario
expected: ``expect_deadlock``, ``expect_guests_lost``); 1 when a variant
failed, or was degraded (guests lost or cut off, the audit failed) or
deadlocked without the scenario expecting it; 2 for a bad scenario, bad
arguments or a bad run directory; 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path


from balloonlab.cli import run_cli, say
from balloonlab.proto.errors import ConfigError
from balloonlab.proto.handshake import new_token
from balloonlab.proto.transport import parse_address
from balloonlab.progress import Progress
from balloonlab.rundir import RunDirError, prepare_run_dir
from balloonlab.runner import JoinInfo, VariantResult, run_variant
from balloonlab.scenario import Overrides, Scenario, find_scenario, load_scenario
from balloonlab.validators import VALIDATORS, guest_sizes, guest_swap_area

DEFAULT_SCENARIO = "basic"
JOIN_TIMEOUT_S = 600.0


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
    ap.add_argument("--no-report", action="store_true", help="skip the report and plots at the end")
    args = ap.parse_args(argv)
    if args.guests is not None and args.guests < 1:
        ap.error(f"--guests must be >= 1, got {args.guests}")
    if args.ticks is not None and args.ticks < 1:
        ap.error(f"--ticks must be >= 1, got {args.ticks}")
    if args.duration is not None and not args.duration > 0:
        ap.error(f"--duration must be > 0, got {args.duration}")
    if not args.join_timeout > 0:
        ap.error(f"--join-timeout must be > 0, got {args.join_timeout}")
    if args.address is not None:
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
    args = parse_args(argv, prog)
    try:
        path = find_scenario(args.scenario)
        scenario = load_scenario(path, Overrides(guests=args.guests, seed=args.seed, duration_s=args.duration,
                                                 ticks=args.ticks, variant=args.variant), VALIDATORS)
        _check_locks(scenario)
        _check_guest_ids(scenario, args)
    except ConfigError as exc:
        say(f"{prog}: {exc}")
        return 2
    default = Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        run_dir, created = prepare_run_dir(args.run_dir, default, args.force)
        shutil.copy(path, run_dir / "scenario.toml")
    except RunDirError as exc:
        say(f"{prog}: {exc}")
        return 2
    except OSError as exc:
        say(f"{prog}: --run-dir {run_dir}: cannot write into it: {exc.strerror or exc}")
        return 2
    args.run_dir_created = created
    import uvloop
    return uvloop.run(_launch(scenario, run_dir, args))


def _check_guest_ids(scenario: Scenario, args: argparse.Namespace) -> None:
    """--external-guests and --expect-guests-lost name guests every variant has."""
    for name, merged in scenario.variants.items():
        n = int(merged.get("scenario", {}).get("guests", 4))
        for opt in ("external_guests", "expect_guests_lost"):
            ids = getattr(args, opt)
            if isinstance(ids, list) and ids and ids[-1] >= n:
                raise ConfigError(f"--{opt.replace('_', '-')}: guest {ids[-1]} is not in variant {name!r}, "
                                  f"which has guests 0..{n - 1}")


async def _launch(scenario: Scenario, run_dir: Path, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    progress = Progress()
    results: list[VariantResult] = []
    names = list(scenario.variants)
    say(f"balloonlab: scenario {scenario.name} ({', '.join(names)}), run directory {run_dir}")
    sock_dir = None
    try:
        for name in names:
            vdir = run_dir if len(names) == 1 else run_dir / name
            secret = new_token()
            run_id = f"{scenario.name}-{name}-{os.getpid()}-{int(time.time())}"
            address, sock_dir = _address(args, run_dir, vdir, name, sock_dir)
            progress.start(name)
            run_config = scenario.run_config(name, run_id)
            for g in run_config["guests"]:
                g["ram_pages"], g["disk_blocks"] = guest_sizes(g)
                # Where the guest keeps its swap on that disk: the host's monitors watch it and may pin it.
                g["swap_base_block"], g["swap_blocks"] = guest_swap_area(g)
            external = _external(args, run_config)
            if external:
                # The host waits for each next guest this long: a person starts them by hand.
                run_config["connect_timeout_s"] = max(float(run_config.get("connect_timeout_s", 0)), args.join_timeout)
            result = await run_variant(run_config, vdir, address, secret, progress.update, stop,
                                       log_level=args.log_level, external=external,
                                       on_join=lambda j: _print_join(j, args.prog))
            progress.done()
            results.append(result)
            _report_variant(result)
            _report_deadlock(result, _expects_deadlock(scenario, name))
            if result.interrupted:
                break
    finally:
        if sock_dir is not None:
            shutil.rmtree(sock_dir, ignore_errors=True)
    interrupted = any(r.interrupted for r in results)
    from balloonlab.analysis.summary import format_table, summarize, write_summary
    try:
        summary = summarize(run_dir)
        write_summary(run_dir, summary)
        say(format_table(summary), sys.stdout)
    except Exception as exc:  # a broken analysis must not hide how the run went
        say(f"{args.prog}: could not summarise {run_dir}: {type(exc).__name__}: {exc}")
        summary = None
    where = _write_report(run_dir, summary, args.no_report, interrupted)
    say(f"run directory: {run_dir}")
    say(where)
    if interrupted:
        say(f"{args.prog}: interrupted; every process was stopped")
        return 130
    verdicts = [_verdict(r, summary, scenario, args) for r in results]
    for line in verdicts:
        if line:
            say(line)
    return 0 if not any(verdicts) else 1


def _address(args: argparse.Namespace, run_dir: Path, vdir: Path, name: str,
             sock_dir: Path | None) -> tuple[str, Path | None]:
    """Where this variant's host listens: --address, loopback TCP, or a socket in a private directory."""
    if args.address:
        return args.address, sock_dir
    if args.transport == "tcp":
        return "tcp://127.0.0.1:0", sock_dir
    sock = (vdir / "host.sock").resolve()
    # Beside the logs only in a directory that is private and ours; AF_UNIX paths are limited to ~107 bytes.
    if len(os.fsencode(str(sock))) > 100 or not args.run_dir_created:
        sock_dir = sock_dir or Path(tempfile.mkdtemp(prefix="balloonlab-", dir="/tmp"))
        sock = sock_dir / f"{name}.sock"
    return f"unix:{sock}", sock_dir


def _external(args: argparse.Namespace, run_config: dict) -> frozenset[int]:
    ids = [int(g["id"]) for g in run_config["guests"]]
    return frozenset(ids) if args.external_guests == "all" else frozenset(args.external_guests)


def _print_join(join: JoinInfo, prog: str) -> None:
    """How an outside guest joins: address, id, its credential file, the command line."""
    say(f"[{join.variant}] the host listens at {join.address}; it waits for {len(join.token_files)} guest(s) to "
        f"join. Each runs, wherever it is (its credential file copied there, kept 0600):")
    for gid in sorted(join.token_files):
        say(f"[{join.variant}]   guest {gid}: {join.command(gid)}")
    say(f"[{join.variant}]   (or BALLOONLAB_TOKEN=<the file's content> instead of --token-file; "
        f"join.json in the run directory says the same)")


def _expected_lost(scenario: Scenario, variant: str, args: argparse.Namespace) -> set[int]:
    """``--expect-guests-lost``, else the variant's [scenario] expect_guests_lost."""
    if args.expect_guests_lost is not None:
        n = int(scenario.variants.get(variant, {}).get("scenario", {}).get("guests", 4))
        return set(range(n)) if args.expect_guests_lost == "all" else set(args.expect_guests_lost)
    merged = scenario.variants.get(variant, {}).get("scenario", {})
    return {int(g) for g in merged.get("expect_guests_lost", [])}


def _verdict(r: VariantResult, summary: dict | None, scenario: Scenario, args: argparse.Namespace) -> str:
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
        expected = _expected_lost(scenario, r.variant, args)
        if lost and lost <= expected and v.get("audit_ok"):
            return ""
    return f"[{r.variant}] {status}: " + "; ".join(v.get("status_reasons") or ["see summary.json"])


def _write_report(run_dir: Path, summary: dict | None, no_report: bool, interrupted: bool) -> str:
    """Write report.md and the plots; return the lines that say where they are (or why not)."""
    later = f"write it with: balloonlab-analyze {run_dir}"
    if summary is None or no_report or interrupted:
        why = "--no-report" if no_report else "interrupted" if interrupted else "no summary"
        return f"report: not written ({why}); {later}"
    try:
        from balloonlab.analysis.report import write_report
        report = write_report(run_dir, summary)
    except Exception as exc:  # the run itself went fine: a broken report must not fail it
        return f"report: not written ({type(exc).__name__}: {exc}); {later}"
    plots = sorted(run_dir.glob("*.png"))
    return f"report: {report}\nplots: {len(plots)} PNG file(s) in {run_dir}" if plots else \
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


def _report_deadlock(r: VariantResult, expected: bool) -> None:
    """A variant the host ended on a deadlock: say so, with the cycle from the host's log."""
    if not r.deadlocked:
        if expected and not r.interrupted and r.host is not None and r.host.returncode == 0:
            say(f"[{r.variant}] note: a deadlock was expected but none happened")
        return
    import json
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
    say(f"[{r.variant}] DEADLOCK{' (expected)' if expected else ''}: the host ended the run: {what}")


def _report_variant(r: VariantResult) -> None:
    if r.error:
        say(f"[{r.variant}] FAILED: {r.error}")
    if r.host is not None and r.host.killed_by and not r.interrupted:
        # The guests lose the host and exit on their own (exit 3, "lost the host"); the run is incomplete.
        say(f"[{r.variant}] FAILED: the host was killed by {r.host.killed_by}; the run is incomplete")
    elif r.host is not None and r.host.returncode not in (0, None) and not r.interrupted and not r.deadlocked:
        say(f"[{r.variant}] host exited with {r.host.returncode}:\n{r.host.stderr_tail}")
    for g in r.guests:
        if g.killed_by:
            say(f"[{r.variant}] {g.name} was killed by {g.killed_by}")
        elif g.returncode not in (0, None):
            say(f"[{r.variant}] {g.name} exited with {g.returncode}:\n{g.stderr_tail}")


if __name__ == "__main__":
    sys.exit(main())
