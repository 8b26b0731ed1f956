"""Flag guests whose balloon does not follow its target (a non-cooperating driver).

A guest is flagged when, for ``stall_ticks`` consecutive updates, its
balloon is more than ``tolerance_pages`` away from its target and has not
moved toward it. Progress, or reaching the target, clears the flag. The
host then relies on host swapping for that guest's share.
"""
from __future__ import annotations

from .view import HostView

__all__ = ["NonCooperationDetector"]


class NonCooperationDetector:
    def __init__(self, stall_ticks: int = 10, tolerance_pages: int = 0) -> None:
        if stall_ticks < 1 or tolerance_pages < 0:
            raise ValueError(f"stall_ticks={stall_ticks} must be >= 1, tolerance_pages={tolerance_pages} >= 0")
        self.stall_ticks = stall_ticks
        self.tolerance_pages = tolerance_pages
        self._last_actual: dict[int, int] = {}
        self._stalled: dict[int, int] = {}

    def update(self, view: HostView) -> frozenset[int]:
        """Feed one tick's view; returns the guests flagged now."""
        seen = set()
        for g in view.guests:
            gid = g.guest_id
            seen.add(gid)
            gap = g.target_pages - g.actual_pages
            last = self._last_actual.get(gid)
            self._last_actual[gid] = g.actual_pages
            if abs(gap) <= self.tolerance_pages:
                self._stalled[gid] = 0
                continue
            toward = last is not None and (g.actual_pages - last) * (1 if gap > 0 else -1) > 0
            self._stalled[gid] = 0 if toward else self._stalled.get(gid, 0) + 1
        for gid in set(self._last_actual) - seen:
            del self._last_actual[gid]
            self._stalled.pop(gid, None)
        return self.flagged()

    def flagged(self) -> frozenset[int]:
        return frozenset(gid for gid, n in self._stalled.items() if n >= self.stall_ticks)
