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

from balloonlab.proto import events as ev

from .decisions import decision_metrics
from .logs import VariantLogs, find_variants, iter_events, load_variant
from .pathologies import pathology_lines, pathology_metrics
from .sharing import sharing_lines, sharing_metrics

__all__ = ["summarize", "summarize_variant", "reclaim_metrics", "clean_cache_io", "lock_metrics", "format_lock_table", "reliability_metrics",
           "event_counts", "write_summary", "format_table", "run_status", "STATUSES", "baseline_variant"]

STATUSES = ("completed", "degraded", "failed", "deadlocked", "interrupted")
"""A variant's ``status``: ran to its end with every guest and nothing wrong; ran to its end but lost or
cut off guests (or its audit failed); did not run to its end, or lost pages; ended on a deadlock; stopped
by a signal."""

HOST_TABLE_KEYS = ("ram_pages", "free_frames", "swap_out_pages", "swap_in_pages", "ept_faults", "double_faults",
                   "invariant_violations")


def summarize(run_dir: Path, variants: list[VariantLogs] | None = None) -> dict[str, Any]:
    """``variants``: the run's logs when the caller has read them already (the report reuses them)."""
    if variants is None:
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


def _guest_entry(gid: int, events: list[dict[str, Any]], run_virtual_s: float) -> dict[str, Any]:
    fin = _last(events, ev.GUEST_FINISHED)
    stats = dict((fin or {}).get("stats") or {})
    if not stats:
        last_tick = _last(events, ev.TICK_COMPLETED) or {}
        stats = {k: v for k, v in last_tick.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    g: dict[str, Any] = {"id": gid, "finished": fin is not None}
    g.update({k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and k not in ("tick",)})
    g.setdefault("refs", 0)
    g_vs = float(stats["vt_us"]) / 1e6 if stats.get("vt_us") else run_virtual_s
    g["virtual_s"] = round(g_vs, 6)
    g["refs_per_vsec"] = round(g["refs"] / g_vs, 1) if g_vs > 0 else 0.0
    g["disk_read_pages"] = int(g.get("file_reads", 0)) + int(g.get("swap_in", 0))
    g["disk_write_pages"] = int(g.get("file_writes", 0)) + int(g.get("swap_out", 0))
    g.setdefault("lost_pages", 0)
    return g


def clean_cache_io(host: dict[str, Any]) -> tuple[int, int] | None:
    """The host's real swap writes and reads of pages the guests labelled clean page cache; None if not counted.

    ``InvalidateReply.labels`` tell the host which pages it takes were clean
    page cache in the guest at that moment (instrumentation only: the host
    never decides with them); the host then counts its swap I/O on those
    pages, ``clean_cache_swap_write_pages`` and ``clean_cache_swap_read_pages``
    (the summary names them ``host_swap_writes_clean_cache`` / ``..._reads_...``).
    """
    w, r = host.get("clean_cache_swap_write_pages"), host.get("clean_cache_swap_read_pages")
    if isinstance(w, (int, float)) and isinstance(r, (int, float)) and not isinstance(w, bool):
        return int(w), int(r)
    return None


def reclaim_metrics(host: dict[str, Any], guests: list[dict[str, Any]]) -> dict[str, Any]:
    """Who reclaimed how many pages, by which mechanism, and what I/O that cost (the seed's "Two Choices").

    Reclaimed pages by mechanism (``reclaimed_by_mechanism``), each counted
    where it happens:

    - ``balloon_frames``: host frames freed by balloon inflation (a
      ballooned page the host never backed frees nothing and is not counted);
      ``None`` from a host that does not count them;
    - ``guest_for_balloon``: pages the guests evicted to fill their balloons
      (the balloon driver's allocation had to reclaim them);
    - ``guest_own``: every other eviction of the guests: their own demand
      paging and reclaim (in a memory the balloon may have made smaller);
    - ``host_swap``: guest pages the host swapped out (blind);
    - ``host_compress`` / ``host_zero``: guest pages the host took into its
      compression cache / dropped as zero pages instead of swapping them
      (``hostd.compress``; None when both are off);
    - ``host_swap_cache``: host disk-cache pages the host swapped out;
    - ``host_cache_drop``: host disk-cache pages dropped (trimmed).

    The seed's clean page cache is measured by real I/O only:
    ``host_swap_writes_clean_cache`` / ``host_swap_reads_clean_cache`` (the
    host's swap I/O on pages the guest labelled clean cache) over
    ``host_took_clean_cache_pages`` (such pages whose frames the host took):
    ``clean_cache_host_io_per_page``. Without labels those keys are absent.
    ``clean_cache_writes_per_page`` and ``..._reads_per_page`` stay for old
    readers; the writes are 1.0 for host swapping by construction (every
    page it takes is written), so no headline shows them.
    """
    def total(key: str) -> int:
        return sum(int(g.get(key, 0)) for g in guests)

    host_out = int(host.get("swap_out_pages", 0))
    host_in = int(host.get("swap_in_pages", 0))
    reclaimed = host_out + total("evictions")
    reclaimed_clean = total("host_took_clean_file") + total("evicted_clean_file")
    # pages the host took that went to its compression cache or were dropped as zero pages, not to swap
    zipped = int(host.get("compressed_pages", 0) or 0) + int(host.get("zero_pages_dropped", 0) or 0)
    io = host_out - zipped + host_in + total("writebacks") + total("refault_reads")
    clean_writes = total("host_took_clean_file")
    clean_reads = total("host_refaults_clean_file") + total("refault_file_reads")
    cache_out = int(host.get("swap_out_cache_pages", 0))
    freed = host.get("balloon_freed_frames")
    mechanism = {
        "balloon_frames": int(freed) if isinstance(freed, (int, float)) else None,
        "guest_for_balloon": total("balloon_reclaimed"),
        "guest_own": total("evictions") - total("balloon_reclaimed"),
        "host_swap": host_out - cache_out - zipped,
        # None from a host with neither mechanism on (the keys are absent)
        "host_compress": int(host["compressed_pages"]) if "compressed_pages" in host else None,
        "host_zero": int(host["zero_pages_dropped"]) if "zero_pages_dropped" in host else None,
        "host_swap_cache": cache_out,
        "host_cache_drop": int(host.get("vdisk_trimmed_pages", 0)),
    }
    out: dict[str, Any] = {
        "reclaimed_pages": reclaimed,
        "reclaimed_by_host_pages": host_out,
        "reclaimed_by_guests_pages": total("evictions"),
        "reclaimed_by_mechanism": mechanism,
        "reclaimed_clean_cache_pages": reclaimed_clean,
        "reclaim_io_pages": io,
        "io_per_reclaimed_page": round(io / reclaimed, 4) if reclaimed else 0.0,
        "clean_cache_writes_per_page": round(clean_writes / reclaimed_clean, 4) if reclaimed_clean else 0.0,
        "clean_cache_reads_per_page": round(clean_reads / reclaimed_clean, 4) if reclaimed_clean else 0.0,
        "clean_cache_io_per_page": round((clean_writes + clean_reads) / reclaimed_clean, 4) if reclaimed_clean else 0.0,
        "clean_rereads_via_host_swap": total("host_refaults_clean_file"),
        "host_took_clean_cache_pages": clean_writes,
    }
    labelled = clean_cache_io(host)
    if labelled is not None:
        w, r = labelled
        out["host_swap_writes_clean_cache"] = w
        out["host_swap_reads_clean_cache"] = r
        out["clean_cache_host_io_per_page"] = round((w + r) / clean_writes, 4) if clean_writes else 0.0
    return out


def summarize_variant(v: VariantLogs) -> dict[str, Any]:
    finished = _last(v.host, ev.RUN_FINISHED) or {}
    ticks = int(finished.get("ticks", 0))
    virtual_s = float(finished.get("vt_us", 0)) / 1e6
    host: dict[str, Any] = dict(finished.get("memory") or {})
    for key in ("peaks", "invariant_violations", "ram_pages", "rejected_requests", "uncooperative_guests",
                "grant_pages", "grant_exhausted", "held_requests", "held_across_boundary", "refill_rounds",
                "tick_done_late", "tick_done_max_over_us", "requests_past_tick_end"):
        if key in finished:
            host[key] = finished[key]
    host["refused_connections"] = finished.get("refused", 0)
    free = [e["free_frames"] for e in v.host if e.get("event") == ev.TICK_COMPLETED and "free_frames" in e]
    if free:   # host free memory over the run (the boundary's view, every logged tick)
        host["free_frames_mean"] = round(sum(free) / len(free), 1)
    guests = [_guest_entry(gid, events, virtual_s) for gid, events in sorted(v.guests.items())]
    out: dict[str, Any] = {
        "virtual_s": round(virtual_s, 6),
        "ticks": ticks,
        "wall_s": finished.get("wall_s"),
        "reason": finished.get("reason", "no run_finished event (host killed?)"),
        "guests_lost": finished.get("guests_lost", {}),
        "host": host,
        "guests": guests,
        "lost_pages": sum(int(g.get("lost_pages", 0)) for g in guests),
        "stalled_ticks": sum(1 for e in v.host if e.get("event") == ev.TICK_STALLED),
        "event_counts": event_counts(v),
        "refs_per_vsec": round(sum(g["refs_per_vsec"] for g in guests), 1),
        # deterministic: reproducible counts (hostd.discipline.deterministic); arrival: served as they came
        "request_order": finished.get("request_order", "arrival"),
    }
    out.update(reclaim_metrics(host, guests))
    out.update(lock_metrics(v, finished, guests))   # issue #6: deadlocks, lock-order violations
    out.update(pathology_metrics(v, finished, host))   # swap storms, double faults, pins, sweeps
    per_guest = ((finished.get("monitors") or {}).get("double_faults") or {}).get("guests") or {}
    for g in guests:   # the host's count (the guest may report its own as double_paging_pages)
        g["host_double_paging_pages"] = int((per_guest.get(str(g["id"])) or {}).get("double_paging_pages", 0))
    out.update(reliability_metrics(v, finished))
    out.update(decision_metrics(v, finished))   # why the balloon controller set or kept each target
    out.update(sharing_metrics(finished, host, guests))   # page sharing: frames saved vs the content classes
    out["status"], out["status_reasons"] = run_status(out, finished)
    return out


def run_status(v: dict[str, Any], finished: dict[str, Any]) -> tuple[str, list[str]]:
    """What happened to a variant, in one word (``STATUSES``) and the reasons behind it (who and why)."""
    if not finished:
        return "failed", ["the host logged no run_finished (it was killed, or crashed)"]
    reason = str(finished.get("reason", ""))
    if reason.startswith("signal"):
        return "interrupted", [f"the host was stopped: {reason}"]
    if reason == "deadlock":
        return "deadlocked", ["the host ended the run on a deadlock (deadlock_cycle)"]
    why: list[str] = []
    if reason != "completed":
        why.append(f"the run ended early: {reason}")
    lost_host = v.get("lost_pages_host")
    if v.get("lost_pages"):
        why.append(f"guests counted {v['lost_pages']} lost pages")
    if lost_host:
        why.append(f"the end-of-run audit found {lost_host} pages lost")
    if v.get("host", {}).get("invariant_violations"):
        why.append(f"{v['host']['invariant_violations']} host memory invariant violations")
    if why:
        return "failed", why
    cut = {str(g): r for g, r in (v.get("guests_cut_off") or {}).items()}
    for gid, r in sorted((v.get("guests_lost") or {}).items(), key=lambda kv: int(kv[0])):
        why.append(f"guest {gid} cut off: {cut[str(gid)]}" if str(gid) in cut else f"guest {gid} lost: {r}")
    if not v.get("audit_ok"):
        problems = v.get("audit_problems") or [str((finished.get("audit") or {}).get("reason", "not audited"))]
        why.append("the end-of-run audit failed: " + "; ".join(problems[:3]))
    return ("degraded", why) if why else ("completed", [])


def baseline_variant(names: list[str], variants: dict[str, dict[str, Any]]) -> str | None:
    """The variant others are compared against: the first that completed (never a degraded or failed one).

    Summaries written before ``status`` existed count as completed unless they
    say the variant deadlocked, lost guests or ended early.
    """
    for n in names:
        v = variants[n]
        if v.get("status", "completed") == "completed" and not v.get("deadlocked") and not v.get("guests_lost") \
                and v.get("reason", "completed") == "completed":
            return n
    return None


def reliability_metrics(v: VariantLogs, finished: dict[str, Any]) -> dict[str, Any]:
    """Issue #8's keys: the end-of-run audit, refused requests by reason, faults injected.

    ``faults_injected`` counts ``fault_injected`` events in every log of the
    variant, including ``faults.jsonl``, where injectors outside the run (a
    test, the soak benchmark) record each signal they send.
    """
    faults = points = 0
    for events in (v.host, *v.guests.values()):
        for e in events:
            name = e.get("event")
            faults += name == ev.FAULT_INJECTED
            points += name == ev.FAULT_POINT_REACHED
    injected_by = Path(v.path) / "faults.jsonl"
    if injected_by.exists():
        faults += sum(1 for e in iter_events(injected_by, [0]) if e.get("event") == ev.FAULT_INJECTED)
    audit = finished.get("audit") or {}
    return {
        "audit_ok": finished.get("audit_ok") is True,
        "audit_problems": list(audit.get("problems") or []),
        # What the host's own books show lost at the end (the audit), beside the guests' own count
        # (lost_pages); None when the run was not audited.
        "lost_pages_host": audit.get("lost_pages") if "lost_pages" in audit else None,
        "guests_cut_off": {str(g): r for g, r in (finished.get("guests_cut_off") or {}).items()},
        "refused_connections": dict(finished.get("refused_by_code") or {}),
        "peer_events": dict(finished.get("peer_events") or {}),
        "rejected_requests": dict(finished.get("rejected_requests") or {}),
        "faults_injected": faults,
        "fault_points_reached": points,
        "guests_rejoined": dict(finished.get("guests_rejoined") or {}),
    }


def event_counts(v: VariantLogs) -> dict[str, int]:
    """How many times each event other than the per-tick metrics was logged, over all processes."""
    counts: dict[str, int] = {}
    for events in (v.host, *v.guests.values()):
        for e in events:
            name = e.get("event")
            if name != ev.TICK_COMPLETED and isinstance(name, str):
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def lock_metrics(v: VariantLogs, finished: dict[str, Any], guests: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue #6's keys: the lock protocol, deadlocks and order violations (events in the host's log).

    ``deadlocks`` counts ``deadlock_detected`` events (with ``break_deadlocks``
    each broken cycle is one); ``lock_order_violations`` counts
    ``lock_order_violation`` events (one per distinct held class, acquiring
    class and site); ``deadlocked``: the run ended on a deadlock;
    ``deadlock_cycle``: the first cycle reported. ``refs_per_wall_s``: the
    guests' references per wall second from the last guest's connection to
    the end of the run (lock waits cost wall time).
    """
    locks = dict(finished.get("locks") or {})
    protocol = locks.get("protocol") or (v.config.get("locks") or {}).get("protocol")
    cycle = None
    deadlocks = violations = 0
    connected = None
    for e in v.host:
        name = e.get("event")
        if name == ev.DEADLOCK_DETECTED:
            deadlocks += 1
            cycle = cycle if cycle is not None else e.get("cycle")
        elif name == ev.LOCK_ORDER_VIOLATION:
            violations += 1
        elif name == ev.GUEST_CONNECTED:
            connected = e.get("timestamp")
    wall = _seconds_between(connected, finished.get("timestamp"))
    refs = sum(int(g.get("refs", 0)) for g in guests)
    locks.pop("first_cycle", None)
    return {
        "lock_protocol": protocol,
        "deadlocks": deadlocks,
        "lock_order_violations": violations,
        "deadlocked": finished.get("reason") == "deadlock",
        "deadlock_cycle": cycle,
        "refs_per_wall_s": round(refs / wall, 1) if wall else 0.0,
        "lock_stats": locks,
    }


def _seconds_between(start: Any, end: Any) -> float:
    from datetime import datetime
    try:
        return max(0.0, (datetime.fromisoformat(str(end).replace("Z", "+00:00"))
                         - datetime.fromisoformat(str(start).replace("Z", "+00:00"))).total_seconds())
    except ValueError:
        return 0.0


def format_lock_table(summary: dict[str, Any]) -> list[str]:
    """Variants with a lock protocol side by side: deadlocks, violations, throughput (empty if none)."""
    rows = [(name, v) for name, v in summary["variants"].items() if v.get("lock_protocol")]
    if not rows:
        return []
    base = next((v for _, v in rows if v.get("lock_protocol") == "naive" and not v.get("deadlocked")), None)
    head = ("variant", "protocol", "deadlocks", "violations", "deadlocked", "ticks", "refs/vs", "vs naive",
            "refs/wall-s", "vs naive")
    table = [head]
    for name, v in rows:
        rel = lambda key: (f"{v.get(key, 0) / base[key]:.2f}x"  # noqa: E731
                           if base and base.get(key) and not v.get("deadlocked") else "-")
        table.append((name, str(v["lock_protocol"]), str(v.get("deadlocks", 0)), str(v.get("lock_order_violations", 0)),
                      "yes" if v.get("deadlocked") else "no", str(v.get("ticks", 0)), f"{v.get('refs_per_vsec', 0):.0f}",
                      rel("refs_per_vsec"), f"{v.get('refs_per_wall_s', 0):.0f}", rel("refs_per_wall_s")))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["", "locks: " + ("throughput relative to the naive variant that ran to its end"
                              if base else "no naive variant ran to its end to compare with")]
    lines += ["   " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    for name, v in rows:
        if v.get("deadlock_cycle"):
            lines.append(f"   {name}: first cycle: " + "; ".join(
                f"{e.get('proc')}/{e.get('task')} holds {e.get('holds_lock')} waits for {e.get('waits_for_lock')}"
                for e in v["deadlock_cycle"]))
    return lines


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return path


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"scenario {summary['scenario']}  seed {summary['seed']}"]
    for name, v in summary["variants"].items():
        lines.append("")
        lines.append(f"== {name}: {v.get('status', '?').upper()}: {v['ticks']} ticks, {v['virtual_s']:.2f} virtual s, "
                     f"{v['wall_s'] if v['wall_s'] is not None else '?'} wall s, {v['reason']}")
        for why in v.get("status_reasons") or []:
            lines.append(f"   {why}")
        host = v["host"]
        shown = {k: host.get(k) for k in HOST_TABLE_KEYS if k in host}
        lines.append("   host: " + "  ".join(f"{k}={val}" for k, val in shown.items()))
        mech = v.get("reclaimed_by_mechanism") or {}
        clean = (f"clean cache under host swap: {v['host_swap_writes_clean_cache']} writes + "
                 f"{v['host_swap_reads_clean_cache']} reads ({v.get('clean_cache_host_io_per_page')} I/O per page)"
                 if "host_swap_writes_clean_cache" in v else "clean cache host I/O: not labelled by this host")
        lines.append(f"   reclaimed {v.get('reclaimed_pages', 0)} pages, {v.get('io_per_reclaimed_page', 0)} I/O per page; "
                     "by mechanism: " + " ".join(f"{k}={val}" for k, val in mech.items())
                     + f"; {clean}; throughput {v.get('refs_per_vsec', 0)} refs/vs")
        lines.extend(pathology_lines(v))
        lines.extend(sharing_lines(v))
        cols = ["id", "refs", "refs_per_vsec", "major_faults", "minor_faults", "disk_read_pages",
                "disk_write_pages", "ept_faults", "balloon_pages", "lost_pages"]
        cols = [c for c in cols if any(c in g for g in v["guests"])]
        widths = [max(len(c), *(len(str(g.get(c, ""))) for g in v["guests"])) for c in cols] if v["guests"] else []
        lines.append("   " + "  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for g in v["guests"]:
            lines.append("   " + "  ".join(str(g.get(c, "")).rjust(w) for c, w in zip(cols, widths)))
        if v["guests_lost"]:
            lines.append(f"   guests lost: {v['guests_lost']}")
        lines.append(f"   lost pages: {v['lost_pages']}" + (f" (the host's audit: {v['lost_pages_host']})"
                                                          if v.get("lost_pages_host") is not None else ""))
    lines.extend(format_lock_table(summary))
    return "\n".join(lines)
