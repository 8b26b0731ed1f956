"""What a host monitor is: its life in the host, its config, its keys in the summary, its report section.

A monitor is one module in ``hostd/monitors/`` that defines ``SPEC``, a
``MonitorSpec``, and one line in ``registry.MONITORS``. The spec says:

- ``name``: its ``[monitors.NAME]`` table and its key in
  ``run_finished.monitors``;
- ``config``: a frozen dataclass, the table's keys and their defaults (None:
  no table); fields may be marked ``fraction``, ``at_least_one`` or
  ``choice`` for the parser (``config.py``);
- ``make(cfg, ctx)``: the running monitor (``Monitor``);
- ``history_ticks(cfg)``: how many ticks of ``History`` it reads;
- for the analysis (``balloonlab.analysis``), all optional, all on plain
  dicts (the run's logs and its ``summary.json`` entry for one variant):
  ``summarize`` (its keys in summary.json), ``headline`` (its rows in the
  side-by-side table), ``table_fragment`` and ``table_lines`` (the text
  summary) and ``report`` (its part of the variant's "Pathologies" section
  in report.md).

The host drives a monitor (``HostMonitors``, call order)::

    make -> (guest_joined | guest_gone)*
         ; as it happens (host memory's observer): guest_pages_swapped_in, disk_written
         ; each tick: record_tick(tick)   for every monitor (what happened in the tick)
                      end_tick(tick)      for every monitor (decide and act, on the history)
         ; at the end: finished_keys()

``record_tick`` runs for all before any ``end_tick``: what a tick did is
judged against the state it ran under (double faults against the pins of
that tick) and the history holds the tick before anyone reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from .window import History

__all__ = ["Monitor", "MonitorBase", "MonitorSpec", "MonitorContext", "TickContext", "SummaryKeys", "Headline",
           "ReportFormat", "fraction", "at_least_one", "choice", "count_events"]


# --- the config's field markers (read by config.py) -----------------------------------------------


def fraction(default: float) -> Any:
    """A share: in [0, 1]."""
    return field(default=default, metadata={"fraction": True})


def at_least_one(default: int) -> Any:
    return field(default=default, metadata={"at_least_one": True})


def choice(default: str, options: Sequence[str]) -> Any:
    return field(default=default, metadata={"choices": tuple(options)})


# --- the running monitor ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TickContext:
    """One tick's end, as every monitor sees it."""

    tick: int
    vt_us: float
    # host memory's snapshot of this tick; its per-guest "guests" rows only in the ticks the machine logs
    # (they cost most of it with many guests): a monitor reads a guest's gauges from host memory
    snap: Mapping[str, Any]
    stats: Mapping[int, Mapping[str, Any]]    # each live guest's last report
    targets: Mapping[int, int]                # the balloon targets set this tick
    history: "History"                        # the last ticks (this one included from end_tick on)


class Monitor(Protocol):
    def guest_joined(self, guest_id: int, ram_pages: int, spec: Mapping[str, Any]) -> None: ...

    def guest_gone(self, guest_id: int) -> None: ...

    def guest_pages_swapped_in(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> None: ...

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None: ...

    def record_tick(self, tick: TickContext) -> None: ...

    def end_tick(self, tick: TickContext) -> None: ...

    def finished_keys(self) -> dict[str, Any]:
        """Its keys in ``run_finished.monitors`` (its ``summarize`` reads them back)."""
        ...


class MonitorBase:
    """Every hook a no-op: a monitor overrides what it uses."""

    def guest_joined(self, guest_id: int, ram_pages: int, spec: Mapping[str, Any]) -> None:
        pass

    def guest_gone(self, guest_id: int) -> None:
        pass

    def guest_pages_swapped_in(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> None:
        pass

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        pass

    def record_tick(self, tick: TickContext) -> None:
        pass

    def end_tick(self, tick: TickContext) -> None:
        pass

    def finished_keys(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class MonitorContext:
    """What a monitor is built with: host memory, the clock's tick, the log, and the other monitors."""

    mem: Any                                   # hostd.memory.HostMemory
    tick_us: float
    log: Any
    history_ticks: int                         # the longest window any monitor reads
    peers: Callable[[str], Any]                # name -> that monitor (resolved when called), or None
    seed: int = 0                              # the run's seed (a monitor that samples seeds its stream from it)


# --- the analysis side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryKeys:
    """What a monitor adds to a variant in summary.json: under ``host``, and at the variant's top level."""

    host: dict[str, Any] = field(default_factory=dict)
    variant: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Headline:
    """A row of the variants-side-by-side table (``balloonlab.analysis.compare``)."""

    key: str
    label: str
    get: Callable[[dict[str, Any]], Any]   # the variant's summary -> its value
    better: str = ""                       # "lower", "higher" or ""


@dataclass(frozen=True)
class ReportFormat:
    """The report's own formatting, handed to a monitor's ``report`` so that it writes like the rest."""

    cell: Callable[[Any], str]                 # one value in a table cell or a sentence
    table: Callable[[list[Any]], str]          # a list of dicts as a markdown table


def count_events(v: Mapping[str, Any], event: str, summary_key: str | None = None) -> float | None:
    """A variant's count of ``event`` (its ``summary_key`` when it has one); None without event counts."""
    if summary_key is not None and isinstance(v.get(summary_key), (int, float)):
        return float(v[summary_key])
    counts = v.get("event_counts")
    if not isinstance(counts, dict):
        return None  # a summary.json written before event counts existed
    return float(counts.get(event, 0))


@dataclass(frozen=True)
class MonitorSpec:
    name: str
    make: Callable[[Any, MonitorContext], Monitor]
    config: type | None = None
    history_ticks: Callable[[Any], int] = lambda cfg: 0
    summarize: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]], Mapping[str, Any]], SummaryKeys] | None = None
    """(run_finished.monitors, the host's log events, run_finished) -> its summary keys."""
    headline: tuple[Headline, ...] = ()
    table_fragment: Callable[[Mapping[str, Any]], str] | None = None
    """Its part of the summary table's ``pathologies:`` line, from the variant's summary."""
    table_lines: Callable[[Mapping[str, Any]], list[str]] | None = None
    report: Callable[[Mapping[str, Any], ReportFormat], list[str]] | None = None
    """Its lines in the variant's "Pathologies" section of report.md, from the variant's summary."""

    def default_config(self) -> Any:
        return None if self.config is None else self.config()
