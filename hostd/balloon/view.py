"""What a balloon controller sees each tick: host gauges and one record per guest.

Page counts are 4 KiB pages. ``stats`` is the guest's latest report, as the
guest sent it (keys below; values in pages unless named otherwise); a key
the guest never reported is simply missing, and policies read it through
``GuestView.stat`` with a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["GuestView", "HostView",
           "STAT_FREE", "STAT_AVAILABLE", "STAT_CACHES", "STAT_WORKING_SET", "STAT_PFF",
           "STAT_MAJOR_FAULTS", "STAT_SWAP_IN", "STAT_SWAP_OUT", "STAT_REFS"]

STAT_FREE = "free"                       # pages free in the guest
STAT_AVAILABLE = "available"             # free + easily reclaimable
STAT_CACHES = "caches"                   # page-cache pages
STAT_WORKING_SET = "working_set_pages"   # the guest's working-set estimate
STAT_PFF = "pff"                         # page faults per virtual second (smoothed)
STAT_MAJOR_FAULTS = "major_faults"
STAT_SWAP_IN = "swap_in"
STAT_SWAP_OUT = "swap_out"
STAT_REFS = "refs"


@dataclass(frozen=True, slots=True)
class GuestView:
    guest_id: int
    ram_pages: int              # the guest's configured RAM
    max_balloon_pages: int      # targets are clamped to [0, this]
    target_pages: int           # balloon target the host last set
    actual_pages: int           # balloon size the guest last reported
    resident_pages: int         # guest pages backed by a host frame now (its own, or shared copy-on-write)
    stats: Mapping[str, float] = field(default_factory=dict)
    shares: int = 1000

    def stat(self, key: str, default: float = 0.0) -> float:
        value = self.stats.get(key, default)
        return float(value) if value is not None else default


@dataclass(frozen=True, slots=True)
class HostView:
    tick: int
    vt_us: float
    total_frames: int
    free_frames: int
    cache_pages: int
    iobuf_pages: int
    guests: Sequence[GuestView]
    memory_state: str | None = None   # the host's ESX memory state this tick (hostd.memstate); None: no states
    min_free_frames: int = 0          # ESX's minFree for this host (0: no states)

    @property
    def pending_pages(self) -> int:
        """Frames still to come from (positive) or go to (negative) balloons already asked for."""
        return sum(g.target_pages - g.actual_pages for g in self.guests)

    @property
    def expected_free_frames(self) -> int:
        """Free frames once every guest has reached its current target.

        An approximation: inflating a page the host never backed frees nothing.
        Using it keeps a policy from asking twice for the same deficit while
        the guests catch up.
        """
        return self.free_frames + self.pending_pages

    @property
    def may_inflate(self) -> bool:
        """Does the host's memory state let a controller that follows it inflate (soft and worse)?

        True without states. Only controllers that follow the host's states
        ask (``proportional``, the ESX one); the others keep their own schedule.
        """
        from ..memstate import MemState, may_balloon
        return self.memory_state is None or may_balloon(MemState[self.memory_state.upper()])

    def current_targets(self) -> dict[int, int]:
        """The targets as they stand, clamped to ``[0, max_balloon_pages]``."""
        return {g.guest_id: min(max(g.target_pages, 0), g.max_balloon_pages) for g in self.guests}
