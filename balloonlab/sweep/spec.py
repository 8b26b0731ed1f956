"""What a sweep runs: a scenario, grid axes of dotted-key overrides, seeds; every cell is one run.

A grid comes from ``--grid host.overcommit=1.2,1.5,2.0`` (repeatable) or
from the scenario's ``[sweep]`` table::

    [sweep]
    grid = { "host.overcommit" = [1.2, 1.5, 2.0], "balloon.policy" = ["none", "working-set"] }
    seeds = 10                 # seeds 1..10, or a list: [3, 7, 11]
    metrics = ["refs_per_vsec", "host_swap_out_pages"]   # plotted (default: a few headline metrics)
    x = "host.overcommit"      # the plots' x axis (default: the first numeric axis)

Command-line ``--grid`` replaces the table's grid and ``--seeds`` its seeds.
A cell is one grid point with one seed; its key (a readable name plus a
hash of its values) names its run directory and its record, which is how a
resumed sweep knows what is done.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from balloonlab.proto.errors import ConfigError
from balloonlab.overrides import Setting, normalize, parse_value

__all__ = ["Axis", "Cell", "SweepSpec", "parse_grid", "parse_seeds", "sweep_table", "checked_axes"]


@dataclass(frozen=True)
class Axis:
    path: str                   # a dotted key into the scenario's tables
    values: tuple[Any, ...]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


@dataclass(frozen=True)
class Cell:
    values: tuple[Setting, ...]   # (path, value) per axis, in axis order
    seed: int

    @property
    def key(self) -> str:
        """A directory name: the values (short), the seed, and a hash that keeps it unique."""
        text = json.dumps([list(map(list, self.values)), self.seed])
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        parts = [f"{path.rsplit('.', 1)[-1]}-{_slug(v)}" for path, v in self.values]
        return "_".join([*parts, f"s{self.seed}", digest])


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.rsplit("/", 1)[-1]   # a file policy: its file and class
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")[:24] or "x"


@dataclass(frozen=True)
class SweepSpec:
    scenario: str                          # a built-in scenario name or an absolute .toml path
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    settings: tuple[Setting, ...] = ()     # fixed overrides for every cell
    guests: int | None = None
    ticks: int | None = None
    duration_s: float | None = None
    variant: str | None = None
    metrics: tuple[str, ...] = ()
    x: str | None = None
    scenario_sha256: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        grid = itertools.product(*(a.values for a in self.axes)) if self.axes else [()]
        return [Cell(tuple((a.path, v) for a, v in zip(self.axes, point)), seed)
                for point in grid for seed in self.seeds]

    def base(self) -> dict[str, Any]:
        """What every cell shares; a resumed sweep must have the same (the grid and seeds may grow)."""
        return {"scenario": self.scenario, "scenario_sha256": self.scenario_sha256,
                "settings": [list(s) for s in self.settings], "guests": self.guests, "ticks": self.ticks,
                "duration_s": self.duration_s, "variant": self.variant}

    def to_json(self) -> dict[str, Any]:
        return {**self.base(), "axes": [{"path": a.path, "values": list(a.values)} for a in self.axes],
                "seeds": list(self.seeds), "metrics": list(self.metrics), "x": self.x}


def parse_grid(texts: Sequence[str]) -> tuple[Axis, ...]:
    """``["host.overcommit=1.2,1.5", "balloon.policy=none,working-set"]`` -> axes (values as TOML values)."""
    axes = []
    for text in texts:
        path, sep, values = text.partition("=")
        if not sep or not path.strip() or not values.strip():
            raise ConfigError(f"--grid {text!r}: expected KEY=V1,V2,... e.g. host.overcommit=1.2,1.5,2.0")
        axes.append(Axis(path.strip(), tuple(parse_value(v) for v in values.split(","))))
    return checked_axes(axes)


def checked_axes(axes: Sequence[Axis]) -> tuple[Axis, ...]:
    seen = set()
    for a in axes:
        normalize([(a.path, a.values[0] if a.values else None)])   # checks the dotted path
        if a.path in seen:
            raise ConfigError(f"grid axis {a.path!r} given twice")
        if not a.values:
            raise ConfigError(f"grid axis {a.path!r} has no values")
        if len(set(map(json.dumps, a.values))) != len(a.values):
            raise ConfigError(f"grid axis {a.path!r} repeats a value: {list(a.values)}")
        seen.add(a.path)
    return tuple(axes)


def parse_seeds(value: Any) -> tuple[int, ...]:
    """``10`` or ``"10"`` -> seeds 1..10; ``[3, 7]`` or ``"3,7"`` -> those seeds."""
    if isinstance(value, str):
        value = [int(x) for x in value.split(",")] if "," in value else int(value)
    if isinstance(value, bool):
        raise ConfigError(f"seeds: expected a count or a list of seeds, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"seeds: need at least 1, got {value}")
        return tuple(range(1, value + 1))
    if isinstance(value, (list, tuple)) and value and all(isinstance(s, int) and not isinstance(s, bool)
                                                          and s >= 0 for s in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"seeds: a seed is repeated in {list(value)}")
        return tuple(value)
    raise ConfigError(f"seeds: expected a count >= 1 or a list of seeds >= 0, got {value!r}")


def sweep_table(path: Path) -> dict[str, Any]:
    """The scenario file's ``[sweep]`` table, checked (empty when it has none)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}   # the scenario loader reports a broken file, with its own words
    table = raw.get("sweep", {})
    where = f"scenario {Path(path).name}: [sweep]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    known = {"grid", "seeds", "metrics", "x"}
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key; known: {sorted(known)}")
    grid = table.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        raise ConfigError(f"{where}.grid: expected a table of dotted key = [values]")
    out: dict[str, Any] = {"axes": checked_axes([Axis(k, tuple(v)) for k, v in grid.items()])}
    if "seeds" in table:
        out["seeds"] = parse_seeds(table["seeds"])
    if "metrics" in table:
        if not isinstance(table["metrics"], list) or not all(isinstance(m, str) for m in table["metrics"]):
            raise ConfigError(f"{where}.metrics: expected a list of metric names")
        out["metrics"] = tuple(table["metrics"])
    if "x" in table:
        if not isinstance(table["x"], str):
            raise ConfigError(f"{where}.x: expected a grid key")
        out["x"] = table["x"]
    return out
