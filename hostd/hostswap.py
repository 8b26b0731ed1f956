"""Host swap: one swap file per guest (as ESX's ``.vswp``), slot = gpfn, with a swap cache.

The swap device holds ``n_slots`` slots. Each guest gets a file of one slot
per gpfn, a fixed extent ``[base, base + guest_pages)`` of the device: a
page's slot is ``base + gpfn``, so nothing is allocated when a page goes
out, nothing fragments, and neighbouring gpfns are neighbouring offsets on
the device (sequential for a disk with a head). Files are laid out in
guest-id order (``reserve``) so a slot's number never depends on who
connected first; a guest restarted under its id gets its file back.

Per slot:

- ``used``: the page is in host swap: the slot holds its only copy (the
  p2m says SWAPPED, its ``loc`` is the slot);
- ``cached``: the **swap cache**: the page was swapped in and is resident
  again, and the slot still holds the content it came back with. When the
  host evicts it again and the guest's shootdown returns the same token,
  the content is already on the device: no write (``writes_avoided``).
  A write by the guest changes the page's token, so the next eviction
  writes. Ballooning the page, a fresh fault (the guest will overwrite
  it) and the guest's death drop the cached content. ``keep_cache = False``
  (``[host] swap_cache = false``) turns the swap cache off: a swap-in frees
  the slot, so every eviction writes (the host the seed's arithmetic assumes).

A slot may hold ``PENDING_TOKEN`` for a while: a deferred shootdown took
the page before the (silent) guest told its content (``hostd.shootdown``);
the guest's late answer fills it in.

Host swap holds guest pages only: the host's page cache for the virtual
disks is dropped (clean) or written back (dirty), never swapped, as Linux
and ESX do. The device's timing is a ``hostd.devices.Device`` with one lane
per guest (``disk``); the tokens are stored here at once.
"""
from __future__ import annotations

import numpy as np

from .devices import Device, DeviceProfile, device_profile
from .errors import HostdError, InvariantViolation
from .framepool import NO_OWNER

_nz = np.count_nonzero   # on small masks a fraction of np.any's cost; truthy exactly when np.any is

__all__ = ["HostSwap", "PENDING_TOKEN", "SwapTooSmall"]

PENDING_TOKEN = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
"""Held by a host swap slot whose content the silent guest has not told yet. No real
token has it: that would take page id 2**32 - 2."""


class SwapTooSmall(HostdError, ValueError):
    """The swap device cannot hold every guest's swap file."""

    def __init__(self, n_slots: int, need_slots: int, what: str) -> None:
        self.n_slots, self.need_slots = n_slots, need_slots
        super().__init__(
            f"host swap has {n_slots} slots ({n_slots / 256:g} MiB) but {what} need {need_slots} "
            f"({need_slots / 256:g} MiB: one slot per guest page); raise [host].swap_mib to at least "
            f"{-(-need_slots // 256)} or leave it out (default: twice the guests' RAM)")


class HostSwap:
    """Per-guest swap files on one device; slot arrays in numpy, no Python object per page."""

    def __init__(self, n_slots: int, profile: DeviceProfile | str = "ssd", *, expected_guests: int = 1) -> None:
        if n_slots < 0:
            raise ValueError(f"n_slots must be >= 0, got {n_slots}")
        n = int(n_slots)
        self.n_slots = n
        self.token = np.zeros(n, np.uint64)
        self.used = np.zeros(n, bool)
        self.cached = np.zeros(n, bool)
        self.keep_cache = True                              # the swap cache (``[host] swap_cache``)
        self.owner_guest = np.full(n, NO_OWNER, np.int32)   # the file's guest, for every slot of a live file
        self._n_used = 0
        self._bases: dict[int, tuple[int, int]] = {}        # guest -> (base, pages): its file's extent
        self._reserved: set[int] = set()                     # extents laid out by ``reserve``: kept for the id
        self._holes: list[tuple[int, int]] = []              # extents of files that went and were not reserved
        self._live: set[int] = set()
        self._end = 0                                        # first slot after every extent handed out
        prof = device_profile(profile) if isinstance(profile, str) else profile
        self.disk = Device(prof, "swap", expected_guests)
        self.writes_avoided = 0       # evictions whose content the swap cache already held
        self.fresh_drops = 0          # swapped-out pages a fresh fault dropped without a read

    def use_device(self, device: Device) -> None:
        """Put the swap files on ``device`` (the one shared device of ``[disk] shared``)."""
        self.disk = device

    # -- files ----------------------------------------------------------------------

    def reserve(self, pages: dict[int, int]) -> None:
        """Lay out the files of these guests, in guest-id order; raises ``SwapTooSmall``."""
        need = self._end + sum(p for g, p in pages.items() if g not in self._bases)
        if need > self.n_slots:
            raise SwapTooSmall(self.n_slots, need, f"the swap files of {len(pages)} guests")
        for gid in sorted(pages):
            if gid not in self._bases:
                self._bases[gid] = (self._end, int(pages[gid]))
                self._end += int(pages[gid])
            self._reserved.add(gid)

    def add_file(self, guest_id: int, guest_pages: int) -> int:
        """Open the guest's file (its reserved extent, or a new one at the end); returns its base slot."""
        if guest_id in self._live:
            raise InvariantViolation(f"guest {guest_id} has a swap file already")
        if guest_id not in self._bases:
            self._bases[guest_id] = (self._place(guest_id, int(guest_pages)), int(guest_pages))
        base, pages = self._bases[guest_id]
        if guest_pages != pages:
            raise InvariantViolation(f"guest {guest_id}'s swap file has {pages} slots, it has {guest_pages} pages")
        self._live.add(guest_id)
        self.owner_guest[base:base + pages] = guest_id
        self.disk.add_lane(guest_id)
        return base

    def _place(self, guest_id: int, pages: int) -> int:
        """An extent for a file that was not laid out: the first hole that fits, else the end."""
        for i, (base, size) in enumerate(self._holes):
            if size >= pages:
                if size == pages:
                    del self._holes[i]
                else:
                    self._holes[i] = (base + pages, size - pages)
                return base
        if self._end + pages > self.n_slots:
            raise SwapTooSmall(self.n_slots, self._end + pages - sum(s for _, s in self._holes),
                               f"the swap files so far and guest {guest_id}'s")
        self._end += pages
        return self._end - pages

    def remove_file(self, guest_id: int) -> None:
        """The guest is gone: everything in its file goes (its extent stays reserved for its id)."""
        if guest_id not in self._live:
            return
        base, pages = self._bases[guest_id]
        sl = slice(base, base + pages)
        self._n_used -= int(np.count_nonzero(self.used[sl]))
        self.used[sl] = False
        self.cached[sl] = False
        self.token[sl] = 0
        self.owner_guest[sl] = NO_OWNER
        self._live.discard(guest_id)
        self.disk.remove_lane(guest_id)
        if guest_id not in self._reserved:
            del self._bases[guest_id]
            self._holes.append((base, pages))
            self._holes.sort()

    def base(self, guest_id: int) -> int:
        return self._bases[guest_id][0]

    def slots_of(self, guest_id: int, gpfns: np.ndarray) -> np.ndarray:
        return np.asarray(gpfns, np.int64) + self._bases[guest_id][0]

    def extent(self, guest_id: int) -> slice:
        base, pages = self._bases[guest_id]
        return slice(base, base + pages)

    # -- counts ---------------------------------------------------------------------

    @property
    def used_slots(self) -> int:
        return self._n_used

    @property
    def free_slots(self) -> int:
        return self.n_slots - self._n_used

    @property
    def cached_slots(self) -> int:
        return int(np.count_nonzero(self.cached))

    # -- content ----------------------------------------------------------------------

    def store(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Pages go out to their slots; returns the mask of those that need a write.

        A slot whose swap-cache copy holds the same token needs none.
        """
        slots = np.asarray(slots, np.int64)
        tokens = np.asarray(tokens, np.uint64)
        if _nz(self.used[slots]):
            raise InvariantViolation(f"swap slot {int(slots[np.flatnonzero(self.used[slots])[0]])} stored twice")
        write = ~(self.cached[slots] & (self.token[slots] == tokens) & (tokens != PENDING_TOKEN))
        self.writes_avoided += int(slots.size - np.count_nonzero(write))
        self.token[slots] = tokens
        self.used[slots] = True
        self.cached[slots] = False
        self._n_used += int(slots.size)
        return write

    def load(self, slots: np.ndarray) -> np.ndarray:
        return self.token[slots].copy()

    def swap_in(self, slots: np.ndarray) -> np.ndarray:
        """Pages come back: their tokens; the slots keep the content as swap cache."""
        slots = np.asarray(slots, np.int64)
        if _nz(self.used[slots]) != slots.size:
            raise InvariantViolation(f"swap slot {int(slots[np.flatnonzero(~self.used[slots])[0]])} read but empty")
        tokens = self.token[slots].copy()
        self.used[slots] = False
        self.cached[slots] = self.keep_cache
        if not self.keep_cache:
            self.token[slots] = 0
        self._n_used -= int(slots.size)
        return tokens

    def swap_in_one(self, slot: int) -> int:
        if not self.used[slot]:
            raise InvariantViolation(f"swap slot {slot} read but empty")
        self.used[slot] = False
        self.cached[slot] = self.keep_cache
        self._n_used -= 1
        token = int(self.token[slot])
        if not self.keep_cache:
            self.token[slot] = 0
        return token

    def drop(self, slots: np.ndarray) -> None:
        """Forget the content of these slots (in swap or cached): the page was ballooned or is fresh."""
        slots = np.asarray(slots, np.int64)
        if slots.size == 0:
            return
        self._n_used -= int(np.count_nonzero(self.used[slots]))
        self.used[slots] = False
        self.cached[slots] = False
        self.token[slots] = 0

    def drop_one(self, slot: int) -> None:
        self._n_used -= int(self.used[slot])
        self.used[slot] = False
        self.cached[slot] = False
        self.token[slot] = 0

    def slots_owned_by(self, guest_id: int) -> np.ndarray:
        """Slots of ``guest_id`` that hold a swapped-out page (a gone guest's: none, unless something leaked)."""
        if guest_id not in self._live:
            return np.flatnonzero(self.used & (self.owner_guest == guest_id))
        sl = self.extent(guest_id)
        return sl.start + np.flatnonzero(self.used[sl])

    def fill_placeholders(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> int:
        """Put ``tokens`` into the slots of ``gpfns`` that still hold placeholders."""
        if guest_id not in self._live:
            return 0
        slots = self.slots_of(guest_id, np.asarray(gpfns, np.int64))
        hit = self.used[slots] & (self.token[slots] == PENDING_TOKEN)
        self.token[slots[hit]] = np.asarray(tokens, np.uint64)[hit]
        return int(np.count_nonzero(hit))

    def placeholders(self, guest_id: int) -> int:
        """Slots of ``guest_id`` still waiting for their content."""
        return int(np.count_nonzero(self.token[self.slots_owned_by(guest_id)] == PENDING_TOKEN))

    # -- the invariant ------------------------------------------------------------------

    def check_counters(self) -> None:
        """O(1): the used-slot count is in range (the sampled invariant's part)."""
        if not 0 <= self._n_used <= self.n_slots:
            raise InvariantViolation(f"{self._n_used} used swap slots of {self.n_slots}")

    def check_invariant(self) -> None:
        if int(np.count_nonzero(self.used)) != self._n_used:
            raise InvariantViolation(
                f"{int(np.count_nonzero(self.used))} swap slots marked used but {self._n_used} counted")
        both = self.used & self.cached
        if np.any(both):
            raise InvariantViolation(f"swap slot {int(np.flatnonzero(both)[0])} is both in swap and swap cache")
        orphan = (self.used | self.cached) & (self.owner_guest == NO_OWNER)
        if np.any(orphan):
            raise InvariantViolation(f"swap slot {int(np.flatnonzero(orphan)[0])} holds content outside any file")
        empty = ~(self.used | self.cached) & (self.token != 0)
        if np.any(empty):
            raise InvariantViolation(f"swap slot {int(np.flatnonzero(empty)[0])} is empty but holds a token")
