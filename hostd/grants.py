"""How the free frames are split into per-guest grants at a tick boundary (the deterministic discipline).

At each tick start every running guest gets a grant: actual free frames
moved to its private free list (``FramePool.grant``), which its requests
take from during the tick. The split is a deterministic function of the
boundary's state, in guest-id order:

1. guests with a request held across the boundary first get what that
   request still needs (as far as the free frames go);
2. the rest is split by weights: an exponentially weighted moving average
   of the frames each guest took from its grant per tick, plus 1 so that a
   guest idle so far still gets some; floor of each share, and the frames
   the floors leave over go one each to the heaviest guests (ties by id);
3. a guest the host wants to grow no further (``floor_only``: the memory
   states' "above its allocation target in soft/hard/low"; none by
   default) gets at most ``FLOOR_PAGES``.

Every free frame is handed out (the global stack is empty during a tick):
frames left unused come back at the next refill round or boundary, so
nothing is lost by over-granting, and a guest that needs more than its
share holds until a refill round rather than reaching into another's.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

__all__ = ["GrantPlanner", "DEMAND_EWMA_ALPHA", "FLOOR_PAGES"]

DEMAND_EWMA_ALPHA = 0.5
"""Weight of the last tick's demand: a guest's burst is followed within a few ticks."""

FLOOR_PAGES = 16
"""The grant of a guest that must reclaim from itself to grow (one cluster's worth)."""


class GrantPlanner:
    """Remembers each guest's demand and sizes the next grants (see the module docstring)."""

    def __init__(self, floor_only: Callable[[int], bool] | None = None) -> None:
        self.demand_ewma: dict[int, float] = {}
        self.floor_only = floor_only or (lambda gid: False)

    def record_demand(self, taken: Mapping[int, int]) -> None:
        """Frames each guest took from its grant(s) in the tick that ended."""
        a = DEMAND_EWMA_ALPHA
        for gid, n in sorted(taken.items()):
            self.demand_ewma[gid] = (1 - a) * self.demand_ewma.get(gid, 0.0) + a * float(n)

    def forget(self, guest_id: int) -> None:
        self.demand_ewma.pop(guest_id, None)

    def weight(self, guest_id: int) -> float:
        return self.demand_ewma.get(guest_id, 0.0) + 1.0

    def plan(self, free_frames: int, guest_ids: Iterable[int], held_need: Mapping[int, int]) -> dict[int, int]:
        """Frames to grant each of ``guest_ids`` out of ``free_frames``."""
        gids = sorted(set(guest_ids))
        left = int(free_frames)
        out = {gid: 0 for gid in gids}
        for gid in gids:                       # 1. held requests' unmet need, in guest-id order
            need = int(held_need.get(gid, 0))
            if need > 0 and left > 0:
                out[gid] = min(need, left)
                left -= out[gid]
        if left <= 0 or not gids:
            return out
        capped = [g for g in gids if self.floor_only(g)]
        for gid in capped:                     # 3. no growth: a floor only
            extra = max(0, min(FLOOR_PAGES - out[gid], left))
            out[gid] += extra
            left -= extra
        free_gids = [g for g in gids if g not in capped]
        if not free_gids or left <= 0:
            return out
        weights = {g: self.weight(g) for g in free_gids}   # 2. the rest by weight
        total = sum(weights.values())
        shares = {g: int(left * weights[g] / total) for g in free_gids}
        spare = left - sum(shares.values())
        for g in sorted(free_gids, key=lambda g: (-weights[g], g))[:spare]:
            shares[g] += 1
        for g in free_gids:
            out[g] += shares[g]
        return out
