"""A slow machine makes a run slower, never fail: the demo with every CPU saturated by hogs.

    python scripts/bench.py hog [--hogs N] [--scenario io-amplification] [--guests 4] [--duration S]
                                [--skip-baseline] [--keep] [--json FILE]

Runs the demo scenario twice as a user would (``balloonlab-launch ... --no-report``):
once on the machine as it is, once with ``--hogs`` busy-loop processes
(default 10 per CPU: 20 on this 2-vCPU machine, a load average near 25)
competing for the CPUs. Then it checks what the issue asks: every variant
of the loaded run completed, with the same counts as the unloaded one (each
guest's references, faults, swap and EPT counters, the host's swap traffic,
lost pages 0), only slower; and prints both wall times and the load
average seen. Exit status 0 when the counts agree, 1 otherwise.
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

__all__ = ["main", "compare_counts"]

REPO = Path(__file__).resolve().parent.parent
GUEST_KEYS = ("refs", "major_faults", "minor_faults", "swap_in", "swap_out", "file_reads", "file_writes",
              "ept_faults", "evictions", "lost_pages")
HOST_KEYS = ("swap_out_pages", "swap_in_pages", "ept_faults")


def _launch(args: argparse.Namespace, run_dir: Path) -> tuple[int, float, str]:
    argv = [sys.executable, "-m", "balloonlab.launch", "--scenario", args.scenario, "--run-dir", str(run_dir),
            "--no-report"]
    if args.guests is not None:
        argv += ["--guests", str(args.guests)]
    if args.duration is not None:
        argv += ["--duration", str(args.duration)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    return res.returncode, time.monotonic() - t0, res.stderr[-3000:]


def _counts(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {}
    for name, v in summary["variants"].items():
        out[name] = {"status": v.get("status"), "ticks": v.get("ticks"), "wall_s": v.get("wall_s"),
                     "host": {k: v["host"].get(k) for k in HOST_KEYS},
                     "guests": {g["id"]: {k: g.get(k) for k in GUEST_KEYS} for g in v["guests"]}}
    return out


def compare_counts(base: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """Every count that differs between the two runs (empty: the same counts)."""
    diffs = []
    for name in sorted(set(base) | set(loaded)):
        a, b = base.get(name), loaded.get(name)
        if a is None or b is None:
            diffs.append(f"{name}: only in one run")
            continue
        if b["status"] != "completed":
            diffs.append(f"{name}: status {b['status']} under load")
        for key in ("ticks",):
            if a[key] != b[key]:
                diffs.append(f"{name}: {key} {a[key]} vs {b[key]}")
        for key, x in a["host"].items():
            if x != b["host"].get(key):
                diffs.append(f"{name}: host {key} {x} vs {b['host'].get(key)}")
        for gid, ga in a["guests"].items():
            gb = b["guests"].get(gid, {})
            for key, x in ga.items():
                if x != gb.get(key):
                    diffs.append(f"{name}: guest {gid} {key} {x} vs {gb.get(key)}")
    return diffs


class Hogs:
    """N processes spinning on a CPU each; stopped (by their pids) however the benchmark ends."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                                       start_new_session=True) for _ in range(n)]

    def __enter__(self) -> "Hogs":
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py hog", description=__doc__.splitlines()[0])
    ap.add_argument("--hogs", type=int, default=10 * (os.cpu_count() or 2), help="busy-loop processes (10 per CPU)")
    ap.add_argument("--scenario", default="io-amplification")
    ap.add_argument("--guests", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="virtual seconds (default: the scenario's)")
    ap.add_argument("--skip-baseline", action="store_true", help="only the loaded run (no comparison)")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-hog-", dir=REPO / "runs" if (REPO / "runs").is_dir() else None))
    out: dict[str, Any] = {"scenario": args.scenario, "hogs": args.hogs, "cpus": os.cpu_count()}
    try:
        if not args.skip_baseline:
            rc, wall, err = _launch(args, tmp / "unloaded")
            out["unloaded"] = {"exit": rc, "wall_s": round(wall, 1), "load_before": _loadavg()}
            print(f"unloaded: exit {rc}, {wall:.1f} s wall", flush=True)
            if rc != 0:
                print(err, file=sys.stderr)
        with Hogs(args.hogs):
            time.sleep(5.0)   # let the load average see them
            load0 = _loadavg()
            rc, wall, err = _launch(args, tmp / "loaded")
            load1 = _loadavg()
        out["loaded"] = {"exit": rc, "wall_s": round(wall, 1), "load_at_start": load0, "load_at_end": load1}
        print(f"with {args.hogs} CPU hogs (load average {load0:.1f} at the start, {load1:.1f} at the end): "
              f"exit {rc}, {wall:.1f} s wall", flush=True)
        if rc != 0:
            print(err, file=sys.stderr)
        loaded = _counts(tmp / "loaded")
        out["loaded"]["variants"] = loaded
        ok = rc == 0 and all(v["status"] == "completed" for v in loaded.values())
        if not args.skip_baseline:
            base = _counts(tmp / "unloaded")
            out["unloaded"]["variants"] = base
            diffs = compare_counts(base, loaded)
            out["differences"] = diffs
            ok = ok and not diffs
            for name in loaded:
                print(f"[{name}] {base[name]['status']} in {base[name]['wall_s']} s -> {loaded[name]['status']} in "
                      f"{loaded[name]['wall_s']} s under load; refs "
                      f"{sum(g['refs'] or 0 for g in base[name]['guests'].values()):,} vs "
                      f"{sum(g['refs'] or 0 for g in loaded[name]['guests'].values()):,}")
            print("same counts: " + ("yes" if not diffs else f"NO ({len(diffs)} differ: {diffs[:5]})"))
            if out["unloaded"]["wall_s"]:
                print(f"slowdown {out['loaded']['wall_s'] / out['unloaded']['wall_s']:.1f}x wall")
        out["ok"] = ok
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"hog: {'OK' if ok else 'FAILED'}" + (f" (runs kept in {tmp})" if args.keep else ""))
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
