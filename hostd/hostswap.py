"""Host swap: a slot store holding page tokens, and the swap device's timing.

A used slot records whose content it holds (guest page or cached disk
block) so that a leak is detectable and a dead guest's slots can be freed.
Slots are freed when the page is swapped back in, ballooned, or its guest
dies. A slot may hold ``PENDING_TOKEN`` for a while: a deferred shootdown
took the page before the (silent) guest told its content
(``hostd.shootdown``); the guest's late answer fills it in. The device's
timing is one ``proto.costs.DiskModel`` per guest (``lane``): it only
computes completion times in virtual time; the tokens are stored here at
once. One queue per guest keeps a guest's swap I/O times a function of
its own requests only (the deterministic discipline serves guests in
parallel); each lane has the device's full profile, so several guests
together get more than one device's throughput until the device is shared
by fair shares.
"""
from __future__ import annotations

import numpy as np

from balloonlab.proto.costs import DiskModel, DiskProfile, disk_profile

from .errors import InvariantViolation
from .framepool import NO_OWNER, FrameKind, has_duplicates

__all__ = ["HostSwap", "PENDING_TOKEN"]

PENDING_TOKEN = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
"""Held by a host swap slot whose content the silent guest has not told yet. No real
token has it: that would take page id 2**32 - 2."""


class HostSwap:
    """``n_slots`` swap slots; alloc/free/read/write in O(n) numpy."""

    def __init__(self, n_slots: int, profile: DiskProfile | str = "ssd") -> None:
        if n_slots < 0:
            raise ValueError(f"n_slots must be >= 0, got {n_slots}")
        n = int(n_slots)
        self.n_slots = n
        self.token = np.zeros(n, np.uint64)
        self.used = np.zeros(n, bool)
        self.owner_kind = np.zeros(n, np.uint8)     # FrameKind.GUEST or CACHE while used
        self.owner_guest = np.full(n, NO_OWNER, np.int32)
        self.owner_index = np.full(n, NO_OWNER, np.int64)
        self._free_stack = np.arange(n - 1, -1, -1, dtype=np.int64)
        self._n_free = n
        self.profile = disk_profile(profile) if isinstance(profile, str) else profile
        self._lanes: dict[int, DiskModel] = {}

    def set_profile(self, profile: DiskProfile | str) -> None:
        """Replace the swap device's timing model (queues start empty)."""
        self.profile = disk_profile(profile) if isinstance(profile, str) else profile
        self._lanes = {}

    def lane(self, guest_id: int) -> DiskModel:
        """The swap device's queue for ``guest_id``'s pages (made on first use)."""
        lane = self._lanes.get(guest_id)
        if lane is None:
            lane = self._lanes[guest_id] = DiskModel(self.profile)
        return lane

    @property
    def free_slots(self) -> int:
        return self._n_free

    @property
    def used_slots(self) -> int:
        return self.n_slots - self._n_free

    def alloc(self, n: int) -> np.ndarray:
        """Take up to ``n`` free slots (fewer when swap is full)."""
        take = min(int(n), self._n_free)
        slots = self._free_stack[self._n_free - take:self._n_free][::-1].copy()
        self._n_free -= take
        self.used[slots] = True
        return slots

    def store(self, slots: np.ndarray, tokens: np.ndarray, kind: FrameKind,
              guest_id: int, index: np.ndarray) -> None:
        """Put content into allocated slots and record whose it is."""
        self.token[slots] = tokens
        self.owner_kind[slots] = kind
        self.owner_guest[slots] = guest_id
        self.owner_index[slots] = index

    def load(self, slots: np.ndarray) -> np.ndarray:
        return self.token[slots].copy()

    def free(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, np.int64)
        if slots.size == 0:
            return
        if not np.all(self.used[slots]):
            bad = int(slots[np.flatnonzero(~self.used[slots])[0]])
            raise InvariantViolation(f"swap slot {bad} freed twice")
        if has_duplicates(slots, self.n_slots):
            raise InvariantViolation("the same swap slot appears twice in one free() call")
        self.used[slots] = False
        self.token[slots] = 0
        self.owner_kind[slots] = 0
        self.owner_guest[slots] = NO_OWNER
        self.owner_index[slots] = NO_OWNER
        self._free_stack[self._n_free:self._n_free + slots.size] = slots
        self._n_free += slots.size

    def free_one(self, slot: int) -> None:
        """``free`` of one slot, in scalars."""
        if not self.used[slot]:
            raise InvariantViolation(f"swap slot {slot} freed twice")
        self.used[slot] = False
        self.token[slot] = 0
        self.owner_kind[slot] = 0
        self.owner_guest[slot] = NO_OWNER
        self.owner_index[slot] = NO_OWNER
        self._free_stack[self._n_free] = slot
        self._n_free += 1

    def slots_owned_by(self, guest_id: int) -> np.ndarray:
        return np.flatnonzero(self.used & (self.owner_guest == guest_id))

    def fill_placeholders(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> int:
        """Put ``tokens`` into the guest-page slots of ``guest_id`` that hold these gpfns' placeholders."""
        slots = self.slots_owned_by(guest_id)
        slots = slots[(self.owner_kind[slots] == FrameKind.GUEST) & (self.token[slots] == PENDING_TOKEN)]
        if not slots.size:
            return 0
        order = np.argsort(gpfns, kind="stable")
        sorted_g = gpfns[order].astype(np.int64)
        idx = self.owner_index[slots]
        pos = np.minimum(np.searchsorted(sorted_g, idx), sorted_g.size - 1)
        hit = sorted_g[pos] == idx
        self.token[slots[hit]] = np.asarray(tokens, np.uint64)[order][pos[hit]]
        return int(np.count_nonzero(hit))

    def placeholders(self, guest_id: int) -> int:
        """Slots of ``guest_id`` still waiting for their content."""
        return int(np.count_nonzero(self.token[self.slots_owned_by(guest_id)] == PENDING_TOKEN))

    def check_counters(self) -> None:
        """O(1): the free-slot count is in range (the sampled invariant's part)."""
        if not 0 <= self._n_free <= self.n_slots:
            raise InvariantViolation(f"{self._n_free} free swap slots of {self.n_slots}")

    def check_invariant(self) -> None:
        if int(np.count_nonzero(self.used)) != self.used_slots:
            raise InvariantViolation(
                f"{int(np.count_nonzero(self.used))} swap slots marked used but {self.used_slots} allocated")
        stack = self._free_stack[:self._n_free]
        if np.any(self.used[stack]):
            bad = int(stack[np.flatnonzero(self.used[stack])[0]])
            raise InvariantViolation(f"swap slot {bad} is on the free stack but marked used")
        if has_duplicates(stack, self.n_slots):
            raise InvariantViolation("a swap slot is on the free stack twice")
