"""Errors of the host: one base, specific leaves, each with its wire code.

A session turns any ``HostdError`` into an error reply with ``err.code``
and ``str(err)``; the message names the offending value. Leaves subclass the
nearest builtin so callers that only know Python still catch them sensibly.
"""
from __future__ import annotations

from balloonlab.proto.errors import ConfigError, ErrorCode

__all__ = [
    "HostdError", "UnknownGuest", "DuplicateGuest", "OutOfRange", "NotOwner",
    "InvalidState", "ContentMapTaken", "DuplicatePages", "BadBatch", "BalloonLimit",
    "HostOutOfMemory", "InvariantViolation", "PolicyConfigError",
]


class HostdError(Exception):
    """Base of every error raised by ``hostd``."""

    code: ErrorCode = ErrorCode.INTERNAL


class UnknownGuest(HostdError, KeyError):
    code = ErrorCode.UNKNOWN_GUEST

    def __init__(self, guest_id: int) -> None:
        super().__init__(f"guest {guest_id} is not known to host memory")
        self.guest_id = guest_id

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateGuest(HostdError, ValueError):
    code = ErrorCode.DUPLICATE_GUEST

    def __init__(self, guest_id: int) -> None:
        super().__init__(f"guest {guest_id} is already known to host memory")
        self.guest_id = guest_id


class OutOfRange(HostdError, IndexError):
    """A gpfn or block number outside the guest's range."""

    code = ErrorCode.OUT_OF_RANGE

    def __init__(self, guest_id: int, what: str, value: int, limit: int) -> None:
        super().__init__(f"guest {guest_id}: {what} {value} out of range [0, {limit})")
        self.guest_id = guest_id
        self.what = what
        self.value = value
        self.limit = limit


class NotOwner(HostdError, PermissionError):
    """A page or block that belongs to another guest."""

    code = ErrorCode.NOT_OWNER

    def __init__(self, guest_id: int, what: str, value: int) -> None:
        super().__init__(f"guest {guest_id}: {what} {value} is not this guest's")
        self.guest_id = guest_id
        self.what = what
        self.value = value


class InvalidState(HostdError, ValueError):
    """The page is in the wrong state for the request (e.g. deflating a page never inflated)."""

    code = ErrorCode.INVALID_STATE

    def __init__(self, guest_id: int, what: str, value: int, state: str, wanted: str) -> None:
        super().__init__(f"guest {guest_id}: {what} {value} is {state}; {wanted}")
        self.guest_id = guest_id
        self.what = what
        self.value = value
        self.state = state


class DuplicatePages(HostdError, ValueError):
    """A batch names the same gpfn or block twice where that is ambiguous."""

    code = ErrorCode.BAD_FIELD

    def __init__(self, guest_id: int, what: str, value: int) -> None:
        super().__init__(f"guest {guest_id}: {what} {value} appears twice in one batch")
        self.guest_id = guest_id
        self.what = what
        self.value = value


class ContentMapTaken(InvalidState):
    """A guest reports its content map once: shared frames were merged under the one it sent."""

    def __init__(self, guest_id: int) -> None:
        HostdError.__init__(self, f"guest {guest_id}: the content map was taken already; a guest reports it "
                                  "once, right after Welcome")
        self.guest_id = guest_id
        self.what = "content map"
        self.value = 0
        self.state = "taken"


class BadBatch(HostdError, ValueError):
    """A batch is malformed: wrong length, wrong shape (e.g. tokens vs blocks)."""

    code = ErrorCode.BAD_FIELD


class BalloonLimit(HostdError, ValueError):
    """Inflating would exceed the guest's maximum balloon size."""

    code = ErrorCode.INVALID_STATE

    def __init__(self, guest_id: int, balloon_pages: int, adding_pages: int, max_pages: int) -> None:
        super().__init__(
            f"guest {guest_id}: balloon of {balloon_pages} pages + {adding_pages} would exceed "
            f"the maximum of {max_pages} pages")
        self.guest_id = guest_id
        self.balloon_pages = balloon_pages
        self.adding_pages = adding_pages
        self.max_pages = max_pages


class HostOutOfMemory(HostdError, MemoryError):
    """No frame can be freed: everything left is pinned, in I/O, or host swap is full."""

    code = ErrorCode.OVERLOADED

    def __init__(self, needed_frames: int, free_frames: int, reason: str) -> None:
        super().__init__(f"need {needed_frames} free frames, have {free_frames}: {reason}")
        self.needed_frames = needed_frames
        self.free_frames = free_frames
        self.reason = reason


class InvariantViolation(HostdError, AssertionError):
    """Host memory bookkeeping is inconsistent: a bug, never the guest's fault."""

    code = ErrorCode.INTERNAL


class PolicyConfigError(HostdError, ConfigError):
    """A victim or balloon policy name or parameter is wrong; the message names it."""

    code = ErrorCode.BAD_FIELD
