"""Rewrite this process's command line as ``/proc/PID/cmdline`` shows it (what setproctitle does).

A guest forked from the fork server would otherwise show the server's
command line; tools and tests that find a run's guests by theirs
(``python -m balloonlab.guestd ... --guest-id N``) must still find them.
The kernel reads the command line from the argument area at the top of the
stack and, once its last byte is not NUL, on into the environment area up
to the first NUL: so the room is both areas, and the title is one
space-separated string.

Call ``set_cmdline`` only after ``os.environ`` has been replaced (cleared
and refilled): libc's ``environ`` then points at heap copies, not at the
strings this overwrites.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

__all__ = ["set_cmdline", "cmdline_room"]


def _areas() -> tuple[int, int, int, int]:
    # Fields 48-51 of /proc/self/stat (1-based): arg_start arg_end env_start env_end. The
    # command name (field 2) may hold spaces or parentheses: count from its closing one.
    after_comm = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    arg_start, arg_end, env_start, env_end = (int(x) for x in after_comm[45:49])
    return arg_start, arg_end, env_start, env_end


def cmdline_room() -> int:
    """How many bytes a title may take here (the argument and environment areas, less the final NUL)."""
    arg_start, arg_end, env_start, env_end = _areas()
    end = env_end if env_start == arg_end else arg_end
    return end - arg_start - 1


def set_cmdline(argv: list[str]) -> str:
    """Show ``argv`` (space-joined, cut to the room there is) as this process's command line; returns what was written."""
    arg_start, arg_end, env_start, env_end = _areas()
    end = env_end if env_start == arg_end else arg_end
    title = " ".join(argv).encode(errors="replace")[:end - arg_start - 1]
    # Pad with spaces up to arg_end so that the byte there is not NUL (the kernel then reads on
    # to the first NUL), then NUL-fill the rest so nothing of the old environment shows.
    body = title.ljust(arg_end - arg_start, b" ") if len(title) < arg_end - arg_start else title
    buf = body + b"\0" * (end - arg_start - len(body))
    ctypes.memmove(arg_start, buf, len(buf))
    return title.decode(errors="replace")
