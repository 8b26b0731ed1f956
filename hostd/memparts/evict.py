"""Evicting guest frames: the shootdowns, then each page to host swap (or compression), and the books.

``_evict_guest_frames`` marks the frames busy, sends one shootdown per
guest (all concurrently, under the callout), and settles the results in
guest-id order whatever order they come back in: a page still mapped goes
to its slot in the guest's swap file (``hostd.hostswap``; a write unless
the swap cache holds that content), or, with compression on, is dropped as
a zero page or kept compressed (``hostd.compress``). A frame ballooned or
orphaned while its shootdown was pending is dropped; a failed shootdown
leaves the mapping. Waiting for someone else's eviction is
``_wait_eviction_settled``.

A deferred shootdown (a silent guest: ``hostd.shootdown``) leaves a
placeholder in the slot; its late answer fills it (``fill_placeholders``),
or, when it arrives before its eviction is applied, is kept for it.

**Labels** (instrumentation only): a guest's shootdown reply marks the
pages that were clean page cache in the guest (``record_labels``). The
host counts its real swap writes of those pages and their later swap-in
reads (``clean_cache_*`` counters), so the report can show the I/O clean
page cache costs under blind host swapping. Nothing here decides anything
from a label: victims, reclaim and controllers never read them.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from balloonlab.proto.content import ContentMap

from ..errors import BadBatch, InvariantViolation
from ..hostswap import PENDING_TOKEN
from ..p2m import PageState
from .books import MemoryBooks, _Guest

_nz = np.count_nonzero   # on small masks a fraction of np.any's cost; truthy exactly when np.any is

__all__ = ["Evictions"]


class Evictions(MemoryBooks):
    """Part of ``HostMemory``: taking guest frames to host swap, once the guests dropped their mappings."""

    async def _evict_guest_frames(self, frames: np.ndarray, vt_us: float,
                                  compress: bool = True) -> tuple[int, float]:
        """Shoot the frames down and take their pages; ``compress``: the memory state lets compression run."""
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
            # Also on cancellation: un-busy what was not evicted.
            freed, done_us = self._settle_evictions(groups, results, frames, vt_us, compress)
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
                          frames: np.ndarray, vt_us: float, compress: bool = True) -> tuple[int, float]:
        freed = 0
        done_us = float(vt_us)
        for (gid, mine), result in zip(groups, results):
            g_frames = frames[mine]
            gpfns = self.pool.owner_index[g_frames]
            g = self._guests.get(gid)
            # Still the guest's mapping? Balloon inflation or guest death while
            # the shootdown was pending leaves the frame an orphan: drop it.
            live = np.zeros(g_frames.size, bool)
            if g is not None:
                live = (g.p2m.state[gpfns] == PageState.FRAME) & (g.p2m.loc[gpfns] == g_frames)
            if isinstance(result, np.ndarray):
                n_live = int(np.count_nonzero(live))
                zipped = False
                if g is not None and n_live:
                    out = gpfns[live]
                    tokens = result[live]
                    early = self._early_answers.get(gid)
                    if early:
                        tokens = tokens.copy()
                        for i in np.flatnonzero(tokens == PENDING_TOKEN).tolist():
                            tokens[i] = early.pop(int(out[i]), PENDING_TOKEN)
                    to_swap = np.ones(out.size, bool)
                    if self.zip is not None:
                        # Zero pages dropped, compressible ones into the VM's cache (hostd.compress):
                        # the request waits for that CPU work as it would for its swap writes.
                        taken, cpu = self.zip.absorb(gid, g.p2m, out, tokens, self._content(g), compress)
                        to_swap = ~taken
                        zipped = bool(_nz(taken))
                        done_us = max(done_us, vt_us + cpu)
                    write = np.zeros(out.size, bool)
                    if _nz(to_swap):
                        write[to_swap], w_done = self._to_swap(g, out[to_swap], tokens[to_swap], vt_us)
                        done_us = max(done_us, w_done)
                    self._count_evicted(g, out, write, n_live, int(np.count_nonzero(to_swap)))
                if g is not None:
                    g.counters.shootdown_pages += int(gpfns.size)
                self.pool.free(g_frames)
                freed += int(g_frames.size)
                if zipped and g is not None:
                    # The cache's frames come out of the frames just freed (the same partition).
                    before = self.pool.free_frames
                    spill, spill_tok, cpu = self.zip.fit(gid, g.p2m)   # type: ignore[union-attr]
                    freed -= before - self.pool.free_frames
                    if spill.size:
                        write, w_done = self._to_swap(g, spill, spill_tok, vt_us + cpu)
                        done_us = max(done_us, w_done)
                        self._count_spilled(g, spill, write)
                self.counters.swap_out_pages += n_live
                self.counters.dropped_evictions += int(g_frames.size) - n_live
            else:
                # No answer (guest gone, timed out, bad reply, or we were
                # cancelled): the mapping stays; orphans can go.
                if result is not None or g is None:
                    self.counters.shootdown_failures += 1
                early = self._early_answers.get(gid)
                for gp in (gpfns.tolist() if early else ()):
                    early.pop(gp, None)      # an answer to a failed eviction must not fill a later one
                self.pool.busy[g_frames[live]] = False
                self.pool.free(g_frames[~live])
                self.counters.dropped_evictions += int(np.count_nonzero(~live))
                freed += int(np.count_nonzero(~live))
        return freed, done_us

    def _content(self, g: "_Guest") -> ContentMap:
        """The guest's content map (its ContentReport; the empty map until then)."""
        return g.content

    def _to_swap(self, g: "_Guest", gpfns: np.ndarray, tokens: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        """Pages go to their slots in the guest's swap file: SWAPPED; returns the write mask and when written."""
        slots = self.swap.slots_of(g.guest_id, gpfns)
        write = self.swap.store(slots, tokens)
        g.p2m.set(gpfns, PageState.SWAPPED, slots)
        n_write = int(np.count_nonzero(write))
        done_us = float(vt_us)
        if n_write:
            # One request: the slots of one guest's victims, in gpfn order.
            done_us = self.swap.disk.submit(g.guest_id, vt_us, n_write, write=True, offset=int(slots[write][0]))
        return write, done_us

    def _count_spilled(self, g: "_Guest", gpfns: np.ndarray, write: np.ndarray) -> None:
        """The compression cache's oldest pages went to swap: real writes (labelled ones counted as such)."""
        n_write = int(np.count_nonzero(write))
        c, gc = self.counters, g.counters
        gc.swap_write_pages += n_write
        c.swap_write_pages += n_write
        c.swap_writes_avoided += int(gpfns.size) - n_write
        labelled = g.labels[gpfns] & write
        if _nz(labelled):
            n_lab = int(np.count_nonzero(labelled))
            c.clean_cache_swap_write_pages += n_lab
            gc.clean_cache_swap_write_pages += n_lab

    def _count_evicted(self, g: "_Guest", gpfns: np.ndarray, write: np.ndarray, n_live: int,
                       n_to_swap: int | None = None) -> None:
        """``n_to_swap``: the pages that went to swap (the rest were dropped as zero or compressed)."""
        n_write = int(np.count_nonzero(write))
        c, gc = self.counters, g.counters
        gc.swap_out_pages += n_live
        gc.swap_write_pages += n_write
        c.swap_write_pages += n_write
        c.swap_writes_avoided += (n_live if n_to_swap is None else n_to_swap) - n_write
        labelled = g.labels[gpfns]
        if _nz(labelled):
            n_lab = int(np.count_nonzero(labelled))
            n_lab_w = int(np.count_nonzero(labelled & write))
            c.clean_cache_evicted_pages += n_lab
            gc.clean_cache_evicted_pages += n_lab
            c.clean_cache_swap_write_pages += n_lab_w
            gc.clean_cache_swap_write_pages += n_lab_w

    def record_labels(self, guest_id: int, gpfns: np.ndarray, labels: bytes) -> bool:
        """A shootdown reply's labels (``np.packbits`` over ``gpfns``; set = clean page cache in the guest).

        Instrumentation only (see the module docstring). Empty labels mean
        none set. Labels of the wrong length are counted and ignored: a
        guest's oddity must not fail an eviction. Returns whether they were taken.
        """
        g = self._guests.get(guest_id)
        if g is None:
            return False
        gpfns = np.asarray(gpfns, np.int64)
        if gpfns.size == 0 or (gpfns.size and (gpfns.min() < 0 or gpfns.max() >= g.p2m.guest_pages)):
            return False
        if not labels:
            g.labels[gpfns] = False
            return True
        raw = np.frombuffer(labels, np.uint8)
        if raw.size != -(-gpfns.size // 8):
            self.counters.bad_labels += 1
            return False
        g.labels[gpfns] = np.unpackbits(raw, count=gpfns.size).astype(bool)
        return True

    async def _wait_eviction_settled(self) -> None:
        async with self._callout():
            await self._eviction_settled.wait()

    def fill_placeholders(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> int:
        """A late shootdown answer: put its tokens into the guest's slots that still wait for them.

        Returns how many slots were filled (a gpfn faulted back in or
        ballooned meanwhile holds no placeholder any more).
        """
        g = self._guests.get(guest_id)
        if g is None:
            return 0
        gpfns = np.asarray(gpfns, np.int64)
        tokens = np.asarray(tokens, np.uint64)
        filled = self.swap.fill_placeholders(guest_id, gpfns, tokens)
        # The answer can come before its eviction is applied: an eviction's groups are applied
        # together, in guest-id order, once every guest's shootdown returned. Keep the answer for
        # the pages whose frames are still being evicted; the eviction takes it instead of a placeholder.
        early = (g.p2m.state[gpfns] == PageState.FRAME) & self.pool.busy[g.p2m.loc[gpfns]]
        if _nz(early):
            book = self._early_answers.setdefault(guest_id, {})
            book.update(zip(gpfns[early].tolist(), tokens[early].tolist()))
        return filled + int(np.count_nonzero(early))

    def placeholder_slots(self, guest_id: int) -> int:
        """Host swap slots of ``guest_id`` still waiting for their content."""
        return self.swap.placeholders(guest_id)
