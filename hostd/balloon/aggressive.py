"""``aggressive``: inflate everyone now (reproduces the swap storm, issue #5).

When the expected free frames (free + balloon pages still to come) fall
below ``free_target_fraction`` of host RAM, the whole deficit is added at
once to the balloon targets, split evenly across guests, ignoring their
working sets. It never deflates. Before ``start_tick`` it does nothing (a
scenario lets its guests warm up first, so the inflation has a "before").
"""
from __future__ import annotations

from typing import Any, Mapping

from .policy import check_fraction, check_non_negative, clamp_target, is_due, parse_params
from .view import HostView

__all__ = ["AggressiveBalloon"]


class AggressiveBalloon:
    name = "aggressive"

    def __init__(self, free_target_fraction: float, period_ticks: int, start_tick: int = 0) -> None:
        self.free_target_fraction = free_target_fraction
        self.period_ticks = period_ticks
        self.start_tick = start_tick

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "AggressiveBalloon":
        p = parse_params(cls.name, params, {"free_target_fraction": (float, 0.10), "period_ticks": (int, 1),
                                            "start_tick": (int, 0)})
        check_fraction(cls.name, "free_target_fraction", p["free_target_fraction"])
        check_non_negative(cls.name, "start_tick", p["start_tick"])
        return cls(p["free_target_fraction"], p["period_ticks"], p["start_tick"])

    def targets(self, view: HostView) -> dict[int, int]:
        out = view.current_targets()
        if not view.guests or view.tick < self.start_tick or not is_due(view, self.period_ticks):
            return out
        deficit = self.free_target_fraction * view.total_frames - view.expected_free_frames
        if deficit <= 0:
            return out
        each = -(-int(deficit) // len(view.guests))
        return {g.guest_id: clamp_target(g, g.target_pages + each) for g in view.guests}
