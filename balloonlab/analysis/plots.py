"""The report's plots: PNG files drawn headless with matplotlib (Agg), one figure per file.

Per variant, over virtual time:
- per guest: balloon size vs target, resident pages by kind (anon / file
  cache / free / balloon / kernel), page-fault frequency, working-set
  estimate, throughput;
- host: free frames, I/O-buffer, disk-cache and pinned frames; host swap-in
  and swap-out rates with the guests' virtual-disk traffic;
- when a guest's balloon size varies over the run: balloon size against
  PFF and throughput (where the thrashing knee shows).
Across variants: I/O per reclaimed page and throughput as bars, and balloon
size against PFF and throughput when the variants sweep the balloon size.

matplotlib is imported only here and only when a plot is drawn, so the
launcher and the guests never pay for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from balloonlab.proto import events as ev

from .logs import VariantLogs, event_vt_us, guest_series, host_series

__all__ = ["VariantSeries", "variant_series", "plot_variant", "plot_across", "Plot", "safe_name"]

GUEST_KEYS = ("refs", "major_faults", "minor_faults", "free", "total", "anon_pages", "file_pages", "balloon_pages",
              "kernel_pages", "pff", "working_set_pages", "balloon_target_pages", "balloon_actual_pages")
HOST_KEYS = ("total_frames", "free_frames", "guest_frames", "cache_pages", "iobuf_pages", "pinned_frames",
             "swap_out_pages", "swap_in_pages", "swap_used_slots", "double_faults", "vdisk_read_pages",
             "vdisk_write_pages")
HOST_GUEST_KEYS = ("resident_pages", "swapped_pages", "ballooned_pages", "guest_pages")

# Notable events drawn as vertical markers on the host plots: (constant name, colour, label).
# Looked up by name so that events other engineers add show up as they land.
_MARKERS = (("SWAP_STORM_DETECTED", "tab:red", "swap storm detected"),
            ("DEADLOCK_DETECTED", "black", "deadlock detected"),
            ("SWAP_STORM_ENDED", "tab:green", "swap storm ended"),
            ("SWAP_AREA_PINNED", "tab:purple", "swap area pinned"),
            ("GUEST_DISCONNECTED", "tab:gray", "guest disconnected"))
_MAX_MARKERS_PER_KIND = 40
MAX_PANELS = 16   # small multiples: at most this many guests in one figure
DPI = 100


@dataclass
class Plot:
    """One PNG written: what it shows and where."""

    title: str
    path: Path
    variant: str | None = None   # None: across variants


@dataclass
class VariantSeries:
    """A variant's metrics over virtual time, as numpy arrays (``t_s`` virtual seconds)."""

    name: str
    tick_us: float
    host: dict[str, np.ndarray]
    host_guests: dict[int, dict[str, np.ndarray]]
    guests: dict[int, dict[str, np.ndarray]]
    markers: dict[str, list[float]] = field(default_factory=dict)   # label -> virtual seconds
    # per guest, every balloon target the host set: (virtual seconds, pages), from balloon_target_set events
    targets: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    end_s: float = 0.0   # the run's end in virtual seconds

    def guest_ids(self) -> list[int]:
        return sorted(set(self.guests) | set(self.host_guests))


def variant_series(v: VariantLogs) -> VariantSeries:
    tick_us = _tick_us(v)
    host, host_guests = host_series(v.host, HOST_KEYS, HOST_GUEST_KEYS)
    guests = {gid: guest_series(events, tick_us, GUEST_KEYS) for gid, events in sorted(v.guests.items())}
    markers: dict[str, list[float]] = {}
    for const, _, label in _MARKERS:
        name = getattr(ev, const, None)
        if name is None:
            continue
        times = [t / 1e6 for e in v.host if e.get("event") == name and (t := event_vt_us(e, tick_us)) is not None]
        if times:
            markers[label] = times
    targets: dict[int, list[tuple[float, float]]] = {}
    end_s = 0.0
    for e in v.host:
        name = e.get("event")
        if name == ev.BALLOON_TARGET_SET and isinstance(e.get("guest"), int):
            t = event_vt_us(e, tick_us)
            pages = e.get("target_pages")
            if t is not None and isinstance(pages, (int, float)):
                targets.setdefault(e["guest"], []).append((t / 1e6, float(pages)))
        elif name == ev.RUN_FINISHED and isinstance(e.get("vt_us"), (int, float)):
            end_s = float(e["vt_us"]) / 1e6
    if not end_s and host["t_s"].size:
        end_s = float(np.nanmax(host["t_s"]))
    return VariantSeries(v.name, tick_us, host, host_guests, guests, markers,
                         {g: (np.array([0.0] + [t for t, _ in pts]), np.array([0.0] + [p for _, p in pts]))
                          for g, pts in targets.items()}, end_s)


def _tick_us(v: VariantLogs) -> float:
    for e in v.host:
        if e.get("event") == ev.RUN_STARTED and e.get("tick_us"):
            return float(e["tick_us"])
    return float(v.config.get("tick_us", 10_000))


def safe_name(name: str) -> str:
    """A variant name as a file-name part."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "variant"


# --- helpers -------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 11, "axes.labelsize": 10,
                         "legend.fontsize": 8, "figure.titlesize": 13, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def rate_per_s(counter: np.ndarray, t_us: np.ndarray) -> np.ndarray:
    """Per virtual second, over each logged interval, of a cumulative counter that starts at 0 at time 0."""
    c = np.concatenate([[0.0], np.nan_to_num(counter.astype(float))])
    t = np.concatenate([[0.0], t_us.astype(float)])
    dt = np.diff(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(dt > 0, np.diff(c) / dt * 1e6, np.nan)
    return r


def _colors(n: int) -> list[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _panel_grid(plt: Any, n: int, title: str, legend_in: float = 1.5) -> tuple[Any, list[Any]]:
    """Small multiples, one panel per guest, laid out by hand (a layout engine costs ~1 s with 16 panels)."""
    ncols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
    nrows = math.ceil(n / ncols)
    left, right, top, bottom = 0.95, legend_in, 0.75, 0.75   # inches around the panels
    w, h = 3.4 * ncols + left + right, 2.4 * nrows + top + bottom
    # Not shared axes: every artist added to a shared group re-scales the whole group (seconds with 16
    # panels). The callers set the same limits on every panel instead (``_same_limits``).
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), squeeze=False)
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                        wspace=0.12, hspace=0.35)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax in flat[:n]:
        ax.set_autoscale_on(False)
    fig.suptitle(title, y=1 - 0.25 / h, va="top")
    return fig, flat[:n]


def _same_limits(axes: list[Any], x_max: float, y_max: float) -> None:
    """Shared scales by hand: the same limits everywhere, tick labels only on the outer panels."""
    x_max = x_max if math.isfinite(x_max) and x_max > 0 else 1.0
    y_max = y_max if math.isfinite(y_max) and y_max > 0 else 1.0
    for ax in axes:
        ax.set_xlim(0, x_max)
        ax.set_ylim(0, y_max)
        ax.label_outer()


def _max(*arrays: np.ndarray) -> float:
    vals = [float(np.nanmax(a)) for a in arrays if a.size and np.isfinite(a).any()]
    return max(vals) if vals else 0.0


def _figure(plt: Any, w: float, h: float, rows: int = 1, right_in: float = 0.3) -> tuple[Any, Any]:
    """A figure of ``rows`` axes stacked (sharing x) with fixed margins in inches.

    Fixed margins rather than a layout engine: constrained layout measures
    every tick label of every axes and costs more than drawing the data.
    """
    fig, axes = plt.subplots(rows, 1, figsize=(w, h), sharex=rows > 1, squeeze=False)
    left, bottom, top = 1.1, 0.65, 0.45
    fig.subplots_adjust(left=left / w, right=1 - right_in / w, bottom=bottom / h, top=1 - top / h,
                        hspace=0.12 * rows)
    return fig, [ax for ax in axes.flat] if rows > 1 else axes.flat[0]


def _thin(n: int, most: int = 300) -> np.ndarray | slice:
    """Indices of at most ``most`` evenly spaced points, the last included: a small panel shows no more."""
    if n <= most:
        return slice(None)
    return np.unique(np.append(np.linspace(0, n - 1, most).astype(int), n - 1))


def _label_grid(fig: Any, axes: list[Any], xlabel: str, ylabel: str) -> None:
    w, h = fig.get_size_inches()
    fig.supxlabel(xlabel, fontsize=10, y=0.2 / h, va="bottom")
    fig.supylabel(ylabel, fontsize=10, x=0.2 / w, ha="left")


def _has_data(*arrays: np.ndarray) -> bool:
    return any(a.size and np.isfinite(a).any() for a in arrays)


def _draw_markers(ax: Any, s: VariantSeries) -> None:
    colors = {label: color for _, color, label in _MARKERS}
    for label, times in s.markers.items():
        for i, t in enumerate(times[:_MAX_MARKERS_PER_KIND]):
            ax.axvline(t, color=colors.get(label, "k"), lw=1, ls=":", alpha=0.8, label=label if i == 0 else None)


def _guest_ids_shown(s: VariantSeries) -> tuple[list[int], str]:
    gids = [g for g in s.guest_ids() if g in s.guests]
    if len(gids) > MAX_PANELS:
        return gids[:MAX_PANELS], f" (guests {gids[0]}-{gids[MAX_PANELS - 1]} of {len(gids)})"
    return gids, ""


def _pages_label(what: str = "pages") -> str:
    return f"{what} (4 KiB pages)"


# --- per variant ----------------------------------------------------------------------


def _any_positive(*arrays: np.ndarray) -> bool:
    return any(a.size and bool(np.nan_to_num(a).any()) for a in arrays)


def _plot_balloon(s: VariantSeries, path: Path) -> Path | None:
    gids, more = _guest_ids_shown(s)
    if not gids or not any(_any_positive(s.guests[g]["balloon_actual_pages"], s.guests[g]["balloon_target_pages"])
                           or g in s.targets for g in gids):
        return None  # no balloon in this variant: a flat zero says nothing
    plt = _plt()
    fig, axes = _panel_grid(plt, len(gids), f"{s.name}: balloon size vs target per guest{more}", legend_in=0.3)
    for ax, gid in zip(axes, gids):
        g = s.guests[gid]
        if gid in s.targets:  # every target the host set, at the virtual time it set it
            t, pages = s.targets[gid]
            end = max(s.end_s, float(np.nanmax(g["t_s"])) if g["t_s"].size else 0.0)
            ax.step(np.append(t, end), np.append(pages, pages[-1]), where="post", color="k", ls="--", lw=1.3,
                    label="target (set by the host)")
        else:
            ax.step(g["t_s"], g["balloon_target_pages"], where="post", color="k", ls="--", lw=1.3,
                    label="target (as the guest saw it)")
        idx = _thin(g["t_s"].size)
        ax.plot(g["t_s"][idx], g["balloon_actual_pages"][idx], color="tab:red", lw=1.8,
                marker="." if g["t_s"].size < 60 else None, label="balloon size (logged)")
        ax.set_title(f"guest {gid}")
    ys = [a for gid in gids for a in (s.guests[gid]["balloon_actual_pages"], s.guests[gid]["balloon_target_pages"],
                                      s.targets.get(gid, (np.zeros(0), np.zeros(0)))[1])]
    _same_limits(axes, max(s.end_s, _max(*(s.guests[g]["t_s"] for g in gids))), _max(*ys) * 1.08)
    axes[0].legend(loc="lower right")
    _label_grid(fig, axes, "virtual time (s)", _pages_label("balloon size"))
    return _save(fig, path)


_KINDS = (("anon_pages", "anonymous", "tab:orange"), ("file_pages", "file cache", "tab:blue"),
          ("free", "free", "#d9d9d9"), ("balloon_pages", "balloon", "tab:red"), ("kernel_pages", "kernel", "#555555"))


def _plot_memory(s: VariantSeries, path: Path) -> Path | None:
    gids, more = _guest_ids_shown(s)
    if not gids or not any(_has_data(s.guests[g]["anon_pages"]) for g in gids):
        return None
    plt = _plt()
    fig, axes = _panel_grid(plt, len(gids), f"{s.name}: guest memory by kind{more}", legend_in=2.4)
    for ax, gid in zip(axes, gids):
        g = s.guests[gid]
        idx = _thin(g["t_s"].size)
        ys = [np.nan_to_num(g[k])[idx] for k, _, _ in _KINDS]
        ax.stackplot(g["t_s"][idx], *ys, labels=[lbl for _, lbl, _ in _KINDS], colors=[c for _, _, c in _KINDS],
                     step="post", alpha=0.9)
        hg = s.host_guests.get(gid)
        if hg is not None and _has_data(hg["resident_pages"]):
            # what the guest holds vs what the host keeps in RAM for it: the gap is what host swapping took
            hidx = _thin(s.host["t_s"].size)
            ax.plot(s.host["t_s"][hidx], hg["resident_pages"][hidx], color="black", lw=1.4, ls="--",
                    label="in host RAM (host's view)")
        ax.set_title(f"guest {gid}")
    _same_limits(axes, _max(*(s.guests[g]["t_s"] for g in gids)), _max(*(s.guests[g]["total"] for g in gids)))
    handles, labels = axes[0].get_legend_handles_labels()
    top = 1 - 0.75 / fig.get_size_inches()[1]   # level with the top of the panels
    fig.legend(handles[::-1], labels[::-1], loc="upper right", bbox_to_anchor=(1.0, top))
    _label_grid(fig, axes, "virtual time (s)", _pages_label("guest frames"))
    return _save(fig, path)


def _eng(ax: Any, unit: str = "") -> None:
    from matplotlib.ticker import EngFormatter

    ax.yaxis.set_major_formatter(EngFormatter(unit=unit, sep=" "))


def _plot_guest_lines(s: VariantSeries, path: Path, title: str, ylabel: str,
                      value: Callable[[dict[str, np.ndarray]], np.ndarray], logy: bool = False,
                      eng: bool = False, ref: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
                      ref_label: str = "") -> Path | None:
    gids = [g for g in s.guest_ids() if g in s.guests]
    ys = {gid: value(s.guests[gid]) for gid in gids}
    if not any(_has_data(y) for y in ys.values()):
        return None
    plt = _plt()
    fig, ax = _figure(plt, 10 + (1.6 if len(gids) > 8 else 0), 5.2, right_in=1.9 if len(gids) > 8 else 0.3)
    for color, gid in zip(_colors(len(gids)), gids):
        ax.plot(s.guests[gid]["t_s"], ys[gid], color=color, lw=1.5, marker="." if len(ys[gid]) < 40 else None,
                label=f"guest {gid}")
        if ref is not None and len(gids) <= 8:
            ax.plot(s.guests[gid]["t_s"], ref(s.guests[gid]), color=color, lw=1.0, ls="--")
    if ref is not None and len(gids) <= 8:
        ax.plot([], [], color="gray", lw=1.0, ls="--", label=f"dashed: {ref_label}")
    ax.set_title(f"{s.name}: {title}")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel(ylabel)
    finite = np.concatenate([y[np.isfinite(y)] for y in ys.values()])
    if logy and finite.size and (finite > 0).any() and finite.max() > 50 * max(finite[finite > 0].min(), 1e-9):
        ax.set_yscale("symlog", linthresh=max(1.0, float(np.percentile(finite[finite > 0], 5))))
    else:
        ax.set_ylim(bottom=0)
        if eng:
            _eng(ax)
    ax.set_xlim(left=0)
    if len(gids) > 8:  # many guests: the legend goes beside the plot, not over the lines
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(loc="best")
    return _save(fig, path)


def _plot_host_memory(s: VariantSeries, path: Path) -> Path | None:
    h = s.host
    if not _has_data(h["free_frames"]):
        return None
    plt = _plt()
    fig, ax = _figure(plt, 10, 5.2)
    for key, label, color in (("free_frames", "free", "tab:green"), ("iobuf_pages", "I/O buffers", "tab:orange"),
                              ("cache_pages", "disk cache", "tab:blue"), ("pinned_frames", "pinned", "tab:purple")):
        if _has_data(h[key]):
            ax.plot(h["t_s"], h[key], label=label, color=color, lw=1.8)
    total = float(np.nanmax(h["total_frames"])) if _has_data(h["total_frames"]) else float("nan")
    _draw_markers(ax, s)
    ax.set_title(f"{s.name}: host frames over time (host RAM {total:.0f} frames)")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel(_pages_label("host frames"))
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.legend(loc="best")
    return _save(fig, path)


def _plot_host_swap(s: VariantSeries, path: Path) -> Path | None:
    h = s.host
    if not _has_data(h["swap_out_pages"]):
        return None
    plt = _plt()
    fig, ax = _figure(plt, 10, 5.2)
    t = h["t_s"]
    vt = h["vt_us"]
    ax.plot(t, rate_per_s(h["swap_out_pages"], vt), label="host swap-out", color="tab:red", lw=2)
    ax.plot(t, rate_per_s(h["swap_in_pages"], vt), label="host swap-in", color="tab:blue", lw=2)
    disk = np.nan_to_num(h["vdisk_read_pages"]) + np.nan_to_num(h["vdisk_write_pages"])
    if disk.any():
        ax.plot(t, rate_per_s(disk, vt), label="guests' virtual-disk I/O", color="tab:gray", ls="--", lw=1.5)
    if _has_data(h["double_faults"]) and np.nanmax(h["double_faults"]) > 0:
        ax.plot(t, rate_per_s(h["double_faults"], vt), label="double faults", color="k", lw=1.2)
    _draw_markers(ax, s)
    ax.set_title(f"{s.name}: host swapping and disk traffic")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("pages per virtual second")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    _eng(ax)
    ax.legend(loc="best")
    return _save(fig, path)


def balloon_varies(g: dict[str, np.ndarray]) -> bool:
    """Whether a guest's balloon size changed enough over the run to plot PFF against it."""
    b = g["balloon_actual_pages"]
    b = b[np.isfinite(b)]
    if b.size < 3 or np.unique(b).size < 3:
        return False
    total = float(np.nanmax(g["total"])) if _has_data(g["total"]) else 0.0
    return float(b.max() - b.min()) >= max(16.0, 0.02 * total)


def _plot_balloon_curve(s: VariantSeries, path: Path) -> Path | None:
    gids = [gid for gid in s.guest_ids() if gid in s.guests and balloon_varies(s.guests[gid])]
    if not gids:
        return None
    plt = _plt()
    fig, (ax1, ax2) = _figure(plt, 10, 7.5, rows=2)
    for color, gid in zip(_colors(len(gids)), gids):
        g = s.guests[gid]
        x = g["balloon_actual_pages"]
        thr = rate_per_s(g["refs"], g["vt_us"])
        # faults over each logged interval, not the guest's smoothed PFF: a step's own rate, no memory of the last
        faults = rate_per_s(np.nan_to_num(g["major_faults"]) + np.nan_to_num(g["minor_faults"]), g["vt_us"])
        idx = _thin(x.size)
        ax1.scatter(x[idx], faults[idx], s=14, color=color, alpha=0.7, label=f"guest {gid}")
        ax2.scatter(x[idx], thr[idx], s=14, color=color, alpha=0.7, label=f"guest {gid}")
        for ax, y in ((ax1, faults), (ax2, thr)):  # the curve: the median of the points at each balloon size
            xs, ys = _binned_median(x, y)
            ax.plot(xs, ys, color=color, lw=1.2)
    ax1.set_title(f"{s.name}: balloon size vs page-fault frequency and throughput (each point one logged interval)")
    ax1.set_ylabel("page faults per virtual second\n(over each logged interval)")
    ax2.set_ylabel("references per virtual second")
    ax2.set_xlabel(_pages_label("balloon size"))
    ys = [y for ln in ax1.get_lines() for y in np.asarray(ln.get_ydata(), float)]
    if ys and np.nanmax(ys) > 100:
        ax1.set_yscale("symlog", linthresh=1.0)   # faults span decades; under 1 per second reads as 0
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    _eng(ax2)
    ax1.legend(loc="best", ncols=2 if len(gids) > 8 else 1)
    return _save(fig, path)


def _binned_median(x: np.ndarray, y: np.ndarray, bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or x.min() == x.max():
        return x, y
    edges = np.linspace(x.min(), x.max(), bins + 1)
    idx = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    xs, ys = [], []
    for b in range(bins):
        m = idx == b
        if m.any():
            xs.append(float(np.median(x[m])))
            ys.append(float(np.median(y[m])))
    return np.asarray(xs), np.asarray(ys)


def _plot_sweep_steps(name: str, vsummary: dict[str, Any], path: Path) -> Path | None:
    """The thrashing curve from ``balloon_sweep`` in the summary: one point per balloon step, the knee marked."""
    curves = vsummary.get("balloon_sweep")
    if not isinstance(curves, dict):
        return None
    curves = {k: c for k, c in curves.items() if isinstance(c, dict) and isinstance(c.get("steps"), list)
              and len(c["steps"]) >= 2}
    if not curves:
        return None
    plt = _plt()
    fig, (ax1, ax2) = _figure(plt, 10, 7.5, rows=2)
    for color, (gid, c) in zip(_colors(len(curves)), sorted(curves.items(), key=lambda kv: str(kv[0]))):
        steps = [r for r in c["steps"] if isinstance(r, dict)]
        x = np.array([_f(r.get("balloon_pages")) for r in steps])
        ax1.plot(x, [_f(r.get("faults_per_vsec")) for r in steps], marker="o", color=color, label=f"guest {gid}")
        ax2.plot(x, [_f(r.get("refs_per_vsec")) for r in steps], marker="o", color=color, label=f"guest {gid}")
        one = len(curves) == 1   # one guest: red knee, black working set; several: each in its guest's colour
        knee = c.get("knee_balloon_pages")
        if isinstance(knee, (int, float)):
            for ax in (ax1, ax2):
                ax.axvline(knee, color="tab:red" if one else color, ls=":", lw=2,
                           label=f"guest {gid}: knee" if ax is ax2 else None)
        ws = c.get("true_working_set_pages")
        r0 = steps[0]
        if isinstance(ws, (int, float)) and isinstance(r0.get("guest_free_pages"), (int, float)):
            # the balloon size at which the guest's free memory equals its true working set
            at = _f(r0.get("balloon_pages")) + _f(r0.get("guest_free_pages")) - float(ws)
            for ax in (ax1, ax2):
                ax.axvline(at, color="black" if one else color, ls="--", lw=1.0, alpha=0.7,
                           label=f"guest {gid}: free memory = working set ({ws:.0f} pages)" if ax is ax2 else None)
    ax1.set_title(f"{name}: balloon sweep, one point per step (where throughput falls is the knee)")
    ax1.set_ylabel("page faults per virtual second")
    ax2.set_ylabel("references per virtual second")
    ax2.set_xlabel(_pages_label("balloon size"))
    ys = [y for ln in ax1.get_lines() for y in np.asarray(ln.get_ydata(), float)]
    if ys and np.nanmax(ys) > 100:
        ax1.set_yscale("symlog", linthresh=1.0)
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    _eng(ax2)
    ax2.legend(loc="best")
    return _save(fig, path)


def _f(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def plot_variant(s: VariantSeries, out_dir: Path, prefix: str | None = None,
                 vsummary: dict[str, Any] | None = None) -> list[Plot]:
    """Every per-variant plot that has data; returns what was written.

    ``vsummary``: the variant's entry of summary.json, for what is computed
    there (the balloon sweep's steps and knee).
    """
    out_dir = Path(out_dir)
    p = safe_name(prefix if prefix is not None else s.name)
    jobs: list[tuple[str, str, Callable[[Path], Path | None]]] = [
        ("balloon size vs target per guest", "guest-balloon", lambda path: _plot_balloon(s, path)),
        ("guest memory by kind", "guest-memory", lambda path: _plot_memory(s, path)),
        ("page-fault frequency per guest", "guest-pff", lambda path: _plot_guest_lines(
            s, path, "page-fault frequency per guest (smoothed)", "page faults per virtual second",
            lambda g: g["pff"], logy=True)),
        ("working-set estimate per guest", "guest-working-set", lambda path: _plot_guest_lines(
            s, path, "working-set estimate per guest (sampled)", _pages_label("working set"),
            lambda g: g["working_set_pages"], ref=lambda g: g["total"] - np.nan_to_num(g["balloon_pages"])
            - np.nan_to_num(g["kernel_pages"]), ref_label="the guest's RAM less balloon and kernel")),
        ("throughput per guest", "guest-throughput", lambda path: _plot_guest_lines(
            s, path, "throughput per guest", "references per virtual second",
            lambda g: rate_per_s(g["refs"], g["vt_us"]), eng=True)),
        ("host frames", "host-memory", lambda path: _plot_host_memory(s, path)),
        ("host swap-in/out rates", "host-swap", lambda path: _plot_host_swap(s, path)),
        ("balloon size vs PFF and throughput", "balloon-pff", lambda path: _plot_balloon_curve(s, path)),
        ("balloon sweep: faults and throughput per step", "balloon-steps",
         lambda path: _plot_sweep_steps(s.name, vsummary or {}, path)),
    ]
    written = []
    for title, stem, draw in jobs:
        path = draw(out_dir / f"{p}-{stem}.png")
        if path is not None:
            written.append(Plot(title, path, s.name))
    return written


# --- across variants --------------------------------------------------------------------


def _bars(names: Sequence[str], path: Path, title: str, ylabel: str,
          groups: Sequence[tuple[str, Sequence[float], Any]], fmt: Callable[[float], str], eng: bool = False) -> Path:
    plt = _plt()
    width = min(16.0, max(6.0, 0.9 * len(names) * max(1, len(groups)) + 2.5))   # ~0.9 in per bar
    fig, ax = _figure(plt, width, 5.5)
    x = np.arange(len(names))
    width = 0.8 / max(1, len(groups))
    for i, (label, values, color) in enumerate(groups):
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, values, width * 0.92, label=label, color=color)
        for b, val in zip(bars, values):
            ax.annotate(fmt(val), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, names)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("variant")
    ax.margins(y=0.15)
    ax.grid(axis="x", visible=False)
    if eng:
        _eng(ax)
    if len(groups) > 1:
        ax.legend(loc="best")
    return _save(fig, path)


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:.0f}"


def plot_across(summary: dict[str, Any], series: dict[str, VariantSeries], out_dir: Path,
                order: Sequence[str] | None = None) -> list[Plot]:
    """Bars of I/O per reclaimed page and throughput per variant; the balloon sweep across variants."""
    out_dir = Path(out_dir)
    variants = summary.get("variants", {})
    names = [n for n in (order or variants) if n in variants]
    if not names:
        return []
    written: list[Plot] = []
    vs = [variants[n] for n in names]
    path = _bars(names, out_dir / "io-per-reclaimed-page.png",
                 "Disk I/O per reclaimed page (lower is better)", "pages of disk I/O per reclaimed page",
                 [("all reclaimed pages", [float(v.get("io_per_reclaimed_page", 0)) for v in vs], "tab:gray"),
                  ("clean page cache: writes", [float(v.get("clean_cache_writes_per_page", 0)) for v in vs],
                   "tab:red"),
                  ("clean page cache: re-reads", [float(v.get("clean_cache_reads_per_page", 0)) for v in vs],
                   "tab:blue")],
                 lambda x: f"{x:.2f}")
    written.append(Plot("I/O per reclaimed page, per variant", path))
    path = _bars(names, out_dir / "throughput.png", "Throughput, all guests (higher is better)",
                 "memory references per virtual second",
                 [("throughput", [float(v.get("refs_per_vsec", 0)) for v in vs], "tab:green")], _si, eng=True)
    written.append(Plot("throughput per variant", path))
    sweep = _plot_sweep(names, series, out_dir / "balloon-sweep.png")
    if sweep is not None:
        written.append(Plot("balloon size vs PFF and throughput across variants", sweep))
    return written


def _plot_sweep(names: Sequence[str], series: dict[str, VariantSeries], path: Path) -> Path | None:
    """When the variants hold different balloon sizes: mean balloon vs mean PFF and throughput."""
    pts = []
    for n in names:
        s = series.get(n)
        if s is None or not s.guests:
            continue
        bal = np.concatenate([g["balloon_actual_pages"] for g in s.guests.values()])
        pff = np.concatenate([g["pff"] for g in s.guests.values()])
        thr = np.concatenate([rate_per_s(g["refs"], g["vt_us"]) for g in s.guests.values()])
        if not (_has_data(bal) and _has_data(pff)):
            continue
        pts.append((float(np.nanmean(bal)), float(np.nanmean(pff)), float(np.nanmean(thr)) * len(s.guests), n))
    if len({round(p[0]) for p in pts}) < 3:
        return None
    pts.sort()
    plt = _plt()
    fig, (ax1, ax2) = _figure(plt, 10, 7.5, rows=2)
    xs = [p[0] for p in pts]
    ax1.plot(xs, [p[1] for p in pts], marker="o", color="tab:red")
    ax2.plot(xs, [p[2] for p in pts], marker="o", color="tab:green")
    for x, y1, y2, n in pts:
        ax1.annotate(n, (x, y1), xytext=(4, 4), textcoords="offset points", fontsize=8)
        ax2.annotate(n, (x, y2), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax1.set_title("Balloon size vs page-fault frequency and throughput, across variants (means over the run)")
    ax1.set_ylabel("page faults per virtual second\n(mean per guest)")
    ax2.set_ylabel("references per virtual second\n(all guests)")
    ax2.set_xlabel(_pages_label("mean balloon size per guest"))
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    _eng(ax2)
    return _save(fig, path)
