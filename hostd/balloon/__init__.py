"""Balloon controller policies: one module each, one Protocol, one registry.

``make_controller(name, params)`` builds a fresh controller; unknown names
and parameters are refused with a ``PolicyConfigError`` that lists the
known ones.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from ..errors import PolicyConfigError
from .aggressive import AggressiveBalloon
from .mom import MomBalloon
from .noncoop import NonCooperationDetector
from .none import NoBalloon
from .policy import BalloonController, clamp_target
from .proportional import ProportionalBalloon
from .static import StaticBalloon
from .sweep import SweepBalloon
from .view import GuestView, HostView
from .working_set import WorkingSetBalloon

__all__ = ["BalloonController", "BALLOON_POLICIES", "make_controller", "GuestView", "HostView",
           "NonCooperationDetector", "clamp_target"]

BALLOON_POLICIES: dict[str, Callable[[Mapping[str, Any]], BalloonController]] = {
    NoBalloon.name: NoBalloon.from_params,
    StaticBalloon.name: StaticBalloon.from_params,
    ProportionalBalloon.name: ProportionalBalloon.from_params,
    MomBalloon.name: MomBalloon.from_params,
    WorkingSetBalloon.name: WorkingSetBalloon.from_params,
    AggressiveBalloon.name: AggressiveBalloon.from_params,
    SweepBalloon.name: SweepBalloon.from_params,
}


def make_controller(name: str, params: Mapping[str, Any] | None = None) -> BalloonController:
    try:
        factory = BALLOON_POLICIES[name]
    except (KeyError, TypeError):
        raise PolicyConfigError(
            f"balloon policy {name!r} is unknown; known: {sorted(BALLOON_POLICIES)}") from None
    return factory(params or {})
