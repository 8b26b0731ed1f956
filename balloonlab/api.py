"""The Python API: run a scenario, or load a finished run, and get its data as pandas tables.

    import balloonlab
    run = balloonlab.run("swap-storm", guests=4, seed=3, overrides={"host.overcommit": 1.5})
    run.summary          # summary.json as a dict
    run.guests           # one row per guest per metrics tick (pandas)
    run.host             # one row per host metrics tick
    run.events           # one row per event
    run.decisions        # the balloon controller's decisions, inputs as columns
    again = balloonlab.load(run.dir)

``run`` is what ``balloonlab-launch`` does (the command line calls it):
the same checks before any process starts (a bad scenario raises
``ConfigError``, the command line's exit 2), the same processes, logs,
summary and report. ``Run.exit_status`` is the command line's exit status.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from balloonlab.proto.errors import ConfigError

from .overrides import Setting, normalize
from .scenario import Overrides

if TYPE_CHECKING:
    import pandas as pd

    from .analysis.tables import Tables
    from .runner import VariantResult

__all__ = ["run", "load", "Run", "ConfigError"]


def run(scenario: str | os.PathLike[str] = "basic", *, guests: int | None = None, seed: int | None = None,
        ticks: int | None = None, duration_s: float | None = None, variant: str | None = None,
        overrides: Mapping[str, Any] | Iterable[Setting] | None = None, run_dir: str | os.PathLike[str] | None = None,
        transport: str = "unix", log_level: str = "info", report: bool = True, verbose: bool = True,
        formats: Iterable[str] = ("png",), dashboard: bool = False, dashboard_port: int = 0,
        force: bool = False, guest_start: str | None = None) -> "Run":
    """Run ``scenario`` (a name or a .toml path) with host + guest processes to its end.

    ``overrides`` maps dotted keys to values (``{"host.overcommit": 1.5,
    "balloon.policy": "working-set"}``; see ``balloonlab.overrides``).
    ``report=False`` skips report.md and the plots; ``formats`` are the
    figures' file formats (png, svg, pdf); ``dashboard=True`` serves the live
    dashboard on 127.0.0.1 while the run goes (its URL is printed);
    ``verbose=False`` prints nothing. ``guest_start`` is ``"fork"`` (guests
    forked from the fork server, the default) or ``"exec"`` (one interpreter
    each; ``BALLOONLAB_FORKSERVER=0`` makes it the default). ``run_dir`` must not exist or be empty
    (``force=True`` clears it first; a bad one raises ``RunDirError``). Raises ``ConfigError`` for a bad scenario or argument,
    before any process starts; a run that fails is returned, with
    ``ok`` false and ``exit_status`` 1 (130 when interrupted).
    """
    from . import launch as launcher

    for name, value in (("guests", guests), ("ticks", ticks)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if duration_s is not None and ticks is not None:
        raise ConfigError("give duration_s or ticks, not both")
    if duration_s is not None and not (isinstance(duration_s, (int, float)) and duration_s > 0):
        raise ConfigError(f"duration_s must be > 0, got {duration_s!r}")
    settings = normalize(overrides)
    path, loaded = launcher.prepare(scenario, Overrides(guests=guests, seed=seed, duration_s=duration_s, ticks=ticks,
                                                        variant=variant, settings=settings))
    outcome = launcher.launch(path, loaded, run_dir=None if run_dir is None else Path(run_dir), force=force,
                              transport=transport,
                              log_level=log_level, report=report, settings=settings, verbose=verbose,
                              formats=tuple(formats), dashboard=dashboard, dashboard_port=dashboard_port,
                              guest_start=guest_start)
    return Run(outcome.run_dir, exit_status=outcome.exit_status, results=outcome.results, _summary=outcome.summary)


def load(run_dir: str | os.PathLike[str]) -> "Run":
    """A finished run from its directory (what ``run`` returned, or any run of the launcher)."""
    path = Path(run_dir)
    from .analysis.logs import find_variants
    find_variants(path)   # raises FileNotFoundError naming the directory when it holds no run
    return Run(path)


@dataclass
class Run:
    """A run directory and its data. The tables are read from the logs on first use, then kept."""

    dir: Path
    exit_status: int | None = None                       # None: loaded, not run here
    results: list["VariantResult"] = field(default_factory=list, repr=False)
    _summary: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Every variant ran to its end (the command line's exit status 0); a loaded run: its summary says so."""
        if self.exit_status is not None:
            return self.exit_status == 0
        return all(v.get("reason") == "completed" for v in self.summary.get("variants", {}).values())

    @property
    def summary(self) -> dict[str, Any]:
        """``summary.json`` (computed from the logs and written when the run has none)."""
        if self._summary is None:
            path = self.dir / "summary.json"
            if path.exists():
                self._summary = json.loads(path.read_text())
            else:
                from .analysis.summary import summarize, write_summary
                self._summary = summarize(self.dir)
                write_summary(self.dir, self._summary)
        return self._summary

    @property
    def variants(self) -> list[str]:
        return list(self.summary.get("variants", {}))

    @cached_property
    def _tables(self) -> "Tables":
        from .analysis.tables import load_tables
        return load_tables(self.dir)

    @property
    def guests(self) -> "pd.DataFrame":
        """One row per guest per metrics tick: variant, guest, tick, t_s, vt_us, the guest's stats, host_*."""
        return self._tables.guests

    @property
    def host(self) -> "pd.DataFrame":
        """One row per host metrics tick: variant, tick, t_s, vt_us and the host's gauges and counters."""
        return self._tables.host

    @property
    def events(self) -> "pd.DataFrame":
        """One row per logged event (not the per-tick metrics), with its fields as columns."""
        return self._tables.events

    @property
    def decisions(self) -> "pd.DataFrame":
        """The balloon controller's decisions: guest, tick, decision, code, reason, targets, in_* inputs."""
        return self._tables.decisions

    @property
    def report_path(self) -> Path | None:
        path = self.dir / "report.md"
        return path if path.exists() else None

    def export(self, out_dir: str | os.PathLike[str], fmt: str = "csv") -> list[Path]:
        """Write the four tables as CSV or Parquet files into ``out_dir``."""
        from .analysis.tables import export_tables
        return export_tables(self.dir, Path(out_dir), fmt, self._tables)
