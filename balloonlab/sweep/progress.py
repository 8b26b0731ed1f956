"""The sweep's progress bar: cells done of all, failures, elapsed time and an ETA.

One rewritten line on a terminal; on anything else a plain line per
finished cell. The ETA is the wall time per cell finished so far in this
session (cells run side by side, so it already counts the parallelism)
times the cells left.
"""
from __future__ import annotations

import sys
import time
from typing import IO

__all__ = ["SweepProgress", "format_s"]

_WIDTH = 24


def format_s(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class SweepProgress:
    def __init__(self, total: int, resumed: int, out: IO[str] | None = sys.stderr) -> None:
        self.total = total
        self.resumed = resumed
        self.done = 0          # finished in this session, ok or failed for good
        self.failed = 0
        self.retrying = 0
        self.out = out
        self.tty = out is not None and out.isatty()
        self.t0 = time.monotonic()

    def eta_s(self) -> float | None:
        left = self.total - self.resumed - self.done
        if self.done == 0:
            return None
        return (time.monotonic() - self.t0) / self.done * left

    def line(self) -> str:
        finished = self.resumed + self.done
        filled = int(_WIDTH * finished / self.total) if self.total else _WIDTH
        eta = self.eta_s()
        parts = [f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {finished}/{self.total} cells"]
        extra = [f"{self.resumed} resumed"] if self.resumed else []
        extra += [f"{self.failed} failed"] if self.failed else []
        extra += [f"{self.retrying} retrying"] if self.retrying else []
        if extra:
            parts.append(f"({', '.join(extra)})")
        parts.append(f"elapsed {format_s(time.monotonic() - self.t0)}")
        parts.append("ETA " + ("?" if eta is None else format_s(eta)))
        return "  ".join(parts)

    def show(self, note: str | None = None) -> None:
        """Redraw the bar (a terminal) or print it (otherwise); ``note`` goes on a line of its own above."""
        if self.out is None:
            return
        if self.tty:
            self.out.write("\r\x1b[2K")
            if note:
                self.out.write(note + "\n")
            self.out.write(self.line())
        else:
            if note:
                self.out.write(note + "\n")
            self.out.write(self.line() + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.out is not None and self.tty:
            self.out.write("\n")
            self.out.flush()
