"""The io-amplification demo as a benchmark: wall time per variant and the headline numbers.

    python scripts/bench.py ioamp [--guests 4] [--seed S] [--duration S] [--keep] [--json FILE] [--anchor DIR]

Runs ``scripts/launch.py --scenario io-amplification`` exactly as a user
would (real host and guest processes; ``--no-report``), then reads its
``summary.json``. Prints, per variant: wall seconds, virtual seconds per
wall second, references per virtual second, I/O per reclaimed page, the
clean-cache writes and reads per page, host swap traffic and lost pages;
then the total wall time against the 60 s target of issue #4 and the
ballooning / host-swap throughput ratio.

``--anchor DIR`` also runs the same command in another checkout of the
project (with its own ``DIR/.venv``, e.g. an export of main before a
change), first, in the same benchmark run, and prints this checkout's
virtual seconds per wall second as a ratio of the anchor's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "TARGET_S"]

TARGET_S = 60.0                  # issue #4: the 4-guest demo in under 60 s of wall time
REPO = Path(__file__).resolve().parent.parent

_COLUMNS = [
    ("wall_s", "wall s", "{:.1f}"),
    ("vs_per_ws", "virt s/wall s", "{:.3f}"),
    ("refs_per_vsec", "refs/virt s", "{:,.0f}"),
    ("io_per_reclaimed_page", "I/O per reclaimed", "{:.3f}"),
    ("clean_cache_writes_per_page", "clean writes/page", "{:.3f}"),
    ("clean_cache_reads_per_page", "clean reads/page", "{:.3f}"),
    ("swap_out_pages", "host swap out", "{:,}"),
    ("swap_in_pages", "host swap in", "{:,}"),
    ("lost_pages", "lost pages", "{}"),
]


def _row(v: dict[str, Any]) -> dict[str, Any]:
    wall = float(v.get("wall_s") or 0.0)
    return {
        "wall_s": wall,
        "virtual_s": v["virtual_s"],
        "vs_per_ws": v["virtual_s"] / wall if wall > 0 else 0.0,
        "refs_per_vsec": v.get("refs_per_vsec", 0.0),
        "io_per_reclaimed_page": v.get("io_per_reclaimed_page", 0.0),
        "clean_cache_writes_per_page": v.get("clean_cache_writes_per_page", 0.0),
        "clean_cache_reads_per_page": v.get("clean_cache_reads_per_page", 0.0),
        "swap_out_pages": int(v["host"].get("swap_out_pages", 0)),
        "swap_in_pages": int(v["host"].get("swap_in_pages", 0)),
        "lost_pages": int(v.get("lost_pages", 0)),
        "reason": v.get("reason"),
    }


def _launch(args: argparse.Namespace, repo: Path, python: Path) -> tuple[float, dict[str, Any], Path] | None:
    """One launcher run of the scenario from checkout ``repo``: (wall s, summary.json, run dir) or None."""
    run_dir = Path(tempfile.mkdtemp(prefix="bl-ioamp-", dir="/tmp")) / "run"
    cmd = [str(python), "-m", "balloonlab.launch", "--scenario", args.scenario, "--guests", str(args.guests),
           "--run-dir", str(run_dir), "--no-report"]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    if args.duration is not None:
        cmd += ["--duration", str(args.duration)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(repo))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        total_s = time.monotonic() - t0
        if proc.returncode != 0:
            print(f"the launcher ({repo}) exited with {proc.returncode}:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return None
        return total_s, json.loads((run_dir / "summary.json").read_text()), run_dir
    finally:
        if not args.keep:
            shutil.rmtree(run_dir.parent, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py ioamp", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--scenario", default="io-amplification", help="scenario name or file (default io-amplification)")
    ap.add_argument("--guests", type=int, default=4, help="guests (default 4, the demo's)")
    ap.add_argument("--seed", type=int, help="seed (default: the scenario's)")
    ap.add_argument("--duration", type=float, help="virtual seconds (default: the scenario's)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory and print where it is")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--anchor", type=Path, help="another checkout (with its .venv) to run first and compare against")
    args = ap.parse_args(argv)

    anchor_vs = None
    if args.anchor is not None:
        got = _launch(args, args.anchor.resolve(), args.anchor.resolve() / ".venv" / "bin" / "python")
        if got is None:
            return 1
        a_total, a_summary, _ = got
        a_rows = {name: _row(v) for name, v in a_summary["variants"].items()}
        anchor_vs = sum(r["virtual_s"] for r in a_rows.values()) / a_total
        print(f"anchor {args.anchor}: total wall {a_total:.1f} s, {anchor_vs:.3f} virtual s per wall s; per variant "
              + ", ".join(f"{n} {r['wall_s']:.1f} s ({r['vs_per_ws']:.3f} virt s/wall s)" for n, r in a_rows.items()))
    got = _launch(args, REPO, Path(sys.executable))
    if got is None:
        return 1
    total_s, summary, run_dir = got

    rows = {name: _row(v) for name, v in summary["variants"].items()}
    print(f"io-amplification benchmark: scenario {summary['scenario']}, seed {summary['seed']}, "
          f"{args.guests} guests, real processes")
    width = max(len(n) for n in rows) + 2
    heads = [h for _, h, _ in _COLUMNS]
    colw = [max(len(h), 10) for h in heads]
    print(" " * width + "  ".join(h.rjust(w) for h, w in zip(heads, colw)))
    for name, r in rows.items():
        cells = [fmt.format(r[key]) for key, _, fmt in _COLUMNS]
        print(name.ljust(width) + "  ".join(c.rjust(w) for c, w in zip(cells, colw)))
    virtual = sum(r["virtual_s"] for r in rows.values())
    print(f"total wall {total_s:.1f} s (launcher start to exit, every variant); target < {TARGET_S:g} s: "
          f"{total_s / TARGET_S:.2f}x of the target; {virtual / total_s:.3f} virtual s per wall s overall")
    if anchor_vs:
        print(f"virtual s per wall s: {virtual / total_s:.3f} here vs {anchor_vs:.3f} for the anchor: "
              f"{virtual / total_s / anchor_vs:.2f}x")
    if "ballooning" in rows and "host-swap" in rows and rows["host-swap"]["refs_per_vsec"]:
        ratio = rows["ballooning"]["refs_per_vsec"] / rows["host-swap"]["refs_per_vsec"]
        print(f"throughput ballooning / host-swap: {ratio:.3f}")
    if args.keep:
        print(f"run directory: {run_dir}")
    if args.json:
        args.json.write_text(json.dumps({"total_wall_s": total_s, "target_s": TARGET_S, "guests": args.guests,
                                         "seed": summary["seed"], "variants": rows}, indent=1))
    bad = [n for n, r in rows.items() if r["lost_pages"] or r["reason"] != "completed"]
    if bad:
        print(f"variants with lost pages or not completed: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
