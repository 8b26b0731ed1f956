"""What every console script shares: quiet broken pipes.

``balloonlab-analyze RUN --json | head`` closes the pipe after ten lines;
Python would then print a ``BrokenPipeError`` traceback (twice: once more
when it flushes stdout at exit). A closed reader is not an error of ours:
the stream is pointed at /dev/null and the program ends quietly, or, in the
launcher, goes on with its run (the summary and the report are still
written) without writing to that stream again.
"""
from __future__ import annotations

import os
import sys
from typing import IO, Callable, Sequence

__all__ = ["run_cli", "say", "EXIT_BROKEN_PIPE"]

EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, what a shell reports for a reader that went away


def _silence(stream: IO[str]) -> None:
    """From now on ``stream`` writes to /dev/null (its reader is gone)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def say(text: str, stream: IO[str] | None = None, end: str = "\n") -> None:
    """Write a line to ``stream`` (stderr by default); a closed reader silences the stream instead of raising."""
    stream = sys.stderr if stream is None else stream
    try:
        stream.write(text + end)
        stream.flush()
    except BrokenPipeError:
        _silence(stream)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a console script's ``main``; a reader that goes away ends it quietly (exit 141), no traceback."""
    try:
        rc = main(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        _silence(sys.stdout)
        _silence(sys.stderr)
        return EXIT_BROKEN_PIPE
