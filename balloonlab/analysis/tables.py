"""A run's logs as tidy pandas tables, and their export to CSV or Parquet.

- ``guests``: one row per guest per metrics tick (every ``metrics_every_ticks``):
  ``variant``, ``guest``, ``tick``, ``t_s`` (virtual seconds at the end of
  the tick, the host's clock, so guests line up), ``vt_us`` (the guest's own
  clock), every number the guest logged, and what the host logged about
  that guest on the same tick, as ``host_*`` (``host_balloon_target_pages``
  the target it had set, ``host_resident_pages``, ``host_swapped_pages``, ...).
- ``host``: one row per host metrics tick: ``variant``, ``tick``, ``t_s``,
  ``vt_us`` and the host's gauges and counters.
- ``events``: one row per event other than the per-tick metrics, in each
  process's log order: ``variant``, ``proc``, ``guest``, ``tick``,
  ``vt_us``, ``event``, ``level``, ``timestamp`` and the event's own fields
  (a field an event does not have is missing: NaN/None).
- ``decisions``: the ``balloon_decision`` events with their ``inputs``
  spread into columns (``in_working_set_pages``, ``in_pff``, ...).

Every metrics line is read (no sampling, unlike the report's plots).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from balloonlab.proto import events as ev

from .logs import VariantLogs, find_variants, load_variant

__all__ = ["Tables", "load_tables", "guest_table", "host_table", "event_table", "decision_table",
           "export_tables", "EXPORT_FORMATS", "TABLE_NAMES"]

TABLE_NAMES = ("guests", "host", "events", "decisions")
EXPORT_FORMATS = ("csv", "parquet")
_ALL_LINES = 1 << 40   # read_log's sample size: in effect, keep every metrics line
# Context every line carries that says nothing about the tick's numbers.
_CONTEXT = ("event", "level", "timestamp", "proc", "run_id", "logger", "variant")


@dataclass
class Tables:
    guests: pd.DataFrame
    host: pd.DataFrame
    events: pd.DataFrame
    decisions: pd.DataFrame


def read_variants(run_dir: Path) -> list[VariantLogs]:
    """Every variant's logs with every metrics line kept."""
    return [load_variant(name, path, warn=False, max_tick_samples=_ALL_LINES) for name, path in find_variants(run_dir)]


def load_tables(run_dir: Path) -> Tables:
    logs = read_variants(run_dir)
    return Tables(guest_table(logs), host_table(logs), event_table(logs), decision_table(logs))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _tick_us(v: VariantLogs) -> float:
    return float(v.config.get("tick_us") or 10_000)


def _metric_rows(events: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for e in events:
        if e.get("event") == ev.TICK_COMPLETED:
            yield e


def host_table(logs: Sequence[VariantLogs]) -> pd.DataFrame:
    rows = []
    for v in logs:
        for e in _metric_rows(v.host):
            row: dict[str, Any] = {"variant": v.name, "tick": e.get("tick"), "t_s": None, "vt_us": e.get("vt_us")}
            row.update({k: x for k, x in e.items() if k not in _CONTEXT and k not in row
                        and (_is_number(x) or isinstance(x, bool))})
            if _is_number(row["vt_us"]):
                row["t_s"] = row["vt_us"] / 1e6
            rows.append(row)
    return _frame(rows, ["variant", "tick", "t_s", "vt_us"])


def guest_table(logs: Sequence[VariantLogs]) -> pd.DataFrame:
    rows = []
    for v in logs:
        tick_us = _tick_us(v)
        # What the host logged about each guest, by (guest, tick): joined onto the guest's own line.
        seen: dict[tuple[int, int], dict[str, Any]] = {}
        for e in _metric_rows(v.host):
            tick = e.get("tick")
            targets = e.get("balloon_targets") or {}
            for gid, fields in (e.get("guests") or {}).items():
                if not str(gid).isdigit() or not isinstance(fields, dict):
                    continue
                extra = {f"host_{k}": x for k, x in fields.items() if _is_number(x)}
                if _is_number(targets.get(gid)):
                    extra["host_balloon_target_pages"] = targets[gid]
                seen[(int(gid), tick)] = extra
        for gid, events in sorted(v.guests.items()):
            for e in _metric_rows(events):
                tick = e.get("tick")
                row: dict[str, Any] = {"variant": v.name, "guest": gid, "tick": tick,
                                       "t_s": (tick + 1) * tick_us / 1e6 if _is_number(tick) else None,
                                       "vt_us": e.get("vt_us")}
                row.update({k: x for k, x in e.items() if k not in _CONTEXT and k not in row and k != "guest"
                            and (_is_number(x) or isinstance(x, bool))})
                row.update(seen.get((gid, tick), {}))
                rows.append(row)
    return _frame(rows, ["variant", "guest", "tick", "t_s", "vt_us"])


def event_table(logs: Sequence[VariantLogs]) -> pd.DataFrame:
    rows = []
    first = ["variant", "proc", "guest", "tick", "vt_us", "event", "level", "timestamp"]
    for v in logs:
        for gid, events in [(None, v.host), *sorted(v.guests.items())]:
            for e in events:
                if e.get("event") == ev.TICK_COMPLETED:
                    continue
                row = {"variant": v.name, "proc": e.get("proc", "host" if gid is None else "guest"),
                       "guest": e.get("guest", gid)}
                row.update({k: x for k, x in e.items() if k not in ("variant", "proc", "guest", "run_id", "logger")})
                rows.append(row)
    return _ints(_frame(rows, first), ("guest", "tick"))


def decision_table(logs: Sequence[VariantLogs]) -> pd.DataFrame:
    rows = []
    for v in logs:
        for e in v.host:
            if e.get("event") != ev.BALLOON_DECISION:
                continue
            row = {"variant": v.name, "guest": e.get("guest"), "tick": e.get("tick"), "vt_us": e.get("vt_us")}
            for k in ("decision", "code", "reason", "target_pages", "previous_pages", "actual_pages", "policy"):
                row[k] = e.get(k)
            for k, x in (e.get("inputs") or {}).items():
                row[f"in_{k}"] = x
            rows.append(row)
    return _frame(rows, ["variant", "guest", "tick", "vt_us", "decision", "code", "reason", "target_pages",
                         "previous_pages", "actual_pages", "policy"])


def _ints(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """Integer columns with gaps (a host event has no guest) as nullable integers, not floats."""
    for col in cols:
        try:
            df[col] = df[col].astype("Int64")
        except (TypeError, ValueError):
            pass   # a malformed value in some log: leave the column as it is
    return df


def _frame(rows: list[dict[str, Any]], first: list[str]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows)
    for col in first:
        if col not in df.columns:
            df[col] = pd.Series(dtype="object")
    return df[first + [c for c in df.columns if c not in first]]


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Nested values (dicts, lists) as JSON text, and mixed object columns as text: what files can hold."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype != object:
            continue
        values = out[col]
        if values.map(lambda x: isinstance(x, (dict, list, tuple))).any():
            out[col] = values.map(lambda x: None if x is None or (isinstance(x, float) and x != x)
                                  else json.dumps(x) if isinstance(x, (dict, list, tuple)) else str(x))
        else:
            kinds = {type(x) for x in values if x is not None and not (isinstance(x, float) and x != x)}
            if len(kinds) > 1 or (kinds and not kinds <= {str}):
                out[col] = values.map(lambda x: None if x is None or (isinstance(x, float) and x != x) else str(x))
    return out


def export_tables(run_dir: Path, out_dir: Path, fmt: str, tables: Tables | None = None) -> list[Path]:
    """Write ``guests``, ``host``, ``events`` and ``decisions`` as ``.csv`` or ``.parquet`` into ``out_dir``."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    tables = tables or load_tables(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TABLE_NAMES:
        df = _flat(getattr(tables, name))
        path = out_dir / f"{name}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False)
        written.append(path)
    return written
