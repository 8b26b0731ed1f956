"""A sweep's results: the tidy table of runs, mean and 95 % CI per cell, and the plots.

- ``runs.csv``: one row per run and variant: ``cell``, ``seed``, one column
  per grid axis (its dotted key), ``variant``, ``status`` (``ok`` /
  ``failed``), ``attempts``, ``wall_s``, ``error``, and the headline metrics
  of summary.json (``balloonlab.analysis.compare.HEADLINE``: throughput,
  host swap, reclaim and its I/O, faults, balloon sizes, lost pages, ...).
- ``summary.csv``: per grid point and variant and metric, over the seeds
  whose run finished: ``n``, ``mean``, ``std``, ``ci95_low``, ``ci95_high``
  (Student's t with n - 1 degrees of freedom; NaN with one seed).
  ``summary.md`` shows the same for the plotted metrics as mean ± half-width.
- ``plots/METRIC-vs-AXIS.png`` and ``.svg``: the metric's mean against a
  grid axis (numeric values on a numeric axis, others evenly spaced), one
  line per value of the other axes (and per variant when there are
  several), the 95 % interval as a band.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from balloonlab.analysis.compare import HEADLINE

from .spec import SweepSpec
from .stats import mean_ci

__all__ = ["runs_table", "summary_table", "summary_markdown", "plot_sweep", "METRICS", "DEFAULT_PLOT_METRICS"]

METRICS = tuple(m.key for m in HEADLINE if not m.text)
DEFAULT_PLOT_METRICS = ("refs_per_vsec", "host_swap_out_pages", "io_per_reclaimed_page", "major_faults")
_GET = {m.key: m.get for m in HEADLINE}


def _number(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def runs_table(spec: SweepSpec, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    axes = [a.path for a in spec.axes]
    rows = []
    for rec in records:
        base: dict[str, Any] = {"cell": rec["key"], "seed": rec["seed"]}
        base.update({path: value for path, value in rec.get("values", [])})
        meta = {"status": rec.get("status"), "attempts": rec.get("attempts"), "wall_s": rec.get("wall_s"),
                "worker": rec.get("worker"), "error": rec.get("error")}
        variants = ((rec.get("summary") or {}).get("variants") or {})
        if not variants:
            rows.append({**base, "variant": None, **meta, "reason": None, **{k: math.nan for k in METRICS}})
            continue
        for name, v in variants.items():
            row = {**base, "variant": name, **meta, "reason": v.get("reason")}
            row.update({k: _number(_GET[k](v)) for k in METRICS})
            rows.append(row)
    cols = ["cell", "seed", *axes, "variant", "status", "attempts", "wall_s", "worker", "error", "reason", *METRICS]
    df = pd.DataFrame.from_records(rows, columns=cols)
    return df.sort_values([*axes, "variant", "seed"], kind="stable", key=_sort_key).reset_index(drop=True)


def _sort_key(col: pd.Series) -> pd.Series:
    return col.map(lambda x: (0, x, "") if isinstance(x, (int, float)) and not isinstance(x, bool) else (1, 0, str(x)))


def summary_table(spec: SweepSpec, runs: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    axes = [a.path for a in spec.axes]
    ok = runs[runs["status"] == "ok"]
    keys = [*axes, "variant"]
    rows = []
    # A metric no run measured (e.g. labelled clean-cache I/O from a host that does not count it) has no rows.
    metrics = [m for m in metrics if m in ok and ok[m].notna().any()]
    if not ok.empty:
        for point, group in ok.groupby(keys, sort=False, dropna=False):
            point = point if isinstance(point, tuple) else (point,)
            for metric in metrics:
                ci = mean_ci(group[metric].tolist())
                rows.append({**dict(zip(keys, point)), "metric": metric, "n": ci.n, "mean": ci.mean, "std": ci.std,
                             "ci95_low": ci.ci_low, "ci95_high": ci.ci_high})
    return pd.DataFrame.from_records(rows, columns=[*keys, "metric", "n", "mean", "std", "ci95_low", "ci95_high"])


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def summary_markdown(spec: SweepSpec, summary: pd.DataFrame, metrics: Sequence[str], failed: int) -> str:
    axes = [a.path for a in spec.axes]
    lines = [f"# Sweep: {Path(spec.scenario).stem}", "",
             f"Grid: {', '.join(f'`{a.path}` = {list(a.values)}' for a in spec.axes) or 'none'}; "
             f"seeds {list(spec.seeds)}. Mean ± half-width of the 95 % confidence interval over the seeds "
             f"(Student's t), n = runs that finished." + (f" **{failed} cell(s) failed** (runs.csv says why)."
                                                           if failed else ""), ""]
    if summary.empty:
        return "\n".join(lines + ["No run finished."]) + "\n"
    head = [*axes, "variant", "n", *metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point, group in summary.groupby([*axes, "variant"], sort=False, dropna=False):
        point = point if isinstance(point, tuple) else (point,)
        by = {r["metric"]: r for _, r in group.iterrows()}
        n = int(max((r["n"] for r in by.values()), default=0))
        cells = []
        for m in metrics:
            r = by.get(m)
            if r is None:
                cells.append("-")
                continue
            half = (r["ci95_high"] - r["ci95_low"]) / 2
            cells.append(_fmt(r["mean"]) + (f" ± {_fmt(half)}" if math.isfinite(half) else ""))
        lines.append("| " + " | ".join([*map(str, point), str(n), *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(spec: SweepSpec, summary: pd.DataFrame, metrics: Sequence[str], out_dir: Path,
               x: str | None = None) -> list[Path]:
    """One figure per metric: its mean against axis ``x``, a line (and a 95 % band) per other combination."""
    if summary.empty or not spec.axes:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a.path for a in spec.axes]
    x_axis = next((a for a in spec.axes if a.path == x), None) or next((a for a in spec.axes if a.numeric),
                                                                      spec.axes[0])
    others = [p for p in axes if p != x_axis.path]
    if summary["variant"].nunique(dropna=False) > 1:
        others.append("variant")
    positions = {v: (float(v) if x_axis.numeric else i) for i, v in enumerate(x_axis.values)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        data = summary[summary["metric"] == metric]
        if data.empty or not data["mean"].map(math.isfinite).any():
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        groups = data.groupby(others, sort=False, dropna=False) if others else [((), data)]
        for label, group in groups:
            label = label if isinstance(label, tuple) else (label,)
            g = group.assign(_x=group[x_axis.path].map(positions)).sort_values("_x")
            name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, label)) or metric
            line, = ax.plot(g["_x"], g["mean"], marker="o", label=name)
            band = g[g["ci95_low"].map(math.isfinite)]
            if not band.empty:
                ax.fill_between(band["_x"], band["ci95_low"], band["ci95_high"], alpha=0.2, color=line.get_color(),
                                linewidth=0)
        if not x_axis.numeric:
            ax.set_xticks(list(positions.values()), [str(v) for v in positions])
        ax.set_xlabel(x_axis.path)
        ax.set_ylabel(metric)
        ax.set_title(f"{Path(spec.scenario).stem}: {metric} (mean, 95 % CI over {len(spec.seeds)} seed(s))", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        stem = f"{metric}-vs-{x_axis.path.replace('.', '_')}"
        for ext in ("png", "svg"):
            path = out_dir / f"{stem}.{ext}"
            fig.savefig(path, dpi=110 if ext == "png" else None)
            written.append(path)
        plt.close(fig)
    return written
