"""A TickDone's stats as they go on the wire.

The host decodes every guest's stats at every tick; ~85 string keys are
most of a TickDone's bytes and of its decoding. So the keys go once: the
first TickDone of a connection carries a map, and so does any whose keys
differ from the last map's; the others carry the values alone, in the
order of that map's keys (proto/README.md, ``TickDone.stats``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["StatsOnWire"]


class StatsOnWire:
    """Turns each tick's stats map into what one connection sends: the map, or its values."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: tuple[str, ...] | None = None   # the keys of the last map sent, in order

    def __call__(self, stats: dict[str, Any]) -> dict[str, Any] | list[Any]:
        keys = tuple(stats)
        if keys == self._keys:   # the same key objects each tick: compared by identity, element by element
            return list(stats.values())
        self._keys = keys
        return stats
