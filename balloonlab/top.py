"""``balloonlab-top``: an esxtop-style live table of a run, one row per guest.

    balloonlab-top RUN_DIR | URL [--sort KEY] [--reverse] [--variant NAME] [--interval S] [--once]

RUN_DIR is read from its own logs as they grow (a finished run shows its last
tick); URL is a dashboard's address as the launcher printed it
(``http://127.0.0.1:PORT/SECRET/``). The header is the host: its RAM and
overcommit, free, disk cache, I/O buffers, pinned, host swap and its rates,
the memory state when the host logs one. Columns (esxtop's memory screen
names where there is one; docs/glossary.md maps each):

    GID      guest id                     MEMSZ   guest RAM (MiB)
    ANON     anonymous (MiB)              CACHE   file cache (MiB)
    MCTLSZ   balloon size (MiB)           MCTLTGT balloon target (MiB)
    SWCUR    host-swapped (MiB)           SWR/s SWW/s  host swap-in/out of its pages (pages/s)
    GSWR/s GSWW/s  the guest's own swap-in/out (pages/s)
    MAJF/s   major faults/s               FLT/s   all faults/s
    PFF      page-fault frequency          WSS     working-set estimate (MiB)
    REFS/s   throughput (references per virtual second)

Rates are per virtual second. Keys: i m b s f p t w sort by id, memory,
balloon, host-swapped, faults, PFF, throughput, working set; r reverses;
v next variant; q quits. ``--once`` prints one screen and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from balloonlab.proto.schema.units import PAGES_PER_MIB

__all__ = ["main", "render", "SORT_KEYS", "Source", "RunDirSource", "UrlSource", "guest_rows"]

MIB_PAGES = PAGES_PER_MIB

SORT_KEYS: dict[str, tuple[str, str]] = {   # key -> (column, what)
    "i": ("GID", "guest id"), "m": ("MEMSZ", "memory in use"), "b": ("MCTLSZ", "balloon size"),
    "s": ("SWCUR", "host-swapped"), "f": ("FLT/s", "faults per second"), "p": ("PFF", "page-fault frequency"),
    "t": ("REFS/s", "throughput"), "w": ("WSS", "working set"),
}
_SORT_NAMES = {"id": "i", "memory": "m", "balloon": "b", "swapped": "s", "faults": "f", "pff": "p",
               "throughput": "t", "working-set": "w"}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _mib(pages: Any) -> str:
    p = _num(pages)
    return "-" if p is None else f"{p / MIB_PAGES:.1f}"


def _rate(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "-"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


# --- where the numbers come from ----------------------------------------------------------


class Source:
    """Gives ``latest()``: the dashboard's ``api/latest`` document (model.RunModel.latest)."""

    def latest(self) -> dict[str, Any]:
        raise NotImplementedError


class RunDirSource(Source):
    def __init__(self, run_dir: Path) -> None:
        from balloonlab.dashboard.model import RunModel

        self.model = RunModel(run_dir)

    def latest(self) -> dict[str, Any]:
        self.model.poll()
        return self.model.latest()


class UrlSource(Source):
    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.timeout_s = timeout_s

    def latest(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "api/latest", timeout=self.timeout_s) as r:
            return json.loads(r.read())


# --- the table ------------------------------------------------------------------------------


def guest_rows(frame: dict[str, Any], meta: dict[str, Any], left: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per guest with the columns' values (numbers; None where the logs have nothing)."""
    rows = []
    for sid, g in (frame.get("guests") or {}).items():
        gs = g.get("guest") or {}
        hv = g.get("host") or {}
        r = g.get("rates") or {}
        total = _num(gs.get("total")) or _num(hv.get("guest_pages")) or _num((meta.get("guest_ram_pages") or {}).get(sid))
        target = _num(g.get("balloon_target_pages"))
        rows.append({
            "GID": int(sid) if str(sid).isdigit() else sid,
            "MEMSZ": total, "ANON": _num(gs.get("anon_pages")), "CACHE": _num(gs.get("file_pages")),
            "used": (_num(gs.get("anon_pages")) or 0) + (_num(gs.get("file_pages")) or 0),
            "MCTLSZ": _num(gs.get("balloon_pages")) if "balloon_pages" in gs else _num(hv.get("ballooned_pages")),
            "MCTLTGT": target if target is not None else _num(gs.get("balloon_target_pages")),
            "ALLOC": _num(g.get("alloc_target_pages")) or _num(hv.get("alloc_target_pages")),
            "SWCUR": _num(hv.get("swapped_pages")),
            "SWR/s": _num(r.get("host_swap_in_per_vsec")), "SWW/s": _num(r.get("host_swap_out_per_vsec")),
            "GSWR/s": _num(r.get("swap_in_per_vsec")), "GSWW/s": _num(r.get("swap_out_per_vsec")),
            "MAJF/s": _num(r.get("major_faults_per_vsec")), "FLT/s": _num(r.get("faults_per_vsec")),
            "PFF": _num(gs.get("pff")), "WSS": _num(gs.get("working_set_pages")),
            "REFS/s": _num(r.get("refs_per_vsec")),
            "state": f"left: {left[sid].get('reason')}" if sid in left else "",
        })
    return rows


def _sort(rows: list[dict[str, Any]], key: str, reverse: bool) -> list[dict[str, Any]]:
    col = "used" if key == "m" else SORT_KEYS[key][0]
    # ids ascend by default; every other column shows the biggest first, as esxtop does
    descending = (key != "i") != reverse
    have = [r for r in rows if r.get(col) is not None]
    missing = [r for r in rows if r.get(col) is None]
    have.sort(key=lambda r: (r[col], -r["GID"] if descending and isinstance(r["GID"], int) else 0), reverse=descending)
    return have + missing


def render(latest: dict[str, Any], sort: str = "i", reverse: bool = False, variant: str | None = None) -> Group:
    """One screen: the run and host header lines, the guest table, the last notable events."""
    variants = {v["name"]: v for v in latest.get("variants") or []}
    name = variant if variant in variants else latest.get("current")
    v = variants.get(name) if name else None
    if v is None:
        return Group(Text(f"balloonlab-top: {latest.get('run_dir', '')}: no variant has logged yet", style="yellow"))
    meta, f = v.get("meta") or {}, v.get("frame")
    status = "LIVE" if latest.get("live") else (f"ended: {v['finished'].get('reason')}" if v.get("finished") else "")
    head = Text()
    head.append("balloonlab-top ", style="bold")
    head.append(f"{meta.get('scenario', '?')} / {name}", style="bold cyan")
    head.append(f"   seed {meta.get('seed', '?')}   balloon {meta.get('balloon_policy', 'none')}")
    if meta.get("lock_protocol"):
        head.append(f"   locks {meta['lock_protocol']}")
    if f:
        head.append(f"   tick {f['tick'] + 1}/{meta.get('ticks', '?')}   vt {f['vt_s']:.3f} s")
        if _num(f.get("wall_s")) is not None:
            head.append(f"   wall {f['wall_s']:.1f} s")
    if status:
        head.append(f"   {status}", style="bold green" if status == "LIVE" else "bold")
    if len(variants) > 1:
        head.append("   variants: " + " ".join(f"[{n}]" if n == name else n for n in variants), style="dim")
    lines: list[Any] = [head]
    if latest.get("error"):
        lines.append(Text(str(latest["error"]), style="bold red"))
    if f is None:
        lines.append(Text("no tick logged yet", style="yellow"))
        return Group(*lines)
    h = f.get("host") or {}
    total = _num(h.get("total_frames")) or _num(meta.get("host_ram_pages"))
    guest_total = _num(meta.get("guest_ram_pages_total"))
    host = Text()
    host.append("HOST ", style="bold")
    host.append(f"RAM {_mib(total)} MiB ({int(total or 0):,} frames)")
    if total and guest_total:
        host.append(f"  overcommit {guest_total / total:.2f}x")
    for key, label in (("free_frames", "free"), ("cache_pages", "cache"), ("iobuf_pages", "iobuf"),
                       ("pinned_frames", "pinned")):
        if key in h:
            host.append(f"  {label} {_mib(h[key])}")
    host.append(" MiB")
    if "memory_state" in h:
        host.append(f"  state {h['memory_state']}", style="bold magenta")
    if "swap_used_slots" in h:
        host.append(f"  swap {_mib(h['swap_used_slots'])}/{_mib(h.get('swap_slots'))} MiB")
    host.append(f"  SWR/s {_rate(h.get('swap_in_per_vsec'))}  SWW/s {_rate(h.get('swap_out_per_vsec'))}")
    lines.append(host)

    rows = _sort(guest_rows(f, meta, v.get("left") or {}), sort, reverse)
    col, what = SORT_KEYS[sort]
    table = Table(box=None, header_style="bold reverse", pad_edge=False, expand=False,
                  caption=f"sorted by {col} ({what}{', reversed' if reverse else ''}); MiB, rates per virtual second",
                  caption_justify="left")
    cols = ["GID", "MEMSZ", "ANON", "CACHE", "MCTLSZ", "MCTLTGT", "SWCUR", "SWR/s", "SWW/s", "GSWR/s", "GSWW/s",
            "MAJF/s", "FLT/s", "PFF", "WSS", "REFS/s"]
    if any(r["ALLOC"] is not None for r in rows):
        cols.insert(6, "ALLOC")
    for c in cols:
        table.add_column(c + ("*" if c == col else ""), justify="right", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    mib_cols = {"MEMSZ", "ANON", "CACHE", "MCTLSZ", "MCTLTGT", "ALLOC", "SWCUR", "WSS"}
    for r in rows:
        cells = [str(r["GID"])] + [(_mib(r[c]) if c in mib_cols else _rate(r[c])) for c in cols[1:]]
        table.add_row(*cells, r["state"], style="dim" if r["state"] else None)
    lines.append(table)
    counts = {k: n for k, n in (v.get("counts") or {}).items()
              if k not in ("run_started", "guest_started", "guest_connected", "guest_finished", "run_finished",
                           "audit_reported", "balloon_target_received")}
    if counts:
        lines.append(Text("EVENTS " + "  ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])),
                          style="dim"))
    for e in (v.get("events") or [])[-3:]:
        lines.append(Text(f"  {e['vt_s']:.3f} s  {e['name']}  {e['src']}: {e['text']}", style="dim",
                          no_wrap=True, overflow="ellipsis"))
    lines.append(Text("keys: " + "  ".join(f"{k} {c}" for k, (c, _) in SORT_KEYS.items()) + "  r reverse  v variant  q quit",
                      style="dim"))
    return Group(*lines)


# --- the terminal ----------------------------------------------------------------------------


class _Keys:
    """Single keypresses from a terminal (cbreak mode, restored on exit); nothing when stdin is not one."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self._saved: Any = None

    def __enter__(self) -> "_Keys":
        if self.fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self, timeout_s: float) -> str | None:
        if self.fd is None:
            time.sleep(timeout_s)
            return None
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        return os.read(self.fd, 1).decode(errors="replace") if ready else None


def _source(target: str) -> Source:
    if target.startswith(("http://", "https://")):
        return UrlSource(target)
    return RunDirSource(Path(target))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="balloonlab-top", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", metavar="RUN_DIR|URL", help="a run directory, or a dashboard's URL with its secret")
    ap.add_argument("--sort", default="id", choices=sorted(_SORT_NAMES), help="the column to sort by (default id)")
    ap.add_argument("--reverse", action="store_true")
    ap.add_argument("--variant", help="the variant to show (default: the one running, or the last)")
    ap.add_argument("--interval", type=float, default=1.0, help="wall seconds between updates (default 1)")
    ap.add_argument("--once", action="store_true", help="print one screen and exit")
    args = ap.parse_args(argv)
    if not args.interval > 0:
        ap.error(f"--interval must be > 0, got {args.interval}")
    try:
        source = _source(args.target)
        latest = source.latest()
    except FileNotFoundError as exc:
        print(f"balloonlab-top: {exc}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"balloonlab-top: cannot read {args.target}: {exc}", file=sys.stderr)
        return 2
    sort, reverse, variant = _SORT_NAMES[args.sort], args.reverse, args.variant
    # Not a terminal (a pipe, a file): wide enough for every column rather than 80.
    console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS", 0)) or 200)
    if args.once:
        console.print(render(latest, sort, reverse, variant))
        return 0
    from rich.live import Live

    draw: Callable[[], Group] = lambda: render(latest, sort, reverse, variant)  # noqa: E731
    with _Keys() as keys, Live(draw(), console=console, screen=True, auto_refresh=False) as live:
        while True:
            key = keys.read(args.interval)
            if key in ("q", "Q", "\x03"):
                break
            if key in SORT_KEYS:
                sort = key
            elif key == "r":
                reverse = not reverse
            elif key == "v":
                names = [v["name"] for v in latest.get("variants") or []]
                cur = variant if variant in names else latest.get("current")
                if names:
                    variant = names[(names.index(cur) + 1) % len(names)] if cur in names else names[0]
            if key is None or key not in SORT_KEYS:
                try:
                    latest = source.latest()
                except (urllib.error.URLError, OSError, ValueError) as exc:   # the run ended and its dashboard with it
                    latest = dict(latest, live=False, error=f"cannot read {args.target}: {exc}")
            live.update(draw(), refresh=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
