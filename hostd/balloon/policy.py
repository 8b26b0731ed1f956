"""The balloon-controller interface and what every policy shares.

A controller is called once per tick with a ``HostView`` (``view.py``) and
returns, from ``decide(view)``, one ``Decision`` per guest of the view: the
balloon target in pages it wants, a reason code, the reason in words and
the numbers it used (``decision.py``). On a tick it does not act (a policy
with ``period_ticks``) it returns ``None`` and the targets stand. The host
clamps targets to ``[0, max_balloon_pages]`` and logs every decision
(``balloon_decision``). ``ControllerBase.targets(view)`` gives just the
targets, for tests and tools.

The built-in controllers and a user's own (``[balloon] policy =
"mine.py:MyController"``, docs/policies.md) implement the same interface.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

from balloonlab.proto.schema import describe, with_known

from ..errors import PolicyConfigError
from .decision import Decision
from .view import GuestView, HostView

__all__ = ["BalloonController", "ControllerBase", "clamp_target", "is_due", "parse_params", "PARAM_SPECS", "Spec",
           "check_fraction", "check_non_negative"]


class BalloonController(Protocol):
    name: str

    def decide(self, view: HostView) -> Mapping[int, Decision] | None:
        """A ``Decision`` for every guest of ``view``, or ``None`` when the controller does not act this tick."""
        ...

    def targets(self, view: HostView) -> dict[int, int]:
        """Just the targets of ``decide`` (the current ones when it does not act)."""
        ...


class ControllerBase:
    """``targets`` derived from ``decide``: what tests and tools that need no reasons call."""

    def decide(self, view: HostView) -> Mapping[int, Decision] | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def targets(self, view: HostView) -> dict[int, int]:
        decisions = self.decide(view)
        out = view.current_targets()
        if decisions is not None:
            for g in view.guests:
                if g.guest_id in decisions:
                    out[g.guest_id] = clamp_target(g, decisions[g.guest_id].target_pages)
        return out


def clamp_target(guest: GuestView, pages: float) -> int:
    return int(min(max(int(round(pages)), 0), guest.max_balloon_pages))


def is_due(view: HostView, period_ticks: int) -> bool:
    return view.tick % period_ticks == 0


_WORDS = {float: "a number", int: "an integer", str: "a string", bool: "true or false", dict: "a table"}

Spec = Mapping[str, tuple[type, Any]]
"""name -> (type, default); ``float`` accepts ints; ``dict`` means any mapping."""


PARAM_SPECS: dict[str, Spec] = {}
"""Each built-in policy's parameters as its ``parse_params`` last read them (``balloonlab-launch --schema``)."""


def parse_params(policy: str, params: Mapping[str, Any] | None, spec: Spec) -> dict[str, Any]:
    """Defaults overridden by ``params``; unknown names and wrong types are refused by name."""
    PARAM_SPECS[policy] = spec
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise PolicyConfigError(
            f"balloon policy {policy!r}: {with_known(f'unknown parameter(s) {unknown}', unknown[0], spec)}")
    out: dict[str, Any] = {}
    for name, (kind, default) in spec.items():
        if name not in params:
            out[name] = default
            continue
        value = params[name]
        if kind is dict:
            ok = isinstance(value, Mapping)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise PolicyConfigError(
                f"balloon policy {policy!r}: parameter {name!r}: expected {_WORDS.get(kind, kind.__name__)}, "
                f"got {describe(value)}")
        out[name] = value
    if "period_ticks" in out and out["period_ticks"] < 1:
        raise PolicyConfigError(f"balloon policy {policy!r}: period_ticks must be >= 1, got {out['period_ticks']}")
    return out


def check_fraction(policy: str, name: str, value: float, *, below_one: bool = False) -> None:
    if not (0.0 <= value < 1.0 if below_one else 0.0 <= value <= 1.0):
        raise PolicyConfigError(
            f"balloon policy {policy!r}: parameter {name!r} must be in [0, 1{')' if below_one else ']'}, got {value}")


def check_non_negative(policy: str, name: str, value: float) -> None:
    if value < 0:
        raise PolicyConfigError(f"balloon policy {policy!r}: parameter {name!r} must be >= 0, got {value}")
