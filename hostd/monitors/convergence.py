"""The "central banker" report: after a step in host demand, do balloon targets settle?

The seed's hypervisor sets each guest's balloon (its "interest rate") to
keep the whole host stable without a recession (thrashing) in any guest.
This tracker measures how well a controller does it:

- a **step** is host demand (frames in use) rising by ``step_fraction`` of
  host RAM within ``step_ticks`` ticks, after ``start_tick``;
- the controller has **settled** once, for ``settle_ticks`` ticks in a row,
  no guest's target moved by more than ``tolerance_fraction`` of its RAM
  per tick and no guest's PFF was above ``pff_high``;
- **convergence time** is from the step to the first of those ticks;
- **overshoot** is how far each guest's target went above the value it
  settled at (pages; the largest, and the sum over guests relative to the
  settled total);
- ``pff_above_ticks`` counts ticks after the step with some guest above
  ``pff_high``, and ``longest_pff_above_ticks`` the longest run of them.

Each settled step is logged as ``balloon_converged``; a step still open at
the end of the run is reported with ``settled = false``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from balloonlab.proto import events as ev

from .config import ConvergenceConfig
from .history import History

__all__ = ["ConvergenceTracker"]


@dataclass(slots=True)
class _Step:
    step_tick: int
    step_vt_us: float
    demand_rise_pages: int
    targets_at_step: dict[int, int]
    max_targets: dict[int, int] = field(default_factory=dict)
    steady_ticks: int = 0
    pff_above_ticks: int = 0
    pff_run: int = 0
    longest_pff_above_ticks: int = 0

    def report(self, settled_tick: int | None, targets: Mapping[int, int], tick_us: float) -> dict[str, Any]:
        over = {gid: max(0, self.max_targets.get(gid, t) - t) for gid, t in targets.items()}
        final_total = sum(targets.values())
        out: dict[str, Any] = {
            "step_tick": self.step_tick, "demand_rise_pages": self.demand_rise_pages,
            "settled": settled_tick is not None, "settled_tick": settled_tick,
            "convergence_ticks": None if settled_tick is None else settled_tick - self.step_tick,
            "overshoot_pages": max(over.values(), default=0),
            "overshoot_total_pages": sum(over.values()),
            "overshoot_fraction": round(sum(over.values()) / final_total, 4) if final_total else 0.0,
            "targets_at_step": {str(k): v for k, v in sorted(self.targets_at_step.items())},
            "settled_targets": {str(k): v for k, v in sorted(targets.items())},
            "pff_above_ticks": self.pff_above_ticks, "longest_pff_above_ticks": self.longest_pff_above_ticks,
        }
        if settled_tick is not None:
            out["convergence_vs"] = round((settled_tick - self.step_tick) * tick_us / 1e6, 4)
        return out


class ConvergenceTracker:
    def __init__(self, cfg: ConvergenceConfig, tick_us: float, log: Any) -> None:
        self.cfg = cfg
        self.tick_us = tick_us
        self.log = log
        self.steps: list[dict[str, Any]] = []
        self._open: _Step | None = None
        self._prev_targets: dict[int, int] = {}
        self._last_targets: dict[int, int] = {}

    def end_tick(self, hist: History, targets: Mapping[int, int]) -> None:
        cfg = self.cfg
        now = hist.now
        targets = {gid: int(t) for gid, t in targets.items() if gid in now.guests}
        prev, self._prev_targets = self._prev_targets, dict(targets)
        self._last_targets = dict(targets)
        if not cfg.enabled or now.tick < cfg.start_tick:
            return
        step = self._open
        if step is None:
            rise = now.demand_pages - hist.host_min("demand_pages", cfg.step_ticks)
            if rise >= max(1.0, cfg.step_fraction * now.total_frames):
                self._open = _Step(now.tick, now.vt_us, int(rise), dict(targets), dict(targets))
            return
        for gid, t in targets.items():
            step.max_targets[gid] = max(step.max_targets.get(gid, t), t)
        above = [gid for gid, g in now.guests.items() if g.pff > cfg.pff_high]
        step.pff_above_ticks += bool(above)
        step.pff_run = step.pff_run + 1 if above else 0
        step.longest_pff_above_ticks = max(step.longest_pff_above_ticks, step.pff_run)
        moved = any(abs(t - prev.get(gid, t)) > cfg.tolerance_fraction * now.guests[gid].ram_pages
                    for gid, t in targets.items())
        step.steady_ticks = 0 if (moved or above) else step.steady_ticks + 1
        if step.steady_ticks >= cfg.settle_ticks:
            settled = now.tick - cfg.settle_ticks + 1
            report = step.report(settled, targets, self.tick_us)
            self.steps.append(report)
            self._open = None
            self.log.info(ev.BALLOON_CONVERGED, tick=now.tick, **report)

    def metrics(self) -> dict[str, Any]:
        steps = list(self.steps)
        if self._open is not None:
            steps.append(self._open.report(None, self._last_targets, self.tick_us))
        return {"steps": steps}
