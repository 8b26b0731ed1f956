"""``none``: never balloon; the host relies on host swapping alone."""
from __future__ import annotations

from typing import Any, Mapping

from .policy import parse_params
from .view import HostView

__all__ = ["NoBalloon"]


class NoBalloon:
    name = "none"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "NoBalloon":
        parse_params(cls.name, params, {})
        return cls()

    def targets(self, view: HostView) -> dict[int, int]:
        return {g.guest_id: 0 for g in view.guests}
