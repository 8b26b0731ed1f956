"""The host's working-set sampler as a monitor: its ``[monitors.wss]`` table, its keys in the summary.

The estimator itself is ``hostd.wss`` (ESX's sampling, Waldspurger OSDI'02
section 5.2; the table's keys and their sources are documented there).
Unlike the other monitors it feeds the balloon controllers, so the machine
drives it apart from the monitors' ``end_tick``: it hands it every guest's
accessed bits as each ``TickDone`` arrives and closes its tick *before*
the controllers decide (``HostMonitors.tick_bits`` / ``close_wss_tick``);
its own ``end_tick``, with the other monitors' after the next
``TickStart`` has gone out, draws the samples of the periods that closed.

In summary.json, under ``host``: ``working_set`` (per guest the last
estimate, the periods measured, both averages and the peak).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..wss import HostWorkingSet
from .base import MonitorBase, MonitorContext, MonitorSpec, SummaryKeys, at_least_one, fraction

__all__ = ["WssConfig", "WssMonitor", "SPEC"]


@dataclass(frozen=True, slots=True)
class WssConfig:
    enabled: bool = True
    sample_pages: int = at_least_one(100)    # ESX: 100 pages per period (OSDI'02, 5.2)
    period_exec_us: float = 20_000.0         # a period: this much of the guest's execution time
    max_period_ticks: int = at_least_one(100)
    fast_gain: float = fraction(0.5)
    slow_gain: float = fraction(0.1)


class WssMonitor(HostWorkingSet, MonitorBase):
    def end_tick(self, tick: Any) -> None:
        self.draw_due()      # the samples of the periods the boundary closed (``close_wss_tick``)


def summarize(monitors: Mapping[str, Any], host_events: Sequence[Mapping[str, Any]],
              finished: Mapping[str, Any]) -> SummaryKeys:
    w = monitors.get("wss")
    return SummaryKeys(host={"working_set": w} if isinstance(w, dict) else {})


def _make(cfg: WssConfig, ctx: MonitorContext) -> WssMonitor:
    return WssMonitor(cfg, ctx.mem, ctx.seed)


SPEC = MonitorSpec(name="wss", config=WssConfig, make=_make, summarize=summarize)
