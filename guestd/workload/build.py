"""Build a guest's workload from scenario specs: ``[{kind=, region=, weight=, ...params}, ...]``.

A spec's keys, types and bounds are the schema's (``balloonlab.proto.schema.tables``:
one struct per kind); a spec given as a mapping is decoded with it here, so
a library caller gets the same errors as a scenario file. The generator of
each kind (``generators.WORKLOADS``) takes the spec's parameters as keyword
arguments; a parameter left out (None) takes the generator's default.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import msgspec
import numpy as np

from balloonlab.proto.schema import SchemaError, Workload, decode

from ..errors import GuestConfigError, TraceFormatError
from .generators import WORKLOADS, Mix
from .generators import Workload as Generator
from .layout import Layout
from .recorded import trace_of

__all__ = ["build_workload", "decode_spec", "spec_kind", "spec_params", "spec_dict"]

_COMMON = ("region", "weight")


def decode_spec(spec: Any, where: str = "workload") -> Any:
    """A workload spec as its schema struct (a mapping is decoded; a struct is taken as it is)."""
    if isinstance(spec, msgspec.Struct):
        return spec
    try:
        return decode(Workload, spec, path=where)
    except SchemaError as e:
        raise GuestConfigError(str(e)) from None


def spec_kind(spec: Any) -> str:
    return str(type(spec).__struct_config__.tag)


def spec_params(spec: Any) -> dict[str, Any]:
    """The generator's keyword arguments: every key of the spec but region and weight, None left out."""
    return {f: getattr(spec, f) for f in spec.__struct_fields__ if f not in _COMMON and getattr(spec, f) is not None}


def spec_dict(spec: Any) -> dict[str, Any]:
    """A decoded spec as a plain table: kind, region, weight and the parameters given or defaulted (not None)."""
    return {"kind": spec_kind(spec), "region": spec.region, "weight": spec.weight, **spec_params(spec)}


def build_workload(specs: Sequence[Mapping[str, Any] | Any], layout: Layout, rng: np.random.Generator,
                   where: str = "workload") -> Generator:
    """One workload (a ``Mix`` when there are several specs), each component on its own child generator.

    A ``trace`` spec names a trace file (``path``) or a shipped recording (``program``).
    """
    if not specs:
        raise GuestConfigError(f"{where}: at least one workload spec is needed")
    children = rng.spawn(len(specs) + 1)
    comps: list[Generator] = []
    weights: list[float] = []
    for i, raw in enumerate(specs):
        at = f"{where}[{i}]"
        spec = decode_spec(raw, at)
        kind = spec_kind(spec)
        try:
            start, pages = layout.span(spec.region)
        except GuestConfigError as e:
            raise GuestConfigError(f"{at}.region: {e}") from None
        params = spec_params(spec)
        try:
            if kind == "trace":
                tp, tw = trace_of(params.pop("path", None), params.pop("program", None))
                params["trace_pages"], params["trace_writes"] = tp, tw
            comps.append(WORKLOADS[kind](start, pages, children[i], **params))
        except GuestConfigError as e:
            key, sep, rest = str(e).partition(": ")
            named = sep and key in spec.__struct_fields__     # the message names one of the spec's keys
            raise GuestConfigError(f"{at}.{key}: {rest}" if named else f"{at}: {e}") from None
        except TraceFormatError as e:
            raise GuestConfigError(f"{at}.{'program' if spec.program else 'path'}: {e}") from None
        except (TypeError, ValueError) as e:
            raise GuestConfigError(f"{at}: bad parameter for {kind!r}: {e}") from None
        weights.append(float(spec.weight))
    if len(comps) == 1:
        return comps[0]
    return Mix(comps, weights, children[-1])
