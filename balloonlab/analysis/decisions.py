"""The balloon controller's decisions per guest: summary.json's ``balloon_decisions`` and the report's table.

The host counts every decision by reason code and keeps each guest's last
one (``run_finished.balloon_decisions``); the log has every decision that
changed a target and every change of reason (``balloon_decision``). Per
guest, summary.json holds ``{"decisions": n, "counts": {code: n},
"first": {...}, "last": {...}}``, each decision as ``{tick, decision,
code, reason, target_pages}``.
"""
from __future__ import annotations

from typing import Any

from balloonlab.proto import events as ev

from .logs import VariantLogs

__all__ = ["decision_metrics", "decisions_section"]

_KEEP = ("tick", "decision", "code", "reason", "target_pages", "previous_pages")
MAX_REASON_CHARS = 160


def decision_metrics(v: VariantLogs, finished: dict[str, Any]) -> dict[str, Any]:
    """``{"balloon_decisions": {guest id: {...}}}``; empty when the host logged no decisions (an older run)."""
    per_guest: dict[str, dict[str, Any]] = {}
    for e in v.host:
        if e.get("event") != ev.BALLOON_DECISION:
            continue
        gid = str(e.get("guest"))
        g = per_guest.setdefault(gid, {"decisions": 0, "counts": {}, "first": None, "last": None})
        if g["first"] is None:
            g["first"] = {k: e.get(k) for k in _KEEP}
        g["last"] = {k: e.get(k) for k in _KEEP}
        if not finished.get("balloon_decisions"):   # the host died before counting: count what was logged
            g["decisions"] += 1
            g["counts"][e.get("code")] = g["counts"].get(e.get("code"), 0) + 1
    for gid, counted in (finished.get("balloon_decisions") or {}).items():
        g = per_guest.setdefault(str(gid), {"first": None})
        g["decisions"] = counted.get("decisions", 0)
        g["counts"] = dict(counted.get("counts") or {})
        g["last"] = counted.get("last") or g.get("last")
    return {"balloon_decisions": {k: per_guest[k] for k in sorted(per_guest, key=_guest_key)}}


def _guest_key(gid: str) -> tuple[int, str]:
    return (int(gid), "") if gid.isdigit() else (1 << 30, gid)


def _one(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    reason = str(d.get("reason") or "")
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 1] + "…"
    return (f"tick {d.get('tick')}: **{d.get('decision')}** to {d.get('target_pages')} pages, "
            f"`{d.get('code')}`: {reason}").replace("|", "\\|")


def decisions_section(vsummary: dict[str, Any]) -> list[str]:
    """Markdown lines: per guest, decisions counted by reason, the first and the last (nothing for old runs)."""
    per_guest = vsummary.get("balloon_decisions") or {}
    if not per_guest:
        return []
    out = ["### Balloon decisions", "",
           "Every decision of the controller, per guest, counted by reason; the first and the last one "
           "(the `balloon_decision` events have the numbers each used).", "",
           "| guest | decisions | by reason | first | last |", "|---|---|---|---|---|"]
    for gid, g in per_guest.items():
        counts = sorted((g.get("counts") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
        by_reason = ", ".join(f"`{code}` {n:,}" for code, n in counts) or "-"
        out.append(f"| {gid} | {g.get('decisions', 0):,} | {by_reason} | {_one(g.get('first'))} | "
                   f"{_one(g.get('last'))} |")
    return out + [""]
