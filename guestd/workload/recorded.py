"""Recorded traces of real programs that ship with balloonlab (package data), and reading a trace spec's source.

``traces/NAME.npz`` beside this module: small lackey recordings
(``balloonlab-trace record``), each with its command, window and page size
in its metadata, so that a scenario can run a real program's references
(``{ kind = "trace", program = "sqlite3", region = "heap" }``) on a machine
without valgrind. ``balloonlab-trace list`` shows them with their sizes.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np

from ..errors import GuestConfigError
from .trace import read_trace

__all__ = ["SHIPPED_DIR", "shipped_traces", "shipped_trace_path", "trace_of"]

SHIPPED_DIR = Path(str(importlib.resources.files(__package__))) / "traces"


def shipped_traces() -> dict[str, Path]:
    """Name -> file of every shipped recording."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.npz"))}


def shipped_trace_path(name: str) -> Path:
    known = shipped_traces()
    if name not in known:
        from balloonlab.proto.schema import unknown_name
        raise GuestConfigError(f"program: {unknown_name('shipped trace', name, known)}")
    return known[name]


def trace_of(path: str | None, program: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(pages, writes) of a trace spec: its file, or the shipped recording of ``program``."""
    if program is not None:
        return read_trace(shipped_trace_path(program))
    if path is None:
        raise GuestConfigError("give path (a trace file) or program (a shipped recording)")
    return read_trace(path)
