"""Benchmarks: ``python scripts/bench.py [rpc|paging|traces|scale|balloon|ioamp|analyze|soak|readme|clocks|determinism|targets|all] [options]``.

Each subcommand is a module with ``main(argv) -> int``, imported only when
asked for, so one missing or broken benchmark does not stop the others:

- ``rpc``: ``scripts.bench_rpc`` -- RPC round trip and pipelined throughput
  against a bare uvloop echo.
- ``paging``: ``scripts.bench_paging`` -- references per second of the
  paging simulators.
- ``traces``: ``scripts.bench_traces`` -- the guest kernel path on lackey
  traces of real programs (sqlite3, sort, CPython json) at about 2 % and 10 %
  misses, against libCacheSim's Clock (``pip install -e ".[bench]"``).
- ``scale``: ``scripts.bench_scale`` -- host + N guests, wall time and RSS.
- ``balloon``: ``scripts.bench_balloon`` -- balloon inflation, 262,144 pages
  of clean guest memory to host frames freed; target under 1 s.
- ``ioamp``: ``scripts.bench_ioamp`` -- the io-amplification demo with 4
  guests: wall time per variant and the headline numbers; target under 60 s.
- ``hostmem``: ``scripts.bench_hostmem`` -- host memory's own CPU per disk
  read, disk write and EPT fault, ``HostMemory`` driven in process.
- ``analyze``: ``scripts.bench_analyze`` -- the analyzer (read, summary,
  report, plots) on a synthetic run of 1M log lines; target under 10 s.
- ``hog``: ``scripts.bench_hog`` -- the demo with every CPU saturated by
  busy-loop processes (10 per CPU): same counts as unloaded, only slower.
- ``soak``: ``scripts.bench_soak`` -- 64 guests for 10,000 ticks (``--guests``,
  ``--ticks``), mixed workloads and controllers, a guest killed and restarted
  every so often: host memory over time, lost pages, invariant violations.
  Hours at its defaults, so ``all`` skips it (and ``hog``).
- ``readme``: ``scripts.bench_readme`` -- re-measures every number the README
  quotes for the shipped scenarios (and the validations), with the command
  that measured each; ``--from DIR`` re-reads earlier runs. Minutes; ``all``
  skips it.
- ``clocks``: ``scripts.bench_clocks`` -- every shipped scenario at small
  sizes, its guests' clocks checked against the host's at every tick end.
- ``determinism``: ``scripts.bench_determinism`` -- every shipped scenario
  and variant, small, run quiet, with the CPUs loaded and with exec-started
  guests: every deterministic count in summary.json compared, scenario x
  variant -> same / DIFFERENT. Minutes; ``all`` skips it.
- ``targets``: ``scripts.bench_targets`` -- traces, ioamp and the scale
  curve (4 to 256 guests) in turn, then one table of the engine's speed and
  memory targets, each against ``--anchor DIR`` (the code when the targets
  were set) measured in the same run. Many minutes; ``all`` skips it.
- ``all``: each of the above in turn with its defaults.

Options after the subcommand go to that benchmark (``bench.py rpc --help``).
Benchmarks print numbers; they are not tests and never fail on a slow run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: make ``scripts.*`` importable
    sys.path.insert(0, str(REPO))

__all__ = ["main", "BENCHMARKS"]

BENCHMARKS: dict[str, tuple[str, str]] = {
    "rpc": ("scripts.bench_rpc", "RPC round trip and pipelined throughput vs a bare uvloop echo"),
    "paging": ("scripts.bench_paging", "paging simulators: references per second per policy"),
    "traces": ("scripts.bench_traces", "guest kernel path on real programs' lackey traces vs libCacheSim's Clock"),
    "scale": ("scripts.bench_scale", "host + N guests: wall time, virtual s per wall s, RSS"),
    "balloon": ("scripts.bench_balloon", "balloon inflation of 1 GiB of clean guest memory: wall vs the 1 s target"),
    "ioamp": ("scripts.bench_ioamp", "the io-amplification demo, 4 guests: wall per variant vs the 60 s target"),
    "hostmem": ("scripts.bench_hostmem", "host memory's CPU per disk read/write and EPT fault, in process (no sockets)"),
    "analyze": ("scripts.bench_analyze", "the analyzer on a synthetic 1M-line run: lines/s vs the 10 s target"),
    "hog": ("scripts.bench_hog", "the demo with the CPUs saturated by 10 hogs per CPU: same counts, only slower"),
    "soak": ("scripts.bench_soak", "many guests, many ticks, guests killed and restarted: nothing lost, memory bounded"),
    "readme": ("scripts.bench_readme", "every number the README quotes for the shipped scenarios, re-measured"),
    "clocks": ("scripts.bench_clocks", "every shipped scenario, small: guests' clocks vs the host's at tick ends"),
    "determinism": ("scripts.bench_determinism", "every shipped scenario and variant, small: same counts quiet, "
                    "loaded and exec-started"),
    "targets": ("scripts.bench_targets", "the engine's speed and memory targets in one table, against --anchor"),
}
"""Subcommand -> (module with ``main(argv) -> int``, one-line description)."""


class BenchmarkMissing(RuntimeError):
    """The module of a benchmark is not there (yet)."""


def _load(name: str) -> Callable[[Sequence[str] | None], int]:
    module_name = BENCHMARKS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the benchmark's own module missing is "not there"; a missing
        # dependency inside it is a real error and is re-raised.
        if exc.name != module_name:
            raise
        raise BenchmarkMissing(f"benchmark {name!r} is not available: {module_name} does not exist "
                               f"(expected {module_name.replace('.', '/')}.py with main(argv))") from None
    main = getattr(module, "main", None)
    if not callable(main):
        raise BenchmarkMissing(f"benchmark {name!r}: {module_name} has no main(argv)")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="bench", required=True, metavar="{" + ",".join([*BENCHMARKS, "all"]) + "}")
    for name, (_, desc) in BENCHMARKS.items():
        # add_help=False: --help after the subcommand reaches the benchmark's own parser.
        sub.add_parser(name, help=desc, add_help=False)
    sub.add_parser("all", help="every benchmark in turn, with its defaults")
    args, rest = ap.parse_known_args(argv)
    if args.bench == "all":
        if rest:
            ap.error("'all' takes no options; run one benchmark to pass options")
        status = 0
        for name in BENCHMARKS:
            if name in ("soak", "hog", "readme", "clocks", "determinism", "targets"):
                continue  # hours at its defaults, or the machine saturated on purpose: run them on their own
            print(f"=== {name} ===", flush=True)
            try:
                rc = _load(name)([])
            except BenchmarkMissing as exc:
                print(exc, file=sys.stderr)
                rc = 2
            status = status or rc
            print(flush=True)
        return status
    try:
        bench_main = _load(args.bench)
    except BenchmarkMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
