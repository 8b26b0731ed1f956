"""``working-set``: balloon only what lies outside each guest's working set, with PFF feedback.

For each guest the floor is ``working_set_pages * (1 + headroom) +
reserve_pages + kernel_pages`` (the kernel's own pages, if it reports
them, hold no workload; the working set is the host's sampled estimate,
``hostd.wss``, as ESX samples it -- the guest's own report only until the
host has one -- or, if larger, a recent estimate decayed by ``ws_decay``
per step): its memory (RAM - balloon target) is never set
below it, so the cap on its target is ``ram - floor`` (and
``max_balloon_pages``). Every ``period_ticks``:
- a target above the cap (the working set grew) is lowered to the cap at once;
- a guest whose ``pff`` stat exceeds ``pff_high`` backs off: its target
  drops by ``max_step_pages`` and it is not inflated this step;
- when the expected free frames (free + balloon pages still to come) are
  below ``free_target_fraction`` of host RAM, the deficit is spread over the
  other guests in proportion to their slack (cap - target), at most
  ``max_step_pages`` each. With ``backed_slack`` (the default) the slack
  leaves out the guest's gpfns the host never backed (RAM - balloon -
  resident): the balloon takes free frames first, and inflating one the
  host never backed frees nothing. So a guest whose slack is only such
  frames is left alone, and a guest that is inflated has its target raised
  by those frames plus its share (the step bounds what the host gains);
  balloon pages still to come count toward the expected free frames only
  beyond them;
- when they are above ``release_fraction`` of host RAM, balloons shrink by
  up to ``max_step_pages`` each, spread in proportion to their size, to
  give the surplus back.

``pff`` is the guest's page-fault frequency in faults per virtual second
(guestd's ``PffMeter``: major + minor faults, smoothed).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..errors import PolicyConfigError
from .decision import Decision
from .policy import ControllerBase, Param, clamp_target, fraction, is_due, non_negative, parse_params, period_ticks
from ..wss import STAT_HOST_WSS
from .view import STAT_PFF, STAT_WORKING_SET, GuestView, HostView

STAT_KERNEL = "kernel_pages"   # guestd reports the frames its kernel holds

__all__ = ["WorkingSetBalloon", "working_set_estimate"]


def working_set_estimate(g: GuestView) -> float:
    """The host's sampled estimate of the guest's working set, or the guest's own until the host has one."""
    host = g.stats.get(STAT_HOST_WSS)
    if isinstance(host, (int, float)) and not isinstance(host, bool):
        return float(host)
    return g.stat(STAT_WORKING_SET)


class WorkingSetBalloon(ControllerBase):
    name = "working-set"

    def __init__(self, free_target_fraction: float, release_fraction: float, headroom: float,
                 reserve_pages: int, max_step_pages: int, pff_high: float, period_ticks: int,
                 backed_slack: bool = True, ws_decay: float = 0.98) -> None:
        self.free_target_fraction = free_target_fraction
        self.release_fraction = release_fraction
        self.headroom = headroom
        self.reserve_pages = reserve_pages
        self.max_step_pages = max_step_pages
        self.pff_high = pff_high
        self.period_ticks = period_ticks
        self.backed_slack = backed_slack
        self.ws_decay = ws_decay
        self._ws: dict[int, float] = {}     # per guest: the working set the floor uses (see ``working_set``)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "WorkingSetBalloon":
        p = parse_params(cls.name, params, {
            "free_target_fraction": fraction("inflate when expected free frames fall below this share of host RAM",
                                             0.10),
            "release_fraction": fraction("deflate when expected free frames rise above this share of host RAM",
                                         0.20),
            "headroom": non_negative(float, "the floor's margin above the working set (share of it)", 0.10),
            "reserve_pages": non_negative(int, "pages added to every guest's floor", 256),
            "max_step_pages": Param(int, 1024, "largest change of one guest's target per step", 1.0),
            "pff_high": non_negative(float, "a guest faulting more often (faults per virtual s) backs off", 1000.0),
            "period_ticks": period_ticks(),
            "backed_slack": Param(bool, True, "leave gpfns the host never backed out of a guest's slack"),
            "ws_decay": fraction("per-step decay of the recent working-set estimate", 0.98)})
        if p["release_fraction"] < p["free_target_fraction"]:
            raise PolicyConfigError(
                f"balloon policy 'working-set': release_fraction {p['release_fraction']} is below "
                f"free_target_fraction {p['free_target_fraction']}")
        return cls(**p)

    def working_set(self, g: GuestView) -> float:
        """The guest's estimate, or a recent larger one decayed by ``ws_decay`` per call, whichever is larger.

        A sampled estimate counts the pages touched in a period of the
        guest's virtual time; a guest stalled by faults touches fewer, so
        its estimate drops just when it is short of memory. Remembering a
        recent larger estimate keeps the controller from taking more then.
        """
        ws = max(working_set_estimate(g), self._ws.get(g.guest_id, 0.0) * self.ws_decay)
        self._ws[g.guest_id] = ws
        return ws

    def cap_pages(self, g: GuestView, working_set_pages: float | None = None) -> int:
        """The largest target that leaves the guest its working set plus headroom."""
        ws = working_set_estimate(g) if working_set_pages is None else working_set_pages
        floor = (int(np.ceil(ws * (1.0 + self.headroom))) + self.reserve_pages
                 + int(g.stat(STAT_KERNEL)))
        return clamp_target(g, g.ram_pages - floor)

    def decide(self, view: HostView) -> dict[int, Decision] | None:
        if not view.guests or not is_due(view, self.period_ticks):
            return None
        guests = list(view.guests)
        ws = np.array([self.working_set(g) for g in guests], np.float64)
        cap = np.array([self.cap_pages(g, w) for g, w in zip(guests, ws)], np.int64)
        before = np.array([g.target_pages for g in guests], np.int64)
        target = np.minimum(before, cap)
        thrashing = np.array([g.stat(STAT_PFF) > self.pff_high for g in guests])
        target[thrashing] = np.maximum(target[thrashing] - self.max_step_pages, 0)

        # Guest frames the host never backed: a balloon takes free frames first, and these free nothing.
        # (The kernel's frames are never faulted in, but they are not free either.)
        unbacked = (np.array([max(0, g.ram_pages - g.actual_pages - g.resident_pages - int(g.stat(STAT_KERNEL)))
                              for g in guests], np.int64)
                    if self.backed_slack else np.zeros(len(guests), np.int64))
        owed = target - np.array([g.actual_pages for g in guests], np.int64)   # < 0: a deflation to come
        pending = np.where(owed > 0, np.maximum(owed - unbacked, 0), owed)
        expected_free = view.free_frames + int(pending.sum())
        low = self.free_target_fraction * view.total_frames
        high = self.release_fraction * view.total_frames
        slack = np.where(thrashing, 0, np.maximum(cap - target - unbacked, 0))
        add = np.zeros(len(guests), np.int64)
        give = np.zeros(len(guests), np.int64)
        if expected_free < low:
            add = _spread(int(np.ceil(low - expected_free)), slack, self.max_step_pages)
            # The step bounds what the host gains; the unbacked frames go along with it.
            target += np.where(add > 0, add + unbacked, 0)
        elif expected_free > high:
            give = _spread(int(expected_free - high), np.where(thrashing, 0, target), self.max_step_pages)
            target -= give
        final = np.minimum(target, cap)
        out: dict[int, Decision] = {}
        for i, g in enumerate(guests):
            inputs = {"working_set_pages": float(ws[i]), "ws_estimate_pages": working_set_estimate(g),
                      "guest_ws_estimate_pages": g.stat(STAT_WORKING_SET),
                      "cap_pages": int(cap[i]), "pff": g.stat(STAT_PFF), "pff_high": self.pff_high,
                      "free_frames": view.free_frames, "expected_free_frames": expected_free,
                      "goal_free_frames": low, "release_free_frames": high, "slack_pages": int(slack[i]),
                      "unbacked_pages": int(unbacked[i]), "added_pages": int(add[i]), "given_back_pages": int(give[i])}
            code, why = self._why(i, g, before, cap, thrashing, add, give, slack, unbacked, ws, expected_free,
                                  low, high)
            out[g.guest_id] = Decision(clamp_target(g, int(final[i])), code, why, inputs)
        return out

    def _why(self, i: int, g: GuestView, before: np.ndarray, cap: np.ndarray, thrashing: np.ndarray,
             add: np.ndarray, give: np.ndarray, slack: np.ndarray, unbacked: np.ndarray, ws: np.ndarray,
             expected_free: int, low: float, high: float) -> tuple[str, str]:
        """The reason code and sentence for guest ``i``: the first rule that decided its target."""
        host = f"host expects {expected_free} free frames (goal {low:.0f}, release level {high:.0f})"
        floor = f"working set {ws[i]:.0f} pages + {self.headroom:g} headroom + reserve leaves a cap of {cap[i]}"
        if thrashing[i]:
            lowered = f", target lowered by up to {self.max_step_pages} pages" if before[i] > 0 else ""
            return "pff_above_high", (f"PFF {g.stat(STAT_PFF):.0f}/s above pff_high {self.pff_high:g}/s: "
                                      f"not inflated{lowered}; {host}")
        if cap[i] < before[i]:
            return "working_set_grew", f"{floor} pages, below the target {before[i]}: lowered to the cap"
        if add[i] > 0:
            return "host_short", (f"{host}: inflated by {add[i]} pages of its slack {slack[i]}"
                                  + (f" (+{unbacked[i]} never-backed pages)" if unbacked[i] else "") + f"; {floor}")
        if expected_free < low:
            if slack[i] <= 0 and unbacked[i] > 0 and cap[i] > before[i]:
                return "slack_unbacked", (f"{host}: its slack is only the {unbacked[i]} pages the host never "
                                          f"backed; inflating them frees nothing")
            if slack[i] <= 0:
                return "no_slack", f"{host}: no slack, {floor} pages and the target is {before[i]}"
            return "host_short_others", f"{host}: the deficit went to other guests' slack first"
        if give[i] > 0:
            return "host_surplus", f"{host}: balloon shrinks by {give[i]} pages"
        if expected_free > high:
            return "host_surplus_empty", f"{host}: nothing to give back, the balloon is {before[i]} pages"
        return "within_band", host

def _spread(amount: int, weight: np.ndarray, max_each: int) -> np.ndarray:
    """Split ``amount`` in proportion to ``weight``, each share at most its weight and ``max_each``."""
    total = int(weight.sum())
    if amount <= 0 or total <= 0:
        return np.zeros_like(weight)
    share = np.ceil(weight * (min(amount, total) / total)).astype(np.int64)
    return np.minimum(np.minimum(share, weight), max_each)
