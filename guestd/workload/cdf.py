"""Inverse-CDF sampling through a guide table: ``searchsorted`` with fewer branch mispredictions.

A zipf workload turns each uniform draw ``u`` into a rank with
``cdf.searchsorted(u, side="right")`` over a CDF of one entry per page. On
thousands of random keys that binary search mispredicts about half of its
branches, every tick of every guest. The guide table of Chen and Asau
(1974) answers most keys with one lookup: bucket ``j`` covers
``[j/K, (j+1)/K)``, and when no CDF entry falls inside it every key in it
has the same answer. Keys in the other buckets go to ``searchsorted``
itself. The table is small (at most 32 KiB): a guest reads it cold, after
the other processes had the core. (A CDF of a few entries, as ``Mix``'s,
is searched about as fast as the table is read: it keeps ``searchsorted``.)
"""
from __future__ import annotations

import numpy as np

__all__ = ["CdfTable"]

_MIN_BUCKETS = 1 << 10
_MAX_BUCKETS = 1 << 14       # 32 KiB of int16 at most: the table is read cold every tick; more keys search
_SEARCH = -1                 # a bucket with a CDF entry inside: its keys need the search


class CdfTable:
    """``searchsorted(cdf, u, side="right")`` for uniform draws ``u`` in ``[0, 1)``.

    It must agree exactly with ``np.searchsorted(cdf, u, side="right")`` for
    every ``u`` in ``[0, 1)`` (tests/test_workload_cdf.py pins it on random
    draws and on the CDF's own entries and the buckets' edges); ``cdf`` is
    non-decreasing, as ``searchsorted`` needs. It holds because ``K`` is a
    power of two: ``u * K`` is exact, so bucket ``j = floor(u * K)`` has
    ``j / K <= u < (j + 1) / K`` exactly, and the answer lies between those of
    the two edges; where they are equal it is that value.
    """

    def __init__(self, cdf: np.ndarray) -> None:
        self.cdf = np.ascontiguousarray(cdf, dtype=np.float64)
        k = _MIN_BUCKETS
        while k < 4 * self.cdf.size and k < _MAX_BUCKETS:
            k *= 2
        self.buckets = k
        at_edges = self.cdf.searchsorted(np.arange(k + 1, dtype=np.float64) / k, side="right")
        answer = np.where(at_edges[:-1] == at_edges[1:], at_edges[:-1], _SEARCH)
        # the narrowest type for answers 0..size (and the -1 mark): a table that stays in cache
        small = np.int16 if self.cdf.size < 2**15 else np.int32 if self.cdf.size < 2**31 else np.int64
        self._answer = answer.astype(small)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """The index of each draw (``intp``), as ``searchsorted(cdf, u, side="right")``."""
        idx = self._answer[(u * self.buckets).astype(np.intp)].astype(np.intp)
        todo = np.flatnonzero(idx < 0)
        if todo.size:
            idx[todo] = self.cdf.searchsorted(u[todo], side="right")
        return idx
