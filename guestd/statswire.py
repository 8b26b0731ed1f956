"""A tick's stats as the vCPU reports them, and as they go on the wire.

The host decodes every guest's stats at every tick, and the guest builds
them at every tick; ~85 string keys are most of a TickDone's bytes, of its
decoding and of the building. So a tick's stats are a ``StatsRow``: the
keys (one tuple, the same object tick after tick) and a new list of
values. The keys go on the wire once: the first TickDone of a connection
carries a map, and so does any whose keys differ from the last map's; the
others carry the values alone, in the order of that map's keys
(proto/README.md, ``TickDone.stats``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["StatsRow", "StatsOnWire"]


class StatsRow:
    """One tick's stats: ``keys`` and their ``values``, in order; read by key like a map."""

    __slots__ = ("keys", "values", "_index")

    def __init__(self, keys: tuple[str, ...], values: list[Any]) -> None:
        self.keys = keys
        self.values = values
        self._index: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(self.keys, self.values))

    def __getitem__(self, key: str) -> Any:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self.values[self._index[key]]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __len__(self) -> int:
        return len(self.keys)


class StatsOnWire:
    """Turns each tick's ``StatsRow`` into what one connection sends: a map, or the values alone."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: tuple[str, ...] | None = None   # the keys of the last map sent, in order

    def __call__(self, row: StatsRow | dict[str, Any]) -> dict[str, Any] | list[Any]:
        if type(row) is dict:
            keys, values = tuple(row), None
        else:
            keys, values = row.keys, row.values
        # the same tuple each tick (an identity test); another one with the same keys is as good
        if keys is self._keys or keys == self._keys:
            return values if values is not None else list(row.values())   # type: ignore[union-attr]
        self._keys = keys
        return row if values is None else row.as_dict()   # type: ignore[return-value,union-attr]
