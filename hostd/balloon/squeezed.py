"""``squeezed``: XenServer's memory daemon, its proportional policy and its stuck-domain monitor.

Follows xapi-project/squeezed ``lib/squeeze.ml`` (commit 1c23bfe, 2020;
``Proportional.compute_target_adjustments``, ``Squeezer.one_iteration``,
``Stuckness_monitor``) and the constants of ``src/squeeze_xen.ml``.
squeezed thinks in a domain's *memory*; a balloon target here is the
guest's RAM minus that memory (``memory = ram_pages - balloon``).

Per guest: ``dynamic_max`` (``dynamic_max_fraction`` of its RAM, default
1: static max) and ``dynamic_min`` (``dynamic_min_fraction``, default 0.25:
XenServer refuses a dynamic min below a quarter of static max; never below
what the host's largest balloon allows, ``ram - max_balloon_pages``).

squeezed's balancing thread checks every ``balance_check_s`` (10 s) whether
a fresh iteration would change a target; if so it runs a balancing call
(``change_host_free_memory``): one iteration every ``period_s`` (the loop
waits 1 s) until every active guest has reached its target and none would
change. One iteration:

- host free memory as Xen counts it: host RAM minus the host's disk cache
  (the host's own memory, as dom0's is in Xen) minus every guest's current
  memory (``ram - actual balloon``), backed or not -- Xen does not
  overcommit, so a guest's memory is the host's whether the host has
  faulted it in or not. The host's I/O buffers are left out: they come and
  go with the guests' disk I/O (in Xen they live in dom0's fixed memory),
  and counting them would squeeze every guest harder whenever a squeezed
  guest thrashes, which fills them;
- ``min_freeable = max(0, actual - dynamic_min - 2 * inaccuracy)``;
  ``surplus = max(0, free + sum(min_freeable) - host_free_target)`` over the
  active guests, ``gamma = surplus / sum(dynamic_max - dynamic_min)``
  clamped to [0, 1] (NaN -> 0 when every range is 0);
  ``target = dynamic_min + int(gamma * (dynamic_max - dynamic_min))``;
- two phases: while any active guest's new target frees memory (below its
  actual memory by more than ``inaccuracy``), only those targets are set
  and the others wait; once none does, the allocating ones are set;
- stuck: a guest asked to move (actual more than ``inaccuracy`` from its
  target) that has not moved toward it for more than ``stuck_after_s``
  virtual seconds of the call is declared inactive, left out of gamma's
  sums (the others are squeezed harder) and its target clipped to
  ``min(target, actual)`` within [dynamic_min, dynamic_max] (it may free
  memory later, never take more). It is active again when it is seen
  moving toward a target, or at the next call (each call starts from a
  fresh ``Squeezer``, as squeezed's does).

Defaults, all from the source: ``host_free_target_mib`` 9 (the 1 MiB low
memory emergency pool + 8 MiB ``extra_mem_to_keep``), ``inaccuracy_pages``
1 (4 KiB), ``stuck_after_s`` 5 (``assume_balloon_driver_stuck_after``),
``period_s`` 1, ``balance_check_s`` 10 (``squeezed.conf``), the 512 KiB
``free_memory_tolerance`` of the success test. Left out: reservations for
new domains and dom0 management.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from balloonlab.proto.schema import kib_to_pages, mib_to_pages

from ..errors import PolicyConfigError
from .decision import Decision, hold
from .policy import ControllerBase, Param, fraction, non_negative, parse_params
from .view import GuestView, HostView

__all__ = ["SqueezedBalloon", "Domain", "StucknessMonitor", "squeeze_gamma", "proportional_targets",
           "xen_free_pages", "min_freeable"]

_TOLERANCE_KIB = 512   # squeeze_xen.ml free_memory_tolerance_kib: "no need to be too exact"


@dataclass(frozen=True, slots=True)
class Domain:
    """One guest as squeezed sees it, in pages of memory (not balloon)."""

    domid: int
    dynamic_min: int
    dynamic_max: int
    target: int          # memory the host last asked for: ram - balloon target
    actual: int          # memory the guest holds: ram - balloon it reported

    @property
    def range(self) -> int:
        return max(0, self.dynamic_max - self.dynamic_min)


def direction(inaccuracy: int, actual: int, target: int) -> str | None:
    """``squeeze.ml: direction_of_actual``: "down" when the balloon must shrink (memory grow), "up" the other way."""
    delta = actual - target
    if abs(delta) <= inaccuracy:
        return None
    return "down" if target > actual else "up"


def min_freeable(d: Domain, inaccuracy: int) -> int:
    """The least that setting the target to dynamic_min is sure to free."""
    return max(0, d.actual - d.dynamic_min - 2 * inaccuracy)


def squeeze_gamma(surplus_pages: float, total_range_pages: float) -> float:
    """``surplus / sum(range)`` clamped to [0, 1]; 0/0 (NaN) gives 0 and x/0 gives 1, as OCaml's floats do."""
    if total_range_pages == 0:
        raw = math.nan if surplus_pages == 0 else math.copysign(math.inf, surplus_pages)
    else:
        raw = surplus_pages / total_range_pages
    if math.isnan(raw):
        return 0.0
    return min(max(raw, 0.0), 1.0)


def proportional_targets(domains: Sequence[Domain], free_pages: int, host_free_target_pages: int,
                         inaccuracy: int) -> tuple[dict[int, int], float, int]:
    """``Proportional.compute_target_adjustments``: targets (memory, pages), gamma and the surplus."""
    max_free = free_pages + sum(min_freeable(d, inaccuracy) for d in domains)
    surplus = max(0, max_free - host_free_target_pages)
    gamma = squeeze_gamma(surplus, sum(d.range for d in domains))
    return {d.domid: d.dynamic_min + int(gamma * d.range) for d in domains}, gamma, surplus


def xen_free_pages(view: HostView) -> int:
    """Host free memory as Xen counts it: every page a guest may use is taken, faulted in or not."""
    return view.total_frames - view.cache_pages - sum(g.ram_pages - g.actual_pages for g in view.guests)


class StucknessMonitor:
    """``squeeze.ml: Stuckness_monitor``, on virtual seconds."""

    def __init__(self, stuck_after_s: float, inaccuracy: int) -> None:
        self.stuck_after_s = stuck_after_s
        self.inaccuracy = inaccuracy
        self.last_actual: dict[int, int] = {}
        self.last_progress_s: dict[int, float] = {}
        self.stuck: dict[int, bool] = {}

    def update(self, domains: Sequence[Domain], now_s: float) -> None:
        for d in domains:
            if d.domid not in self.last_actual:   # a new domain is making progress now
                self.last_actual[d.domid] = d.actual
                self.last_progress_s[d.domid] = now_s
                self.stuck[d.domid] = False
            way = direction(self.inaccuracy, d.actual, d.target)
            moved = d.actual - self.last_actual[d.domid]
            self.last_actual[d.domid] = d.actual
            if (moved > 0 and way == "down") or (moved < 0 and way == "up"):
                self.last_progress_s[d.domid] = now_s
                self.stuck[d.domid] = False
            if way is not None and now_s - self.last_progress_s[d.domid] > self.stuck_after_s:
                self.stuck[d.domid] = True
        live = {d.domid for d in domains}
        for gone in set(self.last_actual) - live:
            del self.last_actual[gone], self.last_progress_s[gone], self.stuck[gone]

    def is_active(self, domid: int) -> bool:
        return domid in self.stuck and not self.stuck[domid]

    def idle_s(self, domid: int, now_s: float) -> float:
        return now_s - self.last_progress_s.get(domid, now_s)


class SqueezedBalloon(ControllerBase):
    name = "squeezed"

    def __init__(self, dynamic_min_fraction: float, dynamic_max_fraction: float, host_free_target_mib: float,
                 inaccuracy_pages: int, stuck_after_s: float, period_s: float, balance_check_s: float) -> None:
        self.dynamic_min_fraction = dynamic_min_fraction
        self.dynamic_max_fraction = dynamic_max_fraction
        self.host_free_target_pages = mib_to_pages(host_free_target_mib)
        self.inaccuracy = inaccuracy_pages
        self.tolerance_pages = kib_to_pages(_TOLERANCE_KIB)
        self.stuck_after_s = stuck_after_s
        self.period_s = period_s
        self.balance_check_s = balance_check_s
        self.monitor = StucknessMonitor(stuck_after_s, inaccuracy_pages)
        self.non_active: set[int] = set()
        self.in_call = False                     # inside one change_host_free_memory loop
        self.calls = 0
        self._next_s: float | None = None        # next iteration (every period_s within a call)
        self._next_check_s: float | None = None  # next balance check once a call is over

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SqueezedBalloon":
        p = parse_params(cls.name, params, {
            "dynamic_min_fraction": fraction("a domain's dynamic-min as a share of its RAM (XenServer: a quarter)",
                                             0.25),
            "dynamic_max_fraction": fraction("a domain's dynamic-max as a share of its RAM", 1.0),
            "host_free_target_mib": non_negative(float, "host memory squeezed keeps free: 1 MiB emergency pool + "
                                                        "8 MiB extra_mem_to_keep", 9.0),
            "inaccuracy_pages": non_negative(int, "a guest within this many pages of its target has reached it", 1),
            "stuck_after_s": non_negative(float, "a guest not moving toward its target for this long (virtual s) "
                                                 "is stuck", 5.0),
            "period_s": Param(float, 1.0, "iterations of a balancing call are this far apart (virtual s)", 0.0,
                              lo_open=True),
            "balance_check_s": non_negative(float, "how often a balancing call may start (virtual s)", 10.0)})
        if p["dynamic_min_fraction"] > p["dynamic_max_fraction"]:
            raise PolicyConfigError(f"balloon policy 'squeezed': dynamic_min_fraction {p['dynamic_min_fraction']} "
                                    f"is above dynamic_max_fraction {p['dynamic_max_fraction']}")
        return cls(**p)

    def domain(self, g: GuestView) -> Domain:
        floor = g.ram_pages - g.max_balloon_pages   # the host never lets a balloon past max_balloon_pages
        dmax = max(int(round(self.dynamic_max_fraction * g.ram_pages)), floor)
        dmin = min(max(int(round(self.dynamic_min_fraction * g.ram_pages)), floor), dmax)
        return Domain(g.guest_id, dmin, dmax, g.ram_pages - g.target_pages, g.ram_pages - g.actual_pages)

    def decide(self, view: HostView) -> dict[int, Decision] | None:
        now_s = view.vt_us / 1e6
        if not view.guests or (self._next_s is not None and now_s < self._next_s):
            return None
        if not self.in_call:
            if self._next_check_s is not None and now_s < self._next_check_s:
                return None
            # A balancing call starts from a fresh Squeezer: stuckness is judged within one call only.
            self.in_call = True
            self.calls += 1
            self.monitor = StucknessMonitor(self.stuck_after_s, self.inaccuracy)
            self.non_active = set()
        self._next_s = now_s + self.period_s
        guests = {g.guest_id: g for g in view.guests}
        domains = [self.domain(g) for g in view.guests]
        self.monitor.update(domains, now_s)
        active = [d for d in domains if self.monitor.is_active(d.domid)]
        non_active = {d.domid for d in domains} - {d.domid for d in active}
        declared_inactive = non_active - self.non_active
        self.non_active = non_active
        free = xen_free_pages(view)
        wanted, gamma, surplus = proportional_targets(active, free, self.host_free_target_pages, self.inaccuracy)
        freeing = {d.domid for d in active
                   if direction(self.inaccuracy, d.actual, wanted[d.domid]) is not None and wanted[d.domid] < d.actual}
        phase = "freeing" if freeing else "allocation"
        selected = freeing if freeing else {d.domid for d in active} - freeing
        # Squeezer.one_iteration: the call is over once every active guest has reached its target and no target
        # would change (success, or failure naming the stuck guests); the next check comes balance_check_s later.
        changes = any(wanted[d.domid] != d.target for d in active if d.domid in selected)
        reached = all(direction(self.inaccuracy, d.actual, d.target) is None for d in active)
        done = reached and not changes and not declared_inactive
        if done:
            self.in_call = False
            self._next_check_s = now_s + self.balance_check_s
        host = {"xen_free_pages": free, "host_free_target_pages": self.host_free_target_pages,
                "surplus_pages": surplus, "gamma": gamma, "active_guests": len(active),
                "total_range_pages": sum(d.range for d in active), "balancing_call": self.calls}
        out: dict[int, Decision] = {}
        for d in domains:
            g = guests[d.domid]
            inputs = {**host, "dynamic_min_pages": d.dynamic_min, "dynamic_max_pages": d.dynamic_max,
                      "memory_actual_pages": d.actual, "memory_target_pages": d.target,
                      "no_progress_s": self.monitor.idle_s(d.domid, now_s), "stuck_after_s": self.stuck_after_s}
            if d.domid in declared_inactive:
                # Allowed to free memory while nobody watches, never to take more (squeeze.ml, CA-41832).
                mem = min(d.dynamic_max, max(d.dynamic_min, min(d.target, d.actual)))
                out[d.domid] = Decision(g.ram_pages - mem, "stuck", (
                    f"no progress toward its target ({d.target} pages of memory, holds {d.actual}) for "
                    f"{self.monitor.idle_s(d.domid, now_s):.2f} s > {self.stuck_after_s:g} s: declared stuck, left "
                    f"out of the squeeze; its memory clipped to min(target, actual) = {mem} pages"), inputs)
                continue
            if d.domid in non_active:
                out[d.domid] = hold(g, "stuck_excluded", (
                    f"stuck in this balancing call (no progress for {self.monitor.idle_s(d.domid, now_s):.2f} s): "
                    f"excluded; gamma {gamma:.3f} over the {len(active)} active guest(s)"), **inputs)
                continue
            mem = wanted[d.domid]
            inputs["memory_wanted_pages"] = mem
            why = (f"gamma = surplus {surplus} / range {host['total_range_pages']} = {gamma:.3f} "
                   f"(Xen free {free}, host target {self.host_free_target_pages}): memory "
                   f"{d.dynamic_min} + {gamma:.3f} x {d.range} = {mem} pages")
            if done:
                result = ("host free within tolerance" if free - self.host_free_target_pages < self.tolerance_pages
                          else "cannot do better within the dynamic ranges")
                out[d.domid] = hold(g, "balanced", f"{why}; every target reached, none to change: balancing "
                                    f"call {self.calls} over ({result}), next check in {self.balance_check_s:g} s",
                                    **inputs)
            elif d.domid not in selected:
                out[d.domid] = hold(g, "waiting_for_freeing", f"{why}; it allocates, so it waits until the "
                                    f"{len(freeing)} freeing guest(s) have their targets", **inputs)
            elif mem == d.target:
                out[d.domid] = hold(g, "target_stands", f"{why}: its target already ({phase} phase; it holds "
                                    f"{d.actual})", **inputs)
            else:
                out[d.domid] = Decision(g.ram_pages - mem, f"{phase}_phase", f"{why}; {phase} phase", inputs)
        return out
