"""Per-virtual-page state: where each workload page is and what its content should be.

A page is in a frame (``gpfn``), in a free frame that still holds it after
a soft reclaim (``cached``), on disk (``on_disk``: its file block, or its
swap slot once swapped out), or nowhere yet (an anonymous page never
written is the zero page). ``version`` is what the workload last wrote: the
expected content token follows from it, so any frame, slot or block that
disagrees has lost or corrupted the page.
"""
from __future__ import annotations

import numpy as np

from balloonlab.proto.tokens import make_tokens

from .workload.layout import Layout

__all__ = ["PageTable"]


class PageTable:
    def __init__(self, layout: Layout) -> None:
        n = layout.n_vpages
        self.n = n
        self.gpfn = np.full(n, -1, np.int64)         # resident frame, -1 = not resident
        self.cached = np.full(n, -1, np.int64)       # FREE frame still holding the page (soft-reclaimed)
        self.version = np.zeros(n, np.int64)         # writes so far
        self.is_file = layout.is_file.copy()
        self.block = layout.file_block.copy()        # file block, or swap block once assigned; -1 = none
        self.on_disk = layout.is_file.copy()         # the block holds the page (files: from the start)
        self.evicted = np.zeros(n, bool)             # evicted at least once (a later fault is a refault)
        # the token each page must carry: version 0 of a file page is the file's
        # initial content; an anonymous page never written is the zero page (0)
        self.expect = np.where(self.is_file, make_tokens(np.arange(n), np.zeros(n, np.int64)),
                               np.uint64(0)).astype(np.uint64)

    def expected_tokens(self, pages: np.ndarray) -> np.ndarray:
        """The token each page must carry now: page id + version; a never-written anonymous page is 0."""
        return self.expect[pages]

    def expected_token(self, page: int) -> int:
        return int(self.expect[page])

    def initial_token(self, page: int) -> int:
        """Version 0 of the page: what a never-written file block holds."""
        return (page + 1) << 32

    def bump(self, pages: np.ndarray) -> np.ndarray:
        """Count one write per entry (a page may repeat); returns the new tokens, one per entry."""
        np.add.at(self.version, pages, 1)
        tok = make_tokens(pages, self.version[pages])
        self.expect[pages] = tok
        return tok

    def bump_one(self, page: int) -> int:
        v = int(self.version[page]) + 1
        self.version[page] = v
        tok = ((page + 1) << 32) | (v & 0xFFFF_FFFF)
        self.expect[page] = tok
        return tok
