"""``none``: never balloon; the host relies on host swapping alone."""
from __future__ import annotations

from typing import Any, Mapping

from .decision import Decision
from .policy import ControllerBase, parse_params
from .view import HostView

__all__ = ["NoBalloon"]


class NoBalloon(ControllerBase):
    name = "none"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "NoBalloon":
        parse_params(cls.name, params, {})
        return cls()

    def decide(self, view: HostView) -> dict[int, Decision]:
        return {g.guest_id: Decision(0, "never_balloons", "policy none never balloons: the host relies on host swapping")
                for g in view.guests}
