"""Page replacement policies: one module each behind one Protocol, and a name registry.

Names: ``fifo``, ``clock``, ``clock-r0``, ``esc``, ``lru``, ``opt``,
``file-first``, ``car`` (the working-set policy). Each module's docstring is
the policy's exact definition; guestd/README.md collects them.

A name ``"path/to/mine.py:MyPolicy"`` loads the user's class from that file
(``balloonlab.proto.plugins``; the launcher made the path absolute and the
host sent it in the guest's config). It is built as ``MyPolicy(n_frames,
**policy_params)`` and must have every member of ``ReplacementPolicy``;
subclassing ``replacement.base.PolicyBase`` gives the defaults
(docs/policies.md has a worked example).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from balloonlab.proto.plugins import PluginError, is_file_spec, load_class
from balloonlab.proto.schema import did_you_mean

from ..errors import GuestConfigError, UnknownPolicy
from ..memory import Frames
from .car import CarPolicy
from .clock import ClockPolicy
from .clock_r0 import ClockR0Policy
from .esc import EscPolicy
from .fifo import FifoPolicy
from .file_first import FileFirstPolicy
from .lru import LruPolicy
from .opt import OptPolicy

__all__ = ["ReplacementPolicy", "POLICIES", "WORKING_SET_POLICY", "make_policy", "policy_names"]


@runtime_checkable
class ReplacementPolicy(Protocol):
    """The interface the kernel drives (call order in ``replacement/base.py``)."""

    name: str
    capacity_pages: int

    def attach(self, frames: Frames) -> None: ...
    def resize(self, capacity_pages: int) -> None: ...
    def on_hits(self, gpfns: np.ndarray, writes: np.ndarray, first_ref: int) -> None: ...
    def on_load(self, gpfn: int, write: bool, ref: int) -> None: ...
    def select_victim(self) -> int: ...
    def select_victims(self, n: int) -> np.ndarray: ...


POLICIES: dict[str, Callable[..., ReplacementPolicy]] = {
    "fifo": FifoPolicy,
    "clock": ClockPolicy,
    "clock-r0": ClockR0Policy,
    "esc": EscPolicy,
    "lru": LruPolicy,
    "opt": OptPolicy,
    "file-first": FileFirstPolicy,
    "car": CarPolicy,
}

WORKING_SET_POLICY = "car"
"""The recency+frequency policy that keeps hot file cache and gives up cold anonymous memory."""


def policy_names() -> list[str]:
    return sorted(POLICIES)


@functools.cache
def _parameters(cls: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """The keyword parameters ``cls`` takes besides ``n_frames``, and whether it takes ``**kwargs``.

    ``inspect.signature`` costs ~0.1 ms a call; every guest builds its
    policy, and the fork server reads the built-in ones once before it forks
    (``warm_up_policies``).
    """
    params = inspect.signature(cls).parameters
    return frozenset(params) - {"n_frames"}, any(p.kind is p.VAR_KEYWORD for p in params.values())


def warm_up_policies() -> None:
    """Read every built-in policy's parameters now (a process forked after this inherits them)."""
    for cls in POLICIES.values():
        _parameters(cls)


def make_policy(name: str, n_frames: int, **params: Any) -> ReplacementPolicy:
    """Build policy ``name`` for ``n_frames`` frames; unknown names and parameters are typed errors."""
    if is_file_spec(name):
        try:
            cls: Callable[..., Any] = load_class(name)
        except PluginError as exc:
            raise GuestConfigError(f"replacement {exc}") from None
    else:
        try:
            cls = POLICIES[name]
        except (KeyError, TypeError):
            raise UnknownPolicy(name, POLICIES) from None
    try:
        accepted, has_kwargs = _parameters(cls)
    except (TypeError, ValueError):
        raise GuestConfigError(f"policy {name!r}: cannot read the signature of {cls!r}") from None
    extra = sorted(set(params) - accepted)
    if extra and not has_kwargs:
        raise GuestConfigError(f"policy {name!r}: unknown parameter(s) {', '.join(extra)}"
                               f"{did_you_mean(extra[0], accepted)}; accepted: {sorted(accepted) or 'none'}")
    if not is_file_spec(name):
        return cls(n_frames, **params)
    try:
        policy = cls(n_frames, **params)
    except Exception as exc:  # noqa: BLE001 -- the user's constructor: report what it raised
        raise GuestConfigError(f"replacement policy {name!r}: {type(exc).__name__} from "
                               f"{cls.__name__}({n_frames}, **{params!r}): {exc}") from None
    _check_interface(name, policy)
    return policy


def _check_interface(spec: str, policy: Any) -> None:
    """A user's policy must have every member the kernel uses; name the missing ones."""
    methods = ("attach", "resize", "on_hits", "on_load", "select_victim", "select_victims")
    missing = [m for m in methods if not callable(getattr(policy, m, None))]
    missing += [a for a in ("name", "capacity_pages") if not hasattr(policy, a)]
    if missing:
        raise GuestConfigError(
            f"replacement policy {spec!r}: {type(policy).__name__} lacks {', '.join(missing)} of the "
            f"ReplacementPolicy interface (subclass balloonlab.guestd.replacement.base.PolicyBase for the "
            f"defaults; docs/policies.md)")
