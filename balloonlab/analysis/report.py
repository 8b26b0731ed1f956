"""``report.md``: what a person reads after a run, with the plots beside it.

Sections: the scenario and seed; the variants side by side (headline
metrics with ratios against the first variant, plots across variants); per
variant the host and per-guest tables, the notable events in virtual-time
order with their evidence (capped, with counts per kind) and its plots.

Notable events are found by name: every event named in ``proto.events``
except the routine ones, and every warning or error whatever its name, so
events that other parts add show up here as they land.
"""
from __future__ import annotations

import json
import math
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from balloonlab.hostd.monitors.base import ReportFormat
from balloonlab.hostd.monitors import registry as monitor_registry
from balloonlab.proto import events as ev

from .compare import Column, compare_table, format_value
from .decisions import decisions_section
from .summary import baseline_variant
from .logs import VariantLogs, event_vt_us, find_variants, load_variant
from .ranking import ranking_section

__all__ = ["write_report", "write_report_full", "render_report", "notable_events", "evidence", "variant_order",
           "baseline_variant", "overcommit_ratio", "wall_seconds", "ReportResult", "MAX_EVENTS_SHOWN"]

MAX_EVENTS_SHOWN = 80
"""Notable events listed per variant; the counts per kind cover the rest."""
MAX_EVIDENCE_CHARS = 320
MAX_RARE_EVIDENCE_CHARS = 2000   # the few events of a rare kind (a deadlock, a storm) are shown whole
RARE_KIND_COUNT = 5

# Logged every run or every tick: not news.
_ROUTINE = {ev.TICK_COMPLETED, ev.RUN_STARTED, ev.RUN_FINISHED, ev.GUEST_STARTED, ev.GUEST_FINISHED,
            ev.GUEST_CONNECTED, ev.BALLOON_DECISION}   # decisions have their own table (decisions.py)
# Fields every line carries: not evidence.
_CONTEXT = {"event", "level", "timestamp", "proc", "run_id", "variant", "tick", "vt_us", "guest", "logger"}
_LOUD = {"warning", "error", "critical", "exception"}


@dataclass
class ReportResult:
    path: Path
    plots: list[Any] = field(default_factory=list)   # plots.Plot
    plot_error: str | None = None


def _event_names() -> set[str]:
    return {v for k, v in vars(ev).items() if k.isupper() and isinstance(v, str)}


def wall_seconds(e: dict[str, Any]) -> float | None:
    """A log line's ISO timestamp as seconds since the epoch (None when it has none or a bad one)."""
    ts = e.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _wall_to_vt(v: VariantLogs, tick_us: float) -> Callable[[float], float] | None:
    """Virtual time from wall time, interpolated over the host's lines that carry both."""
    pts = []
    for e in v.host:
        vt = event_vt_us(e, tick_us) if e.get("event") != ev.RUN_STARTED else 0.0
        w = wall_seconds(e) if vt is not None else None
        if w is not None and vt is not None:
            pts.append((w, vt))
    if not pts:
        return None
    pts.sort()
    walls = np.array([p[0] for p in pts])
    vts = np.maximum.accumulate(np.array([p[1] for p in pts]))
    return lambda w: float(np.interp(w, walls, vts))


def notable_events(v: VariantLogs, tick_us: float) -> list[dict[str, Any]]:
    """The notable events of a variant in virtual-time order, each with ``_vt_us`` and ``_src`` added.

    An event that carries neither ``vt_us`` nor ``tick`` (a guest logging
    before its first tick or after its last) is placed by its wall-clock
    timestamp against the host's ticks, and marked approximate (``_vt_approx``).
    """
    names = _event_names() - _ROUTINE
    out: list[tuple[float, int, int, dict[str, Any]]] = []
    sources: list[tuple[str, list[dict[str, Any]]]] = [("host", v.host)]
    sources += [(f"guest {gid}", events) for gid, events in sorted(v.guests.items())]
    to_vt: Callable[[float], float] | None = None
    looked_up = False
    for rank, (src, events) in enumerate(sources):
        for i, e in enumerate(events):
            name = e.get("event")
            if name in _ROUTINE or not (name in names or str(e.get("level", "")).lower() in _LOUD):
                continue
            vt = event_vt_us(e, tick_us)
            approx = False
            if vt is None:
                if not looked_up:
                    to_vt, looked_up = _wall_to_vt(v, tick_us), True
                w = wall_seconds(e)
                if to_vt is not None and w is not None:
                    vt, approx = to_vt(w), True
            who = src
            if src == "host" and isinstance(e.get("guest"), int):
                who = f"host, guest {e['guest']}"
            out.append((vt if vt is not None else math.inf, rank, i,
                        dict(e, _vt_us=vt, _vt_approx=approx, _src=who)))
    out.sort(key=lambda x: (x[0], x[1], x[2]))
    return [e for *_, e in out]


def _rows(events: list[dict[str, Any]], long_kinds: set[str]) -> list[dict[str, Any]]:
    """Events as table rows; the same event with the same evidence at the same time for several guests is one row."""
    rows: list[dict[str, Any]] = []
    index: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in events:
        name = str(e.get("event"))
        text = evidence(e, MAX_EVIDENCE_CHARS if name not in long_kinds else MAX_RARE_EVIDENCE_CHARS)
        side = e["_src"].split(",")[0] if e["_src"].startswith("host") else "guest"
        gid = e.get("guest") if isinstance(e.get("guest"), int) else None
        key = (e["_vt_us"], side, name, text, str(e.get("level")))
        row = index.get(key) if gid is not None else None
        if row is not None and gid not in row["guests"]:
            row["guests"].append(gid)
            continue
        row = {"event": e, "name": name, "evidence": text, "side": side, "guests": [] if gid is None else [gid]}
        rows.append(row)
        if gid is not None:
            index[key] = row
    return rows


def _who(row: dict[str, Any]) -> str:
    gs = row["guests"]
    if not gs or (row["side"] == "guest" and len(gs) == 1):
        return row["event"]["_src"]
    label = f"guest {gs[0]}" if len(gs) == 1 else "guests " + ", ".join(str(g) for g in gs)
    return label if row["side"] == "guest" else f"host, {label}"


def _select(rows: list[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """At most ``cap`` rows, shared fairly between kinds (earliest first within each), in time order."""
    if len(rows) <= cap:
        return rows
    by_kind: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_kind.setdefault(r["name"], []).append(i)
    chosen: set[int] = set()
    depth = 0
    while len(chosen) < cap:
        added = False
        for idxs in by_kind.values():
            if depth < len(idxs) and len(chosen) < cap:
                chosen.add(idxs[depth])
                added = True
        if not added:
            break
        depth += 1
    return [rows[i] for i in sorted(chosen)]


def _fmt_field(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (dict, list)):
        return json.dumps(x, separators=(",", ":"), default=str)
    return str(x)


def _fmt_cycle(cycle: list[Any]) -> str | None:
    """A wait-for cycle (``deadlock_detected``) as who holds what and waits for what, around the loop."""
    links = []
    for w in cycle:
        if not isinstance(w, dict) or "holds" not in w or "waits_for" not in w:
            return None
        who = w.get("owner") or "/".join(str(w[k]) for k in ("proc", "task") if k in w) or "?"
        since = w.get("since_vt_us")
        at = f" since {float(since) / 1e6:.4f} s" if isinstance(since, (int, float)) else ""
        site = f" in {w['site']}" if w.get("site") else ""
        links.append(f"{who} holds {w.get('holds_lock', w['holds'])}, waits for "
                     f"{w.get('waits_for_lock', w['waits_for'])}{site}{at}")
    return "cycle: " + " → ".join(links) + " → (back to the first)" if links else None


def _fmt_chain(chain: list[Any]) -> str | None:
    """A monitor's chain of conditions (``swap_storm_detected``): each link, its value against its threshold."""
    parts = []
    for c in chain:
        if not isinstance(c, dict) or "link" not in c:
            return None
        mark = "yes" if c.get("ok") else "no"
        parts.append(f"{c['link']} {_fmt_field(c.get('value'))} (threshold {_fmt_field(c.get('threshold'))}: {mark})")
    return "chain: " + "; ".join(parts) if parts else None


_FIELD_FORMATS: dict[str, Callable[[list[Any]], str | None]] = {"cycle": _fmt_cycle, "chain": _fmt_chain}


def evidence(e: dict[str, Any], limit: int = MAX_EVIDENCE_CHARS) -> str:
    """The event's own fields as ``key=value``, shortened to ``limit`` characters.

    A deadlock's ``cycle`` and a monitor's ``chain`` are written out as
    sentences and come first: they are the evidence.
    """
    parts = []
    for k, val in e.items():
        if k in _CONTEXT or k.startswith("_"):
            continue
        fmt = _FIELD_FORMATS.get(k)
        text = fmt(val) if fmt is not None and isinstance(val, list) else None
        if text is not None:
            parts.insert(0, text)
        else:
            parts.append(f"{k}={_fmt_field(val)}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _vt_s(vt_us: float | None, approx: bool = False) -> str:
    if vt_us is None or vt_us < 0 or math.isinf(vt_us):
        return "—"
    return ("≈" if approx else "") + f"{vt_us / 1e6:.3f}"


def variant_order(run_dir: Path, names: Sequence[str]) -> list[str]:
    """Variants in the order the scenario lists them (the first is the baseline), else as given."""
    order: list[str] = []
    path = Path(run_dir) / "scenario.toml"
    if path.exists():
        try:
            order = list((tomllib.loads(path.read_text()).get("variants") or {}))
        except (tomllib.TOMLDecodeError, OSError, AttributeError):
            order = []
    known = [n for n in order if n in names]
    return known + [n for n in names if n not in known]


def overcommit_ratio(cfg: dict[str, Any], vsummary: dict[str, Any]) -> float | None:
    """Sum of the guests' RAM over the host's RAM (both in pages), from the run config and summary."""
    ram = sum(int(g.get("ram_pages", 0)) for g in cfg.get("guests") or [] if isinstance(g, dict))
    host = (vsummary.get("host") or {}).get("ram_pages")
    return ram / host if ram and isinstance(host, (int, float)) and host > 0 else None


def _scenario_description(run_dir: Path) -> str:
    path = Path(run_dir) / "scenario.toml"
    try:
        return str((tomllib.loads(path.read_text()).get("scenario") or {}).get("description", ""))
    except (tomllib.TOMLDecodeError, OSError, AttributeError):
        return ""


def _tick_us(v: VariantLogs) -> float:
    for e in v.host:
        if e.get("event") == ev.RUN_STARTED and e.get("tick_us"):
            return float(e["tick_us"])
    return float(v.config.get("tick_us", 10_000))


# --- tables --------------------------------------------------------------------------

_HOST_ROWS = (
    ("ram_pages", "host RAM (frames)"), ("free_frames", "free frames at the end"),
    ("peaks.min_free_frames", "fewest free frames"), ("peaks.iobuf_pages", "most I/O-buffer frames"),
    ("peaks.cache_pages", "most disk-cache frames"), ("peaks.pinned_frames", "most pinned frames"),
    ("swap_out_pages", "host swap-out (pages)"), ("swap_in_pages", "host swap-in (pages)"),
    ("peaks.swap_used_slots", "most host swap slots in use"), ("ept_faults", "EPT faults (pages)"),
    ("shootdown_pages", "pages shot down (TLB)"), ("double_faults", "double faults"),
    ("vdisk_read_pages", "virtual-disk reads (pages)"), ("vdisk_write_pages", "virtual-disk writes (pages)"),
    ("vdisk_backpressure_waits", "virtual-disk backpressure waits"),
    ("double_faults_after_pin", "double faults after a pin"), ("double_paging_pages", "double paging (pages)"),
    ("swap_area_pins", "swap areas pinned"), ("pinned_pages_peak", "most frames pinned for swap areas"),
    ("balloon_inflated_pages", "balloon inflated (pages)"),
    ("balloon_deflated_pages", "balloon deflated (pages)"), ("invariant_violations", "invariant violations"),
    ("rejected_requests", "rejected requests"), ("uncooperative_guests", "uncooperative guests"),
)

_GUEST_COLS = (
    ("id", "guest"), ("refs_per_vsec", "refs/vs"), ("major_faults", "major faults"), ("minor_faults", "minor"),
    ("swap_in", "swap in"), ("swap_out", "swap out"), ("file_reads", "file reads"), ("file_writes", "file writes"),
    ("evictions", "evictions"), ("ept_faults", "EPT faults"), ("host_took_pages", "host took"),
    ("balloon_pages", "balloon"), ("balloon_target_pages", "target"), ("working_set_pages", "working set"),
    ("pff", "PFF (/vs)"), ("lost_pages", "lost"),
)


def _dig(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _cell(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return format_value(float(x))
    if isinstance(x, (dict, list)):
        return _md(_fmt_field(x)) if x else "—"
    return _md(str(x))


def _host_table(names: Sequence[str], variants: dict[str, dict[str, Any]]) -> str:
    lines = ["| host | " + " | ".join(_md(n) for n in names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in _HOST_ROWS:
        vals = [_dig(variants[n].get("host") or {}, key) for n in names]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join(_cell(v) for v in vals) + " |")
    return "\n".join(lines)


def _guest_table(v: dict[str, Any]) -> str:
    guests = v.get("guests") or []
    cols = [(k, lbl) for k, lbl in _GUEST_COLS if any(k in g for g in guests)]
    if not guests or not cols:
        return "_no guest logged its statistics._"
    lines = ["| " + " | ".join(lbl for _, lbl in cols) + " |", "|" + "---:|" * len(cols)]
    for g in guests:
        cells = []
        for k, _ in cols:
            x = g.get(k)
            cells.append(f"{x:,.0f}" if k == "pff" and isinstance(x, (int, float)) else _cell(x))
        lines.append("| " + " | ".join(cells) + " |")
    unfinished = [str(g["id"]) for g in guests if g.get("finished") is False]
    if unfinished:
        lines.append(f"\nGuests without a `guest_finished` line (killed, or the run was stopped): "
                     f"{', '.join(unfinished)}; their last logged tick is shown.")
    return "\n".join(lines)


def _events_section(v: VariantLogs, tick_us: float, cap: int) -> str:
    events = notable_events(v, tick_us)
    if not events:
        return "_No notable events: no balloon targets set, swap storms, double faults, pins, deadlocks, lock-order " \
               "violations, warnings or errors._"
    kinds: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        kinds.setdefault(str(e.get("event")), []).append(e)
    out = ["| event | count | first (virtual s) | last (virtual s) | from |", "|---|---:|---:|---:|---|"]
    for name, es in sorted(kinds.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        srcs = sorted({e["_src"].split(",")[0] for e in es}, key=lambda x: (len(x), x))
        out.append(f"| `{_md(name)}` | {len(es):,} | {_vt_s(es[0]['_vt_us'], es[0]['_vt_approx'])} | "
                   f"{_vt_s(es[-1]['_vt_us'], es[-1]['_vt_approx'])} | {_md(', '.join(srcs))} |")
    rows = _rows(events, {k for k, es in kinds.items() if len(es) <= RARE_KIND_COUNT})
    shown = _select(rows, cap)
    out.append("")
    if len(shown) < len(rows):
        out.append(f"Listed below: {len(shown)} of {len(rows):,} rows (the earliest of each kind, shared fairly "
                   f"between kinds); the counts above cover every event.")
        out.append("")
    out += ["| virtual s | tick | from | event | evidence |", "|---:|---:|---|---|---|"]
    for r in shown:
        e = r["event"]
        tick = e.get("tick")
        level = str(e.get("level", "")).lower()
        name = f"`{_md(r['name'])}`" + (f" ({level})" if level in _LOUD else "")
        out.append(f"| {_vt_s(e['_vt_us'], e['_vt_approx'])} | {tick if isinstance(tick, int) else '—'} | "
                   f"{_md(_who(r))} | {name} | {_md(r['evidence'])} |")
    if any(e["_vt_approx"] for e in events):
        out.append("")
        out.append("≈: the event carries no virtual time; placed by its wall-clock timestamp between the host's ticks.")
    return "\n".join(out)


def _plot_links(plots: Sequence[Any], run_dir: Path) -> str:
    """Each plot embedded (a markdown viewer shows it inline; the alt text names it otherwise)."""
    out = []
    for p in plots:
        rel = Path(p.path).relative_to(run_dir) if Path(p.path).is_relative_to(run_dir) else Path(p.path)
        out.append(f"![{p.title}]({rel.as_posix()})")
    return "\n\n".join(out)


# --- the report ------------------------------------------------------------------------


def render_report(run_dir: Path, summary: dict[str, Any], logs: Sequence[VariantLogs],
                  plots: Sequence[Any] = (), plot_error: str | None = None, cap: int = MAX_EVENTS_SHOWN) -> str:
    run_dir = Path(run_dir)
    variants = summary.get("variants", {})
    names = variant_order(run_dir, list(variants))
    by_name = {v.name: v for v in logs}
    out = [f"# Run report: {summary.get('scenario') or '?'}", ""]
    desc = _scenario_description(run_dir)
    if desc:
        out += [f"_{desc}_", ""]
    out.append(f"- scenario **{summary.get('scenario') or '?'}**, seed **{summary.get('seed', '?')}**, "
               f"run directory `{run_dir}`")
    for n in names:
        v = variants[n]
        cfg = by_name[n].config if n in by_name else {}
        policy = (cfg.get("balloon") or {}).get("policy", "none (default)")
        params = (cfg.get("balloon") or {}).get("params")
        n_guests = len(v.get("guests") or [])
        ram = (v.get("host") or {}).get("ram_pages")
        ratio = overcommit_ratio(cfg, v)
        host_ram = (f"host RAM {ram / 256:,.1f} MiB ({format_value(ram)} frames)" if isinstance(ram, (int, float))
                    else "host RAM ?")
        out.append(f"- variant **{n}**: balloon policy `{policy}`"
                   + (f" {json.dumps(params, separators=(',', ':'))}" if params else "")
                   + f", {n_guests} guest(s), {host_ram}"
                   + (f", **overcommit {ratio:.2f}x** (the guests' RAM over the host's)" if ratio else "") + "; "
                   f"{v.get('ticks', 0):,} ticks = {v.get('virtual_s', 0):g} virtual s in "
                   f"{v.get('wall_s', '?')} wall s; "
                   f"requests in {v.get('request_order', 'arrival')} order"
                   + (" (reproducible)" if v.get("request_order") in ("deterministic", "virtual-time") else "")
                   + f"; ended: {v.get('reason', '?')}"
                   + (f"; **{v['status']}**: " + "; ".join(v.get("status_reasons") or [])
                      if v.get("status") not in (None, "completed") else ""))
    bad = int(summary.get("bad_log_lines", 0) or 0)
    if bad:
        detail = "; ".join(f"{v.name}: " + ", ".join(f"{f} {k}" for f, k in v.bad_by_file.items())
                           for v in logs if v.bad_lines)
        out.append(f"- **warning:** {bad} malformed or truncated log line(s) skipped ({detail})")
    sampled = [v for v in logs if v.tick_stride > 1]
    for v in sampled:
        out.append(f"- {v.name}: long run, the plots use one per-tick metrics line in {v.tick_stride} "
                   f"(evenly spaced, and the last); the tables use the final counters")
    lost = sum(int(variants[n].get("lost_pages", 0) or 0) for n in names)
    if lost:
        out.append(f"- **INTEGRITY: {lost} page(s) lost** (must be 0); see the `page_lost` events below")
    out.append("")

    out += ["## Variants side by side", ""]
    base = baseline_variant(names, variants)
    b = names.index(base) if base in names else 0
    # a variant that did not run to its end gets no ratio: its numbers come from another experiment
    columns = [Column(n if _comparable(variants[n]) else f"{n} ({_why_not(variants[n])}; no ratio)", variants[n],
                      b if i != b and _comparable(variants[n]) else None) for i, n in enumerate(names)]
    table, _ = compare_table(columns)
    if len(names) > 1:
        out.append(f"Ratios in parentheses are against `{names[b]}`. ↓: lower is better; ↑: higher is better.")
        skipped = [n for n in names[:b]]
        if skipped:
            out.append(f"(`{names[b]}` is the first variant that ran to its end: "
                       + ", ".join(f"`{n}` {_why_not(variants[n])}" for n in skipped) + ".)")
        out.append("")
    out += [table, ""]
    out += [_reading(names, variants, b), ""] if len(names) > 1 else []
    out += ranking_section(names, variants, logs)
    across = [p for p in plots if p.variant is None]
    if across:
        out += [_plot_links(across, run_dir), ""]
    out += ["### Host", "", _host_table(names, variants), ""]
    if plot_error:
        out += [f"**Plots could not be drawn:** {plot_error}", ""]

    for n in names:
        v = variants[n]
        out += [f"## Variant `{n}`", ""]
        out += ["### Guests", "", _guest_table(v), ""]
        out += decisions_section(v)
        if v.get("guests_lost"):
            out += [f"Guests lost mid-run: {_cell(v['guests_lost'])}", ""]
        details = _pathology_details(v)
        if details:
            out += ["### Pathologies", "", details, ""]
        out += ["### Notable events", ""]
        if n in by_name:
            out += [_events_section(by_name[n], _tick_us(by_name[n]), cap), ""]
        mine = [p for p in plots if p.variant == n]
        if mine:
            out += ["### Plots", "", _plot_links(mine, run_dir), ""]
    return "\n".join(out).rstrip() + "\n"


def _table(rows: list[Any], limit: int = 40) -> str:
    """A list of dicts as a markdown table (columns in first-seen order), at most ``limit`` rows."""
    dicts = [r for r in rows if isinstance(r, dict)]
    if not dicts:
        return ""
    cols: list[str] = []
    for r in dicts:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(_md(c) for c in cols) + " |", "|" + "---:|" * len(cols)]
    for r in dicts[:limit]:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    if len(dicts) > limit:
        lines.append(f"\n({len(dicts) - limit} more rows in summary.json)")
    return "\n".join(lines)


_FORMAT = ReportFormat(cell=_cell, table=_table)
"""How a monitor's report section writes values and tables (``hostd.monitors.base``)."""


def _pathology_details(v: dict[str, Any]) -> str:
    """What summary.json computed about the seed's pathologies for this variant, when there is any.

    The throughput around the first inflation, then each host monitor's
    section (``hostd.monitors.registry.MONITORS``, in order), then the balloon sweep.
    """
    out: list[str] = []
    thr = v.get("throughput")
    if isinstance(thr, dict) and thr.get("first_inflation_tick") is not None:
        b, a = thr.get("before_inflation_refs_per_vsec"), thr.get("after_inflation_refs_per_vsec")
        ratio = f" ({a / b:.2f}x)" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else ""
        out.append(f"- throughput before the first inflation (tick {thr['first_inflation_tick']}): "
                   f"{_cell(b)} references per virtual s; after: {_cell(a)}{ratio}")
    for spec in monitor_registry.MONITORS:
        if spec.report is not None:
            out += spec.report(v, _FORMAT)
    sweep = v.get("balloon_sweep")
    if isinstance(sweep, dict):
        for gid, c in sweep.items():
            if not isinstance(c, dict):
                continue
            knee = c.get("knee_balloon_pages")
            out.append(f"- balloon sweep, guest {gid}: true working set "
                       f"{_cell(c.get('true_working_set_pages'))} pages; "
                       + (f"knee at a balloon of {_cell(knee)} pages (guest free memory "
                          f"{_cell(c.get('knee_guest_free_pages'))} pages, throughput "
                          f"{_cell(c.get('knee_refs_per_vsec'))} of {_cell(c.get('baseline_refs_per_vsec'))}); "
                          f"last good free memory {_cell(c.get('last_good_guest_free_pages'))} pages"
                          if knee is not None else "no knee: throughput held at every step"))
            if isinstance(c.get("steps"), list):
                out += ["", _table(c["steps"]), ""]
    return "\n".join(out).strip()


def _comparable(v: dict[str, Any]) -> bool:
    return v.get("status", "completed") == "completed" and not v.get("deadlocked") and not v.get("guests_lost") and v.get("reason", "completed") == "completed"


def _why_not(v: dict[str, Any]) -> str:
    if v.get("deadlocked"):
        return f"deadlocked after {v.get('ticks', '?')} ticks"
    if v.get("guests_lost"):
        return f"lost {len(v['guests_lost'])} guest(s)"
    return f"ended: {v.get('reason', '?')}"


def _reading(names: Sequence[str], variants: dict[str, dict[str, Any]], base_i: int = 0) -> str:
    """One sentence per comparison that the seed's first story is about (against the baseline ``names[base_i]``)."""
    base = variants[names[base_i]]
    lines = []
    for n in names:
        if n == names[base_i]:
            continue
        v = variants[n]
        if not _comparable(v):
            lines.append(f"- `{n}` is not compared: it {_why_not(v)}.")
            continue
        parts = []
        for key, what in (("io_per_reclaimed_page", "disk I/O per reclaimed page"),
                          ("refs_per_vsec", "throughput")):
            a, b = base.get(key), v.get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
                parts.append(f"{what} {format_value(b)} vs {format_value(a)} ({b / a:.2f}x)")
        if parts:
            lines.append(f"- `{n}` against `{names[base_i]}`: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def write_report(run_dir: Path, summary: dict[str, Any] | None = None,
                 logs: Sequence[VariantLogs] | None = None, *, plots: bool = True,
                 cap: int = MAX_EVENTS_SHOWN, formats: Sequence[str] = ("png",)) -> Path:
    """Write ``report.md`` and the PNG plots into ``run_dir``; return the report's path.

    ``summary`` and ``logs`` are reused when the caller has them (the
    launcher has the summary; ``analyze.py`` has both). A plot that cannot
    be drawn (matplotlib missing or failing) is reported in the report, not
    raised: the tables are still worth having.
    """
    return write_report_full(run_dir, summary, logs, plots=plots, cap=cap, formats=formats).path


def write_report_full(run_dir: Path, summary: dict[str, Any] | None = None,
                      logs: Sequence[VariantLogs] | None = None, *, plots: bool = True,
                      cap: int = MAX_EVENTS_SHOWN, formats: Sequence[str] = ("png",)) -> ReportResult:
    """``formats``: each figure is written in each of them ("png", "svg", "pdf"); the report embeds the first."""
    run_dir = Path(run_dir)
    if logs is None:
        # summarize() warned about damaged lines already when it read them
        logs = [load_variant(name, path, warn=summary is None) for name, path in find_variants(run_dir)]
    if summary is None:
        from .summary import summarize
        summary = summarize(run_dir, list(logs))
    result = ReportResult(run_dir / "report.md")
    if plots:
        result.plots, result.plot_error = _draw(run_dir, summary, logs, formats)
    result.path.write_text(render_report(run_dir, summary, logs, result.plots, result.plot_error, cap))
    return result


def _draw(run_dir: Path, summary: dict[str, Any], logs: Sequence[VariantLogs],
          formats: Sequence[str] = ("png",)) -> tuple[list[Any], str | None]:
    from . import plots as pl  # matplotlib itself is imported only when the first plot is drawn

    order = variant_order(run_dir, [v.name for v in logs])
    by_name = {v.name: v for v in logs}
    written: list[Any] = []
    try:
        series = {n: pl.variant_series(by_name[n]) for n in order}
        with pl.formats(formats):
            written += pl.plot_across(summary, series, run_dir, order,
                                      baseline=baseline_variant(order, summary.get("variants", {})))
            for n in order:
                written += pl.plot_variant(series[n], run_dir, vsummary=summary.get("variants", {}).get(n))
    except Exception as exc:  # noqa: BLE001 -- no matplotlib, or a plot bug, must not cost the tables
        print(f"analyze: plotting failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return written, f"{type(exc).__name__}: {exc}"
    return written, None
