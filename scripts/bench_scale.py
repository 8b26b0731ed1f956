"""Scale: host + N mostly idle guests for T ticks, guests from the fork server and one interpreter each.

    python scripts/bench.py scale [--guests 4,16,64,256] [--ticks 100] [--modes fork,exec]
                                  [--exec-max-guests N] [--json FILE] [--anchor DIR [--anchor-guests 64]]

For each guest count (the scaling curve) and each way of starting guests
(``--guest-start fork``: forked from the fork server; ``exec``: one
``python -m balloonlab.guestd`` each), the launcher runs ``scenarios/scale.toml``
and this prints: wall time, virtual seconds per wall second, wall seconds
per virtual second, the host's CPU seconds, each guest's private memory
(``Private_Clean + Private_Dirty`` of ``/proc/PID/smaps_rollup``, its peak
over the run) and the total memory of the run (the sum of every process's
PSS, shared pages divided among their sharers, at its peak), lost pages;
then exec/fork ratios per guest count, the curve as a table (wall seconds
per virtual second per guest count and mode, with its growth from the
count before), and with ``--anchor DIR`` the fork-mode wall time of
another checkout (its own ``.venv``) at ``--anchor-guests`` counts, run
first in the same benchmark run, as a ratio (an anchor from before the
package layout, e.g. an export of bf5efbc, runs its ``scripts/launch.py``
and starts its guests as it did then). Targets: 256 guests run the
ticks with lost pages 0; guest private memory under 20 MiB each; 64
guests >= 10x the original code's speed.

``exec`` at a guest count whose estimated memory does not fit in what the
machine has available is skipped and says so (``--exec-max-guests`` caps it
by hand). The open-files limit is raised to its hard limit first (the host
holds one socket per guest).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from scripts.bench_checkout import launcher_argv, launcher_source, precompile, process_role

REPO = Path(__file__).resolve().parent.parent

__all__ = ["main", "run_one"]

EXEC_GUEST_MIB_ESTIMATE = 48.0   # RSS of an exec'd idle guest (measured: 46-50 MiB)


def _run_procs(run_dir: str, others: set[int], known: dict[int, str]) -> dict[int, str]:
    """pid -> role of the live processes whose command line names ``run_dir``; the rest go into ``others``.

    A child the fork server forked a moment ago still shows the server's command line: a
    "forkserver" is read again each time, hosts and guests are not.
    """
    out = {}
    entries = [e for e in os.listdir("/proc") if e.isdigit()]
    others.intersection_update(int(e) for e in entries)   # a pid gone may come back as one of ours
    for entry in entries:
        if int(entry) not in others and known.get(int(entry), "forkserver") == "forkserver":
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if run_dir not in cmd:
                others.add(int(entry))
                continue
            # the launcher, or a child of it not yet exec'd as a host or guest: read again next time
            role = process_role(cmd)
            if role is not None:
                out[int(entry)] = role
    return out


def _smaps_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[-1] == "kB":
                out[key] = int(parts[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        pass
    return out


def _cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Sampler:
    """Peaks per process over a run: private and PSS memory from smaps_rollup, the host's CPU."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.roles: dict[int, str] = {}
        self.others: set[int] = set()     # pids seen not to be this run's: not read again
        self.private_kib: dict[int, int] = {}
        self.pss_kib: dict[int, int] = {}
        self.rss_kib: dict[int, int] = {}
        self.total_pss_kib = 0
        self.host_cpu_s = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        last_scan = 0.0
        while not self.done.is_set():
            now = time.monotonic()
            # Reading every process's smaps_rollup is not free with hundreds of guests; a small run
            # may be over in two seconds, so it is read four times a second until there are many.
            if now - last_scan >= (0.25 if len(self.roles) < 32 else 1.0):
                self.roles.update(_run_procs(self.run_dir, self.others, self.roles))
                total = 0
                for pid, role in list(self.roles.items()):
                    m = _smaps_kib(pid)
                    if not m:
                        continue
                    priv = m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
                    self.private_kib[pid] = max(priv, self.private_kib.get(pid, 0))
                    self.pss_kib[pid] = max(m.get("Pss", 0), self.pss_kib.get(pid, 0))
                    self.rss_kib[pid] = max(m.get("Rss", 0), self.rss_kib.get(pid, 0))
                    total += m.get("Pss", 0)
                self.total_pss_kib = max(self.total_pss_kib, total)
                last_scan = time.monotonic()
            for pid, role in list(self.roles.items()):
                if role == "host":
                    cpu = _cpu_s(pid)
                    if cpu is not None:
                        self.host_cpu_s = max(self.host_cpu_s, cpu)
            self.done.wait(0.2)

    def of(self, role: str, table: dict[int, int]) -> list[int]:
        return sorted(v for pid, v in table.items() if self.roles.get(pid) == role)


def run_one(guests: int, ticks: int, mode: str, scenario: str = "scale", timeout_s: float = 1800.0,
            repo: Path = REPO) -> dict[str, Any]:
    """One launcher run from checkout ``repo`` (its own ``.venv`` unless it is this one); its numbers."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-scale-{mode}-{guests}-", dir="/tmp"))
    python = sys.executable if repo == REPO else str(repo / ".venv" / "bin" / "python")
    cmd = [*launcher_argv(repo, python), "--scenario", scenario, "--guests", str(guests),
           "--ticks", str(ticks), "--run-dir", str(run_dir), "--no-report"]
    if repo == REPO or "--guest-start" in launcher_source(repo).read_text():
        cmd += ["--guest-start", mode]   # (an anchor from before the fork server exec's its guests)
    sampler = _Sampler(str(run_dir))
    load0 = os.getloadavg()[0]
    wall0 = time.monotonic()
    sampler.thread.start()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(repo)),
                              capture_output=True, text=True, timeout=timeout_s)
    finally:
        wall = time.monotonic() - wall0
        sampler.done.set()
        sampler.thread.join()
    summary: dict[str, Any] = {}
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, ValueError):
        pass
    v = next(iter(summary.get("variants", {}).values()), {})
    priv = sampler.of("guest", sampler.private_kib)
    pss = sampler.of("guest", sampler.pss_kib)
    rss = sampler.of("guest", sampler.rss_kib)
    vs = float(v.get("virtual_s") or 0.0)
    res = {
        "guests": guests, "ticks": ticks, "mode": mode, "exit": proc.returncode, "wall_s": round(wall, 2),
        "ticks_done": v.get("ticks"), "virtual_s": vs, "status": v.get("status"),
        "vs_per_wall_s": round(vs / wall, 4) if wall else None,
        "wall_s_per_vs": round(wall / vs, 1) if vs else None,
        "host_cpu_s": round(sampler.host_cpu_s, 2),
        "guests_sampled": len(priv),
        "guest_private_mib": {"max": _mib(priv[-1]) if priv else None, "median": _mib(priv[len(priv) // 2]) if priv else None,
                              "min": _mib(priv[0]) if priv else None},
        "guest_pss_mib_median": _mib(pss[len(pss) // 2]) if pss else None,
        "guest_rss_mib_median": _mib(rss[len(rss) // 2]) if rss else None,
        "host_private_mib": _mib(max(sampler.of("host", sampler.private_kib), default=0)),
        "forkserver_private_mib": _mib(max(sampler.of("forkserver", sampler.private_kib), default=0)),
        "total_pss_mib": _mib(sampler.total_pss_kib),
        "lost_pages": v.get("lost_pages"), "guests_lost": v.get("guests_lost"),
        "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2),
        "run_dir": str(run_dir),
    }
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-3000:]
    return res


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def _raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _print_row(r: dict[str, Any]) -> None:
    gp = r["guest_private_mib"]
    print(f"  {r['guests']:>4} {r['mode']:<5} {r['wall_s']:>7.1f} s  {r['ticks_done']!s:>4} ticks  "
          f"{r['vs_per_wall_s'] or 0:>6.4f} vs/wall-s  {r['wall_s_per_vs'] or 0:>7.1f} wall-s/vs  host CPU "
          f"{r['host_cpu_s']:>6.1f} s  guest private {gp['median']!s:>5} MiB (max {gp['max']})  "
          f"PSS {r['guest_pss_mib_median']!s:>5}  total {r['total_pss_mib']:>7.1f} MiB  lost {r['lost_pages']}  "
          f"{r['status']}  load {r['load_avg_start']}->{r['load_avg_end']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py scale", description=__doc__.splitlines()[0])
    ap.add_argument("--guests", default="4,16,64,256", help="guest counts of the curve (comma-separated)")
    ap.add_argument("--ticks", type=int, default=100)
    ap.add_argument("--modes", default="fork,exec", help="fork, exec or both (comma-separated)")
    ap.add_argument("--exec-max-guests", type=int, default=None,
                    help="skip exec above this many guests (default: what fits in MemAvailable)")
    ap.add_argument("--scenario", default="scale")
    ap.add_argument("--timeout", type=float, default=1800.0, help="wall seconds per run before giving up")
    ap.add_argument("--json", type=Path, default=None, help="write every row here")
    ap.add_argument("--anchor", type=Path, default=None,
                    help="another checkout (with its own .venv, e.g. an export of the code before a change): each "
                         "fork-mode run of --anchor-guests runs there first, and the wall times are compared")
    ap.add_argument("--anchor-guests", default="64", help="guest counts the anchor runs (comma-separated; default 64)")
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.guests.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--guests: expected counts like 4,16,64, got {args.guests!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("fork", "exec")]
    if bad or not modes:
        ap.error(f"--modes: expected fork and/or exec, got {args.modes!r}")
    if not counts or min(counts) < 1:
        ap.error(f"--guests: expected counts >= 1, got {args.guests!r}")
    nofile = _raise_nofile()
    print(f"scale: {', '.join(map(str, counts))} guests x {args.ticks} ticks, modes {', '.join(modes)}; "
          f"open files limit {nofile[0]}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    rows: list[dict[str, Any]] = []
    anchors: dict[int, dict[str, Any]] = {}
    anchor_counts = {int(x) for x in args.anchor_guests.split(",") if x.strip()} if args.anchor else set()
    precompile(REPO, sys.executable)
    if args.anchor:
        precompile(args.anchor.resolve(), args.anchor.resolve() / ".venv" / "bin" / "python")
    status = 0
    for n in counts:
        if n in anchor_counts:
            a = run_one(n, args.ticks, "fork", args.scenario, args.timeout, args.anchor.resolve())
            anchors[n] = a
            print(f"  anchor {args.anchor} (its own guest start):", end="")
            _print_row(a)
        for mode in modes:
            if mode == "exec":
                cap = args.exec_max_guests
                need = n * EXEC_GUEST_MIB_ESTIMATE * 1.5
                if (cap is not None and n > cap) or (cap is None and need > _mem_available_mib()):
                    print(f"  {n:>4} exec  skipped: about {need / 1024:.1f} GiB needed, "
                          f"{_mem_available_mib() / 1024:.1f} GiB available" +
                          (f" (--exec-max-guests {cap})" if cap is not None else ""), flush=True)
                    continue
            r = run_one(n, args.ticks, mode, args.scenario, args.timeout)
            rows.append(r)
            _print_row(r)
            if r["exit"] != 0 or r["lost_pages"] not in (0, None) or r["ticks_done"] != args.ticks:
                status = 1
                print(r.get("stderr_tail", ""), file=sys.stderr)
    by = {(r["guests"], r["mode"]): r for r in rows}
    ratios = []
    for n in counts:
        f, e = by.get((n, "fork")), by.get((n, "exec"))
        if f and e and f["wall_s"] and f["guest_private_mib"]["median"] and f["total_pss_mib"]:
            ratio = {"guests": n, "wall_exec_over_fork": round(e["wall_s"] / f["wall_s"], 2),
                     "private_exec_over_fork": round(e["guest_private_mib"]["median"] / f["guest_private_mib"]["median"], 2),
                     "total_exec_over_fork": round(e["total_pss_mib"] / f["total_pss_mib"], 2),
                     "host_cpu_exec_over_fork": round(e["host_cpu_s"] / f["host_cpu_s"], 2) if f["host_cpu_s"] else None}
            ratios.append(ratio)
            print(f"  {n:>4} exec/fork: wall {ratio['wall_exec_over_fork']}x, guest private "
                  f"{ratio['private_exec_over_fork']}x, total memory {ratio['total_exec_over_fork']}x, host CPU "
                  f"{ratio['host_cpu_exec_over_fork']}x")
    for n, a in sorted(anchors.items()):
        f = by.get((n, "fork"))
        if f and f["wall_s"] and a["wall_s"]:
            print(f"  {n:>4} guests, fork: wall {f['wall_s']:.1f} s here vs {a['wall_s']:.1f} s for the anchor: "
                  f"{a['wall_s'] / f['wall_s']:.2f}x faster; host CPU {f['host_cpu_s']:.1f} s vs {a['host_cpu_s']:.1f} s")
    print("  the curve: wall seconds per virtual second (and its growth per step) by guest count")
    print("  " + "guests".rjust(6) + "".join(m.rjust(16) for m in modes))
    for n in counts:
        cells = []
        for mode in modes:
            r = by.get((n, mode))
            prev = [x for x in rows if x["mode"] == mode and x["guests"] < n and x["wall_s_per_vs"]]
            if r is None or not r["wall_s_per_vs"]:
                cells.append("-".rjust(16))
                continue
            grow = f" ({r['wall_s_per_vs'] / prev[-1]['wall_s_per_vs']:.1f}x)" if prev else ""
            cells.append(f"{r['wall_s_per_vs']:.1f}{grow}".rjust(16))
        print("  " + str(n).rjust(6) + "".join(cells))
    for mode in modes:
        curve = [r for r in rows if r["mode"] == mode and r["wall_s_per_vs"]]
        if len(curve) > 1:
            steps = ", ".join(f"{a['guests']}->{b['guests']}: {b['wall_s_per_vs'] / a['wall_s_per_vs']:.2f}x"
                              for a, b in zip(curve, curve[1:]))
            per_guest = ", ".join(f"{r['guests']}: {r['wall_s_per_vs'] / r['guests']:.2f}" for r in curve)
            print(f"  {mode}: wall s per virtual s grows {steps}; per guest {per_guest}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios,
                                         "anchor": {str(n): a for n, a in anchors.items()}}, indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
