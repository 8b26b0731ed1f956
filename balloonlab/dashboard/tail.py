"""Follow a JSON-lines file as it grows: complete lines only, damage counted.

A writer appends whole lines, but a reader may catch one half written: the
bytes after the last newline are kept until the rest arrives. A line that is
not a JSON object with an ``event`` is counted in ``bad_lines`` and skipped,
as the analysis does (``balloonlab.analysis.logs``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["LogTail", "MAX_READ_BYTES"]

MAX_READ_BYTES = 8 << 20
"""Bytes read per call at most: a huge log is taken in slices, so a poll never stalls its loop for long."""


class LogTail:
    """One process's log, read from where the last call stopped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0          # bytes consumed (complete lines) so far
        self.partial = b""       # the start of a line whose newline has not been written yet
        self.bad_lines = 0
        self.lines = 0

    def read_new(self, max_bytes: int = MAX_READ_BYTES) -> list[dict[str, Any]]:
        """The events appended since the last call (at most ``max_bytes`` of them); [] when nothing new."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset + len(self.partial):   # truncated or replaced: start over
                    self.offset, self.partial = 0, b""
                f.seek(self.offset + len(self.partial))
                chunk = f.read(max_bytes)
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        data = self.partial + chunk
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        self.offset += cut
        out = []
        for line in data[:cut].splitlines():
            if not line.strip():
                continue
            self.lines += 1
            try:
                obj = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(obj, dict) and "event" in obj:
                out.append(obj)
            else:
                self.bad_lines += 1
        return out

    @property
    def has_more(self) -> bool:
        """Whether the file holds bytes not yet read (a slice limit stopped the last call)."""
        try:
            return self.path.stat().st_size > self.offset + len(self.partial)
        except FileNotFoundError:
            return False
