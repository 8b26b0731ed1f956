"""One guest's physical-to-machine map: where each gpfn's content lives.

Every gpfn is in exactly one state: UNBACKED (no content: a fault gives a
zero page), FRAME (``loc`` = host frame), SWAPPED (``loc`` = host swap slot),
BALLOONED (given to the host by the guest's balloon driver; ``loc`` -1),
SHARED (``loc`` = a shared frame other gpfns map too, write-protected in the
guest: ``hostd.sharing``), COMPRESSED (in its VM's compression cache,
``hostd.compress``; ``loc`` -1) or ZERO (it held the zero page when the host
reclaimed it: nothing is stored, a fault maps a fresh zero page; ``loc`` -1).
The last two keep the guest's content token in the compression books, not here.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

from ._books import count_codes
from .errors import BadBatch, DuplicatePages, OutOfRange

__all__ = ["PageState", "P2M", "NO_LOC", "N_STATE_CODES", "VALID_STATE", "as_page_numbers", "one_page_number", "one_token"]

NO_LOC = -1


class PageState(IntEnum):
    UNBACKED = 0
    FRAME = 1
    SWAPPED = 2
    BALLOONED = 3
    SHARED = 4
    COMPRESSED = 5
    ZERO = 6


N_STATE_CODES = max(PageState) + 1
"""Size of a table indexed by state value (the values are not dense)."""
VALID_STATE = np.zeros(256, bool)
VALID_STATE[[int(s) for s in PageState]] = True
# (key, code) per state: an enum member's ``.name`` is a descriptor lookup, too slow for every guest every tick
_COUNT_KEYS = tuple((s.name.lower(), int(s)) for s in PageState)
_FRAME_CODE, _SHARED_CODE = int(PageState.FRAME), int(PageState.SHARED)


def as_page_numbers(values: np.ndarray | bytes | list[int], guest_id: int, what: str,
                    limit: int, *, unique: bool = False) -> np.ndarray:
    """Page numbers as int64, checked against ``[0, limit)``; raises naming the first bad one.

    Accepts the wire form (little-endian u8 bytes) as well as arrays.
    """
    if isinstance(values, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(values, "<u8")
    else:
        arr = np.asarray(values).reshape(-1)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise BadBatch(f"guest {guest_id}: {what} numbers must be integers, got dtype {arr.dtype}")
    # Compare before the cast: a huge uint64 must not wrap into range.
    if arr.dtype.kind == "u":
        bad = arr >= np.uint64(limit)
    else:
        bad = (arr < 0) | (arr >= limit)
    if np.count_nonzero(bad):   # np.any goes through Python wrappers: several times the cost on a request's array
        raise OutOfRange(guest_id, what, int(arr[np.flatnonzero(bad)[0]]), limit)
    out = arr.astype(np.int64, copy=False)
    if unique and out.size > 1:
        srt = out.copy()
        srt.sort()
        dup = srt[1:] == srt[:-1]
        if np.count_nonzero(dup):
            raise DuplicatePages(guest_id, what, int(srt[1:][np.flatnonzero(dup)[0]]))
    return out


def one_page_number(values: np.ndarray | bytes | list[int], guest_id: int, what: str, limit: int) -> int | None:
    """The page number of a batch of exactly one, checked against ``[0, limit)``; None for any other batch.

    The scalar path of ``as_page_numbers`` (same refusal, same message):
    most requests carry one page, and a numpy call costs microseconds on
    an array of one.
    """
    if isinstance(values, np.ndarray):
        if values.size != 1 or values.dtype.kind not in "iu":
            return None
        v = values.item()
    elif isinstance(values, (bytes, bytearray, memoryview)):
        if len(values) != 8:
            return None
        v = int.from_bytes(values, "little")
    else:
        return None
    if not 0 <= v < limit:
        raise OutOfRange(guest_id, what, v, limit)
    return v


def one_token(values: np.ndarray | bytes) -> int | None:
    """The token of a batch of exactly one (as a uint64 value), else None (the array path checks it)."""
    if isinstance(values, np.ndarray):
        if values.size != 1 or values.dtype.kind not in "iu":
            return None
        return values.item() & 0xFFFF_FFFF_FFFF_FFFF
    if isinstance(values, (bytes, bytearray, memoryview)) and len(values) == 8:
        return int.from_bytes(values, "little")
    return None


def unique_pages(pages: np.ndarray) -> np.ndarray:
    """``np.unique`` without its fixed cost for the one-page requests that dominate (a sort of 1 is 10 us)."""
    return pages if pages.size <= 1 else np.unique(pages)


class P2M:
    """Per-gpfn ``state`` (uint8) and ``loc`` (int64) arrays, plus a pin mask."""

    def __init__(self, guest_pages: int) -> None:
        if guest_pages <= 0:
            raise ValueError(f"guest_pages must be > 0, got {guest_pages}")
        self.guest_pages = int(guest_pages)
        self.state = np.zeros(self.guest_pages, np.uint8)
        self.loc = np.full(self.guest_pages, NO_LOC, np.int64)
        # Pinned gpfns keep their host frame pinned, also when faulted in again.
        self.pinned = np.zeros(self.guest_pages, bool)
        # Scalar views for the one-page fault path (a memoryview element is a plain int or bool, 2-3x
        # cheaper than a numpy element); the arrays are never replaced.
        self.state_mv = memoryview(self.state)
        self.loc_mv = memoryview(self.loc)
        self.pinned_mv = memoryview(self.pinned)
        self._codes = np.empty(N_STATE_CODES, np.int64)   # ``resident_pages``'s counts, reused

    def count(self, state: PageState) -> int:
        return int(np.count_nonzero(self.state == state))

    def counts(self) -> dict[str, int]:
        out = np.empty(N_STATE_CODES, np.int64)
        count_codes(self.state, out)     # np.bincount(self.state, minlength=N_STATE_CODES), without its copy
        c = out.tolist()
        return {key: c[code] for key, code in _COUNT_KEYS}

    def resident_pages(self) -> int:
        """Pages backed by a frame, their own or shared: ``counts()``'s ``frame`` + ``shared``."""
        out = self._codes
        count_codes(self.state, out)
        return int(out[_FRAME_CODE]) + int(out[_SHARED_CODE])

    def in_state(self, state: PageState) -> np.ndarray:
        return np.flatnonzero(self.state == state)

    def set(self, gpfns: np.ndarray, state: PageState, loc: np.ndarray | int = NO_LOC) -> None:
        self.state[gpfns] = state
        self.loc[gpfns] = loc
