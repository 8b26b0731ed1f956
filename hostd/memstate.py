"""The host's memory states (ESX) and the per-VM allocation targets they act on.

ESX does not reclaim by a fixed watermark. It compares free machine memory
with ``minFree`` and puts the host in one of five states; each state turns
on more reclamation. Sources:

- minFree: the vSphere 6 resource management guide, "Memory Reclamation"
  (``Mem.MemMinFreePct``, 0 = the sliding scale): 6 % of the first 4 GiB
  of host memory, 4 % of the next 8 GiB (to 12), 2 % of the next 16 GiB
  (to 28), 1 % of the rest: a 28 GiB host has minFree = 901 MiB (the
  guides quote 899 MB, each band rounded down), a 192 MiB lab host 11.5
  MiB (6 %). ``[host] min_free_pct`` sets minFree to a flat share of host
  RAM instead (``Mem.MemMinFreePct`` set by hand).
- The states, as a share of minFree (vSphere 6.0 on; D. Epping, "VMware
  vSphere 6.0 memory states", Yellow Bricks, 2015): high >= 100 % (vSphere
  also marks 400 %, below which it starts breaking large pages; there are
  no large pages here, so 400 % is only reported as a threshold), clear
  < 100 % (page sharing), soft < 64 % (ballooning), hard < 32 % (compression
  and host swapping), low < 16 % (swapping, and blocking: "ESX may block
  certain VMs from allocating memory in this state").
- What reclaims from whom: Waldspurger, "Memory Resource Management in
  VMware ESX Server", OSDI 2002, section 6 (allocation targets from shares
  and the idle-memory tax; the balloon is tried first, the host swaps from
  the VMs when ballooning is not enough or fast enough, choosing victim
  pages within a VM at random, section 3.2).

``RECLAIM_BY_STATE`` below is the one table of which mechanism runs in which
state; ``may_balloon``, ``may_host_swap`` and ``blocks`` are how the rest of
the host asks it. The state is computed at tick boundaries from the pool's
free frames (all grants returned), so it is a deterministic function of the
run; ``MemoryStates`` logs every transition (``memory_state_changed``).

Allocation targets: each controller decision may give the host frames a VM
may consume (``Decision.alloc_target_pages``); a balloon-only controller
gives none, and the host derives it as
``consumed - (balloon_target - balloon_actual)``: what the VM will consume
once its balloon has reached its target. ``plan_boundary_swap`` splits what
host swapping must free at a boundary among the VMs, furthest above their
targets first.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import structlog

from balloonlab.proto import events as ev

__all__ = ["MemState", "Reclaim", "RECLAIM_BY_STATE", "STATE_PCT_OF_MIN_FREE", "HIGH_BREAK_LARGE_PAGES_PCT",
           "MEMORY_STATES_MODES", "VICTIM_SCOPES", "VmAllocation", "MemoryStates", "min_free_pages",
           "state_of", "thresholds_pages", "may_balloon", "may_compress", "may_share", "may_host_swap", "blocks", "plan_boundary_swap",
           "derived_alloc_target", "self_swap_allowed", "grant_floor_only"]

log = structlog.get_logger("hostd.memstate")

MEMORY_STATES_MODES = ("esx", "none")
"""``[host] memory_states``: "esx" (this module) or "none" (no states: reclaim by the low watermark only)."""

VICTIM_SCOPES = ("vm", "global")
"""``[host] victim_scope``: boundary host swapping picks per VM (ESX) or blind over the whole host."""


class MemState(enum.IntEnum):
    """Ordered by pressure: a larger value is a worse state."""

    HIGH = 0
    CLEAR = 1
    SOFT = 2
    HARD = 3
    LOW = 4

    @property
    def label(self) -> str:
        return self.name.lower()


# Each state but high begins when free memory falls below this share of minFree (vSphere 6
# resource management guide); high is free >= 100 % of minFree.
STATE_PCT_OF_MIN_FREE: Mapping[MemState, float] = {
    MemState.CLEAR: 100.0, MemState.SOFT: 64.0, MemState.HARD: 32.0, MemState.LOW: 16.0}
HIGH_BREAK_LARGE_PAGES_PCT = 400.0   # vSphere 6: below this, large pages are broken up (none modelled here)


@dataclass(frozen=True, slots=True)
class Reclaim:
    """Which mechanisms run in a state (True: this lab runs it; see ``RECLAIM_BY_STATE``)."""

    sharing: bool        # page sharing (TPS, hostd.sharing), when the scenario turns it on
    balloon: bool        # the ESX controller (proportional) inflates
    host_swap: bool      # the host swaps guest pages (boundary reclaim; a guest's self-reclaim mid-tick)
    compress: bool       # pages on their way to host swap are zero-checked and compressed (hostd.compress)
    block: bool          # a VM above its allocation target may be held until the boundary reclaims


# The one table. Page sharing runs in every state: ESX scans and shares whatever the state (large
# pages are broken up for it below the 400 % mark; with no large pages here that distinction goes),
# and KSM runs whenever it is on. ESX (vSphere 6) runs compression from hard, with swapping:
# compression is a step on ESX's swap path (a page about to be swapped is compressed instead when it
# fits in 2 KiB), so here it runs wherever the host swaps -- the boundary reclaim in hard and low, and a
# guest's self-reclaim mid-tick, which ``may_self_swap`` allows from clear (that guest's own partition is
# out of memory). Each runs only when the scenario turns it on (``[host] page_sharing``,
# ``compression`` / ``zero_page_detection``).
# Ballooning keeps going in hard and low: the controller's targets stand and the guests keep
# inflating towards them (Epping notes vSphere 6 stops asking the balloon in hard; we keep the
# balloon, because the targets are also what host swapping is steered by).
RECLAIM_BY_STATE: Mapping[MemState, Reclaim] = {
    MemState.HIGH:  Reclaim(sharing=True,  balloon=False, host_swap=False, compress=False, block=False),
    MemState.CLEAR: Reclaim(sharing=True,  balloon=False, host_swap=False, compress=False, block=False),
    MemState.SOFT:  Reclaim(sharing=True,  balloon=True,  host_swap=False, compress=False, block=False),
    MemState.HARD:  Reclaim(sharing=True,  balloon=True,  host_swap=True,  compress=True,  block=False),
    MemState.LOW:   Reclaim(sharing=True,  balloon=True,  host_swap=True,  compress=True,  block=True),
}

_GIB_BYTES = 1 << 30
# (size of the band in GiB, percent of it): the sliding scale of Mem.MemMinFreePct.
_MIN_FREE_SCALE: Sequence[tuple[float, float]] = ((4, 6.0), (8, 4.0), (16, 2.0), (float("inf"), 1.0))


def min_free_pages(total_pages: int, min_free_pct: float | None = None, page_bytes: int = 4096) -> int:
    """ESX's minFree for a host of ``total_pages``; ``min_free_pct`` replaces the sliding scale."""
    if total_pages <= 0:
        raise ValueError(f"total_pages must be > 0, got {total_pages}")
    if min_free_pct is not None:
        return max(1, int(round(total_pages * min_free_pct / 100.0)))
    left = total_pages
    out = 0.0
    for band_gib, pct in _MIN_FREE_SCALE:
        band = min(left, band_gib * _GIB_BYTES / page_bytes)
        out += band * pct / 100.0
        left -= band
        if left <= 0:
            break
    return max(1, int(round(out)))


def thresholds_pages(min_free: int) -> dict[str, int]:
    """Per state but high: the host is in that state (or a worse one) when free frames are below this."""
    out = {s.label: int(np.ceil(min_free * pct / 100.0)) for s, pct in STATE_PCT_OF_MIN_FREE.items()}
    out["high_break_large_pages"] = int(np.ceil(min_free * HIGH_BREAK_LARGE_PAGES_PCT / 100.0))
    return out


def state_of(free_frames: int, min_free: int) -> MemState:
    """The state for ``free_frames`` free (high >= 100 % of minFree, clear < 100, soft < 64, hard < 32, low < 16)."""
    pct = 100.0 * free_frames / min_free
    state = MemState.HIGH
    for s, below in STATE_PCT_OF_MIN_FREE.items():
        if pct < below:
            state = s
    return state


def may_balloon(state: MemState) -> bool:
    """Does the ESX controller inflate balloons in ``state``? (soft and worse)"""
    return RECLAIM_BY_STATE[state].balloon


def may_compress(state: MemState) -> bool:
    """Are pages on their way to host swap compressed (and zero-checked) in ``state``? (hard and low)"""
    return RECLAIM_BY_STATE[state].compress


def may_share(state: MemState) -> bool:
    """Does page sharing scan and merge in ``state``? (every state, when sharing is on)"""
    return RECLAIM_BY_STATE[state].sharing


def may_host_swap(state: MemState) -> bool:
    """May the host swap guest pages in ``state``? (hard and low)"""
    return RECLAIM_BY_STATE[state].host_swap


@dataclass(frozen=True, slots=True)
class VmAllocation:
    """One VM against its allocation target: host frames it consumes and frames it may consume."""

    guest_id: int
    consumed_pages: int
    alloc_target_pages: int

    @property
    def excess_pages(self) -> int:
        """How far above its target (negative: below)."""
        return self.consumed_pages - self.alloc_target_pages

    @property
    def above_target(self) -> bool:
        return self.consumed_pages > self.alloc_target_pages


def blocks(state: MemState, guest: VmAllocation) -> bool:
    """Does an allocation of ``guest`` wait for the boundary (ESX's blocking)?

    Only in the low state, and only a VM above its allocation target: the
    others may still take what is free (ESX blocks "certain VMs").
    """
    return RECLAIM_BY_STATE[state].block and guest.above_target


def derived_alloc_target(consumed_pages: int, balloon_target_pages: int, balloon_actual_pages: int) -> int:
    """A balloon-only controller's allocation target: what the VM consumes once its balloon is at target."""
    return max(0, int(consumed_pages) - (int(balloon_target_pages) - int(balloon_actual_pages)))


def plan_boundary_swap(need_pages: int, vms: Sequence[VmAllocation], evictable: Mapping[int, int]) -> dict[int, int]:
    """How many pages to host-swap from each VM to free ``need_pages``; deterministic.

    First from the VMs above their targets, levelling from the top: the
    furthest above gives until it is level with the next, then both, and so
    on, down to the targets (never more than a VM's evictable frames). What
    is still needed then comes from every VM in proportion to its evictable
    frames (as blind random picks over the host would in expectation),
    largest remainders first, ties by guest id.
    """
    out = {v.guest_id: 0 for v in vms}
    need = int(need_pages)
    if need <= 0 or not vms:
        return out
    ids = np.array([v.guest_id for v in vms], np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    cap = np.array([max(0, int(evictable.get(int(g), 0))) for g in ids], np.int64)
    excess = np.array([vms[i].excess_pages for i in order], np.int64)
    above = np.minimum(np.maximum(excess, 0), cap)
    if above.sum() <= need:
        take = above.copy()
    else:
        # The highest level L with sum(max(above - L, 0)) >= need, then hand out the rest one page
        # at a time to the VMs exactly at L, lowest id first.
        lo, hi = 0, int(above.max())
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(np.maximum(above - mid, 0).sum()) >= need:
                lo = mid
            else:
                hi = mid - 1
        take = np.maximum(above - (lo + 1), 0)
        short = need - int(take.sum())
        for i in np.flatnonzero(above > lo):
            if short <= 0:
                break
            take[i] += 1
            short -= 1
    need -= int(take.sum())
    left = cap - take
    if need > 0 and left.sum() > 0:
        want = min(need, int(left.sum()))
        share = want * left / left.sum()
        more = np.floor(share).astype(np.int64)
        rest = want - int(more.sum())
        frac = share - more
        for i in np.lexsort((ids, -frac))[:rest]:
            more[i] += 1
        take += np.minimum(more, left)
    for i, g in enumerate(ids.tolist()):
        out[g] = int(take[i])
    return out


class MemoryStates:
    """The host's state, updated at each tick boundary, and the VMs' allocation targets.

    Call order (``hostd.machine``)::

        update(tick, vt_us, free_frames)  -> the controllers decide -> set_alloc_targets(...)
        -> the boundary reclaim asks swap_goal_frames() / allocations() -> guest_gone(gid)
    """

    def __init__(self, total_frames: int, min_free_pct: float | None = None, enabled: bool = True) -> None:
        self.total_frames = int(total_frames)
        self.enabled = enabled
        self.min_free_frames = min_free_pages(total_frames, min_free_pct)
        self.thresholds = thresholds_pages(self.min_free_frames)
        self.state = MemState.HIGH
        self._alloc: dict[int, VmAllocation] = {}
        self.ticks_in_state: dict[str, int] = {s.label: 0 for s in MemState}
        self.changes = 0
        self.first_tick_in: dict[str, int] = {}
        self.swap_out_pages_by_state: dict[str, int] = {s.label: 0 for s in MemState}

    def update(self, tick: int, vt_us: float, free_frames: int) -> MemState:
        """The state for this boundary's free frames; logs ``memory_state_changed`` on a transition."""
        new = state_of(int(free_frames), self.min_free_frames)
        if new != self.state:
            self.changes += 1
            log.info(ev.MEMORY_STATE_CHANGED, tick=tick, vt_us=vt_us, state=new.label, previous=self.state.label,
                     free_frames=int(free_frames), min_free_frames=self.min_free_frames,
                     free_pct_of_min_free=round(100.0 * free_frames / self.min_free_frames, 1),
                     reclaim=_describe(new))
            self.state = new
        self.ticks_in_state[new.label] += 1
        self.first_tick_in.setdefault(new.label, tick)
        return new

    # -- allocation targets -----------------------------------------------------------

    def set_alloc_targets(self, allocations: Mapping[int, VmAllocation]) -> None:
        self._alloc = dict(sorted(allocations.items()))

    def allocation(self, guest_id: int, consumed_pages: int | None = None) -> VmAllocation | None:
        """The guest's last target; with ``consumed_pages``, against what it consumes now."""
        a = self._alloc.get(guest_id)
        if a is None or consumed_pages is None:
            return a
        return VmAllocation(guest_id, int(consumed_pages), a.alloc_target_pages)

    def allocations(self) -> list[VmAllocation]:
        return list(self._alloc.values())

    def guest_gone(self, guest_id: int) -> None:
        self._alloc.pop(guest_id, None)

    # -- what the rest of the host asks -------------------------------------------------

    def may_host_swap(self) -> bool:
        return may_host_swap(self.state)

    def blocks(self, guest_id: int, consumed_pages: int) -> bool:
        """``blocks(state, guest)`` for the guest's last target and what it consumes now."""
        a = self.allocation(guest_id, consumed_pages)
        return a is not None and blocks(self.state, a)

    def may_self_swap(self, guest_id: int, consumed_pages: int) -> bool:
        """May a guest whose grant ran out mid-tick host-swap its own pages?

        Whenever the host is below minFree (clear or worse), unless low blocks
        it (above its allocation target): then its request is held until the
        boundary reclaims. Every free frame is granted at the tick start, so a
        guest that used up its share of scarce memory is, for its own
        partition, at zero free memory: ESX would be in low for it, swapping
        (and blocking the VMs above target). Waiting for the boundary instead
        starves it: free memory, retired I/O buffers refilling it at each
        boundary, never falls to hard, where the boundary would swap, and the
        guest crawls at one grant a tick (measured: 8 of 40 ticks finished by
        two thrashing guests when only hard/low allowed it, 20 with soft, 38
        with clear). In high, a guest beyond its share waits for a refill
        round: memory is still free elsewhere. The boundary's own reclaim
        still swaps only in hard and low.
        """
        return self.state >= MemState.CLEAR and not self.blocks(guest_id, consumed_pages)

    def grows_no_further(self, guest_id: int, consumed_pages: int) -> bool:
        """Should the next grant give this guest only a floor? (hard and worse, and above its target)

        Not in soft: there a guest may not swap its own pages (only the
        balloon reclaims), so a floor would hold its requests at every
        boundary while free memory, which nobody takes, never falls to hard
        where swapping could start -- the guest would crawl at one request a
        tick. ESX lets VMs allocate in soft and blocks only in low.
        """
        a = self.allocation(guest_id, consumed_pages)
        return self.state >= MemState.HARD and a is not None and a.above_target

    def swap_goal_frames(self, free_frames: int) -> int:
        """Frames the boundary reclaim must free: up to the soft threshold in hard and low, else none."""
        if not self.may_host_swap():
            return 0
        return max(0, self.thresholds[MemState.SOFT.label] - int(free_frames))

    def count_swap_out(self, pages: int, state: MemState | None = None) -> None:
        """Host swap-outs under ``state`` (default: the boundary's). The tick-end reclaim counts under the
        boundary's state, an in-tick allocation under the state it leaves the host in, a silent guest's
        memory under the state the free frames put the host in at that moment."""
        if pages > 0:
            self.swap_out_pages_by_state[(state or self.state).label] += int(pages)

    def summary(self) -> dict[str, Any]:
        """Keys for the host's snapshot at the end (summary.json ``host``)."""
        return {"memory_state": self.state.label, "min_free_frames": self.min_free_frames,
                "memory_state_thresholds": dict(self.thresholds),
                "memory_state_ticks": dict(self.ticks_in_state), "memory_state_changes": self.changes,
                "memory_state_first_tick": dict(self.first_tick_in),
                "swap_out_pages_by_state": dict(self.swap_out_pages_by_state)}


def self_swap_allowed(mem: Any, guest_id: int) -> bool:
    """``HostMemory.self_swap_allowed`` with memory states: ``MemoryStates.may_self_swap`` for what it holds now.

    (The deterministic engine's hook for a guest whose grant ran out; ``mem``
    is the ``HostMemory``, whose ``states`` must be set.)
    """
    return mem.states.may_self_swap(guest_id, mem.consumed_frames(guest_id))


def grant_floor_only(mem: Any) -> Any:
    """The grant planner's ``floor_only(gid)`` with memory states: above target in hard or worse."""
    return lambda gid: mem.states.grows_no_further(gid, mem.consumed_frames(gid))


def _describe(state: MemState) -> list[str]:
    r = RECLAIM_BY_STATE[state]
    return [name for name in ("balloon", "host_swap", "compress", "block") if getattr(r, name)]
