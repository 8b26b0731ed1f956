"""Make ``/proc/PID/cmdline`` and ``/proc/PID/environ`` show a forked guest's own argv and environment.

A guest forked from the fork server would otherwise show the server's: tools
and tests find a run's guests by their command line (``python -m
balloonlab.guestd ... --guest-id N``) and check what each one's environment
holds (its own credential only). ``prctl(PR_SET_MM, PR_SET_MM_MAP)``
(unprivileged unless the executable link changes) points the kernel's
argument and environment bounds at a private copy made here, so both read
exactly as an exec'd process's do. Where that prctl is missing (a kernel
without CONFIG_CHECKPOINT_RESTORE), the command line is written over the
old argument and environment areas instead, space-joined, as setproctitle
does, and the environment is not shown.
"""
from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

__all__ = ["set_process_image", "shared_libc", "prime"]

_PR_SET_MM = 35
_PR_SET_MM_MAP = 14
_keep: list[mmap.mmap] = []      # the new areas must live as long as the process
_libc: list[ctypes.CDLL] = []     # loaded once: the fork server's, shared by every guest it forks


class _MmMap(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("start_code", "end_code", "start_data", "end_data", "start_brk",
                                              "brk", "start_stack", "arg_start", "arg_end", "env_start", "env_end",
                                              "auxv")] + [("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


def _stat_fields() -> list[str]:
    # After the command name (field 2, which may hold spaces or parentheses): field N is [N - 3].
    return Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()


_layout: list[int] = []   # start_code, end_code, start_stack, start_data, end_data, start_brk (``prime``)


def _image_layout() -> list[int]:
    """The fields of the address space's layout that ``PR_SET_MM_MAP`` wants besides the areas it moves:
    read once (``prime``), since a fork keeps them all (the break, which moves, is read live)."""
    if not _layout:
        f = _stat_fields()
        _layout.extend(int(f[i]) for i in (23, 24, 25, 42, 43, 44))
    return _layout


def prime() -> None:
    """Read the layout now, in a process that forks children which set their image (the fork server):
    each child then finds it here instead of reading /proc (its own, the same after a fork)."""
    _image_layout()


def shared_libc() -> ctypes.CDLL:
    """libc, loaded once (with ``sbrk`` and ``prctl`` looked up): in the fork server before it forks, so
    a guest does not load it again into pages of its own."""
    if not _libc:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.sbrk.restype = ctypes.c_void_p
        libc.prctl.restype = ctypes.c_int
        _libc.append(libc)
    return _libc[0]


def set_process_image(argv: list[str], env: dict[str, str]) -> bool:
    """Show ``argv`` and ``env`` in /proc; True if both are shown exactly, False if only a space-joined title."""
    args = b"".join(a.encode(errors="surrogateescape") + b"\0" for a in argv)
    envb = b"".join(f"{k}={v}".encode(errors="surrogateescape") + b"\0" for k, v in env.items())
    libc = shared_libc()
    start_code, end_code, start_stack, start_data, end_data, start_brk = _image_layout()
    # MAP_PRIVATE: the kernel reads these areas only from anonymous private memory.
    buf = mmap.mmap(-1, max(1, len(args) + len(envb)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[:len(args) + len(envb)] = args + envb
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    mm = _MmMap(start_code=start_code, end_code=end_code, start_stack=start_stack, start_data=start_data,
                end_data=end_data, start_brk=start_brk, brk=libc.sbrk(0) or start_brk,
                arg_start=base, arg_end=base + len(args), env_start=base + len(args),
                env_end=base + len(args) + len(envb), auxv=0, auxv_size=0, exe_fd=0xFFFFFFFF)
    if libc.prctl(_PR_SET_MM, _PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) == 0:
        _keep.append(buf)
        return True
    buf.close()
    _overwrite_title(argv)
    return False


def _overwrite_title(argv: list[str]) -> None:
    # Call only once os.environ was replaced: libc's environ then points at heap copies, not here.
    f = _stat_fields()
    arg_start, arg_end, env_start, env_end = (int(x) for x in f[45:49])
    end = env_end if env_start == arg_end else arg_end
    title = " ".join(argv).encode(errors="replace")[:end - arg_start - 1]
    # The byte at arg_end not NUL: the kernel reads on into the environment area, to the first NUL.
    body = title.ljust(arg_end - arg_start, b" ") if len(title) < arg_end - arg_start else title
    buf = body + b"\0" * (end - arg_start - len(body))
    ctypes.memmove(arg_start, buf, len(buf))
