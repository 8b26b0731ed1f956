"""Every host monitor, one line each (a new monitor: its module with a ``SPEC``, and a line here).

The order is the order of everything a monitor contributes: its
``record_tick`` and ``end_tick`` calls, its keys in ``run_finished`` and
summary.json, its rows and sections in the analysis.
"""
from __future__ import annotations

from . import convergence, double_faults, history, pinning, swap_storm, wss
from .base import MonitorSpec

__all__ = ["MONITORS", "monitor_spec"]

MONITORS: tuple[MonitorSpec, ...] = (
    wss.SPEC,
    swap_storm.SPEC,
    double_faults.SPEC,
    pinning.SPEC,
    convergence.SPEC,
    history.SPEC,
)


def monitor_spec(name: str) -> MonitorSpec:
    for spec in MONITORS:
        if spec.name == name:
            return spec
    raise KeyError(f"no host monitor {name!r}; known: {[s.name for s in MONITORS]}")
