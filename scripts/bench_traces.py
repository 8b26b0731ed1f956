"""Benchmark of the guest kernel path on real programs' traces, against libCacheSim's Clock.

Called as ``scripts/bench.py traces [options]`` (``main(argv)``). A
benchmark, not a test: it prints numbers, never fails on a slow run.

For each traced program (``guestd.workload.programs``: sqlite3, sort, CPython
json; recorded once under valgrind lackey into ``--cache-dir``, default
``~/.cache/balloonlab/traces``, and reused), each ``--command`` (any program:
recorded the same way, references ``--skip-refs`` to ``--skip-refs +
--max-refs`` kept, cached by its command line) and each ``--trace`` (a trace
recorded elsewhere: a lackey log as ``valgrind --tool=lackey --trace-mem=yes
--log-file=F PROG`` writes it, or a ``.npz`` / text trace as
``guestd.workload.trace`` reads them), the page sequence is made dense
and run at two frame counts, chosen so that libCacheSim's Clock misses about
``--targets`` (2 % and 10 %) of the references:

- ``libcachesim``: libCacheSim's Clock (``pip install libcachesim``; its C
  loop over an oracleGeneral binary trace, ``Clock.process_trace``): the anchor;
- ``kernel``: ``GuestKernel.access`` in ``--batch``-reference batches with the
  in-process disk and hypervisor (the vCPU's path), policies ``clock`` and
  ``esc``, compiled engine (``--engine``);
- ``fastsim``: the offline simulator (``guestd.fastsim``), its sort included.

Each is the best of ``--repeat`` runs, measured in the same process, one
after another; the ratio printed is kernel refs/s over libCacheSim's. The
kernel's ``clock-r0`` (pages enter with R=0, libCacheSim's Clock) is run
once per frame count and its fault count must equal libCacheSim's misses.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

__all__ = ["main", "write_oracle_general", "libcachesim_clock", "kernel_run", "pick_frames"]

_LACKEY_LINE = re.compile(rb"^(==\d+==|I  [0-9A-Fa-f]+,\d+| [LSM] [0-9A-Fa-f]+,\d+)", re.MULTILINE)
_ORACLE = np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])


def write_oracle_general(dense: np.ndarray, path: Path) -> Path:
    """The page sequence as libCacheSim's oracleGeneral binary trace (every object 1 byte, ids from 1)."""
    if path.exists() and path.stat().st_size == dense.size * _ORACLE.itemsize:
        return path
    rec = np.zeros(dense.size, _ORACLE)
    rec["t"] = np.arange(dense.size) // 1000 + 1
    rec["id"] = dense.astype(np.uint64) + 1
    rec["size"] = 1
    rec["next"] = -1
    tmp = path.with_suffix(".tmp")
    rec.tofile(tmp)
    tmp.replace(path)
    return path


def libcachesim_clock(lcs: Any, path: Path, frames: int) -> tuple[float, float]:
    """(wall s, miss ratio) of one libCacheSim Clock run over the whole trace."""
    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    cache = lcs.Clock(cache_size=frames)
    t0 = time.perf_counter()
    miss, _ = cache.process_trace(reader)
    return time.perf_counter() - t0, float(miss)


def kernel_run(policy: str, frames: int, dense: np.ndarray, writes: np.ndarray, batch: int,
               engine: str | None = None) -> tuple[float, int]:
    """(wall s, faults) of ``GuestKernel.access`` over the trace in batches, local disk and hypervisor."""
    from balloonlab.proto.costs import CostModel
    from balloonlab.guestd.blockdev import LocalBlockDevice
    from balloonlab.guestd.hypervisor import NullHypervisor
    from balloonlab.guestd.kernel import GuestKernel
    from balloonlab.guestd.kernel_config import KernelConfig
    from balloonlab.guestd.workload import Layout
    cfg = KernelConfig(ram_pages=frames, layout=Layout.single_anon(int(dense.max()) + 1), policy=policy)
    k = GuestKernel(cfg, np.random.default_rng(0), LocalBlockDevice(cfg.disk_blocks), NullHypervisor(), CostModel(),
                    engine=engine)

    async def run() -> float:
        t0 = time.perf_counter()
        for i in range(0, dense.size, batch):
            await k.access(dense[i:i + batch], writes[i:i + batch])
        return time.perf_counter() - t0

    secs = asyncio.run(run())
    if k.counters.lost_pages:
        raise RuntimeError(f"kernel lost {k.counters.lost_pages} pages")
    return secs, k.counters.major_faults + k.counters.minor_faults


def pick_frames(miss_at: Callable[[int], float], n_pages: int, target: float) -> tuple[int, float]:
    """The frame count whose miss ratio is closest to ``target`` on a binary search (miss ratio falls with frames)."""
    lo, hi = 1, max(1, n_pages)
    best = (hi, miss_at(hi))
    seen = {hi: best[1]}
    while lo <= hi:
        mid = (lo + hi) // 2
        m = seen.get(mid)
        if m is None:
            m = seen[mid] = miss_at(mid)
        if abs(m - target) < abs(best[1] - target):
            best = (mid, m)
        if m > target:
            lo = mid + 1
        else:
            hi = mid - 1
    return best


def is_lackey_log(path: Path) -> bool:
    """Whether ``path`` looks like lackey's own output (its ``==PID==`` banner or its reference lines)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return not head.startswith(b"PK") and _LACKEY_LINE.search(head) is not None


def load_trace_file(path: Path, cache_dir: Path, skip_refs: int, max_refs: int | None) -> Path:
    """A ``--trace`` as an ``.npz`` the bench can load: a lackey log is converted once (cached by its path,
    size and modification time, and the window); any other trace is read as ``guestd.workload.trace`` reads it."""
    from balloonlab.guestd.workload.lackey import convert_lackey_log
    from balloonlab.guestd.workload.trace import read_trace, write_npz_trace
    if not path.is_file():
        raise SystemExit(f"bench traces: --trace {path}: no such file")
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, skip_refs, max_refs]).encode())
    out = cache_dir / f"trace-{path.stem}-{key.hexdigest()[:12]}.npz"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    if is_lackey_log(path):
        convert_lackey_log(path, tmp, max_refs=max_refs, skip_refs=skip_refs)
    else:
        pages, writes = read_trace(path)
        end = None if max_refs is None else skip_refs + max_refs
        write_npz_trace(tmp, pages[skip_refs:end], writes[skip_refs:end])
    tmp.replace(out)
    return out


def record_command(command: str, cache_dir: Path, skip_refs: int, max_refs: int | None) -> Path:
    """A ``--command`` recorded under lackey once (cached by the command line and the window)."""
    from balloonlab.guestd.workload.lackey import record_lackey
    argv = shlex.split(command)
    if not argv:
        raise SystemExit("bench traces: --command: empty command")
    key = hashlib.sha256(json.dumps([argv, skip_refs, max_refs, "v1"]).encode()).hexdigest()[:12]
    out = cache_dir / f"cmd-{Path(argv[0]).name}-{key}.npz"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    record_lackey(argv, tmp, max_refs=max_refs, skip_refs=skip_refs)
    tmp.replace(out)
    return out


def _best(fn: Callable[[], tuple[float, Any]], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        secs, res = fn()
        if secs < best:
            best, out = secs, res
    return best, out


def main(argv: Sequence[str] | None = None) -> int:
    from balloonlab.guestd.fastsim import simulate_fast
    from balloonlab.guestd.workload.programs import PROGRAMS, default_cache_dir, record_program
    from balloonlab.guestd.errors import GuestdError
    from balloonlab.guestd.workload.trace import load_npz_trace

    ap = argparse.ArgumentParser(prog="bench.py traces", description=__doc__.splitlines()[0])
    ap.add_argument("--programs", nargs="*", default=None, choices=sorted(PROGRAMS),
                    help="built-in traced programs (default: all of them, or none when --command/--trace is given)")
    ap.add_argument("--command", action="append", default=[], metavar="CMD",
                    help="also trace this program under valgrind lackey (a shell-quoted command line; repeatable)")
    ap.add_argument("--trace", action="append", default=[], type=Path, metavar="FILE",
                    help="also run this recorded trace: a lackey log, or a .npz / text trace (repeatable)")
    ap.add_argument("--skip-refs", type=int, default=1_000_000,
                    help="references left out at the start of a --command or --trace (start-up; default 1M)")
    ap.add_argument("--max-refs", type=int, default=10_000_000,
                    help="references kept of a --command or --trace (0: all; default 10M)")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--targets", type=float, nargs="+", default=[0.02, 0.10], help="miss ratios to aim at")
    ap.add_argument("--policies", nargs="+", default=["clock", "esc"])
    ap.add_argument("--batch", type=int, default=4096, help="references per GuestKernel.access call")
    ap.add_argument("--engine", default="compiled", choices=["compiled", "reference"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-fastsim", action="store_true")
    ap.add_argument("--json", action="store_true", help="also print the rows as one JSON list")
    args = ap.parse_args(argv)
    try:
        import libcachesim as lcs
    except ImportError:
        print("bench traces needs libCacheSim's Python package: pip install -e \".[bench]\" "
              "(or .venv/bin/pip install libcachesim)")
        return 2

    rows: list[dict[str, Any]] = []
    print(f"traces bench: kernel = GuestKernel.access ({args.engine} engine, {args.batch}-reference batches, "
          f"in-process disk), best of {args.repeat}; anchor = libCacheSim {getattr(lcs, '__version__', '?')} Clock")
    hdr = (f"{'program':<12} {'refs':>6} {'pages':>6} {'frames':>6} {'miss %':>6}  {'libCacheSim':>11}  "
           + "  ".join(f"{'kernel ' + p:>13} {'ratio':>5}" for p in args.policies)
           + ("  " + "  ".join(f"{'fastsim ' + p:>13}" for p in args.policies) if not args.no_fastsim else ""))
    print(hdr)
    print(f"{'':<12} {'M':>6} {'':>6} {'':>6} {'':>6}  {'M refs/s':>11}  "
          + "  ".join(f"{'M refs/s':>13} {'':>5}" for _ in args.policies)
          + ("  " + "  ".join(f"{'M refs/s':>13}" for _ in args.policies) if not args.no_fastsim else ""))
    if args.skip_refs < 0 or args.max_refs < 0:
        ap.error("--skip-refs and --max-refs must be >= 0")
    max_refs = args.max_refs or None
    programs = args.programs if args.programs is not None else ([] if args.command or args.trace else list(PROGRAMS))
    sources: list[tuple[str, Callable[[], Path]]] = [
        (name, lambda name=name: record_program(name, args.cache_dir)) for name in programs]
    sources += [(Path(shlex.split(cmd)[0]).name if shlex.split(cmd) else "?",
                 lambda cmd=cmd: record_command(cmd, args.cache_dir, args.skip_refs, max_refs))
                for cmd in args.command]
    sources += [(f.stem, lambda f=f: load_trace_file(f, args.cache_dir, args.skip_refs, max_refs))
                for f in args.trace]
    if not sources:
        ap.error("nothing to run: give --programs, --command or --trace")
    for name, get in sources:
        t0 = time.perf_counter()
        try:
            path = get()
        except GuestdError as exc:
            print(f"bench traces: {name}: {exc}")
            return 2
        if time.perf_counter() - t0 > 1:
            print(f"  (recorded {name} in {time.perf_counter() - t0:.0f} s: {path})")
        pages, writes = load_npz_trace(path)
        if pages.size == 0:
            print(f"bench traces: {name}: the trace holds no references")
            return 2
        _, dense = np.unique(pages, return_inverse=True)
        dense = dense.astype(np.uint64)
        n_pages = int(dense.max()) + 1
        oracle = write_oracle_general(dense, path.with_suffix(".oracleGeneral"))
        for target in args.targets:
            frames, miss = pick_frames(lambda f: libcachesim_clock(lcs, oracle, f)[1], n_pages, target)
            lcs_s, lcs_miss = _best(lambda: libcachesim_clock(lcs, oracle, frames), args.repeat)
            _, r0_faults = kernel_run("clock-r0", frames, dense, writes, args.batch, args.engine)
            if r0_faults != round(lcs_miss * dense.size):
                print(f"  MISMATCH: kernel clock-r0 {r0_faults} faults, libCacheSim Clock "
                      f"{round(lcs_miss * dense.size)} misses")
            row: dict[str, Any] = {"program": name, "refs": int(dense.size), "pages": n_pages, "frames": frames,
                                   "miss_ratio": lcs_miss, "libcachesim_mrefs_s": dense.size / lcs_s / 1e6,
                                   "clock_r0_faults": r0_faults}
            line = (f"{name:<12} {dense.size / 1e6:>6.1f} {n_pages:>6} {frames:>6} {100 * lcs_miss:>6.2f}  "
                    f"{row['libcachesim_mrefs_s']:>11.1f}  ")
            cells = []
            for policy in args.policies:
                secs, faults = _best(lambda: kernel_run(policy, frames, dense, writes, args.batch, args.engine),
                                     args.repeat)
                rate = dense.size / secs / 1e6
                row[f"kernel_{policy}_mrefs_s"] = rate
                row[f"kernel_{policy}_miss_ratio"] = faults / dense.size
                row[f"kernel_{policy}_ratio"] = rate / row["libcachesim_mrefs_s"]
                cells.append(f"{rate:>13.1f} {rate / row['libcachesim_mrefs_s']:>5.2f}")
            line += "  ".join(cells)
            if not args.no_fastsim:
                fcells = []
                for policy in args.policies:
                    def fast() -> tuple[float, int]:
                        t = time.perf_counter()
                        r = simulate_fast(policy, frames, dense, writes)
                        return time.perf_counter() - t, r.faults
                    secs, _ = _best(fast, min(args.repeat, 2))
                    row[f"fastsim_{policy}_mrefs_s"] = dense.size / secs / 1e6
                    fcells.append(f"{dense.size / secs / 1e6:>13.1f}")
                line += "  " + "  ".join(fcells)
            print(line, flush=True)
            rows.append(row)
    ratios = [r[f"kernel_{p}_ratio"] for r in rows for p in args.policies]
    if ratios:
        print(f"kernel / libCacheSim Clock: min {min(ratios):.2f}x, median {float(np.median(ratios)):.2f}x "
              f"(target >= 0.5x)")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
