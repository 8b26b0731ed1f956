"""Benchmark: the analyzer on a synthetic run of about a million log lines.

    python scripts/bench.py analyze [--lines N] [--guests G] [--dir DIR] [--keep]

Writes a run directory shaped like a real one (host.jsonl with the host's
per-tick metrics and a per-guest table in each line, guest-<id>.jsonl with
each guest's kernel stats per tick, notable events sprinkled in, one
truncated line and one garbage line), then times ``balloonlab.analyze`` on it
end to end: reading, summary.json, report.md and the plots. Prints lines per
second and the time against the target (1M lines in under 10 s). A benchmark
prints numbers; it never fails on a slow machine.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balloonlab.proto import events as ev  # noqa: E402

__all__ = ["main", "write_synthetic_run"]

TARGET_LINES = 1_000_000
TARGET_S = 10.0

# The fields a real run logs (hostd HostMemory.snapshot(), guestd kernel stats), so lines have the real size.
HOST_KEYS = ("total_frames free_frames guest_frames cache_pages iobuf_pages busy_frames pinned_frames swap_slots "
             "swap_used_slots ept_fault_calls ept_faults ept_fault_spurious_pages swap_out_pages swap_out_cache_pages "
             "swap_in_pages swap_in_cache_pages reclaim_calls reclaim_frames direct_reclaims shootdowns "
             "shootdown_pages shootdown_failures dropped_evictions balloon_inflated_pages balloon_deflated_pages "
             "oom_refusals early_retired_iobuf_pages vdisk_read_requests vdisk_write_requests vdisk_read_pages "
             "vdisk_write_pages vdisk_cache_hit_pages vdisk_cache_miss_pages vdisk_cluster_loads "
             "vdisk_cluster_load_pages vdisk_double_faults vdisk_double_fault_wait_us vdisk_trimmed_pages "
             "vdisk_iobuf_retired_pages vdisk_backpressure_waits vdisk_backpressure_wait_us double_faults").split()
HOST_GUEST_KEYS = ("guest_pages resident_pages swapped_pages ballooned_pages unbacked_pages max_balloon_pages "
                   "cache_frame_pages cache_swapped_pages iobuf_pages inflight_requests pinned_blocks ept_fault_calls "
                   "ept_faults ept_fault_swapins swap_out_pages swap_in_pages shootdown_pages balloon_inflated_pages "
                   "balloon_deflated_pages vdisk_read_requests vdisk_write_requests vdisk_read_pages "
                   "vdisk_write_pages vdisk_cache_hit_pages vdisk_cache_miss_pages vdisk_cluster_loads "
                   "vdisk_cluster_load_pages vdisk_double_faults vdisk_double_fault_wait_us vdisk_trimmed_pages "
                   "vdisk_iobuf_retired_pages vdisk_backpressure_waits vdisk_backpressure_wait_us").split()
GUEST_KEYS = ("refs hits major_faults minor_faults swap_in swap_out file_reads file_writes writebacks evictions "
              "ept_faults ept_fault_calls invalidations lost_pages soft_reclaimed balloon_inflated balloon_deflated "
              "oom_calls refaults refault_reads refault_file_reads evicted_clean_file balloon_reclaimed "
              "balloon_reclaimed_clean_file host_took_pages host_took_clean_file host_refaults "
              "host_refaults_clean_file free total available caches anon_pages file_pages balloon_pages kernel_pages "
              "soft_cached_pages unbacked_pages swap_used swap_total pff pff_last working_set_pages "
              "working_set_fraction vt_us balloon_target_pages balloon_actual_pages balloon_inflated_pages "
              "balloon_deflated_pages balloon_oom_deflated_pages balloon_out_of_puff").split()
_STAMP = "2026-01-01T00:00:00.000000Z"
RAM_PAGES = 8192


def _template(obj: dict) -> str:
    """json.dumps of ``obj`` with every ``"@name"`` string turned into a ``%(name)s`` slot."""
    text = json.dumps(obj).replace("%", "%%")
    for k, v in obj.items():
        if isinstance(v, str) and v.startswith("@"):
            text = text.replace(json.dumps(v), f"%({v[1:]})s")
    return text


def write_synthetic_run(run_dir: Path, lines: int = TARGET_LINES, guests: int = 16, tick_us: int = 10_000,
                        every: int = 10) -> int:
    """Write a run directory of about ``lines`` log lines; return the exact count written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    periods = max(2, lines // (guests + 1))
    ticks = periods * every
    (run_dir / "host-config.json").write_text(json.dumps(
        {"scenario": "synthetic", "variant": "default", "seed": 1, "ticks": ticks, "tick_us": tick_us,
         "guests": guests, "balloon": {"policy": "working-set"}}))
    host_guest = {k: 0 for k in HOST_GUEST_KEYS}
    host_line = {"tick": "@tick", "vt_us": "@vt", "live_guests": guests,
                 "balloon_targets": {str(g): 0 for g in range(guests)},
                 **{k: 0 for k in HOST_KEYS}}
    host_line.update(free_frames="@free", swap_out_pages="@sout", swap_in_pages="@sin", iobuf_pages="@iobuf",
                     cache_pages="@cache")
    host_line["guests"] = {str(g): host_guest for g in range(guests)}
    host_line.update(event=ev.TICK_COMPLETED, proc="host", run_id="synthetic-1", level="info", timestamp=_STAMP)
    host_tpl = _template(host_line)
    guest_line = {k: 0 for k in GUEST_KEYS}
    guest_line.update(refs="@refs", major_faults="@maj", free="@free", anon_pages="@anon", file_pages="@file",
                      balloon_pages="@bal", pff="@pff", working_set_pages="@ws", vt_us="@vt",
                      balloon_target_pages="@bal", balloon_actual_pages="@bal", total=RAM_PAGES)
    guest_line.update(event=ev.TICK_COMPLETED, guest="@guest", proc="guest", tick="@tick", level="info",
                      timestamp=_STAMP)
    guest_tpl = _template(guest_line)
    written = 0
    with open(run_dir / "host.jsonl", "w") as h:
        h.write(json.dumps({"scenario": "synthetic", "variant": "default", "seed": 1, "guests": list(range(guests)),
                            "tick_us": tick_us, "ticks": ticks, "event": ev.RUN_STARTED, "proc": "host",
                            "level": "info", "timestamp": _STAMP}) + "\n")
        written += 1
        for p in range(periods):
            tick = (p + 1) * every - 1
            vt = (tick + 1) * tick_us
            if p % 50 == 0:  # a controller retargets now and then
                g = (p // 50) % guests
                h.write(json.dumps({"guest": g, "target_pages": 1000 + p % 2000, "previous_pages": 1000,
                                    "event": ev.BALLOON_TARGET_SET, "proc": "host", "tick": tick, "vt_us": vt,
                                    "level": "info", "timestamp": _STAMP}) + "\n")
                written += 1
            h.write(host_tpl % {"tick": tick, "vt": vt, "free": 1000 + int(500 * math.sin(p / 40)),
                                "sout": 7 * p, "sin": 5 * p, "iobuf": p % 300, "cache": 200 + p % 100} + "\n")
            written += 1
        h.write(json.dumps({"ticks": ticks, "vt_us": ticks * tick_us, "wall_s": 1.0, "reason": "completed",
                            "guests_lost": {}, "memory": {"swap_out_pages": 7 * periods}, "ram_pages": 65536,
                            "event": ev.RUN_FINISHED, "proc": "host", "level": "info",
                            "timestamp": _STAMP}) + "\n")
        written += 1
    for g in range(guests):
        with open(run_dir / f"guest-{g}.jsonl", "w") as f:
            f.write(json.dumps({"guest": g, "pid": 1000 + g, "ram_pages": RAM_PAGES, "event": ev.GUEST_STARTED,
                                "proc": "guest", "level": "info", "timestamp": _STAMP}) + "\n")
            written += 1
            rows = []
            for p in range(periods):
                tick = (p + 1) * every - 1
                bal = 1000 + (p * 7) % 2000
                rows.append(guest_tpl % {
                    "refs": 10_000 * (tick + 1), "maj": 3 * p, "free": 300, "anon": 2000 + p % 500,
                    "file": RAM_PAGES - 2556 - bal - p % 500, "bal": bal, "pff": 100.0 + p % 50,
                    "ws": 3000 + p % 700, "vt": (tick + 1) * tick_us + 12.5, "guest": g, "tick": tick})
            f.write("\n".join(rows) + "\n")
            written += periods
            if g == 0:  # a process killed mid-write, and a stray line
                f.write(rows[-1][: len(rows[-1]) // 2] + "\n" + "garbage\n")
                written += 2
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py analyze", description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=TARGET_LINES, help=f"log lines to write (default {TARGET_LINES})")
    ap.add_argument("--guests", type=int, default=16, help="guest logs (default 16)")
    ap.add_argument("--dir", type=Path, help="where to write the run (default a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic run directory")
    args = ap.parse_args(argv)
    if args.lines < 100 or args.guests < 1:
        ap.error(f"--lines must be >= 100 and --guests >= 1, got {args.lines}, {args.guests}")
    from balloonlab.analyze import analyze_run

    base = args.dir or Path(tempfile.mkdtemp(prefix="balloonlab-bench-analyze-", dir="/tmp"))
    run_dir = base / "run"
    try:
        t0 = time.perf_counter()
        n = write_synthetic_run(run_dir, args.lines, args.guests)
        size_mb = sum(p.stat().st_size for p in run_dir.glob("*.jsonl")) / 1e6
        print(f"wrote {n} lines ({size_mb:.0f} MB, {args.guests} guests) in {time.perf_counter() - t0:.1f} s: "
              f"{run_dir}")
        t0, c0 = time.perf_counter(), time.process_time()
        result = analyze_run(run_dir, quiet=True)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"analyzed in {dt:.2f} s wall, {cpu:.2f} s CPU (read {result.timings.get('read_s', 0):.2f} s, "
              f"summary {result.timings.get('summary_s', 0):.2f} s, "
              f"report+plots {result.timings.get('report_s', 0):.2f} s); "
              f"{result.summary.get('bad_log_lines', 0)} malformed line(s) skipped")
        read = result.timings.get("read_s", 0) + result.timings.get("summary_s", 0)
        for what, secs in (("reading + summary", read), ("end to end (+ report and plots)", dt),
                           ("end to end, CPU time", cpu)):
            rate = n / secs if secs > 0 else float("inf")
            line = f"{what}: {secs:.2f} s, {rate:,.0f} lines/s"
            if n >= 0.9 * TARGET_LINES:   # fixed costs (plots) make a smaller run's ratio meaningless
                scaled = secs * TARGET_LINES / n
                line += (f"; {scaled / TARGET_S:.2f} x the {TARGET_S:.0f} s target for 1M lines "
                         f"({'met' if scaled < TARGET_S else 'NOT met'})")
            print(line)
        if n < 0.9 * TARGET_LINES:
            print(f"(the {TARGET_S:.0f} s target is for 1M lines: run with the default --lines to compare)")
        print("(wall times grow with other load on the machine; CPU time does not)")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
