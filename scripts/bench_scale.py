"""Scale check: host + N guests (default 64) handshake and run T ticks.

Prints the wall time, virtual seconds per wall second, and the peak resident
memory (VmHWM) of the host and of each guest process, sampled from /proc
while the run goes on. Target (issue #2): 64 guests, 100 ticks, each idle
guest under 60 MB RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

__all__ = ["main"]


def _peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _procs_with(text: str) -> dict[int, str]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if text in cmd and ("-m balloonlab.hostd" in cmd or "-m balloonlab.guestd" in cmd):
                out[int(entry)] = "host" if "-m balloonlab.hostd" in cmd else "guest"
    return out


def _run_once(args: argparse.Namespace, repo: Path, python: Path, label: str) -> tuple[int, float, float]:
    """One launcher run from checkout ``repo``; prints its numbers; returns (exit code, wall s, virtual s)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-scale-", dir="/tmp"))
    cmd = [str(python), "-m", "balloonlab.launch", "--scenario", args.scenario, "--guests", str(args.guests),
           "--ticks", str(args.ticks), "--run-dir", str(run_dir), "--no-report"]
    peaks: dict[int, tuple[str, int]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid, role in _procs_with(str(run_dir)).items():
                kib = _peak_kib(pid)
                if kib is not None:
                    peaks[pid] = (role, max(kib, peaks.get(pid, (role, 0))[1]))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    wall0 = time.monotonic()
    sampler.start()
    proc = subprocess.run(cmd, cwd=repo, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=args.timeout)
    wall = time.monotonic() - wall0
    done.set()
    sampler.join()
    guests = sorted(k for role, k in peaks.values() if role == "guest")
    hosts = [k for role, k in peaks.values() if role == "host"]
    summary = {}
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, ValueError):
        pass
    v = next(iter(summary.get("variants", {}).values()), {})
    virtual_s = float(v.get("virtual_s", 0) or 0)
    print(f"scale{label}: {args.guests} guests x {args.ticks} ticks, launcher exit {proc.returncode}")
    print(f"  wall time              {wall:8.1f} s")
    print(f"  ticks completed        {v.get('ticks', '?')}   virtual {virtual_s:.2f} s  "
          f"({virtual_s / wall:.3f} virtual s per wall s)")
    if v.get("request_order"):
        print(f"  request order          {v['request_order']}")
    if guests:
        print(f"  guest peak RSS (MiB)   max {guests[-1] / 1024:.1f}  median {guests[len(guests) // 2] / 1024:.1f}  "
              f"min {guests[0] / 1024:.1f}  over {len(guests)} guests (target < 60 MB)")
    if hosts:
        print(f"  host peak RSS (MiB)    {max(hosts) / 1024:.1f}")
    print(f"  lost pages             {v.get('lost_pages', '?')}   guests lost {v.get('guests_lost', '?')}")
    print(f"  run directory          {run_dir}")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode, wall, virtual_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py scale", description=__doc__)
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--ticks", type=int, default=100)
    ap.add_argument("--scenario", default="scale")
    ap.add_argument("--timeout", type=float, default=900.0, help="wall seconds before giving up")
    ap.add_argument("--anchor", type=Path,
                    help="another checkout (with its .venv) to run first, in the same benchmark run, and compare against")
    args = ap.parse_args(argv)
    anchor = None
    if args.anchor is not None:
        a = args.anchor.resolve()
        rc, wall, virtual_s = _run_once(args, a, a / ".venv" / "bin" / "python", f" (anchor {a})")
        if rc != 0:
            return rc
        anchor = virtual_s / wall
    rc, wall, virtual_s = _run_once(args, REPO, Path(sys.executable), "")
    if anchor and rc == 0:
        print(f"virtual s per wall s: {virtual_s / wall:.3f} here vs {anchor:.3f} for the anchor: "
              f"{virtual_s / wall / anchor:.2f}x")
    return rc


if __name__ == "__main__":
    sys.exit(main())
