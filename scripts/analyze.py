"""Analyse a run directory: print the summary table, write summary.json.

    scripts/analyze.py RUN_DIR [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.analysis.summary import format_table, summarize, write_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="balloonlab-analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    args = ap.parse_args(argv)
    try:
        summary = summarize(args.run_dir)
    except FileNotFoundError as exc:
        print(f"balloonlab-analyze: {exc}", file=sys.stderr)
        return 2
    write_summary(args.run_dir, summary)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
