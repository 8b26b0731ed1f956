"""Run a scenario over a grid of overrides and seeds, on Dask distributed, with statistics.

    balloonlab-sweep SCENARIO [--grid KEY=V1,V2,...]... [--seeds N|S1,S2,...]
                     [--set KEY=VALUE]... [--guests N] [--ticks N | --duration S] [--variant NAME]
                     [--scheduler tcp://HOST:PORT] [--workers N] [--cell-timeout S]
                     [--metric NAME]... [--x KEY] [--out DIR]

Every cell (grid point x seed) is one run of the launcher. Without
--scheduler the cells run on an embedded LocalCluster (--workers runs at a
time; default half the cores, at least two); with it, on that cluster's workers. The
output directory (default sweeps/SCENARIO-TIME) gets runs.csv (one row per
run), summary.csv and summary.md (mean and 95 % confidence interval per
cell), plots/*.png and *.svg. Run the same command again to resume: cells
already finished there are not run again. A failed cell is retried once;
it does not stop the sweep.

Exit status: 0 every cell ran, 1 some cell failed (twice), 2 bad arguments,
scenario or grid (nothing was run), 130 interrupted (finished cells are kept).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from balloonlab.proto.errors import ConfigError

__all__ = ["main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="balloonlab-sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", help="scenario name or .toml path (its [sweep] table gives a default grid and seeds)")
    ap.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                    help="a grid axis: a dotted scenario key and its values (repeatable; replaces [sweep] grid)")
    ap.add_argument("--seeds", help="how many seeds (1..N), or a comma-separated list (default 3)")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a fixed override for every cell (repeatable)")
    ap.add_argument("--guests", type=int, help="number of guests")
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--ticks", type=int, help="ticks per run")
    length.add_argument("--duration", type=float, metavar="SECONDS", help="virtual seconds per run")
    ap.add_argument("--variant", help="run only this variant of the scenario")
    ap.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="a Dask scheduler (default: an embedded LocalCluster)")
    ap.add_argument("--workers", type=int, help="runs side by side on the embedded cluster (default: half the cores, at least 2)")
    ap.add_argument("--cell-timeout", type=float, metavar="SECONDS", help="kill a run after this many wall seconds")
    ap.add_argument("--metric", dest="metrics", action="append", metavar="NAME",
                    help="a headline metric to plot and tabulate (repeatable; default a few)")
    ap.add_argument("--x", metavar="KEY", help="the grid axis on the plots' x axis (default the first numeric one)")
    ap.add_argument("--out", type=Path, help="the sweep's directory (default sweeps/SCENARIO-TIME)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--dashboard", action="store_true",
                    help="each run serves its live dashboard; the URLs go to OUT/dashboards.jsonl as runs start")
    args = ap.parse_args(argv)
    for name in ("guests", "ticks", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name} must be >= 1, got {value}")
    if args.duration is not None and not args.duration > 0:
        ap.error(f"--duration must be > 0, got {args.duration}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from balloonlab.overrides import parse_setting

    from .api import sweep
    from .spec import parse_grid
    try:
        grid = parse_grid(args.grid) if args.grid else None
        result = sweep(args.scenario, grid=grid, seeds=args.seeds, overrides=[parse_setting(s) for s in args.settings],
                       guests=args.guests, ticks=args.ticks, duration_s=args.duration, variant=args.variant,
                       out=args.out, scheduler=args.scheduler, workers=args.workers, timeout_s=args.cell_timeout,
                       metrics=args.metrics, x=args.x, progress=not args.quiet, dashboard=args.dashboard)
    except ConfigError as exc:
        print(f"balloonlab-sweep: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("balloonlab-sweep: interrupted; finished cells are kept, run the same command to resume",
              file=sys.stderr)
        return 130
    print((result.dir / "summary.md").read_text())
    print(f"sweep directory: {result.dir}\n  runs.csv ({len(result.runs)} rows), summary.csv, summary.md, "
          f"{len(result.plots)} plot file(s) in {result.dir / 'plots'}", file=sys.stderr)
    if result.failed:
        print(f"balloonlab-sweep: {result.failed} cell(s) failed; see runs.csv (error) and their run directories",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
