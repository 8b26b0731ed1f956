"""One schema of the scenario file, shared by the launcher, the host and the guests.

- ``tables``: every table and key as a msgspec struct (type, bounds,
  default, meaning); one key is one field there.
- ``errors``: ``decode(cls, data, path=, where=)`` and the messages
  (``guest.workload[1].wieght: unknown key; did you mean 'weight'? ...``).
- ``units``: MiB/KiB -> pages, the only place.
- ``json_schema()``: the file's JSON Schema (``balloonlab-launch --schema``).

msgspec over pydantic: a guest process imports this, and msgspec costs
~8 ms and ~2 MiB there against ~85 ms and ~17 MiB (README, Dependencies).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .errors import (SchemaError, decode, describe, did_you_mean, join_path, known_list, split_where, suggest, unknown_name,
                     with_known)
from .tables import (TOP_TABLES, WORKLOAD_KINDS, BalloonTable, CostsTable, DiskDevice, DiskTable, EditorScenario,
                     GuestEntry, GuestTable, HostTable, LockProtocol, LocksTable, Region, ScenarioFile, ScenarioTable,
                     SweepTable, Table, Tables, Workload)
from .units import PAGE_BYTES, PAGES_PER_MIB, kib_to_pages, mib_to_pages, pages_to_mib

__all__ = [
    "SchemaError", "decode", "describe", "did_you_mean", "join_path", "known_list", "suggest", "unknown_name", "with_known",
    "split_where",
    "TOP_TABLES", "WORKLOAD_KINDS", "BalloonTable", "CostsTable", "DiskDevice", "DiskTable", "EditorScenario",
    "GuestEntry", "GuestTable", "HostTable", "LockProtocol", "LocksTable", "Region", "ScenarioFile",
    "ScenarioTable", "SweepTable", "Table", "Tables", "Workload",
    "PAGE_BYTES", "PAGES_PER_MIB", "kib_to_pages", "mib_to_pages", "pages_to_mib", "json_schema",
]


def json_schema(names: Mapping[tuple[str, str], tuple[Iterable[str], bool]] | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a scenario file, for editors (TOML via taplo / Even Better TOML).

    ``names`` adds the values of keys whose valid names live in a registry
    proto cannot import: ``{("HostTable", "victim"): (["clock", "random"], True)}``;
    True makes them the only values (``enum``), False lists them as
    ``examples`` (a policy may also be a user's ``file.py:Class``).
    """
    import msgspec
    schema = msgspec.json.schema(EditorScenario)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "balloonlab scenario"
    schema["description"] = "A balloonlab scenario file (TOML). README.md, 'Scenario files', documents every table."
    for (table, key), (values, only) in (names or {}).items():
        prop = schema["$defs"][table]["properties"][key]
        target = next((a for a in prop.get("anyOf", [prop]) if a.get("type") == "string"), prop)
        target["enum" if only else "examples"] = sorted(values)
    return schema
