"""The guest's block device (its virtual disk): one async interface for swap and file I/O.

Here ``LocalBlockDevice`` keeps the blocks in-process and charges virtual
time with ``proto.costs.DiskModel``; #4 replaces it with the host's virtual
disk over the socket. A block holds the content token of the page last
written to it; a block never written reads as ``0``, which the kernel takes
for the block's initial content (a file page at version 0, or nothing for a
swap slot). One call is one request, whatever the number of blocks.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from balloonlab.proto.costs import DISK_PROFILES, DiskModel, DiskProfile

from .errors import BlockOutOfRange

__all__ = ["BlockDevice", "LocalBlockDevice"]


@runtime_checkable
class BlockDevice(Protocol):
    n_blocks: int

    async def read(self, blocks: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        """Tokens of ``blocks`` and the virtual time the read completes."""
        ...

    async def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> float:
        """Store ``tokens`` into ``blocks``; returns the virtual completion time."""
        ...


class LocalBlockDevice:
    """An in-process disk: a token per block and the virtual-time disk model."""

    def __init__(self, n_blocks: int, profile: DiskProfile | str = "ssd") -> None:
        if isinstance(profile, str):
            profile = DISK_PROFILES[profile]
        self.n_blocks = n_blocks
        self.tokens = np.zeros(n_blocks, np.uint64)
        self.model = DiskModel(profile)
        # requests read, requests written, pages read, pages written: an array the
        # compiled paging core counts in too (it runs this device in-process)
        self.io_counts = np.zeros(4, np.int64)

    @property
    def reads(self) -> int:
        return int(self.io_counts[0])

    @property
    def writes(self) -> int:
        return int(self.io_counts[1])

    @property
    def pages_read(self) -> int:
        return int(self.io_counts[2])

    @property
    def pages_written(self) -> int:
        return int(self.io_counts[3])

    def _check(self, blocks: np.ndarray) -> np.ndarray:
        b = np.asarray(blocks, dtype=np.int64)
        if b.size == 1:
            x = int(b[0])
            if not 0 <= x < self.n_blocks:
                raise BlockOutOfRange(x, self.n_blocks)
        elif b.size:
            lo, hi = int(b.min()), int(b.max())
            if lo < 0:
                raise BlockOutOfRange(lo, self.n_blocks)
            if hi >= self.n_blocks:
                raise BlockOutOfRange(hi, self.n_blocks)
        return b

    async def read(self, blocks: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        b = self._check(blocks)
        self.io_counts[0] += 1
        self.io_counts[2] += b.size
        return self.tokens[b].copy(), self.model.submit(vt_us, int(b.size))

    async def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> float:
        b = self._check(blocks)
        self.io_counts[1] += 1
        self.io_counts[3] += b.size
        self.tokens[b] = np.asarray(tokens, dtype=np.uint64)
        return self.model.submit(vt_us, int(b.size))
