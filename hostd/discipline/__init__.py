"""Request disciplines: when and under what the guests' requests are served, one module per mode.

``[host] request_order`` picks the mode (``MODES``); a ``[locks]`` protocol
picks the lock model instead (it needs arrival order). ``make_discipline``
is the one place that chooses; the machine then talks to the mode only
through ``RequestDiscipline`` (``base.py``: the interface and its call order).

- ``deterministic.DeterministicOrder`` (the default): each guest's requests
  in its own serial lane as they arrive, guests in parallel, each inside its
  own partition of host memory (a grant of free frames per tick); held
  requests, refill rounds and all cross-guest work at points where every
  guest is parked (reproducible).
- ``arrival.ArrivalOrder``: as they arrive, concurrently, one global pool.
- ``lock_model.LockModel``: arrival order, every request under
  ``L_hostmem``, shootdowns under the guest's ``L_vmem`` (``hostd.locks``).

A new mode is one module with a ``DisciplineBase`` subclass and one line in
``MODES`` (``_mode(".module", "Class")``: imported when a run uses it);
``docs/internals.md`` says what each hook must guarantee.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

from balloonlab.proto.locks import LockConfig

if TYPE_CHECKING:
    from .arrival import ArrivalOrder
    from .base import DisciplineBase, DisciplineContext, GuestHandlers, RequestDiscipline
    from .deterministic import DeterministicOrder
    from .lock_model import LockModel

__all__ = ["RequestDiscipline", "DisciplineBase", "DisciplineContext", "GuestHandlers", "MODES", "REQUEST_ORDERS",
           "DEPRECATED_ORDERS", "make_discipline", "ArrivalOrder", "DeterministicOrder", "LockModel"]

# Where each class lives: imported when first asked for. The launcher checks a scenario's request_order
# against this registry without importing the request path (the wire's message classes among it).
_WHERE = {"ArrivalOrder": ".arrival", "DeterministicOrder": ".deterministic", "LockModel": ".lock_model",
          "DisciplineBase": ".base", "DisciplineContext": ".base", "GuestHandlers": ".base",
          "RequestDiscipline": ".base"}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where, __name__), name)


def _mode(where: str, name: str) -> Callable[[DisciplineContext], RequestDiscipline]:
    """A mode's constructor that imports its module (``where``, relative to this package) when first used."""
    def make(ctx: DisciplineContext) -> RequestDiscipline:
        return getattr(importlib.import_module(where, __name__), name)(ctx)
    make.__qualname__ = make.__name__ = name
    return make


MODES: dict[str, Callable[[DisciplineContext], RequestDiscipline]] = {
    "deterministic": _mode(".deterministic", "DeterministicOrder"),
    "arrival": _mode(".arrival", "ArrivalOrder"),
}
"""``[host] request_order`` -> the mode; the first is the default."""

REQUEST_ORDERS = tuple(MODES)

DEPRECATED_ORDERS: dict[str, str] = {"virtual-time": "deterministic"}
"""Old ``request_order`` values still accepted (with a deprecation line in the host's log) -> the mode they mean."""


def make_discipline(request_order: str, locks: LockConfig, ctx: DisciplineContext) -> RequestDiscipline:
    """The mode for a run: the lock model when ``locks`` names a protocol, else ``MODES[request_order]``.

    ``request_order`` is the resolved one (``HostMemConfig.resolved_request_order``).
    """
    if locks.enabled:
        from .lock_model import LockModel
        return LockModel(locks, ctx)
    try:
        return MODES[request_order](ctx)
    except KeyError:
        raise ValueError(f"request order {request_order!r} is not one of {list(MODES)}") from None
