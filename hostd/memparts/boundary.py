"""The tick boundary's work on host memory, every guest parked: ``tick`` then ``balance``.

``tick`` retires I/O buffers, runs the disk cache's boundary work
(``hostd.hostcache``) and gives each device's lanes their shares for the
next tick. ``balance`` is the tick-end reclaim (kswapd, or by ESX memory
state from the VMs furthest above their allocation targets), charged to
no vCPU; the discipline calls it (``RequestDiscipline.balance``).
"""
from __future__ import annotations

import numpy as np

from ..devices import Device
from ..memstate import VmAllocation, plan_boundary_swap
from .books import _FRAME
from .reclaim import Reclaim, Reclaimed

__all__ = ["Boundary"]

_BALANCE_ROUNDS = 8                   # tick-end reclaim passes at most (compression frees part of a frame a page)


class Boundary(Reclaim):
    """Part of ``HostMemory``: what a tick's end does to it."""

    def tick(self, vt_us: float) -> None:
        """Once per tick, every guest parked: retire I/O buffers, the disk cache's boundary work, device shares.

        The cache's boundary work (``hostd.hostcache``): the flusher, the
        budget, and clean clusters dropped when free frames are below the
        refill level (twice the low watermark) -- before anything is
        host-swapped. Then each device's lanes get their shares for the
        next tick from this tick's demand.
        """
        for g in self._guests.values():
            g.vdisk.retire(vt_us)
        want = min(2 * self.low_watermark_frames, self.pool.total_frames) - self.pool.free_frames
        self.cache.boundary({gid: g.vdisk for gid, g in self._guests.items()}, vt_us, want)
        for dev in self._devices():
            dev.rebalance(vt_us, self.tick_us)

    def _devices(self) -> list[Device]:
        """Every device once: the swap device (or the shared one), then each disk's own, by guest id."""
        out: list[Device] = [self.swap.disk]
        seen = {id(self.swap.disk)}   # by identity as before, but a set: 64 guests made the pairwise test n^2
        for g in self._guests.values():
            dev = g.vdisk.device
            if id(dev) not in seen:
                seen.add(id(dev))
                out.append(dev)
        return out

    async def balance(self, vt_us: float, extra_frames: int = 0) -> Reclaimed:
        """The tick-end reclaim; charged to no vCPU.

        Without memory states (kswapd): bring free frames up to twice the
        low watermark, blind. With them (ESX, ``hostd.memstate``): only in
        the hard and low states, host-swap until free frames reach the soft
        threshold, from the VMs furthest above their allocation targets
        (random victims within each VM, from its own stream), or blind over
        the whole host when there are no per-VM victims
        (``[host] victim_scope = "global"``). ``extra_frames``: frames
        requests held across the boundary still need, on top (in any state:
        they must be served at the next tick's start).

        With compression on, a page taken frees only part of a frame (the
        cache keeps its compressed bytes), so one pass falls short of the
        goal: the reclaim goes on, at most ``_BALANCE_ROUNDS`` passes, while
        it is short and each pass freed something. (Each compressed page
        frees at least half a frame, so the shortfall halves every pass.)
        """
        got = await self._balance_once(vt_us, extra_frames)
        if self.zip is None:
            return got
        freed, done = got.freed_frames, got.done_vt_us
        for _ in range(_BALANCE_ROUNDS - 1):
            if got.freed_frames <= 0:
                break
            got = await self._balance_once(vt_us, extra_frames)
            freed, done = freed + got.freed_frames, max(done, got.done_vt_us)
        return Reclaimed(freed, done)

    async def _balance_once(self, vt_us: float, extra_frames: int) -> Reclaimed:
        extra = max(0, int(extra_frames))
        if self.states is None:
            high = min(2 * self.low_watermark_frames + extra, self.pool.total_frames)
            want = high - self.pool.free_frames
            if want <= 0:
                return Reclaimed(0, float(vt_us))
            return await self.reclaim(want, vt_us)
        state = self.states.state
        want = max(self.states.swap_goal_frames(self.pool.free_frames - extra), extra - self.pool.free_frames)
        if want <= 0:
            return Reclaimed(0, float(vt_us))
        if self._vm_victims is None:
            return await self.reclaim(want, vt_us, state)
        plan = plan_boundary_swap(min(want, self.swap.free_slots), self.vm_allocations(),
                                  {gid: self._vm_victims.evictable_count(self.pool, g.p2m)
                                   for gid, g in self._guests.items()})
        picked = [self._vm_victims.pick(self.pool, self._guests[gid].p2m, gid, n)
                  for gid, n in sorted(plan.items()) if n > 0]
        victims = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        return await self.reclaim_victims(victims, vt_us, state)

    def consumed_frames(self, guest_id: int) -> int:
        """Host frames the VM consumes: those backing its gpfns and its compression cache's (ESX counts both)."""
        g = self._guest(guest_id)
        n = int(np.count_nonzero(g.p2m.state == _FRAME))
        return n + (int(self.zip.frames_of(guest_id).size) if self.zip is not None else 0)

    def vm_allocations(self) -> list[VmAllocation]:
        """Every guest's host frames against its allocation target (its consumption when it has none yet)."""
        out = []
        for gid, g in self._guests.items():
            consumed = self.consumed_frames(gid)
            a = self.states.allocation(gid, consumed) if self.states is not None else None
            out.append(a if a is not None else VmAllocation(gid, consumed, consumed))
        return out
