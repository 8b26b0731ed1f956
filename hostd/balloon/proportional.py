"""``proportional``: ESX share-based allocation with an idle-memory tax.

Waldspurger (OSDI 2002): a guest's shares-per-page ratio is

    rho = S / (P * (f + k * (1 - f))),   k = 1 / (1 - tau)

with S its shares, P the pages it holds (here: its resident host frames,
minus balloon pages it still owes), f its active fraction (working-set
estimate / P, clipped to [0, 1]; the estimate is the host's own sample of
the guest's accessed bits, ``hostd.wss``, as ESX measures idle memory --
the guest's report only until the host has one) and tau the tax rate (0.75 by
default: an idle page costs k = 4 times an active one).

The rule, applied every ``period_ticks``:
- When the expected free frames (free + balloon pages still to come) are
  below ``free_target_fraction`` of host RAM, the deficit is taken from the
  guest with the lowest rho first, in chunks of 1/32 of the deficit; after
  each chunk that guest's P drops and its rho is recomputed, so the
  reclaim spreads once rhos meet. A guest at its maximum balloon is skipped.
- When they are above ``release_fraction`` of host RAM, the surplus is
  given back the other way: the guest with the highest rho (most shares
  per page: it deserves memory most) is deflated first, among the guests
  that demand memory (below; ``release_needs_demand = false``: any guest).
  A guest that does not use what its balloon already leaves it never backs
  the pages given back, so the host's free memory would not fall and the
  same surplus would be given again at every step, draining its balloon
  into memory it does not touch (Figure 7's idle VM lost its whole balloon
  that way, one step at a time, and its target never settled).
- Otherwise (free memory within the band) memory is **revoked on demand**,
  as min-funding revocation does when a VM asks for memory: a guest that
  demands memory (its balloon is not empty, its working set fills at
  least ``demand_fraction`` of the memory its balloon leaves it, and it
  pages: its ``pff`` is at least ``demand_pff`` faults per virtual second,
  1000 as the working-set controller's ``pff_high``) and whose
  rho exceeds the lowest rho of the others by more than
  ``revoke_hysteresis`` gets memory from that guest: the donor's balloon
  grows and the demander's shrinks by the same amount (expected free frames
  unchanged), chunk by chunk with rhos recomputed, until the rhos meet
  within the hysteresis. Without it the controller moved memory only when
  the host was short or had a surplus, so once free memory sat in the band
  a thrashing guest kept the balloon it was given while its neighbour idled
  (Figure 7's active VM gained 9.6 % at a 75 % tax). The demand test reads
  the working set against ``RAM - balloon target``, so pages just given
  back and not yet touched lower it: no more is revoked for a guest until
  it has used what it got. ``revoke_on_demand = false`` turns it off.
- ``max_step_pages`` (0 = no limit) bounds each guest's change per step.

With the host's ESX memory states (``hostd.memstate``, ``[host]
memory_states = "esx"``, the default) it inflates only in the soft state
and worse, as ESX balloons only from soft on: in high and clear a deficit
is held (``state_no_inflate``), and so is revocation on demand (it
inflates the donor); giving back a surplus is not gated.

Parameters (``[balloon.params]``, defaults): ``tax_rate`` 0.75,
``free_target_fraction`` 0.06, ``release_fraction`` 0.12,
``max_step_pages`` 0, ``period_ticks`` 1, ``revoke_on_demand`` true,
``demand_fraction`` 0.8, ``demand_pff`` 1000, ``revoke_hysteresis`` 0.1,
``release_needs_demand`` true.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..errors import PolicyConfigError
from .decision import Decision
from .policy import ControllerBase, Param, clamp_target, fraction, is_due, non_negative, parse_params, period_ticks
from .view import HostView
from ..wss import STAT_HOST_WSS
from .view import STAT_PFF, STAT_WORKING_SET
from .working_set import working_set_estimate

__all__ = ["ProportionalBalloon", "shares_per_page"]

_CHUNKS = 32


def shares_per_page(shares: np.ndarray, pages: np.ndarray, active_fraction: np.ndarray,
                    tax_rate: float) -> np.ndarray:
    """Waldspurger's rho; a guest holding no pages has rho = inf (nothing to take)."""
    k = 1.0 / (1.0 - tax_rate)
    f = np.clip(active_fraction, 0.0, 1.0)
    cost = pages * (f + k * (1.0 - f))
    with np.errstate(divide="ignore"):
        return np.where(pages > 0, shares / np.maximum(cost, 1e-300), np.inf)


class ProportionalBalloon(ControllerBase):
    name = "proportional"

    def __init__(self, tax_rate: float, free_target_fraction: float, release_fraction: float,
                 max_step_pages: int, period_ticks: int, revoke_on_demand: bool = True,
                 demand_fraction: float = 0.8, revoke_hysteresis: float = 0.1,
                 release_needs_demand: bool = True, demand_pff: float = 1000.0) -> None:
        self.tax_rate = tax_rate
        self.demand_pff = demand_pff
        self.release_needs_demand = release_needs_demand
        self.revoke_on_demand = revoke_on_demand
        self.demand_fraction = demand_fraction
        self.revoke_hysteresis = revoke_hysteresis
        self.free_target_fraction = free_target_fraction
        self.release_fraction = release_fraction
        self.max_step_pages = max_step_pages
        self.period_ticks = period_ticks

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ProportionalBalloon":
        p = parse_params(cls.name, params, {
            "tax_rate": fraction("idle-memory tax: an idle page costs 1 / (1 - tax_rate) active ones", 0.75,
                                 below_one=True),
            "free_target_fraction": fraction("reclaim when expected free frames fall below this share of host "
                                             "RAM", 0.06),
            "release_fraction": fraction("give back when expected free frames rise above this share of host "
                                         "RAM", 0.12),
            "max_step_pages": non_negative(int, "largest change of one guest's target per step; 0 = no limit", 0),
            "period_ticks": period_ticks(),
            "revoke_on_demand": Param(bool, True, "within the band, move memory from the lowest shares per page "
                                                  "to a guest that demands it"),
            "demand_fraction": fraction("a guest demands memory when its working set fills this share of what "
                                        "its balloon leaves it", 0.8),
            "revoke_hysteresis": non_negative(float, "revoke only while shares per page differ by more than this "
                                                     "share", 0.1),
            "release_needs_demand": Param(bool, True, "give a surplus back only to guests that demand memory"),
            "demand_pff": non_negative(float, "demand also needs this page-fault frequency (faults per virtual s)",
                                       1000.0)})
        if p["release_fraction"] < p["free_target_fraction"]:
            raise PolicyConfigError(
                f"balloon policy 'proportional': release_fraction {p['release_fraction']} is below "
                f"free_target_fraction {p['free_target_fraction']}")
        return cls(**p)

    def decide(self, view: HostView) -> dict[int, Decision] | None:
        if not view.guests or not is_due(view, self.period_ticks):
            return None
        expected_free = view.expected_free_frames
        low = self.free_target_fraction * view.total_frames
        high = self.release_fraction * view.total_frames
        host = {"free_frames": view.free_frames, "expected_free_frames": expected_free, "goal_free_frames": low,
                "release_free_frames": high}
        if low <= expected_free <= high:
            if self.revoke_on_demand and view.may_inflate:
                revoked = self._revoke(view, host)
                if revoked is not None:
                    return revoked
            why = (f"host expects {expected_free} free frames, between its goal {low:.0f} and its release "
                   f"level {high:.0f}: nothing to move")
            return {g.guest_id: Decision(g.target_pages, "within_band", why, host) for g in view.guests}
        inflate = expected_free < low
        if inflate and not view.may_inflate:
            why = (f"host expects {expected_free} free frames, below its goal {low:.0f}, but the host's memory "
                   f"state is {view.memory_state} ({view.free_frames} free, minFree {view.min_free_frames}): "
                   f"the ESX controller inflates from the soft state on")
            return {g.guest_id: Decision(g.target_pages, "state_no_inflate", why,
                                         {**host, "min_free_frames": view.min_free_frames}) for g in view.guests}
        amount = int(np.ceil(low - expected_free)) if inflate else int(expected_free - high)
        target, rho, active = self._move(view, amount, inflate=inflate)
        out: dict[int, Decision] = {}
        for i, g in enumerate(view.guests):
            t = clamp_target(g, int(target[i]))
            inputs = {**host, "amount_pages": amount, "shares_per_page": float(rho[i]),
                      "active_fraction": float(active[i]), "shares": g.shares}
            if inflate:
                what = (f"host short by {amount} frames (expects {expected_free} free, goal {low:.0f}): "
                        f"taken from the guests with the fewest shares per page first (this guest: "
                        f"{rho[i]:.3g}, active fraction {active[i]:.2f})")
                code = ("host_short_taken" if t > g.target_pages else
                        "at_max_balloon" if g.target_pages >= g.max_balloon_pages else "host_short_others_first")
            else:
                what = (f"host has {amount} frames to spare (expects {expected_free} free, release level "
                        f"{high:.0f}): given back to the guests with the most shares per page first (this "
                        f"guest: {rho[i]:.3g})")
                code = ("host_surplus_given" if t < g.target_pages else
                        "balloon_empty" if g.target_pages <= 0 else "host_surplus_others_first")
            out[g.guest_id] = Decision(t, code, what, inputs)
        return out

    def _state(self, view: HostView) -> tuple[list[Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Guests, targets, pages held (P, net of balloon changes still to come), working sets, shares, limits."""
        guests = list(view.guests)
        target = np.array([g.target_pages for g in guests], np.int64)
        owed = np.maximum(target - np.array([g.actual_pages for g in guests], np.int64), 0)
        pages = np.maximum(np.array([g.resident_pages for g in guests], np.float64) - owed, 0.0)
        ws = np.array([working_set_estimate(g) for g in guests], np.float64)
        shares = np.array([g.shares for g in guests], np.float64)
        limit = np.array([g.max_balloon_pages for g in guests], np.int64)
        return guests, target, pages, ws, shares, limit

    def _wants(self, guests: list[Any], ws: np.ndarray, ram: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Which guests demand memory: the working set fills >= ``demand_fraction`` of what the balloon leaves
        and the guest faults at least ``demand_pff`` times per virtual second (its ``pff`` stat).

        A guest with no working-set estimate at all (neither the host's nor its own), or no ``pff``, counts
        as demanding on that count: nothing says it would not use the memory.
        """
        known = np.array([STAT_HOST_WSS in g.stats or STAT_WORKING_SET in g.stats for g in guests], bool)
        fills = ~known | (ws >= self.demand_fraction * np.maximum(ram - target, 1.0))
        # ... and it pages: a guest whose pages all fit faults little, whatever the sampled estimate's noise
        # says (with the tax, a few % of noise in the active fraction moves rho by three times as much).
        pff = np.array([g.stat(STAT_PFF, np.inf) if STAT_PFF in g.stats else np.inf for g in guests], np.float64)
        return fills & (pff >= self.demand_pff)

    def _revoke(self, view: HostView, host: Mapping[str, Any]) -> dict[int, Decision] | None:
        """Min-funding revocation on demand: move memory from the lowest rho to a demanding guest with a higher one.

        None when no guest demands memory or the rhos already meet within the hysteresis.
        """
        guests, target, pages, ws, shares, limit = self._state(view)
        ram = np.array([g.ram_pages for g in guests], np.float64)
        usable = np.maximum(ram - target, 1.0)
        demands = (target > 0) & self._wants(guests, ws, ram, target)
        if not demands.any() or len(guests) < 2:
            return None
        active = np.divide(ws, pages, out=np.ones_like(pages), where=pages > 0)
        rho0, active0 = shares_per_page(shares, pages, active, self.tax_rate), active.copy()
        step = np.full(len(guests), self.max_step_pages or np.iinfo(np.int64).max, np.int64)
        moved = np.zeros(len(guests), np.int64)
        start = target.copy()
        chunk = max(1, int(min(ram.min(), float(view.total_frames))) // 256)
        while True:
            rho = shares_per_page(shares, pages, active, self.tax_rate)
            # Demand is re-read as the balloon shrinks: a guest gets no more than its working set asks for.
            wants = (target > 0) & self._wants(guests, ws, ram, target)
            give = np.where(wants & (moved < step), rho, -np.inf)
            r = int(np.argmax(give))
            if give[r] == -np.inf:
                break
            take = np.where((np.arange(len(guests)) != r) & (limit - target > 0) & (moved < step)
                            & np.isfinite(rho), rho, np.inf)
            d = int(np.argmin(take))
            if not np.isfinite(take[d]) or rho[r] <= take[d] * (1.0 + self.revoke_hysteresis):
                break
            n = int(min(chunk, target[r], limit[d] - target[d], step[r] - moved[r], step[d] - moved[d]))
            for i, sign in ((d, 1), (r, -1)):
                # As in _move: the active pages stay put, only the idle part of P changes.
                active_pages = active[i] * pages[i]
                target[i] += sign * n
                pages[i] = max(pages[i] - sign * n, 0.0)
                active[i] = min(active_pages / pages[i], 1.0) if pages[i] > 0 else 1.0
                moved[i] += n
        if not moved.any():
            return None
        out: dict[int, Decision] = {}
        for i, g in enumerate(guests):
            t = clamp_target(g, int(target[i]))
            inputs = {**host, "amount_pages": int(moved.max()), "shares_per_page": float(rho0[i]),
                      "active_fraction": float(active0[i]), "shares": g.shares, "demands": bool(demands[i])}
            if t > start[i]:
                code, what = "revoked_for_demand", (
                    f"free memory within the band; a guest with more shares per page demands memory: "
                    f"{t - start[i]} pages revoked from this guest (fewest shares per page: {rho0[i]:.3g}, "
                    f"active fraction {active0[i]:.2f})")
            elif t < start[i]:
                code, what = "given_on_demand", (
                    f"this guest demands memory (working set {ws[i]:.0f} of {usable[i]:.0f} pages its balloon "
                    f"leaves it) and has the most shares per page ({rho0[i]:.3g}): {start[i] - t} pages given back, "
                    f"revoked from the guest with the fewest")
            else:
                code, what = "within_band", "free memory within the band; this guest neither gives nor gets"
            out[g.guest_id] = Decision(t, code, what, inputs)
        return out

    def _move(self, view: HostView, amount: int, *, inflate: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """New targets, and each guest's shares per page and active fraction before the move."""
        guests, target, pages, ws, shares, limit = self._state(view)
        ram = np.array([g.ram_pages for g in guests], np.float64)
        active = np.divide(ws, pages, out=np.ones_like(pages), where=pages > 0)
        step = np.full(len(guests), self.max_step_pages or np.iinfo(np.int64).max, np.int64)
        moved = np.zeros(len(guests), np.int64)
        rho0, active0 = shares_per_page(shares, pages, active, self.tax_rate), active.copy()
        chunk = max(1, -(-amount // _CHUNKS))
        left = amount
        while left > 0:
            if inflate:
                room = np.minimum(limit - target, step - moved)
            else:
                room = np.minimum(target, step - moved)
                if self.release_needs_demand:
                    room = np.where(self._wants(guests, ws, ram, target), room, 0)
            rho = shares_per_page(shares, pages, active, self.tax_rate)
            if inflate:
                rho = np.where((room > 0) & np.isfinite(rho), rho, np.inf)
                i = int(np.argmin(rho))
                if not np.isfinite(rho[i]):
                    break
            else:
                rho = np.where(room > 0, rho, -np.inf)
                i = int(np.argmax(rho))
                if rho[i] == -np.inf:
                    break
            take = int(min(chunk, left, room[i]))
            # Active pages stay put as P changes: only the idle part shrinks or grows.
            active_pages = active[i] * pages[i]
            sign = 1 if inflate else -1
            target[i] += sign * take
            pages[i] = max(pages[i] - sign * take, 0.0)
            active[i] = min(active_pages / pages[i], 1.0) if pages[i] > 0 else 1.0
            moved[i] += take
            left -= take
        return target, rho0, active0
