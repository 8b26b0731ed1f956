"""The report's figures, drawn headless with matplotlib (Agg), one figure per file, as PNG, SVG or PDF.

Per variant, over virtual time:
- per guest: balloon size vs target, resident pages by kind (anon / file
  cache / free / balloon / kernel), page-fault frequency, working-set
  estimate, throughput (up to ``MAX_LINES`` guests one line each, identical
  ones drawn once; more become a median with bands); a guest that left is
  drawn leaving (its line ends at an x with the reason);
- host: its RAM by owner (each guest's backed frames, disk cache, I/O
  buffers, free) with notable events as vertical lines; host swap-in and
  swap-out rates with the guests' virtual-disk traffic;
- when a guest's balloon size varies over the run: balloon size against
  major faults and throughput (where the thrashing knee shows);
- under a lock model with deadlocks or order violations: the lock waits of
  each cycle on a timeline, and the first cycle as a wait-for graph.
Across variants: I/O per reclaimed page and throughput as bars (a variant
that deadlocked or lost guests is hatched and labelled, the baseline of the
ratios marked), and balloon size against PFF and throughput when the
variants sweep the balloon size.

Rates that span decades use a log axis whose bottom row stands for zero
(labelled "0"), never a symlog axis. matplotlib is imported only here and
only when a plot is drawn, so the launcher and the guests never pay for it.
"""
from __future__ import annotations

import math
import textwrap
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from balloonlab.proto import events as ev
from balloonlab.proto.costs import refs_per_vsec_ceiling

from .formats import FORMATS, parse_formats
from .logs import VariantLogs, event_vt_us, guest_series, host_series

__all__ = ["VariantSeries", "variant_series", "plot_variant", "plot_across", "Plot", "safe_name", "FORMATS",
           "parse_formats", "rate_per_s", "balloon_varies"]

_formats: ContextVar[tuple[str, ...]] = ContextVar("plot_formats", default=("png",))

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
MAX_LINES = 6     # guests drawn one line each; more become a median and bands
DPI = 100


@dataclass
class Plot:
    """One figure written: what it shows and where (``path`` in the first format, ``files`` in all)."""

    title: str
    path: Path
    variant: str | None = None   # None: across variants
    files: list[Path] = field(default_factory=list)


@contextmanager
def formats(fmts: Sequence[str]) -> Iterator[None]:
    """Figures drawn inside are written in each of ``fmts`` (the first is the one the report embeds)."""
    token = _formats.set(tuple(fmts) or ("png",))
    try:
        yield
    finally:
        _formats.reset(token)


def _files(path: Path) -> list[Path]:
    return [path.with_suffix("." + f) for f in _formats.get()]


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
    left: dict[int, tuple[float, str]] = field(default_factory=dict)   # guest -> (virtual s, reason) it left
    refs_per_vsec_ceiling: float | None = None   # 1 / mem_ref_us: a guest that never waits
    guest_ram_pages: int = 0                  # all guests' RAM, for the overcommit ratio
    memory_states: list[tuple[float, str]] = field(default_factory=list)   # host memory_state over time, if logged
    cycles: list[dict[str, Any]] = field(default_factory=list)   # deadlock_detected events (cycle, close time)
    violations: list[float] = field(default_factory=list)        # virtual s of lock_order_violation events
    deadlocked: bool = False

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
    left: dict[int, tuple[float, str]] = {}
    cycles: list[dict[str, Any]] = []
    violations: list[float] = []
    deadlocked = False
    for e in v.host:
        name = e.get("event")
        if name == ev.GUEST_DISCONNECTED and isinstance(e.get("guest"), int):
            t = event_vt_us(e, tick_us)
            left[e["guest"]] = ((t or 0.0) / 1e6, str(e.get("reason", "?")))
        elif name == ev.GUEST_CONNECTED and isinstance(e.get("guest"), int):
            left.pop(e["guest"], None)   # rejoined
        elif name == ev.DEADLOCK_DETECTED and isinstance(e.get("cycle"), list):
            edges = [w for w in e["cycle"] if isinstance(w, dict)]
            since = [float(w["since_vt_us"]) for w in edges if isinstance(w.get("since_vt_us"), (int, float))]
            if edges and since:
                cycles.append({"edges": edges, "close_s": max(since) / 1e6, "action": str(e.get("action", ""))})
        elif name == ev.LOCK_ORDER_VIOLATION:
            t = event_vt_us(e, tick_us)
            if t is not None:
                violations.append(t / 1e6)
        elif name == ev.BALLOON_TARGET_SET and isinstance(e.get("guest"), int):
            t = event_vt_us(e, tick_us)
            pages = e.get("target_pages")
            if t is not None and isinstance(pages, (int, float)):
                targets.setdefault(e["guest"], []).append((t / 1e6, float(pages)))
        elif name == ev.RUN_FINISHED:
            if isinstance(e.get("vt_us"), (int, float)):
                end_s = float(e["vt_us"]) / 1e6
            deadlocked = e.get("reason") == "deadlock"
    if not end_s and host["t_s"].size:
        end_s = float(np.nanmax(host["t_s"]))
    ceiling = refs_per_vsec_ceiling(v.config.get("costs"))
    ram = sum(int(g.get("ram_pages", 0)) for g in v.config.get("guests") or [] if isinstance(g, dict))
    states = [(float(e["vt_us"]) / 1e6, str(e["memory_state"])) for e in v.host
              if e.get("event") == ev.TICK_COMPLETED and isinstance(e.get("memory_state"), str)
              and isinstance(e.get("vt_us"), (int, float))]
    return VariantSeries(v.name, tick_us, host, host_guests, guests, markers,
                         {g: (np.array([0.0] + [t for t, _ in pts]), np.array([0.0] + [p for _, p in pts]))
                          for g, pts in targets.items()}, end_s, left,
                         ceiling, ram, states, cycles, violations, deadlocked)


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
                         "axes.spines.right": False,
                         # SVG text stays text: smaller files, searchable, editable on a lecture's slide
                         "svg.fonttype": "none"})
    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write the figure in every format asked for; return the first file."""
    import matplotlib.pyplot as plt

    files = _files(path)
    for f in files:
        fig.savefig(f, dpi=DPI)
    plt.close(fig)
    return files[0]


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


def _short(y: float) -> str:
    """1, 10, 100, 1k, 10k, 1M: tick labels of a log axis, never 10^k."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(y) >= div:
            v = y / div
            return f"{v:.0f}{suffix}" if v == round(v) else f"{v:g}{suffix}"
    return f"{y:g}"


def _log_zero_axis(ax: Any, arrays: Sequence[np.ndarray], below: float | None = None
                   ) -> Callable[[np.ndarray], np.ndarray] | None:
    """A log y axis for rates that span decades, with zero drawn on its own bottom row.

    The bottom row sits one decade below the smallest value drawn and is
    labelled "0"; with ``below`` (say 1 fault per second), every value under
    it goes to that row, labelled "<1" (a smoothed rate decaying to 1e-5
    says nothing a reader needs). Returns the function that maps data onto
    the axis. None when a linear axis reads better (the values span less
    than two decades, or none is positive).
    """
    vals = np.concatenate([np.asarray(a, float)[np.isfinite(a)] for a in arrays]) if arrays else np.zeros(0)
    pos = vals[vals >= below] if below else vals[vals > 0]
    if pos.size == 0 or pos.max() < 100 * pos.min():
        return None
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    floor = 10.0 ** (math.floor(math.log10(pos.min())) - 1)
    note = f"<{_short(below)}" if below and (vals < below).any() and (vals > 0).any() else "0"
    top = 10.0 ** math.ceil(math.log10(pos.max()))
    ax.set_yscale("log")
    ax.set_ylim(floor / 1.6, top * 1.3)
    decades = [10.0 ** k for k in range(int(round(math.log10(floor))), int(round(math.log10(top))) + 1)]
    step = max(1, math.ceil(len(decades) / 7))
    ticks = [decades[0]] + decades[1::step]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: note if abs(y - floor) <= 1e-9 * floor else _short(y)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhspan(floor / 1.6, floor * 1.6, color="0.93", zorder=0)
    cut = below or 0.0
    return lambda a: np.where(np.isfinite(a), np.where(np.asarray(a, float) < max(cut, floor), floor, a), np.nan)


def _guest_colors(gids: Sequence[int]) -> dict[int, Any]:
    return dict(zip(gids, _colors(len(gids))))


def _same_series(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1], equal_nan=True)


def _groups(series: dict[int, tuple[np.ndarray, np.ndarray]]) -> list[list[int]]:
    """Guests whose series are the same, together (drawn once, labelled with all of them)."""
    groups: list[list[int]] = []
    for gid, xy in series.items():
        for grp in groups:
            if _same_series(series[grp[0]], xy):
                grp.append(gid)
                break
        else:
            groups.append([gid])
    return groups


def _who(gids: Sequence[int]) -> str:
    return f"guest {gids[0]}" if len(gids) == 1 else f"guests {', '.join(map(str, gids))} (identical)"


def _mark_leaving(ax: Any, s: VariantSeries, gid: int, t: np.ndarray, y: np.ndarray, color: Any) -> None:
    """A guest that left: an x where its line ends, and why."""
    if gid not in s.left:
        return
    at, reason = s.left[gid]
    ok = np.isfinite(y) & (t <= at + 1e-9)
    yv = float(y[ok][-1]) if ok.any() else float(np.nanmin(y)) if np.isfinite(y).any() else 0.0
    ax.plot([at], [yv], marker="X", ms=10, color=color, mec="black", zorder=5)
    ax.annotate(f"guest {gid} left: {reason}", (at, yv), xytext=(6, 8), textcoords="offset points", fontsize=8,
                color="black", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.9})


def _guest_matrix(s: VariantSeries, gids: Sequence[int], value: Callable[[dict[str, np.ndarray]], np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Every guest's series on one time grid (NaN where a guest has no point: before it joined, after it left)."""
    t = np.unique(np.concatenate([s.guests[g]["t_s"] for g in gids]))
    m = np.full((len(gids), t.size), np.nan)
    for i, g in enumerate(gids):
        m[i, np.searchsorted(t, s.guests[g]["t_s"])] = value(s.guests[g])
    return t, m


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
        # The target under the size, wide and pale: where the balloon meets it, both stay visible.
        if gid in s.targets:  # every target the host set, at the virtual time it set it
            t, pages = s.targets[gid]
            end = s.left[gid][0] if gid in s.left else max(s.end_s, float(np.nanmax(g["t_s"])) if g["t_s"].size else 0.0)
            ax.step(np.append(t, end), np.append(pages, pages[-1]), where="post", color="0.45", lw=6, alpha=0.35,
                    solid_capstyle="butt", label="target set by the host (wide grey)")
        else:
            ax.step(g["t_s"], g["balloon_target_pages"], where="post", color="0.45", lw=6, alpha=0.35,
                    label="target as the guest saw it (wide grey)")
        idx = _thin(g["t_s"].size)
        ax.plot(g["t_s"][idx], g["balloon_actual_pages"][idx], color="tab:red", lw=1.6,
                marker="." if g["t_s"].size < 60 else None, label="balloon size (logged by the guest)")
        _mark_leaving(ax, s, gid, g["t_s"], g["balloon_actual_pages"], "tab:red")
        ax.set_title(f"guest {gid}")
    ys = [a for gid in gids for a in (s.guests[gid]["balloon_actual_pages"], s.guests[gid]["balloon_target_pages"],
                                      s.targets.get(gid, (np.zeros(0), np.zeros(0)))[1])]
    _same_limits(axes, max(s.end_s, _max(*(s.guests[g]["t_s"] for g in gids))), _max(*ys) * 1.12)
    axes[0].legend(loc="best")
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
        if gid in s.left:
            at, reason = s.left[gid]
            ax.axvline(at, color="black", lw=1.5)
            ax.annotate(f"left: {reason}", (at, 0.5), xycoords=("data", "axes fraction"), rotation=90, ha="right",
                        va="center", fontsize=8, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.8})
        ax.set_title(f"guest {gid}")
    _same_limits(axes, max(s.end_s, _max(*(s.guests[g]["t_s"] for g in gids))),
                 _max(*(s.guests[g]["total"] for g in gids)))
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
                      ref_label: str = "", ceiling: tuple[float, str] | None = None) -> Path | None:
    """One line per guest (identical guests drawn once), or for many guests their median and spread."""
    gids = [g for g in s.guest_ids() if g in s.guests]
    ys = {gid: value(s.guests[gid]) for gid in gids}
    if not any(_has_data(y) for y in ys.values()):
        return None
    plt = _plt()
    band = len(gids) > MAX_LINES
    fig, ax = _figure(plt, 10.5, 5.2, right_in=2.5 if not band and len(gids) > 3 else 0.3)
    to_axis: Callable[[np.ndarray], np.ndarray] | None = None
    if logy:
        to_axis = _log_zero_axis(ax, list(ys.values()), below=1.0)
    put = to_axis or (lambda a: a)
    colors = _guest_colors(gids)
    if band:
        t, m = _guest_matrix(s, gids, value)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # columns where every guest has left: NaN, not a warning
            lo, q1, med, q3, hi = (np.nanpercentile(m, q, axis=0) for q in (0, 25, 50, 75, 100))
        ax.fill_between(t, put(lo), put(hi), color="tab:blue", alpha=0.15, lw=0, label=f"all {len(gids)} guests (min–max)")
        ax.fill_between(t, put(q1), put(q3), color="tab:blue", alpha=0.35, lw=0, label="the middle half of the guests")
        ax.plot(t, put(med), color="tab:blue", lw=2, label="median guest")
        if ref is not None:
            _, mr = _guest_matrix(s, gids, ref)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ax.plot(t, put(np.nanmedian(mr, axis=0)), color="black", lw=1.2, ls="--",
                        label=f"median of {ref_label}")
        for gid in sorted(s.left):
            if gid in s.guests:
                ax.axvline(s.left[gid][0], color="0.3", lw=1, ls=":")
                ax.annotate(f"guest {gid} left", (s.left[gid][0], 1), xycoords=("data", "axes fraction"),
                            rotation=90, va="top", ha="right", fontsize=8)
    else:
        series = {gid: (s.guests[gid]["t_s"], ys[gid]) for gid in gids}
        for grp in _groups(series):
            gid = grp[0]
            t, y = series[gid]
            ax.plot(t, put(y), color=colors[gid], lw=1.6 + 0.8 * (len(grp) > 1),
                    marker="." if len(y) < 40 else None, label=_who(grp))
            if ref is not None:
                ax.plot(t, put(ref(s.guests[gid])), color=colors[gid], lw=1.0, ls="--")
            for g in grp:
                _mark_leaving(ax, s, g, t, put(y), colors[gid])
        if ref is not None:
            ax.plot([], [], color="gray", lw=1.0, ls="--", label=f"dashed: {ref_label}")
    data_top = _max(*ys.values())
    if ceiling is not None and np.isfinite(ceiling[0]) and data_top < 0.3 * ceiling[0]:
        # far above the data: a line there would squash every guest into the bottom of the plot
        ax.annotate(ceiling[1] + ": far above this scale", (0.01, 0.97), xycoords="axes fraction", va="top",
                    fontsize=8, color="0.25")
        ceiling = None
    if ceiling is not None and np.isfinite(ceiling[0]):
        ax.axhline(put(np.array([ceiling[0]]))[0], color="0.35", lw=1.2, ls=(0, (6, 3)))
        ax.annotate(ceiling[1], (0.01, put(np.array([ceiling[0]]))[0]), xycoords=("axes fraction", "data"),
                    xytext=(0, 4), textcoords="offset points", fontsize=8, color="0.25")
    ax.set_title(f"{s.name}: {title}")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel(ylabel + ("\n(grey bottom row: under 1, or none)" if to_axis is not None else ""))
    if to_axis is None:
        refs = [ref(s.guests[g]) for g in gids] if ref is not None else []
        top = _max(*ys.values(), *refs, np.array([ceiling[0] if ceiling else 0.0]))
        ax.set_ylim(0, top * 1.1 if top > 0 else 1)
        if eng:
            _eng(ax)
    ax.set_xlim(0, max(s.end_s, _max(*(s.guests[g]["t_s"] for g in gids))) or 1)
    if not band and len(gids) > 3:  # the legend beside the plot, not over the lines
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(loc="best")
    return _save(fig, path)


_OWNER_COLORS = {"cache_pages": ("disk cache", "#76b7b2"), "iobuf_pages": ("I/O buffers", "#edc948"),
                 "busy_frames": ("busy (in flight)", "#b07aa1"), "free_frames": ("free", "#8cd17d")}


def _plot_host_memory(s: VariantSeries, path: Path) -> Path | None:
    """Host RAM by owner, stacked: each guest's backed frames, disk cache, I/O buffers, busy, free."""
    h = s.host
    if not _has_data(h["free_frames"]):
        return None
    plt = _plt()
    fig, ax = _figure(plt, 11, 5.6, right_in=2.4)
    t = h["t_s"]
    layers: list[tuple[np.ndarray, str, Any]] = []
    gids = [g for g in sorted(s.host_guests) if _has_data(s.host_guests[g]["resident_pages"])]
    if len(gids) <= 12:
        cmap = plt.get_cmap("Blues")
        for i, gid in enumerate(gids):
            shade = cmap(0.35 + 0.55 * (i / max(1, len(gids) - 1)))
            layers.append((np.nan_to_num(s.host_guests[gid]["resident_pages"]), f"guest {gid}", shade))
    elif gids:
        total_guests = sum(np.nan_to_num(s.host_guests[g]["resident_pages"]) for g in gids)
        layers.append((total_guests, f"{len(gids)} guests' frames", "#4e79a7"))
    for key in ("cache_pages", "iobuf_pages", "busy_frames", "free_frames"):
        if key in h and _has_data(h[key]) and (key == "free_frames" or np.nanmax(h[key]) > 0):
            label, color = _OWNER_COLORS[key]
            layers.append((np.nan_to_num(h[key]), label, color))
    if t.size >= 2:
        ax.stackplot(t, *[y for y, _, _ in layers], labels=[lbl for _, lbl, _ in layers],
                     colors=[c for _, _, c in layers], alpha=0.95, lw=0.3, edgecolor="white")
    else:   # one logged tick: an area needs two points, so one stacked bar over the interval it covers
        bottom = 0.0
        width = float(t[0]) if t.size and t[0] > 0 else 1.0
        for y, lbl, c in layers:
            ax.bar([0.0], [float(y[0])], width=width, bottom=bottom, align="edge", color=c, label=lbl)
            bottom += float(y[0])
    total = float(np.nanmax(h["total_frames"])) if _has_data(h["total_frames"]) else float("nan")
    if math.isfinite(total):
        ax.axhline(total, color="black", lw=1.2, ls="--", label="host RAM")
    if _has_data(h["pinned_frames"]) and np.nanmax(h["pinned_frames"]) > 0:
        ax.plot(t, h["pinned_frames"], color="tab:purple", lw=1.5, label="pinned (of the cache)")
    _draw_markers(ax, s)
    if s.memory_states:   # the host's memory state as a strip along the top
        _state_strip(ax, s, total)
    mib = total / 256 if math.isfinite(total) else float("nan")
    ratio = f"; guests' RAM {s.guest_ram_pages / total:.2f}x of it" if s.guest_ram_pages and total else ""
    ax.set_title(f"{s.name}: host RAM by owner ({mib:.0f} MiB = {total:,.0f} frames{ratio})")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel(_pages_label("host frames"))
    ax.set_ylim(0, total * (1.12 if s.memory_states else 1.04) if math.isfinite(total) else None)
    ax.set_xlim(0, max(s.end_s, float(np.nanmax(t)) if t.size else 0.0) or 1)
    sec = ax.secondary_yaxis("right", functions=(lambda p: p / 256, lambda m: m * 256))
    sec.set_ylabel("MiB")
    ax.legend(loc="upper left", bbox_to_anchor=(1.08, 1.0), borderaxespad=0)
    return _save(fig, path)


def _state_strip(ax: Any, s: VariantSeries, total: float) -> None:
    palette = ["#8cd17d", "#f1ce63", "#ff9d9a", "#e15759", "#b07aa1", "#9c755f"]
    names = list(dict.fromkeys(st for _, st in s.memory_states))
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    y0, y1 = total * 1.02, total * 1.10
    pts = s.memory_states + [(s.end_s, s.memory_states[-1][1])]
    for (t0, st), (t1, _) in zip(pts, pts[1:]):
        ax.fill_between([t0, t1], y0, y1, color=colors[st], lw=0, step="post")
    for n in names:
        ax.plot([], [], color=colors[n], lw=6, label=f"host memory state: {n}")


def _plot_host_swap(s: VariantSeries, path: Path) -> Path | None:
    h = s.host
    if not _has_data(h["swap_out_pages"]):
        return None
    plt = _plt()
    fig, ax = _figure(plt, 10, 5.2)
    t = h["t_s"]
    vt = h["vt_us"]
    mk = "o" if t.size < 40 else None   # a lone point shows as a dot
    ax.plot(t, rate_per_s(h["swap_out_pages"], vt), label="host swap-out", color="tab:red", lw=2, marker=mk)
    ax.plot(t, rate_per_s(h["swap_in_pages"], vt), label="host swap-in", color="tab:blue", lw=2, marker=mk)
    disk = np.nan_to_num(h["vdisk_read_pages"]) + np.nan_to_num(h["vdisk_write_pages"])
    if disk.any():
        ax.plot(t, rate_per_s(disk, vt), label="guests' virtual-disk I/O", color="tab:gray", ls="--", lw=1.5, marker=mk)
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
    fig, (ax1, ax2) = _figure(plt, 10.5, 7.5, rows=2, right_in=2.5 if len(gids) > 1 else 0.3)
    colors = _guest_colors(gids)
    pts = {}
    for gid in gids:
        g = s.guests[gid]
        t_us = g["t_s"] * 1e6   # over each logged interval of the run's clock: a stalled guest counts as stalled
        # major faults only: the first touches of a warming guest are minor faults, not thrashing
        pts[gid] = (g["balloon_actual_pages"], rate_per_s(g["major_faults"], t_us), rate_per_s(g["refs"], t_us))
    to_axis = _log_zero_axis(ax1, [p[1] for p in pts.values()], below=1.0)
    put = to_axis or (lambda a: a)
    for gid, (x, faults, thr) in pts.items():
        idx = _thin(x.size)
        ax1.scatter(x[idx], put(faults[idx]), s=16, color=colors[gid], alpha=0.6, label=f"guest {gid}")
        ax2.scatter(x[idx], thr[idx], s=16, color=colors[gid], alpha=0.6, label=f"guest {gid}")
        for ax, y in ((ax1, faults), (ax2, thr)):
            # the median at each balloon size as a short bar: a reading, not a path between noisy points
            xs, ys = _binned_median(x, y)
            ax.scatter(xs, put(ys) if ax is ax1 else ys, marker="_", s=420, lw=2.5, color=colors[gid], zorder=4)
    ax2.scatter([], [], marker="_", s=200, lw=2.5, color="0.3", label="median at that balloon size")
    ax1.set_title(f"{s.name}: balloon size vs major faults and throughput\n"
                  "(each point one logged interval; a bar: the median of the points at that balloon size)")
    ax1.set_ylabel("major faults per virtual second" + ("\n(grey bottom row: under 1, or none)" if to_axis else ""))
    ax2.set_ylabel("references per virtual second")
    ax2.set_xlabel(_pages_label("balloon size"))
    if to_axis is None:
        ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    if s.refs_per_vsec_ceiling:
        ax2.axhline(s.refs_per_vsec_ceiling, color="0.35", lw=1.2, ls=(0, (6, 3)))
        ax2.annotate(_ceiling_text(s), (0.01, s.refs_per_vsec_ceiling), xycoords=("axes fraction", "data"),
                     xytext=(0, 4), textcoords="offset points", fontsize=8, color="0.25")
        ax2.set_ylim(0, s.refs_per_vsec_ceiling * 1.15)
    _eng(ax2)
    if len(gids) > 1:
        ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax2.legend(loc="best")
    return _save(fig, path)


def _ceiling_text(s: VariantSeries) -> str:
    c = s.refs_per_vsec_ceiling or 0.0
    return (f"ceiling: {_short(c)} references per virtual s (1 / (mem_ref_us + cpu_us_per_ref): "
            "a guest that never waits for a page)")


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
    data = []
    for gid, c in sorted(curves.items(), key=lambda kv: str(kv[0])):
        steps = sorted((r for r in c["steps"] if isinstance(r, dict)), key=lambda r: _f(r.get("balloon_pages")))
        x = np.array([_f(r.get("balloon_pages")) for r in steps])
        data.append((gid, c, steps, x, np.array([_f(r.get("faults_per_vsec")) for r in steps]),
                     np.array([_f(r.get("refs_per_vsec")) for r in steps])))
    to_axis = _log_zero_axis(ax1, [d[4] for d in data], below=1.0)
    put = to_axis or (lambda a: a)
    for color, (gid, c, steps, x, faults, thr) in zip(_colors(len(data)), data):
        ax1.plot(x, put(faults), marker="o", color=color, label=f"guest {gid}")
        ax2.plot(x, thr, marker="o", color=color, label=f"guest {gid}")
        one = len(data) == 1   # one guest: red knee, black working set; several: each in its guest's colour
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
    ax1.set_ylabel("page faults per virtual second" + ("\n(grey bottom row: under 1, or none)" if to_axis else ""))
    ax2.set_ylabel("references per virtual second")
    ax2.set_xlabel(_pages_label("balloon size"))
    if to_axis is None:
        ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    _eng(ax2)
    ax2.legend(loc="best")
    return _save(fig, path)


def _f(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def _plot_locks(s: VariantSeries, path: Path) -> Path | None:
    """Deadlocks: every cycle on a timeline, the first one's lock waits up close, and its wait-for graph."""
    if not s.cycles and not s.violations:
        return None
    plt = _plt()
    fig = plt.figure(figsize=(12, 8.6))
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 1.25], left=0.16, right=0.98, top=0.88, bottom=0.07,
                          hspace=0.55, wspace=0.18)
    ax_all, ax_zoom, ax_graph = fig.add_subplot(gs[0, :]), fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1])
    owners = sorted({w.get("owner", "?") for c in s.cycles for w in c["edges"]}, key=lambda o: (not o.startswith("host"), o))
    row = {o: i for i, o in enumerate(owners)}
    n = len(s.cycles)
    what = ("ended the run" if s.deadlocked else
            "each broken (one request in it failed, its guest retried)" if n and "fail" in s.cycles[0]["action"] else "")
    fig.suptitle(f"{s.name}: lock waits and wait-for cycles\n{n} cycle{'s' if n != 1 else ''}"
                 + (f", {what}" if what else "") + f"; {len(s.violations)} lock-order violation(s)", fontsize=12)
    # (a) the whole run: where each cycle closed, on the rows of the tasks in it
    for c in s.cycles:
        for w in c["edges"]:
            ax_all.plot([c["close_s"]], [row[w.get("owner", "?")]], marker="X", ms=9, color="tab:red", mec="black", lw=0)
    if s.violations:   # their own row under the tasks
        row["lock-order violations"] = -1
        ax_all.plot(s.violations, [-1] * len(s.violations), marker="^", ms=9, lw=0, color="tab:orange", mec="black",
                    label="a lock-order violation (L_vmem held while L_hostmem is taken)")
    ax_all.plot([], [], marker="X", ms=9, color="tab:red", mec="black", lw=0, label="a cycle closed (on each task in it)")
    if s.deadlocked:
        ax_all.axvspan(s.cycles[-1]["close_s"] if s.cycles else s.end_s, max(s.end_s, 1e-9), color="0.85")
        ax_all.annotate("deadlocked: the host ended the run here", (s.cycles[-1]["close_s"] if s.cycles else s.end_s, 0.5),
                        xycoords=("data", "axes fraction"), xytext=(-10, 0), textcoords="offset points", fontsize=9,
                        ha="right", bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.5"})
    ax_all.set_yticks(sorted(row.values()), [k for k, _ in sorted(row.items(), key=lambda kv: kv[1])])
    ax_all.set_ylim(min(row.values(), default=0) - 0.7, max(0.7, len(owners) - 0.3))
    end = max(s.end_s, max((c["close_s"] for c in s.cycles), default=0.0), max(s.violations, default=0.0))
    ax_all.set_xlim(-end * 0.02, end * 1.02 or 1)
    ax_all.set_xlabel("virtual time (s)")
    ax_all.set_title("the whole run", fontsize=10)
    ax_all.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=8, frameon=False)
    if not s.cycles:
        for ax in (ax_zoom, ax_graph):
            ax.set_axis_off()
        ax_zoom.text(0.5, 0.5, "no wait-for cycle: only order violations", ha="center", transform=ax_zoom.transAxes)
        return _save(fig, path)
    # (b) the first cycle up close: what each task held since when, and how long it waited
    first = s.cycles[0]
    start = min(min(_f(w.get("held_since_vt_us")), _f(w.get("since_vt_us"))) for w in first["edges"]) / 1e6
    span = max(first["close_s"] - start, 1e-4)
    mine = [w.get("owner", "?") for w in first["edges"]]
    for i, w in enumerate(first["edges"]):
        held, since = _f(w.get("held_since_vt_us")) / 1e6, _f(w.get("since_vt_us")) / 1e6
        ax_zoom.barh(i, first["close_s"] - held, left=held, height=0.5, color="tab:blue", alpha=0.35,
                     label="holds" if i == 0 else None)
        ax_zoom.text(held, i + 0.3, f"holds {w.get('holds_lock', w.get('holds'))}", fontsize=8, va="bottom")
        ax_zoom.barh(i, max(first["close_s"] - since, span * 0.01), left=since, height=0.22, color="tab:red",
                     label="waits" if i == 0 else None)
        ax_zoom.text(since, i - 0.3, f"waits for {w.get('waits_for_lock', w.get('waits_for'))}"
                     + (f" ({w['site']})" if w.get("site") else ""), fontsize=8, va="top", color="tab:red")
    ax_zoom.axvline(first["close_s"], color="black", lw=1.2, ls="--")
    ax_zoom.set_yticks(range(len(mine)), mine)
    ax_zoom.set_ylim(-0.9, len(mine) - 0.1)
    ax_zoom.set_xlim(start - span * 0.08, first["close_s"] + span * 0.35)
    ax_zoom.set_xlabel("virtual time (s)")
    ax_zoom.set_title(f"the first cycle, closed at {first['close_s']:.4f} s", fontsize=10)
    ax_zoom.legend(loc="lower right", fontsize=8)
    _wait_for_graph(ax_graph, first["edges"])
    ax_graph.set_title("its wait-for graph\n(an arrow: waits for what the next task holds)", fontsize=10)
    return _save(fig, path)


def _wait_for_graph(ax: Any, edges: list[dict[str, Any]]) -> None:
    from matplotlib.patches import FancyArrowPatch

    n = len(edges)
    ang = [math.pi / 2 + 2 * math.pi * k / n for k in range(n)] if n > 2 else [math.pi, 0.0][:n]
    pos = [(math.cos(a) * 0.62, math.sin(a) * 0.55) for a in ang]
    for k, w in enumerate(edges):
        (x1, y1), (x2, y2) = pos[k], pos[(k + 1) % n]
        arrow = FancyArrowPatch((x1, y1), (x2, y2), connectionstyle="arc3,rad=0.35", arrowstyle="-|>", mutation_scale=18,
                                color="tab:red", lw=2, shrinkA=38, shrinkB=38)
        ax.add_patch(arrow)
        # the label just outside the arc's apex (arc3 bends by rad * (dy, -dx) at its control point)
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        dx, dy = x2 - x1, y2 - y1
        ax_, ay_ = 0.5 * 0.35 * dy, -0.5 * 0.35 * dx
        ln = math.hypot(ax_, ay_) or 1.0
        lx, ly = mx + ax_ + ax_ / ln * 0.2, my + ay_ + ay_ / ln * 0.2
        ax.text(lx, ly, f"waits for {w.get('waits_for_lock', w.get('waits_for'))}"
                + (f"\n({w['site']})" if w.get("site") else ""), ha="center", va="center", fontsize=8,
                color="tab:red")
    for (x, y), w in zip(pos, edges):
        ax.text(x, y, f"{w.get('owner', '?')}\nholds {w.get('holds_lock', w.get('holds'))}", ha="center", va="center",
                fontsize=9, bbox={"boxstyle": "round,pad=0.5", "fc": "white", "ec": "#1d2330", "lw": 1.5})
    ax.set_xlim(-1.25, 1.25)
    ax.set_ylim(-1.05, 1.05)
    ax.set_axis_off()


def plot_variant(s: VariantSeries, out_dir: Path, prefix: str | None = None,
                 vsummary: dict[str, Any] | None = None) -> list[Plot]:
    """Every per-variant plot that has data; returns what was written.

    ``vsummary``: the variant's entry of summary.json, for what is computed
    there (the balloon sweep's steps and knee).
    """
    out_dir = Path(out_dir)
    p = safe_name(prefix if prefix is not None else s.name)
    ceiling = (s.refs_per_vsec_ceiling, _ceiling_text(s)) if s.refs_per_vsec_ceiling else None
    jobs: list[tuple[str, str, Callable[[Path], Path | None]]] = [
        ("balloon size vs target per guest", "guest-balloon", lambda path: _plot_balloon(s, path)),
        ("guest memory by kind", "guest-memory", lambda path: _plot_memory(s, path)),
        ("page-fault frequency per guest", "guest-pff", lambda path: _plot_guest_lines(
            s, path, "page-fault frequency per guest (the guest's smoothed PFF)", "page faults per virtual second",
            lambda g: g["pff"], logy=True)),
        ("working-set estimate per guest", "guest-working-set", lambda path: _plot_guest_lines(
            s, path, "working-set estimate per guest (sampled)", _pages_label("working set"),
            lambda g: g["working_set_pages"], ref=lambda g: g["total"] - np.nan_to_num(g["balloon_pages"])
            - np.nan_to_num(g["kernel_pages"]), ref_label="RAM less balloon, kernel")),
        ("throughput per guest", "guest-throughput", lambda path: _plot_guest_lines(
            s, path, "throughput per guest, over each logged interval (0: the guest waited the whole interval)",
            "references per virtual second", lambda g: rate_per_s(g["refs"], g["t_s"] * 1e6), eng=True,
            ceiling=ceiling)),
        ("host RAM by owner", "host-memory", lambda path: _plot_host_memory(s, path)),
        ("host swap-in/out rates", "host-swap", lambda path: _plot_host_swap(s, path)),
        ("balloon size vs major faults and throughput", "balloon-pff", lambda path: _plot_balloon_curve(s, path)),
        ("balloon sweep: faults and throughput per step", "balloon-steps",
         lambda path: _plot_sweep_steps(s.name, vsummary or {}, path)),
        ("lock waits and wait-for cycles", "locks", lambda path: _plot_locks(s, path)),
    ]
    written = []
    for title, stem, draw in jobs:
        path = draw(out_dir / f"{p}-{stem}.png")
        if path is not None:
            written.append(Plot(title, path, s.name, _files(out_dir / f"{p}-{stem}.png")))
    return written


# --- across variants --------------------------------------------------------------------


def _not_comparable(v: dict[str, Any]) -> str | None:
    """Why a variant's numbers cannot stand next to the others' (None when they can)."""
    if v.get("deadlocked"):
        return f"deadlocked after {v.get('ticks', '?')} ticks"
    lost = v.get("guests_lost") or {}
    if lost:
        return f"{len(lost)} guest{'s' if len(lost) != 1 else ''} lost"
    reason = v.get("reason")
    if reason not in (None, "completed"):
        return f"ended: {reason}"
    return None


def _bars(names: Sequence[str], path: Path, title: str, ylabel: str,
          groups: Sequence[tuple[str, Sequence[float], Any]], fmt: Callable[[float], str], eng: bool = False,
          notes: dict[str, str] | None = None, baseline: str | None = None) -> Path:
    """Grouped bars; a variant in ``notes`` is hatched grey and labelled why; the baseline's value a dashed line."""
    plt = _plt()
    notes = notes or {}
    width = min(16.0, max(6.5, 1.1 * len(names) * max(1, len(groups)) + 2.5))
    fig, ax = _figure(plt, width, 5.8)
    x = np.arange(len(names))
    bw = 0.8 / max(1, len(groups))
    base_vals = None
    if baseline in names:
        base_vals = [vals[list(names).index(baseline)] for _, vals, _ in groups]
    for i, (label, values, color) in enumerate(groups):
        pos = x - 0.4 + bw * (i + 0.5)
        for j, (px, val, name) in enumerate(zip(pos, values, names)):
            odd = name in notes
            bar = ax.bar(px, val, bw * 0.92, color="0.8" if odd else color, hatch="//" if odd else None,
                         edgecolor="0.4" if odd else color)[0]
            text = fmt(val)
            if base_vals is not None and not odd and name != baseline and base_vals[i]:
                text += f"\n({val / base_vals[i]:.2f}x)"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8.5, xytext=(0, 2), textcoords="offset points")
        if base_vals is not None and len(names) > 1:
            ax.axhline(base_vals[i], color=color, lw=1, ls="--", alpha=0.8)
    ax.set_xticks(x, [textwrap.fill(n, 14) + (f"\n({notes[n]})" if n in notes else "")
                      + ("\n(baseline)" if n == baseline and len(names) > 1 else "") for n in names], fontsize=9)
    subtitle = ""
    if notes:
        subtitle = "\nhatched: not comparable (" + "; ".join(f"{n} {why}" for n, why in notes.items()) + ")"
    if baseline and len(names) > 1:
        subtitle += f"\ndashed: {baseline}, the baseline of the ratios"
    ax.set_title(title + subtitle, fontsize=11)
    lines = (title + subtitle).count("\n") + 1
    label_lines = 1 + any(n in notes or n == baseline for n in names) + max(textwrap.fill(n, 14).count("\n") for n in names)
    fig.subplots_adjust(top=1 - (0.25 + 0.22 * lines) / 5.8, bottom=(0.35 + 0.17 * label_lines) / 5.8)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.35 if len(groups) > 1 else 0.2)
    ax.grid(axis="x", visible=False)
    if eng:
        _eng(ax)
    if len(groups) > 1:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=lbl) for lbl, _, c in groups], loc="upper right", fontsize=8,
                  ncols=len(groups))
    return _save(fig, path)


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:.0f}"


def plot_across(summary: dict[str, Any], series: dict[str, VariantSeries], out_dir: Path,
                order: Sequence[str] | None = None, baseline: str | None = None) -> list[Plot]:
    """Bars of I/O per reclaimed page and throughput per variant; the balloon sweep across variants.

    ``baseline``: the variant the report's ratios are against (never one that
    deadlocked or lost guests); variants whose numbers are not comparable
    are hatched and say why.
    """
    out_dir = Path(out_dir)
    variants = summary.get("variants", {})
    names = [n for n in (order or variants) if n in variants]
    if not names:
        return []
    written: list[Plot] = []
    vs = [variants[n] for n in names]
    notes = {n: why for n in names if (why := _not_comparable(variants[n])) is not None}
    bars = [("all reclaimed pages", [float(v.get("io_per_reclaimed_page", 0)) for v in vs], "tab:purple")]
    if any("host_swap_writes_clean_cache" in v for v in vs):
        # Real host swap I/O on pages the guests labelled clean cache, per such page the host took; a
        # variant whose host took none (ballooning) shows 0. Without labels there is no honest bar to draw.
        def per_page(v: dict[str, Any], key: str) -> float:
            took = float(v.get("host_took_clean_cache_pages", 0))
            return float(v.get(key, 0)) / took if took else 0.0
        bars += [("clean page cache: host swap writes", [per_page(v, "host_swap_writes_clean_cache") for v in vs],
                  "tab:red"),
                 ("clean page cache: host swap reads", [per_page(v, "host_swap_reads_clean_cache") for v in vs],
                  "tab:blue")]
    path = _bars(names, out_dir / "io-per-reclaimed-page.png",
                 "Disk I/O per reclaimed page (lower is better)", "pages of disk I/O per reclaimed page",
                 bars, lambda x: f"{x:.2f}", notes=notes, baseline=baseline)
    written.append(Plot("I/O per reclaimed page, per variant", path, None, _files(out_dir / "io-per-reclaimed-page.png")))
    path = _bars(names, out_dir / "throughput.png", "Throughput, all guests (higher is better)",
                 "memory references per virtual second",
                 [("throughput", [float(v.get("refs_per_vsec", 0)) for v in vs], "tab:green")], _si, eng=True,
                 notes=notes, baseline=baseline)
    written.append(Plot("throughput per variant", path, None, _files(out_dir / "throughput.png")))
    sweep = _plot_sweep(names, series, out_dir / "balloon-sweep.png")
    if sweep is not None:
        written.append(Plot("balloon size vs PFF and throughput across variants", sweep, None,
                            _files(out_dir / "balloon-sweep.png")))
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
