"""``hyperv``: Hyper-V Dynamic Memory -- demand, a buffer, and weights when memory runs short.

Source: Microsoft's Set-VMMemory reference (learn.microsoft.com/powershell/
module/hyper-v/set-vmmemory: ``-StartupBytes``, ``-MinimumBytes``,
``-MaximumBytes``, ``-Buffer`` 5-2000 %, ``-Priority`` 0-100) and the
Hyper-V Dynamic Memory overview (memory demand, memory pressure, buffer
default 20 %, memory weight default 50). Hyper-V's balancer itself is not
published; what follows is the documented behaviour, and the shortage rule
is our reading of "memory weight decides who gets memory when there is not
enough for every VM's request".

Per guest (memory in pages; the balloon target is ``ram - assigned``):

- ``demand``: the memory the guest's processes have committed. Here its
  anonymous memory in RAM or in its own swap, and its kernel pages
  (``anon_pages + swap_used + kernel_pages``; page cache is standby
  memory, reclaimable); ``demand_stat = "working_set_pages"`` uses the
  working-set estimate (+ kernel pages) instead;
- ``assigned``: what it holds now, ``ram - actual balloon``;
  ``pressure = demand / assigned x 100`` (logged; 100 = no free memory);
- it asks for ``demand x (1 + buffer / 100)`` within [minimum, maximum]
  (startup RAM at boot: the balloon starts at ``ram - startup``).

Every ``period_s`` (1 s: ours; how often the balancer runs is not
documented) the host's memory for guests -- RAM minus the disk cache and
``host_reserve_mib``; the transient I/O buffers are left out, as squeezed
does -- is given out: every guest gets its minimum; if the
requests fit, each gets its request; if not, first toward each guest's
demand, then toward its buffer, each round split in proportion to weight
(water-filling: a guest never gets more than it asked for, what it cannot
take goes to the others by weight; weight 0 gets only what the others
cannot take).

Defaults: ``buffer_percent`` 20, ``weight`` 50 (per guest:
``weights = {id: w}``), ``minimum_fraction`` 0 (limited by the host's
largest balloon, ``ram - max_balloon_pages``; Hyper-V's own default of
512 MB is larger than these guests), ``maximum_fraction`` 1 and
``startup_fraction`` 1 (the guest's configured RAM), ``host_reserve_mib``
0, ``period_s`` 1 (ours).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from balloonlab.proto.schema import mib_to_pages

from ..errors import PolicyConfigError
from .decision import Decision
from .policy import ControllerBase, Param, fraction, non_negative, parse_params
from .view import STAT_WORKING_SET, GuestView, HostView

__all__ = ["HyperVBalloon", "memory_pressure", "requested_pages", "weighted_fill", "demand_pages"]

DEMAND_STATS = ("committed", STAT_WORKING_SET)


def memory_pressure(demand_pages: float, assigned_pages: float) -> float:
    """Hyper-V's "memory pressure": demand / assigned x 100 (inf for a guest assigned nothing)."""
    return demand_pages / assigned_pages * 100.0 if assigned_pages > 0 else float("inf")


def requested_pages(demand_pages: float, buffer_percent: float, minimum: int, maximum: int) -> int:
    """What the guest asks for: its demand plus the buffer, within [minimum, maximum]."""
    return int(min(max(np.ceil(demand_pages * (1.0 + buffer_percent / 100.0)), minimum), maximum))


def weighted_fill(amount: float, want: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Split ``amount`` by ``weight``, nobody above ``want``; what a guest cannot take goes to the others.

    Water-filling: repeat the proportional split over the guests still
    short until the amount is gone or everyone has what it wants. Guests of
    weight 0 share what is left once every weighted guest is full, equally.
    """
    want = np.maximum(np.asarray(want, np.float64), 0.0)
    weight = np.maximum(np.asarray(weight, np.float64), 0.0)
    got = np.zeros_like(want)
    left = float(min(amount, want.sum()))
    for tier, w in ((weight > 0, weight), (weight == 0, np.ones_like(weight))):
        while left > 1e-9:
            short = tier & (want - got > 1e-9)
            if not short.any():
                break
            share = np.where(short, w, 0.0)
            give = np.minimum(left * share / share.sum(), want - got)
            got += give
            left -= float(give.sum())
    return got


def demand_pages(g: GuestView, demand_stat: str) -> float:
    kernel = g.stat("kernel_pages")
    if demand_stat == STAT_WORKING_SET:
        return g.stat(STAT_WORKING_SET) + kernel
    # Commit charge: anonymous memory wherever it is (in RAM or in the guest's swap), not only what is resident,
    # else demand could never exceed what the host assigned and a squeezed guest would look satisfied.
    return g.stat("anon_pages") + g.stat("swap_used") + kernel


class HyperVBalloon(ControllerBase):
    name = "hyperv"

    def __init__(self, buffer_percent: float, weight: int, weights: Mapping[int, int], minimum_fraction: float,
                 maximum_fraction: float, startup_fraction: float, host_reserve_mib: float, demand_stat: str,
                 period_s: float) -> None:
        self.buffer_percent = buffer_percent
        self.weight = weight
        self.weights = dict(weights)
        self.minimum_fraction = minimum_fraction
        self.maximum_fraction = maximum_fraction
        self.startup_fraction = startup_fraction
        self.host_reserve_pages = mib_to_pages(host_reserve_mib)
        self.demand_stat = demand_stat
        self.period_s = period_s
        self._next_s: float | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "HyperVBalloon":
        p = parse_params(cls.name, params, {
            "buffer_percent": Param(float, 20.0, "Set-VMMemory -Buffer: memory asked above demand, in % of demand",
                                    5.0, 2000.0),
            "weight": Param(int, 50, "Set-VMMemory -Priority of every guest not in weights", 0.0, 100.0),
            "weights": Param(dict, {}, "memory weight (0-100) by guest id"),
            "minimum_fraction": fraction("-MinimumBytes as a share of the guest's RAM", 0.0),
            "maximum_fraction": fraction("-MaximumBytes as a share of the guest's RAM", 1.0),
            "startup_fraction": fraction("-StartupBytes as a share of the guest's RAM", 1.0),
            "host_reserve_mib": non_negative(float, "the root partition's reserve", 0.0),
            "demand_stat": Param(str, "committed", "what demand reads: committed or working_set_pages"),
            "period_s": Param(float, 1.0, "how often the balancer runs (virtual s)", 0.0, lo_open=True)})
        weights: dict[int, int] = {}
        for key, w in {"default": p["weight"], **p["weights"]}.items():
            if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 100:
                raise PolicyConfigError(f"balloon policy 'hyperv': weight {key!r} must be an integer in [0, 100] "
                                        f"(Set-VMMemory -Priority), got {w!r}")
            if key != "default":
                try:
                    weights[int(key)] = w
                except (TypeError, ValueError):
                    raise PolicyConfigError(f"balloon policy 'hyperv': weights key {key!r} is not a guest id") from None
        p["weights"] = weights
        if not p["minimum_fraction"] <= p["startup_fraction"] <= p["maximum_fraction"]:
            raise PolicyConfigError(
                f"balloon policy 'hyperv': need minimum_fraction <= startup_fraction <= maximum_fraction, got "
                f"{p['minimum_fraction']}, {p['startup_fraction']}, {p['maximum_fraction']}")
        if p["demand_stat"] not in DEMAND_STATS:
            raise PolicyConfigError(f"balloon policy 'hyperv': demand_stat must be one of {list(DEMAND_STATS)}, "
                                    f"got {p['demand_stat']!r}")
        return cls(**p)

    def limits(self, g: GuestView) -> tuple[int, int, int]:
        """(minimum, startup, maximum) memory in pages; the minimum never below the host's balloon limit."""
        floor = g.ram_pages - g.max_balloon_pages
        maximum = max(int(round(self.maximum_fraction * g.ram_pages)), floor)
        minimum = min(max(int(round(self.minimum_fraction * g.ram_pages)), floor), maximum)
        startup = min(max(int(round(self.startup_fraction * g.ram_pages)), minimum), maximum)
        return minimum, startup, maximum

    def assign(self, budget_pages: float, minimum: np.ndarray, demand: np.ndarray, request: np.ndarray,
               weight: np.ndarray) -> tuple[np.ndarray, str]:
        """Memory per guest: minimums, then demand by weight, then the buffers by weight."""
        if request.sum() <= budget_pages:
            return request.astype(np.float64), "requests_fit"
        got = minimum.astype(np.float64)
        left = max(0.0, budget_pages - got.sum())
        need = np.maximum(np.minimum(demand, request) - got, 0.0)
        extra = weighted_fill(left, need, weight)
        got += extra
        left -= float(extra.sum())
        got += weighted_fill(left, np.maximum(request - got, 0.0), weight)
        return got, "shortage_by_weight"

    def decide(self, view: HostView) -> dict[int, Decision] | None:
        now_s = view.vt_us / 1e6
        if not view.guests:
            return None
        guests = list(view.guests)
        if self._next_s is None:   # boot: every guest starts with its startup RAM
            self._next_s = now_s + self.period_s
            out = {}
            for g in guests:
                _, startup, _ = self.limits(g)
                out[g.guest_id] = Decision(g.ram_pages - startup, "startup",
                                           f"boots with its startup RAM, {startup} pages", {"startup_pages": startup})
            return out
        if now_s < self._next_s:
            return None
        self._next_s = now_s + self.period_s
        lim = np.array([self.limits(g) for g in guests], np.int64)
        minimum, maximum = lim[:, 0], lim[:, 2]
        demand = np.array([demand_pages(g, self.demand_stat) for g in guests], np.float64)
        request = np.array([requested_pages(d, self.buffer_percent, int(lo), int(hi))
                            for d, lo, hi in zip(demand, minimum, maximum)], np.float64)
        weight = np.array([self.weights.get(g.guest_id, self.weight) for g in guests], np.float64)
        budget = view.total_frames - view.cache_pages - self.host_reserve_pages
        got, how = self.assign(budget, minimum, demand, request, weight)
        out: dict[int, Decision] = {}
        for i, g in enumerate(guests):
            assigned_now = g.ram_pages - g.actual_pages
            mem = int(min(max(np.floor(got[i]), minimum[i]), maximum[i]))
            pressure = memory_pressure(demand[i], assigned_now)
            inputs = {"demand_pages": float(demand[i]), "assigned_pages": assigned_now, "pressure": pressure,
                      "buffer_percent": self.buffer_percent, "request_pages": float(request[i]),
                      "weight": float(weight[i]), "minimum_pages": int(minimum[i]), "maximum_pages": int(maximum[i]),
                      "budget_pages": budget, "requests_total_pages": float(request.sum()), "memory_pages": mem}
            why = (f"demand {demand[i]:.0f} pages on {assigned_now} assigned (pressure {pressure:.0f}); asks demand "
                   f"+ {self.buffer_percent:g} % = {request[i]:.0f} within [{minimum[i]}, {maximum[i]}]")
            if how == "requests_fit":
                why += f"; the requests ({request.sum():.0f}) fit the host's {budget} pages: assigned {mem}"
            else:
                why += (f"; the requests ({request.sum():.0f}) exceed the host's {budget} pages: demand first, "
                        f"then buffers, by weight {weight[i]:g}: assigned {mem}")
            out[g.guest_id] = Decision(g.ram_pages - mem, how, why, inputs)
        return out
