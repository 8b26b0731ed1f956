"""The scenario's JSON Schema for editors (``balloonlab-launch --schema``).

``proto.schema.json_schema`` describes every table the schema owns; the
tables whose keys belong to the host's registries are added here from those
registries, so an editor completes them too: each monitor's table
(``[monitors.NAME]``, from its config dataclass: type, default, bounds,
choices, the field's comment) and each built-in balloon policy's
``params`` (type, default, meaning and bounds, from its ``parse_params`` spec).
"""
from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Mapping

__all__ = ["editor_schema"]

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}


def editor_schema() -> dict[str, Any]:
    """The scenario's JSON Schema with the names and tables the host's and the guests' registries know today."""
    from balloonlab.guestd.replacement import POLICIES
    from balloonlab.guestd.workload.recorded import shipped_traces
    from balloonlab.hostd.balloon import BALLOON_POLICIES, policy_params
    from balloonlab.hostd.devices import DEVICE_PROFILES
    from balloonlab.hostd.discipline import DEPRECATED_ORDERS, REQUEST_ORDERS
    from balloonlab.hostd.monitors.registry import MONITORS
    from balloonlab.hostd.victim import VICTIM_POLICIES
    from balloonlab.proto.schema import json_schema
    names = {("HostTable", "victim"): (VICTIM_POLICIES, True),
             ("HostTable", "request_order"): ((*REQUEST_ORDERS, *DEPRECATED_ORDERS), True),
             ("BalloonTable", "policy"): (BALLOON_POLICIES, False), ("GuestTable", "policy"): (POLICIES, False),
             ("GuestEntry", "policy"): (POLICIES, False), ("TraceWorkload", "program"): (shipped_traces(), True),
             ("DiskDevice", "profile"): (DEVICE_PROFILES, True)}
    schema = json_schema(names)
    defs = schema["$defs"]
    monitors = {spec.name: _dataclass_object(spec.config) for spec in MONITORS if spec.config is not None}
    for table in ("EditorScenario", "Tables"):
        if "monitors" in defs.get(table, {}).get("properties", {}):
            prop = defs[table]["properties"]["monitors"]
            prop.pop("additionalProperties", None)
            prop.update({"type": "object", "properties": monitors, "additionalProperties": False})
    defs["BalloonTable"]["allOf"] = [
        {"if": {"properties": {"policy": {"const": name}}, "required": ["policy"]},
         "then": {"properties": {"params": _params_object(spec)}}}
        for name, spec in policy_params().items()]
    return schema


def _dataclass_object(dc: type) -> dict[str, Any]:
    from balloonlab.proto.schema.tables import field_comments
    said = field_comments(dc)
    props: dict[str, Any] = {}
    for f in fields(dc):
        default = f.default if f.default is not MISSING else None
        prop: dict[str, Any] = {"type": _JSON_TYPES.get(type(default), "number")}
        if default is not None:
            prop["default"] = default
        if prop["type"] in ("integer", "number"):
            prop["minimum"] = 1 if f.metadata.get("at_least_one") else 0
            if f.metadata.get("fraction"):
                prop["maximum"] = 1
        if "choices" in f.metadata:
            prop["enum"] = list(f.metadata["choices"])
        if f.name in said:
            prop["description"] = said[f.name]
        props[f.name] = prop
    return {"type": "object", "properties": props, "additionalProperties": False}


def _params_object(spec: Mapping[str, Any]) -> dict[str, Any]:
    props = {}
    for name, param in spec.items():
        kind, default = param.kind, param.default
        prop: dict[str, Any] = {"type": "number" if kind is float else _JSON_TYPES.get(kind, "string")}
        if default is not None:
            prop["default"] = default
        if param.doc:
            prop["description"] = param.doc
        as_kind = int if kind is int else float
        if param.lo is not None:
            prop["exclusiveMinimum" if param.lo_open else "minimum"] = as_kind(param.lo)
        if param.hi is not None:
            prop["exclusiveMaximum" if param.hi_open else "maximum"] = as_kind(param.hi)
        props[name] = prop
    return {"type": "object", "properties": props, "additionalProperties": False}
