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

Its table (off by default; every key optional)::

    [monitors.convergence]
    enabled = false
    start_tick = 20             # warm-up ignored before this tick
    step_fraction = 0.05        # host demand rising by this share of host RAM ...
    step_ticks = 5              # ... within this many ticks is a step change
    settle_ticks = 10           # targets steady (and no PFF above pff_high) this long = settled
    tolerance_fraction = 0.01   # steady: no target moved more than this share of guest RAM per tick
    pff_high = 5000.0           # faults per virtual second

In summary.json: ``convergence`` (every step); in the summary table and
report.md, a line per step and a table of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from balloonlab.proto import events as ev

from .base import MonitorBase, MonitorSpec, ReportFormat, SummaryKeys, TickContext, at_least_one, fraction
from .window import History

__all__ = ["ConvergenceTracker", "ConvergenceConfig", "SPEC"]


@dataclass(frozen=True, slots=True)
class ConvergenceConfig:
    enabled: bool = False
    start_tick: int = 20
    step_fraction: float = fraction(0.05)
    step_ticks: int = at_least_one(5)
    settle_ticks: int = at_least_one(10)
    tolerance_fraction: float = fraction(0.01)
    pff_high: float = 5000.0


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


class ConvergenceTracker(MonitorBase):
    def __init__(self, cfg: ConvergenceConfig, tick_us: float, log: Any) -> None:
        self.cfg = cfg
        self.tick_us = tick_us
        self.log = log
        self.steps: list[dict[str, Any]] = []
        self._open: _Step | None = None
        self._prev_targets: dict[int, int] = {}
        self._last_targets: dict[int, int] = {}

    def end_tick(self, tick: TickContext) -> None:
        self.update(tick.history, tick.targets)

    def update(self, hist: History, targets: Mapping[int, int]) -> None:
        """Open a step when demand rises, close it once the targets have settled."""
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

    def finished_keys(self) -> dict[str, Any]:
        return {"convergence": self.metrics()}


# --- the analysis ---------------------------------------------------------------------------------


def summarize(monitors: Mapping[str, Any], host_events: Sequence[Mapping[str, Any]],
              finished: Mapping[str, Any]) -> SummaryKeys:
    conv = monitors.get("convergence")
    return SummaryKeys(variant={} if conv is None else {"convergence": conv})


def table_lines(v: Mapping[str, Any]) -> list[str]:
    out = []
    for st in (v.get("convergence") or {}).get("steps", []):
        how = (f"settled after {st['convergence_ticks']} ticks" if st.get("settled")
               else "never settled")
        out.append(f"   convergence: demand step at tick {st['step_tick']} (+{st['demand_rise_pages']} pages), {how}, "
                   f"overshoot {st['overshoot_pages']} pages ({st['overshoot_fraction']}), PFF above threshold "
                   f"{st['pff_above_ticks']} ticks (longest {st['longest_pff_above_ticks']})")
    return out


def report(v: Mapping[str, Any], fmt: ReportFormat) -> list[str]:
    conv = v.get("convergence")
    if not isinstance(conv, dict):
        return []
    out = []
    steps = conv.get("steps")
    scalars = {k: x for k, x in conv.items() if not isinstance(x, (list, dict))}
    if scalars:
        out.append("- convergence: " + ", ".join(f"{k}={fmt.cell(x)}" for k, x in scalars.items()))
    if isinstance(steps, list) and steps:
        out += ["", "Convergence after each demand step:", "", fmt.table(steps), ""]
    return out


SPEC = MonitorSpec(
    name="convergence",
    config=ConvergenceConfig,
    make=lambda cfg, ctx: ConvergenceTracker(cfg, ctx.tick_us, ctx.log),
    history_ticks=lambda cfg: cfg.step_ticks,
    summarize=summarize,
    table_lines=table_lines,
    report=report,
)
