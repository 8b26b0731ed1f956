"""Host memory: ``HostMemory``, made of parts by concern, and the per-request path.

``HostMemory`` is socket-free. Every public method is found on it; each
lives in the module named for what it holds (``hostd/memparts/``), and
the request path lives here:

    memparts/books.py      MemoryBooks: the state (the constructor builds it) and its readers
                           (guest_ids, p2m, vdisk, content, balloon_pages), a guest's record,
                           the collaborators' types (Shootdown, Hold, MemoryObserver)
    memparts/counters.py   HostCounters, GuestCounters: every count host memory keeps
    memparts/guests.py     Guests: add_guest, remove_guest, set_content, device profiles
    memparts/evict.py      Evictions: shootdowns, settling them in guest-id order, pages to host
                           swap or compression, labels, late answers (fill_placeholders)
    memparts/reclaim.py    Reclaim: room for an allocation in its order (host-wide or inside a
                           guest's partition), reclaim, reclaim_victims, count_grant
    memparts/boundary.py   Boundary: tick (buffers, disk cache, device shares), balance (the
                           tick-end reclaim), consumed_frames, vm_allocations
    memparts/release.py    Releases: balloon_inflate, balloon_deflate, report_free
    memparts/bits.py       BitsAndPins: set_ad_bits, pin_gpfns, pin_vdisk_range (and unpin_*)
    memparts/snapshot.py   Readout: snapshot, guest_counts, host_copy
    memory.py (here)       HostMemory: wire, enable_sharing, check_invariant, and the request
                           path: ept_fault (open_tick: the tick's gate), vdisk_read, vdisk_write

Each part is a class over ``MemoryBooks`` and ``HostMemory`` inherits
them all, rather than holding them as objects: the request path runs
once per fault and calls into several parts (room, reclaim, evictions,
labels), and one object keeps those calls direct, with no delegating
layer. A part changes only the books and calls only the parts it is
built on (reclaim on evict, boundary on reclaim).

Its collaborators come in its constructor, or, for the two that need
host memory themselves, in one ``wire`` call (``hostd.assembly`` does
both; nothing else sets them):

- ``victim``: the blind victim policy (``hostd.victim``);
- ``shootdown``: an ``async (guest_id, gpfns uint64) -> tokens uint64`` that
  sends the guest the TLB-shootdown (invalidate) RPC and returns the content
  tokens the guest held for those gpfns (``hostd.shootdown``). The host
  waits for it before it reuses the frames;
- ``observer``: the host's monitors, told of swap-ins and disk writes as they
  happen (``MemoryObserver``);
- ``callout``: see "Concurrency" below;
- ``hold``: where the discipline parks a request whose grant ran out
  (``memparts.reclaim``).

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

Costs in virtual time: an EPT fault costs ``ept_fault_us`` per page asked
for; if the pool could not serve it without reclaiming, it also waits for
those swap-out writes (direct reclaim, ``memparts.reclaim``); swapped pages
add a read on the guest's lane of the swap device. Refilling the watermark
alone costs the vCPU nothing.

Host swap is one file per guest with a swap cache (``hostd.hostswap``);
it holds guest pages only. The virtual disks' cache (``hostd.vdisk``,
``hostd.hostcache``) is dropped or written back, never host-swapped: the
victim policies only see guest frames. Under pressure a request first
drops its own guest's clean cache clusters, then host-swaps.
"""
from __future__ import annotations

import math
from typing import Any, Awaitable, Callable, Coroutine

import numpy as np

from balloonlab.proto.tokens import KEEP_TOKEN, LATER_TOKEN

from .errors import BadBatch, InvalidState, InvariantViolation
from .framepool import FrameKind
from .hostswap import PENDING_TOKEN
from .invariant import check_full
from .p2m import PageState, as_page_numbers, one_page_number, one_token
from .chainsteps import chain_steps
from .readchain import run_chain
from .memparts.bits import BitsAndPins
from .memparts.books import _BALLOONED, _COMPRESSED, _FRAME, _SHARED, _SWAPPED, _ZERO, MemoryObserver, Shootdown, _Guest
from .memparts.boundary import Boundary
from .memparts.counters import GuestCounters, HostCounters
from .memparts.guests import MAX_BALLOON_FRACTION_DEFAULT, Guests, default_max_balloon_pages
from .memparts.reclaim import Reclaimed
from .memparts.release import Releases
from .memparts.snapshot import Readout
from .sharing import PageSharing

__all__ = ["HostMemory", "HostCounters", "GuestCounters", "Reclaimed", "Shootdown", "MemoryObserver",
           "MAX_BALLOON_FRACTION_DEFAULT", "default_max_balloon_pages"]

_GUEST_KIND = int(FrameKind.GUEST)
# On the fault path the masks are small: these C calls cost a fraction of ``np.any(m)`` / ``m.any()``,
# ``np.flatnonzero`` and ``np.cumsum``, which go through Python wrappers.
_nz = np.count_nonzero
_NO_TOKENS = np.zeros(0, np.uint64)


class HostMemory(Guests, Boundary, Releases, BitsAndPins, Readout):
    """Host memory (the module docstring): its parts, and the per-request path."""

    def enable_sharing(self, scan_pages_per_s: float) -> PageSharing:
        """Turn page sharing on (``hostd.sharing``), before any guest joins."""
        if self._guests:
            raise RuntimeError("page sharing must be on before guests join")
        self.sharing = PageSharing(self, scan_pages_per_s)
        return self.sharing

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

    # -- EPT faults -------------------------------------------------------------

    async def ept_fault(self, guest_id: int, gpfns: np.ndarray | bytes, vt_us: float,
                        fresh: bytes = b"") -> tuple[np.ndarray, float]:
        """Back ``gpfns``; returns their content tokens (0 = fresh zero page) and the completion time.

        A gpfn already backed gets ``KEEP_TOKEN``: its frame was never taken,
        so its content is what the guest last wrote, which the host does not
        know (the token stored when it backed the frame is stale). The same
        gpfn twice is refused (``BAD_FIELD``), as is a ballooned one: the
        guest must deflate it first. ``fresh`` (``np.packbits`` over ``gpfns``, or empty) marks pages the
        guest overwrites whole before reading: one in host swap comes back
        as token 0 without a swap-in read, and its slot's content is dropped.
        The pages are served one after another in the order sent, as one vCPU
        takes them; in a tick with a gate (``open_tick``) those whose turn
        comes after it get ``LATER_TOKEN`` and stay as they were.
        """
        g = self._guest(guest_id)
        one = one_page_number(gpfns, guest_id, "gpfn", g.p2m.guest_pages)
        if one is not None:
            return await self._ept_fault_one(g, one, vt_us, bool(fresh) and self._fresh_bits(g, fresh, 1)[0])
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        n = int(gpfns.size)
        if n > 1 and (not fresh or len(fresh) == -(-n // 8)):
            got = self._ept_fault_first(g, gpfns, vt_us)
            if got is not None:
                return got
        fresh_bits = self._fresh_bits(g, fresh, n) if fresh else np.zeros(n, bool)
        any_fresh = bool(_nz(fresh_bits))
        # The pages in gpfn order (as they are backed and their frames taken): ``order`` maps them back
        # to their places in the message. gpfns are distinct, so no np.unique and no np.isin is needed.
        order_all = gpfns.argsort(kind="stable")
        order = order_all
        uniq = gpfns[order]
        # A SHARED gpfn faults on a write (it is write-protected): the copy-on-write break. It takes
        # a frame like an unbacked page; its content is the guest's (KEEP_TOKEN), copied unless fresh.
        start_us = float(vt_us)
        tried = False
        served = n                   # how many of gpfns, in the order sent, this fault backs (see _fault_fit)
        costs = None                 # the last fit's per-page costs, while no await has changed the books
        while True:
            g = self._same_guest(g)
            gate_us = self._fault_gate(vt_us)
            if gate_us is not None and n > 1:
                served, costs = self._fault_fit(g, gpfns, fresh_bits, start_us, gate_us)
                order = order_all if served == n else gpfns[:served].argsort(kind="stable")
                uniq = gpfns[order]
            state = g.p2m.state[uniq]
            self._refuse_ballooned(g, uniq, state)
            backed = state == _FRAME
            if _nz(backed) and _nz(self.pool.busy[g.p2m.loc[uniq[backed]]]):
                # Its eviction is in flight: the guest may already have dropped it.
                await self._wait_eviction_settled()
                continue
            swapped_u = uniq[state == _SWAPPED]
            if self._placeholders_pending(g, swapped_u):
                costs = None
                if await self._placeholders_wait(g, swapped_u):
                    continue
            need = int(uniq.size - np.count_nonzero(backed))
            if self._room_ok(need, tried, g):
                break
            start_us = max(start_us, await self._make_room(need, vt_us, g))
            tried = True

        chain_us = None
        if gate_us is not None and n > 1:
            # Bounded by the tick's end: the pages in the order sent, one after another, the last one
            # started before the gate; the rest are answered LATER_TOKEN (the guest faults them again).
            if costs is not None:
                costs = (costs[0][:served], costs[1][:served])
            served, chain_us = self._fault_chain(g, gpfns[:served], fresh_bits[:served], start_us, gate_us, costs)
            if served < uniq.size:
                order = gpfns[:served].argsort(kind="stable")
                uniq = gpfns[order]
                state = g.p2m.state[uniq]
                backed = state == _FRAME
            self.counters.ept_fault_later_pages += int(n - served)
            self.counters.ept_faults_cut += int(served < n)
        unbacked = ~backed
        todo = uniq[unbacked]
        todo_state = state[unbacked]
        was_swapped = todo_state == _SWAPPED
        was_zip = None
        if self.zip is not None:
            was_zip = (todo_state == _COMPRESSED) | (todo_state == _ZERO)
        is_fresh = np.zeros(todo.size, bool) if was_zip is not None else None
        was_shared = todo_state == _SHARED
        n_cow = int(np.count_nonzero(was_shared))
        cow_from = g.p2m.loc[todo[was_shared]] if n_cow else None
        if any_fresh:
            is_fresh = fresh_bits[order][unbacked]
            dropped = todo[was_swapped & is_fresh]
            if dropped.size:
                # The guest overwrites it whole: no read; the old content goes.
                self.swap.drop(g.p2m.loc[dropped])
                g.labels[dropped] = False
                self.counters.fresh_swapins_avoided += int(dropped.size)
                g.counters.fresh_swapins_avoided += int(dropped.size)
                self.swap.fresh_drops += int(dropped.size)
            was_swapped &= ~is_fresh
        swapped = todo[was_swapped]
        slots = g.p2m.loc[swapped]
        tokens = np.zeros(todo.size, np.uint64)
        if swapped.size:
            tokens[was_swapped] = self.swap.swap_in(slots)
        zip_us = 0.0
        if was_zip is not None and _nz(was_zip):
            # Decompressed (CPU, no I/O) or a fresh zero page; a fresh one drops its old swap-cache copy too.
            zp = todo[was_zip]
            zfresh = is_fresh[was_zip]  # type: ignore[index]
            tokens[was_zip], zip_us = self.zip.take_out(guest_id, zp, todo_state[was_zip], zfresh)  # type: ignore[union-attr]
            if _nz(zfresh):
                self.swap.drop(self.swap.slots_of(guest_id, zp[zfresh]))
        if swapped.size:
            self._count_labelled_reads(g, swapped)
            if self._observer is not None:
                self._observer.guest_pages_swapped_in(guest_id, swapped, tokens[was_swapped])
        frames = self.pool.alloc(todo.size, _GUEST_KIND, guest_id, todo, tokens)
        self.pool.accessed[frames] = True          # the guest is touching it right now
        self.pool.pinned[frames] = g.p2m.pinned[todo]
        g.p2m.set(todo, _FRAME, frames)  # type: ignore[arg-type]
        n_fresh = 0
        if n_cow:
            n_fresh = int(np.count_nonzero(is_fresh[was_shared])) if any_fresh else 0  # type: ignore[index]
            assert self.sharing is not None
            self.sharing.cow(guest_id, cow_from, n_fresh)  # type: ignore[arg-type]

        if start_us > vt_us:
            self.counters.direct_reclaims += 1
        if chain_us is not None:
            done_us = chain_us
        else:
            done_us = start_us
            if swapped.size:
                # One vCPU faults its pages one at a time, however many one message carries.
                done_us = self.swap.disk.submit_serial(guest_id, start_us, slots)
            done_us += self.costs.ept_fault_us * uniq.size + zip_us
            if n_cow:
                done_us += self.costs.page_copy_us * (n_cow - n_fresh)

        c, gc = self.counters, g.counters
        c.ept_fault_calls += 1
        gc.ept_fault_calls += 1
        c.ept_faults += int(todo.size - n_cow)
        gc.ept_faults += int(todo.size - n_cow)
        c.ept_fault_spurious_pages += int(uniq.size - todo.size)
        c.swap_in_pages += int(swapped.size)
        gc.swap_in_pages += int(swapped.size)
        gc.ept_fault_swapins += int(swapped.size)
        if served < n:
            tokens = np.full(n, LATER_TOKEN, np.uint64)
            tokens[:served] = self.pool.token[g.p2m.loc[gpfns[:served]]]
        else:
            tokens = self.pool.token[g.p2m.loc[gpfns]]
        # Backed already: the guest holds their content, not us; so were the shared ones, now copied.
        if todo.size != uniq.size:
            tokens[order[backed]] = KEEP_TOKEN
        if n_cow:
            tokens[order[unbacked][was_shared]] = KEEP_TOKEN
        return tokens, done_us

    async def _ept_fault_one(self, g: _Guest, gpfn: int, vt_us: float,
                             fresh: bool = False) -> tuple[np.ndarray, float]:
        """``ept_fault`` of one gpfn, in scalars: the same books, the same frame, the same times.

        ``tests/test_host_one_page.py`` drives it side by side with the array path.
        """
        start_us = float(vt_us)
        tried = False
        pool = self.pool
        while True:
            g = self._same_guest(g)
            p2m = g.p2m
            state = p2m.state_mv[gpfn]
            if state == _BALLOONED:
                raise InvalidState(g.guest_id, "gpfn", gpfn, "BALLOONED", "deflate it before touching it")
            backed = state == _FRAME
            if backed and pool.busy_mv[p2m.loc_mv[gpfn]]:
                # Its eviction is in flight: the guest may already have dropped it.
                await self._wait_eviction_settled()
                continue
            # ``_placeholders_wait`` returns at once unless the slot holds a placeholder: ask only then
            if state == _SWAPPED and self.swap.token[p2m.loc_mv[gpfn]] == PENDING_TOKEN \
                    and await self._placeholders_wait(g, np.array((gpfn,), np.int64)):
                continue
            need = 0 if backed else 1
            if self._room_ok(need, tried, g):
                break
            start_us = max(start_us, await self._make_room(need, vt_us, g))
            tried = True

        swapped = state == _SWAPPED
        zip_us = 0.0
        shared_from = p2m.loc_mv[gpfn] if state == _SHARED else -1
        if not backed:
            token = 0
            if state == _COMPRESSED or state == _ZERO:
                gp = np.array((gpfn,), np.int64)
                toks, zip_us = self.zip.take_out(g.guest_id, gp, np.array((state,), np.uint8),  # type: ignore[union-attr]
                                                 np.array((fresh,), bool))
                token = int(toks[0])
                if fresh:
                    self.swap.drop_one(int(self.swap.slots_of(g.guest_id, gp)[0]))
            if swapped and fresh:
                # The guest overwrites it whole: no read; the old content goes.
                self.swap.drop_one(p2m.loc_mv[gpfn])
                g.labels[gpfn] = False
                self.counters.fresh_swapins_avoided += 1
                g.counters.fresh_swapins_avoided += 1
                self.swap.fresh_drops += 1
                swapped = False
            if swapped:
                slot = p2m.loc_mv[gpfn]
                token = self.swap.swap_in_one(slot)
                if g.labels[gpfn]:
                    self._count_labelled_reads(g, np.array((gpfn,), np.int64))
                if self._observer is not None:
                    self._observer.guest_pages_swapped_in(g.guest_id, np.array((gpfn,), np.int64),
                                                          np.array((token,), np.uint64))
            f = pool.alloc_one(_GUEST_KIND, g.guest_id, gpfn, token)
            if f < 0:
                raise InvariantViolation(f"guest {g.guest_id}: host memory made room for too few frames")
            pool.accessed_mv[f] = True          # the guest is touching it right now
            pool.pinned_mv[f] = p2m.pinned_mv[gpfn]
            p2m.state_mv[gpfn] = _FRAME
            p2m.loc_mv[gpfn] = f
            if shared_from >= 0:                  # the copy-on-write break (see ept_fault)
                assert self.sharing is not None
                self.sharing.cow(g.guest_id, np.array((shared_from,), np.int64), int(fresh))

        if start_us > vt_us:
            self.counters.direct_reclaims += 1
        done_us = start_us
        if swapped:
            done_us = self.swap.disk.submit(g.guest_id, start_us, 1, write=False, offset=slot)
        done_us += self.costs.ept_fault_us * 1 + zip_us
        if shared_from >= 0 and not fresh:
            done_us += self.costs.page_copy_us

        c, gc = self.counters, g.counters
        c.ept_fault_calls += 1
        gc.ept_fault_calls += 1
        if backed:
            c.ept_fault_spurious_pages += 1
        elif shared_from < 0:
            c.ept_faults += 1
            gc.ept_faults += 1
        if swapped:
            c.swap_in_pages += 1
            gc.swap_in_pages += 1
            gc.ept_fault_swapins += 1
        if backed or shared_from >= 0:   # the guest holds its content, not us (see ept_fault)
            return np.array((KEEP_TOKEN,), np.uint64), done_us
        f = p2m.loc_mv[gpfn]
        return pool.token[f:f + 1].copy(), done_us

    def _placeholders_pending(self, g: _Guest, swapped_gpfns: np.ndarray) -> bool:
        """Whether a slot of these (SWAPPED) gpfns holds a deferred shootdown's placeholder."""
        return bool(swapped_gpfns.size) and bool(_nz(self.swap.token[g.p2m.loc[swapped_gpfns]] == PENDING_TOKEN))

    async def _placeholders_wait(self, g: _Guest, swapped_gpfns: np.ndarray) -> bool:
        """Wait if a slot of these gpfns still holds a deferred shootdown's placeholder; True if it waited.

        The fault handler lets deferred shootdowns settle before it starts,
        but one can begin while this fault waits for room (a silent guest's
        memory is reclaimed at tick ends): a placeholder must never be handed
        back as content, so the check is made here, where the slot is read.
        """
        if not self._placeholders_pending(g, swapped_gpfns):
            return False
        if self._placeholders_settled is None:
            raise InvariantViolation(f"guest {g.guest_id}: a swap slot holds a placeholder and nothing settles it")
        await self._placeholders_settled(g.guest_id)
        if _nz(self.swap.token[g.p2m.loc[swapped_gpfns[g.p2m.state[swapped_gpfns] == PageState.SWAPPED]]]
                  == PENDING_TOKEN):
            # Settled, but the answer did not fill it (the guest failed the shootdown): the page is lost;
            # hand it over as it is and let the guest's check say so, rather than wait for ever.
            return False
        return True

    # -- faults bounded by the tick's end ------------------------------------------

    def open_tick(self, tick_end_us: float | None, *, bound_faults: bool = True) -> None:
        """The tick now running ends at ``tick_end_us``, where the guests park (None: they do not).

        A fault of several pages is then served as the vCPU would take them,
        one after another in the order sent, and stops at the gate: every page
        whose service starts before ``tick_end_us`` is backed (the last may
        end past it: the one request in flight), the rest are answered
        ``LATER_TOKEN`` and the guest faults them again in the next tick. One
        message of hundreds of host-swapped pages used to read them all, one
        after another, 10-40 virtual ms past the tick's end.

        Without ``bound_faults`` (the run's last tick, where a guest lets the fault in flight finish
        whole) faults are not cut; read chains still stop at ``tick_end_us``, where the vCPU stops
        sending requests of its own accord.
        """
        end = None if tick_end_us is None else float(tick_end_us)
        self.chain_gate_us = end
        self.fault_gate_us = end if bound_faults else None

    def _ept_fault_first(self, g: _Guest, gpfns: np.ndarray, vt_us: float) -> tuple[np.ndarray, float] | None:
        """``ept_fault`` of distinct gpfns none of which has content yet (first touches), when the room is
        there at once: the same frames, books and times in a few calls; None (nothing changed) otherwise.

        A first touch reads nothing and costs ``ept_fault_us``: the gate's cut
        (``_fault_fit``, ``_fault_chain``) is a running sum of that, added in
        the same order, so the floats are the same. Whether a page is fresh
        does not matter to a page with no content. ``tests/test_ept_first.py``
        drives it side by side with the array path.
        """
        p2m = g.p2m
        if _nz(p2m.state[gpfns]):     # UNBACKED is 0
            return None
        n = int(gpfns.size)
        start_us = float(vt_us)
        each_us = self.costs.ept_fault_us
        gate_us = self._fault_gate(vt_us)
        if gate_us is None:
            served = n
            done_us = start_us + each_us * n
        else:
            served, cum = 0, 0.0
            while served < n and (served == 0 or start_us + cum < gate_us):   # page k starts at start + cum
                cum += each_us
                served += 1
            done_us = start_us + cum
        if not self._room_ok(served, False, g):
            return None
        todo = gpfns[:served].copy()
        todo.sort()             # frames are taken in gpfn order
        if not self.pool.alloc_pages(_GUEST_KIND, g.guest_id, todo, p2m.pinned, p2m.state, p2m.loc, _FRAME):
            raise InvariantViolation(f"guest {g.guest_id}: host memory made room for too few frames")
        c, gc = self.counters, g.counters
        if gate_us is not None:
            c.ept_fault_later_pages += n - served
            c.ept_faults_cut += int(served < n)
        c.ept_fault_calls += 1
        gc.ept_fault_calls += 1
        c.ept_faults += served
        gc.ept_faults += served
        tokens = np.zeros(n, np.uint64)     # zero pages, every one
        if served < n:
            tokens[served:] = LATER_TOKEN
        return tokens, done_us

    def _fault_gate(self, vt_us: float) -> float | None:
        """The gate a fault sent at ``vt_us`` stops at; None: unbounded (no ticks, or sent past the gate:
        the run's last tick lets a fault in flight finish whole)."""
        gate = self.fault_gate_us
        return gate if gate is not None and vt_us < gate else None

    def _fault_costs(self, g: _Guest, gpfns: np.ndarray, fresh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per page of a fault, in the order sent: its swap slot when it needs a read (else -1), and the
        CPU time it costs on top (the exit, a decompression, a copy-on-write copy)."""
        state = g.p2m.state[gpfns]
        kept = ~fresh
        slot = np.where((state == _SWAPPED) & kept, g.p2m.loc[gpfns], -1)
        extra = np.full(gpfns.size, self.costs.ept_fault_us)
        if self.zip is not None:
            extra[(state == _COMPRESSED) & kept] += self.zip.cfg.decompress_page_us
        shared = (state == _SHARED) & kept
        if _nz(shared):
            extra[shared] += self.costs.page_copy_us
        return slot, extra

    def _fault_fit(self, g: _Guest, gpfns: np.ndarray, fresh: np.ndarray, start_us: float,
                   gate_us: float) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
        """How many of ``gpfns`` can start before the gate: at least as many as ``_fault_chain`` will serve.

        Each read costs its service time at the lane's speed with no wait
        for a channel, so the estimate never falls short; the fault makes
        room for these only, not for pages the next tick will fault. Also
        returns ``_fault_costs``, which the chain reuses while the books
        have not changed.
        """
        slot, extra = self._fault_costs(g, gpfns, fresh)
        io = slot >= 0
        cost = extra
        if _nz(io):
            cost = extra.copy()
            cost[io] += self.swap.disk.chain_read_us(g.guest_id, slot[io])
        starts = np.empty(cost.size)
        starts[0] = 0.0
        cost[:-1].cumsum(out=starts[1:])
        starts += start_us
        return max(1, int(starts.searchsorted(gate_us, side="left"))), (slot, extra)

    def _fault_chain(self, g: _Guest, gpfns: np.ndarray, fresh: np.ndarray, start_us: float,
                     gate_us: float, costs: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[int, float]:
        """Serve ``gpfns`` one after another from ``start_us``, up to the gate: (pages served, done_vt_us).

        The first page is always served (a fault makes progress); a later one
        only if its turn comes before ``gate_us``. Reads go on the guest's
        lane of the swap device one at a time, each after the page before.
        Loops over the pages that read only; the others advance by their CPU
        time, found in a cumulative sum.
        """
        slot, extra = self._fault_costs(g, gpfns, fresh) if costs is None else costs
        n = int(gpfns.size)
        cum = np.empty(n + 1)
        cum[0] = 0.0
        extra.cumsum(out=cum[1:])
        disk, gid = self.swap.disk, g.guest_id
        t = float(start_us)
        i = 0
        for j in [*(slot >= 0).nonzero()[0].tolist(), n]:
            if j > i:     # pages i .. j-1 read nothing: page p starts at t + cum[p] - cum[i]
                starts = t + (cum[i:j] - cum[i])
                first = 1 if i == 0 else 0
                late = (starts[first:] >= gate_us).nonzero()[0]
                if late.size:
                    k = i + first + int(late[0])
                    return k, t + float(cum[k] - cum[i])
                t += float(cum[j] - cum[i])
            if j == n:
                break
            if j > 0 and t >= gate_us:
                return j, t
            t = disk.submit(gid, t, 1, write=False, offset=int(slot[j])) + float(extra[j])
            i = j + 1
        return n, t

    def _fresh_bits(self, g: _Guest, fresh: bytes, n: int) -> np.ndarray:
        raw = np.frombuffer(fresh, np.uint8)
        if raw.size != -(-n // 8):
            raise BadBatch(f"guest {g.guest_id}: fresh bits have {raw.size} bytes for {n} gpfns, "
                           f"expected {-(-n // 8)} (or none)")
        return np.unpackbits(raw, count=n).astype(bool)

    def _refuse_ballooned(self, g: _Guest, gpfns: np.ndarray, state: np.ndarray) -> None:
        ballooned = state == _BALLOONED
        if _nz(ballooned):
            raise InvalidState(g.guest_id, "gpfn", int(gpfns[np.flatnonzero(ballooned)[0]]), "BALLOONED",
                               "deflate it before touching it")

    # -- a request's room, and what its swap-ins count ---------------------------

    def _room_ok(self, need: int, tried: bool, g: _Guest | None = None) -> bool:
        """Can an allocation of ``need`` frames go ahead now?

        Every allocation first tries to keep ``low_watermark_frames`` free
        beyond what it takes (``tried`` says it did); it only has to have
        ``need``. Inside a partition, the guest's grant must hold ``need``.
        """
        if need == 0:
            return True
        pool = self.pool
        if g is not None:
            left = pool.grant_left(g.guest_id)
            if left >= 0:
                return left >= need
        free = pool.free_frames
        return free >= need and (tried or free >= need + self.low_watermark_frames)

    def _count_labelled_reads(self, g: "_Guest", gpfns: np.ndarray) -> None:
        """Swap-in reads of pages labelled clean cache when they went out (the label is used up)."""
        labelled = gpfns[g.labels[gpfns]]
        if labelled.size:
            self.counters.clean_cache_swap_read_pages += int(labelled.size)
            g.counters.clean_cache_swap_read_pages += int(labelled.size)
            g.labels[labelled] = False

    # -- virtual disks ---------------------------------------------------------------

    async def vdisk_read(self, guest_id: int, blocks: np.ndarray | bytes, vt_us: float) -> tuple[np.ndarray, float]:
        """Read blocks through the host cache; returns their tokens and the completion time."""
        got = self.vdisk_read_now(guest_id, blocks, vt_us)
        return got if type(got) is tuple else await got

    def vdisk_read_now(self, guest_id: int, blocks: np.ndarray | bytes,
                       vt_us: float) -> tuple[np.ndarray, float] | Coroutine[Any, Any, tuple[np.ndarray, float]]:
        """``vdisk_read``: its result now when the read need not wait (the usual one-block read), else a
        coroutine that finishes it. A request handler answers the first without a coroutine of its own."""
        g = self._guest(guest_id)
        vd = g.vdisk
        one = one_page_number(blocks, guest_id, "block", vd.n_blocks)
        if one is not None and vd.mode != "none":      # cached
            # The usual request, in scalars: the same drops, frames and times as the array path below.
            # A hit needs no room and drops nothing (need 0).
            start_us, need = vd.fit_one(one, vt_us)
            if need and not self._room_ok(need, False, g):   # else _room_for_io returns at once
                return self._vdisk_read_one_later(g, one, start_us)
            return vd.read_one_reply(one, start_us)
        return self._vdisk_read_many(g, one, blocks, vt_us)

    def vdisk_read_chain(self, guest_id: int, first: tuple[np.ndarray, float], vt_us: float,
                         chain: list[float], can_fault: Callable[[], bool] = lambda: True
                         ) -> tuple[np.ndarray, float, bytes]:
        """A one-block read served at once (``first``), then the requests chained onto it
        (``hostd.readchain``): (tokens, done_vt_us of the last, chain_vt_us). Only requests that need
        not wait are chained; ``can_fault`` says whether an EPT fault may go now (no shootdown of this
        guest waiting to settle)."""
        tokens0, done0 = first
        gate = self.chain_gate_us
        if gate is None or self.read_chain <= 0:
            return tokens0, done0, b""
        served = self._serve_chain(guest_id, can_fault, chain, vt_us, int(tokens0[0]), float(done0))
        if served is None or len(served[1]) == 1:
            return tokens0, done0, b""
        toks, times, faults = served
        vd = self._guest(guest_id).vdisk
        vd.counters.chained_reads += (len(times) - 1) // 2 - faults
        vd.counters.chained_faults += faults
        return np.array(toks, np.uint64), times[-1], np.array(times, np.float64).tobytes()

    def vdisk_chain_ahead(self, guest_id: int, vt_us: float, chain: list[float],
                          can_fault: Callable[[], bool] = lambda: True) -> tuple[np.ndarray, bytes]:
        """A batch's first requests from its first reference at ``vt_us`` (``TickDone.ahead``), served
        before the guest runs it, as chained ones (none that could wait): (tokens, a float64 start and
        completion per request served). Only a program whose deadline is this tick's end is served."""
        gate = self.chain_gate_us
        if gate is None or self.read_chain <= 0 or chain[0] != gate or not vt_us < gate:
            return _NO_TOKENS, b""
        served = self._serve_chain(guest_id, can_fault, chain, vt_us, None, None)
        if served is None or not served[1]:
            return _NO_TOKENS, b""
        toks, times, faults = served
        vd = self._guest(guest_id).vdisk
        vd.counters.ahead_reads += len(times) // 2 - faults
        vd.counters.ahead_faults += faults
        return np.array(toks, np.uint64), np.array(times, np.float64).tobytes()

    def _serve_chain(self, guest_id: int, can_fault: Callable[[], bool], chain: list[float], vt_us: float,
                     token0: int | None, done0: float | None) -> tuple[list[int], list[float], int] | None:
        """``run_chain`` of ``chain`` (``token0``/``done0``: its first read's answer, or None for a batch's
        program) with this guest's steps, each one read or EPT fault served without a wait (a step that
        would wait ends the chain): (tokens, times, EPT faults served); None: this guest's disk serves
        no chains."""
        g = self._guest(guest_id)
        vd, pool, p2m = g.vdisk, self.pool, g.p2m
        if vd.mode == "none":
            return None
        faults = 0
        n_blocks, need_of, grant_left, token_of = vd.n_blocks, vd.need_bound_one, pool.grant_left, pool.token_mv

        def read(blk: int, vt: float) -> tuple[int, float] | None:
            # ``vdisk_read_now`` of one block, its scalar path without the wire's bytes and arrays of one
            if not 0 <= blk < n_blocks:
                return None
            need = need_of(blk)
            if need:
                # (no grant: -1, and the chain stops; so past here ``_room_ok`` is the grant's check)
                if grant_left(guest_id) < need:   # it might wait for room: not in a chain
                    return None
                start, _ = vd.fit_one(blk, vt, need)
                if grant_left(guest_id) < need:
                    raise InvariantViolation(f"guest {guest_id}: chained read of block {blk} waited for room "
                                             f"its grant held ({need} frames)")
            else:
                start = float(vt)       # a hit: ``fit_one`` drops nothing
            f, done = vd.read_one_frame(blk, start)
            return token_of[f], float(done)

        def fault(gpfns: list[int], vt: float) -> tuple[list[int], float, bool] | None:
            nonlocal faults
            n = len(gpfns)
            if not can_fault() or len(set(gpfns)) != n or min(gpfns) < 0 or max(gpfns) >= p2m.guest_pages:
                return None
            pages = np.array(gpfns, np.int64)
            if n > 1:
                first = self._ept_fault_first(g, pages, vt)     # (first touches: no wait to check for)
                if first is not None:
                    faults += 1
                    tokens, done = first
                    return tokens.tolist(), done, bool(tokens[-1] == LATER_TOKEN)
            state = p2m.state[pages]
            backed = state == _FRAME
            # the waits ept_fault may make, checked first: it must finish without one
            if _nz(state == _BALLOONED) or (_nz(backed) and _nz(pool.busy[p2m.loc[pages[backed]]])) \
                    or self._placeholders_pending(g, pages[state == _SWAPPED]) \
                    or not self._room_ok(n - int(np.count_nonzero(backed)), False, g):
                return None
            run = self.ept_fault(guest_id, pages.astype(np.uint64), vt, np.packbits(np.ones(n, bool)).tobytes())
            try:
                run.send(None)
            except StopIteration as stop:
                tokens, done = stop.value
            else:
                run.close()
                raise InvariantViolation(f"guest {guest_id}: a chained EPT fault of {n} pages waited")
            faults += 1
            toks = tokens.tolist()
            return toks, float(done), LATER_TOKEN in toks

        gate = self.chain_gate_us
        assert gate is not None
        fault_gate = self.fault_gate_us
        # first touches of several pages served compiled, as ``_ept_fault_first`` serves them above
        ept = (p2m, self.counters, g.counters, self.costs.ept_fault_us, math.nan if fault_gate is None else fault_gate,
               _GUEST_KIND, _FRAME, LATER_TOKEN)
        fast = chain_steps(vd, chain, self.read_chain, gate, ept, can_fault)
        toks, times = run_chain(chain, vt_us, token0, done0, self.read_chain, gate, read, fault, fast)
        return toks, times, faults + (fast.faults if fast is not None else 0)

    async def _vdisk_read_one_later(self, g: _Guest, one: int, start_us: float) -> tuple[np.ndarray, float]:
        vd = g.vdisk
        start_us = await self._room_for_io(g, lambda: vd.frames_needed_one(one), start_us)
        return vd.read_one_reply(one, start_us)

    async def _vdisk_read_many(self, g: _Guest, one: int | None, blocks: np.ndarray | bytes,
                               vt_us: float) -> tuple[np.ndarray, float]:
        vd = g.vdisk
        blocks = np.array((one,), np.int64) if one is not None else vd.check_blocks(blocks)
        start_us = vd.fit_allowance(blocks, vt_us, write=False)
        start_us = await self._room_for_io(g, lambda: vd.frames_needed_read(blocks), start_us)
        res = vd.read(blocks, start_us)
        return res.tokens, res.done_vt_us

    async def vdisk_write(self, guest_id: int, blocks: np.ndarray | bytes, tokens: np.ndarray | bytes,
                          vt_us: float) -> float:
        """Write distinct blocks in the disk's cache mode; returns the completion time."""
        got = self.vdisk_write_now(guest_id, blocks, tokens, vt_us)
        return got if type(got) is float else await got

    def vdisk_write_now(self, guest_id: int, blocks: np.ndarray | bytes, tokens: np.ndarray | bytes,
                        vt_us: float) -> float | Coroutine[Any, Any, float]:
        """``vdisk_write``: its completion time now when the write need not wait (the usual one-block write),
        else a coroutine that finishes it (as ``vdisk_read_now``)."""
        g = self._guest(guest_id)
        vd = g.vdisk
        one = one_page_number(blocks, guest_id, "block", vd.n_blocks)
        token = one_token(tokens) if one is not None and vd.cached else None
        if token is not None:
            # The usual request, in scalars: the same drops, frames and times as the array path below.
            start_us, need = vd.fit_one(one, vt_us)
            if need and not self._room_ok(need, False, g):   # else _room_for_io returns at once
                return self._vdisk_write_one_later(g, one, token, start_us)
            return self._vdisk_write_one(g, one, token, start_us)
        return self._vdisk_write_many(g, one, blocks, tokens, vt_us)

    def _vdisk_write_one(self, g: _Guest, one: int, token: int, start_us: float) -> float:
        done_us = float(g.vdisk.write_one_done(one, token, start_us))
        if self._observer is not None:
            self._observer.disk_written(g.guest_id, np.array((one,), np.int64), np.array((token,), np.uint64))
        return done_us

    async def _vdisk_write_one_later(self, g: _Guest, one: int, token: int, start_us: float) -> float:
        vd = g.vdisk
        start_us = await self._room_for_io(g, lambda: vd.frames_needed_one(one), start_us)
        return self._vdisk_write_one(g, one, token, start_us)

    async def _vdisk_write_many(self, g: _Guest, one: int | None, blocks: np.ndarray | bytes,
                                tokens: np.ndarray | bytes, vt_us: float) -> float:
        vd = g.vdisk
        blocks = np.array((one,), np.int64) if one is not None else vd.check_blocks(blocks, unique=True)
        tokens = vd.check_tokens(blocks, tokens)
        start_us = vd.fit_allowance(blocks, vt_us, write=True)
        start_us = await self._room_for_io(g, lambda: vd.frames_needed_write(blocks), start_us)
        res = vd.write(blocks, tokens, start_us)
        if self._observer is not None:
            self._observer.disk_written(g.guest_id, blocks, tokens)
        return res.done_vt_us

    async def _room_for_io(self, g: _Guest, need: Callable[[], int], vt_us: float) -> float:
        start_us = float(vt_us)
        tried = False
        while True:
            g = self._same_guest(g)
            n = need()
            if self._room_ok(n, tried, g):
                if start_us > vt_us:
                    self.counters.direct_reclaims += 1
                return start_us
            start_us = max(start_us, await self._make_room(n, vt_us, g))
            tried = True

    # -- the invariant ------------------------------------------------------------

    def check_invariant(self) -> None:
        """The full frame invariant (``hostd.invariant.check_full``); raises ``InvariantViolation``."""
        check_full(self)
