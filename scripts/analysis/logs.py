"""Reading a run directory's JSON-lines logs, tolerating damage.

A process killed mid-write leaves a truncated last line; those and any
other malformed lines are skipped and counted, never fatal.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = ["VariantLogs", "find_variants", "load_variant", "iter_events"]

_GUEST_RE = re.compile(r"guest-(\d+)\.jsonl$")


@dataclass
class VariantLogs:
    name: str
    path: Path
    host: list[dict[str, Any]] = field(default_factory=list)
    guests: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    bad_lines: int = 0
    config: dict[str, Any] = field(default_factory=dict)


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


def iter_events(path: Path, bad: list[int]) -> Iterator[dict[str, Any]]:
    """Yield each JSON object line of ``path``; count the others in ``bad[0]``."""
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                bad[0] += 1
                continue
            if isinstance(obj, dict) and "event" in obj:
                yield obj
            else:
                bad[0] += 1


def load_variant(name: str, path: Path) -> VariantLogs:
    v = VariantLogs(name, path)
    bad = [0]
    v.host = list(iter_events(path / "host.jsonl", bad))
    for p in sorted(path.glob("guest-*.jsonl")):
        m = _GUEST_RE.search(p.name)
        if m:
            v.guests[int(m.group(1))] = list(iter_events(p, bad))
    v.bad_lines = bad[0]
    if v.bad_lines:
        print(f"analyze: {path}: skipped {v.bad_lines} malformed log line(s)", file=sys.stderr)
    cfg = path / "host-config.json"
    if cfg.exists():
        try:
            v.config = json.loads(cfg.read_text())
        except ValueError:
            pass
    return v
