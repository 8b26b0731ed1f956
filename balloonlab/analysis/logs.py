"""Reading a run directory's JSON-lines logs: streaming, fast, tolerant of damage.

Each process's log is read once, line by line, never whole into memory.

- Malformed lines (a process killed mid-write leaves a truncated last line;
  anything else that is not a JSON object with an ``event``) are skipped and
  counted per file, never fatal; ``load_variant`` warns with the count.
- Per-tick metric lines (``tick_completed``) are most of a log. Every other
  line is parsed in full. Metric lines are kept in full up to
  ``2 * max_tick_samples`` per process (every run shorter than ~200 virtual
  seconds at the default cadence); beyond that an evenly spaced sample is
  kept (the stride doubles whenever the sample fills up), always with the
  last one, because a plot cannot show more points than that and the
  summary reads only the last. The unparsed ones are still checked for
  shape (an object whose braces balance) so that damage is counted.
  ``LogFile.tick_stride`` says which stride was used; 1 means every line.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from balloonlab.proto import events as ev

__all__ = ["VariantLogs", "LogFile", "find_variants", "load_variant", "read_log", "iter_events",
           "MAX_TICK_SAMPLES", "series", "guest_series", "host_series", "event_vt_us"]

MAX_TICK_SAMPLES = 1024
"""Metric lines kept per process are between this and twice this (or all of them)."""

_GUEST_RE = re.compile(r"guest-(\d+)\.jsonl$")
# structlog's JSONRenderer writes json.dumps' default separators. A line this
# marker misses (another renderer) is simply parsed in full: slower, not wrong.
_TICK_MARK = b'"event": "' + ev.TICK_COMPLETED.encode() + b'"'
_TAIL_BYTES = 512


@dataclass
class LogFile:
    """One process's log as read: its events in file order and what was skipped."""

    path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0          # malformed or truncated lines skipped
    tick_lines: int = 0         # well-formed tick_completed lines seen (kept or not)
    tick_stride: int = 1        # 1: every tick_completed line kept; k: one in k (and the last)


@dataclass
class VariantLogs:
    name: str
    path: Path
    host: list[dict[str, Any]] = field(default_factory=list)
    guests: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    bad_lines: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    bad_by_file: dict[str, int] = field(default_factory=dict)   # file name -> malformed lines skipped
    tick_stride: int = 1        # the largest stride used over this variant's files


def find_variants(run_dir: Path) -> list[tuple[str, Path]]:
    """A run directory holds one variant's logs itself or one subdirectory per variant."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir}: no such directory")
    if (run_dir / "host.jsonl").exists():
        return [(_variant_name(run_dir), run_dir)]
    subs = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / "host.jsonl").exists())
    if not subs:
        raise FileNotFoundError(f"run directory {run_dir}: no host.jsonl in it or in its subdirectories")
    return [(p.name, p) for p in subs]


def _variant_name(path: Path) -> str:
    cfg = path / "host-config.json"
    if cfg.exists():
        try:
            return str(json.loads(cfg.read_text()).get("variant", "default"))
        except ValueError:
            pass
    return "default"


def _whole_object(line: bytes, tail: bytes, at: int) -> bool:
    """Cheap shape check of a metric line that is not parsed.

    ``tail`` is the end of ``line`` and holds the event marker at ``at``. A
    line cut short (a process killed mid-write) either lost the marker or
    lost its closing brace: from the marker on, a whole line closes exactly
    one brace more than it opens.
    """
    return (line[:1] == b"{" and (line.endswith(b"}\n") or line.endswith(b"}"))
            and tail.count(b"}", at) == tail.count(b"{", at) + 1)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return None
    return obj if isinstance(obj, dict) and "event" in obj else None


def read_log(path: Path, max_tick_samples: int = MAX_TICK_SAMPLES) -> LogFile:
    """Read one process's log; see the module docstring for what is kept."""
    if max_tick_samples < 1:
        raise ValueError(f"max_tick_samples must be >= 1, got {max_tick_samples}")
    out = LogFile(Path(path))
    others: list[tuple[int, dict[str, Any]]] = []   # (line number, event), every non-tick line
    ticks: list[tuple[int, bytes]] = []             # (line number, raw line), the kept sample
    last_tick: tuple[int, bytes] | None = None
    stride = 1
    n_ticks = 0
    bad = 0
    limit = 2 * max_tick_samples
    mark = _TICK_MARK
    # A large buffer: host lines are tens of KiB with many guests, and the
    # default 8 KiB buffer makes reading them several times slower.
    with open(path, "rb", buffering=1 << 20) as f:
        for no, line in enumerate(f):
            # The event name comes after the payload, near the end of the line.
            tail = line[-_TAIL_BYTES:]
            at = tail.find(mark)
            if at < 0 and mark in line:  # a long context after it: look at the whole line
                tail, at = line, line.find(mark)
            if at >= 0:
                if not _whole_object(line, tail, at):
                    bad += 1
                    continue
                if n_ticks % stride == 0:
                    ticks.append((no, line))
                    if len(ticks) >= limit:
                        del ticks[1::2]  # keep every other one: the sample stays evenly spaced
                        stride *= 2
                last_tick = (no, line)
                n_ticks += 1
                continue
            if line.isspace():
                continue
            obj = _parse(line)
            if obj is None:
                bad += 1
            else:
                others.append((no, obj))
    if last_tick is not None and (not ticks or ticks[-1][0] != last_tick[0]):
        ticks.append(last_tick)
    parsed: list[tuple[int, dict[str, Any]]] = []
    for no, raw in ticks:
        obj = _parse(raw)
        if obj is None:
            bad += 1
        else:
            parsed.append((no, obj))
    # Both lists are in line order: merge them back into file order.
    merged: list[dict[str, Any]] = []
    i = j = 0
    while i < len(others) and j < len(parsed):
        if others[i][0] < parsed[j][0]:
            merged.append(others[i][1])
            i += 1
        else:
            merged.append(parsed[j][1])
            j += 1
    merged.extend(e for _, e in others[i:])
    merged.extend(e for _, e in parsed[j:])
    out.events = merged
    out.bad_lines = bad
    out.tick_lines = n_ticks
    out.tick_stride = stride
    return out


def iter_events(path: Path, bad: list[int]) -> Iterator[dict[str, Any]]:
    """Yield every JSON object line of ``path`` (all parsed); count the others in ``bad[0]``."""
    with open(path, "rb") as f:
        for line in f:
            if line.isspace():
                continue
            obj = _parse(line)
            if obj is None:
                bad[0] += 1
            else:
                yield obj


def load_variant(name: str, path: Path, *, warn: bool = True,
                 max_tick_samples: int = MAX_TICK_SAMPLES) -> VariantLogs:
    """Read the host's and every guest's log of one variant."""
    path = Path(path)
    v = VariantLogs(name, path)
    files: list[tuple[int | None, Path]] = [(None, path / "host.jsonl")]
    for p in sorted(path.glob("guest-*.jsonl"), key=lambda p: (len(p.name), p.name)):
        m = _GUEST_RE.search(p.name)
        if m:
            files.append((int(m.group(1)), p))
    for gid, p in files:
        lf = read_log(p, max_tick_samples)
        if gid is None:
            v.host = lf.events
        else:
            v.guests[gid] = lf.events
        if lf.bad_lines:
            v.bad_by_file[p.name] = lf.bad_lines
        v.tick_stride = max(v.tick_stride, lf.tick_stride)
    v.bad_lines = sum(v.bad_by_file.values())
    if warn and v.bad_lines:
        detail = ", ".join(f"{k}: {n}" for k, n in v.bad_by_file.items())
        print(f"analyze: warning: {path}: skipped {v.bad_lines} malformed log line(s) ({detail})", file=sys.stderr)
    cfg = path / "host-config.json"
    if cfg.exists():
        try:
            v.config = json.loads(cfg.read_text())
        except ValueError:
            pass
    return v


# --- time series ------------------------------------------------------------------


def event_vt_us(e: dict[str, Any], tick_us: float) -> float | None:
    """When an event happened in virtual time: its ``vt_us``, else the start of its ``tick``."""
    vt = e.get("vt_us")
    if isinstance(vt, (int, float)) and not isinstance(vt, bool):
        return float(vt)
    tick = e.get("tick")
    if isinstance(tick, int) and not isinstance(tick, bool):
        return float(tick) * tick_us
    return None


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else np.nan


def series(events: Iterable[dict[str, Any]], keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Float arrays of ``keys`` over the given events (NaN where an event lacks a key)."""
    evs = list(events)
    return {k: np.fromiter((_num(e.get(k)) for e in evs), float, len(evs)) for k in keys}


def _ticks(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == ev.TICK_COMPLETED]


def guest_series(events: Iterable[dict[str, Any]], tick_us: float, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """A guest's metrics over virtual time.

    ``t_s`` is the end of the logged tick in virtual seconds (the same clock
    as the host's, so guests line up); ``vt_us`` is the guest's own clock,
    which the rates use.
    """
    ticks = _ticks(events)
    out = series(ticks, ["tick", "vt_us", *keys])
    out["t_s"] = (out["tick"] + 1) * tick_us / 1e6
    return out


def host_series(events: Iterable[dict[str, Any]], keys: Iterable[str], guest_keys: Iterable[str] = (),
                ) -> tuple[dict[str, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    """The host's metrics over virtual time, and per guest its ``guests[id]`` fields and balloon target.

    Returns ``(host, per_guest)``; ``host["t_s"]`` is virtual seconds.
    """
    ticks = _ticks(events)
    host = series(ticks, ["tick", "vt_us", *keys])
    host["t_s"] = host["vt_us"] / 1e6
    gids: set[int] = set()
    for e in ticks:
        for k in (e.get("guests") or {}):
            if str(k).isdigit():
                gids.add(int(k))
        for k in (e.get("balloon_targets") or {}):
            if str(k).isdigit():
                gids.add(int(k))
    gkeys = list(guest_keys)
    per_guest: dict[int, dict[str, np.ndarray]] = {}
    for gid in sorted(gids):
        s = str(gid)
        rows = [(e.get("guests") or {}).get(s) or {} for e in ticks]
        g = series(rows, gkeys)
        g["balloon_target_pages"] = np.fromiter(
            (_num((e.get("balloon_targets") or {}).get(s)) for e in ticks), float, len(ticks))
        per_guest[gid] = g
    return host, per_guest
