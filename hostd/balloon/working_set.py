"""``working-set``: balloon only what lies outside each guest's working set, with PFF feedback.

For each guest the floor is ``working_set_pages * (1 + headroom) +
reserve_pages``: its memory (RAM - balloon target) is never set below it,
so the cap on its target is ``ram - floor`` (and ``max_balloon_pages``).
Every ``period_ticks``:
- a target above the cap (the working set grew) is lowered to the cap at once;
- a guest whose ``pff`` stat exceeds ``pff_high`` backs off: its target
  drops by ``max_step_pages`` and it is not inflated this step;
- when the expected free frames (free + balloon pages still to come) are
  below ``free_target_fraction`` of host RAM, the deficit is spread over the
  other guests in proportion to their slack (cap - target), at most
  ``max_step_pages`` each;
- when they are above ``release_fraction`` of host RAM, balloons shrink by
  up to ``max_step_pages`` each, spread in proportion to their size, to
  give the surplus back.

``pff`` is the guest's page-fault frequency in faults per virtual second
(guestd's ``PffMeter``: major + minor faults, smoothed).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..errors import PolicyConfigError
from .policy import check_fraction, check_non_negative, clamp_target, is_due, parse_params
from .view import STAT_PFF, STAT_WORKING_SET, GuestView, HostView

__all__ = ["WorkingSetBalloon"]


class WorkingSetBalloon:
    name = "working-set"

    def __init__(self, free_target_fraction: float, release_fraction: float, headroom: float,
                 reserve_pages: int, max_step_pages: int, pff_high: float, period_ticks: int) -> None:
        self.free_target_fraction = free_target_fraction
        self.release_fraction = release_fraction
        self.headroom = headroom
        self.reserve_pages = reserve_pages
        self.max_step_pages = max_step_pages
        self.pff_high = pff_high
        self.period_ticks = period_ticks

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "WorkingSetBalloon":
        p = parse_params(cls.name, params, {
            "free_target_fraction": (float, 0.10), "release_fraction": (float, 0.20),
            "headroom": (float, 0.10), "reserve_pages": (int, 256), "max_step_pages": (int, 1024),
            "pff_high": (float, 1000.0), "period_ticks": (int, 1)})
        check_fraction(cls.name, "free_target_fraction", p["free_target_fraction"])
        check_fraction(cls.name, "release_fraction", p["release_fraction"])
        for name in ("headroom", "reserve_pages", "pff_high"):
            check_non_negative(cls.name, name, p[name])
        if p["max_step_pages"] < 1:
            raise PolicyConfigError(f"balloon policy 'working-set': max_step_pages must be >= 1, "
                                    f"got {p['max_step_pages']}")
        if p["release_fraction"] < p["free_target_fraction"]:
            raise PolicyConfigError(
                f"balloon policy 'working-set': release_fraction {p['release_fraction']} is below "
                f"free_target_fraction {p['free_target_fraction']}")
        return cls(**p)

    def cap_pages(self, g: GuestView) -> int:
        """The largest target that leaves the guest its working set plus headroom."""
        floor = int(np.ceil(g.stat(STAT_WORKING_SET) * (1.0 + self.headroom))) + self.reserve_pages
        return clamp_target(g, g.ram_pages - floor)

    def targets(self, view: HostView) -> dict[int, int]:
        out = view.current_targets()
        if not view.guests or not is_due(view, self.period_ticks):
            return out
        guests = list(view.guests)
        cap = np.array([self.cap_pages(g) for g in guests], np.int64)
        target = np.minimum(np.array([g.target_pages for g in guests], np.int64), cap)
        thrashing = np.array([g.stat(STAT_PFF) > self.pff_high for g in guests])
        target[thrashing] = np.maximum(target[thrashing] - self.max_step_pages, 0)

        expected_free = view.free_frames + sum(int(t) - g.actual_pages for t, g in zip(target, guests))
        low = self.free_target_fraction * view.total_frames
        high = self.release_fraction * view.total_frames
        if expected_free < low:
            slack = np.where(thrashing, 0, cap - target)
            target += _spread(int(np.ceil(low - expected_free)), slack, self.max_step_pages)
        elif expected_free > high:
            size = np.where(thrashing, 0, target)
            target -= _spread(int(expected_free - high), size, self.max_step_pages)
        return {g.guest_id: clamp_target(g, t) for g, t in zip(guests, np.minimum(target, cap).tolist())}


def _spread(amount: int, weight: np.ndarray, max_each: int) -> np.ndarray:
    """Split ``amount`` in proportion to ``weight``, each share at most its weight and ``max_each``."""
    total = int(weight.sum())
    if amount <= 0 or total <= 0:
        return np.zeros_like(weight)
    share = np.ceil(weight * (min(amount, total) / total)).astype(np.int64)
    return np.minimum(np.minimum(share, weight), max_each)
