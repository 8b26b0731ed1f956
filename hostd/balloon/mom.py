"""``mom``: oVirt MOM's default balloon rules.

The host is under pressure when its free frames are below
``pressure_threshold`` (20 %) of its RAM. Then each guest is shrunk (its
balloon grown) by at most ``pressure_rate`` (5 %) of its RAM per step, but
never so far that less than ``min_guest_free_percent`` (20 %) of the
guest's current memory stays free: the step is at most
``guest_free - 0.20 * (ram - target)``. Without pressure each guest grows
back (balloon shrinks) by the same rate. A change smaller than
``min_balloon_change_percent`` (0.25 %) of guest RAM is not made.

Guest free memory is the ``free_stat`` stat (``free`` by default, pages);
a guest that has not reported it is not shrunk.
"""
from __future__ import annotations

from typing import Any, Mapping

from .decision import Decision
from .policy import ControllerBase, Param, clamp_target, fraction, is_due, parse_params, period_ticks
from .view import STAT_FREE, HostView

__all__ = ["MomBalloon"]


class MomBalloon(ControllerBase):
    name = "mom"

    def __init__(self, pressure_threshold: float, pressure_rate: float, min_guest_free_percent: float,
                 min_balloon_change_percent: float, free_stat: str, period_ticks: int) -> None:
        self.pressure_threshold = pressure_threshold
        self.pressure_rate = pressure_rate
        self.min_guest_free_percent = min_guest_free_percent
        self.min_balloon_change_percent = min_balloon_change_percent
        self.free_stat = free_stat
        self.period_ticks = period_ticks

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "MomBalloon":
        p = parse_params(cls.name, params, {
            "pressure_threshold": fraction("the host is under pressure below this share of its RAM free", 0.20),
            "pressure_rate": fraction("at most this share of the guest's RAM is moved per step", 0.05),
            "min_guest_free_percent": fraction("never shrink a guest below this share of its memory free", 0.20),
            "min_balloon_change_percent": fraction("changes smaller than this share of guest RAM are not made",
                                                   0.0025),
            "free_stat": Param(str, STAT_FREE, "the guest stat read as its free memory (pages)"),
            "period_ticks": period_ticks()})
        return cls(**p)

    def decide(self, view: HostView) -> dict[int, Decision] | None:
        if not is_due(view, self.period_ticks):
            return None
        threshold = self.pressure_threshold * view.total_frames
        pressure = view.free_frames < threshold
        out: dict[int, Decision] = {}
        for g in view.guests:
            step = self.pressure_rate * g.ram_pages
            inputs: dict[str, float] = {"free_frames": view.free_frames, "pressure_frames": threshold,
                                        "rate_pages": step}
            if pressure:
                guest_mem = g.ram_pages - g.target_pages
                guest_free = g.stat(self.free_stat)
                room = guest_free - self.min_guest_free_percent * guest_mem
                inputs.update(guest_free_pages=guest_free, guest_memory_pages=guest_mem, room_pages=room)
                step = min(step, room)
                new = g.target_pages + max(0.0, step)
                code, why = (("host_pressure", f"host free {view.free_frames} < {threshold:.0f} frames "
                              f"({self.pressure_threshold:g} of RAM): shrink the guest by up to {step:.0f} pages")
                             if step > 0 else
                             ("guest_free_low", f"host free {view.free_frames} < {threshold:.0f} frames, but the "
                              f"guest has {guest_free:.0f} pages free, not more than {self.min_guest_free_percent:g} "
                              f"of its {guest_mem} pages: not shrunk"))
            else:
                new = g.target_pages - step
                code, why = "no_host_pressure", (f"host free {view.free_frames} >= {threshold:.0f} frames: the "
                                                 f"guest grows back by up to {step:.0f} pages")
            new_pages = clamp_target(g, int(new))   # floor: never overshoot the 20 % free rule
            if abs(new_pages - g.target_pages) < self.min_balloon_change_percent * g.ram_pages:
                if new_pages != g.target_pages:
                    code, why = "change_too_small", (f"{why}; a change of {new_pages - g.target_pages} pages is "
                                                     f"below {self.min_balloon_change_percent:g} of its RAM: kept")
                new_pages = min(max(g.target_pages, 0), g.max_balloon_pages)
            out[g.guest_id] = Decision(new_pages, code, why, inputs)
        return out
