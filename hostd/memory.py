"""Host memory: frames, per-guest p2m, host swap, virtual disks, and the invariant.

``HostMemory`` is socket-free. Its collaborators come in its constructor,
or, for the two that need host memory themselves, in one ``wire`` call
(``hostd.assembly`` does both; nothing else sets them):

- ``victim``: the blind victim policy (``hostd.victim``);
- ``shootdown``: an ``async (guest_id, gpfns uint64) -> tokens uint64`` that
  sends the guest the TLB-shootdown (invalidate) RPC and returns the content
  tokens the guest held for those gpfns (``hostd.shootdown``). The host
  waits for it before it reuses the frames;
- ``observer``: the host's monitors, told of swap-ins and disk writes as they
  happen (``MemoryObserver``);
- ``callout``: see "Concurrency" below.

Concurrency: every method may be called from many session tasks at once.
State changes happen only in synchronous stretches; the only awaits are the
shootdowns (inside ``reclaim``) and waits for someone else's shootdown. A
frame whose shootdown is pending is ``busy``: not free, not a victim, not
freed by balloon inflation or guest death (it is released when the
acknowledgement arrives). A caller that needs ``n`` frames makes room, then
re-checks everything it planned, and allocates with no await in between.
No internal lock: the lock protocols of the design wrap these calls, and
``callout`` (an async context manager factory) runs around every wait for a
guest (the shootdowns) or for another caller's shootdown, so a protocol can
drop its lock there (hostd.locks, no-callback-under-lock).

Call order for one guest::

    add_guest -> (ept_fault | balloon_inflate | balloon_deflate | set_ad_bits
                  | vdisk_read | vdisk_write | pin_* | unpin_*)* -> remove_guest
    each tick, from the tick loop: tick(vt_us) [-> await balance(vt_us)] -> snapshot()

The books are read through ``guest_ids``, ``p2m``, ``vdisk``, ``pool`` and
``swap`` (the audit and the invariant look at the raw state); the frame
invariant itself is ``hostd.invariant``.

Every allocation (EPT fault, disk cache, I/O buffers) first tries to keep
``low_watermark_frames`` free beyond what it takes, by host swapping in
batches of at least ``reclaim_batch_frames``; ``balance`` (the tick loop's
kswapd) refills to twice the watermark in the background.

Costs in virtual time: an EPT fault costs ``ept_fault_us`` per page asked
for; if the pool could not serve it without reclaiming, it also waits for
those swap-out writes (direct reclaim); swapped pages add a read on the
swap device. Refilling the watermark alone costs the vCPU nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, NamedTuple, Protocol

import numpy as np

from balloonlab.proto.costs import CostModel, DiskProfile
from balloonlab.proto.tokens import KEEP_TOKEN

from .errors import (BadBatch, BalloonLimit, DuplicateGuest, HostOutOfMemory, InvalidState,
                     InvariantViolation, UnknownGuest)
from .framepool import FrameKind, FramePool
from .hostswap import PENDING_TOKEN, HostSwap
from .invariant import check_full
from .p2m import P2M, PageState, as_page_numbers, one_page_number, one_token, unique_pages
from .vdisk import CLUSTER_PAGES_DEFAULT, MAX_INFLIGHT_REQUESTS_DEFAULT, VirtualDisk
from .victim import VictimPolicy, make_victim_policy

__all__ = ["HostMemory", "HostCounters", "GuestCounters", "Reclaimed", "Shootdown", "MemoryObserver",
           "MAX_BALLOON_FRACTION_DEFAULT", "default_max_balloon_pages"]

Shootdown = Callable[[int, np.ndarray], Awaitable[np.ndarray]]
"""``async (guest_id, gpfns) -> tokens``: invalidate the guest's mappings, return what it held."""


class MemoryObserver(Protocol):
    """What the host's monitors want to see as it happens (``HostMemory.observer``).

    Called synchronously, after the state change; must not call back into
    host memory.
    """

    def guest_pages_swapped_in(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> None:
        """An EPT fault read these guest pages back from host swap (their content tokens)."""

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        """The guest wrote these blocks of its virtual disk (the content tokens written)."""


MAX_BALLOON_FRACTION_DEFAULT = 0.65   # ESX Mem.CtlMaxPercent
_FRAME = int(PageState.FRAME)         # plain ints for the one-page paths (an IntEnum lookup costs ~1 us)
_SWAPPED = int(PageState.SWAPPED)
_BALLOONED = int(PageState.BALLOONED)
_GUEST_KIND = int(FrameKind.GUEST)
_ZERO_PROGRESS_ROUNDS = 3             # reclaim rounds that free nothing before giving up


@contextlib.asynccontextmanager
async def _no_callout() -> Any:
    yield


def default_max_balloon_pages(guest_pages: int) -> int:
    return int(guest_pages * MAX_BALLOON_FRACTION_DEFAULT)


class Reclaimed(NamedTuple):
    freed_frames: int
    done_vt_us: float     # when the swap-out writes are on disk


@dataclass(slots=True)
class GuestCounters:
    ept_fault_calls: int = 0
    ept_faults: int = 0              # pages the host had to back
    ept_fault_swapins: int = 0       # ... of which read back from host swap
    swap_out_pages: int = 0
    swap_in_pages: int = 0
    shootdown_pages: int = 0
    balloon_inflated_pages: int = 0
    balloon_deflated_pages: int = 0


@dataclass(slots=True)
class HostCounters:
    ept_fault_calls: int = 0
    ept_faults: int = 0
    ept_fault_spurious_pages: int = 0   # asked for but already backed
    swap_out_pages: int = 0             # guest and cache pages written to host swap
    swap_out_cache_pages: int = 0
    swap_in_pages: int = 0              # guest and cache pages read back
    swap_in_cache_pages: int = 0        # = double faults of the virtual disks
    reclaim_calls: int = 0
    reclaim_frames: int = 0
    direct_reclaims: int = 0            # a request waited for swap-out writes
    shootdowns: int = 0
    shootdown_pages: int = 0
    shootdown_failures: int = 0
    dropped_evictions: int = 0          # frames ballooned or orphaned while their shootdown was pending
    balloon_inflated_pages: int = 0
    balloon_deflated_pages: int = 0
    oom_refusals: int = 0
    early_retired_iobuf_pages: int = 0  # completed I/O buffers freed before the tick under pressure


@dataclass(slots=True)
class _Guest:
    guest_id: int
    p2m: P2M
    max_balloon_pages: int
    vdisk: VirtualDisk
    balloon_pages: int = 0
    counters: GuestCounters = field(default_factory=GuestCounters)


class HostMemory:
    def __init__(self, total_frames: int, swap_slots: int, victim: VictimPolicy | str,
                 rng: np.random.Generator, costs: CostModel | None = None,
                 swap_profile: DiskProfile | str = "ssd", shootdown: Shootdown | None = None, *,
                 observer: MemoryObserver | None = None, callout: Callable[[], Any] | None = None,
                 low_watermark_frames: int | None = None, reclaim_batch_frames: int = 32,
                 cluster_pages: int = CLUSTER_PAGES_DEFAULT, vdisk_cache_max_pages: int | None = None,
                 max_inflight_requests: int = MAX_INFLIGHT_REQUESTS_DEFAULT) -> None:
        self.pool = FramePool(total_frames)
        self.swap = HostSwap(swap_slots, swap_profile)
        self._victim: VictimPolicy = make_victim_policy(victim) if isinstance(victim, str) else victim
        self.rng = rng
        self.costs = costs or CostModel()
        self._shootdown_fn: Shootdown | None = shootdown
        self._placeholders_settled: Callable[[int], Awaitable[None]] | None = None
        self._observer: MemoryObserver | None = observer    # the host's monitors, if any
        self._callout: Callable[[], Any] = callout or _no_callout   # see the module docstring
        self.low_watermark_frames = (max(1, total_frames // 100) if low_watermark_frames is None
                                     else int(low_watermark_frames))
        self.reclaim_batch_frames = max(1, int(reclaim_batch_frames))
        self.cluster_pages = cluster_pages
        self.vdisk_cache_max_pages = (max(cluster_pages, total_frames // 16) if vdisk_cache_max_pages is None
                                      else int(vdisk_cache_max_pages))
        self.max_inflight_requests = max_inflight_requests
        self.counters = HostCounters()
        self._guests: dict[int, _Guest] = {}
        self._departed_vdisk: dict[str, float] = {}   # disk counters of guests that are gone
        self._evictions_pending = 0
        self._eviction_settled = asyncio.Event()

    def wire(self, *, shootdown: Shootdown | None = None, observer: MemoryObserver | None = None,
             placeholders_settled: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Connect the collaborators that are built on host memory themselves (once each).

        The shootdown module and the monitors need host memory to exist
        first, so they cannot be constructor arguments; this is the one
        place they are connected, and each only once.
        """
        if shootdown is not None:
            if self._shootdown_fn is not None:
                raise RuntimeError("host memory's shootdown is connected already")
            self._shootdown_fn = shootdown
        if placeholders_settled is not None:
            # gid -> until every deferred shootdown to it is answered (its placeholders hold content again)
            self._placeholders_settled = placeholders_settled
        if observer is not None:
            if self._observer is not None:
                raise RuntimeError("host memory's observer is connected already")
            self._observer = observer

    @property
    def victim(self) -> VictimPolicy:
        return self._victim

    # -- guests ---------------------------------------------------------------

    def add_guest(self, guest_id: int, guest_pages: int, max_balloon_pages: int | None = None, *,
                  disk_blocks: int = 0, disk_profile: DiskProfile | str = "ssd",
                  cache_max_pages: int | None = None) -> None:
        if guest_id in self._guests:
            raise DuplicateGuest(guest_id)
        max_balloon = default_max_balloon_pages(guest_pages) if max_balloon_pages is None else int(max_balloon_pages)
        if not 0 <= max_balloon <= guest_pages:
            raise ValueError(f"guest {guest_id}: max_balloon_pages {max_balloon} not in [0, {guest_pages}]")
        vdisk = VirtualDisk(guest_id, disk_blocks, self.pool, self.swap, self.costs, profile=disk_profile,
                            cluster_pages=self.cluster_pages,
                            cache_max_pages=self.vdisk_cache_max_pages if cache_max_pages is None else cache_max_pages,
                            max_inflight_requests=self.max_inflight_requests)
        self._guests[guest_id] = _Guest(guest_id, P2M(guest_pages), max_balloon, vdisk)
        # In id order, not in the order guests happened to connect: every loop over the
        # guests (retiring I/O buffers frees frames onto the free stack) must be reproducible.
        self._guests = dict(sorted(self._guests.items()))

    def remove_guest(self, guest_id: int) -> None:
        """Release everything a dead guest held: frames, swap slots, disk cache and buffers.

        Frames with a shootdown pending stay busy until it settles, then are freed.
        """
        g = self._guest(guest_id)
        del self._guests[guest_id]
        for k, v in asdict(g.vdisk.counters).items():
            self._departed_vdisk[k] = self._departed_vdisk.get(k, 0) + v
        frames = self.pool.frames_owned_by(guest_id)
        self.pool.free(frames[~self.pool.busy[frames]])
        self.swap.free(self.swap.slots_owned_by(guest_id))

    def guest_ids(self) -> list[int]:
        return sorted(self._guests)

    def p2m(self, guest_id: int) -> P2M:
        """The guest's physical-to-machine map (read it; only host memory changes it)."""
        return self._guest(guest_id).p2m

    def max_balloon_pages(self, guest_id: int) -> int:
        return self._guest(guest_id).max_balloon_pages

    @property
    def evictions_pending(self) -> int:
        """Evictions waiting for their shootdowns: their reserved swap slots have no owner yet."""
        return self._evictions_pending

    def _guest(self, guest_id: int) -> _Guest:
        try:
            return self._guests[guest_id]
        except KeyError:
            raise UnknownGuest(guest_id) from None

    def _same_guest(self, g: _Guest) -> _Guest:
        """After an await: the guest may have died (or died and come back)."""
        if self._guests.get(g.guest_id) is not g:
            raise UnknownGuest(g.guest_id)
        return g

    # -- EPT faults -------------------------------------------------------------

    async def ept_fault(self, guest_id: int, gpfns: np.ndarray | bytes, vt_us: float) -> tuple[np.ndarray, float]:
        """Back ``gpfns``; returns their content tokens (0 = fresh zero page) and the completion time.

        A gpfn already backed gets ``KEEP_TOKEN``: its frame was never taken,
        so its content is what the guest last wrote, which the host does not
        know (the token stored when it backed the frame is stale). The same
        gpfn twice is refused (``BAD_FIELD``), as is a ballooned one: the
        guest must deflate it first.
        """
        g = self._guest(guest_id)
        one = one_page_number(gpfns, guest_id, "gpfn", g.p2m.guest_pages)
        if one is not None:
            return await self._ept_fault_one(g, one, vt_us)
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        uniq = unique_pages(gpfns)
        start_us = float(vt_us)
        tried = False
        while True:
            g = self._same_guest(g)
            state = g.p2m.state[uniq]
            self._refuse_ballooned(g, uniq, state)
            backed = state == PageState.FRAME
            if np.any(self.pool.busy[g.p2m.loc[uniq[backed]]]):
                # Its eviction is in flight: the guest may already have dropped it.
                await self._wait_eviction_settled()
                continue
            if await self._placeholders_wait(g, uniq[state == PageState.SWAPPED]):
                continue
            need = int(uniq.size - np.count_nonzero(backed))
            if self._room_ok(need, tried):
                break
            start_us = max(start_us, await self._make_room(need, vt_us))
            tried = True

        todo = uniq[~backed]
        swapped = todo[state[~backed] == PageState.SWAPPED]
        slots = g.p2m.loc[swapped]
        tokens = np.zeros(todo.size, np.uint64)
        tokens[state[~backed] == PageState.SWAPPED] = self.swap.load(slots)
        self.swap.free(slots)
        if swapped.size and self._observer is not None:
            self._observer.guest_pages_swapped_in(guest_id, swapped, tokens[state[~backed] == PageState.SWAPPED])
        frames = self.pool.alloc(todo.size, FrameKind.GUEST, guest_id, todo, tokens)
        self.pool.accessed[frames] = True          # the guest is touching it right now
        self.pool.pinned[frames] = g.p2m.pinned[todo]
        g.p2m.set(todo, PageState.FRAME, frames)

        if start_us > vt_us:
            self.counters.direct_reclaims += 1
        done_us = start_us
        if swapped.size:
            # One vCPU faults its pages one at a time, however many one message carries.
            done_us = self.swap.disk.submit_serial(start_us, int(swapped.size))
        done_us += self.costs.ept_fault_us * uniq.size

        c, gc = self.counters, g.counters
        c.ept_fault_calls += 1
        gc.ept_fault_calls += 1
        c.ept_faults += int(todo.size)
        gc.ept_faults += int(todo.size)
        c.ept_fault_spurious_pages += int(uniq.size - todo.size)
        c.swap_in_pages += int(swapped.size)
        gc.swap_in_pages += int(swapped.size)
        gc.ept_fault_swapins += int(swapped.size)
        tokens = self.pool.token[g.p2m.loc[gpfns]]
        if todo.size != uniq.size:   # some were backed already: the guest holds their content, not us
            tokens[np.isin(gpfns, uniq[backed])] = KEEP_TOKEN
        return tokens, done_us

    async def _ept_fault_one(self, g: _Guest, gpfn: int, vt_us: float) -> tuple[np.ndarray, float]:
        """``ept_fault`` of one gpfn, in scalars: the same books, the same frame, the same times."""
        start_us = float(vt_us)
        tried = False
        while True:
            g = self._same_guest(g)
            p2m = g.p2m
            state = p2m.state[gpfn]
            if state == _BALLOONED:
                raise InvalidState(g.guest_id, "gpfn", gpfn, "BALLOONED", "deflate it before touching it")
            backed = state == _FRAME
            if backed and self.pool.busy[p2m.loc[gpfn]]:
                # Its eviction is in flight: the guest may already have dropped it.
                await self._wait_eviction_settled()
                continue
            if state == _SWAPPED and await self._placeholders_wait(g, np.array((gpfn,), np.int64)):
                continue
            need = 0 if backed else 1
            if self._room_ok(need, tried):
                break
            start_us = max(start_us, await self._make_room(need, vt_us))
            tried = True

        swapped = state == _SWAPPED
        if not backed:
            token = 0
            if swapped:
                slot = int(p2m.loc[gpfn])
                token = int(self.swap.token[slot])
                self.swap.free_one(slot)
                if self._observer is not None:
                    self._observer.guest_pages_swapped_in(g.guest_id, np.array((gpfn,), np.int64),
                                                          np.array((token,), np.uint64))
            f = self.pool.alloc_one(_GUEST_KIND, g.guest_id, gpfn, token)
            if f < 0:
                raise InvariantViolation(f"guest {g.guest_id}: host memory made room for too few frames")
            self.pool.accessed[f] = True          # the guest is touching it right now
            self.pool.pinned[f] = p2m.pinned[gpfn]
            p2m.state[gpfn] = _FRAME
            p2m.loc[gpfn] = f

        if start_us > vt_us:
            self.counters.direct_reclaims += 1
        done_us = start_us
        if swapped:
            done_us = self.swap.disk.submit_serial(start_us, 1)
        done_us += self.costs.ept_fault_us * 1

        c, gc = self.counters, g.counters
        c.ept_fault_calls += 1
        gc.ept_fault_calls += 1
        if backed:
            c.ept_fault_spurious_pages += 1
        else:
            c.ept_faults += 1
            gc.ept_faults += 1
        if swapped:
            c.swap_in_pages += 1
            gc.swap_in_pages += 1
            gc.ept_fault_swapins += 1
        if backed:   # the guest holds its content, not us (see ept_fault)
            return np.array((KEEP_TOKEN,), np.uint64), done_us
        f = int(p2m.loc[gpfn])
        return self.pool.token[f:f + 1].copy(), done_us

    async def _placeholders_wait(self, g: _Guest, swapped_gpfns: np.ndarray) -> bool:
        """Wait if a slot of these gpfns still holds a deferred shootdown's placeholder; True if it waited.

        The fault handler lets deferred shootdowns settle before it starts,
        but one can begin while this fault waits for room (a silent guest's
        memory is reclaimed at tick ends): a placeholder must never be handed
        back as content, so the check is made here, where the slot is read.
        """
        if not swapped_gpfns.size:
            return False
        slots = g.p2m.loc[swapped_gpfns]
        if not np.any(self.swap.token[slots] == PENDING_TOKEN):
            return False
        if self._placeholders_settled is None:
            raise InvariantViolation(f"guest {g.guest_id}: a swap slot holds a placeholder and nothing settles it")
        await self._placeholders_settled(g.guest_id)
        if np.any(self.swap.token[g.p2m.loc[swapped_gpfns[g.p2m.state[swapped_gpfns] == PageState.SWAPPED]]]
                  == PENDING_TOKEN):
            # Settled, but the answer did not fill it (the guest failed the shootdown): the page is lost;
            # hand it over as it is and let the guest's check say so, rather than wait for ever.
            return False
        return True

    def _refuse_ballooned(self, g: _Guest, gpfns: np.ndarray, state: np.ndarray) -> None:
        ballooned = state == PageState.BALLOONED
        if np.any(ballooned):
            raise InvalidState(g.guest_id, "gpfn", int(gpfns[np.flatnonzero(ballooned)[0]]), "BALLOONED",
                               "deflate it before touching it")

    # -- reclaim (host swapping) -------------------------------------------------

    def _room_ok(self, need: int, tried: bool) -> bool:
        """Can an allocation of ``need`` frames go ahead now?

        Every allocation first tries to keep ``low_watermark_frames`` free
        beyond what it takes (``tried`` says it did); it only has to have
        ``need``.
        """
        if need == 0:
            return True
        free = self.pool.free_frames
        return free >= need and (tried or free >= need + self.low_watermark_frames)

    async def _make_room(self, need: int, vt_us: float) -> float:
        """Reclaim towards ``need`` + the low watermark free frames.

        Returns when the allocation may go ahead in virtual time: ``vt_us``
        if the pool already had ``need`` frames (the refill of the watermark
        costs the vCPU nothing, like a woken kswapd), else when the swap-out
        writes it had to wait for are done (direct reclaim). Raises
        ``HostOutOfMemory`` when fewer than ``need`` can be had and no one
        else's eviction is pending.
        """
        fruitless = 0
        done_us = float(vt_us)
        must_wait = self.pool.free_frames < need
        # I/O buffers of requests complete by now are only waiting for the
        # tick to free them: free them rather than swap guest pages for them.
        for g in self._guests.values():
            self.counters.early_retired_iobuf_pages += g.vdisk.retire(vt_us)
        target = min(need + self.low_watermark_frames, self.pool.total_frames)
        while self.pool.free_frames < target:
            want = max(target - self.pool.free_frames, self.reclaim_batch_frames)
            got = await self.reclaim(want, vt_us)
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
                reason = (f"host swap is full ({self.swap.n_slots} slots)" if self.swap.free_slots == 0
                          else "no evictable frame (all pinned, busy or I/O buffers)")
                raise HostOutOfMemory(need, self.pool.free_frames, reason)
        return done_us if must_wait else float(vt_us)

    async def reclaim(self, n_frames: int, vt_us: float) -> Reclaimed:
        """Host swapping of up to ``n_frames``: the victim policy picks, blind.

        Cache victims are host-owned and go to swap at once. Guest victims are
        grouped by guest; each guest gets one shootdown for its gpfns and the
        tokens it returns are what goes to swap. All shootdowns of one call
        run concurrently; results are applied in guest-id order, so the
        outcome does not depend on who answers first.
        """
        self.counters.reclaim_calls += 1
        n = min(int(n_frames), self.swap.free_slots)
        victims = self._victim.pick(self.pool, n, self.rng) if n > 0 else np.zeros(0, np.int64)
        if victims.size == 0:
            return Reclaimed(0, float(vt_us))
        slots = self.swap.alloc(victims.size)       # reserved now: concurrent reclaims must not take them
        kinds = self.pool.kind[victims]
        done_us = float(vt_us)

        is_cache = kinds == FrameKind.CACHE
        cache_frames, cache_slots = victims[is_cache], slots[is_cache]
        for gid in np.unique(self.pool.owner_guest[cache_frames]).tolist():
            mine = self.pool.owner_guest[cache_frames] == gid
            self._guests[gid].vdisk.swap_out(cache_frames[mine], cache_slots[mine])
        if cache_frames.size:
            done_us = self.swap.disk.submit(vt_us, int(cache_frames.size))
            self.counters.swap_out_pages += int(cache_frames.size)
            self.counters.swap_out_cache_pages += int(cache_frames.size)

        guest_frames, guest_slots = victims[~is_cache], slots[~is_cache]
        freed = int(cache_frames.size)
        if guest_frames.size:
            freed_guests, done_guests = await self._evict_guest_frames(guest_frames, guest_slots, vt_us)
            freed += freed_guests
            done_us = max(done_us, done_guests)
        self.counters.reclaim_frames += freed
        return Reclaimed(freed, done_us)

    async def _evict_guest_frames(self, frames: np.ndarray, slots: np.ndarray, vt_us: float) -> tuple[int, float]:
        if self._shootdown_fn is None:
            raise InvariantViolation("host memory has no shootdown callback: cannot evict guest frames")
        owners = self.pool.owner_guest[frames]
        groups = [(gid, owners == gid) for gid in np.unique(owners).tolist()]
        self.pool.busy[frames] = True
        self._evictions_pending += 1
        results: list[Any] = [None] * len(groups)
        try:
            async with self._callout():
                results = await asyncio.gather(
                    *(self._shootdown(gid, self.pool.owner_index[frames[mine]]) for gid, mine in groups),
                    return_exceptions=True)
        finally:
            # Also on cancellation: un-busy what was not evicted, give back reserved slots.
            freed, done_us = self._settle_evictions(groups, results, frames, slots, vt_us)
            self._evictions_pending -= 1
            self._eviction_settled.set()
            self._eviction_settled = asyncio.Event()
        return freed, done_us

    async def _shootdown(self, guest_id: int, gpfns: np.ndarray) -> np.ndarray:
        assert self._shootdown_fn is not None
        self.counters.shootdowns += 1
        self.counters.shootdown_pages += int(gpfns.size)
        tokens = await self._shootdown_fn(guest_id, gpfns.astype(np.uint64))
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size != gpfns.size:
            raise BadBatch(f"guest {guest_id}: shootdown of {gpfns.size} gpfns returned {tokens.size} tokens")
        return tokens.astype(np.uint64, copy=False)

    def _settle_evictions(self, groups: list[tuple[int, np.ndarray]], results: list[Any],
                          frames: np.ndarray, slots: np.ndarray, vt_us: float) -> tuple[int, float]:
        freed = 0
        done_us = float(vt_us)
        for (gid, mine), result in zip(groups, results):
            g_frames, g_slots = frames[mine], slots[mine]
            gpfns = self.pool.owner_index[g_frames]
            g = self._guests.get(gid)
            # Still the guest's mapping? Balloon inflation or guest death while
            # the shootdown was pending leaves the frame an orphan: drop it.
            live = np.zeros(g_frames.size, bool)
            if g is not None:
                live = (g.p2m.state[gpfns] == PageState.FRAME) & (g.p2m.loc[gpfns] == g_frames)
            if isinstance(result, np.ndarray):
                self.swap.store(g_slots[live], result[live], FrameKind.GUEST, gid, gpfns[live])
                if g is not None:
                    g.p2m.set(gpfns[live], PageState.SWAPPED, g_slots[live])
                    g.counters.swap_out_pages += int(np.count_nonzero(live))
                    g.counters.shootdown_pages += int(gpfns.size)
                self.swap.free(g_slots[~live])
                self.pool.free(g_frames)
                n_live = int(np.count_nonzero(live))
                if n_live:
                    done_us = max(done_us, self.swap.disk.submit(vt_us, n_live))
                self.counters.swap_out_pages += n_live
                self.counters.dropped_evictions += int(g_frames.size) - n_live
                freed += int(g_frames.size)
            else:
                # No answer (guest gone, timed out, bad reply, or we were
                # cancelled): the mapping stays; orphans can go.
                if result is not None or g is None:
                    self.counters.shootdown_failures += 1
                self.swap.free(g_slots)
                self.pool.busy[g_frames[live]] = False
                self.pool.free(g_frames[~live])
                self.counters.dropped_evictions += int(np.count_nonzero(~live))
                freed += int(np.count_nonzero(~live))
        return freed, done_us

    async def _wait_eviction_settled(self) -> None:
        async with self._callout():
            await self._eviction_settled.wait()

    async def balance(self, vt_us: float) -> Reclaimed:
        """Background reclaim (kswapd): bring free frames up to twice the low watermark.

        Charged to no vCPU; call it from the tick loop if wanted.
        """
        high = min(2 * self.low_watermark_frames, self.pool.total_frames)
        want = high - self.pool.free_frames
        if want <= 0:
            return Reclaimed(0, float(vt_us))
        return await self.reclaim(want, vt_us)

    # -- balloon -------------------------------------------------------------------

    def balloon_inflate(self, guest_id: int, gpfns: np.ndarray | bytes) -> int:
        """The guest gives ``gpfns`` to the host: free their frames/slots now; returns frames freed.

        Refused as a whole (nothing changes) on a bad, duplicate or already
        ballooned gpfn, or beyond ``max_balloon_pages``.
        """
        g = self._guest(guest_id)
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        state = g.p2m.state[gpfns]
        if np.any(state == PageState.BALLOONED):
            raise InvalidState(guest_id, "gpfn", int(gpfns[np.flatnonzero(state == PageState.BALLOONED)[0]]),
                               "already BALLOONED", "inflate each page once")
        if g.balloon_pages + gpfns.size > g.max_balloon_pages:
            raise BalloonLimit(guest_id, g.balloon_pages, int(gpfns.size), g.max_balloon_pages)
        frames = g.p2m.loc[gpfns[state == PageState.FRAME]]
        # A busy frame's shootdown is pending: it is freed when that settles.
        frames = frames[~self.pool.busy[frames]]
        self.pool.free(frames)
        self.swap.free(g.p2m.loc[gpfns[state == PageState.SWAPPED]])
        g.p2m.set(gpfns, PageState.BALLOONED)
        g.p2m.pinned[gpfns] = False
        g.balloon_pages += int(gpfns.size)
        g.counters.balloon_inflated_pages += int(gpfns.size)
        self.counters.balloon_inflated_pages += int(gpfns.size)
        return int(frames.size)

    def balloon_deflate(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        """The guest takes ``gpfns`` back: they become UNBACKED (a fault gives a zero page)."""
        g = self._guest(guest_id)
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        state = g.p2m.state[gpfns]
        if np.any(state != PageState.BALLOONED):
            i = int(np.flatnonzero(state != PageState.BALLOONED)[0])
            raise InvalidState(guest_id, "gpfn", int(gpfns[i]), PageState(state[i]).name,
                               "only BALLOONED pages can be deflated")
        g.p2m.set(gpfns, PageState.UNBACKED)
        g.balloon_pages -= int(gpfns.size)
        g.counters.balloon_deflated_pages += int(gpfns.size)
        self.counters.balloon_deflated_pages += int(gpfns.size)

    def balloon_pages(self, guest_id: int) -> int:
        return self._guest(guest_id).balloon_pages

    # -- accessed/dirty bits and pinning ----------------------------------------

    def set_ad_bits(self, guest_id: int, accessed_packbits: np.ndarray | bytes,
                    dirty_packbits: np.ndarray | bytes) -> None:
        """OR the guest's EPT A/D bits (``np.packbits`` over its gpfns) into the frames backing them.

        Empty bit strings mean "nothing to report".
        """
        g = self._guest(guest_id)
        backed = g.p2m.state == PageState.FRAME
        for name, packed, target in (("accessed", accessed_packbits, self.pool.accessed),
                                     ("dirty", dirty_packbits, self.pool.dirty)):
            if len(packed) == 0:
                continue
            bits = self._unpack(g, name, packed)
            hit = bits & backed
            target[g.p2m.loc[hit]] = True

    def _unpack(self, g: _Guest, name: str, packed: np.ndarray | bytes) -> np.ndarray:
        raw = np.frombuffer(packed, np.uint8) if isinstance(packed, (bytes, bytearray, memoryview)) \
            else np.asarray(packed, np.uint8).reshape(-1)
        want = -(-g.p2m.guest_pages // 8)
        if raw.size != want:
            raise BadBatch(f"guest {g.guest_id}: {name} bits have {raw.size} bytes, expected {want}")
        return np.unpackbits(raw, count=g.p2m.guest_pages).astype(bool)

    def pin_gpfns(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        """Their frames are never host-swap victims (now and whenever faulted in again)."""
        self._set_pinned(guest_id, gpfns, True)

    def unpin_gpfns(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        self._set_pinned(guest_id, gpfns, False)

    def _set_pinned(self, guest_id: int, gpfns: np.ndarray | bytes, pinned: bool) -> None:
        g = self._guest(guest_id)
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages)
        g.p2m.pinned[gpfns] = pinned
        backed = gpfns[g.p2m.state[gpfns] == PageState.FRAME]
        self.pool.pinned[g.p2m.loc[backed]] = pinned

    def pin_vdisk_range(self, guest_id: int, first_block: int, n_blocks: int) -> None:
        """Pin the cache frames of these blocks (e.g. the guest's swap area) and keep them cached.

        Blocks that are in host swap right now become pinned when next touched.
        """
        self._guest(guest_id).vdisk.set_pinned(first_block, n_blocks, True)

    def unpin_vdisk_range(self, guest_id: int, first_block: int, n_blocks: int) -> None:
        self._guest(guest_id).vdisk.set_pinned(first_block, n_blocks, False)

    # -- virtual disks ---------------------------------------------------------------

    async def vdisk_read(self, guest_id: int, blocks: np.ndarray | bytes, vt_us: float) -> tuple[np.ndarray, float]:
        """Read blocks through the host cache; returns their tokens and the completion time."""
        g = self._guest(guest_id)
        vd = g.vdisk
        one = one_page_number(blocks, guest_id, "block", vd.n_blocks)
        if one is not None:
            start_us = await self._room_for_io(g, lambda: vd.frames_needed_read_one(one), vt_us)
            res = vd.read_one(one, start_us)
            self._count_double_faults(g, res.swapped_in_pages)
            return res.tokens, res.done_vt_us
        blocks = vd.check_blocks(blocks)
        start_us = await self._room_for_io(g, lambda: vd.frames_needed_read(blocks), vt_us)
        res = vd.read(blocks, start_us)
        self._count_double_faults(g, res.swapped_in_pages)
        return res.tokens, res.done_vt_us

    async def vdisk_write(self, guest_id: int, blocks: np.ndarray | bytes, tokens: np.ndarray | bytes,
                          vt_us: float) -> float:
        """Write distinct blocks through; returns the completion time."""
        g = self._guest(guest_id)
        vd = g.vdisk
        one = one_page_number(blocks, guest_id, "block", vd.n_blocks)
        token = one_token(tokens) if one is not None else None
        if one is not None and token is not None:
            start_us = await self._room_for_io(g, lambda: vd.frames_needed_write_one(one), vt_us)
            res = vd.write_one(one, token, start_us)
            self._count_double_faults(g, res.swapped_in_pages)
            if self._observer is not None:
                self._observer.disk_written(
                    guest_id, blocks if isinstance(blocks, np.ndarray) else np.array((one,), np.int64),
                    tokens if isinstance(tokens, np.ndarray) else np.array((token,), np.uint64))
            return res.done_vt_us
        blocks = vd.check_blocks(blocks, unique=True)
        tokens = vd.check_tokens(blocks, tokens)
        start_us = await self._room_for_io(g, lambda: vd.frames_needed_write(blocks), vt_us)
        res = vd.write(blocks, tokens, start_us)
        self._count_double_faults(g, res.swapped_in_pages)
        if self._observer is not None:
            self._observer.disk_written(guest_id, blocks, tokens)
        return res.done_vt_us

    async def _room_for_io(self, g: _Guest, need: Callable[[], int], vt_us: float) -> float:
        start_us = float(vt_us)
        tried = False
        while True:
            g = self._same_guest(g)
            n = need()
            if self._room_ok(n, tried):
                if start_us > vt_us:
                    self.counters.direct_reclaims += 1
                return start_us
            start_us = max(start_us, await self._make_room(n, vt_us))
            tried = True

    def _count_double_faults(self, g: _Guest, pages: int) -> None:
        self.counters.swap_in_pages += pages
        self.counters.swap_in_cache_pages += pages
        g.counters.swap_in_pages += pages

    def set_vdisk_profile(self, guest_id: int, profile: DiskProfile | str) -> None:
        self._guest(guest_id).vdisk.set_profile(profile)

    def set_swap_profile(self, profile: DiskProfile | str) -> None:
        self.swap.set_profile(profile)

    def vdisk(self, guest_id: int) -> VirtualDisk:
        return self._guest(guest_id).vdisk

    # -- tick ----------------------------------------------------------------------

    def tick(self, vt_us: float) -> None:
        """Once per tick: retire I/O buffers of completed requests, trim disk caches."""
        for g in self._guests.values():
            g.vdisk.retire(vt_us)
            g.vdisk.trim()

    # -- observation ---------------------------------------------------------------

    def guest_counts(self, guest_id: int) -> dict[str, int]:
        """Gauges of one guest, in pages: resident, swapped, ballooned, unbacked, disk cache."""
        g = self._guest(guest_id)
        p = g.p2m.counts()
        return {"guest_pages": g.p2m.guest_pages,
                "resident_pages": p["frame"], "swapped_pages": p["swapped"],
                "ballooned_pages": p["ballooned"], "unbacked_pages": p["unbacked"],
                "max_balloon_pages": g.max_balloon_pages,
                **g.vdisk.counts()}

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges, JSON-serialisable; per-guest under ``guests`` keyed by str(guest_id).

        Host-wide counters (``vdisk_*`` included) cover guests that are gone too.
        """
        kinds = self.pool.counts()
        out: dict[str, Any] = {
            "total_frames": self.pool.total_frames,
            "free_frames": kinds["free"],
            "guest_frames": kinds["guest"],
            "cache_pages": kinds["cache"],
            "iobuf_pages": kinds["iobuf"],
            "busy_frames": int(np.count_nonzero(self.pool.busy)),
            "pinned_frames": int(np.count_nonzero(self.pool.pinned)),
            "swap_slots": self.swap.n_slots,
            "swap_used_slots": self.swap.used_slots,
            **asdict(self.counters),
        }
        vd_totals = dict(self._departed_vdisk)
        guests: dict[str, Any] = {}
        for gid in sorted(self._guests):
            g = self._guests[gid]
            vd = asdict(g.vdisk.counters)
            for k, v in vd.items():
                vd_totals[k] = vd_totals.get(k, 0) + v
            guests[str(gid)] = {**self.guest_counts(gid), **asdict(g.counters),
                                **{f"vdisk_{k}": v for k, v in vd.items()}}
        out.update({f"vdisk_{k}": v for k, v in vd_totals.items()})
        out["double_faults"] = int(vd_totals.get("double_faults", 0))
        out["guests"] = guests
        return out

    # -- deferred shootdowns: placeholders in host swap ---------------------------

    def fill_placeholders(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> int:
        """A late shootdown answer: put its tokens into the guest's slots that still wait for them.

        Returns how many slots were filled (a gpfn faulted back in or
        ballooned meanwhile holds no placeholder any more).
        """
        if guest_id not in self._guests:
            return 0
        return self.swap.fill_placeholders(guest_id, gpfns, tokens)

    def placeholder_slots(self, guest_id: int) -> int:
        """Host swap slots of ``guest_id`` still waiting for their content."""
        return self.swap.placeholders(guest_id)

    # -- the invariant ------------------------------------------------------------

    def check_invariant(self) -> None:
        """The full frame invariant (``hostd.invariant.check_full``); raises ``InvariantViolation``."""
        check_full(self)
