"""Balloon controller policies: one module each, one Protocol, one registry.

``make_controller(name, params)`` builds a fresh controller; unknown names
and parameters are refused with a ``PolicyConfigError`` that lists the
known ones. A name ``"path/to/mine.py:MyController"`` loads the user's
class from that file (``balloonlab.proto.plugins``; the launcher has made
the path absolute): it is built with ``MyController.from_params(params)``
when it has that classmethod, else ``MyController(**params)``, and must
have ``decide(view)`` (the full interface, ``policy.py``) or at least
``targets(view)`` (then its decisions carry no reasons). A controller with
``bind_costs(costs)`` is handed the run's cost model when ``costs`` is given
(senpai needs what a reference costs to read stall time from the guest's clock).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from balloonlab.proto.plugins import PluginError, is_file_spec, load_class
from balloonlab.proto.costs import CostModel
from balloonlab.proto.schema import with_known

from ..errors import PolicyConfigError
from .aggressive import AggressiveBalloon
from .mom import MomBalloon
from .noncoop import NonCooperationDetector
from .none import NoBalloon
from .decision import Decision, DecisionLog, hold
from .hyperv import HyperVBalloon
from .policy import BalloonController, ControllerBase, Param, clamp_target
from .proportional import ProportionalBalloon
from .senpai import SenpaiBalloon
from .squeezed import SqueezedBalloon
from .static import StaticBalloon
from .sweep import SweepBalloon
from .view import GuestView, HostView
from .working_set import WorkingSetBalloon

__all__ = ["BalloonController", "ControllerBase", "BALLOON_POLICIES", "make_controller", "policy_params", "GuestView",
           "HostView", "NonCooperationDetector", "clamp_target", "Decision", "DecisionLog", "hold"]

BALLOON_POLICIES: dict[str, Callable[[Mapping[str, Any]], BalloonController]] = {
    NoBalloon.name: NoBalloon.from_params,
    StaticBalloon.name: StaticBalloon.from_params,
    ProportionalBalloon.name: ProportionalBalloon.from_params,
    MomBalloon.name: MomBalloon.from_params,
    WorkingSetBalloon.name: WorkingSetBalloon.from_params,
    AggressiveBalloon.name: AggressiveBalloon.from_params,
    SweepBalloon.name: SweepBalloon.from_params,
    SqueezedBalloon.name: SqueezedBalloon.from_params,
    HyperVBalloon.name: HyperVBalloon.from_params,
    SenpaiBalloon.name: SenpaiBalloon.from_params,
}


def make_controller(name: str, params: Mapping[str, Any] | None = None, *,
                    costs: CostModel | None = None) -> BalloonController:
    if is_file_spec(name):
        controller = _user_controller(name, params or {})
    else:
        try:
            factory = BALLOON_POLICIES[name]
        except (KeyError, TypeError):
            raise PolicyConfigError(
                with_known(f"balloon policy {name!r} is unknown", name, BALLOON_POLICIES)) from None
        controller = factory(params or {})
    bind = getattr(controller, "bind_costs", None)
    if costs is not None and callable(bind):
        bind(costs)
    return controller


class _TargetsOnly(ControllerBase):
    """A user's controller with only ``targets(view)``: its targets, as decisions without a reason."""

    def __init__(self, inner: Any, name: str) -> None:
        self.inner = inner
        self.name = name

    def decide(self, view: HostView) -> dict[int, Decision]:
        wanted = self.inner.targets(view)
        return {gid: Decision(int(t), "targets", f"target from {self.name}.targets() (it gives no reasons)")
                for gid, t in dict(wanted).items()}


def policy_params() -> dict[str, Mapping[str, Param]]:
    """Each built-in policy's parameters (``Param``: type, default, meaning, bounds), read by building it with its
    defaults."""
    from .policy import PARAM_SPECS
    for name in BALLOON_POLICIES:
        make_controller(name, {})
    return {name: dict(PARAM_SPECS.get(name, {})) for name in BALLOON_POLICIES}


def _user_controller(spec: str, params: Mapping[str, Any]) -> BalloonController:
    try:
        cls = load_class(spec)
    except PluginError as exc:
        raise PolicyConfigError(f"balloon {exc}") from None
    has_decide = callable(getattr(cls, "decide", None))
    if not has_decide and not callable(getattr(cls, "targets", None)):
        raise PolicyConfigError(f"balloon policy {spec!r}: class {cls.__name__} has neither decide(view) nor "
                                f"targets(view); see the BalloonController interface (docs/policies.md)")
    try:
        factory = getattr(cls, "from_params", None)
        obj = factory(dict(params)) if callable(factory) else cls(**dict(params))
    except PolicyConfigError:
        raise
    except (TypeError, ValueError) as exc:
        try:
            accepted: Any = sorted(set(inspect.signature(cls).parameters) - {"self"})
        except (TypeError, ValueError):
            accepted = "?"
        raise PolicyConfigError(f"balloon policy {spec!r}: cannot build it with params {dict(params)!r}: {exc}; "
                                f"its constructor takes {accepted}") from None
    if not isinstance(getattr(obj, "name", None), str):
        try:
            obj.name = spec
        except AttributeError:
            pass
    return obj if has_decide else _TargetsOnly(obj, cls.__name__)
