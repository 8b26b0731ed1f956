"""The guest swap area: slots on the virtual disk after the files.

An anonymous page gets a slot the first time it is swapped out and keeps
it for life (like a swap cache entry that is never dropped): a page swapped
back in and evicted again clean costs no I/O because its slot still holds
it; a dirty one is rewritten into the same slot. Slots are handed out in
increasing order.
"""
from __future__ import annotations

import numpy as np

from .errors import SwapExhausted

__all__ = ["SwapArea"]


class SwapArea:
    def __init__(self, base_block: int, n_slots: int) -> None:
        self.base_block = base_block
        self.n_slots = n_slots
        # slots handed out so far; an array so the compiled paging core hands them out too
        self.used_array = np.zeros(1, np.int64)

    @property
    def used(self) -> int:
        return int(self.used_array[0])

    @used.setter
    def used(self, value: int) -> None:
        self.used_array[0] = value

    def alloc_block(self) -> int:
        if self.used >= self.n_slots:
            raise SwapExhausted(self.n_slots)
        b = self.base_block + self.used
        self.used += 1
        return b
