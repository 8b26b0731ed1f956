"""``summary.json``: the headline numbers of a run, per variant.

Keys are a contract (README "summary.json"); later features add keys, never
rename them. Shape::

    {"scenario": str, "seed": int, "bad_log_lines": int,
     "variants": {NAME: {"virtual_s", "ticks", "wall_s", "reason", "lost_pages",
                         "guests_lost": {id: reason}, "host": {...},
                         "guests": [{"id", "refs", "refs_per_vsec", ...}], ...}}}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proto import events as ev

from .logs import VariantLogs, find_variants, load_variant

__all__ = ["summarize", "summarize_variant", "write_summary", "format_table", "GUEST_STAT_KEYS"]

# Cumulative counters and gauges copied from the guest's last stats.
GUEST_STAT_KEYS = (
    "refs", "major_faults", "minor_faults", "swap_in", "swap_out", "file_reads", "file_writes", "writebacks",
    "ept_faults", "free", "total", "available", "caches", "anon_pages", "file_pages", "balloon_pages",
    "working_set_pages", "pff", "lost_pages",
)


def summarize(run_dir: Path) -> dict[str, Any]:
    variants = [load_variant(name, path) for name, path in find_variants(run_dir)]
    scenario, seed = "", 0
    for v in variants:
        for e in v.host:
            if e.get("event") == ev.RUN_STARTED:
                scenario, seed = e.get("scenario", scenario), e.get("seed", seed)
                break
    return {
        "scenario": scenario,
        "seed": seed,
        "bad_log_lines": sum(v.bad_lines for v in variants),
        "variants": {v.name: summarize_variant(v) for v in variants},
    }


def _last(events: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for e in reversed(events):
        if e.get("event") == name:
            return e
    return None


def summarize_variant(v: VariantLogs) -> dict[str, Any]:
    finished = _last(v.host, ev.RUN_FINISHED) or {}
    ticks = int(finished.get("ticks", 0))
    vt_us = float(finished.get("vt_us", 0))
    virtual_s = vt_us / 1e6
    host_metrics = {k: val for k, val in finished.items()
                    if k not in ("event", "level", "timestamp", "proc", "run_id", "variant", "tick", "vt_us",
                                 "ticks", "wall_s", "reason", "guests_lost", "refused")}
    host_metrics["refused_connections"] = finished.get("refused", 0)
    guests = []
    lost_pages = 0
    for gid, events in sorted(v.guests.items()):
        fin = _last(events, ev.GUEST_FINISHED)
        stats = dict((fin or {}).get("stats") or {})
        if not stats:
            last_tick = _last(events, ev.TICK_COMPLETED)
            stats = {k: last_tick[k] for k in GUEST_STAT_KEYS if last_tick and k in last_tick}
        g: dict[str, Any] = {"id": gid, "finished": fin is not None}
        for key in GUEST_STAT_KEYS:
            if key in stats:
                g[key] = stats[key]
        g.setdefault("refs", 0)
        g_vs = float(stats.get("vt_us", vt_us)) / 1e6 if stats.get("vt_us") else virtual_s
        g["virtual_s"] = round(g_vs, 6)
        g["refs_per_vsec"] = round(g["refs"] / g_vs, 1) if g_vs > 0 else 0.0
        lost_pages += int(g.get("lost_pages", 0))
        guests.append(g)
    out: dict[str, Any] = {
        "virtual_s": round(virtual_s, 6),
        "ticks": ticks,
        "wall_s": finished.get("wall_s"),
        "reason": finished.get("reason", "no run_finished event (host killed?)"),
        "guests_lost": finished.get("guests_lost", {}),
        "host": host_metrics,
        "guests": guests,
        "lost_pages": lost_pages + int(host_metrics.get("lost_pages", 0)),
        "stalled_ticks": sum(1 for e in v.host if e.get("event") == ev.TICK_STALLED),
    }
    return out


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return path


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"scenario {summary['scenario']}  seed {summary['seed']}"]
    for name, v in summary["variants"].items():
        lines.append("")
        lines.append(f"== {name}: {v['ticks']} ticks, {v['virtual_s']:.2f} virtual s, "
                     f"{v['wall_s'] if v['wall_s'] is not None else '?'} wall s, {v['reason']}")
        host = v["host"]
        if host:
            shown = {k: host[k] for k in list(host)[:12] if not isinstance(host[k], (dict, list))}
            lines.append("   host: " + "  ".join(f"{k}={val}" for k, val in shown.items()))
        cols = ["id", "refs", "refs_per_vsec", "major_faults", "minor_faults", "swap_out", "swap_in",
                "file_reads", "balloon_pages", "lost_pages"]
        cols = [c for c in cols if any(c in g for g in v["guests"])]
        widths = [max(len(c), *(len(str(g.get(c, ""))) for g in v["guests"])) for c in cols] if v["guests"] else []
        lines.append("   " + "  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for g in v["guests"]:
            lines.append("   " + "  ".join(str(g.get(c, "")).rjust(w) for c, w in zip(cols, widths)))
        if v["guests_lost"]:
            lines.append(f"   guests lost: {v['guests_lost']}")
        lines.append(f"   lost pages: {v['lost_pages']}")
    return "\n".join(lines)
