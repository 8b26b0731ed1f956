"""Headline metrics side by side, with ratios: variants of a run, or runs against each other.

    balloonlab-analyze compare RUN_A RUN_B ... [--out FILE]

Each column is one variant of one run. The first run is the baseline: a
column's ratio is its value over the same variant's value in the first run
(or, for a variant the first run does not have, over the first run's first
variant). With a single run, the variants are compared against its first.
A ratio of two zeros is 1 (nothing changed); over a zero it is ``inf``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from balloonlab.hostd.monitors.registry import MONITORS
from balloonlab.proto import events as ev

__all__ = ["HEADLINE", "Metric", "Column", "headline_value", "ratio", "compare_table", "compare_runs",
           "load_run_summary", "format_value", "format_ratio"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    get: Callable[[dict[str, Any]], Any]
    better: str = ""   # "lower", "higher" or "" (neither: a count to read, not to minimise)
    text: bool = False  # a word (how the run ended), shown as is, no ratio


def _host(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda v: (v.get("host") or {}).get(key)


def _guests_sum(key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(v: dict[str, Any]) -> float | None:
        gs = [g[key] for g in v.get("guests") or [] if isinstance(g.get(key), (int, float))]
        return float(sum(gs)) if gs else None
    return get


def _events(*const_names: str, summary_key: str | None = None) -> Callable[[dict[str, Any]], float | None]:
    """Count of the named events; looked up in proto.events by name so that events added later count as they land."""
    def get(v: dict[str, Any]) -> float | None:
        if summary_key is not None and isinstance(v.get(summary_key), (int, float)):
            return float(v[summary_key])
        counts = v.get("event_counts")
        if not isinstance(counts, dict):
            return None  # a summary.json written before event counts existed
        return float(sum(counts.get(getattr(ev, c), 0) for c in const_names if hasattr(ev, c)))
    return get


def _sharing(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda v: (v.get("sharing") or {}).get(key)


def _mechanism(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda v: (v.get("reclaimed_by_mechanism") or {}).get(key)


HEADLINE: tuple[Metric, ...] = (
    Metric("reason", "how the run ended", lambda v: v.get("reason"), text=True),
    Metric("refs_per_vsec", "throughput (references per virtual s, all guests)", lambda v: v.get("refs_per_vsec"),
           "higher"),
    Metric("host_swap_out_pages", "host swap-out (pages)", _host("swap_out_pages"), "lower"),
    Metric("host_swap_in_pages", "host swap-in (pages)", _host("swap_in_pages"), "lower"),
    Metric("host_swap_write_pages", "host swap writes (pages; the swap cache and compression avoid some)",
           _host("swap_write_pages"), "lower"),
    # Compression, zero pages and free page reporting (hostd.compress, guestd.reporting); absent when off.
    Metric("host_compressed_pages", "host compression: pages compressed into the cache",
           _host("compressed_pages")),
    Metric("host_decompressed_pages", "host compression: faults served by decompression (no I/O)",
           _host("decompressed_pages")),
    Metric("host_compress_spilled_pages", "host compression: oldest pages written to swap",
           _host("compress_spilled_pages")),
    Metric("host_compress_cpu_us", "host compression and zero checks: CPU (virtual µs)", _host("compress_cpu_us")),
    Metric("host_zero_pages_dropped", "host zero pages dropped (no slot, no I/O)", _host("zero_pages_dropped")),
    # the guests' counts: present only where their reporter is on
    Metric("pages_reported", "free page reporting: pages reported", _guests_sum("pages_reported")),
    Metric("frames_discarded", "free page reporting: host frames discarded", _guests_sum("frames_discarded")),
    Metric("host_free_frames_mean", "host free frames, mean over the ticks", _host("free_frames_mean"), "higher"),
    # Reclaimed pages by mechanism, each counted where it happens (summary.reclaim_metrics).
    Metric("reclaimed_balloon_frames", "reclaimed: host frames freed by balloon inflation", _mechanism("balloon_frames")),
    Metric("reclaimed_guest_for_balloon", "reclaimed: guest evictions to fill its balloon",
           _mechanism("guest_for_balloon")),
    Metric("reclaimed_guest_own", "reclaimed: guest evictions of its own (paging, reclaim)", _mechanism("guest_own")),
    Metric("reclaimed_host_swap", "reclaimed: guest pages swapped out by the host", _mechanism("host_swap")),
    Metric("reclaimed_host_compress", "reclaimed: guest pages the host compressed", _mechanism("host_compress")),
    Metric("reclaimed_host_zero", "reclaimed: zero pages the host dropped", _mechanism("host_zero")),
    Metric("reclaimed_host_swap_cache", "reclaimed: host disk-cache pages swapped out", _mechanism("host_swap_cache")),
    Metric("reclaimed_host_cache_drop", "reclaimed: host disk-cache pages dropped", _mechanism("host_cache_drop")),
    # Page sharing (hostd/sharing.py), against what the guests' content classes allow (analysis.sharing).
    Metric("sharing_saved_frames", "page sharing: host frames saved", _sharing("saved_frames"), "higher"),
    Metric("sharing_image_saved_of_bound", "page sharing: image frames saved / what the image allows",
           _sharing("image_saved_of_bound"), "higher"),
    Metric("sharing_cow_breaks", "page sharing: copy-on-write breaks", _sharing("cow_breaks"), "lower"),
    Metric("io_per_reclaimed_page", "disk I/O per reclaimed page", lambda v: v.get("io_per_reclaimed_page"),
           "lower"),
    # The seed's clean page cache, by the host's real swap I/O on pages the guests labelled clean.
    Metric("host_swap_writes_clean_cache", "host swap writes of clean page cache (labelled)",
           lambda v: v.get("host_swap_writes_clean_cache"), "lower"),
    Metric("host_swap_reads_clean_cache", "host swap reads of clean page cache (labelled)",
           lambda v: v.get("host_swap_reads_clean_cache"), "lower"),
    Metric("clean_cache_host_io_per_page", "host swap I/O per clean-cache page it took (labelled)",
           lambda v: v.get("clean_cache_host_io_per_page"), "lower"),
    Metric("major_faults", "guest major faults (disk)", _guests_sum("major_faults"), "lower"),
    Metric("minor_faults", "guest minor faults", _guests_sum("minor_faults"), "lower"),
    Metric("ept_faults", "EPT faults (pages the host backed)", _host("ept_faults"), "lower"),
    Metric("balloon_pages", "balloon size at the end (pages, all guests)", _guests_sum("balloon_pages")),
    Metric("balloon_target_pages", "balloon target at the end (pages, all guests)",
           _guests_sum("balloon_target_pages")),
    Metric("lost_pages", "lost pages (integrity; must be 0)", lambda v: v.get("lost_pages"), "lower"),
    Metric("deadlocks", "deadlocks detected", _events("DEADLOCK_DETECTED", summary_key="deadlocks"), "lower"),
    Metric("lock_order_violations", "lock-order violations", _events("LOCK_ORDER_VIOLATION"), "lower"),
    # the host monitors' rows (hostd.monitors.registry), in the registry's order
    *(Metric(h.key, h.label, h.get, h.better) for spec in MONITORS for h in spec.headline),
    Metric("stalled_ticks", "stalled ticks (watchdog)", lambda v: v.get("stalled_ticks"), "lower"),
    Metric("guests_lost", "guests lost", lambda v: float(len(v.get("guests_lost") or {})), "lower"),
    Metric("virtual_s", "virtual seconds run", lambda v: v.get("virtual_s")),
)
"""The metrics a researcher reads first, in the order the report and ``compare`` show them."""


def headline_value(metric: Metric, variant: dict[str, Any]) -> float | None:
    try:
        x = metric.get(variant)
    except (TypeError, ValueError, KeyError):
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``; two zeros are 1 (unchanged); a nonzero over zero is ``inf``; missing is None."""
    if value is None or base is None:
        return None
    if base == 0:
        return 1.0 if value == 0 else math.inf
    return value / base


def format_value(x: float | None) -> str:
    if x is None:
        return "—"
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 0.01 else f"{x:.4g}" if abs(x) < 100 else f"{x:.1f}"


def format_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    if math.isinf(r):
        return "inf"
    return f"{r:.2f}x"


@dataclass
class Column:
    label: str
    variant: dict[str, Any]
    baseline: int | None   # index of the column it is compared against; None for a baseline


def compare_table(columns: Sequence[Column], metrics: Sequence[Metric] = HEADLINE) -> tuple[str, list[dict[str, Any]]]:
    """A markdown table (metrics down, columns across, ``value (ratio)`` cells) and the same as rows of data."""
    rows: list[dict[str, Any]] = []
    header = ["metric", *(c.label for c in columns)]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "---|" + "---:|" * len(columns)]
    for m in metrics:
        if m.text:
            words = [m.get(c.variant) for c in columns]
            if all(w is None for w in words):
                continue
            lines.append("| " + " | ".join([_cell(m.label), *(_cell(str(w)) if w is not None else "—" for w in words)])
                         + " |")
            rows.append({"metric": m.key, "label": m.label, "better": None, "values": words,
                         "ratios": [None] * len(columns), "ratio_infinite": [False] * len(columns)})
            continue
        values = [headline_value(m, c.variant) for c in columns]
        ratios = [ratio(values[i], values[c.baseline]) if c.baseline is not None else None
                  for i, c in enumerate(columns)]
        if all(v is None for v in values):
            continue
        cells = []
        for v, r, c in zip(values, ratios, columns):
            cell = format_value(v)
            if c.baseline is not None and r is not None:
                cell += f" ({format_ratio(r)})"
            cells.append(cell)
        label = m.label + {"lower": " ↓", "higher": " ↑"}.get(m.better, "")
        lines.append("| " + " | ".join([_cell(label), *cells]) + " |")
        rows.append({"metric": m.key, "label": m.label, "better": m.better or None, "values": values,
                     "ratios": [None if r is None or math.isinf(r) else round(r, 6) for r in ratios],
                     "ratio_infinite": [r is not None and math.isinf(r) for r in ratios]})
    return "\n".join(lines), rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def load_run_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary, recomputed from its logs when they are there (so every key is current), else summary.json."""
    from .logs import find_variants
    from .summary import summarize

    run_dir = Path(run_dir)
    try:
        find_variants(run_dir)
    except FileNotFoundError:
        path = run_dir / "summary.json"
        if not path.exists():
            raise FileNotFoundError(f"{run_dir}: neither logs (host.jsonl) nor summary.json") from None
        return json.loads(path.read_text())
    return summarize(run_dir)


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    labels = []
    for i, d in enumerate(run_dirs):
        name = Path(d).resolve().name or str(d)
        labels.append(name if name not in labels else f"{name}#{i + 1}")
    return labels


def compare_runs(run_dirs: Sequence[Path], summaries: Sequence[dict[str, Any]] | None = None,
                 order: Callable[[Path, dict[str, Any]], list[str]] | None = None) -> tuple[str, dict[str, Any]]:
    """The comparison of ``run_dirs`` as markdown text and as data (what ``compare.json`` holds)."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    summaries = list(summaries) if summaries is not None else [load_run_summary(d) for d in run_dirs]
    labels = _run_labels(run_dirs)
    columns: list[Column] = []
    first: dict[str, int] = {}
    for r, (d, s, label) in enumerate(zip(run_dirs, summaries, labels)):
        names = order(Path(d), s) if order is not None else list(s.get("variants", {}))
        # One run: its variants against the first that completed (a degraded one is no yardstick).
        from .summary import baseline_variant
        yardstick = baseline_variant(names, s["variants"]) if len(run_dirs) == 1 else None
        for name in names:
            v = s["variants"][name]
            col_label = name if len(run_dirs) == 1 else f"{label}/{name}"
            if r == 0:
                base = (names.index(yardstick) if yardstick is not None and name != yardstick else None) \
                    if len(run_dirs) == 1 else None
                first[name] = len(columns)
            else:
                base = first.get(name, 0)
            columns.append(Column(col_label, v, base))
    table, rows = compare_table(columns)
    head = ["# balloonlab compare", ""]
    for d, s, label in zip(run_dirs, summaries, labels):
        head.append(f"- `{label}`: {Path(d)} — scenario {s.get('scenario', '?')}, seed {s.get('seed', '?')}, "
                    f"variants {', '.join(s.get('variants', {})) or '—'}")
    if len(run_dirs) == 1:
        yard = next((c.label for c in columns if c.baseline is None and any(x.baseline is not None for x in columns)),
                    None)
        head.append(f"\nRatios are against the first variant that completed, `{yard}`." if yard else
                    "\nNo ratios: no variant completed, or there is only one.")
    else:
        head.append(f"\nRatios are against the same variant of the first run, `{labels[0]}`.")
    head.append("↓: lower is better; ↑: higher is better.\n")
    text = "\n".join(head) + "\n" + table + "\n"
    data = {"runs": [str(d) for d in run_dirs], "columns": [c.label for c in columns],
            "baselines": [c.baseline for c in columns], "rows": rows}
    return text, data
