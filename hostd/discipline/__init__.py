"""Request disciplines: when and under what the guests' requests are served, one module per mode.

``[host] request_order`` picks the mode (``MODES``); a ``[locks]`` protocol
picks the lock model instead (it needs arrival order). ``make_discipline``
is the one place that chooses; the machine then talks to the mode only
through ``RequestDiscipline`` (``base.py``: the interface and its call order).

- ``virtual_time.VirtualTimeOrder``: one request at a time, earliest
  virtual time first; shootdowns only to parked guests (reproducible).
- ``arrival.ArrivalOrder``: as they arrive, concurrently.
- ``lock_model.LockModel``: arrival order, every request under
  ``L_hostmem``, shootdowns under the guest's ``L_vmem`` (``hostd.locks``).

A new mode is one module with a ``DisciplineBase`` subclass and one line in
``MODES``; ``docs/internals.md`` says what each hook must guarantee.
"""
from __future__ import annotations

from typing import Callable

from balloonlab.proto.locks import LockConfig

from .arrival import ArrivalOrder
from .base import DisciplineBase, DisciplineContext, GuestHandlers, RequestDiscipline
from .lock_model import LockModel
from .virtual_time import VirtualTimeOrder

__all__ = ["RequestDiscipline", "DisciplineBase", "DisciplineContext", "GuestHandlers", "MODES", "REQUEST_ORDERS",
           "make_discipline", "ArrivalOrder", "VirtualTimeOrder", "LockModel"]

MODES: dict[str, Callable[[DisciplineContext], RequestDiscipline]] = {
    "virtual-time": VirtualTimeOrder,
    "arrival": ArrivalOrder,
}
"""``[host] request_order`` -> the mode; the first is the default."""

REQUEST_ORDERS = tuple(MODES)


def make_discipline(request_order: str, locks: LockConfig, ctx: DisciplineContext) -> RequestDiscipline:
    """The mode for a run: the lock model when ``locks`` names a protocol, else ``MODES[request_order]``.

    ``request_order`` is the resolved one (``HostMemConfig.resolved_request_order``).
    """
    if locks.enabled:
        return LockModel(locks, ctx)
    try:
        return MODES[request_order](ctx)
    except KeyError:
        raise ValueError(f"request order {request_order!r} is not one of {list(MODES)}") from None
