"""Errors of the guest: one base, specific leaves that name the bad value.

Each leaf subclasses the nearest builtin too, so a caller that only knows
Python (``except ValueError``) still catches it sensibly.
"""
from __future__ import annotations

from typing import Iterable

__all__ = [
    "GuestdError", "GuestConfigError", "UnknownPolicy", "UnknownWorkload",
    "PolicyNeedsTrace", "TraceFormatError", "BadPages", "BadFrames",
    "OutOfMemory", "SwapExhausted", "BlockOutOfRange", "ReadChainDiverged",
]


class GuestdError(Exception):
    """Base of every error raised by ``guestd``."""


class GuestConfigError(GuestdError, ValueError):
    """A paging or workload configuration value is wrong; the message names the key."""


class UnknownPolicy(GuestdError, ValueError):
    def __init__(self, name: object, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        from balloonlab.proto.schema import did_you_mean
        super().__init__(f"unknown replacement policy {name!r}{did_you_mean(name, self.known)}"
                         f"{'' if did_you_mean(name, self.known) else ';'} known: {', '.join(self.known)}")


class UnknownWorkload(GuestdError, ValueError):
    def __init__(self, name: object, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        from balloonlab.proto.schema import did_you_mean
        super().__init__(f"unknown workload kind {name!r}{did_you_mean(name, self.known)}"
                         f"{'' if did_you_mean(name, self.known) else ';'} known: {', '.join(self.known)}")


class PolicyNeedsTrace(GuestdError, ValueError):
    """An offline policy (``opt``) was asked for without the future it needs."""


class TraceFormatError(GuestdError, ValueError):
    """A trace file is malformed; ``path`` and ``line`` (1-based, 0 if not a text line) say where."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")


class BadPages(GuestdError, ValueError):
    """A batch of virtual page numbers is malformed or outside the layout."""


class BadFrames(GuestdError, ValueError):
    """gpfns outside guest memory, or in the wrong state for the call (e.g. releasing a non-balloon frame)."""


class OutOfMemory(GuestdError, MemoryError):
    """No frame can be freed: every frame is kernel or balloon memory, even after the OOM hook ran."""

    def __init__(self, n_needed: int, ram_pages: int, kernel_pages: int, balloon_pages: int) -> None:
        self.n_needed = n_needed
        super().__init__(
            f"out of memory: need {n_needed} frame(s) but none is reclaimable "
            f"(ram_pages={ram_pages}, kernel_pages={kernel_pages}, balloon_pages={balloon_pages})")


class SwapExhausted(GuestdError, MemoryError):
    def __init__(self, swap_pages: int) -> None:
        self.swap_pages = swap_pages
        super().__init__(f"guest swap is full: all {swap_pages} slots are in use; raise swap_pages")


class BlockOutOfRange(GuestdError, IndexError):
    def __init__(self, block: int, n_blocks: int) -> None:
        self.block = block
        self.n_blocks = n_blocks
        super().__init__(f"block {block} outside the device's {n_blocks} blocks")


class ReadChainDiverged(GuestdError, RuntimeError):
    """The host answered chained reads the paging core then did not ask for, or asked for otherwise.

    The chain is built so that this cannot happen (``hostd/readchain.py``);
    if it does, the host served reads this guest would not have sent, and
    the run stops rather than go on from a state no sequential run reaches.
    """
