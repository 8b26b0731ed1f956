"""``static``: fixed balloon targets from tick ``start_tick`` on.

``targets_mib`` maps guest id (int, or its string form as TOML keys are
strings) to a balloon size in MiB; guests not listed get ``fraction`` of
their RAM (default 0). Before ``start_tick`` every target is 0.
"""
from __future__ import annotations

from typing import Any, Mapping

from balloonlab.proto.schema import mib_to_pages

from ..errors import PolicyConfigError
from .decision import Decision
from .policy import ControllerBase, Param, clamp_target, fraction, non_negative, parse_params
from .view import HostView

__all__ = ["StaticBalloon"]



class StaticBalloon(ControllerBase):
    name = "static"

    def __init__(self, targets_mib: Mapping[int, float], fraction: float, start_tick: int) -> None:
        self.targets_mib = dict(targets_mib)
        self.fraction = fraction
        self.start_tick = start_tick

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "StaticBalloon":
        p = parse_params(cls.name, params, {
            "targets_mib": Param(dict, {}, "balloon size in MiB by guest id; guests not listed get fraction"),
            "fraction": fraction("balloon size as a share of the guest's RAM for guests not in targets_mib", 0.0),
            "start_tick": non_negative(int, "every target is 0 before this tick", 0)})
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

    def decide(self, view: HostView) -> dict[int, Decision]:
        if view.tick < self.start_tick:
            return {g.guest_id: Decision(0, "before_start", f"no balloon before start_tick {self.start_tick}",
                                         {"start_tick": self.start_tick}) for g in view.guests}
        out: dict[int, Decision] = {}
        for g in view.guests:
            if g.guest_id in self.targets_mib:
                mib = self.targets_mib[g.guest_id]
                out[g.guest_id] = Decision(clamp_target(g, mib_to_pages(mib)), "static_mib",
                                           f"static target {mib:g} MiB for this guest", {"target_mib": mib})
            else:
                out[g.guest_id] = Decision(clamp_target(g, self.fraction * g.ram_pages), "static_fraction",
                                           f"static target {self.fraction:g} of the guest's {g.ram_pages} pages",
                                           {"fraction": self.fraction, "ram_pages": g.ram_pages})
        return out
