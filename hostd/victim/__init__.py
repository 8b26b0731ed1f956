"""Host victim policies: which host frames host swapping takes.

Blind by design: a policy sees only each frame's kind, owner, accessed and
dirty bits, pinned and busy flags (``FramePool``), never what the guest uses
the page for. One module per policy, one Protocol, one registry.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import numpy as np

from ..errors import PolicyConfigError
from ..framepool import FramePool

__all__ = ["VictimPolicy", "VICTIM_POLICIES", "make_victim_policy"]


class VictimPolicy(Protocol):
    name: str

    def pick(self, pool: FramePool, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``n`` distinct evictable frames (``pool.evictable()``), as int64.

        May clear accessed bits (second chance); never changes anything else.
        """
        ...


def _random(params: Mapping[str, Any]) -> VictimPolicy:
    from .random import RandomVictims
    _no_params("random", params)
    return RandomVictims()


def _clock(params: Mapping[str, Any]) -> VictimPolicy:
    from .clock import ClockVictims
    _no_params("clock", params)
    return ClockVictims()


VICTIM_POLICIES: dict[str, Callable[[Mapping[str, Any]], VictimPolicy]] = {
    "random": _random,
    "clock": _clock,
}


def make_victim_policy(name: str, params: Mapping[str, Any] | None = None) -> VictimPolicy:
    """A fresh policy instance by name; raises ``PolicyConfigError`` listing the known names."""
    try:
        factory = VICTIM_POLICIES[name]
    except (KeyError, TypeError):
        raise PolicyConfigError(
            f"host victim policy {name!r} is unknown; known: {sorted(VICTIM_POLICIES)}") from None
    return factory(params or {})


def _no_params(name: str, params: Mapping[str, Any]) -> None:
    if params:
        raise PolicyConfigError(f"host victim policy {name!r} takes no parameters, got {sorted(params)}")
