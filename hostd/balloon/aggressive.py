"""``aggressive``: inflate everyone now (reproduces the swap storm, issue #5).

When the expected free frames (free + balloon pages still to come) fall
below ``free_target_fraction`` of host RAM, the whole deficit is added at
once to the balloon targets, split evenly across guests, ignoring their
working sets. It never deflates. Before ``start_tick`` it does nothing (a
scenario lets its guests warm up first, so the inflation has a "before").
"""
from __future__ import annotations

from typing import Any, Mapping

from .decision import Decision, hold
from .policy import ControllerBase, clamp_target, fraction, is_due, non_negative, parse_params, period_ticks
from .view import STAT_WORKING_SET, HostView

__all__ = ["AggressiveBalloon"]


class AggressiveBalloon(ControllerBase):
    name = "aggressive"

    def __init__(self, free_target_fraction: float, period_ticks: int, start_tick: int = 0) -> None:
        self.free_target_fraction = free_target_fraction
        self.period_ticks = period_ticks
        self.start_tick = start_tick

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "AggressiveBalloon":
        p = parse_params(cls.name, params, {
            "free_target_fraction": fraction("inflate when expected free frames fall below this share of host RAM",
                                             0.10),
            "period_ticks": period_ticks(),
            "start_tick": non_negative(int, "no inflation before this tick (lets the guests warm up)", 0)})
        return cls(p["free_target_fraction"], p["period_ticks"], p["start_tick"])

    def decide(self, view: HostView) -> dict[int, Decision] | None:
        if not view.guests or not is_due(view, self.period_ticks):
            return None
        if view.tick < self.start_tick:
            return {g.guest_id: hold(g, "before_start", f"no inflation before start_tick {self.start_tick}",
                                     start_tick=self.start_tick) for g in view.guests}
        goal = self.free_target_fraction * view.total_frames
        expected = view.expected_free_frames
        deficit = goal - expected
        host = {"free_frames": view.free_frames, "expected_free_frames": expected, "goal_free_frames": goal}
        if deficit <= 0:
            return {g.guest_id: hold(g, "no_deficit", f"host expects {expected} free frames, at or above its goal "
                                     f"{goal:.0f} ({self.free_target_fraction:g} of host RAM)", **host)
                    for g in view.guests}
        each = -(-int(deficit) // len(view.guests))
        return {g.guest_id: Decision(
            clamp_target(g, g.target_pages + each), "deficit_split_evenly",
            f"host short by {deficit:.0f} frames (expects {expected} free, goal {goal:.0f}): every guest inflates "
            f"by an even share of {each} pages, whatever its working set",
            {**host, "share_pages": each, "working_set_pages": g.stat(STAT_WORKING_SET)}) for g in view.guests}
