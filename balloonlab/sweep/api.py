"""``balloonlab.sweep(...)``: a scenario over a grid and seeds on Dask, with statistics; ``load_sweep(dir)``.

    import balloonlab
    s = balloonlab.sweep("swap-storm", grid={"host.overcommit": [1.2, 1.5, 2.0],
                                             "balloon.policy": ["none", "proportional", "working-set"]},
                         seeds=10, out="sweeps/storm")
    s.runs       # one row per run (and variant): grid values, seed, status, headline metrics
    s.summary    # per grid point, variant and metric: n, mean, std, ci95_low, ci95_high
    s.plots      # PNG and SVG files

The sweep's directory holds ``sweep.json`` (what it runs), ``cells/KEY.json``
(one record per finished cell: resuming skips those that are ``ok``),
``runs/KEY/`` (each run's directory), ``runs.csv``, ``summary.csv``,
``summary.md`` and ``plots/``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from balloonlab.overrides import Setting, normalize
from balloonlab.proto.errors import ConfigError
from balloonlab.scenario import SCENARIO_DIR, Overrides, find_scenario

from .execute import SweepError, read_records, run_cells
from .results import DEFAULT_PLOT_METRICS, METRICS, plot_sweep, runs_table, summary_markdown, summary_table
from .spec import Axis, SweepSpec, checked_axes, parse_seeds, sweep_table

__all__ = ["sweep", "load_sweep", "SweepResult", "make_spec", "DEFAULT_SEEDS"]

DEFAULT_SEEDS = 3


@dataclass
class SweepResult:
    dir: Path
    spec: SweepSpec
    runs: pd.DataFrame
    summary: pd.DataFrame
    plots: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """Cells whose run failed twice (or once, in a sweep that was not resumed since)."""
        return int(self.runs.loc[self.runs["status"] != "ok", "cell"].nunique())

    @property
    def ok(self) -> bool:
        return self.failed == 0


def make_spec(scenario: str | os.PathLike[str], *, grid: Mapping[str, Sequence[Any]] | Iterable[Axis] | None = None,
              seeds: int | Sequence[int] | None = None, overrides: Mapping[str, Any] | Iterable[Setting] | None = None,
              guests: int | None = None, ticks: int | None = None, duration_s: float | None = None,
              variant: str | None = None, metrics: Sequence[str] | None = None, x: str | None = None) -> SweepSpec:
    """The sweep to run, checked: every grid point's scenario is loaded and validated before anything runs."""
    path = find_scenario(str(scenario)).resolve()
    built_in = path.parent == SCENARIO_DIR.resolve()
    table = sweep_table(path)
    if grid is not None:
        axes = checked_axes([a for a in grid] if not isinstance(grid, Mapping)
                             else [Axis(k, tuple(v)) for k, v in grid.items()])
    else:
        axes = table.get("axes", ())
    seed_list = parse_seeds(seeds) if seeds is not None else table.get("seeds", parse_seeds(DEFAULT_SEEDS))
    chosen = tuple(metrics) if metrics is not None else table.get("metrics", DEFAULT_PLOT_METRICS)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown sweep metric(s) {unknown}; known: {list(METRICS)}")
    x = x if x is not None else table.get("x")
    if x is not None and x not in [a.path for a in axes]:
        raise ConfigError(f"plot axis {x!r} is not a grid axis; axes: {[a.path for a in axes]}")
    spec = SweepSpec(scenario=path.stem if built_in else str(path), axes=tuple(axes), seeds=seed_list,
                     settings=normalize(overrides), guests=guests, ticks=ticks, duration_s=duration_s, variant=variant,
                     metrics=chosen, x=x, scenario_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    _validate(spec)
    return spec


def _validate(spec: SweepSpec) -> None:
    """Load every grid point as a run would (the seed changes nothing a scenario check looks at)."""
    from balloonlab.launch import prepare
    points = {tuple(c.values) for c in spec.cells()}
    for point in sorted(points, key=repr):
        try:
            prepare(spec.scenario, Overrides(guests=spec.guests, ticks=spec.ticks, duration_s=spec.duration_s,
                                             variant=spec.variant, settings=(*spec.settings, *point)))
        except ConfigError as exc:
            where = ", ".join(f"{p}={v!r}" for p, v in point)
            raise ConfigError(f"grid point {where or '(none)'}: {exc}") from None


def _spec_from_json(data: Mapping[str, Any]) -> SweepSpec:
    return SweepSpec(scenario=data["scenario"], axes=tuple(Axis(a["path"], tuple(a["values"])) for a in data["axes"]),
                     seeds=tuple(data["seeds"]), settings=tuple((p, v) for p, v in data.get("settings", [])),
                     guests=data.get("guests"), ticks=data.get("ticks"), duration_s=data.get("duration_s"),
                     variant=data.get("variant"), metrics=tuple(data.get("metrics") or DEFAULT_PLOT_METRICS),
                     x=data.get("x"), scenario_sha256=data.get("scenario_sha256", ""))


def _claim(out: Path, spec: SweepSpec) -> None:
    """Write sweep.json; a directory that holds another sweep (other scenario, settings, length) is refused."""
    path = out / "sweep.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict):
            mine = json.loads(json.dumps(spec.base()))
            theirs = {k: old.get(k) for k in mine}
            if theirs != mine:
                diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
                raise SweepError(f"{out} holds another sweep (differs in {sorted(diff)}: {diff}); "
                                 f"use another --out, or delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.to_json(), indent=1) + "\n")


def sweep(scenario: str | os.PathLike[str], *, grid: Mapping[str, Sequence[Any]] | None = None,
          seeds: int | Sequence[int] | None = None, overrides: Mapping[str, Any] | Iterable[Setting] | None = None,
          guests: int | None = None, ticks: int | None = None, duration_s: float | None = None,
          variant: str | None = None, out: str | os.PathLike[str] | None = None, scheduler: str | None = None,
          workers: int | None = None, timeout_s: float | None = None, metrics: Sequence[str] | None = None,
          x: str | None = None, progress: bool = True, dashboard: bool = False) -> SweepResult:
    """Run every cell (grid point x seed) not finished yet in ``out``; write the tables and plots.

    ``scheduler``: a Dask scheduler's address (``tcp://HOST:PORT``); without
    it an embedded LocalCluster of ``workers`` (default: half the cores, at least 2)
    runs the cells. ``timeout_s`` bounds each run's wall time. ``dashboard``:
    each run serves its live dashboard on its worker's 127.0.0.1, and each
    URL is appended to ``dashboards.jsonl`` in ``out`` as its run starts.
    """
    spec = make_spec(scenario, grid=grid, seeds=seeds, overrides=overrides, guests=guests, ticks=ticks,
                     duration_s=duration_s, variant=variant, metrics=metrics, x=x)
    name = Path(spec.scenario).stem
    out_dir = Path(out) if out is not None else Path("sweeps") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _claim(out_dir, spec)
    cells = spec.cells()
    done = {k for k, r in read_records(out_dir).items() if r.get("status") == "ok"}
    todo = [c for c in cells if c.key not in done]
    run_cells(spec, todo, out_dir, scheduler=scheduler, workers=workers, timeout_s=timeout_s,
              resumed=len(cells) - len(todo), total=len(cells), progress=progress, dashboard=dashboard)
    return write_results(out_dir, spec)


def write_results(out_dir: Path, spec: SweepSpec) -> SweepResult:
    """runs.csv, summary.csv, summary.md and the plots, from the records of the spec's cells."""
    records = read_records(out_dir)
    mine = [records[c.key] for c in spec.cells() if c.key in records]
    runs = runs_table(spec, mine)
    summary = summary_table(spec, runs)
    runs.to_csv(out_dir / "runs.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    failed = int(runs.loc[runs["status"] != "ok", "cell"].nunique())
    (out_dir / "summary.md").write_text(summary_markdown(spec, summary, spec.metrics, failed))
    plots = plot_sweep(spec, summary, spec.metrics, out_dir / "plots", spec.x)
    return SweepResult(out_dir, spec, runs, summary, plots)


def load_sweep(out: str | os.PathLike[str]) -> SweepResult:
    """A sweep's results from its directory (finished or not; nothing is run), tables rewritten."""
    out_dir = Path(out)
    try:
        spec = _spec_from_json(json.loads((out_dir / "sweep.json").read_text()))
    except FileNotFoundError:
        raise SweepError(f"{out_dir}: no sweep.json (not a sweep directory)") from None
    return write_results(out_dir, spec)
