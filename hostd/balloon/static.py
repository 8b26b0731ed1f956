"""``static``: fixed balloon targets from tick ``start_tick`` on.

``targets_mib`` maps guest id (int, or its string form as TOML keys are
strings) to a balloon size in MiB; guests not listed get ``fraction`` of
their RAM (default 0). Before ``start_tick`` every target is 0.
"""
from __future__ import annotations

from typing import Any, Mapping

from balloonlab.proto.costs import PAGE_BYTES

from ..errors import PolicyConfigError
from .policy import check_fraction, clamp_target, parse_params
from .view import HostView

__all__ = ["StaticBalloon"]

_PAGES_PER_MIB = (1 << 20) // PAGE_BYTES


class StaticBalloon:
    name = "static"

    def __init__(self, targets_mib: Mapping[int, float], fraction: float, start_tick: int) -> None:
        self.targets_mib = dict(targets_mib)
        self.fraction = fraction
        self.start_tick = start_tick

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "StaticBalloon":
        p = parse_params(cls.name, params, {"targets_mib": (dict, {}), "fraction": (float, 0.0),
                                            "start_tick": (int, 0)})
        check_fraction(cls.name, "fraction", p["fraction"])
        targets: dict[int, float] = {}
        for key, mib in p["targets_mib"].items():
            try:
                gid = int(key)
            except (TypeError, ValueError):
                raise PolicyConfigError(f"balloon policy 'static': targets_mib key {key!r} is not a guest id") from None
            if isinstance(mib, bool) or not isinstance(mib, (int, float)) or mib < 0:
                raise PolicyConfigError(f"balloon policy 'static': targets_mib[{key!r}] must be a number >= 0, "
                                        f"got {mib!r}")
            targets[gid] = float(mib)
        return cls(targets, p["fraction"], p["start_tick"])

    def targets(self, view: HostView) -> dict[int, int]:
        if view.tick < self.start_tick:
            return {g.guest_id: 0 for g in view.guests}
        out: dict[int, int] = {}
        for g in view.guests:
            if g.guest_id in self.targets_mib:
                pages = self.targets_mib[g.guest_id] * _PAGES_PER_MIB
            else:
                pages = self.fraction * g.ram_pages
            out[g.guest_id] = clamp_target(g, pages)
        return out
