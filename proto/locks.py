"""Lock classes and their global order.

The order is total: a task that needs several locks takes them in ascending
rank. ``L_hostmem`` (the host's frame table) ranks before ``L_vmem`` (a
guest's memory map): the seed's rule that breaks its deadlock cycle.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Iterable

__all__ = ["LockClass", "GLOBAL_ORDER", "order_violation"]


class LockClass(IntEnum):
    """Value = rank in the global order."""

    L_HOSTMEM = 0
    L_VMEM = 1


GLOBAL_ORDER: tuple[LockClass, ...] = tuple(sorted(LockClass))


def order_violation(held: Iterable[LockClass], acquiring: LockClass) -> LockClass | None:
    """The held lock that ``acquiring`` would invert, or None if the order is kept."""
    worst = None
    for lock in held:
        if lock > acquiring and (worst is None or lock > worst):
            worst = lock
    return worst
