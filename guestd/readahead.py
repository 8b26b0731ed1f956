"""Readahead of sequential file reads: Linux's on-demand readahead window (mm/readahead.c).

One ``RaState`` per file region plays Linux's ``struct file_ra_state``
(``start``, ``size``, ``async_size``, the previous miss). The kernel
(``GuestKernel._disk_read``) asks ``on_sync_miss`` what to read when a
file page must come from disk, and ``on_marker`` when the page carrying
the asynchronous readahead mark (``PG_readahead``) has been used.

The rules, as in ``ondemand_readahead`` with one page per request (a page
fault reads one page):

- a miss at the start of the file, or right after the previous miss: a new
  window of ``get_init_ra_size(1, max)`` pages (4 for ``max`` = 32) at the
  missed page, of which all but the first are asynchronous (the mark sits on
  the first page after the missed one);
- a miss at the page just past the current window (the stream outran it):
  the window moves on and grows (``get_next_ra_size``: x4 while below
  max/16, x2 up to max/2, then max), all of it asynchronous;
- when a window is all asynchronous and starts at the miss, the next one is
  merged into the same read (Linux's "hit the marker made by itself");
- the marked page used: the next window (moved on, grown) is read without
  the vCPU waiting, marked on its first page;
- anything else is a random read: the one page, and the state untouched
  but for the previous miss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .workload.layout import Layout

__all__ = ["RaState", "Readahead", "init_ra_size", "next_ra_size"]


def init_ra_size(req_pages: int, max_pages: int) -> int:
    """``get_init_ra_size``: the first window for a request of ``req_pages``."""
    size = 1 << max(0, int(req_pages) - 1).bit_length()      # roundup_pow_of_two
    if size <= max_pages // 32:
        return size * 4
    if size <= max_pages // 4:
        return size * 2
    return max_pages


def next_ra_size(cur_pages: int, max_pages: int) -> int:
    """``get_next_ra_size``: how the window grows while the stream stays sequential."""
    if cur_pages < max_pages // 16:
        return 4 * cur_pages
    if cur_pages <= max_pages // 2:
        return 2 * cur_pages
    return max_pages


@dataclass
class RaState:
    """``struct file_ra_state`` of one file, in page offsets within the file."""

    start: int = 0
    size: int = 0
    async_size: int = 0
    prev: int = -2          # the previous miss (-2: none, so no first miss looks sequential)


class Readahead:
    """The readahead state of every file region of a layout; windows in virtual page numbers."""

    def __init__(self, layout: Layout, max_pages: int) -> None:
        self.max_pages = int(max_pages)
        n = layout.n_vpages
        self.region_of = np.full(n, -1, np.int64)      # file region index per vpage; -1: anonymous
        self.lo: list[int] = []
        self.hi: list[int] = []
        for r in layout.regions:
            if r.kind != "file":
                continue
            s, p = layout.span(r.name)
            self.region_of[s:s + p] = len(self.lo)
            self.lo.append(s)
            self.hi.append(s + p)
        self.state = [RaState() for _ in self.lo]
        self.marker = np.full(len(self.lo), -1, np.int64)   # the vpage carrying PG_readahead, per file

    def _window(self, r: int) -> tuple[int, int, int]:
        """The current window of file ``r`` clipped to the file: (first vpage, pages, marked vpage or -1)."""
        ra, lo, hi = self.state[r], self.lo[r], self.hi[r]
        first = lo + ra.start
        n = max(0, min(ra.size, hi - first))
        mark = first + ra.size - ra.async_size if ra.async_size > 0 else -1
        if not first <= mark < first + n:
            mark = -1
        self.marker[r] = mark
        return first, n, mark

    def on_sync_miss(self, page: int) -> tuple[int, int, int]:
        """A file page must be read: the window to read (first vpage, pages, marked vpage or -1)."""
        r = int(self.region_of[page])
        ra = self.state[r]
        mx = self.max_pages
        index = page - self.lo[r]
        if index != 0 and ra.size and index == ra.start + ra.size:
            ra.start = index                       # the stream outran the window: move it on and grow it
            ra.size = next_ra_size(ra.size, mx)
            ra.async_size = ra.size
        elif index == 0 or index - ra.prev == 1 or index == ra.prev:
            ra.start = index                       # a new sequential stream
            ra.size = init_ra_size(1, mx)
            ra.async_size = ra.size - 1 if ra.size > 1 else ra.size
        else:
            ra.prev = index                        # a random read: the page alone, the window kept
            self.marker[r] = -1
            return page, 1, -1
        if ra.size == ra.async_size:               # the read would hit its own marker: merge the next window
            add = next_ra_size(ra.size, mx)
            if ra.size + add <= mx:
                ra.async_size = add
                ra.size += add
            else:
                ra.size = mx
                ra.async_size = mx >> 1
        ra.prev = index
        return self._window(r)

    def on_marker(self, r: int) -> tuple[int, int, int]:
        """The marked page of file ``r`` was used: the next window, read asynchronously."""
        ra = self.state[r]
        ra.start += ra.size
        ra.size = next_ra_size(ra.size, self.max_pages)
        ra.async_size = ra.size
        return self._window(r)
