"""Build a guest's workload from scenario specs: ``[{kind=, region=, weight=, ...params}, ...]``."""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import GuestConfigError, UnknownWorkload
from .generators import WORKLOADS, FullWrites, Mix, Workload
from .layout import Layout
from .trace import read_trace

__all__ = ["build_workload"]


def build_workload(specs: Sequence[Mapping[str, Any]], layout: Layout, rng: np.random.Generator,
                   where: str = "workload") -> Workload:
    """One workload (a ``Mix`` when there are several specs), each component on its own child generator.

    A ``trace`` spec takes ``path`` (a trace file) instead of arrays. Any
    spec takes ``overwrite_frac`` (``FullWrites``; 0 = no write is known to
    cover its whole page, and nothing extra is drawn).
    """
    if not specs:
        raise GuestConfigError(f"{where}: at least one workload spec is needed")
    children = rng.spawn(len(specs) + 1)
    comps: list[Workload] = []
    weights: list[float] = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(spec, Mapping):
            raise GuestConfigError(f"{at}: expected a table, got {type(spec).__name__}")
        params = dict(spec)
        kind = params.pop("kind", None)
        if kind not in WORKLOADS:
            raise UnknownWorkload(kind, WORKLOADS)
        if "region" not in params:
            raise GuestConfigError(f"{at}.region: missing (regions: {', '.join(r.name for r in layout.regions)})")
        region = params.pop("region")
        weight = params.pop("weight", 1.0)
        overwrite_frac = params.pop("overwrite_frac", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise GuestConfigError(f"{at}.weight: must be a number > 0, got {weight!r}")
        start, pages = layout.span(str(region))
        cls = WORKLOADS[kind]
        if kind == "trace" and "path" in params:
            tp, tw = read_trace(params.pop("path"))
            params["trace_pages"], params["trace_writes"] = tp, tw
        accepted = set(inspect.signature(cls).parameters) - {"start", "pages", "rng"}
        extra = sorted(set(params) - accepted)
        if extra:
            raise GuestConfigError(f"{at}: unknown parameter(s) {', '.join(extra)} for {kind!r}; "
                                   f"accepted: {', '.join(sorted(accepted)) or 'none'}")
        try:
            comp = cls(start, pages, children[i], **params)
            if overwrite_frac != 0.0:
                # its own stream (spawning draws nothing), so the references are those without it
                comp = FullWrites(comp, overwrite_frac, children[i].spawn(1)[0])
            comps.append(comp)
        except GuestConfigError as e:
            raise GuestConfigError(f"{at}: {e}") from None
        except (TypeError, ValueError) as e:
            raise GuestConfigError(f"{at}: bad parameter for {kind!r}: {e}") from None
        weights.append(float(weight))
    if len(comps) == 1:
        return comps[0]
    return Mix(comps, weights, children[-1])
