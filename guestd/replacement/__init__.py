"""Page replacement policies: one module each behind one Protocol, and a name registry.

Names: ``fifo``, ``clock``, ``clock-r0``, ``esc``, ``lru``, ``opt``,
``file-first``, ``car`` (the working-set policy). Each module's docstring is
the policy's exact definition; guestd/README.md collects them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from ..errors import GuestConfigError, UnknownPolicy
from ..memory import Frames
from .car import CarPolicy
from .clock import ClockPolicy
from .clock_r0 import ClockR0Policy
from .esc import EscPolicy
from .fifo import FifoPolicy
from .file_first import FileFirstPolicy
from .lru import LruPolicy
from .opt import OptPolicy

__all__ = ["ReplacementPolicy", "POLICIES", "WORKING_SET_POLICY", "make_policy", "policy_names"]


@runtime_checkable
class ReplacementPolicy(Protocol):
    """The interface the kernel drives (call order in ``replacement/base.py``)."""

    name: str
    capacity_pages: int

    def attach(self, frames: Frames) -> None: ...
    def resize(self, capacity_pages: int) -> None: ...
    def on_hits(self, gpfns: np.ndarray, writes: np.ndarray, first_ref: int) -> None: ...
    def on_load(self, gpfn: int, write: bool, ref: int) -> None: ...
    def select_victim(self) -> int: ...
    def select_victims(self, n: int) -> np.ndarray: ...


POLICIES: dict[str, Callable[..., ReplacementPolicy]] = {
    "fifo": FifoPolicy,
    "clock": ClockPolicy,
    "clock-r0": ClockR0Policy,
    "esc": EscPolicy,
    "lru": LruPolicy,
    "opt": OptPolicy,
    "file-first": FileFirstPolicy,
    "car": CarPolicy,
}

WORKING_SET_POLICY = "car"
"""The recency+frequency policy that keeps hot file cache and gives up cold anonymous memory."""


def policy_names() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str, n_frames: int, **params: Any) -> ReplacementPolicy:
    """Build policy ``name`` for ``n_frames`` frames; unknown names and parameters are typed errors."""
    try:
        cls = POLICIES[name]
    except (KeyError, TypeError):
        raise UnknownPolicy(name, POLICIES) from None
    accepted = set(inspect.signature(cls).parameters) - {"n_frames"}
    extra = sorted(set(params) - accepted)
    if extra:
        raise GuestConfigError(
            f"policy {name!r}: unknown parameter(s) {', '.join(extra)}; accepted: {sorted(accepted) or 'none'}")
    return cls(n_frames, **params)
