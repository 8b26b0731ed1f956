"""The pathologies of issue #5 in ``summary.json``: what the host's monitors found, and the thrashing curve.

``pathology_metrics`` adds, per variant:

- each host monitor's keys (``hostd.monitors.registry.MONITORS``; each
  monitor's module says which): swap storms, double faults and double
  paging, the pins of swap areas and what they cost, the host's I/O-buffer
  and disk-cache peaks, the "central banker" convergence report;
- ``throughput``: references per virtual second of all guests before the
  first balloon inflation and after it;
- ``balloon_sweep`` (when a guest's balloon was stepped): one row per step
  (balloon size, the guest's free memory, throughput, faults per virtual
  second, its working-set estimate) with the true working set next to it
  and where the knee is.
"""
from __future__ import annotations

from typing import Any, Mapping

from balloonlab.hostd.monitors import registry as monitor_registry
from balloonlab.proto import events as ev

from .logs import VariantLogs

__all__ = ["pathology_metrics", "pathology_lines", "true_working_set_pages", "sweep_curve", "pinning_cure",
           "KNEE_THROUGHPUT_FRACTION"]

KNEE_THROUGHPUT_FRACTION = 0.5
"""The knee is the first step whose throughput is below this fraction of the first step's."""


def true_working_set_pages(guest: Mapping[str, Any]) -> int | None:
    """Pages the guest's workload references over and over, from its config; None if not definable.

    ``anon-hot``: its ``ws_pages`` (or its region); ``phases``: its window;
    a looping ``scan``: its region; ``anon-cold`` and a one-pass ``scan``:
    nothing after the first touch. Skewed workloads (``db``, ``zipf``) and
    traces have no sharp working set: None.
    """
    try:
        from balloonlab.guestd.config import guest_config_from_mapping
        cfg = guest_config_from_mapping(guest)
    except Exception:  # a config this version cannot read: no claim
        return None
    regions = {r.name: r for r in cfg.kernel.layout.regions}
    total = 0
    for spec in cfg.workload:
        kind = spec.get("kind")
        region = regions.get(spec.get("region", ""))
        if region is None:
            return None
        if kind in ("anon-hot", "phases"):
            total += int(spec.get("ws_pages", region.pages if kind == "anon-hot" else max(1, region.pages // 4)))
        elif kind == "scan":
            total += region.pages if spec.get("loop", True) else 0
        elif kind == "anon-cold":
            continue
        else:
            return None
    return total


def _ticks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((e for e in events if e.get("event") == ev.TICK_COMPLETED and isinstance(e.get("tick"), int)),
                  key=lambda e: e["tick"])


def _num(e: Mapping[str, Any], key: str) -> float:
    v = e.get(key, 0)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def sweep_curve(events: list[dict[str, Any]], true_ws: int | None) -> dict[str, Any] | None:
    """One row per balloon size the guest held for at least two logged ticks; None if it never changed."""
    ticks = [e for e in _ticks(events) if "balloon_actual_pages" in e]
    if len({int(_num(e, "balloon_target_pages")) for e in ticks}) < 2:
        return None
    groups: list[list[dict[str, Any]]] = []
    for e in ticks:
        settled = _num(e, "balloon_actual_pages") == _num(e, "balloon_target_pages")
        if not settled:
            continue
        if groups and _num(groups[-1][-1], "balloon_actual_pages") == _num(e, "balloon_actual_pages"):
            groups[-1].append(e)
        else:
            groups.append([e])
    rows = []
    for grp in groups:
        first, last = grp[0], grp[-1]
        dt = _num(last, "vt_us") - _num(first, "vt_us")
        if len(grp) < 2 or dt <= 0:
            continue
        faults = (_num(last, "major_faults") + _num(last, "minor_faults")
                  - _num(first, "major_faults") - _num(first, "minor_faults"))
        balloon = int(_num(last, "balloon_actual_pages"))
        ws_est = sorted(int(_num(e, "working_set_pages")) for e in grp)
        rows.append({
            "balloon_pages": balloon,
            "guest_free_pages": int(_num(last, "total") - _num(last, "kernel_pages") - balloon),
            "ticks": [int(first["tick"]), int(last["tick"])],
            "refs_per_vsec": round((_num(last, "refs") - _num(first, "refs")) * 1e6 / dt, 1),
            "faults_per_vsec": round(faults * 1e6 / dt, 1),
            "major_faults_per_vsec": round((_num(last, "major_faults") - _num(first, "major_faults")) * 1e6 / dt, 1),
            "pff": round(_num(last, "pff"), 1),
            "working_set_estimate_pages": ws_est[len(ws_est) // 2],
            "true_working_set_pages": true_ws,
        })
    if not rows:
        return None
    base = max(rows[0]["refs_per_vsec"], 1e-9)
    knee = next((i for i, r in enumerate(rows) if r["refs_per_vsec"] < KNEE_THROUGHPUT_FRACTION * base), None)
    out: dict[str, Any] = {"true_working_set_pages": true_ws, "steps": rows,
                           "baseline_refs_per_vsec": rows[0]["refs_per_vsec"],
                           "knee_balloon_pages": None, "knee_guest_free_pages": None,
                           "last_good_guest_free_pages": rows[-1]["guest_free_pages"]}
    if knee is not None:
        out["knee_balloon_pages"] = rows[knee]["balloon_pages"]
        out["knee_guest_free_pages"] = rows[knee]["guest_free_pages"]
        out["knee_refs_per_vsec"] = rows[knee]["refs_per_vsec"]
        out["last_good_guest_free_pages"] = rows[knee - 1]["guest_free_pages"] if knee > 0 else None
        out["working_set_estimate_at_knee_pages"] = rows[knee - 1]["working_set_estimate_pages"] if knee else None
    return out


def _throughput(v: VariantLogs) -> dict[str, Any]:
    """All guests' references per (guest) virtual second before and after the first inflation."""
    first = next((int(e["tick"]) for e in v.host if e.get("event") == ev.BALLOON_TARGET_SET
                  and _num(e, "target_pages") > 0 and isinstance(e.get("tick"), int)), None)
    before = after = 0.0
    for events in v.guests.values():
        ticks = _ticks(events)
        if not ticks:
            continue
        split = [e for e in ticks if first is not None and e["tick"] < first]
        pivot = split[-1] if split else None
        last = ticks[-1]
        if pivot is not None and _num(pivot, "vt_us") > 0:
            before += _num(pivot, "refs") * 1e6 / _num(pivot, "vt_us")
        base_refs, base_vt = (_num(pivot, "refs"), _num(pivot, "vt_us")) if pivot is not None else (0.0, 0.0)
        if _num(last, "vt_us") > base_vt:
            after += (_num(last, "refs") - base_refs) * 1e6 / (_num(last, "vt_us") - base_vt)
    return {"first_inflation_tick": first, "before_inflation_refs_per_vsec": round(before, 1),
            "after_inflation_refs_per_vsec": round(after, 1)}


def _rate(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> float | None:
    """References per (guest) virtual second between two of a guest's logged ticks (``a`` None: the start)."""
    if b is None:
        return None
    refs0, vt0 = (_num(a, "refs"), _num(a, "vt_us")) if a is not None else (0.0, 0.0)
    dt = _num(b, "vt_us") - vt0
    return round((_num(b, "refs") - refs0) * 1e6 / dt, 1) if dt > 0 else None


def pinning_cure(v: VariantLogs) -> dict[str, Any] | None:
    """The pins judged by throughput: each pinned guest's refs/vs before and after its (first) pin; None if no pin."""
    pins: dict[int, int] = {}
    for e in v.host:
        if e.get("event") == ev.SWAP_AREA_PINNED and isinstance(e.get("guest"), int) and isinstance(e.get("tick"), int):
            pins.setdefault(e["guest"], e["tick"])
    if not pins:
        return None
    guests = {}
    for gid, tick in sorted(pins.items()):
        ticks = _ticks(v.guests.get(gid, []))
        before = [e for e in ticks if e["tick"] <= tick]
        pivot = before[-1] if before else None
        last = ticks[-1] if ticks else None
        guests[str(gid)] = {"pinned_tick": tick, "refs_per_vsec_before_pin": _rate(None, pivot),
                            "refs_per_vsec_after_pin": _rate(pivot, last) if last is not pivot else None}
    tot = lambda key: round(sum(g[key] or 0.0 for g in guests.values()), 1)  # noqa: E731
    return {"first_pin_tick": min(pins.values()), "guests": guests,
            "pinned_guests_refs_per_vsec_before_pin": tot("refs_per_vsec_before_pin"),
            "pinned_guests_refs_per_vsec_after_pin": tot("refs_per_vsec_after_pin")}


def pathology_metrics(v: VariantLogs, finished: Mapping[str, Any], host: dict[str, Any]) -> dict[str, Any]:
    """Keys to merge into a variant's summary; adds its ``host.*`` keys to ``host`` in place."""
    mon = finished.get("monitors") or {}
    out: dict[str, Any] = {}
    for spec in monitor_registry.MONITORS:
        if spec.summarize is not None:
            keys = spec.summarize(mon, v.host, finished)
            host.update(keys.host)
            out.update(keys.variant)
    out["throughput"] = _throughput(v)
    cure = pinning_cure(v)
    if cure is not None:
        out["pinning"] = cure
    if (v.config.get("balloon") or {}).get("policy") == "sweep":
        guests_cfg = {int(g["id"]): g for g in v.config.get("guests", []) if isinstance(g.get("id"), int)}
        curves = {}
        for gid, events in sorted(v.guests.items()):
            curve = sweep_curve(events, true_working_set_pages(guests_cfg.get(gid, {})))
            if curve is not None:
                curves[str(gid)] = curve
        out["balloon_sweep"] = curves
    return out


def pathology_lines(v: Mapping[str, Any]) -> list[str]:
    """A variant's pathology numbers for the summary table."""
    out: list[str] = []
    if "throughput" in v:   # a summary written since the pathologies were
        tp = v.get("throughput", {})
        parts = [spec.table_fragment(v) for spec in monitor_registry.MONITORS if spec.table_fragment is not None]
        out.append("   pathologies: " + "  ".join(parts)
                   + f"  refs/vs before/after the first inflation: {tp.get('before_inflation_refs_per_vsec')} -> "
                   f"{tp.get('after_inflation_refs_per_vsec')}")
    for spec in monitor_registry.MONITORS:
        if spec.table_lines is not None:
            out += spec.table_lines(v)
    for gid, c in (v.get("balloon_sweep") or {}).items():
        knee = (f"knee at balloon {c['knee_balloon_pages']} pages, guest free {c['knee_guest_free_pages']} "
                f"(last good {c['last_good_guest_free_pages']})" if c.get("knee_balloon_pages") is not None
                else f"no knee (lowest guest free {c.get('last_good_guest_free_pages')})")
        est = c.get("working_set_estimate_at_knee_pages")
        if est is None and c.get("steps"):
            est = c["steps"][-1]["working_set_estimate_pages"]
        out.append(f"   sweep guest {gid}: {len(c.get('steps', []))} steps, {knee}; true working set "
                   f"{c.get('true_working_set_pages')}, guest's estimate {est}")
    return out
