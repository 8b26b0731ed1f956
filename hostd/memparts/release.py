"""Pages a guest gives back: balloon inflation and deflation, and free page reports.

Inflation and a free page report both release whatever holds the pages'
content (``_release``: frames, swap slots and swap-cache copies,
compressed and zero copies, a reference to a shared frame); the first
makes the gpfns BALLOONED, the second UNBACKED. A frame whose eviction is
pending (busy) is freed when its shootdown settles. Deflation gives
BALLOONED gpfns back as UNBACKED (a fault maps a zero page).
"""
from __future__ import annotations

import numpy as np

from ..errors import BalloonLimit, InvalidState
from ..p2m import PageState, as_page_numbers
from .books import _COMPRESSED, _SHARED, _SWAPPED, _ZERO, MemoryBooks, _Guest

_nz = np.count_nonzero   # on small masks a fraction of np.any's cost; truthy exactly when np.any is

__all__ = ["Releases"]


class Releases(MemoryBooks):
    """Part of ``HostMemory``: the balloon and free page reporting."""

    def balloon_inflate(self, guest_id: int, gpfns: np.ndarray | bytes) -> int:
        """The guest gives ``gpfns`` to the host: free their frames/slots now; returns frames freed.

        Refused as a whole (nothing changes) on a bad, duplicate or already
        ballooned gpfn, or beyond ``max_balloon_pages``.
        """
        g = self._guest(guest_id)
        gpfns, state = self._unballooned(g, gpfns, "already BALLOONED", "inflate each page once")
        if g.balloon_pages + gpfns.size > g.max_balloon_pages:
            raise BalloonLimit(guest_id, g.balloon_pages, int(gpfns.size), g.max_balloon_pages)
        n_freed = self._release(g, gpfns, state)
        g.p2m.set(gpfns, PageState.BALLOONED)
        g.p2m.pinned[gpfns] = False
        g.balloon_pages += int(gpfns.size)
        g.counters.balloon_inflated_pages += int(gpfns.size)
        self.counters.balloon_inflated_pages += int(gpfns.size)
        g.counters.balloon_freed_frames += n_freed
        self.counters.balloon_freed_frames += n_freed
        return n_freed

    def _unballooned(self, g: _Guest, gpfns: np.ndarray | bytes, found: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
        """``gpfns`` checked (in range, each once, none in the balloon) and their p2m states."""
        gpfns = as_page_numbers(gpfns, g.guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        state = g.p2m.state[gpfns]
        if _nz(state == PageState.BALLOONED):
            raise InvalidState(g.guest_id, "gpfn", int(gpfns[np.flatnonzero(state == PageState.BALLOONED)[0]]),
                               found, hint)
        return gpfns, state

    def _release(self, g: _Guest, gpfns: np.ndarray, state: np.ndarray) -> int:
        """Whatever holds these gpfns' content goes (the guest gave them away); returns frames freed.

        Their frames (a busy one's shootdown is pending: it is freed when that
        settles), swap slots and swap-cache copies, compressed and zero copies.
        The caller sets their new p2m state.
        """
        frames = g.p2m.loc[gpfns[state == PageState.FRAME]]
        frames = frames[~self.pool.busy[frames]]
        self.pool.free(frames)
        shared = g.p2m.loc[gpfns[state == _SHARED]]
        if shared.size:            # one sharer less; the frame goes when the last one does
            assert self.sharing is not None
            self.sharing.ballooned(g.guest_id, shared)
        n_freed = int(frames.size) + self._drop_zipped(g, gpfns, state)
        self.swap.drop(self.swap.slots_of(g.guest_id, gpfns))    # in swap or in the swap cache: gone
        g.labels[gpfns] = False
        return n_freed

    def _drop_zipped(self, g: _Guest, gpfns: np.ndarray, state: np.ndarray) -> int:
        """COMPRESSED and ZERO gpfns among ``gpfns`` leave the compression books; returns cache frames freed."""
        if self.zip is None:
            return 0
        z = (state == _COMPRESSED) | (state == _ZERO)
        if not _nz(z):
            return 0
        return self.zip.drop(g.guest_id, gpfns[z], state[z])

    def report_free(self, guest_id: int, gpfns: np.ndarray | bytes) -> int:
        """Free page reporting: the guest says these gpfns are free; discard what backs them. Returns frames freed.

        virtio-balloon's VIRTIO_BALLOON_F_REPORTING: the device discards
        the reported ranges (QEMU: ``ram_block_discard_range``, madvise
        DONTNEED); the next touch is an ordinary EPT fault that maps a fresh
        zero page, exactly as for a page never backed. A frame, a swap slot
        (and its swap-cache copy), a compressed or zero-dropped page: all
        go; the gpfn becomes UNBACKED. Refused as a whole (nothing changes)
        on a bad or duplicate gpfn or a ballooned one (the balloon holds
        it, it is not free). A frame whose eviction is pending (busy) is
        freed when its shootdown settles, as for balloon inflation.
        """
        g = self._guest(guest_id)
        gpfns, state = self._unballooned(g, gpfns, "BALLOONED",
                                         "a ballooned page is the balloon's, not free: deflate it first")
        n_slots = int(np.count_nonzero((state == _SWAPPED) | (state == _ZERO) | (state == _COMPRESSED)))
        n_freed = self._release(g, gpfns, state)
        g.p2m.set(gpfns, PageState.UNBACKED)
        c, gc = self.counters, g.counters
        c.free_reports += 1
        gc.free_reports += 1
        c.pages_reported += int(gpfns.size)
        gc.pages_reported += int(gpfns.size)
        c.frames_discarded += n_freed
        gc.frames_discarded += n_freed
        c.reported_slots_dropped += n_slots
        return n_freed

    def balloon_deflate(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        """The guest takes ``gpfns`` back: they become UNBACKED (a fault gives a zero page)."""
        g = self._guest(guest_id)
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        state = g.p2m.state[gpfns]
        if _nz(state != PageState.BALLOONED):
            i = int(np.flatnonzero(state != PageState.BALLOONED)[0])
            raise InvalidState(guest_id, "gpfn", int(gpfns[i]), PageState(state[i]).name,
                               "only BALLOONED pages can be deflated")
        g.p2m.set(gpfns, PageState.UNBACKED)
        g.balloon_pages -= int(gpfns.size)
        g.counters.balloon_deflated_pages += int(gpfns.size)
        self.counters.balloon_deflated_pages += int(gpfns.size)
