"""Reclaim: making room for an allocation, in its order, and host swapping on request.

Every allocation (EPT fault, disk cache, I/O buffers) first tries to keep
``low_watermark_frames`` free beyond what it takes (``_make_room``): it
frees the I/O buffers of requests complete by now, drops the requester's
own clean disk cache, then host-swaps victims the blind victim policy
picks (``reclaim``), in batches of at least ``reclaim_batch_frames``. It
waits for the swap-out writes only when the pool could not serve it
without them (direct reclaim); refilling the watermark alone costs the
vCPU nothing. ``reclaim_victims`` host-swaps a given set of frames (the
tick-end reclaim's per-VM picks, silent guests' memory).

Partitions (the deterministic discipline): while the pool's grants are
open, an allocation for a guest with a grant takes only from that grant
(``FramePool``), and when the grant is short the guest reclaims from its
own partition only, in this order (``_make_room_own``): retire its own I/O
buffers of requests complete by the request's virtual time; drop its own
clean disk-cache clusters, least recently used first
(``VirtualDisk.drop_clean``, the same cluster LRU the cache's own budget
uses); host-swap its own pages (random victims from its own stream,
``guest_rng``), if ``self_swap_allowed`` says so; else the request is
held (``hold``, from the discipline) until a refill round or the next
tick. Nothing in that path reads or changes another guest's state, so the
order in which guests' requests arrive cannot change any count. Every
device has one lane per guest (``hostd.devices``) for the same reason: its
share is set at tick boundaries only.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import HostOutOfMemory, InvariantViolation
from ..framepool import FrameKind
from ..memstate import MemState, may_compress, state_of
from ..p2m import PageState
from .books import _Guest
from .evict import Evictions

_nz = np.count_nonzero   # on small masks a fraction of np.any's cost; truthy exactly when np.any is

__all__ = ["Reclaim", "Reclaimed"]

_ZERO_PROGRESS_ROUNDS = 3             # reclaim rounds that free nothing before giving up


class Reclaimed(NamedTuple):
    freed_frames: int
    done_vt_us: float     # when the swap-out writes are on disk


class Reclaim(Evictions):
    """Part of ``HostMemory``: room for allocations, and host swapping."""

    async def _make_room(self, need: int, vt_us: float, g: _Guest | None = None) -> float:
        """Reclaim towards ``need`` + the low watermark free frames.

        Returns when the allocation may go ahead in virtual time: ``vt_us``
        if the pool already had ``need`` frames (the refill of the watermark
        costs the vCPU nothing, like a woken kswapd), else when the swap-out
        writes it had to wait for are done (direct reclaim). Raises
        ``HostOutOfMemory`` when fewer than ``need`` can be had and no one
        else's eviction is pending.
        """
        if g is not None and self.pool.has_grant(g.guest_id):
            return await self._make_room_own(g, need, vt_us)
        fruitless = 0
        done_us = float(vt_us)
        must_wait = self.pool.free_frames < need
        # I/O buffers of requests complete by now are only waiting for the
        # tick to free them: free them rather than swap guest pages for them.
        for other in self._guests.values():
            self.counters.early_retired_iobuf_pages += other.vdisk.retire(vt_us)
        target = min(need + self.low_watermark_frames, self.pool.total_frames)
        if g is not None and self.pool.free_frames < target:
            # The requester's own clean disk cache goes before anyone's pages are host-swapped.
            self.counters.pressure_dropped_cache_pages += g.vdisk.drop_clean(target - self.pool.free_frames)
        while self.pool.free_frames < target:
            want = max(target - self.pool.free_frames, self.reclaim_batch_frames)
            got = await self.reclaim(want, vt_us, self._state_after(need))
            done_us = max(done_us, got.done_vt_us)
            if got.freed_frames:
                fruitless = 0
                continue
            if self.pool.free_frames >= need:
                break            # the watermark is out of reach, the allocation is not
            if self._evictions_pending:
                await self._wait_eviction_settled()
                continue
            fruitless += 1
            if fruitless >= _ZERO_PROGRESS_ROUNDS:
                self.counters.oom_refusals += 1
                raise HostOutOfMemory(need, self.pool.free_frames,
                                      "no evictable frame (all pinned, busy, disk cache or I/O buffers)")
        if self.pool.free_frames < need and not self._evictions_pending:
            self.counters.oom_refusals += 1
            raise HostOutOfMemory(need, self.pool.free_frames, f"the host has only {self.pool.total_frames} frames")
        return done_us if must_wait else float(vt_us)

    async def _make_room_own(self, g: _Guest, need: int, vt_us: float) -> float:
        """Make ``need`` frames available in ``g``'s grant from ``g``'s own partition (module docstring).

        Returns when the allocation may go ahead in virtual time: ``vt_us``,
        or later when it waited for its own swap-out writes, or the next
        tick's start when it was held across the boundary.
        """
        pool, gid, gc = self.pool, g.guest_id, g.counters
        gc.grant_exhausted += 1
        self.counters.grant_exhausted += 1
        start_us = float(vt_us)
        fruitless = 0
        while pool.has_grant(gid) and pool.granted(gid) < need:
            short = need - pool.granted(gid)
            freed = g.vdisk.retire(vt_us)               # 1. its own finished I/O buffers
            gc.self_retired_iobuf_pages += freed
            self.counters.early_retired_iobuf_pages += freed
            if freed:
                self.counters.self_reclaim_pages += freed
                continue
            freed = g.vdisk.drop_clean(short)           # 2. its own clean cache, least recently used first
            if freed:
                gc.self_dropped_cache_pages += freed
                self.counters.pressure_dropped_cache_pages += freed
                self.counters.self_reclaim_pages += freed
                continue
            if self.self_swap_allowed(self, gid):       # 3. host swapping of its own pages
                got = await self._reclaim_own(g, max(short, self.reclaim_batch_frames), vt_us)
                g = self._same_guest(g)
                if got.freed_frames:
                    start_us = max(start_us, got.done_vt_us)
                    fruitless = 0
                    continue
                fruitless += 1
                if fruitless < _ZERO_PROGRESS_ROUNDS and _nz(pool.busy[g.p2m.loc[g.p2m.state == PageState.FRAME]]):
                    await self._wait_eviction_settled()
                    continue
            if self._hold is None:                      # 4. held until a refill round or the next tick
                self.counters.oom_refusals += 1
                raise HostOutOfMemory(need, pool.granted(gid), f"guest {gid}'s grant is spent and nothing of its "
                                      "own can be reclaimed")
            gc.held_requests += 1
            start_us = max(start_us, await self._hold(gid, need, vt_us))
            g = self._same_guest(g)
            vt_us = max(float(vt_us), start_us)
        return start_us

    async def _reclaim_own(self, g: _Guest, n_frames: int, vt_us: float) -> Reclaimed:
        """Host-swap up to ``n_frames`` of ``g``'s own pages: random victims from ``g``'s own stream."""
        self.counters.reclaim_calls += 1
        p2m = g.p2m
        frames = p2m.loc[p2m.state == PageState.FRAME]
        pool = self.pool
        frames = frames[~pool.pinned[frames] & ~pool.busy[frames]]
        n = min(int(n_frames), int(frames.size))
        if n <= 0:
            return Reclaimed(0, float(vt_us))
        victims = g.rng.choice(frames, size=n, replace=False).astype(np.int64)
        # Compression runs on every host swap-out (RECLAIM_BY_STATE): a guest whose grant ran out is, for its
        # own partition, out of memory -- ESX's low state (MemoryStates.may_self_swap) -- whatever the host's.
        freed, done_us = await self._evict_guest_frames(victims, vt_us, compress=True)
        self.counters.reclaim_frames += freed
        self.counters.self_reclaim_pages += freed
        g.counters.self_swap_pages += freed
        if self.states is not None:
            self.states.count_swap_out(freed, self.states.state)
        return Reclaimed(freed, done_us)

    def count_grant(self, guest_id: int, frames: int) -> None:
        """The discipline granted ``frames`` to the guest (its books for the metrics)."""
        self.counters.grant_pages += frames
        g = self._guests.get(guest_id)
        if g is not None:
            g.counters.grant_pages += frames

    def _state_after(self, need: int) -> MemState | None:
        """The memory state an allocation of ``need`` frames would leave the host in (None: no states).

        In-tick swapping is counted under it: the allocation is what drives
        free memory below the watermark (the low state's threshold, with states).
        """
        if self.states is None:
            return None
        return state_of(max(self.pool.free_frames - need, 0), self.states.min_free_frames)

    async def reclaim(self, n_frames: int, vt_us: float, state: MemState | None = None) -> Reclaimed:
        """Host swapping of up to ``n_frames``: the victim policy picks, blind.

        Victims are grouped by guest; each guest gets one shootdown for its
        gpfns and the tokens it returns go to its swap file (a write unless
        the swap cache holds that content already). All shootdowns of one
        call run concurrently; results are applied in guest-id order, so the
        outcome does not depend on who answers first.
        """
        n = int(n_frames)        # every guest page has its slot in its own swap file: swap is never short
        victims = self._victim.pick(self.pool, n, self.rng) if n > 0 else np.zeros(0, np.int64)
        return await self.reclaim_victims(victims, vt_us, state)

    async def reclaim_victims(self, victims: np.ndarray, vt_us: float, state: MemState | None = None) -> Reclaimed:
        """Host-swap these frames (evictable guest frames, distinct: never disk cache).

        ``state`` is the memory state the swapping is counted under
        (``MemoryStates.swap_out_pages_by_state``); None: the state that the
        free frames right now put the host in.
        """
        self.counters.reclaim_calls += 1
        victims = np.asarray(victims, np.int64)
        if victims.size == 0:
            return Reclaimed(0, float(vt_us))
        if _nz(self.pool.kind[victims] != FrameKind.GUEST):
            raise InvariantViolation("a victim policy picked a frame that is not a guest page")
        if self.states is not None and state is None:
            state = state_of(self.pool.free_frames, self.states.min_free_frames)
        # the memory states' table decides whether pages on their way to swap are compressed (hard, low)
        freed, done_us = await self._evict_guest_frames(victims, vt_us,
                                                        compress=state is None or may_compress(state))
        self.counters.reclaim_frames += freed
        if self.states is not None:
            self.states.count_swap_out(freed, state)
        return Reclaimed(freed, done_us)
