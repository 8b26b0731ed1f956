"""balloonlab-trace: real programs' memory references as the project's page traces.

    balloonlab-trace record [-o OUT.npz] [--max-refs N] [--skip N] [--stdin FILE] -- CMD ARGS...
    balloonlab-trace convert LOG [-o OUT.npz] [--from lackey|perf-mem] [--max-refs N] [--skip N]
    balloonlab-trace program NAME [-o OUT.npz] [--max-refs N] [--skip N]
    balloonlab-trace list
    balloonlab-trace show FILE.npz|NAME

``record`` runs CMD under valgrind's lackey (``--trace-mem=yes``) and keeps
the references ``[skip, skip + max-refs)`` (loads, stores and modifies; a
store or modify is a write), streaming lackey's log so a long run never
sits in memory. ``convert`` reads a lackey log already on disk or the
samples of ``perf mem report -D`` (``guestd/workload/perfmem.py``). Either
way the output is the project's trace format (``.npz``: ``page`` uint64,
``write`` bool) with ``meta``: the command or the log, the window of
references kept, the page size. ``program`` records one of the built-in
recipes (``guestd/workload/programs.py``) the way the shipped traces were
made. ``list`` shows the traces shipped with balloonlab; a scenario uses one
with ``{ kind = "trace", program = "NAME", region = "..." }``.

Exit status: 0 done, 2 bad arguments, input or a failed recording.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["main", "summarize"]


def summarize(pages: np.ndarray, writes: np.ndarray) -> dict[str, Any]:
    """What a scenario needs to know of a trace: its length, its distinct pages (the region must hold them)."""
    return {"refs": int(pages.size), "distinct_pages": int(np.unique(pages).size),
            "distinct_mib": round(int(np.unique(pages).size) / 256, 2),
            "write_frac": round(float(writes.mean()), 4) if writes.size else 0.0}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="balloonlab-trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def window(p: argparse.ArgumentParser, default_max: int | None) -> None:
        p.add_argument("--max-refs", type=int, default=default_max,
                       help=f"references to keep (default {default_max or 'all'}; 0 = all)")
        p.add_argument("--skip", type=int, default=0, help="references to drop at the start (start-up)")
        p.add_argument("--page-bytes", type=int, default=4096)

    rec = sub.add_parser("record", help="run a command under valgrind lackey and write its page trace")
    rec.add_argument("-o", "--out", type=Path, help="output .npz (default: the command's name .npz)")
    window(rec, 10_000_000)
    rec.add_argument("--instructions", action="store_true", help="count instruction fetches too")
    rec.add_argument("--stdin", type=Path, help="file fed to the program's standard input")
    rec.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    conv = sub.add_parser("convert", help="a lackey log or `perf mem report -D` output to a page trace")
    conv.add_argument("log", type=Path)
    conv.add_argument("-o", "--out", type=Path, help="output .npz (default: LOG with .npz)")
    conv.add_argument("--from", dest="fmt", choices=["auto", "lackey", "perf-mem"], default="auto")
    conv.add_argument("--instructions", action="store_true", help="lackey: count instruction fetches too")
    window(conv, None)

    prog = sub.add_parser("program", help="record a built-in program recipe (how the shipped traces are made)")
    prog.add_argument("name")
    prog.add_argument("-o", "--out", type=Path, help="output .npz (default NAME.npz)")
    window(prog, None)

    sub.add_parser("list", help="the traces shipped with balloonlab")
    show = sub.add_parser("show", help="a trace's size and metadata")
    show.add_argument("trace", help="a .npz file or a shipped trace's name")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from balloonlab.guestd.errors import GuestdError
    try:
        out = _run(args)
    except GuestdError as exc:
        print(f"balloonlab-trace: error: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        print(json.dumps(out, sort_keys=True))
    return 0


def _cap(n: int | None) -> int | None:
    return n or None


def _run(args: argparse.Namespace) -> dict[str, Any] | None:
    from balloonlab.guestd.errors import GuestdError
    from balloonlab.guestd.workload import lackey, perfmem, recorded
    from balloonlab.guestd.workload.trace import read_trace, read_trace_meta
    if args.cmd == "record":
        command = list(args.command)
        if command[:1] == ["--"]:
            command = command[1:]
        if not command:
            raise GuestdError("record: give the command after --, e.g. balloonlab-trace record -- sort big.txt")
        out = args.out or Path(f"{Path(command[0]).name}.npz")
        tr = lackey.record_lackey(command, None, max_refs=_cap(args.max_refs), skip_refs=args.skip,
                                  page_bytes=args.page_bytes, instructions=args.instructions, stdin=args.stdin)
        tr.extra["program"] = Path(command[0]).name
        tr.save(out)
        return {"out": str(out), **summarize(tr.pages, tr.writes), "meta": tr.meta()}
    if args.cmd == "convert":
        out = args.out or args.log.with_suffix(".npz")
        fmt = args.fmt
        if fmt == "auto":
            try:
                with open(args.log, "rb") as f:
                    head = f.read(1 << 16)
            except OSError as e:
                raise GuestdError(f"{args.log}: cannot read: {e.strerror or e}") from None
            fmt = "perf-mem" if perfmem.looks_like_perf_mem(head) else "lackey"
        if fmt == "perf-mem":
            tr = perfmem.convert_perf_mem(args.log, out, page_bytes=args.page_bytes, max_refs=_cap(args.max_refs),
                                          skip_refs=args.skip)
            meta = tr.meta()
        else:
            tr = lackey.convert_lackey_log(args.log, out, max_refs=_cap(args.max_refs), skip_refs=args.skip,
                                           page_bytes=args.page_bytes, instructions=args.instructions)
            meta = tr.meta()
        return {"out": str(out), "from": fmt, **summarize(tr.pages, tr.writes), "meta": meta}
    if args.cmd == "program":
        from balloonlab.guestd.workload.programs import PROGRAMS
        if args.name not in PROGRAMS:
            from balloonlab.proto.schema import unknown_name
            raise GuestdError(unknown_name("program", args.name, PROGRAMS))
        prog = PROGRAMS[args.name]
        out = args.out or Path(f"{args.name}.npz")
        work = out.parent / f".{args.name}.work"
        work.mkdir(parents=True, exist_ok=True)
        command, stdin = prog.prepare(work)
        tr = lackey.record_lackey(command, None, max_refs=_cap(args.max_refs) or prog.max_refs,
                                  skip_refs=args.skip or prog.skip_refs, page_bytes=args.page_bytes,
                                  stdin=stdin, cwd=work)
        tr.extra.update(program=args.name, about=prog.about)
        tr.save(out)
        return {"out": str(out), **summarize(tr.pages, tr.writes)}
    if args.cmd == "list":
        rows = []
        for name, path in recorded.shipped_traces().items():
            pages, writes = read_trace(path)
            meta = read_trace_meta(path)
            extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
            rows.append({"program": name, **summarize(pages, writes), "about": extra.get("about", ""),
                         "command": " ".join(str(c) for c in meta.get("command", []))})
        for r in rows:
            print(f"{r['program']:<12} {r['refs']:>9,} refs  {r['distinct_pages']:>6,} pages "
                  f"({r['distinct_mib']} MiB)  writes {r['write_frac']:.1%}  {r['about']}")
        return None
    if args.cmd == "show":
        path = Path(args.trace)
        if not path.exists():
            path = recorded.shipped_trace_path(args.trace)
        pages, writes = read_trace(path)
        return {"trace": str(path), **summarize(pages, writes), "meta": read_trace_meta(path)}
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
