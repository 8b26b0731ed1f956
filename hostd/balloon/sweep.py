"""``sweep``: balloon targets stepped up over the run, to draw the thrashing curve.

From ``start_tick`` on, every ``step_ticks`` ticks each guest's target
grows by ``step_fraction`` of its RAM, up to ``max_fraction`` (and the
guest's ``max_balloon_pages``), then stays there. Measuring throughput and
page-fault frequency per step gives the curve of the seed's "Delicate
Balance": flat while the balloon takes memory the guest does not use, a
knee where the guest's free memory drops below its working set.

With ``respect_working_set`` the sweep stops short of the knee: a target
never leaves the guest less than ``working_set_pages * (1 + headroom) +
reserve_pages + kernel_pages`` (its own estimate, as ``working-set``
uses), and it never rises while the guest's ``pff`` is above ``pff_high``.
A balloon already granted is lowered only when the working set grows past
it.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .decision import Decision
from .policy import ControllerBase, Param, clamp_target, fraction, non_negative, parse_params
from .view import STAT_PFF, STAT_WORKING_SET, GuestView, HostView

__all__ = ["SweepBalloon"]

STAT_KERNEL = "kernel_pages"


class SweepBalloon(ControllerBase):
    name = "sweep"

    def __init__(self, start_tick: int, step_ticks: int, step_fraction: float, max_fraction: float,
                 respect_working_set: bool, headroom: float, reserve_pages: int, pff_high: float) -> None:
        self.start_tick = start_tick
        self.step_ticks = step_ticks
        self.step_fraction = step_fraction
        self.max_fraction = max_fraction
        self.respect_working_set = respect_working_set
        self.headroom = headroom
        self.reserve_pages = reserve_pages
        self.pff_high = pff_high

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SweepBalloon":
        p = parse_params(cls.name, params, {
            "start_tick": non_negative(int, "the first step is taken at this tick", 20),
            "step_ticks": Param(int, 20, "ticks between steps", 1.0),
            "step_fraction": fraction("each step grows every target by this share of the guest's RAM", 0.05),
            "max_fraction": fraction("targets stop growing at this share of the guest's RAM", 0.65),
            "respect_working_set": Param(bool, False, "stop short of the knee: never below the working-set floor"),
            "headroom": non_negative(float, "working-set floor's margin (share of the working set)", 0.10),
            "reserve_pages": non_negative(int, "pages added to the working-set floor", 64),
            "pff_high": non_negative(float, "with respect_working_set: no step while the guest's page-fault "
                                            "frequency (faults per virtual s) is above this; 0 = no limit", 0.0)})
        return cls(**p)

    def step_index(self, tick: int) -> int:
        """How many steps have been taken by ``tick`` (0 before ``start_tick``)."""
        return 0 if tick < self.start_tick else (tick - self.start_tick) // self.step_ticks + 1

    def sweep_pages(self, g: GuestView, tick: int) -> int:
        steps = self.step_index(tick)
        return int(min(steps * self.step_fraction, self.max_fraction) * g.ram_pages)

    def cap_pages(self, g: GuestView) -> int:
        floor = (int(np.ceil(g.stat(STAT_WORKING_SET) * (1.0 + self.headroom))) + self.reserve_pages
                 + int(g.stat(STAT_KERNEL)))
        return clamp_target(g, g.ram_pages - floor)

    def decide(self, view: HostView) -> dict[int, Decision]:
        out: dict[int, Decision] = {}
        step = self.step_index(view.tick)
        for g in view.guests:
            want = self.sweep_pages(g, view.tick)
            inputs: dict[str, float] = {"step": step, "sweep_pages": want}
            code, why = (("before_start", f"no balloon before start_tick {self.start_tick}") if step == 0 else
                         ("sweep_step", f"sweep step {step}: {min(step * self.step_fraction, self.max_fraction):g} "
                                        f"of the guest's RAM = {want} pages"))
            if self.respect_working_set:
                cap = self.cap_pages(g)
                inputs.update(cap_pages=cap, working_set_pages=g.stat(STAT_WORKING_SET), pff=g.stat(STAT_PFF),
                              pff_high=self.pff_high)
                if want > g.target_pages:
                    thrashing = self.pff_high > 0 and g.stat(STAT_PFF) > self.pff_high
                    if thrashing:
                        code, why = "pff_above_high", (f"PFF {g.stat(STAT_PFF):.0f}/s above pff_high "
                                                       f"{self.pff_high:g}/s: not inflated")
                    elif want > max(cap, g.target_pages):
                        code, why = "working_set_cap", (f"{why}, capped at {max(cap, g.target_pages)} pages by the "
                                                        f"working set {g.stat(STAT_WORKING_SET):.0f} + headroom")
                    want = g.target_pages if thrashing else min(want, max(cap, g.target_pages))
                if cap < g.target_pages:      # the working set grew past the balloon: give it back
                    if want > cap:
                        code, why = "working_set_grew", (f"working set {g.stat(STAT_WORKING_SET):.0f} + headroom "
                                                         f"leaves a cap of {cap} pages, below the target: lowered")
                    want = min(want, cap)
            out[g.guest_id] = Decision(clamp_target(g, want), code, why, inputs)
        return out
