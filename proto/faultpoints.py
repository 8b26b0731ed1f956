"""Fault points: a process stops itself (SIGSTOP) at a named moment, for a test to kill it.

``BALLOONLAB_PAUSE_AT`` is a comma-separated list of ``WHO:POINT[@N]``; WHO
is ``host`` or a guest id, N the occurrence (default 1). Before stopping,
the process logs ``fault_point_reached`` and flushes its log, so a test can
wait for the line (or for the process state ``T``) and then send SIGKILL (a
crash at exactly that moment) or SIGCONT (a freeze). Unset, every
``reached`` call is a dictionary lookup. Both sides use it, so it lives here.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable, Mapping

import structlog

from . import events as ev

__all__ = ["PAUSE_ENV", "PausePoints", "flush_log"]

PAUSE_ENV = "BALLOONLAB_PAUSE_AT"

log = structlog.get_logger("proto.faultpoints")


class PausePoints:
    def __init__(self, spec: str, who: str) -> None:
        self.wanted: dict[str, set[int]] = {}
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            target, _, rest = item.partition(":")
            point, _, nth = rest.partition("@")
            if target.strip() != who or not point:
                continue
            try:
                n = int(nth) if nth else 1
            except ValueError:
                raise ValueError(f"{PAUSE_ENV}: {item!r}: occurrence {nth!r} is not a number") from None
            self.wanted.setdefault(point.strip(), set()).add(n)
        self.seen: dict[str, int] = {}
        # Extra fields for the log line, computed when a point is reached (e.g. whether a lock is held).
        self.context: Callable[[], dict[str, Any]] | None = None

    @classmethod
    def from_env(cls, who: str | int, environ: Mapping[str, str] | None = None) -> "PausePoints":
        return cls((os.environ if environ is None else environ).get(PAUSE_ENV, ""), str(who))

    def __bool__(self) -> bool:
        return bool(self.wanted)

    def reached(self, point: str, **fields: Any) -> bool:
        """Count one occurrence of ``point``; stop the process if it is a wanted one. True if it stopped."""
        if point not in self.wanted:
            return False
        n = self.seen.get(point, 0) + 1
        self.seen[point] = n
        if n not in self.wanted[point]:
            return False
        if self.context is not None:
            fields.update(self.context())
        log.warning(ev.FAULT_POINT_REACHED, point=point, occurrence=n, pid=os.getpid(), **fields)
        flush_log()
        os.kill(os.getpid(), signal.SIGSTOP)
        return True


def flush_log() -> None:
    """Push the structured log's buffer to its file (before the process may be killed)."""
    factory = structlog.get_config().get("logger_factory")
    f = getattr(factory, "_file", None)
    if f is not None:
        try:
            f.flush()
        except (OSError, ValueError):
            pass
