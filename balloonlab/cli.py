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
from typing import IO, Callable, NoReturn, Sequence

__all__ = ["run_cli", "say", "exit_now", "EXIT_BROKEN_PIPE"]

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


def exit_now(code: int) -> NoReturn:
    """End a command's process with ``code`` once its streams are flushed, without finalizing the interpreter.

    For a process whose work is over (its files written and closed, its
    children reaped): tearing down the heap of everything it imported
    (numpy, the host's and the guest's modules) cost the launcher 35-50 ms
    and the fork server ~15 ms at the end of every run, which the caller
    waits for and nothing reads.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a reader gone (the stream is silenced) or closed: nothing to keep
            pass
    os._exit(int(code) & 0xFF)   # what sys.exit(code) would make of it
