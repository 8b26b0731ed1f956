"""Ranking the variants of a run: throughput, host swap I/O, fairness and time to settle.

For a scenario whose variants are controllers on the same guests, seed and
host (``policies``), the report ranks them on four scores:

- **throughput**: references per virtual second, all guests (higher is better);
- **host swap I/O**: pages the host swapped out plus in (lower);
- **fairness**: Jain's index ``(sum x)^2 / (n sum x^2)`` of the guests'
  throughput, each guest's throughput taken relative to the best that guest
  reached in any ranked variant (1: every guest kept the same share of its
  best; 1/n: one guest got it all). Raw throughput is not compared across
  guests because the guests run different workloads; the raw index is
  shown beside it (higher is better);
- **time to settle**: the virtual time after which every guest's balloon
  target stays within ``band_fraction`` (5 %) of its RAM around its final
  target, as in a step response's settling time; a target is in force from
  the end of the tick that set it. 0 when no target ever left the band
  (lower).

Each score ranks the variants (1 = best, ties share the better rank); the
overall order is by mean rank, ties by throughput. Only variants that ran
to their end are ranked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from balloonlab.proto import events as ev

from .logs import VariantLogs, event_vt_us

__all__ = ["jain_index", "settle_time_s", "Score", "scores", "rank", "ranking_section", "SCORES", "BAND_FRACTION"]

BAND_FRACTION = 0.05

# name, label, higher is better
SCORES: tuple[tuple[str, str, bool], ...] = (
    ("throughput", "throughput (refs/virtual s) ↑", True),
    ("host_swap_io_pages", "host swap I/O (pages) ↓", False),
    ("fairness", "fairness (Jain, vs each guest's best) ↑", True),
    ("settle_s", "time to settle (virtual s) ↓", False),
)


def jain_index(xs: Sequence[float]) -> float | None:
    """Jain's fairness index of ``xs``; None for no values, 1 when all are 0 (nobody is favoured)."""
    if not xs:
        return None
    total = float(sum(xs))
    squares = float(sum(x * x for x in xs))
    if squares == 0:
        return 1.0
    return total * total / (len(xs) * squares)


def settle_time_s(target_events: Sequence[Mapping[str, Any]], tick_us: float, ram_pages: Mapping[int, int],
                  band_fraction: float = BAND_FRACTION) -> float:
    """When the last guest's balloon target entered, for good, the band around its final target."""
    by_guest: dict[int, list[tuple[float, int, int]]] = {}
    for e in target_events:
        vt = event_vt_us(dict(e), tick_us)
        gid = e.get("guest")
        if vt is None or not isinstance(gid, int):
            continue
        by_guest.setdefault(gid, []).append((vt + tick_us, int(e.get("previous_pages", 0)), int(e["target_pages"])))
    settle_us = 0.0
    for gid, changes in by_guest.items():
        changes.sort(key=lambda c: c[0])
        final = changes[-1][2]
        band = band_fraction * ram_pages.get(gid, 0)
        level = 0   # every guest starts with no balloon
        for at_us, previous, target in changes:
            level = previous if previous is not None else level
            if abs(level - final) > band:
                settle_us = max(settle_us, at_us)   # until this change it was still outside the band
            level = target
    return settle_us / 1e6


@dataclass(frozen=True)
class Score:
    throughput: float
    host_swap_io_pages: float
    fairness: float | None
    fairness_raw: float | None
    settle_s: float


def _ram_pages(v: VariantLogs) -> dict[int, int]:
    out: dict[int, int] = {}
    for g in v.config.get("guests") or []:
        if isinstance(g, dict) and isinstance(g.get("id"), int) and isinstance(g.get("ram_pages"), int):
            out[g["id"]] = g["ram_pages"]
    return out


def _tick_us(v: VariantLogs) -> float:
    t = v.config.get("tick_us")
    return float(t) if isinstance(t, (int, float)) and t > 0 else 10_000.0


def ranked_names(names: Sequence[str], variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The variants that ran to their end with every guest: the only ones a ranking may compare."""
    return [n for n in names if not variants[n].get("guests_lost") and not variants[n].get("deadlocked")
            and variants[n].get("reason", "completed") == "completed"]


def scores(names: Sequence[str], variants: Mapping[str, Mapping[str, Any]],
           logs: Mapping[str, VariantLogs], band_fraction: float = BAND_FRACTION) -> dict[str, Score]:
    """Each ranked variant's four scores (``variants``: summary.json's; ``logs``: the variants' logs)."""
    names = ranked_names(names, variants)
    per_guest = {n: {int(g["id"]): float(g.get("refs_per_vsec", 0.0)) for g in variants[n].get("guests") or []}
                 for n in names}
    best: dict[int, float] = {}
    for tp in per_guest.values():
        for gid, x in tp.items():
            best[gid] = max(best.get(gid, 0.0), x)
    out: dict[str, Score] = {}
    for n in names:
        v = variants[n]
        host = v.get("host") or {}
        tp = per_guest[n]
        relative = [x / best[gid] if best.get(gid) else 0.0 for gid, x in sorted(tp.items())]
        settle = 0.0
        if n in logs:
            lv = logs[n]
            targets = [e for e in lv.host if e.get("event") == ev.BALLOON_TARGET_SET]
            settle = settle_time_s(targets, _tick_us(lv), _ram_pages(lv), band_fraction)
        out[n] = Score(throughput=float(v.get("refs_per_vsec", 0.0)),
                       host_swap_io_pages=float(host.get("swap_out_pages", 0)) + float(host.get("swap_in_pages", 0)),
                       fairness=jain_index(relative), fairness_raw=jain_index(list(tp.values())), settle_s=settle)
    return out


def _ranks(values: Mapping[str, float | None], higher_is_better: bool) -> dict[str, int]:
    """Competition ranking (1, 2, 2, 4): ties share the better rank; a missing value ranks last."""
    def key(x: float | None) -> float:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return math.inf
        return -x if higher_is_better else x
    keyed = {n: key(x) for n, x in values.items()}
    return {n: 1 + sum(1 for m in keyed if keyed[m] < keyed[n]) for n in keyed}


def rank(table: Mapping[str, Score]) -> list[dict[str, Any]]:
    """One row per variant, best first: its scores, its rank on each and its mean rank."""
    per_score = {name: _ranks({n: getattr(s, name) for n, s in table.items()}, higher)
                 for name, _, higher in SCORES}
    rows = []
    for n, s in table.items():
        ranks = {name: per_score[name][n] for name, _, _ in SCORES}
        rows.append({"variant": n, **{k: getattr(s, k) for k in ("throughput", "host_swap_io_pages", "fairness",
                                                                 "fairness_raw", "settle_s")},
                     "ranks": ranks, "mean_rank": sum(ranks.values()) / len(ranks)})
    rows.sort(key=lambda r: (r["mean_rank"], -r["throughput"], r["variant"]))
    for i, r in enumerate(rows, 1):
        r["position"] = i
    return rows


def _fmt(x: float | None, digits: int) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def ranking_section(names: Sequence[str], variants: Mapping[str, Mapping[str, Any]],
                    logs: Sequence[VariantLogs]) -> list[str]:
    """The report's "Ranking" section (markdown lines); empty with fewer than two ranked variants."""
    table = scores(names, variants, {v.name: v for v in logs})
    if len(table) < 2:
        return []
    rows = rank(table)
    out = ["### Ranking", "",
           "Each score ranks the variants (1 = best; in parentheses); the order is by mean rank. Fairness is "
           "Jain's index of the guests' throughput, each relative to the best that guest reached in any variant "
           "(raw: of the throughputs themselves); time to settle: when every balloon target stayed within "
           f"{BAND_FRACTION:.0%} of the guest's RAM around its final value (`balloonlab/analysis/ranking.py`).", "",
           "| # | variant | " + " | ".join(label for _, label, _ in SCORES) + " | Jain, raw | mean rank |",
           "|---:|---|" + "---:|" * (len(SCORES) + 2)]
    for r in rows:
        cells = [f"{_fmt(r['throughput'], 0)} ({r['ranks']['throughput']})",
                 f"{_fmt(r['host_swap_io_pages'], 0)} ({r['ranks']['host_swap_io_pages']})",
                 f"{_fmt(r['fairness'], 3)} ({r['ranks']['fairness']})",
                 f"{_fmt(r['settle_s'], 2)} ({r['ranks']['settle_s']})"]
        out.append(f"| {r['position']} | `{r['variant']}` | " + " | ".join(cells)
                   + f" | {_fmt(r['fairness_raw'], 3)} | {r['mean_rank']:.2f} |")
    left_out = [n for n in names if n not in table]
    if left_out:
        out += ["", "Not ranked (did not run to its end with every guest): " + ", ".join(f"`{n}`" for n in left_out)]
    return out + [""]
