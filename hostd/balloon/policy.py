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

from typing import Any, Mapping, NamedTuple, Protocol

from balloonlab.proto.schema import describe, with_known

from ..errors import PolicyConfigError
from .decision import Decision
from .view import GuestView, HostView

__all__ = ["BalloonController", "ControllerBase", "clamp_target", "is_due", "parse_params", "PARAM_SPECS", "Spec",
           "Param", "fraction", "non_negative", "period_ticks", "check_fraction", "check_non_negative"]


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


class Param(NamedTuple):
    """One controller parameter: its type, default, meaning and bounds (checked here, shown by ``--schema``)."""
    kind: type
    default: Any
    doc: str = ""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False    # ``value > lo`` rather than ``>=``
    hi_open: bool = False    # ``value < hi`` rather than ``<=``

    def bounds_error(self, value: Any) -> str | None:
        """Why ``value`` is out of bounds, in the words the message uses; None when it is within them."""
        if value is None or self.kind not in (int, float) or (self.lo is None and self.hi is None):
            return None
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        if low_ok and high_ok:
            return None
        if self.hi is None:
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"must be {'<' if self.hi_open else '<='} {self.hi:g}"
        return (f"must be in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")


def fraction(doc: str, default: float, *, below_one: bool = False) -> Param:
    """A share in [0, 1] (or [0, 1))."""
    return Param(float, default, doc, 0.0, 1.0, hi_open=below_one)


def non_negative(kind: type, doc: str, default: Any) -> Param:
    return Param(kind, default, doc, 0.0)


def period_ticks(default: int = 1) -> Param:
    return Param(int, default, "act every this many ticks", 1.0)


Spec = Mapping[str, "tuple[type, Any] | Param"]
"""name -> ``Param`` (or a bare ``(type, default)``); ``float`` accepts ints; ``dict`` means any mapping."""


PARAM_SPECS: dict[str, dict[str, Param]] = {}
"""Each built-in policy's parameters as its ``parse_params`` last read them (``balloonlab-launch --schema``)."""


def parse_params(policy: str, params: Mapping[str, Any] | None, spec: Spec) -> dict[str, Any]:
    """Defaults overridden by ``params``; unknown names, wrong types and values out of bounds are refused by name."""
    full = {name: p if isinstance(p, Param) else Param(*p) for name, p in spec.items()}
    PARAM_SPECS[policy] = full
    params = dict(params or {})
    unknown = sorted(set(params) - set(full))
    if unknown:
        raise PolicyConfigError(
            f"balloon policy {policy!r}: {with_known(f'unknown parameter(s) {unknown}', unknown[0], full)}")
    out: dict[str, Any] = {}
    for name, param in full.items():
        kind = param.kind
        if name not in params:
            out[name] = param.default
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
        why = param.bounds_error(value)
        if why is not None:
            raise PolicyConfigError(f"balloon policy {policy!r}: parameter {name!r} {why}, got {value}")
        out[name] = value
    return out


def check_fraction(policy: str, name: str, value: float, *, below_one: bool = False) -> None:
    if not (0.0 <= value < 1.0 if below_one else 0.0 <= value <= 1.0):
        raise PolicyConfigError(
            f"balloon policy {policy!r}: parameter {name!r} must be in [0, 1{')' if below_one else ']'}, got {value}")


def check_non_negative(policy: str, name: str, value: float) -> None:
    if value < 0:
        raise PolicyConfigError(f"balloon policy {policy!r}: parameter {name!r} must be >= 0, got {value}")
