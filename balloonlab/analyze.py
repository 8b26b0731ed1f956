"""Analyse a run directory, or compare runs.

    balloonlab-analyze RUN_DIR [--json] [--no-plots] [--format png|svg|pdf[,...]] [--csv DIR] [--parquet DIR]
        writes summary.json, report.md and the figures into RUN_DIR (PNG by
        default; --format png,svg writes each figure in both) and prints the
        summary table (or summary.json with --json); --csv and --parquet
        also export the run's tidy tables (guests, host, events, decisions:
        the DataFrames of balloonlab.load(RUN_DIR)) into DIR
    balloonlab-analyze compare RUN_A RUN_B ... [--out FILE]
        prints the headline metrics side by side with ratios against RUN_A
        and writes them to FILE (default RUN_A/compare.md, and .json beside it)

Malformed or truncated log lines are skipped with a warning that says how
many. Exit status: 0 done, 2 no such run directory or no logs in it, 141
when the reader of the output went away (``... --json | head``; quietly).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from balloonlab.analysis.logs import find_variants, load_variant
from balloonlab.cli import run_cli
from balloonlab.analysis.summary import format_table, summarize, write_summary

__all__ = ["main", "analyze_run", "AnalyzeResult"]


@dataclass
class AnalyzeResult:
    summary: dict[str, Any]
    summary_path: Path
    report_path: Path | None = None
    plots: list[Any] = field(default_factory=list)
    plot_error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)   # wall seconds per stage


def analyze_run(run_dir: Path, *, report: bool = True, plots: bool = True, quiet: bool = False,
                formats: tuple[str, ...] = ("png",)) -> AnalyzeResult:
    """Read the run's logs once; write summary.json, and report.md with its plots."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    logs = [load_variant(name, path, warn=not quiet) for name, path in find_variants(run_dir)]
    t1 = time.perf_counter()
    summary = summarize(run_dir, logs)
    result = AnalyzeResult(summary, write_summary(run_dir, summary))
    t2 = time.perf_counter()
    if report:
        from balloonlab.analysis.report import write_report_full

        rep = write_report_full(run_dir, summary, logs, plots=plots, formats=formats)
        result.report_path, result.plots, result.plot_error = rep.path, rep.plots, rep.plot_error
    t3 = time.perf_counter()
    result.timings = {"read_s": t1 - t0, "summary_s": t2 - t1, "report_s": t3 - t2}
    return result


def where_message(run_dir: Path, report_path: Path | None, n_plots: int, fmt: str = "png") -> str:
    """The lines that tell a person where to look (the launcher prints the same)."""
    if report_path is None:
        return f"summary: {Path(run_dir) / 'summary.json'}"
    plots = f"plots: {n_plots} {fmt.upper()} file(s) in {Path(run_dir)}" if n_plots else "plots: none drawn"
    return f"report: {report_path}\n{plots}"


def _compare(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="balloonlab-analyze compare",
                                 description="headline metrics of runs side by side, with ratios against the first")
    ap.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", type=Path, help="where to write the table (default RUN_A/compare.md; .json beside it)")
    args = ap.parse_args(argv)
    from balloonlab.analysis.compare import compare_runs, load_run_summary
    from balloonlab.analysis.report import variant_order

    try:
        summaries = [load_run_summary(d) for d in args.runs]
    except FileNotFoundError as exc:
        print(f"balloonlab-analyze compare: {exc}", file=sys.stderr)
        return 2
    text, data = compare_runs(args.runs, summaries,
                              order=lambda d, s: variant_order(d, list(s.get("variants", {}))))
    out = args.out or args.runs[0] / "compare.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    print(text)
    print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare(argv[1:])
    ap = argparse.ArgumentParser(prog="balloonlab-analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    ap.add_argument("--no-plots", action="store_true", help="write the report without plots (faster)")
    ap.add_argument("--no-report", action="store_true", help="write summary.json only")
    ap.add_argument("--format", default="png", metavar="png|svg|pdf[,...]",
                    help="figure file format(s), comma-separated; the report embeds the first (default png)")
    ap.add_argument("--csv", type=Path, metavar="DIR", help="export the tables as DIR/{guests,host,events,decisions}.csv")
    ap.add_argument("--parquet", type=Path, metavar="DIR", help="the same tables as .parquet files")
    args = ap.parse_args(argv)
    from balloonlab.analysis.formats import parse_formats
    try:
        formats = parse_formats(args.format)
    except ValueError as exc:
        ap.error(f"--format: {exc}")
    try:
        result = analyze_run(args.run_dir, report=not args.no_report, plots=not args.no_plots, formats=formats)
    except FileNotFoundError as exc:
        print(f"balloonlab-analyze: {exc}", file=sys.stderr)
        return 2
    exports = [(fmt, d) for fmt, d in (("csv", args.csv), ("parquet", args.parquet)) if d is not None]
    if exports:
        from balloonlab.analysis.tables import load_tables, export_tables
        tables = load_tables(args.run_dir)
        for fmt, out_dir in exports:
            written = export_tables(args.run_dir, out_dir, fmt, tables)
            print(f"tables: {', '.join(p.name for p in written)} in {out_dir}", file=sys.stderr)
    print(json.dumps(result.summary, indent=2) if args.json else format_table(result.summary))
    if result.plot_error:
        print(f"balloonlab-analyze: plots not drawn: {result.plot_error}", file=sys.stderr)
    print(where_message(args.run_dir, result.report_path, len(result.plots), formats[0]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
