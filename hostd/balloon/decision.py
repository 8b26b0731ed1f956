"""Controller decisions: the target a controller wants for a guest, why, and the numbers it used.

A controller's ``decide(view)`` returns one ``Decision`` per guest (or
``None`` on a tick it does not act). ``DecisionLog`` turns them into the
targets the host sends, after the host's own limits (``[0,
max_balloon_pages]``; a guest flagged uncooperative is not asked for more
than it holds), and logs them as ``balloon_decision`` events:

- every decision that changes a target (``inflate`` / ``deflate``);
- a ``hold`` (target unchanged) when its reason differs from the last one
  logged for that guest, so a reason that lasts a thousand ticks is one line;
  with ``[balloon] log_decisions = "all"`` every decision of every tick.

Every decision is counted per guest and reason code in any case;
``metrics()`` (``run_finished.balloon_decisions``) has the counts and each
guest's last decision.

Each decision also gives the guest's **allocation target**: the host frames
the VM may consume (ESX's per-VM target, ``hostd.memstate``). A controller
that allocates memory rather than sizing balloons sets
``Decision.alloc_target_pages`` itself; a balloon-only controller leaves it
``None`` and the host derives it from the balloon target it sends:
``consumed - (balloon_target - balloon_actual)``, i.e. what the VM will
consume once its balloon has reached the target (``consumed`` = the host
frames backing the guest now, ``GuestView.resident_pages``). On a tick a
controller does not act, derived targets are derived again from the
standing balloon targets and explicit ones stand. ``alloc_targets`` holds
the latest, per guest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Mapping

import structlog

from balloonlab.proto import events as ev

from ..memstate import derived_alloc_target as _derive
from .view import GuestView, HostView

__all__ = ["Decision", "DecisionLog", "LOG_DECISIONS", "hold"]

log = structlog.get_logger("hostd.balloon")

LOG_DECISIONS = ("changes", "all")


@dataclass(frozen=True, slots=True)
class Decision:
    """What a controller wants for one guest this tick.

    ``code`` is a short stable name of the reason (counted in the report),
    ``reason`` says it in words with the numbers, ``inputs`` holds those
    numbers by name (units in the names: ``*_pages``, ``*_frames``, ``pff``
    in faults per virtual second).
    """

    target_pages: int
    code: str
    reason: str
    inputs: Mapping[str, float] = field(default_factory=dict)
    alloc_target_pages: int | None = None   # host frames the VM may consume; None: derived (module docstring)


def hold(g: GuestView, code: str, reason: str, **inputs: float) -> Decision:
    """Keep the guest's current target."""
    return Decision(g.target_pages, code, reason, inputs)


def derived_alloc_target(g: GuestView, balloon_target_pages: int) -> int:
    """A balloon-only controller's allocation target for ``g``: what it consumes once at its balloon target."""
    return _derive(g.resident_pages, balloon_target_pages, g.actual_pages)


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 3) if math.isfinite(x) else None   # JSON has no inf
    return x


class DecisionLog:
    def __init__(self, policy: str, mode: str = "changes") -> None:
        if mode not in LOG_DECISIONS:
            raise ValueError(f"log_decisions must be one of {list(LOG_DECISIONS)}, got {mode!r}")
        self.policy = policy
        self.mode = mode
        self._counts: dict[int, dict[str, int]] = {}
        self._last: dict[int, dict[str, Any]] = {}
        self._logged_code: dict[int, str] = {}
        self._explicit_alloc: dict[int, int] = {}   # allocation targets a controller gave itself
        self.alloc_targets: dict[int, int] = {}     # the latest allocation target per guest

    def decide(self, controller: Any, view: HostView, uncooperative: AbstractSet[int] = frozenset()) -> dict[int, int]:
        """The controller's decisions for ``view``, limited by the host, logged; returns the targets.

        Also sets ``alloc_targets`` for every guest of the view.
        """
        decisions = controller.decide(view)
        if decisions is None:   # not due this tick: nothing decided, the targets stand
            targets = view.current_targets()
            self.alloc_targets = {g.guest_id: self._explicit_alloc.get(g.guest_id,
                                                                       derived_alloc_target(g, targets[g.guest_id]))
                                  for g in view.guests}
            return targets
        out: dict[int, int] = {}
        alloc: dict[int, int] = {}
        for g in view.guests:
            d = _checked(decisions.get(g.guest_id), g)
            target = min(max(int(d.target_pages), 0), g.max_balloon_pages)
            reason = d.reason
            if target != d.target_pages:
                reason += f" (limited to [0, {g.max_balloon_pages}] pages, the guest's max balloon)"
            code = d.code
            if g.guest_id in uncooperative and target > g.actual_pages:
                reason = (f"guest does not follow its balloon target: not asked for more than the "
                          f"{g.actual_pages} pages it holds (host swapping covers it); the controller "
                          f"wanted {target} pages: {reason}")
                code, target = "guest_uncooperative", min(target, g.actual_pages)
            out[g.guest_id] = target
            if d.alloc_target_pages is None:
                self._explicit_alloc.pop(g.guest_id, None)
                alloc[g.guest_id] = derived_alloc_target(g, target)
            else:
                alloc[g.guest_id] = self._explicit_alloc[g.guest_id] = min(max(int(d.alloc_target_pages), 0),
                                                                           g.ram_pages)
            self._record(view, g, target, code, reason, d.inputs, alloc[g.guest_id])
        self.alloc_targets = alloc
        return out

    def _record(self, view: HostView, g: GuestView, target: int, code: str, reason: str,
                inputs: Mapping[str, float], alloc_target: int) -> None:
        gid = g.guest_id
        counts = self._counts.setdefault(gid, {})
        counts[code] = counts.get(code, 0) + 1
        kind = "inflate" if target > g.target_pages else "deflate" if target < g.target_pages else "hold"
        record = {"tick": view.tick, "decision": kind, "code": code, "reason": reason, "target_pages": target,
                  "previous_pages": g.target_pages, "alloc_target_pages": alloc_target}
        self._last[gid] = record
        if self.mode == "all" or kind != "hold" or self._logged_code.get(gid) != code:
            self._logged_code[gid] = code if kind == "hold" else ""
            log.info(ev.BALLOON_DECISION, guest=gid, decision=kind, code=code, reason=reason,
                     target_pages=target, previous_pages=g.target_pages, actual_pages=g.actual_pages,
                     alloc_target_pages=alloc_target, policy=self.policy, inputs={k: _round(v) for k, v in inputs.items()})

    def metrics(self) -> dict[str, Any]:
        """Per guest: decisions counted by reason code, and the last decision (``run_finished``)."""
        return {str(gid): {"counts": dict(sorted(c.items())), "decisions": sum(c.values()),
                           "last": self._last.get(gid)}
                for gid, c in sorted(self._counts.items())}


def _checked(d: Any, g: GuestView) -> Decision:
    if d is None:
        return hold(g, "no_decision", "the controller gave no target for this guest")
    if isinstance(d, Decision):
        return d
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return Decision(int(d), "target", "target from the controller (it gave no reason)")
    raise TypeError(f"a balloon controller's decide() must map guest ids to Decision (or a target in "
                    f"pages), got {type(d).__name__} {d!r} for guest {g.guest_id}")
