"""structlog set-up shared by every process: JSON lines, one file per process."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO, Any

import structlog

__all__ = ["configure_logging", "bind", "unbind"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(path: Path | None, proc: str, level: str = "info", **context: Any) -> IO[str]:
    """Configure structlog once per process; return the open log file.

    ``proc`` and ``context`` are bound as context variables, so every task
    created afterwards inherits them.
    """
    if level not in _LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {sorted(_LEVELS)}")
    out: IO[str] = open(path, "a", buffering=1 << 16) if path is not None else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(proc=proc, **context)
    return out


def bind(**values: Any) -> None:
    structlog.contextvars.bind_contextvars(**values)


def unbind(*names: str) -> None:
    structlog.contextvars.unbind_contextvars(*names)
